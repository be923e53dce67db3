//! `Balance::queue`: requests that wait for a place when every backend is at
//! its limit of requests in flight. Time is paused: instants are exact.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Request, Response};
use tokio::task::JoinHandle;
use tower::{Layer, Service, ServiceExt};
use tower_ha::backend::InFlight;
use tower_ha::balance::{Balance, Pick, RoundRobin, Strategy};
use tower_ha::extensions::{Attempts, ServedBy};
use tower_ha::failover::{Exhausted, FailoverLayer, TimedOut};
use tower_ha::pool::Members;
use tower_ha::{error::find, BackendId, BoxError, HealthStatus, NoBackend, Pool};

type Seen = Arc<Mutex<Vec<String>>>;

/// A backend that answers at once with its name, after writing down the
/// request's body (its label).
#[derive(Clone)]
struct Recording {
    name: &'static str,
    seen: Seen,
}

impl Service<Request<String>> for Recording {
    type Response = Response<&'static str>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<String>) -> Self::Future {
        self.seen.lock().unwrap().push(req.into_body());
        std::future::ready(Ok(Response::new(self.name)))
    }
}

fn recording(name: &'static str, seen: Seen) -> Recording {
    Recording { name, seen }
}

fn request(label: &str) -> Request<String> {
    Request::new(label.to_owned())
}

type Answer = Result<Response<&'static str>, BoxError>;

fn send<S>(balance: &S, label: &str) -> JoinHandle<Answer>
where
    S: Service<Request<String>, Response = Response<&'static str>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    tokio::spawn(balance.clone().oneshot(request(label)))
}

/// Lets every spawned task run until it waits.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn served_by(answer: &Answer) -> &str {
    answer
        .as_ref()
        .unwrap()
        .extensions()
        .get::<ServedBy>()
        .unwrap()
        .0
        .as_str()
}

fn no_backend(answer: &Answer) -> NoBackend {
    match answer {
        Ok(_) => panic!("served, not refused"),
        Err(e) => *find::<NoBackend>(&**e).expect("a NoBackend"),
    }
}

/// A pool of `names`, each limited to one request in flight and each with
/// that place taken by the test.
fn full_pool(names: &[&'static str], seen: &Seen) -> (Pool<Recording>, Vec<InFlight>) {
    let pool = Pool::new();
    let mut held = Vec::new();
    for &name in names {
        pool.insert(name, recording(name, seen.clone()));
        let state = pool.state(&name.into()).unwrap();
        state.set_max_in_flight(Some(1));
        held.push(state.try_track_in_flight().unwrap());
    }
    (pool, held)
}

#[tokio::test(start_paused = true)]
async fn waiting_requests_are_served_in_the_order_they_came() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a"], &seen);
    let balance = Balance::new(pool, RoundRobin::new()).queue(10, Duration::from_secs(5));
    let mut waiting = Vec::new();
    for label in ["1", "2", "3"] {
        waiting.push(send(&balance, label));
        settle().await;
    }
    assert_eq!(balance.waiting(), 3);
    assert!(seen.lock().unwrap().is_empty());

    // One place: each request hands it on to the next when it ends.
    drop(held.pop());
    settle().await;
    assert_eq!(*seen.lock().unwrap(), ["1", "2", "3"]);
    for task in waiting {
        assert_eq!(served_by(&task.await.unwrap()), "a");
    }
    assert_eq!(balance.waiting(), 0);
    let state = balance.pool().state(&"a".into()).unwrap();
    assert_eq!(state.in_flight(), 0);
    assert_eq!(state.requests(), 4, "the test's place and three requests");
}

#[tokio::test(start_paused = true)]
async fn a_place_that_comes_free_goes_to_the_waiting_request_not_a_newcomer() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a"], &seen);
    let mut balance = Balance::new(pool, RoundRobin::new()).queue(10, Duration::from_secs(5));
    let waiter = send(&balance, "waiter");
    settle().await;

    // The place comes free and is handed over before the waiter runs; a
    // request arriving now finds no place and waits behind it.
    drop(held.pop());
    let state = balance.pool().state(&"a".into()).unwrap();
    assert_eq!(state.in_flight(), 1, "handed over, not freed");
    let mut newcomer = pin!(balance.call(request("newcomer")));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(newcomer.as_mut().poll(&mut cx).is_pending());
    assert_eq!(balance.waiting(), 1, "the newcomer waits");

    assert_eq!(served_by(&waiter.await.unwrap()), "a");
    assert_eq!(*seen.lock().unwrap(), ["waiter"]);
    let Poll::Ready(answer) = newcomer.as_mut().poll(&mut cx) else {
        panic!("the newcomer got the place the waiter freed");
    };
    assert_eq!(served_by(&answer), "a");
    assert_eq!(*seen.lock().unwrap(), ["waiter", "newcomer"]);
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_exactly_its_timeout_then_fails_as_a_queue_timeout() {
    let seen = Seen::default();
    let (pool, _held) = full_pool(&["a"], &seen);
    let balance = Balance::new(pool, RoundRobin::new()).queue(10, Duration::from_millis(100));
    let waiter = send(&balance, "waiter");
    settle().await;
    tokio::time::advance(Duration::from_millis(99)).await;
    settle().await;
    assert!(!waiter.is_finished(), "still waiting at 99 ms");
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    assert!(waiter.is_finished(), "given up at 100 ms");
    let refused = no_backend(&waiter.await.unwrap());
    assert!(refused.is_at_limit() && refused.is_queue_timeout());
    assert_eq!(balance.waiting(), 0);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_or_no_queue_refuses_at_once() {
    let seen = Seen::default();
    let (pool, _held) = full_pool(&["a"], &seen);
    let queued = Balance::new(pool.clone(), RoundRobin::new()).queue(1, Duration::from_secs(5));
    let first = send(&queued, "first");
    settle().await;
    assert_eq!(queued.waiting(), 1);

    let mut cx = Context::from_waker(Waker::noop());
    for mut balance in [
        queued.clone(),
        // Over the same pool, without a queue of its own.
        Balance::new(pool.clone(), RoundRobin::new()),
        // A queue turned off with a zero wait.
        Balance::new(pool, RoundRobin::new()).queue(10, Duration::ZERO),
    ] {
        let mut second = pin!(balance.call(request("second")));
        let Poll::Ready(answer) = second.as_mut().poll(&mut cx) else {
            panic!("waited");
        };
        let refused = no_backend(&answer);
        assert!(refused.is_at_limit() && !refused.is_queue_timeout());
    }
    assert_eq!(queued.waiting(), 1);
    assert!(!first.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_place_goes_to_the_first_waiting_request_that_may_use_it() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a", "b"], &seen);
    let balance = Balance::new(pool, RoundRobin::new()).queue(10, Duration::from_secs(5));
    // A retry that already tried "a" waits first.
    let mut retry = request("retry");
    let mut tried = Attempts::new();
    tried.push(BackendId::from("a"));
    retry.extensions_mut().insert(tried);
    let retry = tokio::spawn(balance.clone().oneshot(retry));
    settle().await;
    let plain = send(&balance, "plain");
    settle().await;

    let b = held.pop();
    drop(held.pop()); // "a" comes free: the retry may not go there.
    settle().await;
    assert_eq!(served_by(&plain.await.unwrap()), "a");
    assert!(!retry.is_finished());
    drop(b);
    assert_eq!(served_by(&retry.await.unwrap()), "b");
}

#[tokio::test(start_paused = true)]
async fn a_raised_limit_or_a_new_backend_lets_waiting_requests_in() {
    let seen = Seen::default();
    let (pool, _held) = full_pool(&["a"], &seen);
    let balance = Balance::new(pool.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    let first = send(&balance, "first");
    let second = send(&balance, "second");
    settle().await;
    assert_eq!(balance.waiting(), 2);

    pool.state(&"a".into()).unwrap().set_max_in_flight(Some(2));
    assert_eq!(served_by(&first.await.unwrap()), "a");
    // "a" is full again only while "first" is in flight: "second" got its
    // place when "first" ended.
    assert_eq!(served_by(&second.await.unwrap()), "a");

    pool.state(&"a".into()).unwrap().set_max_in_flight(Some(1));
    let _held_again = pool.state(&"a".into()).unwrap().track_in_flight();
    let third = send(&balance, "third");
    settle().await;
    assert_eq!(balance.waiting(), 1);
    pool.insert("b", recording("b", seen.clone()));
    assert_eq!(served_by(&third.await.unwrap()), "b");
}

/// A change that opens one place without a request ending.
type OpenPlace = fn(&Pool<Recording>, &Seen);

#[tokio::test(start_paused = true)]
async fn a_place_opened_by_a_change_goes_to_the_oldest_waiter_whoever_polls_first() {
    // "b" is out of service, or not in the pool yet, until the change.
    let ways: [(&str, OpenPlace); 4] = [
        ("a raised limit", |pool, _| {
            pool.state(&"a".into()).unwrap().set_max_in_flight(Some(2));
        }),
        ("a backend joining", |pool, seen| {
            let state = Arc::new(tower_ha::BackendState::new(1));
            state.set_max_in_flight(Some(1));
            pool.insert_with_state("b", recording("b", seen.clone()), state);
        }),
        ("a backend recovering", |pool, _| {
            pool.state(&"b".into())
                .unwrap()
                .set_health(HealthStatus::Healthy);
        }),
        ("an ejection lifted", |pool, _| {
            assert!(pool.state(&"b".into()).unwrap().uneject());
        }),
    ];
    for (i, (how, open)) in ways.into_iter().enumerate() {
        let seen = Seen::default();
        let (pool, _held) = full_pool(&["a"], &seen);
        if i >= 2 {
            pool.insert("b", recording("b", seen.clone()));
            let b = pool.state(&"b".into()).unwrap();
            b.set_max_in_flight(Some(1));
            if i == 2 {
                b.set_health(HealthStatus::Unhealthy);
            } else {
                b.eject_until(tokio::time::Instant::now() + Duration::from_secs(30));
            }
        }
        let mut balance = Balance::new(pool.clone(), RoundRobin::new())
            .panic_threshold(0.0)
            .queue(10, Duration::from_secs(5));
        let mut cx = Context::from_waker(Waker::noop());
        let mut older = pin!(balance.call(request("older")));
        assert!(older.as_mut().poll(&mut cx).is_pending(), "{how}");
        let mut newer = pin!(balance.call(request("newer")));
        assert!(newer.as_mut().poll(&mut cx).is_pending(), "{how}");
        assert_eq!(balance.waiting(), 2, "{how}");

        open(&pool, &seen);
        // The newer request runs first, as a scheduler may run it.
        assert!(
            newer.as_mut().poll(&mut cx).is_pending(),
            "{how}: the newer request took the place"
        );
        let Poll::Ready(answer) = older.as_mut().poll(&mut cx) else {
            panic!("{how}: the older request did not get the place");
        };
        answer.unwrap();
        assert_eq!(*seen.lock().unwrap(), ["older"], "{how}");
        // Its end hands the place on.
        assert!(newer.as_mut().poll(&mut cx).is_ready(), "{how}");
        assert_eq!(*seen.lock().unwrap(), ["older", "newer"], "{how}");
    }
}

/// An ejection that runs out is no event anyone sends: the waiting
/// requests that may use its backend get its places at its end, in the
/// order they came, whichever runs first, rather than wait out their
/// timeout.
#[tokio::test(start_paused = true)]
async fn waiting_requests_take_a_backend_whose_ejection_runs_out_in_order() {
    let seen = Seen::default();
    let (pool, _held) = full_pool(&["a"], &seen);
    pool.insert("b", recording("b", seen.clone()));
    let b = pool.state(&"b".into()).unwrap();
    b.set_max_in_flight(Some(1));
    let start = tokio::time::Instant::now();
    b.eject_until(start + Duration::from_secs(2));
    let mut balance = Balance::new(pool.clone(), RoundRobin::new())
        .panic_threshold(0.0)
        .queue(10, Duration::from_secs(5));
    let mut cx = Context::from_waker(Waker::noop());
    let mut older = pin!(balance.call(request("older")));
    assert!(older.as_mut().poll(&mut cx).is_pending());
    let mut newer = pin!(balance.call(request("newer")));
    assert!(newer.as_mut().poll(&mut cx).is_pending());
    assert_eq!(balance.waiting(), 2);

    tokio::time::advance(Duration::from_millis(1999)).await;
    assert!(newer.as_mut().poll(&mut cx).is_pending());
    assert!(older.as_mut().poll(&mut cx).is_pending());
    assert!(seen.lock().unwrap().is_empty(), "still ejected");

    tokio::time::advance(Duration::from_millis(1)).await;
    // The newer request runs first, as a scheduler may run it.
    assert!(
        newer.as_mut().poll(&mut cx).is_pending(),
        "the newer request took the place"
    );
    let Poll::Ready(answer) = older.as_mut().poll(&mut cx) else {
        panic!("the older request did not get the place");
    };
    assert_eq!(served_by(&answer), "b");
    assert_eq!(*seen.lock().unwrap(), ["older"]);
    // Its end hands the place on.
    let Poll::Ready(answer) = newer.as_mut().poll(&mut cx) else {
        panic!("the newer request did not get the place the older one left");
    };
    assert_eq!(served_by(&answer), "b");
    assert_eq!(balance.waiting(), 0);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

/// One way to take a backend out of service.
type MakeUnavailable = fn(&tower_ha::BackendState);

#[tokio::test(start_paused = true)]
async fn a_request_stops_waiting_when_no_backend_could_take_it() {
    let ways: [(&str, MakeUnavailable); 2] = [
        ("unhealthy", |state| {
            state.set_health(HealthStatus::Unhealthy);
        }),
        ("ejected", |state| {
            state.eject_until(tokio::time::Instant::now() + Duration::from_secs(30));
        }),
    ];
    for (how, make_unavailable) in ways {
        let seen = Seen::default();
        let (pool, _held) = full_pool(&["a"], &seen);
        let balance = Balance::new(pool.clone(), RoundRobin::new())
            .panic_threshold(0.0)
            .queue(10, Duration::from_secs(5));
        let waiter = send(&balance, "waiter");
        settle().await;
        make_unavailable(&pool.state(&"a".into()).unwrap());
        settle().await;
        assert!(waiter.is_finished(), "refused when its backend was {how}");
        let refused = no_backend(&waiter.await.unwrap());
        assert!(!refused.is_at_limit(), "{how}");
        assert_eq!(balance.waiting(), 0, "{how}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_after_its_place_was_handed_over_passes_it_on() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a"], &seen);
    let mut balance = Balance::new(pool, RoundRobin::new()).queue(10, Duration::from_secs(5));
    let mut cx = Context::from_waker(Waker::noop());
    let mut first = Box::pin(balance.call(request("first")));
    assert!(first.as_mut().poll(&mut cx).is_pending());
    let second = send(&balance, "second");
    settle().await;
    assert_eq!(balance.waiting(), 2);

    drop(held.pop()); // Handed to "first", which its client then drops.
    assert_eq!(balance.waiting(), 1);
    drop(first);
    assert_eq!(served_by(&second.await.unwrap()), "a");
    assert_eq!(*seen.lock().unwrap(), ["second"]);
    let a = balance.pool().state(&"a".into()).unwrap();
    assert_eq!(a.in_flight(), 0);
    assert_eq!(
        a.requests(),
        2,
        "the test's place and \"second\"; not the dropped one"
    );
}

/// A backend taken out of rotation after a place on it was handed to a
/// waiting request, before the request ran, does not get the request: the
/// place is let go and the request waits for another.
#[tokio::test(start_paused = true)]
async fn a_place_on_a_backend_disabled_since_it_was_handed_over_is_let_go() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a", "b"], &seen);
    let mut balance =
        Balance::new(pool.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    let mut cx = Context::from_waker(Waker::noop());
    let mut waiter = pin!(balance.call(request("waiter")));
    assert!(waiter.as_mut().poll(&mut cx).is_pending());
    let a = pool.state(&"a".into()).unwrap();

    let b = held.pop();
    drop(held.pop()); // Handed to the waiter, which has not run since.
    assert_eq!(a.in_flight(), 1, "handed over");
    a.set_admin(tower_ha::AdminStatus::Disabled);
    assert!(waiter.as_mut().poll(&mut cx).is_pending(), "\"b\" is full");
    assert_eq!(a.in_flight(), 0, "let go");
    drop(b);
    let Poll::Ready(answer) = waiter.as_mut().poll(&mut cx) else {
        panic!("\"b\" came free");
    };
    assert_eq!(served_by(&answer), "b");
    assert_eq!(*seen.lock().unwrap(), ["waiter"]);
}

#[tokio::test(start_paused = true)]
async fn a_place_on_a_backend_that_left_the_pool_is_let_go() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a", "b"], &seen);
    let balance = Balance::new(pool.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    let first = send(&balance, "first");
    settle().await;
    let second = send(&balance, "second");
    settle().await;
    let a = pool.state(&"a".into()).unwrap();
    assert!(pool.remove(&"a".into()));
    settle().await;
    assert!(
        !first.is_finished() && !second.is_finished(),
        "\"b\" is still full"
    );

    // "a"'s place comes free: not handed to a waiter, since "a" is no
    // longer in the pool; both wait on.
    let b = held.pop();
    drop(held.pop());
    settle().await;
    assert_eq!(balance.waiting(), 2, "both wait again");
    assert_eq!(a.in_flight(), 0, "let go");
    assert_eq!(
        a.requests(),
        1,
        "only the test's own place counted as a request"
    );
    drop(b);
    assert_eq!(served_by(&first.await.unwrap()), "b");
    assert_eq!(served_by(&second.await.unwrap()), "b");
    assert_eq!(*seen.lock().unwrap(), ["first", "second"]);
}

/// A backend that leaves the pool and comes back with its state (as
/// discovery brings back an address missing from one answer) takes the
/// waiting requests again: the place freed while it was away was not
/// handed to them, so none of them gave up on it.
#[tokio::test(start_paused = true)]
async fn a_backend_back_with_its_state_takes_the_waiting_requests() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a", "b"], &seen);
    let balance = Balance::new(pool.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    let waiter = send(&balance, "waiter");
    settle().await;
    let a = pool.state(&"a".into()).unwrap();
    assert!(pool.remove(&"a".into()));
    settle().await;

    // A request that was in flight on "a" ends while it is away.
    let _b = held.pop();
    drop(held.pop());
    settle().await;
    assert_eq!(balance.waiting(), 1);
    assert_eq!(a.in_flight(), 0);

    pool.insert_with_state("a", recording("a", seen.clone()), a);
    assert_eq!(served_by(&waiter.await.unwrap()), "a");
    assert_eq!(*seen.lock().unwrap(), ["waiter"]);
}

/// Takes the only place on `a`, sends `label` through `balance`, which
/// waits, and frees the place: the request is handed it at once.
async fn waits_for_the_place_it_is_handed(
    balance: &Balance<Recording, RoundRobin>,
    a: &Arc<tower_ha::BackendState>,
    label: &str,
) {
    let start = tokio::time::Instant::now();
    let held = a.try_track_in_flight().unwrap();
    let waiter = send(balance, label);
    settle().await;
    assert_eq!(balance.waiting(), 1);
    drop(held);
    assert_eq!(served_by(&waiter.await.unwrap()), "a");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "{label} waited for a timeout"
    );
}

/// A backend's state taken into a second pool with its own queue (a
/// reload): its places go to the queue of each pool that holds it, while
/// both live and once the first is gone, and no longer to a pool it left.
#[tokio::test(start_paused = true)]
async fn a_state_shared_by_two_queued_pools_serves_the_queue_of_each() {
    let seen = Seen::default();
    let (old, mut held) = full_pool(&["a"], &seen);
    let old_balance =
        Balance::new(old.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    let a = old.state(&"a".into()).unwrap();
    let new = Pool::new();
    new.insert_with_state("a", recording("a", seen.clone()), a.clone());
    let new_balance =
        Balance::new(new.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    let start = tokio::time::Instant::now();

    // Both pools live: a waiter of each is served as places free up (the
    // queue the backend joined first is offered each place first).
    let in_new = send(&new_balance, "new");
    settle().await;
    let in_old = send(&old_balance, "old");
    settle().await;
    assert_eq!((old_balance.waiting(), new_balance.waiting()), (1, 1));
    drop(held.pop());
    settle().await;
    assert_eq!(served_by(&in_new.await.unwrap()), "a");
    assert_eq!(served_by(&in_old.await.unwrap()), "a");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "a waiter waited for a timeout"
    );

    // The old pool gone: the new one's waiters get every place.
    drop((old_balance, old));
    waits_for_the_place_it_is_handed(&new_balance, &a, "after").await;

    // A pool the backend left no longer hears of its places (its queue
    // would not hand them out anyway); the pool it is back in does.
    assert!(new.remove(&"a".into()));
    let third = Pool::new();
    third.insert_with_state("a", recording("a", seen.clone()), a.clone());
    let third_balance =
        Balance::new(third.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    waits_for_the_place_it_is_handed(&third_balance, &a, "third").await;
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "a waiter waited for a timeout"
    );
    assert_eq!(*seen.lock().unwrap(), ["old", "new", "after", "third"]);
}

#[tokio::test(start_paused = true)]
async fn a_tried_backend_that_joins_the_pool_again_is_still_tried() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a", "b"], &seen);
    let balance = Balance::new(pool.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    // A retry that tried "c", which has left the pool meanwhile (a DNS
    // answer without it).
    let mut retry = request("retry");
    let mut tried = Attempts::new();
    tried.push(BackendId::from("c"));
    retry.extensions_mut().insert(tried);
    let retry = tokio::spawn(balance.clone().oneshot(retry));
    settle().await;
    assert_eq!(balance.waiting(), 1);

    // "c" comes back, with a new state and room: still not for this
    // request.
    pool.insert("c", recording("c", seen.clone()));
    settle().await;
    assert!(!retry.is_finished(), "sent to the backend it tried");
    assert_eq!(balance.waiting(), 1);
    drop(held.pop());
    assert_eq!(served_by(&retry.await.unwrap()), "b");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_follows_the_pool_into_panic() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a", "b"], &seen);
    let balance = Balance::new(pool.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    let waiter = send(&balance, "waiter");
    settle().await;
    // Every backend unhealthy: below the panic threshold, requests go to
    // them anyway, and so does the one waiting for a place.
    for id in ["a", "b"] {
        pool.state(&id.into())
            .unwrap()
            .set_health(HealthStatus::Unhealthy);
    }
    settle().await;
    assert!(!waiter.is_finished(), "refused, though the pool panics");
    drop(held.pop());
    assert_eq!(served_by(&waiter.await.unwrap()), "b");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_follows_the_pool_into_panic_at_once() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a", "b", "c"], &seen);
    let state = |id: &str| pool.state(&id.into()).unwrap();
    state("c").set_health(HealthStatus::Unhealthy);
    let balance = Balance::new(pool.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    let waiter = send(&balance, "waiter");
    settle().await;
    assert_eq!(balance.waiting(), 1);
    // In the same instant (the pool's count of available backends, cached
    // for a millisecond, is stale): one of three available, the pool
    // panics, and the place that comes free on unhealthy `b` is the
    // waiting request's.
    state("b").set_health(HealthStatus::Unhealthy);
    settle().await;
    drop(held.remove(1));
    settle().await;
    assert!(
        waiter.is_finished(),
        "still waiting, though the pool panics"
    );
    assert_eq!(served_by(&waiter.await.unwrap()), "b");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_leaves_panic_with_the_pool() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a", "b", "c"], &seen);
    let state = |id: &str| pool.state(&id.into()).unwrap();
    state("b").set_health(HealthStatus::Unhealthy);
    state("c").set_health(HealthStatus::Unhealthy);
    let balance = Balance::new(pool.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    let waiter = send(&balance, "waiter");
    settle().await;
    assert_eq!(balance.waiting(), 1);
    // `c` recovers: two of three available, no more panic. A place comes
    // free on unhealthy `b` before the waiting request runs again: it is
    // not handed to it.
    state("c").set_health(HealthStatus::Healthy);
    drop(held.remove(1));
    settle().await;
    assert!(!waiter.is_finished(), "sent to an unhealthy backend");
    assert_eq!(state("b").in_flight(), 0);
    drop(held.remove(0));
    assert_eq!(served_by(&waiter.await.unwrap()), "a");
    assert!(seen.lock().unwrap().iter().all(|label| label == "waiter"));
}

#[tokio::test(start_paused = true)]
async fn a_new_panic_threshold_counts_for_waiting_requests() {
    let seen = Seen::default();
    let (pool, mut held) = full_pool(&["a", "b"], &seen);
    for id in ["a", "b"] {
        pool.state(&id.into())
            .unwrap()
            .set_health(HealthStatus::Unhealthy);
    }
    let balance = Balance::new(pool.clone(), RoundRobin::new()).queue(10, Duration::from_secs(5));
    let waiter = send(&balance, "waiter");
    settle().await;
    assert_eq!(balance.waiting(), 1);
    // Panic routing turned off: nothing is left for the waiting request.
    let _ = balance.clone().panic_threshold(0.0);
    settle().await;
    assert!(
        waiter.is_finished(),
        "still waiting for an unhealthy backend"
    );
    no_backend(&waiter.await.unwrap());
    held.clear();
}

#[tokio::test(start_paused = true)]
async fn a_failover_per_try_timeout_counts_the_wait() {
    let seen = Seen::default();
    let (pool, _held) = full_pool(&["a"], &seen);
    let balance = Balance::new(pool, RoundRobin::new()).queue(10, Duration::from_secs(5));
    let failover = FailoverLayer::new()
        .per_try_timeout(Duration::from_millis(50))
        .layer(balance.clone());
    let started = tokio::time::Instant::now();
    let answer = failover.oneshot(request("r")).await;
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    let err = answer.unwrap_err();
    let exhausted = err.downcast_ref::<Exhausted>().expect("attempts ended");
    // No backend was picked: nothing to fail over from.
    assert_eq!(exhausted.backends().count(), 0);
    assert!(
        exhausted.reason().is_some_and(|r| r.is::<TimedOut>()),
        "{err}"
    );
    assert_eq!(balance.waiting(), 0, "left the queue when abandoned");
    assert!(seen.lock().unwrap().is_empty());
}

/// A backend that takes a few turns of the scheduler to answer, and
/// records the most requests it ever had at once.
#[derive(Clone)]
struct Busy {
    name: &'static str,
    now: Arc<AtomicUsize>,
    busiest: Arc<AtomicUsize>,
}

impl Service<Request<String>> for Busy {
    type Response = Response<&'static str>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<String>) -> Self::Future {
        let Busy { name, now, busiest } = self.clone();
        Box::pin(async move {
            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
            busiest.fetch_max(n, Ordering::SeqCst);
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            now.fetch_sub(1, Ordering::SeqCst);
            Ok(Response::new(name))
        })
    }
}

/// Many threads through a queue in front of two backends limited to two
/// requests each: every request is served, and no backend ever has more
/// than its limit at once. A lost wake-up would leave requests waiting
/// until their (long) timeout, and the hang guard would fail the test.
#[test]
fn concurrent_waiting_requests_are_all_served_within_the_limits() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let pool = Pool::new();
    let busiest = Arc::new(AtomicUsize::new(0));
    for name in ["a", "b"] {
        pool.insert(
            name,
            Busy {
                name,
                now: Arc::new(AtomicUsize::new(0)),
                busiest: busiest.clone(),
            },
        );
        pool.state(&name.into()).unwrap().set_max_in_flight(Some(2));
    }
    let balance = Balance::new(pool, RoundRobin::new()).queue(1000, Duration::from_secs(3600));
    runtime.block_on(async {
        let tasks: Vec<_> = (0..16)
            .map(|t| {
                let balance = balance.clone();
                tokio::spawn(async move {
                    for i in 0..200 {
                        let answer = balance.clone().oneshot(request(&format!("{t}-{i}"))).await;
                        assert!(answer.is_ok(), "{:?}", answer.err());
                    }
                })
            })
            .collect();
        let all = futures::future::try_join_all(tasks);
        tokio::time::timeout(Duration::from_secs(120), all)
            .await
            .expect("every request served")
            .unwrap();
    });
    assert!(busiest.load(Ordering::SeqCst) <= 2);
    assert_eq!(balance.waiting(), 0);
    for name in ["a", "b"] {
        assert_eq!(balance.pool().state(&name.into()).unwrap().in_flight(), 0);
    }
}

/// Round robin, with a hook that runs while the pool rebuilds its
/// balancers' tables: after the pool's readers see a change and before
/// the queue hears of it.
struct Hooked {
    inner: RoundRobin,
    hook: Hook,
}

type Hook = Arc<Mutex<Option<Box<dyn FnMut(&Members) + Send>>>>;

impl Strategy for Hooked {
    type Table = <RoundRobin as Strategy>::Table;

    fn build(&self, members: &Members) -> Self::Table {
        if let Some(hook) = self.hook.lock().unwrap().as_mut() {
            hook(members);
        }
        self.inner.build(members)
    }

    fn pick(&self, table: &Self::Table, pick: &Pick<'_>) -> Option<usize> {
        self.inner.pick(table, pick)
    }
}

/// A place that opens on a backend while the pool is removing it is not
/// handed to a waiting request, which would find no such backend, hand the
/// place back and be given it again, spinning until the queue heard of the
/// removal. Run on a thread of its own, so that a spin fails the test
/// instead of hanging it.
#[test]
fn a_place_on_a_backend_being_removed_is_not_handed_over() {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let answer = runtime.block_on(async {
            let seen = Seen::default();
            let (pool, mut held) = full_pool(&["a", "b"], &seen);
            let hook: Hook = Arc::default();
            let strategy = Hooked {
                inner: RoundRobin::new(),
                hook: hook.clone(),
            };
            let balance = Balance::new(pool.clone(), strategy).queue(10, Duration::from_secs(5));
            let waiter = Arc::new(Mutex::new(Box::pin(balance.clone().oneshot(request("w")))));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(waiter.lock().unwrap().as_mut().poll(&mut cx).is_pending());
            assert_eq!(balance.waiting(), 1);

            // While "a" leaves the pool, its request in flight ends and the
            // waiter is polled.
            let on_a = held.remove(0);
            let mut on_a = Some(on_a);
            *hook.lock().unwrap() = Some(Box::new({
                let waiter = waiter.clone();
                move |members: &Members| {
                    if members.iter().all(|m| m.id().as_str() != "a") {
                        drop(on_a.take());
                        let mut cx = Context::from_waker(Waker::noop());
                        assert!(waiter.lock().unwrap().as_mut().poll(&mut cx).is_pending());
                    }
                }
            }));
            assert!(pool.remove(&"a".into()));
            *hook.lock().unwrap() = None;

            drop(held.pop());
            std::future::poll_fn(|cx| waiter.lock().unwrap().as_mut().poll(cx)).await
        });
        let _ = done.send(served_by(&answer).to_owned());
    });
    let served = result
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiting request spun on a place it could not use");
    assert_eq!(served, "b");
}

/// Round robin, but a place held on a backend is let go while it picks: a
/// request elsewhere ends between the pick and the balancer's look at why
/// nothing was placed.
struct FreesWhilePicking {
    inner: RoundRobin,
    held: Mutex<Vec<InFlight>>,
}

impl Strategy for FreesWhilePicking {
    type Table = <RoundRobin as Strategy>::Table;

    fn build(&self, members: &Members) -> Self::Table {
        self.inner.build(members)
    }

    fn pick(&self, table: &Self::Table, pick: &Pick<'_>) -> Option<usize> {
        let picked = self.inner.pick(table, pick);
        self.held.lock().unwrap().clear();
        picked
    }
}

/// Backend "a", full, under a strategy that frees its place while it
/// picks.
fn freed_while_picking(seen: &Seen) -> (Pool<Recording>, FreesWhilePicking) {
    let (pool, held) = full_pool(&["a"], seen);
    let strategy = FreesWhilePicking {
        inner: RoundRobin::new(),
        held: Mutex::new(held),
    };
    (pool, strategy)
}

/// A place that opens as the strategy finds every backend full is no
/// reason to refuse the request as if none could take it: the request
/// waits in the queue, which gives it that place at once.
#[tokio::test(start_paused = true)]
async fn a_place_freed_during_the_pick_is_waited_for_not_refused() {
    let seen = Seen::default();
    let (pool, strategy) = freed_while_picking(&seen);
    let balance = Balance::new(pool, strategy).queue(10, Duration::from_secs(5));
    let answer = send(&balance, "r").await.unwrap();
    assert_eq!(served_by(&answer), "a");
    assert_eq!(*seen.lock().unwrap(), ["r"]);
}

/// Without a queue, such a request is refused as one that found every
/// backend at its limit, not as one that found no backend at all.
#[tokio::test(start_paused = true)]
async fn a_place_freed_during_the_pick_reads_as_at_limit_without_a_queue() {
    let seen = Seen::default();
    let (pool, strategy) = freed_while_picking(&seen);
    let balance = Balance::new(pool, strategy);
    let answer = send(&balance, "r").await.unwrap();
    assert!(no_backend(&answer).is_at_limit());
}
