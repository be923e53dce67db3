use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tower::retry::budget::Budget;

/// A retry budget: retries may add a ratio of the requests (default 20 %)
/// plus a floor per second (default 3), counted over fixed windows (default
/// 10 s), in the spirit of Envoy's retry budget and Finagle's.
///
/// Each request [deposits](Budget::deposit) one token: a single relaxed
/// atomic increment, no lock and no clock read, so the budget costs next to
/// nothing on the success path. Each retry [withdraws](Budget::withdraw):
/// within a window that started `t` seconds ago and saw `n` requests, at
/// most `ratio × n + floor × (⌊t⌋ + 1)` retries are allowed, the floor
/// counting every second begun in the window, the current one included
/// (so it funds retries from the window's first instant). The floor thus
/// accrues over the window rather than capping each second: retries it did
/// not fund early in a window may all be taken at once later in it (30 at
/// the end of a quiet 10 s window with the default floor of 3).
///
/// Deposits carry no time, so when a window ends the requests made since the
/// last withdrawal are shared between the old window and the new one in
/// proportion to the time each covers (as if they came at an even rate):
/// a burst of requests just before the first failure of a new window funds
/// retries in it, and requests from long before fund none. Time is
/// [`tokio::time::Instant`], so paused test time applies.
///
/// Implements tower's [`Budget`], so [`FailoverLayer::budget`](super::FailoverLayer::budget)
/// accepts it as well as tower's `TpsBudget`.
///
/// ```
/// use tower::retry::budget::Budget;
/// use tower_ha::failover::RetryBudget;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let budget = RetryBudget::new(0.2, 0);
/// for _ in 0..10 {
///     budget.deposit();
/// }
/// assert!(budget.withdraw()); // 20 % of 10 requests: 2 retries
/// assert!(budget.withdraw());
/// assert!(!budget.withdraw());
/// # }
/// ```
pub struct RetryBudget {
    ratio: f64,
    floor_per_sec: u32,
    window: Duration,
    requests: AtomicU64,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// When the current window began.
    start: Instant,
    /// The request count when the window began (estimated, see the type's
    /// docs).
    requests_at_start: u64,
    /// Retries granted in the window.
    retries: u64,
    /// The last withdrawal (or the budget's creation), and the request
    /// count then.
    seen_at: Instant,
    seen_requests: u64,
}

impl RetryBudget {
    /// Retries may add `ratio` of the requests (0.2 for 20 %; negative or
    /// not finite counts as 0) plus `floor_per_sec` retries per second,
    /// accrued over the window (see the type's docs).
    pub fn new(ratio: f64, floor_per_sec: u32) -> Self {
        RetryBudget {
            ratio: if ratio.is_finite() {
                ratio.max(0.0)
            } else {
                0.0
            },
            floor_per_sec,
            window: Duration::from_secs(10),
            requests: AtomicU64::new(0),
            // Windows run from now: requests made long before the first
            // retry are never counted in its window.
            state: Mutex::new({
                let now = Instant::now();
                Window {
                    start: now,
                    requests_at_start: 0,
                    retries: 0,
                    seen_at: now,
                    seen_requests: 0,
                }
            }),
        }
    }

    /// Counts requests and retries over windows of `window` (at least one
    /// second; default 10 s).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window.max(Duration::from_secs(1));
        self
    }
}

impl Default for RetryBudget {
    /// 20 % of requests plus 3 retries per second, over 10 s windows.
    fn default() -> Self {
        RetryBudget::new(0.2, 3)
    }
}

impl Budget for RetryBudget {
    #[inline]
    fn deposit(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn withdraw(&self) -> bool {
        // Read under the lock, so that `seen_at` and `seen_requests` never
        // go back: a count read before it by a withdrawal that took the lock
        // after a later one would count requests twice at the next window.
        let mut w = self.state.lock();
        let now = Instant::now();
        let requests = self.requests.load(Ordering::Relaxed);
        let start = w.start;
        let mut elapsed = now.saturating_duration_since(start);
        if elapsed >= self.window {
            // Start the window `now` falls in, aligned on the first one.
            let windows = elapsed.as_nanos() / self.window.as_nanos();
            let skip = self
                .window
                .saturating_mul(u32::try_from(windows).unwrap_or(u32::MAX));
            w.start = start + skip;
            elapsed = elapsed.saturating_sub(skip);
            // The requests since the last withdrawal came between then and
            // now; the share of that span inside the new window funds it.
            let unseen = requests.saturating_sub(w.seen_requests);
            let span = now.saturating_duration_since(w.seen_at).as_nanos();
            let in_new = (u128::from(unseen) * elapsed.as_nanos())
                .checked_div(span)
                .map_or(unseen, |share| {
                    u64::try_from(share).unwrap_or(unseen).min(unseen)
                });
            w.requests_at_start = requests - in_new;
            w.retries = 0;
        }
        w.seen_at = now;
        w.seen_requests = requests;
        let in_window = requests.saturating_sub(w.requests_at_start);
        // Whole seconds begun in this window, the current one included.
        let seconds = elapsed.as_secs() + 1;
        let allowed =
            self.ratio * in_window as f64 + f64::from(self.floor_per_sec) * seconds as f64;
        // A ratio such as 0.29 is held a hair under its value (0.29 × 100
        // is 28.999999999999996): a few units of rounding are its share.
        if (w.retries + 1) as f64 <= allowed * (1.0 + 4.0 * f64::EPSILON) {
            w.retries += 1;
            true
        } else {
            false
        }
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.ratio)
            .field("floor_per_sec", &self.floor_per_sec)
            .field("window", &self.window)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn floor_is_per_second_and_windows_reset() {
        let budget = RetryBudget::new(0.0, 3);
        for _ in 0..3 {
            assert!(budget.withdraw());
        }
        assert!(!budget.withdraw());
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..3 {
            assert!(budget.withdraw());
        }
        assert!(!budget.withdraw());
        // A new window: requests and retries of the last one are forgotten.
        budget.deposit();
        tokio::time::advance(Duration::from_secs(9)).await;
        let mut granted = 0;
        while budget.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 3);
    }

    /// A ratio that binary floating point holds a hair under its value
    /// (0.29 × 100 is 28.999999999999996) still grants its whole share.
    #[tokio::test(start_paused = true)]
    async fn a_ratio_grants_its_whole_share() {
        for (ratio, requests, floor, share) in [
            (0.29, 100, 0, 29),
            (0.57, 100, 0, 57),
            (0.58, 100, 3, 61),
            (0.2, 100, 0, 20),
            (0.1, 1_000, 0, 100),
        ] {
            let budget = RetryBudget::new(ratio, floor);
            for _ in 0..requests {
                budget.deposit();
            }
            let mut granted = 0;
            while budget.withdraw() {
                granted += 1;
            }
            assert_eq!(granted, share, "ratio {ratio}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_counts_the_requests_of_the_window() {
        let budget = RetryBudget::new(0.5, 0).window(Duration::from_secs(2));
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(budget.withdraw());
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!budget.withdraw(), "old requests do not count");
        budget.deposit();
        budget.deposit();
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_older_than_a_window_fund_no_retry() {
        let budget = RetryBudget::new(0.5, 0).window(Duration::from_secs(2));
        for _ in 0..1000 {
            budget.deposit();
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!budget.withdraw(), "a minute-old burst funds nothing now");
        budget.deposit();
        budget.deposit();
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_before_the_first_retry_of_a_window_funds_it() {
        let budget = RetryBudget::new(0.2, 0).window(Duration::from_secs(10));
        // Quiet until t = 10 s; 1000 requests at an even rate over the
        // next 9 s; then every backend fails.
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..9 {
            for _ in 0..111 {
                budget.deposit();
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let mut granted = 0;
        while budget.withdraw() {
            granted += 1;
        }
        // 999 requests over [0 s, 19 s] as far as the budget can tell, 9/19
        // of them in this window: 20 % of 473.
        assert_eq!(granted, 94);
        // Requests after the window's first withdrawal count in full.
        for _ in 0..100 {
            budget.deposit();
        }
        let mut more = 0;
        while budget.withdraw() {
            more += 1;
        }
        assert_eq!(more, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_rate_funds_each_window_with_its_own_requests() {
        let budget = RetryBudget::new(0.2, 0).window(Duration::from_secs(10));
        let half = Duration::from_millis(500);
        for window in 0..6 {
            // 100 requests at the start of each second of the window, and
            // every backend failing half a second before its end.
            for second in 0..10 {
                if second > 0 {
                    tokio::time::advance(Duration::from_secs(1)).await;
                }
                for _ in 0..100 {
                    budget.deposit();
                }
            }
            tokio::time::advance(half).await;
            let mut granted = 0;
            while budget.withdraw() {
                granted += 1;
            }
            // The first window knows its 1000 requests; later ones estimate
            // 95 % of them (9.5 s of the 10 s since the last withdrawal).
            let expected = if window == 0 { 200 } else { 190 };
            assert_eq!(granted, expected, "window {window}");
            tokio::time::advance(half).await;
        }
    }

    #[test]
    fn bad_ratios_count_as_zero() {
        let budget = RetryBudget::new(f64::NAN, 0);
        budget.deposit();
        assert!(!budget.withdraw());
        let budget = RetryBudget::new(-1.0, 0);
        budget.deposit();
        assert!(!budget.withdraw());
    }
}
