"""Retry budgets: gRPC token bucket, Finagle/SRE ratio window, criticality."""

from __future__ import annotations

import threading

import anyio
import pytest

from datapunk_recovery._core import errors, events
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._execution.engine import retry
from datapunk_recovery.budget import (
    BudgetRefused,
    Criticality,
    RatioBudget,
    RatioBudgetConfig,
    RetryGate,
    TokenBudget,
    TokenBudgetConfig,
    criticality,
    current_criticality,
)
from datapunk_recovery.testing import fake_clock

# ---------------------------------------------------------------------------
# criticality


def test_criticality_defaults_to_default_and_nests() -> None:
    assert current_criticality() is Criticality.DEFAULT
    with criticality(Criticality.SHEDDABLE):
        assert current_criticality() is Criticality.SHEDDABLE
        with criticality("critical") as level:
            assert level is Criticality.CRITICAL
            assert current_criticality() is Criticality.CRITICAL
        assert current_criticality() is Criticality.SHEDDABLE
    assert current_criticality() is Criticality.DEFAULT


def test_criticality_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="criticality: expected one of"), criticality("urgent"):
        pass


@pytest.mark.anyio
async def test_criticality_follows_async_tasks() -> None:
    seen: list[Criticality] = []

    async def child() -> None:
        seen.append(current_criticality())

    with criticality(Criticality.CRITICAL):
        await child()
    assert seen == [Criticality.CRITICAL]


# ---------------------------------------------------------------------------
# TokenBudget (gRPC retry throttling)


def test_token_budget_is_a_retry_gate() -> None:
    assert isinstance(TokenBudget(), RetryGate)
    assert isinstance(RatioBudget(), RetryGate)


def test_token_budget_refuses_at_half_like_grpc() -> None:
    budget = TokenBudget(config=TokenBudgetConfig(max_tokens=10, token_ratio=0.1))
    allowed = []
    for _ in range(6):
        budget.on_attempt(False)  # the engine reports the failure first...
        allowed.append(budget.allow_retry())  # ...then asks for the retry
    # 9, 8, 7, 6 tokens: allowed; 5 is not more than half of 10: refused.
    assert allowed == [True, True, True, True, False, False]
    assert budget.tokens == 4.0


def test_token_budget_successes_earn_back_a_fraction() -> None:
    budget = TokenBudget(config=TokenBudgetConfig(max_tokens=10, token_ratio=0.5))
    for _ in range(5):
        budget.on_attempt(False)
    assert not budget.allow_retry()
    budget.on_attempt(True)  # 5.5 > 5
    assert budget.allow_retry()
    for _ in range(100):
        budget.on_attempt(True)
    assert budget.tokens == 10.0  # never above the maximum
    budget.reset()
    assert budget.tokens == 10.0


def test_token_budget_sheds_lower_criticality_first() -> None:
    budget = TokenBudget(config=TokenBudgetConfig(max_tokens=100))

    def allowed() -> dict[Criticality, bool]:
        out = {}
        for level in Criticality:
            with criticality(level):
                out[level] = budget.allow_retry()
        return out

    for _ in range(25):  # 75 tokens: sheddable needs > 75
        budget.on_attempt(False)
    assert allowed() == {
        Criticality.SHEDDABLE: False,
        Criticality.DEFAULT: True,
        Criticality.CRITICAL: True,
    }
    for _ in range(25):  # 50 tokens
        budget.on_attempt(False)
    assert allowed() == {
        Criticality.SHEDDABLE: False,
        Criticality.DEFAULT: False,
        Criticality.CRITICAL: True,
    }
    for _ in range(25):  # 25 tokens
        budget.on_attempt(False)
    assert not any(allowed().values())


def test_token_budget_reports_refusals_as_events() -> None:
    bus = events.EventBus()
    seen: list[events.Event] = []
    bus.subscribe(seen.append)
    budget = TokenBudget("payments", TokenBudgetConfig(max_tokens=2), bus=bus)
    budget.on_attempt(False)
    budget.on_attempt(False)
    with criticality("sheddable"):
        assert not budget.allow_retry()
    assert len(seen) == 1
    event = seen[0]
    assert isinstance(event, BudgetRefused)
    assert (event.operation, event.criticality, event.level, event.limit) == (
        "payments",
        "sheddable",
        0.0,
        1.5,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_tokens": 0.5}, "TokenBudgetConfig.max_tokens"),
        ({"token_ratio": -1}, "TokenBudgetConfig.token_ratio"),
        ({"threshold": 1.5}, "TokenBudgetConfig.threshold"),
        ({"critical_threshold": 0.9}, "TokenBudgetConfig.threshold: need critical"),
        ({"max_tokens": True}, "TokenBudgetConfig.max_tokens"),
    ],
)
def test_token_budget_config_is_validated(changes: dict[str, object], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        TokenBudgetConfig(**changes)  # type: ignore[arg-type]


def test_token_budget_is_exact_under_threads() -> None:
    budget = TokenBudget(config=TokenBudgetConfig(max_tokens=1000, token_ratio=1.0))
    for _ in range(1000):
        budget.on_attempt(False)
    assert budget.tokens == 0.0

    def work() -> None:
        for _ in range(100):
            budget.on_attempt(True)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.tokens == 800.0  # no update lost


# ---------------------------------------------------------------------------
# RatioBudget (Finagle / SRE)


def test_ratio_budget_allows_ratio_plus_floor_then_refuses() -> None:
    config = RatioBudgetConfig(ratio=0.2, min_per_second=1.0, window=10.0)
    with fake_clock():
        budget = RatioBudget(config=config)
        for _ in range(100):
            budget.on_attempt(True)
        # floor 1/s * 10 s = 10, plus 20% of 100 requests = 30 retries.
        assert budget.allowance() == 30.0
        granted = 0
        while budget.allow_retry():
            granted += 1
            budget.on_attempt(False)  # the retry's own attempt: not a new request
        assert granted == 30
        assert not budget.allow_retry()


def test_ratio_budget_retries_do_not_earn_retries() -> None:
    with fake_clock():
        budget = RatioBudget(config=RatioBudgetConfig(ratio=0.5, min_per_second=0.0))
        for _ in range(10):
            budget.on_attempt(False)
        assert budget.allow_retry()  # 10 requests: 5 retries allowed
        for _ in range(4):
            budget.on_attempt(False)  # the retry's attempt
            assert budget.allow_retry()
        budget.on_attempt(False)
        # 15 attempts of which 5 were retries: 10 requests, still 5 retries.
        assert not budget.allow_retry()


def test_ratio_budget_window_slides_on_the_clock() -> None:
    config = RatioBudgetConfig(ratio=0.0, min_per_second=1.0, window=10.0, buckets=10)
    with fake_clock() as clock:
        budget = RatioBudget(config=config)
        for _ in range(10):
            assert budget.allow_retry()
        assert not budget.allow_retry()
        clock.advance(9.99)  # the first bucket has not left the window yet
        assert not budget.allow_retry()
        clock.advance(0.01)  # it has: ten retries leave with it
        granted = 0
        while budget.allow_retry():
            granted += 1
        assert granted == 10


def test_ratio_budget_sheds_lower_criticality_first() -> None:
    config = RatioBudgetConfig(ratio=0.0, min_per_second=1.0, window=10.0)
    with fake_clock():
        budget = RatioBudget(config=config)
        counts = {}
        for level in Criticality:
            budget.reset()
            with criticality(level):
                n = 0
                while budget.allow_retry():
                    n += 1
            counts[level] = n
    assert counts == {Criticality.SHEDDABLE: 5, Criticality.DEFAULT: 10, Criticality.CRITICAL: 15}


def test_ratio_budget_config_is_validated() -> None:
    with pytest.raises(ValueError, match=r"RatioBudgetConfig.window: must be > 0"):
        RatioBudgetConfig(window=0)
    with pytest.raises(ValueError, match=r"RatioBudgetConfig.critical_share: must be >= 1"):
        RatioBudgetConfig(critical_share=0.5)
    with pytest.raises(TypeError, match=r"RatioBudget\.config"):
        RatioBudget(config=TokenBudgetConfig())  # type: ignore[arg-type]


def test_reconfiguring_a_ratio_budget_keeps_its_window() -> None:
    config = RatioBudgetConfig(ratio=0.0, min_per_second=1.0, window=10.0, buckets=10)
    with fake_clock():
        budget = RatioBudget(config=config)
        for _ in range(10):
            assert budget.allow_retry()
        budget.reconfigure(RatioBudgetConfig(ratio=0.0, min_per_second=2.0, window=10.0))
        # the 10 retries granted still count: 20 allowed, 10 more
        granted = 0
        while budget.allow_retry():
            granted += 1
        assert granted == 10
        assert budget.config.min_per_second == 2.0


def test_a_reshaped_ratio_budget_keeps_the_counts_its_new_window_covers() -> None:
    config = RatioBudgetConfig(ratio=0.0, min_per_second=1.0, window=10.0, buckets=10)
    with fake_clock() as clock:
        budget = RatioBudget(config=config)
        for _ in range(3):
            assert budget.allow_retry()  # in the bucket [0, 1)
        clock.advance(8.0)
        for _ in range(4):
            assert budget.allow_retry()  # in the bucket [8, 9)
        # a 5 s window in 5 buckets covers (3.5, 8.5]: the newest 4 stay, the oldest 3 leave
        budget.reconfigure(RatioBudgetConfig(ratio=0.0, min_per_second=1.0, window=5.0, buckets=5))
        assert budget.allowance() == 5.0
        granted = 0
        while budget.allow_retry():
            granted += 1
        assert granted == 1
        clock.advance(4.99)  # 12.99: the bucket [8, 9) is still inside the new window
        assert not budget.allow_retry()
        clock.advance(0.01)  # 13: it has left, with its 5 retries
        granted = 0
        while budget.allow_retry():
            granted += 1
        assert granted == 5


def test_a_ratio_budget_reconfigured_with_a_token_config_is_refused() -> None:
    budget = RatioBudget()
    with pytest.raises(TypeError, match=r"RatioBudget\.reconfigure: expected a RatioBudgetConfig"):
        budget.reconfigure(TokenBudgetConfig())  # type: ignore[arg-type]
    assert budget.config == RatioBudgetConfig()


# ---------------------------------------------------------------------------
# with the retry engine


def test_engine_gives_up_when_the_budget_refuses_and_marks_the_error_final() -> None:
    budget = TokenBudget(config=TokenBudgetConfig(max_tokens=4))
    calls = 0

    @retry(RetryConfig(max_attempts=10, base_delay=0.0), on=ConnectionError, budget=budget)
    def flaky() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    with pytest.raises(ConnectionError) as info:
        flaky()
    # 4 -> 3 (retry), 3 -> 2 (refused: not more than 2)
    assert calls == 2
    assert errors.final_reason(info.value) == "retry budget exhausted"

    outer_calls = 0

    @retry(RetryConfig(max_attempts=5, base_delay=0.0), on=ConnectionError)
    def outer() -> None:
        nonlocal outer_calls
        outer_calls += 1
        flaky()

    with pytest.raises(ConnectionError):
        outer()
    assert outer_calls == 1  # the outer layer saw the mark and did not retry


@pytest.mark.anyio
async def test_cancelled_attempts_cost_the_budget_nothing() -> None:
    budget = TokenBudget(config=TokenBudgetConfig(max_tokens=10))
    attempts = 0

    @retry(RetryConfig(max_attempts=3, base_delay=0.0), budget=budget)
    async def slow() -> None:
        nonlocal attempts
        attempts += 1
        await anyio.sleep(60.0)  # cancelled at its first checkpoint

    with anyio.CancelScope() as scope:
        scope.cancel()
        await slow()
    assert scope.cancelled_caught
    assert attempts == 1  # never retried
    assert budget.tokens == 10.0  # never counted
