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

    /// Stops with SIGTERM and waits (bounded), then kills.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            wait(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
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
