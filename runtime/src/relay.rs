//! The relay pipeline: one client request from authentication to settlement, as named steps.
//!
//! 1. [`authenticate`] the key (worker cache, then the storage thread);
//! 2. [`decode`] only what routing and billing need from the body (and, for Gemini, the URL);
//! 3. [`authorize`] the model and the client's address for this key;
//! 4. [`admit`]: price the model, estimate the prompt, take the key's rate permits and pre-deduct
//!    from the worker's balance leases (user and key);
//! 5. [`route`] to a channel: priority tiers, weighted pick, never a channel twice;
//! 6. [`forward`] over the worker's pooled upstream connection in the channel's protocol (converting
//!    the body when client and channel speak different protocols), failing over on retryable errors;
//! 7. respond: [`respond_full`] or [`respond_stream`] (SSE converted and forwarded chunk by chunk,
//!    usage collected), always in the client's protocol;
//! 8. [`settle`]: price the usage (counted locally with the model's tokenizer when the upstream
//!    reported none, e.g. a cut stream), charge it against the pre-deduction (refunding the rest) and
//!    hand one consume event to the storage thread. A request that fails refunds its pre-deduction.
//!
//! Never blocks and never waits on a database write: the only awaits are the client socket, the
//! upstream socket, on a key-cache miss a storage read, and when the worker's lease is short a
//! refill from the ledger thread.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burncloud_adaptors::{RequestOptions, ResponseMeta, StreamConverter, Usage};
use burncloud_adaptors::{openai, tokens};
use burncloud_core::error::Protocol;
use burncloud_core::filter::FilterSet;
use burncloud_core::model::{self, Channel, ChannelType, LogEntry, STATUS_ENABLED};
use burncloud_core::pricing::Price;
use burncloud_core::{ErrorKind, GatewayError, apikey};
use burncloud_storage::ConsumeEvent;
use bytes::{Bytes, BytesMut};

use crate::billing::Admission;
use crate::http::{Request, Responder};
use crate::state::{Caller, Worker, unix_now};
use crate::upstream::{Origin, Proxy, Route, UpstreamError, UpstreamRequest, UpstreamResponse};

/// Largest upstream response body read into memory (non-stream).
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

/// What the client called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A chat request in the client's protocol: `/v1/chat/completions`, `/v1/messages`, or Gemini's
    /// `models/{model}:generateContent` (model and stream flag from the URL).
    Chat(Protocol),
    Gemini {
        model: String,
        stream: bool,
    },
    Completions,
    Embeddings,
}

impl Endpoint {
    /// The relay endpoint for a POST to `path`, if it is one.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/chat/completions" => return Some(Endpoint::Chat(Protocol::OpenAi)),
            "/v1/messages" => return Some(Endpoint::Chat(Protocol::Anthropic)),
            "/v1/completions" => return Some(Endpoint::Completions),
            "/v1/embeddings" => return Some(Endpoint::Embeddings),
            _ => {}
        }
        let rest = path.strip_prefix("/v1beta/models/").or_else(|| path.strip_prefix("/v1/models/"))?;
        let (model, method) = rest.rsplit_once(':')?;
        let stream = match method {
            "generateContent" => false,
            "streamGenerateContent" => true,
            _ => return None,
        };
        let model = model.strip_prefix("models/").unwrap_or(model);
        if model.is_empty() || model.contains('/') {
            return None;
        }
        Some(Endpoint::Gemini { model: model.to_string(), stream })
    }

    /// The protocol the client speaks, and its errors are rendered in.
    pub fn protocol(&self) -> Protocol {
        match self {
            Endpoint::Chat(p) => *p,
            Endpoint::Gemini { .. } => Protocol::Gemini,
            Endpoint::Completions | Endpoint::Embeddings => Protocol::OpenAi,
        }
    }

    /// Whether a channel of `kind` can serve this endpoint (chat converts between protocols; the
    /// legacy completions and embeddings endpoints exist only in OpenAI's protocol).
    fn served_by(&self, kind: ChannelType) -> bool {
        match self {
            Endpoint::Chat(_) | Endpoint::Gemini { .. } => true,
            Endpoint::Completions | Endpoint::Embeddings => kind == ChannelType::OpenAi,
        }
    }
}

/// The protocol a channel speaks.
fn channel_protocol(kind: ChannelType) -> Protocol {
    match kind {
        ChannelType::OpenAi => Protocol::OpenAi,
        ChannelType::Anthropic => Protocol::Anthropic,
        ChannelType::Gemini => Protocol::Gemini,
    }
}

/// The routing fields of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// The model the client asked for: priced and logged by this name.
    pub model: String,
    pub stream: bool,
    /// OpenAI's `stream_options.include_usage` as the client sent it.
    pub include_usage: bool,
    /// The completion limit an OpenAI or Anthropic body sets (Gemini's is read when decoding).
    pub max_tokens: Option<u32>,
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

/// The whole relay for one request, in any client protocol.
pub async fn relay(worker: &Worker, endpoint: Endpoint, req: Request, resp: &mut Responder<'_>) {
    let mut ctx = RequestCtx::new(worker, &req);
    if let Err(err) = relay_steps(worker, &endpoint, &req, resp, &mut ctx).await {
        if err.origin == burncloud_core::ErrorSource::Internal {
            tracing::error!(request_id = %ctx.id, error = %err, "request failed inside the gateway");
        }
        respond_error(&ctx, resp, &err, endpoint.protocol()).await;
    }
}

async fn relay_steps(
    worker: &Worker,
    endpoint: &Endpoint,
    req: &Request,
    resp: &mut Responder<'_>,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    let caller = authenticate(worker, req).await?;
    let info = decode(endpoint, &req.body)?;
    authorize(&caller, &info.model, req.peer.ip())?;
    let snapshot = worker.shared.snapshot.load_full();
    check_prompt(&snapshot.filter, endpoint, &info, &req.body)?;
    let groups = serving_groups(&caller, &snapshot, &info.model);
    let Some(first_group) = groups.first().copied() else {
        return Err(GatewayError::client(
            ErrorKind::ModelNotAvailable,
            format!("no channel serves model {} for group {}", info.model, effective_group(&caller)),
        ));
    };
    let mut billed = Some(admit(worker, &caller, first_group, endpoint, &info, &snapshot, &req.body).await?);
    let attempts = snapshot.retry_times + 1;
    let mut tried: Vec<i64> = Vec::with_capacity(attempts);
    let mut last_err = None;
    while tried.len() < attempts {
        let Some((channel, group)) = pick_in_groups(worker, &snapshot, &groups, &info.model, &tried) else {
            break;
        };
        tried.push(channel.id);
        if !endpoint.served_by(channel.kind) {
            last_err = Some(GatewayError::upstream(
                502,
                true,
                format!("channel {} ({}) cannot serve this endpoint", channel.id, channel.kind.as_str()),
            ));
            continue;
        }
        let started = Instant::now();
        let outcome = forward(worker, &channel, endpoint, &info, &req.body, ctx).await;
        ctx.upstream_wait += started.elapsed();
        observe_outcome(worker, &snapshot, &channel, &outcome);
        match outcome {
            Ok(answer) => {
                // The consume event is handed to storage before the response's last byte, so a
                // client that has read the whole answer can already find its log.
                match answer {
                    Answer::Complete(full) => {
                        let delivered = full_delivered(&full, endpoint.protocol());
                        let blocked = completion_blocked(&snapshot.filter, &full, endpoint.protocol());
                        let images = billed.as_ref().map_or(0, |b| b.image_tokens(channel.kind));
                        let usage = measured_usage(endpoint, &info, &req.body, images, delivered);
                        if let Some(billed) = billed.take() {
                            let billed = billed.in_group(&snapshot, &info.model, group);
                            settle(worker, ctx, &caller, &channel, &info, billed, usage, req);
                        }
                        match blocked {
                            Some(err) => return Err(err),
                            None => respond_full(ctx, resp, full).await,
                        }
                    }
                    Answer::Stream(stream) => {
                        let (upstream, converter) = *stream;
                        let filter = snapshot.filter.clone();
                        let (delivered, open) = respond_stream(
                            worker,
                            ctx,
                            resp,
                            upstream,
                            converter,
                            endpoint.protocol(),
                            &filter,
                        )
                        .await;
                        let images = billed.as_ref().map_or(0, |b| b.image_tokens(channel.kind));
                        let usage = measured_usage(endpoint, &info, &req.body, images, delivered);
                        if let Some(billed) = billed.take() {
                            let billed = billed.in_group(&snapshot, &info.model, group);
                            settle(worker, ctx, &caller, &channel, &info, billed, usage, req);
                        }
                        if open {
                            let _ = resp.finish_stream().await;
                        }
                    }
                }
                return Ok(());
            }
            Err(err) => {
                if let Some(unlogged) = worker.failure_to_log(channel.id) {
                    tracing::warn!(
                        request_id = %ctx.id,
                        channel = channel.id,
                        error = %err.message,
                        unlogged_failures = unlogged,
                        "upstream attempt failed"
                    );
                }
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

/// Step 2: the routing fields of the body (OpenAI and Anthropic bodies name the model and the stream
/// flag alike; Gemini puts both in the URL).
pub fn decode(endpoint: &Endpoint, body: &[u8]) -> Result<RequestInfo, GatewayError> {
    let invalid = |m: String| GatewayError::client(ErrorKind::InvalidRequest, m);
    if let Endpoint::Gemini { model, stream } = endpoint {
        burncloud_adaptors::gemini::check_request(body)
            .map_err(|e| invalid(format!("request body is not a valid JSON object: {e}")))?;
        return Ok(RequestInfo {
            model: model.clone(),
            stream: *stream,
            include_usage: false,
            max_tokens: None,
        });
    }
    let info = openai::request_info(body).map_err(|e| invalid(e.to_string()))?;
    let stream = info.stream && !matches!(endpoint, Endpoint::Embeddings);
    Ok(RequestInfo {
        model: info.model,
        stream,
        include_usage: info.include_usage,
        max_tokens: info.max_tokens,
    })
}

/// The group a caller's requests are routed and priced in: the key's, else the user's. `auto` means
/// the groups of the `AutoGroups` option, in order (see [`serving_groups`]).
pub fn effective_group(caller: &Caller) -> &str {
    if caller.token.group.is_empty() { &caller.user.group } else { &caller.token.group }
}

/// The key group that walks the `AutoGroups` option.
pub const AUTO_GROUP: &str = "auto";

/// The groups a caller may be routed in, in the order to try them: the effective group alone, or for
/// an `auto` key the `AutoGroups` the user may use (its own group, or one listed in
/// `UserUsableGroups`).
pub fn caller_groups<'a>(caller: &'a Caller, snapshot: &'a crate::state::Snapshot) -> Vec<&'a str> {
    let group = effective_group(caller);
    if group != AUTO_GROUP {
        return vec![group];
    }
    snapshot
        .auto_groups
        .iter()
        .map(String::as_str)
        .filter(|g| *g == caller.user.group || snapshot.usable_groups.contains(*g))
        .collect()
}

/// [`caller_groups`] that have a channel for `model`.
pub fn serving_groups<'a>(
    caller: &'a Caller,
    snapshot: &'a crate::state::Snapshot,
    model: &str,
) -> Vec<&'a str> {
    let mut groups = caller_groups(caller, snapshot);
    groups.retain(|g| snapshot.abilities.serves(g, model));
    groups
}

/// The next channel across `groups` in order: the first group with a healthy untried channel, else
/// (every remaining one cooling down) the first untried channel at all, with the group it was found
/// in.
pub fn pick_in_groups<'a>(
    worker: &Worker,
    snapshot: &crate::state::Snapshot,
    groups: &[&'a str],
    model: &str,
    tried: &[i64],
) -> Option<(Arc<Channel>, &'a str)> {
    for group in groups {
        let mut passed_over = tried.to_vec();
        while let Some(channel) = route(worker, snapshot, group, model, &passed_over) {
            if worker.admit_channel(channel.id, &snapshot.cooldown) {
                return Some((channel, group));
            }
            passed_over.push(channel.id);
        }
    }
    groups.iter().find_map(|group| route(worker, snapshot, group, model, tried).map(|c| (c, *group)))
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

/// What an attempt produced: a complete body already in the client's protocol, or a stream to convert
/// as it arrives.
pub enum Answer {
    Complete(FullAnswer),
    Stream(Box<(UpstreamResponse, StreamConverter)>),
}

pub struct FullAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
    pub usage: Option<Usage>,
}

/// `max_tokens` sent to Anthropic upstreams when the client gave none.
const DEFAULT_MAX_TOKENS: u32 = 4096;

/// Feeds an attempt's outcome to the worker's channel health, and disables the channel (status 3)
/// when the answer matches the auto-disable rules. Client errors (a 4xx the client caused) count
/// neither way.
fn observe_outcome(
    worker: &Worker,
    snapshot: &crate::state::Snapshot,
    channel: &Channel,
    outcome: &Result<Answer, GatewayError>,
) {
    let err = match outcome {
        Ok(_) => return worker.record_channel_outcome(channel.id, true, &snapshot.cooldown),
        Err(e) if e.origin != burncloud_core::ErrorSource::Upstream => return,
        Err(e) => e,
    };
    if err.retryable {
        worker.record_channel_outcome(channel.id, false, &snapshot.cooldown);
    }
    let status = match err.kind {
        ErrorKind::Upstream { status } => status,
        _ => return,
    };
    let Some(reason) = snapshot.disable_rules.as_ref().and_then(|r| r.check(status, &err.message)) else {
        return;
    };
    if channel.status != STATUS_ENABLED {
        return;
    }
    tracing::warn!(channel = channel.id, %reason, "disabling the channel automatically");
    let shared = worker.shared.clone();
    let id = channel.id;
    crate::rt::spawn(async move {
        if let Err(e) = auto_disable(&shared, id, &reason.to_string()).await {
            tracing::error!(channel = id, error = %e, "automatic disable failed");
        }
    });
}

/// Sets an enabled channel to status 3 (auto-disabled), records why and when, and publishes it.
async fn auto_disable(shared: &crate::state::Shared, id: i64, reason: &str) -> Result<(), String> {
    let Some(mut channel) = shared.storage.get_channel(id).await.map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let next =
        burncloud_core::health::next_status(channel.status, burncloud_core::health::StatusEvent::AutoDisable);
    if next != model::CHANNEL_AUTO_DISABLED || channel.status == next {
        return Ok(());
    }
    channel.status = next;
    channel.auto_disabled_reason = reason.to_string();
    channel.auto_disabled_time = unix_now();
    shared.storage.update_channel(channel).await.map_err(|e| e.to_string())?;
    shared.reload().await
}

/// Step 5: one attempt on one channel, in the channel's protocol. A complete answer is read and
/// checked here, so a broken body still fails over; a stream is returned once its head has arrived.
pub async fn forward(
    worker: &Worker,
    channel: &Channel,
    endpoint: &Endpoint,
    info: &RequestInfo,
    body: &Bytes,
    ctx: &RequestCtx,
) -> Result<Answer, GatewayError> {
    let origin =
        Origin::parse(&channel.base_url).map_err(|e| GatewayError::upstream(502, true, e.to_string()))?;
    let proxy = match channel.proxy.as_str() {
        "" => None,
        url => Some(Proxy::parse(url).map_err(|e| GatewayError::upstream(502, true, e))?),
    };
    let route = Route { origin, proxy };
    let client = endpoint.protocol();
    let upstream = channel_protocol(channel.kind);
    let upstream_model = channel.upstream_model(&info.model);
    let (body, path, stream) = upstream_body(endpoint, client, upstream, upstream_model, info, body)?;
    let auth = format!("Bearer {}", channel.key);
    let accept = if stream { "text/event-stream" } else { "application/json" };
    let mut headers = vec![("Content-Type", "application/json"), ("Accept", accept)];
    match upstream {
        Protocol::OpenAi => headers.push(("Authorization", auth.as_str())),
        Protocol::Anthropic => {
            headers.push(("x-api-key", channel.key.as_str()));
            headers.push(("anthropic-version", "2023-06-01"));
        }
        Protocol::Gemini => headers.push(("x-goog-api-key", channel.key.as_str())),
    }
    let request = UpstreamRequest { method: "POST", path: &path, headers: &headers, body };
    let mut response = worker.client.send(&route, &request).await.map_err(upstream_failure)?;
    let status = response.status;
    if status != 200 {
        let body = response.read_to_end(1024 * 1024).await.unwrap_or_default();
        let message = burncloud_adaptors::upstream_error_message(upstream, &body)
            .map(|m| format!("upstream error: {m}"))
            .unwrap_or_else(|| format!("upstream answered HTTP {status}"));
        return Err(GatewayError::upstream(status, retryable_status(status), message));
    }
    let created = u64::try_from(unix_now()).unwrap_or(0);
    let meta = ResponseMeta { model: &info.model, id: &ctx.id, created };
    if stream {
        let mut converter = StreamConverter::new(upstream, client, &meta, info.include_usage);
        if injects_usage(endpoint, upstream, info) {
            converter = converter.hiding_usage();
        }
        return Ok(Answer::Stream(Box::new((response, converter))));
    }
    let raw = response.read_to_end(MAX_UPSTREAM_BODY).await.map_err(upstream_failure)?;
    let broken =
        |e: String| GatewayError::upstream(502, true, format!("upstream sent an unusable body: {e}"));
    if client == upstream {
        // Reading the usage parses the whole body, so a body it came out of is valid JSON; only a
        // body without usage needs the separate check (one parse per answer on the common path).
        let usage = burncloud_adaptors::response_usage(upstream, &raw);
        if usage.is_none() {
            serde_json::from_slice::<serde::de::IgnoredAny>(&raw).map_err(|e| broken(e.to_string()))?;
        }
        let content_type = response.header("content-type").unwrap_or("application/json").to_string();
        return Ok(Answer::Complete(FullAnswer { status, content_type, body: raw, usage }));
    }
    let converted = burncloud_adaptors::convert_response(upstream, client, &raw, &meta)
        .map_err(|e| broken(e.to_string()))?;
    Ok(Answer::Complete(FullAnswer {
        status,
        content_type: "application/json".into(),
        body: converted.body,
        usage: converted.usage,
    }))
}

/// The body, path and stream flag of the upstream request. Same protocol: the client's bytes, with
/// only `model` rewritten when the channel maps it. Different protocols: converted.
fn upstream_body(
    endpoint: &Endpoint,
    client: Protocol,
    upstream: Protocol,
    upstream_model: &str,
    info: &RequestInfo,
    body: &Bytes,
) -> Result<(Bytes, String, bool), GatewayError> {
    let invalid = |e: String| GatewayError::client(ErrorKind::InvalidRequest, e);
    let rewrite = |body: &Bytes| -> Result<Bytes, GatewayError> {
        if upstream_model == info.model {
            Ok(body.clone())
        } else {
            openai::with_model(body, upstream_model).map_err(|e| invalid(e.to_string()))
        }
    };
    match endpoint {
        Endpoint::Completions => Ok((rewrite(body)?, "/v1/completions".into(), info.stream)),
        Endpoint::Embeddings => Ok((rewrite(body)?, "/v1/embeddings".into(), false)),
        Endpoint::Chat(_) | Endpoint::Gemini { .. } if client == upstream => {
            let mut body = if client == Protocol::Gemini { body.clone() } else { rewrite(body)? };
            if injects_usage(endpoint, upstream, info) {
                // The upstream's own usage is the truth: ask for it even when the client did not.
                body = openai::with_usage_requested(&body).map_err(|e| invalid(e.to_string()))?;
            }
            Ok((body, burncloud_adaptors::upstream_path(upstream, upstream_model, info.stream), info.stream))
        }
        Endpoint::Chat(_) | Endpoint::Gemini { .. } => {
            let opts = RequestOptions {
                default_max_tokens: DEFAULT_MAX_TOKENS,
                stream: Some(info.stream),
                ..RequestOptions::default()
            };
            let converted =
                burncloud_adaptors::convert_request(client, upstream, body, upstream_model, &opts)
                    .map_err(|e| invalid(e.to_string()))?;
            Ok((converted.body, converted.path, converted.stream))
        }
    }
}

/// Whether the gateway adds `stream_options.include_usage` to an OpenAI chat stream the client sends
/// as is (and then keeps the usage chunk from a client that did not ask for it).
fn injects_usage(endpoint: &Endpoint, upstream: Protocol, info: &RequestInfo) -> bool {
    matches!(endpoint, Endpoint::Chat(Protocol::OpenAi))
        && upstream == Protocol::OpenAi
        && info.stream
        && !info.include_usage
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

fn success_headers<'a>(
    ctx: &'a RequestCtx,
    overhead: &'a str,
    content_type: &'a str,
) -> [(&'a str, &'a str); 3] {
    [("content-type", content_type), ("x-request-id", ctx.id.as_str()), ("x-burncloud-overhead-us", overhead)]
}

/// What reached the client: the upstream's usage when it reported one, else the completion text
/// delivered, for local counting.
pub enum Delivered {
    Reported(Usage),
    Unreported { completion_text: String },
}

/// What a complete answer delivers: its reported usage, else its text.
fn full_delivered(full: &FullAnswer, client: Protocol) -> Delivered {
    match full.usage {
        Some(u) => Delivered::Reported(u),
        None => Delivered::Unreported {
            completion_text: burncloud_adaptors::response_text(client, &full.body).unwrap_or_default(),
        },
    }
}

/// Step 6a: a complete response, already in the client's protocol.
pub async fn respond_full(ctx: &RequestCtx, resp: &mut Responder<'_>, full: FullAnswer) {
    let overhead = ctx.overhead_us().to_string();
    let headers = success_headers(ctx, &overhead, &full.content_type);
    let _ = resp.send(full.status, &headers, full.body).await;
}

/// Step 6b: a stream, each upstream chunk converted to the client's protocol and written as it
/// arrives. Returns the usage the upstream reported, if it did before the stream ended, else the text
/// delivered to the client; and whether the client stream is still open (the caller finishes it
/// after settling).
pub async fn respond_stream(
    worker: &Worker,
    ctx: &mut RequestCtx,
    resp: &mut Responder<'_>,
    mut upstream: UpstreamResponse,
    mut converter: StreamConverter,
    client: Protocol,
    filter: &FilterSet,
) -> (Delivered, bool) {
    let mut watch = (!filter.is_empty()).then(|| filter.stream());
    let overhead = ctx.overhead_us().to_string();
    if resp.start_stream(200, &success_headers(ctx, &overhead, "text/event-stream")).await.is_err() {
        return (stream_delivered(&converter), false);
    }
    let mut out = BytesMut::new();
    loop {
        let started = Instant::now();
        let chunk = upstream.next_chunk().await;
        ctx.upstream_wait += started.elapsed();
        match chunk {
            Ok(Some(bytes)) => {
                let seen = converter.delivered_text().len();
                converter.feed(&bytes, &mut out);
                let fresh = converter.delivered_text().get(seen..).unwrap_or("");
                if let Some(m) = watch.as_mut().and_then(|w| w.push(fresh)) {
                    // The chunk that completed the match is withheld; the stream ends with the error.
                    out.clear();
                    tracing::info!(request_id = %ctx.id, pattern = %m.pattern, "completion blocked by the content filter");
                    let err = blocked_error(&m);
                    out.extend_from_slice(&stream_error_event(&err, client));
                    break;
                }
                if !out.is_empty() && resp.send_chunk(out.split().freeze()).await.is_err() {
                    tracing::info!(request_id = %ctx.id, "client went away mid-stream");
                    return (stream_delivered(&converter), false);
                }
            }
            Ok(None) => {
                converter.finish(&mut out);
                break;
            }
            Err(e) => {
                tracing::warn!(request_id = %ctx.id, worker = worker.index, error = %e, "upstream stream broke");
                let err = GatewayError::upstream(502, false, e.to_string());
                out.extend_from_slice(&stream_error_event(&err, client));
                break;
            }
        }
    }
    let open = out.is_empty() || resp.send_chunk(out.freeze()).await.is_ok();
    (stream_delivered(&converter), open)
}

fn stream_delivered(converter: &StreamConverter) -> Delivered {
    match converter.usage() {
        Some(u) => Delivered::Reported(u),
        None => Delivered::Unreported { completion_text: converter.delivered_text().to_string() },
    }
}

/// The usage to bill: as reported, or counted with the model's tokenizer from the request and the
/// text delivered (the prompt in full, the completion as far as it reached the client).
pub fn measured_usage(
    endpoint: &Endpoint,
    info: &RequestInfo,
    body: &[u8],
    image_tokens: i64,
    delivered: Delivered,
) -> Measured {
    let completion_text = match delivered {
        Delivered::Reported(usage) => return Measured { usage, counted_locally: false },
        Delivered::Unreported { completion_text } => completion_text,
    };
    let model = info.model.as_str();
    let prompt_tokens = match endpoint {
        Endpoint::Chat(p) => chat_prompt_tokens(*p, model, body, info.stream),
        Endpoint::Gemini { .. } => chat_prompt_tokens(Protocol::Gemini, model, body, info.stream),
        Endpoint::Completions | Endpoint::Embeddings => legacy_prompt_tokens(model, body),
    } + image_tokens;
    let completion_tokens = i64::from(tokens::count_text(model, &completion_text));
    let usage = Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        ..Usage::default()
    };
    Measured { usage, counted_locally: true }
}

/// Usage as billed, and whether the gateway counted it itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    pub usage: Usage,
    pub counted_locally: bool,
}

fn chat_prompt_tokens(protocol: Protocol, model: &str, body: &[u8], stream: bool) -> i64 {
    let opts = RequestOptions { stream: Some(stream), ..RequestOptions::default() };
    match burncloud_adaptors::convert::decode_request(protocol, body, &opts) {
        Ok(request) => i64::from(tokens::count_chat_prompt(model, &request)),
        Err(_) => i64::from(tokens::count_text(model, &String::from_utf8_lossy(body))),
    }
}

/// The `prompt` (completions) or `input` (embeddings) texts of a legacy OpenAI request.
fn legacy_prompt_text(body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return Vec::new() };
    match v.get("prompt").or_else(|| v.get("input")) {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(items)) => {
            items.iter().filter_map(serde_json::Value::as_str).map(str::to_string).collect()
        }
        _ => Vec::new(),
    }
}

fn legacy_prompt_tokens(model: &str, body: &[u8]) -> i64 {
    legacy_prompt_text(body).iter().map(|t| i64::from(tokens::count_text(model, t))).sum()
}

/// Step 3b: refuses a prompt the content filter blocks (only decoded for it when a list is set).
pub fn check_prompt(
    filter: &FilterSet,
    endpoint: &Endpoint,
    info: &RequestInfo,
    body: &[u8],
) -> Result<(), GatewayError> {
    if filter.is_empty() {
        return Ok(());
    }
    let text = match endpoint {
        Endpoint::Completions | Endpoint::Embeddings => legacy_prompt_text(body).join("\n"),
        Endpoint::Chat(_) | Endpoint::Gemini { .. } => {
            let opts = RequestOptions { stream: Some(info.stream), ..RequestOptions::default() };
            burncloud_adaptors::summarize_request(endpoint.protocol(), body, &opts)
                .map(|s| s.prompt_text)
                .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
        }
    };
    match filter.check(&text) {
        Some(m) => Err(blocked_error(&m)),
        None => Ok(()),
    }
}

/// A complete answer the content filter blocks, as the error the client gets instead.
fn completion_blocked(filter: &FilterSet, full: &FullAnswer, client: Protocol) -> Option<GatewayError> {
    if filter.is_empty() {
        return None;
    }
    let text = burncloud_adaptors::response_text(client, &full.body).unwrap_or_default();
    filter.check(&text).map(|m| blocked_error(&m))
}

fn blocked_error(m: &burncloud_core::filter::Match) -> GatewayError {
    let list = match m.kind {
        burncloud_core::filter::PatternKind::Keyword => "keyword",
        burncloud_core::filter::PatternKind::Regex => "pattern",
    };
    GatewayError::client(
        ErrorKind::ContentFiltered,
        format!("blocked by the content filter ({list} #{})", m.index + 1),
    )
}

/// The event that tells a streaming client the upstream broke, in its protocol.
fn stream_error_event(err: &GatewayError, client: Protocol) -> Vec<u8> {
    let body = String::from_utf8_lossy(&err.render(client)).into_owned();
    match client {
        Protocol::Anthropic => format!("event: error\ndata: {body}\n\n").into_bytes(),
        Protocol::OpenAi | Protocol::Gemini => format!("data: {body}\n\n").into_bytes(),
    }
}

/// What a request was admitted with: its group and price (`None`: free in self-use mode) and its
/// pre-deductions and rate permits.
pub struct Billed {
    pub group: String,
    pub price: Option<Price>,
    pub admission: Admission,
    /// The prompt's images, measured at admission.
    pub images: Vec<crate::images::PromptImage>,
}

impl Billed {
    /// The prompt tokens of the request's images under the rule of the channel that served it (used
    /// when the upstream reports no usage).
    pub fn image_tokens(&self, kind: ChannelType) -> i64 {
        crate::images::tokens(&self.images, channel_protocol(kind))
    }

    /// The same admission, priced in `group` (an `auto` key served in a later group than the one it
    /// was admitted in pays that group's ratio; a difference to the pre-deduction settles as usual).
    pub fn in_group(mut self, snapshot: &crate::state::Snapshot, model: &str, group: &str) -> Billed {
        if group != self.group {
            self.price = snapshot.prices.price(model, group);
            self.group = group.to_string();
        }
        self
    }
}

/// The prompt as estimated before forwarding, for the pre-deduction and TPM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Estimate {
    /// Text, tool definitions and images (under the client protocol's image rule).
    pub prompt_tokens: i64,
    /// The completion the client allows (`max_tokens` and its protocol equivalents); `Some(0)` for
    /// embeddings.
    pub max_tokens: Option<i64>,
    /// The prompt's images, measured, for settlement under the serving channel's rule.
    pub images: Vec<crate::images::PromptImage>,
}

/// Step 4: the model's price (by the client-facing name), the prompt estimate, the key's rate
/// permits and the pre-deduction from the worker's leases.
pub async fn admit(
    worker: &Worker,
    caller: &Caller,
    group: &str,
    endpoint: &Endpoint,
    info: &RequestInfo,
    snapshot: &crate::state::Snapshot,
    body: &[u8],
) -> Result<Billed, GatewayError> {
    let price = match snapshot.prices.price(&info.model, group) {
        Some(p) => Some(p),
        None if snapshot.self_use_mode => None,
        None => {
            return Err(GatewayError::client(
                ErrorKind::ModelPriceNotConfigured,
                format!("model {} has no price: set it in ModelRatio or ModelPrice", info.model),
            ));
        }
    };
    let needs_tokens = matches!(price, Some(Price::Ratio { .. })) || caller.token.tpm > 0;
    // TPM spends real tokens: counted exactly. The pre-deduction alone takes a cheap upper bound
    // (bytes), and the exact count only when the bound cannot be covered.
    let exact = caller.token.tpm > 0;
    let estimate = if needs_tokens {
        estimate_prompt(worker, snapshot, endpoint, info, body, exact).await
    } else {
        Estimate::default()
    };
    let pre_for = |prompt: i64| {
        price.map(|p| p.pre_deduction(prompt, estimate.max_tokens, snapshot.pre_deduct_max_tokens))
    };
    let tighter = || {
        let images = crate::images::tokens(&estimate.images, endpoint.protocol());
        pre_for(exact_prompt_tokens(endpoint, info, body) + images).unwrap_or(0)
    };
    let retry: Option<&dyn Fn() -> i64> = if exact { None } else { Some(&tighter) };
    let admission =
        worker.billing.admit(caller, pre_for(estimate.prompt_tokens), estimate.prompt_tokens, retry).await?;
    Ok(Billed { group: group.to_string(), price, admission, images: estimate.images })
}

/// The prompt's tokens (text, tool definitions, images: inline ones measured from their bytes, remote
/// ones fetched as far as their header) and the completion the client allows. Text is counted with the
/// model's tokenizer when `exact`, else bounded from above by its length in bytes (a fraction of the
/// time; see `tokens::chat_prompt_upper_bound`).
pub async fn estimate_prompt(
    worker: &Worker,
    snapshot: &crate::state::Snapshot,
    endpoint: &Endpoint,
    info: &RequestInfo,
    body: &[u8],
    exact: bool,
) -> Estimate {
    let model = info.model.as_str();
    match endpoint {
        // The common case, bounded without decoding the body a second time: text and tools only.
        Endpoint::Chat(_) if !exact => match tokens::chat_body_upper_bound(body) {
            Some(bound) => Estimate {
                prompt_tokens: i64::from(bound),
                max_tokens: info.max_tokens.map(i64::from),
                images: Vec::new(),
            },
            None => decoded_estimate(worker, snapshot, endpoint, info, body, exact).await,
        },
        Endpoint::Chat(_) | Endpoint::Gemini { .. } => {
            decoded_estimate(worker, snapshot, endpoint, info, body, exact).await
        }
        Endpoint::Completions => Estimate {
            prompt_tokens: legacy_prompt_estimate(model, body, exact),
            max_tokens: serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("max_tokens").and_then(serde_json::Value::as_i64)),
            images: Vec::new(),
        },
        Endpoint::Embeddings => Estimate {
            prompt_tokens: legacy_prompt_estimate(model, body, exact),
            max_tokens: Some(0),
            images: Vec::new(),
        },
    }
}

/// The estimate from the decoded body: what Gemini bodies, bodies with images, and exact counts need.
async fn decoded_estimate(
    worker: &Worker,
    snapshot: &crate::state::Snapshot,
    endpoint: &Endpoint,
    info: &RequestInfo,
    body: &[u8],
    exact: bool,
) -> Estimate {
    let model = info.model.as_str();
    let protocol = endpoint.protocol();
    let opts = RequestOptions { stream: Some(info.stream), ..RequestOptions::default() };
    match burncloud_adaptors::convert::decode_request(protocol, body, &opts) {
        Ok(request) => {
            let images = crate::images::measure(&worker.client, &request, &snapshot.image_fetch).await;
            let text = if exact {
                tokens::count_chat_prompt(model, &request)
            } else {
                tokens::chat_prompt_upper_bound(&request)
            };
            Estimate {
                prompt_tokens: i64::from(text) + crate::images::tokens(&images, protocol),
                max_tokens: request.max_tokens.map(i64::from),
                images,
            }
        }
        Err(_) => Estimate {
            prompt_tokens: if exact {
                i64::from(tokens::count_text(model, &String::from_utf8_lossy(body)))
            } else {
                i64::try_from(body.len()).unwrap_or(i64::MAX)
            },
            ..Estimate::default()
        },
    }
}

/// The legacy endpoints' prompt: counted, or bounded by its bytes.
fn legacy_prompt_estimate(model: &str, body: &[u8], exact: bool) -> i64 {
    if exact {
        return legacy_prompt_tokens(model, body);
    }
    legacy_prompt_text(body).iter().map(|t| i64::try_from(t.len()).unwrap_or(i64::MAX)).sum()
}

/// The prompt's text tokens counted with the model's tokenizer (images excluded): what a
/// pre-deduction falls back to when the byte bound cannot be covered.
fn exact_prompt_tokens(endpoint: &Endpoint, info: &RequestInfo, body: &[u8]) -> i64 {
    let model = info.model.as_str();
    match endpoint {
        Endpoint::Chat(p) => chat_prompt_tokens(*p, model, body, info.stream),
        Endpoint::Gemini { .. } => chat_prompt_tokens(Protocol::Gemini, model, body, info.stream),
        Endpoint::Completions | Endpoint::Embeddings => legacy_prompt_tokens(model, body),
    }
}

/// Step 8: price the usage, charge it against the pre-deduction and send the consume event to the
/// storage thread (never awaited).
#[allow(clippy::too_many_arguments)]
pub fn settle(
    worker: &Worker,
    ctx: &RequestCtx,
    caller: &Caller,
    channel: &Channel,
    info: &RequestInfo,
    billed: Billed,
    measured: Measured,
    req: &Request,
) {
    let usage = measured.usage;
    let group = billed.group.as_str();
    let quota = billed
        .price
        .map(|p| p.quota_cached(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens))
        .unwrap_or(0);
    let other = pricing_record(billed.price, billed.admission.pre_deducted);
    worker.billing.settle(billed.admission, quota, usage.prompt_tokens + usage.completion_tokens);
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
        content: if measured.counted_locally {
            "usage counted by the gateway: the upstream reported none".into()
        } else {
            String::new()
        },
        cached_tokens: usage.cached_tokens,
        other,
    };
    worker.shared.storage.record(ConsumeEvent { log, quota });
}

/// The log's `other`: the ratios (or the per-call price) a request was charged with, and what was
/// pre-deducted for it. Serialized from plain structs (one allocation; keys in alphabetical order, as
/// a JSON object map would write them).
fn pricing_record(price: Option<Price>, pre_deducted: i64) -> String {
    #[derive(serde::Serialize)]
    struct Ratio {
        cache_ratio: f64,
        completion_ratio: f64,
        group_ratio: f64,
        model_ratio: f64,
        pre_deducted: i64,
    }
    #[derive(serde::Serialize)]
    struct PerCall {
        group_ratio: f64,
        model_price: f64,
        pre_deducted: i64,
    }
    let written = match price {
        Some(Price::Ratio { model_ratio, completion_ratio, group_ratio, cache_ratio }) => {
            serde_json::to_string(&Ratio {
                cache_ratio,
                completion_ratio,
                group_ratio,
                model_ratio,
                pre_deducted,
            })
        }
        Some(Price::PerCall { usd, group_ratio }) => {
            serde_json::to_string(&PerCall { group_ratio, model_price: usd, pre_deducted })
        }
        None => return r#"{"free":true}"#.to_string(),
    };
    // Serializing plain numbers cannot fail; a non-finite ratio is written as null, as json! would.
    written.unwrap_or_default()
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
    fn endpoints_are_recognised_by_path() {
        assert_eq!(Endpoint::from_path("/v1/embeddings"), Some(Endpoint::Embeddings));
        assert_eq!(Endpoint::from_path("/v1/messages"), Some(Endpoint::Chat(Protocol::Anthropic)));
        assert_eq!(
            Endpoint::from_path("/v1beta/models/gemini-2.0-flash:streamGenerateContent"),
            Some(Endpoint::Gemini { model: "gemini-2.0-flash".into(), stream: true })
        );
        assert_eq!(
            Endpoint::from_path("/v1/models/g:generateContent"),
            Some(Endpoint::Gemini { model: "g".into(), stream: false })
        );
        for bad in
            ["/v1/other", "/v1beta/models/:generateContent", "/v1beta/models/g:countTokens", "/v1/models"]
        {
            assert_eq!(Endpoint::from_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_pricing_record_is_the_json_object_of_the_price() {
        let ratio =
            Price::Ratio { model_ratio: 0.075, completion_ratio: 4.0, group_ratio: 1.0, cache_ratio: 0.5 };
        let expected = serde_json::json!({
            "model_ratio": 0.075, "completion_ratio": 4.0, "group_ratio": 1.0, "cache_ratio": 0.5,
            "pre_deducted": 308,
        });
        assert_eq!(pricing_record(Some(ratio), 308), expected.to_string());
        let per_call = Price::PerCall { usd: 0.04, group_ratio: 1.5 };
        let expected = serde_json::json!({"model_price": 0.04, "group_ratio": 1.5, "pre_deducted": 30_000});
        assert_eq!(pricing_record(Some(per_call), 30_000), expected.to_string());
        assert_eq!(pricing_record(None, 0), serde_json::json!({"free": true}).to_string());
        let odd =
            Price::Ratio { model_ratio: f64::NAN, completion_ratio: 1.0, group_ratio: 1.0, cache_ratio: 1.0 };
        let parsed: serde_json::Value = serde_json::from_str(&pricing_record(Some(odd), 1)).unwrap();
        assert!(parsed["model_ratio"].is_null() && parsed["pre_deducted"] == 1);
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
