-- A sidecar restarted under the same instance name gives back what its previous runs reserved for requests in
-- flight: those requests ended with them. An async job's reservation ("INSTANCE/job/ID") stays: the job outlives
-- the restart. Reservation ids are "INSTANCE/RUN/REQUEST" (RUN: a token per start).
--
-- KEYS: 1 schema, 2 reservations, 3 reservation specs.
-- ARGV: 1 schema version, 2 instance, 3 this run's token.
-- Reply: how many reservations were given back.

local prefix = ARGV[2] .. '/'
local released = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local run = string.sub(id, 1, #prefix) == prefix and string.match(string.sub(id, #prefix + 1), '^([^/]+)/')
  if run and run ~= 'job' and run ~= ARGV[3] then
    local spec = redis.call('HGET', KEYS[3], id)
    if spec then give_back(spec) end
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    released = released + 1
  end
end
return released
