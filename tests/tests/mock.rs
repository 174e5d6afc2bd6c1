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
