//! The event stream and the audit history.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::{Serialize, Serializer};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::backend::{AdminStatus, BackendId, HealthStatus};
use crate::pool::FastMap;

/// Why a group's primary changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SwitchReason {
    /// The primary became unavailable (unhealthy, ejected, draining,
    /// disabled): the first available backup in configured order took over.
    Failover,
    /// The configured primary was healthy without interruption for the
    /// failback interval and took over again.
    Failback,
    /// An operator forced the primary.
    Forced,
    /// The primary left the group.
    Removed,
}

/// Something that happened to a backend or a group.
///
/// Serialized as an object with a `kind` field (`"backend_added"`,
/// `"primary_changed"`, …); durations as milliseconds, in fields named
/// `…_ms` (`Ejected`'s `duration` is `duration_ms`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A backend joined a group's pool.
    BackendAdded {
        /// The group, when the change went through a [`Handle`](super::Handle).
        group: Option<Arc<str>>,
        /// The backend.
        backend: BackendId,
    },
    /// A backend left a group's pool.
    BackendRemoved {
        /// The group, when known.
        group: Option<Arc<str>>,
        /// The backend.
        backend: BackendId,
        /// Why: `"operator"`, `"unhealthy too long"`, `"dns"`, …
        reason: Arc<str>,
    },
    /// An operator unregistered a group from its [`Handle`](super::Handle).
    GroupRemoved {
        /// The group.
        group: Arc<str>,
    },
    /// An operator drained, disabled or enabled a backend, or a drain
    /// deadline passed.
    AdminChanged {
        /// The backend.
        backend: BackendId,
        /// The status before.
        from: AdminStatus,
        /// The status now.
        to: AdminStatus,
        /// Why: `"operator"` or `"drain deadline"`.
        reason: Arc<str>,
    },
    /// An operator changed a backend's weight.
    WeightChanged {
        /// The backend.
        backend: BackendId,
        /// The weight now.
        weight: u32,
    },
    /// An operator changed a backend's limit of requests in flight.
    LimitChanged {
        /// The backend.
        backend: BackendId,
        /// The limit now (`None`: no limit).
        max_in_flight: Option<usize>,
    },
    /// Active health checking changed a backend's health.
    HealthChanged {
        /// The backend.
        backend: BackendId,
        /// The health before.
        from: HealthStatus,
        /// The health now.
        to: HealthStatus,
        /// Why: `"probes failed"`, `"probes passed"`, `"unhealthy too long"`.
        reason: Arc<str>,
    },
    /// Passive detection ejected a backend.
    Ejected {
        /// The backend.
        backend: BackendId,
        /// Why: `"consecutive failures"` or `"success rate"`.
        reason: Arc<str>,
        /// The how-manieth ejection of this backend.
        ejection: u32,
        /// How long it lasts (`duration_ms` in JSON).
        #[serde(rename = "duration_ms", serialize_with = "millis")]
        duration: Duration,
    },
    /// An ejected backend takes traffic again.
    Restored {
        /// The backend.
        backend: BackendId,
        /// Why: `"ejection ended"` (reported as it runs out) or `"probe
        /// passed"`.
        reason: Arc<str>,
    },
    /// A group's primary changed.
    PrimaryChanged {
        /// The group.
        group: Arc<str>,
        /// The primary before, if there was one.
        from: Option<BackendId>,
        /// The primary now, if any backend is available.
        to: Option<BackendId>,
        /// Why.
        reason: SwitchReason,
    },
    /// An operator released a group's forced primary: the group's failback
    /// rule applies again. The primary stays the same until a failover or a
    /// failback moves it (a [`PrimaryChanged`](Event::PrimaryChanged) then).
    PrimaryReleased {
        /// The group.
        group: Arc<str>,
        /// The backend that was forced.
        backend: BackendId,
    },
    /// A sticky session moved to another backend.
    SessionMoved {
        /// The session key; for a learned cookie (the application's
        /// credential), `cookie:` and 12 hex digits of the value's SHA-256,
        /// as in the layer's logs.
        session: Arc<str>,
        /// The backend it was bound to.
        from: BackendId,
        /// The backend it is bound to now.
        to: BackendId,
        /// Why, as [`MoveReason::as_str`](crate::sticky::MoveReason::as_str)
        /// names it: `"unavailable"` (its backend was unhealthy, ejected or
        /// disabled), `"removed"` (no longer in the pool), `"failed"` (the
        /// last request sent to it failed) or `"served_elsewhere"` (a lower
        /// layer, such as failover, had the request served by another
        /// backend).
        reason: Arc<str>,
    },
    /// A request is tried again on another backend.
    FailoverAttempt {
        /// The attempt about to be made (2 for the first retry).
        attempt: u32,
        /// The backend that failed.
        failed: BackendId,
        /// How it failed.
        reason: Arc<str>,
    },
    /// A request ended failed after at least one failed attempt: every
    /// allowed attempt failed, or the last ended in an error of the
    /// request's own (see
    /// [`FailoverStats::exhausted`](crate::failover::FailoverStats::exhausted)).
    AttemptsExhausted {
        /// The backends tried, oldest first.
        tried: Vec<BackendId>,
    },
}

impl Event {
    /// Whether the event is about one request or one session (a
    /// [`FailoverAttempt`](Event::FailoverAttempt),
    /// [`AttemptsExhausted`](Event::AttemptsExhausted) or
    /// [`SessionMoved`](Event::SessionMoved)) rather than a change of a
    /// backend or a group: there may be thousands a second in an incident.
    /// The history keeps each kind in a ring of its own.
    pub fn is_per_request(&self) -> bool {
        matches!(
            self,
            Event::FailoverAttempt { .. }
                | Event::AttemptsExhausted { .. }
                | Event::SessionMoved { .. }
        )
    }

    /// The backend this event is about, if it is about one.
    pub fn backend(&self) -> Option<&BackendId> {
        match self {
            Event::BackendAdded { backend, .. }
            | Event::BackendRemoved { backend, .. }
            | Event::AdminChanged { backend, .. }
            | Event::WeightChanged { backend, .. }
            | Event::LimitChanged { backend, .. }
            | Event::HealthChanged { backend, .. }
            | Event::Ejected { backend, .. }
            | Event::Restored { backend, .. }
            | Event::PrimaryReleased { backend, .. } => Some(backend),
            Event::PrimaryChanged { to, .. } => to.as_ref(),
            Event::SessionMoved { to, .. } => Some(to),
            Event::FailoverAttempt { failed, .. } => Some(failed),
            Event::AttemptsExhausted { .. } | Event::GroupRemoved { .. } => None,
        }
    }
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn unix_millis<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    s.serialize_u64(ms)
}

/// One event as recorded: a sequence number and when it happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Record {
    /// Increases by one per event emitted through one [`Events`].
    pub seq: u64,
    /// When, on tokio's clock (paused in tests).
    #[serde(skip)]
    pub at: Instant,
    /// When, on the wall clock (milliseconds since the Unix epoch in JSON).
    #[serde(rename = "time_ms", serialize_with = "unix_millis")]
    pub time: SystemTime,
    /// What happened.
    pub event: Event,
}

struct Inner {
    tx: broadcast::Sender<Arc<Record>>,
    history: Mutex<History>,
    history_capacity: usize,
    seq: AtomicU64,
    /// When each backend last changed, kept for the stats.
    last_change: Mutex<LastChanges>,
    /// What says whether a removed backend is still held elsewhere.
    holders: Mutex<Vec<Weak<dyn Holder>>>,
}

/// Says whether a backend is still a member of a pool (see
/// [`Events::add_holder`]).
pub(crate) trait Holder: Send + Sync {
    /// Whether a pool holds backend `id` as a member.
    fn holds(&self, id: &BackendId) -> bool;
}

/// The recorded events: the changes of backends and groups, and the
/// per-request events apart (see [`Event::is_per_request`]), so that a
/// storm of failovers does not push out the changes that explain it.
struct History {
    changes: VecDeque<Arc<Record>>,
    requests: VecDeque<Arc<Record>>,
}

impl History {
    fn with_capacity(capacity: usize) -> Self {
        History {
            changes: VecDeque::with_capacity(capacity),
            requests: VecDeque::with_capacity(capacity),
        }
    }

    /// The last `n` changes, oldest first.
    fn last_changes(&self, n: usize) -> Vec<Arc<Record>> {
        let skip = self.changes.len().saturating_sub(n);
        self.changes.iter().skip(skip).cloned().collect()
    }

    /// The last `n` records of both rings, oldest first.
    fn last(&self, n: usize) -> Vec<Arc<Record>> {
        let mut changes = self.changes.iter().rev().peekable();
        let mut requests = self.requests.iter().rev().peekable();
        let mut last = Vec::with_capacity(n.min(self.changes.len() + self.requests.len()));
        while last.len() < n {
            let newer = match (changes.peek(), requests.peek()) {
                (Some(c), Some(r)) if c.seq > r.seq => changes.next(),
                (Some(_), Some(_)) | (None, Some(_)) => requests.next(),
                (Some(_), None) => changes.next(),
                (None, None) => break,
            };
            last.extend(newer.cloned());
        }
        last.reverse();
        last
    }
}

/// How long a removed backend's events are ignored for the last changes: a
/// request still in flight to it may fail, or be ejected from it, after its
/// removal, and must not bring its entry back for good.
const REMOVED_FOR: Duration = Duration::from_secs(600);

/// The most backends whose last change is kept. A backend removed without
/// an [`Event::BackendRemoved`] (by `Pool::remove` or a custom discovery
/// stream) keeps its entry until this many are kept; then the oldest
/// changes, those of removed backends first, are forgotten.
const MAX_LAST_CHANGES: usize = 65_536;

/// When each backend last changed; a removed backend's entry stays, marked
/// removed, for [`REMOVED_FOR`], so that discovery churn (a pod address per
/// deploy) does not grow the map forever; and at most
/// [`MAX_LAST_CHANGES`] are kept.
#[derive(Default)]
struct LastChanges {
    map: FastMap<BackendId, LastChange>,
    /// When removed entries are next looked for to forget (every half
    /// `REMOVED_FOR`).
    next_sweep: Option<Instant>,
}

struct LastChange {
    time: SystemTime,
    /// When the backend was removed, if it was (and not added again).
    removed: Option<Instant>,
}

impl LastChanges {
    fn record(&mut self, record: &Record, forget_removed: bool) {
        // A switch of primary changes the backend that lost the role too,
        // unless the switch is its removal's.
        if let Event::PrimaryChanged {
            from: Some(from), ..
        } = &record.event
        {
            if self.map.get(from).is_none_or(|e| e.removed.is_none()) {
                self.set(from, record, None);
            }
        }
        let Some(backend) = record.event.backend() else {
            return;
        };
        let removed = match record.event {
            Event::BackendRemoved { .. } if forget_removed => Some(record.at),
            // What requests still in flight to a removed backend report
            // changes nothing; any other event is about a backend back in
            // a pool (added again without an event, or held by another).
            Event::FailoverAttempt { .. }
            | Event::Ejected { .. }
            | Event::Restored { .. }
            | Event::SessionMoved { .. }
                if self.map.get(backend).is_some_and(|e| e.removed.is_some()) =>
            {
                return
            }
            _ => None,
        };
        self.set(backend, record, removed);
    }

    /// Sets `backend`'s last change to `record`'s time.
    fn set(&mut self, backend: &BackendId, record: &Record, removed: Option<Instant>) {
        let entry = LastChange {
            time: record.time,
            removed,
        };
        self.map.insert(backend.clone(), entry);
        if self.map.len() > MAX_LAST_CHANGES {
            self.forget_oldest();
        }
        let now = record.at;
        if crate::time::claim_due(&mut self.next_sweep, REMOVED_FOR / 2, now) {
            self.map.retain(|_, e| {
                e.removed
                    .is_none_or(|at| !crate::time::elapsed(at, now, REMOVED_FOR))
            });
        }
    }

    /// Forgets an eighth of the entries: the oldest changes, those of
    /// removed backends first. Runs once per eighth of the cap at most.
    fn forget_oldest(&mut self) {
        let age = |e: &LastChange| (e.removed.is_none(), e.time);
        let mut ages: Vec<_> = self.map.values().map(age).collect();
        let cut = self.map.len() - (MAX_LAST_CHANGES - MAX_LAST_CHANGES / 8);
        let (_, newest_forgotten, _) = ages.select_nth_unstable(cut - 1);
        let newest_forgotten = *newest_forgotten;
        self.map.retain(|_, e| age(e) > newest_forgotten);
    }
}

/// Where events go: a bounded broadcast channel to subscribers and a
/// bounded audit history.
///
/// Cloning yields a handle to the same stream. [`emit`](Events::emit) never
/// waits: it takes a short lock to append to the history and sends on a
/// [`tokio::sync::broadcast`] channel, which overwrites the oldest event a
/// slow subscriber has not read yet. That subscriber then learns how many
/// events it missed ([`RecvError::Missed`]); no emitter ever waits for it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower_ha::control::{Event, Events, RecvError};
///
/// let events = Events::new(2, 100); // 2 buffered per subscriber, 100 in history
/// let mut slow = events.subscribe();
/// for i in 0..5 {
///     events.emit(Event::WeightChanged { backend: "a".into(), weight: i });
/// }
/// assert_eq!(slow.recv().await, Err(RecvError::Missed(3)));
/// let next = slow.recv().await.unwrap();
/// assert_eq!(next.event, Event::WeightChanged { backend: "a".into(), weight: 3 });
/// assert_eq!(events.history().len(), 5);
/// # }
/// ```
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("subscribers", &self.inner.tx.receiver_count())
            .field("history_capacity", &self.inner.history_capacity)
            .finish()
    }
}

/// The largest buffer of events per subscriber.
const MAX_CHANNEL_CAPACITY: usize = 1 << 16;

impl Default for Events {
    /// 1024 events buffered per subscriber; 1000 changes, and 1000
    /// per-request events, kept in the history.
    fn default() -> Self {
        Events::new(1024, 1000)
    }
}

/// An [`Events`] that does not keep the stream open: for a task that may
/// outlive every other handle of it.
#[derive(Debug, Clone)]
pub(crate) struct WeakEvents(std::sync::Weak<Inner>);

impl WeakEvents {
    /// The stream, if anything else still holds it.
    pub(crate) fn upgrade(&self) -> Option<Events> {
        self.0.upgrade().map(|inner| Events { inner })
    }
}

impl Events {
    /// This stream, not kept open by the handle returned.
    pub(crate) fn downgrade(&self) -> WeakEvents {
        WeakEvents(Arc::downgrade(&self.inner))
    }

    /// A stream that buffers up to `channel_capacity` events for each
    /// subscriber (at least 1, at most 65,536: the buffer is allocated
    /// whole; tokio rounds it up to a power of two) and keeps in the audit
    /// history the last `history_capacity` changes of backends and groups,
    /// and apart from them the last `history_capacity` per-request events
    /// (see [`Event::is_per_request`]) (0 keeps none).
    pub fn new(channel_capacity: usize, history_capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(channel_capacity.clamp(1, MAX_CHANNEL_CAPACITY));
        Events {
            inner: Arc::new(Inner {
                tx,
                history: Mutex::new(History::with_capacity(history_capacity.min(4096))),
                history_capacity,
                seq: AtomicU64::new(0),
                last_change: Mutex::new(LastChanges::default()),
                holders: Mutex::default(),
            }),
        }
    }

    /// Records `event` and sends it to every subscriber. Never waits.
    pub fn emit(&self, event: Event) {
        // A removal by a health checker or a resolver of one pool, which
        // cannot tell whether another pool holds the backend: one that a
        // group of a control `Handle` still holds keeps its last change.
        let forget = match &event {
            Event::BackendRemoved { backend, .. } => !self.held(backend),
            _ => true,
        };
        self.record(event, forget);
    }

    /// Lets `holder` say which backends are still members of a pool these
    /// events report on (a control `Handle` does, for its groups).
    pub(crate) fn add_holder(&self, holder: Weak<dyn Holder>) {
        let mut holders = self.inner.holders.lock();
        holders.retain(|h| h.strong_count() > 0);
        holders.push(holder);
    }

    /// Whether a holder holds backend `id` as a member. Asked with no lock
    /// of these events held.
    fn held(&self, id: &BackendId) -> bool {
        let holders: Vec<Arc<dyn Holder>> = (self.inner.holders.lock().iter())
            .filter_map(Weak::upgrade)
            .collect();
        holders.iter().any(|holder| holder.holds(id))
    }

    /// Records and sends `event`. When `forget_removed`, an
    /// [`Event::BackendRemoved`] forgets the backend's last change.
    fn record(&self, event: Event, forget_removed: bool) {
        let mut history = self.inner.history.lock();
        // Numbered, recorded and sent under one lock: the history, the last
        // changes and every subscriber see the events in sequence order.
        // Sending on a broadcast channel never waits.
        let record = Arc::new(Record {
            seq: self.inner.seq.fetch_add(1, Ordering::Relaxed),
            at: Instant::now(),
            time: SystemTime::now(),
            event,
        });
        if self.inner.history_capacity > 0 {
            let ring = if record.event.is_per_request() {
                &mut history.requests
            } else {
                &mut history.changes
            };
            if ring.len() == self.inner.history_capacity {
                ring.pop_front();
            }
            ring.push_back(record.clone());
        }
        self.inner
            .last_change
            .lock()
            .record(&record, forget_removed);
        // No subscriber is not an error.
        let _ = self.inner.tx.send(record);
        drop(history);
    }

    /// Whether `self` and `other` are clones of one stream.
    pub(crate) fn same_stream(&self, other: &Events) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A new subscriber: it receives every event emitted from now on.
    pub fn subscribe(&self) -> Subscriber {
        Subscriber {
            rx: self.inner.tx.subscribe(),
        }
    }

    /// The recorded history, oldest first: the last `history_capacity`
    /// changes of backends and groups, and among them the last
    /// `history_capacity` per-request events (see
    /// [`Event::is_per_request`]).
    pub fn history(&self) -> Vec<Arc<Record>> {
        self.recent(usize::MAX)
    }

    /// The last `n` recorded events of the [history](Self::history),
    /// oldest first.
    pub fn recent(&self, n: usize) -> Vec<Arc<Record>> {
        self.inner.history.lock().last(n)
    }

    /// The last `n` changes of backends and groups in the
    /// [history](Self::history), oldest first: what explains an incident,
    /// without the per-request events around them.
    pub fn recent_changes(&self, n: usize) -> Vec<Arc<Record>> {
        self.inner.history.lock().last_changes(n)
    }

    /// When an event about backend `id` was last emitted (see
    /// [`Event::backend`]; a switch of primary is about the backend that
    /// lost the role too). None for a backend removed since (and not added
    /// again).
    pub fn last_change(&self, id: &BackendId) -> Option<SystemTime> {
        let last = self.inner.last_change.lock();
        last.map
            .get(id)
            .filter(|e| e.removed.is_none())
            .map(|e| e.time)
    }

    /// How many events were emitted so far.
    pub fn emitted(&self) -> u64 {
        self.inner.seq.load(Ordering::Relaxed)
    }
}

/// Why [`Subscriber::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The subscriber fell behind and this many events were dropped for it;
    /// the next call returns the oldest event still buffered.
    #[error("subscriber fell behind and missed {0} events")]
    Missed(u64),
    /// Every [`Events`] handle is gone.
    #[error("the event stream is closed")]
    Closed,
}

/// Receives events from an [`Events`] stream.
#[derive(Debug)]
pub struct Subscriber {
    rx: broadcast::Receiver<Arc<Record>>,
}

impl Subscriber {
    /// The next event, waiting for one.
    pub async fn recv(&mut self) -> Result<Arc<Record>, RecvError> {
        self.rx.recv().await.map_err(|e| match e {
            broadcast::error::RecvError::Lagged(n) => RecvError::Missed(n),
            broadcast::error::RecvError::Closed => RecvError::Closed,
        })
    }

    /// The next event if one is buffered, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<Arc<Record>, RecvError>> {
        match self.rx.try_recv() {
            Ok(r) => Some(Ok(r)),
            Err(broadcast::error::TryRecvError::Empty) => None,
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(RecvError::Missed(n))),
            Err(broadcast::error::TryRecvError::Closed) => Some(Err(RecvError::Closed)),
        }
    }
}

/// Emits `event` when `events` is set.
#[inline]
pub(crate) fn emit(events: Option<&Events>, event: impl FnOnce() -> Event) {
    if let Some(events) = events {
        events.emit(event());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failover(attempt: u32) -> Event {
        Event::FailoverAttempt {
            attempt,
            failed: "a".into(),
            reason: "refused".into(),
        }
    }

    /// A storm of failovers keeps its own ring: the changes that explain
    /// it stay in the history, in sequence order with the last failovers.
    #[test]
    fn per_request_events_do_not_push_changes_out_of_the_history() {
        let events = Events::new(16, 4);
        events.emit(Event::WeightChanged {
            backend: "a".into(),
            weight: 1,
        });
        events.emit(Event::Ejected {
            backend: "a".into(),
            reason: "consecutive failures".into(),
            ejection: 1,
            duration: Duration::from_secs(30),
        });
        for attempt in 0..1000 {
            events.emit(failover(attempt));
        }
        events.emit(Event::WeightChanged {
            backend: "a".into(),
            weight: 2,
        });
        events.emit(failover(1000));
        let seqs: Vec<u64> = events.history().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [0, 1, 999, 1000, 1001, 1002, 1003]);
        let recent: Vec<u64> = events.recent(3).iter().map(|r| r.seq).collect();
        assert_eq!(recent, [1001, 1002, 1003]);
        let changes: Vec<u64> = events.recent_changes(2).iter().map(|r| r.seq).collect();
        assert_eq!(changes, [1, 1002]);
        assert_eq!(events.recent_changes(100).len(), 3);
        assert!(events.recent(0).is_empty());
        assert_eq!(events.recent(100).len(), 7);
        // Three changes more push the oldest change out, no failover.
        for weight in 3..6 {
            events.emit(Event::WeightChanged {
                backend: "a".into(),
                weight,
            });
        }
        let seqs: Vec<u64> = events.history().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [999, 1000, 1001, 1002, 1003, 1004, 1005, 1006]);
        assert!(Events::new(1, 0).history().is_empty());
    }

    #[test]
    fn a_removed_backend_leaves_the_last_change_map() {
        let events = Events::default();
        let id = BackendId::from("10.0.0.7:80");
        events.emit(Event::BackendAdded {
            group: None,
            backend: id.clone(),
        });
        assert!(events.last_change(&id).is_some());
        events.emit(Event::BackendRemoved {
            group: None,
            backend: id.clone(),
            reason: "dns".into(),
        });
        assert!(events.last_change(&id).is_none());
        assert_eq!(events.history().len(), 2, "the history keeps both");
    }

    #[tokio::test(start_paused = true)]
    async fn late_events_of_removed_backends_do_not_grow_the_last_change_map() {
        let events = Events::default();
        let failed = |backend: &BackendId| Event::FailoverAttempt {
            attempt: 2,
            failed: backend.clone(),
            reason: "connection refused".into(),
        };
        let added = |backend: &BackendId| Event::BackendAdded {
            group: None,
            backend: backend.clone(),
        };
        let removed = |backend: &BackendId| Event::BackendRemoved {
            group: None,
            backend: backend.clone(),
            reason: "dns".into(),
        };
        // A deploy every minute for a day: each pod's address is removed,
        // and a request still in flight to it fails after the removal.
        for deploy in 0..1440 {
            let pod = BackendId::from(format!("10.0.{}.{}:80", deploy / 256, deploy % 256));
            events.emit(added(&pod));
            events.emit(removed(&pod));
            events.emit(failed(&pod));
            assert!(events.last_change(&pod).is_none());
            tokio::time::advance(Duration::from_secs(60)).await;
        }
        let kept = events.inner.last_change.lock().map.len();
        assert!(kept <= 16, "{kept} entries kept");
        // Added again, a backend's events count again.
        let pod = BackendId::from("10.0.5.159:80");
        events.emit(added(&pod));
        let at = events.last_change(&pod).unwrap();
        events.emit(failed(&pod));
        assert!(events.last_change(&pod).unwrap() >= at);

        // An action on a removed backend (one another group still holds,
        // or put back without an event) counts again at once.
        events.emit(removed(&pod));
        events.emit(failed(&pod));
        assert!(events.last_change(&pod).is_none());
        events.emit(Event::AdminChanged {
            backend: pod.clone(),
            from: AdminStatus::Enabled,
            to: AdminStatus::Draining,
            reason: "operator".into(),
        });
        assert!(events.last_change(&pod).is_some());
    }

    #[test]
    fn backends_removed_without_an_event_do_not_grow_the_last_change_map() {
        let events = Events::new(1, 0);
        let pod = |n: usize| BackendId::from(format!("pod-{n}"));
        let added = |n: usize| Event::BackendAdded {
            group: None,
            backend: pod(n),
        };
        // A removed backend's entry goes first, whatever its age.
        events.emit(added(0));
        events.emit(Event::BackendRemoved {
            group: None,
            backend: pod(0),
            reason: "dns".into(),
        });
        for n in 1..=MAX_LAST_CHANGES {
            events.emit(added(n));
        }
        let len = || events.inner.last_change.lock().map.len();
        // Changes at the same instant as the newest forgotten go with it.
        let kept = MAX_LAST_CHANGES - MAX_LAST_CHANGES / 8;
        assert!((kept - 64..=kept).contains(&len()), "{} kept", len());
        assert!(!events.inner.last_change.lock().map.contains_key(&pod(0)));
        assert!(events.last_change(&pod(MAX_LAST_CHANGES)).is_some());
        for n in 0..MAX_LAST_CHANGES {
            events.emit(added(MAX_LAST_CHANGES + 1 + n));
            assert!(len() <= MAX_LAST_CHANGES);
        }
    }
}
