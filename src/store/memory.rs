use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::time::Instant;

use super::{clamp_ttl, Loaded, Session, SessionStore, StoreFuture};
use crate::time::claim_due;

/// Sessions in this process's memory, shared by every clone.
///
/// For tests, and for several balancers in one process that should agree
/// on sessions. Nothing survives a restart: use a file, webhook or Redis
/// store for that.
///
/// A record stays until it is deleted, unless the store has a time to live
/// ([`with_ttl`](MemoryStore::with_ttl)), which bounds the store when
/// clients mint session keys freely (the sticky layer's own cookie on a
/// public site).
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
    ttl: Option<Duration>,
}

#[derive(Default)]
struct Inner {
    sessions: RwLock<HashMap<String, Record>>,
    /// When the next save sweeps expired records out (with a TTL).
    next_sweep: Mutex<Option<Instant>>,
}

struct Record {
    session: Session,
    /// When the record expires: its last save or load plus the TTL of the
    /// handle that did it (`None` without one).
    expires: Option<Instant>,
}

impl Record {
    fn is_live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| now < at)
    }
}

impl MemoryStore {
    /// An empty store whose records never expire.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// Makes records expire `ttl` after their last save or
    /// [`load`](SessionStore::load) or [`refresh`](SessionStore::refresh)
    /// through this handle (or a clone made from it afterwards): a load
    /// does not find an expired record
    /// ([`load_all`](SessionStore::load_all) neither, and does not renew
    /// what it finds, so that restarts do not keep every record alive), and
    /// saves and refreshes remove expired records (at most once every half
    /// `ttl`, one of them looks at every record). The sticky layer refreshes a session
    /// it serves every half `ttl` (see
    /// [`SessionStore::refresh_interval`]), so only sessions nobody uses
    /// expire. `ttl` is taken as at least 1 ms and at most about a
    /// century. Time is [`tokio::time::Instant`], so tests can pause it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// use tower_ha::store::{MemoryStore, Session, SessionStore};
    ///
    /// let store = MemoryStore::new().with_ttl(Duration::from_secs(60));
    /// store.save(&Session::new("alice", "node-a".into())).await.unwrap();
    /// assert_eq!(store.refresh_interval(), Some(Duration::from_secs(30)));
    ///
    /// tokio::time::sleep(Duration::from_secs(61)).await;
    /// assert!(store.load("alice").await.unwrap().is_none());
    /// # }
    /// ```
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(clamp_ttl(ttl));
        self
    }

    /// The number of stored sessions, counting expired records that no
    /// save has removed yet.
    pub fn len(&self) -> usize {
        self.inner.sessions.read().len()
    }

    /// Whether the store is empty (see [`len`](MemoryStore::len)).
    pub fn is_empty(&self) -> bool {
        self.inner.sessions.read().is_empty()
    }

    fn expires(&self, now: Instant) -> Option<Instant> {
        self.ttl.map(|ttl| now + ttl)
    }

    /// Saves `session`, or with `renew` renews its live record instead;
    /// sweeps expired records out when due.
    fn write(&self, session: &Session, renew: bool) -> Result<(), super::StoreError> {
        let now = Instant::now();
        let mut sessions = self.inner.sessions.write();
        if let Some(ttl) = self.ttl {
            if claim_due(&mut self.inner.next_sweep.lock(), ttl / 2, now) {
                sessions.retain(|_, record| record.is_live(now));
            }
        }
        if let Some(record) =
            (sessions.get_mut(&session.key)).filter(|record| renew && record.is_live(now))
        {
            record.expires = self.expires(now);
            record.session.last_seen = record.session.last_seen.max(session.last_seen);
            return Ok(());
        }
        session.check_depth()?;
        let record = Record {
            session: session.clone(),
            expires: self.expires(now),
        };
        sessions.insert(session.key.clone(), record);
        Ok(())
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("sessions", &self.len())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl SessionStore for MemoryStore {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        let now = Instant::now();
        let sessions = (self.inner.sessions.read().values())
            .filter(|record| record.is_live(now))
            .map(|record| record.session.clone())
            .collect();
        Box::pin(std::future::ready(Ok(Loaded::new(sessions))))
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        let now = Instant::now();
        let found = |record: &Record| record.is_live(now).then(|| record.session.clone());
        let session = match self.ttl {
            None => self.inner.sessions.read().get(key).and_then(found),
            Some(_) => (self.inner.sessions.write().get_mut(key)).and_then(|record| {
                let session = found(record)?;
                record.expires = self.expires(now);
                Some(session)
            }),
        };
        Box::pin(std::future::ready(Ok(session)))
    }

    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(self.write(session, false)))
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        let mut sessions = self.inner.sessions.write();
        for key in keys {
            sessions.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    /// Half the TTL ([`with_ttl`](MemoryStore::with_ttl)), if any.
    fn refresh_interval(&self) -> Option<Duration> {
        self.ttl.map(|ttl| ttl / 2)
    }

    /// Renews the record stored under `session`'s key, its backend and
    /// data as they are (another layer sharing the store may have moved
    /// the session since, and its record is not overwritten with this
    /// copy), and brings its `last_seen` time up to date. A record that is
    /// gone (expired, or deleted through another handle: there are no
    /// tombstones) is saved again.
    fn refresh<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(self.write(session, true)))
    }
}
