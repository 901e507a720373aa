-- Decides one purchase atomically: idempotency, sale window (Redis clock),
-- stock, per-user limit, then decrement + buyer + order record + stream entry.
-- KEYS: 1 info, 2 stock, 3 buyers, 4 useq, 5 idem, 6 orders, 7 uorders, 8 stream
-- ARGV: 1 user, 2 quantity, 3 new order id, 4 idempotency field ('' for none)
-- Returns {outcome, a, b}:
--   ok      order id, remaining      dup     order id, ''
--   nosale  '', ''                   early   start_ms, now_ms
--   ended   end_ms, now_ms           soldout remaining, ''
--   limit   units held, limit
local user, qty, oid, idem = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if idem ~= '' then
  local prev = redis.call('HGET', KEYS[5], idem)
  if prev then return {'dup', prev, ''} end
end
local info = redis.call('HMGET', KEYS[1], 'start_ms', 'end_ms', 'limit', 'price')
if not info[1] then return {'nosale', '', ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < tonumber(info[1]) then return {'early', info[1], string.format('%d', now)} end
if now >= tonumber(info[2]) then return {'ended', info[2], string.format('%d', now)} end
local remaining = tonumber(redis.call('GET', KEYS[2]) or '0')
if remaining < qty then return {'soldout', string.format('%d', remaining), ''} end
local held = tonumber(redis.call('HGET', KEYS[3], user) or '0')
if held + qty > tonumber(info[3]) then return {'limit', string.format('%d', held), info[3]} end
remaining = redis.call('DECRBY', KEYS[2], qty)
redis.call('HINCRBY', KEYS[3], user, qty)
local seq = redis.call('HINCRBY', KEYS[4], user, 1)
if idem ~= '' then redis.call('HSET', KEYS[5], idem, oid) end
redis.call('HSET', KEYS[6], oid, cjson.encode({id = oid, user = user, qty = qty, seq = seq,
  price = info[4], at = now, status = 'accepted'}))
local list = redis.call('HGET', KEYS[7], user)
if list then list = list .. ',' .. oid else list = oid end
redis.call('HSET', KEYS[7], user, list)
redis.call('XADD', KEYS[8], '*', 'id', oid, 'user', user, 'qty', qty, 'seq', seq,
  'price', info[4], 'at', string.format('%d', now))
return {'ok', oid, string.format('%d', remaining)}
