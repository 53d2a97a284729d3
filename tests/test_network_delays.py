"""Server-given delays: every dialect parsed into the core's hint; garbage ignored with an event."""

from __future__ import annotations

import email.utils
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapunk_recovery._core import events
from datapunk_recovery._core.backoff import RetryConfig, server_delay
from datapunk_recovery._core.events import HintIgnored
from datapunk_recovery.network import (
    ServerHint,
    parse_grpc_pushback,
    parse_rate_limit_reset,
    parse_retry_after,
    server_hint,
)
from datapunk_recovery.network.delays import MAX_HINT_SECONDS, parse_http_date

NOW = 1_700_000_000.0  # a fixed wall clock, Unix seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 120\t", 120.0),  # optional white space around a field value
        ("Sunday, 06-Nov-94 08:49:37 GMT", 0.0),  # the obsolete forms, long past
        ("Sun Nov  6 08:49:37 1994", 0.0),
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


# -- strict grammars: anything else is garbage, and nothing raises -------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "1.5",  # delta-seconds are whole
        "1_000",  # int() would take it
        "1e3",  # float() would take it
        "+5",
        "\u0661\u0662",  # Arabic-Indic digits: str.isdigit() is true, HTTP says no
        "\uff15",  # a fullwidth 5
        "\n5",
        "5\x0b",
        "\u20035",  # an em space is no OWS
        "Wed, 21 Oct 2015 07:28:00 +99999999999999999999",  # an absurd offset
        "Wed, 21 Oct 2015 07:28:00 +0000",  # any numeric offset: HTTP dates are GMT
        "Wed, 21 Oct 99999999999999999999 07:28:00 GMT",  # 20-digit fields
        "Wed, 99999999999999999999 Oct 2015 07:28:00 GMT",
        "Wed, 21 Oct 2015 99999999999999999999:28:00 GMT",
        "Wed, 21 Oct 2015 07:99999999999999999999:00 GMT",
        "Wed, 31 Feb 2015 07:28:00 GMT",  # no such day
        "Wed, 21 Oct 2015 25:28:00 GMT",
        "Wed, 21 Oct 2015 07:28:00",  # no zone
    ],
)
def test_only_ascii_digits_and_real_http_dates_are_delays(value: str) -> None:
    assert parse_retry_after(value, wall=NOW) is None
    assert parse_rate_limit_reset(value, wall=NOW) is None or value == "1.5"
    assert parse_grpc_pushback(value) is None


def test_a_reset_may_carry_a_fraction_but_no_other_number_syntax() -> None:
    assert parse_rate_limit_reset("1.5", wall=NOW) == 1.5
    assert parse_rate_limit_reset(f"{int(NOW) + 2}.25", wall=NOW) == 2.25
    for garbage in ("1e3", "+5", "1_000", ".5", "5.", "inf", "\u0661"):
        assert parse_rate_limit_reset(garbage, wall=NOW) is None
    assert parse_grpc_pushback("+5") is None and parse_grpc_pushback("--5") is None


def test_a_twenty_digit_delay_is_absurd_but_finite_so_the_core_gives_up() -> None:
    for value in ("9" * 20, "9" * 5000):  # no int() of 5,000 digits: Python refuses those
        assert parse_retry_after(value) == MAX_HINT_SECONDS
        assert parse_rate_limit_reset(value, wall=NOW) is not None
        hint = parse_grpc_pushback(value)
        assert hint is not None and hint.delay is not None and math.isfinite(hint.delay)
    decision = server_delay(0.1, parse_retry_after("9" * 20), RetryConfig(), remaining=None)
    assert decision.give_up


def test_a_far_but_valid_date_is_a_long_delay_not_a_crash() -> None:
    seconds = parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", wall=NOW)
    assert seconds is not None and NOW < seconds <= MAX_HINT_SECONDS


def test_a_two_digit_year_is_the_one_within_fifty_years() -> None:
    expected = email.utils.parsedate_to_datetime("Sun, 06 Nov 2044 08:49:37 GMT").timestamp()
    assert parse_http_date("Sunday, 06-Nov-44 08:49:37 GMT", wall=NOW) == expected
    past = email.utils.parsedate_to_datetime("Sun, 06 Nov 1994 08:49:37 GMT").timestamp()
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", wall=NOW) == past


@pytest.mark.parametrize("value", [None, 5, 5.0, ["5"], b"5", b"\xff", object()])
def test_a_value_that_is_not_text_gives_nothing_or_its_ascii_reading(value: object) -> None:
    expected = 5.0 if value == b"5" else None
    assert parse_retry_after(value, wall=NOW) == expected
    assert parse_rate_limit_reset(value, wall=NOW) == expected
    hint = parse_grpc_pushback(value)
    assert (hint.delay if hint is not None else None) == (None if expected is None else 0.005)


@pytest.mark.parametrize(
    "headers",
    [
        {1: "5", None: "x", b"Retry-After": "7"},  # names that are not text (bytes are read)
        {"Retry-After": 5},
        {"Retry-After": ["5"]},
        {"Retry-After": None, "X-RateLimit-Reset": b"\x00"},
        {"grpc-retry-pushback-ms": object(), "retry-after": "\u0665"},
        {(1, 2): "3"},
    ],
)
def test_server_hint_reads_any_mapping_without_crashing(headers: dict[object, object]) -> None:
    seen: list[events.Event] = []
    bus = events.EventBus()
    bus.subscribe(seen.append)
    hint = server_hint(headers, wall=NOW, bus=bus)  # type: ignore[arg-type]
    assert hint.delay in (None, 7.0)
    assert all(isinstance(e, HintIgnored) for e in seen)


def test_server_hint_refuses_what_is_not_a_mapping_with_a_type_error() -> None:
    with pytest.raises(TypeError, match="mapping"):
        server_hint(["Retry-After: 5"])  # type: ignore[arg-type]


def test_a_secret_in_a_garbage_header_is_not_shown_in_the_event() -> None:
    seen: list[events.Event] = []
    bus = events.EventBus()
    bus.subscribe(seen.append)
    server_hint({"Retry-After": "token=" + "s" * 300}, bus=bus)
    [ignored] = seen
    assert isinstance(ignored, HintIgnored) and "sss" not in ignored.value


_hostile = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=30),
    st.none(),
    st.integers(),
    st.floats(),
    st.lists(st.text(max_size=5), max_size=3),
    st.from_regex(r"\A[ \t]*[-+]?[0-9_\u0660-\u0669]{0,40}([.e][0-9]{0,5})?[ \t]*\Z"),
    st.builds(
        "{}, {} {} {} {}:{}:{} {}".format,
        st.sampled_from(["Mon", "Sunday", "Xyz"]),
        st.integers(min_value=-(10**25), max_value=10**25),
        st.sampled_from(["Oct", "Feb", "oct"]),
        st.integers(min_value=-(10**25), max_value=10**25),
        st.integers(min_value=0, max_value=10**22),
        st.integers(min_value=0, max_value=10**22),
        st.integers(min_value=0, max_value=10**22),
        st.sampled_from(["GMT", "+0000", "+99999999999999999999", "-9999", ""]),
    ),
)
_walls = st.none() | st.floats(allow_nan=True, allow_infinity=True)


def _delay(seconds: float | None) -> bool:
    return seconds is None or (math.isfinite(seconds) and 0.0 <= seconds <= MAX_HINT_SECONDS)


@settings(max_examples=120, deadline=None)
@given(value=_hostile, wall=_walls)
def test_every_parser_gives_a_delay_or_nothing_for_any_input(
    value: object, wall: float | None
) -> None:
    assert _delay(parse_retry_after(value, wall=wall))
    assert _delay(parse_rate_limit_reset(value, wall=wall))
    hint = parse_grpc_pushback(value)
    assert hint is None or hint.never or _delay(hint.delay)
    when = parse_http_date(value, wall=wall)
    assert when is None or math.isfinite(when)
    if isinstance(value, str) and not value.strip(" \t").isascii():
        assert parse_retry_after(value, wall=wall) is None


@settings(max_examples=60, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(["Retry-After", "X-RateLimit-Reset", "grpc-retry-pushback-ms"])
        | st.integers()
        | st.binary(max_size=5)
        | st.none(),
        _hostile,
        max_size=4,
    ),
    wall=_walls,
)
def test_server_hint_gives_a_hint_or_ignores_for_any_headers(
    headers: dict[object, object], wall: float | None
) -> None:
    hint = server_hint(headers, wall=wall)  # type: ignore[arg-type]
    assert hint.never or _delay(hint.delay)
    decision = server_delay(0.1, hint.delay, RetryConfig(), remaining=30.0)
    assert math.isfinite(decision.delay) or decision.give_up
