//! glommio backend: io_uring through glommio's executor, selected with `--features glommio`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::{LocalExecutorBuilder, Placement};

use super::READ_CHUNK;

pub fn backend_name() -> &'static str {
    "glommio/io_uring"
}

fn to_io<T>(e: glommio::GlommioError<T>) -> io::Error {
    io::Error::other(e.to_string())
}

/// Turns the calling thread into a worker: optionally pinned to `cpu`, running `main` to completion.
pub fn run_worker<F, Fut>(index: usize, cpu: Option<usize>, main: F) -> io::Result<Fut::Output>
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    let placement = match cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    let ex = LocalExecutorBuilder::new(placement)
        .name(&format!("burncloud-worker-{index}"))
        .make()
        .map_err(to_io)?;
    Ok(ex.run(main()))
}

pub fn spawn<F: Future<Output = ()> + 'static>(fut: F) {
    glommio::spawn_local(fut).detach();
}

pub async fn sleep(d: Duration) {
    glommio::timer::sleep(d).await
}

pub struct Listener(glommio::net::TcpListener);

impl Listener {
    /// Binds with SO_REUSEPORT (glommio's default) so every worker can own a listener on the same port.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        glommio::net::TcpListener::bind(addr).map(Listener).map_err(to_io)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr().map_err(to_io)
    }

    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let s = self.0.accept().await.map_err(to_io)?;
        s.set_nodelay(true).map_err(to_io)?;
        let addr = s.peer_addr().map_err(to_io)?;
        Ok((TcpStream { inner: s, scratch: Vec::new() }, addr))
    }
}

pub struct TcpStream {
    inner: glommio::net::TcpStream,
    scratch: Vec<u8>,
}

impl TcpStream {
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let s = glommio::net::TcpStream::connect(addr).await.map_err(to_io)?;
        s.set_nodelay(true).map_err(to_io)?;
        Ok(TcpStream { inner: s, scratch: Vec::new() })
    }

    /// Reads once, appending to `buf`; `Ok(0)` is end of stream.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if self.scratch.len() < READ_CHUNK {
            self.scratch.resize(READ_CHUNK, 0);
        }
        let n = self.inner.read(&mut self.scratch).await?;
        buf.extend_from_slice(&self.scratch[..n]);
        Ok(n)
    }

    /// Reads once, appending at most `room` bytes to `buf`; small reads use no scratch buffer.
    pub async fn read_buf_up_to(&mut self, buf: &mut BytesMut, room: usize) -> io::Result<usize> {
        if room >= READ_CHUNK {
            return self.read_buf(buf).await;
        }
        let mut small = [0u8; super::IDLE_READ];
        let room = room.clamp(1, small.len());
        let n = self.inner.read(&mut small[..room]).await?;
        buf.extend_from_slice(&small[..n]);
        Ok(n)
    }

    pub async fn write_all(&mut self, data: Bytes) -> io::Result<()> {
        self.inner.write_all(&data).await?;
        self.inner.flush().await
    }

    /// Closes the sending half: the peer reads end-of-stream after what was written.
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        self.inner.shutdown(std::net::Shutdown::Write).await.map_err(to_io)
    }
}
