//! Per-event cost of stream conversion: an upstream SSE stream fed one event at a time (as it arrives
//! from the network) through a [`StreamConverter`], for OpenAI→Anthropic and Anthropic→OpenAI, plus
//! same-protocol passthrough (which still decodes every event for usage and delivered text).
//!
//! Run: `cargo bench -p burncloud-adaptors --bench convert`.

use burncloud_adaptors::{Protocol, ResponseMeta, StreamConverter};
use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, black_box, criterion_group, criterion_main};

/// Text deltas per stream; each is one SSE event of a few tokens, like a real model stream.
const DELTAS: usize = 500;

fn openai_stream() -> Vec<Vec<u8>> {
    let mut events = Vec::with_capacity(DELTAS + 4);
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_eb9dce56a8\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
        )
        .into_bytes()
    };
    events.push(chunk(r#"{"role":"assistant","content":"","refusal":null}"#, "null"));
    for i in 0..DELTAS {
        events.push(chunk(&format!(r#"{{"content":" word{i} and"}}"#), "null"));
    }
    events.push(chunk("{}", r#""stop""#));
    events.push(
        br#"data: {"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":1200,"completion_tokens":1500,"total_tokens":2700,"prompt_tokens_details":{"cached_tokens":1024}}}

"#
        .to_vec(),
    );
    events.push(b"data: [DONE]\n\n".to_vec());
    events
}

fn anthropic_stream() -> Vec<Vec<u8>> {
    let mut events = Vec::with_capacity(DELTAS + 6);
    events.push(br#"event: message_start
data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1200,"cache_read_input_tokens":0,"output_tokens":1}}}

"#.to_vec());
    events.push(
        b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n"
            .to_vec(),
    );
    for i in 0..DELTAS {
        events.push(
            format!(
                "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" word{i} and\"}}}}\n\n"
            )
            .into_bytes(),
        );
    }
    events
        .push(b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n".to_vec());
    events.push(br#"event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":1500}}

"#.to_vec());
    events.push(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_vec());
    events
}

fn bench_stream(c: &mut Criterion, name: &str, upstream: Protocol, client: Protocol, events: &[Vec<u8>]) {
    let meta = ResponseMeta { model: "client-model", id: "bench", created: 1_741_569_952 };
    let mut group = c.benchmark_group("stream_convert");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function(name, |b| {
        b.iter_batched_ref(
            || (StreamConverter::new(upstream, client, &meta, true), BytesMut::with_capacity(256 * 1024)),
            |(conv, out)| {
                for event in events {
                    conv.feed(black_box(event), out);
                }
                conv.finish(out);
                black_box(out.len());
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn stream_conversion(c: &mut Criterion) {
    let openai = openai_stream();
    let anthropic = anthropic_stream();
    bench_stream(c, "openai_to_anthropic", Protocol::OpenAi, Protocol::Anthropic, &openai);
    bench_stream(c, "anthropic_to_openai", Protocol::Anthropic, Protocol::OpenAi, &anthropic);
    bench_stream(c, "openai_passthrough", Protocol::OpenAi, Protocol::OpenAi, &openai);
    bench_stream(c, "anthropic_passthrough", Protocol::Anthropic, Protocol::Anthropic, &anthropic);
}

criterion_group!(benches, stream_conversion);
criterion_main!(benches);
