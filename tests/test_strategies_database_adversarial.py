"""Adversarial drills on the facade's database recovery: the service's limits hold there too.

A transaction replayed on a busy database is a retry like any other: the
service's retry budget is asked before each replay, and the service's
bulkhead bounds how many transactions run at once ("What a call goes
through" in docs/strategies.md).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from datapunk_recovery import BulkheadFull
from datapunk_recovery.demo.mesh import busy_error
from datapunk_recovery.strategies import RecoveryStrategies
from datapunk_recovery.testing import instant_retries

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _instant() -> Iterator[None]:
    with instant_retries():
        yield


def configured(path: Path, **orders: Any) -> dict[str, Any]:
    return {
        "defaults": {
            "retry": {"max_attempts": 5, "base_delay": "1ms", "jitter": "none"},
            "breaker": "none",
        },
        "services": {"orders": orders},
        "databases": {"orders": {"sqlite": str(path)}},
    }


async def test_a_drained_budget_stops_the_replays_of_a_busy_transaction(tmp_path: Path) -> None:
    attempts = 0

    def always_busy(conn: sqlite3.Connection) -> None:
        nonlocal attempts
        attempts += 1
        raise busy_error()

    config = configured(tmp_path / "orders.db", budget={"max_tokens": 10})
    async with RecoveryStrategies.from_config(config, environ={}) as recovery:
        budget = recovery.budget("orders")
        assert budget is not None
        for _ in range(10):  # other calls failed: the budget is drained
            budget.on_attempt(False)
        assert not budget.allow_retry()
        with pytest.raises(sqlite3.OperationalError):
            await recovery.with_database_recovery(always_busy, database="orders")
    assert attempts == 1


async def test_the_services_bulkhead_bounds_concurrent_transactions(tmp_path: Path) -> None:
    inside = threading.Event()
    leave = threading.Event()

    def holds(conn: sqlite3.Connection) -> str:
        inside.set()
        leave.wait(10.0)  # released by the test below, bounded in case it failed
        return "done"

    config = configured(tmp_path / "orders.db", bulkhead={"max_concurrent": 1})
    async with RecoveryStrategies.from_config(config, environ={}) as recovery:
        results: list[str] = []

        async def first() -> None:
            results.append(await recovery.with_database_recovery(holds, database="orders"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            try:
                await anyio.to_thread.run_sync(inside.wait, 5.0)
                with pytest.raises(BulkheadFull):
                    await recovery.with_database_recovery(holds, database="orders")
            finally:
                leave.set()
    assert results == ["done"]
