-- Decides one purchase atomically: idempotency, sale window (Redis clock),
-- stock, per-user limit, then the buyer's entry, the order record and the
-- stream entry.
-- KEYS: 1 info, 2 stock, 3 buyers, 4 idem, 5 orders, 6 stream, 7 clock,
--       8 ticket (only with a purchase ticket)
-- ARGV: 1 user (visible ASCII, no space), 2 quantity (decimal), 3 new order id,
--       4 idempotency field ('' for none), 5 ticket expiry ms (with KEYS[8])
-- Returns, when the order is accepted, the stock left (an integer: the
-- caller holds the order id); otherwise {outcome, a, b}:
--   dup     order id, ''             nosale  '', ''
--   early   start_ms, now_ms         ended   end_ms, now_ms
--   soldout remaining, ''            limit   units held, limit
--   ticket  'expired' | 'used', ''   layout  the product's key layout, this script's
-- Cost matters here (one Redis core is one product's budget): every
-- redis.call is a command dispatch and every argument a Redis string built
-- from Lua's, so the accept path makes six calls for a buyer's first order
-- (eight for a later one), passes strings, not Lua numbers (those are
-- formatted with %.14g), and packs the stream entry into one field. Its
-- answer is one integer because a table reply costs Redis more than any of
-- those calls (the table, and its conversion probing the table for `err`,
-- `ok` and other typed-reply fields); tonumber is strtod, so a one-unit
-- order under a non-zero limit parses neither.
local user, q, oid, idem = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local LAYOUT = '2' -- keys::LAYOUT
if idem ~= '' then
  local prev = redis.call('HGET', KEYS[4], idem)
  if prev then
    -- Rewritten with itself: a replicated write, so a WAIT after this call
    -- covers the original order too, whichever connection wrote it
    -- (redis.durability: replica answers a replay only once a replica holds it).
    redis.call('HSET', KEYS[4], idem, prev)
    return {'dup', prev, ''}
  end
end
-- The product's rules, one field written by warm.lua: "<layout> <start_ms>
-- <end_ms> <limit> <price>" (one reply to read instead of five fields). A
-- product warmed by a data plane with another key layout (keys::LAYOUT) is
-- refused before anything is written: its buyer entries and stream would
-- not read the same, and a script error after the stock decision keeps the
-- writes made before it.
local rules = redis.call('HGET', KEYS[1], 'rules')
if not rules then
  if redis.call('HEXISTS', KEYS[1], 'stock') == 1 then return {'layout', '1', LAYOUT} end
  return {'nosale', '', ''}
end
local layout, start_ms, end_ms, limit, price = string.match(rules, '^(%d+) (%-?%d+) (%-?%d+) (%d+) (%S+)$')
if layout ~= LAYOUT then return {'layout', layout or '', LAYOUT} end
-- Redis' clock: the clock key expires at a fixed instant, so its PTTL is that
-- instant minus now (an integer reply; TIME answers two strings to parse).
local now
local ttl = redis.call('PTTL', KEYS[7])
if ttl >= 0 then
  now = 4102444800000 - ttl
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('SET', KEYS[7], '', 'PXAT', '4102444800000')
end
if now < tonumber(start_ms) then return {'early', start_ms, string.format('%d', now)} end
if now >= tonumber(end_ms) then return {'ended', end_ms, string.format('%d', now)} end
-- A purchase ticket is spent by the first stock decision on this product
-- (win, sold out or limit), after an idempotent replay and the window have
-- had their say; its record expires with it. No command without a ticket.
if KEYS[8] then
  if now >= tonumber(ARGV[5]) then return {'ticket', 'expired', ''} end
  if not redis.call('SET', KEYS[8], '', 'NX', 'PXAT', ARGV[5]) then
    return {'ticket', 'used', ''}
  end
end
-- Stock is taken first and given back on refusal: the accept path is one
-- call instead of a read and a write (all inside this atomic call, so nobody
-- sees the intermediate value).
local remaining = redis.call('DECRBY', KEYS[2], q)
if remaining < 0 then
  return {'soldout', string.format('%d', redis.call('INCRBY', KEYS[2], q)), ''}
end
-- buyers: "<units held> <orders placed> <newest order id>" per user. Most
-- orders are a buyer's first of the product: one HSETNX writes the entry
-- (the new record has no previous order to link to). A later order reads
-- the entry, checks the limit and rewrites it; the new record links to the
-- previous newest, so a user's orders are a chain read from the head.
local seq, last = '1', ''
local fits = (q == '1' and limit ~= '0') or tonumber(q) <= tonumber(limit)
if not fits or redis.call('HSETNX', KEYS[3], user, q .. ' 1 ' .. oid) == 0 then
  local n, most = tonumber(q), tonumber(limit)
  local held, placed = 0, 0
  local entry = redis.call('HGET', KEYS[3], user)
  if entry then
    local h, p, l = string.match(entry, '^(%d+) (%d+) (%S*)$')
    if not h then
      -- Not this layout's entry (written by an older gateway on this
      -- product): refused, the stock given back; a ticket stays spent.
      redis.call('INCRBY', KEYS[2], q)
      return {'layout', 'buyers', LAYOUT}
    end
    held, placed, last = tonumber(h), tonumber(p), l
  end
  if held + n > most then
    redis.call('INCRBY', KEYS[2], q)
    return {'limit', string.format('%d', held), limit}
  end
  seq = string.format('%d', placed + 1)
  redis.call('HSET', KEYS[3], user, string.format('%d', held + n) .. ' ' .. seq .. ' ' .. oid)
end
if idem ~= '' then redis.call('HSET', KEYS[4], idem, oid) end
local at = string.format('%d', now)
-- The record: status qty at price user prev [reason] (order::OrderRecord).
redis.call('HSET', KEYS[5], oid, 'accepted ' .. q .. ' ' .. at .. ' ' .. price .. ' ' .. user .. ' ' .. last)
-- The stream entry, one field: "id user qty seq price at" (consumer::parse_entry).
redis.call('XADD', KEYS[6], '*', 'o', oid .. ' ' .. user .. ' ' .. q .. ' ' .. seq .. ' ' .. price .. ' ' .. at)
return remaining
