//! The management API (`/api/…`), in New API's envelope: `{"success", "message", "data"}`.
//!
//! Root access only, by `Authorization: Bearer <admin key>`. Every call goes to the storage thread and
//! awaits its reply; changes to channels and options are published to every worker (through the
//! control thread) before the call returns, and changes to keys or users invalidate the workers' key
//! caches. Validation errors are HTTP 400 with `success:false` and a message naming the field.

use std::collections::BTreeMap;

use burncloud_core::lease::{Account, Funding};
use burncloud_core::model::{
    Channel, ChannelType, Quota, STATUS_DISABLED, STATUS_ENABLED, Token, User, split_list,
};
use burncloud_core::{apikey, password};
use burncloud_storage::{ChannelFilter, LogFilter, StorageError};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::http::{Request, Responder};
use crate::state::{Worker, option_keys, unix_now};
use crate::upstream::Origin;

/// A management-API failure: HTTP status and message.
pub struct ApiError(u16, String);

type ApiResult = Result<Value, ApiError>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(400, msg.into())
}

fn not_found(what: &str) -> ApiError {
    ApiError(404, format!("{what} not found"))
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Conflict(m) => ApiError(409, m),
            StorageError::NotFound(m) => ApiError(404, m),
            other => ApiError(503, format!("storage: {other}")),
        }
    }
}

/// Serves one management request.
pub async fn handle(worker: &Worker, req: Request, resp: &mut Responder<'_>) {
    let result = if !authorized(worker, &req) {
        Err(ApiError(
            401,
            "missing or wrong admin key: send Authorization: Bearer <BURNCLOUD_ADMIN_KEY>".into(),
        ))
    } else {
        dispatch(worker, &req).await
    };
    let (status, body) = match result {
        Ok(data) => (200, json!({"success": true, "message": "", "data": data})),
        Err(ApiError(status, message)) => (status, json!({"success": false, "message": message})),
    };
    let _ = resp.send(status, &[("content-type", "application/json")], Bytes::from(body.to_string())).await;
}

fn authorized(worker: &Worker, req: &Request) -> bool {
    let Some(v) = req.header("authorization") else { return false };
    let key = v.trim().strip_prefix("Bearer ").unwrap_or(v.trim()).trim();
    !key.is_empty() && apikey::hash(key) == worker.shared.admin_key_hash
}

async fn dispatch(worker: &Worker, req: &Request) -> ApiResult {
    let path = req.path.trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').skip(2).collect(); // "", "api", …
    let method = req.method.as_str();
    match (method, parts.as_slice()) {
        ("GET", ["channel"]) => list_channels(worker, req).await,
        ("POST", ["channel", "tag", "enabled"]) => set_tag_status(worker, req, STATUS_ENABLED).await,
        ("POST", ["channel", "tag", "disabled"]) => set_tag_status(worker, req, STATUS_DISABLED).await,
        ("PUT", ["channel", "tag"]) => edit_tag(worker, req).await,
        ("POST", ["channel"]) => create_channel(worker, req).await,
        ("GET", ["channel", id]) => get_channel(worker, parse_id(id)?).await,
        ("POST", ["channel", id, "test"]) | ("GET", ["channel", "test", id]) => {
            test_channel(worker, parse_id(id)?).await
        }
        ("PUT", ["channel", id]) => update_channel(worker, parse_id(id)?, req).await,
        ("DELETE", ["channel", id]) => delete_channel(worker, parse_id(id)?).await,
        ("POST", ["user"]) => create_user(worker, req).await,
        ("GET", ["user", id]) => get_user(worker, parse_id(id)?).await,
        ("PUT", ["user", id]) => update_user(worker, parse_id(id)?, req).await,
        ("POST", ["user", id, "topup"]) => topup_user(worker, parse_id(id)?, req).await,
        ("GET", ["user", id, "ledger"]) => ledger_audit(worker, Account::User(parse_id(id)?)).await,
        ("GET", ["token", id, "ledger"]) => ledger_audit(worker, Account::Key(parse_id(id)?)).await,
        ("POST", ["token"]) => create_token(worker, req).await,
        ("GET", ["token", id]) => get_token(worker, parse_id(id)?).await,
        ("PUT", ["token", id]) => update_token(worker, parse_id(id)?, req).await,
        ("DELETE", ["token", id]) => delete_token(worker, parse_id(id)?).await,
        ("GET", ["log"]) => list_logs(worker, req).await,
        ("GET", ["option"]) => get_options(worker).await,
        ("GET", ["export"]) => export(worker).await,
        ("POST", ["import"]) => import(worker, req).await,
        ("PUT", ["option"]) => put_option(worker, req).await,
        (_, ["channel" | "user" | "token" | "log" | "option" | "export" | "import", ..]) => {
            Err(ApiError(405, format!("{method} is not supported on {}", req.path)))
        }
        _ => Err(ApiError(404, format!("no management endpoint {}", req.path))),
    }
}

fn parse_id(s: &str) -> Result<i64, ApiError> {
    s.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| bad(format!("{s:?} is not an id")))
}

fn body<T: for<'de> Deserialize<'de>>(req: &Request) -> Result<T, ApiError> {
    serde_json::from_slice(&req.body).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

fn to_json<T: serde::Serialize>(v: &T) -> ApiResult {
    serde_json::to_value(v).map_err(|e| ApiError(500, e.to_string()))
}

fn page(req: &Request) -> Result<(i64, i64), ApiError> {
    let num = |name: &str, default: i64| match req.query_param(name) {
        Some(v) if !v.is_empty() => v.parse::<i64>().map_err(|_| bad(format!("{name} must be a number"))),
        _ => Ok(default),
    };
    Ok((num("page", 1)?.max(1), num("page_size", 20)?.clamp(1, 1000)))
}

fn opt_num(req: &Request, name: &str) -> Result<Option<i64>, ApiError> {
    match req.query_param(name) {
        Some(v) if !v.is_empty() => {
            v.parse::<i64>().map(Some).map_err(|_| bad(format!("{name} must be a number")))
        }
        _ => Ok(None),
    }
}

/// A list given either as `"a,b"` or `["a","b"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ListField {
    Text(String),
    Items(Vec<String>),
}

impl ListField {
    fn items(&self) -> Vec<String> {
        match self {
            ListField::Text(s) => split_list(s).map(str::to_string).collect(),
            ListField::Items(v) => v.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        }
    }
}

/// A model mapping given as an object or as its JSON text (New API sends text).
#[derive(Deserialize)]
#[serde(untagged)]
enum MappingField {
    Map(BTreeMap<String, String>),
    Text(String),
}

impl MappingField {
    fn into_map(self) -> Result<BTreeMap<String, String>, ApiError> {
        match self {
            MappingField::Map(m) => Ok(m),
            MappingField::Text(t) if t.trim().is_empty() => Ok(BTreeMap::new()),
            MappingField::Text(t) => serde_json::from_str(&t)
                .map_err(|e| bad(format!("model_mapping must be a JSON object of model names: {e}"))),
        }
    }
}

// ---------------------------------------------------------------- channels

#[derive(Deserialize, Default)]
struct ChannelInput {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    base_url: Option<String>,
    key: Option<String>,
    models: Option<ListField>,
    group: Option<ListField>,
    priority: Option<i64>,
    weight: Option<i64>,
    model_mapping: Option<MappingField>,
    tag: Option<String>,
    proxy: Option<String>,
    status: Option<i64>,
    test_model: Option<String>,
}

impl ChannelInput {
    fn apply(self, ch: &mut Channel) -> Result<(), ApiError> {
        if let Some(v) = self.name {
            ch.name = v.trim().to_string();
        }
        if let Some(v) = self.kind {
            ch.kind = ChannelType::parse(v.trim())
                .ok_or_else(|| bad(format!("type {v:?} is not one of openai, anthropic, gemini")))?;
        }
        if let Some(v) = self.base_url {
            ch.base_url = v.trim().trim_end_matches('/').to_string();
        }
        if let Some(v) = self.key {
            ch.key = v.trim().to_string();
        }
        if let Some(v) = self.models {
            ch.models = v.items().join(",");
        }
        if let Some(v) = self.group {
            ch.group = v.items().join(",");
        }
        if let Some(v) = self.priority {
            ch.priority = v;
        }
        if let Some(v) = self.weight {
            ch.weight = v;
        }
        if let Some(v) = self.model_mapping {
            ch.model_mapping = v.into_map()?;
        }
        if let Some(v) = self.tag {
            ch.tag = v.trim().to_string();
        }
        if let Some(v) = self.proxy {
            ch.proxy = v.trim().to_string();
        }
        if let Some(v) = self.status {
            ch.status = v;
        }
        if let Some(v) = self.test_model {
            ch.test_model = v.trim().to_string();
        }
        validate_channel(ch)
    }
}

fn validate_channel(ch: &Channel) -> Result<(), ApiError> {
    if ch.name.is_empty() {
        return Err(bad("name is required"));
    }
    Origin::parse(&ch.base_url).map_err(|e| bad(e.to_string()))?;
    if ch.key.is_empty() {
        return Err(bad("key is required"));
    }
    if ch.model_list().next().is_none() {
        return Err(bad("models must name at least one model"));
    }
    if ch.group_list().next().is_none() {
        return Err(bad("group must name at least one group"));
    }
    if ch.weight < 0 {
        return Err(bad("weight must not be negative"));
    }
    if !(1..=3).contains(&ch.status) {
        return Err(bad("status must be 1 (enabled), 2 (disabled) or 3 (auto-disabled)"));
    }
    if !ch.proxy.is_empty() {
        crate::upstream::Proxy::parse(&ch.proxy).map_err(bad)?;
    }
    Ok(())
}

fn new_channel() -> Channel {
    Channel {
        id: 0,
        name: String::new(),
        kind: ChannelType::OpenAi,
        base_url: String::new(),
        key: String::new(),
        models: String::new(),
        group: "default".into(),
        priority: 0,
        weight: 0,
        model_mapping: BTreeMap::new(),
        tag: String::new(),
        proxy: String::new(),
        status: STATUS_ENABLED,
        test_model: String::new(),
        created_time: unix_now(),
        test_time: 0,
        response_time: 0,
        used_quota: 0,
        auto_disabled_reason: String::new(),
        auto_disabled_time: 0,
    }
}

/// A channel as shown by the API: the upstream key masked.
fn channel_view(ch: &Channel) -> ApiResult {
    let mut v = to_json(ch)?;
    v["key"] = Value::String(apikey::mask(&ch.key));
    Ok(v)
}

async fn published(worker: &Worker) -> Result<(), ApiError> {
    worker.shared.reload().await.map_err(|e| ApiError(503, format!("saved, but not yet live: {e}")))
}

async fn create_channel(worker: &Worker, req: &Request) -> ApiResult {
    let input: ChannelInput = body(req)?;
    if input.kind.is_none() {
        return Err(bad("type is required"));
    }
    let mut ch = new_channel();
    input.apply(&mut ch)?;
    let saved = worker.shared.storage.create_channel(ch).await?;
    published(worker).await?;
    channel_view(&saved)
}

async fn list_channels(worker: &Worker, req: &Request) -> ApiResult {
    let (page, page_size) = page(req)?;
    let filter = ChannelFilter {
        tag: req.query_param("tag").filter(|t| !t.is_empty()),
        status: opt_num(req, "status")?,
        page,
        page_size,
    };
    let (items, total) = worker.shared.storage.list_channels(filter).await?;
    let items = items.iter().map(channel_view).collect::<Result<Vec<_>, _>>()?;
    Ok(json!({"items": items, "total": total}))
}

async fn get_channel(worker: &Worker, id: i64) -> ApiResult {
    let ch = worker.shared.storage.get_channel(id).await?.ok_or_else(|| not_found("channel"))?;
    channel_view(&ch)
}

/// `POST /api/channel/{id}/test` (also New API's `GET /api/channel/test/{id}`): one test request now;
/// a success re-enables an auto-disabled channel. A failed test answers `success:false` with the
/// upstream's message and the time it took.
async fn test_channel(worker: &Worker, id: i64) -> ApiResult {
    let ch = worker.shared.storage.get_channel(id).await?.ok_or_else(|| not_found("channel"))?;
    let result = crate::probe::test_channel(worker, &ch).await;
    crate::probe::record(&worker.shared, id, &result, false).await.map_err(|e| ApiError(503, e.message))?;
    if result.ok {
        Ok(json!({"time_ms": result.time_ms}))
    } else {
        Err(ApiError(502, format!("channel test failed after {} ms: {}", result.time_ms, result.message)))
    }
}

async fn update_channel(worker: &Worker, id: i64, req: &Request) -> ApiResult {
    let input: ChannelInput = body(req)?;
    let mut ch = worker.shared.storage.get_channel(id).await?.ok_or_else(|| not_found("channel"))?;
    input.apply(&mut ch)?;
    let saved = worker.shared.storage.update_channel(ch).await?.ok_or_else(|| not_found("channel"))?;
    published(worker).await?;
    channel_view(&saved)
}

async fn delete_channel(worker: &Worker, id: i64) -> ApiResult {
    let ch = worker.shared.storage.get_channel(id).await?.ok_or_else(|| not_found("channel"))?;
    worker.shared.storage.delete_channel(id).await?;
    published(worker).await?;
    channel_view(&ch)
}

// ---------------------------------------------------------------- tags

/// Every channel carrying `tag`, in id order.
async fn channels_with_tag(worker: &Worker, tag: &str) -> Result<Vec<Channel>, ApiError> {
    let mut all = Vec::new();
    for page in 1.. {
        let filter = ChannelFilter { tag: Some(tag.to_string()), status: None, page, page_size: 500 };
        let (items, total) = worker.shared.storage.list_channels(filter).await?;
        let done = items.is_empty() || all.len() + items.len() >= usize::try_from(total).unwrap_or(0);
        all.extend(items);
        if done {
            break;
        }
    }
    Ok(all)
}

#[derive(Deserialize)]
struct TagInput {
    tag: String,
}

/// `POST /api/channel/tag/enabled|disabled {"tag"}`: sets the status of every channel of a tag.
async fn set_tag_status(worker: &Worker, req: &Request, status: i64) -> ApiResult {
    let input: TagInput = body(req)?;
    if input.tag.trim().is_empty() {
        return Err(bad("tag is required"));
    }
    let channels = channels_with_tag(worker, input.tag.trim()).await?;
    for mut ch in channels.iter().cloned() {
        ch.status = status;
        worker.shared.storage.update_channel(ch).await?;
    }
    published(worker).await?;
    Ok(json!({"tag": input.tag.trim(), "updated": channels.len()}))
}

/// The fields `PUT /api/channel/tag` may change on every channel of a tag (New API's names).
#[derive(Deserialize)]
struct TagEdit {
    tag: String,
    new_tag: Option<String>,
    priority: Option<i64>,
    weight: Option<i64>,
    models: Option<ListField>,
    groups: Option<ListField>,
    model_mapping: Option<MappingField>,
}

/// `PUT /api/channel/tag`: edits every channel of a tag at once; all are validated before any is saved.
async fn edit_tag(worker: &Worker, req: &Request) -> ApiResult {
    let edit: TagEdit = body(req)?;
    let tag = edit.tag.trim().to_string();
    if tag.is_empty() {
        return Err(bad("tag is required"));
    }
    let mapping = edit.model_mapping.map(MappingField::into_map).transpose()?;
    let models = edit.models.map(|m| m.items().join(","));
    let groups = edit.groups.map(|g| g.items().join(","));
    let mut changed = channels_with_tag(worker, &tag).await?;
    for ch in &mut changed {
        if let Some(t) = &edit.new_tag {
            ch.tag = t.trim().to_string();
        }
        if let Some(p) = edit.priority {
            ch.priority = p;
        }
        if let Some(w) = edit.weight {
            ch.weight = w;
        }
        if let Some(m) = &models {
            ch.models = m.clone();
        }
        if let Some(g) = &groups {
            ch.group = g.clone();
        }
        if let Some(m) = &mapping {
            ch.model_mapping = m.clone();
        }
        validate_channel(ch)?;
    }
    for ch in &changed {
        worker.shared.storage.update_channel(ch.clone()).await?;
    }
    published(worker).await?;
    Ok(json!({"tag": tag, "updated": changed.len()}))
}

// ---------------------------------------------------------------- users

#[derive(Deserialize, Default)]
struct UserInput {
    username: Option<String>,
    password: Option<String>,
    display_name: Option<String>,
    email: Option<String>,
    group: Option<String>,
    quota: Option<Quota>,
    status: Option<i64>,
    role: Option<i64>,
}

impl UserInput {
    fn apply(self, u: &mut User) -> Result<(), ApiError> {
        if let Some(v) = self.username {
            let v = v.trim();
            if v.is_empty() || v.len() > 64 {
                return Err(bad("username must be 1 to 64 characters"));
            }
            u.username = v.to_string();
        }
        if let Some(v) = self.password {
            if v.len() < 8 || v.len() > 128 {
                return Err(bad("password must be 8 to 128 characters"));
            }
            u.password_hash =
                password::hash(&v).map_err(|e| ApiError(500, format!("password hashing: {e}")))?;
        }
        if let Some(v) = self.display_name {
            u.display_name = v;
        }
        if let Some(v) = self.email {
            u.email = v.trim().to_string();
        }
        if let Some(v) = self.group {
            let v = v.trim();
            if v.is_empty() {
                return Err(bad("group must not be empty"));
            }
            u.group = v.to_string();
        }
        if let Some(v) = self.quota {
            u.quota = v;
        }
        if let Some(v) = self.status {
            if v != STATUS_ENABLED && v != STATUS_DISABLED {
                return Err(bad("status must be 1 (enabled) or 2 (disabled)"));
            }
            u.status = v;
        }
        if let Some(v) = self.role {
            u.role = v;
        }
        Ok(())
    }
}

async fn create_user(worker: &Worker, req: &Request) -> ApiResult {
    let input: UserInput = body(req)?;
    if input.username.is_none() {
        return Err(bad("username is required"));
    }
    if input.password.is_none() {
        return Err(bad("password is required"));
    }
    let mut u = User {
        id: 0,
        username: String::new(),
        password_hash: String::new(),
        display_name: String::new(),
        role: 1,
        status: STATUS_ENABLED,
        email: String::new(),
        group: "default".into(),
        quota: 0,
        used_quota: 0,
        request_count: 0,
        created_time: unix_now(),
        quota_version: 1,
    };
    input.apply(&mut u)?;
    if u.quota < 0 {
        return Err(bad("quota must not be negative"));
    }
    if u.display_name.is_empty() {
        u.display_name = u.username.clone();
    }
    let saved = worker.shared.storage.create_user(u).await?;
    to_json(&saved)
}

async fn get_user(worker: &Worker, id: i64) -> ApiResult {
    let u = worker.shared.storage.get_user(id).await?.ok_or_else(|| not_found("user"))?;
    to_json(&u)
}

async fn update_user(worker: &Worker, id: i64, req: &Request) -> ApiResult {
    let input: UserInput = body(req)?;
    let mut u = worker.shared.storage.get_user(id).await?.ok_or_else(|| not_found("user"))?;
    input.apply(&mut u)?;
    let saved = worker.shared.storage.update_user(u).await?.ok_or_else(|| not_found("user"))?;
    worker.shared.bump_auth_epoch();
    fund_user(worker, &saved).await;
    to_json(&saved)
}

#[derive(Deserialize)]
struct TopupInput {
    quota: Quota,
}

async fn topup_user(worker: &Worker, id: i64, req: &Request) -> ApiResult {
    let input: TopupInput = body(req)?;
    if input.quota <= 0 {
        return Err(bad("quota must be a positive integer"));
    }
    let u = worker
        .shared
        .storage
        .topup_user(id, input.quota, unix_now())
        .await?
        .ok_or_else(|| not_found("user"))?;
    worker.shared.bump_auth_epoch();
    fund_user(worker, &u).await;
    to_json(&u)
}

/// What the balance ledger holds for a user or key right now: the spendable `balance`, the spend
/// workers have `reported`, the leases `held` by workers of every instance (spend not yet reported
/// included), whether the account was `opened` from the database, and the funding it reflects.
async fn ledger_audit(worker: &Worker, account: Account) -> ApiResult {
    let a = worker
        .shared
        .ledger
        .audit(account)
        .await
        .map_err(|e| ApiError(503, format!("balance ledger: {e}")))?;
    Ok(json!({
        "balance": a.balance,
        "reported": a.reported,
        "held": a.held,
        "opened": a.opened,
        "funded": a.funded,
        "version": a.version,
    }))
}

/// Hands the user's funding, as just committed, to the balance ledger, so a top-up or an edit is
/// spendable at once on every instance. When the ledger is unreachable the ledger thread keeps it and
/// retries; the database already has it, so it is never lost.
async fn fund_user(worker: &Worker, u: &User) {
    let funding = Funding { remaining: u.quota, total: u.quota + u.used_quota, version: u.quota_version };
    if let Err(e) = worker.shared.ledger.fund(Account::User(u.id), funding).await {
        tracing::warn!(user = u.id, error = %e, "funding not yet applied at the ledger; it is retried");
    }
}

/// As [`fund_user`], for a key with limited quota.
async fn fund_token(worker: &Worker, t: &Token) {
    if t.unlimited_quota {
        return;
    }
    let funding =
        Funding { remaining: t.remain_quota, total: t.remain_quota + t.used_quota, version: t.quota_version };
    if let Err(e) = worker.shared.ledger.fund(Account::Key(t.id), funding).await {
        tracing::warn!(token = t.id, error = %e, "funding not yet applied at the ledger; it is retried");
    }
}

// ---------------------------------------------------------------- tokens

#[derive(Deserialize, Default)]
struct TokenInput {
    user_id: Option<i64>,
    name: Option<String>,
    remain_quota: Option<Quota>,
    unlimited_quota: Option<bool>,
    expired_time: Option<i64>,
    models: Option<ListField>,
    allow_ips: Option<String>,
    group: Option<String>,
    rpm: Option<i64>,
    tpm: Option<i64>,
    status: Option<i64>,
}

impl TokenInput {
    fn apply(self, t: &mut Token) -> Result<(), ApiError> {
        if let Some(v) = self.name {
            t.name = v.trim().to_string();
        }
        if let Some(v) = self.remain_quota {
            if v < 0 && v != -1 {
                return Err(bad("remain_quota must be -1 (unlimited) or a non-negative integer"));
            }
            if v == -1 {
                t.unlimited_quota = true;
                t.remain_quota = 0;
            } else {
                t.remain_quota = v;
            }
        }
        if let Some(v) = self.unlimited_quota {
            t.unlimited_quota = v;
        }
        if let Some(v) = self.expired_time {
            if v != -1 && v <= 0 {
                return Err(bad("expired_time must be -1 (never) or a unix time"));
            }
            t.expired_time = v;
        }
        if let Some(v) = self.models {
            t.models = v.items();
        }
        if let Some(v) = self.allow_ips {
            for entry in split_list(&v) {
                let addr = entry.split('/').next().unwrap_or("");
                if addr.parse::<std::net::IpAddr>().is_err() {
                    return Err(bad(format!("allow_ips entry {entry:?} is not an IP address or CIDR")));
                }
            }
            t.allow_ips = v.trim().to_string();
        }
        if let Some(v) = self.group {
            t.group = v.trim().to_string();
        }
        if let Some(v) = self.rpm {
            t.rpm = v.max(0);
        }
        if let Some(v) = self.tpm {
            t.tpm = v.max(0);
        }
        if let Some(v) = self.status {
            if v != STATUS_ENABLED && v != STATUS_DISABLED {
                return Err(bad("status must be 1 (enabled) or 2 (disabled)"));
            }
            t.status = v;
        }
        Ok(())
    }
}

async fn create_token(worker: &Worker, req: &Request) -> ApiResult {
    let input: TokenInput = body(req)?;
    let user_id = input.user_id.ok_or_else(|| bad("user_id is required"))?;
    worker
        .shared
        .storage
        .get_user(user_id)
        .await?
        .ok_or_else(|| bad(format!("user {user_id} does not exist")))?;
    let key = apikey::generate().map_err(|e| ApiError(500, format!("no entropy for a key: {e}")))?;
    let now = unix_now();
    let mut t = Token {
        id: 0,
        user_id,
        key: apikey::mask(&key),
        key_hash: apikey::hash(&key),
        name: String::new(),
        status: STATUS_ENABLED,
        created_time: now,
        accessed_time: now,
        expired_time: -1,
        remain_quota: 0,
        unlimited_quota: false,
        used_quota: 0,
        models: Vec::new(),
        allow_ips: String::new(),
        group: String::new(),
        rpm: 0,
        tpm: 0,
        quota_version: 1,
    };
    input.apply(&mut t)?;
    let saved = worker.shared.storage.create_token(t).await?;
    let mut v = to_json(&saved)?;
    v["key"] = Value::String(key);
    Ok(v)
}

async fn get_token(worker: &Worker, id: i64) -> ApiResult {
    let t = worker.shared.storage.get_token(id).await?.ok_or_else(|| not_found("token"))?;
    to_json(&t)
}

async fn update_token(worker: &Worker, id: i64, req: &Request) -> ApiResult {
    let input: TokenInput = body(req)?;
    if input.user_id.is_some() {
        return Err(bad("user_id of a token cannot change"));
    }
    let mut t = worker.shared.storage.get_token(id).await?.ok_or_else(|| not_found("token"))?;
    input.apply(&mut t)?;
    let saved = worker.shared.storage.update_token(t).await?.ok_or_else(|| not_found("token"))?;
    worker.shared.bump_auth_epoch();
    fund_token(worker, &saved).await;
    to_json(&saved)
}

async fn delete_token(worker: &Worker, id: i64) -> ApiResult {
    let t = worker.shared.storage.get_token(id).await?.ok_or_else(|| not_found("token"))?;
    worker.shared.storage.delete_token(id).await?;
    worker.shared.bump_auth_epoch();
    to_json(&t)
}

// ---------------------------------------------------------------- export and import

/// The format name and version of an export document.
const EXPORT_FORMAT: &str = "burncloud";
const EXPORT_VERSION: u64 = 1;

/// `GET /api/export`: the whole configuration as one document — channels with their upstream keys,
/// users with their password hashes, keys with their hashes (the keys themselves are never stored),
/// options (but the admin key's hash). Logs are not part of it.
async fn export(worker: &Worker) -> ApiResult {
    let data = worker.shared.storage.export().await?;
    let mut users = Vec::with_capacity(data.users.len());
    for u in &data.users {
        let mut v = to_json(u)?;
        v["password_hash"] = Value::String(u.password_hash.clone());
        users.push(v);
    }
    let mut tokens = Vec::with_capacity(data.tokens.len());
    for t in &data.tokens {
        let mut v = to_json(t)?;
        v["key_hash"] = Value::String(t.key_hash.clone());
        tokens.push(v);
    }
    let options: BTreeMap<&String, &String> =
        data.options.iter().filter(|(k, _)| k.as_str() != option_keys::ADMIN_KEY_HASH).collect();
    Ok(json!({
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "exported_at": unix_now(),
        "channels": to_json(&data.channels)?,
        "users": users,
        "tokens": tokens,
        "options": options,
    }))
}

#[derive(Deserialize)]
struct ImportDoc {
    format: String,
    version: u64,
    #[serde(default)]
    channels: Vec<Channel>,
    #[serde(default)]
    users: Vec<User>,
    #[serde(default)]
    tokens: Vec<Value>,
    #[serde(default)]
    options: BTreeMap<String, Value>,
}

/// `POST /api/import` with a document from `GET /api/export` (or its `data`): adds every channel,
/// user, key and option in one transaction — all or, on a conflict (a username or key that exists),
/// none. Channels and users get new ids; keys keep working (their hashes are kept).
async fn import(worker: &Worker, req: &Request) -> ApiResult {
    let raw: Value = body(req)?;
    let doc =
        if raw.get("format").is_none() && raw.get("data").is_some() { raw["data"].clone() } else { raw };
    let doc: ImportDoc =
        serde_json::from_value(doc).map_err(|e| bad(format!("not an export document: {e}")))?;
    if doc.format != EXPORT_FORMAT || doc.version != EXPORT_VERSION {
        return Err(bad(format!(
            "unsupported export document {:?} version {} (expected {EXPORT_FORMAT:?} version {EXPORT_VERSION})",
            doc.format, doc.version
        )));
    }
    for ch in &doc.channels {
        validate_channel(ch).map_err(|ApiError(s, m)| ApiError(s, format!("channel {:?}: {m}", ch.name)))?;
    }
    for u in &doc.users {
        if u.username.trim().is_empty() || u.password_hash.is_empty() {
            return Err(bad(format!("user {}: username and password_hash are required", u.id)));
        }
    }
    let mut tokens = Vec::with_capacity(doc.tokens.len());
    for v in doc.tokens {
        let key_hash = v["key_hash"].as_str().filter(|h| !h.is_empty()).map(str::to_string);
        let mut t: Token = serde_json::from_value(v).map_err(|e| bad(format!("a key: {e}")))?;
        t.key_hash = key_hash.ok_or_else(|| bad(format!("key {:?}: key_hash is required", t.name)))?;
        tokens.push(t);
    }
    let mut options = BTreeMap::new();
    for (key, value) in doc.options {
        let value = match value {
            Value::String(s) => s,
            other => other.to_string(),
        };
        validate_option(&key, &value)?;
        options.insert(key, value);
    }
    let data = burncloud_storage::ExportData { channels: doc.channels, users: doc.users, tokens, options };
    let summary = worker.shared.storage.import(data).await?;
    published(worker).await?;
    worker.shared.bump_auth_epoch();
    to_json(&summary)
}

// ---------------------------------------------------------------- logs and options

async fn list_logs(worker: &Worker, req: &Request) -> ApiResult {
    let (page, page_size) = page(req)?;
    let filter = LogFilter {
        user_id: opt_num(req, "user_id")?,
        token_id: opt_num(req, "token_id")?,
        kind: opt_num(req, "type")?,
        model: req.query_param("model").filter(|m| !m.is_empty()),
        request_id: req.query_param("request_id").filter(|r| !r.is_empty()),
        start: opt_num(req, "start")?,
        end: opt_num(req, "end")?,
        page,
        page_size,
    };
    let (items, total) = worker.shared.storage.list_logs(filter).await?;
    Ok(json!({"items": to_json(&items)?, "total": total}))
}

async fn get_options(worker: &Worker) -> ApiResult {
    let snapshot = worker.shared.snapshot.load();
    let visible: BTreeMap<&String, &String> =
        snapshot.options.iter().filter(|(k, _)| k.as_str() != option_keys::ADMIN_KEY_HASH).collect();
    to_json(&visible)
}

#[derive(Deserialize)]
struct OptionInput {
    key: String,
    value: Value,
}

async fn put_option(worker: &Worker, req: &Request) -> ApiResult {
    let input: OptionInput = body(req)?;
    let value = match input.value {
        Value::String(s) => s,
        other => other.to_string(),
    };
    validate_option(&input.key, &value)?;
    worker.shared.storage.set_option(&input.key, &value).await?;
    published(worker).await?;
    get_options(worker).await
}

fn validate_option(key: &str, value: &str) -> Result<(), ApiError> {
    match key {
        option_keys::MODEL_RATIO
        | option_keys::COMPLETION_RATIO
        | option_keys::GROUP_RATIO
        | option_keys::MODEL_PRICE
        | option_keys::CACHE_RATIO => {
            let map = burncloud_core::pricing::PriceTable::parse_ratio_map(value)
                .map_err(|e| bad(format!("{key} must be a JSON object of name → number: {e}")))?;
            if let Some((name, _)) = map.iter().find(|(_, v)| !v.is_finite() || **v < 0.0) {
                return Err(bad(format!("{key}: the value for {name} must be a non-negative number")));
            }
            Ok(())
        }
        option_keys::RETRY_TIMES => match value.trim().parse::<u32>() {
            Ok(n) if n <= 10 => Ok(()),
            _ => Err(bad("RetryTimes must be an integer from 0 to 10")),
        },
        option_keys::ADMIN_KEY_HASH => Err(bad("AdminKeyHash cannot be set through the API")),
        crate::probe::INTERVAL_OPTION | crate::probe::FAILURES_OPTION => match value.trim().parse::<u32>() {
            Ok(_) => Ok(()),
            Err(_) => Err(bad(format!("{key} must be a non-negative integer"))),
        },
        option_keys::AUTO_DISABLE_ENABLED => match value.trim() {
            "true" | "false" => Ok(()),
            _ => Err(bad("AutomaticDisableChannelEnabled must be true or false")),
        },
        option_keys::AUTO_DISABLE_STATUS_CODES | option_keys::AUTO_DISABLE_KEYWORDS => {
            let (codes, words) =
                if key == option_keys::AUTO_DISABLE_STATUS_CODES { (value, "") } else { ("401", value) };
            burncloud_core::health::AutoDisableRules::build(codes, words)
                .map(|_| ())
                .map_err(|e| bad(format!("{key}: {e}")))
        }
        option_keys::SENSITIVE_WORDS | option_keys::SENSITIVE_REGEXES => {
            let (words, regexes) =
                if key == option_keys::SENSITIVE_WORDS { (value, "") } else { ("", value) };
            burncloud_core::filter::FilterSet::build(words, regexes)
                .map(|_| ())
                .map_err(|e| bad(format!("{key}: {e}")))
        }
        option_keys::AUTO_GROUPS => crate::state::parse_auto_groups(value).map(|_| ()).map_err(bad),
        option_keys::USER_USABLE_GROUPS => crate::state::parse_usable_groups(value).map(|_| ()).map_err(bad),
        option_keys::SELF_USE_MODE => match value.trim() {
            "true" | "false" => Ok(()),
            _ => Err(bad("SelfUseModeEnabled must be true or false")),
        },
        option_keys::IMAGE_FETCH_MAX_BYTES | option_keys::IMAGE_FETCH_TIMEOUT_MS => {
            match value.trim().parse::<u64>() {
                Ok(n) if n >= 1 => Ok(()),
                _ => Err(bad(format!("{key} must be a positive integer"))),
            }
        }
        option_keys::IMAGE_FETCH_ALLOW_PRIVATE => match value.trim() {
            "true" | "false" => Ok(()),
            _ => Err(bad("ImageFetchAllowPrivate must be true or false")),
        },
        option_keys::COOLDOWN_FAILURES | option_keys::COOLDOWN_SECONDS => match value.trim().parse::<u32>() {
            Ok(n) if n >= 1 => Ok(()),
            _ => Err(bad(format!("{key} must be a positive integer"))),
        },
        option_keys::PRE_DEDUCT_MAX_TOKENS => match value.trim().parse::<u32>() {
            Ok(_) => Ok(()),
            Err(_) => Err(bad("PreDeductMaxTokens must be a non-negative integer")),
        },
        "" => Err(bad("key is required")),
        _ => Ok(()),
    }
}
