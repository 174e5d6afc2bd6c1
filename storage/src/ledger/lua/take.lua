-- take(call, want, floor) -> {'ok', granted} | check reply | {'unknown_account'}
ensure_gen(KEYS[1])
local seq = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local floor = tonumber(ARGV[3])
local c = row_check(KEYS[2], KEYS[3], seq)
if c then
  if c[1] == 'repeat' then
    return {'ok', c[2]}
  end
  return c
end
local a = redis.call('HMGET', KEYS[4], 'balance', 'opened')
if a[2] ~= '1' then
  return {'unknown_account'}
end
local balance = int(a[1])
local grant = 0
if balance >= math.max(floor, 1) then
  -- Beyond the floor, at most half of what would be left (ModelLedger's rule, integer division).
  grant = floor + math.min(math.max(want - floor, 0), floordiv(balance - floor, 2))
end
move_funds(grant, 0, seq, grant)
return {'ok', grant}
