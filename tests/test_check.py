"""`datapunk-recovery check FILE`: every problem, or each service's effective policy."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapunk_recovery import (
    ErrorCategory,
    Jitter,
    RecoveryError,
    RetryConfig,
    RetryPolicy,
    cli,
    retry,
)
from datapunk_recovery._core import clock
from datapunk_recovery._execution.deadline import remaining
from datapunk_recovery.cli.commands.check import worst_case
from datapunk_recovery.config import ServicePolicy, build_config
from datapunk_recovery.flow.bulkhead import BulkheadConfig


def test_prints_each_service_with_its_worst_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "recovery.toml"
    path.write_text(
        '[defaults]\nretry = { max_attempts = 3, base_delay = "1s", jitter = "none", '
        'max_server_delay = "0s" }\n'
        'attempt_timeout = "2s"\n[services.payments]\nretry = { max_attempts = 4 }\n'
    )
    assert cli.main(["check", str(path), "--no-env", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "(defaults)" in out and "payments" in out
    # payments: 4 attempts of 2 s, waits 1 + 2 + 4 s = 15 s
    assert "15s" in out


def test_reports_every_problem_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[services.payments]\nretry = { max_attempts = 0, base_delay = "x" }\n')
    assert cli.main(["check", str(path), "--no-env"]) == 1
    out = capsys.readouterr().out
    assert "2 problems" in out
    assert "services.payments.retry.max_attempts" in out
    assert "services.payments.retry.base_delay" in out


def test_worst_case_is_bounded_by_the_deadline_and_unbounded_without_timeout() -> None:
    config = build_config(
        {
            "defaults": {"retry": {"max_attempts": 3, "deadline": "1s"}, "attempt_timeout": "5s"},
            "services": {"open": {"attempt_timeout": "none", "retry": {"deadline": "none"}}},
        }
    )
    assert worst_case(config.defaults) == (3, 1.0)
    assert worst_case(config.policy("open")) == (3, None)


def test_worst_case_mixes_categories_the_worst_way() -> None:
    # The default allows 5 attempts with 1 s waits, rate_limited 3 attempts with
    # 10 s then 20 s waits: a call rate limited twice and then failing twice
    # more waits 10 + 20 + 1 + 1 s, longer than either alone (4 s, 30 s).
    config = build_config(
        {
            "defaults": {
                "retry": {
                    "max_attempts": 5,
                    "base_delay": "1s",
                    "max_delay": "1s",
                    "max_server_delay": "0s",
                },
                "attempt_timeout": "1s",
                "categories": {
                    "rate_limited": {"max_attempts": 3, "base_delay": "10s", "max_delay": "1m"}
                },
            }
        }
    )
    assert worst_case(config.defaults) == (5, pytest.approx(32.0 + 5 * 1.0))


def test_worst_case_counts_hedges_and_their_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "recovery.toml"
    path.write_text(
        '[defaults]\nretry = { max_attempts = 3, base_delay = "1s", jitter = "none" }\n'
        'attempt_timeout = "1s"\n'
        '[services.search]\nendpoints = ["a", "b"]\nhedge = { delay = "250ms", max_hedges = 2 }\n'
        '[services.plain]\nhedge = { delay = "250ms" }\n'  # nothing to hedge over
    )
    config = build_config(
        {
            "defaults": {
                "retry": {
                    "max_attempts": 3,
                    "base_delay": "1s",
                    "jitter": "none",
                    "max_server_delay": "0s",
                },
                "attempt_timeout": "1s",
            },
            "services": {
                "search": {"endpoints": ["a", "b"], "hedge": {"delay": "250ms", "max_hedges": 2}},
                "plain": {"hedge": {"delay": "250ms"}},
            },
        }
    )
    # 3 attempts, each with 2 hedges started 250 ms apart and failing after 1 s:
    # waits 1 + 2 s, attempts 3 x (0.5 + 1) s.
    assert worst_case(config.policy("search")) == (9, pytest.approx(3.0 + 3 * 1.5))
    assert worst_case(config.policy("plain")) == (3, pytest.approx(3.0 + 3 * 1.0))
    assert cli.main(["check", str(path), "--no-env", "--plain"]) == 0
    assert "9 (3 + 6 hedges)" in capsys.readouterr().out


def test_a_long_retry_series_is_bounded_without_an_exact_search() -> None:
    config = build_config(
        {
            "defaults": {
                "retry": {
                    "max_attempts": 2000,
                    "base_delay": "1s",
                    "max_delay": "1s",
                    "max_server_delay": "0s",
                },
                "attempt_timeout": "1s",
                "categories": {
                    "overloaded": {
                        "max_attempts": 3,
                        "base_delay": "1m",
                        "max_delay": "2m",
                        "jitter": "none",
                    }
                },
            }
        }
    )
    # Exact: 60 + 120 s for the overloaded retries, 1 s for each of the 1997 others.
    assert worst_case(config.defaults) == (2000, pytest.approx(180.0 + 1997.0 + 2000.0))


def test_problems_never_show_a_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "recovery.toml"
    path.write_text('[databases.orders]\npostgress = "postgresql://app:hunter2@db/app"\n')
    monkeypatch.setenv("DATAPUNK_RECOVERY__CACHE__REDIS_URL", "redis://:hunter3@cache:6379/0")
    assert cli.main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "databases.orders.postgress" in out and "cache.redis_url" in out
    assert "hunter2" not in out and "hunter3" not in out
    assert "postgresql://app:***@db/app" in out


# -- the worst case is a true upper bound of what the engine does --------------------------


class TopOfEveryRange(random.Random):
    """The adversary's generator: every jitter draw at the top of its range."""

    def random(self) -> float:
        return math.nextafter(1.0, 0.0)

    def uniform(self, a: float, b: float) -> float:
        return max(a, b)


CATEGORIES = (
    ErrorCategory.NETWORK,
    ErrorCategory.RATE_LIMITED,
    ErrorCategory.OVERLOADED,
    ErrorCategory.TIMEOUT,
)


@st.composite
def retry_configs(draw: st.DrawFn, *, with_deadline: bool = False) -> RetryConfig:
    base = draw(st.floats(0.0, 2.0))
    return RetryConfig(
        max_attempts=draw(st.integers(1, 7)),
        base_delay=base,
        max_delay=base + draw(st.floats(0.0, 5.0)),
        exponential_base=draw(st.floats(1.0, 4.0)),
        jitter=draw(st.sampled_from(list(Jitter))),
        jitter_factor=draw(st.floats(0.0, 1.0)),
        deadline=draw(st.none() | st.floats(0.01, 30.0)) if with_deadline else None,
        max_server_delay=draw(st.sampled_from([0.0, 0.5, 3.0, 10.0])),
    )


# One failed attempt: its category (None: the default's), the share of the attempt
# timeout it took, and the server's delay hint it carried (garbage included).
steps = st.tuples(
    st.none() | st.sampled_from(CATEGORIES),
    st.sampled_from([0.0, 0.5, 1.0]),
    st.none() | st.sampled_from([0.0, 0.2, 2.9, 3.0, 9.0, 50.0, -1.0, math.nan, math.inf]),
)


async def run_to_the_end(
    policy: RetryPolicy,
    timeout: float,
    script: list[tuple[object, float, object]],
    rng: random.Random,
) -> tuple[int, float]:
    """Drive the real engine until it gives up; the attempts made and the time spent."""
    fake = clock.current_fake()
    assert fake is not None
    made = 0

    async def call() -> None:
        nonlocal made
        category, share, hint = script[made % len(script)]
        made += 1
        took = share * timeout
        left = remaining()
        if left is not None:  # the engine cancels an attempt at the deadline
            took = min(took, max(left, 0.0))
        fake.advance(took)
        raise RecoveryError(
            "down",
            category=category or ErrorCategory.UNKNOWN,  # type: ignore[arg-type]
            retryable=True,
            retry_after=hint,  # type: ignore[arg-type]
        )

    start = fake.now()
    with pytest.raises(RecoveryError):
        await retry(policy, rng=rng)(call)()
    return made, fake.now() - start


@settings(max_examples=200, deadline=None)
@given(
    default=retry_configs(with_deadline=True),
    categories=st.dictionaries(st.sampled_from(CATEGORIES), retry_configs(), max_size=3),
    timeout=st.floats(0.001, 2.0),
    script=st.lists(steps, min_size=1, max_size=8),
    seed=st.none() | st.integers(0, 2**32),
)
def test_the_engine_never_takes_longer_than_the_worst_case_check_reports(
    default: RetryConfig,
    categories: Mapping[ErrorCategory, RetryConfig],
    timeout: float,
    script: list[tuple[object, float, object]],
    seed: int | None,
) -> None:
    policy = ServicePolicy(
        retry=default, categories=categories, attempt_timeout=timeout, breaker=None, budget=None
    )
    calls, bound = worst_case(policy)
    assert calls is not None and bound is not None
    rng = TopOfEveryRange() if seed is None else random.Random(seed)
    clock.use_clock(clock.FakeClock(1000.0))
    try:
        made, spent = asyncio.run(
            run_to_the_end(RetryPolicy(default, categories), timeout, script, rng)
        )
    finally:
        clock.use_clock(None)
    assert made <= calls
    assert spent <= bound * (1 + 1e-9) + 1e-9


def test_mixed_categories_count_retries_over_the_whole_call_as_the_engine_does() -> None:
    # The default grows 0.1, 0.3, 0.9, 2.7 s by the call's retry number; two rate
    # limited failures first (1 s each) push the default's waits to the third and
    # fourth retries: 1 + 1 + 0.9 + 2.7 = 5.6 s, longer than the default alone (4 s).
    default = RetryConfig(
        max_attempts=5,
        base_delay=0.1,
        exponential_base=3.0,
        jitter=Jitter.NONE,
        max_server_delay=0.0,
    )
    limited = RetryConfig(
        max_attempts=3, base_delay=1.0, max_delay=1.0, jitter=Jitter.NONE, max_server_delay=0.0
    )
    categories = {ErrorCategory.RATE_LIMITED: limited}
    policy = ServicePolicy(
        retry=default, categories=categories, attempt_timeout=0.1, breaker=None, budget=None
    )
    script: list[tuple[object, float, object]] = [
        (ErrorCategory.RATE_LIMITED, 1.0, None),
        (ErrorCategory.RATE_LIMITED, 1.0, None),
        (None, 1.0, None),
        (None, 1.0, None),
    ]
    clock.use_clock(clock.FakeClock())
    try:
        made, spent = asyncio.run(
            run_to_the_end(RetryPolicy(default, categories), 0.1, script, random.Random(0))
        )
    finally:
        clock.use_clock(None)
    assert (made, spent) == (5, pytest.approx(5.6 + 5 * 0.1))
    assert worst_case(policy) == (5, pytest.approx(5.6 + 5 * 0.1))  # reached: exact


def test_server_delays_count_in_the_worst_case_up_to_max_server_delay() -> None:
    retry_config = RetryConfig(max_attempts=3, base_delay=1.0, jitter=Jitter.NONE)
    policy = ServicePolicy(retry=retry_config, attempt_timeout=1.0, breaker=None, budget=None)
    # Each of the 2 retries may wait a Retry-After of up to 300 s (the default cap).
    assert worst_case(policy) == (3, pytest.approx(600.0 + 3.0))
    assert worst_case(policy, server_delays=False) == (3, pytest.approx(1.0 + 2.0 + 3.0))


def test_bulkhead_queueing_is_part_of_the_worst_case() -> None:
    retry_config = RetryConfig(max_attempts=2, base_delay=0.1, jitter=Jitter.NONE)
    plain = ServicePolicy(retry=retry_config, attempt_timeout=0.1, breaker=None, budget=None)
    queued = ServicePolicy(
        retry=retry_config,
        attempt_timeout=0.1,
        breaker=None,
        budget=None,
        bulkhead=BulkheadConfig(max_concurrent=2, max_queue=5, max_wait=0.7),
    )
    no_queue = ServicePolicy(
        retry=retry_config,
        attempt_timeout=0.1,
        breaker=None,
        budget=None,
        bulkhead=BulkheadConfig(max_concurrent=2),
    )
    _, alone = worst_case(plain)
    assert alone is not None
    assert worst_case(queued) == (2, pytest.approx(alone + 0.7))
    assert worst_case(no_queue) == (2, pytest.approx(alone))  # a full bulkhead rejects at once
    # The deadline caps the retries, not the wait in the queue before them.
    capped = ServicePolicy(
        retry=RetryConfig(max_attempts=2, base_delay=0.1, deadline=0.05),
        attempt_timeout=0.1,
        breaker=None,
        budget=None,
        bulkhead=BulkheadConfig(max_concurrent=2, max_queue=5, max_wait=0.7),
    )
    assert worst_case(capped) == (2, pytest.approx(0.05 + 0.7))


def test_the_facade_stays_within_the_worst_case_of_its_configuration() -> None:
    from datapunk_recovery.strategies import RecoveryStrategies

    config = build_config(
        {
            "defaults": {
                "retry": {
                    "max_attempts": 5,
                    "base_delay": "100ms",
                    "exponential_base": 3,
                    "jitter": "none",
                    "max_server_delay": "2s",
                },
                "categories": {"rate_limited": {"max_attempts": 3, "base_delay": "1s"}},
                "attempt_timeout": "200ms",
                "breaker": "none",
                "budget": "none",
            }
        }
    )
    calls, bound = worst_case(config.defaults)
    # Two rate limited failures asking for 2 s each, then the default's failures.
    script = iter(
        [
            RecoveryError(
                "slow down", category=ErrorCategory.RATE_LIMITED, retryable=True, retry_after=2.0
            ),
            RecoveryError(
                "slow down", category=ErrorCategory.RATE_LIMITED, retryable=True, retry_after=2.0
            ),
            *[RecoveryError("down", category=ErrorCategory.NETWORK, retryable=True)] * 3,
        ]
    )
    made = 0

    async def call() -> None:
        nonlocal made
        made += 1
        fake.advance(0.2)  # each attempt takes its whole timeout
        raise next(script)

    async def run() -> None:
        recovery = RecoveryStrategies(config)
        with pytest.raises(RecoveryError):
            await recovery.with_network_recovery("orders", call)

    fake = clock.FakeClock()
    clock.use_clock(fake)
    try:
        asyncio.run(run())
    finally:
        clock.use_clock(None)
    assert made == calls == 5
    assert bound is not None
    # 2 s asked by the server (more than rate_limited's 1 s), then its own 3 s
    # (more than the 2 s asked), then 0.9 and 2.7 s by the call's retry number.
    assert fake.now() == pytest.approx(2 + 3 + 0.9 + 2.7 + 5 * 0.2)
    assert fake.now() <= bound
def test_reports_keys_naming_unknown_endpoints_beside_every_other_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[services.payments]\n"
        'endpoints = ["primary"]\n'
        'addresses = { primary = "http://a", typo = "http://b" }\n'
        "priorities = { other = 1 }\n"
        "retry = { max_attempts = 0 }\n"
    )
    assert cli.main(["check", str(path), "--no-env"]) == 1
    out = capsys.readouterr().out
    assert "services.payments.retry.max_attempts" in out
    assert "addresses names endpoints that are not listed: ['typo']" in out
    assert "priorities names endpoints that are not listed: ['other']" in out



DEFAULTS_PLAIN = """\
effective recovery policies
service                   retry  per category              breaker     budget  bulkhead  attempt timeout  worst attempts  worst time
----------  -------------------  ------------  -------------------  ---------  --------  ---------------  --------------  ----------
(defaults)  3 x full 100ms..10s             -  5 in a row, open 1s  10 tokens       off             none               3   unbounded
"""  # noqa: E501


def test_the_plain_table_of_the_defaults_is_unchanged_and_a_ratio_budget_is_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "recovery.toml"
    path.write_text("")
    assert cli.main(["check", str(path), "--no-env", "--plain"]) == 0
    assert capsys.readouterr().out.startswith(DEFAULTS_PLAIN)
    path.write_text(
        '[services.reports]\nbudget = { kind = "ratio", ratio = 0.1, min_per_second = 0 }\n'
    )
    assert cli.main(["check", str(path), "--no-env", "--plain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (reports,) = [line for line in lines if line.startswith("reports")]
    assert "ratio 10% + 0/s over 10s" in reports
