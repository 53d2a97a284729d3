"""Database recovery: classified errors, replayed transactions, pools that heal.

- [`errors`][datapunk_recovery.database.errors]: what a failure of asyncpg, psycopg 3 or sqlite3
  means
  (SQLSTATE classes) and the library's own database errors;
- [`transaction`][datapunk_recovery.database.transaction]: `transaction()` (replayed whole) and
  [`run()`][datapunk_recovery.database.transaction.run]
  (statements, retried after they started only when idempotent), with
  [`CommitOutcomeUnknown`][datapunk_recovery.database.errors.CommitOutcomeUnknown] and idempotency
  checks, and
  [`TransactionRolledBack`][datapunk_recovery.database.errors.TransactionRolledBack] for a
  transaction that did not commit;
- [`pool`][datapunk_recovery.database.pool]:
  [`ManagedPool`][datapunk_recovery.database.pool.ManagedPool] for ``asyncpg.Pool`` and
  ``psycopg_pool.AsyncConnectionPool``;
- [`sqlite`][datapunk_recovery.database.sqlite]:
  [`SqliteDatabase`][datapunk_recovery.database.sqlite.SqliteDatabase], replayed on busy, off the
  event loop.

Importing this package teaches
[`datapunk_recovery._core.errors.classify()`][datapunk_recovery._core.errors.classify]
about database errors (see [`database_rule()`][datapunk_recovery.database.errors.database_rule]), so
per-category retry
policies work on them.
"""

from datapunk_recovery._core.errors import register_rule
from datapunk_recovery._execution.runtime import run_in_thread

from .errors import (
    CommitOutcomeUnknown,
    ConnectionLost,
    DatabaseError,
    DatabaseUnavailable,
    DbErrorKind,
    DbVerdict,
    MissingExtensionError,
    PoolTimeout,
    TransactionRolledBack,
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
    "DatabaseUnavailable",
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
    "TransactionRolledBack",
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
