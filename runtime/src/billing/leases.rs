//! One worker's balance leases: admission from local funds, the pump that talks to the ledger thread,
//! and the drain at shutdown.
//!
//! [`Leases`] wraps the pure [`LeaseBook`] of `core::lease`: a request pre-deducts from it with no I/O
//! when the worker holds enough of the account's balance, and otherwise waits (bounded) while the pump
//! asks the ledger for a refill. The pump is one task per worker: it sends whatever calls the book says
//! are due (refills, reports of settled spend, returns of idle leases), resends calls that got no
//! answer, and follows the instance's incarnation (a fence or a ledger that lost its state).
//! A [`Hold`] is what an admitted request carries: settled with the actual cost, or refunded whole
//! when dropped unsettled (an upstream failure, a client gone).
//!
//! Never blocks and never locks: the book lives in a `RefCell` on its worker, borrowed only between
//! awaits; every ledger round trip is an await on a one-shot reply.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use burncloud_core::lease::{
    Account, CallId, HolderId, InstanceId, LeaseBook, LeasePolicy, LedgerCall, LedgerError, Millis,
    NotAdmitted, PreDeduction, ReplyEffect,
};
use burncloud_core::model::Quota;
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;

use crate::billing::ledger::LedgerHandle;
use crate::rt;

/// How often the pump looks for due calls without being woken.
const PUMP_TICK: Duration = Duration::from_millis(100);
/// A call without an answer for this long is treated as unanswered and sent again later.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Unanswered calls are sent again at most this often.
const RESEND_EVERY: Millis = 250;

/// Why a pre-deduction could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The ledger has less than the request needs.
    Insufficient,
    /// The ledger could not be reached (or the instance's heartbeat is not confirmed) in time.
    Unavailable,
}

/// A message to a worker's pump, from its own requests or from sibling workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpMsg {
    /// Something is due: look now rather than at the next tick.
    Kick,
    /// A sibling was refused a refill of this account: give back what this worker holds of it.
    Recall(Account),
}

/// The sending side of a worker's pump inbox (cheap to clone, usable from any thread).
pub type PumpSender = mpsc::UnboundedSender<PumpMsg>;
/// A worker's pump inbox.
pub type PumpInbox = mpsc::UnboundedReceiver<PumpMsg>;

/// A new pump inbox.
pub fn pump_channel() -> (PumpSender, PumpInbox) {
    mpsc::unbounded()
}

/// How long a refused request waits for its siblings' recalled leases before asking again.
const RECALL_WAIT: Duration = Duration::from_millis(40);

/// What a waiting request learns when the pump hears from the ledger about its account.
#[derive(Debug, Clone, Copy)]
enum Wake {
    /// A refill was answered; 0 when the balance was below `floor`.
    Granted { granted: Quota, floor: Quota },
    /// Something else changed (a retry, a fence, a new incarnation): try again.
    Changed,
}

/// One worker's leases.
pub struct Leases {
    worker: u32,
    ledger: LedgerHandle,
    book: RefCell<LeaseBook>,
    /// The incarnation epoch the book follows.
    epoch: Cell<u64>,
    /// Number of the last recall (of an overdrawn account) the book followed.
    recall_seen: Cell<u64>,
    /// The instance ids the book has spent under since the ledger last lost its state. A
    /// pre-deduction from any other id was made before the loss: it is settled against nothing.
    since_wipe: RefCell<Vec<InstanceId>>,
    waiters: RefCell<HashMap<Account, Vec<oneshot::Sender<Wake>>>>,
    /// Calls sent and not answered yet.
    awaiting: RefCell<HashSet<CallId>>,
    resend_at: Cell<Millis>,
    /// Every worker's pump inbox, this one's at index `worker`.
    pumps: std::sync::Arc<Vec<PumpSender>>,
    inbox: RefCell<Option<PumpInbox>>,
    stopped: Cell<bool>,
    /// Longest a request waits for a refill or a confirmed heartbeat.
    wait: Duration,
}

impl Leases {
    pub fn new(
        worker: u32,
        ledger: LedgerHandle,
        policy: LeasePolicy,
        wait: Duration,
        pumps: std::sync::Arc<Vec<PumpSender>>,
        inbox: PumpInbox,
    ) -> Rc<Leases> {
        let incarnation = ledger.status.incarnation();
        let recall_seq = ledger.status.recall_seq();
        let holder = HolderId { instance: incarnation.instance, worker };
        Rc::new(Leases {
            worker,
            ledger,
            book: RefCell::new(LeaseBook::new(holder, policy)),
            epoch: Cell::new(incarnation.epoch),
            recall_seen: Cell::new(recall_seq),
            since_wipe: RefCell::new(vec![incarnation.instance]),
            waiters: RefCell::default(),
            awaiting: RefCell::default(),
            resend_at: Cell::new(0),
            pumps,
            inbox: RefCell::new(Some(inbox)),
            stopped: Cell::new(false),
            wait,
        })
    }

    fn now(&self) -> Millis {
        self.ledger.status.now_ms()
    }

    fn kick(&self) {
        if let Some(own) = self.pumps.get(self.worker as usize) {
            let _ = own.unbounded_send(PumpMsg::Kick);
        }
    }

    /// Asks every sibling worker to give back what it holds of `account`. Whether there was any.
    fn recall_siblings(&self, account: Account) -> bool {
        let mut any = false;
        for (i, pump) in self.pumps.iter().enumerate() {
            if i != self.worker as usize {
                any |= pump.unbounded_send(PumpMsg::Recall(account)).is_ok();
            }
        }
        any
    }

    /// Follows the instance's incarnation and heartbeat acknowledgements into the book.
    fn sync(&self) {
        let status = &self.ledger.status;
        let inc = status.incarnation();
        if inc.epoch != self.epoch.get() {
            let holder = HolderId { instance: inc.instance, worker: self.worker };
            {
                let mut book = self.book.borrow_mut();
                if inc.wiped {
                    // The ledger forgot every lease, and the accounts are opened again from the
                    // database, whose consume events include the requests in flight now: those
                    // settle against nothing (charged to the new rows as well, a request whose
                    // event is committed before the reopening would be paid twice).
                    let policy = *book.policy();
                    *book = LeaseBook::new(holder, policy);
                    self.awaiting.borrow_mut().clear();
                    *self.since_wipe.borrow_mut() = vec![inc.instance];
                } else {
                    // Fenced: requests admitted before settle as debts on the new rows (the reclaim
                    // returned their pre-deductions to the balances).
                    book.fence();
                    book.reincarnate(inc.instance);
                    self.since_wipe.borrow_mut().push(inc.instance);
                }
            }
            self.epoch.set(inc.epoch);
            self.wake_all();
        }
        if let Some(at) = status.acked_sent_at() {
            self.book.borrow_mut().heartbeat_acked(at);
        }
        let recall_seq = status.recall_seq();
        let seen = self.recall_seen.replace(recall_seq);
        if recall_seq != seen {
            self.follow_recalls(seen);
        }
    }

    /// Gives back what the book holds of every account recalled after recall number `seen` (all of
    /// them when the kept recalls no longer reach back that far).
    fn follow_recalls(&self, seen: u64) {
        let recalls = self.ledger.status.recalls();
        let complete = recalls.entries.front().is_some_and(|(first, _)| *first <= seen + 1);
        let mut book = self.book.borrow_mut();
        if complete {
            for (_, account) in recalls.entries.iter().filter(|(n, _)| *n > seen) {
                book.recall(*account);
            }
        } else {
            let held: Vec<Account> = book.accounts().map(|a| a.account()).collect();
            for account in held {
                book.recall(account);
            }
        }
        drop(book);
        self.kick();
    }

    /// Sets `amount` aside on `account` for one request: from the local lease when it suffices, else
    /// after a refill from the ledger (waiting at most the configured time).
    pub async fn pre_deduct(&self, account: Account, amount: Quota) -> Result<PreDeduction, Refusal> {
        let deadline = std::time::Instant::now() + self.wait;
        let mut recalled = false;
        loop {
            self.sync();
            let attempt = self.book.borrow_mut().pre_deduct(account, amount, self.now());
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match attempt {
                Ok(pre) => return Ok(pre),
                Err(NotAdmitted::NeedRefill(need)) => {
                    if left.is_zero() {
                        return Err(Refusal::Unavailable);
                    }
                    let (tx, rx) = oneshot::channel();
                    self.waiters.borrow_mut().entry(account).or_default().push(tx);
                    self.kick();
                    match rt::timeout(left, rx).await {
                        Err(_) => return Err(Refusal::Unavailable),
                        Ok(Ok(Wake::Granted { granted: 0, floor })) if need.shortfall >= floor => {
                            // Siblings may hold what the balance lacks: once, ask them to give it back.
                            if recalled || !self.recall_siblings(account) {
                                return Err(Refusal::Insufficient);
                            }
                            recalled = true;
                            rt::sleep(RECALL_WAIT.min(left)).await;
                        }
                        Ok(_) => {}
                    }
                }
                Err(NotAdmitted::Unconfirmed) => {
                    if left.is_zero() {
                        return Err(Refusal::Unavailable);
                    }
                    rt::sleep(left.min(Duration::from_millis(20))).await;
                }
            }
        }
    }

    /// Gives back what this worker holds of `account` beyond its requests in flight (with the pump's
    /// next call), so that the next request on it takes from the ledger's balance as it is now.
    pub fn recall(&self, account: Account) {
        self.book.borrow_mut().recall(account);
        self.kick();
    }

    /// Charges a request's actual cost against its pre-deduction (reported by the pump's next rounds).
    pub fn settle(&self, pre: PreDeduction, actual: Quota) {
        if !self.since_wipe.borrow().contains(&pre.holder().instance) {
            // Admitted before the ledger lost its state: the reopened account counts it from the
            // database (or, committed after the reopening, misses it: in the user's favour).
            return;
        }
        let now = self.now();
        self.book.borrow_mut().settle(pre, actual, now);
    }

    /// Gives a pre-deduction back whole.
    pub fn refund(&self, pre: PreDeduction) {
        if !self.since_wipe.borrow().contains(&pre.holder().instance) {
            return;
        }
        let now = self.now();
        self.book.borrow_mut().refund(pre, now);
    }

    fn wake(&self, account: Account, wake: Wake) {
        let waiting = self.waiters.borrow_mut().remove(&account).unwrap_or_default();
        for w in waiting {
            let _ = w.send(wake);
        }
    }

    fn wake_all(&self) {
        let all: Vec<_> = self.waiters.borrow_mut().drain().collect();
        for (_, waiting) in all {
            for w in waiting {
                let _ = w.send(Wake::Changed);
            }
        }
    }

    /// The pump: runs until [`Leases::drain`] stops it.
    pub async fn run(self: Rc<Self>) {
        let Some(mut inbox) = self.inbox.borrow_mut().take() else { return };
        while !self.stopped.get() {
            let first = {
                use futures_util::future::{Either, select};
                let next = inbox.next();
                let tick = std::pin::pin!(rt::sleep(PUMP_TICK));
                match select(next, tick).await {
                    Either::Left((msg, _)) => msg,
                    Either::Right(_) => None,
                }
            };
            let mut msg = first;
            while let Some(m) = msg {
                if let PumpMsg::Recall(account) = m {
                    self.book.borrow_mut().recall(account);
                }
                msg = inbox.try_recv().ok();
            }
            if self.stopped.get() {
                break;
            }
            let now = self.now();
            self.turn(now, now);
        }
    }

    /// One round: follow the incarnation, send the calls due at `due_at`, resend unanswered calls.
    fn turn(self: &Rc<Self>, now: Millis, due_at: Millis) {
        self.sync();
        let calls = self.book.borrow_mut().next_calls(due_at);
        for call in calls {
            self.send(call);
        }
        if now >= self.resend_at.get() {
            let stuck: Vec<LedgerCall> = {
                let awaiting = self.awaiting.borrow();
                self.book.borrow().in_flight().filter(|c| !awaiting.contains(&c.id)).collect()
            };
            for call in stuck {
                self.send(call);
            }
            self.resend_at.set(now + RESEND_EVERY);
        }
        self.book.borrow_mut().forget_quiet();
    }

    fn send(self: &Rc<Self>, call: LedgerCall) {
        if !self.awaiting.borrow_mut().insert(call.id) {
            return;
        }
        let me = self.clone();
        rt::spawn(async move {
            let reply = match rt::timeout(CALL_TIMEOUT, me.ledger.call(call)).await {
                Ok(r) => r,
                Err(_) => Err(LedgerError::Unavailable("no answer from the ledger thread".into())),
            };
            if !me.awaiting.borrow_mut().remove(&call.id) {
                return;
            }
            let effect = me.book.borrow_mut().on_reply(call.id, reply);
            let account = call.id.account;
            let retry = matches!(effect, ReplyEffect::Retry);
            match effect {
                ReplyEffect::Granted { granted, floor } => me.wake(account, Wake::Granted { granted, floor }),
                ReplyEffect::Retry | ReplyEffect::Ignored => {}
                ReplyEffect::Done | ReplyEffect::Fenced => me.wake(account, Wake::Changed),
                ReplyEffect::Rejected(e) => {
                    tracing::error!(error = %e, ?account, "the ledger refused a lease call as malformed");
                    me.wake(account, Wake::Changed);
                }
            }
            if !retry {
                me.kick();
            }
        });
    }

    /// Shutdown: stops the pump, reports every settled spend and returns every lease, waiting at most
    /// `limit` for the ledger's answers. What is not reported by then is returned to the balances by
    /// the instance's retirement (in the user's favour).
    pub async fn drain(self: &Rc<Self>, limit: Duration) {
        self.stopped.set(true);
        self.kick();
        let deadline = std::time::Instant::now() + limit;
        let policy = *self.book.borrow().policy();
        loop {
            let now = self.now();
            // Time is pushed past every interval, so every report and every return is due now.
            let due_at = now.saturating_add(policy.idle_after + policy.report_interval + 1);
            self.turn(now, due_at);
            let busy = self.book.borrow().in_flight().next().is_some();
            if !busy {
                return;
            }
            if std::time::Instant::now() >= deadline {
                let unreported: Quota =
                    self.book.borrow().accounts().map(|a| a.unreported_in_transit()).sum();
                tracing::warn!(
                    worker = self.worker,
                    unreported,
                    "the ledger did not answer in time at shutdown; unreported spend is refunded by the retirement"
                );
                return;
            }
            rt::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// What an admitted request holds: its pre-deductions on the user and, for a key with limited quota,
/// on the key. Refunded whole if dropped before [`Hold::settle`].
pub struct Hold {
    leases: Rc<Leases>,
    parts: Vec<PreDeduction>,
}

impl Hold {
    /// Pre-deducts `amount` from every account in order; all or nothing.
    pub async fn take(
        leases: &Rc<Leases>,
        accounts: &[Account],
        amount: Quota,
    ) -> Result<Hold, (Account, Refusal)> {
        let mut hold = Hold { leases: leases.clone(), parts: Vec::with_capacity(accounts.len()) };
        for account in accounts {
            let pre = leases.pre_deduct(*account, amount).await.map_err(|r| (*account, r))?;
            hold.parts.push(pre);
        }
        Ok(hold)
    }

    /// Charges the actual cost to every account of the hold.
    pub fn settle(mut self, actual: Quota) {
        for pre in std::mem::take(&mut self.parts) {
            self.leases.settle(pre, actual);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        for pre in std::mem::take(&mut self.parts) {
            self.leases.refund(pre);
        }
    }
}
