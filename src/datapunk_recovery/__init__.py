"""datapunk-recovery: calls between services that recover from failure.

The everyday API is re-exported here: retries and their configuration, the
circuit breaker, the flow-control primitives and the pipeline that composes
them, the error taxonomy and the event model.  The four recoveries live in
their own packages (``datapunk_recovery.cache``, ``.database``,
``.network``, ``.resource``), as do ``.telemetry``, ``.chaos`` and
``.simulate``; the front door,
[`RecoveryStrategies`][datapunk_recovery.strategies.RecoveryStrategies], and its
configuration loader are loaded on first use because they pull in the
recoveries.
"""

from typing import TYPE_CHECKING, Any

from . import _compat
from ._core.backoff import Jitter, RetryConfig, ServerDelay, server_delay
from ._core.errors import (
    BudgetExhausted,
    CircuitOpenError,
    Classification,
    DeadlineExceeded,
    ErrorCategory,
    OverloadedError,
    RecoveryError,
    RetryExhausted,
    classify,
    final_reason,
    is_fatal,
    mark_final,
    register_rule,
    unregister_rule,
)
from ._core.events import (
    AttemptFinished,
    CallFinished,
    Event,
    EventBus,
    GaveUp,
    GiveUpReason,
    HintIgnored,
    RetryScheduled,
    subscribe,
)
from ._core.policy import RetryPolicy
from ._core.stats import Statistics
from ._execution.attempts import AttemptContext, Retrying, retrying
from ._execution.deadline import deadline, remaining
from ._execution.engine import Retried, current_attempt, retry
from ._execution.timeout import AttemptTimedOut, AttemptTimeout
from .breaker import BreakerConfig, BreakerSnapshot, BreakerState, CircuitBreaker, Permit
from .breaker.registry import BreakerRegistry
from .budget import (
    Criticality,
    RatioBudget,
    RatioBudgetConfig,
    RetryGate,
    TokenBudget,
    TokenBudgetConfig,
    criticality,
)
from .flow.adaptive import AIMD, AdaptiveLimiter, Gradient
from .flow.bulkhead import Bulkhead, BulkheadConfig, BulkheadFull, CallerQuotaExceeded, as_caller
from .flow.fallback import Fallback
from .flow.hedging import HedgeConfig, Hedger, idempotent
from .flow.pipeline import Pipeline
from .flow.ratelimit import RateLimiter, RateLimiterConfig, RateLimitExceeded

if TYPE_CHECKING:
    from .config import RecoveryConfig, load_config
    from .strategies import RecoveryStrategies

__version__ = "0.2.0"

# The old paths of 0.2.0 (datapunk_recovery.bulkhead, ...) still import.
_compat.install()

# Loaded on first use: the facade imports every recovery package.
_LAZY = {
    "RecoveryStrategies": "strategies",
    "RecoveryConfig": "config",
    "load_config": "config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        moved = _compat.module(name)  # an old path: datapunk_recovery.errors, as in 0.2.0
        if moved is not None:
            return moved
        raise AttributeError(f"module 'datapunk_recovery' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"datapunk_recovery.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "AIMD",
    "AdaptiveLimiter",
    "AttemptContext",
    "AttemptFinished",
    "AttemptTimedOut",
    "AttemptTimeout",
    "BreakerConfig",
    "BreakerRegistry",
    "BreakerSnapshot",
    "BreakerState",
    "BudgetExhausted",
    "Bulkhead",
    "BulkheadConfig",
    "BulkheadFull",
    "CallFinished",
    "CallerQuotaExceeded",
    "CircuitBreaker",
    "CircuitOpenError",
    "Classification",
    "Criticality",
    "DeadlineExceeded",
    "ErrorCategory",
    "Event",
    "EventBus",
    "Fallback",
    "GaveUp",
    "GiveUpReason",
    "Gradient",
    "HedgeConfig",
    "Hedger",
    "HintIgnored",
    "Jitter",
    "OverloadedError",
    "Permit",
    "Pipeline",
    "RateLimitExceeded",
    "RateLimiter",
    "RateLimiterConfig",
    "RatioBudget",
    "RatioBudgetConfig",
    "RecoveryConfig",
    "RecoveryError",
    "RecoveryStrategies",
    "Retried",
    "RetryConfig",
    "RetryExhausted",
    "RetryGate",
    "RetryPolicy",
    "RetryScheduled",
    "Retrying",
    "ServerDelay",
    "Statistics",
    "TokenBudget",
    "TokenBudgetConfig",
    "__version__",
    "as_caller",
    "classify",
    "criticality",
    "current_attempt",
    "deadline",
    "final_reason",
    "idempotent",
    "is_fatal",
    "load_config",
    "mark_final",
    "register_rule",
    "remaining",
    "retry",
    "retrying",
    "server_delay",
    "subscribe",
    "unregister_rule",
]
