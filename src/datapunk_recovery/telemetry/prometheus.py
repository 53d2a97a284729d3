"""Prometheus exporter (``prometheus_client``): the measurement table as Prometheus metrics.

::

    from prometheus_client import CollectorRegistry
    from datapunk_recovery.telemetry.prometheus import PrometheusExporter

    registry = CollectorRegistry()
    PrometheusExporter(registry).install()

creates every metric of [`METRICS`][datapunk_recovery.telemetry.metrics.METRICS]
on the registry at once (``datapunk_recovery_calls_total{operation,outcome}``,
``datapunk_recovery_attempt_duration_seconds{operation}``, ...) and updates
them from events as [`MEASURES`][datapunk_recovery.telemetry.metrics.MEASURES]
says.  ``prometheus_client`` is imported when an exporter is built, never
by the rest of the library.

Each label combination's child is looked up once and kept with the compiled
measure ([`Compiled`][datapunk_recovery.telemetry.metrics.Compiled]), so an event
already seen costs a dictionary read and the child's own update.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from datapunk_recovery._extras import raise_missing
from datapunk_recovery.events import Event

from .exporter import Exporter
from .labels import Labeler, LabelPolicy
from .metrics import MEASURES, METRICS, Measure, Metric, MetricKind, Router

__all__ = ["DEFAULT_BUCKETS", "PrometheusExporter"]

DEFAULT_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
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
        self._router = Router(self.labeler, measures)
        self._instruments: dict[Metric, Any] = {}
        for metric in metrics:
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

    def __call__(self, event: Event) -> None:
        self._router.apply(event, self._recorder)

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
