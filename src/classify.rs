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
//! request itself is bad (no other backend would take it either). A gRPC
//! call that failed before its first message answers `200 OK` with its
//! status in the head ([`Outcome::grpc_status`]); the default counts
//! `UNAVAILABLE` (14) there as a failure, as it counts a 503. Any closure
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

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
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

    /// The status of a gRPC call that ended in the response's head: a
    /// `200 OK` of a gRPC (or gRPC-Web) content type with a `grpc-status`
    /// field, as a server answers a call it fails before its first message
    /// ("Trailers-Only"). `None` for any other outcome, for a status that
    /// is not a decimal number below 2³², and for a call whose status comes in
    /// trailers after its messages, later than any classifier looks.
    ///
    /// ```
    /// use http::{HeaderMap, StatusCode};
    /// use tower_ha::classify::Outcome;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert("content-type", "application/grpc".parse().unwrap());
    /// headers.insert("grpc-status", "14".parse().unwrap());
    /// let outcome = Outcome::from_status(StatusCode::OK, &headers);
    /// assert_eq!(outcome.grpc_status(), Some(14));
    /// ```
    pub fn grpc_status(&self) -> Option<u32> {
        match self {
            Outcome::Response { status, headers } => grpc_status(*status, headers),
            Outcome::Error(_) => None,
        }
    }
}

/// The field a gRPC status is sent in.
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// gRPC's `UNAVAILABLE`.
pub(crate) const GRPC_UNAVAILABLE: u32 = 14;

/// gRPC's `DEADLINE_EXCEEDED` and `INTERNAL`.
pub(crate) const GRPC_DEADLINE_EXCEEDED: u32 = 4;
pub(crate) const GRPC_INTERNAL: u32 = 13;

/// See [`Outcome::grpc_status`].
fn grpc_status(status: StatusCode, headers: &HeaderMap) -> Option<u32> {
    // The content type first: a standard field, quicker to look up, which
    // most HTTP answers have and which stops there.
    if status != StatusCode::OK || grpc_subtype(headers).is_none() {
        return None;
    }
    parse_grpc_status(headers.get(GRPC_STATUS)?)
}

/// A `grpc-status` value: a decimal number below 2³², nothing else (no
/// sign, no space).
pub(crate) fn parse_grpc_status(value: &HeaderValue) -> Option<u32> {
    crate::key::decimal(value.as_bytes())
}

/// What follows `application/grpc` in `headers`' content type (`+proto`,
/// `-web`, nothing, ...), compared without regard to case; `None` when the
/// content type does not start so.
pub(crate) fn grpc_subtype(headers: &HeaderMap) -> Option<&[u8]> {
    grpc_subtype_of(headers.get(CONTENT_TYPE)?)
}

/// What follows `application/grpc` in the content type `value` (see
/// [`grpc_subtype`]).
pub(crate) fn grpc_subtype_of(value: &HeaderValue) -> Option<&[u8]> {
    crate::key::strip_prefix_ignore_case(value.as_bytes(), b"application/grpc")
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

/// Whether `classifier` counts `response` as a failure. A switch of
/// protocols (`101`) never is, whatever the classifier says: the backend's
/// connection carries the new protocol, and the client's is handed to it,
/// so no other backend may answer the request, and the backend did what
/// was asked of it.
pub(crate) fn response_fails<C: Classifier + ?Sized, B>(
    classifier: &C,
    response: &Response<B>,
) -> bool {
    response.status() != StatusCode::SWITCHING_PROTOCOLS
        && classifier.is_failure(&Outcome::response(response))
}

/// Words of the status bit set: one bit for each status from 100 to 999.
const STATUS_WORDS: usize = 900_usize.div_ceil(64);

/// Every error but [`InvalidRequest`] (anywhere in its chain of sources),
/// and the statuses 502, 503 and 504 (configurable), are failures;
/// everything else is a success.
///
/// A gRPC call answered in its head ([`Outcome::grpc_status`]) is judged by
/// its gRPC status instead: `UNAVAILABLE` (14), what a server shedding load
/// or shutting down answers, is a failure, and
/// [`grpc_status`](Self::grpc_status) adds others. Not by default
/// `DEADLINE_EXCEEDED` (4), though Envoy's outlier detection counts it as
/// a 504: it is most often the caller's own deadline running out, and a
/// client sending tiny deadlines would get healthy backends ejected.
#[derive(Debug, Clone)]
pub struct DefaultClassifier {
    /// Bit `s - 100` set for each failing status `s` (100 to 999).
    statuses: [u64; STATUS_WORDS],
    /// Bit `c` set for each failing gRPC status `c` (0 to 63).
    grpc: u64,
}

impl Default for DefaultClassifier {
    fn default() -> Self {
        DefaultClassifier::new()
    }
}

impl DefaultClassifier {
    /// Errors (but [`InvalidRequest`]), 502, 503 and 504, and a gRPC
    /// `UNAVAILABLE` in a response's head, are failures.
    pub fn new() -> Self {
        DefaultClassifier::errors_only()
            .status(StatusCode::BAD_GATEWAY)
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .status(StatusCode::GATEWAY_TIMEOUT)
            .grpc_status(GRPC_UNAVAILABLE)
    }

    /// Only errors (but [`InvalidRequest`]) are failures; no status is.
    pub fn errors_only() -> Self {
        DefaultClassifier {
            statuses: [0; STATUS_WORDS],
            grpc: 0,
        }
    }

    /// Also counts a gRPC call answered in its head with `code` (see
    /// [`Outcome::grpc_status`]) as a failure: 8 `RESOURCE_EXHAUSTED`, say.
    /// Codes from 64 up are not gRPC's, and count as nothing.
    ///
    /// Mind what a client can make a backend answer: gRPC servers also
    /// answer `RESOURCE_EXHAUSTED` to a message over their size limit, so
    /// a client sending those would get healthy backends ejected by a
    /// health layer that counts it. Give such a classifier to the failover
    /// layer only, and keep the health layer's default.
    pub fn grpc_status(mut self, code: u32) -> Self {
        if let Some(bit) = 1u64.checked_shl(code) {
            self.grpc |= bit;
        }
        self
    }

    /// Whether a gRPC call answered in its head with `code` counts as a
    /// failure.
    pub fn is_failure_grpc_status(&self, code: u32) -> bool {
        1u64.checked_shl(code)
            .is_some_and(|bit| self.grpc & bit != 0)
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
            Outcome::Response { status, headers } => match grpc_status(*status, headers) {
                Some(code) => self.is_failure_grpc_status(code),
                None => self.is_failure_status(*status),
            },
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

    fn grpc_head(content_type: &str, status: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, content_type.parse().unwrap());
        headers.insert(GRPC_STATUS, status.parse().unwrap());
        headers
    }

    #[test]
    fn of_grpc_statuses_in_the_head_only_unavailable_fails_by_default() {
        let fails = |c: &DefaultClassifier, code: u32| {
            let headers = grpc_head("application/grpc", &code.to_string());
            let outcome = Outcome::from_status(StatusCode::OK, &headers);
            assert_eq!(outcome.grpc_status(), Some(code));
            c.is_failure(&outcome)
        };
        let failing = |c: &DefaultClassifier| {
            (0..=70)
                .filter(|&code| fails(c, code))
                .collect::<Vec<u32>>()
        };
        assert_eq!(failing(&DefaultClassifier::new()), [14]);
        let c = DefaultClassifier::new()
            .grpc_status(8)
            .grpc_status(4)
            .grpc_status(64);
        assert_eq!(failing(&c), [4, 8, 14]);
        assert!(!c.is_failure_grpc_status(u32::MAX));
        assert_eq!(
            failing(&DefaultClassifier::errors_only()),
            Vec::<u32>::new()
        );
        // Judged by its gRPC status only: a 200 with code 0 is no failure
        // even where 200 would be one.
        let c = DefaultClassifier::errors_only().status(StatusCode::OK);
        assert!(!fails(&c, 0));
    }

    #[test]
    fn only_a_grpc_answer_in_its_head_has_a_grpc_status() {
        let status = |headers: &HeaderMap, http: StatusCode| {
            Outcome::from_status(http, headers).grpc_status()
        };
        for content_type in [
            "application/grpc",
            "Application/GRPC+proto",
            "application/grpc-web",
            "application/grpc-web-text+proto",
        ] {
            let headers = grpc_head(content_type, "14");
            assert_eq!(status(&headers, StatusCode::OK), Some(14), "{content_type}");
        }
        // Not a 200, not gRPC's content type, or no number: an HTTP answer,
        // judged by its own status.
        let headers = grpc_head("application/grpc", "14");
        assert_eq!(status(&headers, StatusCode::BAD_REQUEST), None);
        for content_type in ["application/json", "text/grpc", "application/grp"] {
            let headers = grpc_head(content_type, "14");
            assert_eq!(status(&headers, StatusCode::OK), None, "{content_type}");
            assert!(!DefaultClassifier::new()
                .is_failure(&Outcome::from_status(StatusCode::OK, &headers)));
        }
        let mut headers = grpc_head("application/grpc", "14");
        headers.remove(CONTENT_TYPE);
        assert_eq!(status(&headers, StatusCode::OK), None);
        for value in ["", "+14", "-1", "1 4", "14 ", "0x0e", "4294967296", "١٤"] {
            let mut headers = grpc_head("application/grpc", "0");
            headers.insert(
                GRPC_STATUS,
                http::HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            );
            assert_eq!(status(&headers, StatusCode::OK), None, "{value:?}");
        }
        let headers = grpc_head("application/grpc", "4294967295");
        assert_eq!(status(&headers, StatusCode::OK), Some(u32::MAX));
        let error: crate::BoxError = "boom".into();
        assert_eq!(Outcome::Error(&*error).grpc_status(), None);
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
