"""Sleeping, waiting and spawning for threads, asyncio and trio: the only place that waits.

Rules kept here once for the whole execution layer:

- a zero (or negative) delay never sleeps, not even ``time.sleep(0)``;
- with a fake clock installed, a sleep advances it instead of waiting;
- in instant mode ([`datapunk_recovery.testing`][datapunk_recovery.testing]) nothing sleeps at all;
- a cancelled sleep cancels at once (the event loop's own sleep is used).

The running async library is detected without sniffio: trio is asked only if
it was imported, asyncio otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, cast

from .._core import clock

__all__ = [
    "AsyncioEvent",
    "CancelAfter",
    "RaceGroup",
    "TaskEvent",
    "TaskSignal",
    "ThreadSignal",
    "async_library",
    "call_within",
    "gather",
    "loop_time",
    "race_group",
    "run_in_thread",
    "run_later",
    "running_loop",
    "set_instant",
    "shield",
    "shielded",
    "sleep_async",
    "sleep_sync",
    "spawn",
    "task_event",
    "task_signal",
    "thread_signal",
    "wait_event",
    "wait_tasks",
]

T = TypeVar("T")
_F = TypeVar("_F", bound="asyncio.Future[Any]")

_instant = False


def set_instant(on: bool) -> bool:
    """Turn instant mode on or off; returns the previous setting."""
    global _instant
    previous, _instant = _instant, on
    return previous


def async_library() -> str:
    """``"trio"`` inside a trio task, ``"asyncio"`` otherwise."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return "asyncio"
        return "trio"
    return "asyncio"


def sleep_sync(seconds: float) -> None:
    """Block the thread for ``seconds`` (see the module rules)."""
    if seconds <= 0.0 or _instant:
        return
    fake = clock.current_fake()
    if fake is not None:
        fake.sleep(seconds)
        return
    time.sleep(seconds)


async def sleep_async(seconds: float) -> None:
    """Suspend the task for ``seconds`` (see the module rules)."""
    if seconds <= 0.0 or _instant:
        return
    fake = clock.current_fake()
    if fake is not None:
        fake.sleep(seconds)
        seconds = 0.0  # still a checkpoint, so cancellation is seen
    if async_library() == "trio":
        import trio

        await trio.sleep(seconds)
    else:
        await asyncio.sleep(seconds)


async def call_within(
    fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any, timeout: float
) -> tuple[bool, T | None]:
    """Await ``fn(*args, **kwargs)``, cancelling it after ``timeout`` seconds.

    Returns ``(False, result)``, or ``(True, None)`` when the timeout cancelled
    it.  A ``TimeoutError`` raised by ``fn`` itself propagates unchanged, and a
    cancellation from outside is never mistaken for the timeout.
    """
    if async_library() == "trio":
        import trio

        with trio.move_on_after(max(timeout, 0.0)) as scope:
            return False, await fn(*args, **kwargs)
        if scope.cancelled_caught:
            return True, None
        raise AssertionError("unreachable: trio scope exited without a result")  # pragma: no cover
    cm = asyncio.timeout(max(timeout, 0.0))
    try:
        async with cm:
            return False, await fn(*args, **kwargs)
    except TimeoutError:
        if cm.expired():
            return True, None
        raise


async def run_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run the blocking ``fn(*args)`` in a worker thread, under asyncio or trio.

    For drivers with no async face (sqlite3): the event loop keeps running
    while the thread blocks.
    """
    if async_library() == "trio":
        import trio

        return await trio.to_thread.run_sync(fn, *args)
    return await asyncio.to_thread(fn, *args)


# ---------------------------------------------------------------------------
# Waiting for another thread or task, cancelling a block at a time, running
# work to its end through a cancellation, and racing tasks: one home for the
# asyncio / trio differences, so the primitives above need neither library.


class TaskSignal:
    """A one-shot wake-up for the task that made it, settable from any thread.

    Made inside the task that will wait (``task_signal()``); ``set()`` may be
    called from that task, another task or another thread, and more than once.
    """

    __slots__ = ()

    def set(self) -> None:
        raise NotImplementedError

    async def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds; whether the signal was set."""
        raise NotImplementedError


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _AsyncioSignal(TaskSignal):
    __slots__ = ("fut", "loop", "thread")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.fut: asyncio.Future[None] = self.loop.create_future()
        self.thread = threading.get_ident()

    def set(self) -> None:
        if threading.get_ident() == self.thread:
            _resolve(self.fut)
        else:
            # A closed loop raises RuntimeError: nobody waits there any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(_resolve, self.fut)

    async def wait(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.fut
        except TimeoutError:
            return False
        return True


class _TrioSignal(TaskSignal):
    __slots__ = ("event", "thread", "token")

    def __init__(self) -> None:
        import trio

        self.event = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        self.thread = threading.get_ident()

    def set(self) -> None:
        if threading.get_ident() == self.thread:
            self.event.set()
        else:
            # An ended run raises RuntimeError: nobody waits there any more.
            with contextlib.suppress(RuntimeError):
                self.token.run_sync_soon(self.event.set)

    async def wait(self, timeout: float) -> bool:
        import trio

        with trio.move_on_after(timeout):
            await self.event.wait()
            return True
        return False


def task_signal() -> TaskSignal:
    """A `TaskSignal` for the running asyncio or trio task."""
    return _TrioSignal() if async_library() == "trio" else _AsyncioSignal()


class ThreadSignal(Protocol):
    """A one-shot wake-up for a blocked thread, settable from any thread (``threading.Event``)."""

    def set(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool:
        """Block at most ``timeout`` seconds (``None``: no bound); whether the signal was set."""
        ...


def thread_signal() -> ThreadSignal:
    """A new `ThreadSignal`: the thread-side twin of `task_signal()` (bulkhead queues).

    Its wait is in real time, fake clock or not: only another thread can end it early.
    """
    return threading.Event()


class CancelAfter:
    """``async with CancelAfter(seconds):`` cancels the block when ``seconds`` pass.

    On exit, ``expired`` says whether this scope cancelled the block (the
    cancellation it caused is then swallowed, and ``cause`` is the error that
    carried it, for chaining); a cancellation from outside, or a
    ``TimeoutError`` the block raised itself, passes through untouched.
    """

    __slots__ = ("_scope", "cause", "expired", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = max(seconds, 0.0)
        self.expired = False
        self.cause: BaseException | None = None
        self._scope: Any = None

    async def __aenter__(self) -> CancelAfter:
        scope: Any
        if async_library() == "trio":
            import trio

            scope = trio.CancelScope(deadline=trio.current_time() + self.seconds)
            scope.__enter__()
        else:
            loop = asyncio.get_running_loop()
            scope = asyncio.timeout_at(loop.time() + self.seconds)
            await scope.__aenter__()
        self._scope = scope
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        scope, self._scope = self._scope, None
        if isinstance(scope, asyncio.Timeout):
            try:
                await scope.__aexit__(et, exc, tb)
            except TimeoutError as timeout:
                if not scope.expired():
                    raise
                self.expired, self.cause = True, timeout
                return True
            return False
        swallowed = bool(scope.__exit__(et, exc, tb))
        if scope.cancelled_caught:
            self.expired, self.cause = True, exc
        return swallowed


async def shielded(work: Awaitable[T]) -> tuple[T, bool]:
    """Run ``work`` to the end even if the task is cancelled meanwhile.

    Returns its result and whether a cancellation arrived while it ran (which
    the caller must then re-raise).  ``work`` must bound itself in time.
    """
    if async_library() == "trio":
        import trio

        with trio.CancelScope(shield=True):
            return await work, False
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(task), cancelled
        except asyncio.CancelledError:
            if task.done():  # the work itself was cancelled (loop shutting down)
                raise
            cancelled = True


class RaceGroup(Generic[T]):
    """Tasks started together whose results are taken as they finish (``race_group()``).

    ``start(fn, *args)`` runs ``await fn(*args)`` in a task of its own (with a
    copy of the current context); ``await next(timeout)`` is the next result
    to finish, or ``None`` when ``timeout`` seconds (``None``: no bound) pass
    first; ``next_nowait()`` is one already finished, or ``None``.  Leaving the
    group cancels the tasks still running and waits for them.  The tasks
    should return their outcome rather than raise: raise nothing from inside
    the ``async with`` block either (under trio it is a nursery), carry the
    outcome out instead.
    """

    __slots__ = ()

    def start(self, fn: Callable[..., Awaitable[T]], *args: Any) -> None:
        raise NotImplementedError

    async def next(self, timeout: float | None) -> T | None:
        raise NotImplementedError

    def next_nowait(self) -> T | None:
        raise NotImplementedError


class _AsyncioRace(RaceGroup[T]):
    __slots__ = ("_closing", "_done", "_loop", "_tasks")

    def __init__(self) -> None:
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[T]] = set()
        self._done: asyncio.Queue[asyncio.Task[T]] = asyncio.Queue()

    def start(self, fn: Callable[..., Awaitable[T]], *args: Any) -> None:
        async def run() -> T:
            return await fn(*args)

        task = self._loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[T]) -> None:
        # A task that ended cancelled before the group closed is handed over
        # too: taking it re-raises its CancelledError, as awaiting it would.
        if not self._closing:
            self._done.put_nowait(task)

    def _taken(self, task: asyncio.Task[T]) -> T:
        self._tasks.discard(task)
        return task.result()

    async def next(self, timeout: float | None) -> T | None:
        try:
            async with asyncio.timeout(timeout):
                task = await self._done.get()
        except TimeoutError:
            return None
        return self._taken(task)

    def next_nowait(self) -> T | None:
        try:
            task = self._done.get_nowait()
        except asyncio.QueueEmpty:
            return None
        return self._taken(task)

    async def close(self) -> None:
        self._closing = True
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


class _TrioRace(RaceGroup[T]):
    __slots__ = ("_nursery", "_receive", "_send")

    def __init__(self, nursery: Any) -> None:
        import trio

        self._nursery = nursery
        self._send, self._receive = trio.open_memory_channel[T](math.inf)

    def start(self, fn: Callable[..., Awaitable[T]], *args: Any) -> None:
        async def run() -> None:
            self._send.send_nowait(await fn(*args))

        self._nursery.start_soon(run)

    async def next(self, timeout: float | None) -> T | None:
        import trio

        with trio.move_on_after(math.inf if timeout is None else timeout):
            return await self._receive.receive()
        return None

    def next_nowait(self) -> T | None:
        import trio

        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            return None


@contextlib.asynccontextmanager
async def race_group() -> AsyncIterator[RaceGroup[Any]]:
    """A `RaceGroup` for the running asyncio or trio task."""
    if async_library() == "trio":
        import trio

        async with trio.open_nursery() as nursery:
            yield _TrioRace(nursery)
            nursery.cancel_scope.cancel()
        return
    group: _AsyncioRace[Any] = _AsyncioRace()
    try:
        yield group
    finally:
        await group.close()


class TaskEvent(Protocol):
    """A same-thread event of the running async library (``asyncio.Event`` / ``trio.Event``)."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


def task_event() -> TaskEvent:
    """A new `TaskEvent` for the running asyncio or trio task (set and awaited in one thread)."""
    if async_library() == "trio":
        import trio

        return cast(TaskEvent, trio.Event())
    return asyncio.Event()


async def await_bounded(awaitable: Any, seconds: float) -> None:
    """Await ``awaitable`` in an asyncio task of its own for at most ``seconds``; errors dropped.

    On time, the task is cancelled and left to end on its own: a closing step
    must never hang its caller, whatever the driver does with a cancellation.
    The caller's own cancellation still propagates at once.
    """
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait((task,), timeout=seconds)
    if not done:
        task.cancel()
        task.add_done_callback(_consume_result)
        return
    _consume_result(task)


def _consume_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


# -- asyncio only ------------------------------------------------------------------------
# The Redis store, the shared breaker and the shared budget run on redis.asyncio,
# so under asyncio only.  They spawn and wait through these (thin, on purpose:
# the behaviour is asyncio's), so that this module stays the one place that does.
# Each task spawned is owned by its caller: kept, cancelled on close, and every
# wait for it bounded.

#: The asyncio event class (``set``, ``clear``, ``wait``), for asyncio-only code.
AsyncioEvent = asyncio.Event


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio event loop this thread runs right now, or ``None``."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def loop_time() -> float:
    """The running asyncio loop's clock, in seconds (what its timers and timeouts use)."""
    return asyncio.get_running_loop().time()


def spawn(work: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    """Start ``work`` as a task of the running asyncio loop (``RuntimeError`` outside one).

    The caller owns the task: it keeps a reference, cancels it on close and
    bounds every wait for it (`wait_tasks()`).
    """
    return asyncio.get_running_loop().create_task(work, name=name)


async def wait_tasks(tasks: Iterable[_F], timeout: float | None) -> tuple[set[_F], set[_F]]:
    """``(done, pending)`` of ``tasks`` after at most ``timeout`` seconds (``None``: all done).

    Never raises the tasks' errors nor cancels them; the caller's own
    cancellation propagates at once (``asyncio.wait``).
    """
    return await asyncio.wait(tasks, timeout=timeout)


async def wait_event(event: TaskEvent, timeout: float | None) -> None:
    """Wait until ``event`` is set or ``timeout`` seconds pass (``None``: no bound).

    ``asyncio.wait``, not ``asyncio.timeout``: a wait that times out cannot
    turn a cancellation into a timeout.  The caller's cancellation propagates.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout)
    finally:
        waiter.cancel()


def run_later(delay: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
    """Run ``callback`` on the running asyncio loop in ``delay`` seconds (the caller owns it)."""
    return asyncio.get_running_loop().call_later(delay, callback)


def shield(task: asyncio.Future[T]) -> asyncio.Future[T]:
    """``task``, whose cancellation the caller's does not cause (``asyncio.shield``)."""
    return asyncio.shield(task)


def gather(*work: Awaitable[Any]) -> asyncio.Future[list[Any]]:
    """One future for all of ``work``, run concurrently (``asyncio.gather``)."""
    return asyncio.gather(*work)
