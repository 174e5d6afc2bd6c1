//! The mock's request handling: the OpenAI, Anthropic and Gemini endpoints, the control endpoints
//! and fault injection.
//!
//! Owns [`MockUpstream`], the [`Service`] each mock worker runs. A plain API request costs one
//! atomic load for the behaviour check, one JSON parse of the fields it needs, one record copy and
//! the response write; control endpoints (`/_mock/…`) and faults may take locks. It never enforces
//! credentials (it records them) and never fails on a bad request body: that is a 400 answer, in
//! the error shape of the protocol the path belongs to.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use burncloud_runtime::http::{LAST_CHUNK, Request, Responder, Service, encode_chunk};
use burncloud_runtime::rt;
use bytes::{BufMut, Bytes, BytesMut};
use http::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::MockShared;
use super::anthropic::{self, Message};
use super::behaviour::{Behaviour, Fault};
use super::gemini::{self, Action, Generation};
use super::openai::{self, Api, Call, Completion};
use super::record::Record;

const JSON: (&str, &str) = ("content-type", "application/json");
const SSE: [(&str, &str); 2] = [("content-type", "text/event-stream"), ("cache-control", "no-cache")];

/// The mock's service on one worker.
pub struct MockUpstream {
    shared: Arc<MockShared>,
    worker: usize,
    next_id: Cell<u64>,
}

/// The numbers one API request is answered with: flags overridden by the behaviour in force.
struct Plan {
    latency: Duration,
    chunks: usize,
    chunk_gap: Duration,
    prompt_tokens: u64,
    completion_tokens: u64,
    fault: Fault,
    fault_after_chunks: usize,
    /// The tool call to answer with instead of text: the function name and the arguments JSON.
    tool_call: Option<(String, String)>,
    omit_usage: bool,
}

/// The protocol an API path belongs to, which decides the shape of its error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Protocol {
    fn of(path: &str) -> Protocol {
        if path == "/v1/messages" {
            Protocol::Anthropic
        } else if gemini::route(path).is_some() {
            Protocol::Gemini
        } else {
            Protocol::OpenAi
        }
    }

    fn error(self, status: u16, message: &str, openai_code: &str) -> String {
        match self {
            Protocol::OpenAi => {
                let kind = if status >= 500 { "server_error" } else { "invalid_request_error" };
                openai::error(message, kind, openai_code)
            }
            Protocol::Anthropic => anthropic::error(status, message),
            Protocol::Gemini => gemini::error(status, message),
        }
    }
}

/// The part of a completion request the mock reads.
#[derive(Deserialize)]
struct CompletionRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct EmbeddingRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    input: Value,
}

/// A response the endpoint produced, before faults are applied.
enum Answer {
    Full {
        status: u16,
        body: String,
    },
    /// `end` is written after the events: `data: [DONE]` for OpenAI, nothing for the others.
    Stream {
        events: Vec<String>,
        end: &'static [u8],
    },
}

impl MockUpstream {
    pub(crate) fn new(shared: Arc<MockShared>, worker: usize) -> MockUpstream {
        MockUpstream { shared, worker, next_id: Cell::new(0) }
    }

    fn plan(&self, behaviour: Option<&Behaviour>) -> Plan {
        let c = &self.shared.config;
        let b = behaviour.cloned().unwrap_or_default();
        let latency_ms = b.latency_ms.unwrap_or(c.latency_ms);
        Plan {
            latency: Duration::from_millis(latency_ms),
            chunks: b.chunks.unwrap_or(c.chunks).max(1),
            chunk_gap: Duration::from_millis(b.chunk_gap_ms.unwrap_or(c.chunk_gap_ms)),
            prompt_tokens: b.prompt_tokens.unwrap_or(c.prompt_tokens),
            completion_tokens: b.completion_tokens.unwrap_or(c.completion_tokens),
            fault: b.fault,
            fault_after_chunks: b.fault_after_chunks.unwrap_or(1),
            tool_call: b.tool_call.map(|t| (t.name, t.arguments.to_string())),
            omit_usage: b.omit_usage,
        }
    }

    fn id(&self, prefix: &str) -> String {
        let n = self.next_id.get() + 1;
        self.next_id.set(n);
        format!("{prefix}-mock-{}-{n}", self.worker)
    }

    async fn api(&self, req: Request, resp: &mut Responder<'_>) {
        self.shared.recorder.record(self.worker, Record::of(&req));
        let behaviour = self.shared.behaviour.take();
        let plan = self.plan(behaviour.as_deref());
        if !plan.latency.is_zero() && plan.fault != Fault::SlowHeaders {
            rt::sleep(plan.latency).await;
        }
        if plan.fault == Fault::CloseBeforeResponse {
            resp.abort();
            return;
        }
        let answer = match behaviour.as_deref().and_then(|b| b.status.map(|s| (s, b.body.as_ref()))) {
            Some((status, body)) => {
                Answer::Full { status, body: injected_body(Protocol::of(&req.path), status, body) }
            }
            None => self.answer(&req, &plan),
        };
        let _ = match plan.fault {
            Fault::None | Fault::CloseBeforeResponse => send(resp, answer, &plan).await,
            Fault::GarbageBody => send_garbage(resp, &answer).await,
            Fault::DisconnectMidStream => send_cut(resp, answer, &plan).await,
            Fault::SlowHeaders => send_slowly(resp, answer, &plan).await,
        };
    }

    /// The endpoint's normal answer.
    fn answer(&self, req: &Request, plan: &Plan) -> Answer {
        if req.method == Method::POST {
            match gemini::route(&req.path) {
                Some((model, Action::Generate)) => return self.generate(model, false, &req.body, plan),
                Some((model, Action::StreamGenerate)) => return self.generate(model, true, &req.body, plan),
                Some((_, Action::Other)) | None => {}
            }
        }
        match (&req.method, req.path.as_str()) {
            (&Method::POST, "/v1/chat/completions") => self.completion(Api::Chat, &req.body, plan),
            (&Method::POST, "/v1/completions") => self.completion(Api::Text, &req.body, plan),
            (&Method::POST, "/v1/messages") => self.messages(&req.body, plan),
            (&Method::POST, "/v1/embeddings") => {
                match serde_json::from_slice::<EmbeddingRequest>(&req.body) {
                    Ok(r) => Answer::Full {
                        status: 200,
                        body: openai::embeddings(
                            r.model.as_deref().unwrap_or("mock-embedding"),
                            openai::embedding_items(&r.input),
                            plan.prompt_tokens,
                        ),
                    },
                    Err(e) => bad_request(Protocol::OpenAi, &e),
                }
            }
            (&Method::GET, "/v1/models") => Answer::Full { status: 200, body: openai::models(now()) },
            _ => Answer::Full {
                status: 404,
                body: Protocol::of(&req.path).error(
                    404,
                    &format!("no route for {} {}", req.method, req.path),
                    "not_found",
                ),
            },
        }
    }

    fn completion(&self, api: Api, body: &[u8], plan: &Plan) -> Answer {
        let r = match serde_json::from_slice::<CompletionRequest>(body) {
            Ok(r) => r,
            Err(e) => return bad_request(Protocol::OpenAi, &e),
        };
        let id = self.id(if api == Api::Chat { "chatcmpl" } else { "cmpl" });
        let c = Completion {
            api,
            id: &id,
            created: now(),
            model: r.model.as_deref().unwrap_or("mock-model"),
            prompt_tokens: plan.prompt_tokens,
            completion_tokens: plan.completion_tokens,
        };
        let stream = r.stream == Some(true);
        let include_usage =
            r.stream_options.and_then(|o| o.include_usage).unwrap_or(false) && !plan.omit_usage;
        let mut events = match (&plan.tool_call, api) {
            (Some((name, arguments)), Api::Chat) => {
                let call_id = self.id("call");
                let call = Call { id: &call_id, name, arguments };
                if !stream {
                    return Answer::Full { status: 200, body: c.full_tool_call(&call) };
                }
                c.tool_call_events(&call, plan.chunks, include_usage)
            }
            _ => {
                let text = openai::generated_text(plan.completion_tokens);
                if !stream {
                    return Answer::Full { status: 200, body: c.full(&text) };
                }
                let pieces = openai::pieces(&text, plan.chunks);
                pieces.iter().enumerate().map(|(k, p)| c.event(k, pieces.len(), p, include_usage)).collect()
            }
        };
        if include_usage {
            events.push(c.usage_event());
        }
        Answer::Stream { events, end: openai::DONE }
    }

    /// `POST /v1/messages`: an Anthropic message, whole or streamed.
    fn messages(&self, body: &[u8], plan: &Plan) -> Answer {
        let r = match serde_json::from_slice::<CompletionRequest>(body) {
            Ok(r) => r,
            Err(e) => return bad_request(Protocol::Anthropic, &e),
        };
        let id = self.id("msg");
        let m = Message {
            id: &id,
            model: r.model.as_deref().unwrap_or("mock-model"),
            input_tokens: plan.prompt_tokens,
            output_tokens: plan.completion_tokens,
        };
        let stream = r.stream == Some(true);
        let events = match &plan.tool_call {
            Some((name, arguments)) => {
                let call_id = self.id("toolu");
                let call = Call { id: &call_id, name, arguments };
                if !stream {
                    return Answer::Full { status: 200, body: m.full_tool_use(&call) };
                }
                m.tool_use_events(&call, plan.chunks)
            }
            None => {
                let text = openai::generated_text(plan.completion_tokens);
                if !stream {
                    return Answer::Full { status: 200, body: m.full(&text) };
                }
                m.events(&text, plan.chunks)
            }
        };
        Answer::Stream { events, end: b"" }
    }

    /// `POST /v1beta/models/{model}:generateContent` or `:streamGenerateContent`: a Gemini response,
    /// whole or as an SSE stream (whatever `alt` says; the recorded query shows what was asked).
    fn generate(&self, model: &str, stream: bool, body: &[u8], plan: &Plan) -> Answer {
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            return bad_request(Protocol::Gemini, &e);
        }
        let id = self.id("resp");
        let g = Generation {
            id: &id,
            model,
            prompt_tokens: plan.prompt_tokens,
            candidates_tokens: plan.completion_tokens,
        };
        let events = match (&plan.tool_call, stream) {
            (Some((name, arguments)), false) => {
                return Answer::Full { status: 200, body: g.full_call(name, arguments) };
            }
            (Some((name, arguments)), true) => g.call_events(name, arguments),
            (None, false) => {
                return Answer::Full {
                    status: 200,
                    body: g.full(&openai::generated_text(plan.completion_tokens)),
                };
            }
            (None, true) => g.events(&openai::generated_text(plan.completion_tokens), plan.chunks),
        };
        Answer::Stream { events, end: b"" }
    }

    async fn control(&self, req: Request, resp: &mut Responder<'_>) {
        let shared = &self.shared;
        let (status, body) = match (&req.method, req.path.as_str()) {
            (&Method::PUT, "/_mock/behaviour") => match serde_json::from_slice::<Behaviour>(&req.body) {
                Ok(b) => {
                    shared.behaviour.set(Some(b));
                    (200, json!({"ok": true}))
                }
                Err(e) => (400, json!({"error": e.to_string()})),
            },
            (&Method::DELETE, "/_mock/behaviour") => {
                shared.behaviour.set(None);
                (200, json!({"ok": true}))
            }
            (&Method::GET, "/_mock/behaviour") => (200, json!(shared.behaviour.current())),
            (&Method::GET, "/_mock/requests") => {
                (200, Value::Array(shared.recorder.requests().iter().map(Record::to_json).collect()))
            }
            (&Method::DELETE, "/_mock/requests") => {
                shared.recorder.clear_requests();
                (200, json!({"ok": true}))
            }
            (&Method::GET, "/_mock/stats") => (200, json!({"requests": shared.recorder.count()})),
            (&Method::DELETE, "/_mock/stats") => {
                shared.recorder.reset_count();
                (200, json!({"ok": true}))
            }
            _ => (404, json!({"error": format!("no control endpoint {} {}", req.method, req.path)})),
        };
        let _ = resp.send(status, &[JSON], Bytes::from(body.to_string())).await;
    }
}

impl Service for MockUpstream {
    async fn call(&self, req: Request, resp: &mut Responder<'_>) {
        if req.path.starts_with("/_mock/") {
            self.control(req, resp).await;
        } else if req.path == "/health" {
            let _ = resp.send(200, &[JSON], Bytes::from_static(br#"{"status":"ok"}"#)).await;
        } else {
            self.api(req, resp).await;
        }
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn bad_request(protocol: Protocol, e: &serde_json::Error) -> Answer {
    Answer::Full {
        status: 400,
        body: protocol.error(400, &format!("invalid JSON body: {e}"), "invalid_request"),
    }
}

/// The body of an injected status: the given string or JSON, else an error in the path's protocol
/// (or `{}` for 2xx).
fn injected_body(protocol: Protocol, status: u16, body: Option<&Value>) -> String {
    match body {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None if status >= 400 => protocol.error(status, "injected by burncloud-mock", "mock_failure"),
        None => "{}".to_owned(),
    }
}

async fn send(resp: &mut Responder<'_>, answer: Answer, plan: &Plan) -> std::io::Result<()> {
    match answer {
        Answer::Full { status, body } => resp.send(status, &[JSON], Bytes::from(body)).await,
        Answer::Stream { events, end } => {
            resp.start_stream(200, &SSE).await?;
            for (k, event) in events.into_iter().enumerate() {
                if k > 0 && !plan.chunk_gap.is_zero() {
                    rt::sleep(plan.chunk_gap).await;
                }
                resp.send_chunk(Bytes::from(event)).await?;
            }
            if !end.is_empty() {
                resp.send_chunk(Bytes::from_static(end)).await?;
            }
            resp.finish_stream().await
        }
    }
}

async fn send_garbage(resp: &mut Responder<'_>, answer: &Answer) -> std::io::Result<()> {
    match answer {
        Answer::Full { .. } => resp.send(200, &[JSON], Bytes::from_static(b"{\"id\": garbage <<<")).await,
        Answer::Stream { .. } => {
            resp.start_stream(200, &SSE).await?;
            resp.send_chunk(Bytes::from_static(b"data: {\"choices\": [garbage\n\nnot-sse\x00\xff\n\n"))
                .await?;
            resp.finish_stream().await
        }
    }
}

/// Sends part of the answer, then drops the connection.
async fn send_cut(resp: &mut Responder<'_>, answer: Answer, plan: &Plan) -> std::io::Result<()> {
    match answer {
        Answer::Full { status, body } => {
            let mut raw = head(status, JSON.1, Some(body.len()));
            raw.put_slice(&body.as_bytes()[..body.len() / 2]);
            resp.write_raw(raw.freeze()).await?;
        }
        Answer::Stream { events, .. } => {
            resp.start_stream(200, &SSE).await?;
            for (k, event) in events.into_iter().take(plan.fault_after_chunks).enumerate() {
                if k > 0 && !plan.chunk_gap.is_zero() {
                    rt::sleep(plan.chunk_gap).await;
                }
                resp.send_chunk(Bytes::from(event)).await?;
            }
        }
    }
    resp.abort();
    Ok(())
}

/// Writes the status line, waits, then the rest of the response (closing the connection after).
async fn send_slowly(resp: &mut Responder<'_>, answer: Answer, plan: &Plan) -> std::io::Result<()> {
    let (status, content_type, body, stream) = match answer {
        Answer::Full { status, body } => (status, JSON.1, Bytes::from(body), false),
        Answer::Stream { events, end } => {
            let mut framed = BytesMut::new();
            for event in events.iter().map(String::as_bytes).chain([end]).filter(|e| !e.is_empty()) {
                framed.put_slice(&encode_chunk(event));
            }
            framed.put_slice(LAST_CHUNK);
            (200, SSE[0].1, framed.freeze(), true)
        }
    };
    let full = head(status, content_type, (!stream).then_some(body.len()));
    let split = full.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut full = full;
    let status_line = full.split_to(split).freeze();
    resp.write_raw(status_line).await?;
    rt::sleep(if plan.latency.is_zero() { Duration::from_secs(1) } else { plan.latency }).await;
    full.put_slice(&body);
    resp.write_raw(full.freeze()).await
}

/// A raw response head: chunked when `length` is `None`; always `connection: close`.
fn head(status: u16, content_type: &str, length: Option<usize>) -> BytesMut {
    let reason =
        http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Unknown");
    let framing = match length {
        Some(n) => format!("content-length: {n}"),
        None => "transfer-encoding: chunked".to_owned(),
    };
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n{framing}\r\nconnection: close\r\n\r\n"
    );
    BytesMut::from(text.as_bytes())
}
