//! A request as the service sees it, and the parsing of a request head into it.
//!
//! Owns [`Request`] and the head parser: request line and headers through httparse, the target split
//! into path and query, and the framing facts the connection loop needs (body length or chunked,
//! keep-alive, `Expect: 100-continue`). Header values are slices of the received head, not copies.
//! Parsing is pure (bytes in, a parsed head or a [`HeadError`] out) and never panics on any input;
//! it never reads a socket and never decides a response.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// Header slots offered to httparse; `Limits::max_headers` above this is capped here.
pub(crate) const HEADER_SLOTS: usize = 256;

/// One complete request, body included.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    /// The target's path, without the query, not percent-decoded.
    pub path: String,
    /// The raw query string after `?`, when present.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: SocketAddr,
    /// When the first byte of the head arrived.
    pub received_at: Instant,
}

impl Request {
    /// The first value of header `name` (any case), when present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The first query parameter called `name`, percent-decoded (`+` read as a space).
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key) == name).then(|| percent_decode(value).into_owned())
        })
    }
}

/// Decodes `%XX` escapes and `+`; malformed escapes are kept literally, invalid UTF-8 is replaced.
pub(crate) fn percent_decode(s: &str) -> Cow<'_, str> {
    let bytes = s.as_bytes();
    if !bytes.iter().any(|b| *b == b'%' || *b == b'+') {
        return Cow::Borrowed(s);
    }
    Cow::Owned(decode_escapes(bytes))
}

fn decode_escapes(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' {
            out.push(b' ');
            i += 1;
            continue;
        }
        if b == b'%'
            && let (Some(hi), Some(lo)) =
                (bytes.get(i + 1).and_then(|h| hex(*h)), bytes.get(i + 2).and_then(|l| hex(*l)))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Why a head cannot be accepted; each maps to one client error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// Request line or headers are malformed, or the framing is contradictory (400).
    Malformed(&'static str),
    /// The head exceeds `max_head` or `max_headers` (431).
    TooLarge,
}

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    Empty,
    Length(u64),
    Chunked,
}

/// A header whose value is still a range of the head bytes.
pub(crate) struct HeaderSlot {
    name: HeaderName,
    value: Range<usize>,
}

/// What the connection loop needs from a complete head; header values wait in the slot list.
#[derive(Debug)]
pub(crate) struct ParsedHead {
    /// Length of the head in bytes, final CRLF included.
    pub len: usize,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub http10: bool,
    pub framing: BodyFraming,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

/// Parses the head at the start of `buf`. `Ok(None)` means incomplete (and still within limits).
/// On success, `slots` holds the headers as ranges of `buf`, in order.
pub(crate) fn parse_head(
    buf: &[u8],
    max_head: usize,
    max_headers: usize,
    slots: &mut Vec<HeaderSlot>,
) -> Result<Option<ParsedHead>, HeadError> {
    let mut storage = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let count = max_headers.clamp(1, HEADER_SLOTS);
    let mut req = httparse::Request::new(&mut storage[..count]);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max_head { Err(HeadError::TooLarge) } else { Ok(None) };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed("malformed request head")),
    };
    if len > max_head {
        return Err(HeadError::TooLarge);
    }
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    let http10 = req.version == Some(0);
    let (path, query) = split_target(req.path.unwrap_or_default())?;

    let mut framing = Framing::default();
    let base = buf.as_ptr() as usize;
    slots.clear();
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| HeadError::Malformed("invalid header name"))?;
        framing.observe(&name, h.value)?;
        let start = (h.value.as_ptr() as usize).saturating_sub(base);
        slots.push(HeaderSlot { name, value: start..start + h.value.len() });
    }
    let body = framing.body(http10)?;
    let keep_alive = if http10 { framing.keep_alive_token } else { !framing.close_token };
    Ok(Some(ParsedHead {
        len,
        method,
        path,
        query,
        http10,
        framing: body,
        keep_alive,
        expect_continue: framing.expect_continue && !http10,
    }))
}

/// Builds the header map from `slots`, whose ranges index `head`; empties `slots` (keeping capacity).
pub(crate) fn build_headers(head: &Bytes, slots: &mut Vec<HeaderSlot>) -> Result<HeaderMap, HeadError> {
    let mut map = HeaderMap::with_capacity(slots.len());
    for slot in slots.drain(..) {
        let bytes = head.get(slot.value.clone()).map(|_| head.slice(slot.value)).unwrap_or_default();
        let value = HeaderValue::from_maybe_shared(bytes)
            .map_err(|_| HeadError::Malformed("invalid header value"))?;
        map.append(slot.name, value);
    }
    Ok(map)
}

/// Splits an origin-form (or absolute-form) target into path and query.
fn split_target(target: &str) -> Result<(String, Option<String>), HeadError> {
    let origin = if target.starts_with('/') || target == "*" {
        target
    } else if let Some(rest) = target.strip_prefix("http://").or_else(|| target.strip_prefix("https://")) {
        rest.find('/').map_or("/", |i| &rest[i..])
    } else {
        return Err(HeadError::Malformed("invalid request target"));
    };
    Ok(match origin.split_once('?') {
        Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
        None => (origin.to_owned(), None),
    })
}

/// Framing facts gathered while walking the headers.
#[derive(Default)]
struct Framing {
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    close_token: bool,
    keep_alive_token: bool,
    expect_continue: bool,
}

impl Framing {
    fn observe(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), HeadError> {
        if name == CONTENT_LENGTH {
            for part in value.split(|b| *b == b',') {
                let n = parse_length(trim(part)).ok_or(HeadError::Malformed("invalid Content-Length"))?;
                if self.content_length.is_some_and(|prev| prev != n) {
                    return Err(HeadError::Malformed("conflicting Content-Length headers"));
                }
                self.content_length = Some(n);
            }
        } else if name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
            for coding in value.split(|b| *b == b',').map(trim).filter(|c| !c.is_empty()) {
                if self.chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                    return Err(HeadError::Malformed("unsupported Transfer-Encoding"));
                }
                self.chunked = true;
            }
        } else if name == CONNECTION {
            for token in value.split(|b| *b == b',').map(trim) {
                self.close_token |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == EXPECT {
            self.expect_continue |= trim(value).eq_ignore_ascii_case(b"100-continue");
        }
        Ok(())
    }

    fn body(&self, http10: bool) -> Result<BodyFraming, HeadError> {
        match (self.transfer_encoding, self.content_length) {
            (true, Some(_)) => Err(HeadError::Malformed("both Content-Length and Transfer-Encoding")),
            (true, None) if http10 || !self.chunked => {
                Err(HeadError::Malformed("unsupported Transfer-Encoding"))
            }
            (true, None) => Ok(BodyFraming::Chunked),
            (false, Some(0)) | (false, None) => Ok(BodyFraming::Empty),
            (false, Some(n)) => Ok(BodyFraming::Length(n)),
        }
    }
}

/// A Content-Length value: 1 to 19 ASCII digits.
fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, d| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

fn trim(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Result<Option<ParsedHead>, HeadError> {
        parse_head(head.as_bytes(), 16 * 1024, 100, &mut Vec::new())
    }

    fn request_with_query(query: &str) -> Request {
        Request {
            method: Method::GET,
            path: "/".into(),
            query: Some(query.into()),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            peer: "127.0.0.1:1".parse().unwrap(),
            received_at: Instant::now(),
        }
    }

    #[test]
    fn a_complete_head_yields_method_path_query_and_headers() {
        let raw = Bytes::from_static(b"POST /v1/chat?key=a%2Bb&x HTTP/1.1\r\nHost: h\r\nX-Id: 7\r\n\r\nBODY");
        let mut slots = Vec::new();
        let head = parse_head(&raw, 1024, 100, &mut slots).unwrap().unwrap();
        assert_eq!(head.len, raw.len() - 4);
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.path, "/v1/chat");
        assert_eq!(head.query.as_deref(), Some("key=a%2Bb&x"));
        let headers = build_headers(&raw.slice(..head.len), &mut slots).unwrap();
        assert_eq!(headers.get("x-id").unwrap(), "7");
        assert!(slots.is_empty());
    }

    #[test]
    fn an_incomplete_head_asks_for_more() {
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn an_incomplete_head_at_the_size_limit_is_too_large() {
        let r = parse_head(b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaa", 20, 100, &mut Vec::new());
        assert_eq!(r.unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn too_many_headers_is_too_large() {
        let r = parse_head(b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n", 1024, 2, &mut Vec::new());
        assert_eq!(r.unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn http11_keeps_alive_unless_told_to_close() {
        assert!(parse("GET / HTTP/1.1\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(!parse("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").unwrap().unwrap().keep_alive);
    }

    #[test]
    fn http10_closes_unless_asked_to_keep_alive() {
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().unwrap().keep_alive);
    }

    #[test]
    fn framing_is_read_from_content_length_or_chunked() {
        let h = parse("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, BodyFraming::Length(12));
        let h =
            parse("POST / HTTP/1.1\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, BodyFraming::Length(3));
        let h = parse("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, BodyFraming::Chunked);
        assert_eq!(parse("GET / HTTP/1.1\r\n\r\n").unwrap().unwrap().framing, BodyFraming::Empty);
    }

    #[test]
    fn contradictory_or_invalid_framing_is_malformed() {
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(parse(head), Err(HeadError::Malformed(_))), "{head:?}");
        }
    }

    #[test]
    fn garbage_request_lines_are_malformed() {
        for head in ["GARBAGE\r\n\r\n", "GET\r\n\r\n", "GET / HTTP/2.0\r\n\r\n", "GET foo HTTP/1.1\r\n\r\n"] {
            assert!(matches!(parse(head), Err(HeadError::Malformed(_))), "{head:?}");
        }
    }

    #[test]
    fn absolute_form_targets_are_reduced_to_the_path() {
        let h = parse("GET http://example.com/v1/models?a=1 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.path.as_str(), h.query.as_deref()), ("/v1/models", Some("a=1")));
    }

    #[test]
    fn expect_continue_is_noticed_on_http11_only() {
        let raw = "POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n";
        assert!(parse(raw).unwrap().unwrap().expect_continue);
        let raw = "POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n";
        assert!(!parse(raw).unwrap().unwrap().expect_continue);
    }

    #[test]
    fn query_params_are_percent_decoded() {
        let r = request_with_query("key=sk%2Dabc%20d&alt=sse&empty&plus=a+b&bad=%zz%4");
        assert_eq!(r.query_param("key").as_deref(), Some("sk-abc d"));
        assert_eq!(r.query_param("alt").as_deref(), Some("sse"));
        assert_eq!(r.query_param("empty").as_deref(), Some(""));
        assert_eq!(r.query_param("plus").as_deref(), Some("a b"));
        assert_eq!(r.query_param("bad").as_deref(), Some("%zz%4"));
        assert_eq!(r.query_param("missing"), None);
    }
}
