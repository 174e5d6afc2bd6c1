//! The lease protocol under a deterministic simulator (`tests/sim`): conservation and the overspend bound
//! hold after every step of many seeded worlds with lost, delayed and duplicated ledger calls, ledger
//! restarts, instance crashes, clock jumps and concurrent top-ups.
//!
//! `BURNCLOUD_SIM_SEED=<n>` replays one seed (with `BURNCLOUD_SIM_STEPS`, default 100,000);
//! `BURNCLOUD_SIM_STEPS=<n>` alone runs the default seeds longer; `BURNCLOUD_SIM_SEEDS=<n>` runs seeds
//! 1..=n instead of the default eight (a sweep: use `--release`).

mod sim;

use std::time::Instant;

/// Steps per default seed; eight seeds make 160,000 steps (about 8 s in a debug build).
const DEFAULT_STEPS: u64 = 20_000;
const DEFAULT_SEEDS: [u64; 8] = [101, 102, 103, 104, 105, 106, 107, 108];

/// Seeds that once failed, with what each caught; each still fails within `DEFAULT_STEPS` when its bug is
/// put back.
const REGRESSIONS: &[(u64, &str)] = &[
    // `LeaseBook::forget_quiet` dropped an account whose row was idle and then numbered calls afresh, so
    // the ledger answered later calls from a stale row (`Stale` for ever, or a repeat of an older
    // answer). Calls are now numbered per holder. The same seed catches dropping an account that still
    // carries a debt (`available = −unreported`), which lost the debt.
    (1, "call numbers reused after an account was forgotten; a forgotten debt"),
    // An instance crashed while it was a zombie (reclaimed, not yet told): the simulator waited for a
    // second reclaim that never comes. Crashed rows already fenced are written off at the crash.
    (3, "crash of an instance already fenced"),
    // A pre-deduction taken from a row fenced since is a debt in waiting (the reclaim returned its
    // funds; its settlement is charged whole). The bound's allowance was reset while one was
    // outstanding, and the overspend of the zombie's late settlements showed as a violation.
    (25, "pre-deductions of a fenced row outstanding while the account looked debt-free"),
    // Mutation check: a book that admits without a confirmed heartbeat lets a paused instance spend a
    // lease the reaper already returned (a zombie admission without any clock jump).
    (4, "admission without a confirmed heartbeat"),
];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn run_seed(seed: u64, steps: u64) -> Result<sim::Stats, sim::Violation> {
    let started = Instant::now();
    let stats = sim::run(seed, steps)?;
    eprintln!("seed {seed}: {steps} steps in {:?}: {stats:?}", started.elapsed());
    Ok(stats)
}

#[test]
fn conservation_and_the_overspend_bound_hold_under_faults() {
    let steps = env_u64("BURNCLOUD_SIM_STEPS");
    if let Some(seed) = env_u64("BURNCLOUD_SIM_SEED") {
        run_seed(seed, steps.unwrap_or(100_000)).unwrap_or_else(|v| panic!("{v}"));
        return;
    }
    let steps = steps.unwrap_or(DEFAULT_STEPS);
    let seeds: Vec<u64> = match env_u64("BURNCLOUD_SIM_SEEDS") {
        Some(n) => (1..=n).collect(),
        None => DEFAULT_SEEDS.to_vec(),
    };
    let mut total = sim::Stats::default();
    for seed in seeds {
        let s = run_seed(seed, steps).unwrap_or_else(|v| panic!("{v}"));
        total.steps += s.steps;
        total.admitted += s.admitted;
        total.crashes += s.crashes;
        total.false_reclaims += s.false_reclaims;
        total.ledger_restarts += s.ledger_restarts;
    }
    assert!(total.steps >= 100_000, "ran only {} steps", total.steps);
    assert!(
        total.admitted > 0 && total.crashes > 0 && total.ledger_restarts > 0,
        "faults were not exercised: {total:?}"
    );
}

#[test]
fn seeds_that_once_failed_still_pass() {
    for (seed, caught) in REGRESSIONS {
        run_seed(*seed, DEFAULT_STEPS)
            .unwrap_or_else(|v| panic!("regression seed {seed} ({caught}) fails again:\n{v}"));
    }
}

#[test]
fn a_seed_replays_exactly() {
    let a = format!("{:?}", sim::run(42, 3_000).map_err(|v| v.to_string()));
    let b = format!("{:?}", sim::run(42, 3_000).map_err(|v| v.to_string()));
    assert_eq!(a, b);
}
