//! Real HTTP backends on 127.0.0.1 and a client service that reaches them.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::Service;
use tower_ha::{BoxError, NotSent};

/// What a test server saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Requests received.
    pub requests: AtomicUsize,
    /// Request body bytes read, over all requests.
    pub body_bytes: AtomicUsize,
}

impl Seen {
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn body_bytes(&self) -> usize {
        self.body_bytes.load(Ordering::SeqCst)
    }
}

/// A server that reads each request's whole body, then answers `status`
/// with `name` as its body.
pub async fn serve(name: &'static str, status: StatusCode) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let server_seen = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            server_seen.connections.fetch_add(1, Ordering::SeqCst);
            let seen = server_seen.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    seen.requests.fetch_add(1, Ordering::SeqCst);
                    let body = req.into_body().collect().await?.to_bytes();
                    seen.body_bytes.fetch_add(body.len(), Ordering::SeqCst);
                    let mut response =
                        Response::new(Full::new(Bytes::from_static(name.as_bytes())));
                    *response.status_mut() = status;
                    Ok::<_, hyper::Error>(response)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A server that accepts connections and never answers (nor closes them).
pub async fn hanging() -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let server_seen = seen.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            server_seen.connections.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (addr, seen)
}

/// A server that reads whatever comes on each connection and never
/// answers. When the client closes a connection (a read returns 0 or
/// fails), the number of bytes that came on it is sent on the returned
/// channel.
pub async fn silent() -> (SocketAddr, Arc<Seen>, mpsc::UnboundedReceiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let server_seen = seen.clone();
    let (closed_tx, closed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            server_seen.connections.fetch_add(1, Ordering::SeqCst);
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let mut received = 0;
                while let Ok(read @ 1..) = stream.read(&mut buf).await {
                    received += read;
                }
                let _ = closed.send(received);
            });
        }
    });
    (addr, seen, closed)
}

/// A server that reads each request (its head, and a body of
/// `Content-Length` bytes), then answers `status` announcing 64 bytes of
/// body, sends 2 and closes the connection: an answer cut off.
pub async fn cut_answers(status: StatusCode) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let server_seen = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            server_seen.connections.fetch_add(1, Ordering::SeqCst);
            let seen = server_seen.clone();
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buf = [0u8; 4096];
                let mut fill = async |read: &mut Vec<u8>| match stream.read(&mut buf).await {
                    Ok(n @ 1..) => {
                        read.extend_from_slice(&buf[..n]);
                        true
                    }
                    _ => false,
                };
                let head_end = loop {
                    if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end + 4;
                    }
                    if !fill(&mut read).await {
                        return;
                    }
                };
                let head = String::from_utf8_lossy(&read[..head_end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(0, |value| value.trim().parse().unwrap());
                while read.len() < head_end + length {
                    if !fill(&mut read).await {
                        return;
                    }
                }
                seen.requests.fetch_add(1, Ordering::SeqCst);
                seen.body_bytes.fetch_add(length, Ordering::SeqCst);
                let cut = format!("HTTP/1.1 {status}\r\ncontent-length: 64\r\n\r\n{{\"");
                let _ = stream.write_all(cut.as_bytes()).await;
            });
        }
    });
    (addr, seen)
}

/// An address where nothing listens: connecting is refused.
pub async fn refused() -> SocketAddr {
    // Bound but not listening: connecting is refused, and no other socket
    // of the test run (a server, a client's ephemeral port) can take the
    // port, as it could if it were released. The socket is kept until the
    // test process ends.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    addr
}

/// A backend service: sends each request to `addr` with a hyper client, and
/// marks connection errors as [`NotSent`].
pub struct HttpBackend<B> {
    client: Client<HttpConnector, B>,
    addr: SocketAddr,
}

impl<B> Clone for HttpBackend<B> {
    fn clone(&self) -> Self {
        HttpBackend {
            client: self.client.clone(),
            addr: self.addr,
        }
    }
}

impl<B> HttpBackend<B>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub fn new(addr: SocketAddr) -> Self {
        let client = Client::builder(TokioExecutor::new()).build_http();
        HttpBackend { client, addr }
    }
}

impl<B> Service<Request<B>> for HttpBackend<B>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(self.addr.to_string())
            .path_and_query(path)
            .build()
            .expect("valid uri");
        let response = self.client.request(req);
        Box::pin(async move {
            response.await.map_err(|e| {
                if e.is_connect() {
                    NotSent::new(e).into()
                } else {
                    e.into()
                }
            })
        })
    }
}

/// The body of a response, as a string.
pub async fn text(response: Response<Incoming>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// An infallible body type that is not `Clone`.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The end of a client connection driven by a task of its own.
pub type Connection = tokio::task::JoinHandle<Result<(), hyper::Error>>;

/// An HTTP/1 client of `addr`, its connection driven by a task of its own.
pub async fn http1_client<B>(
    addr: SocketAddr,
) -> (hyper::client::conn::http1::SendRequest<B>, Connection)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    (sender, tokio::spawn(connection))
}

/// An HTTP/2 client of `addr`, with prior knowledge, its connection driven
/// by a task of its own.
pub async fn h2_client<B>(
    addr: SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<B>, Connection)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    (sender, tokio::spawn(connection))
}
