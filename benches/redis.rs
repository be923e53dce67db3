//! `RedisStore` saves and loads per second against `redis-benchmark` SET
//! and GET on the same `redis-server`, in the same run.
//!
//! Starts its own `redis-server` (no persistence, so neither side pays for
//! a disk) on a free port, runs `redis-benchmark` three ways, then
//! `RedisStore` the matching ways, and prints a table with the ratios.
//! Then criterion measures the latency of one save and one load.
//!
//! `cargo bench --features redis --bench redis -- --warm-up-time 1 --measurement-time 3`
// Wall-clock throughput, measured outside any paused-time runtime.
#![allow(clippy::disallowed_types)]

use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::runtime::Runtime;
use tower_ha::store::{RedisStore, Session, SessionStore};

#[path = "../tests/support/ports.rs"]
mod ports;
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

mod support;
use support::{runtime, save_and_load, sessions, SESSIONS};

/// Runs `redis-benchmark` and returns (SET/s, GET/s) and the command line.
fn redis_benchmark(
    port: u16,
    requests: u32,
    clients: u32,
    size: Option<usize>,
) -> (f64, f64, String) {
    let mut args = vec![
        "-p".to_owned(),
        port.to_string(),
        "-t".into(),
        "set,get".into(),
        "-n".into(),
        requests.to_string(),
        "-P".into(),
        "1".into(),
        "-q".into(),
    ];
    if clients != 50 {
        args.extend(["-c".into(), clients.to_string()]);
    }
    if let Some(size) = size {
        args.extend(["-d".into(), size.to_string()]);
    }
    let line = format!("redis-benchmark {}", args.join(" "));
    let output = Command::new("redis-benchmark")
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-benchmark (run scripts/test.sh): {e}"));
    let text = String::from_utf8_lossy(&output.stdout);
    let rate = |name: &str| -> f64 {
        text.split(['\r', '\n'])
            .rev()
            .filter_map(|l| l.trim().strip_prefix(name))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .next()
            .unwrap_or_else(|| panic!("no {name} figure in redis-benchmark's output: {text}"))
    };
    (rate("SET:"), rate("GET:"), line)
}

/// `ops` saves (or loads), spread over `tasks` concurrent tasks that each
/// wait for one answer before sending the next; returns operations per
/// second.
fn store_rate(
    rt: &Runtime,
    store: &RedisStore,
    all: &Arc<Vec<Session>>,
    tasks: usize,
    ops: usize,
    save: bool,
) -> f64 {
    rt.block_on(async {
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let (store, all) = (store.clone(), all.clone());
                tokio::spawn(async move {
                    for i in (t..ops).step_by(tasks) {
                        let s = &all[i % SESSIONS];
                        if save {
                            store.save(s).await.expect("save");
                        } else {
                            black_box(store.load(&s.key).await.expect("load"));
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.expect("task");
        }
        ops as f64 / start.elapsed().as_secs_f64()
    })
}

fn redis(c: &mut Criterion) {
    let server = redis_server::RedisServer::start_with(&["--appendonly", "no"]);
    let rt = runtime();
    let store = rt
        .block_on(RedisStore::builder(server.url()).build())
        .expect("connect");
    let all = Arc::new(sessions());
    let size = serde_json::to_vec(&all[0]).expect("json").len();
    rt.block_on(async {
        for s in all.iter() {
            store.save(s).await.expect("seed");
        }
    });

    let quiet = rt
        .block_on(RedisStore::builder(server.url()).notify(false).build())
        .expect("connect");

    // `cargo test --benches` runs this once in a debug build (no
    // `--bench` argument): check that it works with few requests, quickly.
    let full = std::env::args().any(|a| a == "--bench");
    let (many, few, rounds) = if full {
        (100_000, 20_000, 3)
    } else {
        (1_000, 500, 1)
    };

    // Warm up both sides once.
    store_rate(&rt, &store, &all, 50, few as usize, true);
    let _ = redis_benchmark(server.port(), few, 50, None);

    // Three rounds, alternating the two sides so both see the same
    // machine; the best round of each counts (the machine is shared).
    let best = |a: &mut f64, b: f64| *a = a.max(b);
    let mut plain = (0.0, 0.0, String::new());
    let mut sized = plain.clone();
    let mut single = plain.clone();
    let (mut save50, mut load50, mut save1, mut load1, mut quiet1) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for _ in 0..rounds {
        let (set, get, line) = redis_benchmark(server.port(), many, 50, None);
        best(&mut plain.0, set);
        best(&mut plain.1, get);
        plain.2 = line;
        let (set, get, line) = redis_benchmark(server.port(), many, 50, Some(size));
        best(&mut sized.0, set);
        best(&mut sized.1, get);
        sized.2 = line;
        best(
            &mut save50,
            store_rate(&rt, &store, &all, 50, many as usize, true),
        );
        best(
            &mut load50,
            store_rate(&rt, &store, &all, 50, many as usize, false),
        );
        let (set, get, line) = redis_benchmark(server.port(), few, 1, Some(size));
        best(&mut single.0, set);
        best(&mut single.1, get);
        single.2 = line;
        best(
            &mut save1,
            store_rate(&rt, &store, &all, 1, few as usize, true),
        );
        best(
            &mut load1,
            store_rate(&rt, &store, &all, 1, few as usize, false),
        );
        best(
            &mut quiet1,
            store_rate(&rt, &quiet, &all, 1, few as usize, true),
        );
    }

    println!();
    println!("session JSON: {size} bytes; best of {rounds} round(s) each");
    println!("{:<72} {:>10} {:>10}", "anchor", "SET/s", "GET/s");
    for (set, get, line) in [&plain, &sized, &single] {
        println!("{line:<72} {set:>10.0} {get:>10.0}");
    }
    println!("{:<72} {:>10} {:>10}", "RedisStore", "save/s", "load/s");
    println!(
        "{:<72} {save50:>10.0} {load50:>10.0}",
        "50 tasks, one answer awaited each"
    );
    println!("{:<72} {save1:>10.0} {load1:>10.0}", "1 task");
    println!("{:<72} {quiet1:>10.0} {:>10}", "1 task, notify(false)", "-");
    println!(
        "ratio vs the default command (50 clients, 3-byte values): save {:.2}x, load {:.2}x",
        save50 / plain.0,
        load50 / plain.1
    );
    println!(
        "ratio vs 50 clients, {size}-byte values: save {:.2}x, load {:.2}x",
        save50 / sized.0,
        load50 / sized.1
    );
    println!(
        "ratio vs 1 client, {size}-byte values: save {:.2}x (notify off {:.2}x), load {:.2}x",
        save1 / single.0,
        quiet1 / single.0,
        load1 / single.1
    );
    println!();

    let mut group = c.benchmark_group("redis_store");
    group.throughput(Throughput::Elements(1));
    save_and_load(&mut group, &rt, &store, &all);
    group.finish();
}

criterion_group!(benches, redis);
criterion_main!(benches);
