"""Fallbacks: a value or a function used when the protected call fails.

The outermost layer of a pipeline: when everything inside gave up (retries
spent, breaker open, bulkhead full, deadline passed), a fallback can still
answer with something useful: a cached value, a default, a degraded
response.  It triggers on the errors chosen with ``on`` (exception types or
a predicate; default: every ``Exception``) and on results chosen with
``on_result`` (a predicate, e.g. an empty or an error response).  Using it is
an event ([`FallbackUsed`][datapunk_recovery.flow.fallback.FallbackUsed]), so a service that runs on
fallbacks is seen.

The handler receives a [`FallbackReason`][datapunk_recovery.flow.fallback.FallbackReason]
(the error, or
the rejected
result).  For async calls it may be a coroutine function.  An error raised by
the handler itself propagates, chained to the original one.  Cancellation
never triggers a fallback.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, ParamSpec, TypeVar

from datapunk_recovery._core.validate import shown

from .._core import clock
from .._core.decorate import CallDecorator
from .._core.events import Event, EventBus, emit, global_bus, listening

__all__ = ["Fallback", "FallbackReason", "FallbackUsed"]

P = ParamSpec("P")
T = TypeVar("T")

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class FallbackReason:
    """Why the fallback is used: ``error`` (an exception) or ``result`` (a rejected value)."""

    error: Exception | None
    result: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackUsed(Event):
    """The fallback answered instead of the call.

    ``trigger`` is ``"error"`` or ``"result"``; ``error_type`` the exception's
    type name (``None`` for a result).
    """

    name: ClassVar[str] = "fallback.used"
    area: ClassVar[str] = "fallback"

    trigger: str
    error_type: str | None


class Fallback(CallDecorator, Generic[T]):
    """Answer with ``value``, or ``handler(reason)``, when the call fails.

    ``on`` chooses the errors (types, or a predicate over the exception;
    default every ``Exception``); ``on_result`` the results (a predicate).
    Faces: [`call()`][datapunk_recovery.flow.fallback.Fallback.call],
    [`call_async()`][datapunk_recovery.flow.fallback.Fallback.call_async], and the object as a
    decorator.
    """

    __slots__ = ("_handler", "_on_pred", "_on_types", "_value", "bus", "name", "on_result")

    def __init__(
        self,
        value: T = _MISSING,
        *,
        handler: Callable[[FallbackReason], T | Awaitable[T]] | None = None,
        on: type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool] = Exception,
        on_result: Callable[[Any], bool] | None = None,
        name: str = "fallback",
        bus: EventBus | None = None,
    ) -> None:
        if (value is _MISSING) == (handler is None):
            raise TypeError("Fallback: give exactly one of value= or handler=")
        if handler is not None and not callable(handler):
            raise TypeError(f"Fallback.handler: expected a callable, got {shown(handler)}")
        self._value = value
        self._handler = handler
        self._on_types: tuple[type[Exception], ...] | None = None
        self._on_pred: Callable[[Exception], bool] | None = None
        if isinstance(on, type) and issubclass(on, Exception):
            self._on_types = (on,)
        elif isinstance(on, tuple) and all(
            isinstance(t, type) and issubclass(t, Exception) for t in on
        ):
            self._on_types = on
        elif callable(on) and not isinstance(on, tuple | type):
            self._on_pred = on
        else:
            raise TypeError(
                f"Fallback.on: expected Exception types or a predicate, got {shown(on)} "
                "(cancellation can never trigger a fallback)"
            )
        if on_result is not None and not callable(on_result):
            raise TypeError(f"Fallback.on_result: expected a predicate, got {shown(on_result)}")
        self.on_result = on_result
        self.name = name
        #: Where this fallback's events go first (then the global bus).
        self.bus = bus if bus is not None else EventBus()

    def handles(self, exc: Exception) -> bool:
        """Whether ``exc`` triggers the fallback."""
        if self._on_types is not None:
            return isinstance(exc, self._on_types)
        assert self._on_pred is not None
        return bool(self._on_pred(exc))

    def _answer(self, error: Exception | None, result: Any) -> T | Awaitable[T]:
        if (global_bus.active or self.bus.active) and listening(self.bus, FallbackUsed):
            emit(
                FallbackUsed(
                    operation=self.name,
                    at=clock.now(),
                    trigger="result" if error is None else "error",
                    error_type=None if error is None else type(error).__name__,
                ),
                self.bus,
            )
        if self._handler is None:
            return self._value
        return self._handler(FallbackReason(error, result))

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn``; answer with the fallback when it fails as chosen."""
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if not self.handles(exc):
                raise
            return self._now(self._answer(exc, None))
        check = self.on_result
        if check is None or not check(result):
            return result
        return self._now(self._answer(None, result))

    def _now(self, answer: T | Awaitable[T]) -> T:
        """The answer of a sync call: an async handler's coroutine cannot be awaited here."""
        if inspect.isawaitable(answer):
            if inspect.iscoroutine(answer):
                answer.close()  # never awaited: close it rather than leak a warning
            raise TypeError(f"Fallback {self.name!r}: an async handler needs an async call")
        return answer

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn``; answer with the fallback (awaited if async) when it fails."""
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            if not self.handles(exc):
                raise
            # Awaited inside the handler of ``exc``, so that an error the handler
            # raises is chained to the original one, as in the sync face.
            return await _resolved(self._answer(exc, None))
        check = self.on_result
        if check is None or not check(result):
            return result
        return await _resolved(self._answer(None, result))


async def _resolved(answer: T | Awaitable[T]) -> T:
    """The fallback's answer, awaited when the handler was a coroutine function."""
    if inspect.isawaitable(answer):
        return await answer
    return answer
