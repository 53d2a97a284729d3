"""Per-call context carried in a context variable: the overall deadline and attempt number.

One variable holds both so that the hot path of a retrying call reads one
value: ``None`` (no deadline, not inside a retry) lets it take its fastest
route.  The value is a plain ``(deadline_at, attempt)`` tuple, because a
tuple is built in nanoseconds and this one is built before every retry:
``deadline_at`` is the library clock's time by which everything must end (or
``None``), ``attempt`` the attempt number of the innermost retrying operation.
Context variables follow asyncio tasks, trio tasks and threads the way a
request does.
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = [
    "CALLER",
    "CURRENT",
    "RACE",
    "REPORTING",
    "CallContext",
    "RaceEntry",
    "lost_race",
    "reported_outside",
]

CallContext = tuple[float | None, int]

CURRENT: ContextVar[CallContext | None] = ContextVar("datapunk_recovery_call", default=None)

#: Who the calls made now count against (``None``: nobody in particular), set
#: by ``bulkhead.as_caller()`` and read by every primitive with per-caller
#: quotas (bulkheads, adaptive limiters, rate limiters, pipeline stages), so
#: that none of them has to reach into another for it.
CALLER: ContextVar[str | None] = ContextVar("datapunk_recovery_caller", default=None)

#: The retry budgets whose attempts an enclosing layer already reports (the
#: retry engine reports each of its attempts, whole hedged races included).
#: A hedger reports its call's primary attempt to its budget only when that
#: budget is not here, so that every attempt is reported exactly once however
#: the layers are composed.  Empty outside any retry with a budget.
REPORTING: ContextVar[tuple[object, ...]] = ContextVar(
    "datapunk_recovery_budget_reporting", default=()
)


def reported_outside(budget: object) -> bool:
    """Whether an enclosing layer reports the attempts of the calls made now to ``budget``."""
    return any(b is budget for b in REPORTING.get())


class RaceEntry:
    """One attempt of a hedged race, as its own task sees it.

    The hedger sets ``lost`` before it cancels an attempt that was still
    running when another attempt's answer won the race; ``outer`` is the
    attempt of an enclosing race this one runs in (a lost outer attempt loses
    everything inside it).  The caller's own cancellation sets nothing.
    """

    __slots__ = ("lost", "outer")

    def __init__(self, outer: RaceEntry | None) -> None:
        self.lost = False
        self.outer = outer


#: The hedged attempt the code running now belongs to (``None`` outside any race).
RACE: ContextVar[RaceEntry | None] = ContextVar("datapunk_recovery_race", default=None)


def lost_race() -> bool:
    """Whether the cancellation arriving now is a hedge losing its race (not the caller's)."""
    entry = RACE.get()
    while entry is not None:
        if entry.lost:
            return True
        entry = entry.outer
    return False
