//! Health: passive ejection, active probes, lifecycle, slow start and panic
//! routing, all on paused tokio time.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};
use tower_ha::balance::{Balance, Priority, RoundRobin};
use tower_ha::classify::Outcome;
use tower_ha::error::{find, InvalidRequest};
use tower_ha::extensions::ServedBy;
use tower_ha::extensions::Target;
use tower_ha::failover::FailoverLayer;
use tower_ha::failover::TimedOut;
use tower_ha::health::{probe_fn, CheckerHandle, HealthChecker, HealthLayer, SlowStart};
use tower_ha::{AdminStatus, BackendId, BackendState, BoxError, HealthStatus, Pool};

mod support;
use support::health_mock::*;

/// A checker of `pool` that probes every second, without jitter, so that
/// probes fall at exact instants.
fn every_second<S, P>(pool: Pool<S>, probe: P) -> HealthChecker<S, P>
where
    S: Clone + Send + Sync + 'static,
    P: tower_ha::health::Probe<S>,
{
    HealthChecker::new(pool, probe)
        .interval(secs(1))
        .jitter(Duration::ZERO)
}

// ---------------------------------------------------------------------------
// Passive detection
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn passive_ejects_after_exactly_n_consecutive_failures() {
    let backend = Backend::new();
    let svc = HealthLayer::new().layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    backend.set(StatusCode::SERVICE_UNAVAILABLE);
    for n in 1..=4 {
        assert_eq!(
            send(&svc, "a", &state).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(state.consecutive_failures(), n);
        assert!(!state.is_ejected(), "ejected after {n} failures");
    }
    let now = Instant::now();
    send(&svc, "a", &state).await;
    assert!(state.is_ejected(), "not ejected after 5 failures");
    assert_eq!(state.ejections(), 1);
    assert_eq!(state.ejected_until(), Some(now + secs(30)));
}

type Boxed = BoxCloneSyncService<Request<()>, http::Response<()>, BoxError>;

type Guarded<C> = tower_ha::health::Health<Boxed, C>;
type Stack<C> = tower_ha::failover::Failover<Balance<Guarded<C>, RoundRobin>>;

/// A pool of "hangs" (never answers) and "answers" (200), each wrapped by
/// `layer`, behind a failover layer with a 100 ms per-try timeout.
fn hangs_and_answers<C>(layer: HealthLayer<C>) -> (Pool<Guarded<C>>, Stack<C>)
where
    C: tower_ha::classify::Classifier + 'static,
{
    let hangs: Boxed = BoxCloneSyncService::new(tower::service_fn(|_req: Request<()>| {
        std::future::pending::<Result<http::Response<()>, BoxError>>()
    }));
    let answers: Boxed = BoxCloneSyncService::new(Backend::new().map_err(BoxError::from));
    let pool = Pool::new();
    pool.insert("hangs", layer.layer(hangs));
    pool.insert("answers", layer.layer(answers));
    let svc = FailoverLayer::new()
        .per_try_timeout(ms(100))
        .no_budget()
        .layer(Balance::new(pool.clone(), RoundRobin::new()));
    (pool, svc)
}

#[tokio::test(start_paused = true)]
async fn attempts_abandoned_at_the_per_try_timeout_count_as_failures() {
    let (pool, svc) = hangs_and_answers(HealthLayer::new());
    let hangs = pool.state(&"hangs".into()).unwrap();

    // A request its client drops while it waits on "hangs" is no failure.
    loop {
        let mut call = Box::pin(svc.clone().oneshot(Request::new(())));
        if futures::poll!(call.as_mut()).is_pending() {
            break;
        }
    }
    assert_eq!(hangs.consecutive_failures(), 0);

    // Every request succeeds (on "answers"), and each attempt abandoned on
    // "hangs" counts, until five in a row eject it.
    let mut timeouts = 0;
    while !hangs.is_ejected() {
        let start = Instant::now();
        let response = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(
            response.extensions().get::<ServedBy>().unwrap().0.as_str(),
            "answers"
        );
        if Instant::now() - start == ms(100) {
            timeouts += 1;
            if !hangs.is_ejected() {
                assert_eq!(hangs.consecutive_failures(), timeouts);
            }
        }
        assert!(timeouts <= 5, "not ejected after {timeouts} timeouts");
    }
    assert_eq!(timeouts, 5);
    assert_eq!(hangs.ejections(), 1);
}

/// Ready, or failing to get ready (a connection it cannot make) once told
/// to; answers 200.
#[derive(Clone)]
struct Unready(Arc<AtomicBool>);

impl tower::Service<Request<()>> for Unready {
    type Response = http::Response<()>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<http::Response<()>, BoxError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(if self.0.load(Ordering::SeqCst) {
            Err("connection refused".into())
        } else {
            Ok(())
        })
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(())))
    }
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_cannot_get_ready_is_ejected() {
    let down = Arc::new(AtomicBool::new(false));
    let layer = HealthLayer::new();
    let pool = Pool::new();
    pool.insert("flaky", layer.layer(Unready(down.clone())));
    pool.insert(
        "steady",
        layer.layer(Unready(Arc::new(AtomicBool::new(false)))),
    );
    let flaky = pool.state(&"flaky".into()).unwrap();
    let svc = FailoverLayer::new()
        .no_budget()
        .layer(Balance::new(pool.clone(), RoundRobin::new()));
    for _ in 0..2 {
        svc.clone().oneshot(Request::new(())).await.unwrap();
    }
    // "flaky" now refuses every connection: each request that picks it
    // fails over to "steady", and five in a row eject it.
    down.store(true, Ordering::SeqCst);
    let mut requests = 0;
    while !flaky.is_ejected() {
        let response = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(
            response.extensions().get::<ServedBy>().unwrap().0.as_str(),
            "steady"
        );
        requests += 1;
        assert!(requests <= 20, "not ejected after {requests} requests");
    }
    assert_eq!(flaky.ejections(), 1);

    // The same service inserted again has a new state: its readiness
    // failures count there.
    let service = {
        let snapshot = pool.snapshot();
        let index = snapshot.members().index_of(&"flaky".into()).unwrap();
        snapshot.service(index).unwrap().clone()
    };
    assert!(pool.remove(&"flaky".into()));
    down.store(false, Ordering::SeqCst);
    pool.insert("flaky", service);
    let again = pool.state(&"flaky".into()).unwrap();
    assert!(!Arc::ptr_eq(&again, &flaky));
    // Gone from the pool, the old state counts no more against the
    // ejection cap once nothing holds it.
    drop(flaky);
    for _ in 0..2 {
        svc.clone().oneshot(Request::new(())).await.unwrap();
    }
    down.store(true, Ordering::SeqCst);
    let mut requests = 0;
    while !again.is_ejected() {
        svc.clone().oneshot(Request::new(())).await.unwrap();
        requests += 1;
        assert!(requests <= 20, "not ejected after {requests} requests");
    }
}

#[tokio::test(start_paused = true)]
async fn a_classifier_that_ignores_timeouts_is_obeyed() {
    let classifier = |outcome: &Outcome<'_>| match outcome {
        Outcome::Error(e) => find::<TimedOut>(*e).is_none(),
        other => other.status().is_some_and(|s| s.is_server_error()),
    };
    let (pool, svc) = hangs_and_answers(HealthLayer::new().classifier(classifier));
    let hangs = pool.state(&"hangs".into()).unwrap();
    // Round robin alternates: about every other request waits on "hangs",
    // which stays in the pool as long as its timeouts do not count.
    let mut timeouts = 0;
    for _ in 0..40 {
        let start = Instant::now();
        svc.clone().oneshot(Request::new(())).await.unwrap();
        timeouts += usize::from(Instant::now() - start == ms(100));
    }
    assert!(timeouts >= 10, "only {timeouts} attempts reached \"hangs\"");
    assert_eq!(hangs.consecutive_failures(), 0);
    assert!(!hangs.is_ejected());
}

#[tokio::test(start_paused = true)]
async fn an_invalid_request_is_neither_a_failure_nor_a_success() {
    let invalid = Arc::new(AtomicBool::new(false));
    let backend = {
        let invalid = invalid.clone();
        tower::service_fn(move |_req: Request<()>| {
            let invalid = invalid.load(Ordering::SeqCst);
            async move {
                if invalid {
                    Err(BoxError::from(InvalidRequest::new(
                        "a path hides a separator",
                    )))
                } else {
                    Ok(http::Response::builder().status(503).body(()).unwrap())
                }
            }
        })
    };
    let svc = HealthLayer::new().layer(backend);
    let state = Arc::new(BackendState::new(1));
    let send = |svc: &tower_ha::health::Health<_, _>| {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(Target::new("a".into(), state.clone()));
        svc.clone().oneshot(req)
    };
    for _ in 0..4 {
        send(&svc).await.unwrap();
    }
    assert_eq!(state.consecutive_failures(), 4);
    invalid.store(true, Ordering::SeqCst);
    send(&svc).await.unwrap_err();
    assert_eq!(
        state.consecutive_failures(),
        4,
        "not reset by a bad request"
    );
    invalid.store(false, Ordering::SeqCst);
    send(&svc).await.unwrap();
    assert!(
        state.is_ejected(),
        "five failures in a row, the bad request aside"
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_starts_the_failure_count_again() {
    let backend = Backend::new();
    let svc = HealthLayer::new().layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    // 40 failures in all, never 5 in a row: a cumulative count (Panda's)
    // would have ejected the backend eight times over.
    for _ in 0..10 {
        backend.set(StatusCode::BAD_GATEWAY);
        for _ in 0..4 {
            send(&svc, "a", &state).await;
        }
        assert_eq!(state.consecutive_failures(), 4);
        backend.set(StatusCode::OK);
        send(&svc, "a", &state).await;
        assert_eq!(state.consecutive_failures(), 0);
    }
    assert!(!state.is_ejected());
    assert_eq!(state.ejections(), 0);
    // Statuses the classifier does not count are successes too.
    backend.set(StatusCode::INTERNAL_SERVER_ERROR);
    for _ in 0..10 {
        send(&svc, "a", &state).await;
    }
    assert!(!state.is_ejected());
}

#[tokio::test(start_paused = true)]
async fn the_shared_classifier_decides_what_fails() {
    use tower_ha::classify::DefaultClassifier;
    let backend = Backend::new();
    let svc = HealthLayer::new()
        .classifier(DefaultClassifier::new().status(StatusCode::INTERNAL_SERVER_ERROR))
        .consecutive_failures(2)
        .layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    backend.set(StatusCode::INTERNAL_SERVER_ERROR);
    send(&svc, "a", &state).await;
    send(&svc, "a", &state).await;
    assert!(state.is_ejected());
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_target_are_not_observed() {
    let backend = Backend::new();
    let svc = HealthLayer::new()
        .consecutive_failures(3)
        .layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    // The layer knows its backend from one request with a `Target`.
    backend.set(StatusCode::SERVICE_UNAVAILABLE);
    send(&svc, "a", &state).await;
    assert_eq!(state.consecutive_failures(), 1);
    for _ in 0..5 {
        let response = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(backend.calls(), 6);
    assert_eq!(
        state.consecutive_failures(),
        1,
        "untargeted failures counted"
    );
    assert_eq!(state.failures(), 1);
    assert!(!state.is_ejected());
}

#[tokio::test(start_paused = true)]
async fn an_ejection_ends_exactly_at_its_deadline() {
    let health = HealthLayer::new().consecutive_failures(2);
    let (good, bad) = (Backend::new(), Backend::new());
    let pool = Pool::new();
    pool.insert("good", health.layer(good.clone()));
    pool.insert("bad", health.layer(bad.clone()));
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    let generation = pool.snapshot().generation();
    bad.set(StatusCode::SERVICE_UNAVAILABLE);
    // Round robin alternates: four requests reach "bad" twice.
    for _ in 0..4 {
        balance.clone().oneshot(Request::new(())).await.unwrap();
    }
    assert_eq!(bad.calls(), 2);
    let ejected_at = Instant::now();
    let state = pool.state(&"bad".into()).unwrap();
    assert!(state.is_ejected());
    // A health change never rebuilds the snapshot.
    assert_eq!(pool.snapshot().generation(), generation);

    tokio::time::advance(secs(30) - Duration::from_nanos(1)).await;
    for _ in 0..10 {
        let r = balance.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(r.extensions().get::<ServedBy>().unwrap().0.as_str(), "good");
    }
    assert_eq!(bad.calls(), 2);
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert_eq!(Instant::now(), ejected_at + secs(30));
    assert!(!state.is_ejected());
    bad.set(StatusCode::OK);
    for _ in 0..4 {
        balance.clone().oneshot(Request::new(())).await.unwrap();
    }
    assert_eq!(bad.calls(), 4, "the restored backend takes its turn again");
}

#[tokio::test(start_paused = true)]
async fn ejection_time_grows_with_each_ejection_and_is_capped() {
    let backend = Backend::new();
    let svc = HealthLayer::new()
        .consecutive_failures(3)
        .base_ejection_time(secs(30))
        .max_ejection_time(secs(100))
        .layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    backend.set(StatusCode::GATEWAY_TIMEOUT);
    for expected in [30, 60, 90, 100, 100] {
        for _ in 0..3 {
            send(&svc, "a", &state).await;
        }
        let until = state.ejected_until().expect("ejected");
        assert_eq!(until - Instant::now(), secs(expected));
        tokio::time::advance(secs(expected)).await;
        assert!(!state.is_ejected());
    }
    assert_eq!(state.ejections(), 5);
}

#[tokio::test(start_paused = true)]
async fn failures_during_an_ejection_do_not_count_towards_the_next() {
    let backend = Backend::new();
    let svc = HealthLayer::new().layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    backend.set(StatusCode::SERVICE_UNAVAILABLE);
    async fn eject_and_fail_on(svc: &tower_ha::health::Health<Backend>, state: &Arc<BackendState>) {
        for _ in 0..5 {
            send(svc, "a", state).await;
        }
        assert!(state.is_ejected());
        // Requests in flight when it was ejected, or sent by panic
        // routing, fail meanwhile: counted, but not in a row, so that no
        // request seeing the ejection's end can find them there.
        let failures = state.failures();
        for _ in 0..5 {
            send(svc, "a", state).await;
        }
        assert_eq!(state.failures(), failures + 5);
        assert_eq!(state.consecutive_failures(), 0);
    }

    // The ejection runs out: one failure after it is not enough.
    eject_and_fail_on(&svc, &state).await;
    tokio::time::advance(secs(30)).await;
    send(&svc, "a", &state).await;
    assert!(!state.is_ejected(), "ejected again by one failure");
    assert_eq!(state.consecutive_failures(), 1);
    for _ in 0..4 {
        send(&svc, "a", &state).await;
    }
    assert!(state.is_ejected(), "five new failures in a row eject it");

    // A probe lifts the ejection: the same.
    tokio::time::advance(secs(60)).await;
    eject_and_fail_on(&svc, &state).await;
    assert!(state.uneject());
    assert_eq!(state.consecutive_failures(), 0);
    send(&svc, "a", &state).await;
    assert!(!state.is_ejected(), "ejected again by one failure");
    assert_eq!(state.ejections(), 3);
}

/// An ejection's end is reported as it runs out, though no request
/// reaches the backend after it (a backup that is not failed back to, a
/// backend the failover layer steers around): the event stream and the
/// backend's last change do not show it ejected for ever.
#[tokio::test(start_paused = true)]
async fn an_ejections_end_is_reported_as_it_runs_out_without_a_request() {
    use tower_ha::control::{Event, Events};
    let events = Events::default();
    let svc = HealthLayer::new()
        .events(events.clone())
        .layer(Backend::new());
    let state = Arc::new(BackendState::new(1));
    svc.get_ref().set(StatusCode::SERVICE_UNAVAILABLE);
    for _ in 0..5 {
        send(&svc, "a", &state).await;
    }
    let until = state.ejected_until().expect("ejected");
    let restored = || {
        events
            .history()
            .iter()
            .filter_map(|r| match &r.event {
                Event::Restored { backend, reason } => Some((format!("{backend}: {reason}"), r.at)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    tokio::time::sleep_until(until - ms(1)).await;
    assert_eq!(restored(), []);
    tokio::time::sleep_until(until).await;
    tokio::task::yield_now().await;
    assert_eq!(restored(), [("a: ejection ended".to_owned(), until)]);
    assert_eq!(state.ejected_until(), None, "cleared");
}

/// An ejection lifted early (by a probe) does not leave its timer waiting
/// for its deadline, however far: the timer's task ends within a minute.
#[tokio::test(start_paused = true)]
async fn a_lifted_ejection_leaves_no_timer_waiting() {
    let svc = HealthLayer::new()
        .base_ejection_time(Duration::from_secs(365 * 24 * 3600))
        .layer(Backend::new());
    let state = Arc::new(BackendState::new(1));
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    svc.get_ref().set(StatusCode::SERVICE_UNAVAILABLE);
    for _ in 0..5 {
        send(&svc, "a", &state).await;
    }
    assert!(state.is_ejected());
    assert_eq!(tasks(), before + 1, "the timer of the ejection's end");
    assert!(state.uneject());
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(tasks(), before, "gone with the ejection");
}

/// Without the runtime that ejected the backend (its timer gone with it),
/// the ejection's end is reported at the first outcome after it, once.
#[test]
fn an_ejections_end_is_reported_at_the_next_outcome_once_its_timer_is_gone() {
    use tower_ha::control::{Event, Events};
    let events = Events::default();
    let svc = HealthLayer::new()
        .consecutive_failures(1)
        .base_ejection_time(ms(1))
        .events(events.clone())
        .layer(Backend::new());
    let state = Arc::new(BackendState::new(1));
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    };
    svc.get_ref().set(StatusCode::SERVICE_UNAVAILABLE);
    runtime().block_on(send(&svc, "a", &state));
    assert!(state.ejected_until().is_some(), "ejected");
    // The runtime, and the timer it held, are gone; the ejection runs out
    // meanwhile (a millisecond long, slept past).
    std::thread::sleep(ms(20));
    let restored = || {
        events
            .history()
            .iter()
            .filter(|r| matches!(r.event, Event::Restored { .. }))
            .count()
    };
    assert_eq!(restored(), 0);
    svc.get_ref().set(StatusCode::OK);
    let again = runtime();
    again.block_on(send(&svc, "a", &state));
    again.block_on(send(&svc, "a", &state));
    assert_eq!(restored(), 1);
    assert_eq!(state.ejected_until(), None, "cleared");
}

/// A backend that comes back with its state while ejected (discovery
/// dropped it, then listed it again, and it was wrapped anew) has the end
/// of its ejection reported, once.
#[tokio::test(start_paused = true)]
async fn a_backend_wrapped_again_while_ejected_reports_the_ejections_end() {
    use tower_ha::control::{Event, Events};
    let events = Events::default();
    let layer = HealthLayer::new().events(events.clone());
    let backend = Backend::new();
    let state = Arc::new(BackendState::new(1));
    let first = layer.layer(backend.clone());
    backend.set(StatusCode::SERVICE_UNAVAILABLE);
    for _ in 0..5 {
        send(&first, "a", &state).await;
    }
    let until = state.ejected_until().expect("ejected");
    drop(first);
    let again = layer.layer(backend.clone());
    backend.set(StatusCode::OK);
    // No request reaches it while it is ejected: its first comes after.
    tokio::time::sleep_until(until).await;
    send(&again, "a", &state).await;
    send(&again, "a", &state).await;
    let restored: Vec<String> = events
        .history()
        .iter()
        .filter_map(|r| match &r.event {
            Event::Restored { backend, reason } => Some(format!("{backend}: {reason}")),
            _ => None,
        })
        .collect();
    assert_eq!(restored, ["a: ejection ended"]);
}

/// A backend wrapped again while still ejected, while its former service
/// still lives (a long request through it), counts its ejection towards
/// the cap through the new service once the former is gone.
#[tokio::test(start_paused = true)]
async fn an_ejection_taken_over_while_the_old_service_lives_still_counts() {
    // Three backends: at most one ejected at once.
    let layer = HealthLayer::new();
    let (a, b) = (Backend::new(), Backend::new());
    let (a_state, b_state) = (
        Arc::new(BackendState::new(1)),
        Arc::new(BackendState::new(1)),
    );
    let first = layer.layer(a.clone());
    let b_svc = layer.layer(b.clone());
    let _c_svc = layer.layer(Backend::new());
    a.set(StatusCode::SERVICE_UNAVAILABLE);
    for _ in 0..5 {
        send(&first, "a", &a_state).await;
    }
    assert!(a_state.is_ejected());
    // Wrapped again, its first request (panic routing) comes while the
    // former service still lives.
    let again = layer.layer(a.clone());
    send(&again, "a", &a_state).await;
    drop(first);
    assert!(a_state.is_ejected());
    b.set(StatusCode::SERVICE_UNAVAILABLE);
    for _ in 0..5 {
        send(&b_svc, "b", &b_state).await;
    }
    assert!(!b_state.is_ejected(), "two of three backends ejected");
    drop(again);
}

/// A backend wrapped twice (two layers' services over one state): an
/// ejection that ran out, unreported yet by the service that ejected it,
/// and that the other service's failure replaces with a new one, has its
/// end reported all the same: one end per ejection.
#[tokio::test(start_paused = true)]
async fn an_ejection_replaced_before_its_end_was_reported_still_reports_it() {
    use tower_ha::control::{Event, Events};
    let events = Events::default();
    let layer = || {
        HealthLayer::new()
            .consecutive_failures(1)
            .max_ejection_percent(100)
            .events(events.clone())
    };
    let backend = Backend::new();
    let state = Arc::new(BackendState::new(1));
    let (first, second) = (
        layer().layer(backend.clone()),
        layer().layer(backend.clone()),
    );
    // Both know the backend before it is ejected.
    send(&first, "a", &state).await;
    send(&second, "a", &state).await;
    backend.set(StatusCode::SERVICE_UNAVAILABLE);
    send(&first, "a", &state).await;
    let until = state.ejected_until().expect("ejected");
    tokio::time::sleep_until(until).await;
    // The first ejection ran out; the second service's failure ejects the
    // backend again before the first service saw it end.
    send(&second, "a", &state).await;
    assert!(state.is_ejected());
    let until = state.ejected_until().expect("ejected again");
    tokio::time::sleep_until(until).await;
    backend.set(StatusCode::OK);
    send(&first, "a", &state).await;
    send(&second, "a", &state).await;
    let count = |restored: bool| {
        events
            .history()
            .iter()
            .filter(|r| match &r.event {
                Event::Restored { .. } => restored,
                Event::Ejected { .. } => !restored,
                _ => false,
            })
            .count()
    };
    assert_eq!(count(false), 2);
    assert_eq!(count(true), 2);
}

#[tokio::test(start_paused = true)]
async fn the_ejection_time_multiplier_decays_while_a_backend_stays_in() {
    use tower_ha::control::{Event, Events};
    let events = Events::default();
    let backend = Backend::new();
    let svc = HealthLayer::new()
        .events(events.clone())
        .layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    backend.set(StatusCode::SERVICE_UNAVAILABLE);
    // Ejects the backend after `clean` more of not being ejected; returns
    // how long the ejection lasts, and waits until it is over.
    let eject_after = |clean: Duration| {
        let (svc, state) = (&svc, &state);
        async move {
            tokio::time::advance(clean).await;
            for _ in 0..5 {
                send(svc, "a", state).await;
            }
            let lasts = state.ejected_until().expect("ejected") - Instant::now();
            tokio::time::advance(lasts).await;
            lasts
        }
    };
    // Ejected again as soon as it is back: 30 s, then 60 s.
    assert_eq!(eject_after(Duration::ZERO).await, secs(30));
    assert_eq!(eject_after(Duration::ZERO).await, secs(60));
    // One whole decay interval (10 s) clean takes one off: 60 s again.
    assert_eq!(eject_after(secs(19)).await, secs(60));
    // After a long clean period, back to the base time.
    assert_eq!(eject_after(secs(120)).await, secs(30));

    // The events count every ejection and carry the time it lasts.
    let ejected: Vec<_> = events
        .history()
        .iter()
        .filter_map(|r| match &r.event {
            Event::Ejected {
                ejection, duration, ..
            } => Some((*ejection, duration.as_secs())),
            _ => None,
        })
        .collect();
    assert_eq!(ejected, [(1, 30), (2, 60), (3, 60), (4, 30)]);
}

#[tokio::test(start_paused = true)]
async fn the_decay_interval_is_configurable() {
    let backend = Backend::new();
    let svc = HealthLayer::new()
        .consecutive_failures(1)
        .ejection_decay_interval(secs(60))
        .layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    backend.set(StatusCode::SERVICE_UNAVAILABLE);
    for (clean, expected) in [(0, 30), (0, 60), (59, 90), (60, 90), (180, 30)] {
        tokio::time::advance(secs(clean)).await;
        send(&svc, "a", &state).await;
        let lasts = state.ejected_until().expect("ejected") - Instant::now();
        assert_eq!(lasts, secs(expected), "after {clean} s clean");
        tokio::time::advance(lasts).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_zero_base_ejection_time_still_ejects() {
    let backend = Backend::new();
    let svc = HealthLayer::new()
        .consecutive_failures(1)
        .base_ejection_time(Duration::ZERO)
        .layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    backend.set(StatusCode::SERVICE_UNAVAILABLE);
    send(&svc, "a", &state).await;
    assert!(state.is_ejected());
    assert_eq!(state.ejected_until(), Some(Instant::now() + ms(1)));
}

#[tokio::test(start_paused = true)]
async fn at_most_the_configured_share_of_the_pool_is_ejected() {
    let health = HealthLayer::new().consecutive_failures(1);
    let backend = Backend::new();
    backend.set(StatusCode::BAD_GATEWAY);
    let services: Vec<_> = (0..20).map(|_| health.layer(backend.clone())).collect();
    let states: Vec<_> = (0..20).map(|_| Arc::new(BackendState::new(1))).collect();
    for round in 0..3 {
        for (i, (svc, state)) in services.iter().zip(&states).enumerate() {
            send(svc, &format!("b{i}"), state).await;
        }
        let ejected = states.iter().filter(|s| s.is_ejected()).count();
        assert_eq!(ejected, 2, "10 % of 20, round {round}");
    }
    // Once the two ejections end, two others may be ejected.
    tokio::time::advance(secs(30)).await;
    for (i, (svc, state)) in services.iter().zip(&states).enumerate() {
        send(svc, &format!("b{i}"), state).await;
    }
    assert_eq!(states.iter().filter(|s| s.is_ejected()).count(), 2);
    assert_eq!(states.iter().map(|s| s.ejections()).sum::<u32>(), 4);

    // With 3 backends 10 % is less than one, and so is 0 %: one is always
    // allowed.
    for percent in [10, 0] {
        let health = HealthLayer::new()
            .consecutive_failures(1)
            .max_ejection_percent(percent);
        let services: Vec<_> = (0..3).map(|_| health.layer(backend.clone())).collect();
        let states: Vec<_> = (0..3).map(|_| Arc::new(BackendState::new(1))).collect();
        for (svc, state) in services.iter().zip(&states) {
            send(svc, "x", state).await;
        }
        assert_eq!(
            states.iter().filter(|s| s.is_ejected()).count(),
            1,
            "{percent} %"
        );
    }
}

// ---------------------------------------------------------------------------
// Active probes
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn rise_and_fall_count_consecutive_probe_results() {
    let (pool, _) = pool_of(&["a"]);
    let state = pool.state(&"a".into()).unwrap();
    let script = Script::default();
    // Probes at 0 s, 1 s, 2 s, ...
    script.push(
        "a",
        &[
            true, false, false, true, false, false, false, // unhealthy at 6 s
            true, false, true, true, // healthy at 10 s
        ],
    );
    let t0 = Instant::now();
    let _checker = every_second(pool.clone(), script.probe())
        .rise(2)
        .fall(3)
        .spawn();
    let mut seen = Vec::new();
    for k in 0..11 {
        at(t0 + secs(k) + ms(500)).await;
        seen.push(state.health());
    }
    use HealthStatus::{Healthy as H, Unhealthy as U};
    assert_eq!(seen, [H, H, H, H, H, H, U, U, U, U, H]);
    assert_eq!(script.probes.load(Ordering::SeqCst), 11);
}

/// A health set by someone else (by hand, or by another checker sharing
/// the state) starts the counts again: the checker brings the backend back
/// after `rise` passes made since, and takes it down after `fall` failures
/// made since, not at once on the strength of those that came before.
#[tokio::test(start_paused = true)]
async fn rise_and_fall_count_from_a_health_set_by_someone_else() {
    let (pool, _) = pool_of(&["a"]);
    let state = pool.state(&"a".into()).unwrap();
    let script = Script::default();
    // Probes at 0 s, 1 s, 2 s, ...: five passes, then failures.
    script.push("a", &[true, true, true, true, true]);
    script.push("a", &[false; 8]);
    let t0 = Instant::now();
    let _checker = every_second(pool.clone(), script.probe())
        .rise(3)
        .fall(3)
        .spawn();
    at(t0 + secs(2) + ms(500)).await;
    state.set_health(HealthStatus::Unhealthy);
    let mut seen = Vec::new();
    for k in 3..5 {
        at(t0 + secs(k) + ms(500)).await;
        seen.push(state.health());
    }
    // Two passes since the change (3 s and 4 s), short of `rise`, then
    // failures: still unhealthy at 7 s. Made healthy by hand, it stays so
    // for three more failures.
    at(t0 + secs(7) + ms(500)).await;
    seen.push(state.health());
    state.set_health(HealthStatus::Healthy);
    for k in 8..11 {
        at(t0 + secs(k) + ms(500)).await;
        seen.push(state.health());
    }
    use HealthStatus::{Healthy as H, Unhealthy as U};
    assert_eq!(seen, [U, U, U, H, H, U]);
}

#[tokio::test(start_paused = true)]
async fn probes_come_faster_while_unhealthy() {
    let (pool, _) = pool_of(&["a"]);
    let state = pool.state(&"a".into()).unwrap();
    let script = Script::default();
    script.set("a", false);
    let t0 = Instant::now();
    let _checker = HealthChecker::new(pool.clone(), script.probe())
        .interval(secs(10))
        .unhealthy_interval(secs(1))
        .jitter(Duration::ZERO)
        .fall(1)
        .spawn();
    at(t0 + ms(500)).await;
    assert_eq!(state.health(), HealthStatus::Unhealthy);
    assert_eq!(script.probes.load(Ordering::SeqCst), 1);
    at(t0 + ms(5500)).await;
    assert_eq!(script.probes.load(Ordering::SeqCst), 6);
}

/// With the default settings (2 s apart, up to 100 ms of jitter), each
/// backend's probes start at once, then come 2 s to 2.1 s apart (plus
/// under a millisecond: tokio's timers fire on whole milliseconds): never
/// sooner, never in a burst, and spread over that window rather than
/// all at one spacing.
#[tokio::test(start_paused = true)]
async fn default_jitter_spaces_probes_by_the_interval_plus_at_most_100_ms() {
    let (pool, _) = pool_of(&["a", "b"]);
    let started: Arc<parking_lot::Mutex<Vec<(BackendId, Instant)>>> = Arc::default();
    let probe = probe_fn({
        let started = started.clone();
        move |id: &BackendId, _: &Backend| {
            started.lock().push((id.clone(), Instant::now()));
            async { Ok::<(), BoxError>(()) }
        }
    });
    let t0 = Instant::now();
    let _checker = HealthChecker::new(pool.clone(), probe).spawn();
    at(t0 + secs(250)).await;
    let started = started.lock().clone();
    for id in ["a", "b"] {
        let times: Vec<Instant> = started
            .iter()
            .filter(|(of, _)| of.as_str() == id)
            .map(|(_, at)| *at)
            .collect();
        assert_eq!(times.first(), Some(&t0), "{id}: probed at once");
        // 250 s hold at least 250 / 2.1 probes.
        assert!(times.len() >= 119, "{id}: {} probes", times.len());
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        for gap in &gaps {
            assert!(
                *gap >= secs(2) && *gap < secs(2) + ms(101),
                "{id}: probes {gap:?} apart"
            );
        }
        let (min, max) = (gaps.iter().min().unwrap(), gaps.iter().max().unwrap());
        assert!(
            *max - *min >= ms(50),
            "{id}: the jitter spreads the gaps, yet they are {min:?} to {max:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_hangs_fails_at_its_timeout() {
    let pool = Pool::new();
    pool.insert("a", ());
    let state = pool.state(&"a".into()).unwrap();
    let probe = probe_fn(|_id: &BackendId, _svc: &()| std::future::pending());
    let t0 = Instant::now();
    let _checker = HealthChecker::new(pool.clone(), probe)
        .interval(secs(2))
        .timeout(secs(1))
        .jitter(Duration::ZERO)
        .fall(2)
        .spawn();
    // Probes start at 0 s and 2 s and time out at 1 s and 3 s.
    at(t0 + secs(3) - ms(1)).await;
    assert_eq!(state.health(), HealthStatus::Healthy);
    at(t0 + secs(3)).await;
    assert_eq!(state.health(), HealthStatus::Unhealthy);
}

/// Outside a runtime `spawn` panics before it marks anything: a pool that a
/// balancer serves from is not left with backends no checker probes.
#[test]
fn a_spawn_outside_a_runtime_changes_nothing() {
    let (pool, _) = pool_of(&["a"]);
    let script = Script::default();
    let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        HealthChecker::new(pool.clone(), script.probe())
            .start_unhealthy(true)
            .spawn()
    }));
    assert!(spawned.is_err());
    assert_eq!(
        pool.state(&"a".into()).unwrap().health(),
        HealthStatus::Healthy
    );
}

#[tokio::test(start_paused = true)]
async fn start_unhealthy_waits_for_rise_passing_probes() {
    let (pool, _) = pool_of(&["a"]);
    let state = pool.state(&"a".into()).unwrap();
    let script = Script::default();
    let t0 = Instant::now();
    let _checker = every_second(pool.clone(), script.probe())
        .rise(3)
        .start_unhealthy(true)
        .spawn();
    // From the moment `spawn` returns: a request sent then is not routed
    // to a backend no probe has passed.
    assert_eq!(state.health(), HealthStatus::Unhealthy);
    at(t0 + ms(1500)).await;
    assert_eq!(state.health(), HealthStatus::Unhealthy);
    at(t0 + ms(2500)).await;
    assert_eq!(state.health(), HealthStatus::Healthy);
}

/// A backend added while the checker runs is unhealthy from the moment a
/// balancer can see it, not from when the checker's task next runs.
#[tokio::test(start_paused = true)]
async fn start_unhealthy_holds_for_a_backend_added_later_at_once() {
    let (pool, _) = pool_of(&["a"]);
    let script = Script::default();
    let checker = HealthChecker::new(pool.clone(), script.probe())
        .start_unhealthy(true)
        .spawn();
    let health = |id: &str| pool.state(&id.into()).unwrap().health();
    pool.insert("b", Backend::new());
    assert_eq!(health("b"), HealthStatus::Unhealthy);
    // Once the checker has stopped, nothing would ever probe a new backend
    // healthy: it starts healthy again.
    checker.shutdown().await;
    pool.insert("c", Backend::new());
    assert_eq!(health("c"), HealthStatus::Healthy);
}

/// A state another pool shares with this one, serving and watched by its
/// own checker, keeps its health: `start_unhealthy` marks the backends this
/// pool makes, not those it is given.
#[tokio::test(start_paused = true)]
async fn start_unhealthy_leaves_a_shared_state_alone() {
    let (first, _) = pool_of(&["a"]);
    let state = first.state(&"a".into()).unwrap();
    let script = Script::default();
    let _watching = every_second(first.clone(), script.probe()).spawn();
    let second: Pool<Backend> = Pool::new();
    let _checker = every_second(second.clone(), script.probe())
        .start_unhealthy(true)
        .spawn();
    second.insert_with_state("a", Backend::new(), state.clone());
    settle().await;
    assert_eq!(state.health(), HealthStatus::Healthy);
    // A backend the second pool makes starts unhealthy.
    second.insert("b", Backend::new());
    settle().await;
    assert_eq!(
        second.state(&"b".into()).unwrap().health(),
        HealthStatus::Unhealthy
    );
}

/// A state another pool gave this one before its checker started keeps
/// its health too; a backend the pool made starts unhealthy.
#[tokio::test(start_paused = true)]
async fn start_unhealthy_leaves_a_state_given_before_it_starts_alone() {
    let (first, _) = pool_of(&["a"]);
    let state = first.state(&"a".into()).unwrap();
    let second: Pool<Backend> = Pool::new();
    second.insert_with_state("a", Backend::new(), state.clone());
    second.insert("b", Backend::new());
    let _checker = every_second(second.clone(), Script::default().probe())
        .start_unhealthy(true)
        .spawn();
    settle().await;
    assert_eq!(state.health(), HealthStatus::Healthy);
    assert_eq!(
        second.state(&"b".into()).unwrap().health(),
        HealthStatus::Unhealthy
    );
}

/// A backend the pool made, dropped by discovery and back with its kept
/// state before the checker starts, is the pool's own: it starts unhealthy
/// like the others that have not served.
#[tokio::test(start_paused = true)]
async fn start_unhealthy_marks_a_state_back_from_discovery() {
    use tower::discover::Change;
    let (pool, backends) = pool_of(&["a"]);
    let state = pool.state(&"a".into()).unwrap();
    let gone = futures::stream::iter([Ok::<_, std::convert::Infallible>(Change::Remove("a"))]);
    pool.discover(gone).await.unwrap();
    pool.insert("a", backends[0].clone());
    assert!(
        Arc::ptr_eq(&pool.state(&"a".into()).unwrap(), &state),
        "kept"
    );
    let _checker = HealthChecker::new(pool.clone(), Script::default().probe())
        .start_unhealthy(true)
        .spawn();
    assert_eq!(state.health(), HealthStatus::Unhealthy);
}

/// A checker started on a pool that already serves (spawned late, or
/// replaced at a configuration reload) leaves the backends that have
/// served alone: marking them would take a serving primary out of its
/// group, for good under `Failback::Never`. One that has not served yet
/// starts unhealthy.
#[tokio::test(start_paused = true)]
async fn start_unhealthy_leaves_a_backend_that_has_served_alone() {
    let (pool, _) = pool_of(&["p", "b"]);
    let group = Balance::new(pool.clone(), Priority::new("g", ["p", "b"]));
    let served = || async {
        let response = group.clone().oneshot(Request::new(())).await.unwrap();
        response
            .extensions()
            .get::<ServedBy>()
            .unwrap()
            .0
            .to_string()
    };
    assert_eq!(served().await, "p");
    let script = Script::default();
    // The primary's first probe fails (one of `fall`), the backup's passes.
    script.push("p", &[false]);
    let _checker = every_second(pool.clone(), script.probe())
        .rise(1)
        .start_unhealthy(true)
        .spawn();
    assert_eq!(
        pool.state(&"b".into()).unwrap().health(),
        HealthStatus::Unhealthy,
        "not served yet"
    );
    settle().await;
    assert!(script.probes.load(Ordering::SeqCst) >= 2, "both probed");
    assert_eq!(
        pool.state(&"p".into()).unwrap().health(),
        HealthStatus::Healthy
    );
    assert_eq!(served().await, "p", "no failover");
}

/// A backend made unhealthy by something other than this checker's own
/// failing probes (an operator, another checker on the same state) is
/// turned off and removed on time all the same.
#[tokio::test(start_paused = true)]
async fn a_backend_made_unhealthy_elsewhere_is_turned_off_and_removed() {
    let (pool, _) = pool_of(&["a"]);
    let state = pool.state(&"a".into()).unwrap();
    let script = Script::default();
    // Passes once, then fails for good.
    script.push("a", &[true, false]);
    let t0 = Instant::now();
    let _checker = every_second(pool.clone(), script.probe())
        .fall(3)
        .turned_off_after(secs(5))
        .removed_after(secs(10))
        .spawn();
    at(t0 + ms(500)).await;
    state.set_health(HealthStatus::Unhealthy);
    at(t0 + secs(7)).await;
    assert_eq!(state.health(), HealthStatus::TurnedOff);
    at(t0 + secs(12)).await;
    assert!(!pool.contains(&"a".into()));
}

/// Fails five requests in a row, the count that ejects a backend by
/// default, to the pool's first backend, `a`, which `backend` serves.
async fn fail_five_in_a_row(
    pool: &Pool<tower_ha::health::Health<Backend>>,
    backend: &Backend,
    state: &Arc<BackendState>,
) {
    backend.set(StatusCode::SERVICE_UNAVAILABLE);
    let svc = pool.snapshot().service(0).unwrap().clone();
    for _ in 0..5 {
        send(&svc, "a", state).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_passing_probe_lifts_a_passive_ejection() {
    let pool = Pool::new();
    let backend = Backend::new();
    pool.insert("a", HealthLayer::new().layer(backend.clone()));
    let state = pool.state(&"a".into()).unwrap();
    let script = Script::default();
    let t0 = Instant::now();
    let _checker = HealthChecker::new(pool.clone(), script.probe())
        .interval(secs(5))
        .jitter(Duration::ZERO)
        .spawn();
    at(t0 + secs(1)).await;
    fail_five_in_a_row(&pool, &backend, &state).await;
    assert!(state.is_ejected());
    at(t0 + secs(5) - ms(1)).await;
    assert!(state.is_ejected());
    at(t0 + secs(5)).await;
    assert!(!state.is_ejected(), "the probe at 5 s passed");
}

/// A probe sent before an ejection began says nothing of the failures that
/// caused it: its pass lifts no ejection; the next probe's does.
#[tokio::test(start_paused = true)]
async fn a_probe_sent_before_an_ejection_does_not_lift_it() {
    let pool = Pool::new();
    let backend = Backend::new();
    pool.insert("a", HealthLayer::new().layer(backend.clone()));
    let state = pool.state(&"a".into()).unwrap();
    // Each probe answers a pass after 500 ms.
    let probe = probe_fn(|_id: &BackendId, _svc: &_| async {
        tokio::time::sleep(ms(500)).await;
        Ok::<_, BoxError>(())
    });
    let t0 = Instant::now();
    let _checker = HealthChecker::new(pool.clone(), probe)
        .interval(secs(5))
        .jitter(Duration::ZERO)
        .spawn();
    // The probe sent at 0 s is under way when the backend is ejected.
    at(t0 + ms(100)).await;
    fail_five_in_a_row(&pool, &backend, &state).await;
    assert!(state.is_ejected());
    at(t0 + secs(1)).await;
    assert!(state.is_ejected(), "the probe sent before it lifted it");
    // The next, sent at 5 s during the ejection, passes at 5.5 s.
    at(t0 + ms(5_499)).await;
    assert!(state.is_ejected());
    at(t0 + ms(5_500)).await;
    assert!(!state.is_ejected(), "the probe sent during it passed");
}

/// With `lift_ejections(false)` passing probes leave a passive ejection
/// alone: it runs its 30 s, as a TCP connect that passes on a backend
/// answering 503 must not bring it back at each interval.
#[tokio::test(start_paused = true)]
async fn an_ejection_runs_its_time_when_probes_may_not_lift_it() {
    let pool = Pool::new();
    let backend = Backend::new();
    pool.insert("a", HealthLayer::new().layer(backend.clone()));
    let state = pool.state(&"a".into()).unwrap();
    let script = Script::default();
    let t0 = Instant::now();
    let _checker = HealthChecker::new(pool.clone(), script.probe())
        .interval(secs(5))
        .jitter(Duration::ZERO)
        .lift_ejections(false)
        .spawn();
    at(t0 + secs(1)).await;
    fail_five_in_a_row(&pool, &backend, &state).await;
    let ejected_until = state.ejected_until().expect("ejected");
    assert_eq!(ejected_until, t0 + secs(31));
    at(t0 + secs(30)).await;
    assert!(state.is_ejected(), "a passing probe lifted it");
    assert_eq!(state.health(), HealthStatus::Healthy);
    at(ejected_until).await;
    assert!(!state.is_ejected());
}

/// `shutdown` returns once the probes under way are gone too, even one in
/// the middle of a poll on another worker: nothing of them (a connection,
/// the service clone) outlives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_waits_for_the_probes_under_way() {
    let (pool, _) = pool_of(&["a"]);
    let alive = Arc::new(());
    let entered = Arc::new(AtomicBool::new(false));
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Arc::new(parking_lot::Mutex::new(released));
    let (held, flag) = (alive.clone(), entered.clone());
    let probe = probe_fn(move |_id: &BackendId, _svc: &Backend| {
        let (held, flag, released) = (held.clone(), flag.clone(), released.clone());
        async move {
            let _held = held;
            flag.store(true, Ordering::SeqCst);
            // A probe stuck in a synchronous call until the test lets it go.
            let _ = released.lock().recv();
            std::future::pending::<Result<(), BoxError>>().await
        }
    });
    let checker = HealthChecker::new(pool, probe).timeout(secs(60)).spawn();
    support::wait::spin_until("a probe starts", || entered.load(Ordering::SeqCst)).await;
    let mut shutdown = tokio::spawn(checker.shutdown());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut shutdown)
            .await
            .is_err(),
        "shutdown waits while the probe is in its poll"
    );
    assert_eq!(
        Arc::strong_count(&alive),
        3,
        "the checker's probe and the probe under way are still there"
    );
    release.send(()).unwrap();
    support::wait::bounded_real("the shutdown", shutdown)
        .await
        .unwrap();
    assert_eq!(
        Arc::strong_count(&alive),
        1,
        "neither the probe nor the checker is left"
    );
}

#[tokio::test(start_paused = true)]
async fn the_checker_stops_when_its_handle_is_dropped_or_shut_down() {
    let (pool, _) = pool_of(&["a"]);
    let script = Script::default();
    let checker = every_second(pool.clone(), script.probe()).spawn();
    settle().await;
    assert_eq!(script.probes.load(Ordering::SeqCst), 1);
    drop(checker);
    tokio::time::sleep(secs(10)).await;
    assert_eq!(script.probes.load(Ordering::SeqCst), 1);

    let checker = every_second(pool.clone(), script.probe()).spawn();
    settle().await;
    assert_eq!(script.probes.load(Ordering::SeqCst), 2);
    assert!(!checker.is_finished());
    checker.shutdown().await;
    tokio::time::sleep(secs(10)).await;
    assert_eq!(script.probes.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn turned_off_and_removed_at_the_configured_times() {
    let (pool, _) = pool_of(&["a", "b"]);
    let state = pool.state(&"a".into()).unwrap();
    let script = Script::default();
    // Healthy at 0 s, unhealthy from the probe at 1 s on.
    script.push("a", &[true, false]);
    let t0 = Instant::now();
    let _checker = HealthChecker::new(pool.clone(), script.probe())
        .interval(secs(1))
        .unhealthy_interval(secs(7)) // probes at 8 s, 15 s, ...: off the marks
        .jitter(Duration::ZERO)
        .fall(1)
        .turned_off_after(secs(10))
        .removed_after(secs(30))
        .spawn();
    at(t0 + ms(1500)).await;
    assert_eq!(state.health(), HealthStatus::Unhealthy);
    at(t0 + secs(11) - ms(1)).await;
    assert_eq!(state.health(), HealthStatus::Unhealthy);
    at(t0 + secs(11)).await;
    assert_eq!(state.health(), HealthStatus::TurnedOff);
    at(t0 + secs(31) - ms(1)).await;
    assert!(pool.contains(&"a".into()));
    at(t0 + secs(31)).await;
    assert!(!pool.contains(&"a".into()));
    assert!(pool.contains(&"b".into()));
}

/// A backend the operator disabled is not removed however long it stays
/// unhealthy: its state holds the disable, which a discovery that still
/// lists it would lose by adding it back. Enabled again, it is.
#[tokio::test(start_paused = true)]
async fn a_backend_the_operator_disabled_is_not_removed() {
    let (pool, _) = pool_of(&["a", "b"]);
    let state = pool.state(&"a".into()).unwrap();
    let script = Script::default();
    script.push("a", &[true, false]);
    let t0 = Instant::now();
    let _checker = every_second(pool.clone(), script.probe())
        .fall(1)
        .removed_after(secs(10))
        .spawn();
    at(t0 + ms(500)).await;
    state.set_admin(AdminStatus::Disabled);
    at(t0 + secs(20)).await;
    assert_eq!(state.health(), HealthStatus::Unhealthy);
    assert!(pool.contains(&"a".into()), "kept, disabled");
    state.set_admin(AdminStatus::Enabled);
    at(t0 + secs(22)).await;
    assert!(!pool.contains(&"a".into()), "removed once enabled");
}

/// A backend that comes back with its state after time out of the pool,
/// where nothing could probe it, is probed before it can be removed: that
/// time does not count.
#[tokio::test(start_paused = true)]
async fn a_backend_back_with_its_state_is_probed_before_removal() {
    use tower::discover::Change;
    let (pool, backends) = pool_of(&["a"]);
    let change = |change: Change<&'static str, Backend>| {
        pool.discover(futures::stream::iter([Ok::<_, BoxError>(change)]))
    };
    let script = Script::default();
    script.push("a", &[true, false]);
    let t0 = Instant::now();
    let _checker = every_second(pool.clone(), script.probe())
        .fall(1)
        .rise(1)
        .removed_after(secs(30))
        .spawn();
    at(t0 + secs(20)).await;
    change(Change::Remove("a")).await.unwrap();
    // Recovered while away.
    script.set("a", true);
    at(t0 + secs(40)).await;
    change(Change::Insert("a", backends[0].clone()))
        .await
        .unwrap();
    settle().await;
    assert!(pool.contains(&"a".into()), "not removed on its return");
    assert_eq!(
        pool.state(&"a".into()).unwrap().health(),
        HealthStatus::Healthy,
        "probed at once, and found healthy"
    );
}

#[tokio::test(start_paused = true)]
async fn durations_meaning_never_do_not_stop_the_checker() {
    let (pool, _) = pool_of(&["a", "b"]);
    let state = pool.state(&"a".into()).unwrap();
    let script = Script::default();
    script.push("a", &[true, false]);
    let t0 = Instant::now();
    let checker = every_second(pool.clone(), script.probe())
        .fall(1)
        .turned_off_after(Duration::MAX)
        .removed_after(Duration::MAX)
        .spawn();
    at(t0 + ms(1500)).await;
    assert_eq!(state.health(), HealthStatus::Unhealthy);
    // The checker still runs: a passing probe makes a healthy again.
    script.set("a", true);
    at(t0 + secs(60)).await;
    assert_eq!(state.health(), HealthStatus::Healthy);
    assert!(pool.contains(&"a".into()));
    assert!(!checker.is_finished(), "the checker task did not panic");
}

#[tokio::test(start_paused = true)]
async fn a_backend_never_seen_healthy_is_neither_turned_off_nor_removed() {
    let (pool, _) = pool_of(&["a"]);
    let state = pool.state(&"a".into()).unwrap();
    let script = Script::default();
    script.set("a", false);
    let t0 = Instant::now();
    let _checker = every_second(pool.clone(), script.probe())
        .fall(1)
        .turned_off_after(secs(2))
        .removed_after(secs(4))
        .spawn();
    at(t0 + secs(60)).await;
    assert_eq!(state.health(), HealthStatus::Unhealthy);
    assert!(pool.contains(&"a".into()));
    assert!(script.probes.load(Ordering::SeqCst) > 50, "still probed");
}

#[tokio::test(start_paused = true)]
async fn a_turned_off_backend_recovers_on_its_own() {
    let (pool, backends) = pool_of(&["a", "b"]);
    let state = pool.state(&"a".into()).unwrap();
    let balance = Balance::new(pool.clone(), RoundRobin::new()).panic_threshold(0.0);
    let script = Script::default();
    script.push("a", &[true, false]);
    let t0 = Instant::now();
    let _checker = every_second(pool.clone(), script.probe())
        .fall(1)
        .rise(2)
        .turned_off_after(secs(5))
        .spawn();
    at(t0 + secs(10)).await;
    assert_eq!(state.health(), HealthStatus::TurnedOff);
    for _ in 0..4 {
        balance.clone().oneshot(Request::new(())).await.unwrap();
    }
    assert_eq!(backends[0].calls(), 0);
    // The backend comes back: two passing probes (at 11 s and 12 s).
    script.set("a", true);
    at(t0 + secs(11) + ms(500)).await;
    assert_eq!(state.health(), HealthStatus::TurnedOff);
    at(t0 + secs(12) + ms(500)).await;
    assert_eq!(state.health(), HealthStatus::Healthy);
    for _ in 0..4 {
        balance.clone().oneshot(Request::new(())).await.unwrap();
    }
    assert_eq!(backends[0].calls(), 2);
}

// ---------------------------------------------------------------------------
// Slow start
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_new_and_recovered_backends() {
    let (pool, _) = pool_of(&["a"]);
    let script = Script::default();
    let _checker = every_second(pool.clone(), script.probe())
        .fall(1)
        .rise(1)
        .slow_start(SlowStart::new(secs(10)))
        .spawn();
    settle().await;
    let a = pool.state(&"a".into()).unwrap();
    assert_eq!(
        a.weight_permille(),
        1000,
        "backends present at start do not ramp"
    );

    // A new backend.
    tokio::time::advance(ms(300)).await;
    let t1 = Instant::now();
    pool.insert("b", Backend::new());
    settle().await;
    let b = pool.state(&"b".into()).unwrap();
    assert_eq!(b.weight_permille(), 100, "0 % of the window");
    at(t1 + secs(5)).await;
    assert_eq!(b.weight_permille(), 550, "50 % of the window");
    at(t1 + secs(10) - ms(1)).await;
    assert!(b.weight_permille() < 1000);
    at(t1 + secs(10)).await;
    assert_eq!(b.weight_permille(), 1000, "100 % of the window");

    // A recovered backend: down at the probe after 12 s, up at the next.
    script.push("a", &[false, true]);
    let next_probe = t1 - ms(300) + secs(11);
    at(next_probe).await;
    assert_eq!(a.health(), HealthStatus::Unhealthy);
    at(next_probe + secs(1)).await;
    assert_eq!(a.health(), HealthStatus::Healthy);
    assert_eq!(a.weight_permille(), 100);
    at(next_probe + secs(6)).await;
    assert_eq!(a.weight_permille(), 550);
    at(next_probe + secs(11)).await;
    assert_eq!(a.weight_permille(), 1000);
}

/// A checker probing every second (turning a backend unhealthy after
/// `fall` failures) with a slow start from 20 % over 10 s, and backend `b`,
/// which has just joined and starts its ramp.
async fn b_ramping(
    script: &Script,
    fall: u32,
) -> (Pool<Backend>, CheckerHandle, Arc<BackendState>) {
    let (pool, _) = pool_of(&["a"]);
    let checker = every_second(pool.clone(), script.probe())
        .fall(fall)
        .slow_start(SlowStart::new(secs(10)).min_weight(0.2))
        .spawn();
    settle().await;
    pool.insert("b", Backend::new());
    settle().await;
    let b = pool.state(&"b".into()).unwrap();
    (pool, checker, b)
}

#[tokio::test(start_paused = true)]
async fn a_ramp_cut_short_by_shutdown_ends_at_full_weight() {
    let (_pool, checker, b) = b_ramping(&Script::default(), 3).await;
    assert_eq!(b.weight_permille(), 200);
    checker.shutdown().await;
    assert_eq!(b.weight_permille(), 1000);
}

#[tokio::test(start_paused = true)]
async fn a_ramp_cut_short_by_failing_probes_ends_at_full_weight() {
    let script = Script::default();
    let t0 = Instant::now();
    let (_pool, checker, b) = b_ramping(&script, 1).await;
    at(t0 + ms(2500)).await;
    assert!(b.weight_permille() < 1000, "ramping");
    // The probe at 3 s fails: the ramp is over, and no weight is left
    // partial for when the checker stops (or someone else makes it
    // healthy).
    script.set("b", false);
    at(t0 + ms(3500)).await;
    assert_eq!(b.health(), HealthStatus::Unhealthy);
    assert_eq!(b.weight_permille(), 1000);
    drop(checker);
    settle().await;
    assert_eq!(b.weight_permille(), 1000);
}

#[tokio::test(start_paused = true)]
async fn a_backend_removed_while_it_ramps_keeps_no_partial_weight() {
    let (pool, _checker, b) = b_ramping(&Script::default(), 3).await;
    assert_eq!(b.weight_permille(), 200);
    // The state lives on: it may serve another pool, or come back.
    assert!(pool.remove(&"b".into()));
    settle().await;
    assert_eq!(b.weight_permille(), 1000);
}

/// A backend a discovery stream drops for one answer and brings back
/// within the pool's window comes back with its state: the checker takes up
/// where it left it, rather than starting it again as a new backend.
#[tokio::test(start_paused = true)]
async fn a_backend_that_leaves_and_comes_back_with_its_state_is_not_started_again() {
    use tower::discover::Change;
    let (pool, backends) = pool_of(&["a"]);
    let a = pool.state(&"a".into()).unwrap();
    let change = |change: Change<&'static str, Backend>| {
        pool.discover(futures::stream::iter([Ok::<_, BoxError>(change)]))
    };
    let t0 = Instant::now();
    let _checker = every_second(pool.clone(), Script::default().probe())
        .rise(2)
        .start_unhealthy(true)
        .slow_start(SlowStart::new(secs(10)))
        .spawn();
    at(t0 + ms(1500)).await;
    assert_eq!(a.health(), HealthStatus::Healthy, "two probes passed");
    change(Change::Remove("a")).await.unwrap();
    settle().await;
    change(Change::Insert("a", backends[0].clone()))
        .await
        .unwrap();
    settle().await;
    assert!(Arc::ptr_eq(&pool.state(&"a".into()).unwrap(), &a));
    assert_eq!(a.health(), HealthStatus::Healthy, "not unhealthy again");
    assert_eq!(a.weight_permille(), 1000, "no new ramp");

    // A new backend under the same id is one.
    assert!(pool.remove(&"a".into()));
    settle().await;
    pool.insert("a", Backend::new());
    settle().await;
    let fresh = pool.state(&"a".into()).unwrap();
    assert!(!Arc::ptr_eq(&fresh, &a));
    assert_eq!(fresh.health(), HealthStatus::Unhealthy, "started unhealthy");
}

// ---------------------------------------------------------------------------
// Panic routing
// ---------------------------------------------------------------------------

async fn served(balance: &Balance<Backend, RoundRobin>, n: usize) -> Vec<String> {
    let mut served = Vec::new();
    for _ in 0..n {
        let r = balance.clone().oneshot(Request::new(())).await.unwrap();
        served.push(r.extensions().get::<ServedBy>().unwrap().0.to_string());
    }
    served.sort();
    served.dedup();
    served
}

#[tokio::test(start_paused = true)]
async fn panic_routing_engages_below_the_threshold() {
    let (pool, _) = pool_of(&["a", "b", "c", "d"]);
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    let state = |id: &str| pool.state(&id.into()).unwrap();

    // 2 of 4 available: 50 % is not below 50 %.
    state("a").set_health(HealthStatus::Unhealthy);
    state("b").eject_until(Instant::now() + secs(60));
    assert_eq!(served(&balance, 8).await, ["c", "d"]);

    // 1 of 4 available: panic, every enabled backend serves.
    state("c").set_health(HealthStatus::Unhealthy);
    tokio::time::advance(ms(1)).await;
    assert_eq!(served(&balance, 8).await, ["a", "b", "c", "d"]);

    // The operator's status still holds in panic.
    state("d").set_admin(AdminStatus::Disabled);
    tokio::time::advance(ms(1)).await;
    assert_eq!(served(&balance, 8).await, ["a", "b", "c"]);
    state("d").set_admin(AdminStatus::Enabled);

    // Back above the threshold: only available backends again.
    state("a").set_health(HealthStatus::Healthy);
    tokio::time::advance(ms(1)).await;
    assert_eq!(served(&balance, 8).await, ["a", "d"]);

    // Threshold 0 disables panic routing; 1.0 panics unless all are up.
    state("a").set_health(HealthStatus::Unhealthy);
    let strict = balance.clone().panic_threshold(0.0);
    assert_eq!(served(&strict, 8).await, ["d"]);
    let eager = balance.panic_threshold(1.0);
    state("a").set_health(HealthStatus::Healthy);
    state("b").uneject();
    tokio::time::advance(ms(1)).await;
    assert_eq!(served(&eager, 8).await, ["a", "b", "c", "d"]);
}

/// Only zero turns panic routing off: a tiny threshold still panics when
/// no backend at all is available.
#[tokio::test(start_paused = true)]
async fn a_tiny_panic_threshold_is_not_off() {
    let (pool, _) = pool_of(&["a", "b", "c"]);
    for id in ["a", "b", "c"] {
        pool.state(&id.into())
            .unwrap()
            .set_health(HealthStatus::Unhealthy);
    }
    let balance = Balance::new(pool, RoundRobin::new()).panic_threshold(0.0004);
    assert_eq!(served(&balance, 6).await, ["a", "b", "c"]);
    let off = balance.panic_threshold(0.0);
    let err = off.oneshot(Request::new(())).await.unwrap_err();
    assert!(err.is::<tower_ha::NoBackend>(), "{err}");
}

#[tokio::test(start_paused = true)]
async fn panic_routing_follows_expiring_ejections() {
    let (pool, _) = pool_of(&["a", "b", "c", "d"]);
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    let state = |id: &str| pool.state(&id.into()).unwrap();
    state("d").set_health(HealthStatus::Unhealthy);
    for id in ["a", "b"] {
        state(id).eject_until(Instant::now() + secs(10));
    }
    // 1 of 4 available: panic, every enabled backend serves.
    assert_eq!(served(&balance, 8).await, ["a", "b", "c", "d"]);
    // The ejections end: 3 of 4 available, no panic, so the unhealthy
    // backend no longer serves.
    tokio::time::advance(secs(10)).await;
    assert_eq!(served(&balance, 8).await, ["a", "b", "c"]);
    // Another one unhealthy, 2 of 4 available: still no panic.
    state("a").set_health(HealthStatus::Unhealthy);
    tokio::time::advance(ms(1)).await;
    assert_eq!(served(&balance, 8).await, ["b", "c"]);
}

#[tokio::test(start_paused = true)]
async fn success_rate_ejection_catches_failures_that_never_come_in_a_row() {
    use tower_ha::health::SuccessRate;
    // No cap on ejections, so that nothing but its success rate keeps
    // `fine` in.
    let layer = HealthLayer::new()
        .max_ejection_percent(100)
        .success_rate(SuccessRate::new(0.9).min_requests(30).window(secs(10)));
    let (flaky, fine) = (Backend::new(), Backend::new());
    let (flaky_svc, fine_svc) = (layer.layer(flaky.clone()), layer.layer(fine.clone()));
    let (flaky_state, fine_state) = (
        Arc::new(BackendState::new(1)),
        Arc::new(BackendState::new(1)),
    );
    let t0 = Instant::now();
    // One failure in three for the flaky one, one in twenty for the other.
    for i in 0..=100 {
        flaky.set(if i % 3 == 0 {
            StatusCode::BAD_GATEWAY
        } else {
            StatusCode::OK
        });
        fine.set(if i % 20 == 0 {
            StatusCode::BAD_GATEWAY
        } else {
            StatusCode::OK
        });
        // The first window is judged by the first outcome at 10 s or later.
        assert_eq!(Instant::now(), t0 + ms(100 * i));
        assert!(!flaky_state.is_ejected(), "ejected before the window ended");
        send(&flaky_svc, "flaky", &flaky_state).await;
        send(&fine_svc, "fine", &fine_state).await;
        tokio::time::advance(ms(100)).await;
    }
    // Judged at 10 s with 67 % success.
    assert!(flaky_state.is_ejected());
    assert_eq!(flaky_state.consecutive_failures(), 0);
    assert!(!fine_state.is_ejected());
    assert_eq!(fine_state.ejections(), 0);

    // Too few requests in a window to judge: no ejection. Only failures,
    // but never enough in a row to eject for that.
    let layer = HealthLayer::new()
        .consecutive_failures(1_000)
        .max_ejection_percent(100)
        .success_rate(SuccessRate::new(0.9).min_requests(30).window(secs(10)));
    let failing = Backend::new();
    failing.set(StatusCode::BAD_GATEWAY);
    let (few, enough) = (layer.layer(failing.clone()), layer.layer(failing.clone()));
    let (few_state, enough_state) = (
        Arc::new(BackendState::new(1)),
        Arc::new(BackendState::new(1)),
    );
    // 29 and 30 requests in the first window, counting the one after it
    // that closes it.
    for _ in 0..28 {
        send(&few, "few", &few_state).await;
        send(&enough, "enough", &enough_state).await;
        tokio::time::advance(ms(100)).await;
    }
    send(&enough, "enough", &enough_state).await;
    tokio::time::advance(secs(10)).await;
    send(&few, "few", &few_state).await;
    send(&enough, "enough", &enough_state).await;
    assert!(!few_state.is_ejected());
    assert_eq!(few_state.ejections(), 0);
    assert!(enough_state.is_ejected());
}

#[tokio::test(start_paused = true)]
async fn success_rate_judges_only_recent_outcomes() {
    use tower_ha::health::SuccessRate;
    let rate = SuccessRate::new(0.9).min_requests(20).window(secs(10));

    // Half of 20 requests fail, never two in a row; then the backend takes
    // no request for ten minutes (drained, or unhealthy by its probes) and
    // comes back fixed. Its first success does not close the old window:
    // those outcomes are ten minutes old.
    let layer = HealthLayer::new()
        .consecutive_failures(1_000)
        .max_ejection_percent(100)
        .success_rate(rate);
    let backend = Backend::new();
    let svc = layer.layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    for i in 0..20 {
        backend.set(if i % 2 == 0 {
            StatusCode::BAD_GATEWAY
        } else {
            StatusCode::OK
        });
        send(&svc, "a", &state).await;
        tokio::time::advance(ms(50)).await;
    }
    tokio::time::advance(secs(600)).await;
    backend.set(StatusCode::OK);
    send(&svc, "a", &state).await;
    assert!(!state.is_ejected());
    assert_eq!(state.ejections(), 0);
    // Its new window counts from that request on: 19 failures of the next
    // 20 outcomes are judged when it ends.
    backend.set(StatusCode::BAD_GATEWAY);
    for _ in 0..19 {
        send(&svc, "a", &state).await;
        tokio::time::advance(ms(100)).await;
    }
    tokio::time::advance(secs(10)).await;
    backend.set(StatusCode::OK);
    send(&svc, "a", &state).await;
    assert!(state.is_ejected());
    assert_eq!(state.ejections(), 1);

    // An ejection for failures in a row starts a new window: when it ends
    // (30 s, within two windows of 20 s), the same failures do not eject
    // the backend a second time.
    let layer = HealthLayer::new()
        .consecutive_failures(5)
        .max_ejection_percent(100)
        .success_rate(rate.window(secs(20)));
    let backend = Backend::new();
    let svc = layer.layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    for i in 0..20 {
        backend.set(if i < 15 {
            StatusCode::OK
        } else {
            StatusCode::BAD_GATEWAY
        });
        send(&svc, "a", &state).await;
    }
    assert!(state.is_ejected());
    assert_eq!(state.ejections(), 1);
    // The ejection (30 s) ends; the first request after it succeeds.
    tokio::time::advance(secs(30)).await;
    assert!(!state.is_ejected());
    backend.set(StatusCode::OK);
    send(&svc, "a", &state).await;
    assert!(!state.is_ejected());
    assert_eq!(state.ejections(), 1);

    // Outcomes that end while the backend is ejected (requests in flight
    // at the ejection, or sent by panic routing) are not in the new
    // window either: the first outcome after the ejection (30 s, within
    // two windows of 20 s) does not judge them.
    let layer = HealthLayer::new()
        .consecutive_failures(1_000)
        .max_ejection_percent(100)
        .success_rate(rate.window(secs(20)));
    let backend = Backend::new();
    let svc = layer.layer(backend.clone());
    let state = Arc::new(BackendState::new(1));
    backend.set(StatusCode::BAD_GATEWAY);
    for _ in 0..20 {
        send(&svc, "a", &state).await;
        tokio::time::advance(ms(100)).await;
    }
    tokio::time::advance(secs(20)).await;
    send(&svc, "a", &state).await;
    assert!(state.is_ejected());
    for _ in 0..20 {
        send(&svc, "a", &state).await;
        tokio::time::advance(ms(100)).await;
    }
    tokio::time::advance(secs(28)).await;
    assert!(!state.is_ejected());
    backend.set(StatusCode::OK);
    send(&svc, "a", &state).await;
    assert!(!state.is_ejected());
    assert_eq!(state.ejections(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_panicked_probe_of_a_replaced_backend_does_not_count_against_the_new_one() {
    let pool = Pool::new();
    pool.insert("a", 0u8);
    // The first backend's probe panics half a second in; the new one's pass.
    let probe = probe_fn(|_id: &BackendId, generation: &u8| {
        let old = *generation == 0;
        async move {
            if old {
                tokio::time::sleep(ms(500)).await;
                panic!("the probe of the replaced backend");
            }
            Ok::<(), BoxError>(())
        }
    });
    let t0 = Instant::now();
    let checker = HealthChecker::new(pool.clone(), probe)
        .interval(secs(2))
        .timeout(secs(1))
        .jitter(Duration::ZERO)
        .fall(1)
        .spawn();
    at(t0 + ms(100)).await;
    let fresh = Arc::new(BackendState::new(1));
    pool.insert_with_state("a", 1u8, fresh.clone());
    at(t0 + ms(600)).await;
    // With `fall(1)`, the panic counted against it would have made it
    // unhealthy.
    assert_eq!(fresh.health(), HealthStatus::Healthy);
    assert!(!checker.is_finished());
}

/// A backend given another service (a discovery's insert of a backend it
/// lists already, say) keeps its state: the probe of its old service, which
/// would fail after the change, is stopped and not counted against it, and
/// the new service is probed at once.
#[tokio::test(start_paused = true)]
async fn a_probe_of_a_replaced_service_does_not_count_against_the_new_one() {
    let pool = Pool::new();
    pool.insert("a", 0u8);
    let state = pool.state(&"a".into()).unwrap();
    let new_probes = Arc::new(AtomicUsize::new(0));
    let counted = new_probes.clone();
    let probe = probe_fn(move |_id: &BackendId, service: &u8| {
        let old = *service == 0;
        if !old {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        async move {
            if old {
                tokio::time::sleep(ms(500)).await;
                return Err::<(), BoxError>("the old service is gone".into());
            }
            Ok(())
        }
    });
    let t0 = Instant::now();
    let _checker = HealthChecker::new(pool.clone(), probe)
        .interval(secs(2))
        .timeout(secs(1))
        .jitter(Duration::ZERO)
        .fall(1)
        .spawn();
    at(t0 + ms(100)).await;
    pool.insert("a", 1u8);
    at(t0 + ms(110)).await;
    assert_eq!(
        new_probes.load(Ordering::SeqCst),
        1,
        "the new service waits"
    );
    at(t0 + ms(600)).await;
    // With `fall(1)`, the old service's failure counted against it would
    // have made it unhealthy.
    assert_eq!(state.health(), HealthStatus::Healthy);
    assert!(Arc::ptr_eq(&state, &pool.state(&"a".into()).unwrap()));
}

#[tokio::test(start_paused = true)]
async fn a_probe_started_before_a_backend_left_does_not_count_once_it_is_back() {
    let pool = Pool::new();
    pool.insert("a", 0u8);
    let state = pool.state(&"a".into()).unwrap();
    // The probe of the first membership fails after 500 ms; once the
    // backend is back, its probe takes 1 s and passes.
    let probes = Arc::new(AtomicUsize::new(0));
    let counted = probes.clone();
    let probe = probe_fn(move |_id: &BackendId, generation: &u8| {
        counted.fetch_add(1, Ordering::SeqCst);
        let old = *generation == 0;
        async move {
            if old {
                tokio::time::sleep(ms(500)).await;
                Err::<(), BoxError>("the probe of the first membership".into())
            } else {
                tokio::time::sleep(secs(1)).await;
                Ok(())
            }
        }
    });
    let t0 = Instant::now();
    let _checker = HealthChecker::new(pool.clone(), probe)
        .interval(ms(200))
        .timeout(secs(2))
        .jitter(Duration::ZERO)
        .fall(1)
        .spawn();
    at(t0 + ms(100)).await;
    assert_eq!(probes.load(Ordering::SeqCst), 1);
    // Removed, then back with the same state: a new probe starts.
    assert!(pool.remove(&"a".into()));
    settle().await;
    pool.insert_with_state("a", 1u8, state.clone());
    at(t0 + ms(200)).await;
    assert_eq!(probes.load(Ordering::SeqCst), 2);
    // The first probe fails at 500 ms: not this membership's result, and
    // no end of the probe in flight (which would let another start).
    at(t0 + ms(1000)).await;
    assert_eq!(state.health(), HealthStatus::Healthy);
    assert_eq!(probes.load(Ordering::SeqCst), 2, "two probes at once");
    // The probe in flight passes at 1.1 s; the next starts then.
    at(t0 + ms(1100)).await;
    assert_eq!(probes.load(Ordering::SeqCst), 3);
    assert_eq!(state.health(), HealthStatus::Healthy);
}

#[tokio::test(start_paused = true)]
async fn the_probe_of_a_backend_that_leaves_is_stopped_at_once() {
    let pool = Pool::new();
    pool.insert("a", ());
    pool.insert("b", ());
    // Each probe holds a clone of `held` while it runs; a's never ends.
    let held = Arc::new(());
    let probes_of_b = Arc::new(AtomicUsize::new(0));
    let probe = probe_fn({
        let (held, probes_of_b) = (held.clone(), probes_of_b.clone());
        move |id: &BackendId, _svc: &()| {
            let (held, hangs) = (held.clone(), id.as_str() == "a");
            if !hangs {
                probes_of_b.fetch_add(1, Ordering::SeqCst);
            }
            async move {
                let _held = held;
                if hangs {
                    std::future::pending::<()>().await;
                }
                Ok::<(), BoxError>(())
            }
        }
    });
    let _checker = HealthChecker::new(pool.clone(), probe)
        .interval(secs(1))
        .timeout(secs(3600))
        .jitter(Duration::ZERO)
        .spawn();
    settle().await;
    assert_eq!(Arc::strong_count(&held), 3, "the checker's probe and a's");
    // Removed: what its probe holds (a service clone, a connection) is let
    // go now, not an hour later at the probe's timeout.
    assert!(pool.remove(&"a".into()));
    settle().await;
    assert_eq!(Arc::strong_count(&held), 2, "only the checker's probe");
    // The checker goes on probing the others.
    let before = probes_of_b.load(Ordering::SeqCst);
    for _ in 0..5 {
        tokio::time::advance(secs(1)).await;
        settle().await;
    }
    assert!(probes_of_b.load(Ordering::SeqCst) >= before + 4);
}

#[tokio::test(start_paused = true)]
async fn a_zero_probe_timeout_still_lets_a_probe_answer() {
    let pool = Pool::new();
    pool.insert("a", ());
    let state = pool.state(&"a".into()).unwrap();
    // Answers after yielding once: not at the first poll. Counts the
    // probes that got to answer.
    let answered = Arc::new(AtomicUsize::new(0));
    let probe = probe_fn({
        let answered = answered.clone();
        move |_id: &BackendId, _: &()| {
            let answered = answered.clone();
            async move {
                tokio::task::yield_now().await;
                answered.fetch_add(1, Ordering::SeqCst);
                Ok::<(), BoxError>(())
            }
        }
    });
    let t0 = Instant::now();
    // Unhealthy until a probe passes; one that fails makes it unhealthy
    // again.
    let _checker = HealthChecker::new(pool.clone(), probe)
        .interval(secs(1))
        .timeout(Duration::ZERO)
        .jitter(Duration::ZERO)
        .start_unhealthy(true)
        .rise(1)
        .fall(1)
        .spawn();
    at(t0 + secs(3) + ms(500)).await;
    // Probes at 0, 1, 2 and 3 s: each answered.
    assert_eq!(answered.load(Ordering::SeqCst), 4);
    assert_eq!(state.health(), HealthStatus::Healthy);
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_cannot_get_a_health_service_ready_is_a_passive_failure() {
    use tower_ha::health::HttpProbe;
    let down = Arc::new(AtomicBool::new(false));
    let pool = Pool::new();
    pool.insert("a", HealthLayer::new().layer(Unready(down.clone())));
    let state = pool.state(&"a".into()).unwrap();
    // One request with a `Target` tells the layer which backend it wraps.
    let svc = pool.snapshot().service(0).unwrap().clone();
    send(&svc, "a", &state).await;
    down.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let _checker = every_second(pool.clone(), HttpProbe::<()>::new("/healthz")).spawn();
    at(t0 + ms(500)).await;
    assert_eq!(state.consecutive_failures(), 1);
    // A probe's response, on the other hand, is not observed.
    down.store(false, Ordering::SeqCst);
    at(t0 + secs(1) + ms(500)).await;
    assert_eq!(state.consecutive_failures(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_panics_when_called_fails_its_backend_and_checks_go_on() {
    use std::sync::atomic::AtomicUsize;
    let pool = Pool::new();
    pool.insert("known", ());
    // A probe whose address book does not have a backend added later: it
    // panics when called, before it returns a future.
    let probes = Arc::new(AtomicUsize::new(0));
    let counted = probes.clone();
    let probe = probe_fn(move |id: &BackendId, _: &()| {
        assert_eq!(id.as_str(), "known", "no address for {id}");
        counted.fetch_add(1, Ordering::Relaxed);
        async { Ok::<(), BoxError>(()) }
    });
    let t0 = Instant::now();
    let checker = every_second(pool.clone(), probe).fall(1).spawn();
    at(t0 + ms(100)).await;
    assert_eq!(probes.load(Ordering::Relaxed), 1);
    pool.insert("added", ());
    let added = pool.state(&"added".into()).unwrap();
    at(t0 + ms(200)).await;
    assert_eq!(added.health(), HealthStatus::Unhealthy);
    // The checker still runs: the other backend is probed every second,
    // and the failing one again.
    at(t0 + ms(3100)).await;
    assert!(!checker.is_finished());
    assert_eq!(probes.load(Ordering::Relaxed), 4);
    assert_eq!(added.health(), HealthStatus::Unhealthy);
    assert_eq!(
        pool.state(&"known".into()).unwrap().health(),
        HealthStatus::Healthy
    );
}

/// A classifier that is neither `Clone` nor `Debug`.
struct Opaque;

impl tower_ha::classify::Classifier for Opaque {
    fn is_failure(&self, _outcome: &Outcome<'_>) -> bool {
        false
    }
}

#[test]
fn a_layer_clones_and_prints_whatever_its_classifier() {
    let layer = HealthLayer::new().classifier(Opaque);
    let copy = layer.clone();
    assert!(format!("{copy:?}").starts_with("HealthLayer"));
}
