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

from ..._core.backoff import RetryConfig
from ..._core.durations import format_duration
from ...budget import TokenBudgetConfig
from ...config import RecoveryConfig, ServicePolicy, load_config
from ...config.schema import ConfigError
from ...simulate.report import Table, render

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
        "worst case: the call queues in the bulkhead up to its max_wait, every attempt fails "
        "and takes its whole attempt timeout, every hedge starts, failures mix categories the "
        "worst way, and every wait is the longest its jitter allows or a server-given delay "
        "(Retry-After) up to max_server_delay; a deadline caps the retries.\n"
    )
    return 0


#: Retries bounded one by one; past this many, every further retry is bounded
#: by the longest delay any configuration still retrying allows (its cap).
_EXACT_RETRIES = 10_000


def _worst_waits(configs: Sequence[RetryConfig], retries: int, *, server_delays: bool) -> float:
    """The longest total wait, in seconds, the engine can make over ``retries`` retries.

    The engine decides each retry with the configuration of the failure's
    category, numbered over the whole call: after attempt ``k``, a failure
    of category ``c`` is retried only while ``k < c.max_attempts``, and waits
    ``c``'s delay for retry ``k`` (the decorrelated kinds draw from their own
    sequence, which never gets longer than retry ``k``'s bound).  Failures
    can mix categories in any order, so retry ``k`` waits at most the longest
    bound of the configurations that may still retry then; the bounds come
    from
    [`RetryConfig.longest_delays()`][datapunk_recovery._core.backoff.RetryConfig.longest_delays],
    the engine's own formulas run at
    the top of every jitter range.  A server-given delay (``Retry-After``)
    replaces a shorter computed one when it is at most ``max_server_delay``
    (a longer one makes the engine give up): with ``server_delays`` each
    retry may wait that long.
    """
    limits = [(c.max_attempts or 1) - 1 for c in configs]
    bounds = [c.longest_delays() for c in configs]
    total = 0.0
    exact = min(retries, _EXACT_RETRIES)
    for k in range(1, exact + 1):
        longest = 0.0
        for config, limit, bound in zip(configs, limits, bounds, strict=True):
            if k <= limit:
                wait = next(bound)
                if server_delays and config.max_server_delay > wait:
                    wait = config.max_server_delay
                longest = max(longest, wait)
        total += longest
    for k in range(exact + 1, retries + 1):
        total += max(
            max(c.max_delay, c.max_server_delay if server_delays else 0.0)
            for c, limit in zip(configs, limits, strict=True)
            if k <= limit
        )
    return total


def _hedges(policy: ServicePolicy) -> int:
    """Extra calls each attempt can start: ``max_hedges`` with endpoints to hedge over, else 0."""
    return policy.hedge.max_hedges if policy.hedge is not None and policy.endpoints else 0


def worst_case(
    policy: ServicePolicy, *, server_delays: bool = True
) -> tuple[int | None, float | None]:
    """The most calls one call can make (hedges included), and the longest it can take, in seconds.

    A true upper bound of what the facade's pipeline can do with ``policy``:

    - the bulkhead: a call may queue up to its ``max_wait`` before it starts
      (when it has a queue);
    - every attempt fails after its whole attempt timeout; with ``hedge``
      (and endpoints) it also starts ``max_hedges`` extra calls, each one
      hedge delay after the other (at most one attempt timeout apart: a
      failure starts the next at once), which fail the same way;
    - between attempts, the longest wait the engine can make (see
      `_worst_waits()`): failures mixing categories the worst way, each
      wait at the top of its jitter range, and (``server_delays``) a
      server-given delay up to ``max_server_delay`` on every retry;
    - the call's deadline (the default configuration's) caps the retrying
      part.

    ``None`` means unbounded (no attempt timeout and no deadline, or
    unbounded attempts without a deadline).
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
        waits = _worst_waits(configs, attempts - 1, server_delays=server_delays)
        spent = waits + attempts * per_attempt
    deadline = policy.retry.deadline
    if deadline is not None:
        spent = min(spent, deadline)
    bulkhead = policy.bulkhead
    if bulkhead is not None and bulkhead.max_queue > 0:
        spent += bulkhead.max_wait
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
    g = policy.budget
    budget = (
        "off"
        if g is None
        else f"{g.max_tokens:g} tokens"
        if isinstance(g, TokenBudgetConfig)
        else f"ratio {g.ratio:.0%} + {g.min_per_second:g}/s over {format_duration(g.window)}"
    )
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
