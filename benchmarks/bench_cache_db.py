"""What the cache and database recoveries cost, against real servers on loopback.

Cases (time per read or query):

- ``cache-outage``: a read while Redis is blackholed,
  ``read_breaker_open`` through :class:`ReadThroughCache` whose breaker is
  open (the read goes straight to the source) against ``read_waits_timeout``,
  a naive read-through that tries Redis, waits for its timeout (50 ms here),
  then reads the source.
- ``cache-happy``: a cache hit when nothing fails: ``redis_get_json`` is a
  plain ``redis.asyncio`` ``GET`` plus ``json.loads``; ``read_through_hit``
  is :meth:`ReadThroughCache.get` on the same Redis (breaker permit, envelope,
  freshness check).
- ``cache-cpu``: the same two on a cache that answers at once (no network):
  the difference is the wrapper's own CPU cost per read; and a hit on the
  embedded ``MemoryCache`` (``read_through_memory_hit``) beside a dict lookup
  in a coroutine (``dict_get``).
- ``db-happy``: a one-value query when nothing fails: ``asyncpg_acquire_fetch``
  is ``async with pool.acquire(): fetchval`` on an ``asyncpg`` pool;
  ``managed_run`` the same through :meth:`ManagedPool.run` (bounded acquire,
  retry engine, clean return).

Servers: ``DATAPUNK_BENCH_REDIS_URL`` and ``DATAPUNK_BENCH_PG_DSN`` if set,
else the test harness starts a private redis-server and PostgreSQL (the
workers inherit their addresses).

Run: ``python benchmarks/bench_cache_db.py --fast -o cache_db.json`` then
``python benchmarks/report.py cache_db.json``.  ``--only cache-cpu`` runs the
cases whose name contains that text (no server is started when none of them
needs one).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyperf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datapunk_recovery.breaker import BreakerConfig
from datapunk_recovery.cache import (
    CacheConfig,
    FunctionSource,
    MemoryCache,
    ReadThroughCache,
    RedisCache,
)
from datapunk_recovery.database import ManagedPool, PoolConfig

REDIS_ENV = "DATAPUNK_BENCH_REDIS_URL"
PG_ENV = "DATAPUNK_BENCH_PG_DSN"
PROXY_ENV = "DATAPUNK_BENCH_BLACKHOLE_PORT"
TIMEOUT = 0.05  # the naive read's Redis timeout, seconds

_loop = asyncio.new_event_loop()


def _async_loop(
    make: Callable[[], Awaitable[Callable[[], Awaitable[Any]]]],
) -> Callable[[int], float]:
    """A pyperf time function running ``await op()`` ``loops`` times on one event loop."""
    state: dict[str, Any] = {}

    def run(loops: int) -> float:
        async def body() -> float:
            if "op" not in state:
                state["op"] = await make()
            op = state["op"]
            t0 = time.perf_counter()
            for _ in range(loops):
                await op()
            return time.perf_counter() - t0

        return _loop.run_until_complete(body())

    return run


async def _source(key: str) -> Any:
    return {"key": key, "n": 1}


def _blackholed_url() -> str:
    return f"redis://127.0.0.1:{os.environ[PROXY_ENV]}/0"


async def make_breaker_open() -> Callable[[], Awaitable[Any]]:
    cache = RedisCache.from_url(_blackholed_url(), timeout=TIMEOUT)
    rtc: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(_source),
        cache,
        CacheConfig(
            breaker=BreakerConfig(
                consecutive_failures=1, open_duration=3600.0, max_open_duration=3600.0
            )
        ),
    )
    await rtc.get("warm")  # the first read times out and opens the breaker
    return lambda: rtc.get("k1")


async def make_waits_timeout() -> Callable[[], Awaitable[Any]]:
    cache = RedisCache.from_url(_blackholed_url(), timeout=TIMEOUT)

    async def naive() -> Any:
        try:
            found = await cache.get("k1")
        except Exception:
            found = None
        return found if found is not None else await _source("k1")

    return naive


async def make_redis_plain() -> Callable[[], Awaitable[Any]]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(os.environ[REDIS_ENV])
    await client.set("plain:k1", json.dumps({"key": "k1", "n": 1}))

    async def get() -> Any:
        return json.loads(await client.get("plain:k1"))

    return get


async def make_read_through() -> Callable[[], Awaitable[Any]]:
    cache = RedisCache.from_url(os.environ[REDIS_ENV])
    rtc: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(_source), cache, CacheConfig(ttl=3600.0, generation_refresh=3600.0)
    )
    await rtc.get("k1")  # fills the cache
    return lambda: rtc.get("k1")


class _InstantRedis:
    """A cache answering at once with stored JSON: what is left is the wrapper's own cost."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.codec = RedisCache(None).codec

    async def get(self, key: str) -> Any:
        raw = self.data.get(key)
        return None if raw is None else self.codec.decode(raw)

    async def set(self, key: str, value: Any, ttl: float) -> None:
        self.data[key] = self.codec.encode(value)

    async def counter(self, key: str) -> int:
        return 0


async def make_instant_plain() -> Callable[[], Awaitable[Any]]:
    stub = _InstantRedis()
    await stub.set("k1", {"key": "k1", "n": 1}, 60.0)
    return lambda: stub.get("k1")


async def make_instant_read_through() -> Callable[[], Awaitable[Any]]:
    stub = _InstantRedis()
    rtc: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(_source), stub, CacheConfig(ttl=3600.0, generation_refresh=3600.0)
    )  # type: ignore[arg-type]
    await rtc.get("k1")
    return lambda: rtc.get("k1")


async def make_dict_get() -> Callable[[], Awaitable[Any]]:
    data = {"k1": {"key": "k1", "n": 1}}

    async def get() -> Any:
        return data.get("k1")

    return get


async def make_memory_read_through() -> Callable[[], Awaitable[Any]]:
    rtc: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(_source), MemoryCache(), CacheConfig(ttl=3600.0, generation_refresh=3600.0)
    )
    await rtc.get("k1")
    return lambda: rtc.get("k1")


async def _asyncpg_pool() -> Any:
    import asyncpg

    return await asyncpg.create_pool(os.environ[PG_ENV], min_size=1, max_size=1)


async def make_asyncpg_plain() -> Callable[[], Awaitable[Any]]:
    pool = await _asyncpg_pool()

    async def query() -> Any:
        async with pool.acquire() as conn:
            return await conn.fetchval("SELECT $1::int", 1)

    return query


async def make_managed_run() -> Callable[[], Awaitable[Any]]:
    managed = ManagedPool(await _asyncpg_pool(), PoolConfig(ping_after_idle=None))

    async def fetch(conn: Any) -> Any:
        return await conn.fetchval("SELECT $1::int", 1)

    return lambda: managed.run(fetch)


def _start_servers() -> list[Any]:
    """Start what the environment does not provide; the workers inherit the addresses."""
    from tests.harness import PostgresServer, RedisServer, ThreadedProxy

    started: list[Any] = []
    if REDIS_ENV not in os.environ:
        redis_server = RedisServer()
        redis_server.start()
        started.append(redis_server)
        os.environ[REDIS_ENV] = redis_server.url
    if PG_ENV not in os.environ:
        pg = PostgresServer()
        pg.start()
        started.append(pg)
        os.environ[PG_ENV] = pg.dsn
    host, port = os.environ[REDIS_ENV].split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    proxy = ThreadedProxy((host.rsplit("@", 1)[-1], int(port))).start()
    proxy.blackhole()
    started.append(proxy)
    os.environ[PROXY_ENV] = str(proxy.port)
    return started


def main() -> None:
    worker = "--worker" in sys.argv
    runner = pyperf.Runner(add_cmdline_args=lambda cmd, args: cmd.extend(["--only", args.only]))
    runner.argparser.add_argument("--only", default="", help="cases whose name contains this")
    only = runner.parse_args().only
    cases = [
        ("cache-outage: read_breaker_open", make_breaker_open),
        ("cache-outage: read_waits_timeout", make_waits_timeout),
        ("cache-happy: redis_get_json", make_redis_plain),
        ("cache-happy: read_through_hit", make_read_through),
        ("cache-cpu: instant_cache_get", make_instant_plain),
        ("cache-cpu: read_through_instant_hit", make_instant_read_through),
        ("cache-cpu: dict_get", make_dict_get),
        ("cache-cpu: read_through_memory_hit", make_memory_read_through),
        ("db-happy: asyncpg_acquire_fetch", make_asyncpg_plain),
        ("db-happy: managed_run", make_managed_run),
    ]
    cases = [(name, make) for name, make in cases if only in name]
    servers = any(not name.startswith("cache-cpu") for name, _ in cases)
    started = _start_servers() if servers and not worker else []
    if servers and not worker:
        runner.args.inherit_environ = [
            *(runner.args.inherit_environ or []),
            REDIS_ENV,
            PG_ENV,
            PROXY_ENV,
        ]
    try:
        for name, make in cases:
            runner.bench_time_func(name, _async_loop(make))
    finally:
        for item in reversed(started):
            item.stop() if hasattr(item, "blackhole") else item.close()


if __name__ == "__main__":
    main()
