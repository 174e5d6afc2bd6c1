//! The upstream client: one per worker, keep-alive pools per origin, plain TCP or TLS.
//!
//! A request is written in one go (head and body from memory, so a retry replays it without touching
//! the client connection); the response head is parsed with httparse under a first-byte timeout, and
//! the body is handed out chunk by chunk as it arrives (Content-Length, chunked, or until close), with
//! an idle timeout between chunks. A connection whose response was read to the end goes back to the
//! worker's pool. Never shared across threads, never blocks: DNS for host names is resolved on a
//! helper thread and cached.

pub mod origin;
pub mod proxy;
pub mod tls;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
pub use origin::{Origin, Scheme};
pub use proxy::Proxy;

/// Where a connection goes: the upstream origin, through the channel's proxy if it has one. The key
/// of the connection pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub origin: Origin,
    pub proxy: Option<Proxy>,
}
use rustls::ClientConfig;

use crate::http::chunked::ChunkedDecoder;
use crate::rt::{self, TcpStream};

/// Timeouts and pool limits of the upstream client.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    /// From the end of the request write to the end of the response head.
    pub first_byte_timeout: Duration,
    /// Longest silence between two body chunks.
    pub idle_chunk_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle: Duration,
    pub max_idle_per_origin: usize,
    pub max_response_head: usize,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(300),
            idle_chunk_timeout: Duration::from_secs(120),
            pool_idle: Duration::from_secs(60),
            max_idle_per_origin: 256,
            max_response_head: 64 * 1024,
        }
    }
}

/// How an upstream exchange failed. `before_response` failures are safe to retry on another channel.
#[derive(Debug)]
pub enum UpstreamError {
    Resolve(String),
    Connect(io::Error),
    ConnectTimeout,
    Tls(io::Error),
    /// Writing the request or reading the response failed.
    Io(io::Error),
    FirstByteTimeout,
    IdleTimeout,
    /// The upstream sent something that is not HTTP/1.1.
    Protocol(String),
    /// The connection closed before the response was complete.
    Truncated,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Resolve(e) => write!(f, "cannot resolve upstream host: {e}"),
            UpstreamError::Connect(e) => write!(f, "cannot connect to upstream: {e}"),
            UpstreamError::ConnectTimeout => f.write_str("upstream connect timed out"),
            UpstreamError::Tls(e) => write!(f, "upstream TLS failed: {e}"),
            UpstreamError::Io(e) => write!(f, "upstream I/O failed: {e}"),
            UpstreamError::FirstByteTimeout => f.write_str("upstream did not answer in time"),
            UpstreamError::IdleTimeout => f.write_str("upstream stream stalled"),
            UpstreamError::Protocol(e) => write!(f, "upstream sent an invalid response: {e}"),
            UpstreamError::Truncated => {
                f.write_str("upstream closed the connection before the response was complete")
            }
        }
    }
}

enum Conn {
    Plain(TcpStream),
    /// TLS to an `https` origin, or to an `https://` proxy tunnelling to an `http` origin.
    Tls(Box<tls::TlsStream>),
    /// An `https` origin through an `https://` proxy: TLS inside the proxy's TLS.
    TlsInTls(Box<tls::TlsStream<tls::TlsStream>>),
}

impl Conn {
    async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read_buf(buf).await,
            Conn::Tls(s) => s.read_buf(buf).await,
            Conn::TlsInTls(s) => s.read_buf(buf).await,
        }
    }

    async fn write_all(&mut self, data: Bytes) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(data).await,
            Conn::Tls(s) => s.write_all(data).await,
            Conn::TlsInTls(s) => s.write_all(data).await,
        }
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

struct Inner {
    settings: ClientSettings,
    tls: Arc<ClientConfig>,
    idle: RefCell<HashMap<Route, Vec<Idle>>>,
    dns: RefCell<HashMap<String, (Vec<SocketAddr>, Instant)>>,
}

/// A worker's upstream client. Cheap to clone (shared within the worker).
#[derive(Clone)]
pub struct Client(Rc<Inner>);

/// One request to send upstream. The body is held in memory so it can be replayed.
pub struct UpstreamRequest<'a> {
    pub method: &'a str,
    /// Path and query, appended to the origin's prefix.
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: Bytes,
}

enum BodyMode {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// A response whose head has arrived; the body is read with [`UpstreamResponse::next_chunk`].
pub struct UpstreamResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    client: Client,
    route: Route,
    conn: Option<Conn>,
    buf: BytesMut,
    mode: BodyMode,
    keep_alive: bool,
}

const DNS_TTL: Duration = Duration::from_secs(60);
/// Request bodies up to this size are sent in the same write as the head.
const COALESCE_BODY_BYTES: usize = 64 * 1024;

impl Client {
    pub fn new(settings: ClientSettings, tls: Arc<ClientConfig>) -> Client {
        Client(Rc::new(Inner { settings, tls, idle: RefCell::default(), dns: RefCell::default() }))
    }

    pub fn settings(&self) -> &ClientSettings {
        &self.0.settings
    }

    /// Sends `req` along `route` and waits for the response head. A pooled connection that turns out
    /// to be closed is replaced by a fresh one once, transparently.
    pub async fn send(
        &self,
        route: &Route,
        req: &UpstreamRequest<'_>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let head = encode_head(&route.origin, req);
        if let Some(conn) = self.take_idle(route) {
            match self.exchange(route, conn, head.clone(), req.body.clone()).await {
                Ok(resp) => return Ok(resp),
                Err((UpstreamError::Io(_) | UpstreamError::Truncated, true)) => {}
                Err((e, _)) => return Err(e),
            }
        }
        // Boxed: opening a connection is rare next to reusing one, and its future (TLS sessions held
        // inline across the handshakes) would otherwise enlarge every request's future.
        let conn = Box::pin(self.connect(route)).await?;
        self.exchange(route, conn, head, req.body.clone()).await.map_err(|(e, _)| e)
    }

    /// Writes the request and reads the response head. On error, the flag says whether nothing at all
    /// was received (a stale pooled connection).
    async fn exchange(
        &self,
        route: &Route,
        mut conn: Conn,
        head: Bytes,
        body: Bytes,
    ) -> Result<UpstreamResponse, (UpstreamError, bool)> {
        // A small body goes out with the head in one send: one packet and one wake-up of the upstream
        // instead of two (the common case: chat requests are a few KiB).
        let (head, body) = if !body.is_empty() && body.len() <= COALESCE_BODY_BYTES {
            let mut one = BytesMut::with_capacity(head.len() + body.len());
            one.extend_from_slice(&head);
            one.extend_from_slice(&body);
            (one.freeze(), Bytes::new())
        } else {
            (head, body)
        };
        if let Err(e) = conn.write_all(head).await {
            return Err((UpstreamError::Io(e), true));
        }
        if !body.is_empty()
            && let Err(e) = conn.write_all(body).await
        {
            return Err((UpstreamError::Io(e), true));
        }
        // What one read reserves: a smaller buffer would be reallocated by the first read.
        let mut buf = BytesMut::with_capacity(rt::READ_CHUNK);
        let deadline = self.0.settings.first_byte_timeout;
        let parsed =
            rt::timeout(deadline, read_head(&mut conn, &mut buf, self.0.settings.max_response_head)).await;
        let (status, headers, head_len, version_11) = match parsed {
            Err(rt::Elapsed) => return Err((UpstreamError::FirstByteTimeout, false)),
            Ok(Err(e)) => {
                let nothing = buf.is_empty();
                return Err((e, nothing));
            }
            Ok(Ok(h)) => h,
        };
        buf.advance(head_len);
        let mut keep_alive = version_11;
        let mut length = None;
        let mut chunked = false;
        for (k, v) in &headers {
            if k.eq_ignore_ascii_case("connection") {
                let v = v.to_ascii_lowercase();
                if v.contains("close") {
                    keep_alive = false;
                } else if v.contains("keep-alive") {
                    keep_alive = true;
                }
            } else if k.eq_ignore_ascii_case("content-length") {
                length = Some(
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| (UpstreamError::Protocol("bad Content-Length".into()), false))?,
                );
            } else if k.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
        let mode = if status == 204 || status == 304 || (100..200).contains(&status) {
            BodyMode::Done
        } else if chunked {
            BodyMode::Chunked(ChunkedDecoder::new())
        } else if let Some(n) = length {
            if n == 0 { BodyMode::Done } else { BodyMode::Length(n) }
        } else {
            keep_alive = false;
            BodyMode::UntilClose
        };
        Ok(UpstreamResponse {
            status,
            headers,
            client: self.clone(),
            route: route.clone(),
            conn: Some(conn),
            buf,
            mode,
            keep_alive,
        })
    }

    fn take_idle(&self, route: &Route) -> Option<Conn> {
        let mut idle = self.0.idle.borrow_mut();
        let list = idle.get_mut(route)?;
        let max_age = self.0.settings.pool_idle;
        while let Some(entry) = list.pop() {
            if entry.since.elapsed() < max_age {
                return Some(entry.conn);
            }
        }
        None
    }

    fn put_idle(&self, route: Route, conn: Conn) {
        let mut idle = self.0.idle.borrow_mut();
        let list = idle.entry(route).or_default();
        if list.len() < self.0.settings.max_idle_per_origin {
            list.push(Idle { conn, since: Instant::now() });
        }
    }

    async fn connect(&self, route: &Route) -> Result<Conn, UpstreamError> {
        let origin = &route.origin;
        let (host, port) = match &route.proxy {
            Some(p) => (p.host.as_str(), p.port),
            None => (origin.host.as_str(), origin.port),
        };
        let addrs = self.resolve(host, port).await?;
        let limit = self.0.settings.connect_timeout;
        let mut last = None;
        for addr in addrs {
            match rt::timeout(limit, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    return match &route.proxy {
                        Some(proxy) if proxy.kind == proxy::ProxyKind::Https => {
                            let to_proxy = self.handshake(tcp, &proxy.host).await?;
                            let tunnel = self.tunnel(proxy, to_proxy, origin).await?;
                            match origin.scheme {
                                Scheme::Http => Ok(Conn::Tls(Box::new(tunnel))),
                                Scheme::Https => {
                                    Ok(Conn::TlsInTls(Box::new(self.handshake(tunnel, &origin.host).await?)))
                                }
                            }
                        }
                        _ => {
                            let tcp = match &route.proxy {
                                None => tcp,
                                Some(proxy) => self.tunnel(proxy, tcp, origin).await?,
                            };
                            match origin.scheme {
                                Scheme::Http => Ok(Conn::Plain(tcp)),
                                Scheme::Https => {
                                    Ok(Conn::Tls(Box::new(self.handshake(tcp, &origin.host).await?)))
                                }
                            }
                        }
                    };
                }
                Ok(Err(e)) => last = Some(UpstreamError::Connect(e)),
                Err(rt::Elapsed) => last = Some(UpstreamError::ConnectTimeout),
            }
        }
        Err(last.unwrap_or_else(|| UpstreamError::Resolve(format!("{host} has no addresses"))))
    }

    /// A TLS handshake with `host` over `stream`, within the connect timeout.
    async fn handshake<S: tls::ByteStream>(
        &self,
        stream: S,
        host: &str,
    ) -> Result<tls::TlsStream<S>, UpstreamError> {
        let handshake = tls::TlsStream::connect(stream, self.0.tls.clone(), host);
        match rt::timeout(self.0.settings.connect_timeout, handshake).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(UpstreamError::Tls(e)),
            Err(rt::Elapsed) => Err(UpstreamError::ConnectTimeout),
        }
    }

    /// The proxy's tunnel to the origin over `stream`, within the connect timeout.
    async fn tunnel<S: tls::ByteStream>(
        &self,
        proxy: &Proxy,
        stream: S,
        origin: &Origin,
    ) -> Result<S, UpstreamError> {
        match rt::timeout(self.0.settings.connect_timeout, proxy.tunnel(stream, &origin.host, origin.port))
            .await
        {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(UpstreamError::Connect(e)),
            Err(rt::Elapsed) => Err(UpstreamError::ConnectTimeout),
        }
    }

    /// Addresses of a host: IP literals directly, names through a resolver thread, cached.
    /// The addresses `host` resolves to (the worker's DNS cache, else a resolver thread); what a
    /// connection to it would try.
    pub async fn resolve_host(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, UpstreamError> {
        self.resolve(host, port).await
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, UpstreamError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let key = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        if let Some((addrs, at)) = self.0.dns.borrow().get(&key)
            && at.elapsed() < DNS_TTL
        {
            return Ok(addrs.clone());
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        let lookup = key.clone();
        std::thread::Builder::new()
            .name("burncloud-dns".into())
            .spawn(move || {
                use std::net::ToSocketAddrs;
                let r = lookup.to_socket_addrs().map(|a| a.collect::<Vec<_>>()).map_err(|e| e.to_string());
                let _ = tx.send(r);
            })
            .map_err(|e| UpstreamError::Resolve(e.to_string()))?;
        let addrs = rx
            .await
            .map_err(|_| UpstreamError::Resolve("resolver thread ended".into()))?
            .map_err(UpstreamError::Resolve)?;
        self.0.dns.borrow_mut().insert(key, (addrs.clone(), Instant::now()));
        Ok(addrs)
    }
}

fn encode_head(origin: &Origin, req: &UpstreamRequest<'_>) -> Bytes {
    let mut head = String::with_capacity(256);
    head.push_str(req.method);
    head.push(' ');
    head.push_str(&origin.prefix);
    head.push_str(req.path);
    head.push_str(" HTTP/1.1\r\nHost: ");
    head.push_str(&origin.host_header());
    head.push_str("\r\n");
    for (k, v) in req.headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    if !req.body.is_empty() || req.method == "POST" || req.method == "PUT" {
        head.push_str("Content-Length: ");
        head.push_str(&req.body.len().to_string());
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    Bytes::from(head)
}

type Head = (u16, Vec<(String, String)>, usize, bool);

async fn read_head(conn: &mut Conn, buf: &mut BytesMut, max: usize) -> Result<Head, UpstreamError> {
    loop {
        let n = conn.read_buf(buf).await.map_err(UpstreamError::Io)?;
        if n == 0 {
            return Err(UpstreamError::Truncated);
        }
        let mut headers = [httparse::EMPTY_HEADER; 96];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.unwrap_or(0);
                if (100..200).contains(&status) && status != 101 {
                    // Interim response (100 Continue): drop it and read the real one.
                    buf.advance(len);
                    continue;
                }
                let list = resp
                    .headers
                    .iter()
                    .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                return Ok((status, list, len, resp.version == Some(1)));
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > max {
                    return Err(UpstreamError::Protocol("response head too large".into()));
                }
            }
            Err(e) => return Err(UpstreamError::Protocol(e.to_string())),
        }
    }
}

impl UpstreamResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The next piece of the body as it arrives; `None` once the body is complete (the connection then
    /// returns to the pool).
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            match &mut self.mode {
                BodyMode::Done => {
                    self.release();
                    return Ok(None);
                }
                BodyMode::Length(remaining) => {
                    if !self.buf.is_empty() {
                        let take = (*remaining).min(self.buf.len() as u64) as usize;
                        let out = self.buf.split_to(take).freeze();
                        *remaining -= take as u64;
                        if *remaining == 0 {
                            self.mode = BodyMode::Done;
                        }
                        return Ok(Some(out));
                    }
                }
                BodyMode::Chunked(decoder) => {
                    let mut out = BytesMut::new();
                    let finished = decoder
                        .decode(&mut self.buf, &mut out)
                        .map_err(|e| UpstreamError::Protocol(format!("chunked body: {e:?}")))?;
                    if finished {
                        self.mode = BodyMode::Done;
                    }
                    if !out.is_empty() {
                        return Ok(Some(out.freeze()));
                    }
                    if finished {
                        continue;
                    }
                }
                BodyMode::UntilClose => {
                    if !self.buf.is_empty() {
                        return Ok(Some(self.buf.split().freeze()));
                    }
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                return Err(UpstreamError::Truncated);
            };
            let limit = self.client.0.settings.idle_chunk_timeout;
            match rt::timeout(limit, conn.read_buf(&mut self.buf)).await {
                Err(rt::Elapsed) => {
                    self.conn = None;
                    return Err(UpstreamError::IdleTimeout);
                }
                Ok(Err(e)) => {
                    self.conn = None;
                    return Err(UpstreamError::Io(e));
                }
                Ok(Ok(0)) => {
                    self.conn = None;
                    if matches!(self.mode, BodyMode::UntilClose) {
                        self.mode = BodyMode::Done;
                        return Ok(None);
                    }
                    return Err(UpstreamError::Truncated);
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Reads the whole body, refusing more than `limit` bytes.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Bytes, UpstreamError> {
        let mut all = BytesMut::new();
        while let Some(chunk) = self.next_chunk().await? {
            if all.len() + chunk.len() > limit {
                self.conn = None;
                return Err(UpstreamError::Protocol(format!("response body over {limit} bytes")));
            }
            all.extend_from_slice(&chunk);
        }
        Ok(all.freeze())
    }

    fn release(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && self.buf.is_empty()
        {
            self.client.put_idle(self.route.clone(), conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request's future embeds this one and is moved when it is boxed: a buffer held across an
    /// await point in it (as a TLS read's plaintext buffer once was, 16 KiB per level of TLS) costs a
    /// copy of that size on every request.
    #[test]
    fn the_future_of_an_upstream_exchange_holds_no_large_buffer() {
        let client = Client::new(ClientSettings::default(), tls::client_config(None).unwrap());
        let route = Route { origin: Origin::parse("https://127.0.0.1:9").unwrap(), proxy: None };
        let req = UpstreamRequest { method: "POST", path: "/", headers: &[], body: Bytes::new() };
        let send = client.send(&route, &req);
        let size = std::mem::size_of_val(&send);
        eprintln!("Client::send future: {size} bytes");

        assert!(size <= 4 * 1024, "Client::send's future is {size} bytes");
    }

    #[test]
    fn request_head_has_host_length_and_prefix() {
        let origin = Origin::parse("http://127.0.0.1:9000/base").unwrap();
        let req = UpstreamRequest {
            method: "POST",
            path: "/v1/chat/completions",
            headers: &[("Authorization", "Bearer k")],
            body: Bytes::from_static(b"{}"),
        };
        let head = encode_head(&origin, &req);
        assert_eq!(
            &head[..],
            b"POST /base/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nAuthorization: Bearer k\r\nContent-Length: 2\r\n\r\n"
        );
    }
}
