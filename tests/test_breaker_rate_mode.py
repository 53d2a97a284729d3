"""Issue 17 item 4: the "rate" half-open decision, waiting for probes for ever,
the open period after a half-open time limit, and shadow mode that keeps its counts.

In-process breakers run on a fake clock; the shared (Redis) ones on a real
Redis, with the shared state's times written into Redis instead of waited for.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._core.errors import CircuitOpenError
from datapunk_recovery._core.events import Event
from datapunk_recovery.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStateChanged,
    CircuitBreaker,
    Permit,
    ShadowTrip,
)
from datapunk_recovery.stores.redis import RedisStore
from datapunk_recovery.testing import fake_clock
from tests.breaker_helpers import Boom
from tests.harness import RedisServer


def rate_config(**overrides: Any) -> BreakerConfig:
    settings: dict[str, Any] = {
        "consecutive_failures": 1,
        "failure_rate_threshold": 0.5,
        "half_open_decision": "rate",
        "half_open_permits": 4,
        "open_duration": 30.0,
    }
    settings.update(overrides)
    return BreakerConfig(**settings)


def half_open(b: CircuitBreaker, fake: FakeClock) -> None:
    """Trip ``b`` with one failure, then let its open period pass."""
    b.allow().failure(Boom())
    assert b.state is BreakerState.OPEN
    fake.advance(b.config.open_duration)
    assert b.state is BreakerState.HALF_OPEN


def probes(b: CircuitBreaker, outcomes: str) -> None:
    """Settle one probe per letter: F failed, S succeeded, W slow success."""
    permits = [b.allow() for _ in outcomes]
    assert all(p.probe for p in permits)
    for permit, outcome in zip(permits, outcomes, strict=True):
        if outcome == "F":
            permit.failure(Boom())
        elif outcome == "W":
            permit.success(duration=5.0)
        else:
            permit.success(duration=0.1)


# -- validation ---------------------------------------------------------------------------


def test_half_open_decision_defaults_to_first_failure_and_a_finite_limit() -> None:
    config = BreakerConfig()
    assert config.half_open_decision == "first_failure"
    assert config.half_open_timeout is not None and math.isfinite(config.half_open_timeout)


@pytest.mark.parametrize("value", ["majority", "", None, 1])
def test_an_unknown_half_open_decision_is_refused_by_name(value: object) -> None:
    with pytest.raises(ValueError, match=r"BreakerConfig\.half_open_decision"):
        BreakerConfig(half_open_decision=value)  # type: ignore[arg-type]


def test_the_rate_decision_needs_a_failure_rate_threshold() -> None:
    with pytest.raises(ValueError, match=r"BreakerConfig\.failure_rate_threshold"):
        BreakerConfig(half_open_decision="rate")


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, "10s"])
def test_a_bad_half_open_timeout_is_still_refused(value: object) -> None:
    with pytest.raises((TypeError, ValueError), match=r"BreakerConfig\.half_open_timeout"):
        BreakerConfig(half_open_timeout=value)  # type: ignore[arg-type]


# -- the rate decision ----------------------------------------------------------------------


def test_one_failed_probe_of_four_at_a_fifty_percent_threshold_closes(fake: FakeClock) -> None:
    b = CircuitBreaker("x", rate_config())
    half_open(b, fake)
    probes(b, "FSSS")
    assert b.state is BreakerState.CLOSED


def test_three_failed_probes_of_four_re_open(fake: FakeClock, seen: list[Event]) -> None:
    b = CircuitBreaker("x", rate_config())
    half_open(b, fake)
    probes(b, "FFSF")
    assert b.state is BreakerState.OPEN
    last = [e for e in seen if isinstance(e, BreakerStateChanged)][-1]
    assert (last.from_state, last.reason) == (BreakerState.HALF_OPEN, "failure_rate")


def test_a_rate_exactly_at_the_threshold_re_opens(fake: FakeClock) -> None:
    b = CircuitBreaker("x", rate_config())
    half_open(b, fake)
    probes(b, "FSFS")
    assert b.state is BreakerState.OPEN


def test_nothing_is_decided_before_every_permitted_probe_finished(fake: FakeClock) -> None:
    b = CircuitBreaker("x", rate_config())
    half_open(b, fake)
    permits = [b.allow() for _ in range(4)]
    permits[0].failure(Boom())
    permits[1].failure(Boom())
    assert b.state is BreakerState.HALF_OPEN  # the first failure's rule would re-open here
    with pytest.raises(CircuitOpenError):
        b.allow()  # every permit is out
    permits[2].success()
    assert b.state is BreakerState.HALF_OPEN
    permits[3].success()
    assert b.state is BreakerState.OPEN  # 2 of 4: at the threshold


def test_a_cancelled_probe_frees_its_permit_and_is_not_judged(fake: FakeClock) -> None:
    b = CircuitBreaker("x", rate_config(half_open_permits=2))
    half_open(b, fake)
    first, second = b.allow(), b.allow()
    first.cancel()
    second.success()
    assert b.state is BreakerState.HALF_OPEN
    b.allow().success()
    assert b.state is BreakerState.CLOSED


def test_the_slow_call_rate_of_the_probes_is_judged_too(fake: FakeClock) -> None:
    config = rate_config(slow_call_rate_threshold=0.5, slow_call_duration=1.0)
    b = CircuitBreaker("x", config)
    half_open(b, fake)
    probes(b, "WSSS")
    assert b.state is BreakerState.CLOSED
    b.allow().failure(Boom())
    fake.advance(30.0)
    probes(b, "WWSS")
    assert b.state is BreakerState.OPEN


def test_the_first_failure_rule_still_re_opens_at_once() -> None:
    with fake_clock(0.0) as fake:
        b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, half_open_permits=4))
        half_open(b, fake)
        permits = [b.allow() for _ in range(4)]
        permits[0].failure(Boom())
        assert b.state is BreakerState.OPEN


def test_after_the_half_open_limit_the_rate_decision_re_opens(fake: FakeClock) -> None:
    b = CircuitBreaker("x", rate_config(half_open_timeout=5.0, half_open_permits=2))
    half_open(b, fake)
    hung = b.allow()
    b.allow().success()
    fake.advance(5.0)
    assert b.state is BreakerState.OPEN
    hung.success()  # late: granted in the half-open period that ended
    assert b.state is BreakerState.OPEN


# -- waiting for the probes for ever ----------------------------------------------------------


def test_without_a_half_open_limit_the_breaker_waits_for_its_probes(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, half_open_timeout=None))
    half_open(b, fake)
    probe = b.allow()
    fake.advance(86400.0 * 365)
    assert b.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpenError) as info:
        b.allow()
    assert info.value.remaining == math.inf  # until the probe out there ends
    assert b.retry_after() == math.inf
    probe.success()
    assert b.state is BreakerState.CLOSED


def test_without_a_half_open_limit_a_cancelled_probe_lets_another_in(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, half_open_timeout=None))
    half_open(b, fake)
    b.allow().cancel()
    assert b.allow().probe


# -- the open period after a half-open time limit ------------------------------------------------


def test_a_hung_probe_leaves_the_open_period_timed_from_the_limit(fake: FakeClock) -> None:
    # Open 30 s, a probe hangs for 60 s with a 10 s limit: the limit passed at
    # +10 s, so the new open period ended at +40 s, long before anyone looks.
    config = BreakerConfig(consecutive_failures=1, half_open_timeout=10.0, open_duration=30.0)
    b = CircuitBreaker("x", config)
    half_open(b, fake)
    hung = b.allow()
    fake.advance(60.0)
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow().probe
    hung.failure(Boom())  # late: counts nowhere
    assert b.state is BreakerState.HALF_OPEN


def test_the_open_period_after_a_limit_counts_the_time_already_passed(fake: FakeClock) -> None:
    b = CircuitBreaker(
        "x", BreakerConfig(consecutive_failures=1, half_open_timeout=10.0, open_duration=30.0)
    )
    half_open(b, fake)
    b.allow()
    fake.advance(25.0)  # the limit passed 15 s ago
    with pytest.raises(CircuitOpenError) as info:
        b.allow()
    assert info.value.remaining == pytest.approx(15.0)


def test_the_open_period_after_a_limit_grows_like_any_re_opening(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=1, half_open_timeout=10.0, open_backoff=2.0, open_duration=30.0
    )
    b = CircuitBreaker("x", config)
    half_open(b, fake)  # opened once for 30 s
    b.allow()
    fake.advance(10.0)  # re-opened for 60 s from the limit
    with pytest.raises(CircuitOpenError) as info:
        b.allow()
    assert info.value.remaining == pytest.approx(60.0)


# -- shadow mode keeps its counts --------------------------------------------------------------


def test_shadow_mode_reports_the_real_failure_rate_after_a_would_be_trip(
    fake: FakeClock, seen: list[Event]
) -> None:
    config = BreakerConfig(failure_rate_threshold=0.5, minimum_calls=4, window_size=10)
    b = CircuitBreaker("x", config)
    b.metrics_only()
    for _ in range(10):
        b.allow().failure(Boom())
    snap = b.snapshot()
    assert (snap.calls, snap.failures, snap.failure_rate) == (10, 10, 1.0)
    assert snap.state is BreakerState.METRICS_ONLY
    assert [e.reason for e in seen if isinstance(e, ShadowTrip)] == ["failure_rate"]


def test_shadow_mode_keeps_counting_consecutive_failures(fake: FakeClock) -> None:
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=3))
    b.metrics_only()
    for _ in range(10):
        b.allow().failure(Boom())
    assert b.snapshot().consecutive_failures == 10
    assert b.allow().probe is False  # never refuses


def test_a_shadow_trip_is_reported_again_once_the_rate_fell_and_rose(
    fake: FakeClock, seen: list[Event]
) -> None:
    config = BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, minimum_calls=4, window_size=4
    )
    b = CircuitBreaker("x", config)
    b.metrics_only()
    for outcome in "FFFF" + "SSSS" + "FFFF":
        permit = b.allow()
        permit.failure(Boom()) if outcome == "F" else permit.success()
    assert [e.reason for e in seen if isinstance(e, ShadowTrip)] == ["failure_rate"] * 2


# -- through the Redis store ---------------------------------------------------------------------


@pytest.fixture
def name() -> str:
    return f"rate-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def stores(redis_stores: Callable[..., RedisStore]) -> Callable[..., RedisStore]:
    def make(**settings: Any) -> RedisStore:
        settings.setdefault("cache_ttl", 0.0)
        return redis_stores(None, **settings)

    return make


async def shared_half_open(
    stores: Callable[..., RedisStore], name: str, config: BreakerConfig, replicas: int = 2
) -> list[CircuitBreaker]:
    """Replicas sharing one breaker in Redis, tripped with open_duration 0: half-open."""
    breakers = [CircuitBreaker(name, config, store=stores()) for _ in range(replicas)]
    await (await breakers[0].allow_async()).failure_async(Boom())
    return breakers


async def shared_probes(breakers: list[CircuitBreaker], outcomes: str) -> None:
    permits: list[Permit] = []
    for i, _ in enumerate(outcomes):
        permits.append(await breakers[i % len(breakers)].allow_async())
    assert all(p.probe for p in permits)
    for permit, outcome in zip(permits, outcomes, strict=True):
        if outcome == "F":
            await permit.failure_async(Boom())
        else:
            await permit.success_async()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_shared_rate_decision_closes_on_one_failure_in_four(
    stores: Callable[..., RedisStore], name: str
) -> None:
    breakers = await shared_half_open(stores, name, rate_config(open_duration=0.0))
    await shared_probes(breakers, "FSSS")
    assert await breakers[1].call_async(_ok) == "ok"
    assert breakers[1].state is BreakerState.CLOSED


@pytest.mark.anyio
async def test_shared_rate_decision_re_opens_on_three_failures_in_four(
    stores: Callable[..., RedisStore], name: str
) -> None:
    config = rate_config(open_duration=0.0, half_open_permits=4)
    breakers = await shared_half_open(stores, name, config)
    permits = [await breakers[i % 2].allow_async() for i in range(4)]
    await permits[0].failure_async(Boom())
    await permits[1].failure_async(Boom())
    assert breakers[0].state is BreakerState.HALF_OPEN  # not judged yet
    await permits[2].success_async()
    await permits[3].failure_async(Boom())
    # open_duration 0: the re-opening is over at once; the generation moved on
    # and four fresh probes are free again
    fresh = [await breakers[1].allow_async() for _ in range(4)]
    assert all(p.probe for p in fresh)
    for permit in fresh:
        await permit.cancel_async()


@pytest.mark.anyio
async def test_shared_rate_decision_re_opens_for_the_open_period(
    stores: Callable[..., RedisStore], name: str
) -> None:
    # Trip it with a zero open period (half-open at once), then re-open under a
    # configuration whose open period is long: the replicas see it open.
    quick = rate_config(open_duration=0.0, half_open_permits=2, max_open_duration=60.0)
    slow = rate_config(open_duration=60.0, half_open_permits=2)
    a = CircuitBreaker(name, quick, store=stores())
    await (await a.allow_async()).failure_async(Boom())
    a.reconfigure(slow)
    first, second = await a.allow_async(), await a.allow_async()
    await first.failure_async(Boom())
    await second.success_async()  # 1 of 2: at the 50% threshold
    b = CircuitBreaker(name, slow, store=stores())
    with pytest.raises(CircuitOpenError) as info:
        await b.allow_async()
    assert 59.0 < info.value.remaining <= 60.0


@pytest.mark.anyio
async def test_shared_half_open_without_a_limit_waits_for_its_probe(
    stores: Callable[..., RedisStore], name: str, redis_server: RedisServer
) -> None:
    config = BreakerConfig(consecutive_failures=1, open_duration=0.0, half_open_timeout=None)
    a, b = await shared_half_open(stores, name, config)
    probe = await a.allow_async()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        # as if the probe had been out for a year
        await client.hset(f"datapunk:{{breaker:{name}}}:state", "hu", "1.000000")
    finally:
        await client.aclose()
    with pytest.raises(CircuitOpenError) as info:
        await b.allow_async()
    assert info.value.remaining == math.inf
    assert b.state is BreakerState.HALF_OPEN
    await probe.success_async()
    assert await b.call_async(_ok) == "ok"
    assert b.state is BreakerState.CLOSED


@pytest.mark.anyio
async def test_shared_open_period_after_a_limit_runs_from_the_limit(
    stores: Callable[..., RedisStore], name: str, redis_server: RedisServer
) -> None:
    config = BreakerConfig(
        consecutive_failures=1, open_duration=0.0, max_open_duration=30.0, half_open_timeout=10.0
    )
    a = CircuitBreaker(name, config, store=stores())
    await (await a.allow_async()).failure_async(Boom())
    hung = await a.allow_async()
    assert hung.probe
    a.reconfigure(BreakerConfig(consecutive_failures=1, open_duration=30.0, half_open_timeout=10.0))
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        seconds, micros = await client.time()
        now = seconds + micros / 1e6
        # the 10 s limit passed 50 s ago (the probe has hung for 60 s)
        key = f"datapunk:{{breaker:{name}}}:state"
        await client.hset(key, "hu", f"{now - 50.0:.6f}")
    finally:
        await client.aclose()
    # open 30 s from the limit: over 20 s ago; a new probe is let in at once
    assert (await a.allow_async()).probe


@pytest.mark.anyio
async def test_shared_shadow_mode_keeps_its_counts(
    stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    config = BreakerConfig(failure_rate_threshold=0.5, minimum_calls=4, window_size=20)
    a = CircuitBreaker(name, config, store=stores())
    b = CircuitBreaker(name, config, store=stores())
    await a.metrics_only_async()
    for i in range(10):
        await (await (a, b)[i % 2].allow_async()).failure_async(Boom())
    await (await a.allow_async()).success_async()
    await b.flush_async()
    await a.flush_async()  # its reply carries b's outcomes too
    snap = a.snapshot()
    assert (snap.calls, snap.failures) == (11, 10)
    assert snap.failure_rate == pytest.approx(10 / 11)
    assert snap.state is BreakerState.METRICS_ONLY
    assert [e.reason for e in seen if isinstance(e, ShadowTrip)] == ["failure_rate"]


async def _ok() -> str:
    return "ok"


@pytest.mark.anyio
async def test_shared_rate_decision_judges_the_slow_probes_too(
    stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    config = rate_config(
        open_duration=0.0,
        max_open_duration=1.0,
        slow_call_rate_threshold=0.5,
        slow_call_duration=1.0,
    )
    a = CircuitBreaker(name, config, store=stores())
    await (await a.allow_async()).failure_async(Boom())
    permits = [await a.allow_async() for _ in range(4)]
    for i, permit in enumerate(permits):
        await permit.success_async(duration=5.0 if i < 2 else 0.1)  # half of them slow
    changes = [e for e in seen if isinstance(e, BreakerStateChanged)]
    assert changes[-1].reason == "slow_call_rate"
    assert changes[-1].to_state in (BreakerState.OPEN, BreakerState.HALF_OPEN)


@pytest.mark.anyio
async def test_shared_shadow_trip_is_reported_again_after_the_rate_fell(
    stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    config = BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, minimum_calls=4, window_size=4
    )
    a = CircuitBreaker(name, config, store=stores())
    await a.metrics_only_async()
    for outcome in "FFFF" + "SSSS" + "FFFF":
        permit = await a.allow_async()
        if outcome == "F":
            await permit.failure_async(Boom())
        else:
            await permit.success_async()
    assert [e.reason for e in seen if isinstance(e, ShadowTrip)] == ["failure_rate"] * 2
