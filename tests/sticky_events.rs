//! What the sticky layer logs. In a binary of its own: `tracing` caches
//! per callsite whether anyone listens, and tests on other threads that
//! hit the same callsites without a subscriber would race with this
//! test's thread-local one.

mod support;

use std::time::Duration;

use http::{Request, Response};
use tower::{Layer, ServiceExt};
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::sticky::{SessionKey, StickyLayer};
use tower_ha::{BoxError, Pool};

use support::down::Down;
use support::tracing_capture::Capture;

/// A store that is down fails a call a request: the layer warns of the
/// first, then of one every ten seconds with the count it held back, and
/// logs the others at debug level.
#[tokio::test(start_paused = true)]
async fn a_store_outage_warns_once_a_period() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let pool = Pool::new();
    pool.insert(
        "a",
        tower::service_fn(|_req: Request<()>| async { Ok::<_, BoxError>(Response::new(())) }),
    );
    let layer = StickyLayer::new(&pool, SessionKey::header("x-session-id")).store(Down);
    let svc = layer.layer(Balance::new(pool.clone(), RoundRobin::new()));
    let send = |key: String| {
        let req = Request::builder()
            .header("x-session-id", key)
            .body(())
            .unwrap();
        svc.clone().oneshot(req)
    };
    for i in 0..5 {
        send(format!("s{i}")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    send("s5".into()).await.unwrap();
    let failed = capture.saying("session store call failed");
    let at = |level| -> Vec<_> { failed.iter().filter(|e| e.level == level).collect() };
    let warned = at(tracing::Level::WARN);
    let held: Vec<_> = warned.iter().map(|e| e.get("held_back")).collect();
    assert_eq!(held, [Some("0"), Some("4")], "{warned:?}");
    assert_eq!(at(tracing::Level::DEBUG).len(), 4);
    assert_eq!(layer.stats().store_errors, 6, "each one counted");
}
