"""Retry budgets shared between processes through the Redis store.

A retry budget bounds the extra load retries add when a dependency fails for
everyone; with many replicas, each holding its own budget, that bound is
multiplied by the number of replicas.
[`SharedBudget`][datapunk_recovery.stores.budget_redis.SharedBudget] wraps a
[`TokenBudget`][datapunk_recovery.budget.TokenBudget] or a
[`RatioBudget`][datapunk_recovery.budget.RatioBudget] so that every process using
the same [`RedisStore`][datapunk_recovery.stores.redis.RedisStore] and budget name
works on one budget.

**Deciding stays local and instant.**  The retry engine calls
``on_attempt`` / ``allow_retry`` synchronously on its failure path, so those
never touch Redis: they update and read the wrapped budget, in this process,
as without sharing.  A background task (one per shared budget, started with
the service) *syncs*: it sends what this process counted since the last sync
and reads back the shared state, which the local budget then adopts (plus
what was counted during the round trip).  It syncs at start, then every
``sync_interval`` seconds while the budget is used (an outcome counted or a
retry asked for since the last sync started), and at once when
``max_unsynced`` failures (token budget) or granted retries (ratio budget)
are waiting: successes and plain attempts never hurry a sync, so a busy
service sends one command per ``sync_interval``, and an unused budget none
(its first use wakes a sync at once).

**The lag bound.**  An outcome counted in one process reaches Redis with the
first sync that process *starts* after counting it, and reaches another
process with the first sync *that* process starts after it is in Redis.  A
process using its budget starts a sync at most ``sync_interval`` after its
previous one ended (at once when ``max_unsynced`` spending outcomes wait), and
a sync lasts at most the store's ``timeout``; so an outcome governs the
decisions of every other process using its budget within
``2 * sync_interval + 4 * store.timeout`` seconds at worst (plus event-loop
delays), typically ``2 * sync_interval`` plus two round trips.  A process
that idled syncs at its first use; until that sync lands (at most
``timeout``) it decides on the shared state it held when it went idle.

**One Lua script per budget kind, one round trip per sync.**  The script
applies the batch with the budget's own arithmetic and returns the shared
state:

- token bucket: ``{prefix}:{budget:<name>}:tokens`` (a hash; ``t`` is the
  fill, a decimal string).  A batch applies its net change (successes times
  ``token_ratio``, minus failures), clamped to ``[0, max_tokens]`` once: the
  order of its outcomes is unknown, and applying all its successes first
  would clamp them away at a full bucket, so a long batch of calls that each
  failed once then succeeded (resent after an outage) would drain the bucket
  by its length although the calls never did.
- ratio window: ``{prefix}:{budget:<name>}:ratio`` (a hash of bucketed
  counters ``e<i>`` epoch, ``a<i>`` attempts, ``r<i>`` retries, and ``z`` the
  window's shape), on Redis's own clock (``TIME``), so replicas agree on
  which bucket is current (on an installed fake clock's time, in tests).  A
  batch lands in the bucket current when it arrives.  A window of another
  shape (the sender's budget was re-configured) starts again from the
  sender's counts, as a missing one does: a reload never empties it.  The local window
  adopts the shared buckets by age (within one bucket of the others, since
  local clocks differ).
- ``{prefix}:{budget:<name>}:link:<id>``: per process, the cumulative counts
  already applied.  A batch says which cumulative counts it covers, so a sync
  whose reply was lost (timeout, cancellation) is resent by the next one and
  applied once, never twice, never lost.

All keys of one budget share the hash tag ``{budget:<name>}`` (one Redis
Cluster slot) and every write renews their TTL (the store's ``key_ttl``; for
a ratio budget at least twice its window).  Fields are plain numbers,
validated by the script on every read: a value that does not parse (or a key
of the wrong type) is dropped, the state starts afresh (a full bucket, an
empty window) and [`BudgetCorruptStateIgnored`][datapunk_recovery.budget.BudgetCorruptStateIgnored]
is emitted.  Python
validates the reply again; a reply that does not parse is treated like Redis
being down.

**Redis away.**  A failing sync (error, or no answer within the store's
``timeout``) switches the budget to local decisions from the last shared
state it adopted (``on_unavailable="local"``, the default, taken from the
store) or refuses every retry (``"closed"``) and emits
[`BudgetStoreFallback`][datapunk_recovery.budget.BudgetStoreFallback].  Redis is tried again every
``store.retry_interval`` seconds; when it answers, the budget adopts the
shared state again ([`BudgetStoreResumed`][datapunk_recovery.budget.BudgetStoreResumed]).  Every
sync sends what
was counted since the last batch Redis acknowledged, so outcomes counted while
Redis was away (and a batch whose sync failed or timed out) are merged into
the shared state when it answers again, never overwritten by it; the link key
makes a batch that did land count once.  A shared state found missing (its
keys expired, or Redis restarted empty) starts from the syncing process's own
budget (its fill, or its window's counts in the current bucket), so an empty
restart never refills a budget this process saw drained.
Redis errors never reach a caller: only the background task talks to Redis.

Async only, asyncio only (redis.asyncio):
[`SharedBudget.start()`][datapunk_recovery.budget.shared.SharedBudget.start] needs a
running asyncio loop and a sync ``with`` raises ``TypeError``.  The budget
itself may be used from any thread (a sync retry in a worker thread, say)
while the loop syncs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Literal

from .._core import clock
from .._core.events import EventBus, emit, listening
from .._core.validate import check_count, check_seconds, shown
from .._execution import runtime as _runtime
from ..stores.redis import RedisStore, script_time
from . import (
    BudgetCorruptStateIgnored,
    BudgetStoreFallback,
    BudgetStoreResumed,
    RatioBudget,
    TokenBudget,
    current_criticality,
)
from .events import report_refused

__all__ = [
    "BudgetCorruptStateIgnored",
    "BudgetStoreFallback",
    "BudgetStoreResumed",
    "SharedBudget",
    "bind_budget",
]

_OWNER: Final = "SharedBudget"
#: Ratio windows with more buckets than this are not shared (the reply holds them all).
MAX_SHARED_BUCKETS: Final = 1000


# ---------------------------------------------------------------------------
# Lua

# Shared by both scripts: validation helpers, and a key of the wrong type is
# dropped (a GET-able string planted at a hash key would fail every HGET):
# found by the command itself failing (WRONGTYPE), not by a TYPE before it.
_LUA_COMMON: Final = r"""
local corrupt = ''
local function num(x)
  local n = tonumber(x)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return nil end
  return n
end
local function count(x)
  local n = num(x)
  if n == nil or n < 0 or n ~= math.floor(n) then return nil end
  return n
end
-- A hash command on k; a key of another type is dropped (and reported) and
-- the command runs again on the now empty key.  Other errors are raised.
local function hcall(what, cmd, k, ...)
  local r = redis.pcall(cmd, k, ...)
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'WRONGTYPE', 1, true) == nil then error(r.err) end
    redis.call('DEL', k)
    corrupt = what .. ' key is not a hash'
    r = redis.call(cmd, k, ...)
  end
  return r
end
-- What this link applied so far (cumulative counts); a batch covers
-- (from, to], so a batch resent after a lost reply is applied once.  The
-- link never holds more than its process sent (to): a count beyond that
-- would silently swallow every later batch.
local function applied(linkk, fx, fy, tx, ty)
  local l = hcall('link', 'HMGET', linkk, 'x', 'y')
  if l[1] == false and l[2] == false then return fx, fy end
  local x, y = count(l[1]), count(l[2])
  if x == nil or y == nil then
    corrupt = 'link counts do not parse'
    return fx, fy
  end
  if x > tx or y > ty then
    corrupt = 'link counts exceed what was sent'
    return fx, fy
  end
  return math.max(x, fx), math.max(y, fy)
end
local function save_link(linkk, x, y, ttl)
  hcall('link', 'HSET', linkk, 'x', string.format('%.0f', x), 'y', string.format('%.0f', y))
  redis.call('PEXPIRE', linkk, ttl)
end
"""

# KEYS: state, link.  ARGV: max_tokens, token_ratio, ttl_ms, then the batch as
# cumulative counts: successes from, to, failures from, to; last, the sender's
# local fill, which already counts the batch: a bucket found missing (expired,
# or lost with an empty restart) starts from it, not full.
# Reply: {tokens as a decimal string, corrupt reason or ""}.
_TOKENS_LUA: Final = (
    _LUA_COMMON
    + r"""
local key, linkk = KEYS[1], KEYS[2]
local top, ratio, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local sf, st, ff, ft = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local here = num(ARGV[8])
local tokens = top
local raw = hcall('state', 'HGET', key, 't')
local news = st > sf or ft > ff
local ls, lf = sf, ff
local save = false  -- whether the link must learn what this batch applied
if raw then
  local t = num(raw)
  if t == nil or t < 0 then
    corrupt = 'tokens do not parse'
    raw = false
  else
    tokens = math.min(t, top)
  end
  if news then ls, lf = applied(linkk, sf, ff, st, ft) end
elseif here ~= nil and here >= 0 and corrupt == '' then
  -- No bucket: start from what the sender holds (its batch included).
  tokens, ls, lf, save = math.min(here, top), st, ft, news
elseif news then
  ls, lf = applied(linkk, sf, ff, st, ft)
end
-- The batch's net change, clamped once: its order is unknown, and all its
-- successes before all its failures would clamp away the successes of a
-- batch sent to a full bucket (a long balanced batch would drain it).
local gain, loss = 0, 0
if st > ls then gain = (st - ls) * ratio; ls = st; save = true end
if ft > lf then loss = ft - lf; lf = ft; save = true end
tokens = math.min(math.max(tokens + gain - loss, 0), top)
local out = string.format('%.17g', tokens)
-- Only what changed is written (a sync with nothing new only renews the expiry).
if out ~= raw then hcall('state', 'HSET', key, 't', out) end
redis.call('PEXPIRE', key, ttl)
if save then save_link(linkk, ls, lf, ttl) end
return {out, corrupt}
"""
)

# KEYS: window, link.  ARGV: buckets, bucket width (microseconds), ttl_ms,
# then the batch: attempts from, to, granted retries from, to; last, the
# attempts and retries the sender's window holds (its batch included): a
# window found missing (expired, or lost with an empty restart) starts from
# them, in the current bucket, not empty; last, the time of an installed fake
# clock ('' for Redis's ``TIME``, see ``stores.redis.script_time``).
# Reply: {corrupt reason or "", attempts, retries of the current bucket, of
# the one before, ... (buckets pairs, newest first)}.
_RATIO_LUA: Final = (
    "pcall(redis.replicate_commands)\n"
    + _LUA_COMMON
    + r"""
local key, linkk = KEYS[1], KEYS[2]
local n, width, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local af, at, rf, rt = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ha, hr = count(ARGV[8]), count(ARGV[9])
-- ARGV[10]: the time (seconds) of a fake clock installed in the caller
-- (tests, simulations), or '' for Redis's own clock.
local us = tonumber(ARGV[10])
if us == nil then
  local time = redis.call('TIME')
  us = tonumber(time[1]) * 1000000 + tonumber(time[2])
else
  us = us * 1000000
end
local epoch = math.floor(us / width)
local shape = string.format('%d:%.0f', n, width)
local h = {}
local flat = hcall('window', 'HGETALL', key)
for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
if h.z ~= nil and h.z ~= shape then
  -- Another window shape (the sender was re-configured): start again from
  -- the sender's counts, as for a missing window, so that a reload never
  -- hands out a fresh allowance (the local budget keeps its counts).
  redis.call('DEL', key)
  h, flat = {}, {}
end
local E, A, R = {}, {}, {}
local bad = false
for i = 0, n - 1 do
  local e, a, r = h['e' .. i], h['a' .. i], h['r' .. i]
  if e == nil and a == nil and r == nil then
    E[i], A[i], R[i] = -1, 0, 0
  else
    E[i], A[i], R[i] = count(e), count(a), count(r)
    if E[i] == nil or A[i] == nil or R[i] == nil then bad = true end
  end
end
if bad then
  corrupt = 'window counts do not parse'
  redis.call('DEL', key)
  for i = 0, n - 1 do E[i], A[i], R[i] = -1, 0, 0 end
end
local idx = epoch % n
if E[idx] ~= epoch then E[idx], A[idx], R[idx] = epoch, 0, 0 end
local la, lr
if #flat == 0 and ha ~= nil and hr ~= nil and corrupt == '' then
  -- No window: start from what the sender counted (its batch included).
  A[idx], R[idx], la, lr = ha, hr, at, rt
else
  la, lr = applied(linkk, af, rf, at, rt)
end
if at > la then A[idx] = A[idx] + (at - la); la = at end
if rt > lr then R[idx] = R[idx] + (rt - lr); lr = rt end
redis.call('HSET', key, 'z', shape, 'e' .. idx, string.format('%.0f', epoch),
           'a' .. idx, string.format('%.0f', A[idx]), 'r' .. idx, string.format('%.0f', R[idx]))
redis.call('PEXPIRE', key, ttl)
save_link(linkk, la, lr, ttl)
local out = {corrupt}
for age = 0, n - 1 do
  local i = (epoch - age) % n
  if E[i] == epoch - age then
    out[#out + 1] = A[i]
    out[#out + 1] = R[i]
  else
    out[#out + 1] = 0
    out[#out + 1] = 0
  end
end
return out
"""
)

_REASONS: Final = frozenset(
    {
        "",
        "state key is not a hash",
        "window key is not a hash",
        "link key is not a hash",
        "tokens do not parse",
        "window counts do not parse",
        "link counts do not parse",
        "link counts exceed what was sent",
    }
)


class _Corrupt(Exception):
    """A reply that does not parse: treated like Redis being down."""


def _reason(raw: Any) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if raw not in _REASONS:
        raise _Corrupt("unknown corruption reason")
    reason: str = raw
    return reason


def _parse_tokens(reply: Any) -> tuple[float, str]:
    if not isinstance(reply, list | tuple) or len(reply) != 2:
        raise _Corrupt("reply is not a 2-item array")
    raw = reply[0]
    if not isinstance(raw, bytes | str):
        raise _Corrupt("tokens are not a string")
    try:
        tokens = float(raw)
    except ValueError:
        raise _Corrupt("tokens do not parse") from None
    if not math.isfinite(tokens) or tokens < 0.0:
        raise _Corrupt("tokens out of range")
    return tokens, _reason(reply[1])


def _parse_window(reply: Any, n: int) -> tuple[list[tuple[int, int]], str]:
    if not isinstance(reply, list | tuple) or len(reply) != 1 + 2 * n:
        raise _Corrupt(f"reply is not a {1 + 2 * n}-item array")
    counts = reply[1:]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
        raise _Corrupt("window counts are not non-negative integers")
    window = [(counts[2 * k], counts[2 * k + 1]) for k in range(n)]
    return window, _reason(reply[0])


# ---------------------------------------------------------------------------
# the shared budget


class SharedBudget:
    """A retry budget shared through a `RedisStore`; a `RetryGate`.

    ``budget`` is a [`TokenBudget`][datapunk_recovery.budget.TokenBudget] or
    [`RatioBudget`][datapunk_recovery.budget.RatioBudget]: it decides
    every retry, here, at once; it keeps its name, configuration and bus (its
    events are this budget's events).  Processes share a budget when they
    use the same store (Redis and ``prefix``), budget kind and name; they
    should use the same configuration too (each sync applies the sender's,
    as it is at that sync: a hot reload re-configures the wrapped budget in
    place).

    Settings, in seconds: ``sync_interval`` (default 0.2) between syncs;
    ``max_unsynced`` failures (token budget) or granted retries (ratio budget)
    waiting make the next sync start at once (default 32); ``on_unavailable``
    overrides the store's (``"local"``: decide locally while Redis is away;
    ``"closed"``: refuse every retry).
    The store's ``timeout``, ``retry_interval``, ``key_ttl`` and ``prefix``
    apply.  See the module documentation for the lag bound.

    Start it with the service and stop it with it::

        async with SharedBudget(TokenBudget("inventory"), store) as budget:
            pipeline = Pipeline("inventory", budget=budget, ...)

    or ``budget.start()`` (in a running asyncio loop) and ``await
    budget.aclose()``.  Until it is started, and after it is closed, it
    decides alone, as the wrapped budget would.
    """

    def __init__(
        self,
        budget: TokenBudget | RatioBudget,
        store: RedisStore,
        *,
        sync_interval: float = 0.2,
        max_unsynced: int = 32,
        on_unavailable: Literal["local", "closed"] | None = None,
    ) -> None:
        if not isinstance(budget, TokenBudget | RatioBudget):
            raise TypeError(
                f"{_OWNER}.budget: expected a TokenBudget or RatioBudget, got {shown(budget)}"
            )
        if not isinstance(store, RedisStore):
            raise TypeError(
                f"{_OWNER}.store: expected a RedisStore, got {shown(store)} (budgets in one "
                "process are shared by sharing the budget object)"
            )
        self.budget = budget
        self.store = store
        self.name = budget.name
        self.sync_interval = check_seconds(_OWNER, "sync_interval", sync_interval, positive=True)
        self.max_unsynced = check_count(_OWNER, "max_unsynced", max_unsynced)
        mode = store.on_unavailable if on_unavailable is None else on_unavailable
        if mode not in ("local", "closed"):
            raise ValueError(
                f"{_OWNER}.on_unavailable: expected 'local' or 'closed',"
                f" got {shown(on_unavailable)}"
            )
        self.on_unavailable: str = mode
        self._tokens = isinstance(budget, TokenBudget)
        if isinstance(budget, TokenBudget):
            self._part = "tokens"
            script = _TOKENS_LUA
        else:
            cfg = budget.config
            if cfg.buckets > MAX_SHARED_BUCKETS:
                raise ValueError(
                    f"{_OWNER}.budget: a shared RatioBudget has at most {MAX_SHARED_BUCKETS} "
                    f"buckets, got {shown(cfg.buckets)}"
                )
            self._part = "ratio"
            script = _RATIO_LUA
        self._link_id = uuid.uuid4().hex[:16]
        self._keys = store.keys("budget", self.name, self._part, f"link:{self._link_id}")
        self._script = store.script(script)
        self._lock = threading.Lock()
        # Cumulative counts made here: (successes, failures) for a token
        # budget, (attempts, granted retries) for a ratio budget.
        self._x = self._y = 0
        self._acked = (0, 0)  # the counts Redis is known to hold
        self._unsynced = 0
        # Whether the gate was used since the last sync started (a decision
        # wants a fresh view), and whether the task waits for that (idle).
        self._wanted = False
        self._idle = False
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._wake: _runtime.AsyncioEvent | None = None
        self._stopping = False
        self._flushing: asyncio.Lock | None = None
        #: Successful syncs so far.
        self.syncs = 0

    def __repr__(self) -> str:
        return f"SharedBudget({self.budget.__class__.__name__}({self.name!r}), {self.store!r})"

    # -- the RetryGate, local and instant ------------------------------------------
    def on_attempt(self, succeeded: bool) -> None:
        """Count the outcome locally; the next sync shares it."""
        wake = False
        with self._lock:
            self.budget.on_attempt(succeeded)
            if self._tokens and not succeeded:
                self._y += 1
                # Only what spends the budget hurries a sync (failures here,
                # granted retries for a ratio budget): successes and plain
                # attempts wait for the next periodic one, so a healthy service
                # sends one command per sync_interval, whatever its traffic.
                self._unsynced += 1
                wake = self._unsynced == self.max_unsynced
            else:
                self._x += 1
            wake = self._used() or wake
        if wake:
            self._poke()

    def allow_retry(self) -> bool:
        """Decide on the local budget (which holds the shared state as last synced)."""
        if self._down_since is not None and self.on_unavailable == "closed":
            # (the fill reported is the local one: tokens, or 0 for a ratio budget)
            fill = self.budget.tokens if isinstance(self.budget, TokenBudget) else 0.0
            report_refused(self.name, self.budget.bus, current_criticality(), fill, math.inf)
            return False
        if self._tokens:  # spends nothing
            if not self._wanted:
                with self._lock:
                    wake = self._used()
                if wake:
                    self._poke()
            return self.budget.allow_retry()
        with self._lock:
            wake = self._used()
            granted = self.budget.allow_retry()
            if granted:
                self._y += 1
                self._unsynced += 1
                wake = self._unsynced == self.max_unsynced or wake
        if wake:
            self._poke()
        return granted

    @property
    def shared(self) -> bool:
        """Whether the budget is syncing (started, and Redis answered last time)."""
        return self._task is not None and self._down_since is None and self.syncs > 0

    @property
    def syncing(self) -> bool:
        """Whether the sync task runs: started, and neither closed nor ended."""
        return self._task is not None and not self._task.done()

    @property
    def bus(self) -> EventBus | None:
        """The wrapped budget's event bus."""
        return self.budget.bus

    def _used(self) -> bool:
        """The gate was used (lock held): sync soon; True to wake an idle sync task."""
        self._wanted = True
        if self._idle:
            self._idle = False
            return True
        return False

    def _poke(self) -> None:
        """Wake the sync task (from any thread)."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        if threading.get_ident() == self._thread:
            wake.set()
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nothing to wake
            loop.call_soon_threadsafe(wake.set)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """Start syncing in the running asyncio loop (``TypeError`` outside one)."""
        if _runtime.async_library() != "asyncio":
            raise TypeError(
                f"{_OWNER} {self.name!r}: shares the budget through redis.asyncio, "
                "which runs under asyncio only"
            )
        loop = _runtime.running_loop()
        if loop is None:
            raise TypeError(
                f"{_OWNER} {self.name!r}: sharing a budget through Redis needs a running "
                "asyncio event loop (start it with `async with` or `start()` in async code); "
                "a sync service uses the budget unshared"
            )
        if self._task is not None and not self._task.done():
            if self._loop is not loop:
                raise RuntimeError(f"{_OWNER} {self.name!r}: already started in another loop")
            return
        self._loop, self._thread = loop, threading.get_ident()
        self._wake = _runtime.AsyncioEvent()
        self._flushing = asyncio.Lock()
        self._stopping = self._idle = False
        self._task = _runtime.spawn(self._run(), name=f"datapunk-budget-sync:{self.name}")

    async def aclose(self) -> None:
        """Stop syncing, after pushing what is waiting; never hangs.

        The sync task is asked to stop (a flag it checks, then a wake-up) and
        given the store's ``timeout`` plus ``sync_interval`` to end; a task
        still running after that is cancelled and given ``timeout`` more, then
        left behind.  A flag, not only a cancellation: a driver that swallows a
        cancellation landing as its reply arrives would otherwise leave the
        task waiting for its next wake-up for ever, and ``aclose`` with it.
        The last push is bounded by the store's ``timeout`` too.
        """
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        wake = self._wake
        if wake is not None:
            wake.set()
        timeout = self.store.timeout
        done, _ = await _runtime.wait_tasks((task,), timeout + self.sync_interval)
        if not done:
            task.cancel()
            await _runtime.wait_tasks((task,), timeout)
        if task.done() and not task.cancelled():
            task.exception()  # (the loop catches every Exception: None)
        if self._down_since is None and not self.store.closed and self._has_news():
            await _runtime.await_bounded(self._flush(), 2 * timeout)
        self._loop = None
        self._wake = None

    async def __aenter__(self) -> SharedBudget:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> SharedBudget:
        raise TypeError(
            f"{_OWNER} {self.name!r}: sharing a budget through Redis is async only; "
            "use `async with` (a sync service uses the budget unshared)"
        )

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - __enter__ always raises
        return None

    async def sync(self) -> bool:
        """Sync now: push what was counted here, adopt the shared state.

        True when Redis answered; False when it failed (the budget then
        decides locally, see ``on_unavailable``).  Redis errors never escape.
        """
        if _runtime.async_library() != "asyncio":
            raise TypeError(f"{_OWNER} {self.name!r}: redis.asyncio runs under asyncio only")
        return await self._flush(force=True)

    async def _run(self) -> None:
        """Sync at start, then every ``sync_interval`` while the gate is used.

        A budget nobody used since the last sync started (no outcome to send,
        no decision wanting a fresh view) sends nothing: the task waits,
        without a timeout, for the next use of the gate, which wakes it at
        once (the last sync is at least ``sync_interval`` old by then).
        """
        wake = self._wake
        assert wake is not None
        while not self._stopping:
            with self._lock:
                self._wanted = False
            await self._flush()
            if self._stopping:
                return
            await self._wait(wake, self.sync_interval)
            if self._stopping:
                return
            with self._lock:
                # (cleared before going idle: a use from now on wakes the task)
                self._idle = not self._wanted and (self._x, self._y) == self._acked
            if self._idle:
                await self._wait(wake, None)

    async def _wait(self, wake: _runtime.AsyncioEvent, timeout: float | None) -> None:
        """Wait for a wake-up (or ``timeout`` seconds), then clear it."""
        await _runtime.wait_event(wake, timeout)
        wake.clear()

    # -- one sync ------------------------------------------------------------------------
    async def _flush(self, force: bool = False) -> bool:
        if self._flushing is None:
            self._flushing = asyncio.Lock()
        async with self._flushing:
            if self._down_since is not None and clock.now() < self._retry_at and not force:
                return False
            with self._lock:
                sent = (self._x, self._y)
                here = self._here()
                figures = self._figures()
                self._unsynced = 0
            # Always from what Redis is known to hold: a batch whose sync failed
            # or timed out (Redis paused, blackholed, restarted) is resent by the
            # next one, and what was counted while Redis was away is merged into
            # the shared state when it answers again, never overwritten by it.
            # (The link key makes a resent batch count once.)
            base = self._acked
            try:
                reply = await self._call(figures, base, sent, here)
                adopt, reason = self._reading(reply, figures)
            except _Corrupt as exc:
                self._corrupt(str(exc))
                self._fail("CorruptReply")
                return False
            except Exception as exc:  # any Redis trouble: never a caller's problem
                self._fail(type(exc).__name__)
                return False
            with self._lock:
                self._acked = sent
                # what was counted during the round trip goes on top
                adopt(self._x - sent[0], self._y - sent[1])
            self.syncs += 1
            self._seen(reason)
            return True

    def _figures(self) -> tuple[Any, ...]:
        """The script's first arguments, from the budget's configuration as it is
        now (a hot reload re-configures it in place): its figures, then the keys'
        time to live in ms (for a ratio budget at least twice its window)."""
        budget, ttl = self.budget, self.store.key_ttl
        if isinstance(budget, TokenBudget):
            cfg = budget.config
            return repr(cfg.max_tokens), repr(cfg.token_ratio), max(1, int(ttl * 1000))
        ratio = budget.config
        width_us = max(1, round(ratio.window / ratio.buckets * 1e6))
        ttl = max(ttl, 2 * ratio.window)
        return ratio.buckets, width_us, max(1, int(ttl * 1000))

    def _reading(
        self, reply: Any, figures: tuple[Any, ...]
    ) -> tuple[Callable[[int, int], None], str]:
        """Parse a reply to a sync sent with ``figures`` into how the local budget
        adopts it, and the corruption reason."""
        budget = self.budget
        if isinstance(budget, TokenBudget):
            tokens, reason = _parse_tokens(reply)
            return (lambda dx, dy: budget.adopt(tokens, dx, dy)), reason
        window, reason = _parse_window(reply, figures[0])
        return (lambda dx, dy: budget.adopt(window, dx, dy)), reason

    def _has_news(self) -> bool:
        """Whether something was counted here that Redis has not acknowledged."""
        with self._lock:
            return (self._x, self._y) != self._acked

    def _here(self) -> tuple[str, ...]:
        """What the local budget holds (lock held): the seed of a shared state found missing."""
        budget = self.budget
        if isinstance(budget, TokenBudget):
            return (repr(budget.tokens),)
        attempts, retries = budget.totals()
        return (str(attempts), str(retries))

    async def _call(
        self,
        figures: tuple[Any, ...],
        base: tuple[int, int],
        sent: tuple[int, int],
        here: tuple[str, ...] = (),
    ) -> Any:
        args = [*figures, base[0], sent[0], base[1], sent[1], *here]
        if not self._tokens:
            args.append(script_time())  # which bucket is current
        # serial: a batch whose caller gave up on the reply lands before the next one
        return await self.store.run(self._script, self._keys, args, serial=self)

    def _seen(self, reason: str) -> None:
        now = clock.now()
        down_since, self._down_since = self._down_since, None
        bus = self.budget.bus
        if not listening(bus):
            return
        if down_since is not None:
            emit(
                BudgetStoreResumed(
                    operation=self.name, at=now, store=self.store.kind, outage=now - down_since
                ),
                bus,
            )
        if reason:
            self._corrupt(reason)

    def _corrupt(self, reason: str) -> None:
        bus = self.budget.bus
        if listening(bus):
            emit(
                BudgetCorruptStateIgnored(
                    operation=self.name, at=clock.now(), store=self.store.kind, reason=reason
                ),
                bus,
            )

    def _fail(self, error_type: str) -> None:
        now = clock.now()
        self._retry_at = now + self.store.retry_interval
        if self._down_since is not None:
            return
        self._down_since = now
        bus = self.budget.bus
        if listening(bus):
            emit(
                BudgetStoreFallback(
                    operation=self.name,
                    at=now,
                    store=self.store.kind,
                    error_type=error_type,
                    mode=self.on_unavailable,
                ),
                bus,
            )


def bind_budget(
    store: RedisStore,
    budget: TokenBudget | RatioBudget,
    **settings: Any,
) -> SharedBudget:
    """Share ``budget`` through ``store`` (see `SharedBudget` for ``settings``)."""
    return SharedBudget(budget, store, **settings)
