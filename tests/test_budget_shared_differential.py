"""Shared (Redis) retry budgets decide as local ones: differential property tests.

A budget's rules are specified once, in ``budget.TokenBudget`` and
``budget.RatioBudget``; a ``SharedBudget`` decides on such a budget locally
and syncs it through a Lua script that applies the same arithmetic in Redis.
Hypothesis drives one sequence of attempts, retries (under every
criticality) and clock steps through a plain budget and a shared one over a
real Redis, both on one fake clock (the ratio script takes the fake time,
see ``stores.redis.script_time``), syncing with the public ``sync()``:

- synced after every step (no lag), the two hold the same fill (to the
  bit) or the same window and grant exactly the same retries;
- synced only every few steps, the ratio budget agrees at every sync (its
  counts are additive; the clock moves only at syncs, so a batch lands in
  the bucket its outcomes were counted in), and the token budget applies
  each batch as its net change clamped once (the documented rule, see
  ``stores.budget_redis``): equal to the local budget whenever the local
  fill stayed strictly inside ``(0, max_tokens)`` during the batch, and
  never further from it than the clamping the local one did.

Times are multiples of 1/64 s and bucket widths multiples of 1/4 s: exact
in binary and in the script's microseconds.  Each example runs its own
asyncio loop, store and budget name, so examples never share keys.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from datapunk_recovery.budget import (
    Criticality,
    RatioBudget,
    RatioBudgetConfig,
    TokenBudget,
    TokenBudgetConfig,
    criticality,
)
from datapunk_recovery.stores.budget_redis import SharedBudget
from datapunk_recovery.stores.redis import RedisStore
from datapunk_recovery.testing import fake_clock
from tests.harness import RedisServer

STEP = 1 / 64  # seconds
EPS = 1e-9  # tokens: the rounding a batch's sum may differ by from one-by-one sums
LEVELS = (Criticality.SHEDDABLE, Criticality.DEFAULT, Criticality.CRITICAL)
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Attempt:
    """An attempt ended: ``succeeded`` or not."""

    succeeded: bool


@dataclass(frozen=True)
class Retry:
    """Ask both budgets for a retry of criticality ``level``."""

    level: Criticality


@dataclass(frozen=True)
class Advance:
    """Move the clock by ``steps`` times `STEP`."""

    steps: int


Op = Attempt | Retry | Advance

token_configs = st.builds(
    TokenBudgetConfig,
    max_tokens=st.sampled_from([1.0, 2.0, 3.0, 5.0, 10.0]),
    token_ratio=st.sampled_from([0.1, 0.25, 0.5, 1.0, 1.5]),
)
ratio_configs = st.builds(
    RatioBudgetConfig,
    ratio=st.sampled_from([0.1, 0.2, 0.5, 1.0]),
    min_per_second=st.sampled_from([0.0, 0.5, 1.0]),
    window=st.sampled_from([0.5, 1.0, 2.0]),
    buckets=st.sampled_from([1, 2]),
)
attempts = st.builds(Attempt, st.booleans())
retries = st.builds(Retry, st.sampled_from(LEVELS))
advances = st.builds(Advance, st.one_of(st.integers(1, 16), st.integers(17, 160)))
token_programs = st.lists(st.one_of(attempts, attempts, retries), min_size=10, max_size=60)
ratio_programs = st.lists(
    st.one_of(attempts, attempts, retries, retries, advances), min_size=10, max_size=60
)


def _granted(budget: TokenBudget | RatioBudget | SharedBudget, level: Criticality) -> bool:
    with criticality(level):
        return budget.allow_retry()


def _limits(config: TokenBudgetConfig) -> tuple[float, ...]:
    """The fill a retry of each level (in `LEVELS` order) must exceed."""
    top = config.max_tokens
    return (
        config.sheddable_threshold * top,
        config.threshold * top,
        config.critical_threshold * top,
    )


def _tokens_view(budget: TokenBudget) -> tuple[object, ...]:
    """The fill, and whether a retry of each criticality would pass (a token budget's
    ``allow_retry`` spends nothing)."""
    return (budget.tokens, *(_granted(budget, level) for level in LEVELS))


def _ratio_view(budget: RatioBudget) -> tuple[float, ...]:
    return tuple(budget.allowance(level) for level in LEVELS)


async def _tokens(url: str, config: TokenBudgetConfig, program: list[Op], every: int) -> None:
    with fake_clock(1000.0):
        store = RedisStore(url, timeout=5.0)  # (a busy machine is no outage here)
        name = f"diff-{uuid.uuid4().hex[:12]}"
        local, inner = TokenBudget(name, config), TokenBudget(name, config)
        shared = SharedBudget(inner, store)
        top = config.max_tokens
        log: list[str] = []
        synced = inner.tokens  # the shared fill after the last sync
        successes = failures = 0  # counted since
        clamped = 0.0  # how far the local budget's clamps moved it since
        first = True
        try:
            for i, op in enumerate(program):
                if isinstance(op, Attempt):
                    before = local.tokens
                    local.on_attempt(op.succeeded)
                    shared.on_attempt(op.succeeded)
                    unclamped = before + (config.token_ratio if op.succeeded else -1.0)
                    clamped += abs(local.tokens - unclamped)
                    successes += op.succeeded
                    failures += not op.succeeded
                    log.append(f"{'success' if op.succeeded else 'failure'} -> {local.tokens}")
                elif isinstance(op, Retry):
                    granted = _granted(local, op.level), _granted(shared, op.level)
                    log.append(f"retry {op.level.name} -> {granted}")
                    # (batches sum in another order: a limit within rounding may differ)
                    if abs(local.tokens - _limits(config)[LEVELS.index(op.level)]) > EPS:
                        assert granted[0] == granted[1], "\n".join(log)
                if (i + 1) % every:
                    continue
                assert await shared.sync(), "\n".join(log)
                # The documented batch rule: its net change, clamped once; but
                # the first sync finds no bucket and starts from the sender's.
                expected = min(max(synced + successes * config.token_ratio - failures, 0.0), top)
                if first:
                    expected, clamped, first = local.tokens, 0.0, False
                log.append(f"  sync: local {local.tokens}, shared {inner.tokens}")
                if every == 1:  # one outcome a batch: the very same arithmetic
                    assert inner.tokens == expected, "\n".join(log)
                    assert _tokens_view(local) == _tokens_view(inner), "\n".join(log)
                    synced, successes, failures, clamped = inner.tokens, 0, 0, 0.0
                    continue
                # A batch sums its outcomes in another order than one by one:
                # the same value to within rounding (EPS), and the same retries
                # unless a criticality's limit lies within that rounding.
                assert abs(inner.tokens - expected) <= EPS, "\n".join(log)
                if clamped == 0.0:
                    assert abs(inner.tokens - local.tokens) <= EPS, "\n".join(log)
                    for level, limit in zip(LEVELS, _limits(config), strict=True):
                        if abs(local.tokens - limit) > EPS:
                            assert _granted(local, level) == _granted(inner, level)
                else:
                    assert abs(inner.tokens - local.tokens) <= clamped + 1e-9, "\n".join(log)
                    return  # the two went apart by the rule: nothing more to compare
                synced, successes, failures, clamped = inner.tokens, 0, 0, 0.0
        finally:
            await shared.aclose()
            await store.aclose()


async def _ratio(url: str, config: RatioBudgetConfig, program: list[Op], every: int) -> None:
    with fake_clock(1000.0) as clock:
        store = RedisStore(url, timeout=5.0)  # (a busy machine is no outage here)
        name = f"diff-{uuid.uuid4().hex[:12]}"
        local, inner = RatioBudget(name, config), RatioBudget(name, config)
        shared = SharedBudget(inner, store)
        log: list[str] = []
        held = 0  # clock steps held back until the next sync (every > 1)
        try:
            for i, op in enumerate(program):
                if isinstance(op, Attempt):
                    local.on_attempt(op.succeeded)
                    shared.on_attempt(op.succeeded)
                    log.append("attempt")
                elif isinstance(op, Retry):
                    granted = _granted(local, op.level), _granted(shared, op.level)
                    log.append(f"retry {op.level.name} -> {granted}")
                    assert granted[0] == granted[1], "\n".join(log)
                elif every == 1:
                    clock.advance(op.steps * STEP)
                    log.append(f"advance -> {clock.now()}")
                else:
                    held += op.steps
                if (i + 1) % every:
                    continue
                assert await shared.sync(), "\n".join(log)
                here, there = _ratio_view(local), _ratio_view(inner)
                log.append(f"  sync: local {here}, shared {there}")
                assert here == there, "\n".join(log)
                if held:
                    clock.advance(held * STEP)
                    log.append(f"advance (held) -> {clock.now()}")
                    held = 0
        finally:
            await shared.aclose()
            await store.aclose()


@SETTINGS
@given(config=token_configs, program=token_programs)
def test_a_shared_token_budget_grants_what_the_local_one_grants_when_synced_each_step(
    redis_server: RedisServer, config: TokenBudgetConfig, program: list[Op]
) -> None:
    """Synced after every step: the same fill, to the bit, and the same retries."""
    asyncio.run(_tokens(redis_server.url, config, program, every=1))


@SETTINGS
@given(config=token_configs, program=token_programs, every=st.integers(2, 6))
# A batch at a full bucket: a success clamped away locally, then a failure.
@example(
    config=TokenBudgetConfig(max_tokens=2.0, token_ratio=0.5),
    program=[Attempt(True), Attempt(False)] * 5,
    every=2,
)
def test_a_shared_token_budget_synced_every_few_steps_applies_each_batch_clamped_once(
    redis_server: RedisServer, config: TokenBudgetConfig, program: list[Op], every: int
) -> None:
    """Synced every ``every`` steps: the lag bound of a token budget.

    Between syncs both decide on the same local arithmetic; at each sync the
    shared fill is the batch's net change clamped once (to within rounding:
    a sum in another order), which is the local fill whenever the local
    budget never touched ``0`` or ``max_tokens`` during the batch, and
    otherwise differs from it by at most what the local clamps cut (the
    comparison ends there: the two went apart by the rule).
    """
    asyncio.run(_tokens(redis_server.url, config, program, every=every))


@SETTINGS
@given(config=ratio_configs, program=ratio_programs)
def test_a_shared_ratio_budget_grants_what_the_local_one_grants_when_synced_each_step(
    redis_server: RedisServer, config: RatioBudgetConfig, program: list[Op]
) -> None:
    """Synced after every step: the same window (allowances) and the same retries."""
    asyncio.run(_ratio(redis_server.url, config, program, every=1))


@SETTINGS
@given(config=ratio_configs, program=ratio_programs, every=st.integers(2, 6))
def test_a_shared_ratio_budget_synced_every_few_steps_agrees_at_every_sync(
    redis_server: RedisServer, config: RatioBudgetConfig, program: list[Op], every: int
) -> None:
    """Synced every ``every`` steps, the clock moving only at syncs: the lag bound.

    Every outcome lands in the bucket it was counted in, so at every sync
    the windows agree, and between syncs both grant the same retries (each
    decides on the same local window).
    """
    asyncio.run(_ratio(redis_server.url, config, program, every=every))


async def _reconfigured(
    url: str,
    budgets: tuple[TokenBudget, TokenBudget] | tuple[RatioBudget, RatioBudget],
    configs: list[TokenBudgetConfig] | list[RatioBudgetConfig],
) -> list[tuple[object, object]]:
    """Fail 8 attempts, then for each config: re-configure both, succeed 2; sync each time.

    Returns what the local and the shared budget hold after each sync.
    """
    local, inner = budgets
    held: list[tuple[object, object]] = []

    def holds(budget: TokenBudget | RatioBudget) -> object:
        return budget.tokens if isinstance(budget, TokenBudget) else budget.totals()

    with fake_clock(1000.0):
        store = RedisStore(url, timeout=5.0)
        shared = SharedBudget(inner, store)
        try:
            for _ in range(8):
                local.on_attempt(False)
                shared.on_attempt(False)
            assert await shared.sync()
            held.append((holds(local), holds(inner)))
            for config in configs:
                local.reconfigure(config)  # type: ignore[arg-type]
                inner.reconfigure(config)  # type: ignore[arg-type]
                for _ in range(2):
                    local.on_attempt(True)
                    shared.on_attempt(True)
                assert await shared.sync()  # (it fell back on the reply of another shape)
                held.append((holds(local), holds(inner)))
        finally:
            await shared.aclose()
            await store.aclose()
    return held


def test_a_shared_token_budget_follows_a_reload_of_its_budget(
    redis_server: RedisServer,
) -> None:
    """A hot reload re-configures the wrapped budget in place: each sync applies its
    figures as they are then (it applied those it was made with: a success
    earned the old ``token_ratio`` in Redis)."""
    name = f"diff-{uuid.uuid4().hex[:12]}"
    start = TokenBudgetConfig(max_tokens=10.0, token_ratio=0.5)
    budgets = TokenBudget(name, start), TokenBudget(name, start)
    configs = [TokenBudgetConfig(max_tokens=5.0, token_ratio=1.0)]
    held = asyncio.run(_reconfigured(redis_server.url, budgets, configs))
    assert held == [(2.0, 2.0), (4.0, 4.0)]


def test_a_shared_ratio_budget_follows_a_reload_that_reshapes_its_window(
    redis_server: RedisServer,
) -> None:
    """A new window shape neither breaks the sync (the reply was read with the new
    number of buckets: a fallback for good) nor hands out a fresh allowance in
    Redis (the window started again empty): it starts from the sender's counts,
    as the local budget keeps its own."""
    name = f"diff-{uuid.uuid4().hex[:12]}"
    start = RatioBudgetConfig(ratio=0.5, min_per_second=0.0, window=1.0, buckets=2)
    budgets = RatioBudget(name, start), RatioBudget(name, start)
    configs = [
        RatioBudgetConfig(ratio=0.5, min_per_second=0.0, window=2.0, buckets=4),
        RatioBudgetConfig(ratio=0.2, min_per_second=0.0, window=2.0, buckets=4),
    ]
    held = asyncio.run(_reconfigured(redis_server.url, budgets, configs))
    assert held == [((8, 0), (8, 0)), ((10, 0), (10, 0)), ((12, 0), (12, 0))]
