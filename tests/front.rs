//! The connection handling of `examples/reverse_proxy.rs`
//! (`examples/support/front.rs`), against real clients on 127.0.0.1: a
//! connection that sends no request (nothing, part of HTTP/2's preface,
//! an HTTP/2 handshake alone, part of an HTTP/1.1 head) is closed at the
//! header read timeout; an HTTP/2 connection outlives that timeout once it
//! has sent a request, stays while a response is being sent, and is closed
//! after its idle time without one; a stop closes connections gracefully.
//! Each test sets a limit it does not test to an hour.

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
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const HOUR: Duration = Duration::from_secs(3600);

/// How long `/held`'s response takes to send its body.
const HELD: Duration = Duration::from_millis(3500);

/// A front on 127.0.0.1 with these limits; returns its address, the stop
/// switch its connections watch, and a count of the connections it served
/// to their end. It answers `200 OK`, to `/held` with a body that comes
/// after [`HELD`].
async fn front(
    header_read_timeout: Duration,
    idle: Duration,
) -> (SocketAddr, watch::Sender<bool>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let ended = Arc::new(AtomicUsize::new(0));
    let front = Arc::new(Front::new(Some(header_read_timeout), idle));
    let served = ended.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (front, stopped, served) = (front.clone(), stopped.clone(), served.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = if req.uri().path() == "/held" {
                        let later = futures::stream::once(async {
                            tokio::time::sleep(HELD).await;
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"held")))
                        });
                        BoxBody::new(StreamBody::new(later))
                    } else {
                        Full::new(Bytes::from_static(b"ok")).boxed()
                    };
                    Ok::<_, Infallible>(Response::new(body))
                });
                front.serve(TokioIo::new(stream), service, stopped).await;
                served.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, stop, ended)
}

type Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// Sends a GET of `path`; its status and body.
async fn get(sender: &mut Sender, path: &str) -> Result<(StatusCode, Bytes), hyper::Error> {
    let req = Request::get(format!("http://front.test{path}"))
        .body(Full::default())
        .unwrap();
    let response = sender.send_request(req).await?;
    let status = response.status();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

/// Waits for the client's connection to end, and for the front to have
/// ended `connections` in all; asserts that it ended gracefully (a
/// `GOAWAY`, not a reset).
async fn assert_closed_gracefully(
    end: support::http::Connection,
    ended: &AtomicUsize,
    connections: usize,
) {
    let closed = support::wait::bounded_real("the connection closes", end).await;
    assert!(closed.unwrap().is_ok(), "a graceful close");
    support::wait::spin_until("the front's side ended", || {
        ended.load(Ordering::SeqCst) == connections
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_request_is_closed() {
    let (addr, _stop, ended) = front(Duration::from_secs(1), HOUR).await;
    // Nothing at all; part of HTTP/2's preface, so the protocol is never
    // known; part of an HTTP/1.1 head.
    for sent in [&b""[..], b"PRI * HT", b"GET / HTTP/1.1\r\nHo"] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let mut got = Vec::new();
        support::wait::bounded_real("the front closes", stream.read_to_end(&mut got))
            .await
            .unwrap();
        // hyper answers a head cut short with a 408 as it closes.
        let shown = String::from_utf8_lossy(sent);
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
            "{shown}: {got:?}"
        );
    }
    // An HTTP/2 handshake, then no request: hyper's own header read
    // timeout does not watch HTTP/2.
    let (_sender, end) = support::http::h2_client::<Full<Bytes>>(addr).await;
    assert_closed_gracefully(end, &ended, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_stays_while_it_sends_requests_then_closes_when_idle() {
    let header_read_timeout = Duration::from_secs(1);
    let (addr, _stop, ended) = front(header_read_timeout, Duration::from_secs(2)).await;
    let (mut sender, end) = support::http::h2_client(addr).await;
    assert_eq!(get(&mut sender, "/").await.unwrap().0, StatusCode::OK);
    // Past the header read timeout: the connection sent its first request.
    tokio::time::sleep(header_read_timeout + header_read_timeout / 2).await;
    assert_eq!(get(&mut sender, "/").await.unwrap().0, StatusCode::OK);
    assert_eq!(
        ended.load(Ordering::SeqCst),
        0,
        "the one connection is open"
    );
    // No request for the idle time: closed, with a GOAWAY.
    assert_closed_gracefully(end, &ended, 1).await;
}

/// A response being sent keeps its connection: the idle timer (1 s) fires
/// three times while `/held`'s body is awaited, and the connection still
/// takes a new request, then closes once idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_being_sent_keeps_its_connection() {
    let idle = Duration::from_secs(1);
    let (addr, _stop, ended) = front(idle, idle).await;
    let (mut sender, end) = support::http::h2_client(addr).await;
    let mut held = sender.clone();
    let held = tokio::spawn(async move { get(&mut held, "/held").await });
    tokio::time::sleep(HELD - idle / 2).await;
    let (status, _) = get(&mut sender, "/").await.expect("no GOAWAY yet");
    assert_eq!(status, StatusCode::OK);
    let (_, body) = held.await.unwrap().unwrap();
    assert_eq!(body, "held");
    assert_closed_gracefully(end, &ended, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_an_http2_connection_gracefully() {
    let (addr, stop, ended) = front(HOUR, HOUR).await;
    let (mut sender, end) = support::http::h2_client(addr).await;
    assert_eq!(get(&mut sender, "/").await.unwrap().0, StatusCode::OK);
    stop.send(true).unwrap();
    assert_closed_gracefully(end, &ended, 1).await;
}
