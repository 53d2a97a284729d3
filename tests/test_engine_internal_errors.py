"""The engine never replaces the caller's exception with one of its own.

Whatever breaks while the engine decides about a failure or waits before the
next attempt (a delay past what the platform can sleep, a clock that overflows,
a budget that raises), the call fails with the caller's exception, carrying a
note that names the internal error, and the give-up is counted as
``internal_error``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from datapunk_recovery import EventBus, GaveUp, GiveUpReason, Jitter, RetryConfig, retry, retrying
from datapunk_recovery._core import clock


class Refused(ConnectionError):
    """The caller's own failure."""


def absurd_config(seconds: float = 1e10) -> RetryConfig:
    """A configuration made before delays were bounded: waits the platform cannot sleep."""
    config = RetryConfig(max_attempts=3, jitter=Jitter.NONE)
    object.__setattr__(config, "base_delay", seconds)
    object.__setattr__(config, "max_delay", seconds)
    return config


class BrokenBudget:
    """A retry gate that fails when asked (a store bug, say)."""

    def on_attempt(self, succeeded: bool) -> None:
        pass

    def allow_retry(self) -> bool:
        raise RuntimeError("budget store exploded")


class OverflowingClock(clock.FakeClock):
    """A clock whose reading overflows once armed (a platform time_t limit)."""

    armed = False

    def now(self) -> float:
        if self.armed:
            raise OverflowError("timestamp out of range for platform time_t")
        return super().now()


@pytest.fixture
def real_clock() -> Iterator[None]:
    clock.use_clock(None)
    yield
    clock.use_clock(None)


def notes(exc: BaseException) -> str:
    return "\n".join(getattr(exc, "__notes__", []))


def test_a_wait_the_platform_cannot_sleep_keeps_the_callers_exception(real_clock: None) -> None:
    bus = EventBus()
    reasons: list[GiveUpReason] = []
    bus.subscribe(lambda e: reasons.append(e.reason) if isinstance(e, GaveUp) else None)

    @retry(absurd_config(), bus=bus, on=Refused)
    def call() -> None:
        raise Refused("the caller's failure")

    with pytest.raises(Refused, match="the caller's failure") as caught:
        call()
    assert "OverflowError" in notes(caught.value)
    assert "gave up after 1 attempt," in notes(caught.value)
    assert caught.value.__context__ is None  # the internal error is a note, not the context
    assert reasons == [GiveUpReason.INTERNAL_ERROR]
    assert call.statistics().giveups == {GiveUpReason.INTERNAL_ERROR: 1}


def test_a_wait_the_platform_cannot_sleep_ends_a_retrying_block_with_its_error(
    real_clock: None,
) -> None:
    attempts = 0

    def block() -> None:
        nonlocal attempts
        for attempt in retrying(absurd_config(), on=Refused):
            with attempt:
                attempts += 1
                raise Refused("block failure")

    with pytest.raises(Refused) as caught:
        block()
    assert attempts == 1
    assert "OverflowError" in notes(caught.value)


def test_a_rejected_result_still_ends_as_retry_exhausted_when_the_wait_breaks(
    real_clock: None,
) -> None:
    from datapunk_recovery import RetryExhausted

    @retry(absurd_config(), retry_if_result=lambda r: r == 503)
    def call() -> int:
        return 503

    with pytest.raises(RetryExhausted) as caught:
        call()
    assert caught.value.last_result == 503


@pytest.mark.anyio
async def test_a_budget_that_raises_keeps_the_callers_exception_async() -> None:
    config = RetryConfig(max_attempts=3, base_delay=0.0)

    @retry(config, budget=BrokenBudget(), on=Refused)
    async def call() -> None:
        raise Refused("async failure")

    with pytest.raises(Refused, match="async failure") as caught:
        await call()
    assert "RuntimeError: budget store exploded" in notes(caught.value)


def test_a_budget_that_raises_keeps_the_callers_exception_in_a_block() -> None:
    def block() -> None:
        for attempt in retrying(RetryConfig(base_delay=0.0), budget=BrokenBudget(), on=Refused):
            with attempt:
                raise Refused("block")

    with pytest.raises(Refused) as caught:
        block()
    assert "budget store exploded" in notes(caught.value)


def test_a_clock_that_overflows_while_computing_the_wait_keeps_the_callers_exception() -> None:
    fake = OverflowingClock(0.0)
    clock.use_clock(fake)
    try:
        config = dataclasses.replace(RetryConfig(max_attempts=3), deadline=5.0)

        @retry(config, on=Refused)
        def call() -> None:
            fake.armed = True  # the deadline arithmetic after this failure overflows
            raise Refused("sync failure")

        with pytest.raises(Refused, match="sync failure") as caught:
            call()
    finally:
        fake.armed = False
        clock.use_clock(None)
    assert "OverflowError" in notes(caught.value)


class SleepBreaks(clock.FakeClock):
    """A fake clock whose second sleep fails (a platform limit met by a later, longer wait)."""

    sleeps = 0

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        if self.sleeps == 2:
            raise OverflowError("sleep length is too large")
        super().sleep(seconds)


@pytest.fixture
def second_sleep_breaks() -> Iterator[None]:
    clock.use_clock(SleepBreaks())
    yield
    clock.use_clock(None)


#: Waits 1 s, then 2 s (the wait that breaks), then 4 s.
DOUBLING = RetryConfig(max_attempts=4, base_delay=1.0, jitter=Jitter.NONE)


def test_a_wait_that_breaks_late_counts_the_attempts_made_and_names_the_wait(
    second_sleep_breaks: None,
) -> None:
    attempts = 0

    @retry(DOUBLING, on=Refused)
    def call() -> None:
        nonlocal attempts
        attempts += 1
        raise Refused("the caller's failure")

    with pytest.raises(Refused, match="the caller's failure") as caught:
        call()
    assert attempts == 2
    assert "gave up after 2 attempts," in notes(caught.value)
    assert "while waiting 2.0 s: OverflowError: sleep length is too large" in notes(caught.value)
    assert call.statistics().giveups == {GiveUpReason.INTERNAL_ERROR: 1}


@pytest.mark.anyio
async def test_an_async_wait_that_breaks_late_counts_the_attempts_made_and_names_the_wait(
    second_sleep_breaks: None,
) -> None:
    attempts = 0

    @retry(DOUBLING, on=Refused)
    async def call() -> None:
        nonlocal attempts
        attempts += 1
        raise Refused("the caller's failure")

    with pytest.raises(Refused, match="the caller's failure") as caught:
        await call()
    assert attempts == 2
    assert "gave up after 2 attempts," in notes(caught.value)
    assert "while waiting 2.0 s: OverflowError: sleep length is too large" in notes(caught.value)
    assert caught.value.__context__ is None  # the internal error is a note, not the context
    assert call.statistics().giveups == {GiveUpReason.INTERNAL_ERROR: 1}


def test_cancellation_while_waiting_still_passes_through_untouched(real_clock: None) -> None:
    class Interrupting(clock.FakeClock):
        def sleep(self, seconds: float) -> None:
            raise KeyboardInterrupt

    clock.use_clock(Interrupting())
    try:

        @retry(RetryConfig(max_attempts=3, base_delay=1.0, jitter=Jitter.NONE), on=Refused)
        def call() -> None:
            raise Refused("x")

        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        clock.use_clock(None)
