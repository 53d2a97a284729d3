"""``Injector``: what every chaos injector shares, and its three faces.

An injector has a switch, counters and events, and applies the injections its
subclass picks for each call.  It is used as a decorator, through
``call()`` / ``call_async()``, or as a pipeline stage (``ChaosStage``); the
three faces live here with it because each reads the injector's switch on
every call (one attribute read when switched off).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, Final, ParamSpec, TypeVar, cast

from .._core import clock
from .._core.events import Event, EventBus, emit, global_bus
from .._core.stats import count_value
from .._core.validate import shown
from .._execution import runtime as _runtime
from ..flow.pipeline import ARun, Run, StageAliases
from ._injections import _KINDS, Fault, Injection, Latency, Outcome
from ._switch import _ARMED, _GLOBAL

P = ParamSpec("P")
R = TypeVar("R")

# The attribute an injected fault carries: the name of the injector that raised it.
_MARK: Final = "_datapunk_recovery_chaos"


def injected_by(exc: BaseException) -> str | None:
    """The name of the injector that raised ``exc``, or ``None`` for a real failure.

    Lets a drill tell the faults it injected from the failures it found.
    """
    name = getattr(exc, _MARK, None)
    return name if isinstance(name, str) else None


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
        if global_bus.active or self.events.active:
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
        """This injector as a stage of a [`Pipeline`][datapunk_recovery.flow.pipeline.Pipeline].

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
    """An injector as a pipeline stage (it fits `datapunk_recovery.flow.pipeline.Stage`).

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


# ---------------------------------------------------------------------------
# The seeded RNG of an injector (`Chaos`, a `Timeline`'s injectors).


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
