"""One event model for the whole library.

Every primitive reports what it did as a typed, immutable [`Event`][datapunk_recovery.events.Event]
(an attempt finished, a retry was scheduled, the engine gave up, a breaker
opened, ...).  Subscribers are plain callables registered globally with
[`subscribe()`][datapunk_recovery.events.subscribe] or on one
[`EventBus`][datapunk_recovery.events.EventBus] (each decorated function has
its own).  Exporters to logging, Prometheus and OpenTelemetry are subscribers
like any other: there is no second mechanism.

When nobody listens, no event object is built: producers check
[`listening()`][datapunk_recovery.events.listening] first, so an unobserved call pays two attribute
reads.

Events carry names, numbers and exception *type* names, never exception
messages, keys or connection strings: a message may hold a secret.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from .errors import ErrorCategory

__all__ = [
    "AttemptFinished",
    "CallFinished",
    "Event",
    "EventBus",
    "GaveUp",
    "GiveUpReason",
    "HintIgnored",
    "RetryScheduled",
    "Subscriber",
    "emit",
    "global_bus",
    "listening",
    "subscribe",
]

_log = logging.getLogger("datapunk_recovery.events")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event.

    ``operation`` names what the event is about (a decorated function, a
    breaker, a cache); ``at`` is the library clock's monotonic time in seconds.
    ``name`` is a stable dotted identifier (``"retry.scheduled"``) and ``area``
    the part of the library that emits it, used to pick a logger.
    """

    name: ClassVar[str] = "event"
    area: ClassVar[str] = "core"

    operation: str
    at: float


class GiveUpReason(StrEnum):
    """Why a retrying operation stopped trying."""

    ATTEMPTS = "attempts"
    DEADLINE = "deadline"
    NON_RETRYABLE = "non_retryable"
    SERVER_DELAY_TOO_LONG = "server_delay_too_long"
    BUDGET = "budget"
    #: The library itself failed while deciding the next attempt (a bug, or a
    #: value past what the platform can sleep): the caller's exception is
    #: raised, with a note naming the internal error.
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptFinished(Event):
    """One attempt ended; ``duration`` in seconds; ``error_type`` is None on success."""

    name: ClassVar[str] = "retry.attempt"
    area: ClassVar[str] = "retry"

    attempt: int
    duration: float
    succeeded: bool
    error_type: str | None = None
    category: ErrorCategory | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryScheduled(Event):
    """Retry ``retry`` (so attempt ``retry + 1``) will start after ``delay`` seconds.

    ``from_server`` is true when a server-given delay set the wait.
    """

    name: ClassVar[str] = "retry.scheduled"
    area: ClassVar[str] = "retry"

    retry: int
    delay: float
    from_server: bool
    category: ErrorCategory
    error_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GaveUp(Event):
    """The operation stopped after ``attempts`` attempts over ``elapsed`` seconds."""

    name: ClassVar[str] = "retry.gave_up"
    area: ClassVar[str] = "retry"

    attempts: int
    elapsed: float
    reason: GiveUpReason
    error_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CallFinished(Event):
    """A whole call (all its attempts) ended, successfully or not.

    ``outcome`` is one of ``success``, ``success_after_retry``, ``failure``,
    ``failure_after_retry`` (resilience4j's kinds).
    """

    name: ClassVar[str] = "retry.call"
    area: ClassVar[str] = "retry"

    attempts: int
    elapsed: float
    succeeded: bool

    @property
    def outcome(self) -> str:
        kind = "success" if self.succeeded else "failure"
        return kind if self.attempts == 1 else f"{kind}_after_retry"


@dataclass(frozen=True, slots=True, kw_only=True)
class HintIgnored(Event):
    """A server-given delay or a shared state was garbage and was ignored.

    ``value`` is a short, safe rendering of what was refused.
    """

    name: ClassVar[str] = "hint.ignored"
    area: ClassVar[str] = "core"

    value: str
    reason: str


Subscriber = Callable[[Event], None]


class EventBus:
    """A list of subscribers; `emit()` calls each, and a failing one is logged.

    A subscriber that raises never breaks the call being observed.
    """

    __slots__ = ("_subscribers",)

    def __init__(self) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add ``subscriber``; returns a function that removes it again."""
        if not callable(subscriber):
            raise TypeError(f"subscriber: expected a callable, got {subscriber!r}")
        self._subscribers = (*self._subscribers, subscriber)
        return lambda: self.unsubscribe(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Remove ``subscriber`` (no error if it is not there)."""
        self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

    @property
    def active(self) -> bool:
        """Whether anyone listens on this bus."""
        return bool(self._subscribers)

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to every subscriber of this bus."""
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                _log.exception("event subscriber %r failed on %s", subscriber, event.name)


global_bus = EventBus()
"""The bus every event reaches, whichever bus it was emitted on first."""


def subscribe(subscriber: Subscriber) -> Callable[[], None]:
    """Subscribe to every event of the library; returns the unsubscribe function."""
    return global_bus.subscribe(subscriber)


def listening(bus: EventBus | None = None) -> bool:
    """Whether an event emitted on ``bus`` (or only globally) would reach anyone."""
    # Read the private tuple directly: this check sits on hot paths.
    return bool(global_bus._subscribers) or (bus is not None and bool(bus._subscribers))


def emit(event: Event, bus: EventBus | None = None) -> None:
    """Deliver ``event`` to ``bus``'s subscribers, then to the global ones."""
    if bus is not None and bus is not global_bus:
        bus.emit(event)
    global_bus.emit(event)
