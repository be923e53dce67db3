//! What the benches share: an always-ready backend, a driver that polls a
//! service as a runtime would (with a no-op waker, so no runtime cost is
//! measured), and a timing loop that builds requests beforehand and keeps
//! responses until the clock stops, so that only the services' work is
//! timed, alike for every contender.
#![allow(dead_code)] // each bench uses a part
// Wall-clock time is what a benchmark measures.
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::measurement::WallTime;
use criterion::BenchmarkGroup;
use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use serde_json::json;
use tokio::runtime::Runtime;
use tower::Service;
use tower_ha::store::{Session, SessionStore};

/// An always-ready backend that answers without allocating. It hands the
/// request back in the response, so that tearing down the request and the
/// response happens outside the timed section.
#[derive(Clone)]
pub struct Backend;

impl Service<Request<()>> for Backend {
    type Response = Response<Request<()>>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Request<()>>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        ready(Ok(Response::new(req)))
    }
}

/// A pool of `n` [`Backend`]s named `backend-0`, `backend-1`, ...
pub fn pool(n: usize) -> tower_ha::Pool<Backend> {
    pool_of(n, Backend)
}

/// [`pool`], of clones of `backend`.
pub fn pool_of<S: Clone>(n: usize, backend: S) -> tower_ha::Pool<S> {
    (0..n)
        .map(|i| (format!("backend-{i}"), backend.clone()))
        .collect()
}

/// The anchor: tower's `p2c::Balance` over always-ready `S` backends (each
/// with a constant load, so that it measures the balancer, not a load
/// metric), for requests `R`.
pub type P2c<S = Backend, R = Request<()>> = tower::balance::p2c::Balance<
    tower::discover::ServiceList<Vec<tower::load::Constant<S, usize>>>,
    R,
>;

/// [`P2c`] over `n` clones of `backend`.
pub fn p2c<S, R>(n: usize, backend: S) -> P2c<S, R>
where
    S: Service<R> + Clone,
    S::Error: Into<tower::BoxError>,
{
    let services: Vec<_> = (0..n)
        .map(|_| tower::load::Constant::new(backend.clone(), 0))
        .collect();
    tower::balance::p2c::Balance::new(tower::discover::ServiceList::new(services))
}

/// A request as hyper's HTTP/1 server hands it over, from the text of its
/// head (`"GET /path HTTP/1.1\r\nname: value\r\n..."`): the URI and every
/// header value are slices of one shared read buffer, so cloning one bumps
/// a reference count, and header names are parsed from bytes (standard
/// names are constants, others own a copy). Layers that copy a request for
/// a retry pay here what they pay behind a real server.
pub fn parsed(head: &str) -> Request<()> {
    let mut buffer = BytesMut::from(head.as_bytes());
    // Splitting a read buffer makes it shared, as in hyper.
    let head: Bytes = buffer.split_to(buffer.len()).freeze();
    let slice = |part: &str| {
        let start = part.as_ptr() as usize - head.as_ptr() as usize;
        head.slice(start..start + part.len())
    };
    let text = std::str::from_utf8(&head).expect("a UTF-8 head");
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let mut start = lines.next().expect("a request line").split(' ');
    let method = Method::from_bytes(start.next().expect("a method").as_bytes()).expect("method");
    let uri = Uri::from_maybe_shared(slice(start.next().expect("a target"))).expect("target");
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .expect("request");
    for line in lines {
        let (name, value) = line.split_once(':').expect("name: value");
        let name = HeaderName::from_bytes(name.as_bytes()).expect("header name");
        let value = HeaderValue::from_maybe_shared(slice(value.trim())).expect("header value");
        req.headers_mut().append(name, value);
    }
    req
}

/// Readies `svc`, calls it, and polls the response once (every backend
/// answers at once).
pub fn drive<S, R>(svc: &mut S, req: R, cx: &mut Context<'_>) -> S::Response
where
    S: Service<R>,
    S::Error: std::fmt::Debug,
{
    loop {
        match svc.poll_ready(cx) {
            Poll::Ready(Ok(())) => break,
            Poll::Ready(Err(e)) => panic!("{e:?}"),
            Poll::Pending => {}
        }
    }
    let mut fut = std::pin::pin!(svc.call(req));
    match fut.as_mut().poll(cx) {
        Poll::Ready(Ok(resp)) => resp,
        Poll::Ready(Err(e)) => panic!("{e:?}"),
        Poll::Pending => panic!("an always-ready backend answers at once"),
    }
}

/// The measured loop: `requests` through `svc`, responses kept. Not
/// inlined, so that callgrind can count it alone
/// (`--toggle-collect='*profiled*'`).
#[inline(never)]
pub fn profiled<S>(svc: &mut S, requests: Vec<Request<()>>, responses: &mut Vec<S::Response>)
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    for req in requests {
        responses.push(drive(svc, req, &mut cx));
    }
}

/// Times `iters` requests through `svc`, in chunks of `chunk` requests
/// built by `make` (given the request's number) before the clock starts.
pub fn time_requests<S>(
    svc: &mut S,
    iters: u64,
    chunk: u64,
    mut make: impl FnMut(u64) -> Request<()>,
) -> Duration
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let batch = chunk.min(iters - done);
        let requests: Vec<_> = (done..done + batch).map(&mut make).collect();
        let mut responses = Vec::with_capacity(batch as usize);
        let start = Instant::now();
        profiled(svc, requests, &mut responses);
        elapsed += start.elapsed();
        black_box(&responses);
        done += batch;
    }
    elapsed
}

/// How many sessions the store benches keep.
pub const SESSIONS: usize = 100;

/// `SESSIONS` sessions of about 200 bytes of JSON each, as a notebook
/// gateway would store them.
pub fn sessions() -> Vec<Session> {
    (0..SESSIONS)
        .map(|i| {
            Session::new(format!("kernel-{i:03}"), format!("node-{}", i % 3).into()).with_data(
                json!({"kernel": {"id": i, "ports": [52000, 52001, 52002, 52003, 52004]},
                        "owner": "alice", "launched_with": ["--profile", "default"]}),
            )
        })
        .collect()
}

/// A runtime with two workers, as the machine has two cores.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Benches `save` (rewriting one of `all`, in turn) and `load` (reading
/// one) on `store`, one call at a time.
pub fn save_and_load<S: SessionStore + ?Sized>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    store: &S,
    all: &[Session],
) {
    let mut i = 0usize;
    group.bench_function("save", |b| {
        b.iter(|| {
            i = (i + 1) % all.len();
            rt.block_on(store.save(&all[i])).expect("save");
        })
    });
    group.bench_function("load", |b| {
        b.iter(|| {
            i = (i + 1) % all.len();
            black_box(rt.block_on(store.load(&all[i].key)).expect("load"));
        })
    });
}
