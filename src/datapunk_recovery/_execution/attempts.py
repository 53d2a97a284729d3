"""The retry engine's block form: ``for attempt in retrying(): with attempt: ...``.

For code that is not a function to decorate: `retrying()` gives a
`Retrying` iterator (sync, sleeping the thread, or ``async for``), which
hands out one `AttemptContext` per attempt; the ``with`` block is the
attempt.  It decides with the same per-call state as the decorator
(`decision.Call`) and pauses the same way (`pause`); what is its own is the
iteration: an attempt must be entered once, and since a block cannot be
cancelled the deadline is checked between attempts only.
"""

from __future__ import annotations

import random
from typing import Any

from .._core import clock
from .._core.context import CURRENT, REPORTING
from .._core.events import EventBus
from .._core.policy import RetryGate
from .decision import Call, Engine, On, PolicySpec, new_call
from .pause import release_frames, sleep_async, sleep_sync

__all__ = ["AttemptContext", "Retrying", "retrying"]


class AttemptContext:
    """One attempt of a `retrying()` loop; use it as ``with attempt:``.

    A retryable failure inside the block is swallowed and the loop goes on
    after the delay; any other ends the loop by propagating.  The block form
    checks the deadline between attempts only (it cannot cancel a block).
    """

    __slots__ = ("_owner", "number")

    def __init__(self, owner: Retrying, number: int) -> None:
        self._owner = owner
        self.number = number

    def __enter__(self) -> AttemptContext:
        self._owner._enter(self)
        return self

    def __exit__(self, et: object, exc: BaseException | None, tb: object) -> bool:
        return self._owner._exit(exc)


class Retrying:
    """The iterator behind `retrying()`; iterate it once, sync or async."""

    __slots__ = (
        "_call",
        "_delay",
        "_done",
        "_engine",
        "_error",
        "_pending",
        "_reporting",
        "_token",
    )

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._call: Call | None = None
        self._delay = 0.0
        self._done = False
        self._error: Exception | None = None
        self._token: Any = None
        self._reporting: Any = None
        # The attempt handed out and not yet entered: a body that skips ``with attempt``
        # would otherwise get the same attempt again for ever (nothing failed, nothing counted).
        self._pending: AttemptContext | None = None

    def _next_attempt(self) -> AttemptContext:
        call = self._call
        if call is None:
            start = clock.now()
            call = self._call = new_call(self._engine, start)
        if call.deadline_at is not None and clock.now() >= call.deadline_at:
            self._done = True
            raise call.deadline_passed(self._error)
        attempt = self._pending = AttemptContext(self, call.attempt)
        return attempt

    def _check_entered(self) -> None:
        pending = self._pending
        if pending is not None:
            self._done = True
            self._pending = None
            raise RuntimeError(
                f"retrying {self._engine.name!r}: attempt {pending.number} was never entered;"
                " the loop body must run its work inside `with attempt:`"
            )

    def _wait_fits(self, call: Call) -> None:
        # The delay was decided when the block failed; the loop's own code may
        # have spent time since: never start a wait that would end past the deadline.
        at = call.deadline_at
        if at is not None:
            left = at - clock.now()
            if left <= 0.0 or (self._delay > 0.0 and self._delay >= left):
                self._done = True
                raise call.deadline_passed(self._error)

    def __iter__(self) -> Retrying:
        return self

    def __next__(self) -> AttemptContext:
        if self._done:
            raise StopIteration
        self._check_entered()
        call = self._call
        if call is not None:
            self._wait_fits(call)
            if not sleep_sync(call, self._delay, self._error):
                raise self._broken()
        return self._next_attempt()

    def __aiter__(self) -> Retrying:
        return self

    async def __anext__(self) -> AttemptContext:
        if self._done:
            raise StopAsyncIteration
        self._check_entered()
        call = self._call
        if call is not None:
            self._wait_fits(call)
            if not await sleep_async(call, self._delay, self._error):
                raise self._broken()
        return self._next_attempt()

    def _broken(self) -> Exception:
        # The wait before the next attempt broke: the last attempt's error ends the loop.
        self._done = True
        error, self._error = self._error, None
        assert error is not None
        return error

    def _enter(self, attempt: AttemptContext) -> None:
        call = self._call
        assert call is not None
        if attempt is not self._pending:
            raise RuntimeError(
                f"retrying {self._engine.name!r}: attempt {attempt.number} was already entered;"
                " enter each attempt once"
            )
        self._pending = None
        self._token = CURRENT.set((call.deadline_at, attempt.number))
        budget = self._engine.budget
        if budget is not None:  # see engine._run_sync: the block's attempts are reported here
            self._reporting = REPORTING.set((*REPORTING.get(), budget))
        call.attempt_start = clock.now()

    def _exit(self, exc: BaseException | None) -> bool:
        call = self._call
        assert call is not None
        if self._token is not None:
            CURRENT.reset(self._token)
            self._token = None
        if self._reporting is not None:
            REPORTING.reset(self._reporting)
            self._reporting = None
        if exc is None:
            self._done = True
            call.succeeded()
            return False
        if not isinstance(exc, Exception):  # cancellation and exit: untouched
            self._done = True
            return False
        delay = call.decide(exc)
        if delay is None:
            self._done = True
            return False
        release_frames(exc)
        self._error = exc
        self._delay = delay
        return True


def retrying(
    config: PolicySpec = None,
    *,
    on: On = None,
    name: str = "retrying",
    budget: RetryGate | None = None,
    rng: random.Random | None = None,
    bus: EventBus | None = None,
) -> Retrying:
    """Retry a block: ``for attempt in retrying(): with attempt: ...``.

    Same settings as [`retry()`][datapunk_recovery._execution.engine.retry]
    (without ``retry_if_result``);
    works as a
    sync iterator (sleeping the thread) and an async one (``async for``).
    """
    return Retrying(Engine(name, config, on, None, budget, rng, bus=bus))
