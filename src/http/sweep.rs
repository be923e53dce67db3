//! A background task that sweeps something of a client's while there is
//! something to sweep: an upstream's idle connections, the response bodies
//! the send timeout watches.
//!
//! Its owner keeps a flag, set and cleared under the lock that adding an
//! item takes: the item that finds it clear sets it and starts a sweep,
//! and the sweep clears it when it finds nothing left, under that lock, so
//! an item added at that moment starts the next one. A sweep dropped
//! before its end (its runtime shut down, also before it first ran)
//! clears it too.

use std::sync::{Arc, Weak};

use tokio::runtime::Handle;
use tokio::time::Instant;

/// What a sweep sweeps.
pub(super) trait Swept: Send + Sync + 'static {
    /// One round at `now`: when the next one is due, or `None` when
    /// nothing is left, having cleared the flag under the lock an item
    /// takes.
    fn round(&self, now: Instant) -> Option<Instant>;

    /// Clears the flag: the sweep was dropped before its end.
    fn stopped(&self);
}

/// Sweeps `owner` on `runtime`, from `first` on, until nothing is left or
/// `owner` is gone. Spawn with the lock gone: a runtime shutting down drops
/// the sweep at once, and its guard takes the lock.
pub(super) fn spawn<T: Swept>(runtime: &Handle, owner: &Arc<T>, first: Instant) {
    let guard = Guard {
        owner: Arc::downgrade(owner),
        ended: false,
    };
    runtime.spawn(run(guard, first));
}

/// Clears the owner's flag should the sweep be dropped before its end.
struct Guard<T: Swept> {
    owner: Weak<T>,
    ended: bool,
}

impl<T: Swept> Drop for Guard<T> {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.upgrade().filter(|_| !self.ended) {
            owner.stopped();
        }
    }
}

async fn run<T: Swept>(mut guard: Guard<T>, mut next: Instant) {
    loop {
        tokio::time::sleep_until(next).await;
        let Some(owner) = guard.owner.upgrade() else {
            return;
        };
        match owner.round(Instant::now()) {
            Some(at) => next = at,
            None => {
                guard.ended = true;
                return;
            }
        }
    }
}
