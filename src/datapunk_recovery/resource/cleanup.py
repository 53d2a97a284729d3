"""Compensations: undoing the finished steps of an operation that failed part-way.

An operation that acquires several resources (books a flight, then a hotel,
then charges a card) registers a compensation after each step.  If a later
step fails, the compensations run in reverse order, *every one of them*, even
when one of them fails; their errors are raised together with the operation's
own error in a [`CleanupFailed`][datapunk_recovery.resource.cleanup.CleanupFailed] (an
``ExceptionGroup``), so nothing is
lost and nothing is left half-undone silently.  When every compensation
succeeds, the operation's error is re-raised as itself.

Cancellation is sacred but cleanup still happens: if the operation is
cancelled (or the task is cancelled again while compensations run), the
compensations run shielded from the cancellation, each bounded by
``CleanupConfig.timeout`` seconds, and then the cancellation propagates
untouched.  This holds under asyncio and trio.

Two kinds of entries share one stack, so the reverse order covers both:
[`Compensations.add()`][datapunk_recovery.resource.cleanup.Compensations.add] runs only if the block
fails (an undo),
[`Compensations.always()`][datapunk_recovery.resource.cleanup.Compensations.always] runs in every
case (a release).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, Literal

from datapunk_recovery._core import clock
from datapunk_recovery._core.errors import ErrorCategory, RecoveryError, mark_final
from datapunk_recovery._core.events import Event, EventBus, emit, listening
from datapunk_recovery._core.validate import check_seconds, shown
from datapunk_recovery._execution import runtime as _runtime

__all__ = [
    "CleanupConfig",
    "CleanupFailed",
    "CleanupFinished",
    "CompensationRan",
    "CompensationTimeout",
    "Compensations",
]

_log = logging.getLogger("datapunk_recovery.resource")
_OWNER: Final = "CleanupConfig"


@dataclass(frozen=True, slots=True)
class CleanupConfig:
    """How long one async compensation may run, in seconds, before it is abandoned.

    The bound is what makes cleanup under cancellation safe: a cancelled
    caller waits for its compensations, but never forever.  Sync compensations
    cannot be interrupted and are not bounded.
    """

    timeout: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "timeout", check_seconds(_OWNER, "timeout", self.timeout, positive=True)
        )


class CompensationTimeout(RecoveryError):
    """An async compensation ran longer than ``CleanupConfig.timeout`` and was abandoned."""

    category = ErrorCategory.TIMEOUT
    retryable = False


class CleanupFailed(ExceptionGroup[Exception]):
    """Compensations failed.  The operation's own error, if any, is the first member.

    ``original`` is the operation's error (``None`` when the block succeeded
    and only an [`Compensations.always()`][datapunk_recovery.resource.cleanup.Compensations.always]
    entry failed); ``cleanup_errors``
    are the compensations' errors in the order they ran.  Marked final: what
    was done is now only partly undone, so no outer layer retries blindly.
    """

    original: Exception | None = None

    @property
    def cleanup_errors(self) -> tuple[Exception, ...]:
        """The compensations' own errors, in the order the compensations ran."""
        skip = 1 if self.original is not None else 0
        return tuple(self.exceptions[skip:])


@dataclass(frozen=True, slots=True, kw_only=True)
class CompensationRan(Event):
    """One compensation ran; ``duration`` in seconds; ``error_type`` is None on success.

    ``compensation`` is the callable's qualified name; ``trigger`` is
    ``"failure"``, ``"cancellation"`` or ``"success"`` (an ``always`` entry).
    """

    name: ClassVar[str] = "resource.compensation"
    area: ClassVar[str] = "resource"

    compensation: str
    trigger: str
    duration: float
    succeeded: bool
    error_type: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CleanupFinished(Event):
    """A block's cleanup ended: ``ran`` compensations ran, ``failed`` of them failed."""

    name: ClassVar[str] = "resource.cleanup"
    area: ClassVar[str] = "resource"

    trigger: str
    ran: int
    failed: int
    elapsed: float


@dataclass(frozen=True, slots=True)
class _Entry:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    always: bool

    @property
    def label(self) -> str:
        return getattr(self.fn, "__qualname__", None) or type(self.fn).__name__


Mode = Literal["sync", "async"]


class Compensations:
    """A stack of compensations for one block: ``with`` (sync) or ``async with``.

    ``name`` names the operation in events.  Each entry runs at most once: the
    stack is emptied as it unwinds, and the object cannot be entered twice.
    In a sync block, only sync callables may be registered; in an async block,
    both (a coroutine function is awaited, bounded by ``config.timeout``).
    """

    __slots__ = ("_bus", "_entries", "_mode", "config", "name")

    def __init__(
        self,
        name: str = "compensations",
        *,
        config: CleanupConfig | None = None,
        bus: EventBus | None = None,
    ) -> None:
        if config is not None and not isinstance(config, CleanupConfig):
            raise TypeError(f"Compensations.config: expected a CleanupConfig, got {shown(config)}")
        self.name = name
        self.config = config if config is not None else CleanupConfig()
        self._bus = bus
        self._entries: list[_Entry] = []
        self._mode: Mode | None = None

    # -- registering -------------------------------------------------------------------

    def add(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Register ``fn(*args, **kwargs)`` to undo a finished step if the block fails."""
        self._push(_Entry(fn, args, kwargs, always=False))

    def always(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Register ``fn(*args, **kwargs)`` to run when the block ends, failed or not."""
        self._push(_Entry(fn, args, kwargs, always=True))

    def _push(self, entry: _Entry) -> None:
        if not callable(entry.fn):
            raise TypeError(f"Compensations: expected a callable, got {shown(entry.fn)}")
        if self._mode is None:
            raise RuntimeError("Compensations: register inside its `with` block")
        if self._mode == "sync" and _is_async(entry.fn):
            raise TypeError(
                f"Compensations: {entry.label} is async; use `async with Compensations()`"
            )
        self._entries.append(entry)

    def __len__(self) -> int:
        return len(self._entries)

    # -- entering and leaving -------------------------------------------------------------

    def _enter(self, mode: Mode) -> None:
        if self._mode is not None:
            raise RuntimeError("Compensations: a stack is used for one block only")
        self._mode = mode

    def __enter__(self) -> Compensations:
        self._enter("sync")
        return self

    async def __aenter__(self) -> Compensations:
        self._enter("async")
        return self

    def _take(self, failed: bool) -> list[_Entry]:
        """Pop the entries that must run now, last registered first; drop the rest."""
        entries, self._entries = self._entries, []
        entries.reverse()
        return entries if failed else [e for e in entries if e.always]

    def __exit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        entries = self._take(exc is not None)
        if not entries:
            return False
        trigger = _trigger(exc)
        start = clock.now()
        errors: list[Exception] = []
        for entry in entries:
            t0 = clock.now()
            try:
                _unawaited(entry, entry.fn(*entry.args, **entry.kwargs))
            except Exception as error:
                errors.append(error)
                self._ran(entry, trigger, t0, error)
            else:
                self._ran(entry, trigger, t0, None)
        self._finish(exc, errors, trigger, len(entries), start)
        return False

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        entries = self._take(exc is not None)
        if not entries:
            return False
        trigger = _trigger(exc)
        start = clock.now()
        errors, cancelled_meanwhile = await _runtime.shielded(self._unwind(entries, trigger))
        if cancelled_meanwhile and (exc is None or isinstance(exc, Exception)):
            # Cancelled while cleaning up after a success or an ordinary
            # failure: the cleanup is done, now the cancellation goes on.
            cancellation = asyncio.CancelledError()
            self._finish(cancellation, errors, trigger, len(entries), start)
            raise cancellation
        self._finish(exc, errors, trigger, len(entries), start)
        return False

    async def _unwind(self, entries: Sequence[_Entry], trigger: str) -> list[Exception]:
        errors: list[Exception] = []
        timeout = self.config.timeout
        for entry in entries:
            t0 = clock.now()
            try:
                timed_out, _ = await _runtime.call_within(_invoke, (entry,), {}, timeout)
                if timed_out:
                    raise CompensationTimeout(
                        f"compensation {entry.label} ran past {timeout:g} s and was abandoned"
                    )
            except Exception as error:
                errors.append(error)
                self._ran(entry, trigger, t0, error)
            else:
                self._ran(entry, trigger, t0, None)
        return errors

    # -- reporting ------------------------------------------------------------------------

    def _ran(self, entry: _Entry, trigger: str, t0: float, error: Exception | None) -> None:
        if listening(self._bus):
            at = clock.now()
            emit(
                CompensationRan(
                    operation=self.name,
                    at=at,
                    compensation=entry.label,
                    trigger=trigger,
                    duration=at - t0,
                    succeeded=error is None,
                    error_type=None if error is None else type(error).__name__,
                ),
                self._bus,
            )

    def _finish(
        self,
        exc: BaseException | None,
        errors: list[Exception],
        trigger: str,
        ran: int,
        start: float,
    ) -> None:
        """Report the unwind, then raise the group if a compensation failed."""
        if listening(self._bus):
            at = clock.now()
            emit(
                CleanupFinished(
                    operation=self.name,
                    at=at,
                    trigger=trigger,
                    ran=ran,
                    failed=len(errors),
                    elapsed=at - start,
                ),
                self._bus,
            )
        if not errors:
            return
        kinds = ", ".join(type(e).__name__ for e in errors)
        if exc is not None and not isinstance(exc, Exception):
            # Never turn a cancellation into something else: say what failed, let it go.
            exc.add_note(f"datapunk-recovery: {len(errors)} compensation(s) failed: {kinds}")
            _log.warning(
                "%s: %d compensation(s) failed during cancellation: %s",
                self.name,
                len(errors),
                kinds,
            )
            return
        original = exc if isinstance(exc, Exception) else None
        members: list[Exception] = [original, *errors] if original is not None else errors
        what = "failed" if original is not None else "succeeded"
        group = CleanupFailed(
            f"{self.name!r} {what}, and {len(errors)} of {ran} compensation(s) failed",
            members,
        )
        group.original = original
        mark_final(group, "compensations failed: state only partly undone")
        raise group from None


def _is_async(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is known to return a coroutine (a coroutine function, or an
    object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the bound method, not callable()
    )


def _unawaited(entry: _Entry, result: object) -> None:
    """In a sync block, a compensation that returned an awaitable did not undo anything.

    Only its call is known to be async (``lambda: undo_async(x)`` passes the
    add-time check): fail it loudly, so that it is reported in
    [`CleanupFailed`][datapunk_recovery.resource.cleanup.CleanupFailed] instead of being dropped.  A
    coroutine is closed
    first (it never started: nothing ran, and no "never awaited" warning).
    """
    if not inspect.isawaitable(result):
        return
    if inspect.iscoroutine(result):
        result.close()
        what = "a coroutine (closed without running)"
    else:
        what = f"an awaitable ({type(result).__name__}, never awaited)"
    raise TypeError(
        f"compensation {entry.label} returned {what} in a sync `with Compensations()` "
        f"block, so it undid nothing; use `async with Compensations()` to await it"
    )


def _trigger(exc: BaseException | None) -> str:
    if exc is None:
        return "success"
    return "failure" if isinstance(exc, Exception) else "cancellation"


async def _invoke(entry: _Entry) -> None:
    result = entry.fn(*entry.args, **entry.kwargs)
    if inspect.isawaitable(result):
        await result
