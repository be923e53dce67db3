//! Instant arithmetic that never panics on the durations users configure,
//! and the timers set from it.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Far enough to mean "never" for anything a balancer schedules, and near
/// enough to be added to any `Instant` the runtime hands out.
const NEVER: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The shortest period the crate schedules anything at: a configured zero
/// would spin.
pub(crate) const SHORTEST: Duration = Duration::from_millis(1);

/// `at + by`, or about thirty years after `at` when `by` is too large to
/// add (`Duration::MAX` configured as "practically never").
pub(crate) fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by).unwrap_or_else(|| at + NEVER)
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
}
