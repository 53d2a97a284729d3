"""Hedged requests: when an attempt is slow, start another and take the first good answer.

Tail latency comes from a few slow replicas or packets; a second copy of a
slow request usually finds a fast path (Dean and Barroso, "The Tail at
Scale").  A [`Hedger`][datapunk_recovery.flow.hedging.Hedger] starts the first attempt and, if it
has not
answered after the hedge delay, starts another (up to ``max_hedges``
extra attempts), takes the first success and cancels the rest.

- **Delay**: fixed (``delay`` seconds) or a latency percentile the hedger
  tracks over its recent successful attempts (``percentile=0.95``: hedge the
  slowest 5%); until ``min_samples`` are known the fixed delay is used.
- **Only idempotent calls** are hedged: two copies of a payment are two
  payments.  Mark a function with [`idempotent()`][datapunk_recovery.flow.hedging.idempotent]
  (or give
  the pipeline
  ``idempotent=True``); an unmarked call runs once, unhedged.
- **Budget**: every extra attempt draws on the retry budget (it asks
  ``allow_retry()`` first, and reports how it ended with ``on_attempt``), so
  hedges and retries together stay within the service's budget.
- **Failures**: a retryable failure of one attempt starts the next hedge at
  once (gRPC's rule); a failure that is not retryable, or that an inner layer
  marked final, ends the call with that error at once.  When every attempt
  failed, the last error is raised.
- **Deadline**: no hedge starts once the overall deadline has passed, and the
  hedge delay never waits past it.

Async only (asyncio and trio): a sync call cannot be cancelled, so it cannot
be raced safely.  Losers are cancelled and awaited before the call returns;
cancelling the call cancels every attempt, and cancelled attempts count as
nothing.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, ParamSpec, TypeVar, cast

from .._core import clock
from .._core.context import CURRENT, RACE, RaceEntry, reported_outside
from .._core.errors import classify, final_reason
from .._core.events import Event, EventBus, emit, global_bus, listening
from .._core.policy import RetryGate
from .._core.validate import check_count, check_fraction, check_seconds, shown
from .._execution import runtime as _runtime

__all__ = [
    "HedgeConfig",
    "HedgeRefused",
    "HedgeStarted",
    "HedgeWon",
    "Hedger",
    "idempotent",
    "is_idempotent",
]

P = ParamSpec("P")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_IDEMPOTENT = "__datapunk_idempotent__"


def idempotent(fn: F) -> F:
    """Mark ``fn`` as safe to run more than once for one request (hedging may race it)."""
    setattr(fn, _IDEMPOTENT, True)
    return fn


def is_idempotent(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` was marked with
    [`idempotent()`][datapunk_recovery.flow.hedging.idempotent]."""
    return getattr(fn, _IDEMPOTENT, False) is True


@dataclass(frozen=True, slots=True)
class HedgeConfig:
    """When to hedge and how much.

    ``delay`` is the fixed hedge delay in seconds (also used until
    ``min_samples`` latencies are known when ``percentile`` is set);
    ``percentile`` (e.g. 0.95) makes the delay that percentile of the last
    ``window`` successful attempts' latencies, kept within
    [``min_delay``, ``max_delay``]; ``max_hedges`` bounds the extra attempts.
    """

    delay: float = 0.05
    percentile: float | None = None
    max_hedges: int = 1
    min_samples: int = 20
    window: int = 256
    min_delay: float = 0.0
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        owner = "HedgeConfig"
        s = object.__setattr__
        s(self, "delay", check_seconds(owner, "delay", self.delay))
        if self.percentile is not None:
            s(
                self,
                "percentile",
                check_fraction(owner, "percentile", self.percentile, allow_zero=False),
            )
        check_count(owner, "max_hedges", self.max_hedges)
        check_count(owner, "min_samples", self.min_samples)
        check_count(owner, "window", self.window)
        s(self, "min_delay", check_seconds(owner, "min_delay", self.min_delay))
        s(self, "max_delay", check_seconds(owner, "max_delay", self.max_delay))
        if self.max_delay < self.min_delay:
            raise ValueError(
                f"{owner}.max_delay: must be >= min_delay ({self.min_delay!r}), "
                f"got {shown(self.max_delay)}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeStarted(Event):
    """Extra attempt ``hedge`` (1 for the first hedge) started.

    ``reason`` is ``"delay"`` (the previous attempts were slower than
    ``delay`` seconds) or ``"failure"`` (an attempt failed retryably).
    """

    name: ClassVar[str] = "hedge.started"
    area: ClassVar[str] = "hedging"

    hedge: int
    reason: str
    delay: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeRefused(Event):
    """A hedge was due but not started: ``reason`` is ``"budget"`` or ``"deadline"``."""

    name: ClassVar[str] = "hedge.refused"
    area: ClassVar[str] = "hedging"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeWon(Event):
    """Attempt ``attempt`` (0 = the original, 1+ = hedges) answered first, after ``latency`` s."""

    name: ClassVar[str] = "hedge.won"
    area: ClassVar[str] = "hedging"

    attempt: int
    latency: float


class _Outcome:
    __slots__ = ("duration", "error", "n", "value")

    def __init__(self, n: int, value: Any, error: Exception | None, duration: float) -> None:
        self.n = n
        self.value = value
        self.error = error
        self.duration = duration


class Hedger:
    """Races hedged attempts of idempotent async calls (see the module doc).

    ``budget`` is the service's retry budget (any
    [`RetryGate`][datapunk_recovery.budget.RetryGate]); ``None``
    means hedges are limited by ``max_hedges`` only.  Faces:
    [`call_async()`][datapunk_recovery.flow.hedging.Hedger.call_async] and the object as a
    decorator of
    async functions.
    """

    __slots__ = (
        "_dirty",
        "_filled",
        "_lock",
        "_samples",
        "_tracked",
        "budget",
        "bus",
        "config",
        "name",
    )

    def __init__(
        self,
        name: str = "hedger",
        config: HedgeConfig | None = None,
        *,
        budget: RetryGate | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.config = config = config if config is not None else HedgeConfig()
        if not isinstance(config, HedgeConfig):
            raise TypeError(f"Hedger.config: expected a HedgeConfig, got {shown(config)}")
        if budget is not None and not isinstance(budget, RetryGate):
            raise TypeError(f"Hedger.budget: expected a RetryGate, got {shown(budget)}")
        self.name = name
        self.budget = budget
        #: Where this hedger's events go first (then the global bus).
        self.bus = bus if bus is not None else EventBus()
        self._samples = [0.0] * config.window
        self._filled = 0  # samples recorded so far (the ring is full past window)
        self._tracked = config.delay  # the current percentile delay
        self._dirty = 0  # samples since it was computed
        self._lock = threading.Lock()

    # -- the delay

    def record(self, latency: float) -> None:
        """Record the latency (seconds) of a successful attempt."""
        with self._lock:
            self._samples[self._filled % len(self._samples)] = latency
            self._filled += 1
            self._dirty += 1

    def inherit(self, other: Hedger) -> None:
        """Take the latency samples ``other`` measured (oldest first, as many as fit).

        A reload that builds a new hedger for a service keeps what the old one
        learned, so the percentile delay does not fall back to the fixed one.
        """
        with other._lock:
            ring = other._samples
            n = min(other._filled, len(ring))
            first = other._filled - n
            ordered = [ring[(first + i) % len(ring)] for i in range(n)]
        for latency in ordered[-len(self._samples) :]:
            self.record(latency)

    def delay(self) -> float:
        """The hedge delay now, in seconds."""
        config = self.config
        if config.percentile is None or self._filled < config.min_samples:
            return config.delay
        # Recompute at most every 16 samples: sorting the window is the cost.
        if self._dirty >= 16 or self._dirty == self._filled:
            with self._lock:
                n = min(self._filled, len(self._samples))
                ordered = sorted(self._samples[:n])
                self._dirty = 0
            value = ordered[max(0, math.ceil(config.percentile * n) - 1)]
            self._tracked = min(config.max_delay, max(config.min_delay, value))
        return self._tracked

    # -- decisions of the race loop (asyncio and trio alike)

    def _may_hedge(self, n: int, reason: str, delay: float) -> bool:
        """Whether extra attempt ``n`` may start now (budget, deadline); reports it."""
        observed = global_bus.active or self.bus.active
        ctx = CURRENT.get()
        if ctx is not None and ctx[0] is not None and clock.now() >= ctx[0]:
            if observed and listening(self.bus, HedgeRefused):
                emit(HedgeRefused(operation=self.name, at=clock.now(), reason="deadline"), self.bus)
            return False
        budget = self.budget
        if budget is not None and not budget.allow_retry():
            if observed and listening(self.bus, HedgeRefused):
                emit(HedgeRefused(operation=self.name, at=clock.now(), reason="budget"), self.bus)
            return False
        if observed and listening(self.bus, HedgeStarted):
            emit(
                HedgeStarted(
                    operation=self.name, at=clock.now(), hedge=n, reason=reason, delay=delay
                ),
                self.bus,
            )
        return True

    def _wait_for_next(self, started: int, delay: float) -> float | None:
        """How long to wait for an outcome before hedging; ``None``: no more hedges."""
        if started > self.config.max_hedges:
            return None
        ctx = CURRENT.get()
        if ctx is not None and ctx[0] is not None:
            left = ctx[0] - clock.now()
            if left <= delay:
                return None  # the hedge would start at or past the deadline
        return delay

    def _settled(self, outcome: _Outcome, start: float) -> bool:
        """Account a finished attempt; True when it ends the call (success or fatal error)."""
        if outcome.n > 0 and self.budget is not None:
            self.budget.on_attempt(outcome.error is None)
        if outcome.error is None:
            self.record(outcome.duration)
            if (
                outcome.n > 0
                and (global_bus.active or self.bus.active)
                and listening(self.bus, HedgeWon)
            ):
                now = clock.now()
                emit(
                    HedgeWon(operation=self.name, at=now, attempt=outcome.n, latency=now - start),
                    self.bus,
                )
            return True
        error = outcome.error
        return final_reason(error) is not None or not classify(error).retryable

    async def _attempt(
        self,
        n: int,
        entry: RaceEntry,
        fn: Callable[..., Awaitable[Any]],
        args: Any,
        kwargs: Any,
    ) -> _Outcome:
        # Runs in a task of its own: ``entry`` tells a breaker inside it
        # whether a cancellation is this attempt losing the race.
        RACE.set(entry)
        start = clock.now()
        try:
            value = await fn(*args, **kwargs)
        except Exception as exc:
            return _Outcome(n, None, exc, clock.now() - start)
        return _Outcome(n, value, None, clock.now() - start)

    # -- the race

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn``, hedged if it is marked `idempotent()`."""
        if not is_idempotent(fn):
            return await self._unhedged(fn, args, kwargs)
        return await self.race(fn, args, kwargs)

    async def _unhedged(self, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any) -> T:
        """A call that may not be hedged: still a request the budget must count."""
        budget = self.budget
        if budget is None or reported_outside(budget):
            return await fn(*args, **kwargs)
        try:
            value = await fn(*args, **kwargs)
        except Exception:
            budget.on_attempt(False)
            raise
        budget.on_attempt(True)
        return value

    async def race(self, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any) -> T:
        """Hedge ``fn(*args, **kwargs)`` without checking the idempotent mark.

        For callers that know better than the mark (the pipeline's
        ``idempotent=True``).  The call is the budget's primary attempt: its
        outcome is reported once it ends (a cancelled call reports nothing),
        unless an enclosing retry on the same budget reports it already.
        Each hedge is an extra attempt, reported as it ends.
        """
        budget = self.budget
        outside = budget is None or reported_outside(budget)
        try:
            value = cast(T, await self._race(fn, args, kwargs))
        except Exception:
            if not outside:
                assert budget is not None
                budget.on_attempt(False)
            raise
        if not outside:
            assert budget is not None
            budget.on_attempt(True)
        return value

    async def _race(self, fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any) -> Any:
        """The race itself; its tasks are spawned and awaited through ``_runtime.race_group``."""
        start = clock.now()
        delay = self.delay()
        outer = RACE.get()
        entries: dict[int, RaceEntry] = {}  # the attempts still running
        winner: _Outcome | None = None
        # Nothing is raised inside the group (a trio nursery would wrap it):
        # the deciding outcome is carried out and raised after.
        async with _runtime.race_group() as group:

            def launch(n: int) -> None:
                entry = entries[n] = RaceEntry(outer)
                group.start(self._attempt, n, entry, fn, args, kwargs)

            launch(0)
            started, running = 1, 1
            while running:
                timeout = self._wait_for_next(started, delay)
                got: _Outcome | None = await group.next(timeout)
                if got is None:  # an answer that came as the delay ended is no reason to hedge
                    got = group.next_nowait()
                if got is None:  # slower than the delay: hedge
                    if self._may_hedge(started, "delay", delay):
                        launch(started)
                        started, running = started + 1, running + 1
                    else:
                        started = self.config.max_hedges + 1  # no more hedges for this call
                    continue
                running -= 1
                entries.pop(got.n, None)
                winner = got
                if self._settled(got, start):
                    if got.error is None:
                        for entry in entries.values():  # still running when the winner answered
                            entry.lost = True
                    break
                # A retryable failure: the next hedge starts at once.
                if self._wait_for_next(started, 0.0) is not None and self._may_hedge(
                    started, "failure", delay
                ):
                    launch(started)
                    started, running = started + 1, running + 1
        assert winner is not None
        if winner.error is not None:
            raise winner.error
        return winner.value

    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function: hedged when it is marked idempotent."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"Hedger {self.name!r}: hedging needs an async function (a sync call "
                f"cannot be cancelled), got {shown(fn)}"
            )

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            if is_idempotent(fn):
                return cast(T, await self.race(fn, args, kwargs))
            return await self._unhedged(fn, args, kwargs)

        return wrapper
