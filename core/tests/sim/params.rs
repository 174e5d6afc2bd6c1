//! The shape of a simulated world (drawn from the seed) and what a run did.

use burncloud_core::lease::{LeasePolicy, Millis};
use burncloud_core::model::Quota;

use super::rng::Rng;

/// The shape of one simulated world, drawn from the seed.
#[derive(Debug, Clone)]
pub struct Params {
    pub instances: usize,
    pub workers: u32,
    pub users: i64,
    pub policy: LeasePolicy,
    pub ttl: Millis,
    pub heartbeat_every: Millis,
    pub reap_every: Millis,
    pub retry_after: Millis,
    pub p_arrival: f64,
    pub p_top_up: f64,
    pub p_crash: f64,
    pub p_ledger_restart: f64,
    pub p_clock_jump: f64,
    pub p_pause: f64,
    pub p_quiet: f64,
    pub p_lost_call: f64,
    pub p_lost_reply: f64,
    pub p_delay: f64,
    pub p_overrun: f64,
    pub p_upstream_failure: f64,
}

impl Params {
    pub(super) fn draw(rng: &mut Rng) -> Params {
        let heartbeat_every = rng.range(200, 1_000);
        let ttl = heartbeat_every * rng.range(3, 6);
        let min_lease = rng.range(500, 10_000);
        let policy = LeasePolicy {
            min_lease,
            max_lease: min_lease * rng.range(1, 40),
            horizon: rng.range(1_000, 20_000),
            rate_half_life: rng.range(2_000, 30_000),
            idle_after: rng.range(300, 8_000),
            report_threshold: rng.range(1_000, 60_000),
            report_interval: rng.range(100, 3_000),
            validity: ttl / 2,
        };
        Params {
            instances: rng.range(2, 4) as usize,
            workers: rng.range(1, 3) as u32,
            users: rng.range(2, 5),
            policy,
            ttl,
            heartbeat_every,
            reap_every: ttl / 2,
            retry_after: rng.range(100, 800),
            p_arrival: 0.2 + rng.unit() * 0.6,
            p_top_up: 0.001 + rng.unit() * 0.004,
            p_crash: 0.0001 + rng.unit() * 0.0006,
            p_ledger_restart: 0.0001 + rng.unit() * 0.0006,
            p_clock_jump: if rng.chance(0.3) { 0.0 } else { rng.unit() * 0.001 },
            p_pause: rng.unit() * 0.0005,
            p_quiet: rng.unit() * 0.001,
            p_lost_call: rng.unit() * 0.03,
            p_lost_reply: rng.unit() * 0.03,
            p_delay: rng.unit() * 0.03,
            p_overrun: rng.unit() * 0.3,
            p_upstream_failure: rng.unit() * 0.1,
        }
    }
}

/// What one run did, for the report.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub steps: u64,
    pub sim_ms: Millis,
    pub arrivals: u64,
    pub admitted: u64,
    pub rejected: u64,
    /// Of those, refused because the ledger had too little balance (the rest timed out waiting).
    pub rejected_for_funds: u64,
    pub settled: u64,
    pub upstream_failures: u64,
    pub killed_in_flight: u64,
    pub overruns: u64,
    pub ledger_calls: u64,
    pub lost_calls: u64,
    pub lost_replies: u64,
    pub delayed: u64,
    pub crashes: u64,
    pub dead_reclaims: u64,
    pub false_reclaims: u64,
    pub reincarnations: u64,
    pub ledger_restarts: u64,
    pub clock_jumps: u64,
    pub pauses: u64,
    pub top_ups: u64,
    pub zombie_admissions: u64,
    /// Worst `spent − funds` seen on any account (quota).
    pub max_overspend: Quota,
    /// Worst ratio of overspend to the allowance (overruns since debt-free, plus false reclaims), in ‰.
    pub max_overspend_per_mille: i64,
    /// Spend forgotten by crashes (refunded to users), total and worst per crashed row.
    pub crash_lost: Quota,
    pub max_crash_lost_row: Quota,
    /// Worst crash loss on one row beyond that world's `report_threshold`.
    pub max_crash_lost_beyond_threshold: Quota,
}
