//! The one error type of the storage crate and its mapping from sqlx errors.
//!
//! Owns the wording callers see: one clear line per failure kind, with database URLs redacted. Must
//! never carry a password into a message, and never hide a unique violation behind a generic query
//! failure (the management API turns `Conflict` into a validation message).

/// Everything the storage layer can report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The database URL is malformed or names an unsupported database.
    #[error("invalid database URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The database could not be reached (connection refused, timed out, pool closed).
    #[error("database unreachable at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// Applying the embedded migrations failed.
    #[error("database migration failed: {0}")]
    Migration(String),
    /// A statement failed for a reason other than the ones below.
    #[error("database query failed: {0}")]
    Query(String),
    /// A unique constraint was violated (duplicate username, duplicate API key, …).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A record the operation depends on does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The storage thread has stopped (or could not be started), so the request was not served.
    #[error("storage thread is not running")]
    ThreadGone,
    /// The spill file could not be read or written.
    #[error("spill file {path}: {reason}")]
    Spill { path: String, reason: String },
    /// Shutdown could not write every queued billing event to the database.
    #[error("storage stopped with {events} billing events not written to the database: {detail}")]
    Unwritten { events: usize, detail: String },
}

impl StorageError {
    /// Maps a sqlx error raised while talking to the database at `url` (used for the unreachable
    /// case only; the URL is redacted).
    pub(crate) fn from_sqlx(err: sqlx::Error, url: &str) -> Self {
        match err {
            sqlx::Error::Database(db) if db.is_unique_violation() => StorageError::Conflict(db.to_string()),
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => {
                StorageError::Unreachable { url: redact_url(url), reason: err.to_string() }
            }
            other => StorageError::Query(other.to_string()),
        }
    }
}

/// Hides the password of a `scheme://user:password@host/…` URL.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => {
            format!("{}{}:***{}", &url[..rest_start], &userinfo[..colon], &rest[at..])
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("postgres://bc:secret@db:5432/x"), "postgres://bc:***@db:5432/x");
        assert_eq!(redact_url("postgres://bc@db/x"), "postgres://bc@db/x");
        assert_eq!(redact_url("sqlite://burncloud.db"), "sqlite://burncloud.db");
        assert_eq!(redact_url("postgres://u:p@h?x=a@b"), "postgres://u:***@h?x=a@b");
    }
}
