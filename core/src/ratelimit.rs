//! Per-key rate limits (RPM, TPM) that hold across workers and instances, without a ledger round trip
//! per request.
//!
//! The ledger keeps one sliding window per (key, kind) ([`RateWindow`]): the count of the current
//! fixed window plus the previous one weighted by how much of it still overlaps the last `window`
//! milliseconds (the usual two-window approximation of a sliding log). A worker takes permits from it
//! in small batches ([`RateShare`]) and spends them locally; permits not spent before their window ends
//! are dropped, so the limit is never exceeded by more than what settles after admission (TPM counts a
//! request's actual tokens after it ran), at the price of some capacity held unspent by idle workers.
//!
//! Pure: no clock (every time is an argument, in milliseconds), no I/O. The Redis script and the
//! embedded ledger both call [`RateWindow::take`]'s arithmetic (the script mirrors it line by line).

use crate::lease::Millis;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RateKind {
    /// Requests per window (RPM).
    Requests,
    /// Prompt plus completion tokens per window (TPM).
    Tokens,
}

impl RateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RateKind::Requests => "rpm",
            RateKind::Tokens => "tpm",
        }
    }
}

/// One limit of one API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RateKey {
    pub token: i64,
    pub kind: RateKind,
}

/// The ledger's answer to a permit request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateGrant {
    /// Permits granted now, `0..=want`.
    pub granted: i64,
    /// When fewer than asked were granted: how long until the window frees what was missing (at least
    /// 1 ms); 0 when everything was granted.
    pub retry_after_ms: Millis,
}

/// The ledger's sliding window for one [`RateKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateWindow {
    /// Index of the current fixed window (`now / window`).
    pub index: i64,
    pub current: i64,
    pub previous: i64,
}

impl RateWindow {
    /// Moves the window to `now`'s fixed window. A clock that went backwards stays in the newer window.
    fn roll(&mut self, now: Millis, window: Millis) {
        let index = now.div_euclid(window);
        if index == self.index + 1 {
            self.previous = self.current;
            self.current = 0;
        } else if index > self.index + 1 {
            self.previous = 0;
            self.current = 0;
        }
        if index > self.index {
            self.index = index;
        }
    }

    /// Units counted in the sliding window at `now` (the previous window weighted by its overlap,
    /// rounded up so the estimate never undercounts).
    pub fn used(&self, now: Millis, window: Millis) -> i64 {
        let elapsed = (now - self.index * window).clamp(0, window);
        let overlap = window - elapsed;
        self.current + (self.previous * overlap + window - 1) / window
    }

    /// Grants up to `want` units (never beyond `limit` in the sliding window) and counts them.
    pub fn take(&mut self, now: Millis, want: i64, limit: i64, window: Millis) -> RateGrant {
        let window = window.max(1);
        self.roll(now, window);
        let free = (limit - self.used(now, window)).max(0);
        let granted = want.clamp(0, free);
        self.current += granted;
        if granted >= want {
            return RateGrant { granted, retry_after_ms: 0 };
        }
        let elapsed = (now - self.index * window).clamp(0, window);
        let missing = want - granted;
        let decaying = (self.previous * (window - elapsed)) / window;
        let retry_after_ms = if self.previous > 0 && missing <= decaying {
            (missing * window + self.previous - 1) / self.previous
        } else {
            window - elapsed
        };
        RateGrant { granted, retry_after_ms: retry_after_ms.max(1) }
    }
}

/// Tunables of a worker's share of a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharePolicy {
    /// The window every limit is counted over (a minute: RPM and TPM).
    pub window: Millis,
    /// A worker asks for `limit / batch_divisor` permits beyond what a request needs (at least 1), so
    /// many holders cannot sit on much of a window unspent.
    pub batch_divisor: i64,
}

impl Default for SharePolicy {
    fn default() -> Self {
        SharePolicy { window: 60_000, batch_divisor: 32 }
    }
}

/// A request must wait for permits from the ledger before it may be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedPermits {
    /// Ask the ledger for this many (what the request needs, a debt, and a batch).
    pub want: i64,
    /// The fixed window the answer will belong to.
    pub index: i64,
}

/// One worker's permits of one limit, for one fixed window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateShare {
    index: i64,
    /// Permits held for `index`; negative is a debt (a TPM request that used more than it was admitted
    /// with), paid out of the next grant.
    available: i64,
}

impl RateShare {
    pub fn available(&self) -> i64 {
        self.available
    }

    fn roll(&mut self, now: Millis, policy: &SharePolicy) {
        let index = now.div_euclid(policy.window.max(1));
        if index > self.index {
            self.index = index;
            // Unspent permits belong to the window that ended; a debt is still owed.
            self.available = self.available.min(0);
        }
    }

    /// Spends `amount` permits from the local share, or says how many to ask the ledger for.
    pub fn spend(
        &mut self,
        amount: i64,
        limit: i64,
        now: Millis,
        policy: &SharePolicy,
    ) -> Result<(), NeedPermits> {
        self.roll(now, policy);
        let amount = amount.max(0);
        if amount <= self.available {
            self.available -= amount;
            return Ok(());
        }
        let batch = (limit / policy.batch_divisor.max(1)).max(1);
        let want = (amount - self.available + batch).min(limit.max(1) + (-self.available).max(0));
        Err(NeedPermits { want, index: self.index })
    }

    /// Adds what the ledger granted for window `index` (dropped if that window has ended meanwhile).
    pub fn granted(&mut self, granted: i64, index: i64, now: Millis, policy: &SharePolicy) {
        self.roll(now, policy);
        if index == self.index {
            self.available += granted.max(0);
        }
    }

    /// Corrects the share once a request's actual count is known (TPM): `actual − admitted` more
    /// permits are spent (or given back to the share when negative), possibly leaving a debt.
    pub fn adjust(&mut self, delta: i64, now: Millis, policy: &SharePolicy) {
        self.roll(now, policy);
        self.available -= delta;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const W: Millis = 60_000;

    #[test]
    fn a_window_grants_up_to_its_limit() {
        let mut w = RateWindow::default();
        assert_eq!(w.take(0, 7, 10, W).granted, 7);
        let g = w.take(10, 7, 10, W);
        assert_eq!(g.granted, 3);
        assert_eq!(g.retry_after_ms, W - 10);
    }

    #[test]
    fn the_previous_window_weighs_by_its_overlap() {
        let mut w = RateWindow::default();
        w.take(0, 10, 10, W);
        // Half-way through the next window, half of the previous 10 still counts.
        assert_eq!(w.take(W + W / 2, 10, 10, W).granted, 5);
    }

    #[test]
    fn a_long_gap_forgets_both_windows() {
        let mut w = RateWindow::default();
        w.take(0, 10, 10, W);
        assert_eq!(w.take(3 * W, 10, 10, W).granted, 10);
    }

    #[test]
    fn retry_after_is_when_the_decay_frees_what_is_missing() {
        let mut w = RateWindow::default();
        w.take(0, 60, 60, W);
        let g = w.take(W, 1, 60, W);
        assert_eq!(g.granted, 0);
        // 60 decaying over 60 s frees one unit per second.
        assert_eq!(g.retry_after_ms, 1_000);
    }

    #[test]
    fn unspent_permits_expire_with_their_window_but_debts_do_not() {
        let p = SharePolicy::default();
        let mut s = RateShare::default();
        s.granted(5, 0, 0, &p);
        assert_eq!(s.spend(1, 100, 10, &p), Ok(()));
        s.adjust(10, 20, &p);
        assert_eq!(s.available(), -6);
        assert!(s.spend(1, 100, W, &p).is_err());
        assert_eq!(s.available(), -6);
        let mut fresh = RateShare::default();
        fresh.granted(5, 0, 0, &p);
        assert!(fresh.spend(1, 100, W, &p).is_err());
        assert_eq!(fresh.available(), 0);
    }

    #[test]
    fn a_grant_for_an_ended_window_is_dropped() {
        let p = SharePolicy::default();
        let mut s = RateShare::default();
        let need = s.spend(1, 100, W - 1, &p).unwrap_err();
        s.granted(4, need.index, W + 1, &p);
        assert_eq!(s.available(), 0);
    }

    proptest! {
        /// However many holders take, a sliding window never admits more than the limit in any
        /// `window`-long span of fixed-window starts.
        #[test]
        fn no_window_grants_beyond_its_limit(
            limit in 1i64..500,
            takes in proptest::collection::vec((0i64..5_000, 1i64..50), 1..200),
        ) {
            let w = 10_000;
            let mut win = RateWindow::default();
            let mut now = 0;
            let mut per_window = std::collections::BTreeMap::<i64, i64>::new();
            for (dt, want) in takes {
                now += dt;
                let g = win.take(now, want, limit, w);
                prop_assert!(g.granted >= 0 && g.granted <= want);
                prop_assert!(win.used(now, w) <= limit);
                *per_window.entry(now / w).or_default() += g.granted;
            }
            for (_, n) in per_window {
                prop_assert!(n <= limit);
            }
        }
    }
}
