"""Resource tracking: leaks (never released, released twice) are reported with where acquired."""

from __future__ import annotations

import gc

import pytest

from datapunk_recovery._core import events
from datapunk_recovery.resource import (
    LeakKind,
    LeakReport,
    ResourceLeaked,
    ResourceTracker,
    TrackedResource,
)


def acquire_gpu(tracker: ResourceTracker) -> TrackedResource[str]:
    return tracker.track("device handle with secret=hunter2", "gpu")


def test_a_released_resource_is_no_longer_in_use() -> None:
    tracker = ResourceTracker()
    handle = acquire_gpu(tracker)
    assert tracker.in_use() == {"gpu": 1}
    assert handle.release() is True
    assert handle.released
    assert tracker.in_use() == {}
    assert tracker.check() == []


def test_a_second_release_is_reported_with_both_places() -> None:
    reports: list[LeakReport] = []
    tracker = ResourceTracker(on_leak=reports.append)
    handle = acquire_gpu(tracker)
    handle.release()
    assert handle.release() is False  # nothing is freed the second time
    [report] = reports
    assert report.problem is LeakKind.RELEASED_TWICE
    assert report.kind == "gpu" and report.resource_id == handle.resource_id
    assert "in acquire_gpu" in report.acquired_at[0]  # the innermost frame outside the library
    assert "test_a_second_release_is_reported" in report.released_at[0]


def test_a_handle_collected_unreleased_is_reported_as_never_released() -> None:
    seen: list[events.Event] = []
    bus = events.EventBus()
    bus.subscribe(seen.append)
    tracker = ResourceTracker("workers", bus=bus)
    handle = acquire_gpu(tracker)
    del handle
    gc.collect()
    [report] = tracker.leaks()
    assert report.problem is LeakKind.NEVER_RELEASED
    assert str(report).startswith("gpu #1 never released; acquired at ")
    [event] = seen
    assert isinstance(event, ResourceLeaked)
    assert (event.operation, event.kind, event.problem) == ("workers", "gpu", "never_released")
    assert "acquire_gpu" in event.where
    assert "hunter2" not in repr(report) + repr(event)  # the resource itself never shows


def test_check_reports_what_is_still_held_once() -> None:
    tracker = ResourceTracker(capture_stack=False)
    kept = [tracker.track(object(), "file"), tracker.track(object(), "file")]
    kept[0].release()
    leaks = tracker.check()
    assert [(r.kind, r.problem, r.acquired_at) for r in leaks] == [
        ("file", LeakKind.NEVER_RELEASED, ())
    ]
    assert tracker.check() == leaks  # reported once, not again
    del kept
    gc.collect()
    assert len(tracker.leaks()) == 1  # collecting it later does not report it twice


def test_a_failing_leak_callback_does_not_break_the_release() -> None:
    def broken(report: LeakReport) -> None:
        raise RuntimeError("observer bug")

    tracker = ResourceTracker(on_leak=broken)
    handle = tracker.track(1, "slot")
    handle.release()
    assert handle.release() is False
    assert len(tracker.leaks()) == 1


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match=r"ResourceTracker.stack_depth: must be >= 1"):
        ResourceTracker(stack_depth=0)
    with pytest.raises(TypeError, match=r"ResourceTracker.on_leak: expected a callable"):
        ResourceTracker(on_leak="print")  # type: ignore[arg-type]
