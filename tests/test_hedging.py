"""Hedging: race a slow idempotent call, take the first good answer, cancel the rest."""

from __future__ import annotations

import anyio
import pytest

from datapunk_recovery import events
from datapunk_recovery.budget import TokenBudget, TokenBudgetConfig
from datapunk_recovery.deadline import deadline
from datapunk_recovery.hedging import (
    HedgeConfig,
    Hedger,
    HedgeRefused,
    HedgeStarted,
    HedgeWon,
    idempotent,
    is_idempotent,
)
from datapunk_recovery.testing import fake_clock

pytestmark = pytest.mark.anyio


class Replicas:
    """A dependency whose n-th attempt behaves as told: "hang", "ok", or an exception."""

    def __init__(self, *plan: object) -> None:
        self.plan = list(plan)
        self.started = 0
        self.cancelled = 0
        self.release = anyio.Event()

    @idempotent
    async def get(self, key: str) -> str:
        n = self.started
        self.started += 1
        step = self.plan[n] if n < len(self.plan) else "ok"
        try:
            if step == "hang":
                await anyio.sleep_forever()
            if step == "gate":
                await self.release.wait()
            if isinstance(step, BaseException):
                raise step
            return f"{key}@{n}"
        except BaseException:
            if not isinstance(step, BaseException):
                self.cancelled += 1
            raise


def recorder(hedger: Hedger) -> list[events.Event]:
    seen: list[events.Event] = []
    hedger.bus.subscribe(seen.append)
    return seen


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match=r"HedgeConfig.percentile: must be between 0 \(excl"):
        HedgeConfig(percentile=0.0)
    with pytest.raises(ValueError, match=r"HedgeConfig.max_delay: must be >= min_delay"):
        HedgeConfig(min_delay=2.0, max_delay=1.0)
    with pytest.raises(ValueError, match=r"HedgeConfig.max_hedges: must be >= 1"):
        HedgeConfig(max_hedges=0)


async def test_a_slow_attempt_is_hedged_and_the_loser_cancelled() -> None:
    replicas = Replicas("hang", "ok")
    hedger = Hedger("kv", HedgeConfig(delay=0.01))
    seen = recorder(hedger)
    assert await hedger.call_async(replicas.get, "k") == "k@1"
    assert (replicas.started, replicas.cancelled) == (2, 1)
    assert [type(e) for e in seen] == [HedgeStarted, HedgeWon]
    started, won = seen
    assert isinstance(started, HedgeStarted) and isinstance(won, HedgeWon)
    assert (started.hedge, started.reason, won.attempt) == (1, "delay", 1)


async def test_a_fast_attempt_is_not_hedged() -> None:
    replicas = Replicas("ok")
    hedger = Hedger("kv", HedgeConfig(delay=30.0))
    seen = recorder(hedger)
    assert await hedger.call_async(replicas.get, "k") == "k@0"
    assert replicas.started == 1
    assert seen == []


async def test_calls_not_marked_idempotent_are_never_hedged() -> None:
    calls = 0

    async def charge() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError("reset")

    hedger = Hedger("pay", HedgeConfig(delay=0.0, max_hedges=3))
    assert not is_idempotent(charge)
    with pytest.raises(ConnectionError):
        await hedger.call_async(charge)
    assert calls == 1


async def test_a_retryable_failure_starts_the_next_hedge_at_once() -> None:
    replicas = Replicas(ConnectionError("reset"), "ok")
    hedger = Hedger("kv", HedgeConfig(delay=30.0))  # the delay alone would never hedge
    seen = recorder(hedger)
    assert await hedger.call_async(replicas.get, "k") == "k@1"
    assert [(e.reason, e.hedge) for e in seen if isinstance(e, HedgeStarted)] == [("failure", 1)]


async def test_a_non_retryable_failure_ends_the_race_at_once() -> None:
    replicas = Replicas("hang", ValueError("bad request"))
    hedger = Hedger("kv", HedgeConfig(delay=0.01, max_hedges=3))
    with pytest.raises(ValueError, match="bad request"):
        await hedger.call_async(replicas.get, "k")
    assert (replicas.started, replicas.cancelled) == (2, 1)


async def test_when_every_attempt_fails_the_last_error_is_raised() -> None:
    replicas = Replicas(ConnectionError("a"), ConnectionError("b"), ConnectionError("c"))
    hedger = Hedger("kv", HedgeConfig(delay=30.0, max_hedges=2))
    with pytest.raises(ConnectionError, match="c"):
        await hedger.call_async(replicas.get, "k")
    assert replicas.started == 3


async def test_hedges_draw_on_the_retry_budget() -> None:
    budget = TokenBudget(config=TokenBudgetConfig(max_tokens=2))
    budget.on_attempt(False)  # one token left: not more than half, hedges refused
    replicas = Replicas("gate")
    hedger = Hedger("kv", HedgeConfig(delay=0.0), budget=budget)
    seen = recorder(hedger)
    hedger.bus.subscribe(lambda e: replicas.release.set() if isinstance(e, HedgeRefused) else None)
    assert await hedger.call_async(replicas.get, "k") == "k@0"
    assert replicas.started == 1
    assert [(type(e), getattr(e, "reason", None)) for e in seen] == [(HedgeRefused, "budget")]


async def test_failed_hedges_cost_budget_tokens() -> None:
    budget = TokenBudget(config=TokenBudgetConfig(max_tokens=10))
    replicas = Replicas(ConnectionError("a"), ConnectionError("b"), "ok")
    hedger = Hedger("kv", HedgeConfig(delay=30.0, max_hedges=2), budget=budget)
    assert await hedger.call_async(replicas.get, "k") == "k@2"
    # The original's outcome belongs to the retry layer; hedge 1 failed (-1), hedge 2 won (+0.1).
    assert budget.tokens == pytest.approx(9.1)


async def test_no_hedge_starts_past_the_deadline() -> None:
    replicas = Replicas("gate")
    hedger = Hedger("kv", HedgeConfig(delay=0.01))
    seen = recorder(hedger)

    async def answer_later() -> None:
        await anyio.sleep(0.05)  # longer than the hedge delay: a hedge would be due
        replicas.release.set()

    with fake_clock() as clock, deadline(1.0):
        clock.advance(0.995)  # 5 ms left: a hedge after 10 ms would start past it
        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_later)
            assert await hedger.call_async(replicas.get, "k") == "k@0"
    assert replicas.started == 1
    assert seen == []


async def test_cancelling_the_call_cancels_every_attempt() -> None:
    replicas = Replicas("hang", "hang", "hang")
    hedger = Hedger("kv", HedgeConfig(delay=0.0, max_hedges=2))
    seen = recorder(hedger)

    async with anyio.create_task_group() as tg:

        async def caller() -> None:
            await hedger.call_async(replicas.get, "k")

        tg.start_soon(caller)
        with anyio.fail_after(5):
            while replicas.started < 3:  # noqa: ASYNC110 - bounded polling
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert replicas.cancelled == 3
    assert sum(isinstance(e, HedgeStarted) for e in seen) == 2


async def test_the_percentile_delay_tracks_recent_latencies() -> None:
    hedger = Hedger("kv", HedgeConfig(delay=1.0, percentile=0.9, min_samples=10, max_delay=5.0))
    for ms in range(1, 10):
        hedger.record(ms / 1000)
    assert hedger.delay() == 1.0  # not enough samples yet: the fixed delay
    hedger.record(0.010)
    assert hedger.delay() == pytest.approx(0.009)  # p90 of 1..10 ms
    for _ in range(100):
        hedger.record(60.0)
    assert hedger.delay() == 5.0  # kept within max_delay


async def test_hedging_a_sync_function_is_refused() -> None:
    def sync() -> None:
        return None

    with pytest.raises(TypeError, match="hedging needs an async function"):
        Hedger("kv")(sync)  # type: ignore[arg-type]
