"""One async face for a callable that may be sync or async.

The resource strategies accept user callables of either kind (an ``allocate``,
a model) and retry them with the retry engine.  Wrapped in `as_async()`,
one async retry wrapper serves both kinds, and its backoff sleeps suspend the
task instead of blocking the event loop (a sync callable wrapped by the
engine's *sync* face would sleep the loop's thread).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar, cast

__all__ = ["as_async"]

P = ParamSpec("P")
T = TypeVar("T")


def as_async(fn: Callable[P, T | Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``fn`` as a coroutine function: a sync result is returned, an awaitable awaited."""
    if inspect.iscoroutinefunction(fn):
        return cast(Callable[P, Awaitable[T]], fn)

    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            return cast(T, await result)
        return result

    return call
