"""Pulling what the retry engine counts, for metrics readers ("pull what is counted").

Calls by outcome, retries by category, give-ups by reason and attempt
durations are kept by the engine in its own lock-free statistics
([`datapunk_recovery._core.stats`][datapunk_recovery._core.stats]); a metrics exporter reads them
when it is
scraped or collected instead of receiving an event per call.  A
[`Puller`][datapunk_recovery.telemetry.pull.Puller] is the exporter's view: it takes a baseline when
the exporter
is installed, so the exporter shows only what happened while it was
installed (as it would have by counting events), on every bus it was
installed on, and freezes when the exporter is closed.  The numbers are then
turned into the same label values (bounded, redacted) as events would give.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Final

from datapunk_recovery._core.events import EventBus, global_bus
from datapunk_recovery._core.stats import (
    DURATION_BOUNDS,
    OVERFLOW,
    OperationReading,
    read_operations,
)

from .labels import Labeler
from .metrics import ATTEMPT_DURATION, CALLS, GIVEUPS, RETRIES, Metric

__all__ = ["PULLED", "Puller", "served_bounds"]

PULLED: Final[dict[str, Metric]] = {
    "retry.call": CALLS,
    "retry.scheduled": RETRIES,
    "retry.gave_up": GIVEUPS,
    "retry.attempt": ATTEMPT_DURATION,
}
"""Event name -> the metric a metrics exporter pulls instead of counting that event."""


def served_bounds(buckets: Sequence[float]) -> tuple[int, ...] | None:
    """Indexes into `DURATION_BOUNDS` of ``buckets``, or None if one is not a bound there.

    The engine keeps attempt durations in the buckets of ``DURATION_BOUNDS``;
    a histogram whose bounds are among those is exact from them.
    """
    try:
        return tuple(DURATION_BOUNDS.index(float(b)) for b in sorted(buckets))
    except ValueError:
        return None


class Puller:
    """One exporter's window on the engine's statistics: from install to close."""

    def __init__(self, labeler: Labeler, *, time_attempts: bool) -> None:
        self._labeler = labeler
        self._time_attempts = time_attempts
        self._lock = threading.Lock()
        # (bus or None for every operation, the baseline taken at install)
        self._scopes: list[tuple[EventBus | None, dict[str, OperationReading]]] = []
        self._closed: dict[str, OperationReading] = {}

    def start(self, buses: Iterable[EventBus]) -> None:
        """Start counting on ``buses`` (``global_bus`` meaning every operation)."""
        with self._lock:
            for bus in buses:
                scope = None if bus is global_bus else bus
                self._scopes.append((scope, read_operations(scope)))
                if self._time_attempts:
                    bus.time_attempts(True)

    def covers(self, bus: EventBus | None) -> bool:
        """Whether the operations of ``bus`` are counted (installed globally or on it)."""
        return any(scope is None or scope is bus for scope, _ in self._scopes)

    def operation(self, name: str) -> str:
        """The label value of the operation ``name``."""
        return self._operation(name)

    def stop(self) -> None:
        """Freeze the numbers: what happens from now on is not counted."""
        with self._lock:
            self._closed = self._read()
            for scope, _ in self._scopes:
                if self._time_attempts:
                    (global_bus if scope is None else scope).time_attempts(False)
            self._scopes = []

    def read(self) -> dict[str, OperationReading]:
        """What each operation (by name) counted while installed."""
        with self._lock:
            return self._read()

    def _read(self) -> dict[str, OperationReading]:
        out = {name: reading.copy() for name, reading in self._closed.items()}
        for scope, baseline in self._scopes:
            for name, reading in read_operations(scope).items():
                mine = out.get(name)
                if mine is None:
                    mine = out[name] = reading
                else:
                    mine.add(reading)
                base = baseline.get(name)
                if base is not None:
                    mine.add(base, -1)
        return out

    def _operation(self, name: str) -> str:
        return self._labeler.other if name == OVERFLOW else self._labeler("operation", name)

    def counters(
        self, readings: dict[str, OperationReading]
    ) -> dict[Metric, dict[tuple[str, ...], int]]:
        """Calls, retries and give-ups as label values -> count (zeros left out)."""
        label = self._labeler
        out: dict[Metric, dict[tuple[str, ...], int]] = {CALLS: {}, RETRIES: {}, GIVEUPS: {}}
        for name, reading in readings.items():
            if not any(reading.outcomes.values()) and not any(reading.retries.values()):
                continue  # nothing counted: its name takes no label value
            operation = self._operation(name)
            for metric, label_name, counts in (
                (CALLS, "outcome", reading.outcomes),
                (RETRIES, "category", reading.retries),
                (GIVEUPS, "reason", reading.giveups),
            ):
                series = out[metric]
                for value, n in counts.items():
                    if n:
                        labels = (operation, label(label_name, value))
                        series[labels] = series.get(labels, 0) + n
        return out

    def histograms(
        self, readings: dict[str, OperationReading]
    ) -> dict[tuple[str, ...], tuple[list[int], float]]:
        """Attempt durations by label values: (per-bucket counts, sum in seconds)."""
        out: dict[tuple[str, ...], tuple[list[int], float]] = {}
        for name, reading in readings.items():
            if not reading.attempts:
                continue
            labels = (self._operation(name),)
            known = out.get(labels)
            if known is None:
                out[labels] = (list(reading.buckets), reading.duration_sum)
            else:
                buckets = [a + b for a, b in zip(known[0], reading.buckets, strict=True)]
                out[labels] = (buckets, known[1] + reading.duration_sum)
        return out
