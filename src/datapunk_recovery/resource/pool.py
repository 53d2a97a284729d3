"""Allocation under pressure: a limited pool per resource kind.

A [`ResourcePool`][datapunk_recovery.resource.pool.ResourcePool] hands out *units* of one kind of
resource: GPU slots,
worker processes, file handles, bytes of a memory budget.  It protects the
resource the way a bulkhead protects a ship:

- at most ``capacity`` units are held at once;
- callers wait in line (first come, first served, so a large request is not
  starved by small ones), at most ``max_wait`` seconds and never past the
  overall deadline; when ``max_waiting`` callers already wait, a new one is
  rejected at once ([`PoolFull`][datapunk_recovery.resource.errors.PoolFull]) instead of joining a
  line that cannot
  move;
- each caller (a tenant, a route) holds at most its quota, waiting included
  ([`QuotaExceeded`][datapunk_recovery.resource.errors.QuotaExceeded]), so one caller cannot take
  the whole pool;
- when the pool makes the resource itself (``allocate``), a failed
  allocation is retried by the retry engine; when it still fails, the units
  go back to the pool and the error propagates.

Every lease is tracked ([`tracking`][datapunk_recovery.resource.tracking]): a lease released twice
is reported
and frees nothing the second time; a lease garbage-collected unreleased is
reported and its units come back to the pool.  Metrics are events:
[`PoolAcquisition`][datapunk_recovery.resource.pool.PoolAcquisition] (how long the caller waited and
how it ended) and
[`PoolUsage`][datapunk_recovery.resource.pool.PoolUsage] (in use and waiting after each change), per
kind, and
[`ResourcePool.stats()`][datapunk_recovery.resource.pool.ResourcePool.stats] gives the running
totals.

The pool is asynchronous and works under asyncio and trio; one pool serves
one event loop.  Cancellation while waiting, allocating or releasing returns
the units and propagates untouched; it is never counted as a failure.
"""

from __future__ import annotations

import inspect
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar, Final, Generic, TypeVar, cast

from datapunk_recovery._core import clock
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.errors import DeadlineExceeded
from datapunk_recovery._core.events import Event, EventBus, emit, listening
from datapunk_recovery._core.validate import check_count, check_mapping, check_seconds, shown
from datapunk_recovery._execution import runtime as _runtime
from datapunk_recovery._execution.deadline import remaining
from datapunk_recovery._execution.engine import retry
from datapunk_recovery.budget import RetryGate
from datapunk_recovery.flow.bulkhead import current_caller

from ._calls import as_async
from .errors import AllocationTimeout, PoolFull, QuotaExceeded
from .tracking import ResourceTracker, TrackedResource

__all__ = [
    "Lease",
    "PoolAcquisition",
    "PoolConfig",
    "PoolStats",
    "PoolUsage",
    "ResourcePool",
]

T = TypeVar("T")

_OWNER: Final = "PoolConfig"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """The limits of one pool.

    ``capacity``: units held at once.  ``max_wait``: seconds a caller waits
    for units before [`AllocationTimeout`][datapunk_recovery.resource.errors.AllocationTimeout].
    ``max_waiting``: callers
    allowed to wait at once (``None``: no limit; ``0``: never wait).
    ``per_caller``: the default quota of units one caller may hold or wait
    for (``None``: no quota); ``quotas`` overrides it per caller name.
    ``allocation_retry``: how a failing ``allocate`` is retried.
    """

    capacity: int
    max_wait: float = 5.0
    max_waiting: int | None = None
    per_caller: int | None = None
    quotas: Mapping[str, int] = field(default_factory=dict)
    allocation_retry: RetryConfig = field(
        default_factory=lambda: RetryConfig(max_attempts=3, base_delay=0.05, max_delay=1.0)
    )

    def __post_init__(self) -> None:
        check_count(_OWNER, "capacity", self.capacity)
        object.__setattr__(self, "max_wait", check_seconds(_OWNER, "max_wait", self.max_wait))
        if self.max_waiting is not None:
            check_count(_OWNER, "max_waiting", self.max_waiting, minimum=0)
        if self.per_caller is not None:
            check_count(_OWNER, "per_caller", self.per_caller)
        quotas = check_mapping(_OWNER, "quotas", self.quotas)
        for caller, quota in quotas.items():
            if not isinstance(caller, str):
                raise TypeError(f"{_OWNER}.quotas: caller names must be str, got {shown(caller)}")
            check_count(_OWNER, f"quotas[{shown(caller)}]", quota)
        object.__setattr__(self, "quotas", MappingProxyType(quotas))
        if not isinstance(self.allocation_retry, RetryConfig):
            raise TypeError(
                f"{_OWNER}.allocation_retry: expected a RetryConfig,"
                f" got {shown(self.allocation_retry)}"
            )

    def quota(self, caller: str) -> int | None:
        """The units ``caller`` may hold or wait for at once (``None``: no quota)."""
        return self.quotas.get(caller, self.per_caller)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Running totals of one pool; ``total_wait`` is seconds spent waiting, all callers.

    ``failures`` counts allocations that failed after their retries; ``leaks``
    leases released twice or never released.
    """

    kind: str
    capacity: int
    in_use: int
    waiting: int
    acquired: int
    timeouts: int
    rejected: int
    quota_refused: int
    failures: int
    leaks: int
    total_wait: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolAcquisition(Event):
    """A caller asked for ``units``; ``waited`` seconds later it ended with ``outcome``.

    ``outcome``: ``acquired``, ``timeout``, ``rejected`` (line full),
    ``quota`` (quota refused), ``deadline`` or ``failed`` (allocation failed).
    """

    name: ClassVar[str] = "resource.acquisition"
    area: ClassVar[str] = "resource"

    kind: str
    caller: str
    units: int
    waited: float
    outcome: str
    error_type: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolUsage(Event):
    """The pool after a change: ``in_use`` of ``capacity`` units, ``waiting`` callers."""

    name: ClassVar[str] = "resource.usage"
    area: ClassVar[str] = "resource"

    kind: str
    capacity: int
    in_use: int
    waiting: int


_Signal = _runtime.TaskEvent


def _signal() -> _Signal:
    return _runtime.task_event()


class _Waiter:
    __slots__ = ("caller", "granted", "signal", "units")

    def __init__(self, units: int, caller: str) -> None:
        self.units = units
        self.caller = caller
        self.granted = False
        self.signal = _signal()


class Lease(Generic[T]):
    """``units`` of the pool held by ``caller``; ``resource`` is what ``allocate`` made.

    Release it once with ``await lease.release()`` (or leave its ``async
    with`` block).  A second release is reported as a leak and does nothing.
    """

    __slots__ = ("__weakref__", "_finalizer", "_handle", "_pool", "caller", "resource", "units")

    def __init__(
        self,
        pool: ResourcePool[T],
        handle: TrackedResource[T | None],
        units: int,
        caller: str,
    ) -> None:
        self._pool = pool
        self._handle = handle
        self.resource = handle.resource
        self.units = units
        self.caller = caller
        # Collected unreleased: the tracker reports the leak, the pool gets its units back.
        self._finalizer = weakref.finalize(self, pool._lost.append, (units, caller, handle))

    @property
    def released(self) -> bool:
        return self._handle.released

    async def release(self) -> bool:
        """Give the units back (after the pool's ``release`` ran); False if already released."""
        return await self._pool._release(self)

    async def __aenter__(self) -> Lease[T]:
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


class _Acquire(Generic[T]):
    """``await pool.acquire(...)`` gives a lease; ``async with pool.acquire(...)`` too."""

    __slots__ = ("_args", "_lease", "_pool")

    def __init__(self, pool: ResourcePool[T], units: int, caller: str) -> None:
        self._pool = pool
        self._args = (units, caller)
        self._lease: Lease[T] | None = None

    def __await__(self) -> Generator[Any, None, Lease[T]]:
        return self._pool._acquire(*self._args).__await__()

    async def __aenter__(self) -> Lease[T]:
        self._lease = await self._pool._acquire(*self._args)
        return self._lease

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.release()


class ResourcePool(Generic[T]):
    """A limited pool of one ``kind`` of resource; see the module documentation.

    ``allocate(units)`` (sync or async, optional) makes the resource handed
    out with the units; ``release(resource)`` (sync or async, optional)
    disposes of it when the lease is released.  ``budget`` limits the
    allocation retries.  ``tracker`` defaults to a tracker of the pool's own.
    """

    __slots__ = (
        "_acquired",
        "_allocate",
        "_allocate_fn",
        "_budget",
        "_bus",
        "_claimed",
        "_failures",
        "_in_use",
        "_line",
        "_lost",
        "_quota_refused",
        "_rejected",
        "_release_fn",
        "_timeouts",
        "_total_wait",
        "config",
        "kind",
        "tracker",
    )

    def __init__(
        self,
        kind: str,
        config: PoolConfig,
        *,
        allocate: Callable[[int], T | Awaitable[T]] | None = None,
        release: Callable[[T], object] | None = None,
        budget: RetryGate | None = None,
        tracker: ResourceTracker | None = None,
        bus: EventBus | None = None,
    ) -> None:
        if not isinstance(config, PoolConfig):
            raise TypeError(f"ResourcePool.config: expected a PoolConfig, got {shown(config)}")
        self.kind = kind
        self.config = config
        self.tracker = tracker if tracker is not None else ResourceTracker(kind, bus=bus)
        self._bus = bus
        self._allocate_fn = allocate
        self._budget = budget
        self._allocate = self._retried_allocate()
        self._release_fn = release
        self._in_use = 0
        self._line: deque[_Waiter] = deque()
        self._claimed: dict[str, int] = {}
        # (units, caller, handle) of leases collected unreleased; appended by
        # finalizers (at any time, from the GC), taken back in the event loop.
        self._lost: list[tuple[int, str, TrackedResource[Any]]] = []
        self._acquired = self._timeouts = self._rejected = 0
        self._quota_refused = self._failures = 0
        self._total_wait = 0.0

    def _retried_allocate(self) -> Callable[[int], Awaitable[T]] | None:
        allocate = self._allocate_fn
        if allocate is None:
            return None
        make = retry(
            self.config.allocation_retry, name=f"{self.kind}.allocate", budget=self._budget
        )
        return cast(Callable[[int], Awaitable[T]], make(as_async(allocate)))

    def reconfigure(self, config: PoolConfig) -> None:
        """Take ``config`` while leases are held, keeping every unit held and every waiter.

        This is how a hot reload changes a pool: the units held keep counting
        against the new ``capacity``, so what is held never exceeds the
        largest capacity in force.  A smaller capacity grants nothing until
        the units held leave room under it; a larger one grants the waiters
        at the head of the line at once.  Waiters keep their place and their
        wait; quotas and ``max_waiting`` apply to requests made from now on.
        Call it from the pool's event loop (as a reload does).
        """
        if not isinstance(config, PoolConfig):
            raise TypeError(f"ResourcePool.reconfigure: expected a PoolConfig, got {shown(config)}")
        retry_changed = config.allocation_retry != self.config.allocation_retry
        self.config = config
        if retry_changed:
            self._allocate = self._retried_allocate()
        self._grant()
        self._usage()

    # -- asking ---------------------------------------------------------------------------

    def acquire(self, units: int = 1, *, caller: str | None = None) -> _Acquire[T]:
        """Ask for ``units`` as ``caller``: ``await`` it, or use it with ``async with``.

        ``caller`` defaults to the one set by
        [`as_caller()`][datapunk_recovery.flow.bulkhead.as_caller], else ``"default"``.
        """
        check_count("ResourcePool.acquire", "units", units)
        if units > self.config.capacity:
            raise ValueError(
                f"ResourcePool.acquire: units must be <= capacity ({self.config.capacity}), "
                f"got {shown(units)}"
            )
        if caller is None:
            caller = current_caller() or "default"
        return _Acquire(self, units, caller)

    @property
    def in_use(self) -> int:
        """Units held now."""
        self._reclaim()
        return self._in_use

    @property
    def waiting(self) -> int:
        """Callers waiting now."""
        return len(self._line)

    def stats(self) -> PoolStats:
        """The pool's running totals now."""
        self._reclaim()
        return PoolStats(
            kind=self.kind,
            capacity=self.config.capacity,
            in_use=self._in_use,
            waiting=len(self._line),
            acquired=self._acquired,
            timeouts=self._timeouts,
            rejected=self._rejected,
            quota_refused=self._quota_refused,
            failures=self._failures,
            leaks=len(self.tracker.leaks()),
            total_wait=self._total_wait,
        )

    # -- the line -------------------------------------------------------------------------

    def _grant(self) -> None:
        """Hand free units to the callers at the head of the line, in order."""
        line = self._line
        while line and line[0].units <= self.config.capacity - self._in_use:
            waiter = line.popleft()
            self._in_use += waiter.units
            waiter.granted = True
            waiter.signal.set()

    def _unclaim(self, units: int, caller: str) -> None:
        """``caller`` no longer holds or waits for ``units`` (its quota frees them)."""
        left = self._claimed.get(caller, 0) - units
        if left > 0:
            self._claimed[caller] = left
        else:
            self._claimed.pop(caller, None)

    def _free(self, units: int, caller: str) -> None:
        self._in_use -= units
        self._unclaim(units, caller)
        self._grant()

    def _reclaim(self) -> None:
        while self._lost:
            units, caller, handle = self._lost.pop()
            if not handle.released:  # not released (its tracker reports the leak)
                self._free(units, caller)

    async def _acquire(self, units: int, caller: str) -> Lease[T]:
        self._reclaim()
        start = clock.now()
        config = self.config
        claimed = self._claimed.get(caller, 0)
        quota = config.quota(caller)
        if quota is not None and claimed + units > quota:
            self._quota_refused += 1
            self._report(caller, units, start, "quota")
            raise QuotaExceeded(
                self.kind,
                "caller_quota",
                f"pool {self.kind!r}: caller {caller!r} holds or waits for {claimed} unit(s) "
                f"of its quota of {quota}, asked for {units} more",
            )
        if not self._line and config.capacity - self._in_use >= units:
            self._in_use += units
            self._claimed[caller] = claimed + units
        else:
            await self._wait(units, caller, start)
        try:
            resource = None if self._allocate is None else await self._allocate(units)
        except BaseException as exc:
            self._free(units, caller)
            if isinstance(exc, Exception):
                self._failures += 1
                self._report(caller, units, start, "failed", exc)
            raise
        handle: TrackedResource[T | None] = self.tracker.track(resource, self.kind)
        self._acquired += 1
        self._report(caller, units, start, "acquired")
        return Lease(self, handle, units, caller)

    async def _wait(self, units: int, caller: str, start: float) -> None:
        config = self.config
        if config.max_waiting is not None and len(self._line) >= config.max_waiting:
            self._rejected += 1
            self._report(caller, units, start, "rejected")
            raise PoolFull(
                self.kind,
                "queue_full",
                f"pool {self.kind!r}: {len(self._line)} caller(s) already wait "
                f"(max_waiting={config.max_waiting})",
            )
        limit = config.max_wait
        left = remaining()
        by_deadline = left is not None and left < limit
        if by_deadline:
            assert left is not None
            limit = left
            if limit <= 0.0:
                self._report(caller, units, start, "deadline")
                raise DeadlineExceeded(f"pool {self.kind!r}: the deadline passed before waiting")
        waiter = _Waiter(units, caller)
        self._line.append(waiter)
        self._claimed[caller] = self._claimed.get(caller, 0) + units
        self._usage()
        try:
            await _runtime.call_within(waiter.signal.wait, (), {}, limit)
        except BaseException:
            self._give_up(waiter)
            raise
        finally:
            self._total_wait += clock.now() - start
        if waiter.granted:
            return
        self._give_up(waiter)
        if by_deadline:
            self._report(caller, units, start, "deadline")
            raise DeadlineExceeded(
                f"pool {self.kind!r}: the deadline passed while waiting for {units} unit(s)"
            )
        self._timeouts += 1
        self._report(caller, units, start, "timeout")
        raise AllocationTimeout(
            self.kind,
            "max_wait",
            f"pool {self.kind!r}: no {units} unit(s) free within {config.max_wait:g} s "
            f"({self._in_use} of {config.capacity} in use, {len(self._line)} waiting)",
        )

    def _give_up(self, waiter: _Waiter) -> None:
        """A waiter leaves: hand back what it was granted, or leave the line."""
        if waiter.granted:
            self._free(waiter.units, waiter.caller)
            return
        self._line.remove(waiter)
        self._unclaim(waiter.units, waiter.caller)
        self._grant()  # it may have blocked smaller requests behind it
        self._usage()

    async def _release(self, lease: Lease[T]) -> bool:
        if not lease._handle.release():  # released twice: reported by the tracker
            return False
        lease._finalizer.detach()
        try:
            if self._release_fn is not None and lease.resource is not None:
                result = self._release_fn(lease.resource)
                if inspect.isawaitable(result):
                    await result
        finally:
            self._free(lease.units, lease.caller)
            self._usage()
        return True

    # -- reporting ------------------------------------------------------------------------

    def _report(
        self,
        caller: str,
        units: int,
        start: float,
        outcome: str,
        error: BaseException | None = None,
    ) -> None:
        if not listening(self._bus):
            return
        # Per acquisition: each event built only for a subscriber that wants it.
        if listening(self._bus, PoolAcquisition):
            at = clock.now()
            emit(
                PoolAcquisition(
                    operation=self.kind,
                    at=at,
                    kind=self.kind,
                    caller=caller,
                    units=units,
                    waited=at - start,
                    outcome=outcome,
                    error_type=None if error is None else type(error).__name__,
                ),
                self._bus,
            )
        self._usage()

    def _usage(self) -> None:
        if listening(self._bus) and listening(self._bus, PoolUsage):
            emit(
                PoolUsage(
                    operation=self.kind,
                    at=clock.now(),
                    kind=self.kind,
                    capacity=self.config.capacity,
                    in_use=self._in_use,
                    waiting=len(self._line),
                ),
                self._bus,
            )
