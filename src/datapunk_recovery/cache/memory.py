"""The embedded default cache: in this process, bounded by entry count, least recently used out.

Nothing can fail here except memory, so it needs no breaker; it exists so
that the read-through recovery works without any server, and so that tests
can drive it under a fake clock (expiry follows
[`datapunk_recovery._core.clock.now()`][datapunk_recovery._core.clock.now]).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final

from datapunk_recovery._core import clock
from datapunk_recovery._core.validate import check_count

__all__ = ["MemoryCache"]

_NEVER: Final = float("inf")


class MemoryCache:
    """A bounded LRU cache with per-entry TTL; holds at most ``max_entries`` values.

    Counters ([`incr()`][datapunk_recovery.cache.memory.MemoryCache.incr]) live beside the values
    and are never evicted.
    """

    __slots__ = ("_counters", "_entries", "_lookup", "_touch", "max_entries")

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = check_count("MemoryCache", "max_entries", max_entries)
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._counters: dict[str, int] = {}
        # Bound once: a method looked up on an OrderedDict per read is not
        # specialised by the interpreter (a generic lookup, twice per hit).
        self._lookup = self._entries.get
        self._touch = self._entries.move_to_end

    def __len__(self) -> int:
        return len(self._entries)

    def get_nowait(self, key: str) -> Any | None:
        """The live value of ``key`` or ``None``, without a coroutine (nothing here waits).

        [`ReadThroughCache`][datapunk_recovery.cache.recovering.ReadThroughCache]
        reads a `MemoryCache` through it: an await of a coroutine that
        never suspends costs a cache hit more than the lookup itself.
        """
        found = self._lookup(key)
        if found is None:
            return None
        expires, value = found
        if expires <= clock.now():
            del self._entries[key]
            return None
        self._touch(key)
        return value

    async def get(self, key: str) -> Any | None:
        """The live value of ``key`` or ``None``."""
        return self.get_nowait(key)

    async def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        """The live values of ``keys``, in order."""
        return [self.get_nowait(k) for k in keys]

    async def set(self, key: str, value: Any, ttl: float) -> None:
        """Keep ``value`` for ``ttl`` seconds, evicting the least recently used beyond the bound."""
        entries = self._entries
        entries[key] = (clock.now() + ttl if ttl > 0 else _NEVER, value)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    async def delete(self, keys: Sequence[str]) -> None:
        """Drop ``keys``."""
        for key in keys:
            self._entries.pop(key, None)

    async def incr(self, key: str) -> int:
        """Add one to counter ``key``."""
        value = self._counters.get(key, 0) + 1
        self._counters[key] = value
        return value

    async def counter(self, key: str) -> int:
        """Counter ``key`` (0 when absent)."""
        return self._counters.get(key, 0)

    def resize(self, max_entries: int) -> None:
        """Hold at most ``max_entries`` values from now on, keeping the most recently used.

        What a reload does to the embedded cache: the answers it holds (stale
        ones served while a source is down) and its counters stay.
        """
        self.max_entries = check_count("MemoryCache", "max_entries", max_entries)
        entries = self._entries
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def clear(self) -> None:
        """Forget everything, counters included (a restarted cache)."""
        self._entries.clear()
        self._counters.clear()
