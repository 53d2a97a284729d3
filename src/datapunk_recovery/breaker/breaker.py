"""The circuit breaker users hold: `CircuitBreaker`, its `Permit` and `BreakerSnapshot`.

It runs calls through its state machine (``machine.py``), in process or shared through a store
(``shared.py``); see the package documentation.
"""

from __future__ import annotations

import functools
import inspect
import math
import random
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar, cast

from .._core import clock
from .._core.backoff import server_delay
from .._core.context import lost_race
from .._core.errors import CircuitOpenError, classify
from .._core.events import EventBus, HintIgnored, emit, global_bus
from .._core.redact import safe_repr
from .._core.validate import shown
from .._core.windows import CountWindow
from .config import PASSING_STATES, BreakerConfig, BreakerState, hints
from .events import OutcomeRecorded, wants_outcomes
from .machine import FAILURE, IGNORED, LOST, SUCCESS, Machine, judge_error
from .shared import BreakerLink, bind

__all__ = ["BreakerSnapshot", "CircuitBreaker", "Permit"]

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

_DEFAULT_CONFIG: Final = BreakerConfig()


# ---------------------------------------------------------------------------
# Permits


class Permit:
    """Leave to make one call; settle it with exactly one outcome.

    [`success()`][datapunk_recovery.breaker.breaker.Permit.success],
    [`failure()`][datapunk_recovery.breaker.breaker.Permit.failure],
    [`result()`][datapunk_recovery.breaker.breaker.Permit.result] or
    [`cancel()`][datapunk_recovery.breaker.breaker.Permit.cancel] settle
    it; the first one counts and later ones do nothing.  With a shared store the
    plain methods never wait for the store (the write happens in the
    background); the ``*_async`` twins await it.  Durations are seconds; when
    not given and the configuration needs them, they are measured from
    [`CircuitBreaker.allow()`][datapunk_recovery.breaker.breaker.CircuitBreaker.allow].
    """

    __slots__ = ("_breaker", "_done", "_gen", "_probe", "_remote", "_start")

    def __init__(
        self, breaker: CircuitBreaker, gen: int, probe: bool, remote: bool, start: float | None
    ) -> None:
        self._breaker = breaker
        self._gen = gen
        self._probe = probe
        self._remote = remote
        self._start = start
        self._done = False

    @property
    def probe(self) -> bool:
        """Whether this call is a half-open probe."""
        return self._probe

    def success(self, duration: float | None = None) -> None:
        """The call succeeded."""
        if not self._done:
            self._done = True
            self._breaker._settle(self, SUCCESS, None, duration, None, None)

    def failure(self, exc: BaseException | None = None, duration: float | None = None) -> None:
        """The call failed with ``exc`` (judged by the record/ignore rules) or plainly.

        A cancellation passed here counts as nothing, like
        [`cancel()`][datapunk_recovery.breaker.breaker.Permit.cancel].
        """
        if self._done:
            return
        self._done = True
        self._breaker._settle_error(self, exc, duration)

    def result(self, value: object, duration: float | None = None) -> None:
        """The call returned ``value``: ``record_result`` / ``result_delay`` judge it."""
        if not self._done:
            self._done = True
            self._breaker._settle_result(self, value, duration)

    def cancel(self) -> None:
        """The call was cancelled: nothing counts, a half-open probe is freed.

        Unless it is a hedged attempt cancelled because another attempt won
        the race: that one counts as a slow call (see
        [docs/flow-control.md](https://datapunk.github.io/datapunk-recovery/flow-control/)).
        """
        if not self._done:
            self._done = True
            verdict = LOST if lost_race() else IGNORED
            self._breaker._settle(self, verdict, None, None, None, "cancelled")

    async def success_async(self, duration: float | None = None) -> None:
        """`success()`, waiting for a shared store's write."""
        self.success(duration)
        await self._breaker.flush_async()

    async def failure_async(
        self, exc: BaseException | None = None, duration: float | None = None
    ) -> None:
        """`failure()`, waiting for a shared store's write."""
        self.failure(exc, duration)
        await self._breaker.flush_async()

    async def result_async(self, value: object, duration: float | None = None) -> None:
        """`result()`, waiting for a shared store's write."""
        self.result(value, duration)
        await self._breaker.flush_async()

    async def cancel_async(self) -> None:
        """`cancel()`, waiting for a shared store's write."""
        self.cancel()
        await self._breaker.flush_async()


# ``with breaker:`` keeps its permits here: a linked stack per context, so
# threads and tasks using one breaker never see each other's permits.
_BLOCKS: ContextVar[tuple[CircuitBreaker, Permit, Any] | None] = ContextVar(
    "datapunk_recovery_breaker_blocks", default=None
)


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A breaker's state and counts at one moment.

    ``calls`` / ``failures`` / ``slow_calls`` are the window's (zero without a
    window); ``failure_rate`` / ``slow_call_rate`` are None below
    ``minimum_calls`` or without a window.  ``opened`` and ``rejected`` count
    since the breaker was made; ``retry_after`` is seconds until it may admit.
    """

    name: str
    state: BreakerState
    consecutive_failures: int
    calls: int
    failures: int
    slow_calls: int
    failure_rate: float | None
    slow_call_rate: float | None
    opened: int
    rejected: int
    retry_after: float
    shared: bool


# ---------------------------------------------------------------------------
# The breaker


class CircuitBreaker:
    """A named circuit breaker; see the module documentation and
    [docs/breaker.md](https://datapunk.github.io/datapunk-recovery/breaker/).

    ``store`` is where its state lives: ``None`` (private, in this process), a
    [`MemoryStore`][datapunk_recovery.stores.memory.MemoryStore] (shared by name in
    this process) or a [`RedisStore`][datapunk_recovery.stores.redis.RedisStore]
    (shared between processes; async only: the sync faces raise ``TypeError``).
    ``rng`` makes the open-duration jitter reproducible.
    """

    __slots__ = ("__weakref__", "_core", "_link", "name")

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        store: object | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"CircuitBreaker.name: expected a non-empty str, got {shown(name)}")
        if config is not None and not isinstance(config, BreakerConfig):
            raise TypeError(f"CircuitBreaker.config: expected a BreakerConfig, got {shown(config)}")
        self.name = name
        self._link: BreakerLink | None = None
        cfg = config or _DEFAULT_CONFIG
        if store is None:
            self._core = Machine(name, cfg, rng)
            return
        is_async = getattr(store, "is_async", None)
        if is_async is False:
            core = store.local(("breaker", name), lambda: Machine(name, cfg, rng))  # type: ignore[attr-defined]
            if not isinstance(core, Machine):
                raise TypeError(f"CircuitBreaker.store: {store!r} holds a non-breaker {name!r}")
            if config is not None and core.config != config:
                core.configure(config)
            self._core = core
        elif is_async is True:
            self._core = Machine(name, cfg, rng)
            self._core.local_only = False
            self._core.refresh_fast()
            self._link = bind(store, self._core)  # type: ignore[arg-type]
        else:
            raise TypeError(f"CircuitBreaker.store: expected a state store, got {shown(store)}")

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state.value})"

    # -- inspection ------------------------------------------------------------------
    @property
    def config(self) -> BreakerConfig:
        """The current configuration."""
        return self._core.config

    @property
    def events(self) -> EventBus:
        """This breaker's own event bus (events also reach the global one)."""
        return self._core.bus

    @property
    def shared(self) -> bool:
        """Whether the state lives in a store shared between processes."""
        return self._link is not None

    @property
    def state(self) -> BreakerState:
        """The state now (time-driven transitions applied; cached for a shared store)."""
        if self._link is not None:
            return self._link.state()
        return self._core.current_state()

    def state_unless_busy(self) -> BreakerState | None:
        """The state now, or ``None`` while another thread holds the breaker's lock.

        Never waits for that lock, changes nothing and emits nothing: for a
        caller that holds a lock of its own which the breaker's event
        subscribers may take (a registry), waiting or emitting could
        deadlock.  A transition time has made due is reported without being
        applied (an open breaker whose time is up reads ``HALF_OPEN``).
        """
        if self._link is not None:
            return self._link.state_unless_busy()
        return self._core.state_unless_busy()

    def retry_after(self) -> float:
        """Seconds until the breaker may admit a call: 0 when it admits now, inf when isolated."""
        if self._link is not None:
            return self._link.retry_after()
        return self._core.retry_after()

    def failure_rate(self) -> float | None:
        """Failures / calls in the window, or None without a window or below ``minimum_calls``."""
        totals = self._totals()
        if totals is None or totals[0] < self.config.minimum_calls or totals[0] == 0:
            return None
        return totals[1] / totals[0]

    def _totals(self) -> tuple[int, int, int] | None:
        if self._link is not None:
            return self._link.totals()
        return self._core.totals()

    def snapshot(self) -> BreakerSnapshot:
        """The state and counts now."""
        core = self._core
        # The state first: reading it applies a transition time made (a
        # half-open time limit passed), which may clear the counts.
        state = self.state
        totals = self._totals()
        calls, failures, slow = totals or (0, 0, 0)
        judged = totals is not None and calls >= core.config.minimum_calls and calls > 0
        consecutive = self._link.consecutive() if self._link is not None else core.consecutive
        return BreakerSnapshot(
            name=self.name,
            state=state,
            consecutive_failures=consecutive,
            calls=calls,
            failures=failures,
            slow_calls=slow,
            failure_rate=failures / calls if judged else None,
            slow_call_rate=slow / calls if judged else None,
            opened=core.opened,
            rejected=core.rejected,
            retry_after=self.retry_after(),
            shared=self._link is not None,
        )

    # -- control ---------------------------------------------------------------------
    def reconfigure(self, config: BreakerConfig) -> None:
        """Take ``config`` from now on, keeping the state (and the window if its shape holds)."""
        if not isinstance(config, BreakerConfig):
            raise TypeError(
                f"CircuitBreaker.reconfigure: expected a BreakerConfig, got {shown(config)}"
            )
        if self._link is not None and config.trip_policy is not None:
            raise TypeError(
                f"CircuitBreaker.reconfigure: {self.name!r} shares its state through a store; "
                "a custom trip_policy lives in one process and cannot be shared"
            )
        self._core.configure(config)

    def _local_control(self, what: str) -> Machine:
        if self._link is not None:
            raise TypeError(
                f"CircuitBreaker.{what}: {self.name!r} keeps its state in an async store; "
                f"use `await breaker.{what}_async()`"
            )
        return self._core

    def isolate(self) -> None:
        """Force the breaker open (``FORCED_OPEN``) until `reset()`."""
        self._local_control("isolate").force(BreakerState.FORCED_OPEN, "isolate")

    def reset(self) -> None:
        """Back to ``CLOSED`` with every count cleared."""
        self._local_control("reset").force(BreakerState.CLOSED, "reset")

    def disable(self) -> None:
        """``DISABLED``: every call passes, nothing is recorded, until `reset()`."""
        self._local_control("disable").force(BreakerState.DISABLED, "disable")

    def metrics_only(self) -> None:
        """``METRICS_ONLY`` (shadow mode): record and report, never refuse, until `reset()`."""
        self._local_control("metrics_only").force(BreakerState.METRICS_ONLY, "metrics_only")

    async def _force_async(self, state: BreakerState, reason: str) -> None:
        if self._link is None:
            self._core.force(state, reason)
        else:
            await self._link.force(state, reason)

    async def isolate_async(self) -> None:
        """`isolate()`, for any store (shared ones included)."""
        await self._force_async(BreakerState.FORCED_OPEN, "isolate")

    async def reset_async(self) -> None:
        """[`reset()`][datapunk_recovery.breaker.breaker.CircuitBreaker.reset], for any store."""
        await self._force_async(BreakerState.CLOSED, "reset")

    async def disable_async(self) -> None:
        """[`disable()`][datapunk_recovery.breaker.breaker.CircuitBreaker.disable], any store."""
        await self._force_async(BreakerState.DISABLED, "disable")

    async def metrics_only_async(self) -> None:
        """`metrics_only()`, for any store."""
        await self._force_async(BreakerState.METRICS_ONLY, "metrics_only")

    # -- permits -----------------------------------------------------------------------
    def allow(self) -> Permit:
        """A permit for one call, or `CircuitOpenError` when the breaker refuses.

        In-process stores only; a breaker on an async store raises ``TypeError``
        (use [`allow_async()`][datapunk_recovery.breaker.breaker.CircuitBreaker.allow_async]).
        """
        if self._link is not None:
            raise TypeError(
                f"CircuitBreaker {self.name!r} keeps its state in an async store "
                "(Redis): use allow_async() / call_async() / async with"
            )
        core = self._core
        granted = core.admission()
        if isinstance(granted, float):
            raise CircuitOpenError(self.name, granted)
        return Permit(self, *granted, False, clock.now() if core.config.timed else None)

    async def allow_async(self) -> Permit:
        """`allow()` for async code; works with every store."""
        if self._link is None:
            core = self._core
            granted = core.admission()
            if isinstance(granted, float):
                raise CircuitOpenError(self.name, granted)
            return Permit(self, *granted, False, clock.now() if core.config.timed else None)
        gen, probe, remote = await self._link.allow()
        return Permit(self, gen, probe, remote, clock.now() if self.config.timed else None)

    async def flush_async(self) -> None:
        """Wait until the outcomes recorded so far have reached the shared store.

        A breaker shared through a store sends its outcomes in batches (see
        the write path in the breaker guide); this waits for those in flight,
        bounded by about twice the store's ``timeout`` seconds.  Without a
        store it returns at once.
        """
        if self._link is not None:
            await self._link.flush()

    # -- the hot-path seam for faces built on a breaker (a router, a cache) -----------------
    def admitting(self) -> bool:
        """Whether the breaker admits calls now: closed, half-open, disabled or metrics-only.

        What ``breaker.state in {...}`` answers, without a lock or a clock
        read for a state in this process that passes every call: a router
        asks it of each endpoint per call.  A half-open breaker counts as
        admitting even when its probes are out
        ([`allow()`][datapunk_recovery.breaker.breaker.CircuitBreaker.allow] then refuses).
        """
        if self._link is None and self._core.state in PASSING_STATES:
            return True
        state = self.state
        return state is not BreakerState.OPEN and state is not BreakerState.FORCED_OPEN

    def grant(self) -> int | None:
        """The generation of a call that may run now without a permit, else None (take one).

        A breaker in this process, closed, judging no result value, whose
        per-call event ([`OutcomeRecorded`][datapunk_recovery.breaker.OutcomeRecorded])
        nobody wants, admits every call and needs only its outcome: the
        caller runs the call and settles it with exactly one of
        [`granted_success()`][datapunk_recovery.breaker.breaker.CircuitBreaker.granted_success]
        or [`granted_failure()`][datapunk_recovery.breaker.breaker.CircuitBreaker.granted_failure],
        passing the generation back (an outcome of an earlier generation is
        late and counts nowhere), as the breaker's own faces do.
        """
        core = self._core
        gen = core.gen  # before ``quick``: a transition in between makes the outcome late
        if core.quick and (
            not (global_bus.active or core.bus.active) or not wants_outcomes(core.bus)
        ):
            return gen
        return None

    def granted_success(self, gen: int, start: float) -> None:
        """Settle a call of generation ``gen`` from `grant()` that succeeded.

        ``start`` is when it started (``clock.now()``, seconds): its duration
        counts when the configuration times calls.
        """
        core = self._core
        if core.fast:  # nothing to feed but the consecutive count
            if core.consecutive:
                core.reset_consecutive(gen)
        elif core.lean:
            core.succeed(gen)
        else:
            self._quick_success(gen, start if core.config.timed else None)

    def granted_failure(self, gen: int, exc: BaseException, start: float) -> None:
        """Settle a call of generation ``gen`` from `grant()` that raised ``exc``.

        What a permit's `failure()` does: an exception is judged (and may carry
        a server delay); a cancellation counts as nothing, except a hedge that
        lost its race, which is a slow call.  ``start`` as for `granted_success()`.
        """
        core = self._core
        timed = core.config.timed
        if isinstance(exc, Exception):
            self._quick_failure(gen, start if timed else None, exc)
        elif lost_race():
            core.record_lost(gen, False, clock.now() - start if timed else None)

    def ranking_rate(self) -> float:
        """A number to rank breakers by, lowest first (a router's choice of endpoint).

        ``inf`` when the breaker refuses calls (not `admitting()`); else
        [`failure_rate()`][datapunk_recovery.breaker.breaker.CircuitBreaker.failure_rate],
        0.0 where that is None.  An in-process count window is read without
        the lock, so the rate may be a call behind.
        """
        core = self._core
        if self._link is None and core.state in PASSING_STATES:
            window = core.window
            if type(window) is CountWindow:
                failures = window.failures
                if not failures:
                    return 0.0
                calls = window.calls
                return failures / calls if calls >= core.config.minimum_calls else 0.0
        elif not self.admitting():
            return math.inf
        rate = self.failure_rate()
        return 0.0 if rate is None else rate

    def _settle_error(
        self, permit: Permit, exc: BaseException | None, duration: float | None
    ) -> None:
        if exc is None:
            self._settle(permit, FAILURE, None, duration, None, None)
            return
        if not isinstance(exc, Exception):  # cancellation and exit count as nothing
            verdict = LOST if lost_race() else IGNORED  # ... but a lost hedge is slow
            self._settle(permit, verdict, None, None, exc, "cancelled")
            return
        config = self.config
        verdict = judge_error(config, exc)
        # An ignored error never counts, whatever delay it carries (as on the fast path).
        hint = (
            classify(exc).delay_hint if config.honor_server_delay and verdict != IGNORED else None
        )
        self._settle(permit, verdict, hint, duration, exc, None)

    def _settle_result(self, permit: Permit, value: object, duration: float | None) -> None:
        config = self.config
        hint = config.result_delay(value) if config.result_delay is not None else None
        failed = config.record_result is not None and bool(config.record_result(value))
        self._settle(permit, FAILURE if failed else SUCCESS, hint, duration, None, None)

    def _settle(
        self,
        permit: Permit,
        verdict: int,
        raw_hint: object,
        duration: float | None,
        exc: BaseException | None,
        ignored_as: str | None,
    ) -> None:
        core = self._core
        config = core.config
        if duration is None and permit._start is not None:
            duration = clock.now() - permit._start
        hint = self._validate_hint(raw_hint) if raw_hint is not None else None
        if hint is not None:
            verdict = FAILURE  # a "come back later" from the server is no success
        slow = verdict == LOST or config.is_slow(duration)
        if core.listening(OutcomeRecorded) and core.state is not BreakerState.DISABLED:
            outcome = (
                "lost"
                if verdict == LOST
                else ignored_as or ("failure", "success", "ignored")[verdict]
            )
            emit(
                OutcomeRecorded(
                    operation=self.name,
                    at=clock.now(),
                    outcome=outcome,
                    slow=slow,
                    duration=duration,
                    error_type=type(exc).__name__ if exc is not None else None,
                ),
                core.bus,
            )
        link = self._link
        if verdict == LOST:
            if not permit._remote or link is None:
                core.record_lost(permit._gen, permit._probe, duration)
                return
            if config.slow_call_rate_threshold is not None:
                # A shared breaker's store knows successes and failures: a
                # lost hedge reaches it as the slow call it is, for its rule.
                link.record(permit._gen, permit._probe, False, True, duration, None)
                return
            verdict = IGNORED
        if verdict == IGNORED:
            if permit._remote and link is not None:
                link.release(permit._gen, permit._probe)
            else:
                core.release(permit._gen, permit._probe)
            return
        failed = verdict == FAILURE
        if permit._remote and link is not None:
            link.record(permit._gen, permit._probe, failed, slow, duration, hint)
        else:
            late = permit._gen != core.gen  # granted before a transition: counts nowhere
            core.record(permit._gen, permit._probe, failed, slow, duration, hint)
            if link is not None and not permit._probe and not late:
                link.missed(failed, slow)  # judged here while the store was away

    def _validate_hint(self, raw: object) -> float | None:
        decision = server_delay(0.0, raw, hints(self.config), None)
        if decision.ignored or decision.give_up:
            core = self._core
            if core.listening(HintIgnored):
                text = safe_repr(raw)
                emit(
                    HintIgnored(
                        operation=self.name,
                        at=clock.now(),
                        value=text,
                        reason=(
                            "server delay is not a finite number >= 0"
                            if decision.ignored
                            else f"server delay above max_server_delay="
                            f"{self.config.max_server_delay:g} s"
                        ),
                    ),
                    core.bus,
                )
            return None
        return decision.delay if decision.delay > 0.0 else None

    def _error_hint(self, exc: Exception) -> float | None:
        """The valid server delay (seconds) ``exc`` carries, if the configuration honours it."""
        if not self.config.honor_server_delay:
            return None
        raw = classify(exc).delay_hint
        return None if raw is None else self._validate_hint(raw)

    def _fast_failure(self, exc: Exception, gen: int) -> None:
        # The fast path's failure of a call that started in generation ``gen``
        # (no duration: the fast path's configuration measures none).
        core = self._core
        verdict = judge_error(core.config, exc)
        if verdict == IGNORED:
            return
        hint = self._error_hint(exc)
        if hint is not None or verdict == FAILURE:
            core.record(gen, False, True, False, None, hint)
        elif core.consecutive:
            core.reset_consecutive(gen)

    def _quick_success(self, gen: int, start: float | None) -> None:
        core = self._core
        duration = None if start is None else clock.now() - start
        core.record(gen, False, False, core.config.is_slow(duration), duration, None)

    def _quick_failure(self, gen: int, start: float | None, exc: Exception) -> None:
        core = self._core
        duration = None if start is None else clock.now() - start
        verdict = judge_error(core.config, exc)
        if verdict == IGNORED:
            return  # not a probe: nothing to give back
        hint = self._error_hint(exc)
        failed = verdict == FAILURE or hint is not None
        core.record(gen, False, failed, core.config.is_slow(duration), duration, hint)

    # -- faces -----------------------------------------------------------------------------
    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` through the breaker (sync, in-process stores)."""
        core = self._core
        # The generation is read before ``fast``: a transition in between makes
        # the outcome late (counted nowhere), never counted in a later period.
        gen = core.gen
        if core.fast and (
            not (global_bus.active or core.bus.active) or not wants_outcomes(core.bus)
        ):
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                self._fast_failure(exc, gen)
                raise
            if core.consecutive:
                core.reset_consecutive(gen)
            return result
        return self._call_slow(fn, args, kwargs)

    def _call_slow(self, fn: Callable[..., R], args: Any, kwargs: Any) -> R:
        core = self._core
        gen = core.gen  # before ``quick``: see call()
        if core.quick and not wants_outcomes(core.bus):
            start = clock.now() if core.config.timed else None
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                self._quick_failure(gen, start, exc)
                raise
            except BaseException:
                if lost_race():  # a hedge that lost its race: a slow call
                    core.record_lost(gen, False, None if start is None else clock.now() - start)
                raise
            if start is None:
                if not core.settled:  # settled: the success would change nothing
                    core.succeed(gen)
            else:
                self._quick_success(gen, start)
            return result
        if self._link is not None:
            permit = self.allow()  # raises TypeError: an async store
        else:
            # `allow()`, inlined: a refusal is raised from here, two frames fewer to leave.
            granted = core.admission()
            if isinstance(granted, float):
                raise CircuitOpenError(self.name, granted)
            permit = Permit(self, *granted, False, clock.now() if core.config.timed else None)
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            permit.failure(exc)
            raise
        except BaseException:
            permit.cancel()
            raise
        permit.result(result)
        return result

    async def call_async(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)`` through the breaker (every store)."""
        core = self._core
        gen = core.gen  # before ``fast``: see call()
        if core.fast and (
            not (global_bus.active or core.bus.active) or not wants_outcomes(core.bus)
        ):
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                self._fast_failure(exc, gen)
                raise
            if core.consecutive:
                core.reset_consecutive(gen)
            return result
        return await self._call_slow_async(fn, args, kwargs)

    async def _call_slow_async(self, fn: Callable[..., Awaitable[R]], args: Any, kwargs: Any) -> R:
        core = self._core
        gen = core.gen  # before ``quick``: see call()
        if core.quick and not wants_outcomes(core.bus):
            start = clock.now() if core.config.timed else None
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                self._quick_failure(gen, start, exc)
                raise
            except BaseException:
                if lost_race():  # a hedge that lost its race: a slow call
                    core.record_lost(gen, False, None if start is None else clock.now() - start)
                raise
            if start is None:
                if not core.settled:  # settled: the success would change nothing
                    core.succeed(gen)
            else:
                self._quick_success(gen, start)
            return result
        link = self._link
        shared = link.admitted() if link is not None and not wants_outcomes(core.bus) else None
        if shared is not None:
            # Closed as last read from the store: no permit unless there is a verdict to judge.
            assert link is not None
            start = clock.now() if core.config.timed else None
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                Permit(self, shared, False, True, start).failure(exc)
                raise
            except BaseException:
                Permit(self, shared, False, True, start).cancel()
                raise
            if start is None and core.quick_result:
                link.record(shared, False, False, False, None, None)
            else:
                Permit(self, shared, False, True, start).result(result)
            return result
        if link is None:  # `allow_async()`, inlined as in `_call_slow()`
            granted = core.admission()
            if isinstance(granted, float):
                raise CircuitOpenError(self.name, granted)
            permit = Permit(self, *granted, False, clock.now() if core.config.timed else None)
        else:
            permit = await self.allow_async()
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            permit.failure(exc)
            raise
        except BaseException:
            permit.cancel()
            raise
        permit.result(result)
        return result

    def __call__(self, fn: F) -> F:
        """Decorate a sync or async function; its signature is kept.

        The wrapper is typed as what it wraps, so that stacked over
        ``@retry`` the result still shows ``.statistics()`` to a type checker
        (``functools.wraps`` copies those handles onto the wrapper).
        """
        core = self._core
        gbus = global_bus
        fast_failure = self._fast_failure
        quick_failure = self._quick_failure
        if inspect.iscoroutinefunction(fn):
            afn = cast(Callable[..., Coroutine[Any, Any, Any]], fn)
            call_slow_async = self._call_slow_async

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                gen = core.gen  # before ``fast``: see call()
                if not (gbus.active or core.bus.active) or not wants_outcomes(core.bus):
                    if core.fast:
                        try:
                            result = await afn(*args, **kwargs)
                        except Exception as exc:
                            fast_failure(exc, gen)
                            raise
                        if core.consecutive:
                            core.reset_consecutive(gen)
                        return result
                    if core.lean:  # a window or rule to feed, nothing timed: no permit
                        try:
                            result = await afn(*args, **kwargs)
                        except Exception as exc:
                            quick_failure(gen, None, exc)
                            raise
                        except BaseException:
                            if lost_race():  # a hedge that lost its race: a slow call
                                core.record_lost(gen, False, None)
                            raise
                        if not core.settled:  # settled: the success would change nothing
                            core.succeed(gen)
                        return result
                return await call_slow_async(afn, args, kwargs)

            return cast(F, async_wrapper)
        if self._link is not None:
            raise TypeError(
                f"CircuitBreaker {self.name!r} keeps its state in an async store (Redis): "
                f"it cannot guard the sync function {getattr(fn, '__qualname__', fn)!r}"
            )
        call_slow = self._call_slow

        @functools.wraps(fn)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            gen = core.gen  # before ``fast``: see call()
            if not (gbus.active or core.bus.active) or not wants_outcomes(core.bus):
                if core.fast:
                    try:
                        result = fn(*args, **kwargs)
                    except Exception as exc:
                        fast_failure(exc, gen)
                        raise
                    if core.consecutive:
                        core.reset_consecutive(gen)
                    return result
                if core.lean:  # a window or rule to feed, nothing timed: no permit
                    try:
                        result = fn(*args, **kwargs)
                    except Exception as exc:
                        quick_failure(gen, None, exc)
                        raise
                    except BaseException:
                        if lost_race():  # a hedge that lost its race: a slow call
                            core.record_lost(gen, False, None)
                        raise
                    if not core.settled:  # settled: the success would change nothing
                        core.succeed(gen)
                    return result
            return call_slow(fn, args, kwargs)

        return cast(F, sync_wrapper)

    # -- blocks ----------------------------------------------------------------------------
    def __enter__(self) -> Permit:
        permit = self.allow()
        _BLOCKS.set((self, permit, _BLOCKS.get()))
        return permit

    def __exit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit_block(exc)

    async def __aenter__(self) -> Permit:
        permit = await self.allow_async()
        _BLOCKS.set((self, permit, _BLOCKS.get()))
        return permit

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit_block(exc)

    def _exit_block(self, exc: BaseException | None) -> None:
        top = _BLOCKS.get()
        assert top is not None, "breaker block exited without being entered"
        assert top[0] is self, "breaker blocks exited out of order"
        _BLOCKS.set(top[2])
        permit: Permit = top[1]
        if exc is None:
            permit.success()
        else:
            permit.failure(exc)
