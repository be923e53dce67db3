//! Health changes are `tracing` events. In a binary of its own: `tracing`
//! caches per callsite whether anyone listens, and tests on other threads
//! that hit the same callsites without a subscriber would race with this
//! test's thread-local one.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;
use tower::Layer;
use tower_ha::health::{HealthChecker, HealthLayer};
use tower_ha::BackendState;

mod support;
use support::health_mock::*;
use support::tracing_capture::Capture;

#[tokio::test(start_paused = true)]
async fn health_changes_are_tracing_events_with_backend_from_to_and_reason() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

    let backend = Backend::new();
    let svc = HealthLayer::new()
        .consecutive_failures(1)
        .base_ejection_time(secs(1))
        .layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    backend.set(StatusCode::BAD_GATEWAY);
    send(&svc, "a", &state).await;
    tokio::time::advance(secs(1)).await;
    backend.set(StatusCode::OK);
    send(&svc, "a", &state).await;

    let (pool, _) = pool_of(&["b"]);
    let script = Script::default();
    script.push("b", &[false, true]);
    let t0 = Instant::now();
    let _checker = HealthChecker::new(pool, script.probe())
        .interval(secs(1))
        .jitter(Duration::ZERO)
        .fall(1)
        .rise(1)
        .spawn();
    at(t0 + ms(1500)).await;

    let expect = |to: &str, level: tracing::Level, backend: &str, from: &str, reason: &str| {
        let events = capture.events();
        let e = events
            .iter()
            .find(|e| e.get("to") == Some(to))
            .unwrap_or_else(|| panic!("no event to {to}"));
        assert_eq!(e.level, level, "{to}");
        assert_eq!(e.get("backend"), Some(backend));
        assert_eq!(e.get("from"), Some(from));
        assert_eq!(e.get("reason"), Some(reason));
    };
    expect(
        "ejected",
        tracing::Level::WARN,
        "a",
        "available",
        "consecutive failures",
    );
    expect(
        "available",
        tracing::Level::INFO,
        "a",
        "ejected",
        "ejection ended",
    );
    expect(
        "unhealthy",
        tracing::Level::WARN,
        "b",
        "healthy",
        "probes failed",
    );
    expect(
        "healthy",
        tracing::Level::INFO,
        "b",
        "unhealthy",
        "probes passed",
    );
}
