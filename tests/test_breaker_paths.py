"""The breaker's permit-free paths count exactly what the permit path counts.

A breaker whose per-call event (`OutcomeRecorded`) nobody wants records an
outcome without building a permit; a success over a count window with no
failure in it is not judged.  These tests drive the same outcomes through
both paths and compare every count, and check that a subscriber wanting
only other kinds (a metrics exporter) keeps calls on the permit-free path.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapunk_recovery._core import events
from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._core.errors import CircuitOpenError
from datapunk_recovery._core.events import Event
from datapunk_recovery.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStateChanged,
    CircuitBreaker,
    OutcomeRecorded,
    Permit,
)
from datapunk_recovery.testing import fake_clock


def _ok() -> int:
    return 1


def _boom() -> int:
    raise ConnectionError("down")


def _drive(breaker: CircuitBreaker, outcomes: list[bool], clock: FakeClock) -> list[object]:
    """Call through ``breaker`` (as a decorator and with ``call()``), 0.4 s apart.

    Returns the error and the snapshot after each call.
    """
    ok, boom = breaker(_ok), breaker(_boom)
    seen: list[object] = []
    for i, success in enumerate(outcomes):
        fn = (ok if success else boom) if i % 2 else (_ok if success else _boom)
        try:
            if i % 2:
                fn()
            else:
                breaker.call(fn)
        except (ConnectionError, CircuitOpenError) as exc:
            seen.append(type(exc).__name__)
        seen.append(breaker.snapshot())
        clock.advance(0.4)
    return seen


@st.composite
def configs(draw: st.DrawFn) -> BreakerConfig:
    size = draw(st.integers(1, 6))
    return BreakerConfig(
        consecutive_failures=draw(st.one_of(st.none(), st.integers(1, 4))),
        failure_rate_threshold=draw(st.sampled_from([0.01, 0.25, 0.5, 1.0])),
        window_size=size,
        minimum_calls=draw(st.integers(1, size)),
    )


@settings(max_examples=60, deadline=None)
@given(config=configs(), outcomes=st.lists(st.booleans(), max_size=40))
def test_a_rate_breaker_nobody_listens_to_counts_what_the_permit_path_counts(
    config: BreakerConfig, outcomes: list[bool]
) -> None:
    with fake_clock(1000.0) as clock:  # each on its own clock: the same times, to the bit
        lean = _drive(CircuitBreaker("b", config), outcomes, clock)
    with fake_clock(1000.0) as clock:
        permits = CircuitBreaker("b", config)
        permits.events.subscribe(lambda event: None, kinds=OutcomeRecorded)
        assert lean == _drive(permits, outcomes, clock)


def test_a_success_after_failures_still_trips_a_rate_breaker_at_its_minimum_calls(
    fake: FakeClock,
) -> None:
    config = BreakerConfig(consecutive_failures=None, failure_rate_threshold=0.5, minimum_calls=4)
    breaker = CircuitBreaker("b", config)
    for fn in (_boom, _boom, _ok):
        with pytest.raises(ConnectionError) if fn is _boom else _nothing():
            breaker.call(fn)
    assert breaker.state is BreakerState.CLOSED
    breaker.call(_ok)  # 2 failures in 4 calls: 50 %
    assert breaker.state is BreakerState.OPEN


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(
    "config",
    [
        BreakerConfig(),
        BreakerConfig(consecutive_failures=None, failure_rate_threshold=0.5),
        BreakerConfig(consecutive_failures=None, failure_rate_threshold=0.5, window="time"),
    ],
    ids=["consecutive", "count-window", "time-window"],
)
def test_a_subscriber_wanting_other_kinds_keeps_calls_off_the_permit_path(
    fake: FakeClock, monkeypatch: pytest.MonkeyPatch, config: BreakerConfig
) -> None:
    permits: list[object] = []
    make_permit = Permit.__init__

    def counting_permit(self: Permit, breaker: CircuitBreaker, *args: Any) -> None:
        permits.append(breaker)
        make_permit(self, breaker, *args)

    monkeypatch.setattr(Permit, "__init__", counting_permit)
    seen: list[Event] = []
    unsubscribe = events.subscribe(seen.append, kinds=("retry.giveup", BreakerStateChanged))
    try:
        breaker = CircuitBreaker("b", config)

        async def aok() -> int:
            return 1

        breaker(_ok)()
        breaker.call(_ok)
        asyncio.run(breaker(aok)())
        asyncio.run(breaker.call_async(aok))
        assert permits == []
        assert breaker.snapshot().consecutive_failures == 0
        # Wanting the per-call event takes calls through permits again.
        breaker.events.subscribe(seen.append, kinds=OutcomeRecorded)
        breaker(_ok)()
        breaker.call(_ok)
        assert permits == [breaker, breaker]
        assert [e.name for e in seen] == ["breaker.outcome", "breaker.outcome"]
    finally:
        unsubscribe()
    if config.windowed:
        assert breaker.snapshot().calls == 6


# --- the seam for faces built on a breaker: grant(), granted_*(), admitting(), ranking_rate()


def _drive_granted(breaker: CircuitBreaker, outcomes: list[bool], clock: FakeClock) -> list[object]:
    """`_drive()` through `grant()` (a permit only when it grants none), as a router does."""
    seen: list[object] = []
    for success in outcomes:
        start = clock.now()
        gen = breaker.grant()
        if gen is None:
            try:
                permit = breaker.allow()
            except CircuitOpenError as exc:
                seen.append(type(exc).__name__)
            else:
                if success:
                    permit.success()
                else:
                    permit.failure(ConnectionError("down"))
                    seen.append("ConnectionError")
        elif success:
            breaker.granted_success(gen, start)
        else:
            breaker.granted_failure(gen, ConnectionError("down"), start)
            seen.append("ConnectionError")
        seen.append(breaker.snapshot())
        clock.advance(0.4)
    return seen


@settings(max_examples=60, deadline=None)
@given(
    config=configs(),
    slow=st.booleans(),
    outcomes=st.lists(st.booleans(), max_size=40),
)
def test_granted_calls_count_what_permits_count(
    config: BreakerConfig, slow: bool, outcomes: list[bool]
) -> None:
    if slow:  # timed: a granted success is judged with its duration
        config = BreakerConfig(
            consecutive_failures=config.consecutive_failures,
            failure_rate_threshold=config.failure_rate_threshold,
            slow_call_rate_threshold=0.5,
            slow_call_duration=0.1,
            window_size=config.window_size,
            minimum_calls=config.minimum_calls,
        )
    with fake_clock(1000.0) as clock:
        granted = _drive_granted(CircuitBreaker("b", config), outcomes, clock)
    with fake_clock(1000.0) as clock:
        permits = CircuitBreaker("b", config)
        permits.events.subscribe(lambda event: None, kinds=OutcomeRecorded)
        assert granted == _drive_granted(permits, outcomes, clock)


def test_a_full_window_of_successes_takes_another_unchanged_and_still_counts_a_failure(
    fake: FakeClock,
) -> None:
    config = BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, window_size=4, minimum_calls=4
    )
    breaker = CircuitBreaker("b", config)
    for _ in range(6):  # the window fills (4 calls), then takes successes unchanged
        breaker.call(_ok)
    assert (breaker.snapshot().calls, breaker.snapshot().failures) == (4, 0)
    with pytest.raises(ConnectionError):
        breaker.call(_boom)
    assert (breaker.snapshot().calls, breaker.snapshot().failures) == (4, 1)
    for _ in range(3):  # a success after a failure is written: the failure stays in
        breaker.call(_ok)
    assert breaker.snapshot().failures == 1
    breaker.call(_ok)  # four calls later the failure leaves the window
    assert (breaker.snapshot().calls, breaker.snapshot().failures) == (4, 0)
    assert breaker.state is BreakerState.CLOSED


def test_grant_asks_for_a_permit_when_the_breaker_must_see_the_call(fake: FakeClock) -> None:
    assert CircuitBreaker("b").grant() == 0  # closed, nobody listening: granted
    judged = CircuitBreaker("b", BreakerConfig(record_result=lambda value: value is None))
    assert judged.grant() is None  # a result to judge
    wanted = CircuitBreaker("b")
    wanted.events.subscribe(lambda event: None, kinds=OutcomeRecorded)
    assert wanted.grant() is None  # someone wants the per-call event
    isolated = CircuitBreaker("b")
    isolated.isolate()
    assert isolated.grant() is None


def test_a_granted_call_settled_after_a_transition_counts_nowhere(fake: FakeClock) -> None:
    breaker = CircuitBreaker("b", BreakerConfig(consecutive_failures=2))
    gen = breaker.grant()
    assert gen is not None
    breaker.reset()  # a new generation: the call's outcome is late
    breaker.granted_failure(gen, ConnectionError("down"), fake.now())
    assert breaker.snapshot().consecutive_failures == 0


@pytest.mark.parametrize(
    "cancel", [asyncio.CancelledError(), KeyboardInterrupt()], ids=["cancelled", "interrupt"]
)
def test_a_cancelled_granted_call_counts_nothing(fake: FakeClock, cancel: BaseException) -> None:
    config = BreakerConfig(consecutive_failures=1, keep_window=True, minimum_calls=1)
    breaker = CircuitBreaker("b", config)
    gen = breaker.grant()
    assert gen is not None
    breaker.granted_failure(gen, cancel, fake.now())
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.calls, snapshot.consecutive_failures) == (
        BreakerState.CLOSED,
        0,
        0,
    )


def test_admitting_and_ranking_rate_follow_the_state(fake: FakeClock) -> None:
    config = BreakerConfig(consecutive_failures=3, keep_window=True, minimum_calls=2)
    breaker = CircuitBreaker("b", config)
    assert breaker.admitting() and breaker.ranking_rate() == 0.0
    with pytest.raises(ConnectionError):
        breaker.call(_boom)
    assert breaker.ranking_rate() == 0.0  # below minimum_calls: unjudged
    breaker.call(_ok)
    assert breaker.ranking_rate() == breaker.failure_rate() == 0.5
    breaker.isolate()
    assert not breaker.admitting() and breaker.ranking_rate() == float("inf")
    breaker.disable()
    assert breaker.admitting()
    breaker.reset()
    for _ in range(3):
        with pytest.raises(ConnectionError):
            breaker.call(_boom)
    assert breaker.state is BreakerState.OPEN and not breaker.admitting()
    fake.advance(config.open_duration)
    assert breaker.admitting()  # half-open: admits its probe
    assert breaker.state is BreakerState.HALF_OPEN


async def _adrive(breaker: CircuitBreaker, outcomes: list[bool], clock: FakeClock) -> list[object]:
    """`_drive()` through the async faces (decorator and ``call_async()``)."""

    async def aok() -> int:
        return 1

    async def aboom() -> int:
        raise ConnectionError("down")

    ok, boom = breaker(aok), breaker(aboom)
    seen: list[object] = []
    for i, success in enumerate(outcomes):
        try:
            if i % 2:
                await (ok if success else boom)()
            else:
                await breaker.call_async(aok if success else aboom)
        except (ConnectionError, CircuitOpenError) as exc:
            seen.append(type(exc).__name__)
        seen.append(breaker.snapshot())
        clock.advance(0.4)
    return seen


@st.composite
def runs(draw: st.DrawFn) -> list[bool]:
    """Outcomes in runs: long runs of successes fill a window (settled), failures break it."""
    outcomes: list[bool] = []
    for success, n in draw(st.lists(st.tuples(st.booleans(), st.integers(1, 14)), max_size=8)):
        outcomes += [success] * n
    return outcomes


@settings(max_examples=80, deadline=None)
@given(config=configs(), outcomes=runs(), run_async=st.booleans())
def test_a_window_full_of_successes_skips_its_successes_and_still_trips_like_the_permit_path(
    config: BreakerConfig, outcomes: list[bool], run_async: bool
) -> None:
    def drive(breaker: CircuitBreaker, clock: FakeClock) -> list[object]:
        if run_async:
            return asyncio.run(_adrive(breaker, outcomes, clock))
        return _drive(breaker, outcomes, clock)

    with fake_clock(1000.0) as clock:
        lean = drive(CircuitBreaker("b", config), clock)
    with fake_clock(1000.0) as clock:
        permits = CircuitBreaker("b", config)
        permits.events.subscribe(lambda event: None, kinds=OutcomeRecorded)
        assert lean == drive(permits, clock)


@pytest.mark.parametrize("face", ["decorator", "call"])
def test_a_rate_breaker_after_a_window_of_successes_opens_at_exactly_its_threshold(
    fake: FakeClock, face: str
) -> None:
    config = BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, window_size=4, minimum_calls=4
    )
    breaker = CircuitBreaker("b", config)
    ok, boom = (
        (breaker(_ok), breaker(_boom))
        if face == "decorator"
        else (
            lambda: breaker.call(_ok),
            lambda: breaker.call(_boom),
        )
    )
    for _ in range(10):  # the window is full of successes: later ones change nothing
        ok()
    assert breaker.snapshot().calls == 4
    with pytest.raises(ConnectionError):
        boom()  # 1 failure in 4 calls
    assert breaker.state is BreakerState.CLOSED
    ok()  # 1 in 4 still: the success replaced a success
    assert (breaker.snapshot().calls, breaker.snapshot().failures) == (4, 1)
    for _ in range(3):
        ok()  # the failure leaves the window
    assert (breaker.snapshot().calls, breaker.snapshot().failures) == (4, 0)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            boom()  # 1 in 4, then 2 in 4: 50 %
    assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize("face", ["decorator", "call"])
def test_a_rate_breaker_reconfigured_to_a_lower_threshold_opens_on_its_next_success(
    fake: FakeClock, face: str
) -> None:
    config = BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, window_size=4, minimum_calls=4
    )
    breaker = CircuitBreaker("b", config)
    ok = breaker(_ok) if face == "decorator" else (lambda: breaker.call(_ok))
    with pytest.raises(ConnectionError):
        breaker.call(_boom)
    for _ in range(3):
        ok()  # 1 failure in 4 calls: under 50 %
    ok()  # the failure leaves: 0 in 4
    with pytest.raises(ConnectionError):
        breaker.call(_boom)  # 1 in 4, judged: no verdict
    ok()
    assert breaker.state is BreakerState.CLOSED
    breaker.reconfigure(replace(config, failure_rate_threshold=0.25))
    ok()  # the same 1 in 4, judged again under the new threshold
    assert breaker.state is BreakerState.OPEN


def test_a_success_that_brings_a_window_to_its_minimum_calls_is_judged(fake: FakeClock) -> None:
    config = BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, window_size=10, minimum_calls=3
    )
    breaker = CircuitBreaker("b", config)
    ok = breaker(_ok)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            breaker.call(_boom)
    assert breaker.state is BreakerState.CLOSED  # 2 calls: under minimum_calls
    ok()  # 2 failures in 3 calls
    assert breaker.state is BreakerState.OPEN
