//! The protocol between layers: typed values in [`http::Extensions`].
//!
//! Each tower-ha layer is optional and usable alone because the layers talk
//! only through these values:
//!
//! | value | where | set by | read by |
//! |---|---|---|---|
//! | [`Affinity`] | request | `Sticky` (or you) | `Balance`: try this backend first |
//! | [`AffinityRequired`] | request | `Sticky` in strict mode (or you) | `Balance`: that backend or none |
//! | [`Attempts`] | request | `Failover` (or you) | `Balance`: never pick these again |
//! | [`Target`] | request | `Balance` | a per-backend layer such as `Health` |
//! | [`Picked`] | request | `Failover` inserts it, `Balance` fills it | `Failover`: who an abandoned attempt reached, and whether a retry could find a backend |
//! | [`ServedBy`] | response | `Balance` | `Sticky`, `Failover`, you |
//! | [`GaveUp`] | response | `Failover`: every attempt failed | `Sticky`: not a move |
//! | [`PeerAddr`] | request | your server | keys such as [`key::peer_ip`](crate::key::peer_ip) |
//!
//! Your own layers may set or read any of them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backend::{BackendId, BackendState};

/// "Try this backend first": set on a request by the sticky layer (or by
/// you). `Balance` honours it when that backend is in the pool, not already
/// listed in [`Attempts`], and available, or draining while healthy and not
/// ejected (the sessions bound to it finish there), or enabled while the
/// pool is in panic; even at its
/// [limit of requests in flight](crate::BackendState::set_max_in_flight).
/// Otherwise it picks as usual.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Affinity(pub BackendId);

/// With [`Affinity`], "this backend or none": when `Balance` cannot honour
/// the affinity (its backend is not in the pool, not eligible as
/// [`Affinity`] says, or already listed in [`Attempts`]), it fails the
/// request with [`NoBackend`](crate::NoBackend) instead of picking another
/// backend. A request that carries it without an `Affinity` is picked for
/// as usual.
///
/// The sticky layer's [strict mode](crate::sticky::StickyLayer::strict)
/// sets it, so that the check of a session's backend and the pick are one
/// step: a backend that becomes unavailable in between does not send the
/// request elsewhere, and a failover layer below does not retry it on
/// another backend.
///
/// `Balance` removes it from the request it sends to the backend it picked:
/// the requirement was its own, and a backend that is a balancer itself (a
/// nested group) has no member of that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AffinityRequired;

/// The backends already tried for this request, oldest first.
///
/// Kept by the failover layer. `Balance` never picks a backend listed here,
/// so successive attempts of one request go to distinct backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attempts(Vec<BackendId>);

impl Attempts {
    /// An empty list.
    pub fn new() -> Self {
        Attempts(Vec::new())
    }

    /// Records one more attempt.
    pub fn push(&mut self, id: BackendId) {
        self.0.push(id);
    }

    /// Whether `id` has been tried.
    #[inline]
    pub fn contains(&self, id: &BackendId) -> bool {
        self.0.iter().any(|tried| tried == id)
    }

    /// The tried backends, oldest first.
    pub fn as_slice(&self) -> &[BackendId] {
        &self.0
    }

    /// The most recent attempt.
    pub fn last(&self) -> Option<&BackendId> {
        self.0.last()
    }

    /// How many attempts were made.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no attempt was made yet.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<BackendId> for Attempts {
    fn from_iter<I: IntoIterator<Item = BackendId>>(iter: I) -> Self {
        Attempts(iter.into_iter().collect())
    }
}

/// The backend a request is being sent to, set by `Balance` just before it
/// calls the backend, so that a per-backend layer (the health layer, your
/// metrics) knows whose outcome it observes. A backend service whose
/// exchange goes on after the response's head (a streamed body, a
/// WebSocket) holds the backend in flight meanwhile with its state's
/// [`hold_in_flight`](BackendState::hold_in_flight).
#[derive(Debug, Clone)]
pub struct Target {
    id: BackendId,
    state: Arc<BackendState>,
}

impl Target {
    /// A target for the backend `id` with its shared state.
    pub fn new(id: BackendId, state: Arc<BackendState>) -> Self {
        Target { id, state }
    }

    /// The backend's id.
    pub fn id(&self) -> &BackendId {
        &self.id
    }

    /// The backend's shared state.
    pub fn state(&self) -> &Arc<BackendState> {
        &self.state
    }
}

/// The backend that produced a response, set by `Balance` on every response.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServedBy(pub BackendId);

/// Set on a response by the failover layer when every attempt failed and
/// it returns the last failed response (a 503, say): [`ServedBy`] names
/// the last backend tried, which failed the request too. The sticky layer
/// does not move a session there; it keeps it off its own backend when
/// that one failed first, as when the attempts end in an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GaveUp;

/// The address of the client that sent a request, for keys that route by
/// client address. Your server inserts it; tower-ha never guesses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// The scheme on which the client reached your server: `https` when your
/// server terminated TLS. Your server inserts it, beside [`PeerAddr`];
/// tower-ha never guesses it, and a request without it came over plain
/// `http` (the `:scheme` an HTTP/2 client sends is its own claim, not
/// this). `HttpBackend` sends it to the backend as `X-Forwarded-Proto`.
///
/// ```
/// use http::uri::Scheme;
/// use tower_ha::extensions::ClientScheme;
///
/// let mut req = http::Request::new(());
/// // In a server that accepted the connection over TLS:
/// req.extensions_mut().insert(ClientScheme(Scheme::HTTPS));
/// # assert!(req.extensions().get::<ClientScheme>().is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientScheme(pub http::uri::Scheme);

/// A slot in which a balancer records the backend it picks for an attempt.
///
/// The failover layer puts one in the request's extensions before an
/// attempt that it may have to abandon (a per-try timeout, a deadline),
/// or that a pause may follow (a [`Backoff`](crate::failover::Backoff)):
/// `Balance` then also says, at its pick, whether a retry could find
/// another backend, so that none is paused for in vain.
/// [`Balance`](crate::balance::Balance) fills it when it picks the
/// backend (in `call`, or, for a request waiting in its
/// [queue](crate::balance::Balance::queue), when its response future takes
/// a place that opened for it), before the backend is readied and called.
/// The failover layer thus knows which backend an abandoned attempt was
/// bound for, lists it in [`Attempts`], and never sends the request there
/// again. The slot also lets the failover layer charge a retry to its
/// budget only once a backend was picked for it (a retry after a pause is
/// charged before the pause). A balancer of your own
/// should fill it too; without it, an abandoned attempt names no backend
/// (and ends the retries), and a retry is charged after its first poll.
///
/// Clones share the slot.
///
/// ```
/// use tower_ha::extensions::Picked;
///
/// let picked = Picked::new();
/// let request = http::Request::builder().extension(picked.clone()).body(()).unwrap();
/// // What a balancer does when it picks backend "a":
/// if let Some(slot) = request.extensions().get::<Picked>() {
///     slot.set("a".into());
/// }
/// assert_eq!(picked.take().unwrap().as_str(), "a");
/// assert!(picked.take().is_none());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Picked(Arc<PickedSlot>);

#[derive(Debug, Default)]
struct PickedSlot {
    backend: Mutex<Option<BackendId>>,
    /// Set while the failover layer drops an attempt at its per-try
    /// timeout, so that a per-backend layer dropped with it can tell a
    /// timeout from a cancelled request.
    timing_out: AtomicBool,
    /// Set by `Balance` from its pick until it hands the request to the
    /// backend: an attempt abandoned meanwhile was never sent.
    readying: AtomicBool,
    /// Whether a backend other than the picked one could take a retry:
    /// asked by a failover layer that pauses between attempts, answered by
    /// `Balance` at its pick: 0 while nobody asked, then one of the
    /// `OTHERS_*` values.
    others: AtomicU8,
}

/// Asked, not answered: a retry may find a backend.
const OTHERS_ASKED: u8 = 1;
/// Answered: no backend but the picked one could take a retry.
const OTHERS_NONE: u8 = 2;
/// Answered: some other backend could take a retry.
const OTHERS_SOME: u8 = 3;

impl Picked {
    /// An empty slot.
    pub fn new() -> Self {
        Picked::default()
    }

    /// Records the picked backend, replacing any earlier one.
    pub fn set(&self, id: BackendId) {
        *self.0.backend.lock() = Some(id);
    }

    /// The picked backend, leaving the slot empty.
    pub fn take(&self) -> Option<BackendId> {
        self.0.backend.lock().take()
    }

    /// Whether a backend has been recorded (and not taken).
    pub(crate) fn is_set(&self) -> bool {
        self.0.backend.lock().is_some()
    }

    /// Runs `drop_attempt`, which drops an attempt abandoned at its per-try
    /// timeout, with the slot saying so.
    pub(crate) fn timing_out(&self, drop_attempt: impl FnOnce()) {
        self.0.timing_out.store(true, Ordering::Relaxed);
        drop_attempt();
        self.0.timing_out.store(false, Ordering::Relaxed);
    }

    /// Whether the attempt being dropped now was abandoned at its per-try
    /// timeout.
    pub(crate) fn is_timing_out(&self) -> bool {
        self.0.timing_out.load(Ordering::Relaxed)
    }

    /// Says whether the picked backend is still being readied: the request
    /// has not been handed to it yet.
    pub(crate) fn set_readying(&self, readying: bool) {
        self.0.readying.store(readying, Ordering::Relaxed);
    }

    /// Whether the attempt's request was never handed to its backend, as
    /// far as `Balance` knows (a balancer that does not say so counts as
    /// having sent it).
    pub(crate) fn is_readying(&self) -> bool {
        self.0.readying.load(Ordering::Relaxed)
    }

    /// Asks the balancer to say, at its pick, whether any other backend
    /// could take a retry.
    pub(crate) fn ask_others(&self) {
        self.0.others.store(OTHERS_ASKED, Ordering::Relaxed);
    }

    /// Whether the question of [`ask_others`](Self::ask_others) is open.
    #[inline]
    pub(crate) fn wants_others(&self) -> bool {
        self.0.others.load(Ordering::Relaxed) == OTHERS_ASKED
    }

    /// Answers that question. The first answer stands: a backend that is
    /// a balancer itself (a nested group) sees the same slot later, and
    /// knows only its own members.
    pub(crate) fn answer_others(&self, left: bool) {
        let answer = if left { OTHERS_SOME } else { OTHERS_NONE };
        let _ = (self.0.others).compare_exchange(
            OTHERS_ASKED,
            answer,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Whether the balancer answered that no other backend could take a
    /// retry.
    pub(crate) fn none_left(&self) -> bool {
        self.0.others.load(Ordering::Relaxed) == OTHERS_NONE
    }
}
