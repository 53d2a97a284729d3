"""A small discrete-event simulation kernel on the library's fake clock.

Events are callables scheduled at a time;
[`Simulation.run()`][datapunk_recovery.simulate.kernel.Simulation.run] pops them in
time order (ties in the order they were scheduled), moves the
[`FakeClock`][datapunk_recovery._core.clock.FakeClock] to each event's time and runs it.
While it runs, that fake clock is the library's clock, so the real breaker
and budget (which read [`datapunk_recovery._core.clock.now()`][datapunk_recovery._core.clock.now])
see simulated
time.  One seeded `random.Random` draws every random number, so a run
is a pure function of its seed: no thread, no wall clock, no sleep.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .._core import clock
from .._core.clock import FakeClock

__all__ = ["Simulation", "network_delay"]

Action = Callable[[], None]


class Simulation:
    """An event queue, a fake clock and a seeded random generator.

    Times are seconds of simulated time from 0.  A text seed (such as
    ``"contention:0:50:3"``) names a run; text seeds are hashed the same way
    in every process, so a run is reproducible anywhere.
    """

    __slots__ = ("_queue", "_seq", "clock", "rng")

    def __init__(self, seed: int | str) -> None:
        self.clock = FakeClock()
        self.rng = random.Random(seed)
        self._queue: list[tuple[float, int, Action]] = []
        self._seq = itertools.count()

    @property
    def now(self) -> float:
        """The simulated time, in seconds."""
        return self.clock.now()

    def at(self, when: float, action: Action) -> None:
        """Run ``action`` at simulated time ``when`` (not before now)."""
        if when < self.clock.now():
            raise ValueError(f"Simulation.at: {when!r} is in the past (now {self.clock.now()!r})")
        heapq.heappush(self._queue, (when, next(self._seq), action))

    def after(self, delay: float, action: Action) -> None:
        """Run ``action`` ``delay`` seconds from now."""
        self.at(self.clock.now() + delay, action)

    def run(self, until: float | None = None) -> float:
        """Run events until none is left (or the next is after ``until``); returns the time.

        The fake clock is the library's clock for the duration of the run only.
        """
        queue = self._queue
        pop = heapq.heappop
        fake = self.clock
        with _installed(fake):
            while queue:
                when = queue[0][0]
                if until is not None and when > until:
                    fake.set(until)
                    break
                _, _, action = pop(queue)
                fake.set(when)
                action()
        return fake.now()


@contextmanager
def _installed(fake: FakeClock) -> Iterator[None]:
    previous = clock.current_fake()
    clock.use_clock(fake)
    try:
        yield
    finally:
        clock.use_clock(previous)


def network_delay(rng: random.Random, mean: float = 0.010, sd: float = 0.002) -> float:
    """One one-way message time, ``|Normal(mean, sd)|`` seconds (the AWS benchmark's network)."""
    return abs(rng.normalvariate(mean, sd))
