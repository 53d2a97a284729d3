"""The contention model (AWS "Exponential Backoff And Jitter"): writes and completion time."""

from __future__ import annotations

import pytest

from datapunk_recovery import Jitter, RetryConfig
from datapunk_recovery.simulate import SimPolicy
from datapunk_recovery.simulate.catalog import builtin_policies
from datapunk_recovery.simulate.contention import (
    ContentionSetup,
    run_contention,
    simulate_contention,
)

BENCHMARK = SimPolicy(RetryConfig(base_delay=0.005, max_delay=2.0))  # the blog's base and cap


def kind(jitter: Jitter) -> SimPolicy:
    return SimPolicy(RetryConfig(base_delay=0.005, max_delay=2.0, jitter=jitter))


def test_a_lone_client_writes_once_after_three_messages() -> None:
    writes, last = simulate_contention(BENCHMARK, 1, seed=1)
    assert writes == 1
    assert 0.02 < last < 0.06  # read, version, write, answer: four ~10 ms messages


def test_every_client_gets_its_write_in_whatever_the_policy() -> None:
    # One successful write per client, and the failed ones on top.
    for jitter in Jitter:
        writes, _ = simulate_contention(kind(jitter), 8, seed=3)
        assert writes >= 8


def test_attempt_limits_are_lifted_so_that_everyone_finishes() -> None:
    strict = SimPolicy(RetryConfig(max_attempts=2, base_delay=0.005, max_delay=2.0))
    writes, last = simulate_contention(strict, 20, seed=5)
    assert writes > 2 * 20  # more writes than two attempts each: nobody gave up
    assert last > 0


def test_a_run_is_a_pure_function_of_its_seed() -> None:
    assert simulate_contention(BENCHMARK, 10, seed="x") == simulate_contention(
        BENCHMARK, 10, seed="x"
    )


def test_points_average_the_runs_and_report_progress() -> None:
    ticks: list[None] = []
    points = run_contention(
        {"full": BENCHMARK},
        ContentionSetup(clients=(5, 10), runs=3),
        progress=lambda: ticks.append(None),
    )
    assert [(p.policy, p.clients, p.runs) for p in points] == [("full", 5, 3), ("full", 10, 3)]
    assert len(ticks) == 6
    assert points[0].calls < points[1].calls
    assert all(p.calls_sd >= 0 and p.time_sd >= 0 for p in points)


def test_the_setup_is_validated() -> None:
    with pytest.raises(ValueError, match=r"ContentionSetup\.clients"):
        ContentionSetup(clients=())
    with pytest.raises(ValueError, match=r"ContentionSetup\.runs"):
        ContentionSetup(runs=0)


def test_the_published_ranking_of_the_jitter_kinds_is_reproduced() -> None:
    """No jitter does far more work and takes far longer than any jittered kind;
    full jitter does less work than decorrelated; equal jitter takes longer than full."""
    kinds = [Jitter.NONE, Jitter.FULL, Jitter.EQUAL, Jitter.DECORRELATED]
    # 10 runs per point: seeded, so deterministic, and the ranking holds with a
    # margin at 10 as at 20 (which takes twice as long).
    points = run_contention(
        {j.value: kind(j) for j in kinds}, ContentionSetup(clients=(50, 100), runs=10)
    )
    for n in (50, 100):
        at = {p.policy: p for p in points if p.clients == n}
        none = at["none"]
        for jittered in ("full", "equal", "decorrelated"):
            assert none.calls > 1.5 * at[jittered].calls
            assert none.time > 5 * at[jittered].time
        assert at["full"].calls < at["decorrelated"].calls
        assert at["full"].time < at["equal"].time


def test_in_the_published_setup_the_sawtooth_does_more_work_than_full_jitter_at_200() -> None:
    """The experimental sawtooth is no moonshot in the post's own setup (docs/simulate.md)."""
    published = builtin_policies(0.005, 2.0, "published")
    policies = {"full": published["full"], "sawtooth": published["sawtooth"]}
    points = run_contention(policies, ContentionSetup(clients=(200,), runs=3))
    at = {p.policy: p for p in points}
    assert at["sawtooth"].calls > 1.08 * at["full"].calls


def test_in_the_published_setup_decorrelated_finishes_sooner_at_25_and_does_more_work_at_100() -> (
    None
):
    """The two published winners: the bar a default must clear at every N."""
    published = builtin_policies(0.005, 2.0, "published")
    policies = {"full": published["full"], "decorrelated": published["decorrelated"]}
    points = run_contention(policies, ContentionSetup(clients=(25, 100), runs=12))
    at = {(p.policy, p.clients): p for p in points}
    assert at[("decorrelated", 25)].time < at[("full", 25)].time
    assert at[("decorrelated", 100)].calls > 1.1 * at[("full", 100)].calls
