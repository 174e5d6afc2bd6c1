//! Domain records: users, API keys ("tokens"), channels, abilities, logs, options.
//!
//! Field names follow New API's JSON so operators' scripts keep working. These are plain data; the
//! storage crate maps them to rows and the runtime to management-API JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Quota is an integer; 500,000 quota = 1 USD.
pub type Quota = i64;

/// Quota units per US dollar.
pub const QUOTA_PER_USD: i64 = 500_000;

pub const STATUS_ENABLED: i64 = 1;
pub const STATUS_DISABLED: i64 = 2;
/// Channel disabled by the gateway itself (health checks, error rules).
pub const CHANNEL_AUTO_DISABLED: i64 = 3;
pub const TOKEN_EXPIRED: i64 = 3;
pub const TOKEN_EXHAUSTED: i64 = 4;

/// Log types, as New API numbers them.
pub const LOG_TOPUP: i64 = 1;
pub const LOG_CONSUME: i64 = 2;
pub const LOG_MANAGE: i64 = 3;
pub const LOG_SYSTEM: i64 = 4;
pub const LOG_ERROR: i64 = 5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: i64,
    pub username: String,
    #[serde(skip_serializing, default)]
    pub password_hash: String,
    pub display_name: String,
    pub role: i64,
    pub status: i64,
    pub email: String,
    pub group: String,
    pub quota: Quota,
    pub used_quota: Quota,
    pub request_count: i64,
    pub created_time: i64,
    /// Raised with every change of the user's funding (`quota + used_quota`): top-ups and edits of
    /// `quota`. The balance ledger applies fundings by version (see `lease::Funding`).
    #[serde(default)]
    pub quota_version: i64,
}

/// An API key. The secret itself is never stored: only its SHA-256 (`key_hash`) and a masked form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Token {
    pub id: i64,
    pub user_id: i64,
    /// Masked key (`sk-abcd…wxyz`); the full key appears only in the creation response.
    pub key: String,
    #[serde(skip)]
    pub key_hash: String,
    pub name: String,
    pub status: i64,
    pub created_time: i64,
    pub accessed_time: i64,
    /// Unix seconds, or -1 for never.
    pub expired_time: i64,
    pub remain_quota: Quota,
    pub unlimited_quota: bool,
    pub used_quota: Quota,
    /// Models this key may use; empty = any model of its group.
    pub models: Vec<String>,
    /// Comma-separated IPs or CIDRs; empty = any address.
    pub allow_ips: String,
    /// Overrides the user's group when not empty.
    pub group: String,
    /// Requests per minute; 0 = unlimited.
    pub rpm: i64,
    /// Tokens per minute; 0 = unlimited.
    pub tpm: i64,
    /// Raised with every change of the key's funding (`remain_quota + used_quota`, or its limited flag).
    #[serde(default)]
    pub quota_version: i64,
}

/// The protocol an upstream channel speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelType {
    OpenAi,
    Anthropic,
    Gemini,
}

impl ChannelType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelType::OpenAi => "openai",
            ChannelType::Anthropic => "anthropic",
            ChannelType::Gemini => "gemini",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(ChannelType::OpenAi),
            "anthropic" => Some(ChannelType::Anthropic),
            "gemini" => Some(ChannelType::Gemini),
            _ => None,
        }
    }
}

/// An upstream account the gateway forwards to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    pub id: i64,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ChannelType,
    /// Provider root, e.g. `https://api.openai.com`; the protocol path is appended.
    pub base_url: String,
    pub key: String,
    /// Comma-separated model names this channel serves.
    pub models: String,
    /// Comma-separated groups allowed to use this channel.
    pub group: String,
    /// Higher is tried first.
    pub priority: i64,
    /// Relative weight inside a priority tier; zero weights count as equal.
    pub weight: i64,
    /// Client-facing model name → upstream model name.
    pub model_mapping: BTreeMap<String, String>,
    pub tag: String,
    /// `http://`, `https://` or `socks5://` proxy for this channel; empty = direct.
    pub proxy: String,
    pub status: i64,
    pub test_model: String,
    pub created_time: i64,
    pub test_time: i64,
    pub response_time: i64,
    pub used_quota: Quota,
    /// Why the gateway disabled this channel (status 3), empty otherwise.
    #[serde(default)]
    pub auto_disabled_reason: String,
    /// When it did, unix seconds; 0 when never.
    #[serde(default)]
    pub auto_disabled_time: i64,
}

impl Channel {
    pub fn model_list(&self) -> impl Iterator<Item = &str> {
        split_list(&self.models)
    }

    pub fn group_list(&self) -> impl Iterator<Item = &str> {
        split_list(&self.group)
    }

    /// The model name to send upstream for a client-facing name.
    pub fn upstream_model<'a>(&'a self, requested: &'a str) -> &'a str {
        self.model_mapping.get(requested).map(String::as_str).unwrap_or(requested)
    }
}

/// Splits a comma-separated list, trimming blanks and dropping empty items.
pub fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty())
}

/// One line of the request log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LogEntry {
    pub id: i64,
    pub created_at: i64,
    #[serde(rename = "type")]
    pub kind: i64,
    pub user_id: i64,
    pub username: String,
    pub token_id: i64,
    pub token_name: String,
    pub model_name: String,
    pub channel_id: i64,
    pub quota: Quota,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub use_time_ms: i64,
    pub is_stream: bool,
    pub group: String,
    pub ip: String,
    pub request_id: String,
    pub content: String,
    /// Prompt tokens served from the provider's cache (priced with `CacheRatio`).
    #[serde(default)]
    pub cached_tokens: i64,
    /// How the request was priced, as a JSON object (New API's `other`): `model_ratio`,
    /// `completion_ratio`, `group_ratio`, `cache_ratio` or `model_price`, and `pre_deducted`.
    #[serde(default)]
    pub other: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_list_trims_and_skips_empty_items() {
        let v: Vec<_> = split_list(" a, b ,,c,").collect();
        assert_eq!(v, ["a", "b", "c"]);
    }

    #[test]
    fn channel_type_round_trips_through_its_name() {
        for t in [ChannelType::OpenAi, ChannelType::Anthropic, ChannelType::Gemini] {
            assert_eq!(ChannelType::parse(t.as_str()), Some(t));
        }
        assert_eq!(ChannelType::parse("azure"), None);
    }
}
