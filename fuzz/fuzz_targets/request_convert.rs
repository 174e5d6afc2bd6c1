//! `convert_request` in all nine directions, with any options: any body gives `Ok` or `Err`, never a
//! panic. When `Ok`: the body is JSON; the path is `upstream_path` for the stream flag returned, and
//! that flag is the client's (the body's `stream`, or the URL's for Gemini); a same-protocol body is
//! the client's with only `model` replaced (Gemini: byte for byte); a converted body names the
//! upstream model (OpenAI, Anthropic) or none (Gemini), and decodes again as a request of the target
//! protocol. `summarize_request` agrees with the conversion.
#![no_main]

use burncloud_adaptors::convert::decode_request;
use burncloud_adaptors::{Protocol, RequestOptions, convert_request, summarize_request, upstream_path};
use burncloud_fuzz::{name, protocol_pair};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let [selector, flags, limit, body @ ..] = data else { return };
    let (from, to) = protocol_pair(*selector);
    let opts = RequestOptions {
        default_max_tokens: u32::from(*limit) * 64,
        stream: match flags & 0b11 {
            0 => None,
            1 => Some(false),
            _ => Some(true),
        },
        openai_max_completion_tokens: flags & 0b100 != 0,
    };
    let model = name(flags >> 3);

    let summary = summarize_request(from, body, &opts);
    let Ok(out) = convert_request(from, to, body, model, &opts) else { return };

    let json: Value = match serde_json::from_slice(&out.body) {
        Ok(v) => v,
        Err(e) => panic!("{from:?}->{to:?} produced a body that is not JSON ({e}): {:?}", out.body),
    };
    assert_eq!(out.path, upstream_path(to, model, out.stream), "path and stream flag disagree");

    if from == to {
        match from {
            Protocol::Gemini => {
                assert_eq!(&out.body[..], body, "a Gemini body is not passed through");
                assert_eq!(out.stream, opts.stream.unwrap_or(false));
            }
            Protocol::OpenAi | Protocol::Anthropic => {
                let mut expected: serde_json::Map<String, Value> = match serde_json::from_slice(body) {
                    Ok(m) => m,
                    Err(e) => panic!("accepted a body that is not a JSON object ({e})"),
                };
                assert_eq!(out.stream, expected.get("stream") == Some(&Value::Bool(true)));
                expected.insert("model".into(), Value::String(model.into()));
                let reparsed: Value =
                    serde_json::from_slice(&serde_json::to_vec(&expected).unwrap_or_default())
                        .unwrap_or_default();
                assert_eq!(json, reparsed, "same-protocol body changed beyond `model`");
            }
        }
        return;
    }

    let summary = match summary {
        Ok(s) => s,
        Err(e) => panic!("{from:?}->{to:?} converted a body that summarize_request refuses: {e}"),
    };
    assert_eq!(summary.stream, out.stream, "summary and conversion disagree on streaming");
    assert_eq!(summary.model.is_some(), from != Protocol::Gemini);
    if from == Protocol::Gemini {
        assert_eq!(out.stream, opts.stream.unwrap_or(false), "Gemini's stream flag comes from the URL");
    }
    match to {
        Protocol::OpenAi | Protocol::Anthropic => {
            assert_eq!(json.get("model").and_then(Value::as_str), Some(model), "upstream model not set");
        }
        Protocol::Gemini => assert!(json.get("model").is_none(), "a Gemini body names a model"),
    }
    // What we send upstream must be something we would accept from a client of that protocol, apart
    // from a missing model (an empty upstream model name, or Gemini's, which lives in the URL).
    let again = RequestOptions { stream: Some(out.stream), ..opts };
    match decode_request(to, &out.body, &again) {
        Ok(req) => assert_eq!(req.stream, out.stream, "re-decoded stream flag differs"),
        Err(burncloud_adaptors::ConvertError::MissingModel) if model.trim().is_empty() => {}
        Err(e) => panic!("{from:?}->{to:?} produced a body that {to:?} decoding refuses: {e}\n{json}"),
    }
});
