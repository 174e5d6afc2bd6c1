//! Writing one response on a client connection.
//!
//! Owns [`Responder`]: the service hands it a status, headers and either a whole body
//! (`Content-Length`) or a stream of chunks (`Transfer-Encoding: chunked`, or a close-delimited body
//! for HTTP/1.0 clients). The responder writes the framing headers (`Content-Length`,
//! `Transfer-Encoding`, `Connection`) itself and refuses them from the service, so a service can never
//! desynchronise the connection. Every chunk is written the moment it is handed over: nothing is
//! buffered, so server-sent events flow. It never reads from the socket and never decides routing;
//! after the service returns, the connection loop asks it whether the connection may be reused.

use std::fmt::Write as _;
use std::io;

use bytes::{BufMut, Bytes, BytesMut};

use super::chunked::{LAST_CHUNK, encode_chunk};
use super::shutdown::ShutdownSignal;
use crate::rt;

/// Bodies up to this size are copied behind the head and written with it in one write.
const COALESCE_BODY: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing written yet.
    Idle,
    /// A stream is open; `chunked` is false for a close-delimited HTTP/1.0 stream.
    Streaming { chunked: bool },
    /// A complete response was written.
    Complete,
    /// The connection cannot carry another response: a write failed, a raw write or an abort.
    Broken,
}

/// What the connection loop does once the service has returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The service wrote nothing; the codec answers for it.
    NothingSent,
    /// A complete, correctly framed response was written and the connection may serve another.
    Reusable,
    /// The connection must be closed.
    Close,
}

/// The write side of one exchange, lent to the service.
pub struct Responder<'a> {
    stream: &'a mut rt::TcpStream,
    shutdown: &'a ShutdownSignal,
    keep_alive: bool,
    http10: bool,
    head_only: bool,
    state: State,
}

impl<'a> Responder<'a> {
    pub(crate) fn new(
        stream: &'a mut rt::TcpStream,
        shutdown: &'a ShutdownSignal,
        keep_alive: bool,
        http10: bool,
        head_only: bool,
    ) -> Self {
        Responder { stream, shutdown, keep_alive, http10, head_only, state: State::Idle }
    }

    /// Whether any byte of a response has been written (or the connection was given up).
    pub fn started(&self) -> bool {
        self.state != State::Idle
    }

    /// Sends a complete response with a `Content-Length` body.
    pub async fn send(&mut self, status: u16, headers: &[(&str, &str)], body: Bytes) -> io::Result<()> {
        self.ensure_idle()?;
        let bodiless = status < 200 || status == 204 || status == 304;
        let mut out = BytesMut::with_capacity(256 + if body.len() <= COALESCE_BODY { body.len() } else { 0 });
        let closing = self.closing(false);
        write_head(&mut out, status, headers, closing, self.http10)?;
        if !bodiless {
            let _ = write!(out, "content-length: {}\r\n", body.len());
        }
        out.put_slice(b"\r\n");
        let write_body = !bodiless && !self.head_only && !body.is_empty();
        let result = if write_body && body.len() <= COALESCE_BODY {
            out.put_slice(&body);
            self.stream.write_all(out.freeze()).await
        } else if write_body {
            match self.stream.write_all(out.freeze()).await {
                Ok(()) => self.stream.write_all(body).await,
                Err(e) => Err(e),
            }
        } else {
            self.stream.write_all(out.freeze()).await
        };
        self.keep_alive = !closing;
        self.settle(result, State::Complete)
    }

    /// Starts a streamed response: chunked for HTTP/1.1 clients, close-delimited for HTTP/1.0.
    pub async fn start_stream(&mut self, status: u16, headers: &[(&str, &str)]) -> io::Result<()> {
        self.ensure_idle()?;
        let chunked = !self.http10;
        let closing = self.closing(!chunked);
        let mut out = BytesMut::with_capacity(256);
        write_head(&mut out, status, headers, closing, self.http10)?;
        if chunked {
            out.put_slice(b"transfer-encoding: chunked\r\n");
        }
        out.put_slice(b"\r\n");
        let result = self.stream.write_all(out.freeze()).await;
        self.keep_alive = !closing;
        self.settle(result, State::Streaming { chunked })
    }

    /// Writes one piece of the streamed body immediately. Empty data writes nothing.
    pub async fn send_chunk(&mut self, data: Bytes) -> io::Result<()> {
        let State::Streaming { chunked } = self.state else {
            return Err(io::Error::other("send_chunk without an open stream"));
        };
        if data.is_empty() || self.head_only {
            return Ok(());
        }
        let framed = if chunked { encode_chunk(&data) } else { data };
        let result = self.stream.write_all(framed).await;
        self.settle(result, self.state)
    }

    /// Ends the streamed body (the terminating zero-size chunk).
    pub async fn finish_stream(&mut self) -> io::Result<()> {
        let State::Streaming { chunked } = self.state else {
            return Err(io::Error::other("finish_stream without an open stream"));
        };
        if !chunked || self.head_only {
            self.state = State::Complete;
            return Ok(());
        }
        let result = self.stream.write_all(Bytes::from_static(LAST_CHUNK)).await;
        self.settle(result, State::Complete)
    }

    /// Gives up on this exchange: whatever was written stays written, nothing more is, and the
    /// connection is closed once the service returns. With nothing written yet, the client sees
    /// the connection close without a response.
    pub fn abort(&mut self) {
        self.state = State::Broken;
    }

    /// Writes `data` as-is, bypassing all framing; the connection is closed once the service
    /// returns. For fault injection and protocol tests, not for ordinary responses.
    pub async fn write_raw(&mut self, data: Bytes) -> io::Result<()> {
        self.state = State::Broken;
        self.stream.write_all(data).await
    }

    pub(crate) fn outcome(&self) -> Outcome {
        match self.state {
            State::Idle => Outcome::NothingSent,
            State::Complete if self.keep_alive => Outcome::Reusable,
            State::Complete | State::Streaming { .. } | State::Broken => Outcome::Close,
        }
    }

    fn ensure_idle(&self) -> io::Result<()> {
        if self.state == State::Idle { Ok(()) } else { Err(io::Error::other("response already started")) }
    }

    /// Whether this response ends the connection; decided when its head is written.
    fn closing(&self, close_delimited: bool) -> bool {
        close_delimited || !self.keep_alive || self.shutdown.is_triggered()
    }

    fn settle(&mut self, result: io::Result<()>, next: State) -> io::Result<()> {
        self.state = if result.is_ok() { next } else { State::Broken };
        result
    }
}

/// Writes the status line and the service's headers, refusing framing headers and any CR/LF.
fn write_head(
    out: &mut BytesMut,
    status: u16,
    headers: &[(&str, &str)],
    closing: bool,
    http10: bool,
) -> io::Result<()> {
    let code = http::StatusCode::from_u16(status)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "invalid status code"))?;
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", code.as_u16(), code.canonical_reason().unwrap_or("Unknown"));
    for (name, value) in headers {
        if is_framing_header(name) {
            continue;
        }
        if !valid_name(name) || !valid_value(value) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "invalid response header"));
        }
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    if closing {
        out.put_slice(b"connection: close\r\n");
    } else if http10 {
        out.put_slice(b"connection: keep-alive\r\n");
    }
    Ok(())
}

fn is_framing_header(name: &str) -> bool {
    ["content-length", "transfer-encoding", "connection"].iter().any(|f| name.eq_ignore_ascii_case(f))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && http::HeaderName::from_bytes(name.as_bytes()).is_ok()
}

fn valid_value(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16, headers: &[(&str, &str)], closing: bool, http10: bool) -> io::Result<String> {
        let mut out = BytesMut::new();
        write_head(&mut out, status, headers, closing, http10)?;
        Ok(String::from_utf8(out.to_vec()).unwrap())
    }

    #[test]
    fn the_head_carries_status_reason_and_service_headers() {
        let h = head(404, &[("content-type", "application/json")], false, false).unwrap();
        assert_eq!(h, "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n");
    }

    #[test]
    fn framing_headers_from_the_service_are_dropped() {
        let h = head(
            200,
            &[("Content-Length", "5"), ("Connection", "x"), ("Transfer-Encoding", "gzip")],
            true,
            false,
        )
        .unwrap();
        assert_eq!(h, "HTTP/1.1 200 OK\r\nconnection: close\r\n");
    }

    #[test]
    fn header_injection_is_refused() {
        assert!(head(200, &[("x-a", "1\r\nx-b: 2")], false, false).is_err());
        assert!(head(200, &[("bad name", "1")], false, false).is_err());
        assert!(head(1000, &[], false, false).is_err());
    }

    #[test]
    fn http10_keep_alive_is_announced() {
        assert!(head(200, &[], false, true).unwrap().ends_with("connection: keep-alive\r\n"));
    }
}
