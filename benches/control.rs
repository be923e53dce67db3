//! What groups and events cost on the request path.
//!
//! * `pick/*`: one request through `Balance` over 10 always-ready backends
//!   with `Priority` (primary available, steady state) against
//!   `RoundRobin`, the cheapest strategy, and tower's `p2c::Balance` over
//!   10 `load::Constant` backends (the anchor) in the same group.
//! * `emit/*`: one `Events::emit` with no subscriber, and with a subscriber
//!   that never reads (its buffer of 1024 is full: every emit overwrites).
//!
//! Run with `cargo bench --bench control -- --noplot`.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use http::Request;
use tower_ha::balance::{Balance, Failback, Priority, RoundRobin, Strategy};
use tower_ha::control::{Event, Events};

mod support;
use support::{time_requests, Backend};

const BACKENDS: usize = 10;

/// Times `iters` requests through `svc` with the shared harness.
fn time<S>(svc: &mut S, iters: u64) -> Duration
where
    S: tower::Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    time_requests(svc, iters, 4096, |_| Request::new(()))
}

fn bench_pick<P: Strategy>(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, strategy: P) {
    let mut balance = Balance::new(support::pool(BACKENDS), strategy);
    group.bench_function(name, |b| b.iter_custom(|iters| time(&mut balance, iters)));
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    let mut p2c = support::p2c(BACKENDS, Backend);
    group.bench_function("tower_p2c", |b| {
        b.iter_custom(|iters| time(&mut p2c, iters))
    });

    let order: Vec<String> = (0..BACKENDS).map(|i| format!("backend-{i}")).collect();
    bench_pick(&mut group, "round_robin", RoundRobin::new());
    bench_pick(
        &mut group,
        "priority_never",
        Priority::new("g", order.iter().map(String::as_str)),
    );
    bench_pick(
        &mut group,
        "priority_auto",
        Priority::new("g", order.iter().map(String::as_str))
            .failback(Failback::auto(Duration::from_secs(30)))
            .min_dwell(Duration::from_secs(10)),
    );
    group.finish();
}

fn emits(c: &mut Criterion) {
    let event = Event::WeightChanged {
        backend: "b1".into(),
        weight: 3,
    };
    let events = Events::default();
    c.bench_function("emit/no_subscriber", |b| {
        b.iter(|| events.emit(black_box(event.clone())))
    });
    let events = Events::default();
    let _idle = events.subscribe();
    c.bench_function("emit/idle_subscriber", |b| {
        b.iter(|| events.emit(black_box(event.clone())))
    });
}

criterion_group!(benches, picks, emits);
criterion_main!(benches);
