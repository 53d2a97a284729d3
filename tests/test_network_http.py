"""HTTP semantics: which statuses retry, idempotency, "overloaded", the deadline header."""

from __future__ import annotations

import pytest

from datapunk_recovery._core import errors
from datapunk_recovery._core.errors import ErrorCategory, OverloadedError
from datapunk_recovery._execution.deadline import deadline
from datapunk_recovery.network.http import DEFAULT_RETRY_STATUSES, HttpPolicy, HttpStatusError
from datapunk_recovery.testing import fake_clock


def test_the_default_retryable_statuses() -> None:
    assert {408, 429, 500, 502, 503, 504} == DEFAULT_RETRY_STATUSES


def test_a_retryable_status_becomes_an_error_with_the_server_delay() -> None:
    policy = HttpPolicy()
    error = policy.judge("GET", 503, {"Retry-After": "3"}, "a", idempotent=True)
    assert isinstance(error, HttpStatusError)
    verdict = errors.classify(error)
    assert (verdict.retryable, verdict.delay_hint) == (True, 3.0)
    assert str(error) == "GET on endpoint 'a' answered 503"
    assert policy.judge("GET", 404, {}, "a", idempotent=True) is None  # an answer, not a failure
    assert policy.judge("GET", 200, {"Retry-After": "3"}, "a", idempotent=True) is None


@pytest.mark.parametrize(
    ("status", "category"),
    [(429, ErrorCategory.RATE_LIMITED), (504, ErrorCategory.TIMEOUT), (502, ErrorCategory.NETWORK)],
)
def test_statuses_map_to_categories(status: int, category: ErrorCategory) -> None:
    error = HttpPolicy().judge("GET", status, {}, "a", idempotent=True)
    assert error is not None and error.category is category


def test_only_idempotent_requests_are_retried_unless_told() -> None:
    policy = HttpPolicy()
    assert policy.idempotent("get") and policy.idempotent("PUT") and not policy.idempotent("POST")
    assert policy.idempotent("POST", override=True)
    error = policy.judge("POST", 503, {}, "a", idempotent=policy.idempotent("POST"))
    assert error is not None and not error.retryable


def test_overloaded_by_status_header_or_negative_pushback_is_final() -> None:
    policy = HttpPolicy(overloaded_statuses=frozenset({529}), overloaded_header="X-Shed")
    for status, headers in (
        (529, {}),
        (503, {"x-shed": "1"}),
        (503, {"grpc-retry-pushback-ms": "-1"}),
    ):
        error = policy.judge("GET", status, headers, "a", idempotent=True)
        assert isinstance(error, OverloadedError)
        assert errors.final_reason(error) == "OverloadedError"


def test_the_remaining_deadline_is_sent_in_the_named_header() -> None:
    assert HttpPolicy().deadline_headers() == {}  # no header named
    ms, seconds = (
        HttpPolicy(deadline_header="X-Deadline"),
        HttpPolicy(deadline_header="X-Timeout", deadline_unit="s"),
    )
    assert ms.deadline_headers() == {}  # no deadline
    with fake_clock() as clock, deadline(2.0):
        clock.advance(0.5)
        assert ms.deadline_headers() == {"X-Deadline": "1500"}
        assert seconds.deadline_headers() == {"X-Timeout": "1.500"}
        clock.advance(5.0)
        assert ms.deadline_headers() == {"X-Deadline": "0"}


def test_the_policy_is_validated() -> None:
    with pytest.raises(ValueError, match=r"HttpPolicy.retry_statuses: expected HTTP status codes"):
        HttpPolicy(retry_statuses=frozenset({99}))
    with pytest.raises(ValueError, match=r"HttpPolicy.deadline_unit"):
        HttpPolicy(deadline_unit="h")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"HttpPolicy.deadline_header"):
        HttpPolicy(deadline_header="")


@pytest.mark.parametrize("status", [401, 403])
def test_auth_refusals_are_never_retried_even_when_a_policy_lists_them(status: int) -> None:
    policy = HttpPolicy(retry_statuses=frozenset({status, 503}))
    error = policy.judge("GET", status, {"Retry-After": "1"}, "a", idempotent=True)
    assert isinstance(error, HttpStatusError)
    assert error.category is ErrorCategory.AUTH and not error.retryable
    assert errors.classify(error).retryable is False
    assert (
        HttpPolicy().judge("GET", status, {}, "a", idempotent=True) is None
    )  # by default: an answer
