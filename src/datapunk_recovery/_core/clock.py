"""The library's clock: monotonic seconds, replaceable by a fake for tests and simulations.

Every primitive reads time through [`now()`][datapunk_recovery._core.clock.now] so that a
[`FakeClock`][datapunk_recovery._core.clock.FakeClock]
installed with [`use_clock()`][datapunk_recovery._core.clock.use_clock] makes deadlines, breaker
windows
and budgets
deterministic.  With a fake clock installed, the execution layer's sleeps
advance the fake time instead of waiting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from datapunk_recovery._core.validate import shown

__all__ = ["FakeClock", "current_fake", "now", "use_clock", "wall"]

now: Callable[[], float] = time.monotonic
"""Monotonic seconds; rebound by `use_clock()` (read it as ``clock.now()``)."""

wall: Callable[[], float] = time.time
"""Wall-clock seconds (``time.time``), for times shared between processes; under a fake
clock its time, as for `now`.  Rebound by `use_clock()` (read it as ``clock.wall()``)."""

_fake: FakeClock | None = None


class FakeClock:
    """A clock that moves only when told to: `advance()` or `set()`.

    Sleeps of the execution layer advance it by the sleep's length, so code
    under test runs instantly while its time accounting stays exact.
    """

    __slots__ = ("_time", "slept")

    def __init__(self, start: float = 0.0) -> None:
        self._time = float(start)
        #: Every sleep taken while installed, in order, in seconds.
        self.slept: list[float] = []

    def now(self) -> float:
        """The fake time, in seconds."""
        return self._time

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (>= 0)."""
        if not seconds >= 0 or not math.isfinite(seconds):
            raise ValueError(
                f"FakeClock.advance: seconds must be finite and >= 0, got {shown(seconds)}"
            )
        self._time += seconds

    def set(self, when: float) -> None:
        """Jump to ``when``; time never goes backwards."""
        if when < self._time:
            raise ValueError(f"FakeClock.set: time cannot go back from {self._time} to {when}")
        self._time = float(when)

    def sleep(self, seconds: float) -> None:
        """What a sleep does under this clock: record it and advance."""
        self.slept.append(seconds)
        self.advance(seconds)


def use_clock(fake: FakeClock | None) -> None:
    """Install ``fake`` as the library's clock, or go back to real time with ``None``."""
    global now, wall, _fake
    _fake = fake
    now = time.monotonic if fake is None else fake.now
    wall = time.time if fake is None else fake.now


def current_fake() -> FakeClock | None:
    """The installed fake clock, if any."""
    return _fake
