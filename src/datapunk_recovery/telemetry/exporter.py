"""The base of every exporter: a subscriber with a lifetime.

An exporter is a plain event subscriber (a callable taking an
[`Event`][datapunk_recovery._core.events.Event]), so ``events.subscribe(exporter)``
works; [`Exporter.install()`][datapunk_recovery.telemetry.exporter.Exporter.install] adds the
bookkeeping to take it off again::

    exporter = PrometheusExporter(registry).install()           # every event
    exporter = PrometheusExporter(registry).install(fetch.events)  # one function's

Install an exporter on the global bus *or* on functions' buses, not both:
an event reaches its function's bus and then the global one, so it would be
counted twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Self

from datapunk_recovery._core.events import Event, EventBus, global_bus

__all__ = ["Exporter"]


class Exporter(ABC):
    """A subscriber that can `install()` itself on buses and `close()`."""

    def __init__(self) -> None:
        self._unsubscribers: list[Callable[[], None]] = []

    @abstractmethod
    def __call__(self, event: Event) -> None:
        """Export one event (called by the bus; must not raise on its own account)."""

    def install(self, *buses: EventBus) -> Self:
        """Subscribe to ``buses`` (a decorated function's is ``fn.events``), or globally."""
        for bus in buses or (global_bus,):
            self._unsubscribers.append(bus.subscribe(self))
        return self

    def close(self) -> None:
        """Unsubscribe from every bus `install()` subscribed to."""
        while self._unsubscribers:
            self._unsubscribers.pop()()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
