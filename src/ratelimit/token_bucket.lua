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
-- call stays one key on one node: field `t` packs the token limits' state (below), and
-- one field `s:<instance>` per gateway instance that settled reservations here holds the
-- sequence number of the last batch of settlements it applied. Then
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
-- With ARGV[3] (cost) 0 the call only settles, and returns {1}. Otherwise it returns ten
-- little-endian doubles packed in one string (all whole numbers): tokens left * 1000
-- (floored), ms until full, ms until `cost` tokens are available (0 when they are), why
-- (0 admitted, 1 requests, 2 tokens, 3 larger than the token bucket, 4 budget), LLM
-- tokens left (floored, never below 0), ms until the token bucket is full, ms until the
-- reservation fits (0 when it does or never can), budget left, ms until the budget's
-- period ends, the budget period (numbered; -1: no budget).
-- All limits admit the request or none is charged.
--
-- Why packed: Redis 7.0 turns every Lua number it is handed into text with `%.17g`
-- (~2.5k instructions each) and text back into a number with strtod, and the gateway's
-- Redis client spends ~700 instructions on each integer of an array reply. Packing the
-- token state into one field and the reply into one string took the token call from
-- 122k to 90k instructions in Redis (the request-only call: 78k), and the gateway's
-- extra work for token limits from 13.4k to 4.2k instructions a request
-- (scripts/limiter_callgrind.sh, scripts/gateway_callgrind.sh).
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
-- How much further than needed an expiry is pushed when it must grow, so that a busy
-- key moves it once in ten minutes rather than on every call.
local EXPIRY_SLACK_MS = 600000
-- Locals, not globals: each global (`math.max`) is two table lookups per use, and this
-- path uses them a few dozen times a call.
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min

-- Everything the call needs in one read: the limits, and the sending instance's
-- watermark when a batch of settlements rides along.
local watermark = nil
local state
if nargs == 7 then
  state = redis.call('HMGET', KEYS[1], 'tokens', 'last_refill', 't')
else
  watermark = 's:' .. ARGV[8]
  state = redis.call('HMGET', KEYS[1], 'tokens', 'last_refill', 't', watermark)
end

-- Field `t`: the token bucket (math.huge: none kept), the budget's period (-1: none)
-- and the tokens it used, the key's expiry as this script last set it (ms since the
-- epoch) and the `last_refill` it wrote with it.
local llm, stored_period, stored_used, expires, written = math.huge, -1, 0, 0, nil
if state[3] then
  llm, stored_period, stored_used, expires, written = struct.unpack('<ddddd', state[3])
end

-- Both buckets refill from one stored time (written together, so it is each one's);
-- inlined rather than `refilled` above: a closure call per bucket costs more here.
local tokens, last = state[1], state[2]
local llm_rate = per_minute / 60
local expiry_unknown = false
if tokens and last then
  tokens, last = tokens + 0, last + 0
  if written and written ~= last then
    -- The request-only path wrote here since (a tier that dropped its token limits, or
    -- an instance not reloaded yet), and set the expiry to its bucket's time to full:
    -- the real one, then, to lengthen below if it is too short for the token limits.
    local pttl = redis.call('PTTL', KEYS[1])
    expires = (pttl > 0) and (now * 1000 + pttl) or 0
    expiry_unknown = true
  end
  local elapsed = 0
  if now > last then
    elapsed = now - last
    last = now
  end
  tokens = min(capacity, tokens + elapsed * rate)
  llm = min(per_minute, llm + elapsed * llm_rate)
else
  tokens, last, llm = capacity, now, per_minute
end
if per_minute <= 0 then
  llm = math.huge
end

-- Earlier requests' settlements, before this request is decided: applied when the batch
-- is newer than the last one this instance had applied here, else dropped.
if watermark then
  local applied = state[4]
  if applied == false or applied + 0 < ARGV[9] + 0 then
    if applied == false then
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
    if stored_period >= 0 then
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

-- The decision (a call that only settles decides nothing).
local why, used = 0, 0
local requests_ok, llm_ok, too_large = true, true, false
if cost > 0 then
  if budget > 0 and stored_period == period then
    used = stored_used
  end
  requests_ok = tokens + 1e-9 >= cost
  if per_minute > 0 then
    too_large = reserve > per_minute
    llm_ok = not too_large and llm + 1e-9 >= reserve
  end
  if too_large then
    why = 3
  elseif budget > 0 and used + reserve > budget then
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
      stored_period, stored_used = period, used
    end
  end
end

-- The state goes back when the request was admitted or a batch was applied. The key
-- lives as long as any of it matters: until both buckets are full, past the budget's
-- period and at least KEEP_MS (so a batch's retries find its watermark). Its expiry is
-- only ever lengthened: a key living longer than needed changes no decision (a missing
-- bucket is a full one, and a longer-lived bucket refills to full all the same).
-- A denial writes nothing, but when the expiry was found shortened it lengthens it all
-- the same: a spent budget, with only denials since, must not expire with the request
-- bucket.
local write = (cost > 0 and why == 0) or watermark
if write or expiry_unknown then
  local now_ms = now * 1000
  local ttl = max(KEEP_MS, (capacity - tokens) / rate * 1000, (period_end - now) * 1000 + 60000)
  if per_minute > 0 then
    ttl = max(ttl, (per_minute - llm) / llm_rate * 1000)
  end
  local extend = expires < now_ms + ttl
  if extend then
    expires = ceil(now_ms + ttl + EXPIRY_SLACK_MS)
  end
  -- `tokens` and `last_refill` as numbers (the request-only path reads them), the rest
  -- packed: no number formatted or parsed as text.
  if write then
    local packed = struct.pack('<ddddd', llm, stored_period, stored_used, expires, last)
    if watermark then
      redis.call('HSET', KEYS[1], 'tokens', tokens, 'last_refill', last, 't', packed,
        watermark, ARGV[9])
    else
      redis.call('HSET', KEYS[1], 'tokens', tokens, 'last_refill', last, 't', packed)
    end
  end
  if extend then
    redis.call('PEXPIREAT', KEYS[1], expires)
  end
end

if cost == 0 then
  return {1}
end

local retry, llm_left, llm_retry, llm_to_full, budget_left, period_left = 0, 0, 0, 0, 0, 0
if not requests_ok then
  retry = (cost - tokens) / rate
end
if per_minute > 0 then
  if not llm_ok and not too_large then
    llm_retry = (reserve - llm) / llm_rate
  end
  llm_left = max(0, floor(llm))
  llm_to_full = (per_minute - llm) / llm_rate
end
if budget > 0 then
  budget_left = max(0, budget - used)
  period_left = max(0, ceil((period_end - now) * 1000))
end
return struct.pack('<dddddddddd', floor(tokens * 1000),
  ceil((capacity - tokens) / rate * 1000), ceil(retry * 1000), why, llm_left,
  ceil(llm_to_full * 1000), ceil(llm_retry * 1000), budget_left, period_left, period)
