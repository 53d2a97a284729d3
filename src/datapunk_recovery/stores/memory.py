"""The in-process store: state shared by name within one process.

Breakers made with the same name on one [`MemoryStore`][datapunk_recovery.stores.memory.MemoryStore]
share one state
(the last configuration given wins), so a breaker per endpoint can be made
wherever it is needed.  Without any store a breaker keeps a private state,
which is the same thing with a store of one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["MemoryStore"]

T = TypeVar("T")


class MemoryStore:
    """Live objects by key, made on first use; thread-safe."""

    kind = "memory"
    is_async = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[Hashable, Any] = {}

    def local(self, key: Hashable, factory: Callable[[], T]) -> T:
        """The object under ``key``, made with ``factory()`` the first time."""
        with self._lock:
            try:
                found: T = self._objects[key]
            except KeyError:
                found = self._objects[key] = factory()
            return found

    def discard(self, key: Hashable) -> None:
        """Forget the object under ``key`` (no error if absent)."""
        with self._lock:
            self._objects.pop(key, None)

    def __len__(self) -> int:
        return len(self._objects)
