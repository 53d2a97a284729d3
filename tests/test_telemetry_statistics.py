"""Statistics for every operation at once, fed by events: no metrics system needed."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from datapunk_recovery import RetryConfig, retry
from datapunk_recovery._core.errors import CircuitOpenError
from datapunk_recovery.breaker import BreakerConfig, CircuitBreaker
from datapunk_recovery.telemetry import OperationSnapshot, StatisticsCollector
from datapunk_recovery.testing import FakeClock, fake_clock, instant_retries


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with instant_retries(), fake_clock() as fake:
        yield fake


def test_numbers_match_the_functions_own_statistics(clock: FakeClock) -> None:
    plan = [(0.1, ConnectionError), (0.2, None), (0.3, TimeoutError), (0.4, ValueError)]

    @retry(RetryConfig(max_attempts=3), name="fetch")
    def fetch() -> None:
        seconds, error = plan.pop(0)
        clock.advance(seconds)
        if error is not None:
            raise error()

    with StatisticsCollector().install() as collector:
        fetch()
        with pytest.raises(ValueError):
            fetch()
    snapshot = collector.snapshot("fetch")
    own = fetch.statistics()
    assert (snapshot.calls, snapshot.successes, snapshot.failures) == (
        own.calls,
        own.successes,
        own.failures,
    )
    assert (snapshot.attempts, snapshot.retries) == (own.attempts, own.retries)
    assert snapshot.giveups == {"non_retryable": 1}
    assert snapshot.attempt_seconds == pytest.approx(1.0)
    assert snapshot.events == {
        "retry.attempt": 4,
        "retry.scheduled": 2,
        "retry.call": 2,
        "retry.gave_up": 1,
    }


def test_every_area_is_counted_by_event_name(clock: FakeClock) -> None:
    breaker = CircuitBreaker("search", BreakerConfig(consecutive_failures=1))
    with StatisticsCollector().install() as collector:
        with pytest.raises(ConnectionError):
            breaker.call(_fail)
        with pytest.raises(CircuitOpenError):
            breaker.call(_fail)
    events = collector.statistics()["search"].events
    assert events["breaker.state"] == 1
    assert events["breaker.rejected"] == 1


def _fail() -> None:
    raise ConnectionError("down")


def test_an_unknown_operation_reads_as_zero() -> None:
    assert StatisticsCollector().snapshot("nothing") == OperationSnapshot("nothing")


def test_exact_under_threads(clock: FakeClock) -> None:
    @retry(name="hot")
    def hot() -> None:
        return None

    collector = StatisticsCollector().install()
    try:
        threads = [threading.Thread(target=lambda: [hot() for _ in range(2_000)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        collector.close()
    assert collector.snapshot("hot").calls == 8_000
    collector.reset()
    assert collector.statistics() == {}


def test_a_first_try_success_counts_its_attempt_and_its_time(clock: FakeClock) -> None:
    @retry(name="quick")
    def quick() -> None:
        clock.advance(0.25)

    with StatisticsCollector().install() as collector:
        quick()
    snapshot = collector.snapshot("quick")
    assert (snapshot.calls, snapshot.attempts, snapshot.attempt_seconds) == (1, 1, 0.25)
    assert snapshot.attempts == quick.statistics().attempts
