use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;

use super::{Loaded, Session, SessionStore, StoreFuture};

/// Sessions in this process's memory, shared by every clone.
///
/// For tests, and for several balancers in one process that should agree
/// on sessions. Nothing survives a restart: use a file, webhook or Redis
/// store for that.
#[derive(Clone, Default)]
pub struct MemoryStore {
    sessions: Arc<RwLock<HashMap<String, Session>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// The number of stored sessions.
    pub fn len(&self) -> usize {
        self.sessions.read().len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.sessions.read().is_empty()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("sessions", &self.len())
            .finish()
    }
}

impl SessionStore for MemoryStore {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        let sessions = self.sessions.read().values().cloned().collect();
        Box::pin(std::future::ready(Ok(Loaded::new(sessions))))
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        let session = self.sessions.read().get(key).cloned();
        Box::pin(std::future::ready(Ok(session)))
    }

    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        self.sessions
            .write()
            .insert(session.key.clone(), session.clone());
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        let mut sessions = self.sessions.write();
        for key in keys {
            sessions.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}
