"""The lab's named policies (ours, the jitter family, the peers' defaults) and name lookup.

Kept apart from `policies` (what a policy is) and `peers` (the peers'
policies, built on it), so that neither module needs the other's names to
list them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

from .._core.backoff import Jitter, RetryConfig
from ..config.schema import ConfigError, Problem
from .peers import peer_policies
from .policies import DEFAULT_POLICY, SawtoothBackoff, SimPolicy, load_policies

__all__ = ["builtin_policies", "resolve_policies"]

_JITTER_TEXT: Final = {
    Jitter.NONE: "exponential, no jitter",
    Jitter.FULL: "full jitter: uniform(0, exponential)",
    Jitter.EQUAL: "equal jitter: half fixed, half uniform",
    Jitter.DECORRELATED: "decorrelated: uniform(base, 3 x previous)",
    Jitter.DECORRELATED_V2: "Polly's decorrelated V2",
    Jitter.PROPORTIONAL: "exponential x uniform(0.8, 1.2)",
}


def builtin_policies(
    base_delay: float | None = None,
    max_delay: float | None = None,
    indexing: Literal["library", "published"] = "library",
) -> dict[str, SimPolicy]:
    """The named built-ins; ``base_delay`` / ``max_delay`` (seconds) replace the defaults.

    - one per jitter kind (``none``, ``full``, ``equal``, ``decorrelated``,
      ``decorrelated_v2``, ``proportional``): plain retries, 3 attempts,
      numbered by ``indexing`` (see [`SimPolicy`][datapunk_recovery.simulate.policies.SimPolicy]);
    - ``ours``: the library's default jitter as a user gets it, through
      ``RetryConfig(base_delay=2 * base, max_delay=cap)`` (library numbering),
      so its first window is the published one;
    - ``plain``: the default [`RetryConfig`][datapunk_recovery._core.backoff.RetryConfig] alone, no
      budget, no breaker;
    - ``default``: `DEFAULT_POLICY`, the library's defaults;
    - ``sawtooth``: plain retries with the experimental
      [`SawtoothBackoff`][datapunk_recovery.simulate.policies.SawtoothBackoff].
    """
    defaults = RetryConfig()
    retry = RetryConfig(
        base_delay=defaults.base_delay if base_delay is None else base_delay,
        max_delay=defaults.max_delay if max_delay is None else max_delay,
    )
    policies = {
        kind.value: SimPolicy(
            retry=dataclasses.replace(retry, jitter=kind),
            description=_JITTER_TEXT[kind],
            indexing=indexing,
        )
        for kind in Jitter
    }
    policies["ours"] = SimPolicy(
        retry=RetryConfig(
            base_delay=min(2 * retry.base_delay, retry.max_delay), max_delay=retry.max_delay
        ),
        description="the library's default jitter, base 2 x base (first window = the post's)",
    )
    policies["plain"] = SimPolicy(
        retry=retry, description="3 attempts, full jitter, no budget, no breaker"
    )
    policies["default"] = dataclasses.replace(DEFAULT_POLICY, retry=retry)
    policies["sawtooth"] = SimPolicy(
        retry=retry,
        sawtooth=SawtoothBackoff(),
        description="EXPERIMENTAL sawtooth full jitter, factor 4",
    )
    policies.update(peer_policies())
    return policies


def resolve_policies(
    names: Sequence[str],
    path: str | Path | None = None,
    *,
    base_delay: float | None = None,
    max_delay: float | None = None,
    indexing: Literal["library", "published"] = "library",
) -> dict[str, SimPolicy]:
    """The policies named, in order, from the file at ``path`` first, then the built-ins.

    With no names, every policy of the file; an unknown name is a
    [`ConfigError`][datapunk_recovery.config.schema.ConfigError] listing what exists.
    """
    from_file = load_policies(path) if path is not None else {}
    if not names:
        if not from_file:
            raise ConfigError([Problem("command line", "policies", "no policy named")])
        return from_file
    builtins = builtin_policies(base_delay, max_delay, indexing)
    chosen: dict[str, SimPolicy] = {}
    problems = []
    for name in names:
        policy = from_file.get(name) or builtins.get(name)
        if policy is None:
            known = ", ".join([*from_file, *builtins])
            problems.append(
                Problem(
                    "command line", "policies", f"no policy of that name (known: {known})", name
                )
            )
        else:
            chosen[name] = policy
    if problems:
        raise ConfigError(problems)
    return chosen
