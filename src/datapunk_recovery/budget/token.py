"""gRPC's retry throttling: a token bucket drained by failures, refilled by successes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .._core.events import EventBus
from .._core.validate import check_fraction, check_number, shown
from .criticality import CURRENT
from .events import report_refused

__all__ = ["TokenBudget", "TokenBudgetConfig"]


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
        level = CURRENT.get()
        limit = self._limits[level]
        tokens = self._tokens
        if tokens > limit:
            return True
        report_refused(self.name, self.bus, level, tokens, limit)
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

    def adopt(self, tokens: float, successes: int = 0, failures: int = 0) -> None:
        """Take the fill of a shared bucket, then apply outcomes it has not seen yet.

        For a shared budget's link (``budget/shared.py``): ``tokens`` is clamped
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
