"""The aiohttp adapter: requests over a :class:`~.router.Router`'s endpoints.

``AiohttpRecovery(session, router)`` sends each attempt to the endpoint the
router picks (``endpoint.address`` is the base URL), judges the answer with
:class:`~.http.HttpPolicy` and lets the router retry, fail over and hedge.

Connections never leak: a response that will be retried is released before
the retry, and the response returned has its body already read (``await
response.read()`` inside the attempt), so its connection is back in the
session's pool and ``response.text()`` / ``.json()`` / ``.read()`` answer from
memory.  (Streaming bodies are not recovered: a half-read stream cannot be
replayed.)  A cancelled attempt releases its response too.

Transport failures: a connection that could not be made
(``aiohttp.ClientConnectorError``) is retried whatever the method; a request
that may have reached the server (``ServerDisconnectedError``,
``ClientOSError``, ``ClientPayloadError``, a read timeout) only if it is
idempotent.  ``aiohttp`` is imported by this module only (``pip install
datapunk-recovery[aiohttp]``); asyncio only, as aiohttp itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from datapunk_recovery.errors import classify

from .http import HttpPolicy, HttpStatusError
from .router import Endpoint, Router

__all__ = ["AiohttpRecovery", "retryable_aiohttp_error"]

_MAYBE_SENT = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientPayloadError,
    aiohttp.ServerTimeoutError,
    TimeoutError,
)


def retryable_aiohttp_error(exc: BaseException, idempotent: bool) -> bool:
    """Whether ``exc``, raised by an attempt, may be retried on another endpoint."""
    if isinstance(exc, HttpStatusError):
        return exc.retryable
    if isinstance(exc, aiohttp.ClientConnectorError):  # before ClientOSError: a subclass
        return True
    if isinstance(exc, _MAYBE_SENT):
        return idempotent
    if isinstance(exc, aiohttp.ClientError):  # invalid URL, too many redirects, ...
        return False
    return classify(exc).retryable and idempotent


class AiohttpRecovery:
    """Recovering requests with an ``aiohttp.ClientSession`` over ``router``'s endpoints."""

    __slots__ = ("policy", "router", "session")

    def __init__(
        self, session: aiohttp.ClientSession, router: Router, policy: HttpPolicy | None = None
    ) -> None:
        if not isinstance(session, aiohttp.ClientSession):
            raise TypeError(
                f"AiohttpRecovery.session: expected an aiohttp.ClientSession, got {session!r}"
            )
        if not isinstance(router, Router):
            raise TypeError(f"AiohttpRecovery.router: expected a Router, got {router!r}")
        self.session = session
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
    ) -> aiohttp.ClientResponse:
        """Send ``method path`` to the best endpoint; returns a response with its body read.

        ``idempotent`` overrides the method's own safety.  Other keyword
        arguments go to ``session.request`` (``params``, ``json``, ``data``...).
        """
        policy = self.policy
        method = method.upper()
        safe = policy.idempotent(method, idempotent)
        bus = self.router.bus

        async def attempt(endpoint: Endpoint) -> aiohttp.ClientResponse:
            sent = {**(headers or {}), **policy.deadline_headers()}
            url = _join(endpoint.address, path)
            response = await self.session.request(method, url, headers=sent, **kwargs)
            try:
                error = policy.judge(
                    method,
                    response.status,
                    response.headers,
                    endpoint.name,
                    idempotent=safe,
                    bus=bus,
                )
                if error is None:
                    await response.read()  # the body is kept; the connection goes back
                    return response
            except BaseException:
                response.release()
                raise
            response.release()
            raise error

        return await self.router.call(
            attempt,
            retry_on=lambda exc: retryable_aiohttp_error(exc, safe),
            hedge=safe and policy.hedge,
        )

    async def get(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """``request("GET", path, ...)``."""
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """``request("POST", path, ...)``: not retried after it may have been sent."""
        return await self.request("POST", path, **kwargs)


def _join(base: str, path: str) -> str:
    if not base:
        return path
    return base.rstrip("/") + "/" + path.lstrip("/")
