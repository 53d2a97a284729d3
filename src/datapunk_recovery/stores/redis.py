"""The Redis store: breaker state shared by every process that uses the same Redis.

When a service runs as many replicas, each with its own breaker, one replica
keeps hammering a dead dependency the others already gave up on.  With a
[`RedisStore`][datapunk_recovery.stores.redis.RedisStore], breakers of the same name in every
process share one
state, kept in Redis and changed only by Lua scripts (atomic, one round trip).

How it is organised, per primitive (breakers now, budgets may follow):

- **Keys** are ``{prefix}:{<kind>:<name>}:<part>``: the hash tag
  ``{<kind>:<name>}`` puts every key of one primitive in one Redis Cluster
  slot, so a script may touch them all; every write refreshes a TTL
  (``key_ttl`` seconds) so abandoned keys expire.
- **Scripts** live in module constants (``_BREAKER_LUA``) and are registered
  once per store (``EVALSHA``, reloaded by redis-py after a server restart).
  State is plain hash fields (numbers), validated by the script on every read:
  a state that does not parse is reset and reported, never trusted.
  Nothing is pickled.
- **Links** (`_BreakerLink`) do the rest for one primitive: a local
  read cache (``cache_ttl`` seconds; it bounds how long replicas may
  disagree), outcomes aggregated and sent in batches in the background (the
  caller never waits for Redis after its call; see ``flush_interval`` and
  ``flush_max``), and the fallback to local state when Redis is unreachable
  or answers garbage.
- **Commands** run in tasks the store owns (`RedisStore._eval()`): a
  caller waits at most ``timeout`` for one and never cancels it, so our
  timeouts close no connection and no driver can swallow a caller's
  cancellation; [`RedisStore.aclose()`][datapunk_recovery.stores.redis.RedisStore.aclose] ends every
  task, within bounds.

Redis errors never reach the caller: every store operation is bounded by
``timeout`` seconds, and a failing one switches the link to its breaker's
local state (``on_unavailable="local"``, calls keep flowing and are judged
locally) or refuses every call (``"closed"``) until Redis answers again; the
store is tried again every ``retry_interval`` seconds.  Sharing then resumes,
and the outcomes judged locally during the outage join the shared state (one
batch of the current generation; see ``_BreakerLink._share_unshared``).  A
forced state, and an open period still running, outlive the keys: the
process holding them re-asserts them on a pristine shared state (keys
expired, or Redis restarted empty).

A Redis Cluster or a Sentinel-managed master is used like one server (a
client object, or a ``redis+cluster://`` / ``redis+sentinel://`` URL): every
script names all its keys, which share one hash tag, and keeps them all in
existence, so the cluster client routes it, follows ``MOVED`` and ``ASK``
through a failover or a live slot migration, and reloads a script a new
master lacks (``NOSCRIPT``).

Async only, asyncio only (redis.asyncio); a sync breaker asked to use it raises
``TypeError``.  Time in shared state is Redis's own clock (``TIME``), so
processes whose monotonic clocks differ still agree on when an open period ends;
under an installed [`FakeClock`][datapunk_recovery._core.clock.FakeClock] the scripts take the
fake time instead (see `script_time()`), so tests drive shared state like local state.
"""

from __future__ import annotations

import asyncio
import json
import random
import weakref
from typing import TYPE_CHECKING, Any, Final, Literal

from .._core import clock
from .._core.errors import CircuitOpenError, ErrorCategory, classify
from .._core.events import emit
from .._core.validate import check_count, check_seconds, shown
from .._execution import runtime as _runtime
from ..breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStateChanged,
    CallRejected,
    CorruptStateIgnored,
    OutcomesFolded,
    ShadowTrip,
    StoreFallback,
    StoreResumed,
    WindowKind,
    WriteShed,
)
from .clients import client_from_url

if TYPE_CHECKING:
    from ..breaker import CircuitBreaker

__all__ = ["RedisStore"]

_OWNER: Final = "RedisStore"

# State codes shared with the Lua script.
_CODES: Final = (
    BreakerState.CLOSED,
    BreakerState.OPEN,
    BreakerState.HALF_OPEN,
    BreakerState.DISABLED,
    BreakerState.FORCED_OPEN,
    BreakerState.METRICS_ONLY,
)
_CODE_OF: Final = {state: i for i, state in enumerate(_CODES)}
_PASSING: Final = frozenset({BreakerState.CLOSED, BreakerState.DISABLED, BreakerState.METRICS_ONLY})
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

# One script per primitive: ARGV[1] is the operation (read, acquire, record,
# release, force), ARGV[2] the configuration as JSON, ARGV[3] a uniform random
# number for the open-duration jitter, then the operation's arguments, the
# state the caller holds (code or -1) with its seconds left (see "hold"), and
# last the time of an installed fake clock ('' for Redis's ``TIME``).
# Reply: {state, generation, remaining_us, granted (0/1/2=probe), free permits,
# consecutive failures, window calls, window failures, window slow calls,
# corrupt (0: no, 1: reset, 2: an open or half-open period longer than this
# configuration allows, shortened), reason of a transition made now (or ""),
# shadow trip (0/1), pristine (1: made from nothing and no transition since)}.
# Every number read is checked: integers must be exact in a Lua number (at
# most 2^52, or the reply would carry a garbled integer and every process
# would fall back for good), times finite, a window head not in the future.
# Generations only grow (a fresh state starts at Redis's time in ms), so a
# link can tell an older reply from a newer one.
_BREAKER_LUA: Final = r"""
pcall(redis.replicate_commands)
-- KEYS[2], when given, is the one window key this breaker's window kind uses
-- (the count window's ring, or the time window's buckets): only the keys a
-- run uses are named, so that each exists after it (see the expiry below).
local key, wkey = KEYS[1], KEYS[2]
local ringk, wink = wkey, wkey
local function drop_window() if wkey ~= nil then redis.call('DEL', wkey) end end
local op = ARGV[1]
local cfg = cjson.decode(ARGV[2])
local u = tonumber(ARGV[3]) or 0.5
-- The last argument: the time (seconds) of a fake clock installed in the
-- caller (tests, simulations), or '' for Redis's own clock.
local now = tonumber(ARGV[#ARGV])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local CLOSED, OPEN, HALF, DISABLED, FORCED, METRICS = 0, 1, 2, 3, 4, 5

local function num(x)
  local n = tonumber(x)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return nil end
  return n
end
local MAXINT = 4503599627370496  -- 2^52: a generation + 1 stays exact
local function int(x)
  local n = num(x)
  if n == nil or n ~= math.floor(n) or n < 0 or n > MAXINT then return nil end
  return n
end

local S
local function fresh(g)
  S = {s = CLOSED, g = g, ou = 0, hu = 0, c = 0, pi = 0, po = 0, r = 0,
       wc = 0, wf = 0, ws = 0, wp = 0, wh = false, wz = '', pf = 0, ps = 0, sh = 0, p = 1}
end

local corrupt = 0
-- The two arguments before the time: a state the caller holds (-1: none)
-- and, for an open one, the seconds it has left.  They are obeyed only by a fresh state
-- (the keys expired, or Redis restarted empty): an operator's forced state,
-- or an open period still running, is never lost with the keys.
local hold, hold_left = tonumber(ARGV[#ARGV - 2]) or -1, tonumber(ARGV[#ARGV - 1]) or 0
local raw = redis.call('HMGET', key, 's', 'g', 'ou', 'hu', 'c', 'pi', 'po', 'r',
                       'wc', 'wf', 'ws', 'wp', 'wh', 'wz', 'p', 'pf', 'ps', 'sh')
local made = raw[1] == false and raw[2] == false
if made then
  -- A new (or expired, or lost with a restart) state starts at Redis's time
  -- in ms: above every generation handed out before, so a link never takes
  -- the new state's replies for older ones.
  fresh(math.floor(now * 1000))
else
  S = {s = int(raw[1]), g = int(raw[2]), ou = num(raw[3]), hu = num(raw[4]),
       c = int(raw[5]), pi = int(raw[6]), po = int(raw[7]), r = int(raw[8]),
       wc = int(raw[9]), wf = int(raw[10]), ws = int(raw[11]), wp = int(raw[12]),
       wh = false, wz = raw[14] or '', p = 0}
  if raw[15] == '1' then S.p = 1 end
  -- probe failures and slow probes ("rate" half-open) and the shadow-trip
  -- flag: absent in a state written before they existed, so absent means 0.
  S.pf, S.ps, S.sh = int(raw[16] or 0), int(raw[17] or 0), int(raw[18] or 0)
  local whok = true
  if raw[13] then
    S.wh = num(raw[13])
    whok = S.wh ~= nil and S.wh == math.floor(S.wh) and math.abs(S.wh) <= MAXINT
  end
  if S.s == nil or S.s > 5 or S.g == nil or S.ou == nil or S.hu == nil or S.c == nil
     or S.pi == nil or S.po == nil or S.r == nil or S.wc == nil or S.wf == nil
     or S.ws == nil or S.wp == nil or S.wf > S.wc or S.ws > S.wc or not whok
     or S.pf == nil or S.ps == nil or S.sh == nil then
    corrupt = 1
    local g = int(raw[2])
    if g == nil then g = math.floor(now * 1000) else g = g + 1 end
    drop_window()
    fresh(g)
  end
end

-- What this run found, to tell whether it changed anything (see 'dirty').
local was_s, was_g, was_wz, moved = S.s, S.g, S.wz, false
-- The count window's ring, read once (GET) and written once (SET) per run,
-- and a time window's increments, applied once per field: a batch of n
-- outcomes costs a few commands, not 2 per outcome.
local ring, ringset, winadd = nil, nil, nil
local function ring_byte(p)
  if ringset ~= nil and ringset[p] ~= nil then return ringset[p] end
  if ring == nil then ring = redis.call('GET', ringk) or '' end
  return string.byte(ring, p + 1) or 0
end
local wk = cfg.wk
local shape = ''
if wk == 0 then shape = 'c:' .. cfg.ws elseif wk == 1 then
  shape = 't:' .. cfg.wd .. ':' .. cfg.wb end
local function win_clear()
  S.wc, S.wf, S.ws, S.wp, S.wh = 0, 0, 0, 0, false
  ring, ringset, winadd, moved = '', nil, nil, true
  drop_window()
end
if S.wz ~= shape then win_clear(); S.wz = shape end
-- A window that cannot be right: more calls than a count window holds, or a
-- time window whose newest bucket lies more than a window ahead of now.
if (wk == 0 and S.wc > cfg.ws)
   or (wk == 1 and S.wh ~= false and S.wh > math.floor(now / (cfg.wd / cfg.wb)) + cfg.wb) then
  corrupt = 1
  win_clear()
end
-- Never obey an open (or half-open) period longer than this configuration
-- could set: shorten it and say so.  (1 ms of slack for rounding.)
local longest = math.max(cfg.om * (1 + cfg.oj), cfg.sd)
if S.s == OPEN and S.ou - now > longest + 0.001 then
  S.ou = now + longest
  if corrupt == 0 then corrupt = 2 end
end
if S.s == HALF and cfg.ht >= 0 and S.hu - now > cfg.ht + 0.001 then
  S.hu = now + cfg.ht
  if corrupt == 0 then corrupt = 2 end
end

-- (pristine: made from nothing and never changed state since)
if S.p == 1 and (hold == FORCED or hold == DISABLED or hold == METRICS) then
  S.s, S.g, S.p = hold, S.g + 1, 0
elseif S.p == 1 and hold == OPEN and hold_left > 0 then
  S.s, S.g, S.p, S.r = OPEN, S.g + 1, 0, 1
  S.ou = now + math.min(hold_left, longest)
end

local function win_advance()
  local n = cfg.wb
  local epoch = math.floor(now / (cfg.wd / n))
  if S.wh == false then S.wh, moved = epoch, true; return epoch % n end
  if epoch > S.wh then
    moved = true
    if epoch - S.wh >= n then
      S.wc, S.wf, S.ws = 0, 0, 0
      winadd = nil
      redis.call('DEL', wink)
    else
      for e = S.wh + 1, epoch do
        local i = e % n
        local b = redis.call('HMGET', wink, 'c' .. i, 'f' .. i, 's' .. i)
        S.wc = math.max(0, S.wc - (tonumber(b[1]) or 0))
        S.wf = math.max(0, S.wf - (tonumber(b[2]) or 0))
        S.ws = math.max(0, S.ws - (tonumber(b[3]) or 0))
        redis.call('HDEL', wink, 'c' .. i, 'f' .. i, 's' .. i)
      end
    end
    S.wh = epoch
  end
  return S.wh % n
end

local function win_add(failed, slow)
  if wk == 0 then
    local p = S.wp
    if p >= cfg.ws then p = 0 end
    local ob = ring_byte(p)
    if ob >= 4 then
      ob = ob - 4
      S.wf = S.wf - (ob % 2)
      S.ws = S.ws - (math.floor(ob / 2) % 2)
    else
      S.wc = S.wc + 1
    end
    if ringset == nil then ringset = {} end
    ringset[p] = 4 + failed + 2 * slow
    S.wf = S.wf + failed
    S.ws = S.ws + slow
    S.wp = (p + 1) % cfg.ws
  elseif wk == 1 then
    local i = win_advance()
    if winadd == nil then winadd = {} end
    winadd['c' .. i] = (winadd['c' .. i] or 0) + 1
    S.wc = S.wc + 1
    if failed == 1 then winadd['f' .. i] = (winadd['f' .. i] or 0) + 1; S.wf = S.wf + 1 end
    if slow == 1 then winadd['s' .. i] = (winadd['s' .. i] or 0) + 1; S.ws = S.ws + 1 end
  end
end

local function clear_counts()
  S.c = 0
  win_clear()
end

local reason_out, shadow = '', 0
local function to(new, reason)
  S.s = new
  S.g = S.g + 1
  S.p = 0
  reason_out = reason
  S.sh = 0
  if new == HALF then
    S.pi, S.po, S.pf, S.ps, S.hu = 0, 0, 0, 0, now + math.max(cfg.ht, 0)
  elseif new ~= OPEN then
    clear_counts()
    if new ~= FORCED then S.r = 0 end
  end
end

-- ``since``: when the open period starts, if not now (a half-open time limit
-- that passed while nobody looked).
local function open(hint, reason, since)
  local d = hint
  if d == nil then
    d = cfg.od * (cfg.ob ^ S.r)
    if d ~= d or d > cfg.om then d = cfg.om end
    if cfg.oj > 0 then d = d * (1 - cfg.oj + 2 * cfg.oj * u) end
  end
  S.r = S.r + 1
  S.ou = (since or now) + d
  to(OPEN, reason)
end

local function judge()
  if cfg.cf > 0 and S.c >= cfg.cf then return 'consecutive_failures' end
  if wk >= 0 then
    if wk == 1 then win_advance() end
    if S.wc >= cfg.mc then
      if cfg.fr > 0 and S.wf >= cfg.fr * S.wc then return 'failure_rate' end
      if cfg.sr > 0 and S.ws >= cfg.sr * S.wc then return 'slow_call_rate' end
    end
  end
  return nil
end

-- cfg.ht < 0: no half-open time limit; cfg.hd 1: the "rate" decision.
if S.s == HALF and cfg.ht >= 0 and now >= S.hu then
  if S.po > 0 and cfg.hd ~= 1 then to(CLOSED, 'half_open_timeout')
  else open(nil, 'probe_timeout', S.hu) end
end
if S.s == OPEN and now >= S.ou then to(HALF, 'open_elapsed') end

local granted = 0

-- One outcome of a call admitted while closed (or in shadow mode): the one
-- rule for 'record' and 'batch' alike.
local function closed_outcome(failed, slow, hint)
  if failed == 1 then S.c = S.c + 1 else S.c = 0 end
  win_add(failed, slow)
  local reason
  if hint then reason = 'server_delay' else reason = judge() end
  if reason then
    if S.s == METRICS then
      -- shadow mode keeps its counts; a would-be trip is reported once,
      -- when the criterion starts to hold
      if S.sh == 0 then
        S.sh = 1
        shadow = 1
        reason_out = reason
      end
    else
      open(hint, reason)
    end
  else
    S.sh = 0
  end
end

if op == 'acquire' then
  if S.s == CLOSED or S.s == DISABLED or S.s == METRICS then
    granted = 1
  elseif S.s == HALF and S.pi < cfg.hp then
    S.pi = S.pi + 1
    granted = 2
  end
elseif op == 'record' then
  local gen, probe = tonumber(ARGV[4]), tonumber(ARGV[5])
  local failed, slow, hint = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  if hint < 0 then hint = nil end
  if gen == S.g then
    if S.s == HALF then
      if probe == 1 then
        if hint then open(hint, 'server_delay')
        elseif cfg.hd == 1 then
          if failed == 1 then S.pf = S.pf + 1 else S.po = S.po + 1 end
          if slow == 1 then S.ps = S.ps + 1 end
          local done = S.po + S.pf
          if done >= cfg.hp then
            if S.pf >= cfg.fr * done then open(nil, 'failure_rate')
            elseif cfg.sr > 0 and S.ps >= cfg.sr * done then open(nil, 'slow_call_rate')
            else to(CLOSED, 'probes_succeeded') end
          end
        elseif failed == 1 or (slow == 1 and cfg.sr > 0) then open(nil, 'probe_failed')
        else
          S.po = S.po + 1
          if S.po >= cfg.hp then to(CLOSED, 'probes_succeeded') end
        end
      end
    elseif S.s == CLOSED or S.s == METRICS then
      closed_outcome(failed, slow, hint)
    end
  end
elseif op == 'batch' then
  -- Outcomes of closed calls aggregated by one process, in order, as runs
  -- "<code>x<count>,..." (code: 1 failed + 2 slow).  Each is judged as a
  -- 'record' would be; once one trips the breaker the rest belong to an
  -- older generation and count for nothing, exactly as if sent one by one.
  local gen = tonumber(ARGV[4])
  for code, n in string.gmatch(ARGV[5], '(%d)x(%d+)') do
    code, n = tonumber(code), tonumber(n)
    local failed, slow = code % 2, math.floor(code / 2) % 2
    for _ = 1, n do
      if gen ~= S.g or (S.s ~= CLOSED and S.s ~= METRICS) then break end
      closed_outcome(failed, slow, nil)
    end
  end
elseif op == 'release' then
  local gen, probe = tonumber(ARGV[4]), tonumber(ARGV[5])
  if probe == 1 and gen == S.g and S.s == HALF and S.pi > 0 then S.pi = S.pi - 1 end
elseif op == 'force' then
  to(tonumber(ARGV[4]), ARGV[5])
end
if wk == 1 then win_advance() end

if ringset ~= nil then
  local top = #ring
  for p in pairs(ringset) do if p + 1 > top then top = p + 1 end end
  local out = {}
  for p = 0, top - 1 do out[p + 1] = string.char(ring_byte(p)) end
  redis.call('SET', ringk, table.concat(out))
end
if winadd ~= nil then
  for f, v in pairs(winadd) do redis.call('HINCRBY', wink, f, v) end
end

-- A read that changed nothing writes nothing (it only renews the expiry).
local dirty = op ~= 'read' or made or corrupt ~= 0 or moved or S.s ~= was_s
              or S.g ~= was_g or S.wz ~= was_wz
if dirty then
  local f = {'s', S.s, 'g', string.format('%.0f', S.g),
             'ou', string.format('%.17g', S.ou), 'hu', string.format('%.17g', S.hu),
             'c', S.c, 'pi', S.pi, 'po', S.po, 'r', S.r, 'wc', S.wc, 'wf', S.wf,
             'ws', S.ws, 'wp', S.wp, 'wz', S.wz, 'pf', S.pf, 'ps', S.ps, 'sh', S.sh, 'p', S.p}
  if S.wh ~= false then
    f[#f + 1] = 'wh'
    f[#f + 1] = string.format('%.0f', S.wh)
  end
  redis.call('HSET', key, unpack(f))
  if S.wh == false and raw[13] then redis.call('HDEL', key, 'wh') end
end
local ttl = cfg.kt
-- Every key of the script exists after it (an empty placeholder at least),
-- and they expire together: on a Redis Cluster slot being migrated, a script
-- runs only on the node holding all its keys; one missing key means TRYAGAIN
-- for as long as the migration lasts, and the breaker would fall back
-- instead of following its keys.
-- (a clean read needs no placeholder: the keys were made by the write that
-- made the state, and they expire together)
if dirty then
  if wk == 0 and ringset == nil then redis.call('SET', ringk, '', 'NX')
  elseif wk == 1 then redis.call('HSETNX', wink, '_', '') end
end
for _, k in ipairs(KEYS) do
  if S.s == FORCED or S.s == DISABLED or S.s == METRICS then
    -- an operator's decision does not expire with traffic: kept until reset
    redis.call('PERSIST', k)
  else
    redis.call('PEXPIRE', k, ttl)
  end
end

local rem = 0
if S.s == OPEN then rem = S.ou - now elseif S.s == HALF and cfg.ht >= 0 then rem = S.hu - now end
if rem < 0 then rem = 0 end
-- (free permits never below 0: another process may allow fewer probes; the
-- time left rounded up to the microsecond: a link's cached view never ends a
-- period before Redis does)
return {S.s, S.g, math.ceil(rem * 1000000), granted, math.max(0, cfg.hp - S.pi), S.c,
        S.wc, S.wf, S.ws, corrupt, reason_out, shadow, S.p}
"""


class _Corrupt(Exception):
    """A reply from Redis that does not parse: treated like Redis being down."""


#: Seconds a store waits, after Redis refused its login or a command, before
#: asking again (at most one failed login per store in that time).
AUTH_RETRY_INTERVAL: Final = 300.0


class StoreRefused(RuntimeError):
    """Redis refused this store's login or command lately: not asked again yet."""


class StoreBusy(RuntimeError):
    """``max_pending`` commands already wait for Redis: the caller falls back at once.

    Raised inside the store only, never to a caller.
    """


class StoreClosed(RuntimeError):
    """The store was closed (`RedisStore.aclose()`): its primitives decide locally.

    Raised inside the store only, never to a caller: without it, redis-py
    would quietly open a new connection that nobody closes.
    """


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
        if state in _PASSING:
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


class RedisStore:
    """Shared state in Redis for breakers of every process using it.

    ``client`` is a ``redis.asyncio.Redis``, a
    ``redis.asyncio.cluster.RedisCluster`` or a
    ``Sentinel(...).master_for(...)`` client (the store never closes it), or
    a URL: ``redis://`` / ``rediss://`` / ``unix://`` (one server),
    ``redis+cluster://host:port[,host:port...]`` (a Redis Cluster) or
    ``redis+sentinel://host:port[,host:port...]/service[/db]`` (the master
    the sentinels name); the store makes that client and closes it in
    [`aclose()`][datapunk_recovery.stores.redis.RedisStore.aclose].  Settings, in
    seconds:

    - ``cache_ttl``: how long a read of the shared state is trusted locally;
      it bounds how long a process may keep admitting calls after another one
      opened the breaker.  Default 0.5.
    - ``timeout``: the longest any Redis operation may take before the link
      falls back to local state.  Default 0.25.
    - ``retry_interval``: how often a link whose store failed tries it again.
      Default 1.0.
    - ``key_ttl``: abandoned keys expire after this long (every write renews
      it); at least ``2 * max_open_duration`` of the breakers is used.  Default 3600.
    - ``on_unavailable``: ``"local"`` (default: judge calls on the breaker's
      local state while Redis is away) or ``"closed"`` (refuse every call).
    - ``max_pending``: Redis commands in flight per store (and outcome writes
      per breaker); past it, the caller decides locally at once and outcomes
      are applied locally (so a slow Redis cannot pile up tasks).  Default 256.
    - ``flush_interval``: outcomes of closed calls are aggregated per breaker
      and sent in one script call; a batch holding a failure or a slow call
      is sent within this many seconds (default 0.005), a batch of plain
      successes within ``cache_ttl`` (or with the next read, which carries
      it).  A batch that would trip the breaker is sent at once, as are probe
      results and server delays.
    - ``flush_max``: a batch of this many outcomes is sent at once (default
      200): with it, a busy closed breaker sends at most one command per
      ``flush_max`` calls, plus one read per ``cache_ttl``.
    """

    kind = "redis"
    is_async = True

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "datapunk",
        cache_ttl: float = 0.5,
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        key_ttl: float = 3600.0,
        on_unavailable: Literal["local", "closed"] = "local",
        max_pending: int = 256,
        flush_interval: float = 0.005,
        flush_max: int = 200,
    ) -> None:
        self.cache_ttl = check_seconds(_OWNER, "cache_ttl", cache_ttl)
        self.timeout = check_seconds(_OWNER, "timeout", timeout, positive=True)
        self.retry_interval = check_seconds(_OWNER, "retry_interval", retry_interval)
        self.key_ttl = check_seconds(_OWNER, "key_ttl", key_ttl, positive=True)
        self.max_pending = check_count(_OWNER, "max_pending", max_pending)
        self.flush_interval = check_seconds(_OWNER, "flush_interval", flush_interval)
        self.flush_max = check_count(_OWNER, "flush_max", flush_max)
        if on_unavailable not in ("local", "closed"):
            raise ValueError(
                f"{_OWNER}.on_unavailable: expected 'local' or 'closed',"
                f" got {shown(on_unavailable)}"
            )
        self.on_unavailable = on_unavailable
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(
                f"{_OWNER}.prefix: expected a non-empty str without braces, got {shown(prefix)}"
            )
        self.prefix = prefix
        # The sentinels' clients of a redis+sentinel URL: closed with the client.
        self._also_close: list[Any] = []
        if isinstance(client, str):
            # The driver's own socket timeouts are looser than ``timeout``: the
            # store stops *waiting* after ``timeout`` (see _eval) while the
            # command lands on its connection; a driver timeout would close a
            # healthy connection that is merely slow.  They still bound a
            # blackholed server (the command then fails and its task ends).
            slack = _driver_timeout(self.timeout)
            self.client, self._also_close = client_from_url(
                client, timeout=slack, owner=_OWNER
            )
            self._owns_client = True
        elif hasattr(client, "register_script") and hasattr(client, "evalsha"):
            # A Redis, a RedisCluster or a Sentinel's master_for(): every
            # script call names all its keys (one hash tag, one slot), so a
            # cluster client routes it, follows MOVED/ASK and reloads a script
            # a new master lacks (NOSCRIPT) on its own.
            self.client = client
            self._owns_client = False
        else:
            raise TypeError(
                f"{_OWNER}.client: expected a redis.asyncio.Redis, RedisCluster, "
                f"Sentinel master_for() client or a URL, got {type(client).__name__}"
            )
        self._breaker_script = self.client.register_script(_BREAKER_LUA)
        self._rng = random.Random()
        # Every link bound here, so that aclose() can land their background writes.
        self._links: weakref.WeakSet[_BreakerLink] = weakref.WeakSet()
        # Commands running now (see _eval): owned here, cancelled by aclose().
        self._inflight: set[asyncio.Task[Any]] = set()
        self._serial: dict[object, asyncio.Task[Any]] = {}
        self._closing = False
        self._closed = False
        self._refused_until = 0.0  # clock.now() before which Redis is not asked (auth)
        # No reply yet: the first commands also make the first connection (and,
        # in a process starting up, pay for first use of the driver's code).
        self._answered = False

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r})"

    # -- keys -----------------------------------------------------------------------
    def keys(self, kind: str, name: str, *parts: str) -> list[str]:
        """Keys of one primitive, all in one cluster slot: ``prefix:{kind:name}:part``."""
        tag = f"{self.prefix}:{{{kind}:{name}}}"
        return [f"{tag}:{part}" for part in parts]

    async def _eval(
        self, script: Any, keys: list[str], args: list[Any], *, serial: object = None
    ) -> Any:
        """Run ``script`` (one round trip); the caller waits at most ``timeout`` seconds.

        The command runs in a task of its own, owned by the store, and the
        caller only *waits* for it.  Two faults follow from cancelling a
        command inside the caller's task, and this shape avoids both:

        - redis-py closes a connection whose command is cancelled mid-reply, so
          every timeout on a busy loop would cost a new connection (churn, and
          more timeouts while it is made);
        - a driver may swallow a cancellation that lands as its reply arrives
          and return the reply: the caller's task then carries on as if never
          cancelled, and a background loop stopped by ``cancel()`` waits for
          ever (the hang of 8 processes sharing a breaker and a budget).

        A command our timeout gave up on keeps running on its connection and
        lands (or fails on the driver's own socket timeout);
        [`aclose()`][datapunk_recovery.stores.redis.RedisStore.aclose]
        cancels what is still running, after a bounded wait.  At most
        ``max_pending`` commands run at once per store: past it the caller
        falls back at once ([`StoreBusy`][datapunk_recovery.stores.redis.StoreBusy]) instead of
        piling up tasks on a
        Redis that does not answer.

        After Redis refused the login or the command (``WRONGPASS``,
        ``NOAUTH``, ``NOPERM``), nothing is sent for `AUTH_RETRY_INTERVAL`
        seconds (`StoreRefused`).

        Commands given the same ``serial`` key run one after the other: one
        waits (within the same ``timeout``) for the previous one to land, so
        Redis applies them in the order they were made even when a caller gave
        up on a reply (a budget's batches rely on it).
        """
        if self._closed or self._closing:
            raise StoreClosed(f"{self!r} is closed")
        if clock.now() < self._refused_until:
            raise StoreRefused(f"{self!r}: Redis refused our login or command; not asked again yet")
        if len(self._inflight) >= self.max_pending:
            raise StoreBusy(f"{self!r}: {len(self._inflight)} commands already in flight")
        loop = asyncio.get_running_loop()
        # Until the store's first reply, a command is waited for as long as the
        # driver's connect timeout: making the first connection in a busy
        # process starting up is not Redis being away (8 processes starting at
        # once took 0.1-0.4 s for it, and fell back on a healthy Redis).
        deadline = loop.time() + (self.timeout if self._answered else _driver_timeout(self.timeout))
        if serial is not None:
            previous = self._serial.get(serial)
            if previous is not None and not previous.done():
                await asyncio.wait((previous,), timeout=self.timeout)
                if not previous.done():
                    raise TimeoutError(f"{self!r}: the previous command is still running")
        task = loop.create_task(script(keys=keys, args=args))
        self._inflight.add(task)
        task.add_done_callback(self._landed)
        if serial is not None:
            self._serial[serial] = task
        done, _ = await asyncio.wait((task,), timeout=max(deadline - loop.time(), 0.0))
        if not done:
            raise TimeoutError(f"{self!r}: no reply within {self.timeout} s")
        if task.cancelled():  # (by aclose, or inside the driver): never the caller's
            if self._closing:
                raise StoreClosed(f"{self!r} is closed")
            raise ConnectionError(f"{self!r}: the command was cancelled inside the driver")
        try:
            reply = task.result()
        except Exception as exc:
            if classify(exc).category is ErrorCategory.AUTH:
                # Another try would be another failed login, which can lock
                # the account: no link asks again for AUTH_RETRY_INTERVAL s.
                self._refused_until = clock.now() + AUTH_RETRY_INTERVAL
            raise
        self._answered = True
        return reply

    def _landed(self, task: asyncio.Task[Any]) -> None:
        """A command ended: forget it; its error (if nobody waited for it) is consumed."""
        self._inflight.discard(task)
        for key in [k for k, t in self._serial.items() if t is task]:
            del self._serial[key]
        if not task.cancelled() and task.exception() is None:  # (retrieved: no warning)
            self._answered = True

    # -- breakers --------------------------------------------------------------------------
    def bind_breaker(self, breaker: CircuitBreaker) -> _BreakerLink:
        """Share ``breaker``'s state; custom trip policies cannot be shared (``TypeError``)."""
        if breaker.config.trip_policy is not None:
            raise TypeError(
                f"RedisStore: breaker {breaker.name!r} has a custom trip_policy, "
                "which lives in one process and cannot be shared"
            )
        link = _BreakerLink(self, breaker)
        self._links.add(link)
        return link

    async def breaker_op(self, name: str, config: BreakerConfig, op: str, *args: Any) -> Any:
        """Run one operation of the breaker script (one round trip); returns the raw reply."""
        # only the window key this kind of window uses (see the script's KEYS)
        window = _WINDOW_KEY.get(config.window, ()) if config.windowed else ()
        keys = self.keys("breaker", name, "state", *window)
        ttl_ms = int(max(self.key_ttl, 2 * config.max_open_duration) * 1000)
        cfg = _config_json(config, ttl_ms)
        return await self._eval(
            self._breaker_script, keys, [op, cfg, repr(self._rng.random()), *args, script_time()]
        )

    @property
    def closed(self) -> bool:
        """Whether `aclose()` has finished: the store sends nothing more."""
        return self._closed

    async def aclose(self) -> None:
        """Land the outcome writes in flight, then close the client if the store made it.

        Every wait is bounded: the writes get ``timeout`` seconds (a write
        scheduled meanwhile is applied locally instead); commands still running
        after that are cancelled and get ``timeout`` seconds more to end, and
        closing the client gets ``timeout`` seconds too.  Whatever a driver
        does, ``aclose`` returns.  Afterwards the store opens no connection: its
        breakers decide on their local state (as when Redis is away) and
        outcomes count there only.  Closing twice is harmless.
        """
        if self._closing:
            return
        await _runtime.await_bounded(
            asyncio.gather(*(link.flush() for link in list(self._links))), self.timeout
        )
        self._closing = True  # from now on no new command starts
        running = list(self._inflight)
        if running:
            _, late = await asyncio.wait(running, timeout=self.timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=self.timeout)
        for link in list(self._links):
            link.detach()
        self._closed = True
        if self._owns_client:
            await _runtime.await_bounded(self.client.aclose(), self.timeout)
            for extra in self._also_close:
                await _runtime.await_bounded(extra.aclose(), self.timeout)


def script_time() -> str:
    """The time a script takes as "now": the installed fake clock's, else Redis's own.

    Shared state is timed on Redis's clock (``TIME``) so that processes whose
    monotonic clocks differ agree; under a
    [`FakeClock`][datapunk_recovery._core.clock.FakeClock] (tests, simulations) the
    scripts run on the fake time instead, so that a shared primitive moves
    exactly as a local one driven by the same clock.  Returns seconds as a
    string, or ``""`` for Redis's clock.
    """
    fake = clock.current_fake()
    return "" if fake is None else repr(fake.now())


def _driver_timeout(timeout: float) -> float:
    """Socket timeouts of a client the store makes: 4x its own, at least 2 s (seconds)."""
    return max(4.0 * timeout, 2.0)


class _BreakerLink:
    """One breaker's connection to the Redis store: cache, background writes, fallback."""

    def __init__(self, store: RedisStore, breaker: CircuitBreaker) -> None:
        self.store = store
        self.breaker = breaker
        self.core = breaker._core
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
        self.keeper: asyncio.Task[None] | None = None
        self.stop_keeping: asyncio.Event | None = None
        # Outcomes of closed calls not sent yet, as runs [code, count] in order
        # (code: 1 failed + 2 slow), all of generation batch_gen; one send in
        # flight at a time (sending), started by a timer or at once.
        self.batch: list[list[int]] = []
        self.batch_gen = -1
        self.batch_n = self.batch_failed = self.batch_slow = 0
        self.timer: asyncio.TimerHandle | None = None
        self.sending: asyncio.Task[None] | None = None
        #: Times a batch was folded (counts kept, order of outcomes lost; see _fold).
        self.merged = 0
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
    async def _op(self, op: str, *args: Any) -> _Shared | None:
        """Run ``op``; on success update the cache and return it, else fall back (None)."""
        store, core = self.store, self.core
        config = core.config
        hold = self._hold() if op != "force" else (-1, "0")
        try:
            reply = await store.breaker_op(self.breaker.name, config, op, *args, *hold)
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
        if state in _PASSING:
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
        task = asyncio.ensure_future(self._op("acquire"))
        try:
            return await asyncio.shield(task)
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
                await asyncio.wait(writes, timeout=2 * self.store.timeout)
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
        if self.down_since is not None or self.store._closed:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if len(self.pending) >= self.store.max_pending:
            # Not shed: it waits for a send to land (in order), up to as
            # many as are in flight; only past that is one kept local.
            if len(self.waiting) < self.store.max_pending:
                self.waiting.append((op, args))
                return True
            self._shed(op, args)
            return False
        task = loop.create_task(self._background(op, *args))
        self.pending.add(task)
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Task[Any]) -> None:
        """A send landed: the oldest write waiting for room goes now."""
        self.pending.discard(task)
        if self.waiting and self.down_since is None and not self.store._closing:
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
        store = self.store
        if self.down_since is not None or store._closing or store._closed:
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
        cached = self.cached
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
        if store._closing or store._closed:
            return
        if self.down_since is None and cached is not None:
            if cached.state in _JUDGING:
                self._add(cached.gen, code)
            return
        self._unshared_add(code, 1)

    def _unshared_add(self, code: int, n: int) -> None:
        """Keep outcomes judged locally while Redis is away, as runs (folded past a bound)."""
        if self.store._closing or self.store._closed:
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
        """Aggregate ``n`` outcomes of closed calls; send when due (see RedisStore)."""
        if self.batch and gen != self.batch_gen:
            self._kick()  # another generation: the batch so far goes now
            if self.batch:  # (a send is in flight: it will take this one first)
                self._send_sync_fallback()
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

    def _send_sync_fallback(self) -> None:
        """A batch of an older generation still waits behind a send in flight: its
        outcomes count for nothing in Redis (the generation moved on), so drop
        them the way the script would."""
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
        self.merged += 1
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
        loop = asyncio.get_running_loop()
        timer = self.timer
        if timer is not None:
            if timer.when() <= loop.time() + delay:
                return
            timer.cancel()
        self.timer = loop.call_later(delay, self._kick)

    def _kick(self) -> None:
        """Send the batch now (one send in flight; one waiting is taken by it)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.batch or (self.sending is not None and not self.sending.done()):
            return
        runs, gen = self._take()
        task = asyncio.get_running_loop().create_task(self._send(runs, gen))
        self.sending = task
        self.pending.add(task)
        task.add_done_callback(self._done)

    def _take(self) -> tuple[list[list[int]], int]:
        runs, gen = self.batch, self.batch_gen
        self.batch, self.batch_n, self.batch_failed, self.batch_slow = [], 0, 0, 0
        return runs, gen

    async def _send(self, runs: list[list[int]], gen: int) -> None:
        while runs:
            try:
                got = await self._op("batch", gen, ",".join(f"{c}x{n}" for c, n in runs))
            except BaseException:
                self._locally(runs)  # cancelled (the store closed): they count here
                raise
            if got is None:
                self._locally(runs)  # Redis is away: they count here
            runs, gen = self._take()

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.store.timeout
        while self.pending:
            left = deadline - loop.time()
            if left <= 0:
                return
            await asyncio.wait(list(self.pending), timeout=left)

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
        if self.batch:
            self._locally(self.batch)
            self._send_sync_fallback()
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
        if held or self.force_unsent:
            self._keep()

    def _keep(self) -> None:
        """Start the keeper task (one per link, owned; ended by detach)."""
        if self.keeper is not None and not self.keeper.done():
            return
        self.stop_keeping = asyncio.Event()
        self.keeper = asyncio.get_running_loop().create_task(
            self._keeping(self.stop_keeping), name=f"datapunk-breaker-keeper:{self.core.name}"
        )

    async def _keeping(self, stop: asyncio.Event) -> None:
        """While this process holds a forced state: re-read it (re-asserting it on a
        fresh shared state) every ``cache_ttl`` seconds (at least 0.05), and push a
        force made while Redis was away once it answers.  Every step is bounded
        by the store's ``timeout``."""
        interval = max(self.store.cache_ttl, 0.05)
        while (self.forced is not None or self.force_unsent) and not self.store._closing:
            waiter = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((waiter,), timeout=interval)
            finally:
                waiter.cancel()
            if stop.is_set() or self.store._closing:
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
