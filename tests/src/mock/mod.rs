//! The project's mock upstream, speaking OpenAI, Anthropic and Gemini, fast enough to load-test the
//! gateway against.
//!
//! Owns the mock server: [`MockConfig`] (the `burncloud-mock` flags), [`start`], which runs one
//! thread-per-core worker per requested worker on a shared reuse-port listener, and the state all
//! workers share ([`MockShared`]: the behaviour in force and the recorded requests). Built on the
//! gateway's own HTTP codec and executor layer, so it never pulls in another runtime.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both streamed with
//! `"stream": true`), `POST /v1/embeddings`, `GET /v1/models`, Anthropic `POST /v1/messages`
//! (streamed with `"stream": true`), Gemini `POST /v1beta/models/{model}:generateContent` and
//! `:streamGenerateContent` (also under `/v1/models/`), `GET /health`, and the control API under
//! `/_mock/` (`behaviour`, `requests`, `stats`). Test tooling only: it never enforces
//! credentials, and its shared state uses plain locks that gateway worker code must never use.

pub mod anthropic;
pub mod behaviour;
pub mod gemini;
pub mod openai;
pub mod record;
mod service;

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use burncloud_runtime::http::{Limits, ShutdownSignal, serve_connection};
use burncloud_runtime::rt;

pub use behaviour::{Behaviour, BehaviourSlot, Fault, ToolCall};
pub use record::{Record, Recorder};
pub use service::MockUpstream;

/// Defaults of every answer; `PUT /_mock/behaviour` overrides them per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockConfig {
    pub listen: SocketAddr,
    pub workers: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Content-carrying events per streamed completion.
    pub chunks: usize,
    pub chunk_gap_ms: u64,
    /// Delay before every API response.
    pub latency_ms: u64,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            workers: 1,
            prompt_tokens: 10,
            completion_tokens: 20,
            chunks: 5,
            chunk_gap_ms: 0,
            latency_ms: 0,
        }
    }
}

/// What every worker of one mock shares.
pub struct MockShared {
    pub config: MockConfig,
    pub behaviour: BehaviourSlot,
    pub recorder: Recorder,
}

/// A running mock: its address, its shared state, its worker threads (which run until the process
/// exits).
pub struct RunningMock {
    pub addr: SocketAddr,
    pub shared: Arc<MockShared>,
    pub workers: Vec<JoinHandle<()>>,
}

/// Binds and starts the workers; returns once every worker listens. Port 0 picks a free port,
/// shared by all workers.
pub fn start(config: MockConfig) -> io::Result<RunningMock> {
    let workers = config.workers.max(1);
    let shared = Arc::new(MockShared {
        recorder: Recorder::new(workers),
        behaviour: BehaviourSlot::default(),
        config: config.clone(),
    });
    let mut addr = config.listen;
    let mut handles = Vec::with_capacity(workers);
    for index in 0..workers {
        let (ready, bound) = mpsc::channel();
        let worker_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("mock-worker-{index}"))
            .spawn(move || worker(index, addr, worker_shared, ready))?;
        handles.push(handle);
        addr = bound.recv().map_err(|_| io::Error::other("mock worker exited before listening"))??;
    }
    Ok(RunningMock { addr, shared, workers: handles })
}

/// One worker thread: bind, report the address, accept forever.
fn worker(
    index: usize,
    addr: SocketAddr,
    shared: Arc<MockShared>,
    ready: mpsc::Sender<io::Result<SocketAddr>>,
) {
    let result = rt::run_worker(index, None, move || async move {
        let listener = match rt::Listener::bind(addr).and_then(|l| l.local_addr().map(|a| (l, a))) {
            Ok((listener, local)) => {
                let _ = ready.send(Ok(local));
                listener
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let service = Rc::new(MockUpstream::new(shared, index));
        let limits = Rc::new(Limits::default());
        let shutdown = ShutdownSignal::new();
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let (service, limits, shutdown) = (service.clone(), limits.clone(), shutdown.clone());
                    rt::spawn(
                        async move { serve_connection(stream, peer, &limits, &*service, &shutdown).await },
                    );
                }
                Err(_) => rt::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    if let Err(e) = result {
        eprintln!("mock worker {index} failed: {e}");
    }
}
