//! [`RedisStore`]: sessions shared by several replicas through Redis, with
//! ownership leases and move notifications.

use std::collections::HashSet;
use std::error::Error as StdError;
use std::fmt;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, ErrorKind, IntoConnectionInfo, RedisError, Script, Value};
use futures_core::Stream;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Loaded, Session, SessionGuard, SessionLock, SessionStore, StoreError, StoreFuture};
use crate::backend::BackendId;
use crate::task::AbortOnDrop;
use crate::time::claim_due;

const DEFAULT_PREFIX: &str = "tower-ha:";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
const DEFAULT_LEASE_WAIT: Duration = Duration::from_secs(35);
/// Keys asked for per `SCAN` step.
const SCAN_COUNT: usize = 1000;
/// Keys read per `MGET`, and deleted per `DEL`.
const BATCH: usize = 500;
/// How soon a replica that lost a lease race first looks whether the
/// winner is done; it waits twice as long before each next look, with
/// jitter, up to [`LEASE_POLL_MAX`].
const LEASE_POLL: Duration = Duration::from_millis(10);
/// The longest wait between two looks at a lease held by another replica,
/// so that many waiting replicas do not crowd the connection the winner
/// extends its lease on.
const LEASE_POLL_MAX: Duration = Duration::from_millis(250);
/// How often a quiet subscription checks that its connection still works.
const PING_EVERY: Duration = Duration::from_secs(10);
/// Notices a subscription holds for a reader that lags; beyond, they are
/// dropped and the reader gets [`Invalidation::All`] once it catches up.
const NOTICE_BUFFER: usize = 1024;

/// What a released lease holds for [`DONE_FOR`]: the work it guarded was
/// done. (A token is hexadecimal, never this.)
const DONE: &str = "done";
/// How long a released lease says so, for those still waiting on it.
const DONE_FOR: Duration = Duration::from_secs(60);

/// Takes a lease that nobody holds: absent, or released (`done`).
const TAKE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == 'done' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0";

/// Releases a lease only when the caller still owns it, leaving `done` in
/// its place for a while, so that those waiting on it can tell a finished
/// restore from a holder that died (whose lease just expires).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
  return 1
end
return 0";

/// Extends a lease only when the caller still owns it.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Refreshes a session record (`KEYS[1]`) for `ARGV[1]` ms: renews its
/// expiry (1); or, when it is gone, keeps the tombstone (`KEYS[2]`) a
/// delete left for as long (0), or else writes the record `ARGV[2]` again
/// (2).
const REFRESH: &str = r"
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 1 then
  return 1
end
if redis.call('PEXPIRE', KEYS[2], ARGV[1]) == 1 then
  return 0
end
if ARGV[2] == nil then
  return 3
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
return 2";

/// Sessions in Redis, shared by every replica that points at the same
/// server and prefix.
///
/// Built by [`RedisStore::builder`] from a `redis://` URL. Clones share one
/// multiplexed connection, which reconnects on its own after Redis
/// restarts or the network drops (on Linux it also gives up a connection
/// whose data goes unacknowledged for five command timeouts, at least
/// 10 s), and is replaced when a command is refused as `READONLY` (a
/// primary demoted behind the same address) or its login is refused (a
/// password changed on the server, then back). A call whose connection
/// turns out to be broken (Redis restarted, or closed it while it sat
/// idle) is sent once more on a new one, so an idle store's first call
/// does not fail while Redis is up: loads, saves, deletes and notices
/// are safe to apply twice. (A lease's calls are not, and are sent once,
/// as is a [`refresh`](SessionStore::refresh), which the sticky layer
/// tries again an eighth of its interval later.)
/// [`load_all`](SessionStore::load_all) lists the keys on a connection of
/// its own, and starts the listing again, once, if it breaks midway: a
/// `SCAN` cursor carried over to another server process would skip keys.
///
/// # Layout
///
/// With prefix `p` (default `tower-ha:`):
///
/// | what | Redis | |
/// |---|---|---|
/// | a session | string key `p` `s:` *session key* | the [`Session`] as JSON (times in Unix milliseconds); optional expiry |
/// | a lease | string key `p` `l:` *session key* | a random token, with an expiry |
/// | a deleted session (with a [`ttl`](RedisStoreBuilder::ttl)) | string key `p` `d:` *session key* | `deleted`, for one TTL |
/// | move notices | channel `p` `moves` (`p` `moves@` *n* on database *n* > 0) | `{"key": ..., "backend": ... or null, "origin": ...}` |
///
/// Session keys are used as bytes, so any string is a valid key (`/`,
/// `*`, NUL, ...) and no key can reach another's record. Session, lease
/// and tombstone keys never share a prefix, so listing sessions sees
/// neither of the others.
///
/// * [`save`](SessionStore::save): `SET` (with `PX` when a
///   [`ttl`](RedisStoreBuilder::ttl) is set), and a `PUBLISH` on the
///   move channel when [`notify`](RedisStoreBuilder::notify) is on, in
///   one transaction (`MULTI`/`EXEC`, one round trip): a session is never
///   stored without its notice. The transaction also removes the
///   session's tombstone, if any.
/// * [`load`](SessionStore::load): `GET`, or `GETEX PX` with a TTL, so a
///   session in use never expires (Redis 6.2 or later, which
///   [`build`](RedisStoreBuilder::build) checks).
/// * [`load_all`](SessionStore::load_all): `SCAN MATCH` (never `KEYS`, which
///   blocks the server) with the prefix's glob characters escaped, then
///   `MGET` in batches. A listing renews no record's expiry, so that
///   restarts do not keep abandoned sessions alive: the sticky layer
///   refreshes a session it restored by its record's age, before the
///   record can expire. Records that are not
///   JSON, not a session, hold another key's session, are over 64 MiB, or
///   are not strings at all (`TYPE` tells those from a key deleted since
///   the scan) are skipped and reported.
/// * [`delete`](SessionStore::delete): `DEL` in batches, each with its
///   notices in one transaction and, with a TTL, a tombstone per session
///   (`SET PX` the TTL), so that a refresh from a replica that has not
///   heard of the delete yet does not write the session back. A server
///   out of memory (`OOM`) refuses every transaction and the tombstones'
///   writes: then the sessions are deleted and announced in a plain
///   pipeline without tombstones, since a delete frees memory where a
///   refusal would keep it full.
/// * [`refresh`](SessionStore::refresh), with a TTL: a Lua script that
///   renews the record's expiry, or writes it again if it expired, unless
///   a tombstone says it was deleted (the tombstone is then renewed).
///
/// # Failures
///
/// Every failure is a [`StoreError`]: connection refused, reset or dropped,
/// and a server that is loading, read-only, out of memory (`OOM`), unable to
/// write its snapshot (`MISCONF`), short of replicas (`NOREPLICAS`) or out
/// of connections (`max number of clients reached`):
/// [`is_unavailable`](StoreError::is_unavailable); no answer within the
/// [`timeout`](RedisStoreBuilder::timeout):
/// [`is_timeout`](StoreError::is_timeout); a refused password or missing
/// permission: [`is_unauthorized`](StoreError::is_unauthorized); a record
/// that is not a session (not JSON, or a hash, a list, ... where a string
/// should be), or a value over 64 MiB, which is not parsed:
/// [`is_corrupt`](StoreError::is_corrupt); a session larger than any
/// store reads back (64 MiB less 64 KiB as JSON), refused before it is
/// sent, the stored record left as it was:
/// [`is_rejected`](StoreError::is_rejected). A write
/// that fails is reported, never dropped: the caller may retry it, and the
/// connection is re-established in the background.
///
/// # Durability
///
/// A save is acknowledged when Redis has applied it. It survives a Redis
/// restart only if Redis persists it: run Redis with `appendonly yes` and
/// `appendfsync always` to lose nothing acknowledged, or `appendfsync
/// everysec` to lose at most about a second of writes on a crash (Redis's
/// default, RDB snapshots alone, loses the writes since the last snapshot
/// on a crash).
///
/// # Several replicas
///
/// * [`try_lease`](RedisStore::try_lease) and [`claim`](RedisStore::claim):
///   a short ownership lease (a Lua script sets a random token with a `PX`
///   expiry when no lease is held or its last holder marked it `done`) so
///   one replica restores a session while the others wait and read its
///   result.
/// * [`subscribe`](RedisStore::subscribe): the other replicas' saves and
///   deletes, so each can drop what it cached about a session that moved.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_ha::store::StoreError> {
/// use std::time::Duration;
/// use tower_ha::store::{RedisStore, Session, SessionStore};
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379/0")
///     .prefix("gateway:")
///     .ttl(Duration::from_secs(24 * 3600))
///     .build()
///     .await?;
/// store.save(&Session::new("kernel-42", "node-a".into())).await?;
/// let back = store.load("kernel-42").await?.expect("just saved");
/// assert_eq!(back.backend.as_str(), "node-a");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// The connection commands go on, replaced when it answers `READONLY`.
    conn: Mutex<Conn>,
    config: ConnectionManagerConfig,
    /// The URL without its password, for `Debug`.
    url: String,
    prefix: String,
    /// `SCAN MATCH` pattern for every session key.
    pattern: Vec<u8>,
    channel: String,
    ttl: Option<Duration>,
    timeout: Duration,
    notify: bool,
    /// The lease [`SessionLock::lock`] takes, and how long it waits.
    lease_ttl: Duration,
    lease_wait: Duration,
    /// Tells this store's own notices from other replicas'.
    origin: String,
    take: Script,
    release: Script,
    extend: Script,
    refresh: Script,
}

/// Builds a [`RedisStore`]; made by [`RedisStore::builder`].
#[must_use]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    ttl: Option<Duration>,
    timeout: Duration,
    notify: bool,
    lease_ttl: Duration,
    lease_wait: Duration,
}

impl RedisStore {
    /// A builder for a store at `url`: `redis://[user:password@]host[:port][/db]`
    /// (or `redis+unix:///path`), with prefix `tower-ha:`, no expiry, a 2 s
    /// timeout, move notices on, and 30 s leases waited for at most 35 s
    /// by [`SessionLock::lock`]. Building needs a tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use tower_ha::store::RedisStore;
    ///
    /// // A port nothing listens on.
    /// let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    /// let err = RedisStore::builder(format!("redis://127.0.0.1:{port}"))
    ///     .timeout(Duration::from_millis(500))
    ///     .build()
    ///     .await
    ///     .unwrap_err();
    /// assert!(err.is_unavailable() && err.is_transient());
    ///
    /// let err = RedisStore::builder("not a url").build().await.unwrap_err();
    /// assert!(err.is_other());
    /// # }
    /// ```
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            ttl: None,
            timeout: DEFAULT_TIMEOUT,
            notify: true,
            lease_ttl: DEFAULT_LEASE_TTL,
            lease_wait: DEFAULT_LEASE_WAIT,
        }
    }

    /// The prefix of every key and channel this store uses.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The channel move notices are published on: the prefix followed by
    /// `moves`, and by `@` and the database number for a database other
    /// than 0 (pub/sub does not tell databases apart).
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The Redis key of session `key`.
    pub fn session_key(&self, key: &str) -> Vec<u8> {
        self.inner.key(b"s:", key)
    }

    /// The Redis key of the lease on session `key`.
    pub fn lease_key(&self, key: &str) -> Vec<u8> {
        self.inner.key(b"l:", key)
    }

    /// The Redis key that says session `key` was deleted, for a while.
    fn tombstone_key(&self, key: &str) -> Vec<u8> {
        self.inner.key(b"d:", key)
    }

    /// The commands that delete `chunk`: one transaction, as a save is
    /// one (deleted and announced, or neither), which with a TTL also
    /// leaves each key a tombstone that tells refreshes the session ended
    /// (only refreshes write a record back). With `out_of_memory`, a plain
    /// pipeline without tombstones, which Redis runs at `maxmemory`.
    fn delete_pipe(
        &self,
        chunk: &[String],
        out_of_memory: bool,
    ) -> Result<::redis::Pipeline, StoreError> {
        let inner = &*self.inner;
        let mut pipe = ::redis::pipe();
        if !out_of_memory {
            pipe.atomic();
        }
        let del = pipe.cmd("DEL");
        for key in chunk {
            del.arg(self.session_key(key));
        }
        del.ignore();
        if let Some(ttl) = inner.ttl.filter(|_| !out_of_memory) {
            for key in chunk {
                pipe.cmd("SET")
                    .arg(self.tombstone_key(key))
                    .arg("deleted")
                    .arg("PX")
                    .arg(millis(ttl))
                    .ignore();
            }
        }
        if inner.notify {
            for key in chunk {
                pipe.cmd("PUBLISH")
                    .arg(&inner.channel)
                    .arg(inner.notice(key, None)?)
                    .ignore();
            }
        }
        Ok(pipe)
    }

    /// Takes the lease on session `key` for `ttl` if nobody holds it (a
    /// Lua script that sets a random token with an expiry when the lease is
    /// absent or released): `None` when another owner holds it. The lease
    /// ends when released or when `ttl` runs out, whichever comes first, so
    /// a replica that dies holding it blocks the others for at most `ttl`.
    ///
    /// Keep `ttl` longer than the work the lease guards (a restore), or
    /// [`extend`](Lease::extend) it while working.
    ///
    /// When the answer does not come in time (or the connection fails),
    /// the lease may still have been taken: its token gives it up at once,
    /// before the error is returned, so that nobody waits out its `ttl`.
    /// So does a call dropped before its answer (a caller's own timeout, a
    /// `select!`), from a task of its own on the runtime it was dropped
    /// in (none in a runtime shutting down: the lease then runs out at its
    /// `ttl`).
    pub async fn try_lease(&self, key: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let token = random_token();
        let redis_key = self.lease_key(key);
        let ttl = millis(ttl).to_string();
        let inner = &self.inner;
        let mut conn = inner.conn();
        let mut dropped = GiveUpIfDropped {
            inner: self.inner.clone(),
            conn: Some(conn.clone()),
            redis_key: redis_key.clone(),
            token: token.clone(),
        };
        let keys: &[&[u8]] = &[&redis_key];
        let taken = inner
            .invoke(
                &mut conn,
                &inner.take,
                keys,
                &[token.as_bytes(), ttl.as_bytes()],
            )
            .await;
        // The take may still land (a reply that came too late): a lease
        // nobody knows it holds would hold the others off for its whole
        // `ttl`. Its token ends it at once if it is there (an expiry of 0
        // deletes it), sent on the take's connection, after the take,
        // before that connection may be replaced.
        let give_up = !matches!(taken, Ok(Ok(_)));
        if give_up {
            inner.give_up_lease(&mut conn, &redis_key, &token).await;
        }
        dropped.conn = None;
        let taken = inner.finish(&conn, taken, "take a lease")?;
        Ok((taken == 1).then(|| Lease {
            store: self.clone(),
            key: key.to_owned(),
            redis_key,
            token,
        }))
    }

    /// Whether someone holds the lease on session `key`.
    pub async fn is_leased(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.lease_state(key).await? == LeaseState::Held)
    }

    async fn lease_state(&self, key: &str) -> Result<LeaseState, StoreError> {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(self.lease_key(key));
        let value: Option<Vec<u8>> = self.inner.run(&cmd, "look up a lease").await?;
        Ok(match value.as_deref() {
            None => LeaseState::Free,
            Some(v) if v == DONE.as_bytes() => LeaseState::Done,
            Some(_) => LeaseState::Held,
        })
    }

    /// Decides which replica restores session `key`: takes the lease for
    /// `ttl` ([`Claim::Won`]: restore, save the result, then release), or,
    /// when another replica holds it, waits until that replica releases it
    /// and reads the session it saved ([`Claim::Lost`]). A lease that
    /// expires unreleased (its holder died before it was done) is taken by
    /// one of those waiting, which then wins. Fails with a
    /// [`timeout`](StoreError::is_timeout) error when the lease is still
    /// held after `wait`.
    ///
    /// A released lease says `done` for a minute, so that those waiting can
    /// tell it from one that expired; a claim meanwhile takes it as free.
    ///
    /// Two replicas that claim a session at once never both win; a replica
    /// that claims it after the winner released it wins again and finds
    /// the winner's result in the store.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_ha::store::StoreError> {
    /// use std::time::Duration;
    /// use tower_ha::store::{Claim, RedisStore, SessionStore};
    ///
    /// let store = RedisStore::builder("redis://127.0.0.1:6379").build().await?;
    /// let session = match store.claim("kernel-42", Duration::from_secs(10), Duration::from_secs(15)).await? {
    ///     Claim::Won(lease) => {
    ///         let mut session = store.load("kernel-42").await?;
    ///         if let Some(s) = &mut session {
    ///             // ... reconnect to the kernel on s.backend, then record it ...
    ///             s.data["restored"] = true.into();
    ///             store.save(s).await?;
    ///         }
    ///         lease.release().await?;
    ///         session
    ///     }
    ///     Claim::Lost(session) => session, // restored by another replica
    ///     _ => store.load("kernel-42").await?,
    /// };
    /// # let _ = session; Ok(()) }
    /// ```
    pub async fn claim(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Claim, StoreError> {
        let deadline = crate::time::later(Instant::now(), wait);
        let mut poll = LEASE_POLL;
        loop {
            if let Some(lease) = self.try_lease(key, ttl).await? {
                return Ok(Claim::Won(lease));
            }
            loop {
                match self.lease_state(key).await? {
                    LeaseState::Done => return Ok(Claim::Lost(self.load(key).await?)),
                    // Expired unreleased: its holder died before it was
                    // done, so the restore is still to do; try to take it.
                    LeaseState::Free => break,
                    LeaseState::Held if Instant::now() >= deadline => {
                        return Err(StoreError::timeout(LeaseHeld(key.to_owned()))
                            .with_message(format!("the lease was still held after {wait:?}")));
                    }
                    LeaseState::Held => {
                        // Between half and all of `poll`, so that waiters
                        // that started together do not look together.
                        let pause = poll.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                        tokio::time::sleep_until(deadline.min(Instant::now() + pause)).await;
                        poll = (poll * 2).min(LEASE_POLL_MAX);
                    }
                }
            }
        }
    }

    /// Publishes that session `key` is now on `backend` (`None`: it ended)
    /// on the move channel. [`save`](SessionStore::save) and
    /// [`delete`](SessionStore::delete) do this already when
    /// [`notify`](RedisStoreBuilder::notify) is on. Returns how many
    /// subscribers received it.
    pub async fn publish_move(
        &self,
        key: &str,
        backend: Option<&BackendId>,
    ) -> Result<usize, StoreError> {
        let mut cmd = ::redis::cmd("PUBLISH");
        cmd.arg(&self.inner.channel)
            .arg(self.inner.notice(key, backend)?);
        self.inner.run(&cmd, "publish a move").await
    }

    /// Subscribes to the other replicas' move notices over a connection of
    /// its own. Returns once the subscription is active, so every notice
    /// published after this returns is received. The subscription
    /// reconnects on its own, yielding [`Invalidation::All`] after each
    /// reconnection since notices published meanwhile are lost (it logs the
    /// loss and a failed reconnection at `warn`, at most once a minute
    /// while it keeps failing or dropping, and its return at `info`); a
    /// reader
    /// that lags more than 1024 notices behind gets an
    /// [`Invalidation::All`] in place of those it missed, so the notices
    /// held for a slow reader are bounded whatever the rate of moves; a
    /// ping every 10 s finds a connection that died silently. The Redis
    /// client's own queue, between the connection and the subscription,
    /// is not bounded: the client reads notices off the connection as
    /// they come. While the reader lags, the subscription drops notices
    /// from that queue without parsing them, which costs less than queueing
    /// them did, so that queue does not build up behind a slow reader.
    /// It ends
    /// when the returned value is dropped. Notices this store published
    /// itself are not yielded. [`StickyLayer::follow`](crate::sticky::StickyLayer::follow)
    /// follows them for a sticky layer.
    pub async fn subscribe(&self) -> Result<Invalidations, StoreError> {
        let pubsub = self.inner.connect_pubsub().await?;
        let (tx, rx) = mpsc::channel(NOTICE_BUFFER);
        let lagging = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(listen(self.inner.clone(), pubsub, tx, lagging.clone()));
        Ok(Invalidations {
            rx,
            lagging,
            task: AbortOnDrop(task),
        })
    }
}

impl RedisStoreBuilder {
    /// The prefix of every key and channel (default `tower-ha:`), so
    /// several applications can share one Redis database. No prefix may
    /// begin another's (`app:` and `app:s:`): the keys of the one would be
    /// among the other's.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sessions expire after `ttl` without a save or a load (each refreshes
    /// it; a [`load_all`](SessionStore::load_all) does not). The sticky layer renews the expiry of a session it serves every
    /// half `ttl` (see [`SessionStore::refresh_interval`]), so only
    /// sessions nobody uses expire. Default: sessions never expire; delete them.
    /// At least 1 ms; longer than about a century counts as a century.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(super::clamp_ttl(ttl));
        self
    }

    /// The longest a connection attempt or one command may take (default
    /// 2 s; above zero: [`build`](Self::build) refuses a zero timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether saves and deletes publish a move notice (default `true`).
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// The lease [`SessionLock::lock`] takes (`ttl`, default 30 s: longer
    /// than a restore takes) and how long it waits for another holder
    /// (`wait`, default 35 s: longer than `ttl`), as in
    /// [`RedisStore::claim`]. A `ttl` below 1 ms counts as 1 ms.
    pub fn lease(mut self, ttl: Duration, wait: Duration) -> Self {
        self.lease_ttl = ttl;
        self.lease_wait = wait;
        self
    }

    /// Connects and checks, in one round trip, that the server answers and
    /// lets the store run what it will need: it loads the store's Lua
    /// scripts (`SCRIPT LOAD`), runs the one that extends a lease
    /// (`EVALSHA`) on a lease nobody holds, and with a [`ttl`](Self::ttl)
    /// runs the refresh script and `GETEX` (Redis 6.2 or later) too, all on
    /// the keys of a random session, so that nothing stored changes. Fails with
    /// [`other`](StoreError::is_other) for a zero timeout or a bad URL, and
    /// as any call would when Redis cannot be reached or refuses the
    /// credentials: with [`unauthorized`](StoreError::is_unauthorized) when
    /// the user lacks the permission for one of those commands, and with
    /// [`rejected`](StoreError::is_rejected) when the server does not know
    /// one (`GETEX` before Redis 6.2), rather than failing every load later.
    /// The commands that write or list are not checked: a user that may
    /// only read builds, and its saves fail.
    pub async fn build(self) -> Result<RedisStore, StoreError> {
        if self.timeout.is_zero() {
            return Err(super::zero_timeout("Redis"));
        }
        let bad_url =
            |e| StoreError::other(e).with_message(format!("bad Redis URL {:?}", redact(&self.url)));
        let info = self.url.as_str().into_connection_info().map_err(bad_url)?;
        // Pub/sub ignores database numbers: the channel names the database,
        // so that stores on the same server, prefix and another database
        // (staging beside production) do not hear each other's moves.
        let channel = match info.redis_settings().db() {
            0 => format!("{}moves", self.prefix),
            db => format!("{}moves@{db}", self.prefix),
        };
        // A connection whose data goes unacknowledged that long (a host
        // gone, a firewall or NAT that forgot it) is given up by the
        // kernel, and the client reconnects; otherwise every command would
        // time out until the kernel's own limit (about 15 minutes).
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let info = info.set_tcp_settings(
            ::redis::io::tcp::TcpSettings::default().set_user_timeout(user_timeout(self.timeout)),
        );
        let client = Client::open(info).map_err(bad_url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            // A request waits for at most one quick retry while Redis is
            // down; the next request starts another reconnection.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| map_error(e, "connect"))?;
        let mut pattern = glob_escape(self.prefix.as_bytes());
        pattern.extend_from_slice(b"s:*");
        let inner = Inner {
            client,
            conn: Mutex::new(Conn {
                manager,
                generation: 0,
            }),
            config,
            url: redact(&self.url),
            channel,
            prefix: self.prefix,
            pattern,
            ttl: self.ttl,
            timeout: self.timeout,
            notify: self.notify,
            lease_ttl: self.lease_ttl,
            lease_wait: self.lease_wait,
            origin: random_token(),
            take: Script::new(TAKE),
            release: Script::new(RELEASE),
            extend: Script::new(EXTEND),
            refresh: Script::new(REFRESH),
        };
        inner.check().await?;
        Ok(RedisStore {
            inner: Arc::new(inner),
        })
    }
}

/// Gives up a lease whose take was sent and whose answer nobody will read,
/// its call dropped: the take may land, and a lease nobody knows it holds
/// would hold the others off for its whole ttl. Sent on the take's
/// connection, so after it; disarmed (`conn` taken) once the call has its
/// answer.
struct GiveUpIfDropped {
    inner: Arc<Inner>,
    conn: Option<Conn>,
    redis_key: Vec<u8>,
    token: String,
}

impl Drop for GiveUpIfDropped {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Outside a runtime, or in one shutting down (which drops the
        // task), the lease runs out at its ttl.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        let redis_key = std::mem::take(&mut self.redis_key);
        let token = std::mem::take(&mut self.token);
        runtime.spawn(async move { inner.give_up_lease(&mut conn, &redis_key, &token).await });
    }
}

impl Inner {
    /// Ends the lease at `redis_key` if `token` holds it (an expiry of 0
    /// deletes it), on `conn`; whether it did is not looked at.
    async fn give_up_lease(&self, conn: &mut Conn, redis_key: &[u8], token: &str) {
        let keys: &[&[u8]] = &[redis_key];
        let _ = (self.invoke(conn, &self.extend, keys, &[token.as_bytes(), b"0"])).await;
    }

    /// Checks that the server answers and lets this store run the commands
    /// and scripts it will need, in one pipeline, without changing anything
    /// stored: the keys are those of a random session, which nobody holds.
    /// (Even one that somebody held would only be read, and its record's
    /// expiry renewed, as any refresh does.)
    async fn check(&self) -> Result<(), StoreError> {
        let probe = random_token();
        let mut pipe = ::redis::pipe();
        pipe.cmd("PING").ignore();
        let mut scripts = vec![TAKE, RELEASE, EXTEND];
        if self.ttl.is_some() {
            scripts.push(REFRESH);
        }
        for code in scripts {
            pipe.cmd("SCRIPT").arg("LOAD").arg(code).ignore();
        }
        // A lease the probe does not hold: the script only reads it.
        pipe.cmd("EVALSHA")
            .arg(self.extend.get_hash())
            .arg(1)
            .arg(self.key(b"l:", &probe))
            .arg(&probe)
            .arg(1)
            .ignore();
        if let Some(ttl) = self.ttl {
            // Neither the record nor a tombstone is there, and no record
            // is passed to write back: the script only looks.
            pipe.cmd("EVALSHA")
                .arg(self.refresh.get_hash())
                .arg(2)
                .arg(self.key(b"s:", &probe))
                .arg(self.key(b"d:", &probe))
                .arg(millis(ttl))
                .ignore();
            // Without an option, `GETEX` changes no expiry.
            pipe.cmd("GETEX").arg(self.key(b"s:", &probe)).ignore();
        }
        self.run_pipe::<()>(&pipe, "connect and check what the store needs")
            .await
    }

    fn key(&self, kind: &[u8], key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + kind.len() + key.len());
        k.extend_from_slice(self.prefix.as_bytes());
        k.extend_from_slice(kind);
        k.extend_from_slice(key.as_bytes());
        k
    }

    fn notice(&self, key: &str, backend: Option<&BackendId>) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(&Notice {
            key: key.to_owned(),
            backend: backend.map(|b| b.as_str().to_owned()),
            origin: self.origin.clone(),
        })
        .map_err(StoreError::other)
    }

    /// The connection commands go on now.
    fn conn(&self) -> Conn {
        self.conn.lock().clone()
    }

    /// Ends an exchange on `conn`. A connection that answers `READONLY`
    /// is pinned to a primary demoted since (behind a stable address): the
    /// client does not reconnect for it, so the next commands go on a new
    /// one. Nothing more that was sent on the old one can land on the new
    /// primary. A connection that merely answers late is kept: a command
    /// it still carries could land after a later one sent on a new
    /// connection (one key's writes out of order). One gone silent is
    /// given up by the kernel (`TCP_USER_TIMEOUT`, see `build`), and then
    /// replaced by the client.
    ///
    /// A connection whose reconnection was refused at login (a password
    /// changed and changed back, a server briefly up without its ACL file)
    /// or at its switch to the URL's database (a `SELECT` answered `BUSY`
    /// while a script runs) is replaced too: the client keeps a failed
    /// setup for good and only tries again after a network error.
    fn finish<T>(&self, conn: &Conn, answer: Answer<T>, what: &str) -> Result<T, StoreError> {
        let why = match &answer {
            Ok(Err(e)) if server_error(e).0 == "READONLY" => Some("met a read-only replica"),
            Ok(Err(e)) if refused_login(e) => Some("was refused at login"),
            Ok(Err(e)) if refused_database(e) => Some("could not switch database"),
            _ => None,
        };
        if let Some(why) = why {
            let mut current = self.conn.lock();
            // Once, however many commands saw it fail.
            if current.generation == conn.generation {
                if let Ok(manager) = ConnectionManager::new_lazy_with_config(
                    self.client.clone(),
                    self.config.clone(),
                ) {
                    tracing::warn!(target: "tower_ha::store", url = %self.url, "Redis connection replaced: {what} {why}");
                    current.manager = manager;
                    current.generation += 1;
                }
            }
        }
        flatten(answer, what, self.timeout)
    }

    /// Runs `cmd`, which must be safe to apply twice: it is sent again,
    /// once, when the connection turns out to be broken (see [`broken`]).
    async fn run<T: ::redis::FromRedisValue>(
        &self,
        cmd: &::redis::Cmd,
        what: &str,
    ) -> Result<T, StoreError> {
        self.twice_if_broken(what, |mut manager| async move {
            cmd.query_async::<T>(&mut manager).await
        })
        .await
    }

    /// Runs `pipe` as [`Inner::run`] runs a command.
    async fn run_pipe<T: ::redis::FromRedisValue>(
        &self,
        pipe: &::redis::Pipeline,
        what: &str,
    ) -> Result<T, StoreError> {
        self.twice_if_broken(what, |mut manager| async move {
            pipe.query_async::<T>(&mut manager).await
        })
        .await
    }

    /// Runs `query` on the current connection, and once more when the
    /// connection turns out to be broken (see [`broken`]).
    async fn twice_if_broken<T, F>(
        &self,
        what: &str,
        query: impl Fn(ConnectionManager) -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = ::redis::RedisResult<T>>,
    {
        let conn = self.conn();
        let mut answer = tokio::time::timeout(self.timeout, query(conn.manager.clone())).await;
        if broken(&answer) {
            answer = tokio::time::timeout(self.timeout, query(conn.manager.clone())).await;
        }
        self.finish(&conn, answer, what)
    }

    /// The keys of every stored session, listed on a connection of the
    /// listing's own. A `SCAN` cursor means something only to the server
    /// process that gave it: carried over to a new connection, which may
    /// reach another one (Redis restarted, or a replica promoted behind
    /// the same address, each with its own order of keys), it would skip
    /// keys without a word. A connection that breaks midway starts the
    /// listing again, once, on a new connection.
    async fn scan(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let config = ::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let mut again = true;
        loop {
            let answer = tokio::time::timeout(
                self.timeout,
                self.client
                    .get_multiplexed_async_connection_with_config(&config),
            )
            .await;
            let mut conn = flatten(answer, "scan", self.timeout)?;
            let mut keys: Vec<Vec<u8>> = Vec::new();
            let mut seen = HashSet::new();
            let mut cursor: u64 = 0;
            let broke = loop {
                let mut cmd = ::redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(&self.pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT);
                let answer = tokio::time::timeout(
                    self.timeout,
                    cmd.query_async::<(u64, Vec<Vec<u8>>)>(&mut conn),
                )
                .await;
                // Broken midway, the first time: the whole listing again,
                // from cursor 0, on a new connection.
                if again && broken(&answer) {
                    break true;
                }
                let (next, batch) = flatten(answer, "scan", self.timeout)?;
                for key in batch {
                    // SCAN may return a key more than once.
                    if seen.insert(key.clone()) {
                        keys.push(key);
                    }
                }
                if next == 0 {
                    break false;
                }
                cursor = next;
            };
            if !broke {
                return Ok(keys);
            }
            again = false;
        }
    }

    /// Runs `script` once: a lease's scripts are not safe to run twice.
    async fn run_script(
        &self,
        script: &Script,
        keys: &[&[u8]],
        args: &[&[u8]],
        what: &str,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn();
        let answer = self.invoke(&mut conn, script, keys, args).await;
        self.finish(&conn, answer, what)
    }

    /// Runs `script` on `conn`, leaving its answer to [`Inner::finish`].
    async fn invoke(
        &self,
        conn: &mut Conn,
        script: &Script,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Answer<i64> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        tokio::time::timeout(
            self.timeout,
            invocation.invoke_async::<i64>(&mut conn.manager),
        )
        .await
    }

    async fn connect_pubsub(&self) -> Result<::redis::aio::PubSub, StoreError> {
        let connect = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, RedisError>(pubsub)
        };
        flatten(
            tokio::time::timeout(self.timeout, connect).await,
            "subscribe",
            self.timeout,
        )
    }

    /// Parses one stored record of session `key`. One larger than any
    /// store of this crate writes or reads is not parsed at all.
    fn parse(&self, key: &str, bytes: &[u8]) -> Result<Session, StoreError> {
        if bytes.len() > super::MAX_READ {
            return Err(StoreError::corrupt(TooLarge(bytes.len()))
                .with_message(format!("{key:?} is not a session")));
        }
        let session: Session = serde_json::from_slice(bytes).map_err(|e| {
            StoreError::corrupt(e).with_message(format!("{key:?} is not a session"))
        })?;
        if session.key != key {
            return Err(StoreError::corrupt(Misplaced {
                stored: session.key,
                under: key.to_owned(),
            })
            .with_message("the record holds another session"));
        }
        Ok(session)
    }
}

/// How long sent data may go unacknowledged before the kernel gives the
/// connection up: five command timeouts, at least 10 s (a lossy network's
/// retransmissions take seconds), and at most what Linux accepts (a
/// positive `int` of milliseconds, about 24.8 days: a larger value would
/// make every connection fail).
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
fn user_timeout(timeout: Duration) -> Duration {
    const LONGEST: Duration = Duration::from_millis(i32::MAX as u64);
    timeout
        .saturating_mul(5)
        .clamp(Duration::from_secs(10), LONGEST)
}

/// The connection commands go on, and how many times it was replaced.
#[derive(Clone)]
struct Conn {
    manager: ConnectionManager,
    generation: u64,
}

/// What an exchange with Redis came to.
type Answer<T> = Result<Result<T, RedisError>, tokio::time::error::Elapsed>;

/// Whether the connection broke under a command: Redis restarted, or
/// closed a connection that sat idle (its `timeout` setting, a proxy's
/// idle limit) while nothing was sent on it. The client only notices when
/// the next command fails, and reconnects then, so that command is worth
/// sending once more: a store that was idle for a while would otherwise
/// fail its first call although Redis is up. A refused connection (Redis
/// down) is not retried, so calls keep failing fast while it is down.
fn broken<T>(answer: &Answer<T>) -> bool {
    matches!(answer, Ok(Err(e)) if e.is_connection_dropped() && !e.is_connection_refusal())
}

/// Whether Redis refused the connection's login (a wrong password or
/// user), which the client never tries again on its own.
fn refused_login(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed
        || matches!(server_error(e).0.as_str(), "NOAUTH" | "WRONGPASS")
}

/// Whether Redis refused a new connection's switch to the URL's database
/// (`SELECT`), which the client never tries again on its own either. The
/// client says so only in its message.
fn refused_database(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(::redis::ServerErrorKind::ResponseError)
        && e.to_string()
            .starts_with("Redis server refused to switch database")
}

fn flatten<T>(answer: Answer<T>, what: &str, timeout: Duration) -> Result<T, StoreError> {
    match answer {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(map_error(e, what)),
        Err(elapsed) => Err(StoreError::timeout(elapsed)
            .with_message(format!("{what}: Redis did not answer within {timeout:?}"))),
    }
}

/// Maps a client error to the store's kinds, keeping it as the cause.
fn map_error(e: RedisError, what: &str) -> StoreError {
    let (code, detail) = server_error(&e);
    let error = if e.is_timeout() {
        StoreError::timeout(e)
    } else if e.kind() == ErrorKind::AuthenticationFailed
        // (A script's refusal too: see `script_error`.)
        || matches!(code.as_str(), "NOAUTH" | "WRONGPASS" | "NOPERM")
        // A new connection's `SELECT` refused for want of a password
        // (`NOAUTH`) or a permission (`NOPERM`): the client keeps only the
        // server's text, without its code.
        || (refused_database(&e)
            && (detail.starts_with("Authentication required")
                || detail.contains("no permissions")))
    {
        StoreError::unauthorized(e)
    } else if e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        // A server out of memory (`maxmemory` with `noeviction`) or out of
        // connections serves again once sessions expire or clients leave.
        || matches!(
            code.as_str(),
            "LOADING"
                | "BUSY"
                | "MASTERDOWN"
                | "READONLY"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "OOM"
                | "MISCONF"
                | "NOREPLICAS"
        )
        || (code == "ERR" && detail.starts_with("max number of clients reached"))
        // A new connection's `SELECT` refused while a script runs: the
        // client keeps `BUSY` only as the detail of its own error.
        || (refused_database(&e) && detail.starts_with("Redis is busy"))
    {
        StoreError::unavailable(e)
    } else if code == "WRONGTYPE" {
        // A session or lease key that holds a hash, a list, ...
        StoreError::corrupt(e)
    } else if e.kind() == ErrorKind::InvalidClientConfig {
        StoreError::other(e)
    } else if matches!(e.kind(), ErrorKind::Server(_)) || !code.is_empty() {
        StoreError::rejected(e)
    } else {
        StoreError::other(e)
    };
    error.with_message(format!("Redis: {what}"))
}

/// The code and detail of the error the server answered, if any: of the
/// first command that failed, in a pipeline or a transaction. Before
/// Redis 7, an error a command met inside a script came back as `ERR`
/// with the command's error in its text (`ERR Error running script (call
/// to f_…): @user_script:1: @user_script: 1: -READONLY You can't write
/// …`): that command's code and detail are answered then.
fn server_error(e: &RedisError) -> (String, String) {
    let first = e.clone().into_server_errors().and_then(|errors| {
        errors.first().map(|(_, error)| {
            (
                error.code().to_owned(),
                error.details().unwrap_or_default().to_owned(),
            )
        })
    });
    let (code, detail) = first.unwrap_or_else(|| {
        (
            e.code().unwrap_or_default().to_owned(),
            e.detail().unwrap_or_default().to_owned(),
        )
    });
    match script_error(&code, &detail) {
        Some((code, detail)) => (code.to_owned(), detail.to_owned()),
        None => (code, detail),
    }
}

/// The code and detail of the command error a script error stands for: the
/// one a pre-7 script error wraps, or `NOPERM` for a command, key or channel
/// the script used that the user may not, which Redis answers with `ERR`
/// (in the words of Redis 6 and 7.0, then of 7.2 and later, and Valkey).
fn script_error<'a>(code: &str, detail: &'a str) -> Option<(&'a str, &'a str)> {
    if code != "ERR" {
        return None;
    }
    if detail.starts_with("ACL failure in script")
        || detail.contains("The user executing the script can't")
    {
        return Some(("NOPERM", detail));
    }
    if !detail.starts_with("Error running script") {
        return None;
    }
    let (_, inner) = detail.split_once(": -")?;
    let (code, detail) = inner.split_once(' ').unwrap_or((inner, ""));
    let is_code = !code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase());
    is_code.then_some((code, detail))
}

/// An expiry in whole milliseconds: at least 1, at most about a century
/// (Redis refuses one past its 64-bit clock; longer is forever).
fn millis(d: Duration) -> u64 {
    // At most a century: a few trillion milliseconds.
    super::clamp_ttl(d).as_millis() as u64
}

/// 128 random bits as hex.
fn random_token() -> String {
    let n: u128 = rand::random();
    format!("{n:032x}")
}

/// Escapes the glob characters of a `SCAN MATCH` pattern.
fn glob_escape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 4);
    for &b in s {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\' | b'^' | b'-') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// The URL with its passwords replaced: the user information's, read up
/// to the last `@` (a password may hold `/` and `?`; with no scheme, from
/// the start), and the values of `pass` and `password` after any `?` or
/// `&`, up to the next `&` (a `redis+unix://` URL's query, whose values
/// may hold `@` and `?` too). As
/// an `@` or a `?` can belong to either, both readings are hidden.
fn redact(url: &str) -> String {
    let start = crate::error::after_scheme(url, 0);
    let (scheme, rest) = url.split_at(start);
    let mut hidden = Vec::new();
    if let Some(at) = rest.rfind('@') {
        // The user name, before the first `:`, is shown.
        hidden.push(rest[..at].find(':').map_or(0, |colon| colon + 1)..at);
    }
    let mut from = 0;
    for end in rest
        .match_indices(['?', '&'])
        .map(|(i, _)| i)
        .chain([rest.len()])
    {
        if let Some((name, _)) = rest[from..end].split_once('=') {
            if name.eq_ignore_ascii_case("pass") || name.eq_ignore_ascii_case("password") {
                // The value goes on to the next `&`: a `?` in it is the
                // password's.
                let value_end = rest[end..].find('&').map_or(rest.len(), |i| end + i);
                hidden.push(from + name.len() + 1..value_end);
            }
        }
        from = end + 1;
    }
    hidden.sort_by_key(|range| range.start);
    let mut merged: Vec<std::ops::Range<usize>> = Vec::new();
    for range in hidden {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    let mut shown = scheme.to_owned();
    let mut next = 0;
    for range in merged {
        shown.extend([&rest[next..range.start], "***"]);
        next = range.end;
    }
    shown.push_str(&rest[next..]);
    shown
}

/// A session's record: its JSON, refused when too deep or too large for
/// any store of this crate to read back.
fn encode(session: &Session) -> Result<Vec<u8>, StoreError> {
    session.check_depth()?;
    let json = serde_json::to_vec(session)
        .map_err(|e| StoreError::other(e).with_message("session cannot be encoded as JSON"))?;
    super::check_size(json.len())?;
    Ok(json)
}

impl SessionStore for RedisStore {
    /// Half the [`ttl`](RedisStoreBuilder::ttl), if any: a session in use
    /// is refreshed before its record can expire.
    fn refresh_interval(&self) -> Option<Duration> {
        self.inner.ttl.map(|ttl| ttl / 2)
    }

    /// Renews the record's expiry (`PEXPIRE`), without writing it or
    /// telling the other replicas: nothing about the session changed, and
    /// another replica may have moved it meanwhile. A record that expired
    /// all the same (the session went unused for more than half the TTL,
    /// then came back before it left this replica's table) is written
    /// again as this replica knows it, but a record another replica
    /// deleted is not: the delete leaves a tombstone for one TTL, which a
    /// refresh that finds it renews instead. One Lua script does all of
    /// it, so no save or delete lands in between.
    fn refresh<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let Some(ttl) = self.inner.ttl else {
                return Ok(());
            };
            let key = self.session_key(&session.key);
            let tombstone = self.tombstone_key(&session.key);
            let ttl = millis(ttl).to_string();
            let keys: [&[u8]; 2] = [&key, &tombstone];
            let script = &self.inner.refresh;
            // The record goes over the wire only when it has to be written
            // back (3: neither the record nor a tombstone is there).
            let mut outcome = self
                .inner
                .run_script(script, &keys, &[ttl.as_bytes()], "refresh")
                .await?;
            if outcome == 3 {
                let json = encode(session)?;
                outcome = self
                    .inner
                    .run_script(script, &keys, &[ttl.as_bytes(), &json], "refresh")
                    .await?;
            }
            if outcome == 0 {
                tracing::debug!(session_digest = %super::KeyDigest(&session.key), "not refreshed: another replica deleted it");
            }
            Ok(())
        })
    }

    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        Box::pin(async move {
            let inner = &*self.inner;
            let keys = inner.scan().await?;
            let start = inner.prefix.len() + 2;
            let mut loaded = Loaded::default();
            for chunk in keys.chunks(BATCH) {
                let mut cmd = ::redis::cmd("MGET");
                for key in chunk {
                    cmd.arg(key);
                }
                let values: Vec<Option<Vec<u8>>> = inner.run(&cmd, "read sessions").await?;
                let mut absent = Vec::new();
                for (redis_key, value) in chunk.iter().zip(values) {
                    let Some(value) = value else {
                        // Deleted or expired since the scan, or not a
                        // string (`MGET` answers nil for a hash too).
                        absent.push(redis_key);
                        continue;
                    };
                    let name = String::from_utf8_lossy(redis_key).into_owned();
                    let parsed = std::str::from_utf8(redis_key.get(start..).unwrap_or_default())
                        .map_err(|e| StoreError::corrupt(e).with_message("the key is not UTF-8"))
                        .and_then(|key| inner.parse(key, &value));
                    match parsed {
                        Ok(session) => loaded.sessions.push(session),
                        Err(e) => {
                            tracing::warn!(record = %name, error = %crate::error::Report(&e), "skipping unreadable Redis session");
                            loaded.skip(name, e);
                        }
                    }
                }
                if absent.is_empty() {
                    continue;
                }
                let mut pipe = ::redis::pipe();
                for redis_key in &absent {
                    pipe.cmd("TYPE").arg(redis_key);
                }
                let types: Vec<String> = inner.run_pipe(&pipe, "read sessions").await?;
                for (redis_key, kind) in absent.into_iter().zip(types) {
                    // Deleted or expired since the scan; or saved again
                    // since the `MGET`, like any key written after the
                    // scan began, which a listing may miss.
                    if kind == "none" || kind == "string" {
                        continue;
                    }
                    let name = String::from_utf8_lossy(redis_key).into_owned();
                    let e = StoreError::corrupt(WrongType(kind))
                        .with_message("the record is not a string");
                    tracing::warn!(record = %name, error = %crate::error::Report(&e), "skipping unreadable Redis session");
                    loaded.skip(name, e);
                }
            }
            Ok(loaded)
        })
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut cmd;
            match inner.ttl {
                Some(ttl) => {
                    cmd = ::redis::cmd("GETEX");
                    cmd.arg(self.session_key(key)).arg("PX").arg(millis(ttl));
                }
                None => {
                    cmd = ::redis::cmd("GET");
                    cmd.arg(self.session_key(key));
                }
            }
            let value: Option<Vec<u8>> = inner.run(&cmd, "load").await?;
            value.map(|v| inner.parse(key, &v)).transpose()
        })
    }

    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &*self.inner;
            let json = encode(session)?;
            // One transaction (`MULTI`/`EXEC`): a connection lost between
            // the two must not leave a move stored but never announced.
            let mut pipe = ::redis::pipe();
            pipe.atomic();
            let set = pipe
                .cmd("SET")
                .arg(self.session_key(&session.key))
                .arg(json);
            if let Some(ttl) = inner.ttl {
                set.arg("PX").arg(millis(ttl));
            }
            set.ignore();
            // A session saved again (a new one under the key of one that
            // ended) is no longer deleted: refreshes may write it back.
            pipe.cmd("DEL")
                .arg(self.tombstone_key(&session.key))
                .ignore();
            if inner.notify {
                pipe.cmd("PUBLISH")
                    .arg(&inner.channel)
                    .arg(inner.notice(&session.key, Some(&session.backend))?)
                    .ignore();
            }
            inner.run_pipe::<()>(&pipe, "save").await
        })
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &*self.inner;
            // Once out of memory, the batches after go straight to the
            // pipeline.
            let mut full = false;
            for chunk in keys.chunks(BATCH) {
                let pipe = self.delete_pipe(chunk, full)?;
                match inner.run_pipe::<()>(&pipe, "delete").await {
                    // At `maxmemory` (with `noeviction`) Redis queues no
                    // command in a transaction, and writes no tombstone: it
                    // would refuse the deletes, which free memory. Then
                    // delete in a plain pipeline, without tombstones. A
                    // refresh could write such a session back, but not
                    // while memory is full (its write is refused too), and
                    // a session written back only routes its key as before
                    // until its TTL.
                    Err(e) if !full && out_of_memory(&e) => {
                        tracing::warn!(
                            sessions = keys.len(),
                            "Redis is out of memory: sessions deleted without a transaction or tombstones"
                        );
                        full = true;
                        let pipe = self.delete_pipe(chunk, true)?;
                        inner.run_pipe::<()>(&pipe, "delete").await?;
                    }
                    answer => answer?,
                }
            }
            Ok(())
        })
    }
}

/// Whether Redis refused a command for want of memory (`OOM`: `maxmemory`
/// reached with the `noeviction` policy).
fn out_of_memory(e: &StoreError) -> bool {
    crate::error::find::<RedisError>(e).is_some_and(|e| server_error(e).0 == "OOM")
}

/// A lease of [`lease`](RedisStoreBuilder::lease)'s TTL, through
/// [`RedisStore::claim`]; a lost claim answers `None`. While the guard
/// lives, a task extends the lease every third of its TTL, so a restore
/// that takes longer than the TTL keeps it; dropping the guard stops the
/// extensions and leaves the lease to expire, releasing it ends it at once.
impl SessionLock for RedisStore {
    fn lock<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<SessionGuard>> {
        Box::pin(async move {
            let claim = self
                .claim(key, self.inner.lease_ttl, self.inner.lease_wait)
                .await?;
            Ok(match claim {
                Claim::Won(lease) => {
                    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                    let keeper = tokio::spawn(keep_alive(lease, self.inner.lease_ttl, stopped));
                    Some(SessionGuard::new(async move {
                        // Stops the extensions (after one under way) and
                        // takes the lease back. A guard dropped unreleased
                        // drops `stop` too: the keeper ends, and so does the
                        // lease, at its expiry.
                        drop(stop);
                        let Ok(lease) = keeper.await else {
                            // The keeper panicked: the lease expires.
                            return Ok(());
                        };
                        let key = lease.key().to_owned();
                        if !lease.release().await? {
                            tracing::warn!(session_digest = %super::KeyDigest(&key), "a session lease expired before it was released");
                        }
                        Ok(())
                    }))
                }
                Claim::Lost(_) => None,
            })
        })
    }
}

/// Extends `lease` by `ttl` every third of `ttl` until `stopped` fires (the
/// guard was released or dropped), then hands the lease back. Stops
/// extending a lease found lost.
async fn keep_alive(
    lease: Lease,
    ttl: Duration,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) -> Lease {
    let period = (ttl / 3).max(crate::time::SHORTEST);
    let mut held = true;
    loop {
        tokio::select! {
            _ = &mut stopped => return lease,
            () = tokio::time::sleep(period), if held => {}
        }
        match lease.extend(ttl).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(session_digest = %super::KeyDigest(lease.key()), "a session lease was lost while it was held");
                held = false;
            }
            // Tried again at the next period, while the lease still runs.
            Err(e) => {
                tracing::warn!(session_digest = %super::KeyDigest(lease.key()), error = %crate::error::Report(&e), "could not extend a session lease");
            }
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.url)
            .field("prefix", &self.inner.prefix)
            .field("ttl", &self.inner.ttl)
            .field("timeout", &self.inner.timeout)
            .field("notify", &self.inner.notify)
            .field("lease_ttl", &self.inner.lease_ttl)
            .field("lease_wait", &self.inner.lease_wait)
            .finish()
    }
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("url", &redact(&self.url))
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .field("notify", &self.notify)
            .field("lease_ttl", &self.lease_ttl)
            .field("lease_wait", &self.lease_wait)
            .finish()
    }
}

/// An ownership lease on one session, taken with
/// [`RedisStore::try_lease`] or [`RedisStore::claim`].
///
/// Dropping a lease does not release it (that needs a round trip): it then
/// expires after its TTL. Call [`release`](Lease::release) when done.
#[must_use = "a lease is held until released or expired"]
pub struct Lease {
    store: RedisStore,
    key: String,
    redis_key: Vec<u8>,
    token: String,
}

/// The state of a session's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseState {
    /// Nobody holds it: never taken, or expired unreleased.
    Free,
    /// Someone holds it.
    Held,
    /// Released a moment ago: the work it guarded is done.
    Done,
}

impl Lease {
    /// The session key the lease is on.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Releases the lease if this owner still holds it (compare and set in
    /// one Lua script, so a lease that expired and was taken by another
    /// replica is left alone): the key then says `done` for a minute, so
    /// that a replica that waited for the lease knows the work was done.
    /// Returns whether it was still held.
    pub async fn release(self) -> Result<bool, StoreError> {
        let done_for = millis(DONE_FOR).to_string();
        let n = self
            .store
            .inner
            .run_script(
                &self.store.inner.release,
                &[&self.redis_key],
                &[self.token.as_bytes(), done_for.as_bytes()],
                "release a lease",
            )
            .await?;
        Ok(n == 1)
    }

    /// Sets the lease to expire `ttl` from now if this owner still holds
    /// it. Returns whether it was still held.
    pub async fn extend(&self, ttl: Duration) -> Result<bool, StoreError> {
        let ttl = millis(ttl).to_string();
        let n = self
            .store
            .inner
            .run_script(
                &self.store.inner.extend,
                &[&self.redis_key],
                &[self.token.as_bytes(), ttl.as_bytes()],
                "extend a lease",
            )
            .await?;
        Ok(n == 1)
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

/// What [`RedisStore::claim`] decided.
#[derive(Debug)]
#[non_exhaustive]
pub enum Claim {
    /// This replica holds the lease: restore the session, save the result,
    /// then [`release`](Lease::release) it.
    Won(Lease),
    /// Another replica held the lease and has released it, its work done
    /// (a lease that expires unreleased is taken over instead): the
    /// session as it saved it, if any.
    Lost(Option<Session>),
}

/// What another replica changed, yielded by [`Invalidations::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation {
    /// Session `key` was saved on `backend` (it started or moved), or
    /// deleted (`backend` is `None`): drop what is cached about it.
    Session {
        /// The session key.
        key: String,
        /// Where it is now, if it still exists.
        backend: Option<BackendId>,
    },
    /// The subscription reconnected and notices may have been lost: drop
    /// everything cached (or check it against the store).
    All,
}

/// The other replicas' move notices, from [`RedisStore::subscribe`].
pub struct Invalidations {
    rx: mpsc::Receiver<Invalidation>,
    /// Notices were dropped for this reader, or lost in a reconnection: it
    /// is owed an `All`.
    lagging: Arc<AtomicBool>,
    task: AbortOnDrop<()>,
}

impl Invalidations {
    /// The next invalidation; `None` only if the listening task ended
    /// (never while the runtime runs).
    pub async fn next(&mut self) -> Option<Invalidation> {
        self.rx.recv().await
    }
}

/// The same invalidations as [`next`](Invalidations::next), as a stream.
impl Stream for Invalidations {
    type Item = Invalidation;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Invalidation>> {
        self.rx.poll_recv(cx)
    }
}

impl fmt::Debug for Invalidations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invalidations")
            .field("pending", &self.rx.len())
            .field("lagging", &self.lagging.load(Ordering::Relaxed))
            .field("listening", &!self.task.0.is_finished())
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct Notice {
    key: String,
    backend: Option<String>,
    origin: String,
}

/// How often a subscription that cannot reconnect says so at `warn` (each
/// attempt in between is a `debug` line).
const RESUBSCRIBE_SAID_EVERY: Duration = Duration::from_secs(60);

/// Forwards notices until the receiver is dropped, reconnecting with a
/// capped backoff whenever the subscription connection ends.
async fn listen(
    inner: Arc<Inner>,
    mut pubsub: ::redis::aio::PubSub,
    tx: mpsc::Sender<Invalidation>,
    lagging: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(50);
    // When the subscription may next say at `warn` that it is down: once a
    // minute, however often it drops and comes back meanwhile.
    let mut say_down = None;
    // `lagging`: notices were dropped for a reader that lagged, and it is
    // owed an `All` as soon as it has room. (The client reads the
    // subscription eagerly into a queue without a bound, so waiting for
    // the reader would only move the backlog there.) Meanwhile notices are
    // dropped as they come, unparsed: taking one off that queue then costs
    // less than the client spent putting it there, so the queue is kept
    // short while this task gets to run.
    loop {
        {
            let (mut sink, stream) = pubsub.split();
            let mut stream = std::pin::pin!(stream);
            let mut ping = tokio::time::interval(PING_EVERY);
            ping.tick().await;
            loop {
                let msg = tokio::select! {
                    msg = poll_fn(|cx| stream.as_mut().poll_next(cx)) => msg,
                    () = tx.closed() => return,
                    permit = tx.reserve(), if lagging.load(Ordering::Relaxed) => {
                        let Ok(permit) = permit else { return };
                        permit.send(Invalidation::All);
                        lagging.store(false, Ordering::Relaxed);
                        continue;
                    }
                    _ = ping.tick() => {
                        // A connection dropped without a word (a firewall
                        // forgetting it) only shows when a ping goes
                        // unanswered. A server that is only slow (an fsync,
                        // a long script) answers late: it gets until the
                        // next ping, not a command's timeout, since a new
                        // subscription would cost every replica its table.
                        let wait = PING_EVERY.max(inner.timeout);
                        let pong = tokio::select! {
                            pong = tokio::time::timeout(wait, sink.ping::<Value>()) => pong,
                            () = tx.closed() => return,
                        };
                        if matches!(pong, Ok(Ok(_))) {
                            continue;
                        }
                        break;
                    }
                };
                let Some(msg) = msg else { break };
                if lagging.load(Ordering::Relaxed) {
                    continue;
                }
                let notice: Notice = match serde_json::from_slice(msg.get_payload_bytes()) {
                    Ok(n) => n,
                    Err(error) => {
                        tracing::debug!(error = %crate::error::Report(&error), "ignoring a malformed move notice");
                        continue;
                    }
                };
                if notice.origin == inner.origin {
                    continue;
                }
                let invalidation = Invalidation::Session {
                    key: notice.key,
                    backend: notice.backend.map(BackendId::from),
                };
                match tx.try_send(invalidation) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(channel = %inner.channel, "move notices dropped for a reader that lags behind; it will be told to drop everything");
                        lagging.store(true, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        }
        // Until it is back, other replicas' moves go unheard: an operator
        // needs to know, without a line every two seconds.
        if claim_due(&mut say_down, RESUBSCRIBE_SAID_EVERY, Instant::now()) {
            tracing::warn!(channel = %inner.channel, "move notice subscription lost, reconnecting");
        } else {
            tracing::debug!(channel = %inner.channel, "move notice subscription lost, reconnecting");
        }
        let mut failed = 0u32;
        pubsub = loop {
            if tx.is_closed() {
                return;
            }
            match inner.connect_pubsub().await {
                Ok(p) => break p,
                Err(error) => {
                    failed = failed.saturating_add(1);
                    if failed == 1
                        || claim_due(&mut say_down, RESUBSCRIBE_SAID_EVERY, Instant::now())
                    {
                        tracing::warn!(
                            channel = %inner.channel,
                            failed,
                            error = %crate::error::Report(&error),
                            "cannot resubscribe to move notices yet: other replicas' moves go unheard"
                        );
                    } else {
                        tracing::debug!(error = %crate::error::Report(&error), "cannot resubscribe to move notices yet");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        tracing::info!(channel = %inner.channel, failed, "move notice subscription back");
        backoff = Duration::from_millis(50);
        // Owed as soon as the reader has room, as for a lag.
        lagging.store(true, Ordering::Relaxed);
    }
}

/// A lease still held when a claim gave up waiting.
#[derive(Debug)]
struct LeaseHeld(String);

impl fmt::Display for LeaseHeld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "session {:?} is leased by another owner", self.0)
    }
}

impl StdError for LeaseHeld {}

/// A session key that holds another type of value than a string.
#[derive(Debug)]
struct WrongType(String);

impl fmt::Display for WrongType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the key holds a {}, not a session's JSON", self.0)
    }
}

impl StdError for WrongType {}

/// A stored value larger than any record a store of this crate reads.
#[derive(Debug)]
struct TooLarge(usize);

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the value is {} bytes, more than any session record ({} bytes)",
            self.0,
            super::MAX_READ
        )
    }
}

impl StdError for TooLarge {}

/// A record stored under one key that holds another key's session.
#[derive(Debug)]
struct Misplaced {
    stored: String,
    under: String,
}

impl fmt::Display for Misplaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the record under {:?} is session {:?}",
            self.under, self.stored
        )
    }
}

impl StdError for Misplaced {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape(b"a*b?c[d]e\\f"), b"a\\*b\\?c\\[d\\]e\\\\f");
        assert_eq!(glob_escape(b"plain:"), b"plain:");
    }

    #[test]
    fn urls_are_shown_without_passwords() {
        assert_eq!(
            redact("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact("redis://:secret@host"), "redis://:***@host");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact("redis://secret@host"), "redis://***@host");
        assert_eq!(
            redact("redis://:se/cr@et@host:1/0"),
            "redis://:***@host:1/0"
        );
        assert_eq!(
            redact("redis+unix:///run/redis.sock?db=1&pass=secret&user=u"),
            "redis+unix:///run/redis.sock?db=1&pass=***&user=u"
        );
        assert_eq!(
            redact("redis+unix:///run/redis.sock?PASSWORD=secret"),
            "redis+unix:///run/redis.sock?PASSWORD=***"
        );
        // A `?` in the password, and a URL without its scheme.
        assert_eq!(
            redact("redis://:pa?secret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            redact("default:secret@redis.internal:6379"),
            "default:***@redis.internal:6379"
        );
        // No scheme, and `://` in the password.
        assert_eq!(
            redact("default:se://cret@redis.internal:6379"),
            "default:***@redis.internal:6379"
        );
        // An `@` in the query's user name.
        assert_eq!(
            redact("redis+unix:///run/redis.sock?user=svc@prod&pass=secret"),
            "redis+unix://***@prod&pass=***"
        );
        // An `@` in the query's password: cut at the last `@`, the
        // password's end would show.
        assert_eq!(
            redact("redis+unix:///run/redis.sock?pass=p@ssword"),
            "redis+unix://***"
        );
        assert_eq!(
            redact("redis+unix:///run/redis.sock?password=p@ss&db=2"),
            "redis+unix://***&db=2"
        );
        assert_eq!(
            redact("redis+unix:///run/redis.sock?pass=a?b&db=2"),
            "redis+unix:///run/redis.sock?pass=***&db=2"
        );
    }

    /// A password: a marker no other part of a generated URL holds, then
    /// characters that may stand for a user information's or a query's
    /// separators (`/`, `?`, `@`, `:`, `://`), or be past ASCII. No `&`,
    /// which ends a query's value, and no `=`: a `?pass=` in a user
    /// information would be read as a query too, and hide the host.
    fn passwords() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::strategy::Strategy as _;
        "[A-Z0-9/?@:#%é~!$*+,; ]{0,16}(://)?[A-Z0-9/?@:]{0,4}"
            .prop_map(|tail| format!("SeCrEt{tail}"))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any text, and text made of the characters the reading splits
        /// at, is shown without a panic.
        #[test]
        fn any_text_is_shown(
            text in proptest::prelude::any::<String>(),
            separators in "(redis://|redis\\+unix://|://)?[@?&=:/aps é]{0,40}",
        ) {
            redact(&text);
            redact(&separators);
        }

        /// A password in the user information, with or without a scheme
        /// and whatever it holds, is replaced, and only it: the user
        /// name, host, port and database stay.
        #[test]
        fn a_user_informations_password_is_hidden(
            scheme in "(redis://|rediss://|)",
            user in "[a-z0-9._-]{0,12}",
            password in passwords(),
            host in "([a-z0-9-]{1,12}(\\.[a-z0-9-]{1,8}){0,2}|\\[::1\\]|10\\.0\\.0\\.1)",
            port: u16,
            db in 0u8..16,
            query in "(|\\?protocol=resp3)",
        ) {
            let shown = redact(&format!("{scheme}{user}:{password}@{host}:{port}/{db}{query}"));
            proptest::prop_assert!(!shown.contains(&password), "{}", shown);
            proptest::prop_assert_eq!(shown, format!("{scheme}{user}:***@{host}:{port}/{db}{query}"));
        }

        /// A `pass` or `password` parameter (in any case) of a
        /// `redis+unix://` URL's query, first or after others, is
        /// replaced up to the next `&`, whatever it holds: what follows it
        /// stays, and what precedes it too unless the password holds an
        /// `@`, which could end a user information.
        #[test]
        fn a_querys_password_is_hidden(
            path in "/(run|tmp/é)/redis[a-z0-9-]{0,6}\\.sock",
            // Each letter in either case.
            name in "[pP][aA][sS][sS]([wW][oO][rR][dD])?",
            password in passwords(),
            before in proptest::collection::vec("(db=[0-9]{1,2}|user=[a-z0-9]{1,8}|protocol=resp3)", 0..3),
            after in proptest::collection::vec("(db=[0-9]{1,2}|user=[a-z0-9]{1,8}|protocol=resp3)", 0..3),
        ) {
            let mut head = format!("redis+unix://{path}");
            for (i, parameter) in before.iter().enumerate() {
                head.extend([if i == 0 { "?" } else { "&" }, parameter]);
            }
            head.extend([if before.is_empty() { "?" } else { "&" }, &name, "="]);
            let tail: String = after.iter().map(|parameter| format!("&{parameter}")).collect();
            let shown = redact(&format!("{head}{password}{tail}"));
            proptest::prop_assert!(!shown.contains(&password), "{}", shown);
            let kept = shown.strip_suffix(&tail).and_then(|s| s.strip_suffix("***"));
            proptest::prop_assert!(kept.is_some_and(|kept| head.starts_with(kept)), "{}", shown);
            if !password.contains('@') {
                proptest::prop_assert_eq!(shown, format!("{head}***{tail}"));
            }
        }
    }

    #[test]
    fn tokens_are_random_and_long() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    fn server_says(reply: &[u8]) -> RedisError {
        ::redis::parse_redis_value(reply)
            .unwrap()
            .extract_error()
            .unwrap_err()
    }

    #[test]
    fn server_errors_map_to_their_kinds() {
        // Full of memory or of clients: serves again later.
        for reply in [
            &b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"[..],
            b"-ERR max number of clients reached\r\n",
            b"-LOADING Redis is loading the dataset in memory\r\n",
            // Cannot write its snapshot (a full disk), or too few replicas.
            b"-MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.\r\n",
            b"-NOREPLICAS Not enough good replicas to write.\r\n",
        ] {
            let e = map_error(server_says(reply), "save");
            let reply = String::from_utf8_lossy(reply);
            assert!(e.is_unavailable() && e.is_transient(), "{reply}: {e:?}");
        }
        // The same met by a command inside a script, before Redis 7
        // (and in servers that answer as it did).
        for reply in [
            &b"-ERR Error running script (call to f_1028a5dba704e1d8a01fd96efeba25bb78f62df2): @user_script:4: @user_script: 4: -READONLY You can't write against a read only replica.\r\n"[..],
            b"-ERR Error running script (call to f_8ea0e3f4c1b0f1c2d3e4f5a6b7c8d9e0f1a2b3c4): @user_script:1: @user_script: 1: -OOM command not allowed when used memory > 'maxmemory'.\r\n",
            b"-ERR Error running script (call to d8f2fad9f8e86a53d2a6ebd960b33c4972cacc37): @user_script:2: -READONLY You can't write against a read only replica.\r\n",
        ] {
            let e = map_error(server_says(reply), "save");
            let reply = String::from_utf8_lossy(reply);
            assert!(e.is_unavailable() && e.is_transient(), "{reply}: {e:?}");
        }
        let (code, detail) = server_error(&server_says(
            b"-ERR Error running script (call to f_1): @user_script:4: @user_script: 4: -READONLY You can't write against a read only replica.\r\n",
        ));
        assert_eq!(code, "READONLY");
        assert_eq!(detail, "You can't write against a read only replica.");
        // A script's own error, or one that names no code, stays `ERR`.
        for reply in [
            &b"-ERR Error running script (call to f_1): @user_script:1: user_script:1: attempt to call field 'nope' (a nil value)\r\n"[..],
            b"-ERR Error running script (call to f_1): @user_script:1: -wrong kind\r\n",
        ] {
            let e = map_error(server_says(reply), "save");
            assert!(e.is_rejected(), "{e:?}");
        }
        let e = map_error(
            server_says(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
            "load",
        );
        assert!(e.is_corrupt(), "{e:?}");
        let e = map_error(server_says(b"-ERR unknown command 'GETEX'\r\n"), "load");
        assert!(e.is_rejected(), "{e:?}");
        let e = map_error(server_says(b"-NOPERM no permission\r\n"), "load");
        assert!(e.is_unauthorized(), "{e:?}");
        // A permission a script's command lacks, as Redis 7.2, Redis 7.0
        // and Redis 6 answer it.
        for reply in [
            &b"-ERR ACL failure in script: No permissions to run the 'pexpire' command script: 1b936e3fe509bcbc9cd0664897bbe8fd0cac101b, on @user_script:3.\r\n"[..],
            &b"-ERR The user executing the script can't run this command or subcommand script: 1b936e3fe509bcbc9cd0664897bbe8fd0cac101b, on @user_script:3.\r\n"[..],
            b"-ERR Error running script (call to f_1b936e3fe509bcbc9cd0664897bbe8fd0cac101b): @user_script:3: @user_script: 3: The user executing the script can't access at least one of the keys mentioned in the command\r\n",
        ] {
            let e = map_error(server_says(reply), "refresh");
            let reply = String::from_utf8_lossy(reply);
            assert!(e.is_unauthorized(), "{reply}: {e:?}");
        }
    }

    #[test]
    fn durations_round_to_at_least_one_millisecond_and_at_most_a_century() {
        assert_eq!(millis(Duration::from_micros(10)), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis(Duration::MAX), 100 * 365 * 24 * 3600 * 1000);
    }
}
