//! Connecting to the database named by a URL, and applying the embedded migrations.
//!
//! Owns URL validation (`sqlite://PATH` or `postgres://…`), pool settings (SQLite: created if missing,
//! WAL, busy timeout; every backend: a bounded connect timeout) and the choice of migration set. Must
//! never block without a timeout, and never run SQL other than session setup and migrations.

use std::time::Duration;

use sqlx::AnyPool;
use sqlx::Executor;
use sqlx::any::AnyPoolOptions;

use crate::error::{StorageError, redact_url};

/// Migrations for each backend, embedded at compile time from the workspace's `migrations/` folder.
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// SQLite waits this long for a lock held by another connection before failing a statement.
const SQLITE_BUSY_TIMEOUT_MS: u64 = 5_000;

/// The database behind a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A validated URL: the backend and the URL handed to sqlx.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub backend: Backend,
    pub url: String,
    /// `sqlite::memory:`: every connection would open its own empty database, so the pool keeps
    /// exactly one connection forever.
    pub in_memory: bool,
}

impl Target {
    /// Validates `database_url`. SQLite URLs get `mode=rwc` (create the file if missing) unless they
    /// already say how to open the file.
    pub(crate) fn parse(database_url: &str) -> Result<Self, StorageError> {
        let bad =
            |reason: &str| StorageError::BadUrl { url: redact_url(database_url), reason: reason.into() };
        let url = database_url.trim();
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.trim_start_matches("//");
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err(bad("expected sqlite://PATH"));
            }
            let in_memory = path == ":memory:";
            let url = if in_memory || url.contains("mode=") {
                url.to_string()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            return Ok(Target { backend: Backend::Sqlite, url, in_memory });
        }
        if let Some(rest) = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")) {
            if rest.is_empty() || rest.starts_with('/') {
                return Err(bad("expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"));
            }
            return Ok(Target { backend: Backend::Postgres, url: url.to_string(), in_memory: false });
        }
        Err(bad("expected sqlite://PATH or postgres://USER@HOST/DATABASE"))
    }

    pub(crate) fn redacted(&self) -> String {
        redact_url(&self.url)
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        }
    }
}

/// Opens a pool to `target`, failing after `connect_timeout` when the database cannot be reached.
pub(crate) async fn connect(
    target: &Target,
    max_connections: u32,
    connect_timeout: Duration,
) -> Result<AnyPool, StorageError> {
    sqlx::any::install_default_drivers();
    let mut options = AnyPoolOptions::new()
        .max_connections(max_connections.max(1))
        .min_connections(0)
        .acquire_timeout(connect_timeout);
    if target.in_memory {
        options = options.max_connections(1).min_connections(1).idle_timeout(None).max_lifetime(None);
    }
    if target.backend == Backend::Sqlite {
        options = options.after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute(sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")))
                    .await?;
                Ok(())
            })
        });
    }
    options.connect(&target.url).await.map_err(|e| match e {
        sqlx::Error::Configuration(reason) => {
            StorageError::BadUrl { url: target.redacted(), reason: reason.to_string() }
        }
        other => match StorageError::from_sqlx(other, &target.url) {
            StorageError::Query(reason) => StorageError::Unreachable { url: target.redacted(), reason },
            mapped => mapped,
        },
    })
}

/// Applies every migration of the target's backend that is not applied yet.
pub(crate) async fn run_migrations(target: &Target, pool: &AnyPool) -> Result<(), StorageError> {
    target.migrator().run(pool).await.map_err(|e| StorageError::Migration(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_create_the_file_unless_told_otherwise() {
        let t = Target::parse("sqlite://burncloud.db").unwrap();
        assert_eq!(t.backend, Backend::Sqlite);
        assert_eq!(t.url, "sqlite://burncloud.db?mode=rwc");
        assert_eq!(
            Target::parse("sqlite:///tmp/a.db?cache=shared").unwrap().url,
            "sqlite:///tmp/a.db?cache=shared&mode=rwc"
        );
        assert_eq!(Target::parse("sqlite://a.db?mode=ro").unwrap().url, "sqlite://a.db?mode=ro");
        let memory = Target::parse("sqlite::memory:").unwrap();
        assert!(memory.in_memory);
        assert_eq!(memory.url, "sqlite::memory:");
    }

    #[test]
    fn postgres_urls_are_kept_and_others_rejected() {
        let t = Target::parse("postgres://u:p@localhost/db").unwrap();
        assert_eq!(t.backend, Backend::Postgres);
        assert_eq!(t.redacted(), "postgres://u:***@localhost/db");
        assert!(matches!(Target::parse("mysql://x/y"), Err(StorageError::BadUrl { .. })));
        assert!(matches!(Target::parse("sqlite://"), Err(StorageError::BadUrl { .. })));
        assert!(matches!(Target::parse("postgres://"), Err(StorageError::BadUrl { .. })));
        assert!(matches!(Target::parse("burncloud.db"), Err(StorageError::BadUrl { .. })));
    }
}
