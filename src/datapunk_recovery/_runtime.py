"""Sleeping and timing out, for threads, asyncio and trio: the only place that waits.

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
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import clock

__all__ = [
    "async_library",
    "call_within",
    "run_in_thread",
    "set_instant",
    "sleep_async",
    "sleep_sync",
]

T = TypeVar("T")

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
