"""The structlog exporter: the event name as structlog's event, fields as keys."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from datapunk_recovery import Jitter, RetryConfig, retry
from datapunk_recovery._core.events import AttemptFinished
from datapunk_recovery.telemetry.structlog import StructlogExporter
from datapunk_recovery.testing import fake_clock, instant_retries


@pytest.fixture(autouse=True)
def _instant() -> Iterator[None]:
    with instant_retries(), fake_clock():
        yield


def test_retry_events_through_structlog() -> None:
    attempts = [ConnectionError("reset"), None]

    @retry(RetryConfig(max_attempts=3, base_delay=0.25, jitter=Jitter.NONE), name="fetch")
    def fetch() -> str:
        error = attempts.pop(0)
        if error:
            raise error
        return "ok"

    with capture_logs() as logs, StructlogExporter().install():
        fetch()
    scheduled = next(entry for entry in logs if entry["event"] == "retry.scheduled")
    assert scheduled == {
        "event": "retry.scheduled",
        "log_level": "info",
        "area": "retry",
        "operation": "fetch",
        "at": 0.0,
        "retry": 1,
        "delay": 0.25,
        "from_server": False,
        "category": "network",
        "error_type": "ConnectionError",
    }
    levels = {entry["event"]: entry["log_level"] for entry in logs}
    assert levels == {"retry.attempt": "debug", "retry.scheduled": "info", "retry.call": "debug"}


def test_one_logger_per_area() -> None:
    names: list[str] = []

    def get_logger(name: str) -> Any:
        names.append(name)
        return structlog.get_logger(name)

    exporter = StructlogExporter(get_logger=get_logger)
    event = AttemptFinished(operation="op", at=0.0, attempt=1, duration=0.1, succeeded=True)
    with capture_logs():
        exporter(event)
        exporter(event)
    assert names == ["datapunk_recovery.retry"]


def test_a_level_between_the_standard_ones_uses_the_one_below() -> None:
    exporter = StructlogExporter(levels={"retry.attempt": logging.WARNING + 5})
    with capture_logs() as logs:
        exporter(AttemptFinished(operation="op", at=0.0, attempt=1, duration=0.1, succeeded=True))
    assert logs[0]["log_level"] == "warning"


def test_structlog_asks_for_every_kind_whatever_stdlib_levels_say() -> None:
    # structlog filters in its own processors, out of the exporter's sight: it
    # asks for everything (a successful call leaves the fast path) and a
    # first-try success is still one entry, the call's.
    from datapunk_recovery._core.events import global_bus

    @retry(name="quick")
    def quick() -> str:
        return "ok"

    retry_logger = logging.getLogger("datapunk_recovery.retry")
    saved = retry_logger.level
    retry_logger.setLevel(logging.ERROR)
    try:
        with capture_logs() as logs, StructlogExporter().install():
            assert global_bus.mode == 2
            quick()
    finally:
        retry_logger.setLevel(saved)
    assert [(entry["event"], entry["attempts"]) for entry in logs] == [("retry.call", 1)]
