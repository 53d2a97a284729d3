"""Retry budgets: what keeps retries from multiplying the load on a failing dependency.

The retry engine talks to a budget through [`RetryGate`][datapunk_recovery.budget.RetryGate]: it
reports the
outcome of every attempt (``on_attempt``) and asks before every retry
(``allow_retry``).  Hedges draw on the same budget: a hedger asks
``allow_retry()`` before it starts an extra attempt.  One budget is shared by
every retry of a service, so that when the dependency fails for everyone the
extra load stays bounded instead of tripling.

Two budgets implement the gate:

- [`TokenBudget`][datapunk_recovery.budget.TokenBudget], gRPC's retry throttling: a bucket that
  starts full at
  ``max_tokens``, loses one token per failed attempt and gains ``token_ratio``
  per success; retries are allowed only while it holds more than
  ``threshold * max_tokens`` (half, for gRPC).
- [`RatioBudget`][datapunk_recovery.budget.RatioBudget], Finagle's and the SRE book's: over a
  sliding window
  of ``window`` seconds, retries may be at most ``ratio`` of the requests plus
  a floor of ``min_per_second`` retries per second (so that a quiet service
  can still retry).

**Criticality.** Callers say how much a call matters with
``with criticality(Criticality.SHEDDABLE): ...`` (a context variable, so it
follows threads and async tasks).  The budget reads it inside
``allow_retry``: when the budget runs short, sheddable retries are refused
first, then default ones, and critical ones last.  The configured figures
(gRPC's half, Finagle's ratio) are those of ``DEFAULT`` traffic; sheddable
traffic gets a smaller share and critical traffic a bounded larger one.

Budgets are thread-safe (one short lock per update), read time through
[`datapunk_recovery._core.clock.now()`][datapunk_recovery._core.clock.now]
(so a fake clock drives them) and
never
sleep.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from .._core import clock
from .._core.events import Event, EventBus, emit, listening

# The protocol lives with the retry policy (core), where the engine finds it;
# ``budget.RetryGate`` stays its documented path.
from .._core.policy import RetryGate
from .._core.validate import check_count, check_fraction, check_number, check_seconds, shown

__all__ = [
    "BudgetCorruptStateIgnored",
    "BudgetRefused",
    "BudgetStoreFallback",
    "BudgetStoreResumed",
    "Criticality",
    "RatioBudget",
    "RatioBudgetConfig",
    "RetryGate",
    "TokenBudget",
    "TokenBudgetConfig",
    "criticality",
    "current_criticality",
]


class Criticality(IntEnum):
    """How much a call matters; lower values are refused first when a budget is short."""

    SHEDDABLE = 0
    DEFAULT = 1
    CRITICAL = 2


_CRITICALITY: ContextVar[Criticality] = ContextVar(
    "datapunk_recovery_criticality", default=Criticality.DEFAULT
)


@contextmanager
def criticality(level: Criticality | str) -> Iterator[Criticality]:
    """Run the block with calls of criticality ``level`` (``"sheddable"`` works too).

    Nested blocks replace the outer level for their duration; the value follows
    the block into threads started with ``contextvars.copy_context`` and into
    async tasks, like a request does.
    """
    value = _parse_criticality(level)
    token = _CRITICALITY.set(value)
    try:
        yield value
    finally:
        _CRITICALITY.reset(token)


def current_criticality() -> Criticality:
    """The criticality of the calls made now (``DEFAULT`` outside any block)."""
    return _CRITICALITY.get()


def _parse_criticality(level: Criticality | str) -> Criticality:
    if isinstance(level, Criticality):
        return level
    if isinstance(level, str):
        try:
            return Criticality[level.upper()]
        except KeyError:
            pass
    names = ", ".join(c.name.lower() for c in Criticality)
    raise ValueError(f"criticality: expected one of {names}, got {shown(level)}")


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


def _refused(
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


# ---------------------------------------------------------------------------
# gRPC-style token bucket


@dataclass(frozen=True, slots=True)
class TokenBudgetConfig:
    """gRPC retry throttling (``retryThrottling`` in a gRPC service config).

    ``max_tokens`` is the bucket's size and start (gRPC allows 1 to 1000);
    every failed attempt costs one token, every success earns ``token_ratio``.
    A retry of ``DEFAULT`` criticality is allowed while the bucket holds more
    than ``threshold * max_tokens`` (gRPC: 0.5); ``sheddable_threshold``
    (higher: refused sooner) and ``critical_threshold`` (lower: refused later)
    do the same for the other levels.
    """

    max_tokens: float = 10.0
    token_ratio: float = 0.1
    threshold: float = 0.5
    sheddable_threshold: float = 0.75
    critical_threshold: float = 0.25

    def __post_init__(self) -> None:
        owner = "TokenBudgetConfig"
        s = object.__setattr__
        s(self, "max_tokens", check_number(owner, "max_tokens", self.max_tokens, minimum=1.0))
        s(self, "token_ratio", check_number(owner, "token_ratio", self.token_ratio))
        for name in ("threshold", "sheddable_threshold", "critical_threshold"):
            s(self, name, check_fraction(owner, name, getattr(self, name)))
        if not self.critical_threshold <= self.threshold <= self.sheddable_threshold:
            raise ValueError(
                f"{owner}.threshold: need critical_threshold <= threshold <= "
                f"sheddable_threshold, got {shown(self.critical_threshold)} <= {self.threshold!r} "
                f"<= {self.sheddable_threshold!r}"
            )


class TokenBudget:
    """A gRPC-style retry budget (see `TokenBudgetConfig`); a `RetryGate`.

    ``allow_retry`` spends nothing itself: the cost of a retry is paid by the
    failure that caused it, as in gRPC.  Shared by every retrying call of a
    service (and by hedges); thread-safe.
    """

    __slots__ = ("_limits", "_lock", "_max", "_ratio", "_tokens", "bus", "config", "name")

    def __init__(
        self,
        name: str = "retry-budget",
        config: TokenBudgetConfig | None = None,
        *,
        bus: EventBus | None = None,
    ) -> None:
        self.name = name
        self.config = config = config if config is not None else TokenBudgetConfig()
        if not isinstance(config, TokenBudgetConfig):
            raise TypeError(
                f"TokenBudget.config: expected a TokenBudgetConfig, got {shown(config)}"
            )
        #: Where refusals are reported (besides the global bus).
        self.bus = bus
        self._max = config.max_tokens
        self._ratio = config.token_ratio
        self._tokens = config.max_tokens
        # Indexed by Criticality: the fill a retry of that level must exceed.
        self._limits = (
            config.sheddable_threshold * self._max,
            config.threshold * self._max,
            config.critical_threshold * self._max,
        )
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        """The tokens held now (between 0 and ``max_tokens``)."""
        return self._tokens

    def on_attempt(self, succeeded: bool) -> None:
        """A success earns ``token_ratio`` tokens, a failure costs one."""
        with self._lock:
            if succeeded:
                tokens = self._tokens + self._ratio
                self._tokens = tokens if tokens < self._max else self._max
            else:
                tokens = self._tokens - 1.0
                self._tokens = tokens if tokens > 0.0 else 0.0

    def allow_retry(self) -> bool:
        """Whether the bucket holds more than the current criticality's threshold."""
        level = _CRITICALITY.get()
        limit = self._limits[level]
        tokens = self._tokens
        if tokens > limit:
            return True
        _refused(self.name, self.bus, level, tokens, limit)
        return False

    def reset(self) -> None:
        """Fill the bucket again (after a deploy, or between tests)."""
        with self._lock:
            self._tokens = self._max

    def reconfigure(self, config: TokenBudgetConfig) -> None:
        """Take ``config`` while calls run, keeping the tokens held.

        This is how a hot reload changes a budget: a reload never refills it
        (the tokens are clamped to the new ``max_tokens``, never raised), so
        a budget drained by an outage stays drained; the thresholds and the
        ratio are the new ones from the next decision on.
        """
        if not isinstance(config, TokenBudgetConfig):
            raise TypeError(
                f"TokenBudget.reconfigure: expected a TokenBudgetConfig, got {shown(config)}"
            )
        top = config.max_tokens
        with self._lock:
            self.config = config
            self._max = top
            self._ratio = config.token_ratio
            self._limits = (
                config.sheddable_threshold * top,
                config.threshold * top,
                config.critical_threshold * top,
            )
            self._tokens = min(self._tokens, top)

    def _adopt(self, tokens: float, successes: int = 0, failures: int = 0) -> None:
        """Take the fill of a shared bucket, then apply outcomes it has not seen yet.

        For shared-store links (``stores.budget_redis``): ``tokens`` is clamped
        to the bucket; the unseen outcomes are applied as their net change,
        clamped once (as the shared script applies a batch: their order is
        unknown, and successes first would be clamped away at a full bucket).
        """
        top = self._max
        tokens = min(max(tokens, 0.0), top)
        if successes or failures:
            tokens = min(max(tokens + successes * self._ratio - failures, 0.0), top)
        with self._lock:
            self._tokens = tokens


# ---------------------------------------------------------------------------
# Finagle / SRE ratio over a window


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
        level = _CRITICALITY.get()
        with self._lock:
            i, epoch = self._slot(clock.now())
            attempts, retries = self._totals(epoch)
            limit = self._allowance(attempts, retries, level)
            if retries + 1 <= limit:
                self._retries[i] += 1
                return True
        _refused(self.name, self.bus, level, float(retries), limit)
        return False

    def _adopt(
        self, window: Sequence[tuple[int, int]], attempts: int = 0, retries: int = 0
    ) -> None:
        """Replace the window with a shared one, then count what it has not seen yet.

        For shared-store links (``stores.budget_redis``): ``window[k]`` holds
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
