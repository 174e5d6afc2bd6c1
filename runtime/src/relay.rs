//! The relay pipeline: one client request from authentication to settlement, as named steps.
//!
//! 1. [`authenticate`] the key (worker cache, then the storage thread);
//! 2. [`decode`] only what routing and billing need from the body;
//! 3. [`authorize`] the model and the client's address for this key;
//! 4. [`route`] to a channel: priority tiers, weighted pick, never a channel twice;
//! 5. [`forward`] over the worker's pooled upstream connection, failing over on retryable errors;
//! 6. respond: [`respond_full`] or [`respond_stream`] (SSE forwarded chunk by chunk, usage collected);
//! 7. [`settle`]: price the usage and hand one consume event to the storage thread.
//!
//! Never blocks and never waits on a database write: the only awaits are the client socket, the
//! upstream socket and, on a key-cache miss, a storage read.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burncloud_adaptors::Usage;
use burncloud_adaptors::openai::{self, RequestInfo};
use burncloud_adaptors::sse::SseDecoder;
use burncloud_core::error::Protocol;
use burncloud_core::model::{self, Channel, LogEntry, STATUS_ENABLED};
use burncloud_core::{ErrorKind, GatewayError, apikey};
use burncloud_storage::ConsumeEvent;
use bytes::Bytes;

use crate::http::{Request, Responder};
use crate::state::{Caller, Worker, unix_now};
use crate::upstream::{Origin, UpstreamError, UpstreamRequest, UpstreamResponse};

/// Largest upstream response body read into memory (non-stream).
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

/// Which OpenAI endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
    }

    fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }
}

/// Per-request bookkeeping carried through the steps.
pub struct RequestCtx {
    pub id: String,
    pub started: Instant,
    /// Time spent waiting on upstreams, excluded from the reported overhead.
    pub upstream_wait: Duration,
}

impl RequestCtx {
    pub fn new(worker: &Worker, req: &Request) -> RequestCtx {
        RequestCtx { id: worker.next_request_id(), started: req.received_at, upstream_wait: Duration::ZERO }
    }

    pub fn overhead_us(&self) -> u128 {
        self.started.elapsed().saturating_sub(self.upstream_wait).as_micros()
    }
}

/// Answers `err` in the client's protocol with the request id and overhead headers.
pub async fn respond_error(
    ctx: &RequestCtx,
    resp: &mut Responder<'_>,
    err: &GatewayError,
    protocol: Protocol,
) {
    if resp.started() {
        return;
    }
    let overhead = ctx.overhead_us().to_string();
    let retry_after = err.retry_after().map(|s| s.to_string());
    let mut headers = vec![
        ("content-type", "application/json"),
        ("x-request-id", ctx.id.as_str()),
        ("x-burncloud-overhead-us", overhead.as_str()),
    ];
    if let Some(r) = &retry_after {
        headers.push(("retry-after", r.as_str()));
    }
    let _ = resp.send(err.status(), &headers, Bytes::from(err.render(protocol))).await;
}

/// The whole relay for one OpenAI-format request.
pub async fn relay_openai(worker: &Worker, endpoint: Endpoint, req: Request, resp: &mut Responder<'_>) {
    let mut ctx = RequestCtx::new(worker, &req);
    if let Err(err) = relay_steps(worker, endpoint, &req, resp, &mut ctx).await {
        if err.origin == burncloud_core::ErrorSource::Internal {
            tracing::error!(request_id = %ctx.id, error = %err, "request failed inside the gateway");
        }
        respond_error(&ctx, resp, &err, Protocol::OpenAi).await;
    }
}

async fn relay_steps(
    worker: &Worker,
    endpoint: Endpoint,
    req: &Request,
    resp: &mut Responder<'_>,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    let caller = authenticate(worker, req).await?;
    let info = decode(&req.body)?;
    let group = effective_group(&caller);
    authorize(&caller, &info.model, req.peer.ip())?;
    let snapshot = worker.shared.snapshot.load_full();
    if !snapshot.abilities.serves(group, &info.model) {
        return Err(GatewayError::client(
            ErrorKind::ModelNotAvailable,
            format!("no channel serves model {} for group {group}", info.model),
        ));
    }
    let attempts = snapshot.retry_times + 1;
    let mut tried: Vec<i64> = Vec::with_capacity(attempts);
    let mut last_err = None;
    while tried.len() < attempts {
        let Some(channel) = route(worker, &snapshot, group, &info.model, &tried) else { break };
        tried.push(channel.id);
        let started = Instant::now();
        let outcome = forward(worker, &channel, endpoint, &info, &req.body).await;
        ctx.upstream_wait += started.elapsed();
        match outcome {
            Ok(upstream) => {
                let usage = if info.stream && upstream.status == 200 {
                    respond_stream(worker, ctx, resp, upstream).await
                } else {
                    respond_full(ctx, resp, upstream).await?
                };
                settle(worker, ctx, &caller, &channel, &info, &snapshot, usage, req);
                return Ok(());
            }
            Err(err) => {
                tracing::warn!(request_id = %ctx.id, channel = channel.id, error = %err.message, "upstream attempt failed");
                let retry = err.retryable;
                last_err = Some(err);
                if !retry {
                    break;
                }
            }
        }
    }
    Err(last_err.unwrap_or_else(|| GatewayError::upstream(502, false, "no channel could serve the request")))
}

/// Step 1: the key from `Authorization: Bearer`, `x-api-key`, `x-goog-api-key` or `?key=`.
pub async fn authenticate(worker: &Worker, req: &Request) -> Result<Arc<Caller>, GatewayError> {
    let key = presented_key(req).ok_or_else(|| {
        GatewayError::client(ErrorKind::InvalidApiKey, "missing API key: send Authorization: Bearer sk-…")
    })?;
    let hash = apikey::hash(&key);
    let caller = match worker.cached_caller(&hash) {
        Some(c) => c,
        None => {
            let epoch = worker.auth_epoch();
            let found = worker.shared.storage.token_by_key_hash(&hash).await.map_err(|e| {
                GatewayError::internal(ErrorKind::Unavailable, format!("key lookup failed: {e}"))
            })?;
            let caller = found.map(|(token, user)| Arc::new(Caller { token, user }));
            worker.cache_caller(hash, caller.clone(), epoch);
            caller
        }
    };
    let caller = caller.ok_or_else(|| GatewayError::client(ErrorKind::InvalidApiKey, "invalid API key"))?;
    let token = &caller.token;
    if token.status != STATUS_ENABLED {
        let kind = match token.status {
            model::TOKEN_EXPIRED => ErrorKind::TokenExpired,
            model::TOKEN_EXHAUSTED => ErrorKind::TokenQuotaExhausted,
            _ => ErrorKind::TokenDisabled,
        };
        return Err(GatewayError::client(kind, "this API key is not enabled"));
    }
    if token.expired_time != -1 && token.expired_time <= unix_now() {
        return Err(GatewayError::client(ErrorKind::TokenExpired, "this API key has expired"));
    }
    if !token.unlimited_quota && token.remain_quota <= 0 {
        return Err(GatewayError::client(ErrorKind::TokenQuotaExhausted, "this API key has no quota left"));
    }
    if caller.user.status != STATUS_ENABLED {
        return Err(GatewayError::client(ErrorKind::TokenDisabled, "the owner of this API key is disabled"));
    }
    Ok(caller)
}

fn presented_key(req: &Request) -> Option<String> {
    if let Some(v) = req.header("authorization") {
        let v = v.trim();
        let key = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v).trim();
        if !key.is_empty() {
            return Some(key.to_string());
        }
    }
    for name in ["x-api-key", "x-goog-api-key"] {
        if let Some(v) = req.header(name).map(str::trim).filter(|v| !v.is_empty()) {
            return Some(v.to_string());
        }
    }
    req.query_param("key").filter(|k| !k.is_empty())
}

/// Step 2: the routing fields of the body.
pub fn decode(body: &[u8]) -> Result<RequestInfo, GatewayError> {
    openai::request_info(body).map_err(|e| GatewayError::client(ErrorKind::InvalidRequest, e.to_string()))
}

/// The group a caller's requests are routed and priced in: the key's, else the user's.
pub fn effective_group(caller: &Caller) -> &str {
    if caller.token.group.is_empty() { &caller.user.group } else { &caller.token.group }
}

/// Step 3: the key's model allow-list and IP allow-list.
pub fn authorize(caller: &Caller, model: &str, ip: IpAddr) -> Result<(), GatewayError> {
    let models = &caller.token.models;
    if !models.is_empty() && !models.iter().any(|m| m == model) {
        return Err(GatewayError::client(
            ErrorKind::ModelNotAllowed,
            format!("this API key may not use model {model}"),
        ));
    }
    if !ip_allowed(&caller.token.allow_ips, ip) {
        return Err(GatewayError::client(
            ErrorKind::IpNotAllowed,
            format!("address {ip} may not use this API key"),
        ));
    }
    Ok(())
}

/// Whether `ip` matches the comma-separated list of addresses and CIDRs (empty = any).
pub fn ip_allowed(list: &str, ip: IpAddr) -> bool {
    let mut entries = model::split_list(list).peekable();
    if entries.peek().is_none() {
        return true;
    }
    entries.any(|entry| {
        let (addr, bits) = match entry.split_once('/') {
            Some((a, b)) => (a, b.parse::<u32>().ok()),
            None => (entry, None),
        };
        let Ok(net) = addr.parse::<IpAddr>() else { return false };
        match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let bits = bits.unwrap_or(32).min(32);
                let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let bits = bits.unwrap_or(128).min(128);
                let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    })
}

/// Step 4: the next channel for (group, model) not yet tried in this request.
pub fn route(
    worker: &Worker,
    snapshot: &crate::state::Snapshot,
    group: &str,
    model: &str,
    tried: &[i64],
) -> Option<Arc<Channel>> {
    let id = snapshot.abilities.pick(group, model, tried, &mut worker.rng.borrow_mut())?;
    snapshot.channels.get(&id).cloned()
}

/// Step 5: one attempt on one channel. Returns the response once its head has arrived; failures say
/// whether the next channel may be tried.
pub async fn forward(
    worker: &Worker,
    channel: &Channel,
    endpoint: Endpoint,
    info: &RequestInfo,
    body: &Bytes,
) -> Result<UpstreamResponse, GatewayError> {
    let origin =
        Origin::parse(&channel.base_url).map_err(|e| GatewayError::upstream(502, true, e.to_string()))?;
    let upstream_model = channel.upstream_model(&info.model);
    let body = if upstream_model != info.model {
        openai::with_model(body, upstream_model)
            .map_err(|e| GatewayError::client(ErrorKind::InvalidRequest, e.to_string()))?
    } else {
        body.clone()
    };
    let auth = format!("Bearer {}", channel.key);
    let accept = if info.stream { "text/event-stream" } else { "application/json" };
    let headers =
        [("Authorization", auth.as_str()), ("Content-Type", "application/json"), ("Accept", accept)];
    let request = UpstreamRequest { method: "POST", path: endpoint.upstream_path(), headers: &headers, body };
    let mut upstream = worker.client.send(&origin, &request).await.map_err(upstream_failure)?;
    if upstream.status == 200 {
        return Ok(upstream);
    }
    let status = upstream.status;
    let body = upstream.read_to_end(1024 * 1024).await.unwrap_or_default();
    let message = upstream_message(&body).unwrap_or_else(|| format!("upstream answered HTTP {status}"));
    Err(GatewayError::upstream(status, retryable_status(status), message))
}

/// Whether an upstream status may succeed on another channel (New API's defaults: 429, 5xx, and
/// auth failures that are the channel's own, 401 and 403).
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 401 | 403 | 408 | 429) || status >= 500
}

fn upstream_failure(e: UpstreamError) -> GatewayError {
    // Every transport failure before a response head is safe to retry elsewhere: the upstream
    // produced nothing the client saw.
    GatewayError::upstream(502, true, e.to_string())
}

fn upstream_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let msg = v.get("error")?.get("message")?.as_str()?;
    Some(format!("upstream error: {msg}"))
}

fn success_headers<'a>(
    ctx: &'a RequestCtx,
    overhead: &'a str,
    content_type: &'a str,
) -> [(&'a str, &'a str); 3] {
    [("content-type", content_type), ("x-request-id", ctx.id.as_str()), ("x-burncloud-overhead-us", overhead)]
}

/// Step 6a: a complete response, passed through as received.
pub async fn respond_full(
    ctx: &mut RequestCtx,
    resp: &mut Responder<'_>,
    mut upstream: UpstreamResponse,
) -> Result<Option<Usage>, GatewayError> {
    let started = Instant::now();
    let body = upstream.read_to_end(MAX_UPSTREAM_BODY).await;
    ctx.upstream_wait += started.elapsed();
    let body = body.map_err(|e| GatewayError::upstream(502, false, e.to_string()))?;
    let usage = openai::response_usage(&body);
    let content_type = upstream.header("content-type").unwrap_or("application/json").to_string();
    let overhead = ctx.overhead_us().to_string();
    let _ = resp.send(upstream.status, &success_headers(ctx, &overhead, &content_type), body).await;
    Ok(usage)
}

/// Step 6b: an SSE stream, each upstream chunk written to the client as it arrives. Returns the usage
/// the upstream reported, if it did before the stream ended.
pub async fn respond_stream(
    worker: &Worker,
    ctx: &mut RequestCtx,
    resp: &mut Responder<'_>,
    mut upstream: UpstreamResponse,
) -> Option<Usage> {
    let overhead = ctx.overhead_us().to_string();
    if resp.start_stream(200, &success_headers(ctx, &overhead, "text/event-stream")).await.is_err() {
        return None;
    }
    let mut decoder = SseDecoder::new();
    let mut usage = None;
    loop {
        let started = Instant::now();
        let chunk = upstream.next_chunk().await;
        ctx.upstream_wait += started.elapsed();
        match chunk {
            Ok(Some(bytes)) => {
                decoder.feed(&bytes);
                while let Some(ev) = decoder.next_event() {
                    if let Some(u) = openai::stream_event_usage(&ev.data) {
                        usage = Some(u);
                    }
                }
                if resp.send_chunk(bytes).await.is_err() {
                    tracing::info!(request_id = %ctx.id, "client went away mid-stream");
                    return usage;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(request_id = %ctx.id, worker = worker.index, error = %e, "upstream stream broke");
                let err = GatewayError::upstream(502, false, e.to_string());
                let event = format!("data: {}\n\n", String::from_utf8_lossy(&err.render(Protocol::OpenAi)));
                let _ = resp.send_chunk(Bytes::from(event)).await;
                break;
            }
        }
    }
    let _ = resp.finish_stream().await;
    usage
}

/// Step 7: price the usage and send the consume event to the storage thread (never awaited).
#[allow(clippy::too_many_arguments)]
pub fn settle(
    worker: &Worker,
    ctx: &RequestCtx,
    caller: &Caller,
    channel: &Channel,
    info: &RequestInfo,
    snapshot: &crate::state::Snapshot,
    usage: Option<Usage>,
    req: &Request,
) {
    let usage = usage.unwrap_or_default();
    let group = effective_group(caller);
    let quota = snapshot
        .prices
        .price(&info.model, group)
        .map(|p| p.quota(usage.prompt_tokens, usage.completion_tokens))
        .unwrap_or(0);
    let log = LogEntry {
        id: 0,
        created_at: unix_now(),
        kind: model::LOG_CONSUME,
        user_id: caller.user.id,
        username: caller.user.username.clone(),
        token_id: caller.token.id,
        token_name: caller.token.name.clone(),
        model_name: info.model.clone(),
        channel_id: channel.id,
        quota,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        use_time_ms: ctx.started.elapsed().as_millis() as i64,
        is_stream: info.stream,
        group: group.to_string(),
        ip: req.peer.ip().to_string(),
        request_id: ctx.id.clone(),
        content: String::new(),
    };
    worker.shared.storage.record(ConsumeEvent { log, quota });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_allow_lists_match_addresses_and_cidrs() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(ip_allowed("", ip("1.2.3.4")));
        assert!(ip_allowed("10.0.0.0/8, 1.2.3.4", ip("1.2.3.4")));
        assert!(ip_allowed("10.0.0.0/8", ip("10.9.8.7")));
        assert!(!ip_allowed("10.0.0.0/8", ip("11.0.0.1")));
        assert!(ip_allowed("::1", ip("::1")));
        assert!(!ip_allowed("127.0.0.1", ip("::1")));
        assert!(!ip_allowed("garbage", ip("1.1.1.1")));
    }

    #[test]
    fn endpoints_map_to_upstream_paths() {
        assert_eq!(Endpoint::from_path("/v1/embeddings"), Some(Endpoint::Embeddings));
        assert_eq!(Endpoint::from_path("/v1/other"), None);
    }

    #[test]
    fn retryable_statuses_follow_new_api_defaults() {
        for s in [401, 403, 429, 500, 502, 503] {
            assert!(retryable_status(s), "{s}");
        }
        for s in [400, 404, 413, 422] {
            assert!(!retryable_status(s), "{s}");
        }
    }
}
