//! The ledger's contract: [`Ledger`], one method per atomic call of the lease protocol, and the row calls
//! as data ([`LedgerCall`]) so a worker can send them to whichever thread owns the ledger connection.
//!
//! Each method is one atomic step: a backend applies all of it or none of it (Redis: one Lua script per
//! method; the embedded ledger: one critical section on its own thread), and makes it durable before it
//! answers. A backend never blocks a worker: workers send [`LedgerCall`]s and await replies.

use crate::lease::ids::{Account, CallId, InstanceId, Millis, TopUpId};
use crate::model::Quota;

/// Why a ledger call was not applied (or not answered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The instance was reclaimed. `last_seq` is the last call the ledger applied on this row (0: none),
    /// which tells the caller whether its call in flight took effect before the fence.
    #[error("instance fenced (row last applied call {last_seq})")]
    Fenced { last_seq: u64 },
    /// A duplicate of a call older than the row's last; nothing applied, nobody waits for it.
    #[error("stale call (row last applied call {last_seq})")]
    Stale { last_seq: u64 },
    /// The instance never sent a heartbeat; rows are only opened for instances the reaper can see.
    #[error("instance unknown to the ledger")]
    UnknownInstance,
    #[error("invalid ledger call: {0}")]
    Invalid(&'static str),
    /// The backend could not be reached; the call may or may not have been applied. Retry it as is.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
}

/// The outcome of [`Ledger::reclaim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reclaim {
    /// The heartbeat is younger than the TTL; nothing done.
    Alive,
    /// No heartbeat was ever recorded for the instance.
    Unknown,
    /// Reclaimed earlier; nothing more to return.
    AlreadyFenced,
    /// The instance is now fenced; each of its rows' amounts went back to the account's balance.
    Reclaimed { returned: Vec<(CallId, Quota)> },
}

/// The atomic calls of the lease protocol (see `docs/LEASES.md`).
pub trait Ledger {
    /// Grants `min(max(want, floor), balance)` when `balance ≥ max(floor, 1)`, else 0; moves the grant
    /// from the balance to the caller's row.
    fn take(&mut self, call: CallId, want: Quota, floor: Quota) -> Result<Quota, LedgerError>;

    /// Moves `amount` from the caller's row back to the balance; a negative amount pays a debt.
    fn give_back(&mut self, call: CallId, amount: Quota) -> Result<(), LedgerError>;

    /// Moves settled spend (`amount ≥ 0`) out of the caller's row into the account's reported spend.
    fn report_spend(&mut self, call: CallId, amount: Quota) -> Result<(), LedgerError>;

    /// Records that `instance` is alive at `now` (the ledger's clock); registers it on first call.
    fn heartbeat(&mut self, instance: InstanceId, now: Millis) -> Result<(), LedgerError>;

    /// Returns every row of `instance` to the balances and fences the instance, if its last heartbeat
    /// is at least `ttl` old at `now`. `ttl = 0` retires a live instance (graceful shutdown).
    fn reclaim(&mut self, instance: InstanceId, now: Millis, ttl: Millis) -> Result<Reclaim, LedgerError>;

    /// Instances, not yet fenced, whose last heartbeat is at least `ttl` old at `now`.
    fn stale_instances(&mut self, now: Millis, ttl: Millis) -> Result<Vec<InstanceId>, LedgerError>;

    /// Adds `amount` to the balance, once per `id`.
    fn top_up(&mut self, id: TopUpId, account: Account, amount: Quota) -> Result<(), LedgerError>;

    /// The spendable balance (0 for an account never funded).
    fn balance(&mut self, account: Account) -> Result<Quota, LedgerError>;
}

/// What a row call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOp {
    Take { want: Quota, floor: Quota },
    GiveBack { amount: Quota },
    ReportSpend { amount: Quota },
}

/// One row call, as a worker sends it (and re-sends it, unchanged, until answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerCall {
    pub id: CallId,
    pub op: CallOp,
}

/// The answer to a [`LedgerCall`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallReply {
    Granted(Quota),
    Done,
}

impl LedgerCall {
    /// Runs the call against a ledger.
    pub fn apply<L: Ledger + ?Sized>(&self, ledger: &mut L) -> Result<CallReply, LedgerError> {
        match self.op {
            CallOp::Take { want, floor } => ledger.take(self.id, want, floor).map(CallReply::Granted),
            CallOp::GiveBack { amount } => ledger.give_back(self.id, amount).map(|()| CallReply::Done),
            CallOp::ReportSpend { amount } => ledger.report_spend(self.id, amount).map(|()| CallReply::Done),
        }
    }
}
