"""The policies a simulation compares: named built-ins, or tables of a TOML file.

A [`SimPolicy`][datapunk_recovery.simulate.policies.SimPolicy] is what one client does on failure,
made of the
library's own configurations: a [`RetryConfig`][datapunk_recovery._core.backoff.RetryConfig], and
optionally a retry budget ([`TokenBudgetConfig`][datapunk_recovery.budget.TokenBudgetConfig]
or [`RatioBudgetConfig`][datapunk_recovery.budget.RatioBudgetConfig]) and a circuit breaker
([`BreakerConfig`][datapunk_recovery.breaker.BreakerConfig]).

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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from .._core.backoff import RetryConfig
from .._core.validate import check_number, check_seconds, shown
from ..breaker import BreakerConfig
from ..budget import RatioBudgetConfig, TokenBudgetConfig
from ..config.schema import build, read_toml

__all__ = [
    "DEFAULT_POLICY",
    "AdditiveJitter",
    "PolicyFile",
    "RetryQuotaConfig",
    "SawtoothBackoff",
    "SimPolicy",
    "load_policies",
]


@dataclass(frozen=True, slots=True)
class SawtoothBackoff:
    """EXPERIMENTAL: sawtooth full jitter, the simulation's candidate for a better default.

    Not (yet) a jitter kind of
    [`datapunk_recovery._core.backoff`][datapunk_recovery._core.backoff]; it lives
    here
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
class AdditiveJitter:
    """The additive jitter of tenacity's ``wait_exponential_jitter`` and of stamina.

    The delay of retry ``n`` is ``min(max_delay, base_delay * exponential_base
    ** (n - 1) + uniform(0, jitter))`` seconds, with the base, factor and cap
    of the policy's [`RetryConfig`][datapunk_recovery._core.backoff.RetryConfig]
    (the peers' ``initial`` /
    ``wait_initial``, ``exp_base`` and ``max`` / ``wait_max``).  Not a jitter
    kind of the library: it lives here to reproduce the peers in the lab.
    """

    jitter: float = field(default=1.0, metadata={"unit": "seconds"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "jitter", check_seconds("AdditiveJitter", "jitter", self.jitter))

    def delays(self, retry: RetryConfig, rng: random.Random, count: int | None) -> Iterator[float]:
        """``count`` delays (endless for ``None``), in seconds."""
        n = 1
        while count is None or n <= count:
            yield min(retry.max_delay, retry.envelope(n) + rng.uniform(0.0, self.jitter))
            n += 1


@dataclass(frozen=True, slots=True)
class RetryQuotaConfig:
    """The AWS SDKs' retry quota (standard retry mode), as documented.

    A bucket of ``capacity`` tokens (500), full at the start; a retry is
    allowed only if ``retry_cost`` tokens (5) are left, and takes them; a
    request that succeeds at its first attempt puts ``no_retry_increment``
    (1) back, one that succeeds after retries gives back what its retry cost.
    (The SDKs charge 10 for a retry after a timeout; the lab's failures are
    fast errors, so that cost never applies.)
    """

    capacity: float = 500.0
    retry_cost: float = 5.0
    no_retry_increment: float = 1.0

    def __post_init__(self) -> None:
        owner = "RetryQuotaConfig"
        for name in ("capacity", "retry_cost", "no_retry_increment"):
            object.__setattr__(
                self, name, check_number(owner, name, getattr(self, name), minimum=0.0)
            )


@dataclass(frozen=True, slots=True)
class SimPolicy:
    """Retries, and optionally a budget and a breaker, for each simulated client.

    At most one budget: ``token_budget`` (gRPC), ``ratio_budget``
    (Finagle/SRE) or ``retry_quota`` (the AWS SDKs').  ``additive``, when
    set, replaces the jitter of ``retry`` by
    [`AdditiveJitter`][datapunk_recovery.simulate.policies.AdditiveJitter]
    (tenacity's and stamina's).  ``sawtooth``, when set, replaces the jitter of ``retry``
    by the experimental [`SawtoothBackoff`][datapunk_recovery.simulate.policies.SawtoothBackoff]
    (``retry`` still gives the
    base, the cap, the attempts and the deadline).  ``description`` is shown
    in reports.

    ``indexing`` says how retries are numbered against the exponential
    envelope.  ``"library"`` (the default): retry ``n`` waits under
    ``base_delay * exponential_base ** (n - 1)``, as
    [`RetryConfig`][datapunk_recovery._core.backoff.RetryConfig]
    does, so retry 1's window is ``base_delay``.  ``"published"``: the AWS
    post's setup, where the ``k``-th retry waits under
    ``min(cap, base * 2 ** k)``, so retry 1's window is twice the base
    (``expo(1) = 10 ms`` for the post's base of 5 ms).  Only the kinds built
    on the envelope (none, full, equal, proportional) shift; the decorrelated
    kinds and the sawtooth keep their own published formulas.

    ``shared_budget``: in the outage model, one budget for every client
    process instead of one each, as a budget shared through a store
    ([`SharedBudget`][datapunk_recovery.stores.budget_redis.SharedBudget]) would be, idealised
    as synced at once.
    """

    retry: RetryConfig = field(default_factory=RetryConfig)
    token_budget: TokenBudgetConfig | None = None
    ratio_budget: RatioBudgetConfig | None = None
    breaker: BreakerConfig | None = None
    sawtooth: SawtoothBackoff | None = None
    description: str = ""
    indexing: Literal["library", "published"] = "library"
    additive: AdditiveJitter | None = None
    retry_quota: RetryQuotaConfig | None = None
    shared_budget: bool = False

    def __post_init__(self) -> None:
        owner = "SimPolicy"
        for name, kind in (
            ("retry", RetryConfig),
            ("token_budget", TokenBudgetConfig),
            ("ratio_budget", RatioBudgetConfig),
            ("breaker", BreakerConfig),
            ("sawtooth", SawtoothBackoff),
            ("additive", AdditiveJitter),
            ("retry_quota", RetryQuotaConfig),
        ):
            value = getattr(self, name)
            if not isinstance(value, kind) and not (value is None and name != "retry"):
                raise TypeError(f"{owner}.{name}: expected a {kind.__name__}, got {shown(value)}")
        if self.token_budget is not None and self.ratio_budget is not None:
            raise ValueError(
                f"{owner}.ratio_budget: at most one budget, and token_budget is set too, "
                f"got {shown(self.ratio_budget)}"
            )
        if self.retry_quota is not None and (
            self.token_budget is not None or self.ratio_budget is not None
        ):
            raise ValueError(
                f"{owner}.retry_quota: at most one budget, and another is set too, "
                f"got {shown(self.retry_quota)}"
            )
        if self.sawtooth is not None and self.additive is not None:
            raise ValueError(
                f"{owner}.additive: at most one replacement jitter, and sawtooth is set too, "
                f"got {shown(self.additive)}"
            )
        if not isinstance(self.shared_budget, bool):
            raise TypeError(
                f"{owner}.shared_budget: expected a bool, got {shown(self.shared_budget)}"
            )
        if not isinstance(self.description, str):
            raise TypeError(f"{owner}.description: expected a str, got {shown(self.description)}")
        if self.indexing not in ("library", "published"):
            raise ValueError(
                f"{owner}.indexing: expected 'library' or 'published', got {shown(self.indexing)}"
            )

    def delays(self, rng: random.Random, *, endless: bool = False) -> Iterator[float]:
        """The delays of one call's retries, in seconds: ``max_attempts - 1``, or ``endless``.

        [`RetryConfig.delays()`][datapunk_recovery._core.backoff.RetryConfig.delays] itself unless
        ``sawtooth`` is set.
        """
        retry = self.retry
        if endless and retry.max_attempts is not None:
            retry = dataclasses.replace(
                retry, max_attempts=None, deadline=retry.deadline or _ENDLESS_DEADLINE
            )
        if self.sawtooth is not None:
            count = None if retry.max_attempts is None else retry.max_attempts - 1
            return self.sawtooth.delays(retry, rng, count)
        if self.additive is not None:
            count = None if retry.max_attempts is None else retry.max_attempts - 1
            return self.additive.delays(retry, rng, count)
        if self.indexing == "published" and not retry.stateful:
            count = None if retry.max_attempts is None else retry.max_attempts - 1
            return _published(retry, rng, count)
        return retry.delays(rng)


def _published(retry: RetryConfig, rng: random.Random, count: int | None) -> Iterator[float]:
    # The k-th retry under envelope(k + 1) = base * factor ** k: the post's numbering.
    k = 1
    while count is None or k <= count:
        yield retry.next_delay(k + 1, rng, None)
        k += 1


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

def load_policies(path: str | Path) -> dict[str, SimPolicy]:
    """The policies of a TOML file; a bad file raises `ConfigError`."""
    source = str(path)
    return dict(build(PolicyFile, read_toml(path), source=source).policies)
