"""Driver contracts, PostgreSQL: what asyncpg, psycopg 3 and the server do that we rely on.

Each test names one behaviour of a real driver against the real server of
``tests/conftest.py``.  A driver upgrade that changes one fails here, by name,
instead of silently changing what the library retries or acknowledges.
"""

from __future__ import annotations

import itertools
from typing import Any

import asyncpg
import psycopg
import pytest

from datapunk_recovery._core.errors import ErrorCategory, classify
from datapunk_recovery._execution.engine import retry
from datapunk_recovery.database import DbErrorKind, ManagedPool, classify_database
from tests.harness import PostgresServer

pytestmark = pytest.mark.anyio

_names = itertools.count()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg runs on asyncio only


@pytest.fixture(scope="module")
def database(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database("contracts_pg")


def _table() -> str:
    return f"c{next(_names)}"


# --- COMMIT after an aborted transaction -------------------------------------------


async def test_asyncpg_commit_of_an_aborted_transaction_answers_rollback_without_raising(
    database: str,
) -> None:
    conn = await asyncpg.connect(database)
    try:
        table = _table()
        await conn.execute(f"CREATE TABLE {table} (id int primary key)")
        await conn.execute(f"INSERT INTO {table} VALUES (1)")
        tr = conn.transaction()
        await tr.start()
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert conn.is_in_transaction()  # asyncpg cannot tell aborted from open...
        assert await conn.execute("COMMIT") == "ROLLBACK"  # ...COMMIT's status can
        # A COMMIT sent around asyncpg's Transaction leaves it the top one (the
        # next conn.transaction() would be a SAVEPOINT): the library clears it.
        assert conn._top_xact is tr
        conn._top_xact = None
        # asyncpg's own Transaction.commit() returns None without raising:
        tr2 = conn.transaction()
        await tr2.start()
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert await tr2.commit() is None
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 1
    finally:
        await conn.close()


async def test_asyncpg_keeps_the_top_transaction_and_logs_each_querys_error(
    database: str,
) -> None:
    """The library clears ``Connection._top_xact`` after its own COMMIT and reads errors
    from a query logger: both are asyncpg behaviours pinned here."""
    conn = await asyncpg.connect(database)
    seen: list[Any] = []
    try:
        tr = conn.transaction()
        await tr.start()
        assert conn._top_xact is tr  # a nested conn.transaction() becomes a savepoint
        conn.add_query_logger(seen.append)
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.execute("SELECT * FROM no_such_table_here")
        await conn.execute("ROLLBACK")
        conn.remove_query_logger(seen.append)
        assert next(getattr(r.exception, "sqlstate", None) for r in seen) == "42P01"
    finally:
        await conn.close()


async def test_psycopg_reports_an_aborted_transaction_and_commit_answers_rollback(
    database: str,
) -> None:
    conn = await psycopg.AsyncConnection.connect(database, autocommit=True)
    try:
        table = _table()
        await conn.execute(f"CREATE TABLE {table} (id int primary key)")
        await conn.execute(f"INSERT INTO {table} VALUES (1)")
        await conn.execute("BEGIN")
        with pytest.raises(psycopg.errors.UniqueViolation):
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        cur = await conn.execute("COMMIT")  # no exception...
        assert cur.statusmessage == "ROLLBACK"  # ...but nothing was committed
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    finally:
        await conn.close()


# --- the SQLSTATEs the classifier maps, provoked for real -------------------------


async def _provoke(conn: Any, sql: str) -> Exception:
    try:
        await conn.execute(sql)
    except Exception as exc:
        return exc
    raise AssertionError(f"{sql!r} did not fail")


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_real_server_errors_carry_the_sqlstates_the_classifier_maps(
    driver: str, database: str, postgres_server: PostgresServer
) -> None:
    table = _table()
    postgres_server.psql(
        f"CREATE TABLE {table} (id int primary key); INSERT INTO {table} VALUES (1)",
        database="contracts_pg",
    )
    postgres_server.psql(
        "CREATE TABLE IF NOT EXISTS owned_by_postgres (x int); "
        "REVOKE ALL ON owned_by_postgres FROM PUBLIC",
        database=postgres_server.app_database,
    )
    if driver == "asyncpg":
        conn: Any = await asyncpg.connect(database)
        app: Any = await asyncpg.connect(postgres_server.app_dsn)
    else:
        conn = await psycopg.AsyncConnection.connect(database, autocommit=True)
        app = await psycopg.AsyncConnection.connect(postgres_server.app_dsn, autocommit=True)
    try:
        cases = [
            (conn, f"INSERT INTO {table} VALUES (1)", "23505", DbErrorKind.FATAL, False),
            (conn, "SELECT * FROM no_such_table", "42P01", DbErrorKind.FATAL, False),
            (conn, "SELECT no_such_function(1)", "42883", DbErrorKind.MISSING, False),
            (conn, "SELECT 1/0", "22012", DbErrorKind.FATAL, False),
            (conn, "SELEC 1", "42601", DbErrorKind.FATAL, False),
            (app, "SELECT * FROM owned_by_postgres", "42501", DbErrorKind.AUTH, False),
        ]
        for on, sql, state, kind, retryable in cases:
            exc = await _provoke(on, sql)
            verdict = classify_database(exc)
            assert (verdict.code, verdict.kind, verdict.retryable) == (state, kind, retryable), sql
            assert verdict.definite  # the server answered: the statement did not take effect
    finally:
        await conn.close()
        await app.close()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_real_serialization_failure_is_40001_and_replayable(
    driver: str, database: str, postgres_server: PostgresServer
) -> None:
    table = _table()
    postgres_server.psql(
        f"CREATE TABLE {table} (id int primary key, v int); INSERT INTO {table} VALUES (1, 0)",
        database="contracts_pg",
    )
    if driver == "asyncpg":
        a: Any = await asyncpg.connect(database)
        b: Any = await asyncpg.connect(database)
    else:
        a = await psycopg.AsyncConnection.connect(database, autocommit=True)
        b = await psycopg.AsyncConnection.connect(database, autocommit=True)
    try:
        for conn in (a, b):
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            await conn.execute(f"SELECT v FROM {table}")
        await a.execute(f"UPDATE {table} SET v = 1")
        await a.execute("COMMIT")
        exc = await _provoke(b, f"UPDATE {table} SET v = 2")  # concurrent update
        verdict = classify_database(exc)
        assert (verdict.code, verdict.kind, verdict.retryable) == (
            "40001",
            DbErrorKind.CONFLICT,
            True,
        )
        await b.execute("ROLLBACK")
    finally:
        await a.close()
        await b.close()


# --- a wrong password ----------------------------------------------------------------


async def test_asyncpg_raises_invalid_password_with_sqlstate_28p01(
    postgres_server: PostgresServer,
) -> None:
    wrong = postgres_server.dsn_for(postgres_server.app_user, "wrong", postgres_server.app_database)
    with pytest.raises(asyncpg.InvalidPasswordError) as caught:
        await asyncpg.connect(wrong)
    assert caught.value.sqlstate == "28P01"
    assert classify(caught.value) == classify(caught.value)
    assert (classify(caught.value).category, classify(caught.value).retryable) == (
        ErrorCategory.AUTH,
        False,
    )


async def test_psycopg_raises_a_bare_operational_error_for_a_wrong_password(
    postgres_server: PostgresServer,
) -> None:
    """No SQLSTATE: the library recognises libpq's message (scram-sha-256 over TCP)."""
    wrong = postgres_server.dsn_for(postgres_server.app_user, "wrong", postgres_server.app_database)
    with pytest.raises(psycopg.OperationalError) as caught:
        await psycopg.AsyncConnection.connect(wrong)
    assert type(caught.value) is psycopg.OperationalError
    assert caught.value.sqlstate is None
    assert "password authentication failed" in str(caught.value)
    assert classify_database(caught.value).kind is DbErrorKind.AUTH
    assert classify(caught.value).retryable is False


async def test_both_drivers_refuse_an_unknown_role_as_an_auth_failure(
    postgres_server: PostgresServer,
) -> None:
    nobody = postgres_server.dsn_for("nobody_here", "x", postgres_server.app_database)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as apg:
        await asyncpg.connect(nobody)
    with pytest.raises(psycopg.OperationalError) as pg:
        await psycopg.AsyncConnection.connect(nobody)
    for exc in (apg.value, pg.value):
        assert (classify(exc).category, classify(exc).retryable) == (ErrorCategory.AUTH, False)


async def test_a_bare_retry_makes_one_login_with_a_wrong_password(
    postgres_server: PostgresServer,
) -> None:
    """The issue's drill: with the database package imported, @retry made 5 logins."""
    wrong = postgres_server.dsn_for(postgres_server.app_user, "wrong", postgres_server.app_database)
    logins = 0

    @retry
    async def connect(driver: str) -> Any:
        nonlocal logins
        logins += 1
        if driver == "asyncpg":
            return await asyncpg.connect(wrong)
        return await psycopg.AsyncConnection.connect(wrong)

    for driver in ("asyncpg", "psycopg"):
        logins = 0
        with pytest.raises(Exception, match="password authentication failed"):
            await connect(driver)
        assert logins == 1, driver


def test_the_harness_role_authenticates_with_scram_sha_256_over_tcp(
    postgres_server: PostgresServer,
) -> None:
    """What the wrong-password contracts stand on: a real password check, not trust."""
    verifier = postgres_server.psql(
        f"SELECT left(rolpassword, 14) FROM pg_authid WHERE rolname = '{postgres_server.app_user}'"
    )
    assert verifier == "SCRAM-SHA-256$"
    rules = postgres_server.psql(
        "SELECT DISTINCT auth_method FROM pg_hba_file_rules "
        f"WHERE type = 'host' AND '{postgres_server.app_user}' = ANY(user_name)"
    )
    assert rules.split() == ["scram-sha-256"]


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_terminated_backend_is_a_connection_failure_in_doubt(
    driver: str, database: str, postgres_server: PostgresServer
) -> None:
    """``pg_terminate_backend`` (57P01, or the socket closing): retryable, never definite."""
    if driver == "asyncpg":
        conn: Any = await asyncpg.connect(database)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
    else:
        conn = await psycopg.AsyncConnection.connect(database, autocommit=True)
        pid = conn.info.backend_pid
    try:
        postgres_server.psql(f"SELECT pg_terminate_backend({pid})")
        exc = await _provoke(conn, "SELECT 1")
        verdict = classify_database(exc)
        assert (verdict.kind, verdict.retryable, verdict.definite) == (
            DbErrorKind.CONNECTION,
            True,
            False,
        ), repr(exc)
    finally:
        await conn.close()


async def test_both_drivers_report_a_missing_database_as_a_configuration_error_never_retried(
    postgres_server: PostgresServer,
) -> None:
    """3D000 invalid_catalog_name: asyncpg says so; psycopg gives libpq's bare message."""
    missing = postgres_server.dsn_for(
        postgres_server.app_user, postgres_server.app_password, "no_such_database"
    )
    with pytest.raises(asyncpg.InvalidCatalogNameError) as apg:
        await asyncpg.connect(missing)
    assert apg.value.sqlstate == "3D000"
    with pytest.raises(psycopg.OperationalError) as pg:
        await psycopg.AsyncConnection.connect(missing)
    assert pg.value.sqlstate is None
    assert 'database "no_such_database" does not exist' in str(pg.value)
    for exc in (apg.value, pg.value):
        verdict = classify_database(exc)
        assert (verdict.kind, verdict.code, verdict.retryable) == (
            DbErrorKind.FATAL,
            "3D000",
            False,
        )
        assert classify(exc).retryable is False


async def test_a_bare_retry_connects_once_to_a_database_that_does_not_exist(
    postgres_server: PostgresServer,
) -> None:
    missing = postgres_server.dsn_for(
        postgres_server.app_user, postgres_server.app_password, "no_such_database"
    )
    connects = 0

    @retry
    async def connect(driver: str) -> Any:
        nonlocal connects
        connects += 1
        if driver == "asyncpg":
            return await asyncpg.connect(missing)
        return await psycopg.AsyncConnection.connect(missing)

    for driver in ("asyncpg", "psycopg"):
        connects = 0
        with pytest.raises(Exception, match="does not exist"):
            await connect(driver)
        assert connects == 1, driver


async def test_a_managed_pool_for_a_missing_database_fails_at_once_not_retryable(
    postgres_server: PostgresServer,
) -> None:
    missing = postgres_server.dsn_for(
        postgres_server.app_user, postgres_server.app_password, "no_such_database"
    )
    for create in (ManagedPool.create_asyncpg, ManagedPool.create_psycopg):
        with pytest.raises(Exception, match="does not exist") as caught:
            await create(missing)
        assert classify(caught.value).retryable is False, create
        assert postgres_server.app_password not in str(caught.value)
