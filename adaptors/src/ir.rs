//! The neutral chat representation every protocol converts to and from.
//!
//! Each protocol decodes into these types and encodes from them, so a conversion between any two
//! protocols is one decode and one encode instead of one converter per pair. The types hold only what
//! can be carried across protocols; what one protocol has and the others lack is dropped at decode.
//! Plain data: no I/O, no protocol knowledge beyond the names of the concepts.

use crate::Usage;

/// Who said a message. System prompts are lifted into [`ChatRequest::system`]; tool results travel in
/// user messages, as Anthropic and Gemini carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

/// One turn of the conversation. Consecutive parts of the same role are kept in one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

/// One piece of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Image(Image),
    /// Model reasoning. `signature` is Anthropic's integrity token; empty when the reasoning came from
    /// a protocol without one.
    Thinking {
        text: String,
        signature: String,
    },
    ToolCall(ToolCall),
    ToolResult(ToolResult),
}

/// A function the assistant asked the client to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, exactly as the model produced them.
    pub arguments: String,
}

impl ToolCall {
    /// The arguments as a JSON object; `{}` when they are empty or not an object (a truncated call).
    pub fn arguments_object(&self) -> serde_json::Value {
        match serde_json::from_str::<serde_json::Value>(&self.arguments) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            _ => serde_json::Value::Object(serde_json::Map::new()),
        }
    }
}

/// A tool-call id for a protocol that has none (Gemini): `call_<seed>_<n>`, with the seed reduced to
/// the characters every protocol accepts in an id (`A-Z a-z 0-9 _ -`).
pub fn generated_call_id(seed: &str, n: usize) -> String {
    let seed: String = seed.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-').collect();
    format!("call_{seed}_{n}")
}

/// The client's answer to a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolResult {
    pub call_id: String,
    /// The function's name when the protocol carries it (Gemini matches results by name); empty
    /// otherwise, and then found from the call with the same id.
    pub name: String,
    pub content: String,
    pub is_error: bool,
}

/// An image input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub source: ImageSource,
    /// OpenAI's `detail` (`low`, `high`, `auto`), when given.
    pub detail: Option<String>,
}

/// Where an image's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A remote image; `media_type` when the protocol names it (Gemini `fileData`).
    Url { url: String, media_type: Option<String> },
    /// The image itself, base64-encoded.
    Base64 { media_type: String, data: String },
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub parameters: serde_json::Value,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Named(String),
}

/// Extended reasoning ("thinking") requested by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thinking {
    Off,
    /// On, with a token budget when the client gave one.
    On {
        budget_tokens: Option<u32>,
    },
}

/// Structured output requested by the client.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Json,
    JsonSchema(serde_json::Value),
}

/// A chat request in neutral form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    /// The system prompt; empty when there is none.
    pub system: String,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u32>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub thinking: Option<Thinking>,
    pub response_format: Option<ResponseFormat>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub user: Option<String>,
}

impl ChatRequest {
    /// Appends a part, merging it into the last message when that message has the same role.
    pub fn push(&mut self, role: Role, part: Part) {
        match self.messages.last_mut() {
            Some(last) if last.role == role => last.parts.push(part),
            _ => self.messages.push(Message { role, parts: vec![part] }),
        }
    }

    /// Appends the system prompt text, separating paragraphs with a blank line.
    pub fn push_system(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if !self.system.is_empty() {
            self.system.push_str("\n\n");
        }
        self.system.push_str(text);
    }

    /// The function name of the call with this id, searching the conversation backwards.
    pub fn tool_name_for(&self, call_id: &str) -> Option<&str> {
        self.messages.iter().rev().flat_map(|m| m.parts.iter()).find_map(|p| match p {
            Part::ToolCall(c) if c.id == call_id => Some(c.name.as_str()),
            _ => None,
        })
    }

    /// All text a tokenizer should count for the prompt: system, messages, tool results and calls.
    pub fn prompt_text(&self) -> String {
        let mut out = self.system.clone();
        for part in self.messages.iter().flat_map(|m| m.parts.iter()) {
            let text = match part {
                Part::Text(t) => t.as_str(),
                Part::Thinking { text, .. } => text.as_str(),
                Part::ToolCall(c) => {
                    push_line(&mut out, &c.name);
                    c.arguments.as_str()
                }
                Part::ToolResult(r) => r.content.as_str(),
                Part::Image(_) => continue,
            };
            push_line(&mut out, text);
        }
        for tool in &self.tools {
            push_line(&mut out, &tool.name);
            push_line(&mut out, tool.description.as_deref().unwrap_or_default());
            push_line(&mut out, &tool.parameters.to_string());
        }
        out
    }

    /// The image inputs of the request, in order.
    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.messages.iter().flat_map(|m| m.parts.iter()).filter_map(|p| match p {
            Part::Image(i) => Some(i),
            _ => None,
        })
    }
}

fn push_line(out: &mut String, text: &str) {
    if text.is_empty() {
        return;
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(text);
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Natural end of the turn.
    Stop,
    /// A client stop sequence matched.
    StopSequence,
    /// The output token limit was reached.
    Length,
    /// The model wants tool results.
    ToolCalls,
    /// A safety system stopped or refused the output.
    ContentFilter,
    /// Anything else the provider reported.
    Other,
}

/// A complete (non-stream) response in neutral form: the first choice only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatResponse {
    pub parts: Vec<Part>,
    pub finish: Option<FinishReason>,
    pub usage: Option<Usage>,
}

impl ChatResponse {
    /// The text a tokenizer should count for the completion: text, reasoning and tool calls.
    pub fn completion_text(&self) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Thinking { text, .. } => out.push_str(text),
                Part::ToolCall(c) => {
                    out.push_str(&c.name);
                    out.push_str(&c.arguments);
                }
                Part::Image(_) | Part::ToolResult(_) => {}
            }
        }
        out
    }
}

/// One step of a streamed response in neutral form. Decoders turn provider events into these, encoders
/// turn these into client events; a provider event with no equivalent becomes no event at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// The response has begun (before any content).
    Start,
    Text(String),
    Thinking(String),
    /// Anthropic's signature for the thinking block in progress.
    ThinkingSignature(String),
    /// A tool call begins; `index` counts tool calls from 0 within the response.
    ToolCallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// A fragment of a tool call's JSON arguments.
    ToolCallArgs {
        index: usize,
        json: String,
    },
    Finish(FinishReason),
    /// Usage so far; a later event replaces an earlier one.
    Usage(Usage),
    /// The upstream reported an error inside the stream.
    Error(String),
    /// The upstream ended the response.
    Done,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_merges_consecutive_parts_of_the_same_role() {
        let mut req = ChatRequest::default();
        req.push(Role::User, Part::Text("a".into()));
        req.push(Role::User, Part::Text("b".into()));
        req.push(Role::Assistant, Part::Text("c".into()));
        req.push(Role::User, Part::Text("d".into()));
        let shape: Vec<(Role, usize)> = req.messages.iter().map(|m| (m.role, m.parts.len())).collect();
        assert_eq!(shape, vec![(Role::User, 2), (Role::Assistant, 1), (Role::User, 1)]);
    }

    #[test]
    fn tool_name_for_finds_the_latest_call_with_that_id() {
        let mut req = ChatRequest::default();
        let call = |id: &str, name: &str| {
            Part::ToolCall(ToolCall { id: id.into(), name: name.into(), arguments: "{}".into() })
        };
        req.push(Role::Assistant, call("c0", "old"));
        req.push(Role::User, Part::Text("x".into()));
        req.push(Role::Assistant, call("c0", "new"));
        assert_eq!(req.tool_name_for("c0"), Some("new"));
        assert_eq!(req.tool_name_for("missing"), None);
    }

    #[test]
    fn arguments_object_falls_back_to_an_empty_object() {
        let call = |a: &str| ToolCall { id: "i".into(), name: "f".into(), arguments: a.into() };
        assert_eq!(call(r#"{"a":1}"#).arguments_object(), serde_json::json!({"a": 1}));
        assert_eq!(call("").arguments_object(), serde_json::json!({}));
        assert_eq!(call(r#"{"a":"#).arguments_object(), serde_json::json!({}));
    }

    #[test]
    fn generated_call_ids_keep_only_safe_characters() {
        assert_eq!(generated_call_id("req/1 x", 2), "call_req1x_2");
    }

    #[test]
    fn prompt_text_joins_system_messages_and_tools() {
        let mut req = ChatRequest { system: "be brief".into(), ..Default::default() };
        req.push(Role::User, Part::Text("hello".into()));
        req.tools.push(Tool { name: "f".into(), description: None, parameters: serde_json::json!({}) });
        assert_eq!(req.prompt_text(), "be brief\nhello\nf\n{}");
    }
}
