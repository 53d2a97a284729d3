"""RecoveryStrategies: the four recoveries, per-service policies, lifecycle and hot reload."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from datapunk_recovery import CircuitOpenError, subscribe
from datapunk_recovery.breaker import BreakerState
from datapunk_recovery.demo.mesh import busy_error
from datapunk_recovery.events import Event
from datapunk_recovery.schema import ConfigError
from datapunk_recovery.strategies import (
    CacheResult,
    RecoveryFallback,
    RecoveryStrategies,
    ResourceScope,
)
from datapunk_recovery.testing import fake_clock, instant_retries

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


class FlakyCache:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.down = False
        self.calls = 0

    async def get(self, key: str) -> Any:
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("cache down")
        return self.data.get(key)

    async def set(self, key: str, value: Any, ttl: float) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("cache down")
        self.data[key] = value


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
    with pytest.raises(ValueError, match="never happens"):
        recovery.calculate_backoff(3)  # max_attempts=3: two retries only


# -- network ---------------------------------------------------------------------


async def test_a_retry_goes_to_the_other_endpoint_and_an_open_primary_is_skipped() -> None:
    recovery = strategies()
    seen: list[str] = []

    async def call(endpoint: str, path: str) -> str:
        seen.append(endpoint)
        if endpoint == "primary":
            raise ConnectionResetError("primary down")
        return f"{endpoint}{path}"

    assert await recovery.with_network_recovery("api", call, "/a") == "secondary/a"
    assert await recovery.with_network_recovery("api", call, "/b") == "secondary/b"
    assert seen == ["primary", "secondary", "primary", "secondary"]
    primary = recovery.breaker("api", "primary")
    assert primary is not None and primary.state is BreakerState.OPEN

    seen.clear()
    assert await recovery.with_network_recovery("api", call, "/c") == "secondary/c"
    assert seen == ["secondary"]  # the open primary costs nothing
    assert recovery.fallbacks()[("api", "failover")] == 3


async def test_every_endpoint_open_fails_at_once() -> None:
    recovery = strategies()
    calls = 0

    async def down(endpoint: str) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError(endpoint)

    with pytest.raises(ConnectionRefusedError):
        await recovery.with_network_recovery("api", down)  # primary, secondary, primary
    with pytest.raises(CircuitOpenError, match="every endpoint"):
        await recovery.with_network_recovery("api", down)  # secondary opens too
    assert calls == 4
    with pytest.raises(CircuitOpenError, match="every endpoint"):
        await recovery.with_network_recovery("api", down)
    assert calls == 4  # nothing reached either endpoint


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

    async def hangs() -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.05) as scope:
        await recovery.with_network_recovery("bare", hangs, fallback="never used")
    assert scope.cancelled_caught
    assert recovery.fallbacks() == {}
    breaker = recovery.breaker("slow")
    assert breaker is not None and breaker.state is BreakerState.CLOSED


# -- cache -------------------------------------------------------------------------


async def test_cache_then_source_then_stale() -> None:
    recovery = strategies()
    cache = FlakyCache()
    source_up = True

    async def source(key: str) -> str:
        if not source_up:
            raise ConnectionRefusedError("source down")
        return f"value of {key}"

    first = await recovery.with_cache_recovery("k", source, cache=cache, service="bare")
    assert first == CacheResult("value of k", "source")
    assert (await recovery.with_cache_recovery("k", source, cache=cache)).origin == "cache"

    cache.down = True
    again = await recovery.with_cache_recovery("k", source, cache=cache, service="bare")
    assert again.origin == "source"

    source_up = False
    stale = await recovery.with_cache_recovery("k", source, cache=cache, service="bare")
    assert stale.stale and stale.value == "value of k"
    with pytest.raises(ConnectionRefusedError):
        await recovery.with_cache_recovery("never-read", source, cache=cache, service="bare")
    kinds = {kind for (_, kind) in recovery.fallbacks()}
    assert kinds == {"source", "stale"}


async def test_a_dead_cache_is_skipped_by_its_breaker() -> None:
    recovery = strategies()
    cache = FlakyCache()
    cache.down = True

    async def source(key: str) -> str:
        return key

    for _ in range(5):
        await recovery.with_cache_recovery("k", source, cache=cache, service="bare")
    assert cache.calls == 2  # two failures opened the cache's breaker


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

    result = await recovery.with_resource_recovery(
        operation, pool="gpu", units=2, service="slow"
    )
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
    assert carried is not None and carried is not budget
    assert carried.config.max_tokens == 20
    assert budget.tokens - 1 < carried.tokens <= budget.tokens


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
