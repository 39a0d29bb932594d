-- reconcile.lua: settles one admitted request's LLM-token reservation to what it used.
--
-- KEYS[1]  the LLM-token bucket (see token_bucket.lua)
-- KEYS[2]  the token budget
-- KEYS[3]  the reservations awaiting reconciliation
-- ARGV[1]  tokens per minute (the bucket's capacity; 0: no bucket)
-- ARGV[2]  the request's id
-- ARGV[3]  the tokens the request really used
--
-- Returns 1 when the reservation was settled now, 0 when there was none to settle (it
-- was settled already, or expired): a retried reconciliation is applied once.
-- The surplus goes back to the bucket (up to capacity) and the budget; a shortfall is
-- charged to both, so the bucket may go below zero (a debt that refills like the rest).
local entry = redis.call('HGET', KEYS[3], ARGV[2])
if not entry then
  return 0
end
redis.call('HDEL', KEYS[3], ARGV[2])
local reserved, period, bucket = string.match(entry, '^(%d+):(-?%d+):(%d)$')
if not reserved then
  return 0
end
reserved = tonumber(reserved)
period = tonumber(period)
local used = tonumber(ARGV[3])
local surplus = reserved - used
if surplus == 0 then
  return 1
end

local per_minute = tonumber(ARGV[1])
if per_minute > 0 and bucket == '1' then
  local rate = per_minute / 60
  local time = redis.call('TIME')
  local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'last_refill')
  local tokens = tonumber(state[1])
  local last = tonumber(state[2])
  if tokens == nil or last == nil then
    tokens, last = per_minute, now
  end
  if now > last then
    tokens = tokens + (now - last) * rate
    last = now
  end
  tokens = math.min(per_minute, tokens + surplus)
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
    'last_refill', string.format('%.6f', last))
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((per_minute - tokens) / rate * 1000)))
end

-- The budget is settled in the period the reservation was charged to; once that period
-- has ended, its count no longer matters.
if period >= 0 then
  local state = redis.call('HMGET', KEYS[2], 'period', 'used')
  if tonumber(state[1]) == period then
    local left = math.max(0, (tonumber(state[2]) or 0) - surplus)
    redis.call('HSET', KEYS[2], 'used', left)
  end
end
return 1
