use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::ResponseFuture;
use super::hooks::RestoreReport;
use super::layer::StickyLayer;
use super::shared::{Shared, Start};
use super::stats::StickyStats;
use crate::error::BoxError;
use crate::store::{Session, StoreError};

/// Keeps each session on the backend that holds its state.
///
/// Built by [`StickyLayer`]; every `Sticky` a layer builds (and every
/// clone) shares one session table, one store and one set of counters.
///
/// On a request, `Sticky` reads the session key and, when the session is
/// known and its backend available, sets [`Affinity`](crate::extensions::Affinity)
/// so the balancer below tries that backend first. On the response it
/// reads [`ServedBy`](crate::extensions::ServedBy): a new session is bound
/// to the backend that served it, and a known session served by another
/// backend (its own was unavailable, failed, or a failover layer retried
/// elsewhere) moves there, once, with its record saved, a `tracing` event
/// and the `on_move` hook.
///
/// # Readiness
///
/// `poll_ready` is the inner service's. When a session must first be
/// loaded from the store (a key the table does not know, in either
/// availability mode), the ready inner service is moved into the response
/// future and a clone takes its place, so the inner service is never
/// called without having been polled ready.
pub struct Sticky<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Sticky<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Sticky { inner, shared }
    }

    /// A layer for `ServiceBuilder` stacks; same as [`StickyLayer::new`].
    pub fn layer<P: Send + Sync + 'static>(
        pool: &crate::Pool<P>,
        key: super::SessionKey,
    ) -> StickyLayer {
        StickyLayer::new(pool, key)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming `self`.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The layer's counters.
    pub fn stats(&self) -> StickyStats {
        self.shared.stats()
    }

    /// The session `key` as the table knows it.
    pub fn session(&self, key: &str) -> Option<Session> {
        self.shared.session(key)
    }

    /// Loads every stored session and restores it: calls the `on_restore`
    /// hook for each (when one is set) and routes those that succeed to
    /// their backend. A session whose hook fails keeps its stored record.
    /// A key the store lists more than once is restored once, from the last
    /// of its records; the earlier ones are reported as skipped. What
    /// standalone availability runs at start.
    ///
    /// Requests may be served meanwhile. In standalone mode, until its hook
    /// has run, a session loaded here is routed as one whose restore failed:
    /// to its record's backend, whatever its cookie names, and moved off it
    /// only as any session is, in memory (its record neither read nor
    /// written). The restore keeps such a move: it puts the session where
    /// it moved, with the record's data, and saves it. If the future is
    /// dropped part-way, the sessions not yet restored stay so until a
    /// later `restore`. A session the table read or saved since the load is kept
    /// rather than the older record. A session ended
    /// ([`remove`](Self::remove)) or forgotten ([`forget`](Self::forget),
    /// [`forget_all`](Self::forget_all): another replica moved it) since
    /// the restore began to list the store is not put back from its listed
    /// record, nor is its hook run: its next request reads the store. It is
    /// in neither of the report's lists.
    pub async fn restore(&self) -> Result<RestoreReport, StoreError> {
        self.shared.restore().await
    }

    /// Ends session `key`: forgets it and deletes its stored record. A
    /// request that read the record meanwhile does not bring it back into
    /// the table, nor does a [`restore`](Self::restore) under way (the
    /// session is then in neither of its report's lists). Returns whether
    /// the table knew it. The session is forgotten at once; dropping the
    /// future before the delete lands (a client that left) does not stop
    /// the delete, nor what follows it.
    pub async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.shared.remove(key).await
    }

    /// Saves once more the sessions whose last save failed, and waits until
    /// every write to the store the layer has queued, or has under way, has
    /// landed or failed, and every `on_move` hook called or due has ended,
    /// as
    /// [`StickyLayer::flush`](super::StickyLayer::flush) does.
    pub async fn flush(&self) {
        self.shared.flush().await
    }

    /// Drops what the layer's table knows about session `key`, keeping its
    /// stored record, as [`StickyLayer::forget`](super::StickyLayer::forget)
    /// does. Returns whether the table knew it.
    pub fn forget(&self, key: &str) -> bool {
        self.shared.forget(key)
    }

    /// Drops every session whose record the layer's table follows, keeping
    /// the stored records and the sessions held in memory only, as
    /// [`StickyLayer::forget_all`](super::StickyLayer::forget_all) does;
    /// returns how many it dropped.
    pub fn forget_all(&self) -> usize {
        self.shared.forget_all()
    }
}

impl<S: Clone> Clone for Sticky<S> {
    fn clone(&self) -> Self {
        Sticky {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Sticky<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sticky")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, B, RB> Service<Request<B>> for Sticky<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.shared.start(&mut req) {
            Start::Call(track) => {
                let path = self.shared.learns_on(&req);
                let future = self.inner.call(req);
                ResponseFuture::called(self.shared.clone(), track, path, future)
            }
            Start::Load {
                key,
                cookie,
                unread,
                load,
            } => {
                // A clone, driven to readiness once the session is read:
                // a load may take seconds, and the readiness this service
                // holds (a place under a concurrency limit, a buffer's
                // slot) is left for the next request.
                let clone = self.inner.clone();
                ResponseFuture::loading(self.shared.clone(), key, cookie, unread, load, clone, req)
            }
            Start::Refuse(error) => ResponseFuture::refused(self.shared.clone(), error.into()),
        }
    }
}
