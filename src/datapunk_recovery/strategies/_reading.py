"""The read in progress: how the facade's read-through caches find the caller's source.

A read-through cache is built once per service and cache, but each read
brings its own source; the read in progress is a context variable, so a
missed key loads through the source of the read that missed it (concurrent
readers of a key share the first one's load), and a failed cache read is
noted on it, for the facade to count the answer as served from elsewhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from .._core.events import Event
from ..cache import CacheFailed


class _Read:
    """One read with cache recovery: its source, and whether the cache failed it."""

    __slots__ = ("cache_failed", "source")

    def __init__(self, source: Callable[[str], Awaitable[Any]]) -> None:
        self.source = source
        self.cache_failed = False


# The read in progress in this task: the facade's read-through caches load
# through the source of the read that missed (concurrent readers of a key
# share the first one's load).
_READING: ContextVar[_Read | None] = ContextVar("datapunk_recovery_reading", default=None)


def _note_cache_failure(event: Event) -> None:
    # Called in the reading task, while its lookup runs: a failed cache read
    # (not a failed write-back, nor a corrupt entry read as a miss) means the
    # answer came from the source instead.
    if isinstance(event, CacheFailed) and event.op != "set" and event.kind != "corrupt":
        read = _READING.get()
        if read is not None:
            read.cache_failed = True
