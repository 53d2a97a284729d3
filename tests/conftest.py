"""Shared test configuration: real servers, fault proxy, markers, hypothesis, anyio."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from hypothesis import settings

# Make ``tests.harness`` importable whatever the import mode / entry point.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from datapunk_recovery._core import events  # noqa: E402
from datapunk_recovery._core.clock import FakeClock  # noqa: E402
from datapunk_recovery._core.events import Event  # noqa: E402
from datapunk_recovery.testing import fake_clock  # noqa: E402
from tests.harness import PostgresServer, RedisServer, ThreadedProxy  # noqa: E402
from tests.harness.servers import (  # noqa: E402
    RedisClusterServers,
    RedisSentinelServers,
    _ManagedServer,
)

if TYPE_CHECKING:
    from datapunk_recovery.stores.redis import RedisStore

S = TypeVar("S", bound=_ManagedServer)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# ---------------------------------------------------------------------------
# hypothesis
# ---------------------------------------------------------------------------
# Not derandomized: scripts/test.sh draws a --hypothesis-seed per run and
# prints it (with PYTHONHASHSEED), so CI explores and a failure replays.
settings.register_profile("ci", deadline=None, max_examples=50, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if IN_CI else "dev"))


def pytest_report_header(config: pytest.Config) -> str:
    """The seeds of this run, at the top of its output, to replay a failure."""
    hash_seed = os.environ.get("PYTHONHASHSEED") or "random (not replayable)"
    hypothesis_seed = config.getoption("hypothesis_seed", None)
    return f"PYTHONHASHSEED={hash_seed} --hypothesis-seed={hypothesis_seed or 'random'}"


# ---------------------------------------------------------------------------
# markers
# ---------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "drill: fault drill against real servers (each must finish within 20 s)"
    )
    config.addinivalue_line("markers", "soak: long-running soak test")


# ---------------------------------------------------------------------------
# anyio: every @pytest.mark.anyio test runs on asyncio AND trio by default.
# An asyncio-only module overrides it:
#     @pytest.fixture
#     def anyio_backend() -> str:
#         return "asyncio"
# ---------------------------------------------------------------------------
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


# ---------------------------------------------------------------------------
# real servers (started lazily, once per session)
# ---------------------------------------------------------------------------
_STARTED: list[_ManagedServer] = []


def _start(factory: Callable[[], S], what: str) -> S:
    """Start a server; if impossible: fail under CI=true, skip otherwise."""
    server: S | None = None
    error: str | None = None
    try:
        server = factory()
        server.start()
    except Exception as exc:  # any start failure becomes a skip (a failure under CI)
        error = f"{what} unavailable: {type(exc).__name__}: {exc}"
        if server is not None:
            server.close()
    if error is not None or server is None:
        msg = error or f"{what} unavailable"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    _STARTED.append(server)
    return server


def _finish(server: _ManagedServer) -> None:
    if server in _STARTED:
        _STARTED.remove(server)
    server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """Real redis-server for the session. ``.url`` = ``redis://127.0.0.1:PORT/0``."""
    server = _start(RedisServer, "redis-server")
    yield server
    _finish(server)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own (no persistence), to restart empty on the same port."""
    server = _start(RedisServer, "redis-server (private)")
    _STARTED.remove(server)  # its test stops and restarts it on purpose
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Real PostgreSQL for the session. ``.dsn`` (superuser, trust) / ``.app_dsn`` (scram)."""
    server = _start(PostgresServer, "PostgreSQL")
    yield server
    _finish(server)


@pytest.fixture(autouse=True)
def _servers_back_up() -> Iterator[None]:
    """After each test, bring back any session server a drill stopped, killed or paused."""
    yield
    for server in list(_STARTED):
        server.ensure_running()


@pytest.fixture
def make_proxy() -> Iterator[Callable[[tuple[str, int]], ThreadedProxy]]:
    """Factory for started ``ThreadedProxy`` instances, all stopped after the test.

    Works from sync, asyncio and trio tests::

        def test_x(make_proxy, redis_server):
            proxy = make_proxy(redis_server.address)
            url = f"redis://127.0.0.1:{proxy.port}/0"
    """
    proxies: list[ThreadedProxy] = []

    def factory(target: tuple[str, int]) -> ThreadedProxy:
        proxy = ThreadedProxy(target).start()
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
        proxy.stop()


# ---------------------------------------------------------------------------
# what the library reports, and shared-state stores on the real Redis
# ---------------------------------------------------------------------------
@pytest.fixture
def seen() -> Iterator[list[Event]]:
    """Every event the library emits during the test, in order."""
    got: list[Event] = []
    unsubscribe = events.subscribe(got.append)
    yield got
    unsubscribe()


@pytest.fixture
def fake() -> Iterator[FakeClock]:
    """A fake clock installed for the test, starting at 1000 s."""
    with fake_clock(1000.0) as clock:
        yield clock


@pytest.fixture
async def redis_stores(redis_server: RedisServer) -> AsyncIterator[Callable[..., RedisStore]]:
    """Make ``RedisStore``s (on ``redis_server`` unless given a URL); closed after the test.

    Tests that also use ``make_proxy`` ask for it *before* this fixture, so that
    the clients close before the proxy stops (teardown runs in reverse order).
    """
    from datapunk_recovery.stores.redis import RedisStore

    made: list[RedisStore] = []

    def make(url: str | None = None, **settings: Any) -> RedisStore:
        store = RedisStore(url or redis_server.url, **settings)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


#: The password of the ``locked_redis`` server (and ``reader-pw`` for its ACL user ``reader``).
LOCKED_REDIS_PASSWORD = "locked-redis-password"


@pytest.fixture(scope="session")
def locked_redis() -> Iterator[RedisServer]:
    """A private redis-server that requires ``.password``, plus a read-only ACL user ``reader``.

    Separate from ``redis_server`` (whose tests need no password); the
    password is set once the server runs, since the harness's readiness check
    pings without one.
    """
    import redis as redis_sync

    server = _start(RedisServer, "redis-server (password)")
    assert server.command("CONFIG", "SET", "requirepass", LOCKED_REDIS_PASSWORD) == b"+OK"
    _STARTED.remove(server)  # _servers_back_up pings without a password
    admin = redis_sync.Redis(host=server.host, port=server.port, password=LOCKED_REDIS_PASSWORD)
    admin.execute_command("ACL", "SETUSER", "reader", "on", ">reader-pw", "~*", "+get", "+ping")
    admin.close()
    server.password = LOCKED_REDIS_PASSWORD  # type: ignore[attr-defined]
    yield server
    server.close()


# ---------------------------------------------------------------------------
# Redis Cluster and Redis Sentinel (started lazily, once per session, only by
# the tests that ask for them: each takes about two seconds to form)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A real Redis Cluster: 3 masters + 3 replicas, ``cluster_state:ok``.

    ``.startup_nodes`` / ``.url`` for clients; ``kill_master_of(key)``,
    ``wait_for_new_master(key, old)``, ``begin_migration(slot)`` /
    ``migrate_slot(slot)`` for drills.  A killed node is restarted (as a
    replica) and the cluster waited healthy after each test.
    """
    server = _start(RedisClusterServers, "Redis Cluster")
    yield server
    _finish(server)


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelServers]:
    """A real Sentinel setup: 1 master + 1 replica + 3 ``redis-server --sentinel``.

    ``.sentinel_addresses`` and ``.service`` (``"mymaster"``) for
    ``Sentinel(...).master_for(...)``; ``kill_master()`` /
    ``wait_for_new_master(old)`` for drills.
    """
    server = _start(RedisSentinelServers, "Redis Sentinel")
    yield server
    _finish(server)
