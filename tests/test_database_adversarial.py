"""Adversarial drills on the database recovery: work committed behind its back is never replayed.

Written as a drill author would: each test drives a real PostgreSQL (asyncpg
and psycopg 3) or a real SQLite file into a corner where acknowledging or
replaying would duplicate or lose committed work.
"""

from __future__ import annotations

import itertools
import sqlite3
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from datapunk_recovery._core.errors import final_reason
from datapunk_recovery.database import ManagedPool, PoolConfig
from datapunk_recovery.database.sqlite import SqliteDatabase
from tests.harness import PostgresServer

pytestmark = pytest.mark.anyio

_names = itertools.count()

# A retryable error the server itself reports (deadlock_detected), raised on demand.
_DEADLOCK = "DO $$BEGIN RAISE EXCEPTION 'staged deadlock' USING ERRCODE = '40P01'; END$$"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def database(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database("recovery_db_adversarial")


@pytest.fixture(params=["asyncpg", "psycopg"])
async def pool(request: pytest.FixtureRequest, database: str) -> AsyncIterator[ManagedPool]:
    config = PoolConfig(name=f"adversarial-{request.param}")
    if request.param == "asyncpg":
        managed = await ManagedPool.create_asyncpg(database, config, min_size=1, max_size=4)
    else:
        managed = await ManagedPool.create_psycopg(database, config, min_size=1, max_size=4)
    yield managed
    await managed.close()


async def execute(conn: Any, sql: str) -> None:
    await conn.execute(sql)


async def count(pool: ManagedPool, table: str) -> int:
    async def read(conn: Any) -> int:
        if hasattr(conn, "fetchval"):
            return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
        row = await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone()
        return int(row[0])

    return await pool.run(read)


async def fresh_table(pool: ManagedPool) -> str:
    table = f"adv{next(_names)}"
    await pool.run(lambda c: execute(c, f"CREATE TABLE {table} (id serial primary key)"))
    return table


async def test_work_fn_committed_itself_is_not_replayed_after_a_later_deadlock(
    pool: ManagedPool,
) -> None:
    """fn sent COMMIT itself, then hit a retryable error: a replay would commit its work again."""
    table = await fresh_table(pool)
    calls = 0

    async def commits_then_deadlocks(conn: Any) -> None:
        nonlocal calls
        calls += 1
        await execute(conn, f"INSERT INTO {table} DEFAULT VALUES")
        await execute(conn, "COMMIT")  # the insert is durable from here on
        await execute(conn, _DEADLOCK)

    with pytest.raises(Exception, match="staged deadlock") as caught:
        await pool.transaction(commits_then_deadlocks)
    assert calls == 1
    assert await count(pool, table) == 1
    assert final_reason(caught.value) is not None  # no outer layer replays it either


def test_sqlite_work_fn_committed_itself_is_not_replayed_after_the_database_was_busy(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "ledger.db")
    db = SqliteDatabase(path)
    db.transaction_sync(lambda c: c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
    blocker = sqlite3.connect(path, isolation_level=None)
    calls = 0

    def commits_then_waits_for_the_lock(conn: sqlite3.Connection) -> None:
        nonlocal calls
        calls += 1
        conn.execute("INSERT INTO t DEFAULT VALUES")
        conn.execute("COMMIT")  # durable from here on
        blocker.execute("BEGIN IMMEDIATE")  # another writer takes the lock ...
        try:
            conn.execute("BEGIN IMMEDIATE")  # ... so this fails busy
        finally:
            blocker.execute("ROLLBACK")

    try:
        with pytest.raises(sqlite3.OperationalError, match="locked") as caught:
            db.transaction_sync(commits_then_waits_for_the_lock)
    finally:
        blocker.close()
    assert calls == 1
    assert db.transaction_sync(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 1
    assert final_reason(caught.value) is not None


_SECRET = "hunter2-s3cret"


@pytest.mark.parametrize(
    "dsn",
    [
        # An unclosed IPv6 bracket: libpq quotes the whole URI back.
        f"postgresql://app:{_SECRET}@[::1/ledger",
        # A "%" the user did not encode in the password: libpq quotes the password.
        f"postgresql://app:{_SECRET}%zz@127.0.0.1:1/ledger",
        f"postgresql://app@127.0.0.1:1/ledger?password={_SECRET}%zz",
    ],
    ids=["ipv6", "percent-in-password", "percent-in-query-password"],
)
async def test_a_malformed_dsn_never_shows_its_password_in_the_error(dsn: str) -> None:
    with pytest.raises(Exception) as caught:
        await ManagedPool.create_psycopg(dsn, PoolConfig(acquire_timeout=1.0))
    shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value)
    assert _SECRET not in shown
    chained = caught.value.__cause__ or caught.value.__context__  # what error trackers walk
    assert chained is None or _SECRET not in repr(chained)
    assert "malformed" in str(caught.value)  # and says what is wrong


def test_a_sqlite_uri_key_never_shows_in_a_repr() -> None:
    """SQLite's encryption extensions take the key in the URI: ``file:x.db?key=...``."""
    from datapunk_recovery.strategies import RecoveryStrategies

    uri = f"file:ledger.db?mode=rwc&key={_SECRET}"
    shown = repr(SqliteDatabase(uri, uri=True))
    config = RecoveryStrategies.from_config({"databases": {"l": {"sqlite": uri}}}, environ={})
    shown += repr(config.config) + repr(config.config.databases)
    assert _SECRET not in shown
    assert "ledger.db" in shown  # and still says which file


async def test_a_users_own_psycopg_pool_gets_its_connections_back_as_it_lent_them(
    database: str,
) -> None:
    """ManagedPool borrows from the application's pool: its transactions must stay atomic."""
    from psycopg_pool import AsyncConnectionPool

    users = AsyncConnectionPool(database, min_size=1, max_size=1, open=False)  # autocommit off
    await users.open(wait=True)
    try:
        managed = ManagedPool(users)
        table = await fresh_table(managed)
        await managed.transaction(lambda c: execute(c, f"INSERT INTO {table} DEFAULT VALUES"))

        async def half_way() -> None:
            async with users.connection() as conn:  # the application's own, atomic, block
                await conn.execute(f"INSERT INTO {table} DEFAULT VALUES")
                raise RuntimeError("half way")

        with pytest.raises(RuntimeError, match="half way"):
            await half_way()
        assert await count(managed, table) == 1  # the block's insert was rolled back
    finally:
        await users.close()


async def test_a_users_own_psycopg_pool_keeps_the_session_its_configure_callback_set(
    database: str,
) -> None:
    """The application's pool sets every new connection up (``configure=``): that stays."""
    from psycopg_pool import AsyncConnectionPool

    async def configure(conn: Any) -> None:
        await conn.execute("SET statement_timeout = '1234ms'")
        await conn.commit()

    async def timeout_setting() -> str:
        async with users.connection() as conn:
            row = await (await conn.execute("SHOW statement_timeout")).fetchone()
            return str(row[0])

    users = AsyncConnectionPool(database, min_size=1, max_size=1, open=False, configure=configure)
    await users.open(wait=True)
    try:
        assert await timeout_setting() == "1234ms"
        await ManagedPool(users).transaction(lambda c: execute(c, "SELECT 1"))
        assert await timeout_setting() == "1234ms"
    finally:
        await users.close()
