//! A backend HTTP server for chaos tests (hyper 1 on 127.0.0.1): answers
//! every request with its name, can hold requests in flight on demand, and
//! can be killed (listener and every open connection closed) and restarted
//! on the same port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

#[derive(Default)]
struct Shared {
    /// While set, requests are accepted and never answered.
    hold: AtomicBool,
    /// Requests answered since the last (re)start.
    served: AtomicUsize,
    /// Connections accepted since the last (re)start (TCP probes included).
    connections: AtomicUsize,
}

/// A killable backend server.
pub struct ChaosServer {
    name: &'static str,
    addr: SocketAddr,
    shared: Arc<Shared>,
    held: watch::Sender<usize>,
    task: Option<JoinHandle<()>>,
}

impl ChaosServer {
    /// Starts backend `name` on a free port of 127.0.0.1, which it gets
    /// back when it is restarted.
    pub async fn start(name: &'static str) -> ChaosServer {
        let mut server = ChaosServer {
            name,
            addr: super::restartable_addr(),
            shared: Arc::default(),
            held: watch::channel(0).0,
            task: None,
        };
        server.listen();
        server
    }

    fn listen(&mut self) {
        let socket = TcpSocket::new_v4().unwrap();
        // Connections of the killed server may still be in TIME_WAIT.
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).expect("bind the backend's port");
        let listener = socket.listen(1024).unwrap();
        self.addr = listener.local_addr().unwrap();
        self.shared.hold.store(false, Ordering::SeqCst);
        self.shared.served.store(0, Ordering::SeqCst);
        self.shared.connections.store(0, Ordering::SeqCst);
        self.held.send_replace(0);
        let (name, shared, held) = (self.name, self.shared.clone(), self.held.clone());
        self.task = Some(tokio::spawn(accept(listener, name, shared, held)));
    }

    /// The backend's name, which is also its answer.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The address it listens on (the same after a restart).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, requests are received and held without an answer.
    pub fn hold_requests(&self) {
        self.shared.hold.store(true, Ordering::SeqCst);
    }

    /// Waits until `n` requests are held.
    pub async fn wait_held(&self, n: usize) {
        let mut held = self.held.subscribe();
        held.wait_for(|&held| held >= n)
            .await
            .expect("the server keeps its sender");
    }

    /// Requests held now.
    pub fn held(&self) -> usize {
        *self.held.borrow()
    }

    /// Requests answered since the server last started.
    pub fn served(&self) -> usize {
        self.shared.served.load(Ordering::SeqCst)
    }

    /// Connections accepted since the server last started, health probes
    /// included.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Closes the listener and every open connection (held requests get no
    /// answer: their connections are dropped).
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Starts it again on the same port, answering again.
    pub async fn restart(&mut self) {
        assert!(self.task.is_none(), "restart after kill");
        self.listen();
    }
}

impl Drop for ChaosServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn accept(
    listener: TcpListener,
    name: &'static str,
    shared: Arc<Shared>,
    held: watch::Sender<usize>,
) {
    // Owned by this task: aborting it drops every connection.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let (shared, held) = (shared.clone(), held.clone());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let (shared, held) = (shared.clone(), held.clone());
                async move {
                    if shared.hold.load(Ordering::SeqCst) {
                        held.send_modify(|n| *n += 1);
                        std::future::pending::<()>().await;
                    }
                    shared.served.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        name.as_bytes(),
                    ))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}
