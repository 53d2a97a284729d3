"""Sources of truth for the read-through cache: PostgreSQL (asyncpg, psycopg), SQLite, functions."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from datapunk_recovery.cache import FunctionSource, PostgresSource, ReadThroughCache, SqliteSource
from datapunk_recovery.database import ManagedPool
from tests.harness import PostgresServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def articles_dsn(postgres_server: PostgresServer) -> str:
    dsn = postgres_server.create_database("cache_sources")
    postgres_server.psql(
        "CREATE TABLE articles (id text PRIMARY KEY, title text, views int);"
        "INSERT INTO articles VALUES ('a', 'Alpha', 1), ('b', 'Beta', 2)",
        database="cache_sources",
    )
    return dsn


@pytest.mark.parametrize(
    ("driver", "one", "many", "single"),
    [
        (
            "asyncpg",
            "SELECT title, views FROM articles WHERE id = $1",
            "SELECT id, title, views FROM articles WHERE id = ANY($1)",
            "SELECT title FROM articles WHERE id = $1",
        ),
        (
            "psycopg",
            "SELECT title, views FROM articles WHERE id = %s",
            "SELECT id, title, views FROM articles WHERE id = ANY(%s)",
            "SELECT title FROM articles WHERE id = %s",
        ),
    ],
)
async def test_postgres_sources_read_rows_as_values(
    articles_dsn: str, driver: str, one: str, many: str, single: str
) -> None:
    create = ManagedPool.create_asyncpg if driver == "asyncpg" else ManagedPool.create_psycopg
    pool = await create(articles_dsn, None, min_size=1, max_size=2)
    try:
        source = PostgresSource(pool, one, many_query=many)
        assert await source.load("a") == {"title": "Alpha", "views": 1}  # columns -> dict
        assert await source.load("zzz") is None
        assert await source.load_many(["a", "b", "zzz"]) == {
            "a": {"title": "Alpha", "views": 1},
            "b": {"title": "Beta", "views": 2},
        }
        titles = PostgresSource(pool, single)  # one column -> the value; many: one by one
        assert await titles.load("b") == "Beta"
        assert await titles.load_many(["a", "zzz"]) == {"a": "Alpha"}
        cached: ReadThroughCache[Any] = ReadThroughCache(titles)
        assert await cached.get("a") == "Alpha"
    finally:
        await pool.close()


async def test_sqlite_source_reads_off_the_event_loop(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT)")
        conn.execute("INSERT INTO kv VALUES ('x', 'ex'), ('y', 'why')")
    conn.close()
    source = SqliteSource(path, "SELECT v FROM kv WHERE k = ?")
    assert await source.load("x") == "ex"
    assert await source.load("nope") is None
    assert await source.load_many(["x", "y", "nope"]) == {"x": "ex", "y": "why"}


async def test_function_sources_load_many_one_by_one_unless_given() -> None:
    async def load(key: str) -> Any:
        return key.upper() if key != "none" else None

    assert await FunctionSource(load).load_many(["a", "none", "b"]) == {"a": "A", "b": "B"}

    async def many(keys: Any) -> dict[str, str]:
        return {k: "batch" for k in keys}

    assert await FunctionSource(load, many).load_many(["a"]) == {"a": "batch"}
    with pytest.raises(TypeError, match=r"FunctionSource\.load"):
        FunctionSource("not callable")  # type: ignore[arg-type]
