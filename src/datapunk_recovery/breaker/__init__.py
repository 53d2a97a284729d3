"""The circuit breaker: stop calling a dependency that keeps failing, probe, recover.

States: ``CLOSED`` (calls pass, outcomes are judged), ``OPEN`` (calls are
refused with [`CircuitOpenError`][datapunk_recovery._core.errors.CircuitOpenError] until the open
duration ends), ``HALF_OPEN`` (a few probes pass; their outcomes close or
re-open it), plus three manual ones: ``DISABLED`` (everything passes, nothing is
recorded), ``FORCED_OPEN`` (everything is refused:
[`CircuitBreaker.isolate()`][datapunk_recovery.breaker.CircuitBreaker.isolate])
and ``METRICS_ONLY`` (shadow mode: outcomes are recorded and a would-be trip is
reported as a [`ShadowTrip`][datapunk_recovery.breaker.ShadowTrip] event, but nothing is ever
refused).

Trip criteria, any of which opens the breaker: consecutive failures (the
default, 5), failure rate and slow-call rate over a sliding window (count-based
or time-based, judged once ``minimum_calls`` are in it), a custom
[`TripPolicy`][datapunk_recovery.breaker.TripPolicy], and a server-given delay (``Retry-After``)
when enabled.

Every transition bumps a generation number; a permit carries the generation it
was granted in, so a late outcome (a call that started before the breaker
opened) never counts in a later period and never extends an open period.

The closed-state hot path of the default configuration takes no lock, builds no
object and reads no clock: it reads the generation and the ``fast`` flag,
runs the call, and on success touches the failure counter only when it is
not already zero (an outcome is recorded against the generation read before
the call, so a late one never counts in a later period).  Every
other path runs under the breaker's lock.  See
[docs/breaker.md](https://datapunk.github.io/datapunk-recovery/breaker/).
"""

from __future__ import annotations

import functools
import inspect
import math
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, ParamSpec, Protocol, TypeVar, cast

from .._core import clock
from .._core.backoff import RetryConfig, server_delay
from .._core.context import lost_race
from .._core.errors import CircuitOpenError, classify
from .._core.events import Event, EventBus, HintIgnored, emit, global_bus, listening
from .._core.redact import safe_repr
from .._core.validate import check_count, check_fraction, check_number, check_seconds, shown
from .._core.windows import CountWindow, TimeWindow, Window

if TYPE_CHECKING:
    from ..stores import BreakerLink

__all__ = [
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerState",
    "BreakerStateChanged",
    "CallRejected",
    "CircuitBreaker",
    "CorruptStateIgnored",
    "OutcomeRecorded",
    "OutcomesFolded",
    "WriteShed",
    "Permit",
    "ShadowTrip",
    "StoreFallback",
    "StoreResumed",
    "TripPolicy",
    "WindowKind",
]

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

_OWNER: Final = "BreakerConfig"
#: Bounds of a window's shape: a count window keeps a byte a call (here and in
#: Redis), a time window loops over its buckets; past these, a typo would cost
#: memory or time at a distance from the configuration that caused it.
_MAX_WINDOW_SIZE: Final = 1_000_000
_MAX_WINDOW_BUCKETS: Final = 10_000


class BreakerState(StrEnum):
    """Where a breaker stands; see the module documentation."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    DISABLED = "disabled"
    FORCED_OPEN = "forced_open"
    METRICS_ONLY = "metrics_only"


#: The states that admit every call without asking (read by the router's
#: endpoint selection on its hot path).
PASSING_STATES: Final = frozenset(
    {BreakerState.CLOSED, BreakerState.DISABLED, BreakerState.METRICS_ONLY}
)


class WindowKind(StrEnum):
    """``count``: the last ``window_size`` calls; ``time``: the last ``window_duration`` s."""

    COUNT = "count"
    TIME = "time"


class TripPolicy(Protocol):
    """A custom trip criterion: sees every outcome recorded while closed.

    ``record`` returns True to open the breaker now; ``reset`` forgets
    everything (called whenever the breaker closes or is reset).  ``duration``
    is in seconds.  Called under the breaker's lock: keep it quick.
    """

    def record(self, failed: bool, slow: bool, duration: float | None, now: float) -> bool: ...

    def reset(self) -> None: ...


ExceptionMatch = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
)
"""Exception types, or a predicate over an exception."""


def _check_match(name: str, value: object) -> None:
    if isinstance(value, type) and issubclass(value, BaseException):
        return
    if isinstance(value, tuple):
        if all(isinstance(t, type) and issubclass(t, BaseException) for t in value):
            return
    elif callable(value):
        return
    raise TypeError(
        f"{_OWNER}.{name}: expected exception types or a predicate, got {shown(value)} "
        f"({type(value).__name__})"
    )


def _matches(spec: ExceptionMatch, exc: BaseException) -> bool:
    if isinstance(spec, type | tuple):
        return isinstance(exc, spec)
    return bool(spec(exc))


def _check_callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{_OWNER}.{name}: expected a callable or None, got {shown(value)}")


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """How a breaker trips, how long it stays open and what counts; validated when built.

    Durations are seconds.  Defaults: trip after 5 consecutive failures, stay
    open 1 s, then let one probe through (it has 10 s to finish).  The open
    period was chosen in the lab
    ([docs/simulate.md](https://datapunk.github.io/datapunk-recovery/simulate/)): it gives a
    recovered
    dependency back within about a second while keeping the load on a dead one
    far below the offered load.  Rate criteria are off until a threshold is
    set; they are judged over the window once it holds ``minimum_calls`` calls.

    - ``consecutive_failures``: failures in a row that trip it (``None``: off).
    - ``failure_rate_threshold`` / ``slow_call_rate_threshold``: fractions in
      (0, 1]; a rate at or above the threshold trips it.  A call is slow when it
      took longer than ``slow_call_duration`` (required for the slow rate),
      whether it succeeded or failed.
    - ``window``: ``"count"`` (last ``window_size`` calls) or ``"time"`` (last
      ``window_duration`` seconds in ``window_buckets`` buckets).
      ``keep_window`` keeps the window even when no rate criterion needs it, so
      that [`CircuitBreaker.failure_rate()`][datapunk_recovery.breaker.CircuitBreaker.failure_rate]
      answers (about 100 ns a call).
    - ``trip_policy``: a factory of a custom [`TripPolicy`][datapunk_recovery.breaker.TripPolicy] (a
      factory,
      because a policy has state and a configuration is shared).
    - ``half_open_permits`` probes pass in half-open.  How they are judged is
      ``half_open_decision``: ``"first_failure"`` (the default, Polly's rule):
      any failed (or slow, when the slow rate is judged) probe re-opens it,
      ``half_open_permits`` successful ones close it; ``"rate"``
      (resilience4j's rule, needs ``failure_rate_threshold``): once every
      permitted probe has finished, their failure rate (and slow-call rate,
      when judged) at or above the threshold re-opens it, else it closes.
      After ``half_open_timeout`` seconds the breaker decides without the
      probes still running: with ``"first_failure"``, closed if some
      succeeded, else open; with ``"rate"``, open.  The open period then runs
      from the moment the limit passed.  ``None`` waits for the probes for
      ever (resilience4j's default); a hung probe then holds the breaker
      half-open until it ends or is cancelled.
    - Open duration: ``open_duration * open_backoff ** n`` for the ``n``-th
      re-opening without a close in between, capped at ``max_open_duration``,
      then scaled by ``uniform(1 - open_jitter, 1 + open_jitter)``.
    - What counts: an exception matching ``ignore_on`` counts as nothing (or as
      a success with ``ignored_counts_as="success"``); one matching
      ``failure_on`` (default: every ``Exception``) is a failure; any other is
      a success.  ``record_result(result)`` returning True makes a returned
      value a failure.  Cancellation never counts.
    - Server delays: ``result_delay(result)`` may return a server-given delay
      (a 429/503 with ``Retry-After``); with ``honor_server_delay`` the delay
      an exception carries ([`classify()`][datapunk_recovery._core.errors.classify]'s
      ``delay_hint``) counts too.  Such an outcome is a failure and forces the
      breaker open for that long, unless the hint is garbage or above
      ``max_server_delay`` (then it is ignored with a ``HintIgnored`` event).
    """

    consecutive_failures: int | None = 5
    failure_rate_threshold: float | None = None
    slow_call_rate_threshold: float | None = None
    slow_call_duration: float | None = None
    window: WindowKind = WindowKind.COUNT
    window_size: int = 100
    window_duration: float = 60.0
    window_buckets: int = 10
    minimum_calls: int = 20
    keep_window: bool = False
    trip_policy: Callable[[], TripPolicy] | None = None
    half_open_permits: int = 1
    half_open_timeout: float | None = 10.0
    half_open_decision: Literal["first_failure", "rate"] = "first_failure"
    open_duration: float = 1.0
    open_backoff: float = 1.0
    max_open_duration: float = 300.0
    open_jitter: float = 0.0
    failure_on: ExceptionMatch = Exception
    ignore_on: ExceptionMatch | None = None
    ignored_counts_as: Literal["nothing", "success"] = "nothing"
    record_result: Callable[[Any], bool] | None = None
    result_delay: Callable[[Any], float | None] | None = None
    honor_server_delay: bool = False
    max_server_delay: float = 300.0
    #: Whether a sliding window is kept (a rate criterion or ``keep_window``).
    windowed: bool = field(init=False, repr=False, compare=False)
    #: Whether call durations are measured (slow calls or a custom policy).
    timed: bool = field(init=False, repr=False, compare=False)
    #: Whether the lock-free closed-state fast path applies.
    simple: bool = field(init=False, repr=False, compare=False)
    _hints: RetryConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = object.__setattr__
        if self.consecutive_failures is not None:
            check_count(_OWNER, "consecutive_failures", self.consecutive_failures)
        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            value = getattr(self, name)
            if value is not None:
                s(self, name, check_fraction(_OWNER, name, value, allow_zero=False))
        if self.slow_call_duration is not None:
            s(
                self,
                "slow_call_duration",
                check_seconds(_OWNER, "slow_call_duration", self.slow_call_duration),
            )
        elif self.slow_call_rate_threshold is not None:
            raise ValueError(
                f"{_OWNER}.slow_call_duration: required when slow_call_rate_threshold is set, "
                "got None"
            )
        try:
            s(self, "window", WindowKind(self.window))
        except ValueError:
            raise ValueError(
                f"{_OWNER}.window: expected 'count' or 'time', got {shown(self.window)}"
            ) from None
        check_count(_OWNER, "window_size", self.window_size)
        if self.window_size > _MAX_WINDOW_SIZE:
            raise ValueError(
                f"{_OWNER}.window_size: must be <= {_MAX_WINDOW_SIZE} calls, "
                f"got {shown(self.window_size)}"
            )
        s(
            self,
            "window_duration",
            check_seconds(_OWNER, "window_duration", self.window_duration, positive=True),
        )
        check_count(_OWNER, "window_buckets", self.window_buckets)
        if self.window_buckets > _MAX_WINDOW_BUCKETS:
            raise ValueError(
                f"{_OWNER}.window_buckets: must be <= {_MAX_WINDOW_BUCKETS}, "
                f"got {shown(self.window_buckets)}"
            )
        check_count(_OWNER, "minimum_calls", self.minimum_calls)
        if not isinstance(self.keep_window, bool):
            raise TypeError(f"{_OWNER}.keep_window: expected a bool, got {shown(self.keep_window)}")
        _check_callable("trip_policy", self.trip_policy)
        check_count(_OWNER, "half_open_permits", self.half_open_permits)
        if self.half_open_timeout is not None:
            s(
                self,
                "half_open_timeout",
                check_seconds(_OWNER, "half_open_timeout", self.half_open_timeout, positive=True),
            )
        if self.half_open_decision not in ("first_failure", "rate"):
            raise ValueError(
                f"{_OWNER}.half_open_decision: expected 'first_failure' or 'rate', "
                f"got {shown(self.half_open_decision)}"
            )
        if self.half_open_decision == "rate" and self.failure_rate_threshold is None:
            raise ValueError(
                f"{_OWNER}.failure_rate_threshold: required when half_open_decision is 'rate' "
                "(the probes' failure rate is judged against it), got None"
            )
        s(self, "open_duration", check_seconds(_OWNER, "open_duration", self.open_duration))
        s(
            self,
            "open_backoff",
            check_number(_OWNER, "open_backoff", self.open_backoff, minimum=1.0),
        )
        s(
            self,
            "max_open_duration",
            check_seconds(_OWNER, "max_open_duration", self.max_open_duration),
        )
        if self.max_open_duration < self.open_duration:
            raise ValueError(
                f"{_OWNER}.max_open_duration: must be >= open_duration "
                f"({self.open_duration!r}), got {shown(self.max_open_duration)}"
            )
        s(self, "open_jitter", check_fraction(_OWNER, "open_jitter", self.open_jitter))
        _check_match("failure_on", self.failure_on)
        if self.ignore_on is not None:
            _check_match("ignore_on", self.ignore_on)
        if self.ignored_counts_as not in ("nothing", "success"):
            raise ValueError(
                f"{_OWNER}.ignored_counts_as: expected 'nothing' or 'success', "
                f"got {shown(self.ignored_counts_as)}"
            )
        _check_callable("record_result", self.record_result)
        _check_callable("result_delay", self.result_delay)
        if not isinstance(self.honor_server_delay, bool):
            raise TypeError(
                f"{_OWNER}.honor_server_delay: expected a bool,"
                f" got {shown(self.honor_server_delay)}"
            )
        s(
            self,
            "max_server_delay",
            check_seconds(_OWNER, "max_server_delay", self.max_server_delay),
        )
        s(self, "_hints", RetryConfig(max_server_delay=self.max_server_delay))
        windowed = (
            self.failure_rate_threshold is not None
            or self.slow_call_rate_threshold is not None
            or self.keep_window
        )
        if windowed and self.window is WindowKind.COUNT and self.minimum_calls > self.window_size:
            # A count window never holds more than window_size calls: no rate
            # would ever be judged (nor failure_rate() answer).
            raise ValueError(
                f"{_OWNER}.minimum_calls: must be <= window_size ({self.window_size!r}) "
                f"with a count window, got {shown(self.minimum_calls)}"
            )
        timed = self.slow_call_duration is not None or self.trip_policy is not None
        s(self, "windowed", windowed)
        s(self, "timed", timed)
        s(
            self,
            "simple",
            not windowed and not timed and self.record_result is None and self.result_delay is None,
        )

    def new_window(self) -> Window | None:
        """A fresh window of this configuration's shape, or None when none is kept."""
        if not self.windowed:
            return None
        if self.window is WindowKind.COUNT:
            return CountWindow(self.window_size)
        return TimeWindow(self.window_duration, self.window_buckets)

    def window_shape(self) -> tuple[object, ...]:
        """What must match for a window to be kept across a reconfiguration."""
        if not self.windowed:
            return ()
        if self.window is WindowKind.COUNT:
            return (WindowKind.COUNT, self.window_size)
        return (WindowKind.TIME, self.window_duration, self.window_buckets)

    def is_slow(self, duration: float | None) -> bool:
        """Whether a call that took ``duration`` seconds (None: not measured) is slow."""
        limit = self.slow_call_duration
        return duration is not None and limit is not None and duration > limit

    def open_time(self, reopenings: int, rng: random.Random) -> float:
        """How long to stay open at the ``reopenings``-th re-opening (0 for the first)."""
        try:
            d = self.open_duration * self.open_backoff**reopenings
        except OverflowError:
            d = self.max_open_duration
        d = min(d, self.max_open_duration)
        if self.open_jitter:
            j = self.open_jitter
            d *= rng.uniform(1.0 - j, 1.0 + j)
        return d


_DEFAULT_CONFIG: Final = BreakerConfig()
_RNG: Final = random.Random()


# ---------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStateChanged(Event):
    """The breaker went from ``from_state`` to ``to_state`` because of ``reason``.

    Reasons: ``consecutive_failures``, ``failure_rate``, ``slow_call_rate``,
    ``custom``, ``server_delay``, ``open_elapsed``, ``probe_failed``,
    ``probes_succeeded``, ``half_open_timeout``, ``probe_timeout``, ``isolate``,
    ``reset``, ``disable``, ``metrics_only``, ``shared`` (seen in a shared store).
    """

    name: ClassVar[str] = "breaker.state"
    area: ClassVar[str] = "breaker"

    from_state: BreakerState
    to_state: BreakerState
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRejected(Event):
    """A call was refused; it may try again in ``remaining`` seconds (inf: isolated)."""

    name: ClassVar[str] = "breaker.rejected"
    area: ClassVar[str] = "breaker"

    state: BreakerState
    remaining: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OutcomeRecorded(Event):
    """An outcome was recorded: ``success``, ``failure``, ``ignored``, ``cancelled`` or ``lost``.

    ``lost``: a hedged attempt still running when another attempt's answer
    won the race, counted as a slow call (``slow`` is true).

    ``duration`` in seconds when measured; ``error_type`` the exception's type name.
    """

    name: ClassVar[str] = "breaker.outcome"
    area: ClassVar[str] = "breaker"

    outcome: str
    slow: bool = False
    duration: float | None = None
    error_type: str | None = None


_OUTCOME: Final = OutcomeRecorded.name


def wants_outcomes(bus: EventBus) -> bool:
    """Whether a subscriber (of ``bus`` or global) wants `OutcomeRecorded` events.

    The per-call event: when nobody wants it, calls take the paths that build
    no permit, whoever else listens (a metrics exporter that wants only the
    rare kinds, say).  The rare kinds are checked where they are emitted.
    """
    if not (global_bus._subscribers or bus._subscribers):
        return False
    # `listening(bus, OutcomeRecorded)`, reading the buses' cached routes first:
    # this runs per call while an exporter that wants other kinds is installed.
    name = _OUTCOME
    route = global_bus._routes.get(name)
    if route is None:
        route = global_bus._route(name)
    if route:
        return True
    route = bus._routes.get(name)
    if route is None:
        route = bus._route(name)
    return bool(route)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowTrip(Event):
    """In ``METRICS_ONLY`` mode, the breaker would have opened because of ``reason``."""

    name: ClassVar[str] = "breaker.shadow_trip"
    area: ClassVar[str] = "breaker"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreFallback(Event):
    """The shared store failed (``error_type``); the breaker runs on local state.

    ``mode`` is ``"local"`` (decide locally: calls keep flowing) or ``"closed"``
    (refuse every call until the store answers again).
    """

    name: ClassVar[str] = "breaker.store_fallback"
    area: ClassVar[str] = "breaker"

    store: str
    error_type: str
    mode: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreResumed(Event):
    """The shared store answers again after ``outage`` seconds; sharing resumed."""

    name: ClassVar[str] = "breaker.store_resumed"
    area: ClassVar[str] = "breaker"

    store: str
    outage: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OutcomesFolded(Event):
    """Outcomes waiting for the shared store were folded: ``outcomes`` outcomes in
    ``runs`` runs kept as one count per kind (successes, slow, failures).

    No outcome is lost (counts add up), but their order is: the store judges
    the folded batch as if its failures came last.  It happens when a send is
    slow to land, or outcomes pile up while the store is away.
    """

    name: ClassVar[str] = "breaker.outcomes_folded"
    area: ClassVar[str] = "breaker"

    store: str
    outcomes: int
    runs: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteShed(Event):
    """A write the shared store should have had at once was counted here only.

    ``what`` is ``"probe result"``, ``"server delay"`` or ``"probe release"``:
    sent at once in a task of its own, but the breaker already had
    ``max_pending`` sends in flight and as many waiting.  The outcome still
    counts on this process's own breaker; the shared state learns of it with
    the next trip or read (a probe not released stays out until the
    half-open time limit).
    """

    name: ClassVar[str] = "breaker.write_shed"
    area: ClassVar[str] = "breaker"

    store: str
    what: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CorruptStateIgnored(Event):
    """The shared store held a state that does not parse; it was ignored (``reason``)."""

    name: ClassVar[str] = "breaker.corrupt_state"
    area: ClassVar[str] = "breaker"

    store: str
    reason: str


# ---------------------------------------------------------------------------
# The state machine.

_FAILURE: Final = 0
_SUCCESS: Final = 1
_IGNORED: Final = 2
#: A hedged attempt cancelled because another attempt's answer won: a slow
#: call of at least its elapsed time, neither a failure nor a success.
_LOST: Final = 3


def judge_error(config: BreakerConfig, exc: BaseException) -> int:
    """``_FAILURE``, ``_SUCCESS`` or ``_IGNORED`` for an exception (not cancellation)."""
    if config.ignore_on is not None and _matches(config.ignore_on, exc):
        return _SUCCESS if config.ignored_counts_as == "success" else _IGNORED
    return _FAILURE if _matches(config.failure_on, exc) else _SUCCESS


class _Core:
    """The breaker's state and counters; every change happens under ``lock``.

    ``fast`` is True exactly when the state is CLOSED and the configuration
    allows the lock-free path; the faces read it without the lock (a stale
    read admits a call that raced with the opening, which is a valid order).
    ``quick`` is True when the state is CLOSED and no result needs judging:
    the faces then record an outcome straight into `record()`, with the
    generation read before the call, without building a permit.  ``lean``
    is ``quick`` with nothing timed: a success goes to `succeed()`; ``plain``
    is ``lean`` over a count window with no custom policy (`succeed()`'s
    inlined path).  ``settled`` is ``plain`` with a full count window that
    holds only successes: a success then changes nothing at all (every slot
    of the ring is the same, the consecutive count is already 0), so the
    faces skip `succeed()` without the lock; every other path that records
    clears it, and only `succeed()` sets it.  ``judged`` says that the
    window as it is was judged, under this configuration, without a
    verdict; `succeed()` then judges only when its call brings the window
    to ``minimum_calls`` (a success never raises a rate otherwise).

    ``lock`` is re-entrant on purpose: transitions emit their event under it,
    and a subscriber may read the breaker (``state``, ``snapshot()``) from
    the emitting thread.
    """

    __slots__ = (
        "bus",
        "config",
        "consecutive",
        "fast",
        "gen",
        "half_open_until",
        "judged",
        "lean",
        "local_only",
        "lock",
        "name",
        "open_until",
        "opened",
        "plain",
        "policy",
        "probes_failed",
        "probes_issued",
        "probes_ok",
        "probes_slow",
        "quick",
        "quick_result",
        "rejected",
        "reopenings",
        "rng",
        "settled",
        "shadow_tripped",
        "state",
        "window",
    )

    def __init__(self, name: str, config: BreakerConfig, rng: random.Random | None) -> None:
        self.name = name
        self.bus = EventBus()
        self.lock = threading.RLock()
        self.rng = rng or _RNG
        self.config = config
        self.state = BreakerState.CLOSED
        self.gen = 0
        self.open_until = 0.0
        self.half_open_until = 0.0
        self.consecutive = 0
        self.probes_issued = 0
        self.probes_ok = 0
        self.probes_failed = 0
        self.probes_slow = 0
        self.shadow_tripped = False
        self.reopenings = 0
        self.opened = 0
        self.rejected = 0
        self.window = config.new_window()
        self.policy = config.trip_policy() if config.trip_policy is not None else None
        self.local_only = True
        self.fast = self.quick = self.lean = self.plain = self.quick_result = False
        self.settled = self.judged = False
        self._refresh_fast()

    def listening(self, kind: type[Event] | None = None) -> bool:
        """Whether an event (of ``kind``, if given) on this breaker's bus reaches anyone."""
        if not (global_bus._subscribers or self.bus._subscribers):
            return False
        return kind is None or listening(self.bus, kind)

    # -- configuration ---------------------------------------------------------
    def configure(self, config: BreakerConfig) -> None:
        with self.lock:
            old = self.config
            self.config = config
            if old.window_shape() != config.window_shape():
                self.window = config.new_window()
            if old.trip_policy is not config.trip_policy:
                self.policy = config.trip_policy() if config.trip_policy is not None else None
            self._refresh_fast()

    def _refresh_fast(self) -> None:
        closed = self.state is BreakerState.CLOSED and self.local_only
        config = self.config
        self.fast = closed and config.simple
        # Closed, and no result to judge: the faces record without building a permit.
        self.quick = closed and config.record_result is None and config.result_delay is None
        # Quick and nothing timed: the faces record a success with `succeed()`.
        self.lean = self.quick and not config.timed
        # No result to judge (whatever the state): a shared breaker's success needs no permit.
        self.quick_result = config.record_result is None and config.result_delay is None
        # Lean, over a count window, no custom policy: `succeed()` inlines the window update.
        self.plain = self.lean and self.policy is None and type(self.window) is CountWindow
        # Only `succeed()` finds a settled window, under the lock; a new
        # configuration (or state) has not judged the window yet.
        self.settled = self.judged = False

    # -- transitions -------------------------------------------------------------
    def _to(self, new: BreakerState, reason: str, now: float) -> None:
        old = self.state
        self.state = new
        self.gen += 1
        self.shadow_tripped = False
        if new is BreakerState.HALF_OPEN:
            self._start_half_open(now)
        elif new is not BreakerState.OPEN:
            self._clear_counts()
            if new is not BreakerState.FORCED_OPEN:
                self.reopenings = 0
        self._refresh_fast()
        if self.listening(BreakerStateChanged):
            emit(
                BreakerStateChanged(
                    operation=self.name, at=now, from_state=old, to_state=new, reason=reason
                ),
                self.bus,
            )

    def _start_half_open(self, now: float) -> None:
        self.probes_issued = self.probes_ok = self.probes_failed = self.probes_slow = 0
        limit = self.config.half_open_timeout
        self.half_open_until = math.inf if limit is None else now + limit

    def _clear_counts(self) -> None:
        self.consecutive = 0
        if self.window is not None:
            self.window.reset()
        if self.policy is not None:
            self.policy.reset()

    def _open(
        self, now: float, reason: str, hint: float | None, since: float | None = None
    ) -> None:
        # ``since``: when the open period starts, if not now (a half-open time
        # limit that passed while nobody looked).
        duration = hint if hint is not None else self.config.open_time(self.reopenings, self.rng)
        self.reopenings += 1
        self.opened += 1
        self.open_until = (now if since is None else since) + duration
        self._to(BreakerState.OPEN, reason, now)

    def _half_open_expired(self, now: float) -> None:
        # Probes are still out after the time limit: decide without them.  The
        # open period runs from the limit, not from whenever someone looked.
        if self.probes_ok and self.config.half_open_decision == "first_failure":
            self._to(BreakerState.CLOSED, "half_open_timeout", now)
        else:
            self._open(now, "probe_timeout", None, since=self.half_open_until)

    def _settle_time(self, now: float) -> None:
        """Apply the transitions that only time makes (open elapsed, half-open expired)."""
        if self.state is BreakerState.HALF_OPEN and now >= self.half_open_until:
            self._half_open_expired(now)
        if self.state is BreakerState.OPEN and now >= self.open_until:
            self._to(BreakerState.HALF_OPEN, "open_elapsed", now)

    def adopt(self, state: BreakerState, remaining: float) -> None:
        """Take a state seen in a shared store (open for ``remaining`` more seconds).

        Used when the store goes away: local decisions start from the last
        shared state instead of from scratch.  Counts start over; no event
        (the change was reported when the shared state was seen).
        """
        with self.lock:
            now = clock.now()
            self.state = state
            self.gen += 1
            self._clear_counts()
            if state is BreakerState.OPEN:
                self.open_until = now + remaining
            elif state is BreakerState.HALF_OPEN:
                self._start_half_open(now)
            self._refresh_fast()

    def count_rejection(self) -> None:
        """A shared store's link refused a call."""
        with self.lock:
            self.rejected += 1

    def force(self, new: BreakerState, reason: str) -> None:
        with self.lock:
            self._to(new, reason, clock.now())

    # -- admission -----------------------------------------------------------------
    def admit(self) -> tuple[int, bool]:
        """``(generation, is_probe)`` of a granted call; raises CircuitOpenError otherwise."""
        state = self.state
        if state in PASSING_STATES:
            return self.gen, False
        with self.lock:
            now = clock.now()
            self._settle_time(now)
            state = self.state
            if state in PASSING_STATES:
                return self.gen, False
            if (
                state is BreakerState.HALF_OPEN
                and self.probes_issued < self.config.half_open_permits
            ):
                self.probes_issued += 1
                return self.gen, True
            remaining = self._remaining(now)
            self.rejected += 1
        if self.listening(CallRejected):
            emit(
                CallRejected(operation=self.name, at=now, state=state, remaining=remaining),
                self.bus,
            )
        raise CircuitOpenError(self.name, remaining)

    def _remaining(self, now: float) -> float:
        state = self.state
        if state is BreakerState.FORCED_OPEN:
            return math.inf
        if state is BreakerState.OPEN:
            return max(self.open_until - now, 0.0)
        if state is BreakerState.HALF_OPEN:
            if self.probes_issued < self.config.half_open_permits:
                return 0.0
            return max(self.half_open_until - now, 0.0)
        return 0.0

    def retry_after(self) -> float:
        if self.state in PASSING_STATES:
            return 0.0
        with self.lock:
            now = clock.now()
            self._settle_time(now)
            return self._remaining(now)

    def current_state(self) -> BreakerState:
        if self.state in PASSING_STATES or self.state is BreakerState.FORCED_OPEN:
            return self.state
        with self.lock:
            self._settle_time(clock.now())
            return self.state

    # -- outcomes ------------------------------------------------------------------
    def release(self, gen: int, probe: bool) -> None:
        """A granted call ended without an outcome (cancelled, ignored): free its probe."""
        if not probe:
            return
        with self.lock:
            if gen == self.gen and self.state is BreakerState.HALF_OPEN and self.probes_issued:
                self.probes_issued -= 1

    def reset_consecutive(self, gen: int) -> None:
        """A fast-path success of generation ``gen`` while failures were counted."""
        with self.lock:
            if gen == self.gen and self.state is BreakerState.CLOSED:
                self.consecutive = 0

    def succeed(self, gen: int) -> None:
        """A success, not timed, of a call granted in generation ``gen`` (``lean`` faces).

        The same as ``record(gen, False, False, False, None, None)``.  With a
        count window and no custom policy the window update is inlined and
        the success is not judged while the window holds no failure and no
        slow call: a success clears the consecutive count, and a rate of zero
        never reaches a threshold (thresholds are > 0), so no verdict could
        come of it (nor is the clock read: a count window has no time).  Nor
        is it judged when the window was judged without a verdict just before
        (``judged``) unless it now reaches ``minimum_calls``: a success lowers
        the rates or keeps them.  Once
        that window is full of successes it is ``settled``: the next success
        changes nothing, and the faces do not call this at all (a caller that
        does, such as the router's grant seam, returns at once without the lock:
        a failure recorded meanwhile is ordered after this success).
        """
        if self.plain and not self.consecutive:
            full = self.window
            if (
                type(full) is CountWindow
                and full.calls == full.size
                and not full.failures
                and not full.slow
            ):
                return
        with self.lock:
            if self.plain and gen == self.gen:  # closed (``plain`` changes under the lock)
                self.consecutive = 0
                # CountWindow.add(False, False, now), inlined.
                window: CountWindow = self.window  # type: ignore[assignment]
                ring = window._ring
                i = window._pos
                old = ring[i]
                if not old:
                    window.calls += 1
                elif old != 4:  # the slot held a failed or slow call
                    window.failures -= old & 1
                    window.slow -= (old & 2) >> 1
                ring[i] = 4
                i += 1
                window._pos = 0 if i == window.size else i
                if not window.failures and not window.slow:
                    self.shadow_tripped = False  # what `_conclude()` does with no verdict
                    self.settled = window.calls == window.size
                    self.judged = True
                    return
                if self.judged and (old or window.calls != self.config.minimum_calls):
                    # The rates are no higher than when they were last judged
                    # (no verdict): the same calls with fewer failed or slow,
                    # or one more call above ``minimum_calls``.
                    return
                now = clock.now()
                reason = self._judge(now, False)
                self._conclude(now, BreakerState.CLOSED, reason, None)
                self.judged = reason is None
                return
        self.record(gen, False, False, False, None, None)

    def record(
        self,
        gen: int,
        probe: bool,
        failed: bool,
        slow: bool,
        duration: float | None,
        hint: float | None,
    ) -> None:
        """Record an outcome of a call granted in generation ``gen`` (-1: the current one).

        ``hint`` is a validated server delay in seconds that forces the breaker open.
        """
        with self.lock:
            now = clock.now()
            state = self.state
            if state is BreakerState.OPEN or state is BreakerState.HALF_OPEN:
                self._settle_time(now)  # a half-open past its time limit decides first
                state = self.state
            if gen == -1:
                if state is not BreakerState.CLOSED:
                    return
            elif gen != self.gen:
                return  # late: granted in an earlier period
            config = self.config
            if state is BreakerState.HALF_OPEN:
                if not probe:
                    return
                if hint is not None:
                    self._open(now, "server_delay", hint)
                elif config.half_open_decision == "rate":
                    self._record_probe_rate(now, failed, slow)
                elif failed or (slow and config.slow_call_rate_threshold is not None):
                    self._open(now, "probe_failed", None)
                else:
                    self.probes_ok += 1
                    if self.probes_ok >= config.half_open_permits:
                        self._to(BreakerState.CLOSED, "probes_succeeded", now)
                return
            if state is not BreakerState.CLOSED and state is not BreakerState.METRICS_ONLY:
                return
            self.settled = False
            self.consecutive = self.consecutive + 1 if failed else 0
            if self.window is not None:
                self.window.add(failed, slow, now)
            tripped = self.policy is not None and self.policy.record(failed, slow, duration, now)
            reason = "server_delay" if hint is not None else self._judge(now, tripped)
            self._conclude(now, state, reason, hint)
            self.judged = reason is None

    def _conclude(
        self, now: float, state: BreakerState, reason: str | None, hint: float | None
    ) -> None:
        """Act on a closed or shadow breaker's verdict ``reason`` (None: no trip)."""
        if reason is None:
            self.shadow_tripped = False
            return
        if state is BreakerState.METRICS_ONLY:
            # Shadow mode keeps every count (the snapshot shows the real
            # rates) and reports a would-be trip once, when the criterion
            # starts to hold; again only after it stopped holding.
            if not self.shadow_tripped:
                self.shadow_tripped = True
                if self.listening(ShadowTrip):
                    emit(ShadowTrip(operation=self.name, at=now, reason=reason), self.bus)
            return
        self._open(now, reason, hint)

    def record_lost(self, gen: int, probe: bool, duration: float | None) -> None:
        """Record a hedge that lost its race while still running (granted in ``gen``).

        It is a slow call, neither a failure nor a success: the consecutive
        failure count stays as it is, the window counts a slow call when a
        slow-call rule judges it, a custom policy sees ``(failed=False,
        slow=True)``; a lost half-open probe re-opens the breaker under a
        slow-call rule and is freed otherwise.
        """
        with self.lock:
            now = clock.now()
            state = self.state
            if state is BreakerState.OPEN or state is BreakerState.HALF_OPEN:
                self._settle_time(now)
                state = self.state
            if gen != self.gen:
                return  # late: granted in an earlier period
            config = self.config
            judged = config.slow_call_rate_threshold is not None
            if state is BreakerState.HALF_OPEN:
                if not probe:
                    return
                if config.half_open_decision == "rate" and judged:
                    self._record_probe_rate(now, False, True)
                elif judged:
                    self._open(now, "probe_failed", None)
                elif self.probes_issued:
                    self.probes_issued -= 1
                return
            if state is not BreakerState.CLOSED and state is not BreakerState.METRICS_ONLY:
                return
            if self.window is not None and judged:
                self.settled = False
                self.window.add(False, True, now)
            tripped = self.policy is not None and self.policy.record(False, True, duration, now)
            reason = self._judge(now, tripped)
            self._conclude(now, state, reason, None)
            self.judged = reason is None

    def _record_probe_rate(self, now: float, failed: bool, slow: bool) -> None:
        """``"rate"`` mode: count a probe; once all permitted ones are in, judge their rates."""
        config = self.config
        if failed:
            self.probes_failed += 1
        else:
            self.probes_ok += 1
        if slow:
            self.probes_slow += 1
        done = self.probes_ok + self.probes_failed
        if done < config.half_open_permits:
            return
        frt = config.failure_rate_threshold
        srt = config.slow_call_rate_threshold
        if frt is not None and self.probes_failed >= frt * done:
            self._open(now, "failure_rate", None)
        elif srt is not None and self.probes_slow >= srt * done:
            self._open(now, "slow_call_rate", None)
        else:
            self._to(BreakerState.CLOSED, "probes_succeeded", now)

    def _judge(self, now: float, tripped: bool) -> str | None:
        config = self.config
        limit = config.consecutive_failures
        if limit is not None and self.consecutive >= limit:
            return "consecutive_failures"
        window = self.window
        if window is not None:
            calls, failures, slow = window.totals(now)
            if calls >= config.minimum_calls:
                frt = config.failure_rate_threshold
                if frt is not None and failures >= frt * calls:
                    return "failure_rate"
                srt = config.slow_call_rate_threshold
                if srt is not None and slow >= srt * calls:
                    return "slow_call_rate"
        return "custom" if tripped else None

    def totals(self) -> tuple[int, int, int] | None:
        with self.lock:
            if self.window is None:
                return None
            return self.window.totals(clock.now())


# ---------------------------------------------------------------------------
# Permits


class Permit:
    """Leave to make one call; settle it with exactly one outcome.

    [`success()`][datapunk_recovery.breaker.Permit.success],
    [`failure()`][datapunk_recovery.breaker.Permit.failure],
    [`result()`][datapunk_recovery.breaker.Permit.result] or
    [`cancel()`][datapunk_recovery.breaker.Permit.cancel] settle
    it; the first one counts and later ones do nothing.  With a shared store the
    plain methods never wait for the store (the write happens in the
    background); the ``*_async`` twins await it.  Durations are seconds; when
    not given and the configuration needs them, they are measured from
    [`CircuitBreaker.allow()`][datapunk_recovery.breaker.CircuitBreaker.allow].
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
            self._breaker._settle(self, _SUCCESS, None, duration, None, None)

    def failure(self, exc: BaseException | None = None, duration: float | None = None) -> None:
        """The call failed with ``exc`` (judged by the record/ignore rules) or plainly.

        A cancellation passed here counts as nothing, like
        [`cancel()`][datapunk_recovery.breaker.Permit.cancel].
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
            verdict = _LOST if lost_race() else _IGNORED
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
            self._core = _Core(name, cfg, rng)
            return
        is_async = getattr(store, "is_async", None)
        if is_async is False:
            core = store.local(("breaker", name), lambda: _Core(name, cfg, rng))  # type: ignore[attr-defined]
            if not isinstance(core, _Core):
                raise TypeError(f"CircuitBreaker.store: {store!r} holds a non-breaker {name!r}")
            if config is not None and core.config != config:
                core.configure(config)
            self._core = core
        elif is_async is True:
            self._core = _Core(name, cfg, rng)
            self._core.local_only = False
            self._core._refresh_fast()
            self._link = store.bind_breaker(self)  # type: ignore[attr-defined]
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

    def _local_control(self, what: str) -> _Core:
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
        """[`reset()`][datapunk_recovery.breaker.CircuitBreaker.reset], for any store."""
        await self._force_async(BreakerState.CLOSED, "reset")

    async def disable_async(self) -> None:
        """[`disable()`][datapunk_recovery.breaker.CircuitBreaker.disable], for any store."""
        await self._force_async(BreakerState.DISABLED, "disable")

    async def metrics_only_async(self) -> None:
        """`metrics_only()`, for any store."""
        await self._force_async(BreakerState.METRICS_ONLY, "metrics_only")

    # -- permits -----------------------------------------------------------------------
    def allow(self) -> Permit:
        """A permit for one call, or `CircuitOpenError` when the breaker refuses.

        In-process stores only; a breaker on an async store raises ``TypeError``
        (use [`allow_async()`][datapunk_recovery.breaker.CircuitBreaker.allow_async]).
        """
        if self._link is not None:
            raise TypeError(
                f"CircuitBreaker {self.name!r} keeps its state in an async store "
                "(Redis): use allow_async() / call_async() / async with"
            )
        core = self._core
        gen, probe = core.admit()
        return Permit(self, gen, probe, False, clock.now() if core.config.timed else None)

    async def allow_async(self) -> Permit:
        """`allow()` for async code; works with every store."""
        if self._link is None:
            core = self._core
            gen, probe = core.admit()
            return Permit(self, gen, probe, False, clock.now() if core.config.timed else None)
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
        ([`allow()`][datapunk_recovery.breaker.CircuitBreaker.allow] then refuses).
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
        [`granted_success()`][datapunk_recovery.breaker.CircuitBreaker.granted_success]
        or [`granted_failure()`][datapunk_recovery.breaker.CircuitBreaker.granted_failure],
        passing the generation back (an outcome of an earlier generation is
        late and counts nowhere), as the breaker's own faces do.
        """
        core = self._core
        gen = core.gen  # before ``quick``: a transition in between makes the outcome late
        if core.quick and (
            not (global_bus._subscribers or core.bus._subscribers) or not wants_outcomes(core.bus)
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
        [`failure_rate()`][datapunk_recovery.breaker.CircuitBreaker.failure_rate],
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
            self._settle(permit, _FAILURE, None, duration, None, None)
            return
        if not isinstance(exc, Exception):  # cancellation and exit count as nothing
            verdict = _LOST if lost_race() else _IGNORED  # ... but a lost hedge is slow
            self._settle(permit, verdict, None, None, exc, "cancelled")
            return
        config = self.config
        verdict = judge_error(config, exc)
        # An ignored error never counts, whatever delay it carries (as on the fast path).
        hint = (
            classify(exc).delay_hint if config.honor_server_delay and verdict != _IGNORED else None
        )
        self._settle(permit, verdict, hint, duration, exc, None)

    def _settle_result(self, permit: Permit, value: object, duration: float | None) -> None:
        config = self.config
        hint = config.result_delay(value) if config.result_delay is not None else None
        failed = config.record_result is not None and bool(config.record_result(value))
        self._settle(permit, _FAILURE if failed else _SUCCESS, hint, duration, None, None)

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
            verdict = _FAILURE  # a "come back later" from the server is no success
        slow = verdict == _LOST or config.is_slow(duration)
        if core.listening(OutcomeRecorded) and core.state is not BreakerState.DISABLED:
            outcome = (
                "lost"
                if verdict == _LOST
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
        if verdict == _LOST:
            if not permit._remote or link is None:
                core.record_lost(permit._gen, permit._probe, duration)
                return
            if config.slow_call_rate_threshold is not None:
                # A shared breaker's store knows successes and failures: a
                # lost hedge reaches it as the slow call it is, for its rule.
                link.record(permit._gen, permit._probe, False, True, duration, None)
                return
            verdict = _IGNORED
        if verdict == _IGNORED:
            if permit._remote and link is not None:
                link.release(permit._gen, permit._probe)
            else:
                core.release(permit._gen, permit._probe)
            return
        failed = verdict == _FAILURE
        if permit._remote and link is not None:
            link.record(permit._gen, permit._probe, failed, slow, duration, hint)
        else:
            core.record(permit._gen, permit._probe, failed, slow, duration, hint)
            if link is not None and not permit._probe:
                link.missed(failed, slow)  # judged here while the store was away

    def _validate_hint(self, raw: object) -> float | None:
        decision = server_delay(0.0, raw, self.config._hints, None)
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
        if verdict == _IGNORED:
            return
        hint = self._error_hint(exc)
        if hint is not None or verdict == _FAILURE:
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
        if verdict == _IGNORED:
            return  # not a probe: nothing to give back
        hint = self._error_hint(exc)
        failed = verdict == _FAILURE or hint is not None
        core.record(gen, False, failed, core.config.is_slow(duration), duration, hint)

    # -- faces -----------------------------------------------------------------------------
    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` through the breaker (sync, in-process stores)."""
        core = self._core
        # The generation is read before ``fast``: a transition in between makes
        # the outcome late (counted nowhere), never counted in a later period.
        gen = core.gen
        if core.fast and (
            not (global_bus._subscribers or core.bus._subscribers) or not wants_outcomes(core.bus)
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
        permit = self.allow()
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
            not (global_bus._subscribers or core.bus._subscribers) or not wants_outcomes(core.bus)
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
                if not (gbus._subscribers or core.bus._subscribers) or not wants_outcomes(core.bus):
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
            if not (gbus._subscribers or core.bus._subscribers) or not wants_outcomes(core.bus):
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
