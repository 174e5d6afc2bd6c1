//! Driving `wrk` with a POST body and reading its report.

use std::process::Command;
use std::time::Duration;

/// One wrk run's results.
#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub non_2xx: u64,
}

/// Writes the Lua script that makes wrk POST `body` with `headers`.
pub fn script(
    dir: &std::path::Path,
    body: &str,
    headers: &[(&str, &str)],
) -> Result<std::path::PathBuf, String> {
    let mut lua = String::from("wrk.method = \"POST\"\n");
    lua.push_str(&format!("wrk.body = {}\n", lua_string(body)));
    for (k, v) in headers {
        lua.push_str(&format!("wrk.headers[{}] = {}\n", lua_string(k), lua_string(v)));
    }
    let path = dir.join("post.lua");
    std::fs::write(&path, lua).map_err(|e| format!("write wrk script: {e}"))?;
    Ok(path)
}

fn lua_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

/// Whether `wrk` can be run.
pub fn available() -> bool {
    Command::new("wrk").arg("-v").output().is_ok()
}

/// Runs wrk pinned to `cpu` (when given) against `url`.
pub fn run(
    url: &str,
    script: &std::path::Path,
    connections: u32,
    threads: u32,
    duration: Duration,
    timeout: Duration,
    cpu: Option<usize>,
) -> Result<WrkResult, String> {
    let mut cmd = match cpu {
        Some(c) => {
            let mut c2 = Command::new("taskset");
            c2.arg("-c").arg(c.to_string()).arg("wrk");
            c2
        }
        None => Command::new("wrk"),
    };
    cmd.arg("--latency")
        .arg("-t")
        .arg(threads.to_string())
        .arg("-c")
        .arg(connections.to_string())
        .arg("-d")
        .arg(format!("{}s", duration.as_secs().max(1)))
        .arg("--timeout")
        .arg(format!("{}s", timeout.as_secs().max(1)))
        .arg("-s")
        .arg(script)
        .arg(url);
    let out = cmd.output().map_err(|e| format!("run wrk: {e} (is wrk installed?)"))?;
    if !out.status.success() {
        return Err(format!("wrk failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(parse(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses wrk's text report.
pub fn parse(text: &str) -> WrkResult {
    let mut r = WrkResult::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => r.p50_ms = duration_ms(v),
            ["99%", v] => r.p99_ms = duration_ms(v),
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap_or(0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                r.errors = rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum();
            }
            _ => {}
        }
    }
    r
}

fn duration_ms(v: &str) -> f64 {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().map(|x| x * scale).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_wrk_report() {
        let text = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 8 connections\n  Latency Distribution\n     50%  120.00us\n     75%  1.50ms\n     99%    2.10ms\n  20000 requests in 2.00s, 3.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 5\nRequests/sec:  10000.50\n";
        let r = parse(text);
        assert_eq!(r.requests, 20000);
        assert!((r.rps - 10000.5).abs() < 1e-9);
        assert!((r.p50_ms - 0.12).abs() < 1e-9);
        assert!((r.p99_ms - 2.1).abs() < 1e-9);
        assert_eq!((r.errors, r.non_2xx), (3, 5));
    }
}
