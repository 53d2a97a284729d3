"""The small service mesh the demo drills: a cache, a database, two HTTP endpoints, a pool.

By default everything runs in one process on the standard library alone: the
HTTP endpoints are tiny asyncio servers on loopback, the database a SQLite
file in a temporary folder, the cache the library's embedded
[`MemoryCache`][datapunk_recovery.cache.memory.MemoryCache].  With a Redis URL the cache is
a [`RedisCache`][datapunk_recovery.cache.redis.RedisCache]; with a PostgreSQL DSN the
database is PostgreSQL (asyncpg).  Each dependency counts the calls that
reach it (the demo's measure of load amplification) and lets a chaos
injector decide, per call, whether it fails or slows down.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from ..cache import Cache
from ..chaos import Injector
from ..database import run_in_thread
from ..network.http import HttpPolicy

__all__ = [
    "KEYS",
    "Endpoint",
    "FaultyCache",
    "PostgresStore",
    "SqliteStore",
    "Store",
    "busy_error",
    "http_get",
    "serialization_error",
]

#: Rows in the demo's catalog table.
KEYS: Final = 200
_REQUEST_LIMIT: Final = 8192
# 5xx answers raise HttpStatusError (with the server's Retry-After, if any).
_HTTP: Final = HttpPolicy()


def busy_error() -> Exception:
    """A ``database is locked`` error as SQLite raises it (``SQLITE_BUSY``)."""
    exc = sqlite3.OperationalError("database is locked")
    exc.sqlite_errorcode = 5
    exc.sqlite_errorname = "SQLITE_BUSY"
    return exc


def serialization_error() -> Exception:
    """A ``could not serialize access`` error as asyncpg raises it (SQLSTATE 40001)."""
    import asyncpg

    error: Exception = asyncpg.exceptions.SerializationError("could not serialize access")
    return error


class Endpoint:
    """An HTTP endpoint on loopback that answers ``GET /item/KEY`` with the key's value.

    ``injector`` decides per request: a fault becomes a ``503``, a latency
    delays the answer.  ``requests`` counts every request that arrived.
    """

    __slots__ = ("_server", "injector", "name", "port", "requests")

    def __init__(self, name: str, injector: Injector) -> None:
        self.name = name
        self.injector = injector
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """``host:port`` of the endpoint once started."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on a free loopback port (``port`` tells which)."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and close the server."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _answer(self, path: str) -> bytes:
        return f'{{"endpoint": "{self.name}", "path": "{path}"}}'.encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _REQUEST_LIMIT:
                return
            path = head.split(b" ", 2)[1].decode("ascii", "replace")
            self.requests += 1
            try:
                body = await self.injector.call_async(self._answer, path)
                status = "200 OK"
            except Exception:
                body, status = b"unavailable", "503 Service Unavailable"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def http_get(name: str, address: str, path: str) -> bytes:
    """``GET path`` from endpoint ``name`` at ``host:port``.

    A 5xx raises [`HttpStatusError`][datapunk_recovery.network.http.HttpStatusError].
    """
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise ConnectionResetError("the endpoint closed the connection without an answer") from None
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    error = _HTTP.judge("GET", status, headers, name, idempotent=True)
    if error is not None:
        raise error
    return body


class FaultyCache:
    """A [`Cache`][datapunk_recovery.cache.protocols.Cache] that fails when its injector says so.

    Wraps the real cache (embedded or Redis); ``calls`` counts every call
    that reached it.
    """

    __slots__ = ("calls", "inner", "injector")

    def __init__(self, inner: Cache, injector: Injector) -> None:
        self.inner = inner
        self.injector = injector
        self.calls = 0

    async def _reach(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        self.calls += 1
        return await self.injector.call_async(fn, *args)

    async def get(self, key: str) -> Any | None:
        """The value of ``key``, or ``None`` for a miss."""
        return await self._reach(self.inner.get, key)

    async def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        """The values of ``keys``."""
        result: list[Any | None] = await self._reach(self.inner.get_many, keys)
        return result

    async def set(self, key: str, value: Any, ttl: float) -> None:
        """Keep ``value`` for ``ttl`` seconds."""
        await self._reach(self.inner.set, key, value, ttl)

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove ``keys``."""
        await self._reach(self.inner.delete, keys)

    async def incr(self, key: str) -> int:
        """Add one to counter ``key``."""
        return int(await self._reach(self.inner.incr, key))

    async def counter(self, key: str) -> int:
        """Counter ``key``."""
        return int(await self._reach(self.inner.counter, key))


class Store(Protocol):
    """The demo's database: a catalog to read, an orders table to write.

    ``injector`` runs at the start of every transaction, so an injected busy
    error or dropped connection hits the real transaction; ``calls`` counts
    the transactions started.
    """

    injector: Injector
    calls: int
    #: The database's table in the facade's configuration (``sqlite`` or ``postgres``).
    settings: dict[str, str]

    def busy(self) -> Exception:
        """The error this database raises when it is too busy to serve a transaction."""
        ...

    async def create(self) -> None:
        """Create the tables and fill the catalog."""
        ...

    async def drop(self) -> None:
        """Remove what `create()` made (when it is not a throwaway file)."""
        ...

    async def read(self, key: str) -> str:
        """One plain attempt to read ``key`` (no recovery)."""
        ...

    async def write(self, item: str) -> int:
        """One plain attempt to write an order (no recovery)."""
        ...

    def order(self, item: str) -> Callable[[Any], Any]:
        """The work of a transaction writing an order, for database recovery."""
        ...


def _catalog() -> list[tuple[str, str]]:
    return [(f"item-{i}", f"value of item {i}") for i in range(KEYS)]


class SqliteStore:
    """The demo's database in a SQLite file (see [`Store`][datapunk_recovery.demo.mesh.Store])."""

    __slots__ = ("calls", "injector", "path", "settings")

    def __init__(self, folder: str, injector: Injector) -> None:
        self.path = str(Path(folder) / "demo.db")
        self.injector = injector
        self.calls = 0
        self.settings = {"sqlite": self.path}

    def busy(self) -> Exception:
        """``SQLITE_BUSY``."""
        return busy_error()

    async def create(self) -> None:
        """Create the tables and fill the catalog."""
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS catalog (key TEXT PRIMARY KEY, value TEXT)")
            conn.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT)")
            conn.executemany("INSERT OR REPLACE INTO catalog VALUES (?, ?)", _catalog())

    async def drop(self) -> None:
        """Nothing: the file goes with its temporary folder."""

    def _enter(self) -> None:
        self.calls += 1
        self.injector.call(_nothing)

    def _read_in(self, conn: sqlite3.Connection, key: str) -> str:
        self._enter()
        row = conn.execute("SELECT value FROM catalog WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return str(row[0])

    def _write_in(self, conn: sqlite3.Connection, item: str) -> int:
        self._enter()
        cursor = conn.execute("INSERT INTO orders (item) VALUES (?)", (item,))
        return int(cursor.lastrowid or 0)

    def _once(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = sqlite3.connect(self.path, timeout=0.05, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = fn(conn)
            conn.execute("COMMIT")
            return result
        finally:
            conn.close()

    async def read(self, key: str) -> str:
        """One plain attempt to read ``key``, in a worker thread."""
        return str(await run_in_thread(self._once, lambda conn: self._read_in(conn, key)))

    async def write(self, item: str) -> int:
        """One plain attempt to write an order, in a worker thread."""
        return int(await run_in_thread(self._once, lambda conn: self._write_in(conn, item)))

    def order(self, item: str) -> Callable[[sqlite3.Connection], int]:
        """Insert an order for ``item`` on the transaction's connection."""
        return lambda conn: self._write_in(conn, item)


class PostgresStore:
    """The demo's database in PostgreSQL, in tables of its own run (see `Store`).

    The plain run uses a small asyncpg pool of its own; the recovered run
    the facade's (``settings``).  The DSN is never shown.
    """

    __slots__ = ("_pool", "calls", "catalog", "injector", "orders", "settings")

    def __init__(self, dsn: str, injector: Injector) -> None:
        run = uuid.uuid4().hex[:12]
        self.catalog = f"datapunk_demo_catalog_{run}"
        self.orders = f"datapunk_demo_orders_{run}"
        self.injector = injector
        self.calls = 0
        self.settings = {"postgres": dsn}
        self._pool: Any = None

    def busy(self) -> Exception:
        """A serialization failure (SQLSTATE 40001)."""
        return serialization_error()

    async def create(self) -> None:
        """Create the run's tables, fill the catalog, open the plain run's pool."""
        import asyncpg

        self._pool = await asyncpg.create_pool(self.settings["postgres"], min_size=1, max_size=8)
        async with self._pool.acquire() as conn:
            await conn.execute(f"CREATE TABLE {self.catalog} (key text PRIMARY KEY, value text)")
            await conn.execute(f"CREATE TABLE {self.orders} (id serial PRIMARY KEY, item text)")
            await conn.executemany(f"INSERT INTO {self.catalog} VALUES ($1, $2)", _catalog())

    async def drop(self) -> None:
        """Drop the run's tables and close the pool."""
        if self._pool is None:
            return
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(f"DROP TABLE IF EXISTS {self.catalog}, {self.orders}")
        finally:
            await self._pool.close()
            self._pool = None

    def _enter(self) -> None:
        self.calls += 1
        self.injector.call(_nothing)

    async def read(self, key: str) -> str:
        """One plain attempt to read ``key``."""
        async with self._pool.acquire() as conn, conn.transaction():
            self._enter()
            value = await conn.fetchval(f"SELECT value FROM {self.catalog} WHERE key = $1", key)
        if value is None:
            raise KeyError(key)
        return str(value)

    async def _write_in(self, conn: Any, item: str) -> int:
        self._enter()
        return int(
            await conn.fetchval(f"INSERT INTO {self.orders} (item) VALUES ($1) RETURNING id", item)
        )

    async def write(self, item: str) -> int:
        """One plain attempt to write an order."""
        async with self._pool.acquire() as conn, conn.transaction():
            return await self._write_in(conn, item)

    def order(self, item: str) -> Callable[[Any], Awaitable[int]]:
        """Insert an order for ``item`` on the transaction's connection."""
        return lambda conn: self._write_in(conn, item)


def _nothing() -> None:
    return None
