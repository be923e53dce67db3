//! How fast health checking takes a dead backend out of rotation, measured
//! against real HTTP servers on 127.0.0.1.
//!
//! 1. Active checks (`HttpProbe` on `/healthz`, interval 100 ms, fall 2, no
//!    jitter): three backends under continuous load; one is killed (listener
//!    and connections closed) at a random moment; the time from its death to
//!    the last request the balancer sent it. Median over 20 runs.
//! 2. Passive ejection alone (`HealthLayer`, 5 consecutive failures):
//!    sequential requests; one backend is killed; how many requests failed
//!    on it before it was ejected. Over 20 runs.
//!
//! Run it with `cargo run --release --example health_detection`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::error::{find, BackendError};
use tower_ha::health::{HealthChecker, HealthLayer, HttpProbe};
use tower_ha::Pool;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = Empty<Bytes>;

const RUNS: usize = 20;

/// A hyper server on 127.0.0.1 that answers 200 everywhere.
struct Server {
    addr: SocketAddr,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Server {
    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let conns = tasks.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"ok",
                    ))))
                });
                let conn = tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                conns.lock().push(conn.abort_handle());
            }
        });
        tasks.lock().push(accept.abort_handle());
        Server { addr, tasks }
    }

    /// Closes the listener and every connection.
    fn kill(&self) {
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A backend: a pooled hyper client bound to one server, which records when
/// it was last called.
#[derive(Clone)]
struct Backend {
    client: Client<HttpConnector, Body>,
    addr: SocketAddr,
    last_call: Arc<Mutex<Option<Instant>>>,
}

impl Backend {
    fn new(addr: SocketAddr) -> Self {
        Backend {
            client: Client::builder(TokioExecutor::new()).build_http(),
            addr,
            last_call: Arc::default(),
        }
    }
}

impl Service<Request<Body>> for Backend {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let is_probe = req.uri().path() == "/healthz";
        if !is_probe {
            *self.last_call.lock() = Some(Instant::now());
        }
        let path = req.uri().path().to_owned();
        let uri: Result<Uri, _> = format!("http://{}{}", self.addr, path).parse();
        let client = self.client.clone();
        Box::pin(async move {
            *req.uri_mut() = uri?;
            Ok(client.request(req).await?)
        })
    }
}

async fn start_three() -> (Vec<Server>, Vec<Backend>) {
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    for _ in 0..3 {
        let server = Server::start().await;
        backends.push(Backend::new(server.addr));
        servers.push(server);
    }
    (servers, backends)
}

/// One run of the active measurement: death to last request, in ms.
async fn active_run(run: usize) -> f64 {
    let (servers, backends) = start_three().await;
    let pool = Pool::new();
    for (i, b) in backends.iter().enumerate() {
        pool.insert(format!("b{i}"), b.clone());
    }
    let checker = HealthChecker::new(pool.clone(), HttpProbe::<Body>::new("/healthz"))
        .interval(Duration::from_millis(100))
        .jitter(Duration::ZERO)
        .fall(2)
        .spawn();
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    // Four clients sending back to back, failures included.
    let load: Vec<_> = (0..4)
        .map(|_| {
            let balance = balance.clone();
            tokio::spawn(async move {
                loop {
                    let _ = balance.clone().oneshot(Request::new(Body::new())).await;
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    // Kill b0 at a moment spread over the probe interval.
    let warmup = 300 + (run as u64 * 37) % 100;
    tokio::time::sleep(Duration::from_millis(warmup)).await;
    let death = Instant::now();
    servers[0].kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for task in &load {
        task.abort();
    }
    checker.shutdown().await;
    let last = backends[0].last_call.lock().expect("b0 was called");
    let unhealthy = pool.state(&"b0".into()).expect("b0").health();
    assert_eq!(
        unhealthy,
        tower_ha::HealthStatus::Unhealthy,
        "b0 not detected"
    );
    last.saturating_duration_since(death).as_secs_f64() * 1000.0
}

/// One run of the passive measurement: failed requests on the dead backend
/// before it was ejected.
async fn passive_run() -> usize {
    let (servers, backends) = start_three().await;
    let health = HealthLayer::new().consecutive_failures(5);
    let pool = Pool::new();
    for (i, b) in backends.iter().enumerate() {
        pool.insert(format!("b{i}"), health.layer(b.clone()));
    }
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    for _ in 0..30 {
        let r = balance.clone().oneshot(Request::new(Body::new())).await;
        assert_eq!(r.expect("all up").status(), StatusCode::OK);
    }
    servers[0].kill();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut failed_on_b0 = 0;
    for _ in 0..300 {
        if let Err(e) = balance.clone().oneshot(Request::new(Body::new())).await {
            if find::<BackendError>(&*e).is_some_and(|e| e.backend().as_str() == "b0") {
                failed_on_b0 += 1;
            }
        }
    }
    assert!(pool.state(&"b0".into()).expect("b0").is_ejected());
    failed_on_b0
}

#[tokio::main]
async fn main() {
    let mut times = Vec::with_capacity(RUNS);
    for run in 0..RUNS {
        let ms = active_run(run).await;
        println!("active run {run:2}: death to last request {ms:7.1} ms");
        times.push(ms);
    }
    times.sort_by(f64::total_cmp);
    let median = (times[RUNS / 2 - 1] + times[RUNS / 2]) / 2.0;
    println!(
        "active (interval 100 ms, fall 2): median {median:.1} ms, min {:.1} ms, max {:.1} ms over {RUNS} runs",
        times[0],
        times[RUNS - 1]
    );

    let mut failures = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        failures.push(passive_run().await);
    }
    println!(
        "passive (5 consecutive failures): failed requests before ejection per run: {failures:?}"
    );
}
