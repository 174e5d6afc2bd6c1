//! Balance leases: how a worker spends a slice of a user's (and a key's) balance without a ledger round
//! trip per request, and how those slices come back. The protocol is written down in `docs/LEASES.md`.
//!
//! - [`ids`]: accounts, instances, holders and the identity of every ledger call.
//! - [`ledger`]: the [`Ledger`] trait, one method per atomic ledger call, and the calls as data.
//! - [`model`]: [`ModelLedger`], the exact in-memory ledger with snapshot and replay; the reference the
//!   simulator, the embedded backend and the Redis scripts are held to.
//! - [`account`]: [`LeaseAccount`], one worker's lease on one account: pre-deduct, settle, refill,
//!   report, return, fence.
//! - [`book`]: [`LeaseBook`], all of one worker's leases, and whether its instance may spend them.
//!
//! Never does I/O, never reads a clock (every time is an argument, in milliseconds), never spawns or
//! waits: the runtime sends the calls these types emit and feeds the replies back.

pub mod account;
pub mod book;
pub mod ids;
pub mod ledger;
pub mod model;

pub use account::{LeaseAccount, LeasePolicy, NeedRefill, PreDeduction, ReplyEffect, Settlement, SpendRate};
pub use book::{LeaseBook, NotAdmitted};
pub use ids::{Account, CallId, HolderId, InstanceId, Millis};
pub use ledger::{AccountAudit, CallOp, CallReply, Funding, Ledger, LedgerCall, LedgerError, Reclaim};
pub use model::{LedgerOp, ModelLedger};
