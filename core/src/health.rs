//! Channel health: failure accounting, cooldowns with half-open probes, and the auto-disable rules.
//!
//! Two mechanisms with different lifetimes:
//!
//! - **Cooldown** ([`ChannelHealth`]) is short-lived and kept in memory, one per channel per worker.
//!   `failure_threshold` failures within one `window_ms` window put the channel in cooldown for a
//!   period; when the period ends the channel is half-open: exactly one request goes through as a
//!   probe. A successful probe makes it healthy again; a failed one cools it down again for twice the
//!   previous period, up to `max_cooldown_ms` (the LiteLLM model, with exponential backoff).
//! - **Auto-disable** ([`AutoDisableRules`], [`next_status`]) is durable: an upstream answer that
//!   says the channel itself is unusable (a bad key, an exhausted account) moves the channel to
//!   status 3; only health checks move it back. A channel an operator disabled (status 2) is never
//!   re-enabled by the gateway.
//!
//! ## States of a channel's cooldown
//!
//! ```text
//!   Healthy ──N failures in window──► CoolingDown{until} ──now ≥ until──► HalfOpen
//!      ▲                                   ▲                                │ admit: one probe
//!      │                                   └──probe fails (period × 2)──────┤
//!      └───────────────────────────────────────probe succeeds────────────────┘
//! ```
//!
//! Outcomes reported while a cooldown is running are ignored: they come from requests admitted
//! before it began. Any outcome reported once the cooldown is over decides the half-open state,
//! whether it comes from the probe or from such a late request.
//!
//! ## Workers
//!
//! Each worker keeps its own [`ChannelHealth`]s and never shares them by lock. Views are reconciled
//! by message with [`ChannelHealth::merge`] (semantics on the method).
//!
//! Time is always an input (`now_ms`, milliseconds on any monotonic clock the caller owns): no
//! clocks, no I/O here.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder};

use crate::filter::{FilterError, parse_pattern_list};
use crate::model::{CHANNEL_AUTO_DISABLED, STATUS_DISABLED, STATUS_ENABLED};

/// When failures cool a channel down, and for how long. Read from the configuration snapshot and
/// passed to every call, so a reload applies to existing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CooldownPolicy {
    /// Failures within one window that start a cooldown (0 counts as 1).
    pub failure_threshold: u32,
    /// Length of a failure-counting window. Windows are fixed: the first failure after a window has
    /// expired opens a new one.
    pub window_ms: u64,
    /// The first cooldown period after a healthy spell.
    pub base_cooldown_ms: u64,
    /// The longest period that doubling may reach.
    pub max_cooldown_ms: u64,
    /// How long a half-open probe may stay unanswered before another request may probe.
    pub probe_timeout_ms: u64,
}

impl Default for CooldownPolicy {
    /// Three failures within a minute cool a channel down for 5 s (LiteLLM's defaults), doubling on
    /// each failed probe up to 5 minutes; a probe unanswered for a minute is given up.
    fn default() -> Self {
        CooldownPolicy {
            failure_threshold: 3,
            window_ms: 60_000,
            base_cooldown_ms: 5_000,
            max_cooldown_ms: 300_000,
            probe_timeout_ms: 60_000,
        }
    }
}

/// What routing sees of a channel at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Healthy,
    CoolingDown {
        until_ms: u64,
    },
    /// The cooldown is over: the next admitted request is a probe. `probe_in_flight` while one runs.
    HalfOpen {
        probe_in_flight: bool,
    },
}

/// The answer to [`ChannelHealth::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The channel is healthy.
    Allowed,
    /// The channel is half-open and this request is its probe: report its outcome.
    Probe,
    /// Skip the channel; it may admit again at `retry_at_ms`.
    Denied { retry_at_ms: u64 },
}

/// A change of state caused by a reported outcome, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    CooledDown { until_ms: u64, period_ms: u64 },
    Recovered,
}

/// One worker's view of one channel's health. `Default` is healthy with no failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChannelHealth {
    /// `None` while healthy.
    cooldown: Option<Cooldown>,
    /// When the channel last became healthy again (0: never cooled down).
    recovered_ms: u64,
    failures: FailureWindow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cooldown {
    /// When this cooldown began (the trip, or the failed probe that renewed it).
    entered_ms: u64,
    until_ms: u64,
    period_ms: u64,
    /// When the current half-open probe was let through.
    probe_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FailureWindow {
    start_ms: u64,
    count: u32,
    last_ms: u64,
}

impl FailureWindow {
    fn is_live(&self, policy: &CooldownPolicy, now_ms: u64) -> bool {
        self.count > 0 && now_ms < self.start_ms.saturating_add(policy.window_ms)
    }
}

impl ChannelHealth {
    /// The state at `now_ms`.
    pub fn state(&self, policy: &CooldownPolicy, now_ms: u64) -> HealthState {
        match self.cooldown {
            None => HealthState::Healthy,
            Some(c) if now_ms < c.until_ms => HealthState::CoolingDown { until_ms: c.until_ms },
            Some(c) => HealthState::HalfOpen { probe_in_flight: c.probe_running(policy, now_ms) },
        }
    }

    /// Whether [`admit`](Self::admit) would let a request through now, without taking the probe.
    /// Routing uses it to skip channels; it then calls `admit` on the one it picks.
    pub fn is_available(&self, policy: &CooldownPolicy, now_ms: u64) -> bool {
        matches!(
            self.state(policy, now_ms),
            HealthState::Healthy | HealthState::HalfOpen { probe_in_flight: false }
        )
    }

    /// Lets a request through or not; a half-open channel lets exactly one through as its probe
    /// (another one once the probe has been unanswered for `probe_timeout_ms`).
    pub fn admit(&mut self, policy: &CooldownPolicy, now_ms: u64) -> Admission {
        let Some(c) = self.cooldown.as_mut() else {
            return Admission::Allowed;
        };
        if now_ms < c.until_ms {
            return Admission::Denied { retry_at_ms: c.until_ms };
        }
        if c.probe_running(policy, now_ms) {
            let retry_at_ms = c.probe_ms.unwrap_or(now_ms).saturating_add(policy.probe_timeout_ms);
            return Admission::Denied { retry_at_ms };
        }
        c.probe_ms = Some(now_ms);
        Admission::Probe
    }

    /// The view a worker shares when the channel recovered on it at `now_ms`: healthy since then.
    /// [`ChannelHealth::merge`]d into another worker's view, it ends a cooldown that began before.
    pub fn recovered_at(now_ms: u64) -> ChannelHealth {
        ChannelHealth { cooldown: None, recovered_ms: now_ms, failures: FailureWindow::default() }
    }

    /// Reports a successful request. Ends a cooldown that is over (half-open → healthy).
    pub fn record_success(&mut self, now_ms: u64) -> Option<Transition> {
        match self.cooldown {
            Some(c) if now_ms >= c.until_ms => {
                *self = ChannelHealth {
                    cooldown: None,
                    recovered_ms: now_ms,
                    failures: FailureWindow::default(),
                };
                Some(Transition::Recovered)
            }
            _ => None,
        }
    }

    /// Reports a failed request (one that counts against the channel: connect error, timeout, 429,
    /// 5xx). May start a cooldown, or renew one with a doubled period when the channel is half-open.
    pub fn record_failure(&mut self, policy: &CooldownPolicy, now_ms: u64) -> Option<Transition> {
        match self.cooldown {
            None => {
                if !self.failures.is_live(policy, now_ms) {
                    self.failures = FailureWindow { start_ms: now_ms, count: 0, last_ms: now_ms };
                }
                self.failures.count = self.failures.count.saturating_add(1);
                self.failures.last_ms = now_ms;
                (self.failures.count >= policy.failure_threshold.max(1))
                    .then(|| self.cool_down(now_ms, policy.base_cooldown_ms))
            }
            Some(c) if now_ms < c.until_ms => None,
            Some(c) => {
                let period =
                    c.period_ms.saturating_mul(2).min(policy.max_cooldown_ms).max(policy.base_cooldown_ms);
                Some(self.cool_down(now_ms, period))
            }
        }
    }

    fn cool_down(&mut self, now_ms: u64, period_ms: u64) -> Transition {
        let until_ms = now_ms.saturating_add(period_ms);
        self.cooldown = Some(Cooldown { entered_ms: now_ms, until_ms, period_ms, probe_ms: None });
        self.failures = FailureWindow::default();
        Transition::CooledDown { until_ms, period_ms }
    }

    /// Folds another worker's view of the same channel into this one.
    ///
    /// - **Cooldowns**: when both views are cooling down (or half-open), the result ends at the later
    ///   `until`, keeps the longer period and the latest probe, so a probe running on one worker
    ///   holds off probes everywhere.
    /// - **Recovery beats an older cooldown**: a view that became healthy after the other view's
    ///   cooldown began means a probe succeeded since; the result is healthy. A cooldown that began
    ///   at or after the recovery wins.
    /// - **Failures add up**: while the result is healthy, the failure counts of both views' live
    ///   windows are summed (failures older than the result's recovery are dropped), and the sum
    ///   trips a cooldown at `now_ms` when it reaches the threshold: N failures spread over several
    ///   workers cool the channel down as N failures on one would.
    ///
    /// Commutative, but not idempotent: failure counts are added, so each worker's own view must be
    /// merged once (e.g. the control thread folds the workers' reports into a fresh view and sends
    /// back the result), never a view that already contains it.
    pub fn merge(&mut self, other: &ChannelHealth, policy: &CooldownPolicy, now_ms: u64) {
        let cooldown = match (self.cooldown, other.cooldown) {
            (Some(a), Some(b)) => Some(Cooldown {
                entered_ms: a.entered_ms.max(b.entered_ms),
                until_ms: a.until_ms.max(b.until_ms),
                period_ms: a.period_ms.max(b.period_ms),
                probe_ms: a.probe_ms.max(b.probe_ms),
            }),
            (Some(c), None) if c.entered_ms >= other.recovered_ms => Some(c),
            (None, Some(c)) if c.entered_ms >= self.recovered_ms => Some(c),
            _ => None,
        };
        let recovered_ms = self.recovered_ms.max(other.recovered_ms);
        if cooldown.is_some() {
            *self = ChannelHealth { cooldown, recovered_ms, failures: FailureWindow::default() };
            return;
        }
        let live = |w: &FailureWindow| (w.is_live(policy, now_ms) && w.last_ms >= recovered_ms).then_some(*w);
        let failures = match (live(&self.failures), live(&other.failures)) {
            (Some(a), Some(b)) => FailureWindow {
                start_ms: a.start_ms.min(b.start_ms),
                count: a.count.saturating_add(b.count),
                last_ms: a.last_ms.max(b.last_ms),
            },
            (Some(w), None) | (None, Some(w)) => w,
            (None, None) => FailureWindow::default(),
        };
        *self = ChannelHealth { cooldown: None, recovered_ms, failures };
        if failures.count >= policy.failure_threshold.max(1) {
            self.cool_down(now_ms, policy.base_cooldown_ms);
        }
    }
}

impl Cooldown {
    fn probe_running(&self, policy: &CooldownPolicy, now_ms: u64) -> bool {
        self.probe_ms
            .is_some_and(|p| p >= self.until_ms && now_ms < p.saturating_add(policy.probe_timeout_ms))
    }
}

/// At most how often a worker writes a line about failed attempts on one channel. A channel that
/// refuses every request would otherwise put a line per request into the operator's log, and at
/// thousands of requests per second the writing itself slows the worker down.
pub const FAILURE_LOG_INTERVAL_MS: u64 = 1_000;

/// Which failed attempts on one channel get a log line: the first, then at most one per
/// [`FAILURE_LOG_INTERVAL_MS`]. The failures in between are counted, and the next line reports
/// how many there were, so none goes unaccounted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureLog {
    logged_ms: Option<u64>,
    unlogged: u64,
}

impl FailureLog {
    /// Notes a failure at `now_ms`: `Some(n)` when it is to be logged, `n` being the failures not
    /// logged since the previous line; `None` when it is only counted.
    pub fn note(&mut self, now_ms: u64) -> Option<u64> {
        match self.logged_ms {
            Some(at) if now_ms < at.saturating_add(FAILURE_LOG_INTERVAL_MS) => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.logged_ms = Some(now_ms);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

/// Something that changes a channel's durable status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusEvent {
    /// An upstream answer matched the [`AutoDisableRules`], or health checks failed repeatedly.
    AutoDisable,
    /// A health check succeeded on an auto-disabled channel.
    AutoEnable,
    /// An operator enabled the channel.
    ManualEnable,
    /// An operator disabled the channel.
    ManualDisable,
}

/// The channel status after `event`: the gateway moves only between enabled (1) and auto-disabled
/// (3); a manually disabled channel (2) stays disabled until an operator enables it.
pub fn next_status(current: i64, event: StatusEvent) -> i64 {
    match event {
        StatusEvent::AutoDisable if current == STATUS_ENABLED => CHANNEL_AUTO_DISABLED,
        StatusEvent::AutoEnable if current == CHANNEL_AUTO_DISABLED => STATUS_ENABLED,
        StatusEvent::AutoDisable | StatusEvent::AutoEnable => current,
        StatusEvent::ManualEnable => STATUS_ENABLED,
        StatusEvent::ManualDisable => STATUS_DISABLED,
    }
}

/// Upstream status codes that auto-disable a channel by default, as New API: 401 only.
pub const DEFAULT_DISABLE_STATUS_CODES: &str = "401";

/// Error keywords that auto-disable a channel by default, as New API: its default message keyword
/// list, plus the OpenAI-style error codes and types it treats as fatal for the key
/// (`invalid_api_key`, `account_deactivated`, `billing_not_active`, `insufficient_quota`,
/// `authentication_error`, `permission_error`), matched here as substrings of the error body. Its
/// `forbidden` type is left out: as a substring it would match far more than the type.
pub const DEFAULT_DISABLE_KEYWORDS: &[&str] = &[
    "Your credit balance is too low",
    "This organization has been disabled.",
    "You exceeded your current quota",
    "Permission denied",
    "The security token included in the request is invalid",
    "Operation not allowed",
    "Your account is not authorized",
    "invalid_api_key",
    "account_deactivated",
    "billing_not_active",
    "insufficient_quota",
    "authentication_error",
    "permission_error",
];

/// An inclusive range of HTTP status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub start: u16,
    pub end: u16,
}

/// Why auto-disable rules could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("invalid status codes {0:?}: expected codes or ranges within 100-599, comma-separated")]
    StatusCodes(String),
    #[error(transparent)]
    Keywords(#[from] FilterError),
}

/// Parses status codes and ranges as operators write them: `401, 403, 500-503` (full-width commas
/// accepted). Sorted, with overlapping and adjacent ranges merged.
pub fn parse_status_ranges(text: &str) -> Result<Vec<StatusRange>, RuleError> {
    let normalized = text.replace('，', ",");
    let mut ranges = Vec::new();
    for token in normalized.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let bad = || RuleError::StatusCodes(token.to_string());
        let code = |s: &str| s.trim().parse::<u16>().ok().filter(|c| (100..=599).contains(c)).ok_or_else(bad);
        let range = match token.split_once('-') {
            Some((a, b)) => StatusRange { start: code(a)?, end: code(b)? },
            None => StatusRange { start: code(token)?, end: code(token)? },
        };
        if range.start > range.end {
            return Err(bad());
        }
        ranges.push(range);
    }
    ranges.sort_by_key(|r| (r.start, r.end));
    let mut merged: Vec<StatusRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(1) => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    Ok(merged)
}

/// Why an upstream answer auto-disables its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisableReason {
    Status(u16),
    Keyword(String),
}

impl std::fmt::Display for DisableReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DisableReason::Status(code) => write!(f, "upstream answered status {code}"),
            DisableReason::Keyword(k) => write!(f, "upstream error mentions {k:?}"),
        }
    }
}

/// The configured auto-disable rules: status codes and error keywords (ASCII case-insensitive).
/// `Default` is New API's defaults.
#[derive(Debug, Clone)]
pub struct AutoDisableRules {
    status_ranges: Vec<StatusRange>,
    keywords: Vec<String>,
    automaton: Option<AhoCorasick>,
}

impl Default for AutoDisableRules {
    fn default() -> Self {
        let keywords: Vec<String> = DEFAULT_DISABLE_KEYWORDS.iter().map(|k| k.to_string()).collect();
        AutoDisableRules {
            status_ranges: vec![StatusRange { start: 401, end: 401 }],
            automaton: keyword_automaton(&keywords).ok().flatten(),
            keywords,
        }
    }
}

fn keyword_automaton(keywords: &[String]) -> Result<Option<AhoCorasick>, FilterError> {
    if keywords.is_empty() {
        return Ok(None);
    }
    AhoCorasickBuilder::new()
        .ascii_case_insensitive(true)
        .build(keywords)
        .map(Some)
        .map_err(|e| FilterError::Keywords(e.to_string()))
}

impl AutoDisableRules {
    /// Builds rules from the status-code option (see [`parse_status_ranges`]) and the keyword option
    /// (one per line or a JSON array, see [`parse_pattern_list`]). Empty texts disable that rule.
    pub fn build(status_codes: &str, keywords: &str) -> Result<AutoDisableRules, RuleError> {
        let status_ranges = parse_status_ranges(status_codes)?;
        let keywords = parse_pattern_list(keywords)?;
        let automaton = keyword_automaton(&keywords)?;
        Ok(AutoDisableRules { status_ranges, keywords, automaton })
    }

    /// The error-message keywords in force.
    pub fn keywords(&self) -> &[String] {
        &self.keywords
    }

    /// Whether a failed upstream answer (its status and error message or body) should auto-disable
    /// the channel, and why. Status codes are checked first.
    pub fn check(&self, status: u16, message: &str) -> Option<DisableReason> {
        if self.status_ranges.iter().any(|r| (r.start..=r.end).contains(&status)) {
            return Some(DisableReason::Status(status));
        }
        let found = self.automaton.as_ref()?.find(message)?;
        self.keywords.get(found.pattern().as_usize()).map(|k| DisableReason::Keyword(k.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_log_writes_the_first_failure_then_one_line_per_interval_with_the_count_between() {
        let mut log = FailureLog::default();
        assert_eq!(log.note(5_000), Some(0), "the first failure is logged");
        for t in [5_000, 5_001, 5_500, 5_999] {
            assert_eq!(log.note(t), None, "within the interval at {t}");
        }
        assert_eq!(log.note(6_000), Some(4), "the interval is over: the 4 unlogged failures are reported");
        assert_eq!(log.note(6_999), None);
        assert_eq!(log.note(60_000), Some(1), "after a quiet spell the next failure is logged at once");
        assert_eq!(log.note(60_000), None);
        // An earlier timestamp than the last line's never logs more often.
        assert_eq!(log.note(59_000), None);
        assert_eq!(log.note(u64::MAX), Some(2), "no overflow at the end of the clock");
    }

    const P: CooldownPolicy = CooldownPolicy {
        failure_threshold: 3,
        window_ms: 1_000,
        base_cooldown_ms: 100,
        max_cooldown_ms: 350,
        probe_timeout_ms: 50,
    };

    fn failing(times: &[u64]) -> ChannelHealth {
        let mut h = ChannelHealth::default();
        for &t in times {
            h.record_failure(&P, t);
        }
        h
    }

    /// A channel that tripped at t=10 and is cooling down until 110.
    fn tripped() -> ChannelHealth {
        failing(&[0, 5, 10])
    }

    #[test]
    fn a_new_channel_is_healthy_and_admits() {
        let mut h = ChannelHealth::default();
        assert_eq!(h.state(&P, 0), HealthState::Healthy);
        assert_eq!(h.admit(&P, 0), Admission::Allowed);
    }

    #[test]
    fn failures_below_the_threshold_keep_it_healthy() {
        assert_eq!(failing(&[0, 5]).state(&P, 6), HealthState::Healthy);
    }

    #[test]
    fn the_threshold_within_a_window_starts_a_cooldown() {
        let mut h = failing(&[0, 5]);
        assert_eq!(h.record_failure(&P, 10), Some(Transition::CooledDown { until_ms: 110, period_ms: 100 }));
        assert_eq!(h.state(&P, 50), HealthState::CoolingDown { until_ms: 110 });
    }

    #[test]
    fn failures_in_an_expired_window_do_not_count() {
        assert_eq!(failing(&[0, 5, 1_000]).state(&P, 1_001), HealthState::Healthy);
    }

    #[test]
    fn successes_do_not_reset_the_failure_count_of_a_healthy_channel() {
        let mut h = failing(&[0, 5]);
        h.record_success(6);
        h.record_failure(&P, 7);
        assert_eq!(h.state(&P, 8), HealthState::CoolingDown { until_ms: 107 });
    }

    #[test]
    fn a_cooling_channel_denies_until_the_period_ends() {
        assert_eq!(tripped().admit(&P, 109), Admission::Denied { retry_at_ms: 110 });
    }

    #[test]
    fn outcomes_during_a_cooldown_are_ignored() {
        let mut h = tripped();
        assert_eq!(h.record_failure(&P, 50), None);
        assert_eq!(h.record_success(60), None);
        assert_eq!(h.state(&P, 70), HealthState::CoolingDown { until_ms: 110 });
    }

    #[test]
    fn after_the_period_the_channel_is_half_open_and_available() {
        let h = tripped();
        assert_eq!(h.state(&P, 110), HealthState::HalfOpen { probe_in_flight: false });
        assert!(h.is_available(&P, 110));
    }

    #[test]
    fn half_open_admits_exactly_one_probe() {
        let mut h = tripped();
        assert_eq!(h.admit(&P, 110), Admission::Probe);
        assert_eq!(h.admit(&P, 111), Admission::Denied { retry_at_ms: 160 });
        assert!(!h.is_available(&P, 111));
    }

    #[test]
    fn an_unanswered_probe_is_replaced_after_the_probe_timeout() {
        let mut h = tripped();
        h.admit(&P, 110);
        assert_eq!(h.admit(&P, 160), Admission::Probe);
    }

    #[test]
    fn a_successful_probe_makes_the_channel_healthy() {
        let mut h = tripped();
        h.admit(&P, 110);
        assert_eq!(h.record_success(120), Some(Transition::Recovered));
        assert_eq!(h.admit(&P, 121), Admission::Allowed);
    }

    #[test]
    fn a_failed_probe_cools_down_again_for_twice_the_period() {
        let mut h = tripped();
        h.admit(&P, 110);
        assert_eq!(h.record_failure(&P, 120), Some(Transition::CooledDown { until_ms: 320, period_ms: 200 }));
    }

    #[test]
    fn the_doubling_stops_at_the_maximum_period() {
        let mut h = tripped();
        let mut now = 110;
        let mut periods = Vec::new();
        for _ in 0..3 {
            h.admit(&P, now);
            if let Some(Transition::CooledDown { until_ms, period_ms }) = h.record_failure(&P, now) {
                periods.push(period_ms);
                now = until_ms;
            }
        }
        assert_eq!(periods, vec![200, 350, 350]);
    }

    #[test]
    fn recovery_resets_the_period_and_the_failure_count() {
        let mut h = tripped();
        h.admit(&P, 110);
        h.record_failure(&P, 110); // cooling until 310, period 200
        h.admit(&P, 310);
        h.record_success(310);
        h.record_failure(&P, 311);
        h.record_failure(&P, 312);
        assert_eq!(h.record_failure(&P, 313), Some(Transition::CooledDown { until_ms: 413, period_ms: 100 }));
    }

    #[test]
    fn a_threshold_of_zero_counts_as_one() {
        let policy = CooldownPolicy { failure_threshold: 0, ..P };
        let mut h = ChannelHealth::default();
        assert!(h.record_failure(&policy, 0).is_some());
    }

    #[test]
    fn a_recovery_shared_by_another_worker_ends_an_older_cooldown_only() {
        let p = CooldownPolicy::default();
        let mut old = tripped();
        old.merge(&ChannelHealth::recovered_at(10_000_000), &p, 10_000_000);
        assert_eq!(old.state(&p, 10_000_000), HealthState::Healthy);
        let mut fresh = ChannelHealth::default();
        for t in 0..p.failure_threshold {
            fresh.record_failure(&p, 20_000_000 + u64::from(t));
        }
        fresh.merge(&ChannelHealth::recovered_at(10_000_000), &p, 20_000_010);
        assert!(!fresh.is_available(&p, 20_000_010), "a cooldown newer than the recovery stays");
    }

    #[test]
    fn merge_sums_live_failures_across_workers_and_trips_at_the_threshold() {
        let mut a = failing(&[0, 5]);
        a.merge(&failing(&[8]), &P, 20);
        assert_eq!(a.state(&P, 20), HealthState::CoolingDown { until_ms: 120 });
    }

    #[test]
    fn merge_ignores_expired_failure_windows() {
        let mut a = failing(&[0, 5]);
        a.merge(&failing(&[1_500]), &P, 1_600);
        assert_eq!(a.state(&P, 1_600), HealthState::Healthy);
    }

    #[test]
    fn merge_takes_the_later_cooldown_end_and_the_longer_period() {
        let mut a = tripped(); // until 110, period 100
        let mut b = tripped();
        b.admit(&P, 110);
        b.record_failure(&P, 115); // until 315, period 200
        a.merge(&b, &P, 116);
        assert_eq!(a.state(&P, 200), HealthState::CoolingDown { until_ms: 315 });
        a.admit(&P, 315);
        assert_eq!(a.record_failure(&P, 315), Some(Transition::CooledDown { until_ms: 665, period_ms: 350 }));
    }

    #[test]
    fn merge_makes_a_probe_on_one_worker_hold_off_probes_on_the_other() {
        let mut a = tripped();
        let mut b = tripped();
        b.admit(&P, 110);
        a.merge(&b, &P, 111);
        assert_eq!(a.admit(&P, 111), Admission::Denied { retry_at_ms: 160 });
    }

    #[test]
    fn merge_lets_a_recovery_after_the_cooldown_began_win() {
        let mut a = tripped(); // cooled at 10
        let mut b = tripped();
        b.admit(&P, 110);
        b.record_success(120);
        a.merge(&b, &P, 121);
        assert_eq!(a.state(&P, 121), HealthState::Healthy);
    }

    #[test]
    fn merge_keeps_a_cooldown_that_began_after_the_other_views_recovery() {
        let mut recovered = tripped();
        recovered.admit(&P, 110);
        recovered.record_success(120);
        let mut cooling = failing(&[200, 201, 202]);
        cooling.merge(&recovered, &P, 203);
        assert_eq!(cooling.state(&P, 203), HealthState::CoolingDown { until_ms: 302 });
    }

    #[test]
    fn merge_drops_failures_older_than_the_recovery() {
        let mut old_failures = failing(&[100, 101]);
        let mut recovered = tripped();
        recovered.admit(&P, 110);
        recovered.record_success(120);
        recovered.record_failure(&P, 130);
        old_failures.merge(&recovered, &P, 131);
        assert_eq!(old_failures.state(&P, 131), HealthState::Healthy);
    }

    #[test]
    fn merge_is_commutative() {
        let mut b = tripped();
        b.admit(&P, 110);
        let views = [ChannelHealth::default(), failing(&[0, 1]), failing(&[3]), tripped(), b];
        for x in &views {
            for y in &views {
                let (mut xy, mut yx) = (*x, *y);
                xy.merge(y, &P, 115);
                yx.merge(x, &P, 115);
                assert_eq!(xy, yx, "{x:?} / {y:?}");
            }
        }
    }

    #[test]
    fn auto_disable_moves_an_enabled_channel_to_status_3() {
        assert_eq!(next_status(STATUS_ENABLED, StatusEvent::AutoDisable), CHANNEL_AUTO_DISABLED);
    }

    #[test]
    fn auto_enable_moves_an_auto_disabled_channel_back_to_enabled() {
        assert_eq!(next_status(CHANNEL_AUTO_DISABLED, StatusEvent::AutoEnable), STATUS_ENABLED);
    }

    #[test]
    fn a_manually_disabled_channel_is_never_changed_automatically() {
        assert_eq!(next_status(STATUS_DISABLED, StatusEvent::AutoEnable), STATUS_DISABLED);
        assert_eq!(next_status(STATUS_DISABLED, StatusEvent::AutoDisable), STATUS_DISABLED);
    }

    #[test]
    fn auto_enable_leaves_an_enabled_channel_enabled() {
        assert_eq!(next_status(STATUS_ENABLED, StatusEvent::AutoEnable), STATUS_ENABLED);
    }

    #[test]
    fn operators_can_always_enable_or_disable() {
        assert_eq!(next_status(STATUS_DISABLED, StatusEvent::ManualEnable), STATUS_ENABLED);
        assert_eq!(next_status(CHANNEL_AUTO_DISABLED, StatusEvent::ManualEnable), STATUS_ENABLED);
        assert_eq!(next_status(CHANNEL_AUTO_DISABLED, StatusEvent::ManualDisable), STATUS_DISABLED);
    }

    #[test]
    fn status_ranges_are_parsed_sorted_and_merged() {
        let r = parse_status_ranges(" 500-503, 401，403 , 402, 504 ").unwrap();
        assert_eq!(r, vec![StatusRange { start: 401, end: 403 }, StatusRange { start: 500, end: 504 }]);
    }

    #[test]
    fn status_ranges_outside_http_or_reversed_are_rejected() {
        for bad in ["99", "600", "503-500", "abc", "401-", "4o1"] {
            assert!(parse_status_ranges(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_default_rules_disable_on_401() {
        assert_eq!(AutoDisableRules::default().check(401, ""), Some(DisableReason::Status(401)));
    }

    #[test]
    fn the_default_rules_disable_on_an_exhausted_account_message_in_any_case() {
        let body = r#"{"error":{"message":"YOU EXCEEDED YOUR CURRENT QUOTA, please check your plan"}}"#;
        let reason = AutoDisableRules::default().check(429, body).unwrap();
        assert_eq!(reason, DisableReason::Keyword("You exceeded your current quota".into()));
    }

    #[test]
    fn the_default_rules_disable_on_fatal_openai_error_codes() {
        let body = r#"{"error":{"message":"Incorrect API key provided","code":"invalid_api_key"}}"#;
        assert!(AutoDisableRules::default().check(400, body).is_some());
    }

    #[test]
    fn the_default_rules_leave_transient_errors_alone() {
        let rules = AutoDisableRules::default();
        assert_eq!(rules.check(429, "Rate limit reached for requests"), None);
        assert_eq!(rules.check(500, "The server had an error while processing your request"), None);
    }

    #[test]
    fn configured_rules_replace_the_defaults() {
        let rules = AutoDisableRules::build("402, 403", r#"["account suspended"]"#).unwrap();
        assert_eq!(rules.check(401, ""), None);
        assert_eq!(rules.check(403, ""), Some(DisableReason::Status(403)));
        assert!(rules.check(400, "Account Suspended by provider").is_some());
    }

    #[test]
    fn empty_rules_never_disable() {
        let rules = AutoDisableRules::build("", "").unwrap();
        assert_eq!(rules.check(401, "invalid_api_key"), None);
    }

    #[test]
    fn a_reason_reads_as_a_sentence() {
        assert_eq!(DisableReason::Status(401).to_string(), "upstream answered status 401");
    }
}
