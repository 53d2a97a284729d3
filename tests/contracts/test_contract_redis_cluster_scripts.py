"""Driver contracts, Redis Cluster: what redis-py does with Lua scripts when the topology moves.

The shared stores (``RedisStore``, ``SharedBudget``) run every operation as
one script over keys of one hash tag, through ``register_script``.  Pinned
by name against a real cluster (3 masters + 3 replicas), because the stores
rely on exactly these behaviours:

- A script whose keys ALL exist is served through a whole live migration:
  by the source while the keys are there, by the target after ``ASK`` once
  they moved, after ``MOVED`` once the slot moved.  (One absent key means
  ``TRYAGAIN`` for the whole migration: see
  ``test_contract_redis_cluster.py``; the breaker script therefore keeps
  every key it names in existence.)
- A replica promoted by a failover has none of the scripts its old master
  had (``SCRIPT LOAD`` is not replicated): ``EVALSHA`` meets ``NOSCRIPT``, and
  a ``register_script`` object loads the script again and succeeds, on its
  own, within the same call.
- ``TRYAGAIN`` is retried by redis-py itself (16 tries, the last eight 50 ms
  apart, about 0.4 s) before ``ClusterError``: longer than the store's
  default timeout (0.25 s), so the store's own bound is what ends the wait.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest
import redis.exceptions as rx
from redis.asyncio.cluster import RedisCluster

from datapunk_recovery.stores.redis import RedisStore
from tests.contracts.redis_cluster_helpers import FAILOVER_BOUND, cluster_client_of, raw
from tests.harness import RedisClusterServers

pytestmark = pytest.mark.anyio



@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis.asyncio


cluster_client = pytest.fixture(cluster_client_of, name="cluster_client")


INCR_ALL = (
    "for _, k in ipairs(KEYS) do redis.call('INCR', k) end; return redis.call('GET', KEYS[1])"
)


async def test_a_script_whose_keys_all_exist_follows_ask_through_a_whole_migration(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    keys = ["p:{breaker:all}:state", "p:{breaker:all}:ring", "p:{breaker:all}:win"]
    await cluster_client.delete(*keys)
    script = cluster_client.register_script(INCR_ALL)
    assert await script(keys=keys) == b"1"  # every key exists from now on
    migration = redis_cluster.begin_migration(redis_cluster.key_slot(keys[0]))
    try:
        assert await script(keys=keys) == b"2"  # nothing moved: the source serves it
        migration.move_keys()
        with raw(migration.source) as source, pytest.raises(rx.AskError):
            source.evalsha(script.sha, len(keys), *keys)  # what the client meets
        assert await script(keys=keys) == b"3"  # ASK: the target serves it
    finally:
        migration.move_keys()
        migration.finish()
    assert await script(keys=keys) == b"4"  # MOVED, followed
    with raw(migration.target) as target:
        assert target.get(keys[2]) == b"4"  # the state lives on the target now


@pytest.mark.drill  # waits for the driver's retries: about 0.5 s
async def test_tryagain_is_retried_by_the_client_for_about_0_4_s_then_raised(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    keys = ["p:{breaker:half}:state", "p:{breaker:half}:ring"]
    await cluster_client.delete(*keys)
    await cluster_client.set(keys[0], b"1")  # the second key is absent
    script = cluster_client.register_script(INCR_ALL)
    migration = redis_cluster.begin_migration(redis_cluster.key_slot(keys[0]))
    try:
        with pytest.raises(rx.ClusterError, match="TTL exhausted"):
            await script(keys=keys)
        assert cluster_client.RedisClusterRequestTTL == 16  # 8 tries at once, 8 after 50 ms
    finally:
        migration.move_keys()
        migration.finish()


@pytest.mark.drill  # waits out the store's default timeout: 0.25 s
async def test_tryagain_retries_outlast_the_stores_default_timeout_so_the_store_ends_the_wait(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    """The driver still retries when ``RedisStore``'s default ``timeout`` (0.25 s) ends.

    A lower bound only (the driver's retries are sleeps: a slow machine makes
    them longer, never shorter), so it cannot fail from load.
    """
    keys = ["p:{breaker:outlast}:state", "p:{breaker:outlast}:ring"]
    await cluster_client.delete(*keys)
    await cluster_client.set(keys[0], b"1")  # the second key is absent
    script = cluster_client.register_script(INCR_ALL)
    store_default_timeout = inspect.signature(RedisStore).parameters["timeout"].default
    assert store_default_timeout == 0.25
    migration = redis_cluster.begin_migration(redis_cluster.key_slot(keys[0]))
    try:
        with pytest.raises(TimeoutError):  # still retrying TRYAGAIN, not given up
            await asyncio.wait_for(script(keys=keys), store_default_timeout)
    finally:
        migration.move_keys()
        migration.finish()


@pytest.mark.drill
async def test_a_replica_promoted_by_failover_lacks_the_scripts_and_a_registered_script_reloads(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    keys = ["p:{breaker:noscript}:state", "p:{breaker:noscript}:ring"]
    await cluster_client.delete(*keys)
    script = cluster_client.register_script(INCR_ALL)
    assert await script(keys=keys) == b"1"
    old = redis_cluster.master_for_key(keys[0])
    with raw(old) as admin:
        assert admin.script_exists(script.sha) == [True]
        assert admin.execute_command("WAIT", 1, 2000) == 1
    replica = redis_cluster.replica_of(old)
    redis_cluster.touch()  # the harness checks the cluster after this test
    with raw(replica) as admin:
        assert admin.script_exists(script.sha) == [False]  # SCRIPT LOAD is not replicated
        admin.execute_command("CLUSTER", "FAILOVER")
    new = redis_cluster.wait_for_new_master(keys[0], old, timeout=FAILOVER_BOUND)
    with raw(new) as admin, pytest.raises(rx.NoScriptError):
        admin.evalsha(script.sha, len(keys), *keys)  # what the client meets first
    assert await script(keys=keys) == b"2"  # MOVED, NOSCRIPT, SCRIPT LOAD, EVALSHA: one call
    with raw(new) as admin:
        assert admin.script_exists(script.sha) == [True]


PLACEHOLDERS = """
redis.call('HSET', KEYS[1], 's', ARGV[1])
redis.call('SET', KEYS[2], '', 'NX')
redis.call('HSETNX', KEYS[3], '_', '')
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, 60000) end
return redis.call('EXISTS', unpack(KEYS))
"""


async def test_set_nx_and_hsetnx_placeholders_keep_every_key_of_a_script_through_a_migration(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    """The breaker script's placeholders: an empty string and a one-field hash are real keys.

    They exist (so the script never meets ``TRYAGAIN``), migrate with their
    TTLs, and a second run keeps what is there (``NX``: the placeholder never
    overwrites a ring or a window the script already wrote).
    """
    keys = ["p:{breaker:nx}:state", "p:{breaker:nx}:ring", "p:{breaker:nx}:win"]
    await cluster_client.delete(*keys)
    script = cluster_client.register_script(PLACEHOLDERS)
    assert await script(keys=keys, args=["closed"]) == 3  # every key exists
    await cluster_client.set(keys[1], b"ring", keepttl=True)
    await cluster_client.hset(keys[2], "w", "1")
    assert await script(keys=keys, args=["closed"]) == 3
    assert await cluster_client.get(keys[1]) == b"ring"  # NX: not overwritten
    assert await cluster_client.hget(keys[2], "w") == b"1"
    migration = redis_cluster.begin_migration(redis_cluster.key_slot(keys[0]))
    try:
        assert migration.move_keys(keys) == 3
        assert await script(keys=keys, args=["open"]) == 3  # ASK: the target serves it
    finally:
        migration.move_keys()
        migration.finish()
    assert await cluster_client.hget(keys[0], "s") == b"open"
    assert [await cluster_client.pttl(k) > 0 for k in keys] == [True, True, True]  # TTLs moved
