//! The in-memory session table: key → backend, with idle expiry and a size
//! bound.
//!
//! Shards, each a `parking_lot::RwLock` around a `HashMap`: one for a
//! table of fewer than 8192 sessions, else a power of two (at most 64) of at
//! least 4096 each, a key's shard picked by a seeded hash of its bytes.
//! Keys that clients choose
//! (headers, learned cookies, closures) are hashed with std's SipHash with
//! random keys; the layer's own session ids, which are random values
//! checked against the table or a MAC before anything is inserted, with a
//! seeded multiply-fold hasher ([`KeyHasher`]). Lookups borrow the key's
//! bytes, so a hit allocates nothing and validates no UTF-8. A hit takes
//! the read lock and updates the entry's
//! last-seen time with a relaxed atomic store, so hits never wait for each
//! other; on several cores they still write their shard's lock word (a
//! read lock is an atomic add) and the entry's cache line. Inserts take the write lock of their shard. When an insert
//! finds its shard full it drops an eighth of the shard at once: idle
//! entries, then those held in memory only (learned values no response
//! confirmed, records not read), then the others, least recently seen
//! first within each (one `O(n)` selection amortised over `n / 8`
//! inserts, `n` the shard's size, which bounds the pause of the shard's
//! other requests);
//! idle entries are dropped lazily when looked up and by a sweep that runs
//! at most once per half idle period, before inserts (the layer calls it
//! outside its own locks): one shard per call, so that no request walks
//! the whole table.
//! A session kept in memory because its record could not be read is due
//! to be read again [`RELOAD_AFTER`] after it was put in the table: from
//! then on a lookup is a miss that names its backend, and an insert
//! replaces it.

use std::borrow::Borrow;
use std::collections::hash_map::{DefaultHasher, RandomState};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use tokio::time::Instant;

use crate::backend::BackendId;
use crate::store::Session;
use crate::time::nanos;

/// How long a session kept in memory because the store could not be read
/// is routed from the table before its record is read again.
pub(crate) const RELOAD_AFTER: Duration = Duration::from_secs(5);

/// How long after a session's save failed its record is due to be saved
/// again, at its next request.
pub(crate) const SAVE_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// How the layer keeps a session it puts in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kept {
    /// Its changes are saved: the layer read its record (or the store had
    /// none) or wrote it.
    Saved,
    /// In memory only: a value the application has not confirmed, or a
    /// record this instance did not restore.
    Memory,
    /// In memory only because the store could not be read: its record is
    /// read again [`RELOAD_AFTER`] later.
    Unread,
    /// In memory only, as `Memory`, because its record is a restore's
    /// (standalone mode); the layer decides, under the lock the restore
    /// lets it go under, whether it still is (see `Shared::insert_new`).
    Unrestored,
    /// In memory only, its record read at its next request: one a restore
    /// let go (forgotten while it ran) after the request was routed.
    Reread,
}

pub(crate) struct Entry {
    backend: BackendId,
    created: SystemTime,
    /// The session's application data; `None` for `null`, which most
    /// sessions hold: boxed, it takes a pointer's 8 bytes in every entry
    /// rather than a `Value`'s 32.
    data: Option<Box<serde_json::Value>>,
    /// Nanoseconds since the table's epoch.
    last_seen: AtomicU64,
    /// When its record was last written or due a refresh, in nanoseconds
    /// since the table's epoch (see `Table::with_refresh`).
    refreshed_at: AtomicU64,
    /// When the layer's cookie was last sent for it, in nanoseconds since
    /// the table's epoch, or `NEVER_SENT` (see `Table::with_cookie_renewal`).
    cookie_at: AtomicU64,
    /// The last request sent to `backend` for this session failed.
    failed: AtomicBool,
    /// The value of the layer's cookie for this session on `backend`.
    cookie: Option<Box<str>>,
    /// Whether the layer saves this session's changes. Off for a session
    /// kept in memory only: the store holds a record of that key which the
    /// layer could not read, or the application has not confirmed it.
    saved: AtomicBool,
    /// The last save of a saved session failed: its record may name a
    /// backend it left, or be missing. Its next write is a save, due
    /// [`SAVE_AGAIN_AFTER`] after `refreshed_at`.
    unsaved: AtomicBool,
    /// When the record of a session kept in memory because the store could
    /// not be read is due to be read again, in nanoseconds since the
    /// table's epoch; 0 for every other session.
    reload_at: u64,
}

impl Entry {
    /// The table's key and entry for `session`, seen `now`, kept as `kept`
    /// says (one kept `Unread` is due to be read again `RELOAD_AFTER` from
    /// now).
    fn new(
        session: Session,
        cookie: Option<Box<str>>,
        now: u64,
        failed: bool,
        kept: Kept,
    ) -> (Key, Entry) {
        // A record is written with the time it was written as its last
        // use: one read back (restored after a restart, or loaded on a
        // miss) is as old as that says, and its refresh falls due by that
        // age, not a whole interval from now, past an expiry it may not
        // live to see. A session made here is new.
        let age = SystemTime::now()
            .duration_since(session.last_seen)
            .unwrap_or_default();
        let entry = Entry {
            backend: session.backend,
            created: session.created,
            data: (!session.data.is_null()).then(|| Box::new(session.data)),
            last_seen: AtomicU64::new(now),
            refreshed_at: AtomicU64::new(now.saturating_sub(nanos(age))),
            // Set once a response sends the cookie: a session read from
            // the store, restored or back from idle may hold one the
            // client got long ago.
            cookie_at: AtomicU64::new(NEVER_SENT),
            failed: AtomicBool::new(failed),
            cookie,
            saved: AtomicBool::new(kept == Kept::Saved),
            unsaved: AtomicBool::new(false),
            reload_at: match kept {
                Kept::Unread => now.saturating_add(nanos(RELOAD_AFTER)),
                Kept::Reread => now,
                Kept::Saved | Kept::Memory | Kept::Unrestored => 0,
            },
        };
        (Key(Arc::from(session.key)), entry)
    }
}

/// `Entry::cookie_at` of a session no response has sent the cookie of.
const NEVER_SENT: u64 = u64::MAX;

/// What the table's clock reads at its epoch: far enough above 0 (146
/// years) that a time before the table was made, such as the last write of
/// a record read back (see `Entry::new`), is still a time on it, and far
/// enough below 2^63 that it stays there for as long again.
const CLOCK_START: u64 = 1 << 62;

/// A table hit: what the request path needs, cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub(crate) key: Arc<str>,
    pub(crate) backend: BackendId,
    pub(crate) failed: bool,
    /// Whether the layer saves the session's changes (see `Entry::saved`).
    pub(crate) saved: bool,
}

/// A session kept in memory because its record could not be read, whose
/// record is due to be read again.
#[derive(Debug, Clone)]
pub(crate) struct Unread {
    /// Where it stays if the store still cannot be read.
    pub(crate) backend: BackendId,
    /// Its last request failed (see `Entry::failed`).
    pub(crate) failed: bool,
}

/// What a lookup found.
#[derive(Debug, Default)]
pub(crate) struct Lookup {
    pub(crate) hit: Option<Hit>,
    /// The key was there but idle: it was removed.
    pub(crate) expired: bool,
    /// The key's session is kept in memory because its record could not be
    /// read, and the record is due to be read again. The entry stays until
    /// an insert replaces it or [`Table::keep`] keeps it.
    pub(crate) unread: Option<Unread>,
    /// The hit's record is due to be refreshed (see `Table::with_refresh`),
    /// or saved again after a failed save (see `Table::save_failed`); told
    /// to one request each time.
    pub(crate) refresh: Due,
    /// The exact cookie presented ([`Table::get_exact`]) is due to be sent
    /// again (see `Table::with_cookie_renewal`); told to every request
    /// until a response sends it ([`Table::cookie_sent`]).
    pub(crate) renew: bool,
}

/// What a hit's record is due (see [`Lookup::refresh`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    #[default]
    Nothing,
    Refresh,
    Save,
}

/// What changed when a session moved.
#[derive(Debug)]
pub(crate) struct Moved {
    pub(crate) session: Session,
    pub(crate) from: BackendId,
    /// Whether the session is saved (see `Entry::saved`).
    pub(crate) saved: bool,
}

/// A table key: the session key, hashed and compared as bytes so that a
/// lookup can borrow a `&[u8]` straight from a header.
#[derive(Clone)]
struct Key(Arc<str>);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Exactly `<[u8] as Hash>`, as `Borrow<[u8]>` requires.
        self.0.as_bytes().hash(state)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl Eq for Key {}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// How the table hashes its keys.
#[derive(Clone)]
pub(crate) enum KeyHasher {
    /// std's SipHash-1-3 with random keys: for keys clients choose.
    Sip(RandomState),
    /// A multiply-fold hash seeded with a random value per table: only for
    /// the layer's own random session ids, which no client can choose.
    Random(u64),
}

impl KeyHasher {
    /// SipHash, or the fast hasher when every key is one of the layer's
    /// own random session ids.
    pub(crate) fn new(random_keys: bool) -> Self {
        if random_keys {
            KeyHasher::Random(rand::random())
        } else {
            KeyHasher::Sip(RandomState::new())
        }
    }
}

impl BuildHasher for KeyHasher {
    type Hasher = KeyHash;

    fn build_hasher(&self) -> KeyHash {
        match self {
            KeyHasher::Sip(state) => KeyHash::Sip(state.build_hasher()),
            KeyHasher::Random(seed) => KeyHash::Random(*seed),
        }
    }
}

pub(crate) enum KeyHash {
    Sip(DefaultHasher),
    Random(u64),
}

/// An odd constant with well-spread bits (the fractional part of π).
const MULTIPLIER: u64 = 0x243f_6a88_85a3_08d3;

/// The high and low halves of the full product, folded together.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hasher for KeyHash {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        match self {
            KeyHash::Sip(h) => h.write(bytes),
            KeyHash::Random(state) => {
                let mut s = *state;
                let mut chunks = bytes.chunks_exact(8);
                for chunk in &mut chunks {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(chunk);
                    s = fold(s ^ u64::from_le_bytes(word), MULTIPLIER);
                }
                let rest = chunks.remainder();
                if !rest.is_empty() {
                    // The last eight bytes, overlapping the words before
                    // (the length, hashed first, tells the overlap); those
                    // of a shorter key, zero-padded.
                    let mut word = [0u8; 8];
                    match bytes.len().checked_sub(8) {
                        Some(last) => word.copy_from_slice(&bytes[last..]),
                        None => word[..rest.len()].copy_from_slice(rest),
                    }
                    s = fold(s ^ u64::from_le_bytes(word), MULTIPLIER);
                }
                *state = s;
            }
        }
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        match self {
            KeyHash::Sip(h) => h.write_usize(n),
            KeyHash::Random(state) => *state = fold(*state ^ n as u64, MULTIPLIER),
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        match self {
            KeyHash::Sip(h) => h.finish(),
            KeyHash::Random(state) => *state,
        }
    }
}

type Map = HashMap<Key, Entry, KeyHasher>;

/// The fewest sessions a shard is sized for: a table of fewer than twice
/// this many is one shard.
const SHARD_SIZE: usize = 4096;

/// At most `1 << MAX_SHARD_BITS` shards.
const MAX_SHARD_BITS: u32 = 6;

pub(crate) struct Table {
    /// The parts of the table, each with the sessions whose keys hash to
    /// it.
    shards: Box<[RwLock<Map>]>,
    /// How many top bits of a key's shard hash pick its shard; 0 for one
    /// shard.
    shard_bits: u32,
    /// The seed of the shard hash (the multiply-fold of [`KeyHash`]).
    shard_seed: u64,
    /// Every key is one of the layer's own random session ids.
    random_keys: bool,
    /// How long an entry may go unseen, in nanoseconds.
    idle: u64,
    /// The most entries a shard holds.
    max: usize,
    epoch: Instant,
    /// When the last sweep of idle entries started.
    last_sweep: AtomicU64,
    /// The next shard the sweep under way drops idle entries from; the
    /// number of shards or more when none is under way.
    sweep_next: AtomicUsize,
    /// How often a saved session's record is due to be saved again, in
    /// nanoseconds; 0 for never.
    refresh: u64,
    /// How long after it was sent a session's cookie is due to be sent
    /// again, in nanoseconds; 0 for never.
    renew: u64,
}

/// Counts of what a table operation dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub(crate) expired: u64,
    pub(crate) evicted: u64,
}

impl Table {
    /// A table whose keys are all the layer's own random session ids
    /// when `random_keys` (see [`KeyHasher`]).
    ///
    /// A table of `2 * SHARD_SIZE` sessions or more is split into shards
    /// (a power of two, at most `1 << MAX_SHARD_BITS`), each with its own
    /// lock and an equal share of `max`, so that evicting from a full shard
    /// or sweeping it pauses only the requests of that shard, for a time
    /// bounded by the shard's size rather than the table's.
    pub(crate) fn new(idle: Duration, max: usize, random_keys: bool) -> Self {
        let max = max.max(1);
        let shard_bits = (max / SHARD_SIZE).max(1).ilog2().min(MAX_SHARD_BITS);
        let shards = (0..1usize << shard_bits)
            .map(|_| RwLock::new(HashMap::with_hasher(KeyHasher::new(random_keys))))
            .collect();
        Table {
            shards,
            shard_bits,
            shard_seed: rand::random(),
            random_keys,
            // Zero: sessions never idle out.
            idle: if idle.is_zero() {
                u64::MAX
            } else {
                nanos(idle)
            },
            max: max >> shard_bits,
            epoch: Instant::now(),
            last_sweep: AtomicU64::new(0),
            sweep_next: AtomicUsize::new(usize::MAX),
            refresh: 0,
            renew: 0,
        }
    }

    /// The shard of `key`.
    #[inline]
    fn shard(&self, key: &[u8]) -> &RwLock<Map> {
        if self.shard_bits == 0 {
            return &self.shards[0];
        }
        let hash = match key.first_chunk::<8>() {
            // The layer's own ids are random: their first eight bytes
            // spread them as well as all of them would.
            Some(head) if self.random_keys => {
                fold(self.shard_seed ^ u64::from_le_bytes(*head), MULTIPLIER)
            }
            _ => {
                let mut hash = KeyHash::Random(self.shard_seed);
                hash.write(key);
                hash.finish()
            }
        };
        &self.shards[(hash >> (64 - self.shard_bits)) as usize]
    }

    /// Tells a hit whose exact cookie was presented that the cookie is due
    /// to be sent again, `every` after a response last sent it (so that a
    /// `Max-Age` counts from the session's recent use).
    pub(crate) fn with_cookie_renewal(mut self, every: Option<Duration>) -> Self {
        self.renew = interval(every);
        self
    }

    /// Whether `at` (a time in nanoseconds since the epoch) is `every` or
    /// more before `now`; if so, claims it by setting it to `now`, so that
    /// one request of many is told.
    #[inline]
    fn take_due(at: &AtomicU64, every: u64, now: u64) -> bool {
        if every == 0 {
            return false;
        }
        let then = at.load(Ordering::Relaxed);
        now.saturating_sub(then) >= every
            && at
                .compare_exchange(then, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Tells a hit, at most once every `every`, that its saved session's
    /// record is due to be saved again (a store whose records expire).
    pub(crate) fn with_refresh(mut self, every: Option<Duration>) -> Self {
        self.refresh = interval(every);
        self
    }

    /// What `entry`'s record is due `now`; claims it, so that one request
    /// of many tells it.
    fn take_refresh(&self, entry: &Entry, now: u64) -> Due {
        // Kept in memory only since (see `Table::unkeep`): nothing to write.
        if !entry.saved.load(Ordering::Relaxed) {
            return Due::Nothing;
        }
        if entry.unsaved.load(Ordering::Relaxed) {
            // Claimed by the one request that finds it due, then by the
            // flag: a flush may take it meanwhile (see `take_unsaved`).
            return if Table::take_due(&entry.refreshed_at, nanos(SAVE_AGAIN_AFTER), now)
                && entry.unsaved.swap(false, Ordering::Relaxed)
            {
                Due::Save
            } else {
                Due::Nothing
            };
        }
        if Table::take_due(&entry.refreshed_at, self.refresh, now) {
            Due::Refresh
        } else {
            Due::Nothing
        }
    }

    /// Notes that the save of `key`'s record failed: the session is saved
    /// again at its first request [`SAVE_AGAIN_AFTER`] from now, or by
    /// [`take_unsaved`](Self::take_unsaved), if it is still saved then.
    pub(crate) fn save_failed(&self, key: &str) {
        let now = self.now();
        if let Some(entry) = self.shard(key.as_bytes()).read().get(key.as_bytes()) {
            if entry.saved.load(Ordering::Relaxed) {
                entry.refreshed_at.store(now, Ordering::Relaxed);
                entry.unsaved.store(true, Ordering::Relaxed);
            }
        }
    }

    /// The keys of the saved sessions whose last save failed; each is due
    /// to be saved by the caller, no longer by its next request.
    pub(crate) fn take_unsaved(&self) -> Vec<String> {
        let mut unsaved = Vec::new();
        for shard in self.shards.iter() {
            let map = shard.read();
            unsaved.extend(map.iter().filter_map(|(k, entry)| {
                let take = entry.saved.load(Ordering::Relaxed)
                    && entry.unsaved.swap(false, Ordering::Relaxed);
                take.then(|| k.0.to_string())
            }));
        }
        unsaved
    }

    /// Makes the refresh of `key`'s record, which failed, due again at its
    /// next request an eighth of the interval from now: well before the
    /// record expires (the interval is at most half its time to live),
    /// without asking a failing store at every request.
    pub(crate) fn refresh_failed(&self, key: &str) {
        if self.refresh == 0 {
            return;
        }
        let retry_at = self.now().saturating_sub(self.refresh - self.refresh / 8);
        if let Some(entry) = self.shard(key.as_bytes()).read().get(key.as_bytes()) {
            entry.refreshed_at.fetch_min(retry_at, Ordering::Relaxed);
        }
    }

    /// Whether the session's cookie is due to be sent again. Not claimed:
    /// a request whose response never sends it (failed, dropped, refused)
    /// leaves it due for the next.
    fn cookie_due(&self, entry: &Entry, now: u64) -> bool {
        let sent = entry.cookie_at.load(Ordering::Relaxed);
        self.renew != 0 && (sent == NEVER_SENT || now.saturating_sub(sent) >= self.renew)
    }

    /// Whether cookies are sent again (see `with_cookie_renewal`).
    pub(crate) fn renews_cookies(&self) -> bool {
        self.renew != 0
    }

    /// Notes that a response sends the layer's cookie for session `key`.
    pub(crate) fn cookie_sent(&self, key: &str) {
        if self.renews_cookies() {
            if let Some(entry) = self.shard(key.as_bytes()).read().get(key.as_bytes()) {
                entry.cookie_at.store(self.now(), Ordering::Relaxed);
            }
        }
    }

    /// Nanoseconds since the table's epoch, plus [`CLOCK_START`]: 0 is
    /// never now, so a deadline of `now` (`reload_at`, where 0 means none)
    /// is due at once, from the first instant on.
    fn now(&self) -> u64 {
        crate::time::nanos_since(self.epoch, Instant::now()).saturating_add(CLOCK_START)
    }

    fn is_idle(&self, entry: &Entry, now: u64) -> bool {
        now.saturating_sub(entry.last_seen.load(Ordering::Relaxed)) > self.idle
    }

    /// Whether the entry's record is due to be read again (see `Kept::Unread`).
    fn is_due(entry: &Entry, now: u64) -> bool {
        entry.reload_at != 0 && now >= entry.reload_at
    }

    /// Looks `key` up for a request presenting `cookie`, and finds it only
    /// when `cookie` is exactly the value issued for the session's current
    /// backend (compared in constant time), neither idle nor due to be read
    /// again; the entry is then marked seen. Anything else leaves the entry
    /// as it is: the caller verifies the value first, then calls
    /// [`Table::get`], so that a value that only starts with a session's id
    /// cannot keep the session alive or make its record be saved.
    pub(crate) fn get_exact(&self, key: &[u8], cookie: &[u8]) -> Option<Lookup> {
        let now = self.now();
        let map = self.shard(key).read();
        let (k, entry) = map.get_key_value(key)?;
        let issued = entry.cookie.as_ref()?;
        if !constant_time_eq(cookie, issued.as_bytes())
            || self.is_idle(entry, now)
            || Table::is_due(entry, now)
        {
            return None;
        }
        entry.last_seen.store(now, Ordering::Relaxed);
        Some(Lookup {
            hit: Some(hit_of(&k.0, entry)),
            refresh: self.take_refresh(entry, now),
            renew: self.cookie_due(entry, now),
            ..Lookup::default()
        })
    }

    /// Looks `key` up and marks it seen. An idle entry is a miss (and is
    /// removed); so is one due to be read again (it stays, and its backend
    /// is returned in `unread`).
    pub(crate) fn get(&self, key: &[u8]) -> Lookup {
        let now = self.now();
        {
            let map = self.shard(key).read();
            let Some((k, entry)) = map.get_key_value(key) else {
                return Lookup::default();
            };
            if !self.is_idle(entry, now) {
                entry.last_seen.store(now, Ordering::Relaxed);
                if Table::is_due(entry, now) {
                    return Lookup {
                        unread: Some(Unread {
                            backend: entry.backend.clone(),
                            failed: entry.failed.load(Ordering::Relaxed),
                        }),
                        ..Lookup::default()
                    };
                }
                return Lookup {
                    hit: Some(hit_of(&k.0, entry)),
                    refresh: self.take_refresh(entry, now),
                    ..Lookup::default()
                };
            }
        }
        let mut map = self.shard(key).write();
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

    /// Inserts (or replaces) `session`, seen now, as a saved session.
    #[cfg(test)]
    pub(crate) fn insert(&self, session: Session, cookie: Option<Box<str>>) -> (Arc<str>, Dropped) {
        let (hit, dropped, _) = self.put(session, cookie, Kept::Saved, |_, _| false);
        (hit.key, dropped)
    }

    /// Inserts `session`, named by a response, as a saved session, unless
    /// the layer already keeps its key: present, saved, neither idle nor
    /// due to be read again. That session keeps its backend (a session
    /// moves only when its backend fails); one kept in memory only (a value
    /// the application had not confirmed) is replaced. Returns the entry
    /// now in the table and whether it is this one.
    pub(crate) fn insert_named(
        &self,
        session: Session,
        cookie: Option<Box<str>>,
    ) -> (Hit, Dropped, bool) {
        self.put(session, cookie, Kept::Saved, |entry, now| {
            entry.saved.load(Ordering::Relaxed)
                && !self.is_idle(entry, now)
                && !Table::is_due(entry, now)
                && seen(entry, now)
        })
    }

    /// Inserts `session` unless its key is already present (and neither
    /// idle nor due to be read again); returns the entry now in the table
    /// and whether it is this one. Atomic: of concurrent inserts of one
    /// key, the first wins and the others get its entry. `kept` says
    /// whether the layer saves the session's changes.
    pub(crate) fn insert_if_absent(
        &self,
        session: Session,
        cookie: Option<Box<str>>,
        kept: Kept,
    ) -> (Hit, Dropped, bool) {
        self.put(session, cookie, kept, |entry, now| {
            !self.is_idle(entry, now) && !Table::is_due(entry, now) && seen(entry, now)
        })
    }

    /// Puts `session`, just restored from its record, in the table, unless
    /// the table holds a saved session of its key: one read from the store
    /// or saved since the record was loaded, which is newer. A session kept
    /// in memory only (the record was not this instance's to read until
    /// now) is replaced. Returns whether `session` was put.
    pub(crate) fn restore(&self, session: Session, cookie: Option<Box<str>>) -> (bool, Dropped) {
        let (_, dropped, put) = self.put(session, cookie, Kept::Saved, |entry, now| {
            entry.saved.load(Ordering::Relaxed) && !self.is_idle(entry, now)
        });
        (put, dropped)
    }

    /// Marks a session kept in memory only saved (its key confirmed);
    /// returns it if it was not saved before. Not one whose record could
    /// not be read (due to be read again).
    pub(crate) fn mark_saved(&self, key: &str) -> Option<Session> {
        let map = self.shard(key.as_bytes()).read();
        let entry = map.get(key.as_bytes())?;
        if entry.reload_at != 0 || entry.saved.swap(true, Ordering::Relaxed) {
            return None;
        }
        Some(to_session(key, entry))
    }

    /// Puts `session` in the table, unless `keep` says to keep the entry
    /// of its key already there (at `now`). Returns the entry now in the
    /// table and whether it is this one.
    fn put(
        &self,
        session: Session,
        cookie: Option<Box<str>>,
        kept: Kept,
        keep: impl FnOnce(&Entry, u64) -> bool,
    ) -> (Hit, Dropped, bool) {
        let now = self.now();
        let mut dropped = Dropped::default();
        let mut map = self.shard(session.key.as_bytes()).write();
        if let Some((k, entry)) = map.get_key_value(session.key.as_bytes()) {
            if keep(entry, now) {
                return (hit_of(&k.0, entry), dropped, false);
            }
            dropped.expired += u64::from(self.is_idle(entry, now));
        }
        let (key, entry) = Entry::new(session, cookie, now, false, kept);
        let hit = self.put_locked(&mut map, &mut dropped, key, entry);
        (hit, dropped, true)
    }

    /// Inserts or replaces `key`, evicting first when the table is full.
    fn put_locked(&self, map: &mut Map, dropped: &mut Dropped, key: Key, entry: Entry) -> Hit {
        if !map.contains_key(&key) && map.len() >= self.max {
            let now = self.now();
            evict_oldest(map, self.max, |e| self.is_idle(e, now), dropped);
        }
        let hit = hit_of(&key.0, &entry);
        map.insert(key, entry);
        hit
    }

    /// Keeps a session that was kept in memory because its record could not
    /// be read, now that the store has no record of it: from now on its
    /// changes are saved. The entry due to be read again stays as it is
    /// (backend, data, creation time, whether its last request failed);
    /// when the table lost it meanwhile, `session` is put back with
    /// `failed`. Returns the entry now in the table and whether this call
    /// kept it (false when a concurrent request did first, or an insert
    /// replaced it): the caller that kept it saves it.
    pub(crate) fn keep(
        &self,
        session: Session,
        cookie: Option<Box<str>>,
        failed: bool,
    ) -> (Hit, Dropped, bool) {
        let now = self.now();
        let mut dropped = Dropped::default();
        let mut map = self.shard(session.key.as_bytes()).write();
        if let Some(entry) = map.get_mut(session.key.as_bytes()) {
            if !self.is_idle(entry, now) {
                let kept = Table::is_due(entry, now);
                if kept {
                    entry.reload_at = 0;
                    entry.saved.store(true, Ordering::Relaxed);
                }
                entry.last_seen.store(now, Ordering::Relaxed);
                let (k, entry) = map
                    .get_key_value(session.key.as_bytes())
                    .expect("present under the write lock");
                return (hit_of(&k.0, entry), dropped, kept);
            }
            dropped.expired += 1;
        }
        let (key, entry) = Entry::new(session, cookie, now, failed, Kept::Saved);
        let hit = self.put_locked(&mut map, &mut dropped, key, entry);
        (hit, dropped, true)
    }

    /// Undoes [`Table::keep`] when the session could not be saved (its
    /// request failed or was refused): its changes are no longer saved,
    /// and its record is due to be read again at once. Only while it is
    /// on `backend`.
    pub(crate) fn unkeep(&self, key: &str, backend: &BackendId) {
        let now = self.now();
        let mut map = self.shard(key.as_bytes()).write();
        if let Some(entry) = map.get_mut(key.as_bytes()) {
            if &entry.backend == backend && entry.reload_at == 0 {
                entry.saved.store(false, Ordering::Relaxed);
                entry.reload_at = now;
            }
        }
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
        let mut map = self.shard(key.as_bytes()).write();
        let entry = map.get_mut(key.as_bytes())?;
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
            saved: entry.saved.load(Ordering::Relaxed),
        })
    }

    /// Marks the session failed if it is still on `backend`.
    pub(crate) fn set_failed(&self, key: &str, backend: &BackendId, failed: bool) {
        if let Some(entry) = self.shard(key.as_bytes()).read().get(key.as_bytes()) {
            if &entry.backend == backend {
                entry.failed.store(failed, Ordering::Relaxed);
            }
        }
    }

    /// Removes `key` if the layer keeps it in memory only (see
    /// `Entry::saved`).
    pub(crate) fn remove_unsaved(&self, key: &str) {
        let mut map = self.shard(key.as_bytes()).write();
        if map
            .get(key.as_bytes())
            .is_some_and(|entry| !entry.saved.load(Ordering::Relaxed))
        {
            map.remove(key.as_bytes());
        }
    }

    /// Has `key`, if the layer keeps it in memory only, read from the
    /// store at its next request, where it stays meanwhile.
    pub(crate) fn reread_unsaved(&self, key: &str) {
        let now = self.now();
        let mut map = self.shard(key.as_bytes()).write();
        if let Some(entry) = map.get_mut(key.as_bytes()) {
            if !entry.saved.load(Ordering::Relaxed) {
                entry.reload_at = now;
            }
        }
    }

    /// Removes `key`; returns whether the session removed was saved (see
    /// `Entry::saved`), or `None` when the table did not hold it.
    pub(crate) fn take(&self, key: &str) -> Option<bool> {
        let entry = self.shard(key.as_bytes()).write().remove(key.as_bytes())?;
        Some(entry.saved.into_inner())
    }

    /// Drops the sessions whose changes are saved, keeping those held in
    /// memory only (see `Entry::saved`): the store knows nothing newer of
    /// them. The ones whose record could not be read are due to be read
    /// again at once. Returns how many sessions it dropped.
    pub(crate) fn forget_saved(&self) -> usize {
        let now = self.now();
        let mut n = 0;
        for shard in self.shards.iter() {
            let mut map = shard.write();
            let before = map.len();
            map.retain(|_, entry| {
                if entry.saved.load(Ordering::Relaxed) {
                    return false;
                }
                if entry.reload_at != 0 {
                    entry.reload_at = now;
                }
                true
            });
            n += before - map.len();
        }
        n
    }

    pub(crate) fn session(&self, key: &str) -> Option<Session> {
        let map = self.shard(key.as_bytes()).read();
        let (k, entry) = map.get_key_value(key.as_bytes())?;
        Some(to_session(&k.0, entry))
    }

    /// The backend of session `key`.
    pub(crate) fn backend(&self, key: &str) -> Option<BackendId> {
        let map = self.shard(key.as_bytes()).read();
        map.get(key.as_bytes()).map(|entry| entry.backend.clone())
    }

    /// The session `key` if its changes are saved: what refreshing its
    /// record writes.
    pub(crate) fn saved(&self, key: &str) -> Option<Session> {
        let map = self.shard(key.as_bytes()).read();
        let (k, entry) = map.get_key_value(key.as_bytes())?;
        entry
            .saved
            .load(Ordering::Relaxed)
            .then(|| to_session(&k.0, entry))
    }

    /// The session `key` unless it is idle or due to be read again: one a
    /// request may be routed by without reading the store.
    pub(crate) fn current(&self, key: &str) -> Option<Session> {
        let now = self.now();
        let map = self.shard(key.as_bytes()).read();
        let (k, entry) = map.get_key_value(key.as_bytes())?;
        let routable = !self.is_idle(entry, now) && !Table::is_due(entry, now);
        routable.then(|| to_session(&k.0, entry))
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.read().len()).sum()
    }

    /// Drops the idle sessions of one shard, if a sweep is under way or
    /// due (one starts at most once per half idle period): each call takes
    /// the next shard, under its own lock, so a sweep's cost is spread over
    /// as many calls as there are shards, not paid by one request. The
    /// table's changes do not sweep: the layer calls this before its
    /// changes that may add a session, before it takes a lock of its own,
    /// so that no sweep holds that lock.
    pub(crate) fn sweep_if_due(&self) -> Dropped {
        let now = self.now();
        if self.sweep_next.load(Ordering::Relaxed) >= self.shards.len() {
            let last = self.last_sweep.load(Ordering::Relaxed);
            if now.saturating_sub(last) < (self.idle / 2).max(1)
                || self
                    .last_sweep
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                return Dropped::default();
            }
            self.sweep_next.store(0, Ordering::Relaxed);
        }
        // Calls racing past the last shard take none.
        let Some(shard) = self
            .shards
            .get(self.sweep_next.fetch_add(1, Ordering::Relaxed))
        else {
            return Dropped::default();
        };
        let mut map = shard.write();
        let before = map.len();
        map.retain(|_, e| !self.is_idle(e, now));
        Dropped {
            expired: (before - map.len()) as u64,
            evicted: 0,
        }
    }
}

/// Drops an eighth of a full shard (at least one entry): first the idle
/// sessions the sweep has not dropped yet (counted as expired), then the
/// sessions whose changes are not saved (a learned value no response
/// confirmed, a record kept in memory that the store holds), least recently
/// seen first, then the least recently seen of the others (counted as
/// evicted). So made-up session values, one per request, push out one
/// another rather than the sessions an application confirmed, which a
/// table without a store could not get back. Finds the rank that eighth
/// ends at, then drops the entries below it and as many at it as the
/// eighth still needs: two passes over the shard, cloning no key.
fn evict_oldest(map: &mut Map, max: usize, idle: impl Fn(&Entry) -> bool, dropped: &mut Dropped) {
    let target = (max / 8).max(1).min(map.len());
    if target == 0 {
        return;
    }
    // Saved and not idle above the others, then by last seen (nanoseconds
    // since the table's epoch, below 2^63 for centuries; an idle entry was
    // last seen before any other). Under the write lock no hit can mark an
    // entry seen meanwhile.
    let rank = |e: &Entry| {
        let saved = e.saved.load(Ordering::Relaxed) && !idle(e);
        (u64::from(saved) << 63) | e.last_seen.load(Ordering::Relaxed).min(u64::MAX >> 1)
    };
    let mut ranks: Vec<u64> = map.values().map(rank).collect();
    let (below, &mut last, _) = ranks.select_nth_unstable(target - 1);
    let mut at_last = target - below.iter().filter(|&&r| r < last).count();
    map.retain(|_, e| {
        let r = rank(e);
        let gone = r < last || (r == last && at_last > 0);
        if gone {
            at_last -= usize::from(r == last);
            if idle(e) {
                dropped.expired += 1;
            } else {
                dropped.evicted += 1;
            }
        }
        !gone
    });
}

/// Compares two byte strings in time that depends only on their lengths
/// (lengths are public: every issued cookie of one layer has the same
/// shape). No early exit: the differences of all the 8-byte words (the
/// last one overlapping the one before when the length is not a multiple
/// of 8; of every byte below 8 bytes) are or-ed together and go through
/// `black_box`, so the comparison is not turned into a branchy `memcmp`.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[at..at + 8]);
        u64::from_ne_bytes(w)
    };
    let len = a.len();
    let mut diff = 0u64;
    if len < 8 {
        for (x, y) in a.iter().zip(b) {
            diff |= u64::from(x ^ y);
        }
    } else {
        let mut at = 0;
        while at + 8 < len {
            diff |= word(a, at) ^ word(b, at);
            at += 8;
        }
        // The last eight bytes, overlapping the words before when the
        // length is not a multiple of eight.
        diff |= word(a, len - 8) ^ word(b, len - 8);
    }
    std::hint::black_box(diff) == 0
}

/// Marks `entry` seen `now`; `true`, to end a condition that keeps it.
fn seen(entry: &Entry, now: u64) -> bool {
    entry.last_seen.store(now, Ordering::Relaxed);
    true
}

fn hit_of(key: &Arc<str>, entry: &Entry) -> Hit {
    Hit {
        key: key.clone(),
        backend: entry.backend.clone(),
        failed: entry.failed.load(Ordering::Relaxed),
        saved: entry.saved.load(Ordering::Relaxed),
    }
}

fn to_session(key: &str, entry: &Entry) -> Session {
    let data = entry.data.as_deref().cloned().unwrap_or_default();
    let mut session = Session::new(key, entry.backend.clone()).with_data(data);
    session.created = entry.created;
    session
}

/// An interval in nanoseconds, at least 1; 0 for none.
fn interval(every: Option<Duration>) -> u64 {
    every.map_or(0, |every| nanos(every).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's slot in its shard's table: what each session costs
    /// besides its key's and cookie's allocations (docs/benchmarks.md).
    #[test]
    #[cfg(all(unix, target_pointer_width = "64"))]
    fn a_slot_takes_112_bytes() {
        assert_eq!(std::mem::size_of::<(Key, Entry)>(), 112);
    }

    fn session(key: &str, backend: &str) -> Session {
        Session::new(key, backend.into())
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entries_expire() {
        let t = Table::new(Duration::from_secs(10), 100, false);
        t.insert(session("a", "x"), None);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(t.get(b"a").hit.is_some(), "seen at 6 s");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(t.get(b"a").hit.is_some(), "9 s after the last hit");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(t.get(b"a").hit.is_none());
        assert_eq!(t.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_table_evicts_least_recently_seen() {
        let t = Table::new(Duration::from_secs(3600), 16, true);
        for i in 0..16 {
            t.insert(session(&format!("k{i}"), "x"), None);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // Touch the two oldest: they become the most recent.
        assert!(t.get(b"k0").hit.is_some());
        assert!(t.get(b"k1").hit.is_some());
        let (_, dropped) = t.insert(session("new", "x"), None);
        assert_eq!(dropped.evicted, 2); // 16 / 8
        assert_eq!(t.len(), 15);
        assert!(t.get(b"k0").hit.is_some() && t.get(b"k1").hit.is_some());
        assert!(t.get(b"k2").hit.is_none() && t.get(b"k3").hit.is_none());
        assert!(t.get(b"k4").hit.is_some() && t.get(b"new").hit.is_some());
    }

    /// A change does not sweep, though a sweep is due: the layer sweeps
    /// before it takes the locks a change may be made under.
    #[tokio::test(start_paused = true)]
    async fn changes_leave_the_sweep_to_the_layer() {
        let t = Table::new(Duration::from_secs(100), 16, false);
        t.insert(session("old", "x"), None);
        tokio::time::advance(Duration::from_secs(150)).await;
        let (_, dropped) = t.insert(session("new", "x"), None);
        let (_, kept, _) = t.keep(session("kept", "x"), None, false);
        assert_eq!(dropped.expired + kept.expired, 0);
        assert_eq!(t.len(), 3);
        assert_eq!(t.sweep_if_due().expired, 1);
        assert_eq!(t.len(), 2);
    }

    /// A sweep of a sharded table takes one shard per call: no request
    /// walks the whole table, and a round ends after one call per shard.
    #[tokio::test(start_paused = true)]
    async fn a_sweep_takes_one_shard_per_call() {
        let t = Table::new(Duration::from_secs(100), 100_000, false);
        let shards = t.shards.len();
        assert_eq!(shards, 16);
        for i in 0..1000 {
            t.insert(session(&format!("s{i}"), "x"), None);
        }
        tokio::time::advance(Duration::from_secs(101)).await;
        let mut per_call = Vec::new();
        for _ in 0..shards {
            let dropped = t.sweep_if_due().expired;
            // With 1000 keys over 16 shards, none is empty (but for odds
            // of about 1 in 10^27).
            assert!((1..1000).contains(&dropped), "{dropped}");
            per_call.push(dropped);
        }
        assert_eq!(per_call.iter().sum::<u64>(), 1000);
        assert_eq!(t.len(), 0);
        // The round is over, and the next is due half an idle period
        // after it started.
        t.insert(session("late", "x"), None);
        tokio::time::advance(Duration::from_secs(49)).await;
        assert_eq!(t.sweep_if_due().expired, 0);
        t.insert(session("later", "x"), None);
        tokio::time::advance(Duration::from_secs(61)).await;
        let swept: u64 = (0..shards).map(|_| t.sweep_if_due().expired).sum();
        assert_eq!(swept, 1, "only late is idle");
        assert!(t.session("later").is_some());
    }

    /// Idle sessions the sweep has not reached yet go first, as expired,
    /// even saved ones before sessions held in memory only.
    #[tokio::test(start_paused = true)]
    async fn a_full_table_drops_idle_sessions_first() {
        let t = Table::new(Duration::from_secs(100), 16, false);
        for i in 0..8 {
            t.insert(session(&format!("s{i}"), "x"), None);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(t.sweep_if_due().expired, 0);
        for i in 0..8 {
            t.insert_if_absent(session(&format!("m{i}"), "x"), None, Kept::Memory);
        }
        // The s* are idle; the last sweep ran at 60 s, the next is due at
        // 110 s.
        tokio::time::advance(Duration::from_secs(45)).await;
        assert_eq!(t.sweep_if_due().expired, 0);
        let (_, dropped) = t.insert(session("new", "x"), None);
        assert_eq!((dropped.expired, dropped.evicted), (2, 0));
        let present = |prefix: &str| {
            (0..8)
                .filter(|i| t.session(&format!("{prefix}{i}")).is_some())
                .count()
        };
        assert_eq!((present("s"), present("m")), (6, 8));
    }

    #[tokio::test(start_paused = true)]
    async fn an_eviction_among_equal_times_takes_exactly_an_eighth() {
        let t = Table::new(Duration::from_secs(3600), 64, false);
        for i in 0..64 {
            t.insert(session(&format!("k{i}"), "x"), None);
        }
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(t.get(b"k0").hit.is_some());
        let (_, dropped) = t.insert(session("new", "x"), None);
        assert_eq!(dropped.evicted, 8);
        assert_eq!(t.len(), 57);
        assert!(t.get(b"k0").hit.is_some() && t.get(b"new").hit.is_some());
    }

    #[test]
    fn a_large_table_is_split_into_shards_sharing_its_bound() {
        let sizes = |max| {
            let t = Table::new(Duration::from_secs(1), max, true);
            (t.shards.len(), t.max)
        };
        assert_eq!(sizes(1), (1, 1));
        assert_eq!(sizes(8191), (1, 8191));
        assert_eq!(sizes(8192), (2, 4096));
        assert_eq!(sizes(100_000), (16, 6250));
        assert_eq!(sizes(10_000_000), (64, 156_250));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sharded_table_stays_bounded_and_evicts_the_least_recently_seen() {
        // Four shards of 4096.
        let t = Table::new(Duration::from_secs(3600), 16_384, true);
        // Random-looking ids, as the layer's own are.
        let key = |i: usize| format!("{:016x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut evicted = 0;
        for i in 0..10_000 {
            evicted += t.insert(session(&key(i), "x"), None).1.evicted;
            tokio::time::advance(Duration::from_micros(1)).await;
        }
        assert_eq!(evicted, 0, "no shard is full yet");
        // The hundred oldest become the most recently seen.
        for i in 0..100 {
            assert!(t.get(key(i).as_bytes()).hit.is_some());
        }
        for i in 10_000..20_000 {
            evicted += t.insert(session(&key(i), "x"), None).1.evicted;
            tokio::time::advance(Duration::from_micros(1)).await;
        }
        assert_eq!(t.len() as u64, 20_000 - evicted);
        assert!(t.len() <= 16_384);
        // Every shard took about 5000 keys: each evicted its oldest 512
        // at least once, which the 500 next oldest keys (about 125 in each
        // shard) are among; the ones seen again stay.
        for i in 0..100 {
            assert!(t.get(key(i).as_bytes()).hit.is_some(), "{}", key(i));
        }
        for i in 100..600 {
            assert!(t.get(key(i).as_bytes()).hit.is_none(), "{}", key(i));
        }
        for i in 19_000..20_000 {
            assert!(t.get(key(i).as_bytes()).hit.is_some(), "{}", key(i));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unread_session_is_due_to_be_read_again_then_replaced() {
        let t = Table::new(Duration::from_secs(3600), 10, false);
        let (_, _, inserted) = t.insert_if_absent(session("s", "a"), None, Kept::Unread);
        assert!(inserted);
        assert_eq!(t.get(b"s").hit.unwrap().backend.as_str(), "a");
        assert!(t.current("s").is_some());
        tokio::time::advance(RELOAD_AFTER).await;
        let due = t.get(b"s");
        assert!(due.hit.is_none() && !due.expired);
        assert_eq!(due.unread.unwrap().backend.as_str(), "a");
        assert!(t.current("s").is_none(), "not a record to route by");
        assert_eq!(t.len(), 1, "kept until replaced");
        // A concurrent insert of the key replaces it, as if absent.
        let (hit, _, inserted) = t.insert_if_absent(session("s", "b"), None, Kept::Saved);
        assert!(inserted);
        assert_eq!(hit.backend.as_str(), "b");
        tokio::time::advance(RELOAD_AFTER).await;
        assert_eq!(t.get(b"s").hit.unwrap().backend.as_str(), "b");
        assert_eq!(t.take("s"), Some(true), "saved");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unread_session_is_kept_once_as_it_is() {
        let t = Table::new(Duration::from_secs(3600), 10, false);
        t.insert_if_absent(session("s", "a"), None, Kept::Unread);
        t.set_failed("s", &"a".into(), true);
        tokio::time::advance(RELOAD_AFTER).await;
        let unread = t.get(b"s").unread.unwrap();
        assert!(unread.failed);
        // The first caller keeps it, failed flag and all; the next finds it.
        let (hit, _, kept) = t.keep(session("s", "a"), None, unread.failed);
        assert!(kept && hit.failed);
        let (hit, _, kept) = t.keep(session("s", "a"), None, false);
        assert!(!kept && hit.failed);
        assert_eq!(t.get(b"s").hit.unwrap().backend.as_str(), "a");
        // Undone: due again at once, and not saved.
        t.unkeep("s", &"a".into());
        assert!(t.get(b"s").unread.is_some());
        // Lost meanwhile: put back with its flag.
        assert!(t.take("s").is_some());
        let (hit, _, kept) = t.keep(session("s", "b"), None, true);
        assert!(kept && hit.failed);
        assert_eq!(t.take("s"), Some(true), "saved");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_session_replaces_only_one_kept_in_memory() {
        let t = Table::new(Duration::from_secs(60), 10, false);
        t.insert_if_absent(session("m", "x"), None, Kept::Memory);
        assert!(t.restore(session("m", "a"), None).0);
        assert_eq!(t.get(b"m").hit.unwrap().backend.as_str(), "a");
        assert_eq!(t.take("m"), Some(true), "saved");
        // A saved session is newer than the record restored.
        t.insert(session("s", "b"), None);
        assert!(!t.restore(session("s", "a"), None).0);
        assert_eq!(t.get(b"s").hit.unwrap().backend.as_str(), "b");
        assert!(t.restore(session("new", "a"), None).0);
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
        let long = b"0123456789abcdef0123456789abcdef0123456789";
        assert!(constant_time_eq(long, long));
        for len in 0..=long.len() {
            let a = &long[..len];
            assert!(constant_time_eq(a, a), "length {len}");
            for i in 0..len {
                let mut other = a.to_vec();
                other[i] ^= 1;
                assert!(!constant_time_eq(a, &other), "length {len}, byte {i}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn moves_happen_once() {
        let t = Table::new(Duration::from_secs(60), 10, true);
        t.insert(
            session("s", "a").with_data(serde_json::json!({"k": 1})),
            None,
        );
        let moved = t.move_if("s", &"a".into(), &"b".into(), None).unwrap();
        assert_eq!(moved.from.as_str(), "a");
        assert_eq!(moved.session.backend.as_str(), "b");
        assert_eq!(moved.session.data["k"], 1, "data survives a move");
        assert!(t.move_if("s", &"a".into(), &"c".into(), None).is_none());
        assert_eq!(t.get(b"s").hit.unwrap().backend.as_str(), "b");
    }
}
