"""The error taxonomy: what went wrong, and whether trying again can help.

Every layer of the library asks one question of a failure: *is it worth another
attempt, and how long should we wait first?* [`classify()`][datapunk_recovery._core.errors.classify]
answers it once,
in one place, so that retries, breakers, budgets and the recoveries above them
agree.  Users teach it about their own exceptions with
[`register_rule()`][datapunk_recovery._core.errors.register_rule];
their rules win over the built-in ones.

Cancellation is sacred: ``asyncio.CancelledError``, ``trio.Cancelled``,
``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit`` are
``BaseException`` but not ``Exception``, and nothing that is not an
``Exception`` is ever retried, swallowed or counted, whatever a rule says.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from datapunk_recovery._core.validate import shown

__all__ = [
    "BudgetExhausted",
    "CircuitOpenError",
    "Classification",
    "DeadlineExceeded",
    "ErrorCategory",
    "OverloadedError",
    "RecoveryError",
    "RetryExhausted",
    "classify",
    "final_reason",
    "forget_verdicts",
    "is_fatal",
    "mark_final",
    "register_rule",
    "registered_rules",
    "restore_rules",
    "unregister_rule",
]


class ErrorCategory(StrEnum):
    """What kind of failure an error is; per-category policies key on it."""

    NETWORK = "network"
    CACHE = "cache"
    DATABASE = "database"
    RESOURCE = "resource"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    VALIDATION = "validation"
    AUTH = "auth"
    UNKNOWN = "unknown"


_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})


class RecoveryError(Exception):
    """Base of the library's own errors.

    Carries what [`classify()`][datapunk_recovery._core.errors.classify] needs without any rule: a
    category, whether a
    retry can help, an optional server-given delay in seconds (``retry_after``),
    and free-form context (never secrets: callers put names, not DSNs, here).
    """

    category: ErrorCategory = ErrorCategory.UNKNOWN
    retryable: bool = False
    #: True when an inner layer already decided that no layer above may retry
    #: this failure (a budget refused, a server said "overloaded", a breaker is
    #: open, the deadline passed): retry engines honour it whatever ``on=`` says.
    do_not_retry_above: bool = False
    #: A server-given delay in seconds, or None.
    retry_after: float | None = None
    #: Names and numbers about the failure (never secrets).
    context: Mapping[str, Any] = _EMPTY

    def __init__(
        self,
        message: str = "",
        *,
        category: ErrorCategory | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        context: Mapping[str, Any] | None = None,
        do_not_retry_above: bool | None = None,
    ) -> None:
        super().__init__(message)
        if category is not None:
            self.category = category
        if retryable is not None:
            self.retryable = retryable
        if retry_after is not None:
            self.retry_after = retry_after
        if context:
            self.context = MappingProxyType(dict(context))
        if do_not_retry_above is not None:
            self.do_not_retry_above = do_not_retry_above


class RetryExhausted(RecoveryError):
    """Every attempt returned a result the caller rejected (``retry_if_result``).

    ``last_result`` keeps the last rejected result; ``attempts`` how many were made.
    """

    def __init__(self, message: str, *, last_result: object, attempts: int) -> None:
        super().__init__(message)
        self.last_result = last_result
        self.attempts = attempts


class DeadlineExceeded(RecoveryError, TimeoutError):
    """The overall deadline passed: not retryable by any layer under the same deadline."""

    category = ErrorCategory.TIMEOUT
    retryable = False
    do_not_retry_above = True


class CircuitOpenError(RecoveryError):
    """A circuit breaker refused the call.

    ``breaker`` names it; ``retry_after`` is how long, in seconds, until it may
    admit a call again.  Not retryable by the retry layer wrapped around the same
    breaker: a failover layer may go elsewhere instead.
    """

    category = ErrorCategory.OVERLOADED
    retryable = False
    do_not_retry_above = True

    # Built on every refused call: keep it cheap.  The fields live in slots
    # (no instance dict to make), ``args`` is set by ``BaseException.__new__``
    # from the positional arguments (only keywords need setting it here), and
    # the message is formatted lazily.
    __slots__ = ("breaker", "remaining")

    def __init__(self, breaker: str, remaining: float) -> None:
        self.breaker = breaker
        self.remaining = remaining
        if not self.args:  # made with keywords: ``args`` as if positional
            self.args = (breaker, remaining)

    def __str__(self) -> str:
        return (
            f"circuit breaker {self.breaker!r} is open; "
            f"it may admit a call in {self.remaining:.3f} s"
        )

    @property
    def context(self) -> Mapping[str, Any]:  # type: ignore[override]
        return MappingProxyType({"breaker": self.breaker})


class BudgetExhausted(RecoveryError):
    """A retry budget refused a retry; no outer layer retries this either."""

    category = ErrorCategory.OVERLOADED
    retryable = False
    do_not_retry_above = True


class OverloadedError(RecoveryError):
    """A server said "overloaded, don't retry": every layer above must stop."""

    category = ErrorCategory.OVERLOADED
    retryable = False
    do_not_retry_above = True


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one error: its category, whether to retry, and a delay hint.

    ``delay_hint`` is a server-given delay in seconds (``Retry-After`` and
    friends) or ``None``; the engine validates it (see
    [`datapunk_recovery._core.backoff.server_delay()`][datapunk_recovery._core.backoff.server_delay]).
    """

    category: ErrorCategory
    retryable: bool
    delay_hint: float | None = None
    reason: str = field(default="", compare=False)


Rule = Callable[[BaseException], Classification | None]
"""A user rule: returns a verdict for errors it knows, ``None`` for the rest."""

_FATAL: Final = Classification(ErrorCategory.UNKNOWN, False, None, "cancellation or exit")
_UNKNOWN: Final = Classification(ErrorCategory.UNKNOWN, False, None, "unknown error")
_NETWORK: Final = Classification(ErrorCategory.NETWORK, True, None, "network error")
_TIMEOUT: Final = Classification(ErrorCategory.TIMEOUT, True, None, "timeout")
_OS_OTHER: Final = Classification(ErrorCategory.RESOURCE, False, None, "operating system error")
_AUTH: Final = Classification(
    ErrorCategory.AUTH, False, None, "authentication or authorization refused"
)

# Drivers' errors for a refused login or permission, by type name (the core
# imports no driver): asyncpg (SQLSTATE class 28), redis-py (NOAUTH,
# WRONGPASS, NOPERM, a wrong AUTH).  Another try is another failed login,
# which can lock an account behind LDAP or PAM: never retried, whatever a
# rule says.  Pinned against the real drivers in tests/contracts/.
_AUTH_TYPE_NAMES: Final = frozenset(
    {
        "InvalidPasswordError",
        "InvalidAuthorizationSpecificationError",
        "InsufficientPrivilegeError",
        "AuthenticationError",
        "AuthorizationError",
        "AuthenticationWrongNumberOfArgsError",
        "NoPermissionError",
    }
)
# Redis error replies that refuse who we are (redis-py may raise them as a
# plain ResponseError, e.g. from a pipeline or a script).
_AUTH_REPLY_PREFIXES: Final = ("NOAUTH", "WRONGPASS", "NOPERM")
# HTTP answers refusing who we are or what we may do (RFC 9110 15.5.2, 15.5.4).
_AUTH_STATUSES: Final = frozenset({401, 403})
# Types whose refusal shows in the instance (a reply, a status), not the type,
# with their subclasses (aiohttp's WSServerHandshakeError, ClientHttpProxyError):
# their verdicts are never remembered per type.  ``HTTPError`` is urllib's and
# requests' (a status in ``.status`` / ``.response.status_code``).
_AUTH_BY_INSTANCE: Final = frozenset(
    {"ResponseError", "HTTPStatusError", "ClientResponseError", "HTTPError"}
)


def _instance_family(kind: type[BaseException]) -> str | None:
    """The `_AUTH_BY_INSTANCE` name ``kind`` is or derives from, if any."""
    for base in kind.__mro__:
        if base.__name__ in _AUTH_BY_INSTANCE:
            return base.__name__
    return None


def _refused_auth(exc: BaseException) -> bool:
    """Whether ``exc`` is a driver's authentication or authorization refusal."""
    kind = type(exc)
    if kind.__name__ in _AUTH_TYPE_NAMES:
        return True
    family = _instance_family(kind)
    if family is None:
        return False
    if family == "ResponseError":
        return str(exc).lstrip().startswith(_AUTH_REPLY_PREFIXES)
    # httpx: .response.status_code; aiohttp, urllib: .status; requests: .response.status_code
    status = getattr(exc, "status", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    return status in _AUTH_STATUSES


_TRANSIENT_ERRNOS: Final = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)
# getaddrinfo reports EAI_AGAIN as a socket.gaierror whose errno is the EAI code.
_EAI_AGAIN: Final = getattr(socket, "EAI_AGAIN", -3)

_rules: list[tuple[type[BaseException] | None, Rule]] = []


def register_rule(rule: Rule, *, for_type: type[BaseException] | None = None) -> Rule:
    """Register a user rule; later rules are consulted first and win over built-ins.

    ``for_type`` restricts the rule to instances of that type, which keeps
    classification cheap when many rules exist.  Returns the rule so it can be
    used as a decorator and passed to
    [`unregister_rule()`][datapunk_recovery._core.errors.unregister_rule].
    """
    if not callable(rule):
        raise TypeError(f"rule: expected a callable, got {shown(rule)}")
    _rules.insert(0, (for_type, rule))
    return rule


def unregister_rule(rule: Rule) -> None:
    """Remove a rule registered with `register_rule()` (no error if absent)."""
    _rules[:] = [(t, r) for t, r in _rules if r is not rule]


def registered_rules() -> tuple[tuple[type[BaseException] | None, Rule], ...]:
    """The user rules now, newest first, as ``(for_type, rule)``: for `restore_rules()`."""
    return tuple(_rules)


def restore_rules(rules: tuple[tuple[type[BaseException] | None, Rule], ...]) -> None:
    """Make ``rules`` (from `registered_rules()`) the user rules again, dropping any added since.

    For test isolation ([`isolated()`][datapunk_recovery.testing.isolated]).
    """
    _rules[:] = rules


def forget_verdicts() -> None:
    """Forget the verdicts `classify()` remembered per exception type.

    They only save time; a test that starts from none sees the classifier at
    work, not what an earlier test left behind.
    """
    _by_type.clear()


_FINAL_MARK: Final = "_datapunk_recovery_final"


def mark_final(exc: BaseException, reason: str) -> None:
    """Mark ``exc`` so that no outer layer retries it (budget refused, overloaded).

    Works on any exception, not only the library's own: the mark is an
    attribute, and a note (PEP 678) tells a human reading the traceback.
    """
    try:
        setattr(exc, _FINAL_MARK, reason)
    except (AttributeError, TypeError):  # an exception type with __slots__
        return


def final_reason(exc: BaseException) -> str | None:
    """Why an inner layer forbade retrying ``exc``, or ``None`` if it did not."""
    if isinstance(exc, RecoveryError) and exc.do_not_retry_above:
        return type(exc).__name__
    reason = getattr(exc, _FINAL_MARK, None)
    return reason if isinstance(reason, str) else None


def is_fatal(exc: BaseException) -> bool:
    """True for cancellation and interpreter exit: never retried, never counted."""
    return not isinstance(exc, Exception)


def classify(exc: BaseException) -> Classification:
    """Classify ``exc``: user rules first, then the library's own knowledge.

    Built in: [`RecoveryError`][datapunk_recovery._core.errors.RecoveryError] carries its own
    verdict;
    ``ConnectionError``
    and transient ``OSError`` errnos are retryable network errors;
    ``TimeoutError`` is a retryable timeout; urllib's ``URLError`` is
    classified by the socket error it wraps; other ``OSError``s and unknown
    exceptions are not retryable.  Cancellation and exit are never retryable,
    and neither are authentication or authorization refusals of known drivers
    (asyncpg's class ``28``, redis-py's ``NOAUTH``/``WRONGPASS``/``NOPERM``,
    the 401/403 status errors of httpx, aiohttp, urllib and requests): those are ``AUTH``, before
    any rule, since another try is another failed login.
    """
    if not isinstance(exc, Exception):
        return _FATAL
    kind = type(exc)
    cached = _by_type.get(kind)
    # A remembered type is a refusal by its name (before any rule) or never
    # one: only a type seen for the first time, or one whose refusal shows in
    # the instance (never remembered), needs the look.
    if cached is _AUTH:
        return _AUTH
    if cached is None and _refused_auth(exc):
        if kind.__name__ in _AUTH_TYPE_NAMES:
            _remember(kind, _AUTH)
        return _AUTH
    if _rules:
        for for_type, rule in _rules:
            if for_type is None or isinstance(exc, for_type):
                verdict = rule(exc)
                if verdict is not None:
                    return verdict
    if cached is not None:
        return cached
    if isinstance(exc, RecoveryError):
        return Classification(exc.category, exc.retryable, exc.retry_after, kind.__name__)
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is an OSError
        return _remember(kind, _TIMEOUT)
    if isinstance(exc, ConnectionError):
        return _remember(kind, _NETWORK)
    if isinstance(exc, OSError):  # the errno decides, not the type: nothing to remember
        code = exc.errno
        if not isinstance(code, int):  # anything can be stored there
            # urllib's URLError wraps the socket error that failed it in ``reason``.
            reason = getattr(exc, "reason", None)
            if isinstance(reason, OSError) and reason is not exc:
                return classify(reason)
            return _OS_OTHER
        if isinstance(exc, socket.gaierror):
            return _NETWORK if code == _EAI_AGAIN else _OS_OTHER
        if code in _TRANSIENT_ERRNOS:
            return _NETWORK if code != errno.ETIMEDOUT else _TIMEOUT
        return _OS_OTHER
    return _remember(kind, _UNKNOWN)


# Verdicts that follow from the type alone, remembered per type so the failure
# path of a retry pays one dictionary lookup (the authentication look
# included: `classify()` skips it for a remembered type).  Bounded: exception types are few,
# but a program that makes them dynamically must not grow this forever.
_by_type: dict[type[BaseException], Classification] = {}
_BY_TYPE_MAX: Final = 1024


def _remember(kind: type[BaseException], verdict: Classification) -> Classification:
    # A refusal by type name stays one whatever its family (redis-py's NoPermissionError).
    if len(_by_type) < _BY_TYPE_MAX and (verdict is _AUTH or _instance_family(kind) is None):
        _by_type[kind] = verdict
    return verdict
