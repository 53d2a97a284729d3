"""Batch recovery: only the failed items are retried, and every item gets its own report."""

from __future__ import annotations

import asyncio

import pytest

from datapunk_recovery._core import errors, events
from datapunk_recovery._core.backoff import Jitter, RetryConfig
from datapunk_recovery._core.errors import RecoveryError
from datapunk_recovery._execution.deadline import deadline
from datapunk_recovery.budget import TokenBudget
from datapunk_recovery.resource import (
    BatchFailed,
    BatchFinished,
    BatchRound,
    recover_batch,
    recover_batch_sync,
)
from datapunk_recovery.testing import fake_clock

NO_WAIT = RetryConfig(max_attempts=3, base_delay=0.0)


class Flaky:
    """A bulk API: item ``x`` fails with ``error`` for its first ``fails[x]`` calls."""

    def __init__(self, fails: dict[int, int], error: type[Exception] = ConnectionResetError):
        self.fails = dict(fails)
        self.error = error
        self.calls: list[list[int]] = []

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.calls.append(list(items))
        out: list[int | BaseException] = []
        for x in items:
            if self.fails.get(x, 0) > 0:
                self.fails[x] -= 1
                out.append(self.error(f"item {x}"))
            else:
                out.append(x * 10)
        return out


def test_only_failed_items_are_retried_and_results_keep_input_order() -> None:
    api = Flaky({2: 1, 4: 2})
    report = recover_batch_sync(api, [1, 2, 3, 4], config=NO_WAIT)
    assert api.calls == [[1, 2, 3, 4], [2, 4], [4]]
    assert report.values() == [10, 20, 30, 40]
    assert [o.attempts for o in report.outcomes] == [1, 2, 1, 3]
    assert (report.ok, report.rounds) == (True, 3)


def test_items_that_cannot_succeed_stop_at_once_and_are_reported() -> None:
    api = Flaky({2: 5}, error=ValueError)  # a bad item: not retryable
    report = recover_batch_sync(api, [1, 2, 3], config=NO_WAIT)
    assert api.calls == [[1, 2, 3]]
    [failed] = report.failed
    assert (failed.index, failed.item, failed.attempts) == (1, 2, 1)
    assert isinstance(failed.error, ValueError)
    assert [o.value for o in report.succeeded] == [10, 30]
    with pytest.raises(BatchFailed, match=r"1 of 3 items failed after 1 round") as caught:
        report.values()
    assert caught.value.report is report


def test_attempts_are_bounded_per_item() -> None:
    api = Flaky({1: 99})
    report = recover_batch_sync(api, [1, 2], config=NO_WAIT)
    assert api.calls == [[1, 2], [1], [1]]
    assert [(o.succeeded, o.attempts) for o in report.outcomes] == [(False, 3), (True, 1)]


def test_a_batch_call_that_raises_fails_every_item_it_was_given() -> None:
    calls: list[list[str]] = []

    def bulk(items: list[str]) -> list[str]:
        calls.append(items)
        if len(calls) == 1:
            raise ConnectionResetError("the whole request was lost")
        return [s.upper() for s in items]

    report = recover_batch_sync(bulk, ["a", "b"], config=NO_WAIT)
    assert calls == [["a", "b"], ["a", "b"]]
    assert report.values() == ["A", "B"]


def test_rounds_are_spaced_by_backoff_and_server_delays() -> None:
    class Throttled(RecoveryError):
        retryable = True

    calls: list[list[int]] = []

    def bulk(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        return [Throttled(retry_after=2.0) if x == 1 and len(calls) == 1 else x for x in items]

    seen: list[events.Event] = []
    bus = events.EventBus()
    bus.subscribe(seen.append)
    config = RetryConfig(max_attempts=3, base_delay=0.5, jitter=Jitter.NONE)
    with fake_clock() as clock:
        report = recover_batch_sync(bulk, [1, 2], config=config, name="index", bus=bus)
    assert clock.slept == [2.0]  # the server's 2 s beat the computed 0.5 s
    assert report.ok
    rounds = [e for e in seen if isinstance(e, BatchRound)]
    assert [(e.attempted, e.succeeded, e.retrying, e.delay) for e in rounds] == [
        (2, 1, 1, 2.0),
        (1, 1, 0, 0.0),
    ]
    [done] = [e for e in seen if isinstance(e, BatchFinished)]
    assert (done.operation, done.items, done.failed, done.rounds) == ("index", 2, 0, 2)


def test_no_round_starts_that_would_end_past_the_deadline() -> None:
    api = Flaky({1: 5})
    config = RetryConfig(max_attempts=10, base_delay=1.0, jitter=Jitter.NONE)
    with fake_clock(), deadline(2.5):
        report = recover_batch_sync(api, [1], config=config)
    assert len(api.calls) == 2  # waits 1 s, then a 2 s wait would pass the deadline
    assert not report.ok


def test_the_retry_budget_is_asked_per_item() -> None:
    class Budget:
        def __init__(self, retries: int) -> None:
            self.retries = retries
            self.attempts: list[bool] = []

        def on_attempt(self, succeeded: bool) -> None:
            self.attempts.append(succeeded)

        def allow_retry(self) -> bool:
            self.retries -= 1
            return self.retries >= 0

    budget = Budget(retries=1)
    api = Flaky({1: 1, 2: 1})
    report = recover_batch_sync(api, [1, 2], config=NO_WAIT, budget=budget)
    assert api.calls == [[1, 2], [1]]
    assert budget.attempts == [False, False, True]
    refused = report.outcomes[1]
    assert not refused.succeeded
    assert refused.error is not None and errors.final_reason(refused.error) is not None


def test_outcomes_must_match_the_items() -> None:
    with pytest.raises(ValueError, match="returned 1 outcomes for 2 items"):
        recover_batch_sync(lambda items: items[:1], [1, 2])


@pytest.mark.anyio
async def test_async_batches_are_awaited() -> None:
    calls: list[list[int]] = []

    async def bulk(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        return [ConnectionResetError() if x == 2 and len(calls) == 1 else -x for x in items]

    report = await recover_batch(bulk, [1, 2, 3], config=NO_WAIT)
    assert calls == [[1, 2, 3], [2]]
    assert report.values() == [-1, -2, -3]


@pytest.mark.anyio
async def test_a_cancellation_among_the_outcomes_is_raised_not_reported() -> None:
    def bulk(items: list[int]) -> list[int | BaseException]:
        return [asyncio.CancelledError()] * len(items)

    with pytest.raises(asyncio.CancelledError):
        await recover_batch(bulk, [1], config=NO_WAIT)


def test_a_cancellation_after_other_outcomes_counts_none_of_them() -> None:
    budget = TokenBudget()

    def bulk(items: list[int]) -> list[int | BaseException]:
        return [ConnectionError("one"), 2, KeyboardInterrupt()]

    with pytest.raises(KeyboardInterrupt):
        recover_batch_sync(bulk, [1, 2, 3], config=NO_WAIT, budget=budget)
    assert budget.tokens == budget.config.max_tokens  # neither the failure nor the success


# -- a failed round's frames die before the next round (issue 14, item 4)


class _Buffer:
    """Counts live instances: memory held by a failed round's frame."""

    live = 0

    def __init__(self) -> None:
        _Buffer.live += 1

    def __del__(self) -> None:
        _Buffer.live -= 1


class Leaky:
    """A bulk call that holds a buffer per item; its first round fails (whole or per item)."""

    def __init__(self, whole: bool) -> None:
        self.whole = whole
        self.live_at_start: list[int] = []

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.live_at_start.append(_Buffer.live)
        buffers = [_Buffer() for _ in items]
        if len(self.live_at_start) == 1:
            if self.whole:
                raise ConnectionResetError(f"lost after {len(buffers)} buffers")
            try:
                raise ConnectionResetError("item lost")
            except ConnectionResetError as exc:  # its traceback holds this frame
                return [exc for _ in items]
        return [x * 2 for x in items]


@pytest.mark.parametrize("whole", [True, False], ids=["whole_batch_error", "item_errors"])
def test_a_failed_rounds_frames_are_released_before_the_next_round(whole: bool) -> None:
    import gc

    gc.collect()
    gc.disable()  # reference counting alone must free them
    try:
        leaky = Leaky(whole)
        report = recover_batch_sync(leaky, [1, 2, 3], config=NO_WAIT)
        assert report.values() == [2, 4, 6]
        assert leaky.live_at_start == [0, 0]

        async def run() -> list[int]:
            leaky2 = Leaky(whole)
            report = await recover_batch(leaky2, [1, 2, 3], config=NO_WAIT)
            assert leaky2.live_at_start == [0, 0]
            return report.values()

        assert asyncio.run(run()) == [2, 4, 6]
        assert _Buffer.live == 0
    finally:
        gc.enable()
