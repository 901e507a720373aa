-- Decides one purchase atomically: idempotency, sale window (Redis clock),
-- stock, per-user limit, then the buyer, the user's sequence and newest order,
-- the order record and the stream entry.
-- KEYS: 1 info, 2 stock, 3 buyers, 4 users, 5 idem, 6 orders, 7 stream, 8 clock,
--       9 ticket (only with a purchase ticket)
-- ARGV: 1 user (visible ASCII, no space), 2 quantity (decimal), 3 new order id,
--       4 idempotency field ('' for none), 5 ticket expiry ms (with KEYS[9])
-- Returns {outcome, a, b}:
--   ok      order id, remaining      dup     order id, ''
--   nosale  '', ''                   early   start_ms, now_ms
--   ended   end_ms, now_ms           soldout remaining, ''
--   limit   units held, limit        ticket  'expired' | 'used', ''
-- Cost matters here (one Redis core is one product's budget): every
-- redis.call is a command dispatch, so the accept path makes seven for a
-- buyer's first order (nine for a later one) and passes strings, not Lua
-- numbers, as arguments (those are formatted with %.14g).
local user, q, oid, idem = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if idem ~= '' then
  local prev = redis.call('HGET', KEYS[5], idem)
  if prev then
    -- Rewritten with itself: a replicated write, so a WAIT after this call
    -- covers the original order too, whichever connection wrote it
    -- (redis.durability: replica answers a replay only once a replica holds it).
    redis.call('HSET', KEYS[5], idem, prev)
    return {'dup', prev, ''}
  end
end
local info = redis.call('HMGET', KEYS[1], 'start_ms', 'end_ms', 'limit', 'price')
if not info[1] then return {'nosale', '', ''} end
-- Redis' clock: the clock key expires at a fixed instant, so its PTTL is that
-- instant minus now (an integer reply; TIME answers two strings to parse).
local now
local ttl = redis.call('PTTL', KEYS[8])
if ttl >= 0 then
  now = 4102444800000 - ttl
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('SET', KEYS[8], '', 'PXAT', '4102444800000')
end
if now < tonumber(info[1]) then return {'early', info[1], string.format('%d', now)} end
if now >= tonumber(info[2]) then return {'ended', info[2], string.format('%d', now)} end
-- A purchase ticket is spent by the first stock decision on this product
-- (win, sold out or limit), after an idempotent replay and the window have
-- had their say; its record expires with it. No command without a ticket.
if KEYS[9] then
  if now >= tonumber(ARGV[5]) then return {'ticket', 'expired', ''} end
  if not redis.call('SET', KEYS[9], '', 'NX', 'PXAT', ARGV[5]) then
    return {'ticket', 'used', ''}
  end
end
-- Stock and limit are taken first and given back on refusal: the accept path
-- is one call each instead of a read and a write (all inside this atomic call,
-- so nobody sees the intermediate values).
local remaining = redis.call('DECRBY', KEYS[2], q)
if remaining < 0 then
  return {'soldout', string.format('%d', redis.call('INCRBY', KEYS[2], q)), ''}
end
local held = redis.call('HINCRBY', KEYS[3], user, q)
if held > tonumber(info[3]) then
  redis.call('INCRBY', KEYS[2], q)
  held = held - tonumber(q)
  if held > 0 then
    redis.call('HINCRBY', KEYS[3], user, '-' .. q)
  else
    redis.call('HDEL', KEYS[3], user)
  end
  return {'limit', string.format('%d', held), info[3]}
end
-- users: "<seq> <newest order id>"; the new record links to the previous
-- newest, so a user's orders are a chain read from the head (O(1) here).
-- Most orders are a buyer's first of the product: one HSETNX; a later
-- order reads and rewrites the entry.
local seq, last = '1', ''
if redis.call('HSETNX', KEYS[4], user, '1 ' .. oid) == 0 then
  local s, l = string.match(redis.call('HGET', KEYS[4], user), '^(%d+) (.*)$')
  seq, last = string.format('%d', s + 1), l
  redis.call('HSET', KEYS[4], user, seq .. ' ' .. oid)
end
if idem ~= '' then redis.call('HSET', KEYS[5], idem, oid) end
local at = string.format('%d', now)
-- The record: status qty at price user prev [reason] (order::OrderRecord).
redis.call('HSET', KEYS[6], oid, 'accepted ' .. q .. ' ' .. at .. ' ' .. info[4] .. ' ' .. user .. ' ' .. last)
redis.call('XADD', KEYS[7], '*', 'id', oid, 'user', user, 'qty', q, 'seq', seq,
  'price', info[4], 'at', at)
return {'ok', oid, string.format('%d', remaining)}
