//! TLS for upstream connections: rustls driven over any [`ByteStream`]: the executor layer's
//! [`TcpStream`], or another TLS session (an `https://` origin reached through an `https://` proxy's
//! tunnel is TLS inside TLS).
//!
//! rustls is sans-I/O: it turns plaintext into TLS records and back in memory. This module moves
//! those records over the stream with the owned-buffer reads and writes of [`crate::rt`], so the same
//! code runs on every backend. Certificates are checked against the compiled-in web PKI roots, plus
//! an operator-supplied CA file when configured.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::rt::TcpStream;

/// Builds the process-wide client configuration: web PKI roots plus the certificates in `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("upstream CA file {}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("upstream CA file {}: {e}", path.display()))?;
            roots.add(cert).map_err(|e| format!("upstream CA file {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// An ordered, reliable byte stream: what TLS records and proxy handshakes travel over.
pub trait ByteStream {
    /// Reads what is available, appending to `buf`; `Ok(0)` at the end of the stream.
    fn read_buf(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>>;
    /// Writes all of `data`.
    fn write_all(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>>;
}

impl ByteStream for TcpStream {
    fn read_buf(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> {
        TcpStream::read_buf(self, buf)
    }

    fn write_all(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> {
        TcpStream::write_all(self, data)
    }
}

impl<S: ByteStream> ByteStream for TlsStream<S> {
    fn read_buf(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> {
        TlsStream::read_buf(self, buf)
    }

    fn write_all(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> {
        TlsStream::write_all(self, data)
    }
}

/// A client TLS session over a byte stream (a TCP connection unless tunnelled through TLS).
pub struct TlsStream<S = TcpStream> {
    tcp: S,
    session: ClientConnection,
    /// Ciphertext read from the socket and not yet handed to rustls.
    incoming: BytesMut,
}

impl<S: ByteStream> TlsStream<S> {
    /// Performs the handshake for `host`.
    pub async fn connect(tcp: S, config: Arc<ClientConfig>, host: &str) -> io::Result<TlsStream<S>> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("TLS server name {host:?}: {e}"))
        })?;
        let session = ClientConnection::new(config, name).map_err(io::Error::other)?;
        let mut tls = TlsStream { tcp, session, incoming: BytesMut::new() };
        while tls.session.is_handshaking() {
            tls.flush_records().await?;
            if tls.session.wants_read() && tls.session.is_handshaking() && tls.read_records().await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "TLS handshake: connection closed"));
            }
        }
        tls.flush_records().await?;
        Ok(tls)
    }

    /// Writes all of `data` as TLS records.
    pub async fn write_all(&mut self, data: Bytes) -> io::Result<()> {
        self.session.writer().write_all(&data)?;
        self.flush_records().await
    }

    /// Reads plaintext, appending to `buf`; `Ok(0)` at the end of the stream.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            if let Some(n) = self.take_plaintext(buf)? {
                return Ok(n);
            }
            if self.read_records().await? == 0 {
                return Ok(0);
            }
            self.flush_records().await?;
        }
    }

    /// Moves the plaintext rustls has decrypted into `buf`; `None` when it has none yet. Not async:
    /// its 16 KiB stack buffer must not become part of every future that reads from an upstream
    /// (each of which would then be moved, 16 KiB more per level of TLS, on every request).
    fn take_plaintext(&mut self, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        let mut chunk = [0u8; 16 * 1024];
        match self.session.reader().read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends every pending TLS record.
    async fn flush_records(&mut self) -> io::Result<()> {
        while self.session.wants_write() {
            let mut out = Vec::with_capacity(4096);
            self.session.write_tls(&mut out)?;
            self.tcp.write_all(Bytes::from(out)).await?;
        }
        Ok(())
    }

    /// Reads ciphertext from the socket and lets rustls process it; returns the bytes read (0 = EOF).
    async fn read_records(&mut self) -> io::Result<usize> {
        let n = self.tcp.read_buf(&mut self.incoming).await?;
        while !self.incoming.is_empty() {
            let mut reader = &self.incoming[..];
            let used = self.session.read_tls(&mut reader)?;
            self.incoming.advance(used);
            self.session.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if used == 0 {
                break;
            }
        }
        Ok(n)
    }
}
