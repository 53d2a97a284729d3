"""Resource recovery: cleanup after partial failure, tracking, pools, batches, inference.

- [`cleanup`][datapunk_recovery.resource.cleanup]: compensations run in reverse order on failure,
  every one of
  them, errors grouped with the original; shielded and bounded on cancellation.
- [`tracking`][datapunk_recovery.resource.tracking]: every acquired resource known until released;
  leaks
  (never released, released twice) reported with where they were acquired.
- [`pool`][datapunk_recovery.resource.pool]: a limited pool per resource kind with bulkhead
  admission,
  per-caller quotas, a bounded wait and allocation retries; metrics as events.
- [`batch`][datapunk_recovery.resource.batch]: retry only the items of a batch that failed; report
  per item.
- [`inference`][datapunk_recovery.resource.inference]: out-of-memory means smaller batches, then an
  alternative model.
"""

from __future__ import annotations

from .batch import (
    BatchFailed,
    BatchFinished,
    BatchReport,
    BatchRound,
    ItemOutcome,
    recover_batch,
    recover_batch_sync,
)
from .cleanup import (
    CleanupConfig,
    CleanupFailed,
    CleanupFinished,
    CompensationRan,
    Compensations,
    CompensationTimeout,
)
from .errors import AllocationTimeout, PoolFull, QuotaExceeded
from .inference import (
    DEFAULT_OOM_TYPES,
    InferenceConfig,
    InferenceFallback,
    InferenceFinished,
    InferenceRecovery,
    InferenceResult,
    InferenceSplit,
    is_out_of_memory,
)
from .pool import Lease, PoolAcquisition, PoolConfig, PoolStats, PoolUsage, ResourcePool
from .tracking import LeakKind, LeakReport, ResourceLeaked, ResourceTracker, TrackedResource

__all__ = [
    "DEFAULT_OOM_TYPES",
    "AllocationTimeout",
    "BatchFailed",
    "BatchFinished",
    "BatchReport",
    "BatchRound",
    "CleanupConfig",
    "CleanupFailed",
    "CleanupFinished",
    "CompensationRan",
    "CompensationTimeout",
    "Compensations",
    "InferenceConfig",
    "InferenceFallback",
    "InferenceFinished",
    "InferenceRecovery",
    "InferenceResult",
    "InferenceSplit",
    "ItemOutcome",
    "Lease",
    "LeakKind",
    "LeakReport",
    "PoolAcquisition",
    "PoolConfig",
    "PoolFull",
    "PoolStats",
    "PoolUsage",
    "QuotaExceeded",
    "ResourceLeaked",
    "ResourcePool",
    "ResourceTracker",
    "TrackedResource",
    "is_out_of_memory",
    "recover_batch",
    "recover_batch_sync",
]
