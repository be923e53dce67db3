//! The state every clone of one sticky layer shares, and the decisions made
//! on the request and on the response.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::header::SET_COOKIE;
use http::uri::PathAndQuery;
use http::{Request, Response};
use parking_lot::Mutex;
use tokio::sync::{watch, OnceCell};
use tokio::time::Instant;

use super::cookie::{self, CookieInsert, Learned, Parsed, SESSION_ID_LEN};
use super::error::{RestorePanicked, RestoreTimedOut, SessionUnavailable};
use super::hooks::{
    MoveReason, OnMove, OnRestore, RestoreFailure, RestoreReport, Running, SessionMoved,
};
use super::key::{self, Extracted, Kind, Reject, SessionKey};
use super::stats::{bump, Counters, StickyStats};
use super::table::{Dropped, Due, Hit, Kept, Lookup, Table, Unread};
use super::writes::{landed, Done, Owner, Write, Writes};
use super::Availability;
use crate::backend::BackendId;
use crate::error::{find, not_the_backends, BackendError, BoxError, InvalidRequest, NoBackend};
use crate::extensions::{Affinity, AffinityRequired, Attempts, GaveUp, ServedBy};
use crate::failover::{Exhausted, FailedStatus, TimedOut};
use crate::key::RequestHead;
use crate::pool::Pool;
use crate::store::{Session, SessionGuard, SessionLock, SessionStore, StoreError};
use crate::task::AbortOnDrop;
use crate::time::{claim_due, elapsed, Throttle};

pub(super) const TARGET: &str = "tower_ha::sticky";

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where a backend stands, as the sticky layer needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Available,
    /// Draining but healthy and not ejected: it takes no new session, yet
    /// the balancer still sends it the requests of the sessions bound to
    /// it, so that they finish there.
    Draining,
    Unavailable,
    Missing,
}

/// Read access to the backends' state, whatever the pool's service type.
pub(crate) trait Backends: Send + Sync + 'static {
    fn status(&self, id: &BackendId) -> Status;
    /// Whether a backend other than `id` may take a request now.
    fn another_available(&self, id: &BackendId) -> bool;
    /// The pool's own copy of `id`, if it is a member: an `Affinity`
    /// holding it is resolved by the balancer without hashing.
    fn member_id(&self, id: &BackendId) -> Option<BackendId>;
}

impl<S: Send + Sync + 'static> Backends for Pool<S> {
    #[inline]
    fn status(&self, id: &BackendId) -> Status {
        match self.state(id) {
            None => Status::Missing,
            Some(state) if state.is_available() => Status::Available,
            Some(state) if state.is_draining_but_serving() => Status::Draining,
            Some(_) => Status::Unavailable,
        }
    }

    fn member_id(&self, id: &BackendId) -> Option<BackendId> {
        let snapshot = self.snapshot();
        let members = snapshot.members();
        members.index_of(id).map(|i| members[i].id().clone())
    }

    fn another_available(&self, id: &BackendId) -> bool {
        self.snapshot()
            .members()
            .iter()
            .any(|m| m.id() != id && m.state().is_available() && m.state().has_room())
    }
}

pub(crate) struct Config {
    pub(crate) key: SessionKey,
    pub(crate) backends: Arc<dyn Backends>,
    pub(crate) store: Option<Arc<dyn SessionStore>>,
    pub(crate) availability: Availability,
    pub(crate) strict: bool,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_sessions: usize,
    /// The most keys with store writes under way (see `Writes`).
    pub(crate) max_pending_writes: usize,
    /// How often a session in use is saved again; `None`: as the store
    /// asks ([`SessionStore::refresh_interval`]).
    pub(crate) refresh: Option<Duration>,
    pub(crate) on_move: Option<OnMove>,
    pub(crate) on_restore: Option<OnRestore>,
    /// How long `on_restore` may run for one session.
    pub(crate) restore_timeout: Duration,
    /// How long `on_move` may run.
    pub(crate) move_timeout: Duration,
    /// How long a response waits for its writes and `on_move` hook.
    pub(crate) response_wait: Duration,
    /// How long a request waits for its session's record.
    pub(crate) load_wait: Duration,
    pub(crate) lock: Option<Arc<dyn SessionLock>>,
    pub(crate) events: Option<crate::control::Events>,
}

impl Clone for Config {
    fn clone(&self) -> Self {
        Config {
            key: self.key.clone(),
            backends: self.backends.clone(),
            store: self.store.clone(),
            availability: self.availability,
            strict: self.strict,
            idle_timeout: self.idle_timeout,
            max_sessions: self.max_sessions,
            max_pending_writes: self.max_pending_writes,
            refresh: self.refresh,
            on_move: self.on_move.clone(),
            on_restore: self.on_restore.clone(),
            restore_timeout: self.restore_timeout,
            move_timeout: self.move_timeout,
            response_wait: self.response_wait,
            load_wait: self.load_wait,
            lock: self.lock.clone(),
            events: self.events.clone(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("key", &self.key)
            .field("store", &self.store.is_some())
            .field("availability", &self.availability)
            .field("strict", &self.strict)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_sessions", &self.max_sessions)
            .field("max_pending_writes", &self.max_pending_writes)
            .field("refresh", &self.refresh)
            .field("on_move", &self.on_move.is_some())
            .field("on_restore", &self.on_restore.is_some())
            .field("restore_timeout", &self.restore_timeout)
            .field("move_timeout", &self.move_timeout)
            .field("response_wait", &self.response_wait)
            .field("load_wait", &self.load_wait)
            .field("lock", &self.lock.is_some())
            .finish()
    }
}

/// What the store said about a session.
#[derive(Debug, Clone)]
pub(crate) enum Stored {
    /// Its record.
    Found(Session),
    /// No record.
    Absent,
    /// The store could not say (the error): a session started now is kept
    /// in memory only, so that it cannot overwrite a record the store may
    /// hold, and its record is read again after `RELOAD_AFTER`. Strict
    /// mode refuses the request instead.
    Unknown(Arc<StoreError>),
    /// The store holds a record this instance did not take (standalone
    /// mode: its restore failed, or has yet to run): the session is routed
    /// as that record says (or as it moved since), and kept in memory only,
    /// so that it cannot overwrite the record.
    Unrestored(Session),
}

impl Stored {
    /// How a session routed by this answer is kept.
    fn kept(&self) -> Kept {
        match self {
            Stored::Found(_) | Stored::Absent => Kept::Saved,
            Stored::Unknown(_) => Kept::Unread,
            Stored::Unrestored(_) => Kept::Unrestored,
        }
    }
}

/// One load from the store, shared by the concurrent requests for a key.
#[derive(Default)]
struct Load {
    stored: OnceCell<Stored>,
    /// The task reading the store for this load (see `Shared::read_once`),
    /// once one was started: whoever waits for the load waits for it.
    reading: Mutex<Option<Reading>>,
    /// The requests waiting for it. Changed under the `Loading` lock only.
    waiting: std::sync::atomic::AtomicUsize,
    /// The key was forgotten (moved on another replica, or ended here)
    /// while it loaded, or before a request routed by it was put in the
    /// table.
    stale: std::sync::atomic::AtomicBool,
    /// Its registrations (see `Waiting`): the requests waiting for it
    /// and the restore task finishing it. Changed under the `Loading` lock
    /// only.
    registered: std::sync::atomic::AtomicUsize,
}

type Cell = Arc<Load>;

/// A load's task: its answer once it has one, and how to stop it.
struct Reading {
    answer: watch::Receiver<Option<Stored>>,
    task: tokio::task::AbortHandle,
}
type Loading = Mutex<HashMap<Arc<str>, Cell>>;

pub(crate) struct Shared {
    pub(crate) config: Config,
    table: Table,
    loading: Loading,
    /// The stored records a restore has listed and not yet taken, or kept
    /// after their hook failed (standalone mode), each as its session is
    /// routed meanwhile: on the record's backend, or the one it moved to
    /// since. Never overwritten by a session started here.
    unrestored: Mutex<HashMap<Arc<str>, Session>>,
    /// The sessions forgotten or ended since each restore under way began
    /// to list the store: it does not put them back. Locked after
    /// `unrestored`, when both are.
    restores: Mutex<Restores>,
    /// The records the store holds as far as this instance knows
    /// (standalone mode): see `Shared::may_have_record`.
    records: Mutex<Records>,
    /// Writes to the store, in order per key.
    writes: Writes,
    /// The `on_move` hooks to call or under way.
    hooks: Arc<Running>,
    counters: Counters,
    /// Whether a backend id the cookie cannot carry was warned of: the
    /// warning comes once, the later ones are debug events.
    warned_uncarried: std::sync::atomic::AtomicBool,
    /// The `refresh_every` given, and the store's interval used instead,
    /// when the one given was too long (see `refresh_interval`).
    refresh_gave_way: Option<(Duration, Duration)>,
    /// Whether the layer's settings were warned of (at its first `layer`,
    /// not at each builder call, each of which makes a new `Shared`).
    warned_of_config: std::sync::Once,
    /// Failed store calls: an outage fails one a request, and warns once a
    /// period (the others are debug events).
    store_warnings: Throttle,
    /// Responses handed on before their writes finished (see
    /// `Shared::handed_on_early`), which a slow store makes one a request.
    early_warnings: Throttle,
    /// Closed when the layer and every service it built are gone, for the
    /// tasks that follow it (see `StickyLayer::follow`).
    #[cfg(feature = "redis")]
    pub(crate) gone: tokio::sync::watch::Sender<()>,
}

/// What the restores under way must not put back (see `Shared::restores`).
#[derive(Default)]
struct Restores {
    next: u64,
    running: Vec<Forgotten>,
}

/// The sessions forgotten or ended since a restore began to list the store.
struct Forgotten {
    restore: u64,
    /// Every session (`forget_all`).
    all: bool,
    keys: HashSet<Arc<str>>,
}

impl Restores {
    /// Records that `key` was forgotten or ended, for every restore under
    /// way.
    fn forget(&mut self, key: &str) {
        for forgotten in &mut self.running {
            if !forgotten.all && !forgotten.keys.contains(key) {
                forgotten.keys.insert(Arc::from(key));
            }
        }
    }

    /// Whether `key` was forgotten or ended since `restore` began.
    fn forgotten(&self, restore: u64, key: &str) -> bool {
        self.running
            .iter()
            .find(|forgotten| forgotten.restore == restore)
            .is_some_and(|forgotten| forgotten.all || forgotten.keys.contains(key))
    }
}

/// A restore under way, from before it lists the store until it ends
/// (see `Shared::restores`).
struct Restoring<'a> {
    shared: &'a Shared,
    id: u64,
}

impl<'a> Restoring<'a> {
    fn begin(shared: &'a Shared) -> Self {
        let mut restores = shared.restores.lock();
        let id = restores.next;
        restores.next += 1;
        restores.running.push(Forgotten {
            restore: id,
            all: false,
            keys: HashSet::new(),
        });
        Restoring { shared, id }
    }
}

impl Drop for Restoring<'_> {
    fn drop(&mut self) {
        let id = self.id;
        self.shared
            .restores
            .lock()
            .running
            .retain(|forgotten| forgotten.restore != id);
    }
}

/// The keys of the records the store holds, as a standalone instance (the
/// one instance writing the store) knows them: those `restore` loaded and
/// every session saved, refreshed or read since, less those deleted and, with a
/// store whose records expire, those left alone for long enough to have
/// expired. Kept as 64-bit hashes with random keys: a collision can only
/// make a new key look stored.
#[derive(Default)]
struct Records {
    /// `restore` loaded the store: before, any key may have a record.
    restored: bool,
    /// When each was last written (saved, refreshed or loaded).
    keys: HashMap<u64, Instant>,
    hasher: std::collections::hash_map::RandomState,
    /// How long a record left alone may still be in the store: for a store
    /// whose records expire, four of its refresh intervals (twice the TTL
    /// of the stores of this crate); `None` when records stay.
    horizon: Option<Duration>,
    /// When the keys are next swept of those past the horizon.
    next_sweep: Option<Instant>,
}

impl Records {
    fn new(refresh_interval: Option<Duration>) -> Self {
        Records {
            horizon: refresh_interval
                .filter(|every| !every.is_zero())
                .map(|every| every.saturating_mul(4)),
            ..Records::default()
        }
    }

    fn hash(&self, key: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key.as_bytes())
    }

    fn insert(&mut self, key: &str) {
        let now = Instant::now();
        let hash = self.hash(key);
        self.keys.insert(hash, now);
        // Once per horizon at most, so the sweep costs little per write.
        if let Some(horizon) = self.horizon {
            if claim_due(&mut self.next_sweep, horizon, now) {
                self.keys.retain(|_, &mut at| !elapsed(at, now, horizon));
            }
        }
    }

    fn remove(&mut self, key: &str) {
        let hash = self.hash(key);
        self.keys.remove(&hash);
    }

    fn may_hold(&self, key: &str) -> bool {
        if !self.restored {
            return true;
        }
        let now = Instant::now();
        self.keys.get(&self.hash(key)).is_some_and(|&at| {
            self.horizon
                .is_none_or(|horizon| !elapsed(at, now, horizon))
        })
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("sessions", &self.table.len())
            .finish()
    }
}

/// What the response path must do for a request.
#[derive(Debug)]
pub(crate) enum Track {
    /// The request names no session: a response may start one.
    Fresh,
    /// The request names a session nobody knows: its response starts it,
    /// kept as `kept` says (saved when the store has no record of it).
    New { key: Arc<str>, kept: Kept },
    /// A known session.
    Known {
        key: Arc<str>,
        backend: BackendId,
        /// The backend the request's own cookie named (cookie insert).
        cookie: Named,
        /// The last request of the session failed: this one was kept off
        /// `backend`.
        failed: bool,
        /// The store has no record of the session yet (one kept in memory
        /// while its record could not be read): the response saves it.
        save: bool,
        /// The layer read or wrote the session's record (see
        /// `Hit::saved`), as it stood when the request was routed: an
        /// answer that ends the session deletes that record, even when
        /// the session left the table meanwhile.
        saved: bool,
    },
}

/// The backend a request's own cookie named, for a known session.
#[derive(Debug)]
pub(crate) enum Named {
    /// No cookie of the layer's (another kind of key).
    Nothing,
    /// Exactly the value issued for the session's backend: no clone of
    /// the id is needed to remember it.
    Current,
    /// That value, due to be sent again so that its `Max-Age` counts from
    /// now.
    Renew,
    /// Another backend (a stale cookie), or one not yet compared.
    Backend(BackendId),
}

impl Named {
    fn from_option(named: Option<BackendId>) -> Self {
        named.map_or(Named::Nothing, Named::Backend)
    }

    /// The backend named, given the session's `backend`.
    fn get<'a>(&'a self, backend: &'a BackendId) -> Option<&'a BackendId> {
        match self {
            Named::Nothing | Named::Renew => None,
            Named::Current => Some(backend),
            Named::Backend(named) => Some(named),
        }
    }
}

/// What `call` decided.
pub(crate) enum Start {
    /// Call the inner service now.
    Call(Track),
    /// Load the session from the store first.
    Load {
        key: Arc<str>,
        cookie: Option<BackendId>,
        /// A session kept in memory whose record is read again (see
        /// `Lookup::unread`).
        unread: Option<Unread>,
        load: BoxFuture<Loaded>,
    },
    /// Refuse the request (strict mode).
    Refuse(SessionUnavailable),
}

impl From<Result<Track, SessionUnavailable>> for Start {
    fn from(routed: Result<Track, SessionUnavailable>) -> Self {
        match routed {
            Ok(track) => Start::Call(track),
            Err(refused) => Start::Refuse(refused),
        }
    }
}

/// What a load found, and the request's registration on it, held until
/// the request is routed by it (see `Shared::after_load`).
pub(crate) struct Loaded {
    pub(crate) stored: Stored,
    pub(crate) waiting: Waiting,
}

/// How often a session in use has its record refreshed, if ever: as
/// configured (zero: never), or as the store asks. A configured interval at
/// least twice the store's (at least the TTL of this crate's stores) would
/// let the record of a session in use expire between two refreshes, which a
/// replica or a restart would then not find: the store's is used instead
/// (with a warning, see `Shared::warn_of_config`).
fn refresh_interval(configured: Option<Duration>, asked: Option<Duration>) -> Option<Duration> {
    match (configured, asked) {
        (Some(every), Some(asked))
            if !every.is_zero() && !asked.is_zero() && every >= asked.saturating_mul(2) =>
        {
            Some(asked)
        }
        (Some(every), _) => Some(every),
        (None, asked) => asked,
    }
    .filter(|every| !every.is_zero())
}

impl Shared {
    pub(crate) fn new(config: Config) -> Self {
        let writes = Writes::new(config.max_pending_writes);
        let records = Records::new(config.store.as_ref().and_then(|s| s.refresh_interval()));
        let refresh = (config.store.as_ref())
            .and_then(|store| refresh_interval(config.refresh, store.refresh_interval()));
        Shared {
            // The layer's own cookie: every key is a random id it issued.
            table: Table::new(
                config.idle_timeout,
                config.max_sessions,
                config.key.cookie().is_some(),
            )
            .with_cookie_renewal(config.key.cookie().and_then(CookieInsert::renew_after))
            .with_refresh(refresh),
            refresh_gave_way: config
                .refresh
                .zip(refresh)
                .filter(|(given, used)| given != used),
            warned_of_config: std::sync::Once::new(),
            config,
            loading: Mutex::new(HashMap::new()),
            unrestored: Mutex::new(HashMap::new()),
            restores: Mutex::default(),
            records: Mutex::new(records),
            writes,
            hooks: Arc::default(),
            counters: Counters::default(),
            warned_uncarried: std::sync::atomic::AtomicBool::new(false),
            store_warnings: Throttle::default(),
            early_warnings: Throttle::default(),
            #[cfg(feature = "redis")]
            gone: tokio::sync::watch::Sender::new(()),
        }
    }

    /// Warns, once, of the settings the layer did not take as given.
    pub(crate) fn warn_of_config(&self) {
        if let Some((given, used)) = self.refresh_gave_way {
            self.warned_of_config.call_once(|| {
                tracing::warn!(
                    target: TARGET,
                    configured = ?given,
                    used = ?used,
                    "refresh_every is longer than the store's records live; refreshing as often as the store asks instead"
                );
            });
        }
    }

    pub(crate) fn stats(&self) -> StickyStats {
        self.counters.snapshot(self.table.len())
    }

    /// Which layer this is, for the published metrics.
    pub(crate) fn serial(&self) -> crate::serial::Serial {
        self.counters.serial
    }

    pub(crate) fn session(&self, key: &str) -> Option<Session> {
        self.table.session(key)
    }

    /// Whether the session key is an application's cookie, learned from
    /// its responses: logs and events then show keys as digests (see
    /// [`Shown`]).
    fn learns_cookie(&self) -> bool {
        matches!(self.config.key.kind, Kind::Learn(_))
    }

    /// Session `key` as logs and events show it.
    fn shown<'a>(&self, key: &'a str) -> Shown<'a> {
        Shown::new(key, self.learns_cookie())
    }

    /// `error` as the logs show it, for the session `key` (see
    /// [`ShownError`]).
    fn shown_error<'a>(
        &self,
        key: &'a str,
        error: &'a (dyn std::error::Error + 'static),
    ) -> ShownError<'a> {
        ShownError {
            key: self.shown(key),
            error,
        }
    }

    /// The strict refusal of session `key`, bound to `backend`.
    fn unavailable(&self, key: &str, backend: BackendId) -> SessionUnavailable {
        SessionUnavailable::new(key, self.learns_cookie(), backend)
    }

    fn count_dropped(&self, dropped: Dropped) {
        bump(&self.counters.expired, dropped.expired);
        bump(&self.counters.evicted, dropped.evicted);
    }

    fn reject(&self, reason: Reject) {
        bump(&self.counters.rejected, 1);
        tracing::debug!(target: TARGET, %reason, "session key rejected");
    }

    /// `session` with its backend id shared with the pool's (when it is a
    /// member), for sessions read from a cookie or the store.
    fn with_member_id(&self, mut session: Session) -> Session {
        if let Some(id) = self.config.backends.member_id(&session.backend) {
            session.backend = id;
        }
        session
    }

    /// The value of the layer's cookie for `key` on `backend`, kept in
    /// the table so that a hit is a comparison (cookie insert only).
    fn tag(&self, key: &str, backend: &BackendId) -> Option<Box<str>> {
        self.config
            .key
            .cookie()
            .map(|c| c.value(key, backend).into_boxed_str())
    }

    /// Reads the request's key, looks it up and sets the request's
    /// extensions.
    pub(crate) fn start<B>(self: &Arc<Self>, req: &mut Request<B>) -> Start {
        let found = {
            let head = RequestHead::from(&*req);
            match self.config.key.extract(&head) {
                Extracted::None => return Start::Call(Track::Fresh),
                Extracted::Rejected(reason) => {
                    self.reject(reason);
                    return Start::Call(Track::Fresh);
                }
                Extracted::Key(key) => self.lookup(&key),
                Extracted::Cookie(value) => {
                    // The first cookie of the name sent after this one that
                    // verifies (with `live`, naming no departed backend).
                    let later = |live: bool| {
                        (self.config.key.more_cookies(&head)).find_map(|value| {
                            let found = self.lookup_cookie(value).ok();
                            found.filter(|f| !(live && self.names_a_departed_backend(f)))
                        })
                    };
                    match self.lookup_cookie(value) {
                        // A session the table does not know, on a backend
                        // gone from the pool: a later cookie may be the
                        // current one (this one left on a longer path by
                        // an older setup, say), which would otherwise be
                        // passed over on every request.
                        Ok(found) if self.names_a_departed_backend(&found) => {
                            later(true).unwrap_or(found)
                        }
                        Ok(found) => found,
                        // A later cookie (a sibling domain's or a longer
                        // path's comes first) may be the layer's own.
                        Err(reason) => match later(false) {
                            Some(found) => found,
                            None => {
                                self.reject(reason);
                                return Start::Call(Track::Fresh);
                            }
                        },
                    }
                }
            }
        };
        match found {
            Found::Hit(hit, cookie) => self.pin(req, hit, cookie).into(),
            Found::Miss(key, cookie, unread) => {
                bump(&self.counters.misses, 1);
                match &self.config.store {
                    None => self.after_load(req, key, cookie, unread, Stored::Absent, None),
                    Some(store) => match self.unrestored(&key) {
                        // Standalone: a record a restore has yet to take,
                        // or whose restore failed, is not this instance's
                        // to read until a `restore` takes it.
                        Some(record) => self.after_load(
                            req,
                            key,
                            cookie,
                            unread,
                            Stored::Unrestored(record),
                            None,
                        ),
                        // Whatever the mode, a session the table does not
                        // know (never seen, idle, evicted, or kept in
                        // memory while the store could not be read) is read
                        // from the store before it is routed, so that its
                        // record is followed and never written over unread.
                        None => Start::Load {
                            // Standalone mode restored every session at
                            // start: one that left the table since was
                            // restored then, and is not again.
                            load: self.load(
                                store.clone(),
                                key.clone(),
                                self.config.availability == Availability::Replication,
                            ),
                            key,
                            cookie,
                            unread,
                        },
                    },
                }
            }
        }
    }

    /// The record this instance has not taken of session `key`, as the
    /// session is routed (see `Shared::unrestored`); none in replication
    /// mode.
    fn unrestored(&self, key: &str) -> Option<Session> {
        if self.config.availability != Availability::Standalone {
            return None;
        }
        self.unrestored.lock().get(key).cloned()
    }

    fn lookup(self: &Arc<Self>, key: &str) -> Found {
        let found = self.table.get(key.as_bytes());
        bump(&self.counters.expired, u64::from(found.expired));
        self.refresh(&found);
        match found.hit {
            Some(hit) => Found::Hit(hit, Named::Nothing),
            None => Found::Miss(Arc::from(key), None, found.unread),
        }
    }

    /// Whether `found` is a session the table does not know whose cookie
    /// names a backend no longer in the pool.
    #[inline]
    fn names_a_departed_backend(&self, found: &Found) -> bool {
        matches!(found, Found::Miss(_, Some(named), None)
            if self.config.backends.status(named) == Status::Missing)
    }

    /// Looks up the session a cookie of the layer's own names. The exact
    /// value issued for the session's current backend is recognised by a
    /// constant-time comparison with the value kept in the table, without
    /// decoding or computing a MAC; any other value is parsed and its MAC
    /// verified before it touches the session.
    #[inline]
    fn lookup_cookie(self: &Arc<Self>, value: &[u8]) -> Result<Found, Reject> {
        if let Some(session) = value
            .get(..SESSION_ID_LEN)
            .filter(|_| value.get(SESSION_ID_LEN) == Some(&b'.'))
        {
            if let Some(found) = self.table.get_exact(session, value) {
                self.refresh(&found);
                let named = if found.renew {
                    Named::Renew
                } else {
                    Named::Current
                };
                if let Some(hit) = found.hit {
                    return Ok(Found::Hit(hit, named));
                }
            }
        }
        let cookie = self
            .config
            .key
            .cookie()
            .expect("a cookie key read a cookie");
        let parsed = Parsed::new(value)?;
        let (named, current) = cookie.verify(&parsed)?;
        let found = self.table.get(parsed.session.as_bytes());
        bump(&self.counters.expired, u64::from(found.expired));
        self.refresh(&found);
        Ok(match found.hit {
            // Signed with a secret being retired: sent again, signed with
            // the current one.
            Some(hit) if !current && named == hit.backend => Found::Hit(hit, Named::Renew),
            Some(hit) => Found::Hit(hit, Named::Backend(named)),
            None => Found::Miss(Arc::from(parsed.session), Some(named), found.unread),
        })
    }

    /// Refreshes a hit's record if it is due (see
    /// `SessionStore::refresh`), or saves it again after a failed save, in
    /// the background: the request does not wait for it.
    #[inline]
    fn refresh(self: &Arc<Self>, found: &Lookup) {
        if found.refresh == Due::Nothing {
            return;
        }
        if let (Some(hit), Some(store)) = (&found.hit, &self.config.store) {
            let key = hit.key.to_string();
            if found.refresh == Due::Save {
                drop(self.resave(store, key));
                return;
            }
            if self.tracks_records() {
                self.records.lock().insert(&key);
            }
            drop(Writes::submit(self, store, Write::Refresh(key)));
        }
    }

    /// Saves `key`'s session once more after a save of it failed, bounded
    /// as a new session's save: one that failed for want of a place must
    /// not bypass the limit the next time.
    fn resave(self: &Arc<Self>, store: &Arc<dyn SessionStore>, key: String) -> Option<Done> {
        if self.tracks_records() {
            self.records.lock().insert(&key);
        }
        Writes::decide(self, store, true, || ((), Some(Write::Resave(key)))).1
    }

    /// Routes a request whose session was looked up in the store (or not,
    /// when there is no store to ask). `unread` is a session kept in memory
    /// whose record was read again. `load` is the request's registration
    /// on the load that found `stored`.
    pub(crate) fn after_load<B>(
        self: &Arc<Self>,
        req: &mut Request<B>,
        key: Arc<str>,
        cookie: Option<BackendId>,
        unread: Option<Unread>,
        stored: Stored,
        load: Option<&Waiting>,
    ) -> Start {
        // Most ways on put a session in the table, some under the lock of
        // the records a restore holds.
        self.sweep();
        // Under the lock `forget` marks loads stale with, until the session
        // is in the table: a session forgotten before is read again, one
        // forgotten after is taken out of the table again.
        let _loading = match (load, &self.config.store) {
            (Some(load), Some(store)) => {
                let loading = self.loading.lock();
                if load.0.cell.stale.load(std::sync::atomic::Ordering::Acquire) {
                    // Moved on another replica (restored there already), or
                    // ended here, since it was read: routed by the record
                    // as it is now (read once this instance's writes of it
                    // have landed, an ended session's delete among them),
                    // without restoring it again. The requests that waited
                    // share the new load while it lasts.
                    drop(loading);
                    return Start::Load {
                        load: self.load(store.clone(), key.clone(), false),
                        key,
                        cookie,
                        unread,
                    };
                }
                Some(loading)
            }
            _ => None,
        };
        self.route_miss(req, key, cookie, unread, stored).into()
    }

    /// Routes a request by what `after_load` was told of its session.
    fn route_miss<B>(
        &self,
        req: &mut Request<B>,
        key: Arc<str>,
        cookie: Option<BackendId>,
        unread: Option<Unread>,
        stored: Stored,
    ) -> Result<Track, SessionUnavailable> {
        // What this instance starts or learns here is saved unless the
        // store holds a record it could not read or did not take.
        let mut kept = stored.kept();
        if let Stored::Unknown(error) = &stored {
            if error.is_invalid_key() {
                // The store cannot hold the key (`..` for a webhook, one
                // over its length limit): it has no record to route by,
                // and none could be saved. A session this instance keeps
                // in memory stays where it is, in memory only and not read
                // again; otherwise the key is rejected, as a malformed one
                // is.
                if unread.is_none() {
                    self.reject(Reject::StoreRefused);
                    return Ok(Track::Fresh);
                }
                kept = Kept::Memory;
            } else if self.config.strict && self.may_have_record(&key) {
                // Whatever backend the session is on, this instance cannot
                // tell: routing it anywhere could move it. A key with no
                // record is no session to move: it is routed as a new one,
                // kept in memory (see `may_have_record`).
                bump(&self.counters.strict_refusals, 1);
                let named = unread.map(|u| u.backend).or(cookie);
                return Err(SessionUnavailable::unreadable(
                    &key,
                    self.learns_cookie(),
                    named,
                    error.clone(),
                ));
            }
        }
        // The backend a session kept in memory failed on: it stays off it
        // wherever it is routed to it again.
        let failed_on = unread
            .as_ref()
            .filter(|u| u.failed)
            .map(|u| u.backend.clone());
        // A stored record is authoritative (it follows moves made on other
        // replicas). Without one, a session kept in memory stays where it
        // is, and a verified cookie names the backend, unless that backend
        // is not in the pool: a session nobody knows on a backend nobody
        // knows is no session.
        let session = match (stored, unread, &cookie) {
            (Stored::Found(stored), _, _) => Some(stored),
            // A record a restore has yet to take names where its session
            // goes (or where it moved to since), whatever a cookie says:
            // moved off that backend only as any session is.
            (Stored::Unrestored(record), _, _) => Some(record),
            // The store holds no record: the session kept in memory is
            // saved from now on, and routed as any known session (kept off
            // its backend if its last request failed, moved if that
            // backend cannot serve it). Its response saves it.
            (Stored::Absent, Some(unread), _) => {
                let session = self.with_member_id(Session::new(&*key, unread.backend));
                let tag = self.tag(&key, &session.backend);
                let (hit, dropped, kept) = self.table.keep(session, tag, unread.failed);
                self.count_dropped(dropped);
                let (key, backend) = (hit.key.clone(), hit.backend.clone());
                let named = self.named_on_miss(cookie, &hit.backend);
                let mut routed = self.pin(req, hit, named);
                match &mut routed {
                    Ok(Track::Known { save, .. }) => *save = kept,
                    Err(_) if kept => self.table.unkeep(&key, &backend),
                    _ => {}
                }
                return routed;
            }
            // Still unread (or not this instance's): it stays in memory
            // where it is.
            (_, Some(unread), _) => Some(Session::new(&*key, unread.backend)),
            (_, None, Some(backend)) if self.config.backends.status(backend) == Status::Missing => {
                self.reject(Reject::UnknownBackend);
                return Ok(Track::Fresh);
            }
            (_, None, Some(backend)) => Some(Session::new(&*key, backend.clone())),
            (_, None, None) => None,
        };
        match session {
            Some(session) => {
                let session = self.with_member_id(session);
                let tag = self.tag(&key, &session.backend);
                let (mut hit, dropped, _) = self.insert_new(session, tag, kept);
                self.count_dropped(dropped);
                // Also when the read put the record in the table first
                // (it knows nothing of the failure).
                if !hit.failed && failed_on.as_ref() == Some(&hit.backend) {
                    self.table.set_failed(&hit.key, &hit.backend, true);
                    hit.failed = true;
                }
                let named = self.named_on_miss(cookie, &hit.backend);
                self.pin(req, hit, named)
            }
            None => Ok(Track::New { key, kept }),
        }
    }

    /// What the cookie of a request whose session the table did not know
    /// named: with renewal on, the session's own value is due to be sent
    /// again, since the table does not know when the client got it (long
    /// ago, if the session idled out or was restored).
    fn named_on_miss(&self, cookie: Option<BackendId>, backend: &BackendId) -> Named {
        match cookie {
            Some(named) if self.table.renews_cookies() && named == *backend => Named::Renew,
            other => Named::from_option(other),
        }
    }

    /// Whether the store may hold a record of `key`. In replication mode
    /// other instances write the store, so any key may have one. A
    /// standalone instance is the only one writing it: once `restore` has
    /// loaded it, a key it neither loaded nor saved since has none.
    fn may_have_record(&self, key: &str) -> bool {
        !self.tracks_records() || self.records.lock().may_hold(key)
    }

    /// Whether the keys of the stored records are kept: only strict mode
    /// asks (see `after_load`), and the set grows with every session
    /// saved.
    fn tracks_records(&self) -> bool {
        self.config.strict
            && self.config.availability == Availability::Standalone
            && self.config.store.is_some()
    }

    /// Pins a request to its session's backend, or lets it go elsewhere.
    ///
    /// Outside strict mode the backend's state is not read here: the
    /// balancer honours the affinity only when the backend is available
    /// (or draining but healthy), and the response tells where the request
    /// went. A session whose last request failed is kept off that backend
    /// through `Attempts`. Strict mode refuses a backend that is neither
    /// available nor draining (a draining backend still finishes its
    /// sessions). It cannot tell whether the balancer is in panic routing,
    /// where an enabled backend out of health would keep its sessions, and
    /// refuses rather than send a session to a backend out of health.
    #[inline(always)]
    fn pin<B>(
        &self,
        req: &mut Request<B>,
        hit: Hit,
        cookie: Named,
    ) -> Result<Track, SessionUnavailable> {
        if self.config.strict {
            let status = self.config.backends.status(&hit.backend);
            if !matches!(status, Status::Available | Status::Draining) {
                bump(&self.counters.strict_refusals, 1);
                return Err(self.unavailable(&hit.key, hit.backend));
            }
            // That backend or none: should it become unavailable before the
            // balancer picks, or fail, the request goes nowhere else.
            let ext = req.extensions_mut();
            ext.insert(Affinity(hit.backend.clone()));
            ext.insert(AffinityRequired);
        } else if hit.failed && self.config.backends.another_available(&hit.backend) {
            let ext = req.extensions_mut();
            match ext.get_mut::<Attempts>() {
                Some(attempts) if !attempts.contains(&hit.backend) => {
                    attempts.push(hit.backend.clone())
                }
                Some(_) => {}
                None => {
                    ext.insert(std::iter::once(hit.backend.clone()).collect::<Attempts>());
                }
            }
        } else {
            req.extensions_mut().insert(Affinity(hit.backend.clone()));
        }
        Ok(Track::Known {
            key: hit.key,
            backend: hit.backend,
            cookie,
            failed: hit.failed,
            save: false,
            saved: hit.saved,
        })
    }

    /// Why a session left `backend`.
    fn reason(&self, backend: &BackendId, failed: bool) -> MoveReason {
        if failed {
            return MoveReason::Failed;
        }
        match self.config.backends.status(backend) {
            Status::Missing => MoveReason::Removed,
            Status::Unavailable => MoveReason::Unavailable,
            // The balancer honours the affinity for both: another backend
            // served the request because a lower layer had it so.
            Status::Available | Status::Draining => MoveReason::ServedElsewhere,
        }
    }

    /// Loads `key` from the store, once for all concurrent requests; and,
    /// with `restore`, restores it (replication mode, see `read`).
    fn load(
        self: &Arc<Self>,
        store: Arc<dyn SessionStore>,
        key: Arc<str>,
        restore: bool,
    ) -> BoxFuture<Loaded> {
        let shared = self.clone();
        Box::pin(async move {
            // Registered under the lock that finds the load, so that it
            // cannot leave the map before this request counts; and held
            // until the request is routed (see `after_load`). It leaves the
            // map when done, or when every request waiting on it is dropped
            // (a client gone while the store was slow: its read is stopped
            // then) and its restore task, if any, has ended.
            let (waiting, current) = {
                let mut loading = shared.loading.lock();
                let cell = loading.entry(key.clone()).or_default().clone();
                cell.registered.fetch_add(1, Ordering::Relaxed);
                cell.waiting.fetch_add(1, Ordering::Relaxed);
                let waiting = Waiting(Task {
                    shared: shared.clone(),
                    key: key.clone(),
                    cell,
                });
                // A load that finished since this request's lookup has put
                // the session in the table before leaving the map (one due
                // to be read again is not taken for a record).
                (waiting, shared.table.current(&key))
            };
            let stored = match current {
                Some(session) => Stored::Found(session),
                None => {
                    let cell = &waiting.0.cell;
                    cell.stored
                        .get_or_init(|| shared.read_once(&store, &key, cell, restore))
                        .await
                        .clone()
                }
            };
            Loaded { stored, waiting }
        })
    }

    /// Reads `key` for `cell`'s load, in a task of its own: a request that
    /// gives up on the load (its client gone) does not stop the read while
    /// another request waits for it, and that request waits for the same
    /// task instead of reading the store again. Once no request waits, the
    /// read is stopped (see `Waiting`). What it finds is remembered
    /// unless the session was forgotten meanwhile. Outside a tokio runtime
    /// there is no task to hand it to: the request reads the store itself.
    async fn read_once(
        self: &Arc<Self>,
        store: &Arc<dyn SessionStore>,
        key: &Arc<str>,
        cell: &Cell,
        restore: bool,
    ) -> Stored {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let stored = self.read(store, key, restore.then_some(cell)).await;
            self.remember_unless_stale(&stored, cell);
            return stored;
        };
        // Registered before the read's lock is taken, and an unused
        // registration ended after it is released: a registration takes
        // the loads' lock, which `Waiting::drop` holds while it takes the
        // read's.
        let task = Task::register(self.clone(), key.clone(), cell.clone());
        let (mut reading, unused) = {
            let mut slot = cell.reading.lock();
            match &*slot {
                Some(reading) => (reading.answer.clone(), Some(task)),
                None => {
                    let (done, answer) = watch::channel(None);
                    let store = store.clone();
                    // The registration keeps the load in the map while the
                    // task runs.
                    let handle = runtime.spawn(async move {
                        let Task { shared, key, cell } = &task;
                        let stored = shared.read(&store, key, restore.then_some(cell)).await;
                        shared.remember_unless_stale(&stored, cell);
                        done.send_replace(Some(stored));
                    });
                    *slot = Some(Reading {
                        answer: answer.clone(),
                        task: handle.abort_handle(),
                    });
                    (answer, None)
                }
            }
        };
        drop(unused);
        let answer = reading.wait_for(Option::is_some).await.map(|s| s.clone());
        match answer {
            Ok(Some(stored)) => stored,
            // The task panicked (in the store) or was cancelled at the
            // runtime's shutdown: as a store that could not be read.
            _ => {
                tracing::warn!(target: TARGET, session = %self.shown(key), "a session load ended without an answer");
                Stored::Unknown(Arc::new(StoreError::other(
                    "the load ended without an answer (the store panicked, or the runtime shut down)",
                )))
            }
        }
    }

    /// Remembers a session loaded by `cell`'s load unless it was forgotten
    /// meanwhile.
    fn remember_unless_stale(&self, stored: &Stored, cell: &Cell) {
        // Not under the loads' lock, which every miss takes.
        self.sweep();
        // Under the lock `forget` takes to mark loads stale, so a session
        // forgotten after this check is removed after it is remembered.
        let _loading = self.loading.lock();
        if !cell.stale.load(std::sync::atomic::Ordering::Acquire) {
            self.remember(stored);
        }
    }

    /// Reads `key` from the store (and, for `restore`'s load, restores it
    /// when a lock and a restore hook are configured).
    async fn read(
        self: &Arc<Self>,
        store: &Arc<dyn SessionStore>,
        key: &str,
        restore: Option<&Cell>,
    ) -> Stored {
        // Once the writes of the key this instance has queued have landed
        // (a slow save of a move, say): read before, the record would be
        // older than this instance's own change, whose notice it does not
        // hear, and would leave it behind the other replicas for good.
        let reading = async {
            if let Some(done) = Writes::behind(self, key) {
                let _ = landed(done).await;
            }
            bump(&self.counters.loaded, 1);
            store.load(key).await
        };
        let limit = self.config.load_wait;
        let loaded = crate::time::within(limit, reading)
            .await
            .unwrap_or_else(|| {
                Err(StoreError::timeout(format!(
                    "the session's record was not read within the load wait ({limit:?})"
                )))
            });
        let session = match loaded {
            Ok(Some(session)) if *session.key != *key => {
                // Another key's record: unreadable as this one's, and kept.
                let error = StoreError::corrupt(format!(
                    "the store answered the record of `{}` for another key",
                    self.shown(&session.key)
                ));
                self.store_error(key, "load", &error);
                return Stored::Unknown(Arc::new(error));
            }
            Ok(session) => session,
            Err(error) => {
                // A key the store cannot hold is the client's doing, not
                // the store's (see `route_miss`).
                if !error.is_invalid_key() {
                    self.store_error(key, "load", &error);
                }
                return Stored::Unknown(Arc::new(error));
            }
        };
        match (session, &self.config.lock, &self.config.on_restore, restore) {
            (Some(session), Some(lock), Some(hook), Some(cell)) => {
                // In a task of its own: a client gone meanwhile must not
                // stop a restore half-way, nor leave its lock to expire
                // while every other request for the session waits on it;
                // and the restored session is remembered even then.
                // Outside a tokio runtime there is no task to hand it to:
                // the request runs it itself.
                let store = store.clone();
                let (lock, hook) = (lock.clone(), hook.clone());
                // Registered before the task starts, so that the load stays
                // in the map while the task runs, whoever gives up on it;
                // it leaves the map when the task ends if its requests have
                // gone.
                let task = Task::register(self.clone(), Arc::from(key), cell.clone());
                let fallback = session.clone();
                let restoring = async move {
                    let Task { shared, cell, .. } = &task;
                    let stored = match shared.hydrate(&*store, &*lock, &hook, session, cell).await {
                        Some(session) => Stored::Found(session),
                        None => Stored::Absent,
                    };
                    shared.remember_unless_stale(&stored, cell);
                    stored
                };
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return restoring.await;
                };
                runtime.spawn(restoring).await.unwrap_or_else(|error| {
                    tracing::warn!(target: TARGET, session = %self.shown(&fallback.key), error = %self.shown_error(&fallback.key, &error), "session restore panicked; its record is kept");
                    Stored::Found(fallback)
                })
            }
            (Some(session), _, _, _) => Stored::Found(session),
            (None, _, _, _) => Stored::Absent,
        }
    }

    /// Puts a session read from the store in the table.
    fn remember(&self, stored: &Stored) {
        if let Stored::Found(session) = stored {
            // A load renews a record whose store expires records, as a
            // refresh does.
            if self.tracks_records() {
                self.records.lock().insert(&session.key);
            }
            let session = self.with_member_id(session.clone());
            let tag = self.tag(&session.key, &session.backend);
            let (_, dropped, _) = self.table.insert_if_absent(session, tag, Kept::Saved);
            self.count_dropped(dropped);
        }
    }

    /// Restores a session loaded in replication mode, one instance at a
    /// time: the instance that takes `lock` re-reads the record, runs the
    /// `on_restore` hook and reads the record the hook left; the others
    /// wait for it and take the record as it left it. The session is
    /// routed to its stored backend either way; a hook or lock failure is
    /// logged and keeps the record. `None` when the record is gone by the
    /// time the lock is had (the session ended meanwhile): nothing is
    /// restored.
    async fn hydrate(
        &self,
        store: &dyn SessionStore,
        lock: &dyn SessionLock,
        hook: &OnRestore,
        loaded: Session,
        cell: &Cell,
    ) -> Option<Session> {
        let key = loaded.key.clone();
        let key = key.as_str();
        let reread = |fallback: Session| async move {
            match store.load(key).await {
                Ok(Some(s)) if s.key == key => Some(s),
                Ok(Some(_)) => Some(fallback),
                Ok(None) => None,
                Err(error) => {
                    self.store_error(key, "load", &error);
                    Some(fallback)
                }
            }
        };
        match lock.lock(key).await {
            Ok(Some(guard)) => {
                let held = Held(Some(guard));
                let mut restored = reread(loaded).await;
                if let Some(session) = restored.take() {
                    match self.run_restore_hook(hook, session.clone()).await {
                        Ok(()) => bump(&self.counters.hydrated, 1),
                        Err(error) => tracing::warn!(
                            target: TARGET,
                            session = %self.shown(&session.key),
                            backend = %session.backend,
                            error = %self.shown_error(&session.key, &*error),
                            "session restore failed; its record is kept"
                        ),
                    }
                    // Routed by the record the hook left (it may have
                    // started the session's state elsewhere and saved
                    // that), as the instances waiting for the lock are.
                    restored = reread(session).await;
                    // Known here before the lock says the restore is done,
                    // so that this instance's next request for it does not
                    // restore it again.
                    if let Some(session) = &restored {
                        self.remember_unless_stale(&Stored::Found(session.clone()), cell);
                    }
                }
                if let Err(error) = held.release().await {
                    self.store_error(key, "unlock", &error);
                }
                restored
            }
            Ok(None) => reread(loaded).await,
            Err(error) => {
                self.store_error(key, "lock", &error);
                Some(loaded)
            }
        }
    }

    /// Runs the `on_restore` hook for `session` within the configured time
    /// limit: a hook still running then is stopped and fails with
    /// `RestoreTimedOut`. It runs in a task of its own, so that a hook
    /// that panics fails its session alone (`RestorePanicked`): the other
    /// sessions are restored and a lock taken for it is released. Outside
    /// a tokio runtime, with no timer to measure it and no task to hand it
    /// to, the caller runs it without a limit.
    async fn run_restore_hook(&self, hook: &OnRestore, session: Session) -> Result<(), BoxError> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return hook(session).await;
        };
        let hook = hook.clone();
        // Stopped if its restore is dropped, as the hook was when it ran
        // in the restore's own future.
        let mut task = AbortOnDrop(runtime.spawn(async move { hook(session).await }));
        let limit = self.config.restore_timeout;
        match crate::time::within(limit, &mut task.0).await {
            Some(Ok(restored)) => restored,
            Some(Err(e)) if e.is_panic() => Err(RestorePanicked::default().into()),
            Some(Err(e)) => Err(e.into()),
            None => {
                // Stopped before the lock it runs under is released: a hook
                // in the middle of a poll on another thread stops at its
                // next await, and no other replica restores the session
                // while it still runs.
                task.0.abort();
                let _ = (&mut task.0).await;
                Err(RestoreTimedOut::new(limit).into())
            }
        }
    }

    /// Drops what the table knows about `key`, keeping its stored record:
    /// the next request for it loads it again (replication mode).
    pub(crate) fn forget(&self, key: &str) -> bool {
        self.end(key).is_some()
    }

    /// Forgets `key` as [`forget`](Self::forget) does; returns whether the
    /// session it dropped from the table was saved, or `None` when the
    /// table did not hold it.
    fn end(&self, key: &str) -> Option<bool> {
        // Under the loads' lock until the session is out of the table: a
        // load begun meanwhile would find it there, and put it back.
        let mut loading = self.loading.lock();
        if let Some(load) = loading.remove(key) {
            load.stale.store(true, std::sync::atomic::Ordering::Release);
        }
        self.drop_known(key)
    }

    /// Drops `key` from the table and from what the restores under way
    /// put back; returns what `end` does.
    fn drop_known(&self, key: &str) -> Option<bool> {
        // Under the lock a restore puts sessions back under: the record it
        // loaded may be older than the store's.
        let mut restores = self.restores.lock();
        restores.forget(key);
        self.table.take(key)
    }

    /// Waits until no write to the store is queued or under way.
    pub(crate) async fn flush(self: &Arc<Self>) {
        self.writes.flush().await;
        let mut unsaved = 0;
        if let Some(store) = &self.config.store {
            // Each once, at most as many at a time as the limit of keys with
            // writes under way, once those under way have landed.
            let keys = self.table.take_unsaved();
            for keys in keys.chunks(self.config.max_pending_writes.max(1)) {
                let saves: Vec<_> = keys
                    .iter()
                    .filter_map(|key| self.resave(store, key.clone()))
                    .collect();
                // The next batch's places (a queue goes once its result is
                // told).
                self.writes.flush().await;
                for save in saves {
                    // A key the store cannot hold stays in memory only.
                    if landed(save).await.is_err_and(|e| !e.is_invalid_key()) {
                        unsaved += 1;
                    }
                }
            }
        }
        // A move's hook is counted from when the move was decided.
        self.hooks.idle().await;
        if unsaved > 0 {
            tracing::warn!(target: TARGET, unsaved, "sessions whose records the store failed to save again (see store_errors): their records may name backends they left");
        }
    }

    /// Drops every session whose record the table follows, keeping the
    /// stored records and the sessions held in memory only (see
    /// `Table::forget_saved`).
    pub(crate) fn forget_all(&self) -> usize {
        // Held until the sessions are out of the table (see `end`).
        let mut loading = self.loading.lock();
        for (_, load) in loading.drain() {
            load.stale.store(true, std::sync::atomic::Ordering::Release);
        }
        let mut restores = self.restores.lock();
        for forgotten in &mut restores.running {
            forgotten.all = true;
            forgotten.keys = HashSet::new();
        }
        self.table.forget_saved()
    }

    /// The path of `req`, kept for its response when the layer learns an
    /// application's cookie: a deletion of it on a path the request is not
    /// under does not end the request's session.
    pub(crate) fn learns_on<B>(&self, req: &Request<B>) -> Option<PathAndQuery> {
        self.learns_cookie()
            .then(|| req.uri().path_and_query().cloned())
            .flatten()
    }

    /// Learns from a response to a request for `path` (see
    /// [`learns_on`](Self::learns_on)): starts, moves or ends sessions,
    /// sets the cookie. Returns the store and hook work to finish before
    /// the response is handed on.
    pub(crate) fn on_response<RB>(
        self: &Arc<Self>,
        track: Track,
        response: &mut Response<RB>,
        path: Option<&str>,
    ) -> Result<Option<BoxFuture<()>>, SessionUnavailable> {
        if let Some(c) = self.config.key.cookie() {
            let removed = c.remove_backends_lines(response.headers_mut());
            if removed > 0 {
                tracing::debug!(target: TARGET, removed, cookie = c.name(), "the backend set the layer's cookie; its lines were removed");
            }
        }
        // Every attempt failed: the failover layer gave up with this
        // response (see below).
        let gave_up = response.extensions().get::<GaveUp>().is_some();
        // The common case, a hit served by its own backend: nothing to learn.
        if let Track::Known {
            key,
            backend,
            cookie,
            failed: false,
            save: false,
            ..
        } = &track
        {
            let learns = match &self.config.key.kind {
                Kind::Learn(_) => true,
                // A server that assigns ids may assign another.
                Kind::Header(name) => {
                    (response.headers().get(name)).is_some_and(|v| v.as_bytes() != key.as_bytes())
                }
                Kind::Insert(_) | Kind::Fn(_) => false,
            };
            // Its cookie names its backend, and is not due to be sent again.
            let current =
                !matches!(cookie, Named::Renew) && cookie.get(backend).is_none_or(|c| c == backend);
            if !learns
                && current
                && !gave_up
                && (response.extensions().get::<ServedBy>()).is_some_and(|s| s.0 == *backend)
            {
                return Ok(None);
            }
        }
        let served = response.extensions().get::<ServedBy>().map(|s| s.0.clone());
        let mut work = Work::default();
        let mut current: Option<Arc<str>> = None;
        // Whether the stored record of `current` is the one the layer read
        // or wrote for it (see `Track::Known::saved`).
        let mut owned = false;
        // A session started from the request's own cookie value, not yet
        // saved (learned cookies).
        let mut unconfirmed = false;
        match (track, served.as_ref()) {
            (
                Track::Known {
                    key,
                    backend,
                    save,
                    saved,
                    ..
                },
                Some(_),
            ) if gave_up => {
                // Every attempt failed, and the failover layer gave up with
                // the last backend's failed response: the session does not
                // move there. Its own backend, if tried (first, or alone),
                // failed: kept off it, as when the attempts end in an error
                // (`on_error`).
                let tried = response.extensions().get::<Attempts>();
                if tried.is_some_and(|tried| tried.contains(&backend)) {
                    self.table.set_failed(&key, &backend, true);
                }
                if save {
                    self.table.unkeep(&key, &backend);
                }
                current = Some(key);
                owned = saved;
            }
            (
                Track::Known {
                    key,
                    backend,
                    cookie,
                    failed,
                    save,
                    saved,
                },
                Some(served),
            ) => {
                if *served == backend {
                    if failed {
                        self.table.set_failed(&key, &backend, false);
                    }
                    if save {
                        // The session as the table has it now (a
                        // concurrent request may have moved it since); a
                        // session that left the table meanwhile (ended, or
                        // forgotten on another replica's notice) is not
                        // written back.
                        self.decide(&mut work, || {
                            ((), self.table.session(&key).map(Write::Save))
                        });
                    }
                    if self.config.key.cookie().is_some() && cookie.get(&backend) != Some(served) {
                        // The cookie names the session's backend as the
                        // table has it now: a concurrent request may have
                        // moved it since this one was routed (a session
                        // that left the table gets none).
                        if let Some(now) = self.table.backend(&key) {
                            self.reissue(response, &key, cookie.get(&backend), &now);
                        }
                    }
                } else if self.config.strict {
                    bump(&self.counters.strict_refusals, 1);
                    if save {
                        self.table.unkeep(&key, &backend);
                    }
                    return Err(self.unavailable(&key, backend));
                } else {
                    let reason = self.reason(&backend, failed);
                    let tag = self.tag(&key, served);
                    let moved = self.decide(&mut work, || {
                        // A session whose record a restore has yet to take
                        // goes on to its new backend until then, and the
                        // restore keeps the move: both decided under the
                        // lock that restore takes the record under. So does
                        // one the table held, saved, when the restore
                        // listed it (see `restore`): its saved move is
                        // newer than the record listed, which must not
                        // route it back once it leaves the table.
                        let mut unrestored = self.unrestored.lock();
                        let moved = self.table.move_if(&key, &backend, served, tag);
                        if moved.is_some() {
                            if let Some(routed) = unrestored.get_mut(&*key) {
                                routed.backend = served.clone();
                            }
                        }
                        drop(unrestored);
                        let save = moved.as_ref().filter(|m| m.saved);
                        let write = save.map(|m| Write::Save(m.session.clone()));
                        (moved, write)
                    });
                    if let Some(moved) = moved {
                        bump(&self.counters.moved, 1);
                        tracing::info!(
                            target: TARGET,
                            session = %self.shown(&key),
                            from = %moved.from,
                            to = %served,
                            %reason,
                            "session moved"
                        );
                        crate::control::emit(self.config.events.as_ref(), || {
                            crate::control::Event::SessionMoved {
                                session: self.shown(&key).to_string().into(),
                                from: moved.from.clone(),
                                to: served.clone(),
                                reason: reason.as_str().into(),
                            }
                        });
                        work.moved = Some(SessionMoved {
                            session: moved.session,
                            from: moved.from,
                            reason,
                        });
                    }
                    // Whoever moved it, the table now names its backend.
                    if let Some(now) = self.table.backend(&key) {
                        self.reissue(response, &key, cookie.get(&backend), &now);
                    }
                }
                // A value the application had not confirmed when it was
                // first seen may be confirmed now; a record this instance
                // did not restore stays the restore's.
                unconfirmed = !saved && !self.unrestored.lock().contains_key(&key);
                current = Some(key);
                owned = saved;
            }
            (
                Track::Known {
                    key,
                    backend,
                    save,
                    saved,
                    ..
                },
                None,
            ) => {
                if save {
                    // Nothing says where it was served: not saved, read
                    // again on the next request.
                    self.table.unkeep(&key, &backend);
                }
                current = Some(key);
                owned = saved;
            }
            (Track::New { key, kept }, Some(served)) => {
                // An application's session cookie is trusted once the
                // application sets it: until then the binding stays in
                // memory, so that made-up values fill no store.
                let learns = self.learns_cookie();
                unconfirmed = learns && kept == Kept::Saved;
                let kept = if unconfirmed { Kept::Memory } else { kept };
                let bound = self.start_new(&mut work, &key, served, kept);
                if let Some(c) = self.config.key.cookie() {
                    self.send_cookie(response, c, &key, &bound);
                }
                current = Some(key);
                owned = kept == Kept::Saved;
            }
            (Track::New { key, .. }, None) => current = Some(key),
            (Track::Fresh, Some(served)) => match &self.config.key.kind {
                // No session starts on a backend whose cookie no later
                // request could present.
                Kind::Insert(c) if self.cookie_carries(served) => {
                    let sid = CookieInsert::new_session_id();
                    self.create(&mut work, &sid, served.clone());
                    self.send_cookie(response, c, &sid, served);
                }
                Kind::Insert(_) | Kind::Header(_) | Kind::Learn(_) | Kind::Fn(_) => {}
            },
            (Track::Fresh, None) => {}
        }
        if let (Kind::Header(name), Some(served)) = (&self.config.key.kind, &served) {
            // A server that assigns ids: the id a response names is a
            // session on the backend that served it, also when the request
            // named another (one the server no longer knows, say).
            let assigned = response.headers().get(name).map(|v| v.as_bytes());
            let assigned = assigned.and_then(key::response_key);
            if let Some(k) = assigned.filter(|k| current.as_deref() != Some(*k)) {
                self.create(&mut work, k, served.clone());
            }
        }
        if let Kind::Learn(name) = &self.config.key.kind {
            match cookie::learn(response.headers(), name.as_str(), path) {
                Some(Learned::Set(value)) => {
                    if let (Some(k), Some(served)) = (key::response_key(value), &served) {
                        if current.as_deref() != Some(k) {
                            self.create(&mut work, k, served.clone());
                        } else if unconfirmed {
                            // The application confirmed the value: save it.
                            self.decide(&mut work, || {
                                ((), self.table.mark_saved(k).map(Write::Save))
                            });
                        }
                    }
                }
                Some(Learned::Deleted) => {
                    // The stored record goes only when it is this session's:
                    // one the layer read or wrote when it routed the
                    // request (whether or not the session is still in the
                    // table), or since (a restore took it meanwhile), or
                    // one a restore holds, which routed it (standalone
                    // mode). A record it could not read (a load error), or
                    // never wrote (a value the application had not
                    // confirmed), may belong to a session this backend
                    // simply does not know. Ended as `remove` ends it: no
                    // load or restore under way puts it back.
                    if let Some(k) = current {
                        let owned = self.decide(&mut work, || {
                            let saved = self.end(&k) == Some(true);
                            let owned = owned
                                || saved
                                || (self.config.availability == Availability::Standalone
                                    && self.unrestored.lock().remove(&*k).is_some());
                            (owned, owned.then(|| Write::Delete(k.to_string())))
                        });
                        if owned {
                            tracing::debug!(target: TARGET, session = %self.shown(&k), "session ended by the application");
                        } else {
                            tracing::debug!(
                                target: TARGET,
                                session = %self.shown(&k),
                                "session ended by the application; a stored record it never read is kept"
                            );
                        }
                    }
                }
                None => {}
            }
        }
        Ok(self.finish(work))
    }

    /// Records that a request failed, and returns its error; a failure of
    /// the session's own backend makes the next request move. A request the
    /// backend refused to send because the request itself is bad
    /// (`InvalidRequest`) says nothing about the backend: every backend
    /// would refuse it alike. In strict mode, a request that its session's
    /// backend could not take fails with `SessionUnavailable`.
    pub(crate) fn on_error(&self, track: &Track, error: BoxError) -> BoxError {
        self.unsaved(track);
        if let Track::Known { key, backend, .. } = track {
            if find::<InvalidRequest>(&*error).is_some() {
                return error;
            }
            // The session's backend failed the request, and whether it
            // failed it before it was sent. A connection it closed in the
            // normal way is not its failure.
            let own = |e: &BackendError| {
                (e.backend() == backend && !not_the_backends(e)).then(|| e.is_not_sent())
            };
            let own_failure = match find::<BackendError>(&*error) {
                Some(e) if e.backend() == backend => own(e),
                // Also when the failover layer tried others after it and
                // they failed too: its error then leads to the last
                // attempt's. Its attempt there may also have been abandoned
                // at the per-try timeout, or answered a failed response
                // (a 503), which was sent. Its latest attempt there: one
                // after a connection it closed gracefully failed.
                _ => find::<Exhausted>(&*error).and_then(|exhausted| {
                    let (_, failure) = exhausted
                        .attempts()
                        .iter()
                        .rev()
                        .find(|(id, _)| id == backend)?;
                    match find::<BackendError>(&**failure) {
                        Some(e) => own(e),
                        // Not the overall deadline: the request, not the
                        // backend, ran out of time.
                        None => find::<TimedOut>(&**failure)
                            .map(TimedOut::is_not_sent)
                            .or_else(|| find::<FailedStatus>(&**failure).map(|_| false)),
                    }
                }),
            };
            if own_failure.is_some() {
                self.table.set_failed(key, backend, true);
            }
            // Its backend could not take it: the balancer had no backend
            // for it (none but the session's may take it, see
            // `AffinityRequired`), or the backend failed it before it was
            // sent (a refused connection, or a backend that did not become
            // ready within the per-try timeout), whether or not a failover
            // layer then asked the balancer for another.
            let could_not_take = find::<NoBackend>(&*error).is_some() || own_failure == Some(true);
            if self.config.strict && could_not_take {
                bump(&self.counters.strict_refusals, 1);
                return self.unavailable(key, backend.clone()).failed(error).into();
            }
        }
        error
    }

    /// A request that will not save the session it was to save (it failed
    /// or was dropped): its record is read again on the next request.
    pub(crate) fn unsaved(&self, track: &Track) {
        if let Track::Known {
            key,
            backend,
            save: true,
            ..
        } = track
        {
            self.table.unkeep(key, backend);
        }
    }

    /// Starts a session a request named (`Track::New`) on the backend that
    /// served it, unless a concurrent request started it first; returns the
    /// session's backend. Saved when `kept` says so.
    fn start_new(
        self: &Arc<Self>,
        work: &mut Work,
        key: &str,
        served: &BackendId,
        kept: Kept,
    ) -> BackendId {
        let session = Session::new(key, served.clone());
        let to_save = (kept == Kept::Saved).then(|| session.clone());
        let tag = self.tag(key, served);
        let (hit, dropped, inserted) = self.decide_new(work, || {
            let made = self.insert_new(session, tag, kept);
            let write = to_save.filter(|_| made.2).map(Write::Save);
            (made, write)
        });
        self.count_dropped(dropped);
        if inserted {
            bump(&self.counters.created, 1);
        }
        hit.backend
    }

    /// Drops one shard's idle sessions if a sweep is due or under way. The table's
    /// changes do not sweep: call this before a change that may add a
    /// session, before taking any lock of the layer's own.
    fn sweep(&self) {
        self.count_dropped(self.table.sweep_if_due());
    }

    /// Puts a session routed on a miss in the table, unless the table keeps
    /// its key already (see `Table::insert_if_absent`). One routed as a
    /// record a restore holds stays in memory only while the restore holds
    /// it; decided under the `unrestored` lock, so that a restore that lets
    /// the record go (forgotten meanwhile) finds and drops it, or it is put
    /// in to be read from the store at its next request.
    fn insert_new(
        &self,
        session: Session,
        cookie: Option<Box<str>>,
        kept: Kept,
    ) -> (crate::sticky::table::Hit, Dropped, bool) {
        if kept != Kept::Unrestored {
            return self.table.insert_if_absent(session, cookie, kept);
        }
        let unrestored = self.unrestored.lock();
        let kept = if unrestored.contains_key(session.key.as_str()) {
            Kept::Memory
        } else {
            Kept::Reread
        };
        self.table.insert_if_absent(session, cookie, kept)
    }

    /// Starts the session `key` a response named on `backend`, and saves
    /// it, unless the layer already keeps a session of that key, which
    /// keeps its backend (see `Table::insert_named`).
    fn create(self: &Arc<Self>, work: &mut Work, key: &str, backend: BackendId) {
        let tag = self.tag(key, &backend);
        let session = Session::new(key, backend);
        let (hit, dropped, inserted) = self.decide_new(work, || {
            let write = Write::Save(session.clone());
            let made = self.table.insert_named(session, tag);
            let write = made.2.then_some(write);
            (made, write)
        });
        self.count_dropped(dropped);
        if inserted {
            bump(&self.counters.created, 1);
        } else {
            tracing::debug!(
                target: TARGET,
                session = %self.shown(key),
                backend = %hit.backend,
                "a response named a session the layer keeps; it stays on its backend"
            );
        }
    }

    fn reissue<RB>(
        &self,
        response: &mut Response<RB>,
        key: &str,
        cookie_backend: Option<&BackendId>,
        backend: &BackendId,
    ) {
        if let Some(c) = self.config.key.cookie() {
            if cookie_backend != Some(backend) {
                self.send_cookie(response, c, key, backend);
            }
        }
    }

    /// Sets the layer's cookie for session `key` on `backend`.
    /// Whether the layer's cookie can name `backend`: an id that is empty
    /// or over 768 bytes could not be read back from it. Warns (once; then
    /// at debug level) when it cannot.
    fn cookie_carries(&self, backend: &BackendId) -> bool {
        let len = backend.as_str().len();
        if len > 0 && len <= cookie::MAX_BACKEND_ID {
            return true;
        }
        let message = "backend id empty or too long for the sticky cookie; no cookie issued";
        match self
            .warned_uncarried
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            false => tracing::warn!(target: TARGET, %backend, "{message}"),
            true => tracing::debug!(target: TARGET, %backend, "{message}"),
        }
        false
    }

    fn send_cookie<RB>(
        &self,
        response: &mut Response<RB>,
        c: &CookieInsert,
        key: &str,
        backend: &BackendId,
    ) {
        if !self.cookie_carries(backend) {
            return;
        }
        let value = c.value(key, backend);
        if let Some(header) = c.set_cookie(&value) {
            response.headers_mut().append(SET_COOKIE, header);
            c.keep_from_shared_caches(response.headers_mut());
            self.table.cookie_sent(key);
        }
    }

    /// Makes a change of the table with `change` and queues the store
    /// write it decides in the same step (see `Writes::decide`); the
    /// response waits for it to land.
    fn decide<R>(
        self: &Arc<Self>,
        work: &mut Work,
        change: impl FnOnce() -> (R, Option<Write>),
    ) -> R {
        self.decide_with(work, false, change)
    }

    /// [`decide`](Self::decide) for a change that starts a session, whose
    /// save `max_pending_writes` bounds.
    fn decide_new<R>(
        self: &Arc<Self>,
        work: &mut Work,
        change: impl FnOnce() -> (R, Option<Write>),
    ) -> R {
        self.decide_with(work, true, change)
    }

    fn decide_with<R>(
        self: &Arc<Self>,
        work: &mut Work,
        new: bool,
        change: impl FnOnce() -> (R, Option<Write>),
    ) -> R {
        // Not under the write queues' lock, which every write of every
        // session takes, nor under the lock of the records a restore holds.
        self.sweep();
        let Some(store) = &self.config.store else {
            return change().0;
        };
        let (made, done) = Writes::decide(self, store, new, || {
            let (made, write) = change();
            if let (true, Some(write)) = (self.tracks_records(), &write) {
                // Before the response is handed on, so that the next
                // request for the key finds it.
                let mut records = self.records.lock();
                match write {
                    Write::Save(session) => records.insert(&session.key),
                    Write::Delete(key) => records.remove(key),
                    // A save again is queued by `resave`, which notes it.
                    Write::Refresh(_) | Write::Resave(_) | Write::Barrier(_) => {}
                }
            }
            (made, write)
        });
        work.writes.extend(done);
        made
    }

    fn finish(self: &Arc<Self>, work: Work) -> Option<BoxFuture<()>> {
        let hidden = self.learns_cookie();
        let hooked = (self.config.on_move.clone().zip(work.moved)).map(|(hook, moved)| {
            let running = self.hooks.start(moved.session.key.as_str().into(), hidden);
            (hook, moved, running)
        });
        if work.writes.is_empty() && hooked.is_none() {
            return None;
        }
        let limit = self.config.move_timeout;
        Some(Box::pin(async move {
            // A failure was counted and logged where it happened.
            for done in work.writes {
                let _ = done.await;
            }
            if let Some((hook, moved, running)) = hooked {
                match crate::time::within(limit, hook(moved)).await {
                    Some(Ok(())) => {}
                    Some(Err(error)) => {
                        let error = ShownError {
                            key: running.shown(),
                            error: &*error,
                        };
                        tracing::warn!(target: TARGET, session = %running.shown(), %error, "on_move hook failed");
                    }
                    None => {
                        tracing::warn!(target: TARGET, session = %running.shown(), ?limit, "on_move hook ran past its limit; stopped");
                    }
                }
                running.ended();
            }
        }))
    }

    fn store_error(&self, key: &str, op: &'static str, error: &StoreError) {
        bump(&self.counters.store_errors, 1);
        let error = self.shown_error(key, error);
        match self.store_warnings.pass() {
            Some(held_back) => {
                tracing::warn!(target: TARGET, session = %self.shown(key), op, %error, held_back, "session store call failed (held_back: failures not logged at warn level since the last warning)")
            }
            None => {
                tracing::debug!(target: TARGET, session = %self.shown(key), op, %error, "session store call failed")
            }
        }
    }

    /// A response handed on after `response_wait`, before its session's
    /// store writes or `on_move` hook finished.
    pub(crate) fn handed_on_early(&self) {
        let limit = self.config.response_wait;
        match self.early_warnings.pass() {
            Some(held_back) => {
                tracing::warn!(target: TARGET, ?limit, held_back, "a response was handed on before its session's store writes or on_move hook finished (held_back: responses not logged at warn level since the last warning)")
            }
            None => {
                tracing::debug!(target: TARGET, ?limit, "a response was handed on before its session's store writes or on_move hook finished")
            }
        }
    }

    /// Loads every stored session and restores it (see `Sticky::restore`).
    pub(crate) async fn restore(self: &Arc<Self>) -> Result<RestoreReport, StoreError> {
        let mut report = RestoreReport::default();
        let Some(store) = &self.config.store else {
            tracing::warn!(target: TARGET, "restore without a session store: nothing to load");
            return Ok(report);
        };
        // From before the listing on: a session forgotten or ended
        // meanwhile is not put back as listed, as the store holds newer.
        let restoring = Restoring::begin(self);
        let mut loaded = store.load_all().await?;
        drop_repeated(&mut loaded);
        report.skipped = loaded.skipped;
        if self.tracks_records() {
            let mut records = self.records.lock();
            loaded.sessions.iter().for_each(|s| records.insert(&s.key));
            records.restored = true;
        }
        // Until its hook has run, a loaded record is not this instance's to
        // read on a miss (standalone mode), as if its restore had failed: a
        // request meanwhile goes to the record's backend, and if it moves
        // the session, the move is kept in memory, not saved over a record
        // the restore then reads, until the restore takes the record.
        // Records left over by a restore dropped part-way, or failed, stay
        // so until a later `restore`, with any move made since; one the
        // store no longer lists (expired, or deleted by hand) is let go
        // then: its session stays where it is routed until its next request
        // reads the store. Not by a listing that skipped records (one may
        // be a record left over, unreadable for now), nor while another
        // restore runs (its listing may be newer).
        {
            let mut unrestored = self.unrestored.lock();
            let restores = self.restores.lock();
            if report.skipped.is_empty() && restores.running.len() == 1 {
                let listed: HashSet<&str> =
                    loaded.sessions.iter().map(|s| s.key.as_str()).collect();
                unrestored.retain(|key, _| {
                    let kept = listed.contains(&**key);
                    if !kept {
                        self.table.reread_unsaved(key);
                    }
                    kept
                });
            }
            for session in &loaded.sessions {
                if !restores.forgotten(restoring.id, &session.key) {
                    unrestored
                        .entry(Arc::from(session.key.as_str()))
                        .or_insert_with(|| {
                            // A session the table holds saved (read, or
                            // moved and saved, before or while the store
                            // was listed) goes where the table has it: as
                            // the last step below, which keeps it, does.
                            let mut routed = session.clone();
                            if let Some(held) = self.table.saved(&session.key) {
                                routed.backend = held.backend;
                            }
                            routed
                        });
                }
            }
        }
        for mut session in loaded.sessions {
            if self.restores.lock().forgotten(restoring.id, &session.key) {
                // Its next request reads the store; not from memory, where
                // a request may have routed it meanwhile.
                let mut unrestored = self.unrestored.lock();
                if unrestored.remove(session.key.as_str()).is_some() {
                    self.table.remove_unsaved(&session.key);
                }
                continue;
            }
            if let Some(hook) = &self.config.on_restore {
                if let Err(error) = self.run_restore_hook(hook, session.clone()).await {
                    tracing::warn!(
                        target: TARGET,
                        session = %self.shown(&session.key),
                        backend = %session.backend,
                        error = %self.shown_error(&session.key, &*error),
                        "session restore failed; its record is kept"
                    );
                    report.failed.push(RestoreFailure {
                        key: session.key,
                        backend: session.backend,
                        error,
                    });
                    continue;
                }
            }
            let key = session.key.clone();
            // Not under the locks below.
            self.sweep();
            let moved = {
                // Under the lock `remove` ends a session under: one ended
                // since the load (while the hooks ran) is not put back.
                let mut unrestored = self.unrestored.lock();
                let Some(routed) = unrestored.remove(key.as_str()) else {
                    continue;
                };
                // Nor is one forgotten since the load (the store holds
                // newer): its next request reads the store.
                let restores = self.restores.lock();
                if restores.forgotten(restoring.id, &key) {
                    self.table.remove_unsaved(&key);
                    continue;
                }
                // One that moved while the record was not taken stays where
                // it went: a session does not move back. Its record follows
                // it once put.
                let moved = routed.backend != session.backend;
                session.backend = routed.backend;
                let session = self.with_member_id(session);
                let tag = self.tag(&session.key, &session.backend);
                // A session the table read or saved since the load is newer
                // than the record restored (replication mode, or a miss read
                // before this restore began).
                let (put, dropped) = self.table.restore(session, tag);
                self.count_dropped(dropped);
                put && moved
            };
            if moved {
                tracing::debug!(
                    target: TARGET,
                    session = %self.shown(&key),
                    "restored on the backend it moved to while its record was not taken"
                );
                let mut work = Work::default();
                self.decide(&mut work, || ((), self.table.saved(&key).map(Write::Save)));
                // A write that fails is counted and reported where it ran.
                for done in work.writes {
                    let _ = landed(done).await;
                }
            }
            report.restored.push(key);
        }
        // The records taken leave their room behind: a million of them
        // would hold a quarter of a gigabyte of it for the process's life.
        let mut unrestored = self.unrestored.lock();
        if unrestored.capacity() > 4 * unrestored.len().max(64) {
            unrestored.shrink_to_fit();
        }
        Ok(report)
    }

    /// Ends a session: forgets it and deletes its stored record.
    pub(crate) async fn remove(self: &Arc<Self>, key: &str) -> Result<bool, StoreError> {
        // A load under way may have read the record: it is not remembered.
        let Some(store) = &self.config.store else {
            return Ok(self.forget(key));
        };
        // Forgotten as the delete is queued, behind the writes of the
        // changes made before.
        let (known, done) = Writes::decide(self, store, false, || {
            (self.forget(key), Some(Write::Delete(key.to_owned())))
        });
        let done = done.expect("a delete was decided");
        // Once the delete lands, even if the caller has given up waiting
        // (a logout whose client left): a record a restore kept would
        // otherwise route the key by what the store no longer holds.
        let (shared, key) = (self.clone(), key.to_owned());
        let after = async move {
            landed(done).await?;
            {
                // Nor is a restore under way, which may have listed it
                // before the delete landed. (A load begun since the delete
                // was queued read the store after it landed.)
                let mut unrestored = shared.unrestored.lock();
                unrestored.remove(key.as_str());
                shared.drop_known(&key);
            }
            shared.records.lock().remove(&key);
            Ok::<_, StoreError>(())
        };
        // Without a runtime the delete has failed already (see
        // `Writes::decide`): nothing to wait for.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return after.await.map(|()| known);
        };
        match runtime.spawn(after).await {
            Ok(result) => result.map(|()| known),
            Err(stopped) if stopped.is_panic() => std::panic::resume_unwind(stopped.into_panic()),
            Err(_) => Err(StoreError::other(
                "the delete's task stopped (the runtime shut down) before it landed",
            )),
        }
    }
}

impl Owner for Shared {
    fn writes(&self) -> &Writes {
        &self.writes
    }

    fn failed(&self, write: &Write, error: &StoreError) {
        self.store_error(write.key(), write.op(), error);
        match write {
            // A key the store cannot hold (one a backend assigned, say):
            // the session stays in memory only, and its record is read
            // once more, which finds that too (see `route_miss`), rather
            // than saved again at every refresh.
            Write::Save(session) if error.is_invalid_key() => {
                self.table.unkeep(&session.key, &session.backend);
            }
            Write::Resave(key) if error.is_invalid_key() => {
                if let Some(backend) = self.table.backend(key) {
                    self.table.unkeep(key, &backend);
                }
            }
            // Saved again later: the record may name a backend the session
            // left. (A refresh that joined it is one of its writes.)
            Write::Save(Session { key, .. }) | Write::Resave(key) => self.table.save_failed(key),
            Write::Refresh(key) => self.table.refresh_failed(key),
            Write::Delete(_) | Write::Barrier(_) => {}
        }
    }

    fn saved(&self, key: &str) -> Option<Session> {
        self.table.saved(key)
    }
}

/// A request's registration on a shared load (see `Shared::load`),
/// counted in `Load::registered` and `Load::waiting` when it was made.
pub(crate) struct Waiting(Task);

impl Drop for Waiting {
    fn drop(&mut self) {
        let Task { shared, cell, .. } = &self.0;
        // Under the lock a new request registers with, so that one that
        // comes after the read was stopped starts another.
        let _loading = shared.loading.lock();
        if cell.waiting.fetch_sub(1, Ordering::Relaxed) == 1 {
            // Nobody is left to take its answer: a store that never
            // answers must not keep the read, and the load, for good. (A
            // restore it started runs on in its own task.)
            if let Some(reading) = cell.reading.lock().take() {
                reading.task.abort();
            }
        }
        // The registration itself ends with the `Task` it holds.
    }
}

/// A registration on a load: a request's (inside `Waiting`), or that of
/// the task that reads or restores its session (see `Shared::read`),
/// which ends with the task, even one that panicked.
struct Task {
    shared: Arc<Shared>,
    key: Arc<str>,
    cell: Cell,
}

impl Task {
    fn register(shared: Arc<Shared>, key: Arc<str>, cell: Cell) -> Self {
        {
            let _loading = shared.loading.lock();
            cell.registered.fetch_add(1, Ordering::Relaxed);
        }
        Task { shared, key, cell }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        unregister(&self.shared.loading, &self.key, &self.cell);
    }
}

/// Ends a registration on `cell`, the load of `key`: the load leaves the
/// map once its last registration has ended, not before, so that a
/// `forget` still marks it stale for a request that has not taken its
/// answer yet.
fn unregister(loading: &Loading, key: &Arc<str>, cell: &Cell) {
    let mut loading = loading.lock();
    let left = cell.registered.fetch_sub(1, Ordering::Relaxed) - 1;
    if left == 0 && loading.get(key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
        loading.remove(key);
    }
}

enum Found {
    Hit(Hit, Named),
    /// The key, the backend its cookie names, and that of a session kept
    /// in memory whose record is due to be read again.
    Miss(Arc<str>, Option<BackendId>, Option<Unread>),
}

/// What a response leaves to do before it is handed on: the store writes
/// its changes queued, in the order made, and the move to tell the hook of.
#[derive(Default)]
struct Work {
    writes: Vec<Done>,
    moved: Option<SessionMoved>,
}

/// A session lock a restore holds: released even when the restore unwinds
/// (a store that panicked), on a task of its own, rather than left to
/// expire while the other replicas wait for it.
struct Held(Option<SessionGuard>);

impl Held {
    async fn release(mut self) -> Result<(), StoreError> {
        match self.0.take() {
            Some(guard) => guard.release().await,
            None => Ok(()),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let (Some(guard), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(async move {
                if let Err(error) = guard.release().await {
                    tracing::warn!(target: TARGET, error = %crate::error::Report(&error), "session lock release failed");
                }
            });
        }
    }
}

/// A session key as logs and events show it. A learned cookie's value is
/// the application's session credential: it is shown as `cookie:` and the
/// first 12 hex digits of its SHA-256, so that whoever reads the logs or
/// the event stream can tell sessions apart without being able to take one
/// over. Other keys (the layer's own cookie's session id, which needs the
/// signature to be of use; a header; a closure's) are shown as they are.
pub(crate) struct Shown<'a> {
    key: &'a str,
    hidden: bool,
}

impl<'a> Shown<'a> {
    pub(crate) fn new(key: &'a str, hidden: bool) -> Self {
        Shown { key, hidden }
    }
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.hidden {
            return f.write_str(self.key);
        }
        write!(f, "cookie:{}", crate::store::KeyDigest(self.key))
    }
}

/// An error's [report](crate::error::Report) as the layer's logs show it,
/// for the session `key`: for a session shown by a digest (see
/// [`Shown`]), with the key replaced by that digest in every form a store
/// may write it in its errors: as it is, escaped (as `{:?}` writes it),
/// percent-encoded (as in a webhook's URL) or as a file store's file name.
pub(crate) struct ShownError<'a> {
    key: Shown<'a>,
    error: &'a (dyn std::error::Error + 'static),
}

impl fmt::Display for ShownError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let report = crate::error::Report(self.error);
        let key = self.key.key;
        if !self.key.hidden || key.is_empty() {
            return report.fmt(f);
        }
        let mut text = report.to_string();
        let debug = format!("{key:?}");
        let escaped = &debug[1..debug.len() - 1];
        let encoded = crate::store::percent_encoded(key);
        let file = crate::store::FileStore::file_name(key);
        // The longest first (a file's name may hold the key as it is),
        // each replaced by a mark no form holds (an error's text may, but
        // no escaped or encoded form does), and the marks by the digest
        // once all are found: a digest is not searched for a key again.
        const MARK: &str = "\u{1}";
        for form in [file.as_str(), encoded.as_str(), escaped, key] {
            if text.contains(form) {
                text = text.replace(form, MARK);
            }
        }
        f.write_str(&text.replace(MARK, &self.key.to_string()))
    }
}

/// Keeps the last record of each key a listing holds more than once (a
/// store that appends records rather than replacing them), and reports the
/// earlier ones as skipped: a session is restored once, by one record.
fn drop_repeated(loaded: &mut crate::store::Loaded) {
    let mut seen = HashSet::with_capacity(loaded.sessions.len());
    let repeated: Vec<bool> = (loaded.sessions.iter().rev())
        .map(|session| !seen.insert(session.key.as_str()))
        .collect();
    if !repeated.contains(&true) {
        return;
    }
    let sessions = std::mem::take(&mut loaded.sessions);
    for (session, repeated) in sessions.into_iter().zip(repeated.into_iter().rev()) {
        if repeated {
            let why = "the store lists this key again later; the later record is restored";
            loaded.skip(session.key, StoreError::corrupt(why));
        } else {
            loaded.sessions.push(session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sticky::StickyLayer;
    use crate::store::{Loaded, MemoryStore, StoreFuture};
    use tower::{Layer, ServiceExt};

    /// A learned key in an error is shown as its digest in each form a
    /// store writes it (as it is, as `{:?}` writes it, percent-encoded, as
    /// a file name), and a digest is not searched for the key again; a key
    /// shown as it is leaves the text alone.
    #[test]
    fn an_error_shows_a_hidden_key_as_its_digest_in_every_form() {
        let key = "a'b\"c+d";
        let digest = Shown::new(key, true).to_string();
        let text = format!(
            "raw {key} debug {key:?} encoded {} file {}",
            crate::store::percent_encoded(key),
            crate::store::FileStore::file_name(key)
        );
        let error = std::io::Error::other(text.clone());
        let shown = ShownError {
            key: Shown::new(key, true),
            error: &error,
        }
        .to_string();
        assert_eq!(
            shown,
            format!("raw {digest} debug \"{digest}\" encoded {digest} file {digest}")
        );
        // A one-letter key found in its own digest's `cookie:` is replaced
        // in the text only.
        let error = std::io::Error::other("o k");
        let shown = ShownError {
            key: Shown::new("o", true),
            error: &error,
        }
        .to_string();
        assert_eq!(shown, format!("{} k", Shown::new("o", true)));
        let shown = ShownError {
            key: Shown::new(key, false),
            error: &std::io::Error::other(text.clone()),
        }
        .to_string();
        assert_eq!(shown, text);
    }

    /// A store that never answers a load.
    struct Stuck;

    impl SessionStore for Stuck {
        fn load_all(&self) -> StoreFuture<'_, Loaded> {
            Box::pin(std::future::pending())
        }
        fn load<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Option<Session>> {
            Box::pin(std::future::pending())
        }
        fn save<'a>(&'a self, _: &'a Session) -> StoreFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn delete<'a>(&'a self, _: &'a [String]) -> StoreFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    /// A restore of many records gives back the room it took for them.
    #[tokio::test]
    async fn a_restore_gives_back_the_room_of_the_records_it_took() {
        let pool = Pool::new();
        pool.insert(
            "a",
            tower::service_fn(|_req: Request<()>| async { Ok::<_, BoxError>(Response::new(())) }),
        );
        let store = MemoryStore::new();
        for i in 0..10_000 {
            store
                .save(&Session::new(format!("s{i}"), "a".into()))
                .await
                .unwrap();
        }
        let layer = StickyLayer::new(&pool, SessionKey::header("x-session-id")).store(store);
        let report = layer.restore().await.unwrap();
        assert_eq!(report.restored.len(), 10_000);
        let unrestored = layer.shared.unrestored.lock();
        assert!(unrestored.is_empty());
        assert!(unrestored.capacity() < 1_000, "{}", unrestored.capacity());
    }

    #[tokio::test(start_paused = true)]
    async fn a_load_every_request_gave_up_on_leaves_the_map() {
        let pool = Pool::new();
        pool.insert(
            "a",
            tower::service_fn(|_req: Request<()>| async { Ok::<_, BoxError>(Response::new(())) }),
        );
        let layer = StickyLayer::new(&pool, SessionKey::header("x-session-id"))
            .store(Stuck)
            .availability(Availability::Replication);
        let svc = layer.layer(crate::balance::Balance::new(
            pool.clone(),
            crate::balance::RoundRobin::new(),
        ));
        for i in 0..10 {
            let req = Request::builder()
                .header("x-session-id", format!("s{i}"))
                .body(())
                .unwrap();
            // Both wait on one load; both give up.
            let a = tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(req));
            let req = Request::builder()
                .header("x-session-id", format!("s{i}"))
                .body(())
                .unwrap();
            let b = tokio::time::timeout(Duration::from_secs(2), svc.clone().oneshot(req));
            let (a, b) = tokio::join!(a, b);
            assert!(a.is_err() && b.is_err(), "the store never answers");
        }
        // The reads, stopped, end at the runtime's next turn.
        for _ in 0..10 {
            if layer.shared.loading.lock().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(layer.shared.loading.lock().len(), 0);
    }

    /// A restore task ends its registration while a request still waits on
    /// the load; the request then gives up while the task still holds the
    /// load (its future has yet to be dropped): the load leaves the map.
    #[tokio::test]
    async fn a_load_leaves_the_map_when_its_last_registration_ends() {
        let pool = Pool::<()>::new();
        let layer = StickyLayer::new(&pool, SessionKey::header("x-session-id")).store(Stuck);
        let shared = &layer.shared;
        let key: Arc<str> = Arc::from("s");
        let cell = Cell::default();
        shared.loading.lock().insert(key.clone(), cell.clone());
        // A request registers as `load` does, then the restore task.
        cell.registered.fetch_add(1, Ordering::Relaxed);
        cell.waiting.fetch_add(1, Ordering::Relaxed);
        let request = Waiting(Task {
            shared: shared.clone(),
            key: key.clone(),
            cell: cell.clone(),
        });
        let task = Task::register(shared.clone(), key.clone(), cell.clone());
        let held_by_the_task = task.cell.clone();
        drop(task);
        assert_eq!(shared.loading.lock().len(), 1, "a request still waits");
        drop(request);
        assert_eq!(shared.loading.lock().len(), 0);
        drop(held_by_the_task);
    }

    /// A session moved twice, whose first move's save is queued after the
    /// second's: the store ends where the table says.
    #[tokio::test]
    async fn a_save_queued_late_does_not_land_an_older_move() {
        let pool = Pool::<()>::new();
        let store = MemoryStore::new();
        let layer =
            StickyLayer::new(&pool, SessionKey::header("x-session-id")).store(store.clone());
        let shared = &layer.shared;
        let to = shared.config.store.as_ref().unwrap();
        shared.table.insert(Session::new("s", "a".into()), None);
        let (a, b, c) = ("a".into(), "b".into(), "c".into());
        let first = shared.table.move_if("s", &a, &b, None).unwrap();
        let second = shared.table.move_if("s", &b, &c, None).unwrap();
        let second = Writes::submit(shared, to, Write::Save(second.session));
        let first = Writes::submit(shared, to, Write::Save(first.session));
        landed(second).await.unwrap();
        landed(first).await.unwrap();
        let stored = store.load("s").await.unwrap().unwrap();
        assert_eq!(stored.backend.as_str(), "c");
    }

    /// A session ended by another thread just after a request moved it,
    /// before the move's save is queued: the delete is queued behind the
    /// save, and the record does not come back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_ended_as_it_moves_stays_ended() {
        let pool = Pool::<()>::new();
        let store = MemoryStore::new();
        let layer =
            StickyLayer::new(&pool, SessionKey::header("x-session-id")).store(store.clone());
        let shared = layer.shared.clone();
        store.save(&Session::new("s", "a".into())).await.unwrap();
        shared.table.insert(Session::new("s", "a".into()), None);
        let (go, started) = std::sync::mpsc::channel::<()>();
        let (removing, removes) = std::sync::mpsc::channel::<()>();
        let remover = {
            let (shared, runtime) = (shared.clone(), tokio::runtime::Handle::current());
            std::thread::spawn(move || {
                started.recv().unwrap();
                removing.send(()).unwrap();
                runtime.block_on(shared.remove("s"))
            })
        };
        let mut work = Work::default();
        shared.decide(&mut work, || {
            let moved = shared.table.move_if("s", &"a".into(), &"b".into(), None);
            let save = Write::Save(moved.expect("moved").session);
            // The other thread ends the session now, if it can: it is
            // about to call `remove`, a few steps from the lock this change
            // holds, and has time to take it if nothing stops it.
            go.send(()).unwrap();
            removes
                .recv_timeout(Duration::from_secs(30))
                .expect("the other thread removes");
            std::thread::sleep(Duration::from_millis(200));
            ((), Some(save))
        });
        shared.finish(work).expect("a save to wait for").await;
        let removed = tokio::task::spawn_blocking(|| remover.join().unwrap());
        assert!(removed.await.unwrap().unwrap(), "it knew the session");
        assert!(shared.table.session("s").is_none());
        assert_eq!(
            store.load("s").await.unwrap(),
            None,
            "the record stays deleted"
        );
    }
}
