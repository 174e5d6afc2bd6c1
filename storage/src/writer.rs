//! The storage thread: the loop that owns the database pool, batches consume events and serves
//! reads and management commands in arrival order.
//!
//! Owns batching (one transaction per `batch_size` events or per `flush_interval` after the first
//! buffered event), retry with backoff while the database is down, spilling unwritten batches to
//! the spill file, and the final flush at shutdown. Must never drop a billing event it has
//! received, never reply to a read before the consume events received ahead of it are committed
//! (for the reads that show billed counters), and never block a caller: callers only ever wait on
//! their own one-shot reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use burncloud_core::lease::{Account, Funding};
use burncloud_core::model::{Channel, LogEntry, Quota, Token, User};
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use futures_channel::oneshot;

use crate::error::StorageError;
use crate::repo::Db;
use crate::spill::{Segment, SpillFile, new_segment_id};
use crate::{ChannelFilter, ConfigData, ConsumeEvent, ExportData, ImportSummary, LogFilter, StorageStats};

/// First retry delay after a failed batch; doubled per failure up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A transaction written under a burst may hold this many times `batch_size` events.
const BATCH_LIMIT_FACTOR: usize = 8;
/// While events wait for their batch, the thread looks at its queue this often instead of parking
/// on it. A sender then never has to wake it: a wake-up per event would cost the worker's core two
/// context switches and the queue's spin-then-yield, per request. Commands wait at most this long
/// while a batch is open, and not at all otherwise.
const POLL_INTERVAL: Duration = Duration::from_millis(2);
/// Attempts to write the last events at shutdown before giving up (and spilling them).
const SHUTDOWN_ATTEMPTS: u32 = 3;

/// The reply half handed to the storage thread with each request.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, StorageError>>;

/// A message to the storage thread.
pub(crate) enum Command {
    Consume(ConsumeEvent),
    Flush(Reply<()>),
    TokenByKeyHash(String, Reply<Option<(Token, User)>>),
    LoadConfig(Reply<ConfigData>),
    CreateChannel(Channel, Reply<Channel>),
    ListChannels(ChannelFilter, Reply<(Vec<Channel>, i64)>),
    GetChannel(i64, Reply<Option<Channel>>),
    UpdateChannel(Channel, Reply<Option<Channel>>),
    DeleteChannel(i64, Reply<bool>),
    CreateUser(User, Reply<User>),
    GetUser(i64, Reply<Option<User>>),
    UpdateUser(User, Reply<Option<User>>),
    TopupUser { id: i64, quota: Quota, now: i64, reply: Reply<Option<User>> },
    Funding(Account, Reply<Option<Funding>>),
    CreateToken(Token, Reply<Token>),
    GetToken(i64, Reply<Option<Token>>),
    UpdateToken(Token, Reply<Option<Token>>),
    DeleteToken(i64, Reply<bool>),
    ListLogs(LogFilter, Reply<(Vec<LogEntry>, i64)>),
    SetOption(String, String, Reply<()>),
    Export(Reply<ExportData>),
    Import(Box<ExportData>, Reply<ImportSummary>),
    Shutdown,
}

/// Counters shared with every handle; written only by the storage thread.
#[derive(Debug, Default)]
pub(crate) struct SharedStats {
    batches_committed: AtomicU64,
    events_committed: AtomicU64,
    events_pending: AtomicU64,
    events_spilled: AtomicU64,
    failed_batches: AtomicU64,
}

impl SharedStats {
    pub(crate) fn snapshot(&self, commands_queued: usize) -> StorageStats {
        StorageStats {
            batches_committed: self.batches_committed.load(Ordering::Relaxed),
            events_committed: self.events_committed.load(Ordering::Relaxed),
            events_pending: self.events_pending.load(Ordering::Relaxed),
            events_spilled: self.events_spilled.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            commands_queued: commands_queued as u64,
        }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

/// The state of the storage thread.
pub(crate) struct Writer {
    db: Db,
    rx: Receiver<Command>,
    batch_size: usize,
    flush_interval: Duration,
    /// Events not yet committed, oldest first: spilled segments, then at most one fresh segment
    /// (`spill_id == None`) at the end that new events join.
    segments: Vec<Segment>,
    pending: usize,
    /// When the oldest uncommitted event arrived (the flush interval counts from here).
    first_at: Option<Instant>,
    /// While the database is failing: when to try again.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Set from the first failed batch until the next committed one, so an outage is logged once.
    outage: bool,
    spill: Option<SpillFile>,
    /// The spill file may hold segments (all of them are also in `segments` or committed).
    spill_dirty: bool,
    /// Spill ids committed since the spill file was last emptied; forgotten once it is.
    committed_spill_ids: Vec<String>,
    stats: Arc<SharedStats>,
}

/// What the storage thread starts with.
pub(crate) struct WriterInit {
    pub db: Db,
    pub rx: Receiver<Command>,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub spill: Option<SpillFile>,
    /// Segments read back from the spill file that still have to be written.
    pub replay: Vec<Segment>,
    /// Spill ids found in the spill file that the database already has (a crash came between commit
    /// and truncation).
    pub already_applied: Vec<String>,
    pub stats: Arc<SharedStats>,
}

impl Writer {
    pub(crate) fn new(init: WriterInit) -> Self {
        let pending = init.replay.iter().map(|s| s.events.len()).sum();
        let spill_dirty = !init.replay.is_empty() || !init.already_applied.is_empty();
        let writer = Writer {
            db: init.db,
            rx: init.rx,
            batch_size: init.batch_size.max(1),
            flush_interval: init.flush_interval,
            segments: init.replay,
            pending,
            first_at: (pending > 0).then(Instant::now),
            retry_at: None,
            backoff: INITIAL_BACKOFF,
            outage: false,
            spill: init.spill,
            spill_dirty,
            committed_spill_ids: init.already_applied,
            stats: init.stats,
        };
        writer.publish_pending();
        writer
    }

    /// Runs until a shutdown command arrives or every sender is gone; returns the result of the final
    /// flush.
    pub(crate) async fn run(mut self) -> Result<(), StorageError> {
        if self.pending > 0 {
            tracing::info!(events = self.pending, "replaying billing events from the spill file");
            let _ = self.flush_now().await;
        } else if self.spill_dirty {
            self.empty_spill_file().await;
        }
        loop {
            let msg = match self.deadline() {
                Some(deadline) => self.poll(deadline).await,
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match msg {
                Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Command::Consume(ev)) => {
                    self.push(ev);
                    if self.drain_consumes().await {
                        break;
                    }
                }
                Ok(cmd) => self.serve(cmd).await,
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.maybe_flush().await;
        }
        self.finish().await
    }

    /// The next message while a batch is open, taken without parking on the queue: what is queued
    /// now, else what is queued after a nap of [`POLL_INTERVAL`] (or until `deadline`, if sooner).
    /// `Timeout` when nothing came.
    async fn poll(&self, deadline: Instant) -> Result<Command, RecvTimeoutError> {
        let next = |rx: &Receiver<Command>| match rx.try_recv() {
            Ok(cmd) => Ok(cmd),
            Err(TryRecvError::Empty) => Err(RecvTimeoutError::Timeout),
            Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
        };
        match next(&self.rx) {
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let wake = deadline.min(now + POLL_INTERVAL);
                if wake > now {
                    smol::Timer::at(wake).await;
                }
                next(&self.rx)
            }
            other => other,
        }
    }

    /// Under a burst, takes every consume event already queued (up to [`BATCH_LIMIT_FACTOR`] batches)
    /// so that one transaction writes them all instead of one per `batch_size`; other commands met on
    /// the way are served in order. Whether a shutdown was met.
    async fn drain_consumes(&mut self) -> bool {
        if self.pending < self.batch_size {
            return false;
        }
        let limit = self.batch_size.saturating_mul(BATCH_LIMIT_FACTOR);
        while self.pending < limit {
            match self.rx.try_recv() {
                Ok(Command::Consume(ev)) => self.push(ev),
                Ok(Command::Shutdown) => return true,
                Ok(cmd) => self.serve(cmd).await,
                Err(_) => break,
            }
        }
        false
    }

    fn publish_pending(&self) {
        self.stats.events_pending.store(self.pending as u64, Ordering::Relaxed);
    }

    fn push(&mut self, ev: ConsumeEvent) {
        match self.segments.last_mut() {
            Some(seg) if seg.spill_id.is_none() => seg.events.push(ev),
            _ => self.segments.push(Segment { spill_id: None, events: vec![ev] }),
        }
        self.pending += 1;
        if self.first_at.is_none() {
            self.first_at = Some(Instant::now());
        }
        self.publish_pending();
    }

    /// When the loop must wake up even without a message.
    fn deadline(&self) -> Option<Instant> {
        if self.pending == 0 {
            return None;
        }
        self.retry_at.or_else(|| self.first_at.map(|t| t + self.flush_interval))
    }

    async fn maybe_flush(&mut self) {
        if self.pending == 0 {
            return;
        }
        let now = Instant::now();
        let due = match self.retry_at {
            Some(retry_at) => now >= retry_at,
            None => {
                self.pending >= self.batch_size
                    || self.first_at.is_some_and(|t| now >= t + self.flush_interval)
            }
        };
        if due {
            // A failure is logged, spilled and retried by flush_now itself.
            let _ = self.flush_now().await;
        }
    }

    /// Commits every pending event in one transaction, now (ignoring any backoff).
    async fn flush_now(&mut self) -> Result<(), StorageError> {
        if self.pending == 0 {
            return Ok(());
        }
        match self.db.write_batch(&self.segments, unix_now()).await {
            Ok(()) => {
                self.stats.batches_committed.fetch_add(1, Ordering::Relaxed);
                self.stats.events_committed.fetch_add(self.pending as u64, Ordering::Relaxed);
                if self.outage {
                    tracing::info!(events = self.pending, "database is back; pending billing events written");
                }
                self.committed_spill_ids.extend(self.segments.drain(..).filter_map(|s| s.spill_id));
                self.pending = 0;
                self.first_at = None;
                self.retry_at = None;
                self.backoff = INITIAL_BACKOFF;
                self.outage = false;
                self.publish_pending();
                if self.spill_dirty {
                    self.empty_spill_file().await;
                }
                Ok(())
            }
            Err(e) => {
                self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                if !self.outage {
                    tracing::error!(
                        error = %e,
                        pending = self.pending,
                        "cannot write billing events; keeping them and retrying with backoff"
                    );
                    self.outage = true;
                }
                self.spill_fresh_segment();
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                Err(e)
            }
        }
    }

    /// Appends the fresh (not yet spilled) events to the spill file, if one is configured.
    fn spill_fresh_segment(&mut self) {
        let Some(spill) = &self.spill else {
            return;
        };
        let Some(seg) = self.segments.last_mut() else {
            return;
        };
        if seg.spill_id.is_some() || seg.events.is_empty() {
            return;
        }
        let id = new_segment_id();
        self.spill_dirty = true;
        match spill.append(&id, &seg.events) {
            Ok(()) => {
                self.stats.events_spilled.fetch_add(seg.events.len() as u64, Ordering::Relaxed);
                seg.spill_id = Some(id);
            }
            Err(e) => tracing::error!(
                error = %e,
                path = %spill.path().display(),
                events = seg.events.len(),
                "cannot append to the spill file; the events stay in memory"
            ),
        }
    }

    /// Empties the spill file once everything in it is committed, then forgets the applied ids.
    async fn empty_spill_file(&mut self) {
        let Some(spill) = &self.spill else {
            return;
        };
        if let Err(e) = spill.truncate() {
            tracing::error!(error = %e, path = %spill.path().display(), "cannot truncate the spill file");
            return;
        }
        self.spill_dirty = false;
        let ids = std::mem::take(&mut self.committed_spill_ids);
        if let Err(e) = self.db.forget_spill_ids(&ids).await {
            // Harmless: the rows only guard against replaying segments that no longer exist.
            tracing::warn!(error = %e, "cannot remove applied spill ids");
        }
    }

    /// Serves one request. Reads that show billed counters first commit the events received ahead
    /// of them; when that fails, they report the failure instead of stale data.
    async fn serve(&mut self, cmd: Command) {
        match cmd {
            Command::Consume(ev) => self.push(ev),
            Command::Shutdown => {}
            Command::Flush(reply) => {
                let _ = reply.send(self.flush_now().await);
            }
            Command::TokenByKeyHash(hash, reply) => {
                let _ = reply.send(self.db.token_by_key_hash(&hash).await);
            }
            Command::LoadConfig(reply) => {
                let _ = reply.send(self.db.load_config().await);
            }
            Command::CreateChannel(ch, reply) => {
                let _ = reply.send(self.db.create_channel(ch, unix_now()).await);
            }
            Command::ListChannels(f, reply) => {
                let r = match self.flush_now().await {
                    Ok(()) => self.db.list_channels(&f).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::GetChannel(id, reply) => {
                let r = match self.flush_now().await {
                    Ok(()) => self.db.get_channel(id).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::UpdateChannel(ch, reply) => {
                let _ = reply.send(self.db.update_channel(ch).await);
            }
            Command::DeleteChannel(id, reply) => {
                let _ = reply.send(self.db.delete_channel(id).await);
            }
            Command::CreateUser(u, reply) => {
                let _ = reply.send(self.db.create_user(u, unix_now()).await);
            }
            Command::GetUser(id, reply) => {
                let r = match self.flush_now().await {
                    Ok(()) => self.db.get_user(id).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::UpdateUser(u, reply) => {
                let r = match self.flush_now().await {
                    Ok(()) => self.db.update_user(u).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::TopupUser { id, quota, now, reply } => {
                let r = match self.flush_now().await {
                    Ok(()) => self.db.topup_user(id, quota, now).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::Funding(account, reply) => {
                let r = match self.flush_now().await {
                    Ok(()) => self.db.funding(account).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::CreateToken(t, reply) => {
                let _ = reply.send(self.db.create_token(t, unix_now()).await);
            }
            Command::GetToken(id, reply) => {
                let r = match self.flush_now().await {
                    Ok(()) => self.db.get_token(id).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::UpdateToken(t, reply) => {
                let r = match self.flush_now().await {
                    Ok(()) => self.db.update_token(t).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::DeleteToken(id, reply) => {
                let _ = reply.send(self.db.delete_token(id).await);
            }
            Command::ListLogs(f, reply) => {
                let r = match self.flush_now().await {
                    Ok(()) => self.db.list_logs(&f).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::Export(reply) => {
                let r = match self.flush_now().await {
                    Ok(()) => self.db.export().await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::Import(data, reply) => {
                let _ = reply.send(self.db.import(*data).await);
            }
            Command::SetOption(key, value, reply) => {
                let _ = reply.send(self.db.set_option(&key, &value).await);
            }
        }
    }

    /// Serves what is still queued, writes every pending event (a few attempts), closes the pool.
    async fn finish(mut self) -> Result<(), StorageError> {
        while let Ok(cmd) = self.rx.try_recv() {
            self.serve(cmd).await;
        }
        let mut result = Ok(());
        for attempt in 0..SHUTDOWN_ATTEMPTS {
            if attempt > 0 {
                smol::Timer::after(INITIAL_BACKOFF * 2u32.pow(attempt)).await;
            }
            result = self.flush_now().await;
            if result.is_ok() {
                break;
            }
        }
        self.db.close().await;
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let spilled = self.segments.iter().all(|s| s.spill_id.is_some());
                let detail = match (&self.spill, spilled) {
                    (Some(spill), true) => format!(
                        "{e}; they are kept in the spill file {} and written at the next start",
                        spill.path().display()
                    ),
                    _ => format!("{e}; no spill file could take them, so they are lost"),
                };
                tracing::error!(events = self.pending, "{detail}");
                Err(StorageError::Unwritten { events: self.pending, detail })
            }
        }
    }
}
