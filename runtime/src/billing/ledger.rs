//! The ledger thread ("burncloud-ledger"): the only owner of the balance ledger's connection (Redis, or
//! the embedded ledger in dev), and the instance's voice towards it.
//!
//! It serves workers' row calls, rate-permit requests and the management API's fundings in arrival
//! order, one at a time; sends the instance's heartbeat and publishes each acknowledgement (workers
//! admit requests only while one is recent); reaps instances whose heartbeat stopped (a crashed
//! sibling's leases go back to the balances); opens an account from the database the first time a
//! take meets it; and, when it learns the instance was fenced or that the ledger lost its state, moves
//! the instance to a new id and tells the workers. At shutdown it retires the instance (every row back
//! to the balances) after the workers have returned what they could.
//!
//! Blocking is its job (a Redis round trip, a database read for an open); it never runs on a worker,
//! and workers only ever wait on their own one-shot replies.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use burncloud_core::lease::{
    Account, AccountAudit, CallReply, Funding, InstanceId, Ledger, LedgerCall, LedgerError, Millis, Reclaim,
};
use burncloud_core::ratelimit::{RateGrant, RateKey};
use burncloud_storage::StorageHandle;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use futures_channel::oneshot;

/// A backend the ledger thread can own.
pub type Backend = Box<dyn Ledger + Send>;

/// How the instance talks to the ledger: timings of heartbeats and of the reaper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerTiming {
    /// A heartbeat is sent this often.
    pub beat_every: Duration,
    /// An instance whose heartbeat is this old is reclaimed by any sibling.
    pub ttl: Duration,
    /// Stale instances are looked for this often.
    pub reap_every: Duration,
    /// Accounts used since the last round have their funding re-read from the database this often.
    pub reconcile_every: Duration,
}

impl LedgerTiming {
    /// Timings derived from the reclaim TTL: a heartbeat every tenth of it, a reap every fifth.
    pub fn from_ttl(ttl: Duration) -> LedgerTiming {
        let ttl = ttl.max(Duration::from_millis(300));
        LedgerTiming {
            beat_every: ttl / 10,
            ttl,
            reap_every: ttl / 5,
            reconcile_every: Duration::from_secs(30),
        }
    }
}

/// Which instance id the process currently spends under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incarnation {
    /// Raised every time `instance` changes.
    pub epoch: u64,
    pub instance: InstanceId,
    /// The change came from a ledger that lost its state (not from a fence): every lease is gone and
    /// the accounts are opened again from the database.
    pub wiped: bool,
}

/// Recalls kept for workers that have not looked yet; one that falls further behind recalls every
/// account it holds.
const RECALLS_KEPT: usize = 256;

/// Accounts whose balance a funding left below zero (a lowered quota, a lowered key limit), numbered:
/// every worker gives back what it holds of them, so money leased before the change is not spent
/// after it.
#[derive(Debug, Default)]
pub struct Recalls {
    /// `(number, account)`, oldest first, numbers consecutive.
    pub entries: std::collections::VecDeque<(u64, Account)>,
}

/// What workers read of the ledger thread's state, without a message.
#[derive(Debug)]
pub struct LedgerStatus {
    clock: Instant,
    /// Process-clock time at which the last acknowledged heartbeat was sent; −1 before the first.
    acked_sent_at: AtomicI64,
    incarnation: ArcSwap<Incarnation>,
    /// Number of the last recall published (0: none yet); a worker compares it with the last it saw.
    recall_seq: AtomicU64,
    recalls: ArcSwap<Recalls>,
}

impl LedgerStatus {
    fn new(clock: Instant, instance: InstanceId) -> LedgerStatus {
        LedgerStatus {
            clock,
            acked_sent_at: AtomicI64::new(-1),
            incarnation: ArcSwap::from_pointee(Incarnation { epoch: 0, instance, wiped: false }),
            recall_seq: AtomicU64::new(0),
            recalls: ArcSwap::from_pointee(Recalls::default()),
        }
    }

    /// Number of the last recall published (cheap: one atomic load).
    pub fn recall_seq(&self) -> u64 {
        self.recall_seq.load(Ordering::Acquire)
    }

    /// The recalls still kept.
    pub fn recalls(&self) -> Arc<Recalls> {
        self.recalls.load_full()
    }

    /// Publishes a recall of `account` to every worker of the instance (ledger thread only).
    fn publish_recall(&self, account: Account) {
        let seq = self.recall_seq() + 1;
        let mut entries = self.recalls.load().entries.clone();
        entries.push_back((seq, account));
        while entries.len() > RECALLS_KEPT {
            entries.pop_front();
        }
        self.recalls.store(Arc::new(Recalls { entries }));
        self.recall_seq.store(seq, Ordering::Release);
    }

    /// Milliseconds on the process clock every worker and the ledger thread share.
    pub fn now_ms(&self) -> Millis {
        Millis::try_from(self.clock.elapsed().as_millis()).unwrap_or(Millis::MAX)
    }

    /// When the last acknowledged heartbeat was sent (process clock), if any was.
    pub fn acked_sent_at(&self) -> Option<Millis> {
        let at = self.acked_sent_at.load(Ordering::Acquire);
        (at >= 0).then_some(at)
    }

    pub fn incarnation(&self) -> Incarnation {
        **self.incarnation.load()
    }
}

/// A request to the ledger thread.
pub enum LedgerMsg {
    Call(LedgerCall, oneshot::Sender<Result<CallReply, LedgerError>>),
    Rate {
        key: RateKey,
        want: i64,
        limit: i64,
        window: Millis,
        reply: oneshot::Sender<Result<RateGrant, LedgerError>>,
    },
    /// A funding change committed to the database (top-up, edit). Kept and retried until applied.
    Fund(Account, Funding, oneshot::Sender<Result<(), LedgerError>>),
    Audit(Account, oneshot::Sender<Result<AccountAudit, LedgerError>>),
    /// Return every row of this instance to the balances and stop.
    Retire(oneshot::Sender<Result<(), LedgerError>>),
}

/// The workers' side of the ledger thread.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: Sender<LedgerMsg>,
    pub status: Arc<LedgerStatus>,
}

impl std::fmt::Debug for LedgerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerHandle").field("status", &self.status).finish()
    }
}

fn gone() -> LedgerError {
    LedgerError::Unavailable("the ledger thread has stopped".into())
}

impl LedgerHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, LedgerError>>) -> LedgerMsg,
    ) -> Result<T, LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Sends one row call and waits for the ledger's answer.
    pub async fn call(&self, call: LedgerCall) -> Result<CallReply, LedgerError> {
        self.ask(|r| LedgerMsg::Call(call, r)).await
    }

    pub async fn rate(
        &self,
        key: RateKey,
        want: i64,
        limit: i64,
        window: Millis,
    ) -> Result<RateGrant, LedgerError> {
        self.ask(|reply| LedgerMsg::Rate { key, want, limit, window, reply }).await
    }

    /// What the ledger holds for an account (balance, reported spend, leases outstanding).
    pub async fn audit(&self, account: Account) -> Result<AccountAudit, LedgerError> {
        self.ask(|r| LedgerMsg::Audit(account, r)).await
    }

    /// Hands a funding change to the ledger; resolves once applied, or once queued for retry when the
    /// ledger is unreachable (the error says so).
    pub async fn fund(&self, account: Account, funding: Funding) -> Result<(), LedgerError> {
        self.ask(|r| LedgerMsg::Fund(account, funding, r)).await
    }
}

/// Owner of the ledger thread.
pub struct LedgerThread {
    tx: Sender<LedgerMsg>,
    join: Option<JoinHandle<()>>,
}

impl LedgerThread {
    /// Retires the instance (returns every row of it to the balances) and joins the thread.
    pub fn shutdown(mut self) -> Result<(), LedgerError> {
        let (tx, rx) = oneshot::channel();
        let result = match self.tx.send(LedgerMsg::Retire(tx)) {
            Ok(()) => futures_lite::future::block_on(rx).unwrap_or_else(|_| Err(gone())),
            Err(_) => Err(gone()),
        };
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
        result
    }
}

/// A fresh random instance id.
pub fn new_instance_id() -> InstanceId {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source: fall back to the clock and the process id, still unique in practice.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return InstanceId(nanos ^ (u64::from(std::process::id()) << 32));
    }
    InstanceId(u64::from_le_bytes(bytes) | 1)
}

/// Wall-clock milliseconds (the embedded ledger's clock; Redis scripts use the server's own).
fn wall_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
        .unwrap_or(0)
}

/// Starts the ledger thread. The first heartbeat is sent before this returns, so that workers started
/// next can admit requests at once when the ledger is up (and start refusing them only after their
/// validity, when it is not).
pub fn start(
    backend: Backend,
    storage: StorageHandle,
    timing: LedgerTiming,
    clock: Instant,
) -> Result<(LedgerHandle, LedgerThread), String> {
    let instance = new_instance_id();
    let status = Arc::new(LedgerStatus::new(clock, instance));
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut state = LedgerLoop {
        ledger: backend,
        storage,
        timing,
        status: status.clone(),
        rx,
        instance,
        generation: None,
        wiped_instances: BTreeSet::new(),
        pending_fundings: BTreeMap::new(),
        touched: BTreeSet::new(),
        outage: false,
    };
    state.beat();
    let join = std::thread::Builder::new()
        .name("burncloud-ledger".into())
        .spawn(move || state.run())
        .map_err(|e| format!("cannot start the ledger thread: {e}"))?;
    Ok((LedgerHandle { tx: tx.clone(), status }, LedgerThread { tx, join: Some(join) }))
}

struct LedgerLoop {
    ledger: Backend,
    storage: StorageHandle,
    timing: LedgerTiming,
    status: Arc<LedgerStatus>,
    rx: Receiver<LedgerMsg>,
    instance: InstanceId,
    /// The ledger's generation as last seen; a change means it lost its state.
    generation: Option<u64>,
    /// Ids this process used before a ledger wipe: calls still carrying them are refused here, so a
    /// lease from before the wipe can never be given back into the rebuilt ledger.
    wiped_instances: BTreeSet<InstanceId>,
    /// Fundings not yet applied because the ledger was unreachable; newest per account.
    pending_fundings: BTreeMap<Account, Funding>,
    /// Accounts taken from since the last reconciliation round.
    touched: BTreeSet<Account>,
    /// Logging state: an outage is reported once, and its end once.
    outage: bool,
}

impl LedgerLoop {
    fn run(mut self) {
        let start = Instant::now();
        let mut next_beat = start + self.timing.beat_every;
        let mut next_reap = start + self.timing.reap_every;
        let mut next_reconcile = start + self.timing.reconcile_every;
        loop {
            let deadline = next_beat.min(next_reap).min(next_reconcile);
            match self.rx.recv_deadline(deadline) {
                Ok(LedgerMsg::Retire(reply)) => {
                    let _ = reply.send(self.retire());
                    return;
                }
                Ok(msg) => self.serve(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.retire();
                    return;
                }
            }
            let now = Instant::now();
            if now >= next_beat {
                self.beat();
                self.retry_fundings();
                next_beat = now + self.timing.beat_every;
            }
            if now >= next_reap {
                self.reap();
                next_reap = now + self.timing.reap_every;
            }
            if now >= next_reconcile {
                self.reconcile();
                next_reconcile = now + self.timing.reconcile_every;
            }
        }
    }

    fn serve(&mut self, msg: LedgerMsg) {
        match msg {
            LedgerMsg::Call(call, reply) => {
                let _ = reply.send(self.row_call(call));
            }
            LedgerMsg::Rate { key, want, limit, window, reply } => {
                let r = self.ledger.rate_take(key, wall_ms(), want, limit, window);
                self.note(&r);
                let _ = reply.send(r);
            }
            LedgerMsg::Fund(account, funding, reply) => {
                let r = self.ledger.fund(account, funding);
                self.note(&r);
                if r.is_ok() {
                    self.recall_if_overdrawn(account);
                }
                if r.is_err() {
                    let newest = self.pending_fundings.entry(account).or_insert(funding);
                    if funding.version > newest.version {
                        *newest = funding;
                    }
                }
                let _ = reply.send(r);
            }
            LedgerMsg::Audit(account, reply) => {
                let r = self.ledger.audit(account);
                self.note(&r);
                let _ = reply.send(r);
            }
            LedgerMsg::Retire(reply) => {
                let _ = reply.send(self.retire());
            }
        }
    }

    /// One row call; a take on an account the ledger has not seen opens it from the database first.
    fn row_call(&mut self, call: LedgerCall) -> Result<CallReply, LedgerError> {
        if self.wiped_instances.contains(&call.id.holder.instance) {
            return Err(LedgerError::Unavailable("the ledger lost its state; this lease is void".into()));
        }
        self.touched.insert(call.id.account);
        let first = call.apply(self.ledger.as_mut());
        let result = match first {
            Err(LedgerError::UnknownAccount) => match self.open(call.id.account) {
                Ok(()) => call.apply(self.ledger.as_mut()),
                Err(e) => Err(e),
            },
            other => other,
        };
        self.note(&result);
        result
    }

    /// Opens an account from what the database says it has left (pending spend committed first).
    fn open(&mut self, account: Account) -> Result<(), LedgerError> {
        let funding = futures_lite::future::block_on(self.storage.funding(account))
            .map_err(|e| LedgerError::Unavailable(format!("cannot read the account from the database: {e}")))?
            // A user or key that is gone (or a key with unlimited quota) has nothing to spend.
            .unwrap_or_default();
        tracing::debug!(?account, ?funding, "opening a ledger account from the database");
        self.ledger.open(account, funding)
    }

    fn beat(&mut self) {
        let sent_at = self.status.now_ms();
        match self.ledger.heartbeat(self.instance, wall_ms()) {
            Ok(generation) => {
                let changed = self.generation.is_some_and(|g| g != generation);
                self.generation = Some(generation);
                if changed {
                    tracing::error!(
                        "the balance ledger lost its state (a Redis without persistence restarted, or was \
                         flushed): every lease is dropped and accounts are opened again from the database"
                    );
                    self.wiped_instances.insert(self.instance);
                    self.reincarnate(true);
                    return;
                }
                self.status.acked_sent_at.fetch_max(sent_at, Ordering::AcqRel);
                self.back_up();
            }
            Err(LedgerError::Fenced { .. }) => {
                tracing::warn!(
                    instance = self.instance.0,
                    "this instance was reclaimed by the reaper (its heartbeat lapsed); continuing under a new id"
                );
                self.reincarnate(false);
            }
            Err(e) => self.down(&e),
        }
    }

    /// Moves to a fresh instance id, confirms it with a heartbeat, then tells the workers.
    fn reincarnate(&mut self, wiped: bool) {
        self.instance = new_instance_id();
        self.status.acked_sent_at.store(-1, Ordering::Release);
        let sent_at = self.status.now_ms();
        let acked = match self.ledger.heartbeat(self.instance, wall_ms()) {
            Ok(generation) => {
                self.generation = Some(generation);
                true
            }
            Err(e) => {
                self.down(&e);
                false
            }
        };
        let epoch = self.status.incarnation().epoch + 1;
        self.status.incarnation.store(Arc::new(Incarnation { epoch, instance: self.instance, wiped }));
        if acked {
            self.status.acked_sent_at.store(sent_at, Ordering::Release);
        }
    }

    fn reap(&mut self) {
        let now = wall_ms();
        let ttl = Millis::try_from(self.timing.ttl.as_millis()).unwrap_or(Millis::MAX);
        let stale = match self.ledger.stale_instances(now, ttl) {
            Ok(s) => s,
            Err(e) => return self.down(&e),
        };
        for instance in stale {
            match self.ledger.reclaim(instance, now, ttl) {
                Ok(Reclaim::Reclaimed { returned }) => {
                    let total: i64 = returned.iter().map(|(_, q)| *q).sum();
                    tracing::warn!(
                        instance = instance.0,
                        rows = returned.len(),
                        quota = total,
                        "reclaimed the leases of an instance whose heartbeat stopped"
                    );
                }
                Ok(_) => {}
                Err(e) => return self.down(&e),
            }
        }
    }

    fn retry_fundings(&mut self) {
        let pending = std::mem::take(&mut self.pending_fundings);
        for (account, funding) in pending {
            match self.ledger.fund(account, funding) {
                Ok(()) => self.recall_if_overdrawn(account),
                Err(e) => {
                    self.down(&e);
                    self.pending_fundings.insert(account, funding);
                }
            }
        }
    }

    /// After a funding: when it left the account's balance below zero (the quota was lowered under
    /// what the leases hold), every worker of this instance gives back what it holds of the account,
    /// so money leased before the change is not spent after it. Other instances' workers give theirs
    /// back when a request shows them the newer funding version (`Billing::follow_funding`), and
    /// their ledger threads recall at their next reconciliation round at the latest.
    fn recall_if_overdrawn(&mut self, account: Account) {
        match self.ledger.audit(account) {
            Ok(a) if a.opened && a.balance < 0 => {
                tracing::debug!(
                    ?account,
                    balance = a.balance,
                    "a funding left the balance below zero: recalling leases"
                );
                self.status.publish_recall(account);
            }
            Ok(_) => {}
            Err(e) => {
                let failed: Result<(), LedgerError> = Err(e);
                self.note(&failed);
            }
        }
    }

    /// Re-reads the funding of recently used accounts and applies any version the ledger missed (a
    /// funding pushed while it was down by an instance that then died, an edit made straight in the
    /// database).
    fn reconcile(&mut self) {
        let touched = std::mem::take(&mut self.touched);
        for account in touched {
            let funding = match futures_lite::future::block_on(self.storage.funding(account)) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reconcile ledger fundings with the database");
                    return;
                }
            };
            if let Err(e) = self.ledger.fund(account, funding) {
                return self.down(&e);
            }
            // A lowered quota applied by another instance is seen here at the latest.
            self.recall_if_overdrawn(account);
        }
    }

    /// Graceful shutdown: every row of this instance goes back to the balances.
    fn retire(&mut self) -> Result<(), LedgerError> {
        let result = self.ledger.reclaim(self.instance, wall_ms(), 0).map(|_| ());
        if let Err(e) = &result {
            tracing::error!(
                error = %e,
                "cannot retire this instance at the ledger; a sibling's reaper returns its leases after the TTL"
            );
        }
        result
    }

    fn note<T>(&mut self, r: &Result<T, LedgerError>) {
        match r {
            Err(e @ LedgerError::Unavailable(_)) => self.down(e),
            Ok(_) => self.back_up(),
            Err(_) => {}
        }
    }

    fn down(&mut self, e: &LedgerError) {
        if !self.outage {
            tracing::error!(error = %e, "the balance ledger is unreachable; requests are served from leases already held");
            self.outage = true;
        }
    }

    fn back_up(&mut self) {
        if self.outage {
            tracing::info!("the balance ledger is reachable again");
            self.outage = false;
        }
    }
}
