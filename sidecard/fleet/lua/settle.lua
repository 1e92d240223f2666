-- A request is over: its reservation becomes its real cost, and its token buckets are corrected from the
-- estimate to the real count. Reads and checks first, writes after (a garbage key aborts with no effect).
--
-- KEYS: 1 schema, 2 reservations, 3 reservation specs, then n_budget budget keys, then n_token token-rate keys.
-- ARGV: 1 schema version, 2 now, 3 reservation id ("" none), 4 cost usd, 5 n_budget, 6 n_token,
--       then per budget key: "hour" or "calendar", window start (hour: the current minute), window end, soft usd (-1: none);
--       then per token key: rate_per_s, tokens to add (negative: give back);
--       then, for spend carried in after an outage only: its id and the time it is sent (KEYS: then the carried set).
-- Reply: {spent after, ...per budget key, then the indexes of budget keys whose soft limit this cost crossed}

local now = tonumber(ARGV[2])
local cost = tonumber(ARGV[4])
local n_budget = tonumber(ARGV[5])
local n_token = tonumber(ARGV[6])

local budgets = {}
for i = 1, n_budget do
  local key = KEYS[3 + i]
  local base = 6 + (i - 1) * 4
  -- (its reserved sum is counted below, after this request's own reservation is released)
  budgets[i] = read_budget({key = key, kind = ARGV[base + 1], start = tonumber(ARGV[base + 2]),
                            finish = tonumber(ARGV[base + 3]), soft = tonumber(ARGV[base + 4])})
end
local tats = {}
for i = 1, n_token do
  local key = KEYS[3 + n_budget + i]
  local stored = redis.call('GET', key)
  if stored then tats[i] = number(stored, key, 'a rate limit') end
end

-- Spend carried in after an outage counts once: a retry of one that landed (its reply lost) adds nothing.
local once = ARGV[7 + n_budget * 4 + n_token * 2]
if once ~= nil then
  local carried, at = KEYS[4 + n_budget + n_token], tonumber(ARGV[8 + n_budget * 4 + n_token * 2])
  redis.call('ZREMRANGEBYSCORE', carried, '-inf', at)
  if redis.call('ZADD', carried, 'NX', at + 172800, once) == 0 then cost = 0 end
end

-- The reservation, unless it lapsed (then the reaper already gave it back).
if ARGV[3] ~= '' and redis.call('ZREM', KEYS[2], ARGV[3]) == 1 then
  local spec = redis.call('HGET', KEYS[3], ARGV[3])
  redis.call('HDEL', KEYS[3], ARGV[3])
  if spec then give_back(spec) end
end

local crossed = {}
local reply = {}
for i, b in ipairs(budgets) do
  local before = b.spent
  -- (a carried cost whose calendar window is over is not counted in the next one)
  if cost > 0 and not (once ~= nil and b.kind ~= 'hour' and b.stored_start ~= nil and b.stored_start > b.start) then
    if b.kind == 'hour' then
      redis.call('HINCRBYFLOAT', b.key, tostring(b.start), fmt(cost))
      if #b.old > 0 then redis.call('HDEL', b.key, unpack(b.old)) end
      redis.call('EXPIRE', b.key, 7200)
    else
      if b.stored_start == nil or b.stored_start < b.start then
        redis.call('HSET', b.key, 'start', fmt(b.start), 'spent', fmt(cost))
      else
        redis.call('HINCRBYFLOAT', b.key, 'spent', fmt(cost))
      end
      redis.call('EXPIRE', b.key, math.ceil(b.finish - now) + 86400)
    end
    if b.soft >= 0 and before < b.soft and b.soft <= before + cost then
      table.insert(crossed, i)
    end
    b.spent = before + cost
  end
  table.insert(reply, fmt(b.spent))
end

-- Token buckets: charge the difference even into debt; give back never beyond full. A bucket that is gone
-- was full, and stays so.
for i = 1, n_token do
  if tats[i] ~= nil then
    local key = KEYS[3 + n_budget + i]
    local base = 6 + n_budget * 4 + (i - 1) * 2
    local rate, delta = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
    local tat = math.max(now, math.max(tats[i], now) + delta / rate)
    redis.call('SET', key, fmt(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
  end
end

for _, i in ipairs(crossed) do table.insert(reply, i) end
return reply
