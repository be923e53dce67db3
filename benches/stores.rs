//! Session stores: saves and loads per second.
//!
//! * `FileStore` against the anchor it replaces, Enterprise Gateway's way
//!   of writing a session file (write in place, no fsync, no rename).
//! * `WebhookStore` against a local hyper service (the one the tests use),
//!   so the figures are the client's and HTTP's cost, not a database's.
//! * `MemoryStore` as the floor.
//!
//! `cargo bench --all-features --bench stores -- --warm-up-time 1 --measurement-time 3`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::runtime::Runtime;
use tower_ha::store::{FileStore, MemoryStore, SessionStore, WebhookStore};

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/webhook_server.rs"]
mod webhook_server;

mod support;
use support::{runtime, save_and_load, sessions, SESSIONS};

/// save: rewrite one session (cycling over 100); load: read one;
/// load_all: read all 100.
fn bench_store(c: &mut Criterion, rt: &Runtime, name: &str, store: Arc<dyn SessionStore>) {
    let all = sessions();
    rt.block_on(async {
        for s in &all {
            store.save(s).await.expect("seed");
        }
    });
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    save_and_load(&mut group, rt, &*store, &all);
    group.throughput(Throughput::Elements(SESSIONS as u64));
    group.bench_function("load_all_100", |b| {
        b.iter(|| {
            let loaded = rt.block_on(store.load_all()).expect("load_all");
            assert_eq!(loaded.sessions.len(), SESSIONS);
        })
    });
    group.finish();
}

fn stores(c: &mut Criterion) {
    let rt = runtime();

    bench_store(c, &rt, "memory", Arc::new(MemoryStore::new()));

    let tmp = tempfile::tempdir().expect("tempdir");
    let file = rt
        .block_on(FileStore::open(tmp.path().join("sessions")))
        .expect("open");
    bench_store(c, &rt, "file", Arc::new(file));

    // The anchor: what Enterprise Gateway does for each save.
    let all = sessions();
    let plain = tmp.path().join("plain");
    std::fs::create_dir_all(&plain).expect("dir");
    let mut group = c.benchmark_group("file_anchor");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("save_in_place_no_fsync", |b| {
        b.iter(|| {
            i = (i + 1) % SESSIONS;
            let s = &all[i];
            let bytes = serde_json::to_vec_pretty(s).expect("json");
            std::fs::write(plain.join(format!("{}.json", s.key)), bytes).expect("write");
        })
    });
    group.finish();

    let server = rt.block_on(webhook_server::Server::start(webhook_server::Auth::None));
    let webhook = WebhookStore::builder(server.url())
        .build()
        .expect("webhook");
    bench_store(c, &rt, "webhook", Arc::new(webhook));

    let digest = rt.block_on(webhook_server::Server::start(
        webhook_server::Auth::Digest {
            user: "u".into(),
            password: "p".into(),
        },
    ));
    let webhook = WebhookStore::builder(digest.url())
        .digest_auth("u", "p")
        .build()
        .expect("webhook");
    bench_store(c, &rt, "webhook_digest", Arc::new(webhook));
}

criterion_group!(benches, stores);
criterion_main!(benches);
