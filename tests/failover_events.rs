//! The failover event stream. Alone in its binary: `tracing` caches callsite
//! interest globally, so a scoped subscriber must not race other tests.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use parking_lot::Mutex;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::failover::FailoverLayer;
use tower_ha::{BoxError, NotSent, Pool};

mod support;
use support::deferred::Deferred;
use support::tracing_capture::{Capture, Event};

type Log = Arc<Mutex<Vec<String>>>;

type Backend = BoxCloneSyncService<Request<Full<Bytes>>, Response<()>, BoxError>;

/// Backends that log their name and answer 503, refuse, or answer 200.
fn fleet(log: &Log) -> Pool<Backend> {
    fleet_of(log, &[("a", 503), ("b", 0), ("c", 200)])
}

/// Backends that log their name and answer their status, or refuse for 0.
fn fleet_of(log: &Log, backends: &[(&'static str, u16)]) -> Pool<Backend> {
    let pool = Pool::new();
    for &(name, code) in backends {
        let log = log.clone();
        let service = service_fn(move |_req: Request<Full<Bytes>>| {
            log.lock().push(name.to_string());
            async move {
                if code == 0 {
                    return Err::<Response<()>, BoxError>(
                        NotSent::new(io::Error::from(io::ErrorKind::ConnectionRefused)).into(),
                    );
                }
                let mut response = Response::new(());
                *response.status_mut() = StatusCode::from_u16(code).unwrap();
                Ok(response)
            }
        });
        pool.insert(name, BoxCloneSyncService::new(service));
    }
    pool
}

#[test]
fn each_failover_is_an_event_with_from_to_and_cause() {
    let capture = Capture::default();
    let log = Log::default();
    let stream = tower_ha::control::Events::new(16, 16);
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().events(stream.clone()))
        .service(Balance::new(fleet(&log), RoundRobin::new()));
    let request = Request::builder()
        .method(Method::GET)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let result = tracing::subscriber::with_default(capture.clone(), || {
        runtime.block_on(service.oneshot(request))
    });
    let tried = log.lock().clone();
    assert_eq!(result.unwrap().status(), StatusCode::OK);
    assert_eq!(tried, ["a", "b", "c"]);
    let events: Vec<String> = capture
        .events()
        .iter()
        .filter(|e| e.target == "tower_ha::failover")
        .map(Event::line)
        .collect();
    assert_eq!(
        events,
        [
            "message=failing over from=a to=b cause=backend answered 503 Service Unavailable attempt=2",
            "message=failing over from=b to=c cause=backend b failed before the request was sent: request not sent: connection refused attempt=3",
        ]
    );
    // The event stream says why too.
    let reasons: Vec<(String, String)> = stream
        .history()
        .iter()
        .filter_map(|record| match &record.event {
            tower_ha::control::Event::FailoverAttempt { failed, reason, .. } => {
                Some((failed.to_string(), reason.to_string()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [
            (
                "a".into(),
                "backend answered 503 Service Unavailable".into()
            ),
            (
                "b".into(),
                "backend b failed before the request was sent: request not sent: \
                 connection refused"
                    .into()
            ),
        ]
    );
}

/// The `failing over` lines traced while `service` serves one `GET`.
fn failovers<S>(service: S) -> Vec<String>
where
    S: Service<Request<Full<Bytes>>, Response = Response<()>, Error = BoxError>,
{
    let capture = Capture::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _ = tracing::subscriber::with_default(capture.clone(), || {
        runtime.block_on(service.oneshot(Request::new(Full::new(Bytes::new()))))
    });
    capture
        .events()
        .iter()
        .filter(|e| e.target == "tower_ha::failover" && e.get("message") == Some("failing over"))
        .map(|e| {
            format!(
                "{} -> {}",
                e.get("from").unwrap(),
                e.get("to").unwrap_or("?")
            )
        })
        .collect()
}

#[test]
fn a_failover_is_traced_once_its_next_backend_is_known() {
    let log = Log::default();
    // Every backend fails: the call that finds none left is no failover.
    let all_fail = fleet_of(&log, &[("a", 503), ("b", 0)]);
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().no_budget())
        .service(Balance::new(all_fail, RoundRobin::new()));
    assert_eq!(failovers(service), ["a -> b"]);
    // Picked after `call` returned: traced with the backend it went to.
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().no_budget())
        .service(Deferred(Balance::new(fleet(&log), RoundRobin::new())));
    assert_eq!(failovers(service), ["a -> b", "b -> c"]);
}
