"""Fault drill: Redis blackholed, reset and restarted under steady read/write load.

Readers and writers run all along; the source of truth is an in-process table
whose values carry a version.  Through every fault:

- every read returns the right value (from the cache or the source), none raises;
- no reader sees a value older than the last write that finished before its
  read began;
- after Redis is back, reads come from it again, and after a restart (an
  empty Redis) the warmed keys are there.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from datapunk_recovery._core.events import Event
from datapunk_recovery.breaker import BreakerConfig
from datapunk_recovery.cache import (
    CacheConfig,
    CacheWarmed,
    FunctionSource,
    ReadThroughCache,
    RedisCache,
    WarmKeys,
)
from tests.harness import RedisServer, ThreadedProxy

pytestmark = [pytest.mark.anyio, pytest.mark.drill, pytest.mark.timeout(20)]

KEYS = [f"item{i}" for i in range(40)]
WARM = KEYS[:10]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# The whole drill's budget (seconds), shared by its phases: a phase slowed by a
# loaded machine may use what the others left (pytest's limit is 20 s).
BUDGET = 17.0
# The Redis client's socket timeout (seconds): short enough that the blackhole
# costs timeouts, long enough that a loaded machine (the fault proxy shares
# this process's GIL) does not make a healthy Redis look dead.
REDIS_TIMEOUT = 0.5
# Each reader pauses this long (seconds) between reads: a steady load that
# leaves the proxy thread room, instead of a loop spinning on the source.
READ_PAUSE = 0.0005


async def until(
    condition: Callable[[], bool], what: str, state: Callable[[], object], deadline: float
) -> None:
    """Bounded polling (until ``deadline``, monotonic) for a condition the load makes true."""
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {state()}")
        await anyio.sleep(0.01)


async def test_redis_faults_under_load_lose_no_read_and_serve_nothing_stale(
    redis_server: RedisServer, make_proxy: Callable[[tuple[str, int]], ThreadedProxy]
) -> None:
    redis_server.flushall()
    proxy = make_proxy(redis_server.address)
    table = {k: {"key": k, "version": 0} for k in KEYS}
    finished: dict[str, int] = dict.fromkeys(KEYS, 0)  # last version whose write returned

    async def load(key: str) -> Any:
        return dict(table[key])

    cache = RedisCache.from_url(f"redis://127.0.0.1:{proxy.port}/0", timeout=REDIS_TIMEOUT)
    rtc: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(load),
        cache,
        CacheConfig(
            ttl=30.0,
            generation_refresh=0.5,
            breaker=BreakerConfig(consecutive_failures=3, open_duration=0.3),
            warm_rate=1000.0,
        ),
        name="drill",
        warming=[WarmKeys(WARM)],
    )
    events: list[Event] = []
    # Keys written since the restart began: a write may rightly invalidate a key
    # that warming refilled (even before warming reports that it finished).
    written_since_warm: set[str] = set()
    rtc.bus.subscribe(events.append)
    origins: Counter[str] = Counter()
    reads = writes = 0
    stale_reads: list[tuple[str, int, int]] = []
    stop = anyio.Event()
    rng = random.Random(3)

    async def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            key = rng.choice(WARM) if rng.random() < 0.5 else rng.choice(KEYS)
            floor = finished[key]
            answer = await rtc.lookup(key)  # must never raise
            assert answer.value is not None and answer.value["key"] == key
            if answer.value["version"] < floor:
                stale_reads.append((key, answer.value["version"], floor))
            origins[answer.origin] += 1
            reads += 1
            await anyio.sleep(READ_PAUSE)

    async def writer() -> None:
        nonlocal writes
        while not stop.is_set():
            key = rng.choice(KEYS)

            async def update(key: str = key) -> int:
                version = table[key]["version"] + 1
                table[key] = {"key": key, "version": version}
                return version

            version = await rtc.write(key, update)
            finished[key] = max(finished[key], version)
            written_since_warm.add(key)
            writes += 1
            await anyio.sleep(0.002)

    def cache_reads() -> int:
        return origins["cache"]

    def state() -> object:
        return (rtc.stats(), rtc.breaker.snapshot(), dict(origins), reads)

    deadline = time.monotonic() + BUDGET

    async def wait_for(condition: Callable[[], bool], what: str) -> None:
        await until(condition, what, state, deadline)

    faults: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(rtc.maintain)
        for _ in range(6):
            tg.start_soon(reader)
        tg.start_soon(writer)

        await wait_for(lambda: cache_reads() > 200, "reads served from Redis")

        faults.append("blackhole")
        proxy.blackhole()
        mark = reads
        await wait_for(lambda: rtc.breaker.state.value == "open", "the cache breaker to open")
        await wait_for(lambda: reads > mark + 300, "reads during the blackhole")
        proxy.blackhole(False)
        mark = cache_reads()
        await wait_for(lambda: cache_reads() > mark + 200, "reads from Redis after the blackhole")

        faults.append("reset")
        proxy.reset_all()
        mark = cache_reads()
        await wait_for(lambda: cache_reads() > mark + 200, "reads from Redis after the reset")

        faults.append("restart")
        warmed_before = sum(1 for e in events if isinstance(e, CacheWarmed))
        written_since_warm.clear()
        redis_server.restart()  # an empty Redis comes back (the loop pauses meanwhile)
        await wait_for(
            lambda: sum(1 for e in events if isinstance(e, CacheWarmed)) > warmed_before,
            "warming after the restart",
        )
        mark = cache_reads()
        await wait_for(lambda: cache_reads() > mark + 200, "reads from Redis after the restart")
        stop.set()
        tg.cancel_scope.cancel()

    direct = aioredis.Redis.from_url(redis_server.url)
    try:
        stats = rtc.stats()
        prefix = rtc._prefix
        present = [k for k in WARM if await direct.exists(prefix + k)]
        cached = {
            k: json.loads(raw)[1] for k in KEYS if (raw := await direct.get(prefix + k)) is not None
        }
    finally:
        await direct.aclose()
        await cache.close()
    behind = {k: v["version"] for k, v in cached.items() if v["version"] < finished[k]}
    print(
        f"\ncache drill: {reads} reads ({dict(origins)}), {writes} writes, faults {faults}, "
        f"cache failures {dict(stats.failures)}, stale reads {len(stale_reads)}, "
        f"warmed keys present {len(present)}/{len(WARM)}, repairs pending {stats.repairs_pending}"
    )
    assert not stale_reads  # no reader saw a value older than the last finished write
    assert set(WARM) - set(present) <= written_since_warm  # warmed after the restart
    assert not behind  # and Redis holds nothing older than the source
    assert stats.failures.get("timeout", 0) > 0 and stats.failures.get("open", 0) > 0
