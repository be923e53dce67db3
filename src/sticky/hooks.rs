//! The application's hooks: told when a session moves, asked to restore a
//! session at start.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::backend::BackendId;
use crate::error::BoxError;
use crate::store::{Session, Skipped};

/// The boxed future a hook returns.
pub(crate) type HookFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'static>>;

pub(crate) type OnMove = Arc<dyn Fn(SessionMoved) -> HookFuture + Send + Sync>;
pub(crate) type OnRestore = Arc<dyn Fn(Session) -> HookFuture + Send + Sync>;

pub(crate) fn on_move<F, Fut>(f: F) -> OnMove
where
    F: Fn(SessionMoved) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    Arc::new(move |moved| Box::pin(f(moved)))
}

pub(crate) fn on_restore<F, Fut>(f: F) -> OnRestore
where
    F: Fn(Session) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    Arc::new(move |session| Box::pin(f(session)))
}

/// The `on_move` hooks of moves decided and not yet ended, which
/// [`StickyLayer::flush`](super::StickyLayer::flush) waits for.
#[derive(Default)]
pub(crate) struct Running {
    count: AtomicUsize,
    ended: tokio::sync::Notify,
}

impl Running {
    /// Counts the hook of `key`'s move until the guard returned is dropped.
    pub(crate) fn start(self: &Arc<Self>, key: Arc<str>, hidden: bool) -> RunningHook {
        self.count.fetch_add(1, Ordering::AcqRel);
        RunningHook {
            running: self.clone(),
            key,
            hidden,
            ended: false,
        }
    }

    /// Waits until no hook is counted.
    pub(crate) async fn idle(&self) {
        loop {
            // Told of an end that comes after this check.
            let ended = self.ended.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// A hook counted in [`Running`]. Dropped before it is marked
/// [`ended`](Self::ended), it says that the hook was cut short: its task
/// stopped with its runtime.
pub(crate) struct RunningHook {
    running: Arc<Running>,
    key: Arc<str>,
    hidden: bool,
    ended: bool,
}

impl RunningHook {
    /// Its session, as logs show it.
    pub(crate) fn shown(&self) -> super::shared::Shown<'_> {
        super::shared::Shown::new(&self.key, self.hidden)
    }

    pub(crate) fn ended(mut self) {
        self.ended = true;
    }
}

impl Drop for RunningHook {
    fn drop(&mut self) {
        // A hook that panicked has been reported by its task.
        if !self.ended && !std::thread::panicking() {
            let session = self.shown();
            tracing::warn!(target: super::shared::TARGET, %session, "on_move hook cut short: dropped before it ended (its runtime shut down, or, outside a runtime, its response was dropped)");
        }
        if self.running.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.running.ended.notify_waiters();
        }
    }
}

/// Why a session moved to another backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MoveReason {
    /// Its backend was unavailable: unhealthy, ejected or disabled (a
    /// draining backend still serves its sessions while it is healthy and
    /// not ejected).
    Unavailable,
    /// Its backend is no longer in the pool.
    Removed,
    /// The last request sent to its backend failed.
    Failed,
    /// A lower layer (failover) had the request served by another backend.
    ServedElsewhere,
}

impl MoveReason {
    /// A short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Unavailable => "unavailable",
            MoveReason::Removed => "removed",
            MoveReason::Failed => "failed",
            MoveReason::ServedElsewhere => "served_elsewhere",
        }
    }
}

impl fmt::Display for MoveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the `on_move` hook is told: the session as now saved (on its new
/// backend, with its application data), where it was, and why it moved.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionMoved {
    /// The session, on its new backend.
    pub session: Session,
    /// The backend it left.
    pub from: BackendId,
    /// Why it moved.
    pub reason: MoveReason,
}

/// What [`Sticky::restore`](super::Sticky::restore) did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RestoreReport {
    /// The keys of the sessions restored (now routed to their backend).
    pub restored: Vec<String>,
    /// The sessions whose restore hook failed. Their stored records are
    /// kept, so a later restore (or another replica) can try again.
    pub failed: Vec<RestoreFailure>,
    /// The stored records the store could not read, and the earlier
    /// records of a key the store listed more than once (`is_corrupt`,
    /// named by the key; its last record was restored or failed as any
    /// other): do not delete the stored records of these keys unseen.
    pub skipped: Vec<Skipped>,
}

/// A session whose restore hook failed.
#[derive(Debug)]
#[non_exhaustive]
pub struct RestoreFailure {
    /// The session's key.
    pub key: String,
    /// Its backend.
    pub backend: BackendId,
    /// The hook's error.
    pub error: BoxError,
}
