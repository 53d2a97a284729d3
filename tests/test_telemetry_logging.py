"""The stdlib logging exporter: one logger per area, sensible levels, fields in ``extra``."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from datapunk_recovery import Jitter, RetryConfig, retry
from datapunk_recovery._core.events import AttemptFinished, CallFinished, Event
from datapunk_recovery.breaker import BreakerConfig, CircuitBreaker
from datapunk_recovery.telemetry.levels import Level
from datapunk_recovery.telemetry.logging import LoggingExporter
from datapunk_recovery.testing import fake_clock, instant_retries


@pytest.fixture(autouse=True)
def _instant() -> Iterator[None]:
    with instant_retries(), fake_clock():
        yield


def flaky(name: str, failures: int, attempts: int = 3) -> object:
    left = [failures]

    @retry(RetryConfig(max_attempts=attempts, base_delay=0.5, jitter=Jitter.NONE), name=name)
    def call() -> str:
        if left[0]:
            left[0] -= 1
            raise ConnectionError("reset by peer")
        return "ok"

    return call


def test_a_retry_is_info_and_giving_up_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="datapunk_recovery")
    call = flaky("fetch", failures=5, attempts=2)
    with LoggingExporter().install(), pytest.raises(ConnectionError):
        call()  # type: ignore[operator]
    logged = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert logged == [
        (
            "datapunk_recovery.retry",
            logging.INFO,
            "retry.scheduled operation=fetch retry=1 delay=0.5 from_server=False "
            "category=network error_type=ConnectionError",
        ),
        (
            "datapunk_recovery.retry",
            logging.WARNING,
            "retry.gave_up operation=fetch attempts=2 elapsed=0 reason=attempts "
            "error_type=ConnectionError",
        ),
    ]


def test_attempts_and_calls_are_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="datapunk_recovery")
    call = flaky("fetch", failures=1)
    with LoggingExporter().install():
        call()  # type: ignore[operator]
    levels = {r.getMessage().split()[0]: r.levelno for r in caplog.records}
    assert levels == {
        "retry.attempt": logging.DEBUG,
        "retry.scheduled": logging.INFO,
        "retry.call": logging.DEBUG,
    }
    call_record = next(r for r in caplog.records if r.getMessage().startswith("retry.call"))
    assert "outcome=success_after_retry" in call_record.getMessage()


def test_fields_are_record_attributes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="datapunk_recovery")
    call = flaky("fetch", failures=1)
    with LoggingExporter().install():
        call()  # type: ignore[operator]
    (record,) = caplog.records
    extra = record.__dict__
    assert extra["event"] == "retry.scheduled"
    assert extra["area"] == "retry"
    assert extra["operation"] == "fetch"
    assert extra["retry"] == 1
    assert extra["category"] == "network"  # the enumeration's value, for JSON formatters
    assert extra["error_type"] == "ConnectionError"
    assert isinstance(extra["at"], float)


def test_a_field_named_like_a_record_attribute_is_prefixed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Loaded(Event):
        name: ClassVar[str] = "plugin.loaded"
        area: ClassVar[str] = "plugin"
        module: str

    caplog.set_level(logging.DEBUG, logger="datapunk_recovery")
    LoggingExporter()(Loaded(operation="load", at=0.0, module="mod_x"))
    (record,) = caplog.records
    assert record.name == "datapunk_recovery.plugin"
    assert record.__dict__["event_module"] == "mod_x"
    assert record.module != "mod_x"


def test_nothing_is_built_for_a_silenced_area(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="datapunk_recovery.retry")
    call = flaky("fetch", failures=1)
    with LoggingExporter().install():
        call()  # type: ignore[operator]
    assert caplog.records == []


def test_a_breaker_opening_is_a_warning_and_closing_is_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="datapunk_recovery")
    breaker = CircuitBreaker("db", BreakerConfig(consecutive_failures=1, open_duration=5.0))
    with LoggingExporter().install():
        with pytest.raises(ZeroDivisionError):
            breaker.call(lambda: 1 / 0)
        breaker.reset()
    changes = [(r.name, r.levelno, r.__dict__["to_state"]) for r in caplog.records]
    assert changes == [
        ("datapunk_recovery.breaker", logging.WARNING, "open"),
        ("datapunk_recovery.breaker", logging.INFO, "closed"),
    ]


def test_levels_can_be_overridden(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="datapunk_recovery")
    exporter = LoggingExporter(
        levels={
            "retry.call": logging.INFO,
            "retry.attempt": Level(logging.DEBUG, "succeeded", {"false": logging.ERROR}),
        }
    )
    exporter(CallFinished(operation="op", at=0.0, attempts=1, elapsed=0.0, succeeded=True))
    exporter(AttemptFinished(operation="op", at=0.0, attempt=1, duration=0.1, succeeded=True))
    exporter(AttemptFinished(operation="op", at=0.0, attempt=2, duration=0.1, succeeded=False))
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.DEBUG, logging.ERROR]


def test_level_rules_are_validated() -> None:
    with pytest.raises(TypeError, match=r"Level\.default"):
        Level(True)
    with pytest.raises(ValueError, match="together"):
        Level(logging.INFO, "state")
