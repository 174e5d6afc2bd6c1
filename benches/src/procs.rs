//! Child processes of the harness: start, wait for readiness, read CPU time and RSS, stop.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A started child, killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    /// Starts `cmd` and waits until it prints a line starting with `ready_prefix` on stdout; returns
    /// the rest of that line (e.g. the bound address).
    pub fn start_with_line(
        name: &str,
        mut cmd: Command,
        ready_prefix: &str,
    ) -> Result<(Proc, String), String> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start {name}: {e}"))?;
        let stdout = child.stdout.take().ok_or_else(|| format!("{name}: no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let prefix = ready_prefix.to_string();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && let Some(rest) = line.strip_prefix(&prefix) {
                    let _ = tx.send(rest.trim().to_string());
                    sent = true;
                }
            }
        });
        let proc = Proc { name: name.to_string(), child };
        let rest =
            rx.recv_timeout(Duration::from_secs(30)).map_err(|_| format!("{name} did not become ready"))?;
        Ok((proc, rest))
    }

    /// Starts `cmd` with stdout and stderr appended to `log`, and waits (up to `timeout`) until
    /// `GET path` on `addr` answers 200. On failure the child is stopped and the log's tail returned.
    pub fn start_http_ready(
        name: &str,
        mut cmd: Command,
        addr: &str,
        path: &str,
        log: &std::path::Path,
        timeout: Duration,
    ) -> Result<Proc, String> {
        let out = std::fs::File::create(log).map_err(|e| format!("{name}: log: {e}"))?;
        let err = out.try_clone().map_err(|e| format!("{name}: log: {e}"))?;
        let child = cmd.stdout(out).stderr(err).spawn().map_err(|e| format!("start {name}: {e}"))?;
        let mut proc = Proc { name: name.to_string(), child };
        let deadline = Instant::now() + timeout;
        loop {
            if http_get_status(addr, path) == Some(200) {
                return Ok(proc);
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                return Err(format!("{name} exited ({status}): {}", log_tail(log)));
            }
            if Instant::now() > deadline {
                proc.stop();
                return Err(format!("{name} not ready after {}s: {}", timeout.as_secs(), log_tail(log)));
            }
            wait(Duration::from_millis(200));
        }
    }

    /// Starts `cmd` and waits until `addr` accepts TCP connections.
    pub fn start_listening(name: &str, mut cmd: Command, addr: &str) -> Result<Proc, String> {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start {name}: {e}"))?;
        let proc = Proc { name: name.to_string(), child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                return Err(format!("{name} is not listening on {addr}"));
            }
            wait(Duration::from_millis(50));
        }
        Ok(proc)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the process ended, if it already has (`None` while it runs).
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(describe(status)),
            _ => None,
        }
    }

    /// Stops with SIGTERM and waits (bounded), then kills; then stops any descendants it left behind
    /// (worker processes of a peer), by their ids.
    pub fn stop(mut self) {
        let descendants = descendants(self.pid());
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                break;
            }
            wait(Duration::from_millis(20));
        }
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in descendants {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An exit status in words: the code, or the signal that ended the process.
pub fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// Sleeps the harness thread (the harness is not a worker; blocking here is its job).
#[allow(clippy::disallowed_methods)]
pub fn wait(d: Duration) {
    std::thread::sleep(d);
}

/// (parent pid, user + system CPU ticks) of one process, from /proc/PID/stat.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ppid: u32 = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// User + system CPU time of a process, its threads and its live descendants (nginx workers), in
/// microseconds.
pub fn cpu_us(pid: u32) -> Option<u64> {
    let (_, own) = stat(pid)?;
    let mut total = own;
    let mut parents = vec![pid];
    let all: Vec<(u32, u32, u64)> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| stat(p).map(|(pp, t)| (p, pp, t)))
        .collect();
    while let Some(parent) = parents.pop() {
        for (p, pp, t) in &all {
            if *pp == parent {
                total += t;
                parents.push(*p);
            }
        }
    }
    let ticks = 100; // USER_HZ on Linux
    Some(total * 1_000_000 / ticks)
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A free loopback port.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Every live descendant of `pid` (children, their children, …).
pub fn descendants(pid: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = match std::fs::read_dir("/proc") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|p| stat(p).map(|(pp, _)| (p, pp)))
            .collect(),
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    let mut parents = vec![pid];
    while let Some(parent) = parents.pop() {
        for (p, pp) in &all {
            if *pp == parent {
                out.push(*p);
                parents.push(*p);
            }
        }
    }
    out
}

/// RSS of a process and all its descendants (nginx master + worker, a peer's workers), KiB.
pub fn rss_tree_kib(pid: u32) -> Option<u64> {
    let own = rss_kib(pid)?;
    Some(own + descendants(pid).into_iter().filter_map(rss_kib).sum::<u64>())
}

/// The status of `GET path` on `addr`, if it answers within 2 s.
pub fn http_get_status(addr: &str, path: &str) -> Option<u16> {
    let sock = crate::client::resolve(addr).ok()?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    std::io::Write::write_all(&mut s, req.as_bytes()).ok()?;
    let mut head = [0u8; 64];
    let n = std::io::Read::read(&mut s, &mut head).ok()?;
    let text = String::from_utf8_lossy(head.get(..n)?).into_owned();
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The last lines of a log file, on one line.
pub fn log_tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ").chars().take(400).collect()
}

/// Runs `cmd` (output to `log`) to completion within `timeout`; kills and reaps it on overrun.
pub fn run_bounded(mut cmd: Command, log: &std::path::Path, timeout: Duration) -> Result<(), String> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("log {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = cmd.stdout(out).stderr(err).spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => return Err(format!("{cmd:?} failed ({s}): {}", log_tail(log))),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} took over {}s", timeout.as_secs()));
            }
            Ok(None) => wait(Duration::from_millis(200)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The (soft, hard) open-files limit of this process.
pub fn nofile_limit() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| if w == "unlimited" { Some(u64::MAX) } else { w.parse().ok() })
        .collect();
    Some((*nums.first()?, *nums.get(1)?))
}

/// Raises this process's soft open-files limit to its hard limit (with `prlimit`, no privilege
/// needed); children started afterwards inherit it. Returns the soft limit in force.
pub fn raise_nofile() -> u64 {
    if let Some((soft, hard)) = nofile_limit()
        && soft < hard
    {
        let target = hard.min(1 << 20);
        let _ = Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={target}:{hard}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    nofile_limit().map_or(1024, |(soft, _)| soft)
}

/// Pins every thread of this process (and the threads it starts later) to `cpu`.
pub fn pin_self(cpu: usize) -> bool {
    Command::new("taskset")
        .arg("-a")
        .arg("-p")
        .arg("-c")
        .arg(cpu.to_string())
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The first line a command prints (stdout, else stderr), for version strings.
pub fn first_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    String::from_utf8_lossy(&text).lines().next().map(|l| l.trim().to_string())
}

/// Whether `pid` is running: present and not a zombie.
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}
