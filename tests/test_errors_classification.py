"""The error taxonomy pinned exactly: every branch of classify() and the library's errors.

classify() remembers its verdict per exception type; every test here starts
from an empty memory (``forget_classifications``), so it checks the
classifier itself, whatever ran earlier in the same process.
"""

from __future__ import annotations

import errno
import pickle
import socket
from collections.abc import Iterator

import pytest

from datapunk_recovery import (
    BudgetExhausted,
    CircuitOpenError,
    Classification,
    DeadlineExceeded,
    ErrorCategory,
    OverloadedError,
    RecoveryError,
    RetryExhausted,
    classify,
    final_reason,
    mark_final,
)
from datapunk_recovery.testing import forget_classifications


@pytest.fixture(autouse=True)
def _clean_classification_memory() -> Iterator[None]:
    forget_classifications()
    yield
    forget_classifications()


class PlainOSError(OSError):
    """An OSError subclass: its errno is not mapped to a builtin subclass on construction."""


NETWORK = Classification(ErrorCategory.NETWORK, True)
TIMEOUT = Classification(ErrorCategory.TIMEOUT, True)
OS_OTHER = Classification(ErrorCategory.RESOURCE, False)
UNKNOWN = Classification(ErrorCategory.UNKNOWN, False)


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (TimeoutError(), TIMEOUT),
        (ConnectionResetError(), NETWORK),
        (ConnectionError(), NETWORK),
        (ValueError(), UNKNOWN),
        (PlainOSError(errno.ETIMEDOUT, "timed out"), TIMEOUT),
        (PlainOSError(errno.ECONNRESET, "reset"), NETWORK),
        (PlainOSError(errno.ECONNABORTED, "aborted"), NETWORK),
        (PlainOSError(errno.ENOSPC, "full"), OS_OTHER),
        (PlainOSError("no errno at all"), OS_OTHER),
        (socket.gaierror(socket.EAI_AGAIN, "try again"), NETWORK),
        (socket.gaierror(socket.EAI_NONAME, "no such host"), OS_OTHER),
    ],
)
def test_each_kind_of_error_gets_its_verdict_the_first_and_second_time(
    exc: BaseException, verdict: Classification
) -> None:
    assert classify(exc) == verdict
    assert classify(exc) == verdict  # the remembered verdict is the same one


def test_the_errno_decides_for_each_instance_of_one_type() -> None:
    assert classify(PlainOSError(errno.ENOSPC, "full")) == OS_OTHER
    assert classify(PlainOSError(errno.ECONNREFUSED, "refused")) == NETWORK
    assert classify(PlainOSError(errno.ETIMEDOUT, "late")) == TIMEOUT


def test_a_non_integer_errno_is_an_operating_system_error() -> None:
    exc = PlainOSError()
    exc.errno = "ECONNRESET"  # type: ignore[assignment]
    assert classify(exc) == OS_OTHER


def test_the_verdict_of_a_type_does_not_leak_to_its_subclasses_instances() -> None:
    class Custom(RecoveryError):
        pass

    assert classify(Custom("x", retryable=True, category=ErrorCategory.CACHE)) == Classification(
        ErrorCategory.CACHE, True
    )
    # A recovery error's verdict is its own, instance by instance.
    assert classify(Custom("y")) == UNKNOWN


def test_a_recovery_errors_verdict_names_its_type() -> None:
    assert classify(OverloadedError("busy")).reason == "OverloadedError"


def test_cancellation_is_fatal_and_not_retryable() -> None:
    assert classify(KeyboardInterrupt()) == UNKNOWN
    assert classify(KeyboardInterrupt()).reason == "cancellation or exit"


# -- the library's errors -----------------------------------------------------------------


def test_a_recovery_error_keeps_its_message_and_defaults() -> None:
    assert str(RecoveryError()) == ""
    assert str(RecoveryError("boom")) == "boom"
    assert RecoveryError().do_not_retry_above is False
    assert RecoveryError().retry_after is None
    assert dict(RecoveryError().context) == {}


def test_a_recovery_error_can_forbid_outer_retries() -> None:
    exc = RecoveryError("stop", do_not_retry_above=True)
    assert exc.do_not_retry_above is True
    assert final_reason(exc) == "RecoveryError"
    allowed = DeadlineExceeded("late", do_not_retry_above=False)
    assert allowed.do_not_retry_above is False
    assert final_reason(allowed) is None


def test_retry_exhausted_keeps_its_message_result_and_attempts() -> None:
    exc = RetryExhausted("all rejected", last_result=503, attempts=4)
    assert (str(exc), exc.last_result, exc.attempts) == ("all rejected", 503, 4)


def test_circuit_open_error_survives_pickling() -> None:
    exc = pickle.loads(pickle.dumps(CircuitOpenError("payments", 4.25)))
    assert (exc.breaker, exc.remaining) == ("payments", 4.25)
    assert exc.args == ("payments", 4.25)
    assert dict(exc.context) == {"breaker": "payments"}


@pytest.mark.parametrize("kind", [CircuitOpenError, BudgetExhausted, OverloadedError])
def test_the_final_errors_are_overload_and_never_retryable(kind: type[RecoveryError]) -> None:
    exc = CircuitOpenError("b", 1.0) if kind is CircuitOpenError else kind("x")
    assert classify(exc).category is ErrorCategory.OVERLOADED
    assert not classify(exc).retryable
    assert final_reason(exc) == kind.__name__


def test_a_final_mark_that_is_not_text_is_no_reason() -> None:
    exc = ValueError()
    mark_final(exc, 42)  # type: ignore[arg-type]
    assert final_reason(exc) is None


def test_a_subclass_with_empty_slots_can_still_be_marked() -> None:
    class Slotted(Exception):
        __slots__ = ()

    # BaseException has a __dict__; a slotted subclass still does: the mark sticks.
    exc = Slotted()
    mark_final(exc, "budget")
    assert final_reason(exc) == "budget"


def test_a_refusal_that_shows_in_the_instance_is_judged_per_instance_after_its_type_was_seen() -> (
    None
):
    import httpx
    import redis.exceptions as rx

    request = httpx.Request("GET", "http://a/")
    for _ in range(2):  # the second time, the type's earlier verdicts were there to remember
        assert classify(rx.ResponseError("ERR unknown command")).category is ErrorCategory.UNKNOWN
        assert classify(rx.ResponseError("NOAUTH Authentication required.")).category is (
            ErrorCategory.AUTH
        )
        status_503 = httpx.HTTPStatusError("503", request=request, response=httpx.Response(503))
        status_401 = httpx.HTTPStatusError("401", request=request, response=httpx.Response(401))
        assert classify(status_503).category is ErrorCategory.UNKNOWN
        assert classify(status_401).category is ErrorCategory.AUTH


def test_a_refusal_by_type_name_stays_unretryable_once_remembered_whatever_a_later_rule_says() -> (
    None
):
    import redis.exceptions as rx

    from datapunk_recovery._core.errors import register_rule, unregister_rule

    def everything_is_retryable(exc: BaseException) -> Classification:
        return Classification(ErrorCategory.NETWORK, True)

    first = classify(rx.AuthenticationError("invalid username-password pair"))
    register_rule(everything_is_retryable)
    try:
        again = classify(rx.AuthenticationError("invalid username-password pair"))
        other = classify(ValueError())
    finally:
        unregister_rule(everything_is_retryable)
    assert (first.category, first.retryable) == (ErrorCategory.AUTH, False)
    assert (again.category, again.retryable) == (ErrorCategory.AUTH, False)
    assert other.retryable  # the rule still decides for the rest


def test_a_type_remembered_before_a_rule_was_registered_is_judged_by_the_rule() -> None:
    from datapunk_recovery._core.errors import register_rule, unregister_rule

    def value_errors_are_retryable(exc: BaseException) -> Classification:
        return Classification(ErrorCategory.VALIDATION, True)

    assert classify(ValueError()) == UNKNOWN  # remembered
    register_rule(value_errors_are_retryable, for_type=ValueError)
    try:
        assert classify(ValueError()).category is ErrorCategory.VALIDATION
    finally:
        unregister_rule(value_errors_are_retryable)
