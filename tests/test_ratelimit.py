"""The client-side rate limiter: token bucket, reserve-then-wait, 429 drain, per-caller quotas."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import pytest

from datapunk_recovery._core import events
from datapunk_recovery._core.errors import DeadlineExceeded, ErrorCategory, RecoveryError
from datapunk_recovery._execution.deadline import deadline
from datapunk_recovery.flow.bulkhead import as_caller
from datapunk_recovery.flow.ratelimit import (
    RateLimitAdmitted,
    RateLimitDrained,
    RateLimiter,
    RateLimiterConfig,
    RateLimitExceeded,
    RateLimitRejected,
    throttled_429,
)
from datapunk_recovery.testing import fake_clock


@dataclass
class Response:
    status_code: int
    headers: dict[str, str] = field(default_factory=dict)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.0005)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rate": 0}, r"RateLimiterConfig.rate: must be > 0"),
        ({"burst": 0}, r"RateLimiterConfig.burst: must be >= 1"),
        ({"max_wait": -1}, r"RateLimiterConfig.max_wait: must be >= 0"),
        ({"per_caller_rate": 0.0}, r"RateLimiterConfig.per_caller_rate: must be > 0"),
        ({"throttled": 429}, r"RateLimiterConfig.throttled: expected a callable"),
    ],
)
def test_config_is_validated(changes: dict[str, object], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        RateLimiterConfig(**changes)  # type: ignore[arg-type]


def test_a_burst_then_the_rate() -> None:
    with fake_clock() as clock:
        limiter = RateLimiter("api", RateLimiterConfig(rate=10, burst=5))
        assert [limiter.try_acquire() for _ in range(6)] == [True] * 5 + [False]
        clock.advance(0.1)  # one token per 0.1 s
        assert limiter.try_acquire()
        assert not limiter.try_acquire()
        clock.advance(60.0)  # refills up to the burst, never beyond
        assert sum(limiter.try_acquire() for _ in range(10)) == 5


def test_reserve_then_wait_serves_callers_in_turn() -> None:
    with fake_clock() as clock:
        limiter = RateLimiter("api", RateLimiterConfig(rate=10, burst=1, max_wait=1.0))
        for _ in range(4):
            limiter.acquire()
        # The first token was there; each next one came 0.1 s after the previous.
        assert clock.slept == pytest.approx([0.1, 0.1, 0.1])
        assert clock.now() == pytest.approx(0.3)


def test_a_wait_longer_than_max_wait_is_refused_without_taking_a_token() -> None:
    seen: list[events.Event] = []
    with fake_clock():
        limiter = RateLimiter("api", RateLimiterConfig(rate=2, burst=1, max_wait=0.2))
        limiter.bus.subscribe(seen.append)
        limiter.acquire()
        with pytest.raises(RateLimitExceeded, match=r"next token is 0\.500 s away") as info:
            limiter.acquire()
        assert info.value.retry_after == pytest.approx(0.5)
        assert info.value.do_not_retry_above
        assert limiter.tokens == 0.0  # nothing reserved by the refused call
    assert [type(e) for e in seen] == [RateLimitAdmitted, RateLimitRejected]


def test_a_wait_that_would_end_past_the_deadline_is_not_started() -> None:
    with fake_clock() as clock:
        limiter = RateLimiter("api", RateLimiterConfig(rate=1, burst=1, max_wait=10.0))
        limiter.acquire()
        with deadline(0.5), pytest.raises(DeadlineExceeded, match="after the deadline"):
            limiter.acquire()
        assert clock.slept == []


def test_a_429_result_drains_the_bucket_for_the_servers_retry_after() -> None:
    seen: list[events.Event] = []
    with fake_clock() as clock:
        limiter = RateLimiter("api", RateLimiterConfig(rate=100, burst=100))
        limiter.bus.subscribe(seen.append)
        assert limiter.call(Response, 429, {"Retry-After": "2"}).status_code == 429
        assert not limiter.try_acquire()
        clock.advance(1.99)
        assert not limiter.try_acquire()
        clock.advance(0.01)
        assert limiter.try_acquire()
    drained = [e for e in seen if isinstance(e, RateLimitDrained)]
    assert [e.retry_after for e in drained] == [2.0]


def test_a_rate_limited_error_drains_too() -> None:
    with fake_clock() as clock:
        limiter = RateLimiter("api", RateLimiterConfig(rate=100, burst=100))

        def throttled() -> None:
            raise RecoveryError("slow down", category=ErrorCategory.RATE_LIMITED, retry_after=1)

        with pytest.raises(RecoveryError):
            limiter.call(throttled)
        assert not limiter.try_acquire()
        clock.advance(1.0)
        assert limiter.try_acquire()


@pytest.mark.parametrize(
    ("response", "verdict"),
    [
        (Response(200), None),
        (Response(429), True),
        (Response(429, {"Retry-After": "2"}), 2.0),
        (Response(429, {"Retry-After": " 2\t"}), 2.0),
        (Response(429, {"Retry-After": b"2"}), 2.0),
        (Response(429, {"Retry-After": "9" * 400}), 1e15),  # absurd: max_drain caps it
        (Response(429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), True),
        (Response(429, {"Retry-After": "-3"}), True),
        # Only ASCII digits are delta-seconds (RFC 9110): the rest drains without a duration.
        (Response(429, {"Retry-After": "1.5"}), True),
        (Response(429, {"Retry-After": "1e3"}), True),
        (Response(429, {"Retry-After": "1_000"}), True),
        (Response(429, {"Retry-After": "+5"}), True),
        (Response(429, {"Retry-After": "\u0661\u0662"}), True),
        (Response(429, {"Retry-After": 5}), True),
        ("not a response", None),
    ],
)
def test_the_default_throttle_detector(response: object, verdict: object) -> None:
    assert throttled_429(response) == verdict


def test_drain_caps_absurd_server_delays() -> None:
    with fake_clock() as clock:
        limiter = RateLimiter("api", RateLimiterConfig(rate=1, burst=1, max_drain=5.0))
        limiter.drain(1e9)
        clock.advance(5.0)
        assert limiter.try_acquire()
        limiter.drain(float("nan"))  # garbage: drained, no duration
        clock.advance(1.0)
        assert limiter.try_acquire()
        limiter.drain(10**400)  # beyond float range: absurd, capped
        clock.advance(4.99)
        assert not limiter.try_acquire()


def test_a_detector_answering_garbage_drains_without_a_duration_and_says_so() -> None:
    seen: list[events.Event] = []
    config = RateLimiterConfig(rate=1, burst=1, throttled=lambda result: "soon")  # type: ignore[arg-type,return-value]
    with fake_clock() as clock:
        limiter = RateLimiter("api", config)
        limiter.bus.subscribe(seen.append)
        assert limiter.call(lambda: "throttled") == "throttled"
        assert not limiter.try_acquire()
        clock.advance(1.0)
        assert limiter.try_acquire()
    assert [e.value for e in seen if isinstance(e, events.HintIgnored)] == ["'soon'"]
    assert [e.retry_after for e in seen if isinstance(e, RateLimitDrained)] == [None]


def test_per_caller_quota_keeps_one_caller_from_using_the_whole_rate() -> None:
    config = RateLimiterConfig(rate=100, burst=100, per_caller_rate=1, per_caller_burst=2)
    with fake_clock():
        limiter = RateLimiter("api", config)
        with as_caller("noisy"):
            assert [limiter.try_acquire() for _ in range(3)] == [True, True, False]
        assert limiter.try_acquire("quiet")
        assert limiter.try_acquire()  # no caller: only the shared bucket


def test_idle_callers_are_forgotten_beyond_max_callers() -> None:
    config = RateLimiterConfig(rate=1000, burst=1000, per_caller_rate=1, max_callers=2)
    with fake_clock() as clock:
        limiter = RateLimiter("api", config)
        limiter.try_acquire("a")
        limiter.try_acquire("b")
        clock.advance(100.0)  # both idle again
        limiter.try_acquire("c")
        assert len(limiter._callers) == 1


def test_threads_under_load_never_get_more_than_burst_plus_rate() -> None:
    with fake_clock() as clock:
        limiter = RateLimiter("api", RateLimiterConfig(rate=8, burst=5))
        granted = [0] * 4
        stop = threading.Event()

        def hammer(i: int) -> None:
            while not stop.is_set():
                if limiter.try_acquire():
                    granted[i] += 1

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            for _ in range(40):
                wait_until(lambda: limiter.tokens < 1.0)  # the hammering took every token
                clock.advance(0.125)  # ...one more token (binary-exact time steps)
            wait_until(lambda: limiter.tokens < 1.0)
        finally:
            stop.set()
            for t in threads:
                t.join()
    # burst 5 at t=0, then 8/s for 5 s: exactly 45, never one more.
    assert sum(granted) == 45


@pytest.mark.anyio
async def test_async_waits_follow_the_fake_clock() -> None:
    with fake_clock() as clock:
        limiter = RateLimiter("api", RateLimiterConfig(rate=4, burst=1, max_wait=1.0))

        @limiter
        async def ping() -> str:
            return "pong"

        assert [await ping() for _ in range(3)] == ["pong"] * 3
        assert clock.slept == [0.25, 0.25]


@pytest.mark.anyio
async def test_a_caller_cancelled_while_waiting_gives_its_token_back() -> None:
    limiter = RateLimiter("api", RateLimiterConfig(rate=0.01, burst=1, max_wait=1000.0))
    await limiter.acquire_async()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await limiter.acquire_async()  # reserves, then is cancelled at its first checkpoint
    assert scope.cancelled_caught
    assert limiter.tokens > -0.5  # the reservation was returned


# -- reload (issue 14, item 1) ------------------------------------------------------


def test_reconfigure_keeps_the_tokens_spent_and_never_hands_out_a_fresh_burst() -> None:
    with fake_clock() as clock:
        limiter = RateLimiter("api", RateLimiterConfig(rate=1.0, burst=5))
        assert all(limiter.try_acquire() for _ in range(5))
        assert not limiter.try_acquire()
        for burst in (10, 5, 20):  # reloads, some with a bigger burst
            limiter.reconfigure(RateLimiterConfig(rate=1.0, burst=burst))
            assert not limiter.try_acquire()
        clock.advance(1.0)
        limiter.reconfigure(RateLimiterConfig(rate=2.0, burst=20))  # 1 s at the old rate
        assert limiter.try_acquire()
        assert not limiter.try_acquire()
        clock.advance(1.0)  # then the new rate: two tokens a second
        assert limiter.try_acquire() and limiter.try_acquire()
        assert not limiter.try_acquire()
        limiter.reconfigure(RateLimiterConfig(rate=2.0, burst=1))  # clamped, never raised
        assert limiter.tokens <= 1.0


def test_reconfigure_keeps_each_callers_bucket() -> None:
    with fake_clock():
        config = RateLimiterConfig(rate=100.0, burst=100, per_caller_rate=1.0, per_caller_burst=2)
        limiter = RateLimiter("api", config)
        assert limiter.try_acquire("tenant") and limiter.try_acquire("tenant")
        assert not limiter.try_acquire("tenant")
        limiter.reconfigure(
            RateLimiterConfig(rate=100.0, burst=100, per_caller_rate=1.0, per_caller_burst=5)
        )
        assert not limiter.try_acquire("tenant")
        with pytest.raises(
            TypeError, match=r"RateLimiter\.reconfigure: expected a RateLimiterConfig"
        ):
            limiter.reconfigure({"rate": 1})  # type: ignore[arg-type]
