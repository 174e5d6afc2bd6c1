-- BurnCloud schema, SQLite flavour. Columns follow New API so operators can migrate their data.
-- Booleans are INTEGER 0/1 here (BOOLEAN in the Postgres flavour); every id is a 64-bit integer.

CREATE TABLE IF NOT EXISTS users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL DEFAULT '',
    display_name  TEXT    NOT NULL DEFAULT '',
    role          INTEGER NOT NULL DEFAULT 1,
    status        INTEGER NOT NULL DEFAULT 1,
    email         TEXT    NOT NULL DEFAULT '',
    "group"       TEXT    NOT NULL DEFAULT 'default',
    quota         INTEGER NOT NULL DEFAULT 0,
    used_quota    INTEGER NOT NULL DEFAULT 0,
    request_count INTEGER NOT NULL DEFAULT 0,
    created_time  INTEGER NOT NULL DEFAULT 0,
    aff_code      TEXT    NOT NULL DEFAULT '',
    inviter_id    INTEGER NOT NULL DEFAULT 0,
    deleted_at    INTEGER
);
CREATE INDEX IF NOT EXISTS idx_users_aff_code ON users (aff_code);

CREATE TABLE IF NOT EXISTS tokens (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id         INTEGER NOT NULL,
    key_hash        TEXT    NOT NULL UNIQUE,
    key_masked      TEXT    NOT NULL DEFAULT '',
    name            TEXT    NOT NULL DEFAULT '',
    status          INTEGER NOT NULL DEFAULT 1,
    created_time    INTEGER NOT NULL DEFAULT 0,
    accessed_time   INTEGER NOT NULL DEFAULT 0,
    expired_time    INTEGER NOT NULL DEFAULT -1,
    remain_quota    INTEGER NOT NULL DEFAULT 0,
    unlimited_quota INTEGER NOT NULL DEFAULT 0,
    used_quota      INTEGER NOT NULL DEFAULT 0,
    models          TEXT    NOT NULL DEFAULT '',
    allow_ips       TEXT    NOT NULL DEFAULT '',
    "group"         TEXT    NOT NULL DEFAULT '',
    rpm             INTEGER NOT NULL DEFAULT 0,
    tpm             INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS idx_tokens_user_id ON tokens (user_id);

CREATE TABLE IF NOT EXISTS channels (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    type          TEXT    NOT NULL,
    name          TEXT    NOT NULL DEFAULT '',
    "key"         TEXT    NOT NULL DEFAULT '',
    base_url      TEXT    NOT NULL DEFAULT '',
    models        TEXT    NOT NULL DEFAULT '',
    "group"       TEXT    NOT NULL DEFAULT 'default',
    priority      INTEGER NOT NULL DEFAULT 0,
    weight        INTEGER NOT NULL DEFAULT 0,
    model_mapping TEXT    NOT NULL DEFAULT '{}',
    tag           TEXT    NOT NULL DEFAULT '',
    proxy         TEXT    NOT NULL DEFAULT '',
    status        INTEGER NOT NULL DEFAULT 1,
    test_model    TEXT    NOT NULL DEFAULT '',
    created_time  INTEGER NOT NULL DEFAULT 0,
    test_time     INTEGER NOT NULL DEFAULT 0,
    response_time INTEGER NOT NULL DEFAULT 0,
    used_quota    INTEGER NOT NULL DEFAULT 0,
    other         TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS idx_channels_tag ON channels (tag);

CREATE TABLE IF NOT EXISTS abilities (
    "group"    TEXT    NOT NULL,
    model      TEXT    NOT NULL,
    channel_id INTEGER NOT NULL,
    enabled    INTEGER NOT NULL DEFAULT 1,
    priority   INTEGER NOT NULL DEFAULT 0,
    weight     INTEGER NOT NULL DEFAULT 0,
    tag        TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY ("group", model, channel_id)
);
CREATE INDEX IF NOT EXISTS idx_abilities_channel_id ON abilities (channel_id);

CREATE TABLE IF NOT EXISTS logs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at        INTEGER NOT NULL,
    type              INTEGER NOT NULL,
    user_id           INTEGER NOT NULL DEFAULT 0,
    username          TEXT    NOT NULL DEFAULT '',
    token_id          INTEGER NOT NULL DEFAULT 0,
    token_name        TEXT    NOT NULL DEFAULT '',
    model_name        TEXT    NOT NULL DEFAULT '',
    channel_id        INTEGER NOT NULL DEFAULT 0,
    quota             INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    use_time_ms       INTEGER NOT NULL DEFAULT 0,
    is_stream         INTEGER NOT NULL DEFAULT 0,
    "group"           TEXT    NOT NULL DEFAULT '',
    ip                TEXT    NOT NULL DEFAULT '',
    request_id        TEXT    NOT NULL DEFAULT '',
    content           TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS idx_logs_user_id_created_at ON logs (user_id, created_at);
CREATE INDEX IF NOT EXISTS idx_logs_token_id ON logs (token_id);
CREATE INDEX IF NOT EXISTS idx_logs_request_id ON logs (request_id);
CREATE INDEX IF NOT EXISTS idx_logs_created_at ON logs (created_at);

CREATE TABLE IF NOT EXISTS options (
    "key"  TEXT PRIMARY KEY NOT NULL,
    value  TEXT NOT NULL DEFAULT ''
);

-- Spill batches already written, so a batch replayed from the local spill file after a crash is
-- never applied twice. Rows are removed once the spill file has been truncated.
CREATE TABLE IF NOT EXISTS spill_batches (
    id         TEXT    PRIMARY KEY NOT NULL,
    applied_at INTEGER NOT NULL
);
