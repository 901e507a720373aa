-- A consumer's streams lost their group (Redis lost its data): creates the
-- group, and the stream if no purchase wrote it since, on each stream, but
-- only while the sale's meta record exists, in one atomic call: a sale being
-- cleared (its meta record goes first) is never written again. Standalone
-- only (the meta record and the streams are in different cluster slots).
-- KEYS: 1 the sale's meta, 2.. streams
-- ARGV: 1 group
-- Returns how many groups it created (0 while the sale has no meta record).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local created = 0
for i = 2, #KEYS do
  local ok = redis.pcall('XGROUP', 'CREATE', KEYS[i], ARGV[1], '0', 'MKSTREAM')
  if type(ok) == 'table' and ok.ok then created = created + 1 end
end
return created
