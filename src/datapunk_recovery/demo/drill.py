"""The demo's drill: the same scripted traffic and faults, without and with recovery.

A run offers ``rate`` requests per second for ``duration`` seconds to the
mesh of [`mesh`][datapunk_recovery.demo.mesh], open loop (a slow answer does not slow the traffic
down, as with real users).  Requests are of four kinds, one per recovery:

- ``read``: a catalog item, from the cache, else from the database;
- ``api``: a call to the HTTP service (primary endpoint, secondary as spare:
  priority 1, used when the primary's breaker is open);
- ``write``: an order written to the database in a transaction;
- ``job``: work that holds a unit of the worker pool.

Faults come from a [`Timeline`][datapunk_recovery.chaos.Timeline] seeded with the
run's seed, so both runs see the same script: the cache goes down and comes
back, the primary fails and the secondary must take over, the database is
busy and drops connections, the pool runs dry.  Each request has
``request_timeout`` seconds, whatever happens inside.

With a Redis URL and a PostgreSQL DSN the drill runs against those servers
instead of the embedded cache and SQLite: in keys and tables of its own run,
removed at the end.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .. import network
from .._core import clock
from .._core.events import Event, subscribe
from .._core.validate import check_count, check_number, check_seconds, shown
from .._execution import runtime as _runtime
from ..breaker import BreakerStateChanged
from ..cache import Cache, MemoryCache, RedisCache
from ..chaos import Fault, Latency, Timeline, Window
from ..config import build_config
from ..resource.pool import PoolConfig, ResourcePool
from ..strategies import RecoveryStrategies, ResourceScope
from .mesh import (
    KEYS,
    Endpoint,
    FaultyCache,
    PostgresStore,
    SqliteStore,
    Store,
    busy_error,
    http_get,
    serialization_error,
)

__all__ = [
    "FAULTS",
    "DrillSetup",
    "RunResult",
    "RunStatus",
    "demo_config",
    "fault_script",
    "fault_windows",
    "run_drill",
]

#: The kinds of request and their share of the traffic.
MIX: Final = (("read", 0.4), ("api", 0.3), ("write", 0.15), ("job", 0.15))
#: What each fault window does, by target, for the live view and the plot.
FAULTS: Final = {
    "cache": "cache down",
    "primary": "primary failing",
    "database": "database slow, then busy and dropping connections",
    "pool": "pool runs dry",
}
#: Seconds a pool unit is held by a job when nothing slows it down.
_JOB_SECONDS: Final = 0.02
#: Seconds a catalog value stays fresh in the cache (both runs).
CACHE_TTL: Final = 2.0


@dataclass(frozen=True, slots=True)
class DrillSetup:
    """One drill: ``duration`` seconds per run at ``rate`` requests per second.

    ``seed`` makes the traffic and the faults reproducible; every request
    gets at most ``request_timeout`` seconds.
    """

    duration: float = 8.0
    rate: float = 50.0
    seed: int = 7
    request_timeout: float = 2.0

    def __post_init__(self) -> None:
        check_seconds("DrillSetup", "duration", self.duration, positive=True)
        if check_number("DrillSetup", "rate", self.rate) <= 0:
            raise ValueError(f"DrillSetup.rate: must be > 0, got {shown(self.rate)}")
        check_count("DrillSetup", "seed", self.seed, minimum=0)
        check_seconds("DrillSetup", "request_timeout", self.request_timeout, positive=True)


@dataclass(frozen=True, slots=True)
class RunStatus:
    """What the live view shows during a run."""

    label: str
    elapsed: float
    duration: float
    done: int
    succeeded: int
    faults: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RunResult:
    """The figures of one run.

    ``latencies`` are seconds from a request's start to its answer or error;
    ``outcomes`` are ``(start offset in seconds, succeeded)`` per request;
    ``calls`` counts the calls that reached each dependency; ``transitions``
    lists breaker state changes as ``(offset, breaker, from, to)``;
    ``fallbacks`` counts answers served from elsewhere, by kind;
    ``shared_loads`` the reads that waited for another read's load of the
    same key instead of loading it again (single-flight).
    """

    label: str
    recovery: bool
    latencies: tuple[float, ...]
    outcomes: tuple[tuple[float, bool], ...]
    by_kind: Mapping[str, tuple[int, int]]
    calls: Mapping[str, int]
    transitions: tuple[tuple[float, str, str, str], ...]
    fallbacks: Mapping[str, int]
    faults: int
    duration: float = field(default=0.0)
    shared_loads: int = 0

    @property
    def requests(self) -> int:
        """Requests offered."""
        return len(self.outcomes)

    @property
    def successes(self) -> int:
        """Requests answered correctly within their time."""
        return sum(1 for _, ok in self.outcomes if ok)

    @property
    def success_rate(self) -> float:
        """Successes over requests (1.0 for no request)."""
        return self.successes / self.requests if self.requests else 1.0

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the latencies, in seconds (nearest rank)."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1]


def fault_script(
    duration: float, busy: Callable[[], Exception] = busy_error
) -> tuple[tuple[Window, str], ...]:
    """The fault script of a run of ``duration`` seconds: each window, and what it does in words.

    Windows open and close at fixed fractions of the run (so a shorter run
    sees the same script, faster); ``busy`` makes the database's "too busy"
    error (SQLite's by default).
    """

    def at(fraction: float) -> float:
        return round(duration * fraction, 3)

    return (
        (
            Window(at(0.10), at(0.30), Fault(ConnectionRefusedError), target="cache"),
            "the cache refuses every connection",
        ),
        (
            Window(at(0.10), at(0.30), Latency(0.05), target="database"),
            "the database is slow (50 ms a transaction)",
        ),
        (
            Window(at(0.30), at(0.65), Fault(ConnectionAbortedError), target="primary"),
            "the primary answers 503 to everything",
        ),
        (
            Window(at(0.35), at(0.65), Fault(busy), rate=0.5, target="database"),
            "the database is busy",
        ),
        (
            Window(at(0.45), at(0.60), Fault(ConnectionResetError), rate=0.15, target="database"),
            "the database drops connections",
        ),
        (
            Window(at(0.70), at(0.90), Latency(0.3), rate=0.8, target="pool"),
            "jobs slow down (0.3 s): the pool runs dry",
        ),
    )


def fault_windows(
    duration: float, busy: Callable[[], Exception] = busy_error
) -> tuple[Window, ...]:
    """The windows of `fault_script()`, for a `Timeline`."""
    return tuple(window for window, _ in fault_script(duration, busy))


def demo_config(
    database: Mapping[str, str], addresses: Mapping[str, str], namespace: str = "dp"
) -> dict[str, Any]:
    """The embedded defaults of the demo, as a configuration table (see
    [docs/demo.md](https://datapunk.github.io/datapunk-recovery/demo/)).

    ``database`` is the table of the orders database (``sqlite`` or
    ``postgres``), ``addresses`` the endpoints' ``host:port``, ``namespace``
    the prefix of the cache keys.  Delays are short because the drill is: a
    real service would keep the library's defaults (100 ms base, 10 s cap,
    breaker open 1 s).
    """
    return {
        "defaults": {
            "retry": {
                "max_attempts": 3,
                "base_delay": "25ms",
                "max_delay": "250ms",
                "deadline": "1.5s",
            },
            "breaker": {"consecutive_failures": 5, "open_duration": "1s"},
            "budget": {},
            "attempt_timeout": "500ms",
        },
        "services": {
            "api": {"endpoints": ["primary", "secondary"], "addresses": dict(addresses)},
            "orders": {"retry": {"max_attempts": 8, "base_delay": "10ms", "max_delay": "200ms"}},
            # Catalog reads have a cache to fall back on: a stale value beats hammering
            # a busy database.
            "catalog": {"retry": {"max_attempts": 2}},
            "jobs": {"retry": {"max_attempts": 2}},
        },
        "cache": {"ttl": CACHE_TTL, "stale_ttl": "5m", "namespace": namespace},
        "pools": {"workers": {"capacity": 3, "max_wait": 0.6}},
        "databases": {"orders": dict(database)},
    }


def _plan(setup: DrillSetup) -> list[tuple[float, str, str]]:
    rng = random.Random(setup.seed)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    count = int(setup.duration * setup.rate)
    # Keys follow a skewed popularity, as real catalogs do: the cache matters.
    return [
        (
            i / setup.rate,
            rng.choices(kinds, weights)[0],
            f"item-{min(KEYS - 1, int(rng.paretovariate(1.2)) - 1)}",
        )
        for i in range(count)
    ]


class _Mesh:
    """The dependencies of one run, and how a request of each kind reaches them."""

    def __init__(
        self, folder: str, timeline: Timeline, redis_url: str | None, postgres_dsn: str | None
    ) -> None:
        #: The prefix of this run's keys in the cache (a shared Redis outlives the run).
        self.namespace = f"datapunk-demo-{uuid.uuid4().hex[:12]}"
        self.redis = None if redis_url is None else RedisCache.from_url(redis_url)
        inner: Cache = self.redis if self.redis is not None else MemoryCache()
        self.cache = FaultyCache(inner, timeline.injector("cache"))
        self.primary = Endpoint("primary", timeline.injector("primary"))
        self.secondary = Endpoint("secondary", timeline.injector("secondary"))
        database = timeline.injector("database")
        self.store: Store = (
            SqliteStore(folder, database)
            if postgres_dsn is None
            else PostgresStore(postgres_dsn, database)
        )
        self.work = timeline.injector("pool")
        self.plain_pool: ResourcePool[Any] = ResourcePool(
            "workers", PoolConfig(capacity=3, max_wait=0.0, max_waiting=0)
        )

    def config(self) -> dict[str, Any]:
        addresses = {e.name: e.address for e in (self.primary, self.secondary)}
        return demo_config(self.store.settings, addresses, self.namespace)

    async def start(self) -> None:
        await self.primary.start()
        await self.secondary.start()
        await self.store.create()

    async def stop(self) -> None:
        await self.primary.stop()
        await self.secondary.stop()
        try:
            await self.store.drop()
        finally:
            if self.redis is not None:
                try:
                    client = self.redis.client
                    keys = [k async for k in client.scan_iter(match=f"{self.namespace}*")]
                    if keys:
                        await client.delete(*keys)
                finally:
                    await self.redis.close()

    async def hold(self) -> None:
        await _runtime.sleep_async(_JOB_SECONDS)

    # -- without recovery: one attempt, the first choice, no fallback ----------------

    async def plain(self, kind: str, key: str) -> None:
        if kind == "read":
            cached = f"{self.namespace}:{key}"
            value = await self.cache.get(cached)
            if value is None:
                value = await self.store.read(key)
                await self.cache.set(cached, value, CACHE_TTL)
        elif kind == "api":
            await http_get("primary", self.primary.address, f"/item/{key}")
        elif kind == "write":
            await self.store.write(key)
        else:
            async with self.plain_pool.acquire():
                await self.work.call_async(self.hold)

    # -- with recovery: the four recoveries of RecoveryStrategies ----------------------

    async def recovered(self, recovery: RecoveryStrategies, kind: str, key: str) -> None:
        if kind == "read":
            await recovery.with_cache_recovery(
                key, self.store.read, cache=self.cache, service="catalog"
            )
        elif kind == "api":
            await recovery.with_network_recovery("api", _get, f"/item/{key}")
        elif kind == "write":
            await recovery.with_database_recovery(self.store.order(key), database="orders")
        else:
            await recovery.with_resource_recovery(self._job, pool="workers", service="jobs")

    async def _job(self, scope: ResourceScope) -> None:
        await self.work.call_async(self.hold)

    def calls(self, pool: ResourcePool[Any]) -> dict[str, int]:
        stats = pool.stats()
        return {
            "cache": self.cache.calls,
            "primary": self.primary.requests,
            "secondary": self.secondary.requests,
            "database": self.store.calls,
            "pool": stats.acquired + stats.timeouts + stats.rejected + stats.quota_refused,
        }


async def _get(endpoint: network.Endpoint, path: str) -> bytes:
    return await http_get(endpoint.name, endpoint.address, path)


async def run_drill(
    setup: DrillSetup,
    *,
    recovery: bool,
    on_status: Callable[[RunStatus], None] | None = None,
    status_every: float = 0.25,
    redis_url: str | None = None,
    postgres_dsn: str | None = None,
) -> RunResult:
    """Run the drill once, without or with the recovery strategies; asyncio only.

    ``on_status`` is called about every ``status_every`` seconds with the
    figures so far (the live view).  ``redis_url`` / ``postgres_dsn``: drill
    against those servers instead of the embedded cache / SQLite.
    """
    label = "with recovery" if recovery else "without recovery"
    busy = busy_error if postgres_dsn is None else serialization_error
    with tempfile.TemporaryDirectory(prefix="datapunk-demo-") as folder:
        timeline = Timeline(fault_windows(setup.duration, busy), seed=setup.seed, name="demo")
        mesh = _Mesh(folder, timeline, redis_url, postgres_dsn)
        transitions: list[tuple[float, str, str, str]] = []
        outcomes: list[tuple[float, str, bool, float]] = []
        origin = clock.now()

        def watch(event: Event) -> None:
            if isinstance(event, BreakerStateChanged):
                transitions.append(
                    (
                        event.at - origin,
                        event.operation,
                        event.from_state.value,
                        event.to_state.value,
                    )
                )

        async def one(at: float, kind: str, key: str) -> bool:
            start = clock.now()
            ok = False
            try:
                async with _runtime.CancelAfter(setup.request_timeout) as bound:
                    if strategies is None:
                        await mesh.plain(kind, key)
                    else:
                        await mesh.recovered(strategies, kind, key)
                ok = not bound.expired
            except Exception:
                ok = False
            outcomes.append((at, kind, ok, clock.now() - start))
            return True  # finished (``None`` from the group means "none yet")

        unsubscribe = subscribe(watch)
        strategies: RecoveryStrategies | None = None
        try:
            await mesh.start()
            if recovery:
                strategies = RecoveryStrategies(build_config(mesh.config(), source="demo defaults"))
            async with contextlib.AsyncExitStack() as stack:
                if strategies is not None:
                    await stack.enter_async_context(strategies)
                origin = clock.now()
                timeline.start()
                t0 = clock.now()
                running = 0
                next_status = 0.0
                async with _runtime.race_group() as requests:
                    for at, kind, key in _plan(setup):
                        delay = t0 + at - clock.now()
                        if delay > 0:
                            await _runtime.sleep_async(delay)
                        requests.start(one, at, kind, key)
                        running += 1
                        while running and requests.next_nowait() is not None:
                            running -= 1
                        if on_status is not None and at >= next_status:
                            next_status = at + status_every
                            on_status(_status(label, setup, at, outcomes, timeline))
                    while running:
                        tick = clock.now() + status_every
                        while running and await requests.next(max(tick - clock.now(), 0.0)):
                            running -= 1
                        if on_status is not None:
                            on_status(_status(label, setup, setup.duration, outcomes, timeline))
                timeline.stop()
                pool = strategies.pool("workers") if strategies is not None else mesh.plain_pool
                calls = mesh.calls(pool)
                fallbacks: dict[str, int] = {}
                shared = 0
                if strategies is not None:
                    for (_, kind), count in strategies.fallbacks().items():
                        fallbacks[kind] = fallbacks.get(kind, 0) + count
                    stats = strategies.cache_stats("catalog", cache=mesh.cache)
                    shared = 0 if stats is None else stats.shared_loads
        finally:
            unsubscribe()
            await mesh.stop()
        faults = sum(
            inj.statistics().injected
            for inj in (mesh.cache.injector, mesh.primary.injector, mesh.store.injector, mesh.work)
        )
        by_kind: dict[str, tuple[int, int]] = {}
        for _, kind, ok, _ in outcomes:
            good, total = by_kind.get(kind, (0, 0))
            by_kind[kind] = (good + ok, total + 1)
        return RunResult(
            label=label,
            recovery=recovery,
            latencies=tuple(o[3] for o in outcomes),
            outcomes=tuple(sorted((o[0], o[2]) for o in outcomes)),
            by_kind=by_kind,
            calls=calls,
            transitions=tuple(transitions),
            fallbacks=fallbacks,
            faults=faults,
            duration=setup.duration,
            shared_loads=shared,
        )


def _status(
    label: str,
    setup: DrillSetup,
    elapsed: float,
    outcomes: list[tuple[float, str, bool, float]],
    timeline: Timeline,
) -> RunStatus:
    targets = {w.target for w in timeline.active() if w.target is not None}
    return RunStatus(
        label=label,
        elapsed=min(elapsed, setup.duration),
        duration=setup.duration,
        done=len(outcomes),
        succeeded=sum(1 for o in outcomes if o[2]),
        faults=tuple(FAULTS[t] for t in FAULTS if t in targets),
    )
