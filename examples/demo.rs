//! The tour: a sticky, failing-over, health-checked reverse proxy in front of
//! three real HTTP servers, one of which dies and comes back while a few
//! hundred clients keep using it. No setup needed:
//!
//! ```sh
//! cargo run --release --features hyper-client --example demo
//! cargo run --release --features hyper-client --example demo -- --clients 500
//! ```
//!
//! Everything runs in this process, over real HTTP/1.1 on 127.0.0.1:
//!
//! * three backends `a`, `b`, `c` (hyper servers) answer every request with
//!   their own name;
//! * the proxy is hyper's server in front of
//!   `Sticky → BufferBody → Failover → Balance(RoundRobin) → [Health → HttpBackend]`:
//!   a signed session cookie inserted by the sticky layer (HAProxy's
//!   `cookie SRV insert`), sessions saved in a `FileStore` in a temporary
//!   directory, failover of GETs to another backend, passive ejection after
//!   5 failures in a row and an active HTTP probe (`GET /healthz`) every
//!   100 ms (rise 2, fall 2);
//! * the clients (300 by default) each keep their cookie, like browsers,
//!   and send a GET every 60 to 140 ms.
//!
//! The script: at t=2 s backend `b` is killed (its listener and every open
//! connection closed); at t=5 s it starts again on the same port; at
//! t=6.5 s new clients arrive; at t=9 s the clients stop. The timeline is
//! printed as it happens, then a summary. The demo exits with status 1 if a
//! single client request failed, a session moved other than once from `b`
//! to another backend, or no new session reached `b` once it returned.
//!
//! What to look for: no client request fails (the requests that hit the dead
//! backend are retried on another one), only `b`'s sessions move, each once,
//! and none moves back when `b` returns; new sessions reach `b` again.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{COOKIE, SET_COOKIE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, Instant};
use tower::{ServiceBuilder, ServiceExt};
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::error::{gateway_status, Report};
use tower_ha::extensions::PeerAddr;
use tower_ha::failover::{BufferBodyLayer, FailoverLayer, ReplayBody};
use tower_ha::health::{HealthChecker, HealthLayer, HttpProbe};
use tower_ha::http::{HttpBackend, HttpClient, ResponseBody};
use tower_ha::sticky::{CookieInsert, SessionKey, SessionMoved, StickyLayer};
use tower_ha::store::{FileStore, SessionStore};
use tower_ha::{BackendId, BoxError, HealthStatus, Pool};

const BACKENDS: [&str; 3] = ["a", "b", "c"];
const VICTIM: &str = "b";
const KILL_AT: Duration = Duration::from_secs(2);
const RESTART_AT: Duration = Duration::from_secs(5);
const NEW_CLIENTS_AT: Duration = Duration::from_millis(6500);
const STOP_AT: Duration = Duration::from_secs(9);
const NEW_CLIENTS: usize = 30;

type Body = ReplayBody<Incoming>;
type ProxyBody = Either<ResponseBody, Full<Bytes>>;

const USAGE: &str = "usage: demo [--clients N]   (N from 1 to 5000, default 300)";

fn usage(problem: &str) -> ! {
    eprintln!("error: {problem}");
    eprintln!("{USAGE}");
    std::process::exit(2)
}

fn clients_from_args() -> usize {
    let mut clients = 300;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--clients" => {
                clients = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| (1..=5000).contains(n))
                    .unwrap_or_else(|| usage("--clients needs a number from 1 to 5000"))
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    clients
}

/// Timestamped lines, relative to the start of the demo.
#[derive(Clone)]
struct Timeline {
    start: Instant,
}

impl Timeline {
    fn at(&self) -> Duration {
        self.start.elapsed()
    }

    fn log(&self, line: impl AsRef<str>) {
        println!("t={:5.2}s  {}", self.at().as_secs_f64(), line.as_ref());
    }
}

/// A backend HTTP server that answers every request with its name, and can
/// be killed (listener and open connections closed) and started again.
struct BackendServer {
    name: &'static str,
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    open: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

/// Counts a connection as open for as long as it lives.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BackendServer {
    async fn start(name: &'static str, addr: SocketAddr) -> std::io::Result<BackendServer> {
        let mut server = BackendServer {
            name,
            addr,
            served: Arc::default(),
            open: Arc::default(),
            task: None,
        };
        server.listen().await?;
        Ok(server)
    }

    /// Binds the server's address (port 0 the first time) and serves it.
    async fn listen(&mut self) -> std::io::Result<()> {
        let socket = TcpSocket::new_v4()?;
        // The old connections of a killed server may linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(self.addr)?;
        let listener = socket.listen(1024)?;
        self.addr = listener.local_addr()?;
        let (name, served, open) = (self.name, self.served.clone(), self.open.clone());
        self.task = Some(tokio::spawn(accept(listener, name, served, open)));
        Ok(())
    }

    /// Closes the listener and every open connection; answers how many
    /// connections were open.
    async fn kill(&mut self) -> usize {
        let open = self.open.load(Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        open
    }
}

async fn accept(
    listener: TcpListener,
    name: &'static str,
    served: Arc<AtomicU64>,
    open: Arc<AtomicUsize>,
) {
    // Owned by this task: aborting the task drops every connection.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, most likely: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        open.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard(open.clone());
        let served = served.clone();
        connections.spawn(async move {
            let _guard = guard;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                // The proxy's health probes are not client requests.
                if req.uri().path() != "/healthz" {
                    served.fetch_add(1, Ordering::Relaxed);
                }
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// What the proxy counted.
#[derive(Default)]
struct ProxyStats {
    requests: AtomicU64,
    gateway_errors: AtomicU64,
}

/// Serves `stack` over HTTP/1.1 on `listener`, as `examples/reverse_proxy.rs`
/// does.
async fn serve_proxy<S>(listener: TcpListener, stack: S, stats: Arc<ProxyStats>)
where
    S: tower::Service<Request<Incoming>, Response = Response<ResponseBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of file descriptors, most likely: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (stack, stats) = (stack.clone(), stats.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                let (stack, stats) = (stack.clone(), stats.clone());
                async move {
                    let result = stack.oneshot(req).await;
                    Ok::<_, Infallible>(respond(result, &stats))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The backend's response, or a gateway error that says why.
fn respond(
    result: Result<Response<ResponseBody>, BoxError>,
    stats: &ProxyStats,
) -> Response<ProxyBody> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(response) => response.map(Either::Left),
        Err(e) => {
            stats.gateway_errors.fetch_add(1, Ordering::Relaxed);
            let status = gateway_status(&*e);
            // A local demo: its clients print why. A proxy facing users
            // logs it instead (see reverse_proxy).
            let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!(
                "{}\n",
                Report(&*e)
            )))));
            *response.status_mut() = status;
            response
        }
    }
}

/// What one simulated client saw.
#[derive(Default)]
struct ClientReport {
    requests: u64,
    failed: u64,
    /// The backends that served it, in order, without repeats.
    homes: Vec<String>,
}

/// A browser-like client: keeps the cookie it is given, sends a GET every
/// `think` until `stop`.
async fn simulate_client(
    http: Client<HttpConnector, Empty<Bytes>>,
    proxy: SocketAddr,
    think: Duration,
    stop: Arc<AtomicBool>,
) -> ClientReport {
    let mut report = ClientReport::default();
    let mut cookie: Option<String> = None;
    let url = format!("http://{proxy}/cart");
    while !stop.load(Ordering::Relaxed) {
        report.requests += 1;
        let mut request = Request::get(url.as_str());
        if let Some(cookie) = &cookie {
            request = request.header(COOKIE, cookie);
        }
        let request = match request.body(Empty::new()) {
            Ok(request) => request,
            Err(_) => {
                report.failed += 1;
                break;
            }
        };
        match get(&http, request).await {
            Ok((set_cookie, name)) => {
                if let Some(set) = set_cookie {
                    cookie = Some(set);
                }
                if report.homes.last() != Some(&name) {
                    report.homes.push(name);
                }
            }
            Err(e) => {
                report.failed += 1;
                eprintln!("client request failed: {e}");
            }
        }
        sleep(think).await;
    }
    report
}

/// One GET: the cookie to keep (if the response set one) and the name of
/// the backend that answered.
async fn get(
    http: &Client<HttpConnector, Empty<Bytes>>,
    request: Request<Empty<Bytes>>,
) -> Result<(Option<String>, String), BoxError> {
    let response = http.request(request).await?;
    if response.status() != StatusCode::OK {
        return Err(format!("status {}", response.status()).into());
    }
    let set_cookie = response
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    let body = response.into_body().collect().await?.to_bytes();
    Ok((set_cookie, String::from_utf8_lossy(&body).into_owned()))
}

/// Prints a backend's health changes as the pool sees them.
async fn watch(pool: Pool<tower_ha::health::Health<HttpBackend<Body>>>, timeline: Timeline) {
    let mut last: BTreeMap<BackendId, (HealthStatus, bool)> = BTreeMap::new();
    loop {
        for id in pool.ids() {
            let Some(state) = pool.state(&id) else {
                continue;
            };
            let now = (state.health(), state.is_ejected());
            let Some(before) = last.insert(id.clone(), now) else {
                continue;
            };
            let id = id.as_str();
            if !before.1 && now.1 {
                timeline.log(format!(
                    "{id} ejected by passive health checking (5 failed requests in a row)"
                ));
            }
            if before.0 != now.0 {
                match now.0 {
                    HealthStatus::Unhealthy => timeline.log(format!(
                        "{id} marked unhealthy by the active HTTP probe (fall 2)"
                    )),
                    HealthStatus::Healthy => timeline.log(format!(
                        "{id} marked healthy by the active HTTP probe (rise 2)"
                    )),
                    other => timeline.log(format!("{id} is now {other:?}")),
                }
            }
            if before.1 && !now.1 {
                timeline.log(format!(
                    "{id} ejection lifted by a passing probe: {id} takes traffic again"
                ));
            }
        }
        sleep(Duration::from_millis(2)).await;
    }
}

fn share(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The current backend of each client, counted per backend.
fn sessions_per_backend(reports: &[ClientReport]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for report in reports {
        if let Some(home) = report.homes.last() {
            *counts.entry(home.clone()).or_default() += 1;
        }
    }
    counts
}

#[tokio::main]
async fn main() {
    let clients = clients_from_args();
    if let Err(e) = run(clients).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(clients: usize) -> Result<(), BoxError> {
    let timeline = Timeline {
        start: Instant::now(),
    };

    // The backends.
    let mut servers = BTreeMap::new();
    for name in BACKENDS {
        let server = BackendServer::start(name, "127.0.0.1:0".parse()?).await?;
        timeline.log(format!("backend {name} listening on {}", server.addr));
        servers.insert(name, server);
    }

    // The proxy's stack.
    let client = HttpClient::<Body>::new();
    let passive = HealthLayer::new().consecutive_failures(5);
    let pool = Pool::new();
    for server in servers.values() {
        let backend = HttpBackend::new(&client, format!("http://{}", server.addr))?;
        pool.insert(
            server.name,
            ServiceBuilder::new()
                .layer(passive.clone())
                .service(backend),
        );
    }
    // `GET /healthz` through each backend's own `HttpBackend`.
    let _checker = HealthChecker::new(pool.clone(), HttpProbe::new("/healthz"))
        .interval(Duration::from_millis(100))
        .timeout(Duration::from_millis(100))
        .jitter(Duration::from_millis(10))
        .rise(2)
        .fall(2)
        .spawn();

    let dir = tempfile::tempdir()?;
    // Every cookieless client starts a session: records unused for a day
    // expire, so the directory stays bounded.
    let store = FileStore::open(dir.path().join("sessions"))
        .await?
        .with_ttl(Duration::from_secs(24 * 3600));
    let moves: Arc<Mutex<Vec<(Duration, SessionMoved)>>> = Arc::default();
    let cookie = CookieInsert::new("SRV", rand::random::<[u8; 32]>()).secure(false);
    let sticky = {
        let (moves, timeline) = (moves.clone(), timeline.clone());
        StickyLayer::new(&pool, SessionKey::insert_cookie(cookie))
            .store(store.clone())
            .on_move(move |moved: SessionMoved| {
                let mut moves = moves.lock();
                if moves.is_empty() {
                    timeline.log(format!(
                        "first session moves {} → {} ({})",
                        moved.from.as_str(),
                        moved.session.backend.as_str(),
                        moved.reason
                    ));
                }
                moves.push((timeline.at(), moved));
                async { Ok::<(), BoxError>(()) }
            })
    };
    let failover = FailoverLayer::new().per_try_timeout(Duration::from_secs(2));
    let stack = ServiceBuilder::new()
        .layer(sticky.clone())
        .layer(BufferBodyLayer::new())
        .layer(failover.clone())
        .service(Balance::new(pool.clone(), RoundRobin::new()));

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy = listener.local_addr()?;
    let proxy_stats = Arc::new(ProxyStats::default());
    tokio::spawn(serve_proxy(listener, stack, proxy_stats.clone()));
    tokio::spawn(watch(pool.clone(), timeline.clone()));
    timeline.log(format!(
        "proxy listening on {proxy}: Sticky(cookie SRV, FileStore in {}) → BufferBody → \
         Failover → Balance(round robin) → [Health → HttpBackend] × 3, HTTP probe every 100 ms",
        dir.path().display()
    ));

    // The clients, started over the first half second.
    let http: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let stop = Arc::new(AtomicBool::new(false));
    let spawn_client = |i: usize, delay: Duration| {
        let (http, stop) = (http.clone(), stop.clone());
        let think = Duration::from_millis(60 + (i as u64 * 37) % 81);
        tokio::spawn(async move {
            sleep(delay).await;
            simulate_client(http, proxy, think, stop).await
        })
    };
    let mut tasks: Vec<JoinHandle<ClientReport>> = (0..clients)
        .map(|i| spawn_client(i, Duration::from_millis((i * 500 / clients) as u64)))
        .collect();
    timeline.log(format!("{clients} clients start, each keeping its cookie"));

    sleep_until(timeline.start + Duration::from_secs(1)).await;
    let sessions = sticky.stats().sessions;
    let served: Vec<String> = servers
        .values()
        .map(|s| format!("{} {}", s.name, s.served.load(Ordering::Relaxed)))
        .collect();
    timeline.log(format!(
        "{sessions} sessions, requests served so far: {}",
        served.join(", ")
    ));

    // Kill b.
    sleep_until(timeline.start + KILL_AT).await;
    let victim = servers.get_mut(VICTIM).ok_or("no victim")?;
    let open = victim.kill().await;
    timeline.log(format!(
        "backend {VICTIM} killed: listener closed, {open} open connections dropped"
    ));

    // Bring it back on the same port.
    sleep_until(timeline.start + RESTART_AT).await;
    {
        let moves = moves.lock();
        let mut to: BTreeMap<String, usize> = BTreeMap::new();
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, moved) in moves.iter() {
            *to.entry(moved.session.backend.as_str().to_owned())
                .or_default() += 1;
            *reasons.entry(moved.reason.as_str()).or_default() += 1;
        }
        if let (Some(first), Some(last)) = (moves.first(), moves.last()) {
            timeline.log(format!(
                "{} sessions moved {VICTIM} → {} between t={:.2}s and t={:.2}s (reasons: {})",
                moves.len(),
                share(&to),
                first.0.as_secs_f64(),
                last.0.as_secs_f64(),
                reasons
                    .iter()
                    .map(|(r, n)| format!("{r} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let victim = servers.get_mut(VICTIM).ok_or("no victim")?;
    victim.listen().await?;
    timeline.log(format!("backend {VICTIM} started again on {}", victim.addr));

    // Newcomers: b takes new sessions again.
    sleep_until(timeline.start + NEW_CLIENTS_AT).await;
    let newcomers: Vec<JoinHandle<ClientReport>> = (0..NEW_CLIENTS)
        .map(|i| spawn_client(clients + i, Duration::ZERO))
        .collect();
    timeline.log(format!("{NEW_CLIENTS} new clients arrive"));

    sleep_until(timeline.start + STOP_AT).await;
    stop.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    for task in tasks.drain(..) {
        reports.push(task.await?);
    }
    let mut fresh = Vec::new();
    for task in newcomers {
        fresh.push(task.await?);
    }
    timeline.log("clients stopped");

    // The summary.
    let moves = moves.lock().clone();
    let requests: u64 = reports.iter().chain(&fresh).map(|r| r.requests).sum();
    let failed: u64 = reports.iter().chain(&fresh).map(|r| r.failed).sum();
    let first_homes = {
        let mut counts = BTreeMap::new();
        for r in &reports {
            if let Some(home) = r.homes.first() {
                *counts.entry(home.clone()).or_default() += 1;
            }
        }
        counts
    };
    let last_homes = sessions_per_backend(&reports);
    let fresh_homes = sessions_per_backend(&fresh);
    let changed = reports.iter().filter(|r| r.homes.len() > 1).count();
    let moved_back = reports
        .iter()
        .filter(|r| r.homes.len() > 2 || (r.homes.len() == 2 && r.homes[1] == VICTIM))
        .count();
    // Saves of requests whose clients stopped waiting may still run.
    sticky.flush().await;
    let stored = store.load_all().await?;
    let mut stored_per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for session in &stored.sessions {
        *stored_per_backend
            .entry(session.backend.as_str().to_owned())
            .or_default() += 1;
    }

    println!();
    println!("backend | sessions before kill | sessions at end | new sessions after restart | requests served");
    println!("--------|----------------------|-----------------|----------------------------|----------------");
    for server in servers.values() {
        let n = |m: &BTreeMap<String, usize>| m.get(server.name).copied().unwrap_or(0);
        println!(
            "{:7} | {:20} | {:15} | {:26} | {:15}",
            server.name,
            n(&first_homes),
            n(&last_homes),
            n(&fresh_homes),
            server.served.load(Ordering::Relaxed)
        );
    }
    println!();
    let row = |label: &str, value: String| println!("{label:<32}{value}");
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
    row("client requests", requests.to_string());
    row("proxy requests", count(&proxy_stats.requests));
    let retries = failover.stats();
    row(
        "requests failed over",
        format!(
            "{} served by a retry ({} retries, {} gave up after a failure)",
            retries.recovered, retries.retries, retries.exhausted
        ),
    );
    row("gateway errors", count(&proxy_stats.gateway_errors));
    row("failed client requests", failed.to_string());
    row(
        "sessions moved (on_move)",
        format!("{} (sticky stats: {})", moves.len(), sticky.stats().moved),
    );
    row(
        "sessions that changed backend",
        format!("{changed} (as the clients saw it)"),
    );
    row("sessions moved back or twice", moved_back.to_string());
    row(
        "sessions in the FileStore",
        format!("{} ({})", stored.sessions.len(), share(&stored_per_backend)),
    );

    let moved_off_victim = moves
        .iter()
        .all(|(_, m)| m.from.as_str() == VICTIM && m.session.backend.as_str() != VICTIM);
    if failed > 0 {
        return Err(format!("{failed} client requests failed").into());
    }
    if moved_back > 0 || !moved_off_victim {
        return Err("a session moved when it should not have".into());
    }
    if fresh_homes.get(VICTIM).is_none_or(|&n| n == 0) {
        return Err(format!("no new session reached {VICTIM} after its restart").into());
    }
    Ok(())
}
