//! [`EmbeddedLedger`]: the development ledger, for a gateway that runs as one process.
//!
//! Owns a [`ModelLedger`] and the two files that make it durable, exactly what
//! [`ModelLedger::persisted`] gives: a snapshot (`PATH`, JSON) and an append-only log of every call that
//! changed the state since the snapshot (`PATH.log`, one JSON [`LedgerOp`] per line). A call that
//! changes the state is appended and `fdatasync`ed before it answers; when the model takes a new
//! snapshot, it is written to `PATH.tmp`, fsynced, renamed over `PATH`, the directory fsynced, and only
//! then is the log truncated. Opening loads the snapshot and replays the log
//! ([`ModelLedger::restore`]), ignoring a torn last line (a crash mid-append: the call was never
//! answered). `PATH.lock` holds an exclusive lock while the ledger is open, so a second process (or a
//! second open) cannot write the same files.
//!
//! A crash between the rename and the truncation leaves the new snapshot with the old log; replaying
//! that log onto it changes nothing: every logged row call is then a repeat or stale, every open,
//! funding and reclaim already applied, and the last logged heartbeat of an instance is the beat the
//! snapshot holds.
//!
//! Never applies part of a call, and never answers a call it has not made durable: after an I/O error
//! it answers [`LedgerError::Unavailable`] and rebuilds its memory from the files (the failed append cut
//! off first), so it holds exactly what a restart would; until that succeeds every call is
//! `Unavailable`. Blocks on the disk, so it is driven from a dedicated thread, never from a worker.
//! Times are whatever the caller passes. Rate windows are soft state, kept in memory only.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use burncloud_core::lease::model::LedgerState;
use burncloud_core::lease::{
    Account, AccountAudit, CallId, Funding, InstanceId, Ledger, LedgerError, LedgerOp, Millis, ModelLedger,
    Reclaim,
};
use burncloud_core::model::Quota;
use burncloud_core::ratelimit::{RateGrant, RateKey, RateWindow};
use serde::{Deserialize, Serialize};

/// Calls logged between two snapshots by default.
pub const DEFAULT_SNAPSHOT_EVERY: usize = 1024;

/// The snapshot file's format version.
const FORMAT: u32 = 1;

/// The snapshot file.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    format: u32,
    state: LedgerState,
}

/// The ledger files of one path.
#[derive(Debug)]
struct Files {
    snapshot: PathBuf,
    log_path: PathBuf,
    tmp: PathBuf,
    dir: PathBuf,
    /// `PATH.log`, opened for appending.
    log: File,
    /// Bytes of `log` known to hold complete, synced entries.
    log_len: u64,
    /// `PATH.lock`, exclusively locked while open.
    _lock: File,
}

/// The embedded ledger: see the module documentation.
#[derive(Debug)]
pub struct EmbeddedLedger {
    model: ModelLedger,
    files: Files,
    /// Entries of the model's log that are on disk.
    written: usize,
    snapshot_every: usize,
    /// Rate-limit windows (soft state: neither snapshotted nor logged, as in the model).
    rates: BTreeMap<RateKey, RateWindow>,
    /// Why the memory no longer matches the files, until they are read back.
    broken: Option<String>,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn io_error(what: &str, path: &Path, e: &io::Error) -> String {
    format!("{what} {}: {e}", path.display())
}

fn unavailable(msg: String) -> LedgerError {
    LedgerError::Unavailable(msg)
}

/// What the files hold.
struct Loaded {
    /// `None` when there is no snapshot file.
    snapshot: Option<LedgerState>,
    log: Vec<LedgerOp>,
    /// Bytes of complete lines in the log (a torn tail beyond them is dropped).
    log_len: u64,
    torn: bool,
}

fn load(snapshot: &Path, log_path: &Path) -> Result<Loaded, String> {
    let snapshot_state = match fs::read(snapshot) {
        Ok(bytes) => {
            let file: SnapshotFile = serde_json::from_slice(&bytes)
                .map_err(|e| format!("unreadable ledger snapshot {}: {e}", snapshot.display()))?;
            if file.format != FORMAT {
                return Err(format!(
                    "ledger snapshot {} has format {}, this build reads {FORMAT}",
                    snapshot.display(),
                    file.format
                ));
            }
            Some(file.state)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error("cannot read ledger snapshot", snapshot, &e)),
    };
    let bytes = match fs::read(log_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_error("cannot read ledger log", log_path, &e)),
    };
    // Only newline-terminated lines count: an entry is written with its newline in one append and
    // synced before its call answers, so an unterminated tail is a crash mid-append.
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut log = Vec::new();
    for (n, line) in bytes[..complete].split_inclusive(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let op: LedgerOp = serde_json::from_slice(line)
            .map_err(|e| format!("unreadable ledger log {} line {}: {e}", log_path.display(), n + 1))?;
        log.push(op);
    }
    Ok(Loaded { snapshot: snapshot_state, log, log_len: complete as u64, torn: complete < bytes.len() })
}

/// Writes a snapshot atomically: temp file, fsync, rename over `snapshot`, fsync the directory.
fn write_snapshot(files: &Files, state: &LedgerState) -> Result<(), String> {
    let json = serde_json::to_vec(&SnapshotFile { format: FORMAT, state: state.clone() })
        .map_err(|e| format!("cannot encode ledger snapshot: {e}"))?;
    let result = (|| -> io::Result<()> {
        let mut tmp = File::create(&files.tmp)?;
        tmp.write_all(&json)?;
        tmp.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        // Best effort: a stale temp file is harmless (it is rewritten before every rename).
        let _ = fs::remove_file(&files.tmp);
        return Err(io_error("cannot write ledger snapshot", &files.tmp, &e));
    }
    fs::rename(&files.tmp, &files.snapshot)
        .map_err(|e| io_error("cannot rename ledger snapshot over", &files.snapshot, &e))?;
    sync_dir(&files.dir)
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("cannot sync directory", dir, &e))
}

fn open_log(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_error("cannot open ledger log", path, &e))
}

fn encode(ops: &[LedgerOp]) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    for op in ops {
        serde_json::to_writer(&mut buf, op).map_err(|e| format!("cannot encode ledger log entry: {e}"))?;
        buf.push(b'\n');
    }
    Ok(buf)
}

impl EmbeddedLedger {
    /// Opens (or creates) the ledger at `path`, with a snapshot every [`DEFAULT_SNAPSHOT_EVERY`] calls.
    pub fn open(path: &Path) -> Result<EmbeddedLedger, LedgerError> {
        Self::open_with(path, DEFAULT_SNAPSHOT_EVERY)
    }

    /// Opens (or creates) the ledger at `path`, taking a new snapshot after `snapshot_every` logged
    /// calls (at least 2). A missing snapshot is an empty ledger (generation 1), written at once, so a
    /// snapshot that vanishes later is an error rather than a silent reset.
    pub fn open_with(path: &Path, snapshot_every: usize) -> Result<EmbeddedLedger, LedgerError> {
        // With 1 the model would rotate on every call and its log would never grow: a rotation could
        // not be told from a call that logged nothing.
        let snapshot_every = snapshot_every.max(2);
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let lock_path = with_suffix(path, ".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| unavailable(io_error("cannot open ledger lock", &lock_path, &e)))?;
        lock.try_lock().map_err(|e| {
            unavailable(format!("ledger {} is in use (lock {}): {e}", path.display(), lock_path.display()))
        })?;
        let log_path = with_suffix(path, ".log");
        let loaded = load(path, &log_path).map_err(unavailable)?;
        let fresh = loaded.snapshot.is_none();
        let files = Files {
            snapshot: path.to_path_buf(),
            tmp: with_suffix(path, ".tmp"),
            log: open_log(&log_path).map_err(unavailable)?,
            log_path,
            dir,
            log_len: loaded.log_len,
            _lock: lock,
        };
        let mut ledger = EmbeddedLedger {
            model: ModelLedger::new(snapshot_every),
            files,
            written: 0,
            snapshot_every,
            rates: BTreeMap::new(),
            broken: None,
        };
        ledger.install(loaded).map_err(unavailable)?;
        if fresh {
            let (base, _) = ledger.model.persisted();
            write_snapshot(&ledger.files, base).map_err(unavailable)?;
        }
        Ok(ledger)
    }

    /// Replaces the memory with what the files hold; cuts a torn log tail off.
    fn install(&mut self, loaded: Loaded) -> Result<(), String> {
        if loaded.torn {
            self.files
                .log
                .set_len(loaded.log_len)
                .and_then(|()| self.files.log.sync_data())
                .map_err(|e| io_error("cannot cut the torn tail of ledger log", &self.files.log_path, &e))?;
        }
        let snapshot =
            loaded.snapshot.unwrap_or_else(|| ModelLedger::new(self.snapshot_every).state().clone());
        self.model = ModelLedger::restore(snapshot, &loaded.log, self.snapshot_every);
        self.written = loaded.log.len();
        self.files.log_len = loaded.log_len;
        Ok(())
    }

    /// After an I/O error: reads the files back (the snapshot must exist now).
    fn reload(&mut self) -> Result<(), String> {
        let loaded = load(&self.files.snapshot, &self.files.log_path)?;
        if loaded.snapshot.is_none() {
            return Err(format!("ledger snapshot {} vanished", self.files.snapshot.display()));
        }
        self.files.log = open_log(&self.files.log_path)?;
        self.install(loaded)
    }

    /// Makes the memory match the files again after an earlier failure.
    fn recover(&mut self) -> Result<(), LedgerError> {
        let Some(why) = self.broken.take() else { return Ok(()) };
        if let Err(e) = self.reload() {
            self.broken = Some(why);
            return Err(unavailable(format!("ledger not recovered: {e}")));
        }
        tracing::info!(path = %self.files.snapshot.display(), "embedded ledger recovered from its files");
        Ok(())
    }

    /// Runs one call on the model and makes what it logged durable before answering.
    fn apply<T>(
        &mut self,
        call: impl FnOnce(&mut ModelLedger) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        self.recover()?;
        let answer = call(&mut self.model);
        if let Err(e) = self.persist() {
            tracing::error!(error = %e, "embedded ledger write failed; rebuilding from its files");
            // Cut off what the failed append may have left, then rebuild the memory from the files.
            let _ = self.files.log.set_len(self.files.log_len);
            self.broken = Some(e.clone());
            let _ = self.recover();
            return Err(unavailable(e));
        }
        answer
    }

    /// Writes what the model logged since the last call: appends new log entries, or writes a new
    /// snapshot and truncates the log when the model took one.
    fn persist(&mut self) -> Result<(), String> {
        let (snapshot, log) = self.model.persisted();
        if log.len() < self.written {
            write_snapshot(&self.files, snapshot)?;
            self.files
                .log
                .set_len(0)
                .and_then(|()| self.files.log.sync_data())
                .map_err(|e| io_error("cannot truncate ledger log", &self.files.log_path, &e))?;
            self.files.log_len = 0;
            self.written = 0;
        }
        if log.len() > self.written {
            let buf = encode(&log[self.written..])?;
            self.files
                .log
                .write_all(&buf)
                .and_then(|()| self.files.log.sync_data())
                .map_err(|e| io_error("cannot append to ledger log", &self.files.log_path, &e))?;
            self.files.log_len += buf.len() as u64;
            self.written = log.len();
        }
        Ok(())
    }

    /// The ledger's state (what a restart restores).
    pub fn state(&self) -> &LedgerState {
        self.model.state()
    }

    /// The model the ledger wraps.
    pub fn model(&self) -> &ModelLedger {
        &self.model
    }

    /// The snapshot's path (the log is beside it, `PATH.log`).
    pub fn path(&self) -> &Path {
        &self.files.snapshot
    }
}

impl Ledger for EmbeddedLedger {
    fn take(&mut self, call: CallId, want: Quota, floor: Quota) -> Result<Quota, LedgerError> {
        self.apply(|m| m.take(call, want, floor))
    }

    fn give_back(&mut self, call: CallId, amount: Quota) -> Result<(), LedgerError> {
        self.apply(|m| m.give_back(call, amount))
    }

    fn report_spend(&mut self, call: CallId, amount: Quota) -> Result<(), LedgerError> {
        self.apply(|m| m.report_spend(call, amount))
    }

    fn heartbeat(&mut self, instance: InstanceId, now: Millis) -> Result<u64, LedgerError> {
        self.apply(|m| m.heartbeat(instance, now))
    }

    fn reclaim(&mut self, instance: InstanceId, now: Millis, ttl: Millis) -> Result<Reclaim, LedgerError> {
        self.apply(|m| m.reclaim(instance, now, ttl))
    }

    fn stale_instances(&mut self, now: Millis, ttl: Millis) -> Result<Vec<InstanceId>, LedgerError> {
        self.recover()?;
        self.model.stale_instances(now, ttl)
    }

    fn open(&mut self, account: Account, funding: Funding) -> Result<(), LedgerError> {
        self.apply(|m| m.open(account, funding))
    }

    fn fund(&mut self, account: Account, funding: Funding) -> Result<(), LedgerError> {
        self.apply(|m| m.fund(account, funding))
    }

    fn balance(&mut self, account: Account) -> Result<Quota, LedgerError> {
        self.recover()?;
        self.model.balance(account)
    }

    fn audit(&mut self, account: Account) -> Result<AccountAudit, LedgerError> {
        self.recover()?;
        self.model.audit(account)
    }

    fn rate_take(
        &mut self,
        key: RateKey,
        now: Millis,
        want: i64,
        limit: i64,
        window: Millis,
    ) -> Result<RateGrant, LedgerError> {
        Ok(self.rates.entry(key).or_default().take(now, want, limit, window))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use burncloud_core::lease::HolderId;

    use super::*;

    const USER: Account = Account::User(1);

    fn scratch() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bc_embedded_unit_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&dir).unwrap();
        dir.join("ledger.json")
    }

    fn call(seq: u64) -> CallId {
        CallId { holder: HolderId { instance: InstanceId(1), worker: 0 }, account: USER, seq }
    }

    fn funded(path: &Path, every: usize) -> EmbeddedLedger {
        let mut l = EmbeddedLedger::open_with(path, every).unwrap();
        l.heartbeat(InstanceId(1), 1).unwrap();
        l.open(USER, Funding { remaining: 1000, total: 1000, version: 1 }).unwrap();
        l
    }

    #[test]
    fn a_failed_append_is_not_applied_and_the_next_call_works() {
        let path = scratch();
        let mut l = funded(&path, 100);
        let before = l.state().clone();
        // A read-only handle: the append fails with a real I/O error.
        l.files.log = File::open(&l.files.log_path).unwrap();
        assert!(matches!(l.take(call(1), 100, 0), Err(LedgerError::Unavailable(_))));
        assert_eq!(l.state(), &before);
        assert_eq!(l.take(call(1), 100, 0), Ok(100));
        let after = l.state().clone();
        drop(l);
        let l = EmbeddedLedger::open_with(&path, 100).unwrap();
        assert_eq!(l.state(), &after);
        assert_eq!(l.model().account(USER).balance, 900);
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_failed_snapshot_is_not_applied_and_the_next_call_works() {
        let path = scratch();
        let mut l = funded(&path, 2);
        let mut seq = 0;
        while l.written != 1 {
            seq += 1;
            l.take(call(seq), 1, 0).unwrap();
        }
        let before = l.state().clone();
        // The temp file cannot be created where a directory stands: the next logged call's snapshot
        // fails before its rename.
        fs::create_dir(&l.files.tmp).unwrap();
        seq += 1;
        assert!(matches!(l.take(call(seq), 5, 0), Err(LedgerError::Unavailable(_))));
        assert_eq!(l.state(), &before);
        fs::remove_dir(&l.files.tmp).unwrap();
        assert_eq!(l.take(call(seq), 5, 0), Ok(5));
        assert_eq!(l.written, 0);
        let after = l.state().clone();
        drop(l);
        assert_eq!(EmbeddedLedger::open_with(&path, 2).unwrap().state(), &after);
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_crash_between_snapshot_and_truncation_replays_the_old_log_harmlessly() {
        let path = scratch();
        let mut l = funded(&path, 1000);
        l.heartbeat(InstanceId(2), 5).unwrap();
        for seq in 1..=6 {
            l.take(call(seq), 10 * seq as Quota, 0).unwrap();
        }
        l.report_spend(call(7), 30).unwrap();
        l.fund(USER, Funding { remaining: 0, total: 1500, version: 2 }).unwrap();
        l.heartbeat(InstanceId(2), 9).unwrap();
        l.reclaim(InstanceId(1), 20, 5).unwrap();
        let state = l.state().clone();
        // The new snapshot is in place, the log not yet truncated.
        write_snapshot(&l.files, &state).unwrap();
        assert!(l.written > 0);
        drop(l);
        let l = EmbeddedLedger::open_with(&path, 1000).unwrap();
        assert_eq!(l.state(), &state);
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_vanished_snapshot_is_an_error_not_a_reset() {
        let path = scratch();
        let mut l = funded(&path, 100);
        fs::remove_file(&path).unwrap();
        l.files.log = File::open(&l.files.log_path).unwrap();
        assert!(matches!(l.take(call(1), 1, 0), Err(LedgerError::Unavailable(_))));
        // Every call is refused until the files make sense again.
        assert!(matches!(l.balance(USER), Err(LedgerError::Unavailable(_))));
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
