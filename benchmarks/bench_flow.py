"""Flow control: happy-path cost of each primitive alone and of the pipeline.

Run: ``.venv/bin/python benchmarks/bench_flow.py --fast`` (pyperf).  Every case
calls a function that returns at once, so the figure is the layer's own cost;
subtract the "bare call" case to get the overhead above a plain call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pyperf
from _timing import time_async, time_sync

from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._execution.deadline import deadline
from datapunk_recovery._execution.timeout import AttemptTimeout
from datapunk_recovery.breaker import CircuitBreaker
from datapunk_recovery.budget import RatioBudget, TokenBudget
from datapunk_recovery.flow.adaptive import AIMD, AdaptiveLimiter
from datapunk_recovery.flow.bulkhead import Bulkhead, BulkheadConfig
from datapunk_recovery.flow.fallback import Fallback
from datapunk_recovery.flow.hedging import HedgeConfig, Hedger, idempotent
from datapunk_recovery.flow.pipeline import Pipeline
from datapunk_recovery.flow.ratelimit import RateLimiter, RateLimiterConfig

LOOPS = 1000


def answer(x: int) -> int:
    return x


@idempotent
async def aanswer(x: int) -> int:
    return x


def sync_cases() -> dict[str, Callable[[], Any]]:
    big = 10**12  # limiters that never refuse during a benchmark
    bulkhead = Bulkhead("b", BulkheadConfig(max_concurrent=1000))
    limiter = RateLimiter("r", RateLimiterConfig(rate=big, burst=10**9))
    adaptive = AdaptiveLimiter("a", AIMD(initial=1000, max_limit=1000))
    timeout = AttemptTimeout(10.0)
    fallback = Fallback(0)
    token, ratio = TokenBudget(), RatioBudget()
    default = Pipeline("default")
    with_budget = Pipeline("budget", budget=TokenBudget())
    breaker_only = Pipeline("breaker", retry=None, breaker=CircuitBreaker("p1"))
    full = Pipeline(
        "full",
        fallback=Fallback(0),
        bulkhead=BulkheadConfig(max_concurrent=1000),
        limiter=RateLimiterConfig(rate=big, burst=10**9),
        deadline=30.0,
        retry=RetryConfig(),
        budget=TokenBudget(),
        breaker=CircuitBreaker("p2"),
        attempt_timeout=10.0,
    )

    def in_deadline() -> int:
        with deadline(30.0):
            return answer(1)

    def budget_token() -> int:
        result = answer(1)
        token.on_attempt(True)
        return result

    def budget_ratio() -> int:
        result = answer(1)
        ratio.on_attempt(True)
        return result

    return {
        "bare call": lambda: answer(1),
        "bulkhead": lambda: bulkhead.call(answer, 1),
        "rate limiter": lambda: limiter.call(answer, 1),
        "adaptive limiter (AIMD)": lambda: adaptive.call(answer, 1),
        "deadline block": in_deadline,
        "attempt timeout": lambda: timeout.call(answer, 1),
        "fallback": lambda: fallback.call(answer, 1),
        "token budget (on_attempt)": budget_token,
        "ratio budget (on_attempt)": budget_ratio,
        "pipeline: default (retry)": lambda: default.call(answer, 1),
        "pipeline: retry + token budget": lambda: with_budget.call(answer, 1),
        "pipeline: breaker only": lambda: breaker_only.call(answer, 1),
        "pipeline: everything (no hedging)": lambda: full.call(answer, 1),
    }


def async_cases() -> dict[str, Callable[[], Awaitable[Any]]]:
    big = 10**12
    bulkhead = Bulkhead("b", BulkheadConfig(max_concurrent=1000))
    limiter = RateLimiter("r", RateLimiterConfig(rate=big, burst=10**9))
    timeout = AttemptTimeout(10.0)
    hedger = Hedger("h", HedgeConfig(delay=10.0))
    default = Pipeline("default")
    full = Pipeline(
        "full",
        fallback=Fallback(0),
        bulkhead=BulkheadConfig(max_concurrent=1000),
        limiter=RateLimiterConfig(rate=big, burst=10**9),
        deadline=30.0,
        retry=RetryConfig(),
        budget=TokenBudget(),
        breaker=CircuitBreaker("p3"),
        attempt_timeout=10.0,
    )
    return {
        "bare call": lambda: aanswer(1),
        "bulkhead": lambda: bulkhead.call_async(aanswer, 1),
        "rate limiter": lambda: limiter.call_async(aanswer, 1),
        "attempt timeout (cancellable)": lambda: timeout.call_async(aanswer, 1),
        "hedger (fast answer, no hedge)": lambda: hedger.call_async(aanswer, 1),
        "pipeline: default (retry)": lambda: default.call_async(aanswer, 1),
        "pipeline: everything (no hedging)": lambda: full.call_async(aanswer, 1),
    }


def main() -> None:
    runner = pyperf.Runner()
    for name, fn in sync_cases().items():
        runner.bench_time_func(f"sync {name}", time_sync(fn))
    for name, afn in async_cases().items():
        runner.bench_time_func(f"async {name}", time_async(lambda afn=afn: afn))


if __name__ == "__main__":
    main()
