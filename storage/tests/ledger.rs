//! The ledger backends held to the reference: `EmbeddedLedger` and `RedisLedger` against `ModelLedger`
//! (same calls, same answers, same audit of every account after every call), plus what only a real
//! backend can show: files surviving a reopen, a torn log, a Redis killed with and without persistence,
//! a dead or hung server, and concurrent takes from many connections.
//!
//! Redis tests use the server at `BURNCLOUD_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`), each in
//! a fresh random namespace whose keys are deleted at the end; restart tests start throwaway
//! `redis-server` children on free ports. Nothing is skipped: a missing server or binary fails the test
//! with a message saying so.

// Test code: a failed expectation is a panic, wherever it sits (helpers included).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use burncloud_core::lease::model::LedgerState;
use burncloud_core::lease::{
    Account, AccountAudit, CallId, Funding, HolderId, InstanceId, Ledger, LedgerError, Millis, ModelLedger,
    Reclaim,
};
use burncloud_core::model::Quota;
use burncloud_core::ratelimit::{RateGrant, RateKey, RateKind, RateWindow};
use burncloud_storage::ledger::{EmbeddedLedger, RedisLedger, RedisLedgerOptions};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---- helpers ----------------------------------------------------------------------------------------

fn redis_url() -> String {
    std::env::var("BURNCLOUD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}-{:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), fastrand::u64(..))
}

#[allow(clippy::disallowed_methods)] // test code waits on real servers and real time
fn pause(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn raw(url: &str) -> redis::Connection {
    let client = redis::Client::open(url).unwrap();
    client.get_connection_with_timeout(Duration::from_secs(2)).unwrap_or_else(|e| {
        panic!("no Redis server at {url} ({e}): start one (redis-server) or set BURNCLOUD_TEST_REDIS_URL")
    })
}

/// A namespace on a Redis server whose keys are deleted when dropped.
struct Namespace {
    url: String,
    name: String,
}

impl Namespace {
    fn new(url: &str) -> Namespace {
        // Fail early and clearly when there is no server.
        let mut c = raw(url);
        let _: String = redis::cmd("PING").query(&mut c).unwrap();
        Namespace { url: url.to_owned(), name: unique("t") }
    }

    fn ledger(&self) -> RedisLedger {
        RedisLedger::connect(&self.url, &self.name).unwrap()
    }

    fn keys(&self) -> Vec<String> {
        let mut c = raw(&self.url);
        let pattern = format!("{{bc:{}}}:*", self.name);
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut c)
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else { return };
        let Ok(mut c) = client.get_connection_with_timeout(Duration::from_secs(2)) else { return };
        let pattern = format!("{{bc:{}}}:*", self.name);
        let mut cursor: u64 = 0;
        loop {
            let Ok((next, batch)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut c)
            else {
                return;
            };
            if !batch.is_empty() {
                let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&batch).query(&mut c);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A throwaway `redis-server` on a free port, killed (SIGKILL) when dropped.
struct Server {
    port: u16,
    dir: PathBuf,
    persistent: bool,
    child: Option<Child>,
}

impl Server {
    /// `persistent`: AOF with `appendfsync always`; otherwise no persistence at all.
    fn start(persistent: bool) -> Server {
        Server::start_on(free_port(), persistent)
    }

    fn start_on(port: u16, persistent: bool) -> Server {
        let dir = std::env::temp_dir().join(unique("bc_redis"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Server { port, dir, persistent, child: None };
        s.spawn();
        s
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port").arg(self.port.to_string()).arg("--bind").arg("127.0.0.1").arg("--save").arg("");
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.arg("--dir").arg(&self.dir).args(["--daemonize", "no"]);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run redis-server ({e}): install it (apt-get install redis-server) for these tests")
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Ours, not another test's server that took the port meanwhile.
            if let Ok(client) = redis::Client::open(self.url().as_str())
                && let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200))
                && let Ok((_, dir)) =
                    redis::cmd("CONFIG").arg("GET").arg("dir").query::<(String, String)>(&mut c)
                && Path::new(&dir) == self.dir.canonicalize().unwrap_or_else(|_| self.dir.clone())
            {
                return;
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "redis-server on port {} exited: {exited:?}", self.port);
            assert!(Instant::now() < deadline, "redis-server on port {} did not start", self.port);
            pause(20);
        }
    }

    /// SIGKILL, and wait until the process is gone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").arg(sig).arg(&pid).status().unwrap().success());
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = Command::new("kill").arg("-CONT").arg(child.id().to_string()).status();
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Repeats `f` until it is not `Unavailable` (a ledger reconnecting after its server came back).
fn until_available<T>(mut f: impl FnMut() -> Result<T, LedgerError>) -> Result<T, LedgerError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            Err(LedgerError::Unavailable(e)) => {
                assert!(Instant::now() < deadline, "still unavailable: {e}");
                pause(20);
            }
            other => return other,
        }
    }
}

fn redis_time_ms(url: &str) -> i64 {
    let mut c = raw(url);
    let (s, us): (i64, i64) = redis::cmd("TIME").query(&mut c).unwrap();
    s * 1000 + us / 1000
}

/// A scratch directory, removed when dropped (also when a test fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(unique("bc_ledger"));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const USER: Account = Account::User(1);

fn call(instance: u64, worker: u32, account: Account, seq: u64) -> CallId {
    CallId { holder: HolderId { instance: InstanceId(instance), worker }, account, seq }
}

fn funding(remaining: Quota, total: Quota, version: i64) -> Funding {
    Funding { remaining, total, version }
}

// ---- the differential run ---------------------------------------------------------------------------

/// Accounts, instances and holders of a differential run. Instance ids include values beyond 2^53
/// (Lua must handle them as strings).
const ACCOUNTS: [Account; 3] = [Account::User(1), Account::User(2), Account::Key(1)];
const INSTANCES: [u64; 3] = [u64::MAX - 1, (1 << 60) + 12_345, 7];
const HOLDERS: usize = 6;

fn holder(h: usize) -> HolderId {
    HolderId { instance: InstanceId(INSTANCES[h / 2]), worker: (h % 2) as u32 }
}

/// A huge TTL: never reached.
const NEVER: Millis = i64::MAX;

#[derive(Debug, Clone)]
enum Op {
    Heartbeat {
        i: usize,
    },
    Take {
        h: usize,
        a: usize,
        want: Quota,
        floor: Quota,
        skip: u64,
    },
    GiveBack {
        h: usize,
        a: usize,
        amount: Quota,
        skip: u64,
    },
    Report {
        h: usize,
        a: usize,
        amount: Quota,
        skip: u64,
    },
    /// Sends the `k`-th last row call again, unchanged.
    Repeat {
        k: usize,
    },
    /// Sends a take under the id of the `k`-th last row call (which the protocol never does, but the
    /// ledger must answer like the model: from the row's last grant).
    Reuse {
        k: usize,
        want: Quota,
    },
    ZeroSeq {
        h: usize,
        a: usize,
    },
    /// TTL 0 (retire) or never.
    Reclaim {
        i: usize,
        now: bool,
    },
    Stale {
        zero: bool,
    },
    Open {
        a: usize,
        remaining: Quota,
        extra: Quota,
        version: i64,
    },
    Fund {
        a: usize,
        total: Quota,
        version: i64,
    },
    Balance {
        a: usize,
    },
    /// Only where the backend takes the caller's clock.
    Rate {
        token: i64,
        dt: Millis,
        want: i64,
        limit: i64,
    },
    /// Drop the backend and open it again from where it keeps its state.
    Restart,
}

fn op(with_rate: bool) -> impl Strategy<Value = Op> {
    let h = 0..HOLDERS;
    let a = 0..ACCOUNTS.len();
    let i = 0..INSTANCES.len();
    let amount = prop_oneof![4 => 0i64..3_000, 1 => -800i64..0];
    let want = prop_oneof![8 => 0i64..4_000, 1 => -5i64..0];
    let base = prop_oneof![
        3 => i.clone().prop_map(|i| Op::Heartbeat { i }),
        8 => (h.clone(), a.clone(), want.clone(), prop_oneof![3 => Just(0i64), 2 => 0i64..2_000, 1 => -3i64..0], 0u64..3)
            .prop_map(|(h, a, want, floor, skip)| Op::Take { h, a, want, floor, skip }),
        3 => (h.clone(), a.clone(), amount.clone(), 0u64..3).prop_map(|(h, a, amount, skip)| Op::GiveBack { h, a, amount, skip }),
        3 => (h.clone(), a.clone(), prop_oneof![6 => 0i64..1_500, 1 => -10i64..0], 0u64..3)
            .prop_map(|(h, a, amount, skip)| Op::Report { h, a, amount, skip }),
        3 => (0usize..6).prop_map(|k| Op::Repeat { k }),
        1 => (0usize..6, 0i64..500).prop_map(|(k, want)| Op::Reuse { k, want }),
        1 => (h.clone(), a.clone()).prop_map(|(h, a)| Op::ZeroSeq { h, a }),
        2 => (i.clone(), any::<bool>()).prop_map(|(i, now)| Op::Reclaim { i, now }),
        1 => any::<bool>().prop_map(|zero| Op::Stale { zero }),
        3 => (a.clone(), 0i64..6_000, -500i64..2_000, -1i64..6)
            .prop_map(|(a, remaining, extra, version)| Op::Open { a, remaining, extra, version }),
        3 => (a.clone(), 0i64..9_000, -1i64..8).prop_map(|(a, total, version)| Op::Fund { a, total, version }),
        1 => a.clone().prop_map(|a| Op::Balance { a }),
        1 => Just(Op::Restart),
    ];
    let rate = (0i64..3, prop_oneof![Just(0i64), 0i64..40_000, -2_000i64..0], -2i64..40, 1i64..60)
        .prop_map(|(token, dt, want, limit)| Op::Rate { token, dt, want, limit });
    if with_rate { prop_oneof![12 => base, 2 => rate].boxed() } else { base.boxed() }
}

#[derive(Debug, Clone, Copy)]
enum RowOp {
    Take(Quota, Quota),
    GiveBack(Quota),
    Report(Quota),
}

/// What a backend keeps, for runs that can look at it.
trait Backend: Ledger {
    fn persisted_state(&self) -> Option<LedgerState>;
}

impl Backend for RedisLedger {
    fn persisted_state(&self) -> Option<LedgerState> {
        None
    }
}

impl Backend for EmbeddedLedger {
    fn persisted_state(&self) -> Option<LedgerState> {
        Some(self.state().clone())
    }
}

/// Runs `ops` against the reference and the backend `make` opens, and demands identical answers and an
/// identical audit of every account after every call. `server_clock`: the backend ignores the caller's
/// `now` (heartbeat and generation values are then only compared for consistency).
fn differential<L: Backend>(mut make: impl FnMut() -> L, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut model = ModelLedger::new(4);
    let mut backend = Some(make());
    let mut seqs = [0u64; HOLDERS];
    let mut sent: Vec<(CallId, RowOp)> = Vec::new();
    let mut generation: Option<u64> = None;
    let mut now: Millis = 1_000;
    let mut rate_now: Millis = 1_000_000;
    for (step, op) in ops.iter().enumerate() {
        let b = backend.as_mut().unwrap();
        now += 1;
        let mut next = |h: usize, a: usize, skip: u64| {
            seqs[h] += 1 + skip;
            CallId { holder: holder(h), account: ACCOUNTS[a], seq: seqs[h] }
        };
        let row = |m: &mut ModelLedger, b: &mut L, c: CallId, r: RowOp| -> Result<(), TestCaseError> {
            let (want, got) = match r {
                RowOp::Take(w, f) => (m.take(c, w, f), b.take(c, w, f)),
                RowOp::GiveBack(x) => (m.give_back(c, x).map(|()| 0), b.give_back(c, x).map(|()| 0)),
                RowOp::Report(x) => (m.report_spend(c, x).map(|()| 0), b.report_spend(c, x).map(|()| 0)),
            };
            prop_assert_eq!(&got, &want, "step {} {:?} {:?}", step, c, r);
            Ok(())
        };
        match *op {
            Op::Heartbeat { i } => {
                let id = InstanceId(INSTANCES[i]);
                let (want, got) = (model.heartbeat(id, now), b.heartbeat(id, now));
                match (&want, &got) {
                    (Ok(_), Ok(g)) => {
                        prop_assert_eq!(*generation.get_or_insert(*g), *g, "the generation changed");
                    }
                    _ => prop_assert_eq!(&got, &want, "step {} heartbeat", step),
                }
            }
            Op::Take { h, a, want, floor, skip } => {
                let c = next(h, a, skip);
                sent.push((c, RowOp::Take(want, floor)));
                row(&mut model, b, c, RowOp::Take(want, floor))?;
            }
            Op::GiveBack { h, a, amount, skip } => {
                let c = next(h, a, skip);
                sent.push((c, RowOp::GiveBack(amount)));
                row(&mut model, b, c, RowOp::GiveBack(amount))?;
            }
            Op::Report { h, a, amount, skip } => {
                let c = next(h, a, skip);
                sent.push((c, RowOp::Report(amount)));
                row(&mut model, b, c, RowOp::Report(amount))?;
            }
            Op::Repeat { k } => {
                if !sent.is_empty() {
                    let (c, r) = sent[sent.len() - 1 - k % sent.len()];
                    row(&mut model, b, c, r)?;
                }
            }
            Op::Reuse { k, want } => {
                if !sent.is_empty() {
                    let (c, _) = sent[sent.len() - 1 - k % sent.len()];
                    row(&mut model, b, c, RowOp::Take(want, 0))?;
                }
            }
            Op::ZeroSeq { h, a } => {
                let c = CallId { holder: holder(h), account: ACCOUNTS[a], seq: 0 };
                row(&mut model, b, c, RowOp::Take(1, 0))?;
            }
            Op::Reclaim { i, now: retire } => {
                let id = InstanceId(INSTANCES[i]);
                let ttl = if retire { 0 } else { NEVER };
                prop_assert_eq!(
                    b.reclaim(id, now, ttl),
                    model.reclaim(id, now, ttl),
                    "step {} reclaim",
                    step
                );
            }
            Op::Stale { zero } => {
                let ttl = if zero { 0 } else { NEVER };
                prop_assert_eq!(
                    b.stale_instances(now, ttl),
                    model.stale_instances(now, ttl),
                    "step {}",
                    step
                );
            }
            Op::Open { a, remaining, extra, version } => {
                let f = funding(remaining, remaining + extra, version);
                prop_assert_eq!(b.open(ACCOUNTS[a], f), model.open(ACCOUNTS[a], f), "step {} open", step);
            }
            Op::Fund { a, total, version } => {
                let f = funding(0, total, version);
                prop_assert_eq!(b.fund(ACCOUNTS[a], f), model.fund(ACCOUNTS[a], f), "step {} fund", step);
            }
            Op::Balance { a } => {
                prop_assert_eq!(b.balance(ACCOUNTS[a]), model.balance(ACCOUNTS[a]), "step {} balance", step);
            }
            Op::Rate { token, dt, want, limit } => {
                rate_now += dt;
                let key = RateKey { token, kind: RateKind::Tokens };
                let window = 10_000;
                prop_assert_eq!(
                    b.rate_take(key, rate_now, want, limit, window),
                    model.rate_take(key, rate_now, want, limit, window),
                    "step {} rate",
                    step
                );
            }
            Op::Restart => {
                drop(backend.take()); // closes the old connection or releases the file lock first
                // The reference restarts too (it forgets its rate windows, soft state, as the backend may).
                model.restart();
                backend = Some(make());
                if let Some(state) = backend.as_ref().unwrap().persisted_state() {
                    prop_assert_eq!(&state, model.state(), "step {} state after reopening", step);
                }
            }
        }
        let b = backend.as_mut().unwrap();
        for a in ACCOUNTS {
            prop_assert_eq!(b.audit(a), model.audit(a), "step {} {:?} audit of {:?}", step, op, a);
        }
    }
    let b = backend.as_mut().unwrap();
    prop_assert_eq!(b.stale_instances(now, 0), model.stale_instances(now, 0));
    if let Some(state) = b.persisted_state() {
        prop_assert_eq!(&state, model.state());
    }
    Ok(())
}

fn cases(default: u32) -> u32 {
    std::env::var("BURNCLOUD_LEDGER_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    /// The Redis scripts answer every call exactly as the model does and leave every account exactly
    /// as the model does: sequence checks, repeats, stale calls, fences, takes on accounts not opened,
    /// fundings in any order, reclaims (ttl 0 or never), invalid calls, reconnects.
    #[test]
    fn redis_ledger_matches_the_model(ops in proptest::collection::vec(op(false), 50..100)) {
        let ns = Namespace::new(&redis_url());
        differential(|| ns.ledger(), &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), max_shrink_iters: 500, ..ProptestConfig::default() })]

    /// The embedded ledger answers as the model does (it is the model plus files) and every reopen from
    /// its files restores exactly the model's state, with snapshots rotating every few calls.
    #[test]
    fn embedded_ledger_matches_the_model_across_reopens(ops in proptest::collection::vec(op(true), 50..100)) {
        let dir = Scratch::new();
        let path = dir.join("ledger.json");
        differential(|| EmbeddedLedger::open_with(&path, 3).unwrap(), &ops)?;
    }
}

// ---- the rate window --------------------------------------------------------------------------------

/// The production rate script with its clock line replaced by an argument, so its arithmetic can be
/// compared with `RateWindow::take` at chosen times.
fn rate_script_with_clock() -> redis::Script {
    let prelude = include_str!("../src/ledger/lua/prelude.lua");
    let rate = include_str!("../src/ledger/lua/rate_take.lua");
    let marker = "now_ms() -- @clock";
    assert_eq!(rate.matches(marker).count(), 1, "the rate script's clock line moved");
    redis::Script::new(&format!("{prelude}\n{}", rate.replace(marker, "tonumber(ARGV[4])")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    /// The rate script's integer arithmetic is `RateWindow::take`'s, at any time, for any window,
    /// including a clock that goes backwards and times far from zero.
    #[test]
    fn redis_rate_window_arithmetic_matches_the_model(
        start in prop_oneof![0i64..100_000, 1_700_000_000_000i64..1_800_000_000_000],
        window in prop_oneof![Just(1i64), Just(7), 1i64..5_000, Just(60_000)],
        takes in proptest::collection::vec(
            (prop_oneof![4 => 0i64..3_000, 4 => 0i64..90_000, 1 => -5_000i64..0], -3i64..80, 0i64..120),
            1..60,
        ),
    ) {
        let ns = Namespace::new(&redis_url());
        let mut c = raw(&ns.url);
        let script = rate_script_with_clock();
        let key = format!("{{bc:{}}}:rate:1:rpm", ns.name);
        let mut model = RateWindow::default();
        let mut now = start;
        for (dt, want, limit) in takes {
            now += dt;
            let expected = model.take(now, want, limit, window);
            let (granted, retry_after_ms): (i64, i64) =
                script.key(&key).arg(want).arg(limit).arg(window).arg(now).invoke(&mut c).unwrap();
            prop_assert_eq!(RateGrant { granted, retry_after_ms }, expected, "at {} window {}", now, window);
            let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut c).unwrap();
            prop_assert!(ttl > 0 && ttl <= (2 * window).max(1_000), "ttl {} for window {}", ttl, window);
            // This test's clock is not the server's: keep the window from expiring on real time.
            let _: i64 = redis::cmd("PERSIST").arg(&key).query(&mut c).unwrap();
        }
    }
}

#[test]
fn redis_rate_take_counts_on_the_servers_clock() {
    let ns = Namespace::new(&redis_url());
    let mut l = ns.ledger();
    let key = RateKey { token: 5, kind: RateKind::Requests };
    // A window far longer than the test: all takes fall into one fixed window, whatever the clock says.
    let window: Millis = 1_000_000_000_000;
    let mut model = RateWindow::default();
    let mut granted = Vec::new();
    for want in [30, 30, 30, 30, 5] {
        let t0 = redis_time_ms(&ns.url);
        // The caller's `now` (0) is ignored.
        let got = l.rate_take(key, 0, want, 100, window).unwrap();
        let t1 = redis_time_ms(&ns.url);
        assert_eq!(got.granted, model.take(t0, want, 100, window).granted);
        if got.granted < want {
            // The retry time counts down on the server's clock, somewhere between t0 and t1.
            let left = |t: Millis| window - (t - t.div_euclid(window) * window);
            assert!(got.retry_after_ms <= left(t0) && got.retry_after_ms >= left(t1), "{got:?}");
        } else {
            assert_eq!(got.retry_after_ms, 0);
        }
        granted.push(got.granted);
    }
    assert_eq!(granted, vec![30, 30, 30, 10, 0]);
    // The key expires two windows after its last take (soft state).
    let mut c = raw(&ns.url);
    let ttl: i64 = redis::cmd("PTTL").arg(format!("{}rate:5:rpm", l.key_prefix())).query(&mut c).unwrap();
    assert!(ttl > 0 && ttl <= 2 * window, "{ttl}");
}

// ---- Redis: clock, generation, keys -----------------------------------------------------------------

#[test]
fn redis_ledger_times_are_the_servers_not_the_callers() {
    let ns = Namespace::new(&redis_url());
    let mut l = ns.ledger();
    let id = InstanceId(42);
    l.heartbeat(id, 0).unwrap();
    // The caller claims a time far in the future: the server's clock says the beat is fresh.
    assert_eq!(l.stale_instances(i64::MAX, 60_000).unwrap(), vec![]);
    assert_eq!(l.reclaim(id, i64::MAX, 60_000).unwrap(), Reclaim::Alive);
    assert_eq!(l.stale_instances(0, 0).unwrap(), vec![id]);
    // The caller claims a time before the beat: the server's clock has moved on.
    pause(60);
    assert_eq!(l.stale_instances(-1, 30).unwrap(), vec![id]);
    assert_eq!(l.reclaim(id, -1, 30).unwrap(), Reclaim::Reclaimed { returned: vec![] });
    assert_eq!(l.heartbeat(id, 0), Err(LedgerError::Fenced { last_seq: 0 }));
}

#[test]
fn redis_ledger_keys_all_carry_the_namespace_hash_tag() {
    let ns = Namespace::new(&redis_url());
    let mut l = ns.ledger();
    assert_eq!(l.key_prefix(), format!("{{bc:{}}}:", ns.name));
    l.heartbeat(InstanceId(1), 0).unwrap();
    l.open(USER, funding(100, 100, 1)).unwrap();
    l.take(call(1, 0, USER, 1), 10, 0).unwrap();
    l.rate_take(RateKey { token: 1, kind: RateKind::Tokens }, 0, 1, 10, 60_000).unwrap();
    l.reclaim(InstanceId(1), 0, 0).unwrap();
    let mut keys = ns.keys();
    keys.sort();
    let prefix = l.key_prefix().to_owned();
    let expected: Vec<String> =
        ["acct:u:1", "acct_rows:u:1", "gen", "inst:1", "inst_rows:1", "live", "rate:1:tpm", "row:1:0:u:1"]
            .iter()
            .map(|k| format!("{prefix}{k}"))
            .collect();
    // `live` is an empty set after the reclaim, and Redis drops empty sets.
    let expected: Vec<String> = expected.into_iter().filter(|k| !k.ends_with(":live")).collect();
    assert_eq!(keys, expected);
}

#[test]
fn redis_ledger_answers_a_lost_reply_from_the_row_after_a_reconnect() {
    let ns = Namespace::new(&redis_url());
    let mut l = ns.ledger();
    l.heartbeat(InstanceId(1), 0).unwrap();
    l.open(USER, funding(1_000, 1_000, 1)).unwrap();
    assert_eq!(l.take(call(1, 0, USER, 1), 300, 0), Ok(300));
    // Another connection (a restarted ledger thread) repeats the call: the stored grant, nothing new.
    let mut other = ns.ledger();
    assert_eq!(other.take(call(1, 0, USER, 1), 300, 0), Ok(300));
    assert_eq!(other.balance(USER), Ok(700));
    assert_eq!(
        other.audit(USER),
        Ok(AccountAudit { balance: 700, reported: 0, held: 300, opened: true, funded: 1_000, version: 1 })
    );
}

// ---- Redis: restarts --------------------------------------------------------------------------------

#[test]
fn redis_state_survives_a_kill_with_aof_always() {
    let mut server = Server::start(true);
    let mut l = RedisLedger::connect(&server.url(), "aof").unwrap();
    assert_eq!(l.durable(), Some(true));
    let generation = l.heartbeat(InstanceId(1), 0).unwrap();
    l.open(USER, funding(1_000, 1_000, 1)).unwrap();
    l.fund(Account::Key(3), funding(0, 50, 2)).unwrap();
    assert_eq!(l.take(call(1, 0, USER, 1), 400, 0), Ok(400));
    l.report_spend(call(1, 0, USER, 2), 150).unwrap();
    let before = (l.audit(USER).unwrap(), l.audit(Account::Key(3)).unwrap());

    server.restart();

    let after = until_available(|| Ok((l.audit(USER)?, l.audit(Account::Key(3))?))).unwrap();
    assert_eq!(after, before);
    assert_eq!(l.heartbeat(InstanceId(1), 0), Ok(generation));
    assert_eq!(l.report_spend(call(1, 0, USER, 2), 150), Ok(()));
    assert_eq!(l.take(call(1, 0, USER, 1), 400, 0), Err(LedgerError::Stale { last_seq: 2 }));
    assert_eq!(l.take(call(1, 0, USER, 3), 100, 0), Ok(100));
    assert_eq!(l.balance(USER), Ok(500));
}

#[test]
fn redis_without_persistence_comes_back_with_a_new_generation() {
    let mut server = Server::start(false);
    let mut l = RedisLedger::connect(&server.url(), "volatile").unwrap();
    assert_eq!(l.durable(), Some(false));
    let generation = l.heartbeat(InstanceId(1), 0).unwrap();
    l.open(USER, funding(1_000, 1_000, 1)).unwrap();
    assert_eq!(l.take(call(1, 0, USER, 1), 400, 0), Ok(400));

    server.restart();

    assert_eq!(until_available(|| l.take(call(1, 0, USER, 2), 10, 0)), Err(LedgerError::UnknownInstance));
    let fresh = l.heartbeat(InstanceId(1), 0).unwrap();
    assert_ne!(fresh, generation);
    assert_eq!(l.take(call(1, 0, USER, 2), 10, 0), Err(LedgerError::UnknownAccount));
    assert_eq!(l.audit(USER), Ok(AccountAudit::default()));
    // A flush is a data loss too.
    let mut c = raw(&server.url());
    let _: () = redis::cmd("FLUSHALL").query(&mut c).unwrap();
    assert_ne!(l.heartbeat(InstanceId(1), 0).unwrap(), fresh);
}

#[test]
fn redis_ledger_is_unavailable_quickly_while_the_server_is_dead_and_recovers() {
    let port = free_port();
    // Nothing listens: connecting is no error, every call is.
    let mut l = RedisLedger::connect(&format!("redis://127.0.0.1:{port}"), "dead").unwrap();
    assert!(!l.is_connected());
    for _ in 0..3 {
        let t = Instant::now();
        assert!(matches!(l.heartbeat(InstanceId(1), 0), Err(LedgerError::Unavailable(_))));
        assert!(matches!(l.balance(USER), Err(LedgerError::Unavailable(_))));
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    let mut server = Server::start_on(port, false);
    let generation = until_available(|| l.heartbeat(InstanceId(1), 0)).unwrap();
    l.open(USER, funding(100, 100, 1)).unwrap();
    assert_eq!(l.take(call(1, 0, USER, 1), 10, 0), Ok(10));

    // Killed mid-use.
    server.kill();
    let t = Instant::now();
    assert!(matches!(l.take(call(1, 0, USER, 2), 10, 0), Err(LedgerError::Unavailable(_))));
    assert!(matches!(l.take(call(1, 0, USER, 2), 10, 0), Err(LedgerError::Unavailable(_))));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    server.spawn();
    let fresh = until_available(|| l.heartbeat(InstanceId(1), 0)).unwrap();
    assert_ne!(fresh, generation, "a server without persistence lost the state");

    // Hung (stopped, so the socket accepts but nothing answers): the read timeout ends the call.
    l.open(USER, funding(100, 100, 1)).unwrap();
    server.signal("-STOP");
    let t = Instant::now();
    assert!(matches!(l.take(call(1, 0, USER, 2), 10, 0), Err(LedgerError::Unavailable(_))));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(!l.is_connected(), "a timed-out connection is dropped");
    server.signal("-CONT");
    // The call may have been applied when the server woke up: the repeat answers it either way.
    assert_eq!(until_available(|| l.take(call(1, 0, USER, 2), 10, 0)), Ok(10));
    assert_eq!(l.balance(USER), Ok(90));
}

#[test]
fn redis_timeouts_are_configurable() {
    let mut server = Server::start(false);
    let options = RedisLedgerOptions {
        connect_timeout: Duration::from_millis(300),
        read_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(300),
    };
    let mut l = RedisLedger::connect_with(&server.url(), "timeouts", options).unwrap();
    l.ping().unwrap();
    server.signal("-STOP");
    let t = Instant::now();
    assert!(matches!(l.ping(), Err(LedgerError::Unavailable(_))));
    assert!(t.elapsed() < Duration::from_millis(1_500), "{:?}", t.elapsed());
    server.signal("-CONT");
    until_available(|| l.ping()).unwrap();
    server.kill();
}

// ---- Redis: concurrency -----------------------------------------------------------------------------

#[test]
fn redis_concurrent_takes_never_grant_beyond_the_balance() {
    const FUNDS: Quota = 20_000;
    let ns = Namespace::new(&redis_url());
    let mut l = ns.ledger();
    l.open(USER, funding(FUNDS, FUNDS, 1)).unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (url, name) = (ns.url.clone(), ns.name.clone());
            std::thread::spawn(move || {
                let mut l = RedisLedger::connect(&url, &name).unwrap();
                let instance = 100 + t;
                l.heartbeat(InstanceId(instance), 0).unwrap();
                let mut rng = fastrand::Rng::with_seed(t);
                let (mut granted, mut seq) = (0, 0);
                loop {
                    seq += 1;
                    let g = l.take(call(instance, 0, USER, seq), rng.i64(1..400), rng.i64(0..3)).unwrap();
                    if g == 0 && l.balance(USER).unwrap() == 0 {
                        return granted;
                    }
                    granted += g;
                }
            })
        })
        .collect();
    let total: Quota = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, FUNDS);
    assert_eq!(
        l.audit(USER),
        Ok(AccountAudit { balance: 0, reported: 0, held: FUNDS, opened: true, funded: FUNDS, version: 1 })
    );
}

// ---- embedded ---------------------------------------------------------------------------------------

fn embedded_workload(l: &mut impl Ledger, calls: u64) {
    l.heartbeat(InstanceId(1), 1).unwrap();
    l.heartbeat(InstanceId(2), 1).unwrap();
    l.open(USER, funding(1_000_000, 1_000_000, 1)).unwrap();
    for seq in 1..=calls {
        let instance = 1 + seq % 2;
        let c = call(instance, 0, USER, seq);
        match seq % 4 {
            0 => l.give_back(c, 7).unwrap(),
            1 => {
                l.take(c, 100, 0).unwrap();
            }
            2 => l.report_spend(c, 20).unwrap(),
            _ => {
                l.heartbeat(InstanceId(instance), seq as Millis).unwrap();
            }
        }
    }
}

fn log_lines(path: &Path) -> usize {
    let log = std::fs::read_to_string(format!("{}.log", path.display())).unwrap_or_default();
    log.lines().count()
}

#[test]
fn embedded_state_survives_drop_and_reopen_exactly() {
    let dir = Scratch::new();
    let path = dir.join("ledger.json");
    let mut l = EmbeddedLedger::open(&path).unwrap();
    assert_eq!(l.heartbeat(InstanceId(1), 0), Ok(1), "a new ledger has generation 1");
    let mut model = ModelLedger::new(1024);
    model.heartbeat(InstanceId(1), 0).unwrap();
    embedded_workload(&mut l, 300);
    embedded_workload(&mut model, 300);
    l.reclaim(InstanceId(2), 1_000, 10).unwrap();
    model.reclaim(InstanceId(2), 1_000, 10).unwrap();
    assert_eq!(l.state(), model.state());
    let before = l.state().clone();
    drop(l);
    let mut l = EmbeddedLedger::open(&path).unwrap();
    assert_eq!(l.state(), &before);
    assert_eq!(l.audit(USER), model.audit(USER));
    // Repeats are answered from the restored rows.
    assert_eq!(l.take(call(2, 0, USER, 297), 100, 0), model.take(call(2, 0, USER, 297), 100, 0));
}

#[test]
fn embedded_ledger_rotates_its_snapshot() {
    let dir = Scratch::new();
    let path = dir.join("ledger.json");
    let mut l = EmbeddedLedger::open_with(&path, 5).unwrap();
    embedded_workload(&mut l, 500);
    assert!(log_lines(&path) < 5, "the log is truncated at every snapshot");
    let snapshot: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(snapshot["format"], 1);
    let before = l.state().clone();
    drop(l);
    // Another snapshot interval reads the same files.
    let l = EmbeddedLedger::open_with(&path, 1_000).unwrap();
    assert_eq!(l.state(), &before);
    assert!(!dir.join("ledger.json.tmp").exists());
}

#[test]
fn embedded_ledger_ignores_a_torn_log_tail() {
    let dir = Scratch::new();
    let path = dir.join("ledger.json");
    let mut l = EmbeddedLedger::open_with(&path, 1_000).unwrap();
    embedded_workload(&mut l, 20);
    let before = l.state().clone();
    drop(l);
    let log = dir.join("ledger.json.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let whole = bytes.len();
    // A crash mid-append: half of an entry, no newline.
    bytes.extend_from_slice(br#"{"Take":{"call":{"holder":{"instance":1,"#);
    std::fs::write(&log, &bytes).unwrap();
    let mut l = EmbeddedLedger::open_with(&path, 1_000).unwrap();
    assert_eq!(l.state(), &before);
    assert_eq!(std::fs::metadata(&log).unwrap().len() as usize, whole, "the torn tail is cut off");
    // Appending goes on from a clean line.
    l.take(call(1, 0, USER, 1_000), 5, 0).unwrap();
    let after = l.state().clone();
    drop(l);
    assert_eq!(EmbeddedLedger::open_with(&path, 1_000).unwrap().state(), &after);
}

#[test]
fn embedded_ledger_refuses_unreadable_files_naming_them() {
    let dir = Scratch::new();
    let path = dir.join("ledger.json");
    let mut l = EmbeddedLedger::open_with(&path, 1_000).unwrap();
    embedded_workload(&mut l, 10);
    drop(l);
    let log = dir.join("ledger.json.log");
    let good = std::fs::read(&log).unwrap();
    let mut bad = b"not json\n".to_vec();
    bad.extend_from_slice(&good);
    std::fs::write(&log, &bad).unwrap();
    match EmbeddedLedger::open(&path) {
        Err(LedgerError::Unavailable(e)) => {
            assert!(e.contains("ledger.json.log") && e.contains("line 1"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(&log, &good).unwrap();
    std::fs::write(&path, b"{").unwrap();
    match EmbeddedLedger::open(&path) {
        Err(LedgerError::Unavailable(e)) => assert!(e.contains("ledger.json"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn embedded_ledger_is_opened_by_one_owner_at_a_time() {
    let dir = Scratch::new();
    let path = dir.join("ledger.json");
    let l = EmbeddedLedger::open(&path).unwrap();
    assert!(matches!(EmbeddedLedger::open(&path), Err(LedgerError::Unavailable(_))));
    drop(l);
    EmbeddedLedger::open(&path).unwrap();
}
