"""How a breaker delivers its events: after releasing its lock, in the order they happened.

The breaker's lock is a plain ``Lock``: nothing re-enters it.  What happens
under it posts its events, and they are emitted once the lock is released,
one thread at a time, so a subscriber may read, call, reset or force the
breaker it hears from (sync or async) without a deadlock, and every
subscriber sees the state changes of concurrent threads as one chain.

A deadlock would hang: the sync scenarios run in a worker thread that must
finish within a bounded wait (it takes microseconds when nothing deadlocks).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable

import pytest

from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._core.errors import CircuitOpenError
from datapunk_recovery._core.events import Event
from datapunk_recovery.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStateChanged,
    CallRejected,
    CircuitBreaker,
    ShadowTrip,
)
from datapunk_recovery.breaker.registry import BreakerRegistry
from tests.breaker_helpers import Boom, boom, fail, ok

OPEN = BreakerState.OPEN
CLOSED = BreakerState.CLOSED


def finishes(work: Callable[[], None]) -> None:
    """Run ``work`` in a worker thread; fail if it has not finished within 10 s (a deadlock)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10.0)
    assert not worker.is_alive(), "deadlock: the breaker's thread never finished"
    if errors:
        raise errors[0]


def changes(events: list[Event]) -> list[tuple[str, str, str]]:
    return [
        (e.from_state.value, e.to_state.value, e.reason)
        for e in events
        if isinstance(e, BreakerStateChanged)
    ]


class Meddler:
    """A subscriber that, on hearing its breaker open, uses it every way there is."""

    def __init__(self, b: CircuitBreaker) -> None:
        self.b = b
        self.heard: list[Event] = []
        self.saw: dict[str, object] = {}

    def __call__(self, event: Event) -> None:
        self.heard.append(event)
        if not (isinstance(event, BreakerStateChanged) and event.to_state is OPEN):
            return
        if self.saw:
            return  # once: the reset below would open nothing, but stay sure
        b = self.b
        self.saw["state"] = b.state
        self.saw["snapshot"] = b.snapshot().state
        self.saw["retry_after"] = b.retry_after() > 0
        self.saw["unless_busy"] = b.state_unless_busy()
        try:
            b.call(ok)
        except CircuitOpenError:
            self.saw["refused"] = True
        b.isolate()
        self.saw["isolated"] = b.state
        b.reset()
        self.saw["called"] = b.call(ok)


def test_a_subscriber_may_read_call_force_and_reset_the_breaker_it_hears_from(
    fake: FakeClock, seen: list[Event]
) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=2))
    meddler = Meddler(b)
    b.events.subscribe(meddler)

    finishes(lambda: fail(b, 2))

    assert meddler.saw == {
        "state": OPEN,
        "snapshot": OPEN,
        "retry_after": True,
        "unless_busy": OPEN,
        "refused": True,
        "isolated": BreakerState.FORCED_OPEN,
        "called": "ok",
    }
    # The subscriber's own doings are delivered after the event in hand (to
    # every subscriber: the global one hears the opening first too), in order.
    expected = [
        ("closed", "open", "consecutive_failures"),
        ("open", "forced_open", "isolate"),
        ("forced_open", "closed", "reset"),
    ]
    assert changes(meddler.heard) == expected
    assert changes(seen) == expected
    assert any(isinstance(e, CallRejected) for e in meddler.heard)  # its refused call
    assert b.state is CLOSED


def test_a_subscriber_may_use_the_breaker_from_a_rate_trip_and_a_time_driven_change(
    fake: FakeClock,
) -> None:
    config = BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, window_size=4, minimum_calls=4
    )
    b = CircuitBreaker("x", config)
    heard: list[tuple[str, BreakerState]] = []

    def reads_back(event: Event) -> None:
        if isinstance(event, BreakerStateChanged):
            heard.append((event.reason, b.state))

    b.events.subscribe(reads_back)

    def scenario() -> None:
        b.call(ok)
        b.call(ok)
        fail(b, 2)  # 2 of 4 failed: the rate trips
        fake.advance(60.0)
        assert b.state is BreakerState.HALF_OPEN  # time moves it, read from outside

    finishes(scenario)
    assert heard == [("failure_rate", OPEN), ("open_elapsed", BreakerState.HALF_OPEN)]


def test_a_shadow_trip_is_delivered_to_a_subscriber_that_reads_the_breaker(
    fake: FakeClock,
) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    b.metrics_only()
    heard: list[tuple[str, int]] = []
    b.events.subscribe(
        lambda e: heard.append((e.name, b.snapshot().consecutive_failures)), ShadowTrip
    )

    finishes(lambda: fail(b))
    assert heard == [("breaker.shadow_trip", 1)]


@pytest.mark.anyio
async def test_an_async_caller_s_subscriber_may_use_the_breaker_it_hears_from(
    fake: FakeClock,
) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    meddler = Meddler(b)
    b.events.subscribe(meddler)

    async def aboom() -> None:
        raise Boom()

    async def aok() -> str:
        return "ok"

    # A deadlock here hangs the event loop; pytest-timeout ends the test.
    with pytest.raises(Boom):
        await b.call_async(aboom)
    assert meddler.saw["refused"] is True
    assert meddler.saw["called"] == "ok"
    assert await b.call_async(aok) == "ok"
    assert [c[2] for c in changes(meddler.heard)] == ["consecutive_failures", "isolate", "reset"]


def test_state_changes_from_concurrent_threads_reach_subscribers_as_one_chain(
    fake: FakeClock,
) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    heard: list[BreakerStateChanged] = []
    reads: list[BreakerState] = []

    def subscriber(event: Event) -> None:
        assert isinstance(event, BreakerStateChanged)
        heard.append(event)
        reads.append(b.state)  # reading back while other threads change it

    b.events.subscribe(subscriber, BreakerStateChanged)
    start = threading.Barrier(4)

    def churn(i: int) -> None:
        start.wait()
        for n in range(150):
            with contextlib.suppress(Boom, CircuitOpenError):
                b.call(boom)  # opens a closed breaker; refused while open
            if (n + i) % 3 == 0:
                b.isolate()
            b.reset()

    def scenario() -> None:
        threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    finishes(scenario)
    assert len(heard) >= 600  # one per reset() at least
    # Each change starts where the one before it ended: no two were swapped.
    for before, after in itertools.pairwise(heard):
        assert after.from_state is before.to_state, (before, after)
    assert heard[0].from_state is CLOSED
    assert heard[-1].to_state is b.state is CLOSED
    assert len(reads) == len(heard)


def test_an_interrupting_subscriber_leaves_the_later_events_to_the_next_delivery(
    fake: FakeClock,
) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    heard: list[str] = []
    interrupt = [True]

    def subscriber(event: Event) -> None:
        assert isinstance(event, BreakerStateChanged)
        heard.append(event.reason)
        if interrupt[0]:
            interrupt[0] = False
            b.isolate()  # posted while this event is in hand
            raise KeyboardInterrupt

    b.events.subscribe(subscriber, BreakerStateChanged)
    with pytest.raises(KeyboardInterrupt):
        fail(b)
    assert heard == ["consecutive_failures"]
    assert b.state is BreakerState.FORCED_OPEN
    b.reset()  # delivers what was left first, then its own
    assert heard == ["consecutive_failures", "isolate", "reset"]


def test_state_unless_busy_reports_a_due_transition_without_applying_or_emitting_it(
    fake: FakeClock, seen: list[Event]
) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, open_duration=1.0))
    fail(b)
    fake.advance(1.0)
    before = len(seen)
    assert b.state_unless_busy() is BreakerState.HALF_OPEN
    assert len(seen) == before  # nothing applied, nothing emitted
    assert b.state is BreakerState.HALF_OPEN  # a plain read applies it
    assert changes(seen[before:]) == [("open", "half_open", "open_elapsed")]


def test_state_unless_busy_reads_a_half_open_breaker_past_its_limit_as_it_will_decide(
    fake: FakeClock,
) -> None:
    config = BreakerConfig(
        consecutive_failures=1, open_duration=1.0, half_open_permits=2, half_open_timeout=5.0
    )
    b = CircuitBreaker("x", config)
    fail(b)
    fake.advance(1.0)
    b.allow()  # a probe that never reports
    fake.advance(5.0)
    assert b.state_unless_busy() is OPEN  # no probe succeeded: it re-opens
    b.reset()
    fail(b)
    fake.advance(1.0)
    b.allow().success()
    b.allow()  # the second probe never reports
    fake.advance(5.0)
    assert b.state_unless_busy() is CLOSED  # one succeeded, first_failure: it closes
    assert b.state is CLOSED


def test_a_registry_subscriber_is_not_deadlocked_by_an_eviction_that_reads_a_due_breaker(
    fake: FakeClock,
) -> None:
    registry = BreakerRegistry(BreakerConfig(consecutive_failures=1), max_size=1)
    first = registry.get("first")
    got: list[int] = []
    # A subscriber that consults the registry whenever the breaker changes.
    first.events.subscribe(lambda e: got.append(len(registry.snapshots())), BreakerStateChanged)
    fail(first)
    fake.advance(60.0)  # its open period is over; nobody has looked yet

    finishes(lambda: registry.get("second"))  # evicting reads "first", under the lock
    assert "first" in registry  # half-open now: kept
    assert got == [1]  # only the opening was delivered; the eviction applied nothing
