//! A scriptable backend and probe for the health tests, on paused time.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use parking_lot::Mutex;
use tokio::time::{sleep_until, Instant};
use tower::{Service, ServiceExt};
use tower_ha::extensions::Target;
use tower_ha::health::probe_fn;
use tower_ha::{BackendId, BackendState, Pool};

/// A backend answering with a status that the test sets, counting calls.
#[derive(Clone, Default)]
pub struct Backend {
    status: Arc<AtomicU16>,
    calls: Arc<AtomicUsize>,
}

impl Backend {
    pub fn new() -> Self {
        let b = Backend::default();
        b.set(StatusCode::OK);
        b
    }

    pub fn set(&self, status: StatusCode) {
        self.status.store(status.as_u16(), Ordering::SeqCst);
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<()>> for Backend {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(self.status.load(Ordering::SeqCst)).unwrap();
        ready(Ok(Response::builder().status(status).body(()).unwrap()))
    }
}

/// Sends one request to `svc` as `Balance` would: with a `Target`.
pub async fn send<S>(svc: &S, id: &str, state: &Arc<BackendState>) -> StatusCode
where
    S: Service<Request<()>, Response = Response<()>> + Clone,
    S::Error: std::fmt::Debug,
{
    let mut req = Request::new(());
    req.extensions_mut()
        .insert(Target::new(id.into(), state.clone()));
    svc.clone().oneshot(req).await.unwrap().status()
}

/// Lets spawned tasks run at the current (paused) instant.
pub async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Sleeps until `at` and lets every task due by then run.
pub async fn at(at: Instant) {
    sleep_until(at).await;
    settle().await;
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A probe that answers from a script per backend (true = pass), then
/// repeats the last answer, and counts probes.
#[derive(Clone, Default)]
pub struct Script {
    answers: Arc<Mutex<std::collections::HashMap<BackendId, VecDeque<bool>>>>,
    last: Arc<Mutex<std::collections::HashMap<BackendId, bool>>>,
    pub probes: Arc<AtomicUsize>,
}

impl Script {
    pub fn push(&self, id: &str, answers: &[bool]) {
        self.answers
            .lock()
            .entry(id.into())
            .or_default()
            .extend(answers);
    }

    pub fn set(&self, id: &str, pass: bool) {
        self.answers.lock().remove(&BackendId::from(id));
        self.last.lock().insert(id.into(), pass);
    }

    pub fn answer(&self, id: &BackendId) -> bool {
        self.probes.fetch_add(1, Ordering::SeqCst);
        let next = self
            .answers
            .lock()
            .get_mut(id)
            .and_then(VecDeque::pop_front);
        let mut last = self.last.lock();
        match next {
            Some(pass) => {
                last.insert(id.clone(), pass);
                pass
            }
            None => *last.get(id).unwrap_or(&true),
        }
    }

    pub fn probe<S>(&self) -> impl tower_ha::health::Probe<S> {
        let script = self.clone();
        probe_fn(move |id: &BackendId, _svc: &S| {
            let pass = script.answer(id);
            async move {
                if pass {
                    Ok(())
                } else {
                    Err("probe failed".into())
                }
            }
        })
    }
}

pub fn pool_of(ids: &[&str]) -> (Pool<Backend>, Vec<Backend>) {
    let pool = Pool::new();
    let backends: Vec<_> = ids.iter().map(|_| Backend::new()).collect();
    for (id, b) in ids.iter().zip(&backends) {
        pool.insert(*id, b.clone());
    }
    (pool, backends)
}
