//! Real HTTP backends on 127.0.0.1 (hyper 1) and a backend client service
//! (over `support::http::HttpBackend`) for end-to-end tests.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tower::Service;
use tower_ha::BoxError;

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
        Server::start(name, super::restartable_addr()).await
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

/// A backend service: sends the request to one server (without its
/// extensions) and answers its body as a string. Connection failures are
/// marked `NotSent`.
#[derive(Clone)]
pub struct HttpBackend(super::http::HttpBackend<Empty<Bytes>>);

impl HttpBackend {
    /// A client of the server at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        HttpBackend(super::http::HttpBackend::new(addr))
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
        let (mut parts, ()) = req.into_parts();
        parts.extensions = http::Extensions::new();
        let response = self.0.call(Request::from_parts(parts, Empty::new()));
        Box::pin(async move {
            let (parts, body) = response.await?.into_parts();
            let bytes = body.collect().await?.to_bytes();
            Ok(Response::from_parts(
                parts,
                String::from_utf8_lossy(&bytes).into_owned(),
            ))
        })
    }
}
