"""The configuration's model: frozen dataclasses for a service's policy and the whole document.

What [`RecoveryStrategies`][datapunk_recovery.strategies.RecoveryStrategies] is built
from, however it was read (a TOML file, the environment, code): each class
checks its own fields when built, so a configuration made in code is checked
like one read from a file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from .._core.backoff import RetryConfig
from .._core.errors import ErrorCategory
from .._core.redact import redact_text, redact_url
from .._core.validate import check_count, check_mapping, check_seconds, shown
from ..breaker import BreakerConfig
from ..budget import RatioBudgetConfig, TokenBudgetConfig
from ..flow.bulkhead import BulkheadConfig
from ..flow.hedging import HedgeConfig
from ..resource.pool import PoolConfig


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """How calls to one service recover (or, as ``defaults``, every service).

    - ``retry``: the retry configuration of every error, and ``categories``
      one per error category that deserves another (slower backoff for
      ``rate_limited``, say); each counts attempts over the whole call.
    - ``breaker``: the circuit breaker of the service (one per endpoint when
      ``endpoints`` are given); ``None`` for none.
    - ``budget``: the retry budget shared by every retry of the service: a
      gRPC-style token budget (`TokenBudgetConfig`, the default) or a
      Finagle/SRE ratio budget (`RatioBudgetConfig`; ``kind = "ratio"`` in
      a configuration table); ``None`` for none.
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
    budget: TokenBudgetConfig | RatioBudgetConfig | None = field(default_factory=TokenBudgetConfig)
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
        for name, kinds in (
            ("retry", (RetryConfig,)),
            ("breaker", (BreakerConfig,)),
            ("budget", (TokenBudgetConfig, RatioBudgetConfig)),
            ("bulkhead", (BulkheadConfig,)),
            ("hedge", (HedgeConfig,)),
        ):
            value = getattr(self, name)
            if not isinstance(value, kinds) and not (value is None and name != "retry"):
                expected = " or ".join(kind.__name__ for kind in kinds)
                raise TypeError(f"{owner}.{name}: expected a {expected}, got {shown(value)}")
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
            f"sqlite={redact_url(self.sqlite)!r}"
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
