"""The Redis cache on a real Redis Cluster (3 masters + 3 replicas) and a real Sentinel setup.

asyncio only (redis.asyncio).  What is pinned: a cluster or Sentinel client
(or URL) works like a plain one; multi-key commands are split per hash slot;
a live slot migration is followed without a cache failure; a killed master
is survived through the read-through recovery and the cache is used again,
by the same client, once a replica has taken over.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from datapunk_recovery.breaker import BreakerConfig
from datapunk_recovery.cache import CacheConfig, FunctionSource, ReadThroughCache, RedisCache
from tests.harness import RedisClusterServers, RedisSentinelServers

pytestmark = pytest.mark.anyio

#: Bound on waiting for a failover or a recovery in a drill (seconds; it takes about 2 s).
BOUND = 15.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis.asyncio


def cluster_url(cluster: RedisClusterServers) -> str:
    return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes[:3])


def sentinel_url(setup: RedisSentinelServers) -> str:
    hosts = ",".join(f"{h}:{p}" for h, p in setup.sentinel_addresses)
    return f"redis+sentinel://{hosts}/{setup.service}/0"


@pytest.fixture
async def cluster_cache(redis_cluster: RedisClusterServers) -> AsyncIterator[RedisCache]:
    client = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes],
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
    )
    cache = RedisCache(client)
    yield cache
    await cache.close()


@pytest.fixture
async def sentinel_cache(redis_sentinel: RedisSentinelServers) -> AsyncIterator[RedisCache]:
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        redis_sentinel.sentinel_addresses, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    cache = RedisCache(
        sentinel.master_for(redis_sentinel.service, socket_timeout=0.5, socket_connect_timeout=0.5)
    )
    yield cache
    await cache.close()
    for client in sentinel.sentinels:
        await client.aclose()


def spread_keys(cluster: RedisClusterServers, n: int) -> list[str]:
    """``n`` keys on at least three different slots and on every master."""
    keys = [f"spread:{i}" for i in range(n)]
    assert len({cluster.key_slot(k) for k in keys}) >= 3
    assert len({cluster.master_for_key(k).port for k in keys}) == 3
    return keys


# -- what a cluster changes ------------------------------------------------------------


async def test_get_many_reads_keys_of_different_slots_in_order(
    redis_cluster: RedisClusterServers, cluster_cache: RedisCache
) -> None:
    keys = spread_keys(redis_cluster, 12)
    for i, key in enumerate(keys[:8]):
        await cluster_cache.set(key, {"i": i}, 30.0)
    await cluster_cache.set("{tag}a", "A", 30.0)
    await cluster_cache.set("{tag}b", "B", 30.0)
    wanted = [*keys, "{tag}a", "{tag}b", keys[0]]  # a hash tag group and a duplicate
    expected = [{"i": i} for i in range(8)] + [None] * 4 + ["A", "B", {"i": 0}]
    assert await cluster_cache.get_many(wanted) == expected


async def test_get_many_sends_one_mget_per_slot(
    redis_cluster: RedisClusterServers, cluster_cache: RedisCache
) -> None:
    keys = ["{one}1", "{one}2", "{one}3", "{two}1", "{two}2"]
    assert cluster_cache._slot_groups(keys) == {
        redis_cluster.key_slot("{one}"): [0, 1, 2],
        redis_cluster.key_slot("{two}"): [3, 4],
    }


async def test_delete_removes_keys_of_different_slots(
    redis_cluster: RedisClusterServers, cluster_cache: RedisCache
) -> None:
    keys = spread_keys(redis_cluster, 9)
    for key in keys:
        await cluster_cache.set(key, 1, 30.0)
    await cluster_cache.delete(keys[:6])
    assert await cluster_cache.get_many(keys) == [None] * 6 + [1] * 3


async def test_counters_and_generation_bumps_work_on_a_cluster(cluster_cache: RedisCache) -> None:
    await cluster_cache.client.delete("gen:x")
    assert await cluster_cache.counter("gen:x") == 0
    assert await cluster_cache.incr("gen:x") == 1 and await cluster_cache.counter("gen:x") == 1


async def test_a_slot_migrated_live_is_followed_without_a_cache_failure(
    redis_cluster: RedisClusterServers, cluster_cache: RedisCache
) -> None:
    keys = ["{mig}1", "{mig}2", "{mig}3", "other"]
    for i, key in enumerate(keys):
        await cluster_cache.set(key, i, 30.0)
    migration = redis_cluster.begin_migration(redis_cluster.key_slot("{mig}"))
    try:
        assert await cluster_cache.get_many(keys) == [0, 1, 2, 3]  # nothing moved yet
        migration.move_keys(["{mig}1"])  # half moved: MGET gets TRYAGAIN, GET gets ASK
        assert await cluster_cache.get_many(keys) == [0, 1, 2, 3]
        assert await cluster_cache.get("{mig}1") == 0
        await cluster_cache.delete(["{mig}1", "{mig}3"])
        assert await cluster_cache.get_many(keys) == [None, 1, None, 3]
        migration.move_keys()
        assert await cluster_cache.get_many(keys) == [None, 1, None, 3]
    finally:
        migration.move_keys()
        migration.finish()
    assert await cluster_cache.get_many(keys) == [None, 1, None, 3]  # after MOVED


async def test_the_read_through_cache_counts_no_failure_during_a_migration(
    redis_cluster: RedisClusterServers, cluster_cache: RedisCache
) -> None:
    rows = {f"{{rt}}{i}": i for i in range(4)}

    async def load(key: str) -> Any:
        return rows.get(key)

    rtc: ReadThroughCache[Any] = ReadThroughCache(FunctionSource(load), cluster_cache, name="mig")
    for key in rows:
        assert (await rtc.lookup(key)).origin == "source"
    slot = redis_cluster.key_slot(rtc._prefix + "{rt}0")
    migration = redis_cluster.begin_migration(slot)
    try:
        migration.move_keys([rtc._prefix + "{rt}0"])
        assert [(await rtc.lookup(k)).origin for k in rows] == ["cache"] * 4
        await rtc.invalidate("{rt}1")
        assert (await rtc.lookup("{rt}1")).origin == "source"
    finally:
        migration.move_keys()
        migration.finish()
    assert [(await rtc.lookup(k)).origin for k in rows] == ["cache"] * 4
    assert rtc.stats().failures == {}


async def test_two_clients_share_entries_on_the_cluster(
    redis_cluster: RedisClusterServers, cluster_cache: RedisCache
) -> None:
    other = RedisCache.from_url(cluster_url(redis_cluster))
    try:
        keys = spread_keys(redis_cluster, 6)
        for i, key in enumerate(keys):
            await cluster_cache.set(key, i, 30.0)
        assert await other.get_many(keys) == list(range(6))
        await other.delete(keys[:3])
        assert await cluster_cache.get_many(keys) == [None] * 3 + [3, 4, 5]
    finally:
        await other.close()


async def test_two_clients_share_entries_through_sentinel(
    redis_sentinel: RedisSentinelServers, sentinel_cache: RedisCache
) -> None:
    other = RedisCache.from_url(sentinel_url(redis_sentinel))
    try:
        await sentinel_cache.set("shared", {"v": 1}, 30.0)
        assert await other.get_many(["shared", "absent"]) == [{"v": 1}, None]
        await other.delete(["shared"])
        assert await sentinel_cache.get("shared") is None
    finally:
        await other.close()


# -- URLs ------------------------------------------------------------------------------


async def test_cluster_and_sentinel_urls_build_the_right_clients(
    redis_cluster: RedisClusterServers, redis_sentinel: RedisSentinelServers
) -> None:
    cluster = RedisCache.from_url(cluster_url(redis_cluster), timeout=0.3)
    sentinel = RedisCache.from_url(sentinel_url(redis_sentinel), timeout=0.3)
    try:
        assert isinstance(cluster.client, RedisCluster) and cluster._cluster
        assert not sentinel._cluster
        await sentinel.set("url", 1, 5.0)
        assert await sentinel.get("url") == 1
        kwargs = sentinel.client.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["db"]) == (0.3, 0)
    finally:
        await cluster.close()
        await sentinel.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://user:hunter2@127.0.0.1:1,127.0.0.1:2",
        "redis+sentinel://:hunter2@127.0.0.1:1,127.0.0.1:2/svc/1",
    ],
)
async def test_a_cluster_or_sentinel_url_password_never_shows(url: str) -> None:
    cache = RedisCache.from_url(url)
    try:
        assert "hunter2" not in repr(cache)
        if not cache._cluster:  # (a cluster client keeps it per node)
            assert cache.client.connection_pool.connection_kwargs["password"] == "hunter2"
            assert cache.client.connection_pool.connection_kwargs["db"] == 1
    finally:
        await cache.close()


async def test_a_malformed_url_error_never_shows_the_password() -> None:
    with pytest.raises(ValueError) as info:
        RedisCache.from_url("redis+cluster://user:hunter2@127.0.0.1:1,bad:port")
    assert "hunter2" not in str(info.value) and "bad:port" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379",  # no service
        "redis+sentinel://127.0.0.1:26379/svc/x",  # a db that is not a number
        "redis+cluster://127.0.0.1:6379/3",  # a cluster has only db 0
        "redis+cluster://127.0.0.1:notaport",
    ],
)
async def test_a_malformed_cluster_or_sentinel_url_raises_value_error(url: str) -> None:
    with pytest.raises(ValueError, match=r"RedisCache\.url"):
        RedisCache.from_url(url)


# -- failover drills -------------------------------------------------------------------


async def poll_until_cached(rtc: ReadThroughCache[Any], key: str, value: Any) -> None:
    """Read ``key`` until the cache (not the source) answers; every read must be right."""
    deadline = time.monotonic() + BOUND
    while True:
        answer = await rtc.lookup(key)
        assert answer.value == value  # no Redis error, no wrong value, ever
        if answer.origin == "cache":
            return
        assert time.monotonic() < deadline, "the cache was not used again"
        await anyio.sleep(0.05)


def quick_breaker() -> CacheConfig:
    return CacheConfig(breaker=BreakerConfig(consecutive_failures=2, open_duration=0.2))


@pytest.mark.drill
async def test_a_killed_cluster_master_is_survived_and_the_cache_used_again_without_a_restart(
    redis_cluster: RedisClusterServers, cluster_cache: RedisCache
) -> None:
    async def load(key: str) -> Any:
        return {"key": key}

    rtc: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(load), cluster_cache, quick_breaker(), name="cluster-failover"
    )
    await rtc.lookup("k1")
    assert (await rtc.lookup("k1")).origin == "cache"
    old = redis_cluster.kill_master_of(rtc._prefix + "k1")
    for _ in range(3):  # while the master is dead: answers from the source, no error
        assert (await rtc.lookup("k1")).value == {"key": "k1"}
    assert sum(rtc.stats().failures.values()) >= 1
    redis_cluster.wait_for_new_master(rtc._prefix + "k1", old, timeout=BOUND)
    await poll_until_cached(rtc, "k1", {"key": "k1"})


@pytest.mark.drill
async def test_a_killed_sentinel_master_is_survived_and_the_cache_used_again_without_a_restart(
    redis_sentinel: RedisSentinelServers, sentinel_cache: RedisCache
) -> None:
    async def load(key: str) -> Any:
        return {"key": key}

    rtc: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(load), sentinel_cache, quick_breaker(), name="sentinel-failover"
    )
    await rtc.lookup("k1")
    assert (await rtc.lookup("k1")).origin == "cache"
    old = redis_sentinel.kill_master()
    for _ in range(3):
        assert (await rtc.lookup("k1")).value == {"key": "k1"}
    assert sum(rtc.stats().failures.values()) >= 1
    redis_sentinel.wait_for_new_master(old, timeout=BOUND)
    await poll_until_cached(rtc, "k1", {"key": "k1"})
