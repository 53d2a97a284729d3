"""The retry decision: after a failed attempt, retry or not, and how long to wait.

An `Engine` is what an operation's retry settings compile to, once, shared
by all its calls: what to retry (``on=``, ``retry_if_result=``), the policy,
the budget, the bus and the statistics, and whether its calls can take the
fast path.  A `Call` is the state of one call off the fast path (a
decorated call from its first failure, or from its start when a deadline,
a budget, a result check or a listener needs it; a block always), and
holds every decision about it: `Call.failed()` decides after each failed
attempt (the classifier or the ``on=`` rule, the final marks,
``max_attempts``, the delay rule of `RetryConfig.next_delay`, the server's
delay, the deadline, the budget, in that order), and the call accounts how
it ended (statistics, events, the note on the error it gives up with).

This module decides and accounts; it never waits and never runs the user's
function: the loops that do (`engine`, the decorator; `attempts`, the block
form) ask it after every attempt, so both faces decide alike.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any, cast

from .._core import clock
from .._core.backoff import RetryConfig, server_delay
from .._core.context import CURRENT
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
from .._core.stats import OperationStats
from .._core.validate import shown

__all__ = ["Call", "Engine", "On", "PolicySpec", "ResultPredicate", "new_call"]

On = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool] | None
"""What to retry: exception types, a predicate, or ``None`` for the classifier."""

ResultPredicate = Callable[[Any], bool]
PolicySpec = RetryConfig | RetryPolicy | None

_FINAL_MARK = "_datapunk_recovery_final"


class Engine:
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


class Call:
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
        engine: Engine,
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
                            value=safe_repr(hint),  # a garbage hint may hold a token
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


def new_call(e: Engine, start: float | None) -> Call:
    """The state of a call leaving the fast path: at ``start``, or at its first failure (None)."""
    if start is None:
        # Handed over by the fast path at its first failure, which it takes
        # only without any deadline.
        return Call(e, clock.now(), None, True)
    return Call(e, start, e.deadline_at(start), False)


def _error_type(exc: BaseException | None) -> str:
    return "rejected result" if exc is None else type(exc).__name__
