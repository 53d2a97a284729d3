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
from collections.abc import Mapping
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
        "the longest its jitter allows; a server-given delay (Retry-After) may add up to "
        "max_server_delay per retry unless a deadline bounds the call.\n"
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


def worst_case(policy: ServicePolicy) -> tuple[int | None, float | None]:
    """The most attempts one call can make, and the longest it can take, in seconds.

    Over the default and every category's configuration (a category can allow
    more attempts); ``None`` means unbounded (no attempt timeout and no
    deadline, or unbounded attempts).
    """
    configs = [policy.retry, *policy.categories.values()]
    attempts: int | None = 0
    longest: float | None = 0.0
    for config in configs:
        if config.max_attempts is None:
            attempts = None
        elif attempts is not None:
            attempts = max(attempts, config.max_attempts)
        if config.max_attempts is None or policy.attempt_timeout is None:
            spent = math.inf
        else:
            waits = sum(_max_delay(config, n) for n in range(1, config.max_attempts))
            spent = waits + config.max_attempts * policy.attempt_timeout
        deadline = policy.retry.deadline  # the call's deadline is the default's
        if deadline is not None:
            spent = min(spent, deadline)
        if longest is not None:
            longest = None if math.isinf(spent) else max(longest, spent)
    return attempts, longest


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
        "unbounded" if attempts is None else str(attempts),
        "unbounded" if longest is None else format_duration(longest),
    )


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
