//! What groups and events cost on the request path.
//!
//! * `pick/*`: one request through `Balance` over 10 always-ready backends
//!   with `Priority` (primary available, steady state) against
//!   `RoundRobin`, the cheapest strategy.
//! * `emit/*`: one `Events::emit` with no subscriber, and with a subscriber
//!   that never reads (its buffer of 1024 is full: every emit overwrites).
//!
//! Run with `cargo bench --bench control -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use tower_ha::balance::{Balance, Failback, Priority, RoundRobin, Strategy};
use tower_ha::control::{Event, Events};
use tower_ha::Pool;

mod support;
use support::{time_requests, Backend};

fn bench_pick<P: Strategy>(c: &mut Criterion, name: &str, strategy: P) {
    let pool = Pool::new();
    let ids: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    for id in &ids {
        pool.insert(id.as_str(), Backend);
    }
    let mut balance = Balance::new(pool, strategy);
    c.bench_function(&format!("pick/{name}"), |b| {
        b.iter_custom(|iters| time_requests(&mut balance, iters, 4096, |_| Request::new(())))
    });
}

fn picks(c: &mut Criterion) {
    let order: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    bench_pick(c, "round_robin", RoundRobin::new());
    bench_pick(
        c,
        "priority_never",
        Priority::new("g", order.iter().map(String::as_str)),
    );
    bench_pick(
        c,
        "priority_auto",
        Priority::new("g", order.iter().map(String::as_str))
            .failback(Failback::Auto {
                after_stable_for: Duration::from_secs(30),
            })
            .min_dwell(Duration::from_secs(10)),
    );
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
