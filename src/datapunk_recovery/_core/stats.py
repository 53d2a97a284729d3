"""Statistics per operation, exact under concurrent calls from threads and tasks.

Every call keeps its own state; the shared counters only ever grow, and each
is an ``itertools.count`` whose ``next()`` runs in C without releasing the
GIL, so no update is lost and no lock is taken, on the hot path or off it.
Nothing per call lives on the shared object, so concurrent calls cannot
overwrite each other's numbers (tenacity's shared-statistics bug).

The same counters feed the metrics exporters at scrape time ("pull what is
counted"): every [`OperationStats`][datapunk_recovery._core.stats.OperationStats] is listed in a
registry
read by
[`read_operations()`][datapunk_recovery._core.stats.read_operations], which sums them per operation
name
(those of
operations already garbage collected included, so a counter never goes
back).  When a metrics reader asks for it (``EventBus.time_attempts``), the
engine also times each attempt: the duration (seconds) is appended to a
list (``list.append`` is atomic: no lock) and folded into per-operation
histogram buckets ([`DURATION_BOUNDS`][datapunk_recovery._core.stats.DURATION_BOUNDS]) and a sum by
whoever reads, or by the call that finds more than
[`FOLD_AT`][datapunk_recovery._core.stats.FOLD_AT] pending (on the engine's fast path: every
``FOLD_AT``-th first-try success, read off the counter it advances anyway).
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from .errors import ErrorCategory
from .events import EventBus, GiveUpReason

__all__ = [
    "DURATION_BOUNDS",
    "Tap",
    "add_tap",
    "remove_tap",
    "FOLD_AT",
    "OVERFLOW",
    "RETIRED_NAMES",
    "OperationReading",
    "OperationStats",
    "Statistics",
    "count_value",
    "read_operations",
]

DURATION_BOUNDS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds, inclusive) of the attempt-duration buckets the engine keeps."""

RETIRED_NAMES: Final = 10_000
"""Operation names whose counts outlive their operations; later ones share `OVERFLOW`."""

OVERFLOW: Final = "\x00overflow"
"""The name under which the counts of collected operations past `RETIRED_NAMES` are kept.

Metrics readers report it as their label policy's ``other`` value.
"""

_log = logging.getLogger("datapunk_recovery.events")

FOLD_AT: Final = 256
"""Pending attempt durations past which the call that adds one folds them (a power of two)."""


@dataclass(frozen=True, slots=True)
class Statistics:
    """A snapshot of one operation's counters.

    ``calls`` counts finished calls (``successes + failures``); ``attempts``
    every attempt made, those of calls still running included; ``retries`` the
    attempts beyond the first of each call; ``giveups`` counts failures by
    reason.
    """

    calls: int
    successes: int
    failures: int
    attempts: int
    retries: int
    giveups: Mapping[GiveUpReason, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        # Give-ups by reason as a plain dict of reason names: what one reads
        # in a log line or a REPL, not a mappingproxy of enum members.
        giveups = {str(reason): count for reason, count in self.giveups.items()}
        return (
            f"Statistics(calls={self.calls}, successes={self.successes}, "
            f"failures={self.failures}, attempts={self.attempts}, retries={self.retries}, "
            f"giveups={giveups!r})"
        )


def count_value(counter: itertools.count[int]) -> int:
    """The value of an ``itertools.count`` without advancing it."""
    # repr(count(7)) == "count(7)": the one way to read a count without advancing it.
    return int(repr(counter)[6:-1])


class OperationStats:
    """The live counters of one operation; `snapshot()` reads them.

    ``name`` and ``bus`` (the operation's event bus) say where a metrics
    reader finds it ([`read_operations()`][datapunk_recovery._core.stats.read_operations]).
    """

    __slots__ = (
        "__weakref__",
        "_first_failures",
        "_first_try",
        "_giveups",
        "_retries",
        "_retries_by",
        "_slow_successes",
        "_tally",
        "_unreasoned",
        "bus",
        "name",
        "pending",
    )

    def __init__(self, name: str = "", bus: EventBus | None = None) -> None:
        self.name = name
        self.bus = bus
        self._first_try = itertools.count()
        self._slow_successes = itertools.count()
        self._retries = itertools.count()
        self._retries_by = {category: itertools.count() for category in ErrorCategory}
        self._unreasoned = itertools.count()
        self._first_failures = itertools.count()
        self._giveups = {reason: itertools.count() for reason in GiveUpReason}
        self._tally = _Tally()
        self.pending = self._tally.pending
        _register(self)

    def first_try_counter(self) -> Callable[[], int]:
        """The bound C-level counter for hot paths: call it per first-try success."""
        return self._first_try.__next__

    def first_try_success(self) -> None:
        """Count a call that succeeded at its first attempt."""
        next(self._first_try)

    def retry_counter(self) -> Callable[[], int]:
        """The bound counter of retries (attempts beyond a call's first), any category."""
        return self._retries.__next__

    def retried(self, category: ErrorCategory) -> None:
        """Count a retry scheduled after an error of ``category``."""
        next(self._retries)
        next(self._retries_by[category])

    def slow_success_counter(self) -> Callable[[], int]:
        """The bound counter of calls that succeeded after at least one failed attempt."""
        return self._slow_successes.__next__

    def gave_up(self, reason: GiveUpReason | None, attempts: int = 2) -> None:
        """Count a failed call, by the reason the engine stopped, after ``attempts`` attempts."""
        if attempts == 1:
            next(self._first_failures)
        next(self._unreasoned if reason is None else self._giveups[reason])

    def observe(self, seconds: float) -> None:
        """Record one attempt's duration (for the histogram metrics readers pull)."""
        self.pending.append(seconds)
        if len(self.pending) > FOLD_AT:
            self._tally.fold(self)

    def fold(self) -> None:
        """Fold the pending attempt durations into the buckets and the sum."""
        self._tally.fold(self)

    def snapshot(self) -> Statistics:
        """The counters now."""
        giveups = {reason: count_value(c) for reason, c in self._giveups.items()}
        failures = sum(giveups.values()) + count_value(self._unreasoned)
        successes = count_value(self._first_try) + count_value(self._slow_successes)
        calls = successes + failures
        retries = count_value(self._retries)
        return Statistics(
            calls=calls,
            successes=successes,
            failures=failures,
            attempts=calls + retries,
            retries=retries,
            giveups=MappingProxyType({r: n for r, n in giveups.items() if n}),
        )

    def reading(self) -> OperationReading:
        """The counters as a metrics reader needs them (pending durations folded first)."""
        tally = self._tally
        tally.fold(self)
        giveups = {reason.value: count_value(c) for reason, c in self._giveups.items()}
        failures = sum(giveups.values()) + count_value(self._unreasoned)
        first_failures = count_value(self._first_failures)
        with tally.lock:
            buckets, total = list(tally.buckets), tally.total
        return OperationReading(
            outcomes={
                "success": count_value(self._first_try),
                "success_after_retry": count_value(self._slow_successes),
                "failure": first_failures,
                "failure_after_retry": failures - first_failures,
            },
            retries={c.value: count_value(n) for c, n in self._retries_by.items()},
            giveups=giveups,
            buckets=buckets,
            duration_sum=total,
        )


class _Tally:
    """Attempt durations: pending ones, and those folded into buckets and a sum."""

    __slots__ = ("buckets", "lock", "pending", "total")

    def __init__(self) -> None:
        self.pending: list[float] = []
        self.buckets = [0] * (len(DURATION_BOUNDS) + 1)
        self.total = 0.0
        self.lock = threading.Lock()

    def fold(self, owner: OperationStats) -> None:
        # Calls only append (at the end, atomically) and only a fold removes,
        # under the lock: the first n are this fold's to take, whatever calls
        # append meanwhile.  A slice and a slice deletion: C, no per-item loop.
        pending = self.pending
        with self.lock:
            n = len(pending)
            if not n:
                return
            batch = pending[:n]
            del pending[:n]
            total = sum(batch)
            self.total += total
            buckets = self.buckets
            if total <= DURATION_BOUNDS[0]:
                # Durations are >= 0 (monotonic clocks), so none exceeds their
                # sum: all in the first bucket, without a sort (fast calls).
                buckets[0] += n
            else:
                # Sorted once (C), the batch splits at each bound with one
                # bisect: a duration equal to a bound belongs to that bucket.
                batch.sort()
                below = 0
                for index, bound in enumerate(DURATION_BOUNDS):
                    upto = bisect_right(batch, bound)
                    buckets[index] += upto - below
                    below = upto
                buckets[-1] += n - below
        for tap in _taps:
            # A fold runs inside a user's call (every FOLD_AT-th) or a scrape:
            # a reader's failure is logged, never raised into either.
            try:
                tap(owner, batch)
            except Exception:
                _log.exception("attempt-duration tap %r failed on %d durations", tap, n)


Tap = Callable[[OperationStats, list[float]], None]
"""Receives each attempt duration (seconds) as it is folded, with its operation's statistics."""

_taps: tuple[Tap, ...] = ()


def add_tap(tap: Tap) -> None:
    """Have ``tap`` receive every attempt duration folded from now on (a batch at a time).

    For a metrics reader that needs the durations themselves (an
    OpenTelemetry histogram) rather than the buckets; called outside any lock,
    in the thread that folds (a call or a scrape).  A tap that raises is
    logged (``datapunk_recovery.events``) and the others still run.
    """
    global _taps
    with _registry_lock:
        _taps = (*_taps, tap)


def remove_tap(tap: Tap) -> None:
    """Stop calling ``tap`` (no error if it was not added)."""
    global _taps
    with _registry_lock:
        _taps = tuple(t for t in _taps if t != tap)


@dataclass(slots=True)
class OperationReading:
    """What a metrics reader pulls from one operation (or several of one name, summed).

    ``outcomes`` counts finished calls by outcome (``success``,
    ``success_after_retry``, ``failure``, ``failure_after_retry``);
    ``retries`` retries by error category, ``giveups`` give-ups by reason
    (values of the enumerations); ``buckets`` attempt durations per bucket of
    [`DURATION_BOUNDS`][datapunk_recovery._core.stats.DURATION_BOUNDS]
    (not cumulative; the last one above
    every bound)
    and ``duration_sum`` their total in seconds.
    """

    outcomes: dict[str, int]
    retries: dict[str, int]
    giveups: dict[str, int]
    buckets: list[int]
    duration_sum: float

    def add(self, other: OperationReading, sign: int = 1) -> None:
        """Add (or with ``sign=-1`` subtract) ``other`` in place."""
        for mine, theirs in (
            (self.outcomes, other.outcomes),
            (self.retries, other.retries),
            (self.giveups, other.giveups),
        ):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + sign * value
        self.buckets = [a + sign * b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.duration_sum += sign * other.duration_sum

    def copy(self) -> OperationReading:
        """An independent copy."""
        return OperationReading(
            dict(self.outcomes),
            dict(self.retries),
            dict(self.giveups),
            list(self.buckets),
            self.duration_sum,
        )

    @property
    def attempts(self) -> int:
        """Attempt durations recorded."""
        return sum(self.buckets)


def _empty() -> OperationReading:
    return OperationReading({}, {}, {}, [0] * (len(DURATION_BOUNDS) + 1), 0.0)


# The registry: every live OperationStats (by a twin sharing its counters, so
# that they can still be read once it is gone), and what those already
# collected counted, per operation name (globally, and per event bus).
_registry_lock = threading.Lock()
_live: dict[int, tuple[OperationStats, weakref.ref[OperationStats]]] = {}
_ids = itertools.count()
_retired: dict[str, OperationReading] = {}
_retired_by_bus: weakref.WeakKeyDictionary[EventBus, dict[str, OperationReading]] = (
    weakref.WeakKeyDictionary()
)


_dead: deque[int] = deque()


def _register(stats: OperationStats) -> None:
    twin = object.__new__(OperationStats)
    for slot in OperationStats.__slots__:
        if slot != "__weakref__":
            object.__setattr__(twin, slot, object.__getattribute__(stats, slot))
    with _registry_lock:
        _bury()
        key = next(_ids)
        # The callback only queues: it may run in any thread, at any
        # allocation (a garbage collection), even under _registry_lock.
        _live[key] = (twin, weakref.ref(stats, lambda _: _dead.append(key)))


def _bury() -> None:
    """Move the counts of collected operations to the retired totals (lock held)."""
    while _dead:
        twin = _live.pop(_dead.popleft())[0]
        final = twin.reading()
        _keep(_retired, twin.name, final)
        if twin.bus is not None:
            _keep(_retired_by_bus.setdefault(twin.bus, {}), twin.name, final)


def _keep(retired: dict[str, OperationReading], name: str, reading: OperationReading) -> None:
    # Names made up per call (an id in the name) must not grow this without
    # end: past RETIRED_NAMES, a new name's counts go to OVERFLOW.
    known = retired.get(name)
    if known is None:
        if len(retired) >= RETIRED_NAMES:
            name = OVERFLOW
            known = retired.get(name)
        if known is None:
            known = retired[name] = _empty()
    known.add(reading)


def read_operations(bus: EventBus | None = None) -> dict[str, OperationReading]:
    """Every operation's counters summed per name: all of them, or those of ``bus``.

    Operations already garbage collected count with what they had counted.
    """
    out: dict[str, OperationReading] = {}
    with _registry_lock:
        _bury()
        twins = [twin for twin, _ in _live.values() if bus is None or twin.bus is bus]
        retired = _retired if bus is None else _retired_by_bus.get(bus, {})
        for name, reading in retired.items():
            out.setdefault(name, _empty()).add(reading)
    for twin in twins:
        out.setdefault(twin.name, _empty()).add(twin.reading())
    return out
