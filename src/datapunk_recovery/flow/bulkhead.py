"""Bulkheads: at most N concurrent calls, a bounded wait queue, per-caller quotas.

A dependency that slows down makes callers pile up; without a bound, every
thread or task of a service ends up waiting on it and the service falls over
with it.  A [`Bulkhead`][datapunk_recovery.flow.bulkhead.Bulkhead] admits at most ``max_concurrent``
calls at once,
lets at most ``max_queue`` more wait (first come, first served) for at most
``max_wait`` seconds, and rejects the rest at once with
[`BulkheadFull`][datapunk_recovery.flow.bulkhead.BulkheadFull].
A per-caller quota (``per_caller``) keeps one caller (a tenant, an endpoint)
from taking every slot and every queue place.

One bulkhead serves threads, asyncio tasks and trio tasks at the same time:
the count is kept under one short lock, and a freed slot is handed directly to
the first waiter (no barging), woken the way its kind needs (a thread event,
an asyncio future, a trio event; across threads when it waits elsewhere).

Waits respect the overall deadline
([`datapunk_recovery.remaining()`][datapunk_recovery._execution.deadline.remaining]): a queued call
never waits
past it, and gets [`DeadlineExceeded`][datapunk_recovery._core.errors.DeadlineExceeded] if the
deadline is what ended its wait.  A waiter that is cancelled leaves the queue
(or, if a slot was handed to it in the same instant, gives it back): nothing
is leaked and nothing is counted.

Rejections carry ``do_not_retry_above``: retrying a call refused for local
overload only adds to the overload, so no outer retry layer retries it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, ParamSpec, TypeVar

from .._core import clock
from .._core.context import CALLER as _CALLER
from .._core.context import CURRENT
from .._core.decorate import CallDecorator
from .._core.errors import DeadlineExceeded, ErrorCategory, RecoveryError
from .._core.events import Event, EventBus, emit, global_bus, listening
from .._core.validate import check_count, check_seconds, shown
from .._execution import runtime as _runtime

__all__ = [
    "Bulkhead",
    "BulkheadAdmitted",
    "BulkheadConfig",
    "BulkheadFull",
    "BulkheadRejected",
    "BulkheadReleased",
    "BulkheadState",
    "CallerQuotaExceeded",
    "as_caller",
    "current_caller",
]

P = ParamSpec("P")
T = TypeVar("T")


@contextmanager
def as_caller(caller: str) -> Iterator[str]:
    """Make the calls inside the block count against ``caller``'s quotas.

    The caller is read by bulkheads, adaptive limiters and rate limiters when
    no ``caller=`` is passed to them explicitly; it follows threads started
    with a copied context and async tasks, like a request does.
    """
    if not isinstance(caller, str):
        raise TypeError(f"as_caller: expected a str, got {shown(caller)}")
    token = _CALLER.set(caller)
    try:
        yield caller
    finally:
        _CALLER.reset(token)


def current_caller() -> str | None:
    """The caller set by the innermost `as_caller()` block, if any."""
    return _CALLER.get()


class BulkheadFull(RecoveryError):
    """A bulkhead (or an adaptive limiter) refused a call.

    ``bulkhead`` names it; ``reason`` is ``"full"`` (no slot, no queue),
    ``"queue_full"``, ``"max_wait"`` (waited as long as allowed) or
    ``"caller_quota"``.  Not retryable by any layer: retrying a call refused
    for local overload only adds load.
    """

    category = ErrorCategory.OVERLOADED
    retryable = False
    do_not_retry_above = True

    def __init__(self, bulkhead: str, reason: str, message: str) -> None:
        super().__init__(message, context={"bulkhead": bulkhead, "reason": reason})
        self.bulkhead = bulkhead
        self.reason = reason


class CallerQuotaExceeded(BulkheadFull):
    """One caller already holds (or waits for) as many slots as its quota allows."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadRejected(Event):
    """A call was refused; ``reason`` as in `BulkheadFull`, counts at that moment."""

    name: ClassVar[str] = "bulkhead.rejected"
    area: ClassVar[str] = "bulkhead"

    reason: str
    active: int
    queued: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadAdmitted(Event):
    """A call got a slot after waiting ``waited`` seconds (0 when one was free).

    ``active`` is how many slots are held now, this one included.
    """

    name: ClassVar[str] = "bulkhead.admitted"
    area: ClassVar[str] = "bulkhead"

    waited: float
    active: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadReleased(Event):
    """A call gave its slot back; ``active`` slots are held now."""

    name: ClassVar[str] = "bulkhead.released"
    area: ClassVar[str] = "bulkhead"

    active: int


@dataclass(frozen=True, slots=True)
class BulkheadState:
    """A snapshot: calls running, calls waiting, and the concurrency limit."""

    active: int
    queued: int
    limit: int


@dataclass(frozen=True, slots=True)
class BulkheadConfig:
    """``max_concurrent`` calls at once; ``max_queue`` more may wait ``max_wait`` seconds.

    ``per_caller`` bounds what one caller may hold and wait for together
    (``None``: no quota).  With ``max_queue=0`` (the default) a full bulkhead
    rejects at once; a queue needs a positive ``max_wait``.
    """

    max_concurrent: int = 10
    max_queue: int = 0
    max_wait: float = 0.0
    per_caller: int | None = None

    def __post_init__(self) -> None:
        owner = "BulkheadConfig"
        check_count(owner, "max_concurrent", self.max_concurrent)
        check_count(owner, "max_queue", self.max_queue, minimum=0)
        object.__setattr__(self, "max_wait", check_seconds(owner, "max_wait", self.max_wait))
        if self.max_queue > 0 and self.max_wait == 0.0:
            raise ValueError(
                f"{owner}.max_wait: must be > 0 seconds when max_queue > 0,"
                f" got {shown(self.max_wait)}"
            )
        if self.per_caller is not None:
            check_count(owner, "per_caller", self.per_caller)


# ---------------------------------------------------------------------------
# Waiters: one per queued call, woken the way its kind of concurrency needs.


class _Waiter:
    __slots__ = ("caller", "granted")

    def __init__(self, caller: str | None) -> None:
        self.caller = caller
        self.granted = False

    def wake(self) -> None:
        raise NotImplementedError


class _ThreadWaiter(_Waiter):
    __slots__ = ("event",)

    def __init__(self, caller: str | None) -> None:
        super().__init__(caller)
        self.event = _runtime.thread_signal()

    def wake(self) -> None:
        self.event.set()


class _TaskWaiter(_Waiter):
    """A queued asyncio or trio task; woken through the execution layer's signal."""

    __slots__ = ("signal",)

    def __init__(self, caller: str | None) -> None:
        super().__init__(caller)
        self.signal = _runtime.task_signal()

    def wake(self) -> None:
        self.signal.set()


# ---------------------------------------------------------------------------
# The slot pool shared by Bulkhead and the adaptive limiter.


class SlotPool:
    """Counts slots under one lock and queues waiters; limit may change at run time.

    The pool behind a [`Bulkhead`][datapunk_recovery.flow.bulkhead.Bulkhead] and an
    adaptive limiter, and what a pipeline stage holds around its call
    (``Bulkhead.slots``).  ``acquire(caller)`` / ``await acquire_async(caller)``
    take a slot (or raise ``BulkheadFull``), ``release(caller)`` gives it back.
    """

    __slots__ = (
        "_held",
        "_lock",
        "_queue",
        "active",
        "bus",
        "kind",
        "limit",
        "max_queue",
        "max_wait",
        "name",
        "per_caller",
    )

    def __init__(
        self,
        name: str,
        limit: int,
        max_queue: int,
        max_wait: float,
        per_caller: int | None,
        bus: EventBus,
        kind: str = "bulkhead",
    ) -> None:
        self.name = name
        #: What refuses, in messages ("bulkhead", "adaptive limiter").
        self.kind = kind
        self.limit = limit
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.per_caller = per_caller
        self.bus = bus
        self.active = 0
        self._queue: deque[_Waiter] = deque()
        # Slots held plus places queued, per named caller, with a quota or
        # not: a quota a reload adds (or restores) counts what is held already,
        # and a slot taken before it goes back against the right count.
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def state(self) -> BulkheadState:
        return BulkheadState(self.active, len(self._queue), self.limit)

    # -- decisions under the lock

    def _take(self, caller: str | None) -> bool:
        """Take a free slot (lock held); False when none is free; _Refused on a quota."""
        quota = self.per_caller
        if caller is not None:
            held = self._held.get(caller, 0)
            if quota is not None and held >= quota:
                raise _Refused(
                    "caller_quota",
                    f"caller {caller!r} already holds or waits for {held} of its {quota} slots",
                )
            if self.active < self.limit and not self._queue:
                self.active += 1
                self._held[caller] = held + 1
                return True
            return False
        if self.active < self.limit and not self._queue:
            self.active += 1
            return True
        return False

    def _enqueue(self, waiter: _Waiter) -> None:
        """Queue ``waiter`` (lock held); _Refused when the queue is full."""
        if len(self._queue) >= self.max_queue:
            if self.max_queue == 0:
                raise _Refused("full", f"all {self.limit} slots are taken")
            raise _Refused(
                "queue_full", f"all {self.limit} slots and {self.max_queue} queue places are taken"
            )
        self._queue.append(waiter)
        caller = waiter.caller
        if caller is not None:
            self._held[caller] = self._held.get(caller, 0) + 1

    def _reject(self, refused: _Refused) -> BulkheadFull:
        """The error for a refusal, reported as an event (never under the lock)."""
        if global_bus.active or self.bus.active:
            emit(
                BulkheadRejected(
                    operation=self.name,
                    at=clock.now(),
                    reason=refused.reason,
                    active=self.active,
                    queued=len(self._queue),
                ),
                self.bus,
            )
        kind = CallerQuotaExceeded if refused.reason == "caller_quota" else BulkheadFull
        return kind(
            self.name,
            refused.reason,
            f"{self.kind} {self.name!r} refused the call: {refused.detail}",
        )

    def _forget(self, caller: str | None) -> None:
        if caller is not None:
            left = self._held.get(caller, 0) - 1
            if left > 0:
                self._held[caller] = left
            else:
                self._held.pop(caller, None)

    def _grant_waiters(self) -> list[_Waiter]:
        """Hand free slots to the first waiters (lock held); returns whom to wake."""
        woken = []
        queue = self._queue
        while queue and self.active < self.limit:
            waiter = queue.popleft()
            waiter.granted = True
            self.active += 1
            woken.append(waiter)
        return woken

    # -- the faces' building blocks

    def release(self, caller: str | None) -> None:
        """Give a slot back; the first waiter (if any) gets it."""
        with self._lock:
            self._forget(caller)
            self.active -= 1
            active = self.active
            woken = self._grant_waiters() if self._queue else []
        for waiter in woken:
            waiter.wake()
        # Per call: built only for a subscriber that wants it (an exporter
        # of the rare kinds, or a logger at WARNING, does not).
        if (global_bus.active or self.bus.active) and listening(self.bus, BulkheadReleased):
            emit(BulkheadReleased(operation=self.name, at=clock.now(), active=active), self.bus)

    def set_limit(self, limit: int) -> None:
        """Change the concurrency limit; a larger one admits waiters at once."""
        self.reconfigure(limit, self.max_queue, self.max_wait, self.per_caller)

    def reconfigure(
        self, limit: int, max_queue: int, max_wait: float, per_caller: int | None
    ) -> None:
        """Take new limits, keeping every slot held and every place queued.

        Held slots go on counting: a smaller limit admits nobody until fewer
        than the new limit are held; a larger one admits waiters at once.
        Queued calls keep their place (a smaller queue refuses newcomers until
        it is below it); ``max_wait`` bounds the waits that start from now.
        A quota added here counts the slots its caller holds already.
        """
        with self._lock:
            self.limit = limit
            self.max_queue = max_queue
            self.max_wait = max_wait
            self.per_caller = per_caller
            woken = self._grant_waiters()
        for waiter in woken:
            waiter.wake()

    def _wait_bound(self) -> tuple[float, bool]:
        """How long a queued call may wait, and whether the deadline set that bound."""
        ctx = CURRENT.get()
        if ctx is not None and ctx[0] is not None:
            left = ctx[0] - clock.now()
            if left <= 0.0:
                raise DeadlineExceeded(
                    f"{self.kind} {self.name!r}: the deadline passed before a slot was free"
                )
            if left < self.max_wait:
                return left, True
        return self.max_wait, False

    def _timed_out(self, waiter: _Waiter, by_deadline: bool, waited: float) -> None:
        """After a wait ended without a wake: return if the slot came anyway, else raise."""
        with self._lock:
            if waiter.granted:
                return
            self._queue.remove(waiter)
            self._forget(waiter.caller)
        if by_deadline:
            raise DeadlineExceeded(
                f"{self.kind} {self.name!r}: the deadline passed after waiting "
                f"{waited:.3f} s for a slot"
            )
        raise self._reject(_Refused("max_wait", f"no slot was free within {self.max_wait:g} s"))

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter was cancelled: leave the queue, or give back a slot handed to it."""
        with self._lock:
            if not waiter.granted:
                self._queue.remove(waiter)
                self._forget(waiter.caller)
                return
        self.release(waiter.caller)

    def _admitted(self, start: float | None) -> None:
        if (global_bus.active or self.bus.active) and listening(self.bus, BulkheadAdmitted):
            now = clock.now()
            emit(
                BulkheadAdmitted(
                    operation=self.name,
                    at=now,
                    waited=0.0 if start is None else now - start,
                    active=self.active,
                ),
                self.bus,
            )

    def _first_try(self, caller: str | None) -> bool:
        """Take a free slot at once; False when the caller must queue; raise when it may not."""
        try:
            with self._lock:
                if self._take(caller):
                    return True
                if self.max_queue == 0:
                    raise _Refused("full", f"all {self.limit} slots are taken")
        except _Refused as refused:
            raise self._reject(refused) from None
        return False

    def _queue_up(self, caller: str | None, waiter: _Waiter) -> bool:
        """Queue ``waiter``; True if a slot freed meanwhile and was taken instead."""
        try:
            with self._lock:
                if self._take(caller):
                    return True
                self._enqueue(waiter)
        except _Refused as refused:
            raise self._reject(refused) from None
        return False

    def _take_free(self, caller: str | None) -> bool:
        """The happy path of an unnamed caller without quotas: a free slot if nobody is queued."""
        if self.per_caller is not None or caller is not None:
            return False
        with self._lock:
            if self.active >= self.limit or self._queue:
                return False
            self.active += 1
        self._admitted(None)
        return True

    def acquire(self, caller: str | None) -> None:
        """Take a slot for a thread, waiting in the queue if allowed."""
        if self._take_free(caller):
            return
        if self._first_try(caller):
            self._admitted(None)
            return
        bound, by_deadline = self._wait_bound()
        waiter = _ThreadWaiter(caller)
        start = clock.now()
        if not self._queue_up(caller, waiter):
            try:
                woken = waiter.event.wait(bound)
            except BaseException:
                self._abandon(waiter)
                raise
            if not woken:
                self._timed_out(waiter, by_deadline, clock.now() - start)
        self._admitted(start)

    async def acquire_async(self, caller: str | None) -> None:
        """Take a slot for an asyncio or trio task, waiting in the queue if allowed."""
        if self._take_free(caller):
            return
        if self._first_try(caller):
            self._admitted(None)
            return
        bound, by_deadline = self._wait_bound()
        waiter = _TaskWaiter(caller)
        start = clock.now()
        if not self._queue_up(caller, waiter):
            try:
                woken = await waiter.signal.wait(bound)
            except BaseException:
                self._abandon(waiter)
                raise
            if not woken:
                self._timed_out(waiter, by_deadline, clock.now() - start)
        self._admitted(start)


class _Refused(Exception):
    """Raised under the lock, turned into a BulkheadFull (and an event) outside it."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------
# The face users hold.


class Bulkhead(CallDecorator):
    """At most ``max_concurrent`` calls at once (see `BulkheadConfig`).

    Faces: ``with bulkhead:`` / ``async with bulkhead:``, ``with
    bulkhead.slot(caller):`` / ``async with bulkhead.slot_async(caller):``,
    [`call()`][datapunk_recovery.flow.bulkhead.Bulkhead.call] /
    [`call_async()`][datapunk_recovery.flow.bulkhead.Bulkhead.call_async], and the object itself as
    a
    decorator
    for sync and async functions (signature kept).  The caller for quotas is
    ``caller=`` or else the one set by [`as_caller()`][datapunk_recovery.flow.bulkhead.as_caller].
    """

    __slots__ = ("_slots", "bus", "config", "name")

    def __init__(
        self, name: str, config: BulkheadConfig | None = None, *, bus: EventBus | None = None
    ) -> None:
        self.name = name
        self.config = config = config if config is not None else BulkheadConfig()
        if not isinstance(config, BulkheadConfig):
            raise TypeError(f"Bulkhead.config: expected a BulkheadConfig, got {shown(config)}")
        #: Where this bulkhead's events go first (then the global bus).
        self.bus = bus if bus is not None else EventBus()
        self._slots = SlotPool(
            name,
            config.max_concurrent,
            config.max_queue,
            config.max_wait,
            config.per_caller,
            self.bus,
        )

    def state(self) -> BulkheadState:
        """Calls running and waiting now."""
        return self._slots.state()

    @property
    def slots(self) -> SlotPool:
        """The slot pool, for a layer that holds a slot around its own call (a pipeline stage)."""
        return self._slots

    def reconfigure(self, config: BulkheadConfig) -> None:
        """Take ``config`` while calls run, keeping every slot held and every place queued.

        This is how a hot reload changes a bulkhead: the calls admitted before
        keep counting against the new limit, so concurrency never exceeds the
        largest limit in force.  A smaller ``max_concurrent`` admits nobody
        until fewer calls than it hold a slot; a larger one admits waiters at
        once.  Queued calls keep their place; ``max_wait`` applies to waits
        that start from now; a ``per_caller`` quota added here counts the
        slots its caller holds already (a caller at it is refused until one
        of its slots goes back).
        """
        if not isinstance(config, BulkheadConfig):
            raise TypeError(f"Bulkhead.reconfigure: expected a BulkheadConfig, got {shown(config)}")
        self._slots.reconfigure(
            config.max_concurrent, config.max_queue, config.max_wait, config.per_caller
        )
        self.config = config

    def acquire(self, caller: str | None = None) -> str | None:
        """Take a slot (a thread may wait); returns the caller to pass to `release()`."""
        caller = caller if caller is not None else _CALLER.get()
        self._slots.acquire(caller)
        return caller

    async def acquire_async(self, caller: str | None = None) -> str | None:
        """Take a slot (a task may wait); returns the caller to pass to `release()`."""
        caller = caller if caller is not None else _CALLER.get()
        await self._slots.acquire_async(caller)
        return caller

    def release(self, caller: str | None = None) -> None:
        """Give back a slot taken by `acquire()` / `acquire_async()`."""
        self._slots.release(caller)

    @contextmanager
    def slot(self, caller: str | None = None) -> Iterator[None]:
        """Hold a slot for the block (a thread may wait for it)."""
        who = self.acquire(caller)
        try:
            yield
        finally:
            self._slots.release(who)

    def slot_async(self, caller: str | None = None) -> _AsyncSlot:
        """``async with bulkhead.slot_async(caller):`` holds a slot for the block."""
        return _AsyncSlot(self, caller)

    # ``with bulkhead:`` counts against the caller set by :func:`as_caller`.  The
    # object is shared, so the caller cannot be kept on it between enter and
    # exit; it is read again at exit, where the ``as_caller`` block around the
    # ``with`` still holds the same value (an inner one has been reset by then).

    def __enter__(self) -> None:
        self._slots.acquire(_CALLER.get())

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._slots.release(_CALLER.get())

    async def __aenter__(self) -> None:
        await self._slots.acquire_async(_CALLER.get())

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._slots.release(_CALLER.get())

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` holding a slot."""
        slots = self._slots
        who = _CALLER.get()
        slots.acquire(who)
        try:
            return fn(*args, **kwargs)
        finally:
            slots.release(who)

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn`` holding a slot."""
        slots = self._slots
        who = _CALLER.get()
        await slots.acquire_async(who)
        try:
            return await fn(*args, **kwargs)
        finally:
            slots.release(who)


class _AsyncSlot:
    __slots__ = ("_bulkhead", "_caller", "_who")

    def __init__(self, bulkhead: Bulkhead, caller: str | None) -> None:
        self._bulkhead = bulkhead
        self._caller = caller
        self._who: str | None = None

    async def __aenter__(self) -> None:
        self._who = await self._bulkhead.acquire_async(self._caller)

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bulkhead.release(self._who)
