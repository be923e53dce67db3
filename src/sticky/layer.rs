use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::hooks::{self, RestoreReport, SessionMoved};
use super::key::SessionKey;
use super::service::Sticky;
use super::shared::{Config, Shared};
use super::stats::StickyStats;
use super::Availability;
use crate::error::BoxError;
use crate::pool::Pool;
use crate::store::{Session, SessionLock, SessionStore, StoreError};

/// The default idle time after which a session leaves the table.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// The default maximum number of sessions in the table.
pub const DEFAULT_MAX_SESSIONS: usize = 100_000;

/// The default maximum number of sessions with store writes under way.
pub const DEFAULT_MAX_PENDING_WRITES: usize = 10_000;

/// The default time limit of the `on_move` hook.
pub const DEFAULT_MOVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The default longest wait of a response for its store writes and its
/// `on_move` hook.
pub const DEFAULT_RESPONSE_WAIT: Duration = Duration::from_secs(10);

/// The default longest wait of a request for its session's record, read
/// from the store.
pub const DEFAULT_LOAD_WAIT: Duration = Duration::from_secs(10);

/// The default time limit of the `on_restore` hook, per session.
pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds [`Sticky`] services that share one session table.
///
/// `new` takes the [`Pool`] the balancer below picks from, to know whether
/// a session's backend is available, and the [`SessionKey`]. The other
/// settings are by-value builder methods; each returns a layer with a new,
/// empty table, so configure first, then build services.
///
/// | setting | default |
/// |---|---|
/// | [`store`](StickyLayer::store) | none: sessions live in memory only |
/// | [`availability`](StickyLayer::availability) | [`Availability::Replication`] |
/// | [`strict`](StickyLayer::strict) | `false`: sessions move |
/// | [`idle_timeout`](StickyLayer::idle_timeout) | one hour |
/// | [`max_sessions`](StickyLayer::max_sessions) | 100 000 |
/// | [`max_pending_writes`](StickyLayer::max_pending_writes) | 10 000 |
/// | [`on_move`](StickyLayer::on_move), [`on_restore`](StickyLayer::on_restore) | none |
/// | [`hydrate`](StickyLayer::hydrate) | none: `on_restore` runs in [`restore`](StickyLayer::restore) only |
/// | [`restore_timeout`](StickyLayer::restore_timeout) | 30 seconds per session |
/// | [`move_timeout`](StickyLayer::move_timeout) | 30 seconds |
/// | [`response_wait`](StickyLayer::response_wait) | 10 seconds |
/// | [`load_wait`](StickyLayer::load_wait) | 10 seconds |
#[derive(Clone)]
pub struct StickyLayer {
    pub(crate) shared: Arc<Shared>,
}

impl StickyLayer {
    /// A layer keyed by `key`, for a balancer over `pool`.
    pub fn new<P: Send + Sync + 'static>(pool: &Pool<P>, key: SessionKey) -> Self {
        StickyLayer::from_config(Config {
            key,
            backends: Arc::new(pool.clone()),
            store: None,
            availability: Availability::Replication,
            strict: false,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_pending_writes: DEFAULT_MAX_PENDING_WRITES,
            on_move: None,
            refresh: None,
            on_restore: None,
            restore_timeout: DEFAULT_RESTORE_TIMEOUT,
            move_timeout: DEFAULT_MOVE_TIMEOUT,
            response_wait: DEFAULT_RESPONSE_WAIT,
            load_wait: DEFAULT_LOAD_WAIT,
            lock: None,
            events: None,
        })
    }

    fn from_config(config: Config) -> Self {
        StickyLayer {
            shared: Arc::new(Shared::new(config)),
        }
    }

    fn with(self, change: impl FnOnce(&mut Config)) -> Self {
        let mut config = self.shared.config.clone();
        change(&mut config);
        StickyLayer::from_config(config)
    }

    /// Saves sessions to `store` when they start or move, so they survive a
    /// restart and reach other replicas. A plain hit writes nothing, apart
    /// from a periodic refresh in the background, at most once per interval
    /// per session, when the store asks for it
    /// ([`SessionStore::refresh_interval`](crate::store::SessionStore::refresh_interval))
    /// or [`refresh_every`](StickyLayer::refresh_every) is set. Takes any
    /// store, including an `Arc<dyn SessionStore>`.
    pub fn store(self, store: impl SessionStore) -> Self {
        let store: Arc<dyn SessionStore> = Arc::new(store);
        self.with(|c| c.store = Some(store))
    }

    /// How sessions come back from the store: see [`Availability`]. Only
    /// with a [`store`](StickyLayer::store): without one, sessions live in
    /// this instance's table alone and [`restore`](super::Sticky::restore)
    /// finds nothing.
    pub fn availability(self, availability: Availability) -> Self {
        self.with(|c| c.availability = availability)
    }

    /// Also emits every session move into `events`
    /// ([`Event::SessionMoved`](crate::control::Event::SessionMoved)).
    pub fn events(self, events: crate::control::Events) -> Self {
        self.with(|c| c.events = Some(events))
    }

    /// When `true`, a session whose backend cannot serve it is never moved:
    /// the request fails with
    /// [`SessionUnavailable`](super::error::SessionUnavailable) instead. So
    /// does a request whose session's record the store cannot read (the
    /// next request reads it again), since the session may be bound to
    /// another backend than the one it would reach.
    ///
    /// A key that cannot have a record is no session to move, and is not
    /// refused: in [standalone](Availability::Standalone) mode, once
    /// [`restore`](StickyLayer::restore) has loaded the store, a key whose
    /// record this instance neither restored nor saved since (it is the
    /// only one writing the store) starts a new session while the store
    /// cannot be read, kept in memory as without strict mode. Before
    /// `restore`, and in [replication](Availability::Replication) mode,
    /// where other replicas write the store, any key may have a record.
    ///
    /// A backend that is draining but healthy still serves its sessions,
    /// as the balancer lets it. One that is unhealthy does not, even while
    /// the balancer's panic routing (most backends unhealthy) would send
    /// requests to it: strict mode refuses its sessions then.
    ///
    /// A session's request carries
    /// [`AffinityRequired`](crate::extensions::AffinityRequired): the
    /// balancer sends it to the session's backend or nowhere: one that
    /// becomes unavailable after the layer looked at it, or fails the
    /// request under a failover layer, does not pass the request to
    /// another backend. A request its backend could not take (the balancer
    /// had no backend for it, or the backend failed it before it was sent,
    /// as a refused connection) fails with `SessionUnavailable`; any other
    /// failure is returned as it is (a failed response, such as an
    /// idempotent request's 503, as the failover layer returns it once it
    /// can try no other backend).
    pub fn strict(self, strict: bool) -> Self {
        self.with(|c| c.strict = strict)
    }

    /// How long a session may go unused before it leaves the table (it
    /// stays in the store); zero for never (only
    /// [`max_sessions`](Self::max_sessions) then bounds the table).
    /// Measured with `tokio::time`.
    pub fn idle_timeout(self, idle: Duration) -> Self {
        self.with(|c| c.idle_timeout = idle)
    }

    /// How often the record of a session in use is
    /// [refreshed](crate::store::SessionStore::refresh), so that a store
    /// whose records expire when left alone keeps them (in the background,
    /// at most once per `every` per session; a save with its `last_seen`
    /// time unless the store does otherwise). A refresh that fails is
    /// tried again at the session's first request `every / 8` later.
    /// Default: as the store asks
    /// ([`SessionStore::refresh_interval`](crate::store::SessionStore::refresh_interval):
    /// half the TTL of a `RedisStore`, `FileStore` or `MemoryStore` that
    /// has one, or half the `ttl` a `WebhookStore` was given, never for the
    /// others). Zero turns it off. An interval at least twice the store's
    /// (at least the TTL of this crate's stores) would let a record in use
    /// expire between two refreshes: the store's is used instead, with a
    /// warning.
    pub fn refresh_every(self, every: Duration) -> Self {
        self.with(|c| c.refresh = Some(every))
    }

    /// The most sessions the table holds (at least 1). A full table drops
    /// an eighth: first idle sessions not swept yet, then sessions held in
    /// memory only (such as learned cookie values no response confirmed),
    /// then the least recently used; they stay in the store.
    /// From 8192 on the table is split into shards (at most 64) with an
    /// equal share each, and a full shard evicts its own eighth, so an
    /// eviction pauses only the requests of one shard.
    pub fn max_sessions(self, max: usize) -> Self {
        self.with(|c| c.max_sessions = max.max(1))
    }

    /// The most sessions whose writes to the store are under way at once
    /// (at least 1). A store that hangs keeps each write waiting until the
    /// store's own timeout, and new sessions keep coming: beyond this
    /// bound, a new session's save fails at once (logged, and counted in
    /// [`StickyStats::store_errors`](super::StickyStats::store_errors)),
    /// and the session is kept in memory, as after any failed save. The
    /// writes of sessions the table holds (moves, refreshes, deletes),
    /// which [`max_sessions`](Self::max_sessions) bounds, always queue.
    pub fn max_pending_writes(self, max: usize) -> Self {
        self.with(|c| c.max_pending_writes = max.max(1))
    }

    /// Calls `hook` after a session moved and the save of its record
    /// ended, before the response that moved it is handed on, so the
    /// application can rebuild the session's state on its new backend. A
    /// save that failed (logged, and counted in
    /// [`StickyStats::store_errors`](super::StickyStats::store_errors)) does
    /// not stop the hook: the session has moved in this layer's table all
    /// the same, and its requests go to the new backend. The hook runs in a
    /// task of its own, to its end even if the client goes away meanwhile,
    /// for at most [`move_timeout`](Self::move_timeout); the response waits
    /// for it for at most [`response_wait`](Self::response_wait), and
    /// [`flush`](Self::flush) for as long as it runs. A hook
    /// error is logged; the response is still returned.
    pub fn on_move<F, Fut>(self, hook: F) -> Self
    where
        F: Fn(SessionMoved) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let hook = hooks::on_move(hook);
        self.with(|c| c.on_move = Some(hook))
    }

    /// Calls `hook` for each stored session during
    /// [`restore`](StickyLayer::restore): the application reconnects to the
    /// session's state. A session whose hook fails, panics
    /// ([`RestorePanicked`](super::RestorePanicked)) or runs past
    /// [`restore_timeout`](StickyLayer::restore_timeout), is not routed and
    /// keeps its stored record; the other sessions are restored. On a tokio
    /// runtime each hook call runs in a task of its own.
    pub fn on_restore<F, Fut>(self, hook: F) -> Self
    where
        F: Fn(Session) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let hook = hooks::on_restore(hook);
        self.with(|c| c.on_restore = Some(hook))
    }

    /// The longest the `on_restore` hook may run for one session (default
    /// [30 seconds](DEFAULT_RESTORE_TIMEOUT)). A hook still running then is
    /// dropped, and the session's restore has failed with
    /// [`RestoreTimedOut`](super::RestoreTimedOut), as if the hook had
    /// returned it: [`restore`](StickyLayer::restore) reports it in
    /// `failed` and keeps the record; a [hydrating](StickyLayer::hydrate)
    /// load logs it, releases the lock and routes the session to its
    /// stored backend. So a hook that hangs holds neither the session nor
    /// the replicas waiting for its lock for good. The hook has stopped
    /// before its lock is released, so that no other replica restores the
    /// session while it still runs: one stuck in a synchronous call is
    /// waited for until that call returns.
    ///
    /// Measured with `tokio::time` (the runtime's timer must be enabled,
    /// as `#[tokio::main]` does); outside a tokio runtime, or with a zero
    /// `limit`, the hook runs without a limit.
    pub fn restore_timeout(self, limit: Duration) -> Self {
        self.with(|c| c.restore_timeout = limit)
    }

    /// The longest the `on_move` hook may run (default
    /// [30 seconds](DEFAULT_MOVE_TIMEOUT)): a hook still running then is
    /// stopped (dropped at its next await) and a warning logged, so that a
    /// hook that hangs does not keep its task for good. Zero for no limit.
    /// Measured with `tokio::time` (the runtime's timer must be enabled,
    /// as `#[tokio::main]` does); outside a tokio runtime the hook runs
    /// without a limit.
    pub fn move_timeout(self, limit: Duration) -> Self {
        self.with(|c| c.move_timeout = limit)
    }

    /// The longest a response waits for the store writes its request
    /// decided (a new session's save, a move's, an end's delete) and for
    /// the `on_move` hook (default [10 seconds](DEFAULT_RESPONSE_WAIT)).
    /// The wait lets the next request, through any replica, find the
    /// session as this one left it, and the hook rebuild the session's
    /// state before the client comes back. Past it the response is handed
    /// on with a warning, and the writes and the hook go on in their task
    /// ([`flush`](Self::flush) still waits for the writes): a store that
    /// hangs delays its sessions' first responses by this much at most
    /// rather than by its own timeouts and retries. Zero for no limit.
    /// Measured with `tokio::time` (the runtime's timer must be enabled,
    /// as `#[tokio::main]` does); outside a tokio runtime a response
    /// waits without a limit.
    pub fn response_wait(self, limit: Duration) -> Self {
        self.with(|c| c.response_wait = limit)
    }

    /// The longest the read of a session's record from the store may take
    /// (default [10 seconds](DEFAULT_LOAD_WAIT)): a session this instance
    /// does not hold (replication mode, or one that idled out or was
    /// evicted) is read before its request is routed, after the writes of
    /// that session already queued here. Past it the read fails as a
    /// timeout (counted in `store_errors` and logged, once for the requests
    /// of the session waiting for it together) and they go on as when the
    /// store cannot be read: routed by the layer's cookie, or afresh, and
    /// kept in memory without overwriting the record, which their next
    /// request 5 seconds later or more reads again; strict mode refuses
    /// them with [`SessionUnavailable`](super::SessionUnavailable). So a
    /// store whose own timeouts and retries add up to minutes (a
    /// webhook's, by default) delays its reads by this much at most. A
    /// record read in time and restored with [`hydrate`](Self::hydrate) is
    /// waited for until its restore ends: the wait for its lock (the
    /// lock's own, 35 s for a `RedisStore` lease by default), the
    /// [`restore_timeout`](Self::restore_timeout) of its hook, and the
    /// reads of the record around it. Zero for no limit.
    /// Measured with `tokio::time` (the runtime's timer must be enabled,
    /// as `#[tokio::main]` does); outside a tokio runtime the read has no
    /// limit.
    pub fn load_wait(self, limit: Duration) -> Self {
        self.with(|c| c.load_wait = limit)
    }

    /// Restores the sessions loaded from the store in
    /// [replication](Availability::Replication) mode too (hydration): when
    /// a request names a session this instance does not know, the
    /// `on_restore` hook runs for it before the request is routed, under
    /// `lock` so that when several replicas load one session at once only
    /// one restores it; every replica, that one included, then routes by
    /// the record the hook left (a hook that started the session's state
    /// on another backend saves it there). A `RedisStore` (feature
    /// `redis`) is such a lock.
    ///
    /// The session is routed to its stored backend even when the hook
    /// fails (the failure is logged, the record kept) or the lock cannot be
    /// taken (counted in `store_errors`).
    ///
    /// The restore runs in a tokio task of its own, to its end even when
    /// the requests waiting for it go away. Outside a tokio runtime the
    /// request that loads the session runs it, and stops it if dropped.
    pub fn hydrate(self, lock: impl SessionLock) -> Self {
        let lock: Arc<dyn SessionLock> = Arc::new(lock);
        self.with(|c| c.lock = Some(lock))
    }

    /// Drops what this layer's table knows about session `key`, keeping its
    /// stored record, so the next request for it reads the store (when the
    /// layer has one, in either availability mode). For a session another
    /// replica moved: see `RedisStore::subscribe` (feature `redis`).
    /// Returns whether the table knew it.
    ///
    /// In standalone mode, a session whose record a `restore` has listed
    /// and not taken is routed by that record until then, as before. A
    /// restore under way lets the record go instead of restoring it, and
    /// the session's next request reads the store; one whose hook failed
    /// keeps the record for a later `restore`.
    pub fn forget(&self, key: &str) -> bool {
        self.shared.forget(key)
    }

    /// Drops every session whose record this layer's table follows, keeping
    /// the stored records, so that their next requests read the store (for
    /// when notices of other replicas' moves may have been lost). Sessions
    /// held in memory only stay where they are: those started while the
    /// store could not be read (their record is read at their next request,
    /// and they keep their backend if the store has none) and values the
    /// application has not confirmed. Without a store, every other session
    /// is dropped. Returns how many it dropped.
    pub fn forget_all(&self) -> usize {
        self.shared.forget_all()
    }

    /// Saves once more the sessions whose last save failed, then waits
    /// until every write to the store this layer has queued, or has
    /// under way, has landed or failed (a failure is counted in
    /// `store_errors` and logged, as always), and every
    /// [`on_move`](Self::on_move) hook called or due has ended. Logs a
    /// warning with the number of sessions whose records are still not
    /// saved then.
    ///
    /// A response waits for the writes its request decided (a new
    /// session's save, a move's) and its move's hook, but those of a
    /// request whose client went away or that waited past the
    /// [`response_wait`](Self::response_wait), and the periodic refreshes,
    /// run on in tasks of their own, and fail if the runtime shuts down
    /// first (a hook cut short so is logged). Call this at shutdown, once
    /// the server has stopped taking requests: new requests would keep it
    /// waiting for their writes too. It waits as long as the store's calls
    /// take (the crate's stores each have a time limit; a store of your
    /// own may not): wrap it in `tokio::time::timeout` to bound it.
    pub async fn flush(&self) {
        self.shared.flush().await
    }

    /// Ends session `key` (at a logout, say): forgets it and deletes its
    /// stored record, as [`Sticky::remove`](super::Sticky::remove) does,
    /// from the handle an application keeps once its stack is served.
    /// Returns whether the table knew it.
    pub async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.shared.remove(key).await
    }

    /// Follows the other replicas' notices (from
    /// [`RedisStore::subscribe`](crate::store::RedisStore::subscribe)) in a
    /// task: forgets each session another replica moved or ended, and
    /// every session after notices may have been lost
    /// ([`Invalidation::All`](crate::store::Invalidation::All)). The task
    /// ends, closing the subscription, once this layer and every service
    /// it built are dropped, or when it is aborted.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime, as [`tokio::spawn`] does.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn follow(&self, mut notices: crate::store::Invalidations) -> tokio::task::JoinHandle<()> {
        use crate::store::Invalidation;
        let shared = Arc::downgrade(&self.shared);
        let mut gone = self.shared.gone.subscribe();
        tokio::spawn(async move {
            loop {
                let notice = tokio::select! {
                    notice = notices.next() => notice,
                    // Only ever an error: the layer is gone.
                    _ = gone.changed() => None,
                };
                let (Some(notice), Some(shared)) = (notice, shared.upgrade()) else {
                    return;
                };
                match notice {
                    Invalidation::Session { key, .. } => {
                        shared.forget(&key);
                    }
                    Invalidation::All => {
                        shared.forget_all();
                    }
                }
            }
        })
    }

    /// Loads and restores every stored session: see [`Sticky::restore`].
    pub async fn restore(&self) -> Result<RestoreReport, StoreError> {
        self.shared.restore().await
    }

    /// The counters shared by every service this layer built.
    pub fn stats(&self) -> StickyStats {
        self.shared.stats()
    }

    /// The session `key` as the table knows it.
    pub fn session(&self, key: &str) -> Option<Session> {
        self.shared.session(key)
    }
}

impl fmt::Debug for StickyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StickyLayer")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S> Layer<S> for StickyLayer {
    type Service = Sticky<S>;

    fn layer(&self, inner: S) -> Sticky<S> {
        self.shared.warn_of_config();
        Sticky::from_shared(inner, self.shared.clone())
    }
}
