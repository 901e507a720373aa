-- Keeps this pod's push registry entries alive without taking a user back
-- from the pod they connected to since: an entry naming this pod gets its
-- expiry back, a missing one (expired, or lost with Redis' data) is written
-- again, and one naming another pod stays (this pod's socket of that user is
-- a dead one it has not noticed yet, or a second device's; the newest
-- connection holds the entry, as when it was made).
-- KEYS: the users' registry entries (one slot: the sale's hash tag)
-- ARGV: 1 this pod, 2 TTL in seconds
-- Returns how many entries name another pod.
local others = 0
for i = 1, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[1] then
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  elseif not holder then
    redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2])
  else
    others = others + 1
  end
end
return others
