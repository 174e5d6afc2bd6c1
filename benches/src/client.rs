//! A minimal blocking HTTP/1.1 client for the harness's own load generators: keep-alive connections,
//! responses framed by `Content-Length`, chunked encoding or close, and the arrival time of every piece
//! of body data (for streaming time-to-first-byte and inter-chunk delays).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The bytes of one request, sent as is on every round trip.
pub fn request_bytes(addr: &str, path: &str, headers: &[(String, String)], body: &str) -> Vec<u8> {
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    req.into_bytes()
}

/// Resolves `host:port` to one socket address.
pub fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no address for {addr}")))
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// One response: its status and whether the server closes the connection after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub close: bool,
    pub body_len: usize,
}

/// An incremental response parser: feed it bytes as they arrive, it consumes complete parts and says
/// when the response is complete. Handles `Content-Length`, chunked and read-until-close bodies.
#[derive(Debug, Clone)]
pub struct ResponseParser {
    state: State,
    status: u16,
    close: bool,
    body_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Length(usize),
    ChunkSize,
    ChunkData(usize),
    ChunkEnd,
    Trailers,
    UntilClose,
}

impl Default for ResponseParser {
    fn default() -> Self {
        ResponseParser { state: State::Head, status: 0, close: false, body_len: 0 }
    }
}

impl ResponseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes what it can from the front of `buf` (bytes received at `at`), passing body data to
    /// `on_data`; returns the response once complete (and is then ready for the next one).
    pub fn feed(
        &mut self,
        buf: &mut Vec<u8>,
        at: Instant,
        on_data: &mut dyn FnMut(Instant, &[u8]),
    ) -> io::Result<Option<Response>> {
        let mut pos = 0;
        let done = loop {
            let rest = buf.get(pos..).unwrap_or_default();
            match self.state {
                State::Head => {
                    let Some(end) = find(rest, b"\r\n\r\n") else {
                        if rest.len() > 64 * 1024 {
                            return Err(bad("response head too large"));
                        }
                        break false;
                    };
                    let head = String::from_utf8_lossy(rest.get(..end).unwrap_or_default()).into_owned();
                    let (status, framing, close) = parse_head(&head)?;
                    (self.status, self.close, self.body_len) = (status, close, 0);
                    pos += end + 4;
                    self.state = match framing {
                        Framing::Length(0) => break true,
                        Framing::Length(n) => State::Length(n),
                        Framing::Chunked => State::ChunkSize,
                        Framing::UntilClose => {
                            self.close = true;
                            State::UntilClose
                        }
                    };
                }
                State::Length(n) => {
                    let take = n.min(rest.len());
                    if take > 0 {
                        on_data(at, rest.get(..take).unwrap_or_default());
                    }
                    self.body_len += take;
                    pos += take;
                    if take == n {
                        break true;
                    }
                    self.state = State::Length(n - take);
                    break false;
                }
                State::ChunkSize => {
                    let Some(end) = find(rest, b"\r\n") else { break false };
                    let line = String::from_utf8_lossy(rest.get(..end).unwrap_or_default()).into_owned();
                    let size_text = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
                    pos += end + 2;
                    self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                }
                State::ChunkData(n) => {
                    let take = n.min(rest.len());
                    if take == 0 {
                        break false;
                    }
                    on_data(at, rest.get(..take).unwrap_or_default());
                    self.body_len += take;
                    pos += take;
                    self.state = if take == n { State::ChunkEnd } else { State::ChunkData(n - take) };
                }
                State::ChunkEnd => {
                    if rest.len() < 2 {
                        break false;
                    }
                    pos += 2;
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    if rest.starts_with(b"\r\n") {
                        pos += 2;
                        break true;
                    }
                    let Some(end) = find(rest, b"\r\n\r\n") else { break false };
                    pos += end + 4;
                    break true;
                }
                State::UntilClose => {
                    if !rest.is_empty() {
                        on_data(at, rest);
                        self.body_len += rest.len();
                    }
                    pos += rest.len();
                    break false;
                }
            }
        };
        buf.drain(..pos.min(buf.len()));
        if done {
            self.state = State::Head;
            return Ok(Some(Response { status: self.status, close: self.close, body_len: self.body_len }));
        }
        Ok(None)
    }

    /// The connection closed: the response, if its body was delimited by the close.
    pub fn eof(&mut self) -> io::Result<Response> {
        if self.state == State::UntilClose {
            self.state = State::Head;
            return Ok(Response { status: self.status, close: true, body_len: self.body_len });
        }
        Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-response"))
    }
}

/// A blocking keep-alive client connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects with `timeout` for the connect and for every later read.
    pub fn connect(addr: &SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Conn { stream, buf: Vec::with_capacity(16 * 1024) })
    }

    /// Sends `req` and reads the whole response.
    pub fn roundtrip(&mut self, req: &[u8]) -> io::Result<Response> {
        self.roundtrip_with(req, &mut |_, _| {})
    }

    /// Sends `req` and reads the whole response, calling `on_data` with the arrival time of each piece
    /// of (de-chunked) body data.
    pub fn roundtrip_with(
        &mut self,
        req: &[u8],
        on_data: &mut dyn FnMut(Instant, &[u8]),
    ) -> io::Result<Response> {
        self.stream.write_all(req)?;
        let mut parser = ResponseParser::new();
        let mut at = Instant::now();
        loop {
            if let Some(r) = parser.feed(&mut self.buf, at, on_data)? {
                return Ok(r);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return parser.eof();
            }
            self.buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            at = Instant::now();
        }
    }
}

fn parse_head(head: &str) -> io::Result<(u16, Framing, bool)> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status"))?;
    let http10 = status_line.starts_with("HTTP/1.0");
    let mut length = None;
    let mut chunked = false;
    let mut close = http10;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            close = v.contains("close") || (http10 && !v.contains("keep-alive"));
        }
    }
    let framing = if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if status == 204 || status == 304 {
        Framing::Length(0)
    } else {
        Framing::UntilClose
    };
    Ok((status, framing, close))
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(answer).unwrap();
        });
        addr
    }

    #[test]
    fn reads_a_content_length_response() {
        let addr = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        let mut c = Conn::connect(&addr, Duration::from_secs(5)).unwrap();
        let r = c.roundtrip(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body_len, r.close), (200, 5, false));
    }

    #[test]
    fn reads_a_chunked_response_piece_by_piece() {
        let addr = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
        );
        let mut c = Conn::connect(&addr, Duration::from_secs(5)).unwrap();
        let mut seen = Vec::new();
        let r = c
            .roundtrip_with(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &mut |_, d| seen.extend_from_slice(d))
            .unwrap();
        assert_eq!((r.status, r.body_len, r.close), (200, 11, true));
        assert_eq!(seen, b"hello world");
    }

    #[test]
    fn request_bytes_carry_headers_and_length() {
        let req = request_bytes("h:1", "/p", &[("A".into(), "b".into())], "{}");
        assert_eq!(req, b"POST /p HTTP/1.1\r\nHost: h:1\r\nA: b\r\nContent-Length: 2\r\n\r\n{}");
    }
}
