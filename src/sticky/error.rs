//! The sticky layer's errors.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::BackendId;
use crate::store::StoreError;

/// In `strict` mode, a request's session is bound to a backend that cannot
/// serve it (unavailable, removed, or a lower layer served the request
/// elsewhere), or its record cannot be read from the store, and the session
/// is not moved.
///
/// Returned boxed; downcast it from [`BoxError`](crate::BoxError). When
/// the record could not be read, the store's error is its
/// [`source`](StdError::source).
#[derive(Debug, Clone)]
pub struct SessionUnavailable {
    key: String,
    backend: Option<BackendId>,
    /// The store's error, when the record could not be read (shared by the
    /// requests that waited for one load).
    unreadable: Option<Arc<StoreError>>,
}

impl SessionUnavailable {
    pub(crate) fn new(key: &str, backend: BackendId) -> Self {
        SessionUnavailable {
            key: key.to_owned(),
            backend: Some(backend),
            unreadable: None,
        }
    }

    /// The store could not be read for session `key`; `backend` is the one
    /// the request's cookie or this instance's table named, if any.
    pub(crate) fn unreadable(
        key: &str,
        backend: Option<BackendId>,
        error: Arc<StoreError>,
    ) -> Self {
        SessionUnavailable {
            key: key.to_owned(),
            backend,
            unreadable: Some(error),
        }
    }

    /// The session's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The backend the session is bound to. `None` only when the session's
    /// record could not be read and nothing else named a backend.
    pub fn backend(&self) -> Option<&BackendId> {
        self.backend.as_ref()
    }

    /// Whether the request was refused because the session's record could
    /// not be read from the store (the store error is counted in
    /// `stats().store_errors` and logged), rather than because its backend
    /// cannot serve it. The next request reads the store again.
    pub fn is_unreadable(&self) -> bool {
        self.unreadable.is_some()
    }
}

impl fmt::Display for SessionUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.backend, &self.unreadable) {
            (_, Some(_)) => f.write_str("the record of this session cannot be read from the store"),
            (Some(backend), None) => {
                write!(f, "the backend {backend} of this session is unavailable")
            }
            (None, None) => f.write_str("the backend of this session is unavailable"),
        }
    }
}

impl StdError for SessionUnavailable {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.unreadable
            .as_deref()
            .map(|error| error as &(dyn StdError + 'static))
    }
}

/// An `on_restore` hook ran longer than the layer's
/// [`restore_timeout`](super::StickyLayer::restore_timeout): it was dropped,
/// and the session's restore failed (its record is kept).
///
/// The error of a [`RestoreFailure`](super::RestoreFailure), and the one a
/// hydrating restore logs; downcast it from [`BoxError`](crate::BoxError).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreTimedOut {
    after: Duration,
}

impl RestoreTimedOut {
    pub(crate) fn new(after: Duration) -> Self {
        RestoreTimedOut { after }
    }

    /// The time limit that elapsed.
    pub fn after(&self) -> Duration {
        self.after
    }
}

impl fmt::Display for RestoreTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the on_restore hook timed out after {:?}", self.after)
    }
}

impl StdError for RestoreTimedOut {}

/// The error of a [`RestoreFailure`](super::RestoreFailure), and the one a
/// hydrating restore logs, when the `on_restore` hook panicked: that
/// session's restore failed and its record is kept, the others go on.
/// Downcast it from [`BoxError`](crate::BoxError).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestorePanicked {
    _priv: (),
}

impl fmt::Display for RestorePanicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the on_restore hook panicked")
    }
}

impl StdError for RestorePanicked {}

/// Why [`CookieInsert::try_new`](super::CookieInsert::try_new) refused its
/// settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CookieConfigError {
    /// The secret is shorter than 32 bytes.
    #[error("the sticky cookie secret must be at least {min} bytes, got {got}")]
    ShortSecret {
        /// The least length accepted.
        min: usize,
        /// The secret's length.
        got: usize,
    },
    /// The name is empty or holds separators, spaces or controls.
    #[error("invalid cookie name {0:?}")]
    InvalidName(String),
}
