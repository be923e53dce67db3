//! tower-ha inside an axum application you already have.
//!
//! ```sh
//! cargo run --example axum
//! ```
//!
//! The application's `Router` is unchanged; it runs as two in-process
//! replicas, `replica-1` and `replica-2`, in a tower-ha `Pool`, each behind
//! a passive health layer (a replica whose requests keep failing is
//! ejected, so that under load its users go straight to the other one
//! rather than each paying a retry, which the retry budget caps), with a
//! health checker requesting its `/healthz` every 2 s. The balanced
//! stack, `BufferBody → Failover → Balance(Maglev on X-User)`, is mounted
//! into a front axum `Router` with `fallback_service` and served by
//! `axum::serve` on 127.0.0.1. The front adds two headers from the layers'
//! extensions: `x-served-by` (`ServedBy`) and `x-attempts` (`Attempts`).
//!
//! The example then sends requests to itself over HTTP and prints what
//! happened:
//!
//! 1. each user (`X-User` header) always reaches the same replica: a
//!    consistent hash (Maglev) of the header; requests without it go round
//!    robin;
//! 2. one replica goes into maintenance (its handlers answer 503): its
//!    users' GETs fail over to the other replica within the same request,
//!    and nobody sees the 503;
//! 3. maintenance ends: each user is back on their own replica.
//!
//! It exits 0 when all of that held, 1 otherwise. It takes no arguments.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceBuilder};
use tower_ha::balance::{Balance, ConsistentHash};
use tower_ha::error::{gateway_status, Report};
use tower_ha::extensions::{Attempts, ServedBy};
use tower_ha::failover::{BufferBodyLayer, FailoverLayer};
use tower_ha::health::{CheckerHandle, HealthChecker, HealthLayer, HttpProbe};
use tower_ha::{key, BoxError, Pool};

const USERS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];

// ---------------------------------------------------------------------------
// The application you already have: nothing here knows about tower-ha.

#[derive(Clone)]
struct AppState {
    replica: &'static str,
    maintenance: Arc<AtomicBool>,
}

fn app(state: AppState) -> Router {
    Router::new()
        .route("/api/cart", get(cart))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn cart(State(state): State<AppState>, headers: HeaderMap) -> Response<Body> {
    if state.maintenance.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response();
    }
    let user = headers
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous");
    format!("{}: the cart of {user}", state.replica).into_response()
}

async fn healthz(State(state): State<AppState>) -> StatusCode {
    if state.maintenance.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

// ---------------------------------------------------------------------------
// Adding tower-ha.

/// The front door: the balanced replicas behind an axum `Router`, the
/// switches that put each replica into maintenance, and the health checker
/// (call it within a Tokio runtime: the checker starts on it).
fn front() -> (
    Router,
    BTreeMap<&'static str, Arc<AtomicBool>>,
    CheckerHandle,
) {
    let pool = Pool::new();
    let passive = HealthLayer::new();
    let mut maintenance = BTreeMap::new();
    for replica in ["replica-1", "replica-2"] {
        let switch = Arc::new(AtomicBool::new(false));
        let app = app(AppState {
            replica,
            maintenance: switch.clone(),
        });
        pool.insert(replica, passive.layer(app));
        maintenance.insert(replica, switch);
    }
    let checker = HealthChecker::new(pool.clone(), HttpProbe::<Body>::new("/healthz")).spawn();
    let balanced = ServiceBuilder::new()
        // axum wants infallible services: a request no replica could serve
        // is answered the status its error calls for (502, 503, 504, ...),
        // with the status's name alone; why it failed (replica names,
        // system errors) is logged, not sent.
        .layer(HandleErrorLayer::new(|e: BoxError| async move {
            let status = gateway_status(&*e);
            eprintln!("{status}: {}", Report(&*e));
            (status, status.canonical_reason().unwrap_or("Error"))
        }))
        .map_response(annotate)
        .layer(BufferBodyLayer::new())
        .layer(FailoverLayer::new())
        .service(Balance::new(
            pool,
            ConsistentHash::maglev(key::header("x-user")),
        ));
    let router = Router::new()
        .route("/", get(|| async { "the front door\n" }))
        .fallback_service(balanced);
    (router, maintenance, checker)
}

/// Copies what the layers recorded into response headers.
fn annotate(mut response: Response<Body>) -> Response<Body> {
    let served_by = response.extensions().get::<ServedBy>().cloned();
    let attempts = response.extensions().get::<Attempts>().map(Attempts::len);
    let headers = response.headers_mut();
    if let Some(ServedBy(id)) = served_by {
        if let Ok(value) = HeaderValue::from_str(id.as_str()) {
            headers.insert("x-served-by", value);
        }
    }
    headers.insert("x-attempts", HeaderValue::from(attempts.unwrap_or(1)));
    response
}

// ---------------------------------------------------------------------------
// Using it over HTTP, as a client would.

struct Answer {
    status: StatusCode,
    served_by: String,
    attempts: String,
    body: String,
}

async fn get_as(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    user: Option<&str>,
) -> Result<Answer, BoxError> {
    let mut request = Request::get(format!("http://{addr}/api/cart"));
    if let Some(user) = user {
        request = request.header("x-user", user);
    }
    let response = client.request(request.body(Empty::new())?).await?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let (status, served_by, attempts) = (
        response.status(),
        header("x-served-by"),
        header("x-attempts"),
    );
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        served_by,
        attempts,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn main() {
    if let Some(arg) = std::env::args().nth(1) {
        eprintln!("error: unexpected argument {arg}");
        eprintln!("usage: axum   (no arguments)");
        std::process::exit(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start a tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => println!("\nall checks passed"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn check(ok: bool, what: &str) -> Result<(), BoxError> {
    if ok {
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}

async fn run() -> Result<(), BoxError> {
    let (router, maintenance, checker) = front();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    println!("serving on http://{addr}: / is the front's own route, the rest goes to two replicas");
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();

    // 1. Each user keeps to one replica.
    println!("\n1. users hashed to replicas (Maglev on X-User), three requests each");
    let mut homes = BTreeMap::new();
    for user in USERS {
        let mut served = Vec::new();
        for _ in 0..3 {
            let answer = get_as(&client, addr, Some(user)).await?;
            check(answer.status == StatusCode::OK, "a 200")?;
            served.push(answer.served_by);
        }
        println!("   {user:6} → {}", served.join(", "));
        check(
            served.iter().all(|s| *s == served[0]),
            "one replica per user",
        )?;
        homes.insert(user, served[0].clone());
    }
    let mut anonymous = Vec::new();
    for _ in 0..4 {
        anonymous.push(get_as(&client, addr, None).await?.served_by);
    }
    println!("   no X-User → {} (round robin)", anonymous.join(", "));
    check(
        anonymous.windows(2).all(|w| w[0] != w[1]),
        "round robin without a key",
    )?;

    // 2. The replica of alice goes into maintenance.
    let down = homes["alice"].clone();
    let switch = maintenance
        .get(down.as_str())
        .ok_or("alice's replica is not in the pool")?;
    switch.store(true, Ordering::SeqCst);
    println!("\n2. {down} goes into maintenance (its handlers answer 503)");
    for user in USERS {
        let answer = get_as(&client, addr, Some(user)).await?;
        println!(
            "   {user:6} → {} (status {}, attempts {}): {}",
            answer.served_by,
            answer.status.as_u16(),
            answer.attempts,
            answer.body.trim()
        );
        check(answer.status == StatusCode::OK, "no 503 reaches a client")?;
        check(
            answer.served_by != down,
            "nobody served by the replica that is down",
        )?;
        let expected_attempts = if homes[user] == down { "2" } else { "1" };
        check(
            answer.attempts == expected_attempts,
            "a failover exactly for the users of the replica that is down",
        )?;
    }

    // 3. Maintenance ends.
    switch.store(false, Ordering::SeqCst);
    println!("\n3. {down} is back");
    for user in USERS {
        let answer = get_as(&client, addr, Some(user)).await?;
        println!("   {user:6} → {}", answer.served_by);
        check(
            answer.served_by == homes[user],
            "every user back on their replica",
        )?;
    }

    let front = client
        .request(Request::get(format!("http://{addr}/")).body(Empty::new())?)
        .await?;
    check(front.status() == StatusCode::OK, "the front's own route")?;

    let _ = stop.send(());
    server.await??;
    checker.shutdown().await;
    Ok(())
}
