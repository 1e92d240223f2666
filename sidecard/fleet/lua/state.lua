-- Operator state: a versioned document, written with a compare-and-set on its version, and the new version
-- announced on the state channel.
--
-- KEYS: 1 schema, 2 state (hash: v = version, doc = document).
-- ARGV: 1 schema version, 2 "cas" or "seed", 3 expected version (cas) or the version to seed with,
--       4 document, 5 channel.
-- cas: writes when the stored version is the expected one (0: none yet), as expected + 1.
-- seed: writes only when there is no document at all (the store lost it), at the given version.
-- Reply: {1, new version} written, {0, version found} not written.

local stored = redis.call('HGET', KEYS[2], 'v')
local current = 0
if stored then
  current = number(stored, KEYS[2], 'the version')
end
local version = tonumber(ARGV[3])
if ARGV[2] == 'seed' then
  if stored then return {0, current} end
else
  if current ~= version then return {0, current} end
  version = version + 1
end
redis.call('HSET', KEYS[2], 'v', version, 'doc', ARGV[4])
redis.call('PUBLISH', ARGV[5], version)
return {1, version}
