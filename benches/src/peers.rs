//! The reference systems the harness compares BurnCloud with, each a child process on loopback in a
//! scratch folder, configured against the same mock upstream: nginx `proxy_pass` (Debian package),
//! the LiteLLM proxy (PyPI) and the Portkey gateway (npm). The peers live in a cache folder outside the
//! repository (`--install-peers` puts them there); a peer that is not installed or fails to start is
//! reported, never fatal.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{self, Proc};

/// The LiteLLM version the harness installs (newer versions' `[proxy]` extra needs packages some
/// indexes lack).
pub const LITELLM_VERSION: &str = "1.108.7";
/// The Portkey gateway version the harness installs.
pub const PORTKEY_VERSION: &str = "1.15.2";
/// LiteLLM refuses weak master keys.
pub const LITELLM_MASTER_KEY: &str = "sk-bench-0f3c9a7e5d2b4c6a8e1f0d9b7c5a3e2f";

/// A started reference system: its process, address and the headers a client must send.
pub struct Peer {
    pub proc: Proc,
    pub addr: String,
    /// Path prefix to put before `/v1/...` (nginx streams through an unbuffered location).
    pub stream_prefix: String,
    pub headers: Vec<(String, String)>,
}

/// Where the peers are installed: `$BURNCLOUD_BENCH_CACHE`, else `$XDG_CACHE_HOME/burncloud-bench`, else
/// `~/.cache/burncloud-bench`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BURNCLOUD_BENCH_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("burncloud-bench");
    }
    std::env::var_os("HOME").map_or_else(
        || std::env::temp_dir().join("burncloud-bench"),
        |h| PathBuf::from(h).join(".cache/burncloud-bench"),
    )
}

fn litellm_bin(cache: &Path) -> PathBuf {
    cache.join("litellm/bin/litellm")
}

fn portkey_entry(cache: &Path) -> PathBuf {
    cache.join("portkey/node_modules/@portkey-ai/gateway/build/start-server.js")
}

/// Installs LiteLLM (venv + pip) and Portkey (npm) into `cache`, skipping what is there. Each step is
/// bounded in time; returns one message per peer.
pub fn install(cache: &Path) -> Vec<(String, Result<(), String>)> {
    let _ = std::fs::create_dir_all(cache);
    let log = cache.join("install.log");
    let litellm = if litellm_bin(cache).exists() {
        Ok(())
    } else {
        let venv = cache.join("litellm");
        let mut mk = Command::new("python3");
        mk.arg("-m").arg("venv").arg(&venv);
        procs::run_bounded(mk, &log, Duration::from_secs(120)).and_then(|()| {
            let mut pip = Command::new(venv.join("bin/pip"));
            pip.args(["install", "--disable-pip-version-check", "-q"])
                .arg(format!("litellm[proxy]=={LITELLM_VERSION}"));
            procs::run_bounded(pip, &log, Duration::from_secs(900))
        })
    };
    let portkey = if portkey_entry(cache).exists() {
        Ok(())
    } else {
        let dir = cache.join("portkey");
        let _ = std::fs::create_dir_all(&dir);
        let mut init = Command::new("npm");
        init.arg("init").arg("-y").current_dir(&dir);
        procs::run_bounded(init, &log, Duration::from_secs(60)).and_then(|()| {
            let mut npm = Command::new("npm");
            npm.args(["install", "--no-audit", "--no-fund"])
                .arg(format!("@portkey-ai/gateway@{PORTKEY_VERSION}"))
                .current_dir(&dir);
            procs::run_bounded(npm, &log, Duration::from_secs(600))
        })
    };
    vec![("litellm".into(), litellm), ("portkey".into(), portkey)]
}

/// Versions of the installed peers, for the report.
pub fn versions(cache: &Path) -> Vec<(String, String)> {
    let mut v = Vec::new();
    if let Some(line) =
        procs::first_line("nginx", &["-v"]).or_else(|| procs::first_line("/usr/sbin/nginx", &["-v"]))
    {
        v.push(("nginx".into(), line.trim_start_matches("nginx version: ").to_string()));
    }
    if let Some(line) = procs::first_line("wrk", &["-v"]) {
        v.push(("wrk".into(), line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")));
    }
    let py = cache.join("litellm/bin/python");
    if py.exists()
        && let Some(line) = procs::first_line(
            &py.to_string_lossy(),
            &["-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        )
    {
        v.push(("litellm".into(), line));
    }
    let pkg = cache.join("portkey/node_modules/@portkey-ai/gateway/package.json");
    if let Ok(text) = std::fs::read_to_string(pkg)
        && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
        && let Some(ver) = json["version"].as_str()
    {
        v.push(("portkey".into(), ver.to_string()));
    }
    if let Some(line) = procs::first_line("node", &["--version"]) {
        v.push(("node".into(), line));
    }
    v
}

/// Wraps `program` in `taskset -c CPU` when pinned.
pub fn pinned(cpu: Option<usize>, program: &Path) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// nginx as a plain reverse proxy with upstream keepalive, one worker, unprivileged, in a scratch
/// folder. `/stream/...` proxies unbuffered (for SSE); everything else is the default buffered proxy.
pub fn start_nginx(scratch: &Path, mock: &str, cpu: Option<usize>, nofile: u64) -> Result<Peer, String> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("nginx is not installed (apt-get install nginx-light)")?;
    let dir = scratch.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = procs::free_port()?;
    let d = dir.display();
    let conns = nofile.saturating_sub(64).clamp(1024, 65536);
    let conf = format!(
        "worker_processes 1;\nworker_rlimit_nofile {nofile};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\ndaemon off;\n\
events {{ worker_connections {conns}; }}\nhttp {{\n  access_log off;\n\
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
  keepalive_requests 1000000;\n  keepalive_timeout 120s;\n\
  upstream mock {{ server {mock}; keepalive 64; keepalive_requests 1000000; }}\n  server {{\n\
    listen 127.0.0.1:{port} reuseport backlog=4096;\n\
    location / {{ proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n\
    location /stream/ {{ proxy_pass http://mock/; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}\n\
  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).map_err(|e| e.to_string())?;
    let mut cmd = pinned(cpu, &nginx);
    cmd.arg("-c").arg(dir.join("nginx.conf")).arg("-p").arg(&dir);
    let addr = format!("127.0.0.1:{port}");
    let proc = Proc::start_listening("nginx", cmd, &addr)?;
    Ok(Peer { proc, addr, stream_prefix: "/stream".into(), headers: Vec::new() })
}

/// The LiteLLM proxy with one model routed to the mock.
pub fn start_litellm(cache: &Path, scratch: &Path, mock: &str, cpu: Option<usize>) -> Result<Peer, String> {
    let bin = litellm_bin(cache);
    if !bin.exists() {
        return Err(format!("LiteLLM is not installed in {} (run with --install-peers)", cache.display()));
    }
    let dir = scratch.join("litellm");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = format!(
        "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n      api_base: \"http://{mock}/v1\"\n      api_key: fake\ngeneral_settings:\n  master_key: os.environ/LITELLM_MASTER_KEY\n"
    );
    std::fs::write(dir.join("config.yaml"), config).map_err(|e| e.to_string())?;
    let port = procs::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = pinned(cpu, &bin);
    cmd.arg("--config")
        .arg(dir.join("config.yaml"))
        .args(["--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .current_dir(&dir)
        .env("LITELLM_MASTER_KEY", LITELLM_MASTER_KEY)
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_TELEMETRY_DISABLED", "true")
        .env("LITELLM_LOG", "ERROR")
        .env("NO_DOCS", "True");
    let proc = Proc::start_http_ready(
        "litellm",
        cmd,
        &addr,
        "/health/liveliness",
        &dir.join("litellm.log"),
        Duration::from_secs(120),
    )?;
    let headers = vec![("Authorization".to_string(), format!("Bearer {LITELLM_MASTER_KEY}"))];
    Ok(Peer { proc, addr, stream_prefix: String::new(), headers })
}

/// The Portkey gateway, headless, routing to the mock as a custom OpenAI host.
pub fn start_portkey(cache: &Path, scratch: &Path, mock: &str, cpu: Option<usize>) -> Result<Peer, String> {
    let entry = portkey_entry(cache);
    if !entry.exists() {
        return Err(format!("Portkey is not installed in {} (run with --install-peers)", cache.display()));
    }
    let node = ["/usr/bin/node", "/usr/local/bin/node"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("node"));
    let dir = scratch.join("portkey");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = procs::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = pinned(cpu, &node);
    cmd.arg(&entry).arg(format!("--port={port}")).arg("--headless").current_dir(&dir);
    let proc = Proc::start_http_ready(
        "portkey",
        cmd,
        &addr,
        "/",
        &dir.join("portkey.log"),
        Duration::from_secs(60),
    )?;
    let headers = vec![
        ("Authorization".to_string(), "Bearer mock-key".to_string()),
        ("x-portkey-provider".to_string(), "openai".to_string()),
        ("x-portkey-custom-host".to_string(), format!("http://{mock}/v1")),
    ];
    Ok(Peer { proc, addr, stream_prefix: String::new(), headers })
}
