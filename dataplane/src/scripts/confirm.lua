-- A committed batch's Redis half in one call: its orders moved to
-- 'confirmed' through `transition` (transition.lua, run as a function before
-- this), then its entries' XACK, last, so an entry is never acknowledged
-- while its order's confirmation was refused (an OOM refuses the first write,
-- which writes nothing): it stays pending, is read again, and its row's
-- insert is a no-op.
-- KEYS: 1 orders, 2 info (counters), 3 stream
-- ARGV: 1 consumer group, 2 n (orders), 3 new status, 4 allowed current
--       statuses, 5..4+n order ids, then the n entries' ids
-- Returns transition.lua's answer: each order's status before.
-- Tables are copied by loops and acknowledged in chunks: Lua's unpack stops
-- at some 8,000 values, below a large --batch-size.
local n = tonumber(ARGV[2])
local args = {ARGV[3], ARGV[4]}
for i = 5, 4 + n do args[#args + 1] = ARGV[i] end
local out = transition({KEYS[1], KEYS[2]}, args)
for i = 5 + n, #ARGV, 1000 do
  redis.call('XACK', KEYS[3], ARGV[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return out
