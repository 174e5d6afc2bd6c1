//! The ledger's contract: [`Ledger`], one method per atomic call of the lease protocol, and the row calls
//! as data ([`LedgerCall`]) so a worker can send them to whichever thread owns the ledger connection.
//!
//! Each method is one atomic step: a backend applies all of it or none of it (Redis: one Lua script per
//! method; the embedded ledger: one critical section on its own thread), and makes it durable before it
//! answers. A backend never blocks a worker: workers send [`LedgerCall`]s and await replies.

use serde::{Deserialize, Serialize};

use crate::lease::ids::{Account, CallId, InstanceId, Millis};
use crate::model::Quota;
use crate::ratelimit::{RateGrant, RateKey};

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
    /// A take on an account the ledger was never given ([`Ledger::open`]); nothing applied. Open it
    /// from the durable record and send the same call again.
    #[error("account not opened at the ledger")]
    UnknownAccount,
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

/// An account's funding as the durable record (the database) last knew it.
///
/// `total` is everything ever granted to the account (for a user `quota + used_quota`, which spending
/// leaves unchanged), `remaining` what was left unspent when it was read, and `version` a counter the
/// database raises with every change of `total` (top-up, redemption, an operator's edit). Versions make
/// funding idempotent and order-insensitive: the ledger applies a funding only if it is newer than the
/// one it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Funding {
    pub remaining: Quota,
    pub total: Quota,
    pub version: i64,
}

/// Everything the ledger knows about one account, as [`Ledger::audit`] reads it in one atomic step: the
/// account's fields and `held`, the sum of every holder's row for it. For an account the ledger never
/// saw, every field is zero (`opened` false).
///
/// Conservation at the ledger: `Σ fundings applied = balance + held + reported`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccountAudit {
    /// Spendable; negative only through debts given back.
    pub balance: Quota,
    /// Settled spend reported so far (cumulative).
    pub reported: Quota,
    /// `Σ rows` of the account: what all holders hold.
    pub held: Quota,
    /// Whether [`Ledger::open`] set the balance from the durable record.
    pub opened: bool,
    /// The funding total the balance reflects, and its version (see [`Funding`]).
    pub funded: Quota,
    pub version: i64,
}

/// The atomic calls of the lease protocol (see `docs/LEASES.md`).
pub trait Ledger {
    /// Grants `min(max(want, floor), balance)` when `balance ≥ max(floor, 1)`, else 0; moves the grant
    /// from the balance to the caller's row. [`LedgerError::UnknownAccount`] when the account was never
    /// opened.
    fn take(&mut self, call: CallId, want: Quota, floor: Quota) -> Result<Quota, LedgerError>;

    /// Moves `amount` from the caller's row back to the balance; a negative amount pays a debt.
    fn give_back(&mut self, call: CallId, amount: Quota) -> Result<(), LedgerError>;

    /// Moves settled spend (`amount ≥ 0`) out of the caller's row into the account's reported spend.
    fn report_spend(&mut self, call: CallId, amount: Quota) -> Result<(), LedgerError>;

    /// Records that `instance` is alive at `now` (the ledger's clock); registers it on first call.
    /// Answers the ledger's generation, which changes only when the ledger lost its state (a Redis
    /// without persistence restarted, a flush): an instance that sees it change must drop every lease
    /// it holds, because the accounts will be opened again from the durable record.
    fn heartbeat(&mut self, instance: InstanceId, now: Millis) -> Result<u64, LedgerError>;

    /// Returns every row of `instance` to the balances and fences the instance, if its last heartbeat
    /// is at least `ttl` old at `now`. `ttl = 0` retires a live instance (graceful shutdown).
    fn reclaim(&mut self, instance: InstanceId, now: Millis, ttl: Millis) -> Result<Reclaim, LedgerError>;

    /// Instances, not yet fenced, whose last heartbeat is at least `ttl` old at `now`.
    fn stale_instances(&mut self, now: Millis, ttl: Millis) -> Result<Vec<InstanceId>, LedgerError>;

    /// Opens an account from the durable record, once: the balance starts at `remaining`, plus any
    /// funding newer than `funding.version` that [`Ledger::fund`] delivered before the open. A no-op for
    /// an account already open.
    fn open(&mut self, account: Account, funding: Funding) -> Result<(), LedgerError>;

    /// Applies a change of funding: when `funding.version` is newer than the account's, the balance
    /// moves by `funding.total − funded` (a top-up, or an operator lowering a grant). Before the account
    /// is open only the funding is remembered, for the open to add. `remaining` is not used.
    fn fund(&mut self, account: Account, funding: Funding) -> Result<(), LedgerError>;

    /// The spendable balance (0 for an account never funded).
    fn balance(&mut self, account: Account) -> Result<Quota, LedgerError>;

    /// Reads an account and the sum of its rows together (read-only): for reconciliation, operators and
    /// tests that hold a backend to the reference.
    fn audit(&mut self, account: Account) -> Result<AccountAudit, LedgerError>;

    /// Takes up to `want` units of a rate limit's sliding window (`limit` per `window` ms) at `now`;
    /// see [`crate::ratelimit`]. Rate windows are soft state: a restarted ledger may forget them.
    fn rate_take(
        &mut self,
        key: RateKey,
        now: Millis,
        want: i64,
        limit: i64,
        window: Millis,
    ) -> Result<RateGrant, LedgerError>;
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
