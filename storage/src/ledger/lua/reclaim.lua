-- reclaim(instance, ttl) -> {'unknown'} | {'already_fenced'} | {'alive'}
--                         | {'reclaimed', {{row member, last_seq, amount}, ...}}
-- KEYS: 1 gen, 2 instance, 3 instance's rows, 4 live instances. ARGV: 1 key prefix, 2 instance id, 3 ttl.
ensure_gen(KEYS[1])
local i = redis.call('HMGET', KEYS[2], 'beat', 'fenced')
if not i[2] then
  return {'unknown'}
end
if i[2] == '1' then
  return {'already_fenced'}
end
if now_ms() - int(i[1]) < tonumber(ARGV[3]) then
  return {'alive'}
end
-- Read and check every row first, then write.
local rows = {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local acct = string.match(m, '^%d+:([uk]:%-?%d+)$')
  if not acct then
    return redis.error_reply('corrupt row member ' .. m .. ' in ' .. KEYS[3])
  end
  local row_key = ARGV[1] .. 'row:' .. ARGV[2] .. ':' .. m
  local r = redis.call('HMGET', row_key, 'amount', 'last_seq')
  rows[#rows + 1] = {m, row_key, ARGV[1] .. 'acct:' .. acct, int(r[1]), int(r[2])}
end
redis.call('HSET', KEYS[2], 'fenced', '1')
redis.call('SREM', KEYS[4], ARGV[2])
local out = {}
for _, r in ipairs(rows) do
  redis.call('HINCRBY', r[3], 'balance', str(r[4]))
  redis.call('HSET', r[2], 'amount', '0')
  out[#out + 1] = {r[1], str(r[5]), str(r[4])}
end
return {'reclaimed', out}
