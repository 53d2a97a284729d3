"""The aiohttp adapter: requests over a `Router`'s endpoints.

``AiohttpRecovery(session, router)`` sends each attempt to the endpoint the
router picks (``endpoint.address`` is the base URL), judges the answer with
[`HttpPolicy`][datapunk_recovery.network.http.HttpPolicy] and lets the router retry, fail over and
hedge.

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
idempotent.

One attempt is one request sent.  aiohttp itself re-sends an idempotent
request once when its connection drops (``ServerDisconnectedError``,
``ClientOSError``) whether or not the connection came from the pool, hidden
inside what the router counts as one attempt: with ``max_attempts=3`` the
server would get 6 requests, and the budget and the statistics would see
half the load.  So ``AiohttpRecovery`` turns that re-send off on the session
it is given (aiohttp's ``ClientSession._retry_connection``, the switch its
own test client uses) for every request of that session, and the router's
retries, counted and bounded by the budget, take its place.  A driver
upgrade that moves the switch fails a named contract test
(``tests/contracts/test_aiohttp_contract.py``) instead of silently doubling
the load; an aiohttp without the switch is refused with ``TypeError``.

``aiohttp`` is imported by this module only (``pip install
'datapunk-recovery[aiohttp]'``); asyncio only, as aiohttp itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datapunk_recovery._core.errors import classify
from datapunk_recovery._core.extras import raise_missing

from .http import HttpPolicy, HttpRecovery, HttpStatusError
from .router import Router

try:
    import aiohttp
except ImportError as exc:
    raise_missing(exc, "datapunk_recovery.network.aiohttp", "aiohttp", extra="aiohttp")

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


def _no_hidden_resend(session: aiohttp.ClientSession) -> None:
    """Turn off aiohttp's own once-only re-send on ``session`` (see the module documentation)."""
    if not hasattr(session, "_retry_connection"):
        raise TypeError(
            f"AiohttpRecovery.session: aiohttp {aiohttp.__version__} has no switch for its own "
            "re-send of dropped requests (ClientSession._retry_connection); the router could "
            "not count what it sends. Use an aiohttp this library supports."
        )
    session._retry_connection = False


class AiohttpRecovery(HttpRecovery[aiohttp.ClientResponse]):
    """Recovering requests with an ``aiohttp.ClientSession`` over ``router``'s endpoints.

    Faces (from [`HttpRecovery`][datapunk_recovery.network.http.HttpRecovery]):
    ``request(method, path, ...)``
    and ``get`` / ``post`` / ``put`` / ``delete``, each returning a response
    with its body read; other keyword arguments go to ``session.request``
    (``params``, ``json``, ``data``...).  Each request is sent with
    ``raise_for_status=False`` unless the caller passes it, so that the policy
    judges every status even on a session made with ``raise_for_status=True``
    (call ``response.raise_for_status()`` on what is returned).  Taking ``session`` turns off
    aiohttp's own re-send on it, so that each attempt sends one request.
    """

    __slots__ = ("session",)

    def __init__(
        self, session: aiohttp.ClientSession, router: Router, policy: HttpPolicy | None = None
    ) -> None:
        if not isinstance(session, aiohttp.ClientSession):
            raise TypeError(
                "AiohttpRecovery.session: expected an aiohttp.ClientSession, "
                f"got {type(session).__name__}"  # never its repr: a URL given by mistake
            )
        super().__init__(router, policy)
        _no_hidden_resend(session)
        self.session = session

    async def _send(
        self, method: str, url: str, headers: dict[str, str], kwargs: Any
    ) -> aiohttp.ClientResponse:
        # The policy judges every status: a session made with raise_for_status=True
        # must not turn a 503 into an exception first (the caller may still ask).
        kwargs = {"raise_for_status": False, **kwargs}
        return await self.session.request(method, url, headers=headers, **kwargs)

    def _answer(self, response: aiohttp.ClientResponse) -> tuple[int, Mapping[str, str]]:
        return response.status, response.headers

    async def _keep(self, response: aiohttp.ClientResponse) -> None:
        await response.read()  # the body is kept; the connection goes back

    async def _discard(self, response: aiohttp.ClientResponse) -> None:
        response.release()

    def _retryable(self, exc: BaseException, idempotent: bool) -> bool:
        if isinstance(exc, aiohttp.ClientResponseError) and exc.status:
            # A status the caller asked aiohttp to raise: judged as the answer would be.
            return idempotent and exc.status in self.policy.retry_statuses
        return retryable_aiohttp_error(exc, idempotent)
