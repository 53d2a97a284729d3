"""HTTP semantics shared by the adapters: which answers to retry, and what to send down.

- **Status-aware retries.** A response whose status is in
  ``HttpPolicy.retry_statuses`` (408, 429, 500, 502, 503, 504 by default)
  becomes an [`HttpStatusError`][datapunk_recovery.network.http.HttpStatusError] carrying the
  server's delay
  (``Retry-After``, ``X-RateLimit-Reset``, ``grpc-retry-pushback-ms``, see
  [`delays`][datapunk_recovery.network.delays]); it is retryable only for an idempotent request
  (GET, HEAD,
  OPTIONS, PUT, DELETE, TRACE) unless the caller says the request is safe to
  repeat.  Any other status is an answer, returned as it is.
- **"Overloaded, don't retry".** A status in ``overloaded_statuses``, a
  response carrying ``overloaded_header``, or a negative gRPC pushback becomes
  [`OverloadedError`][datapunk_recovery._core.errors.OverloadedError]: retries stop here and
  every layer above (it carries ``do_not_retry_above``).
- **Transport failures.** A request that never left (connection refused, DNS,
  connect timeout) may be retried whatever its method; one that may have
  reached the server (reset while reading, read timeout) only if idempotent.
  The adapters tell which is which for their library.
- **The deadline downstream.** With ``deadline_header`` set, each attempt
  sends the time left before the overall deadline (milliseconds or seconds)
  so the server can stop working for a caller that gave up.

Messages and events name the endpoint and the method, never the URL (paths
and queries may carry tokens) or a request header's value (a garbage delay
header is shown in ``HintIgnored``, redacted and cut to 40 characters).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, TypeVar

from datapunk_recovery._core.errors import ErrorCategory, OverloadedError, RecoveryError
from datapunk_recovery._core.events import EventBus
from datapunk_recovery._core.validate import shown
from datapunk_recovery._execution.deadline import remaining

from .delays import server_hint
from .router import Endpoint, Router

__all__ = [
    "DEFAULT_RETRY_STATUSES",
    "IDEMPOTENT_METHODS",
    "HttpPolicy",
    "HttpRecovery",
    "HttpStatusError",
]

R = TypeVar("R")

DEFAULT_RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_CATEGORY: Final = {
    401: ErrorCategory.AUTH,
    403: ErrorCategory.AUTH,
    408: ErrorCategory.TIMEOUT,
    429: ErrorCategory.RATE_LIMITED,
    504: ErrorCategory.TIMEOUT,
}
# Refusals of who we are or what we may do: never retried, even when a policy
# lists them in retry_statuses (another try is another failed login).
_AUTH_STATUSES: Final = frozenset({401, 403})


class HttpStatusError(RecoveryError):
    """An answer with a status that calls for a retry (a 503, a 429, ...).

    ``status``, ``method`` and ``endpoint`` (its name) say what happened;
    ``retry_after`` is the server-given delay in seconds, if any; ``retryable``
    is false for a request that is not safe to repeat.  The response itself was
    closed before this was raised.
    """

    def __init__(
        self,
        status: int,
        method: str,
        endpoint: str,
        *,
        retryable: bool,
        retry_after: float | None,
    ) -> None:
        super().__init__(
            f"{method} on endpoint {endpoint!r} answered {status}",
            category=_CATEGORY.get(status, ErrorCategory.NETWORK),
            retryable=retryable,
            retry_after=retry_after,
            context={"status": status, "method": method, "endpoint": endpoint},
        )
        self.status = status
        self.method = method
        self.endpoint = endpoint


@dataclass(frozen=True, slots=True)
class HttpPolicy:
    """How HTTP answers are judged; see the module documentation.

    ``deadline_header`` names the header that carries the time left
    (``None``: not sent), in ``deadline_unit`` (``"ms"``: whole milliseconds,
    ``"s"``: seconds with millisecond precision).  ``hedge`` lets idempotent
    requests be hedged when the router has a hedge configuration.
    """

    retry_statuses: frozenset[int] = DEFAULT_RETRY_STATUSES
    idempotent_methods: frozenset[str] = IDEMPOTENT_METHODS
    overloaded_statuses: frozenset[int] = field(default_factory=frozenset)
    overloaded_header: str | None = None
    deadline_header: str | None = None
    deadline_unit: Literal["ms", "s"] = "ms"
    hedge: bool = True

    def __post_init__(self) -> None:
        owner = "HttpPolicy"
        s = object.__setattr__
        for name in ("retry_statuses", "overloaded_statuses"):
            statuses = _frozen(owner, name, getattr(self, name))
            bad = [
                c
                for c in statuses
                if isinstance(c, bool) or not isinstance(c, int) or not 100 <= c <= 599
            ]
            if bad:
                raise ValueError(f"{owner}.{name}: expected HTTP status codes, got {shown(bad)}")
            s(self, name, statuses)
        methods = _frozen(owner, "idempotent_methods", self.idempotent_methods)
        if not all(isinstance(m, str) and m for m in methods):
            raise ValueError(
                f"{owner}.idempotent_methods: expected method names, got {shown(methods)}"
            )
        s(self, "idempotent_methods", frozenset(m.upper() for m in methods))
        for name in ("overloaded_header", "deadline_header"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(
                    f"{owner}.{name}: expected a header name or None, got {shown(value)}"
                )
        if self.deadline_unit not in ("ms", "s"):
            raise ValueError(
                f"{owner}.deadline_unit: expected 'ms' or 's', got {shown(self.deadline_unit)}"
            )

    def idempotent(self, method: str, override: bool | None = None) -> bool:
        """Whether a ``method`` request is safe to repeat (``override`` wins when given)."""
        return override if override is not None else method.upper() in self.idempotent_methods

    def deadline_headers(self) -> dict[str, str]:
        """The header telling the server how long it has, or nothing without a deadline."""
        left = remaining()
        if self.deadline_header is None or left is None:
            return {}
        left = max(left, 0.0)
        value = str(math.floor(left * 1000)) if self.deadline_unit == "ms" else f"{left:.3f}"
        return {self.deadline_header: value}

    def judge(
        self,
        method: str,
        status: int,
        headers: Mapping[str, str],
        endpoint: str,
        *,
        idempotent: bool,
        bus: EventBus | None = None,
    ) -> RecoveryError | None:
        """The error an answer must raise (then the response is closed), or None to return it."""
        overloaded = status in self.overloaded_statuses or (
            self.overloaded_header is not None and _has(headers, self.overloaded_header)
        )
        if overloaded:
            return OverloadedError(
                f"{method} on endpoint {endpoint!r} answered {status}: overloaded, do not retry",
                context={"status": status, "endpoint": endpoint},
            )
        if status not in self.retry_statuses:
            return None
        hint = server_hint(headers, operation=endpoint, bus=bus)
        if hint.never:
            return OverloadedError(
                f"{method} on endpoint {endpoint!r} answered {status} with a negative "
                f"{hint.source}: do not retry",
                context={"status": status, "endpoint": endpoint},
            )
        return HttpStatusError(
            status,
            method,
            endpoint,
            retryable=idempotent and status not in _AUTH_STATUSES,
            retry_after=hint.delay,
        )


def _frozen(owner: str, name: str, value: object) -> frozenset[Any]:
    """``value`` as a frozenset, or a ``TypeError`` naming the field."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{owner}.{name}: expected a set, got {type(value).__name__}")
    try:
        return frozenset(value)
    except TypeError:
        raise TypeError(f"{owner}.{name}: expected a set of hashable values") from None


def _has(headers: Mapping[str, str], name: str) -> bool:
    lower = name.lower()
    return any(isinstance(k, str) and k.lower() == lower for k in headers)


def join_url(base: str, path: str) -> str:
    """``path`` under the endpoint's base URL ``base`` (``path`` alone without one)."""
    if not base:
        return path
    return base.rstrip("/") + "/" + path.lstrip("/")


class HttpRecovery(Generic[R]):
    """What every HTTP adapter does with a request; an adapter says how its library speaks.

    The request goes to the endpoint the router picks, carries the deadline
    header, and its answer is judged by the policy: an answer to retry is
    discarded (so its connection goes back to the pool) before the error is
    raised, and so is any answer whose handling was interrupted (a
    cancellation included).  Subclasses implement the five library-specific
    steps below.
    """

    __slots__ = ("policy", "router")

    def __init__(self, router: Router, policy: HttpPolicy | None) -> None:
        if not isinstance(router, Router):
            raise TypeError(f"{type(self).__name__}.router: expected a Router, got {shown(router)}")
        if policy is not None and not isinstance(policy, HttpPolicy):
            raise TypeError(
                f"{type(self).__name__}.policy: expected an HttpPolicy, got {shown(policy)}"
            )
        self.router = router
        self.policy = policy if policy is not None else HttpPolicy()

    # -- what an adapter provides ---------------------------------------------------------

    async def _send(self, method: str, url: str, headers: dict[str, str], kwargs: Any) -> R:
        """Send one request with the library's client."""
        raise NotImplementedError

    def _answer(self, response: R) -> tuple[int, Mapping[str, str]]:
        """The response's status and headers."""
        raise NotImplementedError

    async def _keep(self, response: R) -> None:
        """Make a response that is returned safe to use after its connection is reused."""

    async def _discard(self, response: R) -> None:
        """Give a response's connection back; it must not checkpoint when already closed."""
        raise NotImplementedError

    def _retryable(self, exc: BaseException, idempotent: bool) -> bool:
        """Whether ``exc``, raised by an attempt, may be retried on another endpoint."""
        raise NotImplementedError

    # -- the request ----------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool | None = None,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> R:
        """Send ``method path`` to the best endpoint, recovering as the policy says.

        ``idempotent`` overrides the method's own safety (``True`` for a POST
        with an idempotency key).  Other keyword arguments go to the library's
        own request call (``params``, ``json``, ...).
        """
        policy = self.policy
        method = method.upper()
        safe = policy.idempotent(method, idempotent)
        bus = self.router.bus

        async def attempt(endpoint: Endpoint) -> R:
            sent = {**(headers or {}), **policy.deadline_headers()}
            response = await self._send(method, join_url(endpoint.address, path), sent, kwargs)
            try:
                status, answer_headers = self._answer(response)
                error = policy.judge(
                    method, status, answer_headers, endpoint.name, idempotent=safe, bus=bus
                )
                if error is None:
                    await self._keep(response)
                    return response
            except BaseException:
                await self._discard(response)
                raise
            await self._discard(response)
            raise error

        return await self.router.call(
            attempt,
            retry_on=lambda exc: self._retryable(exc, safe),
            hedge=safe and policy.hedge,
        )

    async def get(self, path: str, **kwargs: Any) -> R:
        """``request("GET", path, ...)``."""
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> R:
        """``request("POST", path, ...)``: not retried after it may have been sent."""
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> R:
        """``request("PUT", path, ...)``."""
        return await self.request("PUT", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> R:
        """``request("DELETE", path, ...)``."""
        return await self.request("DELETE", path, **kwargs)
