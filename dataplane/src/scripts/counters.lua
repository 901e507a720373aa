-- Prepended to the scripts that move an order (transition.lua, release.lua):
-- the product's status counters, fields of its info hash, move in the same
-- atomic call as the order they count. Each counts units, by the state the
-- orders are in now: persisted (confirmed or paid: rows PostgreSQL counts as
-- sold), paid, cancelled (payment timeout), failed (never persisted).
local COUNTED = {
  confirmed = {'persisted'},
  paid = {'persisted', 'paid'},
  cancelled = {'cancelled'},
  failed = {'failed'},
}
local function count_move(info, from, to, qty)
  local delta = {}
  for _, f in ipairs(COUNTED[from] or {}) do delta[f] = (delta[f] or 0) - qty end
  for _, f in ipairs(COUNTED[to] or {}) do delta[f] = (delta[f] or 0) + qty end
  for f, n in pairs(delta) do
    if n ~= 0 then redis.call('HINCRBY', info, f, n) end
  end
end
-- Redis' clock in Unix milliseconds, stamped on the order as `status_at`.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
