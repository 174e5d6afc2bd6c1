//! # burncloud-tests
//!
//! Test tooling of the project: the mock upstream ([`mock`], also the `burncloud-mock` binary) and,
//! under `tests/`, the integration tests that drive real binaries.

pub mod harness;
pub mod mock;
