//! Health: passive outlier detection, active probes, a lifecycle for
//! failing backends, slow start. (Panic routing lives in
//! [`Balance`](crate::balance::Balance).)
//!
//! Health never routes. It writes the shared
//! [`BackendState`](crate::BackendState) of each backend (its health, its
//! ejection deadline, its effective weight) and [`Balance`](crate::balance::Balance)
//! reads it on every pick; a health change never rebuilds the pool snapshot.
//!
//! * [`HealthLayer`] wraps each backend's service and ejects a backend after
//!   consecutive failures, as Envoy's outlier detection does.
//! * [`HealthChecker`] probes every backend of a pool from one background
//!   task ([`HttpProbe`], [`GrpcProbe`], [`TcpProbe`] or your own
//!   [`Probe`]), with HAProxy's rise and fall thresholds, the Panda API
//!   gateway's lifecycle (unhealthy → turned off → removed, with
//!   turned-off backends that recover) and slow start.
//!
//! Every change of health, ejection and restoration is a `tracing` event
//! (`info` or `warn`) with the fields `backend`, `from`, `to` and `reason`,
//! except the initial mark of [`HealthChecker::start_unhealthy`] (a
//! backend new to the checker made unhealthy), which emits none.
//! See `docs/health.md` for the defaults and how the pieces combine.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use http::{Request, Response, StatusCode};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_ha::balance::{Balance, RoundRobin};
//! use tower_ha::health::HealthLayer;
//! use tower_ha::Pool;
//!
//! let backend = |status: StatusCode| {
//!     service_fn(move |_req: Request<()>| async move {
//!         Ok::<_, std::convert::Infallible>(
//!             Response::builder().status(status).body(()).unwrap(),
//!         )
//!     })
//! };
//! // One layer for the whole pool: its clones share the ejection cap.
//! let health = HealthLayer::new().consecutive_failures(2);
//! let pool = Pool::new();
//! for (id, status) in [("ok", StatusCode::OK), ("broken", StatusCode::BAD_GATEWAY)] {
//!     pool.insert(id, ServiceBuilder::new().layer(health.clone()).service(backend(status)));
//! }
//! let balance = Balance::new(pool.clone(), RoundRobin::new());
//!
//! // Round robin sends every other request to "broken": two 502s in a row
//! // eject it (for 30 s, the default base ejection time).
//! for _ in 0..4 {
//!     balance.clone().oneshot(Request::new(())).await.unwrap();
//! }
//! assert!(pool.state(&"broken".into()).unwrap().is_ejected());
//! for _ in 0..4 {
//!     let response = balance.clone().oneshot(Request::new(())).await.unwrap();
//!     assert_eq!(response.status(), StatusCode::OK);
//! }
//! # }
//! ```
//!
//! # Passive detection
//!
//! [`Health`] reads the request's [`Target`](crate::extensions::Target) (set
//! by `Balance`) to learn whose outcome it observes, classifies the outcome
//! with the shared [`Classifier`](crate::classify::Classifier), and counts
//! failures *in a row*: a success starts the count again (the Panda API
//! gateway counted failures cumulatively, so a backend failing 1 request in 100 was
//! eventually ejected). An ejection lasts the base ejection time times a
//! multiplier, capped, as in Envoy: one more on each ejection, one less for
//! every decay interval (10 s) the backend spends not ejected. It ends
//! exactly at its deadline, without a task, and its end starts the count of
//! failures in a row again. At most a share of the pool (10 %) is ejected
//! at once, always allowing one: the layer's clones share a count of the
//! backends they wrap and of those they ejected. Optionally, a
//! [`SuccessRate`] also ejects a backend whose share of successes over a
//! window falls too low. A response from an `HttpBackend` (feature
//! `hyper-client`) below the layer with its own body type (no layer
//! between them maps the body) is judged by its body too: one its backend
//! cuts short is a failure, though its head passed.
//!
//! # Active probes
//!
//! The checker sends one probe per backend at a time, each with a timeout,
//! every interval (plus jitter; a separate interval while not healthy). A
//! healthy backend becomes unhealthy after `fall` failing probes in a row;
//! an unhealthy or turned-off one becomes healthy after `rise` passing
//! probes in a row. A passing probe of a healthy backend lifts a passive
//! ejection, unless `lift_ejections(false)`. A backend unhealthy for
//! `turned_off_after` is marked
//! [`TurnedOff`](crate::HealthStatus::TurnedOff) and, after `removed_after`,
//! removed from the pool; both only for backends a probe has found healthy
//! at least once (a pass while healthy, or `rise` passes in a row), so a
//! backend that never came up stays in the pool, probed.
//! Membership changes wake the checker at once.

#[cfg(doctest)]
#[doc = include_str!("../../docs/health.md")]
struct HealthGuide;

mod checker;
mod error;
pub mod future;
mod grpc;
mod layer;
mod outlier;
mod probe;
mod service;
mod slow_start;

pub(crate) use checker::CheckConfig;
pub use checker::{CheckerHandle, HealthChecker};
pub use error::{
    ExpectedStatusesError, NoAddress, NotServing, ProbePanicked, ProbeTimeout, UnexpectedStatus,
};
pub use grpc::GrpcProbe;
pub use layer::HealthLayer;
#[cfg(feature = "hyper-client")]
pub(crate) use outlier::LateOutcome;
pub use outlier::SuccessRate;
pub use probe::{probe_fn, HttpProbe, Probe, ProbeFn, ProbeFuture, TcpProbe};
pub use service::Health;
pub use slow_start::SlowStart;
