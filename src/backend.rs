//! Backend identity and the shared, lock-free state of one backend.
//!
//! A [`BackendId`] names a backend stably (a name, never an address that can
//! change). A [`BackendState`] holds everything about a backend that changes
//! while requests flow: its administrative status, its health, its in-flight
//! count, its consecutive failures, an ejection deadline and its effective
//! weight. All of it lives in atomics inside one `Arc<BackendState>` that the
//! pool snapshot, the health layer, the health checker and the control handle
//! share, so a health change never rebuilds the pool snapshot and readers
//! never take a lock.

use std::borrow::Borrow;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::balance::queue::Room;
use crate::serial::Serial;

/// The stable name of a backend.
///
/// Cheap to clone (a reference-counted string), hashable, comparable, and
/// serialized as a plain string. Positions on a consistent-hash ring derive
/// from it, so two replicas that name their backends alike agree on every
/// key.
///
/// ```
/// use tower_ha::BackendId;
///
/// let id = BackendId::from("node-a");
/// assert_eq!(id.as_str(), "node-a");
/// assert_eq!(id.to_string(), "node-a");
/// assert_eq!(id, BackendId::from(String::from("node-a")));
/// ```
#[derive(Clone, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackendId(Arc<str>);

impl BackendId {
    /// Creates an id from anything that converts into a string.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        BackendId(id.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether both are clones of one id (which implies they are equal).
    #[inline]
    pub(crate) fn same_allocation(&self, other: &BackendId) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl PartialEq for BackendId {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        // Ids are usually clones of one allocation: compare pointers first.
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for BackendId {}

impl std::hash::Hash for BackendId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl Borrow<str> for BackendId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for BackendId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for BackendId {
    fn from(s: &str) -> Self {
        BackendId(Arc::from(s))
    }
}

impl From<String> for BackendId {
    fn from(s: String) -> Self {
        BackendId(Arc::from(s))
    }
}

impl From<&String> for BackendId {
    fn from(s: &String) -> Self {
        BackendId(Arc::from(s.as_str()))
    }
}

impl From<Arc<str>> for BackendId {
    fn from(s: Arc<str>) -> Self {
        BackendId(s)
    }
}

/// The operator's wish for a backend, set through the control handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AdminStatus {
    /// Takes new requests and new sessions.
    Enabled,
    /// Takes no new requests or sessions; requests in flight finish.
    Draining,
    /// Takes nothing: a manual override.
    Disabled,
}

/// What health checking currently believes about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HealthStatus {
    /// Serving. The state of every backend no health check has judged yet,
    /// but for those a [`HealthChecker`](crate::health::HealthChecker) with
    /// `start_unhealthy` holds back until their first probes pass.
    Healthy,
    /// Failing its checks: no traffic.
    Unhealthy,
    /// Unhealthy for so long that it was marked turned off. It is still
    /// probed and comes back on its own once healthy.
    TurnedOff,
}

const ADMIN_SHIFT: u8 = 0;
const HEALTH_SHIFT: u8 = 4;
const NIBBLE: u8 = 0x0f;

impl AdminStatus {
    fn to_bits(self) -> u8 {
        match self {
            AdminStatus::Enabled => 0,
            AdminStatus::Draining => 1,
            AdminStatus::Disabled => 2,
        }
    }

    fn from_bits(bits: u8) -> Self {
        match bits {
            0 => AdminStatus::Enabled,
            1 => AdminStatus::Draining,
            _ => AdminStatus::Disabled,
        }
    }
}

impl HealthStatus {
    fn to_bits(self) -> u8 {
        match self {
            HealthStatus::Healthy => 0,
            HealthStatus::Unhealthy => 1,
            HealthStatus::TurnedOff => 2,
        }
    }

    fn from_bits(bits: u8) -> Self {
        match bits {
            0 => HealthStatus::Healthy,
            1 => HealthStatus::Unhealthy,
            _ => HealthStatus::TurnedOff,
        }
    }
}

/// The shared, mutable state of one backend.
///
/// Every field is an atomic: the balancer reads it on the request path
/// without a lock, and the health layer, the health checker and the control
/// handle write it from wherever they run. Time is measured with
/// [`tokio::time::Instant`], so tests can pause and advance it.
pub struct BackendState {
    /// Admin status in the low nibble, health in the high nibble: one load
    /// answers "may this backend take traffic?" in the common case.
    status: AtomicU8,
    in_flight: AtomicUsize,
    /// The most requests a balancer's strategy may have in flight here;
    /// `usize::MAX` for no limit.
    max_in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    requests: AtomicU64,
    failures: AtomicU64,
    ejections: AtomicU32,
    /// Ejections the cap on ejected backends refused.
    ejections_refused: AtomicU64,
    /// Times the backend stopped being available: its status left
    /// enabled-and-healthy, or an ejection began.
    interruptions: AtomicU32,
    /// Nanoseconds after `epoch` until which the backend is ejected; 0 when
    /// it is not ejected.
    ejected_until: AtomicU64,
    weight: AtomicU32,
    /// Effective weight in thousandths of the configured weight (1000 = full
    /// weight); below 1000 during slow start.
    weight_permille: AtomicU32,
    epoch: Instant,
    /// The queues of the pools holding this backend whose balancers let
    /// requests wait for a place; made at the first link.
    rooms: OnceLock<ArcSwap<Vec<Arc<Room>>>>,
    /// Whether `rooms` is made: what a request's end reads (once or
    /// twice, see `InFlight`'s drop) where no pool has a queue.
    linked: AtomicBool,
    /// Whether the backend started unhealthy, waiting for its first
    /// passing probes, and has not been healthy since.
    unproven: AtomicBool,
    /// Tells this state from any other of the process, as its address
    /// cannot once it is freed.
    serial: Serial,
    /// Tells the tunnels open to the backend to close (see
    /// [`close_tunnels`](BackendState::close_tunnels)).
    tunnels: Arc<tokio::sync::Notify>,
}

impl BackendState {
    /// A new backend: enabled, healthy, not ejected, with the given weight
    /// (a weight of 0 is raised to 1).
    pub fn new(weight: u32) -> Self {
        BackendState {
            status: AtomicU8::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(usize::MAX),
            consecutive_failures: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            ejections_refused: AtomicU64::new(0),
            interruptions: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            weight: AtomicU32::new(weight.max(1)),
            weight_permille: AtomicU32::new(1000),
            epoch: Instant::now(),
            rooms: OnceLock::new(),
            linked: AtomicBool::new(false),
            unproven: AtomicBool::new(false),
            serial: Serial::take(),
            tunnels: Arc::default(),
        }
    }

    /// Closes the tunnels open to this backend now, both of their
    /// connections: the protocol switches (WebSockets) that
    /// [`HttpBackend`](crate::http::HttpBackend) joined to it, which
    /// otherwise last until a side closes or goes quiet for the client's
    /// `tunnel_idle_timeout`, whatever the backend's status. A tunnel
    /// opened later is not affected. Their clients reconnect, through the
    /// balancer, to a backend that may take them (as HAProxy's `shutdown
    /// sessions server` does). The control [`Handle`](crate::control::Handle)
    /// calls this at a drain's deadline; see also
    /// [`Handle::close_tunnels`](crate::control::Handle::close_tunnels).
    pub fn close_tunnels(&self) {
        self.tunnels.notify_waiters();
    }

    /// Resolves at the next [`close_tunnels`](Self::close_tunnels) called
    /// after it was made, wherever it is awaited then: for a backend
    /// service of your own that holds tunnels, to close them when told.
    /// Make it when the tunnel opens, before it is handed to a task of its
    /// own (a call before it was made is missed).
    pub fn tunnels_closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.tunnels.clone().notified_owned()
    }

    /// Whether the backend may take a new request now: enabled, healthy and
    /// not ejected.
    ///
    /// Reads the clock only when the backend has an ejection deadline.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.status.load(Ordering::Acquire) == 0 && !self.is_ejected()
    }

    /// Whether the operator lets this backend take new requests, whatever
    /// its health: what panic routing still respects.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.status.load(Ordering::Acquire) & NIBBLE == 0
    }

    /// Whether the backend is draining but still healthy and not ejected:
    /// it takes no new request, yet finishes the sessions bound to it.
    #[inline]
    pub fn is_draining_but_serving(&self) -> bool {
        self.status.load(Ordering::Acquire) == AdminStatus::Draining.to_bits() << ADMIN_SHIFT
            && !self.is_ejected()
    }

    /// The operator's status.
    pub fn admin(&self) -> AdminStatus {
        AdminStatus::from_bits((self.status.load(Ordering::Acquire) >> ADMIN_SHIFT) & NIBBLE)
    }

    /// Sets the operator's status; returns the previous one.
    pub fn set_admin(&self, admin: AdminStatus) -> AdminStatus {
        let prev = self.update_nibble(ADMIN_SHIFT, admin.to_bits());
        self.wake_waiting();
        AdminStatus::from_bits(prev)
    }

    /// The health as judged by checks.
    pub fn health(&self) -> HealthStatus {
        HealthStatus::from_bits((self.status.load(Ordering::Acquire) >> HEALTH_SHIFT) & NIBBLE)
    }

    /// Sets the health; returns the previous value.
    pub fn set_health(&self, health: HealthStatus) -> HealthStatus {
        self.change_health(|_| true, health)
            .unwrap_or_else(|held| held)
    }

    /// Sets the health to `to` if it is `from`; returns whether it did.
    /// Of two writers of one state (two checkers sharing it) that both
    /// judged it `from`, exactly one changes it, and only that one reports
    /// the change.
    pub(crate) fn set_health_if(&self, from: HealthStatus, to: HealthStatus) -> bool {
        self.change_health(|health| health == from, to).is_ok()
    }

    /// Sets the health to `to` if `from` accepts the one it holds:
    /// `Ok(previous)`, or `Err(held)` when it was left alone.
    fn change_health(
        &self,
        from: impl Fn(HealthStatus) -> bool,
        to: HealthStatus,
    ) -> Result<HealthStatus, HealthStatus> {
        let changed = self.update_nibble_if(
            HEALTH_SHIFT,
            |bits| from(HealthStatus::from_bits(bits)),
            to.to_bits(),
        );
        if changed.is_ok() {
            // Proven only by a change made (not one another writer beat).
            // A reader that sees the backend healthy a moment before this
            // may still see it unproven: a priority group then waits one
            // more pick before it takes the backend for one that has been
            // up, which it does not need while the backend is available.
            if to == HealthStatus::Healthy && self.unproven.load(Ordering::Relaxed) {
                self.unproven.store(false, Ordering::Relaxed);
            }
            self.wake_waiting();
        }
        changed
            .map(HealthStatus::from_bits)
            .map_err(HealthStatus::from_bits)
    }

    /// Marks a new backend unhealthy until its first passing probes.
    pub(crate) fn start_unproven(&self) {
        self.unproven.store(true, Ordering::Relaxed);
        self.set_health(HealthStatus::Unhealthy);
    }

    /// Whether the backend started unhealthy, waiting for its first passing
    /// probes ([`HealthChecker::start_unhealthy`]), and has not been healthy
    /// since: it has never served.
    pub(crate) fn is_unproven(&self) -> bool {
        self.unproven.load(Ordering::Relaxed)
    }

    fn update_nibble(&self, shift: u8, bits: u8) -> u8 {
        self.update_nibble_if(shift, |_| true, bits)
            .unwrap_or_else(|held| held)
    }

    /// Sets the nibble at `shift` to `bits` if `from` accepts the one it
    /// holds: `Ok(previous)`, or `Err(held)` when it was left alone.
    fn update_nibble_if(&self, shift: u8, from: impl Fn(u8) -> bool, bits: u8) -> Result<u8, u8> {
        let mask = NIBBLE << shift;
        let nibble = |s: u8| (s >> shift) & NIBBLE;
        let prev = self
            .status
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                from(nibble(s)).then_some((s & !mask) | (bits << shift))
            });
        if prev == Ok(0) && bits != 0 {
            self.interruptions.fetch_add(1, Ordering::Relaxed);
        }
        prev.map(nibble).map_err(nibble)
    }

    /// How many times the backend has stopped being available (its
    /// status left enabled and healthy, or an ejection began): a count
    /// that changed between two looks says it was out meanwhile, however
    /// briefly.
    pub(crate) fn interruptions(&self) -> u32 {
        self.interruptions.load(Ordering::Relaxed)
    }

    /// Requests sent to this backend whose responses have not completed.
    #[inline]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one more request sent, and in flight until the guard is
    /// dropped.
    #[inline]
    pub fn track_in_flight(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.hold_in_flight()
    }

    /// Counts one more request in flight, not as one more sent, until the
    /// guard is dropped: for a backend service whose exchange goes on after
    /// it has handed back the response's head, such as a streamed body or
    /// a WebSocket, so that least-request balancing and
    /// [limits](Self::set_max_in_flight) see it. Take the state from the
    /// request's [`Target`](crate::extensions::Target) and the guard before
    /// handing the head back, so that the count never drops in between.
    /// `http::HttpBackend` (feature `hyper-client`) holds one for every
    /// response body until it has been read or dropped (a failed response
    /// that the failover layer keeps while it retries included), and for
    /// every tunnel until it closes. Behind nested balancers, the backend
    /// held is the innermost one's (the last `Target` set).
    #[inline]
    pub fn hold_in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Counts one more request sent and in flight, as
    /// [`track_in_flight`](Self::track_in_flight) does, unless the backend
    /// already has its [`max_in_flight`](Self::max_in_flight): then `None`.
    /// The check and the count are one atomic step, so concurrent callers
    /// never exceed the limit together.
    #[inline]
    #[must_use = "the in-flight count goes down again when the guard is dropped"]
    pub fn try_track_in_flight(self: &Arc<Self>) -> Option<InFlight> {
        let max = self.max_in_flight.load(Ordering::Relaxed);
        if max == usize::MAX {
            return Some(self.track_in_flight());
        }
        self.in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        Some(InFlight(self.clone()))
    }

    /// The place of a request that is ending, for another request: counted
    /// as one more request sent, and still in flight. `None` when the
    /// limit was lowered below the requests in flight: then the place is
    /// given up.
    pub(crate) fn pass_place(self: &Arc<Self>) -> Option<InFlight> {
        let (in_flight, max) = (
            self.in_flight.load(Ordering::Relaxed),
            self.max_in_flight.load(Ordering::Relaxed),
        );
        (in_flight <= max).then(|| {
            self.requests.fetch_add(1, Ordering::Relaxed);
            InFlight(self.clone())
        })
    }

    /// The most requests a balancer's strategy sends to this backend at
    /// once, if limited (see [`set_max_in_flight`](Self::set_max_in_flight)).
    pub fn max_in_flight(&self) -> Option<usize> {
        match self.max_in_flight.load(Ordering::Relaxed) {
            usize::MAX => None,
            max => Some(max),
        }
    }

    /// Limits the requests a balancer's strategy sends to this backend at
    /// once (no limit by default, and `None` or `usize::MAX` lifts it; a
    /// limit of 0 counts as 1). A backend at
    /// its limit is skipped as if it were unavailable, until one of its
    /// requests is no longer in flight. When every available backend is at
    /// its limit, a request waits for a place in the balancer's queue, if
    /// it has one ([`Balance::queue`](crate::balance::Balance::queue)), and
    /// otherwise fails at once with [`NoBackend`](crate::error::NoBackend)
    /// (whose [`is_at_limit`](crate::error::NoBackend::is_at_limit) is
    /// true). A request for a session
    /// bound to this backend (an [`Affinity`](crate::extensions::Affinity))
    /// still reaches it: moving a session for a burst would lose its
    /// state. Requests already in flight count against a new limit.
    ///
    /// A request is in flight, as [`in_flight`](Self::in_flight) counts it,
    /// until its response's head has come (or its error), and for as long
    /// after as its backend service [holds](Self::hold_in_flight) it:
    /// `http::HttpBackend` does until the response's body has been read or
    /// dropped, and a tunnel such as a WebSocket until it closes, as
    /// nginx's `max_conns` and HAProxy's `maxconn` count connections until
    /// the response is sent.
    ///
    /// The limit belongs to this state: a backend in two pools, each with
    /// its own state, has a limit, and a count, in each.
    pub fn set_max_in_flight(&self, max: Option<usize>) {
        let max = max.map_or(usize::MAX, |m| m.max(1));
        self.max_in_flight.store(max, Ordering::Relaxed);
        self.wake_waiting();
    }

    /// A number no other state of this process has.
    pub(crate) fn serial(&self) -> Serial {
        self.serial
    }

    /// Links this backend to the queue of a pool that holds it, for as
    /// long as the pool holds it (see [`unlink_room`](Self::unlink_room)).
    ///
    /// The pool then offers the places that may have opened here to its
    /// waiting requests (`Room::wake_all`, after a fence). A request that
    /// ends meanwhile reads the links again after freeing its place (see
    /// `InFlight`'s drop): one of the two sees the other's change, so the
    /// place is not left free while requests wait for it.
    pub(crate) fn link_room(&self, room: &Arc<Room>) {
        let rooms = self.rooms.get_or_init(ArcSwap::default);
        self.linked.store(true, Ordering::SeqCst);
        if rooms.load().iter().any(|r| Arc::ptr_eq(r, room)) {
            return;
        }
        rooms.rcu(|list| {
            let mut list = Vec::clone(list);
            if !list.iter().any(|r| Arc::ptr_eq(r, room)) {
                list.push(room.clone());
            }
            list
        });
    }

    /// Unlinks this backend from the queue of a pool that no longer holds
    /// it, or that is gone: its places go to the queues of the pools that
    /// still hold it.
    pub(crate) fn unlink_room(&self, room: &Arc<Room>) {
        let Some(rooms) = self.rooms.get() else {
            return;
        };
        if !rooms.load().iter().any(|r| Arc::ptr_eq(r, room)) {
            return;
        }
        rooms.rcu(|list| {
            let mut list = Vec::clone(list);
            list.retain(|r| !Arc::ptr_eq(r, room));
            list
        });
    }

    /// How many queues this backend is linked to.
    #[cfg(test)]
    pub(crate) fn rooms_linked(&self) -> usize {
        self.rooms.get().map_or(0, |rooms| rooms.load().len())
    }

    /// Hands the places a change may have made here to the requests
    /// waiting for one, in order, and lets the others pick again.
    fn wake_waiting(&self) {
        if let Some(rooms) = self.rooms.get() {
            for room in rooms.load().iter() {
                room.wake_all(Some(self));
            }
        }
    }

    /// Whether the backend is below its [`max_in_flight`](Self::max_in_flight).
    #[inline]
    pub fn has_room(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) < self.max_in_flight.load(Ordering::Relaxed)
    }

    /// Failures observed in a row since the last success. The health
    /// layer leaves out those it sees while the backend is ejected: they
    /// do not count towards its next ejection.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Requests sent to this backend so far (counted by
    /// [`track_in_flight`](Self::track_in_flight), which `Balance` calls once
    /// per request it picks this backend for; a request whose backend did
    /// not get ready, or that was dropped while it waited, is taken back,
    /// and one whose backend's `call` panicked is not: it may have been
    /// sent).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Failures recorded so far (by the health layer's classifier).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Records a failure; returns the new count of consecutive failures.
    pub fn record_failure(&self) -> u32 {
        self.count_failure();
        // Saturating: a backend failing for ever (ejection refused by the
        // cap, or panic routing) must not wrap to 0.
        let before = self
            .consecutive_failures
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or_else(|n| n);
        before.saturating_add(1)
    }

    /// Counts a failure in [`failures`](Self::failures) alone, not among
    /// the consecutive ones.
    pub(crate) fn count_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a success: the consecutive failure count starts again at 0.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Release);
        }
    }

    /// How many times this backend has been ejected.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// How many times the health layer would have ejected this backend
    /// but the cap on ejected backends (`max_ejection_percent`) kept it in:
    /// each failure at or past its threshold of failures in a row, and
    /// each window judged below its success rate, while the cap was full.
    pub fn ejections_refused(&self) -> u64 {
        self.ejections_refused.load(Ordering::Relaxed)
    }

    /// Counts an ejection the cap refused.
    pub(crate) fn count_refused_ejection(&self) {
        self.ejections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Ejects the backend until `until` and counts the ejection.
    pub fn eject_until(&self, until: Instant) {
        let nanos = crate::time::to_nanos(self.epoch, until);
        // Counted before its deadline is published: whoever reads the
        // deadline sees the count (see `uneject_if`).
        self.ejections.fetch_add(1, Ordering::AcqRel);
        self.ejected_until.store(nanos, Ordering::Release);
        self.interruptions.fetch_add(1, Ordering::Relaxed);
        // Those waiting for a place may have no backend left to wait for.
        self.wake_waiting();
    }

    /// The instant the current ejection ends, if the backend is ejected now.
    pub fn ejected_until(&self) -> Option<Instant> {
        let nanos = self.ejected_until.load(Ordering::Acquire);
        let until = crate::time::from_nanos(self.epoch, nanos)?;
        (Instant::now() < until).then_some(until)
    }

    /// When the backend, ejected now, becomes available if nothing else
    /// changes: the end of its ejection, when it is enabled and healthy.
    pub(crate) fn available_at(&self) -> Option<Instant> {
        match self.status.load(Ordering::Acquire) {
            0 => self.ejected_until(),
            _ => None,
        }
    }

    /// Lifts an ejection in force now, before its deadline; returns whether
    /// this call lifted it. An ejection that has already run out is left
    /// to end by itself: of this and that end racing over one ejection,
    /// exactly one happens, so the ejection's end is reported once.
    ///
    /// The ejection's end starts the count of
    /// [consecutive failures](Self::consecutive_failures) again: failures
    /// of requests that were in flight, or sent by panic routing, while the
    /// backend was ejected do not count towards its next ejection.
    pub fn uneject(&self) -> bool {
        self.lift(None)
    }

    /// [`uneject`](Self::uneject), but only while the backend's
    /// [ejections](Self::ejections) are `ejections`: an ejection that
    /// began since (a checker's probe was sent before it) is left in
    /// force, however the two race.
    pub(crate) fn uneject_if(&self, ejections: u32) -> bool {
        self.lift(Some(ejections))
    }

    fn lift(&self, ejections: Option<u32>) -> bool {
        let now = self.nanos_since_epoch(Instant::now());
        let mut current = self.ejected_until.load(Ordering::Acquire);
        while current != 0 && now < current {
            // The deadline read is published after its ejection's count:
            // a new ejection's shows here, and one published after this
            // look changes the deadline, which the exchange then misses.
            if ejections.is_some_and(|n| self.ejections.load(Ordering::Acquire) != n) {
                return false;
            }
            match self.ejected_until.compare_exchange_weak(
                current,
                0,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.consecutive_failures.store(0, Ordering::Release);
                    self.wake_waiting();
                    return true;
                }
                Err(seen) => current = seen,
            }
        }
        false
    }

    /// Whether the ejection that ends at `until` is the one in force (or
    /// ran out uncleared): not lifted, nor replaced by another.
    pub(crate) fn is_ejected_until(&self, until: Instant) -> bool {
        self.ejected_until.load(Ordering::Acquire) == crate::time::to_nanos(self.epoch, until)
    }

    /// Whether an ejection is in force, or ran out and has not been cleared
    /// yet (see [`take_expired_ejection`](Self::take_expired_ejection)):
    /// its end is still to be reported.
    pub(crate) fn has_uncleared_ejection(&self) -> bool {
        self.ejected_until.load(Ordering::Acquire) != 0
    }

    /// Clears an ejection that ran out by itself; returns whether this call
    /// cleared it (see [`uneject`](Self::uneject)). The count of
    /// consecutive failures it leaves alone: the health layer counts none
    /// during an ejection, so what it holds now came after its end.
    pub(crate) fn take_expired_ejection(&self) -> bool {
        let now = self.nanos_since_epoch(Instant::now());
        let current = self.ejected_until.load(Ordering::Acquire);
        let taken = current != 0
            && now >= current
            && self
                .ejected_until
                .compare_exchange(current, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if taken {
            self.wake_waiting();
        }
        taken
    }

    /// Whether an ejection is in force now.
    #[inline]
    pub fn is_ejected(&self) -> bool {
        let nanos = self.ejected_until.load(Ordering::Acquire);
        nanos != 0 && self.nanos_since_epoch(Instant::now()) < nanos
    }

    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        crate::time::nanos_since(self.epoch, at)
    }

    /// The configured weight (at least 1).
    #[inline]
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub(crate) fn store_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
    }

    /// The share of its configured weight the backend currently gets, in
    /// thousandths: 1000 normally, less while it warms up after a (re)start.
    #[inline]
    pub fn weight_permille(&self) -> u32 {
        self.weight_permille.load(Ordering::Relaxed)
    }

    /// Sets the effective share of the configured weight, in thousandths
    /// (clamped to 1..=1000).
    pub fn set_weight_permille(&self, permille: u32) {
        self.weight_permille
            .store(permille.clamp(1, 1000), Ordering::Relaxed);
    }

    /// The configured weight times the current effective share in
    /// thousandths: the effective weight in integers, for comparisons and
    /// draws without rounding.
    pub(crate) fn weight_units(&self) -> u64 {
        u64::from(self.weight()) * u64::from(self.weight_permille())
    }

    /// The configured weight scaled by the current effective share.
    pub fn effective_weight(&self) -> f64 {
        f64::from(self.weight()) * f64::from(self.weight_permille()) / 1000.0
    }
}

impl Default for BackendState {
    fn default() -> Self {
        BackendState::new(1)
    }
}

impl fmt::Debug for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendState")
            .field("admin", &self.admin())
            .field("health", &self.health())
            .field("in_flight", &self.in_flight())
            .field("max_in_flight", &self.max_in_flight())
            .field("consecutive_failures", &self.consecutive_failures())
            .field("ejected_until", &self.ejected_until())
            .field("weight", &self.weight())
            .field("weight_permille", &self.weight_permille())
            .finish()
    }
}

/// Counts a request as in flight on a backend until dropped.
#[must_use = "the in-flight count goes down again when this guard is dropped"]
#[derive(Debug)]
pub struct InFlight(Arc<BackendState>);

impl InFlight {
    /// The state of the backend this request is in flight on.
    pub(crate) fn state(&self) -> &Arc<BackendState> {
        &self.0
    }

    /// Lets go of a place taken for a request that will not use it: not
    /// counted as a request sent, and passed on to a waiting request.
    pub(crate) fn unused(self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    #[inline]
    fn drop(&mut self) {
        let state = &self.0;
        let rooms = || state.rooms.get().map(ArcSwap::load);
        // The place goes straight to a waiting request, never free in
        // between, so that a request arriving now cannot take it first.
        let linked = state.linked.load(Ordering::SeqCst);
        if linked && rooms().is_some_and(|rooms| rooms.iter().any(|r| r.take_over(state))) {
            return;
        }
        // Sequentially consistent, as the second read of the links below:
        // a queue linked since the first (see `link_room`) hears of it.
        state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if linked || state.linked.load(Ordering::SeqCst) {
            for room in rooms().iter().flat_map(|rooms| rooms.iter()) {
                room.released(state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn status_nibbles_are_independent() {
        let s = BackendState::new(1);
        assert!(s.is_available());
        assert_eq!(s.set_health(HealthStatus::Unhealthy), HealthStatus::Healthy);
        assert!(!s.is_available());
        assert!(s.is_enabled());
        assert_eq!(s.set_admin(AdminStatus::Draining), AdminStatus::Enabled);
        assert_eq!(s.health(), HealthStatus::Unhealthy);
        assert_eq!(s.admin(), AdminStatus::Draining);
        s.set_health(HealthStatus::Healthy);
        assert!(!s.is_available());
        assert!(!s.is_enabled());
        s.set_admin(AdminStatus::Enabled);
        assert!(s.is_available());
    }

    /// Of writers that judged the health the same, one changes it; a
    /// writer whose judgement is out of date changes nothing.
    #[test]
    fn a_conditional_health_change_happens_once() {
        let s = BackendState::new(1);
        assert!(!s.set_health_if(HealthStatus::Unhealthy, HealthStatus::TurnedOff));
        assert_eq!(s.health(), HealthStatus::Healthy);
        let before = s.interruptions();
        assert!(s.set_health_if(HealthStatus::Healthy, HealthStatus::Unhealthy));
        assert_eq!(s.interruptions(), before + 1);
        for _ in 0..200 {
            s.set_health(HealthStatus::Healthy);
            let won = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        if s.set_health_if(HealthStatus::Healthy, HealthStatus::Unhealthy) {
                            won.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            });
            assert_eq!(won.into_inner(), 1);
            assert_eq!(s.health(), HealthStatus::Unhealthy);
        }
    }

    /// A new backend is proven by the change to healthy that was made, not
    /// by one that found the health changed by another writer.
    #[test]
    fn only_a_change_made_proves_a_backend() {
        let s = BackendState::new(1);
        s.start_unproven();
        s.set_health(HealthStatus::TurnedOff);
        assert!(!s.set_health_if(HealthStatus::Unhealthy, HealthStatus::Healthy));
        assert!(s.is_unproven());
        assert!(s.set_health_if(HealthStatus::TurnedOff, HealthStatus::Healthy));
        assert!(!s.is_unproven());
    }

    /// A lift conditioned on the count of ejections leaves in force an
    /// ejection that began after the count was taken.
    #[tokio::test(start_paused = true)]
    async fn a_conditional_lift_leaves_a_later_ejection() {
        let s = BackendState::new(1);
        let at_probe = s.ejections();
        s.eject_until(Instant::now() + Duration::from_secs(30));
        assert!(!s.uneject_if(at_probe));
        assert!(s.is_ejected());
        assert!(s.uneject_if(at_probe + 1));
        assert!(!s.is_ejected());
        assert!(!s.uneject_if(at_probe + 1), "nothing left to lift");
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_ends_exactly_at_its_deadline() {
        let s = BackendState::new(1);
        let until = Instant::now() + Duration::from_secs(30);
        s.eject_until(until);
        assert!(!s.is_available());
        assert_eq!(s.ejected_until(), Some(until));
        tokio::time::advance(Duration::from_secs(30) - Duration::from_nanos(1)).await;
        assert!(!s.is_available());
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert!(s.is_available());
        assert_eq!(s.ejected_until(), None);
        assert_eq!(s.ejections(), 1);
    }

    /// Failures recorded once an ejection is over, before the request
    /// that clears it runs, are failures in a row since its end: they stay.
    #[tokio::test(start_paused = true)]
    async fn clearing_an_ejection_that_ran_out_keeps_the_failures_since() {
        let s = BackendState::new(1);
        s.eject_until(Instant::now() + Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(s.record_failure(), 1);
        assert!(s.take_expired_ejection());
        assert!(!s.take_expired_ejection(), "cleared once");
        assert_eq!(s.consecutive_failures(), 1);
    }

    #[test]
    fn in_flight_guard_counts() {
        let s = Arc::new(BackendState::new(1));
        let a = s.track_in_flight();
        let b = s.track_in_flight();
        assert_eq!(s.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn a_limit_of_requests_in_flight_is_never_exceeded() {
        let s = Arc::new(BackendState::new(1));
        assert_eq!(s.max_in_flight(), None);
        let unlimited: Vec<_> = (0..5).map(|_| s.try_track_in_flight().unwrap()).collect();
        // A new limit counts what is already in flight.
        s.set_max_in_flight(Some(3));
        assert!(!s.has_room());
        assert!(s.try_track_in_flight().is_none());
        drop(unlimited);
        assert!(s.has_room());
        assert_eq!(s.requests(), 5, "a refused request is not counted");
        // Eight threads race for three places, many times over.
        for _ in 0..200 {
            let held = std::sync::Mutex::new(Vec::new());
            let barrier = std::sync::Barrier::new(8);
            std::thread::scope(|scope| {
                for _ in 0..8 {
                    scope.spawn(|| {
                        barrier.wait();
                        if let Some(guard) = s.try_track_in_flight() {
                            held.lock().unwrap().push(guard);
                        }
                    });
                }
            });
            assert_eq!(held.lock().unwrap().len(), 3);
            assert_eq!(s.in_flight(), 3);
        }
        assert_eq!(s.in_flight(), 0);
        s.set_max_in_flight(Some(0));
        assert_eq!(s.max_in_flight(), Some(1));
        s.set_max_in_flight(None);
        assert_eq!(s.max_in_flight(), None);
    }

    #[test]
    fn consecutive_failures_reset_on_success() {
        let s = BackendState::new(1);
        assert_eq!(s.record_failure(), 1);
        assert_eq!(s.record_failure(), 2);
        s.record_success();
        assert_eq!(s.record_failure(), 1);
    }
}
