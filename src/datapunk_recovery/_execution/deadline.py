"""Overall deadlines carried in a context variable.

``with deadline(2.0): ...`` gives everything inside two seconds, retries and
their sleeps included; nested blocks take the earliest deadline.  Every
retrying and waiting primitive (retry, breaker, bulkhead, limiter, hedging)
reads it and never starts a wait that would end past it.

Two faces, one object:

- ``with deadline(s):`` only *publishes* the deadline.  Sync code cannot be
  interrupted safely, so the primitives inside check it between steps and
  callees read [`remaining()`][datapunk_recovery._execution.deadline.remaining] to size their own
  I/O timeouts.
- ``async with deadline(s):`` also *enforces* it: when the block's deadline is
  the earliest one and nothing outside already enforces it, the block is
  cancelled when it passes (``asyncio.timeout`` or a trio cancel scope) and
  [`DeadlineExceeded`][datapunk_recovery._core.errors.DeadlineExceeded] is raised instead.  The
  cancel timer runs on the event loop's real clock, for the time the library
  clock says is left when the block starts.

A cancellation that comes from outside the block is never turned into
``DeadlineExceeded``: it passes through untouched.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar

from .._core import clock
from .._core.context import CURRENT, CallContext
from .._core.errors import DeadlineExceeded
from .._core.events import Event, emit, listening
from .._core.validate import check_seconds
from . import runtime as _runtime

__all__ = [
    "Deadline",
    "DeadlineExpired",
    "check",
    "deadline",
    "deadline_at",
    "expired",
    "remaining",
]

# The deadline an enclosing ``async with deadline()`` already cancels at, so
# that an inner block with the same or a later deadline does not arm a second
# timer for it (two timers firing together would confuse asyncio's accounting).
_ENFORCED: ContextVar[float | None] = ContextVar("datapunk_recovery_enforced", default=None)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadlineExpired(Event):
    """An ``async with deadline()`` block was cancelled because its deadline passed.

    ``seconds`` is the block's own budget; ``overrun`` how late, in seconds,
    the cancellation was seen (event-loop latency).
    """

    name: ClassVar[str] = "deadline.expired"
    area: ClassVar[str] = "deadline"

    seconds: float
    overrun: float


class Deadline:
    """A deadline ``seconds`` from when the block is entered (see the module doc).

    Entering yields the absolute deadline on the library clock.  One object is
    entered once; build a new one with
    [`deadline()`][datapunk_recovery._execution.deadline.deadline] for each
    block.
    """

    __slots__ = ("_enforced_token", "_scope", "_token", "at", "name", "seconds")

    def __init__(self, seconds: float, *, name: str = "deadline") -> None:
        self.seconds = check_seconds("deadline", "seconds", seconds)
        self.name = name
        #: The absolute deadline on the library clock, once entered.
        self.at: float | None = None
        self._token: Token[CallContext | None] | None = None
        self._enforced_token: Token[float | None] | None = None
        self._scope: _runtime.CancelAfter | None = None

    def _publish(self) -> float:
        if self._token is not None:
            raise RuntimeError("deadline: this block is already entered; build a new one")
        at = clock.now() + self.seconds
        outer = CURRENT.get()
        if outer is not None and outer[0] is not None and outer[0] < at:
            at = outer[0]
        self.at = at
        self._token = CURRENT.set((at, outer[1] if outer is not None else 1))
        return at

    def _withdraw(self) -> None:
        if self._token is not None:
            CURRENT.reset(self._token)
            self._token = None

    def __enter__(self) -> float:
        return self._publish()

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._withdraw()

    async def __aenter__(self) -> float:
        at = self._publish()
        enforced = _ENFORCED.get()
        if enforced is not None and enforced <= at:
            return at  # an outer block already cancels at (or before) this deadline
        scope = _runtime.CancelAfter(at - clock.now())
        try:
            await scope.__aenter__()
        except BaseException:
            self._withdraw()
            raise
        self._scope = scope
        self._enforced_token = _ENFORCED.set(at)
        return at

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        scope, self._scope = self._scope, None
        try:
            if scope is None:
                return False
            if self._enforced_token is not None:
                _ENFORCED.reset(self._enforced_token)
                self._enforced_token = None
            swallowed = await scope.__aexit__(et, exc, tb)
            if scope.expired:
                raise self._exceeded() from scope.cause
            return swallowed
        finally:
            self._withdraw()

    def _exceeded(self) -> DeadlineExceeded:
        now = clock.now()
        at = self.at if self.at is not None else now
        if listening():
            emit(
                DeadlineExpired(
                    operation=self.name, at=now, seconds=self.seconds, overrun=max(now - at, 0.0)
                )
            )
        return DeadlineExceeded(f"{self.name!r}: the deadline of {self.seconds:g} s passed")


def deadline(seconds: float, *, name: str = "deadline") -> Deadline:
    """Run a block under a deadline ``seconds`` from now; the earliest deadline wins.

    ``with deadline(2.0) as at:`` publishes it (``at`` is the absolute
    deadline on the library clock); ``async with`` also cancels the block when
    it passes and raises [`DeadlineExceeded`][datapunk_recovery._core.errors.DeadlineExceeded].
    ``name`` names the block in that error and in events.
    """
    return Deadline(seconds, name=name)


def remaining() -> float | None:
    """Seconds left before the current deadline (may be negative), or ``None``."""
    ctx = CURRENT.get()
    if ctx is None or ctx[0] is None:
        return None
    return ctx[0] - clock.now()


def deadline_at() -> float | None:
    """The current absolute deadline on the library clock, or ``None``."""
    ctx = CURRENT.get()
    return None if ctx is None else ctx[0]


def expired() -> bool:
    """Whether the current deadline has passed (``False`` when there is none)."""
    ctx = CURRENT.get()
    return ctx is not None and ctx[0] is not None and clock.now() >= ctx[0]


def check(what: str) -> None:
    """Raise [`DeadlineExceeded`][datapunk_recovery._core.errors.DeadlineExceeded] if the deadline
    passed.

    ``what`` names the step that was about to start (it goes into the message);
    primitives call this before any step that would take time.
    """
    ctx = CURRENT.get()
    if ctx is not None and ctx[0] is not None and clock.now() >= ctx[0]:
        raise DeadlineExceeded(f"{what}: the deadline passed before it could start")
