//! A real reverse proxy built from tower-ha: hyper's HTTP/1.1 and HTTP/2
//! server in front of `[Sticky →] BufferBody → Failover → Balance →
//! [Health → HttpBackend]`, with active health checks (TCP connects, or
//! HTTP requests with `--health-path`). WebSocket connections (and other
//! protocol upgrades) are proxied too, and so are gRPC calls (with
//! `--http2`, feature `http2`, for backends that speak only HTTP/2).
//!
//! ```sh
//! cargo run --release --features hyper-client --example reverse_proxy -- \
//!     --listen 127.0.0.1:8080 --strategy round-robin \
//!     http://127.0.0.1:9001 http://127.0.0.1:9002 http://127.0.0.1:9003
//! ```
//!
//! `--help` lists the flags, with their defaults (`HELP` below).
//!
//! A backend that stops in the middle of a response body is left after the
//! client's read timeout (`HttpClient::read_timeout`, 60 s); one that cuts
//! a body short counts as failed. A failed
//! request is answered 400, 408, 502, 503 or 504 with the status's name alone
//! (a failed gRPC call, `200 OK` with its `grpc-status`);
//! what failed (backend addresses, system errors) goes to standard error,
//! with tower-ha's own events (a backend marked unhealthy, ejected or
//! restored, a session moved) through a `tracing` subscriber, at `info`
//! and above unless `RUST_LOG` says otherwise (`RUST_LOG=info` also logs
//! each request failed over; `RUST_LOG=tower_ha=debug`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_ha::balance::{
    Balance, ConsistentHash, LeastRequest, Random, RoundRobin, Strategy, WeightedRoundRobin,
};
use tower_ha::error::{gateway_status, GrpcCall, Report};
use tower_ha::extensions::PeerAddr;
use tower_ha::failover::{BufferBodyLayer, FailoverLayer, ReplayBody};
use tower_ha::health::{probe_fn, CheckerHandle, HealthChecker, HealthLayer, HttpProbe, Probe};
use tower_ha::http::{HttpBackend, HttpClient, ResponseBody, SendTimeout};
use tower_ha::key::{self, RequestKey};
use tower_ha::sticky::{CookieInsert, SessionKey, StickyLayer};
use tower_ha::{BackendId, BoxError, Pool};

#[path = "support/front.rs"]
mod front;
use front::{Front, Limits};

type Body = ReplayBody<Incoming>;
type ProxyBody = Either<ResponseBody, Full<Bytes>>;

// Many small allocations per request (headers, extensions, futures):
// mimalloc serves them with less CPU than the system allocator, which
// shows in requests per second under load (docs/benchmarks.md). Any
// global allocator works; the proxy does not depend on this one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Options {
    listen: SocketAddr,
    workers: usize,
    strategy: String,
    hash_key: Option<String>,
    sticky: Option<String>,
    max_in_flight: Option<usize>,
    queue: (usize, Duration),
    health: bool,
    health_path: Option<HttpProbe<Body>>,
    probe_interval: Duration,
    probe_timeout: Duration,
    per_try_timeout: Option<Duration>,
    deadline: Option<Duration>,
    header_read_timeout: Option<Duration>,
    send_timeout: Option<Duration>,
    drain: Duration,
    max_connections: usize,
    max_buffered: usize,
    http2: bool,
    backends: Vec<String>,
}

const HELP: &str = "\
usage: reverse_proxy [FLAGS] BACKEND_URL[,weight=N][,id=NAME]...

Each backend is known by its id: NAME, else its host and port (in one
spelling: lower case, port 80 written, IPv6 in its shortest form), except
with --sticky cookie:NAME, whose cookie a client can read: there the
default id is a digest of the host and port keyed by the cookie's secret.

  --listen ADDR            listen there (default 127.0.0.1:8080)
  --workers N              runtime worker threads (default 1, at most 1024)
  --strategy NAME          round-robin (default), random, least-request,
                           weighted, ring or maglev; all but round-robin
                           and random follow each backend's ,weight=N
                           (default 1), which those two refuse
  --hash-key KEY           for ring and maglev: header:NAME, cookie:NAME,
                           client-ip (default: the address of the peer this
                           proxy accepted) or forwarded-for:N (behind N
                           proxies of yours: the X-Forwarded-For entry the
                           outermost of them wrote, which a client cannot
                           forge, else the peer)
  --sticky KIND:NAME       keeps each client's session on one backend, moved
                           only when that backend cannot serve it:
                           cookie:NAME issues a signed cookie NAME naming the
                           backend (secret: TOWER_HA_STICKY_SECRET, at least
                           32 bytes, else a random one, so cookies end with
                           the process); learn:NAME follows the application's
                           own session cookie (JSESSIONID); header:NAME a
                           session header
  --max-in-flight N        at most N requests at once per backend (default:
                           no limit); with every backend full, a request is
                           answered 503 at once; a request of a --sticky
                           session still goes to its backend over the limit
                           (moving it for a burst would lose its state)
  --queue N,MS             up to N requests wait up to MS ms for a place when
                           every backend is full (with --max-in-flight)
  --health-path PATH       probe each backend with GET PATH through its own
                           client, passing on a 2xx (default: a TCP connect)
  --probe-interval MS      between probes (default 500)
  --probe-timeout MS       a probe that takes longer fails (default 1000)
  --no-health              no passive ejection and no probes
  --per-try-timeout MS     gives up on a backend whose response head has not
                           come within MS ms and tries the next (a POST or
                           other non-idempotent request only if it was not
                           sent yet: else 504) (default 15000; 0 for none)
  --deadline MS            gives up on a request, whatever the attempts left,
                           after MS ms without a response head (default
                           30000; 0 for none); a gRPC call's shorter
                           grpc-timeout takes its place
  --header-read-timeout MS closes a client connection that has not sent a
                           whole request head within MS ms, an idle kept-alive
                           one included (default 30000; 0 for none: an
                           hour); over HTTP/2, one whose first request has
                           not come within MS ms (a client that connects
                           ahead of its first call connects again)
  --send-timeout MS        closes a client connection that has taken none of
                           its response for MS ms, or whose every open
                           response has waited that long for the client to
                           take a frame, none moving; and gives up a
                           response whose client has left a frame of it for
                           MS ms, so that a client that stops reading frees
                           its backend's connection and its place under
                           --max-in-flight (default 60000, as nginx's
                           send_timeout; 0 for none)
  --http2                  speaks HTTP/2 (prior knowledge) to every backend,
                           as gRPC servers need (feature http2); clients
                           are served HTTP/1.1 or HTTP/2 either way
  --max-connections N      at most N client connections open at once, a
                           WebSocket (or other upgraded) tunnel's included;
                           a new one that finds them all taken waits
                           (others in the listen backlog) while up to 32
                           that have served a request and have none open
                           are closed (over HTTP/2 with a GOAWAY)
                           (default: half the limit of open files, 512 where
                           it is unknown; raise that limit with ulimit -n or
                           systemd's LimitNOFILE). The rest is left for
                           connections to backends, about one per request in
                           flight: --max-in-flight bounds those
  --max-buffered MIB       at most MIB MiB of request bodies held at once
                           for retries (each up to 64 KiB); a body past it
                           is passed on as it comes, and retried only until
                           a backend reads it (default 256)
  --drain MS               on SIGINT or SIGTERM: stops accepting, lets each
                           connection finish its request and each WebSocket
                           (or other upgraded) tunnel end, exits when none is
                           left or after MS ms (default 10000); a second
                           signal exits at once
  -h, --help               this

Logs go to standard error: the proxy's own lines, the 5xx answers it gave
and why (at most 10 a second, the others counted), and tower-ha's events
(backends marked unhealthy, ejected or restored), at info and above;
RUST_LOG sets other levels (RUST_LOG=warn; RUST_LOG=info also logs each
request failed over; RUST_LOG=info,tower_ha=debug more).

A client connection with no request open for an hour (up to two) is closed
(over HTTP/2, with a GOAWAY), and so is an HTTP/2 one whose client answers no
PING within a minute (one is sent each minute), or resets at least half of
its requests before their answers, each within a second of sending it (250
such resets, or half of 500 requests or more: a rapid reset attack, Envoy's
thresholds; a gRPC client whose calls mostly end at deadlines under a second
is closed too, and connects again). An HTTP/2 connection carries at most 128
requests at once. A connection closed so has 30 s to finish the requests
under way (at a stop, --drain if it is longer). Uploads do not count as a
connection moving for --send-timeout: a client that sends a stream and reads
its answers only at its end can lose its connection.

The deadline counts from the call, the upload of a body over 64 KiB
(streamed, not buffered) included: raise it, or turn it off, in front of
applications that take long uploads. The per-try timeout counts from the
backend's last read of such an upload, and waits while the client is slow to
send it. With the deadline above 60 s, a client that stops sending a
streamed body is given up after the client's read timeout (60 s) with a 408,
counted against no backend; a body still
being buffered (under 64 KiB) is given up 60 s after its last part came,
with a 408 too, before any backend is called.
";

/// `info` and above, but for each request's failover (`info` under
/// `tower_ha::failover`): those come with requests, as many as the retry
/// budget lets through, where the others come with changes of backends.
const DEFAULT_LOG: &str = "info,tower_ha::failover=warn";

/// Logs the proxy's lines and tower-ha's events to standard error, at the
/// levels `RUST_LOG` asks (`target=level` directives, e.g.
/// `warn,tower_ha=debug`),
/// else [`DEFAULT_LOG`]. A standard error that fails does not make the
/// proxy panic: the line is lost.
fn start_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let directives = std::env::var("RUST_LOG").ok();
    let filter: Targets = match directives.as_deref().map(str::trim) {
        Some(directives) if !directives.is_empty() => directives
            .parse()
            .unwrap_or_else(|e| usage(&format!("bad RUST_LOG {directives:?}: {e}"))),
        _ => DEFAULT_LOG.parse().expect("valid directives"),
    };
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    tracing_subscriber::registry().with(log).with(filter).init();
}

fn usage(problem: &str) -> ! {
    eprintln!("error: {problem}");
    eprintln!("usage: reverse_proxy [FLAGS] BACKEND_URL... (--help lists the flags)");
    std::process::exit(2)
}

fn options() -> Options {
    let mut o = Options {
        listen: "127.0.0.1:8080".parse().unwrap(),
        workers: 1,
        strategy: "round-robin".into(),
        hash_key: None,
        sticky: None,
        max_in_flight: None,
        queue: (0, Duration::ZERO),
        health: true,
        health_path: None,
        probe_interval: Duration::from_millis(500),
        probe_timeout: Duration::from_secs(1),
        per_try_timeout: Some(Duration::from_secs(15)),
        deadline: Some(Duration::from_secs(30)),
        header_read_timeout: Some(Duration::from_secs(30)),
        send_timeout: Some(Duration::from_secs(60)),
        drain: Duration::from_secs(10),
        max_connections: default_max_connections(),
        max_buffered: 256 << 20,
        http2: false,
        backends: Vec::new(),
    };
    // Milliseconds, 0 for none.
    let millis = |value: String, flag: &str| {
        let ms: u64 = value
            .parse()
            .unwrap_or_else(|_| usage(&format!("bad {flag}")));
        (ms > 0).then(|| Duration::from_millis(ms))
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--listen" => {
                o.listen = value("--listen")
                    .parse()
                    .unwrap_or_else(|_| usage("bad --listen address"))
            }
            "--workers" => {
                o.workers = value("--workers")
                    .parse()
                    .ok()
                    .filter(|n| (1..=1024).contains(n))
                    .unwrap_or_else(|| usage("bad --workers (want 1 to 1024)"))
            }
            "--strategy" => o.strategy = value("--strategy"),
            "--hash-key" => o.hash_key = Some(value("--hash-key")),
            "--sticky" => o.sticky = Some(value("--sticky")),
            "--max-in-flight" => {
                let n = match value("--max-in-flight").parse() {
                    Ok(n) if n > 0 => n,
                    _ => usage("bad --max-in-flight (want a whole number above 0)"),
                };
                o.max_in_flight = Some(n);
            }
            "--queue" => {
                let spec = value("--queue");
                // A zero in either part would turn the queue off.
                let parsed = spec.split_once(',').and_then(|(n, ms)| {
                    let (n, ms): (usize, u64) = (n.parse().ok()?, ms.parse().ok()?);
                    (n > 0 && ms > 0).then(|| (n, Duration::from_millis(ms)))
                });
                o.queue = parsed.unwrap_or_else(|| usage("bad --queue (want N,MS, both above 0)"));
            }
            "--no-health" => o.health = false,
            "--probe-interval" => {
                o.probe_interval = millis(value("--probe-interval"), "--probe-interval")
                    .unwrap_or_else(|| usage("bad --probe-interval (want 1 or more)"));
            }
            "--probe-timeout" => {
                o.probe_timeout = millis(value("--probe-timeout"), "--probe-timeout")
                    .unwrap_or_else(|| usage("bad --probe-timeout (want 1 or more)"));
            }
            "--per-try-timeout" => {
                o.per_try_timeout = millis(value("--per-try-timeout"), "--per-try-timeout")
            }
            "--deadline" => o.deadline = millis(value("--deadline"), "--deadline"),
            "--header-read-timeout" => {
                o.header_read_timeout =
                    millis(value("--header-read-timeout"), "--header-read-timeout")
            }
            "--send-timeout" => o.send_timeout = millis(value("--send-timeout"), "--send-timeout"),
            "--http2" => o.http2 = true,
            "--max-connections" => {
                o.max_connections = match value("--max-connections").parse() {
                    Ok(n) if n > 0 => n,
                    _ => usage("--max-connections needs a number above 0"),
                }
            }
            "--max-buffered" => {
                o.max_buffered = match value("--max-buffered").parse::<usize>() {
                    Ok(mib) if mib > 0 => mib.saturating_mul(1 << 20),
                    _ => usage("--max-buffered needs a number of MiB above 0"),
                }
            }
            "--drain" => o.drain = millis(value("--drain"), "--drain").unwrap_or_default(),
            "--health-path" => {
                let path = value("--health-path");
                match HttpProbe::try_new(&path) {
                    Ok(probe) if path.starts_with('/') => o.health_path = Some(probe),
                    _ => usage(&format!("bad --health-path {path} (want /PATH)")),
                }
            }
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0)
            }
            flag if flag.starts_with("--") => usage(&format!("unknown flag {flag}")),
            backend => o.backends.push(backend.to_owned()),
        }
    }
    if o.backends.is_empty() {
        usage("give at least one backend URL");
    }
    if !o.health && o.health_path.is_some() {
        usage("--health-path with --no-health: no probe would use it");
    }
    if o.queue.0 > 0 && o.max_in_flight.is_none() {
        usage("--queue without --max-in-flight: no backend is ever full");
    }
    if o.hash_key.is_some() && !matches!(o.strategy.as_str(), "ring" | "maglev") {
        usage("--hash-key is for --strategy ring or maglev");
    }
    // nginx's and HAProxy's round robin are weighted, tower-ha's is not: a
    // weight it would ignore is refused rather than dropped without a word.
    if matches!(o.strategy.as_str(), "round-robin" | "random") {
        if let Some(spec) = o.backends.iter().find(|spec| backend_spec(spec).1 != 1) {
            usage(&format!(
                "--strategy {} ignores weights ({spec}): use weighted, least-request, ring or maglev",
                o.strategy
            ));
        }
    }
    o
}

fn hash_key(spec: &str) -> Box<dyn RequestKey> {
    match spec.split_once(':') {
        Some(("header", name)) => match http::HeaderName::try_from(name) {
            Ok(name) => Box::new(key::header(name)),
            Err(_) => usage(&format!("bad header name in --hash-key {spec}")),
        },
        Some(("cookie", name)) if is_cookie_name(name) => Box::new(key::cookie(name)),
        Some(("forwarded-for", hops)) => match hops.parse() {
            Ok(hops) if hops > 0 => {
                Box::new(key::forwarded_for().trusted_hops(hops).or(key::peer_ip()))
            }
            _ => usage(&format!(
                "--hash-key {spec}: give the number of your proxies"
            )),
        },
        // The leftmost `X-Forwarded-For` entry is the client's to write.
        _ if spec == "client-ip" => Box::new(key::peer_ip()),
        _ => usage(&format!("unknown --hash-key {spec}")),
    }
}

fn main() {
    let o = options();
    start_logging();
    let runtime = if o.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(o.workers)
            .enable_all()
            .build()
    }
    .expect("a tokio runtime");
    runtime.block_on(run(o));
}

/// Whether `name` is a cookie name these flags take.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The session key `--sticky` names.
fn session_key(spec: &str, cookie_secret: Option<&[u8]>) -> SessionKey {
    let name = match spec.split_once(':') {
        Some((_, name)) if is_cookie_name(name) => name,
        _ => usage(&format!("bad --sticky {spec}")),
    };
    match spec.split_once(':').map(|(kind, _)| kind) {
        // Prefixed names need `Secure`, which this plain-HTTP proxy
        // cannot send.
        Some("cookie") if name.to_ascii_lowercase().starts_with("__") => usage(&format!(
            "--sticky {spec}: a __Secure- or __Host- cookie needs HTTPS"
        )),
        Some("cookie") => {
            let secret = cookie_secret.expect("a secret for --sticky cookie");
            // This proxy speaks plain HTTP: a `Secure` cookie would not
            // come back.
            SessionKey::insert_cookie(CookieInsert::new(name, secret).secure(false))
        }
        Some("learn") => SessionKey::learn_cookie(name),
        Some("header") => SessionKey::header(name),
        _ => usage(&format!("unknown --sticky {spec}")),
    }
}

/// A backend argument's URL, weight (default 1) and id, if it names one.
/// Options are taken from the end, so a comma may stay in the URL's path.
fn backend_spec(spec: &str) -> (&str, u32, Option<&str>) {
    let (mut url, mut weight, mut id) = (spec, None, None);
    while let Some((head, option)) = url.rsplit_once(',') {
        match option.split_once('=') {
            Some(("weight", n)) if weight.is_none() => match n.parse::<u32>() {
                Ok(n) if n > 0 => weight = Some(n),
                _ => usage(&format!(
                    "bad weight in {spec} (want a whole number above 0)"
                )),
            },
            Some(("id", name)) if id.is_none() => {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    usage(&format!("bad id in {spec} (want printable ASCII)"));
                }
                id = Some(name);
            }
            _ => break,
        }
        url = head;
    }
    (url, weight.unwrap_or(1), id)
}

/// An id that says nothing of `authority` to a client that decodes the
/// sticky cookie, and stays the same for the same secret: the first 8
/// bytes of SHA-256 over the secret and the authority, in hex.
fn opaque_id(secret: &[u8], authority: &str) -> BackendId {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"reverse_proxy backend id\0")
        .chain_update(secret)
        .chain_update(b"\0")
        .chain_update(authority)
        .finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    BackendId::from(format!("b-{hex}"))
}

async fn run(o: Options) {
    let key = hash_key(o.hash_key.as_deref().unwrap_or("client-ip"));
    match o.strategy.as_str() {
        "round-robin" => serve(o, RoundRobin::new()).await,
        "random" => serve(o, Random::new()).await,
        "least-request" => serve(o, LeastRequest::new()).await,
        "weighted" => serve(o, WeightedRoundRobin::new()).await,
        "ring" => serve(o, ConsistentHash::ring(key)).await,
        "maglev" => serve(o, ConsistentHash::maglev(key)).await,
        other => usage(&format!("unknown --strategy {other}")),
    }
}

async fn serve<P: Strategy>(o: Options, strategy: P) {
    let client = HttpClient::<Body>::new().send_timeout(o.send_timeout);
    #[cfg(feature = "http2")]
    let client = client.http2_only(o.http2);
    #[cfg(not(feature = "http2"))]
    if o.http2 {
        usage("--http2 needs the http2 feature (--features http2)");
    }
    let passive = HealthLayer::new();
    let pool = Pool::new();
    // The sticky cookie's secret: from the environment, so that cookies
    // outlive the process and hold across replicas, else random.
    let cookie_secret = o
        .sticky
        .as_deref()
        .filter(|spec| spec.starts_with("cookie:"))
        .map(|_| match std::env::var_os("TOWER_HA_STICKY_SECRET") {
            Some(secret) if secret.len() >= 32 => secret.into_encoded_bytes(),
            Some(_) => usage("TOWER_HA_STICKY_SECRET needs at least 32 bytes"),
            None => rand::random::<[u8; 32]>().to_vec(),
        });
    let mut addresses = HashMap::new();
    for spec in &o.backends {
        let (url, weight, id) = backend_spec(spec);
        let backend = HttpBackend::new(&client, url).unwrap_or_else(|e| usage(&e.to_string()));
        // `HttpBackend::new` accepted it: an http:// URI with a host, and a
        // port that is a number from 0 to 65535 when it has one.
        let uri: http::Uri = url.parse().expect("a valid backend URI");
        let host = uri.host().expect("a host").trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(80);
        // One spelling of each address (`http://App`, `http://app:80`;
        // `[::1]`, `[0:0::1]`), so that one backend is neither listed twice
        // nor named two ways by two replicas.
        let authority = match host.parse::<std::net::Ipv6Addr>() {
            Ok(ip) => format!("[{ip}]:{port}"),
            Err(_) => format!("{}:{port}", host.to_ascii_lowercase()),
        };
        let authority = authority.as_str();
        if addresses.values().any(|(_, at)| at == authority) {
            usage(&format!("two backends at {authority}"));
        }
        let id = match (id, &cookie_secret) {
            (Some(id), _) => BackendId::from(id),
            (None, Some(secret)) => opaque_id(secret, authority),
            (None, None) => BackendId::from(authority),
        };
        if pool.contains(&id) {
            usage(&format!("two backends with the id {id}"));
        }
        if id.as_str() != authority {
            tracing::info!("backend {id}: {url}");
        }
        if (host, port)
            .to_socket_addrs()
            .map_or(true, |mut a| a.next().is_none())
        {
            usage(&format!("cannot resolve {authority}"));
        }
        // Without --no-health the passive layer ejects a backend after
        // consecutive failures; with it, its settings make that never happen.
        let layer = if o.health {
            passive.clone()
        } else {
            HealthLayer::new().consecutive_failures(u32::MAX)
        };
        pool.insert_weighted(
            id.clone(),
            ServiceBuilder::new().layer(layer).service(backend),
            weight,
        );
        if let Some(state) = pool.state(&id) {
            state.set_max_in_flight(o.max_in_flight);
        }
        addresses.insert(id, ((host.to_owned(), port), authority.to_owned()));
    }
    fn start<S, P>(checker: HealthChecker<S, P>, o: &Options) -> CheckerHandle
    where
        S: Clone + Send + Sync + 'static,
        P: Probe<S>,
    {
        checker
            .interval(o.probe_interval)
            .timeout(o.probe_timeout)
            .rise(2)
            .fall(2)
            .spawn()
    }
    // A GET of --health-path through each backend's own client, else a
    // TCP connect to its host, resolved at each probe and tried address
    // after address as the client does (`localhost` may be `::1` first
    // while the backend listens on 127.0.0.1 only).
    let addresses = Arc::new(addresses);
    let connect = probe_fn(move |id: &BackendId, _: &_| {
        let target = addresses.get(id).map(|(target, _)| target.clone());
        async move {
            let (host, port) = target.ok_or("no address")?;
            tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok(())
        }
    });
    let _checker = o.health.then(|| match o.health_path.clone() {
        Some(probe) => start(HealthChecker::new(pool.clone(), probe), &o),
        // A connect passes on a backend that accepts and then hangs or
        // answers 503: it must not lift the passive layer's ejections.
        None => start(
            HealthChecker::new(pool.clone(), connect).lift_ejections(false),
            &o,
        ),
    });

    let sticky = o
        .sticky
        .as_deref()
        .map(|spec| StickyLayer::new(&pool, session_key(spec, cookie_secret.as_deref())));
    // A gRPC client's deadline can only shorten the configured one.
    let mut failover = FailoverLayer::new().grpc_timeout(true);
    if let Some(timeout) = o.per_try_timeout {
        failover = failover.per_try_timeout(timeout);
    }
    if let Some(deadline) = o.deadline {
        failover = failover.deadline(deadline);
    }
    let stack = ServiceBuilder::new()
        .layer(BufferBodyLayer::new().max_held(o.max_buffered))
        .layer(failover)
        .service(Balance::new(pool.clone(), strategy).queue(o.queue.0, o.queue.1));

    let listener = TcpListener::bind(o.listen)
        .await
        .unwrap_or_else(|e| usage(&format!("cannot listen on {}: {e}", o.listen)));
    let listening = listener.local_addr().unwrap_or(o.listen);
    tracing::info!(
        "proxying {} to {} backend(s) with {}{}",
        listening,
        o.backends.len(),
        o.strategy,
        o.sticky
            .as_deref()
            .map(|spec| format!(", sticky by {spec}"))
            .unwrap_or_default()
    );
    // Two stacks rather than an optional layer: each request's future
    // stays as small as the stack it runs through.
    let limits = Limits {
        header_read_timeout: o.header_read_timeout,
        idle: IDLE_CONNECTION,
        // What bounds a connection whose writes stand still bounds one,
        // of either protocol, whose responses all do.
        stalled: o.send_timeout,
        grace: CLOSE_GRACE,
        stop_grace: o.drain,
    };
    let limits = (limits, o.max_connections);
    let (stop, connections) = watch::channel(false);
    match sticky {
        Some(sticky) => {
            let stack = sticky.layer(stack);
            accept(listener, stack, limits, connections).await
        }
        None => accept(listener, stack, limits, connections).await,
    }
    // Every connection task holds two receivers: the channel closes when
    // the last one ends.
    let _ = stop.send(true);
    let open = stop.receiver_count() / 2;
    // A tunnel (a WebSocket, once its connection switched protocols) has
    // left its connection's task, and counts as in flight on its backend
    // until it closes.
    let in_flight = || -> usize {
        let snapshot = pool.snapshot();
        snapshot
            .members()
            .iter()
            .map(|m| m.state().in_flight())
            .sum()
    };
    tracing::info!(
        "stopping: {open} connection(s) and {} request(s) or tunnel(s) open, waiting at most {:?}",
        in_flight(),
        o.drain
    );
    let drained = async {
        stop.closed().await;
        while in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        ended = tokio::time::timeout(o.drain, drained) => {
            if ended.is_err() {
                tracing::warn!(
                    "{} connection(s) and {} request(s) or tunnel(s) still open, closed",
                    stop.receiver_count() / 2,
                    in_flight()
                );
            }
        }
        _ = stop_signal() => tracing::warn!("a second signal: closed at once"),
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// How long a connection may have no request open, after its first, before
/// it is closed (between one and two of these: see [`Front::serve`]), as
/// Envoy's default idle timeout, which counts streams open. HTTP/2 clients,
/// gRPC's among them, keep their connections open between calls.
const IDLE_CONNECTION: Duration = Duration::from_secs(3600);

/// How long a connection the front closes (idle, a stop, a client that
/// resets its requests) has to finish the requests under way, after which
/// it is dropped (at a stop, `--drain` if it is longer): a stream whose
/// client grants it no window would keep it for good.
const CLOSE_GRACE: Duration = Duration::from_secs(30);

/// Serves each connection `listener` accepts with `stack` (see
/// [`Front::serve`]: HTTP/1.1 or HTTP/2, held to `limits`), closing those
/// that take none of their response for `send_timeout`, with at most
/// `max_connections` open (see [`front::accept`]), until a stop signal;
/// each connection then finishes the requests it is serving and closes
/// (its task watches `stop`).
async fn accept<S>(
    listener: TcpListener,
    stack: S,
    (limits, max_connections): (Limits, usize),
    stop: watch::Receiver<bool>,
) where
    S: Service<Request<Incoming>, Response = Response<ResponseBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    // A zero send timeout is none.
    let send_timeout = limits.stalled.unwrap_or_default();
    let front = Arc::new(Front::new(limits));
    let log = |e: &std::io::Error| tracing::warn!("accept: {e}");
    // Said once a minute at most: a proxy at its bound is asked each
    // second.
    let said = std::sync::Mutex::new(None::<tokio::time::Instant>);
    let full = || {
        front.make_room();
        let now = tokio::time::Instant::now();
        let mut said = said.lock().unwrap_or_else(|e| e.into_inner());
        if said.is_none_or(|at| now >= at + Duration::from_secs(60)) {
            *said = Some(now);
            tracing::warn!(
                "{max_connections} client connections open (--max-connections): \
                 closing idle ones, new ones wait"
            );
        }
    };
    front::accept(
        listener,
        max_connections,
        stop_signal(),
        log,
        full,
        |admitted, peer| {
            let stack = stack.clone();
            let front = front.clone();
            let stop = stop.clone();
            async move {
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(PeerAddr(peer));
                    // What a failed gRPC call's answer needs, read before the
                    // stack takes the request.
                    let call = GrpcCall::of(req.headers());
                    let stack = stack.clone();
                    async move { Ok::<_, Infallible>(respond(stack.oneshot(req).await, call)) }
                });
                let io = TokioIo::new(SendTimeout::new(admitted, send_timeout));
                front.serve(io, service, stop).await;
            }
        },
    )
    .await
}

/// Half of the process's limit of open files (from `/proc/self/limits`),
/// else 512 (nginx's `worker_connections`): the other half is left for the
/// connections to backends, about one per request in flight.
fn default_max_connections() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<usize>().ok());
    soft.map_or(512, |n| (n / 2).max(1))
}

/// Whether the 5xx answer given now is logged: the first 10 of each second
/// are. With the number of those not logged since the last one that was.
fn server_error_to_log() -> Option<u64> {
    use std::sync::Mutex;
    use tokio::time::Instant;
    /// The second counted from, the lines logged in it, those not logged.
    static WINDOW: Mutex<Option<(Instant, u32, u64)>> = Mutex::new(None);
    let now = Instant::now();
    let mut window = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
    let (start, logged, unsaid) = window.get_or_insert((now, 0, 0));
    if now >= *start + Duration::from_secs(1) {
        (*start, *logged) = (now, 0);
    }
    if *logged >= 10 {
        *unsaid += 1;
        return None;
    }
    *logged += 1;
    Some(std::mem::take(unsaid))
}

/// The backend's response, or a gateway error (for a gRPC `call`, a
/// gRPC answer). Why it failed is logged,
/// not sent: it names backends and system errors, which are no business of
/// the client's.
fn respond(
    result: Result<Response<ResponseBody>, BoxError>,
    call: Option<GrpcCall>,
) -> Response<ProxyBody> {
    match result {
        Ok(response) => response.map(Either::Left),
        Err(e) => {
            let status = gateway_status(&*e);
            // A client's own error (400, 408) is its business, as nginx
            // logs it only at `info`; and at most 10 of the others a second
            // are written (standard error blocks the proxy while it is
            // slow), the rest counted: a client cannot fill the log.
            if status.is_server_error() {
                if let Some(unsaid) = server_error_to_log() {
                    if unsaid > 0 {
                        tracing::warn!("{unsaid} more 5xx answers not logged");
                    }
                    tracing::warn!("{status}: {}", Report(&*e));
                }
            }
            // A gRPC client reads the outcome from `grpc-status`.
            if let Some(call) = call {
                return call.answer(&*e).map(Either::Right);
            }
            let reason = status.canonical_reason().unwrap_or("Error");
            let body = Full::new(Bytes::from(format!("{reason}\n")));
            let mut response = Response::new(Either::Right(body));
            *response.status_mut() = status;
            response
        }
    }
}
