"""The decorator face shared by every primitive that wraps a call.

A primitive that offers ``call(fn, *args, **kwargs)`` and
``await call_async(fn, *args, **kwargs)`` inherits :class:`CallDecorator` and
can then be used as ``@primitive`` on sync and async functions alike, with
the wrapped function's signature kept for type checkers (ParamSpec).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

__all__ = ["CallDecorator"]

P = ParamSpec("P")
T = TypeVar("T")


class CallDecorator:
    """Mixin: ``@primitive`` runs sync functions through ``call`` and async ones through
    ``call_async``."""

    __slots__ = ()

    if TYPE_CHECKING:  # what a subclass provides, each with its own precise signature

        def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any: ...

        async def call_async(
            self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any
        ) -> Any: ...

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate a sync or async function; its signature is kept."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.call_async(fn, *args, **kwargs)

            return async_wrapper

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            return self.call(fn, *args, **kwargs)

        return sync_wrapper
