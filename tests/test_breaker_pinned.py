"""The breaker's state machine pinned where its tests only bounded it.

Half-open probes that bring a server delay, slow probes, outcomes that arrive
after the time limit or from an earlier period, open durations and the
admission arithmetic, each checked through the public faces on a fake clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._core.errors import CircuitOpenError, RecoveryError
from datapunk_recovery._core.events import Event, HintIgnored
from datapunk_recovery.breaker import (
    BreakerConfig as _BreakerConfig,
)
from datapunk_recovery.breaker import (
    BreakerState,
    BreakerStateChanged,
    CallRejected,
    CircuitBreaker,
    OutcomeRecorded,
)
from tests.breaker_helpers import Boom, Response, _delay, _raise, boom, fail, ok


def BreakerConfig(**settings: Any) -> _BreakerConfig:
    """The breaker's configuration with a 30 s open period unless given.

    These tests pin exact figures and were written with a 30 s open period;
    the library's default is 1 s (chosen by the lab, `docs/simulate.md`).
    """
    settings.setdefault("open_duration", 30.0)
    return _BreakerConfig(**settings)


def reasons(seen: list[Event]) -> list[str]:
    return [e.reason for e in seen if isinstance(e, BreakerStateChanged)]


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


# -- exact events ------------------------------------------------------------------------------


def _own_events(b: CircuitBreaker) -> list[Event]:
    got: list[Event] = []
    b.events.subscribe(got.append)
    return got


def test_every_manual_control_is_reported_with_its_reason(fake: FakeClock) -> None:
    b = CircuitBreaker("ctl")
    got = _own_events(b)
    b.isolate()
    b.reset()
    b.disable()
    b.metrics_only()
    b.reset()
    S = BreakerState
    assert got == [
        BreakerStateChanged(operation="ctl", at=1000.0, from_state=a, to_state=z, reason=r)
        for a, z, r in [
            (S.CLOSED, S.FORCED_OPEN, "isolate"),
            (S.FORCED_OPEN, S.CLOSED, "reset"),
            (S.CLOSED, S.DISABLED, "disable"),
            (S.DISABLED, S.METRICS_ONLY, "metrics_only"),
            (S.METRICS_ONLY, S.CLOSED, "reset"),
        ]
    ]


@pytest.mark.anyio
async def test_every_async_manual_control_is_reported_with_its_reason(fake: FakeClock) -> None:
    b = CircuitBreaker("ctl")
    got = _own_events(b)
    await b.isolate_async()
    await b.reset_async()
    await b.disable_async()
    await b.metrics_only_async()
    assert [(e.to_state, e.reason) for e in got if isinstance(e, BreakerStateChanged)] == [
        (BreakerState.FORCED_OPEN, "isolate"),
        (BreakerState.CLOSED, "reset"),
        (BreakerState.DISABLED, "disable"),
        (BreakerState.METRICS_ONLY, "metrics_only"),
    ]


def test_the_whole_cycle_is_reported_exactly(fake: FakeClock) -> None:
    b = CircuitBreaker("cyc", BreakerConfig(consecutive_failures=1, half_open_permits=1))
    got = _own_events(b)
    fail(b)
    with pytest.raises(CircuitOpenError):
        b.call(ok)
    fake.advance(30.0)
    b.call(ok)
    S = BreakerState
    changes = [e for e in got if isinstance(e, BreakerStateChanged)]
    assert changes == [
        BreakerStateChanged(
            operation="cyc",
            at=1000.0,
            from_state=S.CLOSED,
            to_state=S.OPEN,
            reason="consecutive_failures",
        ),
        BreakerStateChanged(
            operation="cyc",
            at=1030.0,
            from_state=S.OPEN,
            to_state=S.HALF_OPEN,
            reason="open_elapsed",
        ),
        BreakerStateChanged(
            operation="cyc",
            at=1030.0,
            from_state=S.HALF_OPEN,
            to_state=S.CLOSED,
            reason="probes_succeeded",
        ),
    ]
    assert [e for e in got if isinstance(e, CallRejected)] == [
        CallRejected(operation="cyc", at=1000.0, state=S.OPEN, remaining=30.0)
    ]


def test_a_half_open_time_limit_with_a_success_closes_and_says_so(fake: FakeClock) -> None:
    b = CircuitBreaker("h", BreakerConfig(half_open_permits=2, half_open_timeout=5.0))
    to_half_open(b, fake)
    got = _own_events(b)
    b.allow().success()
    b.allow()
    fake.advance(5.0)
    assert b.state is BreakerState.CLOSED
    assert got[-1] == BreakerStateChanged(
        operation="h",
        at=fake.now(),
        from_state=BreakerState.HALF_OPEN,
        to_state=BreakerState.CLOSED,
        reason="half_open_timeout",
    )


def test_a_shadow_trip_reaches_the_breakers_own_bus(fake: FakeClock) -> None:
    from datapunk_recovery.breaker import ShadowTrip

    b = CircuitBreaker("sh", BreakerConfig(consecutive_failures=2))
    b.metrics_only()
    got = _own_events(b)
    fail(b, 2)
    assert [e for e in got if isinstance(e, ShadowTrip)] == [
        ShadowTrip(operation="sh", at=1000.0, reason="consecutive_failures")
    ]
    assert b.call(ok) == "ok"  # never refuses


def test_an_ignored_hint_is_reported_exactly(fake: FakeClock) -> None:
    b = CircuitBreaker("hi", BreakerConfig(result_delay=_delay, max_server_delay=60.0))  # type: ignore[arg-type]
    got = _own_events(b)
    b.call(Response, 503, "z" * 39)
    b.call(Response, 503, "y" * 38)
    b.call(Response, 503, 61.0)
    ignored = [e for e in got if isinstance(e, HintIgnored)]
    assert ignored == [
        HintIgnored(
            operation="hi",
            at=1000.0,
            value="'" + "z" * 36 + "...",
            reason="server delay is not a finite number >= 0",
        ),
        HintIgnored(
            operation="hi",
            at=1000.0,
            value="'" + "y" * 38 + "'",
            reason="server delay is not a finite number >= 0",
        ),
        HintIgnored(
            operation="hi",
            at=1000.0,
            value="61.0",
            reason="server delay above max_server_delay=60 s",
        ),
    ]
    assert b.state is BreakerState.CLOSED


def test_a_short_server_delay_is_obeyed(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(result_delay=_delay))  # type: ignore[arg-type]
    b.call(Response, 503, 0.5)
    assert b.state is BreakerState.OPEN
    assert b.retry_after() == pytest.approx(0.5)


# -- time left, probes given back, permits settled once ---------------------------------------


def test_the_time_left_shrinks_to_zero_not_to_a_second(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, half_open_timeout=4.0))
    fail(b)
    fake.advance(29.5)
    assert b.retry_after() == pytest.approx(0.5)
    fake.advance(0.5)
    b.allow()  # the probe goes out
    fake.advance(3.5)
    assert b.retry_after() == pytest.approx(0.5)


def test_a_cancelled_probe_gives_back_exactly_one_permit(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_permits=2))
    to_half_open(b, fake)
    first = b.allow()
    b.allow()
    first.cancel()
    b.allow()
    with pytest.raises(CircuitOpenError):
        b.allow()


@pytest.mark.parametrize("settle", ["success", "result", "cancel"])
def test_a_permit_counts_only_its_first_outcome(fake: FakeClock, settle: str) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_permits=2))
    to_half_open(b, fake)
    probe = b.allow()
    for _ in range(2):
        if settle == "success":
            probe.success()
        elif settle == "result":
            probe.result("fine")
        else:
            probe.cancel()
    assert b.state is BreakerState.HALF_OPEN
    b.allow()
    if settle == "cancel":
        b.allow()  # one permit given back, not two
    with pytest.raises(CircuitOpenError):
        b.allow()


def test_given_durations_of_results_and_plain_failures_decide_slowness(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=None,
        slow_call_rate_threshold=1.0,
        slow_call_duration=1.0,
        window_size=2,
        minimum_calls=2,
    )
    b = CircuitBreaker("x", config)
    b.allow().result("fine", duration=2.0)
    b.allow().failure(duration=3.0)
    assert b.state is BreakerState.OPEN
    assert b.snapshot().slow_calls == 2


@pytest.mark.anyio
async def test_async_settlements_keep_their_error_and_duration(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=None,
        slow_call_rate_threshold=1.0,
        slow_call_duration=1.0,
        window_size=3,
        minimum_calls=3,
        ignore_on=KeyError,
    )
    b = CircuitBreaker("x", config)
    got = _own_events(b)
    await (await b.allow_async()).success_async(duration=2.0)
    await (await b.allow_async()).failure_async(Boom(), duration=2.0)
    await (await b.allow_async()).failure_async(KeyError("k"), duration=2.0)
    await (await b.allow_async()).result_async("fine", duration=2.0)
    recorded = [
        (e.outcome, e.duration, e.error_type) for e in got if isinstance(e, OutcomeRecorded)
    ]
    assert recorded == [
        ("success", 2.0, None),
        ("failure", 2.0, "Boom"),
        ("ignored", 2.0, "KeyError"),
        ("success", 2.0, None),
    ]
    assert b.state is BreakerState.OPEN  # three slow calls recorded


def test_an_untimed_breaker_measures_no_duration(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(record_result=bool))
    got = _own_events(b)
    permit = b.allow()
    fake.advance(3.0)
    permit.success()
    assert [e.duration for e in got if isinstance(e, OutcomeRecorded)] == [None]


@pytest.mark.anyio
async def test_an_untimed_breaker_measures_no_duration_async(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(record_result=bool))
    got = _own_events(b)
    permit = await b.allow_async()
    fake.advance(3.0)
    permit.success()
    assert [e.duration for e in got if isinstance(e, OutcomeRecorded)] == [None]
    timed = CircuitBreaker("t", BreakerConfig(slow_call_duration=1.0))
    got = _own_events(timed)
    permit = await timed.allow_async()
    fake.advance(3.0)
    permit.success()
    assert [(e.duration, e.slow) for e in got if isinstance(e, OutcomeRecorded)] == [(3.0, True)]


# -- what a custom policy sees on each path ----------------------------------------------------


@dataclass
class Recorder:
    """A trip policy that never trips and keeps what it was told."""

    seen: list[tuple[bool, bool, float | None, float]]

    def record(self, failed: bool, slow: bool, duration: float | None, now: float) -> bool:
        self.seen.append((failed, slow, duration, now))
        return False

    def reset(self) -> None:
        self.seen.clear()


def _recording(**changes: object) -> tuple[CircuitBreaker, Recorder]:
    recorder = Recorder([])
    config = BreakerConfig(trip_policy=lambda: recorder, slow_call_duration=1.0, **changes)  # type: ignore[arg-type]
    return CircuitBreaker("x", config), recorder


def test_the_quick_path_tells_the_policy_each_outcome_exactly(fake: FakeClock) -> None:
    b, recorder = _recording()

    def slow_ok(x: int, *, y: int) -> int:
        fake.advance(2.0)
        return x + y

    def quick_fail(x: int, *, y: int) -> None:
        fake.advance(0.5)
        raise Boom

    assert b.call(slow_ok, 1, y=2) == 3
    with pytest.raises(Boom):
        b.call(quick_fail, 1, y=2)
    assert recorder.seen == [(False, True, 2.0, 1002.0), (True, False, 0.5, 1002.5)]


@pytest.mark.anyio
async def test_the_async_quick_path_tells_the_policy_each_outcome_exactly(
    fake: FakeClock,
) -> None:
    b, recorder = _recording(consecutive_failures=2)

    async def slow_ok(x: int, *, y: int) -> int:
        fake.advance(2.0)
        return x + y

    async def quick_fail(x: int, *, y: int) -> None:
        fake.advance(0.5)
        raise Boom

    assert await b.call_async(slow_ok, 1, y=2) == 3
    with pytest.raises(Boom):
        await b.call_async(quick_fail, 1, y=2)
    assert await b.call_async(slow_ok, 1, y=2) == 3  # resets the count
    with pytest.raises(Boom):
        await b.call_async(quick_fail, 1, y=2)
    assert b.state is BreakerState.CLOSED
    assert recorder.seen[:2] == [(False, True, 2.0, 1002.0), (True, False, 0.5, 1002.5)]


def test_a_quick_path_error_with_a_server_delay_opens(fake: FakeClock) -> None:
    b, _ = _recording(honor_server_delay=True)
    with pytest.raises(RecoveryError):
        b.call(_raise, RecoveryError("later", retry_after=9.0))
    assert b.retry_after() == pytest.approx(9.0)


def test_a_quick_path_ignored_error_counts_nothing(fake: FakeClock) -> None:
    b, recorder = _recording(ignore_on=KeyError)
    with pytest.raises(KeyError):
        b.call(_raise, KeyError("k"))
    assert recorder.seen == []


# -- the faces: arguments, slow paths, refusals without listeners ------------------------------


@pytest.mark.anyio
async def test_the_async_faces_pass_arguments_on_every_path(fake: FakeClock) -> None:
    async def add(x: int, *, y: int) -> int:
        return x + y

    for config in (
        BreakerConfig(),
        BreakerConfig(slow_call_duration=1.0),
        BreakerConfig(record_result=bool),
    ):
        b = CircuitBreaker("x", config)
        assert await b.call_async(add, 1, y=2) == 3
        assert await b(add)(1, y=2) == 3


def test_the_sync_faces_pass_arguments_on_every_path(fake: FakeClock) -> None:
    def add(x: int, *, y: int) -> int:
        return x + y

    for config in (
        BreakerConfig(),
        BreakerConfig(slow_call_duration=1.0),
        BreakerConfig(record_result=bool),
    ):
        b = CircuitBreaker("x", config)
        assert b.call(add, 1, y=2) == 3
        assert b(add)(1, y=2) == 3


@pytest.mark.anyio
async def test_an_open_breaker_refuses_async_calls_without_listeners(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))

    async def aboom() -> None:
        raise Boom

    async def aok() -> str:
        return "ok"

    guarded = b(aok)
    with pytest.raises(Boom):
        await b.call_async(aboom)
    with pytest.raises(CircuitOpenError):
        await b.call_async(aok)
    with pytest.raises(CircuitOpenError):
        await guarded()


def test_an_open_breaker_refuses_decorated_sync_calls(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    guarded = b(ok)
    fail(b)
    with pytest.raises(CircuitOpenError):
        guarded()
    fake.advance(30.0)
    assert guarded() == "ok"  # the probe, through the decorator's slow path
    assert b.state is BreakerState.CLOSED


@pytest.mark.anyio
async def test_an_async_success_resets_the_consecutive_count(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=3))

    async def aboom() -> None:
        raise Boom

    async def aok() -> str:
        return "ok"

    guarded = b(aok)
    for face in (b.call_async, lambda fn: guarded()):
        for _ in range(2):
            with pytest.raises(Boom):
                await b.call_async(aboom)
        await face(aok)
        assert b.snapshot().consecutive_failures == 0


@pytest.mark.anyio
async def test_async_permit_path_judges_errors_and_results(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=2, ignore_on=KeyError, record_result=lambda r: r >= 500
    )
    b = CircuitBreaker("x", config)

    async def missing() -> None:
        raise KeyError("k")

    async def status(code: int) -> int:
        return code

    for _ in range(3):
        with pytest.raises(KeyError):
            await b.call_async(missing)
    assert b.snapshot().consecutive_failures == 0
    assert await b.call_async(status, 503) == 503
    assert b.snapshot().consecutive_failures == 1


# -- construction, stores, snapshots, blocks ---------------------------------------------------


def test_construction_errors_say_what_was_wrong() -> None:
    with pytest.raises(TypeError, match=r"CircuitBreaker\.config: expected a BreakerConfig, got 3"):
        CircuitBreaker("x", 3)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"CircuitBreaker\.reconfigure: expected a BreakerConfig, got 3"
    ):
        CircuitBreaker("x").reconfigure(3)  # type: ignore[arg-type]


def test_a_memory_store_breaker_keeps_its_name_rng_and_new_config(fake: FakeClock) -> None:
    from datapunk_recovery.stores.memory import MemoryStore

    store = MemoryStore()
    config = BreakerConfig(consecutive_failures=1, open_jitter=0.5)
    b = CircuitBreaker("shared", config, store=store, rng=random.Random(4))
    got = _own_events(b)
    fail(b)
    assert b.retry_after() == pytest.approx(30.0 * random.Random(4).uniform(0.5, 1.5))
    assert {e.operation for e in got} == {"shared"}
    again = CircuitBreaker("shared", BreakerConfig(consecutive_failures=3), store=store)
    assert again.config.consecutive_failures == 3
    assert b.config.consecutive_failures == 3  # one breaker, reconfigured


def test_a_snapshot_without_a_window_counts_zero_calls(fake: FakeClock) -> None:
    b = CircuitBreaker("snap")
    fail(b, 2)
    snap = b.snapshot()
    assert (snap.name, snap.calls, snap.failures, snap.slow_calls) == ("snap", 0, 0, 0)
    assert (snap.failure_rate, snap.slow_call_rate, snap.consecutive_failures) == (None, None, 2)
    assert snap.shared is False


def test_a_snapshot_judges_rates_from_minimum_calls(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(keep_window=True, window_size=10, minimum_calls=4))
    fail(b)
    b.call(ok)
    b.call(ok)
    assert b.snapshot().failure_rate is None
    assert b.failure_rate() is None
    fail(b)
    assert b.snapshot().failure_rate == 0.5
    assert b.failure_rate() == 0.5
    one = CircuitBreaker("y", BreakerConfig(keep_window=True, window_size=10, minimum_calls=1))
    fail(one)
    assert (one.snapshot().failure_rate, one.snapshot().slow_call_rate) == (1.0, 0.0)


def test_one_slow_call_in_four_is_below_a_half(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=None,
        slow_call_rate_threshold=0.5,
        slow_call_duration=1.0,
        window_size=4,
        minimum_calls=4,
    )
    b = CircuitBreaker("x", config)
    b.allow().success(duration=2.0)
    for _ in range(3):
        b.allow().success(duration=0.1)
    assert b.state is BreakerState.CLOSED


def test_a_reconfigured_trip_policy_starts_fresh(fake: FakeClock) -> None:
    first, second = Recorder([]), Recorder([])
    b = CircuitBreaker("x", BreakerConfig(trip_policy=lambda: first))
    b.call(ok)
    same = b.config
    b.reconfigure(BreakerConfig(trip_policy=same.trip_policy, consecutive_failures=4))
    b.call(ok)
    assert len(first.seen) == 2  # the same factory: the same policy kept
    b.reconfigure(BreakerConfig(trip_policy=lambda: second))
    b.call(ok)
    assert (len(first.seen), len(second.seen)) == (2, 1)
    b.reconfigure(BreakerConfig())
    b.call(ok)
    assert len(second.seen) == 1


def test_block_exits_are_checked() -> None:
    a, b = CircuitBreaker("a"), CircuitBreaker("b")
    with pytest.raises(AssertionError, match="breaker block exited without being entered"):
        a.__exit__(None, None, None)
    a.__enter__()
    b.__enter__()
    with pytest.raises(AssertionError, match="breaker blocks exited out of order"):
        a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    a.__exit__(None, None, None)


def test_a_cancelled_probe_cancelled_again_gives_back_nothing_more(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_permits=2))
    to_half_open(b, fake)
    first = b.allow()
    b.allow()
    first.cancel()
    first.cancel()
    b.allow()
    with pytest.raises(CircuitOpenError):
        b.allow()


def test_a_plain_failure_counts_as_a_failure(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    b.allow().failure()
    assert b.state is BreakerState.OPEN


def test_a_cancellation_given_as_a_failure_is_reported_as_cancelled(fake: FakeClock) -> None:
    b = CircuitBreaker("x")
    got = _own_events(b)
    b.allow().failure(KeyboardInterrupt())
    assert [(e.outcome, e.error_type) for e in got if isinstance(e, OutcomeRecorded)] == [
        ("cancelled", "KeyboardInterrupt")
    ]


@pytest.mark.anyio
async def test_an_async_result_is_judged(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, record_result=lambda r: r >= 500))
    await (await b.allow_async()).result_async(503)
    assert b.state is BreakerState.OPEN


def test_block_exit_messages_are_exact() -> None:
    a, b = CircuitBreaker("a"), CircuitBreaker("b")
    with pytest.raises(AssertionError) as info:
        a.__exit__(None, None, None)
    assert str(info.value).splitlines()[0] == "breaker block exited without being entered"
    a.__enter__()
    b.__enter__()
    with pytest.raises(AssertionError) as info:
        a.__exit__(None, None, None)
    assert str(info.value).splitlines()[0] == "breaker blocks exited out of order"
    b.__exit__(None, None, None)
    a.__exit__(None, None, None)


def test_a_quick_path_error_outside_failure_on_counts_as_a_success(fake: FakeClock) -> None:
    b = CircuitBreaker(
        "x", BreakerConfig(consecutive_failures=2, slow_call_duration=1.0, failure_on=KeyError)
    )
    with pytest.raises(KeyError):
        b.call(_raise, KeyError("k"))
    with pytest.raises(Boom):
        b.call(boom)  # the caller's bug, not the dependency's health
    with pytest.raises(KeyError):
        b.call(_raise, KeyError("k"))
    assert b.state is BreakerState.CLOSED


def test_a_slow_failure_on_the_quick_path_counts_as_slow(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=None,
        slow_call_rate_threshold=1.0,
        slow_call_duration=1.0,
        window_size=2,
        minimum_calls=2,
    )
    b = CircuitBreaker("x", config)

    def slow_boom() -> None:
        fake.advance(2.0)
        raise Boom

    for _ in range(2):
        with pytest.raises(Boom):
            b.call(slow_boom)
    assert b.state is BreakerState.OPEN


@pytest.mark.anyio
async def test_an_async_quick_config_reports_outcomes_when_listened_to(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(slow_call_duration=1.0))
    got = _own_events(b)

    async def aok() -> str:
        return "ok"

    assert await b.call_async(aok) == "ok"
    assert [e.outcome for e in got if isinstance(e, OutcomeRecorded)] == ["success"]
