//! What goes wrong, on the seed's say: the reaper reclaiming crashed (or only silent) instances, crashes,
//! ledger restarts, clock jumps, pauses, quiet phases and top-ups whose replies get lost.

use burncloud_core::lease::{Account, CallId, CallOp, InstanceId, LeaseAccount, Ledger, LedgerCall, Reclaim};
use burncloud_core::model::Quota;

use super::trace::{Ev, Violation};
use super::{Dead, Sim};

impl Sim {
    pub(super) fn reap(&mut self) -> Result<(), Violation> {
        if !self.ledger_up() {
            return Ok(());
        }
        let now = self.ledger_now();
        let Ok(stale) = self.ledger.stale_instances(now, self.params.ttl) else { return Ok(()) };
        for instance in stale {
            if let Ok(Reclaim::Reclaimed { returned }) = self.ledger.reclaim(instance, now, self.params.ttl) {
                self.on_reclaimed(instance, returned)?;
            }
        }
        Ok(())
    }

    /// Spend the ledger has not applied as reported: `unreported` plus a report in flight the ledger
    /// has not applied yet.
    pub(super) fn unreported(&self, lease: &LeaseAccount) -> Quota {
        let mut u = lease.unreported();
        if let Some(LedgerCall { id, op: CallOp::ReportSpend { amount } }) = lease.in_flight()
            && self.ledger.row(id.holder, id.account).last_seq < id.seq
        {
            u += amount;
        }
        u
    }

    pub(super) fn on_reclaimed(
        &mut self,
        instance: InstanceId,
        returned: Vec<(CallId, Quota)>,
    ) -> Result<(), Violation> {
        let dead = self.dead.iter().position(|d| d.current == instance);
        self.record(Ev::Reclaimed { instance, returned: returned.clone(), dead: dead.is_some() });
        if let Some(d) = dead {
            self.stats.dead_reclaims += 1;
            let d = self.dead.remove(d);
            for lease in &d.accounts {
                let lost = self.unreported(lease);
                self.forget_spend(lease.account(), lost)?;
            }
        } else if self.slot_of(instance).is_some() {
            // A live instance that missed its heartbeats (clock jump, ledger down, delays): a zombie until
            // it learns. What the reclaim returned, it may still spend once; it pays it back as debt.
            self.stats.false_reclaims += 1;
            for (call, amount) in returned {
                self.truth.entry(call.account).or_default().window += amount.max(0);
            }
        } else if let Some((call, amount)) = returned.iter().find(|(_, a)| *a != 0) {
            let what = format!("reclaimed {amount} from {call:?} of an instance that never held a lease");
            return Err(self.violation(what, Some(call.account)));
        }
        Ok(())
    }

    /// Spend a crash made the ledger forget (refunded to the account by the reclaim). Never negative:
    /// the ledger never charges twice.
    pub(super) fn forget_spend(&mut self, account: Account, lost: Quota) -> Result<(), Violation> {
        if lost < 0 {
            return Err(
                self.violation(format!("{account:?}: a crash charged {} twice", -lost), Some(account))
            );
        }
        if lost != 0 {
            self.truth.entry(account).or_default().lost += lost;
            self.stats.crash_lost += lost;
            self.stats.max_crash_lost_row = self.stats.max_crash_lost_row.max(lost);
            let beyond = lost - self.params.policy.report_threshold;
            self.stats.max_crash_lost_beyond_threshold =
                self.stats.max_crash_lost_beyond_threshold.max(beyond);
            self.record(Ev::CrashLost { account, lost });
        }
        Ok(())
    }

    pub(super) fn faults(&mut self) -> Result<(), Violation> {
        if self.rng.chance(self.params.p_top_up) {
            let accounts: Vec<Account> = self.accounts().collect();
            let account = accounts[self.rng.index(accounts.len())];
            let amount = if self.rng.chance(0.1) {
                self.rng.range(100_000, 5_000_000)
            } else {
                self.rng.range(1, 100_000)
            };
            let funding = self.next_funding(account, amount);
            self.pending_top_ups.push((account, funding));
        }
        if self.rng.chance(self.params.p_crash) {
            self.crash()?;
        }
        if self.rng.chance(self.params.p_ledger_restart) {
            self.restart_ledger()?;
        }
        if self.rng.chance(self.params.p_quiet) {
            self.quiet_until = self.now + self.rng.range(1_000, 20_000);
        }
        if self.rng.chance(self.params.p_pause) {
            self.stats.pauses += 1;
            let slot = self.rng.index(self.live.len());
            let until = self.now + self.rng.range(100, 3 * self.params.ttl);
            self.live[slot].paused_until = until;
            let instance = self.live[slot].current;
            self.record(Ev::Pause { instance, until });
        }
        if self.rng.chance(self.params.p_clock_jump) {
            self.stats.clock_jumps += 1;
            self.last_jump = Some(self.now);
            let by = self.rng.range(-2 * self.params.ttl, 2 * self.params.ttl);
            if self.rng.chance(0.5) {
                self.ledger_skew += by;
                self.record(Ev::ClockJump { instance: None, by });
            } else {
                let slot = self.rng.index(self.live.len());
                self.live[slot].skew += by;
                let instance = Some(self.live[slot].current);
                self.record(Ev::ClockJump { instance, by });
            }
        }
        Ok(())
    }

    /// SIGKILL: the instance's local state vanishes and a fresh process (new id) takes its place.
    pub(super) fn crash(&mut self) -> Result<(), Violation> {
        self.stats.crashes += 1;
        let slot = self.rng.index(self.live.len());
        let fresh = self.start_instance();
        let inst = std::mem::replace(&mut self.live[slot], fresh);
        let killed: usize = inst.workers.iter().map(|w| w.running.len()).sum();
        self.stats.killed_in_flight += killed as u64;
        self.record(Ev::Crash { instance: inst.current, killed });
        let row_alive = self.ledger.instance(inst.current).is_some_and(|i| !i.fenced);
        let mut accounts = Vec::new();
        for w in inst.workers {
            let on_live_row = !w.book.is_fenced() && row_alive;
            for lease in w.book.accounts() {
                if on_live_row && lease.holder() == Some(w.book.holder()) {
                    accounts.push(lease.clone());
                } else {
                    // Its row was reclaimed already; the debt it carried dies with it.
                    let lost = self.unreported(lease);
                    self.forget_spend(lease.account(), lost)?;
                }
            }
        }
        if row_alive {
            self.dead.push(Dead { current: inst.current, accounts });
        }
        Ok(())
    }

    /// The ledger process dies and comes back from its snapshot and log; connections reset.
    pub(super) fn restart_ledger(&mut self) -> Result<(), Violation> {
        self.stats.ledger_restarts += 1;
        let before = self.ledger.state().clone();
        self.ledger.restart();
        if *self.ledger.state() != before {
            return Err(
                self.violation("ledger restart did not restore the state it had acknowledged".into(), None)
            );
        }
        self.net.clear();
        let down_for = self.rng.range(0, 2_000);
        self.ledger_up_at = self.now + down_for;
        self.record(Ev::LedgerRestart { down_for });
        Ok(())
    }

    /// Top-ups are sent until acknowledged; a lost reply makes the admin send the same id again.
    pub(super) fn retry_top_ups(&mut self) {
        if !self.ledger_up() {
            return;
        }
        let pending = std::mem::take(&mut self.pending_top_ups);
        for (account, funding) in pending {
            let before = self.ledger.account(account).version;
            let _ = self.ledger.fund(account, funding);
            let applied = self.ledger.account(account).version;
            if applied > before {
                let total = self.fundings.get(&account).and_then(|v| v.get(&applied)).copied();
                self.truth.entry(account).or_default().funded = total.unwrap_or_default();
                self.stats.top_ups += 1;
            }
            let reply_lost = self.reply_lost();
            self.record(Ev::TopUp { account, funding, reply_lost });
            if reply_lost {
                self.pending_top_ups.push((account, funding));
            }
        }
    }
}
