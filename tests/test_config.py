"""Configuration: TOML files and environment overrides into frozen, validated dataclasses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapunk_recovery import ErrorCategory, RetryConfig, cli
from datapunk_recovery.budget import RatioBudget, RatioBudgetConfig, TokenBudget, TokenBudgetConfig
from datapunk_recovery.config import RecoveryConfig, ServicePolicy, build_config, load_config
from datapunk_recovery.config.schema import ConfigError, Problem, env_overrides, merge
from datapunk_recovery.strategies import RecoveryStrategies

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


# -- rules between fields judge the values given ------------------------------------------

# Each document satisfies every rule that ties two fields together, while each of
# the values it gives would break the rule against the default (or inherited)
# value of the other field.
TIED: dict[str, dict[str, Any]] = {
    "retry": {"defaults": {"retry": {"base_delay": "1ms", "max_delay": "50ms"}}},
    "category": {
        "defaults": {
            "retry": {"base_delay": "1ms", "max_delay": "50ms"},
            "categories": {"rate_limited": {"max_attempts": 5}},
        }
    },
    "breaker open": {"defaults": {"breaker": {"open_duration": "5s", "max_open_duration": "10s"}}},
    "breaker window": {
        "defaults": {
            "breaker": {"failure_rate_threshold": 0.5, "window_size": 200, "minimum_calls": 150}
        }
    },
    "budget": {"defaults": {"budget": {"threshold": 0.8, "sheddable_threshold": 0.9}}},
    "hedge": {
        "defaults": {"hedge": {"min_delay": "1s", "max_delay": "2s"}},
        "services": {"s": {"hedge": {"min_delay": "100ms", "max_delay": "500ms"}}},
    },
    "bulkhead": {
        "defaults": {"bulkhead": {"max_concurrent": 2, "max_queue": 5, "max_wait": "1s"}},
        "services": {"s": {"bulkhead": {"max_queue": 0, "max_wait": 0}}},
    },
    "endpoints": {
        "defaults": {"endpoints": ["a", "b"], "addresses": {"a": "http://a", "b": "http://b"}},
        "services": {"s": {"endpoints": ["c"], "addresses": {"c": "http://c"}}},
    },
    "pool": {
        "pools": {
            "gpu": {"capacity": 2, "allocation_retry": {"base_delay": "1ms", "max_delay": "5ms"}}
        }
    },
}


def toml_of(document: dict[str, Any]) -> str:
    """The TOML text of a small document (tables of tables, inline below that)."""

    def inline(value: object) -> str:
        if isinstance(value, dict):
            return "{ " + ", ".join(f"{k} = {inline(v)}" for k, v in value.items()) + " }"
        if isinstance(value, list):
            return "[" + ", ".join(inline(v) for v in value) + "]"
        if isinstance(value, str):
            return '"' + value + '"'
        return repr(value)

    lines = []
    for top, table in document.items():
        plain = {k: v for k, v in table.items() if top not in ("services", "pools")}
        if plain:
            lines.append(f"[{top}]")
            lines.extend(f"{k} = {inline(v)}" for k, v in plain.items())
        for name, value in table.items():
            if top in ("services", "pools"):
                lines.append(f"[{top}.{name}]")
                lines.extend(f"{k} = {inline(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"


def env_of(document: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, str]:
    """The DATAPUNK_RECOVERY__... variables that say the same as ``document``."""
    environ: dict[str, str] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            environ.update(env_of(value, (*path, key)))
        else:
            text = ",".join(value) if isinstance(value, list) else str(value)
            environ["__".join(("DATAPUNK_RECOVERY", *path, key)).upper()] = text
    return environ


@pytest.mark.parametrize("case", sorted(TIED))
def test_a_rule_between_fields_uses_the_values_given_in_toml_env_check_and_reload(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = TIED[case]
    path = write(tmp_path, toml_of(document))
    from_file = load_config(path, environ={})
    assert from_file == build_config(document)
    assert load_config(environ=env_of(document)) == from_file
    assert cli.main(["check", str(path), "--no-env", "--plain"]) == 0, capsys.readouterr().out
    recovery = RecoveryStrategies()
    recovery.reload(document, environ={})
    assert recovery.config == from_file


def test_the_tiny_retry_policy_of_the_issue_is_accepted() -> None:
    config = build_config({"defaults": {"retry": {"base_delay": "1ms", "max_delay": "50ms"}}})
    assert (config.defaults.retry.base_delay, config.defaults.retry.max_delay) == (0.001, 0.05)


def test_a_broken_rule_between_given_values_is_still_reported_once() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"defaults": {"retry": {"base_delay": "2s", "max_delay": "1s"}}})
    assert [(p.path, p.message) for p in caught.value.problems] == [
        ("defaults.retry.max_delay", "must be >= base_delay (2.0)")
    ]


def test_a_value_refused_on_its_own_does_not_make_its_partner_look_wrong() -> None:
    # base_delay is refused (too long); max_delay is not judged against the default
    # base_delay it was given a partner for.  A bad max_attempts is still reported.
    with pytest.raises(ConfigError) as caught:
        build_config(
            {"defaults": {"retry": {"base_delay": 1e11, "max_delay": "50ms", "max_attempts": 0}}}
        )
    assert [p.path for p in caught.value.problems] == [
        "defaults.retry.base_delay",
        "defaults.retry.max_attempts",
    ]
    with pytest.raises(ConfigError) as caught:
        build_config({"defaults": {"retry": {"max_delay": "50ms", "max_attempts": 0}}})
    assert {p.path for p in caught.value.problems} == {
        "defaults.retry.max_delay",  # against the default base_delay: it was not given
        "defaults.retry.max_attempts",
    }


# -- durations: one maximum, one spelling ------------------------------------------------


@pytest.mark.parametrize("field", ["base_delay", "max_delay", "deadline", "max_server_delay"])
def test_a_retry_duration_beyond_one_day_is_refused_in_code_toml_and_env(
    field: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=rf"RetryConfig\.{field}: must be <= 86400 seconds"):
        RetryConfig(**{field: 1e10, "max_delay": 1e10} if field == "base_delay" else {field: 1e10})
    path = write(tmp_path, f"[defaults]\nretry = {{ {field} = 1e10 }}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    (problem,) = caught.value.problems
    assert (problem.path, problem.value) == (f"defaults.retry.{field}", 1e10)
    assert "one day" in problem.message
    variable = f"DATAPUNK_RECOVERY__DEFAULTS__RETRY__{field.upper()}"
    with pytest.raises(ConfigError) as caught:
        load_config(environ={variable: "1e10"})
    (problem,) = caught.value.problems
    assert (problem.source, problem.value) == (f"env {variable}", "1e10")
    assert "one day" in problem.message


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("bulkhead", "max_wait"),
        ("breaker", "open_duration"),
        ("breaker", "slow_call_duration"),
        ("hedge", "delay"),
        ("", "attempt_timeout"),
    ],
)
def test_every_service_duration_takes_text_and_refuses_more_than_a_day(
    table: str, key: str
) -> None:
    extra = {"max_queue": 1} if table == "bulkhead" else {}
    inner = {key: "10s", **extra}
    service: dict[str, Any] = {table: inner} if table else inner
    config = build_config({"services": {"s": service}})
    got = getattr(config.policy("s"), table) if table else config.policy("s")
    assert getattr(got, key) == 10.0
    environ = {
        "__".join(
            filter(None, ("DATAPUNK_RECOVERY__SERVICES__S", table.upper(), key.upper()))
        ): "10s"
    }
    environ.update(
        {
            f"DATAPUNK_RECOVERY__SERVICES__S__{table.upper()}__{k.upper()}": str(v)
            for k, v in extra.items()
        }
    )
    assert load_config(environ=environ) == config
    with pytest.raises(ConfigError, match="one day"):
        build_config({"services": {"s": {table: {**inner, key: "2d"}} if table else {key: "2d"}}})


def test_the_pool_wait_takes_a_duration_text(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[pools.gpu]\ncapacity = 4\nmax_wait = "2s"\n'), environ={}
    )
    assert config.pools["gpu"].max_wait == 2.0


# -- malformed variable names --------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "DATAPUNK_RECOVERY__SERVICES____RETRY__MAX_ATTEMPTS",
        "DATAPUNK_RECOVERY__",
        "DATAPUNK_RECOVERY____RETRY",
        "DATAPUNK_RECOVERY__DEFAULTS__RETRY__",
    ],
)
def test_a_variable_with_an_empty_key_is_a_configuration_error_naming_it(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={name: "5"})
    (problem,) = caught.value.problems
    assert problem.source == f"env {name}"
    assert "empty key" in problem.message


def test_a_misnamed_variable_never_shows_its_value() -> None:
    name = "DATAPUNK_RECOVERY__DATABASES____POSTGRES"
    with pytest.raises(ConfigError) as caught:
        load_config(environ={name: "postgresql://app:hunter2@db/app"})
    assert name in str(caught.value) and "hunter2" not in str(caught.value)


def test_an_empty_service_pool_or_database_name_in_a_file_is_a_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(
            {
                "services": {"": {"retry": {"max_attempts": 2}}},
                "pools": {"": {"capacity": 1}},
                "databases": {"": {"sqlite": "x.db"}},
            }
        )
    assert [p.path for p in caught.value.problems] == [
        "services.''",
        "pools.''",
        "databases.''",
    ]


_NAME_PARTS = st.sampled_from(
    [
        "",
        "_",
        "__",
        "SERVICES",
        "DEFAULTS",
        "RETRY",
        "MAX_ATTEMPTS",
        "BASE_DELAY",
        "POOLS",
        "CAPACITY",
        "BREAKER",
        "CATEGORIES",
        "RATE_LIMITED",
        "ENDPOINTS",
        "X",
        "é",
        " ",
        "0",
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.lists(_NAME_PARTS, min_size=1, max_size=6).map(
            lambda parts: "DATAPUNK_RECOVERY__" + "__".join(parts)
        ),
        st.sampled_from(["", "5", "-1", "1e10", "none", "250ms", "a,b", "true", "\x00", "é"]),
        max_size=5,
    )
)
def test_any_set_of_variables_gives_a_configuration_or_a_configuration_error(
    environ: dict[str, str],
) -> None:
    problems: tuple[Problem, ...] = ()
    try:
        config = load_config(environ=environ)
    except ConfigError as exc:
        problems = exc.problems
    else:
        assert isinstance(config, RecoveryConfig)
    # Every problem names a variable (or the environment as a whole).
    assert all("DATAPUNK_RECOVERY" in p.source or p.source == "environment" for p in problems)


def test_a_service_chooses_its_fallthrough_rule_and_a_wrong_one_is_named() -> None:
    config = build_config({"services": {"api": {"endpoints": ["a"], "fallthrough": "breaker"}}})
    assert config.policy("api").fallthrough == "breaker"
    assert config.policy("other").fallthrough == "call"
    with pytest.raises(ConfigError, match=r"services\.api\.fallthrough"):
        build_config({"services": {"api": {"fallthrough": "sometimes"}}})


def test_a_service_chooses_a_ratio_budget_in_toml_and_others_keep_the_token_budget(
    tmp_path: Path,
) -> None:
    config = load_config(
        write(
            tmp_path,
            "[services.reports]\n"
            'budget = { kind = "ratio", ratio = 0.1, min_per_second = 0, window = "5s" }\n'
            "[services.search]\nbudget = { ratio = 0.05 }\n"
            "[services.payments]\nbudget = { max_tokens = 20 }\n",
        ),
        environ={},
    )
    assert config.policy("reports").budget == RatioBudgetConfig(
        ratio=0.1, min_per_second=0.0, window=5.0
    )
    assert config.policy("search").budget == RatioBudgetConfig(ratio=0.05)  # chosen by its keys
    assert config.policy("payments").budget == TokenBudgetConfig(max_tokens=20.0)
    assert config.defaults.budget == TokenBudgetConfig()
    strategies = RecoveryStrategies(config)
    assert isinstance(strategies.budget("reports"), RatioBudget)
    assert isinstance(strategies.budget("payments"), TokenBudget)


def test_a_ratio_budget_in_the_defaults_is_inherited_key_by_key(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            '[defaults]\nbudget = { kind = "ratio", ratio = 0.1 }\n'
            "[services.reports]\nbudget = { min_per_second = 1 }\n"
            '[services.payments]\nbudget = { kind = "token" }\n',
        ),
        environ={},
    )
    assert config.policy("reports").budget == RatioBudgetConfig(ratio=0.1, min_per_second=1.0)
    assert config.policy("payments").budget == TokenBudgetConfig()


def test_the_budget_kind_comes_from_the_environment() -> None:
    config = load_config(
        environ={
            "DATAPUNK_RECOVERY__SERVICES__REPORTS__BUDGET__KIND": "ratio",
            "DATAPUNK_RECOVERY__SERVICES__REPORTS__BUDGET__MIN_PER_SECOND": "0",
        }
    )
    assert config.policy("reports").budget == RatioBudgetConfig(min_per_second=0.0)


def test_a_bad_budget_kind_or_value_is_named_with_its_field_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            write(
                tmp_path,
                '[services.a]\nbudget = { kind = "leaky" }\n'
                '[services.b]\nbudget = { kind = "ratio", ratio = -1 }\n'
                '[services.c]\nbudget = { kind = "ratio", max_tokens = 5 }\n',
            ),
            environ={},
        )
    lines = [str(p) for p in caught.value.problems]
    source = str(tmp_path / "recovery.toml")
    assert lines[:2] == [
        f"{source}: services.a.budget.kind: expected one of 'token', 'ratio' (got 'leaky')",
        f"{source}: services.b.budget.ratio: must be >= 0 (got -1)",
    ]
    assert lines[2].startswith(
        f"{source}: services.c.budget.max_tokens: unknown key for RatioBudgetConfig"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"DATAPUNK_RECOVERY__DEFAULTS__BUDGET__KIND": "bucket"})
    assert [str(p) for p in caught.value.problems] == [
        "env DATAPUNK_RECOVERY__DEFAULTS__BUDGET__KIND: defaults.budget.kind: "
        "expected one of 'token', 'ratio' (got 'bucket')"
    ]
    with pytest.raises(TypeError, match=r"ServicePolicy\.budget: expected a TokenBudgetConfig or"):
        ServicePolicy(budget=RetryConfig())  # type: ignore[arg-type]


def test_a_reload_switches_the_budget_kind_and_keeps_a_ratio_budget_whose_figures_stay() -> None:
    ratio = {"services": {"reports": {"budget": {"kind": "ratio", "min_per_second": 0}}}}
    recovery = RecoveryStrategies.from_config(ratio, environ={})
    first = recovery.budget("reports")
    assert isinstance(first, RatioBudget)
    recovery.reload({**ratio, "cache": {"ttl": "5s"}}, environ={})
    assert recovery.budget("reports") is first  # the same figures: the same window
    recovery.reload({"services": {"reports": {"budget": {"max_tokens": 4}}}}, environ={})
    tokens = recovery.budget("reports")
    assert isinstance(tokens, TokenBudget) and tokens.config.max_tokens == 4.0
