//! Bounds on waits for something the code under test must do, so that a
//! regression fails the test instead of hanging it.

use std::future::IntoFuture;
use std::time::Duration;

/// The bound of [`bounded`], on paused time. Far longer than any wait a
/// test means: when nothing else is pending, paused time jumps straight
/// to it, so a wait that can never end fails at once.
pub const PAUSED_LIMIT: Duration = Duration::from_secs(3600);

/// The bound of [`bounded_real`] and [`spin_until`], in real time: long
/// enough for a loaded machine, short enough to fail rather than hang.
pub const REAL_LIMIT: Duration = Duration::from_secs(30);

/// Awaits `fut` for at most [`PAUSED_LIMIT`] of (paused) tokio time;
/// panics naming `what` if it has not completed by then.
pub async fn bounded<F: IntoFuture>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(PAUSED_LIMIT, fut).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: never happened (waited {PAUSED_LIMIT:?} of tokio time)"),
    }
}

/// Awaits `fut` for at most [`REAL_LIMIT`]; panics naming `what` if it has
/// not completed by then. For tests on real time.
pub async fn bounded_real<F: IntoFuture>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(REAL_LIMIT, fut).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: not within {REAL_LIMIT:?}"),
    }
}

/// Yields to the runtime until `done` holds, for at most [`REAL_LIMIT`];
/// panics naming `what` otherwise. For tests on real time (on paused time
/// a task that keeps yielding never lets the clock move).
pub async fn spin_until(what: &str, mut done: impl FnMut() -> bool) {
    bounded_real(what, async {
        while !done() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}
