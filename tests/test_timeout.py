"""Per-attempt timeouts: async attempts are cancelled, sync ones are bounded between attempts."""

from __future__ import annotations

import anyio
import pytest

from datapunk_recovery._core import errors, events
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.errors import DeadlineExceeded
from datapunk_recovery._execution.deadline import deadline, remaining
from datapunk_recovery._execution.engine import retry
from datapunk_recovery._execution.timeout import (
    AttemptOverran,
    AttemptTimedOut,
    AttemptTimeout,
    AttemptTimeoutExpired,
)
from datapunk_recovery.testing import fake_clock


def test_seconds_are_validated() -> None:
    with pytest.raises(ValueError, match=r"AttemptTimeout.seconds: must be > 0"):
        AttemptTimeout(0)


def test_attempt_timed_out_is_a_retryable_timeout() -> None:
    verdict = errors.classify(AttemptTimedOut("op", 1.0))
    assert verdict.retryable
    assert verdict.category is errors.ErrorCategory.TIMEOUT
    assert isinstance(AttemptTimedOut("op", 1.0), TimeoutError)


def test_sync_attempt_sees_its_limit_through_remaining() -> None:
    timeout = AttemptTimeout(0.5)
    with fake_clock():
        assert timeout.call(remaining) == 0.5
        with deadline(0.2):
            assert timeout.call(remaining) == pytest.approx(0.2)  # the shorter limit wins
        assert remaining() is None  # withdrawn after the attempt


def test_sync_attempt_is_not_started_when_no_time_is_left() -> None:
    started = []
    with fake_clock() as clock, deadline(1.0):
        clock.advance(1.0)
        with pytest.raises(DeadlineExceeded, match="before the attempt could start"):
            AttemptTimeout(5.0, name="load").call(started.append, 1)
    assert started == []


def test_sync_attempt_that_overran_keeps_its_result_and_reports_it() -> None:
    seen: list[events.Event] = []
    timeout = AttemptTimeout(1.0, name="report")
    timeout.bus.subscribe(seen.append)
    with fake_clock() as clock:

        @timeout
        def slow(x: int) -> int:
            clock.advance(3.0)
            return x * 2

        assert slow(21) == 42
    assert [type(e) for e in seen] == [AttemptOverran]
    overran = seen[0]
    assert isinstance(overran, AttemptOverran)
    assert (overran.limit, overran.duration) == (1.0, 3.0)


@pytest.mark.anyio
async def test_async_attempt_is_cancelled_and_raises_attempt_timed_out() -> None:
    seen: list[events.Event] = []
    timeout = AttemptTimeout(0.01, name="fetch")
    timeout.bus.subscribe(seen.append)

    @timeout
    async def hang() -> None:
        await anyio.sleep_forever()

    with pytest.raises(AttemptTimedOut, match=r"'fetch': the attempt took longer than 0\.01 s"):
        await hang()
    assert [type(e) for e in seen] == [AttemptTimeoutExpired]


@pytest.mark.anyio
async def test_async_attempt_limited_by_the_deadline_raises_deadline_exceeded() -> None:
    async def hang() -> None:
        await anyio.sleep_forever()

    with deadline(0.01), pytest.raises(DeadlineExceeded, match="during the attempt"):
        await AttemptTimeout(30.0).call_async(hang)


@pytest.mark.anyio
async def test_retry_outside_retries_a_timed_out_attempt() -> None:
    attempts = 0
    timeout = AttemptTimeout(0.01)

    @retry(RetryConfig(max_attempts=3, base_delay=0.0))
    @timeout
    async def first_hangs() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await anyio.sleep_forever()
        return "ok"

    assert await first_hangs() == "ok"
    assert attempts == 2


@pytest.mark.anyio
async def test_outside_cancellation_passes_through_untouched() -> None:
    timeout = AttemptTimeout(30.0)

    async def hang() -> None:
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        scope.cancel()
        await timeout.call_async(hang)
    assert scope.cancelled_caught
    assert remaining() is None


@pytest.mark.anyio
async def test_a_timeout_error_raised_by_the_attempt_itself_is_not_rewritten() -> None:
    async def fails() -> None:
        raise TimeoutError("the driver's own")

    with pytest.raises(TimeoutError, match="the driver's own") as info:
        await AttemptTimeout(30.0).call_async(fails)
    assert not isinstance(info.value, AttemptTimedOut)
