"""A circuit breaker's configuration: its states, window kinds, trip policy and `BreakerConfig`.

Validated once, when made (`BreakerConfig.__post_init__`): a bad value raises naming the
field and the value.  Seconds throughout.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal, Protocol

from .._core.backoff import RetryConfig
from .._core.validate import check_count, check_fraction, check_number, check_seconds, shown
from .._core.windows import CountWindow, TimeWindow, Window

__all__ = [
    "PASSING_STATES",
    "BreakerConfig",
    "BreakerState",
    "ExceptionMatch",
    "TripPolicy",
    "WindowKind",
    "hints",
    "matches",
]

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


def matches(spec: ExceptionMatch, exc: BaseException) -> bool:
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
      that
      [`CircuitBreaker.failure_rate()`][datapunk_recovery.breaker.breaker.CircuitBreaker.failure_rate]
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


def hints(config: BreakerConfig) -> RetryConfig:
    """The retry configuration that judges a server's delay hint (``max_server_delay``)."""
    return config._hints
