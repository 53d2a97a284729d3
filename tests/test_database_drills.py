"""Fault drills against a real PostgreSQL: backends killed under load, nothing lost or doubled.

Concurrent transfers between accounts; each transfer writes one ledger row
with a unique id and moves money between two accounts, in one transaction.
Meanwhile backends are terminated (``pg_terminate_backend``) at a steady pace
of completed transfers.  Afterwards the ledger and the balances must agree
exactly with what the callers were told: every transfer committed exactly
once or raised a clear error.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery.database import (
    CommitOutcomeUnknown,
    ManagedPool,
    PoolConfig,
    TransactionConfig,
)
from tests.harness import PostgresServer

pytestmark = [pytest.mark.anyio, pytest.mark.drill, pytest.mark.timeout(20)]

ACCOUNTS = 10
WORKERS = 8
TRANSFERS = 320
KILL_EVERY = 12  # completed transfers between two terminations


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _pool(driver: str, dsn: str) -> ManagedPool:
    config = PoolConfig(name=f"drill-{driver}", acquire_timeout=5.0)
    if driver == "asyncpg":
        return await ManagedPool.create_asyncpg(
            dsn, config, min_size=2, max_size=WORKERS, server_settings={"application_name": "drill"}
        )
    return await ManagedPool.create_psycopg(
        dsn, config, min_size=2, max_size=WORKERS, kwargs={"application_name": "drill"}
    )


def _sql(driver: str, sql: str) -> str:
    return (
        sql
        if driver == "asyncpg"
        else sql.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s").replace("$4", "%s")
    )


async def _exec(conn: Any, driver: str, sql: str, *args: Any) -> None:
    if driver == "asyncpg":
        await conn.execute(sql, *args)
    else:
        await conn.execute(_sql(driver, sql), args or None)


async def _val(conn: Any, driver: str, sql: str, *args: Any) -> Any:
    if driver == "asyncpg":
        return await conn.fetchval(sql, *args)
    row = await (await conn.execute(_sql(driver, sql), args or None)).fetchone()
    return row[0]


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.parametrize("checked", [True, False], ids=["idempotency-check", "no-check"])
async def test_terminated_backends_during_transfers_lose_and_double_nothing(
    postgres_server: PostgresServer, driver: str, checked: bool
) -> None:
    dsn = postgres_server.create_database(f"drill_{driver}_{int(checked)}")
    pool = await _pool(driver, dsn)
    admin = await ManagedPool.create_asyncpg(dsn, PoolConfig(name="admin"), min_size=1, max_size=2)
    await pool.run(
        lambda c: _exec(
            c,
            driver,
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);"
            "CREATE TABLE ledger (id int PRIMARY KEY, src int, dst int, amount int);"
            f"INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, {ACCOUNTS}) g",
        )
    )
    rng = random.Random(7)
    plan = [
        (i, *rng.sample(range(1, ACCOUNTS + 1), 2), rng.randint(1, 50)) for i in range(TRANSFERS)
    ]
    outcome: dict[int, str] = {}
    done = 0
    config = TransactionConfig(retry=RetryConfig(max_attempts=8, base_delay=0.005, max_delay=0.2))

    async def transfer(tid: int, src: int, dst: int, amount: int) -> None:
        async def work(conn: Any) -> None:
            await _exec(
                conn, driver, "INSERT INTO ledger VALUES ($1, $2, $3, $4)", tid, src, dst, amount
            )
            await _exec(
                conn,
                driver,
                "UPDATE accounts SET balance = balance - $1 WHERE id = $2",
                amount,
                src,
            )
            await _exec(
                conn,
                driver,
                "UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                amount,
                dst,
            )

        async def there(conn: Any) -> bool:
            return bool(await _val(conn, driver, "SELECT count(*) FROM ledger WHERE id = $1", tid))

        try:
            await pool.transaction(
                work, config=config, idempotency_check=there if checked else None
            )
            outcome[tid] = "committed"
        except CommitOutcomeUnknown:
            outcome[tid] = "unknown"
        except Exception as exc:  # any other error must be a clear one; recorded by type
            outcome[tid] = type(exc).__name__

    kills = rounds = 0

    async def kill_some() -> None:
        nonlocal kills, rounds
        rounds += 1
        kills += await admin.run(
            lambda c: c.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM ("
                " SELECT pid FROM pg_stat_activity WHERE application_name = 'drill'"
                " ORDER BY random() LIMIT 2) victims"
            )
        )

    async def worker(jobs: list[tuple[int, int, int, int]]) -> None:
        nonlocal done
        for job in jobs:
            await transfer(*job)
            done += 1
            if done % KILL_EVERY == 0:  # kill while the other workers are mid-transfer
                await kill_some()

    try:
        await asyncio.gather(*(worker(plan[w::WORKERS]) for w in range(WORKERS)))
        ledger = await admin.run(lambda c: c.fetch("SELECT id, src, dst, amount FROM ledger"))
        balances = dict(await admin.run(lambda c: c.fetch("SELECT id, balance FROM accounts")))
    finally:
        await pool.close()
        await admin.close()

    rows = {r["id"]: (r["src"], r["dst"], r["amount"]) for r in ledger}
    kinds = Counter(outcome.values())
    print(
        f"\n{driver} ({'with' if checked else 'without'} idempotency check): "
        f"{TRANSFERS} transfers, {kills} backends terminated, outcomes {dict(kinds)}, "
        f"{len(rows)} ledger rows"
    )
    assert len(outcome) == TRANSFERS  # every caller got an answer
    assert rounds == TRANSFERS // KILL_EVERY and kills >= rounds  # the faults really happened
    lost = [t for t, o in outcome.items() if o == "committed" and t not in rows]
    phantom = [t for t, o in outcome.items() if o not in ("committed", "unknown") and t in rows]
    assert not lost and not phantom  # told committed => there; told failed => absent
    # The ledger and the balances agree, row for row (no half-applied transfer).
    expected = Counter({a: 1000 for a in range(1, ACCOUNTS + 1)})
    for src, dst, amount in rows.values():
        expected[src] -= amount
        expected[dst] += amount
    assert balances == dict(expected)
    assert sum(balances.values()) == 1000 * ACCOUNTS
    if checked:
        assert kinds["unknown"] == 0  # the check resolved every doubtful commit
    print(
        f"  data lost: {len(lost)}, duplicated: 0 (primary key), errors surfaced: "
        f"{TRANSFERS - kinds['committed']}"
    )
