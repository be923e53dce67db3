//! Durable sessions: the [`SessionStore`] trait and its implementations.
//!
//! A [`Session`] ties a session key (a cookie value, a kernel id, ...) to the
//! [`BackendId`] that holds its state, with timestamps and opaque
//! application data: whatever the application needs to reconnect to that
//! state after a restart or on another replica.
//!
//! A store is an object-safe async trait (boxed `Send` futures), so
//! `Arc<dyn SessionStore>` works and applications can bring their own.
//!
//! | store | where sessions live |
//! |---|---|
//! | [`MemoryStore`] | this process; shared by clones (tests, one replica) |
//! | [`FileStore`] | one JSON file per session in a local directory; survives restarts (one replica) |
//! | `WebhookStore` (feature `webhook`) | the user's own HTTP service, in Enterprise Gateway's webhook wire format (several replicas) |
//! | `RedisStore` (feature `redis`) | a Redis server, with ownership leases and move notices (several replicas) |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use tower_ha::store::{MemoryStore, Session, SessionStore};
//!
//! let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::new());
//! let session = Session::new("kernel-42", "node-a".into())
//!     .with_data(serde_json::json!({"port": 52000}));
//! store.save(&session).await.unwrap();
//! let back = store.load("kernel-42").await.unwrap().unwrap();
//! assert_eq!(back.backend.as_str(), "node-a");
//! assert_eq!(back.data["port"], 52000);
//! # }
//! ```

mod error;
mod file;
mod memory;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "webhook")]
mod webhook;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::backend::BackendId;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{Claim, Invalidation, Invalidations, Lease, RedisStore, RedisStoreBuilder};
pub use error::StoreError;
pub use file::FileStore;
pub use memory::MemoryStore;
#[cfg(feature = "webhook")]
#[cfg_attr(docsrs, doc(cfg(feature = "webhook")))]
pub use webhook::{WebhookStore, WebhookStoreBuilder};

/// The most bytes a store reads for its records at once: one record file
/// of `FileStore`, one answer of `WebhookStore`'s service. A session's
/// application data is a few bytes to kilobytes.
const MAX_READ: usize = 64 * 1024 * 1024;

/// The deepest a session's [`data`](Session::data) may nest (arrays and
/// objects within each other) for a store to save it. JSON readers bound
/// nesting so that hostile input cannot exhaust their stack (`serde_json`
/// at 128 levels for a whole document, a record's outline included): a
/// record nested deeper could be written but never read back. Every store
/// of this crate refuses to save such a session, with an error that
/// [`is_rejected`](StoreError::is_rejected), and keeps its record as it was
/// ([`Session::check_depth`], for a store of your own).
pub const MAX_DATA_DEPTH: usize = 100;

/// Refuses a record of `len` bytes that a store could write but never
/// read back (its reads stop at [`MAX_READ`], with room left for what an
/// answer wraps a record in), keeping the stored record as it was.
fn check_size(len: usize) -> Result<(), StoreError> {
    const ROOM: usize = 64 * 1024;
    if len > MAX_READ - ROOM {
        return Err(StoreError::rejected(format!(
            "the session is {len} bytes as JSON, more than a store reads back ({} bytes)",
            MAX_READ - ROOM
        ))
        .with_message("session cannot be stored"));
    }
    Ok(())
}

/// A time to live as the stores take it: at least a millisecond (as Redis
/// counts), at most about a century (longer is forever, and keeps instants
/// and Redis's clock from overflowing).
fn clamp_ttl(ttl: Duration) -> Duration {
    ttl.clamp(
        Duration::from_millis(1),
        Duration::from_secs(100 * 365 * 24 * 3600),
    )
}

/// A setting a store cannot work with (the source of the
/// [`other`](StoreError::is_other) error its builder returns).
#[cfg(any(feature = "redis", feature = "webhook"))]
#[derive(Debug)]
struct ConfigError(String);

#[cfg(any(feature = "redis", feature = "webhook"))]
impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(any(feature = "redis", feature = "webhook"))]
impl std::error::Error for ConfigError {}

/// A store's error for a zero timeout, which would fail every call.
#[cfg(any(feature = "redis", feature = "webhook"))]
fn zero_timeout(store: &str) -> StoreError {
    StoreError::other(ConfigError("the timeout must be above zero".into()))
        .with_message(format!("bad {store} store settings"))
}

/// The future every [`SessionStore`] method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where sessions are kept so they survive a restart or reach another
/// replica.
///
/// Implementations must not block the async runtime, must keep keys apart
/// (no key may reach another key's record), and must treat a missing key as
/// `Ok(None)` on load and as success on delete.
pub trait SessionStore: Send + Sync + 'static {
    /// Every stored session; records that cannot be read are skipped and
    /// reported in [`Loaded::skipped`], never fatal to the others. Each key
    /// should be listed once (the sticky layer's restore takes the last of
    /// a key's records).
    fn load_all(&self) -> StoreFuture<'_, Loaded>;

    /// The session stored under `key`, if any.
    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>>;

    /// Stores `session` under its key, replacing any previous version.
    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()>;

    /// Deletes the sessions stored under `keys`; absent keys are ignored.
    fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()>;

    /// How often a session in use should be [refreshed](Self::refresh) to
    /// keep its record alive, for a store whose records expire when left
    /// alone (`None`, the default: records stay until deleted). The sticky
    /// layer refreshes a session it serves at most this often (see
    /// [`StickyLayer::refresh_every`](crate::sticky::StickyLayer::refresh_every)).
    /// It takes a [`load`](Self::load) that finds a record as renewing it
    /// too, as the stores of this crate do: a store whose loads do not may
    /// see strict mode refuse a key whose record has expired, for up to
    /// four of these intervals, while the store cannot be read.
    fn refresh_interval(&self) -> Option<Duration> {
        None
    }

    /// Keeps `session`'s record alive: it is in use. By default a
    /// [`save`](Self::save) (which also brings its `last_seen` time up to
    /// date). A store shared by several replicas should renew the record
    /// it holds instead, as `RedisStore`, `FileStore` and `MemoryStore` do
    /// (a `WebhookStore` cannot: see `WebhookStoreBuilder::ttl`), and write
    /// `session` only when the record is gone: the copy a replica refreshes
    /// may be older than a move another replica saved since. (Gone by
    /// expiry, that is: `RedisStore` keeps a tombstone for a deleted
    /// record so as not to write it back; `MemoryStore` and `FileStore`
    /// cannot tell, and do.) A store whose
    /// saves tell other replicas about a change has a further reason to, as
    /// nothing about the session changed.
    fn refresh<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        self.save(session)
    }
}

impl<T: SessionStore + ?Sized> SessionStore for std::sync::Arc<T> {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        (**self).load_all()
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        (**self).load(key)
    }

    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        (**self).save(session)
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        (**self).delete(keys)
    }

    fn refresh_interval(&self) -> Option<Duration> {
        (**self).refresh_interval()
    }

    fn refresh<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        (**self).refresh(session)
    }
}

/// Makes one instance at a time restore (hydrate) a session when several
/// share a store, so two replicas never reconnect to one session's state at
/// once.
///
/// [`lock`](SessionLock::lock) either takes the lock on a key
/// (`Some(guard)`: restore the session, then
/// [`release`](SessionGuard::release) the guard), or, when another instance
/// holds it, waits until that instance is done and answers `None`: the
/// session is then as that instance left it, in the store. Implementations
/// must bound how long a lock outlives an instance that died holding it
/// (an expiry). `RedisStore` (feature `redis`) implements it with a lease;
/// the sticky layer uses it through
/// [`StickyLayer::hydrate`](crate::sticky::StickyLayer::hydrate).
pub trait SessionLock: Send + Sync + 'static {
    /// Takes the lock on session `key`, or waits for its holder and
    /// answers `None`.
    fn lock<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<SessionGuard>>;
}

impl<T: SessionLock + ?Sized> SessionLock for std::sync::Arc<T> {
    fn lock<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<SessionGuard>> {
        (**self).lock(key)
    }
}

/// A lock taken with [`SessionLock::lock`]. Dropping it without
/// [`release`](SessionGuard::release) leaves the lock to expire.
#[must_use = "a lock is held until released or expired"]
pub struct SessionGuard {
    release: StoreFuture<'static, ()>,
}

impl SessionGuard {
    /// A guard whose `release` runs `release`.
    pub fn new(release: impl Future<Output = Result<(), StoreError>> + Send + 'static) -> Self {
        SessionGuard {
            release: Box::pin(release),
        }
    }

    /// Releases the lock.
    pub async fn release(self) -> Result<(), StoreError> {
        self.release.await
    }
}

impl std::fmt::Debug for SessionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionGuard").finish_non_exhaustive()
    }
}

/// One session: its key, its backend, when it was created and last seen,
/// and the application's data.
///
/// Build one with [`Session::new`]; its fields are public to read and set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Session {
    /// The session key (a cookie value, a header value, a kernel id, ...).
    pub key: String,
    /// The backend that holds the session's state.
    pub backend: BackendId,
    /// When the session was created (wall clock, millisecond precision when
    /// stored).
    #[serde(with = "unix_millis")]
    pub created: SystemTime,
    /// When the sticky layer last wrote the record (wall clock, millisecond
    /// precision when stored): at the session's start, a move, new data,
    /// or a [refresh](SessionStore::refresh) that saves it (the default
    /// one, a `WebhookStore`'s; `MemoryStore` brings it up to date too).
    /// Not at every request, nor at a load, nor at a `RedisStore`'s or
    /// `FileStore`'s refresh, which renew the record's expiry without
    /// writing it: a session in daily use may show a `last_seen` as old as
    /// its last move. Prune records by their store's expiry (the stores'
    /// TTLs), not by this time.
    #[serde(with = "unix_millis")]
    pub last_seen: SystemTime,
    /// What the application needs to reconnect to the session's state.
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Session {
    /// A new session on `backend`, created and seen now, with no data.
    pub fn new(key: impl Into<String>, backend: BackendId) -> Self {
        let now = truncate_to_millis(SystemTime::now());
        Session {
            key: key.into(),
            backend,
            created: now,
            last_seen: now,
            data: serde_json::Value::Null,
        }
    }

    /// Sets the application data.
    pub fn with_data(mut self, data: serde_json::Value) -> Self {
        self.data = data;
        self
    }

    /// Refuses the session, with an error that
    /// [`is_rejected`](StoreError::is_rejected), when its data nests
    /// deeper than [`MAX_DATA_DEPTH`]: a record a JSON reader would not
    /// read back. Every store of this crate checks it before it saves; call
    /// it in your own store's [`save`](SessionStore::save) too, unless it
    /// reads any depth back.
    ///
    /// ```
    /// use serde_json::json;
    /// use tower_ha::store::{Session, MAX_DATA_DEPTH};
    ///
    /// let mut data = json!("bottom");
    /// for _ in 0..=MAX_DATA_DEPTH {
    ///     data = json!([data]);
    /// }
    /// let session = Session::new("s1", "node-a".into()).with_data(data);
    /// assert!(session.check_depth().unwrap_err().is_rejected());
    /// ```
    pub fn check_depth(&self) -> Result<(), StoreError> {
        use serde_json::Value;
        // Without recursion: the data may be nested deep enough to overflow
        // the stack of a recursive walk.
        let mut stack = vec![(&self.data, 0)];
        while let Some((value, depth)) = stack.pop() {
            match value {
                Value::Array(_) | Value::Object(_) if depth == MAX_DATA_DEPTH => {
                    return Err(StoreError::rejected(format!(
                        "the session's data nests deeper than {MAX_DATA_DEPTH} levels"
                    ))
                    .with_message("session cannot be stored"));
                }
                Value::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
                Value::Object(map) => stack.extend(map.values().map(|v| (v, depth + 1))),
                _ => {}
            }
        }
        Ok(())
    }
}

/// The result of [`SessionStore::load_all`]: the sessions that could be
/// read, and the records that could not.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Loaded {
    /// The sessions read.
    pub sessions: Vec<Session>,
    /// The records skipped, with why.
    pub skipped: Vec<Skipped>,
}

impl Loaded {
    /// A result with `sessions` and nothing skipped.
    pub fn new(sessions: Vec<Session>) -> Self {
        Loaded {
            sessions,
            skipped: Vec::new(),
        }
    }

    /// Adds a record that could not be read.
    pub fn skip(&mut self, record: impl Into<String>, error: StoreError) {
        self.skipped.push(Skipped {
            record: record.into(),
            error,
        });
    }
}

/// A stored record that could not be read.
#[derive(Debug)]
#[non_exhaustive]
pub struct Skipped {
    /// The record's name in the store (a file name, a key).
    pub record: String,
    /// Why it was skipped.
    pub error: StoreError,
}

fn truncate_to_millis(t: SystemTime) -> SystemTime {
    // `t` itself came from milliseconds that fit, or is later than any
    // representable millisecond count: keep it then.
    unix_millis::from_millis(unix_millis::to_millis(t)).unwrap_or(t)
}

/// A session key shown in logs as the first 12 hex digits of its SHA-256:
/// whoever reads the logs can tell sessions apart, and match them with the
/// sticky layer's `cookie:` digests, without learning a key that may be a
/// credential (an application's session cookie).
pub(crate) struct KeyDigest<'a>(pub(crate) &'a str);

impl fmt::Display for KeyDigest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use sha2::Digest;
        sha2::Sha256::digest(self.0.as_bytes())[..6]
            .iter()
            .try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// `key` as a path segment: RFC 3986's unreserved characters as they are
/// (some servers refuse an encoded `.`), every other byte percent-encoded.
pub(crate) fn percent_encoded(key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut encoded = String::with_capacity(key.len());
    for &b in key.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(b));
        } else {
            encoded.push('%');
            encoded.push(char::from(HEX[usize::from(b >> 4)]));
            encoded.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    encoded
}

/// Timestamps as integer milliseconds since the Unix epoch, the form
/// webhook consumers and Redis read most easily.
mod unix_millis {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn to_millis(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// `None` past what the platform's clock can represent.
    pub(super) fn from_millis(ms: u64) -> Option<SystemTime> {
        UNIX_EPOCH.checked_add(Duration::from_millis(ms))
    }

    pub(super) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(to_millis(*t))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let ms = u64::deserialize(d)?;
        from_millis(ms).ok_or_else(|| {
            serde::de::Error::custom(format_args!("timestamp {ms} ms is out of range"))
        })
    }
}

#[cfg(test)]
#[path = "../../tests/support/json_values.rs"]
mod json_values;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_json_shape() {
        let s = Session::new("k", "b".into()).with_data(serde_json::json!({"x": 1}));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["key"], "k");
        assert_eq!(json["backend"], "b");
        assert!(json["created"].is_u64());
        let back: Session = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }

    pub(crate) mod generated {
        //! Records of any content, and records that are not quite records.

        use super::*;
        use proptest::prelude::*;
        use serde_json::Value;

        /// Any JSON value, nested up to four levels.
        pub(crate) fn values() -> impl Strategy<Value = Value> {
            super::super::json_values::values(4, 4)
        }

        /// `leaf` inside `depth` arrays and objects, alternately.
        pub(crate) fn nested(depth: usize, leaf: Value) -> Value {
            (0..depth).fold(leaf, |inner, level| {
                if level % 2 == 0 {
                    Value::Array(vec![inner])
                } else {
                    Value::Object([("k".to_owned(), inner)].into_iter().collect())
                }
            })
        }

        /// Any session: any key and backend id, any millisecond instant
        /// every platform's clock holds (up to the year 2262), any data up
        /// to the deepest a store saves.
        pub(crate) fn sessions() -> impl Strategy<Value = Session> {
            (
                any::<String>(),
                any::<String>(),
                0..=i64::MAX as u64 / 1_000_000,
                0..=i64::MAX as u64 / 1_000_000,
                prop_oneof![
                    values(),
                    (0..=MAX_DATA_DEPTH, values())
                        .prop_map(|(d, leaf)| nested(d.saturating_sub(depth(&leaf)), leaf)),
                ],
            )
                .prop_map(|(key, backend, created, seen, data)| {
                    let mut session = Session::new(key, BackendId::from(backend)).with_data(data);
                    session.created = unix_millis::from_millis(created).unwrap();
                    session.last_seen = unix_millis::from_millis(seen).unwrap();
                    session
                })
        }

        /// How deep `value` nests, counted the plain recursive way.
        fn depth(value: &Value) -> usize {
            match value {
                Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
                Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
                _ => 0,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// What a store writes reads back as the same session.
            #[test]
            fn records_read_back_as_written(session in sessions()) {
                prop_assert!(session.check_depth().is_ok());
                let json = serde_json::to_vec(&session).unwrap();
                let back: Session = serde_json::from_slice(&json).unwrap();
                prop_assert_eq!(back, session);
            }

            /// Data is refused for saving exactly when it nests deeper than
            /// the limit, and whatever is saved can be read back.
            #[test]
            fn the_depth_limit_is_where_it_says(
                d in 0usize..=MAX_DATA_DEPTH + 30,
                leaf in values(),
            ) {
                let data = nested(d, leaf);
                let session = Session::new("k", "b".into()).with_data(data.clone());
                let refused = session.check_depth().is_err();
                prop_assert_eq!(refused, depth(&data) > MAX_DATA_DEPTH);
                if !refused {
                    let json = serde_json::to_vec(&session).unwrap();
                    prop_assert!(serde_json::from_slice::<Session>(&json).is_ok());
                }
            }

        }
    }
}
