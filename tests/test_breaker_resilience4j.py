"""resilience4j's documented circuit-breaker behaviours, restated against our breaker.

Each test quotes (in its own words) one statement of resilience4j's
CircuitBreaker documentation and checks that a ``BreakerConfig`` set up the
resilience4j way (``half_open_decision="rate"``, no consecutive-failure
criterion) behaves so.  Facts only: no resilience4j code was looked at or copied.

resilience4j's defaults, in our terms (:func:`r4j`): failure-rate threshold
50%, slow-call rate threshold 100% with slow meaning over 60 s, a count
window of 100 calls, minimum 100 calls, open (wait) 60 s, 10 permitted calls
in half-open, and no time limit in half-open (wait for the probes for ever).
Every test runs on a fake clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._core.errors import CircuitOpenError
from datapunk_recovery._core.events import Event
from datapunk_recovery.breaker import BreakerConfig, BreakerState, CircuitBreaker, ShadowTrip
from datapunk_recovery.testing import fake_clock


class Boom(Exception):
    pass


class Business(Exception):
    """An error of the caller's own logic: not the dependency's fault."""


class NotFound(Exception):
    pass


@pytest.fixture
def fake() -> Iterator[FakeClock]:
    with fake_clock(0.0) as clock:
        yield clock


def r4j(**overrides: Any) -> BreakerConfig:
    """resilience4j's default circuit breaker, in our configuration's terms."""
    settings: dict[str, Any] = {
        "consecutive_failures": None,
        "failure_rate_threshold": 0.5,
        "slow_call_rate_threshold": 1.0,
        "slow_call_duration": 60.0,
        "window": "count",
        "window_size": 100,
        "minimum_calls": 100,
        "open_duration": 60.0,
        "max_open_duration": 600.0,
        "half_open_permits": 10,
        "half_open_timeout": None,
        "half_open_decision": "rate",
    }
    settings.update(overrides)
    return BreakerConfig(**settings)


def run(b: CircuitBreaker, outcomes: str, duration: float = 0.1) -> None:
    """One call per letter: F failed, S succeeded (each lasting ``duration`` s)."""
    for outcome in outcomes:
        permit = b.allow()
        if outcome == "F":
            permit.failure(Boom(), duration=duration)
        else:
            permit.success(duration=duration)


# -- states ------------------------------------------------------------------------------------


def test_a_breaker_starts_closed_and_lets_calls_through(fake: FakeClock) -> None:
    # "The CircuitBreaker is implemented via a finite state machine with three
    # normal states: CLOSED, OPEN and HALF_OPEN" (and starts CLOSED).
    b = CircuitBreaker("r4j", r4j())
    assert b.state is BreakerState.CLOSED
    assert b.call(lambda: 42) == 42


# -- sliding windows ------------------------------------------------------------------------------


def test_a_count_window_aggregates_the_outcome_of_the_last_n_calls(fake: FakeClock) -> None:
    # "The count-based sliding window aggregates the outcome of the last N calls."
    b = CircuitBreaker("r4j", r4j(window_size=10, minimum_calls=10))
    run(b, "FFFF" + "S" * 10)  # the four failures have left the window
    snap = b.snapshot()
    assert (snap.calls, snap.failures) == (10, 0)
    run(b, "FFFF")
    assert b.snapshot().failures == 4
    run(b, "F")  # 5 of the last 10: 50%
    assert b.state is BreakerState.OPEN


def test_a_time_window_aggregates_the_calls_of_the_last_n_seconds(fake: FakeClock) -> None:
    # "The time-based sliding window aggregates the outcome of the calls of the
    # last N seconds", in one partial aggregation (bucket) per second.
    config = r4j(window="time", window_duration=10.0, window_buckets=10, minimum_calls=5)
    b = CircuitBreaker("r4j", config)
    run(b, "FFFF")
    fake.advance(10.0)  # those calls are older than the window now
    run(b, "SSSS")
    assert b.snapshot().failures == 0
    assert b.state is BreakerState.CLOSED
    fake.advance(9.0)  # still inside the 10 s window
    run(b, "FFFF")
    assert b.state is BreakerState.OPEN  # 4 of 8 in the last 10 s


# -- minimum calls --------------------------------------------------------------------------------


def test_no_rate_is_judged_before_the_minimum_number_of_calls(fake: FakeClock) -> None:
    # "If minimumNumberOfCalls is 10, then at least 10 calls must be recorded
    # before the failure rate can be calculated.  If only 9 calls have been
    # evaluated the CircuitBreaker will not trip open even if all 9 calls failed."
    b = CircuitBreaker("r4j", r4j(minimum_calls=10, window_size=100))
    run(b, "F" * 9)
    assert b.state is BreakerState.CLOSED
    assert b.failure_rate() is None
    run(b, "F")
    assert b.state is BreakerState.OPEN


def test_with_the_defaults_a_hundred_calls_are_needed(fake: FakeClock) -> None:
    b = CircuitBreaker("r4j", r4j())
    run(b, "F" * 99)
    assert b.state is BreakerState.CLOSED
    run(b, "F")
    assert b.state is BreakerState.OPEN


# -- thresholds ----------------------------------------------------------------------------------


def test_the_failure_rate_threshold_is_inclusive(fake: FakeClock) -> None:
    # "When the failure rate is equal or greater than the threshold the
    # CircuitBreaker transitions to open."
    b = CircuitBreaker("r4j", r4j(window_size=10, minimum_calls=10))
    run(b, "SSSSSFFFF")
    run(b, "S")  # 4 of 10: below
    assert b.state is BreakerState.CLOSED
    run(b, "F")  # the oldest S left: 5 of 10, exactly 50%
    assert b.state is BreakerState.OPEN


def test_the_slow_call_rate_threshold_is_inclusive(fake: FakeClock) -> None:
    # "When the percentage of slow calls is equal or greater than the threshold
    # the CircuitBreaker transitions to open", e.g. 50% of calls over 5 s.
    config = r4j(
        slow_call_rate_threshold=0.5, slow_call_duration=5.0, window_size=4, minimum_calls=4
    )
    b = CircuitBreaker("r4j", config)
    run(b, "SSS", duration=1.0)
    run(b, "S", duration=6.0)  # 1 of 4 slow
    assert b.state is BreakerState.CLOSED
    run(b, "S", duration=6.0)  # 2 of 4: 50%
    assert b.state is BreakerState.OPEN


def test_a_call_is_slow_only_above_the_duration_threshold(fake: FakeClock) -> None:
    # "Configures the duration threshold above which calls are considered as slow."
    config = r4j(
        slow_call_rate_threshold=0.5, slow_call_duration=5.0, window_size=2, minimum_calls=2
    )
    b = CircuitBreaker("r4j", config)
    run(b, "SS", duration=5.0)  # exactly at the threshold: not slow
    assert b.snapshot().slow_calls == 0
    assert b.state is BreakerState.CLOSED


def test_a_slow_call_counts_whether_it_failed_or_succeeded(fake: FakeClock) -> None:
    config = r4j(
        failure_rate_threshold=1.0,
        slow_call_rate_threshold=1.0,
        slow_call_duration=1.0,
        window_size=2,
        minimum_calls=2,
    )
    b = CircuitBreaker("r4j", config)
    run(b, "F", duration=2.0)
    run(b, "S", duration=2.0)
    assert b.state is BreakerState.OPEN  # 100% slow, 50% failed


# -- waits and permits ----------------------------------------------------------------------------


def test_an_open_breaker_rejects_calls_until_the_wait_has_elapsed(fake: FakeClock) -> None:
    # "When the CircuitBreaker is OPEN, it rejects calls with a
    # CallNotPermittedException.  After a wait time duration has elapsed, the
    # CircuitBreaker state changes from OPEN to HALF_OPEN."
    b = CircuitBreaker("r4j", r4j(window_size=2, minimum_calls=2))
    run(b, "FF")
    with pytest.raises(CircuitOpenError) as info:
        b.allow()
    assert info.value.remaining == pytest.approx(60.0)
    fake.advance(59.9)
    assert b.state is BreakerState.OPEN
    fake.advance(0.1)
    assert b.state is BreakerState.HALF_OPEN


def test_half_open_permits_a_number_of_calls_and_rejects_the_rest(fake: FakeClock) -> None:
    # "...permits a configurable number of calls to see if the backend is still
    # unavailable or has become available again.  Further calls are rejected
    # with a CallNotPermittedException, until all permitted calls have completed."
    b = CircuitBreaker("r4j", r4j(window_size=2, minimum_calls=2))
    run(b, "FF")
    fake.advance(60.0)
    permits = [b.allow() for _ in range(10)]
    assert all(p.probe for p in permits)
    with pytest.raises(CircuitOpenError):
        b.allow()
    for permit in permits[:9]:
        permit.success()
    with pytest.raises(CircuitOpenError):
        b.allow()  # one permitted call is still out
    permits[9].success()
    assert b.state is BreakerState.CLOSED


def test_half_open_re_opens_when_the_probes_failure_rate_reaches_the_threshold(
    fake: FakeClock,
) -> None:
    # "If the failure rate or slow call rate is then equal or greater than the
    # configured threshold, the state changes back to OPEN.  If the failure
    # rate and slow call rate is below the threshold, the state changes back to CLOSED."
    b = CircuitBreaker("r4j", r4j(window_size=2, minimum_calls=2, half_open_permits=4))
    run(b, "FF")
    fake.advance(60.0)
    run(b, "FSSS")
    assert b.state is BreakerState.CLOSED
    run(b, "FF")
    fake.advance(60.0)
    run(b, "FFSF")
    assert b.state is BreakerState.OPEN


def test_half_open_re_opens_when_the_probes_slow_call_rate_reaches_the_threshold(
    fake: FakeClock,
) -> None:
    config = r4j(
        window_size=2,
        minimum_calls=2,
        half_open_permits=4,
        slow_call_rate_threshold=0.5,
        slow_call_duration=5.0,
    )
    b = CircuitBreaker("r4j", config)
    run(b, "FF")
    fake.advance(60.0)
    run(b, "SS", duration=1.0)
    run(b, "SS", duration=9.0)  # all succeeded, half of them slow
    assert b.state is BreakerState.OPEN


def test_by_default_half_open_waits_for_its_permitted_calls_indefinitely(
    fake: FakeClock,
) -> None:
    # maxWaitDurationInHalfOpenState defaults to 0: "wait infinitely until all
    # the permitted calls have completed".
    b = CircuitBreaker("r4j", r4j(window_size=2, minimum_calls=2, half_open_permits=1))
    run(b, "FF")
    fake.advance(60.0)
    probe = b.allow()
    fake.advance(10 * 86400.0)
    assert b.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpenError):
        b.allow()
    probe.success(duration=1.0)  # (measured, it would be a slow call: re-open)
    assert b.state is BreakerState.CLOSED


def test_a_max_wait_in_half_open_moves_it_back_to_open(fake: FakeClock) -> None:
    # "maxWaitDurationInHalfOpenState: the maximum time a CircuitBreaker may
    # stay in half open before it switches to open."
    config = r4j(window_size=2, minimum_calls=2, half_open_permits=2, half_open_timeout=5.0)
    b = CircuitBreaker("r4j", config)
    run(b, "FF")
    fake.advance(60.0)
    b.allow().success()
    b.allow()  # never finishes
    fake.advance(5.0)
    assert b.state is BreakerState.OPEN


def test_the_wait_in_open_may_grow_exponentially(fake: FakeClock) -> None:
    # An exponential backoff of the open wait (enableExponentialBackoff with a
    # multiplier): each re-opening waits longer, up to a maximum.
    config = r4j(window_size=2, minimum_calls=2, half_open_permits=1, open_backoff=2.0)
    b = CircuitBreaker("r4j", config)
    run(b, "FF")
    waits = []
    for _ in range(4):
        waits.append(b.retry_after())
        fake.advance(b.retry_after())
        run(b, "F")  # the probe fails: re-open
    assert waits == pytest.approx([60.0, 120.0, 240.0, 480.0])
    assert b.retry_after() == pytest.approx(600.0)  # capped


# -- recorded and ignored errors -----------------------------------------------------------------


def test_every_exception_is_a_failure_by_default(fake: FakeClock) -> None:
    # "By default all exceptions count as a failure."
    b = CircuitBreaker("r4j", r4j(window_size=2, minimum_calls=2))
    for exc in (Boom(), Business(), NotFound()):
        b.reset()
        for _ in range(2):
            b.allow().failure(exc)
        assert b.state is BreakerState.OPEN


def test_exceptions_outside_the_recorded_list_count_as_successes(fake: FakeClock) -> None:
    # "You can define a list of exceptions which should count as a failure.
    # All other exceptions are then counted as a success, unless they are ignored."
    b = CircuitBreaker("r4j", r4j(window_size=4, minimum_calls=4, failure_on=Boom))
    for _ in range(4):
        b.allow().failure(Business())
    snap = b.snapshot()
    assert (snap.calls, snap.failures) == (4, 0)
    assert b.state is BreakerState.CLOSED


def test_ignored_exceptions_count_as_neither_failure_nor_success(fake: FakeClock) -> None:
    # "Exceptions can also be ignored so that they neither count as a failure nor success."
    b = CircuitBreaker("r4j", r4j(window_size=4, minimum_calls=4, ignore_on=NotFound))
    for _ in range(10):
        b.allow().failure(NotFound())
    assert b.snapshot().calls == 0
    run(b, "FFFF")
    assert b.state is BreakerState.OPEN


def test_an_ignored_exception_wins_over_a_recorded_one(fake: FakeClock) -> None:
    class Missing(Boom):
        pass

    b = CircuitBreaker(
        "r4j", r4j(window_size=2, minimum_calls=2, failure_on=Boom, ignore_on=Missing)
    )
    for _ in range(5):
        b.allow().failure(Missing())
    assert b.snapshot().calls == 0


def test_a_result_can_be_recorded_as_a_failure(fake: FakeClock) -> None:
    # recordResult: "a Predicate which evaluates if a result should be recorded as a failure".
    config = r4j(window_size=2, minimum_calls=2, record_result=lambda r: r == 503)
    b = CircuitBreaker("r4j", config)
    assert b.call(lambda: 503) == 503
    assert b.call(lambda: 503) == 503
    assert b.state is BreakerState.OPEN


def test_a_failure_in_an_ignored_error_on_a_probe_frees_the_permit(fake: FakeClock) -> None:
    b = CircuitBreaker(
        "r4j", r4j(window_size=2, minimum_calls=2, half_open_permits=1, ignore_on=NotFound)
    )
    run(b, "FF")
    fake.advance(60.0)
    b.allow().failure(NotFound())
    b.allow().success()
    assert b.state is BreakerState.CLOSED


# -- the special states ----------------------------------------------------------------------------


def test_disabled_always_allows_and_records_nothing(fake: FakeClock) -> None:
    # DISABLED: "always allow access"; no metrics are recorded and the state
    # never changes by itself.
    b = CircuitBreaker("r4j", r4j(window_size=2, minimum_calls=2))
    b.disable()
    run(b, "F" * 50)
    assert b.state is BreakerState.DISABLED
    assert b.snapshot().calls == 0


def test_forced_open_always_denies(fake: FakeClock) -> None:
    # FORCED_OPEN: "always deny access", whatever time passes.
    b = CircuitBreaker("r4j", r4j())
    b.isolate()
    fake.advance(86400.0)
    with pytest.raises(CircuitOpenError) as info:
        b.allow()
    assert info.value.remaining == math.inf
    assert b.state is BreakerState.FORCED_OPEN


def test_metrics_only_records_everything_and_never_transitions(
    fake: FakeClock, seen: list[Event]
) -> None:
    # METRICS_ONLY: "always allow access"; every call is recorded and its
    # metrics and events published, but the breaker never transitions.
    b = CircuitBreaker("r4j", r4j(window_size=10, minimum_calls=10))
    b.metrics_only()
    run(b, "F" * 10)
    snap = b.snapshot()
    assert snap.state is BreakerState.METRICS_ONLY
    assert (snap.calls, snap.failures, snap.failure_rate) == (10, 10, 1.0)
    assert [e.reason for e in seen if isinstance(e, ShadowTrip)] == ["failure_rate"]


@pytest.mark.parametrize("leave", ["reset"])
def test_the_special_states_are_left_only_by_a_transition_or_a_reset(
    fake: FakeClock, leave: str
) -> None:
    # "The only way to exit from those states are to trigger a state
    # transition or to reset the CircuitBreaker."  A reset loses the metrics.
    for enter in (CircuitBreaker.disable, CircuitBreaker.isolate, CircuitBreaker.metrics_only):
        b = CircuitBreaker("r4j", r4j(window_size=4, minimum_calls=4))
        enter(b)
        fake.advance(3600.0)
        assert b.state is not BreakerState.CLOSED
        getattr(b, leave)()
        assert b.state is BreakerState.CLOSED
        assert b.snapshot().calls == 0
