"""One service's compiled pipeline: its breaker or router, budget, bulkhead and timeout.

Built when a configuration is applied and read on every call, so a call pays
one dictionary lookup to find its pipeline.  A reload builds a new pipeline
from the previous one, re-configuring the live limits in place (tokens, held
slots and breaker states go on counting).  The pipeline tells its owner about
answers served from elsewhere through its ``on_fallback`` callback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from .._core.policy import RetryPolicy
from .._execution.engine import retry
from .._execution.timeout import AttemptTimeout
from ..breaker import BreakerConfig, CircuitBreaker
from ..budget import RatioBudget, RatioBudgetConfig, TokenBudget, TokenBudgetConfig
from ..config import ServicePolicy
from ..database import SqliteDatabase, TransactionConfig
from ..flow.bulkhead import Bulkhead, BulkheadConfig
from ..network import Endpoint, Router, RouterConfig

T = TypeVar("T")

# A service configured with `breaker = "none"` still needs breakers to route
# over its endpoints: these never trip.
_NEVER_TRIPS: Final = BreakerConfig(consecutive_failures=None)

_Attempt = Callable[
    [Callable[..., Awaitable[Any]], tuple[Any, ...], dict[str, Any]], Awaitable[Any]
]


class _Service:
    """The compiled pipeline of one service: built on (re)configuration, read per call."""

    __slots__ = (
        "breaker",
        "budget",
        "bulkhead",
        "databases",
        "kept",
        "name",
        "on_fallback",
        "policy",
        "router",
        "run",
        "timeout",
        "top",
        "transaction",
    )

    def __init__(
        self,
        on_fallback: Callable[[str, str], None],
        name: str,
        policy: ServicePolicy,
        previous: _Service | None,
    ) -> None:
        #: Told ``(service, kind)`` when an answer came from elsewhere (a
        #: failover endpoint): the owner counts it, the service needs no owner.
        self.on_fallback = on_fallback
        self.name = name
        self.policy = policy
        # A reload keeps the live limits: the budget, the bulkhead, the
        # breaker and the router (its endpoints' breakers) of the previous
        # pipeline are re-configured in place (tokens, held slots, an open or
        # forced state go on counting), and one the new policy drops is kept
        # aside, so that a later reload restoring it finds it as it was.
        kept_budget, kept_bulkhead, kept_breaker, kept_router = (
            previous.kept if previous is not None else (None, None, None, None)
        )
        self.budget: TokenBudget | RatioBudget | None = _budget(name, policy.budget, kept_budget)
        self.bulkhead: Bulkhead | None = _bulkhead(name, policy.bulkhead, kept_bulkhead)
        self.timeout = (
            None
            if policy.attempt_timeout is None
            else AttemptTimeout(policy.attempt_timeout, name=name)
        )
        retry_policy = RetryPolicy(policy.retry, policy.categories)
        #: How this service's database transactions are replayed (built once
        #: per configuration, so that a reload changes them too).
        self.transaction = TransactionConfig(retry=retry_policy, budget=self.budget)
        #: The SQLite databases of the configuration, replaying with this
        #: service's retry policy (made on first use).
        self.databases: dict[str, SqliteDatabase] = {}
        self.breaker: CircuitBreaker | None = None
        self.router: Router | None = None
        self.run: _Attempt
        if policy.endpoints:
            same_budget = (
                previous is not None
                and previous.router is not None
                and previous.budget is self.budget
            )
            self.router = self._route(retry_policy, kept_router, same_budget)
            self.top = self.router.endpoints[0].priority
            self.run = self.routed
        else:
            if policy.breaker is not None:
                self.breaker = _breaker(name, policy.breaker, kept_breaker)
            self.top = 0
            self.run = retry(retry_policy, budget=self.budget, name=name)(self.attempt)
        self.kept: tuple[
            TokenBudget | RatioBudget | None, Bulkhead | None, CircuitBreaker | None, Router | None
        ]
        self.kept = (
            kept_budget if self.budget is None else self.budget,
            kept_bulkhead if self.bulkhead is None else self.bulkhead,
            kept_breaker if self.breaker is None else self.breaker,
            kept_router if self.router is None else self.router,
        )

    def _route(self, retry_policy: RetryPolicy, router: Router | None, same_budget: bool) -> Router:
        """The service's router: ``router`` (the previous one, or one kept aside) re-configured,
        or a new one; ``same_budget``: ``router`` already draws on this service's budget."""
        policy = self.policy
        config = RouterConfig(
            retry=retry_policy,
            breaker=policy.breaker or _NEVER_TRIPS,
            hedge=policy.hedge,
            fallthrough=policy.fallthrough,
        )
        endpoints = [
            Endpoint(name, policy.addresses.get(name, ""), policy.priorities.get(name, i))
            for i, name in enumerate(policy.endpoints)
        ]
        if router is None:
            return Router(self.name, endpoints, config, budget=self.budget)
        if router.config != config or not same_budget:
            router.reconfigure(config, budget=self.budget)
        router.replace(endpoints)
        return router

    def sqlite(self, name: str, opened: SqliteDatabase) -> SqliteDatabase:
        """The SQLite database ``name`` replaying its transactions with this service's policy.

        ``opened`` is the one the facade opened; it is used as it is when its
        policy is this service's, else a twin of it is made once (a
        [`SqliteDatabase`][datapunk_recovery.database.sqlite.SqliteDatabase] holds no connection,
        only its settings).
        """
        mine = self.databases.get(name)
        if mine is None or mine.path != opened.path:
            policy, budget = self.transaction.retry, self.budget
            mine = (
                opened
                if opened.config.retry == policy and opened.config.budget is budget
                else SqliteDatabase(
                    opened.path,
                    dataclasses.replace(opened.config, retry=policy, budget=budget),
                    uri=opened.uri,
                )
            )
            self.databases[name] = mine
        return mine

    async def attempt(
        self,
        call: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        """One attempt of a service without endpoints: breaker, timeout, call."""
        breaker, timeout = self.breaker, self.timeout
        if breaker is None:
            if timeout is None:
                return await call(*args, **kwargs)
            return await timeout.call_async(call, *args, **kwargs)
        if timeout is None:
            return await breaker.call_async(call, *args, **kwargs)
        return await breaker.call_async(timeout.call_async, call, *args, **kwargs)

    async def routed(
        self,
        call: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        """A call over the service's endpoints: the router retries, fails over and hedges."""
        timeout = self.timeout

        async def attempt(endpoint: Endpoint) -> T:
            if timeout is None:
                result = await call(endpoint, *args, **kwargs)
            else:
                result = await timeout.call_async(call, endpoint, *args, **kwargs)
            if endpoint.priority > self.top:
                self.on_fallback(self.name, "failover")
            return result

        assert self.router is not None
        return await self.router.call(attempt, hedge=True)


def _breaker(name: str, config: BreakerConfig, old: CircuitBreaker | None) -> CircuitBreaker:
    if old is None:
        return CircuitBreaker(name, config)
    if old.config != config:
        old.reconfigure(config)  # keeps its state, takes the new thresholds
    return old


def _budget(
    name: str,
    config: TokenBudgetConfig | RatioBudgetConfig | None,
    old: TokenBudget | RatioBudget | None,
) -> TokenBudget | RatioBudget | None:
    if config is None:
        return None
    if isinstance(config, RatioBudgetConfig):
        # A ratio budget keeps its window through new figures (a new kind
        # starts a new one).
        if not isinstance(old, RatioBudget):
            return RatioBudget(name, config)
        if old.config != config:
            old.reconfigure(config)  # keeps the window's counts, new figures
        return old
    if not isinstance(old, TokenBudget):
        return TokenBudget(name, config)
    if old.config != config:
        old.reconfigure(config)  # keeps its tokens (never refilled), new thresholds
    return old


def _bulkhead(name: str, config: BulkheadConfig | None, old: Bulkhead | None) -> Bulkhead | None:
    if config is None:
        return None
    if old is None:
        return Bulkhead(name, config)
    if old.config != config:
        old.reconfigure(config)  # held slots keep counting against the new limit
    return old
