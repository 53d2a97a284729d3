"""Driver contracts, Redis state: what the server does to shared state on its own.

The shared breaker and budget keep their state in Redis keys with a TTL
(``key_ttl``), keep forced states without one (``PERSIST``), and re-assert what
a process holds when they find the state pristine.  That design leans on four
behaviours of the server and of redis-py, each pinned here by name against a
real ``redis-server`` (no persistence, as the harness starts it):

- a key with a TTL is gone once the TTL passes, with no traffic;
- a ``PERSIST``\\ ed key never expires;
- a restart of a server without persistence comes back *empty*: keys and the
  script cache are gone;
- redis-py's ``Script`` object reloads a script the server forgot (``NOSCRIPT``)
  by itself, and a client built from a URL reconnects after a restart without
  being rebuilt (the first command may fail with ``ConnectionError``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rx

from tests.harness import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis.asyncio


async def eventually(probe: Callable[[], Awaitable[bool]], tries: int = 400) -> bool:
    """Ask ``probe`` until it says yes (bounded: ``tries`` round trips, no sleeping)."""
    for _ in range(tries):
        if await probe():
            return True
    return False


async def test_a_key_with_a_ttl_expires_without_traffic(private_redis: RedisServer) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        await client.set("{breaker:x}:state", b"1", px=30)

        async def gone() -> bool:
            return not await client.exists("{breaker:x}:state")

        assert await eventually(gone, tries=100_000)
    finally:
        await client.aclose()


async def test_a_persisted_key_has_no_ttl(private_redis: RedisServer) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        await client.set("{breaker:x}:state", b"forced", px=60_000)
        assert await client.persist("{breaker:x}:state")
        assert await client.pttl("{breaker:x}:state") == -1  # -1: exists, no expiry
    finally:
        await client.aclose()


async def test_a_restart_without_persistence_comes_back_empty(private_redis: RedisServer) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        await client.set("{budget:x}:bucket", b"4")
        sha = await client.script_load("return 1")
        private_redis.restart()

        async def answers() -> bool:
            try:
                return bool(await client.ping())
            except (rx.ConnectionError, rx.TimeoutError, OSError):
                return False  # the old connection died with the server

        assert await eventually(answers)
        assert await client.dbsize() == 0
        assert await client.script_exists(sha) == [False]
    finally:
        await client.aclose()


async def test_a_script_the_server_forgot_is_reloaded_by_redis_py(
    private_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        script: Any = client.register_script("return tonumber(ARGV[1]) + 1")
        assert await script(keys=[], args=[1]) == 2
        await client.script_flush()  # what an empty restart does to the script cache
        assert await script(keys=[], args=[41]) == 42  # NOSCRIPT handled inside redis-py
    finally:
        await client.aclose()
