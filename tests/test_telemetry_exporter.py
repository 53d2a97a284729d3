"""Exporters are plain subscribers with a lifetime; unused ones cost nothing."""

from __future__ import annotations

import subprocess
import sys

from datapunk_recovery._core import events
from datapunk_recovery._core.events import CallFinished, Event, EventBus
from datapunk_recovery.telemetry import Exporter


class Recorder(Exporter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.seen.append(event)


def call(operation: str = "op") -> CallFinished:
    return CallFinished(operation=operation, at=0.0, attempts=1, elapsed=0.0, succeeded=True)


def test_install_globally_then_close() -> None:
    recorder = Recorder().install()
    assert events.listening()
    events.emit(call())
    recorder.close()
    events.emit(call())
    assert len(recorder.seen) == 1


def test_install_on_chosen_buses_only() -> None:
    watched, ignored = EventBus(), EventBus()
    with Recorder().install(watched) as recorder:
        assert events.listening(watched)
        assert not events.listening(ignored)
        events.emit(call("watched"), watched)
        events.emit(call("ignored"), ignored)
    assert [e.operation for e in recorder.seen] == ["watched"]
    assert not events.listening(watched)


def test_an_exporter_is_a_subscriber_like_any_other() -> None:
    recorder = Recorder()
    unsubscribe = events.subscribe(recorder)
    events.emit(call())
    unsubscribe()
    assert len(recorder.seen) == 1


def test_importing_telemetry_loads_no_optional_library_and_listens_to_nothing() -> None:
    code = (
        "import sys, datapunk_recovery.telemetry\n"
        "from datapunk_recovery._core import events\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(loaded & {'prometheus_client', 'opentelemetry', 'structlog'}))\n"
        "print(events.listening())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["[]", "False"]
