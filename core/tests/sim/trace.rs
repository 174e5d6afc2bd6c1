//! The trace of a run and how a violation is reported: seed, step, what failed, and the last events
//! that touched the account concerned.

use std::fmt::Write as _;

use burncloud_core::lease::{
    Account, CallId, CallReply, Funding, HolderId, InstanceId, LedgerCall, LedgerError, Millis, NotAdmitted,
    ReplyEffect,
};
use burncloud_core::model::Quota;

use super::Sim;

/// Trace events kept for a violation report.
const TRACE_KEEP: usize = 600;
/// Trace lines printed with a violation.
const TRACE_PRINT: usize = 60;

/// A failed check: everything needed to replay it.
#[derive(Debug)]
pub struct Violation {
    pub seed: u64,
    pub step: u64,
    /// `BURNCLOUD_SIM_STEPS` that reproduces it: the step itself, or the run's length when it failed
    /// while draining.
    pub replay_steps: u64,
    pub what: String,
    pub trace: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lease simulation violated an invariant\n  seed {} (replay: BURNCLOUD_SIM_SEED={} BURNCLOUD_SIM_STEPS={})\n  \
             step {}: {}\n  trace (oldest first):\n{}",
            self.seed, self.seed, self.replay_steps, self.step, self.what, self.trace
        )
    }
}

/// One line of the trace.
#[derive(Debug, Clone)]
#[allow(dead_code, reason = "fields are read through Debug, in violation traces")]
pub(super) enum Ev {
    Arrive { req: u64, holder: HolderId, user: Account, key: Option<Account>, pre: Quota, actual: Quota },
    Admitted { req: u64 },
    Parked { req: u64, why: NotAdmitted },
    Rejected { req: u64 },
    Settled { req: u64, account: Account, pre: Quota, actual: Quota, available: Quota },
    Refunded { req: u64 },
    Send { call: LedgerCall, resend: bool },
    LostCall { call: CallId },
    Applied { call: LedgerCall, result: Result<CallReply, LedgerError>, reply_lost: bool },
    Reply { call: CallId, effect: ReplyEffect },
    Beat { instance: InstanceId, at: Millis, result: Result<(), LedgerError> },
    Reincarnate { old: InstanceId, new: InstanceId },
    Reclaimed { instance: InstanceId, returned: Vec<(CallId, Quota)>, dead: bool },
    Crash { instance: InstanceId, killed: usize },
    CrashLost { account: Account, lost: Quota },
    LedgerRestart { down_for: Millis },
    ClockJump { instance: Option<InstanceId>, by: Millis },
    Pause { instance: InstanceId, until: Millis },
    TopUp { account: Account, funding: Funding, reply_lost: bool },
}

impl Ev {
    pub(super) fn mentions(&self, account: Account) -> bool {
        match self {
            Ev::Arrive { user, key, .. } => *user == account || *key == Some(account),
            Ev::Settled { account: a, .. }
            | Ev::TopUp { account: a, .. }
            | Ev::CrashLost { account: a, .. } => *a == account,
            Ev::Send { call, .. } | Ev::Applied { call, .. } => call.id.account == account,
            Ev::LostCall { call } | Ev::Reply { call, .. } => call.account == account,
            Ev::Reclaimed { returned, .. } => returned.iter().any(|(c, _)| c.account == account),
            Ev::Admitted { .. } | Ev::Parked { .. } | Ev::Rejected { .. } | Ev::Refunded { .. } => false,
            Ev::Beat { .. }
            | Ev::Reincarnate { .. }
            | Ev::Crash { .. }
            | Ev::LedgerRestart { .. }
            | Ev::ClockJump { .. }
            | Ev::Pause { .. } => true,
        }
    }
}

impl Sim {
    pub(super) fn record(&mut self, ev: Ev) {
        if self.trace.len() == TRACE_KEEP {
            self.trace.pop_front();
        }
        self.trace.push_back((self.step, self.now, ev));
    }

    pub(super) fn violation(&self, what: String, account: Option<Account>) -> Violation {
        let relevant: Vec<_> =
            self.trace.iter().filter(|(_, _, ev)| account.is_none_or(|a| ev.mentions(a))).collect();
        let mut trace = String::new();
        for (step, now, ev) in relevant.iter().skip(relevant.len().saturating_sub(TRACE_PRINT)) {
            let _ = writeln!(trace, "    #{step} t={now} {ev:?}");
        }
        let replay_steps = if self.draining { self.steps } else { self.step };
        Violation { seed: self.seed, step: self.step, replay_steps, what, trace }
    }
}
