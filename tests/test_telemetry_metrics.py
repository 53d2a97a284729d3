"""The measurement table: instruments named once, events mapped to them declaratively."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable

import pytest

from datapunk_recovery._core import events
from datapunk_recovery._core.errors import ErrorCategory
from datapunk_recovery._core.events import CallFinished, Event, RetryScheduled
from datapunk_recovery.breaker import BreakerState
from datapunk_recovery.flow.bulkhead import BulkheadRejected
from datapunk_recovery.telemetry.labels import Labeler
from datapunk_recovery.telemetry.levels import LEVELS
from datapunk_recovery.telemetry.metrics import (
    MEASURES,
    METRICS,
    Measure,
    Metric,
    MetricKind,
    Router,
    Update,
)
from datapunk_recovery.telemetry.otel import SPAN_EVENTS

REQUIRED_PROMETHEUS_NAMES = {
    "datapunk_recovery_calls": ("operation", "outcome"),
    "datapunk_recovery_retries": ("operation", "category"),
    "datapunk_recovery_giveups": ("operation", "reason"),
    "datapunk_recovery_attempt_duration_seconds": ("operation",),
    "datapunk_recovery_breaker_state": ("breaker", "state"),
    "datapunk_recovery_breaker_rejections": ("breaker",),
    "datapunk_recovery_breaker_outcomes_folded": ("breaker",),
    "datapunk_recovery_breaker_writes_shed": ("breaker", "kind"),
    "datapunk_recovery_budget_refusals": ("budget",),
    "datapunk_recovery_bulkhead_in_use": ("bulkhead",),
    "datapunk_recovery_bulkhead_rejections": ("bulkhead",),
    "datapunk_recovery_ratelimit_rejections": ("operation",),
    "datapunk_recovery_fallbacks": ("operation", "kind"),
    "datapunk_recovery_resource_in_use": ("kind",),
    "datapunk_recovery_resource_wait_seconds": ("kind",),
    "datapunk_recovery_resource_acquisitions": ("kind", "outcome"),
    "datapunk_recovery_resource_leaks": ("kind",),
    "datapunk_recovery_cache_warmed": ("cache",),
}


def test_every_required_metric_is_declared_with_its_labels() -> None:
    assert {m.prometheus_name: m.labels for m in METRICS} == REQUIRED_PROMETHEUS_NAMES


def test_names_follow_each_backend_convention() -> None:
    duration = next(m for m in METRICS if m.name == "attempt.duration")
    assert duration.prometheus_name == "datapunk_recovery_attempt_duration_seconds"
    assert duration.otel_name == "datapunk.recovery.attempt.duration"
    assert duration.otel_unit == "s"


def test_breaker_states_are_the_breakers() -> None:
    state = next(m for m in METRICS if m.name == "breaker.state")
    assert set(state.states) == {s.value for s in BreakerState}


EVENT_MODULES = [
    "adaptive",
    "breaker",
    "budget",
    "cache.recovering",
    "bulkhead",
    "chaos",
    "database.pool",
    "database.transaction",
    "deadline",
    "fallback",
    "hedging",
    "network.router",
    "pipeline",
    "ratelimit",
    "resource.batch",
    "resource.cleanup",
    "resource.inference",
    "resource.pool",
    "resource.tracking",
    "strategies",
    "timeout",
]


def event_classes() -> dict[str, type[Event]]:
    """Every event class the library defines, by event name."""
    for module in EVENT_MODULES:
        importlib.import_module(f"datapunk_recovery.{module}")
    found: dict[str, type[Event]] = {}
    pending: list[type[Event]] = [Event]
    while pending:
        klass = pending.pop()
        pending.extend(klass.__subclasses__())
        if klass.__module__.startswith("datapunk_recovery.") and klass is not Event:
            found[klass.name] = klass
    return found


def attributes_of(klass: type[Event]) -> set[str]:
    return set(klass._fields) | {
        n for n in dir(klass) if isinstance(getattr(klass, n, None), property)
    }


def test_every_measure_reads_attributes_its_event_has() -> None:
    classes = event_classes()
    for name, measures in MEASURES.items():
        assert name in classes, f"no event class is named {name!r}"
        attributes = attributes_of(classes[name])
        for measure in measures:
            wanted = {*measure.labels.values(), measure.value, measure.when} - {None}
            assert wanted <= attributes, f"{name}: {wanted - attributes} missing"


def test_every_level_and_span_event_names_a_real_event() -> None:
    classes = event_classes()
    for name, level in LEVELS.items():
        assert name in classes, f"LEVELS names no event: {name!r}"
        if level.field is not None:
            assert level.field in attributes_of(classes[name])
    assert set(classes) >= SPAN_EVENTS


def test_every_event_of_the_library_has_a_level() -> None:
    # A new event kind should be given a level on purpose (DEBUG is the default).
    missing = set(event_classes()) - set(LEVELS)
    assert missing <= {"event"}, f"no level for {sorted(missing)}"


def test_an_event_becomes_updates() -> None:
    router = Router(Labeler())
    call = CallFinished(operation="fetch", at=0.0, attempts=2, elapsed=0.3, succeeded=True)
    (update,) = router.updates(call)
    assert update.metric.name == "calls"
    assert update.labels == ("fetch", "success_after_retry")
    assert update.value == 1.0
    assert update.attributes == {"operation": "fetch", "outcome": "success_after_retry"}


def test_a_new_event_kind_plugs_in_with_one_entry() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class Shed(Event):
        name: typing.ClassVar[str] = "loadshed.shed"
        area: typing.ClassVar[str] = "loadshed"
        requests: int

    shed = Metric("loadshed.shed", MetricKind.COUNTER, ("operation",), "Requests shed.")
    router = Router(
        Labeler(),
        {**MEASURES, Shed.name: (Measure(shed, {"operation": "operation"}, value="requests"),)},
    )
    assert router.updates(Shed(operation="api", at=0.0, requests=7)) == [
        Update(shed, ("api",), 7.0)
    ]


def test_fixed_labels_and_unmeasured_events() -> None:
    fallbacks = next(m for m in METRICS if m.name == "fallbacks")
    measure = Measure(fallbacks, {"operation": "operation"}, fixed={"kind": "stale"})
    router = Router(Labeler(), {RetryScheduled.name: (measure,)})
    event = RetryScheduled(
        operation="get", at=0.0, retry=1, delay=0.1, from_server=False,
        category=ErrorCategory.NETWORK, error_type="E",
    )  # fmt: skip
    assert router.updates(event)[0].labels == ("get", "stale")
    assert router.updates(events.HintIgnored(operation="x", at=0.0, value="v", reason="r")) == []


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Metric("Bad Name", MetricKind.COUNTER, (), "d"), "dotted"),
        (lambda: Metric("x", MetricKind.COUNTER, ("user_id",), "d"), "not label names"),
        (lambda: Metric("x", MetricKind.COUNTER, (), "d", unit="ms"), "unit"),
        (lambda: Metric("x", MetricKind.STATE, ("breaker",), "d"), "state metric"),
        (lambda: Metric("x", MetricKind.GAUGE, ("state",), "d", states=("a",)), "state metric"),
        (lambda: Measure(METRICS[0], {"operation": "operation"}), "exactly"),
        (lambda: Measure(METRICS[3], {"operation": "operation"}), "needs an attribute"),
    ],
)
def test_the_tables_are_validated(build: typing.Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_a_router_compiles_one_handler_per_event_class() -> None:
    router = Router(Labeler())
    recorded: list[tuple[str, tuple[str, ...], float]] = []

    def recorder(metric: Metric, labels: tuple[str, ...]) -> Callable[[float], None]:
        return lambda value: recorded.append((metric.name, labels, value))

    handler = router.handler(BulkheadRejected, recorder)
    assert router.handler(BulkheadRejected, recorder) is handler
    handler(BulkheadRejected(operation="db", at=0.0, reason="full", active=4, queued=0))
    handler(BulkheadRejected(operation="db", at=1.0, reason="full", active=4, queued=0))
    router.handler(CallFinished, recorder)(
        CallFinished(operation="op", at=0.0, attempts=2, elapsed=0.1, succeeded=True)
    )
    assert recorded == [
        ("bulkhead.rejections", ("db",), 1.0),
        ("bulkhead.rejections", ("db",), 1.0),
        ("calls", ("op", "success_after_retry"), 1.0),
    ]


def _doc_rows(first_cell: str) -> list[list[str]]:
    """The rows of docs/observability.md's tables whose first cell starts with ``first_cell``."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "observability.md").read_text()
    rows = []
    for line in text.splitlines():
        if line.startswith(f"| `{first_cell}"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_metric_table_of_the_docs_is_the_declared_metrics() -> None:
    documented = {}
    for prometheus, otel, kind, labels, _ in _doc_rows("datapunk_recovery_"):
        documented[prometheus.strip("`").removesuffix("_total")] = (
            otel.split()[0].strip("`"),
            "s" if otel.endswith("(s)") else "1",
            kind,
            tuple(label.strip() for label in labels.split(",")),
            prometheus.endswith("_total`"),
        )
    declared = {
        m.prometheus_name: (
            m.otel_name,
            m.otel_unit,
            "gauge" if m.kind is MetricKind.STATE else m.kind.value,
            m.labels,
            m.kind is MetricKind.COUNTER,
        )
        for m in METRICS
    }
    assert documented == declared


def test_the_measure_table_of_the_docs_is_the_declared_measures() -> None:
    documented = set()
    for row in _doc_rows(""):
        if len(row) != 5 or row[0].startswith("`datapunk"):
            continue  # another table, or the metric table
        event, metric, labels, number, when = row
        pairs = []
        for part in labels.split(", "):
            label, _, source = part.replace("=", "←").partition("←")
            fixed = source.startswith("`")
            pairs.append((label, source.strip("`"), fixed))
        documented.add(
            (
                event.strip("`"),
                metric,
                tuple(sorted(pairs)),
                number,
                when.split("`")[1] if when else "",
            )
        )
    declared = set()
    for event, measures in MEASURES.items():
        for m in measures:
            pairs = [(label, attr, False) for label, attr in m.labels.items()]
            pairs += [(label, value, True) for label, value in m.fixed.items()]
            number = "(state)" if m.metric.kind is MetricKind.STATE else (m.value or "1")
            documented_when = m.when or ""
            declared.add((event, m.metric.name, tuple(sorted(pairs)), number, documented_when))
    assert documented == declared
