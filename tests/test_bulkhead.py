"""Bulkheads: at most N at once, bounded queue and wait, per-caller quotas, sync and async."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import pytest

from datapunk_recovery._core import errors, events
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.errors import DeadlineExceeded
from datapunk_recovery._execution.deadline import deadline
from datapunk_recovery._execution.engine import retry
from datapunk_recovery.flow.bulkhead import (
    Bulkhead,
    BulkheadAdmitted,
    BulkheadConfig,
    BulkheadFull,
    BulkheadRejected,
    BulkheadState,
    CallerQuotaExceeded,
    as_caller,
    current_caller,
)
from datapunk_recovery.testing import fake_clock


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Bounded polling for a fact another thread makes true."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.001)


async def wait_until_async(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - bounded polling on another task's progress
            await anyio.sleep(0.001)


class Peak:
    """Counts calls inside the bulkhead and remembers the most seen at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.done = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self._lock:
            self.now -= 1
            self.done += 1


# ---------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_concurrent": 0}, r"BulkheadConfig.max_concurrent: must be >= 1, got 0"),
        ({"max_queue": -1}, r"BulkheadConfig.max_queue: must be >= 0"),
        ({"max_queue": 5}, r"BulkheadConfig.max_wait: must be > 0 seconds when max_queue > 0"),
        ({"max_wait": -1.0}, r"BulkheadConfig.max_wait: must be >= 0"),
        ({"per_caller": 0}, r"BulkheadConfig.per_caller: must be >= 1"),
    ],
)
def test_config_is_validated(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BulkheadConfig(**changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# sync (threads)


def test_a_full_bulkhead_without_queue_rejects_at_once() -> None:
    bulkhead = Bulkhead("db", BulkheadConfig(max_concurrent=2))
    seen: list[events.Event] = []
    bulkhead.bus.subscribe(seen.append)
    bulkhead.acquire()
    bulkhead.acquire()
    with pytest.raises(BulkheadFull, match="bulkhead 'db' refused the call: all 2 slots") as info:
        bulkhead.acquire()
    assert info.value.reason == "full"
    assert bulkhead.state() == BulkheadState(active=2, queued=0, limit=2)
    bulkhead.release()
    bulkhead.acquire()  # a slot is free again
    rejected = [e for e in seen if isinstance(e, BulkheadRejected)]
    assert [(e.reason, e.active, e.queued) for e in rejected] == [("full", 2, 0)]
    assert sum(isinstance(e, BulkheadAdmitted) for e in seen) == 3


def test_a_rejection_is_never_retried_by_an_outer_layer() -> None:
    bulkhead = Bulkhead("db", BulkheadConfig(max_concurrent=1))
    bulkhead.acquire()
    attempts = 0

    @retry(RetryConfig(max_attempts=5, base_delay=0.0), on=BulkheadFull)
    def call() -> None:
        nonlocal attempts
        attempts += 1
        bulkhead.call(lambda: None)

    with pytest.raises(BulkheadFull):
        call()
    assert attempts == 1
    assert errors.final_reason(BulkheadFull("b", "full", "x")) == "BulkheadFull"


def test_threads_never_exceed_the_limit_and_queue_in_order() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=3, max_queue=20, max_wait=30.0))
    peak, gate, order = Peak(), threading.Event(), []

    def work(i: int) -> None:
        with bulkhead.slot():
            peak.enter()
            order.append(i)
            gate.wait(30.0)
            peak.leave()

    threads = []
    for i in range(12):
        t = threading.Thread(target=work, args=(i,))
        t.start()
        threads.append(t)
        wait_until(lambda i=i: bulkhead.state().active + bulkhead.state().queued == i + 1)
    assert bulkhead.state() == BulkheadState(active=3, queued=9, limit=3)
    assert peak.peak == 3
    gate.set()
    for t in threads:
        t.join()
    assert peak.peak == 3
    assert peak.done == 12
    assert sorted(order) == list(range(12))
    assert order[:3] == [0, 1, 2]
    assert bulkhead.state() == BulkheadState(active=0, queued=0, limit=3)


def test_a_freed_slot_goes_to_the_longest_waiting_call() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=1, max_queue=10, max_wait=30.0))
    order: list[int] = []
    gate = threading.Event()

    def work(i: int) -> None:
        with bulkhead.slot():
            order.append(i)
            gate.wait(30.0)

    threads = []
    for i in range(6):
        t = threading.Thread(target=work, args=(i,))
        t.start()
        threads.append(t)
        wait_until(lambda i=i: bulkhead.state().active + bulkhead.state().queued == i + 1)
    gate.set()
    for t in threads:
        t.join()
    assert order == list(range(6))  # first come, first served: no barging


def test_threads_under_load_never_exceed_the_limit() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=4, max_queue=64, max_wait=30.0))
    peak = Peak()

    def hammer() -> None:
        for _ in range(300):
            with bulkhead.slot():
                peak.enter()
                peak.leave()

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak.peak <= 4
    assert peak.done == 16 * 300
    assert bulkhead.state().active == 0


def test_the_queue_is_bounded() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=1, max_queue=1, max_wait=30.0))
    gate = threading.Event()
    holder = threading.Thread(target=lambda: bulkhead.call(gate.wait, 30.0))
    holder.start()
    wait_until(lambda: bulkhead.state().active == 1)
    waiter = threading.Thread(target=lambda: bulkhead.call(lambda: None))
    waiter.start()
    wait_until(lambda: bulkhead.state().queued == 1)
    with pytest.raises(BulkheadFull, match="1 queue places are taken") as info:
        bulkhead.acquire()
    assert info.value.reason == "queue_full"
    gate.set()
    holder.join()
    waiter.join()


def test_a_queued_call_gives_up_after_max_wait() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=1, max_queue=4, max_wait=0.01))
    bulkhead.acquire()
    with pytest.raises(BulkheadFull, match=r"no slot was free within 0\.01 s") as info:
        bulkhead.acquire()
    assert info.value.reason == "max_wait"
    assert bulkhead.state() == BulkheadState(active=1, queued=0, limit=1)


def test_a_queued_call_never_waits_past_the_deadline() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=1, max_queue=4, max_wait=30.0))
    bulkhead.acquire()
    with deadline(0.01), pytest.raises(DeadlineExceeded, match="deadline passed after waiting"):
        bulkhead.acquire()
    with fake_clock() as clock, deadline(1.0):
        clock.advance(1.0)
        with pytest.raises(DeadlineExceeded, match="before a slot was free"):
            bulkhead.acquire()
    assert bulkhead.state().queued == 0


def test_per_caller_quota_keeps_one_caller_from_taking_every_slot() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=4, per_caller=2))
    bulkhead.acquire("tenant-a")
    with as_caller("tenant-a"):
        assert current_caller() == "tenant-a"
        bulkhead.acquire()
        with pytest.raises(CallerQuotaExceeded, match="caller 'tenant-a' already holds") as info:
            bulkhead.acquire()
    assert info.value.reason == "caller_quota"
    assert current_caller() is None
    bulkhead.acquire("tenant-b")  # another caller still gets in
    bulkhead.release("tenant-a")
    bulkhead.acquire("tenant-a")  # and a's quota frees with its slot
    assert bulkhead.state().active == 3


@pytest.mark.anyio
async def test_the_with_faces_count_against_the_caller_of_the_block() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=4, per_caller=1))
    with as_caller("tenant-a"):
        with bulkhead, pytest.raises(CallerQuotaExceeded):
            bulkhead.acquire()
        async with bulkhead:
            with pytest.raises(CallerQuotaExceeded):
                await bulkhead.acquire_async()
        with bulkhead:  # the quota came back with the slot
            pass
    assert bulkhead.state().active == 0
    assert bulkhead._slots._held == {}


def test_decorator_and_call_keep_results_and_errors() -> None:
    bulkhead = Bulkhead("svc")

    @bulkhead
    def double(x: int) -> int:
        return x * 2

    assert double(21) == 42
    assert double.__name__ == "double"
    with pytest.raises(KeyError):
        bulkhead.call(dict[str, int]().__getitem__, "missing")
    assert bulkhead.state().active == 0


def test_keyboard_interrupt_frees_the_slot() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=1))

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bulkhead.call(interrupted)
    assert bulkhead.state().active == 0


# ---------------------------------------------------------------------------
# async (asyncio and trio)


@pytest.mark.anyio
async def test_tasks_never_exceed_the_limit() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=3, max_queue=50, max_wait=30.0))
    peak, gate = Peak(), anyio.Event()

    async def work() -> None:
        async with bulkhead:
            peak.enter()
            await gate.wait()
            peak.leave()

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(work)
        await wait_until_async(lambda: bulkhead.state() == BulkheadState(3, 37, 3))
        gate.set()
    assert (peak.peak, peak.done) == (3, 40)
    assert bulkhead.state() == BulkheadState(0, 0, 3)


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=1, max_queue=5, max_wait=30.0))
    await bulkhead.acquire_async()
    async with anyio.create_task_group() as tg:

        async def waiter() -> None:
            async with bulkhead.slot_async():
                raise AssertionError("never admitted")

        tg.start_soon(waiter)
        await wait_until_async(lambda: bulkhead.state().queued == 1)
        tg.cancel_scope.cancel()
    assert bulkhead.state() == BulkheadState(active=1, queued=0, limit=1)
    bulkhead.release()
    assert bulkhead.state().active == 0


@pytest.mark.anyio
async def test_a_cancelled_holder_gives_its_slot_back() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=1))

    @bulkhead
    async def hang() -> None:
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        scope.cancel()
        await hang()
    assert scope.cancelled_caught
    assert bulkhead.state().active == 0


@pytest.mark.anyio
async def test_an_async_queued_call_gives_up_after_max_wait_or_deadline() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=1, max_queue=4, max_wait=0.01))
    await bulkhead.acquire_async("a")
    with pytest.raises(BulkheadFull) as info:
        await bulkhead.acquire_async("b")
    assert info.value.reason == "max_wait"
    slow = Bulkhead("slow", BulkheadConfig(max_concurrent=1, max_queue=4, max_wait=30.0))
    await slow.acquire_async()
    with deadline(0.01), pytest.raises(DeadlineExceeded):
        await slow.acquire_async()
    assert slow.state().queued == 0


@pytest.mark.anyio
async def test_a_thread_releasing_wakes_an_async_waiter() -> None:
    bulkhead = Bulkhead("svc", BulkheadConfig(max_concurrent=1, max_queue=1, max_wait=30.0))
    bulkhead.acquire()  # held by "another thread" below
    releaser = threading.Thread(
        target=lambda: (wait_until(lambda: bulkhead.state().queued == 1), bulkhead.release())
    )
    releaser.start()
    await bulkhead.acquire_async()
    releaser.join()
    assert bulkhead.state() == BulkheadState(active=1, queued=0, limit=1)
    bulkhead.release()
