use std::time::Duration;

/// Slow start: a new or recovered backend's effective weight ramps linearly
/// from a minimum share (default 10 %) to its full weight over a window
/// (Envoy's `slow_start_config`, HAProxy's `slowstart`).
///
/// The [`HealthChecker`](super::HealthChecker) applies it through
/// [`BackendState::set_weight_permille`](crate::BackendState::set_weight_permille).
/// Strategies that use weights honour it: [`LeastRequest`] compares loads by
/// effective weight, and [`WeightedRoundRobin`] admits a warming backend to
/// its slot with probability equal to its share. [`RoundRobin`] and
/// [`Random`] ignore weights, and so slow start. [`ConsistentHash`] honours
/// configured weights (ring points, Maglev turns) but not slow start: its
/// tables are built from the configured weight, so a warming backend takes
/// its full share of keys at once.
///
/// [`LeastRequest`]: crate::balance::LeastRequest
/// [`WeightedRoundRobin`]: crate::balance::WeightedRoundRobin
/// [`RoundRobin`]: crate::balance::RoundRobin
/// [`Random`]: crate::balance::Random
/// [`ConsistentHash`]: crate::balance::ConsistentHash
///
/// ```
/// use std::time::Duration;
/// use tower_ha::health::SlowStart;
///
/// let ramp = SlowStart::new(Duration::from_secs(60));
/// assert_eq!(ramp.permille_at(Duration::ZERO), 100);
/// assert_eq!(ramp.permille_at(Duration::from_secs(30)), 550);
/// assert_eq!(ramp.permille_at(Duration::from_secs(60)), 1000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowStart {
    window: Duration,
    min_permille: u32,
}

impl SlowStart {
    /// Ramps over `window`, from 10 % of the weight.
    pub fn new(window: Duration) -> Self {
        SlowStart {
            window,
            min_permille: 100,
        }
    }

    /// Starts the ramp at `share` (`0.0..=1.0`) of the weight instead of
    /// 10 % (clamped; at least 0.1 %).
    #[must_use]
    pub fn min_weight(mut self, share: f64) -> Self {
        self.min_permille = crate::balance::share_to_permille(share).max(1);
        self
    }

    /// The ramp's length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The share of the weight, in thousandths, `elapsed` into the ramp.
    pub fn permille_at(&self, elapsed: Duration) -> u32 {
        if elapsed >= self.window {
            return 1000;
        }
        let span = u128::from(1000 - self.min_permille);
        let ramp = span * elapsed.as_nanos() / self.window.as_nanos();
        self.min_permille + ramp as u32
    }
}
