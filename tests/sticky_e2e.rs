//! End to end against real HTTP servers on 127.0.0.1: Sticky → Balance
//! over three hyper backends, and (feature `hyper-client`) the full stack
//! Sticky → BufferBody → Failover → Balance → `HttpBackend`.

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
use tower_ha::{BoxError, HealthStatus, Pool};

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
            .set_health(HealthStatus::Unhealthy);
        addr
    }

    /// Starts backend `name` again on its old address and marks it healthy.
    async fn revive(&mut self, name: &'static str, addr: std::net::SocketAddr) {
        self.servers.insert(name, Server::start(name, addr).await);
        self.pool
            .state(&name.into())
            .unwrap()
            .set_health(HealthStatus::Healthy);
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
            assert_eq!(unavailable.backend().unwrap().as_str(), "b");
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

/// The full stack, Sticky → BufferBody → Failover → Balance → the crate's
/// own `HttpBackend`, against real servers on 127.0.0.1.
#[cfg(feature = "hyper-client")]
mod over_failover {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use futures::future::join_all;
    use http::header::{COOKIE, SET_COOKIE};
    use http::{Method, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use parking_lot::Mutex;
    use tokio::net::TcpListener;
    use tokio::task::{JoinHandle, JoinSet};
    use tower::{ServiceBuilder, ServiceExt};
    use tower_ha::balance::{Balance, BalanceLayer, RoundRobin};
    use tower_ha::error::{find, BackendError};
    use tower_ha::extensions::{Attempts, ServedBy};
    use tower_ha::failover::{BufferBody, BufferBodyLayer, Failover, FailoverLayer, ReplayBody};
    use tower_ha::http::{HttpBackend, HttpClient, ResponseBody};
    use tower_ha::sticky::{
        CookieInsert, MoveReason, SessionKey, SessionMoved, SessionUnavailable, Sticky, StickyLayer,
    };
    use tower_ha::store::{MemoryStore, SessionStore};
    use tower_ha::{BoxError, Pool};

    use super::{all_same, CLIENTS, SECRET};

    type Body = Full<Bytes>;
    type Backend = HttpBackend<ReplayBody<Body>>;
    type Stack = Sticky<BufferBody<Failover<Balance<Backend, RoundRobin>>>>;

    /// A backend server that answers its name, counts the requests it
    /// receives and, while `hang_up` is set, closes the connection after
    /// reading a request instead of answering it.
    struct Server {
        task: JoinHandle<()>,
        addr: SocketAddr,
        requests: Arc<AtomicUsize>,
        hang_up: Arc<AtomicBool>,
    }

    impl Server {
        async fn start(name: &'static str, addr: SocketAddr) -> Server {
            let listener = TcpListener::bind(addr).await.expect("bind");
            let addr = listener.local_addr().unwrap();
            let requests = Arc::new(AtomicUsize::new(0));
            let hang_up = Arc::new(AtomicBool::new(false));
            let (count, hang) = (requests.clone(), hang_up.clone());
            let task = tokio::spawn(async move {
                // Dropped with this task when the server is killed: every
                // open connection is closed too.
                let mut connections = JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (count, hang) = (count.clone(), hang.clone());
                    connections.spawn(async move {
                        let svc = hyper::service::service_fn(move |_req| {
                            count.fetch_add(1, Ordering::SeqCst);
                            let hang = hang.load(Ordering::SeqCst);
                            async move {
                                if hang {
                                    // An error from the service closes the
                                    // connection without a response.
                                    return Err("hanging up");
                                }
                                Ok::<_, &str>(Response::new(Full::new(Bytes::from_static(
                                    name.as_bytes(),
                                ))))
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                    while connections.try_join_next().is_some() {}
                }
            });
            Server {
                task,
                addr,
                requests,
                hang_up,
            }
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }

        fn hang_up(&self, on: bool) {
            self.hang_up.store(on, Ordering::SeqCst);
        }

        /// Stops the server: its listener and every connection close.
        async fn kill(self) -> SocketAddr {
            self.task.abort();
            let _ = self.task.await;
            self.addr
        }
    }

    struct Cluster {
        pool: Pool<Backend>,
        client: HttpClient<ReplayBody<Body>>,
        servers: HashMap<&'static str, Server>,
    }

    impl Cluster {
        async fn start() -> Cluster {
            Cluster::start_with(HttpClient::new()).await
        }

        async fn start_with(client: HttpClient<ReplayBody<Body>>) -> Cluster {
            let mut cluster = Cluster {
                pool: Pool::new(),
                client,
                servers: HashMap::new(),
            };
            for name in ["a", "b", "c"] {
                cluster
                    .serve(name, crate::support::restartable_addr())
                    .await;
            }
            cluster
        }

        /// Starts backend `name` on `addr` and puts it in the pool.
        async fn serve(&mut self, name: &'static str, addr: SocketAddr) {
            let server = Server::start(name, addr).await;
            let url = format!("http://{}", server.addr);
            if self.pool.state(&name.into()).is_none() {
                self.pool
                    .insert(name, HttpBackend::new(&self.client, url).unwrap());
            }
            self.servers.insert(name, server);
        }

        /// Kills backend `name`'s server, leaving the backend in the pool
        /// and marked available: nothing tells the balancer it is dead.
        async fn kill(&mut self, name: &'static str) -> SocketAddr {
            let addr = self.servers.remove(name).unwrap().kill().await;
            assert!(self.pool.state(&name.into()).unwrap().is_available());
            addr
        }

        fn stack(&self, layer: StickyLayer) -> Stack {
            ServiceBuilder::new()
                .layer(layer)
                .layer(BufferBodyLayer::new())
                // Every failed first attempt must fail over here; the
                // budget has its own tests.
                .layer(FailoverLayer::new().no_budget())
                .layer(BalanceLayer::new(RoundRobin::new()))
                .service(self.pool.clone())
        }
    }

    /// What a client got for one request.
    struct Answer {
        served: String,
        set_cookie: bool,
        attempts: Option<Vec<String>>,
    }

    /// A browser-like client: keeps the affinity cookie it is given.
    struct Client {
        cookie: Option<String>,
    }

    impl Client {
        fn new() -> Client {
            Client { cookie: None }
        }

        async fn send(&mut self, svc: &Stack, method: Method) -> Result<Answer, BoxError> {
            let mut req = Request::builder().method(method).uri("/work");
            if let Some(cookie) = &self.cookie {
                req = req.header(COOKIE, cookie);
            }
            let res: Response<ResponseBody> = svc
                .clone()
                .oneshot(req.body(Body::new(Bytes::new())).unwrap())
                .await?;
            assert_eq!(res.status(), StatusCode::OK);
            let set = res.headers().get(SET_COOKIE).map(|set| {
                let pair = set.to_str().unwrap().split(';').next().unwrap();
                pair.to_owned()
            });
            let served_by = res.extensions().get::<ServedBy>().unwrap().0.clone();
            let attempts = res
                .extensions()
                .get::<Attempts>()
                .map(|a| a.as_slice().iter().map(|id| id.to_string()).collect());
            let served = String::from_utf8(res.into_body().collect().await?.to_bytes().to_vec())?;
            assert_eq!(served, served_by.as_str(), "ServedBy names who answered");
            if let Some(pair) = &set {
                self.cookie = Some(pair.clone());
            }
            Ok(Answer {
                served,
                set_cookie: set.is_some(),
                attempts,
            })
        }

        /// `n` GETs, none of which may fail.
        async fn run(&mut self, svc: &Stack, n: usize) -> Vec<Answer> {
            let mut answers = Vec::with_capacity(n);
            for _ in 0..n {
                answers.push(self.send(svc, Method::GET).await.expect("no error"));
            }
            answers
        }
    }

    fn layer(pool: &Pool<Backend>) -> StickyLayer {
        let cookie = CookieInsert::new("srv", SECRET).secure(false);
        StickyLayer::new(pool, SessionKey::insert_cookie(cookie))
    }

    fn served(answers: &[Answer]) -> Vec<String> {
        answers.iter().map(|a| a.served.clone()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_backends_sessions_move_in_the_failed_over_request_once() {
        let mut cluster = Cluster::start().await;
        let moves: Arc<Mutex<Vec<SessionMoved>>> = Arc::default();
        let seen = moves.clone();
        let store = MemoryStore::new();
        let layer = layer(&cluster.pool)
            .store(store.clone())
            .on_move(move |m: SessionMoved| {
                seen.lock().push(m);
                async { Ok::<(), BoxError>(()) }
            });
        let svc = cluster.stack(layer.clone());

        // 200 clients, 50 requests each, all at once: each stays on one
        // backend.
        let mut clients: Vec<Client> = (0..CLIENTS).map(|_| Client::new()).collect();
        let runs = join_all(clients.iter_mut().map(|c| c.run(&svc, 50))).await;
        let homes: Vec<String> = runs
            .iter()
            .map(|answers| {
                all_same(&served(answers))
                    .expect("a client changed backend")
                    .clone()
            })
            .collect();
        let count = |name: &str| homes.iter().filter(|h| *h == name).count();
        for name in ["a", "b", "c"] {
            assert!(count(name) >= CLIENTS / 3 - 1, "{name}: {}", count(name));
        }
        assert_eq!(layer.stats().created, CLIENTS as u64);
        assert_eq!(layer.stats().moved, 0);

        // b dies, and nobody marks it unhealthy: failover finds out.
        let addr = cluster.kill("b").await;
        let runs = join_all(clients.iter_mut().map(|c| c.run(&svc, 10))).await;
        let mut new_homes = Vec::new();
        for (answers, home) in runs.iter().zip(&homes) {
            let now = all_same(&served(answers))
                .expect("a session moved twice or moved late")
                .clone();
            let first = &answers[0];
            if home == "b" {
                assert_ne!(now, "b");
                // Moved by the very request that failed over: it tried b,
                // was served elsewhere, and carries the new cookie.
                assert_eq!(
                    first.attempts.as_deref(),
                    Some(&["b".to_owned(), now.clone()][..])
                );
                assert!(first.set_cookie, "the moving response reissues the cookie");
            } else {
                assert_eq!(&now, home, "a session on a live backend moved");
                assert!(first.attempts.is_none() && !first.set_cookie);
            }
            assert!(answers[1..]
                .iter()
                .all(|a| !a.set_cookie && a.attempts.is_none()));
            new_homes.push(now);
        }
        let moved = count("b");
        assert_eq!(layer.stats().moved, moved as u64);
        {
            let moves = moves.lock();
            assert_eq!(
                moves.len(),
                moved,
                "each of b's sessions moved exactly once"
            );
            let mut keys: Vec<&str> = moves.iter().map(|m| m.session.key.as_str()).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), moved, "a session moved twice");
            for m in moves.iter() {
                assert_eq!(m.from.as_str(), "b");
                assert_eq!(m.reason, MoveReason::ServedElsewhere);
                assert_ne!(m.session.backend.as_str(), "b");
            }
        }
        // The store follows the moves.
        let moved_sessions: Vec<SessionMoved> = moves.lock().clone();
        for m in &moved_sessions {
            let stored = store.load(&m.session.key).await.unwrap().unwrap();
            assert_eq!(stored.backend, m.session.backend);
        }

        // b comes back: nobody moves back.
        cluster.serve("b", addr).await;
        let runs = join_all(clients.iter_mut().map(|c| c.run(&svc, 10))).await;
        for (answers, now) in runs.iter().zip(&new_homes) {
            assert_eq!(all_same(&served(answers)), Some(now));
        }
        assert_eq!(layer.stats().moved, moved as u64);
        assert_eq!(
            cluster.servers["b"].requests(),
            0,
            "b serves no old session"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn strict_mode_over_failover_answers_session_unavailable() {
        // A connection per request. A kept-alive one to b may not have seen
        // b close it yet when a request is written on it; that request fails
        // as sent (see `HttpClient`), and strict mode returns such a failure
        // as it is. This test is about the refused connection of a dead
        // backend.
        let mut cluster = Cluster::start_with(HttpClient::new().idle_timeout(Duration::ZERO)).await;
        let layer = layer(&cluster.pool).strict(true);
        let svc = cluster.stack(layer.clone());
        let mut clients: Vec<Client> = (0..30).map(|_| Client::new()).collect();
        let runs = join_all(clients.iter_mut().map(|c| c.run(&svc, 5))).await;
        let homes: Vec<String> = runs
            .iter()
            .map(|a| all_same(&served(a)).unwrap().clone())
            .collect();

        let addr = cluster.kill("b").await;
        for (client, home) in clients.iter_mut().zip(&homes) {
            let cookie = client.cookie.clone();
            let result = client.send(&svc, Method::GET).await;
            if home == "b" {
                let err = result.err().expect("a b session is refused");
                let unavailable = err
                    .downcast_ref::<SessionUnavailable>()
                    .unwrap_or_else(|| panic!("typed error: {err:?}"));
                assert_eq!(unavailable.backend().unwrap().as_str(), "b");
                let sid = cookie.as_deref().unwrap().strip_prefix("srv=").unwrap();
                assert!(
                    sid.starts_with(unavailable.key()),
                    "{sid} {}",
                    unavailable.key()
                );
            } else {
                assert_eq!(&result.unwrap().served, home);
            }
        }
        let refused = homes.iter().filter(|h| *h == "b").count() as u64;
        assert!(refused > 0);
        assert_eq!(layer.stats().moved, 0);
        assert_eq!(layer.stats().strict_refusals, refused);

        // Back on b once it returns.
        cluster.serve("b", addr).await;
        for (client, home) in clients.iter_mut().zip(&homes) {
            assert_eq!(&client.send(&svc, Method::GET).await.unwrap().served, home);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failover_keeps_the_attempts_entry_sticky_sets() {
        let cluster = Cluster::start().await;
        let moves: Arc<Mutex<Vec<SessionMoved>>> = Arc::default();
        let seen = moves.clone();
        let layer = layer(&cluster.pool).on_move(move |m: SessionMoved| {
            seen.lock().push(m);
            async { Ok::<(), BoxError>(()) }
        });
        let svc = cluster.stack(layer.clone());
        let server = |name: &str| &cluster.servers[name];

        // A fresh round robin sends the first session to a.
        let mut client = Client::new();
        assert_eq!(client.send(&svc, Method::GET).await.unwrap().served, "a");

        // a takes a POST and hangs up: sent, so not retried; the session
        // is marked failed.
        server("a").hang_up(true);
        let err = client
            .send(&svc, Method::POST)
            .await
            .err()
            .expect("not retried");
        let failed = find::<BackendError>(&*err).expect("the backend's error");
        assert_eq!(failed.backend().as_str(), "a");
        assert!(!failed.is_not_sent());
        server("a").hang_up(false);
        let a_before = server("a").requests();

        // The next request is kept off a through Sticky's `Attempts`
        // entry, though a is healthy again. b hangs up on it, so failover
        // retries: the retry must still exclude a, and the history lists
        // the request's own attempts.
        server("b").hang_up(true);
        let answer = client.send(&svc, Method::GET).await.unwrap();
        assert_eq!(answer.served, "c");
        assert_eq!(
            answer.attempts.as_deref(),
            Some(&["b", "c"].map(String::from)[..])
        );
        assert_eq!(server("a").requests(), a_before, "a never saw the request");
        assert!(answer.set_cookie);
        let moved: Vec<SessionMoved> = moves.lock().clone();
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].from.as_str(), "a");
        assert_eq!(moved[0].session.backend.as_str(), "c");
        assert_eq!(moved[0].reason, MoveReason::Failed);
        server("b").hang_up(false);
        assert_eq!(client.send(&svc, Method::GET).await.unwrap().served, "c");
    }
}
