"""How much a call matters to a retry budget: a context variable read by ``allow_retry``.

Lower values are refused first when a budget runs short (see the package).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from enum import IntEnum

from .._core.validate import shown

__all__ = ["CURRENT", "Criticality", "criticality", "current_criticality"]


class Criticality(IntEnum):
    """How much a call matters; lower values are refused first when a budget is short."""

    SHEDDABLE = 0
    DEFAULT = 1
    CRITICAL = 2


CURRENT: ContextVar[Criticality] = ContextVar(
    "datapunk_recovery_criticality", default=Criticality.DEFAULT
)


@contextmanager
def criticality(level: Criticality | str) -> Iterator[Criticality]:
    """Run the block with calls of criticality ``level`` (``"sheddable"`` works too).

    Nested blocks replace the outer level for their duration; the value follows
    the block into threads started with ``contextvars.copy_context`` and into
    async tasks, like a request does.
    """
    value = _parse(level)
    token = CURRENT.set(value)
    try:
        yield value
    finally:
        CURRENT.reset(token)


def current_criticality() -> Criticality:
    """The criticality of the calls made now (``DEFAULT`` outside any block)."""
    return CURRENT.get()


def _parse(level: Criticality | str) -> Criticality:
    if isinstance(level, Criticality):
        return level
    if isinstance(level, str):
        try:
            return Criticality[level.upper()]
        except KeyError:
            pass
    names = ", ".join(c.name.lower() for c in Criticality)
    raise ValueError(f"criticality: expected one of {names}, got {shown(level)}")
