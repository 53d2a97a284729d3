"""OpenTelemetry exporter: the measurement table as OTel metrics, plus span events.

::

    from datapunk_recovery.telemetry.otel import OpenTelemetryExporter
    OpenTelemetryExporter().install()

Metrics carry the dotted names of [`METRICS`][datapunk_recovery.telemetry.metrics.METRICS]
(``datapunk.recovery.calls``, ``datapunk.recovery.attempt.duration`` in ``s``,
...).  What the retry engine counts anyway (calls by outcome, retries by
category, give-ups by reason) is *pulled*: observable counters read the
engine's statistics at collection ([`pull`][datapunk_recovery.telemetry.pull]),
so a call costs this exporter no event for them.  The other counters and
histograms are synchronous instruments fed by events; gauges (in use now, a
breaker's state) are observable gauges reading the last value each label set
reported, since a gauge is read at collection, not at each event.

The attempt-duration histogram is pulled too, by default
(``attempt_histogram="buckets"``): the engine's own bucket counts
([`DURATION_BOUNDS`][datapunk_recovery._core.stats.DURATION_BOUNDS]) are read at
collection by observable counters, ``datapunk.recovery.attempt.duration.bucket``
(cumulative, attribute ``le`` as in Prometheus, ``+Inf`` last), ``.count`` and
``.sum`` (seconds).  No ``record`` at all, exact, and a call costs what it
costs under Prometheus; but the backend receives counters, not a histogram:
the SDK's views cannot re-bucket it, and a query rebuilds quantiles from the
``le`` series (as from Prometheus's own ``_bucket`` series).

Why not a real histogram by default: OpenTelemetry has no asynchronous
histogram, and the SDK (1.45) takes no pre-aggregated points (no
``MetricProducer``), so a histogram instrument needs one ``record`` per
value: 2.4 to 3 µs each, more than the 0.1x-of-stamina budget of a whole
retrying call (issue 16).  ``attempt_histogram="synchronous"`` keeps that
real SDK histogram (same name, kind histogram, unit ``s``, views apply) for
whoever needs it.  It is not fed per call: the engine times each attempt (as
for Prometheus) and the exporter receives the exact durations in batches when
they are folded ([`add_tap()`][datapunk_recovery._core.stats.add_tap]), keeps
them, and records them all at the next collection, in the reader's thread,
before the SDK reads the histogram; or the call that finds more than
[`PENDING_MAX`][datapunk_recovery.telemetry.otel.PENDING_MAX] durations
waiting records them (a reader that never collects).  The SDK's ``record``
still runs once per attempt, wherever it runs; exemplars are lost (a
duration recorded at collection is outside its call's trace context).

Without the pulled counters (``metrics`` without ``calls``), or with
``measures`` of its own for ``retry.attempt``, the histogram is a synchronous
one fed by events (a first-try success's ``CallFinished``, an
``AttemptFinished`` for the other attempts), whatever ``attempt_histogram``
says.

Span events: the event kinds of [`SPAN_EVENTS`][datapunk_recovery.telemetry.otel.SPAN_EVENTS]
(retries, give-ups,
failovers, breaker rejections) are added to the *current* span, when it
records, as ``datapunk.recovery.<event name>`` with the event's redacted
fields as attributes; a trace then shows why a call took three attempts.

Only ``opentelemetry-api`` is needed, imported when an exporter is built;
with no SDK configured every instrument is a no-op.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Final, Self

from datapunk_recovery import __version__
from datapunk_recovery._core import stats as _stats
from datapunk_recovery._core.events import Event, EventBus, global_bus
from datapunk_recovery._core.extras import raise_missing
from datapunk_recovery._core.validate import shown

from .exporter import Exporter
from .fields import event_fields
from .labels import Labeler, LabelPolicy
from .metrics import (
    ATTEMPT_DURATION,
    MEASURES,
    METRICS,
    Measure,
    Metric,
    MetricKind,
    Router,
)
from .pull import PULLED, Puller

PENDING_MAX: Final = 65_536
"""Attempt durations an exporter keeps between collections before recording them at once."""

__all__ = ["HISTOGRAM_KINDS", "PENDING_MAX", "SPAN_EVENTS", "OpenTelemetryExporter"]

HISTOGRAM_KINDS: Final = ("buckets", "synchronous")
"""The ways the attempt-duration histogram can be exported (``attempt_histogram=``)."""

_ATTEMPT: Final = "retry.attempt"

SPAN_EVENTS: Final[frozenset[str]] = frozenset(
    {
        "retry.scheduled",
        "retry.gave_up",
        "breaker.rejected",
        "network.failover",
        "network.fallthrough",
        "recovery.fallback",
        "fallback.used",
        "hedge.won",
        "cache.stale_served",
    }
)
"""Event names added as events to the current span."""

Attributes = Mapping[str, str]


class OpenTelemetryExporter(Exporter):
    """Exports events to OpenTelemetry metrics and span events.

    ``meter_provider`` defaults to the global one; ``labels`` bounds attribute
    cardinality like Prometheus labels; ``span_events`` lists the event names
    that become span events (empty to add none).  ``attempt_histogram`` is
    ``"buckets"`` (the default: the engine's buckets as observable counters
    ``….attempt.duration.bucket``/``.count``/``.sum``, no ``record`` per
    attempt) or ``"synchronous"`` (a real SDK histogram, each duration
    recorded at collection: views apply, microseconds per attempt; see the
    module's notes).
    """

    def __init__(
        self,
        *,
        meter_provider: Any = None,
        labels: LabelPolicy | None = None,
        span_events: Collection[str] = SPAN_EVENTS,
        metrics: Sequence[Metric] = METRICS,
        measures: Mapping[str, Sequence[Measure]] = MEASURES,
        attempt_histogram: str = "buckets",
    ) -> None:
        super().__init__()
        if attempt_histogram not in HISTOGRAM_KINDS:
            raise ValueError(
                f"OpenTelemetryExporter attempt_histogram: expected one of {HISTOGRAM_KINDS}, "
                f"got {shown(attempt_histogram)}"
            )
        try:
            from opentelemetry import metrics as otel_metrics
            from opentelemetry import trace
        except ImportError as exc:
            raise_missing(exc, "OpenTelemetryExporter", "opentelemetry-api", extra="otel")
        self._trace = trace
        self._observation = otel_metrics.Observation
        provider = meter_provider if meter_provider is not None else otel_metrics
        meter = provider.get_meter("datapunk_recovery", __version__)
        self.labeler = Labeler(labels)
        # The counters pulled from the engine's statistics (the histogram: see below).
        pulled = {
            name: metric
            for name, metric in PULLED.items()
            if metric.kind is MetricKind.COUNTER
            and metric in metrics
            and measures.get(name) == MEASURES.get(name)
        }
        # The histogram is fed at collection, which the pulled counters' callbacks
        # trigger; or, as buckets, read at collection like them.
        histogram_pulled = bool(
            pulled
            and ATTEMPT_DURATION in metrics
            and measures.get(_ATTEMPT) == MEASURES.get(_ATTEMPT)
        )
        self._buckets = histogram_pulled and attempt_histogram == "buckets"
        self._tapped = histogram_pulled and not self._buckets
        if histogram_pulled:
            pulled[_ATTEMPT] = ATTEMPT_DURATION
        pushed = {name: m for name, m in measures.items() if name not in pulled}
        self._router = Router(self.labeler, pushed)
        self._puller = Puller(self.labeler, time_attempts=histogram_pulled)
        self._pending: list[tuple[str, list[float]]] = []
        self._pending_count = 0
        self._pending_lock = threading.Lock()
        self._span_events = frozenset(span_events)
        self._wanted = frozenset(pushed) | self._span_events
        # synchronous instruments: metric -> its add / record method
        self._record: dict[Metric, Any] = {}
        # observable gauges: metric -> label values -> last value
        self._last: dict[Metric, dict[tuple[str, ...], float]] = {}
        # state gauges: metric -> owner label values -> current state
        self._states: dict[Metric, dict[tuple[str, ...], str]] = {}
        self._attributes: dict[tuple[Metric, tuple[str, ...]], Attributes] = {}
        for metric in metrics:
            common = {"name": metric.otel_name, "unit": metric.otel_unit}
            doc = metric.description
            if metric in pulled.values() and metric.kind is MetricKind.COUNTER:
                meter.create_observable_counter(
                    **common, description=doc, callbacks=[self._pulled_reader(metric)]
                )
            elif metric is ATTEMPT_DURATION and self._buckets:
                self._bucket_counters(meter, metric)
            elif metric.kind is MetricKind.COUNTER:
                self._record[metric] = meter.create_counter(**common, description=doc).add
            elif metric.kind is MetricKind.HISTOGRAM:
                self._record[metric] = meter.create_histogram(**common, description=doc).record
            elif metric.kind is MetricKind.GAUGE:
                last = self._last[metric] = {}
                meter.create_observable_gauge(
                    **common, description=doc, callbacks=[self._gauge_reader(metric, last)]
                )
            else:
                states = self._states[metric] = {}
                meter.create_observable_gauge(
                    **common, description=doc, callbacks=[self._state_reader(metric, states)]
                )

    def wants(self, name: str) -> bool:
        """Whether events named ``name`` update a metric or a span (the rest is pulled)."""
        return name in self._wanted

    def install(self, *buses: EventBus) -> Self:
        """Subscribe to ``buses`` (or globally) and start counting what the engine counts there."""
        super().install(*buses)
        self._puller.start(buses or (global_bus,))
        if self._tapped:
            _stats.add_tap(self._tap)
        return self

    def close(self) -> None:
        """Stop exporting: the pulled numbers stay as they are now."""
        self._puller.stop()
        if self._tapped:
            _stats.remove_tap(self._tap)
            self._record_pending()
        super().close()

    def _tap(self, stats: _stats.OperationStats, durations: list[float]) -> None:
        if not self._puller.covers(stats.bus):
            return
        with self._pending_lock:
            self._pending.append((stats.name, durations))
            self._pending_count += len(durations)
            full = self._pending_count > PENDING_MAX
        if full:
            self._record_pending()

    def _record_pending(self) -> None:
        """Record the attempt durations received since the last time into the histogram."""
        with self._pending_lock:
            pending, self._pending, self._pending_count = self._pending, [], 0
        record = self._record[ATTEMPT_DURATION]
        for name, durations in pending:
            attributes = self._attributes_of(ATTEMPT_DURATION, (self._puller.operation(name),))
            for seconds in durations:
                record(seconds, attributes)

    def __call__(self, event: Event) -> None:
        self._router.handler(type(event), self._recorder)(event)
        if event.name in self._span_events:
            span = self._trace.get_current_span()
            if span.is_recording():
                fields = event_fields(event)
                del fields["event"]
                span.add_event("datapunk.recovery." + event.name, fields)

    def _recorder(self, metric: Metric, labels: tuple[str, ...]) -> Callable[[float], None]:
        """The function that applies a number to ``metric`` at ``labels``."""
        if metric.kind is MetricKind.GAUGE:
            last = self._last[metric]
            return lambda value: last.__setitem__(labels, value)
        if metric.kind is MetricKind.STATE:
            states = self._states[metric]
            owner, state = labels[:-1], labels[-1]
            return lambda _: states.__setitem__(owner, state)
        record, attributes = self._record[metric], self._attributes_of(metric, labels)
        return lambda value: record(value, attributes)

    def _attributes_of(self, metric: Metric, labels: tuple[str, ...]) -> Attributes:
        key = (metric, labels)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = self._attributes[key] = dict(zip(metric.labels, labels, strict=True))
        return attributes

    def _pulled_reader(self, metric: Metric) -> Any:
        def read(options: Any) -> Iterable[Any]:
            counts = self._puller.counters(self._puller.read()).get(metric, {})
            if self._tapped:
                self._record_pending()  # read() folded the durations: before the SDK reads
            for labels, value in counts.items():
                yield self._observation(value, self._attributes_of(metric, labels))

        return read

    def _bucket_counters(self, meter: Any, metric: Metric) -> None:
        """The histogram as observable counters of the engine's buckets, count and sum."""
        les = [*(f"{bound:g}" for bound in _stats.DURATION_BOUNDS), "+Inf"]
        doc = metric.description

        def histograms() -> dict[tuple[str, ...], tuple[list[int], float]]:
            return self._puller.histograms(self._puller.read())

        def buckets(options: Any) -> Iterable[Any]:
            for labels, (counts, _) in histograms().items():
                attributes = dict(zip(metric.labels, labels, strict=True))
                cumulative = 0
                for le, count in zip(les, counts, strict=True):
                    cumulative += count
                    yield self._observation(cumulative, {**attributes, "le": le})

        def count(options: Any) -> Iterable[Any]:
            for labels, (counts, _) in histograms().items():
                yield self._observation(sum(counts), self._attributes_of(metric, labels))

        def total(options: Any) -> Iterable[Any]:
            for labels, (_, seconds) in histograms().items():
                yield self._observation(seconds, self._attributes_of(metric, labels))

        name = metric.otel_name
        meter.create_observable_counter(
            name + ".bucket",
            unit="1",
            description=doc + " Cumulative, by upper bound (le).",
            callbacks=[buckets],
        )
        meter.create_observable_counter(
            name + ".count", unit="1", description=doc + " Count.", callbacks=[count]
        )
        meter.create_observable_counter(
            name + ".sum", unit="s", description=doc + " Sum.", callbacks=[total]
        )

    def _gauge_reader(self, metric: Metric, last: dict[tuple[str, ...], float]) -> Any:
        def read(options: Any) -> Iterable[Any]:
            # list() copies in one step: events may add label sets meanwhile.
            for labels, value in list(last.items()):
                yield self._observation(value, self._attributes_of(metric, labels))

        return read

    def _state_reader(self, metric: Metric, states: dict[tuple[str, ...], str]) -> Any:
        def read(options: Any) -> Iterable[Any]:
            for owner, current in list(states.items()):
                known = metric.states if current in metric.states else (*metric.states, current)
                for state in known:
                    labels = (*owner, state)
                    value = 1.0 if state == current else 0.0
                    yield self._observation(value, self._attributes_of(metric, labels))

        return read
