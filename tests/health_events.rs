//! Health changes are `tracing` events. In a binary of its own: `tracing`
//! caches per callsite whether anyone listens, and tests on other threads
//! that hit the same callsites without a subscriber would race with this
//! test's thread-local one.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower::Layer;
use tower_ha::health::{HealthChecker, HealthLayer};
use tower_ha::BackendState;

mod support;
use support::health_mock::*;

/// One event: its level and its fields as strings.
type Event = (tracing::Level, std::collections::HashMap<String, String>);

/// Collects the fields of every event as strings.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<Event>>>);

impl Events {
    fn find(
        &self,
        to: &str,
    ) -> Option<(tracing::Level, std::collections::HashMap<String, String>)> {
        self.0
            .lock()
            .iter()
            .find(|(_, f)| f.get("to").map(String::as_str) == Some(to))
            .cloned()
    }
}

struct Fields<'a>(&'a mut std::collections::HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl tracing::Subscriber for Events {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = std::collections::HashMap::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().push((*event.metadata().level(), fields));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn health_changes_are_tracing_events_with_backend_from_to_and_reason() {
    let events = Events::default();
    let _guard = tracing::subscriber::set_default(events.clone());

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
        let (l, f) = events
            .find(to)
            .unwrap_or_else(|| panic!("no event to {to}"));
        assert_eq!(l, level, "{to}");
        assert_eq!(f["backend"], backend);
        assert_eq!(f["from"], from);
        assert_eq!(f["reason"], reason);
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
