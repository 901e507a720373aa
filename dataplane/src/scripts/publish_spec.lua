-- Publishes a sale's applied spec for running pods to follow; bumps the
-- version only when the spec changed, so followers re-read it only then.
-- KEYS: 1 meta
-- ARGV: 1 spec (JSON)
-- Returns {changed (0|1), version}
local current = redis.call('HGET', KEYS[1], 'spec')
if current == ARGV[1] then
  return {0, tonumber(redis.call('HGET', KEYS[1], 'spec_version') or '0')}
end
redis.call('HSET', KEYS[1], 'spec', ARGV[1])
return {1, redis.call('HINCRBY', KEYS[1], 'spec_version', 1)}
