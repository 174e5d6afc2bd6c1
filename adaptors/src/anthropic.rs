//! Anthropic Messages wire format: usage, and conversion to and from the neutral form in [`crate::ir`]
//! for requests, complete responses and streams (`message_start`, `content_block_start` / `_delta` /
//! `_stop`, `message_delta`, `message_stop`).
//!
//! Owns the Anthropic rules the other protocols lack: `max_tokens` is required, the system prompt is a
//! top-level field, roles alternate (consecutive same-role messages are merged), tool results lead their
//! user message, thinking blocks carry signatures, and cache reads and writes are counted apart from
//! `input_tokens`. Never does I/O; malformed stream events are skipped, malformed bodies are errors.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Usage;
use crate::convert::{ConvertError, RequestOptions, ResponseMeta};
use crate::ir::{
    ChatRequest, ChatResponse, FinishReason, Image, ImageSource, Message, Part, Role, StreamEvent, Thinking,
    Tool, ToolCall, ToolChoice, ToolResult,
};
use crate::sse::{SseEvent, write_json_event};

/// Smallest thinking budget Anthropic accepts.
const MIN_THINKING_BUDGET: u32 = 1024;
/// Thinking budget used when the client turned thinking on without one.
const DEFAULT_THINKING_BUDGET: u32 = 8192;

// ---------------------------------------------------------------------------------------------------
// Wire types
// ---------------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Default)]
struct MessagesRequest {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    model: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    messages: Vec<WireMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    system: Option<System>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::null_as_default")]
    stop_sequences: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::null_as_default")]
    tools: Vec<WireTool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thinking: Option<WireThinking>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum System {
    Text(String),
    Blocks(Vec<SystemBlock>),
}

#[derive(Serialize, Deserialize)]
struct SystemBlock {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    text: String,
}

#[derive(Serialize, Deserialize)]
struct WireMessage {
    role: String,
    content: MessageContent,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    Image {
        source: WireImageSource,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<ToolResultContent>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        is_error: Option<bool>,
    },
    Thinking {
        #[serde(default, deserialize_with = "crate::null_as_default")]
        thinking: String,
        #[serde(default, deserialize_with = "crate::null_as_default")]
        signature: String,
    },
    #[serde(other)]
    Unsupported,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireImageSource {
    Base64 {
        media_type: String,
        data: String,
    },
    Url {
        url: String,
    },
    #[serde(other)]
    Unsupported,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum ToolResultContent {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Serialize, Deserialize)]
struct WireTool {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input_schema: Option<Value>,
    /// Absent or `custom` for client tools; server tools (web search, …) name their version here.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WireToolChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Serialize, Deserialize)]
struct WireThinking {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    budget_tokens: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct MessagesResponse {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    id: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    role: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    model: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    stop_sequence: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

// ---------------------------------------------------------------------------------------------------
// Usage
// ---------------------------------------------------------------------------------------------------

/// Anthropic usage. `input_tokens` excludes cache reads and writes; stream events carry a subset of the
/// fields, so each is optional and a later event overrides only what it names.
#[derive(Serialize, Deserialize, Default, Clone, Copy, Debug)]
struct WireUsage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_creation_input_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_read_input_tokens: Option<i64>,
}

impl WireUsage {
    fn merge(&mut self, later: WireUsage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens =
            later.cache_creation_input_tokens.or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = later.cache_read_input_tokens.or(self.cache_read_input_tokens);
    }
}

impl From<WireUsage> for Usage {
    fn from(w: WireUsage) -> Usage {
        let cached = w.cache_read_input_tokens.unwrap_or(0);
        let creation = w.cache_creation_input_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: w.input_tokens.unwrap_or(0).saturating_add(cached).saturating_add(creation),
            completion_tokens: w.output_tokens.unwrap_or(0),
            total_tokens: 0,
            cached_tokens: cached,
            cache_creation_tokens: creation,
            reasoning_tokens: 0,
        }
        .with_total()
    }
}

impl From<&Usage> for WireUsage {
    fn from(u: &Usage) -> WireUsage {
        WireUsage {
            input_tokens: Some(u.uncached_prompt_tokens()),
            output_tokens: Some(u.completion_tokens),
            cache_creation_input_tokens: Some(u.cache_creation_tokens),
            cache_read_input_tokens: Some(u.cached_tokens),
        }
    }
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

/// Usage from a complete Messages response body, when present.
pub fn response_usage(body: &[u8]) -> Option<Usage> {
    let parsed: WithUsage = serde_json::from_slice(body).ok()?;
    parsed.usage.map(Usage::from)
}

// ---------------------------------------------------------------------------------------------------
// Request conversion
// ---------------------------------------------------------------------------------------------------

/// Decodes a Messages request into neutral form.
pub fn decode_request(body: &[u8]) -> Result<ChatRequest, ConvertError> {
    let w: MessagesRequest = serde_json::from_slice(body).map_err(ConvertError::not_json)?;
    if w.model.trim().is_empty() {
        return Err(ConvertError::MissingModel);
    }
    let mut req = ChatRequest {
        model: w.model,
        max_tokens: w.max_tokens,
        temperature: w.temperature,
        top_p: w.top_p,
        top_k: w.top_k,
        stop: w.stop_sequences,
        stream: w.stream.unwrap_or(false),
        user: w.metadata.and_then(|m| m.user_id),
        ..Default::default()
    };
    match w.system {
        Some(System::Text(t)) => req.push_system(&t),
        Some(System::Blocks(blocks)) => blocks.iter().for_each(|b| req.push_system(&b.text)),
        None => {}
    }
    for m in w.messages {
        let role = match m.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => return Err(ConvertError::Invalid(format!("unknown message role `{other}`"))),
        };
        match m.content {
            MessageContent::Text(t) => req.push(role, Part::Text(t)),
            MessageContent::Blocks(blocks) => {
                for part in blocks.into_iter().filter_map(decode_block) {
                    req.push(role, part);
                }
            }
        }
    }
    req.tools = w
        .tools
        .into_iter()
        .filter(|t| matches!(t.kind.as_deref(), None | Some("custom")))
        .map(|t| Tool {
            name: t.name,
            description: t.description,
            parameters: t
                .input_schema
                .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
        })
        .collect();
    if let Some(choice) = w.tool_choice {
        if choice.disable_parallel_tool_use == Some(true) {
            req.parallel_tool_calls = Some(false);
        }
        req.tool_choice = Some(match choice.kind.as_str() {
            "any" => ToolChoice::Required,
            "none" => ToolChoice::None,
            "tool" => ToolChoice::Named(choice.name.unwrap_or_default()),
            _ => ToolChoice::Auto,
        });
    }
    req.thinking = w.thinking.map(|t| match t.kind.as_str() {
        "disabled" => Thinking::Off,
        _ => Thinking::On { budget_tokens: t.budget_tokens },
    });
    Ok(req)
}

fn decode_block(block: Block) -> Option<Part> {
    match block {
        Block::Text { text } => Some(Part::Text(text)),
        Block::Image { source } => {
            let source = match source {
                WireImageSource::Base64 { media_type, data } => ImageSource::Base64 { media_type, data },
                WireImageSource::Url { url } => ImageSource::Url { url, media_type: None },
                WireImageSource::Unsupported => return None,
            };
            Some(Part::Image(Image { source, detail: None }))
        }
        Block::ToolUse { id, name, input } => {
            let arguments = if input.is_null() { "{}".to_string() } else { input.to_string() };
            Some(Part::ToolCall(ToolCall { id, name, arguments }))
        }
        Block::ToolResult { tool_use_id, content, is_error } => Some(Part::ToolResult(ToolResult {
            call_id: tool_use_id,
            name: String::new(),
            content: tool_result_text(content),
            is_error: is_error.unwrap_or(false),
        })),
        Block::Thinking { thinking, signature } => Some(Part::Thinking { text: thinking, signature }),
        Block::Unsupported => None,
    }
}

fn tool_result_text(content: Option<ToolResultContent>) -> String {
    match content {
        None => String::new(),
        Some(ToolResultContent::Text(t)) => t,
        Some(ToolResultContent::Blocks(blocks)) => blocks
            .into_iter()
            .filter_map(|b| match b {
                Block::Text { text } => Some(text),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// Encodes a neutral request as a Messages body for `model`.
pub fn encode_request(req: &ChatRequest, model: &str, opts: &RequestOptions) -> Result<Bytes, ConvertError> {
    let mut messages: Vec<WireMessage> = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let blocks = encode_blocks(m);
        if blocks.is_empty() {
            continue;
        }
        let role = if m.role == Role::User { "user" } else { "assistant" };
        match messages.last_mut() {
            Some(WireMessage { role: last, content: MessageContent::Blocks(prev) }) if last == role => {
                prev.extend(blocks);
                if role == "user" {
                    tool_results_first(prev);
                }
            }
            _ => messages.push(WireMessage { role: role.into(), content: MessageContent::Blocks(blocks) }),
        }
    }
    let max_tokens = req.max_tokens.unwrap_or(opts.default_max_tokens).max(1);
    let thinking = thinking_budget(req, max_tokens);
    let has_tools = !req.tools.is_empty();
    let mut tool_choice = req.tool_choice.as_ref().filter(|_| has_tools).map(|c| match c {
        ToolChoice::Auto => {
            WireToolChoice { kind: "auto".into(), name: None, disable_parallel_tool_use: None }
        }
        ToolChoice::None => {
            WireToolChoice { kind: "none".into(), name: None, disable_parallel_tool_use: None }
        }
        ToolChoice::Required => {
            WireToolChoice { kind: "any".into(), name: None, disable_parallel_tool_use: None }
        }
        ToolChoice::Named(n) => {
            WireToolChoice { kind: "tool".into(), name: Some(n.clone()), disable_parallel_tool_use: None }
        }
    });
    if has_tools && req.parallel_tool_calls == Some(false) {
        let choice = tool_choice.get_or_insert_with(|| WireToolChoice {
            kind: "auto".into(),
            name: None,
            disable_parallel_tool_use: None,
        });
        if choice.kind != "none" {
            choice.disable_parallel_tool_use = Some(true);
        }
    }
    let w = MessagesRequest {
        model: model.to_string(),
        messages,
        system: (!req.system.is_empty()).then(|| System::Text(req.system.clone())),
        max_tokens: Some(max_tokens),
        // With thinking on, Anthropic refuses a custom temperature, top_k, or a low top_p.
        temperature: req.temperature.filter(|_| thinking.is_none()),
        top_p: req.top_p.filter(|_| thinking.is_none()),
        top_k: req.top_k.filter(|_| thinking.is_none()),
        stop_sequences: req.stop.clone(),
        stream: req.stream.then_some(true),
        tools: req
            .tools
            .iter()
            .map(|t| WireTool {
                name: t.name.clone(),
                description: t.description.clone(),
                input_schema: Some(t.parameters.clone()),
                kind: None,
            })
            .collect(),
        tool_choice,
        thinking: thinking.map(|b| WireThinking { kind: "enabled".into(), budget_tokens: Some(b) }),
        metadata: req.user.clone().map(|u| Metadata { user_id: Some(u) }),
    };
    serde_json::to_vec(&w).map(Bytes::from).map_err(ConvertError::not_json)
}

/// The thinking budget to send, if thinking can be on: the budget must stay below `max_tokens` and at
/// least [`MIN_THINKING_BUDGET`], and a tool-use turn must replay its signed thinking block, which a
/// conversation coming from another protocol does not have.
fn thinking_budget(req: &ChatRequest, max_tokens: u32) -> Option<u32> {
    let Some(Thinking::On { budget_tokens }) = req.thinking else { return None };
    let budget = budget_tokens.unwrap_or(DEFAULT_THINKING_BUDGET).min(max_tokens.saturating_sub(1));
    if budget < MIN_THINKING_BUDGET {
        return None;
    }
    let last_assistant = req.messages.iter().rev().find(|m| m.role == Role::Assistant);
    let unsigned_tool_turn = last_assistant.is_some_and(|m| {
        let calls = m.parts.iter().any(|p| matches!(p, Part::ToolCall(_)));
        let signed =
            m.parts.iter().any(|p| matches!(p, Part::Thinking { signature, .. } if !signature.is_empty()));
        calls && !signed
    });
    (!unsigned_tool_turn).then_some(budget)
}

fn encode_blocks(m: &Message) -> Vec<Block> {
    let mut blocks: Vec<Block> = m
        .parts
        .iter()
        .filter_map(|p| match p {
            Part::Text(t) if t.is_empty() => None,
            Part::Text(t) => Some(Block::Text { text: t.clone() }),
            Part::Image(i) => Some(Block::Image {
                source: match &i.source {
                    ImageSource::Base64 { media_type, data } => {
                        WireImageSource::Base64 { media_type: media_type.clone(), data: data.clone() }
                    }
                    ImageSource::Url { url, .. } => WireImageSource::Url { url: url.clone() },
                },
            }),
            // Only Anthropic's own signed thinking may be replayed.
            Part::Thinking { signature, .. } if signature.is_empty() => None,
            Part::Thinking { text, signature } => {
                Some(Block::Thinking { thinking: text.clone(), signature: signature.clone() })
            }
            Part::ToolCall(c) => {
                Some(Block::ToolUse { id: c.id.clone(), name: c.name.clone(), input: c.arguments_object() })
            }
            Part::ToolResult(r) => Some(Block::ToolResult {
                tool_use_id: r.call_id.clone(),
                content: (!r.content.is_empty()).then(|| ToolResultContent::Text(r.content.clone())),
                is_error: r.is_error.then_some(true),
            }),
        })
        .collect();
    if m.role == Role::User {
        tool_results_first(&mut blocks);
    }
    blocks
}

/// Anthropic wants a user message's tool results before its other content; order is kept otherwise.
fn tool_results_first(blocks: &mut [Block]) {
    blocks.sort_by_key(|b| !matches!(b, Block::ToolResult { .. }));
}

// ---------------------------------------------------------------------------------------------------
// Response conversion
// ---------------------------------------------------------------------------------------------------

fn decode_stop_reason(reason: &str) -> FinishReason {
    match reason {
        "end_turn" | "pause_turn" => FinishReason::Stop,
        "stop_sequence" => FinishReason::StopSequence,
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        _ => FinishReason::Other,
    }
}

fn encode_stop_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Other => "end_turn",
        FinishReason::StopSequence => "stop_sequence",
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls => "tool_use",
        FinishReason::ContentFilter => "refusal",
    }
}

/// Decodes a complete Messages response into neutral form.
pub fn decode_response(body: &[u8]) -> Result<ChatResponse, ConvertError> {
    let w: MessagesResponse = serde_json::from_slice(body).map_err(ConvertError::not_json)?;
    Ok(ChatResponse {
        parts: w.content.into_iter().filter_map(decode_block).collect(),
        finish: w.stop_reason.as_deref().map(decode_stop_reason),
        usage: w.usage.map(Usage::from),
    })
}

/// Encodes a neutral response as a Messages response body.
pub fn encode_response(resp: &ChatResponse, meta: &ResponseMeta) -> Result<Bytes, ConvertError> {
    let content = resp
        .parts
        .iter()
        .filter_map(|p| match p {
            Part::Text(t) => Some(Block::Text { text: t.clone() }),
            Part::Thinking { text, signature } => {
                Some(Block::Thinking { thinking: text.clone(), signature: signature.clone() })
            }
            Part::ToolCall(c) => {
                Some(Block::ToolUse { id: c.id.clone(), name: c.name.clone(), input: c.arguments_object() })
            }
            Part::Image(_) | Part::ToolResult(_) => None,
        })
        .collect();
    let w = MessagesResponse {
        id: format!("msg_{}", meta.id),
        kind: "message".into(),
        role: "assistant".into(),
        model: meta.model.to_string(),
        content,
        stop_reason: Some(encode_stop_reason(resp.finish.unwrap_or(FinishReason::Stop)).into()),
        stop_sequence: None,
        usage: Some(WireUsage::from(&resp.usage.unwrap_or_default())),
    };
    serde_json::to_vec(&w).map(Bytes::from).map_err(ConvertError::not_json)
}

// ---------------------------------------------------------------------------------------------------
// Stream conversion
// ---------------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct EventType<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

#[derive(Deserialize)]
struct MessageStart {
    message: StartMessage,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct BlockStart {
    index: usize,
    content_block: Block,
}

#[derive(Deserialize)]
struct BlockDelta<'a> {
    index: usize,
    #[serde(borrow)]
    delta: DeltaBody<'a>,
}

/// All delta kinds in one struct: cheaper to decode than a tagged enum on the hot path.
#[derive(Deserialize)]
struct DeltaBody<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    partial_json: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    thinking: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    signature: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct MessageDelta {
    #[serde(default)]
    delta: Option<StopInfo>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct StopInfo {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct ErrorEvent {
    #[serde(default)]
    error: Option<Value>,
}

/// Turns Messages stream events into neutral stream events.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    done: bool,
    usage: WireUsage,
    /// (content block index, tool call index) of each `tool_use` block.
    tool_blocks: Vec<(usize, usize)>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one SSE event; events without a neutral equivalent (ping, block stops, server tools)
    /// and malformed events produce nothing.
    pub fn decode(&mut self, ev: &SseEvent, out: &mut Vec<StreamEvent>) {
        let data = &ev.data[..];
        let kind: Cow<str> = match &ev.event {
            Some(name) => Cow::Borrowed(name.as_str()),
            None => match serde_json::from_slice::<EventType>(data) {
                Ok(t) => Cow::Owned(t.kind.into_owned()),
                Err(_) => return,
            },
        };
        match kind.as_ref() {
            "content_block_delta" => self.block_delta(data, out),
            "content_block_start" => self.block_start(data, out),
            "message_start" => {
                let Ok(start) = serde_json::from_slice::<MessageStart>(data) else { return };
                out.push(StreamEvent::Start);
                if let Some(u) = start.message.usage {
                    self.usage.merge(u);
                    out.push(StreamEvent::Usage(self.usage.into()));
                }
            }
            "message_delta" => {
                let Ok(delta) = serde_json::from_slice::<MessageDelta>(data) else { return };
                if let Some(reason) = delta.delta.and_then(|d| d.stop_reason) {
                    out.push(StreamEvent::Finish(decode_stop_reason(&reason)));
                }
                if let Some(u) = delta.usage {
                    self.usage.merge(u);
                    out.push(StreamEvent::Usage(self.usage.into()));
                }
            }
            "message_stop" => self.finish(out),
            "error" => {
                let message = serde_json::from_slice::<ErrorEvent>(data)
                    .ok()
                    .and_then(|e| e.error)
                    .and_then(|e| e.get("message").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(data).into_owned());
                out.push(StreamEvent::Error(message));
            }
            _ => {}
        }
    }

    fn block_start(&mut self, data: &[u8], out: &mut Vec<StreamEvent>) {
        let Ok(start) = serde_json::from_slice::<BlockStart>(data) else { return };
        match start.content_block {
            Block::ToolUse { id, name, input } => {
                let index = self.tool_blocks.len();
                self.tool_blocks.push((start.index, index));
                out.push(StreamEvent::ToolCallStart { index, id, name });
                if input.as_object().is_some_and(|o| !o.is_empty()) {
                    out.push(StreamEvent::ToolCallArgs { index, json: input.to_string() });
                }
            }
            Block::Text { text } if !text.is_empty() => out.push(StreamEvent::Text(text)),
            Block::Thinking { thinking, .. } if !thinking.is_empty() => {
                out.push(StreamEvent::Thinking(thinking))
            }
            _ => {}
        }
    }

    fn block_delta(&mut self, data: &[u8], out: &mut Vec<StreamEvent>) {
        let Ok(BlockDelta { index, delta }) = serde_json::from_slice::<BlockDelta>(data) else { return };
        let event = match delta.kind.as_ref() {
            "text_delta" => delta.text.map(|t| StreamEvent::Text(t.into_owned())),
            "thinking_delta" => delta.thinking.map(|t| StreamEvent::Thinking(t.into_owned())),
            "signature_delta" => delta.signature.map(|s| StreamEvent::ThinkingSignature(s.into_owned())),
            "input_json_delta" => {
                let tool = self.tool_blocks.iter().find(|(block, _)| *block == index).map(|(_, tool)| *tool);
                match (tool, delta.partial_json) {
                    (Some(index), Some(json)) if !json.is_empty() => {
                        Some(StreamEvent::ToolCallArgs { index, json: json.into_owned() })
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        out.extend(event);
    }

    /// The upstream closed the stream: ends the response if `message_stop` never came.
    pub fn finish(&mut self, out: &mut Vec<StreamEvent>) {
        if !self.done {
            self.done = true;
            out.push(StreamEvent::Done);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Text,
    Thinking,
    Tool,
}

#[derive(Serialize)]
struct DeltaOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: usize,
    delta: DeltaPayload<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum DeltaPayload<'a> {
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: &'a str },
    #[serde(rename = "signature_delta")]
    Signature { signature: &'a str },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: &'a str },
}

/// Writes neutral stream events as a Messages stream in Anthropic's order: `message_start`, content
/// blocks (`content_block_start`, deltas, `content_block_stop`), `message_delta` with the stop reason
/// and usage, `message_stop`.
#[derive(Debug)]
pub struct StreamEncoder {
    id: String,
    model: String,
    started: bool,
    closed: bool,
    open_block: Option<(usize, BlockKind)>,
    next_block: usize,
    /// (tool call index, content block index) of each tool call.
    tool_blocks: Vec<(usize, usize)>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
}

impl StreamEncoder {
    pub fn new(meta: &ResponseMeta) -> Self {
        StreamEncoder {
            id: format!("msg_{}", meta.id),
            model: meta.model.to_string(),
            started: false,
            closed: false,
            open_block: None,
            next_block: 0,
            tool_blocks: Vec::new(),
            finish: None,
            usage: None,
        }
    }

    /// Appends the client events for one neutral event.
    pub fn encode(&mut self, ev: &StreamEvent, out: &mut BytesMut) {
        if self.closed {
            return;
        }
        match ev {
            StreamEvent::Start => self.start(out),
            StreamEvent::Text(t) => {
                let index = self.block(out, BlockKind::Text);
                delta(out, index, DeltaPayload::Text { text: t });
            }
            StreamEvent::Thinking(t) => {
                let index = self.block(out, BlockKind::Thinking);
                delta(out, index, DeltaPayload::Thinking { thinking: t });
            }
            StreamEvent::ThinkingSignature(s) => {
                if let Some((index, BlockKind::Thinking)) = self.open_block {
                    delta(out, index, DeltaPayload::Signature { signature: s });
                }
            }
            StreamEvent::ToolCallStart { index, id, name } => {
                self.start(out);
                self.close_block(out);
                let block = self.open(
                    out,
                    BlockKind::Tool,
                    &serde_json::json!({
                        "type": "tool_use", "id": id, "name": name, "input": {},
                    }),
                );
                self.tool_blocks.push((*index, block));
            }
            StreamEvent::ToolCallArgs { index, json } => {
                if let Some((_, block)) = self.tool_blocks.iter().find(|(tool, _)| tool == index) {
                    delta(out, *block, DeltaPayload::InputJson { partial_json: json });
                }
            }
            StreamEvent::Finish(reason) => self.finish = Some(*reason),
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Error(message) => {
                self.closed = true;
                let body =
                    serde_json::json!({"type": "error", "error": {"type": "api_error", "message": message}});
                write_json_event(out, Some("error"), &body);
            }
            StreamEvent::Done => {
                self.start(out);
                self.close_block(out);
                let usage = WireUsage::from(&self.usage.unwrap_or_default());
                let stop_reason = encode_stop_reason(self.finish.unwrap_or(FinishReason::Stop));
                let body = serde_json::json!({
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                    "usage": usage,
                });
                write_json_event(out, Some("message_delta"), &body);
                write_json_event(out, Some("message_stop"), &serde_json::json!({"type": "message_stop"}));
                self.closed = true;
            }
        }
    }

    fn start(&mut self, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let u = self.usage.unwrap_or_default();
        let usage = WireUsage { output_tokens: Some(0), ..WireUsage::from(&u) };
        let body = serde_json::json!({
            "type": "message_start",
            "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage,
            },
        });
        write_json_event(out, Some("message_start"), &body);
    }

    /// The index of an open block of this kind, opening one (and closing another) when needed.
    fn block(&mut self, out: &mut BytesMut, kind: BlockKind) -> usize {
        self.start(out);
        match self.open_block {
            Some((index, open)) if open == kind => index,
            _ => {
                self.close_block(out);
                let start = match kind {
                    BlockKind::Thinking => {
                        serde_json::json!({"type": "thinking", "thinking": "", "signature": ""})
                    }
                    _ => serde_json::json!({"type": "text", "text": ""}),
                };
                self.open(out, kind, &start)
            }
        }
    }

    fn open(&mut self, out: &mut BytesMut, kind: BlockKind, content_block: &Value) -> usize {
        let index = self.next_block;
        self.next_block += 1;
        self.open_block = Some((index, kind));
        let body = serde_json::json!({"type": "content_block_start", "index": index, "content_block": content_block});
        write_json_event(out, Some("content_block_start"), &body);
        index
    }

    fn close_block(&mut self, out: &mut BytesMut) {
        if let Some((index, _)) = self.open_block.take() {
            let body = serde_json::json!({"type": "content_block_stop", "index": index});
            write_json_event(out, Some("content_block_stop"), &body);
        }
    }
}

fn delta(out: &mut BytesMut, index: usize, delta: DeltaPayload) {
    write_json_event(
        out,
        Some("content_block_delta"),
        &DeltaOut { kind: "content_block_delta", index, delta },
    );
}

// ---------------------------------------------------------------------------------------------------
// Error mapping
// ---------------------------------------------------------------------------------------------------

/// The human message of an Anthropic error body (`{"type":"error","error":{"message":…}}`), if it is one.
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: ErrorEvent = serde_json::from_slice(body).ok()?;
    v.error?.get("message").and_then(Value::as_str).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn meta() -> ResponseMeta<'static> {
        ResponseMeta { model: "claude-client", id: "req1", created: 0 }
    }

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn decodes_system_blocks_tools_results_images_and_thinking() {
        let req = decode_request(
            br#"{"model":"claude-sonnet-4-5","max_tokens":1024,
            "system":[{"type":"text","text":"one","cache_control":{"type":"ephemeral"}},{"type":"text","text":"two"}],
            "thinking":{"type":"enabled","budget_tokens":2048},
            "tools":[{"name":"get_weather","description":"d","input_schema":{"type":"object"}},
                     {"type":"web_search_20250305","name":"web_search","max_uses":5}],
            "tool_choice":{"type":"any","disable_parallel_tool_use":true},
            "messages":[
              {"role":"user","content":[{"type":"text","text":"hi"},
                 {"type":"image","source":{"type":"base64","media_type":"image/jpeg","data":"/9j/"}}]},
              {"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"sig"},
                 {"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Paris"}}]},
              {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1",
                 "content":[{"type":"text","text":"sunny"}],"is_error":false}]}]}"#,
        )
        .unwrap();
        assert_eq!(req.system, "one\n\ntwo");
        assert_eq!(req.thinking, Some(Thinking::On { budget_tokens: Some(2048) }));
        assert_eq!(req.tools.len(), 1, "server tools have no equivalent");
        assert_eq!(
            (req.tool_choice.clone(), req.parallel_tool_calls),
            (Some(ToolChoice::Required), Some(false))
        );
        assert_eq!(req.messages[1].parts[0], Part::Thinking { text: "hmm".into(), signature: "sig".into() });
        assert_eq!(
            req.messages[1].parts[1],
            Part::ToolCall(ToolCall {
                id: "toolu_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into()
            })
        );
        assert!(matches!(&req.messages[2].parts[0], Part::ToolResult(r) if r.content == "sunny"));
    }

    #[test]
    fn encode_requires_max_tokens_and_merges_same_role_messages() {
        let mut req = ChatRequest { system: "sys".into(), ..Default::default() };
        req.messages.push(Message { role: Role::User, parts: vec![Part::Text("a".into())] });
        req.messages.push(Message { role: Role::User, parts: vec![Part::Text("b".into())] });
        req.messages.push(Message {
            role: Role::Assistant,
            parts: vec![
                Part::Thinking { text: "t".into(), signature: String::new() },
                Part::Text("c".into()),
            ],
        });
        let opts = RequestOptions { default_max_tokens: 777, ..Default::default() };
        let body = parse(&encode_request(&req, "claude-x", &opts).unwrap());
        assert_eq!(
            body,
            json!({"model":"claude-x","system":"sys","max_tokens":777,"messages":[
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                {"role":"assistant","content":[{"type":"text","text":"c"}]}]})
        );
    }

    #[test]
    fn encode_puts_tool_results_before_text_and_parses_arguments() {
        let mut req = ChatRequest::default();
        req.push(
            Role::Assistant,
            Part::ToolCall(ToolCall {
                id: "call_1".into(),
                name: "f".into(),
                arguments: r#"{"x":2}"#.into(),
            }),
        );
        req.push(Role::User, Part::Text("also".into()));
        req.push(
            Role::User,
            Part::ToolResult(ToolResult {
                call_id: "call_1".into(),
                name: String::new(),
                content: "ok".into(),
                is_error: true,
            }),
        );
        let body = parse(&encode_request(&req, "m", &RequestOptions::default()).unwrap());
        assert_eq!(
            body["messages"][0]["content"][0],
            json!({"type":"tool_use","id":"call_1","name":"f","input":{"x":2}})
        );
        assert_eq!(
            body["messages"][1]["content"],
            json!([{"type":"tool_result","tool_use_id":"call_1","content":"ok","is_error":true},{"type":"text","text":"also"}])
        );
    }

    #[test]
    fn thinking_is_clamped_below_max_tokens_and_dropped_for_unsigned_tool_turns() {
        let mut req = ChatRequest {
            max_tokens: Some(3000),
            thinking: Some(Thinking::On { budget_tokens: Some(24576) }),
            temperature: Some(0.2),
            ..Default::default()
        };
        req.push(Role::User, Part::Text("q".into()));
        let body = parse(&encode_request(&req, "m", &RequestOptions::default()).unwrap());
        assert_eq!(body["thinking"], json!({"type":"enabled","budget_tokens":2999}));
        assert_eq!(body.get("temperature"), None);
        req.push(
            Role::Assistant,
            Part::ToolCall(ToolCall { id: "c".into(), name: "f".into(), arguments: "{}".into() }),
        );
        let body = parse(&encode_request(&req, "m", &RequestOptions::default()).unwrap());
        assert_eq!(body.get("thinking"), None);
    }

    #[test]
    fn stop_reasons_map_both_ways() {
        for (wire, reason) in [
            ("end_turn", FinishReason::Stop),
            ("stop_sequence", FinishReason::StopSequence),
            ("max_tokens", FinishReason::Length),
            ("tool_use", FinishReason::ToolCalls),
            ("refusal", FinishReason::ContentFilter),
        ] {
            assert_eq!(decode_stop_reason(wire), reason);
            assert_eq!(encode_stop_reason(reason), wire);
        }
    }

    #[test]
    fn usage_adds_cache_reads_and_writes_to_the_prompt() {
        let u = response_usage(
            br#"{"usage":{"input_tokens":10,"output_tokens":5,"cache_creation_input_tokens":100,"cache_read_input_tokens":1000}}"#,
        )
        .unwrap();
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 1110,
                completion_tokens: 5,
                total_tokens: 1115,
                cached_tokens: 1000,
                cache_creation_tokens: 100,
                reasoning_tokens: 0
            }
        );
        let back = serde_json::to_value(WireUsage::from(&u)).unwrap();
        assert_eq!(
            back,
            json!({"input_tokens":10,"output_tokens":5,"cache_creation_input_tokens":100,"cache_read_input_tokens":1000})
        );
    }

    #[test]
    fn response_round_trip() {
        let body = br#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5",
          "content":[{"type":"thinking","thinking":"let me see","signature":"EqQB"},
                     {"type":"text","text":"Checking."},
                     {"type":"tool_use","id":"toolu_01","name":"get_weather","input":{"city":"Paris"}}],
          "stop_reason":"tool_use","stop_sequence":null,
          "usage":{"input_tokens":20,"output_tokens":30}}"#;
        let resp = decode_response(body).unwrap();
        assert_eq!(resp.parts.len(), 3);
        let out = parse(&encode_response(&resp, &meta()).unwrap());
        assert_eq!(out["id"], "msg_req1");
        assert_eq!(out["content"][2]["input"], json!({"city":"Paris"}));
        assert_eq!(out["stop_reason"], "tool_use");
        assert_eq!(out["usage"]["input_tokens"], 20);
    }

    fn decode_all(text: &str) -> Vec<StreamEvent> {
        let mut sse = crate::sse::SseDecoder::new();
        sse.feed(text.as_bytes());
        let mut d = StreamDecoder::new();
        let mut out = vec![];
        while let Some(ev) = sse.next_event() {
            d.decode(&ev, &mut out);
        }
        d.finish(&mut out);
        out
    }

    const TOOL_STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Let me check\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\": \\\"Paris\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":89}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    #[test]
    fn stream_decoder_follows_blocks_tools_and_cumulative_usage() {
        let events = decode_all(TOOL_STREAM);
        let start_usage = Usage {
            prompt_tokens: 30,
            completion_tokens: 1,
            total_tokens: 31,
            cached_tokens: 5,
            ..Default::default()
        };
        let end_usage = Usage { completion_tokens: 89, total_tokens: 119, ..start_usage };
        assert_eq!(
            events,
            vec![
                StreamEvent::Start,
                StreamEvent::Usage(start_usage),
                StreamEvent::Text("Let me check".into()),
                StreamEvent::ToolCallStart { index: 0, id: "toolu_1".into(), name: "get_weather".into() },
                StreamEvent::ToolCallArgs { index: 0, json: "{\"city\": \"Paris\"}".into() },
                StreamEvent::Finish(FinishReason::ToolCalls),
                StreamEvent::Usage(end_usage),
                StreamEvent::Done,
            ]
        );
    }

    #[test]
    fn stream_decoder_reads_thinking_signatures_and_errors() {
        let events = decode_all(concat!(
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hm\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"EqQ\"}}\n\n",
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        ));
        assert_eq!(
            events,
            vec![
                StreamEvent::Thinking("hm".into()),
                StreamEvent::ThinkingSignature("EqQ".into()),
                StreamEvent::Error("Overloaded".into()),
                StreamEvent::Done,
            ]
        );
    }

    fn event_names(out: &[u8]) -> Vec<String> {
        let mut sse = crate::sse::SseDecoder::new();
        sse.feed(out);
        std::iter::from_fn(|| sse.next_event()).map(|e| e.event.unwrap_or_default()).collect()
    }

    #[test]
    fn stream_encoder_emits_anthropic_event_order() {
        let mut enc = StreamEncoder::new(&meta());
        let mut out = BytesMut::new();
        for ev in [
            StreamEvent::Start,
            StreamEvent::Thinking("t".into()),
            StreamEvent::Text("a".into()),
            StreamEvent::Text("b".into()),
            StreamEvent::ToolCallStart { index: 0, id: "call_1".into(), name: "f".into() },
            StreamEvent::ToolCallArgs { index: 0, json: "{}".into() },
            StreamEvent::Finish(FinishReason::ToolCalls),
            StreamEvent::Usage(Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
                total_tokens: 10,
                ..Default::default()
            }),
            StreamEvent::Done,
        ] {
            enc.encode(&ev, &mut out);
        }
        assert_eq!(
            event_names(&out),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains(r#""delta":{"stop_reason":"tool_use","stop_sequence":null}"#));
        assert!(text.contains(r#""input_tokens":7"#) && text.contains(r#""output_tokens":3"#));
        assert!(text.contains(r#"{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{}"}}"#));
    }

    #[test]
    fn error_message_reads_the_error_object() {
        let body =
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: required"}}"#;
        assert_eq!(error_message(body), Some("max_tokens: required".into()));
    }
}
