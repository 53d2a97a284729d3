"""Validate a recovery configuration and print each service's effective policy.

Reads the TOML file (and the ``DATAPUNK_RECOVERY__...`` environment
overrides, unless ``--no-env``), reports every problem at once (file or
variable, key path, value), and otherwise prints a table: per service, the
retry settings, breaker, budget, bulkhead and attempt timeout in force, and
the worst case: how many attempts one call can make and how long it can take.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..backoff import Jitter, RetryConfig
from ..config import RecoveryConfig, ServicePolicy, load_config
from ..durations import format_duration
from ..schema import ConfigError
from ..simulate.report import Table, render

__all__ = ["add_arguments", "policy_table", "run", "worst_case"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The file to check, and whether the environment applies."""
    parser.add_argument("file", type=Path, help="the TOML configuration to check")
    parser.add_argument(
        "--no-env", action="store_true", help="ignore DATAPUNK_RECOVERY__... variables"
    )
    parser.add_argument(
        "--plain", action="store_true", help="plain text output even when rich is installed"
    )


def run(args: argparse.Namespace) -> int:
    """0 and the table when the configuration is valid; 1 and every problem otherwise."""
    try:
        config = load_config(args.file, environ={} if args.no_env else None)
    except ConfigError as exc:
        sys.stdout.write(f"{exc}\n")
        return 1
    render(policy_table(config), sys.stdout, fancy=False if args.plain else None)
    sys.stdout.write(
        "worst case: every attempt fails and takes its whole attempt timeout, every wait is "
        "the longest its jitter allows, failures mix categories the worst way, every hedge "
        "starts; a server-given delay (Retry-After) may add up to max_server_delay per retry "
        "unless a deadline bounds the call.\n"
    )
    return 0


def _max_delay(config: RetryConfig, n: int) -> float:
    """The longest delay the jitter kind can draw for retry ``n``, in seconds."""
    if config.jitter is Jitter.DECORRELATED:
        try:
            return min(config.max_delay, config.base_delay * 3.0**n)
        except OverflowError:
            return config.max_delay
    if config.jitter is Jitter.DECORRELATED_V2:
        return config.max_delay
    if config.jitter is Jitter.PROPORTIONAL:
        return min(config.max_delay, config.envelope(n) * (1.0 + config.jitter_factor))
    return config.envelope(n)


#: Above this many retries the exact search over mixed categories (quadratic
#: in the retries) gives way to a bound that is never below the worst case.
_EXACT_RETRIES = 512


def _worst_waits(configs: Sequence[RetryConfig], retries: int) -> float:
    """The longest total wait, in seconds, over ``retries`` retries whose failures mix categories.

    A call's attempts count over the whole call, and each category keeps its
    own delay sequence: the retry after attempt ``k`` may be one of category
    ``c`` only while ``k < c.max_attempts``, and the ``n``-th retry of ``c``
    waits at most ``c``'s ``n``-th longest delay.  So a call can wait longer
    than any one category allows alone (a few long waits of a category with
    few attempts, then the short ones of a category with many).  Exact by
    dynamic programming over the categories, fewest attempts first (the
    order in which their retries must come).
    """
    ordered = sorted(configs, key=lambda c: c.max_attempts or 0)
    limits = [min(retries, (c.max_attempts or 1) - 1) for c in ordered]
    if retries > _EXACT_RETRIES:
        # Each retry k waits at most the longest k-th delay of a category
        # that may still retry then (its n-th retry has n <= k).
        return sum(
            max(_max_delay(c, k) for c, limit in zip(ordered, limits, strict=True) if k <= limit)
            for k in range(1, retries + 1)
        )
    best = [0.0] + [-math.inf] * retries  # best[t]: the longest wait over t retries so far
    for config, limit in zip(ordered, limits, strict=True):
        prefix = [0.0]
        for n in range(1, limit + 1):
            prefix.append(prefix[-1] + _max_delay(config, n))
        step = list(best)
        for t, before in enumerate(best[: limit + 1]):
            if before == -math.inf:
                continue
            for n in range(1, limit - t + 1):
                if before + prefix[n] > step[t + n]:
                    step[t + n] = before + prefix[n]
        best = step
    return max(best)


def _hedges(policy: ServicePolicy) -> int:
    """Extra calls each attempt can start: ``max_hedges`` with endpoints to hedge over, else 0."""
    return policy.hedge.max_hedges if policy.hedge is not None and policy.endpoints else 0


def worst_case(policy: ServicePolicy) -> tuple[int | None, float | None]:
    """The most calls one call can make (hedges included), and the longest it can take, in seconds.

    Over the default and every category's configuration, mixed as a call's
    failures can mix them (a category can allow more attempts, or longer
    waits).  Each attempt fails after its whole attempt timeout; with
    ``hedge`` (and endpoints) it also starts ``max_hedges`` extra calls, each
    one hedge delay after the other (at most one attempt timeout apart: a
    failure starts the next at once), which fail the same way.  ``None``
    means unbounded (no attempt timeout and no deadline, or unbounded
    attempts).  The call's deadline is the default configuration's.
    """
    configs = [policy.retry, *policy.categories.values()]
    hedges = _hedges(policy)
    bounded = all(c.max_attempts is not None for c in configs)
    attempts = max(c.max_attempts or 0 for c in configs) if bounded else None
    spent = math.inf
    timeout = policy.attempt_timeout
    if attempts is not None and timeout is not None:
        per_attempt = timeout
        if hedges and policy.hedge is not None:
            hedge = policy.hedge
            delay = hedge.delay if hedge.percentile is None else max(hedge.delay, hedge.max_delay)
            per_attempt += hedges * min(delay, timeout)
        spent = _worst_waits(configs, attempts - 1) + attempts * per_attempt
    deadline = policy.retry.deadline
    if deadline is not None:
        spent = min(spent, deadline)
    calls = None if attempts is None else attempts * (1 + hedges)
    return calls, None if math.isinf(spent) else spent


def _describe(policy: ServicePolicy) -> tuple[str, ...]:
    r = policy.retry
    retry = (
        f"{r.max_attempts if r.max_attempts is not None else 'unbounded'} x {r.jitter.value} "
        f"{format_duration(r.base_delay)}..{format_duration(r.max_delay)}"
    )
    if r.deadline is not None:
        retry += f", deadline {format_duration(r.deadline)}"
    categories = ", ".join(
        f"{c.value}: {cfg.max_attempts} x {format_duration(cfg.base_delay)}"
        for c, cfg in policy.categories.items()
    )
    b = policy.breaker
    breaker = (
        "off"
        if b is None
        else (
            (f"{b.consecutive_failures} in a row" if b.consecutive_failures else "rate")
            + f", open {format_duration(b.open_duration)}"
        )
    )
    budget = "off" if policy.budget is None else f"{policy.budget.max_tokens:g} tokens"
    bulkhead = "off" if policy.bulkhead is None else str(policy.bulkhead.max_concurrent)
    timeout = "none" if policy.attempt_timeout is None else format_duration(policy.attempt_timeout)
    attempts, longest = worst_case(policy)
    return (
        retry,
        categories or "-",
        breaker,
        budget,
        bulkhead,
        timeout,
        _calls(attempts, _hedges(policy)),
        "unbounded" if longest is None else format_duration(longest),
    )


def _calls(calls: int | None, hedges: int) -> str:
    if calls is None:
        return "unbounded"
    if not hedges:
        return str(calls)
    attempts = calls // (1 + hedges)
    return f"{calls} ({attempts} + {calls - attempts} hedges)"


def policy_table(config: RecoveryConfig) -> Table:
    """One row per service (the defaults first) with its effective policy and worst case."""
    services: Mapping[str, ServicePolicy] = {"(defaults)": config.defaults, **config.services}
    return Table(
        title="effective recovery policies",
        headers=(
            "service",
            "retry",
            "per category",
            "breaker",
            "budget",
            "bulkhead",
            "attempt timeout",
            "worst attempts",
            "worst time",
        ),
        rows=tuple((name, *_describe(policy)) for name, policy in services.items()),
    )
