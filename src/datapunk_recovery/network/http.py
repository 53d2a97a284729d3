"""HTTP semantics shared by the adapters: which answers to retry, and what to send down.

- **Status-aware retries.** A response whose status is in
  ``HttpPolicy.retry_statuses`` (408, 429, 500, 502, 503, 504 by default)
  becomes an :class:`HttpStatusError` carrying the server's delay
  (``Retry-After``, ``X-RateLimit-Reset``, ``grpc-retry-pushback-ms``, see
  :mod:`.delays`); it is retryable only for an idempotent request (GET, HEAD,
  OPTIONS, PUT, DELETE, TRACE) unless the caller says the request is safe to
  repeat.  Any other status is an answer, returned as it is.
- **"Overloaded, don't retry".** A status in ``overloaded_statuses``, a
  response carrying ``overloaded_header``, or a negative gRPC pushback becomes
  :class:`~datapunk_recovery.errors.OverloadedError`: retries stop here and
  every layer above (it carries ``do_not_retry_above``).
- **Transport failures.** A request that never left (connection refused, DNS,
  connect timeout) may be retried whatever its method; one that may have
  reached the server (reset while reading, read timeout) only if idempotent.
  The adapters tell which is which for their library.
- **The deadline downstream.** With ``deadline_header`` set, each attempt
  sends the time left before the overall deadline (milliseconds or seconds)
  so the server can stop working for a caller that gave up.

Messages and events name the endpoint and the method, never the URL (paths
and queries may carry tokens) or a header value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from datapunk_recovery.deadline import remaining
from datapunk_recovery.errors import ErrorCategory, OverloadedError, RecoveryError
from datapunk_recovery.events import EventBus

from .delays import server_hint

__all__ = [
    "DEFAULT_RETRY_STATUSES",
    "IDEMPOTENT_METHODS",
    "HttpPolicy",
    "HttpStatusError",
]

DEFAULT_RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_CATEGORY: Final = {
    408: ErrorCategory.TIMEOUT,
    429: ErrorCategory.RATE_LIMITED,
    504: ErrorCategory.TIMEOUT,
}


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
            statuses = frozenset(getattr(self, name))
            bad = [
                c
                for c in statuses
                if isinstance(c, bool) or not isinstance(c, int) or not 100 <= c <= 599
            ]
            if bad:
                raise ValueError(f"{owner}.{name}: expected HTTP status codes, got {bad!r}")
            s(self, name, statuses)
        methods = frozenset(self.idempotent_methods)
        if not all(isinstance(m, str) and m for m in methods):
            raise ValueError(f"{owner}.idempotent_methods: expected method names, got {methods!r}")
        s(self, "idempotent_methods", frozenset(m.upper() for m in methods))
        for name in ("overloaded_header", "deadline_header"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{owner}.{name}: expected a header name or None, got {value!r}")
        if self.deadline_unit not in ("ms", "s"):
            raise ValueError(
                f"{owner}.deadline_unit: expected 'ms' or 's', got {self.deadline_unit!r}"
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
            status, method, endpoint, retryable=idempotent, retry_after=hint.delay
        )


def _has(headers: Mapping[str, str], name: str) -> bool:
    lower = name.lower()
    return any(k.lower() == lower for k in headers)
