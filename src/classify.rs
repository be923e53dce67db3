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
//! status in the head ([`Outcome::grpc_status`]); the default judges it by
//! the HTTP status that gRPC status stands for, as Envoy's router does for
//! its outlier detection, so `UNAVAILABLE` (14) counts as a 503 and
//! `DEADLINE_EXCEEDED` (4) as a 504. Any closure
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

use http::header::{HeaderName, CONTENT_TYPE};
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
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// See [`Outcome::grpc_status`].
fn grpc_status(status: StatusCode, headers: &HeaderMap) -> Option<u32> {
    if status != StatusCode::OK {
        return None;
    }
    // Looked up first: an HTTP response has none, and stops there.
    let value = headers.get(GRPC_STATUS)?.as_bytes();
    if grpc_subtype(headers).is_none() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// What follows `application/grpc` in `headers`' content type (`+proto`,
/// `-web`, nothing, ...), compared without regard to case; `None` when the
/// content type does not start so.
pub(crate) fn grpc_subtype(headers: &HeaderMap) -> Option<&[u8]> {
    const GRPC: &[u8] = b"application/grpc";
    let value = headers.get(CONTENT_TYPE)?.as_bytes();
    let start = value.get(..GRPC.len())?;
    start
        .eq_ignore_ascii_case(GRPC)
        .then(|| &value[GRPC.len()..])
}

/// The HTTP status a gRPC status stands for, as Google's API design guide
/// maps them (and Envoy with it): 14 `UNAVAILABLE` is 503, 4
/// `DEADLINE_EXCEEDED` 504, 8 `RESOURCE_EXHAUSTED` 429, an unknown code 500.
fn grpc_to_http(code: u32) -> StatusCode {
    let status = match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        // 2 UNKNOWN, 13 INTERNAL, 15 DATA_LOSS, and codes gRPC has not
        // defined.
        _ => 500,
    };
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
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
///
/// A gRPC call answered in its head ([`Outcome::grpc_status`]) is judged by
/// the HTTP status its gRPC status stands for: `UNAVAILABLE` (14) as 503,
/// `DEADLINE_EXCEEDED` (4) as 504, `RESOURCE_EXHAUSTED` (8) as 429,
/// `UNIMPLEMENTED` (12) as 501, `UNKNOWN`, `INTERNAL` and `DATA_LOSS` as
/// 500, the codes of the caller's errors as 4xx, `OK` as 200. So by default
/// 14 and 4 are failures, and [`status`](Self::status) adds others (429
/// adds `RESOURCE_EXHAUSTED`).
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
            Outcome::Response { status, headers } => match grpc_status(*status, headers) {
                Some(code) => self.is_failure_status(grpc_to_http(code)),
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
    fn a_grpc_status_in_the_head_is_judged_by_the_http_status_it_stands_for() {
        let c = DefaultClassifier::new();
        let fails = |c: &DefaultClassifier, code: u32| {
            let headers = grpc_head("application/grpc", &code.to_string());
            let outcome = Outcome::from_status(StatusCode::OK, &headers);
            assert_eq!(outcome.grpc_status(), Some(code));
            c.is_failure(&outcome)
        };
        let failing: Vec<u32> = (0..=20).filter(|&code| fails(&c, code)).collect();
        // DEADLINE_EXCEEDED and UNAVAILABLE, as 504 and 503.
        assert_eq!(failing, [4, 14]);
        // 429 adds RESOURCE_EXHAUSTED; 500 adds UNKNOWN, INTERNAL,
        // DATA_LOSS and codes gRPC has not defined.
        let c = c.status(StatusCode::TOO_MANY_REQUESTS);
        assert!(fails(&c, 8));
        let c = DefaultClassifier::errors_only().status(StatusCode::INTERNAL_SERVER_ERROR);
        let failing: Vec<u32> = (0..=20).filter(|&code| fails(&c, code)).collect();
        assert_eq!(failing, [2, 13, 15, 17, 18, 19, 20]);
        assert!(fails(&c, u32::MAX));
    }

    #[test]
    fn every_grpc_code_maps_as_the_api_design_guide_says() {
        let expected = [
            200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401,
        ];
        for (code, status) in expected.into_iter().enumerate() {
            assert_eq!(grpc_to_http(code as u32).as_u16(), status, "{code}");
        }
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
