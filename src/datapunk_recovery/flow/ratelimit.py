"""Client-side rate limiting: a token bucket with a bounded wait and a 429 drain.

A [`RateLimiter`][datapunk_recovery.flow.ratelimit.RateLimiter] lets calls through at ``rate`` per
second
on average
with bursts of up to ``burst``.  A call that finds the bucket empty
*reserves* its token (the bucket goes into debt) and then waits until the
token would have arrived, so waiting callers are served in order and never
stampede when tokens come back.  A wait longer than ``max_wait`` seconds (or
than the overall deadline allows) is refused at once with
[`RateLimitExceeded`][datapunk_recovery.flow.ratelimit.RateLimitExceeded], whose ``retry_after``
says
when a token will be
there.  A caller cancelled while it waits gives its token back.

When the server says it throttles us (a 429 result, or an error classified as
``rate_limited``), [`RateLimiter.drain()`][datapunk_recovery.flow.ratelimit.RateLimiter.drain]
empties
the bucket, for the
server's ``Retry-After`` when it gives one: the next calls wait instead of
hammering a server that already said no.

Per-caller quotas: with ``per_caller_rate`` set, every caller (``caller=``
or [`datapunk_recovery.flow.bulkhead.as_caller()`][datapunk_recovery.flow.bulkhead.as_caller]) also
has its
own bucket, so
one caller cannot use up the whole rate.  Idle callers' buckets are dropped
when more than ``max_callers`` are tracked; a busy one never is (it would come
back to a fresh burst): past that many busy callers, new ones share one bucket.

Time is read through [`datapunk_recovery._core.clock.now()`][datapunk_recovery._core.clock.now] and
waits go
through
``_runtime`` sleeps, so a fake clock drives the limiter exactly.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, ParamSpec, TypeVar

from .._core import clock
from .._core.context import CALLER as _CALLER
from .._core.context import CURRENT
from .._core.decorate import CallDecorator
from .._core.errors import DeadlineExceeded, ErrorCategory, RecoveryError, classify
from .._core.events import Event, EventBus, HintIgnored, emit, global_bus, listening
from .._core.redact import safe_repr
from .._core.validate import check_count, check_number, check_seconds, shown
from .._execution import runtime as _runtime

__all__ = [
    "RateLimitAdmitted",
    "RateLimitDrained",
    "RateLimitExceeded",
    "RateLimitRejected",
    "RateLimiter",
    "RateLimiterConfig",
    "throttled_429",
]

P = ParamSpec("P")
T = TypeVar("T")

# Retry-After's delta-seconds (RFC 9110 section 10.2.3): [0-9], not \d (no other digits).
_DELTA_SECONDS: Final = re.compile(r"[0-9]+")

Throttled = Callable[[Any], "bool | float | None"]
"""Looks at a result: ``None``/``False`` = not throttled, ``True`` = throttled,
a number = throttled, with the server's delay in seconds."""


def throttled_429(result: Any) -> bool | float | None:
    """The default throttle detector: a response whose status is 429.

    Reads ``status_code`` (httpx, requests) or ``status`` (aiohttp) and, when
    present, a ``Retry-After`` header in delta-seconds: ASCII digits only, as
    RFC 9110 writes them (``1e3``, ``1_000``, ``+5``, ``1.5`` or non-ASCII
    digits are not seconds: the bucket drains without a duration, as for an
    HTTP date).  Anything else is not throttled.  Never raises.
    """
    status = getattr(result, "status_code", None)
    if status is None:
        status = getattr(result, "status", None)
    if status != 429:
        return None
    headers = getattr(result, "headers", None)
    if isinstance(headers, Mapping):
        value = headers.get("Retry-After") or headers.get("retry-after")
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode("latin-1")
        if isinstance(value, str):
            text = value.strip(" \t")  # optional white space, and nothing else
            if _DELTA_SECONDS.fullmatch(text):
                # Past 15 digits the value is absurd anyway: max_drain caps it.
                return float(text) if len(text) <= 15 else 1e15
        return True  # an HTTP date or garbage: drain without a duration
    return True


class RateLimitExceeded(RecoveryError):
    """The client-side limiter would have had to wait longer than allowed.

    ``retry_after`` is how long, in seconds, until a token is there;
    ``limiter`` names the limiter.  Not retried by any layer above: the
    limiter already waited all it was allowed to.
    """

    category = ErrorCategory.RATE_LIMITED
    retryable = False
    do_not_retry_above = True

    def __init__(self, limiter: str, wait: float, max_wait: float) -> None:
        super().__init__(
            f"rate limiter {limiter!r}: the next token is {wait:.3f} s away, "
            f"more than the {max_wait:g} s a call may wait",
            retry_after=wait,
            context={"limiter": limiter},
        )
        self.limiter = limiter


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitRejected(Event):
    """A call was refused: it would have waited ``wait`` s, more than ``allowed`` s."""

    name: ClassVar[str] = "ratelimit.rejected"
    area: ClassVar[str] = "ratelimit"

    wait: float
    allowed: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitAdmitted(Event):
    """A call got its token after waiting ``waited`` seconds (0 when one was there)."""

    name: ClassVar[str] = "ratelimit.admitted"
    area: ClassVar[str] = "ratelimit"

    waited: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitDrained(Event):
    """The server throttled us: the bucket was emptied for ``retry_after`` seconds.

    ``retry_after`` is ``None`` when the server gave no duration (the bucket is
    emptied, and refills at the normal rate).
    """

    name: ClassVar[str] = "ratelimit.drained"
    area: ClassVar[str] = "ratelimit"

    retry_after: float | None


@dataclass(frozen=True, slots=True)
class RateLimiterConfig:
    """``rate`` calls per second on average, bursts of ``burst``, waits of ``max_wait`` s.

    ``per_caller_rate`` / ``per_caller_burst`` give every caller its own
    bucket as well (``None``: no per-caller quota; the burst defaults to the
    global one); at most ``max_callers`` callers' buckets are kept.
    ``max_drain`` caps how long a server's ``Retry-After`` may empty the bucket.
    ``throttled`` recognises a throttled result (default: a 429 response).
    """

    rate: float = 10.0
    burst: int = 10
    max_wait: float = 0.0
    per_caller_rate: float | None = None
    per_caller_burst: int | None = None
    max_callers: int = 1024
    max_drain: float = 300.0
    throttled: Throttled | None = throttled_429

    def __post_init__(self) -> None:
        owner = "RateLimiterConfig"
        s = object.__setattr__
        s(self, "rate", check_number(owner, "rate", self.rate))
        if self.rate <= 0:
            raise ValueError(f"{owner}.rate: must be > 0 calls per second, got {shown(self.rate)}")
        check_count(owner, "burst", self.burst)
        s(self, "max_wait", check_seconds(owner, "max_wait", self.max_wait))
        if self.per_caller_rate is not None:
            s(self, "per_caller_rate", check_number(owner, "per_caller_rate", self.per_caller_rate))
            if self.per_caller_rate <= 0:
                raise ValueError(
                    f"{owner}.per_caller_rate: must be > 0 calls per second, "
                    f"got {shown(self.per_caller_rate)}"
                )
        if self.per_caller_burst is not None:
            check_count(owner, "per_caller_burst", self.per_caller_burst)
        check_count(owner, "max_callers", self.max_callers)
        s(self, "max_drain", check_seconds(owner, "max_drain", self.max_drain))
        if self.throttled is not None and not callable(self.throttled):
            raise TypeError(f"{owner}.throttled: expected a callable, got {shown(self.throttled)}")


class _Bucket:
    """Tokens refilled lazily from the time of the last look; may go into debt."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def wait(self, now: float) -> float:
        """Refill to ``now``; seconds until one whole token is there (0 if it is)."""
        if now > self.stamp:
            tokens = self.tokens + (now - self.stamp) * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
            self.stamp = now
        tokens = self.tokens
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def give_back(self) -> None:
        tokens = self.tokens + 1.0
        self.tokens = tokens if tokens < self.burst else self.burst

    def drain(self, retry_after: float | None) -> None:
        floor = 0.0 if retry_after is None else 1.0 - retry_after * self.rate
        if self.tokens > floor:
            self.tokens = floor


def _retune(bucket: _Bucket, rate: float, burst: float, now: float) -> None:
    """Give ``bucket`` a new rate and burst, keeping its tokens (refilled to ``now`` first)."""
    bucket.wait(now)
    bucket.rate = rate
    bucket.burst = burst
    if bucket.tokens > burst:
        bucket.tokens = burst


class RateLimiter(CallDecorator):
    """A token-bucket rate limiter (see the module doc and `RateLimiterConfig`).

    Faces: [`acquire()`][datapunk_recovery.flow.ratelimit.RateLimiter.acquire] /
    [`acquire_async()`][datapunk_recovery.flow.ratelimit.RateLimiter.acquire_async]
    (wait if allowed,
    else
    raise), [`try_acquire()`][datapunk_recovery.flow.ratelimit.RateLimiter.try_acquire] (never
    waits),
    [`call()`][datapunk_recovery.flow.ratelimit.RateLimiter.call] /
    [`call_async()`][datapunk_recovery.flow.ratelimit.RateLimiter.call_async]
    (also drain on a throttled
    result or error), and the
    object as a decorator.  Thread-safe; one lock taken per call.
    """

    __slots__ = (
        "_bucket",
        "_callers",
        "_idle_at",
        "_lock",
        "_overflow",
        "_throttled",
        "bus",
        "config",
        "name",
    )

    def __init__(
        self,
        name: str,
        config: RateLimiterConfig | None = None,
        *,
        bus: EventBus | None = None,
    ) -> None:
        self.name = name
        self.config = config = config if config is not None else RateLimiterConfig()
        if not isinstance(config, RateLimiterConfig):
            raise TypeError(
                f"RateLimiter.config: expected a RateLimiterConfig, got {shown(config)}"
            )
        #: Where this limiter's events go first (then the global bus).
        self.bus = bus if bus is not None else EventBus()
        self._bucket = _Bucket(config.rate, float(config.burst), clock.now())
        self._callers: dict[str, _Bucket] = {}
        # The one bucket the callers past ``max_callers`` share while every
        # tracked caller is busy (see _caller_bucket).
        self._overflow: _Bucket | None = None
        # Before this time no tracked bucket can be idle: no need to look.
        self._idle_at = 0.0
        self._throttled = config.throttled
        self._lock = threading.Lock()

    def reconfigure(self, config: RateLimiterConfig) -> None:
        """Take ``config`` while calls run, keeping the tokens spent.

        This is how a reload changes a limiter: the bucket is refilled up to
        now at the old rate, then keeps its tokens (clamped to the new
        ``burst``, never raised, a debt kept) and refills at the new rate, so
        a reload never hands out a fresh burst.  Per-caller buckets do the
        same; when ``per_caller_rate`` goes away they are kept, unused, so
        that a reload restoring it hands out no fresh burst either.
        """
        if not isinstance(config, RateLimiterConfig):
            raise TypeError(
                f"RateLimiter.reconfigure: expected a RateLimiterConfig, got {shown(config)}"
            )
        with self._lock:
            now = clock.now()
            _retune(self._bucket, config.rate, float(config.burst), now)
            rate = config.per_caller_rate
            if rate is not None:  # (without one the buckets wait, unused, for its return)
                burst = float(config.per_caller_burst or config.burst)
                for bucket in self._callers.values():
                    _retune(bucket, rate, burst, now)
                if self._overflow is not None:
                    _retune(self._overflow, rate, burst, now)
            self._idle_at = 0.0
            self.config = config
            self._throttled = config.throttled

    @property
    def tokens(self) -> float:
        """Tokens in the shared bucket now (negative while callers wait on a debt)."""
        with self._lock:
            self._bucket.wait(clock.now())
            return self._bucket.tokens

    # -- reservations

    def _caller_bucket(self, caller: str, now: float) -> _Bucket:
        """The caller's own bucket (lock held), made on first use, idle ones evicted.

        With ``max_callers`` buckets tracked and none idle, a new caller is
        charged to one bucket all such callers share: forgetting a busy
        caller instead would hand it a fresh burst on its next call.
        """
        bucket = self._callers.get(caller)
        if bucket is None:
            config = self.config
            rate = config.per_caller_rate
            assert rate is not None
            burst = float(config.per_caller_burst or config.burst)
            if len(self._callers) >= config.max_callers:
                self._evict(now)
                if len(self._callers) >= config.max_callers:
                    if self._overflow is None:
                        self._overflow = _Bucket(rate, burst, now)
                    return self._overflow
            bucket = self._callers[caller] = _Bucket(rate, burst, now)
        return bucket

    def _evict(self, now: float) -> None:
        # Idle callers (a full bucket) lose nothing by being forgotten; a
        # busy one is never forgotten (it would come back to a fresh burst).
        # With none idle, the scan is not repeated before one can be.
        if now < self._idle_at:
            return
        buckets = self._callers
        idle = [k for k, b in buckets.items() if b.wait(now) == 0.0 and b.tokens >= b.burst]
        for key in idle:
            del buckets[key]
        if not idle:
            self._idle_at = now + min((b.burst - b.tokens) / b.rate for b in buckets.values())

    def _reserve(self, caller: str | None, allowed: float | None) -> tuple[float, _Bucket | None]:
        """Take a token now or reserve one; the wait, and the caller bucket charged.

        ``allowed`` is the longest wait accepted (``None``: the configured
        ``max_wait`` bounded by the deadline).  Raises when the wait is too long.
        """
        config = self.config
        by_deadline = False
        now = clock.now()  # read once; a later refill by another thread is kept
        if allowed is None:
            allowed = config.max_wait
            ctx = CURRENT.get()
            if ctx is not None and ctx[0] is not None:
                left = ctx[0] - now
                if left < allowed:
                    allowed, by_deadline = max(left, 0.0), True
        with self._lock:
            wait = self._bucket.wait(now)
            own = None
            if caller is not None and config.per_caller_rate is not None:
                own = self._caller_bucket(caller, now)
                own_wait = own.wait(now)
                if own_wait > wait:
                    wait = own_wait
            if wait <= allowed:
                self._bucket.tokens -= 1.0
                if own is not None:
                    own.tokens -= 1.0
                return wait, own
        if by_deadline and wait <= config.max_wait:
            raise DeadlineExceeded(
                f"rate limiter {self.name!r}: the next token ({wait:.3f} s away) "
                "would come after the deadline"
            )
        if global_bus.active or self.bus.active:
            emit(
                RateLimitRejected(operation=self.name, at=clock.now(), wait=wait, allowed=allowed),
                self.bus,
            )
        raise RateLimitExceeded(self.name, wait, allowed)

    def _give_back(self, own: _Bucket | None) -> None:
        with self._lock:
            self._bucket.give_back()
            if own is not None:
                own.give_back()

    def _admitted(self, waited: float) -> None:
        # Per call: built only for a subscriber that wants it.
        if (global_bus.active or self.bus.active) and listening(self.bus, RateLimitAdmitted):
            emit(RateLimitAdmitted(operation=self.name, at=clock.now(), waited=waited), self.bus)

    # -- faces

    def try_acquire(self, caller: str | None = None) -> bool:
        """Take a token if one is there now; never waits, never raises."""
        caller = caller if caller is not None else _CALLER.get()
        try:
            self._reserve(caller, 0.0)
        except RateLimitExceeded:
            return False
        self._admitted(0.0)
        return True

    def acquire(self, caller: str | None = None) -> None:
        """Take a token, waiting (the thread) up to ``max_wait`` s; else raise."""
        caller = caller if caller is not None else _CALLER.get()
        wait, own = self._reserve(caller, None)
        if wait > 0.0:
            try:
                _runtime.sleep_sync(wait)
            except BaseException:
                self._give_back(own)
                raise
        self._admitted(wait)

    async def acquire_async(self, caller: str | None = None) -> None:
        """Take a token, waiting (the task) up to ``max_wait`` s; else raise."""
        caller = caller if caller is not None else _CALLER.get()
        wait, own = self._reserve(caller, None)
        if wait > 0.0:
            try:
                await _runtime.sleep_async(wait)
            except BaseException:
                self._give_back(own)
                raise
        self._admitted(wait)

    def drain(self, retry_after: float | None = None) -> None:
        """Empty the bucket: the server throttles us (for ``retry_after`` s if it said).

        A ``retry_after`` above ``max_drain`` is capped to it; garbage (not a
        finite number >= 0) drains without a duration and is reported as
        [`HintIgnored`][datapunk_recovery._core.events.HintIgnored].
        """
        if retry_after is not None:
            retry_after = self._seconds(retry_after)
        with self._lock:
            self._bucket.wait(clock.now())
            self._bucket.drain(retry_after)
        if global_bus.active or self.bus.active:
            emit(
                RateLimitDrained(operation=self.name, at=clock.now(), retry_after=retry_after),
                self.bus,
            )

    def _seconds(self, value: object) -> float | None:
        """A server's drain duration capped to ``max_drain``; ``None`` (reported) for garbage."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                seconds = float(value)
            except OverflowError:  # an int too large for a float: absurd, so capped
                return self.config.max_drain
            if seconds >= 0.0 and math.isfinite(seconds):
                return min(seconds, self.config.max_drain)
        if global_bus.active or self.bus.active:
            emit(
                HintIgnored(
                    operation=self.name,
                    at=clock.now(),
                    value=safe_repr(value),
                    reason="drain duration is not a finite number of seconds >= 0",
                ),
                self.bus,
            )
        return None

    def observe(self, result: Any) -> None:
        """Drain if ``result`` says the server throttles us (see ``throttled``)."""
        detect = self._throttled
        if detect is None:
            return
        verdict = detect(result)
        if verdict is None or verdict is False:
            return
        self.drain(None if verdict is True else verdict)

    def observe_error(self, exc: BaseException) -> None:
        """Drain if ``exc`` is classified ``rate_limited`` (with its server delay, if any)."""
        verdict = classify(exc)
        if verdict.category is ErrorCategory.RATE_LIMITED and not isinstance(
            exc, RateLimitExceeded
        ):
            self.drain(verdict.delay_hint)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Take a token, run ``fn``, and drain if it was throttled."""
        self.acquire()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            self.observe_error(exc)
            raise
        if self._throttled is not None:
            self.observe(result)
        return result

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Take a token, await ``fn``, and drain if it was throttled."""
        await self.acquire_async()
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            self.observe_error(exc)
            raise
        if self._throttled is not None:
            self.observe(result)
        return result
