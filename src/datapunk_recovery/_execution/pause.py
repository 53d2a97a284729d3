"""Between two attempts of one call: free the failed attempt's frames, then wait.

Both faces of the retry engine (the loops of `engine` and the block form of
`attempts`) pause the same way once `decision.Call` has chosen a delay: the
failed attempt's finished frames are cleared first (what they hold must not
live through the wait), then the wait runs through `runtime`.  A wait that
breaks gives up with the caller's error, never its own.
"""

from __future__ import annotations

from types import TracebackType

from . import runtime as _runtime
from .decision import Call

__all__ = ["release_frames", "sleep_async", "sleep_sync"]


def release_frames(error: BaseException) -> None:
    """Free what the finished frames of a failed attempt hold, before the next attempt.

    The engine keeps the last error (it is what a deadline passing later
    raises), and its traceback keeps the frames of the failed attempt alive:
    a model's activations, a buffer, a connection.  So do the tracebacks of
    the errors chained to it (``raise ... from``, an error raised while
    handling another): those are walked too, each once, as a chain can loop
    (``a.__context__ = b; b.__cause__ = a``).  Clearing those frames' locals
    frees them now; every traceback still shows every file and line, and
    the chain itself is kept.

    The first frame of each traceback is left alone: the frame that caught
    that error, which may still be running (the engine's, or the ``with``
    block's, which ``traceback.clear_frames()`` would try and fail at, at
    the cost of a raised error per attempt) or suspended (a generator
    keeping what it caught: clearing its frame would close it).  When it is
    finished, the error raised from it holds it further down its own
    traceback and clears it there.  Frames still running further down (an
    error raised again from an outer frame) are skipped as
    ``clear_frames()`` skips them.
    """
    _clear(error.__traceback__)
    cause, context = error.__cause__, error.__context__
    if cause is None and context is None:
        return  # the common case: no chain, no set
    seen = {id(error)}
    todo = [e for e in (cause, context) if e is not None]
    while todo:
        chained = todo.pop()
        if id(chained) in seen:
            continue
        seen.add(id(chained))
        _clear(chained.__traceback__)
        todo.extend(e for e in (chained.__cause__, chained.__context__) if e is not None)


def _clear(tb: TracebackType | None) -> None:
    """Clear the frames of one traceback after its first (see `release_frames()`)."""
    if tb is not None:
        tb = tb.tb_next
    while tb is not None:
        try:  # noqa: SIM105 - contextlib.suppress costs a context manager per frame
            tb.tb_frame.clear()
        except RuntimeError:  # still running
            pass
        tb = tb.tb_next


def sleep_sync(call: Call, delay: float, error: Exception | None) -> bool:
    """Wait ``delay`` before the next attempt; False (the call gave up) if the wait broke.

    A sleep that raises (a delay past what the platform can sleep) must not
    replace the caller's exception; cancellation and exit pass through.
    """
    try:
        _runtime.sleep_sync(delay)
    except Exception as internal:
        call.attempt -= 1  # the next attempt was counted in, but will not be made
        call.internal_error(error, internal, f"waiting {delay!r} s")
        return False
    return True


async def sleep_async(call: Call, delay: float, error: Exception | None) -> bool:
    """The async twin of `sleep_sync()`."""
    try:
        await _runtime.sleep_async(delay)
    except Exception as internal:
        call.attempt -= 1  # the next attempt was counted in, but will not be made
        call.internal_error(error, internal, f"waiting {delay!r} s")
        return False
    return True
