"""SQLite transactions replayed on real ``SQLITE_BUSY`` errors, off the event loop."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import anyio
import pytest

from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.events import Event, RetryScheduled, subscribe
from datapunk_recovery.database import (
    BeginMode,
    MissingExtensionError,
    SqliteConfig,
    SqliteDatabase,
    TransactionRolledBack,
)


@pytest.fixture
def db(tmp_path: Path) -> SqliteDatabase:
    database = SqliteDatabase(str(tmp_path / "app.db"), SqliteConfig(busy_timeout=0.0))
    database.transaction_sync(lambda c: c.execute("CREATE TABLE counter (n INTEGER)"))
    database.transaction_sync(lambda c: c.execute("INSERT INTO counter VALUES (0)"))
    return database


def count(db: SqliteDatabase) -> int:
    return int(db.transaction_sync(lambda c: c.execute("SELECT n FROM counter").fetchone()[0]))


def increment(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE counter SET n = n + 1")


def test_a_busy_database_is_replayed_once_the_lock_is_released(db: SqliteDatabase) -> None:
    holder = db.connect()
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    seen: list[Event] = []

    def on_event(event: Event) -> None:
        seen.append(event)
        if isinstance(event, RetryScheduled) and holder.in_transaction:
            holder.execute("COMMIT")  # the other writer finishes after our first try

    stop = subscribe(on_event)
    try:
        db.transaction_sync(increment)
    finally:
        stop()
        holder.close()
    retries = [e for e in seen if isinstance(e, RetryScheduled)]
    assert [e.error_type for e in retries] == ["OperationalError"]  # "database is locked"
    assert count(db) == 1


@pytest.mark.anyio
async def test_concurrent_writers_all_succeed_through_real_busy_errors(tmp_path: Path) -> None:
    # SQLite's own busy wait is off: every collision is a real SQLITE_BUSY, replayed.
    patient = RetryConfig(max_attempts=100, base_delay=0.001, max_delay=0.05)
    db = SqliteDatabase(str(tmp_path / "c.db"), SqliteConfig(busy_timeout=0.0, retry=patient))
    db.transaction_sync(lambda c: c.execute("CREATE TABLE counter (n INTEGER)"))
    db.transaction_sync(lambda c: c.execute("INSERT INTO counter VALUES (0)"))
    seen: list[Event] = []
    stop = subscribe(seen.append)
    writers, each = 6, 15
    gate = threading.Barrier(writers)

    def crowded(conn: sqlite3.Connection) -> None:
        increment(conn)

    async def writer() -> None:
        await anyio.to_thread.run_sync(gate.wait)  # start together
        for _ in range(each):
            await db.transaction(crowded)

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(writers):
                tg.start_soon(writer)
    finally:
        stop()
    assert count(db) == writers * each  # nothing lost, nothing doubled
    busy = [e for e in seen if isinstance(e, RetryScheduled)]
    print(f"\nsqlite: {writers * each} transactions, {len(busy)} busy errors replayed")


def test_the_write_lock_is_taken_at_begin_so_no_work_is_done_twice(tmp_path: Path) -> None:
    db = SqliteDatabase(str(tmp_path / "x.db"), SqliteConfig(busy_timeout=0.0))
    assert db.config.begin is BeginMode.IMMEDIATE
    holder = db.connect()
    holder.execute("BEGIN IMMEDIATE")
    calls = 0

    def work(conn: sqlite3.Connection) -> None:
        nonlocal calls
        calls += 1

    quick = SqliteDatabase(
        db.path, SqliteConfig(busy_timeout=0.0, retry=RetryConfig(max_attempts=2, base_delay=0))
    )
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        quick.transaction_sync(work)
    holder.close()
    assert calls == 0  # BEGIN IMMEDIATE failed: fn never ran


def test_a_missing_function_is_reported_and_not_retried(db: SqliteDatabase) -> None:
    calls = 0

    def needs_extension(conn: sqlite3.Connection) -> None:
        nonlocal calls
        calls += 1
        conn.execute("SELECT gen_random_bytes(4)")

    with pytest.raises(MissingExtensionError, match="function gen_random_bytes") as caught:
        db.transaction_sync(needs_extension)
    assert calls == 1
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)


def test_a_failed_transaction_leaves_nothing_behind(db: SqliteDatabase) -> None:
    def half_done(conn: sqlite3.Connection) -> None:
        increment(conn)
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        db.transaction_sync(half_done)
    assert count(db) == 0


def test_keyboard_interrupt_is_never_retried(db: SqliteDatabase) -> None:
    calls = 0

    def interrupted(conn: sqlite3.Connection) -> None:
        nonlocal calls
        calls += 1
        increment(conn)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        db.transaction_sync(interrupted)
    assert calls == 1
    assert count(db) == 0  # rolled back all the same


def test_configuration_is_validated_with_names_and_values() -> None:
    with pytest.raises(ValueError, match=r"SqliteConfig\.busy_timeout.*-1"):
        SqliteConfig(busy_timeout=-1)
    with pytest.raises(ValueError, match=r"SqliteConfig\.begin.*'sometimes'"):
        SqliteConfig(begin="sometimes")  # type: ignore[arg-type]


def test_a_transaction_sqlite_rolled_back_under_fn_is_not_acknowledged(
    db: SqliteDatabase,
) -> None:
    """``INSERT OR ROLLBACK`` (like SQLITE_FULL) ends the whole transaction; fn carries on."""
    db.transaction_sync(lambda c: c.execute("CREATE TABLE u (id INTEGER PRIMARY KEY)"))
    db.transaction_sync(lambda c: c.execute("INSERT INTO u VALUES (1)"))
    calls = 0

    def swallow(conn: sqlite3.Connection) -> str:
        nonlocal calls
        calls += 1
        conn.execute("UPDATE counter SET n = n + 1")
        try:  # noqa: SIM105 - the application carries on, as in the wild
            conn.execute("INSERT OR ROLLBACK INTO u VALUES (1)")
        except sqlite3.IntegrityError:
            pass
        return "acknowledged"

    with pytest.raises(TransactionRolledBack, match="no transaction was open"):
        db.transaction_sync(swallow)
    assert calls == 1
    assert count(db) == 0


@pytest.mark.anyio
async def test_the_async_face_does_not_acknowledge_a_rolled_back_transaction_either(
    db: SqliteDatabase,
) -> None:
    def rolls_back(conn: sqlite3.Connection) -> str:
        conn.execute("UPDATE counter SET n = n + 1")
        conn.execute("ROLLBACK")
        return "acknowledged"

    with pytest.raises(TransactionRolledBack):
        await db.transaction(rolls_back)
    assert count(db) == 0
