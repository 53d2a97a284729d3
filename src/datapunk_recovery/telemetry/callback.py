"""Callback exporter: the same measurements, or the redacted events, for any other system.

For a backend the library has no exporter for (statsd, a vendor agent, a
test), give it a function::

    def send(update: Update) -> None:
        statsd.incr(update.metric.prometheus_name, update.value, tags=update.attributes)

    CallbackExporter(on_update=send).install()

``on_update`` receives the [`Update`][datapunk_recovery.telemetry.metrics.Update]\\ s
of [`MEASURES`][datapunk_recovery.telemetry.metrics.MEASURES], labels bounded
like Prometheus labels; ``on_event`` receives each event as its flat,
redacted fields ([`event_fields()`][datapunk_recovery.telemetry.fields.event_fields]),
optionally only the event names in ``names``.  The exporter asks its buses
for those kinds only (`wants()`), so a call reporting nothing it uses builds
no event.  A subscriber that wants the
event objects themselves needs no exporter: ``events.subscribe(fn)``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

from datapunk_recovery._core.events import Event
from datapunk_recovery._core.validate import shown

from .exporter import Exporter
from .fields import FieldValue, event_fields
from .labels import Labeler, LabelPolicy
from .metrics import MEASURES, Measure, Metric, Router, Update

__all__ = ["CallbackExporter"]


class CallbackExporter(Exporter):
    """Calls ``on_update`` per metric update and ``on_event`` per event (give one or both)."""

    def __init__(
        self,
        on_update: Callable[[Update], None] | None = None,
        on_event: Callable[[Mapping[str, FieldValue]], None] | None = None,
        *,
        names: Collection[str] | None = None,
        labels: LabelPolicy | None = None,
        measures: Mapping[str, Sequence[Measure]] = MEASURES,
    ) -> None:
        super().__init__()
        if on_update is None and on_event is None:
            raise TypeError("CallbackExporter: give on_update, on_event or both")
        for what, fn in (("on_update", on_update), ("on_event", on_event)):
            if fn is not None and not callable(fn):
                raise TypeError(f"CallbackExporter.{what}: expected a callable, got {shown(fn)}")
        self._on_update = on_update
        self._on_event = on_event
        self._names = None if names is None else frozenset(names)
        self.labeler = Labeler(labels)
        self._router = Router(self.labeler, measures)
        self._recorder = self._updater  # one bound method: the router keeps its handlers

    def _updater(self, metric: Metric, labels: tuple[str, ...]) -> Callable[[float], None]:
        """The function sending ``metric`` at ``labels`` changed by a number as an `Update`."""
        on_update = self._on_update
        assert on_update is not None
        return lambda value: on_update(Update(metric, labels, float(value)))

    def wants(self, name: str) -> bool:
        """Whether events named ``name`` make an update or are passed on (the rest is not built)."""
        if self._on_event is not None and (self._names is None or name in self._names):
            return True
        return self._on_update is not None and bool(self._router.get(name))

    def __call__(self, event: Event) -> None:
        if self._on_update is not None:
            # Compiled once per event class; labels worked out once per raw value.
            self._router.handler(type(event), self._recorder)(event)
        if self._on_event is not None and (self._names is None or event.name in self._names):
            self._on_event(event_fields(event))
