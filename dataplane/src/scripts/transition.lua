-- Moves orders to a new status where their current status is one of the
-- allowed ones, so a late or repeated update never overwrites a final state.
-- KEYS: 1 orders
-- ARGV: 1 new status, 2 allowed current statuses (comma-separated), 3.. order ids
-- Returns, per order id: the status it had before ('' if unknown). Moved only
-- where that status was allowed. Only the record's first word (its status)
-- changes (see purchase.lua).
local allowed = {}
for s in string.gmatch(ARGV[2], '[^,]+') do allowed[s] = true end
local out = {}
for i = 3, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local status = raw and string.match(raw, '^%S+')
  if not status then
    out[#out + 1] = ''
  else
    out[#out + 1] = status
    if allowed[status] then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[1] .. string.sub(raw, #status + 1))
    end
  end
end
return out
