"""What retry budgets report: a refused retry, and the shared budget's store events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._core import clock
from .._core.events import Event, EventBus, emit, listening
from .criticality import Criticality

__all__ = [
    "BudgetCorruptStateIgnored",
    "BudgetRefused",
    "BudgetStoreFallback",
    "BudgetStoreResumed",
    "report_refused",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetRefused(Event):
    """A budget refused a retry (or a hedge).

    ``criticality`` is the refused call's level; ``level`` the budget's fill
    when it refused (tokens held for a [`TokenBudget`][datapunk_recovery.budget.TokenBudget],
    retries already
    spent in the window for a [`RatioBudget`][datapunk_recovery.budget.RatioBudget]) and ``limit``
    what that
    criticality needed (more than it, or at most it minus one).
    """

    name: ClassVar[str] = "budget.refused"
    area: ClassVar[str] = "budget"

    criticality: str
    level: float
    limit: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetStoreFallback(Event):
    """A shared budget's sync failed (``error_type``): it decides on local state now.

    ``mode`` is ``"local"`` (retries judged by this process's budget alone) or
    ``"closed"`` (every retry refused until the store answers again).
    """

    name: ClassVar[str] = "budget.store_fallback"
    area: ClassVar[str] = "budget"

    store: str
    error_type: str
    mode: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetStoreResumed(Event):
    """A shared budget's store answers again after ``outage`` seconds; sharing resumed."""

    name: ClassVar[str] = "budget.store_resumed"
    area: ClassVar[str] = "budget"

    store: str
    outage: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetCorruptStateIgnored(Event):
    """The store held (or answered) a budget state that does not parse; it was ignored."""

    name: ClassVar[str] = "budget.corrupt_state"
    area: ClassVar[str] = "budget"

    store: str
    reason: str


def report_refused(
    name: str, bus: EventBus | None, level: Criticality, fill: float, limit: float
) -> None:
    """Report a refused retry (only when someone listens)."""
    if listening(bus):
        emit(
            BudgetRefused(
                operation=name,
                at=clock.now(),
                criticality=level.name.lower(),
                level=fill,
                limit=limit,
            ),
            bus,
        )
