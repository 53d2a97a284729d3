"""Retry budgets shared between processes through a real Redis.

Redis is reached through redis.asyncio, so these tests run on asyncio only.
Names are unique per test, so tests never see each other's keys.  Waiting is
done with events and bounded polling; no test asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import queue
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.events import Event
from datapunk_recovery._execution.engine import retry
from datapunk_recovery.budget import (
    BudgetRefused,
    RatioBudget,
    RatioBudgetConfig,
    RetryGate,
    TokenBudget,
    TokenBudgetConfig,
)
from datapunk_recovery.stores.budget_redis import (
    BudgetCorruptStateIgnored,
    BudgetStoreFallback,
    BudgetStoreResumed,
    SharedBudget,
    bind_budget,
)
from datapunk_recovery.stores.memory import MemoryStore
from datapunk_recovery.stores.redis import RedisStore
from datapunk_recovery.testing import fake_clock
from tests.harness import RedisServer, ThreadedProxy


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def name() -> str:
    return f"budget-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def stores(redis_stores: Callable[..., RedisStore]) -> Callable[..., RedisStore]:
    return redis_stores


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_server.url)
    yield c
    await c.aclose()


def tokens(name: str, max_tokens: float = 10.0, ratio: float = 0.1) -> TokenBudget:
    return TokenBudget(name, TokenBudgetConfig(max_tokens=max_tokens, token_ratio=ratio))


def held(shared: SharedBudget) -> float:
    """The tokens a shared token budget holds here."""
    assert isinstance(shared.budget, TokenBudget)
    return shared.budget.tokens


def allowance(shared: SharedBudget) -> float:
    """The retries a shared ratio budget allows here."""
    assert isinstance(shared.budget, RatioBudget)
    return shared.budget.allowance()


async def stored(client: aioredis.Redis, name: str) -> float:
    """The tokens Redis holds for budget ``name``."""
    raw = await client.hget(f"datapunk:{{budget:{name}}}:tokens", "t")
    assert isinstance(raw, bytes)
    return float(raw)


def proxied(proxy: ThreadedProxy) -> str:
    return f"redis://127.0.0.1:{proxy.port}/0"


async def until(predicate: Callable[[], bool], what: str, tries: int = 500) -> None:
    """Bounded polling: ``predicate`` must hold within ``tries`` short looks."""
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def through(monkeypatch: pytest.MonkeyPatch, store: RedisStore, fake: Callable[..., Any]) -> None:
    """Run the store's scripts through ``fake(real_script, **kwargs)``: a driver that misbehaves.

    (The store's public ``run`` is the seam: every round trip of a link goes through it.)
    """
    real_run = store.run

    async def run(script: Any, keys: list[str], args: list[Any], **kw: Any) -> Any:
        return await real_run(functools.partial(fake, script), keys, args, **kw)

    monkeypatch.setattr(store, "run", run)


async def link_key(client: aioredis.Redis, name: str, prefix: str = "datapunk") -> str:
    """The one link key a shared budget keeps beside its state (named by the link's id)."""
    keys = await client.keys(f"{prefix}:{{budget:{name}}}:link:*")
    assert len(keys) == 1, keys
    key = keys[0]
    return key.decode() if isinstance(key, bytes) else str(key)


def count(seen: list[Event], kind: type[Event]) -> int:
    return sum(isinstance(e, kind) for e in seen)


# ---------------------------------------------------------------------------
# construction, and sync setups


def test_a_shared_budget_is_a_retry_gate(redis_server: RedisServer, name: str) -> None:
    shared = bind_budget(RedisStore(redis_server.url), tokens(name))
    assert isinstance(shared, SharedBudget) and isinstance(shared, RetryGate)
    assert not shared.shared  # not started: decides alone


def test_it_needs_a_redis_store_and_a_budget(redis_server: RedisServer, name: str) -> None:
    with pytest.raises(TypeError, match=r"SharedBudget\.store"):
        SharedBudget(tokens(name), MemoryStore())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"SharedBudget\.budget"):
        SharedBudget(object(), RedisStore(redis_server.url))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sync_interval": 0}, r"SharedBudget\.sync_interval"),
        ({"max_unsynced": 0}, r"SharedBudget\.max_unsynced"),
        ({"on_unavailable": "open"}, r"SharedBudget\.on_unavailable"),
    ],
)
def test_bad_settings(
    redis_server: RedisServer, name: str, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SharedBudget(tokens(name), RedisStore(redis_server.url), **settings)


def test_sync_setups_are_refused(redis_server: RedisServer, name: str) -> None:
    shared = SharedBudget(tokens(name), RedisStore(redis_server.url))
    with pytest.raises(TypeError, match="async only"), shared:
        pass
    with pytest.raises(TypeError, match="running asyncio event loop"):
        shared.start()


def test_trio_is_refused(redis_server: RedisServer, name: str) -> None:
    import trio

    shared = SharedBudget(tokens(name), RedisStore(redis_server.url))

    async def use() -> None:
        with pytest.raises(TypeError, match="asyncio only"):
            shared.start()
        with pytest.raises(TypeError, match="asyncio only"):
            await shared.sync()

    trio.run(use)


# ---------------------------------------------------------------------------
# how a local budget adopts a shared state (no Redis)


def test_a_token_budget_adopts_a_fill_then_what_it_has_not_shared() -> None:
    budget = tokens("adopt", max_tokens=10.0, ratio=0.5)
    budget.adopt(7.0)
    assert budget.tokens == 7.0
    budget.adopt(9.5, successes=3, failures=2)  # net: 9.5 + 1.5 - 2, clamped once
    assert budget.tokens == 9.0
    budget.adopt(10.0, successes=8, failures=4)  # a net zero: no drain at a full bucket
    assert budget.tokens == 10.0
    budget.adopt(42.0)  # a larger bucket elsewhere: clamped to this one
    assert budget.tokens == 10.0
    budget.adopt(0.0, failures=5)
    assert budget.tokens == 0.0


def test_a_ratio_budget_adopts_shared_buckets_by_age() -> None:
    config = RatioBudgetConfig(ratio=0.5, min_per_second=0.0, window=10.0, buckets=10)
    with fake_clock(100.0) as fake:
        budget = RatioBudget("adopt", config)
        window = [(0, 0)] * 10
        window[0] = (4, 0)  # the current bucket
        window[9] = (6, 0)  # the oldest one still in the window
        budget.adopt(window, attempts=2)  # 2 more counted here meanwhile
        assert budget.allowance() == 0.5 * 12
        fake.advance(1.0)  # the oldest bucket leaves the window
        assert budget.allowance() == 0.5 * 6
        fake.advance(10.0)
        assert budget.allowance() == 0.0


# ---------------------------------------------------------------------------
# sharing


@pytest.mark.anyio
async def test_two_processes_worth_of_failures_exhaust_both(
    stores: Callable[..., RedisStore], name: str
) -> None:
    a = SharedBudget(tokens(name), stores())
    b = SharedBudget(tokens(name), stores())
    for _ in range(3):
        a.on_attempt(False)
        b.on_attempt(False)
    # each alone holds 7 tokens: more than half of 10
    assert a.allow_retry() and b.allow_retry()
    assert await a.sync() and await b.sync() and await a.sync()
    assert held(a) == held(b) == 4.0
    assert not a.allow_retry() and not b.allow_retry()
    assert a.shared is False  # synced by hand, never started


@pytest.mark.anyio
async def test_the_script_uses_the_budgets_arithmetic(
    stores: Callable[..., RedisStore], name: str, client: aioredis.Redis
) -> None:
    a = SharedBudget(tokens(name, ratio=0.5), stores())
    b = SharedBudget(tokens(name, ratio=0.5), stores())
    for _ in range(12):
        a.on_attempt(False)  # clamped at 0, never below
    assert await a.sync()
    assert await stored(client, name) == 0.0
    for _ in range(4):
        b.on_attempt(True)
    assert await b.sync()
    assert held(b) == 2.0
    for _ in range(30):
        b.on_attempt(True)  # clamped at max_tokens
    assert await b.sync() and await a.sync()
    assert held(a) == 10.0


@pytest.mark.anyio
async def test_a_long_batch_of_balanced_outcomes_does_not_drain_the_shared_bucket(
    stores: Callable[..., RedisStore], name: str, client: aioredis.Redis
) -> None:
    # As after an outage: 600 calls that each failed once, then succeeded,
    # counted here and sent in one batch to a full shared bucket.
    shared = SharedBudget(tokens(name, max_tokens=1000.0, ratio=1.0), stores())
    assert await shared.sync()
    for _ in range(600):
        shared.on_attempt(False)
        shared.on_attempt(True)
    assert held(shared) == 1000.0
    assert await shared.sync()
    assert await stored(client, name) == 1000.0  # not 400: successes first, clamped
    assert held(shared) == 1000.0 and shared.allow_retry()


@pytest.mark.anyio
async def test_outcomes_counted_during_a_sync_stay_counted(
    stores: Callable[..., RedisStore], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = stores()
    shared = SharedBudget(tokens(name, max_tokens=100.0), store)

    async def slow(real: Any, **kwargs: Any) -> Any:
        reply = await real(**kwargs)
        shared.on_attempt(False)  # counted while the reply is on its way
        return reply

    through(monkeypatch, store, slow)
    shared.on_attempt(False)
    assert await shared.sync()
    assert held(shared) == 98.0
    monkeypatch.undo()
    assert await shared.sync()
    assert held(shared) == 98.0  # (not counted twice)


@pytest.mark.anyio
async def test_ratio_budgets_share_one_window(stores: Callable[..., RedisStore], name: str) -> None:
    config = RatioBudgetConfig(ratio=0.5, min_per_second=0.0, window=60.0, buckets=6)
    a = SharedBudget(RatioBudget(name, config), stores())
    b = SharedBudget(RatioBudget(name, config), stores())
    reference = RatioBudget("reference", config)  # one budget seeing everything
    for _ in range(10):
        a.on_attempt(True)
        reference.on_attempt(True)
    assert not b.allow_retry()  # b alone saw no requests
    assert await a.sync() and await b.sync()
    granted = 0
    while b.allow_retry():
        granted += 1
        assert reference.allow_retry()
    assert not reference.allow_retry()
    assert granted > 0
    assert await b.sync() and await a.sync()
    assert not a.allow_retry()  # b's retries used the window up for a as well
    assert allowance(a) == reference.allowance()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["tokens", "ratio"])
async def test_keys_are_namespaced_hash_tagged_and_expire(
    stores: Callable[..., RedisStore], name: str, client: aioredis.Redis, kind: str
) -> None:
    budget: TokenBudget | RatioBudget = (
        tokens(name) if kind == "tokens" else RatioBudget(name, RatioBudgetConfig(window=600.0))
    )
    shared = SharedBudget(budget, stores(prefix="myapp", key_ttl=120.0))
    shared.on_attempt(False)
    assert await shared.sync()
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await client.keys(f"*{name}*"))
    link = await link_key(client, name, prefix="myapp")
    assert re.fullmatch(rf"myapp:\{{budget:{name}\}}:link:[0-9a-f]{{16}}", link)
    assert keys == [link, f"myapp:{{budget:{name}}}:{kind}"]
    # a ratio budget's keys live at least twice its window
    ttl = 120_000 if kind == "tokens" else 1_200_000
    for key in keys:
        assert 0 < await client.pttl(key) <= ttl


# ---------------------------------------------------------------------------
# corrupt state


async def _plant_string(client: aioredis.Redis, key: str) -> None:
    await client.delete(key)
    await client.set(key, "garbage")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kind", "part", "plant", "reason"),
    [
        ("tokens", "tokens", {"t": "banana"}, "tokens do not parse"),
        ("tokens", "tokens", {"t": "-3"}, "tokens do not parse"),
        ("tokens", "tokens", {"t": "nan"}, "tokens do not parse"),
        ("tokens", "tokens", None, "state key is not a hash"),
        ("tokens", "link", {"x": "zz"}, "link counts do not parse"),
        ("ratio", "ratio", {"a0": "-1", "e0": "1", "r0": "0"}, "window counts do not parse"),
        ("ratio", "ratio", {"e3": "x"}, "window counts do not parse"),
        ("ratio", "ratio", None, "window key is not a hash"),
        ("ratio", "link", None, "link key is not a hash"),
    ],
)
async def test_a_corrupt_value_is_ignored_with_an_event(
    stores: Callable[..., RedisStore],
    name: str,
    client: aioredis.Redis,
    seen: list[Event],
    kind: str,
    part: str,
    plant: dict[str, str] | None,
    reason: str,
) -> None:
    budget: TokenBudget | RatioBudget = (
        tokens(name)
        if kind == "tokens"
        else RatioBudget(name, RatioBudgetConfig(min_per_second=0.0, window=60.0, buckets=6))
    )
    shared = SharedBudget(budget, stores())
    for _ in range(3):
        shared.on_attempt(False)
    assert await shared.sync()
    key = f"datapunk:{{budget:{name}}}:{part}"
    if part == "link":
        key = await link_key(client, name)
    if plant is None:
        await _plant_string(client, key)
    else:
        await client.hset(key, mapping=plant)  # type: ignore[arg-type]
    if part == "link":
        shared.on_attempt(True)  # (a link is read by a sync that brings news only)
    assert await shared.sync()  # Redis answered: the bad value was dropped, not trusted
    ignored = [e for e in seen if isinstance(e, BudgetCorruptStateIgnored)]
    assert [e.reason for e in ignored] == [reason]
    assert ignored[0].operation == name and ignored[0].store == "redis"
    assert count(seen, BudgetStoreFallback) == 0
    if part != "link":  # the state starts afresh
        if kind == "tokens":
            assert held(shared) == 10.0
            assert await client.hget(key, "t") == b"10"
        else:
            assert allowance(shared) == 0.0
    # and works on
    shared.on_attempt(False)
    assert await shared.sync()
    assert len([e for e in seen if isinstance(e, BudgetCorruptStateIgnored)]) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["x", "y"])
async def test_link_counts_beyond_what_was_sent_are_not_trusted(
    stores: Callable[..., RedisStore],
    name: str,
    client: aioredis.Redis,
    seen: list[Event],
    field: str,
) -> None:
    shared = SharedBudget(tokens(name), stores())
    shared.on_attempt(False)
    assert await shared.sync()
    link = await link_key(client, name)
    await client.hset(link, field, "1000000000000000")  # would swallow every later batch
    for _ in range(2):
        shared.on_attempt(False)
    assert await shared.sync()
    assert await stored(client, name) == 7.0  # 10 - 1 - 2: the batch still landed
    ignored = [e.reason for e in seen if isinstance(e, BudgetCorruptStateIgnored)]
    assert ignored == ["link counts exceed what was sent"]


@pytest.mark.anyio
async def test_a_garbage_reply_falls_back_to_local_decisions(
    stores: Callable[..., RedisStore],
    name: str,
    seen: list[Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = stores()
    shared = SharedBudget(tokens(name), store)

    async def garbage(real: Any, **kwargs: Any) -> Any:
        return [b"not", b"a", b"budget"]

    through(monkeypatch, store, garbage)
    assert not await shared.sync()
    kinds = [type(e) for e in seen]
    assert BudgetCorruptStateIgnored in kinds and BudgetStoreFallback in kinds
    for _ in range(5):  # judged locally meanwhile
        shared.on_attempt(False)
    assert not shared.allow_retry()


# ---------------------------------------------------------------------------
# cancellation


@pytest.mark.anyio
async def test_a_batch_whose_reply_was_lost_is_applied_once(
    stores: Callable[..., RedisStore],
    name: str,
    client: aioredis.Redis,
    seen: list[Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = stores(timeout=5.0)
    shared = SharedBudget(tokens(name, max_tokens=100.0), store)
    applied, lost = asyncio.Event(), asyncio.Event()

    async def applied_then_lost(real: Any, **kwargs: Any) -> Any:
        await real(**kwargs)  # Redis applied the batch...
        applied.set()
        await lost.wait()
        raise ConnectionError("connection lost before the reply")  # ...and its reply is lost

    through(monkeypatch, store, applied_then_lost)
    for _ in range(5):
        shared.on_attempt(False)
    syncing = asyncio.create_task(shared.sync())
    await applied.wait()
    syncing.cancel()  # the caller gives up on the reply
    with pytest.raises(asyncio.CancelledError):
        await syncing
    lost.set()
    monkeypatch.undo()
    shared.on_attempt(False)
    assert await shared.sync()  # resends the first batch with the new outcome
    assert await stored(client, name) == 94.0
    assert held(shared) == 94.0
    assert count(seen, BudgetStoreFallback) == 0  # a cancellation is not an outage


@pytest.mark.anyio
async def test_cancelling_syncs_anywhere_never_corrupts_the_state(
    stores: Callable[..., RedisStore], name: str, client: aioredis.Redis, seen: list[Event]
) -> None:
    # far from both ends of the bucket, so the arithmetic is order-independent
    shared = SharedBudget(tokens(name, max_tokens=10_000.0, ratio=0.5), stores())
    for _ in range(5000):
        shared.on_attempt(False)
    assert await shared.sync()
    rng = random.Random(20240611)
    failures, successes = 5000, 0
    cancelled = 0
    for _ in range(150):
        for _ in range(rng.randint(0, 4)):
            ok = rng.random() < 0.4
            shared.on_attempt(ok)
            successes += ok
            failures += not ok
        task = asyncio.create_task(shared.sync())
        for _ in range(rng.randint(0, 8)):
            await asyncio.sleep(0)
        cancelled += task.cancel()
        await asyncio.wait([task])
    assert cancelled > 0
    assert await shared.sync()
    expected = 10_000.0 - failures + 0.5 * successes
    assert await stored(client, name) == pytest.approx(expected, abs=1e-9)
    assert held(shared) == pytest.approx(expected, abs=1e-9)
    assert count(seen, BudgetCorruptStateIgnored) == 0
    assert count(seen, BudgetStoreFallback) == 0


# ---------------------------------------------------------------------------
# the background sync


@pytest.mark.anyio
async def test_the_sync_task_brings_in_other_processes_failures(
    stores: Callable[..., RedisStore], name: str
) -> None:
    async with SharedBudget(tokens(name), stores(), sync_interval=0.02) as shared:
        await until(lambda: shared.shared, "first sync")
        other = SharedBudget(tokens(name), stores())
        for _ in range(5):
            other.on_attempt(False)
        assert await other.sync()
        await until(lambda: not shared.allow_retry(), "exhaustion seen")
    assert not shared.shared  # closed: decides alone again


@pytest.mark.anyio
async def test_enough_waiting_outcomes_wake_the_sync_from_any_thread(
    stores: Callable[..., RedisStore], name: str
) -> None:
    # a sync interval far longer than the test: every sync seen is a wake-up
    async with SharedBudget(
        tokens(name, max_tokens=100.0), stores(), sync_interval=600.0, max_unsynced=3
    ) as shared:
        await until(lambda: shared.syncs == 1, "first sync")
        for _ in range(3):
            shared.on_attempt(False)
        await until(lambda: shared.syncs == 2, "woken from the loop's thread")

        def from_a_thread() -> None:
            for _ in range(3):
                shared.on_attempt(False)

        await asyncio.to_thread(from_a_thread)
        await until(lambda: shared.syncs == 3, "woken from another thread")
    reader = SharedBudget(tokens(name, max_tokens=100.0), stores())
    assert await reader.sync()
    assert held(reader) == 94.0


@pytest.mark.anyio
async def test_closing_pushes_what_is_waiting(stores: Callable[..., RedisStore], name: str) -> None:
    async with SharedBudget(tokens(name), stores(), sync_interval=600.0) as shared:
        await until(lambda: shared.syncs == 1, "first sync")
        for _ in range(5):
            shared.on_attempt(False)
    reader = SharedBudget(tokens(name), stores())
    assert await reader.sync()
    assert not reader.allow_retry()


@pytest.mark.anyio
async def test_the_retry_engine_obeys_a_budget_exhausted_elsewhere(
    stores: Callable[..., RedisStore], name: str
) -> None:
    calls = 0

    async with SharedBudget(tokens(name), stores(), sync_interval=0.02) as shared:

        @retry(RetryConfig(max_attempts=5, base_delay=0.0, max_delay=0.0), budget=shared)
        async def flaky() -> None:
            nonlocal calls
            calls += 1
            raise ConnectionError("down")

        other = SharedBudget(tokens(name), stores())
        for _ in range(5):
            other.on_attempt(False)
        assert await other.sync()
        await until(lambda: not shared.allow_retry(), "exhaustion seen")
        with pytest.raises(ConnectionError):
            await flaky()
    assert calls == 1  # the budget refused the first retry


# ---------------------------------------------------------------------------
# outages, through the fault proxy


class Flaky(ConnectionError):
    pass


@pytest.mark.anyio
async def test_blackholed_redis_never_fails_a_call_and_sharing_resumes(
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
    name: str,
    stores: Callable[..., RedisStore],
    redis_server: RedisServer,
    seen: list[Event],
) -> None:
    proxy = make_proxy(redis_server.address)
    store = stores(proxied(proxy), timeout=0.1, retry_interval=0.0)
    async with SharedBudget(tokens(name, max_tokens=1000.0), store, sync_interval=0.01) as shared:
        attempts = 0

        @retry(RetryConfig(max_attempts=3, base_delay=0.0, max_delay=0.0), budget=shared)
        async def call() -> str:
            nonlocal attempts
            attempts += 1
            if attempts % 2:
                raise Flaky("one in two attempts fails")
            return "ok"

        await until(lambda: shared.shared, "first sync")
        proxy.blackhole()
        while not count(seen, BudgetStoreFallback):
            assert await call() == "ok"  # calls never wait for Redis
            await asyncio.sleep(0.005)
        fallbacks = [e for e in seen if isinstance(e, BudgetStoreFallback)]
        assert len(fallbacks) == 1 and fallbacks[0].mode == "local"
        assert fallbacks[0].error_type == "TimeoutError"  # the type name only
        for _ in range(5):
            assert await call() == "ok"
        proxy.clear()
        proxy.reset_all()  # the blackholed connections are useless now
        while not count(seen, BudgetStoreResumed):
            assert await call() == "ok"
            await asyncio.sleep(0.005)
        assert [e.outage > 0 for e in seen if isinstance(e, BudgetStoreResumed)] == [True]
        # sharing resumed: failures reported straight to Redis are seen here
        other = SharedBudget(tokens(name, max_tokens=1000.0), stores())
        for _ in range(600):
            other.on_attempt(False)
        assert await other.sync()
        await until(lambda: not shared.allow_retry(), "exhaustion seen after resuming")


@pytest.mark.anyio
async def test_fail_closed_refuses_retries_while_redis_is_away(
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
    name: str,
    stores: Callable[..., RedisStore],
    redis_server: RedisServer,
    seen: list[Event],
) -> None:
    proxy = make_proxy(redis_server.address)
    store = stores(proxied(proxy), timeout=0.1, retry_interval=60.0)
    shared = SharedBudget(tokens(name), store, on_unavailable="closed")
    assert await shared.sync()
    assert shared.allow_retry()
    proxy.stop_listening()
    proxy.reset_all()
    assert not await shared.sync()  # no error escapes
    assert not shared.allow_retry()
    refused = [e for e in seen if isinstance(e, BudgetRefused)]
    assert refused and refused[-1].limit == float("inf")
    assert [e.mode for e in seen if isinstance(e, BudgetStoreFallback)] == ["closed"]


@pytest.mark.drill
@pytest.mark.anyio
async def test_drill_blackhole_reset_restart_mid_run(
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
    name: str,
    stores: Callable[..., RedisStore],
    redis_server: RedisServer,
    seen: list[Event],
) -> None:
    """Callers keep retrying while Redis misbehaves; none fails because of Redis."""
    proxy = make_proxy(redis_server.address)
    store = stores(proxied(proxy), timeout=0.1, retry_interval=0.05)
    budget = tokens(name, max_tokens=1000.0, ratio=1.0)
    failures: list[BaseException] = []
    calls = 0
    stop = asyncio.Event()

    async with SharedBudget(budget, store, sync_interval=0.02) as shared:
        attempts = 0

        @retry(RetryConfig(max_attempts=3, base_delay=0.0, max_delay=0.0), budget=shared)
        async def call() -> str:
            # A zero delay does not yield: a call's attempts run back to back,
            # so every other call fails once and its retry succeeds.
            nonlocal attempts
            attempts += 1
            if attempts % 2:
                raise Flaky("retried")
            return "ok"

        async def caller() -> None:
            nonlocal calls
            while not stop.is_set():
                try:
                    assert await call() == "ok"
                    calls += 1
                except BaseException as exc:  # anything at all is a test failure
                    failures.append(exc)
                    raise
                await asyncio.sleep(0.002)

        async def events_of(kind: type[Event], n: int) -> None:
            await until(lambda: count(seen, kind) >= n, f"{n} x {kind.__name__}", tries=1000)

        tasks = [asyncio.create_task(caller()) for _ in range(8)]
        try:
            await until(lambda: shared.shared and calls > 20, "calls flowing, shared")
            proxy.blackhole()
            await events_of(BudgetStoreFallback, 1)
            proxy.clear()
            proxy.reset_all()
            await events_of(BudgetStoreResumed, 1)
            proxy.reset_all()  # connections cut mid-run
            flowing = calls
            await until(lambda: calls > flowing + 10, "calls flowing again")
            redis_server.restart()  # the shared state is lost with the data
            await until(lambda: shared.shared and shared.syncs > 0, "syncing after restart")
            synced = shared.syncs
            await until(lambda: shared.syncs > synced + 1, "two more syncs")
            stop.set()  # (callers that fail now would be refused: on purpose, below)
            await asyncio.gather(*tasks)
            # sharing works again: failures reported elsewhere are seen here
            other = SharedBudget(tokens(name, max_tokens=1000.0, ratio=1.0), stores())
            for _ in range(900):
                other.on_attempt(False)
            assert await other.sync()
            await until(lambda: not shared.allow_retry(), "exhaustion seen after restart")
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    assert not failures, failures
    # every call took exactly its one retry: the budget (shared, local or
    # syncing again) granted each, whatever Redis did meanwhile
    assert calls > 0 and attempts == 2 * calls


# ---------------------------------------------------------------------------
# several OS processes sharing one budget


_CHILDREN = 3
_SYNC = 0.05


def _child(url: str, name: str, go: Any, all_pushed: Any, out: Any) -> None:
    """A process holding its own shared budget: fail twice, then watch."""
    asyncio.run(_child_main(url, name, go, all_pushed, out))


async def _child_main(url: str, name: str, go: Any, all_pushed: Any, out: Any) -> None:
    async def wait_for(flag: Any) -> None:
        for _ in range(3000):
            if flag.is_set():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("never told")

    store = RedisStore(url)
    try:
        async with SharedBudget(tokens(name), store, sync_interval=_SYNC) as shared:
            for _ in range(3000):
                if shared.syncs:
                    break
                await asyncio.sleep(0.005)
            out.put(("ready", shared.syncs))
            await wait_for(go)
            shared.on_attempt(False)
            shared.on_attempt(False)
            alone = shared.allow_retry()  # 8 (or fewer) tokens here: allowed
            # the first sync that *starts* after the failures carries them
            counted = shared.syncs
            for _ in range(3000):
                if shared.syncs >= counted + 2:
                    break
                await asyncio.sleep(0.002)
            out.put(("pushed", alone))
            await wait_for(all_pushed)
            seen_at = shared.syncs
            while shared.allow_retry():
                if shared.syncs > seen_at + 10:
                    break
                await asyncio.sleep(0.001)
            out.put(("exhausted", shared.syncs - seen_at, shared.allow_retry()))
    except Exception as exc:
        out.put(("error", type(exc).__name__))
    finally:
        await store.aclose()


@pytest.mark.drill
def test_processes_all_see_the_budget_exhausted_within_the_lag_bound(
    name: str, redis_server: RedisServer
) -> None:
    """Three processes fail twice each: none alone exhausts the budget, all see it exhausted."""
    ctx = multiprocessing.get_context("spawn")
    go, all_pushed = ctx.Event(), ctx.Event()
    out: Any = ctx.Queue()
    children = [
        ctx.Process(target=_child, args=(redis_server.url, name, go, all_pushed, out))
        for _ in range(_CHILDREN)
    ]
    for child in children:
        child.start()

    def gather(kind: str) -> list[tuple[Any, ...]]:
        got = []
        for _ in range(_CHILDREN):
            try:
                report = out.get(timeout=15)
            except queue.Empty:
                raise AssertionError(f"a child never reported {kind!r}") from None
            assert report[0] == kind, report
            got.append(report)
        return got

    try:
        gather("ready")
        go.set()
        pushed = gather("pushed")
        assert all(alone for _, alone in pushed)  # no process exhausted it alone
        all_pushed.set()
        # 6 failures in 10 tokens: 4 left, not more than half.  Lag bound, in
        # syncs: the sync running when the last failure reached Redis may have
        # read before it; the next one brings it in.
        for _, syncs_after, still_allowed in gather("exhausted"):
            assert not still_allowed
            assert syncs_after <= 2
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
                child.join()
    assert all(child.exitcode == 0 for child in children)


# ---------------------------------------------------------------------------
# never hang (issue 18)


@pytest.mark.anyio
async def test_aclose_returns_when_the_driver_swallows_the_cancellation_of_a_sync(
    stores: Callable[..., RedisStore], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hang of 8 processes sharing a budget: a cancellation landing as the
    # reply arrives was swallowed inside the driver, so the sync loop carried
    # on to its next wait and aclose() waited for it for ever.
    store = stores(timeout=0.3)
    shared = SharedBudget(tokens(name), store, sync_interval=0.01)
    inside, never = asyncio.Event(), asyncio.Event()

    async def swallowing(real: Any, **kwargs: Any) -> Any:
        inside.set()
        with contextlib.suppress(asyncio.CancelledError):  # the driver swallows it...
            await never.wait()
        return await real(**kwargs)  # ...and answers

    shared.on_attempt(False)
    through(monkeypatch, store, swallowing)
    shared.start()
    await inside.wait()
    async with asyncio.timeout(5):  # (a hang fails here instead of stalling the suite)
        await shared.aclose()
    assert not shared.syncing


@pytest.mark.anyio
async def test_aclose_returns_when_the_sync_task_ignores_cancellation(
    stores: Callable[..., RedisStore], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = stores(timeout=0.2)
    shared = SharedBudget(tokens(name), store, sync_interval=0.01)
    inside, done = asyncio.Event(), asyncio.Event()

    async def stubborn(real: Any, **kwargs: Any) -> Any:
        inside.set()
        while not done.is_set():
            try:
                await done.wait()
            except asyncio.CancelledError:
                continue  # never ends while the test runs
        return None

    through(monkeypatch, store, stubborn)
    shared.start()
    await inside.wait()
    try:
        async with asyncio.timeout(5):
            await shared.aclose()
            await store.aclose()
        assert store.closed
    finally:
        done.set()


# ---------------------------------------------------------------------------
# Redis blinks: what was counted meanwhile is merged, never lost (issue 14 item 7)


async def _commands(client: aioredis.Redis) -> int:
    info = await client.info("stats")
    return int(info["total_commands_processed"])


@pytest.mark.anyio
async def test_an_idle_shared_budget_sends_nothing(private_redis: RedisServer, name: str) -> None:
    store = RedisStore(private_redis.url)
    watcher = aioredis.Redis.from_url(private_redis.url)
    try:
        async with SharedBudget(tokens(name), store, sync_interval=0.001) as shared:
            await until(lambda: shared.syncs == 1, "the first sync")
            before = await _commands(watcher)
            loop = asyncio.get_running_loop()
            start, pings = loop.time(), 0
            # fifty sync intervals of real work, during which the sync task goes idle
            # (nothing counted: nothing to send): a budget syncing on a timer would send 50
            while loop.time() - start < 50 * shared.sync_interval:
                await watcher.ping()
                pings += 1
            used = await _commands(watcher) - before - pings - 1  # (less the INFO above)
            assert used == 0, f"an idle budget sent {used} commands"
            assert shared.syncs == 1
            shared.on_attempt(True)  # the first use after idling syncs at once
            await until(lambda: shared.syncs == 2, "woken by the first outcome")
    finally:
        await store.aclose()
        await watcher.aclose()


@pytest.mark.anyio
async def test_a_busy_shared_budget_sends_one_sync_per_interval_however_many_outcomes(
    private_redis: RedisServer, name: str
) -> None:
    store = RedisStore(private_redis.url)
    watcher = aioredis.Redis.from_url(private_redis.url)
    try:
        # an interval far longer than the test: every sync seen is a wake-up
        budget = tokens(name, max_tokens=1000.0)
        async with SharedBudget(budget, store, sync_interval=600.0) as shared:
            await until(lambda: shared.syncs == 1, "first sync")
            before = await _commands(watcher)
            for _ in range(1000):
                shared.on_attempt(True)
                assert shared.allow_retry()
            for _ in range(20):
                await asyncio.sleep(0)  # (the sync task gets its turns)
            assert shared.syncs == 1  # a thousand outcomes wait for the interval
        assert shared.syncs == 2  # closing pushed them, in one sync
        used = await _commands(watcher) - before - 1  # (less the INFO above)
        assert used <= 7, f"{used} commands for 1,000 outcomes"
    finally:
        await store.aclose()
        await watcher.aclose()


async def sync_when_back(shared: SharedBudget, tries: int = 300) -> None:
    """Bounded polling: a sync succeeds within ``tries`` short looks."""
    for _ in range(tries):
        if await shared.sync():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("Redis never answered again")


@pytest.mark.anyio
async def test_failures_counted_while_redis_is_paused_reach_the_shared_budget(
    stores: Callable[..., RedisStore], name: str, client: aioredis.Redis, seen: list[Event]
) -> None:
    shared = SharedBudget(tokens(name), stores(timeout=0.1, retry_interval=0.0))
    other = SharedBudget(tokens(name), stores())  # another replica
    assert await shared.sync()
    await client.execute_command("CLIENT", "PAUSE", "400", "ALL")
    for _ in range(3):
        shared.on_attempt(False)
    assert not await shared.sync()  # this batch's sync times out...
    for _ in range(3):
        shared.on_attempt(False)  # ...and more failures come during the outage
    assert count(seen, BudgetStoreFallback) == 1
    await sync_when_back(shared)
    assert await stored(client, name) == 4.0  # merged, not overwritten by the old 10
    assert held(shared) == 4.0
    assert not shared.allow_retry()  # still drained: retries refused
    assert await other.sync()
    assert held(other) == 4.0 and not other.allow_retry()


@pytest.mark.anyio
async def test_a_batch_whose_sync_timed_out_is_applied_once(
    stores: Callable[..., RedisStore], name: str, client: aioredis.Redis
) -> None:
    # The paused sync does land once the pause ends; the next one resends it.
    shared = SharedBudget(tokens(name), stores(timeout=0.1, retry_interval=0.0))
    assert await shared.sync()
    await client.execute_command("CLIENT", "PAUSE", "300", "WRITE")
    for _ in range(2):
        shared.on_attempt(False)
    assert not await shared.sync()
    await sync_when_back(shared)
    assert await stored(client, name) == 8.0
    assert held(shared) == 8.0


@pytest.mark.anyio
async def test_an_empty_restart_does_not_refill_a_drained_budget(
    private_redis: RedisServer, stores: Callable[..., RedisStore], name: str
) -> None:
    shared = SharedBudget(tokens(name), stores(private_redis.url, retry_interval=0.0))
    for _ in range(6):
        shared.on_attempt(False)
    assert await shared.sync()
    assert held(shared) == 4.0 and not shared.allow_retry()
    private_redis.restart()  # empty: the bucket is gone
    shared.on_attempt(False)  # one more failure during the blink
    await sync_when_back(shared)
    assert held(shared) == 3.0 and not shared.allow_retry()
    other = SharedBudget(tokens(name), stores(private_redis.url))
    assert await other.sync()
    assert held(other) == 3.0  # every replica sees it drained, not full


@pytest.mark.anyio
async def test_an_empty_restart_keeps_the_retries_a_ratio_budget_granted(
    private_redis: RedisServer, stores: Callable[..., RedisStore], name: str
) -> None:
    config = RatioBudgetConfig(ratio=0.1, min_per_second=0.0, window=60.0, buckets=6)
    shared = SharedBudget(RatioBudget(name, config), stores(private_redis.url, retry_interval=0.0))
    for _ in range(40):
        shared.on_attempt(True)
    assert shared.allow_retry() and shared.allow_retry() and shared.allow_retry()
    assert not shared.allow_retry()  # the window's allowance is spent
    assert await shared.sync()
    private_redis.restart()
    await sync_when_back(shared)
    assert not shared.allow_retry()  # the window was not emptied by the restart
    other = SharedBudget(RatioBudget(name, config), stores(private_redis.url))
    assert await other.sync()
    assert not other.allow_retry()
