//! Every selection strategy over the same five backends: how requests
//! spread, and how many keys move when a backend becomes unavailable.
//!
//! cargo run --example strategies

use std::collections::BTreeMap;
use std::convert::Infallible;

use http::{Request, Response};
use tower::{service_fn, ServiceExt};
use tower_ha::balance::{
    Balance, ConsistentHash, LeastRequest, Random, RoundRobin, Strategy, WeightedRoundRobin,
};
use tower_ha::extensions::ServedBy;
use tower_ha::{key, BackendId, HealthStatus, Pool};

type Backend = tower::util::BoxCloneSyncService<Request<()>, Response<()>, Infallible>;

const REQUESTS: usize = 10_000;

fn pool() -> Pool<Backend> {
    let pool = Pool::new();
    for (name, weight) in [("a", 1), ("b", 1), ("c", 2), ("d", 2), ("e", 4)] {
        let svc = service_fn(|_req: Request<()>| async { Ok(Response::new(())) });
        pool.insert_weighted(name, Backend::new(svc), weight);
    }
    pool
}

async fn route<P: Strategy>(balance: &Balance<Backend, P>, user: usize) -> BackendId {
    let req = Request::builder()
        .header("x-user", format!("user-{user}"))
        .body(())
        .unwrap();
    let resp = balance
        .clone()
        .oneshot(req)
        .await
        .expect("a backend answers");
    resp.extensions()
        .get::<ServedBy>()
        .expect("labelled")
        .0
        .clone()
}

async fn report<P: Strategy>(name: &str, strategy: P) {
    let pool = pool();
    let balance = Balance::new(pool.clone(), strategy);
    let mut spread: BTreeMap<BackendId, usize> = BTreeMap::new();
    let mut before = Vec::with_capacity(REQUESTS);
    for user in 0..REQUESTS {
        let id = route(&balance, user).await;
        *spread.entry(id.clone()).or_default() += 1;
        before.push(id);
    }
    // Backend "c" goes down: who moves?
    pool.state(&"c".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);
    let mut moved = 0;
    for (user, was) in before.iter().enumerate() {
        if &route(&balance, user).await != was {
            moved += 1;
        }
    }
    let shares: Vec<String> = spread
        .iter()
        .map(|(id, n)| format!("{id}:{:>5.1}%", 100.0 * *n as f64 / REQUESTS as f64))
        .collect();
    println!(
        "{name:<22} {}   moved when c fails: {:>5.1}%",
        shares.join(" "),
        100.0 * moved as f64 / REQUESTS as f64
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    println!("{REQUESTS} requests from {REQUESTS} users over a(1) b(1) c(2) d(2) e(4)\n");
    report("round robin", RoundRobin::new()).await;
    report("random", Random::new()).await;
    report("least request (p2c)", LeastRequest::new()).await;
    report("weighted round robin", WeightedRoundRobin::new()).await;
    report(
        "ring (by x-user)",
        ConsistentHash::ring(key::header("x-user")),
    )
    .await;
    report(
        "maglev (by x-user)",
        ConsistentHash::maglev(key::header("x-user")),
    )
    .await;
    println!(
        "\nKeyless strategies keep no user anywhere (round robin looks stable here only\n\
         because users are replayed in the same order); consistent hashing moves\n\
         exactly the users of the failed backend (c holds 20% of the weight)."
    );
}
