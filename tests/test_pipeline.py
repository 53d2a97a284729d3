"""The pipeline: the documented default order, each stage's effect, cancellation throughout."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from datapunk_recovery._core import errors, events
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.errors import CircuitOpenError, DeadlineExceeded
from datapunk_recovery.breaker import BreakerConfig, BreakerState, CircuitBreaker
from datapunk_recovery.budget import TokenBudget, TokenBudgetConfig
from datapunk_recovery.flow.adaptive import AIMD
from datapunk_recovery.flow.bulkhead import Bulkhead, BulkheadConfig, BulkheadState
from datapunk_recovery.flow.fallback import Fallback, FallbackUsed
from datapunk_recovery.flow.hedging import HedgeConfig, HedgeStarted
from datapunk_recovery.flow.pipeline import (
    ARun,
    BulkheadStage,
    Pipeline,
    RetryStage,
    Run,
    StageEntered,
)
from datapunk_recovery.flow.ratelimit import RateLimiter, RateLimiterConfig
from datapunk_recovery.testing import fake_clock

QUICK = RetryConfig(max_attempts=3, base_delay=0.0)
DEFAULT_ORDER = [
    "fallback",
    "bulkhead",
    "ratelimit",
    "adaptive",
    "deadline",
    "retry",
    "hedging",
    "breaker",
    "timeout",
]


@pytest.fixture
def seen() -> Iterator[list[events.Event]]:
    """Every event of the library during the test."""
    got: list[events.Event] = []
    unsubscribe = events.subscribe(got.append)
    yield got
    unsubscribe()


def stages_entered(seen: list[events.Event]) -> list[str]:
    return [e.stage for e in seen if isinstance(e, StageEntered)]


class Flaky:
    """Fails with ``ConnectionError`` the first ``failures`` times, then answers."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, x: int) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("reset")
        return x * 2

    async def acall(self, x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return self(x)


def full_pipeline(**changes: object) -> Pipeline:
    settings: dict[str, object] = {
        "fallback": Fallback(-1),
        "bulkhead": BulkheadConfig(max_concurrent=4),
        "limiter": RateLimiterConfig(rate=1000, burst=1000),
        "adaptive": AIMD(initial=10),
        "deadline": 30.0,
        "retry": QUICK,
        "budget": TokenBudget(),
        "hedge": HedgeConfig(delay=30.0),
        "idempotent": True,
        "breaker": CircuitBreaker("dep"),
        "attempt_timeout": 10.0,
    }
    settings.update(changes)
    return Pipeline("dep", **settings)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# order


@pytest.mark.anyio
async def test_the_default_order_outermost_first(seen: list[events.Event]) -> None:
    pipeline = full_pipeline()
    assert [s.name for s in pipeline.stages] == DEFAULT_ORDER
    assert await pipeline.call_async(Flaky().acall, 21) == 42
    assert stages_entered(seen) == DEFAULT_ORDER


def test_a_sync_call_goes_through_the_same_order(seen: list[events.Event]) -> None:
    pipeline = full_pipeline(hedge=None)
    assert pipeline.call(Flaky(), 21) == 42
    assert stages_entered(seen) == [s for s in DEFAULT_ORDER if s != "hedging"]


def test_a_retry_repeats_only_the_stages_inside_it(seen: list[events.Event]) -> None:
    pipeline = full_pipeline(hedge=None)
    assert pipeline.call(Flaky(failures=1), 21) == 42
    outer, inner = DEFAULT_ORDER[:6], ["breaker", "timeout"]
    assert stages_entered(seen) == outer + inner + inner


def test_users_may_build_other_orders(seen: list[events.Event]) -> None:
    bulkhead = Bulkhead("per-attempt", BulkheadConfig(max_concurrent=1))
    pipeline = Pipeline.of("dep", [RetryStage(QUICK), BulkheadStage(bulkhead)])
    assert pipeline.call(Flaky(failures=2), 1) == 2
    assert stages_entered(seen) == ["retry"] + ["bulkhead"] * 3  # a slot per attempt
    with pytest.raises(TypeError, match=r"Pipeline\.of: expected stages"):
        Pipeline.of("dep", [object()])  # type: ignore[list-item]


class _Doubling:
    """A user's stage with the current names: it doubles the call's result."""

    name = "doubling"

    def wrap(self, nxt: Run) -> Run:
        return lambda fn, args, kwargs: 2 * nxt(fn, args, kwargs)

    def wrap_async(self, nxt: ARun) -> ARun:
        async def run(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return 2 * await nxt(fn, args, kwargs)

        return run


class _OldDoubling:
    """The same stage written for an older release: ``sync()`` / ``asyn()``."""

    name = "old-doubling"

    def sync(self, nxt: Run) -> Run:
        return _Doubling().wrap(nxt)

    def asyn(self, nxt: ARun) -> ARun:
        return _Doubling().wrap_async(nxt)


@pytest.mark.anyio
async def test_stages_with_the_twin_names_and_with_the_former_names_both_run() -> None:
    pipeline = Pipeline.of("dep", [_Doubling(), _OldDoubling(), RetryStage(QUICK)])
    assert pipeline.call(lambda x: x, 3) == 12

    async def identity(x: int) -> int:
        return x

    assert await pipeline.call_async(identity, 3) == 12


def test_the_library_stages_still_answer_to_the_former_names() -> None:
    stage = RetryStage(QUICK)
    run = stage.sync(lambda fn, args, kwargs: fn(*args, **kwargs))
    assert run(lambda x: x + 1, (1,), {}) == 2
    assert callable(stage.asyn) and callable(stage.wrap_async)


# ---------------------------------------------------------------------------
# what each stage does inside the pipeline


def test_the_happy_path_is_counted_without_the_engine() -> None:
    pipeline = Pipeline("dep", retry=QUICK)
    flaky = Flaky(failures=1)
    assert pipeline.call(Flaky(), 1) == 2
    assert pipeline.call(flaky, 1) == 2
    stats = pipeline.statistics()
    assert (stats.calls, stats.successes, stats.attempts, stats.retries) == (2, 2, 3, 1)
    assert flaky.calls == 2  # the first failure was not run twice


def test_the_budget_sees_every_attempt_and_can_stop_retries() -> None:
    budget = TokenBudget(config=TokenBudgetConfig(max_tokens=4, token_ratio=1.0))
    pipeline = Pipeline("dep", retry=RetryConfig(max_attempts=10, base_delay=0.0), budget=budget)
    for _ in range(2):
        budget.on_attempt(False)  # 2 tokens: no retry allowed
    flaky = Flaky(failures=5)
    with pytest.raises(ConnectionError) as info:
        pipeline.call(flaky, 1)
    assert flaky.calls == 1
    assert errors.final_reason(info.value) == "retry budget exhausted"
    assert pipeline.call(Flaky(), 1) == 2  # a success earns a token back
    assert budget.tokens == 2.0


def test_an_open_breaker_stops_the_retries_and_the_fallback_answers(
    seen: list[events.Event],
) -> None:
    breaker = CircuitBreaker("dep", BreakerConfig(consecutive_failures=2))
    pipeline = Pipeline(
        "dep",
        fallback=Fallback("cached"),
        retry=RetryConfig(max_attempts=5, base_delay=0.0),
        breaker=breaker,
    )
    flaky = Flaky(failures=100)
    assert pipeline.call(flaky, 1) == "cached"
    assert flaky.calls == 2  # the breaker opened after two; the retry saw it was final
    assert breaker.state is BreakerState.OPEN
    used = [e for e in seen if isinstance(e, FallbackUsed)]
    assert [u.error_type for u in used] == ["CircuitOpenError"]
    with pytest.raises(CircuitOpenError):
        Pipeline("bare", breaker=breaker).call(flaky, 1)


def test_a_429_result_drains_the_limiter() -> None:
    @dataclass
    class Response:
        status_code: int

    with fake_clock():
        limiter = RateLimiter("api", RateLimiterConfig(rate=10, burst=10))
        pipeline = Pipeline("api", limiter=limiter, retry=None)
        assert pipeline.call(Response, 429).status_code == 429
        assert not limiter.try_acquire()


def test_the_deadline_bounds_retries_sync() -> None:
    slow = RetryConfig(max_attempts=10, base_delay=1.0, jitter="none")
    pipeline = Pipeline("dep", deadline=2.5, retry=slow)
    flaky = Flaky(failures=100)
    with fake_clock() as clock, pytest.raises(ConnectionError):
        pipeline.call(flaky, 1)
    assert clock.slept == [1.0]  # 1 s, then 2 s would end past the 2.5 s deadline
    assert flaky.calls == 2


@pytest.mark.anyio
async def test_the_deadline_cancels_a_hanging_async_call() -> None:
    pipeline = Pipeline("dep", deadline=0.02, retry=QUICK)

    async def hang() -> None:
        await anyio.sleep_forever()

    with pytest.raises(DeadlineExceeded):
        await pipeline.call_async(hang)


@pytest.mark.anyio
async def test_a_timed_out_attempt_is_retried() -> None:
    attempts = 0

    async def first_hangs() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await anyio.sleep_forever()
        return "ok"

    pipeline = Pipeline("dep", retry=QUICK, attempt_timeout=0.01)
    assert await pipeline.call_async(first_hangs) == "ok"
    assert attempts == 2


@pytest.mark.anyio
async def test_hedging_inside_the_pipeline(seen: list[events.Event]) -> None:
    attempts = 0

    async def first_hangs() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await anyio.sleep_forever()
        return "fast replica"

    pipeline = Pipeline("dep", retry=QUICK, hedge=HedgeConfig(delay=0.01), idempotent=True)
    assert await pipeline.call_async(first_hangs) == "fast replica"
    assert sum(isinstance(e, HedgeStarted) for e in seen) == 1
    with pytest.raises(TypeError, match="hedging needs async calls"):
        pipeline.call(Flaky(), 1)


def test_the_decorator_keeps_the_signature() -> None:
    pipeline = Pipeline("dep", retry=QUICK)

    @pipeline
    def double(x: int) -> int:
        """Double x."""
        return x * 2

    assert double(4) == 8
    assert double.__name__ == "double"
    assert double.__doc__ == "Double x."


# ---------------------------------------------------------------------------
# cancellation through every stage


@pytest.mark.anyio
async def test_cancellation_passes_through_every_stage_and_frees_everything() -> None:
    budget = TokenBudget()
    breaker = CircuitBreaker("dep", BreakerConfig(consecutive_failures=1))
    bulkhead = Bulkhead("dep", BulkheadConfig(max_concurrent=1))
    pipeline = full_pipeline(bulkhead=bulkhead, budget=budget, breaker=breaker)
    adaptive = pipeline.stage("adaptive").limiter  # type: ignore[union-attr]
    attempts = 0

    async def hang() -> None:
        nonlocal attempts
        attempts += 1
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        scope.cancel()
        await pipeline.call_async(hang)
    assert scope.cancelled_caught
    assert attempts <= 1  # never retried
    assert bulkhead.state() == BulkheadState(0, 0, 1)  # slot freed
    assert adaptive.state().active == 0 and adaptive.limit == 10  # freed, taught nothing
    assert budget.tokens == 10.0  # nothing counted
    assert breaker.state is BreakerState.CLOSED  # not a failure
    assert await pipeline.call_async(Flaky().acall, 1) == 2  # everything still works


def test_keyboard_interrupt_passes_through_a_sync_pipeline() -> None:
    bulkhead = Bulkhead("dep", BulkheadConfig(max_concurrent=1))
    breaker = CircuitBreaker("dep", BreakerConfig(consecutive_failures=1))
    pipeline = full_pipeline(hedge=None, bulkhead=bulkhead, breaker=breaker)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.call(interrupted)
    assert bulkhead.state().active == 0
    assert breaker.state is BreakerState.CLOSED


# -- hedging x breaker, hedging x budget in the default order (issue 14, items 2 and 3)


@pytest.mark.anyio
async def test_a_pipelines_lost_hedges_reach_its_breaker_as_slow_calls_and_the_budget_once() -> (
    None
):
    breaker = CircuitBreaker(
        "kv",
        BreakerConfig(
            consecutive_failures=None,
            slow_call_rate_threshold=0.9,
            slow_call_duration=1.0,
            minimum_calls=2,
            keep_window=True,
        ),
    )
    budget = TokenBudget(config=TokenBudgetConfig(max_tokens=10, token_ratio=0.5))
    budget.on_attempt(False)  # 9 tokens: room to earn
    pipeline = Pipeline(
        "kv",
        retry=RetryConfig(max_attempts=1),
        budget=budget,
        hedge=HedgeConfig(delay=0.0),
        idempotent=True,
        breaker=breaker,
    )
    answered = anyio.Event()

    async def replica(n: list[int]) -> str:
        n[0] += 1
        if n[0] == 1:  # the first attempt hangs until the hedge has answered
            await answered.wait()
            await anyio.sleep_forever()
        answered.set()
        return "ok"

    assert await pipeline.call_async(replica, [0]) == "ok"
    snapshot = breaker.snapshot()
    # The hedge's success and the first attempt's lost race: one slow call of two.
    assert (snapshot.calls, snapshot.failures, snapshot.slow_calls) == (2, 0, 1)
    # The retry stage reports the call once (+0.5); the hedge reports its own success (+0.5).
    assert budget.tokens == pytest.approx(10.0)


@pytest.mark.anyio
async def test_a_hedged_call_holds_one_bulkhead_slot_and_one_token_for_all_its_hedges() -> None:
    with fake_clock():
        bulkhead = Bulkhead("kv", BulkheadConfig(max_concurrent=1))
        limiter = RateLimiter("kv", RateLimiterConfig(rate=1.0, burst=2))
        pipeline = Pipeline(
            "kv",
            bulkhead=bulkhead,
            limiter=limiter,
            retry=RetryConfig(max_attempts=1),
            hedge=HedgeConfig(delay=0.0, max_hedges=3),
            idempotent=True,
        )
        held: list[int] = []
        started = 0

        async def replica() -> str:
            nonlocal started
            started += 1
            held.append(bulkhead.state().active)
            if started < 4:  # three attempts hang; the last hedge answers
                await anyio.sleep_forever()
            await anyio.lowlevel.checkpoint()
            return "ok"

        assert await pipeline.call_async(replica) == "ok"
        assert started == 4
        assert held == [1, 1, 1, 1]  # the hedges ran in the call's one slot
        assert limiter.tokens == pytest.approx(1.0)  # and on its one token
        assert bulkhead.state().active == 0
