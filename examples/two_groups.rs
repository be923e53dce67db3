//! Two groups in one application, routed by path prefix, with one control
//! handle and the admin API.
//!
//! * `/api/...` goes to the `api` group: active-passive, `api1` primary,
//!   `api2` backup, automatic failback after 2 s.
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
use tower::steer::Steer;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt};
use tower_ha::balance::{Balance, Failback, Priority, RoundRobin};
use tower_ha::control::{AdminService, Event, Events, Handle, RecvError};
use tower_ha::http::{HttpBackend, HttpClient};
use tower_ha::{BackendId, Pool};

type Body = Full<Bytes>;
type Route = BoxCloneSyncService<Request<Body>, Response<tower_ha::http::ResponseBody>, BoxError>;
type Picker = fn(&Request<Body>, &[Route]) -> usize;
type Router = Steer<Route, Picker, Request<Body>>;

/// A hyper server on 127.0.0.1 that answers its name.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(name))))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
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

    let api = Pool::new();
    for name in ["api1", "api2"] {
        api.insert(
            name,
            HttpBackend::new(&client, format!("http://{}", backend(name).await))?,
        );
    }
    let api = Balance::new(
        api,
        Priority::new("api", ["api1", "api2"]).failback(Failback::auto(Duration::from_secs(2))),
    );
    let web = Pool::new();
    for name in ["web1", "web2"] {
        web.insert(
            name,
            HttpBackend::new(&client, format!("http://{}", backend(name).await))?,
        );
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

    let router: Router = Steer::new(
        vec![Route::new(api.clone()), Route::new(web.clone())],
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
    println!("  {}", &forced[..forced.len().min(120)]);
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
