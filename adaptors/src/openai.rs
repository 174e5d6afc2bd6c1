//! OpenAI wire format: what the relay needs from a request, and usage from responses and stream events.
//!
//! Requests are forwarded untouched unless a channel maps the model name (then only `model` changes).
//! Only the fields routing and billing need are decoded; unknown fields are ignored, never dropped
//! from the forwarded body.

use bytes::Bytes;
use serde::Deserialize;

use crate::Usage;

/// The fields of an OpenAI request body the gateway routes and bills by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage` as sent by the client.
    pub include_usage: bool,
}

/// Why a request body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    NotJson(String),
    MissingModel,
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::NotJson(e) => write!(f, "request body is not valid JSON: {e}"),
            RequestError::MissingModel => f.write_str("request body has no `model`"),
        }
    }
}

#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    model: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Decodes the routing fields of a JSON request body.
pub fn request_info(body: &[u8]) -> Result<RequestInfo, RequestError> {
    let head: Head = serde_json::from_slice(body).map_err(|e| RequestError::NotJson(e.to_string()))?;
    let model = match head.model {
        Some(serde_json::Value::String(m)) if !m.trim().is_empty() => m,
        _ => return Err(RequestError::MissingModel),
    };
    let stream = matches!(head.stream, Some(serde_json::Value::Bool(true)));
    let include_usage = head.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    Ok(RequestInfo { model, stream, include_usage })
}

/// The body with `model` replaced; every other field is kept as sent.
pub fn with_model(body: &[u8], model: &str) -> Result<Bytes, RequestError> {
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| RequestError::NotJson(e.to_string()))?;
    v.insert("model".into(), serde_json::Value::String(model.to_string()));
    serde_json::to_vec(&v).map(Bytes::from).map_err(|e| RequestError::NotJson(e.to_string()))
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<Usage>,
}

/// Usage from a complete (non-stream) response body, when the upstream reported it.
pub fn response_usage(body: &[u8]) -> Option<Usage> {
    let parsed: WithUsage = serde_json::from_slice(body).ok()?;
    parsed.usage.map(normalize)
}

/// Usage from one stream event's data, when this event carries it (OpenAI sends it in the final chunk
/// when `stream_options.include_usage` is set). Cheap for events without usage: no JSON parse.
pub fn stream_event_usage(data: &[u8]) -> Option<Usage> {
    memchr::memmem::find(data, b"\"usage\"")?;
    response_usage(data)
}

fn normalize(mut u: Usage) -> Usage {
    if u.total_tokens == 0 {
        u.total_tokens = u.prompt_tokens + u.completion_tokens;
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_stream_and_include_usage() {
        let info = request_info(
            br#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(info, RequestInfo { model: "gpt-4o".into(), stream: true, include_usage: true });
        let plain = request_info(br#"{"model":"m","input":"x"}"#).unwrap();
        assert!(!plain.stream && !plain.include_usage);
    }

    #[test]
    fn refuses_bodies_without_a_model_or_not_json() {
        assert_eq!(request_info(br#"{"messages":[]}"#), Err(RequestError::MissingModel));
        assert_eq!(request_info(br#"{"model":""}"#), Err(RequestError::MissingModel));
        assert_eq!(request_info(br#"{"model":3}"#), Err(RequestError::MissingModel));
        assert!(matches!(request_info(b"{oops"), Err(RequestError::NotJson(_))));
        assert!(request_info(b"[1,2]").is_err());
    }

    #[test]
    fn with_model_changes_only_the_model() {
        let out = with_model(br#"{"model":"a","temperature":0.5,"x":{"y":[1]}}"#, "b").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!({"model":"b","temperature":0.5,"x":{"y":[1]}}));
    }

    #[test]
    fn usage_from_responses_and_stream_events() {
        let u = response_usage(
            br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        );
        assert_eq!(u, Some(Usage { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 }));
        assert_eq!(stream_event_usage(br#"{"choices":[{"delta":{"content":"hi"}}]}"#), None);
        assert_eq!(stream_event_usage(br#"{"choices":[],"usage":null}"#), None);
        let e = stream_event_usage(br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
        assert_eq!(e.map(|u| u.total_tokens), Some(3));
        let emb = response_usage(br#"{"data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}"#).unwrap();
        assert_eq!((emb.prompt_tokens, emb.completion_tokens), (5, 0));
    }
}
