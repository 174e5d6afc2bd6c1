//! [`LeaseBook`]: all of one worker's leases, and whether its instance may spend them.
//!
//! The book routes pre-deductions, settlements and ledger replies to the [`LeaseAccount`] of their
//! account, admits requests only while the instance's heartbeat is confirmed (so a reaper cannot
//! reclaim a lease the worker is still spending, as long as clocks keep their rate), and carries every
//! account through a fence into the instance's next id. Pure like the rest of `lease`: the runtime sends
//! the calls it emits and feeds back replies and heartbeat acknowledgements.

use std::collections::BTreeMap;

use crate::lease::account::{LeaseAccount, LeasePolicy, NeedRefill, PreDeduction, ReplyEffect, Settlement};
use crate::lease::ids::{Account, CallId, HolderId, InstanceId, Millis};
use crate::lease::ledger::{CallReply, LedgerCall, LedgerError};
use crate::model::Quota;

/// Why a pre-deduction was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    /// The lease is short; a refill was requested.
    NeedRefill(NeedRefill),
    /// The instance's heartbeat is not confirmed (or it was fenced): no local funds may be spent until
    /// the next acknowledged heartbeat.
    Unconfirmed,
}

/// One worker's leases.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseBook {
    holder: HolderId,
    policy: LeasePolicy,
    accounts: BTreeMap<Account, LeaseAccount>,
    /// Admit until this time (worker clock); `None` before the first acknowledged heartbeat.
    valid_until: Option<Millis>,
    /// The instance was fenced and no new id was adopted yet.
    fenced: bool,
    /// The last call number used; calls of one holder are numbered 1, 2, 3, … across all accounts.
    seq: u64,
}

impl LeaseBook {
    pub fn new(holder: HolderId, policy: LeasePolicy) -> Self {
        Self { holder, policy, accounts: BTreeMap::new(), valid_until: None, fenced: false, seq: 0 }
    }

    pub fn holder(&self) -> HolderId {
        self.holder
    }

    pub fn policy(&self) -> &LeasePolicy {
        &self.policy
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    pub fn account(&self, account: Account) -> Option<&LeaseAccount> {
        self.accounts.get(&account)
    }

    pub fn accounts(&self) -> impl Iterator<Item = &LeaseAccount> {
        self.accounts.values()
    }

    /// A heartbeat sent at `sent_at` (worker clock) was acknowledged by the ledger.
    pub fn heartbeat_acked(&mut self, sent_at: Millis) {
        if !self.fenced {
            let until = sent_at.saturating_add(self.policy.validity);
            self.valid_until = Some(self.valid_until.map_or(until, |v| v.max(until)));
        }
    }

    /// Whether requests may be admitted from local funds at `now`.
    pub fn confirmed(&self, now: Millis) -> bool {
        !self.fenced && self.valid_until.is_some_and(|v| now < v)
    }

    fn lease(&mut self, account: Account, now: Millis) -> &mut LeaseAccount {
        let holder = self.holder;
        self.accounts.entry(account).or_insert_with(|| LeaseAccount::new(holder, account, now))
    }

    /// Sets `amount` aside on `account` for one request.
    pub fn pre_deduct(
        &mut self,
        account: Account,
        amount: Quota,
        now: Millis,
    ) -> Result<PreDeduction, NotAdmitted> {
        if !self.confirmed(now) {
            return Err(NotAdmitted::Unconfirmed);
        }
        self.lease(account, now).pre_deduct(amount, now).map_err(NotAdmitted::NeedRefill)
    }

    /// Charges a request's actual cost against its pre-deduction.
    pub fn settle(&mut self, pre: PreDeduction, actual: Quota, now: Millis) -> Settlement {
        let policy = self.policy;
        self.lease(pre.account(), now).settle(pre, actual, &policy, now)
    }

    /// Gives a pre-deduction back whole.
    pub fn refund(&mut self, pre: PreDeduction, now: Millis) {
        self.lease(pre.account(), now).refund(pre);
    }

    /// Another holder of `account` was refused a refill: this worker gives back what it holds of it
    /// beyond its requests in flight (see [`LeaseAccount::recall`]).
    pub fn recall(&mut self, account: Account) {
        if let Some(lease) = self.accounts.get_mut(&account) {
            lease.recall();
        }
    }

    /// Every ledger call that is due now (at most one per account).
    pub fn next_calls(&mut self, now: Millis) -> Vec<LedgerCall> {
        let (policy, seq) = (self.policy, &mut self.seq);
        self.accounts.values_mut().filter_map(|a| a.next_call(&policy, now, seq)).collect()
    }

    /// Every call in flight, to send again after a timeout.
    pub fn in_flight(&self) -> impl Iterator<Item = LedgerCall> + '_ {
        self.accounts.values().filter_map(LeaseAccount::in_flight)
    }

    /// Takes the ledger's answer to call `id`. On [`ReplyEffect::Fenced`] the book stops admitting; the
    /// runtime registers a new instance id and calls [`LeaseBook::reincarnate`].
    pub fn on_reply(&mut self, id: CallId, reply: Result<CallReply, LedgerError>) -> ReplyEffect {
        let Some(lease) = self.accounts.get_mut(&id.account) else { return ReplyEffect::Ignored };
        let effect = lease.on_reply(id, reply);
        if effect == ReplyEffect::Fenced && id.holder == self.holder {
            self.fence();
        }
        self.adopt_all();
        effect
    }

    /// The instance learned it was fenced (from a heartbeat or a reply): stop admitting, reset every
    /// account (now, or when its call in flight is answered).
    pub fn fence(&mut self) {
        self.fenced = true;
        self.valid_until = None;
        for lease in self.accounts.values_mut() {
            lease.fence();
        }
    }

    /// Continues under `instance`, a new id whose first heartbeat the ledger acknowledged.
    pub fn reincarnate(&mut self, instance: InstanceId) {
        self.holder = HolderId { instance, worker: self.holder.worker };
        self.fenced = false;
        self.adopt_all();
    }

    fn adopt_all(&mut self) {
        if self.fenced {
            return;
        }
        let holder = self.holder;
        for lease in self.accounts.values_mut().filter(|l| l.needs_holder()) {
            lease.adopt(holder);
        }
    }

    /// Drops accounts that hold nothing, owe nothing and expect nothing, so the book does not grow with
    /// every user ever seen. A dropped account's row stays at the ledger with amount 0.
    pub fn forget_quiet(&mut self) {
        self.accounts.retain(|_, a| !a.is_quiet());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Funding;
    use crate::lease::ledger::Ledger;
    use crate::lease::model::ModelLedger;

    const USER: Account = Account::User(1);
    const KEY: Account = Account::Key(10);

    fn book(instance: u64) -> LeaseBook {
        LeaseBook::new(HolderId { instance: InstanceId(instance), worker: 0 }, LeasePolicy::default())
    }

    fn pump(b: &mut LeaseBook, l: &mut ModelLedger, now: Millis) {
        loop {
            let calls = b.next_calls(now);
            if calls.is_empty() {
                return;
            }
            for call in calls {
                let reply = call.apply(l);
                b.on_reply(call.id, reply);
            }
        }
    }

    #[test]
    fn nothing_is_admitted_before_a_heartbeat_is_confirmed() {
        let mut b = book(1);
        assert_eq!(b.pre_deduct(USER, 0, 0).unwrap_err(), NotAdmitted::Unconfirmed);
        b.heartbeat_acked(0);
        assert!(b.pre_deduct(USER, 0, 1).is_ok());
        assert_eq!(b.pre_deduct(USER, 0, b.policy().validity).unwrap_err(), NotAdmitted::Unconfirmed);
    }

    #[test]
    fn a_fence_stops_admission_until_a_new_id_is_adopted() {
        let mut l = ModelLedger::default();
        l.open(USER, Funding { remaining: 100_000, total: 100_000, version: 1 }).unwrap();
        l.heartbeat(InstanceId(1), 0).unwrap();
        let mut b = book(1);
        b.heartbeat_acked(0);
        b.pre_deduct(USER, 1_000, 0).unwrap_err();
        pump(&mut b, &mut l, 0);
        let pre = b.pre_deduct(USER, 1_000, 0).unwrap();
        l.reclaim(InstanceId(1), 1, 0).unwrap();
        b.fence();
        assert_eq!(b.pre_deduct(USER, 1, 1).unwrap_err(), NotAdmitted::Unconfirmed);
        l.heartbeat(InstanceId(2), 1).unwrap();
        b.reincarnate(InstanceId(2));
        b.heartbeat_acked(1);
        b.settle(pre, 900, 2);
        pump(&mut b, &mut l, 2_000);
        let lease = b.account(USER).unwrap();
        assert_eq!(lease.holder().map(|h| h.instance), Some(InstanceId(2)));
        let acct = l.account(USER);
        assert_eq!(acct.reported, 900);
        assert_eq!(acct.balance + l.state().held(USER) + acct.reported, 100_000);
    }

    #[test]
    fn user_and_key_are_leased_separately() {
        let mut l = ModelLedger::default();
        l.open(USER, Funding { remaining: 100_000, total: 100_000, version: 1 }).unwrap();
        l.open(KEY, Funding { remaining: 500, total: 500, version: 1 }).unwrap();
        l.heartbeat(InstanceId(1), 0).unwrap();
        let mut b = book(1);
        b.heartbeat_acked(0);
        for account in [USER, KEY] {
            b.pre_deduct(account, 1_000, 0).unwrap_err();
        }
        pump(&mut b, &mut l, 0);
        assert!(b.pre_deduct(USER, 1_000, 0).is_ok());
        assert!(b.pre_deduct(KEY, 1_000, 0).is_err());
    }
}
