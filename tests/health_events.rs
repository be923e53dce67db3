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

/// Runs `hook` on every event, with its `backend` and `to` fields.
struct Hook<F>(F);

#[derive(Default)]
struct Fields {
    backend: Option<String>,
    to: Option<String>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.record_debug(field, &value);
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let value = format!("{value:?}").trim_matches('"').to_owned();
        match field.name() {
            "backend" => self.backend = Some(value),
            "to" => self.to = Some(value),
            _ => {}
        }
    }
}

impl<F: Fn(&str, &str) + Send + Sync + 'static> tracing::Subscriber for Hook<F> {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let (Some(backend), Some(to)) = (fields.backend, fields.to) {
            (self.0)(&backend, &to);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn removing_a_backend_unhealthy_too_long_spares_one_added_under_its_id_since() {
    let (pool, _) = pool_of(&["a", "b"]);
    let fresh = Arc::new(BackendState::new(1));
    // When "a" is turned off, another "b" replaces the one due for removal
    // at the same instant, before the checker removes it.
    let _guard = tracing::subscriber::set_default(Hook({
        let (pool, fresh) = (pool.clone(), fresh.clone());
        move |backend: &str, to: &str| {
            if backend == "a" && to == "turned_off" {
                pool.insert_with_state("b", Backend::new(), fresh.clone());
            }
        }
    }));
    let script = Script::default();
    // "b" fails from its probe at 1 s on (removal due at 21 s); "a" from
    // its probe at 11 s on (turned off at 21 s).
    script.push("b", &[true, false]);
    script.push("a", &[true; 11]);
    script.push("a", &[false]);
    let t0 = Instant::now();
    let _checker = HealthChecker::new(pool.clone(), script.probe())
        .interval(secs(1))
        .unhealthy_interval(secs(100))
        .jitter(Duration::ZERO)
        .fall(1)
        .turned_off_after(secs(10))
        .removed_after(secs(20))
        .spawn();
    at(t0 + secs(21) - ms(1)).await;
    assert_eq!(
        pool.state(&"a".into()).unwrap().health(),
        tower_ha::HealthStatus::Unhealthy
    );
    at(t0 + secs(21)).await;
    assert_eq!(
        pool.state(&"a".into()).unwrap().health(),
        tower_ha::HealthStatus::TurnedOff
    );
    let b = pool.state(&"b".into()).expect("the new \"b\" was removed");
    assert!(Arc::ptr_eq(&b, &fresh));
}

/// A backend the full cap keeps in is warned of when it reaches its
/// threshold, once, and each refusal after is counted; a refusal stands
/// until the first ejection in force ends, and then the backend goes.
#[tokio::test(start_paused = true)]
async fn a_backend_the_cap_keeps_in_is_warned_of_once_and_counted() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let backend = Backend::new();
    backend.set(StatusCode::BAD_GATEWAY);
    // Three backends: 10 % allows one ejection.
    let health = HealthLayer::new()
        .consecutive_failures(2)
        .base_ejection_time(ms(1500))
        .max_ejection_percent(10);
    let services: Vec<_> = (0..3).map(|_| health.layer(backend.clone())).collect();
    let states: Vec<_> = (0..3).map(|_| Arc::new(BackendState::new(1))).collect();
    for _ in 0..2 {
        send(&services[0], "a", &states[0]).await;
    }
    assert!(states[0].is_ejected());
    for _ in 0..5 {
        send(&services[1], "b", &states[1]).await;
    }
    assert!(!states[1].is_ejected());
    assert_eq!(
        states[1].ejections_refused(),
        4,
        "each failure from the second"
    );
    let refused = capture.saying("ejection refused");
    let warned: Vec<_> = refused
        .iter()
        .filter(|e| e.level == tracing::Level::WARN)
        .collect();
    assert_eq!(warned.len(), 1, "{refused:?}");
    assert_eq!(warned[0].get("backend"), Some("b"));
    assert_eq!(warned[0].get("allowed"), Some("1"));
    assert_eq!(refused.len(), 4);
    // At 1.2 s the refusal is counted again, and stands until a's
    // ejection ends at 1.5 s, sooner than the second it may stand at most.
    tokio::time::advance(ms(1200)).await;
    send(&services[1], "b", &states[1]).await;
    assert!(!states[1].is_ejected());
    tokio::time::advance(ms(300)).await;
    send(&services[1], "b", &states[1]).await;
    assert!(states[1].is_ejected(), "ejected as a's ejection ends");
    assert_eq!(states[1].ejections_refused(), 5);
}
