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
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from datapunk_recovery.events import Event

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
