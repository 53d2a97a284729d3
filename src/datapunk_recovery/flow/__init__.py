"""Flow control: how many calls may run, how fast, and what answers when they cannot.

A dependency is protected not only by retrying less but by sending less: a
[`Bulkhead`][datapunk_recovery.flow.bulkhead.Bulkhead] bounds the calls in
flight (with per-caller quotas), a
[`RateLimiter`][datapunk_recovery.flow.ratelimit.RateLimiter] bounds their
rate, an [`AdaptiveLimiter`][datapunk_recovery.flow.adaptive.AdaptiveLimiter]
finds the bound from observed latency, a
[`Hedger`][datapunk_recovery.flow.hedging.Hedger] races a second attempt
against a slow first one, a [`Fallback`][datapunk_recovery.flow.fallback.Fallback]
answers when everything else refused, and a
[`Pipeline`][datapunk_recovery.flow.pipeline.Pipeline] composes them with the
breaker and the retry engine in one call path.  All of it is the execution
layer of docs/architecture.md: it waits and spawns only through
``_execution.runtime``.
"""

from .adaptive import AIMD, AdaptiveLimiter, AdaptivePermit, Gradient, LimitChanged
from .bulkhead import (
    Bulkhead,
    BulkheadAdmitted,
    BulkheadConfig,
    BulkheadFull,
    BulkheadRejected,
    BulkheadReleased,
    BulkheadState,
    CallerQuotaExceeded,
    as_caller,
    current_caller,
)
from .fallback import Fallback, FallbackReason, FallbackUsed
from .hedging import (
    HedgeConfig,
    Hedger,
    HedgeRefused,
    HedgeStarted,
    HedgeWon,
    idempotent,
    is_idempotent,
)
from .pipeline import (
    AdaptiveStage,
    BreakerLike,
    BreakerStage,
    BulkheadStage,
    DeadlineStage,
    FallbackStage,
    HedgeStage,
    LegacyStage,
    LimiterStage,
    Pipeline,
    RetryStage,
    Stage,
    StageAliases,
    StageEntered,
    TimeoutStage,
)
from .ratelimit import (
    RateLimitAdmitted,
    RateLimitDrained,
    RateLimiter,
    RateLimiterConfig,
    RateLimitExceeded,
    RateLimitRejected,
    throttled_429,
)

__all__ = [
    "AIMD",
    "AdaptiveLimiter",
    "AdaptivePermit",
    "AdaptiveStage",
    "BreakerLike",
    "BreakerStage",
    "Bulkhead",
    "BulkheadAdmitted",
    "BulkheadConfig",
    "BulkheadFull",
    "BulkheadRejected",
    "BulkheadReleased",
    "BulkheadStage",
    "BulkheadState",
    "CallerQuotaExceeded",
    "DeadlineStage",
    "Fallback",
    "FallbackReason",
    "FallbackStage",
    "FallbackUsed",
    "Gradient",
    "HedgeConfig",
    "HedgeRefused",
    "HedgeStage",
    "HedgeStarted",
    "HedgeWon",
    "Hedger",
    "LegacyStage",
    "LimitChanged",
    "LimiterStage",
    "Pipeline",
    "RateLimitAdmitted",
    "RateLimitDrained",
    "RateLimitExceeded",
    "RateLimitRejected",
    "RateLimiter",
    "RateLimiterConfig",
    "RetryStage",
    "Stage",
    "StageAliases",
    "StageEntered",
    "TimeoutStage",
    "as_caller",
    "current_caller",
    "idempotent",
    "is_idempotent",
    "throttled_429",
]
