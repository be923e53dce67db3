//! Memory: the heap each sticky session and each backend takes, counted by
//! a global allocator (the bytes asked of it that are still held, and the
//! allocations), with tower's `p2c::Balance` over the same backends as the
//! anchor.
//!
//! - Sessions: `Sticky → Balance` over three backends, with `max_sessions`
//!   twice the sessions made (so none is evicted), sent requests that each
//!   start a session: by the layer's own cookie (a random id, and the
//!   signed cookie value kept to compare the next request's with), and by
//!   a client's `X-Session-Id` (16 characters). What the layer holds once
//!   the responses are dropped, divided by the sessions.
//! - Backends: a `Pool` of `n` backends and a `Balance` with each strategy,
//!   once it has picked for a request (which builds a consistent-hash
//!   table), against `p2c::Balance` over a `ServiceList` of the same
//!   backends once it has readied them for a request. Divided by `n`.
//!
//! `cargo bench --bench memory`. The figures are the same from run to run
//! at these sizes; bytes per session depend on where a count falls between
//! two sizes of a hash table, which doubles when seven eighths full. What the
//! system allocator adds to each allocation (8 to 16 bytes with glibc) is
//! not counted: the allocations column gives its scale.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Waker};

use http::Request;
use tower::{Layer, Service};
use tower_ha::balance::{
    Balance, ConsistentHash, LeastRequest, Random, RoundRobin, Strategy, WeightedRoundRobin,
};
use tower_ha::key;
use tower_ha::sticky::{CookieInsert, SessionKey, StickyLayer};

mod support;
use support::{drive, parsed, Backend};

struct Counting;

/// Bytes and allocations held.
static BYTES: AtomicUsize = AtomicUsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to `System` unchanged; the counters are
// only added to and read.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's guarantees, passed on.
        unsafe { System.dealloc(ptr, layout) };
        BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        ALLOCATIONS.fetch_sub(1, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            BYTES.fetch_add(new_size, Ordering::Relaxed);
            BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What is held now: (bytes, allocations).
fn held() -> (usize, usize) {
    (
        BYTES.load(Ordering::Relaxed),
        ALLOCATIONS.load(Ordering::Relaxed),
    )
}

/// What came to be held since `before`, per one of `n`: (bytes,
/// allocations).
fn per(before: (usize, usize), n: usize) -> (f64, f64) {
    let now = held();
    let n = n as f64;
    (
        (now.0 as f64 - before.0 as f64) / n,
        (now.1 as f64 - before.1 as f64) / n,
    )
}

const SESSIONS: [usize; 3] = [10_000, 100_000, 1_000_000];
const BACKENDS: [usize; 3] = [100, 1000, 10_000];

/// The heap `Sticky → Balance` keyed by `key` holds per session after `n`
/// requests from `request`, each of which starts one.
fn sessions(key: SessionKey, n: usize, request: impl Fn(usize) -> Request<()>) {
    let pool = support::pool(3);
    let mut sticky = StickyLayer::new(&pool, key)
        .max_sessions(2 * n)
        .layer(Balance::new(pool.clone(), RoundRobin::new()));
    let mut cx = Context::from_waker(Waker::noop());
    // One request first: what the first builds once (a membership
    // snapshot, a shard's first table) is no session's.
    drop(drive(&mut sticky, request(n), &mut cx));
    let before = held();
    for i in 0..n {
        drop(drive(&mut sticky, request(i), &mut cx));
    }
    let (bytes, allocations) = per(before, n);
    let stats = sticky.stats();
    assert_eq!(stats.sessions, n + 1, "every request started a session");
    assert_eq!(stats.evicted, 0);
    println!("| {n} | {bytes:.0} | {allocations:.2} |");
}

/// The heap the balancer `build` makes over `n` backends holds, per
/// backend, once it has picked for a request.
fn backends<S>(label: &str, n: usize, build: impl FnOnce() -> S)
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let before = held();
    let mut balance = build();
    drop(drive(&mut balance, request(), &mut cx));
    let (bytes, allocations) = per(before, n);
    println!("| {label} | {n} | {bytes:.0} | {allocations:.2} |");
}

/// [`backends`] for `Balance` with `strategy` over a pool of `n`.
fn balance<P: Strategy>(name: &str, n: usize, strategy: P) {
    backends(&format!("`{name}`"), n, || {
        Balance::new(support::pool(n), strategy)
    });
}

fn request() -> Request<()> {
    parsed("GET / HTTP/1.1\r\nhost: example.com\r\nx-user: user-00000042\r\n\r\n")
}

fn main() {
    // `cargo bench` passes `--bench`; a filter is not supported.
    println!("Sticky sessions by the layer's cookie\n");
    println!("| sessions | bytes per session | allocations per session |");
    println!("|---|---|---|");
    for n in SESSIONS {
        let cookie = SessionKey::insert_cookie(CookieInsert::new("srv", [7u8; 32]));
        sessions(cookie, n, |_| {
            parsed("GET / HTTP/1.1\r\nhost: example.com\r\n\r\n")
        });
    }
    println!("\nSticky sessions by a header (X-Session-Id, 16 characters)\n");
    println!("| sessions | bytes per session | allocations per session |");
    println!("|---|---|---|");
    for n in SESSIONS {
        sessions(SessionKey::header("x-session-id"), n, |i| {
            parsed(&format!(
                "GET / HTTP/1.1\r\nhost: example.com\r\nx-session-id: session-{i:08}\r\n\r\n"
            ))
        });
    }
    println!("\nBackends\n");
    println!("| balancer | backends | bytes per backend | allocations per backend |");
    println!("|---|---|---|---|");
    for n in BACKENDS {
        backends("`tower_p2c` (anchor)", n, || support::p2c(n, Backend));
        balance("round_robin", n, RoundRobin::new());
        balance("random", n, Random::new());
        balance("least_request", n, LeastRequest::new());
        balance("weighted_round_robin", n, WeightedRoundRobin::new());
        balance("ring", n, ConsistentHash::ring(key::header("x-user")));
        balance("maglev", n, ConsistentHash::maglev(key::header("x-user")));
    }
}
