//! The per-request accounting cost of billing, part by part and together, as the relay pays it
//! (`runtime/src/relay.rs` `admit` / `estimate_prompt` / `settle`, `runtime/src/billing/`):
//!
//! - `billing_price`: `PriceTable::price` (hit, and the miss an unpriced model takes in self-use
//!   mode), `Price::pre_deduction`, `Price::quota_cached`, and the three together.
//! - `billing_estimate`: the prompt estimate of `relay::estimate_prompt`, replicated with the public
//!   adaptors API (`convert::decode_request` + `tokens::count_chat_prompt` + inline images +
//!   `max_tokens`), for the load harness's request, a small chat request and a 10 KB one; each part
//!   on its own, and `openai::request_info` (the relay's step 2, which already parsed the body once)
//!   for comparison; and two cheaper alternatives (`alt_*`): one encode call over the whole prompt
//!   text, and a byte-length bound with no tokenizer.
//! - `billing_lease`: `LeaseBook::pre_deduct` + `LeaseBook::settle` on a warm lease (heartbeat
//!   acknowledged, funded by a `ModelLedger`), for the user alone (an unlimited key, as the harness
//!   uses) and for user + key; the same shaped like `billing::Leases` (account list and hold `Vec`s,
//!   clock reads, heartbeat sync); and with the lease sized so that it runs out every N requests, when
//!   the pump's calls (the take, and any report due) are applied to the `ModelLedger` and answered.
//! - `billing_rpm`: `RateShare::spend` for RPM: bare, shaped like `billing::RateLimits` (map entry +
//!   wall clock), and with a ledger grant (`RateWindow::take`) every batch.
//! - `billing_per_request`: everything a priced request adds (price, estimate, pre-deduction,
//!   settlement, quota), next to what an unpriced request in self-use mode does (the price miss).
//!
//! The ledger round trip here is the in-memory `ModelLedger`; the gateway's goes through the ledger
//! thread (a channel hop each way) to Redis or the embedded ledger (an fsync per call), which is
//! not measured here. Run: `cargo bench -p burncloud-benches --bench billing`.

// Bench code: a setup that does not hold is a broken benchmark, and says so by panicking.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::rc::Rc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use burncloud_adaptors::convert::decode_request;
use burncloud_adaptors::openai::request_info;
use burncloud_adaptors::{Protocol, RequestOptions, tokens, vision};
use burncloud_core::lease::{
    Account, Funding, HolderId, InstanceId, LeaseBook, LeasePolicy, Ledger, Millis, ModelLedger, NotAdmitted,
    PreDeduction,
};
use burncloud_core::pricing::{self, Price, PriceTable};
use burncloud_core::ratelimit::{RateKey, RateKind, RateShare, RateWindow, SharePolicy};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const MODEL: &str = "gpt-4o-mini";
/// The option's default: the completion a request without `max_tokens` is pre-deducted for.
const PRE_DEDUCT_MAX_TOKENS: i64 = 1024;
/// The mock upstream's usage (`burncloud-mock` defaults), as settled.
const USAGE: (i64, i64, i64) = (10, 0, 20);
const USER: Account = Account::User(1);
const KEY: Account = Account::Key(10);

/// The load harness's request body (benches/src/bin/burncloud-load.rs).
const HARNESS_BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence."}]}"#;

fn chat_body(turns: usize) -> String {
    let mut messages = vec![r#"{"role":"system","content":"You are a helpful assistant."}"#.to_string()];
    for i in 0..turns {
        messages.push(format!(
            r#"{{"role":"user","content":"Question {i}: explain how a gateway routes a request to a channel, in two sentences."}},{{"role":"assistant","content":"A gateway authenticates the key, picks a channel serving the model by priority and weight, and forwards the body. It then bills the usage the upstream reports."}}"#
        ));
    }
    messages.push(
        r#"{"role":"user","content":"Now summarise the above for an operator in one paragraph."}"#
            .to_string(),
    );
    format!(
        r#"{{"model":"gpt-4o-mini","messages":[{}],"temperature":0.7,"max_tokens":256}}"#,
        messages.join(",")
    )
}

/// A chat body of at least `size` bytes.
fn chat_body_of(size: usize) -> String {
    (0..).map(chat_body).find(|b| b.len() >= size).unwrap_or_default()
}

fn bodies() -> Vec<(&'static str, String)> {
    vec![("harness", HARNESS_BODY.to_string()), ("small", chat_body(0)), ("10kb", chat_body_of(10 * 1024))]
}

fn table() -> PriceTable {
    PriceTable {
        model_ratio: pricing::default_model_ratios(),
        completion_ratio: pricing::default_completion_ratios(),
        group_ratio: [("default".to_string(), 1.0), ("vip".to_string(), 0.8)].into_iter().collect(),
        model_price: HashMap::new(),
        cache_ratio: pricing::default_cache_ratios(),
    }
}

/// The prompt estimate, as `relay::estimate_prompt` makes it for a chat endpoint.
struct Estimate {
    prompt_tokens: i64,
    max_tokens: Option<i64>,
}

fn estimate_prompt(protocol: Protocol, model: &str, stream: bool, body: &[u8]) -> Estimate {
    let opts = RequestOptions { stream: Some(stream), ..RequestOptions::default() };
    match decode_request(protocol, body, &opts) {
        Ok(request) => {
            let images: i64 = request
                .images()
                .filter_map(|image| vision::inline_image_tokens(protocol, image))
                .map(i64::from)
                .sum();
            Estimate {
                prompt_tokens: i64::from(tokens::count_chat_prompt(model, &request)) + images,
                max_tokens: request.max_tokens.map(i64::from),
            }
        }
        Err(_) => Estimate {
            prompt_tokens: i64::from(tokens::count_text(model, &String::from_utf8_lossy(body))),
            max_tokens: None,
        },
    }
}

fn price_group(c: &mut Criterion) {
    let table = table();
    let price = table.price(MODEL, "default").unwrap();
    let (prompt, cached, completion) = USAGE;
    let mut g = c.benchmark_group("billing_price");
    g.bench_function("price_lookup", |b| b.iter(|| table.price(black_box(MODEL), black_box("default"))));
    g.bench_function("price_lookup_miss_self_use", |b| {
        b.iter(|| table.price(black_box("bench-free"), black_box("default")))
    });
    g.bench_function("pre_deduction", |b| {
        b.iter(|| black_box(price).pre_deduction(black_box(16), None, PRE_DEDUCT_MAX_TOKENS))
    });
    g.bench_function("quota_cached", |b| {
        b.iter(|| black_box(price).quota_cached(black_box(prompt), black_box(cached), black_box(completion)))
    });
    g.bench_function("price_pre_deduction_quota", |b| {
        b.iter(|| {
            let p = table.price(black_box(MODEL), black_box("default"))?;
            let pre = p.pre_deduction(black_box(16), None, PRE_DEDUCT_MAX_TOKENS);
            Some(pre + p.quota_cached(black_box(prompt), black_box(cached), black_box(completion)))
        })
    });
    g.finish();
}

fn estimate_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("billing_estimate");
    for (name, body) in bodies() {
        let body = body.as_bytes();
        let opts = RequestOptions { stream: Some(false), ..RequestOptions::default() };
        let decoded = decode_request(Protocol::OpenAi, body, &opts).unwrap();
        let n = tokens::count_chat_prompt(MODEL, &decoded);
        g.throughput(Throughput::Bytes(body.len() as u64));
        let tag = format!("{name}_{}b_{n}tok", body.len());
        g.bench_function(format!("request_info/{tag}"), |b| b.iter(|| request_info(black_box(body))));
        g.bench_function(format!("decode_request/{tag}"), |b| {
            b.iter(|| decode_request(Protocol::OpenAi, black_box(body), &opts))
        });
        g.bench_function(format!("count_chat_prompt/{tag}"), |b| {
            b.iter(|| tokens::count_chat_prompt(MODEL, black_box(&decoded)))
        });
        // Alternatives for the runtime: one encode call over the prompt's text (no per-message
        // calls; framing added as constants), and a byte-length bound (no tokenizer).
        g.bench_function(format!("alt_count_prompt_text_once/{tag}"), |b| {
            b.iter(|| {
                let text = black_box(&decoded).prompt_text();
                tokens::count_text(MODEL, &text) + 3 * (decoded.messages.len() as u32 + 2)
            })
        });
        g.bench_function(format!("alt_decode_and_byte_bound/{tag}"), |b| {
            b.iter(|| {
                let r = decode_request(Protocol::OpenAi, black_box(body), &opts).unwrap();
                r.prompt_text().len() + 4 * (r.messages.len() + 2)
            })
        });
        g.bench_function(format!("estimate_prompt/{tag}"), |b| {
            b.iter(|| estimate_prompt(Protocol::OpenAi, MODEL, false, black_box(body)).prompt_tokens)
        });
    }
    g.finish();
}

/// A worker's book with a warm lease on every account of `accounts`: the instance's heartbeat
/// acknowledged, each account opened at `ledger` with `funds` and a first refill taken.
fn warm_book(policy: LeasePolicy, accounts: &[Account], now: Millis) -> (LeaseBook, ModelLedger) {
    let instance = InstanceId(7);
    let mut ledger = ModelLedger::default();
    ledger.heartbeat(instance, now).unwrap();
    let funds = 1_000_000_000_000_000;
    for a in accounts {
        ledger.open(*a, Funding { remaining: funds, total: funds, version: 1 }).unwrap();
    }
    let mut book = LeaseBook::new(HolderId { instance, worker: 0 }, policy);
    book.heartbeat_acked(now);
    for a in accounts {
        assert!(matches!(book.pre_deduct(*a, 1, now), Err(NotAdmitted::NeedRefill(_))));
    }
    pump(&mut book, &mut ledger, now);
    (book, ledger)
}

/// Sends every call the book says is due to the ledger and hands back the answers, until none is due
/// (what the worker's pump and the ledger thread do, without the thread hop and the I/O).
fn pump(book: &mut LeaseBook, ledger: &mut ModelLedger, now: Millis) -> usize {
    let mut sent = 0;
    loop {
        let calls = book.next_calls(now);
        if calls.is_empty() {
            return sent;
        }
        for call in calls {
            let reply = call.apply(ledger);
            book.on_reply(call.id, reply);
            sent += 1;
        }
    }
}

/// A monotonic millisecond clock, as the ledger status keeps it (`Instant::elapsed`).
struct Clock(Instant);

impl Clock {
    fn now(&self) -> Millis {
        Millis::try_from(self.0.elapsed().as_millis()).unwrap_or(Millis::MAX)
    }
}

/// One request's pre-deduction and settlement on every account, against a warm lease; on a short
/// lease the pump's calls are answered by the ledger and the pre-deduction retried.
fn request_on_book(
    book: &mut LeaseBook,
    ledger: &mut ModelLedger,
    accounts: &[Account],
    pre: i64,
    actual: i64,
    now: Millis,
) -> usize {
    let mut refills = 0;
    let mut held: [Option<PreDeduction>; 2] = [None, None];
    for (slot, a) in held.iter_mut().zip(accounts) {
        let taken = match book.pre_deduct(*a, pre, now) {
            Ok(p) => p,
            Err(_) => {
                refills += pump(book, ledger, now);
                book.pre_deduct(*a, pre, now).unwrap()
            }
        };
        *slot = Some(taken);
    }
    for p in held.into_iter().flatten() {
        book.settle(p, actual, now);
    }
    refills
}

fn lease_group(c: &mut Criterion) {
    let price = table().price(MODEL, "default").unwrap();
    let pre = price.pre_deduction(16, None, PRE_DEDUCT_MAX_TOKENS);
    let actual = price.quota_cached(USAGE.0, USAGE.1, USAGE.2);
    let clock = Clock(Instant::now());
    // The gateway's policy: the defaults with validity = TTL / 3 (30 s / 3).
    let policy = LeasePolicy { validity: 10_000, ..LeasePolicy::default() };
    let mut g = c.benchmark_group("billing_lease");
    for (name, accounts) in [("user", &[USER][..]), ("user_and_key", &[USER, KEY][..])] {
        let (mut book, mut ledger) = warm_book(policy, accounts, clock.now());
        let mut i = 0u64;
        g.bench_function(format!("pre_deduct_settle/{name}"), |b| {
            b.iter(|| {
                let now = clock.now();
                i += 1;
                if i.is_multiple_of(4096) {
                    // The ledger thread's heartbeats keep the book confirmed; the pump's reports.
                    book.heartbeat_acked(now);
                    pump(&mut book, &mut ledger, now);
                }
                request_on_book(&mut book, &mut ledger, accounts, black_box(pre), black_box(actual), now)
            })
        });
    }
    // As `billing::Billing::admit` + `Hold::take` + `Leases::pre_deduct` / `settle` do it: an account
    // list and a hold `Vec` per request, the book in a `RefCell` behind an `Rc`, the heartbeat
    // acknowledgement synced into the book and the clock read at every step.
    {
        let (book, ledger) = warm_book(policy, &[USER], clock.now());
        let book = Rc::new(std::cell::RefCell::new(book));
        let ledger = std::cell::RefCell::new(ledger);
        let acked = std::sync::atomic::AtomicI64::new(clock.now());
        let mut i = 0u64;
        g.bench_function("runtime_shaped/user", |b| {
            b.iter(|| {
                i += 1;
                if i.is_multiple_of(4096) {
                    let now = clock.now();
                    acked.store(now, std::sync::atomic::Ordering::Release);
                    pump(&mut book.borrow_mut(), &mut ledger.borrow_mut(), now);
                }
                let accounts = vec![USER];
                let holder = book.clone();
                let mut parts = Vec::with_capacity(accounts.len());
                for a in &accounts {
                    let deadline = Instant::now() + std::time::Duration::from_secs(3);
                    let at = acked.load(std::sync::atomic::Ordering::Acquire);
                    book.borrow_mut().heartbeat_acked(at);
                    let taken = book.borrow_mut().pre_deduct(*a, black_box(pre), clock.now());
                    black_box(deadline.saturating_duration_since(Instant::now()));
                    let taken = match taken {
                        Ok(p) => p,
                        Err(_) => {
                            let now = clock.now();
                            pump(&mut book.borrow_mut(), &mut ledger.borrow_mut(), now);
                            book.borrow_mut().pre_deduct(*a, pre, now).unwrap()
                        }
                    };
                    parts.push(taken);
                }
                for p in parts {
                    holder.borrow_mut().settle(p, black_box(actual), clock.now());
                }
            })
        });
    }
    // A lease that runs out every `n` requests (min_lease = max_lease = n × the request's cost; `n`
    // at least pre-deduction / cost, or the pump gives the oversized part of each grant back): each
    // refill is a take (and any report due) applied to the ledger and answered.
    for n in [100i64, 1000, 10_000] {
        let lease = n * actual;
        let small = LeasePolicy { min_lease: lease, max_lease: lease, ..policy };
        let (mut book, mut ledger) = warm_book(small, &[USER], clock.now());
        let mut i = 0u64;
        g.bench_function(format!("pre_deduct_settle_refill_every/{n}"), |b| {
            b.iter(|| {
                let now = clock.now();
                i += 1;
                if i.is_multiple_of(4096) {
                    book.heartbeat_acked(now);
                }
                request_on_book(&mut book, &mut ledger, &[USER], black_box(pre), black_box(actual), now)
            })
        });
    }
    g.finish();
}

fn wall_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
        .unwrap_or(0)
}

fn rpm_group(c: &mut Criterion) {
    let policy = SharePolicy::default();
    let key = RateKey { token: 10, kind: RateKind::Requests };
    let mut g = c.benchmark_group("billing_rpm");
    // A share that always holds permits: refilled outside the measured path when it runs dry.
    let limit = 1_000_000_000;
    let mut share = RateShare::default();
    let now = wall_ms();
    share.granted(limit, now.div_euclid(policy.window), now, &policy);
    g.bench_function("rate_share_spend", |b| {
        b.iter(|| {
            if share.spend(1, black_box(limit), now, &policy).is_err() {
                share.granted(limit, now.div_euclid(policy.window), now, &policy);
            }
        })
    });
    // As `billing::RateLimits::admit` does it: the share from a map by key, the wall clock read.
    let mut shares: HashMap<RateKey, RateShare> = HashMap::new();
    let mut window = RateWindow::default();
    g.bench_function("runtime_shaped", |b| {
        b.iter(|| {
            let spent = shares.entry(black_box(key)).or_default().spend(1, limit, wall_ms(), &policy);
            if let Err(need) = spent {
                let mut grant = window.take(wall_ms(), need.want, limit, policy.window);
                if grant.granted < need.want {
                    window = RateWindow::default();
                    grant = window.take(wall_ms(), need.want, limit, policy.window);
                }
                shares.entry(key).or_default().granted(grant.granted, need.index, wall_ms(), &policy);
            }
        })
    });
    // A key limited to 32,000 RPM takes a batch of 1,000 permits at a time from the ledger's window
    // (the window is renewed when exhausted, so that the measurement never hits the limit).
    let limit = 32_000;
    let mut share = RateShare::default();
    let mut window = RateWindow::default();
    g.bench_function("grant_every_1000", |b| {
        b.iter(|| {
            let now = wall_ms();
            if let Err(need) = share.spend(1, black_box(limit), now, &policy) {
                let mut grant = window.take(now, need.want, limit, policy.window);
                if grant.granted < need.want {
                    window = RateWindow::default();
                    grant = window.take(now, need.want, limit, policy.window);
                }
                share.granted(grant.granted, need.index, now, &policy);
                share.spend(1, limit, now, &policy).unwrap();
            }
        })
    });
    g.finish();
}

/// Everything billing adds to one request, and what an unpriced request in self-use mode does.
fn per_request_group(c: &mut Criterion) {
    let table = table();
    let clock = Clock(Instant::now());
    let policy = LeasePolicy { validity: 10_000, ..LeasePolicy::default() };
    let mut g = c.benchmark_group("billing_per_request");
    for (name, body) in bodies() {
        let body = body.into_bytes();
        let (mut book, mut ledger) = warm_book(policy, &[USER], clock.now());
        let mut i = 0u64;
        g.bench_function(format!("billing_on/{name}_{}b", body.len()), |b| {
            b.iter(|| {
                let now = clock.now();
                i += 1;
                if i.is_multiple_of(4096) {
                    book.heartbeat_acked(now);
                    pump(&mut book, &mut ledger, now);
                }
                let price = table.price(black_box(MODEL), "default").unwrap();
                let est = estimate_prompt(Protocol::OpenAi, MODEL, false, black_box(&body));
                let pre = price.pre_deduction(est.prompt_tokens, est.max_tokens, PRE_DEDUCT_MAX_TOKENS);
                let held = match book.pre_deduct(USER, pre, now) {
                    Ok(p) => p,
                    Err(_) => {
                        pump(&mut book, &mut ledger, now);
                        book.pre_deduct(USER, pre, now).unwrap()
                    }
                };
                let quota = price.quota_cached(USAGE.0, USAGE.1, USAGE.2);
                book.settle(held, quota, now);
                quota
            })
        });
    }
    g.bench_function("billing_off_self_use", |b| {
        b.iter(|| table.price(black_box("bench-free"), "default").map_or(0, |p: Price| p.quota(10, 20)))
    });
    g.finish();
}

/// The first count loads the encoding: a one-time cost per process, measured once and printed.
fn first_use() {
    let started = Instant::now();
    let n = tokens::count_text(MODEL, "hello");
    eprintln!(
        "o200k encoding: first count ({n} tokens) took {:.1} ms (loading the tables)",
        started.elapsed().as_secs_f64() * 1e3
    );
}

fn all(c: &mut Criterion) {
    first_use();
    price_group(c);
    estimate_group(c);
    lease_group(c);
    rpm_group(c);
    per_request_group(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
