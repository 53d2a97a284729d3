"""A bounded registry of named circuit breakers (per service, per endpoint).

``registry.get("payments:/charge")`` returns the breaker of that name, making
it on first use.  The registry holds at most ``max_size`` breakers: past that,
the least recently used breaker that is *safe to forget* is dropped.  A
breaker that is open, half-open or forced open is never dropped (forgetting it
would let traffic through to a dependency known to be failing), so when every
breaker is in such a state the registry grows past ``max_size`` until some
close again; the next ``get`` then shrinks it back.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Final

from .._core.validate import check_count, shown
from . import BreakerConfig, BreakerSnapshot, BreakerState, CircuitBreaker

__all__ = ["BreakerRegistry"]

_KEEP: Final = frozenset({BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.FORCED_OPEN})


def _pinned(breaker: CircuitBreaker) -> bool:
    """Whether forgetting ``breaker`` could let traffic through to a failing dependency.

    Called under the registry's lock, so it never waits for the breaker's:
    a thread holding that (a subscriber of the breaker's events calling
    [`BreakerRegistry.get()`][datapunk_recovery.breaker.registry.BreakerRegistry.get],
    say) would deadlock
    with us.  A breaker in
    use right now is kept this time.
    """
    state = breaker.state_unless_busy()
    return state is None or state in _KEEP


class BreakerRegistry:
    """Named breakers made on demand with ``config`` and ``store``, bounded by ``max_size``.

    Thread-safe.  ``config`` is the configuration of breakers made by
    [`get()`][datapunk_recovery.breaker.registry.BreakerRegistry.get] without one of their own;
    ``store``
    the store they use.
    """

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        max_size: int = 1000,
        store: object | None = None,
    ) -> None:
        check_count("BreakerRegistry", "max_size", max_size)
        if config is not None and not isinstance(config, BreakerConfig):
            raise TypeError(
                f"BreakerRegistry.config: expected a BreakerConfig, got {shown(config)}"
            )
        self.config = config
        self.max_size = max_size
        self.store = store
        self._lock = threading.Lock()
        self._breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()

    def get(self, name: str, config: BreakerConfig | None = None) -> CircuitBreaker:
        """The breaker called ``name``, made with ``config`` (or the registry's) if new.

        An existing breaker keeps its configuration: use
        [`CircuitBreaker.reconfigure()`][datapunk_recovery.breaker.breaker.CircuitBreaker.reconfigure]
        to change it.
        """
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is not None:
                self._breakers.move_to_end(name)
            else:
                breaker = CircuitBreaker(name, config or self.config, store=self.store)
                self._breakers[name] = breaker
            if len(self._breakers) > self.max_size:
                self._evict(name)
            return breaker

    def _evict(self, keep: str) -> None:
        excess = len(self._breakers) - self.max_size
        for name in list(self._breakers):  # least recently used first
            if excess <= 0:
                break
            if name != keep and not _pinned(self._breakers[name]):
                del self._breakers[name]
                excess -= 1

    def remove(self, name: str) -> CircuitBreaker | None:
        """Forget the breaker called ``name`` whatever its state; returns it (or None)."""
        with self._lock:
            return self._breakers.pop(name, None)

    def find(self, name: str) -> CircuitBreaker | None:
        """The breaker called ``name`` if the registry holds it (not made, not touched)."""
        return self._breakers.get(name)

    def snapshots(self) -> list[BreakerSnapshot]:
        """A snapshot of every breaker held, least recently used first."""
        with self._lock:
            breakers = list(self._breakers.values())
        return [b.snapshot() for b in breakers]

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __len__(self) -> int:
        return len(self._breakers)

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._breakers))
