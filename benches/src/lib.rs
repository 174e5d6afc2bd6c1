//! # burncloud-benches
//!
//! The load harness (`burncloud-load`): starts the project's mock upstream, BurnCloud and reference
//! systems as child processes on loopback, drives each with the same load generator (wrk) and the same
//! connection count, alternating systems, and reports requests/s, latency, CPU time per request and
//! RSS, as ratios against the references. Never used by tests as a timed assertion.

pub mod procs;
pub mod wrk;
