//! Per-request cost of `Balance` with each strategy against tower's
//! `p2c::Balance`, and hash lookups against pingora-ketama and hashring, over
//! the same backends and keys in the same run.
//!
//! Futures are driven with a no-op waker, not a runtime, so each side is
//! measured alike: `poll_ready`, `call`, and one poll of an always-ready
//! backend's response future.
//!
//! cargo bench --bench balance

// Wall-clock time is what a benchmark measures.
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{Request, Response};
use tower::Service;
use tower_ha::balance::{
    Balance, ConsistentHash, LeastRequest, Pick, Random, RoundRobin, Strategy, WeightedRoundRobin,
};
use tower_ha::key::{self, RequestHead};
use tower_ha::Pool;

const SIZES: [usize; 4] = [3, 100, 1000, 10_000];
const KEYS: usize = 1024;

/// An always-ready backend that answers without allocating. It hands the
/// request back in the response, so that tearing down the request and the
/// response happens outside the timed section, for every balancer alike:
/// what is measured is the balancer.
#[derive(Clone)]
struct Backend;

impl Service<Request<()>> for Backend {
    type Response = Response<Request<()>>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Request<()>>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        ready(Ok(Response::new(req)))
    }
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("user-{i:08}")).collect()
}

/// A request with a few headers, as a proxy would see it.
fn request(key: &str) -> Request<()> {
    Request::builder()
        .uri("/api/items/42")
        .header("host", "example.com")
        .header("user-agent", "bench/1.0")
        .header("accept", "application/json")
        .header("x-user", key)
        .body(())
        .unwrap()
}

fn drive<S, R>(svc: &mut S, req: Request<()>, cx: &mut Context<'_>) -> R
where
    S: Service<Request<()>, Response = R>,
    S::Error: std::fmt::Debug,
{
    loop {
        match svc.poll_ready(cx) {
            Poll::Ready(Ok(())) => break,
            Poll::Ready(Err(e)) => panic!("{e:?}"),
            Poll::Pending => {}
        }
    }
    let mut fut = std::pin::pin!(svc.call(req));
    match fut.as_mut().poll(cx) {
        Poll::Ready(Ok(resp)) => resp,
        Poll::Ready(Err(e)) => panic!("{e:?}"),
        Poll::Pending => panic!("an always-ready backend answers at once"),
    }
}

/// Times `iters` requests through `svc`: requests are built beforehand and
/// responses kept until the clock stops, in chunks, so that only the
/// balancer's work is timed (alike for every balancer).
fn run<S>(c: &mut Criterion, group: &str, n: usize, mut svc: S)
where
    S: Service<Request<()>, Response = Response<Request<()>>>,
    S::Error: std::fmt::Debug,
{
    const CHUNK: u64 = 4096;
    let keys = keys();
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut g = c.benchmark_group(group);
    g.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let batch = CHUNK.min(iters - done);
                let requests: Vec<_> = (0..batch)
                    .map(|i| request(&keys[(done + i) as usize % KEYS]))
                    .collect();
                let mut responses = Vec::with_capacity(batch as usize);
                let start = Instant::now();
                for req in requests {
                    responses.push(drive(&mut svc, req, &mut cx));
                }
                elapsed += start.elapsed();
                black_box(&responses);
                done += batch;
            }
            elapsed
        })
    });
    g.finish();
}

fn bench_balance<P: Strategy>(c: &mut Criterion, group: &str, n: usize, strategy: impl Fn() -> P) {
    let pool: Pool<Backend> = (0..n).map(|i| (format!("backend-{i}"), Backend)).collect();
    run(c, group, n, Balance::new(pool, strategy()));
}

fn bench_p2c(c: &mut Criterion, n: usize) {
    let services: Vec<_> = (0..n)
        .map(|_| tower::load::Constant::new(Backend, 0))
        .collect();
    let p2c = tower::balance::p2c::Balance::new(tower::discover::ServiceList::new(services));
    run(c, "tower_p2c", n, p2c);
}

fn balancers(c: &mut Criterion) {
    for n in SIZES {
        bench_p2c(c, n);
        bench_balance(c, "round_robin", n, RoundRobin::new);
        bench_balance(c, "random", n, Random::new);
        bench_balance(c, "least_request", n, LeastRequest::new);
        bench_balance(c, "weighted_round_robin", n, WeightedRoundRobin::new);
        bench_balance(c, "ring", n, || ConsistentHash::ring(key::header("x-user")));
        bench_balance(c, "maglev", n, || {
            ConsistentHash::maglev(key::header("x-user"))
        });
    }
}

/// Key lookups on the same keys: pingora-ketama's `node` and hashring's
/// `get` against the ring and Maglev tables' `owner` (hash the key's bytes,
/// find the owner: the same work), and against a strategy's whole `pick`
/// (which also reads the key from the request's headers and checks that the
/// owner is eligible).
fn lookups(c: &mut Criterion) {
    let keys = keys();
    let requests: Vec<_> = keys.iter().map(|k| request(k)).collect();
    for n in SIZES {
        let buckets: Vec<_> = (0..n)
            .map(|i| {
                let addr = SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(0x0a00_0000 + i as u32),
                    80,
                ));
                pingora_ketama::Bucket::new(addr, 1)
            })
            .collect();
        let ketama = pingora_ketama::Continuum::new(&buckets);
        let mut i = 0;
        c.benchmark_group("lookup_pingora_ketama").bench_function(
            BenchmarkId::from_parameter(n),
            |b| {
                b.iter(|| {
                    i = (i + 1) % KEYS;
                    black_box(ketama.node(keys[i].as_bytes()))
                })
            },
        );

        let mut ring = hashring::HashRing::new();
        ring.batch_add((0..n).flat_map(|i| (0..160).map(move |r| (i, r))).collect());
        let mut i = 0;
        c.benchmark_group("lookup_hashring")
            .bench_function(BenchmarkId::from_parameter(n), |b| {
                b.iter(|| {
                    i = (i + 1) % KEYS;
                    black_box(ring.get(&keys[i]))
                })
            });

        let pool: Pool<Backend> = (0..n).map(|i| (format!("backend-{i}"), Backend)).collect();
        let snapshot = pool.snapshot();
        for (name, strategy) in [
            ("lookup_ring", ConsistentHash::ring(key::header("x-user"))),
            (
                "lookup_maglev",
                ConsistentHash::maglev(key::header("x-user")),
            ),
        ] {
            let table = strategy.build(snapshot.members());
            // The table lookup alone, as `Continuum::node`: hash the key's
            // bytes, find its owner.
            let mut i = 0;
            c.benchmark_group(name.replace("lookup_", "table_"))
                .bench_function(BenchmarkId::from_parameter(n), |b| {
                    b.iter(|| {
                        i = (i + 1) % KEYS;
                        black_box(table.owner(key::hash_bytes(keys[i].as_bytes())))
                    })
                });
            // The whole pick: read the key from the request's headers, hash
            // it, find the first eligible owner.
            let mut i = 0;
            c.benchmark_group(name)
                .bench_function(BenchmarkId::from_parameter(n), |b| {
                    b.iter(|| {
                        i = (i + 1) % KEYS;
                        let pick =
                            Pick::new(RequestHead::from(&requests[i]), snapshot.members(), None);
                        black_box(strategy.pick(&table, &pick))
                    })
                });
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = balancers, lookups
}
criterion_main!(benches);
