"""Real-server test harness: throwaway Redis/PostgreSQL servers and a fault-injecting proxy."""

from __future__ import annotations

from .proxy import FaultProxy, ProxyEvent, ProxyStats, ThreadedProxy
from .servers import (
    APP_PASSWORD,
    APP_USER,
    PostgresServer,
    RedisClusterServers,
    RedisSentinelServers,
    RedisServer,
    ServerError,
    ServerUnavailable,
    find_free_port,
)

__all__ = [
    "APP_PASSWORD",
    "APP_USER",
    "FaultProxy",
    "PostgresServer",
    "ProxyEvent",
    "ProxyStats",
    "RedisClusterServers",
    "RedisSentinelServers",
    "RedisServer",
    "ServerError",
    "ServerUnavailable",
    "ThreadedProxy",
    "find_free_port",
]
