//! `StreamConverter`, for every (upstream, client) pair: any upstream bytes, in any chunking, give
//! the same client bytes, usage and delivered text as the same bytes fed whole; a same-protocol stream
//! passes through byte for byte; a converted stream is well-formed SSE whose every event carries JSON
//! (OpenAI's `[DONE]` aside) and which ends with the client protocol's terminator or an error event.
#![no_main]

use burncloud_adaptors::sse::{SseDecoder, SseEvent};
use burncloud_adaptors::{Protocol, ResponseMeta, StreamConverter};
use burncloud_fuzz::{chunked, name, protocol_pair};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

struct Run {
    out: BytesMut,
    usage: Option<burncloud_adaptors::Usage>,
    text: String,
}

fn run(upstream: Protocol, client: Protocol, meta: &ResponseMeta, usage: bool, chunks: &[&[u8]]) -> Run {
    let mut conv = StreamConverter::new(upstream, client, meta, usage);
    let mut out = BytesMut::new();
    for chunk in chunks {
        conv.feed(chunk, &mut out);
    }
    conv.finish(&mut out);
    let len = out.len();
    // Once finished, the converter ignores everything.
    conv.feed(b"data: {\"choices\":[]}\n\n", &mut out);
    conv.finish(&mut out);
    assert_eq!(out.len(), len, "output after finish");
    Run { out, usage: conv.usage(), text: conv.delivered_text().to_owned() }
}

fn events(bytes: &[u8]) -> (Vec<SseEvent>, usize) {
    let mut d = SseDecoder::new();
    d.feed(bytes);
    let evs = std::iter::from_fn(|| d.next_event()).collect();
    (evs, d.pending())
}

fn is_json(data: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(data).is_ok()
}

fn is_error(ev: &SseEvent) -> bool {
    ev.event.as_deref() == Some("error")
        || serde_json::from_slice::<serde_json::Value>(&ev.data).is_ok_and(|v| v.get("error").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Some((&names, rest)) = rest.split_first() else { return };
    let (upstream, client) = protocol_pair(selector);
    let include_usage = selector & 0x80 != 0;
    let meta = ResponseMeta { model: name(names), id: name(names >> 4), created: 1_700_000_000 };
    let (chunks, payload) = chunked(rest);

    let whole = run(upstream, client, &meta, include_usage, &[payload]);
    let split = run(upstream, client, &meta, include_usage, &chunks);
    assert_eq!(split.out, whole.out, "client bytes differ between whole and split feeding");
    assert_eq!(split.usage, whole.usage, "usage differs between whole and split feeding");
    assert_eq!(split.text, whole.text, "delivered text differs between whole and split feeding");

    if upstream == client {
        assert_eq!(&whole.out[..], payload, "same-protocol stream is not passed through");
        return;
    }
    let (evs, pending) = events(&whole.out);
    assert_eq!(pending, 0, "converted stream ends inside an event");
    let Some((last, body)) = evs.split_last() else { panic!("converted stream is empty") };
    for ev in body {
        assert!(is_json(&ev.data), "event data is not JSON: {ev:?}");
        assert!(!is_error(ev), "an error event is not the last: {ev:?}");
    }
    match client {
        Protocol::OpenAi => {
            assert!(ev_is_done(last) || is_error(last), "OpenAI stream does not end with [DONE]: {last:?}");
        }
        Protocol::Anthropic => assert!(
            matches!(last.event.as_deref(), Some("message_stop" | "error")) && is_json(&last.data),
            "Anthropic stream does not end with message_stop: {last:?}"
        ),
        Protocol::Gemini => assert!(is_json(&last.data), "Gemini stream's last chunk is not JSON: {last:?}"),
    }
});

fn ev_is_done(ev: &SseEvent) -> bool {
    ev.event.is_none() && ev.data.as_ref() == b"[DONE]"
}
