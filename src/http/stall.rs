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
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tokio::time::Instant;

use super::sweep::{self, Swept};
use crate::time::{elapsed, later, SHORTEST};
use crate::time::{from_nanos, to_nanos};

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
    /// A task watches `bodies` (see the `sweep` module).
    sweeping: bool,
}

/// One watched body: what it holds, and since when its reader has left the
/// frame it was handed.
pub(super) struct Watch<T> {
    /// What the body holds; `None` once the timeout took it.
    held: Mutex<Option<T>>,
    /// When the body handed out a frame and has not been polled since, as
    /// [`to_nanos`] from the epoch of [`Stalls`]; 0 while it is not
    /// waiting for its reader.
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

    /// How often the bodies are looked at: a body is given up between the
    /// timeout and the timeout and a quarter (a second at most) after its
    /// reader left it.
    fn tick(&self) -> Duration {
        (self.timeout / 4).clamp(SHORTEST, Duration::from_secs(1))
    }

    /// Whether the reader of `watch` has left its frame for the timeout at
    /// `now`.
    fn is_stale(&self, watch: &Watch<T>, now: Instant) -> bool {
        from_nanos(self.epoch, watch.out_since.load(Ordering::Relaxed))
            .is_some_and(|since| elapsed(since, now, self.timeout))
    }
}

impl<T: Send + 'static> Stalls<T> {
    /// Watches `held`, whose body has just handed out a frame. `Err` gives
    /// `held` back, outside a tokio runtime (no task could watch it).
    pub(super) fn watch(self: &Arc<Self>, held: T) -> Result<Arc<Watch<T>>, T> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(held);
        };
        let now = Instant::now();
        let watch = Arc::new(Watch {
            held: Mutex::new(Some(held)),
            out_since: AtomicU64::new(to_nanos(self.epoch, now)),
        });
        let mut watched = self.watched.lock();
        watched.bodies.push(watch.clone());
        if !watched.sweeping {
            watched.sweeping = true;
            drop(watched);
            sweep::spawn(&runtime, self, later(now, self.tick()));
        }
        Ok(watch)
    }
}

/// Drops what the bodies that have waited for the timeout hold, and
/// forgets the bodies dropped. The list is walked without the lock that
/// bodies take to join it.
impl<T: Send + 'static> Swept for Stalls<T> {
    fn round(&self, now: Instant) -> Option<Instant> {
        let mut bodies = std::mem::take(&mut self.watched.lock().bodies);
        let mut cut = Vec::new();
        bodies.retain(|watch| {
            // Its body is gone.
            if Arc::strong_count(watch) == 1 {
                return false;
            }
            if !self.is_stale(watch, now) {
                return true;
            }
            // A poll holds this lock: once it is taken, a reader that came
            // back meanwhile shows.
            let mut held = watch.held.lock();
            if !self.is_stale(watch, now) {
                return true;
            }
            cut.extend(held.take());
            false
        });
        // The connections close, and the counts in flight come down.
        drop(cut);
        let mut watched = self.watched.lock();
        // With those that joined meanwhile.
        bodies.append(&mut watched.bodies);
        watched.bodies = bodies;
        watched.sweeping = !watched.bodies.is_empty();
        watched.sweeping.then(|| later(now, self.tick()))
    }

    fn stopped(&self) {
        self.watched.lock().sweeping = false;
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
        let now = to_nanos(stalls.epoch, Instant::now());
        self.out_since.store(now, Ordering::Relaxed);
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
