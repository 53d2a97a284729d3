"""The configuration of [`RecoveryStrategies`][datapunk_recovery.strategies.RecoveryStrategies].

One document describes how every service of a process recovers.  It comes
from a TOML file, from environment variables, or both (variables win, key by
key), and is validated into frozen dataclasses with the library's own
configuration schema ([`datapunk_recovery.config.schema`][datapunk_recovery.config.schema]):
durations read
``"250ms"`` or ``"2s"`` ([`datapunk_recovery._core.durations`][datapunk_recovery._core.durations]),
and every
problem is reported at once, naming the file or the variable, the key path
and the value.

The layout::

    [defaults]                         # what every service inherits
    retry = { max_attempts = 3, base_delay = "100ms", max_delay = "10s" }
    breaker = { consecutive_failures = 5, open_duration = "30s" }
    budget = {}                        # gRPC-style token budget, its defaults
                                       # (kind = "ratio": Finagle's ratio budget)
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
and ``bulkhead`` (a ``budget`` table whose ``kind`` differs from the
defaults' starts from that kind's defaults instead).  A category table
starts from the ``retry`` table of its own service, and a service inherits
every category table of the defaults (re-read against its own ``retry``).
``"none"`` switches an optional part off (``breaker = "none"``).

Environment variables use the key path with double underscores:
``DATAPUNK_RECOVERY__SERVICES__PAYMENTS__RETRY__MAX_ATTEMPTS=5``.  Names are
lower-cased, so services set from the environment have lower-case names.

The package holds one concept per module: ``_model`` (the frozen
dataclasses), ``_loading`` (reading a file and the environment into them)
and the public ``schema`` (how any dataclass is read from a table); the
names of the first two are re-exported here, the one path to import them
from.
"""

from __future__ import annotations

from ._loading import ENV_PREFIX, build_config, load_config
from ._model import CacheSettings, DatabaseSettings, RecoveryConfig, ServicePolicy
from .schema import ConfigError

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
