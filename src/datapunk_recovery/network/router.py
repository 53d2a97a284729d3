"""Routing recovery: a service is a set of endpoints with priorities; calls go where they can.

Each [`Endpoint`][datapunk_recovery.network.router.Endpoint] has a priority (0 is the primary level,
1 the
secondary, ...) and its own circuit breaker.  A [`Router`][datapunk_recovery.network.router.Router]
sends each
attempt of a call to an endpoint of the *best level that has an endpoint
whose breaker admits calls*, and within the level to the one with the lowest
recent failure rate (the breaker's window), then the fewest calls in flight,
then in turn.  So:

- a retry goes to another endpoint of the same level than the one that just
  failed, when there is one;
- a call falls through to the next priority level when every endpoint of the
  levels above refuses calls (its breaker is open) **or has already failed in
  this call** (``RouterConfig.fallthrough="call"``, the default): two
  primaries failing and a healthy secondary cost the caller nothing, within
  the call's attempts, budget and deadline (a budget that refuses a retry
  still lets the call make one attempt on a level it has not tried: see
  `_FallthroughGate`).  With ``fallthrough="breaker"``
  (the stricter rule) a lower level is used only once the breakers above are
  open, and a retry on a level of one endpoint goes back to it;
- a server-given delay (``Retry-After``) is about the endpoint that gave it:
  when the next attempt can go to another endpoint that has not failed in the
  call, it goes there after the usual backoff instead of waiting (or giving up
  for a delay too long);
- when every endpoint of every level refuses, the call fails at once with
  [`AllEndpointsDown`][datapunk_recovery.network.router.AllEndpointsDown], which lists each
  endpoint's state and when it
  may be tried again.

Retries are the retry engine's
([`datapunk_recovery._execution.engine.retry()`][datapunk_recovery._execution.engine.retry]):
backoff, server-given delays (``Retry-After`` through
[`classify()`][datapunk_recovery._core.errors.classify]'s ``delay_hint``), the overall
deadline (each attempt is cancelled when it passes, and
[`datapunk_recovery.remaining()`][datapunk_recovery._execution.deadline.remaining] tells the callee
how long it
has), the retry budget and the engine's events and statistics all apply.
With a [`HedgeConfig`][datapunk_recovery.flow.hedging.HedgeConfig], an idempotent call is
hedged across endpoints: a slow attempt gets a twin on another endpoint, and
the first good answer wins (hedges draw on the same budget).

Endpoints can be added, removed and re-prioritised while calls run; an
endpoint that stays keeps its breaker (and what its breaker knows).

Calls are asynchronous (asyncio and trio).  The call itself is any
``async (endpoint) -> result`` function: an HTTP request (see the ``httpx``
and ``aiohttp`` adapters), a gRPC stub call, a raw socket exchange.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from collections.abc import Set as AbstractSet
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, TypeVar

from datapunk_recovery._core import clock
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.context import REPORTING
from datapunk_recovery._core.errors import CircuitOpenError, ErrorCategory, RecoveryError, classify
from datapunk_recovery._core.events import Event, EventBus, emit, listening
from datapunk_recovery._core.policy import RetryPolicy
from datapunk_recovery._core.redact import redact_url
from datapunk_recovery._core.stats import Statistics
from datapunk_recovery._core.validate import check_count, shown
from datapunk_recovery._execution.engine import Retried, current_attempt, retry
from datapunk_recovery.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    Permit,
)
from datapunk_recovery.budget import RetryGate
from datapunk_recovery.flow.hedging import HedgeConfig, Hedger

__all__ = [
    "AllEndpointsDown",
    "Endpoint",
    "EndpointFailed",
    "EndpointState",
    "FailedOver",
    "NoHedgeTarget",
    "PriorityFallthrough",
    "Router",
    "RouterConfig",
    "RoutingChanged",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place a service answers: a unique ``name``, an ``address``, a ``priority``.

    ``priority`` 0 is the preferred level; higher numbers are used only when
    every endpoint of the levels before them refuses calls.  ``address`` is
    whatever the call needs (a base URL, ``host:port``); it never appears in
    events or errors except through [`redact_url()`][datapunk_recovery._core.redact.redact_url].
    """

    name: str
    address: str = ""
    priority: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Endpoint.name: expected a non-empty str, got {shown(self.name)}")
        if not isinstance(self.address, str):
            raise TypeError(f"Endpoint.address: expected a str, got {shown(self.address)}")
        check_count("Endpoint", "priority", self.priority, minimum=0)

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, {redact_url(self.address)!r}, priority={self.priority})"


def _default_breaker() -> BreakerConfig:
    # keep_window with minimum_calls=1: a failure rate from the first call on,
    # which is what endpoint selection compares.
    return BreakerConfig(
        consecutive_failures=5,
        open_duration=30.0,
        keep_window=True,
        window_size=50,
        minimum_calls=1,
    )


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """How a router retries, trips endpoints and hedges.

    ``retry``: attempts over all endpoints (the first included), backoff and
    the call's own deadline, in seconds
    (a [`RetryPolicy`][datapunk_recovery._core.policy.RetryPolicy]
    gives some
    error categories a configuration of their own).  ``breaker``: the configuration of
    each endpoint's breaker (keep its window so that selection sees failure
    rates).  ``hedge``: hedging of idempotent calls across endpoints (``None``:
    no hedging).  ``fallthrough``: when a call may use a lower priority level:
    ``"call"`` (default) once every endpoint of the levels above refuses calls
    or has failed in this call; ``"breaker"`` only once every endpoint above
    refuses calls (its breaker is open), whatever the call saw.
    """

    retry: RetryConfig | RetryPolicy = field(
        default_factory=lambda: RetryConfig(max_attempts=3, base_delay=0.05, max_delay=2.0)
    )
    breaker: BreakerConfig = field(default_factory=_default_breaker)
    hedge: HedgeConfig | None = None
    fallthrough: Literal["call", "breaker"] = "call"

    def __post_init__(self) -> None:
        if not isinstance(self.retry, RetryConfig | RetryPolicy):
            raise TypeError(
                f"RouterConfig.retry: expected a RetryConfig or a RetryPolicy,"
                f" got {shown(self.retry)}"
            )
        if not isinstance(self.breaker, BreakerConfig):
            raise TypeError(
                f"RouterConfig.breaker: expected a BreakerConfig, got {shown(self.breaker)}"
            )
        if self.hedge is not None and not isinstance(self.hedge, HedgeConfig):
            raise TypeError(f"RouterConfig.hedge: expected a HedgeConfig, got {shown(self.hedge)}")
        if self.fallthrough not in ("call", "breaker"):
            raise ValueError(
                f"RouterConfig.fallthrough: expected 'call' or 'breaker',"
                f" got {shown(self.fallthrough)}"
            )


@dataclass(frozen=True, slots=True)
class EndpointState:
    """One endpoint now: its breaker ``state``, ``retry_after`` seconds, load and failures."""

    name: str
    priority: int
    state: BreakerState
    retry_after: float
    failure_rate: float | None
    in_flight: int

    def __str__(self) -> str:
        when = (
            "now"
            if self.retry_after <= 0
            else (
                "never (isolated)"
                if math.isinf(self.retry_after)
                else f"in {self.retry_after:.3f} s"
            )
        )
        return f"{self.name} (priority {self.priority}): {self.state.value}, may be tried {when}"


class AllEndpointsDown(RecoveryError):
    """Every endpoint of every level refuses calls; ``endpoints`` says each one's state.

    ``retry_after`` is the soonest any of them may admit a call, in seconds.
    Not retryable, and no outer layer retries it: the breakers already said
    when to come back.
    """

    category = ErrorCategory.OVERLOADED
    retryable = False
    do_not_retry_above = True

    def __init__(self, service: str, endpoints: tuple[EndpointState, ...]) -> None:
        soonest = min((e.retry_after for e in endpoints), default=math.inf)
        lines = "; ".join(str(e) for e in endpoints) or "no endpoints configured"
        super().__init__(
            f"{service!r}: every endpoint refuses calls: {lines}",
            retry_after=None if math.isinf(soonest) else soonest,
            context={"service": service},
        )
        self.service = service
        self.endpoints = endpoints


class NoHedgeTarget(RecoveryError):
    """A hedge found no endpoint admitting calls while the call's other attempts run.

    Only the hedge fails: the running attempts decide the call.  Retryable, so
    that if it is the last error the engine's next attempt reports the real
    state (usually [`AllEndpointsDown`][datapunk_recovery.network.router.AllEndpointsDown]).
    """

    category = ErrorCategory.OVERLOADED
    retryable = True


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointFailed(Event):
    """An attempt on ``endpoint`` failed with ``error_type`` after ``duration`` seconds."""

    name: ClassVar[str] = "network.endpoint_failed"
    area: ClassVar[str] = "network"

    endpoint: str
    priority: int
    error_type: str
    duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class FailedOver(Event):
    """After a failure on ``from_endpoint``, attempt ``attempt`` goes to ``to_endpoint``."""

    name: ClassVar[str] = "network.failover"
    area: ClassVar[str] = "network"

    from_endpoint: str
    to_endpoint: str
    from_priority: int
    to_priority: int
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PriorityFallthrough(Event):
    """Every endpoint of the levels before ``to_priority`` refuses: falling through."""

    name: ClassVar[str] = "network.fallthrough"
    area: ClassVar[str] = "network"

    from_priority: int
    to_priority: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingChanged(Event):
    """Endpoints were ``added``, ``removed`` or got a new priority (``reprioritised``)."""

    name: ClassVar[str] = "network.routing_changed"
    area: ClassVar[str] = "network"

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    reprioritised: tuple[str, ...] = ()


# Removed endpoints kept for their return (their breakers' state), at most.
_RETIRED_MAX: Final = 256


class _Member:
    """An endpoint in a router, with what outlives its re-configuration: the breaker."""

    __slots__ = ("breaker", "endpoint", "in_flight")

    def __init__(self, endpoint: Endpoint, breaker: CircuitBreaker) -> None:
        self.endpoint = endpoint
        self.breaker = breaker
        self.in_flight = 0

    def state(self) -> EndpointState:
        b = self.breaker
        return EndpointState(
            self.endpoint.name,
            self.endpoint.priority,
            b.state,
            b.retry_after(),
            b.failure_rate(),
            self.in_flight,
        )


class _Call:
    """One call's routing memory: who failed last, who is running now (for hedges)."""

    __slots__ = ("error", "failed", "fn", "forced", "hedge", "last", "running", "ungranted")

    def __init__(self, fn: Callable[[Endpoint], Awaitable[Any]], hedge: bool) -> None:
        self.fn = fn
        self.hedge = hedge
        self.last: _Member | None = None
        self.error: Exception | None = None  # the last failure, the cause of AllEndpointsDown
        # Only a hedged call runs attempts side by side; ``failed`` (the endpoints
        # that failed in this call) becomes a set at the first failure.
        self.running: AbstractSet[_Member] = set() if hedge else _NO_MEMBERS
        self.failed: AbstractSet[_Member] = _NO_MEMBERS
        # The budget refused a retry on the levels tried: the next attempt must go to
        # a level below them that the call has not tried (see _FallthroughGate).
        self.forced = False
        # The attempt running now is one the budget refused (see _FallthroughGate.on_attempt).
        self.ungranted = False


_NO_MEMBERS: Final[frozenset[Any]] = frozenset()

#: What the engine passes to each attempt: a one-item list holding a plain call's
#: function until its first attempt needs routing memory (a failure, a permit, a
#: fall-through), then the call's `_Call`; a hedged call's `_Call` from the start.
#: A call whose first attempt succeeds on a granted endpoint builds no `_Call`.
_Slot = list[Any]
_REFUSES: Final = math.inf  # the ranking rate of a breaker that refuses calls

# The running call, read by the budget gate in the caller's task.
_CALL: ContextVar[_Call | None] = ContextVar("datapunk_recovery_router_call", default=None)


class _FallthroughGate:
    """The router's budget as the engine sees it under ``fallthrough="call"``.

    Every retry asks the budget first.  When the budget refuses, the call may
    still make one attempt on a priority level below the ones it tried, that it
    has not tried yet: the budget protects the endpoints that are failing from
    being retried; the first attempt on a level nobody has tried in this call
    is not a retry of anything that failed.  So the attempts the budget did
    not grant are at most one per level, and ``max_attempts`` and the deadline
    bound them as any attempt.  Such an attempt stays off the budget's books:
    reported, it would count as a request that earns retries (a ratio budget)
    or its success would earn tokens, so refusals would refill the budget.
    """

    __slots__ = ("inner", "router")

    def __init__(self, router: Router, inner: RetryGate) -> None:
        self.router = router
        self.inner = inner

    def on_attempt(self, succeeded: bool) -> None:
        call = _CALL.get()
        if call is not None and call.ungranted:
            call.ungranted = False
            return
        self.inner.on_attempt(succeeded)

    def allow_retry(self) -> bool:
        if self.inner.allow_retry():
            return True
        call = _CALL.get()
        if call is not None and self.router._untried_level_below(call):
            call.forced = call.ungranted = True
            return True
        return False


# The per-call retry predicate, read by the engine's `on=` in the caller's task.
_RETRY_ON: ContextVar[Callable[[BaseException], bool] | None] = ContextVar(
    "datapunk_recovery_router_retry_on", default=None
)


class Router:
    """Routes calls over a service's endpoints; see the module documentation.

    ``name`` names the service in events, errors and breaker names
    (``"<name>/<endpoint>"``); ``budget`` is the retry budget shared by
    retries and hedges.  Every endpoint name is unique.
    """

    __slots__ = (
        "_engine",
        "_gate",
        "_groups",
        "_hedger",
        "_lone",
        "_members",
        "_retired",
        "_turn",
        "config",
        "name",
    )

    def __init__(
        self,
        name: str,
        endpoints: Iterable[Endpoint],
        config: RouterConfig | None = None,
        *,
        budget: RetryGate | None = None,
    ) -> None:
        self.name = name
        self._members: tuple[_Member, ...] = ()
        self._groups: tuple[tuple[_Member, ...], ...] = ()
        self._lone: _Member | None = None
        # Endpoints removed, kept (with their breakers) for their return.
        self._retired: dict[str, _Member] = {}
        self._turn = itertools.count()
        self._compile(config if config is not None else RouterConfig(), budget, EventBus())
        self.replace(endpoints)

    def _compile(self, config: RouterConfig, budget: RetryGate | None, bus: EventBus) -> None:
        if not isinstance(config, RouterConfig):
            raise TypeError(f"Router.config: expected a RouterConfig, got {shown(config)}")
        self.config = config
        self._gate = (
            _FallthroughGate(self, budget)
            if budget is not None and config.fallthrough == "call"
            else None
        )
        self._engine: Retried[[_Slot], Awaitable[Any]] = retry(
            config.retry,
            on=_retryable,
            name=self.name,
            budget=budget if self._gate is None else self._gate,
            bus=bus,
        )(self._run if config.hedge is not None else self._attempt)  # no hedger: no race
        old: Hedger | None = getattr(self, "_hedger", None)
        self._hedger = (
            None
            if config.hedge is None
            else Hedger(self.name, config.hedge, budget=budget, bus=bus)
        )
        if self._hedger is not None and old is not None:
            self._hedger.inherit(old)  # a reload keeps the latencies measured

    def reconfigure(self, config: RouterConfig, *, budget: RetryGate | None = None) -> None:
        """Take ``config`` and ``budget`` from now on, keeping the endpoints and their breakers.

        Each breaker keeps its state and takes ``config.breaker``; the bus and
        its subscribers stay.  Calls in flight finish with the retries they
        started with; the engine's statistics start again from zero.
        """
        self._compile(config, budget, self.bus)
        for m in self._members:
            if m.breaker.config != config.breaker:
                m.breaker.reconfigure(config.breaker)

    @property
    def bus(self) -> EventBus:
        """The router's events: routing, its retry engine's and its hedger's."""
        return self._engine.events

    # -- the endpoints ---------------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints now, best priority first."""
        return tuple(m.endpoint for m in self._members)

    def breaker(self, name: str) -> CircuitBreaker:
        """The breaker of endpoint ``name`` (``KeyError`` if there is none)."""
        return self._member(name).breaker

    def states(self) -> tuple[EndpointState, ...]:
        """Every endpoint's state now, best priority first."""
        return tuple(m.state() for m in self._members)

    def _member(self, name: str) -> _Member:
        for m in self._members:
            if m.endpoint.name == name:
                return m
        raise KeyError(f"{self.name!r} has no endpoint {name!r}")

    def _install(self, members: Iterable[_Member]) -> None:
        # Copy-on-write: a call that is selecting keeps the tuples it read.
        ordered = tuple(sorted(members, key=lambda m: m.endpoint.priority))
        groups: list[list[_Member]] = []
        for m in ordered:
            if not groups or groups[-1][0].endpoint.priority != m.endpoint.priority:
                groups.append([])
            groups[-1].append(m)
        # The levels, best first, worked out once per change of the endpoints.
        self._groups = tuple(tuple(g) for g in groups)
        # The best level's endpoint when it is alone there: a first attempt asks only it.
        self._lone = groups[0][0] if groups and len(groups[0]) == 1 else None
        self._members = ordered

    def replace(self, endpoints: Iterable[Endpoint]) -> None:
        """Make ``endpoints`` the router's endpoints; those that stay keep their breakers."""
        new = list(endpoints)
        names = [e.name for e in new]
        if len(set(names)) != len(names):
            raise ValueError(f"Router {self.name!r}: endpoint names must be unique, got {names}")
        for e in new:
            if not isinstance(e, Endpoint):
                raise TypeError(f"Router {self.name!r}: expected Endpoint objects, got {shown(e)}")
        old = {m.endpoint.name: m for m in self._members}
        members: list[_Member] = []
        added: list[str] = []
        moved: list[str] = []
        for e in new:
            kept = old.pop(e.name, None)
            if kept is None:
                members.append(self._new_member(e))
                added.append(e.name)
                continue
            if kept.endpoint.priority != e.priority:
                moved.append(e.name)
            kept.endpoint = e
            members.append(kept)
        self._install(members)
        for gone in old.values():
            self._retire(gone)
        self._changed(tuple(added), tuple(old), tuple(moved))

    def add(self, endpoint: Endpoint) -> None:
        """Add ``endpoint`` while calls run (``ValueError`` if its name is taken)."""
        if any(m.endpoint.name == endpoint.name for m in self._members):
            raise ValueError(f"Router {self.name!r}: endpoint {endpoint.name!r} already exists")
        self._install([*self._members, self._new_member(endpoint)])
        self._changed(added=(endpoint.name,))

    def remove(self, name: str) -> None:
        """Remove endpoint ``name``; calls already running on it finish there."""
        member = self._member(name)
        self._install(m for m in self._members if m is not member)
        self._retire(member)
        self._changed(removed=(name,))

    def set_priority(self, name: str, priority: int) -> None:
        """Move endpoint ``name`` to another priority level, keeping its breaker."""
        member = self._member(name)
        e = member.endpoint
        member.endpoint = Endpoint(e.name, e.address, priority)
        self._install(self._members)
        self._changed(reprioritised=(name,))

    def _new_member(self, endpoint: Endpoint) -> _Member:
        """A member for ``endpoint``: the one it had before it was removed, else a new one.

        An endpoint taken out and put back (by ``remove``/``add`` or a reload)
        gets its breaker back: one that was open is still open, and an
        operator's forced state still holds.
        """
        if not isinstance(endpoint, Endpoint):
            raise TypeError(f"Router {self.name!r}: expected an Endpoint, got {shown(endpoint)}")
        member = self._retired.pop(endpoint.name, None)
        if member is None:
            return _Member(
                endpoint, CircuitBreaker(f"{self.name}/{endpoint.name}", self.config.breaker)
            )
        member.endpoint = endpoint
        if member.breaker.config != self.config.breaker:
            member.breaker.reconfigure(self.config.breaker)
        return member

    def _retire(self, member: _Member) -> None:
        retired = self._retired
        retired.pop(member.endpoint.name, None)
        if len(retired) >= _RETIRED_MAX:
            del retired[next(iter(retired))]  # the longest gone
        retired[member.endpoint.name] = member

    def _changed(
        self,
        added: tuple[str, ...] = (),
        removed: tuple[str, ...] = (),
        reprioritised: tuple[str, ...] = (),
    ) -> None:
        if (added or removed or reprioritised) and listening(self.bus):
            emit(
                RoutingChanged(
                    operation=self.name,
                    at=clock.now(),
                    added=added,
                    removed=removed,
                    reprioritised=reprioritised,
                ),
                self.bus,
            )

    # -- selection -------------------------------------------------------------------------

    def _level(
        self, call: _Call, refused: AbstractSet[_Member]
    ) -> tuple[list[_Member], int | None, int | None]:
        """The admitting endpoints of the level the next attempt goes to, that level, the first.

        The best level with an endpoint whose breaker admits calls; with
        ``fallthrough="call"``, a level whose admitting endpoints have all
        failed in this call is passed over while a later level has one that
        has not (when every level's have, the best level again: attempts
        bound the call, not the routing).
        """
        groups = self._groups  # the levels, best first (see `_install()`)
        first_level = groups[0][0].endpoint.priority if groups else None
        admitting: list[tuple[int, list[_Member]]] = []
        for level in groups:
            admitted = [m for m in level if m not in refused and m.breaker.admitting()]
            if admitted:
                admitting.append((level[0].endpoint.priority, admitted))
        if not admitting:
            return [], None, first_level
        if self.config.fallthrough == "call":
            if call.forced and call.last is not None:  # the budget allowed only a new level
                below, tried = call.last.endpoint.priority, _tried(call)
                for priority, group in admitting:
                    if priority > below and priority not in tried:
                        return group, priority, first_level
            for priority, group in admitting:
                if not all(m in call.failed for m in group):
                    return group, priority, first_level
        priority, group = admitting[0]
        return group, priority, first_level

    def _select(self, call: _Call, refused: AbstractSet[_Member]) -> _Member | None:
        """The endpoint for the next attempt, or None when every endpoint refuses."""
        if call.last is None and not refused and not call.running:
            # A call's first attempt (nothing failed, nothing forced, nothing
            # running): the best level with an admitting endpoint, whatever
            # the fall-through rule; levels after it are not looked at.
            groups = self._groups
            for group in groups:
                if len(group) == 1:
                    m = group[0]
                    if m.breaker.admitting():
                        if group is not groups[0]:
                            self._fell_through(groups[0][0].endpoint.priority, m.endpoint.priority)
                        return m
                    continue
                chosen = self._least_loaded(group)
                if chosen is not None:
                    if group is not groups[0]:
                        self._fell_through(groups[0][0].endpoint.priority, chosen.endpoint.priority)
                    return chosen
            return None
        best, level, first_level = self._level(call, refused)
        if not best:
            return None
        if level != first_level:
            assert first_level is not None and level is not None
            self._fell_through(first_level, level)
        avoid = call.running | ({call.last} if call.last is not None else set())
        pool = [m for m in best if m not in avoid] or best
        if len(pool) == 1:
            return pool[0]
        return self._least_loaded(pool) or pool[0]  # refused meanwhile: admission says so

    def _least_loaded(self, pool: Sequence[_Member]) -> _Member | None:
        """Of ``pool``'s admitting endpoints, the lowest failure rate, then the fewest calls
        in flight, then in turn (None when none admits)."""
        refuses = low_rate = _REFUSES
        low_load = 0
        ties: list[_Member] = []
        for m in pool:
            rate = m.breaker.ranking_rate()  # `refuses` (inf) when it refuses calls
            if rate > low_rate or rate == refuses:
                continue
            load = m.in_flight
            if rate == low_rate:
                if load > low_load:
                    continue
                if load == low_load:
                    ties.append(m)
                    continue
            low_rate, low_load, ties = rate, load, [m]
        if len(ties) < 2:
            return ties[0] if ties else None
        return ties[next(self._turn) % len(ties)]

    def _fell_through(self, from_priority: int, to_priority: int) -> None:
        if listening(self.bus, PriorityFallthrough):
            emit(
                PriorityFallthrough(
                    operation=self.name,
                    at=clock.now(),
                    from_priority=from_priority,
                    to_priority=to_priority,
                ),
                self.bus,
            )

    def _untried_level_below(self, call: _Call) -> bool:
        """Whether a level below the last endpoint's, untried in ``call``, admits calls."""
        if call.last is None:
            return False
        below, tried = call.last.endpoint.priority, _tried(call)
        return any(
            m.endpoint.priority > below
            and m.endpoint.priority not in tried
            and m.breaker.admitting()
            for m in self._members
        )

    def _elsewhere(self, call: _Call, member: _Member) -> bool:
        """Whether the next attempt can go to another endpoint that has not failed in the call."""
        best, _, _ = self._level(call, set())
        return any(m is not member and m not in call.failed for m in best)

    async def _admit(
        self, call: _Call, member: _Member | None
    ) -> tuple[_Member, Permit | None, int]:
        """Take a permit from ``member``'s breaker (select the next one if it refuses).

        ``member``'s breaker did not grant the call without a permit.  Returns
        the endpoint, the permit, and the generation of a grant: no permit
        when a next endpoint's breaker grants the call without one
        ([`CircuitBreaker.grant()`][datapunk_recovery.breaker.breaker.CircuitBreaker.grant]:
        closed, in this process, no result to judge, nobody wants its per-call
        event); the outcome then goes straight to the breaker, as its own faces do.
        """
        refused: set[_Member] = set()
        while True:
            if member is None:
                if call.running:  # a hedge with nowhere to go: the running attempts go on
                    raise NoHedgeTarget(f"{self.name!r}: no other endpoint admits a hedge")
                raise AllEndpointsDown(self.name, self.states()) from call.error
            try:
                return member, await member.breaker.allow_async(), -1
            except CircuitOpenError:  # opened (or its half-open probe went) meanwhile
                refused.add(member)
            member = self._select(call, refused)
            if member is not None:
                gen = member.breaker.grant()
                if gen is not None:
                    return member, None, gen

    # -- calling ---------------------------------------------------------------------------

    async def _attempt(self, slot: _Slot) -> Any:
        """One attempt of the engine; ``slot`` holds the call (see `_Slot`)."""
        fn = slot[0]
        if type(fn) is _Call:
            return await self._attempt_call(fn, None)
        # A plain call's first attempt: the best level's lone endpoint, or the least
        # loaded of its admitting ones (what `_select()` chooses when one admits).
        groups = self._groups
        chosen = self._lone or (self._least_loaded(groups[0]) if groups else None)
        gen = None if chosen is None else chosen.breaker.grant()
        if gen is None:  # a permit to take, or a level to fall through: routing memory
            call = slot[0] = _Call(fn, False)
            if chosen is not None and not chosen.breaker.admitting():
                chosen = None  # the lone endpoint refuses: `_select()` falls through
            return await self._attempt_call(call, chosen)
        assert chosen is not None
        chosen.in_flight += 1
        start = clock.now()
        try:
            result = await fn(chosen.endpoint)
        except BaseException as exc:
            chosen.breaker.granted_failure(gen, exc, start)
            if isinstance(exc, Exception):
                call = slot[0] = _Call(fn, False)  # the next attempt remembers this one
                self._failed(call, chosen, exc, start)
            raise
        finally:
            chosen.in_flight -= 1
        chosen.breaker.granted_success(gen, start)
        return result

    async def _attempt_call(self, call: _Call, chosen: _Member | None) -> Any:
        """An attempt of ``call`` on ``chosen``, or on the endpoint `_select()` chooses."""
        permit: Permit | None = None
        selected = chosen if chosen is not None else self._select(call, _NO_MEMBERS)
        granted = None if selected is None else selected.breaker.grant()
        if granted is None:
            member, permit, gen = await self._admit(call, selected)
        else:
            assert selected is not None
            member, gen = selected, granted
        if call.forced:
            call.forced = False
        last = call.last
        if last is not None and last is not member and listening(self.bus, FailedOver):
            emit(
                FailedOver(
                    operation=self.name,
                    at=clock.now(),
                    from_endpoint=last.endpoint.name,
                    to_endpoint=member.endpoint.name,
                    from_priority=last.endpoint.priority,
                    to_priority=member.endpoint.priority,
                    attempt=current_attempt(),
                ),
                self.bus,
            )
        member.in_flight += 1
        hedged = call.hedge  # only a hedged call runs attempts side by side
        if hedged:
            running = call.running
            assert isinstance(running, set)
            running.add(member)
        start = clock.now()
        try:
            result = await call.fn(member.endpoint)
        except BaseException as exc:
            if permit is not None:
                permit.failure(exc)  # a cancellation counts as nothing and frees a probe
            else:
                member.breaker.granted_failure(gen, exc, start)
            if isinstance(exc, Exception):
                self._failed(call, member, exc, start)
            raise
        finally:
            member.in_flight -= 1
            if hedged:
                call.running.discard(member)  # type: ignore[attr-defined]
        if permit is not None:
            permit.success()
        else:
            member.breaker.granted_success(gen, start)
        return result

    def _failed(self, call: _Call, member: _Member, exc: Exception, start: float) -> None:
        """Remember that ``member`` failed in ``call`` with ``exc`` (started at ``start``)."""
        call.last, call.error = member, exc
        failed = call.failed
        if not isinstance(failed, set):
            call.failed = failed = set()
        failed.add(member)
        if (
            isinstance(exc, RecoveryError)
            and exc.retry_after is not None
            and self._elsewhere(call, member)
        ):
            # The server's delay is this endpoint's: the next attempt goes elsewhere.
            exc.retry_after = None
        if listening(self.bus, EndpointFailed):
            now = clock.now()
            emit(
                EndpointFailed(
                    operation=self.name,
                    at=now,
                    endpoint=member.endpoint.name,
                    priority=member.endpoint.priority,
                    error_type=type(exc).__name__,
                    duration=now - start,
                ),
                self.bus,
            )

    async def _run(self, slot: _Slot) -> Any:
        """One attempt of the engine: a plain one, or a race of hedges."""
        call = slot[0]
        if type(call) is _Call and call.hedge and self._hedger is not None:
            gate = self._gate
            if gate is None:
                return await self._hedger.race(self._attempt, (slot,), {})
            # The engine reports each attempt to the budget through the gate: the
            # hedger must know its budget is reported, to report each attempt once.
            token = REPORTING.set((*REPORTING.get(), gate.inner))
            try:
                return await self._hedger.race(self._attempt, (slot,), {})
            finally:
                REPORTING.reset(token)
        return await self._attempt(slot)

    def call(
        self,
        fn: Callable[[Endpoint], Awaitable[T]],
        *,
        retry_on: Callable[[BaseException], bool] | None = None,
        hedge: bool = False,
    ) -> Coroutine[Any, Any, T]:
        """Run ``fn(endpoint)`` on the best endpoint, retrying elsewhere as needed.

        ``retry_on`` decides which failures are retried (default: what
        [`classify()`][datapunk_recovery._core.errors.classify] calls retryable); errors an
        inner layer marked final never are.  ``hedge=True`` hedges the call
        across endpoints when the router has a hedge configuration: only for
        calls that are safe to run twice.  Returns a coroutine: await it (or
        make it a task), as with an ``async def`` method.
        """
        if retry_on is None and self._gate is None and _RETRY_ON.get() is None:
            # Nothing for the context: the engine's coroutine is the call (a frame less).
            return self._engine([_Call(fn, True) if hedge else fn])  # type: ignore[return-value]
        return self._call_in_context(_Call(fn, hedge), retry_on)

    async def _call_in_context(
        self, call: _Call, retry_on: Callable[[BaseException], bool] | None
    ) -> Any:
        """The call with what the engine reads from the context set around it.

        Only the budget gate reads the running call, and the engine's ``on=``
        the predicate: each is set when someone reads it or an outer call's
        must be hidden.
        """
        current = _CALL.set(call) if self._gate is not None else None
        token = (
            _RETRY_ON.set(retry_on) if retry_on is not None or _RETRY_ON.get() is not None else None
        )
        try:
            return await self._engine([call])
        finally:
            if current is not None:
                _CALL.reset(current)
            if token is not None:
                _RETRY_ON.reset(token)

    def statistics(self) -> Statistics:
        """The retry engine's counters for this router's calls."""
        return self._engine.statistics()


def _tried(call: _Call) -> set[int]:
    """The priority levels on which ``call`` has had a failure."""
    return {m.endpoint.priority for m in call.failed}


def _retryable(exc: BaseException) -> bool:
    decide = _RETRY_ON.get()
    return decide(exc) if decide is not None else classify(exc).retryable
