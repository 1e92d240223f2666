-- Operator state: a versioned document, written with a compare-and-set on its version, and the new version
-- announced on the state channel.
--
-- KEYS: 1 schema, 2 state (hash: v = version, doc = document, by = the instance that wrote it,
--       seeded = "1" while the document is a sidecar's last-known copy put back after the store lost it).
-- ARGV: 1 schema version, 2 "cas" or "seed", 3 expected version (cas) or the version to seed with,
--       4 document, 5 channel, 6 instance.
-- cas: writes when the stored version is the expected one (0: none yet), as expected + 1.
-- seed: writes when there is no document, or only a seeded one of a lower version: after a store restart,
--       the newest last-known copy among the sidecars wins, and a command taken since is never undone.
-- Reply: {1, new version} written, {0, version found} not written.

local state = redis.call('HMGET', KEYS[2], 'v', 'seeded')
local current = 0
if state[1] then current = number(state[1], KEYS[2], 'the version') end
local version = tonumber(ARGV[3])
if ARGV[2] == 'seed' then
  if state[1] and not (state[2] == '1' and current < version) then return {0, current} end
  redis.call('HSET', KEYS[2], 'v', version, 'doc', ARGV[4], 'by', ARGV[6], 'seeded', '1')
else
  if current ~= version then return {0, current} end
  version = version + 1
  redis.call('HSET', KEYS[2], 'v', version, 'doc', ARGV[4], 'by', ARGV[6])
  redis.call('HDEL', KEYS[2], 'seeded')
end
redis.call('PUBLISH', ARGV[5], version)
return {1, version}
