"""The callback exporter: the measurements, or the redacted events, handed to a function."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from datapunk_recovery import RetryConfig, retry
from datapunk_recovery.telemetry import CallbackExporter, LabelPolicy, Update
from datapunk_recovery.testing import fake_clock, instant_retries


@pytest.fixture(autouse=True)
def _instant() -> Iterator[None]:
    with instant_retries(), fake_clock():
        yield


def fetch_failing_once() -> Any:
    errors = [ConnectionError("reset")]

    @retry(RetryConfig(max_attempts=3), name="fetch")
    def fetch() -> str:
        if errors:
            raise errors.pop()
        return "ok"

    return fetch


def test_updates_carry_metric_labels_and_value() -> None:
    updates: list[Update] = []
    fetch = fetch_failing_once()
    with CallbackExporter(on_update=updates.append).install():
        fetch()
    got = [(u.metric.prometheus_name, u.attributes, u.value) for u in updates]
    assert got == [
        ("datapunk_recovery_attempt_duration_seconds", {"operation": "fetch"}, 0.0),
        ("datapunk_recovery_retries", {"operation": "fetch", "category": "network"}, 1.0),
        ("datapunk_recovery_attempt_duration_seconds", {"operation": "fetch"}, 0.0),
        ("datapunk_recovery_calls", {"operation": "fetch", "outcome": "success_after_retry"}, 1.0),
    ]


def test_a_first_try_success_feeds_calls_and_attempt_durations_from_one_event() -> None:
    updates: list[Update] = []

    @retry(name="fetch")
    def fetch() -> str:
        return "ok"

    with CallbackExporter(on_update=updates.append).install():
        fetch()
    got = [(u.metric.prometheus_name, u.attributes, u.value) for u in updates]
    assert got == [
        ("datapunk_recovery_calls", {"operation": "fetch", "outcome": "success"}, 1.0),
        ("datapunk_recovery_attempt_duration_seconds", {"operation": "fetch"}, 0.0),
    ]


def test_events_as_flat_fields_filtered_by_name() -> None:
    seen: list[Mapping[str, Any]] = []
    fetch = fetch_failing_once()
    with CallbackExporter(on_event=seen.append, names={"retry.call"}).install():
        fetch()
    assert seen == [
        {
            "event": "retry.call",
            "area": "retry",
            "operation": "fetch",
            "at": 0.0,
            "attempts": 2,
            "elapsed": 0.0,
            "succeeded": True,
            "outcome": "success_after_retry",
            "first_try": False,
        }
    ]


def test_labels_are_bounded_like_any_exporter() -> None:
    updates: list[Update] = []
    exporter = CallbackExporter(
        on_update=updates.append, labels=LabelPolicy(allowed={"operation": {"store"}})
    )
    fetch = fetch_failing_once()
    with exporter.install():
        fetch()
    assert {u.attributes["operation"] for u in updates} == {"other"}


def test_a_callback_is_required() -> None:
    with pytest.raises(TypeError, match="on_update, on_event"):
        CallbackExporter()
    with pytest.raises(TypeError, match="expected a callable"):
        CallbackExporter(on_event="print")  # type: ignore[arg-type]


def test_the_exporter_asks_only_for_the_kinds_it_measures_or_names() -> None:
    from datapunk_recovery._core.events import global_bus

    with CallbackExporter(on_update=lambda u: None).install():
        assert global_bus.wants("retry.call") and global_bus.wants("bulkhead.rejected")
        assert not global_bus.wants("pipeline.stage")  # measures nothing
    with CallbackExporter(on_event=lambda f: None, names={"breaker.state"}).install():
        assert global_bus.wants("breaker.state") and not global_bus.wants("breaker.rejected")
        assert global_bus.mode == 0  # a successful call stays on the engine's fast path
    with CallbackExporter(on_event=lambda f: None).install():
        assert global_bus.wants("pipeline.stage") and global_bus.mode == 2


def test_each_event_class_is_compiled_once_and_labels_worked_out_once_per_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datapunk_recovery.flow.bulkhead import BulkheadRejected
    from datapunk_recovery.telemetry.labels import Labeler

    asked: list[tuple[str, object]] = []
    label = Labeler.__call__

    def counting(self: Labeler, name: str, raw: object) -> str:
        asked.append((name, raw))
        return label(self, name, raw)

    monkeypatch.setattr(Labeler, "__call__", counting)
    updates: list[Update] = []
    exporter = CallbackExporter(on_update=updates.append)
    for at in range(50):
        exporter(BulkheadRejected(operation="db", at=float(at), reason="full", active=4, queued=0))
    assert asked == [("bulkhead", "db")]
    assert len(updates) == 50 and updates[-1].attributes == {"bulkhead": "db"}
