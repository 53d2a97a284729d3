"""What httpx does, pinned on real loopback servers: an upgrade that changes it fails here.

The adapter (:mod:`datapunk_recovery.network.httpx`) relies on each fact
below: httpx never re-sends a request by itself (a dropped pooled connection
is an error, so one attempt is one request), its transport's ``retries``
retry connections only and are off by default (and the adapter refuses a
client that turns them on), which exception each transport failure raises,
and that a status is an answer, not an exception.
"""

from __future__ import annotations

import httpx
import pytest

from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery.network import Endpoint, Router, RouterConfig
from datapunk_recovery.network.httpx import HttpxRecovery, retryable_httpx_error
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


def router_for(url: str, attempts: int = 3) -> Router:
    config = RouterConfig(retry=RetryConfig(max_attempts=attempts, base_delay=0.0))
    return Router("api", [Endpoint("only", url)], config)


async def test_httpx_does_not_resend_on_a_dropped_pooled_connection() -> None:
    with dropping_server(answered=1) as server:
        async with httpx.AsyncClient() as client:
            assert (await client.get(server.url)).status_code == 200  # pooled
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await client.get(server.url)
    assert (server.requests, server.dropped) == (2, 1)
    assert retryable_httpx_error(caught.value, idempotent=True)
    assert not retryable_httpx_error(caught.value, idempotent=False)  # may have arrived


async def test_the_adapter_sends_one_request_per_attempt_it_counts() -> None:
    with dropping_server(answered=0) as server:
        router = router_for(server.url)
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await HttpxRecovery(client, router).get("/")
    assert router.statistics().attempts == server.requests == 3


async def test_transport_retries_are_off_by_default() -> None:
    async with httpx.AsyncClient() as client:
        assert client._transport._pool._retries == 0  # type: ignore[attr-defined]


async def test_transport_retries_retry_connections_only_and_the_adapter_refuses_them() -> None:
    transport = httpx.AsyncHTTPTransport(retries=2)
    assert transport._pool._retries == 2  # where the adapter reads it
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(ValueError, match=r"HttpxRecovery\.client: .*retries=2"):
            HttpxRecovery(client, router_for("http://127.0.0.1:1"))
    mounted = httpx.AsyncClient(mounts={"http://": httpx.AsyncHTTPTransport(retries=1)})
    async with mounted:
        with pytest.raises(ValueError, match="retries=1"):
            HttpxRecovery(mounted, router_for("http://127.0.0.1:1"))
    with dropping_server(answered=0) as server:  # a request that was sent is never re-sent
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(retries=3)) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(server.url)
    assert server.requests == 1


async def test_a_refused_connection_raises_connect_error() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError) as caught:
            await client.get(refused_address())
    assert retryable_httpx_error(caught.value, idempotent=False)  # never left: any method


async def test_a_reset_after_the_request_raises_read_error() -> None:
    with dropping_server(answered=0, reset=True) as server:
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.ReadError) as caught:
                await client.get(server.url)
    assert server.requests == 1
    assert retryable_httpx_error(caught.value, idempotent=True)
    assert not retryable_httpx_error(caught.value, idempotent=False)


async def test_a_drop_after_the_request_raises_remote_protocol_error() -> None:
    with dropping_server(answered=0) as server:
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(server.url)
    assert server.requests == 1


async def test_a_read_timeout_raises_read_timeout(server: ScriptedServer) -> None:
    server.answer(Reply(hang=True))
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.05)) as client:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await client.get(server.url)
    assert retryable_httpx_error(caught.value, idempotent=True)
    assert not retryable_httpx_error(caught.value, idempotent=False)


async def test_a_status_is_answered_not_raised(server: ScriptedServer) -> None:
    server.answer(Reply(503, {"Retry-After": "1"}), Reply(401))
    async with httpx.AsyncClient() as client:
        for status in (503, 401):
            response = await client.get(server.url)
            assert response.status_code == status
            assert response.headers["Retry-After" if status == 503 else "Content-Length"]


async def test_a_raising_event_hook_raises_http_status_error_with_the_response(
    server: ScriptedServer,
) -> None:
    server.answer(Reply(503))

    async def raise_on_4xx_5xx(response: httpx.Response) -> None:
        response.raise_for_status()

    async with httpx.AsyncClient(event_hooks={"response": [raise_on_4xx_5xx]}) as client:
        with pytest.raises(httpx.HTTPStatusError) as caught:
            await client.get(server.url)
    assert caught.value.response.status_code == 503
    assert not retryable_httpx_error(caught.value, idempotent=True)  # the adapter judges it
