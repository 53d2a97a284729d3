"""Simulate retry policies under contention or through an outage (the retry-storm lab).

``simulate contention`` has N clients update one record with optimistic
concurrency and reports, per policy, the writes made and the time until the
last client succeeded.  ``simulate outage`` offers steady traffic to a
dependency that goes down for a while and reports load amplification,
success rates and recovery time.  Both run the library's own backoff, budget
and breaker on a simulated clock: seeded, deterministic, and far faster than
real time.  Policies are built-ins (``--policy full,decorrelated``) or tables
of a TOML file (``--policies FILE``).
"""

from __future__ import annotations

import argparse
import sys
import time
from types import TracebackType
from typing import Any

from datapunk_recovery._core.validate import shown

from ..._core.durations import DurationError, parse_duration
from ..._core.extras import install_hint
from ...config.schema import ConfigError
from ...simulate import report
from ...simulate.catalog import resolve_policies
from ...simulate.contention import ContentionSetup, run_contention
from ...simulate.outage import OutageSetup, run_outage
from ...simulate.policies import SimPolicy
from ._options import positive_number, usage_error

__all__ = ["add_arguments", "run"]

_CONTENTION_POLICIES = "none,full,equal,decorrelated,decorrelated_v2,proportional"
_OUTAGE_POLICIES = "plain,default"
#: A run that lasts longer than this (wall-clock seconds) gets a progress bar.
_PROGRESS_AFTER = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``contention`` and ``outage`` subcommands and their options."""
    scenarios = parser.add_subparsers(dest="scenario", metavar="SCENARIO", required=True)
    contention = scenarios.add_parser(
        "contention",
        help="N clients updating one record: writes and completion time per policy",
        description=(
            "N clients each update one shared record once with optimistic concurrency; "
            "one-way messages take |Normal(10 ms, 2 ms)|."
        ),
    )
    _common(contention, _CONTENTION_POLICIES)
    contention.add_argument(
        "--clients",
        type=_counts,
        default=(10, 25, 50, 100),
        metavar="N,N,...",
        help="client counts to simulate (default: 10,25,50,100)",
    )
    contention.add_argument(
        "--runs", type=_count, default=20, help="runs averaged per point (default: 20)"
    )
    contention.add_argument(
        "--base",
        type=_duration,
        default=0.005,
        metavar="DURATION",
        help="base delay of the built-in policies (default: 5ms, the benchmark's)",
    )
    contention.add_argument(
        "--cap",
        type=_duration,
        default=2.0,
        metavar="DURATION",
        help="maximum delay of the built-in policies (default: 2s, the benchmark's)",
    )
    contention.add_argument(
        "--indexing",
        choices=("published", "library"),
        default="published",
        help="how the built-in jitter kinds number retries: 'published' (the AWS post's: "
        "the k-th retry waits under min(cap, base * 2**k), so the first full-jitter window "
        "is 2 x base; the default) or 'library' (RetryConfig's: the first window is base)",
    )
    outage = scenarios.add_parser(
        "outage",
        help="steady traffic to a dependency that goes down: amplification and recovery",
        description=(
            "Clients offer a steady request rate to a dependency that is down for a while; "
            "each client has its own breaker and budget."
        ),
    )
    _common(outage, _OUTAGE_POLICIES)
    outage.add_argument(
        "--rate",
        type=positive_number,
        default=100.0,
        help="requests per second offered (default: 100)",
    )
    outage.add_argument(
        "--clients",
        type=_count,
        default=10,
        help="client processes sharing the rate, each with its own breaker and budget "
        "(default: 10)",
    )
    outage.add_argument(
        "--duration",
        type=_duration,
        default=60.0,
        metavar="DURATION",
        help="simulated time in all (default: 60s)",
    )
    outage.add_argument(
        "--outage-start",
        type=_duration,
        default=5.0,
        metavar="DURATION",
        help="when the dependency goes down (default: 5s)",
    )
    outage.add_argument(
        "--outage",
        type=_duration,
        default=20.0,
        metavar="DURATION",
        help="how long it stays down (default: 20s)",
    )


def _common(parser: argparse.ArgumentParser, default_policies: str) -> None:
    parser.add_argument(
        "-p",
        "--policy",
        action="append",
        default=[],
        metavar="NAME[,NAME...]",
        help=f"policies to compare, built-in or from --policies (default: {default_policies})",
    )
    parser.add_argument("--policies", metavar="FILE", help="a TOML file of [policies.NAME] tables")
    parser.add_argument("--seed", type=_seed, default=0, help="the random seed (default: 0)")
    parser.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="a table for people (default) or JSON for scripts",
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="also draw the curves into FILE (needs matplotlib)"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr for runs longer than a second "
        "(default: when stderr is a terminal)",
    )
    parser.set_defaults(default_policies=default_policies, parser=parser)


def run(args: argparse.Namespace) -> int:
    """Run the scenario asked for; 0 on success, 2 on a bad option or policy file."""
    if args.plot and not report.has_matplotlib():
        print(
            f"datapunk-recovery simulate: --plot needs matplotlib: {install_hint('plot')}",
            file=sys.stderr,
        )
        return 2
    names = [name.strip() for value in args.policy for name in value.split(",") if name.strip()]
    if not names and args.policies is None:
        names = args.default_policies.split(",")
    try:
        setup = _setup(args)
    except ValueError as exc:
        usage_error(args.parser, exc, _FLAGS)
    try:
        if isinstance(setup, ContentionSetup):
            policies = resolve_policies(
                names,
                args.policies,
                base_delay=args.base,
                max_delay=args.cap,
                indexing=args.indexing,
            )
            _contention(args, setup, policies)
        else:
            policies = resolve_policies(names, args.policies)
            _outage(args, setup, policies)
    except (ConfigError, ValueError) as exc:
        print(f"datapunk-recovery simulate: {exc}", file=sys.stderr)
        return 2
    return 0


#: The option of each scenario setting, to name it in a usage error.
_FLAGS = {
    "clients": "--clients",
    "runs": "--runs",
    "seed": "--seed",
    "rate": "--rate",
    "duration": "--duration",
    "outage_start": "--outage-start",
    "outage_duration": "--outage",
}


def _setup(args: argparse.Namespace) -> ContentionSetup | OutageSetup:
    """The scenario's setup from the options; ``ValueError`` naming a setting it rejects."""
    if args.scenario == "contention":
        return ContentionSetup(clients=args.clients, runs=args.runs, seed=args.seed)
    return OutageSetup(
        rate=args.rate,
        clients=args.clients,
        duration=args.duration,
        outage_start=args.outage_start,
        outage_duration=args.outage,
        seed=args.seed,
    )


def _contention(
    args: argparse.Namespace, setup: ContentionSetup, policies: dict[str, SimPolicy]
) -> None:
    total = len(policies) * len(setup.clients) * setup.runs
    with _Progress("contention", total, args.progress) as progress:
        points = run_contention(policies, setup, progress.advance)
    if args.format == "json":
        print(report.contention_json(points, setup, policies))
    else:
        report.render(report.contention_table(points, setup), sys.stdout)
    if args.plot:
        report.plot_contention(points, args.plot)


def _outage(args: argparse.Namespace, setup: OutageSetup, policies: dict[str, SimPolicy]) -> None:
    with _Progress("outage", 1000, args.progress) as progress:
        results = run_outage(policies, setup, tick=progress.fraction)
    if args.format == "json":
        print(report.outage_json(results, setup, policies))
    else:
        report.render(report.outage_table(results, setup), sys.stdout)
    if args.plot:
        report.plot_outage(results, setup, args.plot, policies)


class _Progress:
    """Progress on stderr, shown only once a run has lasted about a second.

    A rich bar when rich is installed, a plain ``simulating outage: 42%``
    line otherwise.  By default only when stderr is a terminal, so that
    scripts and pipes see only the results; ``--progress`` / ``--no-progress``
    decide instead.  Never on stdout: ``--format json`` output stays JSON.
    """

    def __init__(self, what: str, total: int, show: bool | None) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.forced = show is True
        self.enabled = sys.stderr.isatty() if show is None else show
        self.fancy = report.has_rich()
        self.bar: Any = None
        self.task: Any = None
        self.shown = -1  # the percentage the plain line shows

    def __enter__(self) -> _Progress:
        return self

    def advance(self) -> None:
        """One more unit of ``total`` done."""
        self.update(self.done + 1)

    def fraction(self, done: float) -> None:
        """``done`` (0..1) of the whole run done."""
        self.update(round(done * self.total))

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        if self.bar is None and self.shown < 0:
            if time.monotonic() - self.started < _PROGRESS_AFTER:
                return
            if self.fancy:
                from rich.console import Console
                from rich.progress import Progress

                console = Console(stderr=True, force_terminal=True if self.forced else None)
                self.bar = Progress(console=console, transient=True)
                self.bar.start()
                self.task = self.bar.add_task(f"simulating {self.what}", total=self.total)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
            return
        percent = 100 * self.done // max(self.total, 1)
        if percent != self.shown:
            self.shown = percent
            sys.stderr.write(f"\rsimulating {self.what}: {percent:3d}%")
            sys.stderr.flush()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.shown >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {shown(text)}")
    return value


def _count(text: str) -> int:
    return _whole(text, 1)


def _seed(text: str) -> int:
    return _whole(text, 0)


def _counts(text: str) -> tuple[int, ...]:
    return tuple(_count(part.strip()) for part in text.split(","))
