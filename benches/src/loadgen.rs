//! The harness's own load generators, on std threads and blocking keep-alive sockets:
//!
//! - [`run`]: open-loop at a fixed rate (each connection sends on its own schedule; latency is measured
//!   from the *scheduled* send time, so a slow server cannot hide its queueing — no coordinated
//!   omission), or closed-loop as fast as answers come when no rate is given; one thread, non-blocking
//!   sockets (mio), so a pinned generator does not crowd its core with threads;
//! - [`streams`]: many concurrent streamed requests at once, with time to first byte, the delays between
//!   events, and the server's peak RSS while they are open; also one thread;
//! - [`open_idle`]: many keep-alive connections, each used once and then left idle (blocking sockets
//!   on a few threads: nothing is timed there).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::client::{Conn, Response, ResponseParser};
use crate::procs;

/// Percentiles of a latency sample, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    /// From samples in microseconds (sorted in place).
    pub fn of_us(samples: &mut [u64]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples.get(i).copied().unwrap_or(0) as f64 / 1000.0
        };
        let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1000.0;
        Percentiles { p50: at(0.50), p99: at(0.99), p999: at(0.999), max: at(1.0), mean }
    }
}

/// What one [`run`] measured.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// Target rate (requests/s), `None` for closed loop.
    pub rate: Option<f64>,
    /// Answered requests with a 2xx status.
    pub ok: u64,
    /// Transport errors and non-2xx answers.
    pub errors: u64,
    /// Requests scheduled before the end that were never sent (the server fell behind the rate);
    /// counted in the latency sample with the time they had waited by the end.
    pub unsent: u64,
    pub rps: f64,
    pub latency: Percentiles,
}

/// One non-blocking connection of the event loop.
struct Slot {
    stream: Option<TcpStream>,
    connected: bool,
    inbuf: Vec<u8>,
    parser: ResponseParser,
    /// Bytes of the request still to write.
    out_pos: Option<usize>,
    busy: bool,
    /// When the request in flight was due (open loop) or sent (closed loop).
    scheduled: Instant,
    /// Index of the next request on this connection's schedule.
    next: u32,
    first: Instant,
}

impl Slot {
    fn open(poll: &Poll, addr: SocketAddr, token: usize) -> io::Result<TcpStream> {
        let mut stream = TcpStream::connect(addr)?;
        poll.registry().register(&mut stream, Token(token), Interest::READABLE | Interest::WRITABLE)?;
        Ok(stream)
    }

    fn reopen(&mut self, poll: &Poll, addr: SocketAddr, token: usize) {
        if let Some(mut old) = self.stream.take() {
            let _ = poll.registry().deregister(&mut old);
        }
        self.stream = Slot::open(poll, addr, token).ok();
        self.connected = false;
        self.inbuf.clear();
        self.parser = ResponseParser::new();
        self.out_pos = None;
        self.busy = false;
    }

    /// Writes what is left of `req`; false on a write error.
    fn flush(&mut self, req: &[u8]) -> bool {
        let (Some(stream), Some(mut pos)) = (self.stream.as_mut(), self.out_pos) else { return true };
        while pos < req.len() {
            match stream.write(req.get(pos..).unwrap_or_default()) {
                Ok(0) => return false,
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.out_pos = Some(pos);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.out_pos = None;
        true
    }

    fn send(&mut self, req: &[u8], scheduled: Instant) -> bool {
        self.busy = true;
        self.scheduled = scheduled;
        self.out_pos = Some(0);
        self.flush(req)
    }

    /// Reads until the socket would block; returns the responses completed (usually zero or one) and
    /// whether the connection failed or closed.
    fn read(&mut self, on_data: &mut dyn FnMut(Instant, &[u8])) -> (Vec<Response>, bool) {
        let mut done = Vec::new();
        let Some(stream) = self.stream.as_mut() else { return (done, true) };
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    if let Ok(r) = self.parser.eof() {
                        done.push(r);
                    }
                    return (done, true);
                }
                Ok(n) => {
                    self.inbuf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                    let at = Instant::now();
                    loop {
                        match self.parser.feed(&mut self.inbuf, at, on_data) {
                            Ok(Some(r)) => done.push(r),
                            Ok(None) => break,
                            Err(_) => return (done, true),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (done, false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return (done, true),
            }
        }
    }
}

/// Drives `addr` with `req` over `conns` keep-alive connections for `duration`, at `rate` requests/s in
/// total (open loop: each connection sends on its own schedule, interleaved with the others; a
/// request whose slot comes while its connection is busy goes out as soon as it is free, and its
/// latency still counts from the slot) or as fast as answers come (closed loop, `rate` `None`). One
/// thread, non-blocking sockets: the generator's own scheduling adds no queueing of its own. Ends by
/// `duration + timeout`.
pub fn run(
    addr: SocketAddr,
    req: Arc<Vec<u8>>,
    conns: usize,
    rate: Option<f64>,
    duration: Duration,
    timeout: Duration,
) -> RunResult {
    let conns = conns.max(1);
    let Ok(mut poll) = Poll::new() else {
        return RunResult { rate, errors: 1, ..RunResult::default() };
    };
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + duration;
    let hard_end = end + timeout;
    let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / r.max(0.001)));
    let mut slots: Vec<Slot> = (0..conns)
        .map(|i| {
            let offset = interval.map(|iv| iv.mul_f64(i as f64 / conns as f64)).unwrap_or_default();
            Slot {
                stream: Slot::open(&poll, addr, i).ok(),
                connected: false,
                inbuf: Vec::with_capacity(4096),
                parser: ResponseParser::new(),
                out_pos: None,
                busy: false,
                scheduled: start,
                next: 0,
                first: start + offset,
            }
        })
        .collect();
    let mut events = Events::with_capacity(1024);
    let mut lat: Vec<u64> = Vec::with_capacity(1 << 16);
    let mut errors = 0u64;
    loop {
        let now = Instant::now();
        if now >= hard_end || (now >= end && !slots.iter().any(|s| s.busy)) {
            break;
        }
        // Start every request that is due on a free, connected connection.
        let mut wake = end.min(now + Duration::from_millis(100));
        for (i, s) in slots.iter_mut().enumerate() {
            if s.stream.is_none() {
                errors += 1;
                s.reopen(&poll, addr, i);
                continue;
            }
            if s.busy || !s.connected {
                continue;
            }
            let due = match interval {
                Some(iv) => s.first + iv * s.next,
                None => now.max(start),
            };
            if due >= end {
                continue;
            }
            if due <= now {
                s.next += 1;
                let stamp = if interval.is_some() { due } else { now };
                if !s.send(&req, stamp) {
                    errors += 1;
                    s.reopen(&poll, addr, i);
                }
            } else {
                wake = wake.min(due);
            }
        }
        // epoll waits in whole milliseconds: block only when the next send is at least that far off;
        // closer than that, poll without blocking and yield the core (to the mock sharing it), so
        // sends leave on time and the measured latency is the server's, not the generator's.
        let wait = wake.saturating_duration_since(Instant::now());
        let timeout =
            if wait >= Duration::from_millis(2) { wait - Duration::from_millis(1) } else { Duration::ZERO };
        if poll.poll(&mut events, Some(timeout)).is_err() {
            continue;
        }
        if timeout.is_zero() && events.is_empty() {
            std::thread::yield_now();
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(s) = slots.get_mut(i) else { continue };
            if ev.is_writable() && !s.connected {
                let ok = s.stream.as_ref().is_some_and(|st| st.peer_addr().is_ok());
                if ok {
                    s.connected = true;
                    if let Some(st) = s.stream.as_ref() {
                        let _ = st.set_nodelay(true);
                    }
                } else if ev.is_error() || ev.is_write_closed() {
                    errors += 1;
                    s.reopen(&poll, addr, i);
                    continue;
                }
            }
            if ev.is_writable() && s.out_pos.is_some() && !s.flush(&req) {
                errors += 1;
                s.reopen(&poll, addr, i);
                continue;
            }
            if ev.is_readable() {
                let (done, closed) = s.read(&mut |_, _| {});
                for r in done {
                    if s.busy && (200..300).contains(&r.status) {
                        lat.push(s.scheduled.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                    s.busy = false;
                }
                if closed {
                    if s.busy {
                        errors += 1;
                    }
                    s.reopen(&poll, addr, i);
                }
            }
        }
    }
    // Requests whose slot came before the end but that never went out count with their wait so far;
    // so do requests still unanswered at the hard end.
    let stop = Instant::now();
    let mut unsent = 0u64;
    for s in &slots {
        if s.busy {
            lat.push(stop.saturating_duration_since(s.scheduled).as_micros() as u64);
            unsent += 1;
        }
        if let Some(iv) = interval {
            let mut k = s.next;
            while s.first + iv * k < end {
                lat.push(stop.saturating_duration_since(s.first + iv * k).as_micros() as u64);
                unsent += 1;
                k += 1;
            }
        }
    }
    let ok = (lat.len() as u64).saturating_sub(unsent);
    let latency = Percentiles::of_us(&mut lat);
    RunResult { rate, ok, errors, unsent, rps: ok as f64 / duration.as_secs_f64(), latency }
}

/// What [`streams`] measured.
#[derive(Debug, Clone, Default)]
pub struct StreamResult {
    pub streams: usize,
    pub ok: usize,
    pub errors: usize,
    /// From sending the request to the first body byte.
    pub ttfb: Percentiles,
    /// Between consecutive events (gaps under 1 ms — events arriving back to back — left out).
    pub gap: Percentiles,
    /// Mean events per stream.
    pub events: f64,
    /// Peak RSS of the server (process tree) while the streams were open, KiB.
    pub peak_rss_kib: Option<u64>,
    /// Why streams failed (the most common reason), when some did.
    pub failure: Option<String>,
}

/// Per-stream timing.
#[derive(Default)]
struct StreamTrack {
    sent: Option<Instant>,
    first: Option<Instant>,
    arrivals: Vec<Instant>,
    events: usize,
    last_newline: bool,
    status: Option<u16>,
    failed: bool,
}

impl StreamTrack {
    fn data(&mut self, at: Instant, data: &[u8]) {
        self.first.get_or_insert(at);
        // An event ends at a blank line: "\n\n", possibly split across pieces.
        let mut ended = 0;
        for b in data {
            if *b == b'\n' {
                if self.last_newline {
                    ended += 1;
                    self.last_newline = false;
                } else {
                    self.last_newline = true;
                }
            } else if *b != b'\r' {
                self.last_newline = false;
            }
        }
        if ended > 0 {
            self.events += ended;
            self.arrivals.push(at);
        }
    }
}

/// Opens `n` connections, then sends `req` (a streamed request) on all of them at once and reads every
/// event, on one thread. Samples the RSS of `pid` (and its descendants) every 50 ms meanwhile. Ends
/// by `timeout` after the send.
pub fn streams(
    addr: SocketAddr,
    req: Arc<Vec<u8>>,
    n: usize,
    timeout: Duration,
    pid: Option<u32>,
) -> StreamResult {
    let mut result = StreamResult { streams: n, errors: n, ..StreamResult::default() };
    let Ok(mut poll) = Poll::new() else { return result };
    let connect_by = Instant::now() + Duration::from_secs(10);
    let mut slots: Vec<Slot> = (0..n)
        .map(|i| Slot {
            stream: Slot::open(&poll, addr, i).ok(),
            connected: false,
            inbuf: Vec::with_capacity(4096),
            parser: ResponseParser::new(),
            out_pos: None,
            busy: false,
            scheduled: Instant::now(),
            next: 0,
            first: Instant::now(),
        })
        .collect();
    let mut tracks: Vec<StreamTrack> = (0..n).map(|_| StreamTrack::default()).collect();
    let mut events = Events::with_capacity(1024);
    // Connect everything first.
    while Instant::now() < connect_by && slots.iter().any(|s| s.stream.is_some() && !s.connected) {
        if poll.poll(&mut events, Some(Duration::from_millis(50))).is_err() {
            continue;
        }
        for ev in events.iter() {
            if let Some(s) = slots.get_mut(ev.token().0)
                && ev.is_writable()
                && !s.connected
            {
                s.connected = s.stream.as_ref().is_some_and(|st| st.peer_addr().is_ok());
                if let Some(st) = s.stream.as_ref() {
                    let _ = st.set_nodelay(true);
                }
            }
        }
    }
    // Then send on all at once.
    let sent = Instant::now();
    for (s, t) in slots.iter_mut().zip(tracks.iter_mut()) {
        if s.connected && s.send(&req, sent) {
            t.sent = Some(sent);
        } else {
            t.failed = true;
        }
    }
    let deadline = sent + timeout;
    let mut peak: Option<u64> = None;
    let mut next_sample = Instant::now();
    let mut open = tracks.iter().filter(|t| !t.failed).count();
    while open > 0 && Instant::now() < deadline {
        if Instant::now() >= next_sample {
            if let Some(p) = pid.and_then(procs::rss_tree_kib) {
                peak = Some(peak.map_or(p, |q| q.max(p)));
            }
            next_sample = Instant::now() + Duration::from_millis(50);
        }
        if poll.poll(&mut events, Some(Duration::from_millis(50))).is_err() {
            continue;
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let (Some(s), Some(t)) = (slots.get_mut(i), tracks.get_mut(i)) else { continue };
            if t.failed || t.status.is_some() {
                continue;
            }
            if ev.is_writable() && s.out_pos.is_some() && !s.flush(&req) {
                t.failed = true;
                open -= 1;
                continue;
            }
            if ev.is_readable() {
                let (done, closed) = s.read(&mut |at, d| t.data(at, d));
                if let Some(r) = done.first() {
                    t.status = Some(r.status);
                    open -= 1;
                } else if closed {
                    t.failed = true;
                    open -= 1;
                }
            }
        }
    }
    drop(slots);
    let (mut ttfb, mut gaps, mut events_total, mut ok) = (Vec::new(), Vec::new(), 0usize, 0usize);
    let mut reasons: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for t in &tracks {
        let reason = match (t.failed, t.status, t.sent) {
            (_, _, None) => Some("not connected".to_string()),
            (true, _, _) => Some("connection failed or closed".to_string()),
            (false, None, _) => Some("no complete answer before the timeout".to_string()),
            (false, Some(s), _) if !(200..300).contains(&s) => Some(format!("HTTP {s}")),
            (false, Some(_), _) if t.events == 0 => Some("no events".to_string()),
            _ => None,
        };
        if let Some(r) = reason {
            *reasons.entry(r).or_default() += 1;
        }
        let good = !t.failed && t.status.is_some_and(|s| (200..300).contains(&s)) && t.events > 0;
        let (Some(sent), Some(first), true) = (t.sent, t.first, good) else { continue };
        ok += 1;
        ttfb.push(first.saturating_duration_since(sent).as_micros() as u64);
        events_total += t.events;
        gaps.extend(
            t.arrivals
                .windows(2)
                .filter_map(|w| match w {
                    [a, b] => Some(b.saturating_duration_since(*a).as_micros() as u64),
                    _ => None,
                })
                .filter(|g| *g >= 1000),
        );
    }
    result.ok = ok;
    result.errors = n - ok;
    result.ttfb = Percentiles::of_us(&mut ttfb);
    result.gap = Percentiles::of_us(&mut gaps);
    result.events = if ok > 0 { events_total as f64 / ok as f64 } else { 0.0 };
    result.peak_rss_kib = peak;
    result.failure = reasons.into_iter().max_by_key(|(_, n)| *n).map(|(r, n)| format!("{n} × {r}"));
    result
}

/// Idle keep-alive connections held open by the harness.
pub struct IdleConns {
    pub conns: Vec<Conn>,
    /// Connections that completed one request before going idle.
    pub primed: usize,
    pub failed: usize,
}

/// Opens `n` connections to `addr` from `threads` threads, sends `req` once on each (while before
/// `deadline`) and keeps them open.
pub fn open_idle(
    addr: SocketAddr,
    req: Arc<Vec<u8>>,
    n: usize,
    threads: usize,
    deadline: Instant,
    timeout: Duration,
) -> IdleConns {
    let threads = threads.clamp(1, n.max(1));
    let handles: Vec<JoinHandle<(Vec<Conn>, usize, usize)>> = (0..threads)
        .filter_map(|t| {
            let req = req.clone();
            let count = n / threads + usize::from(t < n % threads);
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let (mut conns, mut primed, mut failed) = (Vec::with_capacity(count), 0, 0);
                    for _ in 0..count {
                        match Conn::connect(&addr, timeout) {
                            Ok(c) => conns.push(c),
                            Err(_) => failed += 1,
                        }
                    }
                    let mut kept = Vec::with_capacity(conns.len());
                    for mut c in conns {
                        if Instant::now() < deadline {
                            match c.roundtrip(&req) {
                                Ok(r) if !r.close => {
                                    primed += 1;
                                    kept.push(c);
                                }
                                _ => failed += 1,
                            }
                        } else {
                            kept.push(c);
                        }
                    }
                    (kept, primed, failed)
                })
                .ok()
        })
        .collect();
    let mut out = IdleConns { conns: Vec::with_capacity(n), primed: 0, failed: 0 };
    for h in handles {
        if let Ok((c, p, f)) = h.join() {
            out.conns.extend(c);
            out.primed += p;
            out.failed += f;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut s: Vec<u64> = (1..=1000).map(|x| x * 1000).collect();
        let p = Percentiles::of_us(&mut s);
        assert_eq!((p.p50, p.p99, p.p999, p.max), (500.0, 990.0, 999.0, 1000.0));
        assert_eq!(Percentiles::of_us(&mut []), Percentiles::default());
    }
}
