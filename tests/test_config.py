"""Configuration: TOML files and environment overrides into frozen, validated dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest

from datapunk_recovery import ErrorCategory
from datapunk_recovery.config import RecoveryConfig, ServicePolicy, build_config, load_config
from datapunk_recovery.schema import ConfigError, env_overrides, merge

GOOD = """
[defaults]
retry = { max_attempts = 3, base_delay = "100ms", max_delay = "10s" }
attempt_timeout = "2s"

[defaults.categories.rate_limited]
base_delay = "1s"
max_attempts = 5

[services.payments]
retry = { max_attempts = 5 }
endpoints = ["primary", "secondary"]
breaker = { open_duration = "5s" }

[services.search]
breaker = "none"

[pools.gpu]
capacity = 4
max_wait = 2.0
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recovery.toml"
    path.write_text(text)
    return path


def test_a_service_overrides_only_what_differs(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), environ={})

    payments = config.policy("payments")
    assert payments.retry.max_attempts == 5
    assert payments.retry.base_delay == 0.1  # from [defaults.retry]
    assert payments.attempt_timeout == 2.0  # from [defaults]
    assert payments.breaker is not None and payments.breaker.open_duration == 5.0
    assert payments.breaker.consecutive_failures == 5  # the library's default
    assert payments.endpoints == ("primary", "secondary")
    assert config.policy("search").breaker is None
    assert config.policy("anything-else") is config.defaults
    assert config.pools["gpu"].capacity == 4


def test_category_tables_inherit_their_services_retry(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), environ={})
    limited = config.policy("payments").categories[ErrorCategory.RATE_LIMITED]
    assert limited.base_delay == 1.0 and limited.max_attempts == 5
    assert limited.max_delay == 10.0  # from the retry table above it


def test_environment_overrides_win_key_by_key(tmp_path: Path) -> None:
    environ = {
        "DATAPUNK_RECOVERY__SERVICES__PAYMENTS__RETRY__MAX_ATTEMPTS": "7",
        "DATAPUNK_RECOVERY__SERVICES__NEW__RETRY__BASE_DELAY": "250ms",
        "OTHER_VARIABLE": "ignored",
    }
    config = load_config(write(tmp_path, GOOD), environ=environ)
    assert config.policy("payments").retry.max_attempts == 7
    assert config.policy("payments").breaker.open_duration == 5.0  # type: ignore[union-attr]
    assert config.policy("new").retry.base_delay == 0.25


def test_environment_alone_is_a_configuration() -> None:
    config = load_config(environ={"DATAPUNK_RECOVERY__DEFAULTS__RETRY__MAX_ATTEMPTS": "4"})
    assert config.defaults.retry.max_attempts == 4


def test_every_problem_is_listed_with_source_path_and_value(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        """
[defaults]
retry = { max_attempts = 0, base_delay = "fast" }
[defaults.categories.rate_limitd]
base_delay = "1s"
[services.payments]
retry = { max_atempts = 5 }
[bogus]
""",
    )
    variable = "DATAPUNK_RECOVERY__SERVICES__PAYMENTS__ATTEMPT_TIMEOUT"
    with pytest.raises(ConfigError) as caught:
        load_config(bad, environ={variable: "-1"})
    problems = {(p.source, p.path): p for p in caught.value.problems}
    assert set(problems) == {
        (str(bad), "bogus"),
        (str(bad), "defaults.retry.max_attempts"),
        (str(bad), "defaults.retry.base_delay"),
        (str(bad), "defaults.categories.rate_limitd"),
        (str(bad), "services.payments.retry.max_atempts"),
        (f"env {variable}", "services.payments.attempt_timeout"),
    }
    assert problems[str(bad), "defaults.retry.base_delay"].value == "fast"
    assert "did you mean 'max_attempts'" in str(caught.value)


def test_a_malformed_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[defaults\n"), environ={})
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.toml", environ={})


def test_a_database_needs_exactly_one_kind() -> None:
    with pytest.raises(ConfigError, match="exactly one of sqlite or postgres"):
        build_config({"databases": {"x": {}}})


def test_the_dataclasses_validate_themselves() -> None:
    with pytest.raises(ValueError, match="attempt_timeout"):
        ServicePolicy(attempt_timeout=0)
    with pytest.raises(ValueError, match="unique"):
        ServicePolicy(endpoints=("a", "a"))
    with pytest.raises(TypeError, match=r"RecoveryConfig\.services"):
        RecoveryConfig(services={"x": "not a policy"})  # type: ignore[dict-item]


def test_endpoints_take_priorities_addresses_and_hedging() -> None:
    config = build_config(
        {
            "services": {
                "api": {
                    "endpoints": ["a", "b", "c"],
                    "priorities": {"b": 0},
                    "addresses": {"a": "http://10.0.0.1"},
                    "hedge": {"delay": "20ms"},
                }
            }
        }
    )
    api = config.policy("api")
    assert dict(api.priorities) == {"b": 0}
    assert dict(api.addresses) == {"a": "http://10.0.0.1"}
    assert api.hedge is not None and api.hedge.delay == 0.02
    assert config.defaults.hedge is None


def test_an_unknown_endpoint_name_is_reported_at_the_endpoints_key() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"services": {"api": {"endpoints": ["a"], "priorities": {"z": 1}}}})
    (problem,) = caught.value.problems
    assert problem.path == "services.api.endpoints"
    assert "'z'" in str(problem)


def test_the_cache_settings_validate_and_never_show_a_password() -> None:
    url = "redis://user:hunter2@cache:6379/0"
    config = build_config({"cache": {"redis": url, "namespace": "shop"}})
    assert config.cache.redis == url and config.cache.namespace == "shop"
    assert "hunter2" not in repr(config)
    with pytest.raises(ConfigError, match="namespace"):
        build_config({"cache": {"namespace": "a:b"}})
    dsn = build_config({"databases": {"x": {"postgres": "postgresql://u:hunter2@db/x"}}})
    assert "hunter2" not in repr(dsn)


def test_problems_and_reprs_never_show_a_secret() -> None:
    environ = {"DATAPUNK_RECOVERY__CACHE__REDIS_URL": "redis://:hunter3@cache:6379/0"}
    document = {
        "databases": {"x": {"postgress": "postgresql://u:hunter2@db/x"}},
        "services": {"api": {"endpoints": ["a"], "addresses": {"a": "https://u:hunter4@a"}}},
        "pools": {"gpu": {"capacity": 0}},
    }
    with pytest.raises(ConfigError) as caught:
        build_config(merge(document, env_overrides(environ)))
    problems = {p.path: p for p in caught.value.problems}
    assert set(problems) == {"databases.x.postgress", "cache.redis_url", "pools.gpu.capacity"}
    message = str(caught.value)
    assert "hunter2" not in message and "hunter3" not in message
    assert "postgresql://u:***@db/x" in message  # still says which value, without its password
    assert problems["pools.gpu.capacity"].value == 0  # values without secrets stay themselves
    config = build_config({"services": document["services"]})
    assert "hunter4" not in repr(config) and "https://u:***@a" in repr(config)
    assert config.policy("api").addresses["a"] == "https://u:hunter4@a"
