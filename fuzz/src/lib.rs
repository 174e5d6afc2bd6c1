//! Helpers shared by the fuzz targets: turning the front of a fuzz input into choices (a protocol
//! pair, split points) and the rest into the payload under test.

use burncloud_adaptors::Protocol;

/// Every protocol, in a fixed order.
pub const PROTOCOLS: [Protocol; 3] = [Protocol::OpenAi, Protocol::Anthropic, Protocol::Gemini];

/// The (from, to) pair that `selector` names, out of all nine.
pub fn protocol_pair(selector: u8) -> (Protocol, Protocol) {
    let i = usize::from(selector % 9);
    (PROTOCOLS[i / 3], PROTOCOLS[i % 3])
}

/// Strings used where a conversion takes a model name or id from the caller: plain ones and ones that
/// need escaping in JSON or would be odd in a URL.
pub const NAMES: [&str; 6] =
    ["gpt-4o", "claude-sonnet-4-5", "", "a\"b\\c\nd", "models/x:y?z=1&w#f", "模型-é"];

/// A name from [`NAMES`].
pub fn name(selector: u8) -> &'static str {
    NAMES[usize::from(selector) % NAMES.len()]
}

/// Splits `data` into a chunking description and a payload: the low nibble of the first byte is how
/// many gap bytes follow (0 to 15); the gaps, cycled, are the chunk lengths (0 makes an empty chunk);
/// everything after them is the payload. Returns the chunks (whose concatenation is exactly the
/// payload) and the payload. With no gaps, or only zero gaps, the payload is one chunk (plus the empty
/// ones).
pub fn chunked(data: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let Some((&head, rest)) = data.split_first() else { return (Vec::new(), data) };
    let count = usize::from(head & 0x0F).min(rest.len());
    let (gaps, payload) = rest.split_at(count);
    (split_by(payload, gaps), payload)
}

/// Cuts `payload` into chunks whose lengths are `gaps`, cycled; the last chunk takes what is left.
pub fn split_by<'a>(payload: &'a [u8], gaps: &[u8]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    if gaps.iter().all(|g| *g == 0) {
        chunks.extend(gaps.iter().map(|_| &payload[..0]));
        chunks.push(payload);
        return chunks;
    }
    let mut at = 0;
    for gap in gaps.iter().cycle() {
        let end = (at + usize::from(*gap)).min(payload.len());
        chunks.push(&payload[at..end]);
        at = end;
        if at == payload.len() {
            break;
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_concatenate_to_the_payload() {
        for data in [&b""[..], b"\x00", b"\x03\x01\x00\x02hello world", b"\x02\x00\x00abc", b"\x0f\x01"] {
            let (chunks, payload) = chunked(data);
            assert_eq!(chunks.concat(), payload);
        }
        let (chunks, payload) = chunked(b"\x02\x01\x02abcdef");
        assert_eq!(payload, b"abcdef");
        assert_eq!(chunks, vec![&b"a"[..], b"bc", b"d", b"ef"]);
    }

    #[test]
    fn all_nine_pairs_are_reachable() {
        let pairs: std::collections::HashSet<_> = (0..9).map(|i| format!("{:?}", protocol_pair(i))).collect();
        assert_eq!(pairs.len(), 9);
    }
}
