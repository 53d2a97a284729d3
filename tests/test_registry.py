"""The registry of named breakers: made on demand, bounded, never forgets an open one."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from datapunk_recovery._core import clock
from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._core.errors import CircuitOpenError
from datapunk_recovery.breaker import BreakerConfig, BreakerState
from datapunk_recovery.breaker.registry import BreakerRegistry
from datapunk_recovery.stores.memory import MemoryStore
from datapunk_recovery.testing import fake_clock


@pytest.fixture
def fake() -> Iterator[FakeClock]:
    with fake_clock() as c:
        yield c


def trip(registry: BreakerRegistry, name: str) -> None:
    breaker = registry.get(name)
    for _ in range(breaker.config.consecutive_failures or 1):
        breaker.allow().failure()


def test_get_makes_once_and_returns_the_same_breaker() -> None:
    registry = BreakerRegistry(BreakerConfig(consecutive_failures=2))
    a = registry.get("payments:/charge")
    assert registry.get("payments:/charge") is a
    assert a.config.consecutive_failures == 2
    other = registry.get("payments:/refund", BreakerConfig(consecutive_failures=9))
    assert other.config.consecutive_failures == 9
    assert set(registry) == {"payments:/charge", "payments:/refund"}
    assert "payments:/charge" in registry and len(registry) == 2


def test_least_recently_used_closed_breaker_goes_first() -> None:
    registry = BreakerRegistry(max_size=2)
    a = registry.get("a")
    registry.get("b")
    registry.get("a")  # a is fresher than b now
    registry.get("c")
    assert set(registry) == {"a", "c"}
    assert registry.get("a") is a


def test_open_breakers_are_never_evicted(fake: FakeClock) -> None:
    registry = BreakerRegistry(BreakerConfig(consecutive_failures=1), max_size=2)
    trip(registry, "a")
    trip(registry, "b")
    opened_a = registry.get("a")
    registry.get("c")  # nothing may go: the registry grows past its bound
    assert set(registry) == {"a", "b", "c"}
    fake.advance(30)
    opened_a.allow().success()  # a closes
    registry.get("d")  # now the bound is restored: a and c can go, the oldest first
    assert len(registry) == 2
    assert "b" in registry  # still half-open-able, never dropped


def test_eviction_never_waits_for_a_breaker_someone_is_using(fake: FakeClock) -> None:
    # A thread holding a breaker's lock (say, a subscriber of its events that
    # calls registry.get()) must not deadlock with an eviction holding the
    # registry's lock: the busy breaker is simply kept this time.
    registry = BreakerRegistry(BreakerConfig(consecutive_failures=1), max_size=1)
    trip(registry, "a")
    a = registry.get("a")
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with a._core.lock:
            held.set()
            done.wait(10.0)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    got: list[object] = []
    getter = threading.Thread(target=lambda: got.append(registry.get("b")))
    try:
        getter.start()
        getter.join(5.0)
        assert got, "registry.get() waited for a busy breaker's lock"
    finally:
        done.set()
        holder.join()
        getter.join()
    assert "a" in registry  # open, and kept


def test_remove_and_find() -> None:
    registry = BreakerRegistry()
    breaker = registry.get("x")
    assert registry.find("x") is breaker and registry.find("y") is None
    assert "y" not in registry
    assert registry.remove("x") is breaker
    assert registry.remove("x") is None


def test_snapshots_and_shared_store() -> None:
    store = MemoryStore()
    one, two = BreakerRegistry(store=store), BreakerRegistry(store=store)
    one.get("db").isolate()
    assert two.get("db").state is BreakerState.FORCED_OPEN
    assert [s.name for s in one.snapshots()] == ["db"]


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"BreakerRegistry\.max_size"):
        BreakerRegistry(max_size=0)
    with pytest.raises(TypeError, match=r"BreakerRegistry\.config"):
        BreakerRegistry(config=3)  # type: ignore[arg-type]


class RegistryMachine(RuleBasedStateMachine):
    """Whatever happens, an open or half-open breaker stays in the registry."""

    def __init__(self) -> None:
        super().__init__()
        self.fake = FakeClock()
        self.previous = clock.current_fake()
        clock.use_clock(self.fake)
        self.registry = BreakerRegistry(
            BreakerConfig(consecutive_failures=1, open_duration=5.0), max_size=3
        )
        self.must_keep: set[str] = set()

    def teardown(self) -> None:
        clock.use_clock(self.previous)

    names = st.sampled_from("abcdefg")

    @rule(name=names)
    def use(self, name: str) -> None:
        self.registry.get(name)

    @rule(name=names)
    def trip(self, name: str) -> None:
        breaker = self.registry.get(name)
        with contextlib.suppress(CircuitOpenError):
            breaker.allow().failure()

    @rule(name=names)
    def succeed(self, name: str) -> None:
        breaker = self.registry.get(name)
        with contextlib.suppress(CircuitOpenError):
            breaker.allow().success()

    @rule(dt=st.sampled_from([1.0, 5.0]))
    def advance(self, dt: float) -> None:
        self.fake.advance(dt)

    @invariant()
    def open_ones_stay(self) -> None:
        for name in self.must_keep:
            assert name in self.registry, f"open breaker {name!r} was evicted"
        held = [self.registry.find(name) for name in self.registry]
        self.must_keep = {
            b.name
            for b in held
            if b is not None
            and b.state in (BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.FORCED_OPEN)
        }
        # past the bound only by open ones (and the one last asked for, closed since)
        assert len(self.registry) <= 3 + len(self.must_keep) + 1


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(max_examples=50, stateful_step_count=40, deadline=None)
