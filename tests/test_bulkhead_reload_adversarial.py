"""Adversarial reload drills on bulkhead quotas: a quota in force is never exceeded.

A slot taken before a reload added (or restored) a per-caller quota goes back
after it: giving it back must not free room the caller's newer slots use.
"""

from __future__ import annotations

import pytest

from datapunk_recovery.flow.bulkhead import Bulkhead, BulkheadConfig, CallerQuotaExceeded


def test_a_quota_added_by_a_reload_is_not_exceeded_when_an_older_slot_goes_back() -> None:
    bulkhead = Bulkhead("reports", BulkheadConfig(max_concurrent=10))
    bulkhead.acquire("tenant-a")  # before any quota
    bulkhead.reconfigure(BulkheadConfig(max_concurrent=10, per_caller=1))
    with pytest.raises(CallerQuotaExceeded):  # it holds one already: its whole quota
        bulkhead.acquire("tenant-a")
    bulkhead.release("tenant-a")
    bulkhead.acquire("tenant-a")  # now it may
    with pytest.raises(CallerQuotaExceeded):
        bulkhead.acquire("tenant-a")
    assert bulkhead.state().active == 1


def test_a_quota_removed_and_restored_by_reloads_still_counts_the_slots_held() -> None:
    quota = BulkheadConfig(max_concurrent=10, per_caller=2)
    bulkhead = Bulkhead("reports", quota)
    bulkhead.acquire("tenant-a")
    bulkhead.acquire("tenant-a")
    bulkhead.reconfigure(BulkheadConfig(max_concurrent=10))  # no quota for a while
    bulkhead.reconfigure(quota)  # back
    with pytest.raises(CallerQuotaExceeded):
        bulkhead.acquire("tenant-a")
    bulkhead.release("tenant-a")
    bulkhead.release("tenant-a")
    bulkhead.acquire("tenant-a")
    bulkhead.acquire("tenant-a")
    with pytest.raises(CallerQuotaExceeded):  # two held: its quota
        bulkhead.acquire("tenant-a")
    assert bulkhead.state().active == 2
