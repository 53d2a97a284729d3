"""Statistics per operation for people with no metrics system, fed by events.

Each decorated function already answers ``fn.statistics()`` for itself; a
[`StatisticsCollector`][datapunk_recovery.telemetry.statistics.StatisticsCollector] answers for
every operation at once::

    collector = StatisticsCollector().install()
    ...
    for name, s in collector.statistics().items():
        print(name, s.calls, s.failures, s.retries, s.events)

It counts the retry engine's events into the same numbers as
[`Statistics`][datapunk_recovery._core.stats.Statistics] (calls, successes, failures,
attempts, retries, give-ups by reason), adds the time spent in attempts, and
counts every event kind by name, so breaker rejections, fallbacks and the
rest of the library appear too.  Operations are bounded like a label: past
``max_operations`` distinct names, the rest are counted under ``other``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from datapunk_recovery._core.events import (
    AttemptFinished,
    CallFinished,
    Event,
    GaveUp,
    RetryScheduled,
)

from .exporter import Exporter
from .labels import Labeler, LabelPolicy

__all__ = ["OperationSnapshot", "StatisticsCollector"]


@dataclass(frozen=True, slots=True)
class OperationSnapshot:
    """One operation's counts at the time of the snapshot.

    ``calls = successes + failures`` counts finished calls; ``attempts``
    finished attempts; ``retries`` retries scheduled; ``giveups`` failures by
    reason; ``attempt_seconds`` the total time spent in attempts (seconds);
    ``events`` every event kind seen for the operation, by event name.
    """

    operation: str
    calls: int = 0
    successes: int = 0
    failures: int = 0
    attempts: int = 0
    retries: int = 0
    attempt_seconds: float = 0.0
    giveups: Mapping[str, int] = field(default_factory=dict)
    events: Mapping[str, int] = field(default_factory=dict)


class _Counts:
    __slots__ = ("attempt_seconds", "attempts", "events", "giveups", "successes")

    def __init__(self) -> None:
        self.successes = 0
        self.attempts = 0
        self.attempt_seconds = 0.0
        self.giveups: dict[str, int] = {}
        self.events: dict[str, int] = {}


class StatisticsCollector(Exporter):
    """Counts events per operation; `statistics()` takes a snapshot.

    Exact under events from many threads (one lock, held for a few
    dictionary updates).  Memory is bounded by ``max_operations`` times the
    number of event kinds.
    """

    def __init__(self, *, max_operations: int = 1000) -> None:
        super().__init__()
        self._labeler = Labeler(LabelPolicy(max_values=max_operations))
        self._lock = threading.Lock()
        self._counts: dict[str, _Counts] = {}

    def __call__(self, event: Event) -> None:
        operation = self._labeler("operation", event.operation)
        with self._lock:
            counts = self._counts.get(operation)
            if counts is None:
                counts = self._counts[operation] = _Counts()
            counts.events[event.name] = counts.events.get(event.name, 0) + 1
            if isinstance(event, CallFinished):
                counts.successes += event.succeeded
                if event.first_try:  # it stands for its one attempt (no AttemptFinished)
                    counts.attempts += 1
                    counts.attempt_seconds += event.elapsed
            elif isinstance(event, AttemptFinished):
                counts.attempts += 1
                counts.attempt_seconds += event.duration
            elif isinstance(event, GaveUp):
                reason = event.reason.value
                counts.giveups[reason] = counts.giveups.get(reason, 0) + 1

    def statistics(self) -> dict[str, OperationSnapshot]:
        """Every operation seen so far, by name."""
        with self._lock:
            return {name: _snapshot(name, counts) for name, counts in self._counts.items()}

    def snapshot(self, operation: str) -> OperationSnapshot:
        """One operation's counts (all zero if it was never seen)."""
        with self._lock:
            counts = self._counts.get(operation)
            return OperationSnapshot(operation) if counts is None else _snapshot(operation, counts)

    def reset(self) -> None:
        """Forget every count (the admitted operation names stay)."""
        with self._lock:
            self._counts.clear()


def _snapshot(operation: str, counts: _Counts) -> OperationSnapshot:
    events = counts.events
    calls = events.get(CallFinished.name, 0)
    return OperationSnapshot(
        operation=operation,
        calls=calls,
        successes=counts.successes,
        failures=calls - counts.successes,
        attempts=counts.attempts,
        retries=events.get(RetryScheduled.name, 0),
        attempt_seconds=counts.attempt_seconds,
        giveups=MappingProxyType(dict(counts.giveups)),
        events=MappingProxyType(dict(events)),
    )
