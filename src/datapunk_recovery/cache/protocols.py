"""What the read-through recovery needs from a cache, a source and a codec.

A **cache** keeps values for a while and may fail at any moment (a Redis
that is restarting, blackholed or full): every method may raise, and the
recovery treats any ``Exception`` as "the cache is unavailable right now".
A **source** is the truth (a database, a service): it is slower, and its
failures are what stale-if-error covers.  A **codec** turns values into
bytes for caches that store bytes.

The recovery stores its own small envelope in the cache (a freshness time and
the value), so a cache only moves opaque values and counters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Cache", "Codec", "CorruptEntry", "Source"]

V_co = TypeVar("V_co", covariant=True)


class CorruptEntry(ValueError):
    """A cache answered, but with bytes its codec cannot read.

    Raised by a cache's ``get``/``counter`` instead of the codec's own error,
    so that the recovery tells a cache holding garbage (written by something
    else, or by a hostile client) from a cache that is down: the read becomes
    a miss, an event says so, and the cache's breaker is not tripped.  The
    message never includes the bytes (they may hold anything).
    """


@runtime_checkable
class Cache(Protocol):
    """A key-value cache with per-entry time-to-live (seconds)."""

    async def get(self, key: str) -> Any | None:
        """The value stored under ``key``, or ``None`` when absent or expired."""
        ...

    async def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        """The values of ``keys``, in order, ``None`` for the absent ones (one round trip)."""
        ...

    async def set(self, key: str, value: Any, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds."""
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove ``keys`` (absent ones are ignored)."""
        ...

    async def incr(self, key: str) -> int:
        """Atomically add one to the counter ``key`` (created at 0) and return it."""
        ...

    async def counter(self, key: str) -> int:
        """The counter ``key`` (0 when absent)."""
        ...


@runtime_checkable
class Source(Protocol[V_co]):
    """The source of truth behind a cache."""

    async def load(self, key: str) -> V_co | None:
        """The value of ``key``, or ``None`` when there is none."""
        ...

    async def load_many(self, keys: Sequence[str]) -> Mapping[str, V_co]:
        """The values of the ``keys`` that exist (absent keys are left out)."""
        ...


@runtime_checkable
class Codec(Protocol):
    """Values to bytes and back, for caches that store bytes."""

    def encode(self, value: Any) -> bytes:
        """``value`` as bytes."""
        ...

    def decode(self, data: bytes) -> Any:
        """The value ``data`` encodes."""
        ...
