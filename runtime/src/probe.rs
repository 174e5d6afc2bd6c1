//! Channel tests: one tiny chat request to a channel's test model, on demand
//! (`POST /api/channel/{id}/test`) and periodically for every enabled or auto-disabled channel.
//!
//! The periodic checks run as one low-priority task on worker 0 (they need an upstream client, which
//! lives on the workers' executors) every `ChannelTestInterval` seconds (default 300; 0 turns them
//! off). `ChannelTestFailures` consecutive failures (default 3) disable an enabled channel (status 3,
//! with the reason); one success re-enables an auto-disabled channel. Manually disabled channels
//! (status 2) are never probed nor touched. Every test records `test_time` and `response_time`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use burncloud_core::error::Protocol;
use burncloud_core::health::{StatusEvent, next_status};
use burncloud_core::model::{CHANNEL_AUTO_DISABLED, Channel, STATUS_ENABLED};
use burncloud_core::{ErrorKind, GatewayError};
use bytes::Bytes;

use crate::http::ShutdownSignal;
use crate::relay::{self, Answer, Endpoint, RequestCtx, RequestInfo};
use crate::rt;
use crate::state::{Shared, Worker, unix_now};

pub const INTERVAL_OPTION: &str = "ChannelTestInterval";
pub const FAILURES_OPTION: &str = "ChannelTestFailures";
const DEFAULT_INTERVAL_S: u64 = 300;
const DEFAULT_FAILURES: u32 = 3;

/// The outcome of one test.
pub struct TestResult {
    pub ok: bool,
    pub time_ms: i64,
    pub message: String,
}

/// Sends one non-stream chat request ("hi", at most one output token) to the channel's test model
/// (else its first model) in the channel's protocol, and reads the whole answer.
pub async fn test_channel(worker: &Worker, channel: &Channel) -> TestResult {
    let model = if channel.test_model.is_empty() {
        channel.model_list().next().unwrap_or_default().to_string()
    } else {
        channel.test_model.clone()
    };
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    });
    let info = RequestInfo { model, stream: false, include_usage: false, max_tokens: Some(1) };
    let ctx =
        RequestCtx { id: worker.next_request_id(), started: Instant::now(), upstream_wait: Duration::ZERO };
    let started = Instant::now();
    let endpoint = Endpoint::Chat(Protocol::OpenAi);
    let outcome =
        relay::forward(worker, channel, &endpoint, &info, &Bytes::from(body.to_string()), &ctx).await;
    let time_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    match outcome {
        Ok(Answer::Complete(_)) => TestResult { ok: true, time_ms, message: String::new() },
        Ok(Answer::Stream(_)) => TestResult { ok: true, time_ms, message: String::new() },
        Err(e) => TestResult { ok: false, time_ms, message: e.message },
    }
}

/// Records a test on the channel and applies the status change it implies, if any.
pub async fn record(
    shared: &Shared,
    id: i64,
    result: &TestResult,
    disable_after_failure: bool,
) -> Result<(), GatewayError> {
    let storage_err =
        |e: burncloud_storage::StorageError| GatewayError::internal(ErrorKind::Unavailable, e.to_string());
    let Some(mut channel) = shared.storage.get_channel(id).await.map_err(storage_err)? else { return Ok(()) };
    let before = channel.status;
    channel.test_time = unix_now();
    channel.response_time = result.time_ms;
    if result.ok && channel.status == CHANNEL_AUTO_DISABLED {
        channel.status = next_status(channel.status, StatusEvent::AutoEnable);
        channel.auto_disabled_reason.clear();
    } else if !result.ok && disable_after_failure && channel.status == STATUS_ENABLED {
        channel.status = next_status(channel.status, StatusEvent::AutoDisable);
        channel.auto_disabled_reason = format!("channel test failed: {}", result.message);
        channel.auto_disabled_time = unix_now();
    }
    let changed = channel.status != before;
    if changed {
        tracing::warn!(channel = id, from = before, to = channel.status, reason = %channel.auto_disabled_reason, "channel status changed by a test");
    }
    shared.storage.update_channel(channel).await.map_err(storage_err)?;
    if changed {
        shared.reload().await.map_err(|e| GatewayError::internal(ErrorKind::Unavailable, e))?;
    }
    Ok(())
}

fn option_u64(shared: &Shared, key: &str, default: u64) -> u64 {
    shared.snapshot.load().options.get(key).and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// The periodic checks; returns when the worker shuts down.
pub async fn run_periodic(worker: Rc<Worker>, signal: ShutdownSignal) {
    let failures: RefCell<HashMap<i64, u32>> = RefCell::default();
    let mut last_round = Instant::now();
    loop {
        let tick = std::pin::pin!(rt::sleep(Duration::from_secs(1)));
        let stop = std::pin::pin!(signal.triggered());
        if let futures_util::future::Either::Right(_) = futures_util::future::select(tick, stop).await {
            return;
        }
        let interval = option_u64(&worker.shared, INTERVAL_OPTION, DEFAULT_INTERVAL_S);
        if interval == 0 || last_round.elapsed() < Duration::from_secs(interval) {
            continue;
        }
        last_round = Instant::now();
        let threshold = option_u64(&worker.shared, FAILURES_OPTION, u64::from(DEFAULT_FAILURES)).max(1);
        let channels: Vec<_> = worker
            .shared
            .snapshot
            .load()
            .channels
            .values()
            .filter(|c| c.status == STATUS_ENABLED || c.status == CHANNEL_AUTO_DISABLED)
            .cloned()
            .collect();
        for channel in channels {
            if signal.is_triggered() {
                return;
            }
            let result = test_channel(&worker, &channel).await;
            let count = {
                let mut map = failures.borrow_mut();
                let entry = map.entry(channel.id).or_default();
                *entry = if result.ok { 0 } else { entry.saturating_add(1) };
                u64::from(*entry)
            };
            if let Err(e) = record(&worker.shared, channel.id, &result, count >= threshold).await {
                tracing::error!(channel = channel.id, error = %e, "recording a channel test failed");
            }
        }
    }
}
