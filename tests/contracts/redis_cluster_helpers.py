"""What the Redis Cluster contract tests share: clients on the cluster and its nodes, a bound."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from tests.harness import RedisClusterServers

#: How long a drill waits for a failover before failing (seconds); it takes about 2 s.
FAILOVER_BOUND = 15.0


async def cluster_client_of(redis_cluster: RedisClusterServers) -> AsyncIterator[RedisCluster]:
    """A cluster client on the test cluster (short timeouts), closed after the test."""
    client = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes],
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
    )
    yield client
    await client.aclose()


def raw(node: object) -> redis.Redis:
    """A plain client on one node of the cluster (a master or a replica), for admin commands."""
    host, port = node.address  # type: ignore[attr-defined]
    return redis.Redis(host=host, port=port, socket_timeout=2.0)
