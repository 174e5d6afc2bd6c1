-- balance(account) -> balance. Read-only. KEYS: 1 account.
return int(redis.call('HGET', KEYS[1], 'balance'))
