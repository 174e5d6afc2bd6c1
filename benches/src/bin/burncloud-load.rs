//! `burncloud-load`: the load harness. See benches/README.md.
//!
//! Starts the mock upstream, BurnCloud (auth, routing, billing and logging on) and nginx `proxy_pass`
//! (when installed), then drives a direct-to-mock baseline and each system with wrk at the same
//! connection count, alternating systems round by round. Writes benches/results/latest.json and prints
//! a markdown table.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use burncloud_benches::procs::{self, Proc};
use burncloud_benches::wrk::{self, WrkResult};
use serde_json::{Value, json};

const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef";
const BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence."}]}"#;

/// One wrk run and the system's CPU µs per request during it.
type Sample = (WrkResult, Option<f64>);

struct Options {
    duration: Duration,
    connections: u32,
    rounds: u32,
    bin_dir: PathBuf,
    out: PathBuf,
    systems: Vec<String>,
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

fn parse_args() -> Result<Options, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut o = Options {
        duration: Duration::from_secs(10),
        connections: 64,
        rounds: 2,
        bin_dir: root.join("target/release"),
        out: root.join("benches/results/latest.json"),
        systems: vec!["direct".into(), "burncloud".into(), "nginx".into()],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--duration" => {
                o.duration = Duration::from_secs(val()?.parse().map_err(|_| "--duration: seconds")?)
            }
            "--connections" => o.connections = val()?.parse().map_err(|_| "--connections: a number")?,
            "--rounds" => o.rounds = val()?.parse().map_err(|_| "--rounds: a number")?,
            "--bin-dir" => o.bin_dir = PathBuf::from(val()?),
            "--out" => o.out = PathBuf::from(val()?),
            "--systems" => o.systems = val()?.split(',').map(str::to_string).collect(),
            "--smoke" => {
                o.duration = Duration::from_secs(1);
                o.connections = 8;
                o.rounds = 1;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// CPU layout: on two or more cores the system under test gets core 0, the load generator and the
/// mock share core 1.
struct Layout {
    sut: Option<usize>,
    load: Option<usize>,
}

fn layout() -> Layout {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if cores >= 2 { Layout { sut: Some(0), load: Some(1) } } else { Layout { sut: None, load: None } }
}

fn pinned(cpu: Option<usize>, program: &Path) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

fn run(o: &Options) -> Result<(), String> {
    let lay = layout();
    let scratch = std::env::temp_dir().join(format!("burncloud-load-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let mock_bin = o.bin_dir.join("burncloud-mock");
    let gw_bin = o.bin_dir.join("burncloud");
    for b in [&mock_bin, &gw_bin] {
        if !b.exists() {
            return Err(format!("{} is missing: build with `cargo build --release` first", b.display()));
        }
    }

    let mut mock_cmd = pinned(lay.load, &mock_bin);
    mock_cmd.args(["--listen", "127.0.0.1:0", "--workers", "1"]);
    let (mock, mock_addr) = Proc::start_with_line("mock", mock_cmd, "listening on")?;

    let gw_port = procs::free_port()?;
    let gw_addr = format!("127.0.0.1:{gw_port}");
    let mut gw_cmd = pinned(lay.sut, &gw_bin);
    gw_cmd
        .env("BURNCLOUD_LISTEN", &gw_addr)
        .env("BURNCLOUD_WORKERS", "1")
        .env("BURNCLOUD_PIN_WORKERS", "false")
        .env("BURNCLOUD_ADMIN_KEY", ADMIN_KEY)
        .env("BURNCLOUD_LOG", "warn")
        .env("BURNCLOUD_DATABASE_URL", format!("sqlite://{}", scratch.join("bench.db").display()));
    let (gateway, _) = Proc::start_with_line("burncloud", gw_cmd, "listening on")?;
    let key = provision(&gw_addr, &mock_addr)?;

    let nginx = if o.systems.iter().any(|s| s == "nginx") {
        start_nginx(&scratch, &mock_addr, lay.sut)
    } else {
        Err("not requested".into())
    };

    let auth = format!("Bearer {key}");
    let headers = [("Content-Type", "application/json"), ("Authorization", auth.as_str())];
    let script = wrk::script(&scratch, BODY, &headers)?;
    let mut targets: Vec<(&str, String, Option<u32>)> = Vec::new();
    for s in &o.systems {
        match s.as_str() {
            "direct" => targets.push(("direct", format!("http://{mock_addr}/v1/chat/completions"), None)),
            "burncloud" => targets.push((
                "burncloud",
                format!("http://{gw_addr}/v1/chat/completions"),
                Some(gateway.pid()),
            )),
            "nginx" => {
                if let Ok((p, addr)) = &nginx {
                    targets.push(("nginx", format!("http://{addr}/v1/chat/completions"), Some(p.pid())));
                }
            }
            _ => {}
        }
    }
    let mut systems: BTreeMap<String, Value> = BTreeMap::new();
    if let Err(e) = &nginx
        && o.systems.iter().any(|s| s == "nginx")
    {
        systems.insert("nginx".into(), json!({"error": e}));
    }
    let idle_rss: BTreeMap<&str, Option<u64>> =
        targets.iter().map(|(n, _, pid)| (*n, pid.and_then(procs::rss_kib))).collect();
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    let threads = 1;
    // Warm-up, then alternate systems round by round.
    for (_, url, _) in &targets {
        wrk::run(url, &script, o.connections, threads, Duration::from_secs(1), lay.load)?;
    }
    for round in 0..o.rounds {
        for (name, url, pid) in &targets {
            let before = pid.and_then(procs::cpu_us);
            let mock_before = procs::cpu_us(mock.pid());
            let r = wrk::run(url, &script, o.connections, threads, o.duration, lay.load)?;
            let cpu = match (*pid, before) {
                (Some(p), Some(b)) => procs::cpu_us(p).map(|a| (a - b) as f64 / r.requests.max(1) as f64),
                // The direct baseline's "system" is the mock itself.
                _ => match (mock_before, procs::cpu_us(mock.pid())) {
                    (Some(b), Some(a)) => Some((a - b) as f64 / r.requests.max(1) as f64),
                    _ => None,
                },
            };
            eprintln!(
                "round {round} {name}: {:.0} req/s p50 {:.3} ms p99 {:.3} ms",
                r.rps, r.p50_ms, r.p99_ms
            );
            samples.entry(name).or_default().push((r, cpu));
        }
    }
    for (name, runs) in &samples {
        let n = runs.len() as f64;
        let avg = |f: &dyn Fn(&Sample) -> f64| runs.iter().map(f).sum::<f64>() / n;
        let load_rss = targets.iter().find(|t| t.0 == *name).and_then(|t| t.2).and_then(procs::rss_kib);
        systems.insert(
            name.to_string(),
            json!({
                "rps": round2(avg(&|r| r.0.rps)),
                "p50_ms": round3(avg(&|r| r.0.p50_ms)),
                "p99_ms": round3(avg(&|r| r.0.p99_ms)),
                "cpu_us_per_req": round2(avg(&|r| r.1.unwrap_or(0.0))),
                "rss_kib": load_rss,
                "rss_idle_kib": idle_rss.get(name).copied().flatten(),
                "requests": runs.iter().map(|r| r.0.requests).sum::<u64>(),
                "errors": runs.iter().map(|r| r.0.errors + r.0.non_2xx).sum::<u64>(),
            }),
        );
    }
    let rps = |n: &str| systems.get(n).and_then(|v| v.get("rps")).and_then(Value::as_f64);
    let cpu = |n: &str| systems.get(n).and_then(|v| v.get("cpu_us_per_req")).and_then(Value::as_f64);
    let mut ratios = BTreeMap::new();
    for reference in ["direct", "nginx"] {
        if let (Some(b), Some(r)) = (rps("burncloud"), rps(reference)) {
            ratios.insert(format!("burncloud_vs_{reference}_rps"), round3(b / r));
        }
    }
    if let (Some(b), Some(n)) = (cpu("burncloud"), cpu("nginx")) {
        ratios.insert("burncloud_vs_nginx_cpu_per_req".into(), round3(b / n));
    }
    let report = json!({
        "machine": machine(),
        "date": date(),
        "settings": {
            "connections": o.connections, "duration_s": o.duration.as_secs(), "rounds": o.rounds,
            "load_generator": "wrk", "pinning": match lay.sut { Some(_) => "system under test on cpu 0; wrk and mock on cpu 1", None => "none (one core)" },
            "gateway_workers": 1, "request": "POST /v1/chat/completions, non-stream",
        },
        "systems": systems,
        "ratios": ratios,
    });
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(&o.out, text + "\n").map_err(|e| format!("write {}: {e}", o.out.display()))?;
    print_table(&report);
    gateway.stop();
    if let Ok((p, _)) = nginx {
        p.stop();
    }
    mock.stop();
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn print_table(report: &Value) {
    println!("| system | req/s | p50 ms | p99 ms | CPU µs/req | RSS KiB (idle → loaded) | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    if let Some(systems) = report["systems"].as_object() {
        for (name, s) in systems {
            if let Some(e) = s.get("error") {
                println!("| {name} | not run: {e} | | | | | |");
                continue;
            }
            println!(
                "| {name} | {} | {} | {} | {} | {} → {} | {} |",
                s["rps"],
                s["p50_ms"],
                s["p99_ms"],
                s["cpu_us_per_req"],
                s["rss_idle_kib"],
                s["rss_kib"],
                s["errors"]
            );
        }
    }
    println!("\nratios: {}", report["ratios"]);
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
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} × {cpu}, Linux {}", kernel.trim())
}

fn date() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Creates a channel to the mock, a user and an unlimited key; returns the key.
fn provision(gw: &str, mock: &str) -> Result<String, String> {
    let channel = json!({"name":"mock","type":"openai","base_url":format!("http://{mock}"),"key":"mock-key","models":"gpt-4o-mini","group":"default"});
    admin(gw, "/api/channel/", &channel)?;
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
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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

/// nginx as a plain reverse proxy with upstream keepalive, unprivileged, in a scratch folder.
fn start_nginx(scratch: &Path, mock: &str, cpu: Option<usize>) -> Result<(Proc, String), String> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("nginx is not installed")?;
    let dir = scratch.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = procs::free_port()?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\ndaemon off;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n  keepalive_requests 1000000;\n  upstream mock {{ server {mock}; keepalive 64; keepalive_requests 1000000; }}\n  server {{\n    listen 127.0.0.1:{port} reuseport backlog=4096;\n    location / {{ proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).map_err(|e| e.to_string())?;
    let mut cmd = pinned(cpu, &nginx);
    cmd.arg("-c").arg(dir.join("nginx.conf")).arg("-p").arg(&dir);
    let addr = format!("127.0.0.1:{port}");
    let p = Proc::start_listening("nginx", cmd, &addr)?;
    Ok((p, addr))
}
