"""SQLite transactions replayed on ``SQLITE_BUSY`` / ``SQLITE_LOCKED``, off the event loop.

SQLite allows one writer at a time; a second writer waits up to its busy
timeout and then fails with ``database is locked``.
[`SqliteDatabase`][datapunk_recovery.database.sqlite.SqliteDatabase]
keeps that wait short (``busy_timeout``) and lets the retry engine replay the
whole transaction with jittered backoff instead, so that many writers take
turns rather than time out together.

Each attempt opens its own connection in a worker thread (``sqlite3`` blocks),
begins the transaction explicitly (``BEGIN IMMEDIATE`` by default: the write
lock is taken up front, so a busy database fails at ``BEGIN``, before any work
is done), runs ``fn(conn)``, commits and closes.  A failed ``COMMIT`` in
SQLite leaves nothing committed, so commits are never in doubt here.  A
transaction SQLite ended under ``fn`` (``SQLITE_FULL``, ``INSERT OR
ROLLBACK``, a ``ROLLBACK`` by ``fn``) raises
[`TransactionRolledBack`][datapunk_recovery.database.errors.TransactionRolledBack], never
replayed, instead of returning what ``fn`` returned; an error after ``fn``
ended the transaction itself is raised marked final (a replay would repeat
what it committed).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, TypeVar

from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.errors import mark_final
from datapunk_recovery._core.policy import RetryGate, RetryPolicy
from datapunk_recovery._core.redact import redact_url
from datapunk_recovery._core.validate import check_choice, check_seconds, shown
from datapunk_recovery._execution.engine import retry
from datapunk_recovery._execution.runtime import run_in_thread

from ._replay import _ENDED_BY_FN, IDLE, _not_committed, check_gate, replayable
from .errors import DbErrorKind, MissingExtensionError, classify_database, explain_missing

__all__ = ["BeginMode", "SqliteConfig", "SqliteDatabase"]

T = TypeVar("T")

_OWNER: Final = "SqliteConfig"
_DEFAULT_RETRY: Final = RetryConfig(max_attempts=10, base_delay=0.005, max_delay=0.5)


class BeginMode(StrEnum):
    """When SQLite takes the write lock: at the first write, at BEGIN, or exclusively."""

    DEFERRED = "deferred"
    IMMEDIATE = "immediate"
    EXCLUSIVE = "exclusive"


@dataclass(frozen=True, slots=True)
class SqliteConfig:
    """``busy_timeout``: seconds SQLite itself waits for a lock before failing with busy;
    ``begin``: the [`BeginMode`][datapunk_recovery.database.sqlite.BeginMode]; ``retry``: how busy
    transactions are replayed
    (default: 10 attempts, 5 ms to 0.5 s full jitter); ``budget``: a retry
    budget asked before every replay (``None``: no budget).
    """

    busy_timeout: float = 0.05
    begin: BeginMode = BeginMode.IMMEDIATE
    retry: RetryPolicy | RetryConfig = field(default_factory=lambda: _DEFAULT_RETRY)
    budget: RetryGate | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "busy_timeout", check_seconds(_OWNER, "busy_timeout", self.busy_timeout)
        )
        object.__setattr__(self, "begin", check_choice(_OWNER, "begin", self.begin, BeginMode))
        object.__setattr__(self, "retry", RetryPolicy.of(self.retry, where=f"{_OWNER}.retry"))
        check_gate(_OWNER, self.budget)


class SqliteDatabase:
    """A SQLite file whose transactions are replayed when the database is busy.

    ``path`` is the database file (or a ``file:`` URI with ``uri=True``).
    """

    __slots__ = ("_async", "_sync", "config", "path", "uri")

    def __init__(self, path: str, config: SqliteConfig | None = None, *, uri: bool = False):
        self.path = path
        self.uri = uri
        self.config = config if config is not None else SqliteConfig()
        if not isinstance(self.config, SqliteConfig):
            raise TypeError(f"SqliteDatabase.config: expected a SqliteConfig, got {shown(config)}")
        policy = self.config.retry
        name = "sqlite.transaction"
        budget = self.config.budget
        self._sync = retry(policy, on=replayable, name=name, budget=budget)(self._attempt)
        self._async = retry(policy, on=replayable, name=name, budget=budget)(self._attempt_async)

    def __repr__(self) -> str:
        # A URI may carry an encryption key (``file:x.db?key=...``).
        return f"SqliteDatabase({redact_url(self.path)!r})"

    def connect(self) -> sqlite3.Connection:
        """A new connection in autocommit mode (transactions are begun explicitly)."""
        return sqlite3.connect(
            self.path,
            timeout=self.config.busy_timeout,
            isolation_level=None,
            uri=self.uri,
            check_same_thread=False,
        )

    def _attempt(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self.connect()
        began = False
        try:
            conn.execute(f"BEGIN {self.config.begin.value.upper()}")
            began = True
            result = fn(conn)
            if not conn.in_transaction:
                # SQLite ended the transaction under fn (SQLITE_FULL, INSERT OR
                # ROLLBACK, a ROLLBACK or COMMIT by fn): nothing to acknowledge.
                raise _not_committed("sqlite.transaction", IDLE, None)
            conn.execute("COMMIT")
            return result
        except Exception as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # it is closed next anyway
                    conn.execute("ROLLBACK")
            elif began:
                # fn ended the transaction itself (COMMIT or ROLLBACK) before
                # failing: what it committed stays, a replay would repeat it.
                mark_final(exc, _ENDED_BY_FN)
            if classify_database(exc).kind is DbErrorKind.MISSING and not isinstance(
                exc, MissingExtensionError
            ):
                raise explain_missing(exc) from exc
            raise
        finally:
            conn.close()

    async def _attempt_async(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await run_in_thread(self._attempt, fn)

    def transaction_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in a transaction in this thread, replayed while the database is busy."""
        result: T = self._sync(fn)
        return result

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run the blocking ``fn(conn)`` in a transaction in a worker thread; replayed if busy."""
        result: T = await self._async(fn)
        return result
