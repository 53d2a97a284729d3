"""Batch and partial recovery: retry only the items that failed, report per item.

A bulk call (index 500 documents, send 1000 messages) rarely fails as a
whole: a few items fail, most succeed.  Retrying the whole batch repeats the
work that succeeded (and duplicates side effects); giving up loses the items
that would have gone through a second time.
[`recover_batch()`][datapunk_recovery.resource.batch.recover_batch] calls the
batch function with the items still pending, round after round, and keeps
each item's own outcome.

The batch function receives a list of items and returns one outcome per
item, in order: a value for an item that succeeded, an ``Exception``
*instance* for one that failed (``asyncio.gather(..., return_exceptions=True)``
style).  If it raises, every item it was given failed with that error.
Each failed item is judged on its own by
[`datapunk_recovery._core.errors.classify()`][datapunk_recovery._core.errors.classify]
(or ``on``): non-retryable items stop at once, retryable ones go into the
next round.  Rounds are spaced by the ``RetryConfig`` backoff; the largest
server-given delay among the failures is honoured by the core's rule
([`datapunk_recovery._core.backoff.server_delay()`][datapunk_recovery._core.backoff.server_delay]);
the overall
deadline and a
retry budget (one ``on_attempt`` per item attempt, one ``allow_retry`` per
item retried) are respected.  Cancellation propagates at once.
"""

from __future__ import annotations

import inspect
import random
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, cast

from datapunk_recovery._core import clock
from datapunk_recovery._core.backoff import RetryConfig, server_delay
from datapunk_recovery._core.context import CURRENT
from datapunk_recovery._core.errors import classify, final_reason, mark_final
from datapunk_recovery._core.events import Event, EventBus, HintIgnored, emit, listening
from datapunk_recovery._core.redact import safe_repr
from datapunk_recovery._core.validate import shown
from datapunk_recovery._execution import runtime as _runtime
from datapunk_recovery.budget import RetryGate

__all__ = [
    "BatchFailed",
    "BatchFinished",
    "BatchReport",
    "BatchRound",
    "ItemOutcome",
    "recover_batch",
    "recover_batch_sync",
]

I = TypeVar("I")  # noqa: E741 - the item type
R = TypeVar("R")

BatchFn = Callable[[list[I]], Sequence[R | BaseException]]
AsyncBatchFn = Callable[[list[I]], Awaitable[Sequence[R | BaseException]]]


@dataclass(frozen=True, slots=True)
class ItemOutcome(Generic[I, R]):
    """What happened to one item: its ``index`` in the input, and value or error.

    ``attempts`` counts the rounds the item took part in.
    """

    index: int
    item: I
    succeeded: bool
    attempts: int
    value: R | None = None
    error: Exception | None = None


class BatchFailed(ExceptionGroup[Exception]):
    """Some items failed for good; the members are their errors in item order.

    ``report`` holds every item's outcome, the successful ones included.
    """

    report: BatchReport[Any, Any]


@dataclass(frozen=True, slots=True)
class BatchReport(Generic[I, R]):
    """Every item's outcome in input order, and how many rounds it took."""

    outcomes: tuple[ItemOutcome[I, R], ...]
    rounds: int
    elapsed: float

    @property
    def succeeded(self) -> list[ItemOutcome[I, R]]:
        return [o for o in self.outcomes if o.succeeded]

    @property
    def failed(self) -> list[ItemOutcome[I, R]]:
        return [o for o in self.outcomes if not o.succeeded]

    @property
    def ok(self) -> bool:
        """Whether every item succeeded."""
        return all(o.succeeded for o in self.outcomes)

    def values(self) -> list[R]:
        """Every item's value in input order; raises `BatchFailed` if any failed."""
        failed = self.failed
        if failed:
            group = BatchFailed(
                f"{len(failed)} of {len(self.outcomes)} items failed after {self.rounds} round(s)",
                [cast(Exception, o.error) for o in failed],
            )
            group.report = self
            raise group
        return [cast(R, o.value) for o in self.outcomes]


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchRound(Event):
    """One round ended: of ``attempted`` items, ``succeeded`` went through, ``retrying`` go on.

    ``delay`` is the wait in seconds before the next round (0 if none).
    """

    name: ClassVar[str] = "resource.batch_round"
    area: ClassVar[str] = "resource"

    round: int
    attempted: int
    succeeded: int
    failed: int
    retrying: int
    delay: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchFinished(Event):
    """The batch ended: ``succeeded`` and ``failed`` items after ``rounds`` rounds."""

    name: ClassVar[str] = "resource.batch"
    area: ClassVar[str] = "resource"

    items: int
    succeeded: int
    failed: int
    rounds: int
    elapsed: float


@dataclass(slots=True)
class _Plan(Generic[I, R]):
    """The I/O-free state of one batch: which items are pending, what each one got."""

    items: list[I]
    config: RetryConfig
    on: Callable[[Exception], bool] | None
    budget: RetryGate | None
    rng: random.Random | None
    name: str
    bus: EventBus | None
    start: float = field(default_factory=clock.now)
    pending: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    values: dict[int, R] = field(default_factory=dict)
    errors: dict[int, Exception] = field(default_factory=dict)
    round: int = 0
    delay_iter: Iterator[float] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.pending = list(range(len(self.items)))
        self.attempts = [0] * len(self.items)

    def deadline_at(self) -> float | None:
        own = self.config.deadline
        at = None if own is None else self.start + own
        ctx = CURRENT.get()
        if ctx is not None and ctx[0] is not None and (at is None or ctx[0] < at):
            at = ctx[0]
        return at

    def batch(self) -> list[I]:
        self.round += 1
        for i in self.pending:
            self.attempts[i] += 1
        return [self.items[i] for i in self.pending]

    def record(self, outcome: Sequence[R | BaseException] | Exception) -> float | None:
        """Take one round's outcome; returns the delay before the next round, or None."""
        now = clock.now()
        if isinstance(outcome, Exception):
            results: Sequence[R | BaseException] = [outcome] * len(self.pending)
        else:
            results = outcome
            if len(results) != len(self.pending):
                raise ValueError(
                    f"recover_batch: the batch function returned {len(results)} outcomes "
                    f"for {len(self.pending)} items"
                )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                # A cancellation reported as an item outcome: never swallowed, and
                # raised before any item of the round is counted.
                raise result
        retry: list[int] = []
        hint: float | None = None
        succeeded = 0
        for i, result in zip(self.pending, results, strict=True):
            if self.budget is not None:
                self.budget.on_attempt(not isinstance(result, Exception))
            if not isinstance(result, Exception):
                self.values[i] = cast(R, result)  # not a BaseException: raised above
                self.errors.pop(i, None)
                succeeded += 1
                continue
            self.errors[i] = result
            verdict = classify(result)
            wanted = self.on(result) if self.on is not None else verdict.retryable
            if not wanted or final_reason(result) is not None:
                continue
            if self.budget is not None and not self.budget.allow_retry():
                mark_final(result, "retry budget exhausted")
                continue
            retry.append(i)
            if verdict.delay_hint is not None:
                hint = verdict.delay_hint if hint is None else max(hint, verdict.delay_hint)
        delay = self._next_delay(retry, hint, now)
        if listening(self.bus):
            emit(
                BatchRound(
                    operation=self.name,
                    at=now,
                    round=self.round,
                    attempted=len(self.pending),
                    succeeded=succeeded,
                    failed=len(self.pending) - succeeded,
                    retrying=len(retry) if delay is not None else 0,
                    delay=delay or 0.0,
                ),
                self.bus,
            )
        self.pending = retry if delay is not None else []
        if delay is not None:
            # Another round follows: free what this round's failed frames
            # hold (buffers, activations) before it starts; the errors and
            # their tracebacks stay for the report.
            for result in results:
                if isinstance(result, Exception):
                    traceback.clear_frames(result.__traceback__)
        return delay

    def _next_delay(self, retry: list[int], hint: float | None, now: float) -> float | None:
        if not retry:
            return None
        limit = self.config.max_attempts
        if limit is not None and self.round >= limit:
            return None
        delay = self._delays().__next__() if self.config.base_delay else 0.0
        at = self.deadline_at()
        remaining = None if at is None else at - now
        if hint is not None:
            decision = server_delay(delay, hint, self.config, remaining)
            if decision.give_up:
                return None
            if decision.ignored:
                if listening(self.bus):
                    emit(
                        HintIgnored(
                            operation=self.name,
                            at=now,
                            value=safe_repr(hint),
                            reason="server delay is not a finite number >= 0",
                        ),
                        self.bus,
                    )
            else:
                delay = decision.delay
        if remaining is not None and (remaining <= 0.0 or delay >= remaining):
            return None
        return delay

    def _delays(self) -> Iterator[float]:
        if self.delay_iter is None:
            self.delay_iter = self.config.delays(self.rng)
        return self.delay_iter

    def report(self) -> BatchReport[I, R]:
        outcomes = tuple(
            ItemOutcome(i, item, True, self.attempts[i], value=self.values[i])
            if i in self.values
            else ItemOutcome(i, item, False, self.attempts[i], error=self.errors[i])
            for i, item in enumerate(self.items)
        )
        now = clock.now()
        report = BatchReport(outcomes, self.round, now - self.start)
        if listening(self.bus):
            failed = len(self.errors)
            emit(
                BatchFinished(
                    operation=self.name,
                    at=now,
                    items=len(self.items),
                    succeeded=len(self.items) - failed,
                    failed=failed,
                    rounds=self.round,
                    elapsed=report.elapsed,
                ),
                self.bus,
            )
        return report


def _plan(
    items: Sequence[I],
    config: RetryConfig | None,
    on: Callable[[Exception], bool] | None,
    budget: RetryGate | None,
    rng: random.Random | None,
    name: str,
    bus: EventBus | None,
) -> _Plan[I, Any]:
    if config is None:
        config = RetryConfig()
    elif not isinstance(config, RetryConfig):
        raise TypeError(f"recover_batch config=: expected a RetryConfig, got {shown(config)}")
    if budget is not None and not isinstance(budget, RetryGate):
        raise TypeError(f"recover_batch budget=: expected a RetryGate, got {shown(budget)}")
    return _Plan(list(items), config, on, budget, rng, name, bus)


async def recover_batch(
    fn: AsyncBatchFn[I, R] | BatchFn[I, R],
    items: Sequence[I],
    *,
    config: RetryConfig | None = None,
    on: Callable[[Exception], bool] | None = None,
    budget: RetryGate | None = None,
    rng: random.Random | None = None,
    name: str = "batch",
    bus: EventBus | None = None,
) -> BatchReport[I, R]:
    """Run ``fn`` over ``items``, retrying only the failed ones; never raises for items.

    ``fn`` may be sync or async.  ``config`` bounds the rounds (``max_attempts``
    per item) and spaces them; ``on`` overrides the classifier's verdict on
    which item errors to retry.  Returns the per-item
    [`BatchReport`][datapunk_recovery.resource.batch.BatchReport];
    call ``.values()`` on it to get every value or a
    [`BatchFailed`][datapunk_recovery.resource.batch.BatchFailed].
    """
    plan: _Plan[I, R] = _plan(items, config, on, budget, rng, name, bus)
    while plan.pending:
        batch = plan.batch()
        try:
            got = fn(batch)
            outcome: Sequence[R | BaseException] | Exception = (
                await got if inspect.isawaitable(got) else got
            )
        except Exception as exc:
            outcome = exc
        delay = plan.record(outcome)
        del outcome  # the plan keeps what it needs; see _Plan.record
        if delay is not None:
            await _runtime.sleep_async(delay)
    return plan.report()


def recover_batch_sync(
    fn: BatchFn[I, R],
    items: Sequence[I],
    *,
    config: RetryConfig | None = None,
    on: Callable[[Exception], bool] | None = None,
    budget: RetryGate | None = None,
    rng: random.Random | None = None,
    name: str = "batch",
    bus: EventBus | None = None,
) -> BatchReport[I, R]:
    """The blocking twin of `recover_batch()` for a sync ``fn``."""
    plan: _Plan[I, R] = _plan(items, config, on, budget, rng, name, bus)
    while plan.pending:
        batch = plan.batch()
        try:
            outcome: Sequence[R | BaseException] | Exception = fn(batch)
        except Exception as exc:
            outcome = exc
        delay = plan.record(outcome)
        del outcome  # the plan keeps what it needs; see _Plan.record
        if delay is not None:
            _runtime.sleep_sync(delay)
    return plan.report()
