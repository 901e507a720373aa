-- Releases a lock only for its holder: a holder whose lock lapsed and was
-- taken by another must not delete the other's.
-- KEYS: 1 lock. ARGV: 1 the holder's token. Returns 1 if released, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
