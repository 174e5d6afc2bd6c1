//! Fault injection: what the mock does to the next API requests instead of answering normally.
//!
//! Owns [`Behaviour`] (the JSON body of `PUT /_mock/behaviour`), [`Fault`], and [`BehaviourSlot`],
//! the one behaviour shared by every worker of a mock. The hot path is one atomic load when no
//! behaviour is set; only while one is set does a request take the slot's lock (to count down
//! `times`). Test tooling: it never sits in gateway worker code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};

use serde::{Deserialize, Serialize};

/// How a response goes wrong on purpose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    #[default]
    None,
    /// Streams `fault_after_chunks` events (non-stream: half the body), then closes the connection.
    DisconnectMidStream,
    /// Writes the status line, waits `latency_ms` (1000 when unset), then the rest of the response.
    SlowHeaders,
    /// Answers 200 with a body that is not the JSON (or SSE events) the client expects.
    GarbageBody,
    /// Reads the request, then closes the connection without a response.
    CloseBeforeResponse,
}

/// Overrides for the next API requests; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Behaviour {
    /// Answer with this status instead of the normal response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Body for `status`: a string is sent as-is, any other JSON value serialized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_gap_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    #[serde(default)]
    pub fault: Fault,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_after_chunks: Option<usize>,
    /// Answer chat requests (all three protocols) with this tool call instead of text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call: Option<ToolCall>,
    /// OpenAI streams: never send the usage chunk, even when `stream_options.include_usage` asks for
    /// it (as some providers do).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub omit_usage: bool,
    /// Applies to the next `times` API requests, then the mock reverts; absent = until changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub times: Option<u64>,
}

/// A tool call the mock answers with: OpenAI `tool_calls` (finish reason `tool_calls`), an Anthropic
/// `tool_use` block (stop reason `tool_use`) or a Gemini `functionCall` part.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON object; absent means `{}`.
    #[serde(default = "empty_object")]
    pub arguments: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

struct Active {
    behaviour: Arc<Behaviour>,
    remaining: Option<u64>,
}

/// The behaviour in force, shared by all workers.
#[derive(Default)]
pub struct BehaviourSlot {
    /// Fast check: false means "answer normally" without touching the lock.
    set: AtomicBool,
    #[allow(clippy::disallowed_types)] // test tooling, not worker code: taken only while a fault is set
    current: std::sync::Mutex<Option<Active>>,
}

impl BehaviourSlot {
    /// Replaces the behaviour (`None` resets to normal answers). `times: 0` also resets.
    pub fn set(&self, behaviour: Option<Behaviour>) {
        let active = behaviour
            .filter(|b| b.times != Some(0))
            .map(|b| Active { remaining: b.times, behaviour: Arc::new(b) });
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        self.set.store(active.is_some(), Ordering::Release);
        *current = active;
    }

    /// The behaviour in force, if any.
    pub fn current(&self) -> Option<Behaviour> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.as_ref().map(|a| Behaviour { times: a.remaining, ..(*a.behaviour).clone() })
    }

    /// Takes the behaviour for one API request, counting down `times`.
    pub fn take(&self) -> Option<Arc<Behaviour>> {
        if !self.set.load(Ordering::Acquire) {
            return None;
        }
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let active = current.as_mut()?;
        let behaviour = active.behaviour.clone();
        if let Some(remaining) = active.remaining.as_mut() {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                *current = None;
                self.set.store(false, Ordering::Release);
            }
        }
        Some(behaviour)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counted_behaviour_applies_that_many_times_then_reverts() {
        let slot = BehaviourSlot::default();
        slot.set(Some(Behaviour { status: Some(500), times: Some(2), ..Behaviour::default() }));
        assert!(slot.take().is_some());
        assert_eq!(slot.current().unwrap().times, Some(1));
        assert!(slot.take().is_some());
        assert!(slot.take().is_none());
    }

    #[test]
    fn an_uncounted_behaviour_stays_until_reset() {
        let slot = BehaviourSlot::default();
        slot.set(Some(Behaviour { fault: Fault::GarbageBody, ..Behaviour::default() }));
        for _ in 0..5 {
            assert_eq!(slot.take().unwrap().fault, Fault::GarbageBody);
        }
        slot.set(None);
        assert!(slot.take().is_none());
    }

    #[test]
    fn the_behaviour_body_parses_every_documented_field() {
        let b: Behaviour = serde_json::from_str(
            r#"{"status":500,"body":"x","latency_ms":1,"chunks":2,"chunk_gap_ms":3,"prompt_tokens":4,
                "completion_tokens":5,"fault":"disconnect_mid_stream","fault_after_chunks":6,"times":7,
                "tool_call":{"name":"f","arguments":{"a":1}}}"#,
        )
        .unwrap();
        assert_eq!((b.fault, b.times, b.fault_after_chunks), (Fault::DisconnectMidStream, Some(7), Some(6)));
        assert_eq!(b.tool_call.unwrap().arguments, serde_json::json!({"a": 1}));
        assert!(serde_json::from_str::<Behaviour>(r#"{"staus":500}"#).is_err());
        assert!(serde_json::from_str::<Behaviour>(r#"{"tool_call":{"name":"f","args":{}}}"#).is_err());
        let bare: Behaviour = serde_json::from_str(r#"{"tool_call":{"name":"f"}}"#).unwrap();
        assert_eq!(bare.tool_call.unwrap().arguments, serde_json::json!({}));
    }
}
