"""The httpx adapter: requests over a :class:`~.router.Router`'s endpoints.

``HttpxRecovery(client, router)`` sends each attempt of a request to the
endpoint the router picks (``endpoint.address`` is the base URL, the request
gives the path), judges the answer with :class:`~.http.HttpPolicy` and lets
the router retry, fail over and hedge.  A response that will be retried is
closed before the retry, so its connection goes back to the client's pool;
the response returned has its body read (httpx's non-streaming requests).

Transport failures: a request that never reached the server
(``httpx.ConnectError``, ``httpx.ConnectTimeout``) is retried whatever its
method; one that may have (``httpx.ReadError``, ``httpx.ReadTimeout``,
``httpx.RemoteProtocolError``, ``httpx.WriteError``, ...) only if it is
idempotent.  ``httpx`` is imported by this module only (``pip install
'datapunk-recovery[httpx]'``).  asyncio and trio, as httpx itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datapunk_recovery._extras import raise_missing
from datapunk_recovery.errors import classify

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


class HttpxRecovery(HttpRecovery[httpx.Response]):
    """Recovering requests with an ``httpx.AsyncClient`` over ``router``'s endpoints.

    Faces (from :class:`~.http.HttpRecovery`): ``request(method, path, ...)``
    and ``get`` / ``post`` / ``put`` / ``delete``; other keyword arguments go to
    ``client.request`` (``params``, ``json``, ``content``, ``timeout``...).
    """

    __slots__ = ("client",)

    def __init__(
        self, client: httpx.AsyncClient, router: Router, policy: HttpPolicy | None = None
    ) -> None:
        if not isinstance(client, httpx.AsyncClient):
            raise TypeError(f"HttpxRecovery.client: expected an httpx.AsyncClient, got {client!r}")
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
        return retryable_httpx_error(exc, idempotent)
