//! The mock upstream as a process: its endpoints, its faults and its control API, spoken to over a
//! plain blocking socket the way a gateway would.

#![allow(clippy::unwrap_used, clippy::panic)] // test code: a failed step fails the test, loudly

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burncloud_runtime::http::ChunkedDecoder;
use bytes::BytesMut;
use serde_json::{Value, json};

/// A `burncloud-mock` child process on a free port, killed on drop.
struct Mock {
    child: Child,
    addr: SocketAddr,
}

impl Mock {
    fn start(args: &[&str]) -> Mock {
        let mut child = Command::new(env!("CARGO_BIN_EXE_burncloud-mock"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on ").unwrap().parse().unwrap();
        Mock { child, addr }
    }

    fn call(&self, method: &str, path: &str, body: &str) -> Reply {
        exchange(self.addr, method, path, &[], body)
    }

    fn chat(&self, body: Value) -> Reply {
        self.call("POST", "/v1/chat/completions", &body.to_string())
    }

    fn behave(&self, behaviour: Value) {
        assert_eq!(self.call("PUT", "/_mock/behaviour", &behaviour.to_string()).status, 200);
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response as read until the server closed the connection.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Every byte received, head included.
    raw: Vec<u8>,
    /// Whether the body was complete by its own framing.
    complete: bool,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The `data:` payloads of an event stream.
    fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_owned)
            .collect()
    }

    fn event_json(&self) -> Vec<Value> {
        self.events().iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect()
    }
}

fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    stream
}

fn exchange(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut stream = send_request(addr, method, path, headers, body);
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the reply: {e}"),
        }
    }
    parse_reply(raw)
}

fn parse_reply(raw: Vec<u8>) -> Reply {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Reply { status: 0, headers: Vec::new(), body: Vec::new(), raw, complete: false };
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| l.split_once(": ").unwrap())
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let mut reply = Reply { status, headers, body: Vec::new(), raw: raw.clone(), complete: false };
    if reply.header("transfer-encoding") == Some("chunked") {
        let mut input = BytesMut::from(rest);
        let mut out = BytesMut::new();
        reply.complete = ChunkedDecoder::new().decode(&mut input, &mut out).unwrap();
        reply.body = out.to_vec();
    } else if let Some(len) = reply.header("content-length") {
        let len: usize = len.parse().unwrap();
        reply.complete = rest.len() >= len;
        reply.body = rest[..len.min(rest.len())].to_vec();
    } else {
        reply.body = rest.to_vec();
    }
    reply
}

#[test]
fn a_chat_completion_reports_the_configured_usage() {
    let mock = Mock::start(&["--prompt-tokens", "11", "--completion-tokens", "7"]);
    let reply = mock.chat(json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}));
    let v = reply.json();
    assert_eq!(reply.status, 200);
    assert_eq!((v["object"].as_str(), v["model"].as_str()), (Some("chat.completion"), Some("gpt-4o-mini")));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"], json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}));
}

#[test]
fn a_stream_without_include_usage_sends_the_configured_chunks_and_no_usage() {
    let mock = Mock::start(&["--chunks", "4"]);
    let reply = mock.chat(json!({"model": "m", "stream": true}));
    let events = reply.event_json();
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    assert!(reply.complete);
    assert_eq!(events.len(), 4);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(events[3]["choices"][0]["finish_reason"], "stop");
    assert!(events.iter().all(|e| e.get("usage").is_none()));
    assert_eq!(reply.events().last().map(String::as_str), Some("[DONE]"));
}

#[test]
fn a_stream_with_include_usage_ends_with_a_usage_chunk_then_done() {
    let mock = Mock::start(&["--chunks", "3", "--prompt-tokens", "5", "--completion-tokens", "9"]);
    let reply = mock.chat(json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}));
    let events = reply.event_json();
    let last = events.last().unwrap();
    assert_eq!(events.len(), 4);
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["total_tokens"], 14);
    assert_eq!(reply.events().last().map(String::as_str), Some("[DONE]"));
}

#[test]
fn streamed_content_concatenates_to_the_non_streamed_content() {
    let mock = Mock::start(&["--chunks", "6"]);
    let whole = mock.chat(json!({"model": "m"})).json()["choices"][0]["message"]["content"].clone();
    let streamed: String = mock
        .chat(json!({"model": "m", "stream": true}))
        .event_json()
        .iter()
        .map(|e| e["choices"][0]["delta"]["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(whole.as_str(), Some(streamed.as_str()));
}

#[test]
fn chunks_are_spaced_by_the_chunk_gap() {
    let mock = Mock::start(&["--chunks", "3", "--chunk-gap-ms", "100"]);
    let started = Instant::now();
    mock.chat(json!({"model": "m", "stream": true}));
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[test]
fn text_completions_answer_whole_and_streamed() {
    let mock = Mock::start(&["--chunks", "2"]);
    let whole =
        mock.call("POST", "/v1/completions", r#"{"model":"gpt-3.5-turbo-instruct","prompt":"x"}"#).json();
    let stream = mock.call("POST", "/v1/completions", r#"{"model":"i","prompt":"x","stream":true}"#);
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["usage"]["total_tokens"], 30);
    assert_eq!(stream.event_json().len(), 2);
    assert_eq!(stream.event_json()[1]["choices"][0]["finish_reason"], "stop");
}

#[test]
fn embeddings_come_one_per_input_with_usage() {
    let mock = Mock::start(&["--prompt-tokens", "4"]);
    let v = mock
        .call("POST", "/v1/embeddings", r#"{"model":"text-embedding-3-small","input":["a","b","c"]}"#)
        .json();
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    assert_eq!(v["usage"], json!({"prompt_tokens": 4, "total_tokens": 4}));
}

#[test]
fn models_and_health_answer() {
    let mock = Mock::start(&[]);
    assert!(!mock.call("GET", "/v1/models", "").json()["data"].as_array().unwrap().is_empty());
    assert_eq!(mock.call("GET", "/health", "").status, 200);
}

#[test]
fn a_malformed_body_gets_an_openai_400() {
    let mock = Mock::start(&[]);
    let reply = mock.call("POST", "/v1/chat/completions", "{not json");
    assert_eq!((reply.status, reply.json()["error"]["code"].as_str()), (400, Some("invalid_request")));
}

#[test]
fn an_injected_status_answers_with_that_status_and_body() {
    let mock = Mock::start(&[]);
    mock.behave(json!({"status": 429, "body": "{\"error\":{\"message\":\"slow down\"}}"}));
    let reply = mock.chat(json!({"model": "m"}));
    assert_eq!((reply.status, reply.json()["error"]["message"].as_str()), (429, Some("slow down")));
}

#[test]
fn an_injected_status_without_body_answers_an_openai_error() {
    let mock = Mock::start(&[]);
    mock.behave(json!({"status": 503}));
    let reply = mock.chat(json!({"model": "m"}));
    assert_eq!((reply.status, reply.json()["error"]["code"].as_str()), (503, Some("mock_failure")));
}

#[test]
fn injected_latency_delays_the_response() {
    let mock = Mock::start(&[]);
    mock.behave(json!({"latency_ms": 200}));
    let started = Instant::now();
    assert_eq!(mock.chat(json!({"model": "m"})).status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[test]
fn injected_usage_numbers_replace_the_flags() {
    let mock = Mock::start(&[]);
    mock.behave(json!({"prompt_tokens": 1, "completion_tokens": 2}));
    assert_eq!(mock.chat(json!({"model": "m"})).json()["usage"]["total_tokens"], 3);
}

#[test]
fn disconnect_mid_stream_cuts_the_stream_after_the_given_chunks() {
    let mock = Mock::start(&["--chunks", "5"]);
    mock.behave(json!({"fault": "disconnect_mid_stream", "fault_after_chunks": 2}));
    let reply = mock.chat(json!({"model": "m", "stream": true}));
    assert_eq!(reply.status, 200);
    assert!(!reply.complete);
    assert_eq!(reply.events().len(), 2);
}

#[test]
fn disconnect_mid_stream_cuts_a_whole_body_short() {
    let mock = Mock::start(&[]);
    mock.behave(json!({"fault": "disconnect_mid_stream"}));
    let reply = mock.chat(json!({"model": "m"}));
    assert_eq!(reply.status, 200);
    assert!(!reply.complete);
}

#[test]
fn slow_headers_sends_the_status_line_then_waits_before_the_rest() {
    let mock = Mock::start(&[]);
    mock.behave(json!({"fault": "slow_headers", "latency_ms": 300}));
    let mut stream = send_request(mock.addr, "POST", "/v1/chat/completions", &[], r#"{"model":"m"}"#);
    let mut first = [0u8; 256];
    let n = stream.read(&mut first).unwrap();
    let status_line_at = Instant::now();
    assert!(first[..n].starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(!first[..n].windows(4).any(|w| w == b"\r\n\r\n"));
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(status_line_at.elapsed() >= Duration::from_millis(250));
    let reply = parse_reply([&first[..n], &rest[..]].concat());
    assert_eq!(reply.json()["object"], "chat.completion");
}

#[test]
fn garbage_body_is_not_json() {
    let mock = Mock::start(&[]);
    mock.behave(json!({"fault": "garbage_body"}));
    let reply = mock.chat(json!({"model": "m"}));
    assert_eq!(reply.status, 200);
    assert!(serde_json::from_slice::<Value>(&reply.body).is_err());
}

#[test]
fn close_before_response_closes_without_a_byte() {
    let mock = Mock::start(&[]);
    mock.behave(json!({"fault": "close_before_response"}));
    let reply = mock.chat(json!({"model": "m"}));
    assert!(reply.raw.is_empty());
}

#[test]
fn a_counted_behaviour_applies_to_that_many_requests_across_workers_then_reverts() {
    let mock = Mock::start(&["--workers", "2"]);
    mock.behave(json!({"status": 500, "times": 3}));
    let statuses: Vec<u16> = (0..5).map(|_| mock.chat(json!({"model": "m"})).status).collect();
    assert_eq!(statuses, [500, 500, 500, 200, 200]);
    assert_eq!(mock.call("GET", "/_mock/behaviour", "").json(), Value::Null);
}

#[test]
fn delete_behaviour_restores_normal_answers() {
    let mock = Mock::start(&[]);
    mock.behave(json!({"status": 500}));
    assert_eq!(mock.call("DELETE", "/_mock/behaviour", "").status, 200);
    assert_eq!(mock.chat(json!({"model": "m"})).status, 200);
}

#[test]
fn an_unknown_behaviour_field_is_refused() {
    let mock = Mock::start(&[]);
    assert_eq!(mock.call("PUT", "/_mock/behaviour", r#"{"stauts": 500}"#).status, 400);
}

#[test]
fn requests_are_recorded_with_credentials_and_body_until_cleared() {
    let mock = Mock::start(&["--workers", "2"]);
    exchange(
        mock.addr,
        "POST",
        "/v1/chat/completions?x=1",
        &[("Authorization", "Bearer sk-abc")],
        r#"{"model":"a"}"#,
    );
    mock.call("POST", "/v1/embeddings", "plain text");
    let recorded = mock.call("GET", "/_mock/requests", "").json();
    let recorded = recorded.as_array().unwrap();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0]["headers"]["authorization"], "Bearer sk-abc");
    assert_eq!(
        (recorded[0]["path"].as_str(), recorded[0]["query"].as_str()),
        (Some("/v1/chat/completions"), Some("x=1"))
    );
    assert_eq!(recorded[0]["body"]["model"], "a");
    assert_eq!(recorded[1]["body"], "plain text");
    mock.call("DELETE", "/_mock/requests", "");
    assert_eq!(mock.call("GET", "/_mock/requests", "").json(), json!([]));
}

#[test]
fn stats_count_api_requests_only() {
    let mock = Mock::start(&[]);
    for _ in 0..3 {
        mock.chat(json!({"model": "m"}));
    }
    mock.call("GET", "/health", "");
    assert_eq!(mock.call("GET", "/_mock/stats", "").json(), json!({"requests": 3}));
}

#[test]
fn bad_flags_exit_with_usage() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_burncloud-mock")).args(["--workers", "many"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}

// ---------------------------------------------------------------- Anthropic and Gemini endpoints

impl Mock {
    fn messages(&self, body: Value) -> Reply {
        self.call("POST", "/v1/messages", &body.to_string())
    }
}

impl Reply {
    /// (event name, data JSON) of each event of an Anthropic stream.
    fn named_events(&self) -> Vec<(String, Value)> {
        String::from_utf8_lossy(&self.body)
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_owned();
                (name, serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap())
            })
            .collect()
    }
}

const WEATHER_CALL: &str =
    r#"{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}"#;

#[test]
fn an_anthropic_message_reports_text_stop_reason_and_usage() {
    let mock = Mock::start(&["--prompt-tokens", "11", "--completion-tokens", "7"]);
    let reply = mock.messages(
        json!({"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}),
    );
    let v = reply.json();
    assert_eq!(reply.status, 200);
    assert_eq!(
        (v["type"].as_str(), v["role"].as_str(), v["model"].as_str()),
        (Some("message"), Some("assistant"), Some("claude-x"))
    );
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["content"][0]["text"].as_str().unwrap().split(' ').count(), 7);
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"], json!({"input_tokens": 11, "output_tokens": 7}));
}

#[test]
fn an_anthropic_stream_follows_the_exact_event_order_with_the_configured_chunks() {
    let mock = Mock::start(&["--chunks", "3", "--prompt-tokens", "5", "--completion-tokens", "9"]);
    let reply = mock.messages(json!({"model": "claude-x", "max_tokens": 100, "stream": true}));
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    assert!(reply.complete);
    let events = reply.named_events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert!(events.iter().all(|(n, d)| d["type"] == n.as_str()));
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 5);
    assert_eq!(events[6].1["usage"]["output_tokens"], 9);
    assert_eq!(events[6].1["delta"]["stop_reason"], "end_turn");
    let whole =
        mock.messages(json!({"model": "claude-x", "max_tokens": 100})).json()["content"][0]["text"].clone();
    let streamed: String =
        events[2..5].iter().map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(whole.as_str(), Some(streamed.as_str()));
    assert!(!String::from_utf8_lossy(&reply.body).contains("[DONE]"));
}

#[test]
fn an_anthropic_stream_honours_the_chunk_gap_and_faults() {
    let mock = Mock::start(&["--chunks", "3"]);
    mock.behave(json!({"chunk_gap_ms": 100, "times": 1}));
    let started = Instant::now();
    assert!(mock.messages(json!({"model": "c", "stream": true})).complete);
    assert!(started.elapsed() >= Duration::from_millis(600), "8 events, 7 gaps of 100 ms");
    mock.behave(json!({"fault": "disconnect_mid_stream", "fault_after_chunks": 2}));
    let cut = mock.messages(json!({"model": "c", "stream": true}));
    assert!(!cut.complete);
    assert_eq!(cut.named_events().len(), 2);
}

#[test]
fn a_gemini_generation_reports_text_finish_reason_and_usage_metadata() {
    let mock = Mock::start(&["--prompt-tokens", "11", "--completion-tokens", "7"]);
    let body = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;
    for path in ["/v1beta/models/gemini-x:generateContent", "/v1/models/gemini-x:generateContent"] {
        let reply = mock.call("POST", path, body);
        let v = reply.json();
        assert_eq!(reply.status, 200, "{path}");
        let candidate = &v["candidates"][0];
        assert_eq!(candidate["content"]["role"], "model");
        assert_eq!(candidate["content"]["parts"][0]["text"].as_str().unwrap().split(' ').count(), 7);
        assert_eq!(candidate["finishReason"], "STOP");
        assert_eq!(v["modelVersion"], "gemini-x");
        assert_eq!(
            v["usageMetadata"],
            json!({"promptTokenCount": 11, "candidatesTokenCount": 7, "totalTokenCount": 18})
        );
    }
}

#[test]
fn a_gemini_stream_sends_data_chunks_with_usage_metadata_on_the_last() {
    let mock = Mock::start(&["--chunks", "4", "--prompt-tokens", "5", "--completion-tokens", "9"]);
    let body = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;
    let reply = mock.call("POST", "/v1beta/models/gemini-x:streamGenerateContent?alt=sse", body);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    assert!(reply.complete);
    assert!(!String::from_utf8_lossy(&reply.body).contains("[DONE]"));
    let events = reply.event_json();
    assert_eq!(events.len(), 4);
    assert!(events[..3].iter().all(|e| e.get("usageMetadata").is_none()));
    assert_eq!(events[3]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(events[3]["usageMetadata"]["promptTokenCount"], 5);
    assert_eq!(events[3]["usageMetadata"]["candidatesTokenCount"], 9);
    let streamed: String = events
        .iter()
        .map(|e| e["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap().to_owned())
        .collect();
    let whole = mock.call("POST", "/v1beta/models/gemini-x:generateContent", body).json();
    assert_eq!(whole["candidates"][0]["content"]["parts"][0]["text"].as_str(), Some(streamed.as_str()));
    let recorded = mock.call("GET", "/_mock/requests", "").json();
    assert_eq!(recorded[0]["query"], "alt=sse");
}

#[test]
fn a_tool_call_behaviour_answers_openai_with_tool_calls() {
    let mock = Mock::start(&["--chunks", "3"]);
    mock.call("PUT", "/_mock/behaviour", WEATHER_CALL);
    let v = mock.chat(json!({"model": "m"})).json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(
        (call["type"].as_str(), call["function"]["name"].as_str()),
        (Some("function"), Some("get_weather"))
    );
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "days": 2}));
    assert!(!call["id"].as_str().unwrap().is_empty());

    let reply = mock.chat(json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}));
    let events = reply.event_json();
    let deltas: Vec<&Value> = events.iter().filter_map(|e| e["choices"].get(0)).collect();
    assert_eq!(deltas[0]["delta"]["tool_calls"][0]["function"]["name"], "get_weather");
    let arguments: String =
        deltas.iter().filter_map(|d| d["delta"]["tool_calls"][0]["function"]["arguments"].as_str()).collect();
    assert_eq!(serde_json::from_str::<Value>(&arguments).unwrap(), json!({"city": "Paris", "days": 2}));
    assert_eq!(deltas.last().unwrap()["finish_reason"], "tool_calls");
    assert_eq!(events.last().unwrap()["usage"]["total_tokens"], 30);
    assert_eq!(reply.events().last().map(String::as_str), Some("[DONE]"));
}

#[test]
fn a_tool_call_behaviour_answers_anthropic_with_a_tool_use_block() {
    let mock = Mock::start(&["--chunks", "2"]);
    mock.call("PUT", "/_mock/behaviour", WEATHER_CALL);
    let v = mock.messages(json!({"model": "c", "max_tokens": 10})).json();
    assert_eq!(v["stop_reason"], "tool_use");
    let block = &v["content"][0];
    assert_eq!((block["type"].as_str(), block["name"].as_str()), (Some("tool_use"), Some("get_weather")));
    assert_eq!(block["input"], json!({"city": "Paris", "days": 2}));

    let events = mock.messages(json!({"model": "c", "max_tokens": 10, "stream": true})).named_events();
    assert_eq!(events[1].1["content_block"]["type"], "tool_use");
    assert_eq!(events[1].1["content_block"]["name"], "get_weather");
    let json_text: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&json_text).unwrap(), json!({"city": "Paris", "days": 2}));
    let message_delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(message_delta.1["delta"]["stop_reason"], "tool_use");
    assert_eq!(events.last().unwrap().0, "message_stop");
}

#[test]
fn a_tool_call_behaviour_answers_gemini_with_a_function_call_part() {
    let mock = Mock::start(&[]);
    mock.call("PUT", "/_mock/behaviour", WEATHER_CALL);
    let body = r#"{"contents":[{"role":"user","parts":[{"text":"weather?"}]}]}"#;
    let whole = mock.call("POST", "/v1beta/models/g:generateContent", body).json();
    let streamed = mock.call("POST", "/v1beta/models/g:streamGenerateContent?alt=sse", body).event_json();
    for v in [&whole, streamed.last().unwrap()] {
        let candidate = &v["candidates"][0];
        assert_eq!(
            candidate["content"]["parts"][0]["functionCall"],
            json!({"name": "get_weather", "args": {"city": "Paris", "days": 2}})
        );
        assert_eq!(candidate["finishReason"], "STOP");
        assert_eq!(v["usageMetadata"]["totalTokenCount"], 30);
    }
}

#[test]
fn a_counted_tool_call_behaviour_reverts_to_text() {
    let mock = Mock::start(&[]);
    mock.behave(json!({"tool_call": {"name": "f"}, "times": 1}));
    let first = mock.messages(json!({"model": "c", "max_tokens": 10})).json();
    assert_eq!(first["content"][0]["input"], json!({}));
    let second = mock.messages(json!({"model": "c", "max_tokens": 10})).json();
    assert_eq!(second["content"][0]["type"], "text");
}

#[test]
fn errors_take_the_shape_of_the_paths_protocol() {
    let mock = Mock::start(&[]);
    mock.behave(json!({"status": 529}));
    let anthropic = mock.messages(json!({"model": "c"}));
    assert_eq!(anthropic.status, 529);
    assert_eq!(anthropic.json()["type"], "error");
    assert_eq!(anthropic.json()["error"]["type"], "overloaded_error");
    mock.behave(json!({"status": 429}));
    let gemini = mock.call("POST", "/v1beta/models/g:generateContent", "{}");
    assert_eq!(
        gemini.json()["error"],
        json!({"code": 429, "message": "injected by burncloud-mock", "status": "RESOURCE_EXHAUSTED"})
    );
    mock.call("DELETE", "/_mock/behaviour", "");
    let bad = mock.call("POST", "/v1/messages", "{not json");
    assert_eq!((bad.status, bad.json()["error"]["type"].as_str()), (400, Some("invalid_request_error")));
    let bad = mock.call("POST", "/v1beta/models/g:streamGenerateContent?alt=sse", "{not json");
    assert_eq!((bad.status, bad.json()["error"]["status"].as_str()), (400, Some("INVALID_ARGUMENT")));
    let unknown = mock.call("POST", "/v1beta/models/g:countTokens", "{}");
    assert_eq!((unknown.status, unknown.json()["error"]["code"].as_i64()), (404, Some(404)));
}

#[test]
fn garbage_and_cut_faults_apply_to_gemini_streams_too() {
    let mock = Mock::start(&["--chunks", "4"]);
    mock.behave(json!({"fault": "garbage_body", "times": 1}));
    let garbage = mock.call("POST", "/v1beta/models/g:generateContent", "{}");
    assert!(serde_json::from_slice::<Value>(&garbage.body).is_err());
    mock.behave(json!({"fault": "disconnect_mid_stream", "fault_after_chunks": 3}));
    let cut = mock.call("POST", "/v1beta/models/g:streamGenerateContent?alt=sse", "{}");
    assert!(!cut.complete);
    assert_eq!(cut.event_json().len(), 3);
    assert!(cut.event_json().iter().all(|e| e.get("usageMetadata").is_none()));
}
