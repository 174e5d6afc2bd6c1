//! Deterministic simulation of the lease protocol (`docs/LEASES.md`).
//!
//! Many gateway instances × workers × users × keys issue requests against one [`ModelLedger`] over a
//! simulated network, while the seed injects faults: calls lost before the ledger applies them, replies
//! lost after it did, delayed (and therefore duplicated) calls, ledger restarts from snapshot + log,
//! instance crashes (a sibling's reaper reclaims after the TTL), clock jumps on the ledger and on
//! instances, concurrent top-ups whose replies get lost. After every step [`Sim::check`] verifies
//! conservation exactly and the overspend bound; a violation carries the seed, the step and the trace
//! that led there. Everything is a pure function of the seed: no threads, no clocks, no I/O.

mod check;
mod faults;
mod params;
pub mod rng;
mod trace;

use std::collections::{BTreeMap, VecDeque};

use burncloud_core::lease::{
    Account, CallId, CallReply, Funding, HolderId, InstanceId, LeaseAccount, LeaseBook, Ledger, LedgerCall,
    LedgerError, Millis, ModelLedger, NotAdmitted, PreDeduction, ReplyEffect,
};
use burncloud_core::model::Quota;
use burncloud_core::pricing::Price;

pub use params::{Params, Stats};
use rng::Rng;
use trace::Ev;
pub use trace::Violation;

/// Completion tokens assumed when a request sets no `max_tokens`.
const DEFAULT_MAX_TOKENS: i64 = 512;

/// A request: who pays, what was set aside, what it will really cost.
#[derive(Debug, Clone)]
struct Req {
    id: u64,
    user: Account,
    key: Option<Account>,
    pre: Quota,
    actual: Quota,
    fails: bool,
}

#[derive(Debug)]
struct Running {
    req: Req,
    user_pre: PreDeduction,
    key_pre: Option<PreDeduction>,
    ends_at: Millis,
}

#[derive(Debug)]
struct Parked {
    req: Req,
    deadline: Millis,
    refused: bool,
}

#[derive(Debug)]
struct Worker {
    book: LeaseBook,
    running: Vec<Running>,
    parked: Vec<Parked>,
    /// When the call in flight on each account was last sent.
    sent_at: BTreeMap<Account, Millis>,
}

#[derive(Debug)]
struct Instance {
    current: InstanceId,
    /// Every id this process has had (replies to old ids still arrive).
    ids: Vec<InstanceId>,
    registered: bool,
    skew: Millis,
    workers: Vec<Worker>,
    next_beat: Millis,
    next_reap: Millis,
    /// The process is frozen (SIGSTOP, VM pause) until then: it does nothing, its clock keeps going.
    paused_until: Millis,
}

/// A crashed instance whose rows are not reclaimed yet: the local state it had on its live rows.
#[derive(Debug)]
struct Dead {
    current: InstanceId,
    accounts: Vec<LeaseAccount>,
}

#[derive(Debug, Clone)]
enum Payload {
    Call(LedgerCall),
    Reply(CallId, Result<CallReply, LedgerError>),
    Beat { instance: InstanceId, sent_at: Millis },
    BeatReply { instance: InstanceId, sent_at: Millis, result: Result<(), LedgerError> },
}

#[derive(Debug, Clone)]
struct Msg {
    at: Millis,
    id: u64,
    payload: Payload,
}

/// Ground truth per account, kept by the simulator independently of the code under test.
#[derive(Debug, Clone, Copy, Default)]
struct Truth {
    /// The funding total of the newest version the ledger applied (the open included).
    funded: Quota,
    /// Actual cost of every settled request.
    spent: Quota,
    /// Spend forgotten by crashes (refunded to the account by reclaim).
    lost: Quota,
    /// Allowance: overruns since the account was last free of debt, plus what false reclaims returned.
    window: Quota,
}

pub struct Sim {
    seed: u64,
    rng: Rng,
    pub params: Params,
    step: u64,
    /// Steps before the drain (the run's length).
    steps: u64,
    now: Millis,
    ledger: ModelLedger,
    ledger_skew: Millis,
    ledger_up_at: Millis,
    net: Vec<Msg>,
    next_msg: u64,
    live: Vec<Instance>,
    dead: Vec<Dead>,
    /// (key account, its user, whether the key has limited quota)
    keys: Vec<(Account, Account, bool)>,
    prices: Vec<Price>,
    truth: BTreeMap<Account, Truth>,
    /// Fundings sent to the ledger and not yet acknowledged (a lost reply sends them again).
    pending_top_ups: Vec<(Account, Funding)>,
    /// Every funding version issued per account, with its total.
    fundings: BTreeMap<Account, BTreeMap<i64, Quota>>,
    next_instance: u64,
    next_req: u64,
    last_jump: Option<Millis>,
    /// No new requests until then (lets leases go idle).
    quiet_until: Millis,
    draining: bool,
    trace: VecDeque<(u64, Millis, Ev)>,
    pub stats: Stats,
}

impl Sim {
    pub fn new(seed: u64) -> Sim {
        let mut rng = Rng::new(seed);
        let params = Params::draw(&mut rng);
        let mut keys = Vec::new();
        for user in 1..=params.users {
            for k in 0..rng.range(1, 3) {
                keys.push((Account::Key(user * 100 + k), Account::User(user), rng.chance(0.75)));
            }
        }
        let prices = (0..3)
            .map(|_| {
                Price::Ratio {
                    model_ratio: 0.05 + rng.unit() * 2.5,
                    completion_ratio: 1.0 + rng.unit() * 4.0,
                    group_ratio: 0.5 + rng.unit() * 1.5,
                    cache_ratio: 1.0,
                }
                .with_cache_ratio(0.1 + rng.unit() * 0.9)
            })
            .chain(std::iter::once(Price::PerCall { usd: 0.004, group_ratio: 1.0 }))
            .collect();
        let mut sim = Sim {
            seed,
            rng,
            params,
            step: 0,
            steps: 0,
            now: 0,
            ledger: ModelLedger::new(256),
            ledger_skew: 0,
            ledger_up_at: 0,
            net: Vec::new(),
            next_msg: 0,
            live: Vec::new(),
            dead: Vec::new(),
            keys,
            prices,
            truth: BTreeMap::new(),
            pending_top_ups: Vec::new(),
            fundings: BTreeMap::new(),
            next_instance: 1,
            next_req: 1,
            last_jump: None,
            quiet_until: 0,
            draining: false,
            trace: VecDeque::new(),
            stats: Stats::default(),
        };
        let accounts: Vec<Account> = sim.accounts().collect();
        for account in accounts {
            sim.truth.insert(account, Truth::default());
            let funds = match sim.rng.range(0, 9) {
                0..=2 => sim.rng.range(0, 5_000),
                3..=6 => sim.rng.range(0, 300_000),
                _ => sim.rng.range(1_000_000, 20_000_000),
            };
            // The account is opened from the durable record; later fundings come as new versions.
            let opening = Funding { remaining: funds, total: funds, version: 1 };
            let _ = sim.ledger.open(account, opening);
            sim.fundings.entry(account).or_default().insert(1, funds);
            sim.truth.entry(account).or_default().funded = funds;
        }
        for _ in 0..sim.params.instances {
            let inst = sim.start_instance();
            sim.live.push(inst);
        }
        sim
    }

    fn accounts(&self) -> impl Iterator<Item = Account> + '_ {
        (1..=self.params.users)
            .map(Account::User)
            .chain(self.keys.iter().filter(|(_, _, limited)| *limited).map(|(k, _, _)| *k))
    }

    /// A new funding version for `account`: its total grows by `amount`.
    fn next_funding(&mut self, account: Account, amount: Quota) -> Funding {
        let versions = self.fundings.entry(account).or_default();
        let (version, total) = versions.last_key_value().map_or((0, 0), |(v, t)| (*v, *t));
        let funding = Funding { remaining: 0, total: total + amount, version: version + 1 };
        versions.insert(funding.version, funding.total);
        funding
    }

    fn mint_instance(&mut self) -> InstanceId {
        // Random-looking but seed-determined, as a real process would pick a random id.
        self.next_instance += 1;
        InstanceId(self.rng.next_u64() ^ self.next_instance)
    }

    fn start_instance(&mut self) -> Instance {
        let id = self.mint_instance();
        let policy = self.params.policy;
        let workers = (0..self.params.workers)
            .map(|w| Worker {
                book: LeaseBook::new(HolderId { instance: id, worker: w }, policy),
                running: Vec::new(),
                parked: Vec::new(),
                sent_at: BTreeMap::new(),
            })
            .collect();
        let skew = self.rng.range(-200, 200);
        let beat = Payload::Beat { instance: id, sent_at: self.now + skew };
        self.send(beat);
        Instance {
            current: id,
            ids: vec![id],
            registered: false,
            skew,
            workers,
            next_beat: self.now + self.params.heartbeat_every,
            next_reap: self.now + self.params.reap_every,
            paused_until: 0,
        }
    }

    fn ledger_now(&self) -> Millis {
        self.now + self.ledger_skew
    }

    fn ledger_up(&self) -> bool {
        self.now >= self.ledger_up_at
    }

    fn send(&mut self, payload: Payload) {
        if let Payload::Call(call) = &payload {
            self.stats.ledger_calls += 1;
            if !self.draining && self.rng.chance(self.params.p_lost_call) {
                self.stats.lost_calls += 1;
                let id = call.id;
                self.record(Ev::LostCall { call: id });
                return;
            }
        }
        let latency = if !self.draining && self.rng.chance(self.params.p_delay) {
            self.stats.delayed += 1;
            self.rng.range(50, 2 * self.params.ttl)
        } else {
            self.rng.range(1, 6)
        };
        self.next_msg += 1;
        self.net.push(Msg { at: self.now + latency, id: self.next_msg, payload });
    }

    fn reply_lost(&mut self) -> bool {
        let lost = !self.draining && self.rng.chance(self.params.p_lost_reply);
        if lost {
            self.stats.lost_replies += 1;
        }
        lost
    }

    // ---------------------------------------------------------------- the step

    /// One tick of simulated time: deliver what is due, run every instance, maybe a fault, then check.
    pub fn step(&mut self) -> Result<(), Violation> {
        self.step += 1;
        self.stats.steps += 1;
        let dt = if self.draining || self.quiet_until > self.now {
            self.rng.range(5, (self.params.heartbeat_every / 4).max(5))
        } else {
            self.rng.range(0, 20)
        };
        self.now += dt;
        self.stats.sim_ms = self.now;
        self.deliver()?;
        for slot in 0..self.live.len() {
            if self.live[slot].paused_until <= self.now {
                self.tick_instance(slot)?;
            }
        }
        if !self.draining {
            self.faults()?;
            if self.quiet_until <= self.now && self.rng.chance(self.params.p_arrival) {
                self.arrive()?;
            }
        }
        self.retry_top_ups();
        self.check()
    }

    fn deliver(&mut self) -> Result<(), Violation> {
        self.net.sort_by_key(|m| (m.at, m.id));
        let due = self.net.partition_point(|m| m.at <= self.now);
        let msgs: Vec<Msg> = self.net.drain(..due).collect();
        for mut msg in msgs {
            let to = match &msg.payload {
                Payload::Reply(id, _) => Some(id.holder.instance),
                Payload::BeatReply { instance, .. } => Some(*instance),
                Payload::Call(_) | Payload::Beat { .. } => None,
            };
            if let Some(slot) = to.and_then(|i| self.slot_of(i))
                && self.live[slot].paused_until > self.now
            {
                msg.at = self.live[slot].paused_until;
                self.net.push(msg);
                continue;
            }
            match msg.payload {
                Payload::Call(call) => self.at_ledger(call),
                Payload::Beat { instance, sent_at } => self.beat_at_ledger(instance, sent_at),
                Payload::Reply(id, result) => self.reply_at_instance(id, result)?,
                Payload::BeatReply { instance, sent_at, result } => {
                    self.beat_reply_at_instance(instance, sent_at, result)
                }
            }
        }
        Ok(())
    }

    fn at_ledger(&mut self, call: LedgerCall) {
        if !self.ledger_up() {
            self.record(Ev::LostCall { call: call.id });
            return;
        }
        let result = call.apply(&mut self.ledger);
        let reply_lost = self.reply_lost();
        self.record(Ev::Applied { call, result: result.clone(), reply_lost });
        if !reply_lost {
            self.send(Payload::Reply(call.id, result));
        }
    }

    fn beat_at_ledger(&mut self, instance: InstanceId, sent_at: Millis) {
        if !self.ledger_up() {
            return;
        }
        let at = self.ledger_now();
        let result = self.ledger.heartbeat(instance, at).map(|_generation| ());
        self.record(Ev::Beat { instance, at, result: result.clone() });
        if !self.reply_lost() {
            self.send(Payload::BeatReply { instance, sent_at, result });
        }
    }

    fn slot_of(&self, instance: InstanceId) -> Option<usize> {
        self.live.iter().position(|i| i.ids.contains(&instance))
    }

    fn reply_at_instance(
        &mut self,
        id: CallId,
        result: Result<CallReply, LedgerError>,
    ) -> Result<(), Violation> {
        let Some(slot) = self.slot_of(id.holder.instance) else { return Ok(()) };
        let Some(worker) = self.live[slot].workers.get_mut(id.holder.worker as usize) else { return Ok(()) };
        let effect = worker.book.on_reply(id, result);
        match effect {
            ReplyEffect::Granted { granted: 0, .. } => {
                for p in worker.parked.iter_mut() {
                    if p.req.user == id.account || p.req.key == Some(id.account) {
                        p.refused = true;
                    }
                }
            }
            ReplyEffect::Fenced => self.learn_fence(slot, id.holder.instance),
            ReplyEffect::Rejected(_) => {
                let what = format!("ledger answered {effect:?} to {id:?}: it refused a call");
                self.record(Ev::Reply { call: id, effect });
                return Err(self.violation(what, Some(id.account)));
            }
            _ => {}
        }
        self.record(Ev::Reply { call: id, effect });
        Ok(())
    }

    fn beat_reply_at_instance(
        &mut self,
        instance: InstanceId,
        sent_at: Millis,
        result: Result<(), LedgerError>,
    ) {
        let Some(slot) = self.slot_of(instance) else { return };
        let inst = &mut self.live[slot];
        if inst.current != instance {
            return;
        }
        match result {
            Ok(()) => {
                if !inst.registered {
                    inst.registered = true;
                    for w in inst.workers.iter_mut() {
                        w.book.reincarnate(instance);
                    }
                }
                for w in inst.workers.iter_mut() {
                    w.book.heartbeat_acked(sent_at);
                }
            }
            Err(LedgerError::Fenced { .. }) => self.learn_fence(slot, instance),
            Err(_) => {}
        }
    }

    /// The instance learned that `fenced` was reclaimed: every worker stops admitting, and the process
    /// registers a new id.
    fn learn_fence(&mut self, slot: usize, fenced: InstanceId) {
        if self.live[slot].current != fenced {
            return;
        }
        let new = self.mint_instance();
        let inst = &mut self.live[slot];
        for w in inst.workers.iter_mut() {
            w.book.fence();
        }
        inst.current = new;
        inst.ids.push(new);
        inst.registered = false;
        let sent_at = self.now + inst.skew;
        self.stats.reincarnations += 1;
        self.record(Ev::Reincarnate { old: fenced, new });
        self.send(Payload::Beat { instance: new, sent_at });
    }

    fn tick_instance(&mut self, slot: usize) -> Result<(), Violation> {
        if self.now >= self.live[slot].next_beat {
            let inst = &mut self.live[slot];
            inst.next_beat = self.now + self.params.heartbeat_every;
            let beat = Payload::Beat { instance: inst.current, sent_at: self.now + inst.skew };
            self.send(beat);
        }
        if self.now >= self.live[slot].next_reap {
            self.live[slot].next_reap = self.now + self.params.reap_every;
            self.reap()?;
        }
        for w in 0..self.live[slot].workers.len() {
            self.tick_worker(slot, w)?;
        }
        Ok(())
    }

    fn tick_worker(&mut self, slot: usize, w: usize) -> Result<(), Violation> {
        let clock = self.now + self.live[slot].skew;
        // Requests whose upstream answered.
        let worker = &mut self.live[slot].workers[w];
        let (done, running): (Vec<_>, Vec<_>) = worker.running.drain(..).partition(|r| r.ends_at <= self.now);
        worker.running = running;
        for r in done {
            self.finish(slot, w, r, clock);
        }
        // Requests waiting for a refill or a heartbeat.
        let parked = std::mem::take(&mut self.live[slot].workers[w].parked);
        for p in parked {
            if self.now >= p.deadline {
                self.stats.rejected += 1;
                self.record(Ev::Rejected { req: p.req.id });
                continue;
            }
            match self.admit(slot, w, &p.req, clock)? {
                Ok(()) => {}
                Err(NotAdmitted::NeedRefill(_)) if p.refused => {
                    self.stats.rejected += 1;
                    self.stats.rejected_for_funds += 1;
                    self.record(Ev::Rejected { req: p.req.id });
                }
                Err(_) => self.live[slot].workers[w].parked.push(p),
            }
        }
        // Ledger calls: new ones, and retries of calls unanswered for too long.
        let worker = &mut self.live[slot].workers[w];
        let mut out: Vec<(LedgerCall, bool)> =
            worker.book.next_calls(clock).into_iter().map(|c| (c, false)).collect();
        for call in worker.book.in_flight() {
            let last = worker.sent_at.get(&call.id.account).copied().unwrap_or(Millis::MIN);
            if !out.iter().any(|(c, _)| c.id == call.id)
                && self.now.saturating_sub(last) >= self.params.retry_after
            {
                out.push((call, true));
            }
        }
        for (call, _) in &out {
            worker.sent_at.insert(call.id.account, self.now);
        }
        if self.rng.chance(0.01) {
            worker.book.forget_quiet();
        }
        for (call, resend) in out {
            self.record(Ev::Send { call, resend });
            self.send(Payload::Call(call));
        }
        Ok(())
    }

    fn finish(&mut self, slot: usize, w: usize, r: Running, clock: Millis) {
        let book = &mut self.live[slot].workers[w].book;
        let pres = std::iter::once((r.req.user, r.user_pre)).chain(r.req.key.zip(r.key_pre));
        if r.req.fails {
            for (_, pre) in pres {
                book.refund(pre, clock);
            }
            self.stats.upstream_failures += 1;
            self.record(Ev::Refunded { req: r.req.id });
            return;
        }
        let mut events = Vec::new();
        for (account, pre) in pres {
            let s = book.settle(pre, r.req.actual, clock);
            let available = book.account(account).map_or(0, LeaseAccount::available);
            let t = self.truth.entry(account).or_default();
            t.spent += s.actual;
            t.window += s.overrun;
            if s.overrun > 0 {
                self.stats.overruns += 1;
            }
            events.push(Ev::Settled {
                req: r.req.id,
                account,
                pre: s.pre_deducted,
                actual: s.actual,
                available,
            });
        }
        self.stats.settled += 1;
        for ev in events {
            self.record(ev);
        }
    }

    /// Pre-deducts a request from the user's and the key's leases; both or neither.
    fn admit(
        &mut self,
        slot: usize,
        w: usize,
        req: &Req,
        clock: Millis,
    ) -> Result<Result<(), NotAdmitted>, Violation> {
        let book = &mut self.live[slot].workers[w].book;
        let user = book.pre_deduct(req.user, req.pre, clock);
        let key = req.key.map(|k| book.pre_deduct(k, req.pre, clock));
        let (user_pre, key_pre) = match (user, key) {
            (Ok(u), None) => (u, None),
            (Ok(u), Some(Ok(k))) => (u, Some(k)),
            (user, key) => {
                let mut why = None;
                for r in std::iter::once(user).chain(key) {
                    match r {
                        Ok(pre) => book.refund(pre, clock),
                        Err(e) => why = why.or(Some(e)),
                    }
                }
                return Ok(Err(why.unwrap_or(NotAdmitted::Unconfirmed)));
            }
        };
        let holder = book.holder();
        if self.ledger.instance(holder.instance).is_some_and(|i| i.fenced) {
            self.stats.zombie_admissions += 1;
            let recent_jump = self.last_jump.is_some_and(|j| self.now - j <= 4 * self.params.ttl);
            if !recent_jump {
                let what = format!(
                    "{holder:?} admitted request {} after its instance was reclaimed, with no clock jump",
                    req.id
                );
                return Err(self.violation(what, Some(req.user)));
            }
        }
        let ends_at = self.now + self.rng.range(1, 3_000);
        self.live[slot].workers[w].running.push(Running { req: req.clone(), user_pre, key_pre, ends_at });
        self.stats.admitted += 1;
        self.record(Ev::Admitted { req: req.id });
        Ok(Ok(()))
    }

    fn arrive(&mut self) -> Result<(), Violation> {
        self.stats.arrivals += 1;
        let slot = self.rng.index(self.live.len());
        if self.live[slot].paused_until > self.now {
            return Ok(());
        }
        let w = self.rng.index(self.live[slot].workers.len());
        let (key, user, limited) = self.keys[self.rng.index(self.keys.len())];
        let price = self.prices[self.rng.index(self.prices.len())];
        let est = self.rng.range(10, 3_000);
        let max_tokens = if self.rng.chance(0.7) { Some(self.rng.range(16, 1_024)) } else { None };
        let pre = price.pre_deduction(est, max_tokens, DEFAULT_MAX_TOKENS);
        let max_c = max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        let overrun = self.rng.chance(self.params.p_overrun);
        let prompt = if overrun { est + self.rng.range(1, est) } else { self.rng.range(est * 8 / 10, est) };
        let completion = if overrun { self.rng.range(max_c, 2 * max_c) } else { self.rng.range(0, max_c) };
        let cached = if self.rng.chance(0.3) { self.rng.range(0, prompt / 2) } else { 0 };
        let actual = price.quota_cached(prompt, cached, completion);
        self.next_req += 1;
        let req = Req {
            id: self.next_req,
            user,
            key: limited.then_some(key),
            pre,
            actual,
            fails: self.rng.chance(self.params.p_upstream_failure),
        };
        let holder = self.live[slot].workers[w].book.holder();
        self.record(Ev::Arrive { req: req.id, holder, user, key: req.key, pre, actual });
        let clock = self.now + self.live[slot].skew;
        if let Err(why) = self.admit(slot, w, &req, clock)? {
            self.record(Ev::Parked { req: req.id, why });
            let deadline = self.now + 3_000;
            self.live[slot].workers[w].parked.push(Parked { req, deadline, refused: false });
        }
        Ok(())
    }
}

/// Runs `steps` steps of seed `seed`, then drains and checks the final balance.
pub fn run(seed: u64, steps: u64) -> Result<Stats, Violation> {
    let mut sim = Sim::new(seed);
    sim.steps = steps;
    for _ in 0..steps {
        sim.step()?;
    }
    sim.drain()?;
    Ok(sim.stats)
}
