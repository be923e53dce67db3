use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use crate::error::BoxError;

/// The error of every [`SessionStore`](super::SessionStore): one opaque type
/// that keeps its cause and answers what kind of failure it was.
///
/// ```
/// use tower_ha::store::StoreError;
///
/// let err = StoreError::unavailable(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
/// assert!(err.is_unavailable());
/// assert!(!err.is_corrupt());
/// assert!(std::error::Error::source(&err).is_some());
/// ```
///
/// A clone shares its original's cause: those who waited on one write
/// together each get the whole error.
#[derive(Clone)]
pub struct StoreError {
    kind: Kind,
    message: Option<String>,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NotFound,
    Unavailable,
    Timeout,
    Corrupt,
    Unauthorized,
    InvalidKey,
    Rejected,
    Io,
    Other,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::NotFound => "not found",
            Kind::Unavailable => "store unavailable",
            Kind::Timeout => "store timed out",
            Kind::Corrupt => "corrupt record",
            Kind::Unauthorized => "unauthorized",
            Kind::InvalidKey => "invalid session key",
            Kind::Rejected => "request rejected by the store",
            Kind::Io => "i/o error",
            Kind::Other => "store error",
        }
    }
}

macro_rules! constructors {
    ($($(#[$doc:meta])* $name:ident => $kind:ident, $is:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(source: impl Into<BoxError>) -> Self {
                StoreError { kind: Kind::$kind, message: None, source: Some(Arc::from(source.into())) }
            }

            #[doc = concat!("Whether this is a `", stringify!($name), "` error.")]
            pub fn $is(&self) -> bool {
                self.kind == Kind::$kind
            }
        )*
    };
}

impl StoreError {
    constructors! {
        /// Something the store was asked for does not exist (a missing
        /// endpoint, a missing directory).
        not_found => NotFound, is_not_found;
        /// The store cannot be reached (connection refused or reset, 5xx);
        /// retrying later may work.
        unavailable => Unavailable, is_unavailable;
        /// The store did not answer in time.
        timeout => Timeout, is_timeout;
        /// A stored record cannot be read (truncated, not JSON, wrong shape).
        corrupt => Corrupt, is_corrupt;
        /// The store refused the credentials.
        unauthorized => Unauthorized, is_unauthorized;
        /// The session key cannot be stored: `""`, `.` or `..` where keys
        /// name paths, or longer than the store's limit.
        invalid_key => InvalidKey, is_invalid_key;
        /// The store refused the request (an unexpected 4xx).
        rejected => Rejected, is_rejected;
        /// A local i/o error.
        io => Io, is_io;
        /// Any other failure.
        other => Other, is_other;
    }

    /// Adds a human-readable detail shown before the cause.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, Kind::Unavailable | Kind::Timeout)
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("StoreError");
        d.field("kind", &self.kind);
        if let Some(m) = &self.message {
            d.field("message", m);
        }
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.describe())?;
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        Ok(())
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}
