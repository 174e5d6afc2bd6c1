//! End-to-end tests of the `burncloud` gateway: the real binary (`$BURNCLOUD_BIN`, else
//! `target/debug/burncloud`) in front of the project's mock upstream, on a fresh SQLite file or,
//! with `BURNCLOUD_TEST_DB=postgres`, a fresh Postgres database per test.
//!
//! Each test starts its own mock and gateway, speaks only the external contract (`shared/API.md`):
//! the OpenAI-compatible relay, the management API and the process signals, and asserts one
//! behaviour named by the test.

// The fixtures and assertion helpers below fail their test the same way the tests themselves do.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use burncloud_tests::harness::{
    ADMIN_KEY, ApiKey, CHANNEL_KEY, Gateway, GatewayOptions, HttpRequest, Mock, Response, WAIT, pause,
    unix_now, workspace_dir,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------- fixtures

/// A mock upstream, a gateway with one channel to it (models `gpt-x`, `text-x`, `embed-x`), one user
/// in group `default` and one unlimited key of that user.
struct Setup {
    mock: Mock,
    gw: Gateway,
    channel: i64,
    user: i64,
    key: ApiKey,
}

fn setup() -> Setup {
    setup_with(GatewayOptions::new())
}

fn setup_with(opts: GatewayOptions) -> Setup {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(opts);
    let channel = gw.create_channel(json!({"base_url": mock.base_url(), "models": "gpt-x,text-x,embed-x"}));
    let user = gw.create_user(json!({}));
    let key = gw.create_token(user, json!({}));
    Setup { mock, gw, channel, user, key }
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
}

fn stream_body(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn assert_error(resp: &Response, status: u16, code: &str) {
    assert_eq!(resp.status, status, "expected HTTP {status} {code}, got {}: {}", resp.status, resp.text());
    assert_eq!(resp.error_code(), code, "body: {}", resp.text());
}

fn request_id(resp: &Response) -> String {
    let id = resp.header("x-request-id").unwrap_or_else(|| panic!("no x-request-id in {:?}", resp.headers));
    assert!(!id.is_empty(), "empty x-request-id");
    id.to_string()
}

/// The content of the first choice of a chat completion.
fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("no message content in {v}"))
}

// ---------------------------------------------------------------- relay: the happy paths

#[test]
fn a_chat_completion_is_relayed_with_the_channel_key_and_billed_by_the_configured_ratios() {
    let s = setup();
    s.gw.put_option("ModelRatio", r#"{"gpt-x": 2.5}"#);
    s.gw.put_option("CompletionRatio", r#"{"gpt-x": 3}"#);
    s.mock.behave(json!({"prompt_tokens": 13, "completion_tokens": 7}));

    let resp = s.gw.chat(&s.key.key, &chat_body("gpt-x"));

    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert!(content(&body).starts_with("Hello"), "not the mock's completion: {body}");
    assert_eq!(
        (body["usage"]["prompt_tokens"].as_i64(), body["usage"]["completion_tokens"].as_i64()),
        (Some(13), Some(7))
    );
    let id = request_id(&resp);
    let overhead = resp.header("x-burncloud-overhead-us").unwrap_or_default();
    assert!(overhead.parse::<u64>().is_ok(), "x-burncloud-overhead-us is {overhead:?}");

    let seen = s.mock.requests();
    let upstream = seen.last().expect("the mock saw no request");
    assert_eq!(upstream.path(), "/v1/chat/completions");
    assert_eq!(upstream.header("authorization").as_deref(), Some(format!("Bearer {CHANNEL_KEY}").as_str()));
    assert_eq!(upstream.json()["model"], "gpt-x");

    let log = s.gw.consume_log(&id);
    assert_eq!(log["type"], 2);
    assert_eq!((log["prompt_tokens"].as_i64(), log["completion_tokens"].as_i64()), (Some(13), Some(7)));
    assert_eq!(log["is_stream"], false);
    assert_eq!(log["channel_id"], s.channel);
    assert_eq!(log["model_name"], "gpt-x");
    assert_eq!((log["user_id"].as_i64(), log["token_id"].as_i64()), (Some(s.user), Some(s.key.id)));
    // round((13 + 7 × 3) × 2.5) = 85
    assert_eq!(log["quota"], 85, "log: {log}");
    let priced: Value = serde_json::from_str(log["other"].as_str().unwrap()).unwrap();
    assert_eq!((priced["model_ratio"].as_f64(), priced["completion_ratio"].as_f64()), (Some(2.5), Some(3.0)));
    assert_eq!(priced["group_ratio"].as_f64(), Some(1.0));
    assert!(priced["pre_deducted"].as_i64().unwrap() >= 85, "the pre-deduction covered the cost: {priced}");
}

#[test]
fn a_streamed_chat_arrives_as_sse_events_ending_with_done_and_logs_the_reported_usage() {
    let s = setup();
    s.mock.behave(json!({"chunks": 4, "prompt_tokens": 9, "completion_tokens": 4}));

    let resp = s.gw.chat(&s.key.key, &stream_body("gpt-x"));

    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.header("content-type").unwrap_or_default().starts_with("text/event-stream"));
    let events = resp.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "events: {events:?}");
    let parsed: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let content_chunks =
        parsed.iter().filter(|e| e["choices"].as_array().is_some_and(|c| !c.is_empty())).count();
    assert_eq!(content_chunks, 4, "events: {events:?}");
    let usage = parsed.iter().find_map(|e| e.get("usage").filter(|u| u.is_object())).expect("no usage event");
    assert_eq!(usage["prompt_tokens"], 9);

    let log = s.gw.consume_log(&request_id(&resp));
    assert_eq!((log["prompt_tokens"].as_i64(), log["completion_tokens"].as_i64()), (Some(9), Some(4)));
    assert_eq!(log["is_stream"], true);
}

#[test]
fn stream_events_are_forwarded_as_they_arrive_not_buffered() {
    let s = setup();
    s.mock.behave(json!({"chunks": 5, "chunk_gap_ms": 100}));

    let started = Instant::now();
    let mut stream = HttpRequest::post("/v1/chat/completions")
        .bearer(&s.key.key)
        .json(&stream_body("gpt-x"))
        .open(s.gw.addr)
        .unwrap();
    let first = stream.next_event().unwrap().expect("no event");
    let first_at = started.elapsed();
    let mut last = first;
    while let Some(ev) = stream.next_event().unwrap() {
        last = ev;
    }
    let total = started.elapsed();

    assert_eq!(last, "[DONE]");
    assert!(first_at < Duration::from_millis(300), "first event after {first_at:?}");
    assert!(total >= Duration::from_millis(400), "whole stream in {total:?}: the gaps were not kept");
}

#[test]
fn a_text_completion_is_relayed_to_the_completions_endpoint_and_logged() {
    let s = setup();
    s.mock.behave(json!({"prompt_tokens": 5, "completion_tokens": 3}));

    let resp = s.gw.post("/v1/completions", &s.key.key, &json!({"model": "text-x", "prompt": "Once upon"}));

    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.json()["choices"][0]["text"].is_string(), "{}", resp.text());
    assert_eq!(s.mock.requests().last().unwrap().path(), "/v1/completions");
    let log = s.gw.consume_log(&request_id(&resp));
    assert_eq!((log["model_name"].as_str(), log["prompt_tokens"].as_i64()), (Some("text-x"), Some(5)));
}

#[test]
fn embeddings_are_relayed_to_the_embeddings_endpoint_and_logged() {
    let s = setup();
    s.mock.behave(json!({"prompt_tokens": 6}));

    let resp = s.gw.post("/v1/embeddings", &s.key.key, &json!({"model": "embed-x", "input": ["a", "b"]}));

    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["data"].as_array().map(Vec::len), Some(2), "{}", resp.text());
    assert_eq!(s.mock.requests().last().unwrap().path(), "/v1/embeddings");
    let log = s.gw.consume_log(&request_id(&resp));
    assert_eq!((log["model_name"].as_str(), log["prompt_tokens"].as_i64()), (Some("embed-x"), Some(6)));
}

fn model_ids(resp: &Response) -> Vec<String> {
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json();
    assert_eq!(v["object"], "list");
    let mut ids: Vec<String> =
        v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

#[test]
fn the_model_list_shows_only_the_models_of_the_keys_group() {
    let s = setup();
    s.gw.create_channel(json!({"base_url": s.mock.base_url(), "models": "vip-x", "group": "vip"}));

    let resp = HttpRequest::get("/v1/models").bearer(&s.key.key).send(s.gw.addr);

    assert_eq!(model_ids(&resp), ["embed-x", "gpt-x", "text-x"]);
}

#[test]
fn the_model_list_of_a_key_with_a_model_allow_list_shows_only_those_models() {
    let s = setup();
    let limited = s.gw.create_token(s.user, json!({"models": ["gpt-x", "embed-x"]}));

    let resp = HttpRequest::get("/v1/models").bearer(&limited.key).send(s.gw.addr);

    assert_eq!(model_ids(&resp), ["embed-x", "gpt-x"]);
}

// ---------------------------------------------------------------- routing

#[test]
fn model_mapping_sends_the_upstream_name_and_logs_the_requested_name() {
    let s = setup();
    let mapped = s.gw.create_channel(json!({
        "base_url": s.mock.base_url(),
        "models": "gpt-mapped",
        "model_mapping": {"gpt-mapped": "upstream-x"},
    }));

    let resp = s.gw.chat(&s.key.key, &chat_body("gpt-mapped"));

    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(s.mock.requests().last().unwrap().json()["model"], "upstream-x");
    let log = s.gw.consume_log(&request_id(&resp));
    assert_eq!((log["model_name"].as_str(), log["channel_id"].as_i64()), (Some("gpt-mapped"), Some(mapped)));
}

#[test]
fn a_default_group_key_cannot_reach_a_vip_only_channel() {
    let s = setup();
    s.gw.create_channel(json!({"base_url": s.mock.base_url(), "models": "vip-x", "group": "vip"}));

    let resp = s.gw.chat(&s.key.key, &chat_body("vip-x"));

    assert_error(&resp, 503, "model_not_available");
    assert!(s.mock.requests().is_empty(), "the upstream was called");
}

#[test]
fn a_vip_user_key_reaches_a_vip_only_channel() {
    let s = setup();
    let vip_channel =
        s.gw.create_channel(json!({"base_url": s.mock.base_url(), "models": "vip-x", "group": "vip"}));
    let vip_user = s.gw.create_user(json!({"group": "vip"}));
    let vip_key = s.gw.create_token(vip_user, json!({}));

    let resp = s.gw.chat(&vip_key.key, &chat_body("vip-x"));

    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(s.gw.consume_log(&request_id(&resp))["channel_id"], vip_channel);
}

#[test]
fn an_auto_key_walks_the_auto_groups_in_order_and_pays_the_ratio_of_the_group_that_served() {
    let s = setup();
    let svip = Mock::start(&[]);
    svip.behave(json!({"status": 503}));
    let svip_channel =
        s.gw.create_channel(json!({"base_url": svip.base_url(), "models": "auto-x", "group": "svip"}));
    let vip_channel =
        s.gw.create_channel(json!({"base_url": s.mock.base_url(), "models": "auto-x", "group": "vip"}));
    s.gw.put_option("AutoGroups", r#"["svip", "vip", "default"]"#);
    s.gw.put_option("UserUsableGroups", r#"{"vip": "VIP", "svip": "super VIP"}"#);
    s.gw.put_option("ModelRatio", r#"{"auto-x": 1, "gpt-x": 1}"#);
    s.gw.put_option("GroupRatio", r#"{"svip": 3, "vip": 2}"#);
    s.mock.behave(json!({"prompt_tokens": 10, "completion_tokens": 5}));
    let auto_key = s.gw.create_token(s.user, json!({"group": "auto"}));

    // svip comes first but fails; the request falls through to vip and pays vip's ratio.
    let resp = s.gw.chat(&auto_key.key, &chat_body("auto-x"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let log = s.gw.consume_log(&request_id(&resp));
    assert_eq!(log["channel_id"], vip_channel);
    assert_eq!(log["quota"], 30, "(10 + 5) × ModelRatio 1 × GroupRatio 2: {log}");
    assert_eq!(log["group"], "vip");
    assert_eq!(svip.requests().len(), 1, "svip was tried first");
    let _ = svip_channel;

    // A model only the user's own group serves is found there; a group the user may not use is not.
    let resp = s.gw.chat(&auto_key.key, &chat_body("gpt-x"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    s.gw.put_option("UserUsableGroups", "{}");
    assert_error(&s.gw.chat(&auto_key.key, &chat_body("auto-x")), 503, "model_not_available");
    let models = HttpRequest::get("/v1/models").bearer(&auto_key.key).send(s.gw.addr).json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"gpt-x") && !ids.contains(&"auto-x"), "{ids:?}");
}

#[test]
fn disabling_the_only_channel_of_a_model_makes_it_unavailable_at_once() {
    let s = setup();
    for _ in 0..4 {
        assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-x")).status, 200, "before disabling");
    }

    s.gw.api("PUT", &format!("/api/channel/{}", s.channel), Some(&json!({"status": 2})));

    for _ in 0..4 {
        assert_error(&s.gw.chat(&s.key.key, &chat_body("gpt-x")), 503, "model_not_available");
    }
}

/// A failing channel A (priority 10) and a healthy channel B (priority 0) serving `gpt-f`.
struct Failover {
    s: Setup,
    failing: Mock,
    channel_b: i64,
}

fn failover_setup(failing_behaviour: Value) -> Failover {
    let s = setup();
    let failing = Mock::start(&[]);
    failing.behave(failing_behaviour);
    s.gw.create_channel(json!({"base_url": failing.base_url(), "models": "gpt-f", "priority": 10}));
    let channel_b =
        s.gw.create_channel(json!({"base_url": s.mock.base_url(), "models": "gpt-f", "priority": 0}));
    Failover { s, failing, channel_b }
}

#[test]
fn a_request_fails_over_from_a_channel_answering_500_to_the_next_priority() {
    let f = failover_setup(
        json!({"status": 500, "body": {"error": {"message": "boom", "type": "server_error"}}}),
    );

    let resp = f.s.gw.chat(&f.s.key.key, &chat_body("gpt-f"));

    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(f.failing.requests().len(), 1, "the higher-priority channel was not tried first");
    assert_eq!(f.s.gw.consume_log(&request_id(&resp))["channel_id"], f.channel_b);
}

#[test]
fn with_retry_times_0_a_failing_first_channel_fails_the_request_with_502_upstream_error() {
    let f = failover_setup(
        json!({"status": 500, "body": {"error": {"message": "boom", "type": "server_error"}}}),
    );
    f.s.gw.put_option("RetryTimes", "0");

    let resp = f.s.gw.chat(&f.s.key.key, &chat_body("gpt-f"));

    assert_error(&resp, 502, "upstream_error");
    assert!(f.s.mock.requests().is_empty(), "the second channel was tried");
}

#[test]
fn a_channel_on_a_closed_port_fails_over_to_the_next_channel() {
    let s = setup();
    s.gw.create_channel(json!({
        "base_url": format!("http://127.0.0.1:{}", closed_port()),
        "models": "gpt-f",
        "priority": 10,
    }));
    let healthy = s.gw.create_channel(json!({"base_url": s.mock.base_url(), "models": "gpt-f"}));

    let resp = s.gw.chat(&s.key.key, &chat_body("gpt-f"));

    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(s.gw.consume_log(&request_id(&resp))["channel_id"], healthy);
}

#[test]
fn a_channel_that_fails_every_request_is_logged_once_a_second_with_the_failures_in_between_counted() {
    let mut s = setup_with(GatewayOptions::new().env("BURNCLOUD_WORKERS", 1));
    // Cooldowns out of the way: every request tries the refusing channel first.
    s.gw.put_option("ChannelCooldownFailures", "4000000000");
    let refusing = s.gw.create_channel(json!({
        "base_url": format!("http://127.0.0.1:{}", closed_port()),
        "models": "gpt-f",
        "priority": 10,
    }));
    let healthy = s.gw.create_channel(json!({"base_url": s.mock.base_url(), "models": "gpt-f"}));

    let burst = Instant::now();
    for _ in 0..20 {
        let resp = s.gw.chat(&s.key.key, &chat_body("gpt-f"));
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(s.gw.consume_log(&request_id(&resp))["channel_id"], healthy);
    }
    let burst = burst.elapsed();
    // Past the interval, the next failure is logged and reports the ones before it.
    pause(Duration::from_millis(1_100));
    assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-f")).status, 200);
    assert!(s.gw.terminate().success());

    let stderr = s.gw.take_stderr();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("upstream attempt failed") && l.contains(&format!("channel={refusing}")))
        .collect();
    let unlogged: u64 = lines
        .iter()
        .map(|l| {
            let (_, rest) = l.split_once("unlogged_failures=").unwrap_or_else(|| panic!("no count in {l}"));
            rest.split_whitespace().next().unwrap_or_default().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(lines.len() as u64 + unlogged, 21, "every failure is logged or counted:\n{stderr}");
    let allowed = 2 + burst.as_secs() as usize;
    assert!(lines.len() <= allowed, "{} lines for 21 failures in {burst:?}:\n{stderr}", lines.len());
    assert!(lines.last().is_some_and(|l| !l.contains("unlogged_failures=0")), "{stderr}");
}

// ---------------------------------------------------------------- relay: refusals

#[test]
fn a_request_without_a_key_is_refused_with_401_invalid_api_key() {
    let s = setup();
    let resp = HttpRequest::post("/v1/chat/completions").json(&chat_body("gpt-x")).send(s.gw.addr);
    assert_error(&resp, 401, "invalid_api_key");
    request_id(&resp);
}

#[test]
fn an_unknown_key_is_refused_with_401_invalid_api_key() {
    let s = setup();
    let resp = s.gw.chat("sk-this-key-was-never-issued-by-the-gateway", &chat_body("gpt-x"));
    assert_error(&resp, 401, "invalid_api_key");
}

#[test]
fn a_key_is_also_accepted_from_x_api_key() {
    let s = setup();
    let resp = HttpRequest::post("/v1/chat/completions")
        .header("x-api-key", &s.key.key)
        .json(&chat_body("gpt-x"))
        .send(s.gw.addr);
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[test]
fn a_key_is_also_accepted_from_the_key_query_parameter() {
    let s = setup();
    let resp = HttpRequest::post(&format!("/v1/chat/completions?key={}", s.key.key))
        .json(&chat_body("gpt-x"))
        .send(s.gw.addr);
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[test]
fn disabling_a_key_refuses_it_at_once_with_403_token_disabled() {
    let s = setup();
    for _ in 0..4 {
        assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-x")).status, 200, "before disabling");
    }

    s.gw.api("PUT", &format!("/api/token/{}", s.key.id), Some(&json!({"status": 2})));

    for _ in 0..4 {
        assert_error(&s.gw.chat(&s.key.key, &chat_body("gpt-x")), 403, "token_disabled");
    }
}

#[test]
fn an_expired_key_is_refused_with_403_token_expired() {
    let s = setup();
    let key = s.gw.create_token(s.user, json!({"expired_time": unix_now() - 3600}));
    assert_error(&s.gw.chat(&key.key, &chat_body("gpt-x")), 403, "token_expired");
}

#[test]
fn a_key_without_remaining_quota_is_refused_with_403_token_quota_exhausted() {
    let s = setup();
    let key = s.gw.create_token(s.user, json!({"remain_quota": 0, "unlimited_quota": false}));
    assert_error(&s.gw.chat(&key.key, &chat_body("gpt-x")), 403, "token_quota_exhausted");
}

#[test]
fn a_model_outside_the_keys_allow_list_is_refused_with_403_model_not_allowed() {
    let s = setup();
    let key = s.gw.create_token(s.user, json!({"models": ["text-x"]}));
    assert_error(&s.gw.chat(&key.key, &chat_body("gpt-x")), 403, "model_not_allowed");
}

#[test]
fn a_client_outside_the_keys_ip_allow_list_is_refused_with_403_ip_not_allowed() {
    let s = setup();
    let key = s.gw.create_token(s.user, json!({"allow_ips": "10.0.0.1"}));
    assert_error(&s.gw.chat(&key.key, &chat_body("gpt-x")), 403, "ip_not_allowed");
}

#[test]
fn a_client_inside_the_keys_ip_allow_list_is_served() {
    let s = setup();
    let key = s.gw.create_token(s.user, json!({"allow_ips": "10.0.0.1,127.0.0.0/8"}));
    assert_eq!(s.gw.chat(&key.key, &chat_body("gpt-x")).status, 200);
}

#[test]
fn a_model_no_channel_serves_is_refused_with_503_model_not_available() {
    let s = setup();
    assert_error(&s.gw.chat(&s.key.key, &chat_body("no-such-model")), 503, "model_not_available");
}

#[test]
fn malformed_json_is_refused_with_400_invalid_request() {
    let s = setup();
    let resp = HttpRequest::post("/v1/chat/completions")
        .bearer(&s.key.key)
        .header("Content-Type", "application/json")
        .body(r#"{"model": "gpt-x", "messages": [{"#)
        .send(s.gw.addr);
    assert_error(&resp, 400, "invalid_request");
}

#[test]
fn a_body_without_a_model_is_refused_with_400_invalid_request() {
    let s = setup();
    let resp = s.gw.chat(&s.key.key, &json!({"messages": [{"role": "user", "content": "hi"}]}));
    assert_error(&resp, 400, "invalid_request");
}

#[test]
fn a_body_over_the_limit_is_refused_with_413_request_too_large() {
    let s = setup_with(GatewayOptions::new().env("BURNCLOUD_MAX_BODY_BYTES", 4096));
    let big = "x".repeat(16 * 1024);
    let resp =
        s.gw.chat(&s.key.key, &json!({"model": "gpt-x", "messages": [{"role": "user", "content": big}]}));
    assert_error(&resp, 413, "request_too_large");
    assert!(s.mock.requests().is_empty(), "the upstream was called");
}

#[test]
fn a_header_over_16_kib_is_refused_with_431() {
    let s = setup();
    let resp = HttpRequest::post("/v1/chat/completions")
        .bearer(&s.key.key)
        .header("X-Padding", &"p".repeat(17 * 1024))
        .json(&chat_body("gpt-x"))
        .send(s.gw.addr);
    assert_error(&resp, 431, "request_too_large");
}

#[test]
fn an_upstream_500_on_every_channel_becomes_502_upstream_error() {
    let s = setup();
    let second = Mock::start(&[]);
    s.gw.create_channel(json!({"base_url": second.base_url(), "models": "gpt-x"}));
    for m in [&s.mock, &second] {
        m.behave(json!({"status": 500, "body": {"error": {"message": "down", "type": "server_error"}}}));
    }

    let resp = s.gw.chat(&s.key.key, &chat_body("gpt-x"));

    assert_error(&resp, 502, "upstream_error");
    assert_eq!(s.mock.requests().len() + second.requests().len(), 2, "both channels should have been tried");
}

#[test]
fn an_upstream_400_is_passed_on_as_400_upstream_error() {
    let s = setup();
    s.mock.behave(json!({
        "status": 400,
        "body": {"error": {"message": "messages must not be empty", "type": "invalid_request_error"}},
    }));

    let resp = s.gw.chat(&s.key.key, &chat_body("gpt-x"));

    assert_error(&resp, 400, "upstream_error");
    assert!(resp.json()["error"]["message"].as_str().unwrap().contains("messages must not be empty"));
}

// ---------------------------------------------------------------- management API

#[test]
fn management_calls_without_or_with_a_wrong_admin_key_get_401() {
    let gw = Gateway::start(GatewayOptions::new());
    let none = HttpRequest::get("/api/channel/").send(gw.addr);
    let wrong = HttpRequest::get("/api/channel/").bearer("not-the-admin-key-0000000000000").send(gw.addr);
    let relay_key_shape = HttpRequest::post("/api/user/")
        .bearer(&format!("{ADMIN_KEY}x"))
        .json(&json!({"username": "mallory", "password": "password-123"}))
        .send(gw.addr);
    for resp in [none, wrong, relay_key_shape] {
        assert_eq!(resp.status, 401, "{}", resp.text());
        assert_eq!(resp.json()["success"], false);
    }
}

fn assert_refused(resp: &Response) {
    let v = resp.json();
    assert_eq!(v["success"], false, "HTTP {}: {v}", resp.status);
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "no message: {v}");
    assert!(resp.status == 200 || (400..500).contains(&resp.status), "HTTP {}: {v}", resp.status);
}

#[test]
fn channels_can_be_listed_with_tag_and_status_filters_and_a_total() {
    let gw = Gateway::start(GatewayOptions::new());
    let base = format!("http://127.0.0.1:{}", closed_port());
    gw.create_channel(json!({"base_url": base, "tag": "alpha"}));
    gw.create_channel(json!({"base_url": base, "tag": "alpha", "status": 2}));
    gw.create_channel(json!({"base_url": base, "tag": "beta"}));

    let total = |query: &str| gw.api("GET", &format!("/api/channel/?{query}"), None)["total"].as_i64();

    assert_eq!(total(""), Some(3));
    assert_eq!(total("tag=alpha"), Some(2));
    assert_eq!(total("status=2"), Some(1));
    assert_eq!(total("tag=alpha&status=1"), Some(1));
    let page = gw.api("GET", "/api/channel/?page=2&page_size=2", None);
    assert_eq!((page["items"].as_array().map(Vec::len), page["total"].as_i64()), (Some(1), Some(3)));
}

#[test]
fn a_channel_can_be_read_updated_in_part_and_deleted() {
    let gw = Gateway::start(GatewayOptions::new());
    let base = format!("http://127.0.0.1:{}", closed_port());
    let id = gw.create_channel(json!({"name": "primary", "base_url": base, "models": "a,b", "priority": 3}));

    let read = gw.api("GET", &format!("/api/channel/{id}"), None);
    assert_eq!(
        (read["name"].as_str(), read["type"].as_str(), read["priority"].as_i64()),
        (Some("primary"), Some("openai"), Some(3))
    );
    assert_ne!(read["key"], CHANNEL_KEY, "the upstream key is shown unmasked");

    let updated = gw.api("PUT", &format!("/api/channel/{id}"), Some(&json!({"priority": 7, "tag": "moved"})));
    assert_eq!((updated["name"].as_str(), updated["priority"].as_i64()), (Some("primary"), Some(7)));
    assert_eq!(gw.api("GET", &format!("/api/channel/{id}"), None)["tag"], "moved");

    gw.api("DELETE", &format!("/api/channel/{id}"), None);
    let gone = gw.admin("GET", &format!("/api/channel/{id}"), None);
    assert_refused(&gone);
    assert_eq!(gw.api("GET", "/api/channel/", None)["total"], 0);
}

#[test]
fn a_channel_with_an_unknown_type_is_refused_with_a_message() {
    let gw = Gateway::start(GatewayOptions::new());
    let body = json!({"name": "c", "type": "carrier-pigeon", "base_url": "http://127.0.0.1:9", "key": "k", "models": "m"});
    let resp = gw.admin("POST", "/api/channel/", Some(&body));
    assert_refused(&resp);
    assert_eq!(resp.status, 400);
    assert_eq!(gw.api("GET", "/api/channel/", None)["total"], 0);
}

#[test]
fn a_channel_with_a_bad_base_url_is_refused_with_a_message() {
    let gw = Gateway::start(GatewayOptions::new());
    let body = json!({"name": "c", "type": "openai", "base_url": "not a url", "key": "k", "models": "m"});
    let resp = gw.admin("POST", "/api/channel/", Some(&body));
    assert_refused(&resp);
    assert_eq!(resp.status, 400);
    assert_eq!(gw.api("GET", "/api/channel/", None)["total"], 0);
}

#[test]
fn a_user_can_be_created_read_and_updated_and_a_duplicate_name_is_refused() {
    let gw = Gateway::start(GatewayOptions::new());
    let id = gw.create_user(json!({"username": "alice", "quota": 1234}));

    let read = gw.api("GET", &format!("/api/user/{id}"), None);
    assert_eq!((read["username"].as_str(), read["group"].as_str()), (Some("alice"), Some("default")));
    assert_eq!(
        (read["quota"].as_i64(), read["used_quota"].as_i64(), read["request_count"].as_i64()),
        (Some(1234), Some(0), Some(0))
    );
    assert!(
        read.get("password").is_none() && read.get("password_hash").is_none(),
        "password exposed: {read}"
    );

    let updated = gw.api("PUT", &format!("/api/user/{id}"), Some(&json!({"group": "vip"})));
    assert_eq!((updated["group"].as_str(), updated["quota"].as_i64()), (Some("vip"), Some(1234)));

    let dup =
        gw.admin("POST", "/api/user/", Some(&json!({"username": "alice", "password": "another-pass-1"})));
    assert_refused(&dup);
}

#[test]
fn a_topup_grows_the_users_quota_and_writes_a_topup_log() {
    let gw = Gateway::start(GatewayOptions::new());
    let id = gw.create_user(json!({"quota": 1000}));

    let after = gw.api("POST", &format!("/api/user/{id}/topup"), Some(&json!({"quota": 500})));

    assert_eq!(after["quota"], 1500);
    assert_eq!(gw.api("GET", &format!("/api/user/{id}"), None)["quota"], 1500);
    let topups = gw.logs(&format!("type=1&user_id={id}"));
    assert_eq!(topups.len(), 1, "{topups:?}");
    assert_eq!(topups[0]["quota"], 500, "{topups:?}");
}

#[test]
fn a_relayed_request_is_charged_to_the_users_quota() {
    let s = setup();
    s.gw.put_option("ModelRatio", r#"{"gpt-x": 1}"#);
    s.mock.behave(json!({"prompt_tokens": 40, "completion_tokens": 10}));
    let before = s.gw.api("GET", &format!("/api/user/{}", s.user), None);

    let resp = s.gw.chat(&s.key.key, &chat_body("gpt-x"));

    assert_eq!(resp.status, 200, "{}", resp.text());
    let cost = s.gw.consume_log(&request_id(&resp))["quota"].as_i64().unwrap();
    assert_eq!(cost, 50);
    let after = s.gw.api("GET", &format!("/api/user/{}", s.user), None);
    assert_eq!(after["quota"].as_i64(), before["quota"].as_i64().map(|q| q - cost), "user: {after}");
    assert_eq!(
        (after["used_quota"].as_i64(), after["request_count"].as_i64()),
        (Some(cost), Some(1)),
        "user: {after}"
    );
}

#[test]
fn a_token_is_shown_masked_after_creation_and_can_be_updated() {
    let gw = Gateway::start(GatewayOptions::new());
    let user = gw.create_user(json!({}));
    let key = gw.create_token(user, json!({"name": "ci", "remain_quota": 100, "unlimited_quota": false}));

    let read = gw.api("GET", &format!("/api/token/{}", key.id), None);
    let shown = read["key"].as_str().unwrap_or_default();
    assert!(
        !shown.is_empty() && shown != key.key && !shown.contains(&key.key[3..]),
        "key not masked: {shown}"
    );
    assert_eq!((read["name"].as_str(), read["remain_quota"].as_i64()), (Some("ci"), Some(100)));

    let updated =
        gw.api("PUT", &format!("/api/token/{}", key.id), Some(&json!({"name": "cd", "remain_quota": 50})));
    assert_eq!((updated["name"].as_str(), updated["remain_quota"].as_i64()), (Some("cd"), Some(50)));
    assert_ne!(updated["key"].as_str(), Some(key.key.as_str()), "update shows the full key");
}

#[test]
fn a_deleted_key_is_refused_at_once_with_401() {
    let s = setup();
    for _ in 0..4 {
        assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-x")).status, 200, "before deleting");
    }

    s.gw.api("DELETE", &format!("/api/token/{}", s.key.id), None);

    assert_refused(&s.gw.admin("GET", &format!("/api/token/{}", s.key.id), None));
    for _ in 0..4 {
        assert_error(&s.gw.chat(&s.key.key, &chat_body("gpt-x")), 401, "invalid_api_key");
    }
}

#[test]
fn logs_can_be_filtered_by_user_key_model_and_type() {
    let s = setup();
    let other_user = s.gw.create_user(json!({}));
    let other_key = s.gw.create_token(other_user, json!({}));
    for _ in 0..2 {
        assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-x")).status, 200);
    }
    assert_eq!(s.gw.chat(&other_key.key, &chat_body("text-x")).status, 200);
    s.gw.api("POST", &format!("/api/user/{}/topup", s.user), Some(&json!({"quota": 10})));

    let count = |q: &str| s.gw.log_page(q).1;

    assert_eq!(count("type=2"), 3);
    assert_eq!(count(&format!("type=2&user_id={}", s.user)), 2);
    assert_eq!(count(&format!("token_id={}", other_key.id)), 1);
    assert_eq!(count("model=text-x"), 1);
    assert_eq!(count(&format!("type=1&user_id={}", s.user)), 1);
    assert_eq!(count(&format!("type=1&user_id={other_user}")), 0);
}

// ---------------------------------------------------------------- upstream faults

#[test]
fn a_mid_stream_upstream_disconnect_ends_the_client_stream_and_the_gateway_stays_healthy() {
    let s = setup();
    s.mock.behave(json!({"chunks": 6, "chunk_gap_ms": 20, "fault": "disconnect_mid_stream", "fault_after_chunks": 2, "times": 1}));

    let started = Instant::now();
    let mut stream = HttpRequest::post("/v1/chat/completions")
        .bearer(&s.key.key)
        .json(&stream_body("gpt-x"))
        .open(s.gw.addr)
        .unwrap();
    assert_eq!(stream.status, 200);
    let mut events = Vec::new();
    // The stream ends either cleanly (an error event) or by a closed connection; it must not hang.
    while let Ok(Some(ev)) = stream.next_event() {
        events.push(ev);
    }
    assert!(started.elapsed() < WAIT, "the client stream hung");
    assert!(!events.iter().any(|e| e == "[DONE]"), "a broken stream ended as if complete: {events:?}");

    let health = HttpRequest::get("/healthz").send(s.gw.addr);
    assert_eq!(health.status, 200);
    assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-x")).status, 200, "the gateway did not recover");
}

#[test]
fn a_garbage_upstream_body_fails_over_to_another_channel() {
    let f = failover_setup(json!({"fault": "garbage_body"}));

    let resp = f.s.gw.chat(&f.s.key.key, &chat_body("gpt-f"));

    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(content(&resp.json()).starts_with("Hello"), "{}", resp.text());
    assert_eq!(f.s.gw.consume_log(&request_id(&resp))["channel_id"], f.channel_b);
}

#[test]
fn a_garbage_upstream_body_on_the_only_channel_becomes_502_upstream_error() {
    let s = setup();
    s.mock.behave(json!({"fault": "garbage_body"}));
    assert_error(&s.gw.chat(&s.key.key, &chat_body("gpt-x")), 502, "upstream_error");
}

#[test]
fn an_upstream_closing_before_responding_fails_over_to_another_channel() {
    let f = failover_setup(json!({"fault": "close_before_response"}));

    let resp = f.s.gw.chat(&f.s.key.key, &chat_body("gpt-f"));

    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(f.s.gw.consume_log(&request_id(&resp))["channel_id"], f.channel_b);
}

#[test]
fn an_upstream_closing_before_responding_on_the_only_channel_becomes_502_upstream_error() {
    let s = setup();
    s.mock.behave(json!({"fault": "close_before_response"}));
    assert_error(&s.gw.chat(&s.key.key, &chat_body("gpt-x")), 502, "upstream_error");
}

#[test]
fn an_upstream_slower_than_the_first_byte_timeout_becomes_502_upstream_error() {
    let s = setup_with(GatewayOptions::new().env("BURNCLOUD_UPSTREAM_FIRST_BYTE_TIMEOUT_MS", 300));
    s.mock.behave(json!({"fault": "slow_headers", "latency_ms": 5000}));

    let started = Instant::now();
    let resp = s.gw.chat(&s.key.key, &chat_body("gpt-x"));

    assert_error(&resp, 502, "upstream_error");
    assert!(started.elapsed() < Duration::from_secs(4), "answered after {:?}", started.elapsed());
}

// ---------------------------------------------------------------- process lifecycle

#[test]
fn sigterm_under_load_exits_0_and_loses_no_consume_log() {
    let mut s = setup_with(GatewayOptions::new().env("BURNCLOUD_DRAIN_TIMEOUT_MS", 10_000));
    s.mock.behave(json!({"latency_ms": 20}));
    let (addr, key) = (s.gw.addr, s.key.key.clone());
    let ok = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));

    let clients: Vec<_> = (0..16)
        .map(|i| {
            let (key, ok, answered) = (key.clone(), ok.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut other_statuses = Vec::new();
                for _ in 0..(200 / 16 + usize::from(i < 200 % 16)) {
                    let req =
                        HttpRequest::post("/v1/chat/completions").bearer(&key).json(&chat_body("gpt-x"));
                    match req.try_send(addr) {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => {
                            answered.fetch_add(1, Ordering::SeqCst);
                            other_statuses.push(r.status);
                        }
                        Err(_) => {} // refused or reset once the gateway stopped accepting
                    }
                }
                other_statuses
            })
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    while answered.load(Ordering::SeqCst) < 40 && Instant::now() < deadline {
        pause(Duration::from_millis(2));
    }
    let status = s.gw.terminate();
    let other: Vec<u16> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();

    assert!(status.success(), "the gateway exited with {status:?}");
    let ok = ok.load(Ordering::SeqCst);
    assert!(ok >= 40, "only {ok} requests succeeded before the stop");
    assert!(ok < 200, "every request succeeded: the stop did not land while requests were running");
    let restarted = Gateway::start(GatewayOptions::new().database(&s.gw.database()));
    let logged = restarted.log_page("type=2&page_size=1").1;
    assert_eq!(
        logged, ok as i64,
        "{ok} clients got 200 but {logged} consume logs were kept (other answers: {other:?})"
    );
}

#[test]
fn channels_users_and_keys_survive_a_restart_on_the_same_database() {
    let mut s = setup();
    assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-x")).status, 200);
    assert!(s.gw.terminate().success());

    let gw = Gateway::start(GatewayOptions::new().database(&s.gw.database()));

    let resp = gw.chat(&s.key.key, &chat_body("gpt-x"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(gw.consume_log(&request_id(&resp))["channel_id"], s.channel);
    assert_eq!(gw.log_page("type=2").1, 2, "the log written before the restart is gone");
}

/// Polls `f` until it is true or `limit` passes; whether it became true.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        pause(Duration::from_millis(20));
    }
}

#[test]
fn a_change_at_one_instance_reaches_another_sharing_redis_at_once() {
    let redis = std::env::var("BURNCLOUD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let namespace = burncloud_tests::harness::unique_name("reload-");
    let opts = || {
        GatewayOptions::new().env("BURNCLOUD_REDIS_URL", &redis).env("BURNCLOUD_REDIS_NAMESPACE", &namespace)
    };
    let s = setup_with(opts());
    // One worker, so the key cached by its first request is the cache the change must reach. Two
    // processes on one SQLite file work (WAL), but each needs a spill file of its own.
    let spill = std::env::temp_dir().join(burncloud_tests::harness::unique_name("bc-reload-spill-"));
    let b = Gateway::start(
        opts()
            .env("BURNCLOUD_WORKERS", 1)
            .env("BURNCLOUD_SPILL_PATH", spill.display())
            .database(&s.gw.database()),
    );
    assert_eq!(b.chat(&s.key.key, &chat_body("gpt-x")).status, 200);

    // A key disabled at one instance is refused by the other, although the other has it cached.
    s.gw.api("PUT", &format!("/api/token/{}", s.key.id), Some(&json!({"status": 2})));
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || b.chat(&s.key.key, &chat_body("gpt-x")).status == 403),
        "the other instance still serves a disabled key"
    );
    let key_latency = started.elapsed();
    s.gw.api("PUT", &format!("/api/token/{}", s.key.id), Some(&json!({"status": 1})));

    // A channel created at one instance is routed to by the other.
    s.gw.create_channel(json!({"base_url": s.mock.base_url(), "models": "fresh-model"}));
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || b.chat(&s.key.key, &chat_body("fresh-model")).status == 200),
        "the other instance never routed to the new channel: {}",
        b.chat(&s.key.key, &chat_body("fresh-model")).text()
    );
    eprintln!(
        "announced across instances: key change {key_latency:?}, channel change {:?}",
        started.elapsed()
    );
}

#[test]
fn an_export_imported_into_a_fresh_gateway_serves_the_same_keys_and_a_second_import_adds_nothing() {
    let s = setup();
    s.gw.put_option("ModelRatio", r#"{"gpt-x": 2}"#);
    s.gw.api("POST", &format!("/api/user/{}/topup", s.user), Some(&json!({"quota": 1234})));
    let doc = s.gw.api("GET", "/api/export", None);
    assert_eq!((doc["format"].as_str(), doc["version"].as_i64()), (Some("burncloud"), Some(1)));
    assert!(doc["options"].get("AdminKeyHash").is_none(), "the admin key's hash is not exported");
    assert_eq!(doc["channels"][0]["key"], CHANNEL_KEY, "upstream keys are exported in full");

    let other = Gateway::start(GatewayOptions::new());
    let summary = other.api("POST", "/api/import", Some(&doc));
    assert_eq!(
        (summary["channels"].as_i64(), summary["users"].as_i64(), summary["tokens"].as_i64()),
        (Some(1), Some(1), Some(1))
    );

    // The same key works on the other gateway, priced by the imported ratio, against the imported quota.
    s.mock.behave(json!({"prompt_tokens": 10, "completion_tokens": 10}));
    let resp = other.chat(&s.key.key, &chat_body("gpt-x"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(other.consume_log(&request_id(&resp))["quota"], 40);
    let users = other.api("GET", "/api/user/1", None);
    assert_eq!(users["quota"].as_i64(), Some(100_000_000 + 1234 - 40), "{users}");

    // Importing again conflicts on the username: nothing is added, not even the channel.
    let again = other.admin("POST", "/api/import", Some(&doc));
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(other.api("GET", "/api/channel/", None)["total"], 1);
    let bad = other.admin("POST", "/api/import", Some(&json!({"format": "other", "version": 1})));
    assert_eq!(bad.status, 400, "{}", bad.text());
}

// ---------------------------------------------------------------- official SDK

fn python() -> std::path::PathBuf {
    match std::env::var_os("BURNCLOUD_TEST_PYTHON") {
        Some(p) if !p.is_empty() => p.into(),
        _ => workspace_dir().join(".venv/bin/python"),
    }
}

#[test]
fn the_openai_python_sdk_works_against_the_gateway() {
    let python = python();
    let has_sdk =
        Command::new(&python).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if !has_sdk && std::env::var("CI").as_deref() != Ok("true") {
        eprintln!("skipped: {} cannot import openai (CI would run this test)", python.display());
        return;
    }
    let s = setup();
    s.mock.behave(json!({"prompt_tokens": 21, "completion_tokens": 8, "chunks": 3}));
    let script = workspace_dir().join("tests/python/test_openai_sdk.py");

    let out = Command::new(&python)
        .arg(&script)
        .env("OPENAI_BASE_URL", format!("{}/v1", s.gw.base_url()))
        .env("OPENAI_API_KEY", &s.key.key)
        .env("BURNCLOUD_TEST_MODEL", "gpt-x")
        .env("BURNCLOUD_TEST_EMBEDDING_MODEL", "embed-x")
        .env("BURNCLOUD_TEST_PROMPT_TOKENS", "21")
        .env("BURNCLOUD_TEST_COMPLETION_TOKENS", "8")
        .output()
        .unwrap_or_else(|e| panic!("running {} {}: {e}", python.display(), script.display()));

    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the SDK script failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_eq!(s.gw.log_page("type=2&model=gpt-x").1, 2, "chat calls not logged\n{stdout}");
}

// ---------------------------------------------------------------- HTTPS upstreams

/// A test CA and a `localhost` certificate signed by it, made with the `openssl` command.
fn make_tls_files(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
    ]
    .into_iter()
    .chain(["-subj", "/CN=BurnCloud test CA", "-addext", "basicConstraints=critical,CA:TRUE"])
    .collect::<Vec<_>>());
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// nginx terminating TLS on a free port in front of `upstream`; stopped on drop.
struct TlsFront {
    child: std::process::Child,
    port: u16,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_front(dir: &std::path::Path, upstream: &str) -> Option<TlsFront> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| std::path::Path::new(p).exists());
    let Some(nginx) = nginx else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "nginx is required in CI (.ci/run installs it)"
        );
        eprintln!("skipped: nginx is not installed");
        return None;
    };
    let port = closed_port();
    let d = dir.display();
    let upstream = upstream.trim_start_matches("http://");
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\ndaemon off;\n\
         events {{ worker_connections 256; }}\nhttp {{\n access_log off;\n client_body_temp_path {d}/b; \
         proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n \
         server {{\n  listen 127.0.0.1:{port} ssl;\n  ssl_certificate {d}/srv.pem;\n  ssl_certificate_key {d}/srv.key;\n  \
         location / {{ proxy_pass http://{upstream}; proxy_http_version 1.1; proxy_buffering off; }}\n }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new(nginx)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nginx starts");
    let front = TlsFront { child, port };
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not listen on {port}");
        pause(Duration::from_millis(20));
    }
    Some(front)
}

#[test]
fn an_https_upstream_is_reached_over_tls_and_its_certificate_is_verified() {
    let dir = burncloud_tests::harness::TempDir::new("bc-tls");
    make_tls_files(dir.path());
    let mock = Mock::start(&[]);
    let Some(front) = tls_front(dir.path(), &mock.base_url()) else { return };
    let ca = dir.path().join("ca.pem");
    let gw = Gateway::start(GatewayOptions::new().env("BURNCLOUD_UPSTREAM_CA_FILE", ca.display()));
    let base_url = format!("https://localhost:{}", front.port);
    gw.create_channel(json!({"base_url": base_url, "models": "gpt-x"}));
    let user = gw.create_user(json!({}));
    let key = gw.create_token(user, json!({}));

    let resp = gw.chat(&key.key, &chat_body("gpt-x"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["object"], "chat.completion");
    let stream = gw.chat(&key.key, &stream_body("gpt-x"));
    assert_eq!(stream.status, 200, "{}", stream.text());
    assert!(stream.text().contains("data: [DONE]"), "{}", stream.text());
    assert_eq!(mock.requests().len(), 2);

    // The same upstream is refused by a gateway that does not trust the test CA.
    let untrusting = Gateway::start(GatewayOptions::new());
    untrusting.create_channel(json!({"base_url": base_url, "models": "gpt-x"}));
    let user = untrusting.create_user(json!({}));
    let key = untrusting.create_token(user, json!({}));
    let refused = untrusting.chat(&key.key, &chat_body("gpt-x"));
    assert_error(&refused, 502, "upstream_error");
    assert!(refused.text().to_lowercase().contains("tls"), "{}", refused.text());
    assert_eq!(mock.requests().len(), 2, "an unverified upstream must not receive the request");
}

// ---------------------------------------------------------------- process contract

/// Runs the gateway binary with only the given `BURNCLOUD_*` settings; returns (exit code, stdout,
/// stderr). The binary must exit by itself.
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = burncloud_tests::harness::TempDir::new("bc-bin");
    let mut cmd = Command::new(burncloud_tests::harness::gateway_bin());
    cmd.args(args).current_dir(dir.path());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("BURNCLOUD_")) {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the gateway binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_exit_non_zero_with_one_line_naming_the_setting() {
    for (var, value) in [
        ("BURNCLOUD_LISTEN", "not-an-address"),
        ("BURNCLOUD_DATABASE_URL", "mysql://x"),
        ("BURNCLOUD_WORKERS", "lots"),
        ("BURNCLOUD_LISTNE", "127.0.0.1:1"),
    ] {
        let (code, _, stderr) = run_binary(&["serve"], &[(var, value)]);
        assert_eq!(code, Some(1), "{var}={value}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{var}: {stderr}");
        assert!(stderr.contains(var), "{var}: {stderr}");
    }
}

#[test]
fn prod_refuses_sqlite_and_an_unreachable_database_fails_the_start() {
    let (code, _, stderr) = run_binary(&["serve"], &[("BURNCLOUD_ENV", "prod")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("BURNCLOUD_DATABASE_URL") && stderr.contains("SQLite"), "{stderr}");
    let url = format!("postgres://postgres@127.0.0.1:{}/nothing", closed_port());
    let (code, _, stderr) =
        run_binary(&["serve"], &[("BURNCLOUD_DATABASE_URL", &url), ("BURNCLOUD_LISTEN", "127.0.0.1:0")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("BURNCLOUD_DATABASE_URL"), "{stderr}");
}

#[test]
fn migrate_applies_the_schema_and_exits_0() {
    let dir = burncloud_tests::harness::TempDir::new("bc-migrate");
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let (code, stdout, stderr) = run_binary(&["migrate"], &[("BURNCLOUD_DATABASE_URL", &url)]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("migrations applied"), "{stdout}");
    assert!(dir.path().join("m.db").exists());
    let (code, _, stderr) = run_binary(&["migrate"], &[("BURNCLOUD_DATABASE_URL", &url)]);
    assert_eq!(code, Some(0), "running migrations twice: {stderr}");
}

/// A gateway started by hand to read every stdout line up to `listening on`; killed on drop.
struct RawGateway(std::process::Child);

impl Drop for RawGateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary with only these settings; returns it, its stdout lines up to and including
/// `listening on`, and the address.
fn start_raw(dir: &std::path::Path, env: &[(&str, &str)]) -> (RawGateway, Vec<String>, std::net::SocketAddr) {
    use std::io::BufRead;
    let mut cmd = Command::new(burncloud_tests::harness::gateway_bin());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("BURNCLOUD_")) {
        cmd.env_remove(k);
    }
    cmd.current_dir(dir)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("the gateway starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let raw = RawGateway(child);
    let mut lines = Vec::new();
    loop {
        let line = rx.recv_timeout(WAIT).expect("the gateway prints `listening on`");
        let done = line.starts_with("listening on ");
        lines.push(line);
        if done {
            break;
        }
    }
    let addr = lines.last().and_then(|l| l.trim_start_matches("listening on ").trim().parse().ok());
    (raw, lines, addr.expect("a socket address after `listening on`"))
}

#[test]
fn without_an_admin_key_one_is_generated_printed_once_and_kept() {
    let dir = burncloud_tests::harness::TempDir::new("bc-adminkey");
    let url = format!("sqlite://{}", dir.path().join("a.db").display());
    let env = [
        ("BURNCLOUD_DATABASE_URL", url.as_str()),
        ("BURNCLOUD_LISTEN", "127.0.0.1:0"),
        ("BURNCLOUD_LOG", "warn"),
    ];
    let (first, lines, _) = start_raw(dir.path(), &env);
    let key_line =
        lines.iter().find(|l| l.starts_with("admin key")).cloned().expect("the admin key is printed");
    let key = key_line.rsplit(' ').next().unwrap().to_string();
    assert!(key.starts_with("sk-") && key.len() == 51, "{key_line}");
    drop(first);
    let (_second, lines, addr) = start_raw(dir.path(), &env);
    assert!(!lines.iter().any(|l| l.starts_with("admin key")), "printed twice: {lines:?}");
    let resp = HttpRequest::get("/api/option/").header("Authorization", &format!("Bearer {key}")).send(addr);
    assert_eq!(resp.status, 200, "the generated key still works after a restart: {}", resp.text());
    let wrong = HttpRequest::get("/api/option/").header("Authorization", "Bearer sk-wrong").send(addr);
    assert_eq!(wrong.status, 401);
}

// ---------------------------------------------------------------- usage the upstream did not report

#[test]
fn a_stream_the_client_asked_no_usage_for_is_billed_from_the_upstreams_usage_which_the_client_does_not_see() {
    let s = setup();
    s.gw.put_option("ModelRatio", r#"{"gpt-x": 1}"#);
    s.gw.put_option("CompletionRatio", r#"{"gpt-x": 1}"#);
    s.mock.behave(json!({"chunks": 4, "prompt_tokens": 31, "completion_tokens": 12}));
    let body =
        json!({"model": "gpt-x", "stream": true, "messages": [{"role": "user", "content": "Say hello"}]});

    let resp = s.gw.chat(&s.key.key, &body);

    assert_eq!(resp.status, 200);
    let upstream = s.mock.requests().pop().unwrap().json();
    assert_eq!(upstream["stream_options"]["include_usage"], true, "the gateway asks for usage: {upstream}");
    let events = resp.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        events.iter().all(|e| e == "[DONE]"
            || serde_json::from_str::<Value>(e).unwrap()["choices"]
                .as_array()
                .is_some_and(|c| !c.is_empty())),
        "a usage-only chunk reached a client that did not ask for it: {events:?}"
    );
    let log = s.gw.consume_log(&request_id(&resp));
    assert_eq!(
        (log["prompt_tokens"].as_i64(), log["completion_tokens"].as_i64()),
        (Some(31), Some(12)),
        "{log}"
    );
    assert_eq!(log["quota"], 43);
    assert_eq!(log["content"], "", "the upstream reported the usage: {log}");
}

#[test]
fn a_stream_without_a_usage_chunk_is_billed_from_local_token_counts() {
    let s = setup();
    s.gw.put_option("ModelRatio", r#"{"gpt-x": 1}"#);
    s.gw.put_option("CompletionRatio", r#"{"gpt-x": 1}"#);
    s.mock.behave(json!({"chunks": 4, "completion_tokens": 12, "omit_usage": true}));
    let body =
        json!({"model": "gpt-x", "stream": true, "messages": [{"role": "user", "content": "Say hello"}]});

    let resp = s.gw.chat(&s.key.key, &body);

    assert_eq!(resp.status, 200);
    assert!(!resp.text().contains("\"usage\":{"), "the mock was asked for no usage: {}", resp.text());
    let log = s.gw.consume_log(&request_id(&resp));
    let (prompt, completion) =
        (log["prompt_tokens"].as_i64().unwrap(), log["completion_tokens"].as_i64().unwrap());
    // One user message "Say hello": 3 per message + "user" (1) + "Say hello" (2) + 3 priming.
    assert_eq!(prompt, 9, "{log}");
    assert!((12..=20).contains(&completion), "12 words of mock text, counted: {log}");
    assert_eq!(log["quota"].as_i64().unwrap(), prompt + completion, "{log}");
    assert!(log["content"].as_str().unwrap().contains("counted by the gateway"), "{log}");
}

/// A loopback HTTP server answering every GET with the header of a `w` × `h` PNG; counts requests.
fn png_server(w: u32, h: u32) -> (String, Arc<AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/pictures/cat.png?size=big", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            counted.fetch_add(1, Ordering::SeqCst);
            let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
            png.extend(w.to_be_bytes());
            png.extend(h.to_be_bytes());
            png.extend([8, 6, 0, 0, 0]);
            png.extend(vec![0u8; 2048]);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
                png.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&png);
        }
    });
    (url, hits)
}

fn image_body(url: &str) -> Value {
    json!({"model": "gpt-x", "stream": true, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
    ]}]})
}

#[test]
fn a_remote_image_is_measured_from_its_header_and_billed_by_its_size_when_the_upstream_reports_nothing() {
    let s = setup();
    s.gw.put_option("ModelRatio", r#"{"gpt-x": 1}"#);
    s.mock.behave(json!({"chunks": 2, "completion_tokens": 4, "omit_usage": true}));
    let (url, hits) = png_server(2048, 1024);
    let text_only = json!({"model": "gpt-x", "stream": true, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}]}]});
    let base =
        s.gw.consume_log(&request_id(&s.gw.chat(&s.key.key, &text_only)))["prompt_tokens"].as_i64().unwrap();

    // By default an image URL on a loopback address is not fetched: priced as 1024 × 1024 (765).
    let resp = s.gw.chat(&s.key.key, &image_body(&url));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let unmeasured = s.gw.consume_log(&request_id(&resp))["prompt_tokens"].as_i64().unwrap();
    assert_eq!(unmeasured - base, 765);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "an internal address was fetched");

    // Allowed, it is fetched once (then remembered by the worker) and priced by its size: 2048 × 1024
    // at high detail is 6 tiles, 85 + 6 × 170 = 1105 tokens.
    s.gw.put_option("ImageFetchAllowPrivate", "true");
    let (url, hits) = png_server(2048, 1024);
    for _ in 0..3 {
        let resp = s.gw.chat(&s.key.key, &image_body(&url));
        let measured = s.gw.consume_log(&request_id(&resp))["prompt_tokens"].as_i64().unwrap();
        assert_eq!(measured - base, 1105, "{}", resp.text());
    }
    assert!(
        (1..=2).contains(&hits.load(Ordering::SeqCst)),
        "fetched {} times for 3 requests on 2 workers",
        hits.load(Ordering::SeqCst)
    );
}

#[test]
fn a_stream_cut_by_the_upstream_is_billed_for_the_prompt_and_what_was_delivered() {
    let s = setup();
    s.gw.put_option("ModelRatio", r#"{"gpt-x": 1}"#);
    let body =
        json!({"model": "gpt-x", "stream": true, "messages": [{"role": "user", "content": "Say hello"}]});
    // Both counted locally (the upstream reports no usage), so they compare like for like.
    s.mock.behave(json!({"chunks": 8, "completion_tokens": 40, "omit_usage": true}));
    let full = s.gw.chat(&s.key.key, &body);
    let full_log = s.gw.consume_log(&request_id(&full));
    s.mock.behave(json!({"chunks": 8, "completion_tokens": 40, "fault": "disconnect_mid_stream", "fault_after_chunks": 2}));

    let mut stream =
        HttpRequest::post("/v1/chat/completions").bearer(&s.key.key).json(&body).open(s.gw.addr).unwrap();
    let id = stream.header("x-request-id").unwrap().to_string();
    while let Ok(Some(_)) = stream.next_event() {}

    let cut_log = s.gw.consume_log(&id);
    let cut = cut_log["completion_tokens"].as_i64().unwrap();
    assert_eq!(cut_log["prompt_tokens"], full_log["prompt_tokens"], "the prompt is billed in full");
    assert!(cut > 0, "delivered text is billed: {cut_log}");
    assert!(
        cut < full_log["completion_tokens"].as_i64().unwrap() / 2,
        "only what was delivered: {cut_log} vs {full_log}"
    );
}

// ---------------------------------------------------------------- content filter

#[test]
fn a_prompt_with_a_blocked_keyword_or_pattern_is_refused_before_any_upstream_call() {
    let s = setup();
    s.gw.put_option("SensitiveWords", "forbidden-word\nother");
    s.gw.put_option("SensitiveRegexes", r"\b\d{4}-\d{4}-\d{4}-\d{4}\b");
    let ask = |text: &str| {
        s.gw.chat(&s.key.key, &json!({"model": "gpt-x", "messages": [{"role": "user", "content": text}]}))
    };

    assert_error(&ask("this has a FORBIDDEN-WORD inside"), 400, "content_filtered");
    assert_error(&ask("my card is 1234-5678-9012-3456"), 400, "content_filtered");
    let anthropic = s.gw.post(
        "/v1/messages",
        &s.key.key,
        &json!({"model": "gpt-x", "max_tokens": 10, "messages": [{"role": "user", "content": "forbidden-word"}]}),
    );
    assert_eq!(anthropic.status, 400, "{}", anthropic.text());
    assert_eq!(anthropic.json()["error"]["type"], "invalid_request_error");
    assert!(s.mock.requests().is_empty(), "a blocked prompt reached the upstream");
    assert_eq!(ask("a harmless question").status, 200);
}

#[test]
fn a_blocked_completion_is_replaced_by_an_error_and_still_billed() {
    let s = setup();
    s.gw.put_option("ModelRatio", r#"{"gpt-x": 1}"#);
    s.gw.put_option("SensitiveWords", "upstream of");

    let resp = s.gw.chat(&s.key.key, &chat_body("gpt-x"));

    assert_error(&resp, 400, "content_filtered");
    assert!(!resp.text().contains("upstream of"), "{}", resp.text());
    let log = s.gw.consume_log(&request_id(&resp));
    assert!(log["quota"].as_i64().unwrap() > 0, "the upstream answered, so the call is billed: {log}");
}

#[test]
fn a_blocked_keyword_split_across_stream_chunks_ends_the_stream_with_an_error_event() {
    let s = setup();
    s.mock.behave(json!({"chunks": 5, "completion_tokens": 20, "chunk_gap_ms": 30}));
    // The mock's first two content events, sent 30 ms apart, are "Hello from the mock" and " upstream of BurnCloud Hello":
    // the keyword straddles them.
    s.gw.put_option("SensitiveWords", "MOCK UPSTREAM");

    let mut stream = HttpRequest::post("/v1/chat/completions")
        .bearer(&s.key.key)
        .json(&stream_body("gpt-x"))
        .open(s.gw.addr)
        .unwrap();
    let mut events = Vec::new();
    while let Ok(Some(ev)) = stream.next_event() {
        events.push(ev);
    }

    let last = events.last().cloned().unwrap_or_default();
    assert!(last.contains("content_filtered"), "the stream must end with the filter's error: {events:?}");
    assert!(events[0].contains("Hello from the mock"), "text before the match is delivered: {events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
    assert!(!events.iter().any(|e| e.contains("upstream of")), "text after the match leaked: {events:?}");
}

#[test]
fn an_invalid_filter_pattern_is_refused_by_the_option_api() {
    let s = setup();
    let resp =
        s.gw.admin("PUT", "/api/option/", Some(&json!({"key": "SensitiveRegexes", "value": "(unclosed"})));
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert_eq!(resp.json()["success"], false);
    assert!(resp.json()["message"].as_str().unwrap().contains("SensitiveRegexes"));
}

// ---------------------------------------------------------------- channel health

/// Two channels for `gpt-f`: A (priority 10) on its own mock with `behaviour`, B (priority 0) healthy.
fn two_channels(behaviour: Value) -> (Setup, Mock, i64, i64) {
    let s = setup();
    let failing = Mock::start(&[]);
    failing.behave(behaviour);
    let a = s.gw.create_channel(json!({"base_url": failing.base_url(), "models": "gpt-f", "priority": 10}));
    let b = s.gw.create_channel(json!({"base_url": s.mock.base_url(), "models": "gpt-f", "priority": 0}));
    (s, failing, a, b)
}

fn channel_status(gw: &Gateway, id: i64) -> Value {
    gw.api("GET", &format!("/api/channel/{id}"), None)
}

#[test]
fn a_channel_answering_401_is_disabled_automatically_with_its_reason() {
    let invalid_key = json!({"status": 401, "body": {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}});
    let (s, failing, a, b) = two_channels(invalid_key);

    let first = s.gw.chat(&s.key.key, &chat_body("gpt-f"));
    assert_eq!(first.status, 200, "the request fails over: {}", first.text());
    assert_eq!(s.gw.consume_log(&request_id(&first))["channel_id"], b);

    let deadline = Instant::now() + Duration::from_secs(5);
    let disabled = loop {
        let ch = channel_status(&s.gw, a);
        if ch["status"] == 3 || Instant::now() > deadline {
            break ch;
        }
        pause(Duration::from_millis(20));
    };
    assert_eq!(disabled["status"], 3, "{disabled}");
    assert!(disabled["auto_disabled_reason"].as_str().unwrap().contains("401"), "{disabled}");
    assert!(disabled["auto_disabled_time"].as_i64().unwrap() > 0, "{disabled}");
    // The database has the new status a moment before every worker's snapshot does.
    pause(Duration::from_millis(200));
    let before = failing.requests().len();
    for _ in 0..5 {
        assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-f")).status, 200);
    }
    assert_eq!(failing.requests().len(), before, "a disabled channel receives no more traffic");
    assert!(before <= 2, "the channel was tried {before} times before it was disabled");
}

#[test]
fn with_auto_disable_off_a_401_channel_stays_enabled() {
    let (s, _failing, a, _) = two_channels(json!({"status": 401}));
    s.gw.put_option("AutomaticDisableChannelEnabled", "false");

    assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-f")).status, 200);
    pause(Duration::from_millis(300));

    assert_eq!(channel_status(&s.gw, a)["status"], 1);
}

#[test]
fn a_failing_channel_cools_down_and_is_skipped_while_cooling() {
    let (s, failing, _, b) = two_channels(json!({"status": 503}));
    let mut served_by_b = 0;
    for _ in 0..20 {
        let resp = s.gw.chat(&s.key.key, &chat_body("gpt-f"));
        assert_eq!(resp.status, 200, "{}", resp.text());
        if s.gw.consume_log(&request_id(&resp))["channel_id"] == b {
            served_by_b += 1;
        }
    }
    assert_eq!(served_by_b, 20);
    // Three failures, counted across the workers, cool the channel down on every worker (a request
    // may race the siblings' news by one).
    let tries = failing.requests().len();
    assert!((3..=4).contains(&tries), "the failing channel was tried {tries} times in 20 requests");
}

#[test]
fn a_cooled_down_channel_is_probed_after_its_cooldown_and_serves_again_once_it_recovers() {
    let (s, failing, a, b) = two_channels(json!({"status": 503}));
    s.gw.put_option("ChannelCooldownSeconds", "1");
    for _ in 0..6 {
        let resp = s.gw.chat(&s.key.key, &chat_body("gpt-f"));
        assert_eq!(s.gw.consume_log(&request_id(&resp))["channel_id"], b, "{}", resp.text());
    }
    let tried_while_failing = failing.requests().len();
    failing.reset();
    let recovered = eventually(Duration::from_secs(5), || {
        let resp = s.gw.chat(&s.key.key, &chat_body("gpt-f"));
        resp.status == 200 && s.gw.consume_log(&request_id(&resp))["channel_id"] == a
    });
    assert!(recovered, "the recovered channel never served again");
    assert!(tried_while_failing <= 4, "tried {tried_while_failing} times while failing");
    // Once recovered, every worker routes to it again (priority 10 first).
    for _ in 0..4 {
        let resp = s.gw.chat(&s.key.key, &chat_body("gpt-f"));
        assert_eq!(s.gw.consume_log(&request_id(&resp))["channel_id"], a);
    }
}

#[test]
fn failover_walks_three_priority_tiers_in_order_within_retry_times() {
    let s = setup();
    let top = Mock::start(&[]);
    let middle = Mock::start(&[]);
    top.behave(json!({"status": 500}));
    middle.behave(json!({"status": 502}));
    s.gw.create_channel(json!({"base_url": top.base_url(), "models": "gpt-3t", "priority": 20}));
    s.gw.create_channel(json!({"base_url": middle.base_url(), "models": "gpt-3t", "priority": 10}));
    let bottom =
        s.gw.create_channel(json!({"base_url": s.mock.base_url(), "models": "gpt-3t", "priority": 0}));
    s.gw.put_option("ChannelCooldownFailures", "100");

    // One retry reaches the middle tier only: the bottom tier is never tried out of order.
    s.gw.put_option("RetryTimes", "1");
    assert_error(&s.gw.chat(&s.key.key, &chat_body("gpt-3t")), 502, "upstream_error");
    assert_eq!((top.requests().len(), middle.requests().len()), (1, 1));

    s.gw.put_option("RetryTimes", "2");
    let resp = s.gw.chat(&s.key.key, &chat_body("gpt-3t"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(s.gw.consume_log(&request_id(&resp))["channel_id"], bottom);
    assert_eq!((top.requests().len(), middle.requests().len()), (2, 2), "each tier tried once per request");
}

#[test]
fn a_ratio_change_and_a_channel_model_change_under_load_fail_no_request() {
    let s = setup();
    s.gw.put_option("ModelRatio", r#"{"gpt-x": 1, "gpt-new": 1}"#);
    s.mock.behave(json!({"prompt_tokens": 10, "completion_tokens": 10}));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, served) = (stop.clone(), served.clone());
            let (addr, key) = (s.gw.addr, s.key.key.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let resp = HttpRequest::post("/v1/chat/completions")
                        .bearer(&key)
                        .json(&chat_body("gpt-x"))
                        .send(addr);
                    if resp.status == 200 {
                        served.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.push(format!("{} {}", resp.status, resp.text()));
                    }
                }
                failures
            })
        })
        .collect();
    pause(Duration::from_millis(300));
    s.gw.put_option("ModelRatio", r#"{"gpt-x": 3, "gpt-new": 1}"#);
    s.gw.api("PUT", &format!("/api/channel/{}", s.channel), Some(&json!({"models": "gpt-x,gpt-new"})));
    let new_model = s.gw.chat(&s.key.key, &chat_body("gpt-new"));
    let after_change = s.gw.chat(&s.key.key, &chat_body("gpt-x"));
    pause(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    assert!(
        failures.is_empty(),
        "{} requests failed during the change: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(served.load(Ordering::Relaxed) > 50, "too little load to mean anything");
    assert_eq!(new_model.status, 200, "the new model is routed at once: {}", new_model.text());
    assert_eq!(s.gw.consume_log(&request_id(&after_change))["quota"], 60, "(10 + 10) × the new ratio 3");
}

// ---------------------------------------------------------------- tags

#[test]
fn all_channels_of_a_tag_are_disabled_enabled_and_edited_at_once() {
    let s = setup();
    let other = Mock::start(&[]);
    let t1 = s.gw.create_channel(
        json!({"base_url": other.base_url(), "models": "gpt-t", "tag": "pool", "priority": 5}),
    );
    let t2 = s.gw.create_channel(json!({"base_url": other.base_url(), "models": "gpt-t", "tag": "pool"}));

    let off = s.gw.api("POST", "/api/channel/tag/disabled", Some(&json!({"tag": "pool"})));
    assert_eq!(off["updated"], 2);
    assert_error(&s.gw.chat(&s.key.key, &chat_body("gpt-t")), 503, "model_not_available");
    assert_eq!(
        s.gw.chat(&s.key.key, &chat_body("gpt-x")).status,
        200,
        "channels of other tags are untouched"
    );

    s.gw.api("POST", "/api/channel/tag/enabled", Some(&json!({"tag": "pool"})));
    assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-t")).status, 200);

    let edited = s.gw.api(
        "PUT",
        "/api/channel/tag",
        Some(&json!({"tag": "pool", "new_tag": "pool2", "priority": 7, "models": "gpt-t,gpt-u"})),
    );
    assert_eq!(edited["updated"], 2);
    for id in [t1, t2] {
        let ch = channel_status(&s.gw, id);
        assert_eq!((ch["tag"].as_str(), ch["priority"].as_i64()), (Some("pool2"), Some(7)), "{ch}");
    }
    assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-u")).status, 200, "edited models are routed at once");
    assert_eq!(channel_status(&s.gw, s.channel)["status"], 1, "the untagged channel is untouched");
    let bad = s.gw.admin("PUT", "/api/channel/tag", Some(&json!({"tag": "pool2", "models": ""})));
    assert_eq!(bad.status, 400, "{}", bad.text());
}

// ---------------------------------------------------------------- channel tests

#[test]
fn testing_a_channel_on_demand_returns_its_latency_and_records_it() {
    let s = setup();

    let data = s.gw.api("POST", &format!("/api/channel/{}/test", s.channel), None);

    assert!(data["time_ms"].as_i64().is_some(), "{data}");
    let probe = s.mock.requests().pop().expect("the test reached the upstream");
    assert_eq!(probe.json()["max_tokens"], 1);
    let ch = channel_status(&s.gw, s.channel);
    assert!(ch["test_time"].as_i64().unwrap() > 0, "{ch}");
    s.mock.behave(json!({"status": 500, "times": 1}));
    let failed = s.gw.admin("POST", &format!("/api/channel/{}/test", s.channel), None);
    assert_eq!(failed.status, 502, "{}", failed.text());
    assert_eq!(failed.json()["success"], false);
}

#[test]
fn a_successful_test_re_enables_an_auto_disabled_channel_but_never_a_manually_disabled_one() {
    let s = setup();
    s.gw.api("PUT", &format!("/api/channel/{}", s.channel), Some(&json!({"status": 3})));
    s.gw.api("POST", &format!("/api/channel/{}/test", s.channel), None);
    assert_eq!(channel_status(&s.gw, s.channel)["status"], 1);
    assert_eq!(
        s.gw.chat(&s.key.key, &chat_body("gpt-x")).status,
        200,
        "re-enabled channels are routed at once"
    );

    s.gw.api("PUT", &format!("/api/channel/{}", s.channel), Some(&json!({"status": 2})));
    s.gw.api("POST", &format!("/api/channel/{}/test", s.channel), None);
    assert_eq!(channel_status(&s.gw, s.channel)["status"], 2);
}

#[test]
fn periodic_checks_disable_a_failing_channel_and_re_enable_it_when_it_recovers() {
    let s = setup();
    s.gw.put_option("ChannelTestFailures", "2");
    s.mock.behave(json!({"status": 503}));
    s.gw.put_option("ChannelTestInterval", "1");
    let wait_for = |status: i64| {
        let deadline = Instant::now() + Duration::from_secs(12);
        loop {
            let ch = channel_status(&s.gw, s.channel);
            if ch["status"] == status {
                return ch;
            }
            assert!(Instant::now() < deadline, "channel never reached status {status}: {ch}");
            pause(Duration::from_millis(100));
        }
    };

    let disabled = wait_for(3);
    assert!(disabled["auto_disabled_reason"].as_str().unwrap().contains("test failed"), "{disabled}");
    s.mock.reset();
    wait_for(1);
    assert_eq!(s.gw.chat(&s.key.key, &chat_body("gpt-x")).status, 200);
}

// ---------------------------------------------------------------- per-channel proxies

/// A minimal proxy on a free loopback port, for these tests: HTTP `CONNECT` or SOCKS5 (with an
/// optional user/password), reporting each tunnel's target on a channel. Its threads end with the
/// connections they serve; the accept thread ends with the test process.
struct TestProxy {
    addr: std::net::SocketAddr,
    targets: std::sync::mpsc::Receiver<String>,
}

impl TestProxy {
    fn start(socks: bool, credentials: Option<(&'static str, &'static str)>) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, targets) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ =
                        if socks { serve_socks5(conn, credentials, &tx) } else { serve_connect(conn, &tx) };
                });
            }
        });
        TestProxy { addr, targets }
    }

    fn tunnels(&self) -> Vec<String> {
        self.targets.try_iter().collect()
    }
}

fn pipe(client: std::net::TcpStream, upstream: std::net::TcpStream) -> std::io::Result<()> {
    let (mut c2, mut u2) = (client.try_clone()?, upstream.try_clone()?);
    let (mut c, mut u) = (client, upstream);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c, &mut u);
        let _ = u.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut u2, &mut c2);
    let _ = c2.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
    Ok(())
}

fn serve_connect(mut conn: std::net::TcpStream, tx: &std::sync::mpsc::Sender<String>) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let target = text.split_whitespace().nth(1).unwrap_or("").to_string();
    let upstream = std::net::TcpStream::connect(&target)?;
    conn.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")?;
    tx.send(target).ok();
    pipe(conn, upstream)
}

fn serve_socks5(
    mut conn: std::net::TcpStream,
    credentials: Option<(&str, &str)>,
    tx: &std::sync::mpsc::Sender<String>,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut greeting = [0u8; 2];
    conn.read_exact(&mut greeting)?;
    let mut methods = vec![0u8; greeting[1] as usize];
    conn.read_exact(&mut methods)?;
    match credentials {
        None => conn.write_all(&[5, 0])?,
        Some((user, pass)) => {
            conn.write_all(&[5, 2])?;
            let mut ver_len = [0u8; 2];
            conn.read_exact(&mut ver_len)?;
            let mut u = vec![0u8; ver_len[1] as usize];
            conn.read_exact(&mut u)?;
            let mut plen = [0u8; 1];
            conn.read_exact(&mut plen)?;
            let mut p = vec![0u8; plen[0] as usize];
            conn.read_exact(&mut p)?;
            if u != user.as_bytes() || p != pass.as_bytes() {
                conn.write_all(&[1, 1])?;
                return Ok(());
            }
            conn.write_all(&[1, 0])?;
        }
    }
    let mut req = [0u8; 4];
    conn.read_exact(&mut req)?;
    let host = match req[3] {
        1 => {
            let mut ip = [0u8; 4];
            conn.read_exact(&mut ip)?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            conn.read_exact(&mut len)?;
            let mut name = vec![0u8; len[0] as usize];
            conn.read_exact(&mut name)?;
            String::from_utf8_lossy(&name).into_owned()
        }
        _ => return Ok(()),
    };
    let mut port = [0u8; 2];
    conn.read_exact(&mut port)?;
    let target = format!("{host}:{}", u16::from_be_bytes(port));
    let upstream = std::net::TcpStream::connect(&target)?;
    conn.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])?;
    tx.send(target).ok();
    pipe(conn, upstream)
}

fn mock_authority(mock: &Mock) -> String {
    mock.base_url().trim_start_matches("http://").to_string()
}

#[test]
fn a_channel_with_a_socks5_proxy_sends_its_traffic_and_its_tests_through_it() {
    let s = setup();
    let proxy = TestProxy::start(true, Some(("alice", "s3cret")));
    let id = s.gw.create_channel(json!({
        "base_url": s.mock.base_url(), "models": "gpt-p", "proxy": format!("socks5://alice:s3cret@{}", proxy.addr),
    }));

    let resp = s.gw.chat(&s.key.key, &chat_body("gpt-p"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(s.gw.consume_log(&request_id(&resp))["channel_id"], id);
    s.gw.api("POST", &format!("/api/channel/{id}/test"), None);

    let tunnels = proxy.tunnels();
    assert!(!tunnels.is_empty(), "no tunnel went through the proxy");
    assert!(tunnels.iter().all(|t| *t == mock_authority(&s.mock)), "{tunnels:?}");
    assert_eq!(s.mock.requests().len(), 2, "the chat and the channel test both reached the upstream");
}

#[test]
fn a_socks5_proxy_refusing_the_password_fails_the_request_with_502() {
    let s = setup();
    let proxy = TestProxy::start(true, Some(("alice", "s3cret")));
    s.gw.create_channel(json!({
        "base_url": s.mock.base_url(), "models": "gpt-p", "proxy": format!("socks5://alice:wrong@{}", proxy.addr),
    }));

    let resp = s.gw.chat(&s.key.key, &chat_body("gpt-p"));

    assert_error(&resp, 502, "upstream_error");
    assert!(resp.text().contains("proxy"), "{}", resp.text());
    assert!(!resp.text().contains("wrong"), "the password must not leak: {}", resp.text());
    assert!(s.mock.requests().is_empty());
}

#[test]
fn a_channel_with_an_http_proxy_tunnels_through_connect() {
    let s = setup();
    let proxy = TestProxy::start(false, None);
    s.gw.create_channel(
        json!({"base_url": s.mock.base_url(), "models": "gpt-p", "proxy": format!("http://{}", proxy.addr)}),
    );

    let plain = s.gw.chat(&s.key.key, &chat_body("gpt-p"));
    let streamed = s.gw.chat(&s.key.key, &stream_body("gpt-p"));

    assert_eq!(plain.status, 200, "{}", plain.text());
    assert!(streamed.text().contains("[DONE]"), "{}", streamed.text());
    assert!(proxy.tunnels().iter().any(|t| *t == mock_authority(&s.mock)));
}

/// socat terminating TLS (the test CA's `localhost` certificate) on a free port in front of a plain
/// proxy; stopped on drop.
fn tls_proxy_front(dir: &std::path::Path, proxy: std::net::SocketAddr) -> Option<TlsFront> {
    let Some(socat) = ["/usr/bin/socat", "/bin/socat"].into_iter().find(|p| std::path::Path::new(p).exists())
    else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "socat is required in CI (.ci/run installs it)"
        );
        eprintln!("skipped: socat is not installed");
        return None;
    };
    let port = closed_port();
    let d = dir.display();
    let child = Command::new(socat)
        .arg(format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={d}/srv.pem,key={d}/srv.key,verify=0"
        ))
        .arg(format!("TCP:{proxy}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("socat starts");
    let front = TlsFront { child, port };
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "socat did not listen on {port}");
        pause(Duration::from_millis(20));
    }
    Some(front)
}

#[test]
fn a_channel_with_an_https_proxy_tunnels_over_tls_to_plain_and_tls_upstreams() {
    let dir = burncloud_tests::harness::TempDir::new("bc-tlsproxy");
    make_tls_files(dir.path());
    let mock = Mock::start(&[]);
    let proxy = TestProxy::start(false, None);
    let Some(proxy_front) = tls_proxy_front(dir.path(), proxy.addr) else { return };
    let Some(upstream_front) = tls_front(dir.path(), &mock.base_url()) else { return };
    let ca = dir.path().join("ca.pem");
    let gw = Gateway::start(GatewayOptions::new().env("BURNCLOUD_UPSTREAM_CA_FILE", ca.display()));
    let proxy_url = format!("https://localhost:{}", proxy_front.port);
    let tls_upstream = format!("https://localhost:{}", upstream_front.port);
    let plain =
        gw.create_channel(json!({"base_url": mock.base_url(), "models": "gpt-plain", "proxy": proxy_url}));
    let tls = gw.create_channel(json!({"base_url": tls_upstream, "models": "gpt-tls", "proxy": proxy_url}));
    let user = gw.create_user(json!({}));
    let key = gw.create_token(user, json!({}));

    // An http upstream through the proxy's TLS; an https upstream with TLS inside it, streamed too.
    let resp = gw.chat(&key.key, &chat_body("gpt-plain"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(gw.consume_log(&request_id(&resp))["channel_id"], plain);
    let resp = gw.chat(&key.key, &chat_body("gpt-tls"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(gw.consume_log(&request_id(&resp))["channel_id"], tls);
    let streamed = gw.chat(&key.key, &stream_body("gpt-tls"));
    assert!(streamed.text().contains("data: [DONE]"), "{}", streamed.text());
    gw.api("POST", &format!("/api/channel/{tls}/test"), None);

    let tunnels = proxy.tunnels();
    assert!(tunnels.iter().any(|t| *t == mock_authority(&mock)), "{tunnels:?}");
    assert!(tunnels.iter().any(|t| *t == format!("localhost:{}", upstream_front.port)), "{tunnels:?}");
    assert_eq!(mock.requests().len(), 4, "three calls and the channel test reached the upstream");

    // A gateway that does not trust the proxy's certificate sends nothing through it.
    let untrusting = Gateway::start(GatewayOptions::new());
    untrusting
        .create_channel(json!({"base_url": mock.base_url(), "models": "gpt-plain", "proxy": proxy_url}));
    let user = untrusting.create_user(json!({}));
    let key = untrusting.create_token(user, json!({}));
    let refused = untrusting.chat(&key.key, &chat_body("gpt-plain"));
    assert_error(&refused, 502, "upstream_error");
    assert!(refused.text().to_lowercase().contains("tls"), "{}", refused.text());
    assert!(proxy.tunnels().is_empty(), "an unverified proxy must not be asked for a tunnel");
    assert_eq!(mock.requests().len(), 4);
}

#[test]
fn an_invalid_proxy_url_is_refused_when_the_channel_is_saved() {
    let s = setup();
    let resp = s.gw.admin(
        "POST",
        "/api/channel/",
        Some(&json!({"name": "p", "type": "openai", "base_url": s.mock.base_url(), "key": "k", "models": "m", "proxy": "ftp://x:1"})),
    );
    assert_eq!(resp.status, 400, "{}", resp.text());
}
