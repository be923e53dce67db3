//! Request keys: what a consistent-hash strategy routes by.
//!
//! A [`RequestKey`] reads a request's head and returns a 64-bit hash, or
//! `None` when the request carries no key (an absent or empty header, no such
//! cookie, ...). Keys are hashed with XXH3 and a fixed seed, so every replica
//! of an application maps a key to the same hash: the built-in keys hash
//! bytes, alike whatever machine and compiler built the replica; a
//! [`from_fn`] key hashes what its value's `Hash` implementation feeds the
//! hasher, which Rust keeps alike only among replicas built by the same
//! compiler, unless the value is [`AsBytes`] (see [`from_fn`]).
//!
//! | key | reads |
//! |---|---|
//! | [`header`] | the first value of a header |
//! | [`cookie`] | one cookie's value from the `Cookie` headers |
//! | [`forwarded_for`] | a client address from `X-Forwarded-For` |
//! | [`peer_ip`] | the client address in the [`PeerAddr`] extension |
//! | [`from_fn`] | any closure |
//!
//! Combine them with [`RequestKey::or`]: `forwarded_for().or(peer_ip())` is
//! the client's address as the Panda API gateway hashes it (the forwarded
//! client, else the peer).
//!
//! ```
//! use tower_ha::key::{self, RequestHead, RequestKey};
//!
//! let req = http::Request::builder()
//!     .header("x-user", "alice")
//!     .body(())
//!     .unwrap();
//! let by_user = key::header("x-user");
//! let by_session = key::cookie("session").or(key::header("x-user"));
//! let head = RequestHead::from(&req);
//! assert_eq!(by_user.key(&head), Some(key::hash_bytes(b"alice")));
//! assert_eq!(by_session.key(&head), by_user.key(&head));
//! ```

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use http::header::{GetAll, HeaderName, HeaderValue, COOKIE};
use http::{Extensions, HeaderMap, Method, Request, Uri};
use twox_hash::XxHash3_64;

use crate::extensions::PeerAddr;
use crate::sticky::CookieConfigError;

/// Hashes bytes the way every built-in key does (XXH3, seed 0): the
/// header and cookie keys hash their value's bytes with it, the address
/// keys their address's octets, and a [`from_fn`] key an [`AsBytes`]
/// value's bytes. Any other [`from_fn`] key hashes what its value's `Hash`
/// implementation feeds the hasher instead (for a string today, its bytes
/// then `0xff`), which this does not reproduce.
#[inline]
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    XxHash3_64::oneshot(bytes)
}

/// A borrowed view of a request's head: what keys and strategies may read.
///
/// Built from a request with `RequestHead::from(&request)`; more parts of
/// the head may be added.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// The URI.
    pub uri: &'a Uri,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The extensions.
    pub extensions: &'a Extensions,
}

impl<'a, B> From<&'a Request<B>> for RequestHead<'a> {
    fn from(req: &'a Request<B>) -> Self {
        RequestHead {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }
}

/// Reads a routing key from a request.
pub trait RequestKey: Send + Sync + 'static {
    /// The key's hash, or `None` when the request has no key.
    fn key(&self, head: &RequestHead<'_>) -> Option<u64>;

    /// This key, or `other` when this one is absent.
    fn or<K: RequestKey>(self, other: K) -> Or<Self, K>
    where
        Self: Sized,
    {
        Or(self, other)
    }
}

/// A key chosen at run time (from a configuration, say), boxed.
///
/// ```
/// use tower_ha::balance::ConsistentHash;
/// use tower_ha::key::{self, RequestKey};
///
/// let by_user = true;
/// let key: Box<dyn RequestKey> = if by_user {
///     Box::new(key::header("x-user"))
/// } else {
///     Box::new(key::peer_ip())
/// };
/// let strategy = ConsistentHash::maglev(key);
/// # let _ = strategy;
/// ```
impl<K: RequestKey + ?Sized> RequestKey for Box<K> {
    #[inline]
    fn key(&self, head: &RequestHead<'_>) -> Option<u64> {
        (**self).key(head)
    }
}

/// A key shared by several strategies.
impl<K: RequestKey + ?Sized> RequestKey for std::sync::Arc<K> {
    #[inline]
    fn key(&self, head: &RequestHead<'_>) -> Option<u64> {
        (**self).key(head)
    }
}

/// The first key, or the second when the first is absent.
/// Built by [`RequestKey::or`].
#[derive(Debug, Clone)]
pub struct Or<A, B>(A, B);

impl<A: RequestKey, B: RequestKey> RequestKey for Or<A, B> {
    #[inline]
    fn key(&self, head: &RequestHead<'_>) -> Option<u64> {
        self.0.key(head).or_else(|| self.1.key(head))
    }
}

/// The first value of a header; absent when missing or empty.
///
/// # Panics
///
/// When `name` is not a valid header name (a configuration mistake, as with
/// `HeaderName::from_static`).
pub fn header(name: impl TryInto<HeaderName, Error: fmt::Debug>) -> Header {
    Header {
        name: name.try_into().expect("invalid header name"),
    }
}

/// The key read by [`header`].
#[derive(Debug, Clone)]
pub struct Header {
    name: HeaderName,
}

impl RequestKey for Header {
    #[inline]
    fn key(&self, head: &RequestHead<'_>) -> Option<u64> {
        let value = head.headers.get(&self.name)?.as_bytes();
        (!value.is_empty()).then(|| hash_bytes(value))
    }
}

/// The value of the cookie `name`; absent when missing or empty.
///
/// # Panics
///
/// When no `Cookie` header could hold a pair named `name`, which would
/// never be found: empty, with `=` or `;`, white space at either end, or a
/// control character. Names outside RFC 6265's token set that browsers
/// still send (`cart[1]`) are taken. For a name read at run time,
/// [`try_cookie`] returns an error instead.
#[track_caller]
pub fn cookie(name: impl Into<String>) -> Cookie {
    match try_cookie(name) {
        Ok(cookie) => cookie,
        Err(e) => panic!("{e}"),
    }
}

/// [`cookie`] for a name read at run time: an error instead of a panic
/// when no `Cookie` header could hold a pair named `name`.
///
/// ```
/// use tower_ha::key;
/// use tower_ha::sticky::CookieConfigError;
///
/// assert!(key::try_cookie("session").is_ok());
/// assert_eq!(
///     key::try_cookie("a;b").unwrap_err(),
///     CookieConfigError::InvalidName("a;b".into())
/// );
/// ```
pub fn try_cookie(name: impl Into<String>) -> Result<Cookie, CookieConfigError> {
    Ok(Cookie {
        name: CookieName::checked(name.into())?,
    })
}

/// Whether `name` is a cookie name as RFC 6265 defines it: a non-empty
/// token (what the layer's own cookie is held to).
pub(crate) fn is_cookie_name(name: &str) -> bool {
    is_token(name.as_bytes())
}

/// Whether `value` is a token (RFC 9110 section 5.6.2): one or more of
/// letters, digits and ``!#$%&'*+-.^_`|~``.
pub(crate) fn is_token(value: &[u8]) -> bool {
    !value.is_empty()
        && (value.iter()).all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// Whether a `Cookie` header may hold a pair named `name` (see
/// [`CookieName::checked`]).
fn is_matchable(name: &str) -> bool {
    !name.is_empty()
        && name.trim_ascii() == name
        && !name
            .bytes()
            .any(|b| b == b'=' || b == b';' || b.is_ascii_control())
}

/// The key read by [`cookie`].
#[derive(Debug, Clone)]
pub struct Cookie {
    name: CookieName,
}

impl RequestKey for Cookie {
    #[inline]
    fn key(&self, head: &RequestHead<'_>) -> Option<u64> {
        self.name
            .find_in(&head.headers.get_all(COOKIE))
            .map(hash_bytes)
    }
}

/// Finds the non-empty value of cookie `name` in the request's `Cookie`
/// headers, without allocating. Malformed pairs are skipped; surrounding
/// double quotes are removed. (It prepares a search for `name` on each
/// call; [`cookie`] prepares its own once.) A name no `Cookie` header
/// could hold (empty, with `=` or `;`, say) has no value.
pub fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    if !is_matchable(name) {
        return None;
    }
    CookieName::new(name).find_in(&headers.get_all(COOKIE))
}

/// A cookie name with a search for it prepared once: finds the cookie's
/// value in `Cookie` headers by looking for the name, not by splitting the
/// headers at every `;`. Clones share the search.
#[derive(Clone)]
pub(crate) struct CookieName {
    name: Arc<str>,
    finder: Arc<memchr::memmem::Finder<'static>>,
}

impl fmt::Debug for CookieName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.name, f)
    }
}

impl CookieName {
    /// A name that a `Cookie` header can hold (see [`checked`](Self::checked)).
    pub(crate) fn new(name: &str) -> Self {
        debug_assert!(is_matchable(name), "invalid cookie name {name:?}");
        CookieName {
            finder: Arc::new(memchr::memmem::Finder::new(name.as_bytes()).into_owned()),
            name: name.into(),
        }
    }

    /// A name a configuration gives, refused when no `Cookie` header could
    /// hold a pair named `name`: empty, with `=` (a pair's name ends at its
    /// first one) or `;` (it ends the pair), white space at either end
    /// (trimmed away), or a control character. Names outside RFC 6265's
    /// token set that browsers still send (`cart[1]`) are taken.
    pub(crate) fn checked(name: String) -> Result<Self, CookieConfigError> {
        if !is_matchable(&name) {
            return Err(CookieConfigError::InvalidName(name));
        }
        Ok(CookieName::new(&name))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.name
    }

    /// The cookie's non-empty value in the first of `values` that has one.
    pub(crate) fn find_in<'h>(&self, values: &GetAll<'h, HeaderValue>) -> Option<&'h [u8]> {
        values
            .iter()
            .find_map(|value| self.first_in_header(value.as_bytes()))
    }

    /// The cookie's first non-empty value in one `Cookie` header.
    #[inline]
    pub(crate) fn first_in_header<'h>(&self, header: &'h [u8]) -> Option<&'h [u8]> {
        self.next_in_header(header, &mut 0)
    }

    /// The cookie's non-empty values in `values`, in order: a client may
    /// send several of one name (set for different paths or domains).
    pub(crate) fn all_in<'a, 'h: 'a>(
        &'a self,
        values: &GetAll<'h, HeaderValue>,
    ) -> impl Iterator<Item = &'h [u8]> + 'a {
        values.iter().flat_map(move |value| {
            let (header, mut from) = (value.as_bytes(), 0);
            std::iter::from_fn(move || self.next_in_header(header, &mut from))
        })
    }

    /// The cookie's next non-empty value in `header` at or after `from`,
    /// which it moves past the value.
    fn next_in_header<'h>(&self, header: &'h [u8], from: &mut usize) -> Option<&'h [u8]> {
        let name_len = self.name.len();
        while let Some(offset) = header.get(*from..).and_then(|h| self.finder.find(h)) {
            let at = *from + offset;
            // A name only starts a pair after the `;` and white space.
            if matches!(header[..at].trim_ascii_end().last(), None | Some(b';')) {
                let rest = &header[at + name_len..];
                let end = memchr::memchr(b';', rest).unwrap_or(rest.len());
                // The next pair, if any (always forward, even for an
                // empty name before a `;`).
                *from = (at + name_len + end).max(at + 1);
                if let Some(v) = rest[..end].trim_ascii_start().strip_prefix(b"=") {
                    let v = unquote(v.trim_ascii());
                    if !v.is_empty() {
                        return Some(v);
                    }
                }
            } else {
                *from = at + 1;
            }
        }
        None
    }
}

/// A cookie value without the double quotes that may surround it.
pub(crate) fn unquote(value: &[u8]) -> &[u8] {
    value
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(value)
}

/// A client address from `X-Forwarded-For`.
///
/// By default the leftmost non-empty entry, which the client itself can
/// forge. Behind proxies you run, set [`ForwardedFor::trusted_hops`] to their
/// number so that the address your outermost proxy saw is used instead.
///
/// An entry that is an address, with or without a port, brackets or an IPv6
/// zone (`1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:80`, `fe80::1%eth0`), keys as [`peer_ip`] keys that
/// address; any other entry keys as its text.
pub fn forwarded_for() -> ForwardedFor {
    ForwardedFor { trusted_hops: 0 }
}

/// The key read by [`forwarded_for`].
#[derive(Debug, Clone)]
pub struct ForwardedFor {
    trusted_hops: usize,
}

impl ForwardedFor {
    /// The number of proxies of yours that append to `X-Forwarded-For` in
    /// front of this one. With `n > 0` the key is the `n`-th entry from the
    /// right (the address that your outermost proxy saw), which a client
    /// cannot forge, and a request with fewer than `n` entries (one that
    /// did not come through all of your proxies) has no key, so that
    /// [`or`](RequestKey::or) falls back, as Envoy's `xff_num_trusted_hops`
    /// falls back to the peer's address; with 0 (the default) the leftmost
    /// entry.
    pub fn trusted_hops(mut self, n: usize) -> Self {
        self.trusted_hops = n;
        self
    }

    fn entry<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        let entries = || list_elements(headers.get_all("x-forwarded-for"));
        if self.trusted_hops == 0 {
            return entries().next();
        }
        let skip = entries().count().checked_sub(self.trusted_hops)?;
        entries().nth(skip)
    }
}

impl RequestKey for ForwardedFor {
    fn key(&self, head: &RequestHead<'_>) -> Option<u64> {
        let entry = self.entry(head.headers)?;
        let ip = std::str::from_utf8(entry).ok().and_then(forwarded_ip);
        Some(ip.map_or_else(|| hash_bytes(entry), hash_ip))
    }
}

/// `bytes` after `prefix`, compared without regard to case.
pub(crate) fn strip_prefix_ignore_case<'a>(bytes: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let (start, rest) = bytes.split_at_checked(prefix.len())?;
    start.eq_ignore_ascii_case(prefix).then_some(rest)
}

/// `digits` as a number: one ASCII digit or more and nothing else, as the
/// HTTP grammars that carry numbers have them (`str::parse` would also
/// take a sign); `None` past `T`'s range.
pub(crate) fn decimal<T: std::str::FromStr>(digits: &[u8]) -> Option<T> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The elements of a list header's `lines` (RFC 9110, section 5.6.1):
/// separated by commas, trimmed, empty ones skipped.
///
/// As bytes: a byte past ASCII in one element (which then equals no name
/// or token) leaves the others on its line readable. (Read as text, such
/// a line would name nothing, and the headers it names would be
/// forwarded.)
pub(crate) fn list_elements<'a>(
    lines: impl IntoIterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = &'a [u8]> {
    lines
        .into_iter()
        .flat_map(|line| line.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|element| !element.is_empty())
}

/// The elements of a list header's `value` whose elements may hold quoted
/// strings (`Cache-Control`, `WWW-Authenticate`), untrimmed: split at
/// commas outside quoted strings, in which a backslash quotes the next
/// byte (`\"` does not end the string).
pub(crate) fn quoted_list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let (mut quoted, mut escaped) = (false, false);
    value.split(move |&b| {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else {
            quoted ^= b == b'"';
        }
        b == b',' && !quoted
    })
}

/// The address in an `X-Forwarded-For` entry, with a port (`1.2.3.4:80`,
/// `[::1]:80`) or without (`1.2.3.4`, `::1`, `[::1]`), an IPv6 zone
/// (`fe80::1%eth0`, `[fe80::1%eth0]:80`) dropped, so that it keys as the
/// peer's address does; `None` for anything else, which keys as text.
fn forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    let host = match s.strip_prefix('[') {
        Some(rest) => {
            let (host, port) = rest.split_once(']')?;
            if !port.is_empty() {
                port.strip_prefix(':')?.parse::<u16>().ok()?;
            }
            host
        }
        None => s,
    };
    let addr = match host.split_once('%') {
        Some((addr, zone)) if !zone.is_empty() => addr,
        Some(_) => return None,
        None => host,
    };
    addr.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// The client's IP address from the [`PeerAddr`] extension.
pub fn peer_ip() -> PeerIp {
    PeerIp { _priv: () }
}

/// The key read by [`peer_ip`].
#[derive(Debug, Clone)]
pub struct PeerIp {
    _priv: (),
}

impl RequestKey for PeerIp {
    #[inline]
    fn key(&self, head: &RequestHead<'_>) -> Option<u64> {
        head.extensions.get::<PeerAddr>().map(|p| hash_ip(p.0.ip()))
    }
}

/// Hashes an address so that [`forwarded_for`] and [`peer_ip`] agree.
fn hash_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

/// A key computed by a closure from the request head; any `Hash` value
/// works (`None` means "no key"). The value's `Hash` implementation feeds
/// an XXH3 hasher (seed 0) that writes each integer it is given
/// little-endian at a fixed width (`usize` as 64 bits).
///
/// Which replicas map a key to the same hash:
///
/// * **Built by the same compiler**, on machines of any byte order or word
///   size: every key whose integers reach the hasher one by one (numbers,
///   strings, tuples, `#[derive(Hash)]` types of those). Slices, arrays and
///   `Vec`s of integers wider than a byte are the exception: std feeds
///   them as their memory, in the machine's byte order and word size.
/// * **Built by different Rust versions** (replicas part-way through a
///   rolling upgrade of the toolchain, say): only keys hashed as bytes.
///   What std's `Hash` implementations and `#[derive(Hash)]` feed a hasher
///   around the data is not specified, and may change between versions:
///   today a `str` or `String` is its bytes then `0xff`; a slice, `Vec` or
///   `bytes::Bytes` of bytes its length (as a `usize`) then its bytes; a
///   derived enum its discriminant first. Return such a key as
///   [`AsBytes`]: hashed as its bytes alone, exactly as [`hash_bytes`] and
///   the header and cookie keys hash theirs.
///
/// ```
/// use tower_ha::key::{self, RequestHead, RequestKey};
///
/// // The kernel id in `/api/kernels/{id}/...`.
/// let kernel = key::from_fn(|req: &RequestHead<'_>| {
///     let mut parts = req.uri.path().strip_prefix("/api/kernels/")?.split('/');
///     parts.next().filter(|id| !id.is_empty()).map(str::to_owned)
/// });
/// let req = http::Request::get("/api/kernels/42/channels").body(()).unwrap();
/// assert!(kernel.key(&RequestHead::from(&req)).is_some());
/// let req = http::Request::get("/api/other").body(()).unwrap();
/// assert!(kernel.key(&RequestHead::from(&req)).is_none());
///
/// // The same key, hashed as its bytes alone: alike whatever Rust version
/// // built the replica, and equal to a header key of the same value.
/// let kernel = key::from_fn(|req: &RequestHead<'_>| {
///     let mut parts = req.uri.path().strip_prefix("/api/kernels/")?.split('/');
///     parts.next().filter(|id| !id.is_empty()).map(|id| key::AsBytes(id.to_owned()))
/// });
/// let req = http::Request::get("/api/kernels/42/channels").body(()).unwrap();
/// assert_eq!(kernel.key(&RequestHead::from(&req)), Some(key::hash_bytes(b"42")));
/// ```
pub fn from_fn<F, T>(f: F) -> FromFn<F>
where
    F: Fn(&RequestHead<'_>) -> Option<T> + Send + Sync + 'static,
    T: Hash,
{
    FromFn { f }
}

/// A [`from_fn`] value hashed as its bytes alone (`String`, `Vec<u8>`,
/// `bytes::Bytes`, a `HeaderValue`, ...), as [`hash_bytes`] hashes them:
/// no length, terminator or other framing of std's, so that replicas built
/// by different Rust versions map it alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsBytes<B>(pub B);

impl<B: AsRef<[u8]>> Hash for AsBytes<B> {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_ref());
    }
}

/// The key computed by [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F> {
    f: F,
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn").finish_non_exhaustive()
    }
}

impl<F, T> RequestKey for FromFn<F>
where
    F: Fn(&RequestHead<'_>) -> Option<T> + Send + Sync + 'static,
    T: Hash,
{
    fn key(&self, head: &RequestHead<'_>) -> Option<u64> {
        let value = (self.f)(head)?;
        let mut hasher = Portable(XxHash3_64::with_seed(0));
        value.hash(&mut hasher);
        Some(hasher.finish())
    }
}

/// A hasher that writes integers little-endian at a fixed width, where
/// `Hasher`'s defaults write them in the machine's byte order and word
/// size.
struct Portable(XxHash3_64);

macro_rules! portable_writes {
    ($($name:ident: $t:ty => $as:ty),* $(,)?) => {
        $(
            #[inline]
            fn $name(&mut self, n: $t) {
                self.0.write(&(n as $as).to_le_bytes());
            }
        )*
    };
}

impl Hasher for Portable {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    portable_writes! {
        write_u16: u16 => u16,
        write_u32: u32 => u32,
        write_u64: u64 => u64,
        write_u128: u128 => u128,
        write_usize: usize => u64,
        write_i16: i16 => i16,
        write_i32: i32 => i32,
        write_i64: i64 => i64,
        write_i128: i128 => i128,
        write_isize: isize => i64,
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    /// The hash of a closure's value is the same on every machine: its
    /// integers go in little-endian at a fixed width.
    #[test]
    fn a_closures_integers_hash_alike_on_every_machine() {
        let req = http::Request::new(());
        let head = RequestHead::from(&req);
        let xxh3 = |bytes: &[u8]| {
            let mut hasher = XxHash3_64::with_seed(0);
            hasher.write(bytes);
            hasher.finish()
        };
        let key = |k: &dyn RequestKey| k.key(&head).unwrap();
        assert_eq!(key(&from_fn(|_| Some(0x0102_0304u32))), xxh3(&[4, 3, 2, 1]));
        assert_eq!(key(&from_fn(|_| Some(7usize))), xxh3(&7u64.to_le_bytes()));
        assert_eq!(
            key(&from_fn(|_| Some(-2isize))),
            xxh3(&(-2i64).to_le_bytes())
        );
        // A pair: each part in turn.
        let mut both = 1u16.to_le_bytes().to_vec();
        both.extend(2u64.to_le_bytes());
        assert_eq!(key(&from_fn(|_| Some((1u16, 2u64)))), xxh3(&both));
    }

    /// A closure's bytes hash as a header's value does, whatever holds
    /// them.
    #[test]
    fn a_closures_bytes_hash_as_the_built_in_keys_do() {
        let req = http::Request::new(());
        let head = RequestHead::from(&req);
        let key = |k: &dyn RequestKey| k.key(&head).unwrap();
        let alice = hash_bytes(b"alice");
        assert_eq!(key(&from_fn(|_| Some(AsBytes("alice")))), alice);
        assert_eq!(
            key(&from_fn(|_| Some(AsBytes(String::from("alice"))))),
            alice
        );
        assert_eq!(key(&from_fn(|_| Some(AsBytes(b"alice".to_vec())))), alice);
        assert_eq!(
            key(&from_fn(|_| Some(AsBytes(bytes::Bytes::from_static(
                b"alice"
            ))))),
            alice
        );
        assert_eq!(key(&from_fn(|_| Some(AsBytes(*b"alice")))), alice);
        let with_alice = http::Request::builder()
            .header("x-user", "alice")
            .body(())
            .unwrap();
        assert_eq!(
            header("x-user").key(&RequestHead::from(&with_alice)),
            Some(alice)
        );
    }

    /// What std feeds the hasher for strings and byte vectors as of this
    /// writing, which [`from_fn`]'s docs describe (Rust does not promise
    /// it: a failure here after a toolchain upgrade means the docs need
    /// updating, and that such keys moved).
    #[test]
    fn a_closures_strings_and_byte_vectors_hash_with_std_framing() {
        let req = http::Request::new(());
        let head = RequestHead::from(&req);
        let key = |k: &dyn RequestKey| k.key(&head).unwrap();
        assert_eq!(
            key(&from_fn(|_| Some(String::from("alice")))),
            hash_bytes(b"alice\xff")
        );
        let mut framed = 5u64.to_le_bytes().to_vec();
        framed.extend(b"alice");
        assert_eq!(
            key(&from_fn(|_| Some(b"alice".to_vec()))),
            hash_bytes(&framed)
        );
    }

    /// Names outside the token set that browsers still send (PHP's
    /// array cookies, say) are matched; one with `=` never is.
    #[test]
    fn a_cookie_key_matches_the_names_browsers_send() {
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, HeaderValue::from_static("cart[1]=x; a=b=c"));
        assert_eq!(cookie_value(&headers, "cart[1]"), Some(&b"x"[..]));
        assert_eq!(cookie_value(&headers, "a=b"), None);
        assert_eq!(cookie_value(&headers, "a"), Some(&b"b=c"[..]));
    }

    /// A name no pair could have matches nothing, and a configuration
    /// that gives one is refused: it would never find its cookie.
    #[test]
    fn a_name_no_pair_could_have_is_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, HeaderValue::from_static("=x; a=1"));
        assert_eq!(cookie_value(&headers, ""), None);
        for name in ["", "a ", " a", "a;b", "a=b", "a\tb"] {
            assert!(
                std::panic::catch_unwind(|| cookie(name)).is_err(),
                "{name:?} taken"
            );
        }
        assert!(std::panic::catch_unwind(|| cookie("cart[1]")).is_ok());
    }

    #[test]
    fn try_cookie_reports_what_cookie_refuses() {
        for name in ["", " a", "a;b", "a=b", "a\x01b"] {
            assert_eq!(
                try_cookie(name).unwrap_err(),
                CookieConfigError::InvalidName(name.to_owned()),
            );
        }
        assert!(try_cookie("session").is_ok());
        assert!(try_cookie("cart[1]").is_ok());
    }

    fn head_with(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn key_of(k: &impl RequestKey, req: &Request<()>) -> Option<u64> {
        k.key(&RequestHead::from(req))
    }

    #[test]
    fn cookie_parsing() {
        let req = head_with(&[
            ("cookie", "a=1; StickyStr=abc ; c=\"q\""),
            ("cookie", "d=4"),
        ]);
        assert_eq!(cookie_value(req.headers(), "StickyStr"), Some(&b"abc"[..]));
        assert_eq!(cookie_value(req.headers(), "c"), Some(&b"q"[..]));
        assert_eq!(cookie_value(req.headers(), "d"), Some(&b"4"[..]));
        assert_eq!(cookie_value(req.headers(), "e"), None);
        let spaced = head_with(&[("cookie", "StickyStrX=no;StickyStr =yes")]);
        assert_eq!(
            cookie_value(spaced.headers(), "StickyStr"),
            Some(&b"yes"[..])
        );
        let later = head_with(&[("cookie", "s=; s=second")]);
        assert_eq!(cookie_value(later.headers(), "s"), Some(&b"second"[..]));
        assert_eq!(cookie_value(later.headers(), "s="), None);
        let empty = head_with(&[("cookie", "StickyStr=; broken; =x")]);
        assert_eq!(cookie_value(empty.headers(), "StickyStr"), None);
        assert_eq!(key_of(&cookie("StickyStr"), &empty), None);
    }

    proptest::proptest! {
        #[test]
        fn cookie_value_agrees_with_the_reference(
            headers in proptest::collection::vec("[ab= ;\"\t]{0,24}", 0..3),
            name in "[ab=]{0,2}",
        ) {
            let mut map = HeaderMap::new();
            for h in &headers {
                map.append(COOKIE, h.parse().unwrap());
            }
            proptest::prop_assert_eq!(
                cookie_value(&map, &name).map(<[u8]>::to_vec),
                reference_all(&map, &name).into_iter().next()
            );
        }
    }

    /// Every non-empty value of cookie `name`, in order, as the
    /// straightforward reading of `Cookie` headers finds them.
    fn reference_all(headers: &HeaderMap, name: &str) -> Vec<Vec<u8>> {
        if !is_matchable(name) {
            return Vec::new();
        }
        let name = name.as_bytes();
        let mut found = Vec::new();
        for value in headers.get_all(COOKIE) {
            for pair in value.as_bytes().split(|&b| b == b';') {
                let pair = pair.trim_ascii();
                let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                    continue;
                };
                if pair[..eq].trim_ascii() != name {
                    continue;
                }
                let v = unquote(pair[eq + 1..].trim_ascii());
                if !v.is_empty() {
                    found.push(v.to_vec());
                }
            }
        }
        found
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Headers of names, values and separators in any order, bytes
        /// beyond ASCII and names with inner spaces or brackets included:
        /// the first value and every value agree with the reference.
        #[test]
        fn cookie_values_agree_with_the_reference_on_any_bytes(
            headers in proptest::collection::vec("[ab=; \"\t\\[\\]é,]{0,40}", 0..4),
            name in "[ab\\[\\]é]{1,2}( [ab])?",
        ) {
            let mut map = HeaderMap::new();
            for h in &headers {
                map.append(COOKIE, HeaderValue::from_str(h).unwrap());
            }
            let expected = reference_all(&map, &name);
            proptest::prop_assert_eq!(
                cookie_value(&map, &name).map(<[u8]>::to_vec),
                expected.first().cloned()
            );
            let cookie = CookieName::new(&name);
            let all: Vec<Vec<u8>> = cookie.all_in(&map.get_all(COOKIE)).map(<[u8]>::to_vec).collect();
            proptest::prop_assert_eq!(all, expected);
        }

    }

    use proptest::strategy::Strategy as _;

    /// Every way of writing an address that `X-Forwarded-For` may hold.
    fn written_addresses() -> impl proptest::strategy::Strategy<Value = (IpAddr, String)> {
        use proptest::prelude::*;
        (any::<IpAddr>(), any::<u16>(), 0..5u8, "[a-z0-9]{1,8}").prop_map(
            |(ip, port, form, zone)| {
                let text = match (ip, form) {
                    (_, 0) => ip.to_string(),
                    (IpAddr::V4(v4), _) => format!("{v4}:{port}"),
                    (IpAddr::V6(v6), 1) => format!("[{v6}]"),
                    (IpAddr::V6(v6), 2) => format!("[{v6}]:{port}"),
                    (IpAddr::V6(v6), 3) => format!("{v6}%{zone}"),
                    (IpAddr::V6(v6), _) => format!("[{v6}%{zone}]:{port}"),
                };
                (ip, text)
            },
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// An address, however written, keys as the peer's address does.
        #[test]
        fn forwarded_addresses_key_as_the_peer((ip, text) in written_addresses(), port: u16) {
            let mut peer = head_with(&[]);
            peer.extensions_mut().insert(PeerAddr(SocketAddr::new(ip, port)));
            let xff = head_with(&[("x-forwarded-for", &text)]);
            proptest::prop_assert_eq!(key_of(&forwarded_for(), &xff), key_of(&peer_ip(), &peer));
        }

        /// Entries of address characters and addresses, on any number of
        /// lines (ASCII: other bytes are keyed as they are): the key is the
        /// entry the reference picks (the leftmost, or the `n`-th from the
        /// right), keyed as its address or else as its text; fewer
        /// entries than trusted hops is no key.
        #[test]
        fn the_entry_keyed_is_the_one_trusted(
            lines in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![
                        "[0-9a-f.:\\[\\]%, \t]{0,30}",
                        written_addresses().prop_map(|(_, text)| text),
                    ],
                    0..4,
                )
                .prop_map(|entries| entries.join(",")),
                0..4,
            ),
            hops in 0usize..6,
        ) {
            let mut req = Request::new(());
            for line in &lines {
                req.headers_mut().append("x-forwarded-for", HeaderValue::from_str(line).unwrap());
            }
            let entries: Vec<&str> = lines
                .iter()
                .flat_map(|l| l.split(','))
                .map(str::trim_ascii)
                .filter(|e| !e.is_empty())
                .collect();
            let picked = match hops {
                0 => entries.first().copied(),
                n => entries.len().checked_sub(n).map(|i| entries[i]),
            };
            let expected = picked.map(|e| forwarded_ip(e).map_or_else(|| hash_bytes(e.as_bytes()), hash_ip));
            proptest::prop_assert_eq!(key_of(&forwarded_for().trusted_hops(hops), &req), expected);
        }
    }

    #[test]
    fn forwarded_for_leftmost_and_trusted() {
        let req = head_with(&[
            ("x-forwarded-for", " , 1.1.1.1, 2.2.2.2"),
            ("x-forwarded-for", "3.3.3.3"),
        ]);
        let ip = |s: &str| Some(hash_ip(s.parse().unwrap()));
        assert_eq!(key_of(&forwarded_for(), &req), ip("1.1.1.1"));
        assert_eq!(
            key_of(&forwarded_for().trusted_hops(1), &req),
            ip("3.3.3.3")
        );
        assert_eq!(
            key_of(&forwarded_for().trusted_hops(2), &req),
            ip("2.2.2.2")
        );
        // Fewer entries than trusted proxies: the request did not come
        // through them all, and every entry may be the client's own.
        assert_eq!(key_of(&forwarded_for().trusted_hops(9), &req), None);
        assert_eq!(
            key_of(&forwarded_for().trusted_hops(3), &req),
            ip("1.1.1.1")
        );
        let with_ports = head_with(&[("x-forwarded-for", "1.1.1.1:443, [2001:db8::1]:80")]);
        assert_eq!(key_of(&forwarded_for(), &with_ports), ip("1.1.1.1"));
        assert_eq!(
            key_of(&forwarded_for().trusted_hops(1), &with_ports),
            ip("2001:db8::1")
        );
        assert_eq!(key_of(&forwarded_for(), &head_with(&[])), None);
    }

    #[test]
    fn peer_and_forwarded_agree_and_or_falls_back() {
        let mut req = head_with(&[]);
        let addr: SocketAddr = "10.0.0.7:5555".parse().unwrap();
        req.extensions_mut().insert(PeerAddr(addr));
        let xff = head_with(&[("x-forwarded-for", "10.0.0.7")]);
        let k = forwarded_for().or(peer_ip());
        assert_eq!(key_of(&k, &req), key_of(&k, &xff));
        assert!(key_of(&k, &req).is_some());
    }

    #[test]
    fn bracketed_and_zoned_ipv6_entries_key_as_the_peer() {
        let mut direct = head_with(&[]);
        let addr: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        direct.extensions_mut().insert(PeerAddr(addr));
        let peer = key_of(&peer_ip(), &direct);
        assert!(peer.is_some());
        for entry in [
            "[2001:db8::1]",
            "[2001:db8::1]:80",
            "2001:db8::1%eth0",
            "[2001:db8::1%eth0]",
            "[2001:db8::1%eth0]:80",
        ] {
            let xff = head_with(&[("x-forwarded-for", entry)]);
            assert_eq!(key_of(&forwarded_for(), &xff), peer, "{entry}");
        }
        // Not an address: keyed as text, not as the address inside.
        for entry in ["[2001:db8::1]x", "[2001:db8::1]:http", "2001:db8::1%"] {
            let xff = head_with(&[("x-forwarded-for", entry)]);
            assert_eq!(
                key_of(&forwarded_for(), &xff),
                Some(hash_bytes(entry.as_bytes()))
            );
        }
    }

    #[test]
    fn empty_header_is_no_key() {
        assert_eq!(key_of(&header("x-id"), &head_with(&[("x-id", "")])), None);
        assert!(key_of(&header("x-id"), &head_with(&[("x-id", "7")])).is_some());
    }
}
