"""The circuit breaker: trip criteria, half-open probes, open durations, faces, events.

Every test runs on a fake clock (``fake``), so "30 seconds later" is an
``advance(30)`` and nothing waits for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._core.errors import CircuitOpenError, RecoveryError
from datapunk_recovery._core.events import Event, HintIgnored
from datapunk_recovery.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStateChanged,
    CallRejected,
    CircuitBreaker,
    OutcomeRecorded,
    ShadowTrip,
)
from datapunk_recovery.stores.memory import MemoryStore
from tests.breaker_helpers import Boom, Response, _delay, _raise, boom, fail, ok


def states(seen: list[Event]) -> list[tuple[str, str, str]]:
    return [
        (e.from_state.value, e.to_state.value, e.reason)
        for e in seen
        if isinstance(e, BreakerStateChanged)
    ]


# ---------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"consecutive_failures": 0}, "BreakerConfig.consecutive_failures"),
        ({"failure_rate_threshold": 1.5}, "BreakerConfig.failure_rate_threshold"),
        ({"failure_rate_threshold": 0}, "BreakerConfig.failure_rate_threshold"),
        ({"slow_call_rate_threshold": 0.5}, "BreakerConfig.slow_call_duration"),
        ({"window": "sliding"}, "BreakerConfig.window"),
        ({"window_duration": 0}, "BreakerConfig.window_duration"),
        ({"open_duration": -1}, "BreakerConfig.open_duration"),
        ({"open_duration": math.inf}, "BreakerConfig.open_duration"),
        ({"max_open_duration": 0.5}, "BreakerConfig.max_open_duration"),
        ({"open_backoff": 0.5}, "BreakerConfig.open_backoff"),
        ({"open_jitter": 2}, "BreakerConfig.open_jitter"),
        ({"half_open_permits": 0}, "BreakerConfig.half_open_permits"),
        ({"ignored_counts_as": "failure"}, "BreakerConfig.ignored_counts_as"),
        ({"half_open_timeout": math.nan}, "BreakerConfig.half_open_timeout"),
        ({"window_size": 10**12}, r"BreakerConfig\.window_size.*1000000000000"),
        ({"window_buckets": 10**6}, "BreakerConfig.window_buckets"),
        # a count window of 10 calls never holds the 20 calls a rate needs
        ({"failure_rate_threshold": 0.5, "window_size": 10}, r"BreakerConfig\.minimum_calls.*20"),
        (
            {"keep_window": True, "window_size": 5, "minimum_calls": 6},
            "BreakerConfig.minimum_calls",
        ),
    ],
)
def test_bad_configuration_names_the_field_and_value(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        BreakerConfig(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"failure_on": "ValueError"},
        {"ignore_on": (ValueError, 3)},
        {"trip_policy": 3},
        {"keep_window": 1},
        {"window_size": True},
    ],
)
def test_wrong_types_are_type_errors(changes: dict[str, object]) -> None:
    with pytest.raises(TypeError, match="BreakerConfig"):
        BreakerConfig(**changes)  # type: ignore[arg-type]


def test_defaults_are_the_classic_breaker() -> None:
    c = BreakerConfig()
    # open 1 s: chosen in the lab (docs/simulate.md, tests/test_simulate_outage.py)
    assert (c.consecutive_failures, c.open_duration, c.half_open_permits) == (5, 1.0, 1)
    assert (c.open_backoff, c.open_jitter) == (1.0, 0.0)
    assert c.simple and not c.windowed and not c.timed


# ---------------------------------------------------------------------------
# the classic: consecutive failures


def test_opens_after_consecutive_failures_and_refuses_with_time_left(
    fake: FakeClock, seen: list[Event]
) -> None:
    b = CircuitBreaker("payments", BreakerConfig(open_duration=30.0))
    fail(b, 4)
    assert b.state is BreakerState.CLOSED
    fail(b)
    assert b.state is BreakerState.OPEN
    fake.advance(10)
    called = []
    with pytest.raises(CircuitOpenError) as info:
        b.call(called.append, 1)
    assert not called  # refused before the call
    assert info.value.breaker == "payments"
    assert info.value.remaining == pytest.approx(20.0)
    assert info.value.do_not_retry_above and not info.value.retryable
    assert b.retry_after() == pytest.approx(20.0)
    assert states(seen) == [("closed", "open", "consecutive_failures")]
    rejected = [e for e in seen if isinstance(e, CallRejected)]
    assert rejected[0].remaining == pytest.approx(20.0)


def test_a_success_resets_the_consecutive_count(fake: FakeClock) -> None:
    b = CircuitBreaker("x")
    for _ in range(3):
        fail(b, 4)
        assert b.call(ok) == "ok"
    assert b.state is BreakerState.CLOSED
    assert b.snapshot().consecutive_failures == 0


def test_half_open_probe_success_closes(fake: FakeClock, seen: list[Event]) -> None:
    b = CircuitBreaker("x")
    fail(b, 5)
    fake.advance(30)
    assert b.state is BreakerState.HALF_OPEN
    assert b.call(ok) == "ok"
    assert b.state is BreakerState.CLOSED
    assert [s[2] for s in states(seen)] == [
        "consecutive_failures",
        "open_elapsed",
        "probes_succeeded",
    ]


def test_half_open_probe_failure_reopens(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(open_duration=30.0))
    fail(b, 5)
    fake.advance(30)
    fail(b)
    assert b.state is BreakerState.OPEN
    assert b.retry_after() == pytest.approx(30.0)


def test_half_open_admits_only_its_permits(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_permits=2))
    fail(b, 5)
    fake.advance(30)
    first, second = b.allow(), b.allow()
    assert first.probe and second.probe
    with pytest.raises(CircuitOpenError):
        b.allow()
    first.success()
    with pytest.raises(CircuitOpenError):  # the permit is used, not given back
        b.allow()
    second.success()
    assert b.state is BreakerState.CLOSED


def test_a_probe_that_never_finishes_does_not_wedge_the_breaker(
    fake: FakeClock, seen: list[Event]
) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_timeout=5.0))
    fail(b, 5)
    fake.advance(30)
    stuck = b.allow()  # never settled in time
    with pytest.raises(CircuitOpenError) as info:
        b.allow()
    assert info.value.remaining == pytest.approx(5.0)
    fake.advance(5)
    assert b.state is BreakerState.OPEN  # decided without it: nothing succeeded
    assert states(seen)[-1] == ("half_open", "open", "probe_timeout")
    stuck.success()  # late: counts in no later period
    assert b.state is BreakerState.OPEN


def test_half_open_timeout_closes_when_some_probes_succeeded(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_permits=3, half_open_timeout=5.0))
    fail(b, 5)
    fake.advance(30)
    b.allow().success()
    b.allow()  # hangs
    fake.advance(5)
    assert b.state is BreakerState.CLOSED


def test_open_duration_grows_with_each_reopening_and_is_capped(fake: FakeClock) -> None:
    b = CircuitBreaker(
        "x", BreakerConfig(open_duration=1.0, open_backoff=2.0, max_open_duration=5.0)
    )
    fail(b, 5)
    seen_durations = []
    for _ in range(5):
        seen_durations.append(b.retry_after())
        fake.advance(b.retry_after())
        fail(b)  # the probe fails: re-open
    assert seen_durations == [1.0, 2.0, 4.0, 5.0, 5.0]
    fake.advance(b.retry_after())
    b.call(ok)  # closes: the growth starts over
    fail(b, 5)
    assert b.retry_after() == 1.0


def test_open_duration_jitter_stays_within_bounds(fake: FakeClock) -> None:
    config = BreakerConfig(open_duration=10.0, open_jitter=0.2, consecutive_failures=1)
    durations = set()
    for seed in range(20):
        b = CircuitBreaker("x", config, rng=random.Random(seed))
        fail(b)
        durations.add(b.retry_after())
    assert all(8.0 <= d <= 12.0 for d in durations)
    assert len(durations) > 10


# ---------------------------------------------------------------------------
# rate criteria over windows


def test_failure_rate_over_a_count_window(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=None,
        failure_rate_threshold=0.5,
        window_size=10,
        minimum_calls=10,
    )
    b = CircuitBreaker("x", config)
    for _ in range(4):
        b.call(ok)
        fail(b)
    assert b.failure_rate() is None  # 8 calls: below minimum_calls
    b.call(ok)
    assert b.state is BreakerState.CLOSED
    fail(b)  # 10 calls, 5 failures: 50%
    assert b.state is BreakerState.OPEN


def test_count_window_forgets_calls_beyond_its_size(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, window_size=4, minimum_calls=4
    )
    b = CircuitBreaker("x", config)
    fail(b)
    for _ in range(4):
        b.call(ok)
    assert b.failure_rate() == 0.0  # the failure fell out


def test_failure_rate_over_a_time_window(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=None,
        failure_rate_threshold=0.5,
        window="time",
        window_duration=10.0,
        window_buckets=10,
        minimum_calls=4,
    )
    b = CircuitBreaker("x", config)
    fail(b, 3)
    fake.advance(20)  # those failures are old news
    for _ in range(3):
        b.call(ok)
    fail(b)
    assert b.failure_rate() == 0.25
    assert b.state is BreakerState.CLOSED
    fail(b)
    assert b.state is BreakerState.CLOSED  # 2/5
    fail(b)  # 3/6
    assert b.state is BreakerState.OPEN


def test_slow_call_rate_counts_slow_successes(fake: FakeClock, seen: list[Event]) -> None:
    config = BreakerConfig(
        consecutive_failures=None,
        slow_call_rate_threshold=0.5,
        slow_call_duration=1.0,
        window_size=4,
        minimum_calls=4,
    )
    b = CircuitBreaker("x", config)

    def slow() -> str:
        fake.advance(2.0)
        return "late"

    b.call(ok)
    b.call(ok)
    b.call(slow)
    assert b.state is BreakerState.CLOSED
    b.call(slow)
    assert b.state is BreakerState.OPEN
    assert states(seen)[-1][2] == "slow_call_rate"
    assert b.snapshot().slow_call_rate == 0.5  # what tripped it stays visible while open
    fake.advance(30)
    b.call(ok)  # the probe closes it: counts start over
    assert b.snapshot().slow_calls == 0


def test_given_durations_decide_slowness_without_the_clock(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=None,
        slow_call_rate_threshold=1.0,
        slow_call_duration=0.5,
        window_size=2,
        minimum_calls=2,
    )
    b = CircuitBreaker("x", config)
    b.allow().success(duration=0.9)
    b.allow().failure(Boom(), duration=0.6)
    assert b.state is BreakerState.OPEN


@dataclass
class EveryThirdCall:
    """A custom trip policy: opens on the third recorded call, whatever it was."""

    seen: list[tuple[bool, bool]] = field(default_factory=list)

    def record(self, failed: bool, slow: bool, duration: float | None, now: float) -> bool:
        self.seen.append((failed, slow))
        return len(self.seen) >= 3

    def reset(self) -> None:
        self.seen.clear()


def test_custom_trip_policy(fake: FakeClock, seen: list[Event]) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=None, trip_policy=EveryThirdCall))
    b.call(ok)
    fail(b)
    b.call(ok)
    assert b.state is BreakerState.OPEN
    assert states(seen)[-1][2] == "custom"


# ---------------------------------------------------------------------------
# what counts


def test_ignored_errors_count_as_nothing_by_default(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=2, ignore_on=KeyError))
    fail(b)
    for _ in range(5):
        with pytest.raises(KeyError):
            b.call({}.__getitem__, "missing")
    assert b.snapshot().consecutive_failures == 1
    fail(b)
    assert b.state is BreakerState.OPEN


def test_ignored_errors_may_count_as_successes(fake: FakeClock) -> None:
    config = BreakerConfig(consecutive_failures=2, ignore_on=KeyError, ignored_counts_as="success")
    b = CircuitBreaker("x", config)
    fail(b)
    with pytest.raises(KeyError):
        b.call({}.__getitem__, "missing")
    assert b.snapshot().consecutive_failures == 0


def test_errors_outside_failure_on_count_as_successes(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, failure_on=ConnectionError))
    fail(b, 3)  # Boom is the caller's bug, not the dependency's health
    assert b.state is BreakerState.CLOSED
    with pytest.raises(ConnectionError):
        b.call(_raise, ConnectionError())
    assert b.state is BreakerState.OPEN


def test_failure_on_accepts_a_predicate(fake: FakeClock) -> None:
    config = BreakerConfig(consecutive_failures=1, failure_on=lambda e: "timeout" in str(e))
    b = CircuitBreaker("x", config)
    with pytest.raises(Boom):
        b.call(_raise, Boom("refused"))
    assert b.state is BreakerState.CLOSED
    with pytest.raises(Boom):
        b.call(_raise, Boom("read timeout"))
    assert b.state is BreakerState.OPEN


def test_results_can_be_failures(fake: FakeClock) -> None:
    config = BreakerConfig(consecutive_failures=2, record_result=lambda r: r >= 500)
    b = CircuitBreaker("x", config)
    assert b.call(lambda: 503) == 503  # returned as is...
    b.call(lambda: 200)
    b.call(lambda: 500)
    b.call(lambda: 502)
    assert b.state is BreakerState.OPEN  # ...but counted


# ---------------------------------------------------------------------------
# server-given delays


def test_a_result_with_retry_after_forces_the_breaker_open_for_that_long(
    fake: FakeClock, seen: list[Event]
) -> None:
    b = CircuitBreaker("x", BreakerConfig(result_delay=_delay))  # type: ignore[arg-type]
    assert b.call(Response, 503, 42.0).status == 503
    assert b.state is BreakerState.OPEN
    assert b.retry_after() == pytest.approx(42.0)
    assert states(seen)[-1] == ("closed", "open", "server_delay")


def test_absurd_or_garbage_hints_are_ignored_with_an_event(
    fake: FakeClock, seen: list[Event]
) -> None:
    config = BreakerConfig(result_delay=_delay, max_server_delay=60.0)  # type: ignore[arg-type]
    b = CircuitBreaker("x", config)
    b.call(Response, 503, 3600.0)
    b.call(Response, 503, "soon")
    b.call(Response, 503, -1.0)
    b.call(Response, 503, math.nan)
    assert b.state is BreakerState.CLOSED
    ignored = [e for e in seen if isinstance(e, HintIgnored)]
    assert len(ignored) == 4
    assert "max_server_delay" in ignored[0].reason


def test_an_error_carrying_retry_after_opens_when_honoured(fake: FakeClock) -> None:
    error = RecoveryError("slow down", retry_after=7.0)
    plain = CircuitBreaker("plain")
    with pytest.raises(RecoveryError):
        plain.call(_raise, error)
    assert plain.state is BreakerState.CLOSED
    honouring = CircuitBreaker("honouring", BreakerConfig(honor_server_delay=True))
    with pytest.raises(RecoveryError):
        honouring.call(_raise, error)
    assert honouring.state is BreakerState.OPEN
    assert honouring.retry_after() == pytest.approx(7.0)


# ---------------------------------------------------------------------------
# late outcomes, cancellation


def test_a_late_failure_never_extends_an_open_period(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, open_duration=30.0))
    slow_call = b.allow()  # granted while closed
    fail(b)  # opens
    fake.advance(20)
    slow_call.failure(Boom())  # arrives 20 s into the open period
    assert b.retry_after() == pytest.approx(10.0)
    fake.advance(10)
    assert b.state is BreakerState.HALF_OPEN


def test_a_late_success_does_not_close(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    slow_call = b.allow()
    fail(b)
    slow_call.success()
    assert b.state is BreakerState.OPEN


def _sync_face(b: CircuitBreaker, face: str) -> Callable[[Callable[[], str]], str]:
    if face == "call":
        return lambda fn: b.call(fn)
    return lambda fn: b(fn)()


@pytest.mark.parametrize("face", ["call", "decorator"])
def test_a_late_failure_on_the_fast_path_never_counts_in_a_later_period(
    fake: FakeClock, face: str
) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, open_duration=1.0))
    run = _sync_face(b, face)

    def recovers_meanwhile() -> str:
        fail(b)  # another caller trips it...
        fake.advance(1.0)
        b.call(ok)  # ...and a probe closes it again
        raise Boom("late")

    with pytest.raises(Boom):
        run(recovers_meanwhile)
    assert b.state is BreakerState.CLOSED  # the failure belongs to the earlier period


@pytest.mark.parametrize("face", ["call", "decorator"])
def test_a_late_success_on_the_fast_path_never_counts_in_a_later_period(
    fake: FakeClock, face: str
) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=2, open_duration=1.0))
    run = _sync_face(b, face)

    def recovers_then_fails_meanwhile() -> str:
        fail(b, 2)
        fake.advance(1.0)
        b.call(ok)
        fail(b)  # one failure of the new period
        return "late"

    assert run(recovers_then_fails_meanwhile) == "late"
    assert b.snapshot().consecutive_failures == 1  # not wiped by the late success


@pytest.mark.parametrize("listening", [False, True])
def test_an_ignored_error_never_counts_even_with_a_server_delay(
    fake: FakeClock, listening: bool
) -> None:
    # ignore_on wins on every path: the fast one (nobody listening), the
    # slow one (somebody listening), and the permit API.
    b = CircuitBreaker("x", BreakerConfig(ignore_on=RecoveryError, honor_server_delay=True))
    unsubscribe = b.events.subscribe(lambda e: None) if listening else None
    try:
        with pytest.raises(RecoveryError):
            b.call(_raise, RecoveryError("busy", retry_after=5.0))
        b.allow().failure(RecoveryError("busy", retry_after=5.0))
    finally:
        if unsubscribe is not None:
            unsubscribe()
    assert b.state is BreakerState.CLOSED


def test_cancellation_counts_nothing_and_frees_the_probe(fake: FakeClock) -> None:
    b = CircuitBreaker("x")
    fail(b, 5)
    fake.advance(30)
    with pytest.raises(KeyboardInterrupt):
        b.call(_raise, KeyboardInterrupt())
    assert b.state is BreakerState.HALF_OPEN  # neither closed nor re-opened
    assert b.allow().probe  # the permit came back


def test_cancellation_on_the_fast_path_counts_nothing(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    for exc in (KeyboardInterrupt(), SystemExit(), GeneratorExit(), asyncio.CancelledError()):
        with pytest.raises(BaseException) as info:
            b.call(_raise, exc)
        assert info.value is exc
    assert b.state is BreakerState.CLOSED


WINDOWED = BreakerConfig(consecutive_failures=1, keep_window=True, minimum_calls=1)


def test_a_late_outcome_on_the_windowed_path_does_not_count(fake: FakeClock) -> None:
    b = CircuitBreaker("x", WINDOWED)

    def opens_meanwhile() -> str:
        b.allow().failure(Boom())  # another caller trips the breaker during this call
        return "late"

    assert b.call(opens_meanwhile) == "late"
    assert b.state is BreakerState.OPEN
    assert b.snapshot().calls == 1  # the late success was not recorded


def test_cancellation_on_the_windowed_path_counts_nothing(fake: FakeClock) -> None:
    b = CircuitBreaker("x", WINDOWED)
    with pytest.raises(KeyboardInterrupt):
        b.call(_raise, KeyboardInterrupt())
    assert b.snapshot().calls == 0
    assert b.state is BreakerState.CLOSED


def test_a_permit_settles_once(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=2))
    permit = b.allow()
    permit.failure(Boom())
    permit.failure(Boom())
    permit.cancel()
    assert b.snapshot().consecutive_failures == 1


def test_failure_with_a_cancellation_counts_nothing(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    b.allow().failure(asyncio.CancelledError())
    assert b.state is BreakerState.CLOSED


# ---------------------------------------------------------------------------
# manual states


def test_isolate_refuses_everything_until_reset(fake: FakeClock) -> None:
    b = CircuitBreaker("x")
    b.isolate()
    assert b.state is BreakerState.FORCED_OPEN
    with pytest.raises(CircuitOpenError) as info:
        b.call(ok)
    assert info.value.remaining == math.inf
    fake.advance(1e6)
    assert b.retry_after() == math.inf
    b.reset()
    assert b.call(ok) == "ok"


def test_disabled_passes_everything_and_records_nothing(fake: FakeClock, seen: list[Event]) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    b.disable()
    seen.clear()
    fail(b, 10)
    assert b.state is BreakerState.DISABLED
    assert b.snapshot().consecutive_failures == 0
    assert not seen


def test_metrics_only_reports_a_shadow_trip_but_never_refuses(
    fake: FakeClock, seen: list[Event]
) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=3))
    b.metrics_only()
    fail(b, 7)  # one would-be trip: the criterion holds from the 3rd failure on
    assert b.call(ok) == "ok"  # ends it
    fail(b, 3)  # a second one
    assert b.state is BreakerState.METRICS_ONLY
    assert [e.reason for e in seen if isinstance(e, ShadowTrip)] == ["consecutive_failures"] * 2


def test_reset_clears_counts(fake: FakeClock) -> None:
    b = CircuitBreaker("x")
    fail(b, 4)
    b.reset()
    fail(b, 4)
    assert b.state is BreakerState.CLOSED


def test_reconfigure_keeps_the_state(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(open_duration=30.0))
    fail(b, 5)
    b.reconfigure(BreakerConfig(open_duration=5.0, consecutive_failures=2))
    assert b.state is BreakerState.OPEN
    assert b.retry_after() == pytest.approx(30.0)  # the current period is kept
    fake.advance(30)
    b.call(ok)
    fail(b, 2)  # the new threshold
    assert b.retry_after() == pytest.approx(5.0)


def test_reconfigure_to_a_window_starts_measuring(fake: FakeClock) -> None:
    b = CircuitBreaker("x")
    assert b.failure_rate() is None
    b.reconfigure(BreakerConfig(keep_window=True, minimum_calls=2))
    b.call(ok)
    fail(b)
    assert b.failure_rate() == 0.5


# ---------------------------------------------------------------------------
# faces


def test_decorator_keeps_the_signature(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))

    @b
    def add(a: int, b: int = 2) -> int:
        """Add."""
        return a + b

    assert add(1) == 3
    assert add.__name__ == "add" and add.__doc__ == "Add."
    assert list(inspect.signature(add).parameters) == ["a", "b"]


def test_with_block_truly_blocks_when_open(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    with pytest.raises(Boom), b:
        raise Boom()
    ran = []
    with pytest.raises(CircuitOpenError), b:
        ran.append(1)
    assert not ran


def test_with_blocks_nest(fake: FakeClock) -> None:
    outer = CircuitBreaker("outer", BreakerConfig(consecutive_failures=1))
    inner = CircuitBreaker("inner", BreakerConfig(consecutive_failures=1))
    with pytest.raises(Boom), outer, inner:
        raise Boom()
    assert outer.state is inner.state is BreakerState.OPEN


def test_sync_faces_refuse_an_async_store() -> None:
    class FakeShared:
        kind = "fake"
        is_async = True

        def script(self, source: str) -> object:
            return source

        def attach(self, link: object) -> None:
            pass

    b = CircuitBreaker("x", store=FakeShared())
    assert b.shared
    with pytest.raises(TypeError, match="allow_async"):
        b.allow()
    with pytest.raises(TypeError, match="async store"):
        b(ok)
    with pytest.raises(TypeError, match="reset_async"):
        b.reset()


def test_store_must_be_a_store() -> None:
    with pytest.raises(TypeError, match=r"CircuitBreaker\.store"):
        CircuitBreaker("x", store=object())
    with pytest.raises(TypeError, match=r"CircuitBreaker\.name"):
        CircuitBreaker("")


def test_memory_store_shares_state_by_name(fake: FakeClock) -> None:
    store = MemoryStore()
    a = CircuitBreaker("db", store=store)
    b = CircuitBreaker("db", store=store)
    fail(a, 5)
    assert b.state is BreakerState.OPEN
    assert CircuitBreaker("other", store=store).state is BreakerState.CLOSED


# ---------------------------------------------------------------------------
# events: only when listening


def test_outcome_events_when_listening(fake: FakeClock, seen: list[Event]) -> None:
    b = CircuitBreaker("x")
    b.call(ok)
    fail(b)
    outcomes = [(e.outcome, e.error_type) for e in seen if isinstance(e, OutcomeRecorded)]
    assert outcomes == [("success", None), ("failure", "Boom")]
    assert all(e.operation == "x" and e.area == "breaker" for e in seen)


def test_breaker_bus_receives_its_own_events(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    got: list[Event] = []
    b.events.subscribe(got.append)
    fail(b)
    assert [type(e).__name__ for e in got] == [
        "OutcomeRecorded",
        "BreakerStateChanged",
    ]


def test_snapshot(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(keep_window=True, minimum_calls=1, open_duration=30.0))
    b.call(ok)
    fail(b, 5)
    with pytest.raises(CircuitOpenError):
        b.call(ok)
    snap = b.snapshot()
    assert snap.state is BreakerState.OPEN
    assert (snap.opened, snap.rejected, snap.shared) == (1, 1, False)
    assert snap.retry_after == pytest.approx(30.0)


# ---------------------------------------------------------------------------
# threads


def test_threads_never_lose_an_outcome(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=None, keep_window=True, window_size=10_000, minimum_calls=1
    )
    b = CircuitBreaker("x", config)
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        start.wait()
        for n in range(500):
            if (i + n) % 4 == 0:
                with pytest.raises(Boom):
                    b.call(boom)
            else:
                b.call(ok)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = b.snapshot()
    assert (snap.calls, snap.failures) == (4000, 1000)


def test_threads_never_get_more_probes_than_permits(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(half_open_permits=3))
    fail(b, 5)
    fake.advance(30)
    granted, refused = [], []
    start = threading.Barrier(16)

    def worker() -> None:
        start.wait()
        for _ in range(50):
            try:
                granted.append(b.allow())
            except CircuitOpenError:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 3 and len(refused) == 16 * 50 - 3


def test_threads_trip_a_breaker_once(fake: FakeClock, seen: list[Event]) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=20))
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for _ in range(100):
            with contextlib.suppress(Boom, CircuitOpenError):
                b.call(boom)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert states(seen) == [("closed", "open", "consecutive_failures")]


# ---------------------------------------------------------------------------
# asyncio and trio


async def aok() -> str:
    return "ok"


async def aboom() -> None:
    raise Boom()


@pytest.mark.anyio
async def test_async_faces(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=2))

    @b
    async def guarded(x: int) -> int:
        return x * 2

    assert await guarded(2) == 4
    assert inspect.iscoroutinefunction(guarded)
    assert await b.call_async(aok) == "ok"
    with pytest.raises(Boom):
        await b.call_async(aboom)
    with pytest.raises(Boom):
        async with b:
            raise Boom()
    ran = []
    with pytest.raises(CircuitOpenError):
        async with b:
            ran.append(1)
    assert not ran
    with pytest.raises(CircuitOpenError):
        await guarded(1)


@pytest.mark.anyio
@pytest.mark.parametrize("face", ["call_async", "decorator"])
async def test_a_late_async_failure_on_the_fast_path_never_counts_in_a_later_period(
    fake: FakeClock, face: str
) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, open_duration=1.0))

    async def recovers_meanwhile() -> str:
        fail(b)
        fake.advance(1.0)
        b.call(ok)
        raise Boom("late")

    guarded = recovers_meanwhile if face == "call_async" else b(recovers_meanwhile)
    with pytest.raises(Boom):
        await (b.call_async(guarded) if face == "call_async" else guarded())
    assert b.state is BreakerState.CLOSED


@pytest.mark.anyio
async def test_async_slow_path_and_permits(fake: FakeClock, seen: list[Event]) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    permit = await b.allow_async()
    await permit.failure_async(Boom())
    assert b.state is BreakerState.OPEN
    fake.advance(30)
    permit = await b.allow_async()
    await permit.success_async()
    assert b.state is BreakerState.CLOSED


@pytest.mark.anyio
async def test_cancelled_async_call_counts_nothing_and_frees_the_probe(
    fake: FakeClock, anyio_backend: str
) -> None:
    import anyio

    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    started = anyio.Event()

    async def hang() -> None:
        started.set()
        await anyio.sleep_forever()

    # closed state, fast path
    async with anyio.create_task_group() as tg:
        tg.start_soon(b.call_async, hang)
        await started.wait()
        tg.cancel_scope.cancel()
    assert b.state is BreakerState.CLOSED
    # half-open probe, slow path
    fail(b)
    fake.advance(30)
    started = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(b.call_async, hang)
        await started.wait()
        tg.cancel_scope.cancel()
    assert b.state is BreakerState.HALF_OPEN
    assert (await b.allow_async()).probe


@pytest.mark.anyio
async def test_cancelled_async_call_on_the_windowed_path_counts_nothing(fake: FakeClock) -> None:
    import anyio

    b = CircuitBreaker("x", WINDOWED)
    started = anyio.Event()

    async def hang() -> None:
        started.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(b.call_async, hang)
        await started.wait()
        tg.cancel_scope.cancel()
    assert b.snapshot().calls == 0
    with pytest.raises(Boom):
        await b.call_async(aboom)
    assert b.state is BreakerState.OPEN


@pytest.mark.anyio
async def test_cancelled_async_with_block_frees_the_probe(fake: FakeClock) -> None:
    import anyio

    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1))
    fail(b)
    fake.advance(30)
    with anyio.CancelScope() as scope:
        async with b:
            scope.cancel()
            await anyio.sleep(1)
    assert b.state is BreakerState.HALF_OPEN
    assert (await b.allow_async()).probe


# ---------------------------------------------------------------------------
# hypothesis: the breaker's promises under any sequence of calls and time

from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from datapunk_recovery._core import clock as _clock  # noqa: E402
from datapunk_recovery.breaker import Permit  # noqa: E402


class BreakerMachine(RuleBasedStateMachine):
    """No call passes while open; half-open never admits more than its permits.

    The breaker is watched only from the outside: its events and its answers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fake = FakeClock(0.0)
        self.previous = _clock.current_fake()
        _clock.use_clock(self.fake)
        self.held: list[Permit] = []
        self.open_until = -1.0  # end of the current open period, by the events
        self.half_open_gen = 0
        self.probes = 0  # probes granted (minus cancelled) in the current half-open
        self.permits = 1

    @initialize(
        permits=st.integers(1, 3),
        threshold=st.integers(1, 4),
        rate=st.none() | st.sampled_from([0.3, 0.5, 1.0]),
        window=st.sampled_from(["count", "time"]),
    )
    def make(self, permits: int, threshold: int, rate: float | None, window: str) -> None:
        self.permits = permits
        config = BreakerConfig(
            consecutive_failures=threshold,
            failure_rate_threshold=rate,
            window=window,  # type: ignore[arg-type]
            window_size=5,
            window_duration=5.0,
            window_buckets=5,
            minimum_calls=3,
            half_open_permits=permits,
            half_open_timeout=3.0,
            open_duration=2.0,
            open_backoff=2.0,
            max_open_duration=8.0,
        )
        self.b = CircuitBreaker("m", config)
        self.b.events.subscribe(self.watch)

    def watch(self, event: Event) -> None:
        if isinstance(event, BreakerStateChanged):
            self.probes = 0
            self.open_until = -1.0
            if event.to_state is BreakerState.OPEN:
                self.open_until = event.at + self.b.retry_after()

    def teardown(self) -> None:
        _clock.use_clock(self.previous)

    def _admit(self) -> Permit | None:
        before = self.b.retry_after()
        try:
            permit = self.b.allow()
        except CircuitOpenError:
            assert before > 0 or self.b.state is BreakerState.HALF_OPEN
            return None
        now = self.fake.now()
        assert now >= self.open_until, "a call passed while open"
        assert self.b.state is not BreakerState.FORCED_OPEN
        if permit.probe:
            self.probes += 1
            assert self.probes <= self.permits, "half-open admitted more than its permits"
        return permit

    @rule(failed=st.booleans())
    def call_now(self, failed: bool) -> None:
        permit = self._admit()
        if permit is not None:
            if failed:
                permit.failure(Boom())
            else:
                permit.success()

    @rule()
    def start_call(self) -> None:
        permit = self._admit()
        if permit is not None:
            self.held.append(permit)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data(), how=st.sampled_from(["success", "failure", "cancel"]))
    def finish_call(self, data: st.DataObject, how: str) -> None:
        permit = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        if how == "cancel":
            if permit.probe and self.b._core.gen == permit._gen:
                self.probes -= 1
            permit.cancel()
        elif how == "failure":
            permit.failure(Boom())
        else:
            permit.success()

    @rule(dt=st.sampled_from([0.1, 0.5, 1.0, 2.0, 3.0, 10.0]))
    def advance(self, dt: float) -> None:
        self.fake.advance(dt)

    @rule()
    def isolate_then_reset(self) -> None:
        self.b.isolate()
        with pytest.raises(CircuitOpenError):
            self.b.allow()
        self.b.reset()

    @invariant()
    def retry_after_matches_admission(self) -> None:
        if not hasattr(self, "b"):
            return
        state = self.b.state
        wait = self.b.retry_after()
        if state is BreakerState.CLOSED:
            assert wait == 0
        elif state is BreakerState.OPEN:
            assert 0 < wait <= 8.0 + 1e-9


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


class WindowRates(RuleBasedStateMachine):
    """Rates read from a breaker equal a naive model's, over both window kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.fake = FakeClock(0.0)
        self.previous = _clock.current_fake()
        _clock.use_clock(self.fake)
        self.log: list[tuple[float, bool]] = []

    @initialize(window=st.sampled_from(["count", "time"]), minimum=st.integers(1, 4))
    def make(self, window: str, minimum: int) -> None:
        self.window = window
        self.minimum = minimum
        config = BreakerConfig(
            consecutive_failures=None,
            keep_window=True,
            window=window,  # type: ignore[arg-type]
            window_size=6,
            window_duration=4.0,
            window_buckets=4,
            minimum_calls=minimum,
        )
        self.b = CircuitBreaker("rates", config)

    def teardown(self) -> None:
        _clock.use_clock(self.previous)

    @rule(failed=st.booleans())
    def call(self, failed: bool) -> None:
        if failed:
            fail(self.b)
        else:
            self.b.call(ok)
        self.log.append((self.fake.now(), failed))

    @rule(dt=st.sampled_from([0.3, 1.0, 2.5]))
    def advance(self, dt: float) -> None:
        self.fake.advance(dt)

    @invariant()
    def rate_is_right(self) -> None:
        if not hasattr(self, "b"):
            return
        if self.window == "count":
            live = [f for _, f in self.log[-6:]]
        else:
            epoch = math.floor(self.fake.now())
            live = [f for t, f in self.log if math.floor(t) > epoch - 4]
        expected = sum(live) / len(live) if len(live) >= self.minimum else None
        assert self.b.failure_rate() == expected


TestWindowRates = WindowRates.TestCase
TestWindowRates.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
