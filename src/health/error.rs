//! Why a probe failed.

use std::error::Error as StdError;
use std::fmt;
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
