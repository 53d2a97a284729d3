"""Breaker state shared through a real Redis: sharing, corrupt state, outages.

Redis is reached through redis.asyncio, so these tests run on asyncio only.
Names are unique per test, so tests never see each other's keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from datapunk_recovery._core.errors import CircuitOpenError, RecoveryError
from datapunk_recovery._core.events import Event
from datapunk_recovery.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStateChanged,
    CircuitBreaker,
    CorruptStateIgnored,
    OutcomeRecorded,
    OutcomesFolded,
    StoreFallback,
    StoreResumed,
    WriteShed,
)
from datapunk_recovery.stores import SharedStore
from datapunk_recovery.stores.redis import RedisStore
from tests.harness import RedisServer, ThreadedProxy


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def name() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def stores(redis_stores: Callable[..., RedisStore]) -> Callable[..., RedisStore]:
    """Make stores with no local read cache unless told (``cache_ttl=0``)."""

    def make(url: str | None = None, **settings: Any) -> RedisStore:
        settings.setdefault("cache_ttl", 0.0)
        return redis_stores(url, **settings)

    return make


class Boom(Exception):
    pass


async def aok() -> str:
    return "ok"


async def aboom() -> None:
    raise Boom()


async def trip(breaker: CircuitBreaker, times: int = 5) -> None:
    for _ in range(times):
        permit = await breaker.allow_async()
        await permit.failure_async(Boom())


def test_store_is_a_shared_store(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    assert isinstance(store, SharedStore) and store.is_async


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cache_ttl": -1}, r"RedisStore\.cache_ttl"),
        ({"timeout": 0}, r"RedisStore\.timeout"),
        ({"on_unavailable": "maybe"}, r"RedisStore\.on_unavailable"),
        ({"prefix": "a{b}"}, r"RedisStore\.prefix"),
    ],
)
def test_bad_settings(redis_server: RedisServer, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisStore(redis_server.url, **settings)


def test_client_must_be_redis() -> None:
    with pytest.raises(TypeError, match=r"RedisStore\.client"):
        RedisStore(42)


def test_sync_faces_refuse_redis(redis_server: RedisServer, name: str) -> None:
    breaker = CircuitBreaker(name, store=RedisStore(redis_server.url))
    with pytest.raises(TypeError):
        breaker.allow()
    with pytest.raises(TypeError):
        breaker.call(lambda: 1)
    with pytest.raises(TypeError), breaker:
        pass
    with pytest.raises(TypeError):
        breaker.isolate()


def test_custom_trip_policies_cannot_be_shared(redis_server: RedisServer, name: str) -> None:
    class Never:
        def record(self, failed: bool, slow: bool, duration: float | None, now: float) -> bool:
            return False

        def reset(self) -> None:
            pass

    with pytest.raises(TypeError, match="trip_policy"):
        CircuitBreaker(name, BreakerConfig(trip_policy=Never), store=RedisStore(redis_server.url))
    # nor slipped in later
    breaker = CircuitBreaker(name, store=RedisStore(redis_server.url))
    with pytest.raises(TypeError, match="trip_policy"):
        breaker.reconfigure(BreakerConfig(trip_policy=Never))
    assert breaker.config.trip_policy is None


def test_redis_breakers_refuse_trio(redis_server: RedisServer, name: str) -> None:
    import trio

    breaker = CircuitBreaker(name, store=RedisStore(redis_server.url))

    async def use() -> None:
        with pytest.raises(TypeError, match="asyncio only"):
            await breaker.call_async(aok)

    trio.run(use)


@pytest.mark.anyio
async def test_two_breakers_share_one_state(
    stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    config = BreakerConfig(open_duration=30.0)
    a = CircuitBreaker(name, config, store=stores())
    b = CircuitBreaker(name, config, store=stores())
    assert await b.call_async(aok) == "ok"
    await trip(a)
    assert a.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError) as info:
        await b.call_async(aok)  # b never failed itself
    assert 29.0 < info.value.remaining <= 30.0
    assert b.state is BreakerState.OPEN
    changes = [e for e in seen if isinstance(e, BreakerStateChanged)]
    assert ("closed", "open", "consecutive_failures") in [
        (e.from_state.value, e.to_state.value, e.reason) for e in changes
    ]


@pytest.mark.anyio
async def test_keys_are_namespaced_hash_tagged_and_expire(
    stores: Callable[..., RedisStore], name: str, redis_server: RedisServer
) -> None:
    # key_ttl is at least twice the longest open period: 2 * 30 s < 120 s here
    config = BreakerConfig(keep_window=True, open_duration=10.0, max_open_duration=30.0)
    breaker = CircuitBreaker(name, config, store=stores(prefix="myapp", key_ttl=120.0))
    await (await breaker.allow_async()).success_async()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        keys = sorted(k.decode() for k in await client.keys(f"*{name}*"))
        window = {"count": "ring", "time": "win"}[config.window]  # only the kind it uses
        assert keys == [f"myapp:{{breaker:{name}}}:{part}" for part in sorted(("state", window))]
        for key in keys:
            assert 0 < await client.pttl(key) <= 120_000
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_half_open_permits_are_global(stores: Callable[..., RedisStore], name: str) -> None:
    config = BreakerConfig(open_duration=0.0, half_open_permits=2)
    breakers = [CircuitBreaker(name, config, store=stores()) for _ in range(4)]
    await trip(breakers[0])
    granted, refused = [], 0
    for breaker in breakers * 2:
        try:
            granted.append(await breaker.allow_async())
        except CircuitOpenError:
            refused += 1
    assert len(granted) == 2 and refused == 6
    assert all(p.probe for p in granted)
    for permit in granted:
        await permit.success_async()
    assert await breakers[3].call_async(aok) == "ok"  # reads the shared state again
    assert breakers[3].state is BreakerState.CLOSED


@pytest.mark.anyio
async def test_replicas_allowing_fewer_probes_still_read_the_shared_state(
    stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    # A replica (or a reconfiguration) allowing fewer probes than are out: it
    # must see "no probe free", not a reply it cannot parse (a fallback).
    three = CircuitBreaker(
        name, BreakerConfig(open_duration=0.0, half_open_permits=3), store=stores(timeout=5.0)
    )
    one = CircuitBreaker(
        name, BreakerConfig(open_duration=0.0, half_open_permits=1), store=stores(timeout=5.0)
    )
    await trip(three)
    probes = [await three.allow_async() for _ in range(3)]
    with pytest.raises(CircuitOpenError):
        await one.allow_async()
    assert one.state is BreakerState.HALF_OPEN
    assert not [e for e in seen if isinstance(e, StoreFallback | CorruptStateIgnored)]
    for permit in probes:
        await permit.cancel_async()


@pytest.mark.anyio
async def test_aclose_lands_the_background_writes_and_leaves_no_task(
    redis_server: RedisServer, stores: Callable[..., RedisStore], name: str
) -> None:
    store = RedisStore(redis_server.url, cache_ttl=0.0)
    breaker = CircuitBreaker(name, BreakerConfig(consecutive_failures=1), store=store)
    before = asyncio.all_tasks()
    (await breaker.allow_async()).failure(Boom())  # written in the background
    assert asyncio.all_tasks() - before  # (a task of the breaker's sends the write)
    await store.aclose()
    assert not asyncio.all_tasks() - before  # nothing left running against a closed client
    assert store.closed and store.in_flight == 0
    with pytest.raises(CircuitOpenError):  # and the write landed
        await CircuitBreaker(name, store=stores()).allow_async()


@pytest.mark.anyio
async def test_a_closed_store_opens_no_connection_and_its_breakers_decide_locally(
    redis_server: RedisServer, name: str, seen: list[Event]
) -> None:
    watcher = aioredis.Redis.from_url(redis_server.url)

    async def connections() -> int:
        return sum(c.get("name") == name for c in await watcher.client_list())

    store = RedisStore(f"{redis_server.url}?client_name={name}", cache_ttl=0.0)
    breaker = CircuitBreaker(name, BreakerConfig(consecutive_failures=1), store=store)
    try:
        assert await breaker.call_async(aok) == "ok"
        assert await connections() == 1
        await store.aclose()
        assert await connections() == 0
        with pytest.raises(Boom):  # still guarded, on the local state
            await breaker.call_async(aboom)
        with pytest.raises(CircuitOpenError):
            await breaker.call_async(aok)
        assert await connections() == 0  # redis-py would have quietly reconnected
    finally:
        await watcher.aclose()
    assert [e.error_type for e in seen if isinstance(e, StoreFallback)] == ["StoreClosed"]


@pytest.mark.anyio
async def test_a_cancelled_probe_frees_its_permit(
    stores: Callable[..., RedisStore], name: str
) -> None:
    breaker = CircuitBreaker(name, BreakerConfig(open_duration=0.0), store=stores())
    await trip(breaker)
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(breaker.call_async(hang))
    await started.wait()
    with pytest.raises(CircuitOpenError):
        await breaker.allow_async()  # the only permit is out
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await breaker.flush_async()
    assert (await breaker.allow_async()).probe


@pytest.mark.anyio
async def test_a_caller_cancelled_while_taking_a_probe_gives_it_back(
    stores: Callable[..., RedisStore], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = stores(timeout=5.0)
    breaker = CircuitBreaker(name, BreakerConfig(open_duration=0.0), store=store)
    await trip(breaker)
    real = store.run
    granted, reply_lands = asyncio.Event(), asyncio.Event()

    async def slow_reply(script: Any, keys: list[str], argv: list[Any], **kw: Any) -> Any:
        reply = await real(script, keys, argv, **kw)
        if argv[0] == "acquire":
            granted.set()  # the script gave the probe; its reply is still on the way
            await reply_lands.wait()
        return reply

    monkeypatch.setattr(store, "run", slow_reply)
    caller = asyncio.create_task(breaker.call_async(aok))
    await granted.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    reply_lands.set()
    await breaker.flush_async()
    monkeypatch.undo()
    assert (await breaker.allow_async()).probe  # the probe came back


@pytest.mark.anyio
async def test_a_reply_overtaken_by_a_newer_one_never_turns_the_cache_back(
    stores: Callable[..., RedisStore], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Probe results are sent at once, each in its own round trip: their
    # replies may come back in another order than Redis ran them.
    store = stores(cache_ttl=60.0, timeout=5.0)
    config = BreakerConfig(consecutive_failures=1, open_duration=30.0, half_open_permits=2)
    breaker = CircuitBreaker(name, config, store=store)
    await store.client.hset(  # half-open, two probes free
        f"datapunk:{{breaker:{name}}}:state",
        mapping={
            "s": 2,
            "g": 7,
            "ou": 0,
            "hu": 2e9,
            "c": 0,
            "pi": 0,
            "po": 0,
            "r": 1,
            "wc": 0,
            "wf": 0,
            "ws": 0,
            "wp": 0,
            "wz": "",
        },
    )
    real = store.run
    ran, overtaken = asyncio.Event(), asyncio.Event()

    async def first_record_answers_late(
        script: Any, keys: list[str], argv: list[Any], **kw: Any
    ) -> Any:
        reply = await real(script, keys, argv, **kw)
        if argv[0] == "record" and not ran.is_set():
            ran.set()  # Redis ran it (still half-open, one probe ok)...
            await overtaken.wait()  # ...but its reply comes back last
        return reply

    monkeypatch.setattr(store, "run", first_record_answers_late)
    first, second = await breaker.allow_async(), await breaker.allow_async()
    assert first.probe and second.probe
    first.success()
    await ran.wait()
    second.failure(Boom())  # opens it
    for _ in range(500):  # bounded polling: the second reply lands (read from the cache)
        if breaker.state is BreakerState.OPEN:
            break
        await asyncio.sleep(0.01)
    overtaken.set()
    await breaker.flush_async()
    assert breaker.state is BreakerState.OPEN  # not back to the older "half-open"
    with pytest.raises(CircuitOpenError):
        await breaker.allow_async()


@pytest.mark.anyio
@pytest.mark.parametrize("window", ["count", "time"])
async def test_failure_rate_over_a_shared_window(
    stores: Callable[..., RedisStore], name: str, window: str
) -> None:
    config = BreakerConfig(
        consecutive_failures=None,
        failure_rate_threshold=0.5,
        window=window,  # type: ignore[arg-type]
        window_size=4,
        window_duration=60.0,
        minimum_calls=4,
    )
    a = CircuitBreaker(name, config, store=stores())
    b = CircuitBreaker(name, config, store=stores())
    await (await a.allow_async()).failure_async(Boom())
    for _ in range(2):
        await (await b.allow_async()).success_async()
    assert b.failure_rate() is None  # three calls: below minimum_calls
    await (await b.allow_async()).success_async()
    assert b.failure_rate() == 0.25
    await (await a.allow_async()).failure_async(Boom())
    # count: the last 4 are ok, ok, ok, fail; time: 2 failures in 5 calls
    assert a.state is BreakerState.CLOSED
    await (await a.allow_async()).failure_async(Boom())
    # count: ok, ok, fail, fail; time: 3 of 6 -> 50% either way
    assert a.state is BreakerState.OPEN


@pytest.mark.anyio
async def test_a_late_outcome_never_extends_a_shared_open_period(
    stores: Callable[..., RedisStore], name: str
) -> None:
    config = BreakerConfig(consecutive_failures=1)
    a = CircuitBreaker(name, config, store=stores())
    slow_call = await a.allow_async()
    await trip(a, 1)
    before = a.retry_after()
    await slow_call.failure_async(Boom())  # granted before the opening: ignored
    with pytest.raises(CircuitOpenError) as info:
        await a.allow_async()
    assert info.value.remaining <= before


@pytest.mark.anyio
async def test_server_delay_opens_every_replica(
    stores: Callable[..., RedisStore], name: str
) -> None:
    config = BreakerConfig(honor_server_delay=True)
    a = CircuitBreaker(name, config, store=stores())
    b = CircuitBreaker(name, config, store=stores())
    await (await a.allow_async()).failure_async(RecoveryError("slow down", retry_after=90.0))
    with pytest.raises(CircuitOpenError) as info:
        await b.allow_async()
    assert 89.0 < info.value.remaining <= 90.0


@pytest.mark.anyio
async def test_manual_controls_are_shared(stores: Callable[..., RedisStore], name: str) -> None:
    a = CircuitBreaker(name, store=stores())
    b = CircuitBreaker(name, store=stores())
    await a.isolate_async()
    with pytest.raises(CircuitOpenError) as info:
        await b.call_async(aok)
    assert info.value.remaining == float("inf")
    await b.reset_async()
    assert await a.call_async(aok) == "ok"
    await a.disable_async()
    await trip(b, 10)
    assert b.state is BreakerState.DISABLED
    await a.metrics_only_async()
    await trip(b, 10)
    assert await b.call_async(aok) == "ok"


@pytest.mark.anyio
async def test_corrupt_shared_state_is_ignored_with_an_event(
    stores: Callable[..., RedisStore], name: str, redis_server: RedisServer, seen: list[Event]
) -> None:
    breaker = CircuitBreaker(name, store=stores())
    await trip(breaker, 3)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.hset(f"datapunk:{{breaker:{name}}}:state", "s", "banana")
    finally:
        await client.aclose()
    assert await breaker.call_async(aok) == "ok"
    assert any(isinstance(e, CorruptStateIgnored) for e in seen)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().consecutive_failures == 0  # reset, not trusted


@pytest.mark.anyio
@pytest.mark.parametrize(
    "reply",
    [
        pytest.param([b"not", b"a", b"state"], id="short"),
        pytest.param([0] * 10 + [[b"a list"], 0], id="unhashable-reason"),
        pytest.param([0] * 10 + [b"", True], id="bool-flag"),
        pytest.param([0, 1, -5] + [0] * 7 + [b"", 0], id="negative"),
    ],
)
async def test_a_garbage_reply_falls_back_to_local_state(
    stores: Callable[..., RedisStore],
    name: str,
    seen: list[Event],
    monkeypatch: pytest.MonkeyPatch,
    reply: list[Any],
) -> None:
    store = stores()
    breaker = CircuitBreaker(name, BreakerConfig(consecutive_failures=2), store=store)

    async def garbage(*args: Any) -> Any:
        return reply

    monkeypatch.setattr(store, "run", garbage)
    assert await breaker.call_async(aok) == "ok"
    kinds = [type(e) for e in seen]
    assert CorruptStateIgnored in kinds and StoreFallback in kinds
    for _ in range(2):  # judged locally meanwhile
        with pytest.raises(Boom):
            await breaker.call_async(aboom)
    assert breaker.state is BreakerState.OPEN


# ---------------------------------------------------------------------------
# outages, through the fault proxy


def proxied(proxy: ThreadedProxy) -> str:
    return f"redis://127.0.0.1:{proxy.port}/0"


@pytest.mark.anyio
async def test_blackholed_redis_never_fails_a_call(
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
    name: str,
    stores: Callable[..., RedisStore],
    redis_server: RedisServer,
    seen: list[Event],
) -> None:
    proxy = make_proxy(redis_server.address)
    store = stores(proxied(proxy), timeout=0.1, retry_interval=0.0)
    breaker = CircuitBreaker(name, store=store)
    assert await breaker.call_async(aok) == "ok"
    proxy.blackhole()
    for _ in range(5):
        assert await breaker.call_async(aok) == "ok"
    fallbacks = [e for e in seen if isinstance(e, StoreFallback)]
    assert len(fallbacks) == 1 and fallbacks[0].mode == "local"
    assert fallbacks[0].error_type == "TimeoutError"  # the type name only, never a message
    proxy.clear()
    proxy.reset_all()  # the blackholed connections are useless now
    for _ in range(50):
        await breaker.call_async(aok)
        if any(isinstance(e, StoreResumed) for e in seen):
            break
        await asyncio.sleep(0.02)
    assert any(isinstance(e, StoreResumed) for e in seen)
    # (one failure trips it: our own successes, written in the background,
    # would otherwise interleave with a run of failures and reset the count)
    other = CircuitBreaker(name, BreakerConfig(consecutive_failures=1), store=stores())
    await trip(other, 1)
    # Sharing resumed: the opening is seen here. (A pooled connection that was
    # reset fails once when next used, so allow a few more round trips.)
    for _ in range(100):
        try:
            await breaker.call_async(aok)
        except CircuitOpenError:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the shared opening was never seen")


@pytest.mark.anyio
async def test_fail_closed_refuses_calls_while_redis_is_away(
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
    name: str,
    stores: Callable[..., RedisStore],
    redis_server: RedisServer,
) -> None:
    proxy = make_proxy(redis_server.address)
    store = stores(proxied(proxy), timeout=0.1, on_unavailable="closed", retry_interval=60.0)
    breaker = CircuitBreaker(name, store=store)
    proxy.stop_listening()
    proxy.reset_all()
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call_async(aok)
    assert 0 < info.value.remaining <= 60.0
    assert breaker.state is BreakerState.FORCED_OPEN
    assert 0 < breaker.retry_after() <= 60.0


@pytest.mark.anyio
async def test_an_open_breaker_stays_open_when_redis_goes_away(
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
    name: str,
    stores: Callable[..., RedisStore],
    redis_server: RedisServer,
) -> None:
    proxy = make_proxy(redis_server.address)
    breaker = CircuitBreaker(name, store=stores(proxied(proxy), timeout=0.1))
    await trip(breaker)
    proxy.stop_listening()
    proxy.reset_all()
    for _ in range(3):
        with pytest.raises(CircuitOpenError):
            await breaker.call_async(aok)


@pytest.mark.drill
@pytest.mark.anyio
async def test_drill_blackhole_reset_restart_mid_run(
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
    name: str,
    stores: Callable[..., RedisStore],
    redis_server: RedisServer,
    seen: list[Event],
) -> None:
    """Callers keep calling while Redis misbehaves; none fails because of Redis."""
    proxy = make_proxy(redis_server.address)
    config = BreakerConfig(consecutive_failures=1000)
    breaker = CircuitBreaker(
        name, config, store=stores(proxied(proxy), timeout=0.1, retry_interval=0.05, cache_ttl=0.02)
    )
    failures: list[BaseException] = []
    calls = 0
    stop = asyncio.Event()

    async def caller() -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                await breaker.call_async(aok)
                calls += 1
            except BaseException as exc:  # anything at all is a test failure
                failures.append(exc)
                raise
            await asyncio.sleep(0.002)

    async def resumed(count: int) -> None:
        for _ in range(500):
            if sum(isinstance(e, StoreResumed) for e in seen) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("sharing did not resume")

    async def fell_back(count: int) -> None:
        for _ in range(500):
            if sum(isinstance(e, StoreFallback) for e in seen) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no fallback seen")

    tasks = [asyncio.create_task(caller()) for _ in range(8)]
    try:
        await asyncio.sleep(0.1)
        proxy.blackhole()
        await fell_back(1)
        await asyncio.sleep(0.2)
        proxy.clear()
        proxy.reset_all()
        await resumed(1)
        proxy.reset_all()
        await asyncio.sleep(0.1)
        redis_server.restart()  # the shared state is lost with the data
        await asyncio.sleep(0.2)
        # sharing works again: a breaker straight on Redis trips it for everyone
        other = CircuitBreaker(name, BreakerConfig(consecutive_failures=1), store=stores())
        await trip(other, 1)
        for _ in range(200):
            if breaker.state is BreakerState.OPEN:
                break
            await asyncio.sleep(0.01)
        assert breaker.state is BreakerState.OPEN
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    real_failures = [f for f in failures if not isinstance(f, CircuitOpenError)]
    assert not real_failures, real_failures
    # every call that returned was accounted for by the breaker, shared or local
    accounted = [
        e
        for e in seen
        if isinstance(e, OutcomeRecorded) and e.operation == name and e.outcome == "success"
    ]
    assert calls and len(accounted) == calls


# ---------------------------------------------------------------------------
# several OS processes sharing one breaker

_CHILD = r"""
import asyncio, json, sys, time
from datapunk_recovery.breaker import CircuitBreaker
from datapunk_recovery._core.errors import CircuitOpenError
from datapunk_recovery.stores.redis import RedisStore

async def main(url, name, ttl):
    store = RedisStore(url, cache_ttl=ttl)
    breaker = CircuitBreaker(name, store=store)
    async def ok():
        return 1
    await breaker.call_async(ok)
    print("ready", flush=True)
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            await breaker.call_async(ok)
        except CircuitOpenError:
            print(json.dumps({"open_at": time.time()}), flush=True)
            break
        except Exception as exc:
            print(json.dumps({"error": type(exc).__name__}), flush=True)
            break
        await asyncio.sleep(0.005)
    await store.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


@pytest.mark.drill
def test_processes_all_see_the_breaker_open_within_the_cache_ttl(
    name: str, redis_server: RedisServer
) -> None:
    ttl = 0.3
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, redis_server.url, name, str(ttl)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]

    async def trip_once() -> None:
        # The children's successes interleave with our failures in the shared
        # consecutive count: trip with one failure.
        store = RedisStore(redis_server.url)
        breaker = CircuitBreaker(name, BreakerConfig(consecutive_failures=1), store=store)
        await trip(breaker, 1)
        await store.aclose()

    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        asyncio.run(trip_once())
        tripped_at = time.time()
        for child in children:
            assert child.stdout is not None
            report = json.loads(child.stdout.readline())
            assert "error" not in report  # no call failed because of Redis
            assert report["open_at"] - tripped_at <= ttl + 0.15
    finally:
        for child in children:
            child.kill()
            child.wait()


# ---------------------------------------------------------------------------
# never hang, and connections that last (issue 18)


@pytest.mark.anyio
async def test_aclose_returns_when_a_command_never_ends(
    redis_server: RedisServer, name: str
) -> None:
    store = RedisStore(redis_server.url, cache_ttl=0.0, timeout=0.2)
    breaker = CircuitBreaker(name, BreakerConfig(consecutive_failures=1), store=store)
    assert await breaker.call_async(aok) == "ok"
    done = asyncio.Event()
    started = asyncio.Event()

    async def stubborn(**kwargs: Any) -> Any:
        started.set()
        while not done.is_set():
            try:
                await done.wait()
            except asyncio.CancelledError:
                continue  # a driver that never lets go
        return None

    permit = await breaker.allow_async()
    real = store.run

    async def runs_stubborn(script: Any, keys: list[str], argv: list[Any], **kw: Any) -> Any:
        return await real(stubborn, keys, argv, **kw)

    store.run = runs_stubborn  # type: ignore[method-assign]
    permit.failure(Boom())  # a write that never lands
    await started.wait()
    try:
        async with asyncio.timeout(5):
            await store.aclose()
        assert store.closed
        with pytest.raises(CircuitOpenError):  # the failure that never landed counts here
            await breaker.call_async(aok)
    finally:
        done.set()


@pytest.mark.anyio
async def test_a_store_timeout_does_not_close_a_healthy_connection(
    redis_server: RedisServer, name: str, seen: list[Event]
) -> None:
    # redis-py closes a connection whose command is cancelled mid-reply: the
    # store's own timeout must not cancel the command, only stop waiting.
    watcher = aioredis.Redis.from_url(redis_server.url)

    async def ours() -> set[int]:
        return {c["id"] for c in await watcher.client_list() if c.get("name") == name}

    store = RedisStore(
        f"{redis_server.url}?client_name={name}", cache_ttl=0.0, timeout=0.1, retry_interval=0.0
    )
    breaker = CircuitBreaker(name, store=store)
    try:
        assert await breaker.call_async(aok) == "ok"
        await breaker.flush_async()
        before = await ours()
        assert before
        await watcher.execute_command("CLIENT", "PAUSE", "300", "ALL")
        assert await breaker.call_async(aok) == "ok"  # on local state: Redis paused
        assert [type(e) for e in seen if isinstance(e, StoreFallback)] == [StoreFallback]
        for _ in range(200):  # bounded: the paused command lands once the pause ends
            if not store.in_flight:
                break
            await asyncio.sleep(0.01)
        assert not store.in_flight
        assert await breaker.call_async(aok) == "ok"
        assert [type(e) for e in seen if isinstance(e, StoreResumed)] == [StoreResumed]
        assert before <= await ours()  # every connection open before the pause still is
    finally:
        await store.aclose()
        await watcher.aclose()


_LOAD_CHILD = r"""
import asyncio, functools, json, sys
from datapunk_recovery._core import events
from datapunk_recovery.breaker import CircuitBreaker, StoreFallback
from datapunk_recovery.budget import TokenBudget
from datapunk_recovery.stores.budget_redis import SharedBudget
from datapunk_recovery.stores.redis import RedisStore

async def main(url, name, tasks, calls):
    fallbacks = []
    events.subscribe(lambda e: fallbacks.append(e) if isinstance(e, StoreFallback) else None)
    store = RedisStore(url)  # default settings, as users run it
    breaker = CircuitBreaker(name, store=store)
    budget = SharedBudget(TokenBudget(name), store, sync_interval=0.001)

    async def swallowing(script, **kwargs):
        # redis-py may swallow a cancellation landing with its reply: do it every
        # time, on a reply that takes a while (a busy loop), so stopping the sync
        # loop lands there.
        try:
            await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            pass
        return await script(**kwargs)

    real_run = store.run
    slowed = []

    async def run(script, keys, args, *, serial=None):
        # The store's public run() is the seam (as tests/test_budget_shared.py's
        # through()): the budget's round trips (serial=budget) go through a
        # driver that swallows cancellations, the breaker's go straight.
        if serial is budget:
            script = functools.partial(swallowing, script)
            slowed.append(1)
        return await real_run(script, keys, args, serial=serial)

    store.run = run
    budget.start()

    async def ok():
        await asyncio.sleep(0)
        return 1

    async def task():
        for _ in range(calls):
            await breaker.call_async(ok)
            budget.on_attempt(True)

    await asyncio.gather(*(task() for _ in range(tasks)))
    await budget.aclose()
    await store.aclose()
    report = {"calls": tasks * calls, "fallbacks": len(fallbacks), "slowed": len(slowed)}
    print(json.dumps(report), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


@pytest.mark.drill
def test_drill_processes_sharing_a_breaker_and_a_budget_all_finish(
    name: str, redis_server: RedisServer
) -> None:
    # Issue 18: 1-3 of 8 processes never finished, in the calls or in aclose().
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _LOAD_CHILD, redis_server.url, name, "100", "10"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    hung = []
    reports = []
    deadline = time.monotonic() + 18
    try:
        for child in children:
            try:
                out, err = child.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                hung.append(child.pid)
                continue
            assert child.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert not hung, f"processes that never finished: {hung}"
    assert [r["calls"] for r in reports] == [1000] * 4
    assert all(r["slowed"] > 0 for r in reports)  # every budget met the swallowing driver


# ---------------------------------------------------------------------------
# forced and open states outlive their keys (issue 13 item 3)


async def refused_within(breaker: CircuitBreaker, tries: int = 300) -> None:
    """Bounded polling: ``breaker`` refuses a call within ``tries`` short looks."""
    for _ in range(tries):
        try:
            await breaker.call_async(aok)
        except CircuitOpenError:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{breaker.name} kept admitting calls")


def state_key(name: str) -> str:
    return f"datapunk:{{breaker:{name}}}:state"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("force", "state"),
    [
        ("isolate_async", BreakerState.FORCED_OPEN),
        ("disable_async", BreakerState.DISABLED),
        ("metrics_only_async", BreakerState.METRICS_ONLY),
    ],
)
async def test_a_forced_state_is_kept_without_expiry_until_reset(
    stores: Callable[..., RedisStore], name: str, force: str, state: BreakerState
) -> None:
    store = stores(key_ttl=0.5)
    config = BreakerConfig(open_duration=0.05, max_open_duration=0.1)
    breaker = CircuitBreaker(name, config, store=store)
    await getattr(breaker, force)()
    assert await store.client.pttl(state_key(name)) == -1  # no expiry while forced
    await breaker.reset_async()
    assert 0 < await store.client.pttl(state_key(name)) <= 500  # expires again once reset


@pytest.mark.anyio
async def test_an_isolated_breaker_is_reasserted_when_its_keys_expire(
    stores: Callable[..., RedisStore], name: str
) -> None:
    store = stores(key_ttl=0.5)
    holder = CircuitBreaker(name, store=store)
    await holder.isolate_async()
    await store.client.delete(state_key(name))
    other = CircuitBreaker(name, store=stores())  # another process, no memory of it
    await refused_within(other)  # the holder's keeper re-asserted it
    assert other.state is BreakerState.FORCED_OPEN
    with pytest.raises(CircuitOpenError):
        await holder.call_async(aok)


@pytest.mark.anyio
async def test_an_isolated_breaker_survives_an_empty_restart(
    private_redis: RedisServer, stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    holder = CircuitBreaker(name, store=stores(private_redis.url, retry_interval=0.0))
    await holder.isolate_async()
    private_redis.restart()  # empty: the shared state is gone
    other = CircuitBreaker(name, store=stores(private_redis.url))
    await refused_within(other)
    assert other.state is BreakerState.FORCED_OPEN
    with pytest.raises(CircuitOpenError):  # and the holder never admitted a call
        await holder.call_async(aok)
    assert not [
        e
        for e in seen
        if isinstance(e, BreakerStateChanged)
        and e.operation == name
        and e.to_state is BreakerState.CLOSED
    ]


@pytest.mark.anyio
async def test_a_breaker_isolated_while_redis_was_away_is_pushed_when_it_answers(
    private_redis: RedisServer, stores: Callable[..., RedisStore], name: str
) -> None:
    holder = CircuitBreaker(name, store=stores(private_redis.url, retry_interval=0.0, timeout=0.2))
    assert await holder.call_async(aok) == "ok"
    private_redis.stop()
    await holder.isolate_async()  # Redis away: obeyed here, remembered
    with pytest.raises(CircuitOpenError):
        await holder.call_async(aok)
    private_redis.start()
    other = CircuitBreaker(name, store=stores(private_redis.url))
    await refused_within(other)
    assert other.state is BreakerState.FORCED_OPEN


@pytest.mark.anyio
async def test_a_reset_elsewhere_lets_the_holder_go(
    private_redis: RedisServer, stores: Callable[..., RedisStore], name: str
) -> None:
    holder = CircuitBreaker(name, store=stores(private_redis.url))
    await holder.isolate_async()
    other = CircuitBreaker(name, store=stores(private_redis.url))
    await other.reset_async()  # the operator changed their mind, from another process
    assert await holder.call_async(aok) == "ok"  # the holder read the reset...
    private_redis.restart()
    assert await holder.call_async(aok) == "ok"  # ...and does not force it back
    assert await other.call_async(aok) == "ok"
    assert other.state is BreakerState.CLOSED


@pytest.mark.anyio
async def test_an_open_breaker_stays_open_through_an_empty_restart(
    private_redis: RedisServer, stores: Callable[..., RedisStore], name: str
) -> None:
    config = BreakerConfig(consecutive_failures=1, open_duration=30.0)
    breaker = CircuitBreaker(name, config, store=stores(private_redis.url, retry_interval=0.0))
    await trip(breaker, 1)
    await breaker.flush_async()
    with pytest.raises(CircuitOpenError):
        await breaker.call_async(aok)
    private_redis.restart()  # empty
    other = CircuitBreaker(name, config, store=stores(private_redis.url))
    for _ in range(300):  # bounded: the holder's next round trip re-asserts it
        with pytest.raises(CircuitOpenError):  # its open period still runs here...
            await breaker.call_async(aok)
        try:
            await other.call_async(aok)
        except CircuitOpenError:
            break  # ...and every process sees it again
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the open state was lost with the restart")
    assert 20.0 < other.retry_after() <= 30.0


# ---------------------------------------------------------------------------
# the write path: aggregate, then flush (issue 18)


async def _commands(client: aioredis.Redis) -> int:
    info = await client.info("stats")
    return int(info["total_commands_processed"])


@pytest.mark.anyio
async def test_a_thousand_closed_calls_cost_at_most_20_redis_commands(
    private_redis: RedisServer, name: str
) -> None:
    from datapunk_recovery.budget import TokenBudget
    from datapunk_recovery.stores.budget_redis import SharedBudget

    async def serve(calls: int) -> None:
        store = RedisStore(private_redis.url)  # default settings
        breaker = CircuitBreaker(name, store=store)
        async with SharedBudget(TokenBudget(name), store) as budget:
            for _ in range(calls):
                assert await breaker.call_async(aok) == "ok"
                budget.on_attempt(True)
        await store.aclose()

    await serve(1)  # another process came first: the scripts are loaded, the state exists
    watcher = aioredis.Redis.from_url(private_redis.url)
    await watcher.ping()
    try:
        before = await _commands(watcher)
        received = int((await watcher.info("stats"))["total_connections_received"])
        await serve(1000)
        # (less the watcher's own INFO commands: the one below and the one above)
        used = await _commands(watcher) - before - 2
        opened = int((await watcher.info("stats"))["total_connections_received"]) - received
    finally:
        await watcher.aclose()
    # Connection setup (HELLO) and the commands run inside the scripts count in
    # total_commands_processed: a breaker read that changes nothing is 4, a
    # budget sync with nothing new 3, one bringing successes 6.
    assert used <= 20, f"{used} Redis commands for 1,000 calls (connection setup included)"
    assert opened <= 2, f"{opened} connections opened for 1,000 calls (one per command at once)"


@pytest.mark.anyio
async def test_an_idle_closed_breaker_sends_nothing(private_redis: RedisServer, name: str) -> None:
    watcher = aioredis.Redis.from_url(private_redis.url)
    store = RedisStore(private_redis.url, cache_ttl=0.005, flush_interval=0.002)
    breaker = CircuitBreaker(name, store=store)
    try:
        assert await breaker.call_async(aok) == "ok"
        await breaker.flush_async()
        assert store.in_flight == 0
        before = await _commands(watcher)
        loop = asyncio.get_running_loop()
        start, pings = loop.time(), 0
        # fifty flush intervals (ten cache lifetimes) of real work: a link that
        # kept a timer armed, or re-read the state on its own, would send there
        while loop.time() - start < 50 * store.flush_interval:
            await watcher.ping()
            pings += 1
        used = await _commands(watcher) - before - pings - 1  # (less the INFO above)
        assert used == 0, f"an idle breaker sent {used} commands"
        assert store.in_flight == 0
    finally:
        await store.aclose()
        await watcher.aclose()


@pytest.mark.anyio
async def test_a_trip_is_sent_at_once_and_seen_by_another_process(
    stores: Callable[..., RedisStore], name: str
) -> None:
    config = BreakerConfig(consecutive_failures=3)
    slow_flush = stores(cache_ttl=60.0, flush_interval=60.0)  # only a trip may hurry it
    here = CircuitBreaker(name, config, store=slow_flush)
    there = CircuitBreaker(name, config, store=stores())
    assert await here.call_async(aok) == "ok"
    for _ in range(3):
        with pytest.raises(Boom):
            await here.call_async(aboom)
    await refused_within(there)  # no flush_interval (60 s) waited


@pytest.mark.anyio
async def test_a_batch_judges_each_outcome_as_one_by_one_writes_would(
    stores: Callable[..., RedisStore], name: str
) -> None:
    config = BreakerConfig(
        failure_rate_threshold=0.5, window="count", window_size=10, minimum_calls=10
    )
    store = stores(cache_ttl=60.0, flush_interval=60.0, flush_max=1000)
    breaker = CircuitBreaker(name, config, store=store)
    assert await breaker.call_async(aok) == "ok"
    await breaker.flush_async()
    for ok in [True] * 6 + [False] * 3:
        permit = await breaker.allow_async()
        permit.success() if ok else permit.failure(Boom())
    seen_before = breaker.snapshot()  # the shared state as last read
    assert (seen_before.calls, seen_before.failures) == (1, 0)  # aggregated: nothing sent yet
    await breaker.flush_async()
    after = breaker.snapshot()
    assert (after.calls, after.failures) == (10, 3)
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.anyio
async def test_a_batch_too_long_is_folded_never_dropped(
    stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    config = BreakerConfig(
        consecutive_failures=100_000,
        failure_rate_threshold=0.9,
        window="count",
        window_size=1000,
        minimum_calls=1000,
    )
    store = stores(cache_ttl=60.0, flush_interval=60.0, flush_max=100_000)
    breaker = CircuitBreaker(name, config, store=store)
    assert await breaker.call_async(aok) == "ok"
    await breaker.flush_async()
    for i in range(600):  # alternating: one run per outcome
        permit = await breaker.allow_async()
        permit.success() if i % 2 else permit.failure(Boom())
    folded = [e for e in seen if isinstance(e, OutcomesFolded)]
    assert folded and folded[0].operation == name and folded[0].runs > 256  # and said so
    await breaker.flush_async()
    snap = breaker.snapshot()
    assert (snap.calls, snap.failures) == (601, 300)  # every outcome still counted


@pytest.mark.anyio
async def test_callers_during_the_first_read_do_not_wait_and_their_outcomes_are_merged(
    stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    config = BreakerConfig(consecutive_failures=100)
    store = stores()
    breaker = CircuitBreaker(name, config, store=store)
    before_the_read: list[bool] = []

    async def fails() -> str:
        before_the_read.append(store.in_flight == 1)  # the first read, still on its way
        raise Boom("judged locally, before the shared state is known")

    # the first caller makes the first read; the two others arrive during it
    got = await asyncio.gather(
        breaker.call_async(aok),
        breaker.call_async(fails),
        breaker.call_async(fails),
        return_exceptions=True,
    )
    assert got[0] == "ok" and all(isinstance(e, Boom) for e in got[1:])
    assert before_the_read == [True, True]  # admitted without waiting for the read
    await breaker.flush_async()
    assert not [e for e in seen if isinstance(e, StoreFallback)]  # no fallback
    reader = CircuitBreaker(name, config, store=stores())
    permit = await reader.allow_async()  # (its first read)
    assert reader.snapshot().consecutive_failures == 2  # both failures reached Redis
    permit.success()


def _server_delay() -> RecoveryError:
    """A failure with a server-given delay: a transition, written to Redis at once."""
    return RecoveryError("slow down", retry_after=0.001)


@pytest.mark.anyio
async def test_writes_due_at_once_past_max_pending_wait_for_room_and_all_land(
    private_redis: RedisServer, stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    store = stores(private_redis.url, max_pending=2, cache_ttl=60.0, timeout=5.0)
    config = BreakerConfig(consecutive_failures=100, honor_server_delay=True)
    breaker = CircuitBreaker(name, config, store=store)
    assert await breaker.call_async(aok) == "ok"
    await breaker.flush_async()
    permits = [await breaker.allow_async() for _ in range(4)]  # on the state as read
    watcher = aioredis.Redis.from_url(private_redis.url)
    try:
        before = await _scripts_run(watcher)
        await watcher.execute_command("CLIENT", "PAUSE", "5000", "WRITE")  # sends stall
        try:
            for permit in permits:  # four writes due at once, two sends allowed
                permit.failure(_server_delay())
            for _ in range(200):  # bounded: the two sends reach the paused server
                if store.in_flight == 2:
                    break
                await asyncio.sleep(0.005)
            for _ in range(10):  # the loop turns: nothing else starts, nothing is shed
                await asyncio.sleep(0)
            assert store.in_flight == 2
            assert not [e for e in seen if isinstance(e, WriteShed)]
        finally:
            await watcher.execute_command("CLIENT", "UNPAUSE")
        await breaker.flush_async()
        assert await _scripts_run(watcher) - before == 4  # every one was sent, in turn
    finally:
        await watcher.aclose()
    assert not [e for e in seen if isinstance(e, (WriteShed, StoreFallback))]


async def _scripts_run(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


@pytest.mark.anyio
async def test_writes_past_max_pending_waiting_too_are_counted_and_reported(
    stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    store = stores(max_pending=1, cache_ttl=60.0)
    config = BreakerConfig(consecutive_failures=100, honor_server_delay=True)
    breaker = CircuitBreaker(name, config, store=store)
    assert await breaker.call_async(aok) == "ok"
    await breaker.flush_async()
    permits = [await breaker.allow_async() for _ in range(3)]
    for permit in permits:  # (no await in between) one sent, one waiting, one shed
        permit.failure(_server_delay())
    shed = [(e.operation, e.what) for e in seen if isinstance(e, WriteShed)]
    assert shed == [(name, "server delay")]
    await breaker.flush_async()


@pytest.mark.anyio
async def test_probe_releases_past_max_pending_waiting_too_are_counted_and_reported(
    stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    store = stores(max_pending=1)
    config = BreakerConfig(consecutive_failures=1, open_duration=0.05, half_open_permits=3)
    breaker = CircuitBreaker(name, config, store=store)
    with pytest.raises(Boom):
        await breaker.call_async(aboom)  # open for 50 ms, for everyone
    await breaker.flush_async()
    probes = []
    for _ in range(300):  # bounded: until the open time passes and three probes are out
        try:
            permit = await breaker.allow_async()
        except CircuitOpenError:
            await asyncio.sleep(0.005)
            continue
        assert permit.probe
        probes.append(permit)
        if len(probes) == 3:
            break
    assert len(probes) == 3
    for permit in probes:  # (no await in between) one sent, one waiting, one shed
        permit.cancel()
    shed = [(e.operation, e.what) for e in seen if isinstance(e, WriteShed)]
    assert shed == [(name, "probe release")]
    await breaker.flush_async()


@pytest.mark.anyio
async def test_failures_counted_while_redis_was_down_join_the_shared_state_when_it_answers(
    private_redis: RedisServer, stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    config = BreakerConfig(consecutive_failures=5)
    here = CircuitBreaker(name, config, store=stores(private_redis.url, retry_interval=0.0))
    assert await here.call_async(aok) == "ok"
    await here.flush_async()
    private_redis.stop()
    for _ in range(3):  # judged here: 3 of 5
        with pytest.raises(Boom):
            await here.call_async(aboom)
    assert here.state is BreakerState.CLOSED
    assert [type(e) for e in seen if isinstance(e, StoreFallback)] == [StoreFallback]
    private_redis.start()  # (empty: it keeps no data)
    for _ in range(100):  # bounded: the read that finds Redis again...
        permit = await here.allow_async()
        permit.cancel()
        if any(isinstance(e, StoreResumed) for e in seen):
            break
        await asyncio.sleep(0.01)
    await here.flush_async()  # ...and sends what was counted meanwhile
    assert [type(e) for e in seen if isinstance(e, StoreResumed)] == [StoreResumed]
    there = CircuitBreaker(name, config, store=stores(private_redis.url))
    for _ in range(2):  # 3 + 2: another process's two failures trip it for everyone
        with pytest.raises(Boom):
            await there.call_async(aboom)
    await refused_within(there)
    await refused_within(here)


@pytest.mark.anyio
async def test_outcomes_of_calls_admitted_before_a_reset_while_redis_was_down_never_join_it(
    private_redis: RedisServer, stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    """A reset while Redis is away is obeyed here and pushed when it answers; the
    calls admitted before it are late, here and in the shared state alike."""
    config = BreakerConfig(consecutive_failures=5)
    here = CircuitBreaker(name, config, store=stores(private_redis.url, retry_interval=0.0))
    assert await here.call_async(aok) == "ok"
    await here.flush_async()
    before = [await here.allow_async()]  # admitted by Redis
    private_redis.stop()
    before += [await here.allow_async() for _ in range(2)]  # admitted here
    await here.reset_async()
    for permit in before:
        permit.failure(Boom())  # late: they count nowhere
    assert here.snapshot().consecutive_failures == 0
    with pytest.raises(Boom):
        await here.call_async(aboom)  # after the reset: counts, here and then in Redis
    private_redis.start()  # (empty: it keeps no data)
    for _ in range(100):  # bounded: the read that finds Redis again...
        permit = await here.allow_async()
        permit.cancel()
        if any(isinstance(e, StoreResumed) for e in seen):
            break
        await asyncio.sleep(0.01)
    await here.flush_async()  # ...and sends what was counted meanwhile
    there = CircuitBreaker(name, config, store=stores(private_redis.url))
    permit = await there.allow_async()
    permit.cancel()
    assert there.snapshot().consecutive_failures == 1


@pytest.mark.anyio
async def test_a_count_window_batch_costs_a_few_commands_not_two_per_outcome(
    private_redis: RedisServer, stores: Callable[..., RedisStore], name: str
) -> None:
    config = BreakerConfig(
        failure_rate_threshold=0.5, window="count", window_size=100, minimum_calls=100
    )
    store = stores(private_redis.url, cache_ttl=60.0, flush_interval=60.0, flush_max=10_000)
    breaker = CircuitBreaker(name, config, store=store)
    assert await breaker.call_async(aok) == "ok"
    await breaker.flush_async()
    watcher = aioredis.Redis.from_url(private_redis.url)
    try:
        before = await _commands(watcher)
        for i in range(300):  # the ring wraps around three times
            permit = await breaker.allow_async()
            permit.success() if i % 3 else permit.failure(Boom())
        await breaker.flush_async()
        used = await _commands(watcher) - before - 1  # (less the INFO above)
    finally:
        await watcher.aclose()
    snap = breaker.snapshot()
    assert (snap.calls, snap.failures) == (100, 33)  # i = 200..299: 33 failed
    # EVALSHA, TIME, HMGET, GET ring, SET ring, HSET, PEXPIRE state, PEXPIRE ring
    assert used <= 8, f"{used} commands for one batch of 300 outcomes"
