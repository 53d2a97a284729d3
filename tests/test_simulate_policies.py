"""Simulation policies: the named built-ins and TOML policy files read with the schema."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from datapunk_recovery import Jitter, RetryConfig
from datapunk_recovery.breaker import BreakerConfig
from datapunk_recovery.budget import RatioBudgetConfig, TokenBudgetConfig
from datapunk_recovery.config.schema import NO_VALUE, ConfigError
from datapunk_recovery.simulate.catalog import builtin_policies, resolve_policies
from datapunk_recovery.simulate.policies import (
    DEFAULT_POLICY,
    SawtoothBackoff,
    SimPolicy,
    load_policies,
)


def test_the_builtins_are_one_per_jitter_kind_plus_plain_default_and_sawtooth() -> None:
    builtins = builtin_policies()
    assert list(builtins)[: len(Jitter) + 4] == [
        *(j.value for j in Jitter),
        "ours",
        "plain",
        "default",
        "sawtooth",
    ]
    assert builtins["decorrelated"].retry.jitter is Jitter.DECORRELATED
    assert builtins["plain"] == SimPolicy(
        retry=RetryConfig(), description=builtins["plain"].description
    )


def test_the_default_policy_is_the_library_defaults_with_budget_and_breaker() -> None:
    assert DEFAULT_POLICY.retry == RetryConfig()
    assert DEFAULT_POLICY.token_budget == TokenBudgetConfig()
    assert DEFAULT_POLICY.breaker == BreakerConfig()
    assert builtin_policies()["default"].retry == RetryConfig()


def test_builtins_take_the_benchmark_base_and_cap_when_asked() -> None:
    builtins = builtin_policies(base_delay=0.005, max_delay=2.0)
    for name in [*(j.value for j in Jitter), "plain", "default", "sawtooth"]:
        policy = builtins[name]
        assert (policy.retry.base_delay, policy.retry.max_delay) == (0.005, 2.0)
    # ours: the library's default as a user gets it, first window = the post's
    assert (builtins["ours"].retry.base_delay, builtins["ours"].retry.max_delay) == (0.010, 2.0)


def test_the_published_numbering_starts_full_jitter_at_twice_the_base() -> None:
    # The post's k-th retry waits under min(cap, base * 2**k): 10, 20, 40 ms...
    published = builtin_policies(0.005, 2.0, "published")["full"]
    windows = [0.010, 0.020, 0.040, 0.080, 0.160, 0.320, 0.640, 1.280, 2.0, 2.0]
    highs = [0.0] * len(windows)
    for seed in range(300):
        delays = itertools.islice(published.delays(random.Random(seed), endless=True), 10)
        for i, d in enumerate(delays):
            assert 0.0 <= d <= windows[i]
            highs[i] = max(highs[i], d)
    assert all(h > 0.9 * w for h, w in zip(highs, windows, strict=True))


def test_the_published_full_jitter_is_the_library_default_at_twice_the_base() -> None:
    builtins = builtin_policies(0.005, 2.0, "published")
    a = list(itertools.islice(builtins["full"].delays(random.Random(7), endless=True), 12))
    b = list(itertools.islice(builtins["ours"].delays(random.Random(7), endless=True), 12))
    assert a == pytest.approx(b)


def test_the_published_numbering_leaves_decorrelated_as_published() -> None:
    for indexing in ("library", "published"):
        policy = builtin_policies(0.005, 2.0, indexing)["decorrelated"]  # type: ignore[arg-type]
        first = [next(policy.delays(random.Random(s), endless=True)) for s in range(200)]
        assert all(0.005 <= d <= 0.015 for d in first)


def test_an_unknown_numbering_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"SimPolicy\.indexing"):
        SimPolicy(indexing="aws")  # type: ignore[arg-type]


def test_a_policy_has_at_most_one_budget() -> None:
    with pytest.raises(ValueError, match="at most one budget"):
        SimPolicy(token_budget=TokenBudgetConfig(), ratio_budget=RatioBudgetConfig())
    with pytest.raises(TypeError, match=r"SimPolicy\.retry"):
        SimPolicy(retry=None)  # type: ignore[arg-type]


def test_a_shared_budget_is_read_from_a_policy_file_and_must_be_a_bool(tmp_path: Path) -> None:
    path = write(tmp_path, "[policies.fleet]\ntoken_budget = {}\nshared_budget = true\n")
    assert load_policies(path)["fleet"].shared_budget is True
    with pytest.raises(TypeError, match=r"SimPolicy\.shared_budget"):
        SimPolicy(shared_budget="yes")  # type: ignore[arg-type]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policies.toml"
    path.write_text(text)
    return path


def test_a_policy_file_reads_durations_and_empty_tables_mean_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [policies.careful]
        description = "gRPC budget, quick breaker"
        retry = { max_attempts = 4, base_delay = "50ms", max_delay = "2s", jitter = "equal" }
        token_budget = {}
        breaker = { open_duration = "5s", consecutive_failures = 3 }
        sawtooth = { factor = 4 }

        [policies.bare]
        """,
    )
    policies = load_policies(path)
    careful = policies["careful"]
    assert careful.retry == RetryConfig(
        max_attempts=4, base_delay=0.05, max_delay=2.0, jitter=Jitter.EQUAL
    )
    assert careful.token_budget == TokenBudgetConfig()
    assert careful.breaker == BreakerConfig(open_duration=5.0, consecutive_failures=3)
    assert careful.sawtooth == SawtoothBackoff(4.0)
    assert policies["bare"] == SimPolicy()


def test_a_bad_policy_file_lists_every_problem_with_file_key_and_value(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [policies.broken]
        retry = { base_delay = "fast", max_attempts = 0 }
        breaker = { open_duration = "-5s" }
        budget = {}
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_policies(path)
    assert [(p.source, p.path, p.value) for p in info.value.problems] == [
        (str(path), "policies.broken.retry.base_delay", "fast"),
        (str(path), "policies.broken.retry.max_attempts", 0),
        (str(path), "policies.broken.breaker.open_duration", "-5s"),
        (str(path), "policies.broken.budget", NO_VALUE),
    ]
    assert "did you mean" in info.value.problems[-1].message


def test_names_are_looked_up_in_the_file_first_then_the_builtins(tmp_path: Path) -> None:
    path = write(tmp_path, '[policies.full]\nretry = { jitter = "none" }\n')
    chosen = resolve_policies(["full", "decorrelated"], path)
    assert list(chosen) == ["full", "decorrelated"]
    assert chosen["full"].retry.jitter is Jitter.NONE  # the file's, not the built-in
    assert list(resolve_policies([], path)) == ["full"]  # no names: the whole file


def test_unknown_names_are_listed_together() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_policies(["full", "nope", "nada"])
    assert [p.value for p in info.value.problems] == ["nope", "nada"]
    assert "known: none, full" in info.value.problems[0].message
    with pytest.raises(ConfigError, match="no policy named"):
        resolve_policies([])


class Ceiling(random.Random):
    """A generator whose uniform(a, b) is always b: delays show their windows."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_sawtooth_windows_grow_in_phases_and_come_back_down() -> None:
    retry = RetryConfig(max_attempts=None, deadline=60.0, base_delay=1.0, max_delay=100.0)
    windows = list(itertools.islice(SawtoothBackoff(4.0).delays(retry, Ceiling(), None), 10))
    assert windows == [4, 16, 4, 64, 16, 4, 100, 64, 16, 4]  # 256 capped at 100


def test_sawtooth_replaces_only_the_jitter_of_a_policy() -> None:
    policy = SimPolicy(RetryConfig(max_attempts=4, base_delay=0.5), sawtooth=SawtoothBackoff())
    assert list(policy.delays(Ceiling())) == [2.0, 8.0, 2.0]  # max_attempts - 1 of them
    endless = policy.delays(Ceiling(), endless=True)
    assert len(list(itertools.islice(endless, 50))) == 50
    rng = random.Random(1)
    assert all(0 <= d <= 10.0 for d in itertools.islice(policy.delays(rng, endless=True), 500))
    with pytest.raises(ValueError, match=r"SawtoothBackoff\.factor"):
        SawtoothBackoff(factor=0.5)


def test_plain_policies_use_retry_config_delays_themselves() -> None:
    retry = RetryConfig(max_attempts=3, jitter=Jitter.NONE, base_delay=0.1)
    assert list(SimPolicy(retry).delays(random.Random(0))) == list(retry.delays())
