//! Incremental Server-Sent Events decoding, and writing events.
//!
//! Bytes arrive from the upstream in arbitrary fragments; [`SseDecoder`] buffers an incomplete event
//! and yields each complete event's `event:` name and joined `data:` payload. It never allocates per
//! byte and never fails: malformed lines are ignored, as the SSE specification requires.
//! [`write_json_event`] and [`write_data`] append one event to an output buffer. No I/O here.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: Bytes,
}

/// Splits a byte stream into SSE events.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: BytesMut,
    /// Bytes of `buf` already scanned without finding an event end.
    scanned: usize,
    /// The last event's separator ended in a `\r` that was the last byte received: a `\n` arriving
    /// next completes that `\r\n` and is dropped, so the bytes left over do not depend on where the
    /// stream was cut.
    after_cr: bool,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes received from the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, if the buffered bytes hold one.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.find_event_end()?;
            let (block_len, sep_len) = end;
            let block = self.buf.split_to(block_len + sep_len);
            self.scanned = 0;
            self.after_cr = self.buf.is_empty() && block.last() == Some(&b'\r');
            if let Some(ev) = parse_block(&block[..block_len]) {
                return Some(ev);
            }
        }
    }

    /// Bytes still buffered (an incomplete event).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Finds the blank line that ends an event: a line terminator (`\r\n`, `\n` or `\r`, as the SSE
    /// specification allows) followed by another. Returns (event length, separator length). A `\r`
    /// that ends the buffer after the event's last line waits for the next byte, since it may be the
    /// first half of `\r\n`; a `\r` that ends the separator itself does not (a `\n` that follows it
    /// in the next bytes is an empty line, which dispatches nothing).
    fn find_event_end(&mut self) -> Option<(usize, usize)> {
        let b = &self.buf[..];
        let mut i = self.scanned;
        while let Some(off) = memchr::memchr2(b'\n', b'\r', &b[i..]) {
            let p = i + off;
            let Some(first) = terminator_len(b, p) else {
                self.scanned = p;
                return None;
            };
            let q = p + first;
            match b.get(q) {
                None => {
                    self.scanned = p;
                    return None;
                }
                Some(b'\n') => return Some((p, first + 1)),
                Some(b'\r') => {
                    let second = if b.get(q + 1) == Some(&b'\n') { 2 } else { 1 };
                    return Some((p, first + second));
                }
                Some(_) => i = q,
            }
        }
        self.scanned = b.len();
        None
    }
}

/// The length of the line terminator at `b[p]` (a `\r` or a `\n`), or `None` for a `\r` that ends
/// `b`, which may yet be the first half of `\r\n`.
fn terminator_len(b: &[u8], p: usize) -> Option<usize> {
    if b[p] == b'\n' {
        return Some(1);
    }
    match b.get(p + 1) {
        Some(b'\n') => Some(2),
        Some(_) => Some(1),
        None => None,
    }
}

/// The lines of an event block, split at `\r\n`, `\n` or `\r`.
fn lines(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(block);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr2(b'\n', b'\r', r) {
            Some(i) => {
                let t = if r[i] == b'\r' && r.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                rest = Some(&r[i + t..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// Appends one event whose data is `data` as JSON, named when `event` is given. Nothing is appended if
/// the value cannot be serialized.
pub fn write_json_event<T: Serialize + ?Sized>(out: &mut BytesMut, event: Option<&str>, data: &T) {
    let start = out.len();
    if let Some(name) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"data: ");
    if serde_json::to_writer((&mut *out).writer(), data).is_err() {
        out.truncate(start);
        return;
    }
    out.extend_from_slice(b"\n\n");
}

/// Appends one unnamed event with literal data (e.g. `[DONE]`).
pub fn write_data(out: &mut BytesMut, data: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
}

fn parse_block(block: &[u8]) -> Option<SseEvent> {
    let mut event = None;
    let mut data: Option<BytesMut> = None;
    for line in lines(block) {
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                let d = data.get_or_insert_with(BytesMut::new);
                if !d.is_empty() {
                    d.extend_from_slice(b"\n");
                }
                d.extend_from_slice(value);
            }
            b"event" => event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }
    if data.is_none() && event.is_none() {
        return None;
    }
    Some(SseEvent { event, data: data.map(BytesMut::freeze).unwrap_or_default() })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn all(d: &mut SseDecoder) -> Vec<SseEvent> {
        std::iter::from_fn(|| d.next_event()).collect()
    }

    #[test]
    fn decodes_data_and_event_lines() {
        let mut d = SseDecoder::new();
        d.feed(b"event: message_start\ndata: {\"a\":1}\n\ndata: [DONE]\n\n");
        let evs = all(&mut d);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].event.as_deref(), Some("message_start"));
        assert_eq!(&evs[0].data[..], b"{\"a\":1}");
        assert_eq!(&evs[1].data[..], b"[DONE]");
    }

    #[test]
    fn crlf_comments_and_multiline_data() {
        let mut d = SseDecoder::new();
        d.feed(b": keepalive\r\n\r\ndata: a\r\ndata: b\r\n\r\n");
        let evs = all(&mut d);
        assert_eq!(evs.len(), 1);
        assert_eq!(&evs[0].data[..], b"a\nb");
    }

    #[test]
    fn bare_cr_and_mixed_line_endings_split_lines_and_events() {
        let mut d = SseDecoder::new();
        d.feed(b"data: a\rdata: b\r\rdata: c\n\rdata: d\r\n\rdata: e\r\n\n");
        let evs: Vec<Vec<u8>> = all(&mut d).into_iter().map(|e| e.data.to_vec()).collect();
        assert_eq!(evs, vec![b"a\nb".to_vec(), b"c".to_vec(), b"d".to_vec(), b"e".to_vec()]);
    }

    #[test]
    fn a_cr_at_the_end_of_the_bytes_waits_to_see_whether_a_lf_follows() {
        let mut d = SseDecoder::new();
        d.feed(b"data: a\r");
        assert!(d.next_event().is_none());
        d.feed(b"\ndata: b\r");
        assert!(d.next_event().is_none(), "data: a\\r\\n is one line, not the end of an event");
        d.feed(b"\n\r");
        assert_eq!(&d.next_event().unwrap().data[..], b"a\nb");
        d.feed(b"\ndata: c\n\n");
        assert_eq!(&d.next_event().unwrap().data[..], b"c");
        assert!(d.next_event().is_none());
        assert_eq!(d.pending(), 0, "the \\n after the separator's \\r completed it");
    }

    #[test]
    fn an_incomplete_event_waits_for_more_bytes() {
        let mut d = SseDecoder::new();
        d.feed(b"data: hel");
        assert!(d.next_event().is_none());
        d.feed(b"lo\n");
        assert!(d.next_event().is_none());
        d.feed(b"\n");
        assert_eq!(&d.next_event().unwrap().data[..], b"hello");
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn written_events_decode_back() {
        let mut out = BytesMut::new();
        write_json_event(&mut out, Some("ping"), &serde_json::json!({"type": "ping"}));
        write_data(&mut out, b"[DONE]");
        assert_eq!(&out[..], b"event: ping\ndata: {\"type\":\"ping\"}\n\ndata: [DONE]\n\n");
        let mut d = SseDecoder::new();
        d.feed(&out);
        let evs = all(&mut d);
        assert_eq!(evs[0].event.as_deref(), Some("ping"));
        assert_eq!(&evs[1].data[..], b"[DONE]");
    }

    proptest! {
        #[test]
        fn any_fragmentation_yields_the_same_events(
            payloads in proptest::collection::vec("[a-z0-9{}\":, ]{0,40}", 1..8),
            cuts in proptest::collection::vec(0usize..400, 0..10),
            ends in proptest::collection::vec(0usize..3, 16),
        ) {
            // Every line ends in any of the three terminators, mixed within one event.
            let nl = |k: usize| ["\n", "\r\n", "\r"][ends[k % ends.len()]];
            let text: String = payloads
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let (first, mut second) = (nl(3 * k + 1), nl(3 * k + 2));
                    if first == "\r" && second == "\n" {
                        // `\r` then `\n` is one terminator (CRLF), not a blank line.
                        second = "\r\n";
                    }
                    format!(": c{}data: {p}{first}{second}", nl(3 * k))
                })
                .collect();
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort();
            let mut d = SseDecoder::new();
            let mut got = vec![];
            let mut last = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                d.feed(&bytes[last..p]);
                last = p;
                got.extend(all(&mut d).into_iter().map(|e| String::from_utf8(e.data.to_vec()).unwrap()));
            }
            prop_assert_eq!(got, payloads);
            prop_assert_eq!(d.pending(), 0, "nothing is left over after complete events");
        }
    }
}
