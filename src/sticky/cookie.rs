//! The signed affinity cookie the layer issues, and `Set-Cookie` parsing for
//! the cookies it learns.
//!
//! An issued cookie's value is `<session>.<backend>.<tag>`:
//!
//! * `session`: 16 random bytes, base64url without padding (22 characters);
//!   the session's key in the table and in the store;
//! * `backend`: the id of the backend that serves the session, base64url;
//! * `tag`: the first 16 bytes of HMAC-SHA256, keyed with the secret, over
//!   `"tower-ha sticky v1\0" name "\0" session "\0" backend_id` (the
//!   session as it appears in the cookie, the backend id's own bytes, not
//!   their base64url), base64url (22 characters).

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use http::header::{CACHE_CONTROL, SET_COOKIE};
use http::{HeaderMap, HeaderValue};
use rand::RngCore;
use sha2::Sha256;

use super::error::CookieConfigError;
use crate::backend::BackendId;
use crate::key::{quoted_list_elements, unquote, CookieName};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of random session id.
const SESSION_BYTES: usize = 16;
/// Characters of a session id in a cookie (base64url of 16 bytes).
pub(crate) const SESSION_ID_LEN: usize = 22;
/// Bytes of the MAC kept in the cookie (128 bits).
const TAG_BYTES: usize = 16;
/// The shortest secret accepted, in bytes.
pub(crate) const MIN_SECRET: usize = 32;
/// Longest backend id the cookie names, in bytes: with the session id and
/// the MAC the value stays well under browsers' 4 KiB cookie limit.
pub(crate) const MAX_BACKEND_ID: usize = 768;
/// Longest base64url backend id accepted in a cookie.
const MAX_BACKEND_B64: usize = MAX_BACKEND_ID / 3 * 4;
/// The longest `Max-Age` [`CookieInsert::max_age`] sends: 400 days, the
/// most browsers keep a cookie for (RFC 6265bis).
pub const MAX_COOKIE_AGE: Duration = Duration::from_secs(400 * 24 * 60 * 60);
/// Separates the MAC input's fields; it cannot occur in base64url.
const DOMAIN: &[u8] = b"tower-ha sticky v1\0";

/// The cookie the sticky layer issues: its name, its signing secret and its
/// attributes.
///
/// The value names the session and the backend that served it and carries
/// an HMAC-SHA256 tag over both, so a forged, tampered or foreign value is
/// ignored. Attributes: `Path=/` (see [`path`](CookieInsert::path)),
/// `HttpOnly`, `SameSite=Lax` (see [`same_site`](CookieInsert::same_site))
/// and `Secure` by default; a `Max-Age` when
/// configured. A response that sets it is kept from shared caches (see
/// [`mark_private`](CookieInsert::mark_private)).
///
/// ```
/// use std::time::Duration;
/// use tower_ha::sticky::CookieInsert;
///
/// let cookie = CookieInsert::new("srv", [7u8; 32])
///     .secure(false)
///     .max_age(Duration::from_secs(3600));
/// assert_eq!(cookie.name(), "srv");
/// ```
#[derive(Clone)]
pub struct CookieInsert {
    name: CookieName,
    mac: HmacSha256,
    /// Secrets being retired: cookies they signed are still accepted.
    previous: Vec<HmacSha256>,
    secure: bool,
    same_site: SameSite,
    max_age: Option<Duration>,
    path: String,
    private: bool,
}

impl fmt::Debug for CookieInsert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CookieInsert")
            .field("name", &self.name)
            .field("secret", &"<redacted>")
            .field("previous_secrets", &self.previous.len())
            .field("secure", &self.secure)
            .field("same_site", &self.same_site)
            .field("max_age", &self.max_age)
            .field("path", &self.path)
            .field("private", &self.private)
            .finish()
    }
}

/// The cookie's `SameSite` attribute: when browsers send it with a request
/// another site started (see [`CookieInsert::same_site`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SameSite {
    /// Only with requests from the site itself.
    Strict,
    /// Also with top-level navigations from other sites (following a
    /// link), not with their subresources, frames or cross-site `POST`s.
    /// The default.
    #[default]
    Lax,
    /// With every request, including those in another site's frames and
    /// cross-site `POST`s; browsers require `Secure` with it.
    None,
}

impl SameSite {
    fn attribute(self) -> &'static str {
        match self {
            SameSite::Strict => "; SameSite=Strict",
            SameSite::Lax => "; SameSite=Lax",
            SameSite::None => "; SameSite=None",
        }
    }
}

/// Why a cookie value was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalid {
    Shape,
    Signature,
}

/// A cookie value of the right shape, not yet verified.
#[derive(Debug)]
pub(crate) struct Parsed<'a> {
    pub(crate) session: &'a str,
    backend_b64: &'a [u8],
    tag: [u8; TAG_BYTES],
}

impl<'a> Parsed<'a> {
    /// Splits and decodes a cookie value; no MAC is checked.
    pub(crate) fn new(value: &'a [u8]) -> Result<Self, Invalid> {
        let mut parts = value.splitn(3, |&b| b == b'.');
        let (Some(session), Some(backend_b64), Some(tag_b64)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(Invalid::Shape);
        };
        // base64url of 16 bytes is exactly 22 characters.
        if session.len() != SESSION_ID_LEN
            || tag_b64.len() != 22
            || backend_b64.is_empty()
            || backend_b64.len() > MAX_BACKEND_B64
            || !session.iter().all(|&b| is_b64url(b))
        {
            return Err(Invalid::Shape);
        }
        let mut tag_buf = [0u8; TAG_BYTES + 2];
        match URL_SAFE_NO_PAD.decode_slice(tag_b64, &mut tag_buf) {
            Ok(TAG_BYTES) => {}
            _ => return Err(Invalid::Shape),
        }
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&tag_buf[..TAG_BYTES]);
        // All base64url characters are ASCII.
        let session = std::str::from_utf8(session).map_err(|_| Invalid::Shape)?;
        Ok(Parsed {
            session,
            backend_b64,
            tag,
        })
    }

    /// The backend id the cookie names, decoded into `buf`.
    fn backend<'b>(&self, buf: &'b mut [u8; MAX_BACKEND_B64]) -> Result<&'b str, Invalid> {
        let n = URL_SAFE_NO_PAD
            .decode_slice(self.backend_b64, buf)
            .map_err(|_| Invalid::Shape)?;
        match std::str::from_utf8(&buf[..n]) {
            Ok(id) if !id.is_empty() => Ok(id),
            _ => Err(Invalid::Shape),
        }
    }
}

/// The MAC keyed with `secret`, at least [`MIN_SECRET`] bytes long.
fn keyed(secret: &[u8]) -> Result<HmacSha256, CookieConfigError> {
    if secret.len() < MIN_SECRET {
        return Err(CookieConfigError::ShortSecret {
            min: MIN_SECRET,
            got: secret.len(),
        });
    }
    Ok(HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length"))
}

impl CookieInsert {
    /// A cookie named `name` signed with `secret`.
    ///
    /// # Panics
    ///
    /// When `secret` is shorter than 32 bytes or `name` is not a valid
    /// cookie name (empty, or with separators, spaces or controls): both
    /// are configuration mistakes.
    pub fn new(name: impl Into<String>, secret: impl AsRef<[u8]>) -> Self {
        Self::try_new(name, secret).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`new`](Self::new) for settings read at run time: an error instead
    /// of a panic when `secret` is shorter than 32 bytes or `name` is not a
    /// valid cookie name.
    pub fn try_new(
        name: impl Into<String>,
        secret: impl AsRef<[u8]>,
    ) -> Result<Self, CookieConfigError> {
        let name = name.into();
        let mac = keyed(secret.as_ref())?;
        if !crate::key::is_cookie_name(&name) {
            return Err(CookieConfigError::InvalidName(name));
        }
        Ok(CookieInsert {
            name: CookieName::new(&name),
            mac,
            previous: Vec::new(),
            secure: true,
            same_site: SameSite::Lax,
            max_age: None,
            path: "/".to_owned(),
            private: true,
        })
    }

    /// Also accepts cookies signed with `secret`, a secret being retired,
    /// so that the signing secret can be changed without losing sessions:
    /// start every instance with the new secret and the old one here, and
    /// drop the old one once the cookies it signed have expired (their
    /// `Max-Age`) or been sent again. A cookie it signed counts as the
    /// layer's own, and the response sends it again signed with the
    /// current secret (on the session's next request, when its session was
    /// not in memory). May be called again for more secrets; each costs one
    /// more MAC for a cookie that the current secret does not verify
    /// (forged ones included).
    ///
    /// During a rolling change, instances still on the old secret do not
    /// know the new one: give them the new one as a previous secret first,
    /// then swap the two.
    ///
    /// # Panics
    ///
    /// When `secret` is shorter than 32 bytes, as [`new`](Self::new).
    pub fn previous_secret(self, secret: impl AsRef<[u8]>) -> Self {
        self.try_previous_secret(secret)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`previous_secret`](Self::previous_secret) for settings read at run
    /// time: an error instead of a panic when `secret` is shorter than 32
    /// bytes.
    pub fn try_previous_secret(
        mut self,
        secret: impl AsRef<[u8]>,
    ) -> Result<Self, CookieConfigError> {
        self.previous.push(keyed(secret.as_ref())?);
        Ok(self)
    }

    /// Whether to send `Secure` (default `true`). Turn it off only for
    /// plain-HTTP development.
    ///
    /// # Panics
    ///
    /// When turned off for a name with the `__Secure-` or `__Host-`
    /// prefix, or with [`SameSite::None`]: browsers drop such a cookie
    /// without `Secure`. For a setting read at run time,
    /// [`try_secure`](Self::try_secure) returns an error instead.
    pub fn secure(self, secure: bool) -> Self {
        self.try_secure(secure).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`secure`](Self::secure) for a setting read at run time: an error
    /// instead of a panic when `Secure` is turned off for a name with the
    /// `__Secure-` or `__Host-` prefix
    /// ([`PrefixNotSecure`](CookieConfigError::PrefixNotSecure)) or with
    /// [`SameSite::None`]
    /// ([`SameSiteNoneNotSecure`](CookieConfigError::SameSiteNoneNotSecure)).
    pub fn try_secure(mut self, secure: bool) -> Result<Self, CookieConfigError> {
        if !secure && self.prefix().is_some() {
            return Err(CookieConfigError::PrefixNotSecure(self.name().to_owned()));
        }
        if !secure && self.same_site == SameSite::None {
            return Err(CookieConfigError::SameSiteNoneNotSecure(
                self.name().to_owned(),
            ));
        }
        self.secure = secure;
        Ok(self)
    }

    /// The `SameSite` attribute (default [`SameSite::Lax`]). Choose
    /// [`SameSite::None`] when the application runs in another site's
    /// frame, or takes cross-site `POST`s that belong to a session (a SAML
    /// or OpenID Connect `form_post` login, a payment provider's return):
    /// without the cookie such a request would start a new session, on any
    /// backend.
    ///
    /// # Panics
    ///
    /// [`SameSite::None`] after [`secure(false)`](Self::secure): browsers
    /// drop a `SameSite=None` cookie without `Secure`. For a setting read
    /// at run time, [`try_same_site`](Self::try_same_site) returns an error
    /// instead.
    pub fn same_site(self, same_site: SameSite) -> Self {
        self.try_same_site(same_site)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`same_site`](Self::same_site) for a setting read at run time: an
    /// error
    /// ([`SameSiteNoneNotSecure`](CookieConfigError::SameSiteNoneNotSecure))
    /// instead of a panic for [`SameSite::None`] after
    /// [`secure(false)`](Self::secure).
    pub fn try_same_site(mut self, same_site: SameSite) -> Result<Self, CookieConfigError> {
        if !self.secure && same_site == SameSite::None {
            return Err(CookieConfigError::SameSiteNoneNotSecure(
                self.name().to_owned(),
            ));
        }
        self.same_site = same_site;
        Ok(self)
    }

    /// The name's prefix that browsers hold to rules (RFC 6265bis),
    /// matched as they match it, without regard to case.
    fn prefix(&self) -> Option<&'static str> {
        let name = self.name.as_str().as_bytes();
        ["__Secure-", "__Host-"]
            .into_iter()
            .find(|prefix| crate::key::strip_prefix_ignore_case(name, prefix.as_bytes()).is_some())
    }

    /// Sends `Max-Age` (whole seconds, rounded up, at least 1), so the
    /// cookie outlives the browser session. A request that presents the
    /// cookie half its `Max-Age` or more after it was last sent gets it
    /// again, so a session in use keeps its cookie: it expires after
    /// between half and all of `Max-Age` without a request. Without it (the
    /// default) the cookie ends with the browser session.
    ///
    /// Zero is that default: no `Max-Age`, a cookie that ends with the
    /// browser session and is not sent again (so that a zero read from a
    /// configuration turns it off, and an earlier `max_age` with it).
    /// Longer than 400 days counts as 400 days ([`MAX_COOKIE_AGE`]), as
    /// browsers count it (RFC 6265bis), so that the cookie is sent again
    /// before a browser drops it.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = (!max_age.is_zero()).then(|| max_age.min(MAX_COOKIE_AGE));
        self
    }

    /// The cookie's `Path` (default `/`).
    ///
    /// # Panics
    ///
    /// When `path` does not start with `/` (browsers would take the
    /// request's own path instead, and send the cookie back on that path
    /// only), holds `;` or a control character, or is not `/` for a name
    /// with the `__Host-` prefix (which browsers drop on any other path).
    /// For a path read at run time, [`try_path`](Self::try_path) returns an
    /// error instead.
    pub fn path(self, path: impl Into<String>) -> Self {
        self.try_path(path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`path`](Self::path) for a path read at run time: an error instead
    /// of a panic when browsers would not keep the cookie on `path`, or
    /// would not send it back there.
    pub fn try_path(mut self, path: impl Into<String>) -> Result<Self, CookieConfigError> {
        let path = path.into();
        if !path.starts_with('/') || path.bytes().any(|b| b == b';' || b.is_ascii_control()) {
            return Err(CookieConfigError::InvalidPath(path));
        }
        if path != "/" && self.prefix() == Some("__Host-") {
            return Err(CookieConfigError::HostPrefixPath(path));
        }
        self.path = path;
        Ok(self)
    }

    /// Whether a response that carries the cookie is marked `Cache-Control:
    /// private` (default `true`), unless it says `private`, `private` naming
    /// `Set-Cookie`, or `no-store` already: a shared cache in front (a CDN)
    /// then does not keep the response, and hand one client's cookie, its
    /// session, to every client it serves from cache. HAProxy's `cookie ...
    /// nocache` does the same. Only the responses that set the cookie are
    /// marked: a session's first, and those that move it or renew the cookie.
    pub fn mark_private(mut self, private: bool) -> Self {
        self.private = private;
        self
    }

    /// Marks `headers`, those of a response that carries the cookie, as
    /// not for shared caches (see [`mark_private`](Self::mark_private)).
    pub(crate) fn keep_from_shared_caches(&self, headers: &mut HeaderMap) {
        if !self.private {
            return;
        }
        let said = headers
            .get_all(CACHE_CONTROL)
            .iter()
            .any(|value| keeps_cookie_private(value.as_bytes()));
        if !said {
            headers.append(CACHE_CONTROL, HeaderValue::from_static("private"));
        }
    }

    /// The cookie's name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// Removes from `headers`, those of a backend's response, the
    /// `Set-Cookie` lines that set this cookie: the layer alone sets it,
    /// and a backend's line could delete it or replace it with a value of
    /// its own, as HAProxy's `cookie ... insert` removes them. Returns how
    /// many it removed.
    pub(crate) fn remove_backends_lines(&self, headers: &mut HeaderMap) -> usize {
        let name = self.name().as_bytes();
        let sets = |line: &HeaderValue| {
            set_cookie_parts(line.as_bytes()).is_some_and(|(cookie, ..)| cookie == name)
        };
        if !headers.get_all(SET_COOKIE).iter().any(sets) {
            return 0;
        }
        let http::header::Entry::Occupied(lines) = headers.entry(SET_COOKIE) else {
            return 0;
        };
        let lines: Vec<_> = lines.remove_entry_mult().1.collect();
        let mut removed = 0;
        for line in lines {
            if sets(&line) {
                removed += 1;
            } else {
                headers.append(SET_COOKIE, line);
            }
        }
        removed
    }

    /// The name, with its search in `Cookie` headers.
    pub(crate) fn cookie_name(&self) -> &CookieName {
        &self.name
    }

    fn tag(&self, session: &[u8], backend: &[u8]) -> HmacSha256 {
        self.tag_with(&self.mac, session, backend)
    }

    fn tag_with(&self, key: &HmacSha256, session: &[u8], backend: &[u8]) -> HmacSha256 {
        let mut mac = key.clone();
        mac.update(DOMAIN);
        mac.update(self.name.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(session);
        mac.update(b"\0");
        mac.update(backend);
        mac
    }

    /// A fresh random session id.
    pub(crate) fn new_session_id() -> String {
        let mut bytes = [0u8; SESSION_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The cookie value naming `session` on `backend`.
    pub(crate) fn value(&self, session: &str, backend: &BackendId) -> String {
        let tag = self
            .tag(session.as_bytes(), backend.as_str().as_bytes())
            .finalize()
            .into_bytes();
        let mut value = String::with_capacity(session.len() + backend.as_str().len() * 2 + 26);
        value.push_str(session);
        value.push('.');
        URL_SAFE_NO_PAD.encode_string(backend.as_str(), &mut value);
        value.push('.');
        URL_SAFE_NO_PAD.encode_string(&tag[..TAG_BYTES], &mut value);
        value
    }

    /// Verifies a parsed cookie's MAC (in constant time) and returns the
    /// backend it names, and whether the current secret signed it (not a
    /// [previous](Self::previous_secret) one).
    pub(crate) fn verify(&self, parsed: &Parsed<'_>) -> Result<(BackendId, bool), Invalid> {
        let mut buf = [0u8; MAX_BACKEND_B64];
        let backend = parsed.backend(&mut buf)?;
        let signed = |key| {
            self.tag_with(key, parsed.session.as_bytes(), backend.as_bytes())
                .verify_truncated_left(&parsed.tag)
                .is_ok()
        };
        let current = signed(&self.mac);
        if !current && !self.previous.iter().any(signed) {
            return Err(Invalid::Signature);
        }
        Ok((BackendId::from(backend), current))
    }

    /// How long after it was sent the cookie is sent again on a request
    /// that presents it: half its `Max-Age`, if any.
    pub(crate) fn renew_after(&self) -> Option<Duration> {
        self.max_age.map(|max_age| max_age / 2)
    }

    /// The `Set-Cookie` header value for `value`.
    pub(crate) fn set_cookie(&self, value: &str) -> Option<HeaderValue> {
        let mut header = String::with_capacity(self.name.as_str().len() + value.len() + 64);
        header.push_str(self.name.as_str());
        header.push('=');
        header.push_str(value);
        header.push_str("; Path=");
        header.push_str(&self.path);
        if let Some(max_age) = self.max_age {
            // Rounded up: `Max-Age=0` would delete the cookie at once.
            let secs = max_age.as_secs() + u64::from(max_age.subsec_nanos() > 0);
            header.push_str("; Max-Age=");
            header.push_str(&secs.max(1).to_string());
        }
        header.push_str("; HttpOnly");
        header.push_str(self.same_site.attribute());
        if self.secure {
            header.push_str("; Secure");
        }
        HeaderValue::try_from(header).ok()
    }
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// What a response's `Set-Cookie` headers say about cookie `name`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Learned<'a> {
    /// The cookie is set to this value.
    Set(&'a [u8]),
    /// The cookie is deleted (empty value, `Max-Age` of 0 or less, or an
    /// `Expires` that has passed, without a `Max-Age`).
    Deleted,
}

/// What a `Set-Cookie` attribute says about the cookie's end, if it is a
/// valid `Max-Age` or `Expires` (RFC 6265 section 5.2).
enum Ends {
    /// `Max-Age`: whether it ends the cookie at once (an integer of at most
    /// zero: `0`, `00`, `-1`, white space around the `=` allowed).
    MaxAge(bool),
    /// `Expires`: the date, in seconds from the Unix epoch.
    Expires(i64),
}

fn ends(attr: &[u8]) -> Option<Ends> {
    let (name, value) = name_value(attr)?;
    if name.eq_ignore_ascii_case(b"max-age") {
        let (negative, digits) = match value.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, value),
        };
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        return Some(Ends::MaxAge(negative || digits.iter().all(|&d| d == b'0')));
    }
    if name.eq_ignore_ascii_case(b"expires") {
        return cookie_date(value).map(Ends::Expires);
    }
    None
}

/// The time an `Expires` in `headers`' `Set-Cookie`s is measured against,
/// in seconds from the Unix epoch: the response's `Date`, from the clock
/// that wrote the `Expires`, when it has a valid one; this host's clock
/// otherwise. A proxy whose clock runs ahead of the backend's (a virtual
/// machine resumed before its clock was set) would otherwise take a cookie
/// that expires in minutes for one deleted, and end its session.
fn response_now(headers: &HeaderMap) -> i64 {
    let date = (headers.get(http::header::DATE)).and_then(|date| cookie_date(date.as_bytes()));
    date.unwrap_or_else(|| {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        since.map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        })
    })
}

/// The instant a cookie date names, in seconds from the Unix epoch (before
/// it: negative), read as browsers read an `Expires` attribute (RFC 6265
/// section 5.1.1): the first time (`hh:mm:ss`), day of the month (one or
/// two digits), month (its name's first three letters) and year (two to
/// four digits; `70` to `99` are 1970 to 1999, `0` to `69` are 2000 to
/// 2069) among the tokens, whatever else is there and in whatever order.
/// The weekday and time zone are ignored (the date is in UTC). `None` when
/// a part is missing, out of range, or the date does not exist, or the year
/// is before 1601.
fn cookie_date(value: &[u8]) -> Option<i64> {
    let is_delimiter =
        |b: u8| matches!(b, 0x09 | 0x20..=0x2F | 0x3B..=0x40 | 0x5B..=0x60 | 0x7B..=0x7E);
    let (mut time, mut day, mut month, mut year) = (None, None, None, None);
    for token in value.split(|&b| is_delimiter(b)).filter(|t| !t.is_empty()) {
        if time.is_none() {
            if let Some(found) = clock(token) {
                time = Some(found);
                continue;
            }
        }
        if day.is_none() {
            if let Some((found, _)) = leading_number(token, 1, 2) {
                day = Some(found);
                continue;
            }
        }
        if month.is_none() {
            if let Some(found) = month_of(token) {
                month = Some(found);
                continue;
            }
        }
        if year.is_none() {
            if let Some((found, _)) = leading_number(token, 2, 4) {
                year = Some(found);
            }
        }
    }
    let ((hour, minute, second), day, month, year) = (time?, day?, month?, year?);
    let year = match year {
        70..=99 => year + 1900,
        0..=69 => year + 2000,
        _ => year,
    };
    if year < 1601 || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=days_in_month).contains(&day) {
        return None;
    }
    // Days from 1970-01-01 to the date, counting years from March so that
    // a leap day ends its year (the civil calendar's usual reckoning).
    let (year, month, day) = (i64::from(year), i64::from(month), i64::from(day));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let of_era = year - era * 400;
    let of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let of_cycle = of_era * 365 + of_era / 4 - of_era / 100 + of_year;
    let days = era * 146_097 + of_cycle - 719_468;
    Some(days * 86_400 + i64::from(hour) * 3_600 + i64::from(minute) * 60 + i64::from(second))
}

/// The number `token` starts with, if it has `min` to `max` digits, and
/// what follows them.
fn leading_number(token: &[u8], min: usize, max: usize) -> Option<(u32, &[u8])> {
    let digits = token.iter().take_while(|b| b.is_ascii_digit()).count();
    if !(min..=max).contains(&digits) {
        return None;
    }
    let number = token[..digits]
        .iter()
        .fold(0, |n, &d| n * 10 + u32::from(d - b'0'));
    Some((number, &token[digits..]))
}

/// A cookie date's time, `h:m:s` with one or two digits each.
fn clock(token: &[u8]) -> Option<(u32, u32, u32)> {
    let (hour, rest) = leading_number(token, 1, 2)?;
    let (minute, rest) = leading_number(rest.strip_prefix(b":")?, 1, 2)?;
    let (second, _) = leading_number(rest.strip_prefix(b":")?, 1, 2)?;
    Some((hour, minute, second))
}

/// A month, 1 to 12, from the first three letters of its English name.
fn month_of(token: &[u8]) -> Option<u32> {
    const MONTHS: [&[u8; 3]; 12] = [
        b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov",
        b"dec",
    ];
    let name = token.get(..3)?;
    let index = MONTHS
        .iter()
        .position(|m| name.eq_ignore_ascii_case(&m[..]))?;
    Some(index as u32 + 1)
}

/// Finds what the `Set-Cookie`s for `name` in `headers` leave a browser
/// with: the value set last, or a deletion when every one they set they
/// also delete. A browser keeps one cookie per name, path and domain, so
/// a deletion ends only a value set with the same path and domain (a
/// response that sets a new session and clears a legacy one of the same
/// name on another path leaves the new one). A line without a `Path` has
/// the default path of the request's (`request_path`), and one without a
/// `Domain` the request's host. What is not known here (the host, and the
/// path when `request_path` is `None`) may be any: a deletion ends any
/// value whose scope may be its own, so that a session does not outlive
/// its logout.
///
/// A deletion on a path the request's (when known) does not fall under
/// deletes no cookie the request presented, since a browser sends none
/// from there: alone, it is no deletion of the session.
pub(crate) fn learn<'h>(
    headers: &'h HeaderMap,
    name: &str,
    request_path: Option<&str>,
) -> Option<Learned<'h>> {
    let name = name.as_bytes();
    // Per path and domain, the value the last line leaves (`None`: deleted),
    // in the order they were last written.
    let mut scopes: Vec<Scope<'_, 'h>> = Vec::new();
    // Whether a cookie of `path` is one the request could not have sent.
    let off_path = |path: &[u8]| {
        !path.is_empty() && request_path.is_some_and(|r| !path_matches(r.as_bytes(), path))
    };
    // What an `Expires` is measured against, read at the first one.
    let mut now = None;
    for header in headers.get_all(SET_COOKIE) {
        let Some((cookie, value, attributes)) = set_cookie_parts(header.as_bytes()) else {
            continue;
        };
        if cookie != name {
            continue;
        }
        let value = unquote(value);
        // `Max-Age` wins over `Expires`, wherever they are.
        let (mut max_age, mut expires) = (None, false);
        let (mut path, mut domain): (&[u8], &[u8]) = (b"", b"");
        for attr in attributes {
            match ends(attr) {
                Some(Ends::MaxAge(now)) => max_age = Some(now),
                Some(Ends::Expires(at)) => {
                    expires = at <= *now.get_or_insert_with(|| response_now(headers));
                }
                None => {
                    if let Some(v) = attribute(attr, b"path") {
                        path = v;
                    } else if let Some(v) = attribute(attr, b"domain") {
                        domain = v.strip_prefix(b".").unwrap_or(v);
                    }
                }
            }
        }
        // A path that is not absolute stands for the default one
        // (RFC 6265, section 5.2.4); empty when the request's is unknown.
        if !path.starts_with(b"/") {
            path = request_path.map_or(b"", default_path);
        }
        let left = (!value.is_empty() && !max_age.unwrap_or(expires)).then_some(value);
        let deletes = left.is_none();
        // The request's default path falls under its path, so a deletion
        // elsewhere cannot be of a value set without a `Path` either.
        let elsewhere = deletes && off_path(path);
        // A value replaces the one of its exact scope; a deletion ends
        // those of every scope that may be its own (an empty attribute
        // stands for the request's, which may equal any).
        let same = |a: &[u8], b: &[u8], eq: fn(&[u8], &[u8]) -> bool, any: bool| {
            eq(a, b) || (deletes && any && (a.is_empty() || b.is_empty()))
        };
        scopes.retain(|&(p, d, _)| {
            !(same(p, path, |a, b| a == b, !elsewhere)
                && same(d, domain, <[u8]>::eq_ignore_ascii_case, true))
        });
        scopes.push((path, domain, left));
    }
    if let Some(value) = scopes.iter().rev().find_map(|&(_, _, left)| left) {
        return Some(Learned::Set(value));
    }
    // Only deletions are left: one on the request's path ends its session.
    scopes
        .iter()
        .any(|&(path, ..)| !off_path(path))
        .then_some(Learned::Deleted)
}

/// A cookie's path and domain, and the value a `Set-Cookie` left it with.
type Scope<'p, 'h> = (&'p [u8], &'h [u8], Option<&'h [u8]>);

/// A `Set-Cookie` line's cookie name and value (trimmed, the value still
/// quoted if it was), and its attributes.
fn set_cookie_parts(line: &[u8]) -> Option<(&[u8], &[u8], impl Iterator<Item = &[u8]>)> {
    let mut parts = line.split(|&b| b == b';');
    let (name, value) = name_value(parts.next()?)?;
    Some((name, value, parts))
}

/// A `name=value` pair (a cookie's, an attribute's), each side trimmed;
/// `None` without `=`.
fn name_value(pair: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = pair.iter().position(|&b| b == b'=')?;
    Some((pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii()))
}

/// The path of a cookie set without one in answer to a request for
/// `request` (RFC 6265, section 5.1.4): up to its last `/`, or `/`.
fn default_path(request: &str) -> &[u8] {
    match request.rfind('/') {
        Some(last) if last > 0 && request.starts_with('/') => &request.as_bytes()[..last],
        _ => b"/",
    }
}

/// Whether a browser sends a cookie of path `cookie` with a request for
/// `request` (RFC 6265, section 5.1.4).
fn path_matches(request: &[u8], cookie: &[u8]) -> bool {
    request
        .strip_prefix(cookie)
        .is_some_and(|rest| rest.is_empty() || cookie.ends_with(b"/") || rest.starts_with(b"/"))
}

/// Whether a `Cache-Control` value keeps a response's `Set-Cookie` from
/// shared caches: `no-store`, `private`, or `private` with a list of fields
/// that names it (`private="set-cookie"`; a shared cache may store the
/// response without the fields named).
fn keeps_cookie_private(value: &[u8]) -> bool {
    quoted_list_elements(value).any(|directive| {
        let (name, fields) = match directive.iter().position(|&b| b == b'=') {
            Some(eq) => (&directive[..eq], Some(&directive[eq + 1..])),
            None => (directive, None),
        };
        let name = name.trim_ascii();
        if name.eq_ignore_ascii_case(b"no-store") {
            return true;
        }
        if !name.eq_ignore_ascii_case(b"private") {
            return false;
        }
        fields.is_none_or(|fields| {
            unquote(fields.trim_ascii())
                .split(|&b| b == b',')
                .any(|f| f.trim_ascii().eq_ignore_ascii_case(b"set-cookie"))
        })
    })
}

/// The value of attribute `name` (any case) in `attr`, if it is that one.
fn attribute<'a>(attr: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let (found, value) = name_value(attr)?;
    found.eq_ignore_ascii_case(name).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `value` as the layer's cookie and verifies it with `c`.
    fn verify(c: &CookieInsert, value: &[u8]) -> Result<(BackendId, bool), Invalid> {
        Parsed::new(value).and_then(|p| c.verify(&p))
    }

    fn cookie() -> CookieInsert {
        CookieInsert::new("srv", [1u8; 32])
    }

    #[test]
    fn round_trip() {
        let c = cookie();
        let sid = CookieInsert::new_session_id();
        let value = c.value(&sid, &"node-a".into());
        let parsed = Parsed::new(value.as_bytes()).unwrap();
        assert_eq!(parsed.session, sid);
        assert_eq!(c.verify(&parsed).unwrap(), ("node-a".into(), true));
    }

    #[test]
    fn a_previous_secret_verifies_but_does_not_sign() {
        let sid = CookieInsert::new_session_id();
        let old = cookie().value(&sid, &"node-a".into());
        let rotated = CookieInsert::new("srv", [2u8; 32]).previous_secret([1u8; 32]);
        let parsed = Parsed::new(old.as_bytes()).unwrap();
        assert_eq!(rotated.verify(&parsed).unwrap(), ("node-a".into(), false));
        let new = rotated.value(&sid, &"node-a".into());
        assert_ne!(new, old);
        let parsed = Parsed::new(new.as_bytes()).unwrap();
        assert_eq!(rotated.verify(&parsed).unwrap(), ("node-a".into(), true));
        // Without it, the old value is a bad signature.
        let parsed = Parsed::new(old.as_bytes()).unwrap();
        let bare = CookieInsert::new("srv", [2u8; 32]);
        assert_eq!(bare.verify(&parsed).unwrap_err(), Invalid::Signature);
        assert!(bare.try_previous_secret([1u8; 31]).is_err());
    }

    #[test]
    fn every_id_the_cookie_may_name_round_trips() {
        let c = cookie();
        let sid = CookieInsert::new_session_id();
        for len in [1, 191, 192, 193, 500, MAX_BACKEND_ID] {
            let id: BackendId = "b".repeat(len).into();
            let value = c.value(&sid, &id);
            let parsed = Parsed::new(value.as_bytes()).unwrap();
            assert_eq!(c.verify(&parsed).unwrap().0, id, "{len}");
            assert!(c.set_cookie(&value).unwrap().len() < 4096);
        }
    }

    #[test]
    fn tampering_is_detected() {
        let c = cookie();
        let sid = CookieInsert::new_session_id();
        let value = c.value(&sid, &"node-a".into());
        // Another backend with the original tag.
        let (head, tag) = value.rsplit_once('.').unwrap();
        let (sid_part, _) = head.split_once('.').unwrap();
        let forged = format!("{sid_part}.{}.{tag}", URL_SAFE_NO_PAD.encode("node-b"));
        assert_eq!(
            verify(&c, forged.as_bytes()).unwrap_err(),
            Invalid::Signature
        );
        // Another secret.
        let other = CookieInsert::new("srv", [2u8; 32]);
        assert_eq!(
            verify(&other, value.as_bytes()).unwrap_err(),
            Invalid::Signature
        );
        // Another cookie name with the same secret.
        let renamed = CookieInsert::new("other", [1u8; 32]);
        assert_eq!(
            verify(&renamed, value.as_bytes()).unwrap_err(),
            Invalid::Signature
        );
        for bad in [
            "",
            "a.b.c",
            "..",
            "x",
            &"a".repeat(5000),
            &format!("{value}x"),
        ] {
            assert!(verify(&c, bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn set_cookie_attributes() {
        let c = cookie().max_age(Duration::from_secs(60));
        let h = c.set_cookie("v").unwrap();
        assert_eq!(
            h.to_str().unwrap(),
            "srv=v; Path=/; Max-Age=60; HttpOnly; SameSite=Lax; Secure"
        );
        let h = cookie().secure(false).set_cookie("v").unwrap();
        assert_eq!(h.to_str().unwrap(), "srv=v; Path=/; HttpOnly; SameSite=Lax");
        for (same_site, attribute) in [
            (SameSite::Strict, "SameSite=Strict"),
            (SameSite::Lax, "SameSite=Lax"),
            (SameSite::None, "SameSite=None"),
        ] {
            let h = cookie().same_site(same_site).set_cookie("v").unwrap();
            let expected = format!("srv=v; Path=/; HttpOnly; {attribute}; Secure");
            assert_eq!(h.to_str().unwrap(), expected);
        }
        let h = cookie()
            .secure(false)
            .same_site(SameSite::Strict)
            .set_cookie("v")
            .unwrap();
        assert_eq!(
            h.to_str().unwrap(),
            "srv=v; Path=/; HttpOnly; SameSite=Strict"
        );
    }

    /// Browsers drop a `SameSite=None` cookie without `Secure`, in either
    /// order of the settings.
    #[test]
    fn same_site_none_must_be_secure() {
        let refused = |f: fn() -> CookieInsert| std::panic::catch_unwind(f).is_err();
        assert!(refused(|| cookie().secure(false).same_site(SameSite::None)));
        assert!(refused(|| cookie().same_site(SameSite::None).secure(false)));
        assert!(!refused(|| cookie()
            .same_site(SameSite::None)
            .same_site(SameSite::Lax)
            .secure(false)));
    }

    /// Settings browsers would ignore, or that would keep the cookie from
    /// coming back, are refused; those they keep are taken.
    #[test]
    fn paths_and_name_prefixes_follow_the_browsers_rules() {
        let refused = |f: fn() -> CookieInsert| std::panic::catch_unwind(f).is_err();
        let secret = [7u8; 32];
        let named = |name: &str| CookieInsert::new(name, secret);
        assert!(refused(|| CookieInsert::new("srv", [7u8; 32]).path("")));
        assert!(refused(|| CookieInsert::new("srv", [7u8; 32]).path("api")));
        assert!(refused(|| CookieInsert::new("srv", [7u8; 32]).path("/a;b")));
        assert!(refused(
            || CookieInsert::new("__Secure-srv", [7u8; 32]).secure(false)
        ));
        assert!(refused(
            || CookieInsert::new("__host-srv", [7u8; 32]).secure(false)
        ));
        assert!(refused(
            || CookieInsert::new("__Host-srv", [7u8; 32]).path("/api")
        ));
        let kept = named("srv")
            .path("/api")
            .secure(false)
            .set_cookie("v")
            .unwrap();
        assert_eq!(kept, "srv=v; Path=/api; HttpOnly; SameSite=Lax");
        let kept = named("__Secure-srv").path("/api").set_cookie("v").unwrap();
        assert_eq!(
            kept,
            "__Secure-srv=v; Path=/api; HttpOnly; SameSite=Lax; Secure"
        );
        let kept = named("__Host-srv").path("/").set_cookie("v").unwrap();
        assert_eq!(kept, "__Host-srv=v; Path=/; HttpOnly; SameSite=Lax; Secure");
        assert!(named("srv__Host-").secure(false).set_cookie("v").is_some());
    }

    #[test]
    #[should_panic(expected = "at least 32 bytes")]
    fn short_secret_is_refused() {
        let _ = CookieInsert::new("srv", b"short");
    }

    #[test]
    fn try_new_reports_what_new_refuses() {
        assert_eq!(
            CookieInsert::try_new("srv", b"short").unwrap_err(),
            CookieConfigError::ShortSecret { min: 32, got: 5 }
        );
        for name in ["", "a b", "a;b", "a=b"] {
            assert_eq!(
                CookieInsert::try_new(name, [7u8; 32]).unwrap_err(),
                CookieConfigError::InvalidName(name.to_owned())
            );
        }
        assert!(CookieInsert::try_new("srv", [7u8; 32]).is_ok());
    }

    #[test]
    fn try_path_reports_what_path_refuses() {
        let secret = [7u8; 32];
        for path in ["", "api", "/a;b", "/a\nb", "/a\x7fb"] {
            assert_eq!(
                CookieInsert::new("srv", secret).try_path(path).unwrap_err(),
                CookieConfigError::InvalidPath(path.to_owned())
            );
        }
        assert_eq!(
            CookieInsert::new("__Host-srv", secret)
                .try_path("/api")
                .unwrap_err(),
            CookieConfigError::HostPrefixPath("/api".to_owned())
        );
        let kept = CookieInsert::new("srv", secret).try_path("/api").unwrap();
        assert_eq!(
            kept.set_cookie("v").unwrap(),
            "srv=v; Path=/api; HttpOnly; SameSite=Lax; Secure"
        );
        assert!(CookieInsert::new("__Host-srv", secret)
            .try_path("/")
            .is_ok());
    }

    #[test]
    fn try_secure_and_try_same_site_report_what_they_refuse() {
        let secret = [7u8; 32];
        let named = |name: &str| CookieInsert::new(name, secret);
        for name in ["__Secure-srv", "__Host-srv", "__secure-srv", "__HOST-srv"] {
            let err = named(name).try_secure(false).unwrap_err();
            assert_eq!(err, CookieConfigError::PrefixNotSecure(name.to_owned()));
            assert!(err.to_string().contains(&format!("{name:?}")), "{err}");
        }
        let err = named("srv")
            .same_site(SameSite::None)
            .try_secure(false)
            .unwrap_err();
        assert_eq!(
            err,
            CookieConfigError::SameSiteNoneNotSecure("srv".to_owned())
        );
        assert!(err.to_string().contains("\"srv\""), "{err}");
        assert!(err.to_string().contains("SameSite=None"), "{err}");
        assert_eq!(
            named("srv")
                .secure(false)
                .try_same_site(SameSite::None)
                .unwrap_err(),
            CookieConfigError::SameSiteNoneNotSecure("srv".to_owned())
        );

        // What browsers keep is taken, as the panicking forms take it.
        let kept = named("srv").try_secure(false).unwrap();
        assert_eq!(
            kept.set_cookie("v").unwrap(),
            "srv=v; Path=/; HttpOnly; SameSite=Lax"
        );
        let kept = named("srv")
            .try_secure(false)
            .and_then(|c| c.try_same_site(SameSite::Strict))
            .unwrap();
        assert_eq!(
            kept.set_cookie("v").unwrap(),
            "srv=v; Path=/; HttpOnly; SameSite=Strict"
        );
        let kept = named("__Host-srv")
            .try_same_site(SameSite::None)
            .and_then(|c| c.try_secure(true))
            .unwrap();
        assert_eq!(
            kept.set_cookie("v").unwrap(),
            "__Host-srv=v; Path=/; HttpOnly; SameSite=None; Secure"
        );
        // `SameSite=None` given up, the cookie may be made plain.
        let kept = named("srv")
            .try_same_site(SameSite::None)
            .and_then(|c| c.try_same_site(SameSite::Lax))
            .and_then(|c| c.try_secure(false))
            .unwrap();
        assert_eq!(
            kept.set_cookie("v").unwrap(),
            "srv=v; Path=/; HttpOnly; SameSite=Lax"
        );
    }

    /// A response's headers, one `Set-Cookie` per line.
    fn set_cookies(lines: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for &line in lines {
            h.append(SET_COOKIE, HeaderValue::from_static(line));
        }
        h
    }

    #[test]
    fn a_deletion_on_a_path_the_request_is_not_under_is_not_its_sessions() {
        let learned = |lines: &[&'static str], request: &str| {
            learn(&set_cookies(lines), "JSESSIONID", Some(request)).map(|l| match l {
                Learned::Set(v) => Some(String::from_utf8(v.to_vec()).unwrap()),
                Learned::Deleted => None,
            })
        };
        let legacy = "JSESSIONID=; Path=/legacy; Max-Age=0";
        assert_eq!(learned(&[legacy], "/app/x"), None);
        assert_eq!(learned(&[legacy], "/legacy"), Some(None));
        assert_eq!(learned(&[legacy], "/legacy/x"), Some(None));
        assert_eq!(learned(&[legacy], "/legacyx"), None);
        assert_eq!(
            learned(&["JSESSIONID=; Path=/app/; Max-Age=0"], "/app"),
            None
        );
        assert_eq!(
            learned(&["JSESSIONID=; Path=/app/; Max-Age=0"], "/app/"),
            Some(None)
        );
        assert_eq!(learned(&["JSESSIONID=; Max-Age=0"], "/app/x"), Some(None));
        // A path that is not absolute is the request's default one.
        assert_eq!(
            learned(&["JSESSIONID=; Path=legacy; Max-Age=0"], "/app/x"),
            Some(None)
        );
        // A value set elsewhere and deleted there leaves nothing to learn;
        // a value without a path is not of the deletion's scope.
        assert_eq!(
            learned(&["JSESSIONID=new; Path=/legacy", legacy], "/app/x"),
            None
        );
        assert_eq!(
            learned(&["JSESSIONID=new", legacy], "/app/x"),
            Some(Some("new".to_owned()))
        );
        // Without the request's path, any deletion may be its session's.
        let h = set_cookies(&[legacy]);
        assert_eq!(learn(&h, "JSESSIONID", None), Some(Learned::Deleted));
    }

    #[test]
    fn a_line_without_a_path_has_the_requests_default_one() {
        assert_eq!(default_path("/account/login"), b"/account");
        assert_eq!(default_path("/account/"), b"/account");
        assert_eq!(default_path("/login"), b"/");
        assert_eq!(default_path("/"), b"/");
        assert_eq!(default_path(""), b"/");
        assert_eq!(default_path("*"), b"/");
        assert_eq!(default_path("a/b"), b"/");
        // Set on `/`, deleted on `/account` (the default path of the
        // request's): a browser keeps the new value.
        let h = set_cookies(&["JSESSIONID=new; Path=/", "JSESSIONID=; Max-Age=0"]);
        assert_eq!(
            learn(&h, "JSESSIONID", Some("/account/login")),
            Some(Learned::Set(b"new"))
        );
        // On `/`, the default path is `/`: the same scope, deleted.
        assert_eq!(
            learn(&h, "JSESSIONID", Some("/login")),
            Some(Learned::Deleted)
        );
        // A value set without a path is deleted on the default path.
        let h = set_cookies(&["JSESSIONID=new", "JSESSIONID=; Path=/account; Max-Age=0"]);
        assert_eq!(
            learn(&h, "JSESSIONID", Some("/account/login")),
            Some(Learned::Deleted)
        );
        assert_eq!(
            learn(&h, "JSESSIONID", Some("/shop/cart")),
            Some(Learned::Set(b"new"))
        );
    }

    #[test]
    fn a_relative_path_is_the_default_one() {
        let h = set_cookies(&["JSESSIONID=a; Path=app", "JSESSIONID=; Path=/; Max-Age=0"]);
        assert_eq!(learn(&h, "JSESSIONID", None), Some(Learned::Deleted));
    }

    /// An `Expires` is measured against the response's `Date` when it has
    /// one: a host whose clock runs ahead of the backend's does not take a
    /// cookie that expires in minutes for one deleted.
    #[test]
    fn an_expires_is_measured_against_the_responses_date() {
        let date = "Tue, 02 Jan 2001 10:00:00 GMT";
        for (expires, left) in [
            ("Tue, 02 Jan 2001 10:10:00 GMT", Some(Learned::Set(b"abc"))),
            ("Tue, 02 Jan 2001 09:59:59 GMT", Some(Learned::Deleted)),
            ("Tue, 02 Jan 2001 10:00:00 GMT", Some(Learned::Deleted)),
        ] {
            let line = format!("JSESSIONID=abc; Path=/; Expires={expires}");
            let mut h = HeaderMap::new();
            h.append(SET_COOKIE, HeaderValue::try_from(line).unwrap());
            h.insert(http::header::DATE, HeaderValue::from_static(date));
            assert_eq!(learn(&h, "JSESSIONID", None), left, "{expires}");
        }
        // No `Date`, or one that is no date: this host's clock.
        let line = "JSESSIONID=abc; Expires=Tue, 02 Jan 2001 10:10:00 GMT";
        let mut h = set_cookies(&[line]);
        assert_eq!(learn(&h, "JSESSIONID", None), Some(Learned::Deleted));
        h.insert(http::header::DATE, HeaderValue::from_static("soon"));
        assert_eq!(learn(&h, "JSESSIONID", None), Some(Learned::Deleted));
    }

    #[test]
    fn learning_set_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(learn(&h, "JSESSIONID", None), None);
        h.append(SET_COOKIE, HeaderValue::from_static("other=1"));
        h.append(
            SET_COOKIE,
            HeaderValue::from_static("JSESSIONID=abc; Path=/; HttpOnly"),
        );
        assert_eq!(learn(&h, "JSESSIONID", None), Some(Learned::Set(b"abc")));
        h.append(
            SET_COOKIE,
            HeaderValue::from_static("JSESSIONID=abc; Max-Age=0"),
        );
        assert_eq!(learn(&h, "JSESSIONID", None), Some(Learned::Deleted));
        // Set on one path, a legacy cookie cleared on another: the new
        // value stays, in either order.
        for lines in [
            [
                "JSESSIONID=new1; Path=/",
                "JSESSIONID=; Path=/app; Max-Age=0",
            ],
            [
                "JSESSIONID=; Path=/app; Max-Age=0",
                "JSESSIONID=new1; Path=/",
            ],
            [
                "JSESSIONID=new1; Domain=a.example",
                "JSESSIONID=old; Domain=b.example; Max-Age=0",
            ],
        ] {
            assert_eq!(
                learn(&set_cookies(&lines), "JSESSIONID", None),
                Some(Learned::Set(b"new1")),
                "{lines:?}"
            );
        }
        // The same scope, however it is spelled: the deletion wins.
        let h = set_cookies(&[
            "JSESSIONID=abc; Path=/x; Domain=.A.example",
            "JSESSIONID=; path=/x; domain=a.example",
        ]);
        assert_eq!(learn(&h, "JSESSIONID", None), Some(Learned::Deleted));
        let h = set_cookies(&["JSESSIONID=; Path=/"]);
        assert_eq!(learn(&h, "JSESSIONID", None), Some(Learned::Deleted));
        // A line without a path or domain has the request's, which may be
        // the deletion's: the deletion wins. Two values of scopes that
        // may be one another's do not replace each other.
        for (lines, left) in [
            (["JSESSIONID=new", "JSESSIONID=; Path=/; Max-Age=0"], None),
            (["JSESSIONID=new; Path=/x", "JSESSIONID=; Max-Age=0"], None),
            (
                [
                    "JSESSIONID=new; Path=/",
                    "JSESSIONID=; Path=/; Domain=app.example; Max-Age=0",
                ],
                None,
            ),
            (
                ["JSESSIONID=; Path=/; Max-Age=0", "JSESSIONID=new"],
                Some("new"),
            ),
            (
                ["JSESSIONID=new; Path=/x", "JSESSIONID=other"],
                Some("other"),
            ),
        ] {
            let h = set_cookies(&lines);
            let expected = match left {
                Some(v) => Learned::Set(v.as_bytes()),
                None => Learned::Deleted,
            };
            assert_eq!(learn(&h, "JSESSIONID", None), Some(expected), "{lines:?}");
        }
        let h = set_cookies(&[
            "JSESSIONID=one; Domain=a.example",
            "JSESSIONID=two; Path=/x",
            "JSESSIONID=; Path=/x; Domain=b.example; Max-Age=0",
        ]);
        // `two` did not replace `one`, and the deletion ends `two` alone.
        assert_eq!(learn(&h, "JSESSIONID", None), Some(Learned::Set(b"one")));
        // What learning says of `JSESSIONID=abc; {attrs}`.
        let learned = |attrs: &str| {
            let line = format!("JSESSIONID=abc; {attrs}");
            let mut h = HeaderMap::new();
            h.append(SET_COOKIE, HeaderValue::from_str(&line).unwrap());
            learn(&h, "JSESSIONID", None).map(|l| match l {
                Learned::Set(v) => Some(v.to_vec()),
                Learned::Deleted => None,
            })
        };
        for attrs in [
            "Path=/; Max-Age=00",
            "Path=/; max-age = 0",
            "Path=/; Max-Age=-1",
            "Path=/; Max-Age= -30",
            "Expires=Thu, 01 Jan 1970 00:00:00 GMT",
            "expires=Thu, 01-Jan-1970 00:00:01 GMT",
            "Path=/; Expires=Sunday, 06-Nov-94 08:49:37 GMT",
            "Max-Age=0; Expires=Fri, 01 Jan 2100 00:00:00 GMT",
            // Dates browsers read although they are no HTTP dates.
            "Expires=Wed, 31 Dec 1969 23:59:59 GMT",
            "Expires=Mon, 01 Jan 1601 00:00:00 GMT",
            "Expires=Thu, 01 Jan 1970 00:00:00 UTC",
            "Expires=Thu, 1 Jan 1970 00:00:00 GMT",
            "Expires=Fri, 01 Jan 1970 00:00:00 GMT",
            "Expires=Thu, 01-Jan-70 00:00:01 GMT",
            "Expires=Thu Jan  1 00:00:00 1970",
            "Expires=1 january 2001 0:0:0",
        ] {
            assert_eq!(learned(attrs), Some(None), "deleted: {attrs}");
        }
        for attrs in [
            "Max-Age=10",
            "Max-Age=0x",
            "Max-Age=",
            "Max-Age=-",
            "MaxAge=0",
            "Expires=Fri, 01 Jan 2100 00:00:00 GMT",
            "Expires=not a date",
            "Max-Age=60; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
            // Not cookie dates: each is ignored.
            "Expires=Sun, 31 Dec 1600 23:59:59 GMT",
            "Expires=Thu, 29 Feb 2001 00:00:00 GMT",
            "Expires=Thu, 32 Jan 1970 00:00:00 GMT",
            "Expires=Thu, 01 Jan 1970 24:00:00 GMT",
            "Expires=Thu, 01 Jan 1970",
            "Expires=Thu, 01 Foo 1970 00:00:00 GMT",
            "Expires=Thu, 01 Jan 19700 00:00:00 GMT",
        ] {
            assert_eq!(learned(attrs), Some(Some(b"abc".to_vec())), "set: {attrs}");
        }
    }

    #[test]
    fn cookie_dates_name_their_instant() {
        for (date, at) in [
            ("Thu, 01 Jan 1970 00:00:00 GMT", 0),
            ("Wed, 31 Dec 1969 23:59:59 GMT", -1),
            ("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_777),
            ("Sunday, 06-Nov-94 08:49:37 GMT", 784_111_777),
            ("Sun Nov  6 08:49:37 1994", 784_111_777),
            ("Tue, 29 Feb 2000 12:00:00 GMT", 951_825_600),
            ("01 Jan 00 00:00:00", 946_684_800),
            ("Sat, 31 Dec 2069 23:59:59 GMT", 3_155_759_999),
            ("Fri, 01 Jan 2100 00:00:00 GMT", 4_102_444_800),
            ("Mon, 01 Jan 1601 00:00:00 GMT", -11_644_473_600),
            ("Fri, 31 Dec 9999 23:59:59 GMT", 253_402_300_799),
        ] {
            assert_eq!(cookie_date(date.as_bytes()), Some(at), "{date}");
        }
        assert_eq!(cookie_date(b""), None);
        assert_eq!(cookie_date(&[0xff; 64]), None);
    }

    #[test]
    fn max_age_is_whole_seconds_never_zero_and_at_most_400_days() {
        let with = |max_age| {
            let header = CookieInsert::new("srv", &[7u8; 32][..])
                .max_age(max_age)
                .set_cookie("v")
                .unwrap();
            header.to_str().unwrap().to_owned()
        };
        assert!(with(Duration::from_millis(500)).contains("; Max-Age=1;"));
        assert!(with(Duration::from_millis(1500)).contains("; Max-Age=2;"));
        assert!(with(Duration::from_secs(3600)).contains("; Max-Age=3600;"));
        assert!(with(Duration::MAX).contains("; Max-Age=34560000;"));
        assert_eq!(
            CookieInsert::new("srv", &[7u8; 32][..])
                .max_age(Duration::MAX)
                .renew_after(),
            Some(MAX_COOKIE_AGE / 2)
        );
    }

    /// A zero `Max-Age` is none: the cookie ends with the browser session
    /// and is not sent again, rather than being sent with `Max-Age=1` on
    /// every response.
    #[test]
    fn a_zero_max_age_is_a_browser_session_cookie() {
        let plain = CookieInsert::new("srv", [7u8; 32]);
        let zero = plain.clone().max_age(Duration::ZERO);
        assert_eq!(
            zero.set_cookie("v").unwrap(),
            "srv=v; Path=/; HttpOnly; SameSite=Lax; Secure"
        );
        assert_eq!(zero.set_cookie("v"), plain.set_cookie("v"));
        assert_eq!(zero.renew_after(), None);
        // It also undoes an earlier one.
        let undone = plain
            .max_age(Duration::from_secs(60))
            .max_age(Duration::ZERO);
        assert_eq!(undone.set_cookie("v"), zero.set_cookie("v"));
        assert_eq!(undone.renew_after(), None);
    }

    mod hostile {
        //! Generated cookie values, dates and `Set-Cookie` lines, valid ones
        //! with one change and arbitrary bytes.

        use super::*;
        use proptest::prelude::*;

        /// The bytes a header value may hold: visible ASCII, tab and
        /// obs-text.
        fn header_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(
                prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff],
                0..max,
            )
        }

        fn names() -> impl Strategy<Value = String> {
            "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}"
        }

        /// Backend ids of 1 to 768 bytes, in any script.
        fn backend_ids() -> impl Strategy<Value = String> {
            prop_oneof![
                "\\PC{1,40}",
                (1usize..=MAX_BACKEND_ID).prop_map(|n| "b".repeat(n)),
                (1usize..=MAX_BACKEND_ID / 4).prop_map(|n| "\u{1F980}".repeat(n)),
            ]
            .prop_filter("at most 768 bytes", |id| id.len() <= MAX_BACKEND_ID)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever the name, secret and backend id (up to the longest
            /// the cookie carries), the value issued reads back as issued.
            #[test]
            fn issued_values_read_back(
                name in names(),
                secret in proptest::collection::vec(any::<u8>(), MIN_SECRET..80),
                id in backend_ids(),
            ) {
                let c = CookieInsert::new(name, &secret);
                let sid = CookieInsert::new_session_id();
                let value = c.value(&sid, &BackendId::from(id.as_str()));
                prop_assert!(c.set_cookie(&value).is_some());
                let parsed = Parsed::new(value.as_bytes()).unwrap();
                prop_assert_eq!(parsed.session, sid.as_str());
                prop_assert_eq!(c.verify(&parsed), Ok((BackendId::from(id.as_str()), true)));
            }

            /// Any one change to an issued value (a byte replaced, removed
            /// or added, or the value cut short) is refused, as is any
            /// issued value under another name or secret.
            #[test]
            fn any_change_to_an_issued_value_is_refused(
                id in backend_ids(),
                at in any::<proptest::sample::Index>(),
                byte in any::<u8>(),
                change in 0..4u8,
            ) {
                let c = cookie();
                let value = c.value(&CookieInsert::new_session_id(), &BackendId::from(id.as_str()));
                let mut changed = value.clone().into_bytes();
                let i = at.index(changed.len());
                match change {
                    0 if changed[i] != byte => changed[i] = byte,
                    0 => changed[i] = byte.wrapping_add(1),
                    1 => { changed.remove(i); }
                    2 => changed.insert(i, byte),
                    _ => changed.truncate(i),
                }
                prop_assert!(verify(&c, &changed).is_err(), "{:?}", String::from_utf8_lossy(&changed));
                prop_assert!(verify(&CookieInsert::new("srv", [2u8; 32]), value.as_bytes()).is_err());
                prop_assert!(verify(&CookieInsert::new("srx", [1u8; 32]), value.as_bytes()).is_err());
            }

            /// Values of the right outline with made-up parts, and arbitrary
            /// bytes, are refused without a panic, by the current and the
            /// previous secrets alike.
            #[test]
            fn made_up_values_are_refused(
                session in "[A-Za-z0-9_-]{20,24}",
                backend in "[A-Za-z0-9_=.-]{0,1100}",
                tag in "[A-Za-z0-9_-]{20,24}",
                raw in header_bytes(2000),
            ) {
                let c = cookie().previous_secret([3u8; 32]);
                let outlined = format!("{session}.{backend}.{tag}");
                prop_assert!(verify(&c, outlined.as_bytes()).is_err());
                prop_assert!(verify(&c, &raw).is_err());
            }

            /// A date written in any of the forms browsers read names the
            /// instant a plain count of days gives; a day past the month's
            /// end, or a time past 23:59:59, names none.
            #[test]
            fn cookie_dates_agree_with_a_count_of_days(
                year in 1601i64..=9999,
                month in 1u32..=12,
                day in 1u32..=31,
                (hour, minute, second) in (0u32..24, 0u32..60, 0u32..60),
                form in 0..4u8,
                weekday in "(Mon|Tue|Wed|Thu|Fri|Sat|Sun|Sunday|Xyz)",
            ) {
                const MONTHS: [&str; 12] = [
                    "Jan", "Feb", "Mar", "Apr", "May", "Jun",
                    "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
                ];
                let mon = MONTHS[month as usize - 1];
                let leap = |y: i64| y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
                let length = |y: i64, m: u32| match m {
                    2 if leap(y) => 29,
                    2 => 28,
                    4 | 6 | 9 | 11 => 30,
                    _ => 31,
                };
                // Two-digit years are 1970 to 2069.
                let short = (1970..2070).contains(&year);
                let text = match form {
                    0 => format!("{weekday}, {day:02} {mon} {year} {hour:02}:{minute:02}:{second:02} GMT"),
                    1 if short => format!("{weekday}, {day:02}-{mon}-{:02} {hour:02}:{minute:02}:{second:02} GMT", year % 100),
                    2 => format!("{weekday} {mon} {day:>2} {hour}:{minute}:{second} {year}"),
                    _ => format!("{year}/{} {day}; {hour}:{minute:02}:{second}", mon.to_uppercase()),
                };
                let expected = (day <= length(year, month)).then(|| {
                    let mut days = 0i64;
                    for y in year.min(1970)..year.max(1970) {
                        days += if leap(y) { 366 } else { 365 };
                    }
                    if year < 1970 {
                        days = -days;
                    }
                    for m in 1..month {
                        days += i64::from(length(year, m));
                    }
                    days += i64::from(day) - 1;
                    days * 86_400 + i64::from(hour * 3_600 + minute * 60 + second)
                });
                prop_assert_eq!(cookie_date(text.as_bytes()), expected, "{}", text);
                let late = format!("{day:02} {mon} {year} 24:{minute:02}:{second:02}");
                prop_assert_eq!(cookie_date(late.as_bytes()), None, "{}", late);
            }

            /// Arbitrary bytes, and a valid date with one byte changed, are
            /// read without a panic; a date is always within the years read.
            #[test]
            fn any_bytes_are_read_as_a_date_or_none(
                raw in proptest::collection::vec(any::<u8>(), 0..200),
                at in any::<proptest::sample::Index>(),
                byte in any::<u8>(),
            ) {
                let bounds = -11_644_473_600..=253_402_300_799;
                if let Some(at) = cookie_date(&raw) {
                    prop_assert!(bounds.contains(&at));
                }
                let mut date = b"Sun, 06 Nov 1994 08:49:37 GMT".to_vec();
                let i = at.index(date.len());
                date[i] = byte;
                if let Some(at) = cookie_date(&date) {
                    prop_assert!(bounds.contains(&at));
                }
            }

            /// Whatever a response's `Set-Cookie` lines hold, learning ends
            /// without a panic, and a value learned is one a line for the
            /// name set; the last line, when it sets a value, is what is
            /// learned, and lines that all delete the cookie delete it.
            #[test]
            fn learning_reads_what_the_lines_say(
                lines in proptest::collection::vec(
                    prop_oneof![
                        header_bytes(60),
                        (
                            "(JSESSIONID|JSESSIONIDX|other)",
                            "(|v1|\"v2\"|\"|v=3| v4 )",
                            proptest::collection::vec(
                                "(Path=/|Path=/app|path=app|Domain=\\.A\\.example|domain=a\\.example|Max-Age=0|Max-Age=-1|max-age = 10|Max-Age=x|Expires=Thu, 01 Jan 1970 00:00:00 GMT|Expires=Fri, 01 Jan 2100 00:00:00 GMT|Expires=garbage|HttpOnly|=|;)",
                                0..4,
                            ),
                        )
                            .prop_map(|(name, value, attrs)| {
                                let mut line = format!("{name}={value}");
                                for attr in attrs {
                                    line.push_str("; ");
                                    line.push_str(&attr);
                                }
                                line.into_bytes()
                            }),
                    ],
                    0..6,
                ),
                request_path in proptest::option::of("(/|/app|/app/x|/other|\\*)"),
            ) {
                let mut h = HeaderMap::new();
                for line in &lines {
                    h.append(SET_COOKIE, HeaderValue::from_bytes(line).unwrap());
                }
                let name = "JSESSIONID";
                // A line's value when it names the cookie.
                let value_of = |line: &[u8]| -> Option<Vec<u8>> {
                    let pair = line.split(|&b| b == b';').next()?;
                    let eq = pair.iter().position(|&b| b == b'=')?;
                    (pair[..eq].trim_ascii() == name.as_bytes())
                        .then(|| unquote(pair[eq + 1..].trim_ascii()).to_vec())
                };
                let ours: Vec<&Vec<u8>> = lines.iter().filter(|l| value_of(l).is_some()).collect();
                let learned = learn(&h, name, request_path.as_deref());
                match &learned {
                    None => {}
                    Some(Learned::Set(v)) => {
                        prop_assert!(!v.is_empty());
                        prop_assert!(ours.iter().any(|l| value_of(l).as_deref() == Some(*v)));
                    }
                    Some(Learned::Deleted) => prop_assert!(!ours.is_empty()),
                }
                if ours.is_empty() {
                    prop_assert_eq!(learned, None);
                } else if let Some(last) = ours.last() {
                    // The last line alone, to know whether it sets a value.
                    let mut alone = HeaderMap::new();
                    alone.append(SET_COOKIE, HeaderValue::from_bytes(last).unwrap());
                    if let Some(Learned::Set(v)) = learn(&alone, name, None) {
                        prop_assert_eq!(learned, Some(Learned::Set(v)));
                    }
                    let deletes = |line: &Vec<u8>| {
                        let mut alone = HeaderMap::new();
                        alone.append(SET_COOKIE, HeaderValue::from_bytes(line).unwrap());
                        learn(&alone, name, None) == Some(Learned::Deleted)
                    };
                    if request_path.is_none() && ours.iter().all(|l| deletes(l)) {
                        prop_assert_eq!(learn(&h, name, None), Some(Learned::Deleted));
                    }
                }
            }

        }
    }
}
