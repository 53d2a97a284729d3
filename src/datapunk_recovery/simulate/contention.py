"""The contention model: N clients, one shared record, optimistic concurrency.

The model of the AWS Architecture Blog's "Exponential Backoff And Jitter"
(2015).  Every client updates the record once: it reads the version, writes
it back, and the write fails if another client wrote first; on failure it
waits the next delay of its policy and starts again from the read.  Each
one-way message takes ``|Normal(10 ms, 2 ms)|``.  A run reports the writes
made ("calls": the work the record's server does) and the time when the last
client succeeded; both are averaged over ``runs`` runs.

Delays come from the policy's own
[`RetryConfig.delays()`][datapunk_recovery._core.backoff.RetryConfig.delays] iterator (see
[`SimPolicy.delays()`][datapunk_recovery.simulate.policies.SimPolicy.delays]), one per client,
drawing from the run's seeded
generator.  Every client retries until
it succeeds: the policy's attempt limit and deadline are lifted, since the
experiment is about the shape of the backoff, not about giving up.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from .._core.validate import check_count, check_seconds
from .kernel import Simulation, network_delay
from .policies import SimPolicy

__all__ = ["ContentionPoint", "ContentionSetup", "run_contention", "simulate_contention"]


@dataclass(frozen=True, slots=True)
class ContentionSetup:
    """The experiment: client counts, runs per point, seed and network (seconds)."""

    clients: tuple[int, ...] = (10, 25, 50, 100)
    runs: int = 20
    seed: int = 0
    latency: float = 0.010
    latency_sd: float = field(default=0.002, metadata={"unit": "seconds"})

    def __post_init__(self) -> None:
        owner = "ContentionSetup"
        if not self.clients:
            raise ValueError(f"{owner}.clients: need at least one client count, got ()")
        for n in self.clients:
            check_count(owner, "clients", n)
        check_count(owner, "runs", self.runs)
        check_count(owner, "seed", self.seed, minimum=0)
        object.__setattr__(self, "latency", check_seconds(owner, "latency", self.latency))
        object.__setattr__(self, "latency_sd", check_seconds(owner, "latency_sd", self.latency_sd))


@dataclass(frozen=True, slots=True)
class ContentionPoint:
    """One policy at one client count, averaged over ``runs`` runs.

    ``calls`` is the mean number of writes per run, ``time`` the mean seconds
    until the last client succeeded; ``*_sd`` are their standard deviations
    across runs (0 for a single run).
    """

    policy: str
    clients: int
    runs: int
    calls: float
    calls_sd: float
    time: float
    time_sd: float


class _Record:
    """The shared record: its version, the writes it received, the last success."""

    __slots__ = ("last_success", "version", "writes")

    def __init__(self) -> None:
        self.version = 0
        self.writes = 0
        self.last_success = 0.0


class _Client:
    """One client's read-write loop, as a chain of events."""

    __slots__ = ("delay", "delays", "record", "seen", "sim")

    def __init__(
        self,
        sim: Simulation,
        record: _Record,
        delays: Iterator[float],
        delay: Callable[[], float],
    ) -> None:
        self.sim = sim
        self.record = record
        self.delays = delays
        self.delay = delay
        self.seen = -1

    def start(self) -> None:
        self.sim.after(self.delay(), self.read_arrives)

    def read_arrives(self) -> None:
        self.seen = self.record.version
        self.sim.after(self.delay(), self.version_arrives)

    def version_arrives(self) -> None:
        self.sim.after(self.delay(), self.write_arrives)

    def write_arrives(self) -> None:
        record = self.record
        record.writes += 1
        if self.seen == record.version:
            record.version += 1
            self.sim.after(self.delay(), self.succeeded)
        else:
            self.sim.after(self.delay(), self.failed)

    def succeeded(self) -> None:
        self.record.last_success = self.sim.now

    def failed(self) -> None:
        self.sim.after(next(self.delays), self.start)


def simulate_contention(
    policy: SimPolicy,
    clients: int,
    seed: int | str,
    *,
    latency: float = 0.010,
    latency_sd: float = 0.002,
) -> tuple[int, float]:
    """One run: ``(writes, seconds until the last client succeeded)``."""
    sim = Simulation(seed)
    rng = sim.rng
    record = _Record()

    def delay() -> float:
        return network_delay(rng, latency, latency_sd)

    for _ in range(clients):
        _Client(sim, record, policy.delays(rng, endless=True), delay).start()
    sim.run()
    return record.writes, record.last_success


def run_contention(
    policies: Mapping[str, SimPolicy],
    setup: ContentionSetup,
    progress: Callable[[], None] | None = None,
) -> list[ContentionPoint]:
    """Every policy at every client count of ``setup``; ``progress()`` is called after each run.

    Run ``r`` at ``n`` clients uses the same seed for every policy, so the
    policies are compared on the same network draws as far as they go.
    """
    points = []
    for n in setup.clients:
        for name, policy in policies.items():
            calls: list[float] = []
            times: list[float] = []
            for run in range(setup.runs):
                writes, last = simulate_contention(
                    policy,
                    n,
                    f"contention:{setup.seed}:{n}:{run}",
                    latency=setup.latency,
                    latency_sd=setup.latency_sd,
                )
                calls.append(writes)
                times.append(last)
                if progress is not None:
                    progress()
            points.append(
                ContentionPoint(
                    policy=name,
                    clients=n,
                    runs=setup.runs,
                    calls=statistics.fmean(calls),
                    calls_sd=statistics.pstdev(calls),
                    time=statistics.fmean(times),
                    time_sd=statistics.pstdev(times),
                )
            )
    return points
