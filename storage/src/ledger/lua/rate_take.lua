-- rate_take(key, want, limit, window) -> {granted, retry_after_ms}: RateWindow::take line by line, at
-- the server's clock. Soft state: the key expires two windows (at least a second) after its last take,
-- when what it holds can no longer count. KEYS: 1 rate key. ARGV: 1 want, 2 limit, 3 window (ms).
local now = now_ms() -- @clock
local want = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = math.max(tonumber(ARGV[3]), 1)
local w = redis.call('HMGET', KEYS[1], 'index', 'current', 'previous')
local index = int(w[1])
local current = int(w[2])
local previous = int(w[3])
-- roll: move to now's fixed window; a clock that went backwards stays in the newer window.
local idx = floordiv(now, window)
if idx == index + 1 then
  previous = current
  current = 0
elseif idx > index + 1 then
  previous = 0
  current = 0
end
if idx > index then
  index = idx
end
-- used: the previous window weighted by its overlap, rounded up.
local elapsed = clamp(now - index * window, 0, window)
local used = current + floordiv(previous * (window - elapsed) + window - 1, window)
local free = math.max(limit - used, 0)
local granted = clamp(want, 0, free)
current = current + granted
redis.call('HSET', KEYS[1], 'index', str(index), 'current', str(current), 'previous', str(previous))
redis.call('PEXPIRE', KEYS[1], str(clamp(2 * window, 1000, 1099511627776)))
if granted >= want then
  return {granted, 0}
end
local missing = want - granted
local decaying = floordiv(previous * (window - elapsed), window)
local retry
if previous > 0 and missing <= decaying then
  retry = floordiv(missing * window + previous - 1, previous)
else
  retry = window - elapsed
end
return {granted, math.max(retry, 1)}
