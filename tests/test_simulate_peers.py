"""The peers' default policies as built-ins of the lab (issue 17, item 3), and the
published numbering of ``simulate contention``.

Each built-in is checked against the figures its peer documents; runs are
small and seeded.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from datapunk_recovery._core.backoff import Jitter
from datapunk_recovery.breaker import WindowKind
from datapunk_recovery.cli import main
from datapunk_recovery.simulate import OutageSetup, builtin_policies, run_outage
from datapunk_recovery.simulate.contention import simulate_contention
from datapunk_recovery.simulate.peers import RetryQuota, peer_policies
from datapunk_recovery.simulate.policies import (
    AdditiveJitter,
    RetryQuotaConfig,
    SimPolicy,
    load_policies,
)

PEERS = ("tenacity", "tenacity-bare", "stamina", "backoff", "aws", "grpc", "polly", "resilience4j")


def first_delays(policy: SimPolicy, count: int, seeds: int = 200) -> list[list[float]]:
    """``count`` delays of ``seeds`` seeded clients (attempt limits lifted)."""
    return [
        list(itertools.islice(policy.delays(random.Random(s), endless=True), count))
        for s in range(seeds)
    ]


def test_every_peer_is_a_builtin_with_a_description() -> None:
    builtins = builtin_policies()
    for name in PEERS:
        assert name in builtins
        assert builtins[name].description
    assert list(peer_policies()) == list(PEERS)


def test_tenacity_waits_two_to_the_n_seconds_plus_up_to_one_capped_at_a_minute() -> None:
    policy = peer_policies()["tenacity"]
    assert policy.retry.max_attempts is None  # no stop: for ever
    for delays in first_delays(policy, 8):
        for n, d in enumerate(delays, start=1):
            low = min(60.0, 2.0 ** (n - 1))
            assert low <= d <= min(60.0, low + 1.0)
    assert all(d == 60.0 for d in first_delays(policy, 8)[0][7:])


def test_a_bare_tenacity_retry_never_waits_and_never_stops() -> None:
    policy = peer_policies()["tenacity-bare"]
    assert policy.retry.max_attempts is None
    assert set(first_delays(policy, 50, seeds=3)[0]) == {0.0}


def test_stamina_makes_ten_attempts_within_45_s_from_a_tenth_of_a_second() -> None:
    policy = peer_policies()["stamina"]
    assert (policy.retry.max_attempts, policy.retry.deadline) == (10, 45.0)
    for delays in first_delays(policy, 9):
        assert 0.1 <= delays[0] <= 1.1
        assert all(d <= 5.0 for d in delays)
        assert 0.8 <= delays[3] <= 1.8


def test_backoff_full_jitter_waits_under_one_two_four_seconds() -> None:
    policy = peer_policies()["backoff"]
    assert policy.retry.max_attempts is None
    runs = first_delays(policy, 5)
    for n in range(5):
        window = 2.0**n
        assert all(0.0 <= r[n] <= window for r in runs)
        assert max(r[n] for r in runs) > 0.9 * window


def test_aws_standard_mode_is_three_attempts_under_twenty_seconds_with_a_quota() -> None:
    policy = peer_policies()["aws"]
    assert policy.retry.max_attempts == 3
    assert (policy.retry.base_delay, policy.retry.max_delay) == (1.0, 20.0)
    assert policy.retry_quota == RetryQuotaConfig(500.0, 5.0, 1.0)


def test_the_retry_quota_grants_a_hundred_retries_then_refills_on_success() -> None:
    quota = RetryQuota(RetryQuotaConfig())
    granted = 0
    while quota.allow_retry():
        quota.on_attempt(False)
        granted += 1
    assert granted == 100
    quota.on_attempt(True)  # a first-try success: one token back
    assert quota.tokens == 1.0
    for _ in range(4):
        quota.on_attempt(True)
    assert quota.allow_retry()  # five tokens: one retry
    quota.on_attempt(True)  # that retry succeeded: its cost comes back
    assert quota.tokens == 5.0


def test_grpc_follows_its_documented_example_with_throttling() -> None:
    policy = peer_policies()["grpc"]
    assert policy.retry.max_attempts == 4
    assert (policy.retry.base_delay, policy.retry.max_delay) == (0.1, 1.0)
    assert policy.token_budget is not None
    assert (policy.token_budget.max_tokens, policy.token_budget.token_ratio) == (10.0, 0.1)


def test_polly_has_decorrelated_v2_and_its_default_breaker() -> None:
    policy = peer_policies()["polly"]
    assert policy.retry.jitter is Jitter.DECORRELATED_V2
    assert (policy.retry.max_attempts, policy.retry.base_delay) == (4, 2.0)
    breaker = policy.breaker
    assert breaker is not None
    assert breaker.failure_rate_threshold == 0.1
    assert (breaker.window, breaker.window_duration, breaker.minimum_calls) == (
        WindowKind.TIME,
        30.0,
        100,
    )
    assert (breaker.open_duration, breaker.half_open_permits) == (5.0, 1)


def test_resilience4j_has_a_fixed_wait_and_its_default_breaker() -> None:
    policy = peer_policies()["resilience4j"]
    assert set(first_delays(policy, 2, seeds=5)[0]) == {0.5}
    breaker = policy.breaker
    assert breaker is not None
    assert (breaker.failure_rate_threshold, breaker.window_size, breaker.minimum_calls) == (
        0.5,
        100,
        100,
    )
    assert (breaker.open_duration, breaker.half_open_permits) == (60.0, 10)
    assert breaker.half_open_decision == "rate" and breaker.half_open_timeout is None


def test_a_policy_takes_at_most_one_budget_and_one_replacement_jitter() -> None:
    from datapunk_recovery.budget import TokenBudgetConfig
    from datapunk_recovery.simulate.policies import SawtoothBackoff

    with pytest.raises(ValueError, match=r"SimPolicy\.retry_quota"):
        SimPolicy(retry_quota=RetryQuotaConfig(), token_budget=TokenBudgetConfig())
    with pytest.raises(ValueError, match=r"SimPolicy\.additive"):
        SimPolicy(additive=AdditiveJitter(), sawtooth=SawtoothBackoff())
    with pytest.raises(ValueError, match=r"AdditiveJitter\.jitter"):
        AdditiveJitter(jitter=-1.0)
    with pytest.raises(ValueError, match=r"RetryQuotaConfig\.retry_cost"):
        RetryQuotaConfig(retry_cost=-5.0)


def test_through_an_outage_retrying_for_ever_multiplies_the_load() -> None:
    setup = OutageSetup(rate=20.0, clients=2, duration=12.0, outage_start=2.0, outage_duration=4.0)
    results = {r.policy: r for r in run_outage(peer_policies(), setup)}
    # forever-retrying policies get every request through eventually, at a price
    for name in ("tenacity", "backoff", "tenacity-bare"):
        assert results[name].amplification > 1.5
        assert results[name].success_during == 1.0
    assert results["tenacity-bare"].amplification > 20  # no wait at all
    # budgets keep the others near 1x
    for name in ("aws", "grpc"):
        assert results[name].amplification < results["backoff"].amplification


def test_the_peers_run_under_contention_and_finish() -> None:
    for name in ("tenacity-bare", "stamina", "grpc", "aws"):
        writes, last = simulate_contention(peer_policies()[name], 5, seed=1)
        assert writes >= 5 and last > 0


def test_a_policy_file_takes_the_peers_keys(tmp_path: Path) -> None:
    path = tmp_path / "peers.toml"
    path.write_text(
        "[policies.mine]\n"
        'retry = { base_delay = "1s", max_delay = "60s" }\n'
        'additive = { jitter = "500ms" }\n'
        "retry_quota = {}\n"
        'indexing = "published"\n'
    )
    policy = load_policies(path)["mine"]
    assert policy.additive == AdditiveJitter(jitter=0.5)
    assert policy.retry_quota == RetryQuotaConfig()
    assert policy.indexing == "published"


def test_simulate_contention_defaults_to_the_published_numbering(
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = ["simulate", "contention", "--clients", "5", "--runs", "2", "-p", "full,ours"]
    assert main([*common, "--format", "json"]) == 0
    published = json.loads(capsys.readouterr().out)
    assert published["policies"]["full"]["indexing"] == "published"
    calls = {r["policy"]: r["calls"] for r in published["results"]}
    assert calls["full"] == calls["ours"]  # the same draws: the same windows
    assert main([*common, "--indexing", "library", "--format", "json"]) == 0
    library = json.loads(capsys.readouterr().out)
    assert library["policies"]["full"]["indexing"] == "library"


def test_peers_compare_with_ours_from_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["simulate", "outage", "--duration", "12s", "--outage-start", "2s", "--outage", "3s"]
    assert main([*args, "--rate", "20", "--clients", "2", "-p", "default,stamina,aws"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("default", "stamina", "aws"))
