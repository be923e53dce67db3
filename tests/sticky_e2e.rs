//! End to end against real HTTP servers on 127.0.0.1: Sticky → Balance
//! over three hyper backends.

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::join_all;
use http::header::{COOKIE, SET_COOKIE};
use http::{Request, Response};
use parking_lot::Mutex;
use support::sticky_http::{HttpBackend, Server};
use tower::{ServiceBuilder, ServiceExt};
use tower_ha::balance::{Balance, BalanceLayer, RoundRobin};
use tower_ha::sticky::{CookieInsert, SessionKey, SessionUnavailable, Sticky, StickyLayer};
use tower_ha::store::MemoryStore;
use tower_ha::{BoxError, Health, Pool};

const SECRET: [u8; 32] = *b"an end-to-end secret of 32 bytes";
const CLIENTS: usize = 200;

type Stack = Sticky<Balance<HttpBackend, RoundRobin>>;

struct Cluster {
    pool: Pool<HttpBackend>,
    servers: HashMap<&'static str, Server>,
}

impl Cluster {
    async fn start() -> Cluster {
        let pool = Pool::new();
        let mut servers = HashMap::new();
        for name in ["a", "b", "c"] {
            let server = Server::start_any(name).await;
            pool.insert(name, HttpBackend::new(server.addr()));
            servers.insert(name, server);
        }
        Cluster { pool, servers }
    }

    /// Stops backend `name` and marks it unhealthy, as a health checker
    /// would.
    async fn kill(&mut self, name: &'static str) -> std::net::SocketAddr {
        let addr = self.servers.remove(name).unwrap().kill().await;
        self.pool
            .state(&name.into())
            .unwrap()
            .set_health(Health::Unhealthy);
        addr
    }

    /// Starts backend `name` again on its old address and marks it healthy.
    async fn revive(&mut self, name: &'static str, addr: std::net::SocketAddr) {
        self.servers.insert(name, Server::start(name, addr).await);
        self.pool
            .state(&name.into())
            .unwrap()
            .set_health(Health::Healthy);
    }

    fn stack(&self, layer: StickyLayer) -> Stack {
        ServiceBuilder::new()
            .layer(layer)
            .layer(BalanceLayer::new(RoundRobin::new()))
            .service(self.pool.clone())
    }
}

/// A browser-like client: keeps the affinity cookie it is given.
struct Client {
    cookie: Option<String>,
}

impl Client {
    async fn get(&mut self, svc: &Stack) -> Result<Response<String>, BoxError> {
        let mut req = Request::get("/work");
        if let Some(cookie) = &self.cookie {
            req = req.header(COOKIE, cookie);
        }
        let res = svc.clone().oneshot(req.body(()).unwrap()).await?;
        if let Some(set) = res.headers().get(SET_COOKIE) {
            let pair = set.to_str().unwrap().split(';').next().unwrap();
            self.cookie = Some(pair.to_owned());
        }
        Ok(res)
    }

    /// `n` requests; returns the backends that answered, in order.
    async fn run(&mut self, svc: &Stack, n: usize) -> Vec<String> {
        let mut served = Vec::with_capacity(n);
        for _ in 0..n {
            served.push(self.get(svc).await.unwrap().into_body());
        }
        served
    }
}

fn layer(pool: &Pool<HttpBackend>) -> StickyLayer {
    let cookie = CookieInsert::new("srv", SECRET).secure(false);
    StickyLayer::new(pool, SessionKey::insert_cookie(cookie))
}

fn all_same(served: &[String]) -> Option<&String> {
    let first = served.first()?;
    served.iter().all(|s| s == first).then_some(first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stay_put_and_only_a_dead_backends_sessions_move_once() {
    let mut cluster = Cluster::start().await;
    let moves: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let seen = moves.clone();
    let store = MemoryStore::new();
    let layer = layer(&cluster.pool).store(store.clone()).on_move(
        move |m: tower_ha::sticky::SessionMoved| {
            *seen.lock().entry(m.session.key).or_default() += 1;
            async { Ok::<(), BoxError>(()) }
        },
    );
    let svc = cluster.stack(layer.clone());

    // 200 clients, 50 requests each, all at once: each stays on one backend.
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| Client { cookie: None }).collect();
    let runs = join_all(clients.iter_mut().map(|c| c.run(&svc, 50))).await;
    let homes: Vec<String> = runs
        .iter()
        .map(|served| all_same(served).expect("a client changed backend").clone())
        .collect();
    let count = |name: &str| homes.iter().filter(|h| *h == name).count();
    for name in ["a", "b", "c"] {
        assert!(count(name) >= CLIENTS / 3 - 1, "{name}: {}", count(name));
    }
    assert_eq!(layer.stats().created, CLIENTS as u64);
    assert_eq!(store.len(), CLIENTS);

    // Kill b: only its clients move, each once, and stay where they went.
    let addr = cluster.kill("b").await;
    let runs = join_all(clients.iter_mut().map(|c| c.run(&svc, 10))).await;
    let mut new_homes = Vec::new();
    for (served, home) in runs.iter().zip(&homes) {
        let now = all_same(served)
            .expect("a moved session moved again")
            .clone();
        if home == "b" {
            assert_ne!(now, "b");
        } else {
            assert_eq!(&now, home, "a session on a live backend moved");
        }
        new_homes.push(now);
    }
    let moved = count("b");
    assert_eq!(layer.stats().moved, moved as u64);
    {
        let moves = moves.lock();
        assert_eq!(moves.len(), moved);
        assert!(moves.values().all(|&n| n == 1), "a session moved twice");
    }

    // b comes back: nobody moves back.
    cluster.revive("b", addr).await;
    let runs = join_all(clients.iter_mut().map(|c| c.run(&svc, 10))).await;
    for (served, now) in runs.iter().zip(&new_homes) {
        assert_eq!(all_same(served), Some(now));
    }
    assert_eq!(layer.stats().moved, moved as u64);
    // New sessions reach b again.
    let fresh = join_all((0..6).map(|_| Client { cookie: None }.run_owned(&svc))).await;
    assert!(fresh.iter().any(|b| b == "b"), "{fresh:?}");
}

impl Client {
    async fn run_owned(mut self, svc: &Stack) -> String {
        self.get(svc).await.unwrap().into_body()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_answers_the_typed_error_instead_of_moving() {
    let mut cluster = Cluster::start().await;
    let layer = layer(&cluster.pool).strict(true);
    let svc = cluster.stack(layer.clone());
    let mut clients: Vec<Client> = (0..30).map(|_| Client { cookie: None }).collect();
    let runs = join_all(clients.iter_mut().map(|c| c.run(&svc, 5))).await;
    let homes: Vec<String> = runs.iter().map(|s| all_same(s).unwrap().clone()).collect();

    let addr = cluster.kill("b").await;
    for (client, home) in clients.iter_mut().zip(&homes) {
        let result = client.get(&svc).await;
        if home == "b" {
            let err = result.unwrap_err();
            let unavailable = err
                .downcast_ref::<SessionUnavailable>()
                .expect("typed error");
            assert_eq!(unavailable.backend().as_str(), "b");
        } else {
            assert_eq!(result.unwrap().body(), home);
        }
    }
    assert_eq!(layer.stats().moved, 0);
    let refused = homes.iter().filter(|h| *h == "b").count() as u64;
    assert_eq!(layer.stats().strict_refusals, refused);

    // Back on b once it returns.
    cluster.revive("b", addr).await;
    for (client, home) in clients.iter_mut().zip(&homes) {
        assert_eq!(client.get(&svc).await.unwrap().body(), home);
    }
}
