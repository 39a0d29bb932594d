-- token_bucket.lua: one atomic token-bucket decision for one client.
--
-- KEYS[1]  the client's bucket, a hash with fields `tokens` and `last_refill` (seconds)
-- ARGV[1]  capacity (bucket size)
-- ARGV[2]  refill rate, tokens per second (may be fractional)
-- ARGV[3]  cost of this request in tokens
--
-- Returns {allowed (1|0), tokens left * 1000 (floored), ms until full (ceiled),
--          ms until `cost` tokens are available (ceiled, 0 when allowed)}.
--
-- The clock is Redis' own TIME, so gateway instances with skewed clocks cannot mint
-- tokens. A missing key is a full bucket, so the key expires exactly when the bucket
-- would be full again: expiry never changes a decision.
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000

local state = redis.call('HMGET', KEYS[1], 'tokens', 'last_refill')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = capacity
  last = now
end
-- A clock that went backwards (failover to a replica) refills nothing; it never drains.
if now > last then
  tokens = tokens + (now - last) * rate
  last = now
end
if tokens > capacity then
  tokens = capacity
end

local allowed = 0
local retry = 0
-- The small tolerance absorbs floating-point error in the refill product.
if tokens + 1e-9 >= cost then
  tokens = math.max(0, tokens - cost)
  allowed = 1
  -- Only an admitted request changes the state: a denial leaves a bucket (and a TTL)
  -- whose refill from the stored point is exactly what we just computed.
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
    'last_refill', string.format('%.6f', last))
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((capacity - tokens) / rate * 1000)))
else
  retry = (cost - tokens) / rate
end

local to_full = (capacity - tokens) / rate

return {allowed, math.floor(tokens * 1000), math.ceil(to_full * 1000), math.ceil(retry * 1000)}
