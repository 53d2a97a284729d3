"""Sources of truth for the read-through cache: PostgreSQL, SQLite, any async function.

- [`FunctionSource`][datapunk_recovery.cache.sources.FunctionSource]: any ``async def load(key)``
  (and optionally ``load_many``).
- [`PostgresSource`][datapunk_recovery.cache.sources.PostgresSource]: a parameterised query on an
  ``asyncpg.Pool``, a
  ``psycopg_pool.AsyncConnectionPool`` or a
  [`ManagedPool`][datapunk_recovery.database.pool.ManagedPool]; reads are idempotent, so
  they go through the database recovery's [`run()`][datapunk_recovery.database.transaction.run]
  and survive a dropped connection or a restarted server.
- [`SqliteSource`][datapunk_recovery.cache.sources.SqliteSource]: a parameterised query on a SQLite
  file, run in a
  worker thread so the event loop never blocks.

A query returns one row per key.  With one column the value is that column;
with more, a ``dict`` of column names to values.  The optional
``many_query`` receives the list of keys as its only parameter and returns
rows whose first column is the key (``SELECT id, body FROM t WHERE id =
ANY($1)``); without it, ``load_many`` loads the keys one by one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from datapunk_recovery._core.validate import check_seconds, shown
from datapunk_recovery._execution.runtime import run_in_thread
from datapunk_recovery.database import ManagedPool, run

__all__ = ["FunctionSource", "PostgresSource", "SqliteSource"]


class FunctionSource:
    """Any async function as a source; ``load_many`` defaults to one ``load`` per key."""

    __slots__ = ("_load", "_load_many")

    def __init__(
        self,
        load: Callable[[str], Awaitable[Any]],
        load_many: Callable[[Sequence[str]], Awaitable[Mapping[str, Any]]] | None = None,
    ) -> None:
        if not callable(load):
            raise TypeError(f"FunctionSource.load: expected an async callable, got {shown(load)}")
        self._load = load
        self._load_many = load_many

    async def load(self, key: str) -> Any:
        """``load(key)``."""
        return await self._load(key)

    async def load_many(self, keys: Sequence[str]) -> Mapping[str, Any]:
        """``load_many(keys)``, or ``load`` for each key."""
        if self._load_many is not None:
            return await self._load_many(keys)
        found: dict[str, Any] = {}
        for key in keys:
            value = await self._load(key)
            if value is not None:
                found[key] = value
        return found


def _value(columns: Sequence[str], row: Sequence[Any]) -> Any:
    return row[0] if len(columns) == 1 else dict(zip(columns, row, strict=True))


class PostgresSource:
    """A parameterised query on PostgreSQL (asyncpg or psycopg 3), retried as an idempotent read.

    Placeholders are the driver's own: ``$1`` for asyncpg, ``%s`` for psycopg.
    """

    __slots__ = ("many_query", "pool", "query")

    def __init__(self, pool: Any, query: str, many_query: str | None = None) -> None:
        self.pool = ManagedPool.of(pool)
        self.query = query
        self.many_query = many_query

    async def _rows(self, conn: Any, query: str, arg: Any) -> tuple[list[str], list[Any]]:
        if hasattr(conn, "fetchrow"):  # asyncpg
            records = await conn.fetch(query, arg)
            columns = list(records[0].keys()) if records else []
            return columns, [tuple(r) for r in records]
        cursor = await conn.execute(query, (arg,))
        rows = await cursor.fetchall()
        return [d.name for d in cursor.description or ()], rows

    async def load(self, key: str) -> Any:
        """The value of ``key`` (None when the query returns no row)."""

        async def read(conn: Any) -> Any:
            columns, rows = await self._rows(conn, self.query, key)
            return _value(columns, rows[0]) if rows else None

        return await run(self.pool, read, idempotent=True, name=f"{self.pool.config.name}.load")

    async def load_many(self, keys: Sequence[str]) -> Mapping[str, Any]:
        """The values of the existing ``keys``: one query with ``many_query``, else one per key."""
        many_query = self.many_query
        if many_query is None:
            found = {k: await self.load(k) for k in keys}
            return {k: v for k, v in found.items() if v is not None}

        async def read(conn: Any) -> Mapping[str, Any]:
            columns, rows = await self._rows(conn, many_query, list(keys))
            return {str(r[0]): _value(columns[1:], r[1:]) for r in rows}

        name = f"{self.pool.config.name}.load_many"
        return await run(self.pool, read, idempotent=True, name=name)


class SqliteSource:
    """A parameterised query (``?`` placeholders) on a SQLite file, off the event loop."""

    __slots__ = ("path", "query", "timeout")

    def __init__(self, path: str, query: str, *, timeout: float = 5.0) -> None:
        self.path = path
        self.query = query
        #: Seconds SQLite waits for a lock (at most one day, as every duration).
        self.timeout = check_seconds("SqliteSource", "timeout", timeout)

    def _read(self, keys: Sequence[str]) -> dict[str, Any]:
        conn = sqlite3.connect(self.path, timeout=self.timeout)
        try:
            found: dict[str, Any] = {}
            for key in keys:
                cursor = conn.execute(self.query, (key,))
                row = cursor.fetchone()
                if row is not None:
                    found[key] = _value([d[0] for d in cursor.description], row)
            return found
        finally:
            conn.close()

    async def load(self, key: str) -> Any:
        """The value of ``key`` or ``None``."""
        return (await run_in_thread(self._read, [key])).get(key)

    async def load_many(self, keys: Sequence[str]) -> Mapping[str, Any]:
        """The values of the existing ``keys`` (one connection, one thread hop)."""
        return await run_in_thread(self._read, list(keys))
