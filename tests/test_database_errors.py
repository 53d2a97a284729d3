"""Database error classification: what each failure means, without a server.

Driver errors are built from the drivers' own exception classes (asyncpg and
psycopg map SQLSTATEs to classes), so these tests read like the table in
``datapunk_recovery.database.errors``.
"""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
import psycopg
import pytest

from datapunk_recovery._core.errors import ErrorCategory, classify
from datapunk_recovery.database import (
    CommitOutcomeUnknown,
    ConnectionLost,
    DbErrorKind,
    MissingExtensionError,
    PoolTimeout,
    classify_database,
    database_rule,
    explain_missing,
    replayable,
    sqlstate_of,
)


def _psycopg(state: str) -> Exception:
    cls = psycopg.errors.lookup(state)
    return cls("boom")


def _sqlite(code: int, name: str, message: str) -> sqlite3.Error:
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorcode = code
    exc.sqlite_errorname = name
    return exc


@pytest.mark.parametrize(
    ("state", "kind", "retryable"),
    [
        ("40001", DbErrorKind.CONFLICT, True),  # serialization_failure: replay the transaction
        ("40P01", DbErrorKind.CONFLICT, True),  # deadlock_detected
        ("08006", DbErrorKind.CONNECTION, True),  # connection_failure
        ("57P01", DbErrorKind.CONNECTION, True),  # admin_shutdown
        ("57P02", DbErrorKind.CONNECTION, True),  # crash_shutdown
        ("57P03", DbErrorKind.CONNECTION, True),  # cannot_connect_now
        ("53300", DbErrorKind.RESOURCE, True),  # too_many_connections: back off harder
        ("53200", DbErrorKind.RESOURCE, True),  # out_of_memory
        ("42883", DbErrorKind.MISSING, False),  # undefined_function
        ("58P01", DbErrorKind.MISSING, False),  # undefined_file (an extension's library)
        ("0A000", DbErrorKind.MISSING, False),  # feature_not_supported
        ("42501", DbErrorKind.AUTH, False),  # insufficient_privilege: authorization
        ("28P01", DbErrorKind.AUTH, False),  # invalid_password: another try is another login
        ("28000", DbErrorKind.AUTH, False),  # invalid_authorization_specification
        ("23505", DbErrorKind.FATAL, False),  # unique_violation
        ("22012", DbErrorKind.FATAL, False),  # division_by_zero
        ("42601", DbErrorKind.FATAL, False),  # syntax_error
    ],
)
def test_sqlstates_name_their_cure_for_both_drivers(
    state: str, kind: DbErrorKind, retryable: bool
) -> None:
    for exc in (_psycopg(state), asyncpg.PostgresError.new({"C": state, "M": "boom"})):
        verdict = classify_database(exc)
        assert (verdict.kind, verdict.retryable, verdict.code) == (kind, retryable, state)
        assert sqlstate_of(exc) == state


def test_too_many_connections_is_a_resource_error_for_per_category_policies() -> None:
    exc = asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already")
    assert classify(exc).category is ErrorCategory.RESOURCE
    assert classify(exc).retryable
    assert classify(PoolTimeout("no connection")).category is ErrorCategory.RESOURCE


def test_client_side_connection_losses_leave_the_outcome_unknown() -> None:
    lost = asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle")
    verdict = classify_database(lost)
    assert verdict.kind is DbErrorKind.CONNECTION
    assert not verdict.definite  # the client noticed: the server said nothing
    closed = asyncpg.exceptions.InterfaceError("the underlying connection is closed")
    assert classify_database(closed).kind is DbErrorKind.CONNECTION
    dropped = psycopg.OperationalError("consuming input failed: server closed the connection")
    assert classify_database(dropped).kind is DbErrorKind.CONNECTION
    for exc in (ConnectionResetError(), TimeoutError(), TimeoutError()):
        verdict = classify_database(exc)
        assert verdict.kind is DbErrorKind.CONNECTION and not verdict.definite


def test_only_errors_that_rolled_the_statement_back_are_definite() -> None:
    assert classify_database(_psycopg("40001")).definite
    assert classify_database(_psycopg("23505")).definite
    # "terminating connection" may follow a COMMIT that went through.
    assert not classify_database(_psycopg("57P01")).definite


def test_sqlite_busy_and_locked_are_conflicts_replayed() -> None:
    busy = _sqlite(sqlite3.SQLITE_BUSY, "SQLITE_BUSY", "database is locked")
    locked = _sqlite(sqlite3.SQLITE_LOCKED, "SQLITE_LOCKED", "database table is locked")
    extended = _sqlite(sqlite3.SQLITE_BUSY | (2 << 8), "SQLITE_BUSY_SNAPSHOT", "busy")
    for exc in (busy, locked, extended):
        assert classify_database(exc).kind is DbErrorKind.CONFLICT
        assert classify(exc).retryable
    integrity = sqlite3.IntegrityError("UNIQUE constraint failed")
    assert classify_database(integrity).kind is DbErrorKind.FATAL
    missing = _sqlite(1, "SQLITE_ERROR", "no such function: gen_random_bytes")
    assert classify_database(missing).kind is DbErrorKind.MISSING


def test_errors_of_no_database_are_left_to_the_core_classifier() -> None:
    assert classify_database(ValueError("x")).kind is DbErrorKind.NOT_DATABASE
    assert database_rule(ValueError("x")) is None
    assert not replayable(ValueError("x"))
    assert replayable(ConnectionResetError())


def test_cancellation_is_never_a_database_error() -> None:
    for exc in (asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(), GeneratorExit()):
        verdict = classify_database(exc)
        assert verdict.kind is DbErrorKind.NOT_DATABASE and not verdict.retryable
        assert not replayable(exc)


def test_the_librarys_own_errors() -> None:
    unknown = CommitOutcomeUnknown("lost")
    assert not replayable(unknown)
    assert unknown.do_not_retry_above  # no outer layer may replay it either
    assert replayable(ConnectionLost("lost before commit"))
    assert replayable(PoolTimeout("busy"))


@pytest.mark.parametrize(
    ("message", "what", "extension"),
    [
        (
            "function gen_random_bytes(integer) does not exist",
            "function gen_random_bytes(integer)",
            "pgcrypto",
        ),
        (
            "function public.st_distance(geometry, geometry) does not exist",
            "function public.st_distance(geometry, geometry)",
            "postgis",
        ),
        ('type "vector" does not exist', "type vector", "vector (pgvector)"),
        ("function no_such_thing() does not exist", "function no_such_thing()", None),
    ],
)
def test_missing_functions_and_types_name_their_extension(
    message: str, what: str, extension: str | None
) -> None:
    error = explain_missing(asyncpg.PostgresError.new({"C": "42883", "M": message}))
    assert isinstance(error, MissingExtensionError)
    assert (error.what, error.extension, error.code) == (what, extension, "42883")
    assert what in str(error)
    if extension is not None:
        assert extension in str(error)
    assert not replayable(error)


def test_missing_extension_package_is_explained() -> None:
    message = 'extension "nonexistent_ext" is not available'
    error = explain_missing(asyncpg.PostgresError.new({"C": "0A000", "M": message}))
    assert error.extension == "nonexistent_ext"
    assert "install its package" in str(error)


def test_explanations_never_carry_a_password() -> None:
    secret = "postgresql://app:s3cr3t-pw@db:5432/app"
    exc = asyncpg.PostgresError.new({"C": "42883", "M": f"function f({secret}) does not exist"})
    assert "s3cr3t-pw" not in str(explain_missing(exc))


@pytest.mark.parametrize(
    "message",
    [
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        'FATAL:  password authentication failed for user "app"',
        'connection failed: connection to server at "10.0.0.1", port 5432 failed: FATAL:  '
        'no pg_hba.conf entry for host "10.0.0.9", user "app", database "app", no encryption',
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        'FATAL:  role "nobody" does not exist',
        "connection failed: fe_sendauth: no password supplied",
    ],
)
def test_psycopg_login_refusals_without_sqlstate_are_never_retried(message: str) -> None:
    """psycopg raises a bare OperationalError (no SQLSTATE) for a refused login."""
    refused = psycopg.OperationalError(message)
    verdict = classify_database(refused)
    assert (verdict.kind, verdict.retryable) == (DbErrorKind.AUTH, False)
    assert classify(refused) == classify(refused)
    assert classify(refused).retryable is False
    assert classify(refused).category is ErrorCategory.AUTH
    assert replayable(refused) is False


def test_auth_failures_of_both_drivers_are_auth_for_the_one_classifier() -> None:
    for exc in (
        asyncpg.InvalidPasswordError('password authentication failed for user "app"'),
        asyncpg.InvalidAuthorizationSpecificationError('role "x" does not exist'),
        _psycopg("28P01"),
        _psycopg("42501"),
    ):
        verdict = classify(exc)
        assert (verdict.category, verdict.retryable) == (ErrorCategory.AUTH, False), exc


def test_a_transaction_rolled_back_is_never_replayed_by_any_layer() -> None:
    from datapunk_recovery._core.errors import final_reason
    from datapunk_recovery.database import TransactionRolledBack

    exc = TransactionRolledBack("rolled back", code="23505")
    assert exc.code == "23505" and replayable(exc) is False
    assert classify(exc).retryable is False and final_reason(exc) is not None
