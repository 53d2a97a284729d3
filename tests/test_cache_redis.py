"""The Redis cache against a real redis-server, and through a fault proxy.

asyncio only (redis.asyncio).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from datapunk_recovery._core.events import Event
from datapunk_recovery.breaker import BreakerConfig
from datapunk_recovery.cache import (
    CacheConfig,
    CacheFailed,
    CorruptEntry,
    FunctionSource,
    JsonCodec,
    PickleCodec,
    ReadThroughCache,
    RedisCache,
)
from tests.harness import RedisServer, ThreadedProxy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def redis_cache(redis_server: RedisServer) -> AsyncIterator[RedisCache]:
    redis_server.flushall()
    cache = RedisCache.from_url(redis_server.url)
    yield cache
    await cache.close()


async def test_values_round_trip_as_json_with_their_ttl(redis_cache: RedisCache) -> None:
    await redis_cache.set("a", {"x": [1, 2]}, 30.0)
    assert await redis_cache.get("a") == {"x": [1, 2]}
    assert await redis_cache.get_many(["a", "b"]) == [{"x": [1, 2]}, None]
    assert 29_000 < await redis_cache.client.pttl("a") <= 30_000
    assert json.loads(await redis_cache.client.get("a")) == {"x": [1, 2]}  # plain JSON inside
    await redis_cache.delete(["a"])
    assert await redis_cache.get("a") is None
    assert await redis_cache.counter("g") == 0
    assert await redis_cache.incr("g") == 1 and await redis_cache.counter("g") == 1


async def test_pickle_is_there_only_when_asked_for(redis_server: RedisServer) -> None:
    cache = RedisCache.from_url(redis_server.url, codec=PickleCodec(i_trust_the_cache=True))
    try:
        await cache.set("p", {1, 2}, 5.0)
        assert await cache.get("p") == {1, 2}
    finally:
        await cache.close()


async def test_the_url_password_never_shows(redis_server: RedisServer) -> None:
    cache = RedisCache.from_url(f"redis://:hunter2@127.0.0.1:{redis_server.port}/0")
    try:
        assert "hunter2" not in repr(cache)
    finally:
        await cache.close()


async def test_a_blackholed_redis_costs_one_timeout_per_probe_not_per_read(
    redis_server: RedisServer, make_proxy: Callable[[tuple[str, int]], ThreadedProxy]
) -> None:
    proxy = make_proxy(redis_server.address)
    cache = RedisCache.from_url(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.1)
    rows = {f"k{i}": i for i in range(10)}

    async def load(key: str) -> Any:
        return rows.get(key)

    rtc: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(load),
        cache,
        CacheConfig(breaker=BreakerConfig(consecutive_failures=2, open_duration=60.0)),
        name="blackholed",
    )
    seen: list[Event] = []
    rtc.bus.subscribe(seen.append)
    try:
        await rtc.get("k1")
        proxy.blackhole()
        results = [await rtc.get(f"k{i % 10}") for i in range(50)]
    finally:
        proxy.clear()
        await cache.close()
    assert results == [i % 10 for i in range(50)]
    kinds = [e.kind for e in seen if isinstance(e, CacheFailed)]
    # Two reads found the cache failing (the socket timeout, or redis-py giving
    # up on the stuck connection)...
    assert len([k for k in kinds if k != "open"]) == 2
    assert kinds.count("open") == 48  # ...the other 48 were refused by the breaker at once


async def test_garbage_in_redis_is_ignored_with_an_event_and_never_unpickled(
    redis_cache: RedisCache,
) -> None:
    import pickle

    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, ("raise SystemExit('pickle ran')",))

    rows = {"k1": {"n": 1}}

    async def load(key: str) -> Any:
        return rows.get(key)

    rtc: ReadThroughCache[Any] = ReadThroughCache(FunctionSource(load), redis_cache, name="g")
    seen: list[Event] = []
    rtc.bus.subscribe(seen.append)
    await rtc.get("k1")
    raw = redis_cache.client
    for garbage in (b"\x80\x04not json", pickle.dumps(Boom()), b'"just a string"', b"[1e999, 2]"):
        await raw.set(rtc._prefix + "k1", garbage)
        answer = await rtc.lookup("k1")  # never raises, never runs the pickle
        assert (answer.value, answer.origin) == ({"n": 1}, "source")
        assert (await rtc.lookup("k1")).origin == "cache"  # the refill replaced it
    assert rtc.stats().failures == {"corrupt": 4}
    assert {e.kind for e in seen if isinstance(e, CacheFailed)} == {"corrupt"}
    assert rtc.breaker.snapshot().failures == 0
    # A generation counter holding garbage: the cache is bypassed, reads still answer.
    await raw.set(rtc._gen_key, b"garbage")
    fresh: ReadThroughCache[Any] = ReadThroughCache(FunctionSource(load), redis_cache, name="g2")
    assert (await fresh.lookup("k1")).value == {"n": 1}
    assert fresh.stats().failures == {"corrupt": 1}


async def test_garbage_in_redis_read_by_get_is_a_miss_with_an_event_never_a_crash(
    redis_cache: RedisCache,
) -> None:
    rows = {"k1": {"n": 1}}

    async def load(key: str) -> Any:
        return rows.get(key)

    rtc: ReadThroughCache[Any] = ReadThroughCache(FunctionSource(load), redis_cache, name="g")
    seen: list[Event] = []
    rtc.bus.subscribe(seen.append)
    await rtc.get("k1")
    huge = b"[1" + b"0" * 400 + b", 2]"  # a time too large for a float
    for garbage in (b"\x80\x04not json", b'"just a string"', b"[1e999, 2]", huge, b"[1.5]"):
        await redis_cache.client.set(rtc._prefix + "k1", garbage)
        assert await rtc.get("k1") == {"n": 1}
        assert json.loads(await redis_cache.client.get(rtc._prefix + "k1"))[1] == {"n": 1}
    assert rtc.stats().failures == {"corrupt": 5}
    assert {(e.kind, e.op) for e in seen if isinstance(e, CacheFailed)} == {("corrupt", "get")}
    assert rtc.breaker.snapshot().failures == 0


async def test_undecodable_bytes_name_the_codec_and_never_the_bytes(
    redis_cache: RedisCache,
) -> None:
    await redis_cache.client.set("bad", b"secret-token-1234 not json")
    with pytest.raises(CorruptEntry) as caught:
        await redis_cache.get("bad")
    assert str(caught.value) == "JsonCodec cannot decode a cached value (JSONDecodeError)"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


async def test_a_json_codec_subclass_decodes_with_its_own_method(
    redis_server: RedisServer,
) -> None:
    class TaggedJson(JsonCodec):
        def decode(self, data: bytes) -> Any:
            return {"tagged": super().decode(data)}

    cache = RedisCache.from_url(redis_server.url, codec=TaggedJson())
    try:
        await cache.set("t", [1, 2], 5.0)
        assert await cache.get("t") == {"tagged": [1, 2]}
        assert await cache.get_many(["t"]) == [{"tagged": [1, 2]}]
    finally:
        await cache.close()
