-- stale_instances(ttl) -> {instance id, ...}: unfenced instances whose beat is at least ttl old by the
-- server's clock. Read-only. KEYS: 1 live instances. ARGV: 1 key prefix, 2 ttl.
local now = now_ms()
local ttl = tonumber(ARGV[2])
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local beat = int(redis.call('HGET', ARGV[1] .. 'inst:' .. id, 'beat'))
  if now - beat >= ttl then
    out[#out + 1] = id
  end
end
return out
