"""Per-call context carried in a context variable: the overall deadline and attempt number.

One variable holds both so that the hot path of a retrying call reads one
value: ``None`` (no deadline, not inside a retry) lets it take its fastest
route.  The value is a plain ``(deadline_at, attempt)`` tuple, because a
tuple is built in nanoseconds and this one is built before every retry:
``deadline_at`` is the library clock's time by which everything must end (or
``None``), ``attempt`` the attempt number of the innermost retrying operation.
Context variables follow asyncio tasks, trio tasks and threads the way a
request does.
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["CURRENT", "CallContext"]

CallContext = tuple[float | None, int]

CURRENT: ContextVar[CallContext | None] = ContextVar("datapunk_recovery_call", default=None)
