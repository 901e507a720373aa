-- Routes a batch of push events (a consumer's confirmed batch) in one call:
-- one MGET of the users' registry entries, then a PUBLISH on the channel of
-- each pod that holds one of those sockets. All keys share the sale's hash tag.
-- KEYS: the push registry entries of the events' users, one per event
-- ARGV: 1 channel prefix (the pod name is appended), 2.. the messages, in KEYS order
-- Returns how many events reached a subscriber.
local pods = redis.call('MGET', unpack(KEYS))
local reached = 0
for i, pod in ipairs(pods) do
  if pod then
    if redis.call('PUBLISH', ARGV[1] .. pod, ARGV[i + 1]) > 0 then reached = reached + 1 end
  end
end
return reached
