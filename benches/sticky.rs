//! A sticky hit (cookie scan, comparison with the issued value, table
//! lookup) through `Sticky → Balance`, on one session and cycling through
//! `SPREAD` sessions (`sticky_cookie_hit_spread`, whose table does not sit
//! in the cache whole), and the full `Sticky → Failover →
//! Balance` success path, against `Balance` alone, `Failover → Balance` and
//! tower's `p2c::Balance`, in the same run.
//!
//! The harness is `benches/balance.rs`'s: futures are driven with a no-op
//! waker (no runtime), requests are built beforehand in chunks, and the
//! backend hands the request back in its response, so building and tearing
//! down requests and responses happens outside the clock for every
//! contender alike: what is measured is the layers.
//!
//! `cargo bench --bench sticky`
//!
//! With `STICKY_PROFILE=<contender>` set, the bench instead sends
//! `STICKY_PROFILE_N` requests (default 100 000) through that contender in
//! `profiled`, for instruction counts under callgrind:
//!
//! ```text
//! STICKY_PROFILE=sticky_cookie_hit valgrind --tool=callgrind \
//!     --toggle-collect='*profiled*' target/release/deps/sticky-<hash> --bench
//! ```
//!
//! `sticky_new_session` sends requests that each start a session through
//! `Sticky → Balance` whose table is full (`FULL` sessions): an insert,
//! with the evictions it takes turns at; `tower_p2c_new_session_request`
//! is the anchor on the same requests. With `STICKY_EVICTIONS=<n>` set,
//! the bench instead sends `n` such requests one at a time and prints the
//! distribution of their times and of those that evicted (the pause an
//! eviction puts on the requests of its shard):
//!
//! ```text
//! STICKY_EVICTIONS=400000 cargo bench --bench sticky
//! ```

use std::task::{Context, Waker};
use std::time::Duration;

use tokio::time::Instant;

use criterion::Criterion;
use http::header::SET_COOKIE;
use http::{HeaderName, HeaderValue, Request};
use tower::{Layer, Service};
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::failover::FailoverLayer;
use tower_ha::sticky::{CookieInsert, SessionKey, StickyLayer};

mod support;
use support::{drive, parsed, time_requests, Backend};

const BACKENDS: usize = 3;
const SESSION_HEADER: HeaderName = HeaderName::from_static("x-session-id");

/// The same request for every contender, as a proxy would see it: a few
/// headers, a browser's `Cookie` header with the session cookie among
/// three others, and an `X-Session-Id` header (each stack reads what it
/// routes by).
fn request(cookie: &HeaderValue) -> Request<()> {
    parsed(&format!(
        "GET /api/items/42 HTTP/1.1\r\nhost: example.com\r\nuser-agent: bench/1.0\r\n\
         accept: application/json\r\ncookie: {}\r\nx-session-id: kernel-0042\r\n\r\n",
        cookie.to_str().expect("an ASCII cookie")
    ))
}

/// Every contender, built over one pool of `BACKENDS` backends, with its
/// session (if any) started.
struct Contenders {
    cookie: HeaderValue,
    balance: Balance<Backend, RoundRobin>,
    sticky_cookie: tower_ha::sticky::Sticky<Balance<Backend, RoundRobin>>,
    sticky_header: tower_ha::sticky::Sticky<Balance<Backend, RoundRobin>>,
    failover: tower_ha::failover::Failover<Balance<Backend, RoundRobin>>,
    sticky_failover:
        tower_ha::sticky::Sticky<tower_ha::failover::Failover<Balance<Backend, RoundRobin>>>,
    /// `Sticky → Balance` by the layer's cookie, holding `SPREAD`
    /// sessions, and a browser's `Cookie` header for each.
    sticky_spread: StickyBalance,
    spread_cookies: Vec<HeaderValue>,
    p2c: support::P2c,
}

/// The sessions `sticky_cookie_hit_spread` holds and cycles through.
const SPREAD: usize = 10_000;

/// A browser's `Cookie` header with the `Set-Cookie` of `first`'s response
/// among a few other cookies.
fn browser_cookie<B>(first: &http::Response<B>) -> HeaderValue {
    let set = first.headers()[SET_COOKIE].to_str().unwrap();
    let pair = set.split(';').next().unwrap();
    HeaderValue::try_from(format!("_ga=GA1.2.3456; theme=dark; {pair}; lang=en")).unwrap()
}

impl Contenders {
    fn new() -> Contenders {
        let pool = support::pool(BACKENDS);
        let balance = || Balance::new(pool.clone(), RoundRobin::new());
        let secret = [7u8; 32];
        let cookie_key = || SessionKey::insert_cookie(CookieInsert::new("srv", secret));
        let mut sticky_cookie = StickyLayer::new(&pool, cookie_key()).layer(balance());
        let mut sticky_failover =
            StickyLayer::new(&pool, cookie_key()).layer(FailoverLayer::new().layer(balance()));
        let mut cx = Context::from_waker(Waker::noop());

        // One session, started by a first request without a cookie. The
        // failover stack's table learns it from the (correctly signed)
        // cookie on its first request; both see hits from then on.
        let cookie = browser_cookie(&drive(&mut sticky_cookie, Request::new(()), &mut cx));
        drive(&mut sticky_failover, request(&cookie), &mut cx);
        let mut sticky_header =
            StickyLayer::new(&pool, SessionKey::header(SESSION_HEADER)).layer(balance());
        drive(&mut sticky_header, request(&cookie), &mut cx);
        let mut sticky_spread = StickyLayer::new(&pool, cookie_key()).layer(balance());
        let spread_cookies = (0..SPREAD)
            .map(|_| browser_cookie(&drive(&mut sticky_spread, Request::new(()), &mut cx)))
            .collect();
        // All kept: what the contender times is hits.
        assert_eq!(sticky_spread.stats().sessions, SPREAD);

        Contenders {
            sticky_spread,
            spread_cookies,
            balance: balance(),
            sticky_cookie,
            sticky_header,
            failover: FailoverLayer::new().layer(balance()),
            sticky_failover,
            p2c: support::p2c(BACKENDS, Backend),
            cookie,
        }
    }
}

/// The sessions the table of `sticky_new_session` holds (the default
/// `max_sessions`).
const FULL: usize = 100_000;

type StickyBalance = tower_ha::sticky::Sticky<Balance<Backend, RoundRobin>>;

/// A request without a session: its response starts one.
fn new_session_request() -> Request<()> {
    parsed("GET /api/items/42 HTTP/1.1\r\nhost: example.com\r\nuser-agent: bench/1.0\r\n\r\n")
}

/// `Sticky → Balance` by the layer's cookie, its table full (and
/// evicting).
fn full_table() -> StickyBalance {
    let pool = support::pool(BACKENDS);
    let key = SessionKey::insert_cookie(CookieInsert::new("srv", [7u8; 32]));
    let mut sticky = StickyLayer::new(&pool, key)
        .max_sessions(FULL)
        .layer(Balance::new(pool.clone(), RoundRobin::new()));
    let mut cx = Context::from_waker(Waker::noop());
    // A quarter more than it holds: every part of the table has evicted.
    for _ in 0..FULL + FULL / 4 {
        drive(&mut sticky, new_session_request(), &mut cx);
    }
    assert!(sticky.stats().evicted > 0);
    sticky
}

/// Sends `n` requests that start sessions through a full table, one at a
/// time, and prints percentiles of their times, and of those that evicted.
fn evictions(n: usize) {
    let mut sticky = full_table();
    let mut cx = Context::from_waker(Waker::noop());
    let (mut all, mut evicting) = (Vec::with_capacity(n), Vec::new());
    let mut evicted = sticky.stats().evicted;
    for _ in 0..n {
        let req = new_session_request();
        let start = Instant::now();
        let response = drive(&mut sticky, req, &mut cx);
        let took = start.elapsed();
        drop(response);
        all.push(took);
        let now = sticky.stats().evicted;
        if now != evicted {
            evicting.push(took);
            evicted = now;
        }
    }
    let show = |name: &str, times: &mut Vec<Duration>| {
        if times.is_empty() {
            // Too few requests for one to evict.
            println!("{name}: no requests");
            return;
        }
        times.sort();
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        println!(
            "{name}: {} requests, median {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
            times.len(),
            at(0.5),
            at(0.99),
            at(0.999),
            at(1.0)
        );
    };
    show("every request", &mut all);
    show("requests that evicted", &mut evicting);
}

/// Times `iters` requests through `svc` with the shared harness, in small
/// chunks: they keep the prebuilt requests' headers in cache, as they are in
/// a proxy that has just parsed the request.
fn time<S>(svc: &mut S, cookie: &HeaderValue, iters: u64) -> Duration
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    time_requests(svc, iters, 64, |_| request(cookie))
}

/// As [`time`], each request with the next of `cookies` in a scattered
/// order (a stride prime to their number), as many clients' requests come.
fn time_spread<S>(svc: &mut S, cookies: &[HeaderValue], iters: u64) -> Duration
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    let n = cookies.len() as u64;
    time_requests(svc, iters, 64, |i| {
        request(&cookies[(i * 7_919 % n) as usize])
    })
}

fn bench(c: &mut Criterion) {
    let Contenders {
        cookie,
        mut balance,
        mut sticky_cookie,
        mut sticky_header,
        mut failover,
        mut sticky_failover,
        mut sticky_spread,
        spread_cookies,
        mut p2c,
    } = Contenders::new();
    let mut g = c.benchmark_group("sticky");
    g.bench_function("tower_p2c", |b| {
        b.iter_custom(|n| time(&mut p2c, &cookie, n))
    });
    g.bench_function("balance_alone", |b| {
        b.iter_custom(|n| time(&mut balance, &cookie, n))
    });
    g.bench_function("sticky_cookie_hit", |b| {
        b.iter_custom(|n| time(&mut sticky_cookie, &cookie, n))
    });
    g.bench_function("sticky_cookie_hit_spread", |b| {
        b.iter_custom(|n| time_spread(&mut sticky_spread, &spread_cookies, n))
    });
    g.bench_function("sticky_header_hit", |b| {
        b.iter_custom(|n| time(&mut sticky_header, &cookie, n))
    });
    g.bench_function("failover_balance", |b| {
        b.iter_custom(|n| time(&mut failover, &cookie, n))
    });
    g.bench_function("sticky_failover_balance", |b| {
        b.iter_custom(|n| time(&mut sticky_failover, &cookie, n))
    });
    let mut full = full_table();
    g.bench_function("sticky_new_session", |b| {
        b.iter_custom(|n| time_requests(&mut full, n, 64, |_| new_session_request()))
    });
    // The anchor on the new sessions' requests, which carry no cookie.
    g.bench_function("tower_p2c_new_session_request", |b| {
        b.iter_custom(|n| time_requests(&mut p2c, n, 64, |_| new_session_request()))
    });
    g.finish();
}

/// Sends `n` requests through one contender inside `profiled`, after a
/// warm-up, for callgrind.
fn profile(name: &str, n: u64) {
    let mut c = Contenders::new();
    let cookie = c.cookie.clone();
    let mut run = |k: u64| match name {
        "tower_p2c" => time(&mut c.p2c, &cookie, k),
        "balance_alone" => time(&mut c.balance, &cookie, k),
        "sticky_cookie_hit" => time(&mut c.sticky_cookie, &cookie, k),
        "sticky_cookie_hit_spread" => time_spread(&mut c.sticky_spread, &c.spread_cookies, k),
        "sticky_header_hit" => time(&mut c.sticky_header, &cookie, k),
        "failover_balance" => time(&mut c.failover, &cookie, k),
        "sticky_failover_balance" => time(&mut c.sticky_failover, &cookie, k),
        other => panic!("unknown contender {other:?}"),
    };
    run(1000);
    run(n);
}

fn main() {
    if let Some(n) = std::env::var("STICKY_EVICTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        evictions(n);
        return;
    }
    if let Ok(name) = std::env::var("STICKY_PROFILE") {
        let n = std::env::var("STICKY_PROFILE_N")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(100_000);
        profile(&name, n);
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
}
