//! `SseDecoder`: any bytes, fed in any chunking, give exactly the events (and the leftover) that
//! feeding them whole gives; and events written back with `write_data` decode to themselves.
#![no_main]

use burncloud_adaptors::sse::{SseDecoder, SseEvent, write_data, write_json_event};
use burncloud_fuzz::chunked;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fn drain(d: &mut SseDecoder, into: &mut Vec<SseEvent>) {
    while let Some(ev) = d.next_event() {
        into.push(ev);
    }
}

fuzz_target!(|data: &[u8]| {
    let (chunks, payload) = chunked(data);

    let mut whole = SseDecoder::new();
    whole.feed(payload);
    let mut expected = Vec::new();
    drain(&mut whole, &mut expected);

    let mut split = SseDecoder::new();
    let mut got = Vec::new();
    for chunk in &chunks {
        split.feed(chunk);
        drain(&mut split, &mut got);
    }
    assert_eq!(got, expected, "events differ between whole and split feeding");
    assert_eq!(split.pending(), whole.pending(), "leftover differs between whole and split feeding");
    assert!(whole.pending() <= payload.len());
    assert!(whole.next_event().is_none(), "a drained decoder yields nothing more");

    // What was decoded, written back, decodes to the same events: unnamed events whose data has no
    // line break through `write_data`, events with a name and JSON data through `write_json_event`.
    let mut out = BytesMut::new();
    let mut rewritten = Vec::new();
    for ev in &expected {
        let data_one_line = !ev.data.iter().any(|b| *b == b'\n' || *b == b'\r');
        match &ev.event {
            None if data_one_line => {
                write_data(&mut out, &ev.data);
                rewritten.push(ev.clone());
            }
            Some(name) if !name.contains(['\n', '\r']) => {
                if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&ev.data) {
                    write_json_event(&mut out, Some(name), &value);
                    let data = serde_json::to_vec(&value).unwrap_or_default();
                    rewritten.push(SseEvent { event: Some(name.clone()), data: data.into() });
                }
            }
            _ => {}
        }
    }
    let mut back = SseDecoder::new();
    back.feed(&out);
    let mut decoded = Vec::new();
    drain(&mut back, &mut decoded);
    assert_eq!(decoded, rewritten, "written events do not decode back");
    assert_eq!(back.pending(), 0, "written events leave bytes behind");
});
