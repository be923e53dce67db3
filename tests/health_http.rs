//! Health end to end, against real hyper servers on 127.0.0.1.

mod support;

use std::ops::RangeInclusive;
use std::time::Duration;

use http::header::{HeaderValue, AUTHORIZATION};
use http::{Request, StatusCode};
use tower::ServiceExt;
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::control::{Event, Events};
use tower_ha::extensions::ServedBy;
use tower_ha::health::{
    ExpectedStatusesError, HealthChecker, HttpProbe, Probe, TcpProbe, UnexpectedStatus,
};
use tower_ha::{BoxError, HealthStatus, Pool};

use support::health_http::{eventually, HttpBackend, ReqBody, TestServer};
use support::wait::bounded_real;

type Lb = Balance<HttpBackend, RoundRobin>;

/// Sends `n` requests; returns how many each backend ("a", "b") served.
async fn spread(balance: &Lb, n: usize) -> (usize, usize) {
    let (mut a, mut b) = (0, 0);
    for _ in 0..n {
        let response = balance
            .clone()
            .oneshot(Request::new(ReqBody::default()))
            .await
            .expect("a healthy backend answers");
        assert_eq!(response.status(), StatusCode::OK);
        match response.extensions().get::<ServedBy>().unwrap().0.as_str() {
            "a" => a += 1,
            _ => b += 1,
        }
    }
    (a, b)
}

async fn two_backends() -> (TestServer, TestServer, Pool<HttpBackend>, Lb) {
    let (a, b) = (TestServer::start().await, TestServer::start().await);
    let pool = Pool::new();
    pool.insert("a", HttpBackend::new(a.addr()));
    pool.insert("b", HttpBackend::new(b.addr()));
    let balance = Balance::new(pool.clone(), RoundRobin::new()).panic_threshold(0.0);
    (a, b, pool, balance)
}

/// Over real HTTP: a backend leaves no sooner than `fall` failed probes
/// and returns no sooner than `rise` passed ones (both set off their
/// defaults, so that a setting ignored shows).
#[tokio::test]
async fn a_backend_whose_healthz_fails_leaves_after_fall_probes_and_returns_after_rise() {
    let (a, _b, pool, balance) = two_backends().await;
    let state = pool.state(&"a".into()).unwrap();
    let _checker = HealthChecker::new(pool.clone(), HttpProbe::new("/healthz"))
        .interval(Duration::from_millis(50))
        .jitter(Duration::ZERO)
        .fall(4)
        .rise(3)
        .spawn();
    eventually("a first probe passes", || a.probes_ok() >= 1).await;
    assert_eq!(spread(&balance, 10).await, (5, 5));

    a.set_healthz(500);
    eventually("a is marked unhealthy", || {
        state.health() == HealthStatus::Unhealthy
    })
    .await;
    // Not before `fall` failed probes (the default would be 3); the exact
    // counts are checked on paused time in `tests/health.rs`.
    assert!(
        a.probes_failed() >= 4,
        "unhealthy after {} failed probes",
        a.probes_failed()
    );
    let hits = a.hits();
    assert_eq!(spread(&balance, 20).await, (0, 20));
    assert_eq!(a.hits(), hits, "no request reached the unhealthy backend");

    let passed_before = a.probes_ok();
    a.set_healthz(200);
    eventually("a is healthy again", || {
        state.health() == HealthStatus::Healthy
    })
    .await;
    // Not before `rise` passed probes (the default would be 2).
    assert!(a.probes_ok() - passed_before >= 3);
    assert_eq!(spread(&balance, 10).await, (5, 5));
}

#[tokio::test]
async fn a_backend_whose_listener_is_shut_down_is_marked_unhealthy() {
    let (a, b, pool, balance) = two_backends().await;
    let state = pool.state(&"a".into()).unwrap();
    let _checker = HealthChecker::new(pool.clone(), HttpProbe::new("/healthz"))
        .interval(Duration::from_millis(50))
        .jitter(Duration::ZERO)
        .fall(2)
        .spawn();
    eventually("a first probe passes", || a.probes_ok() >= 1).await;
    a.shutdown().await;
    eventually("a is marked unhealthy", || {
        state.health() == HealthStatus::Unhealthy
    })
    .await;
    let served_by_b = b.hits();
    assert_eq!(spread(&balance, 10).await, (0, 10));
    assert_eq!(b.hits(), served_by_b + 10);
}

#[tokio::test]
async fn a_tcp_probe_marks_a_closed_listener_unhealthy() {
    let (a, b, pool, _balance) = two_backends().await;
    let probe = TcpProbe::from_map([("a", a.addr()), ("b", b.addr())]);
    let (sa, sb) = (
        pool.state(&"a".into()).unwrap(),
        pool.state(&"b".into()).unwrap(),
    );
    let events = Events::default();
    let _checker = HealthChecker::new(pool.clone(), probe)
        .interval(Duration::from_millis(50))
        .jitter(Duration::ZERO)
        .fall(2)
        .start_unhealthy(true)
        .events(events.clone())
        .spawn();
    // Each starts unhealthy and is made healthy by passing probes,
    // whenever those come (the states start healthy, before the checker
    // runs: its events tell the order).
    eventually("both pass their first probes", || {
        !health_changes(&events, "a").is_empty() && !health_changes(&events, "b").is_empty()
    })
    .await;
    for id in ["a", "b"] {
        let changes = health_changes(&events, id);
        assert_eq!(
            changes,
            [(HealthStatus::Unhealthy, HealthStatus::Healthy)],
            "{id}"
        );
    }
    assert_eq!(
        (sa.health(), sb.health()),
        (HealthStatus::Healthy, HealthStatus::Healthy)
    );
    a.shutdown().await;
    eventually("a is marked unhealthy", || {
        sa.health() == HealthStatus::Unhealthy
    })
    .await;
    assert_eq!(sb.health(), HealthStatus::Healthy);
}

/// The health changes recorded for backend `id`, oldest first.
fn health_changes(events: &Events, id: &str) -> Vec<(HealthStatus, HealthStatus)> {
    events
        .history()
        .iter()
        .filter_map(|record| match &record.event {
            Event::HealthChanged {
                backend, from, to, ..
            } if backend.as_str() == id => Some((*from, *to)),
            _ => None,
        })
        .collect()
}

/// Probes `server` once with `probe` through a real client.
async fn probe_once(probe: &HttpProbe<ReqBody>, server: &TestServer) -> Result<(), BoxError> {
    let backend = HttpBackend::new(server.addr());
    bounded_real("the probe answers", probe.probe(&"a".into(), &backend)).await
}

/// The status a failed probe saw.
fn unexpected(result: Result<(), BoxError>) -> StatusCode {
    let err = result.expect_err("the probe fails");
    err.downcast_ref::<UnexpectedStatus>()
        .unwrap_or_else(|| panic!("not an unexpected status: {err}"))
        .status()
}

/// An empty list of expected statuses, or a range that holds no HTTP
/// status, is a configuration mistake: alone, every probe would fail.
#[test]
fn expected_statuses_that_no_status_meets_are_refused() {
    let refused = |f: fn() -> HttpProbe<ReqBody>| std::panic::catch_unwind(f).is_err();
    fn backwards() -> RangeInclusive<u16> {
        RangeInclusive::new(299, 200)
    }
    assert!(refused(|| HttpProbe::new("/h").expected_statuses([])));
    assert!(refused(
        || HttpProbe::new("/h").expected_statuses([backwards()])
    ));
    assert!(refused(
        || HttpProbe::new("/h").expected_statuses([200..=200, backwards()])
    ));
    assert!(refused(|| HttpProbe::new("/h").expected_statuses([0..=99])));
    assert!(refused(
        || HttpProbe::new("/h").expected_statuses([1000..=1099])
    ));
    assert!(!refused(
        || HttpProbe::new("/h").expected_statuses([200..=200])
    ));
    assert!(!refused(
        || HttpProbe::new("/h").expected_statuses([0..=100])
    ));
}

/// `try_expected_statuses` refuses what `expected_statuses` panics on, as
/// an error that names the mistake, and takes the rest.
#[test]
fn try_expected_statuses_reports_what_expected_statuses_refuses() {
    let tried = |statuses: Vec<RangeInclusive<u16>>| {
        HttpProbe::<ReqBody>::new("/h").try_expected_statuses(statuses)
    };
    let err = tried(vec![]).unwrap_err();
    assert_eq!(err, ExpectedStatusesError::Empty);
    assert_eq!(
        err.to_string(),
        "an HttpProbe needs at least one expected status"
    );
    let backwards = RangeInclusive::new(299, 200);
    for (statuses, range) in [
        (vec![backwards.clone()], backwards.clone()),
        (vec![200..=200, backwards.clone()], backwards),
        (vec![0..=99], 0..=99),
        (vec![1000..=1099], 1000..=1099),
        (vec![200..=299, 1000..=1099, 0..=99], 1000..=1099),
    ] {
        let err = tried(statuses).unwrap_err();
        assert_eq!(err, ExpectedStatusesError::NoStatus(range.clone()));
        assert!(err.to_string().ends_with(&format!("{range:?}")), "{err}");
    }

    let probe = tried(vec![200..=200, 401..=401]).unwrap();
    assert!(probe.is_expected(StatusCode::OK));
    assert!(probe.is_expected(StatusCode::UNAUTHORIZED));
    assert!(!probe.is_expected(StatusCode::NO_CONTENT));
    let probe = tried(vec![0..=100, 999..=1000]).unwrap();
    assert!(probe.is_expected(StatusCode::CONTINUE));
    assert!(!probe.is_expected(StatusCode::OK));
}

#[tokio::test]
async fn an_http_probe_passes_on_the_statuses_it_expects() {
    let server = TestServer::start().await;
    let default = HttpProbe::<ReqBody>::new("/healthz");
    let only_200 = HttpProbe::<ReqBody>::new("/healthz").expected_statuses([200..=200]);
    let also_401 = HttpProbe::<ReqBody>::new("/healthz").expected_statuses([200..=299, 401..=401]);

    // Any 2xx by default; only what is listed otherwise.
    server.set_healthz(204);
    probe_once(&default, &server).await.unwrap();
    assert_eq!(unexpected(probe_once(&only_200, &server).await), 204);
    probe_once(&also_401, &server).await.unwrap();

    server.set_healthz(401);
    assert_eq!(unexpected(probe_once(&default, &server).await), 401);
    probe_once(&also_401, &server).await.unwrap();
    server.set_healthz(503);
    assert_eq!(unexpected(probe_once(&also_401, &server).await), 503);
    assert_eq!(server.probes_ok() + server.probes_failed(), 6);

    // `is_expected` says the same without a request.
    for (status, by_default, by_200, by_also_401) in [
        (200, true, true, true),
        (204, true, false, true),
        (299, true, false, true),
        (199, false, false, false),
        (300, false, false, false),
        (401, false, false, true),
        (503, false, false, false),
    ] {
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(default.is_expected(status), by_default, "{status}");
        assert_eq!(only_200.is_expected(status), by_200, "{status}");
        assert_eq!(also_401.is_expected(status), by_also_401, "{status}");
    }
}

#[tokio::test]
async fn an_http_probe_sends_its_headers() {
    let server = TestServer::start().await;
    let token = HeaderValue::from_static("Bearer probe-token");
    server.require_header(AUTHORIZATION, token.clone());
    let bare = HttpProbe::<ReqBody>::new("/healthz");
    assert_eq!(unexpected(probe_once(&bare, &server).await), 401);
    let wrong = HttpProbe::<ReqBody>::new("/healthz")
        .header(AUTHORIZATION, HeaderValue::from_static("Bearer other"));
    assert_eq!(unexpected(probe_once(&wrong, &server).await), 401);
    let with_token = HttpProbe::<ReqBody>::new("/healthz").header(AUTHORIZATION, token);
    probe_once(&with_token, &server).await.unwrap();
    assert_eq!(server.probes_ok(), 1);

    // And through the checker: the backend passes its probes.
    let pool = Pool::new();
    pool.insert("a", HttpBackend::new(server.addr()));
    let state = pool.state(&"a".into()).unwrap();
    let events = Events::default();
    let _checker = HealthChecker::new(pool.clone(), with_token)
        .interval(Duration::from_millis(50))
        .jitter(Duration::ZERO)
        .rise(2)
        .start_unhealthy(true)
        .events(events.clone())
        .spawn();
    eventually("a passes its probes", || {
        !health_changes(&events, "a").is_empty()
    })
    .await;
    assert_eq!(
        health_changes(&events, "a"),
        [(HealthStatus::Unhealthy, HealthStatus::Healthy)]
    );
    assert_eq!(state.health(), HealthStatus::Healthy);
    assert!(server.probes_ok() >= 3, "{}", server.probes_ok());
    assert_eq!(
        server.probes_failed(),
        2,
        "only the probes without the token"
    );
}
