-- Removes a user's push registry entry only if it still names this pod: the
-- user may already have reconnected to another pod, whose entry must stay.
-- KEYS: 1 push registry entry of the user
-- ARGV: 1 this pod
-- Returns 1 if removed, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
