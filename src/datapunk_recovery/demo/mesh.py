"""The small service mesh the demo drills: a cache, a SQLite database, two HTTP endpoints, a pool.

Everything runs in one process on the standard library alone: the HTTP
endpoints are tiny asyncio servers on loopback, the database a SQLite file
in a temporary folder, the cache a dictionary.  Each dependency counts the
calls that reach it (the demo's measure of load amplification) and lets a
chaos injector decide, per call, whether it fails or slows down.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Final

from ..chaos import Injector
from ..errors import ErrorCategory, RecoveryError

__all__ = ["DemoCache", "Endpoint", "HttpStatusError", "SqliteStore", "busy_error", "http_get"]

#: Rows in the demo's catalog table.
KEYS: Final = 200
_REQUEST_LIMIT: Final = 8192


class HttpStatusError(RecoveryError):
    """An endpoint answered with a 5xx status: retryable, as a 503 is."""

    category = ErrorCategory.NETWORK
    retryable = True

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def busy_error() -> Exception:
    """A ``database is locked`` error as SQLite raises it (``SQLITE_BUSY``)."""
    exc = sqlite3.OperationalError("database is locked")
    exc.sqlite_errorcode = 5
    exc.sqlite_errorname = "SQLITE_BUSY"
    return exc


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
                body = await self.injector.acall(self._answer, path)
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


async def http_get(port: int, path: str) -> bytes:
    """``GET path`` from the endpoint on ``port``; a 5xx raises :class:`HttpStatusError`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    try:
        status = int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise ConnectionResetError("the endpoint closed the connection without an answer") from None
    if status >= 500:
        raise HttpStatusError(status)
    return answer.partition(b"\r\n\r\n")[2]


class DemoCache:
    """An in-memory cache with TTLs (seconds), failing when its injector says so.

    ``calls`` counts every ``get`` and ``set`` that reached it.
    """

    __slots__ = ("_data", "calls", "injector")

    def __init__(self, injector: Injector) -> None:
        self.injector = injector
        self.calls = 0
        self._data: dict[str, tuple[Any, float]] = {}

    async def _get(self, key: str) -> Any:
        entry = self._data.get(key)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    async def _set(self, key: str, value: Any, ttl: float) -> None:
        self._data[key] = (value, time.monotonic() + ttl)

    async def get(self, key: str) -> Any:
        """The value of ``key``, or ``None`` for a miss."""
        self.calls += 1
        return await self.injector.acall(self._get, key)

    async def set(self, key: str, value: Any, ttl: float) -> None:
        """Keep ``value`` for ``ttl`` seconds."""
        self.calls += 1
        await self.injector.acall(self._set, key, value, ttl)


class SqliteStore:
    """The demo's database: a catalog to read and an orders table to write.

    ``injector`` runs at the start of every transaction, inside the worker
    thread, so an injected busy error or dropped connection hits the real
    transaction; ``calls`` counts the transactions started.
    """

    __slots__ = ("calls", "injector", "path")

    def __init__(self, path: str, injector: Injector) -> None:
        self.path = path
        self.injector = injector
        self.calls = 0

    def create(self) -> None:
        """Create the tables and fill the catalog."""
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS catalog (key TEXT PRIMARY KEY, value TEXT)")
            conn.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT)")
            conn.executemany(
                "INSERT OR REPLACE INTO catalog VALUES (?, ?)",
                [(f"item-{i}", f"value of item {i}") for i in range(KEYS)],
            )

    def enter(self) -> None:
        """Count a transaction and let the injector fail it."""
        self.calls += 1
        self.injector.call(_nothing)

    def read_in(self, conn: sqlite3.Connection, key: str) -> str:
        """Read ``key`` on ``conn`` (inside a transaction)."""
        self.enter()
        row = conn.execute("SELECT value FROM catalog WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return str(row[0])

    def write_in(self, conn: sqlite3.Connection, item: str) -> int:
        """Insert an order for ``item`` on ``conn``; returns its id."""
        self.enter()
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
        """One plain attempt to read ``key`` (no recovery), in a worker thread."""
        return str(await asyncio.to_thread(self._once, lambda conn: self.read_in(conn, key)))

    async def write(self, item: str) -> int:
        """One plain attempt to write an order (no recovery), in a worker thread."""
        return int(await asyncio.to_thread(self._once, lambda conn: self.write_in(conn, item)))


def _nothing() -> None:
    return None
