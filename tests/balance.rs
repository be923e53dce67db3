//! Balance and every strategy, through the public API: distinct attempts,
//! affinity, the extension protocol, readiness, and hashing properties.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::executor::block_on;
use http::{Request, Response};
use proptest::prelude::*;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_ha::backend::InFlight;
use tower_ha::balance::{
    Balance, BalanceLayer, ConsistentHash, LeastRequest, Random, RoundRobin, Strategy,
    WeightedRoundRobin,
};
use tower_ha::extensions::{Affinity, AffinityRequired, Attempts, ServedBy, Target};
use tower_ha::{
    key, AdminStatus, BackendError, BackendId, BoxError, HealthStatus, NoBackend, Pool,
};

type Svc = tower::util::BoxCloneSyncService<Request<()>, Response<String>, BoxError>;

fn named(name: String) -> Svc {
    tower::util::BoxCloneSyncService::new(service_fn(move |_req: Request<()>| {
        let name = name.clone();
        async move { Ok::<_, BoxError>(Response::new(name)) }
    }))
}

fn pool_of(n: usize) -> Pool<Svc> {
    let pool = Pool::new();
    for i in 0..n {
        pool.insert(format!("b{i}"), named(format!("b{i}")));
    }
    pool
}

fn request(key: Option<&str>) -> Request<()> {
    let mut b = Request::builder();
    if let Some(k) = key {
        b = b.header("x-key", k);
    }
    b.body(()).unwrap()
}

/// Sends one request carrying `attempts`; the backend that served it, or
/// `None` when the balancer answered `NoBackend`.
fn attempt<P: Strategy>(
    balance: &Balance<Svc, P>,
    key: Option<&str>,
    attempts: &Attempts,
) -> Option<BackendId> {
    let mut req = request(key);
    req.extensions_mut().insert(attempts.clone());
    match block_on(balance.clone().oneshot(req)) {
        Ok(resp) => {
            let served = resp
                .extensions()
                .get::<ServedBy>()
                .expect("ServedBy set")
                .0
                .clone();
            assert_eq!(
                resp.body(),
                served.as_str(),
                "ServedBy names the backend that answered"
            );
            Some(served)
        }
        Err(e) => {
            assert!(
                e.downcast_ref::<NoBackend>().is_some(),
                "unexpected error {e}"
            );
            None
        }
    }
}

/// Tries until `NoBackend`; returns the backends in the order tried.
fn exhaust<P: Strategy>(balance: &Balance<Svc, P>, key: Option<&str>) -> Vec<BackendId> {
    let mut attempts = Attempts::new();
    while let Some(id) = attempt(balance, key, &attempts) {
        assert!(!attempts.contains(&id), "{id} picked twice: {attempts:?}");
        attempts.push(id);
        assert!(
            attempts.len() <= balance.pool().len(),
            "more attempts than backends"
        );
    }
    attempts.as_slice().to_vec()
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    RoundRobin,
    Random,
    LeastRequest,
    Weighted,
    Ring,
    Maglev,
}

fn check_exhaustion(kind: Kind, pool: &Pool<Svc>, key: Option<&str>, panic: f64) -> Vec<BackendId> {
    fn run<P: Strategy>(pool: &Pool<Svc>, s: P, key: Option<&str>, panic: f64) -> Vec<BackendId> {
        exhaust(&Balance::new(pool.clone(), s).panic_threshold(panic), key)
    }
    match kind {
        Kind::RoundRobin => run(pool, RoundRobin::new(), key, panic),
        Kind::Random => run(pool, Random::new(), key, panic),
        Kind::LeastRequest => run(pool, LeastRequest::new(), key, panic),
        Kind::Weighted => run(pool, WeightedRoundRobin::new(), key, panic),
        Kind::Ring => run(pool, ConsistentHash::ring(key::header("x-key")), key, panic),
        Kind::Maglev => run(
            pool,
            ConsistentHash::maglev(key::header("x-key")).table_size(1009),
            key,
            panic,
        ),
    }
}

fn kinds() -> impl Strategy_<Value = Kind> {
    prop_oneof![
        Just(Kind::RoundRobin),
        Just(Kind::Random),
        Just(Kind::LeastRequest),
        Just(Kind::Weighted),
        Just(Kind::Ring),
        Just(Kind::Maglev),
    ]
}

use proptest::strategy::Strategy as Strategy_;

/// Makes backend `i` unavailable in one of the ways a backend can be; the
/// requests that keep it at its limit, for the last way.
fn make_unavailable(pool: &Pool<Svc>, i: usize, how: u8) -> Vec<InFlight> {
    let state = pool.state(&format!("b{i}").into()).unwrap();
    match how % 5 {
        0 => {
            state.set_health(HealthStatus::Unhealthy);
        }
        1 => {
            state.set_admin(AdminStatus::Disabled);
        }
        2 => {
            state.set_admin(AdminStatus::Draining);
        }
        3 => state.eject_until(tokio::time::Instant::now() + Duration::from_secs(3600)),
        _ => {
            state.set_max_in_flight(Some(2));
            return (0..2).map(|_| state.track_in_flight()).collect();
        }
    }
    Vec::new()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Successive attempts yield distinct backends, cover every available
    /// backend exactly once, and then the balancer answers NoBackend.
    #[test]
    fn attempts_cover_every_available_backend_once(
        kind in kinds(),
        n in 1usize..12,
        unavailable in proptest::collection::vec((0usize..12, any::<u8>()), 0..6),
        weights in proptest::collection::vec(1u32..6, 12),
        key in proptest::option::of("[a-z]{0,6}"),
    ) {
        let pool = pool_of(n);
        for (i, w) in weights.iter().take(n).enumerate() {
            pool.set_weight(&format!("b{i}").into(), *w);
        }
        let mut down = BTreeSet::new();
        let mut _held = Vec::new();
        for (i, how) in unavailable {
            if i < n {
                _held.extend(make_unavailable(&pool, i, how));
                down.insert(format!("b{i}"));
            }
        }
        let tried = check_exhaustion(kind, &pool, key.as_deref(), 0.0);
        let tried: BTreeSet<String> = tried.iter().map(|id| id.to_string()).collect();
        let available: BTreeSet<String> =
            (0..n).map(|i| format!("b{i}")).filter(|b| !down.contains(b)).collect();
        prop_assert_eq!(tried, available);
    }

    /// In panic (fewer than half of the enabled backends available), a
    /// request may try every enabled backend, healthy or not, still each
    /// once; disabled and draining backends stay out.
    #[test]
    fn panic_routing_covers_every_enabled_backend_once(
        kind in kinds(),
        // One available of at least three enabled: strictly below 50 %.
        n in 4usize..12,
        key in proptest::option::of("[a-z]{1,6}"),
    ) {
        let pool = pool_of(n);
        // All but one backend unhealthy: well below the 50 % threshold.
        for i in 1..n {
            make_unavailable(&pool, i, 0);
        }
        let tried = check_exhaustion(kind, &pool, key.as_deref(), 0.5);
        prop_assert_eq!(tried.len(), n);
        // A disabled backend is never picked, even in panic.
        pool.state(&"b1".into()).unwrap().set_admin(AdminStatus::Disabled);
        let tried = check_exhaustion(kind, &pool, key.as_deref(), 0.5);
        prop_assert_eq!(tried.len(), n - 1);
        prop_assert!(!tried.contains(&BackendId::from("b1")));
        // Nor one at its limit of requests in flight.
        let _held = make_unavailable(&pool, 2, 4);
        let tried = check_exhaustion(kind, &pool, key.as_deref(), 0.5);
        prop_assert_eq!(tried.len(), n - 2);
        prop_assert!(!tried.contains(&BackendId::from("b2")));
        // Nor a draining one.
        pool.state(&"b3".into()).unwrap().set_admin(AdminStatus::Draining);
        let tried = check_exhaustion(kind, &pool, key.as_deref(), 0.5);
        prop_assert_eq!(tried.len(), n - 3);
        prop_assert!(!tried.contains(&BackendId::from("b3")));
    }

    /// Smooth weighted round robin gives each backend exactly its weight in
    /// every cycle of sum(weights) picks, from wherever in the cycle it
    /// starts (a layer's `k`-th balancer starts `k` slots on).
    #[test]
    fn smooth_wrr_gives_exact_weights_per_cycle(
        weights in proptest::collection::vec(1u32..8, 1..8),
        earlier_balancers in 0usize..40,
    ) {
        let pool = Pool::new();
        for (i, w) in weights.iter().enumerate() {
            pool.insert_weighted(format!("b{i}"), named(format!("b{i}")), *w);
        }
        let layer = BalanceLayer::new(WeightedRoundRobin::new());
        for _ in 0..earlier_balancers {
            layer.layer(pool.clone());
        }
        let balance = layer.layer(pool);
        let g = weights.iter().copied().fold(0, gcd);
        let cycle: u32 = weights.iter().map(|w| w / g).sum();
        for _ in 0..3 {
            let mut counts = HashMap::new();
            for _ in 0..cycle {
                let id = attempt(&balance, None, &Attempts::new()).unwrap();
                *counts.entry(id.to_string()).or_insert(0u32) += 1;
            }
            for (i, w) in weights.iter().enumerate() {
                prop_assert_eq!(counts.get(&format!("b{i}")).copied().unwrap_or(0), w / g);
            }
        }
    }

    /// A ring and a Maglev table built from the same backends in any
    /// insertion order map every key identically.
    #[test]
    fn tables_do_not_depend_on_insertion_order(
        n in 1usize..20,
        seed in any::<u64>(),
        maglev in any::<bool>(),
    ) {
        let ids: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
        let mut shuffled = ids.clone();
        // A deterministic shuffle from the seed.
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        let build = |order: &[String]| {
            let pool = Pool::new();
            for id in order {
                pool.insert(id.as_str(), named(id.clone()));
            }
            pool
        };
        let (a, b) = (build(&ids), build(&shuffled));
        let (x, y) = if maglev {
            let s = || ConsistentHash::maglev(key::header("x-key")).table_size(4099);
            (owners(&Balance::new(a, s()), &keys(300)), owners(&Balance::new(b, s()), &keys(300)))
        } else {
            let s = || ConsistentHash::ring(key::header("x-key"));
            (owners(&Balance::new(a, s()), &keys(300)), owners(&Balance::new(b, s()), &keys(300)))
        };
        prop_assert_eq!(x, y);
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn pick_one<P: Strategy>(balance: &Balance<Svc, P>, key: &str) -> BackendId {
    attempt(balance, Some(key), &Attempts::new()).expect("a backend")
}

fn owners<P: Strategy>(balance: &Balance<Svc, P>, keys: &[String]) -> Vec<BackendId> {
    keys.iter().map(|k| pick_one(balance, k)).collect()
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("session-{i}")).collect()
}

/// Removes `b3` from `pool`, balanced by a ring over 20,000 keys: checks
/// that only its keys moved, each to another backend; returns how many.
fn ring_keys_moved_by_removing_b3(pool: &Pool<Svc>) -> usize {
    let balance = Balance::new(pool.clone(), ConsistentHash::ring(key::header("x-key")));
    let keys = keys(20_000);
    let before = owners(&balance, &keys);
    let gone: BackendId = "b3".into();
    assert!(pool.remove(&gone));
    let after = owners(&balance, &keys);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b == &gone {
            moved += 1;
            assert_ne!(a, &gone);
        } else {
            assert_eq!(a, b, "a key of a surviving backend moved");
        }
    }
    moved
}

#[test]
fn removing_a_backend_from_the_ring_moves_only_its_keys() {
    let moved = ring_keys_moved_by_removing_b3(&pool_of(10));
    // About 1/N of the keys belonged to the removed backend.
    assert!((1000..3000).contains(&moved), "moved {moved} of 20000");
}

fn unavailability_moves_only_its_keys<P: Strategy>(strategy: P) {
    let pool = pool_of(10);
    let balance = Balance::new(pool.clone(), strategy);
    let keys = keys(20_000);
    let before = owners(&balance, &keys);
    let state = pool.state(&"b7".into()).unwrap();
    state.set_health(HealthStatus::Unhealthy);
    let during = owners(&balance, &keys);
    let mut moved_to = HashMap::new();
    for (b, d) in before.iter().zip(&during) {
        if b.as_str() == "b7" {
            assert_ne!(d.as_str(), "b7");
            *moved_to.entry(d.clone()).or_insert(0) += 1;
        } else {
            assert_eq!(d, b, "a key of an available backend moved");
        }
    }
    assert!(!moved_to.is_empty());
    // Recovery restores the original mapping exactly.
    state.set_health(HealthStatus::Healthy);
    assert_eq!(owners(&balance, &keys), before);
}

#[test]
fn ring_unavailability_moves_only_its_keys() {
    unavailability_moves_only_its_keys(ConsistentHash::ring(key::header("x-key")));
}

#[test]
fn maglev_unavailability_moves_only_its_keys_and_spreads_them() {
    let pool = pool_of(10);
    let balance = Balance::new(pool.clone(), ConsistentHash::maglev(key::header("x-key")));
    let keys = keys(20_000);
    let before = owners(&balance, &keys);
    pool.state(&"b7".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);
    let during = owners(&balance, &keys);
    let mut receivers = BTreeSet::new();
    for (b, d) in before.iter().zip(&during) {
        if b.as_str() == "b7" {
            receivers.insert(d.clone());
        } else {
            assert_eq!(d, b, "a key of an available backend moved");
        }
    }
    // Rehashing spreads the failed backend's keys over (almost) all others.
    assert!(receivers.len() >= 8, "keys went to only {receivers:?}");
    unavailability_moves_only_its_keys(ConsistentHash::maglev(key::header("x-key")));
}

#[test]
fn maglev_load_is_even_at_ten_backends() {
    let pool = pool_of(10);
    let balance = Balance::new(pool, ConsistentHash::maglev(key::header("x-key")));
    let mut counts: HashMap<BackendId, u32> = HashMap::new();
    for k in keys(200_000) {
        *counts.entry(pick_one(&balance, &k)).or_default() += 1;
    }
    let max = *counts.values().max().unwrap() as f64;
    let mean = 200_000.0 / 10.0;
    // The table itself is balanced to within 1.0002 (unit test); with a
    // finite sample of keys the statistical spread adds about 1 %.
    assert!(max / mean <= 1.03, "max/mean {}", max / mean);
}

#[test]
fn keyless_requests_use_the_fallback() {
    let pool = pool_of(3);
    let balance = Balance::new(pool, ConsistentHash::ring(key::header("x-key")));
    let served: Vec<_> = (0..6)
        .map(|_| attempt(&balance, None, &Attempts::new()).unwrap())
        .collect();
    let distinct: BTreeSet<_> = served.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "round robin fallback visits every backend: {served:?}"
    );
    // An empty key is no key.
    let served: BTreeSet<_> = (0..6)
        .map(|_| attempt(&balance, Some(""), &Attempts::new()).unwrap())
        .collect();
    assert_eq!(served.len(), 3);
}

#[test]
fn round_robin_continues_after_the_last_attempt() {
    let pool = pool_of(5);
    let balance = Balance::new(pool, RoundRobin::new());
    // Panda's semantics: start, start+1, ..., wrapping.
    let order = exhaust(&balance, None);
    let names: Vec<&str> = order.iter().map(|b| b.as_str()).collect();
    assert_eq!(names, ["b0", "b1", "b2", "b3", "b4"]);
    let order = exhaust(&balance, None);
    let names: Vec<&str> = order.iter().map(|b| b.as_str()).collect();
    assert_eq!(names, ["b1", "b2", "b3", "b4", "b0"]);
}

#[test]
fn a_layers_balancers_start_their_turns_at_successive_backends() {
    /// The first pick of each of `n` balancers the layer (or, with
    /// `cloned`, a clone of it each time) builds.
    fn first_picks<P: Strategy + Clone>(
        pool: &Pool<Svc>,
        strategy: P,
        n: usize,
        cloned: bool,
    ) -> Vec<String> {
        let layer = BalanceLayer::new(strategy);
        (0..n)
            .map(|_| {
                let balance = if cloned {
                    layer.clone().layer(pool.clone())
                } else {
                    layer.layer(pool.clone())
                };
                attempt(&balance, None, &Attempts::new())
                    .unwrap()
                    .to_string()
            })
            .collect()
    }
    let pool = pool_of(3);
    let spread = ["b0", "b1", "b2", "b0", "b1", "b2"];
    assert_eq!(first_picks(&pool, RoundRobin::new(), 6, false), spread);
    assert_eq!(
        first_picks(&pool, WeightedRoundRobin::new(), 6, false),
        spread
    );
    // So do those of clones of a layer (a router cloning its layers), with
    // an even number of backends too.
    let two = pool_of(2);
    for (pool, spread) in [
        (&pool, &["b0", "b1", "b2", "b0"][..]),
        (&two, &["b0", "b1", "b0", "b1"][..]),
    ] {
        assert_eq!(first_picks(pool, RoundRobin::new(), 4, true), spread);
        assert_eq!(
            first_picks(pool, WeightedRoundRobin::new(), 4, true),
            spread
        );
    }
    // Each takes its turns in order from there.
    let layer = BalanceLayer::new(RoundRobin::new());
    layer.layer(pool.clone());
    let second = layer.layer(pool);
    let order: Vec<String> = (0..4)
        .map(|_| {
            attempt(&second, None, &Attempts::new())
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(order, ["b1", "b2", "b0", "b1"]);
}

#[test]
fn affinity_is_honoured_only_when_eligible() {
    let pool = pool_of(3);
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    let send = |affinity: &str, attempts: Attempts| {
        let mut req = request(None);
        req.extensions_mut().insert(Affinity(affinity.into()));
        req.extensions_mut().insert(attempts);
        block_on(balance.clone().oneshot(req)).unwrap().into_body()
    };
    for _ in 0..5 {
        assert_eq!(send("b2", Attempts::new()), "b2");
    }
    // Already tried: the strategy picks someone else.
    assert_ne!(send("b2", ["b2".into()].into_iter().collect()), "b2");
    // Draining: its sessions finish there, but nothing new reaches it.
    let b2 = pool.state(&"b2".into()).unwrap();
    b2.set_admin(AdminStatus::Draining);
    assert_eq!(send("b2", Attempts::new()), "b2");
    for _ in 0..6 {
        let resp = block_on(balance.clone().oneshot(request(None))).unwrap();
        assert_ne!(resp.body(), "b2", "a draining backend takes no new request");
    }
    // Draining and unhealthy, disabled, or unknown: ignored.
    b2.set_health(HealthStatus::Unhealthy);
    assert_ne!(send("b2", Attempts::new()), "b2");
    b2.set_health(HealthStatus::Healthy);
    b2.set_admin(AdminStatus::Disabled);
    assert_ne!(send("b2", Attempts::new()), "b2");
    // b2 is disabled: an unknown affinity leaves the pick to the strategy,
    // which spreads requests over the eligible backends.
    let served: BTreeSet<String> = (0..4).map(|_| send("nobody", Attempts::new())).collect();
    assert_eq!(served, BTreeSet::from(["b0".into(), "b1".into()]));
}

#[test]
fn a_required_affinity_is_that_backend_or_none() {
    let pool = pool_of(3);
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    let send = |affinity: Option<&str>, attempts: Attempts| {
        let mut req = request(None);
        if let Some(affinity) = affinity {
            req.extensions_mut().insert(Affinity(affinity.into()));
        }
        req.extensions_mut().insert(AffinityRequired);
        req.extensions_mut().insert(attempts);
        block_on(balance.clone().oneshot(req)).map(|r| r.into_body())
    };
    let no_backend = |result: Result<String, BoxError>| {
        let err = result.unwrap_err();
        let none = err.downcast_ref::<NoBackend>().expect("NoBackend");
        assert!(!none.is_at_limit());
    };
    assert_eq!(send(Some("b2"), Attempts::new()).unwrap(), "b2");
    // Tried, unhealthy or unknown: no other backend.
    no_backend(send(Some("b2"), ["b2".into()].into_iter().collect()));
    let b2 = pool.state(&"b2".into()).unwrap();
    b2.set_health(HealthStatus::Unhealthy);
    no_backend(send(Some("b2"), Attempts::new()));
    no_backend(send(Some("nobody"), Attempts::new()));
    assert_eq!(pool.state(&"b0".into()).unwrap().requests(), 0);
    assert_eq!(pool.state(&"b1".into()).unwrap().requests(), 0);
    // Without an affinity, nothing is required.
    assert!(send(None, Attempts::new()).is_ok());
}

#[test]
fn a_backend_at_its_limit_takes_only_its_sessions_until_a_request_ends() {
    let pool = pool_of(2);
    let b1 = pool.state(&"b1".into()).unwrap();
    b1.set_max_in_flight(Some(1));
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    let held = b1.track_in_flight();
    for _ in 0..4 {
        assert_eq!(
            attempt(&balance, None, &Attempts::new()).unwrap().as_str(),
            "b0"
        );
    }
    // Full, b1 still serves the sessions bound to it.
    let mut req = request(None);
    req.extensions_mut().insert(Affinity("b1".into()));
    assert_eq!(block_on(balance.clone().oneshot(req)).unwrap().body(), "b1");
    // Every backend full: no backend, at once.
    pool.state(&"b0".into()).unwrap().set_max_in_flight(Some(1));
    let _b0_held = pool.state(&"b0".into()).unwrap().track_in_flight();
    let err = block_on(balance.clone().oneshot(request(None))).unwrap_err();
    let none = err.downcast_ref::<NoBackend>().unwrap();
    assert!(none.is_at_limit(), "busy rather than down: {none}");
    // Once the full ones are tried or down, it is no longer about limits.
    pool.state(&"b0".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);
    let mut req = request(None);
    req.extensions_mut()
        .insert(["b1".into()].into_iter().collect::<Attempts>());
    let err = block_on(balance.clone().oneshot(req)).unwrap_err();
    assert!(!err.downcast_ref::<NoBackend>().unwrap().is_at_limit());
    pool.state(&"b0".into())
        .unwrap()
        .set_health(HealthStatus::Healthy);
    // A request ending makes room.
    drop(held);
    assert_eq!(
        attempt(&balance, None, &Attempts::new()).unwrap().as_str(),
        "b1"
    );
}

#[test]
fn a_strategy_that_picks_a_full_backend_gets_no_backend_rather_than_a_spin() {
    /// Always the first member, eligible or not.
    struct Stubborn;
    impl Strategy for Stubborn {
        type Table = ();
        fn build(&self, _: &tower_ha::pool::Members) {}
        fn pick(&self, _: &(), pick: &tower_ha::balance::Pick<'_>) -> Option<usize> {
            (!pick.is_empty()).then_some(0)
        }
    }
    let pool = pool_of(2);
    let b0 = pool.state(&"b0".into()).unwrap();
    b0.set_max_in_flight(Some(1));
    let _held = b0.track_in_flight();
    let balance = Balance::new(pool, Stubborn);
    let err = block_on(balance.oneshot(request(None))).unwrap_err();
    assert!(err.downcast_ref::<NoBackend>().unwrap().is_at_limit());
}

#[test]
fn concurrent_requests_never_exceed_a_backends_limit() {
    // Eight threads call at once for four places (one per backend); the
    // futures hold their places until dropped.
    let pool = pool_of(4);
    for i in 0..4 {
        pool.state(&format!("b{i}").into())
            .unwrap()
            .set_max_in_flight(Some(1));
    }
    for kind in 0..2 {
        let balance = match kind {
            0 => {
                tower::util::BoxCloneSyncService::new(Balance::new(pool.clone(), RoundRobin::new()))
            }
            _ => tower::util::BoxCloneSyncService::new(Balance::new(
                pool.clone(),
                LeastRequest::new(),
            )),
        };
        for _ in 0..300 {
            let barrier = std::sync::Barrier::new(8);
            let futures: Vec<_> = std::thread::scope(|scope| {
                let calls: Vec<_> = (0..8)
                    .map(|_| {
                        let mut balance = balance.clone();
                        let barrier = &barrier;
                        scope.spawn(move || {
                            block_on(balance.ready()).unwrap();
                            barrier.wait();
                            balance.call(request(None))
                        })
                    })
                    .collect();
                calls.into_iter().map(|c| c.join().unwrap()).collect()
            });
            for i in 0..4 {
                assert_eq!(pool.state(&format!("b{i}").into()).unwrap().in_flight(), 1);
            }
            let refused = futures
                .into_iter()
                .map(block_on)
                .filter(|r| r.as_ref().is_err_and(|e| e.is::<NoBackend>()))
                .count();
            assert_eq!(refused, 4);
        }
    }
}

/// Requests picked on four threads while a fifth changes the pool under
/// them, with every strategy: backends removed and put back, reweighted,
/// drained, disabled and enabled again. Every request is answered, by the
/// backend `ServedBy` names, never `NoBackend` while four backends nobody
/// touches are there, and never by one disabled, draining or removed for
/// the whole run; nothing panics.
#[test]
fn picks_hold_while_the_pool_changes_under_them() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::AtomicBool;

    fn run<P: Strategy>(strategy: P) {
        let pool = pool_of(16);
        let state = |i: usize| pool.state(&format!("b{i}").into());
        // Out for the whole run.
        state(12).unwrap().set_admin(AdminStatus::Disabled);
        state(13).unwrap().set_admin(AdminStatus::Disabled);
        state(14).unwrap().set_admin(AdminStatus::Draining);
        pool.remove(&"b15".into());
        let out = ["b12", "b13", "b14", "b15"];
        let balance = Balance::new(pool.clone(), strategy);
        let done = AtomicBool::new(false);
        let served = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for thread in 0..4u64 {
                let (balance, done, served) = (&balance, &done, &served);
                scope.spawn(move || {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(thread);
                    while !done.load(Ordering::Relaxed) {
                        let key = format!("k{}", rng.random_range(0..1000));
                        let key = rng.random_bool(0.8).then_some(key.as_str());
                        let by = attempt(balance, key, &Attempts::new()).expect("a backend");
                        assert!(!out.contains(&by.as_str()), "served by {by}");
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            // Changes begin once requests are flowing.
            while served.load(Ordering::Relaxed) == 0 {
                std::thread::yield_now();
            }
            let mut rng = rand::rngs::SmallRng::seed_from_u64(99);
            for _ in 0..3000 {
                let i = rng.random_range(4..12);
                let id = BackendId::from(format!("b{i}"));
                match rng.random_range(0..6) {
                    0 => {
                        pool.remove(&id);
                    }
                    1 if !pool.contains(&id) => pool.insert(id.clone(), named(id.to_string())),
                    2 => {
                        pool.set_weight(&id, rng.random_range(1..20));
                    }
                    n => {
                        if let Some(state) = pool.state(&id) {
                            state.set_admin(match n {
                                3 => AdminStatus::Draining,
                                4 => AdminStatus::Disabled,
                                _ => AdminStatus::Enabled,
                            });
                        }
                    }
                }
            }
            done.store(true, Ordering::Relaxed);
        });
    }
    run(RoundRobin::new());
    run(Random::new());
    run(LeastRequest::new());
    run(WeightedRoundRobin::new());
    run(ConsistentHash::ring(key::header("x-key")));
    run(ConsistentHash::maglev(key::header("x-key")).table_size(1009));
}

#[test]
fn empty_pool_answers_no_backend_at_once() {
    let pool: Pool<Svc> = Pool::new();
    let mut balance = Balance::new(pool, RoundRobin::new());
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    assert!(matches!(balance.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let mut fut = balance.call(request(None));
    match Pin::new(&mut fut).poll(&mut cx) {
        Poll::Ready(Err(e)) => assert!(e.is::<NoBackend>()),
        other => panic!(
            "expected NoBackend at once, got {:?}",
            other.map(|r| r.is_ok())
        ),
    }
}

/// A backend that is never ready, or fails readiness.
#[derive(Clone)]
struct Stuck {
    fail: bool,
}

impl Service<Request<()>> for Stuck {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<String>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.fail {
            Poll::Ready(Err("connect refused".into()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        unreachable!("never called before ready")
    }
}

#[test]
fn a_stuck_backend_blocks_only_its_own_requests() {
    let pool = pool_of(1);
    pool.insert(
        "stuck",
        tower::util::BoxCloneSyncService::new(Stuck { fail: false }),
    );
    let mut balance = Balance::new(pool.clone(), RoundRobin::new());
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut pending = 0;
    let mut served = 0;
    let stuck = pool.state(&"stuck".into()).unwrap();
    for _ in 0..4 {
        assert!(
            balance.poll_ready(&mut cx).is_ready(),
            "Balance is always ready"
        );
        let mut fut = balance.call(request(None));
        match Pin::new(&mut fut).poll(&mut cx) {
            Poll::Pending => pending += 1,
            Poll::Ready(Ok(resp)) => {
                assert_eq!(resp.body(), "b0");
                served += 1
            }
            Poll::Ready(Err(e)) => panic!("{e}"),
        }
    }
    assert_eq!((pending, served), (2, 2));
    // Dropped while it waited for readiness: never sent, so not counted
    // as a request (and no longer in flight).
    assert_eq!(stuck.requests(), 0);
    assert_eq!(stuck.in_flight(), 0);
    assert_eq!(pool.state(&"b0".into()).unwrap().requests(), 2);
}

/// Not ready when first asked, then ready; its `call` panics.
#[derive(Clone)]
struct PanicsWhenCalled {
    polls: Arc<AtomicUsize>,
}

impl Service<Request<()>> for PanicsWhenCalled {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<String>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.polls.fetch_add(1, Ordering::SeqCst) == 0 {
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        panic!("the backend panics when called")
    }
}

#[test]
fn a_request_whose_backend_panicked_when_called_counts_as_sent() {
    let pool: Pool<Svc> = Pool::new();
    let polls = Arc::new(AtomicUsize::new(0));
    pool.insert(
        "a",
        tower::util::BoxCloneSyncService::new(PanicsWhenCalled {
            polls: polls.clone(),
        }),
    );
    let mut balance = Balance::new(pool.clone(), RoundRobin::new());
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(balance.poll_ready(&mut cx).is_ready());
    // Not ready in `call`: the future drives it, then calls it.
    let mut fut = Box::pin(balance.call(request(None)));
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _ = fut
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()));
    }));
    assert!(panicked.is_err());
    assert!(
        polls.load(Ordering::SeqCst) >= 2,
        "called after it got ready"
    );
    let a = pool.state(&"a".into()).unwrap();
    // The request reached the backend's `call`: it may have been sent.
    assert_eq!((a.requests(), a.in_flight()), (1, 0));
}

#[test]
fn readiness_failure_is_a_not_sent_backend_error() {
    let pool: Pool<Svc> = Pool::new();
    pool.insert(
        "down",
        tower::util::BoxCloneSyncService::new(Stuck { fail: true }),
    );
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    let err = block_on(balance.oneshot(request(None))).unwrap_err();
    let err = err.downcast_ref::<BackendError>().expect("a BackendError");
    assert_eq!(err.backend().as_str(), "down");
    assert!(err.is_not_sent());
    let down = pool.state(&"down".into()).unwrap();
    assert_eq!((down.requests(), down.in_flight()), (0, 0), "not sent");
}

#[test]
fn backend_errors_carry_the_backend_id() {
    let pool: Pool<Svc> = Pool::new();
    pool.insert(
        "bad",
        tower::util::BoxCloneSyncService::new(service_fn(|_req: Request<()>| async {
            Err::<Response<String>, BoxError>("reset by peer".into())
        })),
    );
    let balance = Balance::new(pool, RoundRobin::new());
    let err = block_on(balance.oneshot(request(None))).unwrap_err();
    let err = err.downcast_ref::<BackendError>().expect("a BackendError");
    assert_eq!(err.backend().as_str(), "bad");
    assert!(!err.is_not_sent());
    assert_eq!(err.inner().to_string(), "reset by peer");
}

#[test]
fn target_is_set_and_in_flight_is_counted() {
    let seen = Arc::new(AtomicUsize::new(0));
    let pool: Pool<tower::util::BoxCloneSyncService<Request<()>, Response<()>, BoxError>> =
        Pool::new();
    let s = seen.clone();
    pool.insert(
        "t",
        tower::util::BoxCloneSyncService::new(service_fn(move |req: Request<()>| {
            let target = req.extensions().get::<Target>().cloned();
            let s = s.clone();
            async move {
                let target = target.expect("Target set before the backend is called");
                assert_eq!(target.id().as_str(), "t");
                s.store(target.state().in_flight(), Ordering::SeqCst);
                Ok::<_, BoxError>(Response::new(()))
            }
        })),
    );
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    block_on(balance.oneshot(Request::new(()))).unwrap();
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "in flight while the backend runs"
    );
    assert_eq!(
        pool.state(&"t".into()).unwrap().in_flight(),
        0,
        "released after"
    );
}

#[test]
fn least_request_compares_two_distinct_backends() {
    let pool = pool_of(2);
    // Hold 5 requests in flight on b0.
    let b0 = pool.state(&"b0".into()).unwrap();
    let _held: Vec<_> = (0..5).map(|_| b0.track_in_flight()).collect();
    let balance = Balance::new(pool.clone(), LeastRequest::new());
    // Both draws never land on b0: it gets no pick while b1 is eligible.
    let counts = shares(&balance, 1000);
    assert_eq!(counts.get("b1"), Some(&1000), "{counts:?}");
    // With b1 out of service, the only eligible backend is picked.
    pool.state(&"b1".into())
        .unwrap()
        .set_admin(AdminStatus::Disabled);
    let counts = shares(&balance, 100);
    assert_eq!(counts.get("b0"), Some(&100), "{counts:?}");
}

#[test]
fn least_request_weighs_idle_backends_by_their_weight() {
    let pool = pool_of(2);
    // "b0" warms up at 10 % of its weight; nothing is ever in flight.
    pool.state(&"b0".into()).unwrap().set_weight_permille(100);
    let balance = Balance::new(pool, LeastRequest::new());
    // Every pick compares b0 with b1, and b1's full weight wins; comparing
    // bare in-flight counts, a tie every time, b0 got half.
    let counts = shares(&balance, 1000);
    assert_eq!(counts.get("b1"), Some(&1000), "{counts:?}");
}

#[test]
fn membership_changes_reach_the_balancer() {
    let pool = pool_of(2);
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    pool.insert("late", named("late".into()));
    let seen: BTreeSet<_> = (0..6)
        .map(|_| attempt(&balance, None, &Attempts::new()).unwrap())
        .collect();
    assert!(seen.contains(&BackendId::from("late")));
    pool.remove(&"late".into());
    pool.remove(&"b0".into());
    let seen: BTreeSet<_> = (0..6)
        .map(|_| attempt(&balance, None, &Attempts::new()).unwrap())
        .collect();
    assert_eq!(seen, BTreeSet::from(["b1".into()]));
}

#[tokio::test]
async fn discover_stream_drives_membership() {
    use tower::discover::Change;
    let pool: Pool<Svc> = Pool::new();
    let (tx, rx) =
        tokio::sync::mpsc::unbounded_channel::<Result<Change<String, Svc>, Infallible>>();
    let task = tokio::spawn({
        let pool = pool.clone();
        async move { pool.discover(tokio_stream_from(rx)).await }
    });
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    tx.send(Ok(Change::Insert("x".into(), named("x".into()))))
        .unwrap();
    tx.send(Ok(Change::Insert("y".into(), named("y".into()))))
        .unwrap();
    tx.send(Ok(Change::Remove("x".into()))).unwrap();
    drop(tx);
    task.await.unwrap().unwrap();
    assert_eq!(pool.ids(), vec![BackendId::from("y")]);
    let resp = balance.oneshot(request(None)).await.unwrap();
    assert_eq!(resp.body(), "y");
}

fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The backend is called on the future's first poll, never in `call`: a
/// future dropped unpolled has sent nothing (the failover layer relies on
/// this when its retry budget is spent).
#[test]
fn an_unpolled_future_sends_nothing() {
    let calls = Arc::new(AtomicUsize::new(0));
    let pool: Pool<Svc> = Pool::new();
    let c = calls.clone();
    pool.insert(
        "a",
        tower::util::BoxCloneSyncService::new(service_fn(move |_req: Request<()>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(Response::new(String::new())) }
        })),
    );
    let mut balance = Balance::new(pool.clone(), RoundRobin::new());
    drop(balance.call(request(None)));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        pool.state(&"a".into()).unwrap().in_flight(),
        0,
        "the in-flight count is released"
    );
    block_on(balance.call(request(None))).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn round_robin_shares_an_unavailable_backends_turns_evenly() {
    let pool = pool_of(3);
    pool.state(&"b1".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);
    let balance = Balance::new(pool, RoundRobin::new()).panic_threshold(0.0);
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..3000 {
        let id = attempt(&balance, None, &Attempts::new()).unwrap();
        *counts.entry(id.to_string()).or_default() += 1;
    }
    // b1's thousand turns are split between b0 and b2, not all given to b2.
    let (b0, b2) = (counts["b0"], counts["b2"]);
    assert_eq!(b0 + b2, 3000);
    assert!((1350..=1650).contains(&b0), "b0 {b0}, b2 {b2}");
}

#[test]
fn weighted_round_robin_shares_an_unavailable_backends_slots_by_weight() {
    let pool = Pool::new();
    for (name, weight) in [("b0", 1), ("b1", 1), ("b2", 2)] {
        pool.insert_weighted(name, named(name.into()), weight);
    }
    pool.state(&"b1".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);
    let balance = Balance::new(pool, WeightedRoundRobin::new()).panic_threshold(0.0);
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..4000 {
        let id = attempt(&balance, None, &Attempts::new()).unwrap();
        *counts.entry(id.to_string()).or_default() += 1;
    }
    // b1's 1000 slots go 1:2 to b0 and b2, as their weights: 1333 and 2667.
    let (b0, b2) = (counts["b0"], counts["b2"]);
    assert_eq!(b0 + b2, 4000);
    assert!((1200..=1470).contains(&b0), "b0 {b0}, b2 {b2}");
}

/// How many of `n` keyless picks each backend got.
fn shares<P: Strategy>(balance: &Balance<Svc, P>, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let id = attempt(balance, None, &Attempts::new()).unwrap();
        *counts.entry(id.to_string()).or_default() += 1;
    }
    counts
}

/// How many of `keys` each backend owns.
fn key_shares<P: Strategy>(balance: &Balance<Svc, P>, keys: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for id in owners(balance, keys) {
        *counts.entry(id.to_string()).or_default() += 1;
    }
    counts
}

#[test]
fn a_weight_set_at_runtime_changes_weighted_round_robin_shares() {
    let pool = pool_of(2);
    let balance = Balance::new(pool.clone(), WeightedRoundRobin::new());
    let before = shares(&balance, 400);
    assert_eq!((before["b0"], before["b1"]), (200, 200));
    assert!(pool.set_weight(&"b0".into(), 3));
    // 3:1 from the next pick on; a cycle cut short by the change may
    // shift one pick.
    let after = shares(&balance, 400);
    assert!((299..=301).contains(&after["b0"]), "{after:?}");
    assert_eq!(after["b0"] + after["b1"], 400);
    // And back.
    assert!(pool.set_weight(&"b0".into(), 1));
    let again = shares(&balance, 400);
    assert!((199..=201).contains(&again["b0"]), "{again:?}");
}

#[test]
fn a_weight_set_through_the_control_handle_changes_maglev_shares() {
    let pool = pool_of(2);
    let balance = Balance::new(pool.clone(), ConsistentHash::maglev(key::header("x-key")));
    let handle = tower_ha::control::Handle::new(tower_ha::control::Events::default());
    handle.add_group("web", &balance).unwrap();
    let keys = keys(20_000);
    let before = key_shares(&balance, &keys);
    // Even, to within the sample's spread (about 70 keys).
    assert!((9_400..=10_600).contains(&before["b0"]), "{before:?}");
    handle.set_weight(&"b0".into(), 3).unwrap();
    // 3:1: b0 owns three quarters of the table, so of the keys too.
    let after = key_shares(&balance, &keys);
    assert!((14_400..=15_600).contains(&after["b0"]), "{after:?}");
}

/// Above the ring's cap of 8 Mi points, the others' points (and keys) stay
/// as they were when a backend leaves, unless the total crosses a power of
/// two.
#[test]
fn removing_a_backend_from_a_capped_ring_moves_only_its_keys() {
    let pool = Pool::new();
    for i in 0..10 {
        // 10 × 160 × 6,000 = 9.6 M points wanted: over the cap.
        pool.insert_weighted(format!("b{i}"), named(format!("b{i}")), 6_000);
    }
    let moved = ring_keys_moved_by_removing_b3(&pool);
    assert!((1_500..=2_500).contains(&moved), "{moved} keys of b3");
}

#[test]
fn ring_weights_give_keys_in_proportion_and_a_change_moves_only_that_backends_keys() {
    let pool = Pool::new();
    for (name, weight) in [("b0", 3), ("b1", 1), ("b2", 1)] {
        pool.insert_weighted(name, named(name.into()), weight);
    }
    let balance = Balance::new(pool.clone(), ConsistentHash::ring(key::header("x-key")));
    let keys = keys(20_000);
    let before = owners(&balance, &keys);
    let counts = key_shares(&balance, &keys);
    // b0 has 3/5 of the points, the others 1/5 each: about 12,000 and
    // 4,000 keys. The ring's arcs vary more than Maglev's slots do, so
    // the bounds are wide, and still far from the 1:1:1 of equal weights.
    assert!((10_000..=14_000).contains(&counts["b0"]), "{counts:?}");
    for b in ["b1", "b2"] {
        assert!((2_800..=5_200).contains(&counts[b]), "{counts:?}");
    }
    let ratio = counts["b0"] as f64 / ((counts["b1"] + counts["b2"]) as f64 / 2.0);
    assert!(
        (2.3..=3.8).contains(&ratio),
        "b0 gets {ratio:.2}x the others"
    );

    // b1 heavier: it takes keys from the others, which keep the rest.
    assert!(pool.set_weight(&"b1".into(), 3));
    let heavier = owners(&balance, &keys);
    let mut gained = 0;
    for (b, h) in before.iter().zip(&heavier) {
        if b != h {
            assert_eq!(h.as_str(), "b1", "a key moved from {b} to {h}, not to b1");
            gained += 1;
        }
    }
    // b1 goes from 1/5 to 3/7 of the points: about 4,600 more keys.
    assert!((3_000..=6_500).contains(&gained), "b1 gained {gained} keys");

    // Back to 1: exactly the keys it gained go back where they were.
    assert!(pool.set_weight(&"b1".into(), 1));
    assert_eq!(owners(&balance, &keys), before);

    // b0 lighter: only its keys move, and only away from it.
    assert!(pool.set_weight(&"b0".into(), 1));
    let lighter = owners(&balance, &keys);
    let mut lost = 0;
    for (b, l) in before.iter().zip(&lighter) {
        if b != l {
            assert_eq!(b.as_str(), "b0", "a key moved from {b} to {l}, not from b0");
            lost += 1;
        }
    }
    // b0 goes from 3/5 of the points to 1/3: about 5,300 fewer keys.
    assert!((3_500..=7_000).contains(&lost), "b0 lost {lost} keys");
}

#[test]
fn random_spreads_its_picks_over_every_backend() {
    let pool = pool_of(3);
    let balance = Balance::new(pool, Random::new());
    let counts = shares(&balance, 3000);
    // 1,000 each expected, with a standard deviation of about 26: 600 to
    // 1,410 is more than 15 of them away, never reached by chance.
    for b in ["b0", "b1", "b2"] {
        let got = counts.get(b).copied().unwrap_or(0);
        assert!(
            (600..=1410).contains(&got),
            "{b}: {got} of 3000 ({counts:?})"
        );
    }
    // Not a fixed rotation in disguise: some backend is picked twice in a
    // row (a rotation never does; chance does about a third of the time).
    let picks: Vec<_> = (0..300)
        .map(|_| attempt(&balance, None, &Attempts::new()).unwrap())
        .collect();
    assert!(
        picks.windows(2).any(|w| w[0] == w[1]),
        "never the same twice in a row"
    );
}

#[test]
fn a_strategy_that_panics_building_its_table_stops_no_change() {
    /// Picks `b1` when it can, else the last eligible backend, and cannot
    /// build a table without `b1`.
    struct NeedsB1;
    impl Strategy for NeedsB1 {
        type Table = ();
        fn build(&self, members: &tower_ha::pool::Members) {
            assert!(members.index_of(&"b1".into()).is_some(), "no b1");
        }
        fn pick(&self, _: &(), pick: &tower_ha::balance::Pick<'_>) -> Option<usize> {
            let b1 = pick.members().index_of(&"b1".into());
            b1.filter(|&i| pick.is_eligible(i))
                .or_else(|| (0..pick.len()).rev().find(|&i| pick.is_eligible(i)))
        }
    }
    let pool = pool_of(3);
    let fragile = Balance::new(pool.clone(), NeedsB1);
    let sound = Balance::new(pool.clone(), RoundRobin::new());
    // The change that removes b1 returns, and the balancer built after the
    // fragile one sees it.
    assert!(pool.remove(&"b1".into()));
    assert_eq!(pool.ids(), vec!["b0".into(), "b2".into()]);
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        seen.insert(
            block_on(sound.clone().oneshot(request(None)))
                .unwrap()
                .into_body(),
        );
    }
    assert_eq!(seen, BTreeSet::from(["b0".to_owned(), "b2".to_owned()]));
    // The fragile balancer still answers, from the membership it had: the
    // one that holds b1.
    let res = block_on(fragile.clone().oneshot(request(None))).unwrap();
    assert_eq!(res.body(), "b1");
    // And builds again at the next change it can build for.
    pool.insert("b1", named("b1, again".into()));
    let res = block_on(fragile.clone().oneshot(request(None))).unwrap();
    assert_eq!(res.body(), "b1, again");
}
