"""Driver contracts, Redis: what redis-py does against a refusing or blackholed server.

The library never retries a refused login and relies on redis-py not doing so
either, and on a blackholed server failing one command within the socket
timeout.  Both hold for clients built from a URL (``Redis.from_url``: what
``RedisCache.from_url`` and ``RedisStore(url)`` build), whose connections
carry no retry of their own.  A client built as ``Redis(host=..., port=...)``
does retry (three times, with a backoff of seconds, a refused login included):
pass such a client to the library with ``retry=Retry(NoBackoff(), 0)``.
A command cancelled while it waits for its reply closes its connection (the
reason ``RedisStore`` never lets a caller's cancellation reach a command).
Each behaviour is pinned by name against a real ``redis-server``.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions as rx

from datapunk_recovery._core.errors import ErrorCategory, classify
from datapunk_recovery.cache import RedisCache
from tests.harness import RedisServer, ThreadedProxy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis.asyncio


def locked_redis_password(server: RedisServer) -> str:
    password: str = server.password  # type: ignore[attr-defined]  # set by the fixture
    return password


def connections(server: RedisServer) -> int:
    admin = redis.Redis(host=server.host, port=server.port, password=locked_redis_password(server))
    try:
        return int(admin.info("stats")["total_connections_received"])
    finally:
        admin.close()


def assert_auth(exc: BaseException) -> None:
    verdict = classify(exc)
    assert (verdict.category, verdict.retryable) == (ErrorCategory.AUTH, False), exc


async def test_a_wrong_password_raises_authentication_error_after_one_login(
    locked_redis: RedisServer,
) -> None:
    before = connections(locked_redis)
    client = aioredis.Redis.from_url(f"redis://:wrong@{locked_redis.host}:{locked_redis.port}/0")
    try:
        with pytest.raises(rx.AuthenticationError) as caught:
            await client.get("k")
    finally:
        await client.aclose()
    # redis-py's own retry does not re-send a refused login (1 = that login;
    # +1 for the admin connection counting them).
    assert connections(locked_redis) - before == 2
    assert isinstance(caught.value, rx.ConnectionError)  # a subclass: rules must look first
    assert "wrong" not in str(caught.value)
    assert_auth(caught.value)


async def test_no_password_raises_authentication_error(locked_redis: RedisServer) -> None:
    client = aioredis.Redis.from_url(f"redis://{locked_redis.host}:{locked_redis.port}/0")
    try:
        with pytest.raises(rx.AuthenticationError) as caught:
            await client.get("k")
    finally:
        await client.aclose()
    assert_auth(caught.value)


async def test_a_command_the_acl_forbids_raises_no_permission_error(
    locked_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(
        f"redis://reader:reader-pw@{locked_redis.host}:{locked_redis.port}/0"
    )
    try:
        assert await client.get("k") is None
        with pytest.raises(rx.NoPermissionError, match="no permissions") as caught:
            await client.set("k", "v")
        with pytest.raises(rx.AuthenticationWrongNumberOfArgsError) as wrong_auth:
            await client.execute_command("AUTH")
    finally:
        await client.aclose()
    assert_auth(caught.value)
    assert_auth(wrong_auth.value)


async def test_the_cache_on_a_refusing_redis_raises_the_auth_error_unretried(
    locked_redis: RedisServer,
) -> None:
    cache = RedisCache.from_url(f"redis://:wrong@{locked_redis.host}:{locked_redis.port}/0")
    before = connections(locked_redis)
    try:
        with pytest.raises(rx.AuthenticationError) as caught:
            await cache.get("k")
    finally:
        await cache.client.aclose()
    assert connections(locked_redis) - before == 2  # one login, plus the counting one
    assert_auth(caught.value)
    assert "wrong" not in repr(cache)


async def test_a_blackholed_redis_fails_one_command_with_redis_timeout_error(
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy], redis_server: RedisServer
) -> None:
    proxy = make_proxy(redis_server.address)
    client = aioredis.Redis.from_url(
        f"redis://{proxy.host}:{proxy.port}/0", socket_timeout=0.1, socket_connect_timeout=0.1
    )
    try:
        await client.ping()
        proxy.blackhole()
        with pytest.raises(rx.TimeoutError) as caught:
            await client.get("x")
    finally:
        await client.aclose()
    # redis-py's TimeoutError is its own, not the builtin one...
    assert not isinstance(caught.value, builtins.TimeoutError)
    # ...and the command was sent once, not re-sent by redis-py's own retry.
    assert proxy.stats.blackholed_bytes == len(b"*2\r\n$3\r\nGET\r\n$1\r\nx\r\n")


async def test_a_command_cancelled_while_awaiting_its_reply_closes_its_connection(
    redis_server: RedisServer,
) -> None:
    """redis-py drops the connection rather than leave a late reply for the next command."""
    client = aioredis.Redis.from_url(redis_server.url_for(0), single_connection_client=True)
    admin = aioredis.Redis.from_url(redis_server.url_for(0))

    async def eventually(probe: Callable[[list[dict[str, str]]], bool], what: str) -> None:
        for _ in range(500):  # bounded: round trips to the server, no sleeping
            if probe(await admin.client_list()):
                return
        pytest.fail(f"the server never showed {what}")

    try:
        first = str(await client.client_id())
        task = asyncio.create_task(client.blpop(["contract:cancel:never"], timeout=30))
        await eventually(
            lambda clients: any(c["id"] == first and c["cmd"] == "blpop" for c in clients),
            "the command blocked, awaiting its reply",
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(
            lambda clients: all(c["id"] != first for c in clients), "the connection closed"
        )
        assert str(await client.client_id()) != first  # the next command gets a new connection
    finally:
        await client.aclose()
        await admin.aclose()
