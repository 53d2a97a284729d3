"""A Redis cache (``redis.asyncio``), values through a codec (JSON unless told otherwise).

Built with [`RedisCache.from_url()`][datapunk_recovery.cache.redis.RedisCache.from_url], its client
has short socket and
connect timeouts (``timeout``, seconds): a blackholed Redis then fails a call
in that time instead of hanging, and the recovery's breaker makes the calls
after it fail in microseconds.  Redis is imported only here.

**Redis Cluster and Sentinel.**  The client may be a plain
``redis.asyncio.Redis``, a ``redis.asyncio.cluster.RedisCluster`` or the
client of ``redis.asyncio.sentinel.Sentinel(...).master_for(name)``; URLs
``redis+cluster://host:port[,host:port...]`` and
``redis+sentinel://host:port[,host:port...]/service[/db]`` build the last
two (single node, ``redis://``, stays the default).  On a cluster every
multi-key command (``MGET``, ``DEL``) is split per hash slot (redis-py's
``key_slot``, which honours ``{hash tags}``) and the per-slot commands go
out in one pipeline, one round trip per node.  A slot group the cluster
redirects or refuses mid-migration (``MOVED``, ``ASK``, ``TRYAGAIN``: some
of its keys already moved, some not) is redone key by key, each single-key
command following the redirection, so a live migration is never a cache
failure; a killed master is (connection errors, counted by the recovery
until a replica takes over, then the same client follows it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from datapunk_recovery._core.redact import redact_url
from datapunk_recovery._core.validate import check_seconds
from datapunk_recovery.stores.clients import client_from_url, is_cluster, no_hidden_resend

from .codecs import JsonCodec
from .protocols import Codec, CorruptEntry

__all__ = ["RedisCache"]


def _corrupt(codec: Codec, exc: Exception) -> CorruptEntry:
    """What an undecodable value raises: bytes someone else wrote, never trusted, never echoed."""
    return CorruptEntry(
        f"{type(codec).__name__} cannot decode a cached value ({type(exc).__name__})"
    )


class RedisCache:
    """A [`Cache`][datapunk_recovery.cache.protocols.Cache] on a ``redis.asyncio`` client.

    ``client`` is a ``Redis``, a ``RedisCluster`` or a Sentinel
    ``master_for(...)`` client (see the module docs for what a cluster
    changes).  The client must return bytes (``decode_responses=False``, the
    default).  The client's own re-send of a failed command is turned off
    (``stores.clients.no_hidden_resend()``, for every user of that client):
    a lost reply to ``INCR`` would otherwise bump a generation twice, and ten
    silent re-sends of a read hide an outage from the recovery's breaker for
    ten timeouts.
    """

    __slots__ = ("_also_close", "_cluster", "client", "codec", "label")

    def __init__(self, client: Any, codec: Codec | None = None, *, label: str = "redis") -> None:
        self.client = client
        no_hidden_resend(client)
        self.codec: Codec = codec if codec is not None else JsonCodec()
        self.label = label
        self._cluster = is_cluster(client)
        self._also_close: list[Any] = []  # the sentinels' clients of a redis+sentinel URL

    @classmethod
    def from_url(
        cls, url: str, *, codec: Codec | None = None, timeout: float = 0.25, **client_kwargs: Any
    ) -> RedisCache:
        """A cache on a new client for ``url`` whose calls give up after ``timeout`` seconds.

        ``redis://`` / ``rediss://`` / ``unix://``: one server.
        ``redis+cluster://[user:pw@]host:port[,host:port...]``: a Redis
        Cluster found through those startup nodes.
        ``redis+sentinel://[user:pw@]host:port[,host:port...]/service[/db]``:
        the master of ``service`` as the sentinels name it (the credentials
        are the data nodes'; pass ``sentinel_kwargs={...}`` for the sentinels'
        own).  A ``rediss+`` scheme uses TLS.  ``client_kwargs`` go to the
        client.
        """
        timeout = check_seconds("RedisCache", "timeout", timeout, positive=True)
        client, also_close = client_from_url(
            url, timeout=timeout, owner="RedisCache", **client_kwargs
        )
        cache = cls(client, codec, label=redact_url(url))
        cache._also_close = also_close
        return cache

    def __repr__(self) -> str:
        return f"RedisCache({self.label!r})"

    def _decode(self, data: Any) -> Any:
        if data is None:
            return None
        try:
            return self.codec.decode(data)
        except Exception as exc:
            raise _corrupt(self.codec, exc) from None

    # -- multi-key commands on a cluster -------------------------------------------
    def _slot_groups(self, keys: Sequence[str]) -> dict[int, list[int]]:
        """Positions of ``keys`` grouped by hash slot (``{tag}`` honoured), in first-seen order."""
        from redis.crc import key_slot

        encoder = self.client.encoder
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key_slot(encoder.encode(key)), []).append(i)
        return groups

    async def _per_slot(self, command: str, keys: Sequence[str]) -> list[Any]:
        """``command`` once per slot group of ``keys``, in one pipeline; replies in group order.

        A group redirected or refused mid-migration (MOVED, ASK, TRYAGAIN) is
        redone one key at a time, in a second pipeline: single-key commands
        follow ``ASK``/``MOVED`` (redis-py does) and never get ``TRYAGAIN``,
        so this retry is bounded (one command per key) and never waits.  Any
        other error is raised.
        """
        from redis.exceptions import AskError, MovedError, TryAgainError

        groups = list(self._slot_groups(keys).values())
        pipe = self.client.pipeline()
        for positions in groups:
            pipe.execute_command(command, *(keys[i] for i in positions))
        replies = await pipe.execute(raise_on_error=False, allow_redirections=False)
        redo: list[int] = []  # groups whose slot is moving
        for g, reply in enumerate(replies):
            if isinstance(reply, (AskError, MovedError, TryAgainError)):
                redo.append(g)
            elif isinstance(reply, Exception):
                raise reply
        if redo:
            singles = self.client.pipeline()
            for g in redo:
                for i in groups[g]:
                    singles.execute_command(command, keys[i])
            answers = iter(await singles.execute())
            for g in redo:
                one = [next(answers) for _ in groups[g]]
                # MGET of one key answers [value]; DEL's counts are not used.
                replies[g] = [a[0] if isinstance(a, list) and a else None for a in one]
        return list(replies)

    async def _mget(self, keys: Sequence[str]) -> list[Any]:
        if not self._cluster:
            return list(await self.client.mget(keys))
        groups = list(self._slot_groups(keys).values())
        found: list[Any] = [None] * len(keys)
        for positions, values in zip(groups, await self._per_slot("MGET", keys), strict=True):
            if not isinstance(values, list) or len(values) != len(positions):
                continue  # not an MGET answer: never trusted, those keys read as absent
            for i, value in zip(positions, values, strict=True):
                found[i] = value
        return found

    # -- the Cache protocol ----------------------------------------------------------
    async def get(self, key: str) -> Any | None:
        """The decoded value of ``key`` or ``None``; `CorruptEntry` if undecodable."""
        data = await self.client.get(key)
        if data is None:
            return None
        codec = self.codec
        try:
            # The default codec's decode is json.loads: called directly, a
            # hit spends no two Python frames on the way to it.
            return json.loads(data) if type(codec) is JsonCodec else codec.decode(data)
        except Exception as exc:
            raise _corrupt(codec, exc) from None

    async def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        """``MGET`` (one per hash slot on a cluster): the decoded values of ``keys``.

        An undecodable value counts as absent.
        """
        if not keys:
            return []
        found: list[Any | None] = []
        for data in await self._mget(keys):
            try:
                found.append(self._decode(data))
            except CorruptEntry:
                found.append(None)
        return found

    async def set(self, key: str, value: Any, ttl: float) -> None:
        """``SET key value PX ttl``."""
        await self.client.set(key, self.codec.encode(value), px=max(int(ttl * 1000), 1))

    async def delete(self, keys: Sequence[str]) -> None:
        """``DEL keys`` (one per hash slot on a cluster)."""
        if not keys:
            return
        if self._cluster:
            await self._per_slot("DEL", keys)
        else:
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
        """Close the client's connections (and the sentinels' clients a URL made)."""
        try:
            await self.client.aclose()
        finally:
            for extra in self._also_close:
                await extra.aclose()
