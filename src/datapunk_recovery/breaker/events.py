"""What a circuit breaker reports: its events (state changes, rejections, outcomes, the shared
store's fallbacks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

from .._core.events import Event, EventBus, global_bus
from .config import BreakerState

__all__ = [
    "BreakerStateChanged",
    "CallRejected",
    "CorruptStateIgnored",
    "OutcomeRecorded",
    "OutcomesFolded",
    "ShadowTrip",
    "StoreFallback",
    "StoreResumed",
    "WriteShed",
    "wants_outcomes",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStateChanged(Event):
    """The breaker went from ``from_state`` to ``to_state`` because of ``reason``.

    Reasons: ``consecutive_failures``, ``failure_rate``, ``slow_call_rate``,
    ``custom``, ``server_delay``, ``open_elapsed``, ``probe_failed``,
    ``probes_succeeded``, ``half_open_timeout``, ``probe_timeout``, ``isolate``,
    ``reset``, ``disable``, ``metrics_only``, ``shared`` (seen in a shared store).
    """

    name: ClassVar[str] = "breaker.state"
    area: ClassVar[str] = "breaker"

    from_state: BreakerState
    to_state: BreakerState
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRejected(Event):
    """A call was refused; it may try again in ``remaining`` seconds (inf: isolated)."""

    name: ClassVar[str] = "breaker.rejected"
    area: ClassVar[str] = "breaker"

    state: BreakerState
    remaining: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OutcomeRecorded(Event):
    """An outcome was recorded: ``success``, ``failure``, ``ignored``, ``cancelled`` or ``lost``.

    ``lost``: a hedged attempt still running when another attempt's answer
    won the race, counted as a slow call (``slow`` is true).

    ``duration`` in seconds when measured; ``error_type`` the exception's type name.
    """

    name: ClassVar[str] = "breaker.outcome"
    area: ClassVar[str] = "breaker"

    outcome: str
    slow: bool = False
    duration: float | None = None
    error_type: str | None = None


_OUTCOME: Final = OutcomeRecorded.name


def wants_outcomes(bus: EventBus) -> bool:
    """Whether a subscriber (of ``bus`` or global) wants `OutcomeRecorded` events.

    The per-call event: when nobody wants it, calls take the paths that build
    no permit, whoever else listens (a metrics exporter that wants only the
    rare kinds, say).  The rare kinds are checked where they are emitted.
    """
    if not (global_bus.active or bus.active):
        return False
    # `listening(bus, OutcomeRecorded)`, reading the buses' public cached routes first:
    # this runs per call while an exporter that wants other kinds is installed,
    # and `EventBus.wants()` (a method call, a type check) costs a fifth more
    # instructions on that path.
    name = _OUTCOME
    route = global_bus.routes.get(name)
    if route is None:
        route = global_bus.route(name)
    if route:
        return True
    route = bus.routes.get(name)
    if route is None:
        route = bus.route(name)
    return bool(route)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowTrip(Event):
    """In ``METRICS_ONLY`` mode, the breaker would have opened because of ``reason``."""

    name: ClassVar[str] = "breaker.shadow_trip"
    area: ClassVar[str] = "breaker"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreFallback(Event):
    """The shared store failed (``error_type``); the breaker runs on local state.

    ``mode`` is ``"local"`` (decide locally: calls keep flowing) or ``"closed"``
    (refuse every call until the store answers again).
    """

    name: ClassVar[str] = "breaker.store_fallback"
    area: ClassVar[str] = "breaker"

    store: str
    error_type: str
    mode: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreResumed(Event):
    """The shared store answers again after ``outage`` seconds; sharing resumed."""

    name: ClassVar[str] = "breaker.store_resumed"
    area: ClassVar[str] = "breaker"

    store: str
    outage: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OutcomesFolded(Event):
    """Outcomes waiting for the shared store were folded: ``outcomes`` outcomes in
    ``runs`` runs kept as one count per kind (successes, slow, failures).

    No outcome is lost (counts add up), but their order is: the store judges
    the folded batch as if its failures came last.  It happens when a send is
    slow to land, or outcomes pile up while the store is away.
    """

    name: ClassVar[str] = "breaker.outcomes_folded"
    area: ClassVar[str] = "breaker"

    store: str
    outcomes: int
    runs: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteShed(Event):
    """A write the shared store should have had at once was counted here only.

    ``what`` is ``"probe result"``, ``"server delay"`` or ``"probe release"``:
    sent at once in a task of its own, but the breaker already had
    ``max_pending`` sends in flight and as many waiting.  The outcome still
    counts on this process's own breaker; the shared state learns of it with
    the next trip or read (a probe not released stays out until the
    half-open time limit).
    """

    name: ClassVar[str] = "breaker.write_shed"
    area: ClassVar[str] = "breaker"

    store: str
    what: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CorruptStateIgnored(Event):
    """The shared store held a state that does not parse; it was ignored (``reason``)."""

    name: ClassVar[str] = "breaker.corrupt_state"
    area: ClassVar[str] = "breaker"

    store: str
    reason: str
