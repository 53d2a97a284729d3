"""What aiohttp does, pinned on real loopback servers: an upgrade that changes it fails here.

The adapter (:mod:`datapunk_recovery.network.aiohttp`) relies on each fact
below: which exception each transport failure raises (so
``retryable_aiohttp_error`` tells "never left" from "may have arrived"), that
a status is an answer and not an exception, and that aiohttp's own hidden
re-send of a dropped request exists and is turned off by the switch the
adapter flips, so that one attempt is one request.
"""

from __future__ import annotations

import aiohttp
import pytest

from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery.network import Endpoint, Router, RouterConfig
from datapunk_recovery.network.aiohttp import AiohttpRecovery, retryable_aiohttp_error
from tests.network_servers import (
    Reply,
    ScriptedServer,
    dropping_server,
    refused_address,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_raw_aiohttp_resends_a_get_once_when_its_connection_drops() -> None:
    with dropping_server(answered=0) as server:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await session.get(server.url)
    assert server.requests == 2  # one call, two requests: the re-send the router cannot see


async def test_raw_aiohttp_resends_a_get_on_a_dropped_pooled_connection_and_hides_it() -> None:
    with dropping_server(answered=1) as server:
        async with aiohttp.ClientSession() as session:
            (await session.get(server.url)).release()  # pooled
            response = await session.get(server.url)  # dropped, re-sent on a new connection
            assert response.status == 200
    assert (server.requests, server.dropped, server.connections) == (3, 1, 2)


async def test_raw_aiohttp_does_not_resend_a_post() -> None:
    with dropping_server(answered=0) as server:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await session.post(server.url, data=b"x")
    assert server.requests == 1


async def test_the_session_switch_turns_the_resend_off() -> None:
    with dropping_server(answered=0) as server:
        async with aiohttp.ClientSession() as session:
            assert session._retry_connection is True  # the switch exists, on by default
            session._retry_connection = False
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await session.get(server.url)
    assert server.requests == 1


async def test_the_adapter_sends_one_request_per_attempt_it_counts() -> None:
    with dropping_server(answered=0) as server:
        router = Router(
            "api",
            [Endpoint("only", server.url)],
            RouterConfig(retry=RetryConfig(max_attempts=3, base_delay=0.0)),
        )
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await AiohttpRecovery(session, router).get("/")
            assert session._retry_connection is False
    assert router.statistics().attempts == 3
    assert server.requests == 3  # not 6


async def test_a_refused_connection_raises_client_connector_error() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get(refused_address())
    assert retryable_aiohttp_error(caught.value, idempotent=False)  # never left: any method


async def test_a_drop_after_the_request_raises_server_disconnected_error() -> None:
    with dropping_server(answered=0) as server:
        async with aiohttp.ClientSession() as session:
            session._retry_connection = False
            with pytest.raises(aiohttp.ServerDisconnectedError) as caught:
                await session.get(server.url)
    assert retryable_aiohttp_error(caught.value, idempotent=True)
    assert not retryable_aiohttp_error(caught.value, idempotent=False)  # may have arrived


async def test_a_reset_after_the_request_raises_client_os_error() -> None:
    with dropping_server(answered=0, reset=True) as server:
        async with aiohttp.ClientSession() as session:
            session._retry_connection = False
            with pytest.raises(aiohttp.ClientOSError) as caught:
                await session.get(server.url)
    assert not isinstance(caught.value, aiohttp.ClientConnectorError)
    assert retryable_aiohttp_error(caught.value, idempotent=True)
    assert not retryable_aiohttp_error(caught.value, idempotent=False)


async def test_a_read_timeout_raises_server_timeout_error(server: ScriptedServer) -> None:
    server.answer(Reply(hang=True))
    timeout = aiohttp.ClientTimeout(sock_read=0.05)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        session._retry_connection = False
        with pytest.raises(aiohttp.ServerTimeoutError) as caught:
            await session.get(server.url)
    assert isinstance(caught.value, TimeoutError)
    assert not retryable_aiohttp_error(caught.value, idempotent=False)


async def test_a_total_timeout_raises_a_timeout_error(server: ScriptedServer) -> None:
    server.answer(Reply(hang=True))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.05)) as session:
        with pytest.raises(TimeoutError) as caught:
            await session.get(server.url)
    assert retryable_aiohttp_error(caught.value, idempotent=True)
    assert not retryable_aiohttp_error(caught.value, idempotent=False)


async def test_a_status_is_answered_not_raised(server: ScriptedServer) -> None:
    server.answer(Reply(503, {"Retry-After": "1"}), Reply(401))
    async with aiohttp.ClientSession() as session:
        for status in (503, 401):
            response = await session.get(server.url)
            assert response.status == status
            assert response.headers["Content-Length"]
            response.release()


async def test_a_session_raising_for_status_raises_client_response_error_unless_told_not_to(
    server: ScriptedServer,
) -> None:
    server.answer(Reply(503), Reply(503))
    async with aiohttp.ClientSession(raise_for_status=True) as session:
        with pytest.raises(aiohttp.ClientResponseError) as caught:
            await session.get(server.url)
        assert caught.value.status == 503
        response = await session.get(server.url, raise_for_status=False)  # what the adapter sends
        assert response.status == 503
        response.release()
