//! [`RedisLedger`]: the production ledger, shared by every gateway instance through one Redis server.
//!
//! Owns one synchronous connection (the `redis` crate without its async features, so no tokio) and the
//! Lua scripts of the lease protocol: each [`Ledger`] method is exactly one script (`EVALSHA`, loaded
//! again on `NOSCRIPT`), so each call is one atomic step on the server that gives the same answer and the
//! same state transition as [`burncloud_core::lease::ModelLedger`] for the same call. Every script reads
//! and checks first and writes last, so it never leaves part of a call applied. `heartbeat`, `reclaim`,
//! `stale_instances` and `rate_take` read the server's `TIME` inside the script and ignore the caller's
//! `now`: every instance compares times from that one clock.
//!
//! Blocks on the network, bounded by [`RedisLedgerOptions`] (2 s by default for connect, read and
//! write), so it must be driven from a dedicated thread, never from a worker. After any I/O error it
//! drops the connection and answers [`LedgerError::Unavailable`] (the call may or may not have been
//! applied; the caller repeats it unchanged); the next call connects again. It never retries a call on
//! its own and never keeps a pool.
//!
//! Durability is the server's: the protocol needs `appendonly yes` and `appendfsync always` (see
//! `docs/LEASES.md`), which the first connection checks with `CONFIG GET` (a warning if not; tolerated
//! when `CONFIG` is disabled). A server that loses its data anyway (no persistence, a flush) gets a new
//! generation from the first script that finds none, which `heartbeat` reports to every instance.
//!
//! # Key layout
//!
//! Every key of a namespace `NS` starts with `P = {bc:NS}:`; the hash tag `{bc:NS}` puts all of them in
//! one Redis Cluster slot, so scripts may touch any of them. Accounts are written `u:ID` (user) or `k:ID`
//! (API key), instance ids in decimal (`u64`, handled as strings in Lua), workers in decimal. No key
//! expires except the rate windows: fenced instances and their rows' `last_seq` stay (a zombie always
//! hears `Fenced`).
//!
//! | key | type | content |
//! |---|---|---|
//! | `P gen` | string | the ledger's generation: server `TIME` in µs when the first script found none |
//! | `P acct:<acct>` | hash | `balance`, `reported`, `opened` (`1` once opened), `funded`, `version` |
//! | `P acct_rows:<acct>` | set | `<instance>:<worker>` of every row of the account (for `audit`'s Σ rows) |
//! | `P inst:<instance>` | hash | `beat` (server ms of the last heartbeat), `fenced` (`0`/`1`) |
//! | `P live` | set | `<instance>` of every registered, not fenced instance (for `stale_instances`) |
//! | `P inst_rows:<instance>` | set | `<worker>:<acct>` of every row of the instance (for `reclaim`) |
//! | `P row:<instance>:<worker>:<acct>` | hash | `amount`, `last_seq`, `last_grant` |
//! | `P rate:<token>:<rpm\|tpm>` | hash | `index`, `current`, `previous` (a `RateWindow`); expires 2 windows (≥ 1 s) after its last take |
//!
//! Missing hashes and fields read as zero, exactly like `ModelLedger`'s default rows. A row is created
//! (and indexed in both sets) by the first call applied on it; an account hash by `open`, `fund` or a row
//! call (a debt given back on an account never opened, as in the model).

use std::fmt;
use std::time::Duration;

use ::redis::{Client, Connection, ErrorKind, RedisError, Script, ScriptInvocation, Value};
use burncloud_core::lease::{
    Account, AccountAudit, CallId, Funding, HolderId, InstanceId, Ledger, LedgerError, Millis, Reclaim,
};
use burncloud_core::model::Quota;
use burncloud_core::ratelimit::{RateGrant, RateKey};

/// Arguments beyond ±2^53 are refused: Lua numbers are doubles, exact only up to there.
const EXACT_LIMIT: u64 = 1 << 53;

/// Longest accepted namespace.
const MAX_NAMESPACE: usize = 128;

/// Timeouts of the Redis connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisLedgerOptions {
    /// Connecting, including the handshake (`AUTH`, `SELECT`).
    pub connect_timeout: Duration,
    /// Waiting for a reply.
    pub read_timeout: Duration,
    /// Sending a call.
    pub write_timeout: Duration,
}

impl Default for RedisLedgerOptions {
    fn default() -> Self {
        let t = Duration::from_secs(2);
        RedisLedgerOptions { connect_timeout: t, read_timeout: t, write_timeout: t }
    }
}

/// Builds a script from the shared prelude and one file of `lua/`.
macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(include_str!("lua/prelude.lua"), "\n", include_str!(concat!("lua/", $file))))
    };
}

/// One script per ledger call.
struct Scripts {
    take: Script,
    give_back: Script,
    report_spend: Script,
    heartbeat: Script,
    reclaim: Script,
    stale_instances: Script,
    open: Script,
    fund: Script,
    balance: Script,
    audit: Script,
    rate_take: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            take: script!("take.lua"),
            give_back: script!("give_back.lua"),
            report_spend: script!("report_spend.lua"),
            heartbeat: script!("heartbeat.lua"),
            reclaim: script!("reclaim.lua"),
            stale_instances: script!("stale_instances.lua"),
            open: script!("open.lua"),
            fund: script!("fund.lua"),
            balance: script!("balance.lua"),
            audit: script!("audit.lua"),
            rate_take: script!("rate_take.lua"),
        }
    }
}

/// The connection, opened lazily and dropped after an I/O error.
struct Link {
    client: Client,
    conn: Option<Connection>,
    options: RedisLedgerOptions,
    /// Whether the server's persistence settings were read (once, on the first connection).
    checked: bool,
    /// `Some(true)` when the server runs `appendonly yes` + `appendfsync always`, `None` if unknown.
    durable: Option<bool>,
}

impl Link {
    fn connection(&mut self) -> Result<&mut Connection, LedgerError> {
        if self.conn.is_none() {
            let conn = self.connect().map_err(|e| unavailable(&e))?;
            self.conn = Some(conn);
        }
        if !self.checked {
            self.checked = true;
            self.durable = self.check_durability();
        }
        self.conn.as_mut().ok_or_else(|| LedgerError::Unavailable("redis: connection lost".into()))
    }

    fn connect(&self) -> Result<Connection, RedisError> {
        let floor = Duration::from_millis(1);
        let conn = self.client.get_connection_with_timeout(self.options.connect_timeout.max(floor))?;
        conn.set_read_timeout(Some(self.options.read_timeout.max(floor)))?;
        conn.set_write_timeout(Some(self.options.write_timeout.max(floor)))?;
        Ok(conn)
    }

    /// Reads `appendonly` and `appendfsync`; warns (once per ledger) unless they make every call durable
    /// before its reply.
    fn check_durability(&mut self) -> Option<bool> {
        let appendonly = self.config_get("appendonly")?;
        let appendfsync = self.config_get("appendfsync")?;
        let durable = appendonly == "yes" && appendfsync == "always";
        if !durable {
            tracing::warn!(
                appendonly = %appendonly,
                appendfsync = %appendfsync,
                "the Redis ledger is not durable before its replies (needs appendonly yes and appendfsync \
                 always): a crash or failover may forget answered calls and break the lease bounds; a lost \
                 dataset is detected through the ledger generation"
            );
        }
        Some(durable)
    }

    fn config_get(&mut self, name: &str) -> Option<String> {
        let conn = self.conn.as_mut()?;
        match ::redis::cmd("CONFIG").arg("GET").arg(name).query::<Value>(conn) {
            Ok(v) => {
                let value = match &v {
                    Value::Array(items) => items.get(1).and_then(text),
                    Value::Map(pairs) => pairs.first().and_then(|(_, value)| text(value)),
                    _ => None,
                };
                if value.is_none() {
                    tracing::info!(
                        setting = name,
                        "Redis CONFIG GET gave no value; ledger durability not verified"
                    );
                }
                value.map(str::to_owned)
            }
            Err(e) => {
                tracing::info!(setting = name, error = %e, "Redis CONFIG GET refused; ledger durability not verified");
                self.failed(&e);
                None
            }
        }
    }

    fn eval(&mut self, invocation: &ScriptInvocation<'_>) -> Result<Value, LedgerError> {
        let conn = self.connection()?;
        match invocation.invoke::<Value>(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.failed(&e);
                Err(unavailable(&e))
            }
        }
    }

    /// Drops the connection unless the server answered with an error reply (the stream is then still in
    /// step); a reply lost to a timeout would otherwise be read as the answer to the next call.
    fn failed(&mut self, e: &RedisError) {
        if !matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension) {
            self.conn = None;
        }
    }
}

fn unavailable(e: &RedisError) -> LedgerError {
    LedgerError::Unavailable(format!("redis: {e}"))
}

fn unexpected(what: &str, v: &Value) -> LedgerError {
    LedgerError::Unavailable(format!("redis: unexpected reply to {what}: {v:?}"))
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

fn array(what: &str, v: Value) -> Result<Vec<Value>, LedgerError> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(unexpected(what, &other)),
    }
}

/// An argument Lua can hold exactly.
fn exact(v: i64) -> Result<i64, LedgerError> {
    if v.unsigned_abs() > EXACT_LIMIT {
        return Err(LedgerError::Invalid("value beyond the Redis ledger's exact range (±2^53)"));
    }
    Ok(v)
}

fn exact_seq(seq: u64) -> Result<u64, LedgerError> {
    if seq > EXACT_LIMIT {
        return Err(LedgerError::Invalid("sequence number beyond the Redis ledger's exact range (2^53)"));
    }
    Ok(seq)
}

/// `u:ID` or `k:ID`.
fn account_id(account: Account) -> String {
    match account {
        Account::User(id) => format!("u:{id}"),
        Account::Key(id) => format!("k:{id}"),
    }
}

fn parse_account(s: &str) -> Option<Account> {
    let (kind, id) = s.split_once(':')?;
    let id = id.parse().ok()?;
    match kind {
        "u" => Some(Account::User(id)),
        "k" => Some(Account::Key(id)),
        _ => None,
    }
}

/// Decodes the reply of a row script: `{'ok', n}` or the refusal of the sequence check.
fn row_reply(what: &str, v: Value) -> Result<i64, LedgerError> {
    let items = array(what, v)?;
    let last_seq = || items.get(1).and_then(int).and_then(|n| u64::try_from(n).ok());
    match items.first().and_then(text) {
        Some("ok") => {
            items.get(1).and_then(int).ok_or_else(|| unexpected(what, &Value::Array(items.clone())))
        }
        Some("unknown_instance") => Err(LedgerError::UnknownInstance),
        Some("unknown_account") => Err(LedgerError::UnknownAccount),
        Some("fenced") => match last_seq() {
            Some(last_seq) => Err(LedgerError::Fenced { last_seq }),
            None => Err(unexpected(what, &Value::Array(items.clone()))),
        },
        Some("stale") => match last_seq() {
            Some(last_seq) => Err(LedgerError::Stale { last_seq }),
            None => Err(unexpected(what, &Value::Array(items.clone()))),
        },
        _ => Err(unexpected(what, &Value::Array(items.clone()))),
    }
}

/// The Redis ledger: see the module documentation for what it guarantees and how it lays out its keys.
pub struct RedisLedger {
    link: Link,
    scripts: Scripts,
    /// `{bc:NS}:`
    prefix: String,
}

impl fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLedger")
            .field("prefix", &self.prefix)
            .field("connected", &self.link.conn.is_some())
            .field("options", &self.link.options)
            .field("durable", &self.link.durable)
            .finish()
    }
}

impl RedisLedger {
    /// [`RedisLedger::connect_with`] with the default timeouts (2 s).
    pub fn connect(url: &str, namespace: &str) -> Result<RedisLedger, LedgerError> {
        Self::connect_with(url, namespace, RedisLedgerOptions::default())
    }

    /// A ledger on the server at `url` (`redis://[:PASSWORD@]HOST[:PORT][/DB]`) whose keys all start
    /// with `{bc:<namespace>}:`. `namespace` is 1–128 characters of `A-Z a-z 0-9 _ - . :`.
    ///
    /// Fails only for an invalid URL or namespace. It connects at once (and checks the server's
    /// persistence settings), but a server that is down now is no error: every call answers
    /// [`LedgerError::Unavailable`] until the server is back.
    pub fn connect_with(
        url: &str,
        namespace: &str,
        options: RedisLedgerOptions,
    ) -> Result<RedisLedger, LedgerError> {
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':');
        if namespace.is_empty() || namespace.len() > MAX_NAMESPACE || !namespace.chars().all(valid) {
            return Err(LedgerError::Invalid(
                "a Redis ledger namespace is 1-128 characters of A-Z a-z 0-9 _ - . :",
            ));
        }
        let client = Client::open(url).map_err(|e| {
            tracing::warn!(error = %e, "invalid Redis ledger URL");
            LedgerError::Invalid("invalid Redis ledger URL")
        })?;
        let mut ledger = RedisLedger {
            link: Link { client, conn: None, options, checked: false, durable: None },
            scripts: Scripts::new(),
            prefix: format!("{{bc:{namespace}}}:"),
        };
        if let Err(e) = ledger.link.connection() {
            tracing::warn!(error = %e, "the Redis ledger is unreachable; its calls fail until it is back");
        }
        Ok(ledger)
    }

    /// Connects if needed and checks the server answers (`PING`).
    pub fn ping(&mut self) -> Result<(), LedgerError> {
        let conn = self.link.connection()?;
        match ::redis::cmd("PING").query::<Value>(conn) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.link.failed(&e);
                Err(unavailable(&e))
            }
        }
    }

    /// Whether the server was found to make every write durable before its reply (`appendonly yes`,
    /// `appendfsync always`); `None` before the first connection or when `CONFIG` is disabled.
    pub fn durable(&self) -> Option<bool> {
        self.link.durable
    }

    /// The prefix of every key of this ledger, `{bc:<namespace>}:`.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether a connection is open now (it is dropped after an I/O error and opened by the next call).
    pub fn is_connected(&self) -> bool {
        self.link.conn.is_some()
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// Runs one row script: KEYS gen, instance, row, account, instance's rows, account's rows; ARGV seq,
    /// `a`, `b`, the row's member in each set.
    fn row_call(&mut self, which: RowScript, call: CallId, a: i64, b: i64) -> Result<i64, LedgerError> {
        let seq = exact_seq(call.seq)?;
        let (a, b) = (exact(a)?, exact(b)?);
        let instance = call.holder.instance.0;
        let worker = call.holder.worker;
        let account = account_id(call.account);
        let keys = [
            self.key("gen"),
            self.key(&format!("inst:{instance}")),
            self.key(&format!("row:{instance}:{worker}:{account}")),
            self.key(&format!("acct:{account}")),
            self.key(&format!("inst_rows:{instance}")),
            self.key(&format!("acct_rows:{account}")),
        ];
        let script = match which {
            RowScript::Take => &self.scripts.take,
            RowScript::GiveBack => &self.scripts.give_back,
            RowScript::ReportSpend => &self.scripts.report_spend,
        };
        let mut inv = script.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(seq).arg(a).arg(b).arg(format!("{worker}:{account}")).arg(format!("{instance}:{worker}"));
        let v = self.link.eval(&inv)?;
        row_reply(which.name(), v)
    }

    fn funding_call(&mut self, open: bool, account: Account, funding: Funding) -> Result<(), LedgerError> {
        let (remaining, total, version) =
            (exact(funding.remaining)?, exact(funding.total)?, exact(funding.version)?);
        let keys = [self.key("gen"), self.key(&format!("acct:{}", account_id(account)))];
        let mut inv =
            if open { self.scripts.open.prepare_invoke() } else { self.scripts.fund.prepare_invoke() };
        inv.key(&keys[0]).key(&keys[1]);
        if open {
            inv.arg(remaining);
        }
        inv.arg(total).arg(version);
        let what = if open { "open" } else { "fund" };
        let v = self.link.eval(&inv)?;
        row_reply(what, v).map(|_| ())
    }
}

#[derive(Clone, Copy)]
enum RowScript {
    Take,
    GiveBack,
    ReportSpend,
}

impl RowScript {
    fn name(self) -> &'static str {
        match self {
            RowScript::Take => "take",
            RowScript::GiveBack => "give_back",
            RowScript::ReportSpend => "report_spend",
        }
    }
}

impl Ledger for RedisLedger {
    fn take(&mut self, call: CallId, want: Quota, floor: Quota) -> Result<Quota, LedgerError> {
        // The model's checks that need no state, in its order.
        if want < 0 || floor < 0 {
            return Err(LedgerError::Invalid("take wants a non-negative amount"));
        }
        if call.seq == 0 {
            return Err(LedgerError::Invalid("call sequence numbers start at 1"));
        }
        self.row_call(RowScript::Take, call, want, floor)
    }

    fn give_back(&mut self, call: CallId, amount: Quota) -> Result<(), LedgerError> {
        if call.seq == 0 {
            return Err(LedgerError::Invalid("call sequence numbers start at 1"));
        }
        self.row_call(RowScript::GiveBack, call, amount, 0).map(|_| ())
    }

    fn report_spend(&mut self, call: CallId, amount: Quota) -> Result<(), LedgerError> {
        if amount < 0 {
            return Err(LedgerError::Invalid("reported spend is never negative"));
        }
        if call.seq == 0 {
            return Err(LedgerError::Invalid("call sequence numbers start at 1"));
        }
        self.row_call(RowScript::ReportSpend, call, amount, 0).map(|_| ())
    }

    /// The beat is the server's clock; `now` is ignored.
    fn heartbeat(&mut self, instance: InstanceId, _now: Millis) -> Result<u64, LedgerError> {
        let id = instance.0.to_string();
        let keys = [self.key("gen"), self.key(&format!("inst:{id}")), self.key("live")];
        let mut inv = self.scripts.heartbeat.prepare_invoke();
        inv.key(&keys[0]).key(&keys[1]).key(&keys[2]).arg(&id);
        let v = self.link.eval(&inv)?;
        let items = array("heartbeat", v)?;
        match items.first().and_then(text) {
            Some("ok") => items
                .get(1)
                .and_then(text)
                .and_then(|g| g.parse().ok())
                .ok_or_else(|| unexpected("heartbeat", &Value::Array(items.clone()))),
            Some("fenced") => Err(LedgerError::Fenced { last_seq: 0 }),
            _ => Err(unexpected("heartbeat", &Value::Array(items.clone()))),
        }
    }

    /// Compares `ttl` with the server's clock; `now` is ignored.
    fn reclaim(&mut self, instance: InstanceId, _now: Millis, ttl: Millis) -> Result<Reclaim, LedgerError> {
        let id = instance.0.to_string();
        let keys = [
            self.key("gen"),
            self.key(&format!("inst:{id}")),
            self.key(&format!("inst_rows:{id}")),
            self.key("live"),
        ];
        let mut inv = self.scripts.reclaim.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(&self.prefix).arg(&id).arg(ttl);
        let v = self.link.eval(&inv)?;
        let mut items = array("reclaim", v)?;
        let bad = |items: &[Value]| unexpected("reclaim", &Value::Array(items.to_vec()));
        match items.first().and_then(text) {
            Some("unknown") => Ok(Reclaim::Unknown),
            Some("already_fenced") => Ok(Reclaim::AlreadyFenced),
            Some("alive") => Ok(Reclaim::Alive),
            Some("reclaimed") if items.len() == 2 => {
                let rows = array("reclaim", items.swap_remove(1))?;
                let mut returned = Vec::with_capacity(rows.len());
                for row in rows {
                    let fields = array("reclaim", row)?;
                    let parsed = (|| {
                        let (worker, account) = text(fields.first()?)?.split_once(':')?;
                        let holder = HolderId { instance, worker: worker.parse().ok()? };
                        let seq = u64::try_from(int(fields.get(1)?)?).ok()?;
                        let call = CallId { holder, account: parse_account(account)?, seq };
                        Some((call, int(fields.get(2)?)?))
                    })();
                    returned.push(parsed.ok_or_else(|| bad(&fields))?);
                }
                // The model returns its rows in (holder, account) order.
                returned.sort_by_key(|(call, _)| (call.holder, call.account));
                Ok(Reclaim::Reclaimed { returned })
            }
            _ => Err(bad(&items)),
        }
    }

    /// Compares `ttl` with the server's clock; `now` is ignored.
    fn stale_instances(&mut self, _now: Millis, ttl: Millis) -> Result<Vec<InstanceId>, LedgerError> {
        let live = self.key("live");
        let mut inv = self.scripts.stale_instances.prepare_invoke();
        inv.key(&live).arg(&self.prefix).arg(ttl);
        let v = self.link.eval(&inv)?;
        let items = array("stale_instances", v)?;
        let mut ids = Vec::with_capacity(items.len());
        for item in &items {
            let id =
                text(item).and_then(|s| s.parse().ok()).ok_or_else(|| unexpected("stale_instances", item))?;
            ids.push(InstanceId(id));
        }
        ids.sort();
        Ok(ids)
    }

    fn open(&mut self, account: Account, funding: Funding) -> Result<(), LedgerError> {
        self.funding_call(true, account, funding)
    }

    fn fund(&mut self, account: Account, funding: Funding) -> Result<(), LedgerError> {
        self.funding_call(false, account, funding)
    }

    fn balance(&mut self, account: Account) -> Result<Quota, LedgerError> {
        let key = self.key(&format!("acct:{}", account_id(account)));
        let mut inv = self.scripts.balance.prepare_invoke();
        inv.key(&key);
        let v = self.link.eval(&inv)?;
        int(&v).ok_or_else(|| unexpected("balance", &v))
    }

    fn audit(&mut self, account: Account) -> Result<AccountAudit, LedgerError> {
        let id = account_id(account);
        let keys = [self.key(&format!("acct:{id}")), self.key(&format!("acct_rows:{id}"))];
        let mut inv = self.scripts.audit.prepare_invoke();
        inv.key(&keys[0]).key(&keys[1]).arg(&self.prefix).arg(&id);
        let v = self.link.eval(&inv)?;
        let items = array("audit", v)?;
        let n: Vec<i64> = items.iter().filter_map(int).collect();
        match n[..] {
            [balance, reported, held, opened, funded, version] if items.len() == 6 => {
                Ok(AccountAudit { balance, reported, held, opened: opened == 1, funded, version })
            }
            _ => Err(unexpected("audit", &Value::Array(items))),
        }
    }

    /// The window is placed on the server's clock; `now` is ignored.
    fn rate_take(
        &mut self,
        key: RateKey,
        _now: Millis,
        want: i64,
        limit: i64,
        window: Millis,
    ) -> Result<RateGrant, LedgerError> {
        let (want, limit, window) = (exact(want)?, exact(limit)?, exact(window)?);
        let key = self.key(&format!("rate:{}:{}", key.token, key.kind.as_str()));
        let mut inv = self.scripts.rate_take.prepare_invoke();
        inv.key(&key).arg(want).arg(limit).arg(window);
        let v = self.link.eval(&inv)?;
        let items = array("rate_take", v)?;
        match (items.first().and_then(int), items.get(1).and_then(int)) {
            (Some(granted), Some(retry_after_ms)) if items.len() == 2 => {
                Ok(RateGrant { granted, retry_after_ms })
            }
            _ => Err(unexpected("rate_take", &Value::Array(items))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_round_trip_through_their_key_form() {
        for a in [Account::User(7), Account::Key(-3), Account::User(i64::MAX)] {
            assert_eq!(parse_account(&account_id(a)), Some(a));
        }
        assert_eq!(parse_account("x:1"), None);
    }

    #[test]
    fn namespaces_are_checked_before_connecting() {
        let bad = ["", "a{b", "a}b", "a b", &"x".repeat(129)];
        for ns in bad {
            let r = RedisLedger::connect("redis://127.0.0.1:1", ns);
            assert!(matches!(r, Err(LedgerError::Invalid(_))), "{ns:?}");
        }
    }

    #[test]
    fn arguments_beyond_exact_doubles_are_refused() {
        assert!(exact(1 << 53).is_ok());
        assert!(exact(-(1 << 53)).is_ok());
        assert!(exact((1 << 53) + 1).is_err());
        assert!(exact_seq(u64::MAX).is_err());
    }
}
