-- Moves orders to a new status where their current status is one of the
-- allowed ones, so a late or repeated update never overwrites a final state.
-- KEYS: 1 orders, 2 info (counters)
-- ARGV: 1 new status, 2 allowed current statuses (comma-separated), 3.. order ids
-- Returns, per order id: the status it had before ('' if unknown). Moved only
-- where that status was allowed.
local allowed = {}
for s in string.gmatch(ARGV[2], '[^,]+') do allowed[s] = true end
local now = now_ms()
local out = {}
for i = 3, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if not raw then
    out[#out + 1] = ''
  else
    local rec = cjson.decode(raw)
    out[#out + 1] = rec.status
    if allowed[rec.status] then
      count_move(KEYS[2], rec.status, ARGV[1], rec.qty)
      rec.status = ARGV[1]
      rec.status_at = now
      redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(rec))
    end
  end
end
return out
