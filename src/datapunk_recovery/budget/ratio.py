"""Finagle's and the SRE book's retry budget: retries at most a ratio of requests over a window.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from .._core import clock
from .._core.events import EventBus
from .._core.validate import check_count, check_fraction, check_number, check_seconds, shown
from .criticality import CURRENT, Criticality
from .events import report_refused

__all__ = ["RatioBudget", "RatioBudgetConfig"]


@dataclass(frozen=True, slots=True)
class RatioBudgetConfig:
    """Retries at most ``ratio`` of requests over ``window`` seconds, plus a floor.

    Finagle's default is 20% over 10 s with a floor of 10 retries per second;
    the SRE book recommends a ratio of 10%.  The window is kept in ``buckets``
    slices, so old traffic leaves it ``window / buckets`` seconds at a time.
    ``sheddable_share`` and ``critical_share`` scale the allowance (ratio and
    floor together) for those criticalities; ``DEFAULT`` gets exactly the
    configured figures.
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0
    buckets: int = 10
    sheddable_share: float = 0.5
    critical_share: float = 1.5

    def __post_init__(self) -> None:
        owner = "RatioBudgetConfig"
        s = object.__setattr__
        s(self, "ratio", check_number(owner, "ratio", self.ratio))
        s(self, "min_per_second", check_number(owner, "min_per_second", self.min_per_second))
        s(self, "window", check_seconds(owner, "window", self.window, positive=True))
        check_count(owner, "buckets", self.buckets)
        s(self, "sheddable_share", check_fraction(owner, "sheddable_share", self.sheddable_share))
        s(
            self,
            "critical_share",
            check_number(owner, "critical_share", self.critical_share, minimum=1.0),
        )


class RatioBudget:
    """A Finagle/SRE retry budget (see `RatioBudgetConfig`); a `RetryGate`.

    ``on_attempt`` counts attempts; ``allow_retry`` counts the retries it grants.
    Requests are the attempts that were not granted retries, so a retry does
    not earn more retries.  A retry is allowed while the retries granted in the
    window stay within ``(min_per_second * window + ratio * requests) * share``.
    O(1) per attempt, O(buckets) per retry; thread-safe.
    """

    __slots__ = (
        "_attempts",
        "_epochs",
        "_floor",
        "_lock",
        "_n",
        "_ratio",
        "_retries",
        "_shares",
        "_width",
        "bus",
        "config",
        "name",
    )

    def __init__(
        self,
        name: str = "retry-budget",
        config: RatioBudgetConfig | None = None,
        *,
        bus: EventBus | None = None,
    ) -> None:
        self.name = name
        self.config = config = config if config is not None else RatioBudgetConfig()
        if not isinstance(config, RatioBudgetConfig):
            raise TypeError(
                f"RatioBudget.config: expected a RatioBudgetConfig, got {shown(config)}"
            )
        self.bus = bus
        self._n = n = config.buckets
        self._width = config.window / n
        self._floor = config.min_per_second * config.window
        self._ratio = config.ratio
        self._shares = (config.sheddable_share, 1.0, config.critical_share)
        self._epochs = [-1] * n
        self._attempts = [0] * n
        self._retries = [0] * n
        self._lock = threading.Lock()

    def _slot(self, now: float) -> tuple[int, int]:
        """The current bucket's index (cleared if it is stale) and epoch; lock held."""
        epoch = int(now // self._width)
        i = epoch % self._n
        if self._epochs[i] != epoch:
            self._epochs[i] = epoch
            self._attempts[i] = 0
            self._retries[i] = 0
        return i, epoch

    def _totals(self, epoch: int) -> tuple[int, int]:
        """Attempts and retries inside the window ending in bucket ``epoch``; lock held."""
        oldest = epoch - self._n
        attempts = retries = 0
        for i, e in enumerate(self._epochs):
            if e > oldest:
                attempts += self._attempts[i]
                retries += self._retries[i]
        return attempts, retries

    def totals(self) -> tuple[int, int]:
        """Attempts and retries inside the window now (a shared budget's seed)."""
        with self._lock:
            _, epoch = self._slot(clock.now())
            return self._totals(epoch)

    def on_attempt(self, succeeded: bool) -> None:
        """Count one attempt; success or failure is the same to a ratio budget."""
        with self._lock:
            i, _ = self._slot(clock.now())
            self._attempts[i] += 1

    def allowance(self, level: Criticality = Criticality.DEFAULT) -> float:
        """How many retries the window allows ``level`` right now (granted ones included)."""
        with self._lock:
            _, epoch = self._slot(clock.now())
            attempts, retries = self._totals(epoch)
        return self._allowance(attempts, retries, level)

    def _allowance(self, attempts: int, retries: int, level: Criticality) -> float:
        requests = attempts - retries if attempts > retries else 0
        return (self._floor + self._ratio * requests) * self._shares[level]

    def allow_retry(self) -> bool:
        """Grant (and count) a retry if the window's allowance for this criticality has room."""
        level = CURRENT.get()
        with self._lock:
            i, epoch = self._slot(clock.now())
            attempts, retries = self._totals(epoch)
            limit = self._allowance(attempts, retries, level)
            if retries + 1 <= limit:
                self._retries[i] += 1
                return True
        report_refused(self.name, self.bus, level, float(retries), limit)
        return False

    def adopt(
        self, window: Sequence[tuple[int, int]], attempts: int = 0, retries: int = 0
    ) -> None:
        """Replace the window with a shared one, then count what it has not seen yet.

        For a shared budget's link (``budget/shared.py``): ``window[k]`` holds
        the ``(attempts, retries)`` of the bucket ``k`` slices old (``0`` is
        the current one; at most ``buckets`` items are used); the unseen
        ``attempts`` and ``retries`` go to the current bucket.
        """
        n = self._n
        with self._lock:
            now = clock.now()
            epoch = int(now // self._width)
            self._epochs = [-1] * n
            self._attempts = [0] * n
            self._retries = [0] * n
            for age, (a, r) in enumerate(window[:n]):
                e = epoch - age
                i = e % n
                self._epochs[i] = e
                self._attempts[i] = a
                self._retries[i] = r
            i, _ = self._slot(now)
            self._attempts[i] += attempts
            self._retries[i] += retries

    def reconfigure(self, config: RatioBudgetConfig) -> None:
        """Take ``config`` while calls run, keeping the window's counts.

        This is how a hot reload changes a ratio budget: the attempts and
        retries already counted stay, so a reload during a storm does not hand
        out a fresh allowance.  With the same ``window`` and ``buckets`` every
        bucket is kept as it is.  With another shape each old bucket's counts
        move to the new bucket holding the old bucket's end (its newest
        moment, capped at now), so the current bucket stays current; buckets
        older than the new ``window`` are dropped (the new window does not
        cover them).  Ratio, floor and shares are the new ones from the next
        decision on.
        """
        if not isinstance(config, RatioBudgetConfig):
            raise TypeError(
                f"RatioBudget.reconfigure: expected a RatioBudgetConfig, got {shown(config)}"
            )
        n, width = config.buckets, config.window / config.buckets
        with self._lock:
            now = clock.now()
            kept = [
                (e, self._attempts[i], self._retries[i])
                for i, e in enumerate(self._epochs)
                if e >= 0 and e > int(now // self._width) - self._n
            ]
            old_width = self._width
            self.config = config
            self._n, self._width = n, width
            self._floor = config.min_per_second * config.window
            self._ratio = config.ratio
            self._shares = (config.sheddable_share, 1.0, config.critical_share)
            self._epochs = [-1] * n
            self._attempts = [0] * n
            self._retries = [0] * n
            current = int(now // width)
            for e, a, r in kept:
                end = min((e + 1) * old_width, now)
                epoch = min(int(end // width), current)
                if epoch <= current - n:
                    continue  # older than the new window
                i = epoch % n
                if self._epochs[i] != epoch:
                    self._epochs[i], self._attempts[i], self._retries[i] = epoch, 0, 0
                self._attempts[i] += a
                self._retries[i] += r

    def reset(self) -> None:
        """Forget the window (between tests, or after a deploy)."""
        with self._lock:
            self._epochs = [-1] * self._n
            self._attempts = [0] * self._n
            self._retries = [0] * self._n
