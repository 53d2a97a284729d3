"""Retry budgets shared between processes: the promised import path.

The shared budget lives with the budgets
([`datapunk_recovery.budget.shared`][datapunk_recovery.budget.shared]); this
module keeps the path the docs promised (``stores.budget_redis.SharedBudget``
and ``bind_budget``) working.  It is the one module of ``stores/`` that names
a primitive (an exemption in the import-linter layers contract).
"""

from __future__ import annotations

from ..budget.shared import (
    BudgetCorruptStateIgnored,
    BudgetStoreFallback,
    BudgetStoreResumed,
    SharedBudget,
    bind_budget,
)

__all__ = [
    "BudgetCorruptStateIgnored",
    "BudgetStoreFallback",
    "BudgetStoreResumed",
    "SharedBudget",
    "bind_budget",
]
