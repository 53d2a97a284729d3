"""The read-through recovery, with the embedded cache and a cache that fails on demand.

Runs under asyncio and trio: the recovery itself needs neither Redis nor asyncio.
Time is a fake clock; nothing sleeps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import pytest

from datapunk_recovery._core import events
from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._core.events import Event
from datapunk_recovery.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    OutcomeRecorded,
    Permit,
)
from datapunk_recovery.cache import (
    CacheConfig,
    CacheFailed,
    CacheRecovered,
    FunctionSource,
    HotKeySketch,
    JsonCodec,
    MemoryCache,
    PickleCodec,
    ReadThroughCache,
    RepairQueued,
    StaleServed,
    WarmHottest,
    WarmKeys,
)
from datapunk_recovery.cache.recovering import AUTH_RETRY_INTERVAL
from datapunk_recovery.testing import fake_clock

pytestmark = pytest.mark.anyio


class FlakyCache(MemoryCache):
    """A memory cache that fails every call while ``down`` (like a dead Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("cache is down")

    async def get(self, key: str) -> Any | None:
        self._check()
        return await super().get(key)

    async def set(self, key: str, value: Any, ttl: float) -> None:
        self._check()
        await super().set(key, value, ttl)

    async def delete(self, keys: Sequence[str]) -> None:
        self._check()
        await super().delete(keys)

    async def incr(self, key: str) -> int:
        self._check()
        return await super().incr(key)

    async def counter(self, key: str) -> int:
        self._check()
        return await super().counter(key)


class Database:
    """A source of truth that counts loads and can fail."""

    def __init__(self) -> None:
        self.rows: dict[str, Any] = {}
        self.loads = 0
        self.failing = False
        self.gate: anyio.Event | None = None

    async def load(self, key: str) -> Any:
        self.loads += 1
        value = self.rows.get(key)  # read now, answered after the gate opens
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise ConnectionResetError("database unreachable")
        return value


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock(start=1000.0) as fake:
        yield fake


@pytest.fixture
def db() -> Database:
    database = Database()
    database.rows.update({f"k{i}": {"n": i} for i in range(20)})
    return database


def make(
    db: Database, cache: MemoryCache | None = None, **config: Any
) -> tuple[ReadThroughCache[Any], list[Event]]:
    config.setdefault("breaker", BreakerConfig(consecutive_failures=2, open_duration=5.0))
    rtc: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(db.load),
        cache if cache is not None else MemoryCache(),
        CacheConfig(**config),
    )
    seen: list[Event] = []
    rtc.bus.subscribe(seen.append)
    return rtc, seen


async def test_a_miss_loads_from_the_source_and_the_next_read_hits(
    db: Database, clock: FakeClock
) -> None:
    rtc, _ = make(db)
    first = await rtc.lookup("k1")
    second = await rtc.lookup("k1")
    assert (first.value, first.origin) == ({"n": 1}, "source")
    assert (second.value, second.origin) == ({"n": 1}, "cache")
    assert db.loads == 1
    assert await rtc.get("nope") is None  # absent in the source: None, not cached
    assert await rtc.get("nope") is None and db.loads == 3


async def test_concurrent_misses_of_one_key_make_one_source_load(db: Database) -> None:
    rtc, _ = make(db)
    db.gate = anyio.Event()
    results: list[Any] = []

    async def reader() -> None:
        results.append(await rtc.get("k3"))

    async with anyio.create_task_group() as tg:
        for _ in range(25):
            tg.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        db.gate.set()
    assert results == [{"n": 3}] * 25
    assert db.loads == 1
    assert rtc.stats().shared_loads == 24


async def test_a_cancelled_leader_does_not_strand_its_followers(db: Database) -> None:
    rtc, _ = make(db)
    db.gate = anyio.Event()
    results: list[Any] = []

    async def follower() -> None:
        results.append(await rtc.get("k4"))

    async with anyio.create_task_group() as outer:
        async with anyio.create_task_group() as leader:
            leader.start_soon(rtc.get, "k4")
            await anyio.wait_all_tasks_blocked()
            outer.start_soon(follower)
            await anyio.wait_all_tasks_blocked()
            leader.cancel_scope.cancel()  # the leader goes; the follower must lead anew
        db.gate.set()
    assert results == [{"n": 4}]
    assert db.loads == 2


async def test_a_cancelled_follower_leaves_its_leader_and_the_other_followers_loading(
    db: Database,
) -> None:
    rtc, _ = make(db)
    db.gate = anyio.Event()
    results: list[Any] = []

    async def reader() -> None:
        results.append(await rtc.get("k5"))

    async with anyio.create_task_group() as outer:
        outer.start_soon(reader)  # the leader
        await anyio.wait_all_tasks_blocked()
        async with anyio.create_task_group() as quitter:
            quitter.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            quitter.cancel_scope.cancel()  # a follower goes; the load must go on
        outer.start_soon(reader)  # a follower that stays
        await anyio.wait_all_tasks_blocked()
        db.gate.set()
    assert results == [{"n": 5}, {"n": 5}]
    assert db.loads == 1
    assert rtc.stats().shared_loads == 1


async def test_a_dead_cache_sends_reads_to_the_source_and_its_breaker_opens(
    db: Database, clock: FakeClock
) -> None:
    flaky = FlakyCache()
    rtc, seen = make(db, flaky)
    await rtc.get("k1")
    flaky.down = True
    for _ in range(10):
        assert await rtc.get("k1") == {"n": 1}  # every read right, none raises
    calls_while_down = flaky.calls
    assert await rtc.get("k2") == {"n": 2}
    assert flaky.calls == calls_while_down  # the breaker is open: the cache is not even called
    failures = rtc.stats().failures
    assert failures["refused"] == 2 and failures["open"] >= 9
    assert {e.kind for e in seen if isinstance(e, CacheFailed)} == {"refused", "open"}


async def test_after_the_breaker_lets_a_probe_through_reads_come_from_the_cache_again(
    db: Database, clock: FakeClock
) -> None:
    flaky = FlakyCache()
    rtc, seen = make(db, flaky)
    await rtc.get("k1")
    flaky.down = True
    await rtc.get("k1")
    await rtc.get("k1")
    flaky.down = False
    clock.advance(5.0)  # the breaker's open time passes
    assert (await rtc.lookup("k1")).origin == "cache"
    assert any(isinstance(e, CacheRecovered) for e in seen)


async def test_stale_if_error_serves_an_expired_entry_and_says_so(
    db: Database, clock: FakeClock
) -> None:
    rtc, seen = make(db, ttl=10.0, stale_for=30.0)
    await rtc.get("k5")
    clock.advance(15.0)  # past the ttl, within the stale window
    db.failing = True
    answer = await rtc.lookup("k5")
    assert (answer.value, answer.origin, answer.stale) == ({"n": 5}, "stale", True)
    assert [e.error_type for e in seen if isinstance(e, StaleServed)] == ["ConnectionResetError"]
    clock.advance(30.0)  # past the stale window too: the source's error surfaces
    with pytest.raises(ConnectionResetError):
        await rtc.get("k5")


async def test_an_expired_entry_is_refreshed_when_the_source_works(
    db: Database, clock: FakeClock
) -> None:
    rtc, _ = make(db, ttl=10.0)
    await rtc.get("k6")
    db.rows["k6"] = {"n": 66}
    clock.advance(11.0)
    assert (await rtc.lookup("k6")).value == {"n": 66}
    assert (await rtc.lookup("k6")).origin == "cache"


async def test_a_write_goes_to_the_source_first_then_invalidates(db: Database) -> None:
    rtc, _ = make(db)
    await rtc.get("k7")

    async def update() -> str:
        db.rows["k7"] = {"n": 77}
        return "ok"

    assert await rtc.write("k7", update) == "ok"
    assert await rtc.get("k7") == {"n": 77}


async def test_a_write_that_fails_after_reaching_the_source_still_invalidates(
    db: Database,
) -> None:
    rtc, _ = make(db)
    await rtc.get("k7")

    async def lost_answer() -> None:
        db.rows["k7"] = {"n": 70}  # the source took it...
        raise TimeoutError("no answer")  # ...but the caller never heard

    with pytest.raises(TimeoutError):
        await rtc.write("k7", lost_answer)
    answer = await rtc.lookup("k7")
    assert (answer.value, answer.origin) == ({"n": 70}, "source")  # never the old value


async def test_a_cancelled_write_leaves_its_invalidation_on_the_repair_list(
    db: Database,
) -> None:
    rtc, _ = make(db)
    await rtc.get("k6")
    landed = anyio.Event()

    async def slow_write() -> None:
        db.rows["k6"] = {"n": 60}
        landed.set()
        await anyio.sleep_forever()  # cancelled after the source took the write

    async with anyio.create_task_group() as tg:
        tg.start_soon(rtc.write, "k6", slow_write)
        await landed.wait()
        tg.cancel_scope.cancel()
    assert rtc.stats().repairs_pending == 1
    assert await rtc.get("k6") == {"n": 60}  # the repair is applied before the read
    assert rtc.stats().repairs_pending == 0


async def test_invalidations_the_cache_cannot_take_are_repaired_when_it_is_back(
    db: Database, clock: FakeClock
) -> None:
    flaky = FlakyCache()
    rtc, seen = make(db, flaky)
    await rtc.get("k8")
    flaky.down = True

    async def update() -> None:
        db.rows["k8"] = {"n": 88}

    await rtc.write("k8", update)  # the invalidation cannot reach the cache
    assert rtc.stats().repairs_pending == 1
    assert [e.pending for e in seen if isinstance(e, RepairQueued)] == [1]
    flaky.down = False  # back, still holding the old value...
    clock.advance(5.0)
    assert await rtc.get("k8") == {"n": 88}  # ...which is never served
    assert rtc.stats().repairs_pending == 0
    assert (await rtc.lookup("k8")).origin == "cache"  # refilled with the new value
    assert await rtc.get("k8") == {"n": 88}


async def test_a_full_repair_list_invalidates_the_whole_namespace(
    db: Database, clock: FakeClock
) -> None:
    flaky = FlakyCache()
    rtc, seen = make(db, flaky, repair_limit=3)
    for i in range(6):
        await rtc.get(f"k{i}")
    generation = rtc.stats().generation
    flaky.down = True
    for i in range(5):  # more invalidations than the list holds
        await rtc.invalidate(f"k{i}")
    stats = rtc.stats()
    assert stats.namespace_invalidation_pending and stats.repairs_pending == 0
    assert any(isinstance(e, RepairQueued) and e.overflowed for e in seen)
    flaky.down = False
    clock.advance(5.0)
    loads = db.loads
    assert (await rtc.lookup("k5")).origin == "source"  # k5 was never invalidated, yet...
    assert rtc.stats().generation == (generation or 0) + 1  # ...a new namespace: all old keys gone
    assert db.loads == loads + 1


async def test_a_refill_never_writes_back_a_value_older_than_an_invalidation(
    db: Database,
) -> None:
    rtc, _ = make(db)
    db.gate = anyio.Event()
    seen: list[Any] = []

    async def slow_reader() -> None:
        seen.append(await rtc.get("k9"))  # loads the old value, slowly

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow_reader)
        await anyio.wait_all_tasks_blocked()

        async def update() -> None:
            db.rows["k9"] = {"n": 99}

        await rtc.write("k9", update)  # written while the old value is in flight
        db.gate.set()
    db.gate = None
    assert seen == [{"n": 9}]  # that read overlapped the write: either value is fine
    assert await rtc.get("k9") == {"n": 99}  # but the cache never kept the old one


async def test_reads_after_a_write_never_join_a_load_that_started_before_it(
    db: Database,
) -> None:
    rtc, _ = make(db)
    db.gate = anyio.Event()
    results: dict[str, Any] = {}

    async def read(name: str) -> None:
        results[name] = await rtc.get("k2")

    async with anyio.create_task_group() as tg:
        tg.start_soon(read, "before")
        await anyio.wait_all_tasks_blocked()

        async def update() -> None:
            db.rows["k2"] = {"n": 22}

        await rtc.write("k2", update)
        tg.start_soon(read, "after")
        await anyio.wait_all_tasks_blocked()
        db.gate.set()
    assert results["after"] == {"n": 22}


async def test_cancellation_of_a_reader_is_never_counted_as_a_cache_failure(db: Database) -> None:
    class HangingCache(MemoryCache):
        async def get(self, key: str) -> Any | None:
            await anyio.sleep_forever()

    rtc, _ = make(db, HangingCache())
    await rtc.invalidate("warm-up")  # reads the generation first
    async with anyio.create_task_group() as tg:
        tg.start_soon(rtc.get, "k1")
        await anyio.wait_all_tasks_blocked()  # the read hangs in the cache
        tg.cancel_scope.cancel()
    assert rtc.stats().failures == {}
    assert rtc.breaker.snapshot().failures == 0


async def test_warming_never_keeps_a_value_an_invalidation_raced(db: Database) -> None:
    class GatedCache(MemoryCache):
        """Holds every set until ``gate`` opens (a slow round trip)."""

        gate: anyio.Event | None = None

        async def set(self, key: str, value: Any, ttl: float) -> None:
            if self.gate is not None:
                await self.gate.wait()
            await super().set(key, value, ttl)

    cache = GatedCache()
    rtc, _ = make(db, cache)
    await rtc.invalidate("warm-up")  # reads the generation first
    cache.gate = anyio.Event()
    stored: list[int] = []

    async def warm() -> None:
        stored.append(await rtc.warm(["k3"]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(warm)
        await anyio.wait_all_tasks_blocked()  # the old value is on its way to the cache

        async def update() -> None:
            db.rows["k3"] = {"n": 33}

        await rtc.write("k3", update)  # its delete arrives before the set
        cache.gate.set()
    assert stored == [0]
    assert await cache.get(rtc._prefix + "k3") is None  # the late set was undone
    assert await rtc.get("k3") == {"n": 33}


async def test_garbage_in_the_cache_is_a_miss_with_an_event_never_a_failure(
    db: Database,
) -> None:
    cache = MemoryCache()
    rtc, seen = make(db, cache)
    await rtc.get("k1")
    for garbage in ("not an envelope", [float("inf"), "x"], {"a": 1}, 42):
        await cache.set(rtc._prefix + "k1", garbage, 60)
        answer = await rtc.lookup("k1")
        assert (answer.value, answer.origin) == ({"n": 1}, "source")
        assert (await rtc.lookup("k1")).origin == "cache"  # the refill overwrote it
    assert rtc.stats().failures == {"corrupt": 4}
    assert {(e.kind, e.error_type) for e in seen if isinstance(e, CacheFailed)} == {
        ("corrupt", "CorruptEntry")
    }
    assert rtc.breaker.snapshot().failures == 0


async def test_warming_loads_the_chosen_keys_at_a_bounded_rate(
    db: Database, clock: FakeClock
) -> None:
    cache = MemoryCache()
    rtc: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(db.load),
        cache,
        CacheConfig(warm_rate=10.0, warm_batch=2),
        warming=[WarmKeys(["k1", "k2", "k3", "k4", "k5"])],
    )
    slept_before = list(clock.slept)
    assert await rtc.warm(["k1", "k2", "k3", "k4", "k5", "missing"]) == 5
    pauses = clock.slept[len(slept_before) :]
    assert pauses == [0.2, 0.2]  # 3 batches of 2 keys at 10 keys/s
    loads = db.loads
    for i in range(1, 6):
        assert (await rtc.lookup(f"k{i}")).origin == "cache"
    assert db.loads == loads


async def test_maintain_warms_at_start_and_after_a_recovery(db: Database, clock: FakeClock) -> None:
    flaky = FlakyCache()
    rtc: ReadThroughCache[Any] = ReadThroughCache(
        FunctionSource(db.load),
        flaky,
        CacheConfig(breaker=BreakerConfig(consecutive_failures=1, open_duration=1.0)),
        warming=[WarmKeys(["k1"]), WarmHottest(2)],
    )
    warmed: list[tuple[str, int]] = []
    rtc.bus.subscribe(
        lambda e: warmed.append((e.reason, e.stored)) if e.name == "cache.warmed" else None
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(rtc.maintain)
        await anyio.wait_all_tasks_blocked()
        assert warmed == [("start", 1)]
        for _ in range(3):
            await rtc.get("k7")  # k7 becomes hot
        flaky.down = True
        await rtc.get("k7")
        flaky.clear()  # a restarted cache: empty
        flaky.down = False
        clock.advance(1.0)
        await rtc.get("k3")  # the probe succeeds: recovered
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert warmed[1] == ("recovered", 3)  # k1 (listed), then k7 and k3 (the hottest)
    assert await flaky.get(rtc._prefix + "k7") is not None  # the hot key is back in the cache


def test_the_hot_key_sketch_finds_the_heavy_keys() -> None:
    sketch = HotKeySketch(width=256, depth=4, top=5, decay_every=10_000)
    for i in range(2000):
        sketch.record(f"cold{i % 400}")
        if i % 4 == 0:
            sketch.record("hot-a")
        if i % 8 == 0:
            sketch.record("hot-b")
    assert sketch.hottest(2) == ["hot-a", "hot-b"]
    assert sketch.estimate("hot-a") >= 500  # never undercounts


def test_the_hot_key_sketch_forgets_old_heat() -> None:
    sketch = HotKeySketch(width=64, depth=2, top=3, decay_every=100)
    for _ in range(99):
        sketch.record("yesterday")
    for _ in range(400):
        sketch.record("today")
    assert sketch.hottest(1) == ["today"]
    assert sketch.estimate("yesterday") < 99


def test_codecs() -> None:
    assert JsonCodec().decode(JsonCodec().encode([1.5, {"a": "é"}])) == [1.5, {"a": "é"}]
    with pytest.raises(ValueError, match="i_trust_the_cache"):
        PickleCodec()
    codec = PickleCodec(i_trust_the_cache=True)
    assert codec.decode(codec.encode({1, 2})) == {1, 2}


def test_memory_cache_is_bounded() -> None:
    async def fill() -> MemoryCache:
        cache = MemoryCache(max_entries=3)
        for i in range(5):
            await cache.set(f"k{i}", i, 60)
        return cache

    cache = anyio.run(fill)
    assert len(cache) == 3


def test_configuration_is_validated_with_names_and_values() -> None:
    with pytest.raises(ValueError, match=r"CacheConfig\.ttl.*-1"):
        CacheConfig(ttl=-1)
    with pytest.raises(ValueError, match=r"CacheConfig\.namespace.*'a:b'"):
        CacheConfig(namespace="a:b")
    with pytest.raises(ValueError, match=r"CacheConfig\.warm_rate.*0"):
        CacheConfig(warm_rate=0)
    with pytest.raises(TypeError, match=r"CacheConfig\.repair_limit"):
        CacheConfig(repair_limit=1.5)  # type: ignore[arg-type]


async def test_a_hit_between_two_cache_failures_resets_the_breakers_count(
    db: Database, clock: FakeClock
) -> None:
    flaky = FlakyCache()
    rtc, _ = make(db, flaky)  # the breaker opens after 2 failures in a row
    await rtc.get("k1")
    for _ in range(3):
        flaky.down = True
        assert await rtc.get("k1") == {"n": 1}  # a failure: read from the source
        flaky.down = False
        assert await rtc.get("k1") == {"n": 1}  # a hit: the failure count restarts
    assert rtc.breaker.state is BreakerState.CLOSED
    stats = rtc.stats()
    assert (stats.hits, stats.failures) == (3, {"refused": 3})


async def test_a_hit_read_by_get_is_counted_like_one_read_by_lookup(db: Database) -> None:
    rtc, _ = make(db)
    await rtc.get("k1")
    assert await rtc.get("k1") == (await rtc.lookup("k1")).value == {"n": 1}
    assert (rtc.stats().hits, rtc.stats().misses, db.loads) == (2, 1, 1)


async def test_a_hit_takes_a_breaker_permit_only_when_someone_wants_its_outcome(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    permits: list[object] = []
    allow = CircuitBreaker.allow

    def counting(self: CircuitBreaker) -> Permit:
        permits.append(self)
        return allow(self)

    monkeypatch.setattr(CircuitBreaker, "allow", counting)
    rtc, _ = make(db)
    await rtc.get("k1")
    permits.clear()
    unsubscribe = events.subscribe(lambda event: None, kinds=("retry.giveup",))
    try:
        assert await rtc.get("k1") == {"n": 1}  # a metrics exporter's wishes: no permit
        assert permits == []
        outcomes: list[Event] = []
        rtc.breaker.events.subscribe(outcomes.append, kinds=OutcomeRecorded)
        assert await rtc.get("k1") == {"n": 1}  # the per-call event is wanted: a permit
        assert permits == [rtc.breaker]
        assert [e.outcome for e in outcomes] == ["success"]  # type: ignore[attr-defined]
    finally:
        unsubscribe()
    assert (rtc.stats().hits, rtc.stats().misses) == (2, 1)


class AwaitedCache(MemoryCache):
    """A memory cache read through its coroutine, as any cache but `MemoryCache` itself is."""

    async def get(self, key: str) -> Any | None:
        return await super().get(key)


CACHE_KINDS = [pytest.param(MemoryCache, id="memory"), pytest.param(AwaitedCache, id="awaited")]


@pytest.mark.parametrize("kind", CACHE_KINDS)
async def test_an_entry_is_a_hit_until_its_ttl_and_refreshed_exactly_at_it(
    db: Database, clock: FakeClock, kind: type[MemoryCache]
) -> None:
    rtc, _ = make(db, kind(), ttl=60.0)
    await rtc.get("k1")  # filled at 1000.0: fresh until 1060.0
    clock.set(1059.999)
    assert await rtc.get("k1") == {"n": 1}
    assert db.loads == 1
    clock.set(1060.0)
    db.rows["k1"] = {"n": 100}
    assert await rtc.get("k1") == {"n": 100}  # at its ttl: no longer fresh
    assert db.loads == 2
    assert (rtc.stats().hits, rtc.stats().misses) == (1, 2)


@pytest.mark.parametrize("kind", CACHE_KINDS)
async def test_a_value_past_its_ttl_read_by_get_is_served_stale_when_the_source_fails(
    db: Database, clock: FakeClock, kind: type[MemoryCache]
) -> None:
    rtc, seen = make(db, kind(), ttl=60.0, stale_for=30.0)
    await rtc.get("k1")
    db.failing = True
    clock.set(1060.0)
    assert await rtc.get("k1") == {"n": 1}
    clock.set(1089.999)
    assert await rtc.get("k1") == {"n": 1}
    assert rtc.stats().stale_served == 2
    assert [type(e) for e in seen] == [StaleServed, StaleServed]
    clock.set(1090.0)  # past stale_for too
    with pytest.raises(ConnectionResetError):
        await rtc.get("k1")


async def test_an_entrys_freshness_time_is_kept_to_ten_microseconds(db: Database) -> None:
    cache = MemoryCache()
    with fake_clock(start=1000.1234567) as clock:
        rtc, _ = make(db, cache, ttl=60.0)
        await rtc.get("k1")
        fresh_until, value = await cache.get(rtc._prefix + "k1")
        # 15 significant digits at most: its JSON text parses on the fast path.
        assert (fresh_until, value) == (1060.12346, {"n": 1})
        assert json.dumps(fresh_until) == "1060.12346"
        clock.set(1060.123459)
        assert await rtc.get("k1") == {"n": 1}
        assert db.loads == 1
        clock.set(1060.12346)
        await rtc.get("k1")
        assert db.loads == 2


GARBAGE = [
    pytest.param("not an envelope", id="text"),
    pytest.param([float("inf"), "x"], id="infinite-time"),
    pytest.param([float("nan"), "x"], id="nan-time"),
    pytest.param([10**400, "x"], id="time-too-large-for-a-float"),
    pytest.param([1.0, "x", "y"], id="three-items"),
    pytest.param({"a": 1}, id="mapping"),
    pytest.param(42, id="number"),
]


@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("garbage", GARBAGE)
async def test_garbage_read_by_get_is_a_miss_with_an_event_never_a_crash(
    db: Database, kind: type[MemoryCache], garbage: Any
) -> None:
    cache = kind()
    rtc, seen = make(db, cache)
    await rtc.get("k1")
    await cache.set(rtc._prefix + "k1", garbage, 60)
    assert await rtc.get("k1") == {"n": 1}
    assert db.loads == 2  # from the source, and the refill overwrote the garbage:
    assert await rtc.get("k1") == {"n": 1}
    assert db.loads == 2
    assert rtc.stats().failures == {"corrupt": 1}
    assert [(e.kind, e.op) for e in seen if isinstance(e, CacheFailed)] == [("corrupt", "get")]
    assert rtc.breaker.snapshot().failures == 0


@pytest.mark.parametrize("kind", CACHE_KINDS)
async def test_an_envelope_of_another_shape_that_reads_as_a_time_and_value_is_served(
    db: Database, clock: FakeClock, kind: type[MemoryCache]
) -> None:
    cache = kind()
    rtc, _ = make(db, cache)
    await rtc.get("k1")
    await cache.set(rtc._prefix + "k1", (2000, "written by another version"), 60)
    assert await rtc.get("k1") == "written by another version"  # an int time, in a tuple
    assert rtc.stats().failures == {}


async def test_a_key_read_before_the_namespace_is_invalidated_is_read_afresh_after(
    db: Database, clock: FakeClock
) -> None:
    shared = MemoryCache()
    rtc, _ = make(db, shared, generation_refresh=5.0)
    other, _ = make(db, shared)  # another process on the same cache
    await rtc.get("k1")
    assert await rtc.get("k1") == {"n": 1}
    db.rows["k1"] = {"n": 10}
    await rtc.invalidate_all()
    assert await rtc.get("k1") == {"n": 10}
    db.rows["k1"] = {"n": 11}
    await other.invalidate_all()
    assert await rtc.get("k1") == {"n": 10}  # its generation is re-read every 5 s...
    clock.advance(5.0)
    assert await rtc.get("k1") == {"n": 11}  # ...then the old names are not asked for
    assert db.loads == 3


async def test_reads_of_more_keys_than_get_remembers_the_names_of_still_find_each_one(
    db: Database,
) -> None:
    rows = {f"key{i}": i for i in range(5000)}
    db.rows.update(rows)
    rtc, _ = make(db)
    for _ in range(2):
        assert {key: await rtc.get(key) for key in rows} == rows
    assert (rtc.stats().hits, db.loads) == (5000, 5000)


def test_a_memory_cache_read_without_a_coroutine_expires_at_its_ttl_and_counts_as_used() -> None:
    async def fill(cache: MemoryCache) -> None:
        for key in ("a", "b", "c"):
            await cache.set(key, key.upper(), 10.0)

    with fake_clock(start=100.0) as clock:
        cache = MemoryCache(max_entries=3)
        anyio.run(fill, cache)
        assert cache.get_nowait("a") == "A"  # "a" is now the most recently used...
        anyio.run(cache.set, "d", "D", 10.0)
        assert cache.get_nowait("b") is None  # ...so "b" was the one evicted
        clock.set(109.999)
        assert cache.get_nowait("a") == "A"
        clock.set(110.0)
        assert cache.get_nowait("a") is None
        assert cache.get_nowait("missing") is None


async def test_a_hit_takes_no_breaker_permit_again_once_pending_repairs_are_applied(
    db: Database, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    permits: list[object] = []
    allow = CircuitBreaker.allow

    def counting(self: CircuitBreaker) -> Permit:
        permits.append(self)
        return allow(self)

    monkeypatch.setattr(CircuitBreaker, "allow", counting)
    flaky = FlakyCache()
    rtc, _ = make(db, flaky)
    await rtc.get("k1")
    await rtc.get("k2")
    flaky.down = True
    await rtc.invalidate("k2")  # queued for repair
    flaky.down = False
    permits.clear()
    assert await rtc.get("k1") == {"n": 1}  # the repair goes first: through permits
    assert permits and rtc.stats().repairs_pending == 0
    permits.clear()
    assert await rtc.get("k1") == {"n": 1}  # nothing pending: the hit needs no permit
    assert permits == []


async def test_a_cache_with_a_timeout_takes_a_breaker_permit_for_every_read(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    permits: list[object] = []
    allow = CircuitBreaker.allow

    def counting(self: CircuitBreaker) -> Permit:
        permits.append(self)
        return allow(self)

    monkeypatch.setattr(CircuitBreaker, "allow", counting)
    rtc, _ = make(db, cache_timeout=1.0)
    await rtc.get("k1")
    permits.clear()
    assert await rtc.get("k1") == {"n": 1}
    assert permits == [rtc.breaker]  # the timeout is applied around the cache call


class NoPermissionError(Exception):
    """What redis-py raises for a NOPERM reply (classified by its name)."""


async def test_a_cache_that_refuses_our_permission_is_not_asked_again_for_the_interval(
    db: Database, clock: FakeClock
) -> None:
    flaky = FlakyCache()
    rtc, _ = make(db, flaky)
    await rtc.get("k1")
    await rtc.get("k1")  # read by get()'s fast path from now on

    def refuse() -> None:
        flaky.calls += 1
        raise NoPermissionError("NOPERM this user has no permissions to run the 'get' command")

    flaky._check = refuse  # type: ignore[method-assign]
    asked = flaky.calls
    for _ in range(30):  # far past the breaker's 5 s open period
        assert await rtc.get("k1") == {"n": 1}
        clock.advance(1.0)
    assert flaky.calls - asked == 1  # each ask could count as a failed login
    assert rtc.stats().failures["auth"] == 1
    clock.advance(AUTH_RETRY_INTERVAL)
    await rtc.get("k1")
    assert flaky.calls - asked == 2


async def test_a_subscriber_added_after_the_cache_is_built_receives_the_kinds_it_wants(
    db: Database,
) -> None:
    cache = MemoryCache()
    rtc, _ = make(db, cache)
    await rtc.get("k1")
    failed: list[Event] = []
    other: list[Event] = []
    unsubscribe = [
        events.subscribe(failed.append, kinds=CacheFailed),
        events.subscribe(other.append, kinds=("retry.giveup",)),
    ]
    try:
        await cache.set(rtc._prefix + "k1", "garbage", 60)
        assert await rtc.get("k1") == {"n": 1}
    finally:
        for undo in unsubscribe:
            undo()
    assert [(e.kind, e.op) for e in failed] == [("corrupt", "get")]  # type: ignore[attr-defined]
    assert other == []
