//! The append-only spill file: consume events that could not be written to the database.
//!
//! Owns the file format (JSON lines `{"batch": ID, "event": ConsumeEvent}`, one segment of lines per
//! failed batch, each segment under a fresh id) and its life cycle: append when a batch fails, read
//! back at start, truncate once everything in it is committed. Must never drop a line it cannot
//! parse (the file is kept aside instead), and never leave a half-written segment behind (a failed
//! append is cut back to the previous length).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ConsumeEvent;

/// Events written (or to be written) together; `spill_id` is set once they are in the spill file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Segment {
    pub spill_id: Option<String>,
    pub events: Vec<ConsumeEvent>,
}

#[derive(Serialize)]
struct LineOut<'a> {
    batch: &'a str,
    event: &'a ConsumeEvent,
}

#[derive(Deserialize)]
struct LineIn {
    batch: String,
    event: ConsumeEvent,
}

/// A fresh spill segment id, unique across processes and restarts.
pub(crate) fn new_segment_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    format!("{}-{}-{}", std::process::id(), nanos, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// The spill file at a path.
#[derive(Debug)]
pub(crate) struct SpillFile {
    path: PathBuf,
}

impl SpillFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        SpillFile { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Reads every segment in the file (none when it does not exist). Lines that cannot be parsed
    /// are reported and the whole file is copied aside first, so nothing is lost when it is later
    /// truncated.
    pub(crate) fn load(&self) -> io::Result<Vec<Segment>> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut segments: Vec<Segment> = Vec::new();
        let mut bad_lines = 0usize;
        for line in BufReader::new(file).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let Ok(parsed) = serde_json::from_str::<LineIn>(&line) else {
                bad_lines += 1;
                continue;
            };
            match segments.last_mut() {
                Some(seg) if seg.spill_id.as_deref() == Some(parsed.batch.as_str()) => {
                    seg.events.push(parsed.event)
                }
                _ => segments.push(Segment { spill_id: Some(parsed.batch), events: vec![parsed.event] }),
            }
        }
        if bad_lines > 0 {
            let aside = self.path.with_extension(format!("bad-{}", new_segment_id()));
            std::fs::copy(&self.path, &aside)?;
            tracing::error!(
                path = %self.path.display(),
                kept_at = %aside.display(),
                bad_lines,
                "spill file has lines that cannot be read; the file was copied aside for manual recovery"
            );
        }
        Ok(segments)
    }

    /// Appends `events` as one segment under `id`, durably (fsync). On failure the file is cut back
    /// to its previous length so no partial segment remains.
    pub(crate) fn append(&self, id: &str, events: &[ConsumeEvent]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(events.len() * 256);
        for event in events {
            serde_json::to_writer(&mut buf, &LineOut { batch: id, event }).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        let mut file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        let before = file.metadata()?.len();
        let written = file.write_all(&buf).and_then(|()| file.sync_data());
        if let Err(e) = written {
            let _ = file.set_len(before);
            return Err(e);
        }
        Ok(())
    }

    /// Empties the file (everything in it is committed).
    pub(crate) fn truncate(&self) -> io::Result<()> {
        match OpenOptions::new().write(true).open(&self.path) {
            Ok(file) => {
                file.set_len(0)?;
                file.sync_data()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burncloud_core::model::LogEntry;

    fn ev(n: i64) -> ConsumeEvent {
        ConsumeEvent { log: LogEntry { user_id: n, quota: n, ..LogEntry::default() }, quota: n }
    }

    #[test]
    fn segments_round_trip_and_truncate() {
        let dir = std::env::temp_dir().join(format!("bc-spill-unit-{}", new_segment_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spill = SpillFile::new(dir.join("spill.jsonl"));
        assert!(spill.load().unwrap().is_empty());
        spill.append("a", &[ev(1), ev(2)]).unwrap();
        spill.append("b", &[ev(3)]).unwrap();
        let segs = spill.load().unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0], Segment { spill_id: Some("a".into()), events: vec![ev(1), ev(2)] });
        assert_eq!(segs[1].events, vec![ev(3)]);
        spill.truncate().unwrap();
        assert!(spill.load().unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unreadable_lines_keep_a_copy_of_the_file() {
        let dir = std::env::temp_dir().join(format!("bc-spill-unit-{}", new_segment_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spill = SpillFile::new(dir.join("spill.jsonl"));
        spill.append("a", &[ev(1)]).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(spill.path())
            .unwrap()
            .write_all(b"{\"batch\":")
            .unwrap();
        let segs = spill.load().unwrap();
        assert_eq!(segs.len(), 1);
        let copies = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(copies, 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
