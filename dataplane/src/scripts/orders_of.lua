-- A user's orders of one product, newest first: the head from the buyers hash,
-- then each record's link to the one before (see purchase.lua). Read-only.
-- KEYS: 1 buyers, 2 orders
-- ARGV: 1 user, 2 most orders to return
-- Returns {order id, record, order id, record, ...}.
local u = redis.call('HGET', KEYS[1], ARGV[1])
if not u then return {} end
local id = string.match(u, '^%d+ %d+ (%S*)')
local out, most = {}, tonumber(ARGV[2])
while id and id ~= '' and #out < 2 * most do
  local raw = redis.call('HGET', KEYS[2], id)
  if not raw then break end
  out[#out + 1] = id
  out[#out + 1] = raw
  id = string.match(raw, '^%S+ %S+ %S+ %S+ %S+ (%S*)')
end
return out
