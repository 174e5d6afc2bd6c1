-- heartbeat(instance) -> {'ok', generation} | {'fenced', 0}. The beat is the server's clock.
-- KEYS: 1 gen, 2 instance, 3 live instances. ARGV: 1 instance id.
local g = ensure_gen(KEYS[1])
if redis.call('HGET', KEYS[2], 'fenced') == '1' then
  return {'fenced', 0}
end
redis.call('HSET', KEYS[2], 'beat', str(now_ms()), 'fenced', '0')
redis.call('SADD', KEYS[3], ARGV[1])
return {'ok', g}
