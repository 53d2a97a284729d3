"""Transactions, statements and pools against a real PostgreSQL, for asyncpg and psycopg 3.

Every test runs once per driver: the recovery behaves the same whichever the
application uses.  Faults are real: serialization failures between two real
SERIALIZABLE transactions, real deadlocks, real backends terminated, a fault
proxy cutting the connection exactly at COMMIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest

from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.errors import ErrorCategory, classify, final_reason
from datapunk_recovery._core.events import Event, RetryScheduled, subscribe
from datapunk_recovery._core.policy import RetryPolicy
from datapunk_recovery.database import (
    CommitOutcomeUnknown,
    CommitUncertain,
    ConnectionDiscarded,
    DatabaseUnavailable,
    Isolation,
    ManagedPool,
    MissingExtensionError,
    PoolConfig,
    PoolStatus,
    PoolTimeout,
    TransactionConfig,
    TransactionRolledBack,
    run,
    transaction,
)
from tests.harness import PostgresServer, ThreadedProxy

pytestmark = pytest.mark.anyio

_names = itertools.count()

DRIVERS = ["asyncpg", "psycopg"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def database(postgres_server: PostgresServer) -> str:
    """A fresh database for this module; returns its superuser DSN."""
    return postgres_server.create_database("recovery_db_tests")


async def make_pool(
    driver: str, dsn: str, config: PoolConfig | None = None, **kw: Any
) -> ManagedPool:
    kw.setdefault("min_size", 1)
    kw.setdefault("max_size", 4)
    if driver == "asyncpg":
        return await ManagedPool.create_asyncpg(dsn, config, **kw)
    return await ManagedPool.create_psycopg(dsn, config, **kw)


@pytest.fixture(params=DRIVERS)
async def pool(request: pytest.FixtureRequest, database: str) -> AsyncIterator[ManagedPool]:
    managed = await make_pool(request.param, database, PoolConfig(name=f"test-{request.param}"))
    yield managed
    await managed.close()


async def fetchval(conn: Any, sql: str, *args: Any) -> Any:
    """One value, whichever the driver (asyncpg: $1 placeholders; psycopg: %s)."""
    if hasattr(conn, "fetchval"):
        return await conn.fetchval(sql, *args)
    cur = await conn.execute(sql.replace("$1", "%s").replace("$2", "%s"), args or None)
    row = await cur.fetchone()
    return None if row is None else row[0]


async def execute(conn: Any, sql: str, *args: Any) -> None:
    if hasattr(conn, "fetchval"):
        await conn.execute(sql, *args)
    else:
        await conn.execute(sql.replace("$1", "%s").replace("$2", "%s"), args or None)


async def fresh_table(pool: ManagedPool, columns: str = "id int primary key, v int") -> str:
    table = f"t{next(_names)}"
    await pool.run(lambda c: execute(c, f"CREATE TABLE {table} ({columns})"))
    return table


def recording() -> tuple[list[Event], Callable[[], None]]:
    seen: list[Event] = []
    return seen, subscribe(seen.append)


# --- transactions -------------------------------------------------------------


async def test_a_transaction_commits_and_returns_what_fn_returned(pool: ManagedPool) -> None:
    table = await fresh_table(pool)

    async def work(conn: Any) -> str:
        await execute(conn, f"INSERT INTO {table} VALUES (1, 10)")
        return "done"

    assert await pool.transaction(work) == "done"
    assert await pool.run(lambda c: fetchval(c, f"SELECT v FROM {table} WHERE id = 1")) == 10


async def test_a_failing_transaction_rolls_back_and_is_not_replayed(pool: ManagedPool) -> None:
    table = await fresh_table(pool)
    calls = 0

    async def work(conn: Any) -> None:
        nonlocal calls
        calls += 1
        await execute(conn, f"INSERT INTO {table} VALUES (1, 10)")
        raise ValueError("a bug in the application")

    with pytest.raises(ValueError, match="a bug"):
        await pool.transaction(work)
    assert calls == 1
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) == 0


async def test_integrity_errors_are_raised_as_themselves_and_not_replayed(
    pool: ManagedPool,
) -> None:
    table = await fresh_table(pool)
    await pool.run(lambda c: execute(c, f"INSERT INTO {table} VALUES (1, 1)"))
    calls = 0

    async def duplicate(conn: Any) -> None:
        nonlocal calls
        calls += 1
        await execute(conn, f"INSERT INTO {table} VALUES (1, 2)")

    with pytest.raises(Exception, match="duplicate key") as caught:
        await pool.transaction(duplicate)
    assert getattr(caught.value, "sqlstate", None) == "23505"
    assert calls == 1


async def test_real_serialization_failures_are_replayed_to_success(pool: ManagedPool) -> None:
    """Two SERIALIZABLE transactions read both rows and each write one: one must fail."""
    table = await fresh_table(pool)
    await pool.run(lambda c: execute(c, f"INSERT INTO {table} VALUES (1, 0), (2, 0)"))
    both_read = asyncio.Barrier(2)
    attempts = {1: 0, 2: 0}

    def writer(row: int) -> Callable[[Any], Awaitable[int]]:
        async def work(conn: Any) -> int:
            attempts[row] += 1
            total = await fetchval(conn, f"SELECT sum(v) FROM {table}")
            if attempts[row] == 1:
                await both_read.wait()  # both have read before either writes
            await execute(conn, f"UPDATE {table} SET v = $1 WHERE id = $2", total + 1, row)
            return int(total)

        return work

    config = TransactionConfig(isolation=Isolation.SERIALIZABLE)
    seen, stop = recording()
    try:
        await asyncio.gather(
            pool.transaction(writer(1), config=config), pool.transaction(writer(2), config=config)
        )
    finally:
        stop()
    assert sorted(attempts.values()) == [1, 2]  # exactly one was replayed, once
    replays = [e for e in seen if isinstance(e, RetryScheduled)]
    assert [e.error_type for e in replays] in (["SerializationError"], ["SerializationFailure"])
    final = await pool.run(lambda c: fetchval(c, f"SELECT sum(v) FROM {table}"))
    assert final == 3  # serial order: 0 -> 1, then 1 -> 2 on the other row


async def test_real_deadlocks_are_replayed_to_success(pool: ManagedPool) -> None:
    table = await fresh_table(pool)
    await pool.run(lambda c: execute(c, f"INSERT INTO {table} VALUES (1, 0), (2, 0)"))
    first_locks = asyncio.Barrier(2)
    attempts = {"a": 0, "b": 0}

    def locker(name: str, first: int, second: int) -> Callable[[Any], Awaitable[None]]:
        async def work(conn: Any) -> None:
            attempts[name] += 1
            await execute(conn, f"UPDATE {table} SET v = v + 1 WHERE id = $1", first)
            if attempts[name] == 1:
                await first_locks.wait()  # each holds one row, then wants the other
            await execute(conn, f"UPDATE {table} SET v = v + 1 WHERE id = $1", second)

        return work

    seen, stop = recording()
    try:
        await asyncio.gather(
            pool.transaction(locker("a", 1, 2)), pool.transaction(locker("b", 2, 1))
        )
    finally:
        stop()
    assert sorted(attempts.values()) == [1, 2]
    assert any(isinstance(e, RetryScheduled) and "Deadlock" in e.error_type for e in seen)
    assert await pool.run(lambda c: fetchval(c, f"SELECT sum(v) FROM {table}")) == 4


async def test_a_missing_extension_is_reported_clearly_and_not_retried(pool: ManagedPool) -> None:
    calls = 0

    async def needs_pgcrypto(conn: Any) -> Any:
        nonlocal calls
        calls += 1
        return await fetchval(conn, "SELECT gen_random_bytes(4)")

    with pytest.raises(MissingExtensionError) as caught:
        await pool.transaction(needs_pgcrypto)
    assert calls == 1
    assert caught.value.what == "function gen_random_bytes(integer)"
    assert caught.value.extension == "pgcrypto"
    assert "CREATE EXTENSION pgcrypto" in str(caught.value)
    assert getattr(caught.value.__cause__, "sqlstate", None) == "42883"
    with pytest.raises(MissingExtensionError, match="nonexistent_ext"):
        await pool.run(lambda c: execute(c, "CREATE EXTENSION nonexistent_ext"))


async def test_a_terminated_backend_mid_transaction_is_replayed_on_a_new_connection(
    pool: ManagedPool, postgres_server: PostgresServer
) -> None:
    table = await fresh_table(pool)
    pids: list[int] = []

    async def work(conn: Any) -> None:
        pid = await fetchval(conn, "SELECT pg_backend_pid()")
        pids.append(pid)
        await execute(conn, f"INSERT INTO {table} VALUES ($1, 0)", len(pids))
        if len(pids) == 1:
            postgres_server.psql(f"SELECT pg_terminate_backend({pid})")
            await fetchval(conn, "SELECT 1")  # the server is gone: this fails

    seen, stop = recording()
    try:
        await pool.transaction(work)
    finally:
        stop()
    assert len(pids) == 2 and pids[0] != pids[1]
    assert any(isinstance(e, ConnectionDiscarded) for e in seen)
    # The first attempt's row died with its backend: exactly one row.
    assert await pool.run(lambda c: fetchval(c, f"SELECT array_agg(id) FROM {table}")) == [2]


# --- COMMIT in doubt ------------------------------------------------------------


@pytest.fixture(params=DRIVERS)
async def proxied(
    request: pytest.FixtureRequest,
    postgres_server: PostgresServer,
    database: str,
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
) -> AsyncIterator[tuple[ManagedPool, ThreadedProxy]]:
    proxy = make_proxy(postgres_server.address)
    dsn = postgres_server.dsn_for("postgres", None, "recovery_db_tests", port=proxy.port)
    managed = await make_pool(request.param, dsn, PoolConfig(name="proxied"), min_size=1)
    yield managed, proxy
    await managed.close()


async def test_a_cut_at_commit_raises_commit_outcome_unknown(
    proxied: tuple[ManagedPool, ThreadedProxy],
) -> None:
    pool, proxy = proxied
    table = await fresh_table(pool)
    calls = 0

    async def work(conn: Any) -> None:
        nonlocal calls
        calls += 1
        await execute(conn, f"INSERT INTO {table} VALUES (1, 1)")
        proxy.cut_on_pattern(b"COMMIT", forward=True)  # the server commits, the answer is lost

    seen, stop = recording()
    try:
        with pytest.raises(CommitOutcomeUnknown, match="may or may not have committed"):
            await pool.transaction(work)
    finally:
        stop()
    assert calls == 1  # never replayed blindly
    assert [e.resolution for e in seen if isinstance(e, CommitUncertain)] == ["unknown"]
    # Usually it did commit (replaying would have inserted twice); when the
    # driver split COMMIT's messages around the cut, it did not: unknown indeed.
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) in (0, 1)


@pytest.mark.parametrize("server_commits", [True, False])
async def test_an_idempotency_check_makes_a_cut_commit_happen_exactly_once(
    proxied: tuple[ManagedPool, ThreadedProxy], server_commits: bool
) -> None:
    pool, proxy = proxied
    table = await fresh_table(pool, "id int, v int")  # no key: a replay would duplicate
    calls = 0

    async def work(conn: Any) -> str:
        nonlocal calls
        calls += 1
        await execute(conn, f"INSERT INTO {table} VALUES (42, $1)", calls)
        if calls == 1:
            proxy.cut_on_pattern(b"COMMIT", forward=server_commits)
        return f"attempt {calls}"

    async def already_there(conn: Any) -> bool:
        return bool(await fetchval(conn, f"SELECT count(*) FROM {table} WHERE id = 42"))

    seen, stop = recording()
    try:
        result = await pool.transaction(work, idempotency_check=already_there)
    finally:
        stop()
    resolutions = [e.resolution for e in seen if isinstance(e, CommitUncertain)]
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) == 1
    if resolutions == ["committed"]:  # the server got the whole COMMIT
        assert server_commits
        assert (result, calls) == ("attempt 1", 1)
    else:  # it never got it (always so with forward=False): replayed once
        assert (result, calls, resolutions) == ("attempt 2", 2, ["absent"])


async def test_a_non_idempotent_statement_cut_in_flight_is_not_retried(
    proxied: tuple[ManagedPool, ThreadedProxy],
) -> None:
    pool, proxy = proxied
    table = await fresh_table(pool, "id int, v int")
    calls = 0

    async def insert(conn: Any) -> None:
        nonlocal calls
        calls += 1
        await execute(conn, f"INSERT INTO {table} VALUES (1, 1)")

    proxy.cut_on_pattern(b"INSERT", forward=True)
    with pytest.raises(CommitOutcomeUnknown, match="not marked idempotent"):
        await pool.run(insert)
    assert calls == 1
    # Unknown it is: whether the server ran it depends on how the driver split
    # its messages around the cut; never twice.
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) in (0, 1)


async def test_an_idempotent_statement_cut_in_flight_is_retried(
    proxied: tuple[ManagedPool, ThreadedProxy],
) -> None:
    pool, proxy = proxied
    table = await fresh_table(pool)
    await pool.run(lambda c: execute(c, f"INSERT INTO {table} VALUES (1, 0)"))
    proxy.cut_on_pattern(b"UPDATE", forward=False)
    sql = f"UPDATE {table} SET v = 5 WHERE id = 1"  # setting a value twice is harmless
    await pool.run(lambda c: execute(c, sql), idempotent=True)
    assert await pool.run(lambda c: fetchval(c, f"SELECT v FROM {table}")) == 5
    assert proxy.count("cut") == 1


async def test_work_outside_a_transaction_is_never_replayed_once_started_unless_idempotent(
    pool: ManagedPool,
) -> None:
    table = await fresh_table(pool, "id int, v int")
    calls = 0
    conflict = "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"

    async def two_statements(conn: Any) -> None:
        nonlocal calls
        calls += 1
        await execute(conn, f"INSERT INTO {table} VALUES (1, 1)")  # commits on its own
        await execute(conn, conflict)  # a real, definite serialization failure

    with pytest.raises(Exception, match="conflict") as caught:
        await pool.run(two_statements)
    assert getattr(caught.value, "sqlstate", None) == "40001"  # raised as itself...
    assert calls == 1  # ...not replayed: the INSERT before it had committed
    assert final_reason(caught.value) is not None  # and no outer layer may replay it
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) == 1

    calls = 0
    config = TransactionConfig(retry=RetryConfig(max_attempts=3, base_delay=0.0))
    with pytest.raises(Exception, match="conflict"):
        await pool.run(two_statements, idempotent=True, config=config)
    assert calls == 3  # marked idempotent: replayed


# --- pools ------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_connections_go_back_with_a_clean_session(driver: str, database: str) -> None:
    pool = await make_pool(driver, database, min_size=1, max_size=1)  # one connection: reused

    async def dirty(conn: Any) -> Any:
        await execute(conn, "SET application_name = 'dirty'")
        await execute(conn, "CREATE TEMP TABLE scratch (x int)")
        return await fetchval(conn, "SELECT pg_backend_pid()")

    pid = await pool.run(dirty)

    async def look(conn: Any) -> tuple[Any, Any, Any]:
        return (
            await fetchval(conn, "SELECT pg_backend_pid()"),
            await fetchval(conn, "SHOW application_name"),
            await fetchval(conn, "SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'"),
        )

    seen_pid, name, scratch = await pool.run(look)
    await pool.close()
    assert seen_pid == pid  # the same connection came back...
    assert name != "dirty"  # ...with its settings reset
    if pool.driver == "psycopg":
        assert scratch == 0  # temporary tables are dropped too


async def test_a_failed_connection_is_discarded_never_pooled(
    pool: ManagedPool, postgres_server: PostgresServer
) -> None:
    pid = await pool.run(lambda c: fetchval(c, "SELECT pg_backend_pid()"))
    postgres_server.psql(f"SELECT pg_terminate_backend({pid})")
    # The idle connection is dead: the idempotent read is retried on a new one.
    new_pid = await pool.run(lambda c: fetchval(c, "SELECT pg_backend_pid()"), idempotent=True)
    assert new_pid != pid


async def test_a_pool_recovers_after_the_server_restarts(
    postgres_server: PostgresServer, database: str
) -> None:
    for driver in DRIVERS:
        managed = await make_pool(driver, database, PoolConfig(ping_after_idle=0.0))
        try:
            before = await managed.run(lambda c: fetchval(c, "SELECT pg_backend_pid()"))
            postgres_server.restart()
            after = await managed.run(lambda c: fetchval(c, "SELECT pg_backend_pid()"))
            assert after != before
        finally:
            await managed.close()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_health_check_that_keeps_failing_is_reported_like_any_unreachable_database(
    driver: str,
    postgres_server: PostgresServer,
    database: str,
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
) -> None:
    proxy = make_proxy(postgres_server.address)
    secret = postgres_server.app_password
    dsn = postgres_server.dsn_for(
        postgres_server.app_user, secret, postgres_server.app_database, port=proxy.port
    )
    managed = await make_pool(driver, dsn, PoolConfig(name="pinged", ping_after_idle=0.0))
    seen, stop = recording()
    try:
        proxy.cut_on_pattern(b"SELECT 1", times=None)  # every health check's connection dies
        with pytest.raises(DatabaseUnavailable, match="failed its health check") as caught:
            await managed.acquire()
    finally:
        stop()
        proxy.clear()
        await managed.close()
    error = caught.value
    assert "'pinged'" in str(error) and f"127.0.0.1:{proxy.port}" in str(error)
    assert secret not in str(error)
    assert error.__cause__ is not None  # the driver's error, kept as the cause
    assert classify(error).retryable is True
    discarded = [e for e in seen if isinstance(e, ConnectionDiscarded)]
    assert len(discarded) == 3  # each failed health check is reported


async def test_a_lazy_pool_for_a_missing_database_fails_its_first_use_without_a_retry(
    postgres_server: PostgresServer,
) -> None:
    """The facade's path: an asyncpg pool with min_size=0 connects on first use."""
    secret = postgres_server.app_password
    missing = postgres_server.dsn_for(postgres_server.app_user, secret, "no_such_database")
    managed = await ManagedPool.create_asyncpg(missing, PoolConfig(name="lazy"), min_size=0)
    seen, stop = recording()
    try:
        with pytest.raises(Exception, match="does not exist") as caught:
            await managed.run(lambda c: fetchval(c, "SELECT 1"), idempotent=True)
    finally:
        stop()
        await managed.close()
    assert classify(caught.value).retryable is False
    assert secret not in str(caught.value)
    assert not [e for e in seen if isinstance(e, RetryScheduled)]


async def test_acquire_is_bounded_and_reports_size_and_waiters(database: str) -> None:
    for driver in DRIVERS:
        managed = await make_pool(
            driver, database, PoolConfig(acquire_timeout=0.2, name="tiny"), min_size=1, max_size=1
        )
        seen, stop = recording()
        try:
            held = await managed.acquire()
            with pytest.raises(PoolTimeout, match="no connection within") as caught:
                await managed.acquire()
            assert caught.value.category is ErrorCategory.RESOURCE
            await managed.release(held)
        finally:
            stop()
            await managed.close()
        statuses = [e for e in seen if isinstance(e, PoolStatus)]
        assert [s.cause for s in statuses] == ["acquired", "timed_out", "released"]
        assert statuses[0].max_size == 1 and statuses[0].size == 1
        assert statuses[1].waiting == 1  # the waiter that gave up, counted while it waited


async def test_a_subscriber_of_other_kinds_gets_no_pool_status_built_per_acquire(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []
    init = vars(PoolStatus)["__init__"]

    def counting(self: PoolStatus, *args: Any, **kwargs: Any) -> None:
        built.append(kwargs.get("cause", "?"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(PoolStatus, "__init__", counting)
    for driver in DRIVERS:
        managed = await make_pool(driver, database, PoolConfig(name="quiet"))
        stop = subscribe(lambda e: None, kinds={"resource.leak"})
        try:
            await managed.release(await managed.acquire())
            assert built == []  # nobody wants database.pool: nothing built
            got: list[Event] = []
            stop_wanted = subscribe(got.append, kinds={PoolStatus})
            await managed.release(await managed.acquire())
            stop_wanted()
            assert built == ["acquired", "released"] == [e.cause for e in got]  # type: ignore[attr-defined]
            built.clear()
        finally:
            stop()
            await managed.close()


async def test_too_many_connections_backs_off_on_the_resource_policy(
    postgres_server: PostgresServer, database: str
) -> None:
    import asyncpg

    postgres_server.psql(
        "DROP ROLE IF EXISTS limited; CREATE ROLE limited LOGIN CONNECTION LIMIT 1"
    )
    dsn = postgres_server.dsn_for("limited", None, "recovery_db_tests")
    holder = await asyncpg.connect(dsn)  # the role's one connection
    raw = await asyncpg.create_pool(dsn, min_size=0, max_size=1)
    resource = RetryConfig(max_attempts=3, base_delay=0.01, max_delay=0.01)
    config = TransactionConfig(
        retry=RetryPolicy(
            RetryConfig(max_attempts=2, base_delay=0.0),
            per_category={ErrorCategory.RESOURCE: resource},
        )
    )
    seen, stop = recording()
    try:
        with pytest.raises(Exception, match="too many connections") as caught:
            await transaction(raw, lambda c: fetchval(c, "SELECT 1"), config=config)
    finally:
        stop()
        await holder.close()
        await raw.close()
    assert getattr(caught.value, "sqlstate", None) == "53300"
    retries = [e for e in seen if isinstance(e, RetryScheduled)]
    assert [e.category for e in retries] == [ErrorCategory.RESOURCE] * 2  # 3 attempts, not 2


async def test_cancellation_is_never_retried_and_its_connection_is_discarded(
    pool: ManagedPool,
) -> None:
    started = asyncio.Event()
    calls = 0

    async def slow(conn: Any) -> None:
        nonlocal calls
        calls += 1
        started.set()
        await fetchval(conn, "SELECT pg_sleep(30)")

    seen, stop = recording()
    try:
        task = asyncio.ensure_future(pool.transaction(slow))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        stop()
    assert calls == 1
    assert not any(isinstance(e, RetryScheduled) for e in seen)
    assert [e.error_type for e in seen if isinstance(e, ConnectionDiscarded)] == ["CancelledError"]
    assert await pool.run(lambda c: fetchval(c, "SELECT 1")) == 1  # the pool still works


async def test_passwords_never_appear_in_errors_or_events(
    postgres_server: PostgresServer, make_proxy: Callable[[tuple[str, int]], ThreadedProxy]
) -> None:
    password = postgres_server.app_password
    proxy = make_proxy(postgres_server.address)
    dsn = postgres_server.dsn_for(
        postgres_server.app_user, password, postgres_server.app_database, port=proxy.port
    )
    seen, stop = recording()
    texts: list[str] = []
    try:
        for driver in DRIVERS:
            managed = await make_pool(driver, dsn, PoolConfig(acquire_timeout=0.5), min_size=0)
            texts.append(repr(managed))
            proxy.stop_listening()  # the server is unreachable now
            config = TransactionConfig(retry=RetryConfig(max_attempts=2, base_delay=0.0))
            try:
                await managed.transaction(lambda c: fetchval(c, "SELECT 1"), config=config)
            except Exception as exc:
                # the whole report: chained causes and contexts, notes
                texts += [repr(exc), "".join(traceback.format_exception(exc))]
            finally:
                proxy.start_listening()
                await managed.close()
    finally:
        stop()
    texts += [repr(e) for e in seen]
    assert len(texts) > 2
    assert not [t for t in texts if password in t]


# --- acknowledged only once committed ------------------------------------------


async def test_a_transaction_whose_fn_swallowed_a_server_error_raises_rolled_back(
    pool: ManagedPool,
) -> None:
    """PostgreSQL aborted the transaction; COMMIT answers ROLLBACK without raising."""
    table = await fresh_table(pool)
    await pool.run(lambda c: execute(c, f"INSERT INTO {table} VALUES (1, 1)"))
    calls = 0

    async def swallow(conn: Any) -> str:
        nonlocal calls
        calls += 1
        await execute(conn, f"INSERT INTO {table} VALUES (2, 2)")
        try:  # noqa: SIM105 - the application carries on, as in the wild
            await execute(conn, f"INSERT INTO {table} VALUES (1, 3)")  # unique violation
        except Exception:
            pass  # the application carries on: the server has aborted the transaction
        return "acknowledged"

    with pytest.raises(TransactionRolledBack) as caught:
        await pool.transaction(swallow)
    assert calls == 1  # never replayed: fn chose to swallow the error
    assert caught.value.retryable is False
    assert final_reason(caught.value) is not None  # no outer layer replays it either
    assert caught.value.code == "23505"  # the error that aborted it
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) == 1
    # The connection went back clean: the next transaction commits.
    await pool.transaction(lambda c: execute(c, f"INSERT INTO {table} VALUES (3, 3)"))
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) == 2


async def test_an_error_recovered_within_a_savepoint_still_commits(pool: ManagedPool) -> None:
    table = await fresh_table(pool)
    await pool.run(lambda c: execute(c, f"INSERT INTO {table} VALUES (1, 1)"))

    async def careful(conn: Any) -> str:
        await execute(conn, f"INSERT INTO {table} VALUES (2, 2)")
        try:
            async with conn.transaction():  # a savepoint: only it is rolled back
                await execute(conn, f"INSERT INTO {table} VALUES (1, 3)")
        except Exception:
            pass
        return "committed"

    assert await pool.transaction(careful) == "committed"
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) == 2


async def test_a_transaction_ended_by_fn_itself_is_not_acknowledged(pool: ManagedPool) -> None:
    table = await fresh_table(pool)

    async def rolls_back(conn: Any) -> str:
        await execute(conn, f"INSERT INTO {table} VALUES (1, 1)")
        await execute(conn, "ROLLBACK")
        return "acknowledged"

    with pytest.raises(TransactionRolledBack, match="no transaction was open"):
        await pool.transaction(rolls_back)
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) == 0


async def test_run_refuses_to_acknowledge_work_left_in_an_open_transaction(
    pool: ManagedPool,
) -> None:
    """Outside transaction(), fn began one and returned: releasing would roll it back."""
    table = await fresh_table(pool)

    async def leaves_it_open(conn: Any) -> str:
        await execute(conn, "BEGIN")
        await execute(conn, f"INSERT INTO {table} VALUES (1, 1)")
        return "acknowledged"

    with pytest.raises(TransactionRolledBack, match="still open"):
        await pool.run(leaves_it_open)
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) == 0


async def test_a_connection_block_left_in_a_transaction_is_not_silently_rolled_back(
    pool: ManagedPool,
) -> None:
    table = await fresh_table(pool)

    async def leave_it_open() -> None:
        async with pool.connection() as conn:
            await execute(conn, "BEGIN")
            await execute(conn, f"INSERT INTO {table} VALUES (1, 1)")

    with pytest.raises(TransactionRolledBack, match="still open"):
        await leave_it_open()
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) == 0
    async with pool.connection() as conn:  # and the connection came back clean
        assert await fetchval(conn, "SELECT 1") == 1


async def test_an_error_commit_itself_reports_is_raised_as_itself_and_not_replayed(
    pool: ManagedPool,
) -> None:
    """A deferred unique constraint fails at COMMIT: the server answered, nothing committed."""
    table = await fresh_table(pool, "id int UNIQUE DEFERRABLE INITIALLY DEFERRED")
    calls = 0

    async def twice(conn: Any) -> str:
        nonlocal calls
        calls += 1
        await execute(conn, f"INSERT INTO {table} VALUES (1)")
        await execute(conn, f"INSERT INTO {table} VALUES (1)")  # checked at COMMIT
        return "acknowledged"

    with pytest.raises(Exception, match="duplicate key") as caught:
        await pool.transaction(twice)
    assert getattr(caught.value, "sqlstate", None) == "23505" and calls == 1
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) == 0
    await pool.transaction(lambda c: execute(c, f"INSERT INTO {table} VALUES (2)"))
    assert await pool.run(lambda c: fetchval(c, f"SELECT count(*) FROM {table}")) == 1


@pytest.mark.parametrize("driver", ["asyncpg"])  # psycopg's pool opens on creation
async def test_a_first_use_that_cannot_connect_names_the_pool_and_address(
    driver: str, postgres_server: PostgresServer, make_proxy: Callable[..., ThreadedProxy]
) -> None:
    proxy = make_proxy(postgres_server.address)
    proxy.blackhole()  # connections are accepted and never answered
    dsn = postgres_server.app_dsn.replace(f":{postgres_server.port}/", f":{proxy.port}/")
    pool = await make_pool(driver, dsn, PoolConfig(name="ledger", acquire_timeout=0.2), min_size=0)
    config = TransactionConfig(retry=RetryConfig(max_attempts=1))
    try:
        with pytest.raises(PoolTimeout) as caught:
            await pool.transaction(lambda c: fetchval(c, "SELECT 1"), config=config)
    finally:
        await pool.close()
    message = str(caught.value)
    assert "'ledger'" in message and f"127.0.0.1:{proxy.port}/app" in message
    assert postgres_server.app_password not in message


async def test_a_psycopg_pool_with_a_wrong_password_fails_after_one_login(
    postgres_server: PostgresServer, make_proxy: Callable[..., ThreadedProxy]
) -> None:
    """Not psycopg_pool's "initialization incomplete" after its own retried logins."""
    proxy = make_proxy(postgres_server.address)
    wrong = postgres_server.dsn_for(
        postgres_server.app_user, "wrong", postgres_server.app_database, port=proxy.port
    )
    with pytest.raises(psycopg.OperationalError, match="password authentication failed") as caught:
        await make_pool("psycopg", wrong, PoolConfig(acquire_timeout=2.0))
    assert classify(caught.value).category is ErrorCategory.AUTH
    assert proxy.stats.connections_opened == 1


@pytest.mark.parametrize("driver", DRIVERS)
async def test_plain_driver_pools_are_not_acknowledged_a_rolled_back_transaction_either(
    driver: str, database: str
) -> None:
    """A pool the application built (psycopg: not in autocommit), wrapped per call."""
    import asyncpg
    from psycopg_pool import AsyncConnectionPool

    raw: Any
    if driver == "asyncpg":
        raw = await asyncpg.create_pool(database, min_size=0, max_size=1)
    else:
        raw = AsyncConnectionPool(database, min_size=1, max_size=1, open=False)
        await raw.open(wait=True)
    table = f"t{next(_names)}"
    try:
        await run(raw, lambda c: execute(c, f"CREATE TABLE {table} (id int primary key)"))

        async def swallow(conn: Any) -> str:
            await execute(conn, f"INSERT INTO {table} VALUES (1)")
            try:  # noqa: SIM105 - the application carries on, as in the wild
                await execute(conn, f"INSERT INTO {table} VALUES (1)")
            except Exception:
                pass
            return "acknowledged"

        with pytest.raises(TransactionRolledBack):
            await transaction(raw, swallow)
        await transaction(raw, lambda c: execute(c, f"INSERT INTO {table} VALUES (2)"))
        assert await run(raw, lambda c: fetchval(c, f"SELECT array_agg(id) FROM {table}")) == [2]
    finally:
        await raw.close()


async def test_psycopg_keeps_the_applications_cursor_class_inside_and_after_a_transaction(
    database: str,
) -> None:
    pool = await make_pool(
        "psycopg", database, kwargs={"cursor_factory": psycopg.AsyncClientCursor}, max_size=1
    )
    try:

        async def look(conn: Any) -> bool:
            return isinstance(conn.cursor(), psycopg.AsyncClientCursor)

        assert await pool.transaction(look)
        async with pool.connection() as conn:
            assert conn.cursor_factory is psycopg.AsyncClientCursor
    finally:
        await pool.close()


async def test_asyncpg_connections_go_back_without_the_transactions_query_logger(
    database: str,
) -> None:
    pool = await make_pool("asyncpg", database, max_size=1)
    try:
        table = await fresh_table(pool, "id int primary key")

        async def swallow(conn: Any) -> None:
            try:  # noqa: SIM105 - the application carries on, as in the wild
                await execute(conn, f"INSERT INTO {table} VALUES (1), (1)")
            except Exception:
                pass

        for work in (lambda c: execute(c, "SELECT 1"), swallow, lambda c: execute(c, "SELECT 1")):
            with contextlib.suppress(TransactionRolledBack):
                await pool.transaction(work)
        async with pool.raw.acquire() as conn:
            assert not conn._con._query_loggers  # none left behind on the pooled connection
    finally:
        await pool.close()


def test_an_unknown_isolation_level_names_the_field_the_value_and_every_level() -> None:
    with pytest.raises(ValueError) as info:
        TransactionConfig(isolation="chaotic")  # type: ignore[arg-type]
    assert str(info.value) == (
        "TransactionConfig.isolation: expected one of read_committed, repeatable_read, "
        "serializable, got 'chaotic'"
    )
    assert TransactionConfig(isolation="serializable").isolation is Isolation.SERIALIZABLE  # type: ignore[arg-type]
