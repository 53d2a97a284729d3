"""The retry engine: the decorator and the block form, sync and async (asyncio and trio).

Time is a fake clock wherever delays matter, so the tests assert what the
engine accounted (attempts, delays it slept, the elapsed time it measured)
and never how fast the machine is.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapunk_recovery import (
    AttemptFinished,
    CallFinished,
    Classification,
    DeadlineExceeded,
    ErrorCategory,
    Event,
    GaveUp,
    GiveUpReason,
    HintIgnored,
    Jitter,
    RecoveryError,
    RetryConfig,
    RetryExhausted,
    RetryPolicy,
    RetryScheduled,
    TokenBudget,
    current_attempt,
    deadline,
    final_reason,
    register_rule,
    retry,
    retrying,
    subscribe,
    unregister_rule,
)
from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery.testing import fake_clock, instant_retries
from tests.engine_helpers import Flaky

NO_JITTER = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_delay=100.0, max_attempts=4)


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock(1000.0) as fake:
        yield fake


@pytest.fixture
def events() -> Iterator[list[Event]]:
    seen: list[Event] = []
    unsubscribe = subscribe(seen.append)
    try:
        yield seen
    finally:
        unsubscribe()


# -- the decorator, sync ---------------------------------------------------------------


def test_a_flaky_call_succeeds_after_retries_with_the_computed_delays(clock: FakeClock) -> None:
    flaky = Flaky(2)
    wrapped = retry(NO_JITTER)(flaky)
    assert wrapped() == "ok"
    assert flaky.calls == 3
    assert clock.slept == [1.0, 2.0]
    assert flaky.attempts_seen == [1, 2, 3]


def test_giving_up_reraises_the_last_error_itself_with_a_note(clock: FakeClock) -> None:
    wrapped = retry(NO_JITTER)(Flaky(10))
    with pytest.raises(ConnectionError, match="failure 4") as info:
        wrapped()
    note = info.value.__notes__[-1]
    assert "gave up after 4 attempts" in note and "max_attempts=4" in note
    assert "7.000 s" in note  # 1 + 2 + 4 s of fake sleeping, measured by the engine
    assert clock.slept == [1.0, 2.0, 4.0]


def test_a_bare_retry_is_bounded_and_retries_only_what_classify_calls_retryable() -> None:
    with instant_retries():
        transient = Flaky(100)
        with pytest.raises(ConnectionError):
            retry(transient)()
        assert transient.calls == 3
        bug = Flaky(100, error=ValueError)
        with pytest.raises(ValueError) as info:
            retry(bug)()
        assert bug.calls == 1
        assert not getattr(info.value, "__notes__", None)  # a first-try bug is left alone


def test_on_accepts_types_and_predicates() -> None:
    with instant_retries():
        by_type = Flaky(2, error=KeyError)
        assert retry(on=KeyError)(by_type)() == "ok"
        by_pred = Flaky(2, error=ValueError)
        assert retry(on=lambda e: "failure" in str(e))(by_pred)() == "ok"
        not_listed = Flaky(2, error=ValueError)
        with pytest.raises(ValueError):
            retry(on=(KeyError, ConnectionError))(not_listed)()
        assert not_listed.calls == 1


def test_retry_if_result_retries_returned_failures_and_keeps_the_last_result() -> None:
    answers = iter([503, 503, 200])
    with instant_retries():
        assert retry(retry_if_result=lambda status: status >= 500)(lambda: next(answers))() == 200
        always = retry(RetryConfig(max_attempts=2), retry_if_result=lambda s: s == 503)(lambda: 503)
        with pytest.raises(RetryExhausted) as info:
            always()
    assert info.value.last_result == 503
    assert info.value.attempts == 2


def test_errors_an_inner_layer_made_final_are_never_retried() -> None:
    def inner() -> None:
        exc = ConnectionError("budget said no")
        from datapunk_recovery import mark_final

        mark_final(exc, "retry budget exhausted")
        raise exc

    calls = 0

    def counted() -> None:
        nonlocal calls
        calls += 1
        inner()

    with instant_retries(), pytest.raises(ConnectionError):
        retry(on=Exception)(counted)()
    assert calls == 1


def test_the_signature_and_metadata_are_kept() -> None:
    def add(a: int, b: int = 2) -> int:
        """Adds."""
        return a + b

    wrapped = retry(add)
    assert wrapped(1) == 3
    assert wrapped.__name__ == "add" and wrapped.__doc__ == "Adds."
    assert inspect.signature(wrapped) == inspect.signature(add)
    assert wrapped.operation.endswith("add")


def test_retry_with_overrides_settings_for_one_call_site(clock: FakeClock) -> None:
    flaky = Flaky(5)
    wrapped = retry(NO_JITTER)(flaky)
    assert wrapped.retry_with(max_attempts=6, base_delay=0.5)() == "ok"
    assert clock.slept == [0.5, 1.0, 2.0, 4.0, 8.0]
    with pytest.raises(TypeError, match="retry_with"):
        wrapped.retry_with(max_attempt=2)


# -- deadlines ----------------------------------------------------------------------------


def test_a_sleep_that_would_end_past_the_deadline_is_not_started(clock: FakeClock) -> None:
    config = RetryConfig(jitter=Jitter.NONE, base_delay=1.0, max_attempts=10, deadline=5.0)
    wrapped = retry(config)(Flaky(100))
    with pytest.raises(ConnectionError) as info:
        wrapped()
    assert clock.slept == [1.0, 2.0]  # the next wait (4 s) would end past 5 s
    assert "deadline" in info.value.__notes__[-1]
    assert wrapped.statistics().giveups == {GiveUpReason.DEADLINE: 1}


def test_an_outer_deadline_block_limits_every_retry_inside(clock: FakeClock) -> None:
    wrapped = retry(NO_JITTER)(Flaky(100))
    with deadline(2.5), pytest.raises(ConnectionError):
        wrapped()
    assert clock.slept == [1.0]


def test_a_deadline_that_already_passed_prevents_the_first_attempt(clock: FakeClock) -> None:
    flaky = Flaky(0)
    with deadline(1.0):
        clock.advance(2.0)
        with pytest.raises(DeadlineExceeded):
            retry(flaky)()
    assert flaky.calls == 0


@settings(max_examples=60)
@given(
    st.floats(0.01, 20.0),
    st.lists(st.floats(0.0, 3.0), min_size=1, max_size=12),
    st.sampled_from(list(Jitter)),
    st.integers(0, 2**16),
)
def test_the_engine_never_overruns_its_deadline(
    limit: float, durations: list[float], kind: Jitter, seed: int
) -> None:
    import random

    config = RetryConfig(
        max_attempts=None, deadline=limit, jitter=kind, base_delay=0.2, max_delay=5.0
    )
    with fake_clock(0.0) as fake:
        steps = iter(durations)
        starts: list[float] = []
        lasted: list[float] = []

        def work() -> None:
            starts.append(fake.now())
            lasted.append(next(steps, 0.5))
            fake.advance(lasted[-1])
            raise ConnectionError

        with pytest.raises((ConnectionError, DeadlineExceeded)):
            retry(config, rng=random.Random(seed))(work)()
    # Every attempt starts before the deadline, and no sleep carries the clock
    # past it: only a running (sync, uninterruptible) attempt may.
    assert starts and all(start < limit for start in starts)
    assert fake.now() <= max(limit, starts[-1] + lasted[-1]) + 1e-9


# -- server-given delays and per-category policies ----------------------------------------


def _hinted(hint: object) -> RecoveryError:
    return RecoveryError(
        "throttled", category=ErrorCategory.RATE_LIMITED, retryable=True, retry_after=hint
    )  # type: ignore[arg-type]


def test_a_server_hint_longer_than_the_backoff_is_obeyed(
    clock: FakeClock, events: list[Event]
) -> None:
    errors = iter([_hinted(30.0)])

    def call() -> str:
        exc = next(errors, None)
        if exc:
            raise exc
        return "ok"

    assert retry(NO_JITTER)(call)() == "ok"
    assert clock.slept == [30.0]
    scheduled = [e for e in events if isinstance(e, RetryScheduled)]
    assert scheduled[0].from_server and scheduled[0].delay == 30.0


def test_an_absurd_hint_makes_the_engine_give_up_at_once(
    clock: FakeClock, events: list[Event]
) -> None:
    def call() -> None:
        raise _hinted(3600.0)

    with pytest.raises(RecoveryError) as info:
        retry(NO_JITTER)(call)()
    assert clock.slept == []
    assert "max_server_delay" in info.value.__notes__[-1]
    assert [e.reason for e in events if isinstance(e, GaveUp)] == [
        GiveUpReason.SERVER_DELAY_TOO_LONG
    ]


def test_a_garbage_hint_is_ignored_with_an_event(clock: FakeClock, events: list[Event]) -> None:
    errors = iter([_hinted(float("nan"))])

    def call() -> str:
        exc = next(errors, None)
        if exc:
            raise exc
        return "ok"

    assert retry(NO_JITTER)(call)() == "ok"
    assert clock.slept == [1.0]
    assert [e.value for e in events if isinstance(e, HintIgnored)] == ["nan"]


def test_each_error_category_can_have_its_own_policy(clock: FakeClock) -> None:
    slow = RetryConfig(jitter=Jitter.NONE, base_delay=10.0, max_delay=100.0, max_attempts=5)
    policy = RetryPolicy(NO_JITTER, per_category={ErrorCategory.RATE_LIMITED: slow})
    errors = iter([ConnectionError(), _hinted(None), _hinted(None)])

    def call() -> str:
        exc = next(errors, None)
        if exc:
            raise exc
        return "ok"

    assert retry(policy)(call)() == "ok"
    # retry 1 (network) follows the default; retries 2 and 3 the rate-limit policy
    assert clock.slept == [1.0, 20.0, 40.0]


def test_user_rules_feed_the_engine() -> None:
    rule = register_rule(
        lambda e: Classification(ErrorCategory.CACHE, True) if isinstance(e, KeyError) else None
    )
    try:
        with instant_retries():
            assert retry(Flaky(2, error=KeyError))() == "ok"
    finally:
        unregister_rule(rule)


# -- events and statistics ------------------------------------------------------------------


def test_the_event_stream_tells_the_whole_story(clock: FakeClock) -> None:
    seen: list[Event] = []
    wrapped = retry(NO_JITTER, name="payments.charge")(Flaky(1))
    wrapped.events.subscribe(seen.append)
    wrapped()
    kinds = [type(e) for e in seen]
    assert kinds == [AttemptFinished, RetryScheduled, AttemptFinished, CallFinished]
    assert all(e.operation == "payments.charge" for e in seen)
    final = seen[-1]
    assert isinstance(final, CallFinished) and final.outcome == "success_after_retry"
    assert final.elapsed == pytest.approx(1.0)


def test_nobody_listening_builds_no_event(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    original = AttemptFinished.__init__

    def spy(self: AttemptFinished, **kwargs: Any) -> None:
        built.append("x")
        original(self, **kwargs)

    monkeypatch.setattr(AttemptFinished, "__init__", spy)
    with instant_retries():
        retry(Flaky(1))()
    assert built == []


def test_a_failing_subscriber_never_breaks_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    unsubscribe = subscribe(broken)
    try:
        with instant_retries():
            assert retry(Flaky(1))() == "ok"
    finally:
        unsubscribe()
    assert "subscriber" in caplog.text


def test_statistics_are_exact_under_concurrent_threads() -> None:
    lock = threading.Lock()
    counter = {"n": 0}

    def sometimes() -> str:
        with lock:
            counter["n"] += 1
            n = counter["n"]
        if n % 3 == 0:
            raise ConnectionError
        return "ok"

    wrapped = retry(RetryConfig(base_delay=0.0, max_delay=0.0, max_attempts=5))(sometimes)
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(500):
            wrapped()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = wrapped.statistics()
    assert stats.calls == stats.successes == 4000
    assert stats.attempts == counter["n"]
    assert stats.retries == counter["n"] - 4000


@pytest.mark.anyio
async def test_statistics_are_exact_under_concurrent_tasks() -> None:
    calls = 0

    @retry(RetryConfig(base_delay=0.0, max_delay=0.0, max_attempts=5))
    async def sometimes() -> str:
        nonlocal calls
        calls += 1
        n = calls
        await anyio.lowlevel.checkpoint()  # interleave the tasks between attempts
        if n % 3 == 0 and current_attempt() < 3:  # some calls retry, none runs out
            raise ConnectionError
        return "ok"

    async def worker() -> None:
        for _ in range(50):
            await sometimes()

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(worker)
    stats = sometimes.statistics()
    assert stats.calls == stats.successes == 1000
    assert stats.attempts == calls
    assert stats.retries == calls - 1000


# -- the block form ---------------------------------------------------------------------------


def test_the_block_form_retries_a_block(clock: FakeClock) -> None:
    flaky = Flaky(2)
    numbers = []
    for attempt in retrying(NO_JITTER):
        with attempt:
            numbers.append(attempt.number)
            result = flaky()
    assert result == "ok"
    assert numbers == [1, 2, 3]
    assert clock.slept == [1.0, 2.0]


def test_the_block_form_gives_up_like_the_decorator(clock: FakeClock) -> None:
    with pytest.raises(ConnectionError) as info:  # noqa: PT012
        for attempt in retrying(NO_JITTER):
            with attempt:
                raise ConnectionError("down")
    assert "gave up after 4 attempts" in info.value.__notes__[-1]


# -- async: asyncio and trio -----------------------------------------------------------------


@pytest.mark.anyio
async def test_async_functions_are_retried(clock: FakeClock) -> None:
    calls = 0

    @retry(NO_JITTER)
    async def fetch(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise TimeoutError
        return x * current_attempt()

    assert await fetch(7) == 21
    assert clock.slept == [1.0, 2.0]


@pytest.mark.anyio
async def test_the_async_block_form() -> None:
    calls = 0
    with instant_retries():
        async for attempt in retrying():
            with attempt:
                calls += 1
                if calls < 2:
                    raise ConnectionError
    assert calls == 2


@pytest.mark.anyio
async def test_an_async_attempt_is_cancelled_when_the_deadline_passes() -> None:
    started = anyio.Event()

    @retry(RetryConfig(deadline=0.05))
    async def hang() -> None:
        started.set()
        await anyio.sleep_forever()

    with pytest.raises(DeadlineExceeded) as info:
        await hang()
    assert started.is_set()
    assert hang.statistics().giveups == {GiveUpReason.DEADLINE: 1}
    assert final_reason(info.value) == "DeadlineExceeded"


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["attempt", "sleep"])
async def test_cancellation_propagates_at_once_and_is_never_retried(where: str) -> None:
    calls = 0
    in_attempt = anyio.Event()
    raised = anyio.Event()

    @retry(
        RetryConfig(base_delay=60.0, max_delay=60.0, jitter=Jitter.NONE, max_attempts=5),
        on=BaseException,
    )
    async def work() -> None:
        nonlocal calls
        calls += 1
        if where == "attempt":
            in_attempt.set()
            await anyio.sleep_forever()
        raised.set()
        raise ConnectionError  # then the engine sleeps 60 s, with no checkpoint before

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        if where == "attempt":
            await in_attempt.wait()
        else:
            await raised.wait()
        tg.cancel_scope.cancel()
    assert calls == 1
    stats = work.statistics()
    assert (stats.calls, stats.failures, stats.successes) == (0, 0, 0)


@pytest.mark.parametrize("fatal", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_interpreter_exits_are_never_retried_even_with_on_base_exception(
    fatal: type[BaseException],
) -> None:
    calls = 0

    @retry(on=BaseException)
    def work() -> None:
        nonlocal calls
        calls += 1
        raise fatal

    with pytest.raises(fatal):
        work()
    assert calls == 1
    assert work.statistics().calls == 0


def test_asyncio_cancellation_inside_the_block_form_is_untouched() -> None:
    async def main() -> int:
        calls = 0
        with pytest.raises(asyncio.CancelledError):  # noqa: PT012
            async for attempt in retrying(on=BaseException):
                with attempt:
                    calls += 1
                    raise asyncio.CancelledError
        return calls

    assert asyncio.run(main()) == 1


# -- bad settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on": 42}, "on="),
        ({"on": (KeyError, "x")}, "on="),
        ({"retry_if_result": 3}, "retry_if_result"),
        ({"budget": object()}, "budget"),
    ],
)
def test_bad_settings_are_refused_when_decorating(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        retry(**kwargs)(lambda: None)


def test_a_wrong_policy_type_is_refused() -> None:
    with pytest.raises(TypeError, match="RetryConfig or RetryPolicy"):
        retry({"max_attempts": 3})  # type: ignore[call-overload]


# -- a failed attempt's frames die before the next attempt (issue 14, item 4)


class _Held:
    """Counts live instances: an object held by a failed attempt's frame."""

    live = 0

    def __init__(self) -> None:
        _Held.live += 1

    def __del__(self) -> None:
        _Held.live -= 1


def test_a_retried_attempts_frames_are_released_before_the_next_attempt() -> None:
    import gc

    seen_at_start: list[int] = []

    def flaky() -> str:
        seen_at_start.append(_Held.live)
        buffers = [_Held() for _ in range(4)]  # held by this frame
        if len(seen_at_start) < 3:
            raise ConnectionError(f"reset after {len(buffers)} buffers")
        return "ok"

    async def aflaky() -> str:
        return flaky()

    gc.collect()
    gc.disable()  # reference counting alone must free them
    try:
        for budget in (None, TokenBudget()):
            seen_at_start.clear()
            assert (
                retry(RetryConfig(max_attempts=3, base_delay=0.0), budget=budget)(flaky)() == "ok"
            )
            assert seen_at_start == [0, 0, 0]
            seen_at_start.clear()
            wrapped = retry(RetryConfig(max_attempts=3, base_delay=0.0), budget=budget)(aflaky)
            assert asyncio.run(wrapped()) == "ok"
            assert seen_at_start == [0, 0, 0]
        assert _Held.live == 0
    finally:
        gc.enable()


def test_the_block_forms_failed_attempts_frames_are_released_before_the_next_attempt() -> None:
    import gc

    seen_at_start: list[int] = []

    def attempt_body() -> str:
        seen_at_start.append(_Held.live)
        buffers = [_Held() for _ in range(4)]  # held by this frame
        if len(seen_at_start) < 3:
            raise ConnectionError(f"reset after {len(buffers)} buffers")
        return "ok"

    gc.collect()
    gc.disable()  # reference counting alone must free them
    try:
        for attempt in retrying(RetryConfig(max_attempts=3, base_delay=0.0)):
            with attempt:
                result = attempt_body()
        assert result == "ok"
        assert seen_at_start == [0, 0, 0]
    finally:
        gc.enable()


def _read_with_buffers(how: str) -> None:
    """Fail deep inside, holding buffers only in this frame; chain the failure as ``how`` says."""
    buffers = [_Held() for _ in range(4)]  # held by this frame only
    try:
        raise KeyError(f"no page after {len(buffers)} buffers")
    except KeyError as inner:
        if how == "cause":
            raise ConnectionError("read failed") from inner
        raise ConnectionError("read failed")  # noqa: B904 - the implicit __context__ is the point


def test_frames_held_only_by_a_failed_attempts_chained_errors_are_freed_before_retrying() -> None:
    import gc

    seen_at_start: list[int] = []

    def flaky(how: str) -> str:
        seen_at_start.append(_Held.live)
        if len(seen_at_start) < 3:
            try:
                _read_with_buffers(how)
            except ConnectionError as exc:  # chain once more: the buffers sit two links down
                raise TimeoutError("gave up reading") from exc
        return "ok"

    async def aflaky(how: str) -> str:
        return flaky(how)

    gc.collect()
    gc.disable()  # reference counting alone must free them
    try:
        for how in ("cause", "context"):
            seen_at_start.clear()
            assert retry(RetryConfig(max_attempts=3, base_delay=0.0))(flaky)(how) == "ok"
            assert seen_at_start == [0, 0, 0]
            seen_at_start.clear()
            wrapped = retry(RetryConfig(max_attempts=3, base_delay=0.0))(aflaky)
            assert asyncio.run(wrapped(how)) == "ok"
            assert seen_at_start == [0, 0, 0]
            seen_at_start.clear()
            for attempt in retrying(RetryConfig(max_attempts=3, base_delay=0.0)):
                with attempt:
                    result = flaky(how)
            assert result == "ok"
            assert seen_at_start == [0, 0, 0]
        assert _Held.live == 0
    finally:
        gc.enable()


def test_the_final_error_reaches_the_caller_with_its_whole_chain_and_traceback() -> None:
    import traceback

    def always_fails() -> str:
        try:
            _read_with_buffers("cause")
        except ConnectionError as exc:
            raise TimeoutError("gave up reading") from exc
        return "unreachable"

    with pytest.raises(TimeoutError) as caught:
        retry(RetryConfig(max_attempts=3, base_delay=0.0))(always_fails)()
    final = caught.value
    assert isinstance(final.__cause__, ConnectionError)
    assert isinstance(final.__cause__.__cause__, KeyError)
    text = "".join(traceback.format_exception(final))
    assert "always_fails" in text and "_read_with_buffers" in text
    assert "no page after 4 buffers" in text
    # the last attempt's frames are the caller's to inspect: nothing cleared them
    tb = final.__cause__.__cause__.__traceback__
    assert tb is not None
    assert len(tb.tb_frame.f_locals["buffers"]) == 4


def test_a_chained_error_held_by_a_suspended_generator_leaves_that_generator_running() -> None:
    closed: list[bool] = []

    def reader() -> Iterator[BaseException]:
        try:
            try:
                raise KeyError("page")
            except KeyError as exc:  # caught here: its traceback starts at this frame
                while True:
                    yield exc  # suspended, still handing out what it caught
        finally:
            closed.append(True)

    pages = reader()
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("read failed") from next(pages)
        return "ok"

    assert retry(RetryConfig(max_attempts=3, base_delay=0.0))(flaky)() == "ok"
    assert closed == []  # clearing the frame of a suspended generator would have closed it
    assert isinstance(next(pages), KeyError)
    pages.close()
    assert closed == [True]


def test_a_chain_that_loops_back_on_itself_is_walked_once_and_retried() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            first, second = ConnectionError("first"), ConnectionError("second")
            first.__context__ = second
            second.__cause__ = first  # a loop: first -> second -> first
            raise first
        return "ok"

    assert retry(RetryConfig(max_attempts=3, base_delay=0.0))(flaky)() == "ok"
    assert len(calls) == 3


def test_an_error_raised_again_from_a_running_frame_is_retried_with_that_frame_intact() -> None:
    marker = "still here"  # a local of this running frame, which the stored error passed through
    try:
        raise ConnectionError("stored")
    except ConnectionError as exc:
        stored = exc  # its traceback holds this (running) frame
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise stored
        return marker

    assert retry(RetryConfig(max_attempts=3, base_delay=0.0))(flaky)() == "still here"
    assert len(calls) == 3
    assert marker == "still here"
