-- Gives up on a stream entry in one call: its copy on the dead-letter stream,
-- its order ended through `release` (release.lua, run as a function before
-- this), then its XACK, last. A script stops at a refused write (an OOM under
-- maxmemory, which refuses the first write and so writes nothing), so an entry
-- is never acknowledged without its order ended: it stays pending and is read
-- again. Pipelined as separate commands, the XACK (which Redis runs even out
-- of memory) acknowledged it anyway, and the order stayed 'accepted' forever.
-- KEYS: 1 stream, 2 dead-letter stream, and with an order id:
--       3 orders, 4 stock, 5 buyers, 6 info (release.lua's KEYS)
-- ARGV: 1 consumer group, 2 entry id, 3 order id ('' for an entry without
--       one), 4 reason
-- Returns release.lua's answer, or {'unknown', ''} without an order id.
redis.call('XADD', KEYS[2], '*', 'entry', ARGV[2], 'order', ARGV[3], 'reason', ARGV[4])
local out = {'unknown', ''}
if ARGV[3] ~= '' then
  out = release({KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, {ARGV[3], 'failed', ARGV[4]})
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return out
