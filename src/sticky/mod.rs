//! Session affinity: keep each session on the backend that holds its state.
//!
//! [`StickyLayer`] goes outermost, above the balancer (and the failover
//! layer when there is one):
//!
//! ```text
//! Sticky ──► Failover ──► Balance ──► backends
//!   │ sets Affinity on the request      │ sets ServedBy on the response
//!   └─────────── reads ServedBy ◄───────┘
//! ```
//!
//! It talks to the layers below only through the
//! [extensions](crate::extensions): it sets [`Affinity`] for a known session
//! whose backend is available, and reads [`ServedBy`] on the response. A
//! session starts on the backend that served its first response and moves
//! only when that backend is unavailable (unhealthy, ejected, disabled,
//! removed; a draining backend that is healthy finishes its sessions),
//! failed the last request, or a failover layer had the request served
//! elsewhere. A moved session is saved, logged as a
//! `tracing` event (target `tower_ha::sticky`) and handed to the `on_move`
//! hook; it does not move back when its old backend recovers. In
//! [`strict`](StickyLayer::strict) mode the request fails with
//! [`SessionUnavailable`] instead.
//!
//! Session keys ([`SessionKey`]): the layer's own HMAC-SHA256-signed cookie
//! ([`CookieInsert`], HAProxy's `cookie insert`), an application's cookie
//! learned from `Set-Cookie` (HAProxy's `cookie ... prefix`/stick tables,
//! Envoy's stateful session), a header, or a closure. nginx's sticky hash
//! on a cookie, as FastWS deploys it (hash the cookie's value, round robin
//! without it), needs no session table: use [`hash_cookie`] as the
//! balancer's strategy.
//!
//! Sessions persist through a [`SessionStore`](crate::store::SessionStore)
//! with the availability modes of Jupyter Enterprise Gateway
//! ([`Availability`]). See `docs/sticky.md` and `docs/persistence.md`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_ha::balance::{BalanceLayer, RoundRobin};
//! use tower_ha::extensions::ServedBy;
//! use tower_ha::sticky::{CookieInsert, SessionKey, StickyLayer};
//! use tower_ha::Pool;
//!
//! let pool = Pool::new();
//! for name in ["a", "b", "c"] {
//!     pool.insert(name, service_fn(move |_req: http::Request<()>| async move {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(name))
//!     }));
//! }
//! let cookie = CookieInsert::new("srv", *b"a secret of at least 32 bytes!!!");
//! let svc = ServiceBuilder::new()
//!     .layer(StickyLayer::new(&pool, SessionKey::insert_cookie(cookie)))
//!     .layer(BalanceLayer::new(RoundRobin::new()))
//!     .service(pool.clone());
//!
//! // The first response starts a session and sets the cookie.
//! let first = svc.clone().oneshot(http::Request::new(())).await.unwrap();
//! let set_cookie = first.headers()["set-cookie"].to_str().unwrap();
//! let cookie = set_cookie.split(';').next().unwrap().to_owned();
//!
//! // Every request carrying it lands on the same backend, round robin or not.
//! for _ in 0..5 {
//!     let req = http::Request::builder().header("cookie", &cookie).body(()).unwrap();
//!     let res = svc.clone().oneshot(req).await.unwrap();
//!     assert_eq!(res.body(), first.body());
//!     assert_eq!(res.extensions().get::<ServedBy>().unwrap().0.as_str(), *first.body());
//! }
//! # }
//! ```
//!
//! [`Affinity`]: crate::extensions::Affinity
//! [`ServedBy`]: crate::extensions::ServedBy

mod cookie;
pub mod error;
pub mod future;
mod hooks;
mod key;
mod layer;
mod service;
mod shared;
mod stats;
mod table;
mod writes;

pub use cookie::{CookieInsert, SameSite, MAX_COOKIE_AGE};
pub use error::{CookieConfigError, RestorePanicked, RestoreTimedOut, SessionUnavailable};
pub use hooks::{MoveReason, RestoreFailure, RestoreReport, SessionMoved};
pub use key::{SessionKey, MAX_COOKIE_HEADER, MAX_KEY_LEN};
pub use layer::{
    StickyLayer, DEFAULT_IDLE_TIMEOUT, DEFAULT_LOAD_WAIT, DEFAULT_MAX_PENDING_WRITES,
    DEFAULT_MAX_SESSIONS, DEFAULT_MOVE_TIMEOUT, DEFAULT_RESPONSE_WAIT, DEFAULT_RESTORE_TIMEOUT,
};
pub use service::Sticky;
pub(crate) use shared::Shared;
pub use stats::StickyStats;

use crate::balance::ConsistentHash;

/// How sessions come back from the [`SessionStore`](crate::store::SessionStore),
/// after Jupyter Enterprise Gateway's availability modes. A mode applies
/// only with a [store](StickyLayer::store): unlike Enterprise Gateway,
/// where setting a mode turns persistence on, here the store does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Availability {
    /// One instance at a time: call
    /// [`restore`](Sticky::restore) at start to load every stored session
    /// (and run the `on_restore` hook for each). A request naming a session
    /// the table does not know (one that went idle or was evicted since)
    /// reads its record before it is routed, without running the hook
    /// again, so the session keeps its backend, its data and its creation
    /// time; a session whose restore failed is not read until a later
    /// `restore`.
    ///
    /// Every such miss costs one store read (one per key, however many
    /// requests wait for it), a key the store never held included: a new
    /// session a request names by a header costs a read and a save. A
    /// learned-cookie value the store does not hold costs a read; its
    /// session is kept in memory only, and saved once a response sets the
    /// cookie to that value. In [strict](StickyLayer::strict) mode the
    /// instance also remembers a 64-bit hash of the key of every record it
    /// restored, saved or refreshed (about 20 to 40 bytes per record; with
    /// a store whose records expire, until the record has had time to
    /// expire: four of the store's refresh intervals), so that a new key is
    /// not refused while the store cannot be read.
    Standalone,
    /// Several instances at once (the default): a request naming a session
    /// the table does not know loads it from the store before it is routed
    /// (one load per key, however many requests wait for it), so a session
    /// started through another replica, or evicted from this table, goes to
    /// its backend.
    #[default]
    Replication,
}

/// nginx's sticky hash on a cookie, as FastWS deploys it: a consistent
/// hash of cookie `name`'s value, round robin when the cookie is absent or
/// empty. Use it as the balancer's strategy (no sticky layer needed).
///
/// Unlike the layer's own cookie it does not send a client back to the
/// backend that served it first, and it follows no health change of its
/// own: it is there for compatibility with deployments that rely on it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower::{service_fn, ServiceExt};
/// use tower_ha::balance::Balance;
/// use tower_ha::{sticky, Pool};
///
/// let pool = Pool::new();
/// for name in ["a", "b", "c"] {
///     pool.insert(name, service_fn(move |_req: http::Request<()>| async move {
///         Ok::<_, std::convert::Infallible>(http::Response::new(name))
///     }));
/// }
/// let balance = Balance::new(pool, sticky::hash_cookie("StickyStr"));
/// let with = || http::Request::builder().header("cookie", "StickyStr=u1").body(()).unwrap();
/// let a = balance.clone().oneshot(with()).await.unwrap();
/// let b = balance.clone().oneshot(with()).await.unwrap();
/// assert_eq!(a.body(), b.body());
/// # }
/// ```
///
/// # Panics
///
/// As [`key::cookie`](crate::key::cookie), for a name no `Cookie` header
/// could hold. For a name read at run time, [`try_hash_cookie`] returns an
/// error instead.
#[track_caller]
pub fn hash_cookie(name: impl Into<String>) -> ConsistentHash<crate::key::Cookie> {
    match try_hash_cookie(name) {
        Ok(strategy) => strategy,
        Err(e) => panic!("{e}"),
    }
}

/// [`hash_cookie`] for a name read at run time: an error instead of a
/// panic for a name no `Cookie` header could hold, as
/// [`key::try_cookie`](crate::key::try_cookie).
pub fn try_hash_cookie(
    name: impl Into<String>,
) -> Result<ConsistentHash<crate::key::Cookie>, CookieConfigError> {
    crate::key::try_cookie(name).map(ConsistentHash::ring)
}

#[cfg(doctest)]
#[doc = include_str!("../../docs/sticky.md")]
struct StickyGuide;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_hash_cookie_reports_what_hash_cookie_refuses() {
        for name in ["", "a ", "a;b", "a=b"] {
            assert_eq!(
                try_hash_cookie(name).unwrap_err(),
                CookieConfigError::InvalidName(name.to_owned())
            );
        }
        assert!(try_hash_cookie("StickyStr").is_ok());
    }
}

#[cfg(doctest)]
#[doc = include_str!("../../docs/persistence.md")]
struct PersistenceGuide;
