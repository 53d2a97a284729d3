"""Hedging: race a slow idempotent call, take the first good answer, cancel the rest."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from datapunk_recovery._core import events
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._execution.deadline import deadline
from datapunk_recovery._execution.engine import retry
from datapunk_recovery.breaker import BreakerConfig, BreakerState, CircuitBreaker, OutcomeRecorded
from datapunk_recovery.budget import RatioBudget, RatioBudgetConfig, TokenBudget, TokenBudgetConfig
from datapunk_recovery.flow.hedging import (
    HedgeConfig,
    Hedger,
    HedgeRefused,
    HedgeStarted,
    HedgeWon,
    idempotent,
    is_idempotent,
)
from datapunk_recovery.flow.pipeline import Pipeline
from datapunk_recovery.network import Endpoint, Router, RouterConfig
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
    # The call is the primary attempt, reported with its outcome (a success: +0.1), as a
    # retry layer around the hedger would report it; hedge 1 failed (-1), hedge 2 won (+0.1).
    assert budget.tokens == pytest.approx(9.2)


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


# -- a standalone hedger reports its primary attempts to its budget (issue 14, item 3)


class Ledger:
    """A RetryGate that allows everything and writes down every report."""

    def __init__(self) -> None:
        self.attempts: list[bool] = []
        self.asked = 0

    def on_attempt(self, succeeded: bool) -> None:
        self.attempts.append(succeeded)

    def allow_retry(self) -> bool:
        self.asked += 1
        return True


class Quick:
    """A replica that answers at its first checkpoint: a hedge delay of 0 hedges it."""

    def __init__(self) -> None:
        self.calls = 0

    @idempotent
    async def get(self, key: str) -> str:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        return key


async def test_the_documented_hedger_with_a_ratio_budget_hedges_its_share() -> None:
    with fake_clock():  # one window for the whole test
        budget = RatioBudget(config=RatioBudgetConfig(ratio=0.1, min_per_second=0.0))
        hedger = Hedger("kv", HedgeConfig(delay=0.0, max_hedges=1), budget=budget)
        seen = recorder(hedger)
        replica = Replicas(*["gate"] * 300)
        # The first attempt answers once the hedge is decided (started or refused).
        hedger.bus.subscribe(lambda e: replica.release.set())
        for _ in range(100):
            replica.release = anyio.Event()
            assert (await hedger.call_async(replica.get, "k")).startswith("k@")
    hedges = sum(isinstance(e, HedgeStarted) for e in seen)
    # Each call is a request; a hedge is allowed while hedges <= 10% of them.
    assert 8 <= hedges <= 10
    assert sum(isinstance(e, HedgeRefused) for e in seen) == 100 - hedges


async def test_a_standalone_hedgers_failed_calls_cost_tokens() -> None:
    budget = TokenBudget(config=TokenBudgetConfig(max_tokens=10))
    hedger = Hedger("kv", HedgeConfig(delay=30.0), budget=budget)
    replicas = Replicas(*[ValueError("bad request")] * 6)  # not retryable: no hedge
    for _ in range(6):
        with pytest.raises(ValueError):
            await hedger.call_async(replicas.get, "k")
    assert budget.tokens == pytest.approx(4.0)  # drained: hedges are refused now
    assert not budget.allow_retry()


async def test_an_unhedged_call_through_a_hedger_is_still_reported() -> None:
    ledger = Ledger()
    hedger = Hedger("kv", HedgeConfig(delay=30.0), budget=ledger)

    async def write(key: str) -> str:  # not idempotent: runs once
        return key

    assert await hedger.call_async(write, "k") == "k"
    assert await hedger(write)("k") == "k"
    assert ledger.attempts == [True, True]


async def test_every_attempt_is_reported_once_however_the_hedger_is_composed() -> None:
    config = HedgeConfig(delay=30.0)  # no hedge starts: one attempt per call
    replica = Quick()

    ledger = Ledger()
    await Hedger("kv", config, budget=ledger).call_async(replica.get, "k")
    assert ledger.attempts == [True]  # alone: the hedger reports it

    ledger = Ledger()
    hedger = Hedger("kv", config, budget=ledger)
    await retry(RetryConfig(max_attempts=2), budget=ledger)(hedger(replica.get))("k")
    assert ledger.attempts == [True]  # inside a retry on the same budget: the retry does

    ledger = Ledger()
    other = Ledger()
    hedger = Hedger("kv", config, budget=ledger)
    await retry(RetryConfig(max_attempts=2), budget=other)(hedger(replica.get))("k")
    assert (ledger.attempts, other.attempts) == ([True], [True])  # another budget: both

    for retry_config in (RetryConfig(max_attempts=2), None):
        ledger = Ledger()
        pipeline = Pipeline("kv", retry=retry_config, budget=ledger, hedge=config)
        await pipeline.call_async(replica.get, "k")
        assert ledger.attempts == [True], retry_config  # with or without a retry stage

    ledger = Ledger()
    router = Router("kv", [Endpoint("a"), Endpoint("b")], RouterConfig(hedge=config), budget=ledger)

    async def on(endpoint: Endpoint) -> str:
        return endpoint.name

    await router.call(on, hedge=True)
    assert ledger.attempts == [True]  # the router's retry engine reports the race once


# -- a hedge that loses its race counts for its breaker as a slow call (issue 14, item 2)


class TwoEndpoints:
    """Each call's first attempt goes to ``a``, its hedges to ``b``, each through its breaker.

    ``a_plan`` says what ``a`` does on each call: "hang" (until cancelled) or an
    exception; ``b`` answers after ``b_takes`` seconds of the (fake) clock.
    """

    def __init__(self, a: CircuitBreaker, b: CircuitBreaker, a_plan: list[object]) -> None:
        self.a, self.b = a, b
        self.a_plan = list(a_plan)
        self.next_is_primary = True
        self.b_takes = 0.0
        self.clock: FakeClock | None = None

    @idempotent
    async def get(self, key: str) -> str:
        primary, self.next_is_primary = self.next_is_primary, False
        if primary:
            return await self.a.call_async(self._a)
        return await self.b.call_async(self._b, key)

    async def _a(self) -> str:
        step = self.a_plan.pop(0)
        if isinstance(step, BaseException):
            raise step
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def _b(self, key: str) -> str:
        if self.clock is not None:
            self.clock.advance(self.b_takes)
        await anyio.lowlevel.checkpoint()
        return key

    async def call(self, hedger: Hedger) -> str:
        self.next_is_primary = True
        return await hedger.call_async(self.get, "k")


SLOW_RULE = BreakerConfig(
    consecutive_failures=None,
    slow_call_rate_threshold=0.5,
    slow_call_duration=1.0,
    minimum_calls=4,
    window_size=10,
)


@pytest.mark.parametrize("listening", [False, True], ids=["quiet", "observed"])
async def test_a_hung_endpoint_that_keeps_losing_hedges_trips_its_slow_call_rule(
    listening: bool,
) -> None:
    a, b = CircuitBreaker("a", SLOW_RULE), CircuitBreaker("b", SLOW_RULE)
    outcomes: list[OutcomeRecorded] = []
    if listening:  # the permit path as well as the breaker's quiet one
        a.events.subscribe(lambda e: outcomes.append(e) if isinstance(e, OutcomeRecorded) else None)
    endpoints = TwoEndpoints(a, b, ["hang"] * 4)
    hedger = Hedger("kv", HedgeConfig(delay=0.0))
    for _ in range(4):
        assert await endpoints.call(hedger) == "k"  # the caller always got its answer
    assert a.state is BreakerState.OPEN  # 4 slow calls of 4: the hung endpoint is out
    snapshot = a.snapshot()
    assert (snapshot.failures, snapshot.slow_calls) == (0, 4)  # slow, never failed
    assert b.state is BreakerState.CLOSED
    if listening:
        assert [(e.outcome, e.slow) for e in outcomes] == [("lost", True)] * 4


async def test_a_lost_hedge_is_slow_for_at_least_its_elapsed_time() -> None:
    recorded: list[tuple[str, bool, float | None]] = []
    config = BreakerConfig(consecutive_failures=None, slow_call_duration=5.0, keep_window=True)
    a, b = CircuitBreaker("a", config), CircuitBreaker("b", config)
    a.events.subscribe(
        lambda e: (
            recorded.append((e.outcome, e.slow, e.duration))
            if isinstance(e, OutcomeRecorded)
            else None
        )
    )
    with fake_clock() as clock:
        endpoints = TwoEndpoints(a, b, ["hang"])
        endpoints.clock, endpoints.b_takes = clock, 2.5
        await endpoints.call(Hedger("kv", HedgeConfig(delay=0.0)))
    # Slow (it lost a race), with the time it had run: the least its call would have taken.
    assert recorded == [("lost", True, pytest.approx(2.5))]
    assert a.snapshot().calls == 0  # no slow-call rule judges it: the window is left alone


async def test_a_lost_hedge_is_never_a_success() -> None:
    # Three consecutive failures trip it; a lost race between them resets nothing.
    config = BreakerConfig(consecutive_failures=3)
    a, b = CircuitBreaker("a", config), CircuitBreaker("b", config)
    down = ConnectionError("a is down")
    endpoints = TwoEndpoints(a, b, [down, down, "hang", down])
    hedger = Hedger("kv", HedgeConfig(delay=0.0))
    for _ in range(3):
        await endpoints.call(hedger)
    assert a.state is BreakerState.CLOSED
    await endpoints.call(hedger)
    assert a.state is BreakerState.OPEN


async def test_cancelling_the_whole_call_counts_nothing_for_any_breaker() -> None:
    a, b = CircuitBreaker("a", SLOW_RULE), CircuitBreaker("b", SLOW_RULE)
    endpoints = TwoEndpoints(a, b, ["hang"] * 3)
    hedger = Hedger("kv", HedgeConfig(delay=30.0))  # no hedge: the caller gives up first
    for _ in range(3):
        with anyio.move_on_after(0.01):
            await endpoints.call(hedger)
    assert a.snapshot().calls == 0
    assert a.state is BreakerState.CLOSED


async def test_a_router_hedging_across_endpoints_trips_the_hung_one() -> None:
    breaker = BreakerConfig(
        consecutive_failures=None,
        slow_call_rate_threshold=0.5,
        slow_call_duration=1.0,
        minimum_calls=3,
        window_size=10,
        keep_window=True,
    )
    hedge = HedgeConfig(delay=0.05)  # the good endpoint answers at its first checkpoint
    config = RouterConfig(retry=RetryConfig(max_attempts=1), breaker=breaker, hedge=hedge)
    router = Router("kv", [Endpoint("hung"), Endpoint("good")], config)

    async def on(endpoint: Endpoint) -> str:
        if endpoint.name == "hung":
            await anyio.sleep_forever()
        await anyio.lowlevel.checkpoint()
        return endpoint.name

    hung = router.breaker("hung")
    for _ in range(20):  # the hung endpoint gets about half the first attempts
        assert await router.call(on, hedge=True) == "good"
        if hung.state is BreakerState.OPEN:
            break
    assert hung.state is BreakerState.OPEN  # found out, and no caller saw a failure
    assert hung.snapshot().failures == 0
    assert router.breaker("good").snapshot().failures == 0
    assert router.statistics().failures == 0


# -- reload x hedging (issue 14, item 1)


def test_a_new_hedger_inherits_the_latencies_measured() -> None:
    old = Hedger("kv", HedgeConfig(percentile=0.5, min_samples=4, window=8))
    for latency in (0.1, 0.2, 0.3, 0.4, 0.5):
        old.record(latency)
    new = Hedger("kv", HedgeConfig(percentile=0.5, min_samples=4, window=4))
    new.inherit(old)  # the last 4 fit: 0.2 .. 0.5
    assert new.delay() == pytest.approx(0.3)


def test_reconfiguring_a_router_keeps_its_hedge_delay() -> None:
    hedge = HedgeConfig(percentile=0.5, min_samples=2, delay=9.0)
    router = Router("kv", [Endpoint("a"), Endpoint("b")], RouterConfig(hedge=hedge))
    for latency in (0.1, 0.2, 0.3):
        router._hedger.record(latency)  # type: ignore[union-attr]
    assert router._hedger.delay() == pytest.approx(0.2)  # type: ignore[union-attr]
    router.reconfigure(RouterConfig(hedge=hedge, breaker=BreakerConfig(consecutive_failures=9)))
    assert router._hedger.delay() == pytest.approx(0.2)  # type: ignore[union-attr]


async def test_hedge_events_are_built_only_for_a_subscriber_of_their_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[str] = []
    for klass in (HedgeStarted, HedgeWon, HedgeRefused):
        init = vars(klass)["__init__"]

        def counting(self: events.Event, *a: object, _init: object = init, **k: object) -> None:
            built.append(type(self).name)
            _init(self, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(klass, "__init__", counting)
    hedger = Hedger("kv", HedgeConfig(delay=0.001))
    unsubscribe = events.subscribe(lambda e: None, kinds={"resource.leak"})
    try:
        assert await hedger.call_async(Replicas("hang", "ok").get, "k") == "k@1"
    finally:
        unsubscribe()
    assert built == []
    got: list[str] = []
    unsubscribe = events.subscribe(lambda e: got.append(e.name), kinds={HedgeWon})
    try:
        assert await hedger.call_async(Replicas("hang", "ok").get, "k") == "k@1"
    finally:
        unsubscribe()
    assert built == got == ["hedge.won"]
