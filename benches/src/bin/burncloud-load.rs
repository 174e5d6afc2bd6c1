//! `burncloud-load`: the load harness. See benches/README.md.
//!
//! Starts the mock upstream, BurnCloud (auth, routing, billing and logging on), nginx `proxy_pass` and,
//! where installed, the LiteLLM proxy and the Portkey gateway, all against the same mock; then, system
//! by system and alternating, measures (`burncloud_nobill` is the same gateway process, asked for an
//! unpriced model in self-use mode: no pricing, prompt estimate or pre-deduction; phases 1 and 2):
//!
//! 1. maximum requests/s (wrk, or the built-in closed-loop generator without wrk) at each connection
//!    count, with CPU µs per request and RSS;
//! 2. latency p50/p99/p99.9 at fixed rates (fractions of nginx's maximum), open loop, from the scheduled
//!    send time; then (2b) BurnCloud's failover latency: at the first fixed rate, alternating, a model
//!    whose first channel refuses connections (every request fails over to the second) against one
//!    served by its only channel;
//! 3. concurrent streams (1,000 by default, 60 ms between events): time to first byte, inter-event
//!    delays, peak RSS;
//! 4. RSS per idle keep-alive connection (10,000 by default).
//!
//! Writes the JSON report (benches/results/latest.json), a markdown table next to it (.md), a chart
//! (.png), and prints the table.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burncloud_benches::chart::{self, Bar, Panel};
use burncloud_benches::client;
use burncloud_benches::loadgen::{self, RunResult, StreamResult};
use burncloud_benches::peers::{self, Peer};
use burncloud_benches::procs::{self, Proc};
use burncloud_benches::wrk::{self, WrkResult};
use serde_json::{Map, Value, json};

const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef";
const BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence."}]}"#;
const STREAM_BODY: &str = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello in one short sentence."}]}"#;
/// The priced model BurnCloud serves (ratios shipped by default), and the unpriced one it serves for
/// `burncloud_nobill` with `SelfUseModeEnabled` (the relay then skips pricing, the prompt estimate and
/// the pre-deduction; authentication, routing and logging stay on).
const PRICED_MODEL: &str = "gpt-4o-mini";
const FREE_MODEL: &str = "bench-free";
/// An unpriced model served by two channels: the first (higher priority) refuses connections, the
/// second is the mock; with cooldowns out of the way every request fails over (phase 2b).
const FAILOVER_MODEL: &str = "bench-failover";
const ALL_SYSTEMS: [&str; 6] = ["direct", "burncloud", "burncloud_nobill", "nginx", "litellm", "portkey"];
/// Systems measured only for throughput and latency: the same process as another one, whose memory
/// and streams are that one's.
const SAME_PROCESS: [&str; 1] = ["burncloud_nobill"];
const PEERS: [&str; 2] = ["litellm", "portkey"];

struct Options {
    duration: Duration,
    rounds: u32,
    connections: Vec<u32>,
    rate_duration: Duration,
    rate_fractions: Vec<f64>,
    rate_connections: usize,
    idle_connections: usize,
    streams: usize,
    peer_streams: usize,
    chunks: usize,
    chunk_gap_ms: u64,
    warmup: Duration,
    bin_dir: PathBuf,
    out: PathBuf,
    systems: Vec<String>,
    install_peers: bool,
    peer_dir: PathBuf,
    profile: Option<PathBuf>,
    /// perf's `--call-graph` mode (`fp`, `dwarf`, `lbr`).
    call_graph: String,
    /// The commit the gateway binaries were built from, when not this checkout's (`--bin-dir`).
    burncloud_commit: Option<String>,
    smoke: bool,
    pin: bool,
}

fn main() -> ExitCode {
    match parse_args().and_then(|o| run(&o)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("burncloud-load: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str =
    "usage: burncloud-load [--smoke] [--install-peers] [--systems direct,burncloud,burncloud_nobill,nginx,litellm,portkey]
  [--duration S] [--rounds N] [--connections 64,256] [--rate-duration S] [--rates 0.25,0.5,0.8]
  [--idle-connections N] [--streams N] [--peer-streams N] [--chunks N] [--chunk-gap-ms MS]
  [--bin-dir DIR] [--out FILE.json] [--peer-dir DIR] [--profile FILE.perf]
  [--call-graph fp|dwarf] [--burncloud-commit REV] [--no-pin]";

fn parse_args() -> Result<Options, String> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().map_or_else(|| manifest.join(".."), Path::to_path_buf);
    let mut o = Options {
        duration: Duration::from_secs(10),
        rounds: 2,
        connections: vec![64, 256],
        rate_duration: Duration::from_secs(10),
        rate_fractions: vec![0.25, 0.5, 0.8],
        rate_connections: 64,
        idle_connections: 10_000,
        streams: 1000,
        peer_streams: 100,
        chunks: 20,
        chunk_gap_ms: 60,
        warmup: Duration::from_secs(2),
        bin_dir: root.join("target/release"),
        out: root.join("benches/results/latest.json"),
        systems: ALL_SYSTEMS.iter().map(|s| s.to_string()).collect(),
        install_peers: false,
        peer_dir: peers::cache_dir(),
        profile: None,
        call_graph: "fp".into(),
        burncloud_commit: None,
        smoke: false,
        pin: true,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut systems_set = false;
    // --smoke first, so explicit flags override its settings whatever their order.
    if args.iter().any(|a| a == "--smoke") {
        o.smoke = true;
        o.duration = Duration::from_secs(1);
        o.rounds = 1;
        o.connections = vec![8, 32];
        o.rate_duration = Duration::from_secs(1);
        o.rate_connections = 8;
        o.idle_connections = 200;
        o.streams = 20;
        o.peer_streams = 5;
        o.chunks = 3;
        o.chunk_gap_ms = 20;
        o.warmup = Duration::from_millis(0);
        o.out = std::env::temp_dir().join("burncloud-load-smoke/latest.json");
    }
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value\n{USAGE}"));
        let num = |v: String, what: &str| v.parse::<u64>().map_err(|_| format!("{what}: a number, not {v}"));
        match a.as_str() {
            "--smoke" => {}
            "--install-peers" => o.install_peers = true,
            "--no-pin" => o.pin = false,
            "--duration" => o.duration = Duration::from_secs(num(val()?, "--duration")?.max(1)),
            "--rounds" => o.rounds = num(val()?, "--rounds")?.max(1) as u32,
            "--connections" => {
                o.connections = val()?
                    .split(',')
                    .map(|c| c.trim().parse::<u32>().map_err(|_| format!("--connections: {c}")))
                    .collect::<Result<_, _>>()?
            }
            "--rate-duration" => {
                o.rate_duration = Duration::from_secs(num(val()?, "--rate-duration")?.max(1))
            }
            "--rates" => {
                o.rate_fractions = val()?
                    .split(',')
                    .map(|c| c.trim().parse::<f64>().map_err(|_| format!("--rates: {c}")))
                    .collect::<Result<_, _>>()?
            }
            "--idle-connections" => o.idle_connections = num(val()?, "--idle-connections")? as usize,
            "--streams" => o.streams = num(val()?, "--streams")? as usize,
            "--peer-streams" => o.peer_streams = num(val()?, "--peer-streams")? as usize,
            "--chunks" => o.chunks = num(val()?, "--chunks")?.max(1) as usize,
            "--chunk-gap-ms" => o.chunk_gap_ms = num(val()?, "--chunk-gap-ms")?,
            "--bin-dir" => o.bin_dir = PathBuf::from(val()?),
            "--out" => o.out = PathBuf::from(val()?),
            "--peer-dir" => o.peer_dir = PathBuf::from(val()?),
            "--profile" => o.profile = Some(PathBuf::from(val()?)),
            "--call-graph" => o.call_graph = val()?,
            "--burncloud-commit" => o.burncloud_commit = Some(val()?),
            "--systems" => {
                o.systems = val()?.split(',').map(|s| s.trim().to_string()).collect();
                systems_set = true;
            }
            "--help" | "-h" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if o.smoke && !systems_set {
        // The smoke run stays within seconds: the slow peers run only when asked for.
        o.systems = vec!["direct".into(), "burncloud".into(), "burncloud_nobill".into(), "nginx".into()];
    }
    if let Some(s) = o.systems.iter().find(|s| !ALL_SYSTEMS.contains(&s.as_str())) {
        return Err(format!("unknown system {s}; known: {}", ALL_SYSTEMS.join(",")));
    }
    Ok(o)
}

/// CPU layout: on two or more cores the system under test gets core 0; the harness (its load
/// generators), wrk and the mock share core 1.
struct Layout {
    sut: Option<usize>,
    load: Option<usize>,
    note: String,
}

fn layout(pin: bool) -> Layout {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if pin && cores >= 2 && procs::pin_self(1) {
        Layout {
            sut: Some(0),
            load: Some(1),
            note: "system under test pinned to cpu 0; load generators and mock pinned to cpu 1".into(),
        }
    } else {
        Layout {
            sut: None,
            load: None,
            note: format!("not pinned ({cores} core(s), --no-pin, or no taskset)"),
        }
    }
}

/// One system the harness drives.
struct Target {
    name: &'static str,
    sock: SocketAddr,
    /// The process whose CPU and RSS count (with its descendants).
    pid: Option<u32>,
    request: Arc<Vec<u8>>,
    stream_request: Arc<Vec<u8>>,
    wrk_script: PathBuf,
    url: String,
    is_peer: bool,
}

/// Everything measured about one system.
#[derive(Default)]
struct Measured {
    max: BTreeMap<u32, Vec<(WrkResult, Option<f64>)>>,
    loaded_rss: Option<u64>,
    idle_rss: Option<u64>,
    /// (fraction of the base rate, result, CPU µs per request answered)
    fixed: Vec<(f64, RunResult, Option<f64>)>,
    fixed_note: Option<String>,
    idle: Option<Value>,
    streams: Option<StreamResult>,
    stream_rss_before: Option<u64>,
    errors: Vec<String>,
}

fn run(o: &Options) -> Result<(), String> {
    let started = Instant::now();
    let lay = layout(o.pin);
    let nofile = procs::raise_nofile();
    let scratch = std::env::temp_dir().join(format!("burncloud-load-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let wants = |s: &str| o.systems.iter().any(|x| x == s);

    let mut install_notes = BTreeMap::new();
    if o.install_peers {
        eprintln!("installing peers into {} (LiteLLM takes about a minute)…", o.peer_dir.display());
        for (name, r) in peers::install(&o.peer_dir) {
            if let Err(e) = &r {
                eprintln!("install {name}: {e}");
            }
            install_notes.insert(name, r.err());
        }
    }

    let mock_bin = o.bin_dir.join("burncloud-mock");
    let gw_bin = o.bin_dir.join("burncloud");
    for b in [&mock_bin, &gw_bin] {
        if !b.exists() {
            return Err(format!(
                "{} is missing: build with `cargo build --release -p burncloud-runtime --bin burncloud -p burncloud-tests --bin burncloud-mock` first",
                b.display()
            ));
        }
    }

    let mut mock_cmd = peers::pinned(lay.load, &mock_bin);
    mock_cmd.args(["--listen", "127.0.0.1:0", "--workers", "1", "--chunks"]).arg(o.chunks.to_string());
    mock_cmd.arg("--chunk-gap-ms").arg(o.chunk_gap_ms.to_string());
    let (mut mock, mock_addr) = Proc::start_with_line("mock", mock_cmd, "listening on")?;

    let gw_port = procs::free_port()?;
    let gw_addr = format!("127.0.0.1:{gw_port}");
    let mut gw_cmd = peers::pinned(lay.sut, &gw_bin);
    gw_cmd
        .env("BURNCLOUD_LISTEN", &gw_addr)
        .env("BURNCLOUD_WORKERS", "1")
        .env("BURNCLOUD_PIN_WORKERS", "false")
        .env("BURNCLOUD_ADMIN_KEY", ADMIN_KEY)
        .env("BURNCLOUD_LOG", "warn")
        .env("BURNCLOUD_DATABASE_URL", format!("sqlite://{}", scratch.join("bench.db").display()));
    let (mut gateway, _) = Proc::start_with_line("burncloud", gw_cmd, "listening on")?;
    let key = provision(&gw_addr, &mock_addr)?;

    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    let mut running: Vec<(&'static str, Peer)> = Vec::new();
    for name in ["nginx", "litellm", "portkey"] {
        if !wants(name) {
            continue;
        }
        eprintln!("starting {name}…");
        let started = match name {
            "nginx" => peers::start_nginx(&scratch, &mock_addr, lay.sut, nofile),
            "litellm" => peers::start_litellm(&o.peer_dir, &scratch, &mock_addr, lay.sut),
            _ => peers::start_portkey(&o.peer_dir, &scratch, &mock_addr, lay.sut),
        };
        match started {
            Ok(p) => running.push((name, p)),
            Err(e) => {
                eprintln!("{name}: {e}");
                errors.insert(name.to_string(), e);
            }
        }
    }

    let use_wrk = wrk::available();
    let mut targets: Vec<Target> = Vec::new();
    let bc_headers = vec![
        ("Content-Type".to_string(), "application/json".to_string()),
        ("Authorization".to_string(), format!("Bearer {key}")),
    ];
    for name in ALL_SYSTEMS {
        if !wants(name) {
            continue;
        }
        let (addr, pid, headers, prefix) = match name {
            "direct" => (mock_addr.clone(), Some(mock.pid()), bc_headers.clone(), String::new()),
            "burncloud" | "burncloud_nobill" => {
                (gw_addr.clone(), Some(gateway.pid()), bc_headers.clone(), String::new())
            }
            _ => match running.iter().find(|(n, _)| *n == name) {
                Some((_, p)) => {
                    let mut h = vec![("Content-Type".to_string(), "application/json".to_string())];
                    h.extend(p.headers.iter().cloned());
                    if p.headers.is_empty() {
                        h = bc_headers.clone();
                    }
                    (p.addr.clone(), Some(p.proc.pid()), h, p.stream_prefix.clone())
                }
                None => continue,
            },
        };
        let path = "/v1/chat/completions";
        let dir = scratch.join(format!("wrk-{name}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let hdr: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let model = if name == "burncloud_nobill" { FREE_MODEL } else { PRICED_MODEL };
        let body = BODY.replace(PRICED_MODEL, model);
        let stream_body = STREAM_BODY.replace(PRICED_MODEL, model);
        targets.push(Target {
            name,
            sock: client::resolve(&addr).map_err(|e| e.to_string())?,
            pid,
            request: Arc::new(client::request_bytes(&addr, path, &headers, &body)),
            stream_request: Arc::new(client::request_bytes(
                &addr,
                &format!("{prefix}{path}"),
                &headers,
                &stream_body,
            )),
            wrk_script: wrk::script(&dir, &body, &hdr)?,
            url: format!("http://{addr}{path}"),
            is_peer: PEERS.contains(&name),
        });
    }

    // Each target must answer one request before it is measured.
    let mut measured: BTreeMap<&'static str, Measured> = BTreeMap::new();
    targets.retain(|t| {
        let ok = client::Conn::connect(&t.sock, Duration::from_secs(10))
            .and_then(|mut c| c.roundtrip(&t.request))
            .map_err(|e| e.to_string())
            .and_then(|r| if r.status == 200 { Ok(()) } else { Err(format!("answered {}", r.status)) });
        match ok {
            Ok(()) => true,
            Err(e) => {
                errors.insert(t.name.to_string(), format!("first request failed: {e}"));
                false
            }
        }
    });
    for t in targets.iter().filter(|t| !SAME_PROCESS.contains(&t.name)) {
        let m = measured.entry(t.name).or_default();
        m.idle_rss = t.pid.and_then(procs::rss_tree_kib);
    }

    eprintln!(
        "load generator: {}; {}; open files {nofile}",
        if use_wrk { "wrk" } else { "built-in closed loop (wrk not found)" },
        lay.note
    );

    // 1. Maximum throughput, alternating systems round by round.
    let timeout = if o.smoke { Duration::from_secs(5) } else { Duration::from_secs(10) };
    for &conns in &o.connections {
        if !o.warmup.is_zero() {
            for t in &targets {
                let _ = max_run(t, conns, o.warmup, timeout, use_wrk, lay.load);
            }
        }
        for round in 0..o.rounds {
            // Odd rounds go in reverse order, so that neither of two neighbours (burncloud and
            // burncloud_nobill share one process) always runs in the other's wake.
            let order: Vec<&Target> =
                if round % 2 == 1 { targets.iter().rev().collect() } else { targets.iter().collect() };
            for t in order.into_iter().filter(|t| alive(t)) {
                let before = t.pid.and_then(procs::cpu_us);
                match max_run(t, conns, o.duration, timeout, use_wrk, lay.load) {
                    Ok(r) => {
                        let cpu = match (t.pid.and_then(procs::cpu_us), before) {
                            (Some(a), Some(b)) => Some(a.saturating_sub(b) as f64 / r.requests.max(1) as f64),
                            _ => None,
                        };
                        eprintln!(
                            "max c={conns} round {round} {}: {:.0} req/s p50 {:.3} ms p99 {:.3} ms cpu {:.1} µs/req errors {}",
                            t.name,
                            r.rps,
                            r.p50_ms,
                            r.p99_ms,
                            cpu.unwrap_or(0.0),
                            r.errors + r.non_2xx
                        );
                        let m = measured.entry(t.name).or_default();
                        if !SAME_PROCESS.contains(&t.name) {
                            let rss = t.pid.and_then(procs::rss_tree_kib);
                            m.loaded_rss = m.loaded_rss.max(rss);
                        }
                        m.max.entry(conns).or_default().push((r, cpu));
                    }
                    Err(e) => measured.entry(t.name).or_default().errors.push(e),
                }
            }
        }
    }

    // 2. Latency at fixed rates, relative to nginx's maximum (BurnCloud's when nginx is absent).
    let base_conns = o.connections.first().copied().unwrap_or(64);
    let mean_rps = |m: &Measured| {
        let runs = m.max.get(&base_conns)?;
        (!runs.is_empty()).then(|| runs.iter().map(|r| r.0.rps).sum::<f64>() / runs.len() as f64)
    };
    let (base_name, base_rps) = match measured.get("nginx").and_then(mean_rps) {
        Some(r) => ("nginx", Some(r)),
        None => ("burncloud", measured.get("burncloud").and_then(mean_rps)),
    };
    if let Some(base) = base_rps {
        for (i, frac) in o.rate_fractions.iter().enumerate() {
            let rate = base * frac;
            let n = targets.len().max(1);
            for k in 0..n {
                // Rotate the order from rate to rate.
                let Some(t) = targets.get((i + k) % n).filter(|t| alive(t)) else { continue };
                let max = measured.get(t.name).and_then(mean_rps).unwrap_or(0.0);
                if t.is_peer && rate > max * 1.1 {
                    measured.entry(t.name).or_default().fixed_note =
                        Some(format!("not run: the fixed rates exceed its maximum ({max:.0} req/s)"));
                    continue;
                }
                let before = t.pid.and_then(procs::cpu_us);
                let r = loadgen::run(
                    t.sock,
                    t.request.clone(),
                    o.rate_connections,
                    Some(rate),
                    o.rate_duration,
                    Duration::from_secs(5),
                );
                let cpu = match (t.pid.and_then(procs::cpu_us), before) {
                    (Some(a), Some(b)) if r.ok > 0 => Some(a.saturating_sub(b) as f64 / r.ok as f64),
                    _ => None,
                };
                eprintln!(
                    "rate {:.0}% ({rate:.0}/s) {}: {:.0} req/s p50 {:.3} p99 {:.3} p99.9 {:.3} ms cpu {:.1} µs/req errors {} unsent {}",
                    frac * 100.0,
                    t.name,
                    r.rps,
                    r.latency.p50,
                    r.latency.p99,
                    r.latency.p999,
                    cpu.unwrap_or(0.0),
                    r.errors,
                    r.unsent
                );
                measured.entry(t.name).or_default().fixed.push((*frac, r, cpu));
            }
        }
    }

    // 2b. Failover latency under load.
    let failover = match (targets.iter().find(|t| t.name == "burncloud").filter(|t| alive(t)), base_rps) {
        (Some(t), Some(base)) => Some(failover_phase(o, t, &gw_addr, &bc_headers, base)),
        _ => None,
    };

    // 3. Concurrent streams, after one warm-up stream each (one-time costs such as loading a
    //    tokenizer are not the steady state).
    let own_process = |t: &&Target| !SAME_PROCESS.contains(&t.name);
    for t in targets.iter().filter(own_process) {
        let _ = client::Conn::connect(&t.sock, Duration::from_secs(10))
            .and_then(|mut c| c.roundtrip(&t.stream_request));
    }
    for t in targets.iter().filter(own_process).filter(|t| alive(t)) {
        let n = if t.is_peer { o.peer_streams } else { o.streams };
        if n == 0 {
            continue;
        }
        procs::wait(Duration::from_millis(500));
        let before = t.pid.and_then(procs::rss_tree_kib);
        let r = loadgen::streams(t.sock, t.stream_request.clone(), n, Duration::from_secs(30), t.pid);
        measured.entry(t.name).or_default().stream_rss_before = before;
        eprintln!(
            "streams {} × {n}: ok {} ttfb p50 {:.2} p99 {:.2} ms gap p50 {:.2} p99 {:.2} ms events {:.1} rss {:?}",
            t.name, r.ok, r.ttfb.p50, r.ttfb.p99, r.gap.p50, r.gap.p99, r.events, r.peak_rss_kib
        );
        measured.entry(t.name).or_default().streams = Some(r);
    }

    // 4. RSS per idle keep-alive connection (last: the memory it takes is not always given back).
    let idle_n = o.idle_connections.min(nofile.saturating_sub(2000) as usize);
    if idle_n > 0 {
        for t in targets.iter().filter(own_process).filter(|t| t.name != "direct" && alive(t)) {
            let Some(pid) = t.pid else { continue };
            let v = idle_connections(t, pid, idle_n, o.smoke);
            eprintln!("idle {}: {v}", t.name);
            measured.entry(t.name).or_default().idle = Some(v);
        }
    }

    // Optional: profile BurnCloud under load, billing on (FILE) and off (FILE with `-nobill`).
    if let Some(path) = &o.profile {
        for t in targets.iter().filter(|t| t.name.starts_with("burncloud")) {
            let path = match t.name.strip_prefix("burncloud") {
                Some("") | None => path.clone(),
                Some(rest) => {
                    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    let ext =
                        path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
                    path.with_file_name(format!("{stem}{}{ext}", rest.replace('_', "-")))
                }
            };
            profile(&path, &o.call_graph, t, base_conns, timeout, use_wrk, lay.load);
        }
    }

    // A process that ended on its own during the run is reported with how it ended.
    let mut exits: BTreeMap<&str, String> = BTreeMap::new();
    for (name, ended) in [("burncloud", gateway.exited()), ("direct", mock.exited())]
        .into_iter()
        .chain(running.iter_mut().map(|(n, p)| (*n, p.proc.exited())))
    {
        if let Some(e) = ended {
            eprintln!("{name} ended during the run: {e}");
            exits.insert(name, e);
        }
    }
    for (name, e) in &exits {
        measured.entry(name).or_default().errors.push(format!("process {e} during the run"));
    }
    let mut report =
        report(o, &lay, nofile, use_wrk, &targets, &measured, &errors, &install_notes, base_name);
    if let Some(f) = failover {
        for key in ["p50", "p99", "p999"] {
            let over = f[key.to_string() + "_ms"]["failover"]
                .as_f64()
                .zip(f[key.to_string() + "_ms"]["single"].as_f64());
            report["ratios"][format!("burncloud_failover_{key}_overhead_ms")] =
                over.map(|(a, b)| json!(round3(a - b))).unwrap_or(Value::Null);
        }
        report["failover"] = f;
    }
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(&o.out, text + "\n").map_err(|e| format!("write {}: {e}", o.out.display()))?;
    let table = table(&report);
    std::fs::write(o.out.with_extension("md"), &table).map_err(|e| e.to_string())?;
    let png = chart_png(&report);
    std::fs::write(o.out.with_extension("png"), png).map_err(|e| e.to_string())?;
    println!("{table}");
    println!("wrote {} (+ .md, .png) in {:.0} s", o.out.display(), started.elapsed().as_secs_f64());

    for (_, p) in running {
        p.proc.stop();
    }
    gateway.stop();
    mock.stop();
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// Phase 2b: at the first fixed rate, alternating round by round, BurnCloud serving `FAILOVER_MODEL`
/// (its first channel refuses the connection, the second answers) and `FREE_MODEL` (one channel);
/// both unpriced, so the difference is the failed attempt and the retry. Latencies are the means over
/// rounds of each run's percentiles.
fn failover_phase(o: &Options, t: &Target, gw_addr: &str, headers: &[(String, String)], base: f64) -> Value {
    let frac = o.rate_fractions.first().copied().unwrap_or(0.25);
    let rate = base * frac;
    let path = "/v1/chat/completions";
    let single =
        Arc::new(client::request_bytes(gw_addr, path, headers, &BODY.replace(PRICED_MODEL, FREE_MODEL)));
    let over =
        Arc::new(client::request_bytes(gw_addr, path, headers, &BODY.replace(PRICED_MODEL, FAILOVER_MODEL)));
    let mut runs: BTreeMap<&str, Vec<RunResult>> = BTreeMap::new();
    for round in 0..o.rounds.max(1) {
        let order = if round % 2 == 0 {
            [("failover", &over), ("single", &single)]
        } else {
            [("single", &single), ("failover", &over)]
        };
        for (name, req) in order {
            let r = loadgen::run(
                t.sock,
                req.clone(),
                o.rate_connections,
                Some(rate),
                o.rate_duration,
                Duration::from_secs(5),
            );
            eprintln!(
                "failover {name} ({rate:.0}/s) round {round}: {:.0} req/s p50 {:.3} p99 {:.3} p99.9 {:.3} ms errors {} unsent {}",
                r.rps, r.latency.p50, r.latency.p99, r.latency.p999, r.errors, r.unsent
            );
            runs.entry(name).or_default().push(r);
        }
    }
    let stat =
        |name: &str, f: fn(&RunResult) -> f64| mean(runs.get(name).into_iter().flatten().map(f)).map(round3);
    let both =
        |f: fn(&RunResult) -> f64| json!({"failover": stat("failover", f), "single": stat("single", f)});
    json!({
        "rate": round2(rate),
        "fraction_of_max": frac,
        "rounds": o.rounds.max(1),
        "what": format!("{FAILOVER_MODEL}: first channel (priority 10) refuses connections, every request retried on the second (the mock); {FREE_MODEL}: one channel; cooldowns off for the run"),
        "achieved_rps": both(|r| r.rps),
        "p50_ms": both(|r| r.latency.p50),
        "p99_ms": both(|r| r.latency.p99),
        "p999_ms": both(|r| r.latency.p999),
        "errors": both(|r| r.errors as f64),
    })
}

/// Whether a target's process is still running (not exited, not a zombie).
fn alive(t: &Target) -> bool {
    t.pid.is_none_or(procs::running)
}

/// One maximum-throughput run: wrk, or the built-in closed-loop generator.
fn max_run(
    t: &Target,
    conns: u32,
    duration: Duration,
    timeout: Duration,
    use_wrk: bool,
    cpu: Option<usize>,
) -> Result<WrkResult, String> {
    if use_wrk {
        let threads = if conns >= 128 { 2 } else { 1 };
        return wrk::run(&t.url, &t.wrk_script, conns, threads, duration, timeout, cpu)
            .map_err(|e| format!("{}: {e}", t.name));
    }
    let r = loadgen::run(t.sock, t.request.clone(), conns as usize, None, duration, timeout);
    Ok(WrkResult {
        requests: r.ok,
        rps: r.rps,
        p50_ms: r.latency.p50,
        p99_ms: r.latency.p99,
        errors: r.errors,
        non_2xx: 0,
    })
}

/// Opens `n` keep-alive connections (each used once), and reads how much the server's RSS and open
/// sockets grew.
fn idle_connections(t: &Target, pid: u32, n: usize, smoke: bool) -> Value {
    procs::wait(Duration::from_millis(500));
    let rss_before = procs::rss_tree_kib(pid);
    let fds_before = socket_fds(pid);
    let prime = if smoke {
        Duration::from_secs(5)
    } else if t.is_peer {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(40)
    };
    let opened_at = Instant::now();
    let idle =
        loadgen::open_idle(t.sock, t.request.clone(), n, 32, Instant::now() + prime, Duration::from_secs(10));
    let open_s = opened_at.elapsed().as_secs_f64();
    procs::wait(Duration::from_secs(1));
    let rss_after = procs::rss_tree_kib(pid);
    let fds_after = socket_fds(pid);
    let held = idle.conns.len();
    drop(idle.conns);
    procs::wait(Duration::from_millis(500));
    let delta = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    let server_conns = match (fds_before, fds_after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    // Per connection the server still held (it may have closed some: peers time idle ones out).
    let per = match (delta, server_conns) {
        (Some(d), Some(c)) if c > 0 => Some(round2(d as f64 / c as f64)),
        (Some(d), _) if held > 0 => Some(round2(d as f64 / held as f64)),
        _ => None,
    };
    json!({
        "connections": n, "held_by_client": held, "held_by_server": server_conns, "primed": idle.primed,
        "failed": idle.failed, "open_s": round2(open_s), "rss_before_kib": rss_before,
        "rss_after_kib": rss_after, "kib_per_conn": per,
    })
}

/// Open sockets of a process tree, from /proc/PID/fd.
fn socket_fds(pid: u32) -> Option<usize> {
    let mut total = 0;
    for p in std::iter::once(pid).chain(procs::descendants(pid)) {
        let dir = std::fs::read_dir(format!("/proc/{p}/fd")).ok()?;
        total += dir
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .count();
    }
    Some(total)
}

/// `perf record -g` on BurnCloud for 5 s during a throughput run (best effort). The event is
/// `cpu-clock` (a timer, available on VMs without hardware counters).
fn profile(
    path: &Path,
    call_graph: &str,
    t: &Target,
    conns: u32,
    timeout: Duration,
    use_wrk: bool,
    cpu: Option<usize>,
) {
    let Some(pid) = t.pid else { return };
    let perf = Command::new("perf")
        .args(["record", "-e", "cpu-clock", "--call-graph", call_graph, "-F", "999", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(path)
        .args(["--", "sleep", "5"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match perf {
        Ok(mut child) => {
            let _ = max_run(t, conns, Duration::from_secs(7), timeout, use_wrk, cpu);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => procs::wait(Duration::from_millis(100)),
                }
            }
            eprintln!(
                "profile written to {} (perf report -i {} --no-children)",
                path.display(),
                path.display()
            );
        }
        Err(e) => eprintln!("perf not run: {e}"),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = xs.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

#[allow(clippy::too_many_arguments)]
fn report(
    o: &Options,
    lay: &Layout,
    nofile: u64,
    use_wrk: bool,
    targets: &[Target],
    measured: &BTreeMap<&'static str, Measured>,
    errors: &BTreeMap<String, String>,
    install_notes: &BTreeMap<String, Option<String>>,
    base_name: &str,
) -> Value {
    let base_conns = o.connections.first().copied().unwrap_or(64);
    let mut systems = Map::new();
    for name in ALL_SYSTEMS {
        if !o.systems.iter().any(|s| s == name) {
            continue;
        }
        let Some(m) = measured.get(name).filter(|_| targets.iter().any(|t| t.name == name)) else {
            let e = errors.get(name).cloned().unwrap_or_else(|| "not run".into());
            systems.insert(name.into(), json!({ "error": e }));
            continue;
        };
        let mut s = Map::new();
        for (i, (conns, runs)) in m.max.iter().enumerate() {
            let suffix = if i == 0 { String::new() } else { format!("_{conns}") };
            let rps = mean(runs.iter().map(|r| r.0.rps));
            s.insert(format!("rps{suffix}"), json!(rps.map(round2)));
            s.insert(format!("p50_ms{suffix}"), json!(mean(runs.iter().map(|r| r.0.p50_ms)).map(round3)));
            s.insert(format!("p99_ms{suffix}"), json!(mean(runs.iter().map(|r| r.0.p99_ms)).map(round3)));
            s.insert(
                format!("errors{suffix}"),
                json!(runs.iter().map(|r| r.0.errors + r.0.non_2xx).sum::<u64>()),
            );
            s.insert(format!("requests{suffix}"), json!(runs.iter().map(|r| r.0.requests).sum::<u64>()));
        }
        let cpu = m.max.get(&base_conns).and_then(|runs| mean(runs.iter().filter_map(|r| r.1)));
        s.insert("cpu_us_per_req".into(), json!(cpu.map(round2)));
        s.insert("rss_kib".into(), json!(m.loaded_rss));
        s.insert("rss_idle_kib".into(), json!(m.idle_rss));
        if !m.fixed.is_empty() {
            let fixed: Vec<Value> = m
                .fixed
                .iter()
                .map(|(frac, r, cpu)| {
                    json!({
                        "cpu_us_per_req": cpu.map(round2),
                        "fraction_of_max": frac, "rate": round2(r.rate.unwrap_or(0.0)), "achieved_rps": round2(r.rps),
                        "p50_ms": round3(r.latency.p50), "p99_ms": round3(r.latency.p99),
                        "p999_ms": round3(r.latency.p999), "max_ms": round3(r.latency.max),
                        "errors": r.errors, "unsent": r.unsent,
                    })
                })
                .collect();
            s.insert("fixed_rate".into(), json!(fixed));
        } else if let Some(note) = &m.fixed_note {
            s.insert("fixed_rate".into(), json!({ "error": note }));
        }
        if let Some(idle) = &m.idle {
            s.insert("idle_connections".into(), idle.clone());
            s.insert("kib_per_idle_conn".into(), idle["kib_per_conn"].clone());
        }
        if let Some(st) = &m.streams {
            // Timings only from streams that completed; none completed: no timings.
            let t = |v: f64| (st.ok > 0).then(|| round3(v));
            s.insert(
                "streams".into(),
                json!({
                    "streams": st.streams, "ok": st.ok, "events_per_stream": round2(st.events),
                    "ttfb_p50_ms": t(st.ttfb.p50), "ttfb_p99_ms": t(st.ttfb.p99),
                    "gap_p50_ms": t(st.gap.p50), "gap_p99_ms": t(st.gap.p99),
                    "gap_mean_ms": t(st.gap.mean), "gap_max_ms": t(st.gap.max), "rss_kib": st.peak_rss_kib,
                    "rss_before_kib": m.stream_rss_before,
                    "kib_per_stream": st.peak_rss_kib.zip(m.stream_rss_before).filter(|_| st.streams > 0)
                        .map(|(p, b)| round2(p.saturating_sub(b) as f64 / st.streams as f64)),
                    "failure": st.failure,
                }),
            );
        }
        if !m.errors.is_empty() {
            s.insert("run_errors".into(), json!(m.errors));
        }
        systems.insert(name.into(), Value::Object(s));
    }

    let get = |sys: &str, key: &str| systems.get(sys).and_then(|v| v.get(key)).and_then(Value::as_f64);
    let mut ratios = Map::new();
    let mut put = |k: String, v: Option<f64>| {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            ratios.insert(k, json!(round3(v)));
        }
    };
    for other in ["direct", "nginx", "litellm", "portkey"] {
        for (i, conns) in o.connections.iter().enumerate() {
            let key = if i == 0 { "rps".to_string() } else { format!("rps_{conns}") };
            let suffix = if i == 0 { String::new() } else { format!("_{conns}") };
            put(
                format!("burncloud_vs_{other}_rps{suffix}"),
                get("burncloud", &key).zip(get(other, &key)).map(|(b, x)| b / x),
            );
        }
    }
    put(
        "burncloud_vs_nginx_cpu_per_req".into(),
        get("burncloud", "cpu_us_per_req").zip(get("nginx", "cpu_us_per_req")).map(|(b, n)| b / n),
    );
    // Billing on (burncloud) vs off (burncloud_nobill): the same process, alternating.
    for (i, conns) in o.connections.iter().enumerate() {
        let key = if i == 0 { "rps".to_string() } else { format!("rps_{conns}") };
        let suffix = if i == 0 { String::new() } else { format!("_{conns}") };
        put(
            format!("burncloud_billing_on_vs_off_rps{suffix}"),
            get("burncloud", &key).zip(get("burncloud_nobill", &key)).map(|(on, off)| on / off),
        );
    }
    put(
        "burncloud_billing_cpu_us_per_req_delta".into(),
        get("burncloud", "cpu_us_per_req")
            .zip(get("burncloud_nobill", "cpu_us_per_req"))
            .map(|(on, off)| on - off),
    );
    // Round by round (each round runs both within seconds of each other): the spread of the ratio.
    let paired: Vec<f64> = measured
        .get("burncloud")
        .and_then(|on| on.max.get(&base_conns))
        .zip(measured.get("burncloud_nobill").and_then(|off| off.max.get(&base_conns)))
        .map(|(on, off)| on.iter().zip(off).map(|(a, b)| a.0.rps / b.0.rps.max(1e-9)).collect())
        .unwrap_or_default();
    put("burncloud_billing_on_vs_off_rps_min_round".into(), paired.iter().copied().reduce(f64::min));
    put("burncloud_billing_on_vs_off_rps_max_round".into(), paired.iter().copied().reduce(f64::max));
    // At the fixed rates both sustain, CPU per request is the cleaner comparison (no saturation).
    let cpu_at = |sys: &str, frac: f64| {
        measured.get(sys)?.fixed.iter().find(|(f, _, _)| *f == frac).and_then(|(_, _, c)| *c)
    };
    for frac in &o.rate_fractions {
        let pct = (frac * 100.0).round() as u32;
        put(
            format!("burncloud_billing_cpu_us_per_req_delta_at_{pct}pct"),
            cpu_at("burncloud", *frac).zip(cpu_at("burncloud_nobill", *frac)).map(|(on, off)| on - off),
        );
    }
    for sys in ["burncloud", "nginx", "litellm", "portkey"] {
        put(format!("{sys}_kib_per_idle_conn"), get(sys, "kib_per_idle_conn"));
    }
    // Latency overhead over the direct call at the same rate.
    let fixed =
        |sys: &str, frac: f64, key: &str| {
            systems.get(sys)?.get("fixed_rate")?.as_array()?.iter().find_map(|r| {
                (r["fraction_of_max"].as_f64() == Some(frac)).then(|| r[key].as_f64()).flatten()
            })
        };
    let mut p99_goal: Option<bool> = None;
    for frac in &o.rate_fractions {
        let pct = (frac * 100.0).round() as u32;
        for sys in ["burncloud", "burncloud_nobill", "nginx"] {
            for key in ["p50_ms", "p99_ms", "p999_ms"] {
                let over = fixed(sys, *frac, key).zip(fixed("direct", *frac, key)).map(|(s, d)| s - d);
                put(format!("{sys}_{}_overhead_ms_at_{pct}pct", key.trim_end_matches("_ms")), over);
            }
        }
        // The goal is judged only at rates nginx sustained (an overloaded reference says nothing);
        // there BurnCloud must sustain the rate too, with a p99 overhead no larger than nginx's.
        let kept_up = |sys: &str| {
            fixed(sys, *frac, "achieved_rps")
                .zip(fixed(sys, *frac, "rate"))
                .is_some_and(|(a, r)| a >= 0.98 * r)
                && fixed(sys, *frac, "unsent")
                    .is_some_and(|u| u <= 0.01 * fixed(sys, *frac, "rate").unwrap_or(0.0))
        };
        let b = fixed("burncloud", *frac, "p99_ms").zip(fixed("direct", *frac, "p99_ms")).map(|(s, d)| s - d);
        let n = fixed("nginx", *frac, "p99_ms").zip(fixed("direct", *frac, "p99_ms")).map(|(s, d)| s - d);
        if let (Some(b), Some(n), true) = (b, n, kept_up("nginx")) {
            p99_goal = Some(p99_goal.unwrap_or(true) && kept_up("burncloud") && b <= n.max(0.0) + 0.005);
        }
    }
    let stream = |sys: &str, key: &str| systems.get(sys)?.get("streams")?.get(key)?.as_f64();
    for sys in ["burncloud", "nginx", "litellm", "portkey"] {
        put(
            format!("{sys}_stream_ttfb_overhead_ms"),
            stream(sys, "ttfb_p50_ms").zip(stream("direct", "ttfb_p50_ms")).map(|(s, d)| s - d),
        );
        put(
            format!("{sys}_inter_chunk_overhead_ms"),
            stream(sys, "gap_mean_ms").zip(stream("direct", "gap_mean_ms")).map(|(s, d)| s - d),
        );
        put(
            format!("{sys}_inter_chunk_p99_overhead_ms"),
            stream(sys, "gap_p99_ms").zip(stream("direct", "gap_p99_ms")).map(|(s, d)| s - d),
        );
    }
    let ratio = |k: &str| ratios.get(k).and_then(Value::as_f64);
    let goal = |value: Option<f64>, target: f64, higher: bool| match value {
        Some(v) => {
            json!({"value": v, "target": target, "met": if higher { v >= target } else { v <= target }})
        }
        None => json!({"value": null, "target": target, "met": null}),
    };
    let goals = json!({
        "throughput_vs_nginx": goal(ratio("burncloud_vs_nginx_rps"), 1.0, true),
        "throughput_vs_nginx_256": goal(ratio(&format!("burncloud_vs_nginx_rps_{}", o.connections.get(1).copied().unwrap_or(256))), 1.0, true),
        "p99_overhead_le_nginx_at_rates_nginx_sustained": {"met": p99_goal},
        "throughput_vs_litellm": goal(ratio("burncloud_vs_litellm_rps"), 300.0, true),
        "throughput_vs_portkey": goal(ratio("burncloud_vs_portkey_rps"), 30.0, true),
        "kib_per_idle_conn": goal(ratio("burncloud_kib_per_idle_conn"), 10.0, false),
        "billing_costs_lt_5pct_throughput": goal(ratio("burncloud_billing_on_vs_off_rps"), 0.95, true),
        "billing_costs_lt_5pct_throughput_256": goal(ratio(&format!("burncloud_billing_on_vs_off_rps_{}", o.connections.get(1).copied().unwrap_or(256))), 0.95, true),
    });
    let versions: Map<String, Value> =
        peers::versions(&o.peer_dir).into_iter().map(|(k, v)| (k, Value::String(v))).collect();
    json!({
        "machine": machine(),
        "date": date(),
        "burncloud_commit": o.burncloud_commit.clone().unwrap_or_else(commit),
        "versions": versions,
        "settings": {
            "smoke": o.smoke,
            "connections": o.connections, "duration_s": o.duration.as_secs(), "rounds": o.rounds,
            "load_generator": if use_wrk { "wrk (max throughput); built-in open-loop generator (fixed rates, idle connections, streams)" } else { "built-in closed-loop generator (wrk not found); built-in open-loop generator (fixed rates, idle connections, streams)" },
            "pinning": lay.note, "open_files_limit": nofile,
            "fixed_rates": {"base": format!("{base_name} max req/s at {} connections", o.connections.first().copied().unwrap_or(64)), "fractions": o.rate_fractions, "connections": o.rate_connections, "duration_s": o.rate_duration.as_secs(), "latency_from": "scheduled send time (open loop, no coordinated omission)"},
            "idle_connections": o.idle_connections,
            "streams": {"burncloud_nginx_direct": o.streams, "peers": o.peer_streams, "chunks": o.chunks, "chunk_gap_ms": o.chunk_gap_ms},
            "gateway_workers": 1, "request": "POST /v1/chat/completions, non-stream unless noted",
            "billing": format!("burncloud: model {PRICED_MODEL} (priced: estimate, pre-deduction, settlement); burncloud_nobill: the same process, model {FREE_MODEL} (no price, SelfUseModeEnabled: none of them)"),
            "peer_install": install_notes,
        },
        "systems": systems,
        "ratios": ratios,
        "goals": goals,
    })
}

fn fmt_num(v: Option<f64>, digits: usize) -> String {
    match v {
        None => "—".into(),
        Some(x) if digits == 0 => {
            let s = format!("{:.0}", x);
            let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
            let mut out = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            format!("{sign}{out}")
        }
        Some(x) => format!("{x:.digits$}"),
    }
}

/// The markdown table of a report.
fn table(r: &Value) -> String {
    let conns: Vec<u64> = r["settings"]["connections"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let c0 = conns.first().copied().unwrap_or(64);
    let c1 = conns.get(1).copied();
    let mut t = String::new();
    t.push_str(&format!(
        "| system | req/s @{c0} | req/s @{} | p50 / p99 ms @{c0} | CPU µs/req | RSS KiB idle → loaded | KiB / idle conn | streams ok: peak RSS KiB (KiB/stream), TTFB p50 ms, gap p99 ms |\n",
        c1.map_or("—".into(), |c| c.to_string())
    ));
    t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let empty = Map::new();
    let systems = r["systems"].as_object().unwrap_or(&empty);
    for name in ALL_SYSTEMS {
        let Some(s) = systems.get(name) else { continue };
        if let Some(e) = s.get("error").and_then(Value::as_str) {
            t.push_str(&format!("| {name} | not run: {e} | | | | | | |\n"));
            continue;
        }
        let f = |k: &str| s.get(k).and_then(Value::as_f64);
        let rps1 = c1.and_then(|c| f(&format!("rps_{c}")));
        let st = &s["streams"];
        let streams = if st.is_object() && st["ok"].as_u64() == Some(0) {
            format!("failed: {}", st["failure"].as_str().unwrap_or("no stream completed"))
        } else if st.is_object() {
            format!(
                "{} of {}: {} ({}), {}, {}",
                st["ok"].as_u64().unwrap_or(0),
                st["streams"].as_u64().unwrap_or(0),
                fmt_num(st["rss_kib"].as_f64(), 0),
                fmt_num(st["kib_per_stream"].as_f64(), 1),
                fmt_num(st["ttfb_p50_ms"].as_f64(), 2),
                fmt_num(st["gap_p99_ms"].as_f64(), 1)
            )
        } else {
            "—".into()
        };
        t.push_str(&format!(
            "| {name} | {} | {} | {} / {} | {} | {} → {} | {} | {} |\n",
            fmt_num(f("rps"), 0),
            fmt_num(rps1, 0),
            fmt_num(f("p50_ms"), 2),
            fmt_num(f("p99_ms"), 2),
            fmt_num(f("cpu_us_per_req"), 1),
            fmt_num(f("rss_idle_kib"), 0),
            fmt_num(f("rss_kib"), 0),
            fmt_num(f("kib_per_idle_conn"), 2),
            streams
        ));
    }
    // Fixed-rate latency.
    let fracs: Vec<f64> = r["settings"]["fixed_rates"]["fractions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    if !fracs.is_empty() {
        t.push_str(&format!(
            "\nLatency at fixed rates (open loop, {} connections, from the scheduled send time; base: {}):\n\n",
            r["settings"]["fixed_rates"]["connections"], r["settings"]["fixed_rates"]["base"].as_str().unwrap_or("")
        ));
        t.push_str("| system | rate | achieved req/s | p50 ms | p99 ms | p99.9 ms | p99 over direct ms | CPU µs/req |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for frac in &fracs {
            let direct_p99 = fixed_row(systems, "direct", *frac).and_then(|d| d["p99_ms"].as_f64());
            for name in ALL_SYSTEMS {
                let Some(row) = fixed_row(systems, name, *frac) else { continue };
                let p99 = row["p99_ms"].as_f64();
                t.push_str(&format!(
                    "| {name} | {:.0}% = {} /s | {} | {} | {} | {} | {} | {} |\n",
                    frac * 100.0,
                    fmt_num(row["rate"].as_f64(), 0),
                    fmt_num(row["achieved_rps"].as_f64(), 0),
                    fmt_num(row["p50_ms"].as_f64(), 3),
                    fmt_num(p99, 3),
                    fmt_num(row["p999_ms"].as_f64(), 3),
                    if name == "direct" {
                        "—".into()
                    } else {
                        fmt_num(p99.zip(direct_p99).map(|(a, b)| a - b), 3)
                    },
                    fmt_num(row["cpu_us_per_req"].as_f64(), 1)
                ));
            }
        }
    }
    t.push_str("\nRatios:\n\n");
    if let Some(ratios) = r["ratios"].as_object() {
        for (k, v) in ratios {
            t.push_str(&format!("- {k}: {v}\n"));
        }
    }
    t.push_str("\nGoals:\n\n");
    if let Some(goals) = r["goals"].as_object() {
        for (k, v) in goals {
            let met = match v["met"].as_bool() {
                Some(true) => "met",
                Some(false) => "missed",
                None => "not measured",
            };
            let value = v
                .get("value")
                .filter(|x| !x.is_null())
                .map(|x| format!(" ({x} vs {})", v["target"]))
                .unwrap_or_default();
            t.push_str(&format!("- {k}: {met}{value}\n"));
        }
    }
    t
}

fn fixed_row<'a>(systems: &'a Map<String, Value>, name: &str, frac: f64) -> Option<&'a Value> {
    systems
        .get(name)?
        .get("fixed_rate")?
        .as_array()?
        .iter()
        .find(|r| r["fraction_of_max"].as_f64() == Some(frac))
}

fn color(name: &str) -> chart::Rgb {
    match name {
        "burncloud" => [232, 89, 12],
        "burncloud_nobill" => [250, 176, 5],
        "nginx" => [47, 158, 68],
        "litellm" => [28, 126, 214],
        "portkey" => [112, 72, 232],
        _ => [134, 142, 150],
    }
}

/// The chart of a report, as PNG bytes.
fn chart_png(r: &Value) -> Vec<u8> {
    let empty = Map::new();
    let systems = r["systems"].as_object().unwrap_or(&empty);
    let conns: Vec<u64> = r["settings"]["connections"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let bar = |name: &str, value: Option<f64>, text: String| Bar {
        label: name.to_string(),
        value,
        text,
        color: color(name),
    };
    let mut panels = Vec::new();
    for (i, c) in conns.iter().enumerate() {
        let key = if i == 0 { "rps".to_string() } else { format!("rps_{c}") };
        let bars = ALL_SYSTEMS
            .iter()
            .filter_map(|n| systems.get(*n).map(|s| (n, s)))
            .map(|(n, s)| match s.get("error") {
                Some(_) => bar(n, None, "not run".into()),
                None => {
                    let v = s.get(&key).and_then(Value::as_f64);
                    bar(n, v, fmt_num(v, 0))
                }
            })
            .collect();
        panels.push(Panel { title: format!("Max requests/s at {c} connections (higher is better)"), bars });
    }
    let fracs: Vec<f64> = r["settings"]["fixed_rates"]["fractions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let mut lat = Vec::new();
    for frac in &fracs {
        for n in ALL_SYSTEMS {
            if let Some(row) = fixed_row(systems, n, *frac) {
                let v = row["p99_ms"].as_f64();
                let mut b = bar(n, v, format!("{} ms", fmt_num(v, 2)));
                b.label = format!("{:.0}% {n}", frac * 100.0);
                lat.push(b);
            }
        }
    }
    if !lat.is_empty() {
        panels.push(Panel {
            title: "p99 latency at fixed rates, % of nginx max (lower is better)".into(),
            bars: lat,
        });
    }
    let metric = |title: &str, get: &dyn Fn(&Value) -> Option<f64>, digits: usize, unit: &str| {
        let bars: Vec<Bar> = ALL_SYSTEMS
            .iter()
            .filter_map(|n| systems.get(*n).map(|s| (n, s)))
            .filter(|(_, s)| s.get("error").is_none())
            .filter_map(|(n, s)| {
                get(s).map(|v| bar(n, Some(v), format!("{}{unit}", fmt_num(Some(v), digits))))
            })
            .collect();
        (!bars.is_empty()).then(|| Panel { title: title.to_string(), bars })
    };
    panels.extend(metric(
        "CPU µs per request (lower is better)",
        &|s| s["cpu_us_per_req"].as_f64(),
        1,
        " µs",
    ));
    panels.extend(metric(
        "KiB of RSS per idle keep-alive connection (lower is better)",
        &|s| s["kib_per_idle_conn"].as_f64(),
        2,
        " KiB",
    ));
    panels.extend(metric(
        "Streams: time to first byte p50 (lower is better)",
        &|s| s["streams"]["ttfb_p50_ms"].as_f64(),
        2,
        " ms",
    ));
    let subtitles = [
        format!("{}, {}", r["machine"].as_str().unwrap_or(""), r["date"].as_str().unwrap_or("")),
        r["settings"]["pinning"].as_str().unwrap_or("").to_string(),
    ];
    chart::render("BurnCloud load harness", &subtitles, &panels, 1100).png()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown cpu".into());
    // Counted from /proc/cpuinfo: the harness pins itself, so its own parallelism is one.
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| t.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} × {cpu}, Linux {}", kernel.trim())
}

fn date() -> String {
    procs::first_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default()
}

fn commit() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let rev = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let dirty = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty { format!("{rev}-dirty") } else { rev }
}

/// Creates a channel to the mock for the priced model and one for the unpriced model, turns
/// self-use mode on (unpriced models are then free and not pre-deducted), a user and an unlimited
/// key; returns the key.
fn provision(gw: &str, mock: &str) -> Result<String, String> {
    for (name, model) in [("mock", PRICED_MODEL), ("mock-free", FREE_MODEL)] {
        let channel = json!({"name":name,"type":"openai","base_url":format!("http://{mock}"),"key":"mock-key","models":model,"group":"default"});
        admin(gw, "/api/channel/", &channel)?;
    }
    admin_call(gw, "PUT", "/api/option/", &json!({"key":"SelfUseModeEnabled","value":"true"}))?;
    // Phase 2b: a channel that refuses connections ahead of the mock; never cooled down nor probed,
    // so that every request pays the failed attempt.
    let dead = procs::free_port()?;
    for (name, url, priority) in
        [("dead", format!("http://127.0.0.1:{dead}"), 10), ("mock-failover", format!("http://{mock}"), 0)]
    {
        let channel = json!({"name":name,"type":"openai","base_url":url,"key":"mock-key","models":FAILOVER_MODEL,"group":"default","priority":priority});
        admin(gw, "/api/channel/", &channel)?;
    }
    for (key, value) in [("ChannelCooldownFailures", "4000000000"), ("ChannelTestInterval", "0")] {
        admin_call(gw, "PUT", "/api/option/", &json!({"key": key, "value": value}))?;
    }
    let user = admin(
        gw,
        "/api/user/",
        &json!({"username":"bench","password":"bench-password","quota":1_000_000_000_000i64}),
    )?;
    let uid = user["data"]["id"].as_i64().ok_or("no user id")?;
    let token = admin(gw, "/api/token/", &json!({"user_id": uid, "name": "bench", "remain_quota": -1}))?;
    token["data"]["key"].as_str().map(str::to_string).ok_or_else(|| "no key in token response".into())
}

fn admin(addr: &str, path: &str, body: &Value) -> Result<Value, String> {
    admin_call(addr, "POST", path, body)
}

fn admin_call(addr: &str, method: &str, path: &str, body: &Value) -> Result<Value, String> {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let json_start = out.find("\r\n\r\n").map(|i| i + 4).ok_or("no response body")?;
    let v: Value = serde_json::from_str(&out[json_start..]).map_err(|e| format!("{path}: {e}: {out}"))?;
    if v["success"] != json!(true) {
        return Err(format!("{path} failed: {v}"));
    }
    Ok(v)
}
