//! # burncloud-adaptors
//!
//! The wire formats the gateway speaks, as pure functions: bytes in, values or bytes out. Decoding only
//! what routing and billing need from a request, converting requests, responses and streams between
//! the OpenAI, Anthropic and Gemini protocols, extracting usage, decoding Server-Sent Events
//! incrementally, and costing images. No sockets, no clocks, no async: every conversion is testable
//! from fixtures, and callers pass ids and timestamps in.
//!
//! ## Layout
//!
//! - [`convert`]: the entry points the runtime calls ([`convert_request`], [`convert_response`],
//!   [`StreamConverter`]).
//! - [`ir`]: the neutral chat representation every protocol converts to and from.
//! - [`openai`], [`anthropic`], [`gemini`]: one file per protocol, each with the same shape: wire
//!   types, usage, request conversion, response conversion, stream conversion, error mapping, tests.
//! - [`sse`]: incremental Server-Sent Events decoding and encoding.
//! - [`vision`]: image dimensions from file headers and the providers' image token rules.

pub mod anthropic;
pub mod convert;
pub mod gemini;
pub mod ir;
pub mod openai;
pub mod sse;
pub mod tokens;
pub mod vision;

pub use burncloud_core::error::Protocol;
pub use convert::{
    ConvertError, ConvertedRequest, ConvertedResponse, RequestOptions, RequestSummary, ResponseMeta,
    StreamConverter, convert_request, convert_response, response_text, response_usage, summarize_request,
    upstream_error_message, upstream_path,
};

/// Token usage reported for one request, in OpenAI's terms whatever the upstream protocol.
///
/// `prompt_tokens` counts every input token, including those read from and written to a prompt cache;
/// `cached_tokens` and `cache_creation_tokens` say how many of them were cache reads and cache writes.
/// `completion_tokens` counts every output token, including reasoning; `reasoning_tokens` says how many
/// of them were reasoning. So uncached input is `prompt_tokens - cached_tokens - cache_creation_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: i64,
    #[serde(default)]
    pub completion_tokens: i64,
    #[serde(default)]
    pub total_tokens: i64,
    /// Input tokens read from the provider's prompt cache (part of `prompt_tokens`).
    #[serde(default)]
    pub cached_tokens: i64,
    /// Input tokens written to the provider's prompt cache (part of `prompt_tokens`).
    #[serde(default)]
    pub cache_creation_tokens: i64,
    /// Output tokens spent on reasoning (part of `completion_tokens`).
    #[serde(default)]
    pub reasoning_tokens: i64,
}

impl Usage {
    /// Input tokens neither read from nor written to a cache.
    pub fn uncached_prompt_tokens(&self) -> i64 {
        (self.prompt_tokens - self.cached_tokens - self.cache_creation_tokens).max(0)
    }

    /// Fills `total_tokens` when the provider left it out.
    pub(crate) fn with_total(mut self) -> Usage {
        if self.total_tokens == 0 {
            self.total_tokens = self.prompt_tokens.saturating_add(self.completion_tokens);
        }
        self
    }
}

/// Deserializes `null` as the type's default, as `#[serde(default)]` does for a missing field: several
/// providers and clients send `"tool_calls": null` or `"tools": null` where the documentation omits them.
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + serde::Deserialize<'de>,
{
    use serde::Deserialize;
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
