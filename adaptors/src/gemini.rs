//! Gemini `generateContent` wire format: usage, and conversion to and from the neutral form in
//! [`crate::ir`] for requests, complete responses and `streamGenerateContent?alt=sse` streams.
//!
//! Owns the Gemini rules the other protocols lack: the model and the stream flag live in the URL, not
//! the body; the system prompt is `systemInstruction`; the assistant role is `model`; function calls
//! carry no id (ids are generated here and function responses are matched back by name); a function
//! call arrives whole, never as argument fragments; `usageMetadata` counts thoughts apart from
//! candidates. Never does I/O; malformed stream chunks are skipped, malformed bodies are errors.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Usage;
use crate::convert::{ConvertError, ResponseMeta};
use crate::ir::{
    ChatRequest, ChatResponse, FinishReason, Image, ImageSource, Part, ResponseFormat, Role, StreamEvent,
    Thinking, Tool, ToolCall, ToolChoice, ToolResult, generated_call_id,
};
use crate::sse::{SseEvent, write_json_event};

/// Google's documented placeholder for function calls replayed from a conversation Gemini did not
/// produce, which therefore have no thought signature of their own.
const FOREIGN_CALL_SIGNATURE: &str = "skip_thought_signature_validator";

// ---------------------------------------------------------------------------------------------------
// Wire types
// ---------------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct GenerateContentRequest {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    contents: Vec<WireContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    system_instruction: Option<WireContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generation_config: Option<GenerationConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::null_as_default")]
    tools: Vec<WireTool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_config: Option<ToolConfig>,
}

#[derive(Serialize, Deserialize, Default)]
struct WireContent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    parts: Vec<WirePart>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WirePart {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thought: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thought_signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inline_data: Option<Blob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file_data: Option<FileData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    function_call: Option<FunctionCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    function_response: Option<FunctionResponse>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Blob {
    mime_type: String,
    data: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mime_type: Option<String>,
    file_uri: String,
}

#[derive(Serialize, Deserialize)]
struct FunctionCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Serialize, Deserialize)]
struct FunctionResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    name: String,
    #[serde(default)]
    response: Value,
}

#[derive(Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::null_as_default")]
    stop_sequences: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_schema: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thinking_config: Option<ThinkingConfig>,
}

#[derive(Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
struct ThinkingConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thinking_budget: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    include_thoughts: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thinking_level: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WireTool {
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::null_as_default")]
    function_declarations: Vec<FunctionDeclaration>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FunctionDeclaration {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    /// Gemini's OpenAPI-subset schema (upper-case type names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    /// Plain JSON Schema; what this module sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parameters_json_schema: Option<Value>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    function_calling_config: Option<FunctionCallingConfig>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FunctionCallingConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::null_as_default")]
    allowed_function_names: Vec<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct GenerateContentResponse {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    candidates: Vec<Candidate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_id: Option<String>,
    #[serde(default, skip_serializing)]
    error: Option<Value>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content: Option<WireContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    finish_reason: Option<String>,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    index: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    block_reason: Option<String>,
}

// ---------------------------------------------------------------------------------------------------
// Usage
// ---------------------------------------------------------------------------------------------------

/// Gemini usage: `promptTokenCount` includes cached content; `candidatesTokenCount` excludes thoughts.
#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prompt_token_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    candidates_token_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    total_token_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cached_content_token_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thoughts_token_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_use_prompt_token_count: Option<i64>,
}

impl From<UsageMetadata> for Usage {
    fn from(w: UsageMetadata) -> Usage {
        let thoughts = w.thoughts_token_count.unwrap_or(0);
        Usage {
            prompt_tokens: w
                .prompt_token_count
                .unwrap_or(0)
                .saturating_add(w.tool_use_prompt_token_count.unwrap_or(0)),
            completion_tokens: w.candidates_token_count.unwrap_or(0).saturating_add(thoughts),
            total_tokens: w.total_token_count.unwrap_or(0),
            cached_tokens: w.cached_content_token_count.unwrap_or(0),
            cache_creation_tokens: 0,
            reasoning_tokens: thoughts,
        }
        .with_total()
    }
}

impl From<&Usage> for UsageMetadata {
    fn from(u: &Usage) -> UsageMetadata {
        UsageMetadata {
            prompt_token_count: Some(u.prompt_tokens),
            candidates_token_count: Some(u.completion_tokens - u.reasoning_tokens),
            total_token_count: Some(u.total_tokens),
            cached_content_token_count: (u.cached_tokens > 0).then_some(u.cached_tokens),
            thoughts_token_count: (u.reasoning_tokens > 0).then_some(u.reasoning_tokens),
            tool_use_prompt_token_count: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WithUsage {
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
}

/// Checks that a Gemini request body forwarded as is is a JSON object with valid text: every string
/// UTF-8 and every escape well-formed (a skim would let a lone surrogate or a stray byte through).
pub fn check_request(body: &[u8]) -> Result<(), ConvertError> {
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
        .map(|_| ())
        .map_err(ConvertError::not_json)
}

/// Usage from a complete `generateContent` response body, when present.
pub fn response_usage(body: &[u8]) -> Option<Usage> {
    let parsed: WithUsage = serde_json::from_slice(body).ok()?;
    parsed.usage_metadata.map(Usage::from)
}

// ---------------------------------------------------------------------------------------------------
// Request conversion
// ---------------------------------------------------------------------------------------------------

/// Decodes a `generateContent` body into neutral form. The body names neither the model nor whether
/// to stream (both are in the URL), so `model` is left empty and `stream` false for the caller to set.
/// Function calls without an id get `call_<turn>_<part>`; each function response takes the id of the
/// earliest unanswered call with its name.
pub fn decode_request(body: &[u8]) -> Result<ChatRequest, ConvertError> {
    let w: GenerateContentRequest = serde_json::from_slice(body).map_err(ConvertError::not_json)?;
    let mut req = ChatRequest::default();
    if let Some(system) = w.system_instruction {
        for text in system.parts.into_iter().filter_map(|p| p.text) {
            req.push_system(&text);
        }
    }
    let mut unanswered: Vec<(String, String)> = Vec::new();
    for (turn, content) in w.contents.into_iter().enumerate() {
        let role = match content.role.as_deref() {
            Some("model") => Role::Assistant,
            _ => Role::User,
        };
        for (n, part) in content.parts.into_iter().enumerate() {
            if let Some(call) = part.function_call {
                let id = call.id.unwrap_or_else(|| format!("call_{turn}_{n}"));
                unanswered.push((id.clone(), call.name.clone()));
                let arguments = call.args.map(|a| a.to_string()).unwrap_or_else(|| "{}".into());
                req.push(role, Part::ToolCall(ToolCall { id, name: call.name, arguments }));
            } else if let Some(resp) = part.function_response {
                let position = match &resp.id {
                    Some(id) => unanswered.iter().position(|(i, _)| i == id),
                    None => unanswered.iter().position(|(_, name)| *name == resp.name),
                };
                let matched = position.map(|i| unanswered.remove(i).0);
                let call_id = resp.id.clone().or(matched).unwrap_or_else(|| format!("call_{}", resp.name));
                let (content, is_error) = function_response_text(&resp.response);
                req.push(role, Part::ToolResult(ToolResult { call_id, name: resp.name, content, is_error }));
            } else if let Some(text) = part.text {
                let part = if part.thought == Some(true) {
                    Part::Thinking { text, signature: String::new() }
                } else {
                    Part::Text(text)
                };
                req.push(role, part);
            } else if let Some(blob) = part.inline_data.filter(|b| b.mime_type.starts_with("image/")) {
                let source = ImageSource::Base64 { media_type: blob.mime_type, data: blob.data };
                req.push(role, Part::Image(Image { source, detail: None }));
            } else if let Some(file) = part.file_data {
                let source = ImageSource::Url { url: file.file_uri, media_type: file.mime_type };
                req.push(role, Part::Image(Image { source, detail: None }));
            }
        }
    }
    if let Some(config) = w.generation_config {
        decode_generation_config(&mut req, config);
    }
    req.tools = w
        .tools
        .into_iter()
        .flat_map(|t| t.function_declarations)
        .map(|f| Tool {
            name: f.name,
            description: f.description,
            parameters: match (f.parameters_json_schema, f.parameters) {
                (Some(schema), _) => schema,
                (None, Some(mut schema)) => {
                    lowercase_types(&mut schema);
                    schema
                }
                (None, None) => serde_json::json!({"type": "object", "properties": {}}),
            },
        })
        .collect();
    if let Some(config) = w.tool_config.and_then(|c| c.function_calling_config) {
        req.tool_choice = match config.mode.as_deref() {
            Some("NONE") => Some(ToolChoice::None),
            Some("ANY") => match config.allowed_function_names.as_slice() {
                [only] => Some(ToolChoice::Named(only.clone())),
                _ => Some(ToolChoice::Required),
            },
            Some(_) => Some(ToolChoice::Auto),
            None => None,
        };
    }
    Ok(req)
}

fn decode_generation_config(req: &mut ChatRequest, c: GenerationConfig) {
    req.max_tokens = c.max_output_tokens;
    req.temperature = c.temperature;
    req.top_p = c.top_p;
    req.top_k = c.top_k;
    req.stop = c.stop_sequences;
    req.presence_penalty = c.presence_penalty;
    req.frequency_penalty = c.frequency_penalty;
    req.seed = c.seed;
    if c.response_mime_type.as_deref() == Some("application/json") {
        req.response_format = Some(match (c.response_json_schema, c.response_schema) {
            (Some(schema), _) => ResponseFormat::JsonSchema(schema),
            (None, Some(mut schema)) => {
                lowercase_types(&mut schema);
                ResponseFormat::JsonSchema(schema)
            }
            (None, None) => ResponseFormat::Json,
        });
    }
    req.thinking = c.thinking_config.map(|t| match (t.thinking_budget, t.thinking_level.as_deref()) {
        (Some(0), _) => Thinking::Off,
        (Some(b), _) if b > 0 => Thinking::On { budget_tokens: u32::try_from(b).ok() },
        (_, Some(level)) => crate::openai::thinking_for_effort(&level.to_ascii_lowercase()),
        _ => Thinking::On { budget_tokens: None },
    });
}

/// Gemini's schema names types in upper case (`OBJECT`); JSON Schema wants lower case.
fn lowercase_types(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(s) if key == "type" => *s = s.to_ascii_lowercase(),
                    other => lowercase_types(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(lowercase_types),
        _ => {}
    }
}

/// A function response object as text: the lone string of `{"content"|"result"|"output": "…"}` or of
/// `{"error": "…"}` (an error), the JSON otherwise.
fn function_response_text(response: &Value) -> (String, bool) {
    if let Some(map) = response.as_object()
        && map.len() == 1
        && let Some((key, Value::String(text))) = map.iter().next()
    {
        match key.as_str() {
            "content" | "result" | "output" => return (text.clone(), false),
            "error" => return (text.clone(), true),
            _ => {}
        }
    }
    (response.to_string(), false)
}

/// A tool result as a function response object: a JSON object result as is, other text wrapped.
fn function_response_value(result: &ToolResult) -> Value {
    if result.is_error {
        return serde_json::json!({"error": result.content});
    }
    match serde_json::from_str::<Value>(&result.content) {
        Ok(v @ Value::Object(_)) => v,
        _ => serde_json::json!({"content": result.content}),
    }
}

/// Encodes a neutral request as a `generateContent` body (the model and the stream flag go in the
/// URL, see [`crate::upstream_path`]).
pub fn encode_request(req: &ChatRequest) -> Result<Bytes, ConvertError> {
    let mut contents: Vec<WireContent> = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let role = if m.role == Role::User { "user" } else { "model" };
        let mut calls_signed = false;
        let parts: Vec<WirePart> =
            m.parts.iter().filter_map(|p| encode_part(req, p, &mut calls_signed)).collect();
        if parts.is_empty() {
            continue;
        }
        match contents.last_mut() {
            Some(last) if last.role.as_deref() == Some(role) => last.parts.extend(parts),
            _ => contents.push(WireContent { role: Some(role.into()), parts }),
        }
    }
    let (response_mime_type, response_json_schema) = match &req.response_format {
        Some(ResponseFormat::Json) => (Some("application/json".to_string()), None),
        Some(ResponseFormat::JsonSchema(s)) => (Some("application/json".to_string()), Some(s.clone())),
        None => (None, None),
    };
    let config = GenerationConfig {
        max_output_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stop_sequences: req.stop.clone(),
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        seed: req.seed,
        response_mime_type,
        response_schema: None,
        response_json_schema,
        thinking_config: match req.thinking {
            Some(Thinking::On { budget_tokens }) => Some(ThinkingConfig {
                thinking_budget: Some(budget_tokens.map_or(-1, i64::from)),
                include_thoughts: Some(true),
                thinking_level: None,
            }),
            _ => None,
        },
    };
    let has_tools = !req.tools.is_empty();
    let w = GenerateContentRequest {
        contents,
        system_instruction: (!req.system.is_empty()).then(|| WireContent {
            role: None,
            parts: vec![WirePart { text: Some(req.system.clone()), ..Default::default() }],
        }),
        generation_config: (config != GenerationConfig::default()).then_some(config),
        tools: if has_tools {
            vec![WireTool {
                function_declarations: req
                    .tools
                    .iter()
                    .map(|t| FunctionDeclaration {
                        name: t.name.clone(),
                        description: t.description.clone(),
                        parameters: None,
                        parameters_json_schema: Some(t.parameters.clone()),
                    })
                    .collect(),
            }]
        } else {
            vec![]
        },
        tool_config: req.tool_choice.as_ref().filter(|_| has_tools).map(|c| {
            let (mode, names) = match c {
                ToolChoice::Auto => ("AUTO", vec![]),
                ToolChoice::None => ("NONE", vec![]),
                ToolChoice::Required => ("ANY", vec![]),
                ToolChoice::Named(n) => ("ANY", vec![n.clone()]),
            };
            ToolConfig {
                function_calling_config: Some(FunctionCallingConfig {
                    mode: Some(mode.into()),
                    allowed_function_names: names,
                }),
            }
        }),
    };
    serde_json::to_vec(&w).map(Bytes::from).map_err(ConvertError::not_json)
}

/// One part of a turn. The first function call of a turn carries [`FOREIGN_CALL_SIGNATURE`] (Gemini
/// checks the signature of the first call only); function responses are named after their call.
fn encode_part(req: &ChatRequest, part: &Part, calls_signed: &mut bool) -> Option<WirePart> {
    match part {
        Part::Text(t) if t.is_empty() => None,
        Part::Text(t) => Some(WirePart { text: Some(t.clone()), ..Default::default() }),
        Part::Thinking { .. } => None,
        Part::Image(i) => Some(image_part(i)),
        Part::ToolCall(c) => {
            let signature = (!*calls_signed).then(|| FOREIGN_CALL_SIGNATURE.to_string());
            *calls_signed = true;
            Some(WirePart {
                function_call: Some(FunctionCall {
                    id: None,
                    name: c.name.clone(),
                    args: Some(c.arguments_object()),
                }),
                thought_signature: signature,
                ..Default::default()
            })
        }
        Part::ToolResult(r) => {
            let name = match r.name.as_str() {
                "" => req.tool_name_for(&r.call_id).unwrap_or_default().to_string(),
                name => name.to_string(),
            };
            let response = function_response_value(r);
            Some(WirePart {
                function_response: Some(FunctionResponse { id: None, name, response }),
                ..Default::default()
            })
        }
    }
}

fn image_part(image: &Image) -> WirePart {
    match &image.source {
        ImageSource::Base64 { media_type, data } => WirePart {
            inline_data: Some(Blob { mime_type: media_type.clone(), data: data.clone() }),
            ..Default::default()
        },
        ImageSource::Url { url, media_type } => WirePart {
            file_data: Some(FileData {
                mime_type: Some(media_type.clone().unwrap_or_else(|| media_type_for_url(url).into())),
                file_uri: url.clone(),
            }),
            ..Default::default()
        },
    }
}

/// The image media type a URL's extension suggests; JPEG when it suggests none.
fn media_type_for_url(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or_default().to_ascii_lowercase();
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("heic") => "image/heic",
        _ => "image/jpeg",
    }
}

// ---------------------------------------------------------------------------------------------------
// Response conversion
// ---------------------------------------------------------------------------------------------------

/// Gemini reports `STOP` for turns that end in function calls; those become [`FinishReason::ToolCalls`].
fn decode_finish(reason: &str, called_tools: bool) -> FinishReason {
    match reason {
        "STOP" if called_tools => FinishReason::ToolCalls,
        "STOP" => FinishReason::Stop,
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY"
        | "RECITATION"
        | "LANGUAGE"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => FinishReason::ContentFilter,
        _ => FinishReason::Other,
    }
}

fn encode_finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::StopSequence | FinishReason::ToolCalls => "STOP",
        FinishReason::Length => "MAX_TOKENS",
        FinishReason::ContentFilter => "SAFETY",
        FinishReason::Other => "OTHER",
    }
}

/// Decodes a complete `generateContent` response (first candidate) into neutral form. Function calls
/// without an id get [`generated_call_id`] ids seeded with `id_seed`.
pub fn decode_response(body: &[u8], id_seed: &str) -> Result<ChatResponse, ConvertError> {
    let w: GenerateContentResponse = serde_json::from_slice(body).map_err(ConvertError::not_json)?;
    let mut resp = ChatResponse { usage: w.usage_metadata.map(Usage::from), ..Default::default() };
    let mut calls = 0;
    if let Some(candidate) = w.candidates.into_iter().next() {
        for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
            if let Some(call) = part.function_call {
                let id = call.id.unwrap_or_else(|| generated_call_id(id_seed, calls));
                calls += 1;
                let arguments = call.args.map(|a| a.to_string()).unwrap_or_else(|| "{}".into());
                resp.parts.push(Part::ToolCall(ToolCall { id, name: call.name, arguments }));
            } else if let Some(text) = part.text {
                resp.parts.push(if part.thought == Some(true) {
                    Part::Thinking { text, signature: String::new() }
                } else {
                    Part::Text(text)
                });
            }
        }
        resp.finish = candidate.finish_reason.as_deref().map(|r| decode_finish(r, calls > 0));
    }
    if w.prompt_feedback.and_then(|f| f.block_reason).is_some() {
        resp.finish = Some(FinishReason::ContentFilter);
    }
    Ok(resp)
}

/// Encodes a neutral response as a `generateContent` response body.
pub fn encode_response(resp: &ChatResponse, meta: &ResponseMeta) -> Result<Bytes, ConvertError> {
    let parts = resp
        .parts
        .iter()
        .filter_map(|p| match p {
            Part::Text(t) => Some(WirePart { text: Some(t.clone()), ..Default::default() }),
            Part::Thinking { text, .. } => {
                Some(WirePart { text: Some(text.clone()), thought: Some(true), ..Default::default() })
            }
            Part::ToolCall(c) => Some(call_part(&c.id, &c.name, c.arguments_object())),
            Part::Image(_) | Part::ToolResult(_) => None,
        })
        .collect();
    let w = response(meta, parts, Some(resp.finish.unwrap_or(FinishReason::Stop)), resp.usage.as_ref());
    serde_json::to_vec(&w).map(Bytes::from).map_err(ConvertError::not_json)
}

/// A function call part with the client-visible id, so the client's function response can name it.
fn call_part(id: &str, name: &str, args: Value) -> WirePart {
    WirePart {
        function_call: Some(FunctionCall {
            id: Some(id.to_string()),
            name: name.to_string(),
            args: Some(args),
        }),
        ..Default::default()
    }
}

fn response(
    meta: &ResponseMeta,
    parts: Vec<WirePart>,
    finish: Option<FinishReason>,
    usage: Option<&Usage>,
) -> GenerateContentResponse {
    GenerateContentResponse {
        candidates: vec![Candidate {
            content: Some(WireContent { role: Some("model".into()), parts }),
            finish_reason: finish.map(|f| encode_finish(f).to_string()),
            index: 0,
        }],
        prompt_feedback: None,
        usage_metadata: usage.map(UsageMetadata::from),
        model_version: Some(meta.model.to_string()),
        response_id: Some(meta.id.to_string()),
        error: None,
    }
}

// ---------------------------------------------------------------------------------------------------
// Stream conversion
// ---------------------------------------------------------------------------------------------------

/// Turns `alt=sse` chunks (each a whole `GenerateContentResponse`) into neutral stream events. Gemini
/// has no end marker: [`StreamDecoder::finish`] ends the response when the upstream closes.
#[derive(Debug)]
pub struct StreamDecoder {
    id_seed: String,
    started: bool,
    done: bool,
    calls: usize,
}

impl StreamDecoder {
    /// `id_seed` seeds the ids of function calls that arrive without one.
    pub fn new(id_seed: &str) -> Self {
        StreamDecoder { id_seed: id_seed.to_string(), started: false, done: false, calls: 0 }
    }

    /// Decodes one SSE event; malformed chunks produce nothing.
    pub fn decode(&mut self, ev: &SseEvent, out: &mut Vec<StreamEvent>) {
        let Ok(chunk) = serde_json::from_slice::<GenerateContentResponse>(&ev.data) else { return };
        if let Some(err) = chunk.error {
            let message = err.get("message").and_then(Value::as_str).map(str::to_string);
            out.push(StreamEvent::Error(message.unwrap_or_else(|| err.to_string())));
            return;
        }
        // Usage first: a client stream opening on this chunk can then report the prompt size at once.
        if let Some(u) = chunk.usage_metadata {
            out.push(StreamEvent::Usage(u.into()));
        }
        if !self.started {
            self.started = true;
            out.push(StreamEvent::Start);
        }
        if let Some(candidate) = chunk.candidates.into_iter().next() {
            for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
                self.decode_part(part, out);
            }
            if let Some(reason) = candidate.finish_reason {
                out.push(StreamEvent::Finish(decode_finish(&reason, self.calls > 0)));
            }
        }
        if chunk.prompt_feedback.and_then(|f| f.block_reason).is_some() {
            out.push(StreamEvent::Finish(FinishReason::ContentFilter));
        }
    }

    fn decode_part(&mut self, part: WirePart, out: &mut Vec<StreamEvent>) {
        if let Some(call) = part.function_call {
            let index = self.calls;
            self.calls += 1;
            let id = call.id.unwrap_or_else(|| generated_call_id(&self.id_seed, index));
            out.push(StreamEvent::ToolCallStart { index, id, name: call.name });
            let json = call.args.map(|a| a.to_string()).unwrap_or_else(|| "{}".into());
            out.push(StreamEvent::ToolCallArgs { index, json });
        } else if let Some(text) = part.text.filter(|t| !t.is_empty()) {
            out.push(if part.thought == Some(true) {
                StreamEvent::Thinking(text)
            } else {
                StreamEvent::Text(text)
            });
        }
    }

    /// The upstream closed the stream: ends the response.
    pub fn finish(&mut self, out: &mut Vec<StreamEvent>) {
        if !self.done {
            self.done = true;
            out.push(StreamEvent::Done);
        }
    }
}

#[derive(Debug)]
struct PendingCall {
    index: usize,
    id: String,
    name: String,
    args: String,
}

/// Writes neutral stream events as `alt=sse` chunks: text and thoughts as they arrive, function calls
/// whole (Gemini never splits their arguments) in the final chunk with `finishReason` and
/// `usageMetadata`.
#[derive(Debug)]
pub struct StreamEncoder {
    id: String,
    model: String,
    closed: bool,
    calls: Vec<PendingCall>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
}

impl StreamEncoder {
    pub fn new(meta: &ResponseMeta) -> Self {
        StreamEncoder {
            id: meta.id.to_string(),
            model: meta.model.to_string(),
            closed: false,
            calls: Vec::new(),
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
            StreamEvent::Start | StreamEvent::ThinkingSignature(_) => {}
            StreamEvent::Text(t) => self.chunk(out, WirePart { text: Some(t.clone()), ..Default::default() }),
            StreamEvent::Thinking(t) => {
                self.chunk(out, WirePart { text: Some(t.clone()), thought: Some(true), ..Default::default() })
            }
            StreamEvent::ToolCallStart { index, id, name } => self.calls.push(PendingCall {
                index: *index,
                id: id.clone(),
                name: name.clone(),
                args: String::new(),
            }),
            StreamEvent::ToolCallArgs { index, json } => {
                if let Some(call) = self.calls.iter_mut().find(|c| c.index == *index) {
                    call.args.push_str(json);
                }
            }
            StreamEvent::Finish(reason) => self.finish = Some(*reason),
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Error(message) => {
                self.closed = true;
                let body =
                    serde_json::json!({"error": {"code": 500, "message": message, "status": "INTERNAL"}});
                write_json_event(out, None, &body);
            }
            StreamEvent::Done => {
                self.closed = true;
                let mut parts: Vec<WirePart> = self
                    .calls
                    .iter()
                    .map(|c| {
                        let args = serde_json::from_str::<Value>(&c.args)
                            .ok()
                            .filter(Value::is_object)
                            .unwrap_or_else(|| serde_json::json!({}));
                        call_part(&c.id, &c.name, args)
                    })
                    .collect();
                if parts.is_empty() {
                    parts.push(WirePart { text: Some(String::new()), ..Default::default() });
                }
                let meta = ResponseMeta { model: &self.model, id: &self.id, created: 0 };
                let finish = Some(self.finish.unwrap_or(FinishReason::Stop));
                write_json_event(out, None, &response(&meta, parts, finish, self.usage.as_ref()));
            }
        }
    }

    fn chunk(&self, out: &mut BytesMut, part: WirePart) {
        let meta = ResponseMeta { model: &self.model, id: &self.id, created: 0 };
        write_json_event(out, None, &response(&meta, vec![part], None, None));
    }
}

// ---------------------------------------------------------------------------------------------------
// Error mapping
// ---------------------------------------------------------------------------------------------------

/// The human message of a Gemini error body (`{"error":{"code":…,"message":…,"status":…}}`), if it is one.
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("error")?.get("message")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn meta() -> ResponseMeta<'static> {
        ResponseMeta { model: "gemini-client", id: "req1", created: 0 }
    }

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn decodes_system_roles_function_calls_and_matches_responses_by_name() {
        let req = decode_request(
            br#"{"systemInstruction":{"parts":[{"text":"be kind"}]},
            "contents":[
              {"role":"user","parts":[{"text":"weather in Paris and Rome?"},{"inlineData":{"mimeType":"image/png","data":"iVBO"}}]},
              {"role":"model","parts":[{"functionCall":{"name":"get_weather","args":{"city":"Paris"}}},
                                       {"functionCall":{"name":"get_weather","args":{"city":"Rome"}}}]},
              {"role":"user","parts":[{"functionResponse":{"name":"get_weather","response":{"result":"sunny"}}},
                                      {"functionResponse":{"name":"get_weather","response":{"temp":20}}}]}],
            "generationConfig":{"maxOutputTokens":100,"stopSequences":["x"],"thinkingConfig":{"thinkingBudget":0}},
            "tools":[{"functionDeclarations":[{"name":"get_weather","parameters":{"type":"OBJECT","properties":{"city":{"type":"STRING"}}}}]}],
            "toolConfig":{"functionCallingConfig":{"mode":"ANY","allowedFunctionNames":["get_weather"]}}}"#,
        )
        .unwrap();
        assert_eq!(req.system, "be kind");
        assert_eq!((req.max_tokens, req.thinking), (Some(100), Some(Thinking::Off)));
        assert!(matches!(&req.messages[0].parts[1], Part::Image(_)));
        let ids: Vec<&str> = req.messages[1]
            .parts
            .iter()
            .filter_map(|p| if let Part::ToolCall(c) = p { Some(c.id.as_str()) } else { None })
            .collect();
        assert_eq!(ids, ["call_1_0", "call_1_1"]);
        assert_eq!(
            req.messages[2].parts,
            vec![
                Part::ToolResult(ToolResult {
                    call_id: "call_1_0".into(),
                    name: "get_weather".into(),
                    content: "sunny".into(),
                    is_error: false
                }),
                Part::ToolResult(ToolResult {
                    call_id: "call_1_1".into(),
                    name: "get_weather".into(),
                    content: r#"{"temp":20}"#.into(),
                    is_error: false
                }),
            ]
        );
        assert_eq!(req.tools[0].parameters, json!({"type":"object","properties":{"city":{"type":"string"}}}));
        assert_eq!(req.tool_choice, Some(ToolChoice::Named("get_weather".into())));
    }

    #[test]
    fn encode_names_function_responses_from_the_matching_call() {
        let mut req = ChatRequest { system: "sys".into(), max_tokens: Some(64), ..Default::default() };
        req.push(Role::User, Part::Text("q".into()));
        req.push(
            Role::Assistant,
            Part::ToolCall(ToolCall {
                id: "call_9".into(),
                name: "lookup".into(),
                arguments: r#"{"k":1}"#.into(),
            }),
        );
        req.push(
            Role::User,
            Part::ToolResult(ToolResult {
                call_id: "call_9".into(),
                name: String::new(),
                content: "plain".into(),
                is_error: false,
            }),
        );
        let body = parse(&encode_request(&req).unwrap());
        assert_eq!(
            body,
            json!({
              "systemInstruction":{"parts":[{"text":"sys"}]},
              "generationConfig":{"maxOutputTokens":64},
              "contents":[
                {"role":"user","parts":[{"text":"q"}]},
                {"role":"model","parts":[{"functionCall":{"name":"lookup","args":{"k":1}},"thoughtSignature":"skip_thought_signature_validator"}]},
                {"role":"user","parts":[{"functionResponse":{"name":"lookup","response":{"content":"plain"}}}]}]})
        );
    }

    #[test]
    fn encode_carries_images_tools_thinking_and_json_output() {
        let mut req = ChatRequest {
            thinking: Some(Thinking::On { budget_tokens: Some(2048) }),
            response_format: Some(ResponseFormat::Json),
            tools: vec![Tool { name: "f".into(), description: None, parameters: json!({"type":"object"}) }],
            tool_choice: Some(ToolChoice::Required),
            ..Default::default()
        };
        req.push(
            Role::User,
            Part::Image(Image {
                source: ImageSource::Url { url: "https://x/a.PNG?s=1".into(), media_type: None },
                detail: None,
            }),
        );
        let body = parse(&encode_request(&req).unwrap());
        assert_eq!(
            body["contents"][0]["parts"][0],
            json!({"fileData":{"mimeType":"image/png","fileUri":"https://x/a.PNG?s=1"}})
        );
        assert_eq!(
            body["generationConfig"]["thinkingConfig"],
            json!({"thinkingBudget":2048,"includeThoughts":true})
        );
        assert_eq!(body["generationConfig"]["responseMimeType"], "application/json");
        assert_eq!(
            body["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"],
            json!({"type":"object"})
        );
        assert_eq!(body["toolConfig"], json!({"functionCallingConfig":{"mode":"ANY"}}));
    }

    #[test]
    fn finish_reasons_map_to_neutral_reasons() {
        assert_eq!(decode_finish("STOP", false), FinishReason::Stop);
        assert_eq!(decode_finish("STOP", true), FinishReason::ToolCalls);
        assert_eq!(decode_finish("MAX_TOKENS", false), FinishReason::Length);
        for r in ["SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"] {
            assert_eq!(decode_finish(r, false), FinishReason::ContentFilter);
        }
        assert_eq!(decode_finish("MALFORMED_FUNCTION_CALL", false), FinishReason::Other);
    }

    #[test]
    fn usage_counts_thoughts_as_completion_and_cached_content_as_prompt() {
        let u = response_usage(
            br#"{"usageMetadata":{"promptTokenCount":100,"candidatesTokenCount":20,"thoughtsTokenCount":30,"cachedContentTokenCount":60,"totalTokenCount":150}}"#,
        )
        .unwrap();
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 100,
                completion_tokens: 50,
                total_tokens: 150,
                cached_tokens: 60,
                cache_creation_tokens: 0,
                reasoning_tokens: 30
            }
        );
        let back = serde_json::to_value(UsageMetadata::from(&u)).unwrap();
        assert_eq!(
            back,
            json!({"promptTokenCount":100,"candidatesTokenCount":20,"totalTokenCount":150,"cachedContentTokenCount":60,"thoughtsTokenCount":30})
        );
    }

    #[test]
    fn response_round_trip_generates_call_ids_and_tool_finish() {
        let body = br#"{"candidates":[{"content":{"parts":[{"text":"thinking...","thought":true},
            {"functionCall":{"name":"get_weather","args":{"city":"Paris"}}}],"role":"model"},
            "finishReason":"STOP","index":0}],
            "usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":5,"totalTokenCount":15},
            "modelVersion":"gemini-2.5-flash","responseId":"abc"}"#;
        let resp = decode_response(body, "req 1").unwrap();
        assert_eq!(resp.finish, Some(FinishReason::ToolCalls));
        assert!(matches!(&resp.parts[1], Part::ToolCall(c) if c.id == "call_req1_0"));
        let out = parse(&encode_response(&resp, &meta()).unwrap());
        assert_eq!(out["candidates"][0]["content"]["parts"][0], json!({"text":"thinking...","thought":true}));
        assert_eq!(
            out["candidates"][0]["content"]["parts"][1],
            json!({"functionCall":{"id":"call_req1_0","name":"get_weather","args":{"city":"Paris"}}})
        );
        assert_eq!(out["candidates"][0]["finishReason"], "STOP");
        assert_eq!(
            (out["modelVersion"].clone(), out["responseId"].clone()),
            (json!("gemini-client"), json!("req1"))
        );
    }

    #[test]
    fn blocked_prompts_finish_as_content_filter() {
        let resp = decode_response(br#"{"promptFeedback":{"blockReason":"SAFETY"}}"#, "r").unwrap();
        assert_eq!((resp.parts.len(), resp.finish), (0, Some(FinishReason::ContentFilter)));
    }

    #[test]
    fn stream_decoder_reads_chunks_and_ends_at_finish() {
        let mut sse = crate::sse::SseDecoder::new();
        sse.feed(concat!(
            "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Hel\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 4,\"totalTokenCount\": 4},\"modelVersion\": \"gemini-2.5-flash\"}\r\n\r\n",
            "data: {\"candidates\": [{\"content\": {\"parts\": [{\"functionCall\": {\"name\": \"f\",\"args\": {\"a\": 1}}}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 4,\"candidatesTokenCount\": 6,\"totalTokenCount\": 10}}\r\n\r\n",
        ).as_bytes());
        let mut d = StreamDecoder::new("s");
        let mut out = vec![];
        while let Some(ev) = sse.next_event() {
            d.decode(&ev, &mut out);
        }
        d.finish(&mut out);
        assert_eq!(
            out,
            vec![
                StreamEvent::Usage(Usage { prompt_tokens: 4, total_tokens: 4, ..Default::default() }),
                StreamEvent::Start,
                StreamEvent::Text("Hel".into()),
                StreamEvent::Usage(Usage {
                    prompt_tokens: 4,
                    completion_tokens: 6,
                    total_tokens: 10,
                    ..Default::default()
                }),
                StreamEvent::ToolCallStart { index: 0, id: "call_s_0".into(), name: "f".into() },
                StreamEvent::ToolCallArgs { index: 0, json: "{\"a\":1}".into() },
                StreamEvent::Finish(FinishReason::ToolCalls),
                StreamEvent::Done,
            ]
        );
    }

    #[test]
    fn stream_encoder_sends_whole_calls_with_finish_and_usage_last() {
        let mut enc = StreamEncoder::new(&meta());
        let mut out = BytesMut::new();
        for ev in [
            StreamEvent::Start,
            StreamEvent::Text("Hi".into()),
            StreamEvent::ToolCallStart { index: 0, id: "call_1".into(), name: "f".into() },
            StreamEvent::ToolCallArgs { index: 0, json: "{\"a\":".into() },
            StreamEvent::ToolCallArgs { index: 0, json: "1}".into() },
            StreamEvent::Finish(FinishReason::ToolCalls),
            StreamEvent::Usage(Usage {
                prompt_tokens: 2,
                completion_tokens: 3,
                total_tokens: 5,
                ..Default::default()
            }),
            StreamEvent::Done,
        ] {
            enc.encode(&ev, &mut out);
        }
        let mut sse = crate::sse::SseDecoder::new();
        sse.feed(&out);
        let chunks: Vec<Value> = std::iter::from_fn(|| sse.next_event()).map(|e| parse(&e.data)).collect();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0]["candidates"][0]["content"]["parts"], json!([{"text":"Hi"}]));
        assert_eq!(
            chunks[1]["candidates"][0],
            json!({"content":{"role":"model","parts":[{"functionCall":{"id":"call_1","name":"f","args":{"a":1}}}]},"finishReason":"STOP","index":0})
        );
        assert_eq!(chunks[1]["usageMetadata"]["totalTokenCount"], 5);
    }

    #[test]
    fn error_message_reads_the_error_object() {
        let body = br#"{"error":{"code":400,"message":"API key not valid","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(error_message(body), Some("API key not valid".into()));
    }
}
