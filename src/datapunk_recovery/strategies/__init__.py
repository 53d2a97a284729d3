"""``RecoveryStrategies``: one object, built from configuration, for the four recoveries.

A service holds one [`RecoveryStrategies`][datapunk_recovery.strategies.RecoveryStrategies] for its
whole life::

    async with RecoveryStrategies.from_config("recovery.toml") as recovery:
        order = await recovery.with_network_recovery("orders", fetch_order, order_id)
        user = await recovery.with_cache_recovery(f"user:{uid}", load_user, service="users")
        await recovery.with_database_recovery(write_ledger, database="ledger")
        await recovery.with_resource_recovery(run_model, pool="gpu")

It owns, per service, the retry policy (per error category too), the circuit
breaker, the retry budget and the bulkhead that the configuration asks for
([`datapunk_recovery.config`][datapunk_recovery.config]); a service with endpoints is routed by a
[`Router`][datapunk_recovery.network.router.Router] (a breaker per endpoint,
priorities, failover, hedging); reads with cache recovery go through a
[`ReadThroughCache`][datapunk_recovery.cache.recovering.ReadThroughCache] (single-flight,
stale-if-error, the cache's own breaker).  It also owns the pools, databases
and the Redis cache it was asked to create: it opens them on entry (making
no connection: the first use connects, so a dependency that is down never
stops the entry) and closes them on exit, even after failures.

What a call goes through, outermost first: fallback, bulkhead, retry (asking
the budget before every retry), endpoint choice, breaker, attempt timeout,
the call.  Each service's pipeline is compiled once, when the configuration
is applied, so a call pays one dictionary lookup to find it.

[`RecoveryStrategies.reload()`][datapunk_recovery.strategies.RecoveryStrategies.reload] applies a
new configuration while calls
run: callers keep their handle; routers, breakers, budgets, bulkheads and
pools are re-configured in place, so they keep their state (tokens are never
refilled, slots and units held go on counting against the new limits) and
take the new thresholds; and a bad configuration is rejected with every
problem listed while the old one keeps running.

The package holds one concept per module, all private; their public names are
re-exported here, the one path to import them from: ``_facade`` (the object
itself), ``_service`` (one service's compiled pipeline), ``_reading`` (the read
in progress, for the read-through caches), ``_resources`` (the databases and
the Redis cache it opens and closes) and ``_reload`` (where a configuration
comes from, and what a reload may not change).
"""

from __future__ import annotations

from ..cache import Cache
from ._facade import CacheResult, RecoveryFallback, RecoveryStrategies, ResourceScope

__all__ = [
    "Cache",
    "CacheResult",
    "RecoveryFallback",
    "RecoveryStrategies",
    "ResourceScope",
]
