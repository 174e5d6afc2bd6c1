//! # burncloud-benches
//!
//! The load harness (`burncloud-load`): starts the project's mock upstream, BurnCloud and reference
//! systems (nginx `proxy_pass`, and where installed the LiteLLM proxy and the Portkey gateway) as child
//! processes on loopback, drives each with the same load generators at the same connection counts,
//! alternating systems, and reports maximum requests/s, latency at fixed rates, CPU time per request,
//! memory (idle, per idle keep-alive connection, under concurrent streams) and streaming delays, as
//! ratios against the references: a markdown table, a JSON file and a chart. Never used by tests as a
//! timed assertion.
//!
//! The micro-benchmarks of the hot path live in `benches/benches/` (criterion).

pub mod chart;
pub mod client;
pub mod loadgen;
pub mod peers;
pub mod procs;
pub mod wrk;
