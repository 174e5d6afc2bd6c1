//! Names in the lease protocol: who pays ([`Account`]), who holds funds ([`InstanceId`], [`HolderId`]),
//! and which call is which ([`CallId`]).
//!
//! Plain data only; how identifiers are minted (random instance ids, counters) is the caller's business.

use serde::{Deserialize, Serialize};

/// Milliseconds on some clock the caller chose; the lease code only ever compares times it was handed.
pub type Millis = i64;

/// Who pays: a user's balance or an API key's remaining quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Account {
    User(i64),
    Key(i64),
}

/// One process incarnation. Fresh at start and again after the instance learns it was fenced, so that
/// a restarted or fenced process never reuses the rows, sequence numbers or heartbeat of its past self.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceId(pub u64);

/// One worker of one instance: the unit that holds leases and numbers its ledger calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HolderId {
    pub instance: InstanceId,
    pub worker: u32,
}

/// The identity of one ledger call on one row. A retry repeats the same id; the ledger answers it from
/// the row's stored result instead of applying it twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CallId {
    pub holder: HolderId,
    pub account: Account,
    /// Increasing per holder (1, 2, 3, … across its accounts). On one row, the next call is sent only
    /// after the previous one was answered, so the ledger needs to remember only the row's last call.
    pub seq: u64,
}
