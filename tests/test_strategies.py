"""RecoveryStrategies: the four recoveries, per-service policies, lifecycle and hot reload."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import redis.asyncio as redis
from hypothesis import given, settings
from hypothesis import strategies as st

from datapunk_recovery import (
    CircuitOpenError,
    ErrorCategory,
    Jitter,
    RetryConfig,
    RetryPolicy,
    retry,
    subscribe,
)
from datapunk_recovery._core.clock import FakeClock, use_clock
from datapunk_recovery._core.events import Event
from datapunk_recovery._execution import runtime as _runtime
from datapunk_recovery.breaker import BreakerState
from datapunk_recovery.budget import RatioBudget
from datapunk_recovery.cache import MemoryCache
from datapunk_recovery.config.schema import ConfigError
from datapunk_recovery.database import DatabaseUnavailable, ManagedPool, TransactionRolledBack
from datapunk_recovery.demo.mesh import busy_error
from datapunk_recovery.network import AllEndpointsDown, Endpoint
from datapunk_recovery.strategies import (
    CacheResult,
    RecoveryFallback,
    RecoveryStrategies,
    ResourceScope,
    _facade,
    _reload,
)
from datapunk_recovery.testing import fake_clock, instant_retries
from tests.harness import APP_PASSWORD, PostgresServer, RedisServer, ThreadedProxy

pytestmark = pytest.mark.anyio

CONFIG: dict[str, Any] = {
    "defaults": {
        "retry": {"max_attempts": 3, "base_delay": "10ms", "jitter": "none"},
        "breaker": {"consecutive_failures": 2, "open_duration": "30s"},
    },
    "services": {
        "api": {"endpoints": ["primary", "secondary"]},
        "slow": {"retry": {"max_attempts": 5}},
        "bare": {"breaker": "none", "budget": "none"},
    },
}


@pytest.fixture(autouse=True)
def _instant() -> Iterator[None]:
    with instant_retries():
        yield


def strategies(extra: dict[str, Any] | None = None) -> RecoveryStrategies:
    return RecoveryStrategies.from_config({**CONFIG, **(extra or {})}, environ={})


# -- policies --------------------------------------------------------------------


async def test_services_inherit_the_defaults_and_override_only_what_differs() -> None:
    recovery = strategies()
    assert recovery.policy("slow").retry.max_attempts == 5
    assert recovery.policy("slow").retry.base_delay == 0.01  # inherited
    assert recovery.policy("unknown-service") is recovery.config.defaults
    assert recovery.breaker("bare") is None and recovery.budget("bare") is None
    assert recovery.breaker("api", "primary") is not None


async def test_calculate_backoff_gives_the_policy_numbers() -> None:
    recovery = strategies()
    assert recovery.calculate_backoff(1) == pytest.approx(0.01)
    assert recovery.calculate_backoff(2, "slow") == pytest.approx(0.02)
    # Any retry count has a delay, whatever max_attempts allows (the seed's face).
    assert recovery.calculate_backoff(0) == 0.0
    assert recovery.calculate_backoff(3) == pytest.approx(0.04)
    assert recovery.calculate_backoff(10**6) == recovery.config.defaults.retry.max_delay
    with pytest.raises(ValueError, match=">= 0"):
        recovery.calculate_backoff(-1)
    with pytest.raises(TypeError, match="int"):
        recovery.calculate_backoff(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("jitter", list(Jitter))
def test_calculate_backoff_answers_a_huge_retry_number_of_any_jitter_kind(jitter: Jitter) -> None:
    config = RetryConfig(max_attempts=2, base_delay=0.5, max_delay=4.0, jitter=jitter)
    recovery = RecoveryStrategies(config)
    delay = recovery.calculate_backoff(10**12, rng=random.Random(7))
    assert 0.0 <= delay <= 4.0
    assert delay == recovery.calculate_backoff(10**12, rng=random.Random(7))  # reproducible


async def test_a_bare_retry_config_becomes_every_services_retry_policy() -> None:
    config = RetryConfig(max_attempts=4, base_delay=0.01, max_delay=0.1, jitter=Jitter.NONE)
    recovery = RecoveryStrategies(config)
    assert recovery.policy("orders").retry is config
    assert recovery.config.defaults.retry is config
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert await recovery.with_network_recovery("orders", flaky) == "ok"
    assert calls == 4
    assert recovery.calculate_backoff(2, "orders") == pytest.approx(0.02)
    policy = RetryPolicy(config, {ErrorCategory.RATE_LIMITED: RetryConfig(max_attempts=2)})
    both = RecoveryStrategies.from_config(policy)
    assert both.policy("x").categories[ErrorCategory.RATE_LIMITED].max_attempts == 2
    with pytest.raises(TypeError, match="RetryConfig"):
        RecoveryStrategies(3)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(
    base=st.floats(0.0, 5.0),
    spread=st.floats(0.0, 60.0),
    factor=st.floats(1.0, 10.0),
    attempts=st.integers(1, 5),
    n=st.integers(0, 2000),
)
def test_calculate_backoff_answers_any_retry_capped_and_never_decreasing(
    base: float, spread: float, factor: float, attempts: int, n: int
) -> None:
    config = RetryConfig(
        max_attempts=attempts,
        base_delay=base,
        max_delay=base + spread,
        exponential_base=factor,
        jitter=Jitter.NONE,
    )
    recovery = RecoveryStrategies(config)
    delay = recovery.calculate_backoff(n)
    assert 0.0 <= delay <= config.max_delay
    assert recovery.calculate_backoff(n + 1) >= delay
    assert (delay == 0.0) if n == 0 else (delay == config.envelope(n))


@settings(max_examples=60, deadline=None)
@given(jitter=st.sampled_from(list(Jitter)), seed=st.integers(0, 2**32), retries=st.integers(1, 6))
def test_calculate_backoff_is_the_delay_the_engine_waits(
    jitter: Jitter, seed: int, retries: int
) -> None:
    config = RetryConfig(max_attempts=retries + 1, base_delay=0.05, max_delay=2.0, jitter=jitter)
    recovery = RecoveryStrategies(config)

    def fail() -> None:
        raise ConnectionResetError("reset")

    fake = FakeClock()
    use_clock(fake)
    instant = _runtime.set_instant(False)  # the fake clock records the waits
    try:
        with pytest.raises(ConnectionResetError):
            retry(config, rng=random.Random(seed))(fail)()
    finally:
        _runtime.set_instant(instant)
        use_clock(None)
    assert len(fake.slept) <= retries
    if jitter is Jitter.NONE:
        assert fake.slept == [recovery.calculate_backoff(n) for n in range(1, retries + 1)]
    elif config.stateful:
        # The n-th delay of a call is the n-th draw of the sequence, as calculate_backoff says.
        assert fake.slept[-1] == recovery.calculate_backoff(retries, rng=random.Random(seed))
    else:
        first = recovery.calculate_backoff(1, rng=random.Random(seed))
        assert fake.slept[0] == first
        assert all(
            0.0 <= wait <= config.envelope(n) * (1 + config.jitter_factor)
            for n, wait in enumerate(fake.slept, start=1)
        )


# -- network ---------------------------------------------------------------------


async def test_calls_fail_over_by_priority_and_an_open_primary_is_skipped() -> None:
    recovery = strategies()
    seen: list[str] = []

    async def call(endpoint: Endpoint, path: str) -> str:
        seen.append(endpoint.name)
        if endpoint.name == "primary":
            raise ConnectionResetError("primary down")
        return f"{endpoint.name}{path}"

    # A call that failed on every endpoint of priority 0 falls through to the
    # secondary (priority 1) within the call; the second failure opens the primary.
    assert await recovery.with_network_recovery("api", call, "/a") == "secondary/a"
    assert await recovery.with_network_recovery("api", call, "/a") == "secondary/a"
    assert seen == ["primary", "secondary"] * 2
    primary = recovery.breaker("api", "primary")
    assert primary is not None and primary.state is BreakerState.OPEN

    seen.clear()
    assert await recovery.with_network_recovery("api", call, "/b") == "secondary/b"
    assert seen == ["secondary"]  # the open primary costs nothing
    assert recovery.fallbacks()[("api", "failover")] == 3
    assert recovery.breaker("api") is None and recovery.breaker("api", "nowhere") is None


async def test_endpoints_of_one_priority_share_the_load_and_a_retry_goes_elsewhere() -> None:
    recovery = strategies(
        {
            "services": {
                "pair": {
                    "endpoints": ["a", "b"],
                    "priorities": {"b": 0},
                    "addresses": {"a": "http://10.0.0.1", "b": "http://10.0.0.2"},
                }
            }
        }
    )
    seen: list[str] = []

    async def call(endpoint: Endpoint) -> str:
        seen.append(endpoint.address)
        if len(seen) == 1:
            raise ConnectionResetError("first attempt fails")
        return endpoint.name

    answer = await recovery.with_network_recovery("pair", call)
    assert len(set(seen)) == 2 and answer in ("a", "b")  # the retry went to the other one
    assert recovery.fallbacks() == {}  # same priority: not a failover


async def test_every_endpoint_open_fails_at_once() -> None:
    recovery = strategies()
    calls = 0

    async def down(endpoint: Endpoint) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError(endpoint.name)

    with pytest.raises(ConnectionRefusedError):
        await recovery.with_network_recovery("api", down)  # primary twice (open), secondary
    with pytest.raises(AllEndpointsDown, match="every endpoint"):
        await recovery.with_network_recovery("api", down)  # the secondary opens too
    assert calls == 4
    with pytest.raises(AllEndpointsDown, match="every endpoint"):
        await recovery.with_network_recovery("api", down)
    assert calls == 4  # nothing reached either endpoint


async def test_a_slow_endpoint_is_hedged_when_the_service_says_so() -> None:
    recovery = strategies(
        {
            "services": {
                "search": {
                    "endpoints": ["a", "b"],
                    "priorities": {"b": 0},
                    "hedge": {"delay": "10ms"},
                }
            }
        }
    )
    started: list[str] = []

    async def call(endpoint: Endpoint) -> str:
        started.append(endpoint.name)
        if len(started) == 1:
            await anyio.sleep_forever()  # the first one hangs: the hedge answers
        return endpoint.name

    answer = await recovery.with_network_recovery("search", call)
    assert len(started) == 2 and answer == started[1] != started[0]


async def test_fallback_answers_when_everything_failed() -> None:
    recovery = strategies()
    events: list[Event] = []
    unsubscribe = subscribe(events.append)

    async def broken() -> str:
        raise ConnectionError("down")

    try:
        assert await recovery.with_network_recovery("bare", broken, fallback="cached") == "cached"
        answer = await recovery.with_network_recovery(
            "bare", broken, fallback=lambda exc: type(exc).__name__
        )
    finally:
        unsubscribe()
    assert answer == "ConnectionError"
    assert [e.kind for e in events if isinstance(e, RecoveryFallback)] == ["fallback"] * 2


async def test_a_bug_is_not_retried() -> None:
    recovery = strategies()
    calls = 0

    async def bug() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await recovery.with_network_recovery("slow", bug)
    assert calls == 1


async def test_cancellation_passes_through_untouched() -> None:
    recovery = strategies()

    async def hangs(*args: object) -> None:
        await anyio.sleep_forever()

    for service in ("bare", "api"):
        with anyio.move_on_after(0.05) as scope:
            await recovery.with_network_recovery(service, hangs, fallback="never used")
        assert scope.cancelled_caught
    assert recovery.fallbacks() == {}
    primary = recovery.breaker("api", "primary")
    assert primary is not None and primary.state is BreakerState.CLOSED
    router = recovery.router("api")
    assert router is not None and router.statistics().calls == 0


async def test_fallback_counts_stay_bounded_whatever_service_names_callers_send(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_facade, "MAX_UNNAMED_SERVICES", 4)
    calls, reads = strategies(), strategies()

    async def broken(*args: object) -> str:
        raise ConnectionError("down")

    async def stale(key: str) -> str:
        raise ConnectionRefusedError("down")

    async def good(key: str) -> str:
        return key

    for i in range(20):
        await calls.with_network_recovery(f"caller-{i}", broken, fallback="spare")
    with fake_clock() as clock:
        for i in range(20):
            await reads.with_cache_recovery("k", good, service=f"reader-{i}")
        clock.advance(120.0)  # past the ttl: the next reads are stale
        for i in range(20):
            assert (await reads.with_cache_recovery("k", stale, service=f"reader-{i}")).stale
    for recovery in (calls, reads):
        # Four names of their own, then one, "other", for the rest.
        assert len(recovery.fallbacks()) == 5
        assert sum(recovery.fallbacks().values()) == 20


async def test_cancellation_passes_through_every_other_recovery_counted_nowhere() -> None:
    recovery = strategies({"pools": {"gpu": {"capacity": 1, "max_wait": 0.1}}})
    entered = anyio.Event()
    undone: list[str] = []

    async def hangs(*args: object) -> None:
        entered.set()
        await anyio.sleep_forever()

    async def holds_and_hangs(scope: ResourceScope) -> None:
        scope.compensations.add(undone.append, "undone")
        await hangs()

    async def cancelled(call: Callable[[], Awaitable[object]]) -> None:
        nonlocal entered
        entered = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await entered.wait()
            tg.cancel_scope.cancel()

    async with recovery:
        await cancelled(lambda: recovery.with_cache_recovery("k", hangs, service="slow"))
        await cancelled(lambda: recovery.with_network_recovery("slow", hangs, fallback="no"))
        await cancelled(lambda: recovery.with_database_recovery(hangs, service="slow"))
        await cancelled(
            lambda: recovery.with_resource_recovery(holds_and_hangs, pool="gpu", service="slow")
        )
    assert recovery.fallbacks() == {}
    assert recovery.pool("gpu").in_use == 0
    assert undone == ["undone"]  # the cancelled attempt's partial work was undone
    breaker = recovery.breaker("slow")
    assert breaker is not None
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.consecutive_failures) == (BreakerState.CLOSED, 0)
    budget = recovery.budget("slow")
    assert budget is not None and budget.tokens == budget.config.max_tokens
    stats = recovery.cache_stats("slow")
    assert stats is not None and dict(stats.failures) == {} and stats.stale_served == 0


# -- cache -------------------------------------------------------------------------


class FlakyCache(MemoryCache):
    """The embedded cache, with a switch that makes every call fail, and a call count."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    def _reach(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("cache down")

    async def get(self, key: str) -> Any:
        self._reach()
        return await super().get(key)

    async def get_many(self, keys: Sequence[str]) -> list[Any]:
        self._reach()
        return await super().get_many(keys)

    async def set(self, key: str, value: Any, ttl: float) -> None:
        self._reach()
        await super().set(key, value, ttl)

    async def delete(self, keys: Sequence[str]) -> None:
        self._reach()
        await super().delete(keys)

    async def incr(self, key: str) -> int:
        self._reach()
        return await super().incr(key)

    async def counter(self, key: str) -> int:
        self._reach()
        return await super().counter(key)


async def test_cache_then_source_then_stale() -> None:
    recovery = strategies({"cache": {"ttl": "1s", "stale_ttl": "1m"}})
    cache = FlakyCache()
    source_up = True

    async def source(key: str) -> str:
        if not source_up:
            raise ConnectionRefusedError("source down")
        return f"value of {key}"

    def read(key: str) -> Awaitable[CacheResult[str]]:
        return recovery.with_cache_recovery(key, source, cache=cache, service="bare")

    with fake_clock() as clock:
        assert await read("k") == CacheResult("value of k", "source")
        assert (await read("k")).origin == "cache"

        cache.down = True
        assert (await read("k")).origin == "source"  # counted as a fallback

        cache.down = False
        source_up = False
        clock.advance(31.0)  # past the ttl, and past the cache breaker's 30 s
        stale = await read("k")
        assert stale.stale and stale.value == "value of k"
        with pytest.raises(ConnectionRefusedError):
            await read("never-read")
    assert recovery.fallbacks() == {("bare", "source"): 1, ("bare", "stale"): 1}


async def test_a_dead_cache_is_skipped_by_its_breaker() -> None:
    recovery = strategies()
    cache = FlakyCache()
    cache.down = True

    async def source(key: str) -> str:
        return key

    for _ in range(5):
        await recovery.with_cache_recovery("k", source, cache=cache, service="bare")
    assert cache.calls == 2  # two failures opened the cache's breaker

    recovery.reload({**CONFIG, "cache": {"ttl": "5s"}}, environ={})
    await recovery.with_cache_recovery("k", source, cache=cache, service="bare")
    assert cache.calls == 2  # a new read-through cache, the same open breaker


async def test_concurrent_misses_of_a_key_make_one_source_load() -> None:
    recovery = strategies()
    loads = 0
    release = anyio.Event()

    async def slow_source(key: str) -> str:
        nonlocal loads
        loads += 1
        await release.wait()
        return key.upper()

    answers: list[CacheResult[str]] = []

    async def read() -> None:
        answers.append(await recovery.with_cache_recovery("k", slow_source, service="bare"))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert loads == 1
    assert [a.value for a in answers] == ["K"] * 10


async def test_stale_values_expire() -> None:
    recovery = strategies({"cache": {"ttl": "1s", "stale_ttl": "1s"}})

    async def source(key: str) -> str:
        raise ConnectionRefusedError("down")

    async def good(key: str) -> str:
        return "v"

    with fake_clock() as clock:
        await recovery.with_cache_recovery("k", good, service="bare")
        clock.advance(1.5)
        assert (await recovery.with_cache_recovery("k", source, service="bare")).stale
        clock.advance(1.0)
        with pytest.raises(ConnectionRefusedError):
            await recovery.with_cache_recovery("k", source, service="bare")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio
async def test_the_redis_cache_of_the_configuration_is_opened_and_closed(
    redis_server: RedisServer,
) -> None:
    async def source(key: str) -> str:
        return f"value of {key}"

    recovery = strategies({"cache": {"redis": redis_server.url, "namespace": "strategies-test"}})
    with pytest.raises(RuntimeError, match="opens when the object is entered"):
        await recovery.with_cache_recovery("k", source, service="bare")
    async with recovery:
        assert (await recovery.with_cache_recovery("k", source, service="bare")).origin == "source"
        assert (await recovery.with_cache_recovery("k", source, service="bare")).origin == "cache"
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = [k async for k in client.scan_iter(match="strategies-test.bare:*")]
        assert any(k.endswith(b":k") for k in keys)
        await client.delete(*keys)
    finally:
        await client.aclose()
    with pytest.raises(ConfigError, match=r"cache\.redis"):
        recovery.reload({**CONFIG, "cache": {"redis": "redis://elsewhere:6379/0"}}, environ={})


# -- database ----------------------------------------------------------------------


async def test_a_busy_sqlite_transaction_is_replayed(tmp_path: Path) -> None:
    path = str(tmp_path / "orders.db")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
    config = {**CONFIG, "databases": {"orders": {"sqlite": path}}}
    attempts = 0

    def write(conn: sqlite3.Connection) -> int:
        nonlocal attempts
        attempts += 1
        conn.execute("INSERT INTO orders (item) VALUES ('book')")
        if attempts == 1:
            raise busy_error()
        return attempts

    async with RecoveryStrategies.from_config(config, environ={}) as recovery:
        assert await recovery.with_database_recovery(write, database="orders") == 2
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1,)


async def test_sqlite_transactions_replay_with_the_policy_of_the_service_in_force(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "orders.db")
    config = {**CONFIG, "databases": {"orders": {"sqlite": path}}}
    attempts = 0

    def always_busy(conn: sqlite3.Connection) -> None:
        nonlocal attempts
        attempts += 1
        raise busy_error()

    async def replays(service: str | None = None) -> int:
        nonlocal attempts
        attempts = 0
        with pytest.raises(sqlite3.OperationalError):
            await recovery.with_database_recovery(always_busy, database="orders", service=service)
        return attempts

    async with RecoveryStrategies.from_config(config, environ={}) as recovery:
        assert await replays() == 3  # the defaults: "orders" is not configured
        assert await replays("slow") == 5  # the service named, not the database's
        services = {**CONFIG["services"], "orders": {"retry": {"max_attempts": 2}}}
        recovery.reload({**config, "services": services}, environ={})
        assert await replays() == 2  # the reload reaches SQLite transactions too


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg
async def test_a_postgres_database_opens_from_config_runs_a_transaction_and_closes(
    postgres_server: PostgresServer,
) -> None:
    config = {**CONFIG, "databases": {"ledger": {"postgres": postgres_server.app_dsn}}}
    attempts = 0

    async def write(conn: Any) -> int:
        nonlocal attempts
        attempts += 1
        await conn.execute("CREATE TABLE IF NOT EXISTS strategies_ledger (amount int)")
        await conn.execute("INSERT INTO strategies_ledger VALUES (7)")
        if attempts == 1:  # the connection drops mid-transaction: replayed whole
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return int(await conn.fetchval("SELECT sum(amount) FROM strategies_ledger"))

    async with RecoveryStrategies.from_config(config, environ={}) as recovery:
        database = recovery.database("ledger")
        assert isinstance(database, ManagedPool) and database.driver == "asyncpg"
        assert await recovery.with_database_recovery(write, database="ledger") == 7
        assert attempts == 2
        assert APP_PASSWORD not in repr(database) + repr(recovery.config.databases)
    assert database.raw.is_closing()
    with pytest.raises(KeyError, match="no open database"):
        recovery.database("ledger")
    conn = await asyncpg.connect(postgres_server.app_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM strategies_ledger") == 1
        await conn.execute("DROP TABLE strategies_ledger")
    finally:
        await conn.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg
async def test_a_close_cancelled_midway_still_closes_the_rest(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = {"postgres": postgres_server.app_dsn, "max_size": 1}
    config = {**CONFIG, "databases": {"one": table, "two": table}}
    recovery = RecoveryStrategies.from_config(config, environ={})
    await recovery.open()
    one, two = recovery.database("one"), recovery.database("two")
    assert isinstance(one, ManagedPool) and isinstance(two, ManagedPool)
    real_close = ManagedPool.close
    closing = asyncio.Event()

    async def close(pool: ManagedPool) -> None:
        if pool is one:  # hangs until cancelled
            closing.set()
            await asyncio.Event().wait()
        await real_close(pool)

    monkeypatch.setattr(ManagedPool, "close", close)
    task = asyncio.create_task(recovery.close())
    await closing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert two.raw.is_closing()  # closed although the close was cancelled before it
    await real_close(one)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg
async def test_a_failed_open_raises_its_own_error_even_when_closing_fails(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Creating "two" fails (pools connect lazily, so make the creation itself
    # fail): the open fails after "one" was created.
    nowhere = postgres_server.app_dsn.replace(f":{postgres_server.port}/", ":1/")
    config = {
        **CONFIG,
        "databases": {"one": {"postgres": postgres_server.app_dsn}, "two": {"postgres": nowhere}},
    }
    real_close = ManagedPool.close
    real_create = ManagedPool.create_asyncpg
    closed: list[ManagedPool] = []

    async def create(dsn: str, *args: Any, **kwargs: Any) -> ManagedPool:
        if dsn == nowhere:
            raise OSError("cannot create a pool")
        return await real_create(dsn, *args, **kwargs)

    monkeypatch.setattr(ManagedPool, "create_asyncpg", create)

    async def close(pool: ManagedPool) -> None:
        await real_close(pool)
        closed.append(pool)
        raise OSError("close failed")

    monkeypatch.setattr(ManagedPool, "close", close)
    recovery = RecoveryStrategies.from_config(config, environ={})
    with pytest.raises(OSError) as caught:
        await recovery.open()
    assert not isinstance(caught.value, ExceptionGroup)  # the open's error, not the close's
    assert "close failed" in "".join(getattr(caught.value, "__notes__", []))
    assert len(closed) == 1 and closed[0].raw.is_closing()
    assert APP_PASSWORD not in str(caught.value)


async def test_an_unknown_database_is_named() -> None:
    async with strategies() as recovery:
        with pytest.raises(KeyError, match="no open database 'ledger'"):
            await recovery.with_database_recovery(lambda conn: None, database="ledger")


# -- resources ---------------------------------------------------------------------


async def test_compensations_run_and_units_come_back() -> None:
    recovery = strategies({"pools": {"gpu": {"capacity": 2, "max_wait": 0.1}}})
    undone: list[int] = []
    attempts = 0

    async def operation(scope: ResourceScope) -> str:
        nonlocal attempts
        attempts += 1
        assert scope.lease is not None and scope.lease.units == 2
        scope.compensations.add(undone.append, attempts)
        if attempts == 1:
            raise ConnectionResetError("worker lost")
        return "done"

    result = await recovery.with_resource_recovery(operation, pool="gpu", units=2, service="slow")
    assert result == "done"
    assert undone == [1]  # the failed attempt was undone, the good one kept
    assert recovery.pool("gpu").in_use == 0


# -- reload ------------------------------------------------------------------------


async def test_reload_keeps_breaker_state_and_takes_new_thresholds() -> None:
    recovery = strategies()

    async def down() -> None:
        raise ConnectionRefusedError("down")

    with pytest.raises(CircuitOpenError):  # two failures open it; the third attempt is refused
        await recovery.with_network_recovery("slow", down)
    breaker = recovery.breaker("slow")
    assert breaker is not None and breaker.state is BreakerState.OPEN

    new = {**CONFIG, "defaults": {**CONFIG["defaults"], "breaker": {"open_duration": "5s"}}}
    recovery.reload(new, environ={})

    assert recovery.breaker("slow") is breaker
    assert breaker.state is BreakerState.OPEN
    assert breaker.config.open_duration == 5.0


async def test_reload_carries_the_budget_fill_over() -> None:
    recovery = strategies()
    budget = recovery.budget("slow")
    assert budget is not None
    for _ in range(3):
        budget.on_attempt(False)
    new = {**CONFIG, "defaults": {**CONFIG["defaults"], "budget": {"max_tokens": 20}}}
    recovery.reload(new, environ={})
    carried = recovery.budget("slow")
    assert carried is budget  # the same bucket, re-configured: its tokens are kept
    assert carried.config.max_tokens == 20
    assert carried.tokens == 7.0


async def test_reload_keeps_a_ratio_budgets_window() -> None:
    ratio = {"kind": "ratio", "ratio": 0.0, "min_per_second": 1.0, "window": "10s"}
    config = {**CONFIG, "defaults": {**CONFIG["defaults"], "budget": ratio}}
    with fake_clock():
        recovery = RecoveryStrategies.from_config(config, environ={})
        budget = recovery.budget("slow")
        assert isinstance(budget, RatioBudget)
        for _ in range(10):
            assert budget.allow_retry()
        assert not budget.allow_retry()
        faster = {**ratio, "min_per_second": 2.0}
        new = {**CONFIG, "defaults": {**CONFIG["defaults"], "budget": faster}}
        recovery.reload(new, environ={})
        carried = recovery.budget("slow")
        assert carried is budget  # reconfigured in place: the 10 retries still count
        assert carried.config.min_per_second == 2.0
        granted = 0
        while carried.allow_retry():
            granted += 1
        assert granted == 10


async def test_a_bad_reload_is_rejected_whole_and_the_old_config_keeps_running() -> None:
    recovery = strategies()
    before = recovery.config
    bad = {
        "defaults": {"retry": {"max_attempts": 0}},
        "services": {"api": {"retry": {"base_delay": "soon"}}},
    }
    with pytest.raises(ConfigError) as caught:
        recovery.reload(bad, environ={})
    paths = {p.path for p in caught.value.problems}
    assert paths == {"defaults.retry.max_attempts", "services.api.retry.base_delay"}
    assert recovery.config is before
    assert recovery.policy("slow").retry.max_attempts == 5


# -- reload keeps every live limit (issue 14, item 1) -------------------------------
#
# What a reload guarantees for a limit: the count of calls (units) admitted
# before it goes on counting after it, so the concurrency in force never
# exceeds the largest limit configured while those calls ran.  When a limit
# shrinks below what is held, nothing new is admitted until what is held
# drops below the new limit.


def _limited(limit: int | None) -> dict[str, Any]:
    service: dict[str, Any] = {
        "retry": {"max_attempts": 1},
        "breaker": "none",
        "budget": "none",
    }
    if limit is not None:
        service["bulkhead"] = {"max_concurrent": limit, "max_queue": 1000, "max_wait": 60}
    return {"services": {"db": service}}


class Load:
    """Calls that hold their slot until released one by one; counts what runs at once."""

    def __init__(self, recovery: RecoveryStrategies) -> None:
        self.recovery = recovery
        self.running = 0
        self.peak = 0
        self.holding: list[anyio.Event] = []
        self.done = 0

    async def call(self) -> None:
        async def work() -> None:
            self.running += 1
            self.peak = max(self.peak, self.running)
            gate = anyio.Event()
            self.holding.append(gate)
            try:
                await gate.wait()
            finally:
                self.running -= 1

        await self.recovery.with_network_recovery("db", work)
        self.done += 1

    def release_one(self) -> None:
        self.holding.pop(0).set()

    def release_all(self) -> None:
        while self.holding:
            self.release_one()


async def _settle() -> None:
    # Let every runnable task run until it blocks (bounded: no sleeping).
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


async def test_reloading_a_bulkhead_never_exceeds_the_largest_limit_in_force() -> None:
    recovery = RecoveryStrategies.from_config(_limited(5), environ={})
    load = Load(recovery)
    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(load.call)
        await _settle()
        assert load.running == 5
        recovery.reload(_limited(6), environ={})  # a larger limit admits a waiter at once
        await _settle()
        assert load.running == 6
        for i in range(40):  # steady load, alternating limits
            recovery.reload(_limited(5 if i % 2 == 0 else 6), environ={})
            tg.start_soon(load.call)
            tg.start_soon(load.call)
            await _settle()
            load.release_one()
            await _settle()
            assert load.running <= 6
        load.release_all()
        while load.done < 8 + 80:
            await _settle()
            load.release_all()
    assert load.peak == 6  # the largest limit in force, never 5 + 6


async def test_a_shrunk_bulkhead_admits_nothing_until_use_drops_below_the_new_limit() -> None:
    recovery = RecoveryStrategies.from_config(_limited(6), environ={})
    load = Load(recovery)
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(load.call)
        await _settle()
        assert load.running == 6
        recovery.reload(_limited(3), environ={})
        for expected in (5, 4, 3, 3):  # released, and no one admitted until below 3
            load.release_one()
            await _settle()
            assert load.running == expected
        bulkhead = recovery._service("db").bulkhead
        assert bulkhead is not None and bulkhead.state().limit == 3
        load.release_all()
        while load.done < 10:
            await _settle()
            load.release_all()
    assert load.peak == 6


async def test_a_bulkhead_removed_and_restored_by_reloads_still_counts_its_holders() -> None:
    recovery = RecoveryStrategies.from_config(_limited(4), environ={})
    load = Load(recovery)
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(load.call)
        await _settle()
        recovery.reload(_limited(None), environ={})  # no limit for a while
        recovery.reload(_limited(4), environ={})  # back: the 4 holders still count
        for _ in range(3):
            tg.start_soon(load.call)
        await _settle()
        assert load.running == 4
        load.release_all()
        while load.done < 7:
            await _settle()
            load.release_all()
    assert load.peak == 4


async def test_a_named_service_dropped_from_the_configuration_keeps_its_bulkhead_count() -> None:
    both = _limited(3)
    both["defaults"] = {"bulkhead": {"max_concurrent": 3, "max_queue": 100, "max_wait": 60}}
    recovery = RecoveryStrategies.from_config(both, environ={})
    load = Load(recovery)
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(load.call)
        await _settle()
        recovery.reload({"defaults": both["defaults"]}, environ={})  # "db" now runs on defaults
        for _ in range(3):
            tg.start_soon(load.call)
        await _settle()
        assert load.running == 3
        load.release_all()
        while load.done < 6:
            await _settle()
            load.release_all()
    assert load.peak == 3


async def test_reload_never_refills_a_budget() -> None:
    recovery = strategies()
    budget = recovery.budget("slow")
    assert budget is not None
    for _ in range(6):
        budget.on_attempt(False)  # 4 of 10 tokens left: retries refused
    assert not budget.allow_retry()
    for max_tokens in (20, 10, 5, 10):
        new = {**CONFIG, "defaults": {**CONFIG["defaults"], "budget": {"max_tokens": max_tokens}}}
        recovery.reload(new, environ={})
        assert recovery.budget("slow") is budget  # the same bucket, new thresholds
        assert budget.config.max_tokens == max_tokens
        assert budget.tokens <= 4.0
        assert budget.allow_retry() is (max_tokens == 5)  # 4 > 2.5: the new threshold
    no_budget = {**CONFIG, "defaults": {**CONFIG["defaults"], "budget": "none"}}
    recovery.reload(no_budget, environ={})
    assert recovery.budget("slow") is None
    recovery.reload(CONFIG, environ={})  # back: the drained bucket, not a full one
    assert recovery.budget("slow") is budget
    assert budget.tokens <= 4.0


async def test_reloading_a_pool_never_exceeds_the_largest_capacity_in_force() -> None:
    def pools(capacity: int) -> dict[str, Any]:
        return {"pools": {"gpu": {"capacity": capacity, "max_wait": 60}}}

    recovery = strategies(pools(2))
    pool = recovery.pool("gpu")
    holding = running = peak = 0
    gates: list[anyio.Event] = []

    async def use() -> None:
        nonlocal running, peak
        async with recovery.pool("gpu").acquire(1):
            running += 1
            peak = max(peak, running)
            gate = anyio.Event()
            gates.append(gate)
            await gate.wait()
            running -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(use)
        await _settle()
        assert running == 2
        for capacity in (3, 2, 3, 1, 3):
            recovery.reload(_reload._resolve({**CONFIG, **pools(capacity)}, {}))
            await _settle()
            assert recovery.pool("gpu") is pool
            assert running <= 3
        holding = running
        while gates:
            gates.pop(0).set()
            await _settle()
    assert holding == 3
    assert peak == 3


async def test_a_pool_removed_and_restored_by_reloads_still_counts_its_leases() -> None:
    with_pool = {**CONFIG, "pools": {"gpu": {"capacity": 1, "max_wait": 0.01}}}
    recovery = RecoveryStrategies.from_config(with_pool, environ={})
    pool = recovery.pool("gpu")
    async with pool.acquire(1):
        recovery.reload(CONFIG, environ={})
        with pytest.raises(KeyError):
            recovery.pool("gpu")
        recovery.reload(with_pool, environ={})
        assert recovery.pool("gpu") is pool
        assert pool.in_use == 1  # the lease from before still holds the only unit
    assert pool.in_use == 0


async def test_a_hung_endpoint_losing_its_hedges_trips_its_breaker_through_the_facade() -> None:
    recovery = strategies(
        {
            "services": {
                "search": {
                    "endpoints": ["hung", "good"],
                    "priorities": {"good": 0},
                    "hedge": {"delay": "20ms"},
                    "retry": {"max_attempts": 1},
                    "breaker": {
                        "consecutive_failures": 5,
                        "slow_call_rate_threshold": 0.5,
                        "slow_call_duration": "1s",
                        "minimum_calls": 2,
                        "keep_window": True,
                    },
                }
            }
        }
    )

    async def call(endpoint: Endpoint) -> str:
        if endpoint.name == "hung":
            await anyio.sleep_forever()
        return endpoint.name

    hung = recovery.breaker("search", "hung")
    assert hung is not None
    for _ in range(20):  # the hung endpoint gets about half the first attempts
        assert await recovery.with_network_recovery("search", call) == "good"
        if hung.state is BreakerState.OPEN:
            break
    assert hung.state is BreakerState.OPEN
    assert hung.snapshot().failures == 0


# -- acknowledged only once committed; entering never needs the dependencies up --------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg
async def test_database_recovery_does_not_acknowledge_a_transaction_postgres_rolled_back(
    postgres_server: PostgresServer,
) -> None:
    config = {**CONFIG, "databases": {"ledger": {"postgres": postgres_server.app_dsn}}}
    calls = 0

    async def swallow(conn: Any) -> str:
        nonlocal calls
        calls += 1
        await conn.execute("CREATE TEMP TABLE IF NOT EXISTS once (id int primary key)")
        await conn.execute("INSERT INTO once VALUES (1)")
        try:  # noqa: SIM105 - the application carries on, as in the wild
            await conn.execute("INSERT INTO once VALUES (1)")
        except asyncpg.UniqueViolationError:
            pass
        return "acknowledged"

    async with RecoveryStrategies.from_config(config, environ={}) as recovery:
        with pytest.raises(TransactionRolledBack) as caught:
            await recovery.with_database_recovery(swallow, database="ledger")
    assert calls == 1 and caught.value.code == "23505"


async def test_database_recovery_does_not_acknowledge_a_transaction_sqlite_rolled_back(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "rolled.db")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE u (id INTEGER PRIMARY KEY)")
        conn.execute("INSERT INTO u VALUES (1)")
    config = {**CONFIG, "databases": {"orders": {"sqlite": path}}}

    def swallow(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO u VALUES (2)")
        try:  # noqa: SIM105 - the application carries on, as in the wild
            conn.execute("INSERT OR ROLLBACK INTO u VALUES (1)")
        except sqlite3.IntegrityError:
            pass
        return "acknowledged"

    async with RecoveryStrategies.from_config(config, environ={}) as recovery:
        with pytest.raises(TransactionRolledBack):
            await recovery.with_database_recovery(swallow, database="orders")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM u").fetchone()[0] == 1


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg, redis.asyncio
async def test_entering_the_facade_needs_no_dependency_up_and_first_use_names_it(
    postgres_server: PostgresServer,
) -> None:
    port = closed_port()
    dsn = postgres_server.app_dsn.replace(f":{postgres_server.port}/", f":{port}/")
    config = {
        **CONFIG,
        "databases": {"ledger": {"postgres": dsn}},
        "cache": {"redis": f"redis://:{APP_PASSWORD}@127.0.0.1:{port}/0"},
    }
    async with RecoveryStrategies.from_config(config, environ={}) as recovery:  # no connection
        pool = recovery.database("ledger")
        assert isinstance(pool, ManagedPool) and pool.snapshot().size == 0

        async def source(key: str) -> str:
            return "from source"

        # The cache is down: the source answers (the cache's failure is not the caller's).
        assert (await recovery.with_cache_recovery("k", source, service="bare")).value == (
            "from source"
        )
        with pytest.raises(DatabaseUnavailable) as caught:
            await recovery.with_database_recovery(
                lambda conn: conn.fetchval("SELECT 1"), database="ledger"
            )
    message = str(caught.value)
    assert "ledger" in message and f"127.0.0.1:{port}" in message
    assert APP_PASSWORD not in message
    assert caught.value.retryable  # a connection failure: the retry layers could cure it


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg
async def test_a_database_down_at_entry_is_used_once_it_comes_up(
    postgres_server: PostgresServer, make_proxy: Callable[[tuple[str, int]], ThreadedProxy]
) -> None:
    proxy = make_proxy(("127.0.0.1", closed_port()))  # upstream refused: the database is down
    dsn = postgres_server.app_dsn.replace(f":{postgres_server.port}/", f":{proxy.port}/")
    config = {**CONFIG, "databases": {"ledger": {"postgres": dsn}}}
    async with RecoveryStrategies.from_config(config, environ={}) as recovery:
        with pytest.raises(DatabaseUnavailable, match="ledger"):
            await recovery.with_database_recovery(
                lambda conn: conn.fetchval("SELECT 1"), database="ledger", service="bare"
            )
        proxy.target = postgres_server.address  # the database is back
        assert (
            await recovery.with_database_recovery(
                lambda conn: conn.fetchval("SELECT 41 + 1"), database="ledger", service="bare"
            )
            == 42
        )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg
async def test_entering_opens_no_connection_even_when_the_database_is_up(
    postgres_server: PostgresServer,
) -> None:
    config = {**CONFIG, "databases": {"ledger": {"postgres": postgres_server.app_dsn}}}
    async with RecoveryStrategies.from_config(config, environ={}) as recovery:
        pool = recovery.database("ledger")
        assert isinstance(pool, ManagedPool) and pool.snapshot().size == 0
        assert (
            await recovery.with_database_recovery(
                lambda conn: conn.fetchval("SELECT 1"), database="ledger"
            )
            == 1
        )
        assert pool.snapshot().size == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg
async def test_a_wrong_database_password_fails_the_first_use_after_one_login(
    postgres_server: PostgresServer, make_proxy: Callable[[tuple[str, int]], ThreadedProxy]
) -> None:
    proxy = make_proxy(postgres_server.address)
    wrong = postgres_server.dsn_for(
        postgres_server.app_user, "wrong-secret", postgres_server.app_database, port=proxy.port
    )
    config = {**CONFIG, "databases": {"ledger": {"postgres": wrong}}}
    async with RecoveryStrategies.from_config(config, environ={}) as recovery:
        with pytest.raises(DatabaseUnavailable) as caught:
            await recovery.with_database_recovery(
                lambda conn: conn.fetchval("SELECT 1"), database="ledger", service="slow"
            )
    assert proxy.stats.connections_opened == 1  # "slow" allows 5 attempts: one login made
    assert caught.value.category is ErrorCategory.AUTH and not caught.value.retryable
    assert "ledger" in str(caught.value) and "wrong-secret" not in str(caught.value)


async def test_a_service_may_keep_the_strict_fallthrough_rule() -> None:
    recovery = RecoveryStrategies.from_config(
        {
            "services": {
                "api": {
                    "endpoints": ["primary", "secondary"],
                    "fallthrough": "breaker",
                    "retry": {"max_attempts": 2, "base_delay": 0.0},
                }
            }
        },
        environ={},
    )
    router = recovery.router("api")
    assert router is not None and router.config.fallthrough == "breaker"
    seen: list[str] = []

    async def call(endpoint: Endpoint) -> str:
        seen.append(endpoint.name)
        if endpoint.name == "primary":
            raise ConnectionResetError("primary down")
        return endpoint.name

    with pytest.raises(ConnectionResetError):
        await recovery.with_network_recovery("api", call)
    assert seen == ["primary", "primary"]  # the secondary waits for the primary's breaker
