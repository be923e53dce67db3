use std::sync::atomic::{AtomicUsize, Ordering};

use super::strategy::{Pick, Strategy};
use crate::pool::Members;

/// Round robin: one tick of a shared counter per request.
///
/// Attempts of one request continue from the backend tried last: start,
/// start+1, … wrapping around, each backend at most once (Panda's failover
/// semantics). Unavailable backends are skipped.
///
/// Pick it for uniform backends and uniform requests: it is the cheapest
/// strategy and spreads load evenly.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// A round robin starting at the first backend.
    pub fn new() -> Self {
        RoundRobin::default()
    }
}

impl Clone for RoundRobin {
    /// A new round robin with its own counter.
    fn clone(&self) -> Self {
        RoundRobin::new()
    }
}

impl Strategy for RoundRobin {
    type Table = ();

    fn build(&self, _members: &Members) {}

    #[inline]
    fn pick(&self, _table: &(), pick: &Pick<'_>) -> Option<usize> {
        let start = match pick.last_tried_index() {
            Some(last) => last + 1,
            None => self.next.fetch_add(1, Ordering::Relaxed),
        };
        pick.first_eligible_from(start)
    }
}
