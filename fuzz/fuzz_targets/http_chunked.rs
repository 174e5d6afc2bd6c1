//! `burncloud_runtime::http::ChunkedDecoder`: any wire bytes, fed in any fragments, give the same
//! result (done, needs more, or the same error), the same body bytes and the same leftover as feeding
//! them whole; the body is never longer than the bytes consumed nor than the sizes declared, and a
//! finished decoder consumes nothing more. `encode_chunk` + `LAST_CHUNK` of any body, cut anywhere,
//! decodes back to that body and stops exactly at its end.
#![no_main]

use burncloud_fuzz::{chunked, split_by};
use burncloud_runtime::http::{ChunkedDecoder, ChunkedError, LAST_CHUNK, encode_chunk};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    result: Result<bool, ChunkedError>,
    body: Vec<u8>,
    /// Bytes not consumed when the body finished (what follows it on the connection).
    rest: Option<Vec<u8>>,
    declared: u64,
}

/// Feeds `fragments` one after another, stopping at the end of the body or at the first error.
fn decode(fragments: &[&[u8]]) -> Outcome {
    let mut d = ChunkedDecoder::new();
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let mut consumed = 0;
    let mut result = Ok(false);
    for (i, fragment) in fragments.iter().enumerate() {
        input.extend_from_slice(fragment);
        let before = input.len();
        result = d.decode(&mut input, &mut out);
        consumed += before - input.len();
        assert!(out.len() <= consumed, "{} body bytes from {consumed} wire bytes", out.len());
        assert!(out.len() as u64 <= d.declared_len(), "body longer than the declared sizes");
        assert_eq!(result == Ok(true), d.is_finished());
        match result {
            Ok(true) => {
                assert_eq!(d.declared_len(), out.len() as u64, "finished body differs from its sizes");
                let mut again = input.clone();
                assert_eq!(d.decode(&mut again, &mut out), Ok(true), "finished decoder goes on");
                assert_eq!(again, input, "finished decoder consumed bytes");
                let mut rest = input.to_vec();
                rest.extend(fragments[i + 1..].concat());
                let body = out.to_vec();
                return Outcome { result, body, rest: Some(rest), declared: d.declared_len() };
            }
            Err(_) => break,
            Ok(false) => {}
        }
    }
    Outcome { result, body: out.to_vec(), rest: None, declared: d.declared_len() }
}

fuzz_target!(|data: &[u8]| {
    let (fragments, wire) = chunked(data);
    let whole = decode(&[wire]);
    let split = decode(&fragments);
    assert_eq!(split, whole, "whole and fragmented decoding differ");

    // The payload as a body: framed by encode_chunk in pieces cut by the same gaps, then the last
    // chunk and something that follows.
    let gaps: Vec<u8> = data.iter().take(4).copied().collect();
    let mut framed = Vec::new();
    for piece in split_by(wire, &gaps) {
        framed.extend_from_slice(&encode_chunk(piece));
    }
    framed.extend_from_slice(LAST_CHUNK);
    framed.extend_from_slice(b"GET /");
    let back = decode(&split_by(&framed, &gaps[gaps.len().min(1)..]));
    assert_eq!(back.result, Ok(true), "an encoded body does not decode");
    assert_eq!(back.body, wire, "an encoded body decodes to something else");
    assert_eq!(back.rest.as_deref(), Some(&b"GET /"[..]), "decoding does not stop at the body's end");
    assert_eq!(back.declared, wire.len() as u64);
});
