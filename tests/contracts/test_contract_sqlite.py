"""Driver contracts, sqlite3: how a transaction SQLite ended under the application shows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from datapunk_recovery.database import DbErrorKind, classify_database


def test_a_transaction_sqlite_rolled_back_is_no_longer_in_transaction(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    try:
        conn.execute("CREATE TABLE u (id INTEGER PRIMARY KEY)")
        conn.execute("INSERT INTO u VALUES (1)")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO u VALUES (2)")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT OR ROLLBACK INTO u VALUES (1)")
        assert not conn.in_transaction  # what SqliteDatabase checks before COMMIT
        with pytest.raises(sqlite3.OperationalError, match="no transaction is active"):
            conn.execute("COMMIT")
        assert conn.execute("SELECT count(*) FROM u").fetchone()[0] == 1
    finally:
        conn.close()


def test_busy_and_locked_carry_the_codes_the_classifier_maps(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    other = sqlite3.connect(path, isolation_level=None, timeout=0.0)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="database is locked") as caught:
            other.execute("BEGIN IMMEDIATE")
        assert caught.value.sqlite_errorname == "SQLITE_BUSY"
        verdict = classify_database(caught.value)
        assert (verdict.kind, verdict.retryable) == (DbErrorKind.CONFLICT, True)
    finally:
        holder.close()
        other.close()


def test_a_missing_database_file_is_fatal_and_never_retried(tmp_path: Path) -> None:
    """The sibling of PostgreSQL's 3D000: SQLite's CANTOPEN is configuration, not an outage."""
    missing = tmp_path / "absent" / "no.db"
    with pytest.raises(sqlite3.OperationalError, match="unable to open") as caught:
        sqlite3.connect(f"file:{missing}?mode=ro", uri=True)
    assert caught.value.sqlite_errorname == "SQLITE_CANTOPEN"
    verdict = classify_database(caught.value)
    assert (verdict.kind, verdict.retryable) == (DbErrorKind.FATAL, False)


def test_a_write_to_a_read_only_database_is_fatal_and_never_retried(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE t (x)")
    setup.close()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly") as caught:
            conn.execute("INSERT INTO t VALUES (1)")
        assert caught.value.sqlite_errorname == "SQLITE_READONLY"
        verdict = classify_database(caught.value)
        assert (verdict.kind, verdict.retryable) == (DbErrorKind.FATAL, False)
    finally:
        conn.close()
