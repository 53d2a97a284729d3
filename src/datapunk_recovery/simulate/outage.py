"""The outage model: steady traffic to a dependency that goes down for a while.

``clients`` client processes together offer ``rate`` requests per second
(Poisson arrivals) to one dependency.  From ``outage_start`` for
``outage_duration`` seconds every call to it fails (a fast failure, one round
trip); before and after, every call succeeds.  Each process has its own
circuit breaker and retry budget, as separate processes would (unless the
policy's ``shared_budget`` gives them one budget, as a budget shared through a
store would be, synced at once): the library's
real [`CircuitBreaker`][datapunk_recovery.breaker.CircuitBreaker],
[`TokenBudget`][datapunk_recovery.budget.TokenBudget] or
[`RatioBudget`][datapunk_recovery.budget.RatioBudget], reading the simulation's fake
clock.  Each request is retried as the retry engine would: the attempt limit
first, then the deadline, then the budget is asked; a breaker's refusal
([`CircuitOpenError`][datapunk_recovery._core.errors.CircuitOpenError]) is never retried.

What a run reports:

- **load amplification**: calls the dependency received during the outage
  divided by the requests offered during it (1.0: retries added nothing);
- **success rate** of the requests offered during the outage, and after it;
- **recovery time**: from the dependency's return until the start of the
  first one-second window in which at least 99% of the requests offered
  succeeded (windows slide in steps of 10 ms); ``None`` if none did.

A request counts where it was offered, whenever its last attempt ends.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from .._core.errors import CircuitOpenError
from .._core.validate import check_count, check_number, check_seconds, shown
from ..breaker import CircuitBreaker, Permit
from ..budget import RatioBudget, RetryGate, TokenBudget
from .kernel import Simulation, network_delay
from .peers import RetryQuota
from .policies import SimPolicy

__all__ = ["OutageResult", "OutageSetup", "Second", "run_outage", "simulate_outage"]

#: The share of a window's requests that must succeed for the service to count as recovered.
RECOVERED = 0.99
_WINDOW = 1.0
_STEP = 0.01


@dataclass(frozen=True, slots=True)
class OutageSetup:
    """The scenario; times and durations in seconds, ``rate`` in requests per second."""

    rate: float = 100.0
    clients: int = 10
    duration: float = 60.0
    outage_start: float = field(default=5.0, metadata={"unit": "seconds"})
    outage_duration: float = 20.0
    latency: float = 0.010
    latency_sd: float = field(default=0.002, metadata={"unit": "seconds"})
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "OutageSetup"
        s = object.__setattr__
        s(self, "rate", check_number(owner, "rate", self.rate))
        if self.rate <= 0:
            raise ValueError(
                f"{owner}.rate: must be > 0 requests per second, got {shown(self.rate)}"
            )
        check_count(owner, "clients", self.clients)
        for name in ("duration", "outage_start", "outage_duration", "latency", "latency_sd"):
            s(self, name, check_seconds(owner, name, getattr(self, name)))
        if self.outage_start + self.outage_duration >= self.duration:
            raise ValueError(
                f"{owner}.duration: must leave time after the outage "
                f"(which ends at {self.outage_start + self.outage_duration!r}), "
                f"got {shown(self.duration)}"
            )
        check_count(owner, "seed", self.seed, minimum=0)

    @property
    def outage_end(self) -> float:
        """When the dependency comes back, in seconds from the start."""
        return self.outage_start + self.outage_duration


@dataclass(frozen=True, slots=True)
class Second:
    """One second of the run: requests offered, calls received, requests that succeeded."""

    start: float
    offered: int
    received: int
    succeeded: int


@dataclass(frozen=True, slots=True)
class OutageResult:
    """One policy through the outage; rates are fractions, times seconds.

    ``open_duration`` is the policy's breaker open period (``None`` without a
    breaker), the yardstick of ``recovery_time``.
    """

    policy: str
    offered_during: int
    received_during: int
    amplification: float
    success_during: float
    success_after: float
    recovery_time: float | None
    open_duration: float | None
    timeline: tuple[Second, ...]


class _Down(ConnectionError):
    """What a call to the dependency gets while it is down."""


class _World:
    """The dependency and what was seen: request offers and outcomes, calls received."""

    __slots__ = ("down_from", "down_until", "offered", "outcome", "received")

    def __init__(self, setup: OutageSetup) -> None:
        self.down_from = setup.outage_start
        self.down_until = setup.outage_end
        self.offered: list[float] = []  # offer time of request i, in time order
        self.outcome: list[bool] = []  # whether request i succeeded in the end
        self.received: list[float] = []  # arrival time of every call, in time order


class _Process:
    """One client process: its arrivals, its breaker and its budget."""

    __slots__ = ("arrivals", "breaker", "budget", "delay", "gap", "policy", "sim", "until", "world")

    def __init__(
        self,
        sim: Simulation,
        world: _World,
        policy: SimPolicy,
        name: str,
        rate: float,
        until: float,
        delay: Callable[[], float],
        arrivals: random.Random,
        shared: RetryGate | None = None,
    ) -> None:
        self.sim = sim
        self.arrivals = arrivals
        self.world = world
        self.policy = policy
        self.until = until
        self.delay = delay
        self.gap = 1.0 / rate
        self.breaker = (
            None
            if policy.breaker is None
            else CircuitBreaker(name, config=policy.breaker, rng=sim.rng)
        )
        self.budget: RetryGate | None = shared if shared is not None else _budget(policy, name)

    def arrive(self) -> None:
        now = self.sim.now
        world = self.world
        index = len(world.offered)
        world.offered.append(now)
        world.outcome.append(False)
        _Request(self, index, now).attempt()
        nxt = now + self.arrivals.expovariate(1.0) * self.gap
        if nxt < self.until:
            self.sim.at(nxt, self.arrive)


def _budget(policy: SimPolicy, name: str) -> RetryGate | None:
    """A fresh budget of ``policy``'s kind, or ``None`` without one."""
    if policy.token_budget is not None:
        return TokenBudget(name, config=policy.token_budget)
    if policy.ratio_budget is not None:
        return RatioBudget(name, config=policy.ratio_budget)
    if policy.retry_quota is not None:
        return RetryQuota(policy.retry_quota)
    return None


class _Request:
    """One request's attempts, as a chain of events."""

    __slots__ = ("delays", "index", "number", "permit", "process", "start")

    def __init__(self, process: _Process, index: int, start: float) -> None:
        self.process = process
        self.index = index
        self.start = start
        self.number = 0
        self.permit: Permit | None = None
        self.delays: Iterator[float] | None = None

    def attempt(self) -> None:
        process = self.process
        self.number += 1
        if process.breaker is not None:
            try:
                self.permit = process.breaker.allow()
            except CircuitOpenError:
                return  # refused at once: the request failed, and no layer retries it
        process.sim.after(process.delay(), self.reaches_dependency)

    def reaches_dependency(self) -> None:
        process = self.process
        now = process.sim.now
        world = process.world
        world.received.append(now)
        ok = not world.down_from <= now < world.down_until
        process.sim.after(process.delay(), self.succeeded if ok else self.failed)

    def succeeded(self) -> None:
        process = self.process
        if self.permit is not None:
            self.permit.success()
        if process.budget is not None:
            process.budget.on_attempt(True)
        process.world.outcome[self.index] = True

    def failed(self) -> None:
        process = self.process
        if self.permit is not None:
            self.permit.failure(_Down("dependency down"))
        budget = process.budget
        if budget is not None:
            budget.on_attempt(False)
        retry = process.policy.retry
        if retry.max_attempts is not None and self.number >= retry.max_attempts:
            return
        if self.delays is None:
            self.delays = process.policy.delays(process.sim.rng)
        wait = next(self.delays)
        now = process.sim.now
        if retry.deadline is not None and now + wait >= self.start + retry.deadline:
            return
        if budget is not None and not budget.allow_retry():
            return
        process.sim.after(wait, self.attempt)


#: How many slices of simulated time a watched run reports (``tick``).
_TICKS: Final = 100


def simulate_outage(
    name: str,
    policy: SimPolicy,
    setup: OutageSetup,
    tick: Callable[[float], None] | None = None,
) -> OutageResult:
    """One run of ``policy`` through the outage of ``setup``.

    ``tick(fraction)`` is called as simulated time passes (fractions of
    ``setup.duration``, up to 1.0); watching changes nothing in the result.
    """
    sim = Simulation(f"outage:{setup.seed}")
    world = _World(setup)
    rng = sim.rng

    def delay() -> float:
        return network_delay(rng, setup.latency, setup.latency_sd)

    per_client = setup.rate / setup.clients
    shared = _budget(policy, name) if policy.shared_budget else None
    for i in range(setup.clients):
        # Arrivals draw from a generator of their own, so that every policy is
        # offered exactly the same requests at the same times.
        arrivals = random.Random(f"outage:{setup.seed}:arrivals:{i}")
        process = _Process(
            sim, world, policy, f"{name}-{i}", per_client, setup.duration, delay, arrivals, shared
        )
        sim.at(arrivals.expovariate(per_client), process.arrive)
    if tick is not None:
        # The same events in the same order, run a slice of time at a time.
        for k in range(1, _TICKS + 1):
            sim.run(until=setup.duration * k / _TICKS)
            tick(k / _TICKS)
    sim.run()
    return _measure(name, policy, setup, world)


def _measure(name: str, policy: SimPolicy, setup: OutageSetup, world: _World) -> OutageResult:
    offered, outcome, received = world.offered, world.outcome, world.received
    wins = [0, *itertools.accumulate(outcome)]  # wins[i]: successes among requests < i

    def span(times: list[float], start: float, end: float) -> tuple[int, int]:
        return bisect.bisect_left(times, start), bisect.bisect_left(times, end)

    down, up = setup.outage_start, setup.outage_end
    first, last = span(offered, down, up)
    offered_during = last - first
    r_first, r_last = span(received, down, up)
    received_during = r_last - r_first
    after_first, after_last = span(offered, up, setup.duration)

    def rate(a: int, b: int) -> float:
        return (wins[b] - wins[a]) / (b - a) if b > a else 1.0

    recovery: float | None = None
    steps = int((setup.duration - _WINDOW - up) / _STEP)
    for k in range(steps + 1):
        a, b = span(offered, up + k * _STEP, up + k * _STEP + _WINDOW)
        if b > a and rate(a, b) >= RECOVERED:
            recovery = k * _STEP
            break
    timeline = []
    for second in range(int(setup.duration)):
        a, b = span(offered, second, second + 1)
        ra, rb = span(received, second, second + 1)
        timeline.append(Second(float(second), b - a, rb - ra, wins[b] - wins[a]))
    return OutageResult(
        policy=name,
        offered_during=offered_during,
        received_during=received_during,
        amplification=received_during / offered_during if offered_during else 0.0,
        success_during=rate(first, last),
        success_after=rate(after_first, after_last),
        recovery_time=recovery,
        open_duration=None if policy.breaker is None else policy.breaker.open_duration,
        timeline=tuple(timeline),
    )


def run_outage(
    policies: Mapping[str, SimPolicy],
    setup: OutageSetup,
    progress: Callable[[], None] | None = None,
    *,
    tick: Callable[[float], None] | None = None,
) -> list[OutageResult]:
    """Every policy through the same scenario (same seed); ``progress()`` after each.

    ``tick(fraction)`` reports the fraction of the whole run done (all
    policies), many times per policy, for a progress bar.
    """
    results = []
    count = len(policies)
    for i, (name, policy) in enumerate(policies.items()):
        watch = None if tick is None else (lambda f, i=i: tick((i + f) / count))
        results.append(simulate_outage(name, policy, setup, watch))
        if progress is not None:
            progress()
    return results
