"""The retry engine: one engine, two faces (a decorator and a block form).

``@retry`` wraps sync and async functions and keeps their signature;
``for attempt in retrying(...): with attempt: ...`` (or ``async for``) retries
a block.  Both are driven by the same per-call state, `_Call`, which
holds every decision: retry or not, how long to wait, when to give up.

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
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload

from .._core import clock
from .._core.backoff import RetryConfig, server_delay
from .._core.context import CURRENT, REPORTING
from .._core.errors import (
    DeadlineExceeded,
    ErrorCategory,
    RecoveryError,
    RetryExhausted,
    classify,
    final_reason,
    mark_final,
)
from .._core.events import (
    AttemptFinished,
    CallFinished,
    EventBus,
    GaveUp,
    GiveUpReason,
    HintIgnored,
    RetryScheduled,
    emit,
    global_bus,
    listening,
)
from .._core.policy import RetryGate, RetryPolicy
from .._core.redact import redact_text, safe_repr
from .._core.stats import FOLD_AT, OperationStats, Statistics
from .._core.validate import shown
from . import runtime as _runtime

__all__ = ["AttemptContext", "Retried", "Retrying", "current_attempt", "retry", "retrying"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

On = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool] | None
"""What to retry: exception types, a predicate, or ``None`` for the classifier."""

ResultPredicate = Callable[[Any], bool]
PolicySpec = RetryConfig | RetryPolicy | None

_FINAL_MARK = "_datapunk_recovery_final"


def current_attempt() -> int:
    """The attempt number (1 for the first) of the innermost retrying call running now."""
    ctx = CURRENT.get()
    return 1 if ctx is None else ctx[1]


class _Engine:
    """The compiled settings of one operation, shared by all its calls."""

    __slots__ = (
        "budget",
        "bus",
        "config",
        "count_retry",
        "count_slow_success",
        "name",
        "on_pred",
        "on_types",
        "per_category",
        "policy",
        "retry_if_result",
        "rng",
        "slow",
        "stats",
    )

    def __init__(
        self,
        name: str,
        policy: PolicySpec,
        on: On,
        retry_if_result: ResultPredicate | None,
        budget: RetryGate | None,
        rng: random.Random | None,
        stats: OperationStats | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.name = name
        self.policy = RetryPolicy.of(policy)
        self.config = self.policy.default
        self.per_category = self.policy.per_category or None
        self.on_types: tuple[type[BaseException], ...] | None = None
        self.on_pred: Callable[[BaseException], bool] | None = None
        if isinstance(on, type) and issubclass(on, BaseException):
            self.on_types = (on,)
        elif isinstance(on, tuple):
            if not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
                raise TypeError(f"retry on=: expected exception types, got {shown(on)}")
            self.on_types = on
        elif on is not None:
            if not callable(on):
                raise TypeError(f"retry on=: expected types, a predicate or None, got {shown(on)}")
            self.on_pred = cast(Callable[[BaseException], bool], on)
        if retry_if_result is not None and not callable(retry_if_result):
            raise TypeError(
                f"retry retry_if_result=: expected a predicate, got {shown(retry_if_result)}"
            )
        if budget is not None and not isinstance(budget, RetryGate):
            raise TypeError(f"retry budget=: expected a RetryGate, got {shown(budget)}")
        self.retry_if_result = retry_if_result
        self.budget = budget
        self.rng = rng
        self.bus = bus if bus is not None else EventBus()
        self.stats = stats if stats is not None else OperationStats(name, self.bus)
        self.count_retry = self.stats.retried
        self.count_slow_success = self.stats.slow_success_counter()
        # Anything that needs accounting on every call leaves the fast path.
        self.slow = (
            self.policy.default.deadline is not None
            or retry_if_result is not None
            or budget is not None
        )

    def observed(self) -> bool:
        return global_bus.active or self.bus.active

    def timed(self) -> bool:
        """Whether attempts are timed (a metrics reader or an event subscriber wants it)."""
        return bool(global_bus.mode or self.bus.mode)

    def deadline_at(self, start: float) -> float | None:
        own = self.policy.default.deadline
        at = None if own is None else start + own
        ctx = CURRENT.get()
        if ctx is not None and ctx[0] is not None and (at is None or ctx[0] < at):
            at = ctx[0]
        return at

    def emit_first_try(self, start: float, at: float) -> None:
        """Report a first-try success to those who want its events: one event each.

        The call and its one attempt say the same (one attempt, succeeded,
        the same duration): a subscriber that wants ``CallFinished`` gets
        that alone; ``AttemptFinished`` is built only for subscribers that
        want it and not the call's event.
        """
        bus = self.bus
        if listening(bus, CallFinished):
            emit(CallFinished(self.name, at, 1, at - start, True), bus)
        if listening(bus, AttemptFinished, CallFinished):
            emit(AttemptFinished(self.name, at, 1, at - start, True), bus, CallFinished)


class _Call:
    """The state of one call that needs more than the fast path."""

    __slots__ = (
        "attempt",
        "attempt_start",
        "deadline_at",
        "engine",
        "iters",
        "start",
        "start_is_failure",
    )

    def __init__(
        self,
        engine: _Engine,
        start: float,
        deadline_at: float | None,
        start_is_failure: bool,
    ) -> None:
        self.engine = engine
        self.start = start
        # True when the fast path, which reads no clock, handed over at the
        # first failure: elapsed times then count from that failure.
        self.start_is_failure = start_is_failure
        self.attempt_start = start
        self.deadline_at = deadline_at
        self.attempt = 1
        self.iters: dict[int, Iterator[float]] | None = None

    def succeeded(self) -> None:
        e = self.engine
        if e.budget is not None:
            e.budget.on_attempt(True)
        timed = e.timed()
        if timed:
            at = clock.now()
            e.stats.observe(at - self.attempt_start)
        if self.attempt == 1:
            e.stats.first_try_success()
            if timed and e.observed():
                e.emit_first_try(self.start, at)
            return
        e.count_slow_success()
        if timed and e.observed():
            if listening(e.bus, AttemptFinished):
                duration = at - self.attempt_start
                emit(AttemptFinished(e.name, at, self.attempt, duration, True), e.bus)
            if listening(e.bus, CallFinished):
                emit(CallFinished(e.name, at, self.attempt, at - self.start, True), e.bus)

    def failed(self, exc: Exception | None) -> float | None:
        """Decide after a failed attempt (``exc``) or a rejected result (``None``).

        Returns the delay before the next attempt, or ``None`` to give up.  One
        method for both, because this is the failure path's whole cost.
        """
        e = self.engine
        observed = global_bus.active or e.bus.active
        timed = global_bus.mode or e.bus.mode
        config = e.config
        if exc is None:
            category, hint, retry, forbidden = ErrorCategory.UNKNOWN, None, True, False
        else:
            verdict = classify(exc)
            category, hint = verdict.category, verdict.delay_hint
            if e.on_types is not None:
                retry = isinstance(exc, e.on_types)
            elif e.on_pred is not None:
                retry = bool(e.on_pred(exc))
            else:
                retry = verdict.retryable
            forbidden = getattr(exc, _FINAL_MARK, None) is not None or (
                isinstance(exc, RecoveryError) and exc.do_not_retry_above
            )
            if e.per_category is not None:
                config = e.per_category.get(category, config)
        if timed:
            now = clock.now()
            e.stats.observe(now - self.attempt_start)
        if observed and listening(e.bus, AttemptFinished):
            now = clock.now()
            emit(
                AttemptFinished(
                    operation=e.name,
                    at=now,
                    attempt=self.attempt,
                    duration=now - self.attempt_start,
                    succeeded=False,
                    error_type=_error_type(exc),
                    category=category,
                ),
                e.bus,
            )
        if e.budget is not None:
            e.budget.on_attempt(False)
        if forbidden or not retry:
            assert exc is not None
            why = (
                f"an inner layer forbade retrying ({final_reason(exc)})"
                if forbidden
                else f"{type(exc).__name__} is not retryable"
            )
            return self._give_up(exc, GiveUpReason.NON_RETRYABLE, why, self.attempt > 1)
        n = self.attempt
        if config.max_attempts is not None and n >= config.max_attempts:
            return self._give_up(
                exc, GiveUpReason.ATTEMPTS, f"max_attempts={config.max_attempts} reached"
            )
        # The one delay rule (RetryConfig.next_delay), with this call's own
        # sequence for the decorrelated kinds.
        delay = config.next_delay(n, e.rng, self._draws(config) if config.stateful else None)
        from_server = False
        # The clock is read only when something needs the time.
        now = clock.now() if observed or self.deadline_at is not None else 0.0
        remaining = None if self.deadline_at is None else self.deadline_at - now
        if hint is not None:
            decision = server_delay(delay, hint, config, remaining)
            if decision.ignored:
                if observed and listening(e.bus, HintIgnored):
                    emit(
                        HintIgnored(
                            operation=e.name,
                            at=now,
                            value=_safe_repr(hint),
                            reason="server delay is not a finite number >= 0",
                        ),
                        e.bus,
                    )
            elif decision.give_up:
                limit = (
                    "the time left"
                    if decision.delay <= config.max_server_delay
                    else f"max_server_delay={config.max_server_delay:g} s"
                )
                return self._give_up(
                    exc,
                    GiveUpReason.SERVER_DELAY_TOO_LONG,
                    f"the server asked to wait {decision.delay:.3f} s, more than {limit}",
                )
            else:
                delay, from_server = decision.delay, decision.from_server
        if remaining is not None and (remaining <= 0.0 or (delay > 0.0 and delay >= remaining)):
            return self._give_up(
                exc,
                GiveUpReason.DEADLINE,
                f"the next wait ({delay:.3f} s) would end past the deadline "
                f"({max(remaining, 0.0):.3f} s left)",
            )
        if e.budget is not None and not e.budget.allow_retry():
            if exc is not None:
                mark_final(exc, "retry budget exhausted")
            return self._give_up(exc, GiveUpReason.BUDGET, "the retry budget refused")
        if observed and listening(e.bus, RetryScheduled):
            emit(
                RetryScheduled(
                    operation=e.name,
                    at=now,
                    retry=n,
                    delay=delay,
                    from_server=from_server,
                    category=category,
                    error_type=_error_type(exc),
                ),
                e.bus,
            )
        e.count_retry(category)
        self.attempt = n + 1
        return delay

    def decide(self, exc: Exception | None) -> float | None:
        """`failed()`, except that an error of the library's own never escapes.

        The caller's exception is what the call raises, whatever goes wrong
        while deciding about it (a clock, a budget, a delay out of range):
        the internal error becomes a note on it and the call gives up.
        """
        try:
            return self.failed(exc)
        except Exception as internal:
            self.internal_error(exc, internal, "deciding the next attempt")
            return None

    def internal_error(self, exc: BaseException | None, internal: Exception, doing: str) -> None:
        """Give up after ``internal`` broke the engine while ``doing``; ``exc`` stays the error."""
        why = f"an internal error while {doing}: {type(internal).__name__}: {internal}"
        try:
            self._give_up(exc, GiveUpReason.INTERNAL_ERROR, redact_text(why)[:300])
        except Exception:  # the accounting itself failed: the note at least
            if exc is not None:
                exc.add_note(f"datapunk-recovery: gave up after {redact_text(why)[:300]}")

    def _draws(self, config: RetryConfig) -> Iterator[float]:
        # The decorrelated kinds: one sequence per configuration within a call.
        if self.iters is None:
            self.iters = {}
        it = self.iters.get(id(config))
        if it is None:
            # Never runs dry: the attempt count is checked before each delay.
            it = self.iters[id(config)] = config.delays(self.engine.rng)
        return it

    def _give_up(
        self,
        exc: BaseException | None,
        reason: GiveUpReason,
        why: str,
        note: bool = True,
    ) -> float | None:
        """Account the end of the call; returns None so callers can ``return`` it."""
        e = self.engine
        now = clock.now()
        elapsed = now - self.start
        e.stats.gave_up(reason, self.attempt)
        if exc is not None and note:
            plural = "s" if self.attempt != 1 else ""
            span = "after the first failure" if self.start_is_failure else "in all"
            exc.add_note(
                f"datapunk-recovery: {redact_text(e.name)!r} gave up after {self.attempt} "
                f"attempt{plural}, {elapsed:.3f} s {span}: {why}"
            )
        if e.observed() and listening(e.bus, GaveUp):
            emit(
                GaveUp(
                    operation=e.name,
                    at=now,
                    attempts=self.attempt,
                    elapsed=elapsed,
                    reason=reason,
                    error_type=_error_type(exc),
                ),
                e.bus,
            )
        if e.observed() and listening(e.bus, CallFinished):
            emit(
                CallFinished(
                    operation=e.name,
                    at=now,
                    attempts=self.attempt,
                    elapsed=elapsed,
                    succeeded=False,
                ),
                e.bus,
            )
        return None

    def deadline_passed(self, last: BaseException | None, during: bool = False) -> BaseException:
        """The error to raise when the deadline passed before (or during) an attempt."""
        if during or last is None:
            when = "during" if during else "before"
            last = DeadlineExceeded(
                f"{self.engine.name!r}: the deadline passed {when} attempt {self.attempt}"
            )
        self._give_up(last, GiveUpReason.DEADLINE, "the deadline passed")
        return last

    def exhausted(self, result: object) -> RetryExhausted:
        """The error to raise when every attempt returned a rejected result."""
        error = RetryExhausted(
            f"{self.engine.name!r}: every attempt returned a rejected result",
            last_result=result,
            attempts=self.attempt,
        )
        error.__notes__ = [
            f"datapunk-recovery: {self.attempt} attempts over {clock.now() - self.start:.3f} s"
        ]
        return error


def _release_frames(error: BaseException) -> None:
    """Free what the finished frames of a failed attempt hold, before the next attempt.

    The engine keeps the last error (it is what a deadline passing later
    raises), and its traceback keeps the frames of the failed attempt alive:
    a model's activations, a buffer, a connection.  Clearing those frames'
    locals frees them now; the traceback still shows every file and line.
    Frames still running are left alone: the first one, always (the frame
    that caught the error: the engine's, or the ``with`` block's), which
    ``traceback.clear_frames()`` would try and fail at, at the cost of a
    raised error per attempt; any other (an error raised again from an
    outer frame) as ``clear_frames()`` does.
    """
    tb = error.__traceback__
    if tb is not None:
        tb = tb.tb_next
    while tb is not None:
        try:  # noqa: SIM105 - contextlib.suppress costs a context manager per frame
            tb.tb_frame.clear()
        except RuntimeError:  # still running
            pass
        tb = tb.tb_next


def _new_call(e: _Engine, start: float | None) -> _Call:
    if start is None:
        # Handed over by the fast path at its first failure, which it takes
        # only without any deadline.
        return _Call(e, clock.now(), None, True)
    return _Call(e, start, e.deadline_at(start), False)


def _error_type(exc: BaseException | None) -> str:
    return "rejected result" if exc is None else type(exc).__name__


def _safe_repr(value: object) -> str:
    return safe_repr(value)  # a garbage hint may hold a token: never shown, even in part


# ---------------------------------------------------------------------------
# Running a call: sync and async loops over the same _Call decisions.


def _sleep_sync(call: _Call, delay: float, error: Exception | None) -> bool:
    """Wait ``delay`` before the next attempt; False (the call gave up) if the wait broke.

    A sleep that raises (a delay past what the platform can sleep) must not
    replace the caller's exception; cancellation and exit pass through.
    """
    try:
        _runtime.sleep_sync(delay)
    except Exception as internal:
        call.attempt -= 1  # the next attempt was counted in, but will not be made
        call.internal_error(error, internal, f"waiting {delay!r} s")
        return False
    return True


async def _sleep_async(call: _Call, delay: float, error: Exception | None) -> bool:
    """The async twin of `_sleep_sync()`."""
    try:
        await _runtime.sleep_async(delay)
    except Exception as internal:
        call.attempt -= 1  # the next attempt was counted in, but will not be made
        call.internal_error(error, internal, f"waiting {delay!r} s")
        return False
    return True


def _run_sync(
    e: _Engine,
    fn: Callable[..., T],
    args: Any,
    kwargs: Any,
    start: float | None,
    error: Exception | None,
) -> T:
    """Run ``fn`` until it succeeds or the engine gives up; ``error`` is a first failure."""
    call = _new_call(e, start)
    deadline_at = call.deadline_at
    # This call reports every attempt to the budget: layers inside it (a
    # hedger on the same budget) must not report them again.
    reporting = None if e.budget is None else REPORTING.set((*REPORTING.get(), e.budget))
    try:
        if error is not None:
            delay = call.decide(error)
            if delay is None:
                raise error
            _release_frames(error)
            if delay and not _sleep_sync(call, delay, error):
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
                if not _sleep_sync(call, delay, None):
                    raise call.exhausted(result)
            else:
                assert error is not None
                delay = call.decide(error)
                if delay is None:
                    raise error
                _release_frames(error)
                if delay and not _sleep_sync(call, delay, error):
                    raise error
    finally:
        # The last error's traceback points at this frame: break the cycle.
        error = None
        if reporting is not None:
            REPORTING.reset(reporting)


async def _run_async(
    e: _Engine,
    fn: Callable[..., Awaitable[T]],
    args: Any,
    kwargs: Any,
    start: float | None,
    error: Exception | None,
) -> T:
    """The async twin of `_run_sync()`; a deadline cancels the running attempt."""
    call = _new_call(e, start)
    deadline_at = call.deadline_at
    # This call reports every attempt to the budget: layers inside it (a
    # hedger on the same budget) must not report them again.
    reporting = None if e.budget is None else REPORTING.set((*REPORTING.get(), e.budget))
    try:
        if error is not None:
            delay = call.decide(error)
            if delay is None:
                raise error
            _release_frames(error)
            if delay and not await _sleep_async(call, delay, error):
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
                if not await _sleep_async(call, delay, None):
                    raise call.exhausted(result)
            else:
                assert error is not None
                delay = call.decide(error)
                if delay is None:
                    raise error
                _release_frames(error)
                if delay and not await _sleep_async(call, delay, error):
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


def _wrap(fn: Callable[..., Any], e: _Engine) -> Any:
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
        engine = _Engine(e.name, policy, on_spec, check, e.budget, e.rng, e.stats, e.bus)
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
        return _wrap(fn, _Engine(_operation_name(fn), None, None, None, None, None))

    policy = RetryPolicy.of(config)

    def decorate(fn: Callable[P, R]) -> Retried[P, R]:
        engine = _Engine(
            name or _operation_name(fn), policy, on, retry_if_result, budget, rng, bus=bus
        )
        return cast(Retried[P, R], _wrap(fn, engine))

    return decorate


# ---------------------------------------------------------------------------
# The block face.


class AttemptContext:
    """One attempt of a `retrying()` loop; use it as ``with attempt:``.

    A retryable failure inside the block is swallowed and the loop goes on
    after the delay; any other ends the loop by propagating.  The block form
    checks the deadline between attempts only (it cannot cancel a block).
    """

    __slots__ = ("_owner", "number")

    def __init__(self, owner: Retrying, number: int) -> None:
        self._owner = owner
        self.number = number

    def __enter__(self) -> AttemptContext:
        self._owner._enter(self)
        return self

    def __exit__(self, et: object, exc: BaseException | None, tb: object) -> bool:
        return self._owner._exit(exc)


class Retrying:
    """The iterator behind `retrying()`; iterate it once, sync or async."""

    __slots__ = (
        "_call",
        "_delay",
        "_done",
        "_engine",
        "_error",
        "_pending",
        "_reporting",
        "_token",
    )

    def __init__(self, engine: _Engine) -> None:
        self._engine = engine
        self._call: _Call | None = None
        self._delay = 0.0
        self._done = False
        self._error: Exception | None = None
        self._token: Any = None
        self._reporting: Any = None
        # The attempt handed out and not yet entered: a body that skips ``with attempt``
        # would otherwise get the same attempt again for ever (nothing failed, nothing counted).
        self._pending: AttemptContext | None = None

    def _next_attempt(self) -> AttemptContext:
        call = self._call
        if call is None:
            start = clock.now()
            call = self._call = _new_call(self._engine, start)
        if call.deadline_at is not None and clock.now() >= call.deadline_at:
            self._done = True
            raise call.deadline_passed(self._error)
        attempt = self._pending = AttemptContext(self, call.attempt)
        return attempt

    def _check_entered(self) -> None:
        pending = self._pending
        if pending is not None:
            self._done = True
            self._pending = None
            raise RuntimeError(
                f"retrying {self._engine.name!r}: attempt {pending.number} was never entered;"
                " the loop body must run its work inside `with attempt:`"
            )

    def _wait_fits(self, call: _Call) -> None:
        # The delay was decided when the block failed; the loop's own code may
        # have spent time since: never start a wait that would end past the deadline.
        at = call.deadline_at
        if at is not None:
            left = at - clock.now()
            if left <= 0.0 or (self._delay > 0.0 and self._delay >= left):
                self._done = True
                raise call.deadline_passed(self._error)

    def __iter__(self) -> Retrying:
        return self

    def __next__(self) -> AttemptContext:
        if self._done:
            raise StopIteration
        self._check_entered()
        call = self._call
        if call is not None:
            self._wait_fits(call)
            if not _sleep_sync(call, self._delay, self._error):
                raise self._broken()
        return self._next_attempt()

    def __aiter__(self) -> Retrying:
        return self

    async def __anext__(self) -> AttemptContext:
        if self._done:
            raise StopAsyncIteration
        self._check_entered()
        call = self._call
        if call is not None:
            self._wait_fits(call)
            if not await _sleep_async(call, self._delay, self._error):
                raise self._broken()
        return self._next_attempt()

    def _broken(self) -> Exception:
        # The wait before the next attempt broke: the last attempt's error ends the loop.
        self._done = True
        error, self._error = self._error, None
        assert error is not None
        return error

    def _enter(self, attempt: AttemptContext) -> None:
        call = self._call
        assert call is not None
        if attempt is not self._pending:
            raise RuntimeError(
                f"retrying {self._engine.name!r}: attempt {attempt.number} was already entered;"
                " enter each attempt once"
            )
        self._pending = None
        self._token = CURRENT.set((call.deadline_at, attempt.number))
        budget = self._engine.budget
        if budget is not None:  # see _run_sync: the block's attempts are reported here
            self._reporting = REPORTING.set((*REPORTING.get(), budget))
        call.attempt_start = clock.now()

    def _exit(self, exc: BaseException | None) -> bool:
        call = self._call
        assert call is not None
        if self._token is not None:
            CURRENT.reset(self._token)
            self._token = None
        if self._reporting is not None:
            REPORTING.reset(self._reporting)
            self._reporting = None
        if exc is None:
            self._done = True
            call.succeeded()
            return False
        if not isinstance(exc, Exception):  # cancellation and exit: untouched
            self._done = True
            return False
        delay = call.decide(exc)
        if delay is None:
            self._done = True
            return False
        _release_frames(exc)
        self._error = exc
        self._delay = delay
        return True


def retrying(
    config: PolicySpec = None,
    *,
    on: On = None,
    name: str = "retrying",
    budget: RetryGate | None = None,
    rng: random.Random | None = None,
    bus: EventBus | None = None,
) -> Retrying:
    """Retry a block: ``for attempt in retrying(): with attempt: ...``.

    Same settings as [`retry()`][datapunk_recovery._execution.engine.retry]
    (without ``retry_if_result``);
    works as a
    sync iterator (sleeping the thread) and an async one (``async for``).
    """
    return Retrying(_Engine(name, config, on, None, budget, rng, bus=bus))
