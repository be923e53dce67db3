//! [`FileStore`]: one JSON file per session in a directory.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{clamp_ttl, Loaded, Session, SessionStore, StoreError, StoreFuture};
use crate::time::claim_due;

/// The suffix of every session file.
const RECORD_SUFFIX: &str = ".json";
/// The suffix of a file being written (renamed to its record name when
/// complete).
const TEMP_SUFFIX: &str = ".tmp";
/// Prefix of names that hold the key itself, percent-encoded.
const ENCODED_PREFIX: &str = "k_";
/// Prefix of names that hold the SHA-256 of a key too long to encode.
const HASHED_PREFIX: &str = "h_";
/// Longest encoded file name; longer keys are named by their hash. File
/// systems allow 255 bytes, and the temporary name adds to it.
const MAX_ENCODED_NAME: usize = 200;

/// Temporary files this process is writing right now (in any store), so
/// `load_all` neither reports nor removes a write in progress.
static IN_FLIGHT: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);
/// Makes temporary names unique within this process. It starts at random,
/// so that a process that gets the pid of an earlier one (a container
/// restarted as PID 1 on the same volume) rarely meets its names again.
static TEMP_COUNTER: LazyLock<AtomicU64> =
    LazyLock::new(|| AtomicU64::new(u64::from(rand::random::<u32>())));
/// How many temporary names a save tries when the first ones are taken.
const TEMP_ATTEMPTS: usize = 8;
/// How long a call waits for the file system by default: see
/// [`FileStore::with_timeout`].
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many file operations a store has under way at once by default: see
/// [`FileStore::with_concurrency_limit`].
const DEFAULT_CONCURRENCY: usize = 64;

/// The record files that writes (saves and deletes) of this process are
/// using or waiting for, each with the lock that makes those writes run
/// one at a time, in the order they asked for it. A write that outlives
/// its caller's timeout keeps its lock until it ends, so that it cannot
/// land after a later write of the same record and undo it.
static WRITING: LazyLock<Mutex<HashMap<PathBuf, Record>>> = LazyLock::new(Default::default);

/// A record file in [`WRITING`].
#[derive(Default)]
struct Record {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// The writes that hold its lock or wait for it.
    turns: usize,
}

/// Whether `name` is one of this store's temporary names:
/// `.{record}.{pid}-{n}.tmp`, where the record's name has one of the
/// prefixes and the record suffix. Another program's `*.tmp` files in the
/// same directory are none of its business.
fn is_temp_name(name: &str) -> bool {
    let Some(inner) = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(TEMP_SUFFIX))
    else {
        return false;
    };
    let Some((record, writer)) = inner.rsplit_once('.') else {
        return false;
    };
    let ours = writer
        .split_once('-')
        .is_some_and(|(pid, n)| is_digits(pid) && is_digits(n));
    ours && is_record_name(record)
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Sessions as JSON files in one directory: the embedded default store.
///
/// * **One file per session**, named after its key (see below), holding the
///   [`Session`] as JSON.
/// * **Atomic writes**: a session is written to a temporary file in the same
///   directory, flushed to disk (`fsync`), renamed over the previous version
///   and the directory is flushed too. A crash at any moment leaves either
///   the previous or the new complete version, never a mix. That holds for
///   a power loss on Unix; on other platforms directories cannot be
///   flushed, and a rename is as durable as the platform makes it.
/// * **Safe names**: no key can name a path outside the directory. A key is
///   percent-encoded into the file name (`k_<encoded>.json`, every byte
///   outside `[a-z0-9_-]` written as `%XX`, so names differ even on
///   case-insensitive file systems); a key whose encoded name would be
///   longer than 200 bytes is named by its SHA-256 instead
///   (`h_<64 hex digits>.json`). The key is also stored inside the file and
///   checked on load.
/// * **Private files**: on Unix, files are created with mode `0600` and a
///   directory the store creates with mode `0700`. The file names carry
///   the keys, which may be credentials (an application's session cookie
///   the sticky layer learned), so the directory must be private: one that
///   exists already is left as it is, but [`open`](FileStore::open) logs a
///   warning if other users have any access to it.
/// * **Corruption is contained**: a file that is truncated, not JSON, not a
///   session, or stored under a name that does not match its key is skipped
///   and reported in [`Loaded::skipped`]; its siblings load normally.
/// * **Leftovers of a crash**: a temporary file (`.k_….json.PID-N.tmp`, never
///   another program's `*.tmp`) left by a write
///   that was interrupted is reported in [`Loaded::skipped`] (as a
///   [`corrupt`](StoreError::is_corrupt) record whose name ends in `.tmp`)
///   and removed by that same `load_all`; the previous version of its
///   session is intact. With a TTL, a [`prune`](FileStore::prune) removes
///   it too, once it is as old as a record that expires. Writes in progress
///   in this process are left alone.
/// * **A missing directory is an error**: if the directory disappears after
///   [`open`](FileStore::open) (deleted, or its volume unmounted), `load`,
///   `load_all` and `save` fail with [`is_not_found`](StoreError::is_not_found)
///   instead of answering "no such session".
/// * **Expiry, if asked for**: records stay until deleted, unless the store
///   has a time to live ([`with_ttl`](FileStore::with_ttl)).
/// * **Never blocks the runtime**: every file operation runs on tokio's
///   blocking thread pool ([`tokio::task::spawn_blocking`]), so a store must
///   be used inside a tokio runtime; outside one, calls fail with an
///   [`other`](StoreError::is_other) error. The runtime needs its time
///   driver (as `#[tokio::main]` builds it) for the time limits below:
///   on a runtime built without it, `open` and the calls on one session
///   panic, as tokio's timers do.
/// * **Bounded waits**: a call on one session that the file system does not
///   finish within 10 seconds (a hung network mount, a saturated blocking
///   pool) fails with a [`timeout`](StoreError::is_timeout) error; see
///   [`with_timeout`](FileStore::with_timeout).
/// * **Bounded threads**: at most 64 file operations of a store (and its
///   clones) hold a blocking thread at once, those that timed out but go
///   on included, so that a hung file system cannot take every thread of
///   the pool from the rest of the process; see
///   [`with_concurrency_limit`](FileStore::with_concurrency_limit).
///
/// One process should own a directory: two processes writing the same
/// directory keep every record whole, but one may remove the other's
/// temporary file while it writes, failing that save.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower_ha::store::{FileStore, Session, SessionStore};
///
/// # let tmp = tempfile::tempdir().unwrap();
/// # let dir = tmp.path().join("sessions");
/// let store = FileStore::open(&dir).await.unwrap();
/// store.save(&Session::new("../../etc/passwd", "node-a".into())).await.unwrap();
///
/// // A restarted process finds the session again, inside the directory.
/// let again = FileStore::open(&dir).await.unwrap();
/// let loaded = again.load_all().await.unwrap();
/// assert_eq!(loaded.sessions[0].key, "../../etc/passwd");
/// assert_eq!(loaded.sessions[0].backend.as_str(), "node-a");
/// # }
/// ```
#[derive(Clone)]
pub struct FileStore {
    dir: Arc<PathBuf>,
    /// The directory's one name (resolved when opened), for the order of
    /// a record's writes across handles that spelled it differently.
    named: Arc<PathBuf>,
    ttl: Option<Duration>,
    timeout: Duration,
    /// A permit for each file operation that may be under way at once,
    /// shared by clones; an operation holds its permit until it ends.
    permits: Arc<Semaphore>,
    /// When the next save starts a prune (with a TTL), shared by clones.
    next_prune: Arc<Mutex<Option<Instant>>>,
}

impl FileStore {
    /// A store in `dir`, creating the directory (and its parents) if it is
    /// missing. On Unix, each directory created is flushed to disk in its
    /// parent (`fsync`), so a power loss cannot take it away with the
    /// sessions saved in it afterwards. An existing directory that users
    /// other than its owner have access to is logged as a warning: the file
    /// names in it carry the session keys.
    ///
    /// Fails with an [`io`](StoreError::is_io) error if the directory cannot
    /// be created or `dir` is not a directory, and with a
    /// [`timeout`](StoreError::is_timeout) error after the default
    /// [timeout](FileStore::with_timeout).
    pub async fn open(dir: impl Into<PathBuf>) -> Result<FileStore, StoreError> {
        let dir: PathBuf = dir.into();
        let permits = Arc::new(Semaphore::new(DEFAULT_CONCURRENCY));
        let dir = blocking(&permits, DEFAULT_TIMEOUT, move || {
            create_dir_durably(&dir).map_err(|e| {
                StoreError::io(e).with_message(format!("cannot create {}", dir.display()))
            })?;
            let meta = fs::metadata(&dir).map_err(StoreError::io)?;
            if !meta.is_dir() {
                return Err(StoreError::io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not a directory", dir.display()),
                )));
            }
            // One name for the directory however it was spelled, which
            // the order of a record's writes goes by (see `WRITING`).
            let named = fs::canonicalize(&dir)
                .or_else(|_| std::path::absolute(&dir))
                .unwrap_or_else(|_| dir.clone());
            Ok((dir, named, shared_mode(&meta)))
        })
        .await?;
        let (dir, named, shared) = dir;
        if let Some(mode) = shared {
            tracing::warn!(
                dir = %dir.display(),
                mode = format_args!("{mode:04o}"),
                "other users have access to the session directory, whose file names carry the session keys; make it private (mode 0700)"
            );
        }
        Ok(FileStore {
            dir: Arc::new(dir),
            named: Arc::new(named),
            ttl: None,
            timeout: DEFAULT_TIMEOUT,
            permits,
            next_prune: Arc::default(),
        })
    }

    /// How long a call on one session ([`load`](SessionStore::load),
    /// [`save`](SessionStore::save), [`delete`](SessionStore::delete))
    /// waits for the file system before it fails with a
    /// [`timeout`](StoreError::is_timeout) error: 10 seconds by default. A
    /// zero `limit` is taken as 1 ms. Applies to this handle and the clones
    /// made from it afterwards. [`load_all`](SessionStore::load_all) and
    /// [`prune`](FileStore::prune), whose time grows with the number of
    /// records, have no limit: bound a restore with your own timeout if
    /// you need one.
    ///
    /// A file operation cannot be interrupted: one that times out goes on
    /// in the background on its blocking thread, and counts towards the
    /// [concurrency limit](FileStore::with_concurrency_limit) until it
    /// ends. A save or delete that
    /// times out may therefore still land, but never after a later write
    /// of the same session: the writes of a record run one at a time, in
    /// the order they were asked for, and a later one waits (within its
    /// own limit) for the one still under way.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use tower_ha::store::FileStore;
    ///
    /// # let tmp = tempfile::tempdir().unwrap();
    /// # let dir = tmp.path();
    /// let store = FileStore::open(dir).await.unwrap().with_timeout(Duration::from_secs(2));
    /// # let _ = store;
    /// # }
    /// ```
    pub fn with_timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit.max(Duration::from_millis(1));
        self
    }

    /// How many file operations of this store may be under way at once,
    /// each on a thread of tokio's blocking pool: 64 by default. A zero
    /// `max` is taken as 1. Applies to this handle and the clones made from
    /// it afterwards, which share the limit.
    ///
    /// A call waits for its turn within its
    /// [timeout](FileStore::with_timeout), and fails with a
    /// [`timeout`](StoreError::is_timeout) error, without taking a thread,
    /// if none comes; [`load_all`](SessionStore::load_all) and
    /// [`prune`](FileStore::prune) wait as long as it takes. A prune a save
    /// would start in the background is left to a later save instead.
    ///
    /// An operation that timed out goes on until the file system answers,
    /// and keeps its place until then. That is what the limit is for: on a
    /// file system that hangs (a hard-mounted NFS share, a stalled volume),
    /// the store's stuck operations hold at most `max` threads, and the
    /// rest of the blocking pool (512 threads by default) stays free for
    /// the rest of the process, whose DNS lookups (`getaddrinfo`, as
    /// hyper-util's HTTP client makes them) run on it too.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower_ha::store::FileStore;
    ///
    /// # let tmp = tempfile::tempdir().unwrap();
    /// # let dir = tmp.path();
    /// let store = FileStore::open(dir).await.unwrap().with_concurrency_limit(16);
    /// # let _ = store;
    /// # }
    /// ```
    pub fn with_concurrency_limit(mut self, max: usize) -> Self {
        self.permits = Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS)));
        self
    }

    /// Makes records expire `ttl` after their last save or
    /// [`load`](SessionStore::load) (a record's time is its file's
    /// modification time), so that a store behind the layer's own cookie on
    /// a public site, where every new client is a session, stays bounded.
    /// Applies to this handle and the clones made from it afterwards.
    ///
    /// * `load` does not return an expired record, and renews the record it
    ///   returns (its modification time set to now). `load_all` does not
    ///   return expired records either, but renews nothing, so that
    ///   restarts do not keep every record alive.
    /// * A save starts a [`prune`](FileStore::prune) on the blocking
    ///   thread pool, in the background, at most once every half `ttl`
    ///   (the first save after `with_ttl` starts one).
    /// * The sticky layer refreshes a session it serves every half `ttl`
    ///   (see [`SessionStore::refresh_interval`]), so only sessions nobody
    ///   uses expire. A refresh renews the record on file as it is, and
    ///   writes the session again only when its record is gone.
    /// * `ttl` is taken as at least 1 ms and at most about a century.
    ///
    /// Expiry follows the system clock: a jump forward by more than `ttl`
    /// expires every record, and the sticky layer writes the sessions in use
    /// again at their next refresh; after a jump back, a record written before
    /// it is kept until the clock passes its time again. A prune never removes
    /// a record this process is writing, but may remove one a load is returning
    /// at the moment it expires (written again at its next refresh too), and
    /// one another process writes into the same directory as it is renewed (one
    /// process should own a directory).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use tower_ha::store::{FileStore, SessionStore};
    ///
    /// # let tmp = tempfile::tempdir().unwrap();
    /// # let dir = tmp.path();
    /// let store = FileStore::open(dir).await.unwrap().with_ttl(Duration::from_secs(24 * 3600));
    /// assert_eq!(store.refresh_interval(), Some(Duration::from_secs(12 * 3600)));
    /// # }
    /// ```
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(clamp_ttl(ttl));
        self.next_prune = Arc::default();
        self
    }

    /// Removes the records that expired (see
    /// [`with_ttl`](FileStore::with_ttl)) and answers how many; without a
    /// TTL, removes nothing. Saves start one now and then; call it to
    /// prune at a time of your choosing. A record that cannot be removed
    /// is logged and left; only a directory that cannot be listed is an
    /// error.
    ///
    /// It also removes (and logs, without counting them) the temporary files
    /// that interrupted writes left behind and were last written at least
    /// the TTL ago, so that a store that never runs
    /// [`load_all`](SessionStore::load_all) does not gather them. The
    /// writes in progress in this process are left alone, however long
    /// they take; the age spares those of another process writing into the
    /// same directory.
    pub async fn prune(&self) -> Result<usize, StoreError> {
        let Some(ttl) = self.ttl else {
            return Ok(0);
        };
        let dir = self.dir.clone();
        run(&self.permits, move || prune(&dir, ttl)).await
    }

    /// Starts a prune in the background if none started in the last half
    /// TTL and a file operation may start (else the next save tries again).
    fn prune_if_due(&self) {
        let Some(ttl) = self.ttl else { return };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return;
        };
        if !claim_due(&mut self.next_prune.lock(), ttl / 2, Instant::now()) {
            return;
        }
        let dir = self.dir.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn_blocking(move || {
                match prune(&dir, ttl) {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(dir = %dir.display(), removed = n, "expired sessions removed"),
                    Err(e) => tracing::warn!(dir = %dir.display(), error = %crate::error::Report(&e), "cannot prune expired sessions"),
                }
                drop(permit);
            });
        }
    }

    /// The directory the sessions are kept in.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The file name a session key is stored under (without the directory).
    ///
    /// ```
    /// use tower_ha::store::FileStore;
    ///
    /// assert_eq!(FileStore::file_name("alice"), "k_alice.json");
    /// assert_eq!(FileStore::file_name("../x"), "k_%2E%2E%2Fx.json");
    /// assert!(FileStore::file_name(&"x".repeat(300)).starts_with("h_"));
    /// ```
    pub fn file_name(key: &str) -> String {
        file_name(key)
    }
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.dir)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl SessionStore for FileStore {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        let dir = self.dir.clone();
        let ttl = self.ttl;
        Box::pin(run(&self.permits, move || load_all(&dir, ttl)))
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        let dir = self.dir.clone();
        let key = key.to_owned();
        let ttl = self.ttl;
        Box::pin(blocking(&self.permits, self.timeout, move || {
            load_one(&dir, &key, ttl)
        }))
    }

    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        let dir = self.dir.clone();
        let encoded = session.check_depth().and_then(|()| {
            let bytes = serde_json::to_vec_pretty(session).map_err(|e| {
                StoreError::other(e).with_message("session cannot be encoded as JSON")
            })?;
            super::check_size(bytes.len())?;
            Ok(bytes)
        });
        let name = file_name(&session.key);
        Box::pin(async move {
            let bytes = encoded?;
            let paths = [self.named.join(&name)];
            writing(&self.permits, self.timeout, &paths, move || {
                write_atomic(&dir, &name, &bytes)
            })
            .await?;
            self.prune_if_due();
            Ok(())
        })
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        let dir = self.dir.clone();
        let names: Vec<String> = keys.iter().map(|k| file_name(k)).collect();
        Box::pin(async move {
            if names.is_empty() {
                return Ok(());
            }
            let paths: Vec<PathBuf> = names.iter().map(|name| self.named.join(name)).collect();
            writing(&self.permits, self.timeout, &paths, move || {
                delete(&dir, &names)
            })
            .await
        })
    }

    /// Half the TTL ([`with_ttl`](FileStore::with_ttl)), if any.
    fn refresh_interval(&self) -> Option<Duration> {
        self.ttl.map(|ttl| ttl / 2)
    }

    /// Renews the record on file as it is (a load renews it): another
    /// process sharing the directory may have moved the session since, and
    /// its record is not overwritten with this copy. A record that is gone
    /// (expired, pruned, or deleted through another process: there are no
    /// tombstones) is saved again, in a second step a save by another
    /// process can come between. A record that cannot be read fails the
    /// refresh and stays as it is.
    fn refresh<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            match self.load(&session.key).await? {
                Some(_) => Ok(()),
                None => self.save(session).await,
            }
        })
    }
}

/// Runs `f` as [`run`] does, waiting for it (its permit included) at most
/// `limit`.
async fn blocking<T, F>(permits: &Arc<Semaphore>, limit: Duration, f: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    within(limit, run(permits, f)).await
}

/// Runs `f` on the blocking pool of the current tokio runtime once it has
/// one of `permits`. The permit goes with `f`, and is given back when `f`
/// ends, not when its caller stops waiting, so that the permits count the
/// threads taken, those a hung file system holds included.
async fn run<T, F>(permits: &Arc<Semaphore>, f: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    let runtime = runtime()?;
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .map_err(StoreError::other)?;
    let f = move || {
        let result = f();
        drop(permit);
        result
    };
    match runtime.spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::other(e).with_message("file operation did not complete")),
    }
}

/// The current tokio runtime.
fn runtime() -> Result<tokio::runtime::Handle, StoreError> {
    tokio::runtime::Handle::try_current()
        .map_err(|e| StoreError::other(e).with_message("FileStore needs a tokio runtime"))
}

/// `call`'s answer, or a timeout error once `limit` has passed.
async fn within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    // Without a runtime, an error rather than the timer's panic.
    runtime()?;
    tokio::time::timeout(limit, call).await.unwrap_or_else(|elapsed| {
        Err(StoreError::timeout(elapsed).with_message(format!(
            "the file system did not answer within {limit:?}; an operation under way goes on in the background"
        )))
    })
}

/// Runs the write `f` of the records at `paths` as [`blocking`] does, once
/// the writes of those records asked for earlier have ended (see
/// [`WRITING`]); the wait counts towards `limit`.
async fn writing<F>(
    permits: &Arc<Semaphore>,
    limit: Duration,
    paths: &[PathBuf],
    f: F,
) -> Result<(), StoreError>
where
    F: FnOnce() -> Result<(), StoreError> + Send + 'static,
{
    within(limit, async {
        // In one order for every write, so that two deletes of
        // overlapping records cannot each hold what the other waits for.
        let mut paths: Vec<&PathBuf> = paths.iter().collect();
        paths.sort_unstable();
        paths.dedup();
        let mut turns = Vec::with_capacity(paths.len());
        for path in paths {
            turns.push(Turn::wait(path).await);
        }
        // The turns go with the write, and end when it ends. The permit is
        // taken after them: a write waiting for its turn holds no thread.
        run(permits, move || {
            let result = f();
            drop(turns);
            result
        })
        .await
    })
    .await
}

/// A write's turn on one record file, from the moment it waits for the
/// record's lock until it gives the lock back; the last turn of a record
/// removes it from [`WRITING`].
struct Turn {
    path: PathBuf,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Turn {
    async fn wait(path: &Path) -> Turn {
        let lock = {
            let mut writing = WRITING.lock();
            let record = writing.entry(path.to_owned()).or_default();
            record.turns += 1;
            record.lock.clone()
        };
        // Counted from here, so that a caller that stops waiting gives
        // its turn up too.
        let mut turn = Turn {
            path: path.to_owned(),
            guard: None,
        };
        turn.guard = Some(lock.lock_owned().await);
        turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        {
            let mut writing = WRITING.lock();
            if let Some(record) = writing.get_mut(&self.path) {
                record.turns -= 1;
                if record.turns == 0 {
                    writing.remove(&self.path);
                }
            }
        }
        // Given back once the turn no longer counts: the write it lets in
        // may end, and look at the table, before this thread goes on.
        drop(self.guard.take());
    }
}

fn file_name(key: &str) -> String {
    let mut name = String::with_capacity(ENCODED_PREFIX.len() + key.len() + RECORD_SUFFIX.len());
    name.push_str(ENCODED_PREFIX);
    for &b in key.as_bytes() {
        if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-' {
            name.push(char::from(b));
        } else {
            name.push('%');
            name.push(char::from(HEX[usize::from(b >> 4)]));
            name.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        if name.len() > MAX_ENCODED_NAME {
            return hashed_name(key);
        }
    }
    name.push_str(RECORD_SUFFIX);
    if name.len() > MAX_ENCODED_NAME {
        return hashed_name(key);
    }
    name
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hashed_name(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut name = String::with_capacity(HASHED_PREFIX.len() + 64 + RECORD_SUFFIX.len());
    name.push_str(HASHED_PREFIX);
    for b in digest {
        name.push(char::from(HEX[usize::from(b >> 4)].to_ascii_lowercase()));
        name.push(char::from(HEX[usize::from(b & 0xf)].to_ascii_lowercase()));
    }
    name.push_str(RECORD_SUFFIX);
    name
}

#[cfg(unix)]
fn create_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).create(dir)
}

/// The mode of a directory (whose metadata is `meta`) that users other
/// than its owner have access to, which the store warns of and does not
/// change: the names of the files in it carry the session keys.
#[cfg(unix)]
fn shared_mode(meta: &fs::Metadata) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}

/// Without modes, nothing to tell.
#[cfg(not(unix))]
fn shared_mode(_: &fs::Metadata) -> Option<u32> {
    None
}

/// Creates `dir` and its missing parents, then flushes the entry of each
/// directory created into its parent: until then, a power loss may undo
/// the creation, and every file written in the directory with it.
fn create_dir_durably(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| {
            !d.as_os_str().is_empty()
                && matches!(fs::symlink_metadata(d), Err(e) if e.kind() == io::ErrorKind::NotFound)
        })
        .collect();
    create_dir(dir)?;
    for created in missing.iter().rev() {
        match created.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
            Some(_) => sync_dir(Path::new("."))?,
            None => {}
        }
    }
    Ok(())
}

fn create_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// [`sync_dir`], with the store's error.
fn flush(dir: &Path) -> Result<(), StoreError> {
    sync_dir(dir).map_err(|e| {
        StoreError::io(e).with_message(format!("cannot flush directory {}", dir.display()))
    })
}

/// The entries of `dir`, with the store's errors.
fn list(
    dir: &Path,
) -> Result<impl Iterator<Item = Result<fs::DirEntry, StoreError>> + '_, StoreError> {
    let message = || format!("cannot list {}", dir.display());
    let entries = fs::read_dir(dir).map_err(|e| io_error(dir, e, message()))?;
    Ok(entries.map(move |entry| entry.map_err(|e| StoreError::io(e).with_message(message()))))
}

/// Flushes the directory entry changes (a rename, a removal, a directory
/// created) to disk.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    tests::SYNCED.lock().push(dir.to_owned());
    File::open(dir)?.sync_all()
}

/// Directories cannot be opened as files everywhere; a rename is as
/// durable as the platform makes it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// Removes a temporary path from the in-flight set when the write ends,
/// whichever way it ends.
struct InFlight(String);

impl InFlight {
    fn register(name: String) -> InFlight {
        IN_FLIGHT.lock().insert(name.clone());
        InFlight(name)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.lock().remove(&self.0);
    }
}

/// The name of the `n`-th temporary file of this process for the record
/// file `record`: `.{record}.{pid}-{n}.tmp`.
fn temp_name(record: &str, n: u64) -> String {
    format!(".{record}.{}-{n}{TEMP_SUFFIX}", std::process::id())
}

/// Whether `temp` is a temporary name for the record file `record` (see
/// [`temp_name`]).
fn is_temp_of(temp: &str, record: &str) -> bool {
    (temp.strip_prefix('.'))
        .and_then(|t| t.strip_prefix(record))
        .is_some_and(|t| t.starts_with('.'))
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let target = dir.join(name);
    let mut attempt = 1;
    let (temp, guard, mut file) = loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        // Unique in this process (counter) and, nearly always, among
        // processes (pid, and a counter that starts at random).
        let temp_name = temp_name(name, n);
        let temp = dir.join(&temp_name);
        // Registered before the file exists and released after the rename,
        // so a listing that sees the file also sees the registration.
        let guard = InFlight::register(temp_name);
        match create_private(&temp) {
            Ok(file) => break (temp, guard, file),
            // Left by a crashed process that had this pid, or another
            // process's write: not this write's to remove. Take another.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < TEMP_ATTEMPTS => {
                attempt += 1;
            }
            Err(e) => {
                return Err(io_error(
                    dir,
                    e,
                    format!("cannot write {}", target.display()),
                ))
            }
        }
    };
    let written = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, &target)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        drop(guard);
        return Err(StoreError::io(e).with_message(format!("cannot write {}", target.display())));
    }
    drop(guard);
    flush(dir)
}

/// Removes every record it can, even after one fails, and makes the
/// removals durable; reports the first failure.
fn delete(dir: &Path, names: &[String]) -> Result<(), StoreError> {
    let mut removed = false;
    let mut failed = None;
    for name in names {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => removed = true,
            // An absent record is deleted already, unless the whole
            // directory is gone (an unmounted volume would bring it back).
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir.is_dir() => {}
            Err(e) => {
                failed.get_or_insert_with(|| {
                    io_error(dir, e, format!("cannot remove {}", path.display()))
                });
            }
        }
    }
    if removed {
        flush(dir)?;
    }
    failed.map_or(Ok(()), Err)
}

/// The largest record file read.
const MAX_RECORD: u64 = super::MAX_READ as u64;

/// Reads and checks one record file. `Ok(None)` if it does not exist or,
/// with a `ttl`, if it expired. With a `ttl`, `renew` sets the time of the
/// record returned to now.
fn read_record(
    path: &Path,
    name: &str,
    ttl: Option<Duration>,
    renew: bool,
) -> Result<Option<Session>, StoreError> {
    let cannot_read =
        |e: io::Error| StoreError::io(e).with_message(format!("cannot read {}", path.display()));
    let not_a_record = |why: &str| {
        StoreError::corrupt(io::Error::new(io::ErrorKind::InvalidData, why.to_owned()))
            .with_message(format!("{name} is not a session record"))
    };
    // The store writes regular files only. Anything else under a record's
    // name is not read: a FIFO would block the read for good, a link or a
    // device leads elsewhere (`/dev/zero` never ends). On Unix the open
    // itself neither follows a link nor waits for a FIFO's writer, so a
    // file swapped in after a look is refused too.
    #[cfg(not(unix))]
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_file() => return Err(not_a_record("not a regular file")),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cannot_read(e)),
    }
    let renew = renew && ttl.is_some();
    let file = match open_record(path, renew) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if is_link(&e) => return Err(not_a_record("not a regular file")),
        Err(e) => return Err(cannot_read(e)),
    };
    let meta = file.metadata().map_err(cannot_read)?;
    if !meta.is_file() {
        // A FIFO, a device or a directory (elsewhere than on Unix, one
        // swapped in between the look and the open).
        return Err(not_a_record("not a regular file"));
    }
    if ttl.is_some_and(|ttl| expired(&meta, ttl)) {
        return Ok(None);
    }
    if meta.len() > MAX_RECORD {
        return Err(not_a_record("larger than any session record"));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // Bounded, should the file grow while it is read.
    (&file)
        .take(MAX_RECORD + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_RECORD {
        return Err(not_a_record("larger than any session record"));
    }
    let session: Session = serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::corrupt(e).with_message(format!("{name} is not a session")))?;
    if file_name(&session.key) != name {
        return Err(StoreError::corrupt(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file name does not match the key stored in it",
        ))
        .with_message(format!("{name} holds another key's session")));
    }
    if renew {
        // Renewed on the file this read opened: a save that replaced it
        // meanwhile is newer anyway. A failure only shortens its life.
        if let Err(e) = file.set_modified(SystemTime::now()) {
            tracing::debug!(file = %name, error = %e, "cannot renew a session file");
        }
    }
    Ok(Some(session))
}

/// Opens a record to read it, and to renew its time if `renew` (Windows
/// sets a file's times only through a handle opened for writing): a file
/// that cannot be opened for writing (read-only, or on a read-only file
/// system) is read all the same.
fn open_record(path: &Path, renew: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Reads of a regular file ignore `O_NONBLOCK`; the type is checked
        // on the file opened.
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    if renew {
        if let Ok(file) = options.clone().write(true).open(path) {
            return Ok(file);
        }
    }
    options.open(path)
}

/// Whether opening a record failed because its name is a symbolic link
/// (`O_NOFOLLOW`).
#[cfg(unix)]
fn is_link(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

#[cfg(not(unix))]
fn is_link(_: &io::Error) -> bool {
    false
}

/// Whether a record whose file has `meta` expired: its last modification
/// is `ttl` or more ago (never when the clock is behind it).
fn expired(meta: &fs::Metadata, ttl: Duration) -> bool {
    meta.modified().is_ok_and(|at| {
        SystemTime::now()
            .duration_since(at)
            .is_ok_and(|age| age >= ttl)
    })
}

/// Whether `name` is a record's file name (with one of the prefixes and
/// the record suffix); other files in the directory are not the store's.
fn is_record_name(name: &str) -> bool {
    name.ends_with(RECORD_SUFFIX)
        && (name.starts_with(ENCODED_PREFIX) || name.starts_with(HASHED_PREFIX))
}

/// Removes every expired record in `dir`, and the temporary files that
/// interrupted writes left as long ago; answers how many records.
fn prune(dir: &Path, ttl: Duration) -> Result<usize, StoreError> {
    let entries = list(dir)?;
    let mut removed = 0;
    let mut removed_temp = false;
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let temp = is_temp_name(&name);
        // Listed metadata first, so a live record costs no lock.
        if (temp || is_record_name(&name))
            && entry.metadata().is_ok_and(|m| expired(&m, ttl))
            && remove_expired(dir, &name, ttl)
        {
            if temp {
                tracing::warn!(file = %name, "removed the temporary file of an interrupted write");
                removed_temp = true;
            } else {
                removed += 1;
            }
        }
    }
    if removed > 0 || removed_temp {
        flush(dir)?;
    }
    Ok(removed)
}

/// Removes the record or temporary file `name` if it is still expired and
/// this process is not writing it; whether it did. The check and the
/// removal hold the lock every write registers under, so a save of this
/// process either has not started (it writes a new file after the removal)
/// or has renamed its file into place (the check sees it renewed); a
/// temporary file not registered is no write's of this process any more.
fn remove_expired(dir: &Path, name: &str, ttl: Duration) -> bool {
    let path = dir.join(name);
    // Held over a `stat` and an `unlink`, which every save of the process
    // waits for; only files already seen expired get this far.
    let in_flight = IN_FLIGHT.lock();
    if in_flight.contains(name) || in_flight.iter().any(|temp| is_temp_of(temp, name)) {
        return false;
    }
    if !fs::symlink_metadata(&path).is_ok_and(|m| expired(&m, ttl)) {
        return false;
    }
    match fs::remove_file(&path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an expired file");
            false
        }
    }
}

fn load_one(dir: &Path, key: &str, ttl: Option<Duration>) -> Result<Option<Session>, StoreError> {
    let name = file_name(key);
    match read_record(&dir.join(&name), &name, ttl, true)? {
        Some(session) if session.key == key => Ok(Some(session)),
        Some(_) => Err(StoreError::corrupt(io::Error::new(
            io::ErrorKind::InvalidData,
            "stored key differs from the requested key",
        ))
        .with_message(format!("{name} holds another key's session"))),
        // Not "no such session" when there is no directory to hold one.
        None if !dir.is_dir() => Err(missing_dir(
            dir,
            io::Error::new(io::ErrorKind::NotFound, "the directory is gone"),
        )),
        None => Ok(None),
    }
}

/// The error for a store whose directory is gone (deleted, or on a volume
/// that was unmounted) since it was opened.
fn missing_dir(dir: &Path, source: io::Error) -> StoreError {
    StoreError::not_found(source).with_message(format!(
        "the session directory {} is missing",
        dir.display()
    ))
}

/// `e`, met on `dir` or a file in it, as a [`not_found`](StoreError::is_not_found)
/// error when `dir` is gone, else an [`io`](StoreError::is_io) one.
fn io_error(dir: &Path, e: io::Error, message: String) -> StoreError {
    if e.kind() == io::ErrorKind::NotFound && !dir.is_dir() {
        missing_dir(dir, e)
    } else {
        StoreError::io(e).with_message(message)
    }
}

fn load_all(dir: &Path, ttl: Option<Duration>) -> Result<Loaded, StoreError> {
    let entries = list(dir)?;
    let mut loaded = Loaded::default();
    let mut removed_temp = false;
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue; // never a name this store writes
        };
        let path = entry.path();
        if is_temp_name(&name) {
            if IN_FLIGHT.lock().contains(&name) {
                continue; // a write of this process, in progress
            }
            let message = match fs::remove_file(&path) {
                Ok(()) => {
                    removed_temp = true;
                    "incomplete write removed"
                }
                // Renamed or cleaned up since the listing: nothing to report.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove temporary file");
                    "incomplete write (could not be removed)"
                }
            };
            tracing::warn!(file = %name, "found the temporary file of an interrupted write");
            loaded.skip(
                name,
                StoreError::corrupt(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "temporary file of an interrupted write; the previous version is kept",
                ))
                .with_message(message),
            );
            continue;
        }
        if !is_record_name(&name) {
            continue; // not ours: leave other files alone
        }
        match read_record(&path, &name, ttl, false) {
            Ok(Some(session)) => loaded.sessions.push(session),
            Ok(None) => {} // deleted while listing, or expired
            Err(e) => {
                tracing::warn!(file = %name, error = %crate::error::Report(&e), "skipping unreadable session file");
                loaded.skip(name, e);
            }
        }
    }
    if removed_temp {
        let _ = sync_dir(dir);
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every directory `sync_dir` flushed, in order.
    #[cfg(unix)]
    pub(super) static SYNCED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// A record's entry in the table of writes goes with its last turn,
    /// whether that turn wrote, timed out while its write went on, or gave
    /// up while it waited.
    #[tokio::test]
    async fn the_table_of_writes_forgets_a_record_once_no_write_needs_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("k_x.json");
        let entry = || WRITING.lock().get(&path).map(|r| r.turns);
        let (release, held) = std::sync::mpsc::channel::<()>();
        let paths = [path.clone()];
        let permits = Arc::new(Semaphore::new(DEFAULT_CONCURRENCY));
        // A write whose blocking call waits for the test: it times out and
        // keeps its turn.
        let limit = Duration::from_millis(20);
        let first = writing(&permits, limit, &paths, move || {
            held.recv().unwrap();
            Ok(())
        });
        assert!(first.await.unwrap_err().is_timeout());
        assert_eq!(entry(), Some(1));
        // One that waits for it and gives up.
        assert!(writing(&permits, limit, &paths, || Ok(()))
            .await
            .unwrap_err()
            .is_timeout());
        assert_eq!(entry(), Some(1));
        // One that waits, and writes once the first has ended.
        let mut last = tokio::spawn({
            let (permits, paths) = (permits.clone(), paths.clone());
            async move { writing(&permits, Duration::from_secs(60), &paths, || Ok(())).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(entry(), Some(2));
        assert!(futures::poll!(&mut last).is_pending());
        release.send(()).unwrap();
        last.await.unwrap().unwrap();
        assert_eq!(entry(), None);
    }

    /// An operation the file system does not answer keeps its permit past
    /// its caller's timeout, until it ends: meanwhile, with every permit so
    /// held, calls fail at their limit without running, though the blocking
    /// pool has a thread to spare (which runs its tasks in order, so a call
    /// that had been spawned would have run before the last load).
    #[test]
    fn a_timed_out_operation_keeps_its_permit_until_it_ends() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .max_blocking_threads(2)
            .build()
            .unwrap();
        runtime.block_on(async {
            let tmp = tempfile::tempdir().unwrap();
            let limit = Duration::from_secs(5);
            let store = FileStore::open(tmp.path())
                .await
                .unwrap()
                .with_timeout(limit)
                .with_concurrency_limit(1);
            store.save(&Session::new("k", "a".into())).await.unwrap();
            // Time stands still while a blocking call runs: it moves on
            // only as far as the test advances it.
            let at_limit = || async {
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                tokio::time::advance(limit).await;
            };

            let (release, held) = std::sync::mpsc::channel::<()>();
            let stuck = tokio::spawn({
                let permits = store.permits.clone();
                async move {
                    blocking(&permits, limit, move || {
                        held.recv().unwrap();
                        Ok(())
                    })
                    .await
                }
            });
            at_limit().await;
            assert!(stuck.await.unwrap().unwrap_err().is_timeout());

            let load = tokio::spawn({
                let store = store.clone();
                async move { store.load("k").await }
            });
            at_limit().await;
            assert!(load.await.unwrap().unwrap_err().is_timeout());
            let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let marked = tokio::spawn({
                let (permits, ran) = (store.permits.clone(), ran.clone());
                async move {
                    blocking(&permits, limit, move || {
                        ran.store(true, Ordering::Relaxed);
                        Ok(())
                    })
                    .await
                }
            });
            at_limit().await;
            assert!(marked.await.unwrap().unwrap_err().is_timeout());

            // The stuck operation ends, and gives its permit back.
            release.send(()).unwrap();
            assert_eq!(
                store.load("k").await.unwrap().unwrap().backend.as_str(),
                "a"
            );
            assert!(
                !ran.load(Ordering::Relaxed),
                "a call that timed out waiting for a permit never runs"
            );
        });
    }

    /// A prune a save would start waits for no permit: with none free, it
    /// is left to the next save. The pool's one thread runs its tasks in
    /// order, so a task spawned after a prune ends after it.
    #[test]
    fn a_background_prune_needs_a_free_permit() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        runtime.block_on(async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let ttl = Duration::from_secs(60);
            let (plain, name) =
                expired_record(dir, "a-background-prune-needs-a-free-permit", ttl).await;
            let store = plain.with_ttl(ttl).with_concurrency_limit(1);
            let after_a_prune = || tokio::task::spawn_blocking(|| ());

            let held = store.permits.clone().acquire_owned().await.unwrap();
            store.prune_if_due();
            after_a_prune().await.unwrap();
            assert!(dir.join(&name).exists(), "no prune without a permit");

            drop(held);
            store.prune_if_due();
            after_a_prune().await.unwrap();
            assert!(!dir.join(&name).exists(), "the next one prunes");
        });
    }

    /// Sets `path` as last written `ago`.
    fn written_ago(path: &Path, ago: Duration) {
        let file = File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - ago).unwrap();
    }

    /// A store at `dir` without a TTL (a save with one would start a
    /// prune) that holds the record of `key`, last written twice `ttl` ago;
    /// and the record's file name. A key of each test's own: the writes
    /// other tests have under way, which a prune leaves alone, are known by
    /// file name.
    async fn expired_record(dir: &Path, key: &str, ttl: Duration) -> (FileStore, String) {
        let store = FileStore::open(dir).await.unwrap();
        store.save(&Session::new(key, "a".into())).await.unwrap();
        let name = file_name(key);
        written_ago(&dir.join(&name), 2 * ttl);
        (store, name)
    }

    #[tokio::test]
    async fn a_prune_leaves_a_record_this_process_is_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ttl = Duration::from_secs(60);
        let (plain, name) = expired_record(dir, "a-prune-leaves-a-record-being-written", ttl).await;
        let store = plain.with_ttl(ttl);

        let writing = InFlight::register(temp_name(&name, 1));
        assert_eq!(store.prune().await.unwrap(), 0);
        assert!(dir.join(&name).exists());
        drop(writing);
        assert_eq!(store.prune().await.unwrap(), 1);
        assert!(!dir.join(&name).exists());
    }

    /// A prune removes the temporary file an interrupted write left once it
    /// is as old as an expired record, and keeps a fresh one, the one of a
    /// write in progress, and another program's.
    #[tokio::test]
    async fn a_prune_removes_old_leftovers_of_interrupted_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ttl = Duration::from_secs(60);
        let store = FileStore::open(dir).await.unwrap().with_ttl(ttl);
        let name = file_name("a-prune-removes-old-leftovers");
        let [old, fresh, writing] = [0, 1, 2].map(|n| temp_name(&name, n));
        let foreign = ".notes.txt.1-2.tmp".to_owned();
        for temp in [&old, &fresh, &writing, &foreign] {
            fs::write(dir.join(temp), b"{\"key\": \"a-prune").unwrap();
        }
        for temp in [&old, &writing, &foreign] {
            written_ago(&dir.join(temp), 2 * ttl);
        }

        let in_flight = InFlight::register(writing.clone());
        assert_eq!(store.prune().await.unwrap(), 0, "no record expired");
        assert!(!dir.join(&old).exists(), "an old leftover is removed");
        assert!(dir.join(&fresh).exists());
        assert!(dir.join(&writing).exists(), "a write in progress is kept");
        assert!(dir.join(&foreign).exists());
        drop(in_flight);
        store.prune().await.unwrap();
        assert!(!dir.join(&writing).exists(), "an old leftover is removed");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn created_directories_are_flushed_into_their_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let dir = root.join("a/b/c");
        FileStore::open(&dir).await.unwrap();
        let synced = |under: &Path| -> Vec<PathBuf> {
            SYNCED
                .lock()
                .iter()
                .filter(|p| p.starts_with(under))
                .cloned()
                .collect()
        };
        assert_eq!(
            synced(&root),
            [root.clone(), root.join("a"), root.join("a/b")],
            "each new directory's entry is flushed"
        );
        // Opening an existing directory creates nothing to flush.
        FileStore::open(&dir).await.unwrap();
        assert_eq!(synced(&root).len(), 3);
    }

    /// The open itself refuses what a look before it would have: a link
    /// swapped in is not followed, a FIFO does not wait for a writer.
    #[cfg(unix)]
    #[test]
    fn a_record_open_neither_follows_links_nor_waits_for_a_fifo() {
        use std::os::unix::fs::FileTypeExt;
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target.json");
        fs::write(&target, b"{}").unwrap();
        let link = tmp.path().join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let fifo = tmp.path().join("fifo.json");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());

        for renew in [false, true] {
            let error = open_record(&link, renew).unwrap_err();
            assert!(is_link(&error), "{error:?}");
            // Off this thread, so that an open that waits fails the test
            // instead of hanging it.
            let (opened, done) = std::sync::mpsc::channel();
            let path = fifo.clone();
            std::thread::spawn(move || {
                let is_fifo = open_record(&path, renew)
                    .and_then(|f| f.metadata())
                    .map(|m| m.file_type().is_fifo());
                drop(opened.send(is_fifo));
            });
            let is_fifo = done
                .recv_timeout(Duration::from_secs(30))
                .expect("opening a FIFO does not wait for a writer");
            assert!(is_fifo.unwrap());
        }
    }

    #[test]
    fn names_stay_inside_and_apart() {
        for key in [
            "../../etc/passwd",
            "/abs",
            "..",
            ".",
            "a/b",
            "a\\b",
            "nul\0",
        ] {
            let name = file_name(key);
            assert!(!name.contains('/') && !name.contains('\\') && !name.contains('\0'));
            assert!(name.starts_with(ENCODED_PREFIX), "{name}");
        }
        assert_ne!(file_name("A"), file_name("a"));
        assert_ne!(
            file_name("A").to_lowercase(),
            file_name("a").to_lowercase(),
            "names differ on case-insensitive file systems"
        );
        assert_ne!(file_name("%41"), file_name("A"));
        let long = file_name(&"é".repeat(100));
        assert!(long.starts_with(HASHED_PREFIX) && long.len() == 2 + 64 + 5);
        assert_ne!(file_name(&"x".repeat(300)), file_name(&"x".repeat(301)));
    }

    /// A process restarted with the pid of one that crashed mid-write (PID
    /// 1 in a container, on the same volume) may meet the temporary names
    /// it left behind.
    #[tokio::test]
    async fn a_leftover_under_the_next_temporary_name_does_not_fail_a_save() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).await.unwrap();
        let name = file_name("k");
        // The names the next saves in this process take (another test may
        // take some of them first).
        let next = TEMP_COUNTER.load(Ordering::Relaxed);
        let leftovers: Vec<String> = (next..next + 4).map(|n| temp_name(&name, n)).collect();
        for leftover in &leftovers {
            fs::write(tmp.path().join(leftover), b"{\"key\": \"k\", \"ba").unwrap();
        }
        let session = Session::new("k", "node-a".into());
        store.save(&session).await.unwrap();
        assert_eq!(store.load("k").await.unwrap(), Some(session));
        for leftover in &leftovers {
            assert!(
                tmp.path().join(leftover).exists(),
                "a save leaves {leftover} alone"
            );
        }
        // The next listing reports and removes them, as any leftover.
        let loaded = store.load_all().await.unwrap();
        assert_eq!(loaded.sessions.len(), 1);
        assert_eq!(loaded.skipped.len(), leftovers.len());
    }

    /// `load_all` passes over the temporary file of a write this process
    /// has in progress, then reports and removes it as a leftover once no
    /// write holds it.
    #[tokio::test]
    async fn load_all_leaves_a_write_in_progress_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).await.unwrap();
        store.save(&Session::new("k", "old".into())).await.unwrap();
        // A temporary name of `k`'s record that no save of this process
        // takes (the counter is far from it), held as `write_atomic` holds
        // its own from before the file exists until after the rename.
        let temp = temp_name(&file_name("k"), 0);
        assert!(is_temp_name(&temp));
        let in_flight = InFlight::register(temp.clone());
        fs::write(tmp.path().join(&temp), b"{\"key\": \"k\", \"ba").unwrap();

        let loaded = store.load_all().await.unwrap();
        assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
        assert_eq!(loaded.sessions.len(), 1);
        assert_eq!(loaded.sessions[0].backend.as_str(), "old");
        assert!(
            tmp.path().join(&temp).exists(),
            "a write in progress is kept"
        );

        // The write is over without renaming its file (the process died,
        // as far as a later listing can tell): a leftover.
        drop(in_flight);
        let loaded = store.load_all().await.unwrap();
        assert_eq!(loaded.skipped.len(), 1);
        assert_eq!(loaded.skipped[0].record, temp);
        assert!(loaded.skipped[0].error.is_corrupt());
        assert!(!tmp.path().join(&temp).exists(), "the leftover is removed");
        assert_eq!(loaded.sessions.len(), 1);
        assert_eq!(loaded.sessions[0].backend.as_str(), "old");
    }

    #[test]
    fn names_fit_the_file_system() {
        for len in 0..400 {
            let key = "%".repeat(len);
            let temp = format!(
                ".{}.{}-{}{TEMP_SUFFIX}",
                file_name(&key),
                u32::MAX,
                u64::MAX
            );
            assert!(temp.len() <= 255, "{len}: {}", temp.len());
        }
    }
}
