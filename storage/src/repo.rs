//! Every SQL statement of the gateway, written once for both backends through sqlx's `Any` driver.
//!
//! Owns the mapping between domain records and rows (booleans are read from either an integer or a
//! boolean column; model lists are comma lists; model mappings are JSON text) and the batch write of
//! consume events. Runs only on the storage thread. Must never build SQL from caller-supplied text
//! (values are always bound), never select a boolean expression (the `Any` driver cannot decode
//! SQLite's boolean type), and never use `?` placeholders except in SQLite's multi-row inserts:
//! Postgres needs `$N`, which SQLite accepts too but resolves with a linear name lookup per bind,
//! quadratic in a statement of two thousand values.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use burncloud_core::lease::{Account, Funding};
use burncloud_core::model::{
    Channel, ChannelType, LOG_TOPUP, LogEntry, Quota, STATUS_ENABLED, Token, User, split_list,
};
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::{Any, AssertSqlSafe, Row};
use sqlx::{AnyConnection, AnyPool};

use crate::db::Backend;
use crate::error::StorageError;
use crate::spill::Segment;
use crate::{ChannelFilter, ConfigData, ExportData, ImportSummary, LogFilter};

type AnyQuery = sqlx::query::Query<'static, Any, AnyArguments>;

macro_rules! user_cols {
    () => {
        r#"id, username, password_hash, display_name, role, status, email, "group", quota, used_quota, request_count, created_time, quota_version"#
    };
}
macro_rules! token_cols {
    () => {
        r#"id, user_id, key_masked, key_hash, name, status, created_time, accessed_time, expired_time, remain_quota, unlimited_quota, used_quota, models, allow_ips, "group", rpm, tpm, quota_version"#
    };
}
macro_rules! channel_cols {
    () => {
        r#"id, type, name, "key", base_url, models, "group", priority, weight, model_mapping, tag, proxy, status, test_model, created_time, test_time, response_time, used_quota, status_reason, status_time"#
    };
}
macro_rules! log_insert_cols {
    () => {
        r#"created_at, type, user_id, username, token_id, token_name, model_name, channel_id, quota, prompt_tokens, completion_tokens, use_time_ms, is_stream, "group", ip, request_id, content, cached_tokens, other"#
    };
}

/// Columns written per log row.
const LOG_COLUMNS: usize = 19;
/// Log rows per INSERT statement inside a batch (19 × 128 binds stays far below every backend's limit).
const LOG_ROWS_PER_STATEMENT: usize = 128;
/// The row counts of the INSERT statements a batch is cut into: as many full statements as fit,
/// then the rest in falling powers of two. A batch of any size thus uses the same eight prepared
/// statements, instead of a statement of its own (prepared anew, and evicting others from the
/// connection's cache) for whatever is left over after the full ones.
const LOG_STATEMENT_ROWS: [usize; 8] = [LOG_ROWS_PER_STATEMENT, 64, 32, 16, 8, 4, 2, 1];
/// Columns written per ability row.
const ABILITY_COLUMNS: usize = 7;
const ABILITY_ROWS_PER_STATEMENT: usize = 256;
/// Page size used when a filter asks for none, and the largest page served.
const DEFAULT_PAGE_SIZE: i64 = 20;
const MAX_PAGE_SIZE: i64 = 10_000;

/// The pool plus what error messages need.
pub(crate) struct Db {
    pool: AnyPool,
    backend: Backend,
    /// Redacted URL, for "unreachable" messages.
    url: String,
    /// `INSERT INTO logs … VALUES` for each row count of [`LOG_STATEMENT_ROWS`], built once.
    log_inserts: [Arc<str>; LOG_STATEMENT_ROWS.len()],
}

impl Db {
    pub(crate) fn new(pool: AnyPool, backend: Backend, redacted_url: String) -> Self {
        let log_inserts = LOG_STATEMENT_ROWS.map(|rows| Arc::from(log_insert_sql(backend, rows)));
        Db { pool, backend, url: redacted_url, log_inserts }
    }

    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }

    fn err(&self, e: sqlx::Error) -> StorageError {
        StorageError::from_sqlx(e, &self.url)
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<Any>, StorageError> {
        self.pool.acquire().await.map_err(|e| self.err(e))
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, Any>, StorageError> {
        self.pool.begin().await.map_err(|e| self.err(e))
    }

    // ---- consume events -------------------------------------------------------------------------

    /// Writes every event of `segments` in one transaction: the log rows, the user, token and channel
    /// counters, and the ids of spilled segments (so a replay never applies them twice).
    pub(crate) async fn write_batch(&self, segments: &[Segment], now: i64) -> Result<(), StorageError> {
        let mut users: BTreeMap<i64, (Quota, i64)> = BTreeMap::new();
        let mut tokens: BTreeMap<i64, (Quota, i64)> = BTreeMap::new();
        let mut channels: BTreeMap<i64, Quota> = BTreeMap::new();
        for ev in segments.iter().flat_map(|s| s.events.iter()) {
            let log = &ev.log;
            if log.user_id != 0 {
                let u = users.entry(log.user_id).or_default();
                u.0 += ev.quota;
                u.1 += 1;
            }
            if log.token_id != 0 {
                let t = tokens.entry(log.token_id).or_insert((0, i64::MIN));
                t.0 += ev.quota;
                t.1 = t.1.max(log.created_at);
            }
            if log.channel_id != 0 && ev.quota != 0 {
                *channels.entry(log.channel_id).or_default() += ev.quota;
            }
        }

        let mut tx = self.begin().await?;
        let conn: &mut AnyConnection = &mut tx;
        let logs: Vec<&LogEntry> = segments.iter().flat_map(|s| s.events.iter().map(|e| &e.log)).collect();
        let mut rest: &[&LogEntry] = &logs;
        // The largest statement the rows left fill; none once no row is left.
        while let Some((rows, sql)) =
            LOG_STATEMENT_ROWS.iter().zip(&self.log_inserts).find(|(rows, _)| **rows <= rest.len())
        {
            let (chunk, tail) = rest.split_at(*rows);
            rest = tail;
            let mut q: AnyQuery = sqlx::query(AssertSqlSafe(Arc::clone(sql)));
            for log in chunk {
                q = bind_log(q, log);
            }
            q.execute(&mut *conn).await.map_err(|e| self.err(e))?;
        }
        for (id, (quota, count)) in users {
            sqlx::query(
                "UPDATE users SET quota = quota - $1, used_quota = used_quota + $1, \
                 request_count = request_count + $2 WHERE id = $3",
            )
            .bind(quota)
            .bind(count)
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        }
        for (id, (quota, accessed)) in tokens {
            sqlx::query(
                "UPDATE tokens SET used_quota = used_quota + $1, \
                 remain_quota = CASE WHEN unlimited_quota THEN remain_quota ELSE remain_quota - $1 END, \
                 accessed_time = CASE WHEN accessed_time > $2 THEN accessed_time ELSE $2 END WHERE id = $3",
            )
            .bind(quota)
            .bind(accessed)
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        }
        for (id, quota) in channels {
            sqlx::query("UPDATE channels SET used_quota = used_quota + $1 WHERE id = $2")
                .bind(quota)
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(|e| self.err(e))?;
        }
        for id in segments.iter().filter_map(|s| s.spill_id.as_deref()) {
            sqlx::query("INSERT INTO spill_batches (id, applied_at) VALUES ($1, $2)")
                .bind(id.to_string())
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// Which of `ids` are recorded as already applied.
    pub(crate) async fn applied_spill_ids(&self, ids: &[String]) -> Result<BTreeSet<String>, StorageError> {
        let mut conn = self.conn().await?;
        let mut applied = BTreeSet::new();
        for id in ids {
            let row = sqlx::query("SELECT id FROM spill_batches WHERE id = $1")
                .bind(id.clone())
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| self.err(e))?;
            if row.is_some() {
                applied.insert(id.clone());
            }
        }
        Ok(applied)
    }

    /// Forgets applied spill ids; called once the spill file no longer holds their segments.
    pub(crate) async fn forget_spill_ids(&self, ids: &[String]) -> Result<(), StorageError> {
        let mut conn = self.conn().await?;
        for id in ids {
            sqlx::query("DELETE FROM spill_batches WHERE id = $1")
                .bind(id.clone())
                .execute(&mut *conn)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    // ---- configuration --------------------------------------------------------------------------

    pub(crate) async fn load_config(&self) -> Result<ConfigData, StorageError> {
        let mut conn = self.conn().await?;
        let rows = sqlx::query(concat!("SELECT ", channel_cols!(), " FROM channels ORDER BY id"))
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        let mut channels = Vec::with_capacity(rows.len());
        for row in &rows {
            match channel_from_row(row) {
                Ok(ch) => channels.push(ch),
                Err(e) => tracing::warn!(error = %e, "skipping a channel that cannot be loaded"),
            }
        }
        let rows = sqlx::query(r#"SELECT "key", value FROM options"#)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        let mut options = BTreeMap::new();
        for row in &rows {
            options.insert(text(row, "key")?, text(row, "value")?);
        }
        Ok(ConfigData { channels, options })
    }

    pub(crate) async fn set_option(&self, key: &str, value: &str) -> Result<(), StorageError> {
        sqlx::query(
            r#"INSERT INTO options ("key", value) VALUES ($1, $2) ON CONFLICT ("key") DO UPDATE SET value = excluded.value"#,
        )
        .bind(key.to_string())
        .bind(value.to_string())
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    // ---- channels -------------------------------------------------------------------------------

    pub(crate) async fn create_channel(&self, mut ch: Channel, now: i64) -> Result<Channel, StorageError> {
        if ch.created_time == 0 {
            ch.created_time = now;
        }
        let mut tx = self.begin().await?;
        self.insert_channel(&mut tx, &mut ch).await?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(ch)
    }

    /// Inserts a channel (its id assigned) and its abilities on `conn`.
    async fn insert_channel(&self, conn: &mut AnyConnection, ch: &mut Channel) -> Result<(), StorageError> {
        let mapping = mapping_json(ch)?;
        let row = sqlx::query(
            r#"INSERT INTO channels (type, name, "key", base_url, models, "group", priority, weight, model_mapping,
               tag, proxy, status, test_model, created_time, test_time, response_time, used_quota, status_reason,
               status_time)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)
               RETURNING id"#,
        )
        .bind(ch.kind.as_str())
        .bind(ch.name.clone())
        .bind(ch.key.clone())
        .bind(ch.base_url.clone())
        .bind(ch.models.clone())
        .bind(ch.group.clone())
        .bind(ch.priority)
        .bind(ch.weight)
        .bind(mapping)
        .bind(ch.tag.clone())
        .bind(ch.proxy.clone())
        .bind(ch.status)
        .bind(ch.test_model.clone())
        .bind(ch.created_time)
        .bind(ch.test_time)
        .bind(ch.response_time)
        .bind(ch.used_quota)
        .bind(ch.auto_disabled_reason.clone())
        .bind(ch.auto_disabled_time)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| self.err(e))?;
        ch.id = int(&row, "id")?;
        self.sync_abilities(conn, ch).await
    }

    /// Replaces every field of the channel but `created_time` (kept when the new one is 0) and
    /// `used_quota` (owned by billing).
    pub(crate) async fn update_channel(&self, ch: Channel) -> Result<Option<Channel>, StorageError> {
        let mapping = mapping_json(&ch)?;
        let mut tx = self.begin().await?;
        let row = sqlx::query(concat!(
            r#"UPDATE channels SET type = $1, name = $2, "key" = $3, base_url = $4, models = $5, "group" = $6,
               priority = $7, weight = $8, model_mapping = $9, tag = $10, proxy = $11, status = $12,
               test_model = $13, created_time = CASE WHEN $14 = 0 THEN created_time ELSE $14 END,
               test_time = $15, response_time = $16, status_reason = $17, status_time = $18 WHERE id = $19
               RETURNING "#,
            channel_cols!()
        ))
        .bind(ch.kind.as_str())
        .bind(ch.name.clone())
        .bind(ch.key.clone())
        .bind(ch.base_url.clone())
        .bind(ch.models.clone())
        .bind(ch.group.clone())
        .bind(ch.priority)
        .bind(ch.weight)
        .bind(mapping)
        .bind(ch.tag.clone())
        .bind(ch.proxy.clone())
        .bind(ch.status)
        .bind(ch.test_model.clone())
        .bind(ch.created_time)
        .bind(ch.test_time)
        .bind(ch.response_time)
        .bind(ch.auto_disabled_reason.clone())
        .bind(ch.auto_disabled_time)
        .bind(ch.id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let updated = channel_from_row(&row)?;
        self.sync_abilities(&mut tx, &updated).await?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(Some(updated))
    }

    pub(crate) async fn delete_channel(&self, id: i64) -> Result<bool, StorageError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM abilities WHERE channel_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        let done = sqlx::query("DELETE FROM channels WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(done.rows_affected() > 0)
    }

    /// Rewrites the channel's abilities (one row per group × model) inside the caller's transaction.
    async fn sync_abilities(&self, conn: &mut AnyConnection, ch: &Channel) -> Result<(), StorageError> {
        sqlx::query("DELETE FROM abilities WHERE channel_id = $1")
            .bind(ch.id)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        let pairs: BTreeSet<(&str, &str)> =
            ch.group_list().flat_map(|g| ch.model_list().map(move |m| (g, m))).collect();
        let pairs: Vec<(&str, &str)> = pairs.into_iter().collect();
        let enabled = ch.status == STATUS_ENABLED;
        for chunk in pairs.chunks(ABILITY_ROWS_PER_STATEMENT) {
            let sql = multi_insert_sql(
                self.backend,
                r#"INSERT INTO abilities ("group", model, channel_id, enabled, priority, weight, tag) VALUES "#,
                ABILITY_COLUMNS,
                chunk.len(),
            );
            let mut q: AnyQuery = sqlx::query(AssertSqlSafe(sql));
            for (group, model) in chunk {
                q = q
                    .bind(group.to_string())
                    .bind(model.to_string())
                    .bind(ch.id)
                    .bind(enabled)
                    .bind(ch.priority)
                    .bind(ch.weight)
                    .bind(ch.tag.clone());
            }
            q.execute(&mut *conn).await.map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    pub(crate) async fn get_channel(&self, id: i64) -> Result<Option<Channel>, StorageError> {
        let row = sqlx::query(concat!("SELECT ", channel_cols!(), " FROM channels WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        row.as_ref().map(channel_from_row).transpose()
    }

    pub(crate) async fn list_channels(&self, f: &ChannelFilter) -> Result<(Vec<Channel>, i64), StorageError> {
        let mut w = Where::default();
        if let Some(tag) = &f.tag {
            w.push("tag = ", Bind::Text(tag.clone()));
        }
        if let Some(status) = f.status {
            w.push("status = ", Bind::Int(status));
        }
        let (limit, offset) = page_bounds(f.page, f.page_size);
        let mut conn = self.conn().await?;
        let total = self.count(&mut conn, "channels", &w).await?;
        let sql = format!(
            "SELECT {} FROM channels{} ORDER BY id LIMIT {limit} OFFSET {offset}",
            channel_cols!(),
            w.sql()
        );
        let rows =
            w.bind(sqlx::query(AssertSqlSafe(sql))).fetch_all(&mut *conn).await.map_err(|e| self.err(e))?;
        let items = rows.iter().map(channel_from_row).collect::<Result<Vec<_>, _>>()?;
        Ok((items, total))
    }

    async fn count(&self, conn: &mut AnyConnection, table: &str, w: &Where) -> Result<i64, StorageError> {
        let sql = format!("SELECT COUNT(*) AS n FROM {table}{}", w.sql());
        let row = w.bind(sqlx::query(AssertSqlSafe(sql))).fetch_one(conn).await.map_err(|e| self.err(e))?;
        int(&row, "n")
    }

    // ---- users ----------------------------------------------------------------------------------

    pub(crate) async fn create_user(&self, mut u: User, now: i64) -> Result<User, StorageError> {
        if u.created_time == 0 {
            u.created_time = now;
        }
        let mut conn = self.conn().await?;
        self.insert_user(&mut conn, &mut u).await?;
        Ok(u)
    }

    /// Inserts a user (its id assigned) on `conn`; `Conflict` on a taken username.
    async fn insert_user(&self, conn: &mut AnyConnection, u: &mut User) -> Result<(), StorageError> {
        let row = sqlx::query(
            r#"INSERT INTO users (username, password_hash, display_name, role, status, email, "group", quota,
               used_quota, request_count, created_time, quota_version)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id"#,
        )
        .bind(u.username.clone())
        .bind(u.password_hash.clone())
        .bind(u.display_name.clone())
        .bind(u.role)
        .bind(u.status)
        .bind(u.email.clone())
        .bind(u.group.clone())
        .bind(u.quota)
        .bind(u.used_quota)
        .bind(u.request_count)
        .bind(u.created_time)
        .bind(u.quota_version.max(1))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| match self.err(e) {
            StorageError::Conflict(_) => {
                StorageError::Conflict(format!("username {:?} already exists", u.username))
            }
            other => other,
        })?;
        u.id = int(&row, "id")?;
        Ok(())
    }

    pub(crate) async fn get_user(&self, id: i64) -> Result<Option<User>, StorageError> {
        let mut conn = self.conn().await?;
        self.user_on(&mut conn, id).await
    }

    async fn user_on(&self, conn: &mut AnyConnection, id: i64) -> Result<Option<User>, StorageError> {
        let row =
            sqlx::query(concat!("SELECT ", user_cols!(), " FROM users WHERE id = $1 AND deleted_at IS NULL"))
                .bind(id)
                .fetch_optional(conn)
                .await
                .map_err(|e| self.err(e))?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Writes the editable fields (username, password hash unless empty, display name, role, status,
    /// email, group, quota); `used_quota`, `request_count` and `created_time` belong to billing.
    pub(crate) async fn update_user(&self, u: User) -> Result<Option<User>, StorageError> {
        let row = sqlx::query(concat!(
            r#"UPDATE users SET username = $1, password_hash = CASE WHEN $2 = '' THEN password_hash ELSE $2 END,
               display_name = $3, role = $4, status = $5, email = $6, "group" = $7, quota = $8,
               quota_version = CASE WHEN quota = $8 THEN quota_version ELSE quota_version + 1 END
               WHERE id = $9 AND deleted_at IS NULL RETURNING "#,
            user_cols!()
        ))
        .bind(u.username.clone())
        .bind(u.password_hash.clone())
        .bind(u.display_name.clone())
        .bind(u.role)
        .bind(u.status)
        .bind(u.email.clone())
        .bind(u.group.clone())
        .bind(u.quota)
        .bind(u.id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| match self.err(e) {
            StorageError::Conflict(_) => StorageError::Conflict(format!("username {:?} already exists", u.username)),
            other => other,
        })?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Adds `quota` to the user and writes a top-up log, in one transaction.
    pub(crate) async fn topup_user(
        &self,
        id: i64,
        quota: Quota,
        now: i64,
    ) -> Result<Option<User>, StorageError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(concat!(
            "UPDATE users SET quota = quota + $1, quota_version = quota_version + 1 \
             WHERE id = $2 AND deleted_at IS NULL RETURNING ",
            user_cols!()
        ))
        .bind(quota)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let user = user_from_row(&row)?;
        let log = LogEntry {
            created_at: now,
            kind: LOG_TOPUP,
            user_id: user.id,
            username: user.username.clone(),
            quota,
            group: user.group.clone(),
            content: format!("top-up of {quota} quota"),
            ..LogEntry::default()
        };
        bind_log(sqlx::query(AssertSqlSafe(log_insert_sql(self.backend, 1))), &log)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(Some(user))
    }

    /// An account's funding as the database has it (see `StorageHandle::funding`).
    pub(crate) async fn funding(&self, account: Account) -> Result<Option<Funding>, StorageError> {
        let row = match account {
            Account::User(id) => sqlx::query(
                "SELECT quota AS remaining, used_quota, quota_version FROM users \
                 WHERE id = $1 AND deleted_at IS NULL",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?,
            Account::Key(id) => sqlx::query(
                "SELECT remain_quota AS remaining, used_quota, quota_version FROM tokens \
                 WHERE id = $1 AND NOT unlimited_quota",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?,
        };
        let Some(row) = row else { return Ok(None) };
        let remaining = int(&row, "remaining")?;
        Ok(Some(Funding {
            remaining,
            total: remaining + int(&row, "used_quota")?,
            version: int(&row, "quota_version")?,
        }))
    }

    // ---- tokens ---------------------------------------------------------------------------------

    pub(crate) async fn create_token(&self, mut t: Token, now: i64) -> Result<Token, StorageError> {
        if t.created_time == 0 {
            t.created_time = now;
        }
        let mut conn = self.conn().await?;
        if self.user_on(&mut conn, t.user_id).await?.is_none() {
            return Err(StorageError::NotFound(format!("user {}", t.user_id)));
        }
        self.insert_token(&mut conn, &mut t).await?;
        Ok(t)
    }

    /// Inserts a key (its id assigned) on `conn`; `Conflict` when its hash is taken.
    async fn insert_token(&self, conn: &mut AnyConnection, t: &mut Token) -> Result<(), StorageError> {
        let row = sqlx::query(
            r#"INSERT INTO tokens (user_id, key_masked, key_hash, name, status, created_time, accessed_time,
               expired_time, remain_quota, unlimited_quota, used_quota, models, allow_ips, "group", rpm, tpm,
               quota_version)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) RETURNING id"#,
        )
        .bind(t.user_id)
        .bind(t.key.clone())
        .bind(t.key_hash.clone())
        .bind(t.name.clone())
        .bind(t.status)
        .bind(t.created_time)
        .bind(t.accessed_time)
        .bind(t.expired_time)
        .bind(t.remain_quota)
        .bind(t.unlimited_quota)
        .bind(t.used_quota)
        .bind(t.models.join(","))
        .bind(t.allow_ips.clone())
        .bind(t.group.clone())
        .bind(t.rpm)
        .bind(t.tpm)
        .bind(t.quota_version.max(1))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| match self.err(e) {
            StorageError::Conflict(_) => {
                StorageError::Conflict("an API key with this hash already exists".into())
            }
            other => other,
        })?;
        t.id = int(&row, "id")?;
        Ok(())
    }

    pub(crate) async fn get_token(&self, id: i64) -> Result<Option<Token>, StorageError> {
        let row = sqlx::query(concat!("SELECT ", token_cols!(), " FROM tokens WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        row.as_ref().map(token_from_row).transpose()
    }

    /// The key and its owner, or `None` when either is missing.
    pub(crate) async fn token_by_key_hash(
        &self,
        key_hash: &str,
    ) -> Result<Option<(Token, User)>, StorageError> {
        let mut conn = self.conn().await?;
        let row = sqlx::query(concat!("SELECT ", token_cols!(), " FROM tokens WHERE key_hash = $1"))
            .bind(key_hash.to_string())
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let token = token_from_row(&row)?;
        Ok(self.user_on(&mut conn, token.user_id).await?.map(|user| (token, user)))
    }

    /// Writes the editable fields (name, status, expiry, remaining and unlimited quota, models, allowed
    /// IPs, group, limits); owner, key, creation and access times and `used_quota` are kept.
    pub(crate) async fn update_token(&self, t: Token) -> Result<Option<Token>, StorageError> {
        let row = sqlx::query(concat!(
            r#"UPDATE tokens SET name = $1, status = $2, expired_time = $3, remain_quota = $4,
               unlimited_quota = $5, models = $6, allow_ips = $7, "group" = $8, rpm = $9, tpm = $10,
               quota_version = CASE WHEN remain_quota = $4 AND unlimited_quota = $5 THEN quota_version
                                    ELSE quota_version + 1 END
               WHERE id = $11 RETURNING "#,
            token_cols!()
        ))
        .bind(t.name.clone())
        .bind(t.status)
        .bind(t.expired_time)
        .bind(t.remain_quota)
        .bind(t.unlimited_quota)
        .bind(t.models.join(","))
        .bind(t.allow_ips.clone())
        .bind(t.group.clone())
        .bind(t.rpm)
        .bind(t.tpm)
        .bind(t.id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub(crate) async fn delete_token(&self, id: i64) -> Result<bool, StorageError> {
        let done = sqlx::query("DELETE FROM tokens WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(done.rows_affected() > 0)
    }

    // ---- export and import ------------------------------------------------------------------------

    /// Every channel, user (with its password hash), key (with its key hash) and option.
    pub(crate) async fn export(&self) -> Result<ExportData, StorageError> {
        let mut conn = self.conn().await?;
        let config = self.load_config().await?;
        let users =
            sqlx::query(concat!("SELECT ", user_cols!(), " FROM users WHERE deleted_at IS NULL ORDER BY id"))
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| self.err(e))?
                .iter()
                .map(user_from_row)
                .collect::<Result<Vec<_>, _>>()?;
        let tokens = sqlx::query(concat!("SELECT ", token_cols!(), " FROM tokens ORDER BY id"))
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.err(e))?
            .iter()
            .map(token_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ExportData { channels: config.channels, users, tokens, options: config.options })
    }

    /// Adds everything in `data` in one transaction: all of it or, on any conflict or error, none.
    /// Channels and users get new ids; keys follow their user's new id. Options are set (replacing
    /// values of the same key).
    pub(crate) async fn import(&self, data: ExportData) -> Result<ImportSummary, StorageError> {
        let mut tx = self.begin().await?;
        let mut summary = ImportSummary::default();
        for mut ch in data.channels {
            self.insert_channel(&mut tx, &mut ch).await?;
            summary.channels += 1;
        }
        let mut user_ids = BTreeMap::new();
        for mut u in data.users {
            let old = u.id;
            self.insert_user(&mut tx, &mut u).await?;
            user_ids.insert(old, u.id);
            summary.users += 1;
        }
        for mut t in data.tokens {
            let Some(user) = user_ids.get(&t.user_id) else {
                return Err(StorageError::NotFound(format!(
                    "key {:?} belongs to user {}, which the import does not contain",
                    t.name, t.user_id
                )));
            };
            t.user_id = *user;
            self.insert_token(&mut tx, &mut t).await?;
            summary.tokens += 1;
        }
        for (key, value) in &data.options {
            sqlx::query(
                r#"INSERT INTO options ("key", value) VALUES ($1, $2) ON CONFLICT ("key") DO UPDATE SET value = excluded.value"#,
            )
            .bind(key.clone())
            .bind(value.clone())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            summary.options += 1;
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(summary)
    }

    // ---- logs -----------------------------------------------------------------------------------

    /// Logs matching the filter, newest first, and how many match in total.
    pub(crate) async fn list_logs(&self, f: &LogFilter) -> Result<(Vec<LogEntry>, i64), StorageError> {
        let mut w = Where::default();
        if let Some(v) = f.user_id {
            w.push("user_id = ", Bind::Int(v));
        }
        if let Some(v) = f.token_id {
            w.push("token_id = ", Bind::Int(v));
        }
        if let Some(v) = f.kind {
            w.push("type = ", Bind::Int(v));
        }
        if let Some(v) = &f.model {
            w.push("model_name = ", Bind::Text(v.clone()));
        }
        if let Some(v) = &f.request_id {
            w.push("request_id = ", Bind::Text(v.clone()));
        }
        if let Some(v) = f.start {
            w.push("created_at >= ", Bind::Int(v));
        }
        if let Some(v) = f.end {
            w.push("created_at <= ", Bind::Int(v));
        }
        let (limit, offset) = page_bounds(f.page, f.page_size);
        let mut conn = self.conn().await?;
        let total = self.count(&mut conn, "logs", &w).await?;
        let sql = format!(
            "SELECT id, {} FROM logs{} ORDER BY created_at DESC, id DESC LIMIT {limit} OFFSET {offset}",
            log_insert_cols!(),
            w.sql()
        );
        let rows =
            w.bind(sqlx::query(AssertSqlSafe(sql))).fetch_all(&mut *conn).await.map_err(|e| self.err(e))?;
        let items = rows.iter().map(log_from_row).collect::<Result<Vec<_>, _>>()?;
        Ok((items, total))
    }
}

// ---- SQL building -------------------------------------------------------------------------------

/// A value bound to a dynamically built statement.
#[derive(Debug, Clone)]
enum Bind {
    Int(i64),
    Text(String),
}

/// A `WHERE` clause of `column op $N` conditions joined by `AND`; columns and operators are
/// compile-time text, values are always bound.
#[derive(Debug, Default)]
struct Where {
    clauses: Vec<String>,
    binds: Vec<Bind>,
}

impl Where {
    fn push(&mut self, column_and_op: &'static str, value: Bind) {
        self.binds.push(value);
        self.clauses.push(format!("{column_and_op}${}", self.binds.len()));
    }

    fn sql(&self) -> String {
        if self.clauses.is_empty() { String::new() } else { format!(" WHERE {}", self.clauses.join(" AND ")) }
    }

    fn bind(&self, mut q: AnyQuery) -> AnyQuery {
        for b in &self.binds {
            q = match b {
                Bind::Int(v) => q.bind(*v),
                Bind::Text(v) => q.bind(v.clone()),
            };
        }
        q
    }
}

/// `prefix` followed by `rows` tuples of `cols` placeholders: `$N` for Postgres, `?` for SQLite.
fn multi_insert_sql(backend: Backend, prefix: &str, cols: usize, rows: usize) -> String {
    let mut sql = String::with_capacity(prefix.len() + rows * cols * 6);
    sql.push_str(prefix);
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            match backend {
                Backend::Postgres => {
                    let _ = write!(sql, "${}", r * cols + c + 1);
                }
                Backend::Sqlite => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql
}

fn log_insert_sql(backend: Backend, rows: usize) -> String {
    multi_insert_sql(
        backend,
        concat!("INSERT INTO logs (", log_insert_cols!(), ") VALUES "),
        LOG_COLUMNS,
        rows,
    )
}

/// Binds the [`LOG_COLUMNS`] values of one log row, in `log_insert_cols!` order. Text is cleaned of
/// NUL characters, which Postgres rejects: one odd request must never block a whole batch.
fn bind_log(q: AnyQuery, log: &LogEntry) -> AnyQuery {
    q.bind(log.created_at)
        .bind(log.kind)
        .bind(log.user_id)
        .bind(clean(&log.username))
        .bind(log.token_id)
        .bind(clean(&log.token_name))
        .bind(clean(&log.model_name))
        .bind(log.channel_id)
        .bind(log.quota)
        .bind(log.prompt_tokens)
        .bind(log.completion_tokens)
        .bind(log.use_time_ms)
        .bind(log.is_stream)
        .bind(clean(&log.group))
        .bind(clean(&log.ip))
        .bind(clean(&log.request_id))
        .bind(clean(&log.content))
        .bind(log.cached_tokens)
        .bind(clean(&log.other))
}

fn clean(s: &str) -> String {
    if s.contains('\0') { s.replace('\0', "") } else { s.to_string() }
}

/// `(LIMIT, OFFSET)` for a 1-based page.
fn page_bounds(page: i64, page_size: i64) -> (i64, i64) {
    let size = if page_size <= 0 { DEFAULT_PAGE_SIZE } else { page_size.min(MAX_PAGE_SIZE) };
    let page = page.max(1);
    (size, (page - 1).saturating_mul(size))
}

fn mapping_json(ch: &Channel) -> Result<String, StorageError> {
    serde_json::to_string(&ch.model_mapping)
        .map_err(|e| StorageError::Query(format!("model mapping of channel {}: {e}", ch.id)))
}

// ---- row decoding -------------------------------------------------------------------------------

fn decode_err(col: &str, e: sqlx::Error) -> StorageError {
    StorageError::Query(format!("cannot read column {col}: {e}"))
}

fn int(row: &AnyRow, col: &str) -> Result<i64, StorageError> {
    row.try_get::<i64, _>(col).map_err(|e| decode_err(col, e))
}

fn text(row: &AnyRow, col: &str) -> Result<String, StorageError> {
    row.try_get::<String, _>(col).map_err(|e| decode_err(col, e))
}

/// A boolean stored as BOOLEAN (Postgres) or INTEGER 0/1 (SQLite).
fn flag(row: &AnyRow, col: &str) -> Result<bool, StorageError> {
    match row.try_get::<bool, _>(col) {
        Ok(b) => Ok(b),
        Err(_) => row.try_get::<i64, _>(col).map(|v| v != 0).map_err(|e| decode_err(col, e)),
    }
}

fn user_from_row(row: &AnyRow) -> Result<User, StorageError> {
    Ok(User {
        id: int(row, "id")?,
        username: text(row, "username")?,
        password_hash: text(row, "password_hash")?,
        display_name: text(row, "display_name")?,
        role: int(row, "role")?,
        status: int(row, "status")?,
        email: text(row, "email")?,
        group: text(row, "group")?,
        quota: int(row, "quota")?,
        used_quota: int(row, "used_quota")?,
        request_count: int(row, "request_count")?,
        created_time: int(row, "created_time")?,
        quota_version: int(row, "quota_version")?,
    })
}

fn token_from_row(row: &AnyRow) -> Result<Token, StorageError> {
    Ok(Token {
        id: int(row, "id")?,
        user_id: int(row, "user_id")?,
        key: text(row, "key_masked")?,
        key_hash: text(row, "key_hash")?,
        name: text(row, "name")?,
        status: int(row, "status")?,
        created_time: int(row, "created_time")?,
        accessed_time: int(row, "accessed_time")?,
        expired_time: int(row, "expired_time")?,
        remain_quota: int(row, "remain_quota")?,
        unlimited_quota: flag(row, "unlimited_quota")?,
        used_quota: int(row, "used_quota")?,
        models: split_list(&text(row, "models")?).map(str::to_string).collect(),
        allow_ips: text(row, "allow_ips")?,
        group: text(row, "group")?,
        rpm: int(row, "rpm")?,
        tpm: int(row, "tpm")?,
        quota_version: int(row, "quota_version")?,
    })
}

fn channel_from_row(row: &AnyRow) -> Result<Channel, StorageError> {
    let id = int(row, "id")?;
    let kind_name = text(row, "type")?;
    let kind = ChannelType::parse(&kind_name)
        .ok_or_else(|| StorageError::Query(format!("channel {id} has an unknown type {kind_name:?}")))?;
    let mapping_text = text(row, "model_mapping")?;
    let model_mapping = if mapping_text.trim().is_empty() {
        BTreeMap::new()
    } else {
        serde_json::from_str(&mapping_text)
            .map_err(|e| StorageError::Query(format!("channel {id} has an invalid model_mapping: {e}")))?
    };
    Ok(Channel {
        id,
        name: text(row, "name")?,
        kind,
        base_url: text(row, "base_url")?,
        key: text(row, "key")?,
        models: text(row, "models")?,
        group: text(row, "group")?,
        priority: int(row, "priority")?,
        weight: int(row, "weight")?,
        model_mapping,
        tag: text(row, "tag")?,
        proxy: text(row, "proxy")?,
        status: int(row, "status")?,
        test_model: text(row, "test_model")?,
        created_time: int(row, "created_time")?,
        test_time: int(row, "test_time")?,
        response_time: int(row, "response_time")?,
        used_quota: int(row, "used_quota")?,
        auto_disabled_reason: text(row, "status_reason")?,
        auto_disabled_time: int(row, "status_time")?,
    })
}

fn log_from_row(row: &AnyRow) -> Result<LogEntry, StorageError> {
    Ok(LogEntry {
        id: int(row, "id")?,
        created_at: int(row, "created_at")?,
        kind: int(row, "type")?,
        user_id: int(row, "user_id")?,
        username: text(row, "username")?,
        token_id: int(row, "token_id")?,
        token_name: text(row, "token_name")?,
        model_name: text(row, "model_name")?,
        channel_id: int(row, "channel_id")?,
        quota: int(row, "quota")?,
        prompt_tokens: int(row, "prompt_tokens")?,
        completion_tokens: int(row, "completion_tokens")?,
        use_time_ms: int(row, "use_time_ms")?,
        is_stream: flag(row, "is_stream")?,
        group: text(row, "group")?,
        ip: text(row, "ip")?,
        request_id: text(row, "request_id")?,
        content: text(row, "content")?,
        cached_tokens: int(row, "cached_tokens")?,
        other: text(row, "other")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_inserts_number_every_placeholder() {
        assert_eq!(
            multi_insert_sql(Backend::Postgres, "INSERT INTO t (a, b) VALUES ", 2, 2),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)"
        );
        assert_eq!(
            multi_insert_sql(Backend::Sqlite, "INSERT INTO t (a, b) VALUES ", 2, 2),
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?)"
        );
    }

    #[test]
    fn pages_are_one_based_and_bounded() {
        assert_eq!(page_bounds(1, 10), (10, 0));
        assert_eq!(page_bounds(3, 10), (10, 20));
        assert_eq!(page_bounds(0, 0), (DEFAULT_PAGE_SIZE, 0));
        assert_eq!(page_bounds(1, 1_000_000), (MAX_PAGE_SIZE, 0));
    }

    #[test]
    fn where_clauses_number_their_binds() {
        let mut w = Where::default();
        assert_eq!(w.sql(), "");
        w.push("a = ", Bind::Int(1));
        w.push("b >= ", Bind::Text("x".into()));
        assert_eq!(w.sql(), " WHERE a = $1 AND b >= $2");
    }
}
