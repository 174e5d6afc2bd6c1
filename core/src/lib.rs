//! # burncloud-core
//!
//! The domain of the gateway, as plain data and pure functions: users, API keys ("tokens"), channels,
//! abilities and their selection, options and pricing, and the one error type every layer returns.
//!
//! Never does I/O, never touches a clock it was not handed, never depends on an async runtime: every
//! function here can be called from a worker's hot path, the storage thread or a test alike.

pub mod apikey;
pub mod error;
pub mod filter;
pub mod health;
pub mod lease;
pub mod model;
pub mod password;
pub mod pricing;
pub mod ratelimit;
pub mod routing;

pub use error::{ErrorKind, ErrorSource, GatewayError};
