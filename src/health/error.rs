//! Why a probe failed.

use std::error::Error as StdError;
use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

use http::StatusCode;

use crate::backend::BackendId;

/// An HTTP probe got an answer with a status it does not expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnexpectedStatus {
    status: StatusCode,
}

impl UnexpectedStatus {
    pub(crate) fn new(status: StatusCode) -> Self {
        UnexpectedStatus { status }
    }

    /// The status the backend answered.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl fmt::Display for UnexpectedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unexpected health check status {}", self.status)
    }
}

impl StdError for UnexpectedStatus {}

/// A gRPC health check ([`GrpcProbe`](super::GrpcProbe)) whose call failed
/// or whose backend is not `SERVING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotServing {
    grpc_status: u32,
    serving_status: Option<u64>,
}

impl NotServing {
    pub(crate) fn new(grpc_status: u32, serving_status: Option<u64>) -> Self {
        NotServing {
            grpc_status,
            serving_status,
        }
    }

    /// The call's gRPC status: 0 when it succeeded and answered a status
    /// other than `SERVING`; 12 (`UNIMPLEMENTED`) from a server without the
    /// health service, 5 (`NOT_FOUND`) from one that does not know the
    /// service asked about.
    pub fn grpc_status(&self) -> u32 {
        self.grpc_status
    }

    /// The `ServingStatus` the backend answered, when the call succeeded:
    /// 0 `UNKNOWN`, 2 `NOT_SERVING`, 3 `SERVICE_UNKNOWN`.
    pub fn serving_status(&self) -> Option<u64> {
        self.serving_status
    }
}

impl fmt::Display for NotServing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.serving_status {
            Some(status) => {
                let name = match status {
                    0 => "UNKNOWN",
                    2 => "NOT_SERVING",
                    3 => "SERVICE_UNKNOWN",
                    _ => "a status gRPC does not define",
                };
                write!(f, "the gRPC health check answered {name} ({status})")
            }
            None => {
                const NAMES: [&str; 17] = [
                    "OK",
                    "CANCELLED",
                    "UNKNOWN",
                    "INVALID_ARGUMENT",
                    "DEADLINE_EXCEEDED",
                    "NOT_FOUND",
                    "ALREADY_EXISTS",
                    "PERMISSION_DENIED",
                    "RESOURCE_EXHAUSTED",
                    "FAILED_PRECONDITION",
                    "ABORTED",
                    "OUT_OF_RANGE",
                    "UNIMPLEMENTED",
                    "INTERNAL",
                    "UNAVAILABLE",
                    "DATA_LOSS",
                    "UNAUTHENTICATED",
                ];
                let code = self.grpc_status;
                let name = usize::try_from(code)
                    .ok()
                    .and_then(|i| NAMES.get(i))
                    .unwrap_or(&"a code gRPC does not define");
                write!(
                    f,
                    "the gRPC health check failed with grpc-status {code} ({name})"
                )
            }
        }
    }
}

impl StdError for NotServing {}

/// A probe did not finish within its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTimeout {
    after: Duration,
}

impl ProbeTimeout {
    pub(crate) fn new(after: Duration) -> Self {
        ProbeTimeout { after }
    }

    /// The timeout that elapsed.
    pub fn after(&self) -> Duration {
        self.after
    }
}

impl fmt::Display for ProbeTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "health check timed out after {:?}", self.after)
    }
}

impl StdError for ProbeTimeout {}

/// A TCP probe has no address for this backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoAddress {
    backend: BackendId,
}

impl NoAddress {
    pub(crate) fn new(backend: BackendId) -> Self {
        NoAddress { backend }
    }

    /// The backend without an address.
    pub fn backend(&self) -> &BackendId {
        &self.backend
    }
}

impl fmt::Display for NoAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no address to probe for backend {}", self.backend)
    }
}

impl StdError for NoAddress {}

/// The probe task panicked; counted as a failed probe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbePanicked {
    _priv: (),
}

impl fmt::Display for ProbePanicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("health check probe panicked")
    }
}

impl StdError for ProbePanicked {}

/// Why [`HttpProbe::try_expected_statuses`](super::HttpProbe::try_expected_statuses)
/// refused a list of statuses: alone, it would fail every probe and every
/// backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExpectedStatusesError {
    /// The list is empty.
    #[error("an HttpProbe needs at least one expected status")]
    Empty,
    /// A range holds no HTTP status: it is empty (`299..=200`) or lies
    /// outside `100..=999`.
    #[error("an expected status range holds no HTTP status: {0:?}")]
    NoStatus(RangeInclusive<u16>),
}
