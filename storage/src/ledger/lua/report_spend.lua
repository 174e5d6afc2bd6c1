-- report_spend(call, amount >= 0) -> {'ok', 0} | check reply
ensure_gen(KEYS[1])
local seq = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local c = row_check(KEYS[2], KEYS[3], seq)
if c then
  if c[1] == 'repeat' then
    return {'ok', 0}
  end
  return c
end
move_funds(0, amount, seq, 0)
return {'ok', 0}
