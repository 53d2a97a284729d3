"""Observability: the library's events exported to logs, metrics and traces.

Exporters are event subscribers
([`datapunk_recovery._core.events`][datapunk_recovery._core.events]), nothing
more: when none is installed, no event is even built.  Each adapts one
system and imports that system's library only when it is built:

- [`LoggingExporter`][datapunk_recovery.telemetry.logging.LoggingExporter] (stdlib ``logging``), and
  [`StructlogExporter`][datapunk_recovery.telemetry.structlog.StructlogExporter];
- [`PrometheusExporter`][datapunk_recovery.telemetry.prometheus.PrometheusExporter]
  (``prometheus_client``);
- [`OpenTelemetryExporter`][datapunk_recovery.telemetry.otel.OpenTelemetryExporter]
  (``opentelemetry-api``): metrics and span events;
- [`CallbackExporter`][datapunk_recovery.telemetry.callback.CallbackExporter] for anything else, and
  [`StatisticsCollector`][datapunk_recovery.telemetry.statistics.StatisticsCollector] for snapshots
  with no metrics system at all.

What each event measures is declared once, in
[`datapunk_recovery.telemetry.metrics`][datapunk_recovery.telemetry.metrics]; label values are
bounded by a
[`LabelPolicy`][datapunk_recovery.telemetry.labels.LabelPolicy]; everything that leaves is redacted.
"""

from .callback import CallbackExporter
from .exporter import Exporter
from .fields import FieldValue, event_fields, safe_text
from .labels import LABEL_NAMES, Labeler, LabelPolicy
from .levels import LEVELS, Level
from .logging import LoggingExporter
from .metrics import MEASURES, METRICS, Measure, Metric, MetricKind, Router, Update
from .otel import SPAN_EVENTS, OpenTelemetryExporter
from .prometheus import PrometheusExporter
from .statistics import OperationSnapshot, StatisticsCollector
from .structlog import StructlogExporter

__all__ = [
    "LABEL_NAMES",
    "LEVELS",
    "MEASURES",
    "METRICS",
    "SPAN_EVENTS",
    "CallbackExporter",
    "Exporter",
    "FieldValue",
    "LabelPolicy",
    "Labeler",
    "Level",
    "LoggingExporter",
    "Measure",
    "Metric",
    "MetricKind",
    "OpenTelemetryExporter",
    "OperationSnapshot",
    "PrometheusExporter",
    "Router",
    "StatisticsCollector",
    "StructlogExporter",
    "Update",
    "event_fields",
    "safe_text",
]
