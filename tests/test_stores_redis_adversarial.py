"""Adversarial drills on the Redis store: one command sent is one command run.

A client the user builds (``redis.asyncio.Redis(host=..., port=...)``) retries
a command whose connection dropped, by itself, up to ten times in redis-py 6
and later.  When the drop came after Redis ran the command, the re-send runs
it again, hidden from the store: a shared breaker's batch of failures would
count twice, a probe permit would be taken twice.  These drills cut the
connection right after Redis received the command (the reply is lost) and
count how often Redis ran it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from datapunk_recovery.stores.redis import RedisStore
from tests.harness import RedisServer, ThreadedProxy

pytestmark = pytest.mark.anyio

# Counts its own runs: not idempotent, on purpose.
_COUNTING = "return redis.call('INCR', KEYS[1])"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.drill
async def test_a_command_whose_reply_was_lost_runs_once_on_a_client_the_user_built(
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy], redis_server: RedisServer
) -> None:
    proxy = make_proxy(redis_server.address)
    client = aioredis.Redis(host="127.0.0.1", port=proxy.port)  # redis-py's default retries
    store = RedisStore(client, timeout=2.0)
    key = f"adv:{uuid.uuid4().hex}"
    script = store.script(_COUNTING)
    direct = aioredis.Redis.from_url(redis_server.url)
    try:
        await direct.script_load(_COUNTING)  # EVALSHA finds it: one command per run
        proxy.cut_on_pattern(b"EVALSHA", forward=True)  # Redis runs it, the reply is lost
        with pytest.raises(redis.exceptions.ConnectionError):
            await store.run(script, [key], [])
        assert int(await direct.get(key) or 0) == 1
    finally:
        await store.aclose()
        await client.aclose()
        await direct.aclose()


@pytest.mark.drill
async def test_a_cache_incr_whose_reply_was_lost_runs_once_on_a_client_the_user_built(
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy], redis_server: RedisServer
) -> None:
    """The cache's sibling of the store's drill: a lost ``INCR`` reply bumps a generation once."""
    from datapunk_recovery.cache.redis import RedisCache

    proxy = make_proxy(redis_server.address)
    client = aioredis.Redis(host="127.0.0.1", port=proxy.port)  # redis-py's default retries
    cache = RedisCache(client)
    key = f"adv:{uuid.uuid4().hex}"
    direct = aioredis.Redis.from_url(redis_server.url)
    try:
        proxy.cut_on_pattern(b"INCR", forward=True)  # Redis runs it, the reply is lost
        with pytest.raises(redis.exceptions.ConnectionError):
            await cache.incr(key)
        assert int(await direct.get(key) or 0) == 1
    finally:
        await client.aclose()
        await direct.aclose()
