//! Panic routing: when too few backends are available, route across all of
//! them (Envoy's panic threshold) instead of overloading the few.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::pool::Members;

/// How long one count of available backends is trusted.
const REFRESH: Duration = Duration::from_millis(1);

/// The default threshold: panic below 50 % available (Envoy's default).
pub(crate) const DEFAULT_PANIC_PERMILLE: u32 = 500;

/// Whether a pool is in panic, counted at most once per [`REFRESH`].
///
/// The count is O(N), but it runs only when a pick meets an unavailable
/// backend (a pool where every backend is available never counts) and then
/// at most once per millisecond per balancer, by one request: those that
/// come while it counts take the last answer. A request therefore never
/// pays O(N) in steady state, and few pay it at once (a queued request
/// that must know now counts too: see [`recount`](Self::recount)).
#[derive(Debug)]
pub(crate) struct PanicMode {
    /// Panic when `available * 1000 < threshold * enabled`; 0 disables.
    threshold_permille: AtomicU32,
    /// `(valid_until << 1) | panicking`, `valid_until` in nanoseconds since
    /// `epoch`: the last answer, and until when it holds. Past then (or
    /// when made stale), the next request to ask counts, and moves
    /// `valid_until` on first so that those asking meanwhile take the
    /// last answer.
    cache: AtomicU64,
    epoch: Instant,
}

impl PanicMode {
    pub(crate) fn new(threshold_permille: u32) -> Self {
        PanicMode {
            threshold_permille: AtomicU32::new(threshold_permille.min(1000)),
            cache: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Sets the threshold as a share in `0.0..=1.0` (NaN and negative
    /// values disable panic routing; values above 1 count as 1).
    pub(crate) fn set_threshold(&self, share: f64) {
        self.threshold_permille
            .store(share_to_permille(share), Ordering::Relaxed);
        self.invalidate();
    }

    /// The threshold in thousandths of the enabled backends.
    pub(crate) fn threshold_permille(&self) -> u32 {
        self.threshold_permille.load(Ordering::Relaxed)
    }

    /// Makes the last answer stale (the membership changed): the next
    /// request to ask counts again.
    pub(crate) fn invalidate(&self) {
        self.cache.fetch_and(1, Ordering::AcqRel);
    }

    /// Whether fewer than the threshold share of the enabled members are
    /// available.
    pub(crate) fn engaged(&self, members: &Members) -> bool {
        let threshold = u64::from(self.threshold_permille());
        if threshold == 0 {
            return false;
        }
        let now = self.nanos(Instant::now());
        match self.claim(now) {
            Ok(()) => self.count(members, threshold, now),
            Err(answer) => answer,
        }
    }

    /// Claims the count when the last answer is stale (`Ok`); otherwise
    /// the answer to take (`Err`): the last one while it holds, or while
    /// another request counts.
    fn claim(&self, now: u64) -> Result<(), bool> {
        let cached = self.cache.load(Ordering::Acquire);
        if now < cached >> 1 {
            return Err(cached & 1 == 1);
        }
        let claimed = (self.valid_until(now) << 1) | (cached & 1);
        match self
            .cache
            .compare_exchange(cached, claimed, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(()),
            Err(seen) => Err(seen & 1 == 1),
        }
    }

    /// [`engaged`](Self::engaged), counted now whatever is cached.
    pub(crate) fn recount(&self, members: &Members) -> bool {
        let threshold = u64::from(self.threshold_permille());
        if threshold == 0 {
            return false;
        }
        self.count(members, threshold, self.nanos(Instant::now()))
    }

    /// Counts the available members, and keeps the answer.
    fn count(&self, members: &Members, threshold: u64, now: u64) -> bool {
        let (mut enabled, mut available) = (0u64, 0u64);
        for m in members.iter() {
            let state = m.state();
            if state.is_enabled() {
                enabled += 1;
                if state.is_available() {
                    available += 1;
                }
            }
        }
        let panic = available * 1000 < threshold * enabled;
        self.cache.store(
            (self.valid_until(now) << 1) | u64::from(panic),
            Ordering::Release,
        );
        panic
    }

    /// When an answer counted at `now` stops holding.
    fn valid_until(&self, now: u64) -> u64 {
        now.saturating_add(REFRESH.as_nanos() as u64)
            .min(u64::MAX >> 1)
    }

    fn nanos(&self, at: Instant) -> u64 {
        crate::time::nanos_since(self.epoch, at)
    }
}

/// A share in `0.0..=1.0` as thousandths, to the nearest; anything else is
/// clamped, NaN is 0. A share above zero stays above zero (at least one
/// thousandth): 0 turns what it sets off.
pub(crate) fn share_to_permille(share: f64) -> u32 {
    if share.is_nan() || share <= 0.0 {
        0
    } else if share >= 1.0 {
        1000
    } else {
        ((share * 1000.0).round() as u32).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HealthStatus, Pool};

    /// A stale answer is counted again by one request; those that ask
    /// while it counts take the last answer.
    #[tokio::test(start_paused = true)]
    async fn one_request_counts_while_the_others_take_the_last_answer() {
        let pool = Pool::new();
        for id in ["a", "b", "c"] {
            pool.insert(id, ());
        }
        let snapshot = pool.snapshot();
        let members = snapshot.members();
        let panic = PanicMode::new(DEFAULT_PANIC_PERMILLE);
        assert!(!panic.engaged(members));
        for id in ["a", "b"] {
            pool.state(&id.into())
                .unwrap()
                .set_health(HealthStatus::Unhealthy);
        }
        assert!(!panic.engaged(members), "the answer holds for {REFRESH:?}");
        tokio::time::advance(REFRESH).await;
        // One request claims the count: until it is done, the others take
        // the last answer.
        let now = panic.nanos(Instant::now());
        assert_eq!(panic.claim(now), Ok(()));
        assert!(!panic.engaged(members), "the last answer, while counting");
        assert!(panic.count(members, u64::from(DEFAULT_PANIC_PERMILLE), now));
        assert!(panic.engaged(members));
        // Made stale, the answer is counted again by the next request.
        pool.state(&"a".into())
            .unwrap()
            .set_health(HealthStatus::Healthy);
        panic.invalidate();
        assert!(!panic.engaged(members));
        assert!(!panic.recount(members));
    }
}
