use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use super::panic::{PanicMode, DEFAULT_PANIC_PERMILLE};
use super::queue::{Placed, Wait};
use super::strategy::{Pick, Strategy};
use crate::backend::{BackendId, InFlight};
use crate::error::NoBackend;
use crate::extensions::Picked;
use crate::extensions::{Affinity, AffinityRequired, Attempts, Target};
use crate::key::RequestHead;
use crate::pool::{Pool, Rebuild, Snapshot};

/// A membership snapshot with the strategy's table built for it.
struct View<S, T> {
    snapshot: Arc<Snapshot<S>>,
    table: T,
}

struct Shared<S, P: Strategy> {
    strategy: P,
    view: ArcSwap<View<S, P::Table>>,
    panic: Arc<PanicMode>,
    queue: QueueLimits,
}

/// How many requests may wait for a place, and for how long; no queue
/// while `max` is 0.
#[derive(Default)]
struct QueueLimits {
    max: AtomicUsize,
    timeout_nanos: AtomicU64,
}

impl<S: Send + Sync, P: Strategy> Rebuild<S> for Shared<S, P> {
    fn rebuild(&self, snapshot: &Arc<Snapshot<S>>) {
        let table = self.strategy.build(snapshot.members());
        self.view.store(Arc::new(View {
            snapshot: snapshot.clone(),
            table,
        }));
        self.panic.invalidate();
    }
}

/// Chooses a backend from a [`Pool`] for each request, with a [`Strategy`].
///
/// `Balance` picks in `call`, where the request is known: it honours an
/// [`Affinity`] when that backend is eligible (or draining but healthy: the
/// sessions bound to it finish there, while no new request reaches it; or
/// at its [limit of requests in
/// flight](crate::BackendState::set_max_in_flight), which holds only new
/// requests off; with [`AffinityRequired`], that backend or none), never
/// picks a backend listed
/// in the request's [`Attempts`], sets [`Target`] on the request (and
/// records its pick in the request's [`Picked`] slot, if any), calls a
/// clone of the chosen backend's service once it is ready, and sets
/// [`ServedBy`](crate::extensions::ServedBy) on the response. A backend's
/// error comes back as a [`BackendError`](crate::error::BackendError)
/// carrying its id.
///
/// # Readiness
///
/// `poll_ready` is always ready: the chosen backend's clone is driven to
/// readiness inside the response future, so one slow backend never blocks
/// requests bound elsewhere. The backend is called on the future's first
/// poll, never in `call`: a future dropped before it is polled has sent
/// nothing to any backend (the failover layer relies on this when its retry
/// budget is spent). When no backend is eligible the response future
/// fails at once with [`NoBackend`](crate::error::NoBackend); it is never
/// pending for lack of backends, unless every backend the request may use
/// is at its limit of requests in flight and the balancer has a
/// [queue](Balance::queue): then it waits for a place, at most the queue's
/// timeout.
///
/// # Hot path
///
/// Reading the membership takes no lock (the strategy's table and the pool
/// snapshot are swapped together on every membership change). The pick
/// itself allocates nothing; the only allocations are the boxes
/// `http::Extensions` makes to store [`Target`] and `ServedBy`.
///
/// # Panic routing
///
/// When fewer than [`panic_threshold`](Balance::panic_threshold) of the
/// enabled backends (default 50 %) are available, health and ejections are
/// ignored and every enabled backend may be picked. Availability is counted
/// only when a pick meets an unavailable backend, and then at most once per
/// millisecond, so no request pays a walk over the pool in steady state.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower::{service_fn, ServiceExt};
/// use tower_ha::balance::{Balance, RoundRobin};
/// use tower_ha::extensions::ServedBy;
/// use tower_ha::Pool;
///
/// let backend = |name: &'static str| {
///     service_fn(move |_req: http::Request<()>| async move {
///         Ok::<_, std::convert::Infallible>(http::Response::new(name))
///     })
/// };
/// let pool = Pool::new();
/// pool.insert("a", backend("a"));
/// pool.insert("b", backend("b"));
///
/// let balance = Balance::new(pool, RoundRobin::new());
/// let first = balance.clone().oneshot(http::Request::new(())).await.unwrap();
/// let second = balance.oneshot(http::Request::new(())).await.unwrap();
/// assert_ne!(first.body(), second.body());
/// assert_eq!(first.extensions().get::<ServedBy>().unwrap().0.as_str(), *first.body());
/// # }
/// ```
pub struct Balance<S, P: Strategy> {
    pool: Pool<S>,
    shared: Arc<Shared<S, P>>,
}

impl<S, P> Balance<S, P>
where
    S: Send + Sync + 'static,
    P: Strategy,
{
    /// A balancer over `pool` that picks with `strategy`.
    pub fn new(pool: Pool<S>, strategy: P) -> Self {
        let empty = pool.snapshot();
        let table = strategy.build(empty.members());
        let shared = Arc::new(Shared {
            strategy,
            view: ArcSwap::from_pointee(View {
                snapshot: empty,
                table,
            }),
            panic: Arc::new(PanicMode::new(DEFAULT_PANIC_PERMILLE)),
            queue: QueueLimits::default(),
        });
        let weak = Arc::downgrade(&shared);
        pool.subscribe(weak as std::sync::Weak<dyn Rebuild<S>>);
        Balance { pool, shared }
    }

    /// A layer that builds a `Balance` over a pool with (a clone of)
    /// `strategy`.
    pub fn layer(strategy: P) -> BalanceLayer<P>
    where
        P: Clone,
    {
        BalanceLayer::new(strategy)
    }
}

impl<S, P: Strategy> Balance<S, P> {
    /// Routes across every enabled backend, healthy or not, while fewer
    /// than `share` (`0.0..=1.0`) of them are available; the default is
    /// `0.5`, `0.0` disables panic routing. The share is held to the
    /// nearest thousandth, and at least one thousandth when above zero.
    /// Applies to every clone of this balancer.
    pub fn panic_threshold(self, share: f64) -> Self {
        self.shared.panic.set_threshold(share);
        if let Some(room) = self.pool.room() {
            // Waiting requests count the pool again by the new threshold.
            room.wake_all(None);
        }
        self
    }

    /// Lets up to `max_waiting` requests wait, each for at most `timeout`,
    /// for a place when every backend they may use is at its [limit of
    /// requests in flight](crate::BackendState::set_max_in_flight), as
    /// HAProxy's queue and `timeout queue` do; by default there is no queue
    /// and such a request fails at once with
    /// [`NoBackend`](crate::error::NoBackend). A request that waits longer
    /// fails with a `NoBackend` whose
    /// [`is_queue_timeout`](crate::error::NoBackend::is_queue_timeout) is
    /// true; one that finds `max_waiting` requests waiting fails at once.
    /// A `max_waiting` or `timeout` of zero turns the queue off.
    ///
    /// Waiting requests are served in the order they came: a request that
    /// ends hands its place straight to the first waiting request that may
    /// use its backend (not one it already tried), so a request arriving
    /// meanwhile cannot overtake them. A limit raised, a backend back in
    /// service or a backend joining the pool hands the places it opens to
    /// the waiting requests that may use them, in the same order, and then
    /// lets every other waiting request pick again (the change may have
    /// put the pool in panic). An ejection that runs out does the same at
    /// its end, on a timer of the waiting requests that may use its
    /// backend. A request whose every backend becomes
    /// unavailable stops waiting and fails with `NoBackend`. A waiting
    /// request goes to whichever backend a place opens up on, whatever the
    /// strategy would have preferred (under a limit, every backend it may
    /// use was full when it came).
    ///
    /// The queue belongs to the pool: the balancers over one pool share
    /// its waiting requests and their places; the number and the wait are
    /// each balancer's own. A backend state shared by several pools
    /// ([`Pool::insert_with_state`], on a reload say) offers a place that
    /// opens up to the queue of each pool that holds it at the time, in
    /// the order the pools took it: the waiting requests of a later pool
    /// get a place only when those of the earlier ones cannot use it (on a
    /// reload, the old pool's last requests go first). A failover layer's per-try timeout
    /// and deadline count the time spent waiting. Applies to every clone of
    /// this balancer.
    ///
    /// A waiting request waits on a `tokio::time` timer, so with a queue the
    /// balancer's response futures must be polled inside a Tokio runtime
    /// with its time driver enabled; a request that has to wait outside one
    /// panics.
    pub fn queue(self, max_waiting: usize, timeout: Duration) -> Self {
        let max = match timeout.is_zero() {
            true => 0,
            false => max_waiting,
        };
        if max > 0 {
            self.pool.open_room();
        }
        let nanos = crate::time::nanos(timeout);
        self.shared
            .queue
            .timeout_nanos
            .store(nanos, Ordering::Relaxed);
        self.shared.queue.max.store(max, Ordering::Relaxed);
        self
    }

    /// How many requests are waiting for a place on this balancer's pool
    /// (see [`queue`](Self::queue)).
    pub fn waiting(&self) -> usize {
        self.pool.waiting()
    }

    /// The pool this balancer picks from.
    pub fn get_ref(&self) -> &Pool<S> {
        &self.pool
    }

    /// The pool this balancer picks from.
    pub fn pool(&self) -> &Pool<S> {
        &self.pool
    }

    /// The strategy.
    pub fn strategy(&self) -> &P {
        &self.shared.strategy
    }

    /// The pool, consuming the balancer.
    pub fn into_inner(self) -> Pool<S> {
        self.pool
    }
}

impl<S, P: Strategy> Clone for Balance<S, P> {
    fn clone(&self) -> Self {
        Balance {
            pool: self.pool.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, P: Strategy + fmt::Debug> fmt::Debug for Balance<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("pool", &self.pool)
            .field("strategy", &self.shared.strategy)
            .finish()
    }
}

impl<S, P, B, RB> Service<Request<B>> for Balance<S, P>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<crate::error::BoxError>,
    P: Strategy,
{
    type Response = Response<RB>;
    type Error = crate::error::BoxError;
    type Future = ResponseFuture<S, Request<B>>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.pick_place(&mut req) {
            Ok(p) => ResponseFuture::new(p.service, req, p.id, p.in_flight, p.picked),
            Err(e) if e.is_at_limit() => self.wait(req),
            Err(e) => ResponseFuture::no_backend(self.pool.refused(e, tried(&req))),
        }
    }
}

impl<S: Clone, P: Strategy> Balance<S, P> {
    /// Picks a backend for `req` and takes a place on it.
    #[inline]
    fn pick_place<B>(&self, req: &mut Request<B>) -> Result<Placed<S>, NoBackend> {
        let view = self.shared.view.load();
        let members = view.snapshot.members();
        let (i, in_flight) = {
            let ext = req.extensions();
            let pick = Pick::new(RequestHead::from(&*req), members, ext.get::<Attempts>())
                .with_panic(&self.shared.panic);
            let affinity = ext.get::<Affinity>();
            let pinned = affinity
                .and_then(|a| members.index_of(&a.0))
                .filter(|&i| pick.is_eligible_for_affinity(i));
            match pinned {
                // A session's backend takes it even at its limit.
                Some(i) => (i, members[i].state().track_in_flight()),
                None if affinity.is_some() && ext.get::<AffinityRequired>().is_some() => {
                    return Err(NoBackend::new());
                }
                None => {
                    // A place lost to a concurrent request means a pick
                    // again (the backend is full now, so the next pick
                    // passes it by); bounded, for a strategy that returns
                    // a full backend.
                    let mut placed = None;
                    for _ in 0..=members.len() {
                        // An index out of range (a strategy's bug) is no
                        // pick rather than a panic.
                        let Some((i, member)) = self
                            .shared
                            .strategy
                            .pick(&view.table, &pick)
                            .and_then(|i| Some((i, members.get(i)?)))
                        else {
                            break;
                        };
                        if let Some(in_flight) = member.state().try_track_in_flight() {
                            placed = Some((i, in_flight));
                            break;
                        }
                    }
                    match placed {
                        Some(placed) => placed,
                        // Full, or with room again: a request that ended
                        // after the pick passed its backend by freed a
                        // place, which the queue finds at once.
                        None if (0..members.len())
                            .any(|i| pick.is_full(i) || pick.is_eligible(i)) =>
                        {
                            return Err(NoBackend::at_limit());
                        }
                        None => return Err(NoBackend::new()),
                    }
                }
            }
        };
        let placed = settle(&view.snapshot, i, in_flight, req);
        if let Some(slot) = placed.picked.as_ref().filter(|p| p.wants_others()) {
            // A failover layer that pauses before a retry asks whether one
            // could find a backend, so as not to wait for nothing.
            let ext = req.extensions();
            let left = !(placed.required && ext.get::<Affinity>().is_some()) && {
                let pick = Pick::new(RequestHead::from(&*req), members, ext.get::<Attempts>())
                    .with_panic(&self.shared.panic);
                (0..members.len()).any(|j| j != i && (pick.is_eligible(j) || pick.is_full(j)))
            };
            slot.answer_others(left);
        }
        Ok(placed)
    }

    /// Queues `req` for a place, or fails it with [`NoBackend`] if this
    /// balancer has no queue or its queue is full.
    fn wait<B>(&self, req: Request<B>) -> ResponseFuture<S, Request<B>>
    where
        S: Service<Request<B>>,
    {
        let max = self.shared.queue.max.load(Ordering::Relaxed);
        let room = match self.pool.room() {
            Some(room) if max > 0 => room,
            _ => {
                let refusal = self.pool.refused(NoBackend::at_limit(), tried(&req));
                return ResponseFuture::no_backend(refusal);
            }
        };
        let view = self.shared.view.load();
        let members = view.snapshot.members();
        let tried_before = tried(&req).to_vec();
        let excluded = tried_before
            .iter()
            .filter_map(|id| members.index_of(id))
            .map(|i| members[i].state().clone())
            .collect();
        let panic = self.shared.panic.engaged(members);
        let Some(ticket) = room.join(max, tried_before, excluded, panic) else {
            let refusal = self.pool.refused(NoBackend::at_limit(), tried(&req));
            return ResponseFuture::no_backend(refusal);
        };
        let timeout = Duration::from_nanos(self.shared.queue.timeout_nanos.load(Ordering::Relaxed));
        let deadline = crate::time::later(Instant::now(), timeout);
        let wait = Wait::new(
            self.pool.clone(),
            self.shared.panic.clone(),
            settle::<S, B>,
            ticket,
            deadline,
        );
        ResponseFuture::queued(req, Box::new(wait))
    }
}

/// The backends `req` tried before (see [`Attempts`]).
fn tried<B>(req: &Request<B>) -> &[BackendId] {
    req.extensions()
        .get::<Attempts>()
        .map_or(&[], Attempts::as_slice)
}

/// Sends `req` to the backend at `i` of `snapshot`, where `in_flight` holds
/// its place: labels the request with its `Target` and tells a failover
/// layer's `Picked` slot.
#[inline(always)]
fn settle<S: Clone, B>(
    snapshot: &Snapshot<S>,
    i: usize,
    in_flight: InFlight,
    req: &mut Request<B>,
) -> Placed<S> {
    let member = &snapshot.members()[i];
    let service = snapshot.service(i).expect("index within snapshot").clone();
    let id = member.id().clone();
    let state = member.state();
    // Tell a failover layer which backend this attempt goes to, so it
    // can exclude it even if it abandons the attempt (a timeout). Marked
    // as being readied first: a failover layer on another thread that
    // sees the pick (through the slot's lock) sees it not sent yet.
    let picked = req.extensions().get::<Picked>().map(|picked| {
        picked.set_readying(true);
        picked.set(id.clone());
        picked.clone()
    });
    // The requirement was this balancer's: a backend that is a balancer
    // itself (a nested group) has no member of that name and would refuse
    // the request. (A failover layer's retries start from its own copy.)
    let required = req.extensions_mut().remove::<AffinityRequired>().is_some();
    let target = Target::new(id.clone(), state.clone());
    // A replayed attempt already carries a Target: overwrite it in place
    // instead of boxing a new one.
    match req.extensions_mut().get_mut::<Target>() {
        Some(slot) => *slot = target,
        None => {
            req.extensions_mut().insert(target);
        }
    }
    Placed {
        service,
        id,
        in_flight,
        picked,
        required,
    }
}

/// Builds a [`Balance`] over a [`Pool`], for `ServiceBuilder` stacks. Each
/// pool it wraps gets a clone of its strategy; a strategy whose clones share
/// state ([`Priority`](super::Priority): one group's primary) wants one
/// pool per layer.
///
/// ```
/// use tower::{service_fn, ServiceBuilder};
/// use tower_ha::balance::{BalanceLayer, RoundRobin};
/// use tower_ha::Pool;
///
/// let pool = Pool::new();
/// pool.insert("a", service_fn(|_req: http::Request<()>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
/// }));
/// let _balance = ServiceBuilder::new()
///     .layer(BalanceLayer::new(RoundRobin::new()))
///     .service(pool);
/// ```
#[derive(Debug, Clone)]
pub struct BalanceLayer<P> {
    strategy: P,
    panic_threshold: f64,
    queue: (usize, Duration),
}

impl<P> BalanceLayer<P> {
    /// A layer that balances with (a clone of) `strategy`.
    pub fn new(strategy: P) -> Self {
        BalanceLayer {
            strategy,
            panic_threshold: f64::from(DEFAULT_PANIC_PERMILLE) / 1000.0,
            queue: (0, Duration::ZERO),
        }
    }

    /// See [`Balance::panic_threshold`].
    pub fn panic_threshold(mut self, share: f64) -> Self {
        self.panic_threshold = share;
        self
    }

    /// See [`Balance::queue`].
    pub fn queue(mut self, max_waiting: usize, timeout: Duration) -> Self {
        self.queue = (max_waiting, timeout);
        self
    }
}

impl<S, P> Layer<Pool<S>> for BalanceLayer<P>
where
    S: Send + Sync + 'static,
    P: Strategy + Clone,
{
    type Service = Balance<S, P>;

    fn layer(&self, pool: Pool<S>) -> Balance<S, P> {
        let (max_waiting, timeout) = self.queue;
        Balance::new(pool, self.strategy.clone())
            .panic_threshold(self.panic_threshold)
            .queue(max_waiting, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::RoundRobin;
    use std::future::Future;
    use std::pin::pin;
    use std::task::Waker;
    use tower::service_fn;

    #[test]
    fn records_the_pick_in_a_picked_slot_before_calling() {
        let pool = Pool::new();
        for name in ["a", "b"] {
            pool.insert(
                name,
                service_fn(|_req: Request<()>| {
                    std::future::pending::<Result<Response<()>, std::convert::Infallible>>()
                }),
            );
        }
        let mut balance = Balance::new(pool, RoundRobin::new());
        let picked = Picked::new();
        let mut attempts = Attempts::new();
        attempts.push("a".into());
        let req = Request::builder()
            .extension(picked.clone())
            .extension(attempts)
            .body(())
            .unwrap();
        let future = balance.call(req);
        // Known as soon as `call` returns, before the backend answers.
        assert_eq!(picked.take().unwrap().as_str(), "b");
        let mut future = pin!(future);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(future.as_mut().poll(&mut cx).is_pending());
    }
}
