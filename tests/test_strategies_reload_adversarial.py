"""Adversarial reload drills: a reload takes new figures and loses no state.

A drill author reloads the configuration in the middle of an outage and
checks that what the process learned (cached answers, counters) survives.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

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
