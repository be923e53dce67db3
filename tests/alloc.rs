//! Heap allocations per request in `Balance::call`, counted by a global
//! allocator on the measuring thread only.
//!
//! The pick (snapshot load, strategy, affinity, attempts) and the response
//! future allocate nothing. The protocol values `Target` (request) and
//! `ServedBy` (response) are stored in `http::Extensions`, which boxes every
//! value it holds (and allocates its map on first use): those allocations
//! belong to `http`, and the test checks that `Balance` makes no others,
//! on bare requests and on requests that carry `Affinity` and `Attempts`
//! (as behind the sticky and failover layers). The clone of the picked
//! backend that `Balance` drives is the backend's own: `HttpBackend`'s
//! allocates nothing either.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;
use tower_ha::balance::{Balance, ConsistentHash, RoundRobin, Strategy};
use tower_ha::extensions::{Affinity, Attempts, ServedBy, Target};
use tower_ha::{key, BackendState, Pool};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

/// A backend that answers at once without allocating.
#[derive(Clone)]
struct Ok200;

impl Service<Request<()>> for Ok200 {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

const CALLS: usize = 1000;

/// A request with no extensions, keyed by `x-user` when `with_key`.
fn bare(with_key: bool) -> impl Fn(usize) -> Request<()> {
    move |i| {
        let mut b = Request::builder();
        if with_key {
            b = b.header("x-user", format!("user-{}", i % 97));
        }
        b.body(()).unwrap()
    }
}

/// A keyed request whose session lives on one backend, after a failed
/// attempt on another: what `Balance` sees behind sticky and failover.
fn with_affinity(i: usize) -> Request<()> {
    let mut req = bare(true)(i);
    req.extensions_mut()
        .insert(Affinity(format!("b{}", i % 8).into()));
    req.extensions_mut()
        .insert(Attempts::from_iter([format!("b{}", (i + 1) % 8).into()]));
    req
}

/// Allocations of `CALLS` steady-state calls (requests built beforehand).
fn per_call<P: Strategy>(
    balance: &mut Balance<Ok200, P>,
    make: impl Fn(usize) -> Request<()>,
) -> f64 {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    // Warm up: thread-local generators, lazily built tables.
    for i in 0..100 {
        let mut fut = balance.call(make(i));
        assert!(matches!(
            Pin::new(&mut fut).poll(&mut cx),
            Poll::Ready(Ok(_))
        ));
    }
    let requests: Vec<_> = (0..CALLS).map(&make).collect();
    let mut responses = Vec::with_capacity(CALLS);
    let before = allocations();
    for req in requests {
        assert!(balance.poll_ready(&mut cx).is_ready());
        let mut fut = balance.call(req);
        match Pin::new(&mut fut).poll(&mut cx) {
            Poll::Ready(Ok(resp)) => responses.push(resp),
            _ => panic!("an always-ready backend answers at once"),
        }
    }
    let after = allocations();
    drop(responses);
    (after - before) as f64 / CALLS as f64
}

/// What storing the two protocol values costs by itself, on requests made
/// by `make` and responses like the ones Balance sees.
fn protocol_cost(make: impl Fn(usize) -> Request<()>) -> f64 {
    let state = Arc::new(BackendState::new(1));
    let id: tower_ha::BackendId = "b0".into();
    let requests: Vec<_> = (0..CALLS).map(make).collect();
    let mut kept = Vec::with_capacity(2 * CALLS);
    let before = allocations();
    for mut req in requests {
        req.extensions_mut()
            .insert(Target::new(id.clone(), state.clone()));
        let mut resp = Response::new(());
        resp.extensions_mut().insert(ServedBy(id.clone()));
        kept.push((req, resp));
    }
    let after = allocations();
    drop(kept);
    (after - before) as f64 / CALLS as f64
}

fn pool() -> Pool<Ok200> {
    (0..8).map(|i| (format!("b{i}"), Ok200)).collect()
}

#[test]
fn balance_allocates_nothing_beyond_the_protocol_extensions() {
    let protocol = protocol_cost(bare(false));
    // Target: map box + table + value; ServedBy: the same on the response.
    assert_eq!(
        protocol, 6.0,
        "http::Extensions changed its allocation pattern"
    );

    let mut rr = Balance::new(pool(), RoundRobin::new());
    assert_eq!(per_call(&mut rr, bare(false)), protocol, "round robin");

    let mut ring = Balance::new(pool(), ConsistentHash::ring(key::header("x-user")));
    assert_eq!(per_call(&mut ring, bare(true)), protocol, "ring");

    let mut maglev = Balance::new(pool(), ConsistentHash::maglev(key::header("x-user")));
    assert_eq!(per_call(&mut maglev, bare(true)), protocol, "maglev");
}

#[test]
fn affinity_and_attempts_allocate_nothing_beyond_the_protocol_extensions() {
    let protocol = protocol_cost(with_affinity);
    // The request's map exists: Target costs its value's box alone.
    assert_eq!(
        protocol, 4.0,
        "http::Extensions changed its allocation pattern"
    );

    let mut rr = Balance::new(pool(), RoundRobin::new());
    assert_eq!(per_call(&mut rr, with_affinity), protocol, "round robin");

    let mut maglev = Balance::new(pool(), ConsistentHash::maglev(key::header("x-user")));
    assert_eq!(per_call(&mut maglev, with_affinity), protocol, "maglev");
}

/// `Balance` clones the backend it picks for each request: the proxy's
/// own backend, `HttpBackend` under a base path and behind the health
/// layer, clones without allocating.
#[cfg(feature = "hyper-client")]
#[test]
fn the_proxys_backend_clones_without_allocating() {
    use tower::Layer;
    let client = tower_ha::http::HttpClient::<http_body_util::Empty<bytes::Bytes>>::new();
    let backend = tower_ha::http::HttpBackend::new(&client, "http://10.0.0.5:8080/api/v2")
        .unwrap()
        .host(http::uri::Authority::from_static("app.example"));
    let backend = tower_ha::health::HealthLayer::new().layer(backend);
    // The first clone of a parsed host shares its bytes from then on.
    drop(backend.clone());
    let mut clones = Vec::with_capacity(CALLS);
    let before = allocations();
    for _ in 0..CALLS {
        clones.push(backend.clone());
    }
    let after = allocations();
    drop(clones);
    assert_eq!(after - before, 0);
}
