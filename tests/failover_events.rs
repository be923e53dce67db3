//! The failover event stream. Alone in its binary: `tracing` caches callsite
//! interest globally, so a scoped subscriber must not race other tests.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use parking_lot::Mutex;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::failover::FailoverLayer;
use tower_ha::{BoxError, NotSent, Pool};

type Log = Arc<Mutex<Vec<String>>>;

/// Backends that log their name and answer 503, refuse, or answer 200.
fn fleet(log: &Log) -> Pool<BoxCloneSyncService<Request<Full<Bytes>>, Response<()>, BoxError>> {
    let pool = Pool::new();
    for (name, code) in [("a", 503u16), ("b", 0), ("c", 200)] {
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

/// Records the events of the failover target as `name=value` lines.
struct Capture(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push_str(&format!("{}={} ", field.name(), value));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={:?} ", field.name(), value));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target() == "tower_ha::failover" {
            let mut fields = Fields(String::new());
            event.record(&mut fields);
            self.0.lock().push(fields.0.trim_end().to_string());
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn each_failover_is_an_event_with_from_to_and_cause() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = Log::default();
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new())
        .service(Balance::new(fleet(&log), RoundRobin::new()));
    let request = Request::builder()
        .method(Method::GET)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let result = tracing::subscriber::with_default(Capture(events.clone()), || {
        runtime.block_on(service.oneshot(request))
    });
    let tried = log.lock().clone();
    assert_eq!(result.unwrap().status(), StatusCode::OK);
    assert_eq!(tried, ["a", "b", "c"]);
    let events = events.lock().clone();
    assert_eq!(
        events,
        [
            "message=failing over from=a to=b cause=backend answered 503 Service Unavailable attempt=2",
            "message=failing over from=b to=c cause=backend b failed before the request was sent attempt=3",
        ]
    );
}
