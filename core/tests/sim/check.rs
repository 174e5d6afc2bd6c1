//! The invariants, checked after every step: conservation at the ledger, each lease against its row,
//! settled spend against what the ledger knows, and the overspend bound; and at the end, the drain after
//! which every unit of quota is spendable, reported, or knowingly refunded by a crash.

use std::collections::BTreeMap;

use burncloud_core::lease::{
    Account, CallOp, HolderId, InstanceId, LeaseAccount, Ledger, LedgerCall, Reclaim,
};
use burncloud_core::model::Quota;

use super::Sim;
use super::trace::Violation;

impl Sim {
    /// Every lease the simulator knows of: live workers' and crashed instances' unreclaimed rows.
    pub(super) fn leases(&self) -> impl Iterator<Item = &LeaseAccount> {
        self.live
            .iter()
            .flat_map(|i| i.workers.iter().flat_map(|w| w.book.accounts()))
            .chain(self.dead.iter().flat_map(|d| d.accounts.iter()))
    }

    pub(super) fn fenced(&self, instance: InstanceId) -> bool {
        self.ledger.instance(instance).is_some_and(|i| i.fenced)
    }

    /// Conservation and the overspend bound, per account, after every step.
    pub fn check(&mut self) -> Result<(), Violation> {
        #[derive(Default, Clone, Copy)]
        struct Sums {
            rows: Quota,
            unreported: Quota,
            clean: bool,
        }
        let mut sums: BTreeMap<Account, Sums> =
            self.truth.keys().map(|a| (*a, Sums { clean: true, ..Sums::default() })).collect();
        // Σ rows of instances not fenced (fenced rows are zero; checked at the end).
        let state = self.ledger.state();
        for (instance, _) in state.instances.iter().filter(|(_, i)| !i.fenced) {
            let from = (HolderId { instance: *instance, worker: 0 }, Account::User(i64::MIN));
            for ((holder, account), row) in
                state.rows.range(from..).take_while(|((h, _), _)| h.instance == *instance)
            {
                let _ = holder;
                sums.entry(*account).or_default().rows += row.amount;
            }
        }
        // Each lease against its row; unreported spend; debts and zombies.
        for lease in self.leases() {
            let account = lease.account();
            let unreported = self.unreported(lease);
            let s = sums.entry(account).or_default();
            s.unreported += unreported;
            let in_flight_debt = matches!(lease.in_flight(), Some(LedgerCall { op: CallOp::GiveBack { amount }, .. }) if amount < 0);
            let zombie = lease.holder().is_none_or(|h| self.fenced(h.instance));
            if lease.available() < 0 || in_flight_debt || zombie {
                s.clean = false;
            }
            let Some(holder) = lease.holder() else { continue };
            if self.fenced(holder.instance) {
                continue;
            }
            let row = self.ledger.row(holder, account);
            let effect = match lease.in_flight() {
                Some(c) if row.last_seq >= c.id.seq => match c.op {
                    CallOp::Take { .. } => row.last_grant,
                    CallOp::GiveBack { amount } | CallOp::ReportSpend { amount } => -amount,
                },
                _ => 0,
            };
            if row.amount != lease.held() + effect {
                let what = format!(
                    "row {holder:?}/{account:?} holds {} but the lease accounts for {} (available {}, reserved {}, \
                     unreported {}, in flight {:?}, last applied {})",
                    row.amount,
                    lease.held() + effect,
                    lease.available(),
                    lease.reserved(),
                    lease.unreported(),
                    lease.in_flight(),
                    row.last_seq
                );
                return Err(self.violation(what, Some(account)));
            }
        }
        // A pre-deduction taken from a row that was fenced since: its funds went back with the reclaim,
        // and its settlement will be a debt.
        for inst in &self.live {
            for w in &inst.workers {
                for r in &w.running {
                    let pres = std::iter::once(&r.user_pre).chain(r.key_pre.as_ref());
                    for pre in pres {
                        let current = w.book.account(pre.account()).and_then(LeaseAccount::holder);
                        if current != Some(pre.holder()) || self.fenced(pre.holder().instance) {
                            sums.entry(pre.account()).or_default().clean = false;
                        }
                    }
                }
            }
        }
        for (account, s) in sums {
            let t = self.truth.get(&account).copied().unwrap_or_default();
            let a = self.ledger.account(account);
            if t.funded != a.balance + s.rows + a.reported {
                let what = format!(
                    "{account:?}: funded {} ≠ balance {} + rows {} + reported {}",
                    t.funded, a.balance, s.rows, a.reported
                );
                return Err(self.violation(what, Some(account)));
            }
            if t.spent != a.reported + s.unreported + t.lost {
                let what = format!(
                    "{account:?}: spent {} ≠ reported {} + unreported {} + lost in crashes {}",
                    t.spent, a.reported, s.unreported, t.lost
                );
                return Err(self.violation(what, Some(account)));
            }
            let overspend = t.spent - t.funded - t.lost;
            self.stats.max_overspend = self.stats.max_overspend.max(overspend);
            if overspend > 0 && t.window > 0 {
                let per_mille = overspend * 1000 / t.window;
                self.stats.max_overspend_per_mille = self.stats.max_overspend_per_mille.max(per_mille);
            }
            if overspend > t.window {
                let what = format!(
                    "{account:?}: spent {} exceeds funds {} + crash refunds {} by {overspend}, beyond the allowance {} \
                     (overruns since debt-free + false reclaims)",
                    t.spent, t.funded, t.lost, t.window
                );
                return Err(self.violation(what, Some(account)));
            }
            if s.clean && a.balance >= 0 {
                if overspend > 0 {
                    let what =
                        format!("{account:?}: no debt anywhere, yet spent exceeds funds by {overspend}");
                    return Err(self.violation(what, Some(account)));
                }
                if let Some(t) = self.truth.get_mut(&account) {
                    t.window = 0;
                }
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- drain and the final balance

    /// What still moves, if anything: messages, unreclaimed crashes, requests, or leases not yet home.
    pub(super) fn busy(&self) -> Option<String> {
        if !self.net.is_empty() || !self.pending_top_ups.is_empty() {
            return Some(format!(
                "{} messages, {} top-ups in flight",
                self.net.len(),
                self.pending_top_ups.len()
            ));
        }
        if let Some(d) = self.dead.first() {
            return Some(format!("crashed {:?} not reclaimed", d.current));
        }
        for i in &self.live {
            if !i.registered {
                return Some(format!("{:?} not registered", i.current));
            }
            for w in &i.workers {
                if !w.running.is_empty() || !w.parked.is_empty() {
                    return Some(format!(
                        "{:?}: {} running, {} parked",
                        w.book.holder(),
                        w.running.len(),
                        w.parked.len()
                    ));
                }
                if let Some(l) = w.book.accounts().find(|l| !l.is_quiet()) {
                    return Some(format!("{:?} still holds {l:?}", w.book.holder()));
                }
            }
        }
        None
    }

    /// Stops traffic and faults, lets every lease go home, retires every instance, and checks the books
    /// balance exactly: nothing held anywhere, every unit of quota either spendable, reported, or
    /// knowingly refunded by a crash.
    pub fn drain(&mut self) -> Result<(), Violation> {
        self.draining = true;
        let mut rounds = 0;
        while let Some(busy) = self.busy() {
            rounds += 1;
            if rounds > 20_000 {
                return Err(self.violation(format!("did not drain after 20,000 quiet steps: {busy}"), None));
            }
            self.step()?;
        }
        let now = self.ledger_now();
        let ids: Vec<InstanceId> = self.live.iter().map(|i| i.current).collect();
        for instance in ids {
            if let Ok(Reclaim::Reclaimed { returned }) = self.ledger.reclaim(instance, now, 0)
                && let Some((call, amount)) = returned.iter().find(|(_, a)| *a != 0)
            {
                let what = format!("a drained instance still held {amount} on {call:?}");
                return Err(self.violation(what, Some(call.account)));
            }
        }
        for (account, t) in self.truth.clone() {
            let a = self.ledger.account(account);
            let held = self.ledger.state().held(account);
            if held != 0 || a.balance + a.reported != t.funded || a.reported + t.lost != t.spent {
                let what = format!(
                    "{account:?} after drain: held {held}, balance {} + reported {} vs funded {}; reported + lost {} vs spent {}",
                    a.balance,
                    a.reported,
                    t.funded,
                    a.reported + t.lost,
                    t.spent
                );
                return Err(self.violation(what, Some(account)));
            }
        }
        Ok(())
    }
}
