//! # burncloud-adaptors
//!
//! The wire formats the gateway speaks, as pure functions: bytes in, values or bytes out. Decoding only
//! what routing and billing need from a request, extracting usage from responses, and decoding
//! Server-Sent Events incrementally. No sockets, no clocks, no async: every conversion is testable from
//! fixtures.

pub mod openai;
pub mod sse;

/// Token usage reported for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: i64,
    #[serde(default)]
    pub completion_tokens: i64,
    #[serde(default)]
    pub total_tokens: i64,
}
