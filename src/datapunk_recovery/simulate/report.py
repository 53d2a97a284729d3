"""What a simulation shows: tables (rich or plain text), JSON, and matplotlib plots.

rich and matplotlib are optional extras, imported only here and only when
used: without rich a table is plain aligned text; a plot needs matplotlib
(``pip install 'datapunk-recovery[plot]'``).  The figure is drawn with
matplotlib's object API, never ``pyplot``, so no GUI backend is touched.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .._core.durations import format_duration
from .contention import ContentionPoint, ContentionSetup
from .outage import OutageResult, OutageSetup
from .policies import SimPolicy

__all__ = [
    "Table",
    "contention_json",
    "contention_table",
    "describe_policy",
    "has_matplotlib",
    "has_rich",
    "outage_json",
    "outage_table",
    "plot_contention",
    "plot_outage",
    "render",
]


#: Columns for a rich table written to a file or a pipe.
_PIPE_WIDTH = 160


@dataclasses.dataclass(frozen=True, slots=True)
class Table:
    """A titled table of text cells; numbers are right-aligned when rendered."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def has_rich() -> bool:
    """Whether rich is installed (tables and progress bars look better with it)."""
    return importlib.util.find_spec("rich") is not None


def has_matplotlib() -> bool:
    """Whether matplotlib is installed (``--plot`` needs it)."""
    return importlib.util.find_spec("matplotlib") is not None


def render(table: Table, out: IO[str], *, fancy: bool | None = None) -> None:
    """Write ``table`` to ``out``: with rich if installed (or ``fancy``), plain text otherwise."""
    if fancy is None:
        fancy = has_rich()
    if fancy:
        from rich.console import Console
        from rich.table import Table as RichTable

        rich_table = RichTable(title=table.title)
        for i, header in enumerate(table.headers):
            rich_table.add_column(header, justify="left" if i == 0 else "right")
        for row in table.rows:
            rich_table.add_row(*row)
        # Off a terminal rich would squeeze the table into 80 columns.
        width = None if out.isatty() else _PIPE_WIDTH
        Console(file=out, width=width).print(rich_table)
        return
    widths = [
        max(len(cell) for cell in column) for column in zip(table.headers, *table.rows, strict=True)
    ]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    out.write(table.title + "\n")
    out.write(line(table.headers) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in table.rows:
        out.write(line(row) + "\n")


def contention_table(points: Sequence[ContentionPoint], setup: ContentionSetup) -> Table:
    """Calls and completion time per policy and client count (means ± standard deviations)."""
    rows = tuple(
        (
            p.policy,
            str(p.clients),
            f"{p.calls:.0f} ± {p.calls_sd:.0f}",
            f"{p.time:.2f} ± {p.time_sd:.2f}",
        )
        for p in points
    )
    title = f"Contention: writes and time until the last client succeeded ({setup.runs} runs each)"
    return Table(title, ("policy", "clients", "calls", "time (s)"), rows)


def outage_table(results: Sequence[OutageResult], setup: OutageSetup) -> Table:
    """Amplification, success rates and recovery time per policy."""
    rows = []
    for r in results:
        recovery = "never" if r.recovery_time is None else f"{r.recovery_time:.2f}s"
        rows.append(
            (
                r.policy,
                f"{r.amplification:.2f}x",
                f"{r.success_during:.1%}",
                f"{r.success_after:.1%}",
                recovery,
                "-" if r.open_duration is None else format_duration(r.open_duration),
            )
        )
    title = (
        f"Outage: {setup.rate:g} requests/s from {setup.clients} clients, dependency down "
        f"{format_duration(setup.outage_duration)} from {format_duration(setup.outage_start)}"
    )
    headers = ("policy", "amplification", "ok during", "ok after", "recovery", "breaker open")
    return Table(title, headers, tuple(rows))


def describe_policy(policy: SimPolicy) -> dict[str, Any]:
    """A policy's settings as JSON values (settings that hold Python objects are left out)."""
    return _fields(policy)


def _fields(value: object) -> dict[str, Any]:
    return {
        f.name: _plain(getattr(value, f.name))
        for f in dataclasses.fields(value)  # type: ignore[arg-type]
        if f.init and _jsonable(getattr(value, f.name))
    }


def _plain(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _jsonable(value: object) -> bool:
    if value is None or isinstance(value, bool | int | float | str | enum.Enum):
        return True
    if isinstance(value, tuple):
        return all(_jsonable(item) for item in value)
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def contention_json(
    points: Sequence[ContentionPoint],
    setup: ContentionSetup,
    policies: dict[str, SimPolicy],
) -> str:
    """The whole contention experiment as JSON: setup, policies and points (seconds)."""
    return json.dumps(
        {
            "scenario": "contention",
            "setup": _fields(setup),
            "policies": {name: describe_policy(p) for name, p in policies.items()},
            "results": [dataclasses.asdict(p) for p in points],
        },
        indent=2,
    )


def outage_json(
    results: Sequence[OutageResult], setup: OutageSetup, policies: dict[str, SimPolicy]
) -> str:
    """The whole outage experiment as JSON, per-second timelines included (seconds)."""
    return json.dumps(
        {
            "scenario": "outage",
            "setup": _fields(setup),
            "policies": {name: describe_policy(p) for name, p in policies.items()},
            "results": [dataclasses.asdict(r) for r in results],
        },
        indent=2,
    )


def plot_contention(points: Sequence[ContentionPoint], path: str | Path) -> None:
    """Calls and completion time against the number of clients, one line per policy."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    calls_axes, time_axes = figure.subplots(1, 2)
    for name in dict.fromkeys(p.policy for p in points):
        mine = [p for p in points if p.policy == name]
        n = [p.clients for p in mine]
        calls_axes.errorbar(
            n,
            [p.calls for p in mine],
            [p.calls_sd for p in mine],
            marker="o",
            capsize=3,
            label=name,
        )
        time_axes.errorbar(
            n, [p.time for p in mine], [p.time_sd for p in mine], marker="o", capsize=3, label=name
        )
    calls_axes.set(title="Work: writes made", xlabel="clients", ylabel="calls (mean ± sd)")
    time_axes.set(
        title="Completion: last client done",
        xlabel="clients",
        ylabel="seconds (log scale)",
        yscale="log",
    )
    for axes in (calls_axes, time_axes):
        axes.grid(alpha=0.3)
    calls_axes.legend()
    figure.suptitle("N clients updating one record with optimistic concurrency")
    figure.savefig(path, dpi=110)


def plot_outage(
    results: Sequence[OutageResult],
    setup: OutageSetup,
    path: str | Path,
    policies: Mapping[str, SimPolicy] | None = None,
) -> None:
    """Offered against received load per second, and the success rate, for every policy.

    The title states the scenario; each policy's legend entry says what it is
    (its ``description`` in ``policies``); shares are in percent.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 7), layout="constrained")
    load_axes, ok_axes = figure.subplots(2, 1, sharex=True)
    first = results[0].timeline
    seconds = [s.start for s in first]
    load_axes.step(
        seconds,
        [s.offered for s in first],
        where="post",
        color="black",
        linestyle="--",
        label="offered",
    )
    described = policies or {}
    for r in results:
        about = getattr(described.get(r.policy), "description", "")
        line = load_axes.step(
            seconds,
            [s.received for s in r.timeline],
            where="post",
            label=f"{r.policy}: {about}" if about else r.policy,
        )
        share = [100.0 * s.succeeded / s.offered if s.offered else 100.0 for s in r.timeline]
        ok_axes.step(seconds, share, where="post", color=line[0].get_color(), label=r.policy)
        if r.recovery_time is not None:
            ok_axes.axvline(
                setup.outage_end + r.recovery_time,
                color=line[0].get_color(),
                linestyle=":",
                alpha=0.8,
            )
    for axes in (load_axes, ok_axes):
        axes.axvspan(setup.outage_start, setup.outage_end, color="red", alpha=0.08)
        axes.grid(alpha=0.3)
    load_axes.set(
        title="Calls reaching the dependency (shaded: it is down)", ylabel="calls per second"
    )
    ok_axes.set(
        title="Requests that succeeded (dotted: the policy counts as recovered)",
        xlabel="seconds",
        ylabel="succeeded (%)",
        ylim=(-2, 102),
    )
    load_axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    figure.suptitle(
        f"Outage: {setup.clients} clients offer {setup.rate:g} requests/s; the dependency "
        f"is down from {setup.outage_start:g} s to {setup.outage_end:g} s (seed {setup.seed})"
    )
    figure.savefig(path, dpi=110)
