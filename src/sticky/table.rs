//! The in-memory session table: key → backend, with idle expiry and a size
//! bound.
//!
//! A `parking_lot::RwLock` around a `HashMap` (SipHash, since keys come
//! from clients). A hit takes the read lock and updates the entry's
//! last-seen time with a relaxed atomic store, so hits never contend with
//! each other. Inserts take the write lock. When an insert finds the table
//! full it evicts the least recently seen eighth of the entries at once
//! (one `O(n)` selection amortised over `n / 8` inserts); idle entries are
//! dropped lazily when looked up and by a sweep that runs at most once per
//! half idle period, on insert.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use tokio::time::Instant;

use crate::backend::BackendId;
use crate::store::Session;

pub(crate) struct Entry {
    backend: BackendId,
    created: SystemTime,
    data: serde_json::Value,
    /// Nanoseconds since the table's epoch.
    last_seen: AtomicU64,
    /// The last request sent to `backend` for this session failed.
    failed: AtomicBool,
    /// The value of the layer's cookie for this session on `backend`.
    cookie: Option<Box<str>>,
}

/// A table hit: what the request path needs, cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub(crate) key: Arc<str>,
    pub(crate) backend: BackendId,
    pub(crate) failed: bool,
}

/// What a lookup found.
#[derive(Debug, Default)]
pub(crate) struct Lookup {
    pub(crate) hit: Option<Hit>,
    /// The key was there but idle: it was removed.
    pub(crate) expired: bool,
    /// The presented cookie value is exactly the one issued for the
    /// session's current backend (compared in constant time).
    pub(crate) exact: bool,
}

/// What changed when a session moved.
#[derive(Debug)]
pub(crate) struct Moved {
    pub(crate) session: Session,
    pub(crate) from: BackendId,
}

pub(crate) struct Table {
    map: RwLock<HashMap<Arc<str>, Entry>>,
    idle: Duration,
    max: usize,
    epoch: Instant,
    last_sweep: AtomicU64,
}

/// Counts of what a table operation dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub(crate) expired: u64,
    pub(crate) evicted: u64,
}

impl Table {
    pub(crate) fn new(idle: Duration, max: usize) -> Self {
        Table {
            map: RwLock::new(HashMap::new()),
            idle,
            max: max.max(1),
            epoch: Instant::now(),
            last_sweep: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    fn is_idle(&self, entry: &Entry, now: u64) -> bool {
        now.saturating_sub(entry.last_seen.load(Ordering::Relaxed)) > nanos(self.idle)
    }

    /// Looks `key` up and marks it seen. An idle entry is a miss (and is
    /// removed). `presented`, a cookie value, is compared with the one
    /// issued for the session.
    pub(crate) fn get(&self, key: &str, presented: Option<&[u8]>) -> Lookup {
        let now = self.now();
        {
            let map = self.map.read();
            let Some((k, entry)) = map.get_key_value(key) else {
                return Lookup::default();
            };
            if !self.is_idle(entry, now) {
                entry.last_seen.store(now, Ordering::Relaxed);
                let exact = match (presented, &entry.cookie) {
                    (Some(p), Some(c)) => constant_time_eq(p, c.as_bytes()),
                    _ => false,
                };
                return Lookup {
                    hit: Some(Hit {
                        key: k.clone(),
                        backend: entry.backend.clone(),
                        failed: entry.failed.load(Ordering::Relaxed),
                    }),
                    expired: false,
                    exact,
                };
            }
        }
        let mut map = self.map.write();
        // Check again: another request may have refreshed it meanwhile.
        let expired = map.get(key).is_some_and(|e| self.is_idle(e, now));
        if expired {
            map.remove(key);
        }
        Lookup {
            expired,
            ..Lookup::default()
        }
    }

    /// Inserts (or replaces) `session`, seen now.
    pub(crate) fn insert(&self, session: Session, cookie: Option<Box<str>>) -> (Arc<str>, Dropped) {
        let now = self.now();
        let key: Arc<str> = Arc::from(session.key);
        let entry = Entry {
            backend: session.backend,
            created: session.created,
            data: session.data,
            last_seen: AtomicU64::new(now),
            failed: AtomicBool::new(false),
            cookie,
        };
        let mut map = self.map.write();
        let mut dropped = self.sweep_locked(&mut map, now);
        if !map.contains_key(&key) && map.len() >= self.max {
            dropped.evicted += evict_oldest(&mut map, self.max);
        }
        map.insert(key.clone(), entry);
        (key, dropped)
    }

    /// Inserts `session` unless its key is already present; returns the
    /// entry now in the table.
    pub(crate) fn insert_if_absent(
        &self,
        session: Session,
        cookie: Option<Box<str>>,
    ) -> (Hit, Dropped) {
        if let Some(hit) = self.get(&session.key, None).hit {
            return (hit, Dropped::default());
        }
        let backend = session.backend.clone();
        let (key, dropped) = self.insert(session, cookie);
        (
            Hit {
                key,
                backend,
                failed: false,
            },
            dropped,
        )
    }

    /// Moves `key` from `from` to `to`, only if it is still on `from`
    /// (so concurrent requests move a session once). Returns the moved
    /// session.
    pub(crate) fn move_if(
        &self,
        key: &str,
        from: &BackendId,
        to: &BackendId,
        cookie: Option<Box<str>>,
    ) -> Option<Moved> {
        let now = self.now();
        let mut map = self.map.write();
        let entry = map.get_mut(key)?;
        if &entry.backend != from {
            return None;
        }
        let old = std::mem::replace(&mut entry.backend, to.clone());
        entry.cookie = cookie;
        entry.failed.store(false, Ordering::Relaxed);
        entry.last_seen.store(now, Ordering::Relaxed);
        Some(Moved {
            session: to_session(key, entry),
            from: old,
        })
    }

    /// Marks the session failed if it is still on `backend`.
    pub(crate) fn set_failed(&self, key: &str, backend: &BackendId, failed: bool) {
        if let Some(entry) = self.map.read().get(key) {
            if &entry.backend == backend {
                entry.failed.store(failed, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn remove(&self, key: &str) -> bool {
        self.map.write().remove(key).is_some()
    }

    /// Empties the table; returns how many sessions it held.
    pub(crate) fn clear(&self) -> usize {
        let mut map = self.map.write();
        let n = map.len();
        map.clear();
        n
    }

    pub(crate) fn session(&self, key: &str) -> Option<Session> {
        let map = self.map.read();
        let (k, entry) = map.get_key_value(key)?;
        Some(to_session(k, entry))
    }

    pub(crate) fn len(&self) -> usize {
        self.map.read().len()
    }

    /// Drops idle entries at most once per half idle period.
    fn sweep_locked(&self, map: &mut HashMap<Arc<str>, Entry>, now: u64) -> Dropped {
        let half = nanos(self.idle) / 2;
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) < half.max(1) {
            return Dropped::default();
        }
        self.last_sweep.store(now, Ordering::Relaxed);
        let before = map.len();
        map.retain(|_, e| !self.is_idle(e, now));
        Dropped {
            expired: (before - map.len()) as u64,
            evicted: 0,
        }
    }
}

/// Evicts the least recently seen eighth of a full table (at least one
/// entry). Returns how many were evicted.
fn evict_oldest(map: &mut HashMap<Arc<str>, Entry>, max: usize) -> u64 {
    let target = (max / 8).max(1).min(map.len());
    let mut ages: Vec<(u64, Arc<str>)> = map
        .iter()
        .map(|(k, e)| (e.last_seen.load(Ordering::Relaxed), k.clone()))
        .collect();
    if target < ages.len() {
        ages.select_nth_unstable_by_key(target - 1, |(seen, _)| *seen);
    }
    for (_, key) in ages.into_iter().take(target) {
        map.remove(&key);
    }
    target as u64
}

/// Compares two byte strings in time that depends only on their lengths
/// (lengths are public: every issued cookie of one layer has the same
/// shape). No early exit; the accumulated difference goes through
/// `black_box` so the comparison is not turned into a branchy `memcmp`.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn to_session(key: &str, entry: &Entry) -> Session {
    let mut session = Session::new(key, entry.backend.clone()).with_data(entry.data.clone());
    session.created = entry.created;
    session
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(key: &str, backend: &str) -> Session {
        Session::new(key, backend.into())
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entries_expire() {
        let t = Table::new(Duration::from_secs(10), 100);
        t.insert(session("a", "x"), None);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(t.get("a", None).hit.is_some(), "seen at 6 s");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(t.get("a", None).hit.is_some(), "9 s after the last hit");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(t.get("a", None).hit.is_none());
        assert_eq!(t.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_table_evicts_least_recently_seen() {
        let t = Table::new(Duration::from_secs(3600), 16);
        for i in 0..16 {
            t.insert(session(&format!("k{i}"), "x"), None);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // Touch the two oldest: they become the most recent.
        assert!(t.get("k0", None).hit.is_some());
        assert!(t.get("k1", None).hit.is_some());
        let (_, dropped) = t.insert(session("new", "x"), None);
        assert_eq!(dropped.evicted, 2); // 16 / 8
        assert_eq!(t.len(), 15);
        assert!(t.get("k0", None).hit.is_some() && t.get("k1", None).hit.is_some());
        assert!(t.get("k2", None).hit.is_none() && t.get("k3", None).hit.is_none());
        assert!(t.get("k4", None).hit.is_some() && t.get("new", None).hit.is_some());
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[tokio::test(start_paused = true)]
    async fn moves_happen_once() {
        let t = Table::new(Duration::from_secs(60), 10);
        t.insert(
            session("s", "a").with_data(serde_json::json!({"k": 1})),
            None,
        );
        let moved = t.move_if("s", &"a".into(), &"b".into(), None).unwrap();
        assert_eq!(moved.from.as_str(), "a");
        assert_eq!(moved.session.backend.as_str(), "b");
        assert_eq!(moved.session.data["k"], 1, "data survives a move");
        assert!(t.move_if("s", &"a".into(), &"c".into(), None).is_none());
        assert_eq!(t.get("s", None).hit.unwrap().backend.as_str(), "b");
    }
}
