"""A Redis that refuses the store's login: no login storm, calls keep flowing locally.

Every link (breaker, budget) of a store falls back to local state when Redis
fails and tries again every ``retry_interval``; after a refused login the
store does not ask again for ``AUTH_RETRY_INTERVAL`` seconds, since each try
would be another failed login that can lock the account.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import redis

from datapunk_recovery._core.events import Event
from datapunk_recovery.breaker import CircuitBreaker, StoreFallback
from datapunk_recovery.stores.redis import AUTH_RETRY_INTERVAL, RedisStore
from datapunk_recovery.testing import fake_clock
from tests.harness import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def logins(server: RedisServer) -> int:
    """Connections the server accepted so far (each is one login attempt)."""
    admin = redis.Redis(host=server.host, port=server.port, password=server.password)  # type: ignore[attr-defined]
    try:
        return int(admin.info("stats")["total_connections_received"])
    finally:
        admin.close()


async def ok() -> str:
    return "ok"


async def test_a_refused_login_is_not_tried_again_by_any_link_until_the_interval(
    locked_redis: RedisServer,
    redis_stores: Callable[..., RedisStore],
    seen: list[Event],
) -> None:
    url = f"redis://:wrong@{locked_redis.host}:{locked_redis.port}/0"
    store = redis_stores(url, retry_interval=0.0, cache_ttl=0.0)
    breakers = [CircuitBreaker(f"auth-{uuid.uuid4().hex[:8]}", store=store) for _ in range(3)]
    with fake_clock() as clock:
        before = logins(locked_redis)
        for _ in range(10):
            for breaker in breakers:
                assert await breaker.call_async(ok) == "ok"  # local state: calls flow
        await store.aclose()
        # One refused login (+1: the connection that counts them), not one per call.
        assert logins(locked_redis) - before == 2
        assert any(isinstance(e, StoreFallback) for e in seen)
        store = redis_stores(url, retry_interval=0.0, cache_ttl=0.0)
        breaker = CircuitBreaker(f"auth-{uuid.uuid4().hex[:8]}", store=store)
        before = logins(locked_redis)
        assert await breaker.call_async(ok) == "ok"
        clock.advance(AUTH_RETRY_INTERVAL / 2)
        assert await breaker.call_async(ok) == "ok"  # still not asked
        clock.advance(AUTH_RETRY_INTERVAL)
        assert await breaker.call_async(ok) == "ok"  # asked again, once
        await store.aclose()
        assert logins(locked_redis) - before == 3
