-- Put before every script: helpers, and the schema check (KEYS[1] is the schema key, ARGV[1] the version
-- this sidecard speaks). A namespace another version wrote to is refused whole, before anything is touched.

local function fail(key, what)
  error({err = 'SIDECARD_DATA ' .. key .. ': ' .. what})
end

local function number(value, key, what)
  local n = tonumber(value)
  if n == nil or n ~= n then fail(key, what .. ' is not a number') end
  return n
end

local function fmt(x)
  return string.format('%.17g', x)
end

-- A reservation's spec is "estimate\tbudget key\t...": give the estimate back to each budget that still exists.
-- pcall: garbage in one budget must not block the others, nor the reaping.
local function give_back(spec)
  local estimate
  for part in string.gmatch(spec, '[^\t]+') do
    if estimate == nil then
      estimate = tonumber(part) or 0
    elseif redis.call('EXISTS', part) == 1 then
      local left = tonumber(redis.pcall('HINCRBYFLOAT', part, 'reserved', -estimate))
      if left ~= nil and left < 1e-9 then redis.call('HSET', part, 'reserved', '0') end  -- no float dust
    end
  end
end

-- A coalescing lease is "token|expires_at|followed" in the callers' time ("followed": "1" once a follower
-- waits, so a landing is announced only when someone listens; "token|expires_at" reads as not followed); the
-- key's own expiry only clears leftovers.
local function lease_holder(key)
  local value = redis.call('GET', key)
  if not value then return nil, nil, false end
  local token, expires_at, followed = string.match(value, '^(.*)|([^|]*)|([01])$')
  if token == nil then
    token, expires_at = string.match(value, '^(.*)|([^|]*)$')
    followed = '0'
  end
  if token == nil then fail(key, 'not a lease') end
  return token, number(expires_at, key, 'a lease expiry'), followed == '1'
end

local function set_lease(key, token, now, ms, followed)
  redis.call('SET', key, token .. '|' .. fmt(now + ms / 1000) .. (followed and '|1' or '|0'), 'PX', math.ceil(ms * 2 + 1000))
end

do
  local schema = redis.call('GET', KEYS[1])
  if schema == false then
    redis.call('SET', KEYS[1], ARGV[1])
  elseif schema ~= ARGV[1] then
    return redis.error_reply('SIDECARD_SCHEMA ' .. KEYS[1] .. ' is "' .. string.sub(schema, 1, 64) .. '", this sidecard speaks "' .. ARGV[1] .. '"')
  end
end

-- A budget's hash read into B (B.key, B.kind: "hour" or "calendar", B.start set): B.reserved; B.spent, in the
-- window (an hour's minutes from B.start - 59 on, or the calendar window's total if it is this window or a later
-- one: a sidecar whose clock is behind counts against it, the safe side); B.minutes {minute, usd} counted and
-- B.old, the names of minutes gone out of the hour. Garbage aborts the script before anything is written.
local function read_budget(b)
  b.spent, b.reserved, b.minutes, b.old = 0, 0, {}, {}
  local fields = redis.call('HGETALL', b.key)
  for j = 1, #fields, 2 do
    local name, value = fields[j], number(fields[j + 1], b.key, fields[j])
    if name == 'reserved' then
      b.reserved = math.max(0, value)
    elseif b.kind == 'hour' then
      local minute = number(name, b.key, 'a minute')
      if minute >= b.start - 59 then
        b.spent = b.spent + value
        table.insert(b.minutes, {minute, value})
      else
        table.insert(b.old, name)
      end
    elseif name == 'start' then
      b.stored_start = value
    elseif name == 'spent' then
      b.calendar_spent = value
    else
      fail(b.key, 'unknown field ' .. string.sub(name, 1, 32))
    end
  end
  if b.kind ~= 'hour' and b.stored_start ~= nil and b.stored_start >= b.start then
    b.spent = b.calendar_spent or 0
  end
  return b
end
