//! The connection handling of `examples/reverse_proxy.rs`
//! (`examples/support/front.rs`), against real clients on 127.0.0.1: a
//! connection that sends nothing, or stops in the middle of HTTP/2's
//! preface, is closed at the header read timeout; an HTTP/2 connection
//! outlives that timeout once it has sent a request, and is closed after
//! its idle time without one; a stop closes connections gracefully.

#[path = "../examples/support/front.rs"]
mod front;
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use front::Front;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(1);
const IDLE: Duration = Duration::from_secs(2);

/// A front on 127.0.0.1 answering every request `200 OK`, with the
/// timeouts above; returns its address, the stop switch its connections
/// watch, and a count of the connections it served to their end.
async fn front() -> (SocketAddr, watch::Sender<bool>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let ended = Arc::new(AtomicUsize::new(0));
    let front = Arc::new(Front::new(Some(HEADER_READ_TIMEOUT), IDLE));
    let served = ended.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (front, stopped, served) = (front.clone(), stopped.clone(), served.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                front.serve(TokioIo::new(stream), service, stopped).await;
                served.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, stop, ended)
}

/// An HTTP/2 client of `addr` (prior knowledge), and a channel that
/// receives its connection's end.
async fn h2_client(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::sync::oneshot::Receiver<Result<(), hyper::Error>>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let (ended, end) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = ended.send(connection.await);
    });
    (sender, end)
}

async fn get(sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>) -> StatusCode {
    let req = Request::get("http://front.test/")
        .body(Full::default())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let status = response.status();
    response.into_body().collect().await.unwrap();
    status
}

/// Reads `stream` until its end; what came before it.
async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    support::wait::bounded_real(
        "the front closes the connection",
        stream.read_to_end(&mut got),
    )
    .await
    .unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_request_is_closed() {
    let (addr, _stop, ended) = front().await;
    // Nothing at all; part of HTTP/2's preface, so the protocol is never
    // known; part of an HTTP/1.1 head.
    for sent in [&b""[..], b"PRI * HT", b"GET / HTTP/1.1\r\nHo"] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let got = read_to_end(&mut stream).await;
        let shown = String::from_utf8_lossy(sent);
        // hyper answers a head cut short with a 408 as it closes.
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
            "{shown}: {got:?}"
        );
    }
    support::wait::spin_until("each connection ended", || {
        ended.load(Ordering::SeqCst) == 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_stays_while_it_sends_requests_then_closes_when_idle() {
    let (addr, _stop, ended) = front().await;
    let (mut sender, end) = h2_client(addr).await;
    assert_eq!(get(&mut sender).await, StatusCode::OK);
    // Past the header read timeout: the connection sent its first request.
    tokio::time::sleep(HEADER_READ_TIMEOUT + HEADER_READ_TIMEOUT / 2).await;
    assert_eq!(get(&mut sender).await, StatusCode::OK);
    assert_eq!(
        ended.load(Ordering::SeqCst),
        0,
        "the one connection is open"
    );
    // No request for the idle time: closed, with a GOAWAY.
    let closed = support::wait::bounded_real("the idle connection closes", end).await;
    assert!(closed.unwrap().is_ok(), "a graceful close");
    support::wait::spin_until("the front's side ended", || {
        ended.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_an_http2_connection_gracefully() {
    let (addr, stop, ended) = front().await;
    let (mut sender, end) = h2_client(addr).await;
    assert_eq!(get(&mut sender).await, StatusCode::OK);
    stop.send(true).unwrap();
    let closed = support::wait::bounded_real("the stopped connection closes", end).await;
    assert!(closed.unwrap().is_ok(), "a graceful close");
    support::wait::spin_until("the front's side ended", || {
        ended.load(Ordering::SeqCst) == 1
    })
    .await;
}
