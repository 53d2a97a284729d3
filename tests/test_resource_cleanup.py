"""Compensations: on failure every one runs once, in reverse order, even under cancellation."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from datapunk_recovery._core import errors, events
from datapunk_recovery.resource import (
    CleanupConfig,
    CleanupFailed,
    CleanupFinished,
    CompensationRan,
    Compensations,
    CompensationTimeout,
)


class Boom(Exception):
    """The operation's own failure."""


class UndoFailed(Exception):
    """A compensation's failure."""


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match=r"CleanupConfig.timeout: must be > 0"):
        CleanupConfig(timeout=0)
    with pytest.raises(TypeError, match=r"CleanupConfig.timeout: expected a number"):
        CleanupConfig(timeout="1")  # type: ignore[arg-type]


def test_on_failure_compensations_run_in_reverse_and_the_error_is_itself() -> None:
    ran: list[str] = []

    def book_trip() -> None:
        with Compensations("trip") as undo:
            undo.add(ran.append, "cancel flight")
            undo.add(ran.append, "cancel hotel")
            raise Boom("card declined")

    with pytest.raises(Boom) as caught:
        book_trip()
    assert ran == ["cancel hotel", "cancel flight"]
    assert type(caught.value) is Boom


def test_on_success_only_always_entries_run() -> None:
    ran: list[str] = []
    with Compensations() as undo:
        undo.add(ran.append, "undo write")
        undo.always(ran.append, "close file")
    assert ran == ["close file"]
    assert len(undo) == 0


def test_every_compensation_runs_and_errors_are_grouped_with_the_original() -> None:
    ran: list[str] = []

    def broken(label: str) -> None:
        ran.append(label)
        raise UndoFailed(label)

    def order() -> None:
        with Compensations("order") as undo:
            undo.add(ran.append, "first")
            undo.add(broken, "second")
            undo.add(broken, "third")
            raise Boom("step four failed")

    with pytest.raises(CleanupFailed) as caught:
        order()
    group = caught.value
    assert ran == ["third", "second", "first"]
    assert isinstance(group.original, Boom)
    assert group.exceptions[0] is group.original
    assert [str(e) for e in group.cleanup_errors] == ["third", "second"]
    assert "'order' failed, and 2 of 3 compensation(s) failed" in str(group)
    # What was done is only partly undone: no outer layer may retry blindly.
    assert errors.final_reason(group) is not None


def test_a_failing_always_entry_after_success_raises_a_group_without_original() -> None:
    def broken() -> None:
        raise UndoFailed("close")

    with pytest.raises(CleanupFailed) as caught, Compensations() as undo:
        undo.always(broken)
    assert caught.value.original is None
    assert [type(e) for e in caught.value.cleanup_errors] == [UndoFailed]


def test_a_stack_serves_one_block_and_async_entries_need_async_with() -> None:
    undo = Compensations()
    with pytest.raises(RuntimeError, match="inside its `with` block"):
        undo.add(print)

    async def async_undo() -> None: ...

    with undo, pytest.raises(TypeError, match="is async; use `async with"):
        undo.add(async_undo)
    with pytest.raises(RuntimeError, match="one block only"), undo:
        pass


def test_events_report_each_compensation_and_the_unwind() -> None:
    seen: list[events.Event] = []
    bus = events.EventBus()
    bus.subscribe(seen.append)

    def broken() -> None:
        raise UndoFailed("secret-token-in-message")

    def pay() -> None:
        with Compensations("pay", bus=bus) as undo:
            undo.add(print, end="")
            undo.add(broken)
            raise Boom

    with pytest.raises(CleanupFailed):
        pay()
    ran = [e for e in seen if isinstance(e, CompensationRan)]
    broken_name = "test_events_report_each_compensation_and_the_unwind"
    assert [(e.compensation, e.succeeded, e.error_type) for e in ran] == [
        (f"{broken_name}.<locals>.broken", False, "UndoFailed"),
        ("print", True, None),
    ]
    assert all(e.trigger == "failure" and e.operation == "pay" for e in ran)
    finished = [e for e in seen if isinstance(e, CleanupFinished)]
    assert [(e.ran, e.failed, e.trigger) for e in finished] == [(2, 1, "failure")]
    assert "secret" not in repr(seen)  # events carry type names, never messages


# --- async, under asyncio and trio -------------------------------------------------------


@pytest.mark.anyio
async def test_async_compensations_are_awaited_in_reverse() -> None:
    ran: list[str] = []

    async def cancel(label: str) -> None:
        await anyio.lowlevel.checkpoint()
        ran.append(label)

    async def operation() -> None:
        async with Compensations() as undo:
            undo.add(cancel, "a")
            undo.add(ran.append, "b")  # sync entries are fine in async blocks
            undo.add(cancel, "c")
            raise Boom

    with pytest.raises(Boom):
        await operation()
    assert ran == ["c", "b", "a"]


@pytest.mark.anyio
async def test_cancellation_of_the_block_still_runs_every_compensation() -> None:
    ran: list[str] = []

    async def slow_undo(label: str) -> None:
        # Several checkpoints: each would see the cancellation if not shielded.
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        ran.append(label)

    with anyio.CancelScope() as scope:
        async with Compensations() as undo:
            undo.add(slow_undo, "release gpu")
            undo.add(slow_undo, "delete temp")
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught  # the cancellation went through untouched
    assert ran == ["delete temp", "release gpu"]


@pytest.mark.anyio
async def test_cancellation_during_cleanup_lets_the_cleanup_finish() -> None:
    ran: list[str] = []
    started = anyio.Event()
    gate = anyio.Event()

    async def waits_for_gate() -> None:
        started.set()
        await gate.wait()
        ran.append("waited")

    async def undo_after_failure() -> None:
        async with Compensations() as undo:
            undo.add(ran.append, "last")
            undo.add(waits_for_gate)
            raise Boom

    async def operation(scope: anyio.CancelScope) -> None:
        # trio: Boom passes (the scope stays cancelled); asyncio: the cancellation does.
        with scope, pytest.raises(Boom):
            await undo_after_failure()

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(operation, scope)
        await started.wait()
        scope.cancel()  # the cleanup is cancelled half-way...
        await anyio.lowlevel.checkpoint()
        gate.set()  # ...and still finishes
    assert ran == ["waited", "last"]
    # asyncio: the cancellation, delivered during the cleanup, is re-raised after it
    # (the operation's error is its __context__) and ends in its scope.
    assert scope.cancel_called


@pytest.mark.anyio
async def test_a_hanging_compensation_is_abandoned_after_its_timeout() -> None:
    ran: list[str] = []
    config = CleanupConfig(timeout=0.05)

    async def operation() -> None:
        async with Compensations(config=config) as undo:
            undo.add(ran.append, "after the hang")
            undo.add(anyio.sleep_forever)
            raise Boom

    with pytest.raises(CleanupFailed) as caught:
        await operation()
    assert ran == ["after the hang"]
    assert [type(e) for e in caught.value.cleanup_errors] == [CompensationTimeout]


@pytest.mark.anyio
async def test_cleanup_under_cancellation_is_bounded_and_notes_failures() -> None:
    ran: list[str] = []
    with anyio.CancelScope() as scope:
        async with Compensations(config=CleanupConfig(timeout=0.05)) as undo:
            undo.add(ran.append, "still runs")
            undo.add(anyio.sleep_forever)  # would hang forever, shielded
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert ran == ["still runs"]


# --- property: any sequence of steps and failures -------------------------------------------

Step = tuple[bool, bool, bool]  # (acquired, compensation fails, always-entry)


@given(
    steps=st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), max_size=12),
    operation_fails=st.booleans(),
)
def test_every_compensation_runs_exactly_once_in_reverse(
    steps: list[Step], operation_fails: bool
) -> None:
    ran: list[int] = []
    registered: list[tuple[int, bool, bool]] = []

    def compensate(i: int, fails: bool) -> None:
        ran.append(i)
        if fails:
            raise UndoFailed(i)

    failure_at = next((i for i, (acquired, _, _) in enumerate(steps) if not acquired), None)
    raised: BaseException | None = None
    try:
        with Compensations() as undo:
            for i, (acquired, fails, always) in enumerate(steps):
                if not acquired:
                    raise Boom(f"acquisition {i} failed")
                (undo.always if always else undo.add)(compensate, i, fails)
                registered.append((i, fails, always))
            if operation_fails:
                raise Boom("operation failed")
    except Exception as exc:
        raised = exc

    failed = failure_at is not None or operation_fails
    expected = [i for i, _, always in reversed(registered) if failed or always]
    assert ran == expected
    assert len(set(ran)) == len(ran)  # exactly once
    undo_errors = [i for i, fails, always in reversed(registered) if fails and (failed or always)]
    if undo_errors:
        assert isinstance(raised, CleanupFailed)
        assert [e.args[0] for e in raised.cleanup_errors] == undo_errors
        assert isinstance(raised.original, Boom) if failed else raised.original is None
    elif failed:
        assert isinstance(raised, Boom)
    else:
        assert raised is None


# -- a compensation that returns a coroutine in a sync block (issue 14, item 5)


async def a_undo(n: int) -> None:
    """An async undo, reached through a lambda that a sync block cannot await."""
    raise AssertionError(f"never runs in a sync block ({n})")


def _sync_block_with_a_lambda_returning_a_coroutine(ran: list[str]) -> None:
    with Compensations("booking") as undo:
        undo.add(ran.append, "first undo")
        undo.add(lambda: a_undo(9))
        undo.add(ran.append, "last undo")
        raise Boom("step 3 failed")


def test_a_compensation_returning_a_coroutine_in_a_sync_block_fails_loudly() -> None:
    ran: list[str] = []
    # pytest turns RuntimeWarning into an error: the coroutine must be closed, not dropped.
    with pytest.raises(CleanupFailed) as caught:
        _sync_block_with_a_lambda_returning_a_coroutine(ran)
    group = caught.value
    assert isinstance(group.original, Boom)
    assert ran == ["last undo", "first undo"]  # the others still ran, in reverse
    (error,) = group.cleanup_errors
    assert isinstance(error, TypeError)
    assert "<lambda>" in str(error)
    assert "returned a coroutine" in str(error)
    assert "closed" in str(error)


@pytest.mark.anyio
async def test_a_compensation_returning_a_coroutine_fails_loudly_with_a_running_loop() -> None:
    ran: list[str] = []
    with pytest.raises(CleanupFailed) as caught:
        _sync_block_with_a_lambda_returning_a_coroutine(ran)
    (error,) = caught.value.cleanup_errors
    assert "returned a coroutine" in str(error)


def test_an_always_entry_returning_a_coroutine_after_success_fails_loudly() -> None:
    with pytest.raises(CleanupFailed) as caught, Compensations("release") as undo:
        undo.always(lambda: a_undo(1))
    assert caught.value.original is None
    (error,) = caught.value.cleanup_errors
    assert "returned a coroutine" in str(error)


def test_an_async_callable_object_is_refused_at_add_in_a_sync_block() -> None:
    class AsyncUndo:
        async def __call__(self) -> None:
            raise AssertionError("never called")

    with Compensations() as undo, pytest.raises(TypeError, match="is async"):
        undo.add(AsyncUndo())
