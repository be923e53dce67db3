//! gRPC through a real proxy on 127.0.0.1: a hyper front that speaks
//! HTTP/2 (and HTTP/1.1, for gRPC-Web), built here as a program would
//! build its own, over `BufferBody → Failover → Balance` of HTTP/2
//! `HttpBackend`s, and calls the stack fails answered with
//! `error::GrpcCall`, as a gRPC server answers them: a `grpc-status` in a
//! "Trailers-Only" response.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tower_ha::balance::{BalanceLayer, RoundRobin};
use tower_ha::error::{gateway_status, GrpcCall};
use tower_ha::failover::{BufferBodyLayer, FailoverLayer, ReplayBody};
use tower_ha::http::{HttpBackend, HttpClient, ResponseBody};
use tower_ha::Pool;

type Answer = Response<Either<ResponseBody, Full<Bytes>>>;

/// A proxy on 127.0.0.1 speaking HTTP/1.1 and HTTP/2 (prior knowledge) to
/// its clients, over `BufferBody → Failover → Balance` of HTTP/2 backends at `addrs`,
/// with `failover`'s settings. A failed gRPC call is answered with
/// [`GrpcCall::answer`], any other failed request with its gateway status.
async fn proxy(failover: FailoverLayer, addrs: &[SocketAddr]) -> SocketAddr {
    let client = HttpClient::<ReplayBody<Incoming>>::new()
        .http2_only(true)
        .connect_timeout(Duration::from_secs(5));
    let pool = Pool::new();
    for (i, addr) in addrs.iter().enumerate() {
        let backend = HttpBackend::new(&client, format!("http://{addr}")).unwrap();
        pool.insert(format!("b{}", i + 1), backend);
    }
    let stack = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(failover)
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(pool);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let stack = stack.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let call = GrpcCall::of(req.headers());
                let stack = stack.clone();
                async move {
                    let answer: Answer = match (stack.oneshot(req).await, call) {
                        (Ok(response), _) => response.map(Either::Left),
                        (Err(e), Some(call)) => call.answer(&*e).map(Either::Right),
                        (Err(e), None) => {
                            let mut response = Response::new(Either::Right(Full::default()));
                            *response.status_mut() = gateway_status(&*e);
                            response
                        }
                    };
                    Ok::<_, Infallible>(answer)
                }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP/2 gRPC server on 127.0.0.1 that answers every call with one
/// message and `grpc-status: 0` in trailers.
async fn grpc_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let message = req.into_body().collect().await?.to_bytes();
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let frames = vec![
                    Ok::<_, Infallible>(http_body::Frame::data(message)),
                    Ok(http_body::Frame::trailers(trailers)),
                ];
                let mut response = Response::new(http_body_util::StreamBody::new(
                    futures::stream::iter(frames),
                ));
                let grpc = HeaderValue::from_static("application/grpc");
                response.headers_mut().insert(CONTENT_TYPE, grpc);
                Ok::<_, hyper::Error>(response)
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A unary gRPC call's request: one length-prefixed message.
fn call(content_type: &'static str) -> Request<Full<Bytes>> {
    Request::post("http://proxy.test/inventory.Stock/Get")
        .header(CONTENT_TYPE, content_type)
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .unwrap()
}

/// Sends `req` to `proxy` over HTTP/2 with prior knowledge, as a gRPC
/// client does.
async fn send_h2(proxy: SocketAddr, req: Request<Full<Bytes>>) -> Response<Incoming> {
    let (mut sender, _) = support::http::h2_client(proxy).await;
    sender.send_request(req).await.unwrap()
}

/// Asserts that `response` is a "Trailers-Only" answer with `code` and
/// `message`: `200 OK`, the status in its head, no body, no trailers.
async fn assert_trailers_only(response: Response<Incoming>, code: &str, message: &str) {
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], code);
    assert_eq!(response.headers()["grpc-message"], message);
    let collected = response.into_body().collect().await.unwrap();
    assert!(collected.trailers().is_none());
    assert!(collected.to_bytes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_passes_through_to_an_http2_backend() {
    let proxy = proxy(FailoverLayer::new(), &[grpc_backend().await]).await;
    let response = send_h2(proxy, call("application/grpc")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc");
    assert!(response.headers().get("grpc-status").is_none());
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), &b"\0\0\0\0\x02hi"[..]);
}

/// A call whose only backend refused its connection is `UNAVAILABLE`,
/// in the answer's head with the stream's end: a gRPC client reads it as
/// a server's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_its_backend_refused_is_answered_unavailable() {
    let proxy = proxy(FailoverLayer::new(), &[support::http::refused().await]).await;
    let response = send_h2(proxy, call("application/grpc+proto")).await;
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert!(
        http_body::Body::is_end_stream(response.body()),
        "the head ends the stream"
    );
    assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc+proto");
    assert_trailers_only(response, "14", "Bad Gateway").await;
}

/// A call no backend could take (an empty pool) is `UNAVAILABLE` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_no_backend_could_take_is_answered_unavailable() {
    let proxy = proxy(FailoverLayer::new(), &[]).await;
    let response = send_h2(proxy, call("application/grpc")).await;
    assert_trailers_only(response, "14", "Service Unavailable").await;
}

/// A call whose client's deadline passes at a backend that does not
/// answer is `DEADLINE_EXCEEDED`, not `UNAVAILABLE`, which would invite a
/// retry with no time left. Its deadline, not the client's read timeout
/// (60 s), ends it: the wait is bounded well below that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_deadline_passed_is_answered_deadline_exceeded() {
    let (hanging, seen) = support::http::hanging().await;
    let proxy = proxy(FailoverLayer::new().grpc_timeout(true), &[hanging]).await;
    let mut req = call("application/grpc");
    req.headers_mut()
        .insert("grpc-timeout", HeaderValue::from_static("200m"));
    let response = support::wait::bounded_real("the answer", send_h2(proxy, req)).await;
    assert_eq!(seen.connections(), 1, "the backend was reached");
    assert_trailers_only(response, "4", "Gateway Timeout").await;
}

/// gRPC-Web over HTTP/1.1: the same answer, its end told by
/// `content-length: 0`; a request that is no gRPC call keeps its HTTP
/// status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_web_call_over_http1_is_answered_in_its_head() {
    let proxy = proxy(FailoverLayer::new(), &[support::http::refused().await]).await;
    let (mut sender, _) = support::http::http1_client(proxy).await;
    let response = sender
        .send_request(call("application/grpc-web+proto"))
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_11);
    assert_eq!(response.headers()[CONTENT_LENGTH], "0");
    assert_eq!(
        response.headers()[CONTENT_TYPE],
        "application/grpc-web+proto"
    );
    assert_trailers_only(response, "14", "Bad Gateway").await;
    // The same connection goes on, for a page.
    sender.ready().await.unwrap();
    let page = Request::get("http://proxy.test/")
        .body(Full::default())
        .unwrap();
    let response = sender.send_request(page).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert!(response.headers().get("grpc-status").is_none());
}
