"""The execution layer's waiting helpers, under asyncio and trio alike."""

from __future__ import annotations

import threading

import anyio
import pytest

from datapunk_recovery._execution import runtime as _runtime


@pytest.mark.anyio
async def test_a_task_signal_set_from_another_thread_wakes_the_waiting_task() -> None:
    signal = _runtime.task_signal()
    thread = threading.Thread(target=signal.set)
    thread.start()
    assert await signal.wait(30.0)  # bounded: the thread sets it at once
    thread.join()


@pytest.mark.anyio
async def test_a_task_signal_nobody_sets_reports_the_timeout() -> None:
    assert not await _runtime.task_signal().wait(0.0)


def test_a_thread_signal_set_from_another_thread_wakes_the_blocked_thread() -> None:
    signal = _runtime.thread_signal()
    thread = threading.Thread(target=signal.set)
    thread.start()
    assert signal.wait(30.0)  # bounded: the thread sets it at once
    thread.join()


def test_a_thread_signal_nobody_sets_reports_the_timeout() -> None:
    assert not _runtime.thread_signal().wait(0.0)


@pytest.mark.anyio
async def test_a_task_event_set_by_another_task_wakes_every_waiter() -> None:
    event = _runtime.task_event()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await event.wait()
        woken.append(n)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, 1)
        tg.start_soon(waiter, 2)
        await anyio.wait_all_tasks_blocked()
        assert not event.is_set() and woken == []
        event.set()
    assert event.is_set() and sorted(woken) == [1, 2]


@pytest.mark.anyio
async def test_cancel_after_cancels_the_block_and_says_it_did() -> None:
    blocked = anyio.Event()
    async with _runtime.CancelAfter(0.0) as scope:
        await blocked.wait()  # never set: only the scope ends this
    assert scope.expired and scope.cause is not None


@pytest.mark.anyio
async def test_cancel_after_lets_the_blocks_own_timeout_error_through() -> None:
    with pytest.raises(TimeoutError, match="the block's own"):
        async with _runtime.CancelAfter(60.0) as scope:
            raise TimeoutError("the block's own")
    assert not scope.expired


@pytest.mark.anyio
async def test_shielded_work_ends_even_when_the_task_is_cancelled_meanwhile() -> None:
    finished: list[bool] = []

    async def work() -> str:
        outer.cancel()  # the task is cancelled while the work runs
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        finished.append(True)
        return "done"

    with anyio.CancelScope() as outer:
        await _runtime.shielded(work())
        await anyio.lowlevel.checkpoint()  # where a cancellation still pending lands
    assert finished == [True]  # the cancellation did not cut the work short
    assert outer.cancelled_caught  # and it still reached the caller


@pytest.mark.anyio
async def test_a_race_group_hands_over_results_and_cancels_what_still_runs() -> None:
    never = anyio.Event()
    cancelled: list[bool] = []

    async def quick(value: int) -> int:
        return value

    async def stuck() -> int:
        try:
            await never.wait()
        except BaseException:
            cancelled.append(True)
            raise
        return 0

    async with _runtime.race_group() as group:
        group.start(stuck)
        group.start(quick, 7)
        assert await group.next(30.0) == 7
        assert group.next_nowait() is None
        assert await group.next(0.0) is None  # the stuck one never answers
    assert cancelled == [True]  # leaving the group cancelled it and waited for it


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_asyncio_race_task_that_cancels_itself_is_not_waited_for_forever() -> None:
    import asyncio

    async def gives_up() -> int:
        raise asyncio.CancelledError  # cancelled from inside, nobody cancelled the group

    async def race() -> int | None:
        async with _runtime.race_group() as group:
            group.start(gives_up)
            return await group.next(None)  # unbounded: only the hand-over ends it

    with pytest.raises(asyncio.CancelledError):
        await race()


# -- the asyncio-only helpers (the Redis store, shared breaker and budget use them) ------


def test_running_loop_is_none_outside_asyncio_and_the_loop_inside() -> None:
    import asyncio

    async def inside() -> bool:
        return _runtime.running_loop() is asyncio.get_running_loop()

    assert _runtime.running_loop() is None
    assert asyncio.run(inside())


def test_a_spawned_task_is_reported_pending_by_a_bounded_wait_until_it_ends() -> None:
    import asyncio

    async def main() -> None:
        go = _runtime.AsyncioEvent()
        task = _runtime.spawn(go.wait(), name="owned")
        assert task.get_name() == "owned"
        done, pending = await _runtime.wait_tasks((task,), 0.0)
        assert (done, pending) == (set(), {task})
        go.set()
        done, pending = await _runtime.wait_tasks((task,), 30.0)  # bounded; ends at once
        assert (done, pending) == ({task}, set())

    asyncio.run(main())


def test_wait_event_returns_when_the_event_is_set_or_its_time_is_up() -> None:
    import asyncio

    async def main() -> None:
        event = _runtime.AsyncioEvent()
        await _runtime.wait_event(event, 0.0)  # nobody sets it: the bound ends the wait
        assert not event.is_set()
        _runtime.run_later(0.0, event.set)
        await _runtime.wait_event(event, 30.0)  # bounded; the timer sets it at once
        assert event.is_set()

    asyncio.run(main())


def test_wait_event_lets_the_callers_cancellation_through() -> None:
    import asyncio

    async def main() -> None:
        waiting = _runtime.spawn(_runtime.wait_event(_runtime.AsyncioEvent(), None))
        await _runtime.wait_tasks((waiting,), 0.0)  # let it start waiting
        waiting.cancel()
        await _runtime.wait_tasks((waiting,), 30.0)
        assert waiting.cancelled()

    asyncio.run(main())


def test_a_cancelled_timer_never_runs_its_callback() -> None:
    import asyncio

    async def main() -> None:
        ran: list[int] = []
        _runtime.run_later(0.0, lambda: ran.append(1)).cancel()
        later = _runtime.AsyncioEvent()
        _runtime.run_later(0.0, later.set)
        await _runtime.wait_event(later, 30.0)
        assert later.is_set() and not ran

    asyncio.run(main())


def test_shielded_work_survives_the_callers_cancellation_and_gather_collects_results() -> None:
    import asyncio

    async def main() -> None:
        go = _runtime.AsyncioEvent()

        async def work() -> int:
            await go.wait()
            return 7

        async def shielding() -> int:
            return await _runtime.shield(task)

        task = _runtime.spawn(work())
        caller = _runtime.spawn(shielding())
        await _runtime.wait_tasks((caller,), 0.0)
        caller.cancel()
        await _runtime.wait_tasks((caller,), 30.0)
        assert caller.cancelled() and not task.cancelled()
        go.set()
        assert await _runtime.gather(task, asyncio.sleep(0, 1)) == [7, 1]
        assert _runtime.loop_time() == pytest.approx(asyncio.get_running_loop().time(), abs=1.0)

    asyncio.run(main())
