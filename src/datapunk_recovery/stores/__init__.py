"""State stores: where the state of breakers and retry budgets lives.

Two kinds, told apart by ``is_async``:

- **in-process** stores (``is_async = False``, [`LocalStore`][datapunk_recovery.stores.LocalStore])
  hand out one
  live object per key, made on first use by a factory: every breaker of the
  same name in the process then shares its state, sync and async faces alike.
  [`MemoryStore`][datapunk_recovery.stores.memory.MemoryStore] is the one shipped.
- **shared** stores (``is_async = True``, [`SharedStore`][datapunk_recovery.stores.SharedStore])
  keep the state
  outside the process (Redis) and are reached with ``await`` only.  A
  primitive binds itself to the store and gets a *link* that does the
  round trips, the local read cache and the fallback to local state when the
  store is down; for breakers that is [`BreakerLink`][datapunk_recovery.stores.BreakerLink].  A
  retry budget
  is shared by
  [`datapunk_recovery.stores.budget_redis.bind_budget()`][datapunk_recovery.stores.budget_redis.bind_budget],
  which wraps it in a ``SharedBudget`` syncing through the same Redis store.

The protocols are small on purpose: a store knows keys and plain fields, never
a pickled object, and a primitive knows only its link.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from datapunk_recovery.breaker import BreakerState, CircuitBreaker

__all__ = ["BreakerLink", "LocalStore", "SharedStore", "Store"]

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


class BreakerLink(Protocol):
    """A breaker's connection to a shared store (one per breaker).

    ``allow`` returns ``(generation, is_probe, remote)``; ``remote`` False
    means the permit was granted by the breaker's local state (the store is
    down) and its outcome goes there.  ``record`` and ``release`` never wait:
    they schedule the write; ``flush`` waits for writes scheduled so far.
    Store errors never escape any of these: the link falls back instead.
    """

    async def allow(self) -> tuple[int, bool, bool]: ...

    def admitted(self) -> int | None:
        """The generation a plain call is admitted under, if known without waiting.

        ``None`` unless the state as last read admits it (closed, fresh, the store
        answering); the caller then goes through ``allow``.
        """
        ...

    def record(
        self,
        gen: int,
        probe: bool,
        failed: bool,
        slow: bool,
        duration: float | None,
        hint: float | None,
    ) -> None: ...

    def release(self, gen: int, probe: bool) -> None: ...

    def missed(self, failed: bool, slow: bool) -> None:
        """An outcome of a call judged on local state (the store was away): the
        link merges it into the shared state once the store answers again."""
        ...

    async def flush(self) -> None: ...

    async def force(self, state: BreakerState, reason: str) -> None: ...

    def state(self) -> BreakerState: ...

    def retry_after(self) -> float: ...

    def totals(self) -> tuple[int, int, int] | None: ...

    def consecutive(self) -> int: ...


@runtime_checkable
class SharedStore(Store, Protocol):
    """A store shared between processes, reached with ``await``."""

    def bind_breaker(self, breaker: CircuitBreaker) -> BreakerLink:
        """Attach ``breaker``; raises ``TypeError`` for a configuration it cannot share."""
        ...

    async def aclose(self) -> None:
        """Release connections the store opened itself."""
        ...
