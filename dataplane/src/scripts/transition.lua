-- Moves orders to a new status where their current status is one of the
-- allowed ones, so a late or repeated update never overwrites a final state.
-- KEYS: 1 orders, 2 info (counters)
-- ARGV: 1 new status, 2 allowed current statuses (comma-separated), 3.. order ids
-- Returns, per order id: the status it had before ('' if unknown). Moved only
-- where that status was allowed. Only the record's first word (its status,
-- and since when) changes (see purchase.lua).
local allowed = {}
for s in string.gmatch(ARGV[2], '[^,]+') do allowed[s] = true end
local now = now_ms()
local out = {}
for i = 3, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local word = raw and string.match(raw, '^%S+')
  if not word then
    out[#out + 1] = ''
  else
    local status = string.match(word, '^[^:]+')
    out[#out + 1] = status
    if allowed[status] then
      count_move(KEYS[2], status, ARGV[1], tonumber(string.match(raw, '^%S+ (%d+)')))
      -- The first word becomes "<status>:<when>" (order::OrderRecord).
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[1] .. ':' .. now .. string.sub(raw, #word + 1))
    end
  end
end
return out
