"""Shared state in Redis is namespaced, least-privileged, and never trusted.

Promises of ``SECURITY.md`` checked against the real server:

- the store works with a Redis ACL user that may touch only its key prefix,
  and a store pointed at keys it may not touch degrades to local state (the
  call still runs) instead of failing;
- whatever another client plants in the keys (a pickle, a wrong type, garbage
  numbers, an "open for a year" state) is rejected with an event, never
  executed, unpickled or obeyed.

Redis is reached through redis.asyncio: asyncio only.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from datapunk_recovery._core.errors import CircuitOpenError
from datapunk_recovery._core.events import Event
from datapunk_recovery.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    CorruptStateIgnored,
    StoreFallback,
)
from datapunk_recovery.stores.redis import RedisStore
from tests.harness import RedisServer

PASSWORD = "acl-test-password"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def name() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def tenant(redis_server: RedisServer) -> Iterator[tuple[str, str]]:
    """A Redis ACL user allowed only the keys ``<prefix>:*``; yields (prefix, url)."""
    prefix = f"tenant-{uuid.uuid4().hex[:8]}"
    user = f"u-{prefix}"
    redis_server.command(
        "ACL", "SETUSER", user, "reset", "on", f">{PASSWORD}", f"~{prefix}:*", "+@all",
        "-@dangerous", "-@admin",
    )  # fmt: skip
    host, port = redis_server.address
    yield prefix, f"redis://{user}:{PASSWORD}@{host}:{port}/0"
    redis_server.command("ACL", "DELUSER", user)


@pytest.fixture
def stores(redis_stores: Callable[..., RedisStore]) -> Callable[..., RedisStore]:
    """Make stores with no local read cache unless told (``cache_ttl=0``)."""

    def make(url: str, **settings: Any) -> RedisStore:
        settings.setdefault("cache_ttl", 0.0)
        return redis_stores(url, **settings)

    return make


async def aok() -> str:
    return "ok"


async def aboom() -> str:
    raise ConnectionResetError("dependency down")


async def trip(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises((ConnectionResetError, CircuitOpenError)):
            await breaker.call_async(aboom)
    await breaker.flush_async()


# -- least privilege ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_shared_breakers_work_for_a_user_limited_to_its_prefix(
    tenant: tuple[str, str], stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    prefix, url = tenant
    config = BreakerConfig(consecutive_failures=3, open_duration=60.0)
    here = CircuitBreaker(name, config, store=stores(url, prefix=prefix))
    there = CircuitBreaker(name, config, store=stores(url, prefix=prefix))  # another replica
    await trip(here, 3)
    with pytest.raises(CircuitOpenError):
        await there.call_async(aok)
    assert there.state is BreakerState.OPEN
    assert not [e for e in seen if isinstance(e, StoreFallback | CorruptStateIgnored)]


@pytest.mark.anyio
async def test_the_acl_really_confines_the_user(tenant: tuple[str, str]) -> None:
    prefix, url = tenant
    client = aioredis.Redis.from_url(url)
    try:
        await client.set(f"{prefix}:mine", "1")
        with pytest.raises(NoPermissionError, match="no permissions"):
            await client.set("someone-else:key", "1")
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_keys_outside_the_users_prefix_fall_back_to_local_state(
    tenant: tuple[str, str], stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    _, url = tenant
    store = stores(url, prefix="not-mine", retry_interval=60.0)
    breaker = CircuitBreaker(name, BreakerConfig(consecutive_failures=2), store=store)
    assert await breaker.call_async(aok) == "ok"  # refused by Redis, never by the breaker
    assert any(isinstance(e, StoreFallback) for e in seen)
    await trip(breaker, 2)  # judged locally meanwhile
    assert breaker.state is BreakerState.OPEN


# -- hostile values --------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _state_key(prefix: str, name: str) -> str:
    return f"{prefix}:{{breaker:{name}}}:state"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "plant",
    [
        pytest.param({"s": "PICKLE"}, id="pickle-in-a-field"),
        pytest.param("PICKLE", id="pickle-as-the-whole-value"),
        pytest.param({"s": "banana", "g": "1"}, id="garbage-state"),
        pytest.param({"s": "1", "g": "nan", "ou": "inf"}, id="not-finite"),
        pytest.param({"s": "1", "g": "-7", "ou": "-1e999"}, id="negative"),
        pytest.param({"s": "9", "g": "1"}, id="unknown-state-code"),
        pytest.param({"s": "\x00" * 4096, "g": "1e400"}, id="binary-junk"),
    ],
)
async def test_a_hostile_value_is_rejected_with_an_event_never_trusted(
    redis_server: RedisServer,
    stores: Callable[..., RedisStore],
    name: str,
    seen: list[Event],
    tmp_path: Path,
    plant: dict[str, str] | str,
) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Exploit(marker))
    store = stores(redis_server.url, retry_interval=0.0)
    breaker = CircuitBreaker(name, BreakerConfig(consecutive_failures=3), store=store)
    assert await breaker.call_async(aok) == "ok"
    key = _state_key(store.prefix, name)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.delete(key)
        if isinstance(plant, str):
            await client.set(key, payload)
        else:
            fields = {k: (payload if v == "PICKLE" else v) for k, v in plant.items()}
            await client.hset(key, mapping=fields)  # type: ignore[arg-type]
    finally:
        await client.aclose()

    assert await breaker.call_async(aok) == "ok"  # the call runs
    assert breaker.state is BreakerState.CLOSED  # a planted state is not obeyed
    assert any(isinstance(e, CorruptStateIgnored | StoreFallback) for e in seen)
    assert not marker.exists()  # nothing was unpickled
    for event in seen:  # and no event repeats what was planted
        assert "\x00" not in repr(event)
        assert "banana" not in repr(event)


@pytest.mark.anyio
async def test_an_open_for_a_year_state_is_not_obeyed(
    redis_server: RedisServer, stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    config = BreakerConfig(consecutive_failures=3, max_open_duration=60.0)
    store = stores(redis_server.url, retry_interval=0.0)
    breaker = CircuitBreaker(name, config, store=store)
    assert await breaker.call_async(aok) == "ok"
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        seconds, _ = await client.time()
        year = seconds + 365 * 24 * 3600
        await client.hset(
            _state_key(store.prefix, name), mapping={"s": "1", "ou": str(year), "hu": "0"}
        )
    finally:
        await client.aclose()
    refused: CircuitOpenError | None = None
    try:
        await breaker.call_async(aok)
    except CircuitOpenError as exc:
        refused = exc
    # If refused at all, never for longer than the breaker may ever stay open.
    assert refused is None or refused.remaining <= config.max_open_duration
    assert breaker.retry_after() <= config.max_open_duration


def test_the_store_source_never_unpickles() -> None:
    import datapunk_recovery.stores.redis as module

    source = Path(module.__file__).read_text()
    assert "pickle" not in source.replace("Nothing is pickled", "")
    assert "eval(" not in source.replace("_eval(", "").replace("evalsha", "")
    assert os.path.basename(module.__file__) == "redis.py"


async def _plant(redis_server: RedisServer, key: str, fields: dict[str, str]) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.hset(key, mapping=fields)  # type: ignore[arg-type]
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_an_open_period_beyond_the_limits_is_shortened_and_reported(
    redis_server: RedisServer, stores: Callable[..., RedisStore], name: str, seen: list[Event]
) -> None:
    # 50 days: short enough to pass the reply's own sanity bound, far beyond the config's.
    config = BreakerConfig(consecutive_failures=3, max_open_duration=60.0)
    store = stores(redis_server.url, retry_interval=0.0, timeout=5.0)
    breaker = CircuitBreaker(name, config, store=store)
    assert await breaker.call_async(aok) == "ok"
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        seconds, _ = await client.time()
    finally:
        await client.aclose()
    later = str(seconds + 50 * 24 * 3600)
    await _plant(redis_server, _state_key(store.prefix, name), {"s": "1", "ou": later})
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call_async(aok)
    assert info.value.remaining <= config.max_open_duration
    assert any(isinstance(e, CorruptStateIgnored) for e in seen)
    assert not any(isinstance(e, StoreFallback) for e in seen)  # repaired, still shared


@pytest.mark.anyio
@pytest.mark.parametrize(
    "plant",
    [
        pytest.param({"g": "1e300"}, id="huge-generation"),
        pytest.param({"c": "1e300"}, id="huge-count"),
        pytest.param({"wh": "inf"}, id="infinite-window-head"),
        pytest.param({"wh": "1e15"}, id="window-head-in-the-future"),
    ],
)
async def test_a_hostile_number_is_repaired_not_a_permanent_outage(
    redis_server: RedisServer,
    stores: Callable[..., RedisStore],
    name: str,
    seen: list[Event],
    plant: dict[str, str],
) -> None:
    config = BreakerConfig(
        consecutive_failures=3, failure_rate_threshold=0.5, window="time", minimum_calls=2
    )
    store = stores(redis_server.url, retry_interval=0.0, timeout=5.0)
    breaker = CircuitBreaker(name, config, store=store)
    assert await breaker.call_async(aok) == "ok"
    await _plant(redis_server, _state_key(store.prefix, name), plant)
    for _ in range(3):
        assert await breaker.call_async(aok) == "ok"
    await breaker.flush_async()
    assert any(isinstance(e, CorruptStateIgnored) for e in seen)
    assert not any(isinstance(e, StoreFallback) for e in seen)  # the state was reset, shared
    assert breaker.snapshot().calls >= 1  # the repaired window counts again
    for _ in range(3):  # and sharing works: failures open the breaker
        with pytest.raises((ConnectionResetError, CircuitOpenError)):
            await breaker.call_async(aboom)
    await breaker.flush_async()
    assert breaker.state is BreakerState.OPEN
