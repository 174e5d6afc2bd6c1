//! The executor layer: one thread-per-core async runtime behind a small, fixed surface.
//!
//! Everything above this module (HTTP codec, upstream client, relay, management API) is written
//! against the types and functions re-exported here and never names an executor. The default backend
//! is monoio (io_uring, with its epoll driver as a fallback); `--features glommio` selects glommio.
//! Exactly one backend is compiled into a binary.
//!
//! The surface: a reuse-port [`Listener`], a [`TcpStream`] that reads by appending into a `BytesMut`
//! and writes owned `Bytes` (the ownership model io_uring needs), `spawn` for a local task, `sleep`,
//! and [`run_worker`], which turns the calling thread into a pinned executor. Tasks are `!Send` and
//! never leave their worker.

use std::future::Future;
use std::time::Duration;

#[cfg(not(feature = "glommio"))]
mod monoio_backend;
#[cfg(not(feature = "glommio"))]
pub use monoio_backend::{Listener, TcpStream, backend_name, run_worker, sleep, spawn};

#[cfg(feature = "glommio")]
mod glommio_backend;
#[cfg(feature = "glommio")]
pub use glommio_backend::{Listener, TcpStream, backend_name, run_worker, sleep, spawn};

/// Least spare capacity a read asks the kernel to fill.
pub const READ_CHUNK: usize = 16 * 1024;

/// What an idle keep-alive connection's read may take in: enough for a typical request head and a
/// small body, little memory held while the connection waits (the buffer grows for larger requests).
pub const IDLE_READ: usize = 2 * 1024;

/// A deadline passed before the future completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `fut` for at most `limit`.
pub async fn timeout<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    use futures_util::future::{Either, select};
    let fut = std::pin::pin!(fut);
    let timer = std::pin::pin!(sleep(limit));
    match select(fut, timer).await {
        Either::Left((out, _)) => Ok(out),
        Either::Right(((), _)) => Err(Elapsed),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::{Bytes, BytesMut};

    use super::*;

    #[test]
    fn a_worker_accepts_reads_and_writes_on_its_own_listener() {
        let out = run_worker(0, None, || async {
            let listener = Listener::bind("127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            spawn(async move {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = BytesMut::new();
                while buf.len() < 5 {
                    conn.read_buf(&mut buf).await.unwrap();
                }
                conn.write_all(Bytes::from(buf.split().freeze().to_vec())).await.unwrap();
            });
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(Bytes::from_static(b"hello")).await.unwrap();
            let mut buf = BytesMut::new();
            while buf.len() < 5 {
                assert!(client.read_buf(&mut buf).await.unwrap() > 0);
            }
            buf.freeze()
        })
        .unwrap();
        assert_eq!(&out[..], b"hello");
    }

    #[test]
    fn timeout_fires_when_the_future_is_slower() {
        let r = run_worker(0, None, || async {
            (
                timeout(Duration::from_millis(10), sleep(Duration::from_secs(5))).await,
                timeout(Duration::from_secs(5), async { 7 }).await,
            )
        })
        .unwrap();
        assert_eq!(r, (Err(Elapsed), Ok(7)));
    }
}
