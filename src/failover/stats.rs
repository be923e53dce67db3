//! Counters of what the failover layer did.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A snapshot of a failover layer's counters, since the layer was built.
///
/// Every service a layer builds (and every clone of the layer) counts into
/// the same counters. Only failures are counted: a request whose first
/// attempt succeeds touches none of them (the backends' own counts, in
/// [`BackendStats`](crate::control::BackendStats), count every request).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FailoverStats {
    /// Retries made: attempts on another backend after a failed one, for
    /// which a backend was picked (one
    /// [`Event::FailoverAttempt`](crate::control::Event::FailoverAttempt)
    /// each).
    pub retries: u64,
    /// Requests that succeeded on a retry.
    pub recovered: u64,
    /// Requests that ended failed after at least one attempt failed on a
    /// backend it could name (an [`Exhausted`](super::Exhausted) error
    /// listing it, or the last failed response), whatever stopped the
    /// retries: no backend left to try, the attempt limit, the budget, the
    /// idempotency rule, a body that cannot be replayed, the deadline, an
    /// error of the request's own that is no failure (one
    /// [`Event::AttemptsExhausted`](crate::control::Event::AttemptsExhausted)
    /// each).
    pub exhausted: u64,
    /// Requests denied a retry by the [budget](super::FailoverLayer::budget).
    pub budget_refusals: u64,
    /// Failures not retried because the request's method is not idempotent
    /// and the request may have reached its backend (see
    /// [`retry_non_idempotent`](super::FailoverLayer::retry_non_idempotent)).
    pub unsafe_to_retry: u64,
    /// Failures not retried because the request's body could not be
    /// replayed (larger than the buffer, or already consumed).
    pub unreplayable: u64,
    /// Attempts abandoned at the
    /// [per-try timeout](super::FailoverLayer::per_try_timeout).
    pub per_try_timeouts: u64,
    /// Requests that ran out of their overall
    /// [deadline](super::FailoverLayer::deadline), or of a gRPC client's
    /// shorter one ([`grpc_timeout`](super::FailoverLayer::grpc_timeout)).
    pub deadlines_exceeded: u64,
}

/// The live counters behind [`FailoverStats`], shared by a layer's
/// services.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) retries: AtomicU64,
    pub(crate) recovered: AtomicU64,
    pub(crate) exhausted: AtomicU64,
    pub(crate) budget_refusals: AtomicU64,
    pub(crate) unsafe_to_retry: AtomicU64,
    pub(crate) unreplayable: AtomicU64,
    pub(crate) per_try_timeouts: AtomicU64,
    pub(crate) deadlines_exceeded: AtomicU64,
    /// Which counters these are: another layer's start from zero.
    pub(crate) serial: crate::serial::Serial,
}

/// Counts one more.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> FailoverStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FailoverStats {
            retries: get(&self.retries),
            recovered: get(&self.recovered),
            exhausted: get(&self.exhausted),
            budget_refusals: get(&self.budget_refusals),
            unsafe_to_retry: get(&self.unsafe_to_retry),
            unreplayable: get(&self.unreplayable),
            per_try_timeouts: get(&self.per_try_timeouts),
            deadlines_exceeded: get(&self.deadlines_exceeded),
        }
    }
}
