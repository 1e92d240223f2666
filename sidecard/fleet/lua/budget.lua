-- An operator's look at one budget key of the fleet, or its reset (`sidecardctl budget`, `budget reset`): the
-- spend in the window and what requests in flight reserved; a reset zeroes the spend and keeps the reservations
-- (their requests settle their real cost into the new count).
--
-- KEYS: 1 schema, 2 the budget key.
-- ARGV: 1 schema version, 2 "read" or "reset", 3 "hour" or "calendar", 4 window start (hour: the current minute), 5 window end.
-- Reply: {spent, reserved} before the reset.

local b = read_budget({key = KEYS[2], kind = ARGV[3], start = tonumber(ARGV[4]), finish = tonumber(ARGV[5])})
if ARGV[2] == 'reset' then
  if b.kind == 'hour' then
    local minutes = {}
    for _, name in ipairs(redis.call('HKEYS', KEYS[2])) do
      if name ~= 'reserved' then table.insert(minutes, name) end
    end
    if #minutes > 0 then redis.call('HDEL', KEYS[2], unpack(minutes)) end
  elseif b.stored_start ~= nil then
    redis.call('HSET', KEYS[2], 'start', fmt(math.max(b.stored_start, b.start)), 'spent', '0')
  end
end
return {fmt(b.spent), fmt(b.reserved)}
