//! Process assembly: storage, the control thread, the workers, and orderly shutdown.
//!
//! Start: settings → storage thread (migrations) → admin key → first snapshot → ledger thread (first
//! heartbeat) → control thread → workers, started one by one, each binding its own SO_REUSEPORT
//! listener (worker 0 first, so a port of 0 resolves to one real port all share) → "listening on ADDR"
//! on stdout.
//! Stop (SIGTERM/SIGINT): every worker stops accepting, lets in-flight requests finish (bounded by
//! the drain timeout), closes idle connections, reports its settled spend and returns its leases;
//! then the instance is retired at the ledger (every lease back to the balances), the storage queue
//! is flushed and the process exits 0. No billing event queued before the stop is lost.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use burncloud_core::apikey;
use burncloud_core::error::Protocol;
use burncloud_core::{ErrorKind, GatewayError};
use burncloud_storage::announce::{self, Change, Publisher};
use burncloud_storage::{StorageConfig, StorageHandle};
use bytes::Bytes;
use futures_channel::oneshot;
use serde_json::json;

use crate::config::Settings;
use crate::http::{self, Limits, Request, Responder, Service, ShutdownSignal};
use crate::relay::{self, Endpoint, RequestCtx};
use crate::rt;
use crate::state::{ControlMsg, Shared, Snapshot, Worker, option_keys};
use crate::upstream::{Client, ClientSettings, tls};
use crate::{admin, models};

/// A failure to start, with the message printed before exiting non-zero.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A running gateway.
pub struct Server {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    workers: Vec<(JoinHandle<()>, oneshot::Sender<()>)>,
    storage_thread: burncloud_storage::StorageThread,
    control_thread: JoinHandle<()>,
    ledger_thread: crate::billing::ledger::LedgerThread,
    /// Other instances' change announcements (Redis only); stopped at shutdown.
    listener: Option<announce::Listener>,
}

impl Server {
    /// Starts every thread; returns once all listeners are bound and storage is ready.
    pub fn start(settings: Settings) -> Result<Server, StartError> {
        let storage_cfg = StorageConfig {
            database_url: settings.database_url.clone(),
            batch_size: settings.log_batch_size,
            flush_interval: Duration::from_millis(settings.log_flush_ms),
            spill_path: Some(settings.spill_path.clone()),
            ..StorageConfig::default()
        };
        let (storage, storage_thread) = burncloud_storage::start(storage_cfg)
            .map_err(|e| StartError(format!("BURNCLOUD_DATABASE_URL: cannot open the database: {e}")))?;
        let data = futures_lite::future::block_on(storage.load_config())
            .map_err(|e| StartError(format!("cannot read configuration from the database: {e}")))?;
        let admin_key_hash = admin_key_hash(&settings, &storage, &data.options)?;
        let data = futures_lite::future::block_on(storage.load_config())
            .map_err(|e| StartError(format!("cannot read configuration from the database: {e}")))?;
        let tls = tls::client_config(settings.upstream_ca_file.as_deref()).map_err(StartError)?;
        let backend = crate::billing::open_backend(&settings).map_err(StartError)?;
        let timing = crate::billing::ledger::LedgerTiming::from_ttl(settings.lease_ttl);
        let (ledger, ledger_thread) =
            crate::billing::ledger::start(backend, storage.clone(), timing, Instant::now())
                .map_err(StartError)?;
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let (pumps, mut inboxes): (Vec<_>, Vec<_>) =
            (0..settings.workers).map(|_| crate::billing::leases::pump_channel()).unzip();
        let (health_peers, mut health_inboxes): (Vec<_>, Vec<_>) =
            (0..settings.workers).map(|_| futures_channel::mpsc::unbounded()).unzip();
        let shared = Arc::new(Shared {
            settings,
            storage: storage.clone(),
            snapshot: ArcSwap::from_pointee(Snapshot::build(data)),
            auth_epoch: AtomicU64::new(1),
            admin_key_hash,
            shutdown: Arc::new(AtomicBool::new(false)),
            control: control_tx,
            tls,
            ledger,
            pumps: Arc::new(pumps),
            health_peers: Arc::new(health_peers),
        });
        let (publisher, listener) = announcements(&shared.settings, &shared.control)?;
        let control_thread = spawn_control(shared.clone(), control_rx, publisher)?;
        let mut addr = shared.settings.listen;
        let mut workers = Vec::new();
        for (index, (inbox, health)) in inboxes.drain(..).zip(health_inboxes.drain(..)).enumerate() {
            let (bound_tx, bound_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel();
            let shared_w = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("burncloud-worker-{index}"))
                // Request futures nest deeply (relay → admission → image fetch → upstream exchange);
                // debug builds poll them with large frames. One thread per core: the room is cheap.
                .stack_size(WORKER_STACK_BYTES)
                .spawn(move || run_worker(index, shared_w, addr, bound_tx, stop_rx, inbox, health))
                .map_err(|e| StartError(format!("cannot start worker thread: {e}")))?;
            match bound_rx.recv() {
                Ok(Ok(a)) => addr = a,
                Ok(Err(e)) => {
                    return Err(StartError(format!("BURNCLOUD_LISTEN: cannot listen on {addr}: {e}")));
                }
                Err(_) => return Err(StartError(format!("worker {index} ended during start"))),
            }
            workers.push((handle, stop_tx));
        }
        tracing::info!(%addr, workers = workers.len(), backend = rt::backend_name(), "gateway ready");
        Ok(Server { addr, shared, workers, storage_thread, control_thread, ledger_thread, listener })
    }

    /// Stops accepting, drains, flushes storage and joins every thread.
    pub fn shutdown(self) -> Result<(), StartError> {
        self.shared.shutdown.store(true, Ordering::Release);
        let mut handles = Vec::new();
        for (handle, stop) in self.workers {
            let _ = stop.send(());
            handles.push(handle);
        }
        for h in handles {
            let _ = h.join();
        }
        drop(self.listener);
        let _ = self.shared.control.send(ControlMsg::Stop);
        // Failing to retire is logged by the ledger thread; the reaper covers it after the TTL.
        let _ = self.ledger_thread.shutdown();
        drop(self.shared);
        let _ = self.control_thread.join();
        self.storage_thread.shutdown().map_err(|e| StartError(format!("flushing storage at shutdown: {e}")))
    }
}

/// The admin key's hash: from the setting, else from the database, else a new key printed once.
fn admin_key_hash(
    settings: &Settings,
    storage: &StorageHandle,
    options: &std::collections::BTreeMap<String, String>,
) -> Result<String, StartError> {
    if let Some(key) = &settings.admin_key {
        return Ok(apikey::hash(key));
    }
    if let Some(hash) = options.get(option_keys::ADMIN_KEY_HASH).filter(|h| !h.is_empty()) {
        return Ok(hash.clone());
    }
    let key = apikey::generate().map_err(|e| StartError(format!("no entropy for the admin key: {e}")))?;
    let hash = apikey::hash(&key);
    futures_lite::future::block_on(storage.set_option(option_keys::ADMIN_KEY_HASH, &hash))
        .map_err(|e| StartError(format!("cannot save the admin key: {e}")))?;
    println!("admin key (shown once, keep it; set BURNCLOUD_ADMIN_KEY to choose your own): {key}");
    Ok(hash)
}

/// The control thread: rebuilds and publishes the snapshot on request (coalescing bursts), and
/// exchanges change announcements with the other instances when Redis is configured.
fn spawn_control(
    shared: Arc<Shared>,
    rx: crossbeam_channel::Receiver<ControlMsg>,
    mut publisher: Option<Publisher>,
) -> Result<JoinHandle<()>, StartError> {
    let weak = Arc::downgrade(&shared);
    drop(shared);
    std::thread::Builder::new()
        .name("burncloud-control".into())
        .spawn(move || {
            let mut announce = |change: Change| {
                if let Some(p) = publisher.as_mut()
                    && let Err(e) = p.publish(change)
                {
                    tracing::warn!(error = %e, "cannot announce a change to the other instances");
                }
            };
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                batch.extend(rx.try_iter());
                let Some(shared) = weak.upgrade() else { break };
                let mut replies = Vec::new();
                let (mut reload, mut local_reload, mut local_keys, mut stop) = (false, false, false, false);
                for msg in batch {
                    match msg {
                        ControlMsg::Reload(reply) => {
                            replies.push(reply);
                            reload = true;
                            local_reload = true;
                        }
                        ControlMsg::RemoteReload => reload = true,
                        ControlMsg::AnnounceKeys => local_keys = true,
                        ControlMsg::RemoteKeys => {
                            shared.auth_epoch.fetch_add(1, Ordering::AcqRel);
                        }
                        ControlMsg::Stop => stop = true,
                    }
                }
                if reload {
                    let result = futures_lite::future::block_on(shared.storage.load_config())
                        .map(|data| shared.snapshot.store(Arc::new(Snapshot::build(data))))
                        .map_err(|e| e.to_string());
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "cannot rebuild the configuration snapshot");
                    }
                    for reply in replies {
                        let _ = reply.send(result.clone());
                    }
                    if local_reload {
                        announce(Change::Config);
                    }
                }
                drop(shared);
                if local_keys {
                    announce(Change::Keys);
                }
                if stop {
                    break;
                }
            }
        })
        .map_err(|e| StartError(format!("cannot start the control thread: {e}")))
}

/// Change announcements through Redis: a publisher for the control thread and a listener that feeds
/// other instances' changes to it. `None` without Redis (a single instance needs neither).
fn announcements(
    settings: &Settings,
    control: &crossbeam_channel::Sender<ControlMsg>,
) -> Result<(Option<Publisher>, Option<announce::Listener>), StartError> {
    let Some(url) = &settings.redis_url else { return Ok((None, None)) };
    let nonce = format!("{:016x}", crate::billing::ledger::new_instance_id().0);
    let ns = &settings.redis_namespace;
    let publisher =
        Publisher::new(url, ns, &nonce).map_err(|e| StartError(format!("BURNCLOUD_REDIS_URL: {e}")))?;
    let tx = control.clone();
    let listener = announce::listen(url, ns, &nonce, move |change| {
        let msg = match change {
            Change::Config => ControlMsg::RemoteReload,
            Change::Keys => ControlMsg::RemoteKeys,
        };
        let _ = tx.send(msg);
    })
    .map_err(|e| StartError(format!("BURNCLOUD_REDIS_URL: {e}")))?;
    Ok((Some(publisher), Some(listener)))
}

/// Stack of each worker thread.
const WORKER_STACK_BYTES: usize = 16 * 1024 * 1024;

/// Longest a worker waits at shutdown for the ledger to take its reports and returns.
const LEASE_DRAIN_LIMIT: Duration = Duration::from_secs(5);

fn run_worker(
    index: usize,
    shared: Arc<Shared>,
    addr: SocketAddr,
    bound: std::sync::mpsc::Sender<std::io::Result<SocketAddr>>,
    stop: oneshot::Receiver<()>,
    pump: crate::billing::leases::PumpInbox,
    health: crate::state::HealthInbox,
) {
    let cores = core_affinity::get_core_ids().map(|c| c.len()).unwrap_or(1).max(1);
    let cpu = shared.settings.pin_workers.then_some(index % cores);
    let result = rt::run_worker(index, cpu, || async move {
        let listener = match rt::Listener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                let _ = bound.send(Err(e));
                return;
            }
        };
        let _ = bound.send(listener.local_addr());
        if index == 0 {
            tracing::info!(backend = rt::backend_name(), "executor backend");
        }
        let settings = &shared.settings;
        let client_settings = ClientSettings {
            connect_timeout: settings.upstream_connect_timeout,
            first_byte_timeout: settings.upstream_first_byte_timeout,
            idle_chunk_timeout: settings.upstream_idle_timeout,
            ..ClientSettings::default()
        };
        let limits = Rc::new(Limits { max_body: settings.max_body_bytes, ..Limits::default() });
        let drain = settings.drain_timeout;
        let worker = Rc::new(Worker::new(
            index,
            shared.clone(),
            Client::new(client_settings, shared.tls.clone()),
            pump,
        ));
        let signal = ShutdownSignal::new();
        if index == 0 {
            rt::spawn(crate::probe::run_periodic(worker.clone(), signal.clone()));
        }
        rt::spawn(worker.billing.leases.clone().run());
        rt::spawn(worker.clone().follow_siblings_health(health));
        accept_loop(&worker, &listener, &limits, &signal, stop).await;
        drop(listener);
        signal.trigger();
        let deadline = Instant::now() + drain;
        while worker.connections.get() > 0 && Instant::now() < deadline {
            rt::sleep(Duration::from_millis(20)).await;
        }
        if worker.connections.get() > 0 {
            tracing::warn!(
                worker = index,
                open = worker.connections.get(),
                "drain timeout: closing connections"
            );
        }
        worker.billing.leases.drain(LEASE_DRAIN_LIMIT).await;
        // Every task holding the worker must end here: one left behind would keep the shared state
        // (and the control thread) alive after the executor is gone.
        worker.stop_following_siblings();
        rt::sleep(Duration::from_millis(1)).await;
    });
    if let Err(e) = result {
        tracing::error!(worker = index, error = %e, "worker could not start its executor");
    }
}

async fn accept_loop(
    worker: &Rc<Worker>,
    listener: &rt::Listener,
    limits: &Rc<Limits>,
    signal: &ShutdownSignal,
    mut stop: oneshot::Receiver<()>,
) {
    use futures_util::future::{Either, select};
    loop {
        let accepted = {
            let accept = std::pin::pin!(listener.accept());
            match select(accept, &mut stop).await {
                Either::Left((r, _)) => r,
                Either::Right(_) => return,
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                let worker = worker.clone();
                let limits = limits.clone();
                let signal = signal.clone();
                worker.connections.set(worker.connections.get() + 1);
                rt::spawn(async move {
                    http::serve_connection(stream, peer, &limits, &*worker, &signal).await;
                    worker.connections.set(worker.connections.get().saturating_sub(1));
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                rt::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

impl Service for Worker {
    async fn call(&self, req: Request, resp: &mut Responder<'_>) {
        let method = req.method.as_str();
        let path = req.path.as_str();
        if path == "/healthz" {
            let body = json!({"status": "ok"}).to_string();
            let _ = resp.send(200, &[("content-type", "application/json")], Bytes::from(body)).await;
        } else if let Some(endpoint) = Endpoint::from_path(path) {
            if method == "POST" {
                relay::relay(self, endpoint, req, resp).await;
            } else {
                let msg = format!("{path} accepts POST only");
                refuse(self, &req, resp, endpoint.protocol(), ErrorKind::MethodNotAllowed, msg).await;
            }
        } else if path == "/v1/models" {
            if method == "GET" {
                models::list(self, req, resp).await;
            } else {
                let msg = "/v1/models accepts GET only".to_string();
                refuse(self, &req, resp, Protocol::OpenAi, ErrorKind::MethodNotAllowed, msg).await;
            }
        } else if path == "/api" || path.starts_with("/api/") {
            admin::handle(self, req, resp).await;
        } else {
            let msg = format!("no route for {method} {path}");
            refuse(self, &req, resp, Protocol::OpenAi, ErrorKind::NotFound, msg).await;
        }
    }
}

async fn refuse(
    worker: &Worker,
    req: &Request,
    resp: &mut Responder<'_>,
    protocol: Protocol,
    kind: ErrorKind,
    msg: String,
) {
    let ctx = RequestCtx::new(worker, req);
    relay::respond_error(&ctx, resp, &GatewayError::client(kind, msg), protocol).await;
}
