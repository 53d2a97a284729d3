"""``RecoveryStrategies``: the facade, the one object a service process holds.

It owns the services' pipelines (`_service`), the read-through caches (reading
through `_reading`), the pools, and the connections of `_resources`, and it
applies a configuration, first or reloaded (`_reload`).  The package's
documentation describes it for users.
"""

from __future__ import annotations

import functools
import inspect
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, TypeVar
from urllib.parse import quote

from .._core import clock
from .._core.backoff import RetryConfig
from .._core.errors import ErrorCategory
from .._core.events import Event, EventBus, emit, global_bus
from .._core.policy import RetryPolicy
from .._core.validate import shown
from ..breaker import CircuitBreaker
from ..budget import RatioBudget, TokenBudget
from ..cache import (
    Cache,
    CacheConfig,
    CacheStats,
    FunctionSource,
    Lookup,
    MemoryCache,
    ReadThroughCache,
)
from ..config import CacheSettings, RecoveryConfig, ServicePolicy
from ..config.schema import ConfigError
from ..database import ManagedPool, SqliteDatabase
from ..network import Router
from ..resource.cleanup import Compensations
from ..resource.pool import Lease, ResourcePool
from ._reading import _READING, _note_cache_failure, _Read
from ._reload import _resolve, _retry_only, _Source, carry_pools, refused_changes
from ._resources import Resources
from ._service import _NEVER_TRIPS, _breaker, _Service

T = TypeVar("T")

#: Services not named in the configuration get a runtime of their own, built
#: from the defaults, up to this many; beyond it they share one (``"other"``),
#: so that names coming from outside cannot grow memory without bound.
MAX_UNNAMED_SERVICES: Final = 1024
#: Read-through caches kept, one per (service, cache, ttl) of the reads; beyond
#: this the oldest is dropped (its next read builds it again, cold).
MAX_READERS: Final = 1024

#: What :meth:`RecoveryStrategies.with_cache_recovery` returns: the value and
#: where it came from (``origin``: ``"cache"``, ``"source"`` or ``"stale"``).
CacheResult = Lookup

_NO_FALLBACK: Any = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryFallback(Event):
    """An answer came from elsewhere than the first choice.

    ``kind``: ``failover`` (an endpoint of a lower priority than the best
    answered), ``source`` (the cache failed and the source answered),
    ``stale`` (the source failed; a value past its ttl was served),
    ``fallback`` (the caller's fallback answered).  ``operation`` names the
    service.
    """

    name: ClassVar[str] = "recovery.fallback"
    area: ClassVar[str] = "fallback"

    kind: str


@dataclass(frozen=True, slots=True)
class ResourceScope:
    """What one attempt of a resource operation gets: its compensations and its lease.

    Register an undo with ``scope.compensations.add(fn, ...)`` after each step;
    on failure they run in reverse order before the attempt is retried.
    ``lease`` holds the pool's units (``None`` when no pool was asked for).
    """

    compensations: Compensations
    lease: Lease[Any] | None


class RecoveryStrategies:
    """The front door of the library for one service process; see the package documentation.

    Build it with [`from_config()`][datapunk_recovery.strategies.RecoveryStrategies.from_config] (or
    from a [`RecoveryConfig`][datapunk_recovery.config.RecoveryConfig]; a
    bare [`RetryConfig`][datapunk_recovery._core.backoff.RetryConfig] or
    [`RetryPolicy`][datapunk_recovery._core.policy.RetryPolicy] becomes the default
    retry policy of every service, as ``RecoveryStrategies(RetryConfig(...))``),
    enter it with ``async with`` to open the databases and the Redis cache it
    was asked for, and call the four ``with_*_recovery`` methods.
    Thread-compatible for reading;
    [`reload()`][datapunk_recovery.strategies.RecoveryStrategies.reload] swaps the whole table of
    services in one assignment.
    """

    __slots__ = (
        "_cache_breakers",
        "_config",
        "_fallbacks",
        "_memory",
        "_pools",
        "_readers",
        "_resources",
        "_retired",
        "_services",
        "_unnamed",
    )

    def __init__(self, config: RecoveryConfig | RetryConfig | RetryPolicy | None = None) -> None:
        # The seed's face: a bare RetryConfig (or RetryPolicy) is the default
        # retry policy of every service, the rest of the defaults unchanged.
        if isinstance(config, RetryConfig | RetryPolicy):
            config = _retry_only(config)
        config = config if config is not None else RecoveryConfig()
        if not isinstance(config, RecoveryConfig):
            raise TypeError(
                "RecoveryStrategies.config: expected a RecoveryConfig, a RetryConfig or a "
                f"RetryPolicy, got {shown(config)}"
            )
        self._config = config
        self._services: dict[str, _Service] = {}
        self._unnamed = 0
        self._fallbacks: Counter[tuple[str, str]] = Counter()
        self._pools: dict[str, ResourcePool[Any]] = {}
        # Pools a reload removed, kept for a reload that brings them back.
        self._retired: dict[str, ResourcePool[Any]] = {}
        self._resources = Resources()
        self._memory = MemoryCache(config.cache.max_stale_entries)
        # (service, id of the cache given or 0, ttl) -> (its read-through cache, the cache given)
        self._readers: dict[tuple[str, int, float | None], tuple[ReadThroughCache[Any], Any]] = {}
        # (service, id of the cache given or 0) -> (the one breaker of reads of that cache,
        # the cache given): reads with different ttls share it, as they share the cache.
        self._cache_breakers: dict[tuple[str, int], tuple[CircuitBreaker, Any]] = {}
        self._apply(config)

    # -- building ----------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        source: _Source = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> RecoveryStrategies:
        """Build from a TOML file path, a parsed table, a `RecoveryConfig`, or nothing.

        A [`RetryConfig`][datapunk_recovery._core.backoff.RetryConfig] or
        [`RetryPolicy`][datapunk_recovery._core.policy.RetryPolicy] alone is the defaults
        with it as every service's retry policy.

        Environment overrides (``DATAPUNK_RECOVERY__...``, from ``environ``,
        default ``os.environ``) apply to files, tables and nothing; a ready
        [`RecoveryConfig`][datapunk_recovery.config.RecoveryConfig] is taken as it is.  Raises
        [`ConfigError`][datapunk_recovery.config.schema.ConfigError] listing every problem.
        """
        return cls(_resolve(source, environ))

    @property
    def config(self) -> RecoveryConfig:
        """The configuration in force."""
        return self._config

    def _apply(self, config: RecoveryConfig) -> None:
        old = self._services
        services: dict[str, _Service] = {}
        for name, policy in config.services.items():
            services[name] = _Service(self._fell_back, name, policy, old.get(name))
        for name, service in old.items():
            # The others (built from the defaults, or dropped from the
            # configuration) stay, re-read from the defaults: their calls in
            # flight go on counting in their bulkhead, budget and breaker.
            if name not in services:
                services[name] = _Service(self._fell_back, name, config.defaults, service)
        # Resized in place: its answers (stale ones served during an outage)
        # and its counters outlive a reload.
        self._memory.resize(config.cache.max_stale_entries)
        pools = carry_pools(config, self._pools, self._retired)
        self._config = config
        self._services = services
        self._pools = pools
        self._readers = {
            key: (self._reader(key[0], given, key[2], reader), given)
            for key, (reader, given) in self._readers.items()
        }

    def reload(
        self,
        source: _Source = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Apply a new configuration while calls run; on any problem, keep the old one.

        Routers, breakers, budgets, bulkheads and pools keep their state and
        take the new thresholds (so do the caches' breakers, and the embedded
        cache keeps its answers through a new size): a budget keeps
        its tokens, a bulkhead its held slots and a pool its held units, so a
        limit in force is never exceeded (a smaller one admits nobody until
        use is below it); calls in flight finish with the retries they
        started with.  Databases and the
        Redis cache cannot change without a restart (they are open
        connections): a change to them is one of the problems reported.
        Raises [`ConfigError`][datapunk_recovery.config.schema.ConfigError] listing every
        problem; nothing changes then.
        """
        config = _resolve(source, environ)
        problems = refused_changes(config, self._config)
        if problems:
            raise ConfigError(problems)
        self._apply(config)

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> RecoveryStrategies:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the databases and the Redis cache of the configuration, connecting to none.

        PostgreSQL pools are created with no connection (``min_size=0``) and the
        Redis client connects on its first command: the first use connects and
        recovers like any call.  On a failure, close those opened first.
        """
        try:
            await self._resources.open(self._config)
        except BaseException as exc:
            # The first failure (or the cancellation) is what the caller must
            # see; a failure to close what was opened only adds a note to it.
            try:
                await self.close()
            except Exception as close_error:
                exc.add_note(f"and closing what was opened failed: {close_error!r}")
            raise

    async def close(self) -> None:
        """Close every database and cache this object opened (each one, even if another fails)."""
        if self._resources.redis is not None:
            self._readers.clear()  # they read through the closed client
            self._cache_breakers.clear()
        await self._resources.close()

    # -- looking up --------------------------------------------------------------

    def _service(self, name: str) -> _Service:
        service = self._services.get(name)
        if service is not None:
            return service
        if self._unnamed >= MAX_UNNAMED_SERVICES:
            name = "other"
            service = self._services.get(name)
            if service is not None:
                return service
        self._unnamed += 1
        service = _Service(self._fell_back, name, self._config.defaults, None)
        self._services = {**self._services, name: service}
        return service

    def policy(self, service: str) -> ServicePolicy:
        """The effective policy of ``service`` (its own, or the defaults)."""
        return self._config.policy(service)

    def breaker(self, service: str, endpoint: str | None = None) -> CircuitBreaker | None:
        """The breaker of ``service`` (of one of its endpoints), or ``None`` if it has none."""
        s = self._service(service)
        if endpoint is None:
            return s.breaker
        if s.router is None:
            return None
        try:
            return s.router.breaker(endpoint)
        except KeyError:
            return None

    def router(self, service: str) -> Router | None:
        """The router of ``service`` over its endpoints, or ``None`` if it has no endpoints."""
        return self._service(service).router

    def budget(self, service: str) -> TokenBudget | RatioBudget | None:
        """The retry budget of ``service``, or ``None`` if it has none."""
        return self._service(service).budget

    def pool(self, name: str) -> ResourcePool[Any]:
        """The resource pool ``name`` of the configuration."""
        try:
            return self._pools[name]
        except KeyError:
            raise KeyError(f"no pool {name!r} in the configuration") from None

    def database(self, name: str) -> SqliteDatabase | ManagedPool:
        """The database ``name`` of the configuration (open once the object is entered)."""
        try:
            return self._resources.databases[name]
        except KeyError:
            known = ", ".join(self._config.databases) or "none"
            raise KeyError(
                f"no open database {name!r} (configured: {known}; enter the object first)"
            ) from None

    def fallbacks(self) -> dict[tuple[str, str], int]:
        """Answers served from elsewhere so far, by ``(service, kind)``."""
        return dict(self._fallbacks)

    def _fell_back(self, service: str, kind: str) -> None:
        self._fallbacks[service, kind] += 1
        if global_bus.active:
            emit(RecoveryFallback(operation=service, at=clock.now(), kind=kind))

    # -- the numbers ---------------------------------------------------------------

    def calculate_backoff(
        self,
        retry_number: int,
        service: str | None = None,
        *,
        category: ErrorCategory | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """The delay, in seconds, before retry ``retry_number`` (1 = the first retry).

        Uses the policy of ``service`` (the defaults when ``None``) and of
        ``category`` when it has its own, with the engine's own rule
        ([`RetryConfig.retry_delay()`][datapunk_recovery._core.backoff.RetryConfig.retry_delay]):
        any
        ``retry_number >= 0`` is
        answered whatever ``max_attempts`` allows (0 means no retry yet and
        gives 0), capped at ``max_delay``.  The decorrelated kinds depend on
        the delays before; they are drawn in order with ``rng``.
        """
        policy = self._config.defaults if service is None else self.policy(service)
        config: RetryConfig = policy.retry
        if category is not None:
            config = policy.categories.get(ErrorCategory(category), config)
        return config.retry_delay(retry_number, rng)

    # -- the four recoveries -------------------------------------------------------

    async def with_network_recovery(
        self,
        service: str,
        call: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        fallback: Any = _NO_FALLBACK,
        **kwargs: Any,
    ) -> T:
        """Call ``service`` through its pipeline: bulkhead, retry + budget, endpoints, breaker.

        With ``endpoints`` in the service's policy, the service's
        [`Router`][datapunk_recovery.network.router.Router] runs ``call(endpoint,
        *args, **kwargs)`` with the [`Endpoint`][datapunk_recovery.network.router.Endpoint]
        it picked (``endpoint.name``, ``endpoint.address``): the best priority
        level whose breaker admits calls, another endpoint of the level than
        the one that just failed, hedged when the service has ``hedge``; when
        every endpoint refuses, the call fails at once with
        [`AllEndpointsDown`][datapunk_recovery.network.router.AllEndpointsDown].  Without
        endpoints, ``call(*args, **kwargs)``.  ``fallback`` (a value, or a
        function of the exception, sync or async) answers when everything
        else failed.
        """
        s = self._service(service)
        try:
            if s.bulkhead is None:
                result: T = await s.run(call, args, kwargs)
                return result
            async with s.bulkhead:
                result = await s.run(call, args, kwargs)
                return result
        except Exception as exc:
            if fallback is _NO_FALLBACK:
                raise
            self._fell_back(s.name, "fallback")  # s.name: bounded, whatever callers send
            answer = fallback(exc) if callable(fallback) else fallback
            if inspect.isawaitable(answer):
                answer = await answer
            return answer  # type: ignore[no-any-return]

    async def with_cache_recovery(
        self,
        key: str,
        source: Callable[[str], Awaitable[T]],
        /,
        *,
        cache: Cache | None = None,
        service: str = "source",
        ttl: float | None = None,
    ) -> CacheResult[T]:
        """Read ``key`` through a read-through cache: the cache, else ``source(key)``, else stale.

        ``cache`` is any [`Cache`][datapunk_recovery.cache.protocols.Cache]
        ([`RedisCache`][datapunk_recovery.cache.redis.RedisCache], ...); ``None`` means the
        facade's own: the Redis of ``cache.redis`` when configured, else an
        embedded in-memory cache.  Reads of ``service`` through one cache
        share a [`ReadThroughCache`][datapunk_recovery.cache.recovering.ReadThroughCache]: the cache
        has a breaker of its own (the ``breaker`` of the policy of
        ``"<service>.cache"``), so a dead cache costs a state check, not a
        timeout, and is never retried; concurrent misses of a key make one
        source load (single-flight).  ``source`` runs through the pipeline of
        ``service``; its value stays fresh ``ttl`` seconds (default:
        ``cache.ttl``) and is kept ``cache.stale_ttl`` more, to be served
        marked stale when the source fails.  Otherwise the source's error
        propagates.
        """
        kept = self._readers.get((service, id(cache) if cache is not None else 0, ttl))
        reader = self._new_reader(service, cache, ttl) if kept is None else kept[0]
        read = _Read(source)
        token = _READING.set(read)
        try:
            answer: CacheResult[T] = await reader.lookup(key)
        finally:
            _READING.reset(token)
        if answer.origin == "stale":
            self._fell_back(self._service(service).name, "stale")
        elif read.cache_failed and answer.origin == "source":
            self._fell_back(self._service(service).name, "source")
        return answer

    def cache_stats(
        self, service: str = "source", *, cache: Cache | None = None, ttl: float | None = None
    ) -> CacheStats | None:
        """The counters of the read-through cache of ``service`` over ``cache``.

        ``None`` before its first read.  ``shared_loads`` counts the reads that
        waited for another read's load (single-flight).
        """
        kept = self._readers.get((service, id(cache) if cache is not None else 0, ttl))
        return None if kept is None else kept[0].stats()

    def _new_reader(
        self, service: str, cache: Cache | None, ttl: float | None
    ) -> ReadThroughCache[Any]:
        readers = self._readers
        if len(readers) >= MAX_READERS:
            del readers[next(iter(readers))]
        reader = self._reader(service, cache, ttl, None)
        readers[service, id(cache) if cache is not None else 0, ttl] = (reader, cache)
        return reader

    def _reader(
        self,
        service: str,
        cache: Cache | None,
        ttl: float | None,
        old: ReadThroughCache[Any] | None,
    ) -> ReadThroughCache[Any]:
        """The read-through cache of ``service`` over ``cache``: ``old`` if it still fits.

        A new one takes over the breaker of ``old``, or else the one other
        reads of ``service`` over ``cache`` (another ``ttl``) use: one cache,
        one breaker (its state, new thresholds).
        """
        settings: CacheSettings = self._config.cache
        store = cache if cache is not None else self._default_cache()
        config = CacheConfig(
            ttl=settings.ttl if ttl is None else ttl,
            stale_for=settings.stale_ttl,
            namespace=f"{settings.namespace}.{quote(service, safe='')}",
            breaker=self.policy(f"{service}.cache").breaker or _NEVER_TRIPS,
        )
        if old is not None and old.config == config and old.cache is store:
            return old
        bus = EventBus()
        bus.subscribe(_note_cache_failure)
        reader: ReadThroughCache[Any] = ReadThroughCache(
            FunctionSource(functools.partial(self._load, service)),
            store,
            config,
            name=service,
            bus=bus,
        )
        key = (service, id(cache) if cache is not None else 0)
        shared = old.breaker if old is not None else None
        if shared is None and (found := self._cache_breakers.get(key)) is not None:
            shared = found[0]  # another ttl's reads of the same cache found it dead or alive
        if shared is not None:
            reader.breaker = _breaker(shared.name, config.breaker, shared)
        breakers = self._cache_breakers
        if key not in breakers and len(breakers) >= MAX_READERS:
            del breakers[next(iter(breakers))]
        breakers[key] = (reader.breaker, cache)
        return reader

    def _default_cache(self) -> Cache:
        redis = self._resources.redis
        if redis is not None:
            return redis
        if self._config.cache.redis is not None:
            raise RuntimeError(
                "the Redis cache of the configuration opens when the object is entered "
                "(async with RecoveryStrategies...)"
            )
        return self._memory

    async def _load(self, service: str, key: str) -> Any:
        """A read-through cache's source: the reading call's own, through ``service``."""
        read = _READING.get()
        if read is None:
            raise LookupError(f"{service!r}: the facade's caches load only within a read")
        return await self.with_network_recovery(service, read.source, key)

    async def with_database_recovery(
        self,
        work: Callable[..., Awaitable[T]] | Callable[[Any], T],
        /,
        *,
        database: str | None = None,
        service: str | None = None,
    ) -> T:
        """Run database ``work`` so that it survives busy databases, deadlocks and lost connections.

        With ``database`` (a name of the configuration), ``work(conn)`` runs
        in a transaction replayed whole on a retryable failure (SQLite busy,
        serialization failure, deadlock, lost connection), with the retry
        policy of the service of the same name; for SQLite ``work`` is a
        plain function run in a worker thread.  The service's breaker guards
        the whole transaction.  Without ``database``, ``work()`` is one
        attempt of an idempotent async operation, retried by the pipeline of
        ``service`` (default ``"database"``).
        """
        if database is None:
            call: Any = work
            return await self.with_network_recovery(service or "database", call)
        db = self.database(database)
        s = self._service(service or database)
        if isinstance(db, SqliteDatabase):
            return await _through(s, s.sqlite(database, db).transaction, work)
        return await _through(s, db.transaction, work, config=s.transaction)

    async def with_resource_recovery(
        self,
        operation: Callable[[ResourceScope], Awaitable[T]],
        /,
        *,
        pool: str | ResourcePool[Any] | None = None,
        units: int = 1,
        caller: str = "default",
        service: str = "resource",
    ) -> T:
        """Run ``operation(scope)`` holding ``units`` of ``pool``, undoing partial work on failure.

        The units are taken once, before the first attempt (waiting at most
        the pool's ``max_wait``; a pool that stays dry raises at once, and
        never trips the service's breaker: it is local pressure, not a
        failing dependency), and given back in every case.  Each attempt runs
        the operation with a fresh
        [`Compensations`][datapunk_recovery.resource.cleanup.Compensations] stack; on
        failure the registered compensations run in reverse order, every one
        of them, before the retry policy of ``service`` decides.
        """
        the_pool = self.pool(pool) if isinstance(pool, str) else pool

        async def attempt(lease: Lease[Any] | None) -> T:
            async with Compensations(service) as compensations:
                return await operation(ResourceScope(compensations, lease))

        if the_pool is None:
            return await self.with_network_recovery(service, attempt, None)
        async with the_pool.acquire(units, caller=caller) as lease:
            return await self.with_network_recovery(service, attempt, lease)


async def _through(
    s: _Service, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any
) -> T:
    """``fn`` (a whole transaction, its replays inside) in the service's bulkhead and breaker."""
    breaker, bulkhead = s.breaker, s.bulkhead
    if bulkhead is not None:
        if breaker is None:
            return await bulkhead.call_async(fn, *args, **kwargs)
        return await bulkhead.call_async(breaker.call_async, fn, *args, **kwargs)
    if breaker is None:
        return await fn(*args, **kwargs)
    return await breaker.call_async(fn, *args, **kwargs)
