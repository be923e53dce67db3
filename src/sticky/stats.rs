//! Counters of what the sticky layer did.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A snapshot of the sticky layer's counters (since it was built).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StickyStats {
    /// Sessions in the in-memory table now.
    pub sessions: usize,
    /// Requests whose key named no session in the table.
    pub misses: u64,
    /// Sessions started.
    pub created: u64,
    /// Sessions moved to another backend.
    pub moved: u64,
    /// Requests whose session key was rejected as bad input (bad signature,
    /// malformed, unknown backend, too long, not UTF-8, oversized `Cookie`
    /// headers) and treated as naming no session.
    pub rejected: u64,
    /// Reads of the store on a miss, for a key the table does not know in
    /// either availability mode, whether they found a record or not. A
    /// read made again because the session moved meanwhile counts again.
    pub loaded: u64,
    /// Loaded sessions this instance restored with the `on_restore` hook
    /// under a [`SessionLock`](crate::store::SessionLock) (see
    /// [`StickyLayer::hydrate`](super::StickyLayer::hydrate)).
    pub hydrated: u64,
    /// Store calls that failed. The request went on without them, unless
    /// strict mode refused it because its session's record could not be
    /// read (counted in `strict_refusals` too).
    pub store_errors: u64,
    /// Sessions dropped from the table after being idle.
    pub expired: u64,
    /// Sessions evicted from the full table (they stay in the store).
    pub evicted: u64,
    /// Requests answered with
    /// [`SessionUnavailable`](super::error::SessionUnavailable) in strict
    /// mode.
    pub strict_refusals: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) misses: AtomicU64,
    pub(crate) created: AtomicU64,
    pub(crate) moved: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) loaded: AtomicU64,
    pub(crate) hydrated: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) evicted: AtomicU64,
    pub(crate) strict_refusals: AtomicU64,
    /// Which counters these are: another layer's start from zero.
    pub(crate) serial: crate::serial::Serial,
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    if by != 0 {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

impl Counters {
    pub(crate) fn snapshot(&self, sessions: usize) -> StickyStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StickyStats {
            sessions,
            misses: get(&self.misses),
            created: get(&self.created),
            moved: get(&self.moved),
            rejected: get(&self.rejected),
            loaded: get(&self.loaded),
            hydrated: get(&self.hydrated),
            store_errors: get(&self.store_errors),
            expired: get(&self.expired),
            evicted: get(&self.evicted),
            strict_refusals: get(&self.strict_refusals),
        }
    }
}
