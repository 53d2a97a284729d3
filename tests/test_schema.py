"""The configuration schema: plain mappings (TOML, environment) into the library's dataclasses."""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from datapunk_recovery import ErrorCategory, Jitter, RetryConfig, RetryPolicy
from datapunk_recovery.config.schema import (
    ConfigError,
    Problem,
    Text,
    build,
    env_overrides,
    is_duration_field,
    merge,
    read_toml,
    union_kinds,
)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True, slots=True)
class Inner:
    ratio: float = 0.5
    open_duration: float = 1.0
    window: float = dataclasses.field(default=10.0, metadata={"unit": "seconds"})
    count_period: float = dataclasses.field(default=3.0, metadata={"unit": "calls"})


@dataclasses.dataclass(frozen=True, slots=True)
class Everything:
    name: str
    enabled: bool = True
    count: int = 1
    color: Color = Color.RED
    limit: int | None = None
    sizes: tuple[int, ...] = ()
    inner: Inner = dataclasses.field(default_factory=Inner)
    by_name: Mapping[str, Inner] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.count > 100:
            raise ValueError(f"Everything.count: must be <= 100, got {self.count!r}")


def problems_of(cls: type[object], data: object, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(cls, data, source="app.toml", **kwargs)  # type: ignore[arg-type]
    return [str(p) for p in info.value.problems]


# --- what a valid table becomes -------------------------------------------------------


def test_a_retry_policy_is_built_from_a_toml_like_table() -> None:
    policy = build(
        RetryPolicy,
        {
            "default": {"max_attempts": 5, "base_delay": "250ms", "max_delay": "1m"},
            "per_category": {"rate_limited": {"base_delay": "2s", "jitter": "decorrelated"}},
        },
        source="app.toml",
    )
    assert policy.default == RetryConfig(max_attempts=5, base_delay=0.25, max_delay=60.0)
    slow = policy.for_category(ErrorCategory.RATE_LIMITED)
    assert (slow.base_delay, slow.jitter) == (2.0, Jitter.DECORRELATED)


def test_every_supported_kind_of_field_is_converted() -> None:
    built = build(
        Everything,
        {
            "name": "svc",
            "enabled": False,
            "count": 7,
            "color": "blue",
            "limit": 3,
            "sizes": [10, 50],
            "inner": {"ratio": 0.25, "open_duration": "500ms", "window": "1m"},
            "by_name": {"a.b": {"ratio": 1}},
        },
        source="app.toml",
    )
    assert built == Everything(
        name="svc",
        enabled=False,
        count=7,
        color=Color.BLUE,
        limit=3,
        sizes=(10, 50),
        inner=Inner(ratio=0.25, open_duration=0.5, window=60.0),
        by_name={"a.b": Inner(ratio=1.0)},
    )


def test_an_optional_field_is_cleared_with_the_text_none() -> None:
    config = build(RetryConfig, {"max_attempts": "none", "deadline": "30s"}, source="app.toml")
    assert (config.max_attempts, config.deadline) == (None, 30.0)


def test_durations_are_recognised_by_field_name_or_unit_metadata() -> None:
    fields = {f.name: f for f in dataclasses.fields(Inner)}
    assert is_duration_field(fields["open_duration"])
    assert is_duration_field(fields["window"])  # metadata says seconds
    assert not is_duration_field(fields["ratio"])
    assert not is_duration_field(fields["count_period"])  # metadata overrides the name
    retry = {f.name: f for f in dataclasses.fields(RetryConfig)}
    durations = {name for name, f in retry.items() if is_duration_field(f)}
    assert durations == {"base_delay", "max_delay", "deadline", "max_server_delay"}


def test_a_ratio_field_does_not_take_a_duration_text() -> None:
    assert problems_of(Everything, {"name": "s", "inner": {"ratio": "250ms"}}) == [
        "app.toml: inner.ratio: expected a number (got '250ms')"
    ]


def test_missing_keys_take_the_base_instead_of_the_defaults() -> None:
    defaults = RetryConfig(max_attempts=5, base_delay=0.5, max_delay=30.0)
    service = build(RetryConfig, {"max_delay": "1m"}, source="app.toml", base=defaults)
    assert service == RetryConfig(max_attempts=5, base_delay=0.5, max_delay=60.0)


# --- problems: all of them, each with source, path and value ----------------------------


def test_every_problem_is_listed_with_source_path_and_value() -> None:
    found = problems_of(
        RetryPolicy,
        {
            "default": {
                "base_delay": "5 parsecs",
                "max_attempts": 0,
                "jitter": "sideways",
                "jitter_factor": 2,
                "retries": 3,
            },
            "per_category": {"nope": {}, "network": {"max_attempts": 1.5}},
            "extra": 1,
        },
    )
    assert found == [
        "app.toml: default.base_delay: expected a duration such as '250ms', '2s', '1m30s' "
        "or a number of seconds (got '5 parsecs')",
        "app.toml: default.jitter: expected one of none, full, equal, decorrelated, "
        "decorrelated_v2, proportional (got 'sideways')",
        "app.toml: default.retries: unknown key for RetryConfig (known: max_attempts, "
        "base_delay, max_delay, exponential_base, jitter, jitter_factor, deadline, "
        "max_server_delay) (got 3)",
        "app.toml: default.max_attempts: must be >= 1 (got 0)",
        "app.toml: default.jitter_factor: must be between 0 and 1 (got 2)",
        "app.toml: per_category.nope: expected one of network, cache, database, resource, "
        "timeout, rate_limited, overloaded, validation, auth, unknown (got 'nope')",
        "app.toml: per_category.network.max_attempts: expected a whole number (got 1.5)",
        "app.toml: extra: unknown key for RetryPolicy (known: default, per_category) (got 1)",
    ]


def test_an_unknown_key_suggests_the_closest_known_one() -> None:
    (problem,) = problems_of(RetryConfig, {"max_atempts": 3})
    assert "did you mean 'max_attempts'?" in problem


def test_a_rule_between_fields_is_reported_at_the_field_it_names() -> None:
    assert problems_of(RetryConfig, {"base_delay": "2s", "max_delay": "1s"}) == [
        "app.toml: max_delay: must be >= base_delay (2.0) (got '1s')"
    ]
    assert problems_of(RetryConfig, {"max_attempts": "none"}) == [
        "app.toml: deadline: required when max_attempts is None (unbounded)"
    ]


def test_wrong_shapes_and_missing_required_keys() -> None:
    assert problems_of(Everything, {"inner": 3, "sizes": 4, "by_name": []}) == [
        "app.toml: inner: expected a table of Inner settings (got 3)",
        "app.toml: sizes: expected a list (got 4)",
        "app.toml: by_name: expected a table (got [])",
        "app.toml: name: missing required key",
    ]
    assert problems_of(Everything, ["not", "a", "table"]) == [
        "app.toml: (top level): expected a table of Everything settings (got ['not', 'a', 'table'])"
    ]


def test_list_items_are_checked_one_by_one() -> None:
    assert problems_of(Everything, {"name": "s", "sizes": [1, "two", 3.5]}) == [
        "app.toml: sizes[1]: expected a whole number (got 'two')",
        "app.toml: sizes[2]: expected a whole number (got 3.5)",
    ]


def test_a_post_init_rule_of_any_dataclass_is_reported() -> None:
    assert problems_of(Everything, {"name": "s", "count": 500}) == [
        "app.toml: count: must be <= 100 (got 500)"
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class WithHooks:
    either: int | str = 1
    hook: typing.Callable[[], None] | None = None


def test_a_setting_that_takes_python_objects_cannot_come_from_a_file() -> None:
    found = problems_of(WithHooks, {"either": 1, "hook": "print"})
    assert [p.split(": ", 2)[1] for p in found] == ["either", "hook"]
    assert all("cannot be set from configuration" in p for p in found)
    assert build(WithHooks, {}, source="x") == WithHooks()  # unset, they keep their defaults


def test_only_dataclasses_are_built() -> None:
    with pytest.raises(TypeError, match="expected a dataclass type"):
        build(dict, {}, source="x")


def test_a_problem_reads_well_on_its_own() -> None:
    assert str(Problem("a.toml", "", "not valid TOML")) == "a.toml: (top level): not valid TOML"
    error = ConfigError([Problem("a.toml", "x", "bad", 1), Problem("b", "y", "worse")])
    assert str(error).splitlines() == [
        "invalid configuration, 2 problems:",
        "  a.toml: x: bad (got 1)",
        "  b: y: worse",
    ]


# --- files and environment variables ---------------------------------------------------


def test_read_toml_names_the_file_when_it_is_missing_or_malformed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        read_toml(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[retry\nmax_attempts = 3\n")
    with pytest.raises(ConfigError) as info:
        read_toml(bad)
    (problem,) = info.value.problems
    assert problem.source == str(bad)
    assert "not valid TOML" in problem.message
    good = tmp_path / "good.toml"
    good.write_text('[default]\nbase_delay = "250ms"\n')
    assert build(RetryPolicy, read_toml(good), source=str(good)).default.base_delay == 0.25


def test_environment_variables_override_the_file_key_by_key() -> None:
    environ = {
        "DATAPUNK_RECOVERY__DEFAULT__MAX_ATTEMPTS": "5",
        "DATAPUNK_RECOVERY__DEFAULT__BASE_DELAY": "250ms",
        "DATAPUNK_RECOVERY__DEFAULT__JITTER": "equal",
        "UNRELATED": "x",
    }
    overrides = env_overrides(environ)
    assert overrides["default"]["max_attempts"] == Text(
        "5", "env DATAPUNK_RECOVERY__DEFAULT__MAX_ATTEMPTS"
    )
    document = {"default": {"max_attempts": 2, "max_delay": "1m"}}
    policy = build(RetryPolicy, merge(document, overrides), source="app.toml")
    assert policy.default == RetryConfig(
        max_attempts=5, base_delay=0.25, max_delay=60.0, jitter=Jitter.EQUAL
    )
    assert document == {"default": {"max_attempts": 2, "max_delay": "1m"}}  # untouched


def test_text_values_are_read_as_numbers_booleans_and_lists() -> None:
    source = "env X"
    built = build(
        Everything,
        {
            "name": Text("svc", source),
            "enabled": Text("off", source),
            "count": Text("12", source),
            "sizes": Text("10, 50,100", source),
            "inner": {"ratio": Text("0.75", source)},
        },
        source="app.toml",
    )
    assert (built.enabled, built.count, built.sizes, built.inner.ratio) == (
        False,
        12,
        (10, 50, 100),
        0.75,
    )


def test_a_bad_environment_value_names_the_variable_not_the_file() -> None:
    overrides = env_overrides(
        {
            "DATAPUNK_RECOVERY__DEFAULT__MAX_ATTEMPTS": "many",
            "DATAPUNK_RECOVERY__DEFAULT__TYPO": "1",
            "DATAPUNK_RECOVERY__DEFAULT__EXPONENTIAL_BASE": "x2",
        }
    )
    assert problems_of(RetryPolicy, merge({"default": {"max_attempts": 3}}, overrides)) == [
        "env DATAPUNK_RECOVERY__DEFAULT__MAX_ATTEMPTS: default.max_attempts: "
        "expected a whole number (got 'many')",
        "env DATAPUNK_RECOVERY__DEFAULT__EXPONENTIAL_BASE: default.exponential_base: "
        "expected a number (got 'x2')",
        "env DATAPUNK_RECOVERY__DEFAULT__TYPO: default.typo: unknown key for RetryConfig "
        "(known: max_attempts, base_delay, max_delay, exponential_base, jitter, jitter_factor, "
        "deadline, max_server_delay) (got '1')",
    ]


def test_a_variable_setting_a_table_conflicts_with_one_setting_a_key_in_it() -> None:
    with pytest.raises(ConfigError, match="conflicts with DATAPUNK_RECOVERY__DEFAULT__JITTER"):
        env_overrides(
            {"DATAPUNK_RECOVERY__DEFAULT": "x", "DATAPUNK_RECOVERY__DEFAULT__JITTER": "full"}
        )


def test_a_custom_prefix_selects_the_variables() -> None:
    assert env_overrides({"APP__A": "1", "DATAPUNK_RECOVERY__B": "2"}, prefix="APP") == {
        "a": Text("1", "env APP__A")
    }


@dataclasses.dataclass(frozen=True, slots=True)
class Shapes:
    mode: typing.Literal["fast", "safe"] = "safe"
    pair: tuple[int, str] = (1, "a")
    backoffs: tuple[float, ...] = dataclasses.field(default=(), metadata={"unit": "seconds"})


def test_literals_fixed_tuples_and_lists_of_durations() -> None:
    built = build(
        Shapes,
        {"mode": "fast", "pair": [2, "b"], "backoffs": ["250ms", 1, "1m"]},
        source="app.toml",
    )
    assert built == Shapes(mode="fast", pair=(2, "b"), backoffs=(0.25, 1.0, 60.0))
    assert problems_of(Shapes, {"mode": "slow", "pair": [1, "a", 3]}) == [
        "app.toml: mode: expected one of 'fast', 'safe' (got 'slow')",
        "app.toml: pair: expected a list of 2 items (got [1, 'a', 3])",
    ]


# --- one duration rule for every duration field of the library ---------------------------


def _configuration_classes() -> list[type[Any]]:
    """Every configuration dataclass of the library (events and results left out)."""
    import importlib
    import pkgutil

    import datapunk_recovery
    from datapunk_recovery._core.events import Event

    found: dict[str, type[Any]] = {}
    for info in pkgutil.walk_packages(datapunk_recovery.__path__, "datapunk_recovery."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and dataclasses.is_dataclass(obj)
                and obj.__module__ == module.__name__
                and not issubclass(obj, Event)
                and "__post_init__" in vars(obj)  # validated: a configuration
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[name] for name in sorted(found)]


_REQUIRED: dict[str, dict[str, Any]] = {"PoolConfig": {"capacity": 2}}


def _float_fields(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    hints = typing.get_type_hints(cls)
    return [
        f
        for f in dataclasses.fields(cls)
        if f.init and float in (typing.get_args(hints[f.name]) or (hints[f.name],))
    ]


def _buildable(cls: type[Any]) -> dict[str, Any] | None:
    required = _REQUIRED.get(cls.__name__, {})
    try:
        cls(**required)
    except (TypeError, ValueError):
        return None
    return required


def test_every_duration_setting_is_bounded_by_one_day_and_reads_duration_texts() -> None:
    from datapunk_recovery._core.durations import format_duration
    from datapunk_recovery._core.validate import MAX_SECONDS

    checked = 0
    for cls in _configuration_classes():
        required = _buildable(cls)
        if required is None:
            continue
        for field in _float_fields(cls):
            try:
                cls(**{**required, field.name: 2 * MAX_SECONDS})
            except ValueError as exc:
                seconds = "one day" in str(exc)
            else:
                seconds = False
            where = f"{cls.__name__}.{field.name}"
            # A field validated as seconds reads duration texts, and only such a field.
            assert is_duration_field(field) == seconds, where
            if not seconds:
                continue
            checked += 1
            default = getattr(cls(**required), field.name)
            value = default if isinstance(default, float) and default > 0 else 1.0
            as_number = build(cls, {**required, field.name: value}, source="t")
            as_text = build(cls, {**required, field.name: format_duration(value)}, source="t")
            assert getattr(as_text, field.name) == pytest.approx(getattr(as_number, field.name))
            with pytest.raises(ConfigError, match="one day"):
                build(cls, {**required, field.name: "25h"}, source="t")
    assert checked >= 30  # the sweep found the library's durations


def test_a_factor_is_not_a_duration() -> None:
    from datapunk_recovery.breaker import BreakerConfig

    fields = {f.name: f for f in dataclasses.fields(BreakerConfig)}
    assert not is_duration_field(fields["open_backoff"])
    assert build(BreakerConfig, {"open_backoff": 2}, source="t").open_backoff == 2.0
    assert problems_of(BreakerConfig, {"open_backoff": "2s"}) == [
        "app.toml: open_backoff: expected a number (got '2s')"
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class Span:
    low: float = 1.0
    high: float = 2.0
    steps: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"Span.steps: must be >= 1, got {self.steps!r}")
        if self.high < self.low:
            raise ValueError(f"Span.high: must be >= low ({self.low!r}), got {self.high!r}")


def test_a_rule_between_fields_of_any_dataclass_judges_the_values_given() -> None:
    assert build(Span, {"low": 0.1, "high": 0.5}, source="app.toml") == Span(0.1, 0.5)
    assert build(Span, {"high": 0.5}, source="t", base=Span(0.1, 0.2)) == Span(0.1, 0.5)
    # Judged alone, a bad value is still reported with the others.
    assert problems_of(Span, {"low": 0.1, "high": 0.5, "steps": 0}) == [
        "app.toml: steps: must be >= 1 (got 0)"
    ]
    assert problems_of(Span, {"low": 3.0, "high": 0.5}) == [
        "app.toml: high: must be >= low (3.0) (got 0.5)"
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class TokenGateConfig:
    tokens: float = 10.0
    ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"TokenGateConfig.tokens: must be >= 1, got {self.tokens!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class WindowGateConfig:
    ratio: float = 0.2
    window: float = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Gated:
    gate: TokenGateConfig | WindowGateConfig | None = dataclasses.field(
        default_factory=TokenGateConfig
    )


def test_a_union_of_dataclasses_is_chosen_by_its_kind_key() -> None:
    assert union_kinds([TokenGateConfig, WindowGateConfig]) == {
        TokenGateConfig: "token",
        WindowGateConfig: "window",
    }
    built = build(Gated, {"gate": {"kind": "window", "window": "2s"}}, source="f")
    assert built.gate == WindowGateConfig(window=2.0)
    assert build(Gated, {"gate": {"kind": " Token "}}, source="f").gate == TokenGateConfig()
    assert build(Gated, {"gate": "none"}, source="f").gate is None


def test_without_a_kind_the_keys_choose_and_an_empty_table_is_the_first_kind() -> None:
    assert build(Gated, {"gate": {}}, source="f").gate == TokenGateConfig()
    assert build(Gated, {"gate": {"window": 5}}, source="f").gate == WindowGateConfig(window=5.0)
    # "ratio" fits both: the first kind of the union wins a tie ...
    assert build(Gated, {"gate": {"ratio": 0.3}}, source="f").gate == TokenGateConfig(ratio=0.3)
    # ... unless the table overrides a base of the other kind.
    base = Gated(gate=WindowGateConfig(window=4.0))
    rebuilt = build(Gated, {"gate": {"ratio": 0.3}}, source="f", base=base).gate
    assert rebuilt == WindowGateConfig(ratio=0.3, window=4.0)
    # A kind other than the base's starts from that kind's defaults.
    other = build(Gated, {"gate": {"kind": "token"}}, source="f", base=base).gate
    assert other == TokenGateConfig()


def test_a_bad_kind_or_value_in_a_union_names_the_key_path_and_value() -> None:
    with pytest.raises(ConfigError) as caught:
        build(Gated, {"gate": {"kind": "bucket"}}, source="f")
    assert [str(p) for p in caught.value.problems] == [
        "f: gate.kind: expected one of 'token', 'window' (got 'bucket')"
    ]
    with pytest.raises(ConfigError) as caught:
        build(Gated, {"gate": {"kind": "window", "tokens": 3}}, source="f")
    (problem,) = caught.value.problems
    assert problem.path == "gate.tokens" and problem.value == 3
    assert "unknown key for WindowGateConfig" in problem.message
    with pytest.raises(ConfigError) as caught:
        build(Gated, {"gate": {"tokens": 0}}, source="f")
    assert [str(p) for p in caught.value.problems] == ["f: gate.tokens: must be >= 1 (got 0)"]
    with pytest.raises(ConfigError) as caught:
        build(Gated, {"gate": 5}, source="f")
    assert [str(p) for p in caught.value.problems] == [
        "f: gate: expected a table of TokenGateConfig or WindowGateConfig settings (got 5)"
    ]


def test_a_union_kind_comes_from_an_environment_variable() -> None:
    env = env_overrides({"APP__GATE__KIND": "window", "APP__GATE__WINDOW": "250ms"}, "APP")
    assert build(Gated, env, source="f").gate == WindowGateConfig(window=0.25)
    with pytest.raises(ConfigError) as caught:
        build(Gated, env_overrides({"APP__GATE__KIND": "nope"}, "APP"), source="f")
    assert [str(p) for p in caught.value.problems] == [
        "env APP__GATE__KIND: gate.kind: expected one of 'token', 'window' (got 'nope')"
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class KindedConfig:
    kind: str = "mine"


@dataclasses.dataclass(frozen=True, slots=True)
class Ambiguous:
    gate: KindedConfig | WindowGateConfig = dataclasses.field(default_factory=WindowGateConfig)
    mixed: int | str = 0


def test_a_union_that_cannot_be_told_apart_cannot_come_from_a_file() -> None:
    # A dataclass with a field named kind, or a union of plain types: no key tells the arm.
    with pytest.raises(ConfigError) as caught:
        build(Ambiguous, {"gate": {"kind": "mine"}, "mixed": 1}, source="f")
    assert [p.path for p in caught.value.problems] == ["gate", "mixed"]
    assert all("cannot be set from configuration" in p.message for p in caught.value.problems)
