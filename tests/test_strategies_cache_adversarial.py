"""Adversarial drills on the facade's read-through caches: one dead cache, one breaker.

Reads name a ``ttl`` of their own (a jittered TTL against stampedes is common
practice) and each distinct ``ttl`` gets a read-through cache of its own; the
cache behind them is one, and so must be its breaker: a dead cache found dead
by one read is skipped by the next, whatever ``ttl`` it asks for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from datapunk_recovery.cache import MemoryCache
from datapunk_recovery.strategies import RecoveryStrategies

pytestmark = pytest.mark.anyio

CONFIG: dict[str, Any] = {
    "defaults": {
        "retry": {"max_attempts": 2, "base_delay": "1ms", "jitter": "none"},
        "breaker": {"consecutive_failures": 2, "open_duration": "30s"},
    },
}


class DeadCache(MemoryCache):
    """A cache whose server is gone: every call fails, and is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def _reach(self) -> None:
        self.calls += 1
        raise ConnectionRefusedError("cache down")

    async def get(self, key: str) -> Any:
        self._reach()

    async def get_many(self, keys: Sequence[str]) -> list[Any]:
        self._reach()
        return []

    async def set(self, key: str, value: Any, ttl: float) -> None:
        self._reach()

    async def counter(self, key: str) -> int:
        self._reach()
        return 0

    async def incr(self, key: str) -> int:
        self._reach()
        return 0


async def test_reads_with_their_own_ttl_share_the_dead_caches_open_breaker() -> None:
    recovery = RecoveryStrategies.from_config(CONFIG, environ={})
    cache = DeadCache()

    async def source(key: str) -> str:
        return key

    for i in range(10):
        answer = await recovery.with_cache_recovery(
            "k", source, cache=cache, service="profiles", ttl=60.0 + i
        )
        assert answer.origin == "source"
    assert cache.calls == 2  # two failures opened the one breaker of that cache
