//! [`ModelLedger`]: the exact in-memory ledger. It is the reference implementation of [`Ledger`]: the
//! simulator runs against it, the embedded backend wraps it, and the Redis scripts must agree with it
//! call for call.
//!
//! It persists the way the protocol requires (`docs/LEASES.md`): a snapshot plus a log of every call
//! that changed state, appended before the call answers. [`ModelLedger::restart`] rebuilds the state
//! from those two alone, which is what a crashed ledger process does. Never does I/O itself: writing
//! the snapshot and the log to disk is the embedding backend's job.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lease::ids::{Account, CallId, HolderId, InstanceId, Millis};
use crate::lease::ledger::{AccountAudit, Funding, Ledger, LedgerError, Reclaim};
use crate::model::Quota;
use crate::ratelimit::{RateGrant, RateKey, RateWindow};

/// An account as the ledger sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRow {
    /// Spendable; negative only through debts given back.
    pub balance: Quota,
    /// Settled spend reported so far (cumulative).
    pub reported: Quota,
    /// Whether [`Ledger::open`] set the balance from the durable record.
    pub opened: bool,
    /// The funding total the balance reflects, and its version (see [`Funding`]).
    pub funded: Quota,
    pub version: i64,
}

/// One holder's journal entry for one account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// Funds the holder holds (leased, reserved or spent but not yet reported).
    pub amount: Quota,
    /// The last call applied on this row (0: none).
    pub last_seq: u64,
    /// What that call granted, if it was a take; answered again to a retry.
    pub last_grant: Quota,
}

/// An instance as the ledger sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRow {
    pub beat: Millis,
    pub fenced: bool,
}

/// Everything the ledger persists.
///
/// Serialized with every map as a sequence of `[key, value]` pairs (the keys are not strings, which
/// formats such as JSON require of map keys).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
    #[serde(with = "pairs")]
    pub accounts: BTreeMap<Account, AccountRow>,
    #[serde(with = "pairs")]
    pub rows: BTreeMap<(HolderId, Account), Row>,
    #[serde(with = "pairs")]
    pub instances: BTreeMap<InstanceId, InstanceRow>,
    /// Changes only when the ledger loses its state ([`ModelLedger::wipe`]).
    pub generation: u64,
}

/// A call that changed the state, as appended to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerOp {
    Take { call: CallId, want: Quota, floor: Quota },
    GiveBack { call: CallId, amount: Quota },
    ReportSpend { call: CallId, amount: Quota },
    Heartbeat { instance: InstanceId, now: Millis },
    Reclaim { instance: InstanceId, now: Millis, ttl: Millis },
    Open { account: Account, funding: Funding },
    Fund { account: Account, funding: Funding },
}

/// (De)serializes a map as a sequence of `(key, value)` pairs, for maps whose keys are not strings.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(deserializer: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(deserializer)?.into_iter().collect())
    }
}

/// Whether a row call is new or a repeat of the row's last call.
enum Seq {
    Next,
    Repeat,
}

impl LedgerState {
    /// `Σ rows` of one account: the funds all holders hold.
    pub fn held(&self, account: Account) -> Quota {
        self.rows.iter().filter(|((_, a), _)| *a == account).map(|(_, r)| r.amount).sum()
    }

    fn row_seq(&self, call: CallId) -> Result<Seq, LedgerError> {
        if call.seq == 0 {
            return Err(LedgerError::Invalid("call sequence numbers start at 1"));
        }
        let last_seq = self.rows.get(&(call.holder, call.account)).map_or(0, |r| r.last_seq);
        match self.instances.get(&call.holder.instance) {
            None => return Err(LedgerError::UnknownInstance),
            Some(i) if i.fenced => return Err(LedgerError::Fenced { last_seq }),
            Some(_) => {}
        }
        match call.seq.cmp(&last_seq) {
            std::cmp::Ordering::Equal => Ok(Seq::Repeat),
            std::cmp::Ordering::Less => Err(LedgerError::Stale { last_seq }),
            std::cmp::Ordering::Greater => Ok(Seq::Next),
        }
    }

    /// Applies a row call that passed the sequence check: moves `to_row` from the balance into the row
    /// and `to_reported` from the row into the reported spend.
    fn move_funds(&mut self, call: CallId, to_row: Quota, to_reported: Quota, grant: Quota) {
        let acct = self.accounts.entry(call.account).or_default();
        acct.balance -= to_row;
        acct.reported += to_reported;
        let row = self.rows.entry((call.holder, call.account)).or_default();
        row.amount += to_row - to_reported;
        row.last_seq = call.seq;
        row.last_grant = grant;
    }

    fn take(&mut self, call: CallId, want: Quota, floor: Quota) -> Result<(Quota, bool), LedgerError> {
        if want < 0 || floor < 0 {
            return Err(LedgerError::Invalid("take wants a non-negative amount"));
        }
        if let Seq::Repeat = self.row_seq(call)? {
            let grant = self.rows.get(&(call.holder, call.account)).map_or(0, |r| r.last_grant);
            return Ok((grant, false));
        }
        let Some(acct) = self.accounts.get(&call.account).filter(|a| a.opened) else {
            return Err(LedgerError::UnknownAccount);
        };
        let balance = acct.balance;
        // Beyond the floor the caller needs, at most half of what would be left: a small balance is
        // never drained into one holder's lease, so the account's other holders can still be funded.
        let grant = if balance >= floor.max(1) {
            floor + (want - floor).max(0).min((balance - floor) / 2)
        } else {
            0
        };
        self.move_funds(call, grant, 0, grant);
        Ok((grant, true))
    }

    fn give_back(&mut self, call: CallId, amount: Quota) -> Result<bool, LedgerError> {
        match self.row_seq(call)? {
            Seq::Repeat => Ok(false),
            Seq::Next => {
                self.move_funds(call, -amount, 0, 0);
                Ok(true)
            }
        }
    }

    fn report_spend(&mut self, call: CallId, amount: Quota) -> Result<bool, LedgerError> {
        if amount < 0 {
            return Err(LedgerError::Invalid("reported spend is never negative"));
        }
        match self.row_seq(call)? {
            Seq::Repeat => Ok(false),
            Seq::Next => {
                self.move_funds(call, 0, amount, 0);
                Ok(true)
            }
        }
    }

    fn heartbeat(&mut self, instance: InstanceId, now: Millis) -> Result<u64, LedgerError> {
        let row = self.instances.entry(instance).or_default();
        if row.fenced {
            return Err(LedgerError::Fenced { last_seq: 0 });
        }
        row.beat = now;
        Ok(self.generation)
    }

    fn reclaim(&mut self, instance: InstanceId, now: Millis, ttl: Millis) -> (Reclaim, bool) {
        let Some(row) = self.instances.get_mut(&instance) else { return (Reclaim::Unknown, false) };
        if row.fenced {
            return (Reclaim::AlreadyFenced, false);
        }
        if now.saturating_sub(row.beat) < ttl {
            return (Reclaim::Alive, false);
        }
        row.fenced = true;
        let mut returned = Vec::new();
        for ((holder, account), r) in self.rows.iter_mut().filter(|((h, _), _)| h.instance == instance) {
            let acct = self.accounts.entry(*account).or_default();
            acct.balance += r.amount;
            returned.push((CallId { holder: *holder, account: *account, seq: r.last_seq }, r.amount));
            r.amount = 0;
        }
        (Reclaim::Reclaimed { returned }, true)
    }

    fn stale_instances(&self, now: Millis, ttl: Millis) -> Vec<InstanceId> {
        self.instances
            .iter()
            .filter(|(_, r)| !r.fenced && now.saturating_sub(r.beat) >= ttl)
            .map(|(id, _)| *id)
            .collect()
    }

    fn open(&mut self, account: Account, funding: Funding) -> bool {
        let acct = self.accounts.entry(account).or_default();
        if acct.opened {
            return false;
        }
        acct.opened = true;
        if acct.version >= funding.version {
            // A newer funding arrived before the open: the durable read did not include it.
            acct.balance += funding.remaining + (acct.funded - funding.total);
        } else {
            acct.balance += funding.remaining;
            acct.funded = funding.total;
            acct.version = funding.version;
        }
        true
    }

    fn fund(&mut self, account: Account, funding: Funding) -> bool {
        // A funding not newer than the account's is not applied and not logged, so it must not leave
        // a (default) account behind either: a restart from the log would not recreate it.
        if funding.version <= self.accounts.get(&account).map_or(0, |a| a.version) {
            return false;
        }
        let acct = self.accounts.entry(account).or_default();
        if acct.opened {
            acct.balance += funding.total - acct.funded;
        }
        acct.funded = funding.total;
        acct.version = funding.version;
        true
    }

    /// Applies a logged call again; the answer was already given once and is not needed.
    fn replay(&mut self, op: &LedgerOp) {
        // Every logged call succeeded when it was first applied and the state it meets now is the same,
        // so replaying it succeeds the same way; its answer is discarded.
        let _ = match *op {
            LedgerOp::Take { call, want, floor } => self.take(call, want, floor).map(|_| ()),
            LedgerOp::GiveBack { call, amount } => self.give_back(call, amount).map(|_| ()),
            LedgerOp::ReportSpend { call, amount } => self.report_spend(call, amount).map(|_| ()),
            LedgerOp::Heartbeat { instance, now } => self.heartbeat(instance, now).map(|_| ()),
            LedgerOp::Reclaim { instance, now, ttl } => {
                self.reclaim(instance, now, ttl);
                Ok(())
            }
            LedgerOp::Open { account, funding } => {
                self.open(account, funding);
                Ok(())
            }
            LedgerOp::Fund { account, funding } => {
                self.fund(account, funding);
                Ok(())
            }
        };
    }
}

/// The exact in-memory ledger, with its persistence (snapshot + log) kept alongside.
#[derive(Debug, Clone)]
pub struct ModelLedger {
    state: LedgerState,
    snapshot: LedgerState,
    log: Vec<LedgerOp>,
    /// Take a new snapshot (and truncate the log) after this many logged calls.
    snapshot_every: usize,
    /// Rate-limit windows: soft state, neither snapshotted nor logged.
    rates: BTreeMap<RateKey, RateWindow>,
}

impl Default for ModelLedger {
    fn default() -> Self {
        Self::new(1024)
    }
}

impl ModelLedger {
    pub fn new(snapshot_every: usize) -> Self {
        let state = LedgerState { generation: 1, ..LedgerState::default() };
        Self {
            snapshot: state.clone(),
            state,
            log: Vec::new(),
            snapshot_every: snapshot_every.max(1),
            rates: BTreeMap::new(),
        }
    }

    /// Rebuilds a ledger from what it persisted: the last snapshot, then every logged call in order.
    pub fn restore(snapshot: LedgerState, log: &[LedgerOp], snapshot_every: usize) -> Self {
        let mut state = snapshot.clone();
        for op in log {
            state.replay(op);
        }
        Self {
            state,
            snapshot,
            log: log.to_vec(),
            snapshot_every: snapshot_every.max(1),
            rates: BTreeMap::new(),
        }
    }

    /// The ledger loses everything it held (a Redis without persistence restarting): every account,
    /// row and instance is gone and the generation changes, so instances know to start over.
    pub fn wipe(&mut self) {
        let generation = self.state.generation.wrapping_add(1).max(1);
        let state = LedgerState { generation, ..LedgerState::default() };
        self.snapshot = state.clone();
        self.state = state;
        self.log.clear();
        self.rates.clear();
    }

    /// A crash and restart: the live state is dropped and rebuilt from the snapshot and the log.
    pub fn restart(&mut self) {
        *self = Self::restore(self.snapshot.clone(), &self.log, self.snapshot_every);
    }

    pub fn state(&self) -> &LedgerState {
        &self.state
    }

    /// What is persisted now: the snapshot and the log since it.
    pub fn persisted(&self) -> (&LedgerState, &[LedgerOp]) {
        (&self.snapshot, &self.log)
    }

    pub fn account(&self, account: Account) -> AccountRow {
        self.state.accounts.get(&account).copied().unwrap_or_default()
    }

    pub fn row(&self, holder: HolderId, account: Account) -> Row {
        self.state.rows.get(&(holder, account)).copied().unwrap_or_default()
    }

    pub fn instance(&self, instance: InstanceId) -> Option<InstanceRow> {
        self.state.instances.get(&instance).copied()
    }

    /// The account's fields and the sum of its rows (all zero for an account never seen).
    pub fn audit_of(&self, account: Account) -> AccountAudit {
        let a = self.account(account);
        AccountAudit {
            balance: a.balance,
            reported: a.reported,
            held: self.state.held(account),
            opened: a.opened,
            funded: a.funded,
            version: a.version,
        }
    }

    fn record(&mut self, op: LedgerOp) {
        self.log.push(op);
        if self.log.len() >= self.snapshot_every {
            self.snapshot = self.state.clone();
            self.log.clear();
        }
    }
}

impl Ledger for ModelLedger {
    fn take(&mut self, call: CallId, want: Quota, floor: Quota) -> Result<Quota, LedgerError> {
        let (grant, applied) = self.state.take(call, want, floor)?;
        if applied {
            self.record(LedgerOp::Take { call, want, floor });
        }
        Ok(grant)
    }

    fn give_back(&mut self, call: CallId, amount: Quota) -> Result<(), LedgerError> {
        if self.state.give_back(call, amount)? {
            self.record(LedgerOp::GiveBack { call, amount });
        }
        Ok(())
    }

    fn report_spend(&mut self, call: CallId, amount: Quota) -> Result<(), LedgerError> {
        if self.state.report_spend(call, amount)? {
            self.record(LedgerOp::ReportSpend { call, amount });
        }
        Ok(())
    }

    fn heartbeat(&mut self, instance: InstanceId, now: Millis) -> Result<u64, LedgerError> {
        let generation = self.state.heartbeat(instance, now)?;
        self.record(LedgerOp::Heartbeat { instance, now });
        Ok(generation)
    }

    fn reclaim(&mut self, instance: InstanceId, now: Millis, ttl: Millis) -> Result<Reclaim, LedgerError> {
        let (outcome, applied) = self.state.reclaim(instance, now, ttl);
        if applied {
            self.record(LedgerOp::Reclaim { instance, now, ttl });
        }
        Ok(outcome)
    }

    fn stale_instances(&mut self, now: Millis, ttl: Millis) -> Result<Vec<InstanceId>, LedgerError> {
        Ok(self.state.stale_instances(now, ttl))
    }

    fn open(&mut self, account: Account, funding: Funding) -> Result<(), LedgerError> {
        if self.state.open(account, funding) {
            self.record(LedgerOp::Open { account, funding });
        }
        Ok(())
    }

    fn fund(&mut self, account: Account, funding: Funding) -> Result<(), LedgerError> {
        if self.state.fund(account, funding) {
            self.record(LedgerOp::Fund { account, funding });
        }
        Ok(())
    }

    fn balance(&mut self, account: Account) -> Result<Quota, LedgerError> {
        Ok(self.account(account).balance)
    }

    fn audit(&mut self, account: Account) -> Result<AccountAudit, LedgerError> {
        Ok(self.audit_of(account))
    }

    fn rate_take(
        &mut self,
        key: RateKey,
        now: Millis,
        want: i64,
        limit: i64,
        window: Millis,
    ) -> Result<RateGrant, LedgerError> {
        Ok(self.rates.entry(key).or_default().take(now, want, limit, window))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const USER: Account = Account::User(1);

    fn holder(instance: u64) -> HolderId {
        HolderId { instance: InstanceId(instance), worker: 0 }
    }

    fn call(instance: u64, seq: u64) -> CallId {
        CallId { holder: holder(instance), account: USER, seq }
    }

    fn funded(balance: Quota) -> ModelLedger {
        let mut l = ModelLedger::new(4);
        l.open(USER, Funding { remaining: balance, total: balance, version: 1 }).unwrap();
        l.heartbeat(InstanceId(1), 0).unwrap();
        l
    }

    fn funding(total: Quota, version: i64) -> Funding {
        Funding { remaining: total, total, version }
    }

    fn conserved(l: &ModelLedger, funds: Quota) -> bool {
        let a = l.account(USER);
        a.balance + l.state().held(USER) + a.reported == funds
    }

    #[test]
    fn take_grants_the_floor_and_at_most_half_of_what_is_left() {
        let mut l = funded(100);
        // 10 needed, and of the 90 beyond it half: 55.
        assert_eq!(l.take(call(1, 1), 500, 10), Ok(55));
        assert_eq!(l.account(USER).balance, 45);
        assert_eq!(l.row(holder(1), USER).amount, 55);
        // Needing all of it takes all of it.
        assert_eq!(l.take(call(1, 2), 45, 45), Ok(45));
        assert_eq!(l.account(USER).balance, 0);
    }

    #[test]
    fn a_rich_account_grants_the_whole_want() {
        let mut l = funded(1_000_000);
        assert_eq!(l.take(call(1, 1), 5_100, 100), Ok(5_100));
    }

    #[test]
    fn take_grants_nothing_below_the_floor() {
        let mut l = funded(100);
        assert_eq!(l.take(call(1, 1), 500, 101), Ok(0));
        assert_eq!(l.account(USER).balance, 100);
    }

    #[test]
    fn a_retried_take_is_answered_without_granting_again() {
        let mut l = funded(1000);
        assert_eq!(l.take(call(1, 1), 300, 0), Ok(300));
        assert_eq!(l.take(call(1, 1), 300, 0), Ok(300));
        assert_eq!(l.account(USER).balance, 700);
    }

    #[test]
    fn calls_older_than_the_rows_last_are_stale() {
        let mut l = funded(1000);
        l.take(call(1, 1), 300, 0).unwrap();
        l.give_back(call(1, 5), 100).unwrap();
        assert_eq!(l.take(call(1, 1), 300, 0), Err(LedgerError::Stale { last_seq: 5 }));
        assert_eq!(l.account(USER).balance, 800);
    }

    #[test]
    fn rows_need_a_heartbeat_first() {
        let mut l = funded(1000);
        assert_eq!(l.take(call(9, 1), 300, 0), Err(LedgerError::UnknownInstance));
    }

    #[test]
    fn reclaim_returns_rows_after_the_ttl_and_fences_the_instance() {
        let mut l = funded(1000);
        l.take(call(1, 1), 300, 0).unwrap();
        l.report_spend(call(1, 2), 50).unwrap();
        assert_eq!(l.reclaim(InstanceId(1), 99, 100), Ok(Reclaim::Alive));
        let r = l.reclaim(InstanceId(1), 100, 100).unwrap();
        assert_eq!(r, Reclaim::Reclaimed { returned: vec![(call(1, 2), 250)] });
        assert_eq!(l.account(USER).balance, 950);
        assert_eq!(l.take(call(1, 3), 10, 0), Err(LedgerError::Fenced { last_seq: 2 }));
        assert_eq!(l.heartbeat(InstanceId(1), 200), Err(LedgerError::Fenced { last_seq: 0 }));
        assert!(conserved(&l, 1000));
    }

    #[test]
    fn a_debt_given_back_takes_the_balance_negative_by_exactly_the_debt() {
        let mut l = funded(0);
        l.report_spend(call(1, 1), 40).unwrap();
        l.give_back(call(1, 2), -40).unwrap();
        assert_eq!(l.account(USER).balance, -40);
        assert_eq!(l.take(call(1, 3), 10, 0), Ok(0));
        assert!(conserved(&l, 0));
    }

    #[test]
    fn fundings_apply_once_per_version_and_never_backwards() {
        let mut l = funded(100);
        l.fund(USER, funding(150, 2)).unwrap();
        l.fund(USER, funding(150, 2)).unwrap();
        l.fund(USER, funding(120, 1)).unwrap();
        assert_eq!(l.account(USER).balance, 150);
        l.fund(USER, funding(130, 3)).unwrap();
        assert_eq!(l.account(USER).balance, 130);
    }

    #[test]
    fn a_take_on_an_account_never_opened_is_refused_until_it_is() {
        let mut l = ModelLedger::new(4);
        l.heartbeat(InstanceId(1), 0).unwrap();
        assert_eq!(l.take(call(1, 1), 10, 0), Err(LedgerError::UnknownAccount));
        l.open(USER, Funding { remaining: 70, total: 100, version: 4 }).unwrap();
        assert_eq!(l.take(call(1, 1), 10, 0), Ok(10));
    }

    #[test]
    fn a_funding_not_applied_leaves_no_trace() {
        let mut l = ModelLedger::new(4);
        l.fund(USER, funding(100, 0)).unwrap();
        l.fund(USER, funding(100, -1)).unwrap();
        assert_eq!(l.state(), &ModelLedger::new(4).state().clone());
    }

    #[test]
    fn a_funding_that_overtakes_the_open_is_added_to_it() {
        let mut l = ModelLedger::new(4);
        // The database read for the open saw total 100 (70 left); a top-up of 50 landed after it.
        l.fund(USER, funding(150, 5)).unwrap();
        l.open(USER, Funding { remaining: 70, total: 100, version: 4 }).unwrap();
        assert_eq!(l.account(USER).balance, 120);
        l.open(USER, Funding { remaining: 1_000, total: 1_000, version: 9 }).unwrap();
        assert_eq!(l.account(USER).balance, 120);
    }

    #[test]
    fn a_wipe_forgets_everything_and_changes_the_generation() {
        let mut l = funded(100);
        let before = l.heartbeat(InstanceId(1), 1).unwrap();
        l.wipe();
        assert_eq!(l.take(call(1, 1), 10, 0), Err(LedgerError::UnknownInstance));
        assert_ne!(l.heartbeat(InstanceId(1), 2).unwrap(), before);
        assert_eq!(l.take(call(1, 1), 10, 0), Err(LedgerError::UnknownAccount));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Take { instance: u64, want: Quota, floor: Quota },
        GiveBack { instance: u64, amount: Quota },
        Report { instance: u64, amount: Quota },
        RepeatLast,
        Reclaim { instance: u64 },
        TopUp { amount: Quota },
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..3, 0i64..5_000, 0i64..5_000).prop_map(|(instance, want, floor)| Op::Take {
                instance,
                want,
                floor
            }),
            (1u64..3, -2_000i64..5_000).prop_map(|(instance, amount)| Op::GiveBack { instance, amount }),
            (1u64..3, 0i64..3_000).prop_map(|(instance, amount)| Op::Report { instance, amount }),
            Just(Op::RepeatLast),
            (1u64..3).prop_map(|instance| Op::Reclaim { instance }),
            (0i64..10_000).prop_map(|amount| Op::TopUp { amount }),
            Just(Op::Restart),
        ]
    }

    proptest! {
        /// Whatever the calls, retries and restarts: money is conserved, a take never overdraws, a
        /// repeated call changes nothing, and a restart restores exactly.
        #[test]
        fn the_ledger_conserves_money(ops in proptest::collection::vec(op(), 1..120)) {
            let mut l = funded(1_000);
            l.heartbeat(InstanceId(2), 0).unwrap();
            let (mut funds, mut seq, mut last, mut version) = (1_000, 0u64, None, 1);
            for op in ops {
                let before = l.state().clone();
                let mut next = |instance| { seq += 1; call(instance, seq) };
                match op {
                    Op::Take { instance, want, floor } => {
                        let c = next(instance);
                        last = Some((c, want, floor));
                        if let Ok(g) = l.take(c, want, floor) {
                            prop_assert!(g == 0 || g >= floor);
                            prop_assert!(before.accounts.get(&USER).map_or(0, |a| a.balance) < 0 || l.account(USER).balance >= 0);
                        }
                    }
                    Op::GiveBack { instance, amount } => { let _ = l.give_back(next(instance), amount); }
                    Op::Report { instance, amount } => { let _ = l.report_spend(next(instance), amount); }
                    Op::RepeatLast => {
                        if let Some((c, want, floor)) = last {
                            let first = before.rows.get(&(c.holder, USER)).map(|r| r.last_grant);
                            if let Ok(g) = l.take(c, want, floor) {
                                prop_assert_eq!(Some(g), first);
                            }
                            prop_assert_eq!(l.state(), &before);
                        }
                    }
                    Op::Reclaim { instance } => { l.reclaim(InstanceId(instance), 0, 0).unwrap(); }
                    Op::TopUp { amount } => {
                        version += 1;
                        funds += amount;
                        l.fund(USER, funding(funds, version)).unwrap();
                    }
                    Op::Restart => {
                        l.restart();
                        prop_assert_eq!(l.state(), &before);
                    }
                }
                prop_assert!(conserved(&l, funds));
            }
        }
    }

    #[test]
    fn audit_sums_the_rows_of_the_account() {
        let mut l = funded(1000);
        l.heartbeat(InstanceId(2), 0).unwrap();
        l.take(call(1, 1), 300, 0).unwrap();
        l.take(call(2, 2), 200, 0).unwrap();
        l.report_spend(call(2, 3), 50).unwrap();
        let a = l.audit(USER).unwrap();
        assert_eq!(
            a,
            AccountAudit { balance: 500, reported: 50, held: 450, opened: true, funded: 1000, version: 1 }
        );
        assert_eq!(l.audit(Account::Key(7)).unwrap(), AccountAudit::default());
    }

    #[test]
    fn the_persisted_state_round_trips_through_json() {
        let mut l = funded(1000);
        l.take(call(1, 1), 300, 0).unwrap();
        l.fund(Account::Key(3), funding(40, 2)).unwrap();
        l.reclaim(InstanceId(1), 10, 5).unwrap();
        let json = serde_json::to_string(l.state()).unwrap();
        let back: LedgerState = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, l.state());
        let op = LedgerOp::Take { call: call(1, 2), want: 5, floor: 1 };
        let back: LedgerOp = serde_json::from_str(&serde_json::to_string(&op).unwrap()).unwrap();
        assert_eq!(back, op);
    }

    #[test]
    fn restart_rebuilds_the_same_state_from_snapshot_and_log() {
        let mut l = funded(1000);
        for seq in 1..=9 {
            l.take(call(1, seq), 7 * seq as Quota, 0).unwrap();
        }
        l.reclaim(InstanceId(1), 10, 5).unwrap();
        let before = l.state().clone();
        l.restart();
        assert_eq!(*l.state(), before);
    }
}
