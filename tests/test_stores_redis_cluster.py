"""Shared breakers and budgets on a real Redis Cluster (3 masters + 3 replicas) and via Sentinel.

asyncio only (redis.asyncio).  What is pinned: a ``RedisCluster`` client, a
``Sentinel(...).master_for(...)`` client and their URLs work with
``RedisStore`` and ``SharedBudget`` like a plain client; state is shared across
stores and OS processes; a killed master costs a bounded local fallback (no
Redis error reaches a caller) and sharing resumes on the same client; a slot
migrated live is followed (the state moves with its keys).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from datapunk_recovery._core.errors import CircuitOpenError
from datapunk_recovery._core.events import Event
from datapunk_recovery.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    StoreFallback,
    StoreResumed,
)
from datapunk_recovery.budget import TokenBudget, TokenBudgetConfig
from datapunk_recovery.stores.budget_redis import BudgetStoreFallback, SharedBudget
from datapunk_recovery.stores.redis import RedisStore
from tests.harness import RedisClusterServers, RedisSentinelServers

pytestmark = pytest.mark.anyio

#: This checkout's sources, for the other OS process.
SRC = str(Path(__file__).resolve().parents[1] / "src")

#: The stores' timeout here (seconds; default 0.25): the suite shares two cores with other
#: work, and a first call on a fresh cluster client (slot map, SCRIPT LOAD on every master)
#: may not fit 0.25 s there.  Still above the ~0.4 s redis-py spends retrying TRYAGAIN, so
#: a script refused for a whole migration would still fall back and fail the drill.
LOADED_TIMEOUT = 1.0

#: Bound on waiting for a failover or a resumption in a drill (seconds; a failover takes ~2 s).
BOUND = 15.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis.asyncio


@pytest.fixture
def name() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


def cluster_url(cluster: RedisClusterServers) -> str:
    return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes[:3])


def sentinel_url(setup: RedisSentinelServers) -> str:
    hosts = ",".join(f"{h}:{p}" for h, p in setup.sentinel_addresses)
    return f"redis+sentinel://{hosts}/{setup.service}/0"


@pytest.fixture
async def made() -> AsyncIterator[list[Any]]:
    """Stores and clients a test made: closed after it, stores first."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        await thing.aclose()


@pytest.fixture
def cluster_store(redis_cluster: RedisClusterServers, made: list[Any]) -> Callable[..., RedisStore]:
    """Stores on the cluster: a ``RedisCluster`` client object, or the URL with ``url=True``."""

    def make(*, url: bool = False, **settings: Any) -> RedisStore:
        settings.setdefault("cache_ttl", 0.0)
        settings.setdefault("timeout", LOADED_TIMEOUT)
        if url:
            store = RedisStore(cluster_url(redis_cluster), **settings)
        else:
            client = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes],
                socket_timeout=1.0,
                socket_connect_timeout=1.0,
            )
            made.append(client)
            store = RedisStore(client, **settings)
        made.append(store)
        return store

    return make


@pytest.fixture
def sentinel_store(
    redis_sentinel: RedisSentinelServers, made: list[Any]
) -> Callable[..., RedisStore]:
    """Stores via Sentinel: a ``master_for`` client object, or the URL with ``url=True``."""

    def make(*, url: bool = False, **settings: Any) -> RedisStore:
        settings.setdefault("cache_ttl", 0.0)
        settings.setdefault("timeout", LOADED_TIMEOUT)
        if url:
            store = RedisStore(sentinel_url(redis_sentinel), **settings)
        else:
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                redis_sentinel.sentinel_addresses, socket_timeout=1.0, socket_connect_timeout=1.0
            )
            made.extend(sentinel.sentinels)
            client = sentinel.master_for(
                redis_sentinel.service, socket_timeout=1.0, socket_connect_timeout=1.0
            )
            made.append(client)
            store = RedisStore(client, **settings)
        made.append(store)
        return store

    return make


@pytest.fixture(params=["cluster", "sentinel"])
def engine_store(
    request: pytest.FixtureRequest,
) -> Callable[..., RedisStore]:
    """Stores on either engine (the fixture of that engine is started lazily)."""
    fixture = "cluster_store" if request.param == "cluster" else "sentinel_store"
    maker: Callable[..., RedisStore] = request.getfixturevalue(fixture)
    return maker


async def aok() -> str:
    return "ok"


class Boom(Exception):
    pass


async def trip(breaker: CircuitBreaker, times: int = 5) -> None:
    for _ in range(times):
        permit = await breaker.allow_async()
        await permit.failure_async(Boom())


def tokens(name: str) -> TokenBudget:
    return TokenBudget(name, TokenBudgetConfig(max_tokens=10.0, token_ratio=0.1))


async def until(predicate: Callable[[], Any], what: str, bound: float = BOUND) -> None:
    """Bounded polling: ``predicate`` must hold within ``bound`` seconds."""
    ends = time.monotonic() + bound
    while not await predicate():
        if time.monotonic() > ends:
            raise AssertionError(f"never happened within {bound} s: {what}")
        await asyncio.sleep(0.02)


def count(seen: list[Event], kind: type[Event]) -> int:
    return sum(isinstance(e, kind) for e in seen)


# -- sharing ----------------------------------------------------------------------------


_OTHER_PROCESS = """
import asyncio, sys
from datapunk_recovery.breaker import BreakerConfig, CircuitBreaker
from datapunk_recovery.stores.redis import RedisStore

async def main() -> None:
    store = RedisStore(sys.argv[1], cache_ttl=0.0)
    breaker = CircuitBreaker(sys.argv[2], BreakerConfig(open_duration=30.0), store=store)
    try:
        await breaker.allow_async()
        print("admitted")
    except Exception as exc:
        print(type(exc).__name__, breaker.state.value)
    await store.aclose()

asyncio.run(main())
"""


@pytest.mark.drill  # an OS process: about a second
async def test_a_breaker_tripped_on_the_cluster_is_seen_open_by_another_process(
    redis_cluster: RedisClusterServers, cluster_store: Callable[..., RedisStore], name: str
) -> None:
    config = BreakerConfig(open_duration=30.0)
    a = CircuitBreaker(name, config, store=cluster_store())
    await trip(a)
    assert a.state is BreakerState.OPEN
    env = {**os.environ, "PYTHONPATH": SRC}
    other = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _OTHER_PROCESS, cluster_url(redis_cluster), name],
        capture_output=True,
        text=True,
        timeout=BOUND,
        env=env,
    )
    assert other.stdout.strip() == "CircuitOpenError open", other.stderr


@pytest.mark.parametrize("url", [False, True], ids=["client", "url"])
async def test_two_stores_share_a_breaker_on_either_engine(
    engine_store: Callable[..., RedisStore], name: str, url: bool
) -> None:
    config = BreakerConfig(open_duration=30.0)
    a = CircuitBreaker(name, config, store=engine_store(url=url))
    b = CircuitBreaker(name, config, store=engine_store(url=not url))
    assert await b.call_async(aok) == "ok"
    await trip(a)
    with pytest.raises(CircuitOpenError):
        await b.call_async(aok)  # b never failed itself
    assert b.state is BreakerState.OPEN


@pytest.mark.parametrize("url", [False, True], ids=["client", "url"])
async def test_two_stores_share_a_budget_on_either_engine(
    engine_store: Callable[..., RedisStore], name: str, url: bool
) -> None:
    a = SharedBudget(tokens(name), engine_store(url=url))
    b = SharedBudget(tokens(name), engine_store(url=not url))
    for _ in range(3):
        a.on_attempt(False)
        b.on_attempt(False)
    assert a.allow_retry() and b.allow_retry()  # each alone holds 7 tokens of 10
    assert await a.sync() and await b.sync() and await a.sync()
    assert a.budget.tokens == b.budget.tokens == 4.0  # type: ignore[union-attr]
    assert not a.allow_retry() and not b.allow_retry()


async def test_urls_make_a_cluster_client_and_a_sentinel_master_client_closed_with_the_store(
    redis_cluster: RedisClusterServers, redis_sentinel: RedisSentinelServers
) -> None:
    on_cluster = RedisStore(cluster_url(redis_cluster))
    via_sentinel = RedisStore(sentinel_url(redis_sentinel))
    assert isinstance(on_cluster.client, RedisCluster)
    assert isinstance(via_sentinel.client.connection_pool, SentinelConnectionPool)
    assert via_sentinel.client.connection_pool.service_name == redis_sentinel.service
    for store in (on_cluster, via_sentinel):
        breaker = CircuitBreaker(f"urls-{uuid.uuid4().hex[:8]}", store=store)
        assert await breaker.call_async(aok) == "ok"
        await store.aclose()
        assert store.closed


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://user:s3cret-pw@host:notaport",
        "redis+sentinel://user:s3cret-pw@host:26379",  # no service
        "redis+cluster://user:s3cret-pw@host:7000/3",  # a cluster has only database 0
    ],
)
def test_a_malformed_cluster_or_sentinel_url_names_the_field_never_the_password(url: str) -> None:
    with pytest.raises(ValueError, match=r"RedisStore\.url") as info:
        RedisStore(url)
    assert "s3cret-pw" not in str(info.value)


# -- a master killed ---------------------------------------------------------------------


async def _calls_survive_a_failover(
    store: RedisStore,
    other: RedisStore,
    name: str,
    seen: list[Event],
    kill: Callable[[], Any],
    settle: Callable[[], Any],
    held: tuple[str, str],
) -> float:
    """Calls go on while ``kill`` takes the master away; returns the fallback's length (s).

    ``held`` names two more breakers on the same master: one tripped open and
    one forced open before the kill; both are still open for another store after.
    """
    config = BreakerConfig(open_duration=30.0, consecutive_failures=5)
    breaker = CircuitBreaker(name, config, store=store)
    budget = SharedBudget(tokens(name), store, sync_interval=0.05)
    opened = CircuitBreaker(held[0], config, store=store)
    forced = CircuitBreaker(held[1], config, store=store)
    await trip(opened)
    await forced.isolate_async()
    assert await breaker.call_async(aok) == "ok"
    assert await budget.sync()
    await asyncio.to_thread(kill)
    fell_back = resumed = None

    def mine(kind: type[Event]) -> list[Any]:
        """Events of ``kind`` about the breaker making calls (not the held ones)."""
        return [e for e in seen if isinstance(e, kind) and e.operation == name]

    ends = time.monotonic() + BOUND
    while resumed is None:
        assert time.monotonic() < ends, "sharing never resumed"
        assert await breaker.call_async(aok) == "ok"  # no Redis error, no refusal
        budget.on_attempt(True)
        await budget.sync()  # never raises: False while Redis is away
        if fell_back is None and mine(StoreFallback):
            fell_back = time.monotonic()
        if mine(StoreResumed):
            resumed = time.monotonic()
        await asyncio.sleep(0.01)
    assert fell_back is not None
    assert await budget.sync()
    # A fresh client (``other``'s) asks the sentinels or the slot map: wait until
    # every one of them names the new master.
    await asyncio.to_thread(settle)
    # sharing resumed, on the same client: a trip elsewhere is seen here
    await trip(CircuitBreaker(name, config, store=other))
    with pytest.raises(CircuitOpenError):
        await breaker.call_async(aok)
    # open and forced-open states were kept (or re-asserted by their holder)
    for holder in (opened, forced):
        with pytest.raises(CircuitOpenError):
            await holder.call_async(aok)
    elsewhere = [CircuitBreaker(n, config, store=other) for n in held]
    for each in elsewhere:
        with pytest.raises(CircuitOpenError):
            await each.call_async(aok)
    assert [b.state for b in elsewhere] == [BreakerState.OPEN, BreakerState.FORCED_OPEN]
    back = mine(StoreResumed)[0]
    return float(back.outage)


@pytest.mark.drill
async def test_a_killed_cluster_master_costs_a_bounded_fallback_and_sharing_resumes(
    redis_cluster: RedisClusterServers,
    cluster_store: Callable[..., RedisStore],
    name: str,
    seen: list[Event],
    record_property: Callable[[str, object], None],
) -> None:
    key = f"datapunk:{{breaker:{name}}}:state"
    killed: list[Any] = []

    def kill() -> None:
        killed.append(redis_cluster.kill_master_of(key))

    def settle() -> None:
        redis_cluster.wait_for_new_master(key, killed[0], timeout=BOUND)

    master = redis_cluster.master_for_key(key)
    held = [
        n
        for n in (f"{name}-{i}" for i in range(1000))
        if redis_cluster.master_for_key(f"datapunk:{{breaker:{n}}}:state") is master
    ][:2]
    store = cluster_store(retry_interval=0.2)
    outage = await _calls_survive_a_failover(
        store, cluster_store(url=True), name, seen, kill, settle, (held[0], held[1])
    )
    assert 0 < outage < BOUND
    record_property("fallback_seconds", round(outage, 2))  # for the record, not asserted


@pytest.mark.drill
async def test_a_killed_sentinel_master_costs_a_bounded_fallback_and_sharing_resumes(
    redis_sentinel: RedisSentinelServers,
    sentinel_store: Callable[..., RedisStore],
    name: str,
    seen: list[Event],
    record_property: Callable[[str, object], None],
) -> None:
    killed: list[Any] = []

    def kill() -> None:
        killed.append(redis_sentinel.kill_master())

    def settle() -> None:
        redis_sentinel.wait_for_new_master(killed[0], timeout=BOUND)

    store = sentinel_store(retry_interval=0.2)
    outage = await _calls_survive_a_failover(
        store,
        sentinel_store(url=True),
        name,
        seen,
        kill,
        settle,
        (f"{name}-open", f"{name}-forced"),
    )
    assert 0 < outage < BOUND
    record_property("fallback_seconds", round(outage, 2))  # for the record, not asserted


# -- a slot migrated live -----------------------------------------------------------------


@pytest.mark.drill
async def test_a_slot_migrated_live_is_followed_and_the_state_moves_with_its_keys(
    redis_cluster: RedisClusterServers,
    cluster_store: Callable[..., RedisStore],
    name: str,
    seen: list[Event],
) -> None:
    config = BreakerConfig(open_duration=30.0, consecutive_failures=50)
    store = cluster_store()
    breaker = CircuitBreaker(name, config, store=store)
    budget = SharedBudget(tokens(name), store)
    watcher = CircuitBreaker(name, config, store=cluster_store())
    permit = await breaker.allow_async()
    await permit.failure_async(Boom())  # every key of the breaker exists
    assert await budget.sync()
    slot = redis_cluster.key_slot(f"{{breaker:{name}}}")
    budget_slot = redis_cluster.key_slot(f"{{budget:{name}}}")
    stop = asyncio.Event()
    calls = [0]

    def ran(more: int) -> Callable[[], Any]:
        start = calls[0]

        async def enough() -> bool:
            return calls[0] >= start + more

        return enough

    async def traffic() -> None:
        while not stop.is_set():
            assert await watcher.call_async(aok) == "ok"
            budget.on_attempt(True)
            await budget.sync()
            calls[0] += 1
            await asyncio.sleep(0.005)

    running = asyncio.create_task(traffic())
    try:
        for each in (slot, budget_slot):
            migration = await asyncio.to_thread(redis_cluster.begin_migration, each)
            await until(ran(20), "calls while the slot is migrating")
            await asyncio.to_thread(migration.move_keys)
            await until(ran(20), "calls once the keys moved")
            await asyncio.to_thread(migration.finish)
            await until(ran(20), "calls once the slot moved")
    finally:
        stop.set()
        await running
    assert [e for e in seen if isinstance(e, StoreFallback | BudgetStoreFallback)] == []
    assert await budget.sync()
    await trip(breaker, 50)  # the state moved with the keys: the trip is shared
    with pytest.raises(CircuitOpenError):
        await watcher.call_async(aok)
