//! Local token counting (`burncloud_adaptors::tokens::count_text`, o200k for gpt-4o-mini) on 10 KB of
//! English and 10 KB of CJK text: MB/s (the `bytes` runs) and tokens/s (the `tokens` runs, same work
//! measured in tokens). Run: `cargo bench -p burncloud-benches --bench tokens`.

use burncloud_adaptors::tokens::count_text;
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};

const MODEL: &str = "gpt-4o-mini";

const ENGLISH: &str = "A gateway sits between applications and the model providers they call. It checks the \
key each request carries, picks a channel that serves the requested model, forwards the body, and \
bills the tokens the provider reports. When a provider is slow or down, it retries another channel \
and remembers to avoid the failing one for a while. Operators choose a gateway by how little it adds: \
latency, memory per connection, and CPU time per request all matter at ten thousand requests a second. ";

const CJK: &str = "网关位于应用程序与模型提供商之间。它检查每个请求携带的密钥，选择一个提供所请求模型的渠道，\
转发请求体，并按照提供商报告的令牌数量计费。当某个提供商响应缓慢或不可用时，它会重试另一个渠道，\
并在一段时间内避开出错的渠道。运营者根据网关增加的开销来选择：延迟、每个连接的内存以及每个请求的处理器时间都很重要。\
ゲートウェイはアプリケーションとモデル提供者の間にあります。키를 확인하고 채널을 선택합니다。";

/// About `size` bytes of `base` repeated, each copy numbered so the text does not repeat exactly.
fn text_of(base: &str, size: usize) -> String {
    let mut out = String::with_capacity(size + base.len());
    let mut i = 0;
    while out.len() < size {
        out.push_str(&format!("{i}. "));
        out.push_str(base);
        i += 1;
    }
    out
}

fn tokens(c: &mut Criterion) {
    let mut g = c.benchmark_group("count_text_10kb");
    for (name, base) in [("english", ENGLISH), ("cjk", CJK)] {
        let text = text_of(base, 10 * 1024);
        let n = count_text(MODEL, &text);
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(format!("{name}_bytes"), |b| b.iter(|| count_text(MODEL, black_box(&text))));
        g.throughput(Throughput::Elements(u64::from(n)));
        g.bench_function(format!("{name}_tokens_{n}"), |b| b.iter(|| count_text(MODEL, black_box(&text))));
    }
    g.finish();
}

criterion_group!(benches, tokens);
criterion_main!(benches);
