-- Routes one push event to the gateway pod holding the user's WebSocket: one
-- GET of the user's registry entry, and a PUBLISH on that pod's channel only.
-- A user without a socket costs the GET alone.
-- KEYS: 1 push registry entry of the user
-- ARGV: 1 channel prefix (the pod name is appended), 2 message
-- Returns the number of subscribers reached (0 when nobody listens).
local pod = redis.call('GET', KEYS[1])
if not pod then return 0 end
return redis.call('PUBLISH', ARGV[1] .. pod, ARGV[2])
