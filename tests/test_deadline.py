"""Overall deadlines: published by ``with``, enforced by ``async with``, earliest wins."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from datapunk_recovery._core import events
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.errors import DeadlineExceeded
from datapunk_recovery._execution.deadline import (
    DeadlineExpired,
    check,
    deadline,
    deadline_at,
    expired,
    remaining,
)
from datapunk_recovery._execution.engine import retry
from datapunk_recovery.testing import fake_clock


def test_no_deadline_outside_any_block() -> None:
    assert remaining() is None
    assert deadline_at() is None
    assert not expired()
    check("anything")  # nothing to enforce


def test_a_block_publishes_its_deadline_on_the_library_clock() -> None:
    with fake_clock(100.0) as clock, deadline(2.0) as at:
        assert at == 102.0
        assert deadline_at() == 102.0
        clock.advance(0.5)
        assert remaining() == 1.5
    assert remaining() is None


def test_nested_deadlines_take_the_earliest() -> None:
    with fake_clock() as clock:
        with deadline(5.0) as outer:
            with deadline(1.0) as inner:
                assert inner == 1.0  # earlier than the outer: it wins
            with deadline(10.0) as later:
                assert later == outer == 5.0  # cannot extend the outer one
            clock.advance(4.0)
            with deadline(3.0) as shrunk:
                assert shrunk == 5.0
        assert remaining() is None


def test_check_and_expired_follow_the_clock() -> None:
    with fake_clock() as clock, deadline(1.0):
        check("step")
        clock.advance(1.0)
        assert expired()
        assert remaining() == 0.0
        with pytest.raises(DeadlineExceeded, match="step: the deadline passed"):
            check("step")


def test_a_deadline_object_is_entered_once() -> None:
    block = deadline(1.0)
    with block, pytest.raises(RuntimeError, match="already entered"), block:
        pass


def test_deadline_seconds_are_validated() -> None:
    with pytest.raises(ValueError, match=r"deadline.seconds: must be >= 0"):
        deadline(-1.0)
    with pytest.raises(TypeError, match=r"deadline.seconds: expected a number"):
        deadline("soon")  # type: ignore[arg-type]


def test_the_retry_engine_never_sleeps_past_the_deadline() -> None:
    calls = 0

    @retry(RetryConfig(max_attempts=10, base_delay=1.0, jitter="none"), on=ConnectionError)
    def flaky() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError

    with fake_clock() as clock, deadline(2.5), pytest.raises(ConnectionError):
        flaky()
    # slept 1 s, then 2 s would end at 3 s > 2.5 s: gave up instead.
    assert clock.slept == [1.0]
    assert calls == 2


@pytest.mark.anyio
async def test_async_deadline_cancels_the_block_and_raises_deadline_exceeded() -> None:
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    try:
        with pytest.raises(DeadlineExceeded, match=r"'fetch': the deadline of 0\.01 s passed"):
            async with deadline(0.01, name="fetch"):
                await anyio.sleep_forever()
    finally:
        unsubscribe()
    assert [type(e) for e in seen] == [DeadlineExpired]
    assert remaining() is None


@pytest.mark.anyio
async def test_async_deadline_lets_a_fast_block_finish() -> None:
    async with deadline(30.0) as at:
        assert deadline_at() == at
        await anyio.lowlevel.checkpoint()
    assert deadline_at() is None


@pytest.mark.anyio
async def test_nested_async_deadlines_fire_once_as_deadline_exceeded() -> None:
    with pytest.raises(DeadlineExceeded) as info:
        async with deadline(0.01, name="outer"), deadline(5.0, name="inner"):
            await anyio.sleep_forever()
    assert "'outer'" in str(info.value)  # the earliest deadline's block reports it


@pytest.mark.anyio
async def test_inner_async_deadline_enforces_a_sync_outer_one() -> None:
    with deadline(0.01, name="published"), pytest.raises(DeadlineExceeded):
        async with deadline(5.0, name="enforcing"):
            await anyio.sleep_forever()


@pytest.mark.anyio
async def test_outside_cancellation_is_not_turned_into_deadline_exceeded() -> None:
    with anyio.CancelScope() as scope:
        async with deadline(30.0):
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert remaining() is None


@pytest.mark.anyio
async def test_errors_inside_an_async_deadline_pass_through() -> None:
    with pytest.raises(KeyError):
        async with deadline(30.0):
            raise KeyError("x")
