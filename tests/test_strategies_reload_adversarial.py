"""Adversarial reload drills: a reload takes new figures and loses no state.

A drill author reloads the configuration in the middle of an outage and
checks that what the process learned (cached answers, counters) survives.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from datapunk_recovery import CircuitOpenError
from datapunk_recovery.breaker import BreakerState
from datapunk_recovery.strategies import RecoveryStrategies
from datapunk_recovery.testing import fake_clock, instant_retries

pytestmark = pytest.mark.anyio

CONFIG: dict[str, Any] = {
    "defaults": {"retry": {"max_attempts": 2, "base_delay": "10ms", "jitter": "none"}},
    "services": {"bare": {"breaker": "none", "budget": "none"}},
    "cache": {"ttl": "1s", "stale_ttl": "1m", "max_stale_entries": 100},
}


@pytest.fixture(autouse=True)
def _instant() -> Iterator[None]:
    with instant_retries():
        yield


def with_cache(**cache: Any) -> dict[str, Any]:
    return {**CONFIG, "cache": {**CONFIG["cache"], **cache}}


async def test_a_reload_resizing_the_embedded_cache_keeps_the_answers_it_holds() -> None:
    """The source goes down, then a reload gives the cache more room: stale answers stay."""
    recovery = RecoveryStrategies.from_config(CONFIG, environ={})
    source_up = True

    async def source(key: str) -> str:
        if not source_up:
            raise ConnectionRefusedError("source down")
        return f"value of {key}"

    with fake_clock() as clock:
        assert (await recovery.with_cache_recovery("k", source, service="bare")).origin == "source"
        source_up = False
        clock.advance(5.0)  # past the ttl: only a stale answer is left
        recovery.reload(with_cache(max_stale_entries=200))
        answer = await recovery.with_cache_recovery("k", source, service="bare")
    assert answer.stale and answer.value == "value of k"


async def test_a_reload_shrinking_the_embedded_cache_keeps_the_newest_answers() -> None:
    recovery = RecoveryStrategies.from_config(CONFIG, environ={})
    source_up = True

    async def source(key: str) -> str:
        if not source_up:
            raise ConnectionRefusedError("source down")
        return f"value of {key}"

    with fake_clock() as clock:
        for i in range(3):
            await recovery.with_cache_recovery(f"k{i}", source, service="bare")
        source_up = False
        clock.advance(5.0)
        recovery.reload(with_cache(max_stale_entries=2))
        newest = await recovery.with_cache_recovery("k2", source, service="bare")
        assert newest.stale and newest.value == "value of k2"
        with pytest.raises(ConnectionRefusedError):  # the oldest made room (at most 2 kept)
            await recovery.with_cache_recovery("k0", source, service="bare")


BREAKING: dict[str, Any] = {
    "defaults": {
        "retry": {"max_attempts": 3, "base_delay": "10ms", "jitter": "none"},
        "breaker": {"consecutive_failures": 2, "open_duration": "30s"},
    },
}


def without_breaker() -> dict[str, Any]:
    return {"defaults": {**BREAKING["defaults"], "breaker": "none"}}


async def test_an_open_breaker_removed_and_restored_by_reloads_is_still_open() -> None:
    """Like a budget or a bulkhead, a breaker a reload removes comes back as it was."""
    recovery = RecoveryStrategies.from_config(BREAKING, environ={})
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError("down")

    with fake_clock():
        with pytest.raises(CircuitOpenError):  # two failures open it
            await recovery.with_network_recovery("payments", down)
        opened = recovery.breaker("payments")
        assert opened is not None and opened.state is BreakerState.OPEN
        recovery.reload(without_breaker(), environ={})
        recovery.reload(BREAKING, environ={})  # restored before its open period ended
        restored = recovery.breaker("payments")
        assert restored is not None and restored.state is BreakerState.OPEN
        calls = 0
        with pytest.raises(CircuitOpenError):
            await recovery.with_network_recovery("payments", down)
    assert calls == 0  # the dead dependency is not hit again


async def test_a_forced_open_breaker_stays_forced_through_reloads_removing_it() -> None:
    recovery = RecoveryStrategies.from_config(BREAKING, environ={})
    breaker = recovery.breaker("payments")
    assert breaker is not None
    breaker.isolate()  # an operator's decision
    recovery.reload(without_breaker(), environ={})
    recovery.reload(BREAKING, environ={})
    restored = recovery.breaker("payments")
    assert restored is not None and restored.state is BreakerState.FORCED_OPEN


ROUTED: dict[str, Any] = {
    "defaults": {
        "retry": {"max_attempts": 3, "base_delay": "10ms", "jitter": "none"},
        "breaker": {"consecutive_failures": 1, "open_duration": "30s"},
        "budget": "none",
    },
    "services": {"api": {"endpoints": ["primary", "secondary"]}},
}


async def test_an_endpoint_removed_and_restored_by_reloads_keeps_its_open_breaker() -> None:
    """An operator takes a dead endpoint out, then puts it back: it is still known dead."""
    recovery = RecoveryStrategies.from_config(ROUTED, environ={})
    hits: list[str] = []

    async def call(endpoint: Any) -> str:
        hits.append(endpoint.name)
        if endpoint.name == "primary":
            raise ConnectionRefusedError("primary down")
        return endpoint.name

    with fake_clock():
        assert await recovery.with_network_recovery("api", call) == "secondary"
        dead = recovery.breaker("api", "primary")
        assert dead is not None and dead.state is BreakerState.OPEN
        recovery.reload({**ROUTED, "services": {"api": {"endpoints": ["secondary"]}}}, environ={})
        recovery.reload(ROUTED, environ={})  # back, well within its open period
        restored = recovery.breaker("api", "primary")
        assert restored is not None and restored.state is BreakerState.OPEN
        hits.clear()
        assert await recovery.with_network_recovery("api", call) == "secondary"
    assert hits == ["secondary"]  # the dead one was not tried again


async def test_a_routed_service_dropped_and_restored_by_reloads_keeps_its_endpoints_breakers() -> (
    None
):
    recovery = RecoveryStrategies.from_config(ROUTED, environ={})

    async def call(endpoint: Any) -> str:
        if endpoint.name == "primary":
            raise ConnectionRefusedError("primary down")
        return endpoint.name

    with fake_clock():
        assert await recovery.with_network_recovery("api", call) == "secondary"
        recovery.reload({"defaults": ROUTED["defaults"]}, environ={})  # "api" on the defaults
        recovery.reload(ROUTED, environ={})  # and back
        restored = recovery.breaker("api", "primary")
        assert restored is not None and restored.state is BreakerState.OPEN
