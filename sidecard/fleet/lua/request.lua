-- The request path's one round trip: cache lookup, rate limits (GCRA), budget reservation, coalescing lease.
-- Reads and checks everything first and writes only after, so a garbage key aborts with no partial effect.
-- Time is ARGV (the caller's wall clock), never the server's: tests pass it, and all sidecars share one base.
--
-- KEYS: 1 schema, 2 reservations (zset id -> expiry), 3 reservation specs (hash id -> "estimate\tkey\tkey..."),
--       4 cache entry, 5 lease, then n_rate rate keys, then n_budget budget keys, then the cache flush marks.
-- ARGV: 1 schema version, 2 now, 3 cache mode (0 none, 1 lookup only, 2 lookup, then a lease on a miss),
--       4 lease token, 5 lease ms, 6 n_rate, 7 n_budget, 8 estimate usd, 9 reservation id ("" none),
--       10 reservation expiry, then per rate key: rate_per_s, burst, amount;
--       then per budget key: "hour" or "calendar", hard usd (-1: none), window start (hour: the current minute), window end;
--       then n_mark, and the fields of the flush marks that cover this request's answer.
-- Reply: {"hit", payload, stored_at, expires_at} | {"miss"} | {"rate", wait_s, index}
--      | {"budget", index, reset_at, spent, reserved, ...per key} | {"ok", lease, lease_ttl_ms, spent, reserved, ...per key}
--      (lease: "leader", "follower" or "none")

local now = tonumber(ARGV[2])
local mode = tonumber(ARGV[3])
local n_rate = tonumber(ARGV[6])
local n_budget = tonumber(ARGV[7])

-- Reservations whose sidecar never settled them (it died) lapse: a few per call, so none is ever slow.
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 8)
for _, id in ipairs(lapsed) do
  local spec = redis.call('HGET', KEYS[3], id)
  if spec then give_back(spec) end
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end

local holder, holder_expires, followed
if mode == 2 then
  holder, holder_expires, followed = lease_holder(KEYS[5])
end

-- 1. The shared cache: a fresh answer ends the request here, before any limit (as the local cache does).
if mode == 1 or mode == 2 then
  local entry = redis.call('HMGET', KEYS[4], 'p', 's', 'e', 'x')
  if entry[1] then
    local stored_at = number(entry[2], KEYS[4], 'stored_at')
    local expires_at = number(entry[3], KEYS[4], 'expires_at')
    -- An entry stored at or before a flush that covers it is gone (for stale-if-error and followers too).
    local marks_at = 10 + n_rate * 3 + n_budget * 4
    local n_mark = tonumber(ARGV[marks_at + 1])
    if n_mark > 0 then
      local marks = redis.call('HMGET', KEYS[6 + n_rate + n_budget], unpack(ARGV, marks_at + 2, marks_at + 1 + n_mark))
      for _, mark in ipairs(marks) do
        if mark and stored_at <= number(mark, KEYS[6 + n_rate + n_budget], 'a flush time') then
          redis.call('DEL', KEYS[4])
          expires_at = -math.huge
          break
        end
      end
    end
    if now < expires_at then
      return {'hit', entry[1], entry[2], entry[3]}
    end
  elseif entry[2] or entry[3] then
    fail(KEYS[4], 'a cache entry without its answer')
  end
  if mode == 1 then
    return {'miss'}
  end
end

-- 2. Rate limits: the worst wait refuses, and nothing is taken; otherwise every bucket is taken from.
local tats = {}
local worst, worst_index = 0, 0
for i = 1, n_rate do
  local key = KEYS[5 + i]
  local base = 10 + (i - 1) * 3
  local rate, burst, amount = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local stored = redis.call('GET', key)
  local tat = -math.huge
  if stored then tat = number(stored, key, 'a rate limit') end
  tats[i] = tat
  local wait
  if amount > burst then
    wait = math.max(0, tat - now)
  else
    wait = math.max(0, math.max(tat, now) + (amount - burst) / rate - now)
  end
  if wait > worst then worst, worst_index = wait, i end
end

-- Budgets are read before anything is written, so garbage there leaves the buckets untouched.
local budgets = {}
local budget_base = 10 + n_rate * 3
for i = 1, n_budget do
  local key = KEYS[5 + n_rate + i]
  local base = budget_base + (i - 1) * 4
  local kind, hard, start, finish = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  budgets[i] = read_budget({key = key, kind = kind, hard = hard, start = start, finish = finish})
end

if worst > 0 then
  return {'rate', fmt(worst), worst_index}
end
for i = 1, n_rate do
  local key = KEYS[5 + i]
  local base = 10 + (i - 1) * 3
  local rate, amount = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 3])
  local tat = math.max(tats[i], now) + amount / rate
  redis.call('SET', key, fmt(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
end

-- 3. Budgets: spent + reserved + this request's worst case against the hard limit. The refusal reported is
-- the one that lets the request through last.
local estimate = tonumber(ARGV[8])
local usage = {}
local refused, refused_at = 0, nil
for i, b in ipairs(budgets) do
  table.insert(usage, fmt(b.spent))
  table.insert(usage, fmt(b.reserved))
  if b.hard >= 0 and b.spent + b.reserved + estimate > b.hard then
    local at
    if b.kind == 'hour' then
      table.sort(b.minutes, function(x, y) return x[1] < y[1] end)
      at = (b.start + 60) * 60
      local tail = b.spent
      for _, m in ipairs(b.minutes) do
        tail = tail - m[2]
        if tail + b.reserved + estimate <= b.hard then
          at = (m[1] + 60) * 60
          break
        end
      end
    else
      at = b.finish
    end
    if refused_at == nil or at > refused_at then refused, refused_at = i, at end
  end
end
if refused > 0 then
  local reply = {'budget', refused, fmt(refused_at)}
  for _, value in ipairs(usage) do table.insert(reply, value) end
  return reply
end

if ARGV[9] ~= '' and n_budget > 0 then
  local spec = {fmt(estimate)}
  for _, b in ipairs(budgets) do
    table.insert(spec, b.key)
    redis.call('HINCRBYFLOAT', b.key, 'reserved', estimate)
    if b.kind == 'hour' then
      redis.call('EXPIRE', b.key, 7200)
    else
      if b.stored_start == nil or b.stored_start < b.start then
        redis.call('HSET', b.key, 'start', fmt(b.start), 'spent', '0')
      end
      -- A day past the window's end: reservations made in it may settle in the next one.
      redis.call('EXPIRE', b.key, math.ceil(b.finish - now) + 86400)
    end
  end
  redis.call('ZADD', KEYS[2], ARGV[10], ARGV[9])
  redis.call('HSET', KEYS[3], ARGV[9], table.concat(spec, '\t'))
end

-- 4. The coalescing lease: the first caller leads (calls upstream), the others follow until it lands or its
-- lease runs out (the leader died), and then one of them leads.
local lease, ttl = 'none', 0
if mode == 2 then
  if holder == nil or now >= holder_expires then
    set_lease(KEYS[5], ARGV[4], now, tonumber(ARGV[5]), false)
    lease, ttl = 'leader', tonumber(ARGV[5])
  else
    if not followed then  -- the leader's landing will be announced
      redis.call('SET', KEYS[5], holder .. '|' .. fmt(holder_expires) .. '|1', 'KEEPTTL')
    end
    lease, ttl = 'follower', math.ceil((holder_expires - now) * 1000)
  end
end
local reply = {'ok', lease, ttl}
for _, value in ipairs(usage) do table.insert(reply, value) end
return reply
