"""The retry engine: its loops and its decorator face, ``@retry``.

``@retry`` wraps sync and async functions and keeps their signature.  The
wrapper is the fast path; `_run_sync` / `_run_async` are the slow path, the
loops that run the attempts.  Every decision (retry or not, how long to
wait, when to give up) is made by the per-call state of `decision`, asked
after each attempt; the pause between two attempts is `pause`'s.  The block
form, ``for attempt in retrying(...): with attempt: ...`` (or ``async for``),
lives in `attempts` and is importable from here too.

The happy path (the call succeeds at once, no deadline, nobody listening)
builds no object, takes no lock and reads the clock once.  The first failure
moves the call onto the slow path, where the rest is accounted.  When a
metrics reader is installed (bus ``mode`` 1) the happy path also times the
attempt into the operation's statistics, which the reader pulls at scrape
time; only a subscriber that wants a successful call's events (``mode`` 2)
takes every call onto the slow path.

On giving up, the last exception is re-raised as itself, with a note
(PEP 678) saying how many attempts were made over how long and why the engine
stopped.  Cancellation (anything that is not an ``Exception``) passes through
untouched: never retried, never counted.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload

from .._core import clock
from .._core.backoff import RetryConfig
from .._core.context import CURRENT, REPORTING
from .._core.errors import DeadlineExceeded
from .._core.events import EventBus, global_bus
from .._core.policy import RetryGate, RetryPolicy
from .._core.stats import FOLD_AT, Statistics
from . import runtime as _runtime
from .attempts import AttemptContext as AttemptContext
from .attempts import Retrying as Retrying
from .attempts import retrying as retrying
from .decision import Engine, new_call
from .decision import On as On
from .decision import PolicySpec as PolicySpec
from .decision import ResultPredicate as ResultPredicate
from .pause import release_frames, sleep_async, sleep_sync

# The block form (`attempts`) and the types of the settings (`decision`) are
# imported ``as`` themselves: importable from here as before the split.
__all__ = ["Retried", "current_attempt", "retry"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def current_attempt() -> int:
    """The attempt number (1 for the first) of the innermost retrying call running now."""
    ctx = CURRENT.get()
    return 1 if ctx is None else ctx[1]


# ---------------------------------------------------------------------------
# Running a call: sync and async loops over the same decision.Call.


def _run_sync(
    e: Engine,
    fn: Callable[..., T],
    args: Any,
    kwargs: Any,
    start: float | None,
    error: Exception | None,
) -> T:
    """Run ``fn`` until it succeeds or the engine gives up; ``error`` is a first failure."""
    call = new_call(e, start)
    deadline_at = call.deadline_at
    # This call reports every attempt to the budget: layers inside it (a
    # hedger on the same budget) must not report them again.
    reporting = None if e.budget is None else REPORTING.set((*REPORTING.get(), e.budget))
    try:
        if error is not None:
            delay = call.decide(error)
            if delay is None:
                raise error
            release_frames(error)
            if delay and not sleep_sync(call, delay, error):
                raise error
        check = e.retry_if_result
        while True:
            if deadline_at is not None and clock.now() >= deadline_at:
                raise call.deadline_passed(error) from None
            token = CURRENT.set((deadline_at, call.attempt))
            if global_bus.mode or e.bus.mode:  # durations: for listeners and readers
                call.attempt_start = clock.now()
            try:
                result = fn(*args, **kwargs)
                ok = True
            except Exception as exc:
                error, ok = exc, False
            finally:
                CURRENT.reset(token)
            if ok:
                if check is None or not check(result):
                    call.succeeded()
                    return result
                delay = call.decide(None)
                if delay is None:
                    raise call.exhausted(result)
                if not sleep_sync(call, delay, None):
                    raise call.exhausted(result)
            else:
                assert error is not None
                delay = call.decide(error)
                if delay is None:
                    raise error
                release_frames(error)
                if delay and not sleep_sync(call, delay, error):
                    raise error
    finally:
        # The last error's traceback points at this frame: break the cycle.
        error = None
        if reporting is not None:
            REPORTING.reset(reporting)


async def _run_async(
    e: Engine,
    fn: Callable[..., Awaitable[T]],
    args: Any,
    kwargs: Any,
    start: float | None,
    error: Exception | None,
) -> T:
    """The async twin of `_run_sync()`; a deadline cancels the running attempt."""
    call = new_call(e, start)
    deadline_at = call.deadline_at
    # This call reports every attempt to the budget: layers inside it (a
    # hedger on the same budget) must not report them again.
    reporting = None if e.budget is None else REPORTING.set((*REPORTING.get(), e.budget))
    try:
        if error is not None:
            delay = call.decide(error)
            if delay is None:
                raise error
            release_frames(error)
            if delay and not await sleep_async(call, delay, error):
                raise error
        check = e.retry_if_result
        while True:
            if deadline_at is not None and clock.now() >= deadline_at:
                raise call.deadline_passed(error) from None
            token = CURRENT.set((deadline_at, call.attempt))
            # durations: for listeners and readers; the time left: for the timeout
            if deadline_at is not None or global_bus.mode or e.bus.mode:
                call.attempt_start = clock.now()
            try:
                if deadline_at is None:
                    result = await fn(*args, **kwargs)
                else:
                    # The time left now: attempt_start is kept only for listeners.
                    timed_out, got = await _runtime.call_within(
                        fn, args, kwargs, deadline_at - clock.now()
                    )
                    if timed_out:
                        raise call.deadline_passed(error, during=True) from error
                    result = cast(T, got)
                ok = True
            except DeadlineExceeded:
                raise
            except Exception as exc:
                error, ok = exc, False
            finally:
                CURRENT.reset(token)
            if ok:
                if check is None or not check(result):
                    call.succeeded()
                    return result
                delay = call.decide(None)
                if delay is None:
                    raise call.exhausted(result)
                if not await sleep_async(call, delay, None):
                    raise call.exhausted(result)
            else:
                assert error is not None
                delay = call.decide(error)
                if delay is None:
                    raise error
                release_frames(error)
                if delay and not await sleep_async(call, delay, error):
                    raise error
    finally:
        error = None
        if reporting is not None:
            REPORTING.reset(reporting)


# ---------------------------------------------------------------------------
# The decorator face.


class Retried(Protocol[P, R]):
    """A function wrapped by `retry()`: same signature, plus a few handles."""

    operation: str
    events: EventBus

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def statistics(self) -> Statistics:
        """The operation's counters now."""
        ...

    def retry_with(
        self,
        config: PolicySpec = None,
        *,
        on: On = None,
        retry_if_result: ResultPredicate | None = None,
        **changes: Any,
    ) -> Retried[P, R]:
        """The same function with other retry settings, for one call site."""
        ...


def _wrap(fn: Callable[..., Any], e: Engine) -> Any:
    """Build the wrapper for ``fn``: the fast path inline, the rest in ``_run_*``."""
    # Everything the fast path touches is bound to a local of the closure.
    slow = e.slow
    get_context = CURRENT.get
    first_try = e.stats.first_try_counter()
    gbus, lbus = global_bus, e.bus
    # The timed fast path (a metrics reader pulls attempt durations).
    stats = e.stats
    pend = stats.pending.append
    # Every FOLD_AT-th first-try success folds (the counter's value, no len()).
    fold_mask = FOLD_AT - 1
    clk = clock

    if inspect.iscoroutinefunction(fn):
        afn = cast(Callable[..., Coroutine[Any, Any, Any]], fn)

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            if slow or gbus.mode or lbus.mode or get_context() is not None:
                if slow or (gbus.mode | lbus.mode) != 1 or get_context() is not None:
                    return await _run_async(e, afn, args, kwargs, clock.now(), None)
                start = clk.now()
                try:
                    result = await afn(*args, **kwargs)
                except Exception as exc:
                    error = exc
                else:
                    pend(clk.now() - start)
                    if not first_try() & fold_mask:
                        stats.fold()
                    return result
                try:
                    return await _run_async(e, afn, args, kwargs, start, error)
                finally:
                    del error
            try:
                result = await afn(*args, **kwargs)
            except Exception as exc:
                error = exc
            else:
                first_try()
                return result
            try:
                return await _run_async(e, afn, args, kwargs, None, error)
            finally:
                # The error's traceback holds this frame: break the cycle, so
                # the failed attempt's frames die with the error (not at the
                # next garbage collection).
                del error

        wrapper: Any = async_wrapper
    else:

        @functools.wraps(fn)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            if slow or gbus.mode or lbus.mode or get_context() is not None:
                if slow or (gbus.mode | lbus.mode) != 1 or get_context() is not None:
                    return _run_sync(e, fn, args, kwargs, clock.now(), None)
                start = clk.now()
                try:
                    result = fn(*args, **kwargs)
                except Exception as exc:
                    error = exc
                else:
                    pend(clk.now() - start)
                    if not first_try() & fold_mask:
                        stats.fold()
                    return result
                try:
                    return _run_sync(e, fn, args, kwargs, start, error)
                finally:
                    del error
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                error = exc
            else:
                first_try()
                return result
            try:
                return _run_sync(e, fn, args, kwargs, None, error)
            finally:
                del error  # see async_wrapper

        wrapper = sync_wrapper

    def retry_with(
        config: PolicySpec = None,
        *,
        on: On = None,
        retry_if_result: ResultPredicate | None = None,
        **changes: Any,
    ) -> Any:
        policy = e.policy if config is None else RetryPolicy.of(config)
        if changes:
            try:
                default = dataclasses.replace(policy.default, **changes)
            except TypeError as exc:
                raise TypeError(f"retry_with: {exc}") from None
            policy = RetryPolicy(default, policy.per_category)
        on_spec: On = on if on is not None else (e.on_types or e.on_pred)
        check = retry_if_result if retry_if_result is not None else e.retry_if_result
        engine = Engine(e.name, policy, on_spec, check, e.budget, e.rng, e.stats, e.bus)
        return _wrap(fn, engine)

    wrapper.operation = e.name
    wrapper.events = e.bus
    wrapper.statistics = e.stats.snapshot
    wrapper.retry_with = retry_with
    return wrapper


def _operation_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or ""
    qualname = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}.{qualname}" if module else qualname


@overload
def retry(fn: Callable[P, R], /) -> Retried[P, R]: ...


@overload
def retry(
    config: PolicySpec = None,
    /,
    *,
    on: On = None,
    retry_if_result: ResultPredicate | None = None,
    name: str | None = None,
    budget: RetryGate | None = None,
    rng: random.Random | None = None,
    bus: EventBus | None = None,
) -> Callable[[Callable[P, R]], Retried[P, R]]: ...


def retry(
    config: Any = None,
    /,
    *,
    on: On = None,
    retry_if_result: ResultPredicate | None = None,
    name: str | None = None,
    budget: RetryGate | None = None,
    rng: random.Random | None = None,
    bus: EventBus | None = None,
) -> Any:
    """Retry a sync or async function.

    ``config`` is a [`RetryConfig`][datapunk_recovery._core.backoff.RetryConfig] or a
    [`RetryPolicy`][datapunk_recovery._core.policy.RetryPolicy] (defaults:
    3 attempts, full jitter from 0.1 s up to 10 s).  ``on`` chooses what to
    retry: exception types, a predicate, or ``None`` for what
    [`classify()`][datapunk_recovery._core.errors.classify]
    calls retryable (so a bare ``@retry`` is always bounded and never retries
    a bug).  ``retry_if_result`` retries a returned value it accepts (an HTTP
    503 returned, not raised); when attempts run out it raises
    [`RetryExhausted`][datapunk_recovery._core.errors.RetryExhausted] holding the last result.
    ``name``
    names the
    operation in events and statistics (default: the function's qualified
    name).  ``budget`` is asked before every retry.  ``rng`` makes the jitter
    reproducible.  ``bus`` is the operation's event bus (default: a new one,
    at ``fn.events``); a pipeline passes its own so that one bus sees all.
    """
    if callable(config) and not isinstance(config, RetryConfig | RetryPolicy):
        fn = config
        return _wrap(fn, Engine(_operation_name(fn), None, None, None, None, None))

    policy = RetryPolicy.of(config)

    def decorate(fn: Callable[P, R]) -> Retried[P, R]:
        engine = Engine(
            name or _operation_name(fn), policy, on, retry_if_result, budget, rng, bus=bus
        )
        return cast(Retried[P, R], _wrap(fn, engine))

    return decorate
