//! Real HTTP backends on 127.0.0.1 for the health tests: hyper 1 servers
//! whose `/healthz` answer can be flipped and whose listener can be shut
//! down, and a client-side backend service that sends requests to one of
//! them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Default)]
struct Counters {
    healthz: AtomicU16,
    /// A header `/healthz` requires: without it, it answers 401.
    required: Mutex<Option<(HeaderName, HeaderValue)>>,
    hits: AtomicUsize,
    probes_ok: AtomicUsize,
    probes_failed: AtomicUsize,
}

/// A hyper server on 127.0.0.1: `/healthz` answers the configured status,
/// every other path answers 200 and counts a hit.
pub struct TestServer {
    addr: SocketAddr,
    counters: Arc<Counters>,
    /// The task that accepts connections.
    accept: Mutex<Option<JoinHandle<()>>>,
    /// A task per connection.
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TestServer {
    /// Starts a server on a port no other socket of the run takes, not
    /// even once the server is shut down (see [`super::restartable_addr`]):
    /// a probe of a server that is down must find nothing there.
    pub async fn start() -> TestServer {
        let listener = TcpListener::bind(super::restartable_addr()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        counters.healthz.store(200, Ordering::SeqCst);
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (counters, connections) = (counters.clone(), connections.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let counters = counters.clone();
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let c = counters.clone();
                        async move {
                            let status = if req.uri().path() == "/healthz" {
                                let refused =
                                    c.required.lock().as_ref().is_some_and(|(name, value)| {
                                        req.headers().get(name) != Some(value)
                                    });
                                let s = if refused {
                                    401
                                } else {
                                    c.healthz.load(Ordering::SeqCst)
                                };
                                if (200..300).contains(&s) {
                                    c.probes_ok.fetch_add(1, Ordering::SeqCst);
                                } else {
                                    c.probes_failed.fetch_add(1, Ordering::SeqCst);
                                }
                                StatusCode::from_u16(s).unwrap()
                            } else {
                                c.hits.fetch_add(1, Ordering::SeqCst);
                                StatusCode::OK
                            };
                            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *response.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let conn = tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                    connections.lock().push(conn);
                }
            })
        };
        TestServer {
            addr,
            counters,
            accept: Mutex::new(Some(accept)),
            connections,
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes `/healthz` answer `status`.
    pub fn set_healthz(&self, status: u16) {
        self.counters.healthz.store(status, Ordering::SeqCst);
    }

    /// Makes `/healthz` answer 401 to requests without this header.
    pub fn require_header(&self, name: HeaderName, value: HeaderValue) {
        *self.counters.required.lock() = Some((name, value));
    }

    /// Requests served outside `/healthz`.
    pub fn hits(&self) -> usize {
        self.counters.hits.load(Ordering::SeqCst)
    }

    /// `/healthz` requests answered with a 2xx.
    pub fn probes_ok(&self) -> usize {
        self.counters.probes_ok.load(Ordering::SeqCst)
    }

    /// `/healthz` requests answered with anything else.
    pub fn probes_failed(&self) -> usize {
        self.counters.probes_failed.load(Ordering::SeqCst)
    }

    /// Closes the listener and every open connection, and waits until
    /// their tasks (and sockets) are gone.
    pub async fn shutdown(&self) {
        // The listener first: no connection starts after the others end.
        let accept = self.accept.lock().take();
        if let Some(accept) = accept {
            accept.abort();
            let _ = accept.await;
        }
        let connections: Vec<_> = self.connections.lock().drain(..).collect();
        for conn in &connections {
            conn.abort();
        }
        for conn in connections {
            let _ = conn.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.lock().take() {
            accept.abort();
        }
        for conn in self.connections.lock().drain(..) {
            conn.abort();
        }
    }
}

/// The body of requests sent to [`HttpBackend`].
pub type ReqBody = Empty<Bytes>;

/// A backend service: sends each request to one server through a pooled
/// hyper client.
pub type HttpBackend = super::http::HttpBackend<ReqBody>;

/// Waits until `done` holds, checking every 5 ms, for at most 10 s (a bound
/// against hanging, not a timing claim).
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
