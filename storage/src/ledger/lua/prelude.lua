-- Helpers shared by every ledger script (prepended to each one; see redis.rs for the key layout).
--
-- Numbers: Lua numbers are doubles. Every amount, sequence number and time the ledger handles stays far
-- below 2^53 (the Rust side refuses larger arguments), so they are exact here; instance ids (u64) are
-- only ever handled as strings. Numbers are written back with string.format('%d'), never with Lua's own
-- number formatting, which may switch to exponents.
--
-- Clock: scripts that read TIME and then write rely on effects replication (the default since Redis 5,
-- the only mode since 7.0); on Redis < 5 they would need redis.replicate_commands() first.
--
-- Atomicity: a script runs alone on the server. Every script reads and checks everything first and
-- writes only afterwards, so an error can never leave half of a call applied.

local function int(s)
  if not s then
    return 0
  end
  return tonumber(s)
end

local function str(n)
  return string.format('%d', n)
end

-- The ledger's clock: the server's TIME in milliseconds.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The ledger's generation, created by the first script that finds none: the server's TIME in
-- microseconds, as a decimal string. A server that lost its data creates a new (larger) one.
local function ensure_gen(key)
  local g = redis.call('GET', key)
  if g then
    return g
  end
  local t = redis.call('TIME')
  g = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', key, g)
  return g
end

-- Floor division for b > 0, exact for |a| < 2^53 (corrects the rounding of a / b).
local function floordiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local function clamp(x, lo, hi)
  if x < lo then
    return lo
  end
  if x > hi then
    return hi
  end
  return x
end

-- The sequence check of a row call (LedgerState::row_seq): nil for a new call, else the reply
-- ({'repeat', last_grant} for a repeat of the row's last call).
local function row_check(inst_key, row_key, seq)
  local fenced = redis.call('HGET', inst_key, 'fenced')
  local r = redis.call('HMGET', row_key, 'last_seq', 'last_grant')
  local last_seq = int(r[1])
  if not fenced then
    return {'unknown_instance'}
  end
  if fenced == '1' then
    return {'fenced', last_seq}
  end
  if seq == last_seq then
    return {'repeat', int(r[2])}
  end
  if seq < last_seq then
    return {'stale', last_seq}
  end
  return nil
end

-- Applies a row call that passed the check (LedgerState::move_funds): moves to_row from the balance
-- into the row and to_reported from the row into the reported spend, records the call on the row and
-- indexes the row under its instance and its account.
-- KEYS of a row script: 1 gen, 2 instance, 3 row, 4 account, 5 instance's rows, 6 account's rows.
-- ARGV: 1 seq, 2 and 3 the call's amounts, 4 row member of KEYS[5], 5 row member of KEYS[6].
local function move_funds(to_row, to_reported, seq, grant)
  redis.call('HINCRBY', KEYS[4], 'balance', str(-to_row))
  redis.call('HINCRBY', KEYS[4], 'reported', str(to_reported))
  redis.call('HINCRBY', KEYS[3], 'amount', str(to_row - to_reported))
  redis.call('HSET', KEYS[3], 'last_seq', str(seq), 'last_grant', str(grant))
  redis.call('SADD', KEYS[5], ARGV[4])
  redis.call('SADD', KEYS[6], ARGV[5])
end
