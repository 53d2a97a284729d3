"""Bad input, generated: whatever a caller, a file or a server sends, the library answers.

The promise checked here (``SECURITY.md``): any input gives a value or a clear
``TypeError`` / ``ValueError`` naming what was wrong; never another exception,
a crash or a hang (the suite's timeout catches a hang).  Hypothesis generates
the inputs; the examples that once broke something stay as explicit cases.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import socket
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from datapunk_recovery import (
    Classification,
    DeadlineExceeded,
    Event,
    EventBus,
    HintIgnored,
    Jitter,
    RecoveryError,
    RetryConfig,
    classify,
    mark_final,
    retry,
    server_delay,
)
from datapunk_recovery._core import errors
from datapunk_recovery._core.durations import DurationError, parse_duration
from datapunk_recovery._core.redact import REDACTED, redact_headers, redact_text, redact_url
from datapunk_recovery.config.schema import ConfigError, Text, build, env_overrides, read_toml
from datapunk_recovery.network.delays import (
    parse_grpc_pushback,
    parse_rate_limit_reset,
    parse_retry_after,
    server_hint,
)
from datapunk_recovery.testing import fake_clock

T = TypeVar("T")

FIELDS = (
    "max_attempts",
    "base_delay",
    "max_delay",
    "exponential_base",
    "jitter",
    "jitter_factor",
    "deadline",
    "max_server_delay",
)

# Integers stay within float range here; the cases past it are at the end of this file.
_int = st.integers(min_value=-(10**18), max_value=10**18)
anything = st.one_of(
    st.none(),
    st.booleans(),
    _int,
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1e4),
    st.text(max_size=12),
    st.binary(max_size=8),
    st.lists(_int, max_size=3),
    st.dictionaries(st.text(max_size=4), _int, max_size=2),
    st.sampled_from(list(Jitter)),
    st.builds(object),
)


def _outcome_of(
    fn: Callable[[], T], errors: type[Exception] | tuple[type[Exception], ...]
) -> tuple[T | None, Exception | None]:
    """Run ``fn``: its value, or the exception of ``errors`` it raised (others escape)."""
    try:
        return fn(), None
    except errors as exc:
        return None, exc


def _outcome(fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """Run ``fn``: its value, or the TypeError / ValueError it raised (anything else escapes)."""
    return _outcome_of(fn, (TypeError, ValueError))


# -- RetryConfig from arbitrary values ----------------------------------------------------


@given(st.dictionaries(st.sampled_from(FIELDS), anything))
def test_retry_config_from_any_values_is_built_or_names_the_field(kwargs: dict[str, Any]) -> None:
    config, error = _outcome(lambda: RetryConfig(**kwargs))
    if error is not None:
        assert any(f"RetryConfig.{name}:" in str(error) for name in FIELDS), str(error)
        return
    assert config is not None
    # A config that was accepted behaves: every delay is finite and within bounds.
    for delay in itertools.islice(config.delays(random.Random(0)), 40):
        assert 0.0 <= delay <= config.max_delay
    assert 0.0 <= config.envelope(10**6) <= config.max_delay


# -- server-given delays ---------------------------------------------------------------------------

hints = st.one_of(
    anything,
    st.floats(min_value=-1e9, max_value=1e9),
    st.integers(min_value=-(10**6), max_value=10**6),
)


@given(
    computed=st.floats(min_value=0.0, max_value=1e4),
    hint=hints,
    remaining=st.none() | st.floats(min_value=-1e4, max_value=1e6),
    cap=st.floats(min_value=0.0, max_value=86400.0),
)
def test_server_delay_with_any_hint_is_obeyed_ignored_or_refused(
    computed: float, hint: object, remaining: float | None, cap: float
) -> None:
    config = RetryConfig(max_server_delay=cap)
    decision = server_delay(computed, hint, config, remaining)
    if decision.ignored or not decision.from_server:
        assert decision.delay == computed and not decision.give_up
    elif decision.give_up:
        assert decision.delay > cap or (remaining is not None and decision.delay > remaining)
    else:
        assert computed <= decision.delay <= cap and math.isfinite(decision.delay)


@given(hint=hints)
def test_a_garbage_hint_reaches_telemetry_short_and_never_breaks_a_retry(hint: object) -> None:
    seen: list[Event] = []
    attempts = itertools.count(1)

    @retry(RetryConfig(max_attempts=2, base_delay=0.0, max_delay=0.0, max_server_delay=60.0))
    def call() -> str:
        if next(attempts) == 1:
            raise RecoveryError("busy", retryable=True, retry_after=hint)  # type: ignore[arg-type]
        return "ok"

    call.events.subscribe(seen.append)
    with fake_clock():  # an obeyed hint advances the fake clock instead of waiting
        result, error = _outcome_of(call, RecoveryError)
    # Either the retry succeeded, or it gave up because the hint was too long to obey.
    assert result == "ok" or "gave up" in "".join(getattr(error, "__notes__", ()))
    for event in seen:
        if isinstance(event, HintIgnored):
            assert len(event.value) <= 40


# -- the classifier and the event bus ----------------------------------------------------------

_BASES: tuple[type[Exception], ...] = (
    Exception,
    ValueError,
    KeyError,
    OSError,
    ConnectionError,
    ConnectionResetError,
    TimeoutError,
    socket.gaierror,
    RecoveryError,
    DeadlineExceeded,
)


# Scalar arguments; OSError([], ...) has its own case at the end of this file.
_scalars = st.one_of(st.none(), st.booleans(), _int, st.floats(), st.text(max_size=12))


@given(base=st.sampled_from(_BASES), args=st.lists(_scalars, max_size=3), final=st.booleans())
def test_classify_answers_for_any_exception(
    base: type[Exception], args: list[object], final: bool
) -> None:
    kind = type("Fuzzed", (base,), {})
    try:
        exc = kind(*args)
    except Exception:  # the type refuses these arguments: not an exception anyone raises
        assume(False)
        return
    if final:
        mark_final(exc, "fuzz")
    verdict = classify(exc)
    assert isinstance(verdict, Classification)
    assert isinstance(verdict.retryable, bool)
    if final:
        assert errors.final_reason(exc) is not None


def test_cancellation_and_exit_are_never_retryable_whatever_the_rules() -> None:
    rule = errors.register_rule(lambda exc: Classification(errors.ErrorCategory.NETWORK, True))
    try:
        for exc in (KeyboardInterrupt(), SystemExit(1), GeneratorExit()):
            assert classify(exc).retryable is False
    finally:
        errors.unregister_rule(rule)


def test_the_classifier_memory_is_bounded_whatever_types_callers_make() -> None:
    # Programs that build exception types on the fly must not grow the cache forever.
    for i in range(3000):
        classify(type(f"Dynamic{i}", (ValueError,), {})())
    assert len(errors._by_type) <= errors._BY_TYPE_MAX


@given(st.lists(st.sampled_from([ValueError, RuntimeError, KeyError, None]), max_size=5))
def test_a_failing_subscriber_never_breaks_the_emitter(
    failures: list[type[Exception] | None],
) -> None:
    bus = EventBus()
    delivered: list[Event] = []
    for failure in failures:
        if failure is None:
            bus.subscribe(delivered.append)
        else:

            def boom(event: Event, failure: type[Exception] = failure) -> None:
                raise failure("subscriber failed")

            bus.subscribe(boom)
    event = HintIgnored(operation="fuzz", at=0.0, value="x", reason="fuzz")
    bus.emit(event)
    assert delivered == [event] * failures.count(None)


@given(st.one_of(st.integers(), st.text(max_size=5), st.none()))
def test_a_subscriber_must_be_callable(value: object) -> None:
    with pytest.raises(TypeError, match="subscriber"):
        EventBus().subscribe(value)  # type: ignore[arg-type]


# -- redaction: secrets never survive, whatever the text -----------------------------------------

_secret = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=8, max_size=16)


@given(text=st.text(max_size=80), secret=_secret)
def test_a_password_in_a_url_never_survives_redaction(text: str, secret: str) -> None:
    assume(secret not in text)
    url = f"redis://app:{secret}@cache.internal:6379/0?{text}"
    assert secret not in redact_url(url)
    assert secret not in redact_text(f"{text} {url}")


@given(headers=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=5))
def test_redaction_accepts_any_headers_and_text(headers: dict[str, str]) -> None:
    cleaned = redact_headers({**headers, "Authorization": "Bearer abc.def"})
    assert cleaned["Authorization"] == REDACTED
    for value in headers.values():
        redact_text(value)
        redact_url(value)


# -- the configuration loader ------------------------------------------------------------------

toml_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        _int,
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=10),
        st.sampled_from(["250ms", "2s", "1m30s", "none", "-1s", "1e999", "full", "µs"]),
        st.builds(Text, st.text(max_size=10), st.just("env DATAPUNK_RECOVERY__X")),
    ),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), toml_values, max_size=6))
def test_the_loader_builds_a_retry_config_or_lists_every_problem(data: dict[str, Any]) -> None:
    config, error = _outcome(lambda: build(RetryConfig, data, source="fuzz.toml", path="retry"))
    if error is None:
        assert isinstance(config, RetryConfig)
        return
    assert isinstance(error, ConfigError)
    assert error.problems
    for problem in error.problems:
        assert problem.source in ("fuzz.toml", "env DATAPUNK_RECOVERY__X")
        assert problem.path.startswith("retry")


@given(toml_values)
def test_the_loader_refuses_a_document_that_is_not_a_table(data: object) -> None:
    assume(not isinstance(data, dict))
    with pytest.raises(ConfigError):
        build(RetryConfig, data, source="fuzz.toml")


@given(
    st.dictionaries(
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_", max_size=30).map(
            lambda s: "DATAPUNK_RECOVERY__" + s
        ),
        st.text(max_size=12),
        max_size=6,
    )
)
def test_environment_overrides_build_or_name_the_variable(environ: dict[str, str]) -> None:
    def load() -> RetryConfig:
        tree = env_overrides(environ)
        return build(RetryConfig, tree.get("retry", {}), source="environment", path="retry")

    config, error = _outcome(load)
    if error is None:
        assert isinstance(config, RetryConfig)
    else:
        assert isinstance(error, ConfigError)
        assert all("DATAPUNK_RECOVERY__" in str(p) for p in error.problems), error


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200).map(str.encode))
def test_any_file_reads_as_a_table_or_a_clear_error(content: bytes) -> None:
    fd, path = tempfile.mkstemp(suffix=".toml")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        table, error = _outcome(lambda: read_toml(path))
        if error is None:
            assert isinstance(table, dict)
        else:
            assert isinstance(error, ConfigError)
            assert path in str(error)
    finally:
        os.unlink(path)


@given(st.one_of(anything, st.text(alphabet="0123456789.µsmhdu -", max_size=30)))
def test_any_duration_text_gives_seconds_or_a_duration_error(value: object) -> None:
    seconds, error = _outcome(lambda: parse_duration(value))
    if error is not None:
        assert isinstance(error, DurationError)
        return
    assert seconds is not None
    assert math.isfinite(seconds)
    assert seconds >= 0


@pytest.mark.parametrize(
    "text", ["1" * 100_000 + "x", "1s" * 50_000, " " * 100_000, "1." + "0" * 100_000 + "ms"]
)
def test_huge_duration_texts_end_quickly_in_an_answer(text: str) -> None:
    with contextlib.suppress(DurationError):
        assert parse_duration(text) >= 0


# -- holes the fuzzing found ----------------------------------------------------------------------
# Integers beyond float range (math.isfinite(10**400) raises OverflowError), an
# OSError whose errno is unhashable, and a file that is not UTF-8: all fixed,
# kept as regression tests.


def test_a_huge_integer_setting_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"RetryConfig\.base_delay"):
        RetryConfig(base_delay=10**400)


def test_a_huge_integer_hint_is_refused() -> None:
    assert server_delay(0.1, 10**400, RetryConfig(), None).give_up


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"name = '\xe9t\xe9'\n")
    with pytest.raises(ConfigError, match=r"latin1\.toml"):
        read_toml(path)


def test_an_oserror_with_an_odd_errno_is_classified() -> None:
    assert classify(OSError([], "odd errno")).retryable is False


def test_a_huge_integer_duration_is_a_duration_error() -> None:
    with pytest.raises(DurationError):
        parse_duration(10**400)


def test_a_huge_integer_in_a_number_field_is_a_config_error() -> None:
    # A mapping built in Python (not TOML, whose integers are 64-bit) can hold one.
    with pytest.raises(ConfigError, match=r"exponential_base: expected a finite number"):
        build(RetryConfig, {"exponential_base": 10**400}, source="test")


# -- server-given delay headers (network.delays) --------------------------------------------------

_header_text = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"\A-?\d{1,25}(\.\d{0,6})?\Z"),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "1_000", " 120 ", "0x10", "1e9"]),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: format_datetime(d, usegmt=True)),
    st.from_regex(r"\A\d{1,4}\Z"),
    st.from_regex(r"\A(Mon|Tue|Wed), \d{1,3} (Jan|Feb|Oct) \d{1,6} \d\d:\d\d:\d\d( GMT)?\Z"),
)
GRPC = "grpc-retry-pushback-ms"
# HTTP dates since 1970 (email.utils reads years below 100 as 19xx or 20xx).
_dates = st.datetimes(min_value=datetime(1970, 1, 1), timezones=st.just(UTC))
_walls = st.none() | st.floats(min_value=0.0, max_value=4e9)


def _sane(seconds: float | None) -> bool:
    return seconds is None or (math.isfinite(seconds) and seconds >= 0.0)


@given(value=_header_text, wall=_walls)
def test_retry_after_parses_to_seconds_or_nothing(value: str, wall: float | None) -> None:
    assert _sane(parse_retry_after(value, wall=wall))


@given(value=_header_text, wall=_walls)
def test_rate_limit_reset_parses_to_seconds_or_nothing(value: str, wall: float | None) -> None:
    assert _sane(parse_rate_limit_reset(value, wall=wall))


@given(value=_header_text)
def test_grpc_pushback_parses_to_a_delay_a_never_or_nothing(value: str) -> None:
    hint = parse_grpc_pushback(value)
    if hint is not None:
        assert hint.never or _sane(hint.delay)


@given(
    headers=st.dictionaries(
        st.sampled_from(["Retry-After", "retry-after", "X-RateLimit-Reset", GRPC])
        | st.text(max_size=12),
        _header_text,
        max_size=5,
    ),
    wall=_walls,
)
def test_any_response_headers_give_a_hint_the_core_can_judge(
    headers: dict[str, str], wall: float | None
) -> None:
    seen: list[Event] = []
    bus = EventBus()
    bus.subscribe(seen.append)
    hint = server_hint(headers, wall=wall, bus=bus)
    assert _sane(hint.delay)
    decision = server_delay(0.1, hint.delay, RetryConfig(), remaining=30.0)
    assert not decision.ignored or hint.delay is None
    for event in seen:  # garbage is reported, briefly: never the whole header
        assert isinstance(event, HintIgnored)
        assert len(event.value) <= len(GRPC) + 2 + 40


@given(_dates, st.floats(min_value=0.0, max_value=4e9))
def test_an_http_date_reads_back_as_the_time_until_it(when: datetime, wall: float) -> None:
    seconds = parse_retry_after(format_datetime(when, usegmt=True), wall=wall)
    assert seconds is not None
    expected = max(0.0, when.replace(microsecond=0).timestamp() - wall)
    assert abs(seconds - expected) <= 1e-6 * max(1.0, expected)
