//! Per-request cost of `Balance` with each strategy against tower's
//! `p2c::Balance`, and hash lookups against pingora-ketama and hashring, over
//! the same backends and keys in the same run.
//!
//! Futures are driven with a no-op waker, not a runtime, so each side is
//! measured alike: `poll_ready`, `call`, and one poll of an always-ready
//! backend's response future.
//!
//! cargo bench --bench balance

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Request;
use tower::Service;
use tower_ha::balance::{
    Balance, ConsistentHash, LeastRequest, Pick, Random, RoundRobin, Strategy, WeightedRoundRobin,
};
use tower_ha::key::{self, RequestHead};

mod support;
use support::{parsed, time_requests, Backend};

const SIZES: [usize; 4] = [3, 100, 1000, 10_000];
const KEYS: usize = 1024;

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("user-{i:08}")).collect()
}

/// A request with a few headers, as a proxy would see it.
fn request(key: &str) -> Request<()> {
    parsed(&format!(
        "GET /api/items/42 HTTP/1.1\r\nhost: example.com\r\nuser-agent: bench/1.0\r\n\
         accept: application/json\r\nx-user: {key}\r\n\r\n"
    ))
}

/// Times requests through `svc` with the shared harness.
fn run<S>(c: &mut Criterion, group: &str, n: usize, mut svc: S)
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    let keys = keys();
    let mut g = c.benchmark_group(group);
    g.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter_custom(|iters| {
            time_requests(&mut svc, iters, 4096, |i| request(&keys[i as usize % KEYS]))
        })
    });
    g.finish();
}

fn bench_balance<P: Strategy>(c: &mut Criterion, group: &str, n: usize, strategy: impl Fn() -> P) {
    let pool = support::pool(n);
    run(c, group, n, Balance::new(pool, strategy()));
}

fn bench_p2c(c: &mut Criterion, n: usize) {
    run(c, "tower_p2c", n, support::p2c(n, Backend));
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

        let pool = support::pool(n);
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
