//! Billing on the request path: admission (per-key rate limits, then the pre-deduction from the
//! worker's balance leases on the user and the key) and settlement (the actual cost charged, the
//! difference refunded). The money rules are written down in `docs/LEASES.md` and `docs/BILLING.md`.
//!
//! - [`ledger`]: the ledger thread, the one owner of the ledger backend (Redis or embedded).
//! - [`leases`]: one worker's leases ([`leases::Leases`]) and what an admitted request holds.
//! - [`limits`]: one worker's share of every key's RPM and TPM.
//!
//! Never waits on the ledger when the worker's lease covers the request; never admits a request
//! from anything but lease funds; never loses a pre-deduction (a request dropped unsettled refunds).

pub mod leases;
pub mod ledger;
pub mod limits;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use burncloud_core::lease::{Account, LeasePolicy};
use burncloud_core::model::Quota;
use burncloud_core::ratelimit::{RateKey, RateKind, SharePolicy};
use burncloud_core::{ErrorKind, GatewayError};

use crate::billing::leases::{Hold, Leases, PumpInbox, PumpSender, Refusal};
use crate::billing::ledger::{Backend, LedgerHandle};
use crate::billing::limits::{Limited, RateLimits};
use crate::config::Settings;
use crate::state::Caller;

/// Opens the ledger backend the settings name: Redis when `BURNCLOUD_REDIS_URL` is set, else the
/// embedded ledger in a file next to the database.
pub fn open_backend(settings: &Settings) -> Result<Backend, String> {
    match &settings.redis_url {
        Some(url) => burncloud_storage::ledger::RedisLedger::connect(url, &settings.redis_namespace)
            .map(|l| Box::new(l) as Backend)
            .map_err(|e| format!("BURNCLOUD_REDIS_URL: cannot use Redis as the balance ledger: {e}")),
        None => open_embedded(&settings.ledger_path),
    }
}

fn open_embedded(path: &Path) -> Result<Backend, String> {
    burncloud_storage::ledger::EmbeddedLedger::open(path).map(|l| Box::new(l) as Backend).map_err(|e| {
        format!("BURNCLOUD_LEDGER_PATH: cannot open the embedded ledger at {}: {e}", path.display())
    })
}

/// The lease policy for the settings' TTL: admission stops a third of the TTL after the last
/// acknowledged heartbeat, well before a sibling may reclaim.
pub fn lease_policy(ttl: Duration) -> LeasePolicy {
    let validity = i64::try_from(ttl.as_millis() / 3).unwrap_or(i64::MAX);
    LeasePolicy { validity, ..LeasePolicy::default() }
}

/// Accounts whose funding version a worker remembers; past this many it starts over.
const VERSIONS_KEPT: usize = 100_000;

/// Billing state of one worker.
pub struct Billing {
    pub leases: Rc<Leases>,
    pub limits: RateLimits,
    /// The newest funding version (`quota_version`) requests showed for each account, to notice a
    /// top-up or an edit made at any instance (its announcement refreshes the cached callers).
    versions: RefCell<HashMap<Account, i64>>,
}

/// What an admitted request carries until it is settled. Dropped unsettled, its pre-deductions are
/// refunded.
pub struct Admission {
    hold: Option<Hold>,
    /// The TPM permits taken on admission, corrected at settlement.
    tpm: Option<(RateKey, i64)>,
    pub pre_deducted: Quota,
}

impl Billing {
    pub fn new(
        worker: u32,
        ledger: &LedgerHandle,
        settings: &Settings,
        pumps: std::sync::Arc<Vec<PumpSender>>,
        inbox: PumpInbox,
    ) -> Billing {
        let policy = lease_policy(settings.lease_ttl);
        Billing {
            leases: Leases::new(worker, ledger.clone(), policy, settings.ledger_wait, pumps, inbox),
            limits: RateLimits::new(ledger.clone(), SharePolicy::default()),
            versions: RefCell::default(),
        }
    }

    /// A request shows `account` at funding `version`. Newer than this worker saw before, the funding
    /// changed since its lease was taken (a quota lowered, perhaps at another instance): the lease is
    /// given back, so what the account may spend now is decided by the ledger again.
    fn follow_funding(&self, account: Account, version: i64) {
        let mut versions = self.versions.borrow_mut();
        if versions.len() >= VERSIONS_KEPT && !versions.contains_key(&account) {
            versions.clear();
        }
        let seen = versions.entry(account).or_insert(version);
        if version > *seen {
            *seen = version;
            drop(versions);
            self.leases.recall(account);
        }
    }

    /// Admits a request: the key's RPM and TPM (on the prompt estimate), then `pre_deduction` from
    /// the user's balance and, for a key with limited quota, from the key's. When that cannot be
    /// covered and `tighter` is given (the estimate was an upper bound), the amount it computes is
    /// tried before refusing.
    pub async fn admit(
        &self,
        caller: &Caller,
        pre_deduction: Option<Quota>,
        estimated_tokens: i64,
        tighter: Option<&dyn Fn() -> Quota>,
    ) -> Result<Admission, GatewayError> {
        let token = &caller.token;
        if token.rpm > 0 {
            let key = RateKey { token: token.id, kind: RateKind::Requests };
            self.limits.admit(key, 1, token.rpm).await.map_err(|l| limited(l, "requests", token.rpm))?;
        }
        let mut tpm = None;
        if token.tpm > 0 {
            let key = RateKey { token: token.id, kind: RateKind::Tokens };
            let need = estimated_tokens.clamp(1, token.tpm);
            self.limits.admit(key, need, token.tpm).await.map_err(|l| limited(l, "tokens", token.tpm))?;
            tpm = Some((key, need));
        }
        let Some(amount) = pre_deduction else {
            return Ok(Admission { hold: None, tpm, pre_deducted: 0 });
        };
        let mut accounts = vec![Account::User(caller.user.id)];
        self.follow_funding(Account::User(caller.user.id), caller.user.quota_version);
        if !token.unlimited_quota {
            accounts.push(Account::Key(token.id));
            self.follow_funding(Account::Key(token.id), token.quota_version);
        }
        let (hold, amount) = match Hold::take(&self.leases, &accounts, amount).await {
            Ok(hold) => (hold, amount),
            // The estimate was an upper bound: before refusing, try the exact (smaller) amount.
            Err((account, Refusal::Insufficient)) => match tighter.map(|f| f()).filter(|t| *t < amount) {
                Some(exact) => {
                    let hold = Hold::take(&self.leases, &accounts, exact)
                        .await
                        .map_err(|(account, r)| refused(account, r, exact))?;
                    (hold, exact)
                }
                None => return Err(refused(account, Refusal::Insufficient, amount)),
            },
            Err((account, r)) => return Err(refused(account, r, amount)),
        };
        Ok(Admission { hold: Some(hold), tpm, pre_deducted: amount })
    }

    /// Charges the actual cost (`quota`) and corrects TPM with the actual token count.
    pub fn settle(&self, admission: Admission, quota: Quota, tokens: i64) {
        let Admission { hold, tpm, .. } = admission;
        if let Some(hold) = hold {
            hold.settle(quota);
        }
        if let Some((key, admitted)) = tpm {
            self.limits.adjust(key, tokens - admitted);
        }
    }
}

fn limited(l: Limited, what: &str, limit: i64) -> GatewayError {
    let secs = u32::try_from((l.retry_after_ms + 999) / 1000).unwrap_or(u32::MAX).max(1);
    GatewayError::client(
        ErrorKind::RateLimited { retry_after_secs: secs },
        format!("this API key is limited to {limit} {what} per minute; retry in {secs} s"),
    )
}

fn refused(account: Account, r: Refusal, amount: Quota) -> GatewayError {
    match (account, r) {
        (_, Refusal::Unavailable) => GatewayError::internal(
            ErrorKind::Unavailable,
            "the balance ledger cannot be reached to fund this request; try again shortly",
        ),
        (Account::User(_), Refusal::Insufficient) => GatewayError::client(
            ErrorKind::InsufficientUserQuota,
            format!("the user's balance cannot cover this request (it needs {amount} quota up front)"),
        ),
        (Account::Key(_), Refusal::Insufficient) => GatewayError::client(
            ErrorKind::TokenQuotaExhausted,
            format!(
                "this API key's remaining quota cannot cover this request (it needs {amount} quota up front)"
            ),
        ),
    }
}
