//! # burncloud-storage
//!
//! The durable record of the gateway. One dedicated OS thread ("burncloud-storage") owns the sqlx
//! pool (SQLite for dev, Postgres for prod, chosen by URL) and is fed through a crossbeam channel;
//! answers come back through `futures-channel` one-shots, so callers on any executor can await them.
//! Billing events from [`StorageHandle::record`] are batched into one multi-row transaction per
//! `batch_size` events or `flush_interval`; reads and management commands are served in arrival
//! order.
//!
//! Never makes a worker wait on a write (`record` is a non-blocking send), never drops a billing
//! event it has received (failed batches are kept, spilled to a local file and retried), never uses
//! tokio, and never holds a lock shared with workers.

pub mod announce;
mod db;
mod error;
pub mod ledger;
mod repo;
mod spill;
mod writer;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use burncloud_core::lease::{Account, Funding};
use burncloud_core::model::{Channel, LogEntry, Quota, Token, User};
use crossbeam_channel::Sender;
use futures_channel::oneshot;
use serde::{Deserialize, Serialize};

pub use error::StorageError;

use db::Target;
use repo::Db;
use spill::SpillFile;
use writer::{Command, Reply, SharedStats, Writer, WriterInit};

/// How long connecting may take before `start`/`migrate` report the database as unreachable.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the storage thread.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// `sqlite://PATH` (file created if missing) or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`.
    pub database_url: String,
    /// Consume events per transaction at most before a flush is forced.
    pub batch_size: usize,
    /// Longest time a consume event waits in memory before its batch is written.
    pub flush_interval: Duration,
    /// Pool size (the storage thread runs one statement at a time; more helps only reconnects).
    pub max_connections: u32,
    /// Where batches that could not be written are appended (JSON lines) until the database is
    /// back; replayed at start. One file per gateway instance. `None`: keep them in memory only.
    pub spill_path: Option<PathBuf>,
    /// How long connecting may take before the database counts as unreachable.
    pub connect_timeout: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            database_url: "sqlite://burncloud.db".into(),
            batch_size: 512,
            flush_interval: Duration::from_millis(50),
            max_connections: 4,
            spill_path: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// One settled request: its log line and the quota it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsumeEvent {
    pub log: LogEntry,
    pub quota: Quota,
}

/// Everything a configuration snapshot is built from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConfigData {
    /// Every channel, whatever its status, ordered by id.
    pub channels: Vec<Channel>,
    pub options: BTreeMap<String, String>,
}

/// The whole configuration, as `GET /api/export` gives it and `POST /api/import` takes it: secrets
/// included (upstream keys, password hashes, key hashes), logs not.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExportData {
    pub channels: Vec<Channel>,
    /// With their `password_hash`.
    pub users: Vec<User>,
    /// With their `key_hash`; `user_id` refers to `users[..].id`.
    pub tokens: Vec<Token>,
    pub options: BTreeMap<String, String>,
}

/// What an import added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ImportSummary {
    pub channels: usize,
    pub users: usize,
    pub tokens: usize,
    pub options: usize,
}

/// Which channels `list_channels` returns.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChannelFilter {
    pub tag: Option<String>,
    pub status: Option<i64>,
    /// 1-based; values below 1 mean 1.
    pub page: i64,
    /// Values below 1 mean 20; at most 10,000.
    pub page_size: i64,
}

/// Which logs `list_logs` returns. `start` and `end` are inclusive Unix seconds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogFilter {
    pub user_id: Option<i64>,
    pub token_id: Option<i64>,
    /// Log type (`LOG_TOPUP`, `LOG_CONSUME`, …).
    pub kind: Option<i64>,
    pub model: Option<String>,
    /// The request's id (`x-request-id` of its response).
    pub request_id: Option<String>,
    pub start: Option<i64>,
    pub end: Option<i64>,
    /// 1-based; values below 1 mean 1.
    pub page: i64,
    /// Values below 1 mean 20; at most 10,000.
    pub page_size: i64,
}

/// Counters of the storage thread, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StorageStats {
    /// Batch transactions committed.
    pub batches_committed: u64,
    /// Consume events committed.
    pub events_committed: u64,
    /// Consume events taken from the queue but not committed yet.
    pub events_pending: u64,
    /// Consume events ever appended to the spill file.
    pub events_spilled: u64,
    /// Batch transactions that failed (each is retried).
    pub failed_batches: u64,
    /// Messages waiting in the queue to the storage thread.
    pub commands_queued: u64,
}

/// Applies the embedded migrations to the database at `database_url`, blocking until done.
pub fn migrate(database_url: &str) -> Result<(), StorageError> {
    let target = Target::parse(database_url)?;
    smol::block_on(async {
        let pool = db::connect(&target, 1, DEFAULT_CONNECT_TIMEOUT).await?;
        let result = db::run_migrations(&target, &pool).await;
        pool.close().await;
        result
    })
}

/// Connects, migrates, reads back the spill file and spawns the storage thread. Blocks until the
/// database answers; fails (after `connect_timeout` at most) when it does not.
pub fn start(cfg: StorageConfig) -> Result<(StorageHandle, StorageThread), StorageError> {
    let target = Target::parse(&cfg.database_url)?;
    let spill = cfg.spill_path.clone().map(SpillFile::new);
    let (db, replay, already_applied) = smol::block_on(async {
        let pool = db::connect(&target, cfg.max_connections, cfg.connect_timeout).await?;
        if let Err(e) = db::run_migrations(&target, &pool).await {
            pool.close().await;
            return Err(e);
        }
        let db = Db::new(pool, target.backend, target.redacted());
        let segments = match &spill {
            Some(spill) => spill.load().map_err(|e| StorageError::Spill {
                path: spill.path().display().to_string(),
                reason: e.to_string(),
            })?,
            None => Vec::new(),
        };
        let ids: Vec<String> = segments.iter().filter_map(|s| s.spill_id.clone()).collect();
        let applied = db.applied_spill_ids(&ids).await?;
        let (done, replay): (Vec<_>, Vec<_>) =
            segments.into_iter().partition(|s| s.spill_id.as_ref().is_some_and(|id| applied.contains(id)));
        let already_applied = done.into_iter().filter_map(|s| s.spill_id).collect();
        Ok((db, replay, already_applied))
    })?;

    let (tx, rx) = crossbeam_channel::unbounded();
    let stats = Arc::new(SharedStats::default());
    let writer = Writer::new(WriterInit {
        db,
        rx,
        batch_size: cfg.batch_size,
        flush_interval: cfg.flush_interval,
        spill,
        replay,
        already_applied,
        stats: stats.clone(),
    });
    let join = std::thread::Builder::new()
        .name("burncloud-storage".into())
        .spawn(move || smol::block_on(writer.run()))
        .map_err(|_| StorageError::ThreadGone)?;
    Ok((StorageHandle { tx: tx.clone(), stats }, StorageThread { tx, join: Some(join) }))
}

/// Owner of the storage thread. Dropping it also stops the thread (and waits for the final flush).
pub struct StorageThread {
    tx: Sender<Command>,
    join: Option<JoinHandle<Result<(), StorageError>>>,
}

impl std::fmt::Debug for StorageThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageThread").field("running", &self.join.is_some()).finish()
    }
}

impl StorageThread {
    /// Serves everything queued, writes every pending consume event, then joins the thread.
    pub fn shutdown(mut self) -> Result<(), StorageError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), StorageError> {
        let Some(join) = self.join.take() else {
            return Ok(());
        };
        // The thread also stops when every sender is gone, so a failed send is not an error.
        let _ = self.tx.send(Command::Shutdown);
        join.join().map_err(|_| StorageError::ThreadGone)?
    }
}

impl Drop for StorageThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "storage thread stopped with an error");
        }
    }
}

/// A cheap, cloneable way to talk to the storage thread from any thread or executor.
#[derive(Clone)]
pub struct StorageHandle {
    tx: Sender<Command>,
    stats: Arc<SharedStats>,
}

impl std::fmt::Debug for StorageHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageHandle").field("stats", &self.stats()).finish()
    }
}

impl StorageHandle {
    /// Queues one settled request for the next batch; never blocks. In the batch transaction: the
    /// log row is inserted; the user loses `quota` and gains `used_quota` and one `request_count`;
    /// the token gains `used_quota`, loses `remain_quota` unless unlimited, and its `accessed_time`
    /// becomes the log's `created_at`; the channel gains `used_quota`.
    pub fn record(&self, ev: ConsumeEvent) {
        if let Err(err) = self.tx.send(Command::Consume(ev))
            && let Command::Consume(ev) = err.into_inner()
        {
            let event = serde_json::to_string(&ev).unwrap_or_default();
            tracing::error!(%event, "storage thread is not running; billing event not recorded");
        }
    }

    /// Counters of the storage thread.
    pub fn stats(&self) -> StorageStats {
        self.stats.snapshot(self.tx.len())
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| StorageError::ThreadGone)?;
        answer.await.map_err(|_| StorageError::ThreadGone)?
    }

    /// Resolves once every event recorded through any handle before this call is committed.
    pub async fn flush(&self) -> Result<(), StorageError> {
        self.call(Command::Flush).await
    }

    /// The API key with this SHA-256 hash and its owner (`None` when either is missing). Does not
    /// wait for pending consume events.
    pub async fn token_by_key_hash(&self, key_hash: &str) -> Result<Option<(Token, User)>, StorageError> {
        let key_hash = key_hash.to_string();
        self.call(|r| Command::TokenByKeyHash(key_hash, r)).await
    }

    /// Every channel (any status) and every option.
    pub async fn load_config(&self) -> Result<ConfigData, StorageError> {
        self.call(Command::LoadConfig).await
    }

    /// Inserts the channel and its abilities; the id is assigned, `created_time` set when 0.
    pub async fn create_channel(&self, ch: Channel) -> Result<Channel, StorageError> {
        self.call(|r| Command::CreateChannel(ch, r)).await
    }

    /// One page of channels ordered by id, and how many match the filter.
    pub async fn list_channels(&self, f: ChannelFilter) -> Result<(Vec<Channel>, i64), StorageError> {
        self.call(|r| Command::ListChannels(f, r)).await
    }

    pub async fn get_channel(&self, id: i64) -> Result<Option<Channel>, StorageError> {
        self.call(|r| Command::GetChannel(id, r)).await
    }

    /// Replaces the channel with `ch.id` and rewrites its abilities. `used_quota` is kept (billing
    /// owns it), and so is `created_time` when the new one is 0. `None` when there is no such channel.
    pub async fn update_channel(&self, ch: Channel) -> Result<Option<Channel>, StorageError> {
        self.call(|r| Command::UpdateChannel(ch, r)).await
    }

    /// Deletes the channel and its abilities; `false` when there was no such channel.
    pub async fn delete_channel(&self, id: i64) -> Result<bool, StorageError> {
        self.call(|r| Command::DeleteChannel(id, r)).await
    }

    /// Inserts the user (id assigned, `created_time` set when 0); `Conflict` on a taken username.
    pub async fn create_user(&self, u: User) -> Result<User, StorageError> {
        self.call(|r| Command::CreateUser(u, r)).await
    }

    pub async fn get_user(&self, id: i64) -> Result<Option<User>, StorageError> {
        self.call(|r| Command::GetUser(id, r)).await
    }

    /// Writes username, password hash (kept when empty), display name, role, status, email, group
    /// and quota. `used_quota`, `request_count` and `created_time` are billing's and are kept.
    pub async fn update_user(&self, u: User) -> Result<Option<User>, StorageError> {
        self.call(|r| Command::UpdateUser(u, r)).await
    }

    /// Adds `quota` to the user and writes a top-up log (type `LOG_TOPUP`, `created_at = now`) in one
    /// transaction, after the consume events recorded before it.
    pub async fn topup_user(&self, id: i64, quota: Quota, now: i64) -> Result<Option<User>, StorageError> {
        self.call(|reply| Command::TopupUser { id, quota, now, reply }).await
    }

    /// What the database says an account was granted and has left, after the consume events recorded
    /// before this call are committed: for a user `quota` left of `quota + used_quota`; for a key with
    /// limited quota `remain_quota` of `remain_quota + used_quota`. `None` for a user or key that does
    /// not exist, and for a key with unlimited quota (it has no balance of its own).
    pub async fn funding(&self, account: Account) -> Result<Option<Funding>, StorageError> {
        self.call(|r| Command::Funding(account, r)).await
    }

    /// Inserts the key: `t.key_hash` and the masked `t.key` come from the caller. `NotFound` when the
    /// user does not exist, `Conflict` when the hash is taken.
    pub async fn create_token(&self, t: Token) -> Result<Token, StorageError> {
        self.call(|r| Command::CreateToken(t, r)).await
    }

    pub async fn get_token(&self, id: i64) -> Result<Option<Token>, StorageError> {
        self.call(|r| Command::GetToken(id, r)).await
    }

    /// Writes name, status, expiry, remaining and unlimited quota, models, allowed IPs, group, RPM
    /// and TPM; owner, key, creation and access times and `used_quota` are kept.
    pub async fn update_token(&self, t: Token) -> Result<Option<Token>, StorageError> {
        self.call(|r| Command::UpdateToken(t, r)).await
    }

    pub async fn delete_token(&self, id: i64) -> Result<bool, StorageError> {
        self.call(|r| Command::DeleteToken(id, r)).await
    }

    /// The whole configuration (see [`ExportData`]), after pending consume events are committed.
    pub async fn export(&self) -> Result<ExportData, StorageError> {
        self.call(Command::Export).await
    }

    /// Adds a whole configuration in one transaction (see [`ExportData`]); `Conflict` (nothing
    /// added) when a username or key hash exists already.
    pub async fn import(&self, data: ExportData) -> Result<ImportSummary, StorageError> {
        self.call(|r| Command::Import(Box::new(data), r)).await
    }

    /// One page of logs, newest first (by `created_at`, then id), and how many match the filter.
    pub async fn list_logs(&self, f: LogFilter) -> Result<(Vec<LogEntry>, i64), StorageError> {
        self.call(|r| Command::ListLogs(f, r)).await
    }

    /// Inserts or replaces one option.
    pub async fn set_option(&self, key: &str, value: &str) -> Result<(), StorageError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.call(|r| Command::SetOption(key, value, r)).await
    }
}
