"""RecoveryStrategies in a minute: one object, four recoveries, no server.

A flaky "inventory" service with a primary and a secondary endpoint, a cache
that goes down, and a hot reload that keeps the breakers' state.
"""

from __future__ import annotations

import asyncio

from datapunk_recovery.cache import MemoryCache
from datapunk_recovery.network import Endpoint
from datapunk_recovery.strategies import RecoveryStrategies, ResourceScope

CONFIG = {
    "defaults": {
        "retry": {"max_attempts": 3, "base_delay": "10ms", "max_delay": "100ms"},
        "breaker": {"consecutive_failures": 2, "open_duration": "30s"},
    },
    "services": {"inventory": {"endpoints": ["primary", "secondary"]}},
    "pools": {"workers": {"capacity": 2, "max_wait": 1.0}},
}


class Cache(MemoryCache):
    """The embedded cache, with a switch to take it down."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def get(self, key: str) -> object:
        if self.down:
            raise ConnectionRefusedError("cache down")
        return await super().get(key)

    async def counter(self, key: str) -> int:
        if self.down:
            raise ConnectionRefusedError("cache down")
        return await super().counter(key)


async def main() -> None:
    async with RecoveryStrategies.from_config(CONFIG, environ={}) as recovery:

        async def stock(endpoint: Endpoint, sku: str) -> str:
            if endpoint.name == "primary":
                raise ConnectionResetError("primary is down")
            return f"{sku}: 7 in stock (answered by {endpoint.name})"

        for sku in ("A-1", "A-2", "A-3", "A-4"):
            print(await recovery.with_network_recovery("inventory", stock, sku))
        print("primary breaker:", recovery.breaker("inventory", "primary"))

        cache = Cache()

        async def load(key: str) -> str:
            return f"product {key} from the database"

        print(await recovery.with_cache_recovery("p1", load, cache=cache))
        cache.down = True
        print(await recovery.with_cache_recovery("p1", load, cache=cache))

        async def job(scope: ResourceScope) -> str:
            scope.compensations.add(print, "undo step 1")
            return "job done"

        print(await recovery.with_resource_recovery(job, pool="workers"))
        print("backoff before retry 2:", round(recovery.calculate_backoff(2, "inventory"), 3), "s")

        recovery.reload(
            {**CONFIG, "defaults": {**CONFIG["defaults"], "breaker": {"open_duration": "5s"}}},
            environ={},
        )
        print("after reload:", recovery.breaker("inventory", "primary"))
        print("fallbacks served:", recovery.fallbacks())


if __name__ == "__main__":
    asyncio.run(main())
