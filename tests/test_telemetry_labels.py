"""Bounded label cardinality: configured names only, a cap per label, an ``other`` bucket.

The cardinality test offers 100,000 distinct operation and endpoint names
(what a careless caller naming operations after URLs would produce) and
checks that series, admitted values and memory all stay bounded.
"""

from __future__ import annotations

import gc
import tracemalloc
from dataclasses import dataclass
from typing import ClassVar

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

from datapunk_recovery import retrying
from datapunk_recovery._core import events, stats
from datapunk_recovery._core.events import CallFinished, Event
from datapunk_recovery.telemetry.labels import Labeler, LabelPolicy
from datapunk_recovery.telemetry.metrics import MEASURES, METRICS, Measure, Metric, MetricKind
from datapunk_recovery.telemetry.otel import OpenTelemetryExporter
from datapunk_recovery.telemetry.prometheus import PrometheusExporter
from datapunk_recovery.telemetry.statistics import StatisticsCollector


def test_values_are_admitted_up_to_the_cap_then_other() -> None:
    labeler = Labeler(LabelPolicy(max_values=2))
    assert labeler("operation", "a") == "a"
    assert labeler("operation", "b") == "b"
    assert labeler("operation", "c") == "other"
    assert labeler("operation", "a") == "a"  # admitted values stay
    assert labeler("breaker", "c") == "c"  # each label has its own cap
    assert labeler.admitted("operation") == {"a", "b"}


def test_allowed_names_pin_a_label() -> None:
    labeler = Labeler(LabelPolicy(allowed={"operation": {"fetch", "store"}}))
    assert labeler("operation", "fetch") == "fetch"
    assert labeler("operation", "/users/12345") == "other"


def test_per_label_limits_and_long_values() -> None:
    labeler = Labeler(LabelPolicy(max_values=5, limits={"endpoint": 1}, max_length=10))
    assert labeler("endpoint", "a") == "a"
    assert labeler("endpoint", "b") == "other"
    assert labeler("operation", "x" * 50) == "xxxxxxx..."


def test_values_are_rendered_as_text() -> None:
    from datapunk_recovery._core.errors import ErrorCategory

    labeler = Labeler()
    assert labeler("category", ErrorCategory.NETWORK) == "network"
    assert labeler("state", True) == "true"
    assert labeler("kind", None) == "none"
    assert labeler("kind", 3) == "3"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_values": 0}, ValueError),
        ({"max_values": True}, TypeError),
        ({"max_length": 3}, ValueError),
        ({"limits": {"Bad-Label": 3}}, ValueError),
        ({"limits": {"operation": 0}}, ValueError),
        ({"allowed": {"operation": "fetch"}}, TypeError),
        ({"other": ""}, ValueError),
    ],
)
def test_the_policy_is_validated(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match="LabelPolicy"):
        LabelPolicy(**kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointCalled(Event):
    """A stand-in for a network event naming its endpoint."""

    name: ClassVar[str] = "test.endpoint_called"
    area: ClassVar[str] = "network"

    endpoint: str


ENDPOINT_CALLS = Metric(
    "endpoint.calls", MetricKind.COUNTER, ("operation", "endpoint"), "Calls per endpoint."
)


def flood(start: int, stop: int) -> None:
    """Calls to ``stop - start`` distinct operations, each at its own endpoint."""
    for i in range(start, stop):
        events.emit(
            CallFinished(
                operation=f"GET /users/{i}", at=0.0, attempts=1, elapsed=0.0, succeeded=True
            )
        )
        events.emit(EndpointCalled(operation="fetch", at=0.0, endpoint=f"https://api/{i}"))


CAP = 50
MEASURES_WITH_ENDPOINTS = {
    **MEASURES,
    EndpointCalled.name: (
        Measure(ENDPOINT_CALLS, {"operation": "operation", "endpoint": "endpoint"}),
    ),
}


def test_100000_distinct_names_keep_prometheus_and_statistics_bounded() -> None:
    registry = CollectorRegistry()
    prometheus = PrometheusExporter(
        registry,
        labels=LabelPolicy(max_values=CAP),
        metrics=(*METRICS, ENDPOINT_CALLS),
        measures=MEASURES_WITH_ENDPOINTS,
    )
    collector = StatisticsCollector(max_operations=CAP)
    with prometheus.install(), collector.install():
        flood(0, 10_000)  # every cap is reached long before this ends
        gc.collect()
        # Memory is traced over 20,000 new names (tracing every allocation is
        # slow): a leak of even 4 bytes a name would show; the rest still flows.
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            flood(10_000, 30_000)
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        flood(30_000, 100_000)
    assert growth < 64 * 1024, f"memory grew by {growth} bytes over 20,000 new names"

    endpoints = {"operation": "fetch", "endpoint": "other"}
    assert (
        registry.get_sample_value("datapunk_recovery_endpoint_calls_total", endpoints)
        == 100_000 - CAP
    )
    assert prometheus.labeler.admitted("endpoint") == {f"https://api/{i}" for i in range(CAP)}

    stats = collector.statistics()
    assert len(stats) == CAP + 1  # CAP operations, "fetch" among them, and "other"
    assert stats["other"].calls == 100_000 - CAP + 1


def calls_by_operation(registry: CollectorRegistry) -> dict[str, float]:
    return {
        s.labels["operation"]: s.value
        for family in registry.collect()
        if family.name == "datapunk_recovery_calls"
        for s in family.samples
        if s.name.endswith("_total")
    }


def test_operations_named_per_call_keep_the_pulled_call_counts_bounded() -> None:
    registry = CollectorRegistry()
    with PrometheusExporter(registry, labels=LabelPolicy(max_values=CAP)).install():
        for i in range(3 * CAP):
            for attempt in retrying(name=f"GET /users/{i}"):
                with attempt:
                    pass
        gc.collect()  # the blocks' statistics are gone: their counts stay
    calls = calls_by_operation(registry)
    assert len(calls) == CAP + 1
    assert calls["other"] == 2 * CAP
    assert sum(calls.values()) == 3 * CAP


def test_counts_of_collected_operations_past_the_retired_cap_are_reported_as_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gc.collect()
    stats.read_operations()  # what was collected before is retired now
    monkeypatch.setattr(stats, "RETIRED_NAMES", len(stats._retired) + 2)
    registry = CollectorRegistry()
    with PrometheusExporter(registry).install():
        for i in range(5):
            for attempt in retrying(name=f"retired-cap-{i}"):
                with attempt:
                    pass
            del attempt  # it holds the block, which holds its statistics
            gc.collect()
    calls = calls_by_operation(registry)
    assert {n: calls.get(n) for n in ("retired-cap-0", "retired-cap-1")} == {
        "retired-cap-0": 1.0,
        "retired-cap-1": 1.0,
    }
    assert calls["other"] == 3.0


def test_100000_distinct_names_keep_otel_series_bounded() -> None:
    reader = InMemoryMetricReader()
    otel = OpenTelemetryExporter(
        meter_provider=MeterProvider(metric_readers=[reader]),
        labels=LabelPolicy(max_values=CAP),
        metrics=(*METRICS, ENDPOINT_CALLS),
        measures=MEASURES_WITH_ENDPOINTS,
    )
    with otel.install():
        flood(0, 100_000)  # the calls these events report are pulled from the engine: not them
        for i in range(3 * CAP):
            for attempt in retrying(name=f"GET /users/{i}"):
                with attempt:
                    pass
        data = reader.get_metrics_data()
    assert data is not None
    points = {
        m.name: len(m.data.data_points)
        for r in data.resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
    }
    assert points == {
        # "fetch" (from the endpoint events) took one of the CAP operation
        # names first: CAP - 1 operations and "other"
        "datapunk.recovery.calls": CAP,
        "datapunk.recovery.endpoint.calls": CAP + 1,
        # the default attempt histogram: the engine's buckets as counters
        "datapunk.recovery.attempt.duration.bucket": CAP * (len(stats.DURATION_BOUNDS) + 1),
        "datapunk.recovery.attempt.duration.count": CAP,
        "datapunk.recovery.attempt.duration.sum": CAP,
    }
