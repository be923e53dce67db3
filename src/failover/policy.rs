//! The pieces of the failover policy: the idempotency rule, what counts as
//! not sent, the per-request opt-in, the backoff between attempts and the
//! slot that learns which backend an attempt went to.

use std::time::Duration;

use http::Method;
use rand::Rng;

/// Whether `method` may be sent twice with the effect of once (RFC 9110,
/// section 9.2.2): `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT` and `DELETE`.
///
/// The failover layer retries such requests after any failure; any other
/// method only when the request is known not to have reached the backend,
/// or when the retry is opted in with [`RetryNonIdempotent`].
///
/// ```
/// use http::Method;
/// use tower_ha::failover::is_idempotent;
///
/// assert!(is_idempotent(&Method::PUT));
/// assert!(!is_idempotent(&Method::POST));
/// ```
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A request extension that lets the failover layer retry this request
/// after any failure, whatever its method: for a route whose `POST` (or
/// `PATCH`) you know to be safe to repeat.
///
/// ```
/// use tower_ha::failover::RetryNonIdempotent;
///
/// let request = http::Request::post("/jobs/42/cancel")
///     .extension(RetryNonIdempotent)
///     .body(())
///     .unwrap();
/// assert!(request.extensions().get::<RetryNonIdempotent>().is_some());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RetryNonIdempotent;

/// A pause before the next attempt, with jitter.
///
/// The default is no pause: the next attempt goes to another backend, which
/// has no reason to be as overloaded as the one that just failed. A backoff
/// helps when the whole fleet shares a bottleneck (a database behind every
/// backend).
///
/// The pause before retry `n` (1 for the first retry) is drawn uniformly in
/// `[d / 2, d]` with `d = min(max, base * 2^(n - 1))` ("equal jitter").
///
/// ```
/// use std::time::Duration;
/// use tower_ha::failover::Backoff;
///
/// let backoff = Backoff::exponential(Duration::from_millis(10), Duration::from_millis(100));
/// let pause = backoff.delay(3); // d = 40 ms
/// assert!(pause >= Duration::from_millis(20) && pause <= Duration::from_millis(40));
/// assert!(backoff.delay(10) <= Duration::from_millis(100));
/// assert_eq!(Backoff::none().delay(1), Duration::ZERO);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// No pause between attempts (the default).
    pub fn none() -> Self {
        Backoff::default()
    }

    /// A pause doubling from `base` up to `max`, with equal jitter.
    pub fn exponential(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
        }
    }

    /// A pause of about `delay` (between half of it and all of it) before
    /// every retry.
    pub fn constant(delay: Duration) -> Self {
        Backoff {
            base: delay,
            max: delay,
        }
    }

    /// Whether this backoff never pauses.
    pub fn is_none(&self) -> bool {
        self.max.is_zero()
    }

    /// The pause before retry `retry` (1 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        if self.is_none() {
            return Duration::ZERO;
        }
        // Doubling saturates at `max`, however many retries came before.
        let ceiling = match 1u32.checked_shl(retry.saturating_sub(1)) {
            Some(factor) => self.base.saturating_mul(factor).min(self.max),
            None if self.base.is_zero() => Duration::ZERO,
            None => self.max,
        };
        let floor = ceiling / 2;
        let spread = crate::time::nanos(ceiling - floor);
        let jitter = if spread == 0 {
            0
        } else {
            rand::rng().random_range(0..=spread)
        };
        floor + Duration::from_nanos(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(
                is_idempotent(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
        for m in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(
                !is_idempotent(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let b = Backoff::exponential(Duration::from_millis(8), Duration::from_millis(50));
        for _ in 0..100 {
            let d1 = b.delay(1);
            assert!(d1 >= Duration::from_millis(4) && d1 <= Duration::from_millis(8));
            let d3 = b.delay(3);
            assert!(d3 >= Duration::from_millis(16) && d3 <= Duration::from_millis(32));
            let d9 = b.delay(9);
            assert!(d9 >= Duration::from_millis(25) && d9 <= Duration::from_millis(50));
        }
        assert!(b.delay(u32::MAX) <= Duration::from_millis(50));
        // Doubling goes on to `max` past the 32nd retry too.
        let tiny = Backoff::exponential(Duration::from_nanos(1), Duration::from_secs(10));
        for retry in [33, 40, 64, u32::MAX] {
            assert!(tiny.delay(retry) >= Duration::from_secs(5), "{retry}");
        }
        let zero = Backoff::exponential(Duration::ZERO, Duration::from_secs(1));
        assert_eq!(zero.delay(40), Duration::ZERO);
        assert!(Backoff::none().is_none());
        assert_eq!(Backoff::none().delay(5), Duration::ZERO);
    }
}
