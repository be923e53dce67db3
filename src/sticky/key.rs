//! What names a session: the layer's own cookie, an application's cookie, a
//! header, or a closure.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::header::{HeaderName, COOKIE};
use http::HeaderMap;

use super::cookie::{CookieInsert, Invalid};
use super::error::CookieConfigError;
use crate::key::{CookieName, RequestHead};

/// The longest session key accepted from a header, a cookie or a closure,
/// in bytes. Longer values are rejected as bad input.
pub const MAX_KEY_LEN: usize = 512;

/// The largest total size of a request's `Cookie` headers the layer reads,
/// in bytes (nginx's default header buffer). Larger ones are rejected as
/// bad input before any parsing.
pub const MAX_COOKIE_HEADER: usize = 8 * 1024;

/// How many more cookies of the layer's name are looked at when the first
/// is not one of its own: each costs a MAC.
const MORE_COOKIES: usize = 3;

type KeyFn = dyn Fn(&RequestHead<'_>) -> Option<String> + Send + Sync;

/// What names a session.
///
/// | constructor | the key is | a new session starts when |
/// |---|---|---|
/// | [`insert_cookie`](SessionKey::insert_cookie) | a random id in the layer's own signed cookie | a request has no valid cookie: the response sets one |
/// | [`learn_cookie`](SessionKey::learn_cookie) | an application cookie (`JSESSIONID`, `StickyStr`) | a response's `Set-Cookie` sets it |
/// | [`header`](SessionKey::header) | a header's value (`X-Session-Id`) | a request carries an unknown value, or a response one other than the request's |
/// | [`from_fn`](SessionKey::from_fn) | a closure's result (a kernel id in the path) | a request carries an unknown value |
///
/// The session's backend is the one that served the response that started
/// it (the [`ServedBy`](crate::extensions::ServedBy) extension).
#[derive(Clone)]
pub struct SessionKey {
    pub(crate) kind: Kind,
}

#[derive(Clone)]
pub(crate) enum Kind {
    // Boxed: a cookie's MAC keys are large, the other kinds small.
    Insert(Box<CookieInsert>),
    Learn(CookieName),
    Header(HeaderName),
    Fn(Arc<KeyFn>),
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Insert(c) => f.debug_tuple("InsertCookie").field(c).finish(),
            Kind::Learn(n) => f.debug_tuple("LearnCookie").field(n).finish(),
            Kind::Header(h) => f.debug_tuple("Header").field(h).finish(),
            Kind::Fn(_) => f.debug_tuple("FromFn").finish_non_exhaustive(),
        }
    }
}

impl SessionKey {
    /// The layer issues its own signed cookie (see [`CookieInsert`]).
    pub fn insert_cookie(cookie: CookieInsert) -> Self {
        SessionKey {
            kind: Kind::Insert(Box::new(cookie)),
        }
    }

    /// An application's own session cookie: the layer learns value →
    /// backend from the `Set-Cookie` of the response that sets it, and
    /// forgets the session when a response deletes the cookie (deleting its
    /// stored record only when the layer read or wrote that record). A
    /// deletion with a `Path` the request's path does not fall under (a
    /// legacy cookie of the same name cleared on its own path) is not of
    /// the cookie the request presented, and ends nothing.
    ///
    /// # Panics
    ///
    /// When no `Cookie` header could hold a pair named `name`: empty, with
    /// `=` or `;`, white space at either end, or a control character. For a
    /// name read at run time, [`try_learn_cookie`](Self::try_learn_cookie)
    /// returns an error instead.
    #[track_caller]
    pub fn learn_cookie(name: impl Into<String>) -> Self {
        match Self::try_learn_cookie(name) {
            Ok(key) => key,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`learn_cookie`](Self::learn_cookie) for a name read at run time: an
    /// error instead of a panic when no `Cookie` header could hold a pair
    /// named `name`.
    pub fn try_learn_cookie(name: impl Into<String>) -> Result<Self, CookieConfigError> {
        Ok(SessionKey {
            kind: Kind::Learn(CookieName::checked(name.into())?),
        })
    }

    /// A header's value (for example `X-Session-Id`), from the request, or
    /// from the response (a server that assigns ids): a response naming
    /// an id other than the request's (or when the request had none)
    /// starts that session on the backend that served it.
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name.
    pub fn header(name: impl TryInto<HeaderName, Error: fmt::Debug>) -> Self {
        SessionKey {
            kind: Kind::Header(name.try_into().expect("invalid header name")),
        }
    }

    /// Any key a closure reads from the request head; `None` means "no
    /// session".
    ///
    /// ```
    /// use tower_ha::sticky::SessionKey;
    ///
    /// // The kernel id in `/api/kernels/{id}/...`.
    /// let kernel = SessionKey::from_fn(|req| {
    ///     let id = req.uri.path().strip_prefix("/api/kernels/")?.split('/').next()?;
    ///     (!id.is_empty()).then(|| id.to_owned())
    /// });
    /// # let _ = kernel;
    /// ```
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<String> + Send + Sync + 'static,
    {
        SessionKey {
            kind: Kind::Fn(Arc::new(f)),
        }
    }

    pub(crate) fn cookie(&self) -> Option<&CookieInsert> {
        match &self.kind {
            Kind::Insert(c) => Some(c),
            _ => None,
        }
    }

    /// Reads the key from a request head.
    /// The values after the first of the layer's own cookie (for a key
    /// that inserts one), at most [`MORE_COOKIES`] of them: a client may
    /// send another cookie of the same name first (one a sibling domain
    /// or a longer path set).
    pub(crate) fn more_cookies<'a, 'r: 'a>(
        &'a self,
        head: &RequestHead<'r>,
    ) -> impl Iterator<Item = &'r [u8]> + 'a {
        let values = head.headers.get_all(COOKIE);
        let name = match &self.kind {
            Kind::Insert(cookie) => Some(cookie.cookie_name()),
            _ => None,
        };
        name.into_iter()
            .flat_map(move |name| name.all_in(&values))
            .skip(1)
            .take(MORE_COOKIES)
    }

    pub(crate) fn extract<'r>(&self, head: &RequestHead<'r>) -> Extracted<'r> {
        match &self.kind {
            Kind::Insert(cookie) => {
                let value = match read_cookie(head.headers, cookie.cookie_name()) {
                    Ok(Some(v)) => v,
                    Ok(None) => return Extracted::None,
                    Err(r) => return Extracted::Rejected(r),
                };
                Extracted::Cookie(value)
            }
            Kind::Learn(name) => match read_cookie(head.headers, name) {
                Ok(Some(v)) => text_key(v),
                Ok(None) => Extracted::None,
                Err(r) => Extracted::Rejected(r),
            },
            Kind::Header(name) => match head.headers.get(name) {
                Some(v) if !v.is_empty() => text_key(v.as_bytes()),
                _ => Extracted::None,
            },
            Kind::Fn(f) => match f(head) {
                Some(k) if k.is_empty() => Extracted::None,
                Some(k) if k.len() > MAX_KEY_LEN => Extracted::Rejected(Reject::TooLong),
                Some(k) => Extracted::Key(Cow::Owned(k)),
                None => Extracted::None,
            },
        }
    }
}

/// A request's session key, as read.
#[derive(Debug)]
pub(crate) enum Extracted<'r> {
    /// The request names no session.
    None,
    /// The request names a session in a way that is not accepted.
    Rejected(Reject),
    /// A key from a header, an application cookie or a closure.
    Key(Cow<'r, str>),
    /// The value of the layer's own cookie, not yet verified.
    Cookie(&'r [u8]),
}

/// Why a request's session key was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    /// The layer's cookie is not of the form it issues.
    Malformed,
    /// The layer's cookie carries a tag that does not verify: forged,
    /// tampered with, or signed with another secret.
    Signature,
    /// A key is not valid UTF-8.
    NotUtf8,
    /// A key is longer than [`MAX_KEY_LEN`].
    TooLong,
    /// The `Cookie` headers are larger than [`MAX_COOKIE_HEADER`].
    TooLarge,
    /// The layer's cookie is correctly signed but names a backend that is
    /// not in the pool, for a session neither the table nor the store
    /// knows.
    UnknownBackend,
    /// The session store cannot hold the key
    /// ([`StoreError::is_invalid_key`](crate::store::StoreError::is_invalid_key)),
    /// so no record of it can exist.
    StoreRefused,
}

impl From<Invalid> for Reject {
    fn from(invalid: Invalid) -> Self {
        match invalid {
            Invalid::Shape => Reject::Malformed,
            Invalid::Signature => Reject::Signature,
        }
    }
}

impl Reject {
    /// A short name for logs and metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::Signature => "bad_signature",
            Reject::NotUtf8 => "not_utf8",
            Reject::TooLong => "too_long",
            Reject::TooLarge => "cookie_header_too_large",
            Reject::UnknownBackend => "unknown_backend",
            Reject::StoreRefused => "store_refused_key",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cookie's value, rejecting oversized `Cookie` headers.
fn read_cookie<'h>(headers: &'h HeaderMap, name: &CookieName) -> Result<Option<&'h [u8]>, Reject> {
    // One pass over the `Cookie` headers, for the size check and the scan:
    // a header is scanned only while the total so far is within bounds,
    // and the total is checked to the end.
    let mut total = 0usize;
    let mut found = None;
    for value in headers.get_all(COOKIE) {
        total = total.saturating_add(value.len());
        if total > MAX_COOKIE_HEADER {
            return Err(Reject::TooLarge);
        }
        if found.is_none() {
            found = name.first_in_header(value.as_bytes());
        }
    }
    Ok(found)
}

fn text_key(bytes: &[u8]) -> Extracted<'_> {
    if bytes.len() > MAX_KEY_LEN {
        return Extracted::Rejected(Reject::TooLong);
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Extracted::Key(Cow::Borrowed(s)),
        Err(_) => Extracted::Rejected(Reject::NotUtf8),
    }
}

/// Checks a key learned from a response the way request keys are checked.
pub(crate) fn response_key(bytes: &[u8]) -> Option<&str> {
    if bytes.is_empty() || bytes.len() > MAX_KEY_LEN {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn try_learn_cookie_reports_what_learn_cookie_refuses() {
        for name in ["", " a", "a;b", "a=b", "a\tb"] {
            assert_eq!(
                SessionKey::try_learn_cookie(name).unwrap_err(),
                CookieConfigError::InvalidName(name.to_owned())
            );
        }
        assert!(SessionKey::try_learn_cookie("JSESSIONID").is_ok());
    }

    #[test]
    fn the_size_limit_counts_every_cookie_header() {
        let name = CookieName::new("srv");
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("a=1; srv=v; b=2"));
        assert_eq!(read_cookie(&headers, &name), Ok(Some(&b"v"[..])));
        let filler = |len| HeaderValue::try_from(format!("f={}", "x".repeat(len - 2))).unwrap();
        // Found in the first header, the total at the limit: read.
        headers.append(COOKIE, filler(MAX_COOKIE_HEADER - "a=1; srv=v; b=2".len()));
        assert_eq!(read_cookie(&headers, &name), Ok(Some(&b"v"[..])));
        // One byte more, in a later header: rejected all the same.
        headers.append(COOKIE, HeaderValue::from_static("g"));
        assert_eq!(read_cookie(&headers, &name), Err(Reject::TooLarge));
        // Found only in a later header.
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("a=1; srv=; b=2"));
        headers.append(COOKIE, HeaderValue::from_static("srv=w"));
        assert_eq!(read_cookie(&headers, &name), Ok(Some(&b"w"[..])));
        assert_eq!(read_cookie(&HeaderMap::new(), &name), Ok(None));
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// `Cookie` headers of any number and size: rejected as too large
        /// exactly when they add up to more than the limit, else the
        /// cookie's first value, wherever it is.
        #[test]
        fn cookie_headers_are_read_up_to_the_limit(
            sizes in proptest::collection::vec(0usize..5_000, 0..5),
            at in proptest::option::of(0usize..5),
            value in "[A-Za-z0-9\"é]{0,20}",
        ) {
            let name = CookieName::new("srv");
            let mut headers = HeaderMap::new();
            let mut total = 0;
            for (i, &size) in sizes.iter().enumerate() {
                let mut line = "f=x;".repeat(size / 4);
                if at == Some(i) {
                    line.push_str(&format!(" srv={value}"));
                }
                total += line.len();
                headers.append(COOKIE, HeaderValue::from_str(&line).unwrap());
            }
            let read = read_cookie(&headers, &name);
            if total > MAX_COOKIE_HEADER {
                proptest::prop_assert_eq!(read, Err(Reject::TooLarge));
            } else {
                proptest::prop_assert_eq!(read, Ok(crate::key::cookie_value(&headers, "srv")));
            }
        }

        /// A key of any bytes is taken as text, refused as too long past
        /// the limit, or refused as not UTF-8, and the same bytes learned
        /// from a response are taken exactly when a request's would be.
        #[test]
        fn keys_of_any_bytes_are_taken_or_refused(
            bytes in proptest::prop_oneof![
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
                (0usize..1_000, proptest::prelude::any::<u8>()).prop_map(|(n, b)| vec![b; n]),
                "\\PC{0,200}".prop_map(String::into_bytes),
            ],
        ) {
            match text_key(&bytes) {
                Extracted::Key(key) => {
                    proptest::prop_assert!(bytes.len() <= MAX_KEY_LEN);
                    proptest::prop_assert_eq!(key.as_bytes(), &bytes[..]);
                    proptest::prop_assert_eq!(
                        response_key(&bytes),
                        (!bytes.is_empty()).then_some(&*key)
                    );
                }
                Extracted::Rejected(Reject::TooLong) => {
                    proptest::prop_assert!(bytes.len() > MAX_KEY_LEN);
                    proptest::prop_assert_eq!(response_key(&bytes), None);
                }
                Extracted::Rejected(Reject::NotUtf8) => {
                    proptest::prop_assert!(std::str::from_utf8(&bytes).is_err());
                    proptest::prop_assert_eq!(response_key(&bytes), None);
                }
                other => proptest::prop_assert!(false, "{:?}", other),
            }
        }
    }
}
