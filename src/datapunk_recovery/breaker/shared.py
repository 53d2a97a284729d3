"""The shared breaker: one breaker's state kept in Redis for every process.

Breakers of the same name on the same
[`RedisStore`][datapunk_recovery.stores.redis.RedisStore] share one state, changed
only by the breaker's Lua script (``breaker/shared.lua``, atomic, one round
trip): the same rules as the local state machine (``breaker/machine.py``),
run server-side; ``tests/test_breaker_shared_differential.py`` proves them
equal.  The store is only the connection: the link below is built by the
breaker on it and gets the breaker's state machine, never the breaker.

The link does the rest for one breaker:

- a local read cache (``cache_ttl`` seconds; it bounds how long replicas may
  disagree);
- outcomes aggregated and sent in batches in the background (the caller never
  waits for Redis after its call; see ``flush_interval`` and ``flush_max``);
- the fallback to the local state machine when Redis is unreachable or
  answers garbage (``on_unavailable="local"``: calls keep flowing and are
  judged locally; ``"closed"``: every call is refused until Redis answers
  again, tried every ``retry_interval`` seconds).  Sharing then resumes, and
  the outcomes judged locally during the outage join the shared state (one
  batch of the current generation; see ``_BreakerLink._share_unshared``).  A
  forced state, and an open period still running, outlive the keys: the
  process holding them re-asserts them on a pristine shared state (keys
  expired, or Redis restarted empty).
"""

from __future__ import annotations

import asyncio
import json
import random
from importlib import resources
from typing import Any, Final, Protocol

from .._core import clock
from .._core.errors import CircuitOpenError
from .._core.events import emit
from .._execution import runtime as _runtime
from ..stores import SharedStore
from ..stores.redis import script_time
from .config import PASSING_STATES, BreakerConfig, BreakerState, WindowKind
from .events import (
    BreakerStateChanged,
    CallRejected,
    CorruptStateIgnored,
    OutcomesFolded,
    ShadowTrip,
    StoreFallback,
    StoreResumed,
    WriteShed,
)
from .machine import Machine

__all__ = ["BreakerLink", "bind"]

# State codes shared with the Lua script (shared.lua).
_CODES: Final = (
    BreakerState.CLOSED,
    BreakerState.OPEN,
    BreakerState.HALF_OPEN,
    BreakerState.DISABLED,
    BreakerState.FORCED_OPEN,
    BreakerState.METRICS_ONLY,
)
_CODE_OF: Final = {state: i for i, state in enumerate(_CODES)}
# States whose shared state judges outcomes of admitted calls (a batch).
_JUDGING: Final = frozenset({BreakerState.CLOSED, BreakerState.METRICS_ONLY})
# States an operator forces: kept without expiry, re-asserted by the process holding them.
_HELD: Final = frozenset(
    {BreakerState.FORCED_OPEN, BreakerState.DISABLED, BreakerState.METRICS_ONLY}
)
_REASONS: Final = frozenset(
    {
        "",
        "consecutive_failures",
        "failure_rate",
        "slow_call_rate",
        "server_delay",
        "open_elapsed",
        "probe_failed",
        "probes_succeeded",
        "half_open_timeout",
        "probe_timeout",
        "isolate",
        "reset",
        "disable",
        "metrics_only",
    }
)
_MAX_REMAINING_US: Final = 10**13  # ~116 days: anything longer is garbage
_MAX_RUNS: Final = 256  # runs in a batch before they are folded (see _BreakerLink._merge)

#: The breaker's rules run by Redis (see shared.lua for its arguments and reply).
_LUA: Final = resources.files(__package__).joinpath("shared.lua").read_text("utf-8")


class _Corrupt(Exception):
    """A reply from Redis that does not parse: treated like Redis being down."""


class _Shared:
    """The shared state as last read: plain, validated fields; times on the local clock."""

    __slots__ = (
        "calls",
        "consecutive",
        "corrupt",
        "failures",
        "free",
        "gen",
        "granted",
        "reason",
        "pristine",
        "shadow",
        "slow",
        "state",
        "until",
    )

    def __init__(self, reply: Any, now: float) -> None:
        if not isinstance(reply, list | tuple) or len(reply) != 13:
            raise _Corrupt("reply is not a 13-item array")
        ints = reply[:10]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise _Corrupt("reply fields are not non-negative integers")
        code, gen, rem_us, granted, free, consecutive, calls, failures, slow, corrupt = ints
        if code >= len(_CODES) or granted > 2 or corrupt > 2 or rem_us > _MAX_REMAINING_US:
            raise _Corrupt("reply fields out of range")
        if failures > calls or slow > calls:
            raise _Corrupt("window counts do not add up")
        reason = reply[10]
        if isinstance(reason, bytes):
            reason = reason.decode("ascii", "replace")
        if not isinstance(reason, str) or reason not in _REASONS:
            raise _Corrupt("unknown transition reason")
        if type(reply[11]) is not int or reply[11] not in (0, 1):
            raise _Corrupt("shadow trip flag is not 0 or 1")
        if type(reply[12]) is not int or reply[12] not in (0, 1):
            raise _Corrupt("pristine flag is not 0 or 1")
        self.state = _CODES[code]
        self.gen: int = gen
        #: When the open period (or the half-open time limit) ends, on the local clock.
        self.until: float = now + rem_us / 1e6
        self.granted: int = granted
        self.free: int = free
        self.consecutive: int = consecutive
        self.calls: int = calls
        self.failures: int = failures
        self.slow: int = slow
        self.reason: str = reason
        self.shadow = reply[11] == 1
        #: Made from nothing (keys expired, Redis restarted empty) and unchanged since.
        self.pristine = reply[12] == 1
        #: 0: sound; 1: did not parse, reset; 2: a period too long, shortened.
        self.corrupt = corrupt

    def current(self, now: float) -> BreakerState:
        """The state as time has moved it since the read (open -> half-open)."""
        if self.state is BreakerState.OPEN and now >= self.until:
            return BreakerState.HALF_OPEN
        return self.state

    def remaining(self, now: float, waits_forever: bool = False) -> float:
        """Seconds until it may admit; ``waits_forever``: half-open has no time limit."""
        state = self.state
        if state in PASSING_STATES:
            return 0.0
        if state is BreakerState.FORCED_OPEN:
            return float("inf")
        if state is BreakerState.OPEN or self.free <= 0:
            if state is BreakerState.HALF_OPEN and waits_forever:
                return float("inf")  # until the probes out there end
            return max(self.until - now, 0.0)
        return 0.0


def _takes_server_delays(config: BreakerConfig) -> bool:
    return config.honor_server_delay or config.result_delay is not None


def _config_json(config: BreakerConfig, key_ttl_ms: int) -> str:
    """The configuration fields the script needs, as compact JSON."""
    kinds = {WindowKind.COUNT: 0, WindowKind.TIME: 1}
    wk = kinds[config.window] if config.windowed else -1  # -1: no window kept
    return json.dumps(
        {
            "cf": config.consecutive_failures or 0,
            "fr": config.failure_rate_threshold or 0,
            "sr": config.slow_call_rate_threshold or 0,
            "wk": wk,
            "ws": config.window_size,
            "wd": config.window_duration,
            "wb": config.window_buckets,
            "mc": config.minimum_calls,
            "hp": config.half_open_permits,
            # -1: no half-open time limit (wait for the probes for ever)
            "ht": -1 if config.half_open_timeout is None else config.half_open_timeout,
            "hd": 1 if config.half_open_decision == "rate" else 0,
            "od": config.open_duration,
            "ob": config.open_backoff,
            "om": config.max_open_duration,
            "oj": config.open_jitter,
            # the longest server delay that may open it (0: it honours none)
            "sd": config.max_server_delay if _takes_server_delays(config) else 0.0,
            "kt": key_ttl_ms,
        },
        separators=(",", ":"),
    )


#: The one window key a breaker's window kind keeps beside its state.
_WINDOW_KEY: Final[dict[str, tuple[str, ...]]] = {"count": ("ring",), "time": ("win",)}


class BreakerLink(Protocol):
    """A breaker's connection to a shared store (one per breaker).

    ``allow`` returns ``(generation, is_probe, remote)``; ``remote`` False
    means the permit was granted by the breaker's local state (the store is
    down) and its outcome goes there.  ``record`` and ``release`` never wait:
    they schedule the write; ``flush`` waits for writes scheduled so far.
    Store errors never escape any of these: the link falls back instead.
    """

    async def allow(self) -> tuple[int, bool, bool]: ...

    def admitted(self) -> int | None:
        """The generation a plain call is admitted under, if known without waiting.

        ``None`` unless the state as last read admits it (closed, fresh, the store
        answering); the caller then goes through ``allow``.
        """
        ...

    def record(
        self,
        gen: int,
        probe: bool,
        failed: bool,
        slow: bool,
        duration: float | None,
        hint: float | None,
    ) -> None: ...

    def release(self, gen: int, probe: bool) -> None: ...

    def missed(self, failed: bool, slow: bool) -> None:
        """An outcome of a call judged on local state (the store was away): the
        link merges it into the shared state once the store answers again."""
        ...

    async def flush(self) -> None: ...

    async def force(self, state: BreakerState, reason: str) -> None: ...

    def state(self) -> BreakerState: ...
    def state_unless_busy(self) -> BreakerState | None: ...

    def retry_after(self) -> float: ...

    def totals(self) -> tuple[int, int, int] | None: ...

    def consecutive(self) -> int: ...


def bind(store: SharedStore, core: Machine) -> BreakerLink:
    """Share ``core``'s state through ``store``; custom trip policies cannot be shared."""
    if core.config.trip_policy is not None:
        raise TypeError(
            f"RedisStore: breaker {core.name!r} has a custom trip_policy, "
            "which lives in one process and cannot be shared"
        )
    link = _BreakerLink(store, core)
    store.attach(link)
    return link


class _BreakerLink:
    """One breaker's connection to the Redis store: cache, background writes, fallback."""

    def __init__(self, store: SharedStore, core: Machine) -> None:
        self.store = store
        self.core = core
        self.script = store.script(_LUA)
        self.rng = random.Random()
        self.cached: _Shared | None = None
        self.fetched_at = 0.0
        self.down_since: float | None = None
        self.retry_at = 0.0
        self.refreshing = False
        self.pending: set[asyncio.Task[Any]] = set()
        # The state this process forced (isolate, disable, metrics only) until
        # a reset, here or in another process: it is re-asserted on a fresh
        # shared state (keys expired, Redis restarted empty) by every round
        # trip, and by a keeper task while the breaker is forced.
        self.forced: BreakerState | None = None
        self.forced_reason = ""
        self.force_unsent = False  # forced while Redis was away: push it when it answers
        # The oldest shared generation whose outcomes count: a state forced
        # while Redis was away makes every permit Redis granted so far late.
        self.floor = -1
        self.keeper: asyncio.Task[None] | None = None
        self.stop_keeping: _runtime.AsyncioEvent | None = None
        # Outcomes of closed calls not sent yet, as runs [code, count] in order
        # (code: 1 failed + 2 slow), all of generation batch_gen, judged here
        # under batch_config; one send in flight at a time (sending), started
        # by a timer or at once.  Batches of an earlier configuration (a
        # reload) wait behind it in sealed, to be judged in Redis as here.
        self.batch: list[list[int]] = []
        self.batch_gen = -1
        self.batch_config = core.config
        self.batch_n = self.batch_failed = self.batch_slow = 0
        self.sealed: list[tuple[list[list[int]], int, BreakerConfig]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.sending: asyncio.Task[None] | None = None
        # Probe results, server delays and probe releases due at once while
        # max_pending sends are in flight: sent as sends land (see _spawn).
        self.waiting: list[tuple[str, tuple[Any, ...]]] = []
        #: Of those, the ones past max_pending waiting too, kept local (see _shed).
        self.shed = 0
        # Outcomes judged locally while Redis was away, as runs: merged into the
        # shared state when it answers again (see _share_unshared).
        self.unshared: list[list[int]] = []

    def _hold(self) -> tuple[int, str]:
        """The state this process holds for a fresh shared state: (code or -1, seconds left)."""
        forced = self.forced
        if forced is not None:
            return _CODE_OF[forced], "0"
        cached = self.cached
        if cached is not None and cached.state is BreakerState.OPEN:
            left = cached.until - clock.now()
            if left > 0:
                return _CODE_OF[BreakerState.OPEN], repr(left)
        return -1, "0"

    # -- store calls --------------------------------------------------------------------
    async def op(self, config: BreakerConfig, op: str, *args: Any) -> Any:
        """Run one operation of the breaker script (one round trip); returns the raw reply."""
        store = self.store
        # only the window key this kind of window uses (see the script's KEYS)
        window = _WINDOW_KEY.get(config.window, ()) if config.windowed else ()
        keys = store.keys("breaker", self.core.name, "state", *window)
        ttl_ms = int(max(store.key_ttl, 2 * config.max_open_duration) * 1000)
        cfg = _config_json(config, ttl_ms)
        return await store.run(
            self.script, keys, [op, cfg, repr(self.rng.random()), *args, script_time()]
        )

    async def _op(self, op: str, *args: Any, config: BreakerConfig | None = None) -> _Shared | None:
        """Run ``op`` (under ``config``, else the breaker's configuration now); on
        success update the cache and return it, else fall back (None)."""
        store, core = self.store, self.core
        config = config or core.config
        hold = self._hold() if op != "force" else (-1, "0")
        try:
            reply = await self.op(config, op, *args, *hold)
            shared = _Shared(reply, clock.now())
        except _Corrupt as exc:
            if core.listening():
                emit(
                    CorruptStateIgnored(
                        operation=core.name, at=clock.now(), store=store.kind, reason=str(exc)
                    ),
                    core.bus,
                )
            self._fail("CorruptReply")
            return None
        except Exception as exc:  # any Redis trouble: never the caller's problem
            self._fail(type(exc).__name__)
            return None
        self._seen(shared)
        return shared

    def _seen(self, shared: _Shared) -> None:
        now = clock.now()
        core = self.core
        if self.down_since is not None:
            outage = now - self.down_since
            self.down_since = None
            if core.listening():
                emit(
                    StoreResumed(operation=core.name, at=now, store=self.store.kind, outage=outage),
                    core.bus,
                )
        previous = self.cached
        if previous is not None and shared.gen < previous.gen and not shared.corrupt:
            # Round trips run on several connections, so replies may come back
            # in another order than Redis ran them: a reply from an earlier
            # period must never turn the cache back (a reset says so: corrupt).
            return
        self.cached = shared
        self.fetched_at = now
        if self.unshared:
            self._share_unshared(shared)
        if (
            self.forced is not None
            and not self.force_unsent
            and shared.state is not self.forced
            and not shared.pristine
        ):
            self.forced = None  # changed elsewhere (a reset in another process): let go
        if not core.listening():
            return
        if shared.corrupt:
            emit(
                CorruptStateIgnored(
                    operation=core.name,
                    at=now,
                    store=self.store.kind,
                    reason=(
                        "shared state did not parse; reset"
                        if shared.corrupt == 1
                        else "shared open period beyond this breaker's limits; shortened"
                    ),
                ),
                core.bus,
            )
        if shared.shadow:
            emit(ShadowTrip(operation=core.name, at=now, reason=shared.reason), core.bus)
        before = previous.current(now) if previous is not None else None
        if before is not None and before is not shared.state:
            emit(
                BreakerStateChanged(
                    operation=core.name,
                    at=now,
                    from_state=before,
                    to_state=shared.state,
                    reason=shared.reason if shared.reason and not shared.shadow else "shared",
                ),
                core.bus,
            )

    def _fail(self, error_type: str) -> None:
        now = clock.now()
        self.retry_at = now + self.store.retry_interval
        if self.down_since is not None:
            return
        self.down_since = now
        cached = self.cached
        if cached is not None:  # decide locally from the last shared state
            state = cached.current(now)
            self.core.adopt(state, max(cached.until - now, 0.0))
        self._unwait()
        core = self.core
        if core.listening():
            emit(
                StoreFallback(
                    operation=core.name,
                    at=now,
                    store=self.store.kind,
                    error_type=error_type,
                    mode=self.store.on_unavailable,
                ),
                core.bus,
            )

    # -- admission -------------------------------------------------------------------------
    async def allow(self) -> tuple[int, bool, bool]:
        if _runtime.async_library() != "asyncio":
            raise TypeError(
                f"RedisStore: breaker {self.core.name!r} shares its state through "
                "redis.asyncio, which runs under asyncio only"
            )
        now = clock.now()
        if self.down_since is not None:
            # One task at a time tries the store again; the others decide locally.
            if now < self.retry_at or self.refreshing or await self._refresh() is None:
                return self._fallback_allow()
        elif self.cached is None or now - self.fetched_at >= self.store.cache_ttl:
            if self.refreshing:  # someone is already reading: use what we have
                if self.cached is None:
                    return self._before_first_read()
            elif await self._refresh() is None:
                return self._fallback_allow()
        shared = self.cached
        assert shared is not None
        now = clock.now()
        state = shared.current(now)
        if state in PASSING_STATES:
            return shared.gen, False, True
        if (
            state is BreakerState.FORCED_OPEN
            or (state is BreakerState.OPEN and now < shared.until)
            or (shared.state is BreakerState.HALF_OPEN and shared.free <= 0)
        ):
            # Refused on the cached state: no round trip while every probe is out.
            self._reject(state, shared.remaining(now, self._waits_forever()), now)
        got = await self._acquire()
        if got is None:
            return self._fallback_allow()
        if got.granted:
            return got.gen, got.granted == 2, True
        now = clock.now()
        self._reject(got.state, got.remaining(now, self._waits_forever()), now)
        raise AssertionError("unreachable")  # pragma: no cover

    def admitted(self) -> int | None:
        """The shared generation, when the state as last read admits a call at once.

        Closed, read less than ``cache_ttl`` ago, Redis answering: the call
        needs no round trip and no permit (the breaker's quick shared path).
        """
        cached = self.cached
        if (
            cached is None
            or cached.state is not BreakerState.CLOSED
            or self.down_since is not None
            or clock.now() - self.fetched_at >= self.store.cache_ttl
            or _runtime.async_library() != "asyncio"
        ):
            return None
        return cached.gen

    async def _acquire(self) -> _Shared | None:
        """The acquire round trip.  A caller cancelled meanwhile gives back the probe
        the script may have granted it, once the reply lands (within ``timeout``):
        otherwise that probe would be out for every process until the half-open
        time limit."""
        task = _runtime.spawn(self._op("acquire"))
        try:
            return await _runtime.shield(task)
        except BaseException:
            self.pending.add(task)
            task.add_done_callback(self._give_back)  # (runs soon if already done)
            raise

    def _give_back(self, task: asyncio.Task[_Shared | None]) -> None:
        self._done(task)
        if task.cancelled() or task.exception() is not None:
            return
        got = task.result()
        if got is not None and got.granted == 2:
            self._spawn("release", got.gen, 1)

    def _before_first_read(self) -> tuple[int, bool, bool]:
        """Admit a caller that arrives while the first read is in flight, on local state.

        It does not wait for that read (a start-up burst would each wait a
        round trip, or up to ``timeout`` on a busy loop): it decides on this
        process's own breaker, as the shared state is unknown yet, and its
        outcome is kept (`missed`) and merged into the shared state with the
        read's reply.  No fallback: Redis is not known to be away.
        """
        gen, probe = self.core.admit()
        return gen, probe, False

    async def _refresh(self) -> _Shared | None:
        self.refreshing = True
        try:
            # The read waits for this process's own writes: its batch (whose
            # send returns the shared state, so it is the read: no extra round
            # trip), and its probe results and releases, sent at once in tasks
            # of their own, which the read would otherwise overtake (a call
            # refused on a state this process already changed).
            if self.batch:
                self._kick()
            sending = self.sending
            writes = [task for task in self.pending if not task.done()]
            if writes:
                await _runtime.wait_tasks(writes, 2 * self.store.timeout)
                if (
                    sending is not None
                    and writes == [sending]
                    and sending.done()
                    and self.down_since is None
                    and self.cached is not None
                ):
                    return self.cached
            return await self._op("read")
        finally:
            self.refreshing = False

    def _fallback_allow(self) -> tuple[int, bool, bool]:
        if self.store.on_unavailable == "closed":
            now = clock.now()
            self._reject(BreakerState.FORCED_OPEN, max(self.retry_at - now, 0.0), now)
        gen, probe = self.core.admit()
        return gen, probe, False

    def _reject(self, state: BreakerState, remaining: float, now: float) -> None:
        core = self.core
        core.count_rejection()
        if core.listening():
            emit(
                CallRejected(operation=core.name, at=now, state=state, remaining=remaining),
                core.bus,
            )
        raise CircuitOpenError(core.name, remaining)

    # -- outcomes --------------------------------------------------------------------------
    def _spawn(self, op: str, *args: Any) -> bool:
        if self.down_since is not None or self.store.closed:
            return False
        if _runtime.running_loop() is None:
            return False
        if len(self.pending) >= self.store.max_pending:
            # Not shed: it waits for a send to land (in order), up to as
            # many as are in flight; only past that is one kept local.
            if len(self.waiting) < self.store.max_pending:
                self.waiting.append((op, args))
                return True
            self._shed(op, args)
            return False
        task = _runtime.spawn(self._background(op, *args))
        self.pending.add(task)
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Task[Any]) -> None:
        """A send landed: the oldest write waiting for room goes now."""
        self.pending.discard(task)
        if self.waiting and self.down_since is None and not self.store.closing:
            op, args = self.waiting.pop(0)
            self._spawn(op, *args)

    def _shed(self, op: str, args: tuple[Any, ...]) -> None:
        """A write due at once found ``max_pending`` sends in flight and as many
        waiting: kept local (the caller counts it on the local state), reported."""
        what = "probe release" if op == "release" else "probe result" if args[1] else "server delay"
        self.shed += 1
        core = self.core
        if core.listening(WriteShed):
            emit(
                WriteShed(operation=core.name, at=clock.now(), store=self.store.kind, what=what),
                core.bus,
            )

    async def _background(self, op: str, *args: Any) -> None:
        await self._op(op, *args)

    def record(
        self,
        gen: int,
        probe: bool,
        failed: bool,
        slow: bool,
        duration: float | None,
        hint: float | None,
    ) -> None:
        cached = self.cached
        if (cached is not None and gen < cached.gen) or gen < self.floor:
            # Late: granted in a period the shared state has left (generations
            # only grow), or before a state forced here.  It counts nowhere, as
            # the script would judge it; in a batch it would push out the newer
            # generation's outcomes.
            return
        store = self.store
        if self.down_since is not None or store.closing or store.closed:
            # Redis is away: the outcome still counts, on the local state, and
            # reaches the shared state when Redis answers again.
            self.core.record(-1, False, failed, slow, duration, hint)
            if not probe:
                self._unshared_add(int(failed) + 2 * int(slow), 1)
            return
        if probe or hint is not None:
            # a probe result or a server delay is a transition: sent at once
            args = (gen, int(probe), int(failed), int(slow), -1.0 if hint is None else hint)
            if not self._spawn("record", *args):
                self.core.record(-1, False, failed, slow, duration, hint)
            return
        code = int(failed) + 2 * int(slow)
        if (
            code == 0
            and not self.batch
            and not self.core.config.windowed
            and cached is not None
            and cached.gen == gen
            and cached.consecutive == 0
        ):
            # Nothing new to say: without a window a success only resets the
            # consecutive count, which Redis holds at 0 as last read (a count
            # raised elsewhere meanwhile is seen with the next read, within
            # cache_ttl, and then successes are sent again).
            return
        self._add(gen, code)

    def missed(self, failed: bool, slow: bool) -> None:
        """An outcome of a call admitted on local state (Redis was away, or not read
        yet): into the batch if sharing now, else kept for when Redis answers."""
        code = int(failed) + 2 * int(slow)
        cached, store = self.cached, self.store
        if store.closing or store.closed:
            return
        if self.down_since is None and cached is not None:
            if cached.state in _JUDGING:
                self._add(cached.gen, code)
            return
        self._unshared_add(code, 1)

    def _unshared_add(self, code: int, n: int) -> None:
        """Keep outcomes judged locally while Redis is away, as runs (folded past a bound)."""
        if self.store.closing or self.store.closed:
            return
        runs = self.unshared
        if runs and runs[-1][0] == code:
            runs[-1][1] += n
        else:
            runs.append([code, n])
        if len(runs) > _MAX_RUNS:
            self.unshared = self._fold(runs)

    def _share_unshared(self, shared: _Shared) -> None:
        """Redis answers again: what was counted here meanwhile joins the shared state.

        Counts are merged as one batch of the current shared generation, judged
        outcome by outcome as they happened (so they may trip the breaker for
        every process).  A shared state that is not closed (it opened elsewhere,
        or was forced) takes no outcomes of closed calls, as the script would
        treat any outcome of an older generation.
        """
        runs, self.unshared = self.unshared, []
        if shared.state not in _JUDGING:
            return
        for code, n in runs:
            self._add(shared.gen, code, n)
        self._kick()

    def _add(self, gen: int, code: int, n: int = 1) -> None:
        """Aggregate ``n`` outcomes of closed calls; send when due (see RedisStore).

        ``gen`` is never older than the shared state as last read (`record`
        drops late outcomes), so a batch of another generation is an older one.
        """
        config = self.core.config
        if self.batch and (gen != self.batch_gen or config is not self.batch_config):
            self._kick()  # another generation or configuration: the batch so far goes now
            if self.batch and gen != self.batch_gen:  # (a send is in flight)
                self._clear_batch()
                self.sealed.clear()  # (older generations too)
            elif self.batch:  # (a send is in flight: the batch goes after it, as it was judged)
                self.sealed.append(self._take())
        self.batch_config = config
        runs = self.batch
        if runs and runs[-1][0] == code:
            runs[-1][1] += n
        else:
            runs.append([code, n])
        self.batch_gen = gen
        self.batch_n += n
        self.batch_failed += (code & 1) * n
        self.batch_slow += (code >> 1) * n
        if len(runs) > _MAX_RUNS:
            self.batch = self._fold(runs)
        store = self.store
        if self.batch_n >= store.flush_max or (code and self._would_trip()):
            self._kick()
            return
        delay = store.flush_interval if code or self.batch_failed or self.batch_slow else None
        self._arm(max(store.cache_ttl, 0.05) if delay is None else delay)

    def _clear_batch(self) -> None:
        """Empty the batch: its outcomes were counted here (`detach`), or they are of
        an older generation still waiting behind a send in flight (`_add`), which
        count for nothing in Redis (the generation moved on): dropped the way the
        script would."""
        self.batch, self.batch_n, self.batch_failed, self.batch_slow = [], 0, 0, 0

    def _fold(self, runs: list[list[int]]) -> list[list[int]]:
        """Too many runs (a send is slow to land, or Redis is away): one run per kind.

        Counts are additive, so no outcome is lost; only their order is folded
        (successes first, failures last, which never trips later than the real
        order would for the consecutive rule).  Reported: `OutcomesFolded`.
        """
        totals = [0, 0, 0, 0]
        for code, n in runs:
            totals[code] += n
        core = self.core
        if core.listening(OutcomesFolded):
            emit(
                OutcomesFolded(
                    operation=core.name,
                    at=clock.now(),
                    store=self.store.kind,
                    outcomes=sum(totals),
                    runs=len(runs),
                ),
                core.bus,
            )
        return [[code, totals[code]] for code in (0, 2, 1, 3) if totals[code]]

    def _would_trip(self) -> bool:
        """Whether the shared state as last read plus this batch may trip the breaker."""
        cached = self.cached
        if cached is None:
            return True
        config = self.core.config
        runs = self.batch
        if all(code & 1 for code, _ in runs):
            consecutive = cached.consecutive + self.batch_n
        else:
            consecutive = runs[-1][1] if runs[-1][0] & 1 else 0
        cf = config.consecutive_failures
        if cf and consecutive >= cf:
            return True
        if config.windowed:
            calls = cached.calls + self.batch_n
            if calls >= config.minimum_calls:
                fr, sr = config.failure_rate_threshold, config.slow_call_rate_threshold
                if fr and cached.failures + self.batch_failed >= fr * calls:
                    return True
                if sr and cached.slow + self.batch_slow >= sr * calls:
                    return True
        return False

    def _arm(self, delay: float) -> None:
        timer = self.timer
        if timer is not None:
            if timer.when() <= _runtime.loop_time() + delay:
                return
            timer.cancel()
        self.timer = _runtime.run_later(delay, self._kick)

    def _kick(self) -> None:
        """Send the batch now (one send in flight; one waiting is taken by it)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.batch or (self.sending is not None and not self.sending.done()):
            return
        runs, gen, config = self._take()
        task = _runtime.spawn(self._send(runs, gen, config))
        self.sending = task
        self.pending.add(task)
        task.add_done_callback(self._done)

    def _take(self) -> tuple[list[list[int]], int, BreakerConfig]:
        runs, gen, config = self.batch, self.batch_gen, self.batch_config
        self.batch, self.batch_n, self.batch_failed, self.batch_slow = [], 0, 0, 0
        return runs, gen, config

    def _next(self) -> tuple[list[list[int]], int, BreakerConfig]:
        """The batch the send in flight takes next: a sealed one first, in order."""
        return self.sealed.pop(0) if self.sealed else self._take()

    async def _send(self, runs: list[list[int]], gen: int, config: BreakerConfig) -> None:
        while runs:
            try:
                text = ",".join(f"{c}x{n}" for c, n in runs)
                got = await self._op("batch", gen, text, config=config)
            except BaseException:
                self._locally(runs)  # cancelled (the store closed): they count here
                raise
            if got is None:
                self._locally(runs)  # Redis is away: they count here
            runs, gen, config = self._next()

    def _locally(self, runs: list[list[int]]) -> None:
        """A batch Redis did not take: it counts here, and joins the shared state later."""
        record = self.core.record
        for code, n in runs:
            for _ in range(n):
                record(-1, False, bool(code & 1), bool(code & 2), None, None)
            self._unshared_add(code, n)

    def release(self, gen: int, probe: bool) -> None:
        if probe:
            self._spawn("release", gen, 1)

    async def flush(self) -> None:
        """Wait for the writes scheduled so far; at most about ``2 * timeout`` seconds.

        Writes scheduled while waiting are waited for too, within the same bound
        (a busy breaker must not keep ``aclose`` waiting for ever).
        """
        self._kick()
        deadline = _runtime.loop_time() + 2 * self.store.timeout
        while self.pending:
            left = deadline - _runtime.loop_time()
            if left <= 0:
                return
            await _runtime.wait_tasks(list(self.pending), left)

    def _unwait(self) -> None:
        """Writes still waiting for room will not be sent: results count here."""
        waiting, self.waiting = self.waiting, []
        for op, args in waiting:
            if op == "record":
                _, _, failed, slow, hint = args
                delay = hint if hint >= 0 else None
                self.core.record(-1, False, bool(failed), bool(slow), None, delay)

    def detach(self) -> None:
        """The store closed: stop what is still scheduled (each is bounded anyway)."""
        self._unwait()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for runs, _, _ in self.sealed:
            self._locally(runs)
        self.sealed.clear()
        if self.batch:
            self._locally(self.batch)
            self._clear_batch()
        for task in list(self.pending):
            task.cancel()
        self.pending.clear()
        if self.stop_keeping is not None:
            self.stop_keeping.set()
        if self.keeper is not None:
            self.keeper.cancel()

    async def force(self, state: BreakerState, reason: str) -> None:
        held = state in _HELD
        self.forced = state if held else None
        self.forced_reason = reason
        self.force_unsent = False
        if await self._op("force", _CODE_OF[state], reason) is None:
            self.core.force(state, reason)  # at least this process obeys
            self.force_unsent = True  # and Redis learns it when it answers again
            if self.cached is not None:
                self.floor = self.cached.gen + 1
        if held or self.force_unsent:
            self._keep()

    def _keep(self) -> None:
        """Start the keeper task (one per link, owned; ended by detach)."""
        if self.keeper is not None and not self.keeper.done():
            return
        self.stop_keeping = _runtime.AsyncioEvent()
        self.keeper = _runtime.spawn(
            self._keeping(self.stop_keeping), name=f"datapunk-breaker-keeper:{self.core.name}"
        )

    async def _keeping(self, stop: _runtime.AsyncioEvent) -> None:
        """While this process holds a forced state: re-read it (re-asserting it on a
        fresh shared state) every ``cache_ttl`` seconds (at least 0.05), and push a
        force made while Redis was away once it answers.  Every step is bounded
        by the store's ``timeout``."""
        interval = max(self.store.cache_ttl, 0.05)
        while (self.forced is not None or self.force_unsent) and not self.store.closing:
            await _runtime.wait_event(stop, interval)
            if stop.is_set() or self.store.closing:
                return
            if self.force_unsent:
                state = self.forced or BreakerState.CLOSED
                if await self._op("force", _CODE_OF[state], self.forced_reason) is not None:
                    self.force_unsent = False
            elif self.forced is not None:
                await self._op("read")

    # -- inspection ------------------------------------------------------------------------
    def _waits_forever(self) -> bool:
        return self.core.config.half_open_timeout is None

    def _refusing(self) -> bool:
        return self.down_since is not None and self.store.on_unavailable == "closed"

    def state(self) -> BreakerState:
        if self._refusing():
            return BreakerState.FORCED_OPEN
        if self.down_since is not None or self.cached is None:
            return self.core.current_state()
        return self.cached.current(clock.now())

    def state_unless_busy(self) -> BreakerState | None:
        """`state()` that never waits for the local machine's lock (see the breaker's)."""
        if self._refusing():
            return BreakerState.FORCED_OPEN
        if self.down_since is not None or self.cached is None:
            return self.core.state_unless_busy()
        return self.cached.current(clock.now())

    def retry_after(self) -> float:
        if self._refusing():
            return max(self.retry_at - clock.now(), 0.0)
        if self.down_since is not None or self.cached is None:
            return self.core.retry_after()
        return self.cached.remaining(clock.now(), self._waits_forever())

    def totals(self) -> tuple[int, int, int] | None:
        if not self.core.config.windowed:
            return None
        if self.down_since is not None or self.cached is None:
            return self.core.totals()
        c = self.cached
        return c.calls, c.failures, c.slow

    def consecutive(self) -> int:
        if self.down_since is not None or self.cached is None:
            return self.core.consecutive
        return self.cached.consecutive
