"""``RecoveryStrategies``: one object, built from configuration, for the four recoveries.

A service holds one :class:`RecoveryStrategies` for its whole life::

    async with RecoveryStrategies.from_config("recovery.toml") as recovery:
        order = await recovery.with_network_recovery("orders", fetch_order, order_id)
        user = await recovery.with_cache_recovery(f"user:{uid}", load_user, cache=cache)
        await recovery.with_database_recovery(write_ledger, database="ledger")
        await recovery.with_resource_recovery(run_model, pool="gpu")

It owns, per service, the retry policy (per error category too), the circuit
breaker (one per endpoint when a service has several), the retry budget and
the bulkhead that the configuration asks for (:mod:`datapunk_recovery.config`),
and the pools and databases it was asked to create: it opens them on entry
and closes them on exit, even after failures.

What a call goes through, outermost first: fallback, bulkhead, retry (asking
the budget before every retry), endpoint choice, breaker, attempt timeout,
the call.  Each service's pipeline is compiled once, when the configuration
is applied, so a call pays one dictionary lookup to find it.

:meth:`RecoveryStrategies.reload` applies a new configuration while calls
run: callers keep their handle, breakers and budgets of services that stay
keep their state and take the new thresholds, and a bad configuration is
rejected with every problem listed while the old one keeps running.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import os
import random
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Generic, Literal, Protocol, TypeVar

from . import clock
from .backoff import RetryConfig
from .breaker import BreakerConfig, BreakerState, CircuitBreaker
from .budget import TokenBudget, TokenBudgetConfig
from .bulkhead import Bulkhead
from .config import (
    DatabaseSettings,
    RecoveryConfig,
    ServicePolicy,
    build_config,
    load_config,
)
from .database import ManagedPool, SqliteConfig, SqliteDatabase, TransactionConfig
from .database.pool import PoolConfig as DbPoolConfig
from .engine import retry
from .errors import CircuitOpenError, ErrorCategory
from .events import Event, emit, global_bus
from .policy import RetryPolicy
from .resource.cleanup import Compensations
from .resource.pool import Lease, ResourcePool
from .schema import ConfigError, Problem, env_overrides, merge
from .timeout import AttemptTimeout

__all__ = [
    "Cache",
    "CacheResult",
    "RecoveryFallback",
    "RecoveryStrategies",
    "ResourceScope",
]

T = TypeVar("T")

#: Services not named in the configuration get a runtime of their own, built
#: from the defaults, up to this many; beyond it they share one (``"other"``),
#: so that names coming from outside cannot grow memory without bound.
MAX_UNNAMED_SERVICES: Final = 1024

_NO_FALLBACK: Any = object()
_OPEN: Final = frozenset({BreakerState.OPEN, BreakerState.FORCED_OPEN})


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryFallback(Event):
    """An answer came from elsewhere than the first choice.

    ``kind``: ``failover`` (a lower-priority endpoint answered), ``source``
    (the cache failed and the source answered), ``stale`` (cache and source
    failed; the last good value was served), ``fallback`` (the caller's
    fallback answered).  ``operation`` names the service.
    """

    name: ClassVar[str] = "recovery.fallback"
    area: ClassVar[str] = "fallback"

    kind: str


class Cache(Protocol):
    """What :meth:`RecoveryStrategies.with_cache_recovery` needs of a cache.

    ``get`` returns ``None`` for a miss; ``set`` keeps ``value`` for ``ttl``
    seconds.  Both may raise when the cache is down: the recovery reads the
    source instead.
    """

    async def get(self, key: str) -> Any: ...

    async def set(self, key: str, value: Any, ttl: float) -> None: ...


@dataclass(frozen=True, slots=True)
class CacheResult(Generic[T]):
    """A value read with cache recovery, and where it came from.

    ``origin``: ``"cache"``, ``"source"`` or ``"stale"`` (both failed; the
    last good value, ``age`` seconds old, was served instead).
    """

    value: T
    origin: Literal["cache", "source", "stale"]
    age: float = 0.0

    @property
    def stale(self) -> bool:
        """Whether the value is a stale copy served because the source failed."""
        return self.origin == "stale"


@dataclass(frozen=True, slots=True)
class ResourceScope:
    """What one attempt of a resource operation gets: its compensations and its lease.

    Register an undo with ``scope.compensations.add(fn, ...)`` after each step;
    on failure they run in reverse order before the attempt is retried.
    ``lease`` holds the pool's units (``None`` when no pool was asked for).
    """

    compensations: Compensations
    lease: Lease[Any] | None


class _Route:
    """Per call: the endpoint that failed last, so that a retry goes elsewhere."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed: str | None = None


class _Service:
    """The compiled pipeline of one service: built on (re)configuration, read per call."""

    __slots__ = (
        "breaker",
        "breakers",
        "budget",
        "bulkhead",
        "endpoints",
        "name",
        "owner",
        "policy",
        "run",
        "timeout",
    )

    def __init__(
        self,
        owner: RecoveryStrategies,
        name: str,
        policy: ServicePolicy,
        previous: _Service | None,
    ) -> None:
        self.owner = owner
        self.name = name
        self.policy = policy
        self.endpoints = policy.endpoints
        kept = previous.breakers if previous is not None else {}
        # One breaker per endpoint, or one for the whole service ("" key).
        self.breakers: dict[str, CircuitBreaker] = {}
        if policy.breaker is not None:
            for endpoint in self.endpoints or ("",):
                self.breakers[endpoint] = _breaker(
                    f"{name}:{endpoint}" if endpoint else name, policy.breaker, kept.get(endpoint)
                )
        self.breaker = self.breakers.get("")
        self.budget: TokenBudget | None = _budget(
            name, policy.budget, previous.budget if previous else None
        )
        old_bulkhead = previous.bulkhead if previous is not None else None
        self.bulkhead: Bulkhead | None
        if policy.bulkhead is None:
            self.bulkhead = None
        elif old_bulkhead is not None and old_bulkhead.config == policy.bulkhead:
            self.bulkhead = old_bulkhead
        else:
            self.bulkhead = Bulkhead(name, policy.bulkhead)
        self.timeout = (
            None
            if policy.attempt_timeout is None
            else AttemptTimeout(policy.attempt_timeout, name=name)
        )
        self.run = retry(
            RetryPolicy(policy.retry, policy.categories), budget=self.budget, name=name
        )(self.attempt)

    async def attempt(
        self,
        call: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        route: _Route,
    ) -> T:
        """One attempt: choose the endpoint, then breaker, timeout, call."""
        if not self.endpoints:
            return await self.guarded(self.breaker, call, args, kwargs)
        endpoint = self.choose(route)
        if endpoint != self.endpoints[0]:
            self.owner._fell_back(self.name, "failover")
        try:
            return await self.guarded(self.breakers.get(endpoint), call, (endpoint, *args), kwargs)
        except Exception:
            route.failed = endpoint
            raise

    async def guarded(
        self,
        breaker: CircuitBreaker | None,
        call: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        timeout = self.timeout
        if breaker is None:
            if timeout is None:
                return await call(*args, **kwargs)
            return await timeout.call_async(call, *args, **kwargs)
        if timeout is None:
            return await breaker.call_async(call, *args, **kwargs)
        return await breaker.call_async(timeout.call_async, call, *args, **kwargs)

    def choose(self, route: _Route) -> str:
        """The best-priority endpoint whose breaker admits calls, avoiding the last failed one."""
        breakers = self.breakers
        spare: str | None = None
        for endpoint in self.endpoints:
            breaker = breakers.get(endpoint)
            if breaker is not None and breaker.state in _OPEN:
                continue
            if endpoint != route.failed:
                return endpoint
            spare = endpoint
        if spare is not None:
            return spare
        waits = [b.retry_after() for b in breakers.values()]
        raise CircuitOpenError(
            f"{self.name} (every endpoint: {', '.join(self.endpoints)})",
            min(waits) if waits else 0.0,
        )


def _breaker(name: str, config: BreakerConfig, old: CircuitBreaker | None) -> CircuitBreaker:
    if old is None:
        return CircuitBreaker(name, config)
    if old.config != config:
        old.reconfigure(config)  # keeps its state, takes the new thresholds
    return old


def _budget(
    name: str, config: TokenBudgetConfig | None, old: TokenBudget | None
) -> TokenBudget | None:
    if config is None:
        return None
    if old is not None and old.config == config:
        return old
    budget = TokenBudget(name, config)
    if old is not None:
        # Carry the fill over through the public interface: a failure costs
        # exactly one token, so the new bucket ends within one token of the
        # old level (never above it).
        for _ in range(math.ceil(max(budget.tokens - old.tokens, 0.0))):
            budget.on_attempt(False)
    return budget


class RecoveryStrategies:
    """The front door of the library for one service process; see the module documentation.

    Build it with :meth:`from_config` (or from a :class:`RecoveryConfig`),
    enter it with ``async with`` to open the databases it was asked for, and
    call the four ``with_*_recovery`` methods.  Thread-compatible for reading;
    :meth:`reload` swaps the whole table of services in one assignment.
    """

    __slots__ = (
        "_config",
        "_databases",
        "_fallbacks",
        "_pools",
        "_services",
        "_stale",
        "_unnamed",
    )

    def __init__(self, config: RecoveryConfig | None = None) -> None:
        config = config if config is not None else RecoveryConfig()
        if not isinstance(config, RecoveryConfig):
            raise TypeError(f"RecoveryStrategies.config: expected a RecoveryConfig, got {config!r}")
        self._config = config
        self._services: dict[str, _Service] = {}
        self._unnamed = 0
        self._fallbacks: Counter[tuple[str, str]] = Counter()
        # key -> (value, when it was read): last good values for stale answers.
        self._stale: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self._pools: dict[str, ResourcePool[Any]] = {}
        self._databases: dict[str, SqliteDatabase | ManagedPool] = {}
        self._apply(config)

    # -- building ----------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        source: RecoveryConfig | Mapping[str, Any] | str | Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> RecoveryStrategies:
        """Build from a TOML file path, a parsed table, a :class:`RecoveryConfig`, or nothing.

        Environment overrides (``DATAPUNK_RECOVERY__...``, from ``environ``,
        default ``os.environ``) apply to files, tables and nothing; a ready
        :class:`RecoveryConfig` is taken as it is.  Raises
        :class:`~datapunk_recovery.schema.ConfigError` listing every problem.
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
            services[name] = _Service(self, name, policy, old.get(name))
        for name, service in old.items():  # services built from the defaults stay, re-read
            if name not in services and name not in self._config.services:
                services[name] = _Service(self, name, config.defaults, service)
        pools = dict(self._pools)
        for name, pool_config in config.pools.items():
            current = pools.get(name)
            if current is None or current.config != pool_config:
                pools[name] = ResourcePool(name, pool_config)
        for name in list(pools):
            if name not in config.pools:
                del pools[name]
        self._config = config
        self._services = services
        self._pools = pools

    def reload(
        self,
        source: RecoveryConfig | Mapping[str, Any] | str | Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Apply a new configuration while calls run; on any problem, keep the old one.

        Breakers and budgets of services that stay keep their state and take
        the new thresholds; calls in flight finish with the pipeline they
        started with.  Databases cannot change without a restart (they are
        open connections): a change to them is one of the problems reported.
        Raises :class:`~datapunk_recovery.schema.ConfigError` listing every
        problem; nothing changes then.
        """
        config = _resolve(source, environ)
        if dict(config.databases) != dict(self._config.databases):
            raise ConfigError(
                [
                    Problem(
                        "reload",
                        "databases",
                        "databases cannot change while running; restart to change them",
                    )
                ]
            )
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
        """Open the databases of the configuration; on a failure, close those opened first."""
        try:
            for name, settings in self._config.databases.items():
                if name not in self._databases:
                    self._databases[name] = await self._open_database(name, settings)
        except BaseException:
            await self.close()
            raise

    async def _open_database(
        self, name: str, settings: DatabaseSettings
    ) -> SqliteDatabase | ManagedPool:
        retry_policy = self._retry_policy(name)
        if settings.sqlite is not None:
            return SqliteDatabase(settings.sqlite, SqliteConfig(retry=retry_policy))
        assert settings.postgres is not None
        return await ManagedPool.create_asyncpg(
            settings.postgres, DbPoolConfig(name=name), min_size=1, max_size=settings.max_size
        )

    async def close(self) -> None:
        """Close every database this object opened (each one, even if another fails)."""
        databases, self._databases = self._databases, {}
        errors: list[Exception] = []
        for database in databases.values():
            if isinstance(database, ManagedPool):
                try:
                    await database.close()
                except Exception as exc:
                    errors.append(exc)
        if errors:
            raise ExceptionGroup("RecoveryStrategies.close: some databases failed to close", errors)

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
        service = _Service(self, name, self._config.defaults, None)
        self._services = {**self._services, name: service}
        return service

    def policy(self, service: str) -> ServicePolicy:
        """The effective policy of ``service`` (its own, or the defaults)."""
        return self._config.policy(service)

    def _retry_policy(self, service: str) -> RetryPolicy:
        policy = self.policy(service)
        return RetryPolicy(policy.retry, policy.categories)

    def breaker(self, service: str, endpoint: str | None = None) -> CircuitBreaker | None:
        """The breaker of ``service`` (of one of its endpoints), or ``None`` if it has none."""
        return self._service(service).breakers.get(endpoint or "")

    def budget(self, service: str) -> TokenBudget | None:
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
            return self._databases[name]
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
        if global_bus._subscribers:
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
        ``category`` when it has its own.  The decorrelated kinds depend on
        the delays before; they are drawn in order with ``rng``.
        """
        if isinstance(retry_number, bool) or not isinstance(retry_number, int):
            raise TypeError(f"calculate_backoff: retry_number must be an int, got {retry_number!r}")
        if retry_number < 1:
            raise ValueError(f"calculate_backoff: retry_number must be >= 1, got {retry_number!r}")
        policy = self._config.defaults if service is None else self.policy(service)
        config: RetryConfig = policy.retry
        if category is not None:
            config = policy.categories.get(ErrorCategory(category), config)
        if config.max_attempts is not None and retry_number >= config.max_attempts:
            raise ValueError(
                f"calculate_backoff: retry {retry_number} never happens with "
                f"max_attempts={config.max_attempts}"
            )
        if not config.stateful:
            return config.compute_delay(retry_number, rng)
        return next(itertools.islice(config.delays(rng), retry_number - 1, None))

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

        With ``endpoints`` in the service's policy, ``call(endpoint, *args,
        **kwargs)`` receives the endpoint's name: the best-priority endpoint
        whose breaker admits calls, never the one that just failed when
        another is available.  Without, ``call(*args, **kwargs)``.
        ``fallback`` (a value, or a function of the exception, sync or async)
        answers when everything else failed.
        """
        s = self._service(service)
        try:
            if s.bulkhead is None:
                result: T = await s.run(call, args, kwargs, _Route())
                return result
            async with s.bulkhead:
                result = await s.run(call, args, kwargs, _Route())
                return result
        except Exception as exc:
            if fallback is _NO_FALLBACK:
                raise
            self._fell_back(service, "fallback")
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
        """Read ``key``: from ``cache``, else from ``source(key)``, else the last good value.

        The cache has a breaker of its own (``"<service>.cache"``): a dead
        cache costs one state check per read, not a timeout, and is never
        retried (the source is right there).  ``source`` runs through the
        pipeline of ``service``.  A value read from the source is written
        back to the cache for ``ttl`` seconds (default: ``cache.ttl`` of the
        configuration) and kept as the last good value; when the source fails
        too, that value is served for ``cache.stale_ttl`` seconds more,
        marked stale.  Otherwise the source's error propagates.
        """
        settings = self._config.cache
        guard = self._cache_guard(service)
        cache_failed = False
        if cache is not None:
            if guard is None or guard.state not in _OPEN:
                try:
                    hit = await _through(guard, cache.get, key)
                except Exception:
                    cache_failed = True
                else:
                    if hit is not None:
                        return CacheResult(hit, "cache")
            else:
                cache_failed = True
        try:
            value = await self.with_network_recovery(service, source, key)
        except Exception:
            kept = self._stale.get(key)
            if kept is not None:
                age = clock.now() - kept[1]
                if age <= settings.ttl + settings.stale_ttl:
                    self._fell_back(service, "stale")
                    return CacheResult(kept[0], "stale", age)
            raise
        self._remember(key, value)
        if cache_failed:
            self._fell_back(service, "source")
        elif cache is not None:
            # The value is served anyway; the cache's breaker counts the failure.
            with contextlib.suppress(Exception):
                await _through(guard, cache.set, key, value, settings.ttl if ttl is None else ttl)
        return CacheResult(value, "source")

    def _cache_guard(self, service: str) -> CircuitBreaker | None:
        s = self._service(f"{service}.cache")
        return s.breaker

    def _remember(self, key: str, value: Any) -> None:
        stale = self._stale
        stale[key] = (value, clock.now())
        stale.move_to_end(key)
        while len(stale) > self._config.cache.max_stale_entries:
            stale.popitem(last=False)

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
            return await _through(s.breaker, db.transaction, work)
        return await _through(s.breaker, db.transaction, work, config=_transaction_config(s.policy))

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
        :class:`~datapunk_recovery.resource.cleanup.Compensations` stack; on
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
    breaker: CircuitBreaker | None, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any
) -> T:
    if breaker is None:
        return await fn(*args, **kwargs)
    return await breaker.call_async(fn, *args, **kwargs)


def _transaction_config(policy: ServicePolicy) -> TransactionConfig:
    return TransactionConfig(retry=RetryPolicy(policy.retry, policy.categories))


def _resolve(
    source: RecoveryConfig | Mapping[str, Any] | str | Path | None,
    environ: Mapping[str, str] | None,
) -> RecoveryConfig:
    if isinstance(source, RecoveryConfig):
        return source
    if source is None or isinstance(source, str | Path):
        return load_config(source, environ=environ)
    if isinstance(source, Mapping):
        overrides = env_overrides(os.environ if environ is None else environ)
        return build_config(merge(source, overrides), source="configuration")
    raise TypeError(
        f"RecoveryStrategies.from_config: expected a path, a table or a RecoveryConfig, "
        f"got {source!r}"
    )
