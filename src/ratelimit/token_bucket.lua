-- token_bucket.lua: one atomic admission decision for one client.
--
-- KEYS[1]  the client's request bucket, a hash with fields `tokens` and `last_refill`
-- ARGV[1]  capacity (bucket size)
-- ARGV[2]  refill rate, tokens per second (may be fractional)
-- ARGV[3]  cost of this request in tokens
--
-- With these three arguments, returns {allowed (1|0), tokens left * 1000 (floored), ms until full
-- (ceiled), ms until `cost` tokens are available (ceiled, 0 when allowed)}.
--
-- With token limits (CONTRACT §13) the same key holds every limit of the client, so a
-- call stays one key on one node: field `llm` (the LLM-token bucket, ARGV[5] per
-- minute, refilled from the same `last_refill` as the request bucket), `period` and
-- `used` (the budget), and one field `s:<instance>` per gateway instance that settled
-- reservations here: the sequence number of the last batch of settlements it applied.
-- Then
-- ARGV[4]  the LLM tokens this request reserves
-- ARGV[5]  tokens per minute (0: no token bucket)
-- ARGV[6]  the budget (0: no budget)
-- ARGV[7]  the budget's period: `day` or `month` (UTC)
-- ARGV[8..] optionally, a batch of earlier requests' settlements to apply first:
--          the sending instance's id, the batch's sequence number (rising with every
--          batch of that instance), the LLM tokens to give back to the token bucket (up
--          to its capacity; negative: a debt, which may take the bucket below zero and
--          refills like the rest), then pairs (budget period, tokens to give back to the
--          budget of that period; negative: a debt). A batch is applied once: one whose
--          number is not above the instance's `s:` field was applied already, and a
--          batch re-sent after a call that failed (and may have run) changes nothing.
--          A period that has ended no longer counts, so its pairs are dropped.
-- With ARGV[3] (cost) 0 the call only settles, and returns {1}. Otherwise it returns the
-- four values above, then {why (0 admitted, 1 requests, 2 tokens, 3 larger than the
-- token bucket, 4 budget), LLM tokens left (floored, never below 0), ms until the token
-- bucket is full, ms until the reservation fits (0 when it does or never can), budget
-- left, ms until the budget's period ends, the budget period (numbered; -1: no budget)}.
-- All limits admit the request or none is charged.
--
-- The clock is Redis' own TIME, so gateway instances with skewed clocks cannot mint
-- tokens. A missing bucket is a full one, so a bucket key expires exactly when the
-- bucket would be full again: expiry never changes a decision. (With token limits it
-- lives at least an hour, and past its budget's period.)
-- Text to number in one parse: Lua 5.1's `tonumber` parses a string twice (`lua_isnumber`,
-- then `lua_tonumber`), and strtod was a tenth of this script's cost (callgrind on
-- redis-server); arithmetic coerces a numeric string with one parse. `false` (a missing
-- hash field) gives nil. Every argument and field is written by the gateway or this script.
local function num(text)
  if text then
    return text + 0
  end
end

local capacity = ARGV[1] + 0
local rate = ARGV[2] + 0
local cost = ARGV[3] + 0

local time = redis.call('TIME')
local now = time[1] + time[2] / 1000000

-- A bucket's tokens (stored as strings; none stored: a full bucket) refilled up to now,
-- and the time they count from.
local function refilled(stored_tokens, stored_last, size, per_second)
  local tokens = num(stored_tokens)
  local last = num(stored_last)
  if tokens == nil or last == nil then
    return size, now
  end
  -- A clock that went backwards (failover to a replica) refills nothing; it never drains.
  if now > last then
    tokens = tokens + (now - last) * per_second
    last = now
  end
  if tokens > size then
    tokens = size
  end
  return tokens, last
end

if #ARGV == 3 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'last_refill')
  local tokens, last = refilled(state[1], state[2], capacity, rate)
  -- The small tolerance absorbs floating-point error in the refill product.
  local allowed = 0
  local retry = 0
  if tokens + 1e-9 >= cost then
    tokens = math.max(0, tokens - cost)
    allowed = 1
    -- Only an admitted request changes the state: a denial leaves a bucket (and a TTL)
    -- whose refill from the stored point is exactly what we just computed.
    -- Numbers go to Redis as they are: every Redis writes a Lua number argument exactly
    -- ("%.17g", or the shortest round-trip form since 7), cheaper than string.format.
    redis.call('HSET', KEYS[1], 'tokens', tokens, 'last_refill', last)
    redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((capacity - tokens) / rate * 1000)))
  else
    retry = (cost - tokens) / rate
  end
  local to_full = (capacity - tokens) / rate
  return {allowed, math.floor(tokens * 1000), math.ceil(to_full * 1000), math.ceil(retry * 1000)}
end

local reserve = ARGV[4] + 0
local per_minute = ARGV[5] + 0
local budget = ARGV[6] + 0
local nargs = #ARGV
-- How long a client's hash outlives its last write at least, and how long an instance's
-- settlement watermark is kept without news from it: far longer than a batch's retries.
local KEEP_MS = 3600000
-- Locals, not globals: each global (`math.max`) is two table lookups per use, and this
-- path uses them a few dozen times a call.
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min

-- Everything the call needs in one read: the limits, and the sending instance's
-- watermark when a batch of settlements rides along.
local watermark = nil
local state
if nargs == 7 then
  state = redis.call('HMGET', KEYS[1], 'tokens', 'last_refill', 'llm', 'period', 'used')
else
  watermark = 's:' .. ARGV[8]
  state = redis.call('HMGET', KEYS[1], 'tokens', 'last_refill', 'llm', 'period', 'used', watermark)
end

-- Both buckets refill from one stored time (written together, so it is each one's);
-- inlined rather than `refilled` above: a closure call per bucket costs more here.
local tokens, last = num(state[1]), num(state[2])
local llm, llm_rate = 0, per_minute / 60
local stored_llm = num(state[3])
if tokens == nil or last == nil then
  tokens, last = capacity, now
  llm = per_minute
else
  local elapsed = 0
  if now > last then
    elapsed = now - last
    last = now
  end
  tokens = min(capacity, tokens + elapsed * rate)
  if per_minute > 0 then
    if stored_llm == nil then
      llm = per_minute
    else
      llm = min(per_minute, stored_llm + elapsed * llm_rate)
    end
  end
end
if per_minute <= 0 then
  llm = 0
end
local stored_period = num(state[4])
-- The stored period's own text, written back as it is while it holds: a Lua number
-- argument costs Redis 7.0 a `%.17g` (~4k instructions).
local period_text = state[4]
local stored_used = num(state[5]) or 0

-- Earlier requests' settlements, before this request is decided: applied when the batch
-- is newer than the last one this instance had applied here, else dropped.
if watermark then
  local applied = num(state[6])
  if applied == nil or applied < ARGV[9] + 0 then
    if applied == nil then
      -- The first batch of this instance here (or since the hash expired): a good
      -- moment to drop the watermarks of instances silent for longer than KEEP_MS (their
      -- numbers are microseconds since the epoch), so stopped instances leave nothing.
      local all = redis.call('HGETALL', KEYS[1])
      local horizon = (now * 1000 - KEEP_MS) * 1000
      local stale = nil
      for i = 1, #all, 2 do
        if string.sub(all[i], 1, 2) == 's:' and all[i + 1] + 0 < horizon then
          if stale then stale[#stale + 1] = all[i] else stale = {all[i]} end
        end
      end
      if stale then
        redis.call('HDEL', KEYS[1], unpack(stale))
      end
    end
    if per_minute > 0 then
      llm = min(per_minute, llm + ARGV[10])
    end
    if stored_period then
      for i = 11, nargs - 1, 2 do
        if ARGV[i] + 0 == stored_period then
          stored_used = max(0, stored_used - ARGV[i + 1])
        end
      end
    end
  else
    watermark = nil
  end
end

-- The budget's period, numbered, and when it ends, from Redis' clock (UTC).
local period, period_end = -1, now
if budget > 0 then
  local day = floor(now / 86400)
  if ARGV[7] == 'month' then
    local function days_from_civil(y, m, d)
      if m <= 2 then y = y - 1 end
      local era = floor(y / 400)
      local yoe = y - era * 400
      local mp = (m > 2) and (m - 3) or (m + 9)
      local doy = floor((153 * mp + 2) / 5) + d - 1
      local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
      return era * 146097 + doe - 719468
    end
    local z = day + 719468
    local era = floor(z / 146097)
    local doe = z - era * 146097
    local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524)
      - floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
    local mp = floor((5 * doy + 2) / 153)
    local m = (mp < 10) and (mp + 3) or (mp - 9)
    local y = yoe + era * 400
    if m <= 2 then y = y + 1 end
    period = y * 12 + m - 1
    if m == 12 then
      period_end = days_from_civil(y + 1, 1, 1) * 86400
    else
      period_end = days_from_civil(y, m + 1, 1) * 86400
    end
  else
    period = day
    period_end = (day + 1) * 86400
  end
end

-- Writes the state back, with the watermark of a batch just applied. The key lives as
-- long as any of it matters: until both buckets are full, past the budget's period and
-- at least KEEP_MS (so a batch's retries find its watermark).
local function store()
  -- Numbers as they are, as above (~1 us of the ~10 us call, redis-benchmark).
  -- The usual write (both token limits, no batch) passes its arguments directly:
  -- building a table to unpack cost ~8k instructions of a 167k call (callgrind).
  if per_minute > 0 and stored_period and not watermark then
    redis.call('HSET', KEYS[1], 'tokens', tokens, 'last_refill', last, 'llm', llm,
      'period', period_text, 'used', stored_used)
  else
    local values = {'tokens', tokens, 'last_refill', last}
    local n = 4
    if per_minute > 0 then
      values[n + 1], values[n + 2] = 'llm', llm
      n = n + 2
    end
    if stored_period then
      values[n + 1], values[n + 2], values[n + 3], values[n + 4] = 'period', period_text, 'used', stored_used
      n = n + 4
    end
    if watermark then
      values[n + 1], values[n + 2] = watermark, ARGV[9]
    end
    redis.call('HSET', KEYS[1], unpack(values))
  end
  local ttl = max(KEEP_MS, ceil((capacity - tokens) / rate * 1000),
    ceil((period_end - now) * 1000) + 60000)
  if per_minute > 0 then
    ttl = max(ttl, ceil((per_minute - llm) / llm_rate * 1000))
  end
  -- Only ever lengthened: a key living longer than needed changes no decision (a missing
  -- bucket is a full one, and a longer-lived bucket refills to full all the same), and
  -- with a budget the period's end sets the time to live, so most calls skip the write.
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
end

if cost == 0 then
  if watermark then
    store()
  end
  return {1}
end

local used = 0
if budget > 0 and stored_period == period then
  used = stored_used
end
local requests_ok = tokens + 1e-9 >= cost
local llm_ok, too_large = true, false
if per_minute > 0 then
  too_large = reserve > per_minute
  llm_ok = not too_large and llm + 1e-9 >= reserve
end
local budget_ok = budget <= 0 or used + reserve <= budget

local why = 0
if too_large then
  why = 3
elseif not budget_ok then
  why = 4
elseif not llm_ok then
  why = 2
elseif not requests_ok then
  why = 1
end

if why == 0 then
  tokens = max(0, tokens - cost)
  if per_minute > 0 then
    llm = llm - reserve
  end
  if budget > 0 then
    used = used + reserve
    if stored_period ~= period then
      period_text = tostring(period)
    end
    stored_period, stored_used = period, used
  end
  store()
elseif watermark then
  store()
end

local retry, llm_retry, llm_to_full, budget_left, period_left = 0, 0, 0, 0, 0
if not requests_ok then
  retry = (cost - tokens) / rate
end
if per_minute > 0 then
  if not llm_ok and not too_large then
    llm_retry = (reserve - llm) / llm_rate
  end
  llm_to_full = (per_minute - llm) / llm_rate
end
if budget > 0 then
  budget_left = max(0, budget - used)
  period_left = max(0, ceil((period_end - now) * 1000))
end
local allowed = 0
if why == 0 then
  allowed = 1
end
return {allowed, floor(tokens * 1000), ceil((capacity - tokens) / rate * 1000), ceil(retry * 1000),
  why, max(0, floor(llm)), ceil(llm_to_full * 1000), ceil(llm_retry * 1000),
  budget_left, period_left, period}
