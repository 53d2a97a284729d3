"""The retry engine pinned to what it decides, not only to its bounds.

Every delay the engine sleeps is compared with the one its configuration
draws from the same seeded generator; the deadline is used up to the last
sleep that fits, to the boundary; every setting survives ``retry_with``; the
block form leaves no context behind.  Time is a fake clock throughout.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from itertools import islice
from typing import Any

import anyio
import pytest

from datapunk_recovery import (
    AttemptFinished,
    CallFinished,
    DeadlineExceeded,
    ErrorCategory,
    Event,
    EventBus,
    GaveUp,
    GiveUpReason,
    HintIgnored,
    Jitter,
    RecoveryError,
    RetryConfig,
    RetryExhausted,
    RetryPolicy,
    RetryScheduled,
    current_attempt,
    deadline,
    final_reason,
    retry,
    retrying,
)
from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._execution.deadline import remaining
from datapunk_recovery.testing import fake_clock
from tests.engine_helpers import Flaky

NO_JITTER = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_delay=100.0, max_attempts=4)


class Gate:
    """A retry budget that records what the engine told it and refuses after ``allow``."""

    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.outcomes: list[bool] = []
        self.asked = 0

    def on_attempt(self, succeeded: bool) -> None:
        self.outcomes.append(succeeded)

    def allow_retry(self) -> bool:
        self.asked += 1
        return self.asked <= self.allow


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock(1000.0) as fake:
        yield fake


def seeded(config: RetryConfig, seed: int, n: int) -> list[float]:
    return list(islice(config.delays(random.Random(seed)), n))


# -- the rng and the jitter kinds through the engine ----------------------------------


@pytest.mark.parametrize("kind", list(Jitter))
def test_the_engine_sleeps_exactly_the_seeded_delays_of_every_kind(
    clock: FakeClock, kind: Jitter
) -> None:
    config = RetryConfig(jitter=kind, base_delay=1.0, max_delay=50.0, max_attempts=6)
    wrapped = retry(config, rng=random.Random(7))(Flaky(5))
    assert wrapped() == "ok"
    assert clock.slept == [d for d in seeded(config, 7, 5) if d > 0.0]
    assert len(clock.slept) == 5


@pytest.mark.parametrize("kind", [Jitter.DECORRELATED, Jitter.DECORRELATED_V2])
def test_the_block_form_sleeps_the_seeded_decorrelated_delays(
    clock: FakeClock, kind: Jitter
) -> None:
    config = RetryConfig(jitter=kind, base_delay=1.0, max_delay=50.0, max_attempts=5)
    for attempt in retrying(config, rng=random.Random(3)):
        with attempt:
            if attempt.number < 5:
                raise ConnectionError
    assert clock.slept == seeded(config, 3, 4)


def test_each_category_keeps_its_own_decorrelated_sequence(clock: FakeClock) -> None:
    net = RetryConfig(jitter=Jitter.DECORRELATED, base_delay=1.0, max_delay=50.0, max_attempts=9)
    rate = RetryConfig(jitter=Jitter.DECORRELATED, base_delay=2.0, max_delay=80.0, max_attempts=9)
    policy = RetryPolicy(net, per_category={ErrorCategory.RATE_LIMITED: rate})
    limited = RecoveryError("slow down", category=ErrorCategory.RATE_LIMITED, retryable=True)
    errors = iter([ConnectionError(), limited, ConnectionError(), limited])

    def call() -> str:
        exc = next(errors, None)
        if exc is not None:
            raise exc
        return "ok"

    assert retry(policy, rng=random.Random(5))(call)() == "ok"
    # One generator feeds both sequences, in the order the delays are drawn.
    rng = random.Random(5)
    a, b = net.delays(rng), rate.delays(rng)
    assert clock.slept == [next(a), next(b), next(a), next(b)]


def test_a_zero_base_delay_never_sleeps_whatever_the_kind(clock: FakeClock) -> None:
    for kind in Jitter:
        config = RetryConfig(jitter=kind, base_delay=0.0, max_delay=0.0, max_attempts=4)
        assert retry(config)(Flaky(3))() == "ok"
    assert clock.slept == []


# -- the deadline, used to the last sleep that fits -----------------------------------------


def test_the_last_sleep_that_ends_before_the_deadline_is_taken(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=10, deadline=7.5)
    with pytest.raises(ConnectionError):
        retry(config)(Flaky(100))()
    assert clock.slept == [1.0, 2.0, 4.0]  # 7 s slept; the next 8 s would not fit


def test_a_sleep_that_would_end_exactly_at_the_deadline_is_not_started(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=10, deadline=7.0)
    flaky = Flaky(100)
    with pytest.raises(ConnectionError) as info:
        retry(config)(flaky)()
    assert clock.slept == [1.0, 2.0]  # after 3 s, a 4 s wait would leave no time to try
    assert flaky.calls == 3
    assert "would end past the deadline (4.000 s left)" in info.value.__notes__[-1]


def test_less_than_a_second_left_still_allows_a_retry_without_delay(clock: FakeClock) -> None:
    config = RetryConfig(base_delay=0.0, max_delay=0.0, max_attempts=5, deadline=2.0)
    flaky = Flaky(2, takes=0.75, clock=clock)
    assert retry(config)(flaky)() == "ok"  # the third attempt starts with 0.5 s left
    assert flaky.calls == 3


def test_an_outer_deadline_sooner_than_the_own_one_wins(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=10, deadline=100.0)
    with deadline(3.5), pytest.raises(ConnectionError):
        retry(config)(Flaky(100))()
    assert clock.slept == [1.0, 2.0]


def test_an_outer_deadline_later_than_the_own_one_does_not_extend_it(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=10, deadline=3.5)
    with deadline(100.0), pytest.raises(ConnectionError):
        retry(config)(Flaky(100))()
    assert clock.slept == [1.0, 2.0]


def test_a_hint_of_exactly_the_time_left_is_not_obeyed(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=5, deadline=10.0)

    def call() -> None:
        raise RecoveryError("busy", retryable=True, retry_after=10.0)

    with pytest.raises(RecoveryError) as info:
        retry(config)(call)()
    assert clock.slept == []
    assert "would end past the deadline (10.000 s left)" in info.value.__notes__[-1]


def test_the_async_engine_uses_the_deadline_to_the_last_sleep(clock: FakeClock) -> None:
    import asyncio

    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=10, deadline=7.5)
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError

    with pytest.raises(ConnectionError):
        asyncio.run(retry(config)(work)())
    assert clock.slept == [1.0, 2.0, 4.0]
    assert calls == 4


# -- async: the block form sleeps, retry_if_result works ------------------------------------


@pytest.mark.anyio
async def test_the_async_block_form_sleeps_between_attempts(clock: FakeClock) -> None:
    seen = []
    async for attempt in retrying(NO_JITTER):
        with attempt:
            seen.append((attempt.number, current_attempt()))
            if attempt.number < 3:
                raise ConnectionError
    assert clock.slept == [1.0, 2.0]
    assert seen == [(1, 1), (2, 2), (3, 3)]


@pytest.mark.anyio
async def test_async_retry_if_result_retries_rejected_results(clock: FakeClock) -> None:
    answers = iter([503, 503, 200])

    async def fetch() -> int:
        return next(answers)

    wrapped = retry(NO_JITTER, retry_if_result=lambda status: status >= 500)(fetch)
    assert await wrapped() == 200
    assert clock.slept == [1.0, 2.0]


@pytest.mark.anyio
async def test_async_retry_if_result_gives_up_with_the_last_result(clock: FakeClock) -> None:
    async def fetch() -> int:
        return 503

    wrapped = retry(NO_JITTER, retry_if_result=lambda status: status >= 500)(fetch)
    with pytest.raises(RetryExhausted) as info:
        await wrapped()
    assert (info.value.last_result, info.value.attempts) == (503, 4)
    assert clock.slept == [1.0, 2.0, 4.0]


# -- retry_with keeps every setting it does not change --------------------------------------


def test_retry_with_keeps_the_on_types(clock: FakeClock) -> None:
    wrapped = retry(NO_JITTER, on=KeyError)(Flaky(2, error=KeyError))
    assert wrapped.retry_with(max_attempts=5)() == "ok"
    refused = retry(NO_JITTER, on=KeyError)(Flaky(2, error=ConnectionError))
    with pytest.raises(ConnectionError):
        refused.retry_with(max_attempts=5)()


def test_retry_with_keeps_the_on_predicate(clock: FakeClock) -> None:
    flaky = Flaky(2, error=ConnectionError)
    wrapped = retry(NO_JITTER, on=lambda e: False)(flaky)
    with pytest.raises(ConnectionError):
        wrapped.retry_with(max_attempts=5)()
    assert flaky.calls == 1


def test_retry_with_a_new_on_replaces_the_old_one(clock: FakeClock) -> None:
    flaky = Flaky(2, error=KeyError)
    wrapped = retry(NO_JITTER, on=ValueError)(flaky)
    assert wrapped.retry_with(on=KeyError)() == "ok"
    assert flaky.calls == 3


def test_retry_with_keeps_retry_if_result(clock: FakeClock) -> None:
    answers = iter([503, 200])
    wrapped = retry(NO_JITTER, retry_if_result=lambda s: s >= 500)(lambda: next(answers))
    assert wrapped.retry_with(max_attempts=2)() == 200
    assert clock.slept == [1.0]


def test_retry_with_a_new_retry_if_result_replaces_the_old_one(clock: FakeClock) -> None:
    answers = iter([404, 200])
    wrapped = retry(NO_JITTER, retry_if_result=lambda s: s >= 500)(lambda: next(answers))
    assert wrapped.retry_with(retry_if_result=lambda s: s != 200)() == 200


def test_retry_with_keeps_the_budget(clock: FakeClock) -> None:
    gate = Gate(allow=1)
    flaky = Flaky(100)
    wrapped = retry(NO_JITTER, budget=gate)(flaky)  # type: ignore[arg-type]
    with pytest.raises(ConnectionError) as info:
        wrapped.retry_with(max_attempts=10)()
    assert flaky.calls == 2
    assert gate.outcomes == [False, False]
    assert final_reason(info.value) == "retry budget exhausted"


def test_retry_with_keeps_the_rng(clock: FakeClock) -> None:
    wrapped = retry(NO_JITTER, rng=random.Random(11))(Flaky(3))
    full = RetryConfig(base_delay=1.0, max_delay=100.0, max_attempts=4)
    assert wrapped.retry_with(full)() == "ok"
    assert clock.slept == seeded(full, 11, 3)


def test_retry_with_keeps_the_bus_name_and_statistics(clock: FakeClock) -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    wrapped = retry(NO_JITTER, name="orders.load", bus=bus)(Flaky(1))
    other = wrapped.retry_with(max_attempts=2)
    assert other() == "ok"
    assert other.operation == "orders.load" and other.events is bus
    assert [type(e) for e in seen] == [
        AttemptFinished,
        RetryScheduled,
        AttemptFinished,
        CallFinished,
    ]
    assert {e.operation for e in seen} == {"orders.load"}
    assert wrapped.statistics().retries == 1


def test_retry_with_a_changed_setting_keeps_the_other_settings(clock: FakeClock) -> None:
    config = RetryConfig(
        jitter=Jitter.NONE, base_delay=2.0, max_delay=5.0, exponential_base=3.0, max_attempts=3
    )
    wrapped = retry(config)(Flaky(100))
    with pytest.raises(ConnectionError):
        wrapped.retry_with(max_attempts=4)()
    assert clock.slept == [2.0, 5.0, 5.0]


# -- the budget through the engine ------------------------------------------------------


def test_the_budget_hears_every_attempt_and_is_asked_before_every_retry(clock: FakeClock) -> None:
    gate = Gate(allow=10)
    assert retry(NO_JITTER, budget=gate)(Flaky(2))() == "ok"  # type: ignore[arg-type]
    assert gate.outcomes == [False, False, True]
    assert gate.asked == 2


def test_a_refusing_budget_stops_the_block_form(clock: FakeClock) -> None:
    gate = Gate(allow=0)
    with pytest.raises(ConnectionError) as info:  # noqa: PT012
        for attempt in retrying(NO_JITTER, budget=gate):  # type: ignore[arg-type]
            with attempt:
                raise ConnectionError
    assert gate.outcomes == [False]
    assert final_reason(info.value) == "retry budget exhausted"


# -- the block form leaves no context behind ------------------------------------------------


def test_the_block_form_resets_the_attempt_and_deadline_after_each_block(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=3, deadline=50.0)
    inside: list[tuple[int, float | None]] = []
    between: list[tuple[int, float | None]] = []
    for attempt in retrying(config):
        with attempt:
            inside.append((current_attempt(), remaining()))
            if attempt.number < 3:
                raise ConnectionError
        between.append((current_attempt(), remaining()))
    assert inside == [(1, 50.0), (2, 49.0), (3, 47.0)]
    assert between == [(1, None)] * 3
    assert (current_attempt(), remaining()) == (1, None)


def test_the_block_form_resets_the_context_when_it_gives_up(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=2, deadline=50.0)
    with pytest.raises(ConnectionError):  # noqa: PT012
        for attempt in retrying(config):
            with attempt:
                raise ConnectionError
    assert (current_attempt(), remaining()) == (1, None)


def test_the_decorator_resets_the_context_after_the_call(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=3, deadline=50.0)
    seen: list[tuple[int, float | None]] = []

    def work() -> str:
        seen.append((current_attempt(), remaining()))
        if len(seen) < 2:
            raise ConnectionError
        return "ok"

    assert retry(config)(work)() == "ok"
    assert seen == [(1, 50.0), (2, 49.0)]
    assert (current_attempt(), remaining()) == (1, None)


def test_the_block_form_checks_the_deadline_before_each_attempt(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=10, deadline=5.0)
    numbers = []
    with pytest.raises(ConnectionError) as info:  # noqa: PT012
        for attempt in retrying(config):
            numbers.append(attempt.number)
            with attempt:
                raise ConnectionError
            clock.advance(10.0)  # time spent between the blocks, outside any attempt
    assert numbers == [1]
    assert clock.slept == []
    assert info.value.__notes__[-1].endswith("the deadline passed")


def test_the_block_form_reports_its_give_up(clock: FakeClock) -> None:
    seen: list[Event] = []
    bus = EventBus()
    bus.subscribe(seen.append)
    with pytest.raises(ConnectionError):  # noqa: PT012
        for attempt in retrying(NO_JITTER, name="block", bus=bus):
            with attempt:
                raise ConnectionError
    gave_up = [e for e in seen if isinstance(e, GaveUp)]
    assert [(e.operation, e.attempts, e.reason) for e in gave_up] == [
        ("block", 4, GiveUpReason.ATTEMPTS)
    ]
    assert clock.slept == [1.0, 2.0, 4.0]


@pytest.mark.anyio
async def test_the_async_block_form_never_starts_a_wait_past_the_deadline(
    clock: FakeClock,
) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=10, deadline=5.0)
    numbers = []
    with pytest.raises(ConnectionError):  # noqa: PT012
        async for attempt in retrying(config):
            numbers.append(attempt.number)
            with attempt:
                raise ConnectionError
            clock.advance(4.5)  # 0.5 s left: the 1 s wait would end past the deadline
    assert numbers == [1]
    assert clock.slept == []


@pytest.mark.anyio
async def test_a_later_async_attempt_is_cut_at_the_time_left_not_the_whole_deadline(
    clock: FakeClock,
) -> None:
    # The fake clock says 0.04 s are left when the second attempt starts; it
    # takes 0.2 s of real time, so only a timeout of the whole deadline (0.5 s)
    # would let it finish.  No listener: the engine must still know when it began.
    config = RetryConfig(jitter=Jitter.NONE, base_delay=0.01, max_attempts=5, deadline=0.5)
    calls = 0

    async def work() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            clock.advance(0.45)
            raise ConnectionError
        await anyio.sleep(0.2)
        return "ok"

    with pytest.raises(DeadlineExceeded, match="during attempt 2"):
        await retry(config)(work)()
    assert calls == 2


# -- what the engine reports: events, notes, statistics, exactly -----------------------------

NET = ErrorCategory.NETWORK


def _listened(name: str = "op") -> tuple[EventBus, list[Event]]:
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    return bus, seen


def test_the_event_stream_of_a_call_that_recovers(clock: FakeClock) -> None:
    bus, seen = _listened()
    flaky = Flaky(2, takes=0.5, clock=clock)
    assert retry(NO_JITTER, name="op", bus=bus)(flaky)() == "ok"
    assert seen == [
        AttemptFinished(
            operation="op",
            at=1000.5,
            attempt=1,
            duration=0.5,
            succeeded=False,
            error_type="ConnectionError",
            category=NET,
        ),
        RetryScheduled(
            operation="op",
            at=1000.5,
            retry=1,
            delay=1.0,
            from_server=False,
            category=NET,
            error_type="ConnectionError",
        ),
        AttemptFinished(
            operation="op",
            at=1002.0,
            attempt=2,
            duration=0.5,
            succeeded=False,
            error_type="ConnectionError",
            category=NET,
        ),
        RetryScheduled(
            operation="op",
            at=1002.0,
            retry=2,
            delay=2.0,
            from_server=False,
            category=NET,
            error_type="ConnectionError",
        ),
        AttemptFinished(operation="op", at=1004.5, attempt=3, duration=0.5, succeeded=True),
        CallFinished(operation="op", at=1004.5, attempts=3, elapsed=4.5, succeeded=True),
    ]


def test_the_event_stream_of_a_call_that_gives_up(clock: FakeClock) -> None:
    bus, seen = _listened()
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=2)
    with pytest.raises(ConnectionError):
        retry(config, name="op", bus=bus)(Flaky(9, takes=0.5, clock=clock))()
    assert seen[-2:] == [
        GaveUp(
            operation="op",
            at=1002.0,
            attempts=2,
            elapsed=2.0,
            reason=GiveUpReason.ATTEMPTS,
            error_type="ConnectionError",
        ),
        CallFinished(operation="op", at=1002.0, attempts=2, elapsed=2.0, succeeded=False),
    ]


def test_a_first_try_success_is_one_event_for_a_subscriber_of_every_kind(
    clock: FakeClock,
) -> None:
    bus, seen = _listened()
    assert retry(NO_JITTER, name="op", bus=bus)(Flaky(0, takes=0.5, clock=clock))() == "ok"
    assert seen == [
        CallFinished(operation="op", at=1000.5, attempts=1, elapsed=0.5, succeeded=True),
    ]
    assert isinstance(seen[0], CallFinished) and seen[0].first_try


def test_a_first_try_success_reaches_a_subscriber_of_attempts_only_as_its_attempt(
    clock: FakeClock,
) -> None:
    bus, everything = _listened()
    attempts: list[Event] = []
    calls: list[Event] = []
    bus.subscribe(attempts.append, kinds={AttemptFinished})
    bus.subscribe(calls.append, kinds={CallFinished})
    assert retry(NO_JITTER, name="op", bus=bus)(Flaky(0, takes=0.5, clock=clock))() == "ok"
    call = CallFinished(operation="op", at=1000.5, attempts=1, elapsed=0.5, succeeded=True)
    assert everything == calls == [call]
    assert attempts == [
        AttemptFinished(operation="op", at=1000.5, attempt=1, duration=0.5, succeeded=True)
    ]


def test_a_rejected_result_is_reported_as_such(clock: FakeClock) -> None:
    bus, seen = _listened()
    answers = iter([503, 200])
    wrapped = retry(NO_JITTER, name="op", bus=bus, retry_if_result=lambda s: s >= 500)
    assert wrapped(lambda: next(answers))() == 200
    first = seen[0]
    assert isinstance(first, AttemptFinished)
    assert (first.error_type, first.category) == ("rejected result", ErrorCategory.UNKNOWN)


@pytest.mark.parametrize("deadline_s", [None, 1000.0])
def test_statistics_count_every_call_attempt_retry_and_give_up(
    clock: FakeClock, deadline_s: float | None
) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=4, deadline=deadline_s)
    outcomes = iter([0, 2, 9])
    flaky = Flaky(0)

    def work() -> str:
        return flaky()

    wrapped = retry(config)(work)
    for failures in outcomes:
        flaky.failures, flaky.calls = failures, 0
        with contextlib.suppress(ConnectionError):
            wrapped()
    stats = wrapped.statistics()
    assert (stats.calls, stats.successes, stats.failures) == (3, 2, 1)
    assert (stats.attempts, stats.retries) == (8, 5)
    assert dict(stats.giveups) == {GiveUpReason.ATTEMPTS: 1}


def test_the_give_up_note_after_a_first_failure_on_the_fast_path(clock: FakeClock) -> None:
    with pytest.raises(ConnectionError) as info:
        retry(NO_JITTER, name="op")(Flaky(9))()
    assert info.value.__notes__ == [
        "datapunk-recovery: 'op' gave up after 4 attempts, 7.000 s after the first failure: "
        "max_attempts=4 reached"
    ]


def test_the_give_up_note_counts_from_the_start_on_the_slow_path(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=2, deadline=60.0)
    with pytest.raises(ConnectionError) as info:
        retry(config, name="op")(Flaky(9, takes=0.25, clock=clock))()
    assert info.value.__notes__ == [
        "datapunk-recovery: 'op' gave up after 2 attempts, 1.500 s in all: max_attempts=2 reached"
    ]


def test_a_first_attempt_that_is_not_retryable_gets_no_note(clock: FakeClock) -> None:
    with pytest.raises(ValueError) as info:
        retry(NO_JITTER)(Flaky(9, error=ValueError))()
    assert getattr(info.value, "__notes__", []) == []


def test_a_later_attempt_that_is_not_retryable_says_why(clock: FakeClock) -> None:
    errors = iter([ConnectionError(), ValueError("bug")])

    def work() -> None:
        raise next(errors)

    with pytest.raises(ValueError) as info:
        retry(NO_JITTER, name="op")(work)()
    assert info.value.__notes__[-1].endswith(
        "gave up after 2 attempts, 1.000 s after the first failure: ValueError is not retryable"
    )


def test_a_later_attempt_an_inner_layer_made_final_says_which(clock: FakeClock) -> None:
    from datapunk_recovery import CircuitOpenError

    errors = iter([ConnectionError(), CircuitOpenError("b", 1.0)])

    def work() -> None:
        raise next(errors)

    with pytest.raises(CircuitOpenError) as info:
        retry(NO_JITTER, on=Exception)(work)()
    assert info.value.__notes__[-1].endswith(": an inner layer forbade retrying (CircuitOpenError)")


def test_a_budget_refusal_at_the_first_failure_says_one_attempt(clock: FakeClock) -> None:
    with pytest.raises(ConnectionError) as info:
        retry(NO_JITTER, name="op", budget=Gate(allow=0))(Flaky(9))()  # type: ignore[arg-type]
    assert info.value.__notes__[-1] == (
        "datapunk-recovery: 'op' gave up after 1 attempt, 0.000 s in all: the retry budget refused"
    )


def test_a_budget_refusal_of_a_rejected_result_raises_retry_exhausted(clock: FakeClock) -> None:
    gate = Gate(allow=0)
    wrapped = retry(NO_JITTER, budget=gate, retry_if_result=bool)  # type: ignore[arg-type]
    with pytest.raises(RetryExhausted) as info:
        wrapped(lambda: 1)()
    assert info.value.attempts == 1
    assert final_reason(info.value) is None


def test_retry_exhausted_says_how_many_attempts_over_how_long(clock: FakeClock) -> None:
    wrapped = retry(NO_JITTER, name="op", retry_if_result=bool)(lambda: 1)
    with pytest.raises(RetryExhausted) as info:
        wrapped()
    assert str(info.value) == "'op': every attempt returned a rejected result"
    assert info.value.__notes__ == ["datapunk-recovery: 4 attempts over 7.000 s"]


def test_a_deadline_passed_before_the_first_attempt_says_so(clock: FakeClock) -> None:
    with deadline(1.0):
        clock.advance(1.0)
        with pytest.raises(DeadlineExceeded) as info:
            retry(NO_JITTER, name="op")(Flaky(0))()
    assert str(info.value) == "'op': the deadline passed before attempt 1"


def test_a_hint_beyond_the_time_left_gives_up_saying_so(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=5, deadline=10.0)

    def call() -> None:
        raise RecoveryError("busy", retryable=True, retry_after=20.0)

    with pytest.raises(RecoveryError) as info:
        retry(config)(call)()
    assert info.value.__notes__[-1].endswith(
        "the server asked to wait 20.000 s, more than the time left"
    )


@pytest.mark.parametrize(
    ("hint", "shown"),
    [
        ("x" * 38, "'" + "x" * 38 + "'"),
        ("z" * 39, "'" + "z" * 36 + "..."),
        ("y" * 60, "'" + "y" * 36 + "..."),
    ],
)
def test_an_ignored_hint_is_shown_cut_to_forty_characters(
    clock: FakeClock, hint: str, shown: str
) -> None:
    bus, seen = _listened()
    errors = iter([RecoveryError("busy", retryable=True, retry_after=hint)])  # type: ignore[arg-type]

    def call() -> str:
        exc = next(errors, None)
        if exc is not None:
            raise exc
        return "ok"

    assert retry(NO_JITTER, name="op", bus=bus)(call)() == "ok"
    ignored = [e for e in seen if isinstance(e, HintIgnored)]
    assert [(e.operation, e.value, e.at) for e in ignored] == [("op", shown, 1000.0)]
    assert ignored[0].reason == "server delay is not a finite number >= 0"


def test_a_first_try_success_with_a_budget_is_reported_to_it(clock: FakeClock) -> None:
    gate = Gate(allow=5)
    assert retry(NO_JITTER, budget=gate)(Flaky(0))() == "ok"  # type: ignore[arg-type]
    assert (gate.outcomes, gate.asked) == ([True], 0)


# -- arguments, names and the less travelled paths --------------------------------------------


def _echo_after(failures: int) -> Any:
    calls = 0

    def echo(a: int, b: int, *, c: int) -> tuple[int, int, int]:
        nonlocal calls
        calls += 1
        if calls <= failures:
            raise ConnectionError
        return a, b, c

    return echo


@pytest.mark.parametrize("deadline_s", [None, 60.0])
def test_arguments_reach_every_attempt(clock: FakeClock, deadline_s: float | None) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=3, deadline=deadline_s)
    assert retry(config)(_echo_after(1))(1, 2, c=3) == (1, 2, 3)
    assert retry(config)(_echo_after(0))(1, 2, c=3) == (1, 2, 3)


@pytest.mark.anyio
@pytest.mark.parametrize("deadline_s", [None, 60.0])
async def test_arguments_reach_every_async_attempt(
    clock: FakeClock, deadline_s: float | None
) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=3, deadline=deadline_s)
    sync = _echo_after(1)

    async def echo(a: int, b: int, *, c: int) -> tuple[int, int, int]:
        return sync(a, b, c=c)  # type: ignore[no-any-return]

    assert await retry(config)(echo)(1, 2, c=3) == (1, 2, 3)
    assert clock.slept == [1.0]


@pytest.mark.anyio
@pytest.mark.parametrize("deadline_s", [None, 60.0])
async def test_an_async_error_that_is_not_retryable_is_not_retried(
    clock: FakeClock, deadline_s: float | None
) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=3, deadline=deadline_s)
    errors = iter([ConnectionError(), ValueError("bug")]) if deadline_s else iter([ValueError()])
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1
        raise next(errors)

    with pytest.raises(ValueError):
        await retry(config)(work)()
    assert calls == (2 if deadline_s else 1)


@pytest.mark.anyio
async def test_async_events_measure_each_attempt(clock: FakeClock) -> None:
    bus, seen = _listened()

    async def work() -> str:
        clock.advance(0.25)
        if len(seen) < 2:
            raise ConnectionError
        return "ok"

    assert await retry(NO_JITTER, name="op", bus=bus)(work)() == "ok"
    finished = [(e.attempt, e.duration) for e in seen if isinstance(e, AttemptFinished)]
    assert finished == [(1, 0.25), (2, 0.25)]


@pytest.mark.anyio
async def test_an_async_deadline_passed_exactly_prevents_the_first_attempt(
    clock: FakeClock,
) -> None:
    calls = 0

    async def work() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    with deadline(1.0):
        clock.advance(1.0)
        with pytest.raises(DeadlineExceeded, match="before attempt 1"):
            await retry(NO_JITTER)(work)()
    assert calls == 0


def test_the_block_form_does_not_start_once_the_deadline_passed(clock: FakeClock) -> None:
    ran = []
    with deadline(1.0):
        clock.advance(1.0)
        it = retrying(NO_JITTER)
        with pytest.raises(DeadlineExceeded, match="before attempt 1"):
            next(it)
        with pytest.raises(StopIteration):
            next(it)  # ended, and stays ended
    assert ran == []


def test_a_block_form_that_gave_up_stays_ended(clock: FakeClock) -> None:
    it = retrying(NO_JITTER)
    attempt = next(it)
    with pytest.raises(ValueError), attempt:
        raise ValueError("not retryable")
    with pytest.raises(StopIteration):
        next(it)


def test_a_block_form_cancelled_stays_ended(clock: FakeClock) -> None:
    it = retrying(NO_JITTER)
    attempt = next(it)
    with pytest.raises(KeyboardInterrupt), attempt:
        raise KeyboardInterrupt
    with pytest.raises(StopIteration):
        next(it)


def test_a_block_form_past_its_deadline_between_blocks_stays_ended(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=5, deadline=5.0)
    it = retrying(config)
    attempt = next(it)
    with attempt:
        raise ConnectionError
    clock.advance(4.0)  # 1 s left, and the wait is 1 s: it would end at the deadline
    with pytest.raises(ConnectionError):
        next(it)
    assert clock.slept == []
    with pytest.raises(StopIteration):
        next(it)


def test_the_block_form_retries_at_once_with_little_time_left(clock: FakeClock) -> None:
    config = RetryConfig(base_delay=0.0, max_delay=0.0, max_attempts=5, deadline=5.0)
    numbers = []
    for attempt in retrying(config):
        numbers.append(attempt.number)
        with attempt:
            if attempt.number == 1:
                raise ConnectionError
        clock.advance(4.5)
    assert numbers == [1, 2]


def test_the_block_form_keeps_its_on_and_default_name(clock: FakeClock) -> None:
    seen: list[Event] = []
    from datapunk_recovery import subscribe

    unsubscribe = subscribe(seen.append)
    try:
        for attempt in retrying(NO_JITTER, on=KeyError):
            with attempt:
                if attempt.number == 1:
                    raise KeyError("k")
    finally:
        unsubscribe()
    assert {e.operation for e in seen} == {"retrying"}
    assert clock.slept == [1.0]


def test_an_inner_deadline_inside_a_retry_without_one(clock: FakeClock) -> None:
    inner_config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=3, deadline=10.0)
    inner = retry(inner_config)(Flaky(1))
    # retry_if_result puts the outer call on the slow path: it sets a context
    # with an attempt number and no deadline.
    outer = retry(NO_JITTER, retry_if_result=lambda r: False)(lambda: (inner(), remaining())[1])
    assert outer() is None
    assert clock.slept == [1.0]


def test_the_operation_is_named_after_the_function() -> None:
    def job() -> None:
        pass

    assert retry(job).operation == f"{job.__module__}.{job.__qualname__}"
    assert retry(NO_JITTER)(job).operation == f"{job.__module__}.{job.__qualname__}"
    job.__module__ = None  # type: ignore[assignment]
    assert retry(job).operation == job.__qualname__


def test_a_callable_object_is_named_by_its_repr() -> None:
    class Job:
        def __call__(self) -> None:
            pass

        def __repr__(self) -> str:
            return "Job()"

    assert retry(Job()).operation == f"{Job.__module__}.Job()"


def test_statistics_count_each_reason_for_giving_up(clock: FakeClock) -> None:
    not_retryable = retry(NO_JITTER)(Flaky(9, error=ValueError))
    with pytest.raises(ValueError):
        not_retryable()
    assert dict(not_retryable.statistics().giveups) == {GiveUpReason.NON_RETRYABLE: 1}
    refused = retry(NO_JITTER, budget=Gate(allow=0))(Flaky(9))  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        refused()
    assert dict(refused.statistics().giveups) == {GiveUpReason.BUDGET: 1}


def test_retry_with_keeps_the_per_category_policies(clock: FakeClock) -> None:
    slow = RetryConfig(jitter=Jitter.NONE, base_delay=10.0, max_delay=100.0, max_attempts=5)
    policy = RetryPolicy(NO_JITTER, per_category={ErrorCategory.RATE_LIMITED: slow})
    limited = RecoveryError("slow down", category=ErrorCategory.RATE_LIMITED, retryable=True)
    errors = iter([limited])

    def call() -> str:
        exc = next(errors, None)
        if exc is not None:
            raise exc
        return "ok"

    assert retry(policy)(call).retry_with(max_attempts=6)() == "ok"
    assert clock.slept == [10.0]


def test_a_hint_at_max_server_delay_but_past_the_deadline_blames_the_deadline(
    clock: FakeClock,
) -> None:
    config = RetryConfig(max_attempts=3, deadline=10.0, max_server_delay=20.0)

    def call() -> None:
        raise RecoveryError("busy", retryable=True, retry_after=20.0)

    with pytest.raises(RecoveryError) as info:
        retry(config)(call)()
    assert info.value.__notes__[-1].endswith("more than the time left")


def test_no_time_left_after_an_attempt_gives_up_even_without_a_delay(clock: FakeClock) -> None:
    config = RetryConfig(base_delay=0.0, max_delay=0.0, max_attempts=5, deadline=2.0)
    flaky = Flaky(9, takes=1.0, clock=clock)
    with pytest.raises(ConnectionError) as info:
        retry(config)(flaky)()
    assert flaky.calls == 2
    assert info.value.__notes__[-1].endswith(
        "the next wait (0.000 s) would end past the deadline (0.000 s left)"
    )


def test_the_give_up_note_says_how_little_time_was_left(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=10, deadline=7.5)
    with pytest.raises(ConnectionError) as info:
        retry(config)(Flaky(100))()
    assert info.value.__notes__[-1].endswith(
        "the next wait (8.000 s) would end past the deadline (0.500 s left)"
    )


@pytest.mark.anyio
async def test_an_async_call_under_a_deadline_returns_its_value(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=3, deadline=60.0)

    async def work() -> str:
        return "ok"

    assert await retry(config)(work)() == "ok"


def test_a_block_form_whose_body_skips_the_attempt_raises_instead_of_looping(
    clock: FakeClock,
) -> None:
    handed = []

    def loop() -> None:
        for attempt in retrying(NO_JITTER, name="skipper"):
            handed.append(attempt.number)
            if len(handed) > 10:  # the old behaviour: the same attempt for ever
                break
            continue

    with pytest.raises(RuntimeError, match="'skipper': attempt 1 was never entered"):
        loop()
    assert handed == [1]
    assert clock.slept == []


def test_a_block_form_that_skips_a_later_attempt_raises_and_stays_ended(clock: FakeClock) -> None:
    it = retrying(NO_JITTER)
    with next(it):
        raise ConnectionError
    second = next(it)
    assert second.number == 2
    with pytest.raises(RuntimeError, match="'retrying': attempt 2 was never entered"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.anyio
async def test_an_async_block_form_whose_body_skips_the_attempt_raises(clock: FakeClock) -> None:
    handed = []

    async def loop() -> None:
        async for attempt in retrying(NO_JITTER):
            handed.append(attempt.number)
            if len(handed) > 10:
                break

    with pytest.raises(RuntimeError, match="attempt 1 was never entered"):
        await loop()
    assert handed == [1]


def test_an_attempt_entered_twice_is_refused(clock: FakeClock) -> None:
    it = retrying(NO_JITTER)
    attempt = next(it)
    with attempt:
        raise ConnectionError
    with pytest.raises(RuntimeError, match="attempt 1 was already entered"), attempt:
        pass
