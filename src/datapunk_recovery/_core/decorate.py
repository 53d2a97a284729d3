"""The decorator face shared by every primitive that wraps a call.

A primitive that offers ``call(fn, *args, **kwargs)`` and
``await call_async(fn, *args, **kwargs)`` inherits `CallDecorator` and
can then be used as ``@primitive`` on sync and async functions alike, with
the wrapped function's signature kept for type checkers (ParamSpec).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

__all__ = ["CallDecorator"]

F = TypeVar("F", bound=Callable[..., Any])


class CallDecorator:
    """Mixin: ``@primitive`` runs sync functions through ``call`` and async ones through
    ``call_async``."""

    __slots__ = ()

    if TYPE_CHECKING:  # what a subclass provides, each with its own precise signature

        def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any: ...

        async def call_async(
            self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any
        ) -> Any: ...

    def __call__(self, fn: F) -> F:
        """Decorate a sync or async function; its signature is kept.

        The wrapper is typed as what it wraps: stacked over ``@retry``, the
        result still shows ``.statistics()`` to a type checker
        (``functools.wraps`` copies those handles onto the wrapper).
        """
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await self.call_async(fn, *args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            return self.call(fn, *args, **kwargs)

        return cast(F, sync_wrapper)
