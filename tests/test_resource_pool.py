"""Resource pools: capacity, a fair bounded line, quotas, allocation retries, leaks, metrics."""

from __future__ import annotations

import gc
from collections.abc import Callable

import anyio
import pytest

from datapunk_recovery._core import errors, events
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.errors import DeadlineExceeded
from datapunk_recovery._execution.deadline import deadline
from datapunk_recovery.flow.bulkhead import BulkheadFull, as_caller
from datapunk_recovery.resource import (
    AllocationTimeout,
    LeakKind,
    Lease,
    PoolAcquisition,
    PoolConfig,
    PoolFull,
    PoolUsage,
    QuotaExceeded,
    ResourcePool,
)
from datapunk_recovery.testing import instant_retries

pytestmark = pytest.mark.anyio


async def until(predicate: Callable[[], bool], *, rounds: int = 1000) -> None:
    """Bounded polling: yield to other tasks until ``predicate`` holds."""
    for _ in range(rounds):
        if predicate():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition not reached")


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match=r"PoolConfig.capacity: must be >= 1, got 0"):
        PoolConfig(capacity=0)
    with pytest.raises(ValueError, match=r"PoolConfig.max_wait: must be >= 0"):
        PoolConfig(capacity=1, max_wait=-1)
    with pytest.raises(ValueError, match=r"PoolConfig.quotas\['a'\]: must be >= 1"):
        PoolConfig(capacity=1, quotas={"a": 0})
    config = PoolConfig(capacity=8, per_caller=2, quotas={"batch": 6})
    assert (config.quota("batch"), config.quota("web")) == (6, 2)
    assert PoolConfig(capacity=8).quota("anyone") is None  # no quota unless configured


async def test_units_are_held_and_given_back() -> None:
    pool: ResourcePool[None] = ResourcePool("gpu", PoolConfig(capacity=4))
    async with pool.acquire(3) as lease:
        assert (lease.units, lease.caller, pool.in_use) == (3, "default", 3)
    assert pool.in_use == 0
    stats = pool.stats()
    assert (stats.acquired, stats.in_use, stats.leaks) == (1, 0, 0)
    with pytest.raises(ValueError, match="units must be <= capacity"):
        pool.acquire(5)


async def test_the_line_is_first_come_first_served() -> None:
    pool: ResourcePool[None] = ResourcePool("gpu", PoolConfig(capacity=2))
    first = await pool.acquire(2)
    order: list[str] = []

    async def take(units: int, label: str) -> None:
        async with pool.acquire(units, caller=label):
            order.append(label)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, 2, "large")
        await until(lambda: pool.waiting == 1)
        tg.start_soon(take, 1, "small")
        await until(lambda: pool.waiting == 2)
        await first.release()
    # The small request fitted earlier but waited its turn: the large one is not starved.
    assert order == ["large", "small"]
    assert pool.in_use == 0


async def test_a_bounded_wait_ends_in_allocation_timeout() -> None:
    pool: ResourcePool[None] = ResourcePool("gpu", PoolConfig(capacity=1, max_wait=0.02))
    async with pool.acquire():
        with pytest.raises(AllocationTimeout, match=r"no 1 unit\(s\) free within 0.02 s"):
            await pool.acquire()
    assert (pool.stats().timeouts, pool.waiting) == (1, 0)
    # A saturated pool is a bulkhead rejection: no layer retries it.
    assert errors.final_reason(AllocationTimeout("gpu", "max_wait", "")) is not None


async def test_the_overall_deadline_bounds_the_wait() -> None:
    pool: ResourcePool[None] = ResourcePool("gpu", PoolConfig(capacity=1, max_wait=60))
    async with pool.acquire():
        with deadline(0.02), pytest.raises(DeadlineExceeded, match="while waiting"):
            await pool.acquire()
    assert pool.stats().timeouts == 0


async def test_a_full_line_rejects_at_once() -> None:
    pool: ResourcePool[None] = ResourcePool("workers", PoolConfig(capacity=1, max_waiting=0))
    async with pool.acquire():
        with pytest.raises(PoolFull, match=r"max_waiting=0"):
            await pool.acquire()
    assert pool.stats().rejected == 1
    assert isinstance(PoolFull("gpu", "queue_full", ""), BulkheadFull)


async def test_a_caller_cannot_take_more_than_its_quota() -> None:
    pool: ResourcePool[None] = ResourcePool(
        "gpu", PoolConfig(capacity=8, per_caller=2, quotas={"batch": 5})
    )
    async with pool.acquire(2, caller="web"):
        with pytest.raises(QuotaExceeded, match="'web' holds or waits for 2 unit"):
            await pool.acquire(1, caller="web")
        with as_caller("batch"):  # the caller may come from the context
            async with pool.acquire(5) as lease:
                assert (lease.caller, pool.in_use) == ("batch", 7)
    assert pool.stats().quota_refused == 1


async def test_a_failing_allocation_is_retried_then_gives_the_units_back() -> None:
    calls: list[int] = []

    def allocate(units: int) -> str:
        calls.append(units)
        if len(calls) < 3:
            raise ConnectionResetError("device busy")
        return f"context-{units}"

    released: list[str] = []
    pool = ResourcePool("gpu", PoolConfig(capacity=2), allocate=allocate, release=released.append)
    with instant_retries():
        async with pool.acquire(2) as lease:
            assert lease.resource == "context-2"
    assert calls == [2, 2, 2]
    assert released == ["context-2"]

    async def never(units: int) -> str:
        raise ConnectionRefusedError("no device")

    broken: ResourcePool[str] = ResourcePool("gpu", PoolConfig(capacity=2), allocate=never)
    with instant_retries(), pytest.raises(ConnectionRefusedError):
        await broken.acquire(2)
    stats = broken.stats()
    assert (stats.in_use, stats.failures, stats.acquired) == (0, 1, 0)


async def test_a_double_release_is_a_reported_leak_and_frees_nothing() -> None:
    pool: ResourcePool[None] = ResourcePool("file", PoolConfig(capacity=2))
    lease = await pool.acquire(1)
    other = await pool.acquire(1)
    assert await lease.release() is True
    assert await lease.release() is False
    assert pool.in_use == 1  # the other lease still holds its unit
    [leak] = pool.tracker.leaks()
    assert leak.problem is LeakKind.RELEASED_TWICE
    await other.release()


async def test_a_lease_collected_unreleased_is_reported_and_its_units_come_back() -> None:
    pool: ResourcePool[None] = ResourcePool("gpu", PoolConfig(capacity=2))

    async def forget() -> None:
        lease: Lease[None] = await pool.acquire(2)
        assert lease.units == 2

    await forget()
    gc.collect()
    assert pool.in_use == 0
    gc.collect()  # the tracked handle goes once the pool took the units back
    assert [leak.problem for leak in pool.tracker.leaks()] == [LeakKind.NEVER_RELEASED]
    assert pool.stats().leaks == 1


async def test_cancelled_waiters_leave_the_line_without_taking_units() -> None:
    pool: ResourcePool[None] = ResourcePool("gpu", PoolConfig(capacity=1, per_caller=1))
    held = await pool.acquire(1, caller="a")
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool._acquire, 1, "b")
            await until(lambda: pool.waiting == 1)
            scope.cancel()
    assert (pool.waiting, pool.in_use) == (0, 1)
    await held.release()
    async with pool.acquire(1, caller="b"):  # b's quota was handed back too
        assert pool.in_use == 1
    stats = pool.stats()
    assert (stats.failures, stats.timeouts) == (0, 0)  # a cancellation is not a failure


async def test_cancellation_during_allocation_gives_the_units_back() -> None:
    started = anyio.Event()

    async def allocate(units: int) -> str:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    pool: ResourcePool[str] = ResourcePool("gpu", PoolConfig(capacity=1), allocate=allocate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool._acquire, 1, "a")
        await started.wait()
        tg.cancel_scope.cancel()
    assert pool.in_use == 0
    assert pool.stats().failures == 0


async def test_metrics_are_events_per_kind() -> None:
    seen: list[events.Event] = []
    bus = events.EventBus()
    bus.subscribe(seen.append)
    pool: ResourcePool[None] = ResourcePool("gpu", PoolConfig(capacity=1, max_wait=0.01), bus=bus)
    async with pool.acquire(caller="web"):
        with pytest.raises(AllocationTimeout):
            await pool.acquire(caller="batch")
    outcomes = [(e.caller, e.outcome) for e in seen if isinstance(e, PoolAcquisition)]
    assert outcomes == [("web", "acquired"), ("batch", "timeout")]
    waited = [e.waited for e in seen if isinstance(e, PoolAcquisition)]
    assert waited[1] >= 0.01 - 1e-3  # the acquisition time is reported, in seconds
    usage = [(e.in_use, e.waiting) for e in seen if isinstance(e, PoolUsage)]
    assert usage[0] == (1, 0) and (1, 1) in usage and usage[-1] == (0, 0)
    assert all(e.operation == "gpu" for e in seen)


async def test_allocation_retry_settings_come_from_the_config() -> None:
    attempts: list[int] = []

    def allocate(units: int) -> None:
        attempts.append(units)
        raise ConnectionResetError

    config = PoolConfig(capacity=1, allocation_retry=RetryConfig(max_attempts=5, base_delay=0))
    pool: ResourcePool[None] = ResourcePool("slot", config, allocate=allocate)
    with pytest.raises(ConnectionResetError):
        await pool.acquire()
    assert len(attempts) == 5
