"""Per-attempt timeouts: one slow attempt must not eat the whole deadline.

An [`AttemptTimeout`][datapunk_recovery._execution.timeout.AttemptTimeout] bounds each attempt of a
call (put
it *inside* the
retry, as the pipeline does, so that a timed-out attempt can be retried while
the overall deadline still has room).  The attempt gets ``seconds`` or what is
left of the overall deadline, whichever is shorter, and that limit is
published through
[`datapunk_recovery._execution.deadline.remaining()`][datapunk_recovery._execution.deadline.remaining]
for the
duration of the attempt, so the callee and any primitive inside it see it.

- **async**: the attempt is cancelled when the limit passes (through
  ``_runtime.call_within``, on asyncio and trio).  If the attempt's own
  ``seconds`` ran out, [`AttemptTimedOut`][datapunk_recovery._execution.timeout.AttemptTimedOut] is
  raised
  (retryable, category
  ``timeout``); if the overall deadline did,
  [`DeadlineExceeded`][datapunk_recovery._core.errors.DeadlineExceeded] (not retryable).
- **sync**: Python cannot interrupt a running thread safely, so a sync attempt
  is *not* interrupted.  The limit is checked before the attempt starts (none
  left: it is not started) and published for the callee to pass to its own
  I/O timeouts (``socket.settimeout(remaining())``, a driver's
  ``timeout=``).  An attempt that overran still returns its result (the work
  is done; throwing it away would only cost another call) and an
  [`AttemptOverran`][datapunk_recovery._execution.timeout.AttemptOverran] event reports it.  The
  retry engine
  checks the
  overall deadline again between attempts.

Cancellation from outside passes through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, ParamSpec, TypeVar, cast

from .._core import clock
from .._core.context import CURRENT
from .._core.decorate import CallDecorator
from .._core.errors import DeadlineExceeded, ErrorCategory, RecoveryError
from .._core.events import Event, EventBus, emit, global_bus, listening
from .._core.validate import check_seconds
from . import runtime as _runtime

__all__ = [
    "AttemptOverran",
    "AttemptTimedOut",
    "AttemptTimeout",
    "AttemptTimeoutExpired",
]

P = ParamSpec("P")
T = TypeVar("T")


class AttemptTimedOut(RecoveryError, TimeoutError):
    """One attempt took longer than its per-attempt timeout and was cancelled.

    Retryable: the next attempt may be faster (an outer retry decides).
    ``seconds`` is the timeout that expired.
    """

    category = ErrorCategory.TIMEOUT
    retryable = True

    def __init__(self, operation: str, seconds: float) -> None:
        super().__init__(
            f"{operation!r}: the attempt took longer than {seconds:g} s and was cancelled",
            context={"operation": operation},
        )
        self.seconds = seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptTimeoutExpired(Event):
    """An async attempt was cancelled by its timeout; ``seconds`` is the limit it had.

    ``by_deadline`` is true when the overall deadline, not the per-attempt
    timeout, was the shorter limit.
    """

    name: ClassVar[str] = "timeout.expired"
    area: ClassVar[str] = "timeout"

    seconds: float
    by_deadline: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptOverran(Event):
    """A sync attempt ran past its limit (it could not be interrupted).

    ``limit`` and ``duration`` are in seconds.
    """

    name: ClassVar[str] = "timeout.overran"
    area: ClassVar[str] = "timeout"

    limit: float
    duration: float


class AttemptTimeout(CallDecorator):
    """Bound every attempt to ``seconds`` (or the overall deadline if sooner).

    Use [`call()`][datapunk_recovery._execution.timeout.AttemptTimeout.call] /
    [`call_async()`][datapunk_recovery._execution.timeout.AttemptTimeout.call_async], or decorate a
    function
    with the
    object itself (``@AttemptTimeout(0.5)``).  ``name`` names the operation in
    errors and events.  Cheap: two clock reads and a context-variable swap
    per attempt.
    """

    __slots__ = ("bus", "name", "seconds")

    def __init__(
        self, seconds: float, *, name: str = "attempt", bus: EventBus | None = None
    ) -> None:
        self.seconds = check_seconds("AttemptTimeout", "seconds", seconds, positive=True)
        self.name = name
        #: Where this timeout's events go first (then the global bus).
        self.bus = bus if bus is not None else EventBus()

    def _limit(self, now: float) -> tuple[float, bool, Any]:
        """Publish the attempt's deadline; its limit, whether the overall deadline set it."""
        ctx = CURRENT.get()
        at = now + self.seconds
        by_deadline = False
        if ctx is not None and ctx[0] is not None and ctx[0] <= at:
            at, by_deadline = ctx[0], True
            if at <= now:
                raise DeadlineExceeded(
                    f"{self.name!r}: the deadline passed before the attempt could start"
                )
        token = CURRENT.set((at, 1 if ctx is None else ctx[1]))
        return at - now, by_deadline, token

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a sync attempt under the limit (published, checked, not interrupted)."""
        start = clock.now()
        limit, _, token = self._limit(start)
        try:
            result = fn(*args, **kwargs)
        finally:
            CURRENT.reset(token)
            # Per call: the clock is read only for a subscriber of overruns.
            if (global_bus.active or self.bus.active) and listening(self.bus, AttemptOverran):
                duration = clock.now() - start
                if duration > limit:
                    emit(
                        AttemptOverran(
                            operation=self.name,
                            at=start + duration,
                            limit=limit,
                            duration=duration,
                        ),
                        self.bus,
                    )
        return result

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await an attempt, cancelling it when the limit passes."""
        start = clock.now()
        limit, by_deadline, token = self._limit(start)
        try:
            timed_out, result = await _runtime.call_within(fn, args, kwargs, limit)
        finally:
            CURRENT.reset(token)
        if not timed_out:
            return cast(T, result)
        if (global_bus.active or self.bus.active) and listening(self.bus, AttemptTimeoutExpired):
            emit(
                AttemptTimeoutExpired(
                    operation=self.name, at=clock.now(), seconds=limit, by_deadline=by_deadline
                ),
                self.bus,
            )
        if by_deadline:
            raise DeadlineExceeded(f"{self.name!r}: the deadline passed during the attempt")
        raise AttemptTimedOut(self.name, self.seconds)
