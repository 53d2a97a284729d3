"""Tests of the real-server harness and the fault-injecting proxy (asyncio only)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import asyncpg
import psycopg
import pytest
import redis
import redis.asyncio as aioredis

from tests.harness import (
    APP_PASSWORD,
    FaultProxy,
    PostgresServer,
    RedisServer,
    ThreadedProxy,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def redis_proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(redis_server.address) as proxy:
        yield proxy


@pytest.fixture
async def pg_proxy(postgres_server: PostgresServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(postgres_server.address) as proxy:
        yield proxy


async def _ping_raw(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a raw connection and complete one PING round trip."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"PING\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 2) == b"+PONG\r\n"
    return reader, writer


async def _get(url: str, key: str) -> bytes | None:
    client = aioredis.from_url(url)
    try:
        value = await client.get(key)
        assert value is None or isinstance(value, bytes)
        return value
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------


async def test_redis_answers_ping(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = aioredis.from_url(redis_server.url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_redis_restart_keeps_port() -> None:
    with RedisServer() as server:
        port, pid = server.port, server.pid
        server.command("SET", "k", "v")
        server.restart(keep_data=True)
        assert server.port == port
        assert server.pid != pid
        assert await _get(server.url, "k") == b"v"
        server.restart()  # default: data is lost, like a crashed cache
        assert server.port == port
        assert await _get(server.url, "k") is None
        server.stop()
        assert not server.is_running
        assert not server.ping()
        server.ensure_running()
        assert server.ping()


async def test_postgres_select_1_asyncpg_and_psycopg(postgres_server: PostgresServer) -> None:
    assert postgres_server.dsn == f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres"
    conn = await asyncpg.connect(postgres_server.dsn)
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()
    aconn = await psycopg.AsyncConnection.connect(postgres_server.dsn)
    try:
        cur = await aconn.execute("select 1")
        assert await cur.fetchone() == (1,)
    finally:
        await aconn.close()


async def test_postgres_app_role_needs_password(postgres_server: PostgresServer) -> None:
    conn = await asyncpg.connect(postgres_server.app_dsn)
    try:
        assert await conn.fetchval("select current_user") == "app"
        assert await conn.fetchval("select current_database()") == "app"
        await conn.execute("create table if not exists harness_t (x int)")  # owns its db
    finally:
        await conn.close()
    wrong = postgres_server.dsn_for("app", "wrong-" + APP_PASSWORD, "app")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)
    with pytest.raises(psycopg.OperationalError, match="password"):
        await psycopg.AsyncConnection.connect(postgres_server.dsn_for("app", None, "app"))


async def test_postgres_restart_keeps_port_and_data(postgres_server: PostgresServer) -> None:
    postgres_server.psql(
        "create table if not exists harness_restart (x int); "
        "truncate harness_restart; insert into harness_restart values (42)"
    )
    port = postgres_server.port
    postgres_server.restart()
    assert postgres_server.port == port
    conn = await asyncpg.connect(postgres_server.dsn)
    try:
        assert await conn.fetchval("select x from harness_restart") == 42
    finally:
        await conn.close()


# ---------------------------------------------------------------------------
# proxy
# ---------------------------------------------------------------------------


async def test_proxy_passthrough_redis(redis_proxy: FaultProxy) -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{redis_proxy.port}/0")
    try:
        await client.set("harness:pass", "yes")
        assert await client.get("harness:pass") == b"yes"
        assert redis_proxy.stats.connections_opened == 1
        assert redis_proxy.stats.connections_active == 1
        assert redis_proxy.stats.bytes_up > 0
        assert redis_proxy.stats.bytes_down > 0
    finally:
        await client.aclose()
    await redis_proxy.wait_until(lambda p: p.stats.connections_active == 0)
    assert redis_proxy.count("close") == 1


async def test_proxy_latency_is_accounted(redis_proxy: FaultProxy) -> None:
    reader, writer = await _ping_raw(*redis_proxy.address)
    assert redis_proxy.stats.delayed_chunks == 0
    redis_proxy.set_latency(0.05)
    writer.write(b"PING\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 2) == b"+PONG\r\n"
    # one delayed chunk each way
    assert redis_proxy.stats.delayed_chunks == 2
    assert redis_proxy.stats.injected_delay == pytest.approx(0.1)
    redis_proxy.clear()
    writer.write(b"PING\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 2) == b"+PONG\r\n"
    assert redis_proxy.stats.delayed_chunks == 2
    writer.close()


async def test_proxy_reset_all(redis_proxy: FaultProxy) -> None:
    reader, writer = await _ping_raw(*redis_proxy.address)
    assert redis_proxy.reset_all() == 1
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(reader.read(100), 2)
    await redis_proxy.wait_until(lambda p: p.stats.connections_active == 0)
    assert redis_proxy.stats.resets == 1
    writer.close()
    # a client library sees a ConnectionError too (no retries)
    client = aioredis.from_url(
        f"redis://127.0.0.1:{redis_proxy.port}/0", retry=None, retry_on_error=[]
    )
    try:
        assert await client.ping()
        redis_proxy.reset_all()
        with pytest.raises(redis.ConnectionError):
            await client.ping()
    finally:
        await client.aclose()


async def test_proxy_blackhole_times_out_then_clears(redis_proxy: FaultProxy) -> None:
    reader, writer = await _ping_raw(*redis_proxy.address)
    redis_proxy.blackhole()
    writer.write(b"PING\r\n")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readline(), 0.2)
    assert redis_proxy.stats.blackholed_bytes == 6
    # a new connection is accepted but never answered either
    r2, w2 = await asyncio.open_connection(*redis_proxy.address)
    w2.write(b"PING\r\n")
    await w2.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r2.readline(), 0.2)
    await redis_proxy.wait_until(lambda p: p.stats.blackholed_bytes == 12)
    redis_proxy.clear()
    _, w3 = await _ping_raw(*redis_proxy.address)
    for w in (writer, w2, w3):
        w.close()


async def test_proxy_cut_after_bytes(redis_proxy: FaultProxy) -> None:
    reader, writer = await _ping_raw(*redis_proxy.address)
    up_before = redis_proxy.stats.bytes_up
    redis_proxy.cut_after_bytes(4)
    writer.write(b"PING\r\nPING\r\n")
    await writer.drain()
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(reader.read(100), 2)
    assert redis_proxy.stats.bytes_up - up_before == 4
    assert redis_proxy.stats.cuts == 1
    writer.close()
    # one-shot: the next connection is not cut
    _, w2 = await _ping_raw(*redis_proxy.address)
    w2.close()


async def test_proxy_cut_before_commit(
    postgres_server: PostgresServer, pg_proxy: FaultProxy
) -> None:
    postgres_server.psql("create table if not exists harness_cut (x int); truncate harness_cut")
    conn = await asyncpg.connect(postgres_server.dsn_for("postgres", port=pg_proxy.port))
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("insert into harness_cut values (1)")
        pg_proxy.cut_on_pattern(b"COMMIT")
        with pytest.raises(
            (ConnectionError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
        ):
            await tx.commit()
    finally:
        conn.terminate()
    assert pg_proxy.stats.cuts == 1
    # the server never saw COMMIT: the row is not there (once the backend is gone)
    await _wait_backends_gone(postgres_server)
    assert postgres_server.psql("select count(*) from harness_cut") == "0"


async def test_proxy_cut_after_forwarding_commit(
    postgres_server: PostgresServer, pg_proxy: FaultProxy
) -> None:
    postgres_server.psql("create table if not exists harness_cut2 (x int); truncate harness_cut2")
    aconn = await psycopg.AsyncConnection.connect(
        postgres_server.dsn_for("postgres", port=pg_proxy.port)
    )
    try:
        await aconn.execute("insert into harness_cut2 values (1)")
        pg_proxy.cut_on_pattern(b"COMMIT", forward=True)
        with pytest.raises(psycopg.OperationalError):
            await aconn.commit()
    finally:
        await aconn.close()
    assert pg_proxy.stats.cuts == 1
    # ambiguous commit: the client saw an error, but the server did commit
    await _wait_backends_gone(postgres_server)
    assert postgres_server.psql("select count(*) from harness_cut2") == "1"


async def _wait_backends_gone(server: PostgresServer, timeout: float = 5.0) -> None:
    """Bounded polling until no client backend other than psql's own is left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sql = (
        "select count(*) from pg_stat_activity where backend_type = 'client backend' "
        "and pid <> pg_backend_pid()"
    )
    while server.psql(sql) != "0":
        assert loop.time() < deadline, "backends still alive"
        await asyncio.sleep(0.05)


async def test_proxy_stop_and_restart_listening(redis_proxy: FaultProxy) -> None:
    _, kept = await _ping_raw(*redis_proxy.address)
    port = redis_proxy.port
    await redis_proxy.stop_listening()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*redis_proxy.address)
    await redis_proxy.start_listening()
    assert redis_proxy.port == port
    _, w = await _ping_raw(*redis_proxy.address)
    assert redis_proxy.stats.connections_opened == 2
    for writer in (kept, w):
        writer.close()


def test_threaded_proxy_sync(
    redis_server: RedisServer, make_proxy: Callable[[tuple[str, int]], ThreadedProxy]
) -> None:
    proxy = make_proxy(redis_server.address)
    client = redis.Redis(port=proxy.port)
    try:
        assert client.ping()
        proxy.set_latency(0.01)
        assert client.ping()
        assert proxy.stats.delayed_chunks == 2
        proxy.clear()
        with socket.create_connection(proxy.address, timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(100) == b"+PONG\r\n"
            assert proxy.reset_all() == 2
            with pytest.raises(ConnectionResetError):
                sock.recv(100)
        proxy.wait_until(lambda p: p.stats.connections_active == 0)
        proxy.stop_listening()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=1)
        proxy.start_listening()
        socket.create_connection(proxy.address, timeout=1).close()
        proxy.wait_event("close", 3)
        assert client.ping()  # the client library reconnects by itself
    finally:
        client.close()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_threaded_proxy_under_trio(
    redis_server: RedisServer, make_proxy: Callable[[tuple[str, int]], ThreadedProxy]
) -> None:
    import trio

    proxy = make_proxy(redis_server.address)
    stream = await trio.open_tcp_stream(*proxy.address)
    async with stream:
        await stream.send_all(b"PING\r\n")
        assert await stream.receive_some(100) == b"+PONG\r\n"
        proxy.blackhole()
        await stream.send_all(b"PING\r\n")
        await proxy.wait_until_async(lambda p: p.stats.blackholed_bytes == 6)
        with trio.move_on_after(0.2) as scope:
            await stream.receive_some(100)
        assert scope.cancelled_caught
