-- Writes one product's catalog entry and stock, once. Re-running it never
-- resets sold stock: a raised stock adds the difference, a stock below what is
-- already sold is refused, anything else only refreshes price/limit/window.
-- KEYS: 1 info, 2 stock
-- ARGV: 1 stock, 2 price, 3 per-user limit, 4 start_ms, 5 end_ms, 6 key layout,
--       7 units already sold, for a product created by a restore from
--       PostgreSQL (restore.rs; '0' otherwise)
-- Returns {outcome, remaining, sold, delta}: created | unchanged | resized | below_sold
local total = tonumber(ARGV[1])
local old = redis.call('HGET', KEYS[1], 'stock')
-- purchase.lua reads its rules from one field, "<layout> <start_ms> <end_ms>
-- <limit> <price>". Only a new product takes this data plane's layout
-- (keys::LAYOUT); one warmed by an earlier version keeps its own (no rules
-- field: layout 1), which purchase.lua refuses.
local function write_info(layout)
  redis.call('HSET', KEYS[1], 'stock', ARGV[1], 'price', ARGV[2], 'limit', ARGV[3],
    'start_ms', ARGV[4], 'end_ms', ARGV[5])
  if layout then
    redis.call('HSET', KEYS[1], 'rules',
      layout .. ' ' .. ARGV[4] .. ' ' .. ARGV[5] .. ' ' .. ARGV[3] .. ' ' .. ARGV[2])
  end
end
if not old then
  local sold = tonumber(ARGV[7] or '0')
  if sold > total then
    return {'below_sold', ARGV[1], ARGV[7], '0'}
  end
  local left = string.format('%d', total - sold)
  redis.call('SET', KEYS[2], left)
  write_info(ARGV[6])
  return {'created', left, string.format('%d', sold), ARGV[1]}
end
local remaining = tonumber(redis.call('GET', KEYS[2]) or '0')
local sold = tonumber(old) - remaining
if total < sold then
  return {'below_sold', string.format('%d', remaining), string.format('%d', sold), '0'}
end
local delta = total - tonumber(old)
if delta ~= 0 then remaining = redis.call('INCRBY', KEYS[2], delta) end
-- Rules are rewritten only in this layout; a product of another keeps its
-- own (and purchase.lua refuses it).
local rules = redis.call('HGET', KEYS[1], 'rules')
write_info(rules and string.match(rules, '^%d+') == ARGV[6] and ARGV[6] or nil)
local outcome = 'unchanged'
if delta ~= 0 then outcome = 'resized' end
return {outcome, string.format('%d', remaining), string.format('%d', sold), string.format('%d', delta)}
