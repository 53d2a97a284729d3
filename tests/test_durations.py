"""The duration parser: how people write waits, and what the library keeps (seconds)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datapunk_recovery._core.durations import (
    MAX_DURATION,
    DurationError,
    format_duration,
    parse_duration,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("500us", 0.0005),
        ("500µs", 0.0005),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("1m30s", 90.0),
        ("1h 15m", 4500.0),
        (" 2S ", 2.0),
        ("0.25", 0.25),  # numeric text, as environment variables carry it
        ("3", 3.0),
    ],
)
def test_texts_are_read_as_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_plain_numbers_are_seconds() -> None:
    assert parse_duration(2) == 2.0
    assert parse_duration(0.005) == 0.005
    assert isinstance(parse_duration(2), float)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "empty"),
        ("fast", "'250ms'"),
        ("5 parsecs", "'250ms'"),
        ("2ss", "'250ms'"),
        ("30s1m", "largest to smallest"),
        ("1s1s", "largest to smallest"),
        ("-1s", ">= 0"),
        (-1, ">= 0"),
        ("inf", "finite"),
        (math.nan, "finite"),
        (True, "bool"),
        (None, "NoneType"),
        ([1], "list"),
    ],
)
def test_bad_durations_are_refused_with_the_value_and_valid_spellings(
    value: object, words: str
) -> None:
    with pytest.raises(DurationError, match=words) as info:
        parse_duration(value)
    assert isinstance(info.value, ValueError)
    if value != "":
        assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.0005, "500us"),
        (0.005, "5ms"),
        (0.25, "250ms"),
        (2.0, "2s"),
        (1.5, "1.5s"),
        (60.0, "1m"),
        (90.0, "90s"),
        (7200.0, "2h"),
    ],
)
def test_format_writes_the_shortest_readable_form(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.floats(min_value=0.0, max_value=MAX_DURATION, allow_nan=False))
def test_formatted_durations_read_back_within_rounding(seconds: float) -> None:
    back = parse_duration(format_duration(seconds))
    assert back == pytest.approx(seconds, rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("text", ["1d1s", "25h", "86401", 1e10, "1e10", 10**30])
def test_a_duration_longer_than_one_day_is_refused(text: object) -> None:
    with pytest.raises(DurationError, match="at most one day"):
        parse_duration(text)


def test_one_day_itself_is_the_longest_duration_read() -> None:
    assert parse_duration("1d") == parse_duration("24h") == MAX_DURATION == 86400.0
