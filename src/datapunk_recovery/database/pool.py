"""Pools that hand out only working connections and take back only clean ones.

[`ManagedPool`][datapunk_recovery.database.pool.ManagedPool] wraps an ``asyncpg.Pool`` or a
``psycopg_pool.AsyncConnectionPool`` and adds what recovering from a failed
database needs:

- **bounded acquire**: no wait for a connection lasts longer than
  ``PoolConfig.acquire_timeout`` (nor past the overall deadline); running out
  raises [`PoolTimeout`][datapunk_recovery.database.errors.PoolTimeout], a
  ``RESOURCE`` error that per-category policies back off harder on;
- **health checks**: when the pool has been quiet for ``ping_after_idle``
  seconds, the next connection is pinged before it is handed out, so a
  server that restarted during the quiet time costs a reconnect, not a failed
  query;
- **connection reset**: a connection that failed in a way that leaves it in
  doubt (a lost socket, a timeout, a cancellation) is closed and discarded,
  never returned; every connection going back is reset to a clean session
  state (asyncpg's pool runs ``RESET ALL``, ``UNLISTEN *``, unlocks advisory
  locks and closes cursors; psycopg connections of a pool built here get the same and
  lose their temporary tables; those of the application's own psycopg pool keep
  the session its ``configure=`` set up, and go back out of any transaction, in
  the autocommit mode they came in);
- **server restarts**: the first connection failure expires every pooled
  connection, so the pool recovers without a process restart;
- **metrics**: size, idle connections and waiters are reported as
  [`PoolStatus`][datapunk_recovery.database.pool.PoolStatus] events, discards as
  [`ConnectionDiscarded`][datapunk_recovery.database.pool.ConnectionDiscarded].

Drivers are imported lazily, and only by the factory that needs them.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar
from urllib.parse import unquote, urlsplit

from datapunk_recovery._core import clock
from datapunk_recovery._core.context import CURRENT
from datapunk_recovery._core.errors import ErrorCategory
from datapunk_recovery._core.events import Event, EventBus, emit, listening
from datapunk_recovery._core.extras import raise_missing
from datapunk_recovery._core.redact import REDACTED, is_secret_name, redact_text
from datapunk_recovery._core.validate import check_seconds, shown
from datapunk_recovery._execution import runtime as _runtime

from ._replay import (
    ABORTED,
    IDLE,
    OPEN,
    IdempotencyCheck,
    TransactionConfig,
    replay_run,
    replay_transaction,
)
from .errors import (
    DatabaseUnavailable,
    DbErrorKind,
    PoolTimeout,
    TransactionRolledBack,
    classify_database,
    describe,
)

__all__ = [
    "ConnectionDiscarded",
    "ManagedPool",
    "PoolConfig",
    "PoolSnapshot",
    "PoolStatus",
    "reset_psycopg_session",
]

T = TypeVar("T")

_OWNER: Final = "PoolConfig"
# After a failure, expire the pool at most this often (seconds): many
# connections failing together must not each trigger a pool-wide check.
_EXPIRE_INTERVAL: Final = 1.0
# Pinged connections that fail are replaced; after this many in a row the
# acquire gives up and reports the last failure.
_MAX_PING_FAILURES: Final = 3
_RESET_SQL: Final = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; "
    "SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
)
# Is a backend still running (its transaction then still undecided)?
_ALIVE_SQL: Final = "SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1"
_TERMINATE_SQL: Final = (
    "SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1 AND pg_terminate_backend(pid)"
)
# libpq's PQTRANS_IDLE: connected, no transaction open (psycopg.pq.TransactionStatus.IDLE).
_PQ_IDLE: Final = 0
# libpq's PQTRANS_INERROR: in a transaction the server aborted (only ROLLBACK is accepted).
_PQ_INERROR: Final = 3
# What COMMIT answers for a transaction the server had aborted.
_ROLLED_BACK_TAG: Final = "ROLLBACK"
# The SQLSTATE of every statement sent to an aborted transaction: not the cause.
_IN_FAILED_TRANSACTION: Final = "25P02"

# Transaction states a driver reports before COMMIT (see ``_Driver.state``):
# OPEN, ABORTED and IDLE, defined with the replay that reads them.


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """How a `ManagedPool` acquires and checks connections.

    ``acquire_timeout``: the longest wait for a connection, in seconds.
    ``ping_after_idle``: when the pool saw no successful use for this many
    seconds, ping a connection before handing it out (``None``: never ping).
    ``name`` names the pool in events and messages; never put a DSN here.
    """

    acquire_timeout: float = 5.0
    ping_after_idle: float | None = 2.0
    name: str = "database"

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(
            self,
            "acquire_timeout",
            check_seconds(_OWNER, "acquire_timeout", self.acquire_timeout, positive=True),
        )
        if self.ping_after_idle is not None:
            s(
                self,
                "ping_after_idle",
                check_seconds(_OWNER, "ping_after_idle", self.ping_after_idle),
            )
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{_OWNER}.name: expected a non-empty string, got {shown(self.name)}")


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """A pool's numbers now: open connections, idle ones, the maximum, tasks waiting."""

    size: int
    idle: int
    max_size: int
    waiting: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStatus(Event):
    """A pool's size, idle connections and waiters after ``cause`` (acquired, released, ...)."""

    name: ClassVar[str] = "database.pool"
    area: ClassVar[str] = "database"

    cause: str
    size: int
    idle: int
    max_size: int
    waiting: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionDiscarded(Event):
    """A connection was closed instead of going back to the pool; ``error_type`` says why."""

    name: ClassVar[str] = "database.discarded"
    area: ClassVar[str] = "database"

    error_type: str


class _Driver:
    """What the recovery needs from a driver's pool; one subclass per driver."""

    kind: ClassVar[str] = "driver"

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def acquire(self, timeout: float) -> Any:
        raise NotImplementedError

    async def release(self, conn: Any) -> None:
        raise NotImplementedError

    async def discard(self, conn: Any) -> None:
        raise NotImplementedError

    def is_broken(self, conn: Any) -> bool:
        raise NotImplementedError

    async def ping(self, conn: Any) -> None:
        raise NotImplementedError

    async def begin(self, conn: Any, isolation: str | None, read_only: bool) -> Any:
        raise NotImplementedError

    async def commit(self, conn: Any, handle: Any) -> bool:
        """Send COMMIT; true if it committed, false if the server answered ROLLBACK."""
        raise NotImplementedError

    async def rollback(self, conn: Any, handle: Any) -> None:
        raise NotImplementedError

    def state(self, conn: Any) -> str:
        """`OPEN`, `ABORTED` (known aborted) or `IDLE` (no transaction)."""
        raise NotImplementedError

    def abort_code(self, handle: Any) -> str | None:
        """The SQLSTATE of the error that aborted the transaction of ``handle``, if known."""
        return None

    async def expire(self) -> None:
        raise NotImplementedError

    def snapshot(self, waiting: int) -> PoolSnapshot:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def backend_pid(self, conn: Any) -> int | None:
        raise NotImplementedError

    async def backend_alive(self, conn: Any, pid: int, terminate: bool) -> bool:
        raise NotImplementedError


def _begin_sql(isolation: str | None, read_only: bool) -> str:
    sql = "BEGIN"
    if isolation is not None:
        sql += f" ISOLATION LEVEL {isolation.replace('_', ' ').upper()}"
    if read_only:
        sql += " READ ONLY"
    return sql


def _raw_asyncpg(conn: Any) -> Any:
    # A pool's proxy lets go of its connection (``_con`` becomes None) as soon
    # as the connection closes, and asyncpg frees the pool slot by itself.
    return getattr(conn, "_con", conn)


class _AsyncpgDriver(_Driver):
    kind = "asyncpg"

    async def acquire(self, timeout: float) -> Any:
        try:
            return await self.pool.acquire(timeout=timeout)
        except TimeoutError:
            raise _Timeout from None

    async def release(self, conn: Any) -> None:
        # asyncpg's pool resets the session (rolls back, RESET ALL, UNLISTEN,
        # unlocks advisory locks, closes cursors) on release.
        await self.pool.release(conn)

    async def discard(self, conn: Any) -> None:
        if _raw_asyncpg(conn) is None:
            return  # closed already: asyncpg gave its slot back to the pool
        conn.terminate()
        await self.pool.release(conn)

    def is_broken(self, conn: Any) -> bool:
        raw = _raw_asyncpg(conn)
        return raw is None or bool(raw.is_closed())

    async def ping(self, conn: Any) -> None:
        await conn.execute("SELECT 1")

    async def begin(self, conn: Any, isolation: str | None, read_only: bool) -> Any:
        # asyncpg's Transaction makes fn's own ``conn.transaction()`` a savepoint.
        tr = conn.transaction(isolation=isolation, readonly=read_only)
        handle = _AsyncpgTransaction(tr)
        conn.add_query_logger(handle.saw)
        try:
            await tr.start()
        except BaseException:
            conn.remove_query_logger(handle.saw)
            raise
        return handle

    async def commit(self, conn: Any, handle: Any) -> bool:
        # asyncpg's Transaction.commit() drops COMMIT's answer, which is
        # "ROLLBACK" when the server had aborted the transaction: send it here.
        conn.remove_query_logger(handle.saw)
        raw = _raw_asyncpg(conn)
        if raw is not None and getattr(raw, "_top_xact", None) is handle.tr:
            raw._top_xact = None  # the next conn.transaction() is a top one again
        status = await conn.execute("COMMIT")
        handle.ended = True
        return bool(status != _ROLLED_BACK_TAG)

    async def rollback(self, conn: Any, handle: Any) -> None:
        # Without a transaction handle the pool's reset rolls back on release.
        if handle is None:
            return
        with contextlib.suppress(Exception):
            conn.remove_query_logger(handle.saw)
        if handle.ended:
            await conn.execute("ROLLBACK")  # a no-op unless COMMIT never got through
        else:
            await handle.tr.rollback()

    def state(self, conn: Any) -> str:
        # asyncpg does not tell an aborted transaction from an open one: COMMIT's
        # answer does.
        return OPEN if conn.is_in_transaction() else IDLE

    def abort_code(self, handle: Any) -> str | None:
        return handle.code if isinstance(handle, _AsyncpgTransaction) else None

    async def expire(self) -> None:
        await self.pool.expire_connections()

    def backend_pid(self, conn: Any) -> int | None:
        raw = _raw_asyncpg(conn)
        return None if raw is None else int(raw.get_server_pid())

    async def backend_alive(self, conn: Any, pid: int, terminate: bool) -> bool:
        return bool(await conn.fetchval(_ALIVE_SQL if not terminate else _TERMINATE_SQL, pid))

    def snapshot(self, waiting: int) -> PoolSnapshot:
        p = self.pool
        return PoolSnapshot(p.get_size(), p.get_idle_size(), p.get_max_size(), waiting)

    async def close(self) -> None:
        await self.pool.close()


class _AsyncpgTransaction:
    """An asyncpg transaction and the SQLSTATE of the last error sent through it."""

    __slots__ = ("code", "ended", "tr")

    def __init__(self, tr: Any) -> None:
        self.tr = tr
        self.code: str | None = None
        self.ended = False

    def saw(self, record: Any) -> None:
        """asyncpg's query logger: remember what aborted the transaction (not 25P02)."""
        exc = getattr(record, "exception", None)
        state = getattr(exc, "sqlstate", None)
        if isinstance(state, str) and state != _IN_FAILED_TRANSACTION:
            self.code = state


class _PsycopgTransaction:
    """A psycopg transaction: the cursor factory it replaced, and what aborted it."""

    __slots__ = ("code", "factory", "recording")

    def __init__(self, factory: Any, recording: Any) -> None:
        self.factory = factory
        self.recording = recording
        self.code: str | None = None

    def saw(self, exc: BaseException) -> None:
        state = getattr(exc, "sqlstate", None)
        if isinstance(state, str) and state != _IN_FAILED_TRANSACTION:
            self.code = state


# Connections in a transaction of ours -> that transaction, for the recording cursors.
_RECORDERS: weakref.WeakKeyDictionary[Any, _PsycopgTransaction] = weakref.WeakKeyDictionary()
# A recording subclass per cursor class (few: AsyncCursor, AsyncClientCursor, ...).
_RECORDING_CLASSES: dict[type, type] = {}
_RECORDING_MAX: Final = 64


def _recording_cursor(factory: Any) -> Any:
    """A subclass of the cursor class ``factory`` that tells the transaction its errors.

    psycopg keeps no record of the error that aborted a transaction, and
    ``fn`` may have swallowed it: its cursors report it on the way out.
    ``None`` when ``factory`` is not a class (then the SQLSTATE stays unknown).
    """
    if not isinstance(factory, type):
        return None
    found = _RECORDING_CLASSES.get(factory)
    if found is not None:
        return found

    class Recording(factory):  # type: ignore[misc]
        __slots__ = ()

        async def execute(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return await super().execute(*args, **kwargs)
            except Exception as exc:
                _saw(self.connection, exc)
                raise

        async def executemany(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return await super().executemany(*args, **kwargs)
            except Exception as exc:
                _saw(self.connection, exc)
                raise

    Recording.__name__ = Recording.__qualname__ = f"Recording{factory.__name__}"
    if len(_RECORDING_CLASSES) < _RECORDING_MAX:
        _RECORDING_CLASSES[factory] = Recording
    return Recording


def _saw(conn: Any, exc: BaseException) -> None:
    handle = _RECORDERS.get(conn)
    if handle is not None:
        handle.saw(exc)


def _stop_recording(conn: Any, handle: Any) -> None:
    if isinstance(handle, _PsycopgTransaction):
        _RECORDERS.pop(conn, None)
        if handle.recording is not None and conn.cursor_factory is handle.recording:
            conn.cursor_factory = handle.factory


class _PsycopgDriver(_Driver):
    kind = "psycopg"

    def __init__(self, pool: Any, *, resets_itself: bool) -> None:
        super().__init__(pool)
        # A pool we built runs reset_psycopg_session itself on every return.
        self.resets_itself = resets_itself
        # Connections of the application's pool we switched to autocommit: they
        # go back as they came, or its own blocks would commit statement by
        # statement (and an error would no longer roll them back).
        self.lent: weakref.WeakSet[Any] = weakref.WeakSet()

    async def acquire(self, timeout: float) -> Any:
        from psycopg_pool import PoolTimeout as DriverPoolTimeout

        try:
            conn = await self.pool.getconn(timeout=timeout)
        except DriverPoolTimeout:
            raise _Timeout from None
        if not conn.autocommit:
            # Transactions are begun explicitly; statements outside one commit alone.
            await conn.set_autocommit(True)
            if not self.resets_itself:
                self.lent.add(conn)
        return conn

    async def release(self, conn: Any) -> None:
        if not self.resets_itself:
            # The application's pool: its session is its own (what its
            # ``configure=`` set up stays; its ``reset=`` cleans up, as for
            # its own blocks); only what the recovery changed is undone.
            try:
                if conn.info.transaction_status != _PQ_IDLE:
                    await conn.execute("ROLLBACK")
                if conn in self.lent:
                    self.lent.discard(conn)
                    await conn.set_autocommit(False)
            except Exception:
                await self.discard(conn)
                return
        await self.pool.putconn(conn)

    async def discard(self, conn: Any) -> None:
        self.lent.discard(conn)
        await conn.close()
        await self.pool.putconn(conn)  # the pool drops a closed connection

    def is_broken(self, conn: Any) -> bool:
        return bool(conn.broken or conn.closed)

    async def ping(self, conn: Any) -> None:
        await conn.execute("SELECT 1")

    async def begin(self, conn: Any, isolation: str | None, read_only: bool) -> Any:
        await conn.execute(_begin_sql(isolation, read_only))
        factory = conn.cursor_factory
        handle = _PsycopgTransaction(factory, _recording_cursor(factory))
        if handle.recording is not None:
            _RECORDERS[conn] = handle
            conn.cursor_factory = handle.recording
        return handle

    async def commit(self, conn: Any, handle: Any) -> bool:
        _stop_recording(conn, handle)
        cur = await conn.execute("COMMIT")
        return bool(cur.statusmessage != _ROLLED_BACK_TAG)

    async def rollback(self, conn: Any, handle: Any) -> None:
        _stop_recording(conn, handle)
        if conn.info.transaction_status != _PQ_IDLE:
            await conn.execute("ROLLBACK")

    def abort_code(self, handle: Any) -> str | None:
        return handle.code if isinstance(handle, _PsycopgTransaction) else None

    def state(self, conn: Any) -> str:
        status = conn.info.transaction_status
        if status == _PQ_IDLE:
            return IDLE
        return ABORTED if status == _PQ_INERROR else OPEN

    async def expire(self) -> None:
        await self.pool.check()

    def backend_pid(self, conn: Any) -> int | None:
        return None if conn.closed else int(conn.info.backend_pid)

    async def backend_alive(self, conn: Any, pid: int, terminate: bool) -> bool:
        sql = (_ALIVE_SQL if not terminate else _TERMINATE_SQL).replace("$1", "%s")
        row = await (await conn.execute(sql, (pid,))).fetchone()
        return bool(row[0])

    def snapshot(self, waiting: int) -> PoolSnapshot:
        stats = self.pool.get_stats()
        return PoolSnapshot(
            int(stats.get("pool_size", 0)),
            int(stats.get("pool_available", 0)),
            int(self.pool.max_size),
            waiting,
        )

    async def close(self) -> None:
        await self.pool.close()


async def reset_psycopg_session(conn: Any) -> None:
    """Give a psycopg connection back a clean session state.

    What ``DISCARD ALL`` does except forgetting prepared statements, which
    belong to psycopg's own statement cache (a server-side ``DEALLOCATE``
    psycopg does not see would break its next prepared query): the session
    user, settings, open cursors, ``LISTEN`` registrations, advisory locks,
    temporary tables and sequence state of the previous user are gone.
    """
    if conn.info.transaction_status != _PQ_IDLE:
        await conn.execute("ROLLBACK")
    if not conn.autocommit:
        await conn.set_autocommit(True)
    await conn.execute(_RESET_SQL)


class _Timeout(Exception):
    """Internal: a driver's acquire timed out."""


def address_of(dsn: str) -> str | None:
    """``host:port/database`` of a PostgreSQL DSN (URL or ``key=value`` form), no credentials.

    ``None`` when the DSN says nothing usable; never raises.
    """
    host: str | None
    port: object
    database: str | None
    try:
        if "://" in dsn:
            parts = urlsplit(dsn)
            host, port = parts.hostname, parts.port
            database = parts.path.lstrip("/") or None
        else:
            pairs = dict(
                item.split("=", 1) for item in dsn.split() if "=" in item and item[0] != "="
            )
            host, port, database = pairs.get("host"), pairs.get("port"), pairs.get("dbname")
    except (ValueError, TypeError):
        return None
    if not host:
        return None
    where = f"{host}:{port}" if port else str(host)
    return f"{where}/{database}" if database else where


def _secrets_of(dsn: str) -> set[str]:
    """The passwords (and other secret parameters) written in ``dsn``, as written and decoded.

    Read by hand, never by a URL parser: a malformed DSN (the case this is
    for) is what makes parsers fail.
    """
    found: list[str] = []
    if "://" in dsn:
        rest = dsn.split("://", 1)[1]
        at = rest.rfind("@")
        if at != -1:
            _, sep, password = rest[:at].partition(":")
            if sep:
                found.append(password)
        pairs = [item.partition("=") for item in rest.partition("?")[2].split("&")]
        found += [value for name, _, value in pairs if is_secret_name(unquote(name))]
    else:
        for name, value in _KEY_VALUE.findall(dsn):
            if is_secret_name(name):
                found.append(value.strip("'"))
    return {text for value in found for text in (value, unquote(value)) if text}


_KEY_VALUE: Final = re.compile(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'?|\S+)")


def _without_secrets(exc: Exception, dsn: str, owner: str) -> Exception | None:
    """A ``ValueError`` to raise instead of ``exc`` when its message quotes a secret of ``dsn``.

    libpq quotes what it could not parse: a whole URI (an unclosed IPv6
    bracket), or the password itself (a ``%`` not percent-encoded).  ``None``
    when the message shows none of it.
    """
    text = str(exc)
    hidden = text
    for secret in sorted(_secrets_of(dsn), key=len, reverse=True):
        hidden = hidden.replace(secret, REDACTED)
    hidden = redact_text(hidden)
    if hidden == text:
        return None
    return ValueError(
        f"{owner}: the driver refused the DSN as malformed "
        f"({type(exc).__name__}: {hidden.strip()})"
    )


def _driver_for(pool: Any) -> _Driver:
    module = type(pool).__module__
    if module.startswith("asyncpg"):
        return _AsyncpgDriver(pool)
    if module.startswith("psycopg_pool"):
        return _PsycopgDriver(pool, resets_itself=False)
    raise TypeError(
        "ManagedPool: expected an asyncpg.Pool or a psycopg_pool.AsyncConnectionPool, "
        f"got {type(pool).__name__}"
    )


class ManagedPool:
    """A driver pool with bounded acquire, health checks and clean returns.

    Build one around an existing pool (``ManagedPool(asyncpg_pool)``) or let
    [`create_asyncpg()`][datapunk_recovery.database.pool.ManagedPool.create_asyncpg] /
    [`create_psycopg()`][datapunk_recovery.database.pool.ManagedPool.create_psycopg] build both.
    Use
    [`connection()`][datapunk_recovery.database.pool.ManagedPool.connection] for a connection that
    is discarded if it fails,
    [`transaction()`][datapunk_recovery.database.pool.ManagedPool.transaction] to run a function in
    a transaction replayed on
    retryable failures, [`run()`][datapunk_recovery.database.pool.ManagedPool.run] for work outside
    a transaction.
    """

    __slots__ = ("_driver", "_expired_at", "_last_ok", "_waiting", "address", "bus", "config")

    def __init__(
        self,
        pool: Any,
        config: PoolConfig | None = None,
        *,
        bus: EventBus | None = None,
        address: str | None = None,
    ) -> None:
        self._driver = pool if isinstance(pool, _Driver) else _driver_for(pool)
        self.config = config if config is not None else PoolConfig()
        if not isinstance(self.config, PoolConfig):
            raise TypeError(f"ManagedPool.config: expected a PoolConfig, got {shown(config)}")
        self.bus = bus if bus is not None else EventBus()
        self._waiting = 0
        self._last_ok = clock.now()
        self._expired_at: float | None = None
        #: Where the server is (``host:port/database``, never credentials), for
        #: messages; ``None`` when the pool was built elsewhere.
        self.address = address

    @classmethod
    def of(cls, pool: Any) -> ManagedPool:
        """``pool`` itself if managed, else a new `ManagedPool` with default settings.

        A driver pool wrapped per call keeps no health-check memory and counts
        no waiters across calls: wrap it once and keep the wrapper for that.
        """
        return pool if isinstance(pool, ManagedPool) else cls(pool)

    @classmethod
    async def create_asyncpg(
        cls, dsn: str, config: PoolConfig | None = None, **pool_kwargs: Any
    ) -> ManagedPool:
        """Create an ``asyncpg`` pool for ``dsn``; other arguments go to ``asyncpg.create_pool``.

        With ``min_size=0`` no connection is opened here: the first use
        connects, so a database that is down does not stop the creation.
        """
        try:
            import asyncpg
        except ImportError as exc:
            raise_missing(exc, "ManagedPool.create_asyncpg", "asyncpg", extra="asyncpg")

        hidden: Exception | None = None
        try:
            pool = await asyncpg.create_pool(dsn, **pool_kwargs)
        except Exception as exc:
            hidden = _without_secrets(exc, dsn, "ManagedPool.create_asyncpg")
            if hidden is None:
                raise
        if hidden is not None:  # raised here: not even __context__ keeps the password
            raise hidden
        return cls(pool, config, address=address_of(dsn))

    @classmethod
    async def create_psycopg(
        cls, dsn: str, config: PoolConfig | None = None, **pool_kwargs: Any
    ) -> ManagedPool:
        """Create and open a ``psycopg_pool.AsyncConnectionPool`` resetting returned connections.

        Connections are in autocommit mode (transactions are begun explicitly).
        One connection is made first, so that a refused login or a server that
        is down raises the driver's own error at once (a refused login: one
        attempt, never retried), before the pool's workers would retry it.
        """
        try:
            from psycopg import AsyncConnection
            from psycopg_pool import AsyncConnectionPool
        except ImportError as exc:
            raise_missing(exc, "ManagedPool.create_psycopg", "psycopg_pool", extra="psycopg")

        kwargs = dict(pool_kwargs.pop("kwargs", None) or {})
        kwargs.setdefault("autocommit", True)
        timeout = (config or PoolConfig()).acquire_timeout
        # One login first, reported as the driver's own error: psycopg_pool
        # would retry a refused login in the background and only say
        # "pool initialization incomplete".
        hidden: Exception | None = None
        try:
            _, probe = await _runtime.call_within(AsyncConnection.connect, (dsn,), kwargs, timeout)
        except Exception as exc:
            hidden = _without_secrets(exc, dsn, "ManagedPool.create_psycopg")
            if hidden is None:
                raise
        if hidden is not None:  # raised here: not even __context__ keeps the password
            raise hidden
        if probe is not None:
            await probe.close()
        pool: Any = AsyncConnectionPool(
            dsn, kwargs=kwargs, reset=reset_psycopg_session, open=False, **pool_kwargs
        )
        try:
            await pool.open(wait=True, timeout=timeout)
        except BaseException:
            # Stop the pool's background reconnection attempts (with a wrong
            # password each one is another failed login).
            with contextlib.suppress(Exception):
                await pool.close()
            raise
        return cls(_PsycopgDriver(pool, resets_itself=True), config, address=address_of(dsn))

    @property
    def driver(self) -> str:
        """``"asyncpg"`` or ``"psycopg"``."""
        return self._driver.kind

    @property
    def adapter(self) -> _Driver:
        """The driver adapter (begin, commit, transaction state) the transaction replay drives."""
        return self._driver

    @property
    def raw(self) -> Any:
        """The driver's own pool."""
        return self._driver.pool

    def snapshot(self) -> PoolSnapshot:
        """Size, idle connections, maximum and waiters now."""
        return self._driver.snapshot(self._waiting)

    def __repr__(self) -> str:
        return f"ManagedPool(name={self.config.name!r}, driver={self.driver!r})"

    async def close(self) -> None:
        """Close the driver's pool."""
        await self._driver.close()

    # -- acquire and return ---------------------------------------------------

    def _report(self, cause: str) -> None:
        s = self._driver.snapshot(self._waiting)
        emit(
            PoolStatus(
                operation=self.config.name,
                at=clock.now(),
                cause=cause,
                size=s.size,
                idle=s.idle,
                max_size=s.max_size,
                waiting=s.waiting,
            ),
            self.bus,
        )

    def _acquire_timeout(self) -> float:
        timeout = self.config.acquire_timeout
        ctx = CURRENT.get()
        if ctx is not None and ctx[0] is not None:
            timeout = min(timeout, max(ctx[0] - clock.now(), 0.0))
        return timeout

    async def acquire(self) -> Any:
        """A working connection, within the acquire timeout; give it back with `release()`."""
        driver = self._driver
        failures = 0
        while True:
            timeout = self._acquire_timeout()
            self._waiting += 1
            try:
                conn = await driver.acquire(timeout)
            except _Timeout:
                if listening(self.bus) and listening(self.bus, PoolStatus):
                    self._report("timed_out")
                s = driver.snapshot(self._waiting - 1)
                where = f" at {self.address}" if self.address else ""
                raise PoolTimeout(
                    f"pool {self.config.name!r}{where}: no connection within {timeout:.3f} s "
                    f"({s.size} of {s.max_size} open, {s.idle} idle, {s.waiting} other waiters)",
                    context={"pool": self.config.name, "address": self.address},
                ) from None
            except Exception as exc:
                replacement = self._unavailable(exc)
                if replacement is exc:
                    raise
                raise replacement from exc
            finally:
                self._waiting -= 1
            idle_limit = self.config.ping_after_idle
            if idle_limit is None or clock.now() - self._last_ok <= idle_limit:
                break
            try:
                await driver.ping(conn)
            except Exception as exc:
                # A quiet pool whose server restarted: drop this one and every
                # other stale connection, then try a fresh one.
                await self.discard(conn, exc)
                failures += 1
                if failures >= _MAX_PING_FAILURES:
                    # Reported as a failed acquire is: classified, redacted, the cause kept.
                    replacement = self._unavailable(exc, "failed its health check")
                    if replacement is exc:
                        raise
                    raise replacement from exc
                continue
            except BaseException:
                await self.discard(conn, None)
                raise
            self._last_ok = clock.now()
            break
        if listening(self.bus) and listening(self.bus, PoolStatus):
            self._report("acquired")
        return conn

    def _unavailable(self, exc: Exception, failed: str = "could not be reached") -> Exception:
        """A connection could not be made (or ``failed``): name the pool and the address.

        Only connection and authentication failures are renamed; anything else
        (a bug, a driver misuse) is raised as itself.  The cause is kept.
        """
        verdict = classify_database(exc)
        if verdict.kind not in (DbErrorKind.CONNECTION, DbErrorKind.AUTH):
            return exc
        auth = verdict.kind is DbErrorKind.AUTH
        where = f" at {self.address}" if self.address else ""
        what = "refused the login" if auth else failed
        return DatabaseUnavailable(
            f"database {self.config.name!r}{where} {what} ({describe(exc)}"
            + ("; not retried: another try is another failed login)" if auth else ")"),
            category=ErrorCategory.AUTH if auth else ErrorCategory.NETWORK,
            retryable=verdict.retryable,
            context={"pool": self.config.name, "address": self.address},
        )

    async def release(self, conn: Any) -> None:
        """Give back a connection that worked: it is reset, then pooled again.

        Never raises for a connection failure: work that succeeded must not
        look failed (and be replayed) because its connection died afterwards.
        """
        if self._driver.is_broken(conn):
            await self.discard(conn, None)
            return
        self._last_ok = clock.now()
        try:
            await self._driver.release(conn)
        except Exception as exc:
            # The reset on the way back failed (the server went away just
            # after the work succeeded): the work stands, the connection goes.
            await self.discard(conn, exc)
            return
        if listening(self.bus) and listening(self.bus, PoolStatus):
            self._report("released")

    async def discard(self, conn: Any, error: BaseException | None) -> None:
        """Close ``conn`` and drop it from the pool; after a connection failure, expire the rest."""
        driver = self._driver
        # Closing a dead connection may itself fail: it is gone either way.
        with contextlib.suppress(Exception):
            await driver.discard(conn)
        if listening(self.bus):
            emit(
                ConnectionDiscarded(
                    operation=self.config.name,
                    at=clock.now(),
                    error_type=type(error).__name__ if error is not None else "broken",
                ),
                self.bus,
            )
            self._report("discarded")
        if error is not None and classify_database(error).kind is DbErrorKind.CONNECTION:
            await self._expire()

    async def _expire(self) -> None:
        now = clock.now()
        if self._expired_at is not None and now - self._expired_at < _EXPIRE_INTERVAL:
            return
        self._expired_at = now
        # The server may still be down: the next acquire finds out.
        with contextlib.suppress(Exception):
            await self._driver.expire()

    async def settle(self, conn: Any, error: BaseException | None, handle: Any = None) -> None:
        """Return ``conn`` after its work ended: released if clean, else rolled back or discarded.

        ``error`` is what ended the work (``None``: it succeeded).  A
        connection is discarded when it broke, when the server did not answer
        the error itself (a lost socket, a timeout) or on cancellation; after a
        server-reported error it is rolled back (if ``handle`` or a
        transaction is open) and pooled again.
        """
        driver = self._driver
        if error is None:
            await self.release(conn)
            return
        if not isinstance(error, Exception) or driver.is_broken(conn):
            await self.discard(conn, error)
            return
        verdict = classify_database(error)
        if not verdict.definite:
            await self.discard(conn, error)
            return
        try:
            await driver.rollback(conn, handle)
        except Exception as exc:
            await self.discard(conn, exc)
            return
        await self.release(conn)  # reset on the way back, or discarded if that fails

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """``async with pool.connection() as conn:`` a connection, discarded if it fails.

        No retry here: use
        [`transaction()`][datapunk_recovery.database.pool.ManagedPool.transaction] or
        [`run()`][datapunk_recovery.database.pool.ManagedPool.run] for that.  A
        block that leaves a transaction open raises
        [`TransactionRolledBack`][datapunk_recovery.database.errors.TransactionRolledBack]:
        giving the connection back rolls that transaction back, so its work
        must not look done.
        """
        conn = await self.acquire()
        try:
            yield conn
        except BaseException as exc:
            await self.settle(conn, exc)
            raise
        if not self._driver.is_broken(conn) and self._driver.state(conn) != IDLE:
            left_open = TransactionRolledBack(
                f"pool {self.config.name!r}: a connection came back with a transaction "
                "still open; it was rolled back and nothing of it was committed",
                operation=self.config.name,
            )
            await self.settle(conn, left_open)
            raise left_open
        await self.release(conn)

    # -- recovering work (see datapunk_recovery.database.transaction) ----------

    async def transaction(
        self,
        fn: Callable[[Any], Awaitable[T]],
        *,
        config: TransactionConfig | None = None,
        idempotency_check: IdempotencyCheck | None = None,
        name: str | None = None,
    ) -> T:
        """Run ``fn(conn)`` in a transaction, replayed from the start on a retryable failure."""
        return await replay_transaction(self, fn, config, idempotency_check, name)

    async def run(
        self,
        fn: Callable[[Any], Awaitable[T]],
        *,
        idempotent: bool = False,
        config: TransactionConfig | None = None,
        name: str | None = None,
    ) -> T:
        """Run ``fn(conn)`` outside a transaction; retried after it started only if idempotent."""
        return await replay_run(self, fn, idempotent, config, name)
