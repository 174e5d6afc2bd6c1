//! Process settings: an optional TOML file overridden by `BURNCLOUD_*` environment variables.
//!
//! Operating data (channels, ratios, options) lives in the database, not here. Bad settings are a
//! [`ConfigError`] naming the setting; the binary prints it on one line and exits non-zero.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Env {
    Dev,
    Prod,
}

/// Everything the process needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub env: Env,
    pub listen: SocketAddr,
    pub workers: usize,
    /// Pin worker `i` to core `i % cores`.
    pub pin_workers: bool,
    pub database_url: String,
    pub redis_url: Option<String>,
    pub admin_key: Option<String>,
    pub log: String,
    pub max_body_bytes: usize,
    pub drain_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_first_byte_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    /// Extra CA certificates (PEM) trusted for upstream TLS, besides the web PKI roots.
    pub upstream_ca_file: Option<PathBuf>,
    pub log_batch_size: usize,
    pub log_flush_ms: u64,
    /// Where billing events go while the database is unreachable; replayed when it returns.
    pub spill_path: PathBuf,
    /// The embedded balance ledger's snapshot (its log is next to it); used when no Redis is set.
    pub ledger_path: PathBuf,
    /// Prefix of every Redis key of the ledger, so several deployments can share one server.
    pub redis_namespace: String,
    /// An instance whose heartbeat is this old has its leases reclaimed by a sibling (or by itself
    /// at its next start). Heartbeats go every tenth of it; admission stops after a third of it
    /// without an acknowledged heartbeat.
    pub lease_ttl: Duration,
    /// Longest a request waits for a lease refill from the ledger before it is refused with 503.
    pub ledger_wait: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The TOML file's shape; every key is optional, unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    env: Option<String>,
    listen: Option<String>,
    workers: Option<usize>,
    pin_workers: Option<bool>,
    database_url: Option<String>,
    redis_url: Option<String>,
    admin_key: Option<String>,
    log: Option<String>,
    max_body_bytes: Option<usize>,
    drain_timeout_ms: Option<u64>,
    upstream_connect_timeout_ms: Option<u64>,
    upstream_first_byte_timeout_ms: Option<u64>,
    upstream_idle_timeout_ms: Option<u64>,
    upstream_ca_file: Option<PathBuf>,
    log_batch_size: Option<usize>,
    log_flush_ms: Option<u64>,
    spill_path: Option<PathBuf>,
    ledger_path: Option<PathBuf>,
    redis_namespace: Option<String>,
    lease_ttl_ms: Option<u64>,
    ledger_wait_ms: Option<u64>,
}

/// Environment variables read, with the file key each overrides.
const ENV_KEYS: &[(&str, &str)] = &[
    ("BURNCLOUD_ENV", "env"),
    ("BURNCLOUD_LISTEN", "listen"),
    ("BURNCLOUD_WORKERS", "workers"),
    ("BURNCLOUD_PIN_WORKERS", "pin_workers"),
    ("BURNCLOUD_DATABASE_URL", "database_url"),
    ("BURNCLOUD_REDIS_URL", "redis_url"),
    ("BURNCLOUD_ADMIN_KEY", "admin_key"),
    ("BURNCLOUD_LOG", "log"),
    ("BURNCLOUD_MAX_BODY_BYTES", "max_body_bytes"),
    ("BURNCLOUD_DRAIN_TIMEOUT_MS", "drain_timeout_ms"),
    ("BURNCLOUD_UPSTREAM_CONNECT_TIMEOUT_MS", "upstream_connect_timeout_ms"),
    ("BURNCLOUD_UPSTREAM_FIRST_BYTE_TIMEOUT_MS", "upstream_first_byte_timeout_ms"),
    ("BURNCLOUD_UPSTREAM_IDLE_TIMEOUT_MS", "upstream_idle_timeout_ms"),
    ("BURNCLOUD_UPSTREAM_CA_FILE", "upstream_ca_file"),
    ("BURNCLOUD_LOG_BATCH_SIZE", "log_batch_size"),
    ("BURNCLOUD_LOG_FLUSH_MS", "log_flush_ms"),
    ("BURNCLOUD_SPILL_PATH", "spill_path"),
    ("BURNCLOUD_LEDGER_PATH", "ledger_path"),
    ("BURNCLOUD_REDIS_NAMESPACE", "redis_namespace"),
    ("BURNCLOUD_LEASE_TTL_MS", "lease_ttl_ms"),
    ("BURNCLOUD_LEDGER_WAIT_MS", "ledger_wait_ms"),
];

impl Settings {
    /// Loads settings from `file` (when given, or `./burncloud.toml` when present) and `env`.
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Settings, ConfigError> {
        let mut fs = match file {
            Some(p) => read_file(p)?,
            None if Path::new("burncloud.toml").exists() => read_file(Path::new("burncloud.toml"))?,
            None => FileSettings::default(),
        };
        for (var, _) in ENV_KEYS {
            if let Some(v) = env.get(*var) {
                apply_env(&mut fs, var, v)?;
            }
        }
        for var in env.keys().filter(|k| k.starts_with("BURNCLOUD_")) {
            if !ENV_KEYS.iter().any(|(k, _)| k == var) && !var.starts_with("BURNCLOUD_TEST_") {
                return Err(ConfigError(format!("unknown setting {var}")));
            }
        }
        Settings::from_file(fs)
    }

    fn from_file(fs: FileSettings) -> Result<Settings, ConfigError> {
        let env = match fs.env.as_deref().unwrap_or("dev") {
            "dev" => Env::Dev,
            "prod" => Env::Prod,
            other => return Err(ConfigError(format!("BURNCLOUD_ENV must be dev or prod, not {other:?}"))),
        };
        let listen_str = fs.listen.unwrap_or_else(|| "127.0.0.1:3000".into());
        let listen = listen_str.parse::<SocketAddr>().map_err(|_| {
            ConfigError(format!("BURNCLOUD_LISTEN {listen_str:?} is not an address like 127.0.0.1:3000"))
        })?;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let workers = fs.workers.unwrap_or(cores);
        if workers == 0 || workers > 1024 {
            return Err(ConfigError(format!("BURNCLOUD_WORKERS must be between 1 and 1024, not {workers}")));
        }
        let database_url = fs.database_url.unwrap_or_else(|| "sqlite://burncloud.db".into());
        let is_sqlite = database_url.starts_with("sqlite:");
        let is_pg = database_url.starts_with("postgres://") || database_url.starts_with("postgresql://");
        if !is_sqlite && !is_pg {
            return Err(ConfigError(format!(
                "BURNCLOUD_DATABASE_URL {database_url:?} must start with sqlite:// or postgres://"
            )));
        }
        if env == Env::Prod && is_sqlite {
            return Err(ConfigError("BURNCLOUD_DATABASE_URL: prod refuses SQLite; use postgres://".into()));
        }
        let redis_url = fs.redis_url.filter(|s| !s.is_empty());
        if let Some(r) = &redis_url
            && !(r.starts_with("redis://") || r.starts_with("rediss://"))
        {
            return Err(ConfigError(format!("BURNCLOUD_REDIS_URL {r:?} must start with redis://")));
        }
        if env == Env::Prod && redis_url.is_none() {
            return Err(ConfigError("BURNCLOUD_REDIS_URL: prod requires Redis".into()));
        }
        let admin_key = fs.admin_key.filter(|s| !s.is_empty());
        if let Some(k) = &admin_key
            && k.len() < 16
        {
            return Err(ConfigError("BURNCLOUD_ADMIN_KEY must be at least 16 characters".into()));
        }
        let ms = |v: Option<u64>, d: u64| Duration::from_millis(v.unwrap_or(d));
        let spill_path = fs.spill_path.unwrap_or_else(|| default_spill_path(&database_url));
        let ledger_path = fs.ledger_path.unwrap_or_else(|| default_ledger_path(&database_url));
        let redis_namespace = fs.redis_namespace.unwrap_or_else(|| "burncloud".into());
        if redis_namespace.is_empty()
            || !redis_namespace.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(ConfigError(format!(
                "BURNCLOUD_REDIS_NAMESPACE {redis_namespace:?} must be letters, digits, '-', '_', '.' or ':'"
            )));
        }
        let lease_ttl_ms = fs.lease_ttl_ms.unwrap_or(30_000);
        if !(1_000..=3_600_000).contains(&lease_ttl_ms) {
            return Err(ConfigError(format!(
                "BURNCLOUD_LEASE_TTL_MS must be between 1000 and 3600000, not {lease_ttl_ms}"
            )));
        }
        Ok(Settings {
            env,
            listen,
            workers,
            pin_workers: fs.pin_workers.unwrap_or(workers <= cores),
            database_url,
            redis_url,
            admin_key,
            log: fs.log.unwrap_or_else(|| "info".into()),
            max_body_bytes: fs.max_body_bytes.unwrap_or(32 * 1024 * 1024),
            drain_timeout: ms(fs.drain_timeout_ms, 30_000),
            upstream_connect_timeout: ms(fs.upstream_connect_timeout_ms, 10_000),
            upstream_first_byte_timeout: ms(fs.upstream_first_byte_timeout_ms, 300_000),
            upstream_idle_timeout: ms(fs.upstream_idle_timeout_ms, 120_000),
            upstream_ca_file: fs.upstream_ca_file,
            log_batch_size: fs.log_batch_size.unwrap_or(512).max(1),
            log_flush_ms: fs.log_flush_ms.unwrap_or(50),
            spill_path,
            ledger_path,
            redis_namespace,
            lease_ttl: Duration::from_millis(lease_ttl_ms),
            ledger_wait: ms(fs.ledger_wait_ms, 3_000),
        })
    }
}

/// Next to a SQLite file; for a server database, in the working directory under a name derived from
/// the URL, so instances of different databases never share one. Instances sharing a database and a
/// working directory must set `BURNCLOUD_SPILL_PATH` each.
fn default_spill_path(database_url: &str) -> PathBuf {
    if let Some(path) =
        database_url.strip_prefix("sqlite://").or_else(|| database_url.strip_prefix("sqlite:"))
    {
        let file = path.split('?').next().unwrap_or(path);
        if !file.is_empty() && !file.contains(":memory:") {
            return PathBuf::from(format!("{file}.spill.jsonl"));
        }
    }
    let digest = burncloud_core::apikey::hash(database_url);
    PathBuf::from(format!("burncloud-spill-{}.jsonl", &digest[..12]))
}

/// Next to a SQLite file, else in the working directory under a name derived from the URL (as the
/// spill file).
fn default_ledger_path(database_url: &str) -> PathBuf {
    let spill = default_spill_path(database_url);
    let name = spill.to_string_lossy();
    match name.strip_suffix(".spill.jsonl") {
        Some(base) => PathBuf::from(format!("{base}.ledger.json")),
        None => {
            PathBuf::from(name.replace("burncloud-spill-", "burncloud-ledger-").replace(".jsonl", ".json"))
        }
    }
}

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| ConfigError(format!("config file {}: {}", path.display(), e.message())))
}

fn apply_env(fs: &mut FileSettings, var: &str, v: &str) -> Result<(), ConfigError> {
    let num = |v: &str| {
        v.trim().parse::<u64>().map_err(|_| ConfigError(format!("{var} must be a number, not {v:?}")))
    };
    match var {
        "BURNCLOUD_ENV" => fs.env = Some(v.into()),
        "BURNCLOUD_LISTEN" => fs.listen = Some(v.into()),
        "BURNCLOUD_WORKERS" => fs.workers = Some(num(v)? as usize),
        "BURNCLOUD_PIN_WORKERS" => fs.pin_workers = Some(matches!(v, "1" | "true" | "yes")),
        "BURNCLOUD_DATABASE_URL" => fs.database_url = Some(v.into()),
        "BURNCLOUD_REDIS_URL" => fs.redis_url = Some(v.into()),
        "BURNCLOUD_ADMIN_KEY" => fs.admin_key = Some(v.into()),
        "BURNCLOUD_LOG" => fs.log = Some(v.into()),
        "BURNCLOUD_MAX_BODY_BYTES" => fs.max_body_bytes = Some(num(v)? as usize),
        "BURNCLOUD_DRAIN_TIMEOUT_MS" => fs.drain_timeout_ms = Some(num(v)?),
        "BURNCLOUD_UPSTREAM_CONNECT_TIMEOUT_MS" => fs.upstream_connect_timeout_ms = Some(num(v)?),
        "BURNCLOUD_UPSTREAM_FIRST_BYTE_TIMEOUT_MS" => fs.upstream_first_byte_timeout_ms = Some(num(v)?),
        "BURNCLOUD_UPSTREAM_IDLE_TIMEOUT_MS" => fs.upstream_idle_timeout_ms = Some(num(v)?),
        "BURNCLOUD_UPSTREAM_CA_FILE" => fs.upstream_ca_file = Some(PathBuf::from(v)),
        "BURNCLOUD_LOG_BATCH_SIZE" => fs.log_batch_size = Some(num(v)? as usize),
        "BURNCLOUD_LOG_FLUSH_MS" => fs.log_flush_ms = Some(num(v)?),
        "BURNCLOUD_SPILL_PATH" => fs.spill_path = Some(PathBuf::from(v)),
        "BURNCLOUD_LEDGER_PATH" => fs.ledger_path = Some(PathBuf::from(v)),
        "BURNCLOUD_REDIS_NAMESPACE" => fs.redis_namespace = Some(v.into()),
        "BURNCLOUD_LEASE_TTL_MS" => fs.lease_ttl_ms = Some(num(v)?),
        "BURNCLOUD_LEDGER_WAIT_MS" => fs.ledger_wait_ms = Some(num(v)?),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_dev_sqlite_on_port_3000() {
        let s = Settings::load(None, &env(&[])).unwrap();
        assert_eq!(s.env, Env::Dev);
        assert_eq!(s.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(s.database_url, "sqlite://burncloud.db");
        assert!(s.redis_url.is_none());
        assert_eq!(s.spill_path, PathBuf::from("burncloud.db.spill.jsonl"));
        assert_eq!(s.ledger_path, PathBuf::from("burncloud.db.ledger.json"));
        assert_eq!(s.lease_ttl, Duration::from_secs(30));
    }

    #[test]
    fn prod_refuses_sqlite_and_requires_redis() {
        let e = Settings::load(None, &env(&[("BURNCLOUD_ENV", "prod")])).unwrap_err();
        assert!(e.0.contains("BURNCLOUD_DATABASE_URL"), "{e}");
        let e = Settings::load(
            None,
            &env(&[("BURNCLOUD_ENV", "prod"), ("BURNCLOUD_DATABASE_URL", "postgres://u@h/db")]),
        )
        .unwrap_err();
        assert!(e.0.contains("BURNCLOUD_REDIS_URL"), "{e}");
    }

    #[test]
    fn bad_values_name_their_setting() {
        for (k, v) in [
            ("BURNCLOUD_LISTEN", "nowhere"),
            ("BURNCLOUD_WORKERS", "many"),
            ("BURNCLOUD_DATABASE_URL", "mysql://x"),
            ("BURNCLOUD_REDIS_URL", "http://x"),
            ("BURNCLOUD_ENV", "staging"),
            ("BURNCLOUD_NOPE", "1"),
            ("BURNCLOUD_LEASE_TTL_MS", "5"),
            ("BURNCLOUD_REDIS_NAMESPACE", "a b"),
        ] {
            let e = Settings::load(None, &env(&[(k, v)])).unwrap_err();
            assert!(e.0.contains(k), "{k}: {e}");
        }
    }

    #[test]
    fn a_config_file_with_an_unknown_key_is_refused() {
        let dir = std::env::temp_dir().join(format!("bc-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, "listen = \"127.0.0.1:4000\"\nlistne = 1\n").unwrap();
        let e = Settings::load(Some(&p), &env(&[])).unwrap_err();
        assert!(e.0.contains("listne"), "{e}");
        std::fs::write(&p, "listen = \"127.0.0.1:4000\"\n").unwrap();
        let s = Settings::load(Some(&p), &env(&[("BURNCLOUD_WORKERS", "3")])).unwrap();
        assert_eq!((s.listen.port(), s.workers), (4000, 3));
    }
}
