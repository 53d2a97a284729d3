"""Resource tracking: every acquired resource is known until released.

A resource that is never released (a GPU slot held by a forgotten handle, a
file left open) or released twice (which would hand the same slot to two
callers) is a *leak*.  [`ResourceTracker`][datapunk_recovery.resource.tracking.ResourceTracker]
reports both, with where the
resource was acquired, as a [`LeakReport`][datapunk_recovery.resource.tracking.LeakReport] and a
[`ResourceLeaked`][datapunk_recovery.resource.tracking.ResourceLeaked]
event:

- *released twice*: at the second
  [`TrackedResource.release()`][datapunk_recovery.resource.tracking.TrackedResource.release], which
  then does nothing else (the resource is not freed a second time);
- *never released*: when the handle is garbage-collected unreleased, or when
  [`ResourceTracker.check()`][datapunk_recovery.resource.tracking.ResourceTracker.check] is called
  (at shutdown, or at the end of a
  test) while it is still held.

"Where" is the innermost frames outside this library, as ``file:line in
function`` text: no values, so no secrets, reach reports or events.
Capturing them costs a few microseconds per acquisition; switch it off with
``capture_stack=False`` on hot paths.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Final, Generic, TypeVar

from datapunk_recovery._core import clock
from datapunk_recovery._core.events import Event, EventBus, emit, listening
from datapunk_recovery._core.validate import check_count, shown

__all__ = [
    "LeakKind",
    "LeakReport",
    "ResourceLeaked",
    "ResourceTracker",
    "TrackedResource",
    "where_called",
]

T = TypeVar("T")

_log = logging.getLogger("datapunk_recovery.resource")
_PACKAGE_DIR: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LeakKind(StrEnum):
    """What went wrong with a tracked resource."""

    NEVER_RELEASED = "never_released"
    RELEASED_TWICE = "released_twice"


@dataclass(frozen=True, slots=True)
class LeakReport:
    """One leak: which resource (``kind`` and a numeric ``resource_id``), what, and where.

    ``acquired_at`` holds the innermost frames outside the library when the
    resource was acquired, innermost first; ``released_at`` the first release
    of a resource released twice.  ``age`` is seconds between acquisition and
    the report.
    """

    kind: str
    resource_id: int
    problem: LeakKind
    acquired_at: tuple[str, ...]
    released_at: tuple[str, ...]
    age: float

    def __str__(self) -> str:
        where = self.acquired_at[0] if self.acquired_at else "an unknown place"
        return f"{self.kind} #{self.resource_id} {self.problem.value.replace('_', ' ')}; " + (
            f"acquired at {where}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceLeaked(Event):
    """A leak was found; ``where`` is the innermost frame that acquired the resource."""

    name: ClassVar[str] = "resource.leak"
    area: ClassVar[str] = "resource"

    kind: str
    resource_id: int
    problem: LeakKind
    where: str


def where_called(depth: int = 4) -> tuple[str, ...]:
    """Up to ``depth`` frames of the caller outside this library, innermost first."""
    frames: list[str] = []
    frame = sys._getframe(1)
    while frame is not None and len(frames) < depth:
        path = frame.f_code.co_filename
        if not path.startswith(_PACKAGE_DIR):
            frames.append(f"{path}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back  # type: ignore[assignment]
    return tuple(frames)


class _Record:
    __slots__ = ("acquired", "acquired_at", "id", "kind", "released_at")

    def __init__(self, rid: int, kind: str, acquired_at: tuple[str, ...]) -> None:
        self.id = rid
        self.kind = kind
        self.acquired_at = acquired_at
        self.acquired = clock.now()
        self.released_at: tuple[str, ...] | None = None


class TrackedResource(Generic[T]):
    """A handle on one tracked resource; call `release()` exactly once.

    ``resource`` is the object itself; ``resource_id`` is the tracker's number
    for it (what reports and events show instead of the object).
    """

    __slots__ = ("__weakref__", "_finalizer", "_record", "_tracker", "resource")

    def __init__(self, tracker: ResourceTracker, record: _Record, resource: T) -> None:
        self._tracker = tracker
        self._record = record
        self.resource = resource
        self._finalizer = weakref.finalize(self, tracker._collected, record)

    @property
    def kind(self) -> str:
        return self._record.kind

    @property
    def resource_id(self) -> int:
        return self._record.id

    @property
    def released(self) -> bool:
        return self._record.released_at is not None

    def release(self) -> bool:
        """Mark the resource released; returns False (and reports) if it already was."""
        return self._tracker._release(self._record, self._finalizer)


class ResourceTracker:
    """Knows every resource acquired through it until it is released.

    ``name`` names the tracker in events (their ``operation``); ``on_leak`` is
    called with each [`LeakReport`][datapunk_recovery.resource.tracking.LeakReport] (besides the
    event); ``stack_depth``
    is how many frames of "where acquired" to keep.  Thread-safe.
    """

    __slots__ = (
        "_bus",
        "_depth",
        "_ids",
        "_leaks",
        "_live",
        "_lock",
        "capture_stack",
        "name",
        "on_leak",
    )

    def __init__(
        self,
        name: str = "resources",
        *,
        capture_stack: bool = True,
        stack_depth: int = 4,
        on_leak: Callable[[LeakReport], None] | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.name = name
        self.capture_stack = capture_stack
        self._depth = check_count("ResourceTracker", "stack_depth", stack_depth)
        if on_leak is not None and not callable(on_leak):
            raise TypeError(f"ResourceTracker.on_leak: expected a callable, got {shown(on_leak)}")
        self.on_leak = on_leak
        self._bus = bus
        self._ids = itertools.count(1)
        self._live: dict[int, _Record] = {}
        self._leaks: list[LeakReport] = []
        self._lock = threading.Lock()

    def track(self, resource: T, kind: str) -> TrackedResource[T]:
        """Start tracking ``resource`` of ``kind``; release the returned handle when done."""
        where = where_called(self._depth) if self.capture_stack else ()
        record = _Record(next(self._ids), kind, where)
        self._live[record.id] = record
        return TrackedResource(self, record, resource)

    def _release(self, record: _Record, finalizer: weakref.finalize[Any, Any]) -> bool:
        where = where_called(self._depth) if self.capture_stack else ()
        with self._lock:
            first = record.released_at is None
            if first:
                record.released_at = where
        if first:
            finalizer.detach()
            self._live.pop(record.id, None)
            return True
        self._report(record, LeakKind.RELEASED_TWICE)
        return False

    def _collected(self, record: _Record) -> None:
        # A handle was garbage-collected without release (runs from the GC).
        if self._live.pop(record.id, None) is not None:
            self._report(record, LeakKind.NEVER_RELEASED)

    def _report(self, record: _Record, problem: LeakKind) -> LeakReport:
        report = LeakReport(
            kind=record.kind,
            resource_id=record.id,
            problem=problem,
            acquired_at=record.acquired_at,
            released_at=record.released_at or (),
            age=clock.now() - record.acquired,
        )
        self._leaks.append(report)
        _log.warning("%s: %s", self.name, report)
        if listening(self._bus):
            emit(
                ResourceLeaked(
                    operation=self.name,
                    at=clock.now(),
                    kind=record.kind,
                    resource_id=record.id,
                    problem=problem,
                    where=record.acquired_at[0] if record.acquired_at else "",
                ),
                self._bus,
            )
        if self.on_leak is not None:
            try:
                self.on_leak(report)
            except Exception:
                _log.exception("%s: on_leak callback failed", self.name)
        return report

    # -- asking ---------------------------------------------------------------------------

    def in_use(self) -> Counter[str]:
        """How many resources of each kind are held now."""
        return Counter(r.kind for r in list(self._live.values()))

    def leaks(self) -> list[LeakReport]:
        """Every leak reported so far, oldest first."""
        return list(self._leaks)

    def check(self) -> list[LeakReport]:
        """Report every resource still held as never released; returns all leaks so far.

        Call it where nothing should be held any more (shutdown, the end of a
        test): each resource is reported once and no longer tracked.
        """
        for rid in list(self._live):
            record = self._live.pop(rid, None)
            if record is not None:
                self._report(record, LeakKind.NEVER_RELEASED)
        return self.leaks()
