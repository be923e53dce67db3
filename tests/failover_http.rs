//! Failover end to end: real hyper servers on 127.0.0.1, a real client.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::extensions::{Attempts, ServedBy};
use tower_ha::failover::{BufferBodyLayer, FailoverLayer, ReplayBody};
use tower_ha::Pool;

use support::http::{refused, serve, silent, text, BoxBody, HttpBackend, Seen};
use support::wait::bounded_real;

fn pool<B>(backends: &[(&str, SocketAddr)]) -> Pool<HttpBackend<B>>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<tower_ha::BoxError>,
{
    let pool = Pool::new();
    for (name, addr) in backends {
        pool.insert(*name, HttpBackend::new(*addr));
    }
    pool
}

fn history<B>(response: &http::Response<B>) -> Vec<String> {
    response
        .extensions()
        .get::<Attempts>()
        .expect("attempt history")
        .as_slice()
        .iter()
        .map(|id| id.to_string())
        .collect()
}

fn request(method: Method, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("/orders")
        .header("x-request-id", "42")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test]
async fn get_tries_refused_then_unavailable_then_healthy_in_order() {
    let down = refused().await;
    let (unavailable, unavailable_seen) =
        serve("unavailable", StatusCode::SERVICE_UNAVAILABLE).await;
    let (healthy, healthy_seen) = serve("healthy", StatusCode::OK).await;
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new())
        .service(Balance::new(
            pool(&[
                ("down", down),
                ("unavailable", unavailable),
                ("healthy", healthy),
            ]),
            RoundRobin::new(),
        ));

    let response = service.oneshot(request(Method::GET, "")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(history(&response), ["down", "unavailable", "healthy"]);
    assert_eq!(
        response.extensions().get::<ServedBy>().unwrap().0.as_str(),
        "healthy"
    );
    assert_eq!(text(response).await, "healthy");
    assert_eq!(unavailable_seen.requests(), 1);
    assert_eq!(healthy_seen.requests(), 1);
}

#[tokio::test]
async fn post_is_not_retried_after_a_503() {
    let (unavailable, unavailable_seen) =
        serve("unavailable", StatusCode::SERVICE_UNAVAILABLE).await;
    let (healthy, healthy_seen) = serve("healthy", StatusCode::OK).await;
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new())
        .service(Balance::new(
            pool(&[("unavailable", unavailable), ("healthy", healthy)]),
            RoundRobin::new(),
        ));

    let response = service
        .oneshot(request(Method::POST, "{\"qty\":1}"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(history(&response), ["unavailable"]);
    assert_eq!(text(response).await, "unavailable");
    assert_eq!(unavailable_seen.requests(), 1);
    assert_eq!(unavailable_seen.body_bytes(), 9);
    assert_eq!(healthy_seen.requests(), 0);
}

/// Sends a small `POST` through `service`, whose backend "down" refuses
/// connections: "healthy" answers it, having read it whole, once.
async fn a_post_moves_on<S, B>(service: S, healthy_seen: &Seen)
where
    S: tower::Service<Request<Full<Bytes>>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
{
    let response = service
        .oneshot(request(Method::POST, "{\"qty\":1}"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(history(&response), ["down", "healthy"]);
    assert_eq!(healthy_seen.requests(), 1);
    assert_eq!(healthy_seen.body_bytes(), 9);
}

#[tokio::test]
async fn post_is_retried_after_a_refused_connection() {
    let down = refused().await;
    let (healthy, healthy_seen) = serve("healthy", StatusCode::OK).await;
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new())
        .service(Balance::new(
            pool(&[("down", down), ("healthy", healthy)]),
            RoundRobin::new(),
        ));
    a_post_moves_on(service, &healthy_seen).await;
}

/// Sends a `POST` whose body is not `Clone` to a 503 backend then a healthy
/// one, with non-idempotent retries opted in: only the body decides whether
/// the request may be sent again.
async fn post_streamed(len: usize) -> (http::Response<hyper::body::Incoming>, usize, usize) {
    let (unavailable, unavailable_seen) =
        serve("unavailable", StatusCode::SERVICE_UNAVAILABLE).await;
    let (healthy, healthy_seen) = serve("healthy", StatusCode::OK).await;
    let service = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(FailoverLayer::new().retry_non_idempotent(true))
        .service(Balance::new(
            pool::<ReplayBody<BoxBody>>(&[("unavailable", unavailable), ("healthy", healthy)]),
            RoundRobin::new(),
        ));
    let body: BoxBody = Full::new(Bytes::from(vec![b'x'; len])).boxed();
    let req = Request::post("/upload").body(body).unwrap();
    let response = service.oneshot(req).await.unwrap();
    (
        response,
        unavailable_seen.body_bytes(),
        healthy_seen.body_bytes(),
    )
}

#[tokio::test]
async fn a_1_mib_post_body_is_not_retried_after_it_was_sent() {
    let (response, unavailable_bytes, healthy_bytes) = post_streamed(1024 * 1024).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(history(&response), ["unavailable"]);
    assert_eq!(unavailable_bytes, 1024 * 1024);
    assert_eq!(healthy_bytes, 0);
}

#[tokio::test]
async fn a_small_post_body_is_buffered_and_retried() {
    let (response, unavailable_bytes, healthy_bytes) = post_streamed(1024).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(history(&response), ["unavailable", "healthy"]);
    assert_eq!(unavailable_bytes, 1024);
    assert_eq!(healthy_bytes, 1024);
}

/// A backend that never answers is given up by the per-try timeout (the
/// layer counts it; the instant it fires at is checked on paused time in
/// `tests/failover.rs`): the request is served by the next backend, and
/// the connection to the silent one is closed rather than left waiting for
/// an answer nobody reads. The timeout applies to the healthy backend too,
/// so it is long enough for a loaded machine.
#[tokio::test]
async fn a_silent_backend_is_left_for_the_next_and_its_connection_closed() {
    let (silent, silent_seen, mut closed) = silent().await;
    let (healthy, healthy_seen) = serve("healthy", StatusCode::OK).await;
    let per_try = Duration::from_secs(3);
    let layer = FailoverLayer::new().per_try_timeout(per_try);
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(Balance::new(
            pool(&[("silent", silent), ("healthy", healthy)]),
            RoundRobin::new(),
        ));

    let response = bounded_real(
        "the request is answered",
        service.oneshot(request(Method::GET, "")),
    )
    .await
    .unwrap();
    assert_eq!(layer.stats().per_try_timeouts, 1, "left by the timeout");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(history(&response), ["silent", "healthy"]);
    assert_eq!(text(response).await, "healthy");
    assert_eq!(healthy_seen.requests(), 1);
    // The silent backend's connection ends: the client closed it.
    let received = bounded_real(
        "the connection to the silent backend is closed",
        closed.recv(),
    )
    .await
    .expect("the silent server runs");
    assert!(received > 0, "the request reached the silent backend");
    assert_eq!(silent_seen.connections(), 1, "and it was not tried again");
}

/// A backend of the application's own on hyper-util's client, which passes
/// the client's errors on as they are: a refused connection is an I/O error
/// in the chain, not a `NotSent`.
fn own_backend(
    addr: SocketAddr,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = http::Response<hyper::body::Incoming>,
    Error = hyper_util::client::legacy::Error,
    Future = impl Send,
> + Clone {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    tower::service_fn(move |mut req: Request<Full<Bytes>>| {
        let client = client.clone();
        *req.uri_mut() = format!("http://{addr}{}", req.uri().path())
            .parse()
            .unwrap();
        async move { client.request(req).await }
    })
}

#[tokio::test]
async fn post_is_retried_after_a_refused_connection_of_a_hyper_util_client() {
    let down = refused().await;
    let (healthy, healthy_seen) = serve("healthy", StatusCode::OK).await;
    let pool = Pool::new();
    pool.insert("down", own_backend(down));
    pool.insert("healthy", own_backend(healthy));
    let service = ServiceBuilder::new()
        .layer(FailoverLayer::new())
        .service(Balance::new(pool, RoundRobin::new()));
    a_post_moves_on(service, &healthy_seen).await;
}
