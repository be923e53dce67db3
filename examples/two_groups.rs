//! Two groups in one application, routed by path prefix, with one control
//! handle and the admin API.
//!
//! * `/api/...` goes to the `api` group: active-passive, `api1` primary,
//!   `api2` backup, automatic failback after 2 s; a passive health layer,
//!   TCP probes every 500 ms and a failover layer make `api2` take over by
//!   itself when `api1` dies (the last step kills it).
//! * everything else goes to the `static` group: normal, round robin over
//!   `web1` and `web2`.
//!
//! The four backends are real hyper servers on 127.0.0.1; the two groups
//! sit behind `tower::steer::Steer` (a path-prefix picker; with axum,
//! `Router::nest_service` plays the same part); the admin API is a tower
//! `Service` called here directly (mount it where you like). A task
//! subscribed to the handle's events prints each change of primary as it
//! happens.
//!
//! Run it with `cargo run --example two_groups --features hyper-client,admin`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tower::steer::Steer;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, ServiceExt};
use tower_ha::balance::{Balance, Failback, Priority, RoundRobin};
use tower_ha::control::{AdminService, Event, Events, Handle, RecvError};
use tower_ha::failover::FailoverLayer;
use tower_ha::health::{HealthChecker, HealthLayer, TcpProbe};
use tower_ha::http::{HttpBackend, HttpClient};
use tower_ha::{BackendId, Pool};

type Body = Full<Bytes>;
type Route = BoxCloneSyncService<Request<Body>, Response<tower_ha::http::ResponseBody>, BoxError>;
type Picker = fn(&Request<Body>, &[Route]) -> usize;
type Router = Steer<Route, Picker, Request<Body>>;

/// A hyper server on 127.0.0.1 that answers its name, and the task that
/// runs it: aborting that task closes the listener and every connection,
/// as the death of the process would.
async fn backend(name: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, say: wait a little rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(name))))
            });
            connections.spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            // Forget the connections that ended.
            while connections.try_join_next().is_some() {}
        }
    });
    (addr, server)
}

async fn get(router: &Router, path: &str) -> String {
    let request = Request::get(path).body(Body::default()).expect("request");
    let response = router.clone().oneshot(request).await.expect("response");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// Calls the admin API. Every `POST` must declare a JSON body, even the
/// actions that take none.
async fn admin(admin: &AdminService, method: &str, path: &str, body: &str) -> String {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let response = admin.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    format!("{status} {}", String::from_utf8_lossy(&body))
}

fn by_prefix(req: &Request<Body>, _routes: &[Route]) -> usize {
    usize::from(!req.uri().path().starts_with("/api/"))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let client = HttpClient::<Body>::new();
    let events = Events::default();

    // The api group watches its backends' health: each backend behind a
    // passive health layer (ejected after failed requests), and probed (a
    // TCP connect every 500 ms), so that `Priority` sees a dead primary.
    let api = Pool::new();
    let passive = HealthLayer::new().events(events.clone());
    let mut api_servers = Vec::new();
    let mut api_addrs = Vec::new();
    for name in ["api1", "api2"] {
        let (addr, server) = backend(name).await;
        let service = HttpBackend::new(&client, format!("http://{addr}"))?;
        api.insert(name, passive.layer(service));
        api_servers.push(server);
        api_addrs.push((name, addr));
    }
    let checker = HealthChecker::new(api.clone(), TcpProbe::from_map(api_addrs))
        .interval(Duration::from_millis(500))
        .events(events.clone())
        .spawn();
    let api = Balance::new(
        api,
        Priority::new("api", ["api1", "api2"]).failback(Failback::auto(Duration::from_secs(2))),
    );
    let web = Pool::new();
    for name in ["web1", "web2"] {
        let (addr, _server) = backend(name).await;
        web.insert(name, HttpBackend::new(&client, format!("http://{addr}"))?);
    }
    let web = Balance::new(web, RoundRobin::new());

    // Follow primary changes as they happen, as an alerting hook would; the
    // audit history printed at the end keeps every event as well.
    let mut live = events.subscribe();
    let watcher = tokio::spawn(async move {
        loop {
            match live.recv().await {
                Ok(record) => {
                    if let Event::PrimaryChanged {
                        group,
                        from,
                        to,
                        reason,
                    } = &record.event
                    {
                        let name = |b: &Option<BackendId>| {
                            b.as_ref().map_or("none", BackendId::as_str).to_owned()
                        };
                        println!(
                            "  [event] {group}: primary {} -> {} ({reason:?})",
                            name(from),
                            name(to)
                        );
                    }
                }
                Err(RecvError::Missed(n)) => println!("  [event] missed {n} events"),
                Err(_) => break,
            }
        }
    });

    let handle = Handle::new(events.clone()).drain_deadline(Some(Duration::from_secs(1)));
    handle.add_group("api", &api)?;
    handle.add_group("static", &web)?;
    let admin_api = AdminService::new(handle.clone()).prefix("/admin");

    // A request that finds the primary dead before the health checks do
    // is retried on the backup.
    let router: Router = Steer::new(
        vec![
            Route::new(FailoverLayer::new().layer(api.clone())),
            Route::new(web.clone()),
        ],
        by_prefix as Picker,
    );

    println!("/api/users   -> {}", get(&router, "/api/users").await);
    println!("/index.html  -> {}", get(&router, "/index.html").await);
    println!("/index.html  -> {}", get(&router, "/index.html").await);

    println!("\ndrain api1 through the admin API:");
    println!(
        "  {}",
        admin(&admin_api, "POST", "/admin/backends/api1/drain", "{}").await
    );
    println!("/api/users   -> {}", get(&router, "/api/users").await);

    println!("\nenable api1 again; it takes over after 2 s of stability:");
    println!(
        "  {}",
        admin(&admin_api, "POST", "/admin/backends/api1/enable", "{}").await
    );
    println!("/api/users   -> {}", get(&router, "/api/users").await);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    println!("/api/users   -> {}", get(&router, "/api/users").await);

    println!("\nforce api2 as the primary:");
    let forced = admin(
        &admin_api,
        "POST",
        "/admin/groups/api/primary",
        r#"{"backend_id":"api2"}"#,
    )
    .await;
    println!("  {}", forced.chars().take(120).collect::<String>());
    println!("/api/users   -> {}", get(&router, "/api/users").await);
    println!(
        "  {}",
        admin(
            &admin_api,
            "POST",
            "/admin/groups/static/primary",
            r#"{"backend_id":"web1"}"#
        )
        .await
    );
    println!(
        "  {}",
        admin(&admin_api, "GET", "/admin/groups/nope", "").await
    );

    println!("\nrelease api2, then kill api1's server: its requests fail over to api2");
    println!(
        "  {}",
        admin(&admin_api, "DELETE", "/admin/groups/api/primary", "").await
    );
    api_servers[0].abort();
    println!("/api/users   -> {}", get(&router, "/api/users").await);
    // The probes mark it unhealthy (3 failed, 500 ms apart): api2 becomes
    // the primary.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    println!("/api/users   -> {}", get(&router, "/api/users").await);

    println!("\nstats:");
    for group in handle.stats() {
        println!(
            "  {} ({:?}): primary {:?}, {} failovers, healthy {:?}",
            group.name, group.mode, group.current_primary, group.failovers, group.healthy
        );
        for b in &group.backends {
            println!("    {}: {} requests, {:?}", b.id, b.requests, b.admin);
        }
    }
    watcher.abort();
    checker.shutdown().await;
    println!("\naudit history:");
    for record in events.history() {
        println!(
            "  #{} {}",
            record.seq,
            serde_json::to_string(&record.event)?
        );
    }
    Ok(())
}
