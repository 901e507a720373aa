-- Binds a buyer's Idempotency-Key to the first request it came with in this
-- sale (a key is the buyer's for the whole sale, not per product), so the same
-- key with another request is refused instead of buying a second time.
-- Run alone (scripts::CLAIM_KEY, one more line returning {claimed, request})
-- or as the first step of a purchase on a standalone Redis
-- (scripts::CLAIM_AND_PURCHASE), where a binding to another request ends the
-- call before purchase.lua runs.
-- KEYS: 1 the sale's idempotency hash
-- ARGV: 1 field (user \x1f key), 2 the request ("<sku> <quantity>"),
--       3 when the records may go (Unix ms: the sale's end, its payment
--       timeout and a day)
-- Returns {'reused', the key's first request, ''}, or goes on with
-- `claimed` = 'new' | 'same'.
-- A new key (almost every keyed purchase: a retry is the exception) is
-- bound by one HSETNX; a known one is read back and compared.
local claimed = 'new'
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  local first = redis.call('HGET', KEYS[1], ARGV[1])
  if first ~= ARGV[2] then return {'reused', first, ''} end
  claimed = 'same'
else
  -- Never shorten: an end time moved later keeps the records longer. The
  -- expiry is read, and written only when it moves (one call, not two, for
  -- almost every key: this runs before every keyed purchase).
  if redis.call('PEXPIRETIME', KEYS[1]) < tonumber(ARGV[3]) then
    redis.call('PEXPIREAT', KEYS[1], ARGV[3])
  end
end
