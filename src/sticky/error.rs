//! The sticky layer's error.

use std::error::Error as StdError;
use std::fmt;

use crate::backend::BackendId;

/// In `strict` mode, a request's session is bound to a backend that cannot
/// serve it (unavailable, removed, or a lower layer served the
/// request elsewhere), and the session is not moved.
///
/// Returned boxed; downcast it from [`BoxError`](crate::BoxError).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionUnavailable {
    key: String,
    backend: BackendId,
}

impl SessionUnavailable {
    pub(crate) fn new(key: &str, backend: BackendId) -> Self {
        SessionUnavailable {
            key: key.to_owned(),
            backend,
        }
    }

    /// The session's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The backend the session is bound to.
    pub fn backend(&self) -> &BackendId {
        &self.backend
    }
}

impl fmt::Display for SessionUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the backend {} of this session is unavailable",
            self.backend
        )
    }
}

impl StdError for SessionUnavailable {}
