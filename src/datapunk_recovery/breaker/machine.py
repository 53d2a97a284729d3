"""The breaker's state machine (`Machine`): the one home of its rules.

Admission (`Machine.admit`), outcomes and trips (`Machine.record`), transitions in time, forced
states.  A local breaker runs it in process; a shared one runs the same rules in Redis
(``shared.lua``, its server-side twin, proven equal by
``tests/test_breaker_shared_differential.py``) and falls back to this machine when Redis is away.
"""

from __future__ import annotations

import math
import random
import threading
from typing import Final

from .._core import clock
from .._core.errors import CircuitOpenError
from .._core.events import Event, EventBus, emit, global_bus, listening
from .._core.windows import CountWindow
from .config import PASSING_STATES, BreakerConfig, BreakerState, matches
from .events import BreakerStateChanged, CallRejected, ShadowTrip

__all__ = ["FAILURE", "IGNORED", "LOST", "SUCCESS", "Machine", "judge_error"]

#: The default random source of open-duration jitter (a breaker may bring its own).
_RNG: Final = random.Random()

# The states as module constants: reading a member off its enum class costs
# several times a global read (CPython 3.11), on every path that compares states.
_CLOSED: Final = BreakerState.CLOSED
_OPEN: Final = BreakerState.OPEN
_HALF_OPEN: Final = BreakerState.HALF_OPEN
_FORCED_OPEN: Final = BreakerState.FORCED_OPEN
_DISABLED: Final = BreakerState.DISABLED
_METRICS_ONLY: Final = BreakerState.METRICS_ONLY

FAILURE: Final = 0
SUCCESS: Final = 1
IGNORED: Final = 2
#: A hedged attempt cancelled because another attempt's answer won: a slow
#: call of at least its elapsed time, neither a failure nor a success.
LOST: Final = 3


def judge_error(config: BreakerConfig, exc: BaseException) -> int:
    """``FAILURE``, ``SUCCESS`` or ``IGNORED`` for an exception (not cancellation)."""
    if config.ignore_on is not None and matches(config.ignore_on, exc):
        return SUCCESS if config.ignored_counts_as == "success" else IGNORED
    return FAILURE if matches(config.failure_on, exc) else SUCCESS


class Machine:
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

    ``lock`` is a plain ``Lock``, never re-entered: what happens under it
    posts its events to ``outbox`` (in the order they happen, which the lock
    makes one order), and `deliver()` emits them after the lock is released,
    one thread at a time (``delivering``).  A subscriber may therefore read,
    call, reset or force the breaker it hears from: the events its use posts
    are delivered after its own returns, by the thread already delivering.
    """

    __slots__ = (
        "bus",
        "config",
        "consecutive",
        "delivering",
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
        "outbox",
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
        self.lock = threading.Lock()
        self.outbox: list[Event] = []
        self.delivering = False
        self.rng = rng or _RNG
        self.config = config
        self.state = _CLOSED
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
        self.refresh_fast()

    def listening(self, kind: type[Event] | None = None) -> bool:
        """Whether an event (of ``kind``, if given) on this breaker's bus reaches anyone."""
        if not (global_bus.active or self.bus.active):
            return False
        return kind is None or listening(self.bus, kind)

    def deliver(self) -> None:
        """Emit the events posted under the lock, in order; call it after releasing the lock.

        One thread delivers at a time: another thread's events posted
        meanwhile, and those a subscriber's own use of the breaker posts,
        are delivered by the thread already delivering, after the event in
        hand, so every subscriber sees them in the order they happened and
        none waits for a lock held around a subscriber.
        """
        lock = self.lock
        with lock:
            batch = self.outbox
            if self.delivering or not batch:
                return  # the delivering thread takes these too (or another did)
            self.outbox = []
            self.delivering = True
        bus = self.bus
        done = 0
        try:
            while True:
                for event in batch:
                    done += 1
                    emit(event, bus)
                with lock:
                    batch = self.outbox
                    if not batch:
                        self.delivering = False
                        return
                    self.outbox = []
                    done = 0
        except BaseException:
            # A subscriber raised what emit() lets through (an interrupt):
            # the events after the one in hand stay first in line.
            with lock:
                self.outbox[:0] = batch[done:]
                self.delivering = False
            raise

    # -- configuration ---------------------------------------------------------
    def configure(self, config: BreakerConfig) -> None:
        with self.lock:
            old = self.config
            self.config = config
            if old.window_shape() != config.window_shape():
                self.window = config.new_window()
            if old.trip_policy is not config.trip_policy:
                self.policy = config.trip_policy() if config.trip_policy is not None else None
            self.refresh_fast()

    def refresh_fast(self) -> None:
        closed = self.state is _CLOSED and self.local_only
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
        if new is _HALF_OPEN:
            self._start_half_open(now)
        elif new is not _OPEN:
            self._clear_counts()
            if new is not _FORCED_OPEN:
                self.reopenings = 0
        self.refresh_fast()
        if self.listening(BreakerStateChanged):
            self.outbox.append(
                BreakerStateChanged(
                    operation=self.name, at=now, from_state=old, to_state=new, reason=reason
                )
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
        self._to(_OPEN, reason, now)

    def _half_open_expired(self, now: float) -> None:
        # Probes are still out after the time limit: decide without them.  The
        # open period runs from the limit, not from whenever someone looked.
        if self.probes_ok and self.config.half_open_decision == "first_failure":
            self._to(_CLOSED, "half_open_timeout", now)
        else:
            self._open(now, "probe_timeout", None, since=self.half_open_until)

    def _settle_time(self, now: float) -> None:
        """Apply the transitions that only time makes (open elapsed, half-open expired)."""
        if self.state is _HALF_OPEN and now >= self.half_open_until:
            self._half_open_expired(now)
        if self.state is _OPEN and now >= self.open_until:
            self._to(_HALF_OPEN, "open_elapsed", now)

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
            if state is _OPEN:
                self.open_until = now + remaining
            elif state is _HALF_OPEN:
                self._start_half_open(now)
            self.refresh_fast()

    def count_rejection(self) -> None:
        """A shared store's link refused a call."""
        with self.lock:
            self.rejected += 1

    def force(self, new: BreakerState, reason: str) -> None:
        with self.lock:
            self._to(new, reason, clock.now())
        if self.outbox:
            self.deliver()

    # -- admission -----------------------------------------------------------------
    def admit(self) -> tuple[int, bool]:
        """``(generation, is_probe)`` of a granted call; raises CircuitOpenError otherwise."""
        granted = self.admission()
        if isinstance(granted, float):
            raise CircuitOpenError(self.name, granted)
        return granted

    def admission(self) -> tuple[int, bool] | float:
        """`admit()` that returns a refusal: the seconds until the breaker may admit.

        The faces raise ``CircuitOpenError(name, seconds)`` themselves: every
        frame an exception leaves adds a traceback entry (and makes its frame
        an object), which a refused call pays for.  They hold the seconds,
        not the error: a frame that held the error its traceback holds would
        make a reference cycle, left to the garbage collector.
        """
        state = self.state
        if state in PASSING_STATES:
            return self.gen, False
        with self.lock:
            now = clock.now()
            state = self.state
            if (state is _OPEN and now >= self.open_until) or (
                state is _HALF_OPEN and now >= self.half_open_until
            ):
                self._settle_time(now)
                state = self.state
            if state in PASSING_STATES:
                granted = True
                probe = False
            elif state is _HALF_OPEN and self.probes_issued < self.config.half_open_permits:
                self.probes_issued += 1
                granted = probe = True
            else:
                granted = False
                # `_remaining()`, inlined for the usual refusal (open: its time is not up).
                remaining = self.open_until - now if state is _OPEN else self._remaining(now)
                self.rejected += 1
                # `self.listening()` inlined: a refusal is a hot path of its own.
                if (global_bus.active or self.bus.active) and listening(self.bus, CallRejected):
                    self.outbox.append(
                        CallRejected(operation=self.name, at=now, state=state, remaining=remaining)
                    )
            gen = self.gen
        if self.outbox:
            self.deliver()
        if granted:
            return gen, probe
        return remaining

    def _remaining(self, now: float) -> float:
        state = self.state
        if state is _OPEN:
            left = self.open_until - now
            return left if left > 0.0 else 0.0
        if state is _FORCED_OPEN:
            return math.inf
        if state is _HALF_OPEN:
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
            remaining = self._remaining(now)
        if self.outbox:
            self.deliver()
        return remaining

    def current_state(self) -> BreakerState:
        state = self.state
        if state in PASSING_STATES or state is _FORCED_OPEN:
            return state
        with self.lock:
            self._settle_time(clock.now())
            state = self.state
        if self.outbox:
            self.deliver()
        return state

    def state_unless_busy(self) -> BreakerState | None:
        """The state now, or None while another thread holds the lock; never waits, never emits.

        For a caller holding a lock of its own that a subscriber may take (a
        registry): nothing changes and no event is posted.  A transition that
        time has made due is reported, not applied: an open breaker whose time
        is up reads HALF_OPEN; a half-open one past its time limit reads
        CLOSED when it would close (a probe succeeded, ``first_failure``),
        else OPEN (it may read HALF_OPEN again once applied, when the open
        period that follows has passed too).
        """
        state = self.state
        if state in PASSING_STATES or state is _FORCED_OPEN:
            return state
        lock = self.lock
        if not lock.acquire(blocking=False):
            return None
        try:
            state = self.state
            now = clock.now()
            if state is _HALF_OPEN and now >= self.half_open_until:
                closes = self.probes_ok and self.config.half_open_decision == "first_failure"
                return _CLOSED if closes else _OPEN
            if state is _OPEN and now >= self.open_until:
                return _HALF_OPEN
            return state
        finally:
            lock.release()

    # -- outcomes ------------------------------------------------------------------
    def release(self, gen: int, probe: bool) -> None:
        """A granted call ended without an outcome (cancelled, ignored): free its probe."""
        if not probe:
            return
        with self.lock:
            if gen == self.gen and self.state is _HALF_OPEN and self.probes_issued:
                self.probes_issued -= 1

    def reset_consecutive(self, gen: int) -> None:
        """A fast-path success of generation ``gen`` while failures were counted."""
        with self.lock:
            if gen == self.gen and self.state is _CLOSED:
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
        does, such as the router's grant seam, returns at once on ``settled``
        without the lock: a failure recorded meanwhile is ordered after this success).
        """
        if self.settled:
            return
        with self.lock:
            if not self.plain or gen != self.gen:  # ``plain``: closed (it changes under the lock)
                plain = False
            else:
                self.consecutive = 0
                # CountWindow.add(False, False, now), inlined; a success that
                # replaces a success (the usual case) leaves the ring alone.
                window: CountWindow = self.window  # type: ignore[assignment]
                ring = window.ring
                i = window.pos
                old = ring[i]
                if old != 4:
                    if old:  # the slot held a failed or slow call
                        window.failures -= old & 1
                        window.slow -= (old & 2) >> 1
                    else:
                        window.calls += 1
                    ring[i] = 4
                i += 1
                window.pos = 0 if i == window.size else i
                if window.failures or window.slow:
                    if self.judged and (old or window.calls != self.config.minimum_calls):
                        # The rates are no higher than when they were last judged
                        # (no verdict): the same calls with fewer failed or slow,
                        # or one more call above ``minimum_calls``.
                        return
                else:
                    self.shadow_tripped = False  # what `_conclude()` does with no verdict
                    self.settled = window.calls == window.size
                    self.judged = True
                    return
                now = clock.now()
                reason = self._judge(now, False)
                self._conclude(now, _CLOSED, reason, None)
                self.judged = reason is None
                plain = True
        if not plain:
            self.record(gen, False, False, False, None, None)
        elif self.outbox:
            self.deliver()

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
        A late outcome changes nothing, not even a transition time has made.
        """
        with self.lock:
            self._record(gen, probe, failed, slow, duration, hint)
        if self.outbox:
            self.deliver()

    def _record(
        self,
        gen: int,
        probe: bool,
        failed: bool,
        slow: bool,
        duration: float | None,
        hint: float | None,
    ) -> None:
        # `record()` under the lock.
        if gen != self.gen and gen != -1:
            return  # late: granted in an earlier period (checked again below)
        now = clock.now()
        state = self.state
        if state is _OPEN or state is _HALF_OPEN:
            self._settle_time(now)  # a half-open past its time limit decides first
            state = self.state
        if gen == -1:
            if state is not _CLOSED:
                return
        elif gen != self.gen:
            return  # late: granted in an earlier period
        config = self.config
        if state is _HALF_OPEN:
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
                    self._to(_CLOSED, "probes_succeeded", now)
            return
        if state is not _CLOSED and state is not _METRICS_ONLY:
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
        if state is _METRICS_ONLY:
            # Shadow mode keeps every count (the snapshot shows the real
            # rates) and reports a would-be trip once, when the criterion
            # starts to hold; again only after it stopped holding.
            if not self.shadow_tripped:
                self.shadow_tripped = True
                if self.listening(ShadowTrip):
                    self.outbox.append(ShadowTrip(operation=self.name, at=now, reason=reason))
            return
        self._open(now, reason, hint)

    def record_lost(self, gen: int, probe: bool, duration: float | None) -> None:
        """Record a hedge that lost its race while still running (granted in ``gen``).

        It is a slow call, neither a failure nor a success: the consecutive
        failure count stays as it is, the window counts a slow call when a
        slow-call rule judges it, a custom policy sees ``(failed=False,
        slow=True)``; a lost half-open probe re-opens the breaker under a
        slow-call rule and is freed otherwise.  A late one changes nothing.
        """
        with self.lock:
            self._record_lost(gen, probe, duration)
        if self.outbox:
            self.deliver()

    def _record_lost(self, gen: int, probe: bool, duration: float | None) -> None:
        # `record_lost()` under the lock.
        if gen != self.gen:
            return  # late: granted in an earlier period (checked again below)
        now = clock.now()
        state = self.state
        if state is _OPEN or state is _HALF_OPEN:
            self._settle_time(now)
            state = self.state
        if gen != self.gen:
            return  # late: granted in an earlier period
        config = self.config
        judged = config.slow_call_rate_threshold is not None
        if state is _HALF_OPEN:
            if not probe:
                return
            if config.half_open_decision == "rate" and judged:
                self._record_probe_rate(now, False, True)
            elif judged:
                self._open(now, "probe_failed", None)
            elif self.probes_issued:
                self.probes_issued -= 1
            return
        if state is not _CLOSED and state is not _METRICS_ONLY:
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
            self._to(_CLOSED, "probes_succeeded", now)

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
