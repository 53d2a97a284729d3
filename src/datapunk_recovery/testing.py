"""Helpers for testing code that uses the library: instant retries and a fake clock.

``instant_retries()`` makes every retry happen at once (delays are still
computed and reported, only the sleeping is skipped), globally with
:func:`set_instant_retries` or inside a ``with`` block.  ``fake_clock()``
installs a :class:`~datapunk_recovery.clock.FakeClock`: sleeps advance it,
deadlines and breaker windows follow it, and nothing waits for real.
``forget_classifications()`` empties the per-type verdicts that
:func:`~datapunk_recovery.errors.classify` remembers, so that a test sees the
classifier at work whatever ran before it in the same process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import _runtime, clock, errors
from .clock import FakeClock

__all__ = [
    "FakeClock",
    "fake_clock",
    "forget_classifications",
    "instant_retries",
    "set_instant_retries",
]


def forget_classifications() -> None:
    """Forget every verdict :func:`~datapunk_recovery.errors.classify` remembered per type.

    The remembered verdicts only save time; a test that starts from none checks
    the classifier itself, not what an earlier test left behind.
    """
    errors._by_type.clear()


def set_instant_retries(on: bool) -> None:
    """Switch instant retries on or off for the whole process."""
    _runtime.set_instant(on)


@contextmanager
def instant_retries() -> Iterator[None]:
    """Within the block, no retry waits."""
    previous = _runtime.set_instant(True)
    try:
        yield
    finally:
        _runtime.set_instant(previous)


@contextmanager
def fake_clock(start: float = 0.0) -> Iterator[FakeClock]:
    """Within the block, the library runs on a fake clock (yielded)."""
    previous = clock.current_fake()
    fake = FakeClock(start)
    clock.use_clock(fake)
    try:
        yield fake
    finally:
        clock.use_clock(previous)
