"""Prometheus exporter (``prometheus_client``): the measurement table as Prometheus metrics.

::

    from prometheus_client import CollectorRegistry
    from datapunk_recovery.telemetry.prometheus import PrometheusExporter

    registry = CollectorRegistry()
    PrometheusExporter(registry).install()

creates every metric of [`METRICS`][datapunk_recovery.telemetry.metrics.METRICS]
on the registry at once (``datapunk_recovery_calls_total{operation,outcome}``,
``datapunk_recovery_attempt_duration_seconds{operation}``, ...).
``prometheus_client`` is imported when an exporter is built, never by the
rest of the library.

What the retry engine counts anyway (calls by outcome, retries by category,
give-ups by reason, attempt durations) is *pulled*: a custom collector reads
the engine's statistics at scrape time ([`pull`][datapunk_recovery.telemetry.pull]),
so a call costs the exporter nothing but the timing of its attempts.  The
rest (breaker states, rejections, fallbacks, ...) is rare and updated from
events as [`MEASURES`][datapunk_recovery.telemetry.metrics.MEASURES] says; the
exporter subscribes to those kinds only.  Histogram ``buckets`` that are not
all among [`DURATION_BOUNDS`][datapunk_recovery._core.stats.DURATION_BOUNDS] cannot be read
from the engine: the attempt durations are then recorded from events.

Each label combination's child is looked up once and kept with the compiled
measure ([`Compiled`][datapunk_recovery.telemetry.metrics.Compiled]), so an event
already seen costs a dictionary read and the child's own update.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Self

from datapunk_recovery._core.events import Event, EventBus, global_bus
from datapunk_recovery._core.extras import raise_missing
from datapunk_recovery._core.stats import DURATION_BOUNDS

from .exporter import Exporter
from .labels import Labeler, LabelPolicy
from .metrics import ATTEMPT_DURATION, MEASURES, METRICS, Measure, Metric, MetricKind, Router
from .pull import PULLED, Puller, served_bounds

__all__ = ["DEFAULT_BUCKETS", "PrometheusExporter"]

DEFAULT_BUCKETS: Final = DURATION_BOUNDS
"""Histogram bucket bounds in seconds: a millisecond call up to a minute-long wait."""


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise_missing(exc, "PrometheusExporter", "prometheus_client", extra="prometheus")
    return prometheus_client


class PrometheusExporter(Exporter):
    """Exports events to ``prometheus_client`` metrics on ``registry``.

    ``registry`` defaults to ``prometheus_client.REGISTRY``; one exporter per
    registry (a second would register the same names again).  ``labels``
    bounds label cardinality; ``buckets`` are the histograms' bounds in
    seconds.  ``metrics`` and ``measures`` default to the library's tables.
    """

    def __init__(
        self,
        registry: Any = None,
        *,
        labels: LabelPolicy | None = None,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        metrics: Sequence[Metric] = METRICS,
        measures: Mapping[str, Sequence[Measure]] = MEASURES,
    ) -> None:
        super().__init__()
        client = _client()
        if registry is None:
            registry = client.REGISTRY
        self.labeler = Labeler(labels)
        served = served_bounds(buckets)
        # The events whose metric is pulled from the engine's statistics.
        pulled = {
            name: metric
            for name, metric in PULLED.items()
            if metric in metrics
            and measures.get(name) == MEASURES.get(name)
            and (metric is not ATTEMPT_DURATION or served is not None)
        }
        pulled_metrics = set(pulled.values())
        # An event whose metric is pulled may still feed one that is not: a
        # first-try success's CallFinished is its attempt's duration when the
        # buckets are our own (then the engine builds that one event, not an
        # AttemptFinished too for us while others take the CallFinished).
        pushed = {
            name: tuple(m for m in entries if name not in pulled or m.metric not in pulled_metrics)
            for name, entries in measures.items()
        }
        pushed = {name: entries for name, entries in pushed.items() if entries}
        self._pushed = frozenset(pushed)
        self._router = Router(self.labeler, pushed)
        self._puller = Puller(self.labeler, time_attempts=ATTEMPT_DURATION in pulled_metrics)
        self._instruments: dict[Metric, Any] = {}
        if pulled_metrics:
            registry.register(
                _Collector(client, self._puller, pulled_metrics, served or (), time.time())
            )
        for metric in metrics:
            if metric in pulled_metrics:
                continue
            common = {"labelnames": metric.labels, "registry": registry}
            name, doc = metric.prometheus_name, metric.description
            if metric.kind is MetricKind.COUNTER:
                instrument = client.Counter(name, doc, **common)
            elif metric.kind is MetricKind.HISTOGRAM:
                instrument = client.Histogram(name, doc, buckets=tuple(buckets), **common)
            else:
                instrument = client.Gauge(name, doc, **common)
            self._instruments[metric] = instrument
        # (state metric, owner labels) -> the state last set to 1
        self._states: dict[tuple[Metric, tuple[str, ...]], str] = {}
        self._lock = threading.Lock()

    def wants(self, name: str) -> bool:
        """Whether events named ``name`` update a metric of this exporter (the rest is pulled)."""
        return name in self._pushed

    def install(self, *buses: EventBus) -> Self:
        """Subscribe to ``buses`` (or globally) and start counting what the engine counts there."""
        super().install(*buses)
        self._puller.start(buses or (global_bus,))
        return self

    def close(self) -> None:
        """Stop exporting: the pulled numbers stay as they are now."""
        self._puller.stop()
        super().close()

    def __call__(self, event: Event) -> None:
        self._router.handler(type(event), self._recorder)(event)

    def _recorder(self, metric: Metric, labels: tuple[str, ...]) -> Callable[[float], None]:
        """The function that applies a number to ``metric`` at ``labels``."""
        if metric.kind is MetricKind.STATE:
            return lambda _: self._set_state(metric, labels)
        child = self._instruments[metric].labels(*labels)
        if metric.kind is MetricKind.COUNTER:
            return child.inc  # type: ignore[no-any-return]
        if metric.kind is MetricKind.HISTOGRAM:
            return child.observe  # type: ignore[no-any-return]
        return child.set  # type: ignore[no-any-return]

    def _set_state(self, metric: Metric, labels: tuple[str, ...]) -> None:
        # One state at 1 per owner: the first report writes every declared
        # state, later ones move the 1 from the previous state to the new one.
        owner, current = labels[:-1], labels[-1]
        gauge = self._instruments[metric]
        key = (metric, owner)
        with self._lock:
            previous = self._states.get(key)
            if previous is None:
                for state in metric.states:
                    gauge.labels(*owner, state).set(0.0)
            elif previous != current:
                gauge.labels(*owner, previous).set(0.0)
            gauge.labels(*owner, current).set(1.0)
            self._states[key] = current


class _Collector:
    """The pulled metrics, read from the engine's statistics at each scrape."""

    def __init__(
        self,
        client: Any,
        puller: Puller,
        metrics: set[Metric],
        bounds: Sequence[int],
        created: float,
    ) -> None:
        import prometheus_client.core
        import prometheus_client.utils

        self._core = prometheus_client.core
        self._puller = puller
        self._metrics = [m for m in METRICS if m in metrics]
        self._bounds = tuple(bounds)
        self._created = created
        go: Callable[[float], str] = prometheus_client.utils.floatToGoString
        self._le = [go(DURATION_BOUNDS[i]) for i in self._bounds]

    def describe(self) -> Iterator[Any]:
        """The families, empty: lets the registry refuse a second exporter."""
        return self._families(None)

    def collect(self) -> Iterator[Any]:
        """The families with the numbers counted while the exporter was installed."""
        return self._families(self._puller.read())

    def _families(self, readings: Any) -> Iterator[Any]:
        core = self._core
        counters = self._puller.counters(readings) if readings is not None else {}
        for metric in self._metrics:
            name, doc = metric.prometheus_name, metric.description
            if metric.kind is MetricKind.HISTOGRAM:
                family = core.HistogramMetricFamily(name, doc, labels=metric.labels)
                if readings is not None:
                    for labels, (counts, total) in self._puller.histograms(readings).items():
                        cumulative = [sum(counts[: i + 1]) for i in self._bounds]
                        buckets = [*zip(self._le, cumulative, strict=True), ("+Inf", sum(counts))]
                        family.add_metric(labels, buckets, total)
            else:
                family = core.CounterMetricFamily(name, doc, labels=metric.labels)
                for labels, value in counters.get(metric, {}).items():
                    family.add_metric(labels, value, created=self._created)
            yield family
