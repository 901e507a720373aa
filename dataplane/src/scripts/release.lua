-- Ends an order that will not be fulfilled (failed persistence, payment
-- timeout) and returns its stock and the buyer's limit, exactly once: only an
-- order still 'accepted' or 'confirmed' moves; any later call is a no-op.
-- KEYS: 1 orders, 2 stock, 3 buyers, 4 info (counters)
-- ARGV: 1 order id, 2 new status ('failed' | 'cancelled'), 3 reason
-- Returns {'released', remaining} | {'noop', current status} | {'unknown', ''}
-- Records are "status[:since] qty at price user prev [reason]" (see purchase.lua).
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return {'unknown', ''} end
local word, qty, user = string.match(raw, '^(%S+) (%d+) %S+ %S+ (%S+)')
if not word then return {'unknown', ''} end
local status = string.match(word, '^[^:]+')
if status ~= 'accepted' and status ~= 'confirmed' then return {'noop', status} end
count_move(KEYS[4], status, ARGV[2], tonumber(qty))
-- The first word becomes "<status>:<when>"; the reason goes at the end.
redis.call('HSET', KEYS[1], ARGV[1],
  ARGV[2] .. ':' .. now_ms() .. string.sub(raw, #word + 1) .. ' ' .. ARGV[3])
local remaining = redis.call('INCRBY', KEYS[2], qty)
-- The buyer's entry, "<units held> <orders placed> <newest order id>" (see
-- purchase.lua), gives the units back and stays: its count of orders placed
-- numbers the buyer's next order and must never go back.
local entry = redis.call('HGET', KEYS[3], user)
local held, rest = string.match(entry or '', '^(%d+)( %d+ %S*)$')
if held then
  local left = tonumber(held) - tonumber(qty)
  if left < 0 then left = 0 end
  redis.call('HSET', KEYS[3], user, string.format('%d', left) .. rest)
elseif entry and string.match(entry, '^%-?%d+$') then
  -- Key layout 1 (a sale an earlier version started): units alone.
  if redis.call('HINCRBY', KEYS[3], user, '-' .. qty) <= 0 then redis.call('HDEL', KEYS[3], user) end
end
return {'released', string.format('%d', remaining)}
