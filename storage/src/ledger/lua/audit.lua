-- audit(account) -> {balance, reported, held, opened, funded, version}, held = the sum of the account's
-- rows. Read-only. KEYS: 1 account, 2 account's rows. ARGV: 1 key prefix, 2 account ('u:ID' / 'k:ID').
local a = redis.call('HMGET', KEYS[1], 'balance', 'reported', 'opened', 'funded', 'version')
local held = 0
for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  held = held + int(redis.call('HGET', ARGV[1] .. 'row:' .. m .. ':' .. ARGV[2], 'amount'))
end
local opened = 0
if a[3] == '1' then
  opened = 1
end
return {int(a[1]), int(a[2]), held, opened, int(a[4]), int(a[5])}
