"""structlog exporter: each event as a structlog event with its fields as keys.

::

    from datapunk_recovery.telemetry.structlog import StructlogExporter
    StructlogExporter().install()

The structlog event is the library event's name (``"retry.scheduled"``); its
keys are ``area`` and the event's fields, redacted.  Levels follow
[`LEVELS`][datapunk_recovery.telemetry.levels.LEVELS], like the stdlib
exporter, and each area has its own logger, named ``datapunk_recovery.<area>``
(what ``structlog.stdlib.LoggerFactory`` turns into a stdlib logger name).
structlog is imported when an exporter is built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from datapunk_recovery._core.events import Event
from datapunk_recovery._core.extras import raise_missing

from .exporter import Exporter
from .fields import event_fields
from .levels import Level, level_of, with_overrides

__all__ = ["StructlogExporter"]

# The structlog method for a level: the highest standard one not above it.
_METHODS: Final = (
    (logging.CRITICAL, "critical"),
    (logging.ERROR, "error"),
    (logging.WARNING, "warning"),
    (logging.INFO, "info"),
)


def _method(level: int) -> str:
    for bound, name in _METHODS:
        if level >= bound:
            return name
    return "debug"


class StructlogExporter(Exporter):
    """Logs every event through structlog at the level its kind deserves.

    ``get_logger`` defaults to ``structlog.get_logger``; ``levels`` overrides
    levels per event name, as for the stdlib exporter.
    """

    def __init__(
        self,
        *,
        levels: Mapping[str, int | Level] | None = None,
        get_logger: Callable[[str], Any] | None = None,
        prefix: str = "datapunk_recovery",
    ) -> None:
        super().__init__()
        if get_logger is None:
            try:
                import structlog
            except ImportError as exc:
                raise_missing(exc, "StructlogExporter", "structlog", extra="structlog")
            get_logger = structlog.get_logger
        self._get_logger = get_logger
        self._levels = with_overrides(levels)
        self._prefix = prefix
        self._loggers: dict[str, Any] = {}

    def __call__(self, event: Event) -> None:
        logger = self._loggers.get(event.area)
        if logger is None:
            logger = self._loggers[event.area] = self._get_logger(f"{self._prefix}.{event.area}")
        fields = event_fields(event)
        del fields["event"]
        getattr(logger, _method(level_of(self._levels, event)))(event.name, **fields)
