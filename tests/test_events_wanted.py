"""Every primitive builds an event only for a subscriber that wants its kind.

Subscribers declare the kinds they want; a call that nobody wants the events
of must build none, whoever else listens (a metrics exporter wanting only
the rare kinds, a logging exporter at WARNING).  A subscriber added or
removed between calls takes effect at the next call, and a catch-all
subscriber still gets everything.  Events are counted where they are built:
each event class's constructor is wrapped for the test.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

import datapunk_recovery
from datapunk_recovery import RetryConfig, retry
from datapunk_recovery._core.events import Event, event_kinds, subscribe
from datapunk_recovery.breaker import BreakerConfig, CircuitBreaker
from datapunk_recovery.cache import CacheConfig, FunctionSource, MemoryCache, ReadThroughCache
from datapunk_recovery.flow.bulkhead import Bulkhead, BulkheadConfig
from datapunk_recovery.flow.fallback import Fallback
from datapunk_recovery.flow.hedging import HedgeConfig, Hedger
from datapunk_recovery.flow.pipeline import Pipeline
from datapunk_recovery.flow.ratelimit import RateLimiter, RateLimiterConfig
from datapunk_recovery.network import Endpoint, Router, RouterConfig
from datapunk_recovery.resource import PoolConfig, ResourcePool
from datapunk_recovery.testing import fake_clock

RARE = "resource.leak"
"""A kind none of the calls below report: what a subscriber of rare kinds asks for."""


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Event names -> how many events of that kind were constructed."""
    for module in pkgutil.walk_packages(datapunk_recovery.__path__, "datapunk_recovery."):
        if not module.name.startswith(("datapunk_recovery.demo", "datapunk_recovery.telemetry")):
            importlib.import_module(module.name)
    counts: Counter[str] = Counter()
    classes: set[type[Event]] = set()
    pending: list[type[Event]] = [Event]
    while pending:
        klass = pending.pop()
        pending.extend(klass.__subclasses__())
        if klass.__module__.startswith("datapunk_recovery.") and klass is not Event:
            classes.add(klass)
    for klass in classes:
        init = vars(klass)["__init__"]

        def counting(self: Event, *a: Any, _init: Any = init, **k: Any) -> None:
            counts[type(self).name] += 1
            _init(self, *a, **k)

        monkeypatch.setattr(klass, "__init__", counting)
    library = {n for n, k in event_kinds().items() if k.__module__.startswith("datapunk_recovery.")}
    assert {k.name for k in classes} >= library and "retry.call" in library
    return counts


@pytest.fixture(autouse=True)
def _clock() -> Iterator[None]:
    with fake_clock():
        yield


def ok() -> str:
    return "ok"


async def aok() -> str:
    return "ok"


def sync_calls() -> dict[str, Callable[[], object]]:
    """One successful call through each sync primitive (built afresh per test)."""
    retried = retry(RetryConfig(max_attempts=3), name="engine")(ok)
    bulkhead = Bulkhead("bulkhead", BulkheadConfig(max_concurrent=4))
    limiter = RateLimiter("limiter", RateLimiterConfig(rate=1000.0, burst=1000))
    fallback: Fallback[str] = Fallback("fallback", name="fallback")
    breaker = CircuitBreaker("breaker", BreakerConfig(consecutive_failures=5))
    pipeline = Pipeline(
        "pipeline",
        bulkhead=BulkheadConfig(max_concurrent=4),
        limiter=RateLimiterConfig(rate=1000.0, burst=1000),
        retry=RetryConfig(max_attempts=3),
    )
    return {
        "engine": retried,
        "bulkhead": lambda: bulkhead.call(ok),
        "limiter": lambda: limiter.call(ok),
        "fallback": lambda: fallback.call(ok),
        "breaker": lambda: breaker.call(ok),
        "pipeline": lambda: pipeline.call(ok),
    }


def async_calls() -> dict[str, Callable[[], Awaitable[object]]]:
    """One successful call through each async-only primitive."""
    hedger = Hedger("hedger", HedgeConfig(delay=30.0))
    router = Router("router", [Endpoint("a")], RouterConfig(retry=RetryConfig(max_attempts=2)))
    cache: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(lambda key: aok()), MemoryCache(), CacheConfig()
    )
    pool: ResourcePool[None] = ResourcePool("pool", PoolConfig(capacity=4))

    async def use_pool() -> None:
        async with pool.acquire(1):
            pass

    async def endpoint(e: Endpoint) -> str:
        return e.name

    return {
        "hedger": lambda: hedger.call_async(aok),
        "router": lambda: router.call(endpoint),
        "cache": lambda: cache.get("key"),
        "pool": use_pool,
    }


SYNC = list(sync_calls())
ASYNC = list(async_calls())


@pytest.mark.parametrize("primitive", SYNC)
def test_a_successful_call_builds_no_event_for_a_subscriber_of_other_kinds(
    built: Counter[str], primitive: str
) -> None:
    call = sync_calls()[primitive]
    call()  # warm up: caches filled, first-use work done
    got: list[Event] = []
    unsubscribe = subscribe(got.append, kinds={RARE})
    try:
        built.clear()
        call()
        call()
    finally:
        unsubscribe()
    assert (dict(built), got) == ({}, [])


@pytest.mark.anyio
@pytest.mark.parametrize("primitive", ASYNC)
async def test_a_successful_async_call_builds_no_event_for_a_subscriber_of_other_kinds(
    built: Counter[str], primitive: str
) -> None:
    call = async_calls()[primitive]
    await call()  # warm up: the cache's first read is a miss, later ones hit
    got: list[Event] = []
    unsubscribe = subscribe(got.append, kinds={RARE})
    try:
        built.clear()
        await call()
        await call()
    finally:
        unsubscribe()
    assert (dict(built), got) == ({}, [])


PER_CALL = {
    "engine": "retry.call",
    "bulkhead": "bulkhead.admitted",
    "limiter": "ratelimit.admitted",
    "breaker": "breaker.outcome",
    "pipeline": "pipeline.stage",
}
"""The kind each primitive reports for a successful call (those that report one)."""


@pytest.mark.parametrize("primitive", list(PER_CALL))
def test_a_subscriber_added_then_removed_between_calls_takes_effect_at_the_next_call(
    built: Counter[str], primitive: str
) -> None:
    call, kind = sync_calls()[primitive], PER_CALL[primitive]
    wanted: list[str] = []
    rare = subscribe(lambda e: None, kinds={RARE})  # someone listens throughout
    try:
        call()
        unsubscribe = subscribe(lambda e: wanted.append(e.name), kinds={kind})
        call()
        assert wanted and set(wanted) == {kind}
        unsubscribe()
        wanted.clear()
        built.clear()
        call()
    finally:
        rare()
    assert (wanted, dict(built)) == ([], {})


@pytest.mark.parametrize("primitive", SYNC)
def test_a_catch_all_subscriber_still_gets_every_event_of_a_call(
    built: Counter[str], primitive: str
) -> None:
    call = sync_calls()[primitive]
    got: list[str] = []
    unsubscribe = subscribe(lambda e: got.append(e.name))
    try:
        built.clear()
        call()
    finally:
        unsubscribe()
    assert Counter(got) == built
    if primitive in PER_CALL:
        assert PER_CALL[primitive] in got


@pytest.mark.parametrize("primitive", ["engine", "bulkhead", "pipeline"])
def test_a_subscriber_added_and_removed_while_another_thread_calls_takes_effect_at_once(
    primitive: str,
) -> None:
    import threading

    call, kind = sync_calls()[primitive], PER_CALL[primitive]
    if primitive == "pipeline":  # no rate limiter: the fake clock never refills it
        pipeline = Pipeline("pipeline", bulkhead=BulkheadConfig(max_concurrent=4))
        call = lambda: pipeline.call(ok)  # noqa: E731
    phase = [0]  # 0: before subscribing, 1: subscribed, 2: unsubscribed
    started: list[tuple[int, int]] = []  # (call number, phase when it started)
    delivered: set[int] = set()
    current = [0]
    enough = [threading.Event(), threading.Event()]
    stop = threading.Event()

    def worker() -> None:
        seen = [0, 0, 0]
        while not stop.is_set():
            current[0] += 1
            now = phase[0]
            started.append((current[0], now))
            call()
            seen[now] += 1
            if now and seen[now] >= 50:
                enough[now - 1].set()

    def subscriber(event: Event) -> None:
        delivered.add(current[0])  # delivered in the calling thread, during its call

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        unsubscribe = subscribe(subscriber, kinds={kind})
        phase[0] = 1
        assert enough[0].wait(10.0)
        unsubscribe()
        phase[0] = 2
        assert enough[1].wait(10.0)
    finally:
        stop.set()
        thread.join()
    after_subscribe = {n for n, p in started if p == 1}
    after_unsubscribe = {n for n, p in started if p == 2}
    # The last call started before the unsubscription may end after it: either way.
    assert after_subscribe - {max(after_subscribe)} <= delivered
    assert not (after_unsubscribe & delivered)


def rare_paths(clock: Any) -> dict[str, tuple[Callable[[], object], str]]:
    """A call through each primitive's rarer path, and the kind it reports."""
    from datapunk_recovery._execution.timeout import AttemptTimeout

    fallback: Fallback[str] = Fallback("fallback", name="fallback")
    timeout = AttemptTimeout(0.5, name="timeout")

    def fails() -> str:
        raise ConnectionError("down")

    def overruns() -> str:
        clock.advance(1.0)
        return "ok"

    def used() -> object:
        return fallback.call(fails)

    def overran() -> object:
        return timeout.call(overruns)

    return {
        "fallback": (used, "fallback.used"),
        "timeout": (overran, "timeout.overran"),
    }


@pytest.mark.parametrize("path", ["fallback", "timeout"])
def test_a_rarer_path_builds_its_event_only_for_a_subscriber_of_its_kind(
    built: Counter[str], path: str
) -> None:
    with fake_clock() as clock:
        call, kind = rare_paths(clock)[path]
        unsubscribe = subscribe(lambda e: None, kinds={RARE})
        try:
            built.clear()
            call()
            assert dict(built) == {}
        finally:
            unsubscribe()
        got: list[str] = []
        unsubscribe = subscribe(lambda e: got.append(e.name), kinds={kind})
        try:
            call()
        finally:
            unsubscribe()
    assert kind in got and built[kind] == got.count(kind)
