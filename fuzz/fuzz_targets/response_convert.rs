//! `convert_response` in all nine directions, plus the other readers of a complete response body
//! (`response_usage`, `response_text`, `upstream_error_message`): any body gives `Ok` or `Err` (or
//! `None`), never a panic. When `Ok`: a same-protocol body passes through byte for byte with the usage
//! `response_usage` reads from it; a converted body is JSON, decodes again as a response of the client
//! protocol, and reports the same prompt and completion token counts it was converted with.
#![no_main]

use burncloud_adaptors::{
    ResponseMeta, convert_response, response_text, response_usage, upstream_error_message,
};
use burncloud_fuzz::{name, protocol_pair};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [selector, names, body @ ..] = data else { return };
    let (from, to) = protocol_pair(*selector);
    let meta = ResponseMeta { model: name(*names), id: name(*names >> 4), created: u64::from(*names) << 40 };

    let usage = response_usage(from, body);
    let _ = response_text(from, body);
    let _ = upstream_error_message(from, body);
    let Ok(out) = convert_response(from, to, body, &meta) else { return };

    if from == to {
        assert_eq!(&out.body[..], body, "a same-protocol response is not passed through");
        assert_eq!(out.usage, usage, "pass-through usage differs from response_usage");
        return;
    }
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&out.body) {
        panic!("{from:?}->{to:?} produced a body that is not JSON ({e}): {:?}", out.body);
    }
    if let Err(e) = response_text(to, &out.body) {
        panic!("{from:?}->{to:?} produced a body that {to:?} decoding refuses: {e}: {:?}", out.body);
    }
    // Token counts survive the conversion when the upstream's usage is consistent (no negative count,
    // no more cached or cache-written tokens than prompt tokens); an inconsistent one is clamped.
    let consistent = |u: &burncloud_adaptors::Usage| {
        u.prompt_tokens >= 0
            && u.completion_tokens >= 0
            && u.cached_tokens >= 0
            && u.cache_creation_tokens >= 0
            && u.reasoning_tokens >= 0
            && u.cached_tokens.checked_add(u.cache_creation_tokens).is_some_and(|c| c <= u.prompt_tokens)
    };
    if let Some(u) = out.usage.filter(consistent) {
        let back = response_usage(to, &out.body).unwrap_or_default();
        assert_eq!(
            (back.prompt_tokens, back.completion_tokens),
            (u.prompt_tokens, u.completion_tokens),
            "{from:?}->{to:?} changed the token counts: {:?}",
            out.body
        );
    }
});
