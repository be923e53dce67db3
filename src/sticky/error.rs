//! The sticky layer's errors.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::BackendId;
use crate::store::StoreError;

use super::shared::Shown;

/// In `strict` mode, a request's session is bound to a backend that cannot
/// serve it (unavailable, removed, or a lower layer served the request
/// elsewhere), or its record cannot be read from the store, and the session
/// is not moved.
///
/// Returned boxed; downcast it from [`BoxError`](crate::BoxError). Its
/// [`source`](StdError::source) is the store's error when the record could
/// not be read, and the backend's when its backend failed the request
/// before it was sent (a refused connection, say). Its `Debug` output shows
/// a learned cookie's value (the application's credential) as a digest, as
/// the layer's logs do; [`key`](Self::key) gives it whole. (A store's error
/// as its source may name the key: the layer's logs replace it with the
/// digest, a report of this error you log yourself does not.)
#[derive(Clone)]
pub struct SessionUnavailable {
    key: String,
    /// Whether the key is a learned cookie's value, shown as a digest.
    hidden: bool,
    backend: Option<BackendId>,
    cause: Option<Cause>,
}

/// Why a [`SessionUnavailable`]'s backend could not serve its request.
#[derive(Clone)]
enum Cause {
    /// The store's error, when the record could not be read (shared by the
    /// requests that waited for one load).
    Unreadable(Arc<StoreError>),
    /// The error with which the session's backend failed the request.
    Failed(Arc<dyn StdError + Send + Sync>),
}

impl SessionUnavailable {
    pub(crate) fn new(key: &str, hidden: bool, backend: BackendId) -> Self {
        SessionUnavailable {
            key: key.to_owned(),
            hidden,
            backend: Some(backend),
            cause: None,
        }
    }

    /// The session's backend failed its request with `error`.
    pub(crate) fn failed(mut self, error: crate::BoxError) -> Self {
        self.cause = Some(Cause::Failed(Arc::from(error)));
        self
    }

    /// The store could not be read for session `key`; `backend` is the one
    /// the request's cookie or this instance's table named, if any.
    pub(crate) fn unreadable(
        key: &str,
        hidden: bool,
        backend: Option<BackendId>,
        error: Arc<StoreError>,
    ) -> Self {
        SessionUnavailable {
            key: key.to_owned(),
            hidden,
            backend,
            cause: Some(Cause::Unreadable(error)),
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
        matches!(self.cause, Some(Cause::Unreadable(_)))
    }
}

impl fmt::Debug for SessionUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source: Option<&dyn fmt::Debug> = match &self.cause {
            Some(Cause::Unreadable(error)) => Some(error),
            Some(Cause::Failed(error)) => Some(error),
            None => None,
        };
        f.debug_struct("SessionUnavailable")
            .field(
                "key",
                &format_args!("{}", Shown::new(&self.key, self.hidden)),
            )
            .field("backend", &self.backend)
            .field("unreadable", &self.is_unreadable())
            .field("source", &source)
            .finish()
    }
}

impl fmt::Display for SessionUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.backend, &self.cause) {
            (_, Some(Cause::Unreadable(_))) => {
                f.write_str("the record of this session cannot be read from the store")
            }
            (Some(backend), _) => {
                write!(f, "the backend {backend} of this session is unavailable")
            }
            (None, _) => f.write_str("the backend of this session is unavailable"),
        }
    }
}

impl StdError for SessionUnavailable {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self.cause.as_ref()? {
            Cause::Unreadable(error) => Some(&**error),
            Cause::Failed(error) => Some(&**error),
        }
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

/// Why a cookie's settings were refused: by
/// [`CookieInsert::try_new`](super::CookieInsert::try_new) and the other
/// `try_` methods of [`CookieInsert`](super::CookieInsert),
/// [`SessionKey::try_learn_cookie`](super::SessionKey::try_learn_cookie),
/// [`try_hash_cookie`](super::try_hash_cookie) and
/// [`key::try_cookie`](crate::key::try_cookie).
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
    /// The name is empty or holds separators, spaces or controls (the
    /// layer's own cookie), or no `Cookie` header could hold a pair of that
    /// name (a cookie only read: empty, with `=` or `;`, white space at
    /// either end, or a control character).
    #[error("invalid cookie name {0:?}")]
    InvalidName(String),
    /// The path does not start with `/`, or holds `;` or a control
    /// character.
    #[error("invalid cookie path {0:?}")]
    InvalidPath(String),
    /// A path other than `/` for a name with the `__Host-` prefix, which
    /// browsers drop on any other path.
    #[error("a __Host- cookie must have the path /, not {0:?}")]
    HostPrefixPath(String),
    /// `Secure` turned off for a name with the `__Secure-` or `__Host-`
    /// prefix (the name), which browsers drop without `Secure`.
    #[error(
        "the cookie {0:?} must be Secure: browsers drop a __Secure- or __Host- cookie without it"
    )]
    PrefixNotSecure(String),
    /// `SameSite=None` without `Secure` (the cookie's name), which
    /// browsers drop.
    #[error("the cookie {0:?} must be Secure with SameSite=None: browsers drop it without")]
    SameSiteNoneNotSecure(String),
}
