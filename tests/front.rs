//! The connection handling of `examples/reverse_proxy.rs`
//! (`examples/support/front.rs`), against real clients on 127.0.0.1: a
//! connection that sends no request (nothing, part of HTTP/2's preface,
//! an HTTP/2 handshake alone, part of an HTTP/1.1 head) is closed at the
//! header read timeout; an HTTP/2 connection outlives that timeout once it
//! has sent a request, stays while a response is being sent, and is closed
//! after its idle time without one; a stop lets the requests under way
//! finish (over HTTP/2 and HTTP/1.1), closes connections gracefully, idle
//! kept-alive HTTP/1.1 ones included, and drops them after the grace.
//! Past the most connections open, idle ones are closed to make room, and
//! a new one waits while none is idle; an HTTP/2 client
//! that resets most of its requests early is closed; a connection whose
//! every response stands still is dropped, not
//! one whose responses move however slowly, nor one whose requests fail; an HTTP/1.1 head over 64 KiB
//! is refused; the protocol is told from first bytes that come in parts.
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
use front::{Front, Limits};
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
/// to their end. See [`front_with`] for what it answers.
async fn front(
    header_read_timeout: Duration,
    idle: Duration,
) -> (SocketAddr, watch::Sender<bool>, Arc<AtomicUsize>) {
    let front = front_with(header_read_timeout, idle, None, HOUR, usize::MAX).await;
    (front.addr, front.stop, front.ended)
}

/// A front under test.
struct TestFront {
    addr: SocketAddr,
    /// The switch its connections watch.
    stop: watch::Sender<bool>,
    /// Connections it started serving, and served to their end.
    started: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
    /// Requests for `/hang` it took.
    hung: Arc<AtomicUsize>,
    /// Times its accept loop found every place taken.
    full: Arc<AtomicUsize>,
}

/// A front on 127.0.0.1 whose connections may have every request stalled
/// for `stalled` and whose closes let requests finish for `grace`, with at
/// most `max` connections open. It answers `200 OK`: to `/held` with a
/// body that comes after [`HELD`], to `/big` with 8 MiB in frames of 16 KiB
/// (as `HttpBackend`'s bodies hand theirs out), never to `/hang`; to
/// `/upgrade`, a switch to a protocol that echoes nothing and lasts until
/// the client closes; `/fail` fails at once (the server resets its
/// stream, or closes its HTTP/1.1 connection).
async fn front_with(
    header_read_timeout: Duration,
    idle: Duration,
    stalled: Option<Duration>,
    grace: Duration,
    max: usize,
) -> TestFront {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let front = Arc::new(Front::new(Limits {
        header_read_timeout: Some(header_read_timeout),
        idle,
        stalled,
        grace,
        stop_grace: grace,
    }));
    let [started, ended, hung] = [(); 3].map(|()| Arc::new(AtomicUsize::new(0)));
    let counts = (started.clone(), ended.clone(), hung.clone());
    let never = std::future::pending();
    let unexpected = |e: &std::io::Error| panic!("accept: {e}");
    let room = front.clone();
    let full = Arc::new(AtomicUsize::new(0));
    let fulls = full.clone();
    let full_now = move || {
        fulls.fetch_add(1, Ordering::SeqCst);
        room.make_room();
    };
    tokio::spawn(front::accept(
        listener,
        max,
        never,
        unexpected,
        full_now,
        move |admitted, _| {
            let (front, stopped) = (front.clone(), stopped.clone());
            let (started, ended, hung) = counts.clone();
            started.fetch_add(1, Ordering::SeqCst);
            async move {
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let hung = hung.clone();
                    async move {
                        let body = match req.uri().path() {
                            "/held" => {
                                let later = futures::stream::once(async {
                                    tokio::time::sleep(HELD).await;
                                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"held")))
                                });
                                BoxBody::new(StreamBody::new(later))
                            }
                            "/hang" => {
                                hung.fetch_add(1, Ordering::SeqCst);
                                std::future::pending().await
                            }
                            "/big" => {
                                let piece = Bytes::from(vec![0u8; 16 * 1024]);
                                let pieces = std::iter::repeat_n(piece, 512)
                                    .map(|piece| Ok::<_, Infallible>(Frame::data(piece)));
                                BoxBody::new(StreamBody::new(futures::stream::iter(pieces)))
                            }
                            "/upgrade" => return Ok(switch(&mut req)),
                            "/fail" => return Err(std::io::Error::other("failed")),
                            _ => Full::new(Bytes::from_static(b"ok")).boxed(),
                        };
                        Ok::<_, std::io::Error>(Response::new(body))
                    }
                });
                front.serve(TokioIo::new(admitted), service, stopped).await;
                ended.fetch_add(1, Ordering::SeqCst);
            }
        },
    ));
    TestFront {
        addr,
        stop,
        started,
        ended,
        hung,
        full,
    }
}

/// Switches `req`'s connection to a protocol that reads what comes until
/// the client closes, answering nothing.
fn switch(req: &mut Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 64];
            while let Ok(1..) = io.read(&mut buf).await {}
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "test")
        .body(Full::default().boxed())
        .unwrap()
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

/// Waits for the client's HTTP/1.1 connection to end, and for the front to
/// have ended `connections` in all; asserts that it ended between requests
/// (hyper's client fails a connection closed in the middle of one).
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

/// An HTTP/2 client connection, with what the front sent on it.
struct H2 {
    end: support::http::Connection,
    heard: Arc<parking_lot::Mutex<Vec<u8>>>,
}

/// An HTTP/2 client of `addr` (prior knowledge) that keeps every byte the
/// front sends it.
async fn h2_client(addr: SocketAddr) -> (Sender, H2) {
    h2_client_with_window(addr, None).await
}

/// As [`h2_client`], granting each stream `window` bytes (hyper's default
/// otherwise).
async fn h2_client_with_window(addr: SocketAddr, window: Option<u32>) -> (Sender, H2) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let heard = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let io = Heard {
        stream,
        heard: heard.clone(),
    };
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(window)
            .handshake(TokioIo::new(io))
            .await
            .unwrap();
    (
        sender,
        H2 {
            end: tokio::spawn(connection),
            heard,
        },
    )
}

/// A stream that keeps what it reads.
struct Heard {
    stream: TcpStream,
    heard: Arc<parking_lot::Mutex<Vec<u8>>>,
}

impl tokio::io::AsyncRead for Heard {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        let got = buf.filled()[before..].to_vec();
        self.heard.lock().extend_from_slice(&got);
        read
    }
}

impl tokio::io::AsyncWrite for Heard {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The error code of the first `GOAWAY` frame among HTTP/2 frames `bytes`
/// (a server's: they start with its `SETTINGS`, no preface), if any.
fn goaway(bytes: &[u8]) -> Option<u32> {
    let mut at = 0;
    while bytes.len() >= at + 9 {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        let payload = bytes.get(at + 9..at + 9 + len)?;
        if bytes[at + 3] == 0x7 {
            return Some(u32::from_be_bytes(payload.get(4..8)?.try_into().ok()?));
        }
        at += 9 + len;
    }
    None
}

/// Waits for the client's HTTP/2 connection to end, and for the front to
/// have ended `connections` in all; asserts that it ended gracefully: a
/// `GOAWAY` without error came before the close.
async fn assert_goaway(h2: H2, ended: &AtomicUsize, connections: usize) {
    let closed = support::wait::bounded_real("the connection closes", h2.end).await;
    assert!(closed.unwrap().is_ok(), "a clean close");
    assert_eq!(goaway(&h2.heard.lock()), Some(0), "a GOAWAY without error");
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
    let (_sender, end) = h2_client(addr).await;
    assert_goaway(end, &ended, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_stays_while_it_sends_requests_then_closes_when_idle() {
    let header_read_timeout = Duration::from_secs(1);
    let (addr, _stop, ended) = front(header_read_timeout, Duration::from_secs(2)).await;
    let (mut sender, end) = h2_client(addr).await;
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
    assert_goaway(end, &ended, 1).await;
}

/// A response being sent keeps its connection: the idle timer (1 s) fires
/// three times while `/held`'s body is awaited, and the connection still
/// takes a new request, then closes once idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_being_sent_keeps_its_connection() {
    let idle = Duration::from_secs(1);
    let (addr, _stop, ended) = front(idle, idle).await;
    let (mut sender, end) = h2_client(addr).await;
    let mut held = sender.clone();
    let held = tokio::spawn(async move { get(&mut held, "/held").await });
    tokio::time::sleep(HELD - idle / 2).await;
    let (status, _) = get(&mut sender, "/").await.expect("no GOAWAY yet");
    assert_eq!(status, StatusCode::OK);
    let (_, body) = held.await.unwrap().unwrap();
    assert_eq!(body, "held");
    assert_goaway(end, &ended, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_an_http2_connection_gracefully() {
    let (addr, stop, ended) = front(HOUR, HOUR).await;
    let (mut sender, end) = h2_client(addr).await;
    assert_eq!(get(&mut sender, "/").await.unwrap().0, StatusCode::OK);
    stop.send(true).unwrap();
    assert_goaway(end, &ended, 1).await;
}

/// Sends a GET of `/held` on `send`, which sends it on a connection of
/// its own; once its head has come, turns `stop` on; the held body then
/// comes whole.
async fn held_across_a_stop<F>(send: F, stop: &watch::Sender<bool>)
where
    F: std::future::Future<Output = hyper::Result<Response<Incoming>>>,
{
    let response = send.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    stop.send(true).unwrap();
    let body = support::wait::bounded_real("the held body", response.into_body().collect())
        .await
        .expect("the whole body")
        .to_bytes();
    assert_eq!(body, "held");
}

/// A request under way over HTTP/2 when a stop comes (`/held`, whose body
/// comes later) is answered to its end, and the connection then ends
/// gracefully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_an_http2_request_under_way_finish() {
    let (addr, stop, ended) = front(HOUR, HOUR).await;
    let (mut sender, end) = h2_client(addr).await;
    let req = Request::get("http://front.test/held")
        .body(Full::default())
        .unwrap();
    held_across_a_stop(sender.send_request(req), &stop).await;
    assert_goaway(end, &ended, 1).await;
}

/// Over HTTP/1.1, a stop lets the request under way finish, then closes
/// its connection, and closes a kept-alive connection that is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_an_http1_request_under_way_finish_and_closes_idle_connections() {
    let (addr, stop, ended) = front(HOUR, HOUR).await;
    let request = |path: &str| {
        Request::get(path)
            .header("host", "front.test")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let (mut idle, idle_end) = support::http::http1_client(addr).await;
    let answer = idle.send_request(request("/")).await.unwrap();
    assert_eq!(answer.into_body().collect().await.unwrap().to_bytes(), "ok");
    let (mut busy, busy_end) = support::http::http1_client(addr).await;
    assert_eq!(ended.load(Ordering::SeqCst), 0, "both kept alive");
    held_across_a_stop(busy.send_request(request("/held")), &stop).await;
    assert_closed_gracefully(idle_end, &ended, 2).await;
    assert_closed_gracefully(busy_end, &ended, 2).await;
}

/// A GET of `/` over HTTP/1.1, as a raw client sends it.
const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: front.test\r\n\r\n";

/// Asserts that nothing has answered `stream` yet.
fn assert_unanswered(stream: &TcpStream) {
    let nothing = stream.try_read(&mut [0u8; 256]);
    assert!(
        nothing
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "{nothing:?}"
    );
}

/// Reads the start of `stream`'s answer and asserts that it begins with
/// `status`.
async fn answered(stream: &mut TcpStream, status: &str) {
    let mut buf = [0u8; 256];
    let read = support::wait::bounded_real("an answer", stream.read(&mut buf))
        .await
        .unwrap();
    let got = String::from_utf8_lossy(&buf[..read]);
    assert!(got.starts_with(status), "{got:?}");
}

/// Past the most connections open, a new one waits, unserved, until one
/// closes: here, the first, which switched protocols and holds its place
/// until its client closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_most_open_waits_for_one_to_close() {
    let front = front_with(HOUR, HOUR, None, HOUR, 1).await;
    let mut first = TcpStream::connect(front.addr).await.unwrap();
    first
        .write_all(b"GET /upgrade HTTP/1.1\r\nhost: front.test\r\nconnection: upgrade\r\nupgrade: test\r\n\r\n")
        .await
        .unwrap();
    answered(&mut first, "HTTP/1.1 101").await;
    support::wait::spin_until("hyper hands the connection over", || {
        front.ended.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut second = TcpStream::connect(front.addr).await.unwrap();
    second.write_all(GET).await.unwrap();
    // The accept loop holds the second, waiting for a place (it asks for
    // room as it starts to wait): it is not served, so nothing answers it.
    support::wait::spin_until("every place is taken", || {
        front.full.load(Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(front.started.load(Ordering::SeqCst), 1);
    assert_unanswered(&second);
    drop(first);
    answered(&mut second, "HTTP/1.1 200 OK").await;
    assert_eq!(front.started.load(Ordering::SeqCst), 2);
}

/// At the most connections open, those with no request open are closed
/// (an HTTP/2 one with a `GOAWAY`, a kept-alive HTTP/1.1 one between
/// requests) so that a new connection is served; one with a request open
/// is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_to_make_room_at_the_most_open() {
    let front = front_with(HOUR, HOUR, None, HOUR, 2).await;
    // Both places taken: an HTTP/2 connection and a kept-alive HTTP/1.1
    // one, each idle after a request.
    let (mut h2, h2_end) = h2_client(front.addr).await;
    assert_eq!(get(&mut h2, "/").await.unwrap().0, StatusCode::OK);
    let mut h1 = TcpStream::connect(front.addr).await.unwrap();
    h1.write_all(GET).await.unwrap();
    answered(&mut h1, "HTTP/1.1 200 OK").await;

    let mut third = TcpStream::connect(front.addr).await.unwrap();
    third.write_all(GET).await.unwrap();
    answered(&mut third, "HTTP/1.1 200 OK").await;
    // Both idle ones were closed, the HTTP/2 one with a GOAWAY.
    let closed = support::wait::bounded_real("the HTTP/2 one closes", h2_end.end).await;
    assert!(closed.unwrap().is_ok(), "a clean close");
    assert_eq!(
        goaway(&h2_end.heard.lock()),
        Some(0),
        "a GOAWAY without error"
    );
    let rest = support::wait::bounded_real("the HTTP/1.1 one closes", h1.read(&mut [0u8; 256]))
        .await
        .unwrap();
    assert_eq!(rest, 0, "closed between requests");

    // Now the third is idle, and one with a request open takes the other
    // place (served once before, so that only its open request spares it):
    // a fourth is served in the idle one's place, not the busy one's.
    let (mut hanging, hanging_end) = h2_client(front.addr).await;
    assert_eq!(get(&mut hanging, "/").await.unwrap().0, StatusCode::OK);
    let mut hanging_sender = hanging.clone();
    let hung = tokio::spawn(async move { get(&mut hanging_sender, "/hang").await });
    support::wait::spin_until("the hanging request is taken", || {
        front.hung.load(Ordering::SeqCst) == 1
    })
    .await;
    let (mut fourth, _fourth_end) = h2_client(front.addr).await;
    let answered = support::wait::bounded_real("the fourth is answered", get(&mut fourth, "/"));
    assert_eq!(answered.await.unwrap().0, StatusCode::OK);
    let rest = support::wait::bounded_real("the third closes", third.read(&mut [0u8; 256]))
        .await
        .unwrap();
    assert_eq!(rest, 0, "closed between requests");
    assert!(!hung.is_finished(), "the request open was cut");
    assert!(
        !hanging_end.end.is_finished(),
        "the busy connection was closed"
    );
    // Nor asked to close (a GOAWAY would let its request finish first).
    let sent = get(&mut hanging, "/").await.expect("still taking requests");
    assert_eq!(sent.0, StatusCode::OK);
    assert!(goaway(&hanging_end.heard.lock()).is_none());
}

/// A connection that has not sent its first request yet is not closed to
/// make room: it is left its time for it; once it has been served and is
/// idle, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_yet_to_send_its_first_request_keeps_its_place() {
    let front = front_with(HOUR, HOUR, None, HOUR, 1).await;
    let (mut first, first_end) = h2_client(front.addr).await;
    let mut second = TcpStream::connect(front.addr).await.unwrap();
    second.write_all(GET).await.unwrap();
    // Asked twice (a second apart) while the second waits.
    support::wait::spin_until("room asked for twice", || {
        front.full.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert!(goaway(&first_end.heard.lock()).is_none(), "closed unserved");
    assert!(!first_end.end.is_finished());
    assert_unanswered(&second);
    // Served, then idle: it gives its place at the next ask.
    assert_eq!(get(&mut first, "/").await.unwrap().0, StatusCode::OK);
    answered(&mut second, "HTTP/1.1 200 OK").await;
    assert_goaway(first_end, &front.ended, 1).await;
}

/// Sends `n` GETs of `/hang` on `sender`, at most 50 at a time, each
/// given up (its stream reset) once `front` has taken every request of its
/// batch, so that the resets come after hyper took the streams. Once the
/// front has closed the connection (a `GOAWAY`), the requests it did not
/// take are refused instead.
async fn reset_early(front: &TestFront, sender: &Sender, n: usize) {
    let mut left = n;
    while left > 0 {
        let batch = left.min(50);
        left -= batch;
        let hung = front.hung.load(Ordering::SeqCst);
        let calls: Vec<_> = (0..batch)
            .map(|_| {
                let mut sender = sender.clone();
                let req = Request::get("http://front.test/hang")
                    .body(Full::default())
                    .unwrap();
                tokio::spawn(async move { sender.send_request(req).await })
            })
            .collect();
        support::wait::spin_until("the front takes or refuses the batch", || {
            let refused = calls.iter().filter(|call| call.is_finished()).count();
            front.hung.load(Ordering::SeqCst) - hung + refused == batch
        })
        .await;
        for call in calls {
            call.abort();
            match call.await {
                Err(aborted) => assert!(aborted.is_cancelled()),
                Ok(refused) => assert!(refused.is_err(), "/hang is never answered"),
            }
        }
    }
}

/// An HTTP/2 client that resets its requests soon after it sends them (a
/// rapid reset attack, each reset a moment after its stream was taken, so
/// that h2's own limit does not see it) is closed with a `GOAWAY` once it
/// has reset 250 of them, half of 500: not at 249 (with a request served
/// besides), and by 260 (ten spare, for resets a busy host sends late).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_resets_its_requests_early_is_closed() {
    let front = front_with(HOUR, HOUR, None, HOUR, usize::MAX).await;
    let (sender, end) = h2_client(front.addr).await;
    reset_early(&front, &sender, 249).await;
    let (status, _) = get(&mut sender.clone(), "/").await.expect("still open");
    assert_eq!(status, StatusCode::OK);
    assert!(
        goaway(&end.heard.lock()).is_none(),
        "closed before 250 resets"
    );
    reset_early(&front, &sender, 11).await;
    assert_goaway(end, &front.ended, 1).await;
}

/// A client that resets a third of its requests early keeps its
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_resets_a_few_requests_keeps_its_connection() {
    let front = front_with(HOUR, HOUR, None, HOUR, usize::MAX).await;
    let (mut sender, _end) = h2_client(front.addr).await;
    for _ in 0..4 {
        reset_early(&front, &sender, 100).await;
        for _ in 0..200 {
            assert_eq!(get(&mut sender, "/").await.unwrap().0, StatusCode::OK);
        }
    }
    assert_eq!(front.ended.load(Ordering::SeqCst), 0);
}

/// Requests that fail at once were answered, not reset by their client:
/// an HTTP/2 client whose every request fails keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_whose_requests_fail_keeps_its_connection() {
    let front = front_with(HOUR, HOUR, None, HOUR, usize::MAX).await;
    let (mut sender, _end) = h2_client(front.addr).await;
    for _ in 0..600 {
        assert!(
            get(&mut sender, "/fail").await.is_err(),
            "its stream is reset"
        );
    }
    assert_eq!(get(&mut sender, "/").await.unwrap().0, StatusCode::OK);
    assert_eq!(front.ended.load(Ordering::SeqCst), 0);
}

/// The head of a response to an HTTP/2 client that grants its streams no
/// window, so that the front cannot send the body: the response, and the
/// end of the client's connection.
async fn stuck_response(addr: SocketAddr) -> (Response<Incoming>, H2) {
    let (mut sender, end) = h2_client_with_window(addr, Some(0)).await;
    let req = Request::get("http://front.test/")
        .body(Full::default())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    (response, end)
}

/// Waits for the client's connection to end, and for the front to have
/// ended one; with `closed_first` false, asserts that it was dropped
/// without a `GOAWAY` (a connection closed first, whose grace then ran
/// out, may have had one sent, or still queued behind what it could not
/// send).
async fn assert_dropped(h2: H2, ended: &AtomicUsize, closed_first: bool) {
    let _ = support::wait::bounded_real("the connection ends", h2.end).await;
    if !closed_first {
        assert_eq!(goaway(&h2.heard.lock()), None, "dropped, not closed");
    }
    support::wait::spin_until("the front's side ended", || {
        ended.load(Ordering::SeqCst) == 1
    })
    .await;
}

/// An HTTP/2 connection whose every stream waits for its client to take
/// what the front handed it (here, a client that grants no window) is
/// dropped after the stall limit: hyper's servers would keep it for good,
/// the client answering PINGs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_every_stream_is_stalled_is_dropped() {
    let stalled = Some(Duration::from_secs(1));
    let front = front_with(HOUR, HOUR, stalled, HOUR, usize::MAX).await;
    let (response, end) = stuck_response(front.addr).await;
    assert_dropped(end, &front.ended, false).await;
    drop(response);
}

/// A stream stalled beside others that move, or that wait for their
/// answers, keeps its connection: the limit is on a connection whose
/// responses all stand still. Once the others end, the connection is
/// dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_beside_moving_ones_keeps_its_connection() {
    let stalled = Duration::from_secs(2);
    let front = front_with(HOUR, HOUR, Some(stalled), HOUR, usize::MAX).await;
    let (mut sender, end) = h2_client(front.addr).await;
    // Left unread: the client's window (2 MiB) runs out.
    let req = Request::get("http://front.test/big")
        .body(Full::default())
        .unwrap();
    let big = sender.send_request(req).await.unwrap();
    for _ in 0..30 {
        assert_eq!(get(&mut sender, "/").await.unwrap().0, StatusCode::OK);
        tokio::time::sleep(stalled / 20).await;
    }
    assert_eq!(front.ended.load(Ordering::SeqCst), 0);
    // A request that waits for its answer is not stalled either.
    let hang = Request::get("http://front.test/hang")
        .body(Full::default())
        .unwrap();
    let waiting = tokio::spawn(sender.send_request(hang));
    tokio::time::sleep(stalled * 2).await;
    assert_eq!(front.ended.load(Ordering::SeqCst), 0);
    waiting.abort();
    assert_dropped(end, &front.ended, false).await;
    drop(big);
}

/// A response its client takes slowly, but steadily, keeps its connection
/// however long it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_read_slowly_keeps_its_connection() {
    let stalled = Duration::from_secs(2);
    let front = front_with(HOUR, HOUR, Some(stalled), HOUR, usize::MAX).await;
    // A window of 64 KiB (four of the body's frames) holds the front to the
    // client's pace: it sends the 8 MiB as they are read, a frame each
    // 8 ms, over twice the stall limit, never all at once.
    let (mut sender, _end) = h2_client_with_window(front.addr, Some(64 * 1024)).await;
    let req = Request::get("http://front.test/big")
        .body(Full::default())
        .unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let mut read = 0;
    while let Some(frame) = body.frame().await {
        read += frame.unwrap().into_data().unwrap().len();
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
    assert_eq!(read, 8 << 20);
    assert_eq!(front.ended.load(Ordering::SeqCst), 0);
}

/// A connection that a stop closes is dropped after its grace even when a
/// stream stays open: here, one whose client grants it no window to send
/// its body in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_is_dropped_after_its_grace() {
    let front = front_with(HOUR, HOUR, None, Duration::from_secs(1), usize::MAX).await;
    let (response, end) = stuck_response(front.addr).await;
    front.stop.send(true).unwrap();
    assert_dropped(end, &front.ended, true).await;
    drop(response);
}

/// An HTTP/1.1 request head over 64 KiB is refused (`431`), as one over
/// 16 KiB is over HTTP/2; hyper's own limit is about 400 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_request_head_over_64_kib_is_refused() {
    let (addr, _stop, _ended) = front(HOUR, HOUR).await;
    for (size, status) in [(60 * 1024, "200"), (70 * 1024, "431")] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "GET / HTTP/1.1\r\nhost: front.test\r\nx-big: {}\r\nconnection: close\r\n\r\n",
            "a".repeat(size)
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        support::wait::bounded_real("the answer", stream.read_to_end(&mut got))
            .await
            .unwrap();
        let line = String::from_utf8_lossy(&got[..got.len().min(12)]).into_owned();
        assert_eq!(line, format!("HTTP/1.1 {status}"), "{size} bytes");
    }
}

/// The protocol is told from a connection's first bytes however they come:
/// HTTP/2's preface in two parts, an HTTP/1.1 request a byte at first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_is_told_from_first_bytes_sent_in_parts() {
    let (addr, _stop, _ended) = front(HOUR, HOUR).await;
    let mut h2 = TcpStream::connect(addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The rest of the preface, then an empty SETTINGS frame.
    h2.write_all(b"\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    support::wait::bounded_real("the server's SETTINGS", h2.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(head[3], 0x04, "a SETTINGS frame: {head:?}");
    let mut h1 = TcpStream::connect(addr).await.unwrap();
    h1.write_all(b"G").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    h1.write_all(b"ET / HTTP/1.1\r\nhost: front.test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    support::wait::bounded_real("the answer", h1.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200 OK"), "{got:?}");
    assert!(got.ends_with(b"ok"), "{got:?}");
}
