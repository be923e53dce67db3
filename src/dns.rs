//! DNS discovery: backends from the addresses a host name resolves to.
//!
//! [`DnsDiscover`] re-resolves a host name every interval (a Kubernetes
//! headless service, a round-robin DNS record, the `dns_backends` of LEBA's
//! failover groups) and
//! yields a [`Change::Insert`] for every address that appears and a
//! [`Change::Remove`] for every address that goes away. Feed it to
//! [`Pool::discover`](crate::Pool::discover). The backend id of an address
//! is the address itself (`10.0.0.7:5432`).
//!
//! Resolution goes through the [`Resolver`] trait: [`SystemResolver`] uses
//! the system's resolver ([`tokio::net::lookup_host`]); tests and custom
//! service registries provide their own.
//!
//! An answer's new addresses are inserted before the addresses it no
//! longer lists are removed, so a name that moves to another address never
//! leaves the pool empty in between. A failed resolution changes nothing
//! (a DNS outage does not empty the pool), nor does one that takes longer
//! than its [`timeout`](DnsDiscover::timeout); an answer with no address
//! removes every backend.
//!
//! Give it the pool it feeds with [`DnsDiscover::pool`], as below: each
//! answer then also puts back an address it still lists that has left the
//! pool, removed by [`HealthChecker::removed_after`] or
//! [`Handle::remove_backend`] (a pod restarted on the same IP, say), as
//! Envoy's `STRICT_DNS` clusters take their hosts from every answer.
//! Without it, the stream only knows its own previous answer and never
//! inserts such an address again while DNS keeps listing it. To keep a
//! listed address out of rotation, disable it
//! ([`Handle::disable`]) rather than remove it.
//!
//! [`HealthChecker::removed_after`]: crate::health::HealthChecker::removed_after
//! [`Handle::remove_backend`]: crate::control::Handle::remove_backend
//! [`Handle::disable`]: crate::control::Handle::disable
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! use std::net::SocketAddr;
//! use std::time::Duration;
//! use tower_ha::dns::{DnsDiscover, Resolver, ResolveFuture};
//! use tower_ha::Pool;
//!
//! /// Always answers two addresses.
//! struct Fixed;
//! impl Resolver for Fixed {
//!     fn resolve(&self, _host: &str, port: u16) -> ResolveFuture {
//!         Box::pin(async move {
//!             Ok(vec![
//!                 SocketAddr::from(([10, 0, 0, 1], port)),
//!                 SocketAddr::from(([10, 0, 0, 2], port)),
//!             ])
//!         })
//!     }
//! }
//!
//! let pool: Pool<SocketAddr> = Pool::new();
//! let discover = DnsDiscover::new(Fixed, "db.default.svc", 5432, |addr| addr)
//!     .interval(Duration::from_secs(5))
//!     .pool(&pool);
//! tokio::spawn({
//!     let pool = pool.clone();
//!     async move { pool.discover(discover).await }
//! });
//! tokio::time::sleep(Duration::from_millis(1)).await;
//! assert_eq!(pool.ids(), ["10.0.0.1:5432".into(), "10.0.0.2:5432".into()]);
//! # }
//! ```

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::time::{Sleep, Timeout};
use tower::discover::Change;

use crate::backend::BackendId;
use crate::control::{Event, Events};
use crate::pool::Pool;

/// How long a resolution may take by default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer of a [`Resolver`].
pub type ResolveFuture = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// Resolves a host name and port to socket addresses.
pub trait Resolver: Send + Sync + 'static {
    /// The addresses `host` resolves to, with `port`.
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture;
}

/// The system's resolver, through [`tokio::net::lookup_host`].
///
/// The system's resolver reports a name that does not exist, or has no
/// address, as an error, never as an empty answer: with it, a name that
/// disappears (a Kubernetes service deleted or scaled to zero) keeps the
/// last addresses in the pool, as any failed lookup does. A [`Resolver`]
/// of your own decides which answers mean "no backends".
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture {
        let target = format!("{host}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
    }
}

enum Step {
    /// Not polled yet: the first resolution starts on the first poll, with
    /// the settings as built.
    Start,
    Resolving(Pin<Box<Timeout<ResolveFuture>>>),
    Waiting(Pin<Box<Sleep>>),
}

type Make<S> = Box<dyn FnMut(SocketAddr) -> S + Send>;

/// Whether the pool the stream feeds holds a backend.
type InPool = Box<dyn Fn(&BackendId) -> bool + Send>;

/// A [`Discover`](tower::discover::Discover) stream of the addresses a
/// host name resolves to; see the [module docs](self).
///
/// It never ends and never fails: run it with
/// [`Pool::discover`](crate::Pool::discover) in a task, and abort the task
/// to stop it.
#[must_use = "streams do nothing unless polled"]
pub struct DnsDiscover<S> {
    resolver: Arc<dyn Resolver>,
    host: Arc<str>,
    port: u16,
    interval: Duration,
    timeout: Duration,
    make: Make<S>,
    known: BTreeSet<SocketAddr>,
    /// The changes not yet yielded, each with its event.
    pending: VecDeque<(Change<BackendId, S>, Option<Event>)>,
    /// The events of the changes yielded since the stream last had none
    /// ready: emitted when it is polled again after that, once the pool
    /// has made them.
    yielded: Vec<Event>,
    /// Whether it yielded a change when last polled: its taker may not
    /// have made it yet. (Otherwise it had none ready, or was not polled.)
    taken: bool,
    step: Step,
    events: Option<Events>,
    in_pool: Option<InPool>,
}

impl<S> fmt::Debug for DnsDiscover<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsDiscover")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("known", &self.known)
            .field("pool", &self.in_pool.is_some())
            .finish_non_exhaustive()
    }
}

impl<S> DnsDiscover<S> {
    /// Resolves `host` (with `port`) with `resolver` when first polled and
    /// then every 5 s, making one service per address with `make`. A
    /// resolution that takes more than 10 s fails (see
    /// [`timeout`](Self::timeout)).
    pub fn new<R, F>(resolver: R, host: impl Into<Arc<str>>, port: u16, make: F) -> Self
    where
        R: Resolver,
        F: FnMut(SocketAddr) -> S + Send + 'static,
    {
        let resolver: Arc<dyn Resolver> = Arc::new(resolver);
        let host = host.into();
        DnsDiscover {
            step: Step::Start,
            resolver,
            host,
            port,
            interval: Duration::from_secs(5),
            timeout: DEFAULT_TIMEOUT,
            make: Box::new(make),
            known: BTreeSet::new(),
            pending: VecDeque::new(),
            yielded: Vec::new(),
            taken: false,
            events: None,
            in_pool: None,
        }
    }

    /// Time between two resolutions (default 5 s; at least 1 ms).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(crate::time::SHORTEST);
        self
    }

    /// How long a resolution may take before it fails (default 10 s; at
    /// least 1 ms): a resolver that never answers would otherwise stop
    /// every later resolution. A failed resolution keeps the backends.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(crate::time::SHORTEST);
        self
    }

    /// Also emits [`Event::BackendAdded`] and [`Event::BackendRemoved`]
    /// (reason `"dns"`) into `events`, once the pool has made the changes:
    /// the events of the changes the stream yielded come when it is polled
    /// again after it had no more ready (it wakes its taker for that), as
    /// [`Pool::discover`](crate::Pool::discover) does as soon as it has
    /// made them (a subscriber acting on `BackendAdded` finds the backend,
    /// and one reading `BackendRemoved` does not see it still serving). The
    /// next answer waits for that poll too, so it is compared with a pool
    /// that has the last one's changes. An address
    /// [`pool`](Self::pool) already holds is inserted again without an
    /// event: it did not join.
    pub fn events(mut self, events: Events) -> Self {
        self.events = Some(events);
        self
    }

    /// The pool this stream feeds: each answer then also inserts again an
    /// address it lists that `pool` no longer holds (removed by the health
    /// checker's `removed_after` or by `Handle::remove_backend`), with a
    /// new service from `make`, and an address that leaves the answer after
    /// it left the pool is not removed a second time. See the
    /// [module docs](self).
    ///
    /// A backend put back is a new backend: its state starts afresh, and a
    /// [`HealthChecker`](crate::health::HealthChecker) on the pool probes
    /// it at once.
    pub fn pool(mut self, pool: &Pool<S>) -> Self
    where
        S: Send + Sync + 'static,
    {
        let pool = pool.clone();
        self.in_pool = Some(Box::new(move |id| pool.contains(id)));
        self
    }

    /// The addresses of the last successful resolution.
    pub fn addresses(&self) -> impl Iterator<Item = &SocketAddr> {
        self.known.iter()
    }

    /// The step of a resolution starting now.
    fn resolve(&self) -> Step {
        let answer = self.resolver.resolve(&self.host, self.port);
        Step::Resolving(Box::pin(tokio::time::timeout(self.timeout, answer)))
    }

    /// Whether the pool fed holds `id` (true when it was not given).
    fn in_pool(&self, id: &BackendId) -> bool {
        self.in_pool.as_ref().is_none_or(|in_pool| in_pool(id))
    }

    fn apply(&mut self, addrs: Vec<SocketAddr>) {
        let now: BTreeSet<SocketAddr> = addrs.into_iter().collect();
        // New addresses first: an answer that replaces every address (a
        // failover to another IP, a blue/green switch) never leaves the
        // pool empty in between.
        for addr in &now {
            let id = BackendId::from(addr.to_string());
            if self.known.contains(addr) {
                if self.in_pool(&id) {
                    continue;
                }
                tracing::info!(
                    host = %self.host,
                    backend = %id,
                    "address still listed but gone from the pool; inserting it again"
                );
            }
            // Only a pool given can say; without one, an address new to
            // the stream is new to the pool.
            let held = self.in_pool.is_some() && self.in_pool(&id);
            let event = (self.events.is_some() && !held).then(|| Event::BackendAdded {
                group: None,
                backend: id.clone(),
            });
            let change = Change::Insert(id, (self.make)(*addr));
            self.pending.push_back((change, event));
        }
        for gone in self.known.difference(&now) {
            let id = BackendId::from(gone.to_string());
            if !self.in_pool(&id) {
                continue;
            }
            let event = self.events.is_some().then(|| Event::BackendRemoved {
                group: None,
                backend: id.clone(),
                reason: "dns".into(),
            });
            self.pending.push_back((Change::Remove(id), event));
        }
        self.known = now;
    }

    /// The next change: those of the last answer, then those of the next
    /// answer once it is due.
    fn poll_change(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Change<BackendId, S>, Infallible>>> {
        loop {
            if let Some((change, event)) = self.pending.pop_front() {
                self.yielded.extend(event);
                return Poll::Ready(Some(Ok(change)));
            }
            match &mut self.step {
                Step::Start => self.step = self.resolve(),
                Step::Resolving(fut) => {
                    let result = std::task::ready!(fut.as_mut().poll(cx));
                    match result {
                        Ok(Ok(addrs)) => {
                            if addrs.is_empty() && !self.known.is_empty() {
                                tracing::warn!(
                                    host = %self.host,
                                    "DNS answered no address; removing every backend"
                                );
                            }
                            self.apply(addrs);
                        }
                        Ok(Err(error)) => tracing::warn!(
                            host = %self.host,
                            error = %crate::error::Report(&error),
                            "DNS resolution failed; keeping the current backends"
                        ),
                        Err(_) => tracing::warn!(
                            host = %self.host,
                            timeout = ?self.timeout,
                            "DNS resolution timed out; keeping the current backends"
                        ),
                    }
                    self.step = Step::Waiting(Box::pin(tokio::time::sleep(self.interval)));
                }
                Step::Waiting(sleep) => {
                    std::task::ready!(sleep.as_mut().poll(cx));
                    if self.taken {
                        // The taker makes the last answer's changes first
                        // (it is woken at once): the next answer is
                        // compared with a pool that has them.
                        return Poll::Pending;
                    }
                    self.step = self.resolve();
                }
            }
        }
    }
}

// Nothing inside is ever pinned in place: services wait in a queue.
impl<S> Unpin for DnsDiscover<S> {}

impl<S> Stream for DnsDiscover<S> {
    type Item = Result<Change<BackendId, S>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if !this.taken {
            // Polled again after it had none ready: the changes yielded
            // before are made.
            if let Some(events) = &this.events {
                this.yielded.drain(..).for_each(|event| events.emit(event));
            }
        }
        let next = this.poll_change(cx);
        if std::mem::replace(&mut this.taken, next.is_ready()) && next.is_pending() {
            // Polled again once the changes taken are made, it emits their
            // events then, not at its next answer.
            cx.waker().wake_by_ref();
        }
        next
    }
}
