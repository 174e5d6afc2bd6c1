//! monoio backend: io_uring through `FusionDriver`, falling back to epoll where io_uring is missing.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

use super::READ_CHUNK;

pub fn backend_name() -> &'static str {
    if monoio::utils::detect_uring() { "monoio/io_uring" } else { "monoio/epoll" }
}

/// Turns the calling thread into a worker: optionally pinned to `cpu`, running `main` to completion.
pub fn run_worker<F, Fut>(_index: usize, cpu: Option<usize>, main: F) -> io::Result<Fut::Output>
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    if let Some(cpu) = cpu
        && !core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
    {
        return Err(io::Error::other(format!("cannot pin the worker thread to cpu {cpu}")));
    }
    let mut rt =
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().with_entries(1024).build()?;
    Ok(rt.block_on(main()))
}

pub fn spawn<F: Future<Output = ()> + 'static>(fut: F) {
    drop(monoio::spawn(fut));
}

pub async fn sleep(d: Duration) {
    monoio::time::sleep(d).await
}

pub struct Listener(monoio::net::TcpListener);

impl Listener {
    /// Binds with SO_REUSEPORT so every worker can own a listener on the same port.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let opts = monoio::net::ListenerOpts::new().reuse_port(true).reuse_addr(true).backlog(4096);
        Ok(Listener(monoio::net::TcpListener::bind_with_config(addr, &opts)?))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (s, addr) = self.0.accept().await?;
        s.set_nodelay(true)?;
        Ok((TcpStream(s), addr))
    }
}

pub struct TcpStream(monoio::net::TcpStream);

impl TcpStream {
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let s = monoio::net::TcpStream::connect_addr(addr).await?;
        s.set_nodelay(true)?;
        Ok(TcpStream(s))
    }

    /// Reads once, appending to `buf`; `Ok(0)` is end of stream.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        self.read_buf_up_to(buf, READ_CHUNK).await
    }

    /// Reads once, appending at most about `room` bytes to `buf` (less memory held while the read
    /// waits: io_uring owns the buffer until data arrives).
    pub async fn read_buf_up_to(&mut self, buf: &mut BytesMut, room: usize) -> io::Result<usize> {
        let len = buf.len();
        buf.reserve(room.max(1));
        let owned = std::mem::take(buf);
        let end = owned.capacity();
        let (res, slice) = self.0.read(owned.slice_mut(len..end)).await;
        *buf = slice.into_inner();
        res
    }

    pub async fn write_all(&mut self, data: Bytes) -> io::Result<()> {
        let (res, _) = self.0.write_all(data).await;
        res.map(|_| ())
    }

    /// Closes the sending half: the peer reads end-of-stream after what was written.
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}
