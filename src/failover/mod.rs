//! Retrying a failed request on another backend: [`Failover`].
//!
//! [`Failover`] wraps [`Balance`](crate::balance::Balance) (or any service
//! that speaks the [extension protocol](crate::extensions)) and owns *when*
//! to try again, while the balancer owns *who* is next:
//!
//! 1. Each attempt's backend (from [`ServedBy`](crate::extensions::ServedBy),
//!    [`BackendError::backend`](crate::BackendError::backend), or, for an
//!    abandoned attempt, the [`Picked`] slot the balancer fills) is added to
//!    the request's [`Attempts`](crate::extensions::Attempts), so the next
//!    attempt goes to a backend the request has not reached. By default every
//!    available backend is tried once: the attempts end when the balancer
//!    answers [`NoBackend`](crate::NoBackend) (as the Panda API gateway's
//!    round-robin and random balancers fail over).
//! 2. A [`Classifier`](crate::classify::Classifier) says which attempts
//!    failed; the default counts every error (connection errors, per-try
//!    timeouts, `NoBackend`) except an
//!    [`InvalidRequest`](crate::error::InvalidRequest) (the request itself
//!    is bad), the statuses 502, 503 and 504, and a gRPC call's
//!    `UNAVAILABLE` (see
//!    [`Outcome::grpc_status`](crate::classify::Outcome::grpc_status)).
//!    Any other outcome is returned unchanged.
//! 3. Whether a failed attempt may be retried is the failover layer's own
//!    rule. Idempotent methods ([`is_idempotent`]: `GET`, `HEAD`, `OPTIONS`,
//!    `TRACE`, `PUT`, `DELETE`) are retried after any failure. Other methods
//!    only when the request is known not to have reached the backend
//!    ([`BackendError::is_not_sent`](crate::BackendError::is_not_sent), a
//!    [`NotSent`](crate::NotSent) error, or an I/O error of kind
//!    `ConnectionRefused` anywhere in the error's chain of sources), unless
//!    the request carries [`RetryNonIdempotent`] or the layer is built with
//!    [`retry_non_idempotent`](FailoverLayer::retry_non_idempotent). So a
//!    `POST` answered 503 gets that 503; a `POST` whose connection was
//!    refused goes to the next backend.
//! 4. A per-try timeout drops the attempt (the backend gets no more of the
//!    request) and tries the next backend; a deadline bounds all attempts
//!    (a gRPC client's `grpc-timeout` may shorten it, with
//!    [`grpc_timeout`](FailoverLayer::grpc_timeout)).
//!    Both run until the response head: the body of a response already
//!    returned is not timed, so a backend that sends its head then stalls
//!    its body is not bounded by this layer (`HttpBackend` bounds it with
//!    its client's `read_timeout`).
//! 5. A retry [budget](FailoverLayer::budget) keeps a failing fleet from a
//!    retry storm: by default a [`RetryBudget`] of 20 % of requests plus a
//!    floor of 3 retries per second. Both are counted over 10 s windows, so
//!    the floor accrues: retries it did not fund early in a window (up to
//!    30) may be taken in one burst later in it. Any tower
//!    [`Budget`](tower::retry::budget::Budget) fits.
//! 6. An optional [`Backoff`] pauses between attempts (none by default: the
//!    next attempt goes to another backend).
//! 7. Bodies: a `Clone` body is replayed as is; [`BufferBodyLayer`] makes
//!    any other body replayable by buffering it up to a limit (64 KiB by
//!    default). A larger body, or a stream passed on as it pauses (a gRPC
//!    call), is held as a backend reads it up to the limit, and never
//!    retried once a backend read past that (see [`body`]).
//! 8. When the attempts end in failure, the last failure decides the result:
//!    a failed response (say a 503) is returned with the
//!    [`Attempts`](crate::extensions::Attempts) history in its extensions; an
//!    error becomes [`Exhausted`], which lists every backend
//!    tried and why, and says when the retry budget stopped the attempts
//!    ([`Exhausted::is_budget_spent`]). An error that names no backend (from
//!    an inner service that does not name its backends) ends the attempts,
//!    as there is no backend to exclude: after failures it is the
//!    `Exhausted`'s [`reason`](Exhausted::reason); on the first attempt it is
//!    returned as it is. A response that succeeded after failures carries
//!    the history too (the backend that answered last).
//! 9. Each failover emits a `tracing` event (target `tower_ha::failover`)
//!    with the backend it leaves, the one it goes to, and the cause (the
//!    error followed by its chain of sources).
//!
//! See `docs/failover.md` for a longer guide.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use http::StatusCode;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_ha::balance::{BalanceLayer, RoundRobin};
//! use tower_ha::extensions::{Attempts, ServedBy};
//! use tower_ha::failover::FailoverLayer;
//! use tower_ha::Pool;
//!
//! let backend = |status: StatusCode| {
//!     service_fn(move |_req: http::Request<String>| async move {
//!         let mut response = http::Response::new(());
//!         *response.status_mut() = status;
//!         Ok::<_, std::convert::Infallible>(response)
//!     })
//! };
//! let pool = Pool::new();
//! pool.insert("overloaded", backend(StatusCode::SERVICE_UNAVAILABLE));
//! pool.insert("healthy", backend(StatusCode::OK));
//!
//! // Each stack gets its own round robin, starting at "overloaded".
//! let service = || {
//!     ServiceBuilder::new()
//!         .layer(FailoverLayer::new())
//!         .layer(BalanceLayer::new(RoundRobin::new()))
//!         .service(pool.clone())
//! };
//!
//! // A GET may be retried after a 503: it tries "overloaded", then "healthy".
//! let response = service().oneshot(http::Request::new(String::new())).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(response.extensions().get::<ServedBy>().unwrap().0.as_str(), "healthy");
//! let tried: Vec<&str> = response.extensions().get::<Attempts>().unwrap()
//!     .as_slice().iter().map(|id| id.as_str()).collect();
//! assert_eq!(tried, ["overloaded", "healthy"]);
//!
//! // A POST that reached "overloaded" is not sent again: its 503 comes back.
//! let post = http::Request::post("/orders").body(String::from("{}")).unwrap();
//! let response = service().oneshot(post).await.unwrap();
//! assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
//! let tried = response.extensions().get::<Attempts>().unwrap();
//! assert_eq!(tried.as_slice(), [tower_ha::BackendId::from("overloaded")]);
//! # }
//! ```

pub mod body;
mod budget;
pub mod error;
pub mod future;
mod grpc;
mod layer;
mod policy;
mod service;
mod stats;

pub use crate::extensions::Picked;
pub use body::{BufferBody, BufferBodyLayer, Replay, ReplayBody};
pub use budget::RetryBudget;
pub use error::{DeadlineExceeded, Exhausted, FailedStatus, TimedOut};
pub use layer::FailoverLayer;
pub use policy::{is_idempotent, Backoff, RetryNonIdempotent};
pub use service::Failover;
pub(crate) use stats::Counters;
pub use stats::FailoverStats;

/// Runs the examples of `docs/failover.md` as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/failover.md")]
struct FailoverGuide;
