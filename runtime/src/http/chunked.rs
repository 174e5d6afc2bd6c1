//! The `Transfer-Encoding: chunked` body framing, both directions.
//!
//! Owns [`ChunkedDecoder`], an incremental state machine that turns chunked wire bytes into body
//! bytes, and [`encode_chunk`], which frames one piece of body. Both are pure: bytes in, bytes out,
//! no I/O, no clock, no knowledge of whether they serve the server side (request bodies) or the
//! upstream client (response bodies). The decoder must never panic and never buffer without bound:
//! size lines, extensions and trailers are capped, and a size that does not fit in `u64` is an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Longest chunk-size line accepted, extensions included.
const MAX_SIZE_LINE: usize = 4 * 1024;
/// Most trailer bytes accepted after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    #[error("chunk size is not a hexadecimal number")]
    InvalidSize,
    #[error("chunk size overflows")]
    SizeOverflow,
    #[error("chunk size line is too long")]
    SizeLineTooLong,
    #[error("chunk framing is missing a CRLF")]
    InvalidDelimiter,
    #[error("chunk trailers are malformed or too large")]
    InvalidTrailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a size; `digits` seen so far.
    Size {
        value: u64,
        digits: u8,
    },
    /// After the digits: optional whitespace before `;` or CR.
    SizeTail {
        value: u64,
    },
    /// Inside chunk extensions, up to CR.
    Extension {
        value: u64,
    },
    /// CR of the size line seen, LF expected.
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Incremental decoder of one chunked body.
///
/// Feed it whatever bytes have arrived; it consumes what it can from the front of `input`, appends
/// the body bytes to `out`, and stops exactly after the final CRLF, leaving any following bytes
/// (a pipelined request, the next response) in `input`. Chunk extensions are skipped; trailers are
/// read and dropped.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    line_len: usize,
    trailer_len: usize,
    declared: u64,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size { value: 0, digits: 0 },
            line_len: 0,
            trailer_len: 0,
            declared: 0,
        }
    }

    /// Whether the terminating chunk and trailers have been read.
    pub fn is_finished(&self) -> bool {
        self.state == State::Done
    }

    /// Sum of all chunk sizes announced so far, including the part of the current chunk not yet
    /// received: lets a caller reject an oversized body before its bytes arrive.
    pub fn declared_len(&self) -> u64 {
        self.declared
    }

    /// Consumes bytes from the front of `input`, appending decoded body bytes to `out`.
    /// Returns `Ok(true)` once the body is complete; `Ok(false)` means more input is needed.
    pub fn decode(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Result<bool, ChunkedError> {
        let mut at = 0;
        let result = self.run(&input[..], &mut at, out);
        input.advance(at);
        result
    }

    fn run(&mut self, input: &[u8], at: &mut usize, out: &mut BytesMut) -> Result<bool, ChunkedError> {
        while *at < input.len() {
            if let State::Data { remaining } = self.state {
                let available = input.len() - *at;
                let take = usize::try_from(remaining).map_or(available, |r| r.min(available));
                out.extend_from_slice(&input[*at..*at + take]);
                *at += take;
                let left = remaining - take as u64;
                self.state = if left == 0 { State::DataCr } else { State::Data { remaining: left } };
                continue;
            }
            if self.state == State::Done {
                return Ok(true);
            }
            let byte = input[*at];
            *at += 1;
            self.state = self.step(byte)?;
        }
        Ok(self.state == State::Done)
    }

    fn step(&mut self, byte: u8) -> Result<State, ChunkedError> {
        Ok(match self.state {
            State::Size { value, digits } => {
                self.count_size_line()?;
                match hex_value(byte) {
                    Some(d) => {
                        if value > u64::MAX >> 4 {
                            return Err(ChunkedError::SizeOverflow);
                        }
                        State::Size { value: (value << 4) | u64::from(d), digits: digits.saturating_add(1) }
                    }
                    None if digits == 0 => return Err(ChunkedError::InvalidSize),
                    None => self.after_size(value, byte)?,
                }
            }
            State::SizeTail { value } => {
                self.count_size_line()?;
                self.after_size(value, byte)?
            }
            State::Extension { value } => {
                self.count_size_line()?;
                match byte {
                    b'\r' => State::SizeLf { value },
                    b'\t' => State::Extension { value },
                    0..=31 | 127 => return Err(ChunkedError::InvalidDelimiter),
                    _ => State::Extension { value },
                }
            }
            State::SizeLf { value } => {
                if byte != b'\n' {
                    return Err(ChunkedError::InvalidDelimiter);
                }
                self.line_len = 0;
                self.declared = self.declared.checked_add(value).ok_or(ChunkedError::SizeOverflow)?;
                if value == 0 { State::TrailerStart } else { State::Data { remaining: value } }
            }
            State::DataCr => expect(byte, b'\r', State::DataLf)?,
            State::DataLf => expect(byte, b'\n', State::Size { value: 0, digits: 0 })?,
            State::TrailerStart => {
                if byte == b'\r' {
                    State::EndLf
                } else {
                    self.trailer_line_byte(byte)?
                }
            }
            State::TrailerLine => {
                if byte == b'\r' {
                    State::TrailerLf
                } else {
                    self.trailer_line_byte(byte)?
                }
            }
            State::TrailerLf => expect(byte, b'\n', State::TrailerStart)?,
            State::EndLf => expect(byte, b'\n', State::Done)?,
            State::Data { .. } | State::Done => self.state,
        })
    }

    fn after_size(&self, value: u64, byte: u8) -> Result<State, ChunkedError> {
        match byte {
            b' ' | b'\t' => Ok(State::SizeTail { value }),
            b';' => Ok(State::Extension { value }),
            b'\r' => Ok(State::SizeLf { value }),
            _ => Err(ChunkedError::InvalidSize),
        }
    }

    fn count_size_line(&mut self) -> Result<(), ChunkedError> {
        self.line_len += 1;
        if self.line_len > MAX_SIZE_LINE { Err(ChunkedError::SizeLineTooLong) } else { Ok(()) }
    }

    fn trailer_line_byte(&mut self, byte: u8) -> Result<State, ChunkedError> {
        self.trailer_len += 1;
        if self.trailer_len > MAX_TRAILERS || byte == b'\n' || (byte < 32 && byte != b'\t') || byte == 127 {
            return Err(ChunkedError::InvalidTrailers);
        }
        Ok(State::TrailerLine)
    }
}

fn expect(byte: u8, wanted: u8, next: State) -> Result<State, ChunkedError> {
    if byte == wanted { Ok(next) } else { Err(ChunkedError::InvalidDelimiter) }
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Frames `data` as one chunk: `SIZE\r\nDATA\r\n`. Empty data is skipped (an empty chunk would
/// end the body); use [`LAST_CHUNK`] for that.
pub fn encode_chunk(data: &[u8]) -> Bytes {
    if data.is_empty() {
        return Bytes::new();
    }
    let mut framed = BytesMut::with_capacity(data.len() + 20);
    let mut size = [0u8; 16];
    let digits = hex_digits(data.len(), &mut size);
    framed.put_slice(digits);
    framed.put_slice(b"\r\n");
    framed.put_slice(data);
    framed.put_slice(b"\r\n");
    framed.freeze()
}

/// The terminating chunk with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

fn hex_digits(mut n: usize, scratch: &mut [u8; 16]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = scratch.len();
    loop {
        i -= 1;
        scratch[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 || i == 0 {
            break;
        }
    }
    &scratch[i..]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn decode_all(wire: &[u8]) -> Result<(bool, Vec<u8>, Vec<u8>), ChunkedError> {
        let mut d = ChunkedDecoder::new();
        let mut input = BytesMut::from(wire);
        let mut out = BytesMut::new();
        let done = d.decode(&mut input, &mut out)?;
        Ok((done, out.to_vec(), input.to_vec()))
    }

    /// Encodes `body` cut into chunks of `sizes` (cycled), with optional extensions and trailers.
    fn encode(body: &[u8], sizes: &[usize], ext: bool, trailers: bool, upper: bool) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            i += 1;
            let size = if upper { format!("{n:X}") } else { format!("{n:x}") };
            wire.extend_from_slice(size.as_bytes());
            if ext {
                wire.extend_from_slice(b" ;name=\"va;l\"; flag");
            }
            wire.extend_from_slice(b"\r\n");
            wire.extend_from_slice(&rest[..n]);
            wire.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        wire.extend_from_slice(b"0");
        if ext {
            wire.extend_from_slice(b";last");
        }
        wire.extend_from_slice(b"\r\n");
        if trailers {
            wire.extend_from_slice(b"X-Checksum: abc\r\nX-Other:\tv\r\n");
        }
        wire.extend_from_slice(b"\r\n");
        wire
    }

    proptest! {
        #[test]
        fn any_body_in_any_chunking_fed_in_any_fragments_decodes_to_itself(
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            sizes in proptest::collection::vec(1usize..700, 1..8),
            cuts in proptest::collection::vec(1usize..200, 1..40),
            ext in any::<bool>(),
            trailers in any::<bool>(),
            upper in any::<bool>(),
        ) {
            let mut wire = encode(&body, &sizes, ext, trailers, upper);
            wire.extend_from_slice(b"NEXT");
            let mut d = ChunkedDecoder::new();
            let mut input = BytesMut::new();
            let mut out = BytesMut::new();
            let mut fed = 0;
            let mut finished = false;
            let mut cut = cuts.iter().cycle();
            while fed < wire.len() {
                let n = (*cut.next().unwrap()).min(wire.len() - fed);
                input.extend_from_slice(&wire[fed..fed + n]);
                fed += n;
                finished = d.decode(&mut input, &mut out).unwrap();
                if finished {
                    break;
                }
            }
            prop_assert!(finished);
            prop_assert_eq!(&out[..], &body[..]);
            input.extend_from_slice(&wire[fed..]);
            prop_assert_eq!(&input[..], b"NEXT");
            prop_assert_eq!(d.declared_len(), body.len() as u64);
        }

        #[test]
        fn random_bytes_never_panic_and_never_overrun(wire in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = ChunkedDecoder::new();
            let mut input = BytesMut::from(&wire[..]);
            let mut out = BytesMut::new();
            let _ = d.decode(&mut input, &mut out);
            prop_assert!(out.len() <= wire.len());
        }
    }

    #[test]
    fn a_body_split_inside_the_size_line_and_the_crlf_resumes() {
        let wire = b"1a;x=y\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::new();
        let mut out = BytesMut::new();
        let mut input = BytesMut::new();
        for b in wire {
            input.put_u8(*b);
            d.decode(&mut input, &mut out).unwrap();
        }
        assert!(d.is_finished());
        assert_eq!(&out[..], b"abcdefghijklmnopqrstuvwxyz");
    }

    #[test]
    fn a_missing_size_is_rejected() {
        assert_eq!(decode_all(b"\r\nabc\r\n"), Err(ChunkedError::InvalidSize));
        assert_eq!(decode_all(b";ext\r\n"), Err(ChunkedError::InvalidSize));
    }

    #[test]
    fn a_non_hex_size_is_rejected() {
        assert_eq!(decode_all(b"1g\r\n"), Err(ChunkedError::InvalidSize));
        assert_eq!(decode_all(b"-1\r\n"), Err(ChunkedError::InvalidSize));
        assert_eq!(decode_all(b"0x10\r\n"), Err(ChunkedError::InvalidSize));
        assert_eq!(decode_all(b"1 2\r\n"), Err(ChunkedError::InvalidSize));
    }

    #[test]
    fn a_size_beyond_u64_is_rejected() {
        assert_eq!(decode_all(b"10000000000000000\r\n"), Err(ChunkedError::SizeOverflow));
        assert!(decode_all(b"ffffffffffffffff\r\n").is_ok());
    }

    #[test]
    fn announced_sizes_that_add_up_beyond_u64_are_rejected() {
        let mut d = ChunkedDecoder::new();
        d.declared = u64::MAX - 1;
        let mut input = BytesMut::from(&b"2\r\n"[..]);
        assert_eq!(d.decode(&mut input, &mut BytesMut::new()), Err(ChunkedError::SizeOverflow));
    }

    #[test]
    fn a_bare_lf_is_rejected() {
        assert_eq!(decode_all(b"3\nabc\r\n"), Err(ChunkedError::InvalidSize));
        assert_eq!(decode_all(b"3\r\rabc"), Err(ChunkedError::InvalidDelimiter));
        assert_eq!(decode_all(b"3;a\nabc"), Err(ChunkedError::InvalidDelimiter));
    }

    #[test]
    fn data_longer_than_its_size_is_rejected() {
        assert_eq!(decode_all(b"3\r\nabcd\r\n0\r\n\r\n"), Err(ChunkedError::InvalidDelimiter));
    }

    #[test]
    fn an_endless_size_line_is_rejected() {
        let mut wire = b"5;".to_vec();
        wire.extend(std::iter::repeat_n(b'x', MAX_SIZE_LINE));
        assert_eq!(decode_all(&wire), Err(ChunkedError::SizeLineTooLong));
    }

    #[test]
    fn endless_trailers_are_rejected() {
        let mut wire = b"0\r\n".to_vec();
        for _ in 0..2000 {
            wire.extend_from_slice(b"X-Pad: 0123456789\r\n");
        }
        assert_eq!(decode_all(&wire), Err(ChunkedError::InvalidTrailers));
    }

    #[test]
    fn the_decoder_stops_at_the_end_and_leaves_what_follows() {
        let (done, body, rest) = decode_all(b"2\r\nhi\r\n0\r\n\r\nGET / HTTP/1.1\r\n").unwrap();
        assert!(done);
        assert_eq!(body, b"hi");
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn encoded_chunks_decode_back() {
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&encode_chunk(b"hello "));
        wire.extend_from_slice(&encode_chunk(&[7u8; 300]));
        wire.extend_from_slice(&encode_chunk(b""));
        wire.extend_from_slice(LAST_CHUNK);
        assert!(wire.starts_with(b"6\r\nhello \r\n12c\r\n"));
        let (done, body, _) = decode_all(&wire).unwrap();
        assert!(done);
        assert_eq!(body.len(), 306);
    }
}
