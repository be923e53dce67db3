//! The send timeout of response bodies (see `HttpClient::send_timeout`):
//! a body whose reader has left the frame it was handed for too long gives
//! up its connection and its place on the backend.
//!
//! A server forwarding a body asks for its next frame only once it can
//! send the last one: a client that stops reading (an HTTP/2 client that
//! grants a stream no more window, an HTTP/1 client whose socket no longer
//! drains) leaves the body unpolled, and a body that nobody polls cannot
//! time itself out. So a body that has handed out a frame, and is not at
//! its end, is watched by one task per client, which drops what the body
//! holds once the body has waited for the timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tokio::time::Instant;

/// The response bodies of one client that wait for their readers, and
/// whether a task watches them; what a body holds is a `T` (a
/// [`Core`](super::body::Core)).
pub(super) struct Stalls<T> {
    timeout: Duration,
    /// What [`Watch::out_since`] counts from.
    epoch: Instant,
    watched: Mutex<Watched<T>>,
}

struct Watched<T> {
    bodies: Vec<Arc<Watch<T>>>,
    /// A task watches `bodies` (set and cleared under this lock).
    sweeping: bool,
}

/// One watched body: what it holds, and since when its reader has left the
/// frame it was handed.
pub(super) struct Watch<T> {
    /// What the body holds; `None` once the timeout took it.
    held: Mutex<Option<T>>,
    /// Milliseconds from the epoch of [`Stalls`], plus one, at which the
    /// body handed out a frame and has not been polled since; 0 while it is
    /// not waiting for its reader.
    out_since: AtomicU64,
}

impl<T> Stalls<T> {
    /// Bodies given up once their reader has left a frame for `timeout`.
    pub(super) fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Stalls {
            timeout,
            epoch: Instant::now(),
            watched: Mutex::new(Watched {
                bodies: Vec::new(),
                sweeping: false,
            }),
        })
    }

    /// The timeout.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Milliseconds since the epoch, plus one (never 0).
    fn now(&self) -> u64 {
        let elapsed = Instant::now().saturating_duration_since(self.epoch);
        u64::try_from(elapsed.as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// How often the bodies are looked at: a body is given up between the
    /// timeout and the timeout and a quarter (a second at most) after its
    /// reader left it.
    fn tick(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(1), Duration::from_secs(1))
    }
}

impl<T: Send + 'static> Stalls<T> {
    /// Watches `held`, whose body has just handed out a frame. `Err` gives
    /// `held` back, outside a tokio runtime (no task could watch it).
    pub(super) fn watch(self: &Arc<Self>, held: T) -> Result<Arc<Watch<T>>, T> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(held);
        };
        let watch = Arc::new(Watch {
            held: Mutex::new(Some(held)),
            out_since: AtomicU64::new(self.now()),
        });
        let mut watched = self.watched.lock();
        watched.bodies.push(watch.clone());
        if !watched.sweeping {
            watched.sweeping = true;
            drop(watched);
            // Spawned with the lock gone: a runtime shutting down drops
            // the sweep at once, and its guard takes the lock.
            let sweeping = Sweeping {
                stalls: Arc::downgrade(self),
                ended: false,
            };
            runtime.spawn(sweep(sweeping, self.tick()));
        }
        Ok(watch)
    }

    /// Drops what the bodies that have waited for the timeout hold, and
    /// forgets the bodies dropped; whether any is left to watch. The list
    /// is walked without the lock that bodies take to join it.
    fn sweep(&self) -> bool {
        let now = self.now();
        let timeout = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        let stale = |watch: &Watch<T>| {
            let since = watch.out_since.load(Ordering::Relaxed);
            since != 0 && now.saturating_sub(since) >= timeout
        };
        let mut bodies = std::mem::take(&mut self.watched.lock().bodies);
        let mut cut = Vec::new();
        bodies.retain(|watch| {
            // Its body is gone.
            if Arc::strong_count(watch) == 1 {
                return false;
            }
            if !stale(watch) {
                return true;
            }
            // A poll holds this lock: once it is taken, a reader that came
            // back meanwhile shows.
            let mut held = watch.held.lock();
            if !stale(watch) {
                return true;
            }
            cut.extend(held.take());
            false
        });
        // The connections close, and the counts in flight come down.
        drop(cut);
        let mut watched = self.watched.lock();
        // With those that joined meanwhile.
        if watched.bodies.is_empty() {
            watched.bodies = bodies;
        } else {
            watched.bodies.append(&mut bodies);
        }
        let left = !watched.bodies.is_empty();
        if !left {
            watched.sweeping = false;
        }
        left
    }
}

impl<T> Watch<T> {
    /// What the body holds, locked for a poll: its reader is back.
    pub(super) fn polled(&self) -> MutexGuard<'_, Option<T>> {
        let held = self.held.lock();
        self.out_since.store(0, Ordering::Relaxed);
        held
    }

    /// What the body holds, locked.
    pub(super) fn held(&self) -> MutexGuard<'_, Option<T>> {
        self.held.lock()
    }

    /// Notes that the body handed out a frame, and waits for its reader.
    pub(super) fn handed_out(&self, stalls: &Stalls<T>) {
        self.out_since.store(stalls.now(), Ordering::Relaxed);
    }
}

/// Lets the next body start a sweep again should this one be dropped
/// before its end, also before it first ran (its runtime shut down).
struct Sweeping<T> {
    stalls: Weak<Stalls<T>>,
    ended: bool,
}

impl<T> Drop for Sweeping<T> {
    fn drop(&mut self) {
        if let Some(stalls) = self.stalls.upgrade().filter(|_| !self.ended) {
            stalls.watched.lock().sweeping = false;
        }
    }
}

/// Looks at the watched bodies every `tick`; ends when none is left or the
/// client is gone.
async fn sweep<T: Send + 'static>(mut sweeping: Sweeping<T>, tick: Duration) {
    loop {
        tokio::time::sleep(tick).await;
        let Some(stalls) = sweeping.stalls.upgrade() else {
            return;
        };
        if !stalls.sweep() {
            // Ended under the lock a new body takes: one that comes next
            // starts a new sweep.
            sweeping.ended = true;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts its drops.
    struct Held(Arc<AtomicUsize>);

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn held() -> (Held, Arc<AtomicUsize>) {
        let dropped = Arc::new(AtomicUsize::new(0));
        (Held(dropped.clone()), dropped)
    }

    async fn sleep(secs: f64) {
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_frame_left_out_for_the_timeout_gives_the_body_up() {
        let stalls = Stalls::new(Duration::from_secs(60));
        let (body, dropped) = held();
        let watch = stalls.watch(body).ok().unwrap();
        // A reader that takes each frame within the timeout, for ten
        // minutes.
        for _ in 0..10 {
            sleep(59.0).await;
            drop(watch.polled());
            watch.handed_out(&stalls);
        }
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        // Polled, and waiting for its backend: the read timeout's.
        drop(watch.polled());
        sleep(600.0).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        // A frame out, and its reader gone: given up within a second of
        // the timeout.
        watch.handed_out(&stalls);
        sleep(59.5).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        sleep(1.5).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        assert!(watch.polled().is_none());
        assert!(stalls.watched.lock().bodies.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_timeout_is_looked_at_every_quarter() {
        let stalls = Stalls::new(Duration::from_millis(100));
        let (body, dropped) = held();
        let _watch = stalls.watch(body).ok().unwrap();
        sleep(0.099).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        sleep(0.027).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_ends_with_its_last_body_and_starts_again() {
        let stalls = Stalls::new(Duration::from_secs(1));
        let (body, dropped) = held();
        let watch = stalls.watch(body).ok().unwrap();
        // The body is gone (it drops what it holds itself).
        drop(watch.held().take());
        drop(watch);
        sleep(0.5).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        {
            let watched = stalls.watched.lock();
            assert!(watched.bodies.is_empty() && !watched.sweeping);
        }
        let (body, dropped) = held();
        let _watch = stalls.watch(body).ok().unwrap();
        assert!(stalls.watched.lock().sweeping);
        sleep(1.5).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn outside_a_runtime_nothing_is_watched() {
        let stalls = Stalls::new(Duration::from_secs(1));
        let (body, dropped) = held();
        let Err(body) = stalls.watch(body) else {
            panic!("watched with no task to watch it");
        };
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        drop(body);
        assert!(stalls.watched.lock().bodies.is_empty());
    }

    #[test]
    fn a_sweep_its_runtime_dropped_lets_the_next_start() {
        let stalls = Stalls::new(Duration::from_secs(1));
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        let (body, _) = held();
        let first = runtime().block_on(async { stalls.watch(body).ok().unwrap() });
        // That runtime is gone, and its sweep with it.
        assert!(!stalls.watched.lock().sweeping);
        let (body, dropped) = held();
        runtime().block_on(async {
            let _watch = stalls.watch(body).ok().unwrap();
            sleep(1.5).await;
        });
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        drop(first);
    }
}
