//! Shared and per-worker state.
//!
//! [`Shared`] is built once at start and read by every worker: settings, the storage handle, and the
//! configuration [`Snapshot`] behind an atomic pointer (one atomic load per request, no lock). The
//! control thread is the only writer of the snapshot; it rebuilds it from the database on request and
//! publishes it to every worker at once. [`Worker`] is a worker's own state: its upstream client, its
//! key cache, its random source. It never crosses threads.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use burncloud_core::filter::FilterSet;
use burncloud_core::health::{Admission, AutoDisableRules, ChannelHealth, CooldownPolicy, FailureLog};
use burncloud_core::model::{Channel, Token, User};
use burncloud_core::pricing::{self, PriceTable};
use burncloud_core::routing::AbilityIndex;
use burncloud_storage::{ConfigData, StorageHandle};

use crate::config::Settings;
use crate::upstream::Client;

/// Option keys the gateway reads, as New API names them.
pub mod option_keys {
    pub const MODEL_RATIO: &str = "ModelRatio";
    pub const COMPLETION_RATIO: &str = "CompletionRatio";
    pub const GROUP_RATIO: &str = "GroupRatio";
    pub const MODEL_PRICE: &str = "ModelPrice";
    pub const CACHE_RATIO: &str = "CacheRatio";
    pub const RETRY_TIMES: &str = "RetryTimes";
    pub const ADMIN_KEY_HASH: &str = "AdminKeyHash";
    /// Content-filter keywords: one per line, or a JSON array (as New API's `SensitiveWords`).
    pub const SENSITIVE_WORDS: &str = "SensitiveWords";
    /// Content-filter regular expressions: one per line, or a JSON array.
    pub const SENSITIVE_REGEXES: &str = "SensitiveRegexes";
    /// `true` (default) or `false`: whether upstream answers matching the rules below disable a
    /// channel (status 3).
    pub const AUTO_DISABLE_ENABLED: &str = "AutomaticDisableChannelEnabled";
    /// Status codes and ranges that disable a channel, e.g. `401,403` (default `401`).
    pub const AUTO_DISABLE_STATUS_CODES: &str = "AutomaticDisableStatusCodes";
    /// Error-message keywords that disable a channel (one per line or a JSON array).
    pub const AUTO_DISABLE_KEYWORDS: &str = "AutomaticDisableKeywords";
    /// `true`: models without a ratio or price are free (New API's self-use mode); `false` (default):
    /// they are refused with 403 `model_price_not_configured`.
    pub const SELF_USE_MODE: &str = "SelfUseModeEnabled";
    /// Completion tokens the pre-deduction assumes when a request sets no `max_tokens` (default 1024).
    pub const PRE_DEDUCT_MAX_TOKENS: &str = "PreDeductMaxTokens";
    /// The groups a key of group `auto` walks, in order: a JSON array (default `["default"]`).
    pub const AUTO_GROUPS: &str = "AutoGroups";
    /// Groups any user may use besides its own (through `auto`): a JSON object of group → description,
    /// as New API (default: none).
    pub const USER_USABLE_GROUPS: &str = "UserUsableGroups";
    /// Failed requests within a minute that cool a channel down (default 3).
    pub const COOLDOWN_FAILURES: &str = "ChannelCooldownFailures";
    /// The first cooldown of a failing channel, in seconds (default 5); doubles on each failed probe
    /// up to 5 minutes.
    pub const COOLDOWN_SECONDS: &str = "ChannelCooldownSeconds";
    /// Most bytes read of a remote image to find its size (default 1 MiB).
    pub const IMAGE_FETCH_MAX_BYTES: &str = "ImageFetchMaxBytes";
    /// Longest a remote image fetch may take (default 3000 ms).
    pub const IMAGE_FETCH_TIMEOUT_MS: &str = "ImageFetchTimeoutMs";
    /// `true`: image URLs may point at loopback and private addresses (default `false`).
    pub const IMAGE_FETCH_ALLOW_PRIVATE: &str = "ImageFetchAllowPrivate";
}

/// The configuration every request is served under; immutable once published.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub channels: HashMap<i64, Arc<Channel>>,
    pub abilities: AbilityIndex,
    pub prices: PriceTable,
    /// How many further channels a failed request may try.
    pub retry_times: usize,
    pub options: BTreeMap<String, String>,
    /// Applied to prompts and completions; empty when no list is configured.
    pub filter: FilterSet,
    /// When failures cool a channel down on a worker.
    pub cooldown: CooldownPolicy,
    /// Upstream answers that disable a channel; `None` when auto-disable is off.
    pub disable_rules: Option<AutoDisableRules>,
    /// Unpriced models are free instead of refused.
    pub self_use_mode: bool,
    /// Completion tokens a pre-deduction assumes when the request sets no `max_tokens`.
    pub pre_deduct_max_tokens: i64,
    /// What an `auto` key walks, in order.
    pub auto_groups: Vec<String>,
    /// Groups every user may use besides its own.
    pub usable_groups: std::collections::BTreeSet<String>,
    /// How remote images in prompts are measured.
    pub image_fetch: crate::images::FetchPolicy,
}

impl Snapshot {
    /// Builds a snapshot from the database's channels and options. Malformed ratio options are
    /// reported and the shipped defaults are used instead of them.
    pub fn build(data: ConfigData) -> Snapshot {
        let abilities = AbilityIndex::build(&data.channels);
        let ratio = |key: &str, default: HashMap<String, f64>| match data.options.get(key) {
            Some(v) => PriceTable::parse_ratio_map(v).unwrap_or_else(|e| {
                tracing::error!(option = key, error = %e, "malformed ratio option ignored");
                default
            }),
            None => default,
        };
        let prices = PriceTable {
            model_ratio: ratio(option_keys::MODEL_RATIO, pricing::default_model_ratios()),
            completion_ratio: ratio(option_keys::COMPLETION_RATIO, pricing::default_completion_ratios()),
            group_ratio: ratio(option_keys::GROUP_RATIO, HashMap::new()),
            model_price: ratio(option_keys::MODEL_PRICE, HashMap::new()),
            cache_ratio: ratio(option_keys::CACHE_RATIO, pricing::default_cache_ratios()),
        };
        let retry_times =
            data.options.get(option_keys::RETRY_TIMES).and_then(|v| v.trim().parse().ok()).unwrap_or(1);
        let filter = filter_from(&data.options).unwrap_or_else(|e| {
            tracing::error!(error = %e, "content filter lists are invalid; filtering is off until they are fixed");
            FilterSet::default()
        });
        let disable_rules = disable_rules_from(&data.options).unwrap_or_else(|e| {
            tracing::error!(error = %e, "auto-disable rules are invalid; using the defaults");
            Some(AutoDisableRules::default())
        });
        let self_use_mode = data.options.get(option_keys::SELF_USE_MODE).is_some_and(|v| v.trim() == "true");
        let pre_deduct_max_tokens = data
            .options
            .get(option_keys::PRE_DEDUCT_MAX_TOKENS)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .unwrap_or(DEFAULT_PRE_DEDUCT_MAX_TOKENS);
        let auto_groups = match data.options.get(option_keys::AUTO_GROUPS) {
            Some(v) => parse_auto_groups(v).unwrap_or_else(|e| {
                tracing::error!(error = %e, "AutoGroups is invalid; using [\"default\"]");
                vec!["default".to_string()]
            }),
            None => vec!["default".to_string()],
        };
        let usable_groups = match data.options.get(option_keys::USER_USABLE_GROUPS) {
            Some(v) => parse_usable_groups(v).unwrap_or_else(|e| {
                tracing::error!(error = %e, "UserUsableGroups is invalid; no extra groups are usable");
                Default::default()
            }),
            None => Default::default(),
        };
        let cooldown = cooldown_from(&data.options);
        let image_fetch = image_fetch_from(&data.options);
        let channels = data.channels.into_iter().map(|c| (c.id, Arc::new(c))).collect();
        Snapshot {
            channels,
            abilities,
            prices,
            retry_times,
            options: data.options,
            filter,
            cooldown,
            disable_rules,
            self_use_mode,
            pre_deduct_max_tokens,
            auto_groups,
            usable_groups,
            image_fetch,
        }
    }
}

/// `AutoGroups`: a JSON array of group names.
pub fn parse_auto_groups(value: &str) -> Result<Vec<String>, String> {
    let groups: Vec<String> = serde_json::from_str(value)
        .map_err(|e| format!("AutoGroups must be a JSON array of group names: {e}"))?;
    if groups.iter().any(|g| g.trim().is_empty() || g == "auto") {
        return Err("AutoGroups must name real groups (not empty, not auto)".into());
    }
    Ok(groups)
}

/// `UserUsableGroups`: a JSON object whose keys are group names (values describe them).
pub fn parse_usable_groups(value: &str) -> Result<std::collections::BTreeSet<String>, String> {
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_str(value)
        .map_err(|e| format!("UserUsableGroups must be a JSON object of group → description: {e}"))?;
    Ok(map.into_keys().collect())
}

/// Completion tokens a pre-deduction assumes for a request without `max_tokens`.
pub const DEFAULT_PRE_DEDUCT_MAX_TOKENS: i64 = 1024;

/// The cooldown policy, with the `ChannelCooldown*` options over the defaults.
pub fn cooldown_from(options: &BTreeMap<String, String>) -> CooldownPolicy {
    let mut policy = CooldownPolicy::default();
    let num = |k: &str| options.get(k).and_then(|v| v.trim().parse::<u32>().ok());
    if let Some(n) = num(option_keys::COOLDOWN_FAILURES) {
        policy.failure_threshold = n.max(1);
    }
    if let Some(secs) = num(option_keys::COOLDOWN_SECONDS) {
        policy.base_cooldown_ms = u64::from(secs.max(1)) * 1000;
        policy.max_cooldown_ms = policy.max_cooldown_ms.max(policy.base_cooldown_ms);
    }
    policy
}

/// How remote images are fetched, with the `ImageFetch*` options over the defaults.
pub fn image_fetch_from(options: &BTreeMap<String, String>) -> crate::images::FetchPolicy {
    let mut policy = crate::images::FetchPolicy::default();
    let num = |k: &str| options.get(k).and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = num(option_keys::IMAGE_FETCH_MAX_BYTES) {
        policy.max_bytes = usize::try_from(n).unwrap_or(usize::MAX).max(64);
    }
    if let Some(ms) = num(option_keys::IMAGE_FETCH_TIMEOUT_MS) {
        policy.timeout = Duration::from_millis(ms.max(1));
    }
    policy.allow_private =
        options.get(option_keys::IMAGE_FETCH_ALLOW_PRIVATE).is_some_and(|v| v.trim() == "true");
    policy
}

/// The content filter configured by the `SensitiveWords` and `SensitiveRegexes` options.
pub fn filter_from(
    options: &BTreeMap<String, String>,
) -> Result<FilterSet, burncloud_core::filter::FilterError> {
    let get = |k: &str| options.get(k).map(String::as_str).unwrap_or("");
    FilterSet::build(get(option_keys::SENSITIVE_WORDS), get(option_keys::SENSITIVE_REGEXES))
}

/// The auto-disable rules configured by the `AutomaticDisable*` options (New API's names).
pub fn disable_rules_from(
    options: &BTreeMap<String, String>,
) -> Result<Option<AutoDisableRules>, burncloud_core::health::RuleError> {
    if options.get(option_keys::AUTO_DISABLE_ENABLED).is_some_and(|v| v.trim() == "false") {
        return Ok(None);
    }
    let codes = options.get(option_keys::AUTO_DISABLE_STATUS_CODES);
    let words = options.get(option_keys::AUTO_DISABLE_KEYWORDS);
    if codes.is_none() && words.is_none() {
        return Ok(Some(AutoDisableRules::default()));
    }
    let defaults = AutoDisableRules::default();
    let codes = codes.map(String::as_str).unwrap_or("401");
    match words {
        Some(w) => AutoDisableRules::build(codes, w).map(Some),
        None => AutoDisableRules::build(codes, &defaults.keywords().join("\n")).map(Some),
    }
}

/// A request to the control thread.
pub enum ControlMsg {
    /// Rebuild the snapshot from the database; reply once it is published (then tell the other
    /// instances).
    Reload(futures_channel::oneshot::Sender<Result<(), String>>),
    /// Another instance changed the configuration: rebuild the snapshot (nothing to announce).
    RemoteReload,
    /// Keys or users changed here: tell the other instances.
    AnnounceKeys,
    /// Keys or users changed at another instance: drop the key caches.
    RemoteKeys,
    /// The process is stopping: end the control thread.
    Stop,
}

/// State shared by all workers of the process.
pub struct Shared {
    pub settings: Settings,
    pub storage: StorageHandle,
    pub snapshot: ArcSwap<Snapshot>,
    /// Bumped whenever a key or user changes; workers drop their key caches when it moves.
    pub auth_epoch: AtomicU64,
    pub admin_key_hash: String,
    pub shutdown: Arc<AtomicBool>,
    pub control: crossbeam_channel::Sender<ControlMsg>,
    pub tls: Arc<rustls::ClientConfig>,
    /// The ledger thread: lease calls, rate permits, fundings.
    pub ledger: crate::billing::ledger::LedgerHandle,
    /// Every worker's lease pump inbox, by worker index.
    pub pumps: Arc<Vec<crate::billing::leases::PumpSender>>,
    /// Every worker's channel-health inbox, by worker index.
    pub health_peers: Arc<Vec<HealthSender>>,
}

/// What a worker tells its siblings about a channel, so a failing channel cools down on every worker
/// after the threshold counted across all of them, and a recovery seen by one ends older cooldowns on
/// all. Times are on the process clock every worker shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthMsg {
    Failure {
        channel: i64,
        at_ms: u64,
    },
    Recovered {
        channel: i64,
        at_ms: u64,
    },
    /// The worker is stopping: its listening task ends (it must not outlive the worker's executor).
    Stop,
}

pub type HealthSender = futures_channel::mpsc::UnboundedSender<HealthMsg>;
pub type HealthInbox = futures_channel::mpsc::UnboundedReceiver<HealthMsg>;

impl Shared {
    /// Asks the control thread to rebuild and publish the snapshot, and waits until it is live.
    pub async fn reload(&self) -> Result<(), String> {
        let (tx, rx) = futures_channel::oneshot::channel();
        self.control.send(ControlMsg::Reload(tx)).map_err(|_| "control thread is gone".to_string())?;
        rx.await.map_err(|_| "control thread is gone".to_string())?
    }

    /// Drops every worker's key cache, here and (through the control thread) at every instance.
    pub fn bump_auth_epoch(&self) {
        self.auth_epoch.fetch_add(1, Ordering::AcqRel);
        let _ = self.control.send(ControlMsg::AnnounceKeys);
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }
}

/// How long a key stays cached on a worker before it is read again from storage.
pub const AUTH_CACHE_TTL: Duration = Duration::from_secs(30);
/// How long an unknown key is remembered as unknown.
pub const AUTH_NEGATIVE_TTL: Duration = Duration::from_secs(2);
const AUTH_CACHE_MAX: usize = 100_000;

/// A key and its owner as last read from storage.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: Token,
    pub user: User,
}

/// A key-cache entry: the caller (or `None` for an unknown key) and when it was read.
type CachedCaller = (Option<Arc<Caller>>, Instant);

/// A worker's own state.
pub struct Worker {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub client: Client,
    auth_cache: RefCell<HashMap<String, CachedCaller>>,
    auth_epoch_seen: Cell<u64>,
    pub rng: RefCell<fastrand::Rng>,
    request_counter: Cell<u64>,
    /// Open client connections on this worker (for draining on shutdown).
    pub connections: Cell<usize>,
    /// This worker's view of each channel's health (cooldowns, half-open probes).
    health: RefCell<HashMap<i64, ChannelHealth>>,
    /// Which failed attempts on each channel this worker writes a log line about.
    failure_logs: RefCell<HashMap<i64, FailureLog>>,
    /// This worker's balance leases and rate-limit shares.
    pub billing: crate::billing::Billing,
}

impl Worker {
    pub fn new(
        index: usize,
        shared: Arc<Shared>,
        client: Client,
        pump: crate::billing::leases::PumpInbox,
    ) -> Worker {
        let worker = u32::try_from(index).unwrap_or(u32::MAX);
        let billing = crate::billing::Billing::new(
            worker,
            &shared.ledger,
            &shared.settings,
            shared.pumps.clone(),
            pump,
        );
        Worker {
            billing,
            index,
            shared,
            client,
            auth_cache: RefCell::default(),
            auth_epoch_seen: Cell::new(0),
            rng: RefCell::new(fastrand::Rng::new()),
            request_counter: Cell::new(0),
            connections: Cell::new(0),
            health: RefCell::default(),
            failure_logs: RefCell::default(),
        }
    }

    /// Notes a failed attempt on the channel: `Some(n)` when it is to be logged (the first failure,
    /// then at most one per second), `n` being the failures on it this worker did not log since its
    /// previous line.
    pub fn failure_to_log(&self, channel: i64) -> Option<u64> {
        let now = self.now_ms();
        self.failure_logs.borrow_mut().entry(channel).or_default().note(now)
    }

    /// Milliseconds on the process clock (shared by every worker, so health times can be exchanged).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.shared.ledger.status.now_ms()).unwrap_or(0)
    }

    /// Whether this worker may send a request to the channel now (healthy, or its half-open probe).
    pub fn admit_channel(&self, id: i64, policy: &CooldownPolicy) -> bool {
        let now = self.now_ms();
        let mut health = self.health.borrow_mut();
        !matches!(health.entry(id).or_default().admit(policy, now), Admission::Denied { .. })
    }

    /// Records the outcome of an attempt on a channel, and tells the sibling workers of a failure or a
    /// recovery.
    pub fn record_channel_outcome(&self, id: i64, ok: bool, policy: &CooldownPolicy) {
        let now = self.now_ms();
        let change = {
            let mut health = self.health.borrow_mut();
            let entry = health.entry(id).or_default();
            if ok { entry.record_success(now) } else { entry.record_failure(policy, now) }
        };
        if let Some(change) = change {
            tracing::info!(worker = self.index, channel = id, ?change, "channel health changed");
        }
        let msg = match (ok, change) {
            (false, _) => HealthMsg::Failure { channel: id, at_ms: now },
            (true, Some(burncloud_core::health::Transition::Recovered)) => {
                HealthMsg::Recovered { channel: id, at_ms: now }
            }
            (true, _) => return,
        };
        for (i, peer) in self.shared.health_peers.iter().enumerate() {
            if i != self.index {
                let _ = peer.unbounded_send(msg);
            }
        }
    }

    /// Applies what sibling workers report about channels, until the inbox closes.
    pub async fn follow_siblings_health(self: std::rc::Rc<Self>, mut inbox: HealthInbox) {
        use futures_util::StreamExt;
        while let Some(msg) = inbox.next().await {
            let policy = self.shared.snapshot.load().cooldown;
            let mut health = self.health.borrow_mut();
            match msg {
                HealthMsg::Failure { channel, at_ms } => {
                    health.entry(channel).or_default().record_failure(&policy, at_ms.max(self.now_ms()));
                }
                HealthMsg::Recovered { channel, at_ms } => {
                    let now = self.now_ms();
                    health.entry(channel).or_default().merge(
                        &ChannelHealth::recovered_at(at_ms),
                        &policy,
                        now,
                    );
                }
                HealthMsg::Stop => return,
            }
        }
    }

    /// Ends [`Worker::follow_siblings_health`] (at shutdown).
    pub fn stop_following_siblings(&self) {
        if let Some(own) = self.shared.health_peers.get(self.index) {
            let _ = own.unbounded_send(HealthMsg::Stop);
        }
    }

    /// A request id unique across workers and restarts: start time, worker, sequence.
    pub fn next_request_id(&self) -> String {
        let n = self.request_counter.get().wrapping_add(1);
        self.request_counter.set(n);
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        format!("{micros:x}{:02x}{:06x}", self.index & 0xff, n & 0xff_ffff)
    }

    /// The cached caller for a key hash: `Some(Some(_))` known, `Some(None)` known to be unknown,
    /// `None` not cached (or stale).
    pub fn cached_caller(&self, key_hash: &str) -> Option<Option<Arc<Caller>>> {
        let epoch = self.shared.auth_epoch.load(Ordering::Acquire);
        let mut cache = self.auth_cache.borrow_mut();
        if epoch != self.auth_epoch_seen.get() {
            cache.clear();
            self.auth_epoch_seen.set(epoch);
            return None;
        }
        let (entry, at) = cache.get(key_hash)?;
        let ttl = if entry.is_some() { AUTH_CACHE_TTL } else { AUTH_NEGATIVE_TTL };
        if at.elapsed() > ttl {
            return None;
        }
        Some(entry.clone())
    }

    /// The current key epoch; pass it back to [`Worker::cache_caller`] after the storage read.
    pub fn auth_epoch(&self) -> u64 {
        self.shared.auth_epoch.load(Ordering::Acquire)
    }

    /// Caches a storage read, unless a key or user changed since the read began (`epoch`).
    pub fn cache_caller(&self, key_hash: String, caller: Option<Arc<Caller>>, epoch: u64) {
        if self.auth_epoch() != epoch {
            return;
        }
        let mut cache = self.auth_cache.borrow_mut();
        if cache.len() >= AUTH_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key_hash, (caller, Instant::now()));
    }
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
