"""Clients built from URLs (`stores.clients`): what each new connection costs to set up.

redis-py names itself to the server on every new connection (``CLIENT
SETINFO``); newer versions read their package metadata for that each time
unless told the version.  A shared breaker's first calls open several
connections at once, so the read is paid here once per process.
"""

from __future__ import annotations

import cProfile
import importlib.metadata
import pstats
from collections.abc import Callable

import pytest

from datapunk_recovery.stores.clients import client_from_url
from datapunk_recovery.stores.redis import RedisStore
from tests.harness import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _metadata_reads(profile: cProfile.Profile) -> int:
    """How many package metadata look-ups (``importlib.metadata.distribution``) ran."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    return sum(
        calls
        for (path, _line, func), (_prim, calls, *_rest) in stats.items()
        if func == "distribution"
        and path.replace("\\", "/").endswith("importlib/metadata/__init__.py")
    )


async def test_a_stores_new_connections_do_not_each_read_the_drivers_package_metadata(
    redis_stores: Callable[..., RedisStore],
) -> None:
    store = redis_stores()
    pool = store.client.connection_pool
    profile = cProfile.Profile()
    profile.enable()
    try:
        connections = [await pool.get_connection() for _ in range(6)]  # six connected sockets
    finally:
        profile.disable()
    for connection in connections:
        await pool.release(connection)
    assert len({id(c) for c in connections}) == 6
    assert _metadata_reads(profile) == 0  # read once per process, when the client was built


async def test_the_driver_still_names_itself_with_its_installed_version(
    redis_server: RedisServer,
) -> None:
    client, _ = client_from_url(redis_server.url, timeout=2.0, owner="probe")
    try:
        info = client.connection_pool.connection_kwargs["driver_info"]
        assert info.formatted_name == "redis-py"
        assert info.lib_version == importlib.metadata.version("redis")
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_callers_own_driver_identity_wins(redis_server: RedisServer) -> None:
    from redis.driver_info import DriverInfo

    mine = DriverInfo(lib_version="1.2.3").add_upstream_driver("my-app", "4.5")
    client, _ = client_from_url(redis_server.url, timeout=2.0, owner="probe", driver_info=mine)
    try:
        assert client.connection_pool.connection_kwargs["driver_info"] is mine
    finally:
        await client.aclose()
