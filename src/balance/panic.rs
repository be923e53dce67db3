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
/// at most once per millisecond per balancer, so a request never pays O(N)
/// in steady state.
#[derive(Debug)]
pub(crate) struct PanicMode {
    /// Panic when `available * 1000 < threshold * enabled`; 0 disables.
    threshold_permille: AtomicU32,
    /// `(valid_until << 1) | panicking`, `valid_until` in nanoseconds since
    /// `epoch`; 0 when no count is cached.
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

    /// Forgets the cached count (the membership changed).
    pub(crate) fn invalidate(&self) {
        self.cache.store(0, Ordering::Release);
    }

    /// Whether fewer than the threshold share of the enabled members are
    /// available.
    pub(crate) fn engaged(&self, members: &Members) -> bool {
        let threshold = u64::from(self.threshold_permille());
        if threshold == 0 {
            return false;
        }
        let now = self.nanos(Instant::now());
        let cached = self.cache.load(Ordering::Acquire);
        if cached != 0 && now < cached >> 1 {
            return cached & 1 == 1;
        }
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
        let until = now
            .saturating_add(REFRESH.as_nanos() as u64)
            .min(u64::MAX >> 1);
        self.cache
            .store((until << 1) | u64::from(panic), Ordering::Release);
        panic
    }

    /// [`engaged`](Self::engaged), counted now whatever is cached.
    pub(crate) fn recount(&self, members: &Members) -> bool {
        self.invalidate();
        self.engaged(members)
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
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
