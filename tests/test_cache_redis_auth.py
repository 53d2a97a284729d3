"""A Redis that refuses the cache's login: the source answers, and no login storm.

The cache's breaker would probe a dead cache every second; a refused login
is different (each probe is another failed login, which can lock the
account), so the cache does not ask again for ``AUTH_RETRY_INTERVAL``.
"""

from __future__ import annotations

import pytest
import redis

from datapunk_recovery.cache import FunctionSource, ReadThroughCache, RedisCache
from datapunk_recovery.cache.recovering import AUTH_RETRY_INTERVAL
from datapunk_recovery.testing import fake_clock
from tests.harness import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis.asyncio


def logins(server: RedisServer) -> int:
    """Connections the server accepted so far (each one a login attempt)."""
    password = server.password  # type: ignore[attr-defined]  # set by the fixture
    admin = redis.Redis(host=server.host, port=server.port, password=password)
    try:
        return int(admin.info("stats")["total_connections_received"])
    finally:
        admin.close()


async def test_a_cache_that_refuses_our_login_is_asked_once_per_interval(
    locked_redis: RedisServer,
) -> None:
    async def load(key: str) -> str:
        return f"source {key}"

    cache = RedisCache.from_url(f"redis://:wrong@{locked_redis.host}:{locked_redis.port}/0")
    reader: ReadThroughCache[str] = ReadThroughCache(FunctionSource(load), cache, name="auth")
    try:
        with fake_clock() as clock:
            before = logins(locked_redis)
            for second in range(30):  # far past the breaker's 1 s probe interval
                assert await reader.get(f"k{second}") == f"source k{second}"
                clock.advance(1.0)
            assert logins(locked_redis) - before == 2  # one refused login, +1 counting
            assert reader.stats().failures.get("auth") == 1
            clock.advance(AUTH_RETRY_INTERVAL)
            assert (await reader.lookup("again")).origin == "source"
            assert logins(locked_redis) - before == 4  # asked again once, +1 counting
    finally:
        await cache.client.aclose()
