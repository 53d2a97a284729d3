"""How loud each event kind is in a log, declared once for every log exporter.

The aim is a log a person can read during an outage: a scheduled retry is
routine (INFO: it says what is happening, without a WARNING storm while a
dependency flaps), giving up, a breaker opening and a resource leak are
WARNING, and per-attempt and per-call events are DEBUG.  An event kind absent
from [`LEVELS`][datapunk_recovery.telemetry.levels.LEVELS] logs at DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from enum import Enum
from types import MappingProxyType
from typing import Final

from datapunk_recovery._core.events import Event
from datapunk_recovery._core.validate import check_mapping, shown

__all__ = ["LEVELS", "Level", "level_of", "with_overrides"]


@dataclass(frozen=True, slots=True)
class Level:
    """A log level, or one chosen by the value of an event attribute.

    ``Level(logging.INFO, "state", {"open": logging.WARNING})`` logs at
    WARNING when the event's ``state`` is ``"open"`` and at INFO otherwise.
    """

    default: int
    field: str | None = None
    by_value: Mapping[str, int] = dataclass_field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.default, bool) or not isinstance(self.default, int):
            raise TypeError(f"Level.default: expected a logging level, got {shown(self.default)}")
        if (self.field is None) != (not self.by_value):
            raise ValueError("Level: give field and by_value together, or neither")
        by_value = check_mapping("Level", "by_value", self.by_value)
        object.__setattr__(self, "by_value", MappingProxyType(by_value))

    def of(self, event: Event) -> int:
        """The level to log ``event`` at."""
        if self.field is None:
            return self.default
        value = getattr(event, self.field, None)
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, bool):
            value = "true" if value else "false"
        return self.by_value.get(str(value), self.default)


LEVELS: Final[Mapping[str, Level]] = MappingProxyType(
    {
        "retry.attempt": Level(logging.DEBUG),
        "retry.call": Level(logging.DEBUG),
        "retry.scheduled": Level(logging.INFO),
        "retry.gave_up": Level(logging.WARNING),
        "hint.ignored": Level(logging.INFO),
        "breaker.state": Level(
            logging.INFO, "to_state", {"open": logging.WARNING, "forced_open": logging.WARNING}
        ),
        "breaker.rejected": Level(logging.DEBUG),
        "breaker.outcome": Level(logging.DEBUG),
        "breaker.shadow_trip": Level(logging.WARNING),
        "breaker.store_fallback": Level(logging.WARNING),
        "breaker.store_resumed": Level(logging.INFO),
        "breaker.outcomes_folded": Level(logging.WARNING),
        "breaker.write_shed": Level(logging.WARNING),
        "breaker.corrupt_state": Level(logging.WARNING),
        # per-call refusals: counted by metrics; a line each would flood the log
        # during the very overload that causes them
        "budget.refused": Level(logging.DEBUG),
        "budget.store_fallback": Level(logging.WARNING),
        "budget.store_resumed": Level(logging.INFO),
        "budget.corrupt_state": Level(logging.WARNING),
        "bulkhead.rejected": Level(logging.DEBUG),
        "bulkhead.admitted": Level(logging.DEBUG),
        "bulkhead.released": Level(logging.DEBUG),
        "ratelimit.rejected": Level(logging.DEBUG),
        "ratelimit.admitted": Level(logging.DEBUG),
        "ratelimit.drained": Level(logging.INFO),
        "adaptive.limit": Level(logging.INFO),
        "hedge.started": Level(logging.DEBUG),
        "hedge.refused": Level(logging.DEBUG),
        "hedge.won": Level(logging.DEBUG),
        "fallback.used": Level(logging.INFO),
        "recovery.fallback": Level(logging.INFO),
        "timeout.expired": Level(logging.DEBUG),
        "timeout.overran": Level(logging.WARNING),
        "deadline.expired": Level(logging.INFO),
        "pipeline.stage": Level(logging.DEBUG),
        "network.endpoint_failed": Level(logging.DEBUG),
        "network.failover": Level(logging.INFO),
        "network.fallthrough": Level(logging.WARNING),
        "network.routing_changed": Level(logging.INFO),
        "database.pool": Level(logging.DEBUG),
        "database.discarded": Level(logging.INFO),
        "database.commit_uncertain": Level(logging.WARNING),
        "resource.leak": Level(logging.WARNING),
        "resource.acquisition": Level(logging.DEBUG),
        "resource.usage": Level(logging.DEBUG),
        "resource.compensation": Level(logging.DEBUG, "succeeded", {"false": logging.WARNING}),
        "resource.cleanup": Level(logging.INFO),
        "resource.batch_round": Level(logging.DEBUG),
        "resource.batch": Level(logging.INFO),
        "resource.inference_split": Level(logging.INFO),
        "resource.inference_fallback": Level(logging.WARNING),
        "resource.inference": Level(logging.DEBUG),
        "chaos.injected": Level(logging.DEBUG),
        # a failing cache opens its breaker (WARNING); each failed read is DEBUG
        "cache.failed": Level(logging.DEBUG),
        "cache.stale_served": Level(logging.INFO),
        "cache.repair_queued": Level(logging.INFO, "overflowed", {"true": logging.WARNING}),
        "cache.recovered": Level(logging.INFO),
        "cache.warmed": Level(logging.INFO),
    }
)
"""Event name -> its level; exporters accept overrides (``levels={...}``)."""

_DEBUG: Final = Level(logging.DEBUG)


def level_of(levels: Mapping[str, Level], event: Event) -> int:
    """The level of ``event`` under ``levels`` (DEBUG for a kind not listed)."""
    return levels.get(event.name, _DEBUG).of(event)


def with_overrides(overrides: Mapping[str, int | Level] | None) -> Mapping[str, Level]:
    """`LEVELS` with ``overrides`` (event name -> level) applied."""
    merged = dict(LEVELS)
    for name, level in (overrides or {}).items():
        merged[name] = level if isinstance(level, Level) else Level(level)
    return MappingProxyType(merged)
