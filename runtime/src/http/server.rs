//! The connection loop: one client connection, request after request, until it closes.
//!
//! Owns [`serve_connection`] and its named steps: wait for the first byte (bounded by the idle
//! timeout, cut short by shutdown), read the head (bounded by the head timeout and size), read the
//! body (bounded by the body timeout and size, answering `100-continue` first), hand the complete
//! [`Request`] to the [`Service`], then decide from the [`Responder`] whether the connection carries
//! another request. Protocol errors are answered here, in the OpenAI error shape, and close the
//! connection. The read buffer lives as long as the connection and is reused by every request;
//! pipelined bytes wait in it.
//!
//! Never panics on any input, never waits without a bound, never interprets a body.

use std::net::SocketAddr;
use std::pin::pin;
use std::time::{Duration, Instant};

use burncloud_core::error::Protocol;
use burncloud_core::{ErrorKind, GatewayError};
use bytes::{Bytes, BytesMut};
use futures_util::future::{Either, select};
use http::Method;

use super::chunked::ChunkedDecoder;
use super::request::{BodyFraming, HeadError, HeaderSlot, ParsedHead, Request, build_headers, parse_head};
use super::response::{Outcome, Responder};
use super::shutdown::ShutdownSignal;
use crate::rt;

/// After an error response, unread input is drained until it pauses this long…
const LINGER_QUIET: Duration = Duration::from_millis(50);
/// …or for at most this long, or this many bytes, so the client can read the response before the
/// close (closing with unread input makes the kernel reset the connection).
const LINGER_MAX: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024 * 1024;
/// A read buffer grown beyond this (by a large body) is replaced by a fresh one between requests.
const RETAINED_BUFFER: usize = 256 * 1024;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
const JSON: (&str, &str) = ("content-type", "application/json");

/// Bounds on what one client may send and how slowly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line and headers), in bytes.
    pub max_head: usize,
    /// Most header fields in one head (capped at 256).
    pub max_headers: usize,
    /// Largest request body, in bytes, after chunked decoding.
    pub max_body: usize,
    /// From the first byte of a head to its end.
    pub head_timeout: Duration,
    /// From the end of the head to the end of the body.
    pub body_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 16 * 1024,
            max_headers: 100,
            max_body: 32 * 1024 * 1024,
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// What answers requests. Futures stay on their worker, so there is no `Send` bound.
#[allow(async_fn_in_trait)] // thread-per-core: the future never crosses threads, so no Send bound is wanted
pub trait Service {
    /// Answers `req` through `resp`. Returning without starting a response makes the codec answer
    /// 500; returning with a stream still open closes the connection.
    async fn call(&self, req: Request, resp: &mut Responder<'_>);
}

/// Serves requests on `stream` until the client closes, an error closes it, the idle timeout
/// passes, or `shutdown` is triggered (an in-flight request is still answered, with
/// `Connection: close`).
pub async fn serve_connection<S: Service>(
    stream: rt::TcpStream,
    peer: SocketAddr,
    limits: &Limits,
    service: &S,
    shutdown: &ShutdownSignal,
) {
    let mut conn = Connection { stream, buf: BytesMut::new(), grown: false, slots: Vec::new(), limits };
    loop {
        let (req, exchange) = match conn.next_request(peer, shutdown).await {
            Ok(Some(next)) => next,
            Ok(None) => return,
            Err(error) => return conn.reject(&error, shutdown).await,
        };
        let mut resp = Responder::new(
            &mut conn.stream,
            shutdown,
            exchange.keep_alive,
            exchange.http10,
            exchange.head_only,
        );
        // Boxed: a request's future is large (the relay and an upstream exchange), and a waiting
        // keep-alive connection should not carry room for one.
        Box::pin(service.call(req, &mut resp)).await;
        if answer_if_silent(&mut resp).await != Outcome::Reusable {
            return;
        }
        conn.trim_buffer();
    }
}

/// Answers 500 when the service returned without a response; returns what the connection does next.
async fn answer_if_silent(resp: &mut Responder<'_>) -> Outcome {
    if resp.outcome() != Outcome::NothingSent {
        return resp.outcome();
    }
    tracing::warn!("service returned without a response");
    let error = GatewayError::internal(ErrorKind::Internal, "the server produced no response");
    match resp.send(500, &[JSON], Bytes::from(error.render(Protocol::OpenAi))).await {
        Ok(()) => resp.outcome(),
        Err(_) => Outcome::Close,
    }
}

/// Per-request facts the responder needs.
struct Exchange {
    keep_alive: bool,
    http10: bool,
    head_only: bool,
}

/// What one bounded read achieved.
enum Read {
    Data,
    Closed,
    TimedOut,
}

struct Connection<'l> {
    stream: rt::TcpStream,
    /// Bytes received and not yet consumed; the next request starts at its front.
    buf: BytesMut,
    /// Whether `buf` was grown past [`RETAINED_BUFFER`] for the current request.
    grown: bool,
    /// Header ranges of the head being parsed, reused across requests.
    slots: Vec<HeaderSlot>,
    limits: &'l Limits,
}

impl Connection<'_> {
    /// Reads the next complete request. `Ok(None)`: close quietly (client gone, idle, shutdown).
    async fn next_request(
        &mut self,
        peer: SocketAddr,
        shutdown: &ShutdownSignal,
    ) -> Result<Option<(Request, Exchange)>, GatewayError> {
        if self.buf.is_empty() && !self.wait_for_first_byte(shutdown).await {
            return Ok(None);
        }
        let received_at = Instant::now();
        let Some(head) = self.read_head(received_at).await? else {
            return Ok(None);
        };
        let Some((head_bytes, body)) = self.read_body(&head).await? else {
            return Ok(None);
        };
        let headers = build_headers(&head_bytes, &mut self.slots).map_err(head_error)?;
        let exchange = Exchange {
            keep_alive: head.keep_alive,
            http10: head.http10,
            head_only: head.method == Method::HEAD,
        };
        let req = Request {
            method: head.method,
            path: head.path,
            query: head.query,
            headers,
            body,
            peer,
            received_at,
        };
        Ok(Some((req, exchange)))
    }

    /// Waits for a request to begin; false when the connection should close instead.
    async fn wait_for_first_byte(&mut self, shutdown: &ShutdownSignal) -> bool {
        if shutdown.is_triggered() {
            return false;
        }
        if self.buf.is_empty() && self.buf.capacity() > rt::IDLE_READ {
            // Nothing pipelined: wait with a small buffer instead of holding a full one.
            self.buf = BytesMut::new();
        }
        let read = pin!(self.stream.read_buf_up_to(&mut self.buf, rt::IDLE_READ));
        let idle = pin!(rt::sleep(self.limits.idle_timeout));
        let stop = pin!(shutdown.triggered());
        match select(read, select(idle, stop)).await {
            Either::Left((Ok(n), _)) => n > 0,
            Either::Left((Err(_), _)) | Either::Right(_) => false,
        }
    }

    /// Reads until a complete head is buffered. The head is re-parsed only when newly arrived bytes
    /// may end it, so a client dribbling a long head byte by byte costs linear, not quadratic, work.
    async fn read_head(&mut self, received_at: Instant) -> Result<Option<ParsedHead>, GatewayError> {
        let deadline = received_at + self.limits.head_timeout;
        let mut scanned: usize = 0;
        loop {
            if scanned == 0 || self.buf.get(scanned.saturating_sub(3)..).is_some_and(may_end_head) {
                let parsed =
                    parse_head(&self.buf, self.limits.max_head, self.limits.max_headers, &mut self.slots);
                if let Some(head) = parsed.map_err(head_error)? {
                    return Ok(Some(head));
                }
            } else if self.buf.len() >= self.limits.max_head {
                return Err(head_error(HeadError::TooLarge));
            }
            scanned = self.buf.len();
            match self.read_until(deadline).await {
                Read::Data => {}
                Read::Closed => return Ok(None),
                Read::TimedOut => return Err(timeout_error("request head")),
            }
        }
    }

    /// Reads the body; returns the head's bytes and the body, or `None` if the client went away.
    async fn read_body(&mut self, head: &ParsedHead) -> Result<Option<(Bytes, Bytes)>, GatewayError> {
        match head.framing {
            BodyFraming::Empty => Ok(Some((self.buf.split_to(head.len).freeze(), Bytes::new()))),
            BodyFraming::Length(declared) => self.read_sized_body(head, declared).await,
            BodyFraming::Chunked => self.read_chunked_body(head).await,
        }
    }

    async fn read_sized_body(
        &mut self,
        head: &ParsedHead,
        declared: u64,
    ) -> Result<Option<(Bytes, Bytes)>, GatewayError> {
        let len = match usize::try_from(declared) {
            Ok(len) if len <= self.limits.max_body => len,
            _ => return Err(too_large(self.limits.max_body)),
        };
        let end = head.len + len;
        if self.buf.len() < end {
            if head.expect_continue && !self.write_continue().await {
                return Ok(None);
            }
            self.grown |= end > RETAINED_BUFFER;
            self.buf.reserve(end - self.buf.len() + rt::READ_CHUNK);
            let deadline = Instant::now() + self.limits.body_timeout;
            while self.buf.len() < end {
                match self.read_until(deadline).await {
                    Read::Data => {}
                    Read::Closed => return Ok(None),
                    Read::TimedOut => return Err(timeout_error("request body")),
                }
            }
        }
        let head_bytes = self.buf.split_to(head.len).freeze();
        Ok(Some((head_bytes, self.buf.split_to(len).freeze())))
    }

    async fn read_chunked_body(&mut self, head: &ParsedHead) -> Result<Option<(Bytes, Bytes)>, GatewayError> {
        let head_bytes = self.buf.split_to(head.len).freeze();
        let max = u64::try_from(self.limits.max_body).unwrap_or(u64::MAX);
        let mut decoder = ChunkedDecoder::new();
        let mut body = BytesMut::new();
        let mut continued = !head.expect_continue;
        let deadline = Instant::now() + self.limits.body_timeout;
        loop {
            let done = decoder.decode(&mut self.buf, &mut body).map_err(|e| {
                GatewayError::client(ErrorKind::InvalidRequest, format!("malformed chunked body: {e}"))
            })?;
            if decoder.declared_len() > max {
                return Err(too_large(self.limits.max_body));
            }
            if done {
                return Ok(Some((head_bytes, body.freeze())));
            }
            if !continued {
                continued = true;
                if !self.write_continue().await {
                    return Ok(None);
                }
            }
            match self.read_until(deadline).await {
                Read::Data => {}
                Read::Closed => return Ok(None),
                Read::TimedOut => return Err(timeout_error("request body")),
            }
        }
    }

    async fn write_continue(&mut self) -> bool {
        self.stream.write_all(Bytes::from_static(CONTINUE)).await.is_ok()
    }

    /// One read into the buffer, given up at `deadline`.
    async fn read_until(&mut self, deadline: Instant) -> Read {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Read::TimedOut;
        }
        match rt::timeout(left, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => Read::Closed,
            Ok(Ok(_)) => Read::Data,
            Err(rt::Elapsed) => Read::TimedOut,
        }
    }

    /// Answers a protocol error with `Connection: close`, lets the client read it, and closes.
    async fn reject(mut self, error: &GatewayError, shutdown: &ShutdownSignal) {
        tracing::debug!(status = error.status(), message = %error.message, "rejecting request");
        let body = Bytes::from(error.render(Protocol::OpenAi));
        let mut resp = Responder::new(&mut self.stream, shutdown, false, false, false);
        if resp.send(error.status(), &[JSON], body).await.is_ok() {
            self.linger().await;
        }
    }

    /// Drains input the client is still sending so the close does not reset the connection before
    /// the client has read the error response.
    async fn linger(&mut self) {
        let started = Instant::now();
        let mut drained = 0;
        while started.elapsed() < LINGER_MAX && drained < LINGER_BYTES {
            self.buf.clear();
            match rt::timeout(LINGER_QUIET, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => drained += n,
                _ => return,
            }
        }
    }

    /// Gives back memory a large body left in the read buffer, keeping any pipelined bytes.
    fn trim_buffer(&mut self) {
        if std::mem::take(&mut self.grown) {
            let mut fresh = BytesMut::with_capacity(rt::READ_CHUNK.max(self.buf.len()));
            fresh.extend_from_slice(&self.buf);
            self.buf = fresh;
        }
    }
}

/// Whether `bytes` contain a blank line (CRLF CRLF, or the LF LF httparse also accepts).
fn may_end_head(bytes: &[u8]) -> bool {
    memchr::memmem::find(bytes, b"\n\r\n").is_some() || memchr::memmem::find(bytes, b"\n\n").is_some()
}

fn head_error(e: HeadError) -> GatewayError {
    match e {
        HeadError::Malformed(message) => GatewayError::client(ErrorKind::InvalidRequest, message),
        HeadError::TooLarge => GatewayError::client(
            ErrorKind::HeaderTooLarge,
            "request head is too large or has too many headers",
        ),
    }
}

fn too_large(max_body: usize) -> GatewayError {
    GatewayError::client(ErrorKind::RequestTooLarge, format!("request body exceeds {max_body} bytes"))
}

fn timeout_error(what: &str) -> GatewayError {
    GatewayError::client(ErrorKind::RequestTimeout, format!("{what} was not received in time"))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::future::Future;
    use std::rc::Rc;

    use futures_channel::oneshot;

    use super::*;
    use crate::http::chunked::ChunkedDecoder;

    /// Answers by path: `/stream` streams two chunks with a gate between them, `/silent` answers
    /// nothing, `/unfinished` leaves its stream open, `/slow` takes 100 ms, anything else echoes.
    #[derive(Default)]
    struct TestService {
        gate: RefCell<Option<oneshot::Receiver<()>>>,
    }

    impl Service for TestService {
        async fn call(&self, req: Request, resp: &mut Responder<'_>) {
            match req.path.as_str() {
                "/stream" => {
                    resp.start_stream(200, &[("content-type", "text/event-stream")]).await.unwrap();
                    resp.send_chunk(Bytes::from_static(b"data: first\n\n")).await.unwrap();
                    let gate = self.gate.borrow_mut().take();
                    if let Some(gate) = gate {
                        let _ = gate.await;
                    }
                    resp.send_chunk(Bytes::from_static(b"data: second\n\n")).await.unwrap();
                    resp.finish_stream().await.unwrap();
                }
                "/silent" => {}
                "/unfinished" => {
                    resp.start_stream(200, &[]).await.unwrap();
                    resp.send_chunk(Bytes::from_static(b"partial")).await.unwrap();
                }
                path => {
                    if path == "/slow" {
                        rt::sleep(Duration::from_millis(100)).await;
                    }
                    let echo = format!("{} {} {:?} {}:", req.method, req.path, req.query, req.body.len());
                    let mut body = echo.into_bytes();
                    body.extend_from_slice(&req.body);
                    resp.send(200, &[("x-test", "1")], Bytes::from(body)).await.unwrap();
                }
            }
        }
    }

    fn small_limits() -> Limits {
        Limits {
            max_head: 1024,
            max_body: 1024,
            head_timeout: Duration::from_millis(200),
            body_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(300),
            ..Limits::default()
        }
    }

    /// Runs a worker serving `service` on a fresh port and drives `client` against it.
    fn with_server<F, Fut>(limits: Limits, service: TestService, client: F) -> Fut::Output
    where
        F: FnOnce(SocketAddr, ShutdownSignal) -> Fut,
        Fut: Future,
    {
        rt::run_worker(0, None, move || async move {
            let listener = rt::Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            let service = Rc::new(service);
            let limits = Rc::new(limits);
            let shutdown = ShutdownSignal::new();
            let signal = shutdown.clone();
            rt::spawn(async move {
                while let Ok((stream, peer)) = listener.accept().await {
                    let (service, limits, shutdown) = (service.clone(), limits.clone(), shutdown.clone());
                    rt::spawn(
                        async move { serve_connection(stream, peer, &limits, &*service, &shutdown).await },
                    );
                }
            });
            client(addr, signal).await
        })
        .unwrap()
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }

        fn json_code(&self) -> String {
            let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
            v["error"]["code"].as_str().unwrap().to_owned()
        }
    }

    struct Client {
        stream: rt::TcpStream,
        buf: BytesMut,
    }

    impl Client {
        async fn connect(addr: SocketAddr) -> Client {
            Client { stream: rt::TcpStream::connect(addr).await.unwrap(), buf: BytesMut::new() }
        }

        async fn send(&mut self, data: &[u8]) {
            self.stream.write_all(Bytes::copy_from_slice(data)).await.unwrap();
        }

        /// Reads more bytes; false at end of stream.
        async fn fill(&mut self) -> bool {
            let read = rt::timeout(Duration::from_secs(5), self.stream.read_buf(&mut self.buf)).await;
            matches!(read.expect("the server did not answer in time"), Ok(n) if n > 0)
        }

        /// Reads one response (Content-Length, chunked or close-delimited body).
        async fn response(&mut self) -> Option<Reply> {
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut parsed = httparse::Response::new(&mut headers);
                if let httparse::Status::Complete(len) = parsed.parse(&self.buf).unwrap() {
                    let status = parsed.code.unwrap();
                    let headers: Vec<(String, String)> = parsed
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect();
                    let _ = self.buf.split_to(len);
                    let mut reply = Reply { status, headers, body: Vec::new() };
                    reply.body = self.body(&reply).await;
                    return Some(reply);
                }
                if !self.fill().await {
                    return None;
                }
            }
        }

        async fn body(&mut self, reply: &Reply) -> Vec<u8> {
            if reply.status < 200 {
                return Vec::new();
            }
            if let Some(len) = reply.header("content-length") {
                let len: usize = len.parse().unwrap();
                while self.buf.len() < len {
                    assert!(self.fill().await, "body cut short");
                }
                return self.buf.split_to(len).to_vec();
            }
            if reply.header("transfer-encoding").is_some() {
                let mut decoder = ChunkedDecoder::new();
                let mut out = BytesMut::new();
                while !decoder.decode(&mut self.buf, &mut out).unwrap() {
                    assert!(self.fill().await, "chunked body cut short");
                }
                return out.to_vec();
            }
            while self.fill().await {}
            self.buf.split().to_vec()
        }

        /// True when the server closes the connection (after any pending bytes).
        async fn closed(&mut self) -> bool {
            !self.fill().await
        }
    }

    fn echo_of(reply: &Reply) -> String {
        String::from_utf8(reply.body.clone()).unwrap()
    }

    #[test]
    fn keep_alive_serves_two_requests_on_one_connection() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"GET /a?x=1 HTTP/1.1\r\nHost: t\r\n\r\n").await;
            let first = c.response().await.unwrap();
            c.send(b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc").await;
            let second = c.response().await.unwrap();
            assert_eq!(echo_of(&first), "GET /a Some(\"x=1\") 0:");
            assert_eq!(echo_of(&second), "POST /b None 3:abc");
            assert_eq!(first.header("connection"), None);
        });
    }

    #[test]
    fn a_large_body_arrives_whole_and_the_connection_serves_on() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            let body = vec![b'z'; 1 << 20];
            c.send(format!("POST /big HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes()).await;
            c.send(&body).await;
            let big = c.response().await.unwrap();
            c.send(b"GET /next HTTP/1.1\r\n\r\n").await;
            let next = c.response().await.unwrap();
            assert!(big.body.starts_with(b"POST /big None 1048576:zzz"));
            assert_eq!(echo_of(&next), "GET /next None 0:");
        });
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"POST /1 HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n")
                .await;
            let mut echoes = Vec::new();
            for _ in 0..3 {
                echoes.push(echo_of(&c.response().await.unwrap()));
            }
            assert_eq!(echoes, ["POST /1 None 2:hi", "GET /2 None 0:", "GET /3 None 0:"]);
        });
    }

    #[test]
    fn a_chunked_request_body_is_decoded() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n").await;
            rt::sleep(Duration::from_millis(20)).await;
            c.send(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n").await;
            assert_eq!(echo_of(&c.response().await.unwrap()), "POST /c None 11:hello world");
        });
    }

    #[test]
    fn expect_continue_gets_an_interim_response_before_the_body_is_sent() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n").await;
            let interim = c.response().await.unwrap();
            c.send(b"body").await;
            let reply = c.response().await.unwrap();
            assert_eq!((interim.status, echo_of(&reply).as_str()), (100, "POST /e None 4:body"));
        });
    }

    #[test]
    fn an_oversized_head_gets_431_and_a_close() {
        with_server(small_limits(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            let head = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(2000));
            c.send(head.as_bytes()).await;
            let reply = c.response().await.unwrap();
            assert_eq!((reply.status, reply.json_code().as_str()), (431, "request_too_large"));
            assert_eq!(reply.header("connection"), Some("close"));
            assert!(c.closed().await);
        });
    }

    #[test]
    fn an_oversized_content_length_gets_413_without_continue() {
        with_server(small_limits(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n").await;
            let reply = c.response().await.unwrap();
            assert_eq!((reply.status, reply.json_code().as_str()), (413, "request_too_large"));
            assert!(c.closed().await);
        });
    }

    #[test]
    fn an_oversized_chunked_body_gets_413_as_soon_as_it_is_announced() {
        with_server(small_limits(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n300\r\n").await;
            c.send(&[b'x'; 0x300]).await;
            c.send(b"\r\n300\r\n").await;
            let reply = c.response().await.unwrap();
            assert_eq!((reply.status, reply.json_code().as_str()), (413, "request_too_large"));
            assert!(c.closed().await);
        });
    }

    #[test]
    fn a_head_sent_byte_by_byte_is_parsed_once_complete() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            for b in b"GET /slowly HTTP/1.1\r\nHost: t\r\n\r\n" {
                c.send(&[*b]).await;
                rt::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(echo_of(&c.response().await.unwrap()), "GET /slowly None 0:");
        });
    }

    #[test]
    fn a_slow_head_gets_408() {
        with_server(small_limits(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"GET / HTTP/1.1\r\nHost:").await;
            let reply = c.response().await.unwrap();
            assert_eq!((reply.status, reply.json_code().as_str()), (408, "request_timeout"));
            assert!(c.closed().await);
        });
    }

    #[test]
    fn a_slow_body_gets_408() {
        with_server(small_limits(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc").await;
            let reply = c.response().await.unwrap();
            assert_eq!(reply.status, 408);
        });
    }

    #[test]
    fn garbage_gets_400_and_the_connection_is_closed() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"\x16\x03\x01\x02\x00 hello there\r\n\r\n").await;
            let reply = c.response().await.unwrap();
            assert_eq!((reply.status, reply.json_code().as_str()), (400, "invalid_request"));
            assert!(c.closed().await);
        });
    }

    #[test]
    fn conflicting_framing_gets_400() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
                .await;
            assert_eq!(c.response().await.unwrap().status, 400);
            assert!(c.closed().await);
        });
    }

    #[test]
    fn a_streamed_response_reaches_the_client_chunk_by_chunk() {
        let (open, gate) = oneshot::channel();
        let service = TestService { gate: RefCell::new(Some(gate)) };
        with_server(Limits::default(), service, |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"GET /stream HTTP/1.1\r\n\r\n").await;
            while !c.buf.windows(11).any(|w| w == b"data: first") {
                assert!(c.fill().await);
            }
            assert!(!c.buf.windows(6).any(|w| w == b"second"));
            open.send(()).unwrap();
            while !c.buf.ends_with(b"0\r\n\r\n") {
                assert!(c.fill().await);
            }
            let text = String::from_utf8_lossy(&c.buf).into_owned();
            assert!(text.contains("transfer-encoding: chunked"));
            assert!(text.contains("data: second"));
        });
    }

    #[test]
    fn a_service_that_answers_nothing_yields_500_and_keeps_the_connection() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"GET /silent HTTP/1.1\r\n\r\n").await;
            let reply = c.response().await.unwrap();
            c.send(b"GET /after HTTP/1.1\r\n\r\n").await;
            assert_eq!((reply.status, c.response().await.unwrap().status), (500, 200));
        });
    }

    #[test]
    fn an_unfinished_stream_closes_the_connection() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"GET /unfinished HTTP/1.1\r\n\r\n").await;
            while c.fill().await {}
            assert!(c.buf.ends_with(b"7\r\npartial\r\n"));
        });
    }

    #[test]
    fn connection_close_from_the_client_is_honoured() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
            let reply = c.response().await.unwrap();
            assert_eq!(reply.header("connection"), Some("close"));
            assert!(c.closed().await);
        });
    }

    #[test]
    fn http10_closes_after_the_response_unless_kept_alive() {
        with_server(Limits::default(), TestService::default(), |addr, _| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await;
            let kept = c.response().await.unwrap();
            c.send(b"GET /c HTTP/1.0\r\n\r\n").await;
            let reply = c.response().await.unwrap();
            assert_eq!(kept.header("connection"), Some("keep-alive"));
            assert_eq!(reply.header("connection"), Some("close"));
            assert!(c.closed().await);
        });
    }

    #[test]
    fn shutdown_closes_an_idle_connection_at_once() {
        with_server(Limits::default(), TestService::default(), |addr, shutdown| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"GET / HTTP/1.1\r\n\r\n").await;
            c.response().await.unwrap();
            let asked = Instant::now();
            shutdown.trigger();
            assert!(c.closed().await);
            assert!(asked.elapsed() < Duration::from_secs(1));
        });
    }

    #[test]
    fn shutdown_lets_the_in_flight_request_finish_with_connection_close() {
        with_server(Limits::default(), TestService::default(), |addr, shutdown| async move {
            let mut c = Client::connect(addr).await;
            c.send(b"GET /slow HTTP/1.1\r\n\r\n").await;
            rt::sleep(Duration::from_millis(30)).await;
            shutdown.trigger();
            let reply = c.response().await.unwrap();
            assert_eq!((reply.status, reply.header("connection")), (200, Some("close")));
            assert!(c.closed().await);
        });
    }

    /// A small deterministic generator for the garbage test.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn garbage_inputs(count: usize) -> Vec<Vec<u8>> {
        const SEEDS: [&[u8]; 3] = [
            b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"GET /?a=%zz HTTP/1.1\r\nExpect: 100-continue\r\nConnection: keep-alive, close\r\n\r\n",
        ];
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        (0..count)
            .map(|i| {
                if i % 3 == 0 {
                    let len = rng.below(300);
                    return (0..len).map(|_| rng.next() as u8).collect();
                }
                let mut input = SEEDS[rng.below(SEEDS.len())].to_vec();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(input.len());
                    match rng.below(3) {
                        0 => input[at] = rng.next() as u8,
                        1 => input.truncate(at),
                        _ => input.insert(at, b"\r\n:;0 \x00\xff"[rng.below(8)]),
                    }
                    if input.is_empty() {
                        input.push(b'G');
                    }
                }
                input
            })
            .collect()
    }

    #[test]
    fn random_garbage_never_panics_nor_hangs_and_the_worker_keeps_serving() {
        with_server(small_limits(), TestService::default(), |addr, _| async move {
            let clients = garbage_inputs(300).into_iter().map(|input| async move {
                let mut c = Client::connect(addr).await;
                c.send(&input).await;
                while c.fill().await {
                    if c.buf.len() > 64 * 1024 {
                        break;
                    }
                }
            });
            let all = futures_util::future::join_all(clients);
            assert!(rt::timeout(Duration::from_secs(10), all).await.is_ok());
            let mut c = Client::connect(addr).await;
            c.send(b"GET /alive HTTP/1.1\r\n\r\n").await;
            assert_eq!(c.response().await.unwrap().status, 200);
        });
    }
}
