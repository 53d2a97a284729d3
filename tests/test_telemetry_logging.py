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


@pytest.fixture
def levels() -> Iterator[dict[str, logging.Logger]]:
    """The library's retry logger, its parent and the root; their settings put back after."""
    loggers = {
        "retry": logging.getLogger("datapunk_recovery.retry"),
        "parent": logging.getLogger("datapunk_recovery"),
        "root": logging.getLogger(),
    }
    saved = [(lg, lg.level, lg.disabled, list(lg.filters)) for lg in loggers.values()]
    disabled = logging.root.manager.disable
    loggers["retry"].setLevel(logging.NOTSET)
    loggers["parent"].setLevel(logging.NOTSET)
    loggers["root"].setLevel(logging.WARNING)
    try:
        yield loggers
    finally:
        logging.disable(disabled)
        for logger, level, was_disabled, filters in saved:
            logger.disabled = was_disabled
            logger.filters[:] = filters
            logger.setLevel(level)


def succeeds(name: str) -> object:
    @retry(name=name)
    def call() -> str:
        return "ok"

    return call


class Kept(logging.Handler):
    """A handler keeping the messages of the records that reach it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().split()[0])


@pytest.mark.parametrize("who", ["retry", "parent", "root"])
def test_a_level_change_on_the_logger_a_parent_or_the_root_is_seen_at_once(
    levels: dict[str, logging.Logger], who: str
) -> None:
    from datapunk_recovery._core.events import global_bus

    call, kept = succeeds(f"level-{who}"), Kept()
    levels["retry"].addHandler(kept)
    try:
        with LoggingExporter().install():
            call()  # type: ignore[operator]
            assert global_bus.mode == 0  # at WARNING: the success builds nothing
            levels[who].setLevel(logging.DEBUG)
            assert global_bus.mode == 2
            call()  # type: ignore[operator]
            levels[who].setLevel(logging.WARNING if who == "root" else logging.NOTSET)
            assert global_bus.mode == 0
            call()  # type: ignore[operator]
    finally:
        levels["retry"].removeHandler(kept)
    assert kept.messages == ["retry.call"]


def test_logging_disable_stops_asking_and_undoing_it_asks_again(
    levels: dict[str, logging.Logger],
) -> None:
    from datapunk_recovery._core.events import global_bus

    call, kept = succeeds("disabled"), Kept()
    levels["retry"].addHandler(kept)
    levels["retry"].setLevel(logging.DEBUG)
    try:
        with LoggingExporter().install():
            assert global_bus.mode == 2
            logging.disable(logging.INFO)
            assert global_bus.mode == 0
            call()  # type: ignore[operator]
            logging.disable(logging.NOTSET)
            assert global_bus.mode == 2
            call()  # type: ignore[operator]
    finally:
        levels["retry"].removeHandler(kept)
    assert kept.messages == ["retry.call"]


def test_a_handler_with_a_filter_decides_what_is_logged_never_the_exporter(
    levels: dict[str, logging.Logger],
) -> None:
    # A filter cannot be asked before a record exists: the exporter keeps
    # asking for what the levels let through, and the filter drops records.
    call, kept = succeeds("filtered"), Kept()
    kept.addFilter(lambda record: record.__dict__.get("attempts") == 1)
    levels["retry"].setLevel(logging.DEBUG)
    levels["retry"].addHandler(kept)
    try:
        with LoggingExporter().install():
            call()  # type: ignore[operator]
            with pytest.raises(ConnectionError):
                flaky("filtered-out", failures=5, attempts=2)()  # type: ignore[operator]
    finally:
        levels["retry"].removeHandler(kept)
    # the first call's one event passes; the failing call's events carry no
    # attempts field or attempts=2
    assert kept.messages == ["retry.call"]


def test_a_logger_disabled_then_enabled_again_is_asked_again(
    levels: dict[str, logging.Logger],
) -> None:
    # logging.config.dictConfig disables existing loggers, and enables a
    # logger it configures after setting its level: no cache clearing follows
    # ``logger.disabled = False``, so the exporter must not have decided on it.
    call, kept = succeeds("re-enabled"), Kept()
    retry_logger = levels["retry"]
    retry_logger.setLevel(logging.DEBUG)
    retry_logger.addHandler(kept)
    try:
        with LoggingExporter().install():
            retry_logger.disabled = True
            levels["root"].setLevel(logging.ERROR)  # any level change, while disabled
            call()  # type: ignore[operator]
            retry_logger.disabled = False
            call()  # type: ignore[operator]
    finally:
        retry_logger.removeHandler(kept)
    assert kept.messages == ["retry.call"]
