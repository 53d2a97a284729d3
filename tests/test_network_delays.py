"""Server-given delays: every dialect parsed into the core's hint; garbage ignored with an event."""

from __future__ import annotations

import email.utils

import pytest

from datapunk_recovery import events
from datapunk_recovery.events import HintIgnored
from datapunk_recovery.network import (
    ServerHint,
    parse_grpc_pushback,
    parse_rate_limit_reset,
    parse_retry_after,
    server_hint,
)

NOW = 1_700_000_000.0  # a fixed wall clock, Unix seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
        (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),  # a past date means now
        ("-5", None),
        ("soon", None),
        ("nan", None),
        ("", None),
    ],
)
def test_retry_after_in_seconds_or_as_an_http_date(value: str, seconds: float | None) -> None:
    assert parse_retry_after(value, wall=NOW) == seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30", 30.0), (str(int(NOW) + 90), 90.0), (str(int(NOW) - 5), 0.0), ("-1", None), ("x", None)],
)
def test_rate_limit_reset_as_seconds_or_as_a_unix_time(value: str, seconds: float | None) -> None:
    assert parse_rate_limit_reset(value, wall=NOW) == seconds


def test_grpc_pushback_is_milliseconds_and_negative_means_never() -> None:
    assert parse_grpc_pushback("250") == ServerHint(0.25, source="grpc-retry-pushback-ms")
    assert parse_grpc_pushback("-1") == ServerHint(never=True, source="grpc-retry-pushback-ms")
    assert parse_grpc_pushback("1.5") is None
    assert parse_grpc_pushback("later") is None


def test_the_most_specific_header_wins_whatever_its_case() -> None:
    headers = {"Retry-After": "7", "GRPC-Retry-Pushback-Ms": "100", "X-RateLimit-Reset": "60"}
    assert server_hint(headers, wall=NOW).delay == 0.1
    assert server_hint({"retry-after": "7", "x-ratelimit-reset": "60"}, wall=NOW).delay == 7.0
    assert server_hint({"X-RateLimit-Reset": "60"}, wall=NOW) == ServerHint(
        60.0, source="x-ratelimit-reset"
    )
    assert server_hint({"Content-Type": "text/plain"}) == ServerHint()


def test_garbage_is_ignored_with_an_event_and_the_next_dialect_is_read() -> None:
    seen: list[events.Event] = []
    bus = events.EventBus()
    bus.subscribe(seen.append)
    hint = server_hint(
        {"Retry-After": "tomorrow-ish", "X-RateLimit-Reset": "12"},
        wall=NOW,
        operation="api",
        bus=bus,
    )
    assert hint.delay == 12.0
    [ignored] = seen
    assert isinstance(ignored, HintIgnored)
    assert (ignored.operation, ignored.value) == ("api", "retry-after: tomorrow-ish")


def test_absurd_but_valid_delays_are_passed_on_for_the_core_to_refuse() -> None:
    # A week: parsed as is; backoff.server_delay then gives up instead of waiting.
    assert server_hint({"Retry-After": "604800"}).delay == 604800.0
