"""Overall deadlines carried in a context variable.

``with deadline(2.0): ...`` gives everything inside two seconds, retries and
their sleeps included; nested blocks take the earliest deadline.  Every
retrying primitive reads it and never starts a wait that would end past it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import clock
from ._context import CURRENT
from ._validate import check_seconds

__all__ = ["deadline", "remaining"]


@contextmanager
def deadline(seconds: float) -> Iterator[float]:
    """Run the block under a deadline ``seconds`` from now (the earliest one wins).

    Yields the absolute deadline on the library clock.
    """
    seconds = check_seconds("deadline", "seconds", seconds)
    at = clock.now() + seconds
    outer = CURRENT.get()
    if outer is not None and outer[0] is not None and outer[0] < at:
        at = outer[0]
    token = CURRENT.set((at, outer[1] if outer is not None else 1))
    try:
        yield at
    finally:
        CURRENT.reset(token)


def remaining() -> float | None:
    """Seconds left before the current deadline (may be negative), or ``None``."""
    ctx = CURRENT.get()
    if ctx is None or ctx[0] is None:
        return None
    return ctx[0] - clock.now()
