"""Adaptive concurrency limits: find how much a dependency can take, and follow it.

A fixed bulkhead size is a guess made once; a dependency's capacity changes
with deploys, load and failures.  An
[`AdaptiveLimiter`][datapunk_recovery.flow.adaptive.AdaptiveLimiter]
is a bulkhead
whose limit moves with what every finished call says (Netflix's
concurrency-limits):

- [`AIMD`][datapunk_recovery.flow.adaptive.AIMD] (additive increase, multiplicative decrease): the
limit
  grows
  by ``increase`` for each success while the limit is actually used, and is
  multiplied by ``backoff_ratio`` for each call that failed for overload
  (dropped, timed out, rate limited) or took longer than ``timeout`` seconds.
  Simple and robust; finds the capacity by probing past it.
- [`Gradient`][datapunk_recovery.flow.adaptive.Gradient] (after Netflix's GradientLimit): compares
each
  call's
  latency with the no-load latency (the fastest call since the last probe);
  when latency rises above ``tolerance`` times it, queues are building and
  the limit shrinks by the ratio (at most halving at once); otherwise it
  grows by ``queue_size``.  Smoothed by ``smoothing``.  Finds the capacity
  without having to overload it; failures shrink it as in AIMD.  (Gradient2's
  long-run *average* baseline was tried and rejected: under a steady
  closed-loop load it follows the latency up and the limit drifts to its
  maximum.)

Both keep the limit within [``min_limit``, ``max_limit``] and only grow it
while at least half of it is in use (a limit nobody reaches says nothing).
Admission is the bulkhead's: at the limit, a call waits in a bounded queue for
at most ``max_wait`` seconds or is refused with
[`BulkheadFull`][datapunk_recovery.flow.bulkhead.BulkheadFull].  A change of the limit is
an event ([`LimitChanged`][datapunk_recovery.flow.adaptive.LimitChanged]).

Latency is measured on the library clock from admission to outcome, unless
the caller gives it.  A cancelled call frees its slot and teaches nothing.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar, ParamSpec, TypeVar

from .._core import clock
from .._core.context import CALLER as _CALLER
from .._core.decorate import CallDecorator
from .._core.errors import ErrorCategory, classify
from .._core.events import Event, EventBus, emit, global_bus
from .._core.validate import check_count, check_fraction, check_number, check_seconds, shown
from .bulkhead import BulkheadState, SlotPool

__all__ = [
    "AIMD",
    "AdaptiveLimiter",
    "AdaptivePermit",
    "Gradient",
    "LimitChanged",
]

P = ParamSpec("P")
T = TypeVar("T")

_OVERLOAD: frozenset[ErrorCategory] = frozenset(
    {ErrorCategory.OVERLOADED, ErrorCategory.TIMEOUT, ErrorCategory.RATE_LIMITED}
)


def _check_bounds(owner: str, initial: int, min_limit: int, max_limit: int) -> None:
    check_count(owner, "initial", initial)
    check_count(owner, "min_limit", min_limit)
    check_count(owner, "max_limit", max_limit)
    if not min_limit <= initial <= max_limit:
        raise ValueError(
            f"{owner}.initial: must be within [min_limit, max_limit] = "
            f"[{min_limit}, {max_limit}], got {shown(initial)}"
        )


@dataclass(frozen=True, slots=True)
class AIMD:
    """Additive increase, multiplicative decrease (see the module doc).

    ``timeout`` (seconds): a call slower than this counts as dropped.
    """

    initial: int = 20
    min_limit: int = 1
    max_limit: int = 1000
    increase: float = 1.0
    backoff_ratio: float = 0.9
    timeout: float = 5.0

    def __post_init__(self) -> None:
        owner = "AIMD"
        _check_bounds(owner, self.initial, self.min_limit, self.max_limit)
        s = object.__setattr__
        s(self, "increase", check_number(owner, "increase", self.increase))
        s(
            self,
            "backoff_ratio",
            check_fraction(owner, "backoff_ratio", self.backoff_ratio, allow_zero=False),
        )
        s(self, "timeout", check_seconds(owner, "timeout", self.timeout, positive=True))

    def update(self, limit: float, rtt: float, inflight: int, dropped: bool) -> float:
        """The next limit after one call that took ``rtt`` seconds with ``inflight`` running."""
        if dropped or rtt > self.timeout:
            limit *= self.backoff_ratio
        elif inflight * 2 >= limit:
            limit += self.increase
        return min(float(self.max_limit), max(float(self.min_limit), limit))


@dataclass(frozen=True, slots=True)
class Gradient:
    """Latency-gradient limit, after Netflix's GradientLimit (see the module doc).

    The gradient is ``tolerance * no_load_latency / latency``, kept within
    [0.5, 1]: 1 while calls are no slower than ``tolerance`` times the
    fastest recent call, below 1 as queues build.  Each call moves the limit
    towards ``limit * gradient + queue_size`` with weight ``smoothing``.  The
    no-load latency is the minimum seen since the last probe: every
    ``probe_interval`` calls the limit drops to ``queue_size`` for a moment so
    that a dependency that became slower for good is measured afresh (a
    baseline that only ever follows the load drifts up with it).
    ``backoff_ratio`` is what a failed (dropped) call multiplies the limit by.
    """

    initial: int = 20
    min_limit: int = 1
    max_limit: int = 1000
    smoothing: float = 0.2
    tolerance: float = 1.5
    queue_size: float = 4.0
    probe_interval: int = 1000
    backoff_ratio: float = 0.9

    def __post_init__(self) -> None:
        owner = "Gradient"
        _check_bounds(owner, self.initial, self.min_limit, self.max_limit)
        s = object.__setattr__
        s(
            self,
            "smoothing",
            check_fraction(owner, "smoothing", self.smoothing, allow_zero=False),
        )
        s(self, "tolerance", check_number(owner, "tolerance", self.tolerance, minimum=1.0))
        s(self, "queue_size", check_number(owner, "queue_size", self.queue_size))
        check_count(owner, "probe_interval", self.probe_interval)
        s(
            self,
            "backoff_ratio",
            check_fraction(owner, "backoff_ratio", self.backoff_ratio, allow_zero=False),
        )


class _GradientState:
    """The no-load latency of one limiter using `Gradient`."""

    __slots__ = ("config", "count", "drain", "no_load")

    def __init__(self, config: Gradient) -> None:
        self.config = config
        self.no_load = math.inf
        self.count = 0
        self.drain = 0  # calls still to finish before the baseline is measured afresh

    def update(self, limit: float, rtt: float, inflight: int, dropped: bool) -> float:
        c = self.config
        low, high = float(c.min_limit), float(c.max_limit)
        if dropped:
            return max(low, limit * c.backoff_ratio)
        self.count += 1
        if self.drain:
            # Calls admitted before the probe still carry the old queueing delay.
            self.drain -= 1
            if self.drain == 0:
                self.no_load = math.inf
            return limit
        if self.count >= c.probe_interval:
            # Probe: let calls run nearly alone, then measure the baseline afresh
            # once those admitted under the old limit (and their followers) are done.
            self.count = 0
            self.drain = 2 * max(inflight, 1)
            return min(high, max(low, c.queue_size))
        if rtt < self.no_load:
            self.no_load = rtt
        if inflight * 2 < limit:
            return limit  # the limit is not in use: latency says nothing about it
        short = rtt if rtt > 0.0 else 1e-9
        gradient = max(0.5, min(1.0, c.tolerance * self.no_load / short))
        estimate = limit * gradient + c.queue_size
        limit = limit * (1.0 - c.smoothing) + estimate * c.smoothing
        return min(high, max(low, limit))


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitChanged(Event):
    """The adaptive limit moved from ``old`` to ``new`` concurrent calls."""

    name: ClassVar[str] = "adaptive.limit"
    area: ClassVar[str] = "adaptive"

    old: int
    new: int


class AdaptivePermit:
    """Leave to make one call; settle it once with `success()`, `dropped()` or
    [`ignore()`][datapunk_recovery.flow.adaptive.AdaptivePermit.ignore] (a cancellation:
    [`ignore()`][datapunk_recovery.flow.adaptive.AdaptivePermit.ignore] too)."""

    __slots__ = ("_caller", "_done", "_limiter", "_start")

    def __init__(self, limiter: AdaptiveLimiter, caller: str | None, start: float) -> None:
        self._limiter = limiter
        self._caller = caller
        self._start = start
        self._done = False

    def success(self, rtt: float | None = None) -> None:
        """The call succeeded after ``rtt`` seconds (measured if not given)."""
        self._settle(rtt, False)

    def dropped(self, rtt: float | None = None) -> None:
        """The call failed for overload (rejected, timed out, throttled) after ``rtt`` seconds."""
        self._settle(rtt, True)

    def _settle(self, rtt: float | None, dropped: bool) -> None:
        if rtt is not None:
            # A negative or NaN latency would poison the no-load baseline for good:
            # refuse it, but free the slot all the same (teaching nothing).
            try:
                # A measurement, not a setting: no upper bound.
                rtt = check_number("AdaptivePermit", "rtt", rtt)
            except (TypeError, ValueError):
                self.ignore()
                raise
        if not self._done:
            self._done = True
            self._limiter._sample(self, rtt, dropped)

    def ignore(self) -> None:
        """Free the slot and teach nothing (cancelled, or failed for reasons of its own)."""
        if not self._done:
            self._done = True
            self._limiter._slots.release(self._caller)


def _check_queue(owner: str, max_queue: int, max_wait: float, per_caller: int | None) -> float:
    """Validate the queue settings; returns ``max_wait`` in seconds."""
    check_count(owner, "max_queue", max_queue, minimum=0)
    max_wait = check_seconds(owner, "max_wait", max_wait)
    if max_queue > 0 and max_wait == 0.0:
        raise ValueError(f"{owner}.max_wait: must be > 0 seconds when max_queue > 0, got 0")
    if per_caller is not None:
        check_count(owner, "per_caller", per_caller)
    return max_wait


class AdaptiveLimiter(CallDecorator):
    """A bulkhead whose limit adapts (see the module doc).

    ``algorithm`` is an [`AIMD`][datapunk_recovery.flow.adaptive.AIMD] or a
    [`Gradient`][datapunk_recovery.flow.adaptive.Gradient]; ``max_queue``,
    ``max_wait`` and ``per_caller`` are as in
    [`BulkheadConfig`][datapunk_recovery.flow.bulkhead.BulkheadConfig].  Faces:
    [`acquire()`][datapunk_recovery.flow.adaptive.AdaptiveLimiter.acquire] /
    [`acquire_async()`][datapunk_recovery.flow.adaptive.AdaptiveLimiter.acquire_async] returning an
    [`AdaptivePermit`][datapunk_recovery.flow.adaptive.AdaptivePermit],
    [`call()`][datapunk_recovery.flow.adaptive.AdaptiveLimiter.call] /
    [`call_async()`][datapunk_recovery.flow.adaptive.AdaptiveLimiter.call_async] (which settle
    it from the outcome: an overload-type error is a drop, any other error is
    ignored), and the object as a decorator.
    """

    __slots__ = ("_estimate", "_limit", "_lock", "_slots", "_update", "algorithm", "bus", "name")

    def __init__(
        self,
        name: str,
        algorithm: AIMD | Gradient | None = None,
        *,
        max_queue: int = 0,
        max_wait: float = 0.0,
        per_caller: int | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.name = name
        self.algorithm = algorithm = algorithm if algorithm is not None else AIMD()
        if isinstance(algorithm, AIMD):
            self._update: Callable[[float, float, int, bool], float] = algorithm.update
        elif isinstance(algorithm, Gradient):
            self._update = _GradientState(algorithm).update
        else:
            raise TypeError(
                f"AdaptiveLimiter.algorithm: expected AIMD or Gradient, got {shown(algorithm)}"
            )
        max_wait = _check_queue("AdaptiveLimiter", max_queue, max_wait, per_caller)
        #: Where this limiter's events go first (then the global bus).
        self.bus = bus if bus is not None else EventBus()
        self._estimate = float(algorithm.initial)
        self._limit = algorithm.initial
        self._slots = SlotPool(
            name, algorithm.initial, max_queue, max_wait, per_caller, self.bus, "adaptive limiter"
        )
        self._lock = threading.Lock()

    def reconfigure(
        self,
        algorithm: AIMD | Gradient,
        *,
        max_queue: int = 0,
        max_wait: float = 0.0,
        per_caller: int | None = None,
    ) -> None:
        """Take new settings while calls run, keeping what was learned and what is held.

        This is how a reload changes a limiter: the limit learned so far is
        kept, within the new [``min_limit``, ``max_limit``] (``initial`` is
        only where a new limiter starts), and the calls in flight keep
        counting against it, so a smaller limit admits nobody until fewer
        calls than it run.  Queue settings are as in
        [`Bulkhead.reconfigure`][datapunk_recovery.flow.bulkhead.Bulkhead.reconfigure].
        """
        owner = "AdaptiveLimiter.reconfigure"
        if isinstance(algorithm, AIMD):
            update: Callable[[float, float, int, bool], float] = algorithm.update
        elif isinstance(algorithm, Gradient):
            same = isinstance(self.algorithm, Gradient) and self.algorithm == algorithm
            update = self._update if same else _GradientState(algorithm).update
        else:
            raise TypeError(f"{owner}: expected AIMD or Gradient, got {shown(algorithm)}")
        max_wait = _check_queue(owner, max_queue, max_wait, per_caller)
        with self._lock:
            old = self._limit
            estimate = min(
                float(algorithm.max_limit), max(float(algorithm.min_limit), self._estimate)
            )
            self.algorithm = algorithm
            self._update = update
            self._estimate = estimate
            new = self._limit = max(1, math.floor(estimate))
            self._slots.reconfigure(new, max_queue, max_wait, per_caller)
        if new != old and (global_bus.active or self.bus.active):
            emit(LimitChanged(operation=self.name, at=clock.now(), old=old, new=new), self.bus)

    @property
    def limit(self) -> int:
        """The concurrency limit now."""
        return self._limit

    def state(self) -> BulkheadState:
        """Calls running and waiting now, and the limit."""
        return self._slots.state()

    def _sample(self, permit: AdaptivePermit, rtt: float | None, dropped: bool) -> None:
        if rtt is None:
            rtt = clock.now() - permit._start
        slots = self._slots
        with self._lock:
            old = self._limit
            self._estimate = self._update(self._estimate, rtt, slots.active, dropped)
            new = self._limit = max(1, math.floor(self._estimate))
            if new != old:
                # Under the lock: two threads that change the limit one after the
                # other must reach the slots in that order, or the pool would keep
                # the older limit while ``limit`` reports the newer one.
                slots.set_limit(new)
        slots.release(permit._caller)
        if new != old and (global_bus.active or self.bus.active):
            emit(LimitChanged(operation=self.name, at=clock.now(), old=old, new=new), self.bus)

    def acquire(self, caller: str | None = None) -> AdaptivePermit:
        """A permit for one call (a thread may wait in the queue)."""
        caller = caller if caller is not None else _CALLER.get()
        self._slots.acquire(caller)
        return AdaptivePermit(self, caller, clock.now())

    async def acquire_async(self, caller: str | None = None) -> AdaptivePermit:
        """A permit for one call (a task may wait in the queue)."""
        caller = caller if caller is not None else _CALLER.get()
        await self._slots.acquire_async(caller)
        return AdaptivePermit(self, caller, clock.now())

    @staticmethod
    def settle(permit: AdaptivePermit, exc: BaseException | None) -> None:
        """Settle ``permit`` from how a call ended (``None``: success)."""
        if exc is None:
            permit.success()
        elif isinstance(exc, Exception) and (
            isinstance(exc, TimeoutError) or classify(exc).category in _OVERLOAD
        ):
            permit.dropped()
        else:
            permit.ignore()

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` under the limit and learn from how it ended."""
        permit = self.acquire()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.settle(permit, exc)
            raise
        permit.success()
        return result

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn`` under the limit and learn from how it ended."""
        permit = await self.acquire_async()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self.settle(permit, exc)
            raise
        permit.success()
        return result
