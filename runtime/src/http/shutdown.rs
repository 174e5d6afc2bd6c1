//! The per-worker "stop serving" flag that connection loops watch.
//!
//! Owns [`ShutdownSignal`]: a cheap, cloneable, single-thread flag with wakers, so an idle keep-alive
//! connection closes the moment shutdown is requested instead of sleeping out its idle timeout. It
//! is `!Send` on purpose: each worker owns one and triggers it from its own thread (when its control
//! message arrives). It never blocks, never allocates after the first registrations, and never wakes
//! anything but the tasks waiting on it.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A flag set once, observed by every connection of one worker.
#[derive(Clone, Default)]
pub struct ShutdownSignal {
    inner: Rc<Inner>,
}

#[derive(Default)]
struct Inner {
    triggered: Cell<bool>,
    waiters: RefCell<Waiters>,
}

/// Wakers of the pending [`Triggered`] futures, in reusable slots.
#[derive(Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl ShutdownSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests shutdown and wakes every waiting connection. Idempotent.
    pub fn trigger(&self) {
        self.inner.triggered.set(true);
        let wakers: Vec<Waker> = match self.inner.waiters.try_borrow_mut() {
            Ok(mut w) => w.slots.iter_mut().filter_map(Option::take).collect(),
            Err(_) => Vec::new(),
        };
        for waker in wakers {
            waker.wake();
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.get()
    }

    /// Completes once [`trigger`](Self::trigger) has been called (at once if it already was).
    pub fn triggered(&self) -> Triggered<'_> {
        Triggered { signal: self, slot: None }
    }
}

/// Future returned by [`ShutdownSignal::triggered`].
pub struct Triggered<'a> {
    signal: &'a ShutdownSignal,
    slot: Option<usize>,
}

impl Future for Triggered<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.signal.is_triggered() {
            return Poll::Ready(());
        }
        let Ok(mut waiters) = this.signal.inner.waiters.try_borrow_mut() else {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        };
        let waiters = &mut *waiters;
        let slot = match this.slot {
            Some(slot) => slot,
            None => {
                let slot = waiters.free.pop().unwrap_or_else(|| {
                    waiters.slots.push(None);
                    waiters.slots.len() - 1
                });
                this.slot = Some(slot);
                slot
            }
        };
        if let Some(entry) = waiters.slots.get_mut(slot) {
            match entry {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *entry = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }
}

impl Drop for Triggered<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take()
            && let Ok(mut waiters) = self.signal.inner.waiters.try_borrow_mut()
        {
            if let Some(entry) = waiters.slots.get_mut(slot) {
                *entry = None;
            }
            waiters.free.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::rt;

    #[test]
    fn a_waiting_task_wakes_when_shutdown_is_triggered() {
        let woke = rt::run_worker(0, None, || async {
            let signal = ShutdownSignal::new();
            let trigger = signal.clone();
            rt::spawn(async move {
                rt::sleep(Duration::from_millis(20)).await;
                trigger.trigger();
            });
            rt::timeout(Duration::from_secs(5), signal.triggered()).await.is_ok()
        })
        .unwrap();
        assert!(woke);
    }

    #[test]
    fn slots_of_dropped_waiters_are_reused() {
        rt::run_worker(0, None, || async {
            let signal = ShutdownSignal::new();
            for _ in 0..10 {
                let _ = rt::timeout(Duration::from_millis(1), signal.triggered()).await;
            }
            assert_eq!(signal.inner.waiters.borrow().slots.len(), 1);
            signal.trigger();
            signal.triggered().await;
        })
        .unwrap();
    }
}
