"""Statistics per operation, exact under concurrent calls from threads and tasks.

Every call keeps its own state; the shared counters only ever grow, and each
is an ``itertools.count`` whose ``next()`` runs in C without releasing the
GIL, so no update is lost and no lock is taken, on the hot path or off it.
Nothing per call lives on the shared object, so concurrent calls cannot
overwrite each other's numbers (tenacity's shared-statistics bug).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .events import GiveUpReason

__all__ = ["OperationStats", "Statistics", "count_value"]


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
    """The live counters of one operation; `snapshot()` reads them."""

    __slots__ = ("_first_try", "_giveups", "_retries", "_slow_successes", "_unreasoned")

    def __init__(self) -> None:
        self._first_try = itertools.count()
        self._slow_successes = itertools.count()
        self._retries = itertools.count()
        self._unreasoned = itertools.count()
        self._giveups = {reason: itertools.count() for reason in GiveUpReason}

    def first_try_counter(self) -> Callable[[], int]:
        """The bound C-level counter for hot paths: call it per first-try success."""
        return self._first_try.__next__

    def first_try_success(self) -> None:
        """Count a call that succeeded at its first attempt."""
        next(self._first_try)

    def retry_counter(self) -> Callable[[], int]:
        """The bound counter of retries (attempts beyond a call's first)."""
        return self._retries.__next__

    def slow_success_counter(self) -> Callable[[], int]:
        """The bound counter of calls that succeeded after at least one failed attempt."""
        return self._slow_successes.__next__

    def gave_up(self, reason: GiveUpReason | None) -> None:
        """Count a failed call, by the reason the engine stopped."""
        next(self._unreasoned if reason is None else self._giveups[reason])

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
