"""Driver contracts, Redis Cluster and Sentinel: what redis-py does when the topology moves.

Pinned by name against a real cluster (3 masters + 3 replicas) and a real
Sentinel setup (1 master + 1 replica + 3 sentinels), because the cache's
cluster support is built on exactly these behaviours of redis-py:

- ``RedisCluster.mget`` over keys of different slots fails: a fresh client
  sends it and the node answers ``CROSSSLOT`` (``ClusterCrossSlotError``);
  once the client knows the slots it refuses before sending
  (``RedisClusterException``, "all keys must map to the same key slot").
- A single-key command follows ``MOVED`` (after a failover) and ``ASK``
  (during a live migration) without raising.
- A multi-key command (a script with several keys too) on a slot being
  migrated gets ``TRYAGAIN`` when some of its keys are there and some are
  not (moved already, or never created); redis-py
  retries it (16 tries, the last ones 50 ms apart) and then raises
  ``ClusterError`` ("TTL exhausted"); a pipeline run with
  ``allow_redirections=False`` hands the ``TryAgainError`` back at once.
- A killed master makes commands fail with ``ConnectionError`` until a
  replica takes over; then the same client object follows the new master.
- A ``Sentinel(...).master_for(...)`` client fails with ``ConnectionError``
  (``MasterNotFoundError`` included) until the sentinels promote the
  replica, then reconnects to it on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis.exceptions as rx
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from tests.contracts.redis_cluster_helpers import FAILOVER_BOUND, cluster_client_of, raw
from tests.harness import RedisClusterServers, RedisSentinelServers

pytestmark = pytest.mark.anyio



@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis.asyncio


cluster_client = pytest.fixture(cluster_client_of, name="cluster_client")


def replicate(node: object) -> None:
    """Wait (bounded) until the node's replica has every write so far."""
    with raw(node) as admin:
        assert admin.execute_command("WAIT", 1, 2000) == 1


def test_the_cluster_has_three_masters_with_a_replica_each(
    redis_cluster: RedisClusterServers,
) -> None:
    view = redis_cluster.view(redis_cluster.nodes[0])
    assert sum("master" in n["flags"] and bool(n["slots"]) for n in view) == 3
    assert sum("slave" in n["flags"] for n in view) == 3


def test_the_sentinel_setup_has_one_master_one_replica_and_three_agreeing_sentinels(
    redis_sentinel: RedisSentinelServers,
) -> None:
    assert len(redis_sentinel.sentinels) == 3 and len(redis_sentinel.data_nodes) == 2
    assert {redis_sentinel._named_by(s) for s in redis_sentinel.sentinels} == {
        redis_sentinel.master().address
    }
    with raw(redis_sentinel.master()) as admin:
        assert admin.info("replication")["connected_slaves"] == 1


async def test_mget_across_slots_is_refused_by_the_client_before_sending(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    assert redis_cluster.key_slot("a") != redis_cluster.key_slot("b")
    # A fresh client sends it (it does not know the key's slots yet) and the
    # node answers CROSSSLOT; once initialised, the client refuses it itself.
    with pytest.raises(rx.ClusterCrossSlotError):
        await cluster_client.mget(["a", "b"])
    with pytest.raises(rx.RedisClusterException, match="all keys must map to the same key slot"):
        await cluster_client.mget(["a", "b"])
    with raw(redis_cluster.master_for_key("a")) as node, pytest.raises(rx.ClusterCrossSlotError):
        node.mget(["a", "b"])


async def test_mget_in_one_slot_works_because_hash_tags_pick_the_slot(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    assert redis_cluster.key_slot("{user:1}a") == redis_cluster.key_slot("{user:1}b")
    await cluster_client.set("{user:1}a", b"1")
    assert await cluster_client.mget(["{user:1}a", "{user:1}b"]) == [b"1", None]


async def test_a_command_after_a_manual_failover_follows_moved_without_an_error(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    await cluster_client.set("moved-key", b"v")  # the client now knows the slot's master
    old = redis_cluster.master_for_key("moved-key")
    replicate(old)
    replica = redis_cluster.replica_of(old)
    redis_cluster.touch()  # the harness checks the cluster after this test
    with raw(replica) as admin:
        admin.execute_command("CLUSTER", "FAILOVER")
    redis_cluster.wait_for_new_master("moved-key", old, timeout=FAILOVER_BOUND)
    with raw(old) as stale, pytest.raises(rx.MovedError):
        stale.get("moved-key")  # what the client's next command meets
    assert await cluster_client.get("moved-key") == b"v"


async def test_a_single_key_command_follows_ask_during_a_live_migration(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    await cluster_client.set("ask-key", b"moved")
    migration = redis_cluster.begin_migration(redis_cluster.key_slot("ask-key"))
    try:
        migration.move_keys(["ask-key"])
        with raw(migration.source) as source, pytest.raises(rx.AskError):
            source.get("ask-key")
        assert await cluster_client.get("ask-key") == b"moved"
    finally:
        migration.move_keys()
        migration.finish()


async def test_a_multi_key_command_on_a_half_migrated_slot_gets_tryagain(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    keys = ["{half}1", "{half}2"]
    await cluster_client.set(keys[0], b"1")
    await cluster_client.set(keys[1], b"2")
    migration = redis_cluster.begin_migration(redis_cluster.key_slot(keys[0]))
    try:
        migration.move_keys([keys[0]])
        with pytest.raises(rx.ClusterError, match="TTL exhausted"):
            await cluster_client.mget(keys)  # TRYAGAIN, retried by redis-py, then given up
        pipe = cluster_client.pipeline()
        pipe.execute_command("MGET", *keys)
        (reply,) = await pipe.execute(raise_on_error=False, allow_redirections=False)
        assert isinstance(reply, (rx.TryAgainError, rx.AskError))
        assert [await cluster_client.get(k) for k in keys] == [b"1", b"2"]  # one by one: fine
    finally:
        migration.move_keys()
        migration.finish()
    assert await cluster_client.mget(keys) == [b"1", b"2"]


async def test_a_script_whose_keys_partly_exist_gets_tryagain_while_its_slot_migrates(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    """What a shared breaker's script meets when one of its keys is absent.

    Only a script with ONE key (or whose keys always exist together) is
    served through a migration: it follows ASK like any single-key command.
    """
    keys = ["p:{breaker:x}:state", "p:{breaker:x}:ring"]
    await cluster_client.delete(*keys)
    await cluster_client.set(keys[0], b"1")  # the ring does not exist yet
    script = cluster_client.register_script("return redis.call('GET', KEYS[1])")
    assert await script(keys=keys) == b"1"
    migration = redis_cluster.begin_migration(redis_cluster.key_slot(keys[0]))
    try:
        with raw(migration.source) as source, pytest.raises(rx.TryAgainError):
            source.evalsha(script.sha, 2, *keys)
        # Creating the missing key does not help: a new key of a migrating
        # slot is created on the target (ASK), so the keys stay split.
        await cluster_client.set(keys[1], b"r")
        with raw(migration.target) as target:
            assert target.execute_command("CLUSTER", "COUNTKEYSINSLOT", migration.slot) == 1
        with pytest.raises(rx.ClusterError, match="TTL exhausted"):
            await script(keys=keys)  # TRYAGAIN until the migration ends
    finally:
        migration.move_keys()
        migration.finish()
    assert await script(keys=keys) == b"1"  # after MOVED (and NOSCRIPT: reloaded)


async def test_a_script_with_one_key_follows_ask_during_a_migration(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    keys = ["p:{breaker:one}:all", "p:{breaker:one}:new"]
    await cluster_client.delete(*keys)
    await cluster_client.set(keys[0], b"1")
    script = cluster_client.register_script(
        "redis.call('INCR', KEYS[1]); return redis.call('GET', KEYS[1])"
    )
    migration = redis_cluster.begin_migration(redis_cluster.key_slot(keys[0]))
    try:
        assert await script(keys=keys[:1]) == b"2"  # not moved yet: the source serves it
        migration.move_keys()
        assert await script(keys=keys[:1]) == b"3"  # moved: ASK, the target serves it
        assert await script(keys=keys[1:]) == b"1"  # a new key: created on the target
    finally:
        migration.move_keys()
        migration.finish()


@pytest.mark.drill
async def test_a_killed_master_fails_commands_until_its_replica_takes_over(
    redis_cluster: RedisClusterServers,
    cluster_client: RedisCluster,
    record_property: Callable[[str, object], None],
) -> None:
    await cluster_client.set("failover-key", b"kept")
    replicate(redis_cluster.master_for_key("failover-key"))
    old = redis_cluster.kill_master_of("failover-key")
    killed_at = time.monotonic()
    with pytest.raises(rx.ConnectionError):
        await cluster_client.get("failover-key")
    redis_cluster.wait_for_new_master("failover-key", old, timeout=FAILOVER_BOUND)
    # For the record (JUnit property), not asserted: about 2 s with node_timeout=1000 ms.
    record_property("failover_seconds", round(time.monotonic() - killed_at, 2))
    assert await cluster_client.get("failover-key") == b"kept"  # the same client object


@pytest.mark.drill
async def test_master_for_follows_the_master_the_sentinels_promote(
    redis_sentinel: RedisSentinelServers, record_property: Callable[[str, object], None]
) -> None:
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        redis_sentinel.sentinel_addresses, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    client = sentinel.master_for(
        redis_sentinel.service, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    try:
        await client.set("sentinel-key", b"kept")
        replicate(redis_sentinel.master())
        old = redis_sentinel.kill_master()
        killed_at = time.monotonic()
        with pytest.raises(rx.ConnectionError):
            await client.get("sentinel-key")
        new = redis_sentinel.wait_for_new_master(old, timeout=FAILOVER_BOUND)
        # For the record, not asserted: about 2 s with down-after-milliseconds=500.
        record_property("failover_seconds", round(time.monotonic() - killed_at, 2))
        assert await client.get("sentinel-key") == b"kept"
        assert await sentinel.discover_master(redis_sentinel.service) == new.address
        with raw(new) as admin:
            assert admin.info("replication")["role"] == "master"
    finally:
        await client.aclose()
        for s in sentinel.sentinels:
            await s.aclose()
