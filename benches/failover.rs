//! The cost of failover on the success path: `Failover` over `Balance`,
//! against `Balance` alone and tower's `p2c::Balance` alone, in one run.
//!
//! Every service is driven with a no-op waker, without a runtime, so the
//! anchor and tower-ha are measured alike: `poll_ready` until ready, `call`,
//! then poll the response future until it completes.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use tower::Service;
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::failover::FailoverLayer;
use tower_ha::Pool;

mod support;

const BACKENDS: usize = 8;

type Body = Full<Bytes>;

/// A backend that answers at once.
#[derive(Clone, Debug)]
struct Backend;

impl Service<Request<Body>> for Backend {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Body>) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

fn request() -> Request<Body> {
    support::parsed(
        "GET http://service.internal/api/v1/orders?page=2 HTTP/1.1\r\n\
         host: service.internal\r\nuser-agent: bench/1.0\r\naccept: application/json\r\n\
         x-request-id: 7f3c1a2b-0000-4000-8000-000000000042\r\n\r\n",
    )
    .map(|()| Full::new(Bytes::from_static(b"{\"order\":42}")))
}

/// [`support::drive`] with a no-op waker.
fn drive<S>(service: &mut S, req: Request<Body>) -> S::Response
where
    S: Service<Request<Body>>,
    S::Error: std::fmt::Debug,
{
    support::drive(service, req, &mut Context::from_waker(Waker::noop()))
}

fn pool() -> Pool<Backend> {
    support::pool_of(BACKENDS, Backend)
}

fn success_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("failover/success");

    let mut p2c = support::p2c(BACKENDS, Backend);
    group.bench_function("tower_p2c", |b| {
        b.iter_batched(
            request,
            |req| black_box(drive(&mut p2c, req)),
            BatchSize::SmallInput,
        )
    });

    let mut balance = Balance::new(pool(), RoundRobin::new());
    group.bench_function("balance", |b| {
        b.iter_batched(
            request,
            |req| black_box(drive(&mut balance, req)),
            BatchSize::SmallInput,
        )
    });

    let mut failover = tower::Layer::layer(
        &FailoverLayer::new(),
        Balance::new(pool(), RoundRobin::new()),
    );
    group.bench_function("failover_balance", |b| {
        b.iter_batched(
            request,
            |req| black_box(drive(&mut failover, req)),
            BatchSize::SmallInput,
        )
    });

    group.finish();
}

criterion_group!(benches, success_path);
criterion_main!(benches);
