-- The coalescing leader's answer goes into the shared cache: the entry (with its times), its lease released,
-- and the followers told (a message on the cache channel naming the key), if any follows.
--
-- KEYS: 1 schema, 2 cache entry, 3 lease.
-- ARGV: 1 schema version, 2 answer, 3 stored_at, 4 expires_at, 5 stale_until, 6 ttl ms (until stale_until),
--       7 max entry bytes, 8 lease token ("" none), 9 channel, 10 cache key.
-- Reply: 1 stored, 0 too large (the lease is released all the same, so a follower takes over).

local holder, _, followed = lease_holder(KEYS[3])
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'none' and kind ~= 'hash' then
  fail(KEYS[2], 'a ' .. kind .. ', not a cache entry')
end

local stored = 0
if #ARGV[2] <= tonumber(ARGV[7]) then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'p', ARGV[2], 's', ARGV[3], 'e', ARGV[4], 'x', ARGV[5])
  redis.call('PEXPIRE', KEYS[2], math.max(1, tonumber(ARGV[6])))
  stored = 1
end
if holder ~= nil and ARGV[8] ~= '' and holder == ARGV[8] then
  redis.call('DEL', KEYS[3])
end
if followed then redis.call('PUBLISH', ARGV[9], ARGV[10]) end  -- nobody follows: nobody to tell
return stored
