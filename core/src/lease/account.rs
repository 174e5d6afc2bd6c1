//! [`LeaseAccount`]: one worker's lease on one account, as a state machine with no I/O.
//!
//! It owns the local money of one row: `available` (leased, free to pre-deduct; negative = a debt from a
//! settlement overrun), `reserved` (pre-deducted by requests in flight), `unreported` (settled spend not
//! yet reported), and the one ledger call in flight on the row (a refill, a report or a return), which it
//! numbers and keeps until answered. The worker asks it for the next call ([`LeaseAccount::next_call`]),
//! sends it (and re-sends it, unchanged, on timeout) and hands back the reply
//! ([`LeaseAccount::on_reply`]).
//!
//! Invariant: while the call in flight is unapplied, the ledger row holds exactly [`LeaseAccount::held`];
//! once applied, the row differs by that call's effect. Never reads a clock: `now` is an argument and may
//! go backwards (a clock jump), which only delays idle returns and reports.

use crate::lease::ids::{Account, CallId, HolderId, Millis};
use crate::lease::ledger::{CallOp, CallReply, LedgerCall, LedgerError};
use crate::model::Quota;

/// Tunables of the worker side of the protocol.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeasePolicy {
    /// Smallest lease worth a ledger call.
    pub min_lease: Quota,
    /// Largest lease one worker may hold beyond what a waiting request needs.
    pub max_lease: Quota,
    /// A lease should last this long at the recent spend rate.
    pub horizon: Millis,
    /// Half-life of the spend-rate average.
    pub rate_half_life: Millis,
    /// Return the whole lease after this long without a request.
    pub idle_after: Millis,
    /// Report settled spend once this much has accumulated…
    pub report_threshold: Quota,
    /// …or this long after the last report.
    pub report_interval: Millis,
    /// Admit requests only while the instance's last acknowledged heartbeat was sent less than this long
    /// ago; must be shorter than the reaper's TTL.
    pub validity: Millis,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        Self {
            min_lease: 5_000,
            max_lease: 1_000_000,
            horizon: 10_000,
            rate_half_life: 30_000,
            idle_after: 30_000,
            report_threshold: 50_000,
            report_interval: 1_000,
            validity: 10_000,
        }
    }
}

/// Recent spend, as an exponentially decayed sum (quota), from which the lease size follows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpendRate {
    decayed: f64,
    at: Millis,
}

impl SpendRate {
    fn decay_to(&mut self, now: Millis, half_life: Millis) {
        let dt = now.saturating_sub(self.at);
        if dt > 0 {
            self.decayed *= 0.5f64.powf(dt as f64 / half_life.max(1) as f64);
            self.at = now;
        }
    }

    /// Adds spend at `now`.
    pub fn record(&mut self, now: Millis, amount: Quota, half_life: Millis) {
        self.decay_to(now, half_life);
        self.decayed += amount.max(0) as f64;
    }

    /// Spend per millisecond: a steady rate `r` makes the decayed sum converge to `r × half_life / ln 2`.
    pub fn per_ms(&self, now: Millis, half_life: Millis) -> f64 {
        let mut at_now = *self;
        at_now.decay_to(now, half_life);
        at_now.decayed * std::f64::consts::LN_2 / half_life.max(1) as f64
    }
}

/// Funds set aside for one request on one account. Consumed by [`LeaseAccount::settle`] or
/// [`LeaseAccount::refund`]; never copied, so it cannot be settled twice.
#[derive(Debug, PartialEq, Eq)]
pub struct PreDeduction {
    account: Account,
    amount: Quota,
    /// The row it was taken from; once that row is fenced its funds were reclaimed.
    holder: HolderId,
}

impl PreDeduction {
    pub fn account(&self) -> Account {
        self.account
    }

    pub fn amount(&self) -> Quota {
        self.amount
    }

    /// The row it was taken from. Once that row is fenced, settling it charges the whole cost as debt.
    pub fn holder(&self) -> HolderId {
        self.holder
    }
}

/// The local lease cannot cover a pre-deduction: a refill of at least `shortfall` is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedRefill {
    pub shortfall: Quota,
}

/// What settling one request did to the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    pub account: Account,
    pub pre_deducted: Quota,
    pub actual: Quota,
    /// `pre_deducted − actual` when positive: back into `available`.
    pub refunded: Quota,
    /// `actual − pre_deducted` when positive: charged to `available`, which may go negative by it.
    pub overrun: Quota,
}

/// What a ledger reply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyEffect {
    /// Not an answer to the call in flight (a duplicate or a late answer); nothing changed.
    Ignored,
    /// The call is still in flight; send it again later, unchanged.
    Retry,
    /// A refill was answered; `granted` is 0 when the balance was below `floor` (the waiting requests
    /// cannot be admitted).
    Granted { granted: Quota, floor: Quota },
    /// A report or a return was applied.
    Done,
    /// The instance was fenced: the account was reset and waits for a new holder.
    Fenced,
    /// The ledger refused the call as malformed; its local effect was undone.
    Rejected(LedgerError),
}

/// One worker's lease on one account.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseAccount {
    account: Account,
    /// The row's holder; `None` after a fence, until [`LeaseAccount::adopt`].
    holder: Option<HolderId>,
    available: Quota,
    reserved: Quota,
    unreported: Quota,
    in_flight: Option<LedgerCall>,
    /// Resolve the call in flight as a fenced one, whatever the reply.
    fence_pending: bool,
    /// Largest pre-deduction waiting for a refill (0: none).
    wanted: Quota,
    /// Another holder could not be funded: give `available` back at the next call, idle or not.
    recalled: bool,
    rate: SpendRate,
    last_active: Millis,
    last_report: Millis,
}

impl LeaseAccount {
    pub fn new(holder: HolderId, account: Account, now: Millis) -> Self {
        Self {
            account,
            holder: Some(holder),
            available: 0,
            reserved: 0,
            unreported: 0,
            in_flight: None,
            fence_pending: false,
            wanted: 0,
            recalled: false,
            rate: SpendRate { decayed: 0.0, at: now },
            last_active: now,
            last_report: now,
        }
    }

    pub fn account(&self) -> Account {
        self.account
    }

    pub fn holder(&self) -> Option<HolderId> {
        self.holder
    }

    pub fn available(&self) -> Quota {
        self.available
    }

    pub fn reserved(&self) -> Quota {
        self.reserved
    }

    pub fn unreported(&self) -> Quota {
        self.unreported
    }

    /// The ledger call in flight, to send again on timeout.
    pub fn in_flight(&self) -> Option<LedgerCall> {
        self.in_flight
    }

    /// What the ledger row holds while the call in flight is unapplied: every local bucket plus the
    /// amounts a report or return in flight has taken out of them.
    pub fn held(&self) -> Quota {
        let in_transit = match self.in_flight.map(|c| c.op) {
            Some(CallOp::GiveBack { amount }) | Some(CallOp::ReportSpend { amount }) => amount,
            Some(CallOp::Take { .. }) | None => 0,
        };
        self.available + self.reserved + self.unreported + in_transit
    }

    /// Spend settled but not applied at the ledger as reported: `unreported` plus a report in flight.
    pub fn unreported_in_transit(&self) -> Quota {
        match self.in_flight.map(|c| c.op) {
            Some(CallOp::ReportSpend { amount }) => self.unreported + amount,
            _ => self.unreported,
        }
    }

    /// Nothing held, owed, reserved, unreported, in flight or wanted: the account may be dropped.
    pub fn is_quiet(&self) -> bool {
        self.available == 0
            && self.reserved == 0
            && self.unreported == 0
            && self.in_flight.is_none()
            && self.wanted == 0
            && self.holder.is_some()
    }

    /// Whether a request is waiting for a refill.
    pub fn wants_refill(&self) -> bool {
        self.wanted > 0
    }

    /// The lease to ask for beyond what waiting requests need: recent spend rate × horizon, clamped.
    pub fn lease_size(&self, policy: &LeasePolicy, now: Millis) -> Quota {
        let projected = self.rate.per_ms(now, policy.rate_half_life) * policy.horizon.max(0) as f64;
        (projected.round() as Quota).clamp(policy.min_lease, policy.max_lease.max(policy.min_lease))
    }

    /// Sets `amount` aside for one request, from local funds only.
    pub fn pre_deduct(&mut self, amount: Quota, now: Millis) -> Result<PreDeduction, NeedRefill> {
        let amount = amount.max(0);
        self.last_active = now;
        match self.holder {
            // A recalled lease admits nothing more from what it holds: that goes back to the ledger
            // first, so a request after the recall is decided by the balance as it is now.
            Some(holder) if amount <= self.available && !self.recalled => {
                self.available -= amount;
                self.reserved += amount;
                Ok(PreDeduction { account: self.account, amount, holder })
            }
            _ => {
                self.wanted = self.wanted.max(amount);
                Err(NeedRefill { shortfall: (amount - self.available).max(1) })
            }
        }
    }

    /// Charges the actual cost of a request: the difference to its pre-deduction is refunded to, or
    /// charged to, `available`. A pre-deduction from before a fence was reclaimed with the lease, so its
    /// whole cost is charged (as a debt when nothing is left).
    pub fn settle(
        &mut self,
        pre: PreDeduction,
        actual: Quota,
        policy: &LeasePolicy,
        now: Millis,
    ) -> Settlement {
        let actual = actual.max(0);
        if self.holder == Some(pre.holder) {
            self.reserved -= pre.amount;
            self.available += pre.amount - actual;
        } else {
            self.available -= actual;
        }
        self.unreported += actual;
        self.rate.record(now, actual, policy.rate_half_life);
        self.last_active = now;
        Settlement {
            account: self.account,
            pre_deducted: pre.amount,
            actual,
            refunded: (pre.amount - actual).max(0),
            overrun: (actual - pre.amount).max(0),
        }
    }

    /// Gives a pre-deduction back whole (the request failed before any cost).
    pub fn refund(&mut self, pre: PreDeduction) {
        if self.holder == Some(pre.holder) {
            self.reserved -= pre.amount;
            self.available += pre.amount;
        }
    }

    /// What an idle lease would give back now: all of `available` (a debt too) once no request has
    /// used the account for `idle_after` and none is in flight; otherwise 0.
    pub fn idle_return(&self, policy: &LeasePolicy, now: Millis) -> Quota {
        let idle = now.saturating_sub(self.last_active) >= policy.idle_after;
        if idle && self.reserved == 0 && self.wanted == 0 { self.available } else { 0 }
    }

    /// Starts the next ledger call, if one is due and none is in flight: a refill for waiting requests,
    /// else a report of settled spend, else the return of an idle or oversized lease. The call is
    /// numbered from `seq`, the holder's counter, which it advances.
    pub fn next_call(&mut self, policy: &LeasePolicy, now: Millis, seq: &mut u64) -> Option<LedgerCall> {
        if self.in_flight.is_some() {
            return None;
        }
        let holder = self.holder?;
        let op = self.due_op(policy, now)?;
        match op {
            CallOp::Take { .. } => {}
            CallOp::ReportSpend { amount } => {
                self.unreported -= amount;
                self.last_report = now;
            }
            CallOp::GiveBack { amount } => self.available -= amount,
        }
        *seq += 1;
        let call = LedgerCall { id: CallId { holder, account: self.account, seq: *seq }, op };
        self.in_flight = Some(call);
        Some(call)
    }

    fn due_op(&mut self, policy: &LeasePolicy, now: Millis) -> Option<CallOp> {
        if std::mem::take(&mut self.recalled) && self.available > 0 {
            return Some(CallOp::GiveBack { amount: self.available });
        }
        if self.wanted > 0 {
            let floor = self.wanted - self.available;
            if floor > 0 {
                return Some(CallOp::Take { want: floor + self.lease_size(policy, now), floor });
            }
            self.wanted = 0;
        }
        let report_due = self.unreported >= policy.report_threshold
            || now.saturating_sub(self.last_report) >= policy.report_interval;
        if self.unreported > 0 && report_due {
            return Some(CallOp::ReportSpend { amount: self.unreported });
        }
        let idle = self.idle_return(policy, now);
        if idle != 0 {
            return Some(CallOp::GiveBack { amount: idle });
        }
        let cap = policy.max_lease.max(policy.min_lease);
        if self.available > cap.saturating_mul(2) {
            return Some(CallOp::GiveBack { amount: self.available - cap });
        }
        None
    }

    /// Takes the ledger's answer to the call `id`.
    pub fn on_reply(&mut self, id: CallId, reply: Result<CallReply, LedgerError>) -> ReplyEffect {
        let Some(call) = self.in_flight.filter(|c| c.id == id) else { return ReplyEffect::Ignored };
        match reply {
            Ok(_) if self.fence_pending => {
                self.orphan(Some((call, true)));
                ReplyEffect::Fenced
            }
            Ok(answer) => {
                self.in_flight = None;
                match (call.op, answer) {
                    (CallOp::Take { floor, .. }, CallReply::Granted(granted)) => {
                        self.available += granted;
                        self.wanted = 0;
                        ReplyEffect::Granted { granted, floor }
                    }
                    _ => ReplyEffect::Done,
                }
            }
            Err(LedgerError::Fenced { last_seq }) => {
                self.orphan(Some((call, last_seq >= id.seq)));
                ReplyEffect::Fenced
            }
            Err(LedgerError::Stale { .. }) => ReplyEffect::Ignored,
            Err(LedgerError::UnknownInstance)
            | Err(LedgerError::UnknownAccount)
            | Err(LedgerError::Unavailable(_)) => ReplyEffect::Retry,
            Err(e @ LedgerError::Invalid(_)) => {
                self.in_flight = None;
                match call.op {
                    CallOp::Take { .. } => self.wanted = 0,
                    CallOp::GiveBack { amount } => self.available += amount,
                    CallOp::ReportSpend { amount } => self.unreported += amount,
                }
                ReplyEffect::Rejected(e)
            }
        }
    }

    /// The instance was fenced (learned elsewhere). Resets the account now, or, with a call in flight,
    /// as soon as that call is answered.
    pub fn fence(&mut self) {
        if self.in_flight.is_some() {
            self.fence_pending = true;
        } else if self.holder.is_some() {
            self.orphan(None);
        }
    }

    /// The funds this lease holds beyond the requests in flight go back to the balance with the next
    /// call (another holder was refused a refill, or the account's funding changed). Until they have
    /// gone, the lease admits no request from them: one arriving meanwhile waits for the return and
    /// a refill decided by the ledger's balance. A debt is not given back by a recall.
    pub fn recall(&mut self) {
        self.recalled = true;
    }

    /// Whether the account waits for a new holder (after a fence).
    pub fn needs_holder(&self) -> bool {
        self.holder.is_none()
    }

    /// Continues under a new holder (a new instance id), starting a fresh row.
    pub fn adopt(&mut self, holder: HolderId) {
        if self.holder.is_none() {
            self.holder = Some(holder);
        }
    }

    /// Resets after a fence. The reclaim returned the row, so `available`, `reserved` and any return in
    /// flight are gone; settled spend the ledger never saw reported (and a report in flight that was not
    /// applied) was refunded by the reclaim and is carried into the next row as a debt.
    fn orphan(&mut self, resolved: Option<(LedgerCall, bool)>) {
        let mut carry = self.unreported;
        if let Some((LedgerCall { op: CallOp::ReportSpend { amount }, .. }, false)) = resolved {
            carry += amount;
        }
        self.available = -carry;
        self.reserved = 0;
        self.unreported = carry;
        self.in_flight = None;
        self.fence_pending = false;
        self.holder = None;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::lease::Funding;
    use crate::lease::ids::InstanceId;
    use crate::lease::ledger::Ledger;
    use crate::lease::model::ModelLedger;

    const USER: Account = Account::User(7);

    fn holder(instance: u64) -> HolderId {
        HolderId { instance: InstanceId(instance), worker: 0 }
    }

    fn policy() -> LeasePolicy {
        LeasePolicy { min_lease: 100, max_lease: 1_000, report_threshold: 500, ..LeasePolicy::default() }
    }

    fn ledger(balance: Quota) -> ModelLedger {
        let mut l = ModelLedger::new(64);
        l.open(USER, Funding { remaining: balance, total: balance, version: 1 }).unwrap();
        l.heartbeat(InstanceId(1), 0).unwrap();
        l
    }

    /// Sends every due call and delivers every reply, until the account is quiet.
    fn pump(a: &mut LeaseAccount, l: &mut ModelLedger, now: Millis) {
        let mut seq = l.row(holder(1), USER).last_seq;
        while let Some(call) = a.next_call(&policy(), now, &mut seq) {
            let reply = call.apply(l);
            a.on_reply(call.id, reply);
        }
    }

    fn row_matches(a: &LeaseAccount, l: &ModelLedger) -> bool {
        l.row(holder(1), USER).amount == a.held()
    }

    #[test]
    fn a_short_lease_asks_for_the_shortfall_plus_a_lease() {
        let mut a = LeaseAccount::new(holder(1), USER, 0);
        assert_eq!(a.pre_deduct(300, 0), Err(NeedRefill { shortfall: 300 }));
        let call = a.next_call(&policy(), 0, &mut 0).unwrap();
        assert_eq!(call.op, CallOp::Take { want: 400, floor: 300 });
    }

    #[test]
    fn an_overrun_takes_the_lease_negative_by_at_most_the_overrun() {
        let mut l = ledger(300);
        let mut a = LeaseAccount::new(holder(1), USER, 0);
        a.pre_deduct(300, 0).unwrap_err();
        pump(&mut a, &mut l, 0);
        let pre = a.pre_deduct(300, 0).unwrap();
        let s = a.settle(pre, 450, &policy(), 1);
        assert_eq!((s.overrun, a.available()), (150, -150));
    }

    #[test]
    fn the_next_refill_pays_the_debt_first() {
        let mut l = ledger(1_000);
        let mut a = LeaseAccount::new(holder(1), USER, 0);
        a.pre_deduct(100, 0).unwrap_err();
        pump(&mut a, &mut l, 0);
        let pre = a.pre_deduct(100, 0).unwrap();
        a.settle(pre, a.available() + 250, &policy(), 0);
        let debt = -a.available();
        assert_eq!(a.pre_deduct(50, 0), Err(NeedRefill { shortfall: 50 + debt }));
    }

    #[test]
    fn a_refused_refill_grants_nothing() {
        let mut l = ledger(50);
        let mut a = LeaseAccount::new(holder(1), USER, 0);
        a.pre_deduct(100, 0).unwrap_err();
        let call = a.next_call(&policy(), 0, &mut 0).unwrap();
        let reply = call.apply(&mut l);
        assert_eq!(a.on_reply(call.id, reply), ReplyEffect::Granted { granted: 0, floor: 100 });
        assert_eq!(a.available(), 0);
    }

    #[test]
    fn an_idle_lease_goes_back_whole() {
        let mut l = ledger(1_000);
        let mut a = LeaseAccount::new(holder(1), USER, 0);
        a.pre_deduct(100, 0).unwrap_err();
        pump(&mut a, &mut l, 0);
        pump(&mut a, &mut l, policy().idle_after);
        assert_eq!((a.available(), l.account(USER).balance), (0, 1_000));
    }

    #[test]
    fn a_recalled_lease_gives_back_what_it_holds_beyond_requests_in_flight() {
        let mut l = ledger(1_000);
        let mut a = LeaseAccount::new(holder(1), USER, 0);
        a.pre_deduct(100, 0).unwrap_err();
        pump(&mut a, &mut l, 0);
        let _in_flight = a.pre_deduct(100, 0).unwrap();
        let held = a.available();
        assert!(held > 0);
        a.recall();
        pump(&mut a, &mut l, 1);
        assert_eq!((a.available(), a.reserved()), (0, 100));
        assert_eq!(l.account(USER).balance, 1_000 - 100);
    }

    #[test]
    fn a_recalled_lease_admits_nothing_from_what_it_holds_until_the_ledger_decides_again() {
        let mut l = ledger(1_000);
        let mut a = LeaseAccount::new(holder(1), USER, 0);
        a.pre_deduct(100, 0).unwrap_err();
        pump(&mut a, &mut l, 0);
        assert!(a.available() >= 200);
        // The quota is lowered to 150 under what the lease holds: the ledger's balance goes negative.
        l.fund(USER, Funding { remaining: 150, total: 150, version: 2 }).unwrap();
        a.recall();
        a.pre_deduct(100, 0).expect_err("a recalled lease must not admit from its local funds");
        pump(&mut a, &mut l, 1);
        let held_after = a.available();
        assert!(held_after <= 150, "after the recall the lease holds {held_after}, over the new quota");
        let first = a.pre_deduct(100, 1);
        let second = a.pre_deduct(100, 1);
        assert!(first.is_ok() && second.is_err(), "{first:?} {second:?}");
    }

    #[test]
    fn a_fenced_reply_carries_unreported_spend_as_debt() {
        let mut l = ledger(1_000);
        let mut a = LeaseAccount::new(holder(1), USER, 0);
        a.pre_deduct(100, 0).unwrap_err();
        pump(&mut a, &mut l, 0);
        let pre = a.pre_deduct(100, 0).unwrap();
        a.settle(pre, 80, &policy(), 0);
        l.reclaim(InstanceId(1), 10, 0).unwrap();
        a.pre_deduct(10_000, 0).unwrap_err();
        let call = a.next_call(&policy(), 0, &mut 0).unwrap();
        let reply = call.apply(&mut l);
        assert_eq!(a.on_reply(call.id, reply), ReplyEffect::Fenced);
        assert_eq!((a.available(), a.unreported(), a.held()), (-80, 80, 0));
    }

    #[test]
    fn a_pre_deduction_from_before_a_fence_settles_as_debt() {
        let mut l = ledger(1_000);
        let mut a = LeaseAccount::new(holder(1), USER, 0);
        a.pre_deduct(100, 0).unwrap_err();
        pump(&mut a, &mut l, 0);
        let pre = a.pre_deduct(100, 0).unwrap();
        a.fence();
        a.adopt(holder(2));
        a.settle(pre, 70, &policy(), 0);
        assert_eq!((a.available(), a.unreported(), a.held()), (-70, 70, 0));
    }

    #[test]
    fn lease_size_follows_the_spend_rate_within_bounds() {
        let p = policy();
        let mut a = LeaseAccount::new(holder(1), USER, 0);
        assert_eq!(a.lease_size(&p, 0), p.min_lease);
        for t in 0..100 {
            a.rate.record(t * 100, 1_000, p.rate_half_life);
        }
        assert_eq!(a.lease_size(&p, 10_000), p.max_lease);
    }

    #[derive(Debug, Clone)]
    enum Act {
        Request { pre: Quota, actual: Quota, fail: bool },
        Tick { dt: Millis },
    }

    fn act() -> impl Strategy<Value = Act> {
        prop_oneof![
            (0i64..800, 0i64..1_200, any::<bool>()).prop_map(|(pre, actual, fail)| Act::Request {
                pre,
                actual,
                fail
            }),
            (0i64..40_000).prop_map(|dt| Act::Tick { dt }),
        ]
    }

    proptest! {
        /// Against an exact ledger, whatever the requests: the row always equals the local buckets,
        /// money is conserved, and spend beyond the funds never exceeds the overruns.
        #[test]
        fn lease_math_conserves_money(funds in 0i64..20_000, acts in proptest::collection::vec(act(), 1..80)) {
            let p = policy();
            let mut l = ledger(funds);
            let mut a = LeaseAccount::new(holder(1), USER, 0);
            let (mut now, mut spent, mut overruns) = (0, 0, 0);
            for act in acts {
                match act {
                    Act::Request { pre, actual, fail } => {
                        let admitted = match a.pre_deduct(pre, now) {
                            Ok(d) => Some(d),
                            Err(_) => { pump(&mut a, &mut l, now); a.pre_deduct(pre, now).ok() }
                        };
                        if let Some(d) = admitted {
                            if fail {
                                a.refund(d);
                            } else {
                                let s = a.settle(d, actual, &p, now);
                                spent += s.actual;
                                overruns += s.overrun;
                            }
                        }
                    }
                    Act::Tick { dt } => now += dt,
                }
                pump(&mut a, &mut l, now);
                prop_assert!(row_matches(&a, &l));
                let acct = l.account(USER);
                prop_assert_eq!(acct.balance + l.state().held(USER) + acct.reported, funds);
                prop_assert_eq!(acct.reported + a.unreported_in_transit(), spent);
                prop_assert!(spent <= funds + overruns);
            }
        }
    }
}
