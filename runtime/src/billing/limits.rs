//! One worker's share of every API key's RPM and TPM limits.
//!
//! A request spends permits from the worker's [`RateShare`] of the key's limit; when the share is short,
//! one request per (key, limit) asks the ledger thread for more (the others wait for that answer), so
//! concurrent requests never race each other into the same window. A window exhausted cluster-wide
//! refuses with the time until it frees up (`Retry-After`). TPM is admitted on the prompt estimate and
//! corrected with the actual tokens once the request has run.
//!
//! When the ledger cannot be reached, limits are not enforced (the outage is logged): the balance
//! leases still bound what can be spent, and refusing every request because a counter is unreachable
//! would turn a Redis outage into a full one.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;

use burncloud_core::lease::Millis;
use burncloud_core::ratelimit::{RateGrant, RateKey, RateShare, SharePolicy};
use futures_channel::oneshot;

use crate::billing::ledger::LedgerHandle;
use crate::rt;

/// Longest a request waits for the ledger's answer on permits.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request was not admitted by a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub retry_after_ms: Millis,
}

/// One worker's permits.
pub struct RateLimits {
    ledger: LedgerHandle,
    policy: SharePolicy,
    shares: RefCell<HashMap<RateKey, RateShare>>,
    /// Requests waiting for the answer to an ask in flight, per limit.
    asking: RefCell<HashMap<RateKey, Vec<oneshot::Sender<Option<RateGrant>>>>>,
    outage_logged: Cell<bool>,
}

/// Wall-clock milliseconds: windows follow the same clock as the ledger's (Redis `TIME`), closely.
fn wall_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
        .unwrap_or(0)
}

impl RateLimits {
    pub fn new(ledger: LedgerHandle, policy: SharePolicy) -> RateLimits {
        RateLimits {
            ledger,
            policy,
            shares: RefCell::default(),
            asking: RefCell::default(),
            outage_logged: Cell::new(false),
        }
    }

    /// Spends `amount` permits of `key`'s `limit` (per minute), asking the ledger for more when the
    /// worker's share is short.
    pub async fn admit(&self, key: RateKey, amount: i64, limit: i64) -> Result<(), Limited> {
        // A few rounds at most: each either spends, waits for one answer, or gets one answer.
        for _ in 0..4 {
            let need = {
                let mut shares = self.shares.borrow_mut();
                match shares.entry(key).or_default().spend(amount, limit, wall_ms(), &self.policy) {
                    Ok(()) => return Ok(()),
                    Err(need) => need,
                }
            };
            let in_flight = self.asking.borrow().contains_key(&key);
            if in_flight {
                let (tx, rx) = oneshot::channel();
                self.asking.borrow_mut().entry(key).or_default().push(tx);
                match rt::timeout(ASK_TIMEOUT, rx).await {
                    Ok(Ok(Some(_))) => continue,
                    // The ledger could not answer: not enforced.
                    _ => return Ok(()),
                }
            }
            self.asking.borrow_mut().insert(key, Vec::new());
            let answer =
                match rt::timeout(ASK_TIMEOUT, self.ledger.rate(key, need.want, limit, self.policy.window))
                    .await
                {
                    Ok(Ok(grant)) => Some(grant),
                    Ok(Err(e)) => {
                        self.log_outage(&e.to_string());
                        None
                    }
                    Err(_) => {
                        self.log_outage("no answer in time");
                        None
                    }
                };
            if let Some(grant) = answer {
                self.outage_logged.set(false);
                self.shares.borrow_mut().entry(key).or_default().granted(
                    grant.granted,
                    need.index,
                    wall_ms(),
                    &self.policy,
                );
            }
            for waiter in self.asking.borrow_mut().remove(&key).unwrap_or_default() {
                let _ = waiter.send(answer);
            }
            let Some(grant) = answer else { return Ok(()) };
            let spent = self.shares.borrow_mut().entry(key).or_default().spend(
                amount,
                limit,
                wall_ms(),
                &self.policy,
            );
            match spent {
                Ok(()) => return Ok(()),
                Err(_) if grant.granted < need.want => {
                    return Err(Limited { retry_after_ms: grant.retry_after_ms.max(1) });
                }
                Err(_) => {}
            }
        }
        Err(Limited { retry_after_ms: 1_000 })
    }

    /// Corrects a limit once the request's actual count is known: `delta` more permits spent (fewer
    /// when negative).
    pub fn adjust(&self, key: RateKey, delta: i64) {
        if delta != 0 {
            self.shares.borrow_mut().entry(key).or_default().adjust(delta, wall_ms(), &self.policy);
        }
    }

    /// Drops shares that hold nothing and owe nothing, so the map does not grow with every key seen.
    pub fn forget_idle(&self) {
        self.shares.borrow_mut().retain(|_, share| share.available() != 0);
    }

    fn log_outage(&self, why: &str) {
        if !self.outage_logged.replace(true) {
            tracing::warn!(
                reason = why,
                "rate limits cannot reach the ledger; they are not enforced until it answers"
            );
        }
    }
}
