//! Tasks the crate spawns on the caller's tokio runtime.

use tokio::task::JoinHandle;

/// A spawned task that ends when its handle is dropped: work the caller
/// gave up on does not run on unseen.
pub(crate) struct AbortOnDrop<T>(pub(crate) JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
