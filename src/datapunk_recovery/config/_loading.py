"""Reading a configuration: a TOML file and environment overrides into a `RecoveryConfig`.

Every problem of a document is collected in one pass and raised together
(a `ConfigError`), naming the file or the variable, the key path and the
value, with passwords and tokens removed; the fields themselves are read by
the configuration schema (``config.schema``), and inheritance (a service
from the defaults, a category from its service's retry) is applied here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .._core.backoff import RetryConfig
from .._core.errors import ErrorCategory
from .._core.redact import redact_text
from .._core.validate import shown
from ..resource.pool import PoolConfig
from ._model import CacheSettings, DatabaseSettings, RecoveryConfig, ServicePolicy
from .schema import (
    NO_VALUE,
    ConfigError,
    Problem,
    Text,
    build,
    env_overrides,
    merge,
    read_toml,
)

#: The prefix of environment overrides: ``DATAPUNK_RECOVERY__KEY__PATH=value``.
ENV_PREFIX: Final = "DATAPUNK_RECOVERY"


_TOP_KEYS: Final = ("defaults", "services", "cache", "pools", "databases")


@dataclass(frozen=True, slots=True)
class _Rest:
    # The part of the document the schema reads in one go (no inheritance).
    cache: CacheSettings = field(default_factory=CacheSettings)
    pools: Mapping[str, PoolConfig] = field(default_factory=dict)
    databases: Mapping[str, DatabaseSettings] = field(default_factory=dict)


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    prefix: str = ENV_PREFIX,
) -> RecoveryConfig:
    """Read a TOML file (optional) and the environment overrides into a `RecoveryConfig`.

    ``environ`` defaults to ``os.environ``; pass ``{}`` to ignore it.  Raises
    [`ConfigError`][datapunk_recovery.config.schema.ConfigError] listing every problem.
    """
    document: dict[str, Any] = {} if path is None else read_toml(path)
    overrides = env_overrides(os.environ if environ is None else environ, prefix)
    source = str(path) if path is not None else "environment"
    return build_config(merge(document, overrides), source=source)


def build_config(document: Mapping[str, Any], *, source: str = "configuration") -> RecoveryConfig:
    """A `RecoveryConfig` from a parsed document (a TOML table, maybe with env overrides).

    ``source`` names the document in problems (values that came from the
    environment name their variable instead).  Raises
    [`ConfigError`][datapunk_recovery.config.schema.ConfigError] listing every problem.
    """
    problems: list[Problem] = []
    if not isinstance(document, Mapping):
        raise ConfigError([_problem(source, "", "expected a table of settings", document)])
    for key in document:
        if key not in _TOP_KEYS:
            problems.append(
                _problem(
                    source,
                    str(key),
                    f"unknown key (known: {', '.join(_TOP_KEYS)})",
                    document[key],
                )
            )
    reader = _Reader(source, problems)
    defaults_raw = reader.table(document.get("defaults", {}), "defaults")
    defaults = reader.service(defaults_raw, "defaults", ServicePolicy(), {}) or ServicePolicy()
    inherited = reader.table(defaults_raw.get("categories", {}), "defaults.categories")
    services: dict[str, ServicePolicy] = {}
    services_raw = reader.table(document.get("services", {}), "services")
    for name, raw in services_raw.items():
        path = f"services.{name}"
        if not isinstance(name, str) or not name:
            problems.append(
                _problem(source, f"services.{name!r}", "a service needs a non-empty name", raw)
            )
            continue
        policy = reader.service(reader.table(raw, path), path, defaults, inherited)
        if policy is not None:
            services[str(name)] = policy
    rest_raw = {k: document[k] for k in ("cache", "pools", "databases") if k in document}
    for key in ("pools", "databases"):
        table = rest_raw.get(key)
        if isinstance(table, Mapping):
            for name in [n for n in table if not isinstance(n, str) or not n]:
                problems.append(
                    _problem(source, f"{key}.{name!r}", "a name must not be empty", table[name])
                )
            rest_raw[key] = {n: v for n, v in table.items() if isinstance(n, str) and n}
    rest = reader.build(_Rest, rest_raw, "", None)
    if problems:
        raise ConfigError([_redacted(p) for p in problems])
    assert rest is not None
    return RecoveryConfig(
        defaults=defaults,
        services=services,
        cache=rest.cache,
        pools=rest.pools,
        databases=rest.databases,
    )


class _Shown:
    """A value as a problem shows it: its text with passwords and tokens removed."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _redacted(problem: Problem) -> Problem:
    """``problem`` without secrets: a DSN or URL under a misspelt key is shown redacted.

    The value is replaced only when it holds something to hide, so that a
    problem's ``value`` stays the value itself in every other case.
    """
    message = redact_text(problem.message)
    value = problem.value
    if value is not NO_VALUE:
        quoted = repr(value)
        hidden = shown(value)
        if hidden != quoted:
            value = _Shown(hidden)
    if message == problem.message and value is problem.value:
        return problem
    return Problem(problem.source, problem.path, message, value)


def _problem(source: str, path: str, message: str, value: object) -> Problem:
    if isinstance(value, Text):
        return Problem(value.source, path, message, value.value)
    if isinstance(value, Mapping):
        return Problem(source, path, message)
    return Problem(source, path, message, value)


class _Reader:
    """One pass over a document, collecting every problem (the schema does the fields)."""

    __slots__ = ("failed_categories", "problems", "source")

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        #: Default category tables that were already reported as bad.
        self.failed_categories: set[str] = set()

    def table(self, raw: object, path: str) -> Mapping[str, Any]:
        if isinstance(raw, Mapping):
            return raw
        self.problems.append(_problem(self.source, path, "expected a table", raw))
        return {}

    def build(self, cls: type[Any], raw: Mapping[str, Any], path: str, base: Any) -> Any:
        try:
            return build(cls, raw, source=self.source, path=path, base=base)
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            return None

    def service(
        self,
        raw: Mapping[str, Any],
        path: str,
        base: ServicePolicy,
        inherited: Mapping[str, Any],
    ) -> ServicePolicy | None:
        own = self.table(raw.get("categories", {}), f"{path}.categories")
        fields = {k: v for k, v in raw.items() if k != "categories"}
        policy: ServicePolicy | None = self.build(ServicePolicy, fields, path, base)
        # Categories are read even when the rest failed, so that every problem is listed.
        retry_base = base.retry if policy is None else policy.retry
        categories: dict[ErrorCategory, RetryConfig] = {}
        ok = True
        for name in [*inherited, *(n for n in own if n not in inherited)]:
            where = f"{path}.categories.{name}"
            try:
                category = ErrorCategory(str(name))
            except ValueError:
                if name in own or path == "defaults":
                    known = ", ".join(c.value for c in ErrorCategory)
                    self.problems.append(
                        _problem(
                            self.source, where, f"unknown error category (known: {known})", name
                        )
                    )
                ok = False
                continue
            if name in own:
                table = merge(
                    self.table(inherited.get(name, {}), where), self.table(own[name], where)
                )
            elif name in self.failed_categories:
                ok = False  # reported once, at the defaults
                continue
            else:
                table = dict(self.table(inherited[name], where))
            config = self.build(RetryConfig, table, where, retry_base)
            if config is None:
                ok = False
                if path == "defaults":
                    self.failed_categories.add(name)
            else:
                categories[category] = config
        if not ok or policy is None:
            return None
        return dataclasses.replace(policy, categories=categories)
