//! The set of backends a balancer chooses from.
//!
//! A [`Pool`] holds, for each backend, its [`BackendId`], its service and its
//! shared [`BackendState`]. Membership (insert, remove, weight) changes by
//! copy-on-write: a new immutable [`Snapshot`] is built and swapped in whole,
//! so readers on the request path never take a lock. Health changes touch
//! only the atomics inside `BackendState` and never rebuild the snapshot.
//!
//! Membership can also come from any [`tower::discover::Discover`] stream
//! with [`Pool::discover`].

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower::discover::{Change, Discover};

use crate::backend::{AdminStatus, BackendId, BackendState};
use crate::balance::queue::Room;
use crate::error::NoBackend;
use crate::serial::Serial;

/// The id index. SipHash (std's) rather than streaming XXH3: ids are
/// short, and XXH3's streaming hasher costs several times more to set up
/// than it saves; `Balance` looks an id up on every request that carries
/// an `Affinity`.
pub(crate) type FastMap<K, V> = HashMap<K, V, std::hash::RandomState>;

/// One backend as strategies see it: its id and shared state.
#[derive(Debug, Clone)]
pub struct Member {
    id: BackendId,
    state: Arc<BackendState>,
    /// Its configured weight when its snapshot was made (read by
    /// `Members::from_list`): the weight the strategies build their tables
    /// with.
    weight: u32,
    /// Whether this pool made `state` (when it joined, or before it left
    /// and came back with it), rather than being given it.
    made: bool,
    /// Tells its service from the one it had before a replacement that
    /// kept its state (see [`Member::service_serial`]).
    service_serial: Serial,
}

impl Member {
    fn new(id: BackendId, state: Arc<BackendState>, made: bool) -> Self {
        Member {
            id,
            state,
            weight: 0,
            made,
            service_serial: Serial::take(),
        }
    }

    /// The backend's id.
    #[inline]
    pub fn id(&self) -> &BackendId {
        &self.id
    }

    /// The backend's shared state.
    #[inline]
    pub fn state(&self) -> &Arc<BackendState> {
        &self.state
    }

    /// Whether the pool made its state, rather than being given it
    /// ([`Pool::insert_with_state`]).
    pub(crate) fn made_here(&self) -> bool {
        self.made
    }

    /// Numbers the service it was given, across pools: a replacement of
    /// its service (keeping its state) gives it a new number, so that
    /// what was learned of the old service (a probe's result) is told
    /// from what concerns the new one.
    pub(crate) fn service_serial(&self) -> Serial {
        self.service_serial
    }
}

/// Up to this many members, `index_of` first looks for the id's own
/// allocation with a linear scan.
const SCAN_MAX: usize = 16;

/// The members of one snapshot, in insertion order, with an index by id.
#[derive(Debug, Clone, Default)]
pub struct Members {
    list: Vec<Member>,
    index: FastMap<BackendId, usize>,
    /// Numbers memberships in the order they were made, across pools;
    /// 0 for an empty default.
    epoch: u64,
}

impl Members {
    fn from_list(mut list: Vec<Member>) -> Self {
        static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);
        for m in &mut list {
            m.weight = m.state.weight();
        }
        let index = list
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
        let epoch = NEXT_EPOCH.fetch_add(1, Ordering::Relaxed);
        Members { list, index, epoch }
    }

    /// Which membership this is: a later one has a larger number. Every
    /// balancer over one snapshot sees the same number.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The number of backends.
    #[inline]
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there is no backend.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The backend at `index` (in insertion order).
    #[inline]
    pub fn get(&self, index: usize) -> Option<&Member> {
        self.list.get(index)
    }

    /// The position of backend `id`.
    #[inline]
    pub fn index_of(&self, id: &BackendId) -> Option<usize> {
        if self.list.is_empty() {
            return None;
        }
        // An id this pool handed out (an `Affinity` copied from a
        // `ServedBy`) shares the member's allocation: in a small pool a
        // pointer scan finds it without hashing the id.
        if self.list.len() <= SCAN_MAX {
            if let Some(i) = self.list.iter().position(|m| m.id.same_allocation(id)) {
                return Some(i);
            }
        }
        self.index.get(id).copied()
    }

    /// All backends in insertion order.
    #[inline]
    pub fn as_slice(&self) -> &[Member] {
        &self.list
    }

    /// An iterator over the backends in insertion order.
    pub fn iter(&self) -> std::slice::Iter<'_, Member> {
        self.list.iter()
    }
}

impl std::ops::Index<usize> for Members {
    type Output = Member;

    #[inline]
    fn index(&self, index: usize) -> &Member {
        &self.list[index]
    }
}

/// An immutable view of a pool's membership, swapped whole on every change.
pub struct Snapshot<S> {
    members: Members,
    services: Vec<S>,
    generation: u64,
}

impl<S> Snapshot<S> {
    /// The backends of this snapshot.
    #[inline]
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// The service of the backend at `index`.
    #[inline]
    pub fn service(&self, index: usize) -> Option<&S> {
        self.services.get(index)
    }

    /// The number of backends.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Increases by one on every membership or weight change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The ids of all backends in insertion order.
    pub fn ids(&self) -> impl Iterator<Item = &BackendId> + '_ {
        self.members.iter().map(Member::id)
    }
}

impl<S> fmt::Debug for Snapshot<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.generation)
            .field("members", &self.members.list)
            .finish()
    }
}

/// Something that rebuilds derived state (a balancer's tables) whenever the
/// membership changes, off the request path.
pub(crate) trait Rebuild<S>: Send + Sync {
    fn rebuild(&self, snapshot: &Arc<Snapshot<S>>);
}

struct Shared<S> {
    current: ArcSwap<Snapshot<S>>,
    /// Serializes writers and holds the listeners, so that every listener
    /// sees every snapshot, in order.
    writer: Mutex<Vec<Weak<dyn Rebuild<S>>>>,
    /// The requests waiting for a place, once a balancer lets them wait.
    room: OnceLock<Arc<Room>>,
    /// The requests its balancers refused, by reason.
    refused: [AtomicU64; 3],
    /// Which pool the counts of `refused` are of.
    serial: Serial,
    /// The states of backends a discovery stream removed, for their return.
    kept: Mutex<Kept>,
    /// How many running health checkers want new backends to start
    /// unhealthy: a state the pool creates is marked before any balancer
    /// can see it.
    unprobed: Arc<AtomicUsize>,
}

/// Keeps the backends a pool adds starting unhealthy, while it lives.
pub(crate) struct StartUnhealthy(Arc<AtomicUsize>);

impl Drop for StartUnhealthy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long [`Pool::discover`] keeps the state of a backend its stream
/// removed, by default: see [`Pool::keep_removed_for`].
pub const DEFAULT_KEEP_REMOVED_FOR: Duration = Duration::from_secs(60);

/// The most removed backends a pool keeps the state of; beyond it the
/// oldest removal is forgotten first.
pub const KEEP_REMOVED_MAX: usize = 1024;

/// The states of removed backends, oldest removal first, each with
/// whether the pool made it (see `Member::made`).
struct Kept {
    window: Duration,
    states: VecDeque<(BackendId, Arc<BackendState>, bool, Instant)>,
}

impl Kept {
    fn forget_expired(&mut self, now: Instant) {
        while let Some((_, _, _, at)) = self.states.front() {
            if !crate::time::elapsed(*at, now, self.window) {
                break;
            }
            self.states.pop_front();
        }
    }

    fn keep(
        &mut self,
        Member {
            id, state, made, ..
        }: Member,
    ) {
        if self.window.is_zero() {
            return;
        }
        let now = Instant::now();
        self.forget_expired(now);
        self.states.retain(|(kept, ..)| kept != &id);
        if self.states.len() >= KEEP_REMOVED_MAX {
            self.states.pop_front();
        }
        self.states.push_back((id, state, made, now));
    }

    /// Forgets the kept state of `id`; returns whether one was kept.
    fn forget(&mut self, id: &BackendId) -> bool {
        let before = self.states.len();
        self.states.retain(|(kept, ..)| kept != id);
        self.states.len() != before
    }

    /// Where the state of `id` is kept, if it still is.
    fn find(&mut self, id: &BackendId) -> Option<usize> {
        if self.states.is_empty() {
            return None;
        }
        self.forget_expired(Instant::now());
        self.states.iter().position(|(kept, ..)| kept == id)
    }

    fn get(&mut self, id: &BackendId) -> Option<Arc<BackendState>> {
        let i = self.find(id)?;
        Some(self.states[i].1.clone())
    }

    /// The kept state of `id`, and whether the pool made it.
    fn take(&mut self, id: &BackendId) -> Option<(Arc<BackendState>, bool)> {
        let i = self.find(id)?;
        self.states
            .remove(i)
            .map(|(_, state, made, _)| (state, made))
    }
}

/// The set of backends: ids, services, weights and shared state.
///
/// Cloning a `Pool` is cheap and yields a handle to the same pool.
///
/// ```
/// use tower::service_fn;
/// use tower_ha::Pool;
///
/// let pool = Pool::new();
/// let echo = |name: &'static str| {
///     service_fn(move |_req: http::Request<()>| async move {
///         Ok::<_, std::convert::Infallible>(http::Response::new(name))
///     })
/// };
/// pool.insert("a", echo("a"));
/// pool.insert_weighted("b", echo("b"), 3);
/// assert_eq!(pool.len(), 2);
/// assert_eq!(pool.state(&"b".into()).unwrap().weight(), 3);
/// assert!(pool.remove(&"a".into()));
/// assert_eq!(pool.len(), 1);
/// ```
pub struct Pool<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Pool<S> {
    fn clone(&self) -> Self {
        Pool {
            shared: self.shared.clone(),
        }
    }
}

impl<S> Default for Pool<S> {
    fn default() -> Self {
        Pool::new()
    }
}

impl<S> fmt::Debug for Pool<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pool").field(&*self.snapshot()).finish()
    }
}

impl<S> Pool<S> {
    /// An empty pool.
    pub fn new() -> Self {
        Pool {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(Snapshot {
                    members: Members::default(),
                    services: Vec::new(),
                    generation: 0,
                }),
                writer: Mutex::new(Vec::new()),
                room: OnceLock::new(),
                refused: Default::default(),
                serial: Serial::take(),
                kept: Mutex::new(Kept {
                    window: DEFAULT_KEEP_REMOVED_FOR,
                    states: VecDeque::new(),
                }),
                unprobed: Arc::default(),
            }),
        }
    }

    /// How long the pool keeps the state of a backend that a
    /// [`discover`](Self::discover) stream removed (default
    /// [`DEFAULT_KEEP_REMOVED_FOR`], 60 s; zero keeps none), for at most
    /// [`KEEP_REMOVED_MAX`] backends, the oldest removal forgotten first.
    ///
    /// An insert of the same id within that time gets the state back, so a
    /// backend that leaves and returns (a DNS answer that drops an address
    /// for one refresh) keeps its operator's status (disabled or
    /// draining), its limit of requests in flight, its ejection, its
    /// weight, and the count of its requests still in flight. A backend
    /// removed with [`remove`](Self::remove) is forgotten at once. Applies
    /// to every handle of this pool.
    pub fn keep_removed_for(self, window: Duration) -> Self {
        let mut kept = self.shared.kept.lock();
        kept.window = window;
        if window.is_zero() {
            kept.states.clear();
        }
        drop(kept);
        self
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot<S>> {
        self.shared.current.load_full()
    }

    /// The number of backends.
    pub fn len(&self) -> usize {
        self.shared.current.load().len()
    }

    /// Whether the pool has no backend.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids of all backends, in insertion order.
    pub fn ids(&self) -> Vec<BackendId> {
        self.shared.current.load().ids().cloned().collect()
    }

    /// The shared state of backend `id`.
    pub fn state(&self, id: &BackendId) -> Option<Arc<BackendState>> {
        let snap = self.shared.current.load();
        let i = snap.members.index_of(id)?;
        Some(snap.members[i].state.clone())
    }

    /// The state of backend `id`, and whether it is in the pool (`true`)
    /// or out of it, removed by its discovery stream, with the state kept
    /// for its return (see [`keep_removed_for`](Self::keep_removed_for)).
    /// Both are read under the writer's lock: a backend that discovery
    /// puts back at that moment is found in one or the other, never in
    /// neither.
    pub(crate) fn live_or_kept_state(&self, id: &BackendId) -> Option<(Arc<BackendState>, bool)> {
        let _writer = self.shared.writer.lock();
        self.live_or_kept(id)
    }

    /// Sets the admin status of backend `id`'s state, live or kept for its
    /// return, as found under the writer's lock; returns the state, whether
    /// it is live, and its previous status. Under that lock, a removal that
    /// spares backends the operator took out (see
    /// [`remove_if_enabled`](Self::remove_if_enabled)) comes wholly before
    /// the change or wholly after it.
    pub(crate) fn set_admin_of(
        &self,
        id: &BackendId,
        admin: AdminStatus,
    ) -> Option<(Arc<BackendState>, bool, AdminStatus)> {
        let _writer = self.shared.writer.lock();
        let (state, live) = self.live_or_kept(id)?;
        let was = state.set_admin(admin);
        Some((state, live, was))
    }

    /// What [`live_or_kept_state`](Self::live_or_kept_state) reads, with
    /// the writer's lock held.
    fn live_or_kept(&self, id: &BackendId) -> Option<(Arc<BackendState>, bool)> {
        match self.state(id) {
            Some(state) => Some((state, true)),
            None => self.shared.kept.lock().get(id).map(|state| (state, false)),
        }
    }

    /// Whether backend `id` is in the pool.
    pub fn contains(&self, id: &BackendId) -> bool {
        self.shared.current.load().members.index_of(id).is_some()
    }

    /// New backends (not those returning with a kept state) start
    /// unhealthy until the guard is dropped.
    pub(crate) fn start_unhealthy(&self) -> StartUnhealthy {
        self.shared.unprobed.fetch_add(1, Ordering::Relaxed);
        StartUnhealthy(self.shared.unprobed.clone())
    }

    /// Makes the queue of requests waiting for a place on this pool's
    /// backends, if no balancer that lets requests wait made it already.
    pub(crate) fn open_room(&self) {
        let _writer = self.shared.writer.lock();
        let room = self.shared.room.get_or_init(Arc::default);
        link(room, &self.shared.current.load().members);
    }

    /// The queue, once a balancer has opened it.
    pub(crate) fn room(&self) -> Option<&Arc<Room>> {
        self.shared.room.get()
    }

    /// How many requests are waiting for a place on this pool's backends
    /// (see [`Balance::queue`](crate::balance::Balance::queue)), whichever
    /// balancer queued them.
    pub fn waiting(&self) -> usize {
        self.room().map_or(0, |room| room.waiting())
    }

    /// How many requests this pool's balancers have refused with
    /// [`NoBackend`], by reason, since the pool was made.
    pub fn refusals(&self) -> Refusals {
        let [unavailable, at_limit, queue_timeouts] = (self.shared.refused)
            .each_ref()
            .map(|n| n.load(Ordering::Relaxed));
        Refusals {
            unavailable,
            at_limit,
            queue_timeouts,
        }
    }

    /// Which pool this is: a clone's is the same.
    pub(crate) fn serial(&self) -> Serial {
        self.shared.serial
    }

    /// Counts `refusal`, a balancer's over this pool, of a request that
    /// `tried` these backends before, and gives it back. Only a request's
    /// first attempt counts: the refusal of a later one ends a failover
    /// layer's attempts, and the client gets the last backend's answer.
    pub(crate) fn refused(&self, refusal: NoBackend, tried: &[BackendId]) -> NoBackend {
        if tried.is_empty() {
            self.shared.refused[refusal.reason()].fetch_add(1, Ordering::Relaxed);
        }
        refusal
    }
}

/// How many requests a [`Pool`]'s balancers refused with [`NoBackend`], by
/// reason (see [`Pool::refusals`]): those refused before any backend was
/// tried. A failover layer's later attempt that finds no backend left is
/// not counted, as its client gets the last backend's answer or error.
/// The counts are the pool's: every group registered over it shows them
/// all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Refusals {
    /// No backend was available (or not tried yet by the request), or the
    /// session's backend was not, for a request that may go to no other.
    pub unavailable: u64,
    /// Some backend could have taken the request but for its limit of
    /// requests in flight, and the request could not wait (no queue, or a
    /// full one; see [`NoBackend::is_at_limit`]).
    pub at_limit: u64,
    /// The request waited in the queue for as long as it may (see
    /// [`NoBackend::is_queue_timeout`]).
    pub queue_timeouts: u64,
}

impl<S: Clone> Pool<S> {
    /// Adds a backend with weight 1, or replaces the service of an existing
    /// backend with the same id (keeping its state and weight).
    ///
    /// A backend that a [`discover`](Self::discover) stream removed less
    /// than [`keep_removed_for`](Self::keep_removed_for) ago comes back
    /// with its state (its weight included).
    pub fn insert(&self, id: impl Into<BackendId>, service: S) {
        self.upsert(id.into(), service, None, true, |_| {});
    }

    /// Adds a backend with `weight` (0 counts as 1), or replaces the service
    /// and weight of an existing one (keeping its state). A backend that a
    /// discovery stream removed recently comes back with its state, as
    /// with [`insert`](Self::insert), and `weight`.
    pub fn insert_weighted(&self, id: impl Into<BackendId>, service: S, weight: u32) {
        self.upsert(id.into(), service, Some(weight), true, |_| {});
    }

    /// Adds a new backend, or one returning with its kept state, whose
    /// state `prepare` sets up before any balancer sees it; `false` (and no
    /// change) when `id` is a member already, as found under the writer's
    /// lock.
    pub(crate) fn insert_new(
        &self,
        id: BackendId,
        service: S,
        prepare: impl FnOnce(&BackendState),
    ) -> bool {
        self.upsert(id, service, None, false, prepare)
    }

    /// Adds a backend that shares an existing [`BackendState`] (for example
    /// one a health checker already watches), or replaces an existing
    /// backend's service and state.
    pub fn insert_with_state(
        &self,
        id: impl Into<BackendId>,
        service: S,
        state: Arc<BackendState>,
    ) {
        let id = id.into();
        self.change(|members, services| {
            self.shared.kept.lock().take(&id);
            match members.iter().position(|m| m.id == id) {
                Some(i) => {
                    members[i].state = state;
                    members[i].made = false;
                    members[i].service_serial = Serial::take();
                    services[i] = service;
                }
                None => {
                    members.push(Member::new(id, state, false));
                    services.push(service);
                }
            }
            true
        });
    }

    /// Adds backend `id`, or replaces an existing one's service and
    /// weight if `replace`; returns whether it added it.
    fn upsert(
        &self,
        id: BackendId,
        service: S,
        weight: Option<u32>,
        replace: bool,
        prepare: impl FnOnce(&BackendState),
    ) -> bool {
        let mut added = false;
        self.change(|members, services| {
            let (changed, new) =
                self.upsert_in(members, services, id, service, weight, replace, prepare);
            added = new;
            changed
        });
        added
    }

    /// [`upsert`](Self::upsert) on a membership being edited; returns
    /// whether it changed it, and whether it added the backend.
    #[allow(clippy::too_many_arguments)]
    fn upsert_in(
        &self,
        members: &mut Vec<Member>,
        services: &mut Vec<S>,
        id: BackendId,
        service: S,
        weight: Option<u32>,
        replace: bool,
        prepare: impl FnOnce(&BackendState),
    ) -> (bool, bool) {
        match members.iter().position(|m| m.id == id) {
            Some(_) if !replace => (false, false),
            Some(i) => {
                if let Some(w) = weight {
                    members[i].state.store_weight(w);
                }
                members[i].service_serial = Serial::take();
                services[i] = service;
                (true, false)
            }
            None => {
                let (state, made) = match self.shared.kept.lock().take(&id) {
                    Some((state, made)) => {
                        if let Some(w) = weight {
                            state.store_weight(w);
                        }
                        (state, made)
                    }
                    None => {
                        let state = BackendState::new(weight.unwrap_or(1));
                        if self.shared.unprobed.load(Ordering::Relaxed) > 0 {
                            state.start_unproven();
                        }
                        (Arc::new(state), true)
                    }
                };
                prepare(&state);
                members.push(Member::new(id, state, made));
                services.push(service);
                (true, true)
            }
        }
    }

    /// Removes backend `id`; returns whether it was present. Requests
    /// already sent to it finish.
    ///
    /// Its state is forgotten: inserted again, the backend starts afresh
    /// (enabled, no limit, healthy unless a health checker with
    /// `start_unhealthy` still waits for its first probes). A [`discover`](Self::discover)
    /// stream's removal keeps the state for a while instead (see
    /// [`keep_removed_for`](Self::keep_removed_for)); removing such a
    /// backend again (`false`: it is not in the pool) forgets its state.
    pub fn remove(&self, id: &BackendId) -> bool {
        self.remove_where(id, false).0
    }

    /// Removes backend `id` as [`remove`](Self::remove) does; returns
    /// whether it was present, or out of the pool with its state kept for
    /// its return (now forgotten).
    pub(crate) fn remove_or_forget(&self, id: &BackendId) -> bool {
        let (removed, forgot) = self.remove_where(id, false);
        removed || forgot
    }

    /// Removes backend `id` only if its state is still `state` (not another
    /// backend inserted under the same id since) and the operator has not
    /// taken it out (disabled or draining: a removal would forget that, and
    /// a discovery that still lists it would put it back enabled); returns
    /// whether it did. Both are checked under the writer's lock, which the
    /// control `Handle` takes to change a backend's status: a disable at
    /// that moment either comes first and spares the backend, or finds it
    /// gone.
    pub(crate) fn remove_if_enabled(&self, id: &BackendId, state: &Arc<BackendState>) -> bool {
        let mut removed = false;
        self.change(|members, services| {
            let found = members.iter().position(|m| {
                &m.id == id && Arc::ptr_eq(&m.state, state) && state.admin() == AdminStatus::Enabled
            });
            if let Some(i) = found {
                members.remove(i);
                services.remove(i);
                removed = true;
            }
            removed
        });
        removed
    }

    /// Removes backend `id`, keeping its state for an insert of the same
    /// id within the pool's [`keep_removed_for`](Self::keep_removed_for)
    /// window if `keep`. Returns whether it removed it, and whether it
    /// forgot a kept state of it instead.
    fn remove_where(&self, id: &BackendId, keep: bool) -> (bool, bool) {
        let mut outcome = (false, false);
        self.change(|members, services| {
            outcome = self.remove_in(members, services, id, keep);
            outcome.0
        });
        outcome
    }

    /// [`remove_where`](Self::remove_where) on a membership being edited.
    fn remove_in(
        &self,
        members: &mut Vec<Member>,
        services: &mut Vec<S>,
        id: &BackendId,
        keep: bool,
    ) -> (bool, bool) {
        if let Some(i) = members.iter().position(|m| &m.id == id) {
            let member = members.remove(i);
            services.remove(i);
            if keep {
                self.shared.kept.lock().keep(member);
            }
            (true, false)
        } else if !keep {
            // Out of the pool already, by discovery: its kept state is
            // forgotten all the same.
            (false, self.shared.kept.lock().forget(id))
        } else {
            (false, false)
        }
    }

    /// Sets the weight of backend `id` (0 counts as 1); returns whether it
    /// was present. Strategies that depend on weights rebuild their tables.
    pub fn set_weight(&self, id: &BackendId, weight: u32) -> bool {
        self.set_weight_where(id, weight, false)
    }

    /// Sets the weight of backend `id` as [`set_weight`](Self::set_weight)
    /// does, or, when it is out of the pool, of the state the pool keeps
    /// for its return (it comes back with that weight); whether it did.
    pub(crate) fn set_weight_or_kept(&self, id: &BackendId, weight: u32) -> bool {
        self.set_weight_where(id, weight, true)
    }

    fn set_weight_where(&self, id: &BackendId, weight: u32, or_kept: bool) -> bool {
        let mut found = false;
        // Under the writer's lock, which a return of the kept state takes
        // too: the state is not taken into the pool with its old weight
        // meanwhile.
        self.change(|members, _| {
            let Some(m) = members.iter().find(|m| &m.id == id) else {
                if let Some(kept) = or_kept.then(|| self.shared.kept.lock().get(id)).flatten() {
                    kept.store_weight(weight);
                    found = true;
                }
                return false;
            };
            found = true;
            m.state.store_weight(weight);
            // Compared with the weight this pool's tables were built with,
            // not the state's last: another pool sharing the state (a
            // backend in two groups) may have set it already.
            m.weight != m.state.weight()
        });
        found
    }

    /// Applies every change of a [`Discover`] stream to this pool until the
    /// stream ends (`Ok`) or fails (the stream's error; the changes it
    /// yielded before are made).
    ///
    /// The changes the stream has ready at once (a DNS answer's, say) are
    /// made as one change of membership: the balancers rebuild
    /// their tables once, not once per address, and no request sees the
    /// membership half way through them (an answer that swaps every address
    /// for new ones never shows an empty pool, nor a hashed key moving from
    /// one old backend to another before it lands on a new one). The
    /// stream is polled again as soon as they are made.
    ///
    /// The state of a backend the stream removes is kept for
    /// [`keep_removed_for`](Self::keep_removed_for) (60 s by default): if
    /// the stream (or anyone) inserts the same id within that time, the
    /// backend comes back as it was, rather than as a new backend that
    /// forgot its operator's status, limit and requests in flight.
    ///
    /// Run it as a task beside the balancer:
    ///
    /// ```
    /// # async fn doc() {
    /// use tower::discover::{Change, ServiceList};
    /// use tower::service_fn;
    /// use tower_ha::Pool;
    ///
    /// let svc = service_fn(|_req: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
    /// });
    /// let pool = Pool::new();
    /// let changes = futures::stream::iter([
    ///     Ok::<_, std::convert::Infallible>(Change::Insert("a", svc.clone())),
    ///     Ok(Change::Insert("b", svc)),
    ///     Ok(Change::Remove("a")),
    /// ]);
    /// pool.discover(changes).await.unwrap();
    /// assert_eq!(pool.ids(), vec!["b".into()]);
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(doc());
    /// ```
    pub async fn discover<D>(&self, discover: D) -> Result<(), D::Error>
    where
        D: Discover<Service = S>,
        D::Key: Into<BackendId>,
    {
        let mut discover = pin!(discover);
        let mut batch = Vec::new();
        loop {
            // Every change ready now, however many a stream's answer
            // holds, or nothing until one is.
            let next = poll_fn(|cx| loop {
                match discover.as_mut().poll_discover(cx) {
                    Poll::Ready(Some(Ok(change))) => batch.push(change),
                    Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending if batch.is_empty() => return Poll::Pending,
                    Poll::Pending => return Poll::Ready(Some(Ok(()))),
                }
            })
            .await;
            if !batch.is_empty() {
                self.apply(batch.drain(..));
            }
            match next {
                Some(Ok(())) => {}
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            }
        }
    }

    /// Makes the changes of a discovery stream as one change of membership:
    /// one snapshot, one rebuild of each balancer's table, whatever their
    /// number, and no membership half way through them.
    fn apply<K: Into<BackendId>>(&self, changes: impl Iterator<Item = Change<K, S>>) {
        self.change(|members, services| {
            let mut changed = false;
            for change in changes {
                changed |= match change {
                    Change::Insert(key, service) => {
                        (self.upsert_in(members, services, key.into(), service, None, true, |_| {}))
                            .0
                    }
                    Change::Remove(key) => self.remove_in(members, services, &key.into(), true).0,
                };
            }
            changed
        });
    }

    /// Builds a new snapshot with `edit` and swaps it in, then lets every
    /// listener rebuild. Writers are serialized; readers never wait.
    fn change(&self, edit: impl FnOnce(&mut Vec<Member>, &mut Vec<S>) -> bool) {
        let mut listeners = self.shared.writer.lock();
        let old = self.shared.current.load();
        let mut members = old.members.list.clone();
        let mut services = old.services.clone();
        if !edit(&mut members, &mut services) {
            // Nothing changed: no new generation, no table rebuilt, no
            // waiter woken.
            return;
        }
        let next = Arc::new(Snapshot {
            members: Members::from_list(members),
            services,
            generation: old.generation + 1,
        });
        drop(old);
        if let Some(room) = self.shared.room.get() {
            // A backend leaving takes no more places before readers see it
            // gone: a waiter handed one would find no backend for it, hand
            // it back and be given it again until the queue heard.
            for state in room.keep_members(&next.members) {
                state.unlink_room(room);
            }
        }
        self.shared.current.store(next.clone());
        listeners.retain(|l| match l.upgrade() {
            Some(l) => {
                // A strategy whose table build panics leaves its balancer
                // on the previous membership, logged; the change goes on for
                // the other balancers and the queue, and the caller (a
                // health checker's or discovery's task, say) lives on.
                let rebuilt = std::panic::catch_unwind(AssertUnwindSafe(|| l.rebuild(&next)));
                if rebuilt.is_err() {
                    tracing::error!(
                        generation = next.generation,
                        "a balancer's strategy panicked building its table; that balancer keeps its previous membership until the next change"
                    );
                }
                true
            }
            None => false,
        });
        if let Some(room) = self.shared.room.get() {
            // A new backend is a new place to wait for, once the
            // balancers know it.
            link(room, &next.members);
            room.wake_all(None);
        }
    }
}

impl<S> Drop for Shared<S> {
    fn drop(&mut self) {
        // The pool's backends may live on in other pools, whose queues
        // then get their places.
        if let Some(room) = self.room.get() {
            for member in self.current.load().members.iter() {
                member.state.unlink_room(room);
            }
        }
    }
}

fn link(room: &Arc<Room>, members: &Members) {
    for member in members.iter() {
        member.state.link_room(room);
    }
    room.set_members(members);
}

impl<S: 'static> Pool<S> {
    /// Registers `listener`, which rebuilds now and on every change until it
    /// is dropped.
    pub(crate) fn subscribe(&self, listener: Weak<dyn Rebuild<S>>) {
        let mut listeners = self.shared.writer.lock();
        if let Some(l) = listener.upgrade() {
            l.rebuild(&self.shared.current.load_full());
            // Balancers dropped since the last change (one per connection,
            // say) leave before the list grows: it stays within twice the
            // most balancers alive at once, at a cost amortized over the
            // pushes, however long membership stays the same.
            if listeners.len() == listeners.capacity() {
                listeners.retain(|l| l.strong_count() > 0);
                // The next clean-up at least as many pushes away as are
                // left.
                let live = listeners.len();
                listeners.reserve(live);
            }
            listeners.push(listener);
        }
    }
}

impl<S: Clone, K: Into<BackendId>> FromIterator<(K, S)> for Pool<S> {
    fn from_iter<I: IntoIterator<Item = (K, S)>>(iter: I) -> Self {
        let pool = Pool::new();
        pool.change(|members, services| {
            for (id, service) in iter {
                let id = id.into();
                match members.iter().position(|m| m.id == id) {
                    Some(i) => services[i] = service,
                    None => {
                        members.push(Member::new(id, Arc::new(BackendState::new(1)), true));
                        services.push(service);
                    }
                }
            }
            true
        });
        pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state is linked to the queue of each pool with one that holds
    /// it, and to no other: not to one it left, nor to one dropped.
    #[test]
    fn a_state_is_linked_to_the_queues_of_the_pools_that_hold_it() {
        let first: Pool<u8> = Pool::new();
        first.insert("a", 1);
        first.open_room();
        let state = first.state(&"a".into()).unwrap();
        assert_eq!(state.rooms_linked(), 1);
        let second: Pool<u8> = Pool::new();
        second.insert_with_state("a", 1, state.clone());
        assert_eq!(state.rooms_linked(), 1, "the second pool has no queue");
        second.open_room();
        assert_eq!(state.rooms_linked(), 2);
        // Opened twice, inserted again: linked once.
        second.open_room();
        second.insert_with_state("a", 2, state.clone());
        assert_eq!(state.rooms_linked(), 2);
        drop(first);
        assert_eq!(state.rooms_linked(), 1, "the dropped pool's queue");
        assert!(second.remove(&"a".into()));
        assert_eq!(state.rooms_linked(), 0, "a pool the state left");
        second.insert_with_state("a", 3, state.clone());
        assert_eq!(state.rooms_linked(), 1, "back in the pool");
        // Replaced by a new state under the same id: the old one leaves.
        second.insert_with_state("a", 4, Arc::new(BackendState::new(1)));
        assert_eq!(state.rooms_linked(), 0);
        assert_eq!(second.state(&"a".into()).unwrap().rooms_linked(), 1);
    }

    #[test]
    fn changes_that_change_nothing_keep_the_snapshot() {
        let pool: Pool<u8> = Pool::new();
        pool.insert_weighted("a", 1, 2);
        let generation = pool.snapshot().generation();
        assert!(!pool.remove(&"absent".into()));
        assert!(!pool.set_weight(&"absent".into(), 5));
        assert!(pool.set_weight(&"a".into(), 2));
        assert!(!pool.insert_new("a".into(), 9, |_| {}));
        assert_eq!(pool.snapshot().generation(), generation);
        assert_eq!(pool.snapshot().service(0), Some(&1));
        assert!(pool.set_weight(&"a".into(), 3));
        assert_eq!(pool.snapshot().generation(), generation + 1);
    }

    /// A weight set through one pool rebuilds every pool that shares the
    /// backend's state, when each is told (as `Handle::set_weight` tells
    /// every group).
    #[test]
    fn a_weight_change_rebuilds_each_pool_sharing_the_state() {
        let first: Pool<u8> = Pool::new();
        first.insert("a", 1);
        let second: Pool<u8> = Pool::new();
        second.insert_with_state("a", 1, first.state(&"a".into()).unwrap());
        let generation = second.snapshot().generation();
        assert!(first.set_weight(&"a".into(), 3));
        assert!(second.set_weight(&"a".into(), 3));
        assert_eq!(second.snapshot().generation(), generation + 1);
        assert!(second.set_weight(&"a".into(), 3));
        assert_eq!(second.snapshot().generation(), generation + 1);
    }

    #[test]
    fn membership_changes_swap_whole_snapshots() {
        let pool: Pool<u8> = Pool::new();
        pool.insert("a", 1);
        let before = pool.snapshot();
        pool.insert("b", 2);
        pool.insert("a", 3);
        // The old snapshot is untouched.
        assert_eq!(before.len(), 1);
        assert_eq!(before.service(0), Some(&1));
        let now = pool.snapshot();
        assert_eq!(
            now.ids().cloned().collect::<Vec<_>>(),
            ["a".into(), "b".into()]
        );
        assert_eq!(now.service(0), Some(&3));
        assert!(now.generation() > before.generation());
    }

    #[test]
    fn replacing_a_service_keeps_its_state() {
        let pool: Pool<u8> = Pool::new();
        pool.insert("a", 1);
        let state = pool.state(&"a".into()).unwrap();
        pool.insert("a", 2);
        assert!(Arc::ptr_eq(&state, &pool.state(&"a".into()).unwrap()));
    }

    #[test]
    fn remove_and_weights() {
        let pool: Pool<u8> = [("a", 1), ("b", 2), ("c", 3)].into_iter().collect();
        assert!(pool.set_weight(&"b".into(), 5));
        assert!(!pool.set_weight(&"z".into(), 5));
        assert_eq!(pool.state(&"b".into()).unwrap().weight(), 5);
        assert!(pool.remove(&"b".into()));
        assert!(!pool.remove(&"b".into()));
        assert_eq!(pool.ids(), vec!["a".into(), "c".into()]);
        let snap = pool.snapshot();
        assert_eq!(snap.members().index_of(&"c".into()), Some(1));
        assert_eq!(snap.service(1), Some(&3));
    }

    #[test]
    fn a_discovered_removal_keeps_the_state_for_its_return() {
        let leave_and_return = |pool: &Pool<u8>| {
            let changes = futures::stream::iter([
                Ok::<_, std::convert::Infallible>(Change::Remove("a")),
                Ok(Change::Insert("a", 2)),
            ]);
            futures::executor::block_on(pool.discover(changes)).unwrap();
        };
        let pool: Pool<u8> = Pool::new();
        pool.insert_weighted("a", 1, 3);
        let state = pool.state(&"a".into()).unwrap();
        leave_and_return(&pool);
        assert!(Arc::ptr_eq(&state, &pool.state(&"a".into()).unwrap()));
        assert_eq!(state.weight(), 3);
        // A removal by hand forgets it.
        assert!(pool.remove(&"a".into()));
        pool.insert("a", 3);
        let fresh = pool.state(&"a".into()).unwrap();
        assert!(!Arc::ptr_eq(&state, &fresh));
        assert_eq!(fresh.weight(), 1);
        // A window of zero keeps nothing.
        let pool = pool.keep_removed_for(Duration::ZERO);
        leave_and_return(&pool);
        assert!(!Arc::ptr_eq(&fresh, &pool.state(&"a".into()).unwrap()));
    }

    #[test]
    fn a_removal_by_hand_forgets_a_state_discovery_kept() {
        let pool: Pool<u8> = Pool::new();
        pool.insert("a", 1);
        let state = pool.state(&"a".into()).unwrap();
        let gone = futures::stream::iter([Ok::<_, std::convert::Infallible>(Change::Remove("a"))]);
        futures::executor::block_on(pool.discover(gone)).unwrap();
        // Already out of the pool, but its state kept: forgotten all the same.
        assert!(!pool.remove(&"a".into()));
        pool.insert("a", 2);
        assert!(!Arc::ptr_eq(&state, &pool.state(&"a".into()).unwrap()));
    }

    #[test]
    fn dropped_listeners_do_not_pile_up_while_membership_stays() {
        struct Listener;
        impl Rebuild<u8> for Listener {
            fn rebuild(&self, _: &Arc<Snapshot<u8>>) {}
        }
        let pool: Pool<u8> = Pool::new();
        pool.insert("a", 1);
        let kept: Vec<Arc<Listener>> = (0..3).map(|_| Arc::new(Listener)).collect();
        for l in &kept {
            pool.subscribe(Arc::downgrade(l) as Weak<dyn Rebuild<u8>>);
        }
        for _ in 0..10_000 {
            let gone = Arc::new(Listener);
            pool.subscribe(Arc::downgrade(&gone) as Weak<dyn Rebuild<u8>>);
        }
        let listeners = pool.shared.writer.lock();
        assert!(listeners.len() <= 8, "{} listeners", listeners.len());
        let live = listeners.iter().filter(|l| l.strong_count() > 0).count();
        assert_eq!(live, kept.len());
    }

    #[test]
    fn remove_if_enabled_spares_a_backend_inserted_since() {
        let pool: Pool<u8> = Pool::new();
        pool.insert("a", 1);
        let old = pool.state(&"a".into()).unwrap();
        let new = Arc::new(BackendState::new(1));
        pool.insert_with_state("a", 2, new.clone());
        assert!(!pool.remove_if_enabled(&"a".into(), &old));
        assert!(pool.contains(&"a".into()));
        assert!(pool.remove_if_enabled(&"a".into(), &new));
        assert!(!pool.contains(&"a".into()));
    }

    /// The status is read under the lock a control action takes to set
    /// it, not before: a backend disabled or drained as the removal comes
    /// stays, with the operator's decision.
    #[test]
    fn remove_if_enabled_spares_a_backend_the_operator_took_out() {
        let pool: Pool<u8> = Pool::new();
        pool.insert("a", 1);
        let a = BackendId::from("a");
        let state = pool.state(&a).unwrap();
        for admin in [AdminStatus::Disabled, AdminStatus::Draining] {
            let (set, live, was) = pool.set_admin_of(&a, admin).unwrap();
            assert!(Arc::ptr_eq(&set, &state) && live);
            assert_eq!(was, AdminStatus::Enabled);
            assert!(!pool.remove_if_enabled(&a, &state));
            assert_eq!(pool.state(&a).unwrap().admin(), admin);
            state.set_admin(AdminStatus::Enabled);
        }
        // A disable made while the removal waits for the lock, after any
        // look it could have taken before it.
        let writer = pool.shared.writer.lock();
        let removal = std::thread::spawn({
            let (pool, a, state) = (pool.clone(), a.clone(), state.clone());
            move || pool.remove_if_enabled(&a, &state)
        });
        std::thread::sleep(Duration::from_millis(50));
        state.set_admin(AdminStatus::Disabled);
        drop(writer);
        assert!(!removal.join().unwrap(), "spared");
        state.set_admin(AdminStatus::Enabled);
        assert!(pool.remove_if_enabled(&a, &state));
        assert!(pool.set_admin_of(&a, AdminStatus::Disabled).is_none());
    }
}
