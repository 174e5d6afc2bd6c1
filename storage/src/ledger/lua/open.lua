-- open(account, funding) -> {'ok', 0} (LedgerState::open). KEYS: 1 gen, 2 account.
-- ARGV: 1 remaining, 2 total, 3 version.
ensure_gen(KEYS[1])
local a = redis.call('HMGET', KEYS[2], 'balance', 'opened', 'funded', 'version')
if a[2] == '1' then
  return {'ok', 0}
end
local remaining = tonumber(ARGV[1])
local total = tonumber(ARGV[2])
local version = tonumber(ARGV[3])
local balance = int(a[1])
local funded = int(a[3])
local have = int(a[4])
if have >= version then
  -- A newer funding arrived before the open: the durable read did not include it.
  balance = balance + remaining + (funded - total)
else
  balance = balance + remaining
  funded = total
  have = version
end
redis.call('HSET', KEYS[2], 'balance', str(balance), 'opened', '1', 'funded', str(funded), 'version', str(have))
return {'ok', 0}
