//! OpenAI Chat Completions wire format: routing fields, usage, and conversion to and from the neutral
//! form in [`crate::ir`] for requests, complete responses and `chat.completion.chunk` streams.
//!
//! When client and channel both speak OpenAI the body is forwarded untouched apart from `model`
//! ([`with_model`]); only the fields routing and billing need are decoded ([`request_info`]).
//! Conversion reads the first choice only. This module never does I/O and never panics on bad input:
//! malformed bodies are errors, malformed stream chunks are skipped.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::Usage;
use crate::convert::{ConvertError, RequestOptions, ResponseMeta};
use crate::ir::{
    ChatRequest, ChatResponse, FinishReason, Image, ImageSource, Part, ResponseFormat, Role, StreamEvent,
    Thinking, Tool, ToolCall, ToolChoice, ToolResult,
};
use crate::sse::{SseEvent, write_data, write_json_event};

// ---------------------------------------------------------------------------------------------------
// Routing fields
// ---------------------------------------------------------------------------------------------------

/// The fields of an OpenAI request body the gateway routes and bills by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage` as sent by the client.
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens` (OpenAI; Anthropic's `max_tokens`), when a
    /// non-negative integer.
    pub max_tokens: Option<u32>,
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
    #[serde(default)]
    max_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Value>,
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
    let limit = |v: Option<serde_json::Value>| v.and_then(|v| v.as_u64()).and_then(|n| u32::try_from(n).ok());
    let max_tokens = limit(head.max_completion_tokens).or(limit(head.max_tokens));
    Ok(RequestInfo { model, stream, include_usage, max_tokens })
}

/// Whether an SSE payload is the chunk `stream_options.include_usage` adds: no choices, a usage.
pub fn is_usage_only_chunk(data: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Vec<serde::de::IgnoredAny>,
        #[serde(default)]
        usage: Option<serde::de::IgnoredAny>,
    }
    // Cheap refusal first: most chunks carry no usage object at all.
    if memchr::memmem::find(data, b"\"usage\"").is_none() {
        return false;
    }
    serde_json::from_slice::<Chunk>(data).is_ok_and(|c| c.choices.is_empty() && c.usage.is_some())
}

/// The body with `stream_options.include_usage` set to true; every other field is kept as sent.
pub fn with_usage_requested(body: &[u8]) -> Result<Bytes, RequestError> {
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| RequestError::NotJson(e.to_string()))?;
    let options = v.entry("stream_options").or_insert_with(|| serde_json::Value::Object(Default::default()));
    if let serde_json::Value::Object(o) = options {
        o.insert("include_usage".into(), serde_json::Value::Bool(true));
    } else {
        *options = serde_json::json!({"include_usage": true});
    }
    serde_json::to_vec(&v).map(Bytes::from).map_err(|e| RequestError::NotJson(e.to_string()))
}

/// The body with `model` replaced; every other field is kept as sent.
pub fn with_model(body: &[u8], model: &str) -> Result<Bytes, RequestError> {
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| RequestError::NotJson(e.to_string()))?;
    v.insert("model".into(), serde_json::Value::String(model.to_string()));
    serde_json::to_vec(&v).map(Bytes::from).map_err(|e| RequestError::NotJson(e.to_string()))
}

// ---------------------------------------------------------------------------------------------------
// Wire types
// ---------------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Default)]
struct ChatCompletionRequest {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    model: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    messages: Vec<WireMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::null_as_default")]
    tools: Vec<WireTool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_format: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Serialize, Deserialize, Default)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::null_as_default")]
    tool_calls: Vec<WireToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refusal: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentPart {
    Text {
        text: String,
    },
    ImageUrl {
        image_url: ImageUrl,
    },
    Refusal {
        refusal: String,
    },
    #[serde(other)]
    Unsupported,
}

#[derive(Serialize, Deserialize)]
struct ImageUrl {
    url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WireToolCall {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    id: String,
    #[serde(rename = "type", default = "function_type")]
    kind: String,
    function: WireFunctionCall,
}

#[derive(Serialize, Deserialize)]
struct WireFunctionCall {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    name: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    arguments: String,
}

#[derive(Serialize, Deserialize)]
struct WireTool {
    #[serde(rename = "type", default = "function_type")]
    kind: String,
    #[serde(default)]
    function: Option<WireFunctionDef>,
}

#[derive(Serialize, Deserialize)]
struct WireFunctionDef {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parameters: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum WireToolChoice {
    Mode(String),
    Named {
        #[serde(rename = "type", default = "function_type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Serialize, Deserialize)]
struct NamedFunction {
    name: String,
}

fn function_type() -> String {
    "function".into()
}

#[derive(Serialize, Deserialize)]
struct ChatCompletion {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    id: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    object: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    created: u64,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    model: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage: Option<WireUsage>,
}

#[derive(Serialize, Deserialize)]
struct Choice {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    index: u32,
    #[serde(default)]
    message: WireMessage,
    #[serde(default)]
    logprobs: Option<serde_json::Value>,
    #[serde(default)]
    finish_reason: Option<String>,
}

// ---------------------------------------------------------------------------------------------------
// Usage
// ---------------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Default)]
struct WireUsage {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    prompt_tokens: i64,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    completion_tokens: i64,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    total_tokens: i64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Serialize, Deserialize, Default)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<i64>,
}

#[derive(Serialize, Deserialize, Default)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<i64>,
}

impl From<WireUsage> for Usage {
    fn from(w: WireUsage) -> Usage {
        Usage {
            prompt_tokens: w.prompt_tokens,
            completion_tokens: w.completion_tokens,
            total_tokens: w.total_tokens,
            cached_tokens: w.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
            cache_creation_tokens: 0,
            reasoning_tokens: w.completion_tokens_details.and_then(|d| d.reasoning_tokens).unwrap_or(0),
        }
        .with_total()
    }
}

impl From<&Usage> for WireUsage {
    fn from(u: &Usage) -> WireUsage {
        WireUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            prompt_tokens_details: Some(PromptDetails { cached_tokens: Some(u.cached_tokens) }),
            completion_tokens_details: Some(CompletionDetails { reasoning_tokens: Some(u.reasoning_tokens) }),
        }
    }
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

/// Usage from a complete (non-stream) response body, when the upstream reported it.
pub fn response_usage(body: &[u8]) -> Option<Usage> {
    let parsed: WithUsage = serde_json::from_slice(body).ok()?;
    parsed.usage.map(Usage::from)
}

/// Usage from one stream event's data, when this event carries it (OpenAI sends it in the final chunk
/// when `stream_options.include_usage` is set). Cheap for events without usage: no JSON parse.
pub fn stream_event_usage(data: &[u8]) -> Option<Usage> {
    memchr::memmem::find(data, b"\"usage\"")?;
    response_usage(data)
}

// ---------------------------------------------------------------------------------------------------
// Request conversion
// ---------------------------------------------------------------------------------------------------

/// Decodes a Chat Completions request into neutral form.
pub fn decode_request(body: &[u8]) -> Result<ChatRequest, ConvertError> {
    let w: ChatCompletionRequest = serde_json::from_slice(body).map_err(ConvertError::not_json)?;
    if w.model.trim().is_empty() {
        return Err(ConvertError::MissingModel);
    }
    let mut req = ChatRequest {
        model: w.model,
        max_tokens: w.max_completion_tokens.or(w.max_tokens),
        temperature: w.temperature,
        top_p: w.top_p,
        stop: match w.stop {
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
            None => vec![],
        },
        stream: w.stream.unwrap_or(false),
        parallel_tool_calls: w.parallel_tool_calls,
        thinking: w.reasoning_effort.as_deref().map(thinking_for_effort),
        response_format: w.response_format.as_ref().and_then(decode_response_format),
        presence_penalty: w.presence_penalty,
        frequency_penalty: w.frequency_penalty,
        seed: w.seed,
        user: w.user,
        ..Default::default()
    };
    for m in w.messages {
        decode_message(&mut req, m)?;
    }
    req.tools = w
        .tools
        .into_iter()
        .filter(|t| t.kind == "function")
        .filter_map(|t| t.function)
        .map(|f| Tool {
            name: f.name,
            description: f.description,
            parameters: f
                .parameters
                .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
        })
        .collect();
    req.tool_choice = w.tool_choice.map(|c| match c {
        WireToolChoice::Mode(m) => match m.as_str() {
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => ToolChoice::Auto,
        },
        WireToolChoice::Named { function, .. } => ToolChoice::Named(function.name),
    });
    Ok(req)
}

fn decode_message(req: &mut ChatRequest, m: WireMessage) -> Result<(), ConvertError> {
    match m.role.as_str() {
        "system" | "developer" => req.push_system(&content_text(m.content)),
        "user" => {
            for part in content_parts(m.content) {
                req.push(Role::User, part);
            }
        }
        "assistant" => {
            if let Some(r) = m.reasoning_content.filter(|r| !r.is_empty()) {
                req.push(Role::Assistant, Part::Thinking { text: r, signature: String::new() });
            }
            let text = content_text(m.content);
            if !text.is_empty() {
                req.push(Role::Assistant, Part::Text(text));
            }
            for c in m.tool_calls {
                let call = ToolCall { id: c.id, name: c.function.name, arguments: c.function.arguments };
                req.push(Role::Assistant, Part::ToolCall(call));
            }
        }
        "tool" | "function" => {
            let name = m.name.unwrap_or_default();
            let call_id = m.tool_call_id.unwrap_or_else(|| name.clone());
            let content = content_text(m.content);
            req.push(Role::User, Part::ToolResult(ToolResult { call_id, name, content, is_error: false }));
        }
        other => return Err(ConvertError::Invalid(format!("unknown message role `{other}`"))),
    }
    Ok(())
}

/// All text of a message content, parts joined without separator.
fn content_text(content: Option<Content>) -> String {
    match content {
        None => String::new(),
        Some(Content::Text(t)) => t,
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .filter_map(|p| match p {
                ContentPart::Text { text } => Some(text),
                ContentPart::Refusal { refusal } => Some(refusal),
                _ => None,
            })
            .collect(),
    }
}

fn content_parts(content: Option<Content>) -> Vec<Part> {
    match content {
        None => vec![],
        Some(Content::Text(t)) => vec![Part::Text(t)],
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .filter_map(|p| match p {
                ContentPart::Text { text } => Some(Part::Text(text)),
                ContentPart::ImageUrl { image_url } => Some(Part::Image(Image {
                    source: image_source_from_url(image_url.url),
                    detail: image_url.detail,
                })),
                ContentPart::Refusal { refusal } => Some(Part::Text(refusal)),
                ContentPart::Unsupported => None,
            })
            .collect(),
    }
}

/// Splits a `data:<media type>;base64,<data>` URL; other URLs stay URLs.
pub(crate) fn image_source_from_url(url: String) -> ImageSource {
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((meta, data)) = rest.split_once(',')
        && let Some(media_type) = meta.strip_suffix(";base64")
    {
        return ImageSource::Base64 { media_type: media_type.to_string(), data: data.to_string() };
    }
    ImageSource::Url { url, media_type: None }
}

fn image_url_for(source: &ImageSource) -> String {
    match source {
        ImageSource::Url { url, .. } => url.clone(),
        ImageSource::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
    }
}

fn decode_response_format(v: &serde_json::Value) -> Option<ResponseFormat> {
    match v.get("type")?.as_str()? {
        "json_object" => Some(ResponseFormat::Json),
        "json_schema" => {
            let schema = v.get("json_schema")?.get("schema")?.clone();
            Some(ResponseFormat::JsonSchema(schema))
        }
        _ => None,
    }
}

/// The thinking budget that stands for an OpenAI `reasoning_effort`.
pub(crate) fn thinking_for_effort(effort: &str) -> Thinking {
    let budget = match effort {
        "none" => return Thinking::Off,
        "minimal" => 1024,
        "low" => 2048,
        "high" => 24576,
        _ => 8192,
    };
    Thinking::On { budget_tokens: Some(budget) }
}

/// The OpenAI `reasoning_effort` closest to a thinking budget.
pub(crate) fn effort_for_budget(budget: Option<u32>) -> &'static str {
    match budget {
        None => "medium",
        Some(b) if b < 4096 => "low",
        Some(b) if b < 16384 => "medium",
        Some(_) => "high",
    }
}

/// Encodes a neutral request as a Chat Completions body for `model`.
pub fn encode_request(req: &ChatRequest, model: &str, opts: &RequestOptions) -> Result<Bytes, ConvertError> {
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if !req.system.is_empty() {
        messages.push(WireMessage {
            role: "system".into(),
            content: Some(Content::Text(req.system.clone())),
            ..Default::default()
        });
    }
    for m in &req.messages {
        match m.role {
            Role::User => encode_user_message(&m.parts, &mut messages),
            Role::Assistant => messages.push(encode_assistant_message(&m.parts)),
        }
    }
    let (max_tokens, max_completion_tokens) =
        if opts.openai_max_completion_tokens { (None, req.max_tokens) } else { (req.max_tokens, None) };
    let has_tools = !req.tools.is_empty();
    let w = ChatCompletionRequest {
        model: model.to_string(),
        messages,
        max_tokens,
        max_completion_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        stop: (!req.stop.is_empty()).then(|| Stop::Many(req.stop.clone())),
        stream: req.stream.then_some(true),
        stream_options: req.stream.then_some(StreamOptions { include_usage: Some(true) }),
        tools: req
            .tools
            .iter()
            .map(|t| WireTool {
                kind: function_type(),
                function: Some(WireFunctionDef {
                    name: t.name.clone(),
                    description: t.description.clone(),
                    parameters: Some(t.parameters.clone()),
                }),
            })
            .collect(),
        tool_choice: req.tool_choice.as_ref().filter(|_| has_tools).map(|c| match c {
            ToolChoice::Auto => WireToolChoice::Mode("auto".into()),
            ToolChoice::None => WireToolChoice::Mode("none".into()),
            ToolChoice::Required => WireToolChoice::Mode("required".into()),
            ToolChoice::Named(name) => WireToolChoice::Named {
                kind: function_type(),
                function: NamedFunction { name: name.clone() },
            },
        }),
        parallel_tool_calls: req.parallel_tool_calls.filter(|_| has_tools),
        reasoning_effort: match req.thinking {
            Some(Thinking::On { budget_tokens }) => Some(effort_for_budget(budget_tokens).to_string()),
            _ => None,
        },
        response_format: req.response_format.as_ref().map(|f| match f {
            ResponseFormat::Json => serde_json::json!({"type": "json_object"}),
            ResponseFormat::JsonSchema(schema) => serde_json::json!({
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": schema},
            }),
        }),
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        seed: req.seed,
        user: req.user.clone(),
    };
    serde_json::to_vec(&w).map(Bytes::from).map_err(ConvertError::not_json)
}

/// Tool results become `tool` messages (first, as they must follow the assistant's calls); the rest
/// of the parts become one `user` message.
fn encode_user_message(parts: &[Part], out: &mut Vec<WireMessage>) {
    for part in parts {
        if let Part::ToolResult(r) = part {
            out.push(WireMessage {
                role: "tool".into(),
                content: Some(Content::Text(r.content.clone())),
                tool_call_id: Some(r.call_id.clone()),
                ..Default::default()
            });
        }
    }
    let content: Vec<ContentPart> = parts
        .iter()
        .filter_map(|p| match p {
            Part::Text(t) => Some(ContentPart::Text { text: t.clone() }),
            Part::Image(i) => Some(ContentPart::ImageUrl {
                image_url: ImageUrl { url: image_url_for(&i.source), detail: i.detail.clone() },
            }),
            _ => None,
        })
        .collect();
    let content = match content.as_slice() {
        [] => return,
        [ContentPart::Text { text }] => Content::Text(text.clone()),
        _ => Content::Parts(content),
    };
    out.push(WireMessage { role: "user".into(), content: Some(content), ..Default::default() });
}

fn encode_assistant_message(parts: &[Part]) -> WireMessage {
    let text: String = parts
        .iter()
        .filter_map(|p| match p {
            Part::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    let tool_calls: Vec<WireToolCall> = parts
        .iter()
        .filter_map(|p| match p {
            Part::ToolCall(c) => Some(WireToolCall {
                id: c.id.clone(),
                kind: function_type(),
                function: WireFunctionCall { name: c.name.clone(), arguments: c.arguments.clone() },
            }),
            _ => None,
        })
        .collect();
    WireMessage {
        role: "assistant".into(),
        content: (!text.is_empty() || tool_calls.is_empty()).then_some(Content::Text(text)),
        tool_calls,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------------
// Response conversion
// ---------------------------------------------------------------------------------------------------

fn decode_finish(reason: &str) -> FinishReason {
    match reason {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        _ => FinishReason::Other,
    }
}

fn encode_finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::StopSequence | FinishReason::Other => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
    }
}

/// Decodes a complete `chat.completion` body into neutral form (first choice only).
pub fn decode_response(body: &[u8]) -> Result<ChatResponse, ConvertError> {
    let w: ChatCompletion = serde_json::from_slice(body).map_err(ConvertError::not_json)?;
    let mut resp = ChatResponse { usage: w.usage.map(Usage::from), ..Default::default() };
    if let Some(choice) = w.choices.into_iter().next() {
        let m = choice.message;
        if let Some(r) = m.reasoning_content.filter(|r| !r.is_empty()) {
            resp.parts.push(Part::Thinking { text: r, signature: String::new() });
        }
        let text = content_text(m.content);
        if !text.is_empty() {
            resp.parts.push(Part::Text(text));
        }
        if let Some(r) = m.refusal.filter(|r| !r.is_empty()) {
            resp.parts.push(Part::Text(r));
        }
        for c in m.tool_calls {
            resp.parts.push(Part::ToolCall(ToolCall {
                id: c.id,
                name: c.function.name,
                arguments: c.function.arguments,
            }));
        }
        resp.finish = choice.finish_reason.as_deref().map(decode_finish);
    }
    Ok(resp)
}

/// Encodes a neutral response as a `chat.completion` body.
pub fn encode_response(resp: &ChatResponse, meta: &ResponseMeta) -> Result<Bytes, ConvertError> {
    let mut message = encode_assistant_message(&resp.parts);
    if message.content.is_none() && message.tool_calls.is_empty() {
        message.content = Some(Content::Text(String::new()));
    }
    let reasoning: String = resp
        .parts
        .iter()
        .filter_map(|p| match p {
            Part::Thinking { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    message.reasoning_content = (!reasoning.is_empty()).then_some(reasoning);
    let w = ChatCompletion {
        id: format!("chatcmpl-{}", meta.id),
        object: "chat.completion".into(),
        created: meta.created,
        model: meta.model.to_string(),
        choices: vec![Choice {
            index: 0,
            message,
            logprobs: None,
            finish_reason: Some(encode_finish(resp.finish.unwrap_or(FinishReason::Stop)).into()),
        }],
        usage: resp.usage.as_ref().map(WireUsage::from),
    };
    serde_json::to_vec(&w).map(Bytes::from).map_err(ConvertError::not_json)
}

// ---------------------------------------------------------------------------------------------------
// Stream conversion
// ---------------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<ChunkChoice<'a>>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    index: u32,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    index: usize,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<Cow<'a, str>>,
}

/// Turns `chat.completion.chunk` events into neutral stream events.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    started: bool,
    done: bool,
    /// Tool call indexes already announced with [`StreamEvent::ToolCallStart`].
    tools_started: Vec<usize>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one SSE event; malformed chunks produce nothing.
    pub fn decode(&mut self, ev: &SseEvent, out: &mut Vec<StreamEvent>) {
        if ev.data.as_ref() == b"[DONE]" {
            self.finish(out);
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(&ev.data) else { return };
        if let Some(err) = chunk.error {
            out.push(StreamEvent::Error(error_text(&err)));
            return;
        }
        if !self.started {
            self.started = true;
            out.push(StreamEvent::Start);
        }
        let choice = chunk.choices.and_then(|cs| cs.into_iter().find(|c| c.index == 0));
        if let Some(choice) = choice {
            if let Some(delta) = choice.delta {
                self.decode_delta(delta, out);
            }
            if let Some(reason) = choice.finish_reason {
                out.push(StreamEvent::Finish(decode_finish(&reason)));
            }
        }
        if let Some(u) = chunk.usage {
            out.push(StreamEvent::Usage(u.into()));
        }
    }

    fn decode_delta(&mut self, delta: Delta, out: &mut Vec<StreamEvent>) {
        if let Some(r) = delta.reasoning_content.or(delta.reasoning).filter(|r| !r.is_empty()) {
            out.push(StreamEvent::Thinking(r.into_owned()));
        }
        if let Some(t) = delta.content.filter(|t| !t.is_empty()) {
            out.push(StreamEvent::Text(t.into_owned()));
        }
        if let Some(t) = delta.refusal.filter(|t| !t.is_empty()) {
            out.push(StreamEvent::Text(t.into_owned()));
        }
        for call in delta.tool_calls.into_iter().flatten() {
            let (name, args) = match call.function {
                Some(f) => (f.name, f.arguments),
                None => (None, None),
            };
            if !self.tools_started.contains(&call.index) && (call.id.is_some() || name.is_some()) {
                self.tools_started.push(call.index);
                out.push(StreamEvent::ToolCallStart {
                    index: call.index,
                    id: call.id.map(Cow::into_owned).unwrap_or_default(),
                    name: name.map(Cow::into_owned).unwrap_or_default(),
                });
            }
            if let Some(a) = args.filter(|a| !a.is_empty()) {
                out.push(StreamEvent::ToolCallArgs { index: call.index, json: a.into_owned() });
            }
        }
    }

    /// The upstream closed the stream: ends the response if `[DONE]` never came.
    pub fn finish(&mut self, out: &mut Vec<StreamEvent>) {
        if !self.done {
            self.done = true;
            out.push(StreamEvent::Done);
        }
    }
}

#[derive(Serialize)]
struct ChunkOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChoiceOut<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<WireUsage>,
}

#[derive(Serialize)]
struct ChoiceOut<'a> {
    index: u32,
    delta: DeltaOut<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct DeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallOut<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolCallOut<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionOut<'a>,
}

#[derive(Serialize)]
struct FunctionOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

/// Writes neutral stream events as `chat.completion.chunk` events, ending with the usage chunk (when
/// the client asked for it) and `data: [DONE]`. Reasoning goes out as `delta.reasoning_content`.
#[derive(Debug)]
pub struct StreamEncoder {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    started: bool,
    finish_sent: bool,
    closed: bool,
    usage: Option<Usage>,
}

impl StreamEncoder {
    pub fn new(meta: &ResponseMeta, include_usage: bool) -> Self {
        StreamEncoder {
            id: format!("chatcmpl-{}", meta.id),
            model: meta.model.to_string(),
            created: meta.created,
            include_usage,
            started: false,
            finish_sent: false,
            closed: false,
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
                self.start(out);
                self.delta(out, DeltaOut { content: Some(t), ..Default::default() }, None);
            }
            StreamEvent::Thinking(t) => {
                self.start(out);
                self.delta(out, DeltaOut { reasoning_content: Some(t), ..Default::default() }, None);
            }
            StreamEvent::ThinkingSignature(_) => {}
            StreamEvent::ToolCallStart { index, id, name } => {
                self.start(out);
                let call = ToolCallOut {
                    index: *index,
                    id: Some(id),
                    kind: Some("function"),
                    function: FunctionOut { name: Some(name), arguments: "" },
                };
                self.delta(out, DeltaOut { tool_calls: Some([call]), ..Default::default() }, None);
            }
            StreamEvent::ToolCallArgs { index, json } => {
                self.start(out);
                let call = ToolCallOut {
                    index: *index,
                    id: None,
                    kind: None,
                    function: FunctionOut { name: None, arguments: json },
                };
                self.delta(out, DeltaOut { tool_calls: Some([call]), ..Default::default() }, None);
            }
            StreamEvent::Finish(reason) => {
                self.start(out);
                if !self.finish_sent {
                    self.finish_sent = true;
                    self.delta(out, DeltaOut::default(), Some(encode_finish(*reason)));
                }
            }
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Error(message) => {
                self.closed = true;
                let body = serde_json::json!({"error": {"message": message, "type": "upstream_error"}});
                write_json_event(out, None, &body);
            }
            StreamEvent::Done => {
                self.start(out);
                if !self.finish_sent {
                    self.finish_sent = true;
                    self.delta(out, DeltaOut::default(), Some("stop"));
                }
                if self.include_usage
                    && let Some(u) = self.usage
                {
                    self.chunk(out, &[], Some(WireUsage::from(&u)));
                }
                write_data(out, b"[DONE]");
                self.closed = true;
            }
        }
    }

    fn start(&mut self, out: &mut BytesMut) {
        if !self.started {
            self.started = true;
            self.delta(
                out,
                DeltaOut { role: Some("assistant"), content: Some(""), ..Default::default() },
                None,
            );
        }
    }

    fn delta(&self, out: &mut BytesMut, delta: DeltaOut, finish_reason: Option<&'static str>) {
        self.chunk(out, &[ChoiceOut { index: 0, delta, logprobs: None, finish_reason }], None);
    }

    fn chunk(&self, out: &mut BytesMut, choices: &[ChoiceOut], usage: Option<WireUsage>) {
        let chunk = ChunkOut {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        };
        write_json_event(out, None, &chunk);
    }
}

// ---------------------------------------------------------------------------------------------------
// Error mapping
// ---------------------------------------------------------------------------------------------------

fn error_text(err: &serde_json::Value) -> String {
    match err {
        serde_json::Value::String(s) => s.clone(),
        other => other
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| other.to_string()),
    }
}

/// The human message of an OpenAI error body (`{"error": {"message": …}}`), if it is one.
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("error").map(error_text)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn meta() -> ResponseMeta<'static> {
        ResponseMeta { model: "client-model", id: "req1", created: 1_700_000_000 }
    }

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn reads_model_stream_and_include_usage() {
        let info = request_info(
            br#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(
            info,
            RequestInfo { model: "gpt-4o".into(), stream: true, include_usage: true, max_tokens: None }
        );
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
        assert_eq!(parse(&out), json!({"model":"b","temperature":0.5,"x":{"y":[1]}}));
    }

    #[test]
    fn usage_from_responses_and_stream_events() {
        let u = response_usage(
            br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        );
        assert_eq!(
            u,
            Some(Usage { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7, ..Default::default() })
        );
        assert_eq!(stream_event_usage(br#"{"choices":[{"delta":{"content":"hi"}}]}"#), None);
        assert_eq!(stream_event_usage(br#"{"choices":[],"usage":null}"#), None);
        let e = stream_event_usage(br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
        assert_eq!(e.map(|u| u.total_tokens), Some(3));
        let emb = response_usage(br#"{"data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}"#).unwrap();
        assert_eq!((emb.prompt_tokens, emb.completion_tokens), (5, 0));
    }

    #[test]
    fn usage_reads_cached_and_reasoning_details() {
        let u = response_usage(
            br#"{"usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,
                "prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},
                "completion_tokens_details":{"reasoning_tokens":256,"audio_tokens":0}}}"#,
        )
        .unwrap();
        assert_eq!((u.cached_tokens, u.reasoning_tokens, u.uncached_prompt_tokens()), (1920, 256, 86));
    }

    #[test]
    fn decodes_messages_tools_images_and_options() {
        let req = decode_request(
            br#"{"model":"gpt-4o","max_completion_tokens":50,"stop":"END","reasoning_effort":"high",
            "messages":[
              {"role":"system","content":"sys"},
              {"role":"developer","content":[{"type":"text","text":"dev"}]},
              {"role":"user","content":[{"type":"text","text":"look"},
                 {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA","detail":"low"}},
                 {"type":"input_audio","input_audio":{"data":"x","format":"wav"}}]},
              {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
                 "function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
              {"role":"tool","tool_call_id":"call_1","content":"sunny"}],
            "tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}],
            "tool_choice":{"type":"function","function":{"name":"get_weather"}}}"#,
        )
        .unwrap();
        assert_eq!(req.system, "sys\n\ndev");
        assert_eq!((req.max_tokens, req.stop.clone()), (Some(50), vec!["END".to_string()]));
        assert_eq!(req.thinking, Some(Thinking::On { budget_tokens: Some(24576) }));
        assert_eq!(req.messages.len(), 3);
        assert_eq!(
            req.messages[0].parts[1],
            Part::Image(Image {
                source: ImageSource::Base64 { media_type: "image/png".into(), data: "AAAA".into() },
                detail: Some("low".into()),
            })
        );
        assert_eq!(req.messages[0].parts.len(), 2, "audio has no equivalent and is dropped");
        assert!(matches!(&req.messages[1].parts[0], Part::ToolCall(c) if c.name == "get_weather"));
        assert!(matches!(&req.messages[2].parts[0], Part::ToolResult(r) if r.call_id == "call_1"));
        assert_eq!(req.tool_choice, Some(ToolChoice::Named("get_weather".into())));
    }

    #[test]
    fn nulls_where_the_documentation_omits_fields_are_accepted() {
        let req = decode_request(
            br#"{"model":"m","tools":null,"stop":null,"messages":[
              {"role":"assistant","content":"x","tool_calls":null,"name":null}]}"#,
        )
        .unwrap();
        assert_eq!(req.messages[0].parts, vec![Part::Text("x".into())]);
        let resp = decode_response(
            br#"{"id":null,"created":null,"choices":[{"index":0,"message":{"role":"assistant","content":"y","tool_calls":null},"finish_reason":"stop"}],"usage":null}"#,
        )
        .unwrap();
        assert_eq!((resp.parts.len(), resp.usage), (1, None));
    }

    #[test]
    fn decode_refuses_missing_model_and_unknown_roles() {
        assert_eq!(decode_request(br#"{"messages":[]}"#), Err(ConvertError::MissingModel));
        assert!(matches!(
            decode_request(br#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#),
            Err(ConvertError::Invalid(_))
        ));
    }

    #[test]
    fn encode_puts_tool_results_first_and_asks_for_stream_usage() {
        let mut req =
            ChatRequest { system: "sys".into(), stream: true, max_tokens: Some(9), ..Default::default() };
        req.push(Role::User, Part::Text("q".into()));
        req.push(
            Role::Assistant,
            Part::ToolCall(ToolCall { id: "t1".into(), name: "f".into(), arguments: "{}".into() }),
        );
        req.push(
            Role::User,
            Part::ToolResult(ToolResult {
                call_id: "t1".into(),
                name: String::new(),
                content: "42".into(),
                is_error: false,
            }),
        );
        req.push(Role::User, Part::Text("thanks".into()));
        let body = parse(&encode_request(&req, "gpt-4o", &RequestOptions::default()).unwrap());
        assert_eq!(
            body,
            json!({"model":"gpt-4o","max_tokens":9,"stream":true,"stream_options":{"include_usage":true},
              "messages":[
                {"role":"system","content":"sys"},
                {"role":"user","content":"q"},
                {"role":"assistant","content":null,"tool_calls":[{"id":"t1","type":"function","function":{"name":"f","arguments":"{}"}}]},
                {"role":"tool","content":"42","tool_call_id":"t1"},
                {"role":"user","content":"thanks"}]})
        );
    }

    #[test]
    fn encode_uses_max_completion_tokens_when_told() {
        let req = ChatRequest { max_tokens: Some(7), ..Default::default() };
        let opts = RequestOptions { openai_max_completion_tokens: true, ..Default::default() };
        let body = parse(&encode_request(&req, "o3", &opts).unwrap());
        assert_eq!((body.get("max_completion_tokens"), body.get("max_tokens")), (Some(&json!(7)), None));
    }

    #[test]
    fn response_round_trip_keeps_tool_calls_usage_and_finish() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o",
          "choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[
            {"id":"call_9","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
            "logprobs":null,"finish_reason":"tool_calls"}],
          "usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#;
        let resp = decode_response(body).unwrap();
        assert_eq!(resp.finish, Some(FinishReason::ToolCalls));
        let out = parse(&encode_response(&resp, &meta()).unwrap());
        assert_eq!(out["id"], "chatcmpl-req1");
        assert_eq!(out["model"], "client-model");
        assert_eq!(out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out["usage"]["total_tokens"], 15);
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

    #[test]
    fn stream_decoder_reads_text_tool_deltas_finish_and_usage() {
        let events = decode_all(concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":1}\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n",
            "data: [DONE]\n\n",
        ));
        assert_eq!(
            events,
            vec![
                StreamEvent::Start,
                StreamEvent::Text("Hi".into()),
                StreamEvent::ToolCallStart { index: 0, id: "call_1".into(), name: "f".into() },
                StreamEvent::ToolCallArgs { index: 0, json: "{\"a\":1}".into() },
                StreamEvent::Finish(FinishReason::ToolCalls),
                StreamEvent::Usage(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 4,
                    total_tokens: 7,
                    ..Default::default()
                }),
                StreamEvent::Done,
            ]
        );
    }

    #[test]
    fn stream_decoder_skips_malformed_chunks_and_reports_errors() {
        let events = decode_all("data: {nope\n\ndata: {\"error\":{\"message\":\"overloaded\"}}\n\n");
        assert_eq!(events, vec![StreamEvent::Error("overloaded".into()), StreamEvent::Done]);
    }

    #[test]
    fn stream_encoder_ends_with_finish_usage_and_done() {
        let mut enc = StreamEncoder::new(&meta(), true);
        let mut out = BytesMut::new();
        for ev in [
            StreamEvent::Start,
            StreamEvent::Text("Hi".into()),
            StreamEvent::Finish(FinishReason::Stop),
            StreamEvent::Usage(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3,
                ..Default::default()
            }),
            StreamEvent::Done,
        ] {
            enc.encode(&ev, &mut out);
        }
        let text = String::from_utf8(out.to_vec()).unwrap();
        let datas: Vec<&str> = text.split("\n\n").filter(|s| !s.is_empty()).map(|s| &s[6..]).collect();
        assert_eq!(datas.len(), 5);
        let first = parse(datas[0].as_bytes());
        assert_eq!(first["choices"][0]["delta"], json!({"role":"assistant","content":""}));
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(parse(datas[1].as_bytes())["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(parse(datas[2].as_bytes())["choices"][0]["finish_reason"], "stop");
        let usage = parse(datas[3].as_bytes());
        assert_eq!((usage["choices"].clone(), usage["usage"]["total_tokens"].clone()), (json!([]), json!(3)));
        assert_eq!(datas[4], "[DONE]");
    }

    #[test]
    fn stream_encoder_leaves_usage_out_unless_asked() {
        let mut enc = StreamEncoder::new(&meta(), false);
        let mut out = BytesMut::new();
        enc.encode(&StreamEvent::Usage(Usage::default()), &mut out);
        enc.encode(&StreamEvent::Done, &mut out);
        assert!(!String::from_utf8_lossy(&out).contains("usage"));
    }

    #[test]
    fn error_message_reads_the_error_object() {
        assert_eq!(error_message(br#"{"error":{"message":"bad key","type":"x"}}"#), Some("bad key".into()));
        assert_eq!(error_message(br#"{"ok":true}"#), None);
    }
}
