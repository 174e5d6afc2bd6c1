//! End-to-end tests of the three client protocols (OpenAI Chat Completions, Anthropic Messages,
//! Gemini generateContent) against channels of each type (`openai`, `anthropic`, `gemini`): the real
//! `burncloud` binary in front of the project's mock upstream, which answers in the channel's protocol.
//!
//! For all nine (client × channel) combinations, whole and streamed: the response is valid in the
//! client's protocol, the mock's text arrives unchanged, the upstream request is in the channel's
//! protocol with the channel's credentials, and the consume log holds exactly the mock's token counts.
//! Tool calls go round trip: the client defines a tool, the mock calls it, the client receives the call
//! in its own shape and answers with a tool result, which reaches the upstream in the channel's shape.
//! Errors come in the client's shape. Finally the official `anthropic` and `google-genai` Python SDKs
//! run against the gateway (`tests/python/`).

// The fixtures and assertion helpers below fail their test the same way the tests themselves do.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use burncloud_tests::harness::{
    ANTHROPIC_VERSION, ApiKey, CHANNEL_KEY, Gateway, GatewayOptions, HttpRequest, Mock, MockRequest,
    Response, gemini_path, pause, workspace_dir,
};
use burncloud_tests::mock::openai::generated_text;
use serde_json::{Value, json};

// ---------------------------------------------------------------- fixtures

/// The model every channel serves and every client asks for.
const MODEL: &str = "model-x";
/// The mock's usage numbers: distinct from anything the gateway could count locally.
const PROMPT_TOKENS: i64 = 17;
const COMPLETION_TOKENS: i64 = 9;
const CHUNKS: usize = 3;
const TOOL_RESULT: &str = "18C and sunny";

/// A protocol, as a client speaks it or as a channel's upstream answers in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Proto {
    const ALL: [Proto; 3] = [Proto::OpenAi, Proto::Anthropic, Proto::Gemini];

    fn channel_type(self) -> &'static str {
        match self {
            Proto::OpenAi => "openai",
            Proto::Anthropic => "anthropic",
            Proto::Gemini => "gemini",
        }
    }

    /// The finish reason this protocol reports for a plain answer and for a tool call.
    fn finish(self, tool: bool) -> &'static str {
        match (self, tool) {
            (Proto::OpenAi, false) => "stop",
            (Proto::OpenAi, true) => "tool_calls",
            (Proto::Anthropic, false) => "end_turn",
            (Proto::Anthropic, true) => "tool_use",
            (Proto::Gemini, _) => "STOP",
        }
    }
}

/// A mock answering in the channel's protocol, a gateway with one channel of that type serving
/// [`MODEL`], one user and one key.
struct Setup {
    mock: Mock,
    gw: Gateway,
    channel: i64,
    key: ApiKey,
}

fn setup(channel: Proto) -> Setup {
    let mock = Mock::start(&[
        "--prompt-tokens",
        &PROMPT_TOKENS.to_string(),
        "--completion-tokens",
        &COMPLETION_TOKENS.to_string(),
        "--chunks",
        &CHUNKS.to_string(),
    ]);
    let gw = Gateway::start(GatewayOptions::new());
    let channel = gw.create_channel(json!({
        "type": channel.channel_type(), "base_url": mock.base_url(), "models": MODEL,
    }));
    let user = gw.create_user(json!({}));
    let key = gw.create_token(user, json!({}));
    Setup { mock, gw, channel, key }
}

/// The text the mock answers with.
fn mock_text() -> String {
    generated_text(COMPLETION_TOKENS as u64)
}

// ---------------------------------------------------------------- conversations

/// The tool every tool round defines.
fn weather_schema() -> Value {
    json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
}

fn weather_args() -> Value {
    json!({"city": "Paris"})
}

/// What the client sends.
#[derive(Debug, Clone)]
enum Turn {
    /// One user message, no tools.
    Hello,
    /// One user message with the weather tool defined.
    AskWeather,
    /// The weather question, the assistant's call (as the client received it) and the tool's result.
    AnswerWeather(ToolCall),
}

const QUESTION: &str = "What is the weather in Paris?";

fn request_body(client: Proto, turn: &Turn, stream: bool) -> Value {
    let tools = !matches!(turn, Turn::Hello);
    let question = if tools { QUESTION } else { "Say hello" };
    match client {
        Proto::OpenAi => {
            let mut messages = vec![json!({"role": "user", "content": question})];
            if let Turn::AnswerWeather(call) = turn {
                let id = call.id.clone().unwrap_or_default();
                messages.push(json!({"role": "assistant", "content": null, "tool_calls": [{
                    "id": id, "type": "function",
                    "function": {"name": call.name, "arguments": call.args.to_string()},
                }]}));
                messages.push(json!({"role": "tool", "tool_call_id": id, "content": TOOL_RESULT}));
            }
            let mut body = json!({"model": MODEL, "messages": messages});
            if tools {
                body["tools"] = json!([{"type": "function", "function": {
                    "name": "get_weather", "description": "Current weather of a city",
                    "parameters": weather_schema(),
                }}]);
            }
            if stream {
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
            }
            body
        }
        Proto::Anthropic => {
            let mut messages = vec![json!({"role": "user", "content": question})];
            if let Turn::AnswerWeather(call) = turn {
                let id = call.id.clone().unwrap_or_default();
                messages.push(json!({"role": "assistant", "content": [
                    {"type": "tool_use", "id": id, "name": call.name, "input": call.args},
                ]}));
                messages.push(json!({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": id, "content": TOOL_RESULT},
                ]}));
            }
            let mut body = json!({"model": MODEL, "max_tokens": 256, "messages": messages});
            if tools {
                body["tools"] = json!([{
                    "name": "get_weather", "description": "Current weather of a city",
                    "input_schema": weather_schema(),
                }]);
            }
            if stream {
                body["stream"] = json!(true);
            }
            body
        }
        Proto::Gemini => {
            let mut contents = vec![json!({"role": "user", "parts": [{"text": question}]})];
            if let Turn::AnswerWeather(call) = turn {
                let mut function_call = json!({"name": call.name, "args": call.args});
                let mut function_response = json!({"name": call.name, "response": {"result": TOOL_RESULT}});
                if let Some(id) = &call.id {
                    function_call["id"] = json!(id);
                    function_response["id"] = json!(id);
                }
                contents.push(json!({"role": "model", "parts": [{"functionCall": function_call}]}));
                contents.push(json!({"role": "user", "parts": [{"functionResponse": function_response}]}));
            }
            let mut body = json!({"contents": contents});
            if tools {
                body["tools"] = json!([{"functionDeclarations": [{
                    "name": "get_weather", "description": "Current weather of a city",
                    "parameters": weather_schema(),
                }]}]);
            }
            body
        }
    }
}

/// Sends `turn` as `client` would, with the client protocol's usual credential header.
fn send(s: &Setup, client: Proto, turn: &Turn, stream: bool) -> Response {
    let body = request_body(client, turn, stream);
    match client {
        Proto::OpenAi => s.gw.chat(&s.key.key, &body),
        Proto::Anthropic => s.gw.messages(&s.key.key, &body),
        Proto::Gemini => s.gw.generate_content(&s.key.key, MODEL, stream, &body),
    }
}

// ---------------------------------------------------------------- reading replies

/// A tool call as the client received it.
#[derive(Debug, Clone, PartialEq)]
struct ToolCall {
    /// Gemini calls may come without one.
    id: Option<String>,
    name: String,
    args: Value,
}

/// A reply in neutral terms, after checking it is valid in the client's protocol.
#[derive(Debug, Default)]
struct Reply {
    text: String,
    calls: Vec<ToolCall>,
    /// As the client's protocol spells it.
    finish: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    request_id: String,
}

fn int(v: &Value, what: &str, body: &dyn std::fmt::Display) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("{what} is not an integer ({v}) in {body}"))
}

fn string<'a>(v: &'a Value, what: &str, body: &dyn std::fmt::Display) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what} is not a string ({v}) in {body}"))
}

fn json_object(text: &str, what: &str) -> Value {
    let v: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {text:?}"));
    assert!(v.is_object(), "{what} is not a JSON object: {text}");
    v
}

/// Checks `resp` is a successful reply valid in `client`'s protocol (whole or streamed) and reads it.
fn read_reply(client: Proto, resp: &Response, stream: bool) -> Reply {
    assert_eq!(resp.status, 200, "{client:?} client: HTTP {}: {}", resp.status, resp.text());
    let content_type = resp.header("content-type").unwrap_or_default();
    let mut reply = if stream {
        assert!(content_type.starts_with("text/event-stream"), "stream content-type {content_type:?}");
        match client {
            Proto::OpenAi => read_openai_stream(resp),
            Proto::Anthropic => read_anthropic_stream(resp),
            Proto::Gemini => read_gemini_stream(resp),
        }
    } else {
        assert!(content_type.starts_with("application/json"), "content-type {content_type:?}");
        let v = resp.json();
        match client {
            Proto::OpenAi => read_openai(&v),
            Proto::Anthropic => read_anthropic(&v),
            Proto::Gemini => read_gemini(&v),
        }
    };
    let id = resp.header("x-request-id").unwrap_or_else(|| panic!("no x-request-id in {:?}", resp.headers));
    reply.request_id = id.to_string();
    reply
}

fn read_openai(v: &Value) -> Reply {
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert!(!string(&v["id"], "id", v).is_empty(), "{v}");
    assert_eq!(v["model"], MODEL, "the client sees another model name: {v}");
    let choices = v["choices"].as_array().unwrap_or_else(|| panic!("no choices: {v}"));
    assert_eq!(choices.len(), 1, "{v}");
    let message = &choices[0]["message"];
    assert_eq!(message["role"], "assistant", "{v}");
    let mut reply = Reply {
        text: message["content"].as_str().unwrap_or_default().to_string(),
        finish: string(&choices[0]["finish_reason"], "finish_reason", v).to_string(),
        ..Reply::default()
    };
    assert!(message["content"].is_string() || message["content"].is_null(), "content: {v}");
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        assert_eq!(call["type"], "function", "{v}");
        let id = string(&call["id"], "tool call id", v);
        assert!(!id.is_empty(), "empty tool call id: {v}");
        reply.calls.push(ToolCall {
            id: Some(id.to_string()),
            name: string(&call["function"]["name"], "function name", v).to_string(),
            args: json_object(string(&call["function"]["arguments"], "arguments", v), "arguments"),
        });
    }
    let usage = &v["usage"];
    reply.prompt_tokens = int(&usage["prompt_tokens"], "usage.prompt_tokens", v);
    reply.completion_tokens = int(&usage["completion_tokens"], "usage.completion_tokens", v);
    assert_eq!(
        int(&usage["total_tokens"], "usage.total_tokens", v),
        reply.prompt_tokens + reply.completion_tokens
    );
    reply
}

fn read_openai_stream(resp: &Response) -> Reply {
    let events = resp.sse_events();
    let body = resp.text();
    assert!(events.iter().all(|e| e.complete && e.event.is_none()), "OpenAI events are unnamed: {body}");
    assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"), "no final [DONE]: {body}");
    let mut reply = Reply::default();
    let mut finishes = Vec::new();
    let mut usage = None;
    let mut calls: Vec<(Option<String>, String, String)> = Vec::new();
    for (k, e) in events[..events.len() - 1].iter().enumerate() {
        let v = e.json();
        assert_eq!(v["object"], "chat.completion.chunk", "event {k}: {v}");
        assert_eq!(v["model"], MODEL, "event {k}: {v}");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            assert!(usage.is_none(), "usage reported twice: {body}");
            usage = Some(u.clone());
        }
        let choices = v["choices"].as_array().unwrap_or_else(|| panic!("event {k} has no choices: {v}"));
        for choice in choices {
            let delta = &choice["delta"];
            if let Some(t) = delta["content"].as_str() {
                reply.text.push_str(t);
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let index =
                    call["index"].as_u64().unwrap_or_else(|| panic!("tool call delta without index: {v}"));
                let index = index as usize;
                if index == calls.len() {
                    calls.push((None, String::new(), String::new()));
                }
                let entry = calls.get_mut(index).unwrap_or_else(|| panic!("tool call index skips: {v}"));
                if let Some(id) = call["id"].as_str() {
                    entry.0 = Some(id.to_string());
                }
                if let Some(name) = call["function"]["name"].as_str() {
                    entry.1.push_str(name);
                }
                if let Some(args) = call["function"]["arguments"].as_str() {
                    entry.2.push_str(args);
                }
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                finishes.push(f.to_string());
            }
        }
    }
    assert_eq!(finishes.len(), 1, "expected one finish_reason, got {finishes:?}: {body}");
    reply.finish = finishes.remove(0);
    for (id, name, args) in calls {
        assert!(id.as_ref().is_some_and(|i| !i.is_empty()), "streamed tool call without id: {body}");
        reply.calls.push(ToolCall { id, name, args: json_object(&args, "streamed arguments") });
    }
    let usage = usage.unwrap_or_else(|| panic!("no usage chunk although include_usage was set: {body}"));
    reply.prompt_tokens = int(&usage["prompt_tokens"], "usage.prompt_tokens", &usage);
    reply.completion_tokens = int(&usage["completion_tokens"], "usage.completion_tokens", &usage);
    reply
}

fn read_anthropic(v: &Value) -> Reply {
    assert_eq!(v["type"], "message", "{v}");
    assert_eq!(v["role"], "assistant", "{v}");
    assert!(!string(&v["id"], "id", v).is_empty(), "{v}");
    assert_eq!(v["model"], MODEL, "the client sees another model name: {v}");
    let mut reply =
        Reply { finish: string(&v["stop_reason"], "stop_reason", v).to_string(), ..Reply::default() };
    for block in v["content"].as_array().unwrap_or_else(|| panic!("no content array: {v}")) {
        match string(&block["type"], "block type", v) {
            "text" => reply.text.push_str(string(&block["text"], "text", v)),
            "tool_use" => {
                assert!(block["input"].is_object(), "tool_use input is not an object: {v}");
                reply.calls.push(ToolCall {
                    id: Some(string(&block["id"], "tool_use id", v).to_string()),
                    name: string(&block["name"], "tool_use name", v).to_string(),
                    args: block["input"].clone(),
                });
            }
            other => panic!("unexpected content block {other}: {v}"),
        }
    }
    reply.prompt_tokens = int(&v["usage"]["input_tokens"], "usage.input_tokens", v);
    reply.completion_tokens = int(&v["usage"]["output_tokens"], "usage.output_tokens", v);
    reply
}

/// The content block an Anthropic stream is in: its index, its type, and for a `tool_use` block the
/// call with its input JSON so far.
type OpenBlock = (u64, String, Option<(ToolCall, String)>);

/// Checks Anthropic's event grammar: `message_start`, then blocks (`content_block_start`, deltas of the
/// block's kind, `content_block_stop`, indexes counting from 0), `message_delta`, `message_stop`; every
/// event named as its data's `type`; `ping` allowed anywhere. Usage as the SDKs accumulate it: the
/// start's, overridden by what `message_delta` reports.
fn read_anthropic_stream(resp: &Response) -> Reply {
    let body = resp.text();
    let events: Vec<(String, Value)> = resp
        .sse_events()
        .into_iter()
        .map(|e| {
            assert!(e.complete, "cut-off event: {body}");
            let name =
                e.event.clone().unwrap_or_else(|| panic!("unnamed Anthropic event {:?}: {body}", e.data));
            let v = e.json();
            assert_eq!(v["type"], name.as_str(), "event name and data type differ: {body}");
            (name, v)
        })
        .filter(|(name, _)| name != "ping")
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{names:?}");
    assert_eq!(&names[names.len().saturating_sub(2)..], ["message_delta", "message_stop"], "{names:?}");
    let start = &events[0].1["message"];
    assert_eq!(
        (start["type"].as_str(), start["role"].as_str()),
        (Some("message"), Some("assistant")),
        "{body}"
    );
    assert_eq!(start["model"], MODEL, "{body}");
    let mut reply = Reply::default();
    let mut usage = start["usage"].clone();
    let mut open: Option<OpenBlock> = None;
    let mut next_index = 0;
    for (name, v) in &events[1..events.len() - 2] {
        match name.as_str() {
            "content_block_start" => {
                assert!(open.is_none(), "a block starts before the previous one stopped: {names:?}");
                let index = v["index"].as_u64().unwrap_or_else(|| panic!("no index: {v}"));
                assert_eq!(index, next_index, "block indexes must count from 0: {body}");
                next_index += 1;
                let block = &v["content_block"];
                let kind = string(&block["type"], "content_block.type", v).to_string();
                let call = (kind == "tool_use").then(|| {
                    let call = ToolCall {
                        id: Some(string(&block["id"], "tool_use id", v).to_string()),
                        name: string(&block["name"], "tool_use name", v).to_string(),
                        args: Value::Null,
                    };
                    (call, String::new())
                });
                if kind == "text" {
                    reply.text.push_str(block["text"].as_str().unwrap_or_default());
                }
                open = Some((index, kind, call));
            }
            "content_block_delta" => {
                let (index, kind, call) =
                    open.as_mut().unwrap_or_else(|| panic!("delta outside a block: {body}"));
                assert_eq!(v["index"].as_u64(), Some(*index), "delta for another block: {v}");
                let delta = &v["delta"];
                match (kind.as_str(), delta["type"].as_str()) {
                    ("text", Some("text_delta")) => reply.text.push_str(string(&delta["text"], "text", v)),
                    ("tool_use", Some("input_json_delta")) => {
                        if let Some((_, json)) = call.as_mut() {
                            json.push_str(string(&delta["partial_json"], "partial_json", v));
                        }
                    }
                    ("thinking", Some("thinking_delta" | "signature_delta")) => {}
                    (kind, other) => panic!("delta {other:?} in a {kind} block: {body}"),
                }
            }
            "content_block_stop" => {
                let (index, _, call) = open.take().unwrap_or_else(|| panic!("stop outside a block: {body}"));
                assert_eq!(v["index"].as_u64(), Some(index), "stop for another block: {v}");
                if let Some((mut call, json)) = call {
                    call.args = if json.is_empty() { json!({}) } else { json_object(&json, "tool input") };
                    reply.calls.push(call);
                }
            }
            other => panic!("unexpected event {other} between message_start and message_delta: {names:?}"),
        }
    }
    assert!(open.is_none(), "a block never stopped: {names:?}");
    let delta = &events[events.len() - 2].1;
    reply.finish = string(&delta["delta"]["stop_reason"], "message_delta stop_reason", delta).to_string();
    if let (Some(u), Some(later)) = (usage.as_object_mut(), delta["usage"].as_object()) {
        u.extend(later.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())));
    }
    reply.prompt_tokens = int(&usage["input_tokens"], "input_tokens", &body);
    reply.completion_tokens = int(&usage["output_tokens"], "output_tokens", &body);
    reply
}

/// Reads the candidate's parts into `reply`; returns whether the chunk carried a finish reason.
fn read_gemini_candidate(v: &Value, reply: &mut Reply) -> bool {
    let candidates = v["candidates"].as_array().unwrap_or_else(|| panic!("no candidates: {v}"));
    assert_eq!(candidates.len(), 1, "{v}");
    let candidate = &candidates[0];
    let content = &candidate["content"];
    if !content.is_null() {
        assert_eq!(content["role"], "model", "{v}");
        for part in content["parts"].as_array().unwrap_or_else(|| panic!("no parts: {v}")) {
            if let Some(call) = part.get("functionCall") {
                assert!(call["args"].is_object(), "functionCall args not an object: {v}");
                reply.calls.push(ToolCall {
                    id: call["id"].as_str().map(str::to_string),
                    name: string(&call["name"], "functionCall name", v).to_string(),
                    args: call["args"].clone(),
                });
            } else if let Some(text) = part.get("text") {
                if part["thought"] != json!(true) {
                    reply.text.push_str(string(text, "text", v));
                }
            } else {
                panic!("unexpected part {part}: {v}");
            }
        }
    }
    match candidate.get("finishReason") {
        Some(f) if !f.is_null() => {
            reply.finish = string(f, "finishReason", v).to_string();
            true
        }
        _ => false,
    }
}

fn read_gemini_usage(u: &Value, reply: &mut Reply) {
    reply.prompt_tokens = int(&u["promptTokenCount"], "promptTokenCount", u);
    reply.completion_tokens = int(&u["candidatesTokenCount"], "candidatesTokenCount", u);
    assert_eq!(
        int(&u["totalTokenCount"], "totalTokenCount", u),
        reply.prompt_tokens + reply.completion_tokens
    );
}

fn read_gemini(v: &Value) -> Reply {
    let mut reply = Reply::default();
    assert!(read_gemini_candidate(v, &mut reply), "no finishReason: {v}");
    read_gemini_usage(&v["usageMetadata"], &mut reply);
    reply
}

fn read_gemini_stream(resp: &Response) -> Reply {
    let body = resp.text();
    let events = resp.sse_events();
    assert!(!events.is_empty(), "empty stream");
    assert!(
        events.iter().all(|e| e.complete && e.event.is_none()),
        "Gemini events are unnamed `data:` only: {body}"
    );
    let mut reply = Reply::default();
    let mut usage = None;
    let mut finished = false;
    for e in &events {
        assert!(!finished, "a chunk after the one with finishReason: {body}");
        let v = e.json();
        assert!(v.get("error").is_none(), "an error chunk: {body}");
        finished = read_gemini_candidate(&v, &mut reply);
        if let Some(u) = v.get("usageMetadata").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
    }
    assert!(finished, "no chunk with finishReason: {body}");
    read_gemini_usage(&usage.unwrap_or_else(|| panic!("no usageMetadata: {body}")), &mut reply);
    reply
}

// ---------------------------------------------------------------- the upstream side

/// The last request the mock received, checked to be in the channel's protocol, with the channel's
/// key (never the client's) and the stream flag the client asked for.
fn upstream_request(s: &Setup, channel: Proto, stream: bool) -> MockRequest {
    let seen = s.mock.requests();
    let req = seen.last().cloned().expect("the mock saw no request");
    let headers = req.0["headers"].to_string();
    assert!(!headers.contains(&s.key.key), "the client's key reached the upstream: {headers}");
    let body = req.json();
    match channel {
        Proto::OpenAi => {
            assert_eq!(req.path(), "/v1/chat/completions", "{:?}", req.0);
            assert_eq!(req.header("authorization"), Some(format!("Bearer {CHANNEL_KEY}")), "{headers}");
            assert_eq!(body["model"], MODEL, "{body}");
            assert!(body["messages"].is_array(), "{body}");
            assert_eq!(body["stream"].as_bool().unwrap_or(false), stream, "{body}");
            if stream {
                assert_eq!(body["stream_options"]["include_usage"], true, "usage must be asked for: {body}");
            }
        }
        Proto::Anthropic => {
            assert_eq!(req.path(), "/v1/messages", "{:?}", req.0);
            assert_eq!(req.header("x-api-key").as_deref(), Some(CHANNEL_KEY), "{headers}");
            assert!(req.header("anthropic-version").is_some(), "no anthropic-version: {headers}");
            assert_eq!(body["model"], MODEL, "{body}");
            assert!(body["max_tokens"].as_u64().is_some_and(|n| n > 0), "Anthropic needs max_tokens: {body}");
            assert!(body["messages"].is_array(), "{body}");
            assert_eq!(body["stream"].as_bool().unwrap_or(false), stream, "{body}");
        }
        Proto::Gemini => {
            let action = if stream { "streamGenerateContent" } else { "generateContent" };
            assert_eq!(req.path(), format!("/v1beta/models/{MODEL}:{action}"), "{:?}", req.0);
            if stream {
                assert_eq!(req.0["query"], "alt=sse", "{:?}", req.0);
            }
            assert_eq!(req.header("x-goog-api-key").as_deref(), Some(CHANNEL_KEY), "{headers}");
            assert!(body["contents"].is_array(), "{body}");
        }
    }
    req
}

/// Checks the upstream request defines the weather tool in the channel's protocol.
fn assert_tool_defined(channel: Proto, body: &Value) {
    let (name, schema) = match channel {
        Proto::OpenAi => {
            assert_eq!(body["tools"][0]["type"], "function", "{body}");
            (&body["tools"][0]["function"]["name"], &body["tools"][0]["function"]["parameters"])
        }
        Proto::Anthropic => (&body["tools"][0]["name"], &body["tools"][0]["input_schema"]),
        Proto::Gemini => {
            let f = &body["tools"][0]["functionDeclarations"][0];
            let schema = if f["parametersJsonSchema"].is_object() {
                &f["parametersJsonSchema"]
            } else {
                &f["parameters"]
            };
            (&f["name"], schema)
        }
    };
    assert_eq!(name, "get_weather", "the tool is not defined upstream: {body}");
    assert!(schema["properties"]["city"].is_object(), "the tool's schema is lost upstream: {body}");
}

/// Whether any string inside `v` contains `needle`.
fn contains_text(v: &Value, needle: &str) -> bool {
    match v {
        Value::String(s) => s.contains(needle),
        Value::Array(a) => a.iter().any(|x| contains_text(x, needle)),
        Value::Object(o) => o.values().any(|x| contains_text(x, needle)),
        _ => false,
    }
}

/// Checks the upstream request carries the assistant's weather call and the tool's result, linked to
/// each other, in the channel's protocol.
fn assert_tool_result_forwarded(channel: Proto, body: &Value) {
    match channel {
        Proto::OpenAi => {
            let messages = body["messages"].as_array().unwrap();
            let call = messages
                .iter()
                .filter(|m| m["role"] == "assistant")
                .find_map(|m| m["tool_calls"].get(0))
                .unwrap_or_else(|| panic!("no assistant tool call upstream: {body}"));
            assert_eq!(call["function"]["name"], "get_weather", "{body}");
            let args =
                json_object(call["function"]["arguments"].as_str().unwrap_or_default(), "upstream arguments");
            assert_eq!(args, weather_args(), "{body}");
            let id = call["id"]
                .as_str()
                .filter(|i| !i.is_empty())
                .unwrap_or_else(|| panic!("call without id: {body}"));
            let result = messages
                .iter()
                .find(|m| m["role"] == "tool")
                .unwrap_or_else(|| panic!("no tool message upstream: {body}"));
            assert_eq!(result["tool_call_id"], id, "the result does not answer the call: {body}");
            assert!(contains_text(&result["content"], TOOL_RESULT), "the result text is lost: {body}");
        }
        Proto::Anthropic => {
            let messages = body["messages"].as_array().unwrap();
            let blocks = |role: &str| -> Vec<Value> {
                messages
                    .iter()
                    .filter(|m| m["role"] == role)
                    .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
                    .collect()
            };
            let call = blocks("assistant")
                .into_iter()
                .find(|b| b["type"] == "tool_use")
                .unwrap_or_else(|| panic!("no tool_use upstream: {body}"));
            assert_eq!((&call["name"], &call["input"]), (&json!("get_weather"), &weather_args()), "{body}");
            let result = blocks("user")
                .into_iter()
                .find(|b| b["type"] == "tool_result")
                .unwrap_or_else(|| panic!("no tool_result upstream: {body}"));
            assert_eq!(result["tool_use_id"], call["id"], "the result does not answer the call: {body}");
            assert!(contains_text(&result["content"], TOOL_RESULT), "the result text is lost: {body}");
        }
        Proto::Gemini => {
            let parts: Vec<(Value, Value)> = body["contents"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|c| {
                    let role = c["role"].clone();
                    c["parts"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |p| (role.clone(), p))
                })
                .collect();
            let call = parts
                .iter()
                .find(|(role, p)| role == "model" && p.get("functionCall").is_some())
                .map(|(_, p)| &p["functionCall"])
                .unwrap_or_else(|| panic!("no model functionCall upstream: {body}"));
            assert_eq!((&call["name"], &call["args"]), (&json!("get_weather"), &weather_args()), "{body}");
            let response = parts
                .iter()
                .find(|(role, p)| role != "model" && p.get("functionResponse").is_some())
                .map(|(_, p)| &p["functionResponse"])
                .unwrap_or_else(|| panic!("no functionResponse upstream: {body}"));
            assert_eq!(response["name"], "get_weather", "{body}");
            assert!(contains_text(&response["response"], TOOL_RESULT), "the result text is lost: {body}");
        }
    }
}

// ---------------------------------------------------------------- billing

/// The consume log of `reply`, waiting briefly for it to be written.
fn consume_log(gw: &Gateway, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = gw.logs("type=2");
        if let Some(log) = logs.iter().find(|l| l["request_id"] == json!(request_id)) {
            return log.clone();
        }
        assert!(Instant::now() < deadline, "no consume log with request_id {request_id}; logs: {logs:?}");
        pause(Duration::from_millis(50));
    }
}

fn assert_billed_exactly(s: &Setup, reply: &Reply, stream: bool) {
    assert_eq!(
        (reply.prompt_tokens, reply.completion_tokens),
        (PROMPT_TOKENS, COMPLETION_TOKENS),
        "the client sees other usage than the upstream reported"
    );
    let log = consume_log(&s.gw, &reply.request_id);
    assert_eq!(
        (log["prompt_tokens"].as_i64(), log["completion_tokens"].as_i64()),
        (Some(PROMPT_TOKENS), Some(COMPLETION_TOKENS)),
        "the consume log does not hold the upstream's usage: {log}"
    );
    assert_eq!(log["is_stream"], stream, "{log}");
    assert_eq!(log["model_name"], MODEL, "{log}");
    assert_eq!(log["channel_id"], s.channel, "{log}");
}

// ---------------------------------------------------------------- the rounds

/// A plain question: valid reply, the mock's text, the channel's protocol upstream, exact billing.
fn text_round(client: Proto, channel: Proto, stream: bool) {
    let s = setup(channel);
    let resp = send(&s, client, &Turn::Hello, stream);
    let reply = read_reply(client, &resp, stream);
    assert_eq!(reply.text, mock_text(), "the mock's text did not arrive unchanged");
    assert!(reply.calls.is_empty(), "{reply:?}");
    assert_eq!(reply.finish, client.finish(false));
    upstream_request(&s, channel, stream);
    assert_billed_exactly(&s, &reply, stream);
}

/// A tool round trip: the call reaches the client in its shape, the result reaches the upstream in
/// the channel's; both requests are billed exactly.
fn tool_round(client: Proto, channel: Proto, stream: bool) {
    let s = setup(channel);
    s.mock.behave(json!({"tool_call": {"name": "get_weather", "arguments": weather_args()}, "times": 1}));

    let resp = send(&s, client, &Turn::AskWeather, stream);
    let reply = read_reply(client, &resp, stream);
    assert_eq!(reply.calls.len(), 1, "expected one tool call: {reply:?}\n{}", resp.text());
    let call = reply.calls[0].clone();
    assert_eq!((call.name.as_str(), &call.args), ("get_weather", &weather_args()), "{reply:?}");
    assert_eq!(reply.finish, client.finish(true), "{}", resp.text());
    assert!(reply.text.is_empty(), "text beside the call: {reply:?}");
    let upstream = upstream_request(&s, channel, stream);
    assert_tool_defined(channel, &upstream.json());
    assert_billed_exactly(&s, &reply, stream);

    let resp = send(&s, client, &Turn::AnswerWeather(call), stream);
    let answer = read_reply(client, &resp, stream);
    assert_eq!(answer.text, mock_text(), "{answer:?}");
    assert_eq!(answer.finish, client.finish(false));
    let upstream = upstream_request(&s, channel, stream);
    assert_tool_defined(channel, &upstream.json());
    assert_tool_result_forwarded(channel, &upstream.json());
    assert_billed_exactly(&s, &answer, stream);
}

macro_rules! combinations {
    ($($name:ident: $client:ident on $channel:ident;)*) => {$(
        mod $name {
            use super::*;

            #[test]
            fn text() {
                text_round(Proto::$client, Proto::$channel, false);
            }

            #[test]
            fn text_stream() {
                text_round(Proto::$client, Proto::$channel, true);
            }

            #[test]
            fn tool_round() {
                super::tool_round(Proto::$client, Proto::$channel, false);
            }

            #[test]
            fn tool_round_stream() {
                super::tool_round(Proto::$client, Proto::$channel, true);
            }
        }
    )*};
}

combinations! {
    openai_client_on_openai_channel: OpenAi on OpenAi;
    openai_client_on_anthropic_channel: OpenAi on Anthropic;
    openai_client_on_gemini_channel: OpenAi on Gemini;
    anthropic_client_on_openai_channel: Anthropic on OpenAi;
    anthropic_client_on_anthropic_channel: Anthropic on Anthropic;
    anthropic_client_on_gemini_channel: Anthropic on Gemini;
    gemini_client_on_openai_channel: Gemini on OpenAi;
    gemini_client_on_anthropic_channel: Gemini on Anthropic;
    gemini_client_on_gemini_channel: Gemini on Gemini;
}

// ---------------------------------------------------------------- credentials and errors

/// Checks an Anthropic error body of `status` with `error.type` `kind` (any when `None`).
fn assert_anthropic_error(resp: &Response, status: u16, kind: Option<&str>) {
    assert_eq!(resp.status, status, "expected HTTP {status}, got {}: {}", resp.status, resp.text());
    let v = resp.json();
    assert_eq!(v["type"], "error", "not an Anthropic error: {v}");
    let t = string(&v["error"]["type"], "error.type", &v);
    if let Some(kind) = kind {
        assert_eq!(t, kind, "{v}");
    }
    assert!(!string(&v["error"]["message"], "error.message", &v).is_empty(), "{v}");
}

/// Checks a Gemini error body of `status` with `error.status` `name` (any when `None`).
fn assert_gemini_error(resp: &Response, status: u16, name: Option<&str>) {
    assert_eq!(resp.status, status, "expected HTTP {status}, got {}: {}", resp.status, resp.text());
    let v = resp.json();
    assert_eq!(v["error"]["code"], status, "not a Gemini error: {v}");
    let s = string(&v["error"]["status"], "error.status", &v);
    if let Some(name) = name {
        assert_eq!(s, name, "{v}");
    }
    assert!(!string(&v["error"]["message"], "error.message", &v).is_empty(), "{v}");
}

fn assert_error_in(client: Proto, resp: &Response, status: u16) {
    match client {
        Proto::OpenAi => {
            assert_eq!(resp.status, status, "expected HTTP {status}, got {}: {}", resp.status, resp.text());
            resp.error_code();
        }
        Proto::Anthropic => assert_anthropic_error(resp, status, None),
        Proto::Gemini => assert_gemini_error(resp, status, None),
    }
}

#[test]
fn a_bad_or_missing_key_gets_an_anthropic_authentication_error() {
    let s = setup(Proto::OpenAi);
    for stream in [false, true] {
        let body = request_body(Proto::Anthropic, &Turn::Hello, stream);
        let bad = s.gw.messages("sk-not-a-key-of-this-gateway", &body);
        assert_anthropic_error(&bad, 401, Some("authentication_error"));
        let missing = HttpRequest::post("/v1/messages")
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&body)
            .send(s.gw.addr);
        assert_anthropic_error(&missing, 401, Some("authentication_error"));
    }
    assert!(s.mock.requests().is_empty(), "a refused request reached the upstream");
}

#[test]
fn a_bad_or_missing_key_gets_a_gemini_unauthenticated_error() {
    let s = setup(Proto::OpenAi);
    for stream in [false, true] {
        let body = request_body(Proto::Gemini, &Turn::Hello, stream);
        let bad = s.gw.generate_content("sk-not-a-key-of-this-gateway", MODEL, stream, &body);
        assert_gemini_error(&bad, 401, Some("UNAUTHENTICATED"));
        let path = gemini_path("/v1beta", MODEL, stream);
        let sep = if path.contains('?') { '&' } else { '?' };
        let bad_query =
            HttpRequest::post(&format!("{path}{sep}key=sk-not-a-key")).json(&body).send(s.gw.addr);
        assert_gemini_error(&bad_query, 401, Some("UNAUTHENTICATED"));
        let missing = HttpRequest::post(&path).json(&body).send(s.gw.addr);
        assert_gemini_error(&missing, 401, Some("UNAUTHENTICATED"));
    }
    assert!(s.mock.requests().is_empty(), "a refused request reached the upstream");
}

#[test]
fn anthropic_clients_may_send_the_key_as_bearer() {
    let s = setup(Proto::Anthropic);
    let resp = HttpRequest::post("/v1/messages")
        .bearer(&s.key.key)
        .header("anthropic-version", ANTHROPIC_VERSION)
        .json(&request_body(Proto::Anthropic, &Turn::Hello, false))
        .send(s.gw.addr);
    assert_eq!(read_reply(Proto::Anthropic, &resp, false).text, mock_text());
}

#[test]
fn gemini_clients_may_send_the_key_as_a_query_parameter_and_use_the_v1_paths() {
    let s = setup(Proto::Gemini);
    for (prefix, stream) in [("/v1beta", false), ("/v1", false), ("/v1", true)] {
        let body = request_body(Proto::Gemini, &Turn::Hello, stream);
        let path = gemini_path(prefix, MODEL, stream);
        let sep = if path.contains('?') { '&' } else { '?' };
        let resp = HttpRequest::post(&format!("{path}{sep}key={}", s.key.key)).json(&body).send(s.gw.addr);
        assert_eq!(read_reply(Proto::Gemini, &resp, stream).text, mock_text(), "{path}");
        let upstream = upstream_request(&s, Proto::Gemini, stream);
        assert!(!upstream.0["query"].to_string().contains(&s.key.key), "the client's key went upstream");
        let headers =
            HttpRequest::post(&path).header("x-goog-api-key", &s.key.key).json(&body).send(s.gw.addr);
        assert_eq!(read_reply(Proto::Gemini, &headers, stream).text, mock_text(), "{path}");
    }
}

#[test]
fn a_model_no_channel_serves_is_refused_in_the_clients_shape() {
    let s = setup(Proto::OpenAi);
    let body = request_body(Proto::Anthropic, &Turn::Hello, false);
    let resp = s.gw.messages(
        &s.key.key,
        &json!({"model": "no-such-model", "messages": body["messages"], "max_tokens": 5}),
    );
    assert_anthropic_error(&resp, 503, None);
    let resp = s.gw.generate_content(
        &s.key.key,
        "no-such-model",
        false,
        &request_body(Proto::Gemini, &Turn::Hello, false),
    );
    assert_gemini_error(&resp, 503, Some("UNAVAILABLE"));
}

#[test]
fn malformed_bodies_are_refused_with_400_in_the_clients_shape() {
    let s = setup(Proto::OpenAi);
    let resp = HttpRequest::post("/v1/messages")
        .header("x-api-key", &s.key.key)
        .header("content-type", "application/json")
        .body("{not json")
        .send(s.gw.addr);
    assert_anthropic_error(&resp, 400, Some("invalid_request_error"));
    let resp = HttpRequest::post(&gemini_path("/v1beta", MODEL, false))
        .header("x-goog-api-key", &s.key.key)
        .header("content-type", "application/json")
        .body("{not json")
        .send(s.gw.addr);
    assert_gemini_error(&resp, 400, Some("INVALID_ARGUMENT"));
}

/// One gateway with one channel of each type on the same mock, serving `model-openai`,
/// `model-anthropic` and `model-gemini` respectively.
fn setup_three_channels() -> (Mock, Gateway, ApiKey) {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(GatewayOptions::new().env("BURNCLOUD_LOG", "error"));
    for channel in Proto::ALL {
        gw.create_channel(json!({
            "type": channel.channel_type(), "base_url": mock.base_url(),
            "models": format!("model-{}", channel.channel_type()),
        }));
    }
    gw.put_option("RetryTimes", "0");
    let user = gw.create_user(json!({}));
    let key = gw.create_token(user, json!({}));
    (mock, gw, key)
}

fn send_for_model(gw: &Gateway, key: &str, client: Proto, model: &str, stream: bool) -> Response {
    let mut body = request_body(client, &Turn::Hello, stream);
    match client {
        Proto::OpenAi => {
            body["model"] = json!(model);
            gw.chat(key, &body)
        }
        Proto::Anthropic => {
            body["model"] = json!(model);
            gw.messages(key, &body)
        }
        Proto::Gemini => gw.generate_content(key, model, stream, &body),
    }
}

#[test]
fn upstream_failures_reach_every_client_in_its_own_shape() {
    let (mock, gw, key) = setup_three_channels();
    for channel in Proto::ALL {
        let model = format!("model-{}", channel.channel_type());
        for client in Proto::ALL {
            for stream in [false, true] {
                mock.behave(json!({"status": 500, "times": 1}));
                let resp = send_for_model(&gw, &key.key, client, &model, stream);
                assert_error_in(client, &resp, 502);
                mock.behave(json!({"status": 400, "times": 1}));
                let resp = send_for_model(&gw, &key.key, client, &model, stream);
                assert_error_in(client, &resp, 400);
            }
        }
    }
}

// ---------------------------------------------------------------- official SDKs

fn python() -> std::path::PathBuf {
    match std::env::var_os("BURNCLOUD_TEST_PYTHON") {
        Some(p) if !p.is_empty() => p.into(),
        _ => workspace_dir().join(".venv/bin/python"),
    }
}

/// Runs `tests/python/{script}` with `env` against a fresh setup on a `channel` channel, unless the
/// interpreter cannot import `module` outside CI. Returns the setup, or `None` when skipped.
fn run_sdk_script(
    script: &str,
    module: &str,
    channel: Proto,
    env: &dyn Fn(&Setup) -> Vec<(String, String)>,
) -> Option<Setup> {
    let python = python();
    let has_sdk = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sdk && std::env::var("CI").as_deref() != Ok("true") {
        eprintln!("skipped: {} cannot import {module} (CI would run this test)", python.display());
        return None;
    }
    let s = setup(channel);
    let path = workspace_dir().join("tests/python").join(script);
    let out = Command::new(&python)
        .arg(&path)
        .envs(env(&s))
        .env("BURNCLOUD_TEST_MODEL", MODEL)
        .env("BURNCLOUD_TEST_MOCK_URL", s.mock.base_url())
        .env("BURNCLOUD_TEST_PROMPT_TOKENS", PROMPT_TOKENS.to_string())
        .env("BURNCLOUD_TEST_COMPLETION_TOKENS", COMPLETION_TOKENS.to_string())
        .env("BURNCLOUD_TEST_TEXT", mock_text())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("running {} {}: {e}", python.display(), path.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} on a {channel:?} channel failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
    Some(s)
}

fn anthropic_sdk_on(channel: Proto) {
    let env = |s: &Setup| {
        vec![
            ("ANTHROPIC_BASE_URL".to_string(), s.gw.base_url()),
            ("ANTHROPIC_API_KEY".to_string(), s.key.key.clone()),
        ]
    };
    if let Some(s) = run_sdk_script("test_anthropic_sdk.py", "anthropic", channel, &env) {
        // Non-stream, stream, the two tool round requests and the streamed tool round.
        assert_eq!(
            s.gw.log_page(&format!("type=2&model={MODEL}")).1,
            6,
            "the SDK's calls were not all logged"
        );
    }
}

fn genai_sdk_on(channel: Proto) {
    let env = |s: &Setup| {
        vec![
            ("BURNCLOUD_TEST_BASE_URL".to_string(), s.gw.base_url()),
            ("BURNCLOUD_TEST_KEY".to_string(), s.key.key.clone()),
        ]
    };
    if let Some(s) = run_sdk_script("test_genai_sdk.py", "google.genai", channel, &env) {
        assert_eq!(
            s.gw.log_page(&format!("type=2&model={MODEL}")).1,
            6,
            "the SDK's calls were not all logged"
        );
    }
}

#[test]
fn the_anthropic_python_sdk_works_against_an_anthropic_channel() {
    anthropic_sdk_on(Proto::Anthropic);
}

#[test]
fn the_anthropic_python_sdk_works_against_an_openai_channel() {
    anthropic_sdk_on(Proto::OpenAi);
}

#[test]
fn the_anthropic_python_sdk_works_against_a_gemini_channel() {
    anthropic_sdk_on(Proto::Gemini);
}

#[test]
fn the_google_genai_python_sdk_works_against_a_gemini_channel() {
    genai_sdk_on(Proto::Gemini);
}

#[test]
fn the_google_genai_python_sdk_works_against_an_openai_channel() {
    genai_sdk_on(Proto::OpenAi);
}

#[test]
fn the_google_genai_python_sdk_works_against_an_anthropic_channel() {
    genai_sdk_on(Proto::Anthropic);
}
