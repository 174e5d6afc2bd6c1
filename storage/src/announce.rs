//! Change announcements between gateway instances, through Redis pub/sub.
//!
//! An instance that changed operating data (channels, options) or keys and users publishes one short
//! message on the namespace's channel; every other instance subscribed to it rebuilds its snapshot, or
//! drops its key caches, within a round trip — no polling. A listener that (re)connects treats the
//! gap as a change of everything, so a message missed while Redis was unreachable costs one reload,
//! never a stale configuration. Each message carries the sender's nonce, so an instance ignores its
//! own.
//!
//! Blocking I/O on the synchronous `redis` client (no tokio): the publisher is used from the control
//! thread, the listener runs on its own thread. Neither is ever used from a worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use redis::{Client, Connection};

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Channels, abilities or options: rebuild the configuration snapshot.
    Config,
    /// API keys or users: drop cached keys.
    Keys,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Change::Config => "config",
            Change::Keys => "keys",
        }
    }

    fn parse(s: &str) -> Option<Change> {
        match s {
            "config" => Some(Change::Config),
            "keys" => Some(Change::Keys),
            _ => None,
        }
    }
}

/// Connection and read timeouts; the listener also wakes this often to check for a stop.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between reconnection attempts while Redis is unreachable.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// Waits before the next connection attempt. The listener has a thread of its own, never an executor's.
#[allow(clippy::disallowed_methods)]
fn reconnect_pause() {
    std::thread::sleep(RECONNECT_PAUSE);
}

/// The pub/sub channel of a namespace (same hash tag as the ledger's keys).
fn channel(namespace: &str) -> String {
    format!("{{bc:{namespace}}}:changes")
}

fn open(url: &str) -> Result<Client, String> {
    Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))
}

/// Publishes this instance's changes.
pub struct Publisher {
    client: Client,
    conn: Option<Connection>,
    channel: String,
    nonce: String,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("channel", &self.channel).finish()
    }
}

impl Publisher {
    /// A publisher on `url`'s server for `namespace`; `nonce` identifies this instance's messages.
    /// Does not connect yet.
    pub fn new(url: &str, namespace: &str, nonce: &str) -> Result<Publisher, String> {
        Ok(Publisher {
            client: open(url)?,
            conn: None,
            channel: channel(namespace),
            nonce: nonce.to_string(),
        })
    }

    /// Announces a change; on failure the connection is dropped and the next call reconnects. A lost
    /// announcement is made up for by the listeners' reload on reconnect.
    pub fn publish(&mut self, change: Change) -> Result<(), String> {
        if self.conn.is_none() {
            let conn = self.client.get_connection_with_timeout(TIMEOUT).map_err(|e| e.to_string())?;
            conn.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
            conn.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else { return Err("no connection".into()) };
        let message = format!("{} {}", change.as_str(), self.nonce);
        let sent: Result<i64, _> = redis::cmd("PUBLISH").arg(&self.channel).arg(message).query(conn);
        match sent {
            Ok(_) => Ok(()),
            Err(e) => {
                self.conn = None;
                Err(e.to_string())
            }
        }
    }
}

/// Stops the listener thread when dropped (within a read timeout) and joins it.
pub struct Listener {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("running", &self.join.is_some()).finish()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

/// Subscribes to `namespace`'s changes on its own thread and calls `on_change` for every change
/// announced by another instance, and for both kinds after every (re)connection but the first.
pub fn listen(
    url: &str,
    namespace: &str,
    nonce: &str,
    mut on_change: impl FnMut(Change) + Send + 'static,
) -> Result<Listener, String> {
    let client = open(url)?;
    let channel = channel(namespace);
    let nonce = nonce.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let join = std::thread::Builder::new()
        .name("burncloud-announce".into())
        .spawn(move || {
            let mut connected_before = false;
            let mut outage_logged = false;
            while !stopping.load(Ordering::Acquire) {
                let mut conn = match client.get_connection_with_timeout(TIMEOUT) {
                    Ok(c) => c,
                    Err(e) => {
                        if !outage_logged {
                            tracing::warn!(error = %e, "cannot subscribe to change announcements; retrying");
                            outage_logged = true;
                        }
                        reconnect_pause();
                        continue;
                    }
                };
                let mut pubsub = conn.as_pubsub();
                if let Err(e) =
                    pubsub.set_read_timeout(Some(TIMEOUT)).and_then(|()| pubsub.subscribe(&channel))
                {
                    tracing::warn!(error = %e, "cannot subscribe to change announcements; retrying");
                    reconnect_pause();
                    continue;
                }
                if outage_logged {
                    tracing::info!("subscribed to change announcements again");
                    outage_logged = false;
                }
                if connected_before {
                    // Anything may have changed while we were not listening.
                    on_change(Change::Config);
                    on_change(Change::Keys);
                }
                connected_before = true;
                while !stopping.load(Ordering::Acquire) {
                    match pubsub.get_message() {
                        Ok(msg) => {
                            let Ok(payload) = msg.get_payload::<String>() else { continue };
                            let mut parts = payload.splitn(2, ' ');
                            let change = parts.next().and_then(Change::parse);
                            let from = parts.next().unwrap_or("");
                            if let Some(change) = change
                                && from != nonce
                            {
                                on_change(change);
                            }
                        }
                        Err(e) if e.is_timeout() => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "change announcements interrupted; reconnecting");
                            break;
                        }
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the announcement listener: {e}"))?;
    Ok(Listener { stop, join: Some(join) })
}
