"""The OpenTelemetry exporter, read back with the SDK's in-memory reader and span exporter.

Metrics carry dotted names (``datapunk.recovery.calls``); retries and
give-ups show up as events on the span that was current during the call.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import Counter, MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics import Histogram as Histogram_
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from datapunk_recovery import RetryConfig, retry
from datapunk_recovery._core.events import AttemptFinished, GaveUp, GiveUpReason
from datapunk_recovery.telemetry.metrics import METRICS
from datapunk_recovery.telemetry.otel import OpenTelemetryExporter
from datapunk_recovery.testing import FakeClock, fake_clock, instant_retries

Points = dict[tuple[str, frozenset[tuple[str, Any]]], Any]


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with instant_retries(), fake_clock() as fake:
        yield fake


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(spans: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider


def points(reader: InMemoryMetricReader) -> Points:
    """Each data point by (metric name, attributes): a number, or (count, sum) for histograms."""
    data = reader.get_metrics_data()
    out: Points = {}
    if data is None:
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for p in metric.data.data_points:
                    attrs = frozenset((p.attributes or {}).items())
                    if isinstance(p, HistogramDataPoint):
                        out[(metric.name, attrs)] = (p.count, p.sum)
                    elif isinstance(p, NumberDataPoint):
                        out[(metric.name, attrs)] = p.value
    return out


def attrs(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def attempt_durations(got: Points, operation: str) -> tuple[int, float]:
    """Pop the attempt-duration histogram of ``operation``, either shape: (count, sum)."""
    op = attrs(operation=operation)
    histogram = got.pop(("datapunk.recovery.attempt.duration", op), None)
    if histogram is not None:  # attempt_histogram="synchronous"
        count, total = histogram
        return int(count), float(total)
    count = got.pop(("datapunk.recovery.attempt.duration.count", op))
    total = got.pop(("datapunk.recovery.attempt.duration.sum", op))
    buckets = [key for key in got if key[0] == "datapunk.recovery.attempt.duration.bucket"]
    assert got[("datapunk.recovery.attempt.duration.bucket", op | {("le", "+Inf")})] == count
    for key in buckets:
        del got[key]
    return int(count), float(total)


@pytest.mark.parametrize("attempt_histogram", ["buckets", "synchronous"])
def test_a_scripted_run_as_otel_metrics(
    clock: FakeClock, reader: InMemoryMetricReader, attempt_histogram: str
) -> None:
    plan: list[tuple[float, type[Exception] | None]] = [
        (0.1, ConnectionError),
        (0.05, None),  # call 1: success after retry
        (0.2, ValueError),  # call 2: not retryable
    ]

    @retry(RetryConfig(max_attempts=3), name="fetch")
    def fetch() -> None:
        seconds, error = plan.pop(0)
        clock.advance(seconds)
        if error is not None:
            raise error("boom")

    exporter = OpenTelemetryExporter(
        meter_provider=MeterProvider(metric_readers=[reader]), attempt_histogram=attempt_histogram
    )
    with exporter.install():
        fetch()
        with pytest.raises(ValueError, match="boom"):
            fetch()

    got = points(reader)
    count, total = attempt_durations(got, "fetch")
    assert count == 3
    assert total == pytest.approx(0.35)
    assert got == {
        ("datapunk.recovery.calls", attrs(operation="fetch", outcome="success_after_retry")): 1,
        ("datapunk.recovery.calls", attrs(operation="fetch", outcome="failure")): 1,
        ("datapunk.recovery.retries", attrs(operation="fetch", category="network")): 1,
        ("datapunk.recovery.giveups", attrs(operation="fetch", reason="non_retryable")): 1,
    }


def test_by_default_attempt_durations_are_bucket_counters_of_the_engine_buckets_exactly(
    clock: FakeClock, reader: InMemoryMetricReader
) -> None:
    @retry(RetryConfig(max_attempts=3), name="fetch")
    def fetch(seconds: float) -> None:
        clock.advance(seconds)

    provider = MeterProvider(metric_readers=[reader])
    with OpenTelemetryExporter(meter_provider=provider).install():
        for seconds in (0.04, 0.08, 0.2, 61.0):
            fetch(seconds)
    got = points(reader)
    assert ("datapunk.recovery.attempt.duration", attrs(operation="fetch")) not in got
    bucket = {
        le: got[("datapunk.recovery.attempt.duration.bucket", attrs(operation="fetch", le=le))]
        for le in ("0.025", "0.05", "0.1", "0.25", "60", "+Inf")
    }
    # cumulative, by upper bound
    assert bucket == {"0.025": 0, "0.05": 1, "0.1": 2, "0.25": 3, "60": 3, "+Inf": 4}
    assert got[("datapunk.recovery.attempt.duration.count", attrs(operation="fetch"))] == 4
    total = got[("datapunk.recovery.attempt.duration.sum", attrs(operation="fetch"))]
    assert total == pytest.approx(61.32)


def test_the_synchronous_choice_is_a_real_sdk_histogram_in_seconds(
    clock: FakeClock, reader: InMemoryMetricReader
) -> None:
    @retry(name="fetch")
    def fetch(seconds: float) -> None:
        clock.advance(seconds)

    provider = MeterProvider(metric_readers=[reader])
    exporter = OpenTelemetryExporter(meter_provider=provider, attempt_histogram="synchronous")
    with exporter.install():
        for seconds in (0.04, 0.2):
            fetch(seconds)
    data = reader.get_metrics_data()
    assert data is not None
    (metric,) = [
        m
        for r in data.resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
        if m.name.startswith("datapunk.recovery.attempt.duration")
    ]
    assert (metric.name, metric.unit) == ("datapunk.recovery.attempt.duration", "s")
    assert isinstance(metric.data, Histogram)
    (point,) = metric.data.data_points
    assert (point.count, point.sum) == (2, pytest.approx(0.24))


def test_an_unknown_attempt_histogram_kind_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"attempt_histogram.*'sparse'"):
        OpenTelemetryExporter(meter_provider=MeterProvider(), attempt_histogram="sparse")


def test_durations_are_in_seconds_and_names_are_dotted(reader: InMemoryMetricReader) -> None:
    OpenTelemetryExporter(meter_provider=MeterProvider(metric_readers=[reader]))
    names = {m.otel_name for m in METRICS}
    assert "datapunk.recovery.calls" in names
    assert "datapunk.recovery.attempt.duration" in names
    units = {m.otel_name: m.otel_unit for m in METRICS}
    assert units["datapunk.recovery.attempt.duration"] == "s"
    assert units["datapunk.recovery.resource.wait"] == "s"
    assert units["datapunk.recovery.calls"] == "1"


def test_retries_and_giveups_are_events_of_the_current_span(
    clock: FakeClock,
    reader: InMemoryMetricReader,
    spans: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    @retry(RetryConfig(max_attempts=2), name="fetch")
    def fetch() -> None:
        raise ConnectionError("reset by peer")

    tracer = tracer_provider.get_tracer("test")
    exporter = OpenTelemetryExporter(meter_provider=MeterProvider(metric_readers=[reader]))
    with (
        exporter.install(),
        tracer.start_as_current_span("request"),
        pytest.raises(ConnectionError),
    ):
        fetch()

    (span,) = spans.get_finished_spans()
    events = [(e.name, dict(e.attributes or {})) for e in span.events]
    assert [name for name, _ in events] == [
        "datapunk.recovery.retry.scheduled",
        "datapunk.recovery.retry.gave_up",
    ]
    scheduled, gave_up = (a for _, a in events)
    assert scheduled["operation"] == "fetch"
    assert scheduled["retry"] == 1
    assert scheduled["category"] == "network"
    assert scheduled["error_type"] == "ConnectionError"
    assert gave_up["reason"] == "attempts"
    assert gave_up["attempts"] == 2
    # attempts and calls are metrics, not span events: a span stays readable
    assert all("attempt" not in name.split(".")[-1] for name, _ in events)


def test_no_span_events_when_asked_for_none(
    clock: FakeClock, spans: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    @retry(RetryConfig(max_attempts=2), name="fetch")
    def fetch() -> None:
        raise ConnectionError("reset by peer")

    exporter = OpenTelemetryExporter(meter_provider=MeterProvider(), span_events=())
    with (
        exporter.install(),
        tracer_provider.get_tracer("t").start_as_current_span("request"),
        pytest.raises(ConnectionError),
    ):
        fetch()
    (span,) = spans.get_finished_spans()
    assert span.events == ()


def test_without_an_sdk_every_instrument_is_a_no_op() -> None:
    # The API alone hands out no-op instruments and a non-recording span.
    from opentelemetry import metrics, trace

    exporter = OpenTelemetryExporter(meter_provider=metrics.NoOpMeterProvider())
    instruments = {type(record.__self__) for record in exporter._record.values()}
    assert instruments == {metrics.NoOpCounter, metrics.NoOpHistogram}
    assert not trace.get_current_span().is_recording()  # span events have nowhere to go
    exporter(
        GaveUp(
            operation="op",
            at=0.0,
            attempts=1,
            elapsed=0.0,
            reason=GiveUpReason.ATTEMPTS,
            error_type="E",
        )
    )
    exporter(AttemptFinished(operation="op", at=0.0, attempt=1, duration=0.1, succeeded=True))
    assert not trace.get_current_span().is_recording()  # the events left no span behind


def test_gauges_report_the_last_value_and_the_current_state(
    reader: InMemoryMetricReader,
) -> None:
    from datapunk_recovery.breaker import BreakerState, BreakerStateChanged
    from datapunk_recovery.resource.pool import PoolUsage

    exporter = OpenTelemetryExporter(meter_provider=MeterProvider(metric_readers=[reader]))
    for in_use in (1, 3, 2):
        exporter(
            PoolUsage(operation="gpus", at=0.0, kind="gpu", capacity=4, in_use=in_use, waiting=0)
        )
    exporter(
        BreakerStateChanged(
            operation="db", at=0.0, from_state=BreakerState.CLOSED,
            to_state=BreakerState.OPEN, reason="consecutive_failures",
        )
    )  # fmt: skip
    got = points(reader)
    assert got.pop(("datapunk.recovery.resource.in_use", attrs(kind="gpu"))) == 2
    states = {dict(a)["state"]: v for (name, a), v in got.items() if name.endswith("breaker.state")}
    assert states == {s.value: (1 if s is BreakerState.OPEN else 0) for s in BreakerState}


def test_breaker_rejections_and_failovers_are_span_events(
    clock: FakeClock, spans: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    from datapunk_recovery._core.errors import CircuitOpenError
    from datapunk_recovery._core.events import emit
    from datapunk_recovery.breaker import BreakerConfig, CircuitBreaker
    from datapunk_recovery.network.router import FailedOver

    breaker = CircuitBreaker("db", BreakerConfig(consecutive_failures=1, open_duration=5.0))
    exporter = OpenTelemetryExporter(meter_provider=MeterProvider())
    with exporter.install(), tracer_provider.get_tracer("t").start_as_current_span("request"):
        with pytest.raises(ZeroDivisionError):
            breaker.call(lambda: 1 / 0)
        with pytest.raises(CircuitOpenError):
            breaker.call(lambda: 1)
        emit(
            FailedOver(
                operation="users", at=0.0, from_endpoint="primary", to_endpoint="replica",
                from_priority=0, to_priority=1, attempt=2,
            )
        )  # fmt: skip
    (span,) = spans.get_finished_spans()
    events = {e.name: dict(e.attributes or {}) for e in span.events}
    assert events["datapunk.recovery.breaker.rejected"]["operation"] == "db"
    assert events["datapunk.recovery.breaker.rejected"]["remaining"] == 5.0
    assert events["datapunk.recovery.network.failover"]["to_endpoint"] == "replica"
    assert "datapunk.recovery.breaker.state" not in events  # state changes are metrics and logs


class Collecting(MetricExporter):
    """A push exporter that keeps every export, with the temporality it asks the reader for."""

    def __init__(self, temporality: AggregationTemporality) -> None:
        kinds = (Counter, Histogram_, ObservableCounter)
        super().__init__(preferred_temporality=dict.fromkeys(kinds, temporality))
        self.exports: list[MetricsData] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> Any:
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


def exported_counts(data: MetricsData, operation: str) -> dict[str, float]:
    """Attempts (``.count``, ``+Inf`` bucket) and calls of ``operation`` in one export."""
    out = {"count": 0.0, "+Inf": 0.0, "calls": 0.0}
    for metric in (m for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics):
        for p in metric.data.data_points:
            labels = dict(p.attributes or {})
            if labels.get("operation") != operation:
                continue
            if metric.name == "datapunk.recovery.attempt.duration.count":
                out["count"] += p.value
            elif metric.name == "datapunk.recovery.attempt.duration.bucket":
                out["+Inf"] += p.value if labels["le"] == "+Inf" else 0.0
            elif metric.name == "datapunk.recovery.calls":
                out["calls"] += p.value
    return out


@pytest.mark.parametrize(
    "temporality",
    [AggregationTemporality.DELTA, AggregationTemporality.CUMULATIVE],
    ids=["delta", "cumulative"],
)
def test_a_push_exporter_receives_the_default_bucket_counters_exactly_in_its_temporality(
    clock: FakeClock, temporality: AggregationTemporality
) -> None:
    exporter = Collecting(temporality)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    otel = OpenTelemetryExporter(meter_provider=MeterProvider(metric_readers=[reader]))
    fails_first: set[int] = set()
    lock = threading.Lock()

    @retry(RetryConfig(max_attempts=2), name="pushed")
    def call(i: int) -> None:
        with lock:
            first = i % 3 == 0 and i not in fails_first
            fails_first.add(i)
        if first:
            raise ConnectionError("reset")

    def calls_from_threads(offset: int) -> None:
        threads = [
            threading.Thread(target=lambda k=k: [call(i) for i in range(k, k + 100)])
            for k in range(offset, offset + 400, 100)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    with otel.install():
        calls_from_threads(0)
        reader.force_flush()
        calls_from_threads(1200)  # as many calls fail first (i % 3 == 0) as in the first batch
        reader.force_flush()
    stats = call.statistics()  # type: ignore[attr-defined]
    assert (stats.calls, stats.attempts) == (800, 800 + 268)
    first, second = (exported_counts(data, "pushed") for data in exporter.exports)
    assert first == {"count": 400 + 134, "+Inf": 400 + 134, "calls": 400}
    if temporality is AggregationTemporality.DELTA:  # what happened since the last export
        assert second == first
    else:  # everything since install
        assert second == {"count": stats.attempts, "+Inf": stats.attempts, "calls": stats.calls}
