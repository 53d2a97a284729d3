"""datapunk-recovery: calls between services that recover from failure.

The public API is re-exported here; the modules behind it are small and each
has one job (``backoff``, ``retry``, ``errors``, ``events``, ...).
"""

from .backoff import Jitter, RetryConfig, ServerDelay, server_delay
from .budget import RetryGate
from .deadline import deadline, remaining
from .engine import AttemptContext, Retried, Retrying, current_attempt, retry, retrying
from .errors import (
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
from .events import (
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
from .policy import RetryPolicy
from .stats import Statistics

__version__ = "0.1.0"

__all__ = [
    "AttemptContext",
    "AttemptFinished",
    "BudgetExhausted",
    "CallFinished",
    "CircuitOpenError",
    "Classification",
    "DeadlineExceeded",
    "ErrorCategory",
    "Event",
    "EventBus",
    "GaveUp",
    "GiveUpReason",
    "HintIgnored",
    "Jitter",
    "OverloadedError",
    "RecoveryError",
    "Retried",
    "RetryConfig",
    "RetryExhausted",
    "RetryGate",
    "RetryPolicy",
    "RetryScheduled",
    "Retrying",
    "ServerDelay",
    "Statistics",
    "__version__",
    "classify",
    "current_attempt",
    "deadline",
    "final_reason",
    "is_fatal",
    "mark_final",
    "register_rule",
    "remaining",
    "retry",
    "retrying",
    "server_delay",
    "subscribe",
    "unregister_rule",
]
