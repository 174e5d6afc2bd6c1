//! The end-to-end test harness: the real `burncloud` binary and the project's mock upstream as child
//! processes, a small blocking HTTP/1.1 client (one request per connection, or keep-alive with
//! [`Client`]), and management-API helpers; for billing tests also a `redis-server` ([`Redis`]) and a
//! Postgres cluster ([`PgCluster`]) of the test's own, to kill, stop and restart under load.
//!
//! Owns process lifetimes and test isolation: every child is killed on drop, every wait is bounded
//! (reads time out, start-up and exit waits give up after [`WAIT`]), and every gateway gets a fresh
//! database (a SQLite file in a temporary folder, or a new Postgres database when
//! `BURNCLOUD_TEST_DB=postgres`) that is removed when the last gateway using it is gone.
//!
//! Plain std only: no async runtime, no TLS. This code runs on test threads, never on a gateway
//! executor, so blocking is what it is for.

// Test tooling: failing the calling test with a message is how every helper here reports an error.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The longest any single wait in the harness may take (start-up, exit, one socket read).
pub const WAIT: Duration = Duration::from_secs(30);

/// The root management key every test gateway is started with (32 characters).
pub const ADMIN_KEY: &str = "bc-test-admin-key-0123456789abcd";

/// The upstream key test channels are created with; the mock must see this one, never the client's.
pub const CHANNEL_KEY: &str = "sk-channel-upstream-key-for-tests";

/// The `anthropic-version` header test clients send.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The Gemini path of `model` under `prefix` (`/v1beta` or `/v1`): `:generateContent`, or
/// `:streamGenerateContent?alt=sse` when `stream`.
pub fn gemini_path(prefix: &str, model: &str, stream: bool) -> String {
    if stream {
        format!("{prefix}/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("{prefix}/models/{model}:generateContent")
    }
}

// ---------------------------------------------------------------- small utilities

/// Blocks the calling test thread.
#[allow(clippy::disallowed_methods)] // a test thread, not an executor: blocking is the point
pub fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// A random 64-bit number (std's per-process random hash keys, mixed with a counter and the clock).
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    RandomState::new().hash_one((n, nanos, std::process::id()))
}

/// A short random lowercase name with a prefix, for users, databases and folders.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}{:012x}", random_u64() & 0xffff_ffff_ffff)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The workspace root (the parent of this crate's folder).
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The gateway binary under test: `$BURNCLOUD_BIN`, else `<workspace>/target/debug/burncloud`.
pub fn gateway_bin() -> PathBuf {
    match std::env::var_os("BURNCLOUD_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_dir().join("target/debug/burncloud"),
    }
}

/// The mock upstream binary: `$BURNCLOUD_MOCK_BIN`, else `burncloud-mock` beside the running test
/// binary's folder (`target/debug/deps/..`), else `<workspace>/target/debug/burncloud-mock`.
pub fn mock_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BURNCLOUD_MOCK_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(Path::parent).map(|d| d.join("burncloud-mock")));
    match beside {
        Some(p) if p.exists() => p,
        _ => workspace_dir().join("target/debug/burncloud-mock"),
    }
}

/// A temporary folder, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------- child processes

/// A child process that announced `listening on ADDR` on stdout. Killed and reaped on drop; when the
/// test is failing, its stderr is printed to help tell a gateway bug from a test bug.
pub struct Process {
    name: String,
    child: Child,
    pub addr: SocketAddr,
    stderr: Option<JoinHandle<String>>,
    exited: Option<ExitStatus>,
}

impl Process {
    /// Spawns `cmd` (stdout and stderr piped) and waits up to [`WAIT`] for its `listening on` line.
    pub fn spawn(name: &str, mut cmd: Command) -> Process {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let stderr = stderr.map(|mut s| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = s.read_to_string(&mut text);
                text
            })
        });
        let (tx, rx) = mpsc::channel();
        if let Some(out) = stdout {
            // Keeps draining stdout for the child's whole life so it never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = line.trim().strip_prefix("listening on ") {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
            });
        }
        let mut process =
            Process { name: name.to_string(), child, addr: ([0, 0, 0, 0], 0).into(), stderr, exited: None };
        match rx.recv_timeout(WAIT) {
            Ok(addr) => {
                process.addr =
                    addr.parse().unwrap_or_else(|e| panic!("{name} printed a bad address {addr:?}: {e}"));
                process
            }
            Err(_) => {
                let _ = process.child.kill();
                let status = process.child.wait();
                let stderr = process.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
                panic!(
                    "{name} did not print `listening on` within {WAIT:?} (exit: {status:?})\nstderr:\n{stderr}"
                );
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (through the `kill` utility) and waits up to [`WAIT`] for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let sent = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        assert!(matches!(sent, Ok(s) if s.success()), "kill -TERM {} failed: {sent:?}", self.pid());
        self.wait_exit(WAIT)
    }

    /// Waits up to `limit` for the child to exit; kills it and fails the test past that.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exited = Some(status);
                    return status;
                }
                Ok(None) if Instant::now() < deadline => pause(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let stderr = self.take_stderr();
                    panic!("{} did not exit within {limit:?}\nstderr:\n{stderr}", self.name);
                }
                Err(e) => panic!("waiting for {}: {e}", self.name),
            }
        }
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the child wrote to stderr; only complete once it has exited (kills it otherwise).
    pub fn take_stderr(&mut self) -> String {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let stderr = self.take_stderr();
            if !stderr.trim().is_empty() {
                eprintln!("---- {} stderr ----\n{stderr}---- end of {} stderr ----", self.name, self.name);
            }
        }
    }
}

// ---------------------------------------------------------------- databases

/// Which database a gateway runs on; one per test, shared by the gateways of a restart test.
#[derive(Debug)]
pub enum TestDatabase {
    Sqlite { dir: TempDir },
    Postgres { base_url: String, name: String },
}

impl TestDatabase {
    /// A fresh, empty database of the kind `BURNCLOUD_TEST_DB` selects (`sqlite` by default).
    pub fn new() -> Arc<TestDatabase> {
        let kind = std::env::var("BURNCLOUD_TEST_DB").unwrap_or_default();
        let db = match kind.as_str() {
            "" | "sqlite" => TestDatabase::Sqlite { dir: TempDir::new("bc-it-db-") },
            "postgres" => {
                let base_url = std::env::var("BURNCLOUD_TEST_POSTGRES_URL")
                    .ok()
                    .filter(|u| !u.is_empty())
                    .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432".into())
                    .trim_end_matches('/')
                    .to_string();
                let name = unique_name("bc_it_");
                psql(&base_url, &format!("CREATE DATABASE {name}"));
                TestDatabase::Postgres { base_url, name }
            }
            other => panic!("BURNCLOUD_TEST_DB must be sqlite or postgres, not {other:?}"),
        };
        Arc::new(db)
    }

    /// The `BURNCLOUD_DATABASE_URL` for this database.
    pub fn url(&self) -> String {
        match self {
            TestDatabase::Sqlite { dir } => format!("sqlite://{}", dir.path().join("bc.db").display()),
            TestDatabase::Postgres { base_url, name } => format!("{base_url}/{name}"),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let TestDatabase::Postgres { base_url, name } = self {
            let _ = run_psql(base_url, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}

fn run_psql(base_url: &str, sql: &str) -> io::Result<std::process::Output> {
    Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &format!("{base_url}/test"), "-c", sql])
        .stdin(Stdio::null())
        .output()
}

fn psql(base_url: &str, sql: &str) {
    match run_psql(base_url, sql) {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("psql {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("psql {sql:?} could not run (is postgresql-client installed?): {e}"),
    }
}

// ---------------------------------------------------------------- the gateway

/// How to start a gateway: extra `BURNCLOUD_*` settings and, for restarts, the database to reuse.
#[derive(Debug, Default, Clone)]
pub struct GatewayOptions {
    env: Vec<(String, String)>,
    database: Option<Arc<TestDatabase>>,
    pricing_required: bool,
}

impl GatewayOptions {
    pub fn new() -> GatewayOptions {
        GatewayOptions::default()
    }

    /// Sets one environment variable of the gateway (overrides the harness defaults).
    pub fn env(mut self, key: &str, value: impl ToString) -> GatewayOptions {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Keeps the product default for models without a price (refused with 403
    /// `model_price_not_configured`). Without it the harness turns on `SelfUseModeEnabled` on a fresh
    /// database, so tests of other behaviour can use made-up model names; billing tests set ratios.
    pub fn pricing_required(mut self) -> GatewayOptions {
        self.pricing_required = true;
        self
    }

    /// Runs on an existing database (a restart) instead of a fresh one.
    pub fn database(mut self, db: &Arc<TestDatabase>) -> GatewayOptions {
        self.database = Some(db.clone());
        self
    }
}

/// A running `burncloud serve` on a free loopback port.
pub struct Gateway {
    process: Process,
    pub addr: SocketAddr,
    database: Arc<TestDatabase>,
    _cwd: TempDir,
}

impl Gateway {
    /// Starts the gateway with two workers, the test admin key, quiet logs and a fresh database.
    pub fn start(opts: GatewayOptions) -> Gateway {
        let fresh = opts.database.is_none();
        let database = opts.database.clone().unwrap_or_else(TestDatabase::new);
        let cwd = TempDir::new("bc-it-gw-");
        let mut cmd = Command::new(gateway_bin());
        cmd.arg("serve").current_dir(cwd.path());
        // The gateway refuses unknown BURNCLOUD_* settings: pass none of the test runner's own.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BURNCLOUD_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("BURNCLOUD_LISTEN", "127.0.0.1:0")
            .env("BURNCLOUD_WORKERS", "2")
            .env("BURNCLOUD_ADMIN_KEY", ADMIN_KEY)
            .env("BURNCLOUD_DATABASE_URL", database.url())
            .env("BURNCLOUD_LOG", "warn");
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let process = Process::spawn("gateway", cmd);
        let addr = process.addr;
        let gw = Gateway { process, addr, database, _cwd: cwd };
        if fresh && !opts.pricing_required {
            gw.put_option("SelfUseModeEnabled", "true");
        }
        gw
    }

    /// The database this gateway runs on, to start another gateway on it.
    pub fn database(&self) -> Arc<TestDatabase> {
        self.database.clone()
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub fn terminate(&mut self) -> ExitStatus {
        self.process.terminate()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Everything the gateway wrote to stderr; complete only once it has exited (call
    /// [`terminate`](Self::terminate) first).
    pub fn take_stderr(&mut self) -> String {
        self.process.take_stderr()
    }

    /// `http://ADDR`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    // ------------------------------------------------------------ relay calls

    /// `POST path` with a JSON body and `Authorization: Bearer key`.
    pub fn post(&self, path: &str, key: &str, body: &Value) -> Response {
        HttpRequest::post(path).bearer(key).json(body).send(self.addr)
    }

    /// `POST /v1/chat/completions`.
    pub fn chat(&self, key: &str, body: &Value) -> Response {
        self.post("/v1/chat/completions", key, body)
    }

    /// `POST /v1/messages` (Anthropic Messages) with `x-api-key` and `anthropic-version`, as the
    /// Anthropic SDKs send it.
    pub fn messages(&self, key: &str, body: &Value) -> Response {
        HttpRequest::post("/v1/messages")
            .header("x-api-key", key)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(body)
            .send(self.addr)
    }

    /// Gemini `POST /v1beta/models/{model}:generateContent`, or `:streamGenerateContent?alt=sse`
    /// when `stream`, with `x-goog-api-key`, as the google-genai SDK sends it.
    pub fn generate_content(&self, key: &str, model: &str, stream: bool, body: &Value) -> Response {
        HttpRequest::post(&gemini_path("/v1beta", model, stream))
            .header("x-goog-api-key", key)
            .json(body)
            .send(self.addr)
    }

    // ------------------------------------------------------------ management API

    /// A management call with the admin key; the raw response.
    pub fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let mut req = HttpRequest::new(method, path).bearer(ADMIN_KEY);
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send(self.addr)
    }

    /// A management call that must succeed: HTTP 200 and `success: true`; returns `data`.
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let resp = self.admin(method, path, body);
        let v = resp.json();
        assert!(
            resp.status == 200 && v["success"] == json!(true),
            "{method} {path} with {body:?} failed: HTTP {} {v}",
            resp.status
        );
        v["data"].clone()
    }

    /// Creates a channel from `fields` over defaults (openai type, [`CHANNEL_KEY`], group `default`,
    /// model `gpt-x`); returns its id.
    pub fn create_channel(&self, fields: Value) -> i64 {
        let mut body = json!({
            "name": unique_name("channel-"),
            "type": "openai",
            "key": CHANNEL_KEY,
            "models": "gpt-x",
            "group": "default",
            "priority": 0,
            "weight": 0,
        });
        merge(&mut body, fields);
        id_of(&self.api("POST", "/api/channel/", Some(&body)))
    }

    /// Creates a user from `fields` over defaults (random name, group `default`, 100M quota).
    pub fn create_user(&self, fields: Value) -> i64 {
        let mut body = json!({
            "username": unique_name("user-"),
            "password": "correct-horse-battery",
            "group": "default",
            "quota": 100_000_000,
        });
        merge(&mut body, fields);
        id_of(&self.api("POST", "/api/user/", Some(&body)))
    }

    /// Creates an API key for `user_id` from `fields` over defaults (unlimited, never expires).
    pub fn create_token(&self, user_id: i64, fields: Value) -> ApiKey {
        let mut body = json!({
            "user_id": user_id,
            "name": unique_name("key-"),
            "remain_quota": -1,
            "unlimited_quota": true,
            "expired_time": -1,
        });
        merge(&mut body, fields);
        let data = self.api("POST", "/api/token/", Some(&body));
        let key = data["key"].as_str().unwrap_or_default().to_string();
        assert!(
            key.starts_with("sk-"),
            "POST /api/token/ returned key {:?}, not a full sk-… key",
            data["key"]
        );
        ApiKey { id: id_of(&data), key }
    }

    /// `PUT /api/option/` with `{"key","value"}`.
    pub fn put_option(&self, key: &str, value: &str) {
        self.api("PUT", "/api/option/", Some(&json!({"key": key, "value": value})));
    }

    /// `GET /api/log/?query`: the items and the total.
    pub fn log_page(&self, query: &str) -> (Vec<Value>, i64) {
        let data = self.api("GET", &format!("/api/log/?{query}"), None);
        let items = data["items"].as_array().cloned().unwrap_or_default();
        let total = data["total"].as_i64().unwrap_or_else(|| panic!("log list without a total: {data}"));
        (items, total)
    }

    /// The log items matching `query` (e.g. `type=2&token_id=3`), up to 1000 of them.
    pub fn logs(&self, query: &str) -> Vec<Value> {
        self.log_page(&format!("page_size=1000&{query}")).0
    }

    /// The consume log (type 2) whose `request_id` is `request_id`.
    pub fn consume_log(&self, request_id: &str) -> Value {
        let logs = self.logs(&format!("type=2&request_id={request_id}"));
        match &logs[..] {
            [one] if one["request_id"] == json!(request_id) => one.clone(),
            _ => panic!("not one consume log with request_id {request_id}: {logs:?}"),
        }
    }
}

/// A created API key: its id and the full `sk-…` secret.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: i64,
    pub key: String,
}

fn id_of(data: &Value) -> i64 {
    data["id"].as_i64().unwrap_or_else(|| panic!("expected an object with an id, got {data}"))
}

/// Overlays the fields of `over` onto `base` (both JSON objects).
pub fn merge(base: &mut Value, over: Value) {
    if let (Some(b), Value::Object(o)) = (base.as_object_mut(), over) {
        b.extend(o);
    }
}

// ---------------------------------------------------------------- the mock upstream

/// The project's mock upstream (`burncloud-mock`), on a free loopback port.
pub struct Mock {
    process: Process,
    pub addr: SocketAddr,
}

impl Mock {
    /// Starts the mock with `--listen 127.0.0.1:0` plus `args`.
    pub fn start(args: &[&str]) -> Mock {
        let mut cmd = Command::new(mock_bin());
        cmd.args(["--listen", "127.0.0.1:0"]).args(args);
        let process = Process::spawn("mock", cmd);
        let addr = process.addr;
        Mock { process, addr }
    }

    /// `http://ADDR`: the `base_url` of a channel pointing at this mock.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the mock's behaviour (`PUT /_mock/behaviour`).
    pub fn behave(&self, behaviour: Value) {
        let resp = HttpRequest::put("/_mock/behaviour").json(&behaviour).send(self.addr);
        assert!(resp.is_success(), "PUT /_mock/behaviour {behaviour}: HTTP {} {}", resp.status, resp.text());
    }

    /// Back to the default behaviour (`DELETE /_mock/behaviour`).
    pub fn reset(&self) {
        let resp = HttpRequest::delete("/_mock/behaviour").send(self.addr);
        assert!(resp.is_success(), "DELETE /_mock/behaviour: HTTP {}", resp.status);
    }

    /// The requests the mock received so far, oldest first.
    pub fn requests(&self) -> Vec<MockRequest> {
        let resp = HttpRequest::get("/_mock/requests").send(self.addr);
        assert!(resp.is_success(), "GET /_mock/requests: HTTP {}", resp.status);
        let v = resp.json();
        let list = match &v {
            Value::Array(a) => a.clone(),
            other => other["requests"].as_array().cloned().unwrap_or_default(),
        };
        list.into_iter().map(MockRequest).collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        let resp = HttpRequest::delete("/_mock/requests").send(self.addr);
        assert!(resp.is_success(), "DELETE /_mock/requests: HTTP {}", resp.status);
    }

    /// `GET /_mock/stats`.
    pub fn stats(&self) -> Value {
        HttpRequest::get("/_mock/stats").send(self.addr).json()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// One request recorded by the mock.
#[derive(Debug, Clone)]
pub struct MockRequest(pub Value);

impl MockRequest {
    pub fn method(&self) -> &str {
        self.0["method"].as_str().unwrap_or_default()
    }

    pub fn path(&self) -> &str {
        self.0["path"].as_str().unwrap_or_default()
    }

    /// A header by name, any case; headers may be recorded as an object or as `[name, value]` pairs.
    pub fn header(&self, name: &str) -> Option<String> {
        match &self.0["headers"] {
            Value::Object(map) => {
                map.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).and_then(|(_, v)| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_string),
                    _ => None,
                })
            }
            Value::Array(list) => list.iter().find_map(|h| {
                let (k, v) = match h {
                    Value::Array(pair) => (pair.first()?.as_str()?, pair.get(1)?.as_str()?),
                    Value::Object(o) => (o.get("name")?.as_str()?, o.get("value")?.as_str()?),
                    _ => return None,
                };
                k.eq_ignore_ascii_case(name).then(|| v.to_string())
            }),
            _ => None,
        }
    }

    /// The request body as JSON (recorded as a JSON value or as text holding JSON).
    pub fn json(&self) -> Value {
        match &self.0["body"] {
            Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
            other => other.clone(),
        }
    }
}

// ---------------------------------------------------------------- a blocking HTTP/1.1 client

/// One HTTP/1.1 request, sent on a new connection with `Connection: close`.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    pub fn new(method: &str, path: &str) -> HttpRequest {
        HttpRequest { method: method.into(), path: path.into(), headers: Vec::new(), body: Vec::new() }
    }

    pub fn get(path: &str) -> HttpRequest {
        HttpRequest::new("GET", path)
    }

    pub fn post(path: &str) -> HttpRequest {
        HttpRequest::new("POST", path)
    }

    pub fn put(path: &str) -> HttpRequest {
        HttpRequest::new("PUT", path)
    }

    pub fn delete(path: &str) -> HttpRequest {
        HttpRequest::new("DELETE", path)
    }

    pub fn header(mut self, name: &str, value: &str) -> HttpRequest {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn bearer(self, key: &str) -> HttpRequest {
        self.header("Authorization", &format!("Bearer {key}"))
    }

    pub fn json(mut self, body: &Value) -> HttpRequest {
        self.body = body.to_string().into_bytes();
        self.header("Content-Type", "application/json")
    }

    /// A raw body (sent as is, with its Content-Length).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> HttpRequest {
        self.body = body.into();
        self
    }

    /// Sends and reads the whole response; fails the test on a transport error.
    pub fn send(&self, addr: SocketAddr) -> Response {
        self.try_send(addr).unwrap_or_else(|e| panic!("{} {} to {addr}: {e}", self.method, self.path))
    }

    /// Sends and reads the whole response.
    pub fn try_send(&self, addr: SocketAddr) -> io::Result<Response> {
        let mut stream = self.open(addr)?;
        let mut body = Vec::new();
        while let Some(chunk) = stream.next_chunk()? {
            body.extend_from_slice(&chunk);
        }
        Ok(Response { status: stream.status, headers: stream.headers, body })
    }

    /// Sends and returns once the response head has arrived; the body is read piece by piece.
    pub fn open(&self, addr: SocketAddr) -> io::Result<ResponseStream> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.set_write_timeout(Some(WAIT))?;
        stream.set_nodelay(true)?;
        let mut head =
            format!("{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n", self.method, self.path);
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !self.body.is_empty() || matches!(self.method.as_str(), "POST" | "PUT") {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        // A server may answer (413, 431) and stop reading before the whole request is sent: a failed
        // write is not the end, the answer may still be readable.
        let written = stream.write_all(&bytes);
        let reader = BufReader::new(stream);
        match ResponseStream::read_head(reader) {
            Ok(s) => Ok(s),
            Err(e) => Err(written.err().unwrap_or(e)),
        }
    }
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name`, any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; fails the test with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("HTTP {} body is not JSON ({e}): {:?}", self.status, self.text()))
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The OpenAI error `code`, after checking the whole error shape
    /// `{"error":{"message","type","code"}}`.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "HTTP {}: error without a message: {v}",
            self.status
        );
        assert!(
            err["type"].as_str().is_some_and(|t| !t.is_empty()),
            "HTTP {}: error without a type: {v}",
            self.status
        );
        err["code"]
            .as_str()
            .unwrap_or_else(|| panic!("HTTP {}: error without a string code: {v}", self.status))
            .into()
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        let mut decoder = SseDecoder::default();
        decoder.feed(&self.body);
        let mut out = Vec::new();
        while let Some(d) = decoder.next_data() {
            out.push(d);
        }
        out
    }

    /// The events of an SSE body with their `event:` names (Anthropic streams name every event), in
    /// order; events without data are skipped. A trailing event not ended by a blank line is kept
    /// too, flagged by [`SseEvent::complete`] being false.
    pub fn sse_events(&self) -> Vec<SseEvent> {
        let mut decoder = SseDecoder::default();
        decoder.feed(&self.body);
        let mut out = Vec::new();
        while let Some(e) = decoder.next_event() {
            out.push(e);
        }
        if let Some(e) = decoder.rest() {
            out.push(e);
        }
        out
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

#[derive(Debug)]
enum Framing {
    Length(u64),
    Chunked { done: bool },
    UntilClose { done: bool },
}

/// A response whose body is read as it arrives (SSE streams).
#[derive(Debug)]
pub struct ResponseStream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    framing: Framing,
    sse: SseDecoder,
}

impl ResponseStream {
    fn read_head(mut reader: BufReader<TcpStream>) -> io::Result<ResponseStream> {
        let status_line = read_line(&mut reader)?;
        if status_line.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"));
        }
        let mut parts = status_line.splitn(3, ' ');
        let status = match (parts.next(), parts.next()) {
            (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
            _ => None,
        }
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {status_line:?}"))
        })?;
        let mut headers = Vec::new();
        loop {
            let line = read_line(&mut reader)?;
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let chunked =
            find_header(&headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let length = find_header(&headers, "content-length").and_then(|v| v.parse::<u64>().ok());
        let framing = if chunked {
            Framing::Chunked { done: false }
        } else if let Some(n) = length {
            Framing::Length(n)
        } else if status == 204 || status == 304 || (100..200).contains(&status) {
            Framing::Length(0)
        } else {
            Framing::UntilClose { done: false }
        };
        Ok(ResponseStream { status, headers, reader, framing, sse: SseDecoder::default() })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The next piece of the body as it arrives; `None` at its end.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        match &mut self.framing {
            Framing::Length(0) => Ok(None),
            Framing::Length(left) => {
                let mut buf = vec![0; (*left).min(64 * 1024) as usize];
                let n = self.reader.read(&mut buf)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body shorter than Content-Length",
                    ));
                }
                *left -= n as u64;
                buf.truncate(n);
                Ok(Some(buf))
            }
            Framing::Chunked { done: true } | Framing::UntilClose { done: true } => Ok(None),
            Framing::Chunked { done } => {
                let size_line = read_line(&mut self.reader)?;
                let size_text = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {size_line:?}"))
                })?;
                if size == 0 {
                    *done = true;
                    while !read_line(&mut self.reader)?.is_empty() {}
                    return Ok(None);
                }
                let mut buf = vec![0; size];
                self.reader.read_exact(&mut buf)?;
                let crlf = read_line(&mut self.reader)?;
                if !crlf.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk not followed by CRLF"));
                }
                Ok(Some(buf))
            }
            Framing::UntilClose { done } => {
                let mut buf = vec![0; 64 * 1024];
                let n = self.reader.read(&mut buf)?;
                if n == 0 {
                    *done = true;
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some(buf))
            }
        }
    }

    /// The next SSE `data:` payload; `None` when the body ends.
    pub fn next_event(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(data) = self.sse.next_data() {
                return Ok(Some(data));
            }
            match self.next_chunk()? {
                Some(bytes) => self.sse.feed(&bytes),
                None => return Ok(None),
            }
        }
    }

    /// Reads the rest of the body.
    pub fn read_rest(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(c) = self.next_chunk()? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }
}

/// Reads one CRLF- (or LF-) terminated line without its terminator; empty at EOF.
fn read_line(reader: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = Vec::new();
    reader.by_ref().take(64 * 1024).read_until(b'\n', &mut line)?;
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 line"))
}

/// One Server-Sent Event: its `event:` name, if any, and its data (lines joined by `\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
    /// Whether a blank line ended it (false only for a cut-off last event).
    pub complete: bool,
}

impl SseEvent {
    /// The data as JSON; fails the test with the event when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {self:?}"))
    }

    fn parse(text: &str, complete: bool) -> Option<SseEvent> {
        let mut event = None;
        let mut data: Vec<&str> = Vec::new();
        for line in text.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = Some(value.to_string()),
                "data" => data.push(value),
                _ => {}
            }
        }
        (!data.is_empty()).then(|| SseEvent { event, data: data.join("\n"), complete })
    }
}

/// Splits an SSE byte stream into events and yields their `data` (multi-line data joined by `\n`).
#[derive(Debug, Default)]
struct SseDecoder {
    buf: Vec<u8>,
}

impl SseDecoder {
    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend(bytes.iter().filter(|b| **b != b'\r'));
    }

    fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.buf.windows(2).position(|w| w == b"\n\n")?;
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            if let Some(e) = SseEvent::parse(&String::from_utf8_lossy(&event[..end]), true) {
                return Some(e);
            }
        }
    }

    /// What is left after the last complete event, as an event, if it holds data.
    fn rest(&mut self) -> Option<SseEvent> {
        let rest: Vec<u8> = self.buf.drain(..).collect();
        SseEvent::parse(&String::from_utf8_lossy(&rest), false)
    }

    fn next_data(&mut self) -> Option<String> {
        loop {
            let end = self.buf.windows(2).position(|w| w == b"\n\n")?;
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            let event = String::from_utf8_lossy(&event[..end]).into_owned();
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                return Some(data.join("\n"));
            }
        }
    }
}

// ---------------------------------------------------------------- more databases, and process control

impl TestDatabase {
    /// A fresh SQLite database, whatever `BURNCLOUD_TEST_DB` says.
    pub fn sqlite() -> Arc<TestDatabase> {
        Arc::new(TestDatabase::Sqlite { dir: TempDir::new("bc-it-db-") })
    }

    /// A fresh database on the machine's Postgres (`BURNCLOUD_TEST_POSTGRES_URL`, default
    /// `postgres://postgres@127.0.0.1:5432`), whatever `BURNCLOUD_TEST_DB` says: for tests that run
    /// several gateway processes on one database, which SQLite does not support.
    pub fn postgres() -> Arc<TestDatabase> {
        let base_url = std::env::var("BURNCLOUD_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432".into());
        TestDatabase::postgres_on(&base_url)
    }

    /// As [`TestDatabase::postgres`], or `None` (after saying so) when that server cannot be reached
    /// outside CI; fails the test in CI.
    pub fn postgres_if_available() -> Option<Arc<TestDatabase>> {
        let base_url = std::env::var("BURNCLOUD_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432".into());
        let reachable =
            run_psql(base_url.trim_end_matches('/'), "SELECT 1").is_ok_and(|o| o.status.success());
        required(reachable, &format!("Postgres at {base_url} (with a database named test)"))
            .then(|| TestDatabase::postgres_on(&base_url))
    }

    /// A fresh database on the Postgres server at `base_url` (`postgres://user@host:port`, which must
    /// have a database named `test` to connect to first, as the harness's own servers do).
    pub fn postgres_on(base_url: &str) -> Arc<TestDatabase> {
        let base_url = base_url.trim_end_matches('/').to_string();
        let name = unique_name("bc_it_");
        psql(&base_url, &format!("CREATE DATABASE {name}"));
        Arc::new(TestDatabase::Postgres { base_url, name })
    }
}

impl Gateway {
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGKILL, then the exit status: the process gets no chance to settle, report or flush anything.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.process.exited {
            return s;
        }
        let sent = Command::new("kill").args(["-KILL", &self.pid().to_string()]).status();
        assert!(matches!(sent, Ok(s) if s.success()), "kill -KILL {} failed: {sent:?}", self.pid());
        self.process.wait_exit(WAIT)
    }
}

/// A loopback port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("binding a port: {e}"));
    listener.local_addr().map(|a| a.port()).unwrap_or_else(|e| panic!("local address: {e}"))
}

/// Whether a test that needs `what` may run: `true` when `found`; otherwise it fails the test under
/// `CI=true` (CI installs everything) and says loudly that it is skipped anywhere else.
pub fn required(found: bool, what: &str) -> bool {
    if !found {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "{what} is required in CI (.ci/run installs it)"
        );
        eprintln!("skipped: {what} is not available");
    }
    found
}

/// The first of `names` found as an executable in `PATH` or in one of `extra` folders.
fn find_binary(names: &[&str], extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(extra.iter().cloned());
    dirs.iter().flat_map(|d| names.iter().map(move |n| d.join(n))).find(|p| p.is_file())
}

// ---------------------------------------------------------------- a Redis server of the test's own

/// A `redis-server` child on a free loopback port, its data in a temporary folder: with
/// [`Redis::persistent`] `appendonly yes` + `appendfsync always` (so `kill -9` and a restart keep every
/// answered write, as production must run it), with [`Redis::volatile`] no persistence at all (a
/// restart comes back empty). Killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
    persistent: bool,
    bin: PathBuf,
}

impl Redis {
    /// `None` (after saying so) when `redis-server` is not installed outside CI; fails the test in CI.
    pub fn persistent() -> Option<Redis> {
        Redis::start(true)
    }

    pub fn volatile() -> Option<Redis> {
        Redis::start(false)
    }

    fn start(persistent: bool) -> Option<Redis> {
        let bin = find_binary(&["redis-server"], &[]);
        if !required(bin.is_some(), "redis-server") {
            return None;
        }
        let bin = bin?;
        let mut redis =
            Redis { child: None, port: free_port(), dir: TempDir::new("bc-it-redis-"), persistent, bin };
        redis.restart();
        Some(redis)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no shutdown save, no goodbye to clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on the same port and folder and waits until it answers `PING`
    /// (after loading its append-only file, when persistent).
    pub fn restart(&mut self) {
        self.kill();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"));
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display())));
        let deadline = Instant::now() + WAIT;
        loop {
            if self.command("PING").is_ok_and(|r| r == "+PONG") {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                panic!("redis-server on port {} exited with {status}:\n{log}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING in {WAIT:?}",
                self.port
            );
            pause(Duration::from_millis(10));
        }
    }

    /// Sends one inline command (`FLUSHALL`, `DBSIZE`, …) and returns the first line of the reply.
    pub fn command(&self, line: &str) -> io::Result<String> {
        let mut stream =
            TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{line}\r\n").as_bytes())?;
        let mut reader = BufReader::new(stream);
        read_line(&mut reader)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- a Postgres cluster of the test's own

/// A throwaway Postgres cluster (`initdb` + `pg_ctl`) on a free loopback port, its data and socket in
/// a temporary folder, with trust authentication for `postgres` and a `test` database: for tests that
/// stop the database under load (the machine's Postgres is never touched). As root, every command runs
/// as the `postgres` user (`su`). Stopped (immediately) and removed on drop.
pub struct PgCluster {
    dir: TempDir,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
    running: bool,
}

impl PgCluster {
    /// `None` (after saying so) when `initdb`/`pg_ctl` are not installed outside CI; fails in CI.
    pub fn start() -> Option<PgCluster> {
        let mut extra: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|dirs| dirs.filter_map(Result::ok).map(|d| d.path().join("bin")).collect())
            .unwrap_or_default();
        extra.sort();
        extra.reverse(); // the newest version first
        let initdb = find_binary(&["initdb"], &extra);
        if !required(initdb.is_some(), "initdb (postgresql server binaries)") {
            return None;
        }
        let bin = initdb?.parent().map(Path::to_path_buf).unwrap_or_default();
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let cluster =
            PgCluster { dir: TempDir::new("bc-it-pg-"), port: free_port(), bin, as_postgres, running: false };
        if as_postgres {
            let owned = Command::new("chown").arg("postgres").arg(cluster.dir.path()).status();
            assert!(
                matches!(owned, Ok(s) if s.success()),
                "chown postgres {}: {owned:?}",
                cluster.dir.path().display()
            );
        }
        let data = cluster.dir.path().join("data");
        cluster.run(&format!("{}/initdb -D {} -A trust -U postgres", cluster.bin.display(), data.display()));
        let mut cluster = cluster;
        cluster.start_again();
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &format!("{}/postgres", cluster.base_url())])
            .args(["-c", "CREATE DATABASE test"])
            .stdin(Stdio::null())
            .output();
        assert!(matches!(&out, Ok(o) if o.status.success()), "creating database test: {out:?}");
        Some(cluster)
    }

    /// `postgres://postgres@127.0.0.1:PORT`, for [`TestDatabase::postgres_on`].
    pub fn base_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    fn run(&self, command: &str) {
        let out = if self.as_postgres {
            Command::new("su").args(["postgres", "-c", command]).stdin(Stdio::null()).output()
        } else {
            Command::new("sh").args(["-c", command]).stdin(Stdio::null()).output()
        };
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "{command} failed:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("{command} could not run: {e}"),
        }
    }

    fn pg_ctl(&self, args: &str) -> String {
        let d = self.dir.path().display();
        format!("{}/pg_ctl -D {d}/data -l {d}/server.log {args}", self.bin.display())
    }

    /// `pg_ctl stop -m fast`: open connections are cut, the server is down until [`Self::start_again`].
    pub fn stop(&mut self) {
        self.run(&self.pg_ctl("-m fast -w -t 30 stop"));
        self.running = false;
    }

    /// Starts the (stopped) server again on the same port and data, and waits until it accepts.
    pub fn start_again(&mut self) {
        let d = self.dir.path().display();
        let opts = format!("-o '-p {} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off'", self.port);
        self.run(&self.pg_ctl(&format!("{opts} -w -t 30 start")));
        self.running = true;
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let d = self.dir.path().display();
            let cmd = format!("{}/pg_ctl -D {d}/data -m immediate -w -t 30 stop", self.bin.display());
            let _ = if self.as_postgres {
                Command::new("su").args(["postgres", "-c", &cmd]).stdin(Stdio::null()).output()
            } else {
                Command::new("sh").args(["-c", &cmd]).stdin(Stdio::null()).output()
            };
        }
    }
}

// ---------------------------------------------------------------- a keep-alive HTTP/1.1 client

/// One persistent HTTP/1.1 connection, for load: requests are sent one after another on it (no
/// `Connection: close`), and it reconnects on the next request after the server closed it or a
/// transport error (which is returned, never retried: the caller decides what an unknown outcome
/// means).
pub struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    read_timeout: Duration,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client { addr, conn: None, read_timeout: WAIT }
    }

    /// Reads time out after `limit` (default [`WAIT`]).
    pub fn with_read_timeout(mut self, limit: Duration) -> Client {
        self.read_timeout = limit;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `req` and reads the whole response.
    pub fn send(&mut self, req: &HttpRequest) -> io::Result<Response> {
        let result = self.exchange(req);
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    fn exchange(&mut self, req: &HttpRequest) -> io::Result<Response> {
        let mut reader = match self.conn.take() {
            Some(r) => r,
            None => {
                let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
                stream.set_read_timeout(Some(self.read_timeout))?;
                stream.set_write_timeout(Some(WAIT))?;
                stream.set_nodelay(true)?;
                BufReader::new(stream)
            }
        };
        let mut head = format!("{} {} HTTP/1.1\r\nHost: {}\r\n", req.method, req.path, self.addr);
        for (k, v) in &req.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !req.body.is_empty() || matches!(req.method.as_str(), "POST" | "PUT") {
            head.push_str(&format!("Content-Length: {}\r\n", req.body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&req.body);
        reader.get_mut().write_all(&bytes)?;
        let mut stream = ResponseStream::read_head(reader)?;
        let mut body = Vec::new();
        while let Some(chunk) = stream.next_chunk()? {
            body.extend_from_slice(&chunk);
        }
        let close = matches!(stream.framing, Framing::UntilClose { .. })
            || stream.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let ResponseStream { status, headers, reader, .. } = stream;
        if !close {
            self.conn = Some(reader);
        }
        Ok(Response { status, headers, body })
    }
}
