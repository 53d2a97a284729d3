"""Chaos injection: make a dependency fail on purpose, to prove that recovery works.

A recovery that was never exercised is a recovery nobody knows works.  This
module lets users break their own calls in a controlled way:

- [`Fault`][datapunk_recovery.chaos.Fault] raises a fresh exception instead of making the call;
- [`Latency`][datapunk_recovery.chaos.Latency] waits (``seconds``, or a uniform draw up to
  ``up_to``) and
  then makes the call;
- [`Outcome`][datapunk_recovery.chaos.Outcome] returns a given value instead of making the call;
- [`Behaviour`][datapunk_recovery.chaos.Behaviour] runs another callable, with the same arguments,
  instead.

An injection is applied by an injector: [`Chaos`][datapunk_recovery.chaos.Chaos] applies one
injection
at a ``rate`` (the fraction of calls, drawn from a seeded RNG), and a
[`Timeline`][datapunk_recovery.chaos.Timeline] applies scripted
[`Window`][datapunk_recovery.chaos.Window]\\ s of faults over time, read
against [`datapunk_recovery.clock.now()`][datapunk_recovery.clock.now] (so a fake clock scripts them
deterministically).  Every injector decorates sync and async functions (the
signature is kept), and offers [`call()`][datapunk_recovery.chaos.Injector.call] /
[`call_async()`][datapunk_recovery.chaos.Injector.call_async] for one-off calls (``acall()``
is the former name of ``call_async()``, still working).

Each injector has its own switch ([`enable()`][datapunk_recovery.chaos.Injector.enable] /
[`disable()`][datapunk_recovery.chaos.Injector.disable], flipped at run time), and
[`disable_all()`][datapunk_recovery.chaos.disable_all] is
the global kill switch over every injector of the process.  A switched-off
injector costs its wrapper one attribute read per call on top of the wrapper's
own frame (see
[docs/benchmarks/chaos.md](https://datapunk.github.io/datapunk-recovery/benchmarks/chaos/) for the
measured figures).  Where
even that is too much (production), start the process with
``DATAPUNK_RECOVERY_CHAOS=off``: chaos is then *disarmed*, decorators return
the function itself untouched (zero cost), and nothing can switch it back on.
The switch fails safe: only ``1``/``on``/``true``/``yes`` (or no value) leave
chaos armed; any value that is not an accepted one (``disabled``, ``n``)
disarms it too, with a warning naming the variable and the accepted values.

Latency sleeps through the execution layer (`datapunk_recovery._runtime`),
so a fake clock advances instead of waiting, and under asyncio and trio alike
a cancelled sleep cancels at once.  Nothing here catches anything:
cancellation passes through untouched, and only ``Exception`` subclasses can
be injected as faults.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import os
import random
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, ParamSpec, TypeVar, cast

from . import _runtime, clock
from ._validate import check_fraction, check_number, check_seconds, shown
from .events import Event, EventBus, emit, global_bus
from .pipeline import ARun, Run, StageAliases
from .stats import count_value

__all__ = [
    "Behaviour",
    "Chaos",
    "ChaosInjected",
    "ChaosStage",
    "ChaosStats",
    "ARMING_VALUES",
    "DISARMING_VALUES",
    "DISARM_VARIABLE",
    "Fault",
    "Injection",
    "Injector",
    "Latency",
    "Outcome",
    "Timeline",
    "Window",
    "all_enabled",
    "armed",
    "disable_all",
    "enable_all",
    "injected_by",
]

P = ParamSpec("P")
R = TypeVar("R")

# The attribute an injected fault carries: the name of the injector that raised it.
_MARK: Final = "_datapunk_recovery_chaos"


# ---------------------------------------------------------------------------
# The global kill switch.


class _Switch:
    """A mutable flag read on every call of every injector (one attribute read)."""

    __slots__ = ("on",)

    def __init__(self, on: bool) -> None:
        self.on = on


#: The environment variable that disarms chaos for the whole process.
DISARM_VARIABLE: Final = "DATAPUNK_RECOVERY_CHAOS"
#: The values of :data:`DISARM_VARIABLE` that leave chaos armed (unset or empty does too).
ARMING_VALUES: Final = ("1", "on", "true", "yes")
#: The values that disarm chaos quietly; any other value disarms it with a warning.
DISARMING_VALUES: Final = ("0", "off", "false", "no")


def _read_switch(value: str | None) -> tuple[bool, str | None]:
    """Whether chaos is armed by ``value`` of the kill switch, and a warning to give.

    The variable is a kill switch, so it fails safe: a value that is neither
    an arming nor a disarming one (a typo such as ``disabled``, ``none``,
    ``n``) disarms chaos, and the warning names the variable, the value and
    the accepted values.  Case and surrounding blanks do not matter.
    """
    if value is None:
        return True, None
    word = value.strip().lower()
    if word == "" or word in ARMING_VALUES:
        return True, None
    if word in DISARMING_VALUES:
        return False, None
    return False, (
        f"{DISARM_VARIABLE}={value[:40]!r} is not an accepted value (arm with "
        f"{', '.join(ARMING_VALUES)} or leave it unset; disarm with "
        f"{', '.join(DISARMING_VALUES)}): chaos is DISARMED for this process"
    )


def _armed_at_import() -> bool:
    armed, warning = _read_switch(os.environ.get(DISARM_VARIABLE))
    if warning is not None:
        warnings.warn(warning, RuntimeWarning, stacklevel=3)
        logging.getLogger("datapunk_recovery.chaos").warning("%s", warning)
    return armed


_ARMED: Final = _armed_at_import()
_GLOBAL: Final = _Switch(_ARMED)


def armed() -> bool:
    """False when ``DATAPUNK_RECOVERY_CHAOS`` disarmed chaos: ``off`` (or ``0``/``false``/``no``),
    or any value that is not an arming one (``1``/``on``/``true``/``yes``; unset or
    empty arms too), which also warns.

    Read once, at import.  Disarmed, every decorator returns the function
    itself and no switch can turn injection on: a production process cannot
    inject a fault by mistake, and pays nothing for decorators left in place.
    """
    return _ARMED


def disable_all() -> None:
    """The kill switch: no injector of this process injects anything until `enable_all()`.

    Each injector keeps its own switch; this one overrides them all, so an
    operator can stop every experiment at once without finding each injector.
    """
    _GLOBAL.on = False


def enable_all() -> None:
    """Lift the kill switch: injectors that are enabled inject again.

    Raises ``RuntimeError`` when the process is disarmed (see
    [`armed()`][datapunk_recovery.chaos.armed]).
    """
    if not _ARMED:
        raise RuntimeError(
            f"chaos is disarmed for this process by {DISARM_VARIABLE}="
            f"{os.environ.get(DISARM_VARIABLE, '')!r}; it cannot be enabled"
        )
    _GLOBAL.on = True


def all_enabled() -> bool:
    """Whether the kill switch lets injectors inject (it does by default)."""
    return _GLOBAL.on


def injected_by(exc: BaseException) -> str | None:
    """The name of the injector that raised ``exc``, or ``None`` for a real failure.

    Lets a drill tell the faults it injected from the failures it found.
    """
    name = getattr(exc, _MARK, None)
    return name if isinstance(name, str) else None


# ---------------------------------------------------------------------------
# What can be injected.


@dataclass(frozen=True, slots=True)
class Fault:
    """Raise a fresh exception instead of making the call.

    ``error`` is an ``Exception`` subclass (instantiated without arguments) or
    a zero-argument factory returning an exception: each injection raises a
    new instance, so tracebacks and notes never pile up on a shared one.
    Cancellation and exit (``BaseException`` that is not an ``Exception``) are
    refused: they are not failures a recovery should handle.
    """

    kind: ClassVar[str] = "fault"

    error: type[Exception] | Callable[[], Exception]

    def __post_init__(self) -> None:
        error = self.error
        if isinstance(error, type):
            if not issubclass(error, Exception):
                raise ValueError(
                    f"Fault.error: expected an Exception subclass (cancellation and exit are "
                    f"never injected), got {shown(error)}"
                )
        elif not callable(error):
            raise TypeError(
                f"Fault.error: expected an exception type or a factory, got {shown(error)} "
                f"({type(error).__name__})"
            )

    def make(self) -> Exception:
        """A new exception to raise."""
        exc = self.error()
        if not isinstance(exc, Exception):
            raise TypeError(
                f"Fault.error: the factory must return an Exception, got {shown(exc)} "
                f"({type(exc).__name__})"
            )
        return exc


@dataclass(frozen=True, slots=True)
class Latency:
    """Wait ``seconds`` (or a uniform draw in ``[seconds, up_to]``), then make the call.

    Both in seconds.  The wait goes through the execution layer: a fake clock
    advances instead of waiting, and a cancellation interrupts it at once.
    """

    kind: ClassVar[str] = "latency"

    seconds: float
    up_to: float | None = field(default=None, metadata={"unit": "seconds"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "seconds", check_seconds("Latency", "seconds", self.seconds))
        if self.up_to is not None:
            up_to = check_seconds("Latency", "up_to", self.up_to)
            if up_to < self.seconds:
                raise ValueError(
                    f"Latency.up_to: must be >= seconds ({self.seconds!r}), got {shown(self.up_to)}"
                )
            object.__setattr__(self, "up_to", up_to)

    def draw(self, rng: random.Random) -> float:
        """The wait of one injection, in seconds."""
        if self.up_to is None:
            return self.seconds
        return rng.uniform(self.seconds, self.up_to)


@dataclass(frozen=True, slots=True)
class Outcome:
    """Return ``value`` instead of making the call (a stale answer, an empty page, a 503)."""

    kind: ClassVar[str] = "outcome"

    value: object


@dataclass(frozen=True, slots=True)
class Behaviour:
    """Call ``fn`` with the call's own arguments instead of the real function.

    For an async call, ``fn`` may be sync or async (its result is awaited when
    it is awaitable).  Use it for what the other kinds cannot express: a
    partial write, a slow drip, a fault that depends on the arguments.
    """

    kind: ClassVar[str] = "behaviour"

    fn: Callable[..., Any]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(
                f"Behaviour.fn: expected a callable,"
                f" got {shown(self.fn)} ({type(self.fn).__name__})"
            )


Injection = Fault | Latency | Outcome | Behaviour
"""Any of the four kinds of injection."""

_KINDS: Final = (Fault, Latency, Outcome, Behaviour)


def _check_injection(owner: str, value: object) -> Injection:
    if not isinstance(value, _KINDS):
        raise TypeError(
            f"{owner}: expected a Fault, Latency, Outcome or Behaviour, got {shown(value)} "
            f"({type(value).__name__})"
        )
    return value


# ---------------------------------------------------------------------------
# Telemetry.


@dataclass(frozen=True, slots=True, kw_only=True)
class ChaosInjected(Event):
    """An injector injected something into a call.

    ``kind`` is ``fault``, ``latency``, ``outcome`` or ``behaviour``;
    ``error_type`` the injected exception's type name (faults only); ``delay``
    the injected wait in seconds (latency only, else 0).
    """

    name: ClassVar[str] = "chaos.injected"
    area: ClassVar[str] = "chaos"

    kind: str
    error_type: str | None = None
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class ChaosStats:
    """A snapshot of one injector's counters.

    ``calls`` counts the calls that reached the injector while it was switched
    on (the switched-off path counts nothing: it must stay free); the other
    fields count injections by kind.
    """

    calls: int
    faults: int
    latencies: int
    outcomes: int
    behaviours: int

    @property
    def injected(self) -> int:
        """Every injection, all kinds together."""
        return self.faults + self.latencies + self.outcomes + self.behaviours


# ---------------------------------------------------------------------------
# Injectors.


class Injector:
    """What every injector shares: a switch, counters, events, and the wrappers.

    Subclasses say which injections apply to the current call
    (`_pick()`); applying them is common: waits first, in order, then the
    first fault, outcome or behaviour takes the call's place.
    """

    __slots__ = ("_calls", "_counts", "_on", "_rng", "events", "name")

    def __init__(self, name: str, rng: random.Random, enabled: bool) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"{type(self).__name__}.name: expected a non-empty str, got {shown(name)}"
            )
        if not isinstance(enabled, bool):
            raise TypeError(f"{type(self).__name__}.enabled: expected a bool, got {shown(enabled)}")
        self.name = name
        #: This injector's own bus; events reach the global subscribers as well.
        self.events = EventBus()
        self._rng = rng
        self._on = enabled
        self._calls = itertools.count()
        self._counts = {kind.kind: itertools.count() for kind in _KINDS}

    # -- the switch ---------------------------------------------------------

    def enable(self) -> None:
        """Start injecting (unless the global kill switch is thrown)."""
        self._on = True

    def disable(self) -> None:
        """Stop injecting: calls pass straight through."""
        self._on = False

    @property
    def enabled(self) -> bool:
        """This injector's own switch (the global kill switch is separate)."""
        return self._on

    @property
    def active(self) -> bool:
        """Whether a call now would be considered for injection (both switches on)."""
        return self._on and _GLOBAL.on

    def statistics(self) -> ChaosStats:
        """The counters now."""
        c = self._counts
        return ChaosStats(
            calls=count_value(self._calls),
            faults=count_value(c["fault"]),
            latencies=count_value(c["latency"]),
            outcomes=count_value(c["outcome"]),
            behaviours=count_value(c["behaviour"]),
        )

    # -- choosing and applying ----------------------------------------------

    def _pick(self) -> tuple[Injection, ...]:
        """The injections that apply to the call starting now, in order."""
        raise NotImplementedError

    def _record(self, injection: Injection, error: Exception | None, delay: float) -> None:
        next(self._counts[injection.kind])
        if global_bus._subscribers or self.events._subscribers:
            emit(
                ChaosInjected(
                    operation=self.name,
                    at=clock.now(),
                    kind=injection.kind,
                    error_type=None if error is None else type(error).__name__,
                    delay=delay,
                ),
                self.events,
            )

    def _fault(self, injection: Fault) -> Exception:
        exc = injection.make()
        with contextlib.suppress(AttributeError, TypeError):  # a type with __slots__
            setattr(exc, _MARK, self.name)
        self._record(injection, exc, 0.0)
        return exc

    def _apply_sync(
        self,
        fn: Callable[..., R],
        args: Any,
        kwargs: Any,
        nxt: Run | None = None,
        check: Callable[..., object] | None = None,
    ) -> R:
        """Apply what `_pick()` chose, then call ``fn`` (through ``nxt``, in a pipeline).

        ``check(*args, **kwargs)`` (a signature's ``bind``) runs first when an
        injection is due, so a call ``fn`` would refuse is refused even when
        the injection would not call ``fn`` at all.
        """
        injections = self._pick()
        if injections and check is not None:
            check(*args, **kwargs)
        next(self._calls)
        for injection in injections:
            if isinstance(injection, Latency):
                delay = injection.draw(self._rng)
                self._record(injection, None, delay)
                _runtime.sleep_sync(delay)
            elif isinstance(injection, Fault):
                raise self._fault(injection)
            elif isinstance(injection, Outcome):
                self._record(injection, None, 0.0)
                return cast(R, injection.value)
            else:
                self._record(injection, None, 0.0)
                return cast(R, injection.fn(*args, **kwargs))
        if nxt is not None:
            return cast(R, nxt(fn, args, kwargs))
        return fn(*args, **kwargs)

    async def _apply_async(
        self,
        fn: Callable[..., Awaitable[R]],
        args: Any,
        kwargs: Any,
        nxt: ARun | None = None,
        check: Callable[..., object] | None = None,
    ) -> R:
        """The async twin of `_apply_sync()`."""
        injections = self._pick()
        if injections and check is not None:
            check(*args, **kwargs)
        next(self._calls)
        for injection in injections:
            if isinstance(injection, Latency):
                delay = injection.draw(self._rng)
                self._record(injection, None, delay)
                await _runtime.sleep_async(delay)
            elif isinstance(injection, Fault):
                raise self._fault(injection)
            elif isinstance(injection, Outcome):
                self._record(injection, None, 0.0)
                return cast(R, injection.value)
            else:
                self._record(injection, None, 0.0)
                result = injection.fn(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
                return cast(R, result)
        if nxt is not None:
            return cast(R, await nxt(fn, args, kwargs))
        return await fn(*args, **kwargs)

    # -- the faces ------------------------------------------------------------

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate a sync or async function; the signature is kept.

        Switched off (this injector or globally), the wrapper reads one flag
        (two when only the global switch is off) and calls ``fn``.  Disarmed
        (see [`armed()`][datapunk_recovery.chaos.armed]), ``fn`` itself is returned.
        """
        if not callable(fn):
            raise TypeError(f"{self.name}: expected a callable to wrap, got {shown(fn)}")
        if not _ARMED:
            return fn
        wrapper: Any
        if inspect.iscoroutinefunction(fn):
            wrapper = _async_wrapper(cast(Callable[P, Awaitable[Any]], fn), self)
        else:
            wrapper = _sync_wrapper(fn, self)
        wrapper.chaos = self
        return cast(Callable[P, R], wrapper)

    def stage(self) -> ChaosStage:
        """This injector as a stage of a [`Pipeline`][datapunk_recovery.pipeline.Pipeline].

        Place it with ``Pipeline.of(name, [..., injector.stage()])``: innermost,
        it breaks each attempt the way a failing dependency would, so every
        stage outside it (retry, breaker, fallback) sees the injected faults.
        """
        return ChaosStage(self)

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call a sync ``fn`` once through this injector."""
        if self._on and _GLOBAL.on:
            return self._apply_sync(fn, args, kwargs)
        return fn(*args, **kwargs)

    async def call_async(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await an async ``fn`` once through this injector (the async twin of `call()`)."""
        if self._on and _GLOBAL.on:
            return await self._apply_async(fn, args, kwargs)
        return await fn(*args, **kwargs)

    #: The former name of `call_async()`, kept working (the library's twins
    #: are ``x()`` / ``x_async()``: see docs/architecture.md).
    acall = call_async


class ChaosStage(StageAliases):
    """An injector as a pipeline stage (it fits `datapunk_recovery.pipeline.Stage`).

    Switched off, each call costs one flag read on top of the stage's frame.
    A behaviour receives the call's own arguments; latency and faults apply
    to each pass through the stage (each attempt, when placed inside a retry).
    """

    __slots__ = ("injector", "name")

    def __init__(self, injector: Injector) -> None:
        if not isinstance(injector, Injector):
            raise TypeError(f"ChaosStage: expected a chaos injector, got {shown(injector)}")
        self.injector = injector
        #: Names the stage in pipeline events.
        self.name = "chaos"

    def wrap(self, nxt: Run) -> Run:
        """The stage around ``nxt``, for sync calls (``nxt`` itself when chaos is disarmed)."""
        if not _ARMED:
            return nxt
        injector, switch, apply = self.injector, _GLOBAL, self.injector._apply_sync

        def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if injector._on and switch.on:
                return apply(fn, args, kwargs, nxt)
            return nxt(fn, args, kwargs)

        return run

    def wrap_async(self, nxt: ARun) -> ARun:
        """The stage around ``nxt``, for async calls (``nxt`` itself when chaos is disarmed)."""
        if not _ARMED:
            return nxt
        injector, switch, apply = self.injector, _GLOBAL, self.injector._apply_async

        async def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if injector._on and switch.on:
                return await apply(fn, args, kwargs, nxt)
            return await nxt(fn, args, kwargs)

        return run


# ---------------------------------------------------------------------------
# Wrappers: plain closures, ``functools.wraps`` for the name, the docstring
# and ``inspect.signature`` (through ``__wrapped__``), ``ParamSpec`` so that a
# type checker sees the decorated function's own parameters and result
# (tests/typing/chaos.py).  Switched off, a wrapper reads two flags and calls
# through; no code is generated at run time.


def _binder(fn: Callable[..., Any]) -> Callable[..., object] | None:
    """``fn``'s ``Signature.bind`` (refuses the calls ``fn`` would), or ``None`` without one."""
    try:
        return inspect.signature(fn).bind
    except (TypeError, ValueError):  # some builtins have no signature
        return None


def _sync_wrapper(fn: Callable[P, R], injector: Injector) -> Callable[P, R]:
    switch, apply, check = _GLOBAL, injector._apply_sync, _binder(fn)

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if injector._on and switch.on:
            return apply(fn, args, kwargs, None, check)
        return fn(*args, **kwargs)

    return wrapper


def _async_wrapper(
    fn: Callable[P, Awaitable[R]], injector: Injector
) -> Callable[P, Coroutine[Any, Any, R]]:
    switch, apply, check = _GLOBAL, injector._apply_async, _binder(fn)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if injector._on and switch.on:
            return await apply(fn, args, kwargs, None, check)
        return await fn(*args, **kwargs)

    return wrapper


def _rng_of(owner: str, seed: int | None, rng: random.Random | None) -> random.Random:
    if rng is not None:
        if seed is not None:
            raise ValueError(f"{owner}: give a seed or an rng, not both")
        if not isinstance(rng, random.Random):
            raise TypeError(f"{owner}.rng: expected a random.Random, got {shown(rng)}")
        return rng
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{owner}.seed: expected an int or None, got {shown(seed)}")
    return random.Random(seed)


class Chaos(Injector):
    """Inject one thing into a fraction ``rate`` (0..1) of the calls.

    ``seed`` (or a ready ``rng``) makes the choice of calls reproducible; a
    rate of 1 injects every call without drawing.  ``name`` names the
    injector in events and in the mark on injected faults
    ([`injected_by()`][datapunk_recovery.chaos.injected_by]).  ``enabled=False`` builds it switched
    off.
    """

    __slots__ = ("_injected", "injection", "rate")

    def __init__(
        self,
        injection: Injection,
        *,
        rate: float = 1.0,
        seed: int | None = None,
        rng: random.Random | None = None,
        name: str = "chaos",
        enabled: bool = True,
    ) -> None:
        super().__init__(name, _rng_of("Chaos", seed, rng), enabled)
        self.injection = _check_injection("Chaos.injection", injection)
        self.rate = check_fraction("Chaos", "rate", rate)
        self._injected: tuple[Injection, ...] = (self.injection,)

    def _pick(self) -> tuple[Injection, ...]:
        rate = self.rate
        if rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate):
            return self._injected
        return ()

    def __repr__(self) -> str:
        state = "on" if self._on else "off"
        return f"Chaos({self.injection!r}, rate={self.rate:g}, name={self.name!r}, {state})"


# ---------------------------------------------------------------------------
# Faults scripted over time.


@dataclass(frozen=True, slots=True)
class Window:
    """Inject ``injection`` into a fraction ``rate`` of calls from ``start`` to ``end``.

    ``start`` and ``end`` are seconds since the timeline started (``end``
    excluded; ``None`` for "until the end").  ``target`` names the dependency
    it breaks (``"cache"``, ``"primary"``): a timeline's injector for one
    target applies that target's windows and the windows without a target.
    """

    start: float = field(metadata={"unit": "seconds"})
    end: float | None = field(metadata={"unit": "seconds"})
    injection: Injection
    rate: float = 1.0
    target: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", check_seconds("Window", "start", self.start))
        if self.end is not None:
            end = check_seconds("Window", "end", self.end)
            if end <= self.start:
                raise ValueError(
                    f"Window.end: must be > start ({self.start!r}), got {shown(self.end)}"
                )
            object.__setattr__(self, "end", end)
        _check_injection("Window.injection", self.injection)
        object.__setattr__(self, "rate", check_fraction("Window", "rate", self.rate))
        if self.target is not None and not isinstance(self.target, str):
            raise TypeError(f"Window.target: expected a str or None, got {shown(self.target)}")

    def covers(self, elapsed: float) -> bool:
        """Whether the window is open ``elapsed`` seconds after the timeline started."""
        return self.start <= elapsed and (self.end is None or elapsed < self.end)


class Timeline:
    """A script of faults over time: `Window`\\ s read against the library clock.

    Build it, take one injector per dependency with
    [`injector()`][datapunk_recovery.chaos.Timeline.injector], and
    [`start()`][datapunk_recovery.chaos.Timeline.start] it when the load begins; before that nothing
    is injected.
    Overlapping windows apply together (a latency and a fault, say).  One
    seeded RNG serves all of the timeline's injectors, so a run with the same
    seed and the same order of calls injects the same faults.
    """

    __slots__ = ("_origin", "_rng", "name", "windows")

    def __init__(
        self,
        windows: Iterable[Window],
        *,
        seed: int | None = None,
        rng: random.Random | None = None,
        name: str = "timeline",
    ) -> None:
        checked = tuple(windows)
        for window in checked:
            if not isinstance(window, Window):
                raise TypeError(f"Timeline.windows: expected Window items, got {shown(window)}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"Timeline.name: expected a non-empty str, got {shown(name)}")
        self.windows = tuple(sorted(checked, key=lambda w: w.start))
        self.name = name
        self._rng = _rng_of("Timeline", seed, rng)
        self._origin: float | None = None

    def start(self, at: float | None = None) -> None:
        """Start (or restart) the script at library time ``at`` (default: now)."""
        # A reading of the library clock, not a duration: any finite time >= 0.
        self._origin = clock.now() if at is None else check_number("Timeline", "at", at)

    def stop(self) -> None:
        """End the script: nothing is injected until it is started again."""
        self._origin = None

    def elapsed(self) -> float | None:
        """Seconds since `start()`, or ``None`` when not started."""
        origin = self._origin
        return None if origin is None else clock.now() - origin

    @property
    def duration(self) -> float | None:
        """When the last window closes, in seconds from the start (``None``: never)."""
        if not self.windows:
            return 0.0
        ends = [w.end for w in self.windows]
        return None if any(e is None for e in ends) else max(cast(list[float], ends))

    def active(self, target: str | None = None) -> tuple[Window, ...]:
        """The windows open now that apply to ``target`` (all of them for ``None``)."""
        elapsed = self.elapsed()
        if elapsed is None:
            return ()
        return tuple(
            w
            for w in self.windows
            if w.covers(elapsed) and (target is None or w.target in (None, target))
        )

    def injector(self, target: str | None = None, *, enabled: bool = True) -> Injector:
        """An injector applying the windows for ``target`` (every window for ``None``)."""
        if target is not None and not isinstance(target, str):
            raise TypeError(f"Timeline.injector: target must be a str or None, got {shown(target)}")
        windows = tuple(w for w in self.windows if target is None or w.target in (None, target))
        name = self.name if target is None else f"{self.name}:{target}"
        return _TimelineInjector(self, windows, name, enabled)

    def __repr__(self) -> str:
        return f"Timeline({len(self.windows)} windows, name={self.name!r})"


class _TimelineInjector(Injector):
    __slots__ = ("_timeline", "_windows")

    def __init__(
        self, timeline: Timeline, windows: tuple[Window, ...], name: str, enabled: bool
    ) -> None:
        super().__init__(name, timeline._rng, enabled)
        self._timeline = timeline
        self._windows = windows

    def _pick(self) -> tuple[Injection, ...]:
        origin = self._timeline._origin
        if origin is None:
            return ()
        elapsed = clock.now() - origin
        rng = self._rng
        picked = tuple(
            w.injection
            for w in self._windows
            if w.covers(elapsed) and (w.rate >= 1.0 or rng.random() < w.rate)
        )
        if len(picked) > 1:
            # Waits first, whatever window opened first: a slow dependency that
            # then fails is slow *and* fails (the sort is stable: order kept).
            picked = tuple(sorted(picked, key=lambda i: not isinstance(i, Latency)))
        return picked

    def __repr__(self) -> str:
        state = "on" if self._on else "off"
        return f"<timeline injector {self.name!r}, {len(self._windows)} windows, {state}>"
