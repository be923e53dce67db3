//! A sticky hit (cookie parse, MAC verify, table lookup) through
//! `Sticky → Balance`, against `Balance` alone and tower's `p2c::Balance`,
//! in the same run. Futures are driven with a no-op waker, not a runtime:
//! every backend answers at once, so what is measured is the layers.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderValue, Request, Response};
use tower::{Service, ServiceBuilder};
use tower_ha::balance::{Balance, BalanceLayer, RoundRobin};
use tower_ha::sticky::{CookieInsert, SessionKey, StickyLayer};
use tower_ha::Pool;

fn backend() -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<()>, Infallible>>,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(|_req: Request<()>| std::future::ready(Ok(Response::new(()))))
}

fn block<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

fn call<S: Service<Request<()>>>(svc: &mut S, req: Request<()>) -> Result<S::Response, S::Error> {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(r) = svc.poll_ready(&mut cx) {
            r?;
            break;
        }
    }
    block(svc.call(req))
}

/// The same request for every contender: a browser's `Cookie` header and
/// an `X-Session-Id` header (each stack reads what it routes by).
fn request(cookie: &HeaderValue) -> Request<()> {
    let mut req = Request::new(());
    req.headers_mut().insert(COOKIE, cookie.clone());
    req.headers_mut()
        .insert(SESSION_HEADER, HeaderValue::from_static("kernel-0042"));
    req
}

const SESSION_HEADER: http::HeaderName = http::HeaderName::from_static("x-session-id");

fn bench(c: &mut Criterion) {
    let pool = Pool::new();
    for name in ["a", "b", "c"] {
        pool.insert(name, backend());
    }
    let mut balance = Balance::new(pool.clone(), RoundRobin::new());

    let cookie = CookieInsert::new("srv", [7u8; 32]).secure(false);
    let mut sticky = ServiceBuilder::new()
        .layer(StickyLayer::new(&pool, SessionKey::insert_cookie(cookie)))
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(pool.clone());
    let first = call(&mut sticky, Request::new(())).unwrap();
    let set = first.headers()[SET_COOKIE].to_str().unwrap();
    let pair = set.split(';').next().unwrap();
    // A browser's Cookie header: a few other cookies around ours.
    let cookie_header =
        HeaderValue::try_from(format!("_ga=GA1.2.3456; theme=dark; {pair}; lang=en")).unwrap();

    let mut by_header = ServiceBuilder::new()
        .layer(StickyLayer::new(&pool, SessionKey::header("x-session-id")))
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(pool.clone());
    let session_header = http::HeaderName::from_static("x-session-id");
    let header_req = || {
        let mut req = request(&cookie_header);
        req.headers_mut().insert(
            session_header.clone(),
            HeaderValue::from_static("kernel-0042"),
        );
        req
    };
    call(&mut by_header, header_req()).unwrap();

    let services: Vec<_> = (0..3)
        .map(|_| tower::load::Constant::new(backend(), 0))
        .collect();
    let mut p2c = tower::balance::p2c::Balance::new(tower::discover::ServiceList::new(services));

    let mut group = c.benchmark_group("sticky");
    group.bench_function("balance_alone", |b| {
        b.iter(|| black_box(call(&mut balance, request(&cookie_header)).unwrap()))
    });
    group.bench_function("sticky_cookie_hit", |b| {
        b.iter(|| {
            let res = call(&mut sticky, request(&cookie_header)).unwrap();
            debug_assert!(res.headers().get(SET_COOKIE).is_none());
            black_box(res)
        })
    });
    group.bench_function("sticky_header_hit", |b| {
        b.iter(|| black_box(call(&mut by_header, request(&cookie_header)).unwrap()))
    });
    group.bench_function("tower_p2c", |b| {
        b.iter(|| black_box(call(&mut p2c, request(&cookie_header)).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
