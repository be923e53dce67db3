//! Errors returned by the balancer, shared by every layer.
//!
//! Middleware errors are small public structs. Services return them boxed as
//! [`BoxError`]; use [`BoxError::downcast_ref`](std::error::Error) (or
//! [`find`]) to tell them apart. Causes are kept as sources, never flattened
//! into strings.

use std::error::Error as StdError;
use std::fmt;

use crate::backend::BackendId;

/// The boxed error type of tower middleware.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// No backend may take this request: the pool is empty, every backend is
/// unavailable, or every available one was already tried.
///
/// Returned at once, never after waiting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoBackend {
    _priv: (),
}

impl NoBackend {
    pub(crate) fn new() -> Self {
        NoBackend { _priv: () }
    }
}

impl fmt::Display for NoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no available backend")
    }
}

impl StdError for NoBackend {}

/// A backend failed a request: carries the backend's id and its error.
#[derive(Debug)]
pub struct BackendError {
    id: BackendId,
    not_sent: bool,
    source: BoxError,
}

impl BackendError {
    /// Wraps `source`, the error of backend `id`.
    pub fn new(id: BackendId, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        let not_sent = find::<NotSent>(&*source).is_some();
        BackendError {
            id,
            not_sent,
            source,
        }
    }

    /// Wraps an error that happened before the request left (the backend
    /// did not become ready).
    pub(crate) fn not_sent(id: BackendId, source: BoxError) -> Self {
        BackendError {
            id,
            not_sent: true,
            source,
        }
    }

    /// The backend that failed.
    pub fn backend(&self) -> &BackendId {
        &self.id
    }

    /// Whether the request is known not to have reached the backend: it
    /// failed while the backend became ready, or the backend said so with
    /// [`NotSent`]. Such a request is safe to retry whatever its method.
    pub fn is_not_sent(&self) -> bool {
        self.not_sent
    }

    /// The backend's error.
    pub fn inner(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }

    /// The backend's error, owned.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend {} failed", self.id)?;
        if self.not_sent {
            f.write_str(" before the request was sent")?;
        }
        Ok(())
    }
}

impl StdError for BackendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// A backend's error for a request that is known not to have reached it
/// (for example a refused connection). Backend services return it (boxed)
/// so that the failover layer may retry even a non-idempotent request.
#[derive(Debug)]
pub struct NotSent {
    source: BoxError,
}

impl NotSent {
    /// Marks `source` as having happened before the request was sent.
    pub fn new(source: impl Into<BoxError>) -> Self {
        NotSent {
            source: source.into(),
        }
    }

    /// The underlying error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request not sent")
    }
}

impl StdError for NotSent {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// Finds the first error of type `E` in `err`'s chain of sources,
/// starting with `err` itself.
///
/// ```
/// use tower_ha::error::{find, BackendError, NotSent};
///
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// let err = BackendError::new("a".into(), NotSent::new(refused));
/// assert!(err.is_not_sent());
/// assert!(find::<std::io::Error>(&err).is_some());
/// ```
pub fn find<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}
