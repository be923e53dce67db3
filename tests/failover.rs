//! Failover semantics with mock backends and paused time.

use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use proptest::prelude::*;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::classify::Classifier;
use tower_ha::error::find;
use tower_ha::extensions::{Attempts, GaveUp, Picked, ServedBy};
use tower_ha::failover::{
    Backoff, BufferBodyLayer, DeadlineExceeded, Exhausted, FailedStatus, FailoverLayer,
    FailoverStats, ReplayBody, RetryBudget, RetryNonIdempotent, TimedOut,
};
use tower_ha::{AdminStatus, BackendId, BoxError, NoBackend, NotSent, Pool};
use tower_test::mock;

mod support;
use support::deferred::Deferred;
use support::gate::Gated;
use support::http::BoxBody;
use support::wait::bounded;

type Mock = mock::Mock<Request<()>, Response<()>>;
type Handle = mock::Handle<Request<()>, Response<()>>;

fn ids(list: &[BackendId]) -> Vec<&str> {
    list.iter().map(BackendId::as_str).collect()
}

fn history<B>(response: &Response<B>) -> Vec<String> {
    let attempts = response
        .extensions()
        .get::<Attempts>()
        .expect("response carries the attempt history");
    attempts
        .as_slice()
        .iter()
        .map(|id| id.to_string())
        .collect()
}

fn served_by<B>(response: &Response<B>) -> &str {
    response
        .extensions()
        .get::<ServedBy>()
        .expect("ServedBy")
        .0
        .as_str()
}

fn exhausted(err: &BoxError) -> &Exhausted {
    err.downcast_ref::<Exhausted>()
        .unwrap_or_else(|| panic!("expected Exhausted, got {err}"))
}

/// The backends an `Exhausted` error lists, in order.
fn tried_before(err: &BoxError) -> Vec<String> {
    exhausted(err).backends().map(ToString::to_string).collect()
}

fn mock_fleet(names: &[&str]) -> (Pool<Mock>, Vec<Handle>) {
    let pool = Pool::new();
    let mut handles = Vec::new();
    for name in names {
        let (service, handle) = mock::pair();
        pool.insert(*name, service);
        handles.push(handle);
    }
    (pool, handles)
}

/// The next request `handle` receives, and its reply slot; fails (rather
/// than hangs) when none comes.
async fn next(handle: &mut Handle, what: &str) -> (Request<()>, mock::SendResponse<Response<()>>) {
    bounded(what, handle.next_request())
        .await
        .unwrap_or_else(|| panic!("{what}: the service is gone"))
}

fn status(code: u16) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::from_u16(code).unwrap();
    response
}

// ---------------------------------------------------------------------------
// Timing, with tower_test::mock and paused time.

#[tokio::test(start_paused = true)]
async fn per_try_timeout_moves_on_at_the_configured_instant() {
    let (pool, mut handles) = mock_fleet(&["a", "b"]);
    let layer = FailoverLayer::new().per_try_timeout(Duration::from_millis(100));
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(Balance::new(pool.clone(), RoundRobin::new()));

    let start = Instant::now();
    let call = tokio::spawn(service.oneshot(Request::new(())));

    let (_, a_reply) = next(&mut handles[0], "a is tried first").await;
    assert_eq!(Instant::now(), start);
    assert_eq!(pool.state(&"a".into()).unwrap().in_flight(), 1);

    let (to_b, b_reply) = next(&mut handles[1], "then b").await;
    assert_eq!(Instant::now() - start, Duration::from_millis(100));
    // The attempt on a was dropped: a holds no request any more, and b was
    // told not to come back to a.
    assert_eq!(pool.state(&"a".into()).unwrap().in_flight(), 0);
    assert_eq!(
        ids(to_b.extensions().get::<Attempts>().unwrap().as_slice()),
        ["a"]
    );

    tokio::time::advance(Duration::from_millis(30)).await;
    b_reply.send_response(status(200));
    a_reply.send_response(status(200)); // too late: nobody listens
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(served_by(&response), "b");
    assert_eq!(history(&response), ["a", "b"]);
    assert!(response.extensions().get::<GaveUp>().is_none(), "a success");
    assert_eq!(Instant::now() - start, Duration::from_millis(130));
    let stats = layer.stats();
    assert_eq!(stats.per_try_timeouts, 1);
    assert_eq!((stats.retries, stats.recovered, stats.exhausted), (1, 1, 0));
}

/// A zero per-try timeout or deadline is none: the slow backend answers,
/// and no attempt is abandoned.
#[tokio::test(start_paused = true)]
async fn a_zero_timeout_or_deadline_is_none() {
    let (pool, mut handles) = mock_fleet(&["a", "b"]);
    let service = ServiceBuilder::new()
        .layer(
            FailoverLayer::new()
                .per_try_timeout(Duration::ZERO)
                .deadline(Duration::ZERO),
        )
        .service(Balance::new(pool, RoundRobin::new()));
    let call = tokio::spawn(service.oneshot(Request::new(())));
    let (_, a_reply) = next(&mut handles[0], "a is tried first").await;
    tokio::time::advance(Duration::from_secs(3600)).await;
    a_reply.send_response(status(200));
    let response = call.await.unwrap().unwrap();
    assert_eq!(served_by(&response), "a");
}

#[tokio::test(start_paused = true)]
async fn a_request_that_carries_a_pick_slot_of_its_own_is_timed_on_every_retry() {
    let (pool, mut handles) = mock_fleet(&["a", "b", "c"]);
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().per_try_timeout(Duration::from_millis(100)))
        .service(Balance::new(pool, RoundRobin::new()));
    // A slot of another's (a layer above without timers, say).
    let request = Request::builder()
        .extension(Picked::new())
        .body(())
        .unwrap();
    let start = Instant::now();
    let call = tokio::spawn(service.oneshot(request));

    let (_, a_reply) = next(&mut handles[0], "a first").await;
    a_reply.send_error(io::Error::from(io::ErrorKind::ConnectionReset));
    let (_, _b_hangs) = next(&mut handles[1], "then b").await;
    // b is abandoned at its own per-try timeout and c is tried.
    let (_, c_reply) = next(&mut handles[2], "then c").await;
    assert_eq!(Instant::now() - start, Duration::from_millis(100));
    c_reply.send_response(status(200));
    let response = call.await.unwrap().unwrap();
    assert_eq!(served_by(&response), "c");
    assert_eq!(history(&response), ["a", "b", "c"]);
}

#[tokio::test(start_paused = true)]
async fn a_late_picked_attempt_abandoned_at_its_timeout_is_not_tried_again() {
    let (pool, mut handles) = mock_fleet(&["a", "b", "c"]);
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().per_try_timeout(Duration::from_millis(100)))
        .service(Deferred(Balance::new(pool, RoundRobin::new())));
    let call = tokio::spawn(service.oneshot(Request::new(())));

    let (_, a_reply) = next(&mut handles[0], "a first").await;
    a_reply.send_error(io::Error::from(io::ErrorKind::ConnectionReset));
    // b never answers: abandoned at the per-try timeout.
    let (to_b, _b_reply) = next(&mut handles[1], "then b").await;
    assert_eq!(
        ids(to_b.extensions().get::<Attempts>().unwrap().as_slice()),
        ["a"]
    );
    let (to_c, c_reply) = next(&mut handles[2], "then c").await;
    assert_eq!(
        ids(to_c.extensions().get::<Attempts>().unwrap().as_slice()),
        ["a", "b"]
    );
    c_reply.send_response(status(200));
    let response = call.await.unwrap().unwrap();
    assert_eq!(served_by(&response), "c");
    assert_eq!(history(&response), ["a", "b", "c"]);
    assert!(
        !matches!(handles[1].poll_request(), std::task::Poll::Ready(Some(_))),
        "b is not tried twice"
    );
}

/// Picks the first of a, b and c that the request has not tried when its
/// future is first polled (as a balancer behind a buffer does), fills the
/// `Picked` slot then, and keeps the slot so that a test can fill it late,
/// as a buffer's worker that picks for an attempt already abandoned would.
/// Only c answers.
#[derive(Clone, Default)]
struct LatePicker {
    slot: Arc<Mutex<Option<tower_ha::failover::Picked>>>,
    log: Log,
}

impl Service<Request<()>> for LatePicker {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Response<()>, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        let (slot, log) = (self.slot.clone(), self.log.clone());
        Box::pin(async move {
            let tried = req
                .extensions()
                .get::<Attempts>()
                .cloned()
                .unwrap_or_default();
            let id = ["a", "b", "c"]
                .into_iter()
                .map(BackendId::from)
                .find(|id| !tried.contains(id))
                .ok_or_else(|| BoxError::from(NoBackend::default()))?;
            if let Some(picked) = req.extensions().get::<tower_ha::failover::Picked>() {
                picked.set(id.clone());
                *slot.lock() = Some(picked.clone());
            }
            log.lock().push(id.to_string());
            if id.as_str() != "c" {
                std::future::pending::<()>().await;
            }
            let mut response = status(200);
            response.extensions_mut().insert(ServedBy(id));
            Ok(response)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_late_pick_of_an_abandoned_attempt_is_never_taken_for_the_next() {
    let picker = LatePicker::default();
    let service = ServiceBuilder::new()
        .layer(
            FailoverLayer::new()
                .no_budget()
                .per_try_timeout(Duration::from_millis(100))
                .backoff(Backoff::constant(Duration::from_secs(1))),
        )
        .service(picker.clone());
    let call = tokio::spawn(service.oneshot(Request::new(())));
    // a is abandoned at 100 ms; the pause before the retry lasts at least
    // 500 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*picker.log.lock(), ["a"]);
    // Meanwhile a pick for the abandoned attempt lands in the slot.
    let slot = picker.slot.lock().clone().expect("a was picked");
    slot.set("a".into());
    // The retry goes to b, which is abandoned too (and named as such, not
    // as a), then c answers.
    let response = call.await.unwrap().unwrap();
    assert_eq!(*picker.log.lock(), ["a", "b", "c"]);
    assert_eq!(history(&response), ["a", "b", "c"]);
}

/// The deadline passes in a pause between attempts, after a late pick for
/// the abandoned one landed in its slot: that attempt is named once, and
/// the deadline is the reason.
#[tokio::test(start_paused = true)]
async fn a_deadline_between_attempts_does_not_read_the_last_attempts_slot() {
    let picker = LatePicker::default();
    let service = ServiceBuilder::new()
        .layer(
            FailoverLayer::new()
                .no_budget()
                .per_try_timeout(Duration::from_millis(100))
                .deadline(Duration::from_millis(400))
                .backoff(Backoff::constant(Duration::from_secs(1))),
        )
        .service(picker.clone());
    let call = tokio::spawn(service.oneshot(Request::new(())));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let slot = picker.slot.lock().clone().expect("a was picked");
    slot.set("a".into());
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(*picker.log.lock(), ["a"]);
    assert_eq!(tried_before(&err), ["a"]);
    let reason = exhausted(&err).reason().expect("a reason");
    assert!(reason.is::<DeadlineExceeded>(), "{reason}");
}

/// The deadline passes while a retry is under way, no backend named yet:
/// that attempt failed last, so the earlier 503 is not returned as if it
/// were the last outcome (as at a per-try timeout there).
#[tokio::test(start_paused = true)]
async fn a_deadline_during_a_retry_does_not_return_the_earlier_response() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let inner = service_fn(move |_req: Request<()>| {
        let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if !first {
                std::future::pending::<()>().await;
            }
            let mut response = status(503);
            response.extensions_mut().insert(ServedBy("a".into()));
            Ok::<_, Infallible>(response)
        }
    });
    let service = ServiceBuilder::new()
        .layer(
            FailoverLayer::new()
                .no_budget()
                .deadline(Duration::from_millis(100)),
        )
        .service(inner);
    let err = service.oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(tried_before(&err), ["a"]);
    let reason = exhausted(&err).reason().expect("a reason");
    assert!(reason.is::<DeadlineExceeded>(), "{reason}");
    assert_eq!(
        tower_ha::error::gateway_status(&*err),
        StatusCode::GATEWAY_TIMEOUT
    );
}

/// A budget with nothing in it.
struct Spent;

impl tower::retry::budget::Budget for Spent {
    fn deposit(&self) {}
    fn withdraw(&self) -> bool {
        false
    }
}

#[tokio::test(start_paused = true)]
async fn a_late_pick_already_sent_runs_to_its_end_when_the_budget_is_spent() {
    let (pool, mut handles) = mock_fleet(&["a", "b"]);
    let events = tower_ha::control::Events::default();
    let layer = FailoverLayer::new().budget(Spent).events(events.clone());
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(Deferred(Balance::new(pool, RoundRobin::new())));
    let call = tokio::spawn(service.oneshot(Request::new(())));
    let (_, a_reply) = next(&mut handles[0], "a first").await;
    a_reply.send_error(io::Error::from(io::ErrorKind::ConnectionReset));
    // b has the request (picked and sent on the retry's first poll) when
    // the budget says no: b may act on it, so its answer is waited for.
    let (_, b_reply) = next(&mut handles[1], "then b").await;
    tokio::task::yield_now().await;
    assert!(!call.is_finished(), "not cut off while b has it");
    b_reply.send_response(status(200));
    let response = call.await.unwrap().unwrap();
    assert_eq!(served_by(&response), "b");
    assert_eq!(history(&response), ["a", "b"]);
    // And announced as a failover, though picked after `call`.
    let failovers = events
        .history()
        .iter()
        .filter(|e| matches!(e.event, tower_ha::control::Event::FailoverAttempt { .. }))
        .count();
    assert_eq!(failovers, 1);
    // A retry made, and it served: the budget held back no retry.
    let stats = layer.stats();
    assert_eq!((stats.retries, stats.recovered), (1, 1));
    assert_eq!((stats.budget_refusals, stats.exhausted), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_late_pick_that_failed_at_once_is_the_last_when_the_budget_is_spent() {
    // Every backend fails at once: the retry on b has already failed when
    // its first poll finds the budget spent. It counts, but no other
    // retry follows.
    use Kind::Reset;
    let log = Log::default();
    let kinds = [("a", Reset), ("b", Reset), ("c", Reset), ("d", Reset)];
    let layer = FailoverLayer::new().budget(Spent);
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(Deferred(Balance::new(
            fleet(&kinds, &log),
            RoundRobin::new(),
        )));
    let err = service.oneshot(request(Method::GET)).await.unwrap_err();
    assert_eq!(*log.lock(), ["a", "b"]);
    assert_eq!(tried_before(&err), ["a", "b"]);
    assert!(exhausted(&err).is_budget_spent());
    let stats = layer.stats();
    assert_eq!(
        (stats.retries, stats.exhausted, stats.budget_refusals),
        (1, 1, 1)
    );
}

/// A late pick not yet sent when the budget says no is dropped: the
/// request ends there, its one refusal counted.
#[tokio::test(start_paused = true)]
async fn a_late_pick_refused_by_the_budget_before_it_was_sent_counts_one_refusal() {
    let (pool, mut handles) = mock_fleet(&["a", "b"]);
    // b never becomes ready: its pick is never sent.
    handles[1].allow(0);
    let layer = FailoverLayer::new().budget(Spent);
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(Deferred(Balance::new(pool, RoundRobin::new())));
    let call = tokio::spawn(service.oneshot(Request::new(())));
    let (_, a_reply) = next(&mut handles[0], "a first").await;
    a_reply.send_error(io::Error::from(io::ErrorKind::ConnectionReset));
    let err = call.await.unwrap().unwrap_err();
    assert!(exhausted(&err).is_budget_spent());
    assert_eq!(tried_before(&err), ["a"]);
    let stats = layer.stats();
    assert_eq!(
        (stats.budget_refusals, stats.exhausted, stats.retries),
        (1, 1, 0)
    );
}

/// A request that comes with a `Picked` slot of its own (a layer above's)
/// still has each retry's pick read: a retry the budget refuses is dropped
/// before its backend sees it.
#[tokio::test(start_paused = true)]
async fn a_retry_refused_by_the_budget_is_not_sent_when_the_request_has_a_slot() {
    let (pool, mut handles) = mock_fleet(&["a", "b"]);
    let layer = FailoverLayer::new().budget(Spent);
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(Balance::new(pool, RoundRobin::new()));
    let request = Request::builder()
        .extension(Picked::new())
        .body(())
        .unwrap();
    let call = tokio::spawn(service.oneshot(request));
    let (_, a_reply) = next(&mut handles[0], "a first").await;
    a_reply.send_error(io::Error::from(io::ErrorKind::ConnectionReset));
    let err = call.await.unwrap().unwrap_err();
    assert!(exhausted(&err).is_budget_spent());
    assert_eq!(tried_before(&err), ["a"]);
    // The service is gone with its pool: b's handle ends without a request.
    assert!(
        matches!(
            futures::poll!(std::pin::pin!(handles[1].next_request())),
            std::task::Poll::Ready(None)
        ),
        "b got the request"
    );
    assert_eq!(layer.stats().budget_refusals, 1);
}

#[tokio::test]
async fn attempts_stopped_by_the_budget_say_so() {
    use Kind::*;
    let kinds = [("a", Reset), ("b", Ok)];
    let (result, tried) = send(
        FailoverLayer::new().budget(Spent),
        &kinds,
        request(Method::GET),
    )
    .await;
    assert_eq!(tried, ["a"]);
    let err = result.unwrap_err();
    assert!(exhausted(&err).is_budget_spent());
    assert!(err.to_string().ends_with(" (retry budget spent)"), "{err}");

    // Every backend failed: the budget had nothing to do with it.
    let kinds = [("a", Reset), ("b", Reset)];
    let (result, tried) = send(FailoverLayer::new(), &kinds, request(Method::GET)).await;
    assert_eq!(tried, ["a", "b"]);
    let err = result.unwrap_err();
    assert!(!exhausted(&err).is_budget_spent());
    assert!(!err.to_string().contains("budget"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn the_deadline_names_a_late_picked_attempt_and_answers_504() {
    let (pool, mut handles) = mock_fleet(&["a", "b"]);
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().deadline(Duration::from_millis(100)))
        .service(Deferred(Balance::new(pool, RoundRobin::new())));
    let call = tokio::spawn(service.oneshot(Request::new(())));
    let (_, a_reply) = next(&mut handles[0], "a first").await;
    a_reply.send_error(io::Error::from(io::ErrorKind::ConnectionReset));
    let (_, _b_never_answers) = next(&mut handles[1], "then b").await;
    let err = call.await.unwrap().unwrap_err();
    let exhausted = find::<Exhausted>(&*err).expect("exhausted");
    let tried: Vec<&str> = exhausted
        .attempts()
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(tried, ["a", "b"]);
    assert!(find::<DeadlineExceeded>(&*exhausted.attempts()[1].1).is_some());
    assert_eq!(
        tower_ha::error::gateway_status(&*err),
        StatusCode::GATEWAY_TIMEOUT
    );
}

#[tokio::test(start_paused = true)]
async fn a_post_timed_out_before_it_was_sent_is_retried() {
    let (pool, mut handles) = mock_fleet(&["a", "b"]);
    // a never becomes ready: its request is never sent.
    handles[0].allow(0);
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().per_try_timeout(Duration::from_millis(100)))
        .service(Balance::new(pool, RoundRobin::new()));
    let post = Request::post("/").body(()).unwrap();
    let call = tokio::spawn(service.clone().oneshot(post));
    let (to_b, b_reply) = next(&mut handles[1], "retried on b").await;
    assert_eq!(
        ids(to_b.extensions().get::<Attempts>().unwrap().as_slice()),
        ["a"]
    );
    b_reply.send_response(status(200));
    let response = call.await.unwrap().unwrap();
    assert_eq!(history(&response), ["a", "b"]);

    // Sent, then timed out: not retried.
    let (pool, mut handles) = mock_fleet(&["a", "b"]);
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().per_try_timeout(Duration::from_millis(100)))
        .service(Balance::new(pool, RoundRobin::new()));
    let post = Request::post("/").body(()).unwrap();
    let call = tokio::spawn(service.oneshot(post));
    let (_, _a_reply) = next(&mut handles[0], "a answers nothing").await;
    let err = call.await.unwrap().unwrap_err();
    assert!(!matches!(
        handles[1].poll_request(),
        std::task::Poll::Ready(Some(_))
    ));
    let tried = exhausted(&err).attempts();
    assert_eq!(tried.len(), 1);
    assert!(!find::<TimedOut>(&*tried[0].1).unwrap().is_not_sent());

    // Never ready, with nowhere else to go: the attempt says it was not
    // sent.
    let (pool, mut handles) = mock_fleet(&["a"]);
    handles[0].allow(0);
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().per_try_timeout(Duration::from_millis(100)))
        .service(Balance::new(pool, RoundRobin::new()));
    let post = Request::post("/").body(()).unwrap();
    let err = service.oneshot(post).await.unwrap_err();
    let tried = exhausted(&err).attempts();
    assert_eq!(tried.len(), 1);
    assert!(find::<TimedOut>(&*tried[0].1).unwrap().is_not_sent());
    assert!(
        err.to_string().contains("before the request was sent"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn timer_does_not_fire_one_tick_early() {
    let (pool, mut handles) = mock_fleet(&["a", "b"]);
    let mut service = ServiceBuilder::new()
        .layer(FailoverLayer::new().per_try_timeout(Duration::from_millis(100)))
        .service(Balance::new(pool, RoundRobin::new()));
    let start = Instant::now();
    service.ready().await.unwrap();
    let mut call = Box::pin(service.call(Request::new(())));
    assert!(futures::poll!(call.as_mut()).is_pending());
    let (_, _a_reply) = next(&mut handles[0], "a request to a").await;

    tokio::time::advance(Duration::from_millis(99)).await;
    assert!(futures::poll!(call.as_mut()).is_pending());
    assert!(handles[1].poll_request().is_pending(), "b not tried yet");

    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(futures::poll!(call.as_mut()).is_pending());
    let (_, b_reply) = next(&mut handles[1], "b tried at 100 ms").await;
    assert_eq!(Instant::now() - start, Duration::from_millis(100));
    b_reply.send_response(status(204));
    let response = call.await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

#[tokio::test(start_paused = true)]
async fn deadline_ends_the_attempts_at_the_configured_instant() {
    let (pool, mut handles) = mock_fleet(&["a", "b", "c", "d"]);
    let layer = FailoverLayer::new()
        .per_try_timeout(Duration::from_millis(100))
        .deadline(Duration::from_millis(250));
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(Balance::new(pool.clone(), RoundRobin::new()));

    let start = Instant::now();
    let call = tokio::spawn(async move {
        let result = service.oneshot(Request::new(())).await;
        (result, Instant::now())
    });

    let mut replies = Vec::new();
    for (handle, at) in handles.iter_mut().zip([0, 100, 200]) {
        let (_, reply) = next(handle, "the next backend is tried").await;
        assert_eq!(Instant::now() - start, Duration::from_millis(at));
        replies.push(reply);
    }
    let (result, ended) = call.await.unwrap();
    assert_eq!(ended - start, Duration::from_millis(250));
    assert!(handles[3].poll_request().is_pending(), "d never tried");
    assert_eq!(pool.state(&"c".into()).unwrap().in_flight(), 0);

    let err = result.unwrap_err();
    let err = exhausted(&err);
    assert_eq!(
        ids(&err.backends().cloned().collect::<Vec<_>>()),
        ["a", "b", "c"]
    );
    let causes = err.attempts();
    assert_eq!(
        causes[0].1.downcast_ref::<TimedOut>().unwrap().after(),
        Duration::from_millis(100)
    );
    assert!(causes[1].1.is::<TimedOut>());
    assert_eq!(
        causes[2]
            .1
            .downcast_ref::<DeadlineExceeded>()
            .unwrap()
            .after(),
        Duration::from_millis(250)
    );
    assert!(find::<DeadlineExceeded>(err).is_some());
    let stats = layer.stats();
    assert_eq!((stats.per_try_timeouts, stats.deadlines_exceeded), (2, 1));
    assert_eq!((stats.retries, stats.recovered, stats.exhausted), (2, 0, 1));
}

/// Runs a request carrying `grpc-timeout: client` through `layer` (with a
/// 100 ms per-try timeout) over four backends that never answer: the
/// header each backend saw, when it saw it, and when and how the request
/// ended.
async fn timed_grpc_call(
    layer: FailoverLayer,
    client: &'static str,
) -> (Vec<(u64, String)>, u64, BoxError) {
    let (pool, mut handles) = mock_fleet(&["a", "b", "c", "d"]);
    let service = ServiceBuilder::new()
        .layer(layer.per_try_timeout(Duration::from_millis(100)))
        .service(Balance::new(pool, RoundRobin::new()));
    let start = Instant::now();
    let call = tokio::spawn(async move {
        let request = Request::builder()
            .header("content-type", "application/grpc")
            .header("grpc-timeout", client)
            .body(())
            .unwrap();
        let result = service.oneshot(request).await;
        (result, Instant::now())
    });
    let mut seen = Vec::new();
    let mut replies = Vec::new();
    for handle in &mut handles {
        tokio::select! {
            biased;
            got = handle.next_request() => {
                // `None`: the request ended, and its service with it.
                let Some((request, reply)) = got else { break };
                let header = request.headers()["grpc-timeout"].to_str().unwrap().to_owned();
                seen.push(((Instant::now() - start).as_millis() as u64, header));
                replies.push(reply);
            }
            _ = tokio::time::sleep(Duration::from_secs(60)) => break,
        }
    }
    let (result, ended) = call.await.unwrap();
    let ended = (ended - start).as_millis() as u64;
    (seen, ended, result.unwrap_err())
}

fn deadline_of(err: &BoxError) -> DeadlineExceeded {
    *find::<DeadlineExceeded>(&**err).expect("the deadline ended the request")
}

/// A gRPC client's `grpc-timeout` shorter than the layer's deadline ends
/// the attempts at the client's deadline, and each retry tells its
/// backend the time left.
#[tokio::test(start_paused = true)]
async fn a_grpc_timeout_ends_the_attempts_and_each_retry_is_told_the_time_left() {
    let layer = FailoverLayer::new()
        .deadline(Duration::from_secs(10))
        .grpc_timeout(true);
    let (seen, ended, err) = timed_grpc_call(layer, "250m").await;
    assert_eq!(
        seen,
        [
            (0, "250m".to_owned()),
            (100, "150000u".to_owned()),
            (200, "50000000n".to_owned())
        ]
    );
    assert_eq!(ended, 250);
    let exceeded = deadline_of(&err);
    assert_eq!(exceeded.after(), Duration::from_millis(250));
    assert!(exceeded.is_grpc_timeout());
    assert!(err.to_string().contains("grpc-timeout"), "{err}");
}

/// The layer's deadline shorter than the client's: it holds, and the first
/// backend is told it, not the client's longer time.
#[tokio::test(start_paused = true)]
async fn a_longer_grpc_timeout_does_not_lengthen_the_deadline() {
    let layer = FailoverLayer::new()
        .deadline(Duration::from_millis(150))
        .grpc_timeout(true);
    let (seen, ended, err) = timed_grpc_call(layer, "5S").await;
    assert_eq!(
        seen,
        [(0, "150000u".to_owned()), (100, "50000000n".to_owned())]
    );
    assert_eq!(ended, 150);
    let exceeded = deadline_of(&err);
    assert_eq!(exceeded.after(), Duration::from_millis(150));
    assert!(!exceeded.is_grpc_timeout());
}

/// By default, and for a value the protocol does not allow, the header is
/// passed on as it came and does not bound the attempts.
#[tokio::test(start_paused = true)]
async fn a_grpc_timeout_is_not_read_unless_asked_or_when_malformed() {
    let (seen, ended, err) = timed_grpc_call(FailoverLayer::new(), "250m").await;
    let headers: Vec<_> = seen.iter().map(|(at, h)| (*at, h.as_str())).collect();
    assert_eq!(
        headers,
        [(0, "250m"), (100, "250m"), (200, "250m"), (300, "250m")]
    );
    assert_eq!(ended, 400);
    assert!(find::<DeadlineExceeded>(&*err).is_none(), "{err}");

    let layer = FailoverLayer::new()
        .deadline(Duration::from_millis(250))
        .grpc_timeout(true);
    let (seen, ended, err) = timed_grpc_call(layer, "100ms").await;
    let headers: Vec<_> = seen.iter().map(|(at, h)| (*at, h.as_str())).collect();
    assert_eq!(headers, [(0, "100ms"), (100, "100ms"), (200, "100ms")]);
    assert_eq!(ended, 250);
    assert!(!deadline_of(&err).is_grpc_timeout());
}

/// An attempt abandoned at its per-try timeout, then a wait for the
/// service to be ready for the next one: the deadline still ends the wait,
/// at its instant.
#[tokio::test(start_paused = true)]
async fn the_deadline_ends_a_wait_for_readiness_between_attempts() {
    let (pool, mut handles) = mock_fleet(&["a", "b"]);
    let service = ServiceBuilder::new()
        .layer(
            FailoverLayer::new()
                .per_try_timeout(Duration::from_secs(1))
                .deadline(Duration::from_secs(3)),
        )
        .service(Gated::one_call(Balance::new(
            pool.clone(),
            RoundRobin::new(),
        )));
    let start = Instant::now();
    let call = tokio::spawn(service.oneshot(Request::new(())));
    let (_, _a_never_answers) = next(&mut handles[0], "a first").await;
    let err = bounded("the deadline's answer", call)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(3), "{err}");
    let tried = exhausted(&err).attempts();
    assert_eq!(tried.len(), 1, "{err}");
    assert!(tried[0].1.is::<TimedOut>(), "{err}");
    let reason = exhausted(&err).reason().expect("why it gave up");
    assert!(reason.is::<DeadlineExceeded>(), "{err}");
    assert!(handles[1].poll_request().is_pending(), "b never tried");
}

#[tokio::test(start_paused = true)]
async fn backoff_pauses_between_attempts_within_its_jitter() {
    let (pool, mut handles) = mock_fleet(&["a", "b"]);
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().backoff(Backoff::constant(Duration::from_millis(80))))
        .service(Balance::new(pool, RoundRobin::new()));
    let call = tokio::spawn(service.oneshot(Request::new(())));

    let (_, a_reply) = next(&mut handles[0], "a request to a").await;
    let failed_at = Instant::now();
    a_reply.send_response(status(503));
    let (_, b_reply) = next(&mut handles[1], "a request to b").await;
    let pause = Instant::now() - failed_at;
    assert!(
        pause >= Duration::from_millis(40) && pause <= Duration::from_millis(80),
        "{pause:?}"
    );
    b_reply.send_response(status(200));
    let response = call.await.unwrap().unwrap();
    assert_eq!(history(&response), ["a", "b"]);
}

#[tokio::test(start_paused = true)]
async fn huge_durations_do_not_panic_and_the_deadline_still_holds() {
    let layer = FailoverLayer::new()
        .per_try_timeout(Duration::MAX)
        .backoff(Backoff::exponential(Duration::MAX, Duration::MAX))
        .deadline(Duration::from_secs(1));
    let start = Instant::now();
    let (result, tried) = send(
        layer,
        &[("a", Kind::Reset), ("b", Kind::Ok)],
        request(Method::GET),
    )
    .await;
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    assert_eq!(
        tried,
        ["a"],
        "still pausing before b when the deadline passed"
    );
    let err = result.unwrap_err();
    let err = exhausted(&err);
    assert_eq!(err.attempts().len(), 1);
    assert!(err.reason().unwrap().is::<DeadlineExceeded>());
}

/// A retry that no backend is left for is not waited for: the last
/// failure comes back at once, with no pause and no deadline.
#[tokio::test(start_paused = true)]
async fn no_pause_before_a_retry_that_no_backend_is_left_for() {
    let backoff = Backoff::constant(Duration::from_secs(10));
    // The last backend of the pool answers 503: that response, now.
    let start = Instant::now();
    let (result, tried) = send(
        FailoverLayer::new().backoff(backoff),
        &[("a", Kind::Reset), ("b", Kind::Unavailable)],
        request(Method::GET),
    )
    .await;
    assert_eq!(tried, ["a", "b"]);
    let response = result.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.extensions().get::<GaveUp>().is_some());
    assert!(
        Instant::now() - start >= Duration::from_secs(5),
        "the pause before b was kept"
    );
    assert!(Instant::now() - start <= Duration::from_secs(10));

    // A lone backend whose connection is reset: a 502-class failure, not a
    // deadline passed while waiting for a retry that could not happen.
    let start = Instant::now();
    let (result, tried) = send(
        FailoverLayer::new()
            .backoff(backoff)
            .deadline(Duration::from_secs(2)),
        &[("a", Kind::Reset)],
        request(Method::GET),
    )
    .await;
    assert_eq!(Instant::now(), start);
    assert_eq!(tried, ["a"]);
    let err = result.unwrap_err();
    assert!(exhausted(&err).reason().is_none(), "{err}");
    assert_eq!(
        tower_ha::error::gateway_status(&*err),
        StatusCode::BAD_GATEWAY
    );
}

/// Backends out of service are no backend for a retry either; one that is
/// merely full is (a place may open).
#[tokio::test(start_paused = true)]
async fn the_balancer_tells_whether_a_retry_could_find_a_backend() {
    let log = Log::default();
    let pool = fleet(
        &[("a", Kind::Unavailable), ("b", Kind::Ok), ("c", Kind::Ok)],
        &log,
    );
    pool.state(&"b".into())
        .unwrap()
        .set_admin(AdminStatus::Disabled);
    let c = pool.state(&"c".into()).unwrap();
    c.set_max_in_flight(Some(1));
    let place = c.track_in_flight();
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().backoff(Backoff::constant(Duration::from_secs(10))))
        .service(Balance::new(pool, RoundRobin::new()));
    // c is full: the pause is kept, then the retry finds c still full.
    let start = Instant::now();
    let response = service.clone().oneshot(request(Method::GET)).await;
    assert_eq!(response.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(Instant::now() - start >= Duration::from_secs(5), "paused");
    // c out of service too: nothing is left after a, and nothing waits.
    drop(place);
    c.set_admin(AdminStatus::Disabled);
    let start = Instant::now();
    let response = service.oneshot(request(Method::GET)).await;
    assert_eq!(response.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(Instant::now(), start);
    assert_eq!(*log.lock(), ["a", "a"]);
}

/// A request a balancer's queue placed is not answered for by the
/// balancer behind it (a nested group, which knows only its own members):
/// the pause before the retry is kept, and the retry goes to the other
/// group.
#[tokio::test(start_paused = true)]
async fn a_queued_pick_keeps_the_pause_a_nested_group_would_skip() {
    let log = Log::default();
    let outer = Pool::new();
    for (group, kind) in [("g1", Kind::Unavailable), ("g2", Kind::Ok)] {
        let member = if group == "g1" { "a" } else { "b" };
        let inner = Balance::new(fleet(&[(member, kind)], &log), RoundRobin::new());
        outer.insert(group, inner);
    }
    // Both groups full: the request waits in the outer balancer's queue.
    let places: Vec<_> = ["g1", "g2"]
        .iter()
        .map(|g| {
            let state = outer.state(&(*g).into()).unwrap();
            state.set_max_in_flight(Some(1));
            state.track_in_flight()
        })
        .collect();
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().backoff(Backoff::constant(Duration::from_secs(10))))
        .service(Balance::new(outer, RoundRobin::new()).queue(8, Duration::from_secs(600)));
    let start = Instant::now();
    let call = tokio::spawn(service.oneshot(request(Method::GET)));
    tokio::task::yield_now().await;
    let mut places = places.into_iter();
    drop(places.next()); // g1's place goes to the waiting request
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(*log.lock(), ["a"]);
    drop(places.next()); // g2 is free for the retry
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(*log.lock(), ["a", "b"]);
    assert!(
        Instant::now() - start >= Duration::from_secs(5),
        "the pause before g2 was kept"
    );
}

/// A budget that grants every retry and counts what it granted.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicUsize>);

impl tower::retry::budget::Budget for Counting {
    fn deposit(&self) {}
    fn withdraw(&self) -> bool {
        self.0.fetch_add(1, Ordering::SeqCst);
        true
    }
}

/// A pause that the deadline cuts short precedes no retry: it is not paid
/// for.
#[tokio::test(start_paused = true)]
async fn a_pause_the_deadline_cuts_short_is_not_paid_for() {
    let budget = Counting::default();
    let layer = FailoverLayer::new()
        .budget(budget.clone())
        .deadline(Duration::from_secs(2))
        .backoff(Backoff::constant(Duration::from_secs(10)));
    let start = Instant::now();
    let (result, tried) = send(
        layer,
        &[("a", Kind::Unavailable), ("b", Kind::Ok)],
        request(Method::GET),
    )
    .await;
    assert_eq!(tried, ["a"]);
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
    assert_eq!(result.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(budget.0.load(Ordering::SeqCst), 0, "no retry was paid for");

    // A pause within the deadline is paid for once, before it.
    let layer = FailoverLayer::new()
        .budget(budget.clone())
        .deadline(Duration::from_secs(60))
        .backoff(Backoff::constant(Duration::from_secs(10)));
    let (result, tried) = send(
        layer,
        &[("a", Kind::Unavailable), ("b", Kind::Ok)],
        request(Method::GET),
    )
    .await;
    assert_eq!(tried, ["a", "b"]);
    assert_eq!(result.unwrap().status(), StatusCode::OK);
    assert_eq!(budget.0.load(Ordering::SeqCst), 1);
}

/// With a backoff, a retry is paid for before its pause: one the budget
/// refuses ends the request at once.
#[tokio::test(start_paused = true)]
async fn a_retry_the_budget_refuses_is_not_paused_for() {
    let layer = FailoverLayer::new()
        .budget(RetryBudget::new(0.0, 0))
        .backoff(Backoff::constant(Duration::from_secs(10)));
    let start = Instant::now();
    let (result, tried) = send(
        layer.clone(),
        &[("a", Kind::Unavailable), ("b", Kind::Ok)],
        request(Method::GET),
    )
    .await;
    assert_eq!(Instant::now(), start);
    assert_eq!(tried, ["a"]);
    assert_eq!(result.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(layer.stats().budget_refusals, 1);
}

// ---------------------------------------------------------------------------
// The retry budget.

/// A fleet whose every backend fails, counting the attempts it receives.
fn failing_fleet(
    n: usize,
    attempts: Arc<AtomicUsize>,
) -> Pool<BoxCloneSyncService<Request<()>, Response<()>, BoxError>> {
    let pool = Pool::new();
    for i in 0..n {
        let attempts = attempts.clone();
        let service = service_fn(move |_req: Request<()>| {
            attempts.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, BoxError>(status(503)) }
        });
        pool.insert(format!("b{i}"), BoxCloneSyncService::new(service));
    }
    pool
}

/// Sends `rate` requests per second to `backends` failing backends for
/// `seconds` seconds of virtual time; returns the number of retries.
async fn retries_over(layer: FailoverLayer, backends: usize, rate: u32, seconds: u32) -> usize {
    let attempts = Arc::new(AtomicUsize::new(0));
    let service = ServiceBuilder::new().layer(layer).service(Balance::new(
        failing_fleet(backends, attempts.clone()),
        RoundRobin::new(),
    ));
    let requests = rate * seconds;
    let gap = Duration::from_secs(1) / rate;
    for _ in 0..requests {
        let response = service.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::advance(gap).await;
    }
    attempts.load(Ordering::Relaxed) - requests as usize
}

#[tokio::test(start_paused = true)]
async fn budget_caps_retries_at_ratio_plus_floor_over_a_minute() {
    // 20 requests per second for 60 s, three failing backends: without a
    // budget each request is retried twice (2400 retries).
    let unbounded = retries_over(FailoverLayer::new().no_budget(), 3, 20, 60).await;
    assert_eq!(unbounded, 2400);

    let retries = retries_over(FailoverLayer::new(), 3, 20, 60).await;
    // Ratio: 20 % of 1200 requests = 240; floor: 3 per second = 180.
    let ratio = 1200 / 5;
    let floor = 3 * 60;
    assert!(retries <= ratio + floor, "{retries} retries");
    // The budget counts over 10 s windows: 20 % of 200 requests plus 30 =
    // 70 retries in the first; in each later one, the request whose retry
    // opens the window was counted in the previous window: 20 % of 199
    // plus 30 = 69.
    assert_eq!(retries, 70 + 5 * 69);
}

#[tokio::test(start_paused = true)]
async fn budget_floor_allows_retries_without_traffic() {
    // One request per second to ten failing backends: the ratio allows
    // 0.2 retries per second, the floor 3; without a budget, 9 per request.
    let unbounded = retries_over(FailoverLayer::new().no_budget(), 10, 1, 60).await;
    assert_eq!(unbounded, 9 * 60);
    let retries = retries_over(FailoverLayer::new(), 10, 1, 60).await;
    let ratio = 60 / 5;
    let floor = 3 * 60;
    assert!(retries <= ratio + floor, "{retries} retries");
    // Per 10 s window: 20 % of 10 requests plus 30 = 32 in the first, 20 %
    // of 9 plus 30 = 31.8, so 31, in each later one.
    assert_eq!(retries, 32 + 5 * 31);
}

// ---------------------------------------------------------------------------
// What counts as a failure, what may be retried, and the history.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ok,
    Unavailable,
    /// A refused connection: known not sent.
    Refused,
    /// A reset after the request was sent.
    Reset,
    /// A success status the classifier does not count as a failure.
    ServerError,
    /// The request's own fault (its upload broke): not the backend's.
    Invalid,
}

type Log = Arc<Mutex<Vec<String>>>;
type Backend = BoxCloneSyncService<Request<Full<Bytes>>, Response<()>, BoxError>;

fn fleet(kinds: &[(&str, Kind)], log: &Log) -> Pool<Backend> {
    let pool = Pool::new();
    for &(name, kind) in kinds {
        let log = log.clone();
        let label = name.to_string();
        let service = service_fn(move |_req: Request<Full<Bytes>>| {
            log.lock().push(label.clone());
            async move {
                match kind {
                    Kind::Ok => Ok(status(200)),
                    Kind::Unavailable => Ok(status(503)),
                    Kind::ServerError => Ok(status(500)),
                    Kind::Refused => {
                        Err(NotSent::new(io::Error::from(io::ErrorKind::ConnectionRefused)).into())
                    }
                    Kind::Reset => Err(io::Error::from(io::ErrorKind::ConnectionReset).into()),
                    Kind::Invalid => {
                        Err(tower_ha::error::InvalidRequest::new("the upload broke").into())
                    }
                }
            }
        });
        pool.insert(name, BoxCloneSyncService::new(service));
    }
    pool
}

fn request(method: Method) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("/")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap()
}

async fn send<C: Classifier + Clone>(
    layer: FailoverLayer<C>,
    kinds: &[(&str, Kind)],
    req: Request<Full<Bytes>>,
) -> (Result<Response<()>, BoxError>, Vec<String>) {
    let log = Log::default();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(Balance::new(fleet(kinds, &log), RoundRobin::new()));
    let result = service.oneshot(req).await;
    let tried = log.lock().clone();
    (result, tried)
}

#[tokio::test]
async fn get_tries_each_backend_once_in_round_robin_order() {
    use Kind::*;
    let kinds = [
        ("a", Refused),
        ("b", Unavailable),
        ("c", Reset),
        ("d", Ok),
        ("e", Ok),
    ];
    let (result, tried) = send(FailoverLayer::new(), &kinds, request(Method::GET)).await;
    let response = result.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(tried, ["a", "b", "c", "d"]);
    assert_eq!(history(&response), ["a", "b", "c", "d"]);
    assert_eq!(served_by(&response), "d");
}

/// The history lists this request's attempts only, not the backends a
/// layer in front excluded before it came (as the sticky layer excludes
/// the backend that failed a session's last request).
#[tokio::test]
async fn the_history_leaves_out_backends_excluded_before_the_request() {
    use Kind::*;
    let kinds = [("x", Ok), ("a", Unavailable), ("b", Ok)];
    let mut req = request(Method::GET);
    req.extensions_mut()
        .insert(std::iter::once(BackendId::from("x")).collect::<Attempts>());
    let (result, tried) = send(FailoverLayer::new(), &kinds, req).await;
    let response = result.unwrap();
    assert_eq!(tried, ["a", "b"]);
    assert_eq!(history(&response), ["a", "b"]);
    assert_eq!(served_by(&response), "b");
}

#[tokio::test]
async fn success_at_first_try_carries_no_history() {
    let (result, tried) = send(
        FailoverLayer::new(),
        &[("a", Kind::Ok)],
        request(Method::GET),
    )
    .await;
    let response = result.unwrap();
    assert_eq!(tried, ["a"]);
    assert!(response.extensions().get::<Attempts>().is_none());
}

#[tokio::test]
async fn a_status_that_is_no_failure_is_returned_unchanged() {
    use Kind::*;
    let kinds = [("a", Unavailable), ("b", ServerError), ("c", Ok)];
    let (result, tried) = send(FailoverLayer::new(), &kinds, request(Method::GET)).await;
    let response = result.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(tried, ["a", "b"]);
    assert_eq!(history(&response), ["a", "b"]);
}

#[tokio::test]
async fn exhausted_lists_every_backend_and_why_in_order() {
    use Kind::*;
    let kinds = [("a", Unavailable), ("b", Refused), ("c", Reset)];
    let (result, tried) = send(FailoverLayer::new(), &kinds, request(Method::GET)).await;
    assert_eq!(tried, ["a", "b", "c"]);
    let err = result.unwrap_err();
    let err = exhausted(&err);
    let attempts = err.attempts();
    assert_eq!(
        ids(&err.backends().cloned().collect::<Vec<_>>()),
        ["a", "b", "c"]
    );
    assert_eq!(
        attempts[0]
            .1
            .downcast_ref::<FailedStatus>()
            .unwrap()
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(find::<NotSent>(&*attempts[1].1).is_some());
    let reset = find::<io::Error>(&*attempts[2].1).unwrap();
    assert_eq!(reset.kind(), io::ErrorKind::ConnectionReset);
    assert!(
        err.reason().is_none(),
        "NoBackend after failures is not listed"
    );
}

#[tokio::test]
async fn the_last_failed_response_is_returned_with_the_history() {
    use Kind::*;
    let kinds = [("a", Reset), ("b", Unavailable)];
    let (result, tried) = send(FailoverLayer::new(), &kinds, request(Method::GET)).await;
    let response = result.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(tried, ["a", "b"]);
    assert_eq!(history(&response), ["a", "b"]);
    assert!(response.extensions().get::<GaveUp>().is_some(), "marked");
}

#[tokio::test]
async fn no_backend_at_all_is_the_reason_of_an_empty_exhausted() {
    let (result, tried) = send(FailoverLayer::new(), &[], request(Method::GET)).await;
    assert!(tried.is_empty());
    let err = result.unwrap_err();
    let err = exhausted(&err);
    assert!(err.attempts().is_empty());
    assert!(err.reason().unwrap().is::<NoBackend>());
}

/// An error of a layer between the failover layer and the balancer,
/// wrapping the balancer's.
#[derive(Debug)]
struct Wrapped(BoxError);

impl std::fmt::Display for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("inner service failed")
    }
}

impl std::error::Error for Wrapped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// A retry that ends in an error that is no failure (the client's upload
/// broke) returns that error as it is, and counts the request as ended
/// failed after its failed attempt: no retry is left without an end.
#[tokio::test]
async fn a_retry_ended_by_the_requests_own_error_counts_as_exhausted() {
    use Kind::*;
    let layer = FailoverLayer::new().no_budget();
    let (result, log) = send(
        layer.clone(),
        &[("a", Unavailable), ("b", Invalid)],
        request(Method::GET),
    )
    .await;
    assert_eq!(log, ["a", "b"]);
    let err = result.unwrap_err();
    assert!(
        find::<tower_ha::error::InvalidRequest>(&*err).is_some(),
        "{err}"
    );
    assert!(find::<Exhausted>(&*err).is_none(), "{err}");
    let stats = layer.stats();
    assert_eq!((stats.retries, stats.recovered, stats.exhausted), (1, 0, 1));
    // On a first attempt nothing failed over: nothing is counted.
    let (result, _) = send(layer.clone(), &[("b", Invalid)], request(Method::GET)).await;
    let err = result.unwrap_err();
    assert!(
        find::<tower_ha::error::InvalidRequest>(&*err).is_some(),
        "{err}"
    );
    assert_eq!(layer.stats().exhausted, 1);
}

/// A `NoBackend` a layer wraps still ends the attempts, as the balancer's
/// own does; one inside a backend's error (a nested balancer behind that
/// backend had none) is that backend's failure.
#[tokio::test]
async fn a_wrapped_no_backend_ends_the_attempts() {
    use Kind::*;
    let log = Log::default();
    let layer = FailoverLayer::new().no_budget();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .map_err(|e: BoxError| BoxError::from(Wrapped(e)))
        .service(Balance::new(
            fleet(&[("a", Reset), ("b", Refused)], &log),
            RoundRobin::new(),
        ));
    let err = service.oneshot(request(Method::GET)).await.unwrap_err();
    assert_eq!(*log.lock(), ["a", "b"]);
    let stats = layer.stats();
    assert_eq!((stats.retries, stats.exhausted), (1, 1), "{err}");
    let err = exhausted(&err);
    assert_eq!(
        ids(&err.backends().cloned().collect::<Vec<_>>()),
        ["a", "b"]
    );
    assert!(
        err.reason().is_none(),
        "NoBackend after failures is not listed"
    );

    // Nothing at all: the wrapped `NoBackend` is the reason, tried once.
    let layer = FailoverLayer::new().no_budget();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .map_err(|e: BoxError| BoxError::from(Wrapped(e)))
        .service(Balance::new(fleet(&[], &log), RoundRobin::new()));
    let err = service.oneshot(request(Method::GET)).await.unwrap_err();
    let err = exhausted(&err);
    assert!(err.attempts().is_empty());
    assert!(find::<NoBackend>(err.reason().unwrap()).is_some());
    assert_eq!(layer.stats().retries, 0);

    // A backend whose own balancer had nothing: its failure, and the next
    // backend answers.
    let pool = Pool::new();
    let nested: Backend = BoxCloneSyncService::new(service_fn(|_: Request<Full<Bytes>>| async {
        Err::<Response<()>, BoxError>(Wrapped(NoBackend::default().into()).into())
    }));
    pool.insert("nested", nested);
    let ok: Backend = BoxCloneSyncService::new(service_fn(|_: Request<Full<Bytes>>| async {
        Result::<_, BoxError>::Ok(status(200))
    }));
    pool.insert("ok", ok);
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new())
        .service(Balance::new(pool, RoundRobin::new()));
    let response = service.oneshot(request(Method::GET)).await.unwrap();
    assert_eq!(history(&response), ["nested", "ok"]);
}

/// A backend that is a balancer itself and sent nothing (it had no backend,
/// or its backend did not become ready) failed before the request went
/// anywhere: a POST goes on to the next backend.
#[tokio::test]
async fn a_post_a_nested_balancer_never_sent_goes_on() {
    /// A backend that never becomes ready.
    #[derive(Clone)]
    struct NotReady;
    impl tower::Service<Request<Full<Bytes>>> for NotReady {
        type Response = Response<()>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Response<()>, BoxError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Err("not ready".into()))
        }
        fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
            unreachable!("never ready")
        }
    }
    let log = Log::default();
    let empty = Balance::new(Pool::<Backend>::new(), RoundRobin::new());
    let not_ready = Pool::new();
    not_ready.insert("inner", BoxCloneSyncService::new(NotReady));
    let not_ready = Balance::new(not_ready, RoundRobin::new());
    let pool = fleet(&[("ok", Kind::Ok)], &log);
    pool.insert("empty", BoxCloneSyncService::new(empty));
    pool.insert("not-ready", BoxCloneSyncService::new(not_ready));
    let layer = FailoverLayer::new().no_budget();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(Balance::new(pool, RoundRobin::new()));
    for _ in 0..3 {
        let response = service
            .clone()
            .oneshot(request(Method::POST))
            .await
            .expect("sent to ok at last");
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(*log.lock(), ["ok", "ok", "ok"]);
    assert_eq!(layer.stats().unsafe_to_retry, 0);
}

#[tokio::test]
async fn post_is_not_retried_after_a_failed_response_or_a_sent_error() {
    use Kind::*;
    let (result, tried) = send(
        FailoverLayer::new(),
        &[("a", Unavailable), ("b", Ok)],
        request(Method::POST),
    )
    .await;
    let response = result.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(tried, ["a"]);
    assert_eq!(history(&response), ["a"]);

    let (result, tried) = send(
        FailoverLayer::new(),
        &[("a", Reset), ("b", Ok)],
        request(Method::PATCH),
    )
    .await;
    assert_eq!(tried, ["a"]);
    let err = result.unwrap_err();
    assert_eq!(tried_before(&err), ["a"]);
}

#[tokio::test]
async fn post_is_retried_when_not_sent() {
    use Kind::*;
    let (result, tried) = send(
        FailoverLayer::new(),
        &[("a", Refused), ("b", Refused), ("c", Ok)],
        request(Method::POST),
    )
    .await;
    assert_eq!(result.unwrap().status(), StatusCode::OK);
    assert_eq!(tried, ["a", "b", "c"]);
}

#[tokio::test]
async fn post_is_retried_after_any_failure_when_opted_in() {
    use Kind::*;
    let kinds = [("a", Unavailable), ("b", Reset), ("c", Ok)];
    let mut req = request(Method::POST);
    req.extensions_mut().insert(RetryNonIdempotent);
    let (result, tried) = send(FailoverLayer::new(), &kinds, req).await;
    assert_eq!(result.unwrap().status(), StatusCode::OK);
    assert_eq!(tried, ["a", "b", "c"]);

    let layer = FailoverLayer::new().retry_non_idempotent(true);
    let (result, tried) = send(layer, &kinds, request(Method::POST)).await;
    assert_eq!(result.unwrap().status(), StatusCode::OK);
    assert_eq!(tried, ["a", "b", "c"]);
}

#[tokio::test]
async fn max_attempts_bounds_the_attempts() {
    use Kind::*;
    let kinds = [("a", Reset), ("b", Reset), ("c", Ok)];
    let (result, tried) = send(
        FailoverLayer::new().max_attempts(2),
        &kinds,
        request(Method::GET),
    )
    .await;
    assert_eq!(tried, ["a", "b"]);
    let err = result.unwrap_err();
    assert_eq!(exhausted(&err).attempts().len(), 2);

    let (result, tried) = send(
        FailoverLayer::new().max_attempts(1),
        &kinds,
        request(Method::GET),
    )
    .await;
    assert_eq!(tried, ["a"]);
    assert_eq!(exhausted(&result.unwrap_err()).attempts().len(), 1);
}

#[tokio::test]
async fn counters_count_retries_recoveries_and_exhaustions_not_first_successes() {
    use Kind::*;
    let layer = FailoverLayer::new().no_budget();
    let (result, _) = send(layer.clone(), &[("a", Ok)], request(Method::GET)).await;
    result.unwrap();
    assert_eq!(layer.stats(), FailoverStats::default());

    let kinds = [("a", Refused), ("b", Unavailable), ("c", Ok)];
    let (result, _) = send(layer.clone(), &kinds, request(Method::GET)).await;
    assert_eq!(result.unwrap().status(), StatusCode::OK);
    let stats = layer.stats();
    assert_eq!((stats.retries, stats.recovered, stats.exhausted), (2, 1, 0));

    let kinds = [("a", Reset), ("b", Unavailable)];
    let (result, _) = send(layer.clone(), &kinds, request(Method::GET)).await;
    assert_eq!(result.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    let stats = layer.stats();
    assert_eq!((stats.retries, stats.recovered, stats.exhausted), (3, 1, 1));
    // Every backend was tried: nothing else stopped a retry.
    let mut rest = stats;
    (rest.retries, rest.recovered, rest.exhausted) = (0, 0, 0);
    assert_eq!(rest, FailoverStats::default());

    // A service the layer built, and a clone of the layer, share them.
    let service = layer.layer(Balance::new(fleet(&[], &Log::default()), RoundRobin::new()));
    assert_eq!(service.stats(), stats);
    assert_eq!(layer.clone().stats(), stats);
}

#[tokio::test]
async fn counters_say_why_a_failure_was_not_retried() {
    use Kind::*;
    // A POST that reached its backend.
    let layer = FailoverLayer::new();
    let (result, _) = send(
        layer.clone(),
        &[("a", Unavailable), ("b", Ok)],
        request(Method::POST),
    )
    .await;
    assert_eq!(result.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    let stats = layer.stats();
    assert_eq!((stats.unsafe_to_retry, stats.exhausted), (1, 1));
    // One that did not is retried.
    let (result, _) = send(
        layer.clone(),
        &[("a", Refused), ("b", Ok)],
        request(Method::POST),
    )
    .await;
    assert_eq!(result.unwrap().status(), StatusCode::OK);
    let stats = layer.stats();
    assert_eq!(
        (stats.unsafe_to_retry, stats.retries, stats.recovered),
        (1, 1, 1)
    );
    assert_eq!(stats.budget_refusals, 0);

    // A spent budget.
    let spent = FailoverLayer::new().budget(Spent);
    let kinds = [("a", Reset), ("b", Ok)];
    let (result, _) = send(spent.clone(), &kinds, request(Method::GET)).await;
    result.unwrap_err();
    let stats = spent.stats();
    assert_eq!(
        (stats.budget_refusals, stats.exhausted, stats.retries),
        (1, 1, 0)
    );

    // The attempt limit: exhausted, for no other reason.
    let once = FailoverLayer::new().max_attempts(1);
    let (result, _) = send(once.clone(), &kinds, request(Method::GET)).await;
    result.unwrap_err();
    let mut expected = FailoverStats::default();
    expected.exhausted = 1;
    assert_eq!(once.stats(), expected);
}

#[tokio::test]
async fn a_closure_classifier_decides_what_fails() {
    use tower_ha::classify::Outcome;
    let errors_only = |outcome: &Outcome<'_>| matches!(outcome, Outcome::Error(_));
    let kinds = [("a", Kind::Unavailable), ("b", Kind::Ok)];
    let (result, tried) = send(
        FailoverLayer::new().classifier(errors_only),
        &kinds,
        request(Method::GET),
    )
    .await;
    assert_eq!(result.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(tried, ["a"]);
}

// ---------------------------------------------------------------------------
// Bodies that are not `Clone`.

/// Backends that read the whole body, log its length, and answer `code`.
fn reading_fleet(
    kinds: &[(&'static str, u16)],
    log: &Arc<Mutex<Vec<(String, usize)>>>,
) -> Pool<BoxCloneSyncService<Request<ReplayBody<BoxBody>>, Response<()>, BoxError>> {
    let pool = Pool::new();
    for &(name, code) in kinds {
        let log = log.clone();
        let service = service_fn(move |req: Request<ReplayBody<BoxBody>>| {
            let log = log.clone();
            async move {
                let body = req.into_body().collect().await?.to_bytes();
                log.lock().push((name.to_string(), body.len()));
                Ok::<_, BoxError>(status(code))
            }
        });
        pool.insert(name, BoxCloneSyncService::new(service));
    }
    pool
}

async fn post_body(len: usize) -> (Response<()>, Vec<(String, usize)>, FailoverStats) {
    let log = Arc::default();
    let failover = FailoverLayer::new().retry_non_idempotent(true);
    let service = ServiceBuilder::new()
        .layer(BufferBodyLayer::new().limit(1024))
        .layer(failover.clone())
        .service(Balance::new(
            reading_fleet(&[("a", 503), ("b", 200)], &log),
            RoundRobin::new(),
        ));
    let body = Full::new(Bytes::from(vec![7u8; len])).boxed();
    let req = Request::post("/upload").body(body).unwrap();
    let response = service.oneshot(req).await.unwrap();
    let log = log.lock().clone();
    (response, log, failover.stats())
}

#[tokio::test]
async fn a_body_within_the_limit_is_replayed() {
    let (response, log, stats) = post_body(1024).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(log, [("a".to_string(), 1024), ("b".to_string(), 1024)]);
    assert_eq!((stats.retries, stats.unreplayable), (1, 0));
}

#[tokio::test]
async fn a_body_over_the_limit_is_not_retried_once_read() {
    let (response, log, stats) = post_body(1025).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(log, [("a".to_string(), 1025)]);
    assert_eq!(history(&response), ["a"]);
    assert_eq!(
        (stats.retries, stats.unreplayable, stats.exhausted),
        (0, 1, 1)
    );
}

#[tokio::test]
async fn a_body_over_the_limit_in_one_frame_is_sent_intact_and_not_copied() {
    static BODY: [u8; 64 * 1024] = [9; 64 * 1024];
    let frames: Arc<Mutex<Vec<(String, Bytes)>>> = Arc::default();
    let pool = Pool::new();
    for (name, code) in [("a", 503), ("b", 200)] {
        let frames = frames.clone();
        let service = service_fn(move |req: Request<ReplayBody<BoxBody>>| {
            let frames = frames.clone();
            async move {
                let mut body = req.into_body();
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame?.into_data() {
                        frames.lock().push((name.to_string(), data));
                    }
                }
                Ok::<_, BoxError>(status(code))
            }
        });
        pool.insert(name, BoxCloneSyncService::new(service));
    }
    let service = ServiceBuilder::new()
        .layer(BufferBodyLayer::new().limit(1024))
        .layer(FailoverLayer::new().retry_non_idempotent(true))
        .service(Balance::new(pool, RoundRobin::new()));
    let body = Full::new(Bytes::from_static(&BODY)).boxed();
    let req = Request::post("/upload").body(body).unwrap();
    let response = service.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(history(&response), ["a"]);
    let frames = frames.lock();
    assert_eq!(frames.len(), 1, "one frame, to a only");
    let (to, data) = &frames[0];
    assert_eq!(to, "a");
    assert_eq!(&data[..], &BODY[..]);
    // Handed on as it came, not copied into a buffer first.
    assert_eq!(data.as_ptr(), BODY.as_ptr());
}

/// POSTs 100 bytes, over a 16-byte replay buffer, through failover over
/// `pool`.
async fn post_over_the_limit(
    pool: Pool<BoxCloneSyncService<Request<ReplayBody<BoxBody>>, Response<()>, BoxError>>,
) -> Response<()> {
    let service = ServiceBuilder::new()
        .layer(BufferBodyLayer::new().limit(16))
        .layer(FailoverLayer::new())
        .service(Balance::new(pool, RoundRobin::new()));
    let body = Full::new(Bytes::from(vec![1u8; 100])).boxed();
    service
        .oneshot(Request::post("/").body(body).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_body_over_the_limit_is_retried_while_unread() {
    let log: Log = Log::default();
    let pool = Pool::new();
    for (name, refuse) in [("a", true), ("b", false)] {
        let log = log.clone();
        let service = service_fn(move |req: Request<ReplayBody<BoxBody>>| {
            let log = log.clone();
            async move {
                if refuse {
                    // Fails before reading the body, as a refused connection.
                    return Err::<Response<()>, BoxError>(
                        NotSent::new(io::Error::from(io::ErrorKind::ConnectionRefused)).into(),
                    );
                }
                let body = req.into_body().collect().await?.to_bytes();
                log.lock().push(format!("{name}:{}", body.len()));
                Ok(status(200))
            }
        });
        pool.insert(name, BoxCloneSyncService::new(service));
    }
    let response = post_over_the_limit(pool).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(*log.lock(), ["b:100"]);
    assert_eq!(history(&response), ["a", "b"]);
}

/// A request an abandoned attempt left behind (in a buffer's queue, say)
/// that reaches its backend late cannot take a body sent once from the
/// attempt after it: that attempt would fail, and the request would go
/// where no one waits for its answer.
#[tokio::test]
async fn a_request_left_behind_cannot_take_the_body_of_the_next_attempt() {
    let log: Log = Log::default();
    let left_behind = Arc::new(Mutex::new(None));
    let pool = Pool::new();
    let (stash, log_a) = (left_behind.clone(), log.clone());
    let a = service_fn(move |req: Request<ReplayBody<BoxBody>>| {
        *stash.lock() = Some(req);
        log_a.lock().push("a: kept".to_owned());
        let refused = NotSent::new(io::Error::from(io::ErrorKind::ConnectionRefused));
        async move { Err::<Response<()>, BoxError>(refused.into()) }
    });
    let log_b = log.clone();
    let b = service_fn(move |req: Request<ReplayBody<BoxBody>>| {
        let (stale, log) = (left_behind.lock().take(), log_b.clone());
        async move {
            // The request left behind reaches a backend first.
            let stale = stale.expect("a's request").into_body();
            let err = stale.collect().await.expect_err("not for a's request");
            log.lock().push(format!("a: {err}"));
            let body = req.into_body().collect().await?.to_bytes();
            log.lock().push(format!("b:{}", body.len()));
            Ok::<_, BoxError>(status(200))
        }
    });
    pool.insert("a", BoxCloneSyncService::new(a));
    pool.insert("b", BoxCloneSyncService::new(b));
    let response = post_over_the_limit(pool).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        *log.lock(),
        [
            "a: kept",
            "a: request body handed to a later attempt",
            "b:100"
        ]
    );
}

/// What a backend does with a streamed upload in [`timed_upload`].
#[derive(Clone, Copy)]
enum Reads {
    /// Reads it to its end, then answers after this long.
    ThenAnswersAfter(Duration),
    /// Reads it to its end, then answers nothing.
    ThenHangs,
    /// Takes its first frame, then neither reads on nor answers.
    FirstFrameThenHangs,
    /// Never reads it, nor answers.
    Nothing,
}

/// Sends a 24-byte body that comes in three parts 4 s apart, over a 4-byte
/// buffer limit (so it is streamed, and sent once), through a failover
/// layer with a per-try timeout of 5 s to one backend that `reads`: the
/// outcome, when it came, and the layer's count of per-try timeouts.
async fn timed_upload(reads: Reads) -> (Result<Response<()>, BoxError>, Duration, u64) {
    use futures::StreamExt as _;
    let service = service_fn(move |req: Request<ReplayBody<BoxBody>>| async move {
        let mut body = req.into_body();
        match reads {
            Reads::Nothing => std::future::pending::<()>().await,
            Reads::FirstFrameThenHangs => {
                body.frame().await.unwrap()?;
                std::future::pending::<()>().await;
            }
            _ => {}
        }
        let body = body.collect().await?.to_bytes();
        assert_eq!(body.len(), 24);
        match reads {
            Reads::ThenAnswersAfter(after) => tokio::time::sleep(after).await,
            _ => std::future::pending().await,
        }
        Ok::<_, BoxError>(status(200))
    });
    let pool = Pool::new();
    pool.insert("a", BoxCloneSyncService::new(service));
    let failover = FailoverLayer::new().per_try_timeout(Duration::from_secs(5));
    let stack = ServiceBuilder::new()
        .layer(BufferBodyLayer::new().limit(4))
        .layer(failover.clone())
        .service(Balance::new(pool, RoundRobin::new()));
    let parts = futures::stream::iter([b"aaaaaaaa"; 3]).then(|part| async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(part)))
    });
    let body = BodyExt::boxed(http_body_util::StreamBody::new(parts));
    let start = Instant::now();
    let upload = stack.oneshot(Request::put("/upload").body(body).unwrap());
    let result = tokio::time::timeout(Duration::from_secs(86_400), upload)
        .await
        .expect("the upload is given up within a day");
    (result, start.elapsed(), failover.stats().per_try_timeouts)
}

/// The per-try timeout waits while the backend reads a streamed upload
/// (a slow client is no slow backend) and runs from the upload's end.
#[tokio::test(start_paused = true)]
async fn the_per_try_timeout_runs_from_the_end_of_a_streamed_upload() {
    // The first part comes at 4 s (the buffer waits for it), the last at
    // 12 s; answered 3 s later, well within 5 s of the upload's end.
    let (result, took, timeouts) =
        timed_upload(Reads::ThenAnswersAfter(Duration::from_secs(3))).await;
    assert_eq!(result.unwrap().status(), StatusCode::OK);
    assert_eq!((took, timeouts), (Duration::from_secs(15), 0));

    // Not answered: given up 5 s after the upload's end.
    let (result, took, timeouts) = timed_upload(Reads::ThenHangs).await;
    let err = result.unwrap_err();
    assert!(find::<TimedOut>(&*err).is_some(), "{err}");
    assert_eq!((took, timeouts), (Duration::from_secs(17), 1));

    // A backend that never starts to read it is timed from its call, at
    // 4 s (when the body passed the buffer's limit).
    let (result, took, timeouts) = timed_upload(Reads::Nothing).await;
    let err = result.unwrap_err();
    assert!(find::<TimedOut>(&*err).is_some(), "{err}");
    assert_eq!((took, timeouts), (Duration::from_secs(9), 1));

    // One that stops reading part way, while the client has more to send,
    // is timed from the last frame it took (at 4 s): the upload waits for
    // the backend then, not for the client.
    let (result, took, timeouts) = timed_upload(Reads::FirstFrameThenHangs).await;
    let err = result.unwrap_err();
    assert!(find::<TimedOut>(&*err).is_some(), "{err}");
    assert_eq!((took, timeouts), (Duration::from_secs(9), 1));
}

/// What a backend reads of `body`, frame by frame, into `log`, up to its
/// end or its first error.
async fn read_on_into<B>(mut body: B, log: Arc<Mutex<Vec<Result<Bytes, String>>>>)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    while let Some(frame) = body.frame().await {
        let failed = frame.is_err();
        let frame = frame.map(|f| f.into_data().unwrap_or_default());
        log.lock().push(frame.map_err(|e| e.to_string()));
        if failed {
            break;
        }
    }
}

/// A streamed upload through `failover` to `a`, which answers 503 after
/// its first part and reads on, then (`with_b`) to `b`: the response, what
/// `a` read on after its answer, and what `b` received.
async fn read_on_after_a_503(
    failover: FailoverLayer,
    with_b: bool,
) -> (Response<()>, Vec<Result<Bytes, String>>, Bytes) {
    type Body = ReplayBody<BoxBody>;
    let read_on = Arc::new(Mutex::new(Vec::new()));
    let failed = {
        let read_on = read_on.clone();
        service_fn(move |req: Request<Body>| {
            let read_on = read_on.clone();
            async move {
                let mut body = req.into_body();
                let first = body.frame().await.unwrap()?.into_data().unwrap();
                assert_eq!(first, "1234");
                // Answered; the body is still being read.
                tokio::spawn(read_on_into(body, read_on));
                Ok::<_, BoxError>(status(503))
            }
        })
    };
    let received = Arc::new(Mutex::new(Bytes::new()));
    let whole = {
        let received = received.clone();
        service_fn(move |req: Request<Body>| {
            let received = received.clone();
            async move {
                *received.lock() = req.into_body().collect().await?.to_bytes();
                Ok::<_, BoxError>(status(200))
            }
        })
    };
    let pool = Pool::new();
    pool.insert("a", BoxCloneSyncService::new(failed));
    if with_b {
        pool.insert("b", BoxCloneSyncService::new(whole));
    }
    let stack = ServiceBuilder::new()
        .layer(
            BufferBodyLayer::new()
                .limit(8)
                .stream_when_idle(Some(Duration::from_millis(1))),
        )
        .layer(failover)
        .service(Balance::new(pool, RoundRobin::new()));
    let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
    let body = BodyExt::boxed(http_body_util::StreamBody::new(futures::StreamExt::map(
        rx,
        |part| Ok::<_, Infallible>(http_body::Frame::data(part)),
    )));
    let call = tokio::spawn(stack.oneshot(Request::put("/upload").body(body).unwrap()));
    tx.unbounded_send(Bytes::from_static(b"1234")).unwrap();
    // Passed on after 1 ms; a answers 503, and the pause starts.
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Past the limit of what is held for a retry.
    // (Refused once every copy of the body is gone.)
    let _ = tx.unbounded_send(Bytes::from_static(b"56789abcd"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(tx);
    let response = call.await.unwrap().unwrap();
    // What the failed attempt read on has come in by now.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let read_on = read_on.lock().clone();
    let received = received.lock().clone();
    (response, read_on, received)
}

/// A backend that answers 503 part way through a streamed upload may
/// read on (hyper goes on sending a request's body after its answer):
/// the retry's copy of the body is made before the backoff pause, so that
/// the failed attempt's copy stops there and what the client sends during
/// the pause is kept for the retry.
#[tokio::test(start_paused = true)]
async fn a_body_read_on_by_a_failed_attempt_during_a_pause_is_kept_for_the_retry() {
    let pause = FailoverLayer::new().backoff(Backoff::constant(Duration::from_secs(10)));
    let (response, read_on, received) = read_on_after_a_503(pause, true).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(served_by(&response), "b");
    assert_eq!(received, "123456789abcd");
    // The failed attempt's copy stopped at once, having read nothing more.
    assert!(matches!(&read_on[..], [Err(_)]), "{read_on:?}");
}

/// A retry that does not happen leaves the failed attempt's body whole,
/// so that it goes on to its end (its 503 is the answer): one the budget
/// refuses, before a pause or without one (where the copy for it was made
/// before the budget was asked), and one that finds no other backend.
#[tokio::test(start_paused = true)]
async fn a_retry_that_does_not_happen_leaves_the_failed_attempts_body_whole() {
    let refused = || FailoverLayer::new().budget(RetryBudget::new(0.0, 0));
    let pause = Backoff::constant(Duration::from_secs(10));
    for (failover, with_b) in [
        (refused().backoff(pause), true),
        (refused(), true),
        (FailoverLayer::new(), false),
        (FailoverLayer::new().backoff(pause), false),
    ] {
        let (response, read_on, received) = read_on_after_a_503(failover, with_b).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(read_on, [Ok(Bytes::from_static(b"56789abcd"))]);
        assert_eq!(received, "");
    }
}

/// An attempt whose backend answers before it reads any of the body (an
/// HTTP/2 stream waiting for send capacity, say) keeps the body when the
/// attempts end with its answer, also after a retry that found no backend:
/// it reads it on, whole.
#[tokio::test(start_paused = true)]
async fn an_answer_before_any_read_leaves_the_body_to_its_attempt() {
    type Body = ReplayBody<BoxBody>;
    for method in [Method::POST, Method::PUT] {
        let read_on = Arc::new(Mutex::new(Vec::new()));
        let answers_first = {
            let read_on = read_on.clone();
            service_fn(move |req: Request<Body>| {
                let read_on = read_on.clone();
                async move {
                    tokio::spawn(read_on_into(req.into_body(), read_on));
                    Ok::<_, BoxError>(status(503))
                }
            })
        };
        let pool = Pool::new();
        pool.insert("a", BoxCloneSyncService::new(answers_first));
        let stack = ServiceBuilder::new()
            .layer(BufferBodyLayer::new().stream_when_idle(Some(Duration::from_millis(1))))
            .layer(FailoverLayer::new())
            .service(Balance::new(pool, RoundRobin::new()));
        let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
        let body = BodyExt::boxed(http_body_util::StreamBody::new(futures::StreamExt::map(
            rx,
            |part| Ok::<_, Infallible>(http_body::Frame::data(part)),
        )));
        tx.unbounded_send(Bytes::from_static(b"1234")).unwrap();
        // A POST: its 503 ends the attempts; a PUT's retry finds no backend.
        let request = Request::builder().method(method).uri("/upload");
        let response = stack.oneshot(request.body(body).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        tx.unbounded_send(Bytes::from_static(b"5678")).unwrap();
        drop(tx);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let read_on = read_on.lock().clone();
        assert_eq!(
            read_on,
            [
                Ok(Bytes::from_static(b"1234")),
                Ok(Bytes::from_static(b"5678"))
            ]
        );
    }
}

// ---------------------------------------------------------------------------
// Invariants over random fleets.

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Ok),
        Just(Kind::Unavailable),
        Just(Kind::Refused),
        Just(Kind::Reset),
        Just(Kind::ServerError),
        Just(Kind::Invalid),
    ]
}

fn retryable(kind: Kind, method: &Method) -> bool {
    match kind {
        Kind::Refused => true,
        Kind::Unavailable | Kind::Reset => method == Method::GET,
        Kind::Ok | Kind::ServerError | Kind::Invalid => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn no_backend_twice_and_failure_only_when_all_allowed_failed(
        kinds in prop::collection::vec(kind(), 0..8),
        post in any::<bool>(),
        random in any::<bool>(),
        requests in 1usize..4,
    ) {
        let names: Vec<String> = (0..kinds.len()).map(|i| format!("n{i}")).collect();
        let named: Vec<(&str, Kind)> = names.iter().map(String::as_str).zip(kinds.iter().copied()).collect();
        let kind_of = |name: &str| named.iter().find(|(n, _)| *n == name).unwrap().1;
        let method = if post { Method::POST } else { Method::GET };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let log = Log::default();
        let pool = fleet(&named, &log);
        let layer = FailoverLayer::new().no_budget();
        let service: BoxCloneSyncService<Request<Full<Bytes>>, Response<()>, BoxError> = if random {
            BoxCloneSyncService::new(layer.layer(Balance::new(pool, tower_ha::balance::Random::new())))
        } else {
            BoxCloneSyncService::new(layer.layer(Balance::new(pool, RoundRobin::new())))
        };
        for _ in 0..requests {
            log.lock().clear();
            let result = runtime.block_on(service.clone().oneshot(request(method.clone())));
            let tried = log.lock().clone();

            // Never the same backend twice.
            let mut unique = tried.clone();
            unique.sort();
            unique.dedup();
            prop_assert_eq!(unique.len(), tried.len(), "tried {:?}", tried);

            // Every attempt but the last failed in a retryable way.
            for name in tried.iter().take(tried.len().saturating_sub(1)) {
                prop_assert!(retryable(kind_of(name), &method), "{} retried after {:?}", name, kind_of(name));
            }
            let succeeded = matches!(&result, Ok(r) if r.status() == StatusCode::OK);
            // What a backend that ends the attempts answered is the answer:
            // a 500 the classifier takes as no failure, a client's broken
            // upload as its own error.
            match tried.last().map(|n| kind_of(n)) {
                Some(Kind::ServerError) => prop_assert!(
                    matches!(&result, Ok(r) if r.status() == StatusCode::INTERNAL_SERVER_ERROR)
                ),
                Some(Kind::Invalid) => prop_assert!(matches!(
                    &result,
                    Err(e) if find::<tower_ha::error::InvalidRequest>(&**e).is_some()
                )),
                _ => {}
            }
            if succeeded {
                prop_assert_eq!(kind_of(tried.last().unwrap()), Kind::Ok);
            } else {
                // A failure only when every backend it may try has failed:
                // either all were tried, or the last one may not be retried.
                let all_tried = tried.len() == named.len();
                let stopped = tried.last().is_some_and(|n| !retryable(kind_of(n), &method));
                prop_assert!(all_tried || stopped, "gave up after {:?} of {:?}", tried, named);
                prop_assert!(tried.iter().all(|n| kind_of(n) != Kind::Ok));
            }
            // A GET fails with a working backend in the fleet only when an
            // answer that may not be retried came first.
            if method == Method::GET && kinds.contains(&Kind::Ok) && !succeeded {
                let last = kind_of(tried.last().unwrap());
                prop_assert!(matches!(last, Kind::ServerError | Kind::Invalid), "{:?}", last);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// An inner service of your own that speaks the extension protocol.

#[tokio::test]
async fn works_over_any_service_that_honours_attempts_and_names_backends() {
    use tower_ha::BackendError;
    // Tries "x" then "y" in order, skipping those in `Attempts`; "x" fails.
    let own = service_fn(|req: Request<()>| async move {
        let tried = req
            .extensions()
            .get::<Attempts>()
            .cloned()
            .unwrap_or_default();
        let Some(next) = ["x", "y"]
            .into_iter()
            .map(BackendId::from)
            .find(|id| !tried.contains(id))
        else {
            return Err::<Response<()>, BoxError>(Box::new(NoBackend::default()));
        };
        if next.as_str() == "x" {
            return Err(
                BackendError::new(next, io::Error::from(io::ErrorKind::ConnectionReset)).into(),
            );
        }
        let mut response = status(200);
        response.extensions_mut().insert(ServedBy(next));
        Ok(response)
    });
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new())
        .service(own);
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(served_by(&response), "y");
    assert_eq!(history(&response), ["x", "y"]);
}

/// Answers with a `BackendError` from "x", then with `then`, an error that
/// names no backend.
fn naming_x_then(
    then: io::ErrorKind,
) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future = impl Send> + Clone
{
    use tower_ha::BackendError;
    service_fn(move |req: Request<()>| async move {
        if req.extensions().get::<Attempts>().is_none() {
            let reset = io::Error::from(io::ErrorKind::ConnectionReset);
            return Err::<Response<()>, BoxError>(BackendError::new("x".into(), reset).into());
        }
        Err(io::Error::from(then).into())
    })
}

#[tokio::test]
async fn an_error_naming_no_backend_ends_the_attempts_as_any_other_failure() {
    use tower_ha::control::Event;
    let events = tower_ha::control::Events::new(16, 16);
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().no_budget().events(events.clone()))
        .service(naming_x_then(io::ErrorKind::ConnectionAborted));
    let err = service.oneshot(Request::new(())).await.unwrap_err();
    let err = exhausted(&err);
    assert_eq!(ids(&err.backends().cloned().collect::<Vec<_>>()), ["x"]);
    let reason = err.reason().expect("the error is the reason");
    assert_eq!(
        reason.downcast_ref::<io::Error>().unwrap().kind(),
        io::ErrorKind::ConnectionAborted
    );
    match events.history().last().map(|r| r.event.clone()) {
        Some(Event::AttemptsExhausted { tried }) => assert_eq!(tried, [BackendId::from("x")]),
        other => panic!("expected AttemptsExhausted, got {other:?}"),
    }
}

#[tokio::test]
async fn a_failed_response_naming_no_backend_after_failures_ends_with_the_history() {
    // A 503 from "x", then a 503 that names no backend.
    let own = service_fn(|req: Request<()>| async move {
        let mut response = status(503);
        if req.extensions().get::<Attempts>().is_none() {
            response.extensions_mut().insert(ServedBy("x".into()));
        }
        Ok::<_, BoxError>(response)
    });
    let layer = FailoverLayer::new().no_budget();
    let service = ServiceBuilder::new().layer(layer.clone()).service(own);
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(history(&response), ["x"]);
    assert_eq!(layer.stats().exhausted, 1);
}

#[tokio::test]
async fn an_error_naming_no_backend_on_the_first_attempt_is_returned_as_it_is() {
    let own = service_fn(|_req: Request<()>| async {
        Err::<Response<()>, BoxError>(io::Error::from(io::ErrorKind::ConnectionReset).into())
    });
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new())
        .service(own);
    let err = service.oneshot(Request::new(())).await.unwrap_err();
    // Not an `Exhausted` with nothing tried: nothing was failed over, and
    // no backend was found missing.
    assert_eq!(
        err.downcast_ref::<io::Error>().map(io::Error::kind),
        Some(io::ErrorKind::ConnectionReset),
        "{err}"
    );
    assert_eq!(
        tower_ha::error::gateway_status(&*err),
        StatusCode::BAD_GATEWAY
    );
}

#[tokio::test]
async fn failovers_and_exhaustion_are_events_in_the_stream() {
    let events = tower_ha::control::Events::new(16, 16);
    let attempts = Arc::new(AtomicUsize::new(0));
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new().no_budget().events(events.clone()))
        .service(Balance::new(failing_fleet(3, attempts), RoundRobin::new()));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);

    use tower_ha::control::Event;
    let history: Vec<Event> = events.history().iter().map(|r| r.event.clone()).collect();
    let ids = |names: &[&str]| {
        names
            .iter()
            .map(|n| BackendId::from(*n))
            .collect::<Vec<_>>()
    };
    match &history[..] {
        [Event::FailoverAttempt {
            attempt: 2,
            failed: first,
            ..
        }, Event::FailoverAttempt {
            attempt: 3,
            failed: second,
            ..
        }, Event::AttemptsExhausted { tried }] => {
            assert_eq!(tried, &ids(&["b0", "b1", "b2"]));
            assert_eq!([first.clone(), second.clone()], ids(&["b0", "b1"])[..]);
        }
        other => panic!("unexpected events {other:?}"),
    }
}

#[tokio::test]
async fn attempts_that_end_on_a_failed_response_are_an_exhaustion_event() {
    use tower_ha::control::Event;
    let events = tower_ha::control::Events::new(16, 16);
    let service = ServiceBuilder::new()
        .layer(
            FailoverLayer::new()
                .no_budget()
                .max_attempts(2)
                .events(events.clone()),
        )
        .service(Balance::new(
            failing_fleet(3, Arc::new(AtomicUsize::new(0))),
            RoundRobin::new(),
        ));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(history(&response), ["b0", "b1"]);
    let last = events.history().last().map(|r| r.event.clone());
    match last {
        Some(Event::AttemptsExhausted { tried }) => {
            assert_eq!(tried, [BackendId::from("b0"), BackendId::from("b1")]);
        }
        other => panic!("expected AttemptsExhausted, got {other:?}"),
    }
}

/// The response future is `Unpin` when the inner service's future is, with
/// timers or without, so that callers can poll it in place (`poll_unpin`,
/// `select!` on `&mut fut`).
#[tokio::test]
async fn the_response_future_is_unpin_when_the_inner_one_is() {
    fn unpin<T: Unpin>(_: &T) {}
    let inner =
        service_fn(|_req: Request<()>| std::future::ready(Ok::<_, Infallible>(Response::new(()))));
    let timed = FailoverLayer::new()
        .per_try_timeout(Duration::from_secs(1))
        .deadline(Duration::from_secs(2));
    for layer in [FailoverLayer::new(), timed] {
        let mut svc = layer.layer(inner);
        let future = svc.ready().await.unwrap().call(Request::new(()));
        unpin(&future);
        assert_eq!(future.await.unwrap().status(), StatusCode::OK);
    }
}

#[test]
fn a_layer_and_its_service_print_whatever_their_classifier() {
    let only_errors = |outcome: &tower_ha::classify::Outcome<'_>| {
        matches!(outcome, tower_ha::classify::Outcome::Error(_))
    };
    let layer = FailoverLayer::new().classifier(only_errors);
    let printed = format!("{:?}", layer.clone());
    assert!(printed.starts_with("FailoverLayer"), "{printed}");
    assert!(printed.contains("closure"), "{printed}");
    let svc = layer.layer(Pool::<()>::new());
    assert!(format!("{svc:?}").starts_with("Failover"));
}

/// A request whose every backend failed gets the last one's answer, not a
/// refusal: the balancer's refusal of its last attempt is not counted as
/// one. A request refused before it tried any backend is.
#[tokio::test]
async fn the_refusal_that_ends_a_requests_attempts_is_not_counted() {
    let pool = failing_fleet(2, Arc::new(AtomicUsize::new(0)));
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new())
        .service(Balance::new(pool.clone(), RoundRobin::new()));
    let response = service.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(history(&response).len(), 2, "both tried");
    assert_eq!(pool.refusals().unavailable, 0);
    for id in pool.ids() {
        pool.state(&id).unwrap().set_admin(AdminStatus::Disabled);
    }
    service.oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(pool.refusals().unavailable, 1);
}
