//! Protocol upgrades (WebSocket and the like) through `HttpBackend`: real
//! hyper servers on 127.0.0.1 behind a hyper server that serves the
//! balanced stack, and clients speaking HTTP/1.1 on raw TCP.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::error::gateway_status;
use tower_ha::extensions::PeerAddr;
use tower_ha::failover::{BufferBodyLayer, FailoverLayer, ReplayBody};
use tower_ha::health::HealthLayer;
use tower_ha::http::{HttpBackend, HttpClient};
use tower_ha::{BoxError, Pool};

mod support;

use support::health_http::eventually;

/// What an upgrading backend saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// The headers of each upgrade request, as `name: value` lines.
    upgrade_heads: Mutex<Vec<String>>,
    /// Plain requests answered.
    plain: AtomicUsize,
    /// Tunnels whose client side ended (EOF or error).
    closed: AtomicUsize,
}

/// How a backend answers an upgrade request.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `101`, then greets with its name and echoes what it reads; `die`
    /// drops the connection at once.
    Echo,
    /// `426 Upgrade Required`: stays HTTP.
    Decline,
    /// `101` without `Upgrade`, then nothing.
    Unnamed,
    /// `101` naming `h2c`, which nobody offered, then nothing.
    Unoffered,
}

/// A hyper server that switches to the `echo` protocol when asked.
async fn backend(name: &'static str, mode: Mode) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let server_seen = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            server_seen.connections.fetch_add(1, Ordering::SeqCst);
            let seen = server_seen.clone();
            let service = service_fn(move |mut req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    if !req.headers().contains_key("upgrade") {
                        seen.plain.fetch_add(1, Ordering::SeqCst);
                        let body = format!("{name} plain");
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))));
                    }
                    let mut head: Vec<String> = req
                        .headers()
                        .iter()
                        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                        .collect();
                    head.sort();
                    seen.upgrade_heads.lock().push(head.join("\n"));
                    if mode == Mode::Decline {
                        let mut resp = Response::new(Full::new(Bytes::from("use plain HTTP")));
                        *resp.status_mut() = StatusCode::UPGRADE_REQUIRED;
                        return Ok(resp);
                    }
                    if matches!(mode, Mode::Unnamed | Mode::Unoffered) {
                        let mut resp = Response::new(Full::default());
                        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        if mode == Mode::Unoffered {
                            resp.headers_mut().insert("upgrade", "h2c".parse().unwrap());
                        }
                        return Ok(resp);
                    }
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let mut io = TokioIo::new(on.await.unwrap());
                        io.write_all(format!("{name}\n").as_bytes()).await.unwrap();
                        let mut buf = vec![0; 64 * 1024];
                        loop {
                            match io.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(_) if buf.starts_with(b"die") => break,
                                Ok(n) => {
                                    if io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        seen.closed.fetch_add(1, Ordering::SeqCst);
                        // Dropped: the connection closes.
                    });
                    Ok(Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header("upgrade", "echo")
                        .header("connection", "upgrade, x-private")
                        .header("x-private", "1")
                        .header("keep-alive", "timeout=5")
                        .header("x-backend", name)
                        .body(Full::default())
                        .unwrap())
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, seen)
}

type Body = ReplayBody<Incoming>;

/// The proxy's stack: `BufferBody → Failover → Balance` (round robin) over
/// `HttpBackend`s named `b1`, `b2`, ..., as `examples/reverse_proxy.rs`
/// builds it; and its pool.
fn stack(
    client: HttpClient<Body>,
    addrs: &[SocketAddr],
) -> (
    Pool<HttpBackend<Body>>,
    impl Service<
            Request<Incoming>,
            Response = Response<tower_ha::http::ResponseBody>,
            Error = BoxError,
            Future: Send,
        > + Clone
        + Send
        + 'static,
) {
    let pool = Pool::new();
    for (i, addr) in addrs.iter().enumerate() {
        let backend = HttpBackend::new(&client, format!("http://{addr}")).unwrap();
        pool.insert(format!("b{}", i + 1), backend);
    }
    let stack = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(FailoverLayer::new())
        .service(Balance::new(pool.clone(), RoundRobin::new()));
    (pool, stack)
}

/// A hyper server (with upgrades, as axum serves) in front of `addrs`.
async fn proxy(addrs: &[SocketAddr]) -> SocketAddr {
    proxy_with(HttpClient::new(), addrs).await
}

/// [`proxy`], with the client's settings given.
async fn proxy_with(client: HttpClient<Body>, addrs: &[SocketAddr]) -> SocketAddr {
    serve_stack(stack(client, addrs).1, true).await
}

/// Serves `stack` as [`proxy`] does, with or without hyper's upgrades:
/// without them, hyper fails every handover when the connection ends.
async fn serve_stack<S>(stack: S, upgrades: bool) -> SocketAddr
where
    S: Service<
            Request<Incoming>,
            Response = Response<tower_ha::http::ResponseBody>,
            Error = BoxError,
            Future: Send,
        > + Clone
        + Send
        + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            let stack = stack.clone();
            let service = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                let stack = stack.clone();
                async move {
                    let resp: Response<BoxBody<Bytes, BoxError>> = match stack.oneshot(req).await {
                        Ok(resp) => resp.map(BodyExt::boxed),
                        Err(e) => {
                            let mut resp = Response::new(
                                Full::from(e.to_string()).map_err(|e| match e {}).boxed(),
                            );
                            *resp.status_mut() = gateway_status(&*e);
                            resp
                        }
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if upgrades {
                    let _ = conn.with_upgrades().await;
                } else {
                    let _ = conn.await;
                }
            });
        }
    });
    addr
}

const UPGRADE: &str = "GET /chat HTTP/1.1\r\nHost: front\r\nUpgrade: echo\r\n\
    Connection: keep-alive, Upgrade, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=9\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// Reads what comes next on `stream`, failing the test (rather than
/// hanging it) if nothing comes for 10 s.
async fn read_some(stream: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> usize {
    tokio::time::timeout(Duration::from_secs(10), stream.read(buf))
        .await
        .expect("nothing read for 10 s")
        .unwrap()
}

/// Reads a response head; returns it and what came after it.
async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0; 4096];
    loop {
        let n = read_some(stream, &mut chunk).await;
        assert!(n > 0, "closed before the head ended: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(at + 4);
            return (String::from_utf8(buf).unwrap().to_ascii_lowercase(), rest);
        }
    }
}

/// Reads until `want` bytes (counting `already`) have come.
async fn read_exactly(
    stream: &mut (impl AsyncRead + Unpin),
    mut already: Vec<u8>,
    want: usize,
) -> Vec<u8> {
    let mut chunk = vec![0; 64 * 1024];
    while already.len() < want {
        let n = read_some(stream, &mut chunk).await;
        assert!(n > 0, "closed after {} of {want} bytes", already.len());
        already.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(already.len(), want, "more than asked for");
    already
}

/// Reads `stream` to its end (bounded, naming `what`, only against a
/// hang: the end is what is checked); what came before it.
async fn read_to_close(stream: &mut (impl AsyncRead + Unpin), what: &str) -> Vec<u8> {
    let mut rest = Vec::new();
    support::wait::bounded_real(what, stream.read_to_end(&mut rest))
        .await
        .unwrap();
    rest
}

/// Connects to `proxy` and sends `request` as it is.
async fn send_raw(proxy: SocketAddr, request: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request).await.unwrap();
    stream
}

/// Reads a `200` from `backend` for a plain request.
async fn expect_plain_answer(stream: &mut TcpStream, backend: &str) {
    let (head, rest) = read_head(stream).await;
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    let body = format!("{backend} plain");
    assert_eq!(
        read_exactly(stream, rest, body.len()).await,
        body.as_bytes()
    );
}

/// Sends a plain request on `stream` and reads `backend`'s answer: the
/// connection still speaks HTTP.
async fn still_http(stream: &mut TcpStream, backend: &str) {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: front\r\n\r\n")
        .await
        .unwrap();
    expect_plain_answer(stream, backend).await;
}

/// Opens a tunnel through `proxy`; returns the stream, the response head,
/// and the backend's greeting (its name).
async fn open_tunnel(proxy: SocketAddr) -> (TcpStream, String, String) {
    let mut stream = send_raw(proxy, UPGRADE.as_bytes()).await;
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    let mut greeting = rest;
    while !greeting.contains(&b'\n') {
        let mut chunk = [0; 64];
        let n = read_some(&mut stream, &mut chunk).await;
        assert!(n > 0, "no greeting");
        greeting.extend_from_slice(&chunk[..n]);
    }
    let greeting = String::from_utf8(greeting).unwrap();
    let name = greeting
        .strip_suffix('\n')
        .expect("the greeting alone")
        .to_owned();
    (stream, head, name)
}

#[tokio::test]
async fn a_switch_of_protocols_is_proxied_both_ways() {
    let (b1, seen) = backend("b1", Mode::Echo).await;
    let front = proxy(&[b1]).await;
    let (mut stream, head, name) = open_tunnel(front).await;
    assert_eq!(name, "b1");

    // The client sees the backend's switch, without the backend's own
    // hop-by-hop headers.
    assert!(head.contains("\r\nupgrade: echo"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade"), "{head}");
    assert!(head.contains("\r\nx-backend: b1"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
    assert!(!head.contains("x-private"), "{head}");

    // The backend saw the request for the switch, without the client's
    // other hop-by-hop headers.
    let heads = seen.upgrade_heads.lock().clone();
    assert_eq!(heads.len(), 1);
    let lines: Vec<&str> = heads[0].lines().collect();
    assert!(lines.contains(&"connection: upgrade"), "{lines:?}");
    assert!(lines.contains(&"upgrade: echo"), "{lines:?}");
    assert!(
        lines.contains(&"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ=="),
        "{lines:?}"
    );
    assert!(lines.contains(&"x-forwarded-for: 127.0.0.1"), "{lines:?}");
    assert!(
        lines.iter().all(|l| !l.starts_with("keep-alive")),
        "{lines:?}"
    );
    assert!(
        lines.iter().all(|l| !l.starts_with("x-secret")),
        "{lines:?}"
    );

    // Bytes flow both ways, a MiB at once while it is echoed back.
    let payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let (mut read, mut write) = stream.split();
    let sent = payload.clone();
    let (echoed, ()) = tokio::join!(read_exactly(&mut read, Vec::new(), payload.len()), async {
        write.write_all(&sent).await.unwrap();
    });
    assert!(echoed == payload, "the echo differs from what was sent");

    // The client ends its side: the backend sees the end and closes, and
    // so the client sees the end too.
    stream.shutdown().await.unwrap();
    let rest = read_to_close(&mut stream, "the tunnel's end").await;
    assert!(rest.is_empty(), "{rest:?}");
    eventually("the backend saw the tunnel end", || {
        seen.closed.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn an_upgrade_fails_over_when_a_backend_refuses_the_connection() {
    let refused = support::http::refused().await;
    let (b2, seen) = backend("b2", Mode::Echo).await;
    // Round robin starts at the refusing one.
    let front = proxy(&[refused, b2]).await;
    let (mut stream, _, name) = open_tunnel(front).await;
    assert_eq!(
        name, "b2",
        "the failover's second attempt carries the switch"
    );
    stream.write_all(b"ping").await.unwrap();
    assert_eq!(read_exactly(&mut stream, Vec::new(), 4).await, b"ping");
    assert_eq!(seen.upgrade_heads.lock().len(), 1);
}

#[tokio::test]
async fn a_declined_upgrade_is_an_ordinary_response() {
    let (b1, seen) = backend("b1", Mode::Decline).await;
    let front = proxy(&[b1]).await;
    let mut stream = send_raw(front, UPGRADE.as_bytes()).await;
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 426 "), "{head}");
    assert!(head.contains("content-length: 14"), "{head}");
    assert_eq!(read_exactly(&mut stream, rest, 14).await, b"use plain HTTP");
    // The client's connection still speaks HTTP.
    still_http(&mut stream, "b1").await;
    assert_eq!(seen.upgrade_heads.lock().len(), 1);
    assert_eq!(seen.plain.load(Ordering::SeqCst), 1);
}

/// A declined switch leaves an ordinary connection, which goes back to the
/// pool: a client offering `Upgrade` on every request costs the backend no
/// connection per request, and plain requests take the same connection.
#[tokio::test]
async fn declined_upgrades_take_pooled_connections() {
    let (b1, seen) = backend("b1", Mode::Decline).await;
    let front = proxy(&[b1]).await;
    let mut stream = TcpStream::connect(front).await.unwrap();
    still_http(&mut stream, "b1").await;
    for _ in 0..20 {
        stream.write_all(UPGRADE.as_bytes()).await.unwrap();
        let (head, rest) = read_head(&mut stream).await;
        assert!(head.starts_with("http/1.1 426 "), "{head}");
        assert_eq!(read_exactly(&mut stream, rest, 14).await, b"use plain HTTP");
    }
    still_http(&mut stream, "b1").await;
    assert_eq!(seen.upgrade_heads.lock().len(), 20);
    assert_eq!(seen.plain.load(Ordering::SeqCst), 2);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

/// A switch takes a pooled connection, as any request does, and keeps it:
/// the connection carries the tunnel, and never goes back to the pool.
#[tokio::test]
async fn a_tunnel_keeps_its_connection() {
    let (b1, seen) = backend("b1", Mode::Echo).await;
    let front = proxy(&[b1]).await;
    let plain = |front| async move {
        let mut stream = send_raw(
            front,
            b"GET / HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n",
        )
        .await;
        let mut all = String::new();
        stream.read_to_string(&mut all).await.unwrap();
        assert!(all.starts_with("HTTP/1.1 200 "), "{all}");
        assert!(all.ends_with("b1 plain"), "{all}");
    };
    plain(front).await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    let (mut tunnel, _, _) = open_tunnel(front).await;
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1,
        "the pooled connection"
    );
    // The next plain request needs a connection of its own.
    plain(front).await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    tunnel.write_all(b"still here").await.unwrap();
    assert_eq!(
        read_exactly(&mut tunnel, Vec::new(), 10).await,
        b"still here"
    );
    plain(front).await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    assert_eq!(seen.plain.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tunnels_at_once_keep_to_their_own_bytes() {
    let mut addrs = Vec::new();
    let mut seens = Vec::new();
    for name in ["b1", "b2", "b3"] {
        let (addr, seen) = backend(name, Mode::Echo).await;
        addrs.push(addr);
        seens.push(seen);
    }
    let front = proxy(&addrs).await;
    let clients = (0..30).map(|client| {
        tokio::spawn(async move {
            let (mut stream, _, name) = open_tunnel(front).await;
            for round in 0..10 {
                let message = format!("client {client} round {round};");
                stream.write_all(message.as_bytes()).await.unwrap();
                let echoed = read_exactly(&mut stream, Vec::new(), message.len()).await;
                assert_eq!(echoed, message.as_bytes());
            }
            name
        })
    });
    let mut names = Vec::new();
    for client in clients {
        names.push(client.await.unwrap());
    }
    for (name, seen) in ["b1", "b2", "b3"].into_iter().zip(&seens) {
        let n = names.iter().filter(|n| *n == name).count();
        assert_eq!(n, 10, "round robin spreads tunnels: {names:?}");
        assert_eq!(seen.upgrade_heads.lock().len(), 10);
    }
}

#[tokio::test]
async fn a_backend_ending_a_tunnel_ends_the_client_side() {
    let (b1, seen) = backend("b1", Mode::Echo).await;
    let front = proxy(&[b1]).await;
    let (mut stream, _, _) = open_tunnel(front).await;
    stream.write_all(b"die").await.unwrap();
    let rest = read_to_close(&mut stream, "the client side was never closed").await;
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(seen.closed.load(Ordering::SeqCst), 1);
}

/// A client that goes on writing after the backend closed its side does
/// not keep a tunnel to nowhere open: its writes fail once the proxy finds
/// the backend gone, instead of being dropped in silence.
#[tokio::test]
async fn a_client_writing_to_a_backend_that_closed_is_cut_off() {
    let (b1, seen) = backend("b1", Mode::Echo).await;
    let front = proxy(&[b1]).await;
    let (mut stream, _, _) = open_tunnel(front).await;
    stream.write_all(b"die").await.unwrap();
    read_to_close(&mut stream, "the client side was never closed").await;
    assert_eq!(seen.closed.load(Ordering::SeqCst), 1);
    support::wait::bounded_real("a write of the client fails", async {
        while stream.write_all(b"more").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_client_going_away_ends_the_backend_side() {
    let (b1, seen) = backend("b1", Mode::Echo).await;
    let front = proxy(&[b1]).await;
    let (stream, _, _) = open_tunnel(front).await;
    drop(stream);
    eventually("the backend saw the client go", || {
        seen.closed.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn without_a_hyper_connection_to_hand_over_the_request_goes_as_a_plain_one() {
    // Called directly, as an in-process caller would: nothing can switch
    // protocols on the client's side, so nothing asks the backend to.
    let (b1, seen) = backend("b1", Mode::Echo).await;
    let client = HttpClient::<Empty<Bytes>>::new();
    let backend = HttpBackend::new(&client, format!("http://{b1}")).unwrap();
    let req = Request::builder()
        .uri("/chat")
        .header("upgrade", "echo")
        .header("connection", "upgrade")
        .body(Empty::new())
        .unwrap();
    let resp = backend.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "b1 plain");
    assert_eq!(seen.upgrade_heads.lock().len(), 0);
}

/// A raw backend that answers an upgrade with a `101` carrying framing
/// headers (which RFC 9112 forbids on a 1xx) and its first bytes in the
/// same write, then echoes what it reads.
async fn framing_switcher() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = read_head(&mut stream).await;
                stream
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n\
                          Connection: upgrade\r\nTransfer-Encoding: identity\r\n\
                          Content-Length: 7\r\n\r\nraw\n",
                    )
                    .await
                    .unwrap();
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// A `101` is the backend's answer, framing headers and all: its bytes
/// sent with the head come first, the tunnel reaches it, and the request
/// is not failed over to a second backend (whose switch would take the
/// client's connection too).
#[tokio::test]
async fn a_switch_with_framing_headers_is_the_tunnel_not_a_failure() {
    let raw = framing_switcher().await;
    let (b2, seen) = backend("b2", Mode::Echo).await;
    let front = proxy(&[raw, b2]).await;
    let mut stream = send_raw(front, UPGRADE.as_bytes()).await;
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert_eq!(read_exactly(&mut stream, rest, 4).await, b"raw\n");
    stream.write_all(b"ping").await.unwrap();
    assert_eq!(read_exactly(&mut stream, Vec::new(), 4).await, b"ping");
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        0,
        "not failed over"
    );
}

/// A classifier that counts every non-2xx as a failure does not fail a
/// `101` over: the first backend to switch keeps the client.
#[tokio::test]
async fn a_switch_is_final_whatever_the_classifier_says() {
    let (b1, seen1) = backend("b1", Mode::Echo).await;
    let (b2, seen2) = backend("b2", Mode::Echo).await;
    let pool = Pool::new();
    let client = HttpClient::<Body>::new();
    for (name, addr) in [("b1", b1), ("b2", b2)] {
        pool.insert(
            name,
            HttpBackend::new(&client, format!("http://{addr}")).unwrap(),
        );
    }
    let strict = |outcome: &tower_ha::classify::Outcome<'_>| match outcome {
        tower_ha::classify::Outcome::Response { status, .. } => !status.is_success(),
        _ => true,
    };
    let stack = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(FailoverLayer::new().classifier(strict))
        .service(Balance::new(pool, RoundRobin::new()));
    let front = serve_stack(stack, true).await;
    let mut stream = send_raw(front, UPGRADE.as_bytes()).await;
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert_eq!(read_exactly(&mut stream, rest, 3).await, b"b1\n");
    stream.write_all(b"ping").await.unwrap();
    assert_eq!(read_exactly(&mut stream, Vec::new(), 4).await, b"ping");
    assert_eq!(seen1.upgrade_heads.lock().len(), 1);
    assert_eq!(
        seen2.connections.load(Ordering::SeqCst),
        0,
        "not failed over"
    );
}

/// Nor does passive health count a `101` as a failure under such a
/// classifier: a backend that switches is doing its job.
#[tokio::test]
async fn a_switch_is_no_failure_to_passive_health() {
    let client = HttpClient::<Body>::new();
    let strict = |outcome: &tower_ha::classify::Outcome<'_>| match outcome {
        tower_ha::classify::Outcome::Response { status, .. } => !status.is_success(),
        _ => true,
    };
    let health = HealthLayer::new()
        .classifier(strict)
        .consecutive_failures(1)
        .max_ejection_percent(100);
    // One front over a backend that switches, one over a backend that
    // declines with a 426, each watched by the same health layer.
    let mut fronts = Vec::new();
    for (name, mode) in [("switches", Mode::Echo), ("declines", Mode::Decline)] {
        let (addr, _seen) = backend(name, mode).await;
        let pool = Pool::new();
        let backend = HttpBackend::new(&client, format!("http://{addr}")).unwrap();
        pool.insert(name, health.layer(backend));
        let state = pool.state(&name.into()).unwrap();
        let stack = ServiceBuilder::new()
            .layer(BufferBodyLayer::new())
            .service(Balance::new(pool, RoundRobin::new()).panic_threshold(0.0));
        fronts.push((serve_stack(stack, true).await, state));
    }
    let (switches, switched) = &fronts[0];
    let mut stream = send_raw(*switches, UPGRADE.as_bytes()).await;
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert_eq!(read_exactly(&mut stream, rest, 9).await, b"switches\n");
    assert_eq!(switched.consecutive_failures(), 0);
    assert!(!switched.is_ejected());
    // The classifier is in force: the 426 counts against its backend.
    let (declines, declined) = &fronts[1];
    let mut stream = send_raw(*declines, UPGRADE.as_bytes()).await;
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 426 "), "{head}");
    assert!(declined.is_ejected());
}

/// An upgrade request with a body goes on as a plain request: an upload
/// still going when the backend switched would hold the switch open.
#[tokio::test]
async fn an_upgrade_request_with_a_body_goes_as_a_plain_one() {
    let (b1, seen) = backend("b1", Mode::Echo).await;
    let front = proxy(&[b1]).await;
    let with_length = UPGRADE.replace("\r\n\r\n", "\r\nContent-Length: 5\r\n\r\nhello");
    let chunked = UPGRADE.replace(
        "\r\n\r\n",
        "\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    for request in [with_length, chunked] {
        let mut stream = send_raw(front, request.as_bytes()).await;
        expect_plain_answer(&mut stream, "b1").await;
        still_http(&mut stream, "b1").await;
    }
    assert_eq!(seen.upgrade_heads.lock().len(), 0);
    assert_eq!(seen.plain.load(Ordering::SeqCst), 4);
    // An empty body is no body: the switch goes ahead.
    let empty = UPGRADE.replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n");
    let mut stream = send_raw(front, empty.as_bytes()).await;
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 101 "), "{head}");
}

#[tokio::test]
async fn connect_is_refused_without_reaching_a_backend() {
    let (b1, seen) = backend("b1", Mode::Echo).await;
    let front = proxy(&[b1]).await;
    let mut stream = send_raw(
        front,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 400 "), "{head}");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 0);
}

#[cfg(feature = "http2")]
#[tokio::test]
async fn an_http2_client_sends_an_upgrade_request_as_a_plain_one() {
    // HTTP/2 has no `Upgrade`: the backend gets the request without it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h2 = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service_fn(|req: Request<Incoming>| async move {
                let upgrade = req.headers().contains_key("upgrade");
                let body = format!("{:?} upgrade={upgrade}", req.version());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    let front = proxy_with(HttpClient::new().http2_only(true), &[h2]).await;
    let mut stream = send_raw(front, UPGRADE.as_bytes()).await;
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    let body = read_exactly(&mut stream, rest, 22).await;
    assert_eq!(body, b"HTTP/2.0 upgrade=false");
}

#[tokio::test]
async fn a_switch_to_http2_is_not_asked_of_the_backend() {
    // Switched, the connection would carry HTTP/2 requests the proxy never
    // sees: the request goes on as plain HTTP/1.1 and the client's
    // connection stays HTTP/1.1.
    let (b1, seen) = backend("b1", Mode::Echo).await;
    let front = proxy(&[b1]).await;
    let mut stream = send_raw(
        front,
        b"GET / HTTP/1.1\r\nHost: front\r\nConnection: Upgrade, HTTP2-Settings\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    expect_plain_answer(&mut stream, "b1").await;
    still_http(&mut stream, "b1").await;
    assert_eq!(seen.upgrade_heads.lock().len(), 0);
    assert_eq!(seen.plain.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_switch_the_request_did_not_offer_is_a_bad_gateway() {
    for mode in [Mode::Unnamed, Mode::Unoffered] {
        let (b1, seen) = backend("b1", mode).await;
        let front = proxy(&[b1]).await;
        let mut stream = send_raw(front, UPGRADE.as_bytes()).await;
        let (head, _) = read_head(&mut stream).await;
        assert!(head.starts_with("http/1.1 502 "), "{head}");
        assert_eq!(seen.upgrade_heads.lock().len(), 1);
    }
}

#[tokio::test]
async fn an_open_tunnel_counts_as_in_flight_on_its_backend() {
    use tower_ha::balance::LeastRequest;
    let (b1, _) = backend("b1", Mode::Echo).await;
    let (b2, _) = backend("b2", Mode::Echo).await;
    let client = HttpClient::<Body>::new();
    let pool = Pool::new();
    for (id, addr) in [("b1", b1), ("b2", b2)] {
        pool.insert(
            id,
            HttpBackend::new(&client, format!("http://{addr}")).unwrap(),
        );
    }
    let in_flight = |id: &str| pool.state(&id.into()).unwrap().in_flight();
    let stack = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(FailoverLayer::new())
        // As many choices as it takes to see both backends every time.
        .service(Balance::new(pool.clone(), LeastRequest::new().choices(64)));
    let front = serve_stack(stack, true).await;
    // Least request sends each new tunnel to the backend with fewer open.
    let (first, _, on) = open_tunnel(front).await;
    assert_eq!(in_flight(&on), 1, "the open tunnel counts");
    let other = if on == "b1" { "b2" } else { "b1" };
    assert_eq!(in_flight(other), 0);
    let (second, _, next) = open_tunnel(front).await;
    assert_eq!(next, other, "the backend without a tunnel gets the next");
    assert_eq!((in_flight("b1"), in_flight("b2")), (1, 1));
    // A tunnel that ends is no longer counted.
    drop(first);
    eventually("the closed tunnel is not counted", || in_flight(&on) == 0).await;
    assert_eq!(in_flight(other), 1);
    drop(second);
    eventually("no tunnel is counted", || in_flight(other) == 0).await;
}

/// A client whose tunnels close after 1 s without traffic.
fn quiet_client() -> HttpClient<Body> {
    HttpClient::new().tunnel_idle_timeout(Some(Duration::from_secs(1)))
}

/// Waits until the backend `b1` of `pool` has seen its tunnel's side
/// closed and the tunnel no longer counts as in flight.
async fn let_go(seen: &Seen, pool: &Pool<HttpBackend<Body>>) {
    eventually("the backend's side was closed", || {
        seen.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually("the tunnel is no longer in flight", || {
        pool.state(&"b1".into()).unwrap().in_flight() == 0
    })
    .await;
}

/// `BackendState::close_tunnels` closes both sides of the tunnels open to
/// the backend, not those opened after.
#[tokio::test]
async fn closing_a_backends_tunnels_closes_both_sides() {
    let (b1, seen) = backend("b1", Mode::Echo).await;
    let (pool, stack) = stack(HttpClient::new(), &[b1]);
    let front = serve_stack(stack, true).await;
    let (mut stream, _, _) = open_tunnel(front).await;
    stream.write_all(b"hello").await.unwrap();
    assert_eq!(read_exactly(&mut stream, Vec::new(), 5).await, b"hello");
    pool.state(&"b1".into()).unwrap().close_tunnels();
    let rest = read_to_close(&mut stream, "the tunnel was never closed").await;
    assert!(rest.is_empty(), "{rest:?}");
    let_go(&seen, &pool).await;

    let (mut next, _, _) = open_tunnel(front).await;
    next.write_all(b"again").await.unwrap();
    assert_eq!(read_exactly(&mut next, Vec::new(), 5).await, b"again");
}

/// A backend the probes mark down keeps its tunnels open by default; with
/// `close_tunnels_when_down` the checker closes both sides of them.
#[tokio::test]
async fn a_checker_closes_the_tunnels_of_a_backend_it_marks_down_when_told() {
    use std::sync::atomic::AtomicBool;
    use tower_ha::health::{probe_fn, HealthChecker};
    use tower_ha::HealthStatus;

    for close in [false, true] {
        let (b1, seen) = backend("b1", Mode::Echo).await;
        let (pool, stack) = stack(HttpClient::new(), &[b1]);
        let front = serve_stack(stack, true).await;
        let up = Arc::new(AtomicBool::new(true));
        let probe_up = up.clone();
        let probe = probe_fn(move |_: &_, _: &_| {
            let up = probe_up.load(Ordering::SeqCst);
            async move {
                if up {
                    Ok(())
                } else {
                    Err(BoxError::from("down"))
                }
            }
        });
        let checker = HealthChecker::new(pool.clone(), probe)
            .interval(Duration::from_millis(20))
            .fall(1)
            .close_tunnels_when_down(close)
            .spawn();
        let (mut stream, _, _) = open_tunnel(front).await;
        stream.write_all(b"hello").await.unwrap();
        assert_eq!(read_exactly(&mut stream, Vec::new(), 5).await, b"hello");

        up.store(false, Ordering::SeqCst);
        let state = pool.state(&"b1".into()).unwrap();
        eventually("the backend was marked down", || {
            state.health() == HealthStatus::Unhealthy
        })
        .await;
        if close {
            let rest = read_to_close(&mut stream, "the tunnel was never closed").await;
            assert!(rest.is_empty(), "{rest:?}");
            let_go(&seen, &pool).await;
        } else {
            // Still open both ways, and still counted on its backend.
            stream.write_all(b"still").await.unwrap();
            assert_eq!(read_exactly(&mut stream, Vec::new(), 5).await, b"still");
            assert_eq!(seen.closed.load(Ordering::SeqCst), 0);
            assert_eq!(state.in_flight(), 1);
        }
        checker.shutdown().await;
    }
}

#[tokio::test]
async fn a_quiet_tunnel_is_closed_after_the_idle_timeout() {
    let (b1, seen) = backend("b1", Mode::Echo).await;
    let (pool, stack) = stack(quiet_client(), &[b1]);
    let front = serve_stack(stack, true).await;
    let (mut stream, _, _) = open_tunnel(front).await;
    stream.write_all(b"hello").await.unwrap();
    assert_eq!(read_exactly(&mut stream, Vec::new(), 5).await, b"hello");
    assert_eq!(pool.state(&"b1".into()).unwrap().in_flight(), 1);
    // Then nothing: the proxy closes both sides.
    let rest = read_to_close(&mut stream, "the quiet tunnel was never closed").await;
    assert!(rest.is_empty(), "{rest:?}");
    let_go(&seen, &pool).await;
}

#[tokio::test(start_paused = true)]
async fn a_switch_that_never_reaches_the_client_releases_the_backend() {
    let (b1, seen) = backend("b1", Mode::Echo).await;
    // No idle timeout to end the tunnel: it waits 10 s for the client's
    // side, so a backend let go sooner was let go because the failed
    // handover was noticed.
    let (pool, stack) = stack(HttpClient::new(), &[b1]);
    // A layer above answers something else than the backend's `101`, and
    // the client leaves. The front serves without upgrades, so hyper fails
    // the client side's handover as the connection ends. (With upgrades it
    // would hand over the closed connection instead, and the tunnel would
    // end on that.) This checks that the tunnel lets go of the backend,
    // not how long it would wait for a handover that never ends (the unit
    // tests of the tunnel do, in paused time).
    let stack = ServiceBuilder::new()
        .map_result(|result: Result<Response<_>, BoxError>| match result {
            Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                Err("answered by a layer above".into())
            }
            other => other,
        })
        .service(stack);
    let front = serve_stack(stack, false).await;
    // Before the request: the wait for the handover starts later.
    let sent = tokio::time::Instant::now();
    let mut stream = send_raw(front, UPGRADE.as_bytes()).await;
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 502 "), "{head}");
    assert_eq!(seen.upgrade_heads.lock().len(), 1, "the backend switched");
    drop(stream);
    // On paused time: the wait for the handover (10 s) would run out at
    // its exact instant, after this bound.
    tokio::time::timeout_at(sent + Duration::from_secs(9), let_go(&seen, &pool))
        .await
        .expect("the backend was held until the wait for the handover ran out");
}
