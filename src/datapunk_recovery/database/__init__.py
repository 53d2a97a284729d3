"""Database recovery: classified errors, replayed transactions, pools that heal.

- :mod:`.errors`: what a failure of asyncpg, psycopg 3 or sqlite3 means
  (SQLSTATE classes) and the library's own database errors;
- :mod:`.transaction`: :func:`transaction` (replayed whole) and :func:`run`
  (statements, retried after they started only when idempotent), with
  :class:`CommitOutcomeUnknown` and idempotency checks;
- :mod:`.pool`: :class:`ManagedPool` for ``asyncpg.Pool`` and
  ``psycopg_pool.AsyncConnectionPool``;
- :mod:`.sqlite`: :class:`SqliteDatabase`, replayed on busy, off the event loop.

Importing this package teaches :func:`datapunk_recovery.errors.classify`
about database errors (see :func:`database_rule`), so per-category retry
policies work on them.
"""

from datapunk_recovery._runtime import run_in_thread
from datapunk_recovery.errors import register_rule

from .errors import (
    CommitOutcomeUnknown,
    ConnectionLost,
    DatabaseError,
    DbErrorKind,
    DbVerdict,
    MissingExtensionError,
    PoolTimeout,
    classify_database,
    database_rule,
    explain_missing,
    sqlstate_of,
)
from .pool import (
    ConnectionDiscarded,
    ManagedPool,
    PoolConfig,
    PoolSnapshot,
    PoolStatus,
    reset_psycopg_session,
)
from .sqlite import BeginMode, SqliteConfig, SqliteDatabase
from .transaction import (
    DEFAULT_POLICY,
    CommitUncertain,
    IdempotencyCheck,
    Isolation,
    TransactionConfig,
    replayable,
    run,
    transaction,
)

register_rule(database_rule)

__all__ = [
    "DEFAULT_POLICY",
    "BeginMode",
    "CommitOutcomeUnknown",
    "CommitUncertain",
    "ConnectionDiscarded",
    "ConnectionLost",
    "DatabaseError",
    "DbErrorKind",
    "DbVerdict",
    "IdempotencyCheck",
    "Isolation",
    "ManagedPool",
    "MissingExtensionError",
    "PoolConfig",
    "PoolSnapshot",
    "PoolStatus",
    "PoolTimeout",
    "SqliteConfig",
    "SqliteDatabase",
    "TransactionConfig",
    "classify_database",
    "database_rule",
    "explain_missing",
    "replayable",
    "reset_psycopg_session",
    "run",
    "run_in_thread",
    "sqlstate_of",
    "transaction",
]
