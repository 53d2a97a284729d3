"""The shared (Redis) breaker runs the local breaker's rules: a differential property test.

The state machine is specified once, in ``breaker.machine.Machine``; the Redis store
runs the same rules in Lua for atomicity.  Hypothesis drives one sequence of
admissions, outcomes (with durations), forced states and clock steps through
a local breaker and a breaker shared through a real Redis, both on one fake
clock (the scripts take the fake time, see ``stores.redis.script_time``), and
the two must admit the same calls (the same probes) and go through the same
states with the same counts and the same time until they admit again.

Configurations cover count and time windows, failure-rate and slow-call-rate
thresholds, minimum calls, consecutive failures, one or several half-open
permits under both ``half_open_decision`` modes, with and without a
half-open time limit, forced states and a growing, capped open duration.
Jitter is left out: the local breaker and the store draw from different
random sources (its bounds are tested in test_breaker.py).  Times are
multiples of 1/64 s, exact in binary and in the script's 6-decimal storage,
so that a period ending exactly at a step ends there on both sides.

Redis is reached through redis.asyncio: each example runs its own asyncio
loop, store and breaker name (``asyncio.run``), so examples never share keys.
Whether the shared breaker asked Redis since the clock last moved (and so
must agree now) is read from the server's own count of scripts run, not
guessed: a late outcome, for one, is dropped without a round trip.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._core.errors import CircuitOpenError
from datapunk_recovery.breaker import BreakerConfig, CircuitBreaker, Permit
from datapunk_recovery.stores.redis import RedisStore
from datapunk_recovery.testing import fake_clock
from tests.harness import RedisServer

pytestmark = pytest.mark.drill  # Redis round trips every step: about 1 s a property

STEP = 1 / 64  # seconds: every time and duration is a multiple of it


class Boom(Exception):
    pass


@st.composite
def configs(draw: st.DrawFn) -> BreakerConfig:
    """A breaker configuration from the space both implementations support."""
    rate = draw(st.sampled_from([None, 0.25, 0.34, 0.5, 1.0]))
    slow_rate = draw(st.sampled_from([None, 0.5, 0.75, 1.0]))
    consecutive = draw(st.sampled_from([None, 1, 2, 3]))
    if rate is None and slow_rate is None and consecutive is None:
        consecutive = 2
    window = draw(st.sampled_from(["count", "time"]))
    size = draw(st.integers(1, 5))
    duration = draw(st.sampled_from([0.5, 1.0, 2.0]))
    open_duration = draw(st.sampled_from([0.25, 0.5, 1.0]))
    return BreakerConfig(
        consecutive_failures=consecutive,
        failure_rate_threshold=rate,
        slow_call_rate_threshold=slow_rate,
        slow_call_duration=0.5 if slow_rate is not None else None,
        window=window,  # type: ignore[arg-type]
        window_size=size,
        window_duration=duration,
        window_buckets=draw(st.sampled_from([1, 2, 4])),
        minimum_calls=draw(st.integers(1, size)),
        half_open_permits=draw(st.integers(1, 3)),
        half_open_timeout=draw(st.sampled_from([None, 0.5, 1.0])),
        half_open_decision=draw(
            st.sampled_from(["first_failure", "rate"] if rate is not None else ["first_failure"])
        ),
        open_duration=open_duration,
        open_backoff=draw(st.sampled_from([1.0, 1.5, 2.0])),
        max_open_duration=open_duration * draw(st.sampled_from([1, 2, 4])),
    )


@dataclass(frozen=True)
class Allow:
    """Ask both breakers for a permit."""


@dataclass(frozen=True)
class Settle:
    """End the ``which``-th permit still out (modulo their number) with ``outcome``."""

    which: int
    outcome: str  # "success", "failure" or "cancel"
    duration: float  # seconds


@dataclass(frozen=True)
class Advance:
    """Move the clock by ``steps`` times `STEP`."""

    steps: int


@dataclass(frozen=True)
class Force:
    """An operator's control: ``isolate``, ``reset``, ``disable`` or ``metrics_only``."""

    control: str


@dataclass(frozen=True)
class Call:
    """Ask both breakers for a permit and, if granted, end it at once with ``outcome``."""

    outcome: str
    duration: float


Op = Allow | Call | Settle | Advance | Force

outcomes = st.sampled_from(["success", "success", "failure", "failure", "cancel"])
durations = st.sampled_from([0.25, 0.5, 0.75])
calls = st.builds(Call, outcomes, durations)
advances = st.builds(Advance, st.one_of(st.integers(1, 32), st.integers(33, 160)))
# Weighted by repetition: calls and clock steps most.  Operator controls in
# one program of three (a control holds the breaker until a reset).
steps = [
    *[calls] * 5,
    *[st.just(Allow())] * 2,
    *[st.builds(Settle, st.integers(0, 3), outcomes, durations)] * 2,
    *[advances] * 3,
]
controls = st.builds(
    Force, st.sampled_from(["isolate", "reset", "reset", "disable", "metrics_only"])
)
programs = st.sampled_from([False, False, True]).flatmap(
    lambda forced: st.lists(
        st.one_of(*steps, *([controls] if forced else [])), min_size=20, max_size=60
    )
)


def _event(value: str) -> None:
    """Count ``value`` in Hypothesis's statistics, under ``@given`` (plain tests run `_run` too)."""
    if currently_in_test_context():
        event(value)


def view(breaker: CircuitBreaker) -> tuple[object, ...]:
    """What both breakers must agree on: state, counts, and seconds until they admit."""
    snap = breaker.snapshot()
    retry = snap.retry_after
    return (
        snap.state,
        snap.consecutive_failures,
        snap.calls,
        snap.failures,
        snap.slow_calls,
        math.inf if math.isinf(retry) else round(retry, 5),
    )


async def _admit(breaker: CircuitBreaker) -> Permit | None:
    try:
        return await breaker.allow_async()
    except CircuitOpenError:
        return None


def _settle(permit: Permit, outcome: str, duration: float) -> None:
    if outcome == "success":
        permit.success(duration)
    elif outcome == "failure":
        permit.failure(Boom("down"), duration)
    else:
        permit.cancel()


async def _scripts_run(watcher: aioredis.Redis) -> int:
    """How many scripts the Redis server has run so far (its command statistics)."""
    stats = await watcher.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


async def _run(url: str, config: BreakerConfig, program: list[Op], every: int) -> list[str]:
    """Drive ``program`` through both breakers; return the log of what each step saw.

    ``every``: flush the shared breaker's writes after every ``every`` steps
    (1: after each).  Asserts agreement as the docstrings of the tests say:
    at a flush point, when the shared breaker made a round trip since the
    clock last moved.
    """
    log: list[str] = []
    with fake_clock(1000.0) as clock:
        store = RedisStore(  # (timeout: a busy machine is no outage here)
            url, cache_ttl=0.0, flush_interval=3600.0, flush_max=10_000, timeout=5.0
        )
        watcher = aioredis.Redis.from_url(url)
        try:
            name = f"diff-{uuid.uuid4().hex[:12]}"
            local = CircuitBreaker(name, config)
            shared = CircuitBreaker(name, config, store=store)
            out: list[tuple[Permit, Permit]] = []
            held = 0  # clock steps held back until the next flush point (every > 1)
            moved = await _scripts_run(watcher)  # scripts run when the clock last moved
            for i, op in enumerate(program):
                if isinstance(op, Advance) and every > 1:
                    held += op.steps
                    log.append(f"advance {op.steps * STEP} s, held until the flush")
                else:
                    await _step(op, local, shared, out, clock, log)
                    if isinstance(op, Advance):
                        moved = await _scripts_run(watcher)
                if (i + 1) % every:
                    continue
                await shared.flush_async()
                if await _scripts_run(watcher) > moved:  # a round trip since the clock moved
                    here, there = view(local), view(shared)
                    log.append(f"  local {here}\n  shared {there}")
                    assert here == there, "\n".join(log)
                    _event(f"reached {here[0]}")  # (--hypothesis-show-statistics)
                if held:
                    await _step(Advance(held), local, shared, out, clock, log)
                    held, moved = 0, await _scripts_run(watcher)
        finally:
            await watcher.aclose()
            await store.aclose()
    return log


async def _step(
    op: Op,
    local: CircuitBreaker,
    shared: CircuitBreaker,
    out: list[tuple[Permit, Permit]],
    clock: FakeClock,
    log: list[str],
) -> None:
    """Apply ``op`` to both breakers (both settle time at the next look, at the same time)."""
    if isinstance(op, Advance):
        clock.advance(op.steps * STEP)
        log.append(f"advance {op.steps * STEP} s -> {clock.now()}")
        return
    if isinstance(op, Force):
        await getattr(local, f"{op.control}_async")()
        await getattr(shared, f"{op.control}_async")()
        log.append(f"{op.control}")
        return
    if isinstance(op, Allow | Call):
        a, b = await _admit(local), await _admit(shared)
        log.append(
            f"allow -> local {a and ('probe' if a.probe else 'call')}, "
            f"shared {b and ('probe' if b.probe else 'call')}"
        )
        assert (a is None) == (b is None), "\n".join(log)
        if a is not None and b is not None:
            assert a.probe == b.probe, "\n".join(log)
            if a.probe:
                _event("probe admitted")
            out.append((a, b))
            if isinstance(op, Call):
                await _step(
                    Settle(len(out) - 1, op.outcome, op.duration), local, shared, out, clock, log
                )
        return
    if not out:
        return
    a, b = out.pop(op.which % len(out))
    log.append(f"{op.outcome} ({op.duration} s) of a {'probe' if a.probe else 'call'}")
    _settle(a, op.outcome, op.duration)
    _settle(b, op.outcome, op.duration)


_TRIP_ONCE = BreakerConfig(consecutive_failures=1, open_duration=0.25, max_open_duration=0.25)


@settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(config=configs(), program=programs)
# The corners, every run: the "rate" decision at its threshold exactly...
@example(
    config=BreakerConfig(
        consecutive_failures=1,
        failure_rate_threshold=0.5,
        window_size=2,
        minimum_calls=2,
        half_open_permits=2,
        half_open_decision="rate",
        open_duration=0.25,
        max_open_duration=0.25,
    ),
    program=[
        Call("failure", 0.25),
        Advance(16),
        Allow(),
        Allow(),
        Settle(0, "failure", 0.25),
        Settle(0, "success", 0.25),
        Allow(),
    ],
)
# ... a half-open time limit passing with one probe of two succeeded, and then
# with none (the open period then runs from the limit) ...
@example(
    config=BreakerConfig(
        consecutive_failures=1,
        half_open_permits=2,
        half_open_timeout=0.5,
        open_duration=0.25,
        max_open_duration=0.25,
    ),
    program=[
        Call("failure", 0.25),
        Advance(64),
        Allow(),
        Allow(),
        Settle(0, "success", 0.25),
        Advance(40),
        Allow(),
        Call("failure", 0.25),
        Advance(16),
        Allow(),
        Advance(40),
        Allow(),
        Advance(8),
        Allow(),
    ],
)
# ... an open duration growing to its cap, ending exactly on a step ...
@example(
    config=BreakerConfig(
        consecutive_failures=1,
        open_duration=0.25,
        open_backoff=2.0,
        max_open_duration=0.5,
    ),
    program=[
        Call("failure", 0.25),
        Advance(16),
        Call("failure", 0.25),
        Advance(32),
        Call("failure", 0.25),
        Advance(31),
        Allow(),
        Advance(1),
        Call("success", 0.25),
    ],
)
# ... a time window emptied by a step of exactly its length, slow calls ...
@example(
    config=BreakerConfig(
        consecutive_failures=None,
        slow_call_rate_threshold=0.5,
        slow_call_duration=0.5,
        window="time",  # type: ignore[arg-type]
        window_duration=1.0,
        window_buckets=4,
        minimum_calls=2,
    ),
    program=[
        Call("success", 0.75),
        Advance(64),
        Call("success", 0.25),
        Call("success", 0.5),
        Advance(15),
        Call("failure", 0.75),
    ],
)
# ... and the operator's controls.
@example(
    config=_TRIP_ONCE,
    program=[
        Force("isolate"),
        Allow(),
        Force("reset"),
        Force("metrics_only"),
        Call("failure", 0.25),
        Call("failure", 0.25),
        Force("disable"),
        Call("failure", 0.25),
        Force("reset"),
        Call("failure", 0.25),
        Allow(),
    ],
)
def test_a_shared_breaker_decides_every_step_as_the_local_one_when_flushed_each_step(
    redis_server: RedisServer, config: BreakerConfig, program: list[Op]
) -> None:
    """Flushed after every step (no lag): identical admissions, states, counts, times.

    After every step that made the shared breaker ask Redis, ``view()`` of
    both is equal; admissions and probes are equal at every step.
    """
    asyncio.run(_run(redis_server.url, config, program, every=1))


@settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(config=configs(), program=programs, every=st.integers(2, 5))
# A probe's success is sent at once in a task of its own; the next call's read
# must not overtake it (it did: the call was refused on the half-open state).
@example(
    config=_TRIP_ONCE,
    program=[Call("failure", 0.25), Advance(16), Call("success", 0.25), Allow()],
    every=2,
)
def test_a_shared_breaker_flushed_every_few_steps_agrees_within_the_lag_bound(
    redis_server: RedisServer, config: BreakerConfig, program: list[Op], every: int
) -> None:
    """Flushed only every ``every`` steps: the same decisions, the same state at flush points.

    The lag bound this holds (docs/breaker.md, "Proved the same rules"):
    within one process, an outcome recorded at (fake) time ``t`` lands in
    Redis before this process's next read, at time ``t`` (the clock moves
    only at flush points here, so no outcome lands later than the step it
    was recorded in: the real-time lag is below one clock step).  Then at
    every step both breakers admit the same calls and grant the same probes
    (a read waits for this process's own writes), and at every flush point
    they report the same state, counts and seconds until they admit; between
    flush points the shared breaker's reported state and counts are those of
    its last round trip, behind by at most the outcomes recorded since.
    """
    asyncio.run(_run(redis_server.url, config, program, every=every))


async def _boundary(url: str) -> None:
    config = BreakerConfig(consecutive_failures=1, open_duration=0.2, max_open_duration=0.2)
    with fake_clock(1000.0) as clock:
        store = RedisStore(url, cache_ttl=0.0, timeout=5.0)
        try:
            name = f"diff-{uuid.uuid4().hex[:12]}"
            local = CircuitBreaker(name, config)
            shared = CircuitBreaker(name, config, store=store)
            clock.set(1000.0 + 0.1)
            for breaker in (local, shared):
                permit = await breaker.allow_async()
                await permit.failure_async(Boom("down"))
            # open until 1000.1 + 0.2 == 1000.3000000000001: not yet ended at 1000.3
            clock.set(1000.0 + 0.3)
            a, b = await _admit(local), await _admit(shared)
            assert (a is None, b is None) == (True, True)
            assert view(local) == view(shared)
        finally:
            await store.aclose()


def test_an_open_period_ends_at_the_same_instant_to_the_bit_on_both_sides(
    redis_server: RedisServer,
) -> None:
    """Found by the differential test with times off the 1/64 s grid.

    Times kept in Redis round-trip exactly (they were cut to 6 decimals, so a
    period ending a fraction of a microsecond after a round number ended early
    in Redis: a probe admitted there while the local breaker still refused),
    and the time left in a reply is rounded up to the microsecond (rounded
    down, the link's cached view showed half-open while Redis was open).
    """
    asyncio.run(_boundary(redis_server.url))


def test_a_snapshot_taken_as_a_half_open_limit_passes_shows_the_counts_of_the_new_state(
    fake: FakeClock,
) -> None:
    """Found by the differential test: the local snapshot read the window before
    the state, whose reading closed the breaker (half-open limit passed, a
    probe had succeeded) and cleared the window: ``closed`` with the old counts."""
    config = BreakerConfig(
        consecutive_failures=1,
        keep_window=True,
        minimum_calls=1,
        half_open_permits=2,
        half_open_timeout=0.5,
        open_duration=0.25,
        max_open_duration=0.25,
    )
    breaker = CircuitBreaker("b", config)
    breaker.allow().failure(Boom("down"))
    fake.advance(0.25)
    breaker.allow().success()  # one probe of two succeeded
    fake.advance(0.5)  # the half-open limit passes while nobody looks
    snap = breaker.snapshot()
    assert (snap.state, snap.calls, snap.failures) == ("closed", 0, 0)


_RATE_OF_TWO = BreakerConfig(
    consecutive_failures=None,
    failure_rate_threshold=0.25,
    window_size=2,
    minimum_calls=1,
    open_duration=0.25,
    max_open_duration=0.25,
)


def test_outcomes_of_calls_admitted_before_a_reset_never_push_out_those_admitted_after_it(
    redis_server: RedisServer,
) -> None:
    """Found by the differential test (flushed every 3 steps; shrunk by hand).

    Two calls admitted before a reset end after it, around one admitted after
    it: the late ones count nowhere, on both sides (docs/breaker.md, "Late
    outcomes"), and the new one counts on both.  The shared link took the
    second late outcome for a newer generation than its unsent batch and
    dropped that batch, the new call's success with it: 0 calls in Redis
    against 1 locally.
    """
    program: list[Op] = [
        Allow(),
        Allow(),
        Force("reset"),
        Allow(),
        Settle(0, "success", 0.25),  # admitted before the reset: late
        Settle(1, "success", 0.25),  # admitted after it: counts
        Settle(0, "success", 0.25),  # admitted before the reset: late
        Allow(),
    ]
    log = asyncio.run(_run(redis_server.url, _RATE_OF_TWO, program, every=4))
    assert log[-1].endswith(", 1, 0, 0, 0.0)")  # both saw the one call that counts


_PROBE_LIMITED = BreakerConfig(
    consecutive_failures=1,
    half_open_permits=2,
    half_open_timeout=0.5,
    open_duration=0.25,
    max_open_duration=0.25,
)


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize(
    ("config", "program"),
    [
        pytest.param(
            _TRIP_ONCE,
            [
                Call("failure", 0.25),
                Advance(16),
                Allow(),
                Force("reset"),
                Call("success", 0.25),
                Settle(0, "failure", 0.25),
                Allow(),
                Call("success", 0.25),
            ],
            id="a probe failing after a reset",
        ),
        pytest.param(
            _TRIP_ONCE,
            [
                Call("failure", 0.25),
                Advance(16),
                Allow(),
                Force("isolate"),
                Settle(0, "success", 0.25),
                Force("reset"),
                Allow(),
                Call("failure", 0.25),
            ],
            id="a probe succeeding while isolated",
        ),
        pytest.param(
            _PROBE_LIMITED,
            [
                Call("failure", 0.25),
                Advance(16),
                Allow(),
                Allow(),
                Advance(40),
                Allow(),
                Settle(0, "success", 0.25),
                Settle(0, "success", 0.25),
                Advance(16),
                Allow(),
            ],
            id="probes ending after the half-open limit opened it again",
        ),
        pytest.param(
            _RATE_OF_TWO,
            [
                Allow(),
                Allow(),
                Allow(),
                Force("metrics_only"),
                Settle(0, "failure", 0.25),
                Call("success", 0.25),
                Force("disable"),
                Settle(0, "failure", 0.25),
                Force("reset"),
                Settle(0, "failure", 0.25),
                Call("success", 0.25),
                Allow(),
            ],
            id="calls ending after shadow mode, disabling and a reset",
        ),
        pytest.param(
            _RATE_OF_TWO,
            [
                Allow(),
                Allow(),
                Call("failure", 0.25),
                Advance(16),
                Call("success", 0.25),
                Settle(0, "failure", 0.25),
                Settle(0, "failure", 0.25),
                Allow(),
            ],
            id="calls ending after a trip and a probe closed it",
        ),
    ],
)
def test_outcomes_of_calls_admitted_before_any_transition_count_nowhere_on_both_sides(
    redis_server: RedisServer, config: BreakerConfig, program: list[Op], every: int
) -> None:
    """Every forced transition, a trip, a probe's verdict and a half-open time limit
    start a new period: what was admitted before it and ends after it is late on
    both sides (docs/breaker.md, "Late outcomes"), flushed at every step or lagging."""
    asyncio.run(_run(redis_server.url, config, program, every=every))


async def _reloaded(url: str) -> tuple[tuple[object, ...], tuple[object, ...]]:
    sizes = [
        BreakerConfig(
            consecutive_failures=None,
            failure_rate_threshold=1.0,
            window_size=size,
            minimum_calls=1,
        )
        for size in (4, 3, 2, 4)
    ]
    with fake_clock(1000.0):
        store = RedisStore(url, cache_ttl=0.0, flush_interval=3600.0, timeout=5.0)
        try:
            name = f"diff-{uuid.uuid4().hex[:12]}"
            local = CircuitBreaker(name, sizes[0])
            shared = CircuitBreaker(name, sizes[0], store=store)
            for breaker in (local, shared):
                permits = [await breaker.allow_async() for _ in range(3)]
                for permit, config in zip(permits, sizes[1:], strict=True):
                    permit.success()  # (no await: the batches wait behind the send in flight)
                    breaker.reconfigure(config)
            await shared.flush_async()
            for breaker in (local, shared):
                (await breaker.allow_async()).cancel()  # (the shared one reads Redis)
            return view(local), view(shared)
        finally:
            await store.aclose()


def test_outcomes_counted_before_a_reload_reach_redis_under_the_configuration_they_were_judged_by(
    redis_server: RedisServer,
) -> None:
    """A reload re-configures a breaker in place (a new window when its shape
    changes); outcomes counted before it but not sent yet are judged in Redis by
    the configuration they were counted under, as they were here: they filled
    the window of the old shape, which the new shape then clears on both sides.
    (They were sent with the configuration of their send: 3 calls against 0.)"""
    here, there = asyncio.run(_reloaded(redis_server.url))
    assert here == there
    assert here[2] == 0  # no call counted in the window of the last shape
