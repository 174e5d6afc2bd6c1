-- fund(account, funding) -> {'ok', 0} (LedgerState::fund). KEYS: 1 gen, 2 account.
-- ARGV: 1 total, 2 version.
ensure_gen(KEYS[1])
local a = redis.call('HMGET', KEYS[2], 'balance', 'opened', 'funded', 'version')
local total = tonumber(ARGV[1])
local version = tonumber(ARGV[2])
if version <= int(a[4]) then
  return {'ok', 0}
end
if a[2] == '1' then
  redis.call('HSET', KEYS[2], 'balance', str(int(a[1]) + total - int(a[3])))
end
redis.call('HSET', KEYS[2], 'funded', str(total), 'version', str(version))
return {'ok', 0}
