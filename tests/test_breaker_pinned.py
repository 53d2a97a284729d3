"""The breaker's state machine pinned where its tests only bounded it.

Half-open probes that bring a server delay, slow probes, outcomes that arrive
after the time limit or from an earlier period, open durations and the
admission arithmetic, each checked through the public faces on a fake clock.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from datapunk_recovery import events
from datapunk_recovery.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStateChanged,
    CallRejected,
    CircuitBreaker,
    OutcomeRecorded,
)
from datapunk_recovery.clock import FakeClock
from datapunk_recovery.errors import CircuitOpenError, RecoveryError
from datapunk_recovery.events import Event, HintIgnored
from datapunk_recovery.testing import fake_clock


@pytest.fixture
def fake() -> Iterator[FakeClock]:
    with fake_clock(1000.0) as clock:
        yield clock


@pytest.fixture
def seen() -> Iterator[list[Event]]:
    got: list[Event] = []
    unsubscribe = events.subscribe(got.append)
    yield got
    unsubscribe()


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom("down")


def ok() -> str:
    return "ok"


def _raise(exc: BaseException) -> None:
    raise exc


def fail(b: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            b.call(boom)


def reasons(seen: list[Event]) -> list[str]:
    return [e.reason for e in seen if isinstance(e, BreakerStateChanged)]


@dataclass
class Response:
    status: int
    retry_after: object = None


def _delay(r: Response) -> object:
    return r.retry_after if r.status in (429, 503) else None


def to_half_open(b: CircuitBreaker, fake: FakeClock, failures: int = 5) -> None:
    fail(b, failures)
    assert b.state is BreakerState.OPEN
    fake.advance(b.retry_after())
    assert b.state is BreakerState.HALF_OPEN


# -- a half-open probe that brings a server delay ------------------------------------------


def test_a_probe_result_with_a_server_delay_reopens_for_that_long(
    fake: FakeClock, seen: list[Event]
) -> None:
    b = CircuitBreaker("x", BreakerConfig(result_delay=_delay))  # type: ignore[arg-type]
    to_half_open(b, fake)
    assert b.call(Response, 503, 12.0).status == 503
    assert b.state is BreakerState.OPEN
    assert b.retry_after() == pytest.approx(12.0)
    assert reasons(seen)[-1] == "server_delay"
    fake.advance(12.0)
    assert b.state is BreakerState.HALF_OPEN


def test_a_probe_error_with_a_server_delay_reopens_for_that_long(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(honor_server_delay=True, open_duration=30.0))
    to_half_open(b, fake)
    with pytest.raises(RecoveryError):
        b.call(_raise, RecoveryError("slow down", retry_after=75.0))
    assert b.state is BreakerState.OPEN
    assert b.retry_after() == pytest.approx(75.0)


def test_a_probe_permit_with_a_server_delay_reopens_for_that_long(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(result_delay=_delay))  # type: ignore[arg-type]
    to_half_open(b, fake)
    probe = b.allow()
    assert probe.probe
    probe.result(Response(429, 3.5))
    assert b.retry_after() == pytest.approx(3.5)
    assert b.snapshot().opened == 2


def test_a_probe_with_a_garbage_server_delay_succeeds_as_usual(
    fake: FakeClock, seen: list[Event]
) -> None:
    b = CircuitBreaker("x", BreakerConfig(result_delay=_delay))  # type: ignore[arg-type]
    to_half_open(b, fake)
    b.call(Response, 200, "later")
    assert b.state is BreakerState.CLOSED
    assert [e for e in seen if isinstance(e, HintIgnored)] == []  # 200: no delay asked


def test_a_zero_server_delay_is_no_delay(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(result_delay=_delay))  # type: ignore[arg-type]
    b.call(Response, 503, 0.0)
    assert b.state is BreakerState.CLOSED
    assert b.snapshot().consecutive_failures == 0


# -- slow probes ---------------------------------------------------------------------------


def _slow_config(**changes: object) -> BreakerConfig:
    base: dict[str, object] = {"slow_call_duration": 1.0, "half_open_permits": 1}
    base.update(changes)
    return BreakerConfig(**base)  # type: ignore[arg-type]


def test_a_slow_probe_reopens_when_the_slow_rate_is_judged(
    fake: FakeClock, seen: list[Event]
) -> None:
    config = _slow_config(slow_call_rate_threshold=0.5, window_size=10, minimum_calls=10)
    b = CircuitBreaker("x", config)
    to_half_open(b, fake)

    def slow() -> str:
        fake.advance(1.5)
        return "late"

    assert b.call(slow) == "late"
    assert b.state is BreakerState.OPEN
    assert reasons(seen)[-1] == "probe_failed"


def test_a_probe_exactly_at_the_slow_limit_is_not_slow(fake: FakeClock) -> None:
    config = _slow_config(slow_call_rate_threshold=0.5, window_size=10, minimum_calls=10)
    b = CircuitBreaker("x", config)
    to_half_open(b, fake)
    b.allow().success(duration=1.0)
    assert b.state is BreakerState.CLOSED


def test_a_slow_probe_closes_when_no_slow_rate_is_judged(fake: FakeClock) -> None:
    b = CircuitBreaker("x", _slow_config())
    to_half_open(b, fake)
    b.allow().success(duration=5.0)
    assert b.state is BreakerState.CLOSED


def test_every_probe_must_succeed_to_close(fake: FakeClock, seen: list[Event]) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_permits=3))
    to_half_open(b, fake)
    probes = [b.allow(), b.allow(), b.allow()]
    probes[0].success()
    probes[1].success()
    assert b.state is BreakerState.HALF_OPEN
    probes[2].success()
    assert b.state is BreakerState.CLOSED
    assert reasons(seen)[-1] == "probes_succeeded"


def test_a_failed_probe_reopens_even_after_successes(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_permits=3))
    to_half_open(b, fake)
    probes = [b.allow(), b.allow()]
    probes[0].success()
    probes[1].failure(Boom())
    assert b.state is BreakerState.OPEN


def test_a_non_probe_outcome_in_half_open_counts_nothing(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, half_open_permits=1))
    stale = b.allow()  # granted while closed, in generation 0
    fail(b)
    fake.advance(b.retry_after())
    assert b.state is BreakerState.HALF_OPEN
    stale.failure(Boom())
    assert b.state is BreakerState.HALF_OPEN


# -- the time limit is applied before an outcome is recorded --------------------------------


def test_a_probe_that_answers_after_the_time_limit_counts_in_no_period(
    fake: FakeClock, seen: list[Event]
) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_timeout=5.0))
    to_half_open(b, fake)
    probe = b.allow()
    fake.advance(5.0)  # nobody looks at the breaker until the probe answers
    probe.success()
    assert reasons(seen)[-1] == "probe_timeout"
    assert b.state is BreakerState.OPEN


def test_a_probe_that_answers_just_before_the_time_limit_counts(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_timeout=5.0))
    to_half_open(b, fake)
    probe = b.allow()
    fake.advance(4.999)
    probe.success()
    assert b.state is BreakerState.CLOSED


def test_the_half_open_time_limit_is_reported_as_time_left(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_timeout=8.0))
    to_half_open(b, fake)
    assert b.retry_after() == 0.0  # a probe may go now
    b.allow()
    fake.advance(3.0)
    with pytest.raises(CircuitOpenError) as info:
        b.allow()
    assert info.value.remaining == pytest.approx(5.0)
    assert b.retry_after() == pytest.approx(5.0)


# -- late outcomes from an earlier period ----------------------------------------------------


def test_a_probe_from_an_earlier_half_open_period_never_counts_in_a_later_one(
    fake: FakeClock,
) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_timeout=5.0))
    to_half_open(b, fake)
    first = b.allow()  # this probe hangs past the time limit
    fake.advance(5.0)
    assert b.state is BreakerState.OPEN
    fake.advance(b.retry_after())
    assert b.state is BreakerState.HALF_OPEN
    second = b.allow()
    first.success()  # late: granted in the earlier half-open period
    assert b.state is BreakerState.HALF_OPEN
    second.success()
    assert b.state is BreakerState.CLOSED


def test_a_closed_period_outcome_never_counts_in_the_next_closed_period(
    fake: FakeClock,
) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=2))
    stale = b.allow()  # granted in the first closed period
    fail(b, 2)
    fake.advance(b.retry_after())
    b.call(ok)  # the probe closes it: a new closed period
    fail(b)
    stale.failure(Boom())  # would be the second failure in a row if it counted
    assert b.state is BreakerState.CLOSED
    assert b.snapshot().consecutive_failures == 1


def test_a_late_cancellation_never_frees_a_later_periods_probe(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_timeout=5.0))
    to_half_open(b, fake)
    first = b.allow()
    fake.advance(5.0)
    fake.advance(b.retry_after())
    assert b.state is BreakerState.HALF_OPEN
    b.allow()  # the one probe of this period
    first.cancel()  # from the earlier period: gives nothing back
    with pytest.raises(CircuitOpenError):
        b.allow()


# -- open durations and counts ---------------------------------------------------------------


def test_open_jitter_scales_the_open_duration_by_the_seeded_draw(fake: FakeClock) -> None:
    config = BreakerConfig(open_duration=10.0, open_jitter=0.2, consecutive_failures=1)
    for seed in range(5):
        b = CircuitBreaker("x", config, rng=random.Random(seed))
        fail(b)
        assert b.retry_after() == pytest.approx(10.0 * random.Random(seed).uniform(0.8, 1.2))


def test_the_open_duration_grows_per_reopening_and_resets_on_close(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=1, open_duration=2.0, open_backoff=3.0, max_open_duration=100.0
    )
    b = CircuitBreaker("x", config)
    fail(b)
    got = [b.retry_after()]
    for _ in range(3):
        fake.advance(b.retry_after())
        fail(b)
        got.append(b.retry_after())
    assert got == [2.0, 6.0, 18.0, 54.0]
    fake.advance(b.retry_after())
    b.call(ok)
    fail(b)
    assert b.retry_after() == 2.0


def test_snapshot_counts_openings_and_rejections(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    fail(b)
    for _ in range(3):
        with pytest.raises(CircuitOpenError):
            b.call(ok)
    snap = b.snapshot()
    assert (snap.opened, snap.rejected, snap.state) == (1, 3, BreakerState.OPEN)
    assert snap.retry_after == pytest.approx(30.0)


def test_isolation_reports_an_endless_wait(fake: FakeClock, seen: list[Event]) -> None:
    b = CircuitBreaker("x")
    b.isolate()
    with pytest.raises(CircuitOpenError) as info:
        b.call(ok)
    assert info.value.remaining == float("inf")
    assert b.retry_after() == float("inf")
    rejected = [e for e in seen if isinstance(e, CallRejected)]
    assert [(e.state, e.remaining) for e in rejected] == [(BreakerState.FORCED_OPEN, float("inf"))]


def test_a_reset_after_isolation_starts_the_open_growth_over(fake: FakeClock) -> None:
    config = BreakerConfig(consecutive_failures=1, open_duration=1.0, open_backoff=2.0)
    b = CircuitBreaker("x", config)
    fail(b)
    fake.advance(1.0)
    fail(b)  # re-opened: 2 s
    b.isolate()
    b.reset()
    fail(b)
    assert b.retry_after() == 1.0


def test_the_consecutive_count_is_exact_at_the_threshold(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=3))
    fail(b, 2)
    assert b.snapshot().consecutive_failures == 2
    assert b.state is BreakerState.CLOSED
    fail(b)
    assert b.state is BreakerState.OPEN


def test_a_failure_rate_exactly_at_the_threshold_trips(fake: FakeClock, seen: list[Event]) -> None:
    config = BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, window_size=4, minimum_calls=4
    )
    b = CircuitBreaker("x", config)
    b.call(ok)
    fail(b)
    b.call(ok)
    assert b.state is BreakerState.CLOSED  # 3 calls: below minimum_calls
    fail(b)
    assert b.state is BreakerState.OPEN
    assert reasons(seen) == ["failure_rate"]


def test_outcome_events_say_what_was_recorded(fake: FakeClock, seen: list[Event]) -> None:
    config = BreakerConfig(slow_call_duration=1.0, ignore_on=KeyError)
    b = CircuitBreaker("x", config)
    b.allow().success(duration=2.0)
    b.allow().failure(Boom(), duration=0.5)
    b.allow().failure(KeyError("k"))
    b.allow().cancel()
    got = [
        (e.outcome, e.slow, e.duration, e.error_type)
        for e in seen
        if isinstance(e, OutcomeRecorded)
    ]
    assert got == [
        ("success", True, 2.0, None),
        ("failure", False, 0.5, "Boom"),
        ("ignored", False, 0.0, "KeyError"),
        ("cancelled", False, 0.0, None),  # measured from allow()
    ]


# -- configuration: exact messages, boundaries, derived flags --------------------------------


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"slow_call_duration": -1.0}, ValueError, "slow_call_duration: must be >= 0, got -1.0"),
        (
            {"slow_call_rate_threshold": 0.5},
            ValueError,
            "slow_call_duration: required when slow_call_rate_threshold is set, got None",
        ),
        (
            {"slow_call_rate_threshold": 1.5, "slow_call_duration": 1.0},
            ValueError,
            "slow_call_rate_threshold: must be between 0 (exclusive) and 1, got 1.5",
        ),
        ({"window": "sliding"}, ValueError, "window: expected 'count' or 'time', got 'sliding'"),
        (
            {"window_size": 1_000_001},
            ValueError,
            "window_size: must be <= 1000000 calls, got 1000001",
        ),
        ({"window_buckets": 10_001}, ValueError, "window_buckets: must be <= 10000, got 10001"),
        ({"keep_window": 1}, TypeError, "keep_window: expected a bool, got 1"),
        ({"trip_policy": 3}, TypeError, "trip_policy: expected a callable or None, got 3"),
        (
            {"max_open_duration": 1.0},
            ValueError,
            "max_open_duration: must be >= open_duration (30.0), got 1.0",
        ),
        (
            {"failure_on": 3},
            TypeError,
            "failure_on: expected exception types or a predicate, got 3 (int)",
        ),
        (
            {"failure_on": (ValueError, 3)},
            TypeError,
            "failure_on: expected exception types or a predicate, got "
            "(<class 'ValueError'>, 3) (tuple)",
        ),
        (
            {"ignore_on": "x"},
            TypeError,
            "ignore_on: expected exception types or a predicate, got 'x' (str)",
        ),
        (
            {"ignored_counts_as": "failure"},
            ValueError,
            "ignored_counts_as: expected 'nothing' or 'success', got 'failure'",
        ),
        ({"record_result": 3}, TypeError, "record_result: expected a callable or None, got 3"),
        ({"result_delay": 3}, TypeError, "result_delay: expected a callable or None, got 3"),
        ({"honor_server_delay": 1}, TypeError, "honor_server_delay: expected a bool, got 1"),
        ({"max_server_delay": -1}, ValueError, "max_server_delay: must be >= 0, got -1"),
        ({"half_open_timeout": 0}, ValueError, "half_open_timeout: must be > 0 seconds, got 0"),
        ({"window_duration": 0}, ValueError, "window_duration: must be > 0 seconds, got 0"),
        ({"open_backoff": 0.5}, ValueError, "open_backoff: must be >= 1, got 0.5"),
        ({"open_jitter": 2}, ValueError, "open_jitter: must be between 0 and 1, got 2"),
        ({"minimum_calls": 0}, ValueError, "minimum_calls: must be >= 1, got 0"),
        ({"window_size": 0}, ValueError, "window_size: must be >= 1, got 0"),
        ({"window_buckets": 0}, ValueError, "window_buckets: must be >= 1, got 0"),
        ({"half_open_permits": 0}, ValueError, "half_open_permits: must be >= 1, got 0"),
        (
            {"failure_rate_threshold": 0.5, "window_size": 10},
            ValueError,
            "minimum_calls: must be <= window_size (10) with a count window, got 20",
        ),
        (
            {"slow_call_rate_threshold": 0.5, "slow_call_duration": 1.0, "window_size": 10},
            ValueError,
            "minimum_calls: must be <= window_size (10) with a count window, got 20",
        ),
        (
            {"keep_window": True, "window_size": 5, "minimum_calls": 6},
            ValueError,
            "minimum_calls: must be <= window_size (5) with a count window, got 6",
        ),
    ],
)
def test_a_bad_configuration_is_refused_with_an_exact_message(
    changes: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        BreakerConfig(**changes)  # type: ignore[arg-type]
    assert str(info.value) == f"BreakerConfig.{message}"


@pytest.mark.parametrize(
    "changes",
    [
        {"window_size": 1_000_000, "minimum_calls": 1},
        {"window_buckets": 10_000},
        {"failure_rate_threshold": 1.0, "window_size": 20, "minimum_calls": 20},
        {"failure_rate_threshold": 0.5, "window": "time", "window_size": 5, "minimum_calls": 50},
        {"window_size": 5, "minimum_calls": 50},  # no window kept: nothing to judge
        {"max_open_duration": 30.0},
        {"open_duration": 0.0, "max_open_duration": 0.0},
        {"failure_on": (ValueError, KeyError)},
        {"ignore_on": lambda e: True, "ignored_counts_as": "success"},
        {"slow_call_duration": 0.0},
    ],
)
def test_configurations_at_the_limits_are_accepted(changes: dict[str, object]) -> None:
    BreakerConfig(**changes)  # type: ignore[arg-type]


def test_the_window_kind_accepts_its_string_name() -> None:
    from datapunk_recovery.breaker import WindowKind

    assert BreakerConfig(window="time").window is WindowKind.TIME  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "windowed", "timed", "simple"),
    [
        ({}, False, False, True),
        ({"keep_window": True}, True, False, False),
        ({"failure_rate_threshold": 0.5}, True, False, False),
        ({"slow_call_rate_threshold": 0.5, "slow_call_duration": 1.0}, True, True, False),
        ({"slow_call_duration": 1.0}, False, True, False),
        ({"trip_policy": list}, False, True, False),
        ({"record_result": bool}, False, False, False),
        ({"result_delay": bool}, False, False, False),
    ],
)
def test_what_a_configuration_measures(
    changes: dict[str, object], windowed: bool, timed: bool, simple: bool
) -> None:
    config = BreakerConfig(**changes)  # type: ignore[arg-type]
    assert (config.windowed, config.timed, config.simple) == (windowed, timed, simple)
    assert (config.new_window() is not None) is windowed


def test_window_shapes() -> None:
    from datapunk_recovery.breaker import WindowKind

    assert BreakerConfig().window_shape() == ()
    assert BreakerConfig(keep_window=True, window_size=50).window_shape() == (
        WindowKind.COUNT,
        50,
    )
    timed = BreakerConfig(keep_window=True, window="time", window_duration=9.0, window_buckets=3)  # type: ignore[arg-type]
    assert timed.window_shape() == (WindowKind.TIME, 9.0, 3)


def test_a_call_is_slow_only_past_the_limit() -> None:
    config = BreakerConfig(slow_call_duration=1.0)
    assert (config.is_slow(1.0), config.is_slow(1.01), config.is_slow(None)) == (
        False,
        True,
        False,
    )
    assert BreakerConfig().is_slow(100.0) is False


def test_open_time_grows_caps_and_survives_overflow() -> None:
    config = BreakerConfig(open_duration=2.0, open_backoff=10.0, max_open_duration=500.0)
    rng = random.Random(0)
    assert [config.open_time(n, rng) for n in range(4)] == [2.0, 20.0, 200.0, 500.0]
    assert config.open_time(10_000, rng) == 500.0
