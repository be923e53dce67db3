//! Deciding whether one attempt failed, shared by the failover layer (to try
//! another backend) and the health layer (to count consecutive failures).
//!
//! A [`Classifier`] sees an attempt's [`Outcome`] (a response's status and
//! headers, or an error) and answers whether it counts as a failure. It does
//! not decide whether a failed request may be retried: that depends on the
//! method and on whether the request reached the backend, which the failover
//! layer judges on its own.
//!
//! The default, [`DefaultClassifier`], counts every error (connection
//! errors, timeouts, no backend) and the statuses 502, 503 and 504 as
//! failures; everything else is a success, and so is an
//! [`InvalidRequest`], a request the backend refused to send because the
//! request itself is bad (no other backend would take it either). Any closure
//! `Fn(&Outcome<'_>) -> bool` is a classifier too:
//!
//! ```
//! use http::StatusCode;
//! use tower_ha::classify::{Classifier, DefaultClassifier, Outcome};
//!
//! let default = DefaultClassifier::new();
//! let headers = http::HeaderMap::new();
//! let unavailable = Outcome::from_status(StatusCode::SERVICE_UNAVAILABLE, &headers);
//! assert!(default.is_failure(&unavailable));
//!
//! // Also treat 429 as a failure.
//! let with_429 = DefaultClassifier::new().status(StatusCode::TOO_MANY_REQUESTS);
//! let busy = Outcome::from_status(StatusCode::TOO_MANY_REQUESTS, &headers);
//! assert!(with_429.is_failure(&busy));
//!
//! // Or decide with a closure: only errors, never a status.
//! let errors_only = |outcome: &Outcome<'_>| matches!(outcome, Outcome::Error(_));
//! assert!(!errors_only.is_failure(&unavailable));
//! ```

use std::error::Error as StdError;

use http::{HeaderMap, Response, StatusCode};

use crate::error::{find, InvalidRequest};

/// The outcome of one attempt, as a classifier sees it.
///
/// More kinds of outcome, and more fields of a response, may come: match
/// with `..` and a catch-all arm, and build one with
/// [`from_status`](Outcome::from_status) or [`response`](Outcome::response).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Outcome<'a> {
    /// The backend answered.
    #[non_exhaustive]
    Response {
        /// The response's status.
        status: StatusCode,
        /// The response's headers.
        headers: &'a HeaderMap,
    },
    /// The attempt failed with an error (a connection error, a timeout, no
    /// backend, ...).
    Error(&'a (dyn StdError + Send + Sync + 'static)),
}

impl<'a> Outcome<'a> {
    /// The outcome of a response with `status` and `headers`.
    pub fn from_status(status: StatusCode, headers: &'a HeaderMap) -> Self {
        Outcome::Response { status, headers }
    }

    /// The outcome of a response.
    pub fn response<B>(response: &'a Response<B>) -> Self {
        Outcome::Response {
            status: response.status(),
            headers: response.headers(),
        }
    }

    /// The outcome of a result.
    pub fn of<B>(result: &'a Result<Response<B>, crate::BoxError>) -> Self {
        match result {
            Ok(response) => Outcome::response(response),
            Err(e) => Outcome::Error(&**e),
        }
    }

    /// The status, when the backend answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Outcome::Response { status, .. } => Some(*status),
            Outcome::Error(_) => None,
        }
    }
}

/// Decides whether an attempt's outcome counts as a failure.
pub trait Classifier: Send + Sync + 'static {
    /// Whether `outcome` is a failure.
    fn is_failure(&self, outcome: &Outcome<'_>) -> bool;
}

impl<F> Classifier for F
where
    F: Fn(&Outcome<'_>) -> bool + Send + Sync + 'static,
{
    fn is_failure(&self, outcome: &Outcome<'_>) -> bool {
        self(outcome)
    }
}

/// Words of the status bit set: one bit for each status from 100 to 999.
const STATUS_WORDS: usize = 900_usize.div_ceil(64);

/// Every error but [`InvalidRequest`] (anywhere in its chain of sources),
/// and the statuses 502, 503 and 504 (configurable), are failures;
/// everything else is a success.
#[derive(Debug, Clone)]
pub struct DefaultClassifier {
    /// Bit `s - 100` set for each failing status `s` (100 to 999).
    statuses: [u64; STATUS_WORDS],
}

impl Default for DefaultClassifier {
    fn default() -> Self {
        DefaultClassifier::new()
    }
}

impl DefaultClassifier {
    /// Errors (but [`InvalidRequest`]), 502, 503 and 504 are failures.
    pub fn new() -> Self {
        DefaultClassifier {
            statuses: [0; STATUS_WORDS],
        }
        .status(StatusCode::BAD_GATEWAY)
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .status(StatusCode::GATEWAY_TIMEOUT)
    }

    /// Only errors (but [`InvalidRequest`]) are failures; no status is.
    pub fn errors_only() -> Self {
        DefaultClassifier {
            statuses: [0; STATUS_WORDS],
        }
    }

    /// Also counts `status` as a failure.
    pub fn status(mut self, status: StatusCode) -> Self {
        let bit = usize::from(status.as_u16() - 100);
        self.statuses[bit / 64] |= 1 << (bit % 64);
        self
    }

    /// Whether `status` counts as a failure.
    pub fn is_failure_status(&self, status: StatusCode) -> bool {
        let bit = usize::from(status.as_u16() - 100);
        self.statuses[bit / 64] & (1 << (bit % 64)) != 0
    }
}

impl Classifier for DefaultClassifier {
    #[inline]
    fn is_failure(&self, outcome: &Outcome<'_>) -> bool {
        match outcome {
            Outcome::Response { status, .. } => self.is_failure_status(*status),
            // The request's fault, not the backend's.
            Outcome::Error(e) => find::<InvalidRequest>(*e).is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_statuses() {
        let c = DefaultClassifier::new();
        for s in [502, 503, 504] {
            assert!(c.is_failure_status(StatusCode::from_u16(s).unwrap()));
        }
        for s in [100, 200, 404, 500, 501, 599] {
            assert!(
                !c.is_failure_status(StatusCode::from_u16(s).unwrap()),
                "{s}"
            );
        }
        let c = DefaultClassifier::errors_only().status(StatusCode::from_u16(599).unwrap());
        assert!(c.is_failure_status(StatusCode::from_u16(599).unwrap()));
        assert!(!c.is_failure_status(StatusCode::from_u16(503).unwrap()));
    }

    #[test]
    fn every_status_from_100_to_999_is_classified() {
        let c = DefaultClassifier::new();
        for s in 100..=999 {
            let status = StatusCode::from_u16(s).unwrap();
            assert_eq!(c.is_failure_status(status), matches!(s, 502..=504), "{s}");
            assert!(c.clone().status(status).is_failure_status(status), "{s}");
        }
    }

    #[test]
    fn errors_are_failures() {
        let err: crate::BoxError = "boom".into();
        assert!(DefaultClassifier::new().is_failure(&Outcome::Error(&*err)));
    }

    #[test]
    fn an_invalid_request_is_no_failure() {
        use crate::error::{BackendError, NotSent};
        let c = DefaultClassifier::errors_only();
        let bare: crate::BoxError = Box::new(InvalidRequest::new("bad path"));
        assert!(!c.is_failure(&Outcome::Error(&*bare)));
        let wrapped: crate::BoxError = Box::new(BackendError::new(
            "a".into(),
            NotSent::new(InvalidRequest::new("bad path")),
        ));
        assert!(!c.is_failure(&Outcome::Error(&*wrapped)));
    }
}
