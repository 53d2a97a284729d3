"""Drill a small service mesh through scripted faults, without and then with recovery.

One process, no server to install: an in-memory cache over a SQLite
database, two HTTP endpoints on loopback (primary and secondary) and a
worker pool (``--redis-url`` and ``--postgres-dsn`` drill against real
servers instead).  A seeded chaos timeline takes the cache down, makes the
primary fail, keeps the database busy and dropping connections, and runs the
pool dry.  The same traffic runs twice; the table compares success rate,
latency, the calls that reached each dependency, breaker transitions and the
answers served from elsewhere.  ``--plot FILE.png`` draws it (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from datapunk_recovery._core.validate import shown

from ..._core.durations import DurationError, format_duration, parse_duration
from ..._core.extras import install_hint
from ..._core.redact import redact_url
from ...demo import DrillSetup, RunResult, RunStatus, fault_windows, run_drill
from ...demo.drill import FAULTS, fault_script
from ...simulate.report import Table, render
from ._options import positive_number

__all__ = ["add_arguments", "comparison_table", "plot", "run"]


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration > 0, got {shown(text)}")
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options: length, traffic, seed, plot."""
    parser.add_argument(
        "--duration",
        type=_duration,
        default=8.0,
        metavar="DURATION",
        help="length of each of the two runs, e.g. 8s or 1m (default: 8s)",
    )
    parser.add_argument(
        "--rate", type=positive_number, default=50.0, help="requests per second (default: 50)"
    )
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the traffic and the faults (default: 7)"
    )
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw the runs (needs matplotlib)"
    )
    parser.add_argument(
        "--plain", action="store_true", help="plain text output even when rich is installed"
    )
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help="use this Redis as the cache instead of the embedded one (needs redis)",
    )
    parser.add_argument(
        "--postgres-dsn",
        metavar="DSN",
        help="use this PostgreSQL as the database instead of SQLite (needs asyncpg)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the drill twice and print the comparison; 0 when recovery did better."""
    out = sys.stdout
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        out.write(f"--plot needs matplotlib: {install_hint('plot')}\n")
        return 2
    for option, module, extra in (
        (args.redis_url, "redis", "redis"),
        (args.postgres_dsn, "asyncpg", "asyncpg"),
    ):
        if option is not None and importlib.util.find_spec(module) is None:
            out.write(f"this option needs {module}: {install_hint(extra)}\n")
            return 2
    setup = DrillSetup(duration=args.duration, rate=args.rate, seed=args.seed)
    fancy = not args.plain and importlib.util.find_spec("rich") is not None
    servers = _Servers(args.redis_url, args.postgres_dsn)
    _intro(setup, servers, out)
    results = [_run_live(setup, servers, recovery, fancy, out) for recovery in (False, True)]
    out.write("\n")
    render(comparison_table(results), out, fancy=fancy)
    _transitions(results[1], out)
    if args.plot is not None:
        plot(results, setup, args.plot)
        out.write(f"plot written to {args.plot}\n")
    return 0 if results[1].success_rate >= results[0].success_rate else 1


class _Servers:
    """The real servers to drill against, if any (``None``: the embedded ones)."""

    __slots__ = ("postgres_dsn", "redis_url")

    def __init__(self, redis_url: str | None, postgres_dsn: str | None) -> None:
        self.redis_url = redis_url
        self.postgres_dsn = postgres_dsn

    def describe(self) -> str:
        cache = (
            "in-memory cache" if self.redis_url is None else f"Redis {redact_url(self.redis_url)}"
        )
        database = (
            "SQLite" if self.postgres_dsn is None else f"PostgreSQL {redact_url(self.postgres_dsn)}"
        )
        return f"{cache} over {database}"


def _intro(setup: DrillSetup, servers: _Servers, out: IO[str]) -> None:
    out.write(
        f"datapunk-recovery demo: {setup.rate:g} requests/s for "
        f"{format_duration(setup.duration)}, twice (seed {setup.seed})\n"
        f"mesh: {servers.describe()}, HTTP primary + secondary on loopback, "
        "a pool of 3 workers\nfault script:\n"
    )
    for window, what in fault_script(setup.duration):
        rate = "" if window.rate >= 1.0 else f" ({window.rate:.0%} of calls)"
        out.write(f"  {window.start:6.2f}s - {window.end or setup.duration:6.2f}s  {what}{rate}\n")


def _run_live(
    setup: DrillSetup, servers: _Servers, recovery: bool, fancy: bool, out: IO[str]
) -> RunResult:
    label = "with recovery" if recovery else "without recovery"

    def drill(on_status: Callable[[RunStatus], None]) -> RunResult:
        return asyncio.run(
            run_drill(
                setup,
                recovery=recovery,
                on_status=on_status,
                redis_url=servers.redis_url,
                postgres_dsn=servers.postgres_dsn,
            )
        )

    if fancy:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(file=out)
        with Progress(
            TextColumn("[bold]{task.description:<17}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task(label, total=setup.duration, status="")

            def show(status: RunStatus) -> None:
                progress.update(task, completed=status.elapsed, status=_status_text(status))

            return drill(show)
    last = [-1]

    def line(status: RunStatus) -> None:
        second = int(status.elapsed)
        if second != last[0]:
            last[0] = second
            out.write(f"[{label:>16}] {status.elapsed:5.1f}s  {_status_text(status)}\n")
            out.flush()

    return drill(line)


def _status_text(status: RunStatus) -> str:
    rate = status.succeeded / status.done if status.done else 1.0
    faults = ", ".join(status.faults) or "no fault"
    return f"{status.done:5d} answered, {rate:6.1%} ok  | {faults}"


def comparison_table(results: Sequence[RunResult]) -> Table:
    """The runs side by side: one row per figure, one column per run."""

    def row(name: str, cell: Callable[[RunResult], str]) -> tuple[str, ...]:
        return (name, *(cell(r) for r in results))

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.1f} ms"

    def calls(dependency: str) -> Callable[[RunResult], str]:
        def cell(r: RunResult) -> str:
            n = r.calls.get(dependency, 0)
            return f"{n} ({n / r.requests:.2f}x)" if r.requests else str(n)

        return cell

    def kind_cell(kind: str) -> Callable[[RunResult], str]:
        def cell(r: RunResult) -> str:
            good, total = r.by_kind.get(kind, (0, 0))
            return f"{good}/{total}"

        return cell

    def fallback_cell(kind: str) -> Callable[[RunResult], str]:
        return lambda r: str(r.fallbacks.get(kind, 0))

    kinds = sorted({k for r in results for k in r.by_kind})
    rows = [
        row("requests", lambda r: str(r.requests)),
        row("success rate", lambda r: f"{r.success_rate:.1%}"),
        *(row(f"  {kind}", kind_cell(kind)) for kind in kinds),
        row("latency p50", lambda r: ms(r.percentile(0.50))),
        row("latency p99", lambda r: ms(r.percentile(0.99))),
        *(row(f"calls to {d} (per request)", calls(d)) for d in _DEPENDENCIES),
        row("breaker transitions", lambda r: str(len(r.transitions))),
        *(row(f"fallbacks: {label}", fallback_cell(kind)) for kind, label in _FALLBACKS),
        row("single-flight: reads sharing a load", lambda r: str(r.shared_loads)),
        row("faults injected", lambda r: str(r.faults)),
    ]
    return Table(
        title="datapunk-recovery demo: the same traffic and faults, twice",
        headers=("", *(r.label for r in results)),
        rows=tuple(rows),
    )


_DEPENDENCIES = ("cache", "primary", "secondary", "database", "pool")
_FALLBACKS = (
    ("failover", "secondary took over"),
    ("source", "cache down, read source"),
    ("stale", "stale value served"),
)


def _transitions(result: RunResult, out: IO[str]) -> None:
    if not result.transitions:
        return
    out.write(f"breaker transitions {result.label}:\n")
    for at, name, old, new in result.transitions:
        out.write(f"  {at:6.2f}s  {name}: {old} -> {new}\n")


def plot(results: Sequence[RunResult], setup: DrillSetup, path: Path) -> None:
    """Draw [`figure()`][datapunk_recovery.cli.commands.demo.figure] of the runs to ``path``
    (PNG)."""
    figure(results, setup).savefig(path)


def figure(results: Sequence[RunResult], setup: DrillSetup) -> Any:
    """The runs at a glance: success per second, the faults' timeline, calls per dependency.

    Percent on every axis that shows a share; each fault kind on a row of its
    own (overlapping windows never mix into a colour of their own); legends
    beside the panels, not over the data; the success rates in the legend are
    the same run's as the table printed beside the figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    top, faults, bottom = fig.subplots(3, 1, gridspec_kw={"height_ratios": [3, 1.1, 2]})
    seconds = max(1, int(setup.duration + 0.999))
    for result in results:
        buckets: list[list[int]] = [[0, 0] for _ in range(seconds)]
        for at, ok in result.outcomes:
            bucket = buckets[min(int(at), seconds - 1)]
            bucket[0] += ok
            bucket[1] += 1
        xs = [i + 0.5 for i in range(seconds)]
        ys = [100.0 * g / n if n else 100.0 for g, n in buckets]
        top.plot(xs, ys, marker="o", label=f"{result.label}: {result.success_rate:.1%} in all")
    top.set(
        title="Requests that succeeded, per second",
        ylabel="succeeded (%)",
        xlim=(0, setup.duration),
        ylim=(0, 105),
    )
    top.grid(alpha=0.3)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    colours = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:gray")
    kinds: dict[str, int] = {}  # fault kind -> its row, in order of first appearance
    for window in fault_windows(setup.duration):
        target = window.target or "all"
        row = kinds.setdefault(target, len(kinds))
        end = window.end if window.end is not None else setup.duration
        colour = colours[row % len(colours)]
        faults.broken_barh([(window.start, end - window.start)], (row - 0.4, 0.8), color=colour)
    faults.set(
        title="Faults injected (the same script in both runs)",
        xlabel="seconds into the run",
        xlim=(0, setup.duration),
        ylim=(len(kinds) - 0.5, -0.5),
    )
    faults.set_yticks(range(len(kinds)), [FAULTS.get(k, k) for k in kinds], fontsize="small")
    faults.grid(axis="x", alpha=0.3)
    width = 0.4
    for j, result in enumerate(results):
        xs2: list[Any] = [i + (j - 0.5) * width for i in range(len(_DEPENDENCIES))]
        bottom.bar(xs2, [result.calls.get(d, 0) for d in _DEPENDENCIES], width, label=result.label)
    bottom.set_xticks(range(len(_DEPENDENCIES)), list(_DEPENDENCIES))
    bottom.set(title="Calls each dependency received", ylabel="calls")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.suptitle(
        f"The demo: {setup.duration:g} s at {setup.rate:g} requests/s (seed {setup.seed}), "
        "without and with recovery"
    )
    return fig
