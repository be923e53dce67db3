//! Real HTTP backends on 127.0.0.1 (hyper 1) and a backend client service
//! (hyper-util's legacy client) for end-to-end tests.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tower::Service;
use tower_ha::{BoxError, NotSent};

/// A backend server answering every request with its name.
pub struct Server {
    name: &'static str,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// Starts backend `name` on `addr` (port 0 picks a free port).
    pub async fn start(name: &'static str, addr: SocketAddr) -> Server {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Dropped with this task when the server is killed: every open
            // connection is aborted too.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                connections.spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            name.as_bytes(),
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Server { name, addr, task }
    }

    /// Starts backend `name` on a free port.
    pub async fn start_any(name: &'static str) -> Server {
        Server::start(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The backend's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Stops it: closes the listener and every connection.
    pub async fn kill(self) -> SocketAddr {
        self.task.abort();
        let _ = self.task.await;
        self.addr
    }
}

/// A backend service: sends the request to one server and answers its
/// body as a string. Connection failures are marked [`NotSent`].
#[derive(Clone)]
pub struct HttpBackend {
    client: Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
}

impl HttpBackend {
    /// A client of the server at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        HttpBackend {
            client: Client::builder(TokioExecutor::new()).build_http(),
            addr,
        }
    }
}

impl Service<Request<()>> for HttpBackend {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<String>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        let client = self.client.clone();
        let addr = self.addr;
        Box::pin(async move {
            let (mut parts, ()) = req.into_parts();
            let path = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            parts.uri = Uri::try_from(format!("http://{addr}{path}"))?;
            parts.extensions = http::Extensions::new();
            let res = client
                .request(Request::from_parts(parts, Empty::new()))
                .await
                .map_err(|e| -> BoxError {
                    if e.is_connect() {
                        NotSent::new(e).into()
                    } else {
                        e.into()
                    }
                })?;
            let (parts, body) = res.into_parts();
            let bytes = body.collect().await?.to_bytes();
            Ok(Response::from_parts(
                parts,
                String::from_utf8_lossy(&bytes).into_owned(),
            ))
        })
    }
}
