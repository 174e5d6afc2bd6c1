//! The balance ledger's backends: the two implementations of [`burncloud_core::lease::Ledger`] that
//! hold the lease protocol's state outside a worker (`docs/LEASES.md`).
//!
//! - [`EmbeddedLedger`] (dev default, one process): [`burncloud_core::lease::ModelLedger`] made durable
//!   with a snapshot file and an append-only log, fsynced before every answer.
//! - [`RedisLedger`] (prod, shared by every gateway instance): one Lua script per call on a Redis server
//!   (synchronous client, no tokio), the ledger's clock being the server's `TIME`.
//!
//! Both give exactly the answers and state transitions of `ModelLedger` for the same calls (the tests
//! in `storage/tests/ledger.rs` hold them to it). Both block on I/O (a disk fsync, a Redis round trip)
//! and are meant to be owned by one dedicated thread (the runtime's ledger thread): they are never
//! called from a worker. Neither ever applies part of a call: a call is applied whole and made durable
//! before it answers, or it fails with [`burncloud_core::lease::LedgerError::Unavailable`] (which the
//! protocol treats as "maybe applied": the caller repeats the call unchanged).

pub mod embedded;
pub mod redis;

pub use self::embedded::EmbeddedLedger;
pub use self::redis::{RedisLedger, RedisLedgerOptions};
