"""Sliding windows of call outcomes for the circuit breaker: O(1) per call.

Two kinds, one interface (``add``, ``totals``, ``reset``):

- `CountWindow` keeps the last ``size`` calls in a ring of small codes
  and running sums, so adding a call replaces one slot and adjusts two sums.
- `TimeWindow` keeps ``buckets`` buckets of ``width`` seconds each and
  running sums; moving into a new bucket clears only the buckets that went
  stale, at most ``buckets`` of them, so a call costs O(1) amortised and the
  window O(buckets) memory whatever the traffic.  The window covers the
  current (partial) bucket and the ``buckets - 1`` before it.

Neither is thread-safe on its own: the breaker calls them under its lock.
"""

from __future__ import annotations

import math

__all__ = ["CountWindow", "TimeWindow", "Window"]

_FAILED = 1
_SLOW = 2


class CountWindow:
    """The last ``size`` calls: how many, how many failed, how many were slow.

    ``ring`` (one code per call: 4, plus 1 when it failed, plus 2 when slow;
    0 for an empty slot) and ``pos`` (the slot the next call takes) are
    public so that the breaker's success fast path can update them in place
    without a method call.
    """

    __slots__ = ("calls", "failures", "pos", "ring", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring = bytearray(size)  # codes + 4 so that 0 means "empty slot"
        self.pos = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, failed: bool, slow: bool, now: float) -> None:
        """Record one call (``now`` is unused: a count window has no time)."""
        i = self.pos
        old = self.ring[i]
        if old:
            self.failures -= old & _FAILED
            self.slow -= (old & _SLOW) >> 1
        else:
            self.calls += 1
        code = (_FAILED if failed else 0) | (_SLOW if slow else 0)
        self.ring[i] = code | 4
        self.failures += code & _FAILED
        self.slow += (code & _SLOW) >> 1
        i += 1
        self.pos = 0 if i == self.size else i

    def totals(self, now: float) -> tuple[int, int, int]:
        """``(calls, failures, slow calls)`` in the window."""
        return self.calls, self.failures, self.slow

    def reset(self) -> None:
        """Forget every call."""
        self.ring = bytearray(self.size)
        self.pos = 0
        self.calls = self.failures = self.slow = 0


class TimeWindow:
    """Calls of the last ``duration`` seconds, in ``buckets`` buckets."""

    __slots__ = (
        "_calls",
        "_failures",
        "_head",
        "_slow",
        "buckets",
        "calls",
        "duration",
        "failures",
        "slow",
        "width",
    )

    def __init__(self, duration: float, buckets: int) -> None:
        self.duration = duration
        self.buckets = buckets
        self.width = duration / buckets
        self._calls = [0] * buckets
        self._failures = [0] * buckets
        self._slow = [0] * buckets
        self._head: int | None = None  # epoch (bucket number) of the newest bucket
        self.calls = self.failures = self.slow = 0

    def _advance(self, now: float) -> int:
        epoch = math.floor(now / self.width)
        head = self._head
        if head is None:
            self._head = epoch
            return epoch % self.buckets
        if epoch > head:
            n = self.buckets
            if epoch - head >= n:  # everything went stale
                self._clear()
            else:
                for e in range(head + 1, epoch + 1):
                    i = e % n
                    self.calls -= self._calls[i]
                    self.failures -= self._failures[i]
                    self.slow -= self._slow[i]
                    self._calls[i] = self._failures[i] = self._slow[i] = 0
            self._head = epoch
            return epoch % n
        # Same bucket, or a clock that stepped back: count it in the newest bucket.
        return head % self.buckets

    def add(self, failed: bool, slow: bool, now: float) -> None:
        """Record one call that ended at ``now`` (library clock, seconds)."""
        i = self._advance(now)
        self._calls[i] += 1
        self.calls += 1
        if failed:
            self._failures[i] += 1
            self.failures += 1
        if slow:
            self._slow[i] += 1
            self.slow += 1

    def totals(self, now: float) -> tuple[int, int, int]:
        """``(calls, failures, slow calls)`` in the window as of ``now``."""
        self._advance(now)
        return self.calls, self.failures, self.slow

    def _clear(self) -> None:
        n = self.buckets
        self._calls = [0] * n
        self._failures = [0] * n
        self._slow = [0] * n
        self.calls = self.failures = self.slow = 0

    def reset(self) -> None:
        """Forget every call."""
        self._clear()
        self._head = None


Window = CountWindow | TimeWindow
