"""The figures tell their story at a glance: titles, the scenario, percent, no mixed colours."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib.figure")

from datapunk_recovery.cli.commands.demo import figure
from datapunk_recovery.demo import DrillSetup, RunResult, fault_windows
from datapunk_recovery.simulate import report
from datapunk_recovery.simulate.catalog import resolve_policies
from datapunk_recovery.simulate.outage import OutageSetup, run_outage

SETUP = DrillSetup(duration=8.0, rate=10.0, seed=7)


def run(label: str, recovery: bool, ok_every: int) -> RunResult:
    outcomes = tuple((i / 10, i % ok_every != 0) for i in range(80))
    return RunResult(
        label=label,
        recovery=recovery,
        latencies=(0.001,) * 80,
        outcomes=outcomes,
        by_kind={},
        calls={"cache": 10, "primary": 5},
        transitions=(),
        fallbacks={},
        faults=3,
    )


def test_the_demo_figure_titles_every_panel_and_speaks_in_percent() -> None:
    runs = [run("without recovery", False, 3), run("with recovery", True, 20)]
    fig = figure(runs, SETUP)
    top, faults, bottom = fig.axes
    assert all(axes.get_title() for axes in (top, faults, bottom))
    assert "8 s at 10 requests/s" in fig._suptitle.get_text()
    assert top.get_ylabel() == "succeeded (%)"  # it plots success, in percent
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert legend[0] == f"without recovery: {runs[0].success_rate:.1%} in all"  # the table's figure
    anchor = top.get_legend().get_bbox_to_anchor().transformed(top.transAxes.inverted())
    assert anchor.x0 > 1.0  # beside the panel, never over the data


def test_each_fault_kind_has_a_row_of_its_own() -> None:
    fig = figure([run("without recovery", False, 3)], SETUP)
    faults = fig.axes[1]
    kinds = {w.target or "all" for w in fault_windows(SETUP.duration)}
    labels = [t.get_text() for t in faults.get_yticklabels()]
    assert len(labels) == len(set(labels)) == len(kinds)
    centres = {round(c.get_paths()[0].get_extents().y0 + 0.4, 3) for c in faults.collections}
    assert centres == set(range(len(kinds)))  # one row per kind, so windows never overlap


def test_the_outage_figure_states_the_scenario_and_what_each_policy_is(tmp_path: Path) -> None:
    setup = OutageSetup(duration=20.0, outage_start=2.0, outage_duration=5.0)
    policies = resolve_policies(["plain", "default"], None)
    results = run_outage(policies, setup)
    captured = {}

    def keep(self: object, path: object, **kwargs: object) -> None:
        captured["figure"] = self

    monkeypatch = pytest.MonkeyPatch()
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", keep)
    try:
        report.plot_outage(results, setup, tmp_path / "o.png", policies)
    finally:
        monkeypatch.undo()
    fig = captured["figure"]
    title = fig._suptitle.get_text()  # type: ignore[attr-defined]
    assert "10 clients offer 100 requests/s" in title and "from 2 s to 7 s" in title
    load, ok = fig.axes  # type: ignore[attr-defined]
    labels = [t.get_text() for t in load.get_legend().get_texts()]
    assert any(label.startswith("plain: ") and "no budget" in label for label in labels)
    assert any(label.startswith("default: ") and "defaults" in label for label in labels)
    assert ok.get_ylabel() == "succeeded (%)"
    assert max(max(line.get_ydata()) for line in ok.get_lines() if len(line.get_ydata()) > 2) > 1
