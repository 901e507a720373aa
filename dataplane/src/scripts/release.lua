-- Ends an order that will not be fulfilled (failed persistence, payment
-- timeout) and returns its stock and the buyer's limit, exactly once: only an
-- order still 'accepted' or 'confirmed' moves; any later call is a no-op.
-- KEYS: 1 orders, 2 stock, 3 buyers, 4 info (counters)
-- ARGV: 1 order id, 2 new status ('failed' | 'cancelled'), 3 reason
-- Returns {'released', remaining} | {'noop', current status} | {'unknown', ''}
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return {'unknown', ''} end
local rec = cjson.decode(raw)
if rec.status ~= 'accepted' and rec.status ~= 'confirmed' then return {'noop', rec.status} end
count_move(KEYS[4], rec.status, ARGV[2], rec.qty)
rec.status = ARGV[2]
rec.reason = ARGV[3]
rec.status_at = now_ms()
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
local remaining = redis.call('INCRBY', KEYS[2], rec.qty)
local held = redis.call('HINCRBY', KEYS[3], rec.user, -rec.qty)
if held <= 0 then redis.call('HDEL', KEYS[3], rec.user) end
return {'released', string.format('%d', remaining)}
