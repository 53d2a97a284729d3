"""The error taxonomy: what classify() says about each kind of failure."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator

import pytest

from datapunk_recovery import (
    CircuitOpenError,
    Classification,
    ErrorCategory,
    RecoveryError,
    classify,
    final_reason,
    is_fatal,
    mark_final,
    register_rule,
    unregister_rule,
)
from datapunk_recovery.testing import forget_classifications


@pytest.fixture(autouse=True)
def _clean_classification_memory() -> Iterator[None]:
    # classify() remembers verdicts per type: start each test from none.
    forget_classifications()
    yield
    forget_classifications()


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionError(),
        ConnectionResetError(),
        ConnectionRefusedError(),
        BrokenPipeError(),
        OSError(errno.ECONNRESET, "reset"),
        OSError(errno.EHOSTUNREACH, "no route"),
        OSError(errno.ENETUNREACH, "no net"),
        OSError(errno.EPIPE, "pipe"),
        socket.gaierror(socket.EAI_AGAIN, "try again"),
    ],
)
def test_transient_network_errors_are_retryable(exc: BaseException) -> None:
    verdict = classify(exc)
    assert verdict.retryable
    assert verdict.category is ErrorCategory.NETWORK


@pytest.mark.parametrize("exc", [TimeoutError(), OSError(errno.ETIMEDOUT, "timed out")])
def test_timeouts_are_retryable(exc: BaseException) -> None:
    assert classify(exc) == Classification(ErrorCategory.TIMEOUT, True)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError(),
        PermissionError(),
        OSError(errno.ENOSPC, "full"),
        socket.gaierror(socket.EAI_NONAME, "no such host"),
        ValueError(),
        KeyError("x"),
        RuntimeError(),
    ],
)
def test_other_errors_are_not_retryable(exc: BaseException) -> None:
    assert not classify(exc).retryable


@pytest.mark.parametrize(
    "exc",
    [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1), GeneratorExit()],
)
def test_cancellation_and_exit_are_never_retryable_whatever_the_rules(exc: BaseException) -> None:
    rule = register_rule(lambda e: Classification(ErrorCategory.NETWORK, True))
    try:
        assert is_fatal(exc)
        assert not classify(exc).retryable
    finally:
        unregister_rule(rule)


def test_user_rules_win_over_built_ins_and_can_be_removed() -> None:
    def teapot(exc: BaseException) -> Classification | None:
        if "teapot" in str(exc):
            return Classification(ErrorCategory.RATE_LIMITED, True, delay_hint=2.0)
        return None

    register_rule(teapot, for_type=ValueError)
    try:
        assert classify(ValueError("teapot")) == Classification(
            ErrorCategory.RATE_LIMITED, True, 2.0
        )
        assert not classify(ValueError("kettle")).retryable
        assert classify(ConnectionError("teapot")).category is ErrorCategory.NETWORK
    finally:
        unregister_rule(teapot)
    assert not classify(ValueError("teapot")).retryable


def test_later_rules_are_consulted_first() -> None:
    first = register_rule(lambda e: Classification(ErrorCategory.CACHE, True))
    second = register_rule(lambda e: Classification(ErrorCategory.DATABASE, False))
    try:
        assert classify(ValueError()).category is ErrorCategory.DATABASE
    finally:
        unregister_rule(first)
        unregister_rule(second)


def test_a_recovery_error_carries_its_own_verdict() -> None:
    exc = RecoveryError(
        "slow down",
        category=ErrorCategory.RATE_LIMITED,
        retryable=True,
        retry_after=3.0,
        context={"service": "payments"},
    )
    assert classify(exc) == Classification(ErrorCategory.RATE_LIMITED, True, 3.0)
    assert exc.context["service"] == "payments"


def test_circuit_open_error_says_which_breaker_and_how_long() -> None:
    exc = CircuitOpenError("payments", 4.25)
    assert "payments" in str(exc) and "4.250 s" in str(exc)
    assert not classify(exc).retryable
    assert final_reason(exc) == "CircuitOpenError"


def test_any_exception_can_be_marked_final() -> None:
    exc = ConnectionError()
    assert final_reason(exc) is None
    mark_final(exc, "retry budget exhausted")
    assert final_reason(exc) == "retry budget exhausted"


def test_rules_must_be_callable() -> None:
    with pytest.raises(TypeError, match="rule"):
        register_rule("not a rule")  # type: ignore[arg-type]


def test_driver_auth_refusals_are_never_retryable_whatever_a_rule_says() -> None:
    """By type name (the core imports no driver); pinned against the drivers in contracts."""
    import aiohttp
    import asyncpg
    import httpx
    import redis.exceptions as rx

    from datapunk_recovery._core.errors import register_rule, unregister_rule

    request = httpx.Request("GET", "http://a/")
    refusals: list[Exception] = [
        asyncpg.InvalidPasswordError("password authentication failed"),
        asyncpg.InvalidAuthorizationSpecificationError("no pg_hba.conf entry"),
        rx.AuthenticationError("invalid username-password pair"),
        rx.AuthenticationWrongNumberOfArgsError("wrong number of arguments for 'auth'"),
        rx.NoPermissionError("this user has no permissions to run the 'set' command"),
        rx.ResponseError("NOAUTH Authentication required."),
        rx.ResponseError("WRONGPASS invalid username-password pair"),
        httpx.HTTPStatusError("401", request=request, response=httpx.Response(401)),
        aiohttp.ClientResponseError(None, (), status=403),  # type: ignore[arg-type]
        httpx.HTTPStatusError("403", request=request, response=httpx.Response(403)),
    ]

    def everything_is_retryable(exc: BaseException) -> Classification:
        return Classification(ErrorCategory.NETWORK, True)

    register_rule(everything_is_retryable)
    try:
        for exc in refusals:
            verdict = classify(exc)
            assert (verdict.category, verdict.retryable) == (ErrorCategory.AUTH, False), exc
    finally:
        unregister_rule(everything_is_retryable)
    assert classify(httpx.HTTPStatusError("5", request=request, response=httpx.Response(503))) != (
        classify(refusals[-1])
    )
    assert classify(rx.ResponseError("ERR unknown command")).category is not ErrorCategory.AUTH


def test_a_refusal_shown_by_a_status_counts_in_subclasses_and_for_urllib_and_requests() -> None:
    """The status decides for every type of the family: none is remembered per type."""
    import email.message
    import urllib.error

    import aiohttp
    import requests

    def handshake(status: int) -> Exception:
        return aiohttp.WSServerHandshakeError(None, (), status=status)  # type: ignore[arg-type]

    def urllib_error(status: int) -> Exception:
        return urllib.error.HTTPError("http://a/", status, "no", email.message.Message(), None)

    def requests_error(status: int) -> Exception:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(str(status), response=response)

    for make in (handshake, urllib_error, requests_error):
        assert classify(make(500)).category is not ErrorCategory.AUTH, make
        verdict = classify(make(403))
        assert (verdict.category, verdict.retryable) == (ErrorCategory.AUTH, False), make
        assert classify(make(401)).category is ErrorCategory.AUTH, make


def test_urllib_errors_are_classified_by_the_error_they_wrap() -> None:
    import urllib.error

    refused = urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    timed_out = urllib.error.URLError(TimeoutError("timed out"))
    unknown_host = urllib.error.URLError("no such host")
    assert classify(refused).category is ErrorCategory.NETWORK
    assert classify(refused).retryable
    assert classify(timed_out).category is ErrorCategory.TIMEOUT
    assert not classify(unknown_host).retryable
