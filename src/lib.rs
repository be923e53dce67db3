//! Load balancing, failover, sticky session affinity, health filtering and
//! session persistence for any [`tower::Service`], as tower layers.
//!
//! `tower-ha` is what a Rust service embeds instead of putting nginx, HAProxy
//! or Envoy in front of its backends.
//!
//! # The pieces
//!
//! * [`Pool`]: the set of backends (id, service, weight, shared
//!   [`BackendState`]), changed at runtime or from a
//!   [`Discover`](tower::discover::Discover) stream.
//! * [`Balance`](balance::Balance): picks *who* serves each request with a
//!   [`Strategy`](balance::Strategy): round robin, random, least request,
//!   smooth weighted round robin, consistent hashing (ring or Maglev).
//! * [`health`]: passive outlier detection ([`HealthLayer`](health::HealthLayer)),
//!   active probes ([`HealthChecker`](health::HealthChecker)), a lifecycle for
//!   failing backends, slow start; panic routing in `Balance`.
//! * [`Failover`](failover::Failover): retries a failed request on another
//!   backend, bounded by attempts, a retry budget and a deadline, and safe
//!   for non-idempotent requests.
//! * [`control`]: a [`Handle`](control::Handle) to drain, disable and enable
//!   backends, set weights and force a group's primary at run time; an
//!   event stream with an audit history; stats snapshots.
//! * [`config`]: groups in the `failover_groups` shape of LEBA (a load
//!   balancer with active-passive failover groups), from YAML or TOML
//!   (feature `config`).
//! * [`dns`]: backends from the addresses a host name resolves to,
//!   re-resolved periodically.
//! * `http` (feature `hyper-client`): `HttpBackend`, a backend service
//!   that proxies requests to an HTTP server (HTTP/1.1, or HTTP/2 with
//!   feature `http2`; WebSocket included), over `HttpClient`, a pool of
//!   kept-alive connections that its backends share: what makes the stack
//!   a reverse proxy.
//! * [`extensions`]: the typed request and response extensions the layers use
//!   to talk to each other (and that your own layers may use).
//! * [`store`]: durable sessions behind the [`SessionStore`](store::SessionStore)
//!   trait: in memory, one JSON file per session
//!   ([`FileStore`](store::FileStore)), your own HTTP service
//!   (`WebhookStore`, feature `webhook`), or Redis shared by several
//!   replicas (`RedisStore`, feature `redis`).
//! * [`Sticky`](sticky::Sticky): keeps each session on the backend that holds
//!   its state (signed cookie, learned cookie, header or closure), moves it
//!   only when that backend cannot serve, and persists it in a
//!   [`SessionStore`](store::SessionStore).
//!
//! # Quick start
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use tower::{service_fn, ServiceExt};
//! use tower_ha::balance::{Balance, ConsistentHash};
//! use tower_ha::{key, Pool};
//!
//! let backend = |name: &'static str| {
//!     service_fn(move |_req: http::Request<()>| async move {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(name))
//!     })
//! };
//! let pool = Pool::new();
//! for name in ["a", "b", "c"] {
//!     pool.insert(name, backend(name));
//! }
//! let balance = Balance::new(pool, ConsistentHash::ring(key::header("x-user")));
//!
//! let request = || http::Request::builder().header("x-user", "alice").body(()).unwrap();
//! let first = balance.clone().oneshot(request()).await.unwrap();
//! let again = balance.oneshot(request()).await.unwrap();
//! assert_eq!(first.body(), again.body()); // alice always lands on one backend
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod balance;
pub mod classify;
pub mod config;
pub mod control;
pub mod dns;
pub mod error;
pub mod extensions;
pub mod failover;
pub mod health;
#[cfg(feature = "hyper-client")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper-client")))]
pub mod http;
pub mod key;
pub mod pool;
mod serial;
pub mod sticky;
pub mod store;
mod task;
mod time;
#[cfg(any(feature = "hyper-client", feature = "webhook"))]
mod uri;

pub use backend::{AdminStatus, BackendId, BackendState, HealthStatus};
pub use error::{BackendError, BoxError, InvalidRequest, NoBackend, NotSent};
pub use pool::Pool;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/balance.md")]
struct BalanceGuideDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/groups.md")]
struct GroupsGuideDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/control.md")]
struct ControlGuideDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/architecture.md")]
struct ArchitectureGuideDoctests;

#[cfg(all(doctest, feature = "hyper-client"))]
#[doc = include_str!("../docs/http.md")]
struct HttpGuideDoctests;
