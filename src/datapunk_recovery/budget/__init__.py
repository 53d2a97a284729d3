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

The package holds one concept per file: ``criticality``, ``events``, ``token``,
``ratio``, and ``shared`` (a budget shared through a Redis store).
"""

from __future__ import annotations

# The protocol lives with the retry policy (core), where the engine finds it;
# ``budget.RetryGate`` stays its documented path.
from .._core.policy import RetryGate
from .criticality import Criticality, criticality, current_criticality
from .events import (
    BudgetCorruptStateIgnored,
    BudgetRefused,
    BudgetStoreFallback,
    BudgetStoreResumed,
)
from .ratio import RatioBudget, RatioBudgetConfig
from .token import TokenBudget, TokenBudgetConfig

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
