-- The shared breaker's rules, run by Redis (breaker/shared.py loads it).
-- One script per primitive: ARGV[1] is the operation (read, acquire, record,
-- release, force), ARGV[2] the configuration as JSON, ARGV[3] a uniform random
-- number for the open-duration jitter, then the operation's arguments, the
-- state the caller holds (code or -1) with its seconds left (see "hold"), and
-- last the time of an installed fake clock ('' for Redis's ``TIME``).
-- Reply: {state, generation, remaining_us, granted (0/1/2=probe), free permits,
-- consecutive failures, window calls, window failures, window slow calls,
-- corrupt (0: no, 1: reset, 2: an open or half-open period longer than this
-- configuration allows, shortened), reason of a transition made now (or ""),
-- shadow trip (0/1), pristine (1: made from nothing and no transition since)}.
-- Every number read is checked: integers must be exact in a Lua number (at
-- most 2^52, or the reply would carry a garbled integer and every process
-- would fall back for good), times finite, a window head not in the future.
-- Generations only grow (a fresh state starts at Redis's time in ms), so a
-- link can tell an older reply from a newer one.
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
