//! What the mock was asked: the last requests, for tests to inspect, and a request counter.
//!
//! Owns [`Recorder`]: one shard per worker, each a short lock-protected ring that only its own
//! worker writes, so recording never contends across workers; a global sequence number lets
//! `GET /_mock/requests` merge the shards back into arrival order. Records are copies: a record
//! never pins a connection's read buffer. Test tooling, not gateway worker code.

use std::collections::VecDeque;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};

use burncloud_runtime::http::Request;
use serde_json::{Map, Value, json};

/// How many requests are kept (the most recent ones).
pub const KEPT_REQUESTS: usize = 1000;

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Record {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Lower-cased names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Record {
    pub fn of(req: &Request) -> Record {
        Record {
            method: req.method.as_str().to_owned(),
            path: req.path.clone(),
            query: req.query.clone(),
            headers: req
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect(),
            body: req.body.to_vec(),
        }
    }

    /// `{"method","path","query","headers":{name: value},"body": <JSON or string>}`; repeated
    /// headers are joined with ", ".
    pub fn to_json(&self) -> Value {
        let mut headers = Map::new();
        for (name, value) in &self.headers {
            match headers.get_mut(name) {
                Some(Value::String(joined)) => {
                    joined.push_str(", ");
                    joined.push_str(value);
                }
                _ => {
                    headers.insert(name.clone(), Value::String(value.clone()));
                }
            }
        }
        let body = if self.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&self.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()))
        };
        json!({"method": self.method, "path": self.path, "query": self.query, "headers": headers, "body": body})
    }
}

#[repr(align(128))] // one cache line pair per shard: workers never share a line
struct Shard {
    #[allow(clippy::disallowed_types)] // test tooling, not worker code: uncontended, only its worker writes
    log: std::sync::Mutex<VecDeque<(u64, Record)>>,
    requests: AtomicU64,
}

/// Recorded requests and counts, sharded by worker.
pub struct Recorder {
    sequence: AtomicU64,
    shards: Vec<Shard>,
}

impl Recorder {
    pub fn new(workers: usize) -> Recorder {
        let shards = (0..workers.max(1))
            .map(|_| Shard { log: Default::default(), requests: AtomicU64::new(0) })
            .collect();
        Recorder { sequence: AtomicU64::new(0), shards }
    }

    fn shard(&self, worker: usize) -> Option<&Shard> {
        self.shards.get(worker % self.shards.len().max(1))
    }

    pub fn record(&self, worker: usize, record: Record) {
        let Some(shard) = self.shard(worker) else { return };
        shard.requests.fetch_add(1, Ordering::Relaxed);
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        let mut log = shard.log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() >= KEPT_REQUESTS {
            log.pop_front();
        }
        log.push_back((seq, record));
    }

    /// The last [`KEPT_REQUESTS`] requests across all workers, oldest first.
    pub fn requests(&self) -> Vec<Record> {
        let mut all: Vec<(u64, Record)> = Vec::new();
        for shard in &self.shards {
            all.extend(shard.log.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned());
        }
        all.sort_unstable_by_key(|(seq, _)| *seq);
        let skip = all.len().saturating_sub(KEPT_REQUESTS);
        all.into_iter().skip(skip).map(|(_, r)| r).collect()
    }

    pub fn clear_requests(&self) {
        for shard in &self.shards {
            shard.log.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    /// API requests served since start (or since the last reset).
    pub fn count(&self) -> u64 {
        self.shards.iter().map(|s| s.requests.load(Ordering::Relaxed)).sum()
    }

    pub fn reset_count(&self) {
        for shard in &self.shards {
            shard.requests.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str) -> Record {
        Record { method: "GET".into(), path: path.into(), query: None, headers: Vec::new(), body: Vec::new() }
    }

    #[test]
    fn requests_from_all_shards_come_back_in_arrival_order() {
        let r = Recorder::new(3);
        for (i, worker) in [2, 0, 1, 0].into_iter().enumerate() {
            r.record(worker, record(&format!("/{i}")));
        }
        let paths: Vec<String> = r.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["/0", "/1", "/2", "/3"]);
        assert_eq!(r.count(), 4);
    }

    #[test]
    fn only_the_most_recent_requests_are_kept() {
        let r = Recorder::new(2);
        for i in 0..KEPT_REQUESTS + 10 {
            r.record(i, record(&i.to_string()));
        }
        let kept = r.requests();
        assert_eq!((kept.len(), kept[0].path.as_str()), (KEPT_REQUESTS, "10"));
    }

    #[test]
    fn a_record_renders_headers_joined_and_json_bodies_parsed() {
        let rec = Record {
            method: "POST".into(),
            path: "/v1/x".into(),
            query: Some("a=1".into()),
            headers: vec![("x-a".into(), "1".into()), ("x-a".into(), "2".into())],
            body: br#"{"model":"m"}"#.to_vec(),
        };
        let v = rec.to_json();
        assert_eq!((v["headers"]["x-a"].as_str(), v["body"]["model"].as_str()), (Some("1, 2"), Some("m")));
    }
}
