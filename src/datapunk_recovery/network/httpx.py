"""The httpx adapter: requests over a `Router`'s endpoints.

``HttpxRecovery(client, router)`` sends each attempt of a request to the
endpoint the router picks (``endpoint.address`` is the base URL, the request
gives the path), judges the answer with [`HttpPolicy`][datapunk_recovery.network.http.HttpPolicy]
and lets
the router retry, fail over and hedge.  A response that will be retried is
closed before the retry, so its connection goes back to the client's pool;
the response returned has its body read (httpx's non-streaming requests).

Transport failures: a request that never reached the server
(``httpx.ConnectError``, ``httpx.ConnectTimeout``) is retried whatever its
method; one that may have (``httpx.ReadError``, ``httpx.ReadTimeout``,
``httpx.RemoteProtocolError``, ``httpx.WriteError``, ...) only if it is
idempotent.

One attempt is one request sent: httpx never re-sends a request by itself
(a dropped pooled connection raises ``RemoteProtocolError``), but a transport
made with ``httpx.AsyncHTTPTransport(retries=n)`` retries failed connections
inside one attempt, with its own sleeps, unseen by the budget and the
statistics.  A client with such a transport is refused (``ValueError``):
the router does the retrying.  Both facts are pinned by the contract tests
(``tests/contracts/test_httpx_contract.py``).

``httpx`` is imported by this module only (``pip install
'datapunk-recovery[httpx]'``).  asyncio and trio, as httpx itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datapunk_recovery._core.errors import classify
from datapunk_recovery._core.extras import raise_missing

from .http import HttpPolicy, HttpRecovery, HttpStatusError
from .router import Router

try:
    import httpx
except ImportError as exc:
    raise_missing(exc, "datapunk_recovery.network.httpx", "httpx", extra="httpx")

__all__ = ["HttpxRecovery", "retryable_httpx_error"]

_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
_MAYBE_SENT = (
    httpx.ReadError,
    httpx.WriteError,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.RemoteProtocolError,
)


def retryable_httpx_error(exc: BaseException, idempotent: bool) -> bool:
    """Whether ``exc``, raised by an attempt, may be retried on another endpoint."""
    if isinstance(exc, HttpStatusError):
        return exc.retryable
    if isinstance(exc, _NOT_SENT):
        return True
    if isinstance(exc, _MAYBE_SENT):
        return idempotent
    if isinstance(exc, httpx.HTTPError):  # a bad URL, a decoding error, a closed client
        return False
    return classify(exc).retryable and idempotent


def _connect_retries(client: httpx.AsyncClient) -> int:
    """The most connection retries any of ``client``'s transports makes by itself."""
    transports = [getattr(client, "_transport", None)]
    transports.extend(getattr(client, "_mounts", {}).values())
    most = 0
    for transport in transports:
        retries = getattr(getattr(transport, "_pool", None), "_retries", 0)
        if isinstance(retries, int) and not isinstance(retries, bool):
            most = max(most, retries)
    return most


class HttpxRecovery(HttpRecovery[httpx.Response]):
    """Recovering requests with an ``httpx.AsyncClient`` over ``router``'s endpoints.

    Faces (from [`HttpRecovery`][datapunk_recovery.network.http.HttpRecovery]):
    ``request(method, path, ...)``
    and ``get`` / ``post`` / ``put`` / ``delete``; other keyword arguments go to
    ``client.request`` (``params``, ``json``, ``content``, ``timeout``...).
    A client whose transport retries connections itself is refused.
    """

    __slots__ = ("client",)

    def __init__(
        self, client: httpx.AsyncClient, router: Router, policy: HttpPolicy | None = None
    ) -> None:
        if not isinstance(client, httpx.AsyncClient):
            raise TypeError(
                "HttpxRecovery.client: expected an httpx.AsyncClient, "
                f"got {type(client).__name__}"  # never its repr: a URL given by mistake
            )
        retries = _connect_retries(client)
        if retries:
            raise ValueError(
                f"HttpxRecovery.client: its transport retries connections itself (retries="
                f"{retries}), attempts the router could not count or bound; give the client "
                "a transport with retries=0 (httpx's default) and let the router retry"
            )
        super().__init__(router, policy)
        self.client = client

    async def _send(
        self, method: str, url: str, headers: dict[str, str], kwargs: Any
    ) -> httpx.Response:
        return await self.client.request(method, url, headers=headers, **kwargs)

    def _answer(self, response: httpx.Response) -> tuple[int, Mapping[str, str]]:
        return response.status_code, response.headers

    async def _discard(self, response: httpx.Response) -> None:
        # A non-streaming response is read and closed already: then no checkpoint.
        await response.aclose()

    def _retryable(self, exc: BaseException, idempotent: bool) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            # A status raised by the client's own event hook: judged as the answer would be.
            return idempotent and exc.response.status_code in self.policy.retry_statuses
        return retryable_httpx_error(exc, idempotent)
