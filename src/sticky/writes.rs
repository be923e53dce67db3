//! The layer's writes to its session store, one key at a time in the order
//! they were decided.
//!
//! Two requests of one session may each write its record (one starts it,
//! the next moves it after its backend failed), and a store may take its
//! time over one write (a webhook store backs off and retries). Sent side
//! by side, the older write could land last and leave the record naming
//! the backend the session left. So the writes of a key form a queue that
//! one task works through in order, and a save writes the session as the
//! owner keeps it when its turn comes (a request may queue its save after
//! a later change's); writes of different keys still run side by side.
//! The task is not the request's: a request whose client goes away does
//! not cancel what it had to write. A write that would repeat or undo the
//! one waiting last in its key's queue joins it instead (a save behind a
//! waiting save or refresh, a refresh behind either, a delete behind a
//! delete; a delete behind a save or refresh takes its place), so a key's
//! queue stays short however fast its writes come while the store is slow.
//!
//! The order of a key's queue is the order in which its changes were made,
//! not the order in which the requests that made them got to queue their
//! writes: a change and its write are queued in one step (see
//! `Writes::decide`). Otherwise a request preempted between moving a
//! session and queueing its save could queue it behind the delete of a
//! request that ended the session meanwhile, and bring the record back.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::store::{Session, SessionStore, StoreError, StoreFuture};

/// One write of a key's record.
pub(crate) enum Write {
    /// Saves the key's session as the owner keeps it when its turn comes
    /// (see `Owner::saved`), or as decided when the owner keeps it no
    /// more. A request may queue its save after another that changed the
    /// session since (it was preempted between its change and its save):
    /// the older session does not land last.
    Save(Session),
    Delete(String),
    /// Writes nothing: lands once the writes queued before it have (see
    /// `Writes::behind`).
    Barrier(String),
    /// Refreshes the key's record (see `SessionStore::refresh`) with the
    /// session as the owner knows it when its turn comes, if it still
    /// keeps it: a record that would expire is in use.
    Refresh(String),
    /// Saves the session as the owner knows it when its turn comes, if it
    /// still keeps it: once more after a save of it failed.
    Resave(String),
}

impl Write {
    pub(crate) fn key(&self) -> &str {
        match self {
            Write::Save(session) => &session.key,
            Write::Delete(key) | Write::Barrier(key) | Write::Refresh(key) | Write::Resave(key) => {
                key
            }
        }
    }

    /// What the owner hears of when it fails.
    pub(crate) fn op(&self) -> &'static str {
        match self {
            Write::Save(_) | Write::Resave(_) => "save",
            Write::Delete(_) => "delete",
            Write::Barrier(_) => "barrier",
            Write::Refresh(_) => "refresh",
        }
    }
}

/// Who owns a [`Writes`] and hears of the writes that fail.
pub(crate) trait Owner: Send + Sync + 'static {
    fn writes(&self) -> &Writes;
    /// `write` (a save, a delete or a refresh) failed.
    fn failed(&self, write: &Write, error: &StoreError);
    /// The session `key` as it is to be saved now, if the owner still keeps
    /// it (see [`Write::Save`] and [`Write::Refresh`]).
    fn saved(&self, key: &str) -> Option<Session>;
}

/// A write waiting for its turn, and who waits for its result.
struct Queued {
    write: Write,
    done: oneshot::Sender<Result<(), StoreError>>,
    /// The waiters of the writes that joined this one.
    joined: Vec<oneshot::Sender<Result<(), StoreError>>>,
}

impl Queued {
    /// Takes `later` (of the same key) into this one if it would only
    /// repeat it once this one has landed, or undo it: a save writes the
    /// session as the owner keeps it at its turn, which a refresh or a
    /// second save would write again, and a delete after it would remove.
    /// A later save's session replaces the one decided, for when the owner
    /// keeps it no more; a later delete replaces the save. A barrier joins
    /// a barrier, which lands when it does, and nothing else. Its waiters
    /// and those that joined it wait for this one then. Gives `later` back
    /// otherwise.
    fn join(&mut self, later: Queued) -> Option<Queued> {
        match (&self.write, &later.write) {
            (Write::Save(_) | Write::Refresh(_) | Write::Resave(_), Write::Refresh(_))
            | (Write::Save(_) | Write::Resave(_), Write::Resave(_))
            | (Write::Delete(_), Write::Delete(_))
            | (Write::Barrier(_), Write::Barrier(_)) => {}
            // What a save would write, the delete after it removes; a
            // refresh writes no record that is there, a save again does.
            (
                Write::Save(_) | Write::Refresh(_) | Write::Resave(_),
                Write::Save(_) | Write::Delete(_),
            )
            | (Write::Refresh(_), Write::Resave(_)) => self.write = later.write,
            _ => return Some(later),
        }
        self.joined.push(later.done);
        self.joined.extend(later.joined);
        None
    }

    /// Whether this is a barrier whose waiters have all gone; forgets
    /// those of a barrier that have.
    fn abandoned(&mut self) -> bool {
        if !matches!(self.write, Write::Barrier(_)) {
            return false;
        }
        self.joined.retain(|joined| !joined.is_closed());
        self.done.is_closed() && self.joined.is_empty()
    }

    /// Tells every waiter the write's `result`.
    fn finish(self, result: Result<(), StoreError>) {
        for joined in self.joined {
            let _ = joined.send(result.clone());
        }
        let _ = self.done.send(result);
    }
}

/// The keys with writes under way, each with those waiting behind the one
/// in flight.
pub(crate) struct Writes {
    queues: Mutex<HashMap<String, VecDeque<Queued>>>,
    /// Told when the last key's queue is removed.
    idle: tokio::sync::Notify,
    /// The most keys with writes under way: a store that hangs would
    /// otherwise gather a task and a queue for every new session.
    limit: usize,
}

#[cfg(test)]
impl Default for Writes {
    fn default() -> Self {
        Writes::new(usize::MAX)
    }
}

/// The result of a write, once it has landed (or failed).
pub(crate) type Done = oneshot::Receiver<Result<(), StoreError>>;

/// Waits for a write's result.
pub(crate) async fn landed(done: Done) -> Result<(), StoreError> {
    // Every write is finished with its result, even when its task ends
    // early; a closed channel is only a guard.
    done.await
        .unwrap_or_else(|_| Err(StoreError::other("the write did not complete")))
}

impl Writes {
    /// Writes of at most `limit` keys at once (see [`Writes::decide`]).
    pub(crate) fn new(limit: usize) -> Self {
        Writes {
            queues: Mutex::default(),
            idle: tokio::sync::Notify::new(),
            limit,
        }
    }

    /// Waits until no write is queued or under way.
    pub(crate) async fn flush(&self) {
        loop {
            // Told of an idle moment that comes after this check.
            let idle = self.idle.notified();
            if self.queues.lock().is_empty() {
                return;
            }
            idle.await;
        }
    }

    /// Removes `key`'s queue from `queues` (this one's, locked), and tells
    /// those who wait for no write to be left when it was the last.
    fn remove_queue(
        &self,
        queues: &mut HashMap<String, VecDeque<Queued>>,
        key: &str,
    ) -> Option<VecDeque<Queued>> {
        let removed = queues.remove(key);
        if queues.is_empty() {
            self.idle.notify_waiters();
        }
        removed
    }

    /// Lands once the writes of `key` decided so far have landed (or
    /// failed); `None` when none is queued or under way.
    pub(crate) fn behind<O: Owner>(owner: &Arc<O>, key: &str) -> Option<Done> {
        let mut queues = owner.writes().queues.lock();
        let queue = queues.get_mut(key)?;
        let (done, result) = oneshot::channel();
        let barrier = Queued {
            write: Write::Barrier(key.to_owned()),
            done,
            joined: Vec::new(),
        };
        enqueue(queue, barrier);
        Some(result)
    }

    /// Queues `write` behind those of its key already decided, on `store`;
    /// `owner` hears of it if it fails. Outside a tokio runtime, the write
    /// fails at once (its key's queue would have no task).
    pub(crate) fn submit<O: Owner>(
        owner: &Arc<O>,
        store: &Arc<dyn SessionStore>,
        write: Write,
    ) -> Done {
        let ((), done) = Writes::decide(owner, store, false, || ((), Some(write)));
        done.expect("a write was decided")
    }

    /// Makes a change with `change` and queues the write it decides, if
    /// any, as [`submit`](Writes::submit) does, in one step: no other write
    /// is queued in between, so the writes of a key are queued in the order
    /// their changes were made.
    ///
    /// A `new` session's save, of a key with no write under way while the
    /// writes of as many keys as the limit are, fails at once (the owner
    /// hears of it, as of a failed write): new sessions are what a store
    /// that hangs would gather without bound. The writes of the sessions
    /// the table holds (moves, refreshes, deletes) always queue, since the
    /// table bounds them, and a lost move or delete would leave the record
    /// naming a backend the session left or bring an ended session back.
    pub(crate) fn decide<O: Owner, R>(
        owner: &Arc<O>,
        store: &Arc<dyn SessionStore>,
        new: bool,
        change: impl FnOnce() -> (R, Option<Write>),
    ) -> (R, Option<Done>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let (made, write) = change();
            return (
                made,
                write.map(|write| {
                    let error = "writing to the session store needs a tokio runtime";
                    refused(&**owner, &write, StoreError::other(error))
                }),
            );
        };
        let mut queues = owner.writes().queues.lock();
        let (made, write) = change();
        let Some(write) = write else {
            return (made, None);
        };
        if new && queues.len() >= owner.writes().limit && !queues.contains_key(write.key()) {
            drop(queues);
            let error = StoreError::unavailable(format!(
                "the writes of {} sessions are already under way (max_pending_writes)",
                owner.writes().limit
            ));
            return (made, Some(refused(&**owner, &write, error)));
        }
        let (done, result) = oneshot::channel();
        let queued = Queued {
            write,
            done,
            joined: Vec::new(),
        };
        match queues.get_mut(queued.write.key()) {
            // Its task will come to it.
            Some(queue) => enqueue(queue, queued),
            None => {
                let key = queued.write.key().to_owned();
                queues.insert(key.clone(), VecDeque::new());
                drop(queues);
                let worker = Worker {
                    owner: owner.clone(),
                    key,
                    store: store.clone(),
                    current: Some(queued),
                    finished: false,
                };
                runtime.spawn(worker.run());
            }
        }
        (made, Some(result))
    }
}

/// The result of `write`, failed at once with `error`, which `owner` hears
/// of.
fn refused<O: Owner>(owner: &O, write: &Write, error: StoreError) -> Done {
    owner.failed(write, &error);
    let (done, result) = oneshot::channel();
    let _ = done.send(Err(error));
    result
}

/// Puts `queued` last in its key's `queue`, or joins it to the writes
/// waiting last (see [`Queued::join`]).
fn enqueue(queue: &mut VecDeque<Queued>, queued: Queued) {
    // Loads keep coming while a write is stuck (a store that hangs), and
    // those whose requests gave up leave their barriers behind: dropped,
    // they keep no two writes apart that would join.
    queue.retain_mut(|queued| !queued.abandoned());
    // A write that joined the last one waiting may in turn repeat the one
    // before (a delete that took a save's place behind another delete), so
    // that a session started and ended in turn while the store is slow
    // keeps at most two writes waiting.
    let mut later = queued;
    while let Some(mut last) = queue.pop_back() {
        match last.join(later) {
            None => later = last,
            Some(unjoined) => {
                queue.push_back(last);
                later = unjoined;
                break;
            }
        }
    }
    queue.push_back(later);
}

/// The task that writes one key's queue.
struct Worker<O: Owner> {
    owner: Arc<O>,
    key: String,
    store: Arc<dyn SessionStore>,
    /// The write under way (or about to be, in a task not polled yet).
    current: Option<Queued>,
    /// Set once the queue is removed; until then, dropping the worker (its
    /// runtime shut down) fails the rest of the queue and removes it, so
    /// that the key's next write starts a task again.
    finished: bool,
}

impl<O: Owner> Worker<O> {
    async fn run(mut self) {
        let store = self.store.clone();
        loop {
            let next = self.current.as_ref().expect("a worker has a write");
            // The session as the owner keeps it now, if it does.
            let saved = match &next.write {
                Write::Save(decided) => self.owner.saved(&decided.key),
                Write::Refresh(key) | Write::Resave(key) => self.owner.saved(key),
                Write::Delete(_) | Write::Barrier(_) => None,
            };
            // A store that panics fails that write only: the key's later
            // writes still land, in order (a delete behind a save that
            // panicked included).
            let result = match (&next.write, &saved) {
                (Write::Save(decided), saved) => {
                    let session = saved.as_ref().unwrap_or(decided);
                    unless_panics(|| store.save(session)).await
                }
                (Write::Refresh(_), Some(session)) => {
                    unless_panics(|| store.refresh(session)).await
                }
                (Write::Resave(_), Some(session)) => unless_panics(|| store.save(session)).await,
                (Write::Refresh(_) | Write::Resave(_), None) | (Write::Barrier(_), _) => Ok(()),
                (Write::Delete(key), _) => {
                    unless_panics(|| store.delete(std::slice::from_ref(key))).await
                }
            };
            if let Err(error) = &result {
                self.owner.failed(&next.write, error);
            }
            let done = self.current.take().expect("a worker has a write");
            done.finish(result);
            let writes = self.owner.writes();
            let mut queues = writes.queues.lock();
            let queue = queues
                .get_mut(&self.key)
                .expect("a key's queue lives while its task does");
            match queue.pop_front() {
                Some(queued) => self.current = Some(queued),
                None => {
                    writes.remove_queue(&mut queues, &self.key);
                    self.finished = true;
                    return;
                }
            }
        }
    }
}

/// The answer of the store call `make` makes, or an error if the store
/// panics making it or answering.
async fn unless_panics<'a>(make: impl FnOnce() -> StoreFuture<'a, ()>) -> Result<(), StoreError> {
    let panicked = || StoreError::other("the session store panicked");
    let call = std::panic::catch_unwind(AssertUnwindSafe(make)).map_err(|_| panicked())?;
    let mut call = Some(call);
    std::future::poll_fn(|cx| {
        let Some(polled) = call.as_mut() else {
            return Poll::Ready(Err(panicked()));
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| polled.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                // Dropped here, where a second panic (in its drop) is
                // caught too.
                let call = call.take();
                let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(call)));
                Poll::Ready(Err(panicked()))
            }
        }
    })
    .await
}

impl<O: Owner> Drop for Worker<O> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Cancelled: its runtime shut down (or, unlikely, the layer's own
        // code panicked; a store's panic is caught where it is polled). The
        // write under way and those behind it fail, and their waiters
        // learn why.
        let cut_short = || {
            StoreError::other("the write's task stopped (the runtime shut down) before it landed")
        };
        let current = self.current.take();
        let writes = self.owner.writes();
        let rest = writes.remove_queue(&mut writes.queues.lock(), &self.key);
        // Each counted and logged: a delete lost here brings the session
        // back after a restart.
        for queued in current.into_iter().chain(rest.into_iter().flatten()) {
            let error = cut_short();
            if !matches!(queued.write, Write::Barrier(_)) {
                self.owner.failed(&queued.write, &error);
            }
            queued.finish(Err(error));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Loaded, MemoryStore, StoreFuture};
    use tokio::sync::Semaphore;

    /// A memory store whose saves each wait for a permit.
    struct Gated {
        inner: MemoryStore,
        permits: Arc<Semaphore>,
    }

    impl SessionStore for Gated {
        fn load_all(&self) -> StoreFuture<'_, Loaded> {
            self.inner.load_all()
        }
        fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
            self.inner.load(key)
        }
        fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
            if session.backend.as_str() == "panic at once" {
                panic!("a store that panics before it answers with a future");
            }
            Box::pin(async move {
                self.permits.acquire().await.unwrap().forget();
                match session.backend.as_str() {
                    "panic" => panic!("a store that panics"),
                    "down" => {
                        let refused = std::io::ErrorKind::ConnectionRefused;
                        return Err(StoreError::unavailable(std::io::Error::new(
                            refused, "down",
                        )));
                    }
                    _ => {}
                }
                self.inner.save(session).await
            })
        }
        fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
            self.inner.delete(keys)
        }
    }

    /// Owns the writes and keeps the failures it hears of.
    #[derive(Default)]
    struct Log {
        writes: Writes,
        failed: parking_lot::Mutex<Vec<String>>,
    }

    impl Owner for Log {
        fn writes(&self) -> &Writes {
            &self.writes
        }
        fn failed(&self, write: &Write, _: &StoreError) {
            self.failed
                .lock()
                .push(format!("{} {}", write.op(), write.key()));
        }
        fn saved(&self, _: &str) -> Option<Session> {
            None
        }
    }

    fn gated() -> (Arc<dyn SessionStore>, MemoryStore, Arc<Semaphore>) {
        let inner = MemoryStore::new();
        let permits = Arc::new(Semaphore::new(0));
        let store = Gated {
            inner: inner.clone(),
            permits: permits.clone(),
        };
        (Arc::new(store), inner, permits)
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_waits_for_every_write_queued_or_under_way() {
        let (store, inner, permits) = gated();
        let log = Arc::new(Log::default());
        // Nothing to wait for.
        log.writes.flush().await;
        let writes: Vec<Done> = [("k", "a"), ("k", "b"), ("x", "c")]
            .into_iter()
            .map(|(k, b)| Writes::submit(&log, &store, Write::Save(Session::new(k, b.into()))))
            .collect();
        let mut flush = std::pin::pin!(log.writes.flush());
        for permit in 0..3 {
            assert!(
                futures::poll!(flush.as_mut()).is_pending(),
                "{permit} of 3 saves landed"
            );
            permits.add_permits(1);
            tokio::task::yield_now().await;
        }
        tokio::time::timeout(std::time::Duration::from_secs(60), flush)
            .await
            .expect("the flush ends with the last write");
        for mut done in writes {
            assert!(
                matches!(done.try_recv(), Ok(Ok(()))),
                "landed before the flush ended"
            );
        }
        assert_eq!(
            inner.load("k").await.unwrap().unwrap().backend.as_str(),
            "b"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_the_limit_a_new_sessions_save_fails_at_once_and_other_writes_wait() {
        let (store, inner, permits) = gated();
        let log = Arc::new(Log {
            writes: Writes::new(2),
            failed: Default::default(),
        });
        let save = |key: &str| Write::Save(Session::new(key, "b".into()));
        let start = |key: &str| {
            let ((), done) = Writes::decide(&log, &store, true, || ((), Some(save(key))));
            done.expect("decided")
        };
        let a = start("a");
        let b = start("b");
        // Two keys under way: a third new session's save fails at once.
        let mut c = start("c");
        let error = c.try_recv().expect("failed at once").unwrap_err();
        assert!(error.is_unavailable(), "{error}");
        let why = std::error::Error::source(&error)
            .expect("a source")
            .to_string();
        assert!(why.contains("max_pending_writes"), "{why}");
        assert_eq!(*log.failed.lock(), ["save c"]);
        // A key already under way still queues, and so do the writes of
        // sessions already held: a move's save, a refresh, a delete.
        let a_again = start("a");
        inner.save(&Session::new("d", "b".into())).await.unwrap();
        let d = Writes::submit(&log, &store, Write::Delete("d".into()));
        let moved = Writes::submit(&log, &store, save("m"));
        let refreshed = Writes::submit(&log, &store, Write::Refresh("r".into()));
        tokio::task::yield_now().await;
        permits.add_permits(4);
        for done in [a, b, a_again, d, moved, refreshed] {
            tokio::time::timeout(std::time::Duration::from_secs(60), landed(done))
                .await
                .expect("landed")
                .unwrap();
        }
        assert!(inner.load("d").await.unwrap().is_none(), "deleted");
        assert!(inner.load("m").await.unwrap().is_some(), "moved");
        assert!(inner.load("c").await.unwrap().is_none(), "never saved");
        assert_eq!(log.failed.lock().len(), 1);
        // With the writes landed, a new session's save is taken again.
        permits.add_permits(1);
        landed(start("c")).await.unwrap();
        assert!(inner.load("c").await.unwrap().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_writes_of_a_key_land_in_the_order_decided() {
        let (store, inner, permits) = gated();
        let log = Arc::new(Log::default());
        let a = Writes::submit(&log, &store, Write::Save(Session::new("k", "a".into())));
        let gone = Writes::submit(&log, &store, Write::Delete("k".into()));
        let mut b = Writes::submit(&log, &store, Write::Save(Session::new("k", "b".into())));
        let mut c = Writes::submit(&log, &store, Write::Save(Session::new("k", "c".into())));
        // Another key's write does not wait behind them: with k's first
        // save and it waiting for a permit, two permits let both land and
        // hold k's next save.
        let other = Writes::submit(&log, &store, Write::Save(Session::new("x", "b".into())));
        tokio::task::yield_now().await;
        permits.add_permits(2);
        tokio::time::timeout(std::time::Duration::from_secs(60), other)
            .await
            .expect("the other key's save waited behind k's")
            .unwrap()
            .unwrap();
        assert_eq!(
            inner.load("x").await.unwrap().unwrap().backend.as_str(),
            "b"
        );
        assert!(b.try_recv().is_err(), "k's second save waits for a permit");
        assert!(c.try_recv().is_err());
        permits.add_permits(2);
        let mut results = vec![];
        for done in [a, gone, b, c] {
            results.push(done.await.unwrap());
        }
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(
            inner.load("k").await.unwrap().unwrap().backend.as_str(),
            "c"
        );
        assert!(log.writes.queues.lock().is_empty());
        assert!(log.failed.lock().is_empty());
    }

    #[tokio::test]
    async fn a_later_write_waits_for_a_slow_earlier_one() {
        let (store, inner, permits) = gated();
        let log = Arc::new(Log::default());
        let mut a = Writes::submit(&log, &store, Write::Save(Session::new("k", "a".into())));
        let mut b = Writes::submit(&log, &store, Write::Save(Session::new("k", "b".into())));
        tokio::task::yield_now().await;
        // One permit: the first save lands, the second has not started.
        permits.add_permits(1);
        (&mut a).await.unwrap().unwrap();
        assert!(b.try_recv().is_err(), "the second waits for its permit");
        assert_eq!(
            inner.load("k").await.unwrap().unwrap().backend.as_str(),
            "a"
        );
        permits.add_permits(1);
        b.await.unwrap().unwrap();
        assert_eq!(
            inner.load("k").await.unwrap().unwrap().backend.as_str(),
            "b"
        );
    }

    #[tokio::test]
    async fn writes_that_would_repeat_the_last_waiting_one_join_it() {
        let (store, inner, permits) = gated();
        let log = Arc::new(Log::default());
        let save = |backend: &str| Write::Save(Session::new("k", backend.into()));
        let first = Writes::submit(&log, &store, save("a"));
        let mut waiting = vec![
            Writes::submit(&log, &store, save("b")),
            Writes::submit(&log, &store, Write::Refresh("k".into())),
            Writes::submit(&log, &store, save("c")),
        ];
        let queued = |log: &Log| log.writes.queues.lock().get("k").map(VecDeque::len);
        assert_eq!(queued(&log), Some(1), "one save waits, for all three");
        // A delete undoes the waiting save: it takes its place, and the
        // deletes after it join it. A save after a delete does not.
        waiting.push(Writes::submit(&log, &store, Write::Delete("k".into())));
        waiting.push(Writes::submit(&log, &store, Write::Delete("k".into())));
        assert_eq!(queued(&log), Some(1));
        waiting.push(Writes::submit(&log, &store, save("d")));
        assert_eq!(queued(&log), Some(2));
        // Saves and deletes in turn, as sessions start and end while the
        // store is slow: each delete undoes the save before it and repeats
        // the delete before that, so two writes wait, however many come.
        for _ in 0..100 {
            waiting.push(Writes::submit(&log, &store, Write::Delete("k".into())));
            assert_eq!(queued(&log), Some(1));
            waiting.push(Writes::submit(&log, &store, save("d")));
            assert_eq!(queued(&log), Some(2));
        }
        // Two saves land: the first and the last.
        permits.add_permits(2);
        landed(first).await.unwrap();
        for done in waiting {
            landed(done).await.unwrap();
        }
        assert_eq!(
            inner.load("k").await.unwrap().unwrap().backend.as_str(),
            "d"
        );
        assert_eq!(permits.available_permits(), 0, "each save took one");
        assert!(log.writes.queues.lock().is_empty());

        // Nor is a delete taken into the save in flight: the record it
        // writes is deleted after it.
        let first = Writes::submit(&log, &store, save("e"));
        let gone = Writes::submit(&log, &store, Write::Delete("k".into()));
        assert_eq!(queued(&log), Some(1));
        permits.add_permits(1);
        landed(first).await.unwrap();
        landed(gone).await.unwrap();
        assert!(inner.load("k").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn loads_behind_a_stuck_write_keep_its_queue_short() {
        let (store, inner, permits) = gated();
        let log = Arc::new(Log::default());
        let save = |backend: &str| Write::Save(Session::new("k", backend.into()));
        let first = Writes::submit(&log, &store, save("a"));
        let queue = |log: &Log| {
            let queues = log.writes.queues.lock();
            let queue = queues.get("k").expect("k's writes are under way");
            let kinds: Vec<_> = queue.iter().map(|queued| queued.write.op()).collect();
            let waiters = queue.back().map_or(0, |last| 1 + last.joined.len());
            (kinds, waiters)
        };
        // The save hangs; loads come and their requests give up.
        for _ in 0..1000 {
            drop(Writes::behind(&log, "k").expect("a write is under way"));
        }
        assert_eq!(queue(&log), (vec!["barrier"], 1));
        // Loads that still wait share one barrier, which keeps only them.
        let mut waiting: Vec<Done> = (0..10)
            .map(|_| Writes::behind(&log, "k").unwrap())
            .collect();
        waiting.drain(..5);
        waiting.push(Writes::behind(&log, "k").unwrap());
        assert_eq!(queue(&log), (vec!["barrier"], 7));
        // A write decided after them lands after them, and a load after
        // that waits for it.
        let later = Writes::submit(&log, &store, save("b"));
        let mut after_later = Writes::behind(&log, "k").unwrap();
        assert_eq!(queue(&log).0, ["barrier", "save", "barrier"]);
        permits.add_permits(1);
        landed(first).await.unwrap();
        for done in waiting {
            landed(done).await.unwrap();
        }
        assert!(
            after_later.try_recv().is_err(),
            "the later save has no permit"
        );
        assert_eq!(
            inner.load("k").await.unwrap().unwrap().backend.as_str(),
            "a"
        );
        permits.add_permits(1);
        landed(later).await.unwrap();
        landed(after_later).await.unwrap();
        assert_eq!(
            inner.load("k").await.unwrap().unwrap().backend.as_str(),
            "b"
        );
        assert!(log.writes.queues.lock().is_empty());

        // Nor with loads and refreshes in turn: a barrier left behind
        // keeps no two refreshes apart.
        let stuck = Writes::submit(&log, &store, save("c"));
        for _ in 0..100 {
            drop(Writes::behind(&log, "k").unwrap());
            drop(Writes::submit(&log, &store, Write::Refresh("k".into())));
        }
        assert_eq!(queue(&log).0, ["refresh"]);
        permits.add_permits(1);
        landed(stuck).await.unwrap();
    }

    /// A save again writes the session as its owner keeps it when its
    /// turn comes, and nothing once the owner keeps it no more (this one
    /// keeps none). Queued behind a refresh, it replaces it (a refresh
    /// writes no record that is there), and a refresh after it joins it.
    #[tokio::test]
    async fn a_save_again_writes_only_what_its_owner_keeps() {
        let (store, inner, permits) = gated();
        let log = Arc::new(Log::default());
        let stuck = Writes::submit(&log, &store, Write::Save(Session::new("k", "a".into())));
        let refresh = || Write::Refresh("k".into());
        let queued = [
            Writes::submit(&log, &store, refresh()),
            Writes::submit(&log, &store, Write::Resave("k".into())),
            Writes::submit(&log, &store, refresh()),
        ];
        {
            let queues = log.writes.queues.lock();
            let queue = &queues["k"];
            assert_eq!(queue.len(), 1);
            assert!(matches!(&queue[0].write, Write::Resave(k) if k == "k"));
            assert_eq!(queue[0].joined.len(), 2);
        }
        permits.add_permits(1);
        landed(stuck).await.unwrap();
        for done in queued {
            landed(done).await.unwrap();
        }
        let stored = inner.load("k").await.unwrap().unwrap();
        assert_eq!(stored.backend.as_str(), "a", "the save again wrote nothing");
        assert!(log.failed.lock().is_empty());
    }

    #[tokio::test]
    async fn the_writes_that_joined_a_failed_one_learn_its_error() {
        let (store, _, permits) = gated();
        let log = Arc::new(Log::default());
        let down = || Write::Save(Session::new("k", "down".into()));
        let first = Writes::submit(&log, &store, down());
        let joined = [
            Writes::submit(&log, &store, down()),
            Writes::submit(&log, &store, Write::Refresh("k".into())),
        ];
        permits.add_permits(2);
        assert!(landed(first).await.unwrap_err().is_unavailable());
        for done in joined {
            let error = landed(done).await.unwrap_err();
            assert!(error.is_unavailable(), "{error}");
            let cause = std::error::Error::source(&error).expect("its cause");
            assert_eq!(cause.to_string(), "down");
            // The cause itself, not its text: a caller can still tell
            // what kind of failure it was.
            let io = crate::error::find::<std::io::Error>(&error).expect("an i/o error");
            assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        assert_eq!(*log.failed.lock(), ["save k", "save k"]);
    }

    #[tokio::test]
    async fn a_failed_write_is_heard_of_even_when_nobody_waits() {
        let (store, inner, permits) = gated();
        let log = Arc::new(Log::default());
        permits.add_permits(10);
        let failed = Writes::submit(&log, &store, Write::Save(Session::new("k", "down".into())));
        assert!(landed(failed).await.unwrap_err().is_unavailable());
        drop(Writes::submit(
            &log,
            &store,
            Write::Save(Session::new("j", "down".into())),
        ));
        let after = Writes::submit(&log, &store, Write::Save(Session::new("j", "a".into())));
        landed(after).await.unwrap();
        assert_eq!(*log.failed.lock(), ["save k", "save j"]);
        assert_eq!(
            inner.load("j").await.unwrap().unwrap().backend.as_str(),
            "a"
        );
    }

    /// Writes cut short by their runtime's shutdown (one under way, one
    /// waiting behind it) are reported as such, not as a store's panic.
    #[test]
    fn writes_cut_short_by_a_shutdown_say_so() {
        let (store, inner, _permits) = gated();
        let log = Arc::new(Log::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (save, delete) = runtime.block_on(async {
            let save = Writes::submit(&log, &store, Write::Save(Session::new("k", "a".into())));
            let delete = Writes::submit(&log, &store, Write::Delete("k".into()));
            // The save starts and waits for a permit that never comes.
            tokio::task::yield_now().await;
            (save, delete)
        });
        drop(runtime);
        for done in [save, delete] {
            let error = futures::executor::block_on(landed(done)).unwrap_err();
            let cause = std::error::Error::source(&error).unwrap().to_string();
            assert!(cause.contains("runtime shut down"), "{cause}");
        }
        assert_eq!(*log.failed.lock(), ["save k", "delete k"]);
        assert!(log.writes.queues.lock().is_empty());
        let stored = futures::executor::block_on(inner.load("k")).unwrap();
        assert!(stored.is_none());
    }

    /// Outside a runtime no write can run: each fails, and says so to its
    /// owner (counted and logged), not only to its waiter.
    #[test]
    fn writes_outside_a_runtime_fail_and_say_so() {
        let (store, inner, _permits) = gated();
        let log = Arc::new(Log::default());
        let save = Writes::submit(&log, &store, Write::Save(Session::new("k", "a".into())));
        let delete = Writes::submit(&log, &store, Write::Delete("j".into()));
        for done in [save, delete] {
            let error = futures::executor::block_on(landed(done)).unwrap_err();
            let cause = std::error::Error::source(&error).unwrap().to_string();
            assert!(cause.contains("tokio runtime"), "{cause}");
        }
        assert_eq!(*log.failed.lock(), ["save k", "delete j"]);
        let stored = futures::executor::block_on(inner.load("k")).unwrap();
        assert!(stored.is_none());
    }

    #[tokio::test]
    async fn a_store_that_panics_does_not_stop_the_key_for_good() {
        let (store, inner, permits) = gated();
        let log = Arc::new(Log::default());
        permits.add_permits(10);
        inner.save(&Session::new("k", "old".into())).await.unwrap();
        // Another key's store call panics as it is made.
        let at_once = Session::new("j", "panic at once".into());
        let panicked_at_once = Writes::submit(&log, &store, Write::Save(at_once));
        let panicked = Writes::submit(&log, &store, Write::Save(Session::new("k", "panic".into())));
        // Decided after the write that panics: still lands.
        let delete = Writes::submit(&log, &store, Write::Delete("k".into()));
        for panicked in [panicked_at_once, panicked] {
            let error = landed(panicked).await.unwrap_err();
            let cause = std::error::Error::source(&error).unwrap().to_string();
            assert!(cause.contains("panicked"), "its waiter learns it: {cause}");
        }
        landed(delete).await.unwrap();
        assert!(inner.load("k").await.unwrap().is_none(), "deleted");
        let mut failed = log.failed.lock().clone();
        failed.sort();
        assert_eq!(failed, ["save j", "save k"]);
        let after = Writes::submit(&log, &store, Write::Save(Session::new("k", "a".into())));
        after.await.unwrap().unwrap();
        assert_eq!(
            inner.load("k").await.unwrap().unwrap().backend.as_str(),
            "a"
        );
    }
}
