"""Adaptive concurrency: AIMD and Gradient find a dependency's capacity and follow it."""

from __future__ import annotations

import heapq
import threading

import anyio
import pytest

from datapunk_recovery._core import events
from datapunk_recovery._core.errors import OverloadedError
from datapunk_recovery.flow.adaptive import AIMD, AdaptiveLimiter, Gradient, LimitChanged
from datapunk_recovery.flow.bulkhead import BulkheadFull, BulkheadState, SlotPool


class Dependency:
    """A test dependency with a capacity that the test changes.

    ``overload="drop"``: calls beyond the capacity are rejected (AIMD's signal);
    ``overload="queue"``: they queue, so latency grows with the load (Gradient's).
    """

    def __init__(self, capacity: int, overload: str, base: float = 0.010) -> None:
        self.capacity = capacity
        self.overload = overload
        self.base = base

    def outcome(self, inflight: int) -> tuple[float, bool]:
        """Latency (s) and whether the call is dropped, for a call started at ``inflight``."""
        if self.overload == "drop":
            return self.base, inflight > self.capacity
        return self.base * max(1.0, inflight / self.capacity), False


def drive(limiter: AdaptiveLimiter, dependency: Dependency, calls: int) -> list[int]:
    """Closed-loop load on a simulated clock: demand always exceeds the limit.

    Fills the limiter up, completes the earliest call, and repeats; returns the
    limit seen after each completion.
    """
    now = 0.0
    running: list[tuple[float, int, object, bool]] = []
    seq = 0
    limits = []
    for _ in range(calls):
        while True:
            try:
                permit = limiter.acquire()
            except BulkheadFull:
                break
            rtt, dropped = dependency.outcome(limiter.state().active)
            seq += 1
            heapq.heappush(running, (now + rtt, seq, (permit, rtt), dropped))
        done_at, _, (permit, rtt), dropped = heapq.heappop(running)  # type: ignore[misc]
        now = done_at
        if dropped:
            permit.dropped(rtt)
        else:
            permit.success(rtt)
        limits.append(limiter.limit)
    for _, _, (permit, _), _ in running:  # type: ignore[misc]
        permit.ignore()
    return limits


def settled(limits: list[int]) -> float:
    """The average limit over the last quarter of a run."""
    tail = limits[-len(limits) // 4 :]
    return sum(tail) / len(tail)


def test_algorithms_are_validated() -> None:
    with pytest.raises(ValueError, match=r"AIMD.initial: must be within \[min_limit, max_limit\]"):
        AIMD(initial=5, min_limit=10)
    with pytest.raises(ValueError, match=r"AIMD.backoff_ratio: must be between 0 \(exclusive\)"):
        AIMD(backoff_ratio=0.0)
    with pytest.raises(ValueError, match=r"Gradient.tolerance: must be >= 1"):
        Gradient(tolerance=0.5)
    with pytest.raises(TypeError, match=r"AdaptiveLimiter.algorithm"):
        AdaptiveLimiter("x", algorithm="aimd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"AdaptiveLimiter.max_wait: must be > 0 seconds"):
        AdaptiveLimiter("x", max_queue=3)


def test_aimd_grows_on_success_and_shrinks_on_drops() -> None:
    aimd = AIMD(initial=10, increase=1.0, backoff_ratio=0.5, timeout=1.0)
    assert aimd.update(10.0, 0.01, inflight=10, dropped=False) == 11.0
    assert aimd.update(10.0, 0.01, inflight=2, dropped=False) == 10.0  # not in use: no growth
    assert aimd.update(10.0, 0.01, inflight=10, dropped=True) == 5.0
    assert aimd.update(10.0, 2.0, inflight=10, dropped=False) == 5.0  # slower than timeout
    assert aimd.update(1.0, 0.01, inflight=1, dropped=True) == 1.0  # never below min_limit


@pytest.mark.parametrize(
    ("algorithm", "overload"),
    [
        (AIMD(initial=5, max_limit=500), "drop"),
        (Gradient(initial=5, max_limit=500), "queue"),
    ],
    ids=["aimd", "gradient"],
)
def test_the_limit_converges_follows_a_capacity_drop_and_recovers(
    algorithm: AIMD | Gradient, overload: str
) -> None:
    limiter = AdaptiveLimiter("dep", algorithm)
    dependency = Dependency(capacity=40, overload=overload)

    # Settles near the capacity: at most tolerance x capacity + a small queue.
    first = settled(drive(limiter, dependency, 4000))
    assert 20 <= first <= 100

    dependency.capacity = 8  # the dependency loses most of its capacity
    shrunk = settled(drive(limiter, dependency, 4000))
    assert 4 <= shrunk <= 20

    dependency.capacity = 40  # ...and gets it back
    recovered = settled(drive(limiter, dependency, 4000))
    assert 20 <= recovered <= 100
    assert limiter.state().active == 0


def test_limit_changes_are_events() -> None:
    limiter = AdaptiveLimiter("dep", AIMD(initial=2, backoff_ratio=0.5))
    seen: list[events.Event] = []
    limiter.bus.subscribe(seen.append)
    limiter.acquire().dropped()
    assert [(e.old, e.new) for e in seen if isinstance(e, LimitChanged)] == [(2, 1)]


def test_call_learns_drops_from_overload_errors_only() -> None:
    limiter = AdaptiveLimiter("dep", AIMD(initial=10, backoff_ratio=0.5))

    def overloaded() -> None:
        raise OverloadedError("shed")

    def bug() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        limiter.call(bug)
    assert limiter.limit == 10  # a bug says nothing about capacity
    with pytest.raises(OverloadedError):
        limiter.call(overloaded)
    assert limiter.limit == 5
    assert limiter.state() == BulkheadState(active=0, queued=0, limit=5)


def test_a_raised_limit_admits_queued_threads_at_once() -> None:
    limiter = AdaptiveLimiter("dep", AIMD(initial=1), max_queue=5, max_wait=30.0)
    held = limiter.acquire()
    admitted = threading.Event()

    def waiter() -> None:
        limiter.acquire().ignore()
        admitted.set()

    t = threading.Thread(target=waiter)
    t.start()
    for _ in range(5000):  # bounded polling: the waiter queues in well under 5 s
        if limiter.state().queued == 1:
            break
        admitted.wait(0.001)
    assert limiter.state().queued == 1
    held.success(0.001)  # inflight 1 >= limit/2: the limit grows to 2, the waiter enters
    t.join()
    assert admitted.is_set()
    assert limiter.limit == 2


def test_a_bad_latency_is_refused_and_still_frees_the_slot() -> None:
    limiter = AdaptiveLimiter("dep", AIMD(initial=2))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=r"AdaptivePermit\.rtt"):
            limiter.acquire().success(bad)
    assert limiter.limit == 2
    assert limiter.state().active == 0


def test_two_limit_changes_reach_the_pool_in_the_order_they_were_made() -> None:
    limiter = AdaptiveLimiter("dep", AIMD(initial=10, backoff_ratio=0.9))
    first, second = limiter.acquire(), limiter.acquire()
    second_done = threading.Event()
    calls: list[int] = []

    class SlowSlots(SlotPool):
        __slots__ = ()

        def set_limit(self, limit: int) -> None:
            calls.append(limit)
            if len(calls) == 1:
                # Give the second change every chance to overtake the first one.
                second_done.wait(0.2)
            super().set_limit(limit)

    limiter._slots.__class__ = SlowSlots

    def drop_second() -> None:
        second.dropped(0.001)
        second_done.set()

    t = threading.Thread(target=lambda: first.dropped(0.001))
    t.start()
    for _ in range(5000):  # bounded polling: until the first change is on its way
        if calls:
            break
        second_done.wait(0.001)
    other = threading.Thread(target=drop_second)
    other.start()
    t.join()
    other.join()
    assert limiter.limit == 8
    assert limiter.state().limit == 8


@pytest.mark.anyio
async def test_a_cancelled_call_frees_its_slot_and_teaches_nothing() -> None:
    limiter = AdaptiveLimiter("dep", AIMD(initial=3))

    @limiter
    async def hang() -> None:
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        scope.cancel()
        await hang()
    assert scope.cancelled_caught
    assert limiter.limit == 3
    assert limiter.state().active == 0


# -- reload (issue 14, item 1) ------------------------------------------------------


def test_reconfigure_keeps_the_learned_limit_and_the_calls_in_flight() -> None:
    limiter = AdaptiveLimiter("db", AIMD(initial=4, min_limit=1, max_limit=10))
    held = [limiter.acquire() for _ in range(4)]
    with pytest.raises(BulkheadFull):
        limiter.acquire()
    limiter.reconfigure(AIMD(initial=8, min_limit=1, max_limit=10))
    assert limiter.limit == 4  # what was learned, not the new initial
    with pytest.raises(BulkheadFull):
        limiter.acquire()
    limiter.reconfigure(AIMD(initial=2, min_limit=1, max_limit=2))  # shrinks below in use
    assert limiter.limit == 2
    for permit in held[:2]:
        permit.ignore()
    with pytest.raises(BulkheadFull):  # 2 still held: nothing admitted until below 2
        limiter.acquire()
    held[2].ignore()
    extra = limiter.acquire()
    assert limiter.state().active == 2
    extra.ignore()
    held[3].ignore()
    assert limiter.state().active == 0


def test_reconfigure_validates_like_the_constructor() -> None:
    limiter = AdaptiveLimiter("db")
    with pytest.raises(TypeError, match="expected AIMD or Gradient"):
        limiter.reconfigure("aimd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_wait: must be > 0"):
        limiter.reconfigure(AIMD(), max_queue=3)
