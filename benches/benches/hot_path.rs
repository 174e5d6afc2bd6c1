//! Micro-benchmarks of the per-request hot path, each step on its own:
//!
//! - `http_head`: parsing a client request head. The gateway's parser (`burncloud_runtime::http`'s
//!   `parse_head` + `build_headers`) is crate-private, so this runs the same steps on the same crates:
//!   httparse into 256 header slots, method and target split, header names interned and values sliced
//!   from the shared head bytes into an `http::HeaderMap`.
//! - `key`: hashing a presented API key (SHA-256, hex) and looking it up in a worker's key cache of
//!   10,000 entries (a `HashMap<String, (Option<Arc<_>>, Instant)>`, as the worker keeps it).
//! - `request_info`: pulling `model`, `stream` and `stream_options` out of a chat request body.
//! - `pricing`: price lookup by model and group, and the quota of one request's usage.
//! - `sse`: decoding upstream SSE events, and converting them per event (OpenAI passthrough, which
//!   still decodes every event for usage and text, and OpenAI → Anthropic).
//!
//! Token counting is in `benches/benches/tokens.rs`. Run: `cargo bench -p burncloud-benches`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use burncloud_adaptors::openai::request_info;
use burncloud_adaptors::sse::SseDecoder;
use burncloud_adaptors::{Protocol, ResponseMeta, StreamConverter};
use burncloud_core::apikey;
use burncloud_core::pricing::{self, PriceTable};
use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, black_box, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

const HEAD: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: OpenAI/Python 1.54.3\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGhIjKl\r\nX-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.54.3\r\nX-Stainless-Runtime: CPython\r\nConnection: keep-alive\r\nContent-Length: 96\r\n\r\n";

/// The steps of the gateway's head parser, on the same crates.
fn parse_head(head: &Bytes) -> Option<(Method, String, Option<String>, HeaderMap)> {
    let mut storage = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut storage[..100]);
    let len = match req.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let target = req.path?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    let base = head.as_ptr() as usize;
    let mut slots = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let start = h.value.as_ptr() as usize - base;
        slots.push((name, start..start + h.value.len()));
    }
    let mut map = HeaderMap::with_capacity(slots.len());
    for (name, range) in slots {
        map.append(name, HeaderValue::from_maybe_shared(head.slice(range)).ok()?);
    }
    black_box(len);
    Some((method, path, query, map))
}

fn http_head(c: &mut Criterion) {
    let head = Bytes::from_static(HEAD);
    let mut g = c.benchmark_group("http_head");
    g.throughput(Throughput::Bytes(HEAD.len() as u64));
    g.bench_function("parse_12_headers", |b| b.iter(|| parse_head(black_box(&head))));
    g.finish();
}

/// Stands in for the cached caller (token and user rows).
#[allow(dead_code)]
struct Caller {
    token_id: i64,
    user_id: i64,
    group: String,
}

fn key(c: &mut Criterion) {
    let keys: Vec<String> = (0..10_000).map(|i| format!("sk-{i:048}")).collect();
    let now = Instant::now();
    let cache: HashMap<String, (Option<Arc<Caller>>, Instant)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let caller = Arc::new(Caller { token_id: i as i64, user_id: i as i64, group: "default".into() });
            (apikey::hash(k), (Some(caller), now))
        })
        .collect();
    let presented = keys.get(4242).cloned().unwrap_or_default();
    let mut g = c.benchmark_group("key");
    g.bench_function("sha256_hex", |b| b.iter(|| apikey::hash(black_box(&presented))));
    g.bench_function("hash_and_lookup_10k", |b| {
        b.iter(|| {
            let h = apikey::hash(black_box(&presented));
            cache.get(&h).and_then(|(c, _)| c.clone())
        })
    });
    g.finish();
}

fn chat_body(turns: usize) -> String {
    let mut messages = vec![r#"{"role":"system","content":"You are a helpful assistant."}"#.to_string()];
    for i in 0..turns {
        messages.push(format!(
            r#"{{"role":"user","content":"Question {i}: explain how a gateway routes a request to a channel, in two sentences."}},{{"role":"assistant","content":"A gateway authenticates the key, picks a channel serving the model by priority and weight, and forwards the body. It then bills the usage the upstream reports."}}"#
        ));
    }
    format!(
        r#"{{"model":"gpt-4o-mini","messages":[{}],"temperature":0.7,"max_tokens":256,"stream":true,"stream_options":{{"include_usage":true}}}}"#,
        messages.join(",")
    )
}

fn json_model(c: &mut Criterion) {
    let mut g = c.benchmark_group("request_info");
    for (name, body) in [("small", chat_body(0)), ("10kb", chat_body(30))] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("{name}_{}b", body.len()), |b| {
            b.iter(|| request_info(black_box(body.as_bytes())))
        });
    }
    g.finish();
}

fn pricing(c: &mut Criterion) {
    let table = PriceTable {
        model_ratio: pricing::default_model_ratios(),
        completion_ratio: pricing::default_completion_ratios(),
        group_ratio: [("default".to_string(), 1.0), ("vip".to_string(), 0.8)].into_iter().collect(),
        model_price: HashMap::new(),
        cache_ratio: pricing::default_cache_ratios(),
    };
    let model = table.model_ratio.keys().find(|k| k.starts_with("gpt-4o")).cloned().unwrap_or_default();
    let mut g = c.benchmark_group("pricing");
    g.bench_function("price_and_quota", |b| {
        b.iter(|| {
            table
                .price(black_box(&model), black_box("default"))
                .map(|p| p.quota_cached(black_box(1200), black_box(1024), black_box(350)))
        })
    });
    g.bench_function("pre_deduction", |b| {
        b.iter(|| {
            table.price(black_box(&model), "default").map(|p| p.pre_deduction(black_box(800), None, 4096))
        })
    });
    g.finish();
}

fn openai_events(n: usize) -> Vec<Vec<u8>> {
    let mut events = Vec::with_capacity(n + 3);
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_eb9dce56a8\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
        )
        .into_bytes()
    };
    events.push(chunk(r#"{"role":"assistant","content":""}"#, "null"));
    for i in 0..n {
        events.push(chunk(&format!(r#"{{"content":" word{i} and"}}"#), "null"));
    }
    events.push(chunk("{}", r#""stop""#));
    events.push(b"data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":100,\"total_tokens\":112}}\n\n".to_vec());
    events.push(b"data: [DONE]\n\n".to_vec());
    events
}

fn sse(c: &mut Criterion) {
    let events = openai_events(100);
    let n = events.len() as u64;
    let meta = ResponseMeta { model: "gpt-4o-mini", id: "0123456789abcdef", created: 1_741_569_952 };
    let mut g = c.benchmark_group("sse_per_event");
    g.throughput(Throughput::Elements(n));
    g.bench_function("decode", |b| {
        b.iter(|| {
            let mut d = SseDecoder::new();
            let mut count = 0;
            for ev in &events {
                d.feed(ev);
                while let Some(e) = d.next_event() {
                    count += e.data.len();
                }
            }
            count
        })
    });
    for (name, client) in [
        ("convert_openai_passthrough", Protocol::OpenAi),
        ("convert_openai_to_anthropic", Protocol::Anthropic),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    (
                        StreamConverter::new(Protocol::OpenAi, client, &meta, true),
                        BytesMut::with_capacity(64 * 1024),
                    )
                },
                |(mut conv, mut out)| {
                    for ev in &events {
                        conv.feed(ev, &mut out);
                    }
                    conv.finish(&mut out);
                    out.len()
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, http_head, key, json_model, pricing, sse);
criterion_main!(benches);
