"""The configuration of [`RecoveryStrategies`][datapunk_recovery.strategies.RecoveryStrategies].

One document describes how every service of a process recovers.  It comes
from a TOML file, from environment variables, or both (variables win, key by
key), and is validated into frozen dataclasses with the library's own
configuration schema ([`datapunk_recovery.schema`][datapunk_recovery.schema]): durations read
``"250ms"`` or ``"2s"`` ([`datapunk_recovery.durations`][datapunk_recovery.durations]), and every
problem is reported at once, naming the file or the variable, the key path
and the value.

The layout::

    [defaults]                         # what every service inherits
    retry = { max_attempts = 3, base_delay = "100ms", max_delay = "10s" }
    breaker = { consecutive_failures = 5, open_duration = "30s" }
    budget = {}                        # gRPC-style token budget, its defaults
    attempt_timeout = "2s"

    [defaults.categories.rate_limited] # per error category, inherits [defaults.retry]
    base_delay = "1s"
    max_attempts = 5

    [services.payments]                # overrides only what differs
    retry = { max_attempts = 5 }
    endpoints = ["primary", "secondary"]   # priority levels 0 and 1
    addresses = { primary = "https://pay-1.internal", secondary = "https://pay-2.internal" }
    hedge = { delay = "50ms" }         # only for calls that are safe to run twice

    [pools.gpu]                        # resource pools the facade creates
    capacity = 4
    max_wait = "2s"

    [databases.orders]                 # databases the facade opens and closes
    sqlite = "orders.db"

Inheritance is by key: a service's ``retry`` table starts from the defaults'
``retry`` and changes only the keys it writes; so do ``breaker``, ``budget``
and ``bulkhead``.  A category table starts from the ``retry`` table of its
own service, and a service inherits every category table of the defaults
(re-read against its own ``retry``).  ``"none"`` switches an optional part
off (``breaker = "none"``).

Environment variables use the key path with double underscores:
``DATAPUNK_RECOVERY__SERVICES__PAYMENTS__RETRY__MAX_ATTEMPTS=5``.  Names are
lower-cased, so services set from the environment have lower-case names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from ._validate import check_count, check_mapping, check_seconds, shown
from .backoff import RetryConfig
from .breaker import BreakerConfig
from .budget import TokenBudgetConfig
from .bulkhead import BulkheadConfig
from .errors import ErrorCategory
from .hedging import HedgeConfig
from .redact import redact_text, redact_url
from .resource.pool import PoolConfig
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

__all__ = [
    "ENV_PREFIX",
    "CacheSettings",
    "ConfigError",
    "DatabaseSettings",
    "RecoveryConfig",
    "ServicePolicy",
    "build_config",
    "load_config",
]

#: The prefix of environment overrides: ``DATAPUNK_RECOVERY__KEY__PATH=value``.
ENV_PREFIX: Final = "DATAPUNK_RECOVERY"


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """How calls to one service recover (or, as ``defaults``, every service).

    - ``retry``: the retry configuration of every error, and ``categories``
      one per error category that deserves another (slower backoff for
      ``rate_limited``, say); each counts attempts over the whole call.
    - ``breaker``: the circuit breaker of the service (one per endpoint when
      ``endpoints`` are given); ``None`` for none.
    - ``budget``: the gRPC-style retry budget shared by every retry of the
      service; ``None`` for none.
    - ``bulkhead``: at most so many concurrent calls; ``None`` for no limit.
    - ``attempt_timeout``: seconds one attempt may take (async attempts are
      cancelled); ``None`` for no limit.
    - ``endpoints``: names of the service's endpoints, best priority first;
      calls are routed over them by a [`Router`][datapunk_recovery.network.router.Router]
      (one breaker per endpoint, failover, priority fallthrough).  Endpoint
      ``i`` of the list has priority ``i`` unless ``priorities`` says
      otherwise (endpoints of equal priority share the load);
      ``addresses`` gives each endpoint's address (a base URL, ``host:port``).
    - ``hedge``: hedge calls across endpoints (only for services whose calls
      are safe to run twice); ``None`` for no hedging.
    - ``fallthrough``: when a call may use a lower priority level (see
      [`RouterConfig`][datapunk_recovery.network.router.RouterConfig]): ``"call"`` once every
      endpoint above has failed in the call or refuses calls, ``"breaker"``
      only once every endpoint above refuses calls.
    """

    retry: RetryConfig = field(default_factory=RetryConfig)
    categories: Mapping[ErrorCategory, RetryConfig] = field(default_factory=dict)
    breaker: BreakerConfig | None = field(default_factory=BreakerConfig)
    budget: TokenBudgetConfig | None = field(default_factory=TokenBudgetConfig)
    bulkhead: BulkheadConfig | None = None
    attempt_timeout: float | None = None
    endpoints: tuple[str, ...] = ()
    priorities: Mapping[str, int] = field(default_factory=dict)
    addresses: Mapping[str, str] = field(default_factory=dict)
    hedge: HedgeConfig | None = None
    fallthrough: Literal["call", "breaker"] = "call"

    def __post_init__(self) -> None:
        owner = "ServicePolicy"
        if self.fallthrough not in ("call", "breaker"):
            raise ValueError(
                f"{owner}.fallthrough: expected 'call' or 'breaker', got {shown(self.fallthrough)}"
            )
        for name, kind in (
            ("retry", RetryConfig),
            ("breaker", BreakerConfig),
            ("budget", TokenBudgetConfig),
            ("bulkhead", BulkheadConfig),
            ("hedge", HedgeConfig),
        ):
            value = getattr(self, name)
            if not isinstance(value, kind) and not (value is None and name != "retry"):
                raise TypeError(f"{owner}.{name}: expected a {kind.__name__}, got {shown(value)}")
        categories: dict[ErrorCategory, RetryConfig] = {}
        for key, config in check_mapping(owner, "categories", self.categories).items():
            try:
                category = ErrorCategory(key)
            except ValueError:
                raise ValueError(
                    f"{owner}.categories: unknown error category {shown(key)}"
                ) from None
            if not isinstance(config, RetryConfig):
                raise TypeError(
                    f"{owner}.categories: expected a RetryConfig for {category.value}, "
                    f"got {shown(config)}"
                )
            categories[category] = config
        object.__setattr__(self, "categories", MappingProxyType(categories))
        if self.attempt_timeout is not None:
            object.__setattr__(
                self,
                "attempt_timeout",
                check_seconds(owner, "attempt_timeout", self.attempt_timeout, positive=True),
            )
        endpoints = tuple(self.endpoints)
        if not all(isinstance(e, str) and e for e in endpoints):
            raise TypeError(f"{owner}.endpoints: expected non-empty names, got {shown(endpoints)}")
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"{owner}.endpoints: names must be unique, got {shown(endpoints)}")
        object.__setattr__(self, "endpoints", endpoints)
        # Every table naming unknown endpoints in one complaint, named after
        # `endpoints`: the rule ties the fields together.
        strays = [
            f"{name} names endpoints that are not listed: {shown(unknown)}"
            for name in ("addresses", "priorities")
            if (
                unknown := [
                    k for k in check_mapping(owner, name, getattr(self, name)) if k not in endpoints
                ]
            )
        ]
        if strays:
            raise ValueError(f"{owner}.endpoints: {'; '.join(strays)}")
        for name in ("priorities", "addresses"):
            table = check_mapping(owner, name, getattr(self, name))
            for key, value in table.items():
                if name == "priorities":
                    check_count(owner, name, value, minimum=0)
                elif not isinstance(value, str):
                    raise TypeError(f"{owner}.{name}: expected a text for {shown(key)}")
            object.__setattr__(self, name, MappingProxyType(table))

    def __repr__(self) -> str:
        # An address may carry credentials (https://user:token@host): never shown.
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return redact_text(f"ServicePolicy({fields})")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """How `with_cache_recovery()` reads.

    ``ttl``: seconds a value read from the source stays fresh in the cache.
    ``stale_ttl``: seconds past that during which it is kept, to be served
    (marked stale) when the source fails.  ``redis``: the URL of a Redis the
    facade opens as the cache of reads that name none (``None``: an embedded
    in-memory cache per service, holding at most ``max_stale_entries``
    values).  ``namespace``: the prefix of the facade's keys in a cache
    (``namespace.service:generation:key``).  The URL is never shown in
    messages or events.
    """

    ttl: float = 60.0
    stale_ttl: float = 300.0
    max_stale_entries: int = 10_000
    redis: str | None = None
    namespace: str = "dp"

    def __post_init__(self) -> None:
        owner = "CacheSettings"
        object.__setattr__(self, "ttl", check_seconds(owner, "ttl", self.ttl, positive=True))
        object.__setattr__(self, "stale_ttl", check_seconds(owner, "stale_ttl", self.stale_ttl))
        check_count(owner, "max_stale_entries", self.max_stale_entries)
        if self.redis is not None and (not isinstance(self.redis, str) or not self.redis):
            raise TypeError(f"{owner}.redis: expected a non-empty text or None")
        if not isinstance(self.namespace, str) or not self.namespace or ":" in self.namespace:
            raise ValueError(
                f"{owner}.namespace: expected a non-empty text without ':',"
                f" got {shown(self.namespace)}"
            )

    def __repr__(self) -> str:
        redis = None if self.redis is None else redact_url(self.redis)
        return (
            f"CacheSettings(ttl={self.ttl!r}, stale_ttl={self.stale_ttl!r}, "
            f"max_stale_entries={self.max_stale_entries!r}, redis={redis!r}, "
            f"namespace={self.namespace!r})"
        )


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    """A database the facade opens on entry and closes on exit: one of ``sqlite`` (a
    file path) or ``postgres`` (a DSN, opened as an asyncpg pool of ``max_size``
    connections).  The DSN is never shown in messages or events.
    """

    sqlite: str | None = None
    postgres: str | None = None
    max_size: int = 10

    def __post_init__(self) -> None:
        owner = "DatabaseSettings"
        given = [name for name in ("sqlite", "postgres") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"{owner}.sqlite: give exactly one of sqlite or postgres, got {given}")
        for name in given:
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"{owner}.{name}: expected a non-empty text")
        check_count(owner, "max_size", self.max_size)

    def __repr__(self) -> str:
        target = (
            f"sqlite={self.sqlite!r}"
            if self.sqlite is not None
            else (f"postgres={redact_url(self.postgres or '')!r}")
        )
        return f"DatabaseSettings({target}, max_size={self.max_size})"


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    """The whole configuration: ``defaults``, ``services`` by name, and what to create.

    ``policy(name)`` is the effective policy of a service: its own when
    configured, else the defaults.
    """

    defaults: ServicePolicy = field(default_factory=ServicePolicy)
    services: Mapping[str, ServicePolicy] = field(default_factory=dict)
    cache: CacheSettings = field(default_factory=CacheSettings)
    pools: Mapping[str, PoolConfig] = field(default_factory=dict)
    databases: Mapping[str, DatabaseSettings] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = "RecoveryConfig"
        if not isinstance(self.defaults, ServicePolicy):
            raise TypeError(
                f"{owner}.defaults: expected a ServicePolicy, got {shown(self.defaults)}"
            )
        for name, kind in (
            ("services", ServicePolicy),
            ("pools", PoolConfig),
            ("databases", DatabaseSettings),
        ):
            table = check_mapping(owner, name, getattr(self, name))
            for key, value in table.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(
                        f"{owner}.{name}: names must be non-empty str, got {shown(key)}"
                    )
                if not isinstance(value, kind):
                    raise TypeError(
                        f"{owner}.{name}[{shown(key)}]: expected a {kind.__name__}, "
                        f"got {shown(value)}"
                    )
            object.__setattr__(self, name, MappingProxyType(table))
        if not isinstance(self.cache, CacheSettings):
            raise TypeError(f"{owner}.cache: expected a CacheSettings, got {shown(self.cache)}")

    def policy(self, service: str) -> ServicePolicy:
        """The effective policy of ``service`` (the defaults when it is not configured)."""
        return self.services.get(service, self.defaults)


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
    [`ConfigError`][datapunk_recovery.schema.ConfigError] listing every problem.
    """
    document: dict[str, Any] = {} if path is None else read_toml(path)
    overrides = env_overrides(os.environ if environ is None else environ, prefix)
    source = str(path) if path is not None else "environment"
    return build_config(merge(document, overrides), source=source)


def build_config(document: Mapping[str, Any], *, source: str = "configuration") -> RecoveryConfig:
    """A `RecoveryConfig` from a parsed document (a TOML table, maybe with env overrides).

    ``source`` names the document in problems (values that came from the
    environment name their variable instead).  Raises
    [`ConfigError`][datapunk_recovery.schema.ConfigError] listing every problem.
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
