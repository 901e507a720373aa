-- Moves an order to a new status if its current status is one of the allowed
-- ones, so a late or repeated update never overwrites a final state.
-- KEYS: 1 orders
-- ARGV: 1 order id, 2 new status, 3.. allowed current statuses
-- Returns {'moved', previous} | {'noop', current} | {'unknown', ''}
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return {'unknown', ''} end
local rec = cjson.decode(raw)
for i = 3, #ARGV do
  if rec.status == ARGV[i] then
    local previous = rec.status
    rec.status = ARGV[2]
    redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
    return {'moved', previous}
  end
end
return {'noop', rec.status}
