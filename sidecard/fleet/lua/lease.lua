-- A coalescing leader renews its lease while its upstream call runs, or gives it up without an answer (then
-- the followers are told, so one of them leads at once instead of waiting for the lease to run out).
--
-- KEYS: 1 schema, 2 lease.
-- ARGV: 1 schema version, 2 "renew" or "release", 3 lease token, 4 lease ms (renew), 5 channel, 6 cache key, 7 now.
-- Reply: 1 if the lease was ours, else 0 (it ran out: a follower may lead by now).

local holder, _, followed = lease_holder(KEYS[2])
if holder ~= ARGV[3] then
  return 0
end
if ARGV[2] == 'renew' then
  set_lease(KEYS[2], holder, tonumber(ARGV[7]), tonumber(ARGV[4]), followed)
else
  redis.call('DEL', KEYS[2])
  if followed then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
end
return 1
