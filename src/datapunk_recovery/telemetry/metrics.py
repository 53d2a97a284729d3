"""The measurements, declared once: which event updates which metric, and how.

Every metrics exporter (Prometheus, OpenTelemetry, a callback) reads the same
two tables:

- [`METRICS`][datapunk_recovery.telemetry.metrics.METRICS], the instruments: a
  [`Metric`][datapunk_recovery.telemetry.metrics.Metric] has a dotted name
  (``"attempt.duration"``), a kind, its label names and a unit.  Prometheus
  names it ``datapunk_recovery_attempt_duration_seconds``, OpenTelemetry
  ``datapunk.recovery.attempt.duration``.
- [`MEASURES`][datapunk_recovery.telemetry.metrics.MEASURES], keyed by an event's ``name``: what
  each event kind does to
  the instruments, as [`Measure`][datapunk_recovery.telemetry.metrics.Measure] entries naming the
  event attributes
  that give the label values and the number.

A new event kind plugs in with one entry in
[`MEASURES`][datapunk_recovery.telemetry.metrics.MEASURES] (and, for a new
instrument, one in [`METRICS`][datapunk_recovery.telemetry.metrics.METRICS]); no exporter changes.
A
[`Router`][datapunk_recovery.telemetry.metrics.Router] compiles the table for one exporter and turns
an event into
``(metric, label values, number)`` updates, label values bounded by the
exporter's [`Labeler`][datapunk_recovery.telemetry.labels.Labeler].
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Final, cast

from datapunk_recovery._core.events import Event
from datapunk_recovery._core.validate import check_choice, check_mapping, shown

from .labels import LABEL_NAMES, Labeler

__all__ = [
    "MEASURES",
    "METRICS",
    "Measure",
    "Metric",
    "MetricKind",
    "Compiled",
    "Router",
    "Update",
]


class MetricKind(StrEnum):
    """What an update does to an instrument."""

    COUNTER = "counter"
    """Adds the number (1 unless the measure names an attribute)."""
    HISTOGRAM = "histogram"
    """Records the number as one observation (a duration in seconds)."""
    GAUGE = "gauge"
    """Sets the number (something in use now)."""
    STATE = "state"
    """1 for the current value of the last label (``state``), 0 for the metric's other states."""


_NAME: Final = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*\Z")


@dataclass(frozen=True, slots=True, eq=False)
class Metric:
    """One instrument, named for every backend from one dotted ``name``.

    Compared by identity: each instrument is defined once, and exporters key
    their caches on it, so hashing must cost nothing.

    ``unit`` is ``"seconds"`` for durations (Prometheus appends ``_seconds``,
    OpenTelemetry says ``s``) or empty for counts.  A ``STATE`` metric lists
    its ``states`` and has ``state`` as its last label.
    """

    name: str
    kind: MetricKind
    labels: tuple[str, ...]
    description: str
    unit: str = ""
    states: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        owner = f"Metric({self.name!r})"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"Metric.name: expected a dotted lower-case name, got {shown(self.name)}"
            )
        object.__setattr__(self, "kind", check_choice("Metric", "kind", self.kind, MetricKind))
        unknown = [label for label in self.labels if label not in LABEL_NAMES]
        if unknown:
            raise ValueError(f"{owner}.labels: {shown(unknown)} are not label names of the library")
        if self.unit not in ("", "seconds"):
            raise ValueError(f"{owner}.unit: expected '' or 'seconds', got {shown(self.unit)}")
        is_state = self.kind is MetricKind.STATE
        if is_state != bool(self.states) or (is_state and self.labels[-1:] != ("state",)):
            raise ValueError(
                f"{owner}: a state metric, and only one, lists its states and ends with 'state'"
            )

    @property
    def prometheus_name(self) -> str:
        """``datapunk_recovery_<name with underscores>[_seconds]`` (counters get ``_total``)."""
        suffix = "_seconds" if self.unit == "seconds" else ""
        return "datapunk_recovery_" + self.name.replace(".", "_") + suffix

    @property
    def otel_name(self) -> str:
        """``datapunk.recovery.<name>``."""
        return "datapunk.recovery." + self.name

    @property
    def otel_unit(self) -> str:
        """The UCUM unit OpenTelemetry expects: ``s`` or ``1``."""
        return "s" if self.unit == "seconds" else "1"


@dataclass(frozen=True, slots=True)
class Measure:
    """What one event kind does to one metric.

    ``labels`` maps each label of the metric to the event attribute holding
    its value (a field or a property); ``fixed`` gives the other labels a
    constant value; ``value`` names the attribute holding the number (``None``
    adds 1 to a counter; a state metric takes its number from the state label);
    ``when`` names an attribute that must be true for the measure to apply
    (a hedge that won counts as a fallback only when it was not the original).
    """

    metric: Metric
    labels: Mapping[str, str]
    value: str | None = None
    fixed: Mapping[str, str] = field(default_factory=dict)
    when: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metric, Metric):
            raise TypeError(f"Measure.metric: expected a Metric, got {shown(self.metric)}")
        owner = f"Measure({self.metric.name})"
        labels = check_mapping(owner, "labels", self.labels)
        fixed = check_mapping(owner, "fixed", self.fixed)
        given = sorted([*labels, *fixed])
        if given != sorted(self.metric.labels):
            raise ValueError(
                f"{owner}: labels and fixed must give exactly {list(self.metric.labels)}, "
                f"got {shown(given)}"
            )
        if self.value is None and self.metric.kind in (MetricKind.HISTOGRAM, MetricKind.GAUGE):
            raise ValueError(f"{owner}.value: a {self.metric.kind.value} needs an attribute")
        object.__setattr__(self, "labels", MappingProxyType(labels))
        object.__setattr__(self, "fixed", MappingProxyType(fixed))


# ---------------------------------------------------------------------------
# The instruments.

CALLS: Final = Metric(
    "calls",
    MetricKind.COUNTER,
    ("operation", "outcome"),
    "Finished calls by outcome: success, success_after_retry, failure, failure_after_retry.",
)
RETRIES: Final = Metric(
    "retries",
    MetricKind.COUNTER,
    ("operation", "category"),
    "Retries scheduled, by error category.",
)
GIVEUPS: Final = Metric(
    "giveups", MetricKind.COUNTER, ("operation", "reason"), "Calls that gave up, by reason."
)
ATTEMPT_DURATION: Final = Metric(
    "attempt.duration",
    MetricKind.HISTOGRAM,
    ("operation",),
    "Duration of each attempt, successful or not.",
    unit="seconds",
)
BREAKER_STATE: Final = Metric(
    "breaker.state",
    MetricKind.STATE,
    ("breaker", "state"),
    "1 for the circuit breaker's current state, 0 for the others.",
    states=("closed", "open", "half_open", "disabled", "forced_open", "metrics_only"),
)
BREAKER_REJECTIONS: Final = Metric(
    "breaker.rejections", MetricKind.COUNTER, ("breaker",), "Calls an open breaker refused."
)
BREAKER_FOLDED: Final = Metric(
    "breaker.outcomes_folded",
    MetricKind.COUNTER,
    ("breaker",),
    "Outcomes a shared breaker folded (counts kept, their order lost) before sending them.",
)
BREAKER_SHED: Final = Metric(
    "breaker.writes_shed",
    MetricKind.COUNTER,
    ("breaker", "kind"),
    "Probe results, server delays and probe releases a shared breaker kept local (store busy).",
)
BUDGET_REFUSALS: Final = Metric(
    "budget.refusals", MetricKind.COUNTER, ("budget",), "Retries a retry budget refused."
)
BULKHEAD_IN_USE: Final = Metric(
    "bulkhead.in_use", MetricKind.GAUGE, ("bulkhead",), "Permits of the bulkhead held now."
)
BULKHEAD_REJECTIONS: Final = Metric(
    "bulkhead.rejections", MetricKind.COUNTER, ("bulkhead",), "Calls a full bulkhead refused."
)
FALLBACKS: Final = Metric(
    "fallbacks",
    MetricKind.COUNTER,
    ("operation", "kind"),
    "Answers that came from elsewhere: source, stale, failover, hedge, fallback value.",
)
RATELIMIT_REJECTIONS: Final = Metric(
    "ratelimit.rejections",
    MetricKind.COUNTER,
    ("operation",),
    "Calls a rate limiter refused (the wait for a token was longer than allowed).",
)
RESOURCE_IN_USE: Final = Metric(
    "resource.in_use", MetricKind.GAUGE, ("kind",), "Resources of a kind held now."
)
RESOURCE_WAIT: Final = Metric(
    "resource.wait",
    MetricKind.HISTOGRAM,
    ("kind",),
    "Time spent waiting to acquire a resource.",
    unit="seconds",
)
RESOURCE_ACQUISITIONS: Final = Metric(
    "resource.acquisitions",
    MetricKind.COUNTER,
    ("kind", "outcome"),
    "Requests for resources by outcome: acquired, timeout, rejected (line full), quota, "
    "deadline, failed.",
)
RESOURCE_LEAKS: Final = Metric(
    "resource.leaks", MetricKind.COUNTER, ("kind",), "Resources found unreleased and reclaimed."
)
CACHE_WARMED: Final = Metric(
    "cache.warmed", MetricKind.COUNTER, ("cache",), "Entries loaded into a cache ahead of need."
)

METRICS: Final[tuple[Metric, ...]] = (
    CALLS,
    RETRIES,
    GIVEUPS,
    ATTEMPT_DURATION,
    BREAKER_STATE,
    BREAKER_REJECTIONS,
    BREAKER_FOLDED,
    BREAKER_SHED,
    BUDGET_REFUSALS,
    BULKHEAD_IN_USE,
    BULKHEAD_REJECTIONS,
    RATELIMIT_REJECTIONS,
    FALLBACKS,
    RESOURCE_IN_USE,
    RESOURCE_WAIT,
    RESOURCE_ACQUISITIONS,
    RESOURCE_LEAKS,
    CACHE_WARMED,
)
"""Every instrument the exporters create, whether or not an event has touched it yet."""

# ---------------------------------------------------------------------------
# The events: event name -> what it measures.

_OP: Final = {"operation": "operation"}

MEASURES: Final[Mapping[str, tuple[Measure, ...]]] = MappingProxyType(
    {
        # A first-try success reports its one attempt in its CallFinished
        # alone (no AttemptFinished is built for a subscriber taking both).
        "retry.call": (
            Measure(CALLS, {**_OP, "outcome": "outcome"}),
            Measure(ATTEMPT_DURATION, _OP, value="elapsed", when="first_try"),
        ),
        "retry.scheduled": (Measure(RETRIES, {**_OP, "category": "category"}),),
        "retry.gave_up": (Measure(GIVEUPS, {**_OP, "reason": "reason"}),),
        "retry.attempt": (Measure(ATTEMPT_DURATION, _OP, value="duration"),),
        "breaker.state": (Measure(BREAKER_STATE, {"breaker": "operation", "state": "to_state"}),),
        "breaker.rejected": (Measure(BREAKER_REJECTIONS, {"breaker": "operation"}),),
        "breaker.outcomes_folded": (
            Measure(BREAKER_FOLDED, {"breaker": "operation"}, value="outcomes"),
        ),
        "breaker.write_shed": (Measure(BREAKER_SHED, {"breaker": "operation", "kind": "what"}),),
        "budget.refused": (Measure(BUDGET_REFUSALS, {"budget": "operation"}),),
        "bulkhead.rejected": (Measure(BULKHEAD_REJECTIONS, {"bulkhead": "operation"}),),
        "bulkhead.admitted": (Measure(BULKHEAD_IN_USE, {"bulkhead": "operation"}, value="active"),),
        "bulkhead.released": (Measure(BULKHEAD_IN_USE, {"bulkhead": "operation"}, value="active"),),
        "ratelimit.rejected": (Measure(RATELIMIT_REJECTIONS, _OP),),
        "fallback.used": (Measure(FALLBACKS, _OP, fixed={"kind": "fallback"}),),
        "hedge.won": (Measure(FALLBACKS, _OP, fixed={"kind": "hedge"}, when="attempt"),),
        "network.failover": (Measure(FALLBACKS, _OP, fixed={"kind": "failover"}),),
        "recovery.fallback": (Measure(FALLBACKS, {**_OP, "kind": "kind"}),),
        "resource.inference_fallback": (Measure(FALLBACKS, _OP, fixed={"kind": "model"}),),
        "resource.usage": (Measure(RESOURCE_IN_USE, {"kind": "kind"}, value="in_use"),),
        "resource.acquisition": (
            Measure(RESOURCE_WAIT, {"kind": "kind"}, value="waited"),
            Measure(RESOURCE_ACQUISITIONS, {"kind": "kind", "outcome": "outcome"}),
        ),
        "resource.leak": (Measure(RESOURCE_LEAKS, {"kind": "kind"}),),
        "cache.stale_served": (Measure(FALLBACKS, _OP, fixed={"kind": "stale"}),),
        "cache.warmed": (Measure(CACHE_WARMED, {"cache": "operation"}, value="stored"),),
    }
)
"""Event name -> its measures; an event kind absent here updates no metric."""


# ---------------------------------------------------------------------------
# Compiling the table for one exporter.


@dataclass(frozen=True, slots=True)
class Update:
    """One change an event makes: ``metric`` at ``labels`` (in the metric's order) by ``value``."""

    metric: Metric
    labels: tuple[str, ...]
    value: float

    @property
    def attributes(self) -> dict[str, str]:
        """The labels by name: ``{"operation": "fetch", "outcome": "success"}``."""
        return dict(zip(self.metric.labels, self.labels, strict=True))


_MEMO_MAX: Final = 1024
"""The most raw-value combinations one compiled measure remembers (see `Compiled`)."""


def _one(event: Event) -> float:
    return 1.0


class Compiled:
    """A [`Measure`][datapunk_recovery.telemetry.metrics.Measure] ready to run for one exporter.

    ``applies(event)`` checks the ``when`` condition (hot paths read ``when``
    itself: ``None`` means always); ``key(event)`` reads the event attributes
    behind the labels in one C call (an ``attrgetter``) and returns them raw;
    ``labels_for(key)`` turns them into bounded, redacted label values;
    ``number(event)`` reads the number.
    ``memo`` is for the exporter: what it derived from a key (a Prometheus
    child's method, OpenTelemetry attributes), so that an event already seen
    costs one dictionary read.
    [`remember()`][datapunk_recovery.telemetry.metrics.Compiled.remember] keeps the memo bounded.
    """

    __slots__ = ("_labeler", "_plan", "key", "memo", "metric", "number", "read", "when")

    def __init__(self, measure: Measure, labeler: Labeler) -> None:
        self.metric = measure.metric
        self._labeler = labeler
        read = [label for label in measure.metric.labels if label not in measure.fixed]
        fields = [measure.labels[label] for label in read]
        self.read = tuple(fields)  # the event attributes behind the labels
        getter = attrgetter(*fields) if fields else _no_fields
        # attrgetter of one field returns the value itself, of several a tuple
        self.key: Callable[[Event], object] = (
            getter if len(fields) != 1 else (lambda event: (getter(event),))
        )
        # per metric label: (label, index into the key) or (label, constant)
        self._plan = tuple(
            (label, measure.fixed[label]) if label in measure.fixed else (label, read.index(label))
            for label in measure.metric.labels
        )
        self.number: Callable[[Event], float] = (
            _one if measure.value is None else attrgetter(measure.value)
        )
        self.when: Callable[[Event], object] | None = (
            None if measure.when is None else attrgetter(measure.when)
        )
        self.memo: dict[object, Any] = {}

    def applies(self, event: Event) -> bool:
        """Whether ``event`` passes the measure's ``when`` condition."""
        return self.when is None or bool(self.when(event))

    def labels_for(self, key: object) -> tuple[str, ...]:
        """The label values, in the metric's order, for what `key` read."""
        labeler = self._labeler
        raw = cast(tuple[object, ...], key)
        return tuple(
            [
                where if isinstance(where, str) else labeler(label, raw[where])
                for label, where in self._plan
            ]
        )

    def labels(self, event: Event) -> tuple[str, ...]:
        """The label values for ``event``, in the metric's order, bounded and redacted."""
        return self.labels_for(self.key(event))

    def remember(self, key: object, derived: Any) -> Any:
        """Store ``derived`` for ``key`` in `memo` while there is room; returns it.

        Keys are raw values, which may be unbounded (every refused name is a
        new key): past the limit a key is resolved again on each use.
        """
        if len(self.memo) < _MEMO_MAX:
            self.memo[key] = derived
        return derived


def _no_fields(event: Event) -> tuple[()]:
    return ()


def _ignore(event: Event) -> None:
    return None


Recorder = Callable[[Metric, tuple[str, ...]], Callable[[float], None]]
"""``recorder(metric, labels)``: the function applying a number to ``metric`` at ``labels``."""


class Router:
    """One exporter's compiled copy of the measures table, keyed by event name.

    [`handler()`][datapunk_recovery.telemetry.metrics.Router.handler] compiles, once per event
    class, the function an exporter
    calls per event: for the common case of one measure reading one label
    attribute, an attribute read, a dictionary read and the instrument's update.
    """

    __slots__ = ("_handlers", "_recorder", "_table")

    def __init__(
        self,
        labeler: Labeler,
        measures: Mapping[str, Sequence[Measure]] = MEASURES,
    ) -> None:
        self._table: dict[str, tuple[Compiled, ...]] = {
            name: tuple(Compiled(m, labeler) for m in entries) for name, entries in measures.items()
        }
        self._handlers: dict[type[Event], Callable[[Event], None]] = {}
        self._recorder: Recorder | None = None

    def handler(self, kind: type[Event], recorder: Recorder) -> Callable[[Event], None]:
        """The function applying an event of class ``kind`` to an exporter's instruments.

        Compiled at the first event of the class, then kept (one ``recorder``
        per router: an exporter's own).
        """
        handler = self._handlers.get(kind)
        if handler is None or self._recorder != recorder:  # bound methods: equal, not same
            if self._recorder != recorder:
                self._handlers = {}
                self._recorder = recorder
            handler = self._handlers[kind] = self._compile(kind, recorder)
        return handler

    def _compile(self, kind: type[Event], recorder: Recorder) -> Callable[[Event], None]:
        measures = self._table.get(kind.name, ())
        if not measures:
            return _ignore
        if len(measures) == 1 and measures[0].when is None and len(measures[0].read) == 1:
            # One measure, one attribute behind its labels: memoise by the raw value.
            measure = measures[0]
            read, number, metric = attrgetter(measure.read[0]), measure.number, measure.metric
            labels_for = measure.labels_for
            memo: dict[object, Callable[[float], None]] = {}

            def one(event: Event) -> None:
                raw = read(event)
                record = memo.get(raw)
                if record is None:
                    record = recorder(metric, labels_for((raw,)))
                    if len(memo) < _MEMO_MAX:
                        memo[raw] = record
                record(number(event))

            return one
        return lambda event: self.apply(event, recorder)

    def get(self, name: str) -> tuple[Compiled, ...]:
        """The compiled measures of the event kind ``name`` (empty if it measures nothing)."""
        return self._table.get(name, ())

    def apply(
        self, event: Event, recorder: Callable[[Metric, tuple[str, ...]], Callable[[float], None]]
    ) -> None:
        """Apply ``event`` to an exporter's instruments.

        ``recorder(metric, labels)`` returns the function that applies a
        number to ``metric`` at ``labels``; it is called once per distinct
        raw key (while
        [`Compiled.remember()`][datapunk_recovery.telemetry.metrics.Compiled.remember] has room),
        then memoised.
        """
        for measure in self._table.get(event.name, ()):
            if measure.when is not None and not measure.when(event):
                continue
            key = measure.key(event)
            record = measure.memo.get(key)
            if record is None:
                record = measure.remember(key, recorder(measure.metric, measure.labels_for(key)))
            record(measure.number(event))

    def updates(self, event: Event) -> list[Update]:
        """What ``event`` changes, as `Update` objects."""
        return [
            Update(c.metric, c.labels(event), float(c.number(event)))
            for c in self.get(event.name)
            if c.applies(event)
        ]
