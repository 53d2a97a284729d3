"""``datapunk-recovery simulate``: tables, JSON, plots and errors, from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from datapunk_recovery.cli import main
from datapunk_recovery.simulate import report

SMALL_CONTENTION = ["simulate", "contention", "--clients", "3,6", "--runs", "2"]
SHORT_OUTAGE = ["simulate", "outage", "--duration", "20s", "--outage-start", "2s", "--outage", "5s"]


def test_contention_prints_a_table_per_policy_and_client_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([*SMALL_CONTENTION, "--policy", "full,none"]) == 0
    out = capsys.readouterr().out
    assert "Contention" in out
    assert out.count("full") == 2 and out.count("none") == 2


def test_contention_json_is_for_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SMALL_CONTENTION, "-p", "decorrelated", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["scenario"] == "contention"
    assert data["setup"]["clients"] == [3, 6]
    assert data["policies"]["decorrelated"]["retry"]["base_delay"] == 0.005
    assert [(r["policy"], r["clients"]) for r in data["results"]] == [
        ("decorrelated", 3),
        ("decorrelated", 6),
    ]


def test_outage_json_reports_amplification_recovery_and_the_timeline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([*SHORT_OUTAGE, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {r["policy"]: r for r in data["results"]}
    assert set(by_name) == {"plain", "default"}  # the default comparison
    assert by_name["plain"]["amplification"] > 2.5
    assert by_name["default"]["amplification"] <= 1.1
    assert len(by_name["plain"]["timeline"]) == 20
    assert data["policies"]["default"]["breaker"]["open_duration"] == 1.0
    assert "failure_on" not in data["policies"]["default"]["breaker"]  # Python objects left out


def test_outage_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(SHORT_OUTAGE) == 0
    out = capsys.readouterr().out
    assert "amplification" in out and "recovery" in out


@pytest.fixture(scope="module")
def matplotlib_loaded() -> None:
    """Pay matplotlib's one-time import (about a second) outside the tests that plot."""
    pytest.importorskip("matplotlib.figure")
    pytest.importorskip("matplotlib.backends.backend_agg")


@pytest.mark.usefixtures("matplotlib_loaded")
def test_contention_plot_is_written_as_png(tmp_path: Path) -> None:
    png = tmp_path / "contention.png"
    assert main([*SMALL_CONTENTION, "-p", "full", "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.usefixtures("matplotlib_loaded")
def test_outage_plot_is_written_as_png(tmp_path: Path) -> None:
    png = tmp_path / "outage.png"
    assert main([*SHORT_OUTAGE, "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(report, "has_matplotlib", lambda: False)
    assert main([*SMALL_CONTENTION, "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_policies_come_from_a_toml_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[policies.slow]\nretry = { base_delay = "50ms", jitter = "equal" }\n')
    assert main([*SMALL_CONTENTION, "--policies", str(path), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["policies"]) == ["slow"]
    assert data["policies"]["slow"]["retry"]["base_delay"] == 0.05


def test_a_bad_policy_file_exits_2_listing_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[policies.x]\nretry = { base_delay = "soon", jiter = "full" }\n')
    assert main([*SMALL_CONTENTION, "--policies", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err
    assert f"{path}: policies.x.retry.base_delay" in err
    assert f"{path}: policies.x.retry.jiter" in err


def test_an_unknown_policy_name_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SMALL_CONTENTION, "-p", "fulll"]) == 2
    assert "no policy of that name" in capsys.readouterr().err


def test_bad_option_values_are_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [*SMALL_CONTENTION, "--base", "soon"],
        ["simulate", "contention", "--clients", "10,x"],
        [*SHORT_OUTAGE, "--seed", "-1"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "expected a duration" in capsys.readouterr().err


def test_an_impossible_scenario_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["simulate", "outage", "--duration", "10s", "--outage", "20s"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: datapunk-recovery simulate outage")
    assert "argument --duration: must leave time after the outage" in err


def test_no_progress_bar_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(SMALL_CONTENTION) == 0
    assert capsys.readouterr().err == ""


def test_plain_text_tables_without_rich() -> None:
    import io

    table = report.Table("Title", ("policy", "calls"), (("full", "12"), ("decorrelated", "3")))
    out = io.StringIO()
    report.render(table, out, fancy=False)
    assert out.getvalue().splitlines() == [
        "Title",
        "policy        calls",
        "------------  -----",
        "full             12",
        "decorrelated      3",
    ]


def test_a_progress_bar_on_a_terminal_once_a_run_lasts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("rich")
    from datapunk_recovery.cli.commands import simulate as command

    monkeypatch.setattr(command, "_PROGRESS_AFTER", 0.0)  # every run "lasts"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(SMALL_CONTENTION) == 0
    captured = capsys.readouterr()
    assert "simulating contention" in captured.err
    assert "Contention" in captured.out  # the results still go to stdout


def test_a_plain_progress_line_without_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from datapunk_recovery.cli.commands import simulate as command

    monkeypatch.setattr(command, "_PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(report, "has_rich", lambda: False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*SHORT_OUTAGE, "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "simulating outage" in captured.err and "100%" in captured.err
    assert json.loads(captured.out)["scenario"] == "outage"  # the bar never reaches stdout


def test_the_progress_bar_never_enters_json_output_even_with_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("rich")
    from datapunk_recovery.cli.commands import simulate as command

    monkeypatch.setattr(command, "_PROGRESS_AFTER", 0.0)
    assert main([*SHORT_OUTAGE, "--format", "json", "--progress"]) == 0
    captured = capsys.readouterr()
    assert "simulating outage" in captured.err
    assert json.loads(captured.out)["scenario"] == "outage"


def test_no_progress_turns_the_bar_off_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from datapunk_recovery.cli.commands import simulate as command

    monkeypatch.setattr(command, "_PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*SMALL_CONTENTION, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_an_outage_run_reports_progress_within_each_policy() -> None:
    from datapunk_recovery.simulate.catalog import resolve_policies
    from datapunk_recovery.simulate.outage import OutageSetup, run_outage

    setup = OutageSetup(duration=20.0, outage_start=2.0, outage_duration=5.0)
    policies = resolve_policies(["plain", "default"], None)
    seen: list[float] = []
    with_ticks = run_outage(policies, setup, tick=seen.append)
    assert len(seen) > 10 * len(policies)  # not only once a policy is done
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert with_ticks == run_outage(policies, setup)  # watching changes nothing
