"""Standard-library logging exporter: one line per event, structured fields in ``extra``.

::

    from datapunk_recovery.telemetry import LoggingExporter
    LoggingExporter().install()

Each area logs to its own logger, ``datapunk_recovery.<area>``
(``datapunk_recovery.retry``, ``datapunk_recovery.breaker``, ...), so one
``logging`` setting silences or raises a whole area.  The level of each event
kind comes from [`LEVELS`][datapunk_recovery.telemetry.levels.LEVELS]; a record
is built only when its logger would emit it.

The message reads ``retry.scheduled operation=fetch retry=1 delay=0.2 ...``;
the same values, redacted, are attributes of the record (``extra``): the
event name as ``event``, ``area``, then every field of the event, so a JSON
formatter gets them as keys.  A field whose name a ``LogRecord`` already uses
gets an ``event_`` prefix.

The exporter asks its buses only for the event kinds its loggers would emit
([`LoggingExporter.wants()`][datapunk_recovery.telemetry.logging.LoggingExporter.wants]): at
WARNING, a call that succeeds at once
builds no event and stays on the engine's fast path.  The answer is worked
out again whenever ``logging`` levels change (``Logger.setLevel``,
``logging.disable``: both clear ``logging``'s own caches, and the exporter
hooks that clearing; a logger's ``disabled`` flag is left to the logger).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Final, Self

from datapunk_recovery._core.events import Event, EventBus, event_kinds, global_bus

from .exporter import Exporter
from .fields import FieldValue, event_fields
from .levels import Level, level_of, with_overrides

__all__ = ["LoggingExporter", "format_fields"]

_RESERVED: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}
_NOT_IN_MESSAGE: Final = frozenset({"event", "area", "at"})


def format_fields(fields: Mapping[str, FieldValue]) -> str:
    """``name key=value ...``: the event's name and fields (time left out) for a message."""
    parts = [str(fields["event"])]
    for key, value in fields.items():
        if key not in _NOT_IN_MESSAGE:
            parts.append(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


_watching: weakref.WeakSet[LoggingExporter] = weakref.WeakSet()
_hook_lock = threading.Lock()


def _watch_levels(exporter: LoggingExporter) -> None:
    """Call ``exporter._levels_changed`` whenever ``logging`` levels change."""
    manager = logging.Logger.manager
    with _hook_lock:
        _watching.add(exporter)
        original: Callable[[], None] = getattr(manager, "_clear_cache")  # noqa: B009
        if getattr(original, "_datapunk_recovery", False):
            return

        def clear_cache() -> None:
            original()
            for watcher in list(_watching):
                watcher._levels_changed()

        clear_cache._datapunk_recovery = True  # type: ignore[attr-defined]
        setattr(manager, "_clear_cache", clear_cache)  # noqa: B010 - private to logging


class LoggingExporter(Exporter):
    """Logs every event to ``<prefix>.<area>`` at the level its kind deserves.

    ``levels`` overrides [`LEVELS`][datapunk_recovery.telemetry.levels.LEVELS]
    per event name (an ``int`` level or a
    [`Level`][datapunk_recovery.telemetry.levels.Level]).
    """

    def __init__(
        self,
        *,
        levels: Mapping[str, int | Level] | None = None,
        prefix: str = "datapunk_recovery",
    ) -> None:
        super().__init__()
        self._levels = with_overrides(levels)
        self._prefix = prefix
        self._loggers: dict[str, logging.Logger] = {}
        self._buses: list[EventBus] = []

    def wants(self, name: str) -> bool:
        """Whether an event named ``name`` could be logged now (its logger enabled at its level)."""
        kind = event_kinds().get(name)
        if kind is None:
            return True  # a kind not defined yet: ask again when it is
        level = self._levels.get(name)
        lowest = logging.DEBUG if level is None else min([level.default, *level.by_value.values()])
        # What ``isEnabledFor`` decides from levels and ``logging.disable``,
        # both of which clear logging's cache (and so call us again); not
        # ``Logger.disabled``, which changes with no such call (dictConfig
        # enables a logger it configures after setting its level): a disabled
        # logger is still asked for, and `__call__` drops its events.
        logger = self._logger(kind.area)
        return logger.manager.disable < lowest and lowest >= logger.getEffectiveLevel()

    def install(self, *buses: EventBus) -> Self:
        """Subscribe to ``buses`` (or globally), for the kinds its loggers would emit."""
        super().install(*buses)
        self._buses += buses or (global_bus,)
        _watch_levels(self)
        return self

    def close(self) -> None:
        """Unsubscribe from every bus `install()` subscribed to."""
        super().close()
        self._buses.clear()
        _watching.discard(self)

    def _levels_changed(self) -> None:
        for bus in list(self._buses):
            bus.refresh()

    def _logger(self, area: str) -> logging.Logger:
        logger = self._loggers.get(area)
        if logger is None:
            logger = self._loggers[area] = logging.getLogger(f"{self._prefix}.{area}")
        return logger

    def __call__(self, event: Event) -> None:
        logger = self._loggers.get(event.area)
        if logger is None:
            logger = self._loggers[event.area] = logging.getLogger(f"{self._prefix}.{event.area}")
        level = level_of(self._levels, event)
        if not logger.isEnabledFor(level):
            return
        fields = event_fields(event)
        extra = {(f"event_{k}" if k in _RESERVED else k): v for k, v in fields.items()}
        logger.log(level, "%s", format_fields(fields), extra=extra)
