"""Routing recovery: a service is a set of endpoints with priorities; calls go where they can.

Each :class:`Endpoint` has a priority (0 is the primary level, 1 the
secondary, ...) and its own circuit breaker.  A :class:`Router` sends each
attempt of a call to an endpoint of the *best level that has an endpoint
whose breaker admits calls*, and within the level to the one with the lowest
recent failure rate (the breaker's window), then the fewest calls in flight,
then in turn.  So:

- a retry goes to another endpoint of the same level than the one that just
  failed, when there is one (with one endpoint in the level, it goes back to
  it after the backoff);
- a call falls through to a lower priority level only when every endpoint of
  the levels above refuses calls (its breaker is open);
- when every endpoint of every level refuses, the call fails at once with
  :class:`AllEndpointsDown`, which lists each endpoint's state and when it
  may be tried again.

Retries are the retry engine's (:func:`datapunk_recovery.engine.retry`):
backoff, server-given delays (``Retry-After`` through
:func:`~datapunk_recovery.errors.classify`'s ``delay_hint``), the overall
deadline (each attempt is cancelled when it passes, and
:func:`datapunk_recovery.deadline.remaining` tells the callee how long it
has), the retry budget and the engine's events and statistics all apply.
With a :class:`~datapunk_recovery.hedging.HedgeConfig`, an idempotent call is
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
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

from datapunk_recovery import clock
from datapunk_recovery._validate import check_count
from datapunk_recovery.backoff import RetryConfig
from datapunk_recovery.breaker import BreakerConfig, BreakerState, CircuitBreaker, Permit
from datapunk_recovery.budget import RetryGate
from datapunk_recovery.engine import Retried, current_attempt, retry
from datapunk_recovery.errors import CircuitOpenError, ErrorCategory, RecoveryError, classify
from datapunk_recovery.events import Event, EventBus, emit, listening
from datapunk_recovery.hedging import HedgeConfig, Hedger
from datapunk_recovery.policy import RetryPolicy
from datapunk_recovery.redact import redact_url
from datapunk_recovery.stats import Statistics

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

_ADMITTING: Final = frozenset(
    {
        BreakerState.CLOSED,
        BreakerState.HALF_OPEN,
        BreakerState.DISABLED,
        BreakerState.METRICS_ONLY,
    }
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place a service answers: a unique ``name``, an ``address``, a ``priority``.

    ``priority`` 0 is the preferred level; higher numbers are used only when
    every endpoint of the levels before them refuses calls.  ``address`` is
    whatever the call needs (a base URL, ``host:port``); it never appears in
    events or errors except through :func:`~datapunk_recovery.redact.redact_url`.
    """

    name: str
    address: str = ""
    priority: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Endpoint.name: expected a non-empty str, got {self.name!r}")
        if not isinstance(self.address, str):
            raise TypeError(f"Endpoint.address: expected a str, got {self.address!r}")
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
    the call's own deadline, in seconds (a :class:`RetryPolicy` gives some
    error categories a configuration of their own).  ``breaker``: the configuration of
    each endpoint's breaker (keep its window so that selection sees failure
    rates).  ``hedge``: hedging of idempotent calls across endpoints (``None``:
    no hedging).
    """

    retry: RetryConfig | RetryPolicy = field(
        default_factory=lambda: RetryConfig(max_attempts=3, base_delay=0.05, max_delay=2.0)
    )
    breaker: BreakerConfig = field(default_factory=_default_breaker)
    hedge: HedgeConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.retry, RetryConfig | RetryPolicy):
            raise TypeError(
                f"RouterConfig.retry: expected a RetryConfig or a RetryPolicy, got {self.retry!r}"
            )
        if not isinstance(self.breaker, BreakerConfig):
            raise TypeError(f"RouterConfig.breaker: expected a BreakerConfig, got {self.breaker!r}")
        if self.hedge is not None and not isinstance(self.hedge, HedgeConfig):
            raise TypeError(f"RouterConfig.hedge: expected a HedgeConfig, got {self.hedge!r}")


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
    state (usually :class:`AllEndpointsDown`).
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

    __slots__ = ("error", "fn", "hedge", "last", "running")

    def __init__(self, fn: Callable[[Endpoint], Awaitable[Any]], hedge: bool) -> None:
        self.fn = fn
        self.hedge = hedge
        self.last: _Member | None = None
        self.error: Exception | None = None  # the last failure, the cause of AllEndpointsDown
        self.running: set[_Member] = set()


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

    __slots__ = ("_engine", "_hedger", "_members", "_turn", "config", "name")

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
        self._turn = itertools.count()
        self._compile(config if config is not None else RouterConfig(), budget, EventBus())
        self.replace(endpoints)

    def _compile(self, config: RouterConfig, budget: RetryGate | None, bus: EventBus) -> None:
        if not isinstance(config, RouterConfig):
            raise TypeError(f"Router.config: expected a RouterConfig, got {config!r}")
        self.config = config
        self._engine: Retried[[_Call], Awaitable[Any]] = retry(
            config.retry, on=_retryable, name=self.name, budget=budget, bus=bus
        )(self._run)
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
        # Copy-on-write: a call that is selecting keeps the tuple it read.
        self._members = tuple(sorted(members, key=lambda m: m.endpoint.priority))

    def replace(self, endpoints: Iterable[Endpoint]) -> None:
        """Make ``endpoints`` the router's endpoints; those that stay keep their breakers."""
        new = list(endpoints)
        names = [e.name for e in new]
        if len(set(names)) != len(names):
            raise ValueError(f"Router {self.name!r}: endpoint names must be unique, got {names}")
        for e in new:
            if not isinstance(e, Endpoint):
                raise TypeError(f"Router {self.name!r}: expected Endpoint objects, got {e!r}")
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
        self._changed(removed=(name,))

    def set_priority(self, name: str, priority: int) -> None:
        """Move endpoint ``name`` to another priority level, keeping its breaker."""
        member = self._member(name)
        e = member.endpoint
        member.endpoint = Endpoint(e.name, e.address, priority)
        self._install(self._members)
        self._changed(reprioritised=(name,))

    def _new_member(self, endpoint: Endpoint) -> _Member:
        if not isinstance(endpoint, Endpoint):
            raise TypeError(f"Router {self.name!r}: expected an Endpoint, got {endpoint!r}")
        return _Member(
            endpoint, CircuitBreaker(f"{self.name}/{endpoint.name}", self.config.breaker)
        )

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

    def _select(self, call: _Call, refused: set[_Member]) -> _Member | None:
        """The endpoint for the next attempt, or None when every endpoint refuses."""
        best: list[_Member] = []
        level = first_level = None
        for m in self._members:
            priority = m.endpoint.priority
            if first_level is None:
                first_level = priority
            if level is not None and priority != level:
                break
            if m in refused or m.breaker.state not in _ADMITTING:
                continue
            level = priority
            best.append(m)
        if not best:
            return None
        if level != first_level and listening(self.bus):
            assert first_level is not None and level is not None
            emit(
                PriorityFallthrough(
                    operation=self.name,
                    at=clock.now(),
                    from_priority=first_level,
                    to_priority=level,
                ),
                self.bus,
            )
        avoid = call.running | ({call.last} if call.last is not None else set())
        pool = [m for m in best if m not in avoid] or best
        if len(pool) == 1:
            return pool[0]
        keyed = [(_rate(m), m.in_flight, m) for m in pool]
        low = min(k[:2] for k in keyed)
        ties = [m for rate, load, m in keyed if (rate, load) == low]
        return ties[next(self._turn) % len(ties)]

    async def _admit(self, call: _Call) -> tuple[_Member, Permit]:
        """Select an endpoint and take a permit from its breaker (next one if it refuses)."""
        refused: set[_Member] = set()
        while True:
            member = self._select(call, refused)
            if member is None:
                if call.running:  # a hedge with nowhere to go: the running attempts go on
                    raise NoHedgeTarget(f"{self.name!r}: no other endpoint admits a hedge")
                raise AllEndpointsDown(self.name, self.states()) from call.error
            try:
                return member, await member.breaker.allow_async()
            except CircuitOpenError:  # opened (or its half-open probe went) meanwhile
                refused.add(member)

    # -- calling ---------------------------------------------------------------------------

    async def _attempt(self, call: _Call) -> Any:
        member, permit = await self._admit(call)
        last = call.last
        if last is not None and last is not member and listening(self.bus):
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
        call.running.add(member)
        start = clock.now()
        try:
            result = await call.fn(member.endpoint)
        except BaseException as exc:
            permit.failure(exc)  # a cancellation counts as nothing and frees a probe
            if isinstance(exc, Exception):
                call.last, call.error = member, exc
                if listening(self.bus):
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
            raise
        finally:
            member.in_flight -= 1
            call.running.discard(member)
        permit.success()
        return result

    async def _run(self, call: _Call) -> Any:
        """One attempt of the engine: a plain one, or a race of hedges."""
        if call.hedge and self._hedger is not None:
            return await self._hedger.race(self._attempt, (call,), {})
        return await self._attempt(call)

    async def call(
        self,
        fn: Callable[[Endpoint], Awaitable[T]],
        *,
        retry_on: Callable[[BaseException], bool] | None = None,
        hedge: bool = False,
    ) -> T:
        """Run ``fn(endpoint)`` on the best endpoint, retrying elsewhere as needed.

        ``retry_on`` decides which failures are retried (default: what
        :func:`~datapunk_recovery.errors.classify` calls retryable); errors an
        inner layer marked final never are.  ``hedge=True`` hedges the call
        across endpoints when the router has a hedge configuration: only for
        calls that are safe to run twice.
        """
        token = _RETRY_ON.set(retry_on)
        try:
            return await self._engine(_Call(fn, hedge))  # type: ignore[no-any-return]
        finally:
            _RETRY_ON.reset(token)

    def statistics(self) -> Statistics:
        """The retry engine's counters for this router's calls."""
        return self._engine.statistics()


def _rate(m: _Member) -> float:
    rate = m.breaker.failure_rate()
    return 0.0 if rate is None else rate


def _retryable(exc: BaseException) -> bool:
    decide = _RETRY_ON.get()
    return decide(exc) if decide is not None else classify(exc).retryable
