"""The aiohttp adapter against real HTTP servers: failover, hedging, and no leaked connection."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import aiohttp
import pytest

from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery.breaker import BreakerConfig
from datapunk_recovery.flow.hedging import HedgeConfig
from datapunk_recovery.network import Endpoint, Router, RouterConfig
from datapunk_recovery.network.aiohttp import AiohttpRecovery, retryable_aiohttp_error
from datapunk_recovery.network.http import HttpStatusError
from tests.harness import ThreadedProxy
from tests.network_servers import Reply, ScriptedServer, dropping_server, scripted_servers

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def servers() -> Iterator[dict[str, ScriptedServer]]:
    with scripted_servers("p1", "p2", "s1") as started:
        yield started


def routed(*endpoints: Endpoint, **config: object) -> Router:
    settings: dict[str, object] = {
        "retry": RetryConfig(max_attempts=5, base_delay=0.0),
        "breaker": BreakerConfig(consecutive_failures=2, keep_window=True, minimum_calls=1),
        **config,
    }
    return Router("api", endpoints, RouterConfig(**settings))  # type: ignore[arg-type]


def connections_held(session: aiohttp.ClientSession) -> int:
    """Connections taken from the pool and not given back (a leak if not zero)."""
    connector = session.connector
    assert connector is not None
    return len(connector._acquired)  # type: ignore[attr-defined]


async def test_calls_fail_over_and_the_answer_is_readable_after_release(
    servers: dict[str, ScriptedServer],
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
) -> None:
    p1 = servers["p1"].answer(default=Reply(503, {"Retry-After": "0"}))
    resetting = make_proxy(servers["p2"].address)
    resetting.cut_after_bytes(0, times=None)
    router = routed(
        Endpoint("p1", p1.url),
        Endpoint("p2", f"http://127.0.0.1:{resetting.port}"),
        Endpoint("s1", servers["s1"].url, priority=1),
    )
    async with aiohttp.ClientSession() as session:
        response = await AiohttpRecovery(session, router).get("/items")
        assert response.status == 200
        assert connections_held(session) == 0  # the body was read, the connection given back
        assert await response.text() == "s1"
    # Each primary failed once, then the call fell through to the secondary.
    assert (len(p1.seen), len(servers["s1"].seen)) == (1, 1)
    assert resetting.stats.cuts == 1  # aiohttp's own re-send is off: one attempt, one request


async def test_a_hedge_wins_and_the_loser_releases_its_connection(
    servers: dict[str, ScriptedServer],
) -> None:
    p1 = servers["p1"].answer(default=Reply(hang=True))
    router = routed(
        Endpoint("p1", p1.url), Endpoint("p2", servers["p2"].url), hedge=HedgeConfig(delay=0.05)
    )
    router.breaker("p2").allow().failure(ConnectionResetError())  # p1 first
    async with aiohttp.ClientSession() as session:
        response = await AiohttpRecovery(session, router).get("/quote")
        assert await response.text() == "p2"
        assert connections_held(session) == 0


async def test_a_post_that_may_have_arrived_is_not_retried(
    servers: dict[str, ScriptedServer],
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
) -> None:
    resetting = make_proxy(servers["p1"].address)
    resetting.cut_after_bytes(0, times=None)
    router = routed(
        Endpoint("p1", f"http://127.0.0.1:{resetting.port}"), Endpoint("p2", servers["p2"].url)
    )
    router.breaker("p2").allow().failure(ConnectionResetError())  # p1 first
    async with aiohttp.ClientSession() as session:
        recovery = AiohttpRecovery(session, router)
        with pytest.raises(aiohttp.ClientError):
            await recovery.post("/orders", data=b"{}")
        assert servers["p2"].seen == []
        servers["p2"].answer(Reply(503))
        router.breaker("p1").isolate()
        with pytest.raises(HttpStatusError):  # a 503 to a POST is an error, not retried
            await recovery.post("/orders", data=b"{}")
        assert len(servers["p2"].seen) == 1
        assert connections_held(session) == 0


def test_which_transport_errors_are_retried() -> None:
    disconnected = aiohttp.ServerDisconnectedError()
    assert not retryable_aiohttp_error(disconnected, idempotent=False)
    assert retryable_aiohttp_error(disconnected, idempotent=True)
    assert not retryable_aiohttp_error(aiohttp.InvalidURL("x"), idempotent=True)


# -- one attempt, one request; hostile headers fail over ------------------------------------------


async def test_a_dropped_pooled_connection_costs_one_counted_attempt() -> None:
    with dropping_server(answered=1) as server:
        router = routed(Endpoint("only", server.url))
        async with aiohttp.ClientSession() as session:
            client = AiohttpRecovery(session, router)
            assert (await client.get("/warm")).status == 200  # the connection is pooled
            response = await client.put("/item", data=b"v")  # dropped, then a new connection
            assert response.status == 200
    assert router.statistics().attempts == 3  # 1 + 2
    assert server.requests == 3  # aiohttp re-sent nothing behind the router's back


@pytest.mark.parametrize(
    "retry_after",
    [
        "Wed, 21 Oct 2015 07:28:00 +99999999999999999999",
        "Wed, 21 Oct 99999999999999999999 07:28:00 GMT",
        "Wed, 21 Oct 2015 99999999999999999999:28:00 GMT",
        "1e3",
        "\u0661\u0662",
    ],
)
async def test_a_hostile_retry_after_fails_over_to_the_healthy_endpoint(
    servers: dict[str, ScriptedServer], retry_after: str
) -> None:
    p1 = servers["p1"].answer(default=Reply(503, {"Retry-After": retry_after}))
    router = routed(Endpoint("p1", p1.url), Endpoint("p2", servers["p2"].url))
    router.breaker("p2").allow().failure(ConnectionResetError())  # p1 first
    async with aiohttp.ClientSession() as session:
        response = await AiohttpRecovery(session, router).get("/")
        assert await response.text() == "p2"
    assert len(p1.seen) == 1


async def test_a_session_that_raises_for_status_still_fails_over_and_answers_the_rest(
    servers: dict[str, ScriptedServer],
) -> None:
    p1 = servers["p1"].answer(Reply(503), Reply(404), Reply(404))
    router = routed(Endpoint("p1", p1.url), Endpoint("p2", servers["p2"].url))
    router.breaker("p2").allow().failure(ConnectionResetError())  # p1 first
    async with aiohttp.ClientSession(raise_for_status=True) as session:
        api = AiohttpRecovery(session, router)
        assert await (await api.get("/")).text() == "p2"  # the 503 was judged, not raised
        router.breaker("p2").isolate()
        response = await api.get("/missing")
        assert response.status == 404  # an answer: returned, the caller decides
        with pytest.raises(aiohttp.ClientResponseError):  # when the caller asks aiohttp to raise
            await api.get("/", raise_for_status=True)


async def test_an_aiohttp_without_the_resend_switch_is_refused() -> None:
    async with aiohttp.ClientSession() as session:
        del session._retry_connection  # as an aiohttp that moved the switch would be
        with pytest.raises(TypeError, match="_retry_connection"):
            AiohttpRecovery(session, routed(Endpoint("a", "http://127.0.0.1:1")))
        session._retry_connection = True  # what close() may read
