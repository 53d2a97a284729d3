"""A Redis cache (``redis.asyncio``), values through a codec (JSON unless told otherwise).

Built with [`RedisCache.from_url()`][datapunk_recovery.cache.redis.RedisCache.from_url], its client
has short socket and
connect timeouts (``timeout``, seconds): a blackholed Redis then fails a call
in that time instead of hanging, and the recovery's breaker makes the calls
after it fail in microseconds.  Redis is imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datapunk_recovery._extras import raise_missing
from datapunk_recovery._validate import check_seconds
from datapunk_recovery.redact import redact_url

from .codecs import JsonCodec
from .protocols import Codec, CorruptEntry

__all__ = ["RedisCache"]


class RedisCache:
    """A [`Cache`][datapunk_recovery.cache.protocols.Cache] on a ``redis.asyncio.Redis`` client.

    The client must return bytes (``decode_responses=False``, the default).
    """

    __slots__ = ("client", "codec", "label")

    def __init__(self, client: Any, codec: Codec | None = None, *, label: str = "redis") -> None:
        self.client = client
        self.codec: Codec = codec if codec is not None else JsonCodec()
        self.label = label

    @classmethod
    def from_url(
        cls, url: str, *, codec: Codec | None = None, timeout: float = 0.25, **client_kwargs: Any
    ) -> RedisCache:
        """A cache on a new client for ``url`` whose calls give up after ``timeout`` seconds."""
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise_missing(exc, "RedisCache", "redis", extra="redis")
        timeout = check_seconds("RedisCache", "timeout", timeout, positive=True)
        client_kwargs.setdefault("socket_timeout", timeout)
        client_kwargs.setdefault("socket_connect_timeout", timeout)
        client = aioredis.Redis.from_url(url, **client_kwargs)
        return cls(client, codec, label=redact_url(url))

    def __repr__(self) -> str:
        return f"RedisCache({self.label!r})"

    def _decode(self, data: Any) -> Any:
        if data is None:
            return None
        try:
            return self.codec.decode(data)
        except Exception as exc:
            # Bytes someone else wrote: never trusted, never echoed.
            raise CorruptEntry(
                f"{type(self.codec).__name__} cannot decode a cached value ({type(exc).__name__})"
            ) from None

    async def get(self, key: str) -> Any | None:
        """The decoded value of ``key`` or ``None``; `CorruptEntry` if undecodable."""
        return self._decode(await self.client.get(key))

    async def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        """``MGET``: the decoded values of ``keys``; an undecodable one counts as absent."""
        if not keys:
            return []
        found: list[Any | None] = []
        for data in await self.client.mget(keys):
            try:
                found.append(self._decode(data))
            except CorruptEntry:
                found.append(None)
        return found

    async def set(self, key: str, value: Any, ttl: float) -> None:
        """``SET key value PX ttl``."""
        await self.client.set(key, self.codec.encode(value), px=max(int(ttl * 1000), 1))

    async def delete(self, keys: Sequence[str]) -> None:
        """``DEL keys``."""
        if keys:
            await self.client.delete(*keys)

    async def incr(self, key: str) -> int:
        """``INCR key``."""
        return int(await self.client.incr(key))

    async def counter(self, key: str) -> int:
        """The integer at ``key`` (raw, not through the codec), 0 when absent.

        [`CorruptEntry`][datapunk_recovery.cache.protocols.CorruptEntry] when ``key`` holds
        something else.
        """
        data = await self.client.get(key)
        if data is None:
            return 0
        try:
            return int(data)
        except (TypeError, ValueError):
            raise CorruptEntry("a counter does not hold an integer") from None

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()
