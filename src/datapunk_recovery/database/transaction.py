"""Transactions replayed from the start, statements retried only when safe.

[`transaction()`][datapunk_recovery.database.transaction.transaction] runs ``fn(conn)`` between
``BEGIN`` and ``COMMIT`` and,
on a failure that another attempt can cure (serialization failure,
deadlock, a lost connection, a server out of connections), rolls back or
discards the connection and runs the *whole* function again on a fresh
connection.  ``fn`` must therefore do all of its database work through
``conn`` and keep no side effects outside the database before it returns.

A transaction is acknowledged only once it committed.  PostgreSQL aborts a
transaction at its first error, and when ``fn`` catches that error and
returns, ``COMMIT`` answers ``ROLLBACK`` without raising: that (and a
transaction ``fn`` ended itself) raises
[`TransactionRolledBack`][datapunk_recovery.database.errors.TransactionRolledBack],
never replayed, instead of returning what ``fn`` returned.  An error raised
after ``fn`` ended the transaction itself (a ``COMMIT`` on ``conn``) is
raised marked final, never replayed: a replay would commit that work again.

The one failure never replayed blindly is a connection lost while ``COMMIT``
was in flight: the server may have committed before the answer was lost.
Without an idempotency check that raises
[`CommitOutcomeUnknown`][datapunk_recovery.database.errors.CommitOutcomeUnknown]; with
one (``idempotency_check(conn) -> bool``, run on a fresh connection, true
when the work is already there) the recovery waits until the server process
that received the COMMIT has ended (so the COMMIT cannot land after the
check), looks, returns the result if the work committed, and replays only if
it did not.

[`run()`][datapunk_recovery.database.transaction.run] runs ``fn(conn)`` outside a transaction, where
each statement
commits on its own.  Failures that happen before ``fn`` starts (no
connection, a full server) are retried as usual.  Once ``fn`` has started,
only work the caller marks idempotent is retried: even an error the server
reported (a deadlock) may come after earlier statements of ``fn`` committed,
which a replay would repeat.  Without the mark, such an error is raised
marked final ([`mark_final()`][datapunk_recovery._core.errors.mark_final]: no outer layer
retries it either), and a connection lost while a statement was in flight
becomes [`CommitOutcomeUnknown`][datapunk_recovery.database.errors.CommitOutcomeUnknown].
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

# The replay itself lives in ``_replay`` (shared with ``ManagedPool``); this
# module is its public face and where users import these names from.
from ._replay import (
    DEFAULT_POLICY,
    CommitUncertain,
    IdempotencyCheck,
    Isolation,
    TransactionConfig,
    replay_run,
    replay_transaction,
    replayable,
)
from .pool import ManagedPool

__all__ = [
    "DEFAULT_POLICY",
    "CommitUncertain",
    "IdempotencyCheck",
    "Isolation",
    "TransactionConfig",
    "replayable",
    "run",
    "transaction",
]

T = TypeVar("T")


async def transaction(
    pool: Any,
    fn: Callable[[Any], Awaitable[T]],
    *,
    config: TransactionConfig | None = None,
    idempotency_check: IdempotencyCheck | None = None,
    name: str | None = None,
) -> T:
    """Run ``fn(conn)`` in a transaction on ``pool``, replayed whole on a retryable failure.

    ``pool`` is a [`ManagedPool`][datapunk_recovery.database.pool.ManagedPool], an ``asyncpg.Pool``
    or a
    ``psycopg_pool.AsyncConnectionPool``.  Returns what ``fn`` returned.
    Raises the last error when attempts run out;
    [`TransactionRolledBack`][datapunk_recovery.database.errors.TransactionRolledBack]
    (never replayed) when the transaction did not commit although ``fn``
    returned (it swallowed an error that aborted it, or ended it itself);
    [`CommitOutcomeUnknown`][datapunk_recovery.database.errors.CommitOutcomeUnknown]
    when COMMIT's answer was lost and ``idempotency_check`` was not given (or
    failed); [`MissingExtensionError`][datapunk_recovery.database.errors.MissingExtensionError]
    (from the driver's error) when a
    function, type or extension is missing.
    """
    return await replay_transaction(ManagedPool.of(pool), fn, config, idempotency_check, name)


async def run(
    pool: Any,
    fn: Callable[[Any], Awaitable[T]],
    *,
    idempotent: bool = False,
    config: TransactionConfig | None = None,
    name: str | None = None,
) -> T:
    """Run ``fn(conn)`` outside a transaction (each statement commits alone).

    Failures before ``fn`` starts (no connection, a full server) are retried
    either way.  A failure once ``fn`` has started is retried only with
    ``idempotent=True``: otherwise a connection lost mid-statement raises
    [`CommitOutcomeUnknown`][datapunk_recovery.database.errors.CommitOutcomeUnknown], and any other
    error (even a deadlock the
    server reported, which may follow statements of ``fn`` that committed) is
    raised as itself, marked final so no outer layer replays it either.
    ``fn`` returning with a transaction of its own still open raises
    [`TransactionRolledBack`][datapunk_recovery.database.errors.TransactionRolledBack] (giving the
    connection back rolls it back).
    ``config.isolation`` and ``read_only`` do not apply here.
    """
    return await replay_run(ManagedPool.of(pool), fn, idempotent, config, name)
