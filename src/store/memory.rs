use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::time::Instant;

use super::{Loaded, Session, SessionStore, StoreFuture, MAX_TTL};

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
}

#[derive(Default)]
struct Inner {
    sessions: RwLock<HashMap<String, Record>>,
    ttl: Option<Duration>,
    /// When the next save sweeps expired records out (with a TTL).
    next_sweep: Mutex<Option<Instant>>,
}

struct Record {
    session: Session,
    /// When the record expires: its last save or load plus the TTL
    /// (`None` without one).
    expires: Option<Instant>,
}

impl MemoryStore {
    /// An empty store whose records never expire.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// An empty store whose records expire `ttl` after their last save or
    /// load: a load does not find an expired record, and saves remove
    /// expired records (each save at most once every half `ttl` looks at
    /// every record). The sticky layer saves a session it serves again
    /// every half `ttl` (see [`SessionStore::refresh_interval`]), so only
    /// sessions nobody uses expire. Time is [`tokio::time::Instant`], so
    /// tests can pause it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// use tower_ha::store::{MemoryStore, Session, SessionStore};
    ///
    /// let store = MemoryStore::with_ttl(Duration::from_secs(60));
    /// store.save(&Session::new("alice", "node-a".into())).await.unwrap();
    /// assert_eq!(store.refresh_interval(), Some(Duration::from_secs(30)));
    ///
    /// tokio::time::sleep(Duration::from_secs(61)).await;
    /// assert!(store.load("alice").await.unwrap().is_none());
    /// # }
    /// ```
    pub fn with_ttl(ttl: Duration) -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                ttl: Some(ttl.min(MAX_TTL)),
                ..Inner::default()
            }),
        }
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
}

impl Inner {
    fn expires(&self, now: Instant) -> Option<Instant> {
        self.ttl.map(|ttl| now + ttl)
    }

    /// Clones the live session of `record` and renews its expiry.
    fn read(&self, record: &mut Record, now: Instant) -> Option<Session> {
        if record.expires.is_some_and(|at| at <= now) {
            return None;
        }
        record.expires = self.expires(now);
        Some(record.session.clone())
    }

    /// Removes every expired record, if the last sweep was half a TTL ago.
    fn sweep(&self, sessions: &mut HashMap<String, Record>, now: Instant) {
        let Some(ttl) = self.ttl else { return };
        let mut next = self.next_sweep.lock();
        if next.is_some_and(|at| now < at) {
            return;
        }
        *next = Some(now + ttl / 2);
        sessions.retain(|_, r| r.expires.is_none_or(|at| at > now));
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("sessions", &self.len())
            .field("ttl", &self.inner.ttl)
            .finish()
    }
}

impl SessionStore for MemoryStore {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        let now = Instant::now();
        let sessions = self
            .inner
            .sessions
            .write()
            .values_mut()
            .filter_map(|record| self.inner.read(record, now))
            .collect();
        Box::pin(std::future::ready(Ok(Loaded::new(sessions))))
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        let now = Instant::now();
        let session = match self.inner.ttl {
            None => self
                .inner
                .sessions
                .read()
                .get(key)
                .map(|r| r.session.clone()),
            Some(_) => (self.inner.sessions.write().get_mut(key))
                .and_then(|record| self.inner.read(record, now)),
        };
        Box::pin(std::future::ready(Ok(session)))
    }

    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        let now = Instant::now();
        let mut sessions = self.inner.sessions.write();
        self.inner.sweep(&mut sessions, now);
        let record = Record {
            session: session.clone(),
            expires: self.inner.expires(now),
        };
        sessions.insert(session.key.clone(), record);
        Box::pin(std::future::ready(Ok(())))
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
        self.inner.ttl.map(|ttl| ttl / 2)
    }
}
