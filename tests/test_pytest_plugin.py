"""The pytest plugin: its fixtures, its entry point, and docs/testing.md's examples as tests."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from datapunk_recovery._core import events
from datapunk_recovery.testing import EventRecorder, isolated, record_events

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "testing.md"


def plugin_args() -> list[str]:
    """``-p`` for the plugin unless the installed package's entry point already loads it."""
    installed = any(
        ep.value == "datapunk_recovery.pytest_plugin"
        for ep in importlib.metadata.entry_points(group="pytest11")
    )
    return [] if installed else ["-p", "datapunk_recovery.pytest_plugin"]


def doc_examples() -> list[str]:
    """The python blocks of docs/testing.md that are test files (they define a test)."""
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    return [code for code in found if re.search(r"^def test_", code, flags=re.M)]


def test_the_entry_point_names_the_plugin_module() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert (
        '[project.entry-points.pytest11]\ndatapunk_recovery = "datapunk_recovery.pytest_plugin"'
        in text
    )


def test_the_testing_guide_has_examples_to_run() -> None:
    assert len(doc_examples()) >= 4


@pytest.mark.parametrize("index", range(len(doc_examples())))
def test_each_example_of_the_testing_guide_passes(pytester: pytest.Pytester, index: int) -> None:
    code = doc_examples()[index]
    pytester.makepyfile(test_example=code)
    result = pytester.runpytest(*plugin_args(), "-q", "-p", "no:cacheprovider")
    tests = len(re.findall(r"^def test_", code, flags=re.M))
    result.assert_outcomes(passed=tests)


STATE = """
from datapunk_recovery import chaos
from datapunk_recovery._core import clock, errors, events
from datapunk_recovery._execution import runtime as _runtime

def state():
    return (
        events.global_bus.subscriptions(),
        list(errors._rules),
        _runtime._instant,
        clock.current_fake(),
        chaos.all_enabled(),
    )

BEFORE = state()  # as the module finds it (pytester runs in this process)
"""


def test_the_fixtures_leave_nothing_behind(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_leak=STATE
        + """
import datapunk_recovery as dr

def test_changes_everything(recovery_instant, recovery_clock, recovery_events):
    events.subscribe(print)
    dr.register_rule(lambda exc: None)
    chaos.disable_all()
    assert _runtime._instant and clock.current_fake() is recovery_clock
    assert state() != BEFORE

def test_sees_nothing_of_it():
    assert state() == BEFORE
"""
    )
    result = pytester.runpytest(*plugin_args(), "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_without_a_fixture_the_plugin_changes_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain=STATE
        + """
def test_plain():
    assert state() == BEFORE
"""
    )
    result = pytester.runpytest(*plugin_args(), "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_recorder_answers_by_class_name_area_and_operation() -> None:
    from datapunk_recovery._core.events import GaveUp, GiveUpReason, RetryScheduled

    recorder = EventRecorder()
    retry = RetryScheduled(
        operation="a",
        at=0.0,
        retry=1,
        delay=0.5,
        from_server=False,
        category=__import__("datapunk_recovery").ErrorCategory.NETWORK,
        error_type="X",
    )
    gave_up = GaveUp(
        operation="b",
        at=1.0,
        attempts=3,
        elapsed=1.0,
        reason=GiveUpReason.ATTEMPTS,
        error_type="X",
    )
    recorder(retry)
    recorder(gave_up)
    assert recorder.of(RetryScheduled) == [retry]
    assert recorder.of("retry.gave_up") == [gave_up]
    assert recorder.of("retry") == [retry, gave_up]
    assert recorder.of("retry", operation="b") == [gave_up]
    assert recorder.retries() == [0.5]
    assert recorder.names() == ["retry.scheduled", "retry.gave_up"]
    recorder.clear()
    assert len(recorder) == 0


def test_record_events_and_isolated_undo_their_subscriptions() -> None:
    before = events.global_bus.subscriptions()
    with isolated():
        events.subscribe(print)
        with record_events() as recorder:
            assert recorder in [s for s, _ in events.global_bus.subscriptions()]
        assert recorder not in [s for s, _ in events.global_bus.subscriptions()]
    assert events.global_bus.subscriptions() == before
