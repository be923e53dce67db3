//! Instant arithmetic that never panics on the durations users configure,
//! and the timers set from it.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Far enough to mean "never" for anything a balancer schedules, and near
/// enough to be added to any `Instant` the runtime hands out.
pub(crate) const NEVER: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The shortest period the crate schedules anything at: a configured zero
/// would spin.
pub(crate) const SHORTEST: Duration = Duration::from_millis(1);

/// `at + by`, or about thirty years after `at` when `by` is too large to
/// add (`Duration::MAX` configured as "practically never").
pub(crate) fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by).unwrap_or_else(|| at + NEVER)
}

/// `fut`'s output, or `None` once `limit` has passed. A zero limit is
/// none, and so is any outside a tokio runtime: there is no timer there
/// to measure it.
pub(crate) async fn within<F: std::future::Future>(limit: Duration, fut: F) -> Option<F::Output> {
    if limit.is_zero() || tokio::runtime::Handle::try_current().is_err() {
        return Some(fut.await);
    }
    tokio::time::timeout(limit, fut).await.ok()
}

/// The nanoseconds from `base` to `at`: 0 for an `at` before `base`, and
/// `u64::MAX` past some 584 years; for an instant kept in an atomic.
#[inline]
pub(crate) fn nanos_since(base: Instant, at: Instant) -> u64 {
    nanos(at.saturating_duration_since(base))
}

/// `at` as the nanoseconds since `base`, at least 1, for an `AtomicU64`
/// in which 0 stands for no instant (see [`from_nanos`]).
pub(crate) fn to_nanos(base: Instant, at: Instant) -> u64 {
    nanos_since(base, at).max(1)
}

/// The instant [`to_nanos`] gave as `nanos` from `base`; `None` for 0.
pub(crate) fn from_nanos(base: Instant, nanos: u64) -> Option<Instant> {
    (nanos != 0).then(|| later(base, Duration::from_nanos(nanos)))
}

/// `d` in nanoseconds, `u64::MAX` past some 584 years.
#[inline]
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether at least `span` has passed from `since` to `now`.
pub(crate) fn elapsed(since: Instant, now: Instant, span: Duration) -> bool {
    now.saturating_duration_since(since) >= span
}

/// Claims a periodic job (a sweep of expired entries) if it is due `now`
/// (`next` is when it is due; `None`: at once); the next one is then due
/// `every` later. Whether it was due.
pub(crate) fn claim_due(next: &mut Option<Instant>, every: Duration, now: Instant) -> bool {
    if next.is_some_and(|at| now < at) {
        return false;
    }
    *next = Some(later(now, every));
    true
}

/// The earlier of two optional instants; either when the other is `None`.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Arms the timer to fire at `until` (none: no timer), reusing its
/// allocation.
pub(crate) fn set_timer(timer: &mut Option<Pin<Box<Sleep>>>, until: Option<Instant>) {
    match (timer.as_mut(), until) {
        (Some(timer), Some(until)) => {
            if timer.deadline() != until {
                timer.as_mut().reset(until);
            }
        }
        (None, Some(until)) => *timer = Some(Box::pin(tokio::time::sleep_until(until))),
        (_, None) => *timer = None,
    }
}

/// Lets a repeated warning through once per period at most, and counts
/// those it holds back meanwhile: an outage that fails every request then
/// logs a line a period, not one a request, and the line says how many it
/// stands for.
#[derive(Debug, Default)]
pub(crate) struct Throttle(parking_lot::Mutex<Throttled>);

#[derive(Debug, Default)]
struct Throttled {
    /// When the next warning may go through (`None`: at once).
    next: Option<Instant>,
    held: u64,
}

/// How often a throttled warning goes through at most.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(10);

impl Throttle {
    /// `Some(held)` when this warning is to be logged, `held` being how
    /// many were held back since the last one logged; `None` when it is
    /// held back (log it at a lower level, if at all).
    pub(crate) fn pass(&self) -> Option<u64> {
        let mut throttled = self.0.lock();
        if claim_due(&mut throttled.next, WARN_EVERY, Instant::now()) {
            Some(std::mem::take(&mut throttled.held))
        } else {
            throttled.held += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_saturate() {
        let now = Instant::now();
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert!(later(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365));
        assert!(!elapsed(now, now + Duration::from_secs(5), Duration::MAX));
        assert!(elapsed(
            now,
            now + Duration::from_secs(5),
            Duration::from_secs(5)
        ));
        assert!(!elapsed(
            now + Duration::from_secs(5),
            now,
            Duration::ZERO + Duration::from_nanos(1)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_lets_one_warning_through_a_period() {
        let throttle = Throttle::default();
        assert_eq!(throttle.pass(), Some(0), "the first at once");
        assert_eq!(throttle.pass(), None);
        tokio::time::advance(WARN_EVERY - Duration::from_millis(1)).await;
        assert_eq!(throttle.pass(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(throttle.pass(), Some(2), "with the count held back");
        assert_eq!(throttle.pass(), None);
        tokio::time::advance(WARN_EVERY).await;
        assert_eq!(throttle.pass(), Some(1));
    }
}
