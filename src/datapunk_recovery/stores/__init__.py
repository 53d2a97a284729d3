"""State stores: where the state of breakers and retry budgets lives (no primitive known).

Two kinds, told apart by ``is_async``:

- **in-process** stores (``is_async = False``, [`LocalStore`][datapunk_recovery.stores.LocalStore])
  hand out one
  live object per key, made on first use by a factory: every breaker of the
  same name in the process then shares its state, sync and async faces alike.
  [`MemoryStore`][datapunk_recovery.stores.memory.MemoryStore] is the one shipped.
- **shared** stores (``is_async = True``, [`SharedStore`][datapunk_recovery.stores.SharedStore])
  keep the state
  outside the process (Redis) and are reached with ``await`` only: they run
  scripts on named keys.  A primitive builds its own *link* on the store
  (the breaker's in ``breaker/shared.py``, the budget's in
  ``budget/shared.py``): its script, round trips, local read cache and the
  fallback to local state when the store is down.

The protocols are small on purpose: a store knows keys, scripts and plain
fields, never a pickled object and never what a breaker or a budget is.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Attached", "LocalStore", "SharedStore", "Store"]

T = TypeVar("T")


@runtime_checkable
class Store(Protocol):
    """What every store says about itself."""

    #: ``"memory"``, ``"redis"``...: names the store in events.
    kind: str
    #: True when the store is reached with ``await`` only (sync faces refuse it).
    is_async: bool


@runtime_checkable
class LocalStore(Store, Protocol):
    """An in-process store: one shared live object per key."""

    def local(self, key: Hashable, factory: Callable[[], T]) -> T:
        """The object under ``key``, made with ``factory()`` the first time."""
        ...


class Attached(Protocol):
    """A primitive's link to a shared store, landed and let go by the store's ``aclose()``."""

    async def flush(self) -> None:
        """Wait (bounded) for the writes scheduled so far."""
        ...

    def detach(self) -> None:
        """The store closed: stop what is still scheduled."""
        ...


@runtime_checkable
class SharedStore(Store, Protocol):
    """A store shared between processes, reached with ``await``.

    It runs scripts on named keys; the primitives' links (their own scripts,
    caches and fallbacks) are built on it by the primitives themselves.
    Seconds throughout.
    """

    #: How long a read of the shared state is trusted locally.
    cache_ttl: float
    #: The longest one command may take before a link falls back.
    timeout: float
    #: How often a link whose store failed tries it again.
    retry_interval: float
    #: Abandoned keys expire after this long.
    key_ttl: float
    #: ``"local"`` (decide on local state while the store is away) or ``"closed"``.
    on_unavailable: str
    #: Commands in flight per store (and writes per link) before links decide locally.
    max_pending: int
    #: How soon a link sends a batch of outcomes holding a failure.
    flush_interval: float
    #: A batch of this many outcomes is sent at once.
    flush_max: int

    def keys(self, kind: str, name: str, *parts: str) -> list[str]:
        """Keys of one primitive, all in one cluster slot."""
        ...

    def script(self, source: str) -> Any:
        """``source`` registered once per store, for `run`."""
        ...

    async def run(
        self, script: Any, keys: list[str], args: list[Any], *, serial: object = None
    ) -> Any:
        """One round trip, waited for at most ``timeout``; raises on any trouble."""
        ...

    def attach(self, link: Attached) -> None:
        """Land ``link``'s writes when the store closes."""
        ...

    @property
    def closing(self) -> bool:
        """Whether closing has begun (send nothing new)."""
        ...

    @property
    def closed(self) -> bool:
        """Whether the store is closed."""
        ...

    async def aclose(self) -> None:
        """Release connections the store opened itself."""
        ...
