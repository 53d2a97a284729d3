"""The policies a simulation compares: named built-ins, or tables of a TOML file.

A :class:`SimPolicy` is what one client does on failure, made of the
library's own configurations: a :class:`~datapunk_recovery.RetryConfig`, and
optionally a retry budget (:class:`~datapunk_recovery.budget.TokenBudgetConfig`
or :class:`~datapunk_recovery.budget.RatioBudgetConfig`) and a circuit breaker
(:class:`~datapunk_recovery.breaker.BreakerConfig`).

A policy file holds one table per policy, read with the library's
configuration schema (so durations read ``"250ms"`` and every mistake is
reported with the file, key path and value)::

    [policies.careful]
    description = "3 attempts, gRPC budget, breaker open 5 s"
    retry = { max_attempts = 3, base_delay = "50ms", max_delay = "2s" }
    token_budget = {}                      # an empty table: on, with its defaults
    breaker = { open_duration = "5s" }

Keys left out take the library's defaults.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from .._validate import check_number
from ..backoff import Jitter, RetryConfig
from ..breaker import BreakerConfig
from ..budget import RatioBudgetConfig, TokenBudgetConfig
from ..schema import ConfigError, Problem, build, read_toml

__all__ = [
    "DEFAULT_POLICY",
    "PolicyFile",
    "SawtoothBackoff",
    "SimPolicy",
    "builtin_policies",
    "load_policies",
    "resolve_policies",
]


@dataclass(frozen=True, slots=True)
class SawtoothBackoff:
    """EXPERIMENTAL: sawtooth full jitter, the simulation's candidate for a better default.

    Not (yet) a jitter kind of :mod:`datapunk_recovery.backoff`; it lives here
    so that it can be compared.  Retries go in phases ``k = 1, 2, 3, ...`` of
    ``k`` retries each; within phase ``k`` the windows shrink back down:
    ``base * factor**k, base * factor**(k - 1), ..., base * factor``, each capped
    at ``max_delay``, and each delay is ``uniform(0, window)``.  With
    ``factor = 4`` the windows are, in units of ``base_delay``:
    4 | 16, 4 | 64, 16, 4 | 256, 64, 16, 4 | ...  A client that keeps losing
    tries ever wider spreads (fewer collisions: less work) but keeps coming
    back to short waits (no long idle tail: earlier completion).  This is the
    sawtooth backoff of Greenberg and Leiserson, with full jitter.
    """

    factor: float = 4.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "factor", check_number("SawtoothBackoff", "factor", self.factor, minimum=1.0)
        )

    def delays(self, retry: RetryConfig, rng: random.Random, count: int | None) -> Iterator[float]:
        """``count`` delays (endless for ``None``) with ``retry``'s base and cap, in seconds."""
        base, cap, factor = retry.base_delay, retry.max_delay, self.factor
        made = 0
        phase = 0
        while True:
            phase += 1
            for step in range(phase, 0, -1):
                if count is not None and made >= count:
                    return
                try:
                    window = min(cap, base * factor**step)
                except OverflowError:  # far past the cap
                    window = cap
                yield rng.uniform(0.0, window)
                made += 1


@dataclass(frozen=True, slots=True)
class SimPolicy:
    """Retries, and optionally a budget and a breaker, for each simulated client.

    At most one budget: ``token_budget`` (gRPC) or ``ratio_budget``
    (Finagle/SRE).  ``sawtooth``, when set, replaces the jitter of ``retry``
    by the experimental :class:`SawtoothBackoff` (``retry`` still gives the
    base, the cap, the attempts and the deadline).  ``description`` is shown
    in reports.
    """

    retry: RetryConfig = field(default_factory=RetryConfig)
    token_budget: TokenBudgetConfig | None = None
    ratio_budget: RatioBudgetConfig | None = None
    breaker: BreakerConfig | None = None
    sawtooth: SawtoothBackoff | None = None
    description: str = ""

    def __post_init__(self) -> None:
        owner = "SimPolicy"
        for name, kind in (
            ("retry", RetryConfig),
            ("token_budget", TokenBudgetConfig),
            ("ratio_budget", RatioBudgetConfig),
            ("breaker", BreakerConfig),
            ("sawtooth", SawtoothBackoff),
        ):
            value = getattr(self, name)
            if not isinstance(value, kind) and not (value is None and name != "retry"):
                raise TypeError(f"{owner}.{name}: expected a {kind.__name__}, got {value!r}")
        if self.token_budget is not None and self.ratio_budget is not None:
            raise ValueError(
                f"{owner}.ratio_budget: at most one budget, and token_budget is set too, "
                f"got {self.ratio_budget!r}"
            )
        if not isinstance(self.description, str):
            raise TypeError(f"{owner}.description: expected a str, got {self.description!r}")

    def delays(self, rng: random.Random, *, endless: bool = False) -> Iterator[float]:
        """The delays of one call's retries, in seconds: ``max_attempts - 1``, or ``endless``.

        :meth:`RetryConfig.delays` itself unless ``sawtooth`` is set.
        """
        retry = self.retry
        if endless and retry.max_attempts is not None:
            retry = dataclasses.replace(
                retry, max_attempts=None, deadline=retry.deadline or _ENDLESS_DEADLINE
            )
        if self.sawtooth is not None:
            count = None if retry.max_attempts is None else retry.max_attempts - 1
            return self.sawtooth.delays(retry, rng, count)
        return retry.delays(rng)


#: RetryConfig wants a deadline when attempts are unbounded; endless delays
#: (the contention model) never consult it.
_ENDLESS_DEADLINE: Final = 86400.0


@dataclass(frozen=True, slots=True)
class PolicyFile:
    """The layout of a policy file: ``[policies.NAME]`` tables."""

    policies: Mapping[str, SimPolicy] = field(default_factory=dict)


#: The library's default policy: its default retries (3 attempts, full jitter,
#: 100 ms base, 10 s cap) behind the default gRPC-style budget and breaker.
DEFAULT_POLICY: Final = SimPolicy(
    retry=RetryConfig(),
    token_budget=TokenBudgetConfig(),
    breaker=BreakerConfig(),
    description="the library's defaults: 3 attempts, full jitter, token budget, breaker",
)

_JITTER_TEXT: Final = {
    Jitter.NONE: "exponential, no jitter",
    Jitter.FULL: "full jitter: uniform(0, exponential)",
    Jitter.EQUAL: "equal jitter: half fixed, half uniform",
    Jitter.DECORRELATED: "decorrelated: uniform(base, 3 x previous)",
    Jitter.DECORRELATED_V2: "Polly's decorrelated V2",
    Jitter.PROPORTIONAL: "exponential x uniform(0.8, 1.2)",
}


def builtin_policies(
    base_delay: float | None = None, max_delay: float | None = None
) -> dict[str, SimPolicy]:
    """The named built-ins; ``base_delay`` / ``max_delay`` (seconds) replace the defaults.

    - one per jitter kind (``none``, ``full``, ``equal``, ``decorrelated``,
      ``decorrelated_v2``, ``proportional``): plain retries, 3 attempts;
    - ``plain``: the default :class:`RetryConfig` alone, no budget, no breaker;
    - ``default``: :data:`DEFAULT_POLICY`, the library's defaults;
    - ``sawtooth``: plain retries with the experimental :class:`SawtoothBackoff`.
    """
    defaults = RetryConfig()
    retry = RetryConfig(
        base_delay=defaults.base_delay if base_delay is None else base_delay,
        max_delay=defaults.max_delay if max_delay is None else max_delay,
    )
    policies = {
        kind.value: SimPolicy(
            retry=dataclasses.replace(retry, jitter=kind), description=_JITTER_TEXT[kind]
        )
        for kind in Jitter
    }
    policies["plain"] = SimPolicy(
        retry=retry, description="3 attempts, full jitter, no budget, no breaker"
    )
    policies["default"] = dataclasses.replace(DEFAULT_POLICY, retry=retry)
    policies["sawtooth"] = SimPolicy(
        retry=retry,
        sawtooth=SawtoothBackoff(),
        description="EXPERIMENTAL sawtooth full jitter, factor 4",
    )
    return policies


def load_policies(path: str | Path) -> dict[str, SimPolicy]:
    """The policies of a TOML file; a bad file raises :class:`~.schema.ConfigError`."""
    source = str(path)
    return dict(build(PolicyFile, read_toml(path), source=source).policies)


def resolve_policies(
    names: Sequence[str],
    path: str | Path | None = None,
    *,
    base_delay: float | None = None,
    max_delay: float | None = None,
) -> dict[str, SimPolicy]:
    """The policies named, in order, from the file at ``path`` first, then the built-ins.

    With no names, every policy of the file; an unknown name is a
    :class:`~datapunk_recovery.schema.ConfigError` listing what exists.
    """
    from_file = load_policies(path) if path is not None else {}
    if not names:
        if not from_file:
            raise ConfigError([Problem("command line", "policies", "no policy named")])
        return from_file
    builtins = builtin_policies(base_delay, max_delay)
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
