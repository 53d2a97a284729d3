"""Pools that hand out only working connections and take back only clean ones.

:class:`ManagedPool` wraps an ``asyncpg.Pool`` or a
``psycopg_pool.AsyncConnectionPool`` and adds what recovering from a failed
database needs:

- **bounded acquire**: no wait for a connection lasts longer than
  ``PoolConfig.acquire_timeout`` (nor past the overall deadline); running out
  raises :class:`~datapunk_recovery.database.errors.PoolTimeout`, a
  ``RESOURCE`` error that per-category policies back off harder on;
- **health checks**: when the pool has been quiet for ``ping_after_idle``
  seconds, the next connection is pinged before it is handed out, so a
  server that restarted during the quiet time costs a reconnect, not a failed
  query;
- **connection reset**: a connection that failed in a way that leaves it in
  doubt (a lost socket, a timeout, a cancellation) is closed and discarded,
  never returned; every connection going back is reset to a clean session
  state (asyncpg's pool runs ``RESET ALL``, ``UNLISTEN *``, unlocks advisory
  locks and closes cursors; psycopg connections get the same and lose their temporary tables);
- **server restarts**: the first connection failure expires every pooled
  connection, so the pool recovers without a process restart;
- **metrics**: size, idle connections and waiters are reported as
  :class:`PoolStatus` events, discards as :class:`ConnectionDiscarded`.

Drivers are imported lazily, and only by the factory that needs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

from datapunk_recovery import clock
from datapunk_recovery._context import CURRENT
from datapunk_recovery._validate import check_seconds
from datapunk_recovery.events import Event, EventBus, emit, listening

from .errors import DbErrorKind, PoolTimeout, classify_database

if TYPE_CHECKING:
    from .transaction import IdempotencyCheck, TransactionConfig

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


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """How a :class:`ManagedPool` acquires and checks connections.

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
            raise ValueError(f"{_OWNER}.name: expected a non-empty string, got {self.name!r}")


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

    async def commit(self, conn: Any, handle: Any) -> None:
        raise NotImplementedError

    async def rollback(self, conn: Any, handle: Any) -> None:
        raise NotImplementedError

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
        tr = conn.transaction(isolation=isolation, readonly=read_only)
        await tr.start()
        return tr

    async def commit(self, conn: Any, handle: Any) -> None:
        await handle.commit()

    async def rollback(self, conn: Any, handle: Any) -> None:
        # Without a transaction handle the pool's reset rolls back on release.
        if handle is not None:
            await handle.rollback()

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


class _PsycopgDriver(_Driver):
    kind = "psycopg"

    def __init__(self, pool: Any, *, resets_itself: bool) -> None:
        super().__init__(pool)
        # A pool we built runs reset_psycopg_session itself on every return.
        self.resets_itself = resets_itself

    async def acquire(self, timeout: float) -> Any:
        from psycopg_pool import PoolTimeout as DriverPoolTimeout

        try:
            conn = await self.pool.getconn(timeout=timeout)
        except DriverPoolTimeout:
            raise _Timeout from None
        if not conn.autocommit:
            # Transactions are begun explicitly; statements outside one commit alone.
            await conn.set_autocommit(True)
        return conn

    async def release(self, conn: Any) -> None:
        if not self.resets_itself:
            try:
                await reset_psycopg_session(conn)
            except Exception:
                await self.discard(conn)
                return
        await self.pool.putconn(conn)

    async def discard(self, conn: Any) -> None:
        await conn.close()
        await self.pool.putconn(conn)  # the pool drops a closed connection

    def is_broken(self, conn: Any) -> bool:
        return bool(conn.broken or conn.closed)

    async def ping(self, conn: Any) -> None:
        await conn.execute("SELECT 1")

    async def begin(self, conn: Any, isolation: str | None, read_only: bool) -> Any:
        await conn.execute(_begin_sql(isolation, read_only))
        return None

    async def commit(self, conn: Any, handle: Any) -> None:
        await conn.execute("COMMIT")

    async def rollback(self, conn: Any, handle: Any) -> None:
        if conn.info.transaction_status != _PQ_IDLE:
            await conn.execute("ROLLBACK")

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
    :meth:`create_asyncpg` / :meth:`create_psycopg` build both.  Use
    :meth:`connection` for a connection that is discarded if it fails,
    :meth:`transaction` to run a function in a transaction replayed on
    retryable failures, :meth:`run` for work outside a transaction.
    """

    __slots__ = ("_driver", "_expired_at", "_last_ok", "_waiting", "bus", "config")

    def __init__(
        self, pool: Any, config: PoolConfig | None = None, *, bus: EventBus | None = None
    ) -> None:
        self._driver = pool if isinstance(pool, _Driver) else _driver_for(pool)
        self.config = config if config is not None else PoolConfig()
        if not isinstance(self.config, PoolConfig):
            raise TypeError(f"ManagedPool.config: expected a PoolConfig, got {config!r}")
        self.bus = bus if bus is not None else EventBus()
        self._waiting = 0
        self._last_ok = clock.now()
        self._expired_at: float | None = None

    @classmethod
    def of(cls, pool: Any) -> ManagedPool:
        """``pool`` itself if managed, else a new :class:`ManagedPool` with default settings.

        A driver pool wrapped per call keeps no health-check memory and counts
        no waiters across calls: wrap it once and keep the wrapper for that.
        """
        return pool if isinstance(pool, ManagedPool) else cls(pool)

    @classmethod
    async def create_asyncpg(
        cls, dsn: str, config: PoolConfig | None = None, **pool_kwargs: Any
    ) -> ManagedPool:
        """Create an ``asyncpg`` pool for ``dsn``; other arguments go to ``asyncpg.create_pool``."""
        import asyncpg

        pool = await asyncpg.create_pool(dsn, **pool_kwargs)
        return cls(pool, config)

    @classmethod
    async def create_psycopg(
        cls, dsn: str, config: PoolConfig | None = None, **pool_kwargs: Any
    ) -> ManagedPool:
        """Create and open a ``psycopg_pool.AsyncConnectionPool`` resetting returned connections.

        Connections are in autocommit mode (transactions are begun explicitly).
        """
        from psycopg_pool import AsyncConnectionPool

        kwargs = dict(pool_kwargs.pop("kwargs", None) or {})
        kwargs.setdefault("autocommit", True)
        pool: Any = AsyncConnectionPool(
            dsn, kwargs=kwargs, reset=reset_psycopg_session, open=False, **pool_kwargs
        )
        await pool.open(wait=True, timeout=(config or PoolConfig()).acquire_timeout)
        return cls(_PsycopgDriver(pool, resets_itself=True), config)

    @property
    def driver(self) -> str:
        """``"asyncpg"`` or ``"psycopg"``."""
        return self._driver.kind

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
        """A working connection, within the acquire timeout; give it back with :meth:`release`."""
        driver = self._driver
        failures = 0
        while True:
            timeout = self._acquire_timeout()
            self._waiting += 1
            try:
                conn = await driver.acquire(timeout)
            except _Timeout:
                if listening(self.bus):
                    self._report("timed_out")
                s = driver.snapshot(self._waiting - 1)
                raise PoolTimeout(
                    f"pool {self.config.name!r}: no connection within {timeout:.3f} s "
                    f"({s.size} of {s.max_size} open, {s.idle} idle, {s.waiting} other waiters)",
                    context={"pool": self.config.name},
                ) from None
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
                    raise
                continue
            except BaseException:
                await self.discard(conn, None)
                raise
            self._last_ok = clock.now()
            break
        if listening(self.bus):
            self._report("acquired")
        return conn

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
        if listening(self.bus):
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

        No retry here: use :meth:`transaction` or :meth:`run` for that.
        """
        conn = await self.acquire()
        try:
            yield conn
        except BaseException as exc:
            await self.settle(conn, exc)
            raise
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
        from .transaction import transaction

        return await transaction(
            self, fn, config=config, idempotency_check=idempotency_check, name=name
        )

    async def run(
        self,
        fn: Callable[[Any], Awaitable[T]],
        *,
        idempotent: bool = False,
        config: TransactionConfig | None = None,
        name: str | None = None,
    ) -> T:
        """Run ``fn(conn)`` outside a transaction; retried after it started only if idempotent."""
        from .transaction import run

        return await run(self, fn, idempotent=idempotent, config=config, name=name)
