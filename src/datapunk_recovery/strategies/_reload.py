"""Where a configuration comes from, and what a reload may not change.

[`RecoveryStrategies`][datapunk_recovery.strategies.RecoveryStrategies] is built and
reloaded from the same kinds of sources (a TOML path, a parsed table, a ready
`RecoveryConfig`, a bare retry policy, nothing); this module turns any of them
into a `RecoveryConfig`, lists the changes a running process refuses (open
connections), and carries the pools over to the new configuration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._core.backoff import RetryConfig
from .._core.policy import RetryPolicy
from .._core.validate import shown
from ..config import RecoveryConfig, ServicePolicy, build_config, load_config
from ..config.schema import Problem, env_overrides, merge
from ..resource.pool import ResourcePool

#: What a configuration can be given as (see :meth:`RecoveryStrategies.from_config`).
_Source = RecoveryConfig | RetryConfig | RetryPolicy | Mapping[str, Any] | str | Path | None


def _retry_only(retry: RetryConfig | RetryPolicy) -> RecoveryConfig:
    """The default configuration with ``retry`` as the retry policy of every service."""
    policy = RetryPolicy.of(retry)
    return RecoveryConfig(
        defaults=ServicePolicy(retry=policy.default, categories=policy.per_category)
    )


def _resolve(
    source: _Source,
    environ: Mapping[str, str] | None,
) -> RecoveryConfig:
    """``source`` as a `RecoveryConfig`: a ready one as it is, a retry policy as every
    service's, a path (or nothing) read with the environment's overrides, a table merged
    with them.  Raises `ConfigError` listing every problem."""
    if isinstance(source, RecoveryConfig):
        return source
    if isinstance(source, RetryConfig | RetryPolicy):
        return _retry_only(source)
    if source is None or isinstance(source, str | Path):
        return load_config(source, environ=environ)
    if isinstance(source, Mapping):
        overrides = env_overrides(os.environ if environ is None else environ)
        return build_config(merge(source, overrides), source="configuration")
    raise TypeError(
        f"RecoveryStrategies.from_config: expected a path, a table or a RecoveryConfig, "
        f"got {shown(source)}"
    )


def refused_changes(config: RecoveryConfig, running: RecoveryConfig) -> list[Problem]:
    """What ``config`` changes that ``running`` cannot change without a restart.

    Databases and the Redis cache are open connections: a reload changing them
    is refused, with one problem each.
    """
    return [
        Problem("reload", path, f"{what} cannot change while running; restart to change it")
        for path, what, changed in (
            ("databases", "databases", dict(config.databases) != dict(running.databases)),
            ("cache.redis", "the Redis cache", config.cache.redis != running.cache.redis),
        )
        if changed
    ]


def carry_pools(
    config: RecoveryConfig,
    pools: Mapping[str, ResourcePool[Any]],
    retired: dict[str, ResourcePool[Any]],
) -> dict[str, ResourcePool[Any]]:
    """The pools of ``config``: those of ``pools`` (or ``retired``) re-configured, or new.

    A pool that stays (or comes back) is re-configured in place, so the units
    its leases hold go on counting against the new capacity; one that
    ``config`` drops moves to ``retired`` (its leases may still be held) for a
    later configuration that brings it back.
    """
    carried: dict[str, ResourcePool[Any]] = {}
    for name, pool_config in config.pools.items():
        current = pools.get(name)
        if current is None:
            current = retired.pop(name, None)
        if current is None:
            current = ResourcePool(name, pool_config)
        elif current.config != pool_config:
            current.reconfigure(pool_config)
        carried[name] = current
    for name, pool in pools.items():
        if name not in carried:
            retired[name] = pool
    return carried
