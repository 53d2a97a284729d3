"""The errors of resource pools: why a caller did not get the units it asked for.

They are bulkhead rejections ([`BulkheadFull`][datapunk_recovery.flow.bulkhead.BulkheadFull],
with its ``reason``), so every layer treats a saturated pool the way it treats
a saturated bulkhead: not retryable, and no outer layer retries it either,
because retrying a call refused for local overload only adds to the overload.
``bulkhead`` names the pool's kind.
"""

from __future__ import annotations

from datapunk_recovery.flow.bulkhead import BulkheadFull, CallerQuotaExceeded

__all__ = ["AllocationTimeout", "PoolFull", "QuotaExceeded"]


class PoolFull(BulkheadFull):
    """The pool's waiting line is full: rejected at once (``reason="queue_full"``)."""


class QuotaExceeded(CallerQuotaExceeded):
    """The caller already holds or waits for its whole quota (``reason="caller_quota"``).

    Waiting would only deadlock a caller that waits for itself.
    """


class AllocationTimeout(BulkheadFull, TimeoutError):
    """No units became free within ``PoolConfig.max_wait`` seconds (``reason="max_wait"``)."""
