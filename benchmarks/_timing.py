"""Time functions for pyperf's ``bench_time_func``: one loop for sync calls, one for async.

Shared by every benchmark so that all contenders are timed the same way: a
plain loop for sync calls; for async calls, a loop inside one coroutine on a
running asyncio event loop (the way a service awaits them), after one warm-up
call.  ``make`` builds the async callable inside the loop, because some
libraries bind to the loop that is running when they are first used.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


def time_sync(fn: Callable[[], Any]) -> Callable[[int], float]:
    """``loops`` calls of ``fn``, in seconds."""

    def run(loops: int) -> float:
        rng = range(loops)
        t0 = time.perf_counter()
        for _ in rng:
            fn()
        return time.perf_counter() - t0

    return run


def time_async(make: Callable[[], Callable[[], Awaitable[Any]]]) -> Callable[[int], float]:
    """``loops`` awaits of the callable ``make()`` returns, in seconds."""

    def run(loops: int) -> float:
        async def body() -> float:
            fn = make()
            await fn()
            rng = range(loops)
            t0 = time.perf_counter()
            for _ in rng:
                await fn()
            return time.perf_counter() - t0

        return asyncio.run(body())

    return run
