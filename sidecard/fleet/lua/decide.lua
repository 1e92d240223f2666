-- A fleet-wide decision taken once per record: the caller takes it only if the decision's record is still the
-- one its verdict was based on, and writes its own (a rollback of a canary: one per release of it).
--
-- KEYS: 1 schema, 2 the decision's record.
-- ARGV: 1 schema version, 2 the record read ("" none), 3 the new record, 4 its ttl ms.
-- Reply: {1, the new record} taken | {0, the record now} another sidecar took it first.

local current = redis.call('GET', KEYS[2]) or ''
if current ~= ARGV[2] then
  return {0, current}
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', math.max(1, tonumber(ARGV[4])))
return {1, ARGV[3]}
