"""One pipeline that composes the flow-control primitives in a documented order.

A service holds one [`Pipeline`][datapunk_recovery.flow.pipeline.Pipeline] per dependency and sends
every
call
through it.  The default order, outermost first::

    fallback -> bulkhead -> rate limiter -> adaptive limit -> deadline
      -> retry (with budget) -> hedging -> breaker -> attempt timeout -> the call

and why:

- **fallback** outermost: it answers whatever went wrong inside, including
  the rejections of the layers below.
- **bulkhead / limiter / adaptive limit** outside the retry: a call holds one
  slot and one token for all its attempts, so retries cannot multiply
  concurrency or rate; a rejection is final (``do_not_retry_above``).
- **deadline** outside the retry: one deadline covers every attempt and
  every backoff sleep (async: the block is cancelled when it passes).
- **retry** with the **budget**: a refused retry gives up at once, marked so
  that no outer layer retries it.
- **hedging** inside the retry: hedges are extra attempts of one try, drawing
  on the same budget; async and idempotent calls only.
- **breaker** inside the retry and the hedging: every attempt and every
  hedge is judged, and an open breaker stops the retries at once
  (``CircuitOpenError`` is final).
- **attempt timeout** innermost: it bounds one attempt, so a timed-out
  attempt can be retried while the deadline still has room.

Users may build other orders with [`Pipeline.of()`][datapunk_recovery.flow.pipeline.Pipeline.of]
and the
stage classes.
Each stage costs little on the happy path: the retry stage makes the first
attempt itself and hands over to the retry engine only on a failure (or when
a subscriber wants a successful call's events, or a metrics reader times
attempts: the engine's own test).  For a subscriber that wants it, the
pipeline also emits [`StageEntered`][datapunk_recovery.flow.pipeline.StageEntered]
as each
stage is
entered, which shows the order.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, ParamSpec, Protocol, TypeVar, cast, overload

from .._core import clock
from .._core.backoff import RetryConfig
from .._core.context import CALLER as _CALLER
from .._core.context import CURRENT, REPORTING
from .._core.events import Event, EventBus, emit, global_bus, listening
from .._core.policy import RetryGate, RetryPolicy
from .._core.stats import Statistics, count_value
from .._core.validate import check_seconds, shown
from .._execution.deadline import Deadline
from .._execution.engine import On, ResultPredicate, Retried, retry
from .._execution.timeout import AttemptTimeout
from .adaptive import AIMD, AdaptiveLimiter, Gradient
from .bulkhead import Bulkhead, BulkheadConfig
from .fallback import Fallback
from .hedging import HedgeConfig, Hedger, is_idempotent
from .ratelimit import RateLimiter, RateLimiterConfig

__all__ = [
    "AdaptiveStage",
    "BreakerLike",
    "BreakerStage",
    "BulkheadStage",
    "DeadlineStage",
    "FallbackStage",
    "HedgeStage",
    "LegacyStage",
    "LimiterStage",
    "Pipeline",
    "RetryStage",
    "Stage",
    "StageAliases",
    "StageEntered",
    "TimeoutStage",
]

P = ParamSpec("P")
T = TypeVar("T")

Run = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
"""One stage's sync entry: ``run(fn, args, kwargs)`` runs the rest of the chain."""
ARun = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Awaitable[Any]]
"""One stage's async entry."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StageEntered(Event):
    """A call entered stage ``stage`` of pipeline ``operation`` (built only if wanted)."""

    name: ClassVar[str] = "pipeline.stage"
    area: ClassVar[str] = "pipeline"

    stage: str


class Stage(Protocol):
    """A layer of a pipeline: wraps the rest of the chain, sync and async.

    ``wrap(nxt)`` / ``wrap_async(nxt)`` follow the library's twin convention
    (``x()`` / ``x_async()``).  A stage written for an older release, with
    ``sync(nxt)`` / ``asyn(nxt)`` instead (a
    [`LegacyStage`][datapunk_recovery.flow.pipeline.LegacyStage]), is still
    accepted, and the library's own stages still answer to those names too.
    """

    #: Names the stage in events (``"retry"``, ``"bulkhead"``, ...).
    name: str

    def wrap(self, nxt: Run) -> Run:
        """The sync entry of this stage around ``nxt``."""
        ...

    def wrap_async(self, nxt: ARun) -> ARun:
        """The async entry of this stage around ``nxt``."""
        ...


class LegacyStage(Protocol):
    """A stage with the former method names ``sync(nxt)`` / ``asyn(nxt)`` (still accepted)."""

    name: str

    def sync(self, nxt: Run) -> Run: ...

    def asyn(self, nxt: ARun) -> ARun: ...


class StageAliases:
    """Gives a stage with ``wrap()`` / ``wrap_async()`` the former names ``sync()`` / ``asyn()``."""

    __slots__ = ()

    def wrap(self, nxt: Run) -> Run:
        raise NotImplementedError

    def wrap_async(self, nxt: ARun) -> ARun:
        raise NotImplementedError

    def sync(self, nxt: Run) -> Run:
        """The former name of ``wrap()``, kept working."""
        return self.wrap(nxt)

    def asyn(self, nxt: ARun) -> ARun:
        """The former name of ``wrap_async()``, kept working."""
        return self.wrap_async(nxt)


def _entries(stage: object) -> tuple[Callable[[Run], Run], Callable[[ARun], ARun]] | None:
    """A stage's sync and async entries, by the current names or the former ones."""
    for sync_name, async_name in (("wrap", "wrap_async"), ("sync", "asyn")):
        wrap, wrap_async = getattr(stage, sync_name, None), getattr(stage, async_name, None)
        if callable(wrap) and callable(wrap_async):
            return wrap, wrap_async
    return None


class BreakerLike(Protocol):
    """What the breaker stage needs from a circuit breaker (``breaker.CircuitBreaker``).

    ``call`` / ``call_async`` run one attempt under the breaker: they raise
    ``CircuitOpenError`` when it refuses, record the outcome, and count a
    cancellation as nothing.
    """

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...

    async def call_async(
        self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any
    ) -> T: ...


# ---------------------------------------------------------------------------
# Stages


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


async def _acall(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return await fn(*args, **kwargs)


def _through(call: Callable[..., Any], nxt: Run) -> Run:
    """A stage entry that runs the rest of the chain as ``call(nxt, fn, args, kwargs)``.

    For the primitives whose own ``call`` face already does the stage's work
    (fallback, breaker, attempt timeout): the rest of the chain is the function
    they protect.
    """

    def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return call(nxt, fn, args, kwargs)

    return run


def _athrough(call: Callable[..., Awaitable[Any]], nxt: ARun) -> ARun:
    """The async twin of `_through()`, for a primitive's ``call_async`` face."""

    async def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return await call(nxt, fn, args, kwargs)

    return run


class FallbackStage(StageAliases):
    """Answer with the fallback when the rest of the chain fails as chosen."""

    name = "fallback"

    def __init__(self, fallback: Fallback[Any]) -> None:
        if not isinstance(fallback, Fallback):
            raise TypeError(f"FallbackStage: expected a Fallback, got {shown(fallback)}")
        self.fallback = fallback

    def wrap(self, nxt: Run) -> Run:
        return _through(self.fallback.call, nxt)

    def wrap_async(self, nxt: ARun) -> ARun:
        return _athrough(self.fallback.call_async, nxt)


class BulkheadStage(StageAliases):
    """Hold a bulkhead slot for the whole call (every attempt included)."""

    name = "bulkhead"

    def __init__(self, bulkhead: Bulkhead) -> None:
        if not isinstance(bulkhead, Bulkhead):
            raise TypeError(f"BulkheadStage: expected a Bulkhead, got {shown(bulkhead)}")
        self.bulkhead = bulkhead

    def wrap(self, nxt: Run) -> Run:
        slots = self.bulkhead.slots
        acquire, release, caller = slots.acquire, slots.release, _CALLER.get

        def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            who = caller()
            acquire(who)
            try:
                return nxt(fn, args, kwargs)
            finally:
                release(who)

        return run

    def wrap_async(self, nxt: ARun) -> ARun:
        slots = self.bulkhead.slots
        acquire, release, caller = slots.acquire_async, slots.release, _CALLER.get

        async def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            who = caller()
            await acquire(who)
            try:
                return await nxt(fn, args, kwargs)
            finally:
                release(who)

        return run


class LimiterStage(StageAliases):
    """Take a rate-limiter token per call; drain on a throttled result or error."""

    name = "ratelimit"

    def __init__(self, limiter: RateLimiter) -> None:
        if not isinstance(limiter, RateLimiter):
            raise TypeError(f"LimiterStage: expected a RateLimiter, got {shown(limiter)}")
        self.limiter = limiter

    def wrap(self, nxt: Run) -> Run:
        limiter = self.limiter
        acquire, observe, observe_error = limiter.acquire, limiter.observe, limiter.observe_error
        watch = limiter.config.throttled is not None

        def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            acquire()
            try:
                result = nxt(fn, args, kwargs)
            except Exception as exc:
                observe_error(exc)
                raise
            if watch:
                observe(result)
            return result

        return run

    def wrap_async(self, nxt: ARun) -> ARun:
        limiter = self.limiter
        acquire, observe, observe_error = (
            limiter.acquire_async,
            limiter.observe,
            limiter.observe_error,
        )
        watch = limiter.config.throttled is not None

        async def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            await acquire()
            try:
                result = await nxt(fn, args, kwargs)
            except Exception as exc:
                observe_error(exc)
                raise
            if watch:
                observe(result)
            return result

        return run


class AdaptiveStage(StageAliases):
    """Run the call under an adaptive concurrency limit and teach it the outcome."""

    name = "adaptive"

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        if not isinstance(limiter, AdaptiveLimiter):
            raise TypeError(f"AdaptiveStage: expected an AdaptiveLimiter, got {shown(limiter)}")
        self.limiter = limiter

    def wrap(self, nxt: Run) -> Run:
        acquire, settle = self.limiter.acquire, self.limiter.settle

        def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            permit = acquire()
            try:
                result = nxt(fn, args, kwargs)
            except BaseException as exc:
                settle(permit, exc)
                raise
            permit.success()
            return result

        return run

    def wrap_async(self, nxt: ARun) -> ARun:
        acquire, settle = self.limiter.acquire_async, self.limiter.settle

        async def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            permit = await acquire()
            try:
                result = await nxt(fn, args, kwargs)
            except BaseException as exc:
                settle(permit, exc)
                raise
            permit.success()
            return result

        return run


class DeadlineStage(StageAliases):
    """One deadline over the whole call (published sync; enforced by cancellation async)."""

    name = "deadline"

    def __init__(self, seconds: float, *, operation: str = "pipeline") -> None:
        self.seconds = check_seconds("DeadlineStage", "seconds", seconds, positive=True)
        self.operation = operation

    def wrap(self, nxt: Run) -> Run:
        seconds, get, set_, reset = self.seconds, CURRENT.get, CURRENT.set, CURRENT.reset

        def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            at = clock.now() + seconds
            ctx = get()
            if ctx is None:
                token = set_((at, 1))
            else:
                if ctx[0] is not None and ctx[0] < at:
                    at = ctx[0]
                token = set_((at, ctx[1]))
            try:
                return nxt(fn, args, kwargs)
            finally:
                reset(token)

        return run

    def wrap_async(self, nxt: ARun) -> ARun:
        seconds, operation = self.seconds, self.operation

        async def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            async with Deadline(seconds, name=operation):
                return await nxt(fn, args, kwargs)

        return run


def _replay_sync(box: list[Exception], nxt: Run, fn: Any, args: Any, kwargs: Any) -> Any:
    # The retry engine's view of an attempt: the first one already ran (and
    # failed) in the stage's fast path, so its error is raised again here.
    if box:
        raise box.pop()
    return nxt(fn, args, kwargs)


async def _replay_async(box: list[Exception], nxt: ARun, fn: Any, args: Any, kwargs: Any) -> Any:
    if box:
        raise box.pop()
    return await nxt(fn, args, kwargs)


class RetryStage(StageAliases):
    """Retry the rest of the chain with the retry engine, asking ``budget`` before each retry.

    ``config``, ``on`` and ``retry_if_result`` are the engine's (see
    [`datapunk_recovery._execution.engine.retry()`][datapunk_recovery._execution.engine.retry]);
    the operation is named
    ``name``.
    """

    name = "retry"

    def __init__(
        self,
        config: RetryConfig | RetryPolicy | None = None,
        *,
        on: On = None,
        retry_if_result: ResultPredicate | None = None,
        budget: RetryGate | None = None,
        operation: str = "pipeline",
        bus: EventBus | None = None,
    ) -> None:
        self.policy = RetryPolicy.of(config)
        self.budget = budget
        make = retry(
            self.policy,
            on=on,
            retry_if_result=retry_if_result,
            name=operation,
            budget=budget,
            bus=bus,
        )
        self._sync: Retried[..., Any] = make(_replay_sync)
        self._async: Retried[..., Any] = make(_replay_async)
        # Calls whose first attempt succeeded in the stage's own fast path:
        # the engine never saw them, statistics() adds them.
        self._first_try = itertools.count()
        self._fast = self.policy.default.deadline is None and retry_if_result is None

    def statistics(self) -> Statistics:
        """The retry counters of every call through this stage, sync and async."""
        a, b = self._sync.statistics(), self._async.statistics()
        fast = count_value(self._first_try)
        giveups = dict(a.giveups)
        for reason, n in b.giveups.items():
            giveups[reason] = giveups.get(reason, 0) + n
        return Statistics(
            calls=a.calls + b.calls + fast,
            successes=a.successes + b.successes + fast,
            failures=a.failures + b.failures,
            attempts=a.attempts + b.attempts + fast,
            retries=a.retries + b.retries,
            giveups=giveups,
        )

    def wrap(self, nxt: Run) -> Run:
        retried, fast, budget = self._sync, self._fast, self.budget
        first_try = self._first_try.__next__
        engine_bus = retried.events

        def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            # As the engine's own fast path: the engine takes the call when a
            # subscriber wants a successful call's events or a metrics reader
            # times attempts (mode), not because someone listens for other
            # kinds.  ``active`` (a bool: the cheapest truth test) first, so
            # the unobserved path reads no int.
            if not fast or (
                (global_bus.active or engine_bus.active) and (global_bus.mode or engine_bus.mode)
            ):
                return retried([], nxt, fn, args, kwargs)
            # This stage reports the first attempt to the budget (the engine
            # the others): the stages inside must not report it again.
            reporting = None if budget is None else REPORTING.set((*REPORTING.get(), budget))
            try:
                result = nxt(fn, args, kwargs)
            except Exception as exc:
                return retried([exc], nxt, fn, args, kwargs)
            finally:
                if reporting is not None:
                    REPORTING.reset(reporting)
            if budget is not None:
                budget.on_attempt(True)
            first_try()
            return result

        return run

    def wrap_async(self, nxt: ARun) -> ARun:
        retried, fast, budget = self._async, self._fast, self.budget
        first_try = self._first_try.__next__
        engine_bus = retried.events

        async def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not fast or (  # see wrap()
                (global_bus.active or engine_bus.active) and (global_bus.mode or engine_bus.mode)
            ):
                return await retried([], nxt, fn, args, kwargs)
            reporting = None if budget is None else REPORTING.set((*REPORTING.get(), budget))
            try:  # see sync()
                result = await nxt(fn, args, kwargs)
            except Exception as exc:
                return await retried([exc], nxt, fn, args, kwargs)
            finally:
                if reporting is not None:
                    REPORTING.reset(reporting)
            if budget is not None:
                budget.on_attempt(True)
            first_try()
            return result

        return run


class HedgeStage(StageAliases):
    """Hedge each attempt of idempotent async calls (sync calls are refused)."""

    name = "hedging"

    def __init__(self, hedger: Hedger, *, idempotent: bool = False) -> None:
        if not isinstance(hedger, Hedger):
            raise TypeError(f"HedgeStage: expected a Hedger, got {shown(hedger)}")
        self.hedger = hedger
        #: Treat every call as idempotent (else only functions marked with ``idempotent``).
        self.idempotent = idempotent

    def wrap(self, nxt: Run) -> Run:
        name = self.hedger.name

        def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            raise TypeError(
                f"pipeline with hedging ({name!r}): hedging needs async calls "
                "(a sync call cannot be cancelled); use call_async()"
            )

        return run

    def wrap_async(self, nxt: ARun) -> ARun:
        race, always = self.hedger.race, self.idempotent

        async def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if always or is_idempotent(fn):
                return await race(nxt, (fn, args, kwargs), {})
            return await nxt(fn, args, kwargs)

        return run


class BreakerStage(StageAliases):
    """Run each attempt through the circuit breaker (its own fast path, its own rules)."""

    name = "breaker"

    def __init__(self, breaker: BreakerLike) -> None:
        if not callable(getattr(breaker, "call", None)) or not callable(
            getattr(breaker, "call_async", None)
        ):
            raise TypeError(f"BreakerStage: expected a circuit breaker, got {shown(breaker)}")
        self.breaker = breaker

    def wrap(self, nxt: Run) -> Run:
        return _through(self.breaker.call, nxt)

    def wrap_async(self, nxt: ARun) -> ARun:
        return _athrough(self.breaker.call_async, nxt)


class TimeoutStage(StageAliases):
    """Bound each attempt (async: cancelled; sync: published and checked)."""

    name = "timeout"

    def __init__(self, timeout: AttemptTimeout) -> None:
        if not isinstance(timeout, AttemptTimeout):
            raise TypeError(f"TimeoutStage: expected an AttemptTimeout, got {shown(timeout)}")
        self.timeout = timeout

    def wrap(self, nxt: Run) -> Run:
        return _through(self.timeout.call, nxt)

    def wrap_async(self, nxt: ARun) -> ARun:
        return _athrough(self.timeout.call_async, nxt)


def _observed_sync(stage: str, operation: str, bus: EventBus, nxt: Run) -> Run:
    def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        emit(StageEntered(operation=operation, at=clock.now(), stage=stage), bus)
        return nxt(fn, args, kwargs)

    return run


def _observed_async(stage: str, operation: str, bus: EventBus, nxt: ARun) -> ARun:
    async def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        emit(StageEntered(operation=operation, at=clock.now(), stage=stage), bus)
        return await nxt(fn, args, kwargs)

    return run


# ---------------------------------------------------------------------------
# The pipeline


class Pipeline:
    """The flow-control layers of one dependency, composed once (see the module doc).

    Every argument but ``name`` is optional; what is given becomes a stage in
    the default order.  ``retry`` defaults to the engine's defaults (3
    attempts, full jitter); pass ``retry=None`` for no retry stage.  Configs
    build primitives owned by the pipeline (sharing its event bus); ready
    primitives
    (a [`Bulkhead`][datapunk_recovery.flow.bulkhead.Bulkhead] shared with another pipeline, a
    breaker
    from a registry) are used as they are.  ``hedge`` hedges async calls
    marked idempotent, or every async call with ``idempotent=True``; hedges
    draw on ``budget``.  ``deadline`` (the whole call) and ``attempt_timeout``
    (each attempt) are in seconds.

    Faces: [`call()`][datapunk_recovery.flow.pipeline.Pipeline.call],
    [`call_async()`][datapunk_recovery.flow.pipeline.Pipeline.call_async], and the object as a
    decorator
    (sync and async, signature kept).
    """

    __slots__ = ("_async", "_async_observed", "_sync", "_sync_observed", "bus", "name", "stages")

    def __init__(
        self,
        name: str,
        *,
        fallback: Fallback[Any] | None = None,
        bulkhead: Bulkhead | BulkheadConfig | None = None,
        limiter: RateLimiter | RateLimiterConfig | None = None,
        adaptive: AdaptiveLimiter | AIMD | Gradient | None = None,
        deadline: float | None = None,
        retry: RetryConfig | RetryPolicy | None = RetryConfig(),  # noqa: B008 - frozen
        retry_on: On = None,
        retry_if_result: ResultPredicate | None = None,
        budget: RetryGate | None = None,
        hedge: Hedger | HedgeConfig | None = None,
        idempotent: bool = False,
        breaker: BreakerLike | None = None,
        attempt_timeout: float | AttemptTimeout | None = None,
        bus: EventBus | None = None,
    ) -> None:
        bus = bus if bus is not None else EventBus()
        stages: list[Stage] = []
        if fallback is not None:
            stages.append(FallbackStage(fallback))
        if bulkhead is not None:
            if isinstance(bulkhead, BulkheadConfig):
                bulkhead = Bulkhead(name, bulkhead, bus=bus)
            stages.append(BulkheadStage(bulkhead))
        if limiter is not None:
            if isinstance(limiter, RateLimiterConfig):
                limiter = RateLimiter(name, limiter, bus=bus)
            stages.append(LimiterStage(limiter))
        if adaptive is not None:
            if isinstance(adaptive, AIMD | Gradient):
                adaptive = AdaptiveLimiter(name, adaptive, bus=bus)
            stages.append(AdaptiveStage(adaptive))
        if deadline is not None:
            stages.append(DeadlineStage(deadline, operation=name))
        if retry is not None:
            stages.append(
                RetryStage(
                    retry,
                    on=retry_on,
                    retry_if_result=retry_if_result,
                    budget=budget,
                    operation=name,
                    bus=bus,
                )
            )
        if hedge is not None:
            if isinstance(hedge, HedgeConfig):
                hedge = Hedger(name, hedge, budget=budget, bus=bus)
            stages.append(HedgeStage(hedge, idempotent=idempotent))
        if breaker is not None:
            stages.append(BreakerStage(breaker))
        if attempt_timeout is not None:
            if not isinstance(attempt_timeout, AttemptTimeout):
                attempt_timeout = AttemptTimeout(attempt_timeout, name=name, bus=bus)
            stages.append(TimeoutStage(attempt_timeout))
        self._build(name, stages, bus)

    @classmethod
    def of(
        cls, name: str, stages: Sequence[Stage | LegacyStage], *, bus: EventBus | None = None
    ) -> Pipeline:
        """A pipeline with the given stages in the given order, outermost first."""
        for stage in stages:
            if _entries(stage) is None:
                raise TypeError(f"Pipeline.of: expected stages, got {shown(stage)}")
        pipeline = cls.__new__(cls)
        pipeline._build(name, list(stages), bus if bus is not None else EventBus())
        return pipeline

    def _build(self, name: str, stages: Sequence[Stage | LegacyStage], bus: EventBus) -> None:
        self.name = name
        #: Where the pipeline's own stages report (then the global bus).
        self.bus = bus
        #: The stages, outermost first.
        self.stages: tuple[Stage | LegacyStage, ...] = tuple(stages)
        run: Run = _call
        arun: ARun = _acall
        observed: Run = _call
        aobserved: ARun = _acall
        for stage in reversed(stages):
            entries = _entries(stage)
            assert entries is not None  # checked by of(); the built-in stages have both
            wrap, wrap_async = entries
            run = wrap(run)
            arun = wrap_async(arun)
            observed = _observed_sync(stage.name, name, bus, wrap(observed))
            aobserved = _observed_async(stage.name, name, bus, wrap_async(aobserved))
        self._sync = run
        self._async = arun
        self._sync_observed = observed
        self._async_observed = aobserved

    def stage(self, name: str) -> Stage | LegacyStage:
        """The (first) stage called ``name`` (``"retry"``, ``"bulkhead"``, ...)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"pipeline {self.name!r} has no {name!r} stage")

    def statistics(self) -> Statistics:
        """The retry stage's counters (``KeyError`` without a retry stage)."""
        return cast(RetryStage, self.stage("retry")).statistics()

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` through every stage."""
        if (global_bus.active or self.bus.active) and listening(self.bus, StageEntered):
            return cast(T, self._sync_observed(fn, args, kwargs))
        return cast(T, self._sync(fn, args, kwargs))

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn(*args, **kwargs)`` through every stage."""
        if (global_bus.active or self.bus.active) and listening(self.bus, StageEntered):
            return cast(T, await self._async_observed(fn, args, kwargs))
        return cast(T, await self._async(fn, args, kwargs))

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate a sync or async function; its signature is kept."""
        if inspect.iscoroutinefunction(fn):
            arun, aobserved, bus = self._async, self._async_observed, self.bus

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                if (global_bus.active or bus.active) and listening(bus, StageEntered):
                    return await aobserved(fn, args, kwargs)
                return await arun(fn, args, kwargs)

            return async_wrapper

        run, observed, bus = self._sync, self._sync_observed, self.bus

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            if (global_bus.active or bus.active) and listening(bus, StageEntered):
                return observed(fn, args, kwargs)
            return run(fn, args, kwargs)

        return sync_wrapper
