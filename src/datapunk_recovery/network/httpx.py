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
datapunk-recovery[httpx]``).  asyncio and trio, as httpx itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from datapunk_recovery.errors import classify

from .http import HttpPolicy, HttpStatusError
from .router import Endpoint, Router

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


class HttpxRecovery:
    """Recovering requests with an ``httpx.AsyncClient`` over ``router``'s endpoints."""

    __slots__ = ("client", "policy", "router")

    def __init__(
        self, client: httpx.AsyncClient, router: Router, policy: HttpPolicy | None = None
    ) -> None:
        if not isinstance(client, httpx.AsyncClient):
            raise TypeError(f"HttpxRecovery.client: expected an httpx.AsyncClient, got {client!r}")
        if not isinstance(router, Router):
            raise TypeError(f"HttpxRecovery.router: expected a Router, got {router!r}")
        self.client = client
        self.router = router
        self.policy = policy if policy is not None else HttpPolicy()

    async def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool | None = None,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send ``method path`` to the best endpoint, recovering as the policy says.

        ``idempotent`` overrides the method's own safety (``True`` for a POST
        with an idempotency key).  Other keyword arguments go to
        ``client.request`` (``params``, ``json``, ``content``, ``timeout``...).
        """
        policy = self.policy
        method = method.upper()
        safe = policy.idempotent(method, idempotent)
        bus = self.router.bus

        async def attempt(endpoint: Endpoint) -> httpx.Response:
            sent = {**(headers or {}), **policy.deadline_headers()}
            url = _join(endpoint.address, path)
            response = await self.client.request(method, url, headers=sent, **kwargs)
            error = policy.judge(
                method,
                response.status_code,
                response.headers,
                endpoint.name,
                idempotent=safe,
                bus=bus,
            )
            if error is None:
                return response
            await response.aclose()
            raise error

        return await self.router.call(
            attempt,
            retry_on=lambda exc: retryable_httpx_error(exc, safe),
            hedge=safe and policy.hedge,
        )

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("GET", path, ...)``."""
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("POST", path, ...)``: not retried after it may have been sent."""
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("PUT", path, ...)``."""
        return await self.request("PUT", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("DELETE", path, ...)``."""
        return await self.request("DELETE", path, **kwargs)


def _join(base: str, path: str) -> str:
    if not base:
        return path
    return base.rstrip("/") + "/" + path.lstrip("/")
