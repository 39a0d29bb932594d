-- token_bucket.lua: one atomic admission decision for one client.
--
-- KEYS[1]  the client's request bucket, a hash with fields `tokens` and `last_refill`
-- ARGV[1]  capacity (bucket size)
-- ARGV[2]  refill rate, tokens per second (may be fractional)
-- ARGV[3]  cost of this request in tokens
--
-- With one key, returns {allowed (1|0), tokens left * 1000 (floored), ms until full
-- (ceiled), ms until `cost` tokens are available (ceiled, 0 when allowed)}.
--
-- With token limits (CONTRACT §13) four keys, all under the client's hash tag:
-- KEYS[2]  the LLM-token bucket (a hash like KEYS[1]; capacity ARGV[5] per minute)
-- KEYS[3]  the token budget: a hash with `period` (its number) and `used`
-- KEYS[4]  the reservations awaiting reconciliation: request id ->
--          "reserved:budget period (-1: none):1 if the token bucket was charged"
-- ARGV[4]  the LLM tokens this request reserves
-- ARGV[5]  tokens per minute (0: no token bucket)
-- ARGV[6]  the budget (0: no budget)
-- ARGV[7]  the budget's period: `day` or `month` (UTC)
-- ARGV[8]  this request's id, for its reconciliation
-- and returns the four values above, then {why (0 admitted, 1 requests, 2 tokens,
-- 3 larger than the token bucket, 4 budget), LLM tokens left (floored, never below 0),
-- ms until the token bucket is full, ms until the reservation fits (0 when it does or
-- never can), budget left, ms until the budget's period ends}.
-- All limits admit the request or none is charged.
--
-- The clock is Redis' own TIME, so gateway instances with skewed clocks cannot mint
-- tokens. A missing bucket is a full one, so a bucket key expires exactly when the
-- bucket would be full again: expiry never changes a decision.
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000

-- A bucket's tokens refilled up to now, and the time they count from.
local function refilled(key, size, per_second)
  local state = redis.call('HMGET', key, 'tokens', 'last_refill')
  local tokens = tonumber(state[1])
  local last = tonumber(state[2])
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

local function store(key, tokens, last, size, per_second)
  redis.call('HSET', key, 'tokens', string.format('%.17g', tokens),
    'last_refill', string.format('%.6f', last))
  redis.call('PEXPIRE', key, math.max(1, math.ceil((size - tokens) / per_second * 1000)))
end

local tokens, last = refilled(KEYS[1], capacity, rate)
-- The small tolerance absorbs floating-point error in the refill product.
local requests_ok = tokens + 1e-9 >= cost

if #KEYS == 1 then
  local allowed = 0
  local retry = 0
  if requests_ok then
    tokens = math.max(0, tokens - cost)
    allowed = 1
    -- Only an admitted request changes the state: a denial leaves a bucket (and a TTL)
    -- whose refill from the stored point is exactly what we just computed.
    store(KEYS[1], tokens, last, capacity, rate)
  else
    retry = (cost - tokens) / rate
  end
  local to_full = (capacity - tokens) / rate
  return {allowed, math.floor(tokens * 1000), math.ceil(to_full * 1000), math.ceil(retry * 1000)}
end

local reserve = tonumber(ARGV[4])
local per_minute = tonumber(ARGV[5])
local budget = tonumber(ARGV[6])
local id = ARGV[8]

-- The LLM-token bucket: it may hold a debt (below zero) from a reconciliation.
local llm, llm_last, llm_rate = 0, now, per_minute / 60
local llm_ok, too_large = true, false
if per_minute > 0 then
  llm, llm_last = refilled(KEYS[2], per_minute, llm_rate)
  too_large = reserve > per_minute
  llm_ok = not too_large and llm + 1e-9 >= reserve
end

-- The budget's period, numbered, and when it ends, from Redis' clock (UTC).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local period, period_end = 0, 0
local used = 0
local budget_ok = true
if budget > 0 then
  local day = math.floor(now / 86400)
  if ARGV[7] == 'month' then
    local z = day + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
      - math.floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
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
  local state = redis.call('HMGET', KEYS[3], 'period', 'used')
  if tonumber(state[1]) == period then
    used = tonumber(state[2]) or 0
  end
  budget_ok = used + reserve <= budget
end

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

local allowed = 0
if why == 0 then
  allowed = 1
  tokens = math.max(0, tokens - cost)
  store(KEYS[1], tokens, last, capacity, rate)
  if per_minute > 0 then
    llm = llm - reserve
    store(KEYS[2], llm, llm_last, per_minute, llm_rate)
  end
  if budget > 0 then
    used = used + reserve
    redis.call('HSET', KEYS[3], 'period', period, 'used', used)
    redis.call('PEXPIREAT', KEYS[3], math.ceil(period_end * 1000) + 60000)
  end
  if reserve > 0 and (per_minute > 0 or budget > 0) then
    local charged = (budget > 0) and period or -1
    local bucket = (per_minute > 0) and 1 or 0
    redis.call('HSET', KEYS[4], id, reserve .. ':' .. charged .. ':' .. bucket)
    redis.call('PEXPIRE', KEYS[4], 3600000)
  end
end

local retry = 0
if not requests_ok then
  retry = (cost - tokens) / rate
end
local llm_retry = 0
if per_minute > 0 and not llm_ok and not too_large then
  llm_retry = (reserve - llm) / llm_rate
end
local to_full = (capacity - tokens) / rate
local llm_to_full = 0
if per_minute > 0 then
  llm_to_full = (per_minute - llm) / llm_rate
end
local budget_left = 0
if budget > 0 then
  budget_left = math.max(0, budget - used)
end
return {allowed, math.floor(tokens * 1000), math.ceil(to_full * 1000), math.ceil(retry * 1000),
  why, math.max(0, math.floor(llm)), math.ceil(llm_to_full * 1000), math.ceil(llm_retry * 1000),
  budget_left, math.max(0, math.ceil((period_end - now) * 1000))}
