//! Active probes: the [`Probe`] trait and the built-in HTTP and TCP probes.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::uri::{InvalidUri, PathAndQuery};
use http::{HeaderMap, Method, Request, Response, Uri};
use tower_service::Service;

use super::error::{ExpectedStatusesError, NoAddress, UnexpectedStatus};
use crate::backend::BackendId;
use crate::error::BoxError;

/// The boxed future a [`Probe`] returns: `Ok` when the backend passed.
pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'static>>;

/// Waits for `service` to be ready, then sends it `request`: a probe's
/// call.
pub(super) async fn send<S, R>(service: &mut S, request: R) -> Result<S::Response, BoxError>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    service.call(request).await.map_err(Into::into)
}

/// One health check of one backend.
///
/// The checker calls `probe` with the backend's id and its service (the one
/// in the pool) and applies its own timeout to the returned future. The
/// trait is object-safe: `Box<dyn Probe<S>>` and `Arc<dyn Probe<S>>` are
/// probes too. Any closure `Fn(&BackendId, &S) -> impl Future` becomes one
/// with [`probe_fn`].
pub trait Probe<S>: Send + Sync + 'static {
    /// Checks backend `id`, whose service is `service`.
    fn probe(&self, id: &BackendId, service: &S) -> ProbeFuture;
}

impl<S, P: Probe<S> + ?Sized> Probe<S> for Box<P> {
    fn probe(&self, id: &BackendId, service: &S) -> ProbeFuture {
        (**self).probe(id, service)
    }
}

impl<S, P: Probe<S> + ?Sized> Probe<S> for Arc<P> {
    fn probe(&self, id: &BackendId, service: &S) -> ProbeFuture {
        (**self).probe(id, service)
    }
}

/// `GET <path>` sent *through the backend's own service*; the backend
/// passes when the answer's status is expected (by default any 2xx).
///
/// Because the request goes through the same service the balancer calls,
/// the probe checks exactly the path requests take (the client, its
/// connection pool, any layers). The request has an origin-form URI
/// (`/healthz`); the backend's service is what knows its address, and an
/// `HttpBackend` with a base path puts it first, as for every request
/// (`/app/healthz` for a backend at `http://host/app`). The request body
/// is `B::default()`; the response body is not read.
pub struct HttpProbe<B> {
    path: PathAndQuery,
    expected: Vec<RangeInclusive<u16>>,
    headers: HeaderMap,
    _body: PhantomData<fn() -> B>,
}

impl<B> HttpProbe<B> {
    /// Probes `path`, a constant such as `"/healthz"`.
    ///
    /// # Panics
    ///
    /// When `path` is not a valid path (use [`try_new`](Self::try_new) for
    /// paths that are not constants).
    pub fn new(path: &'static str) -> Self {
        Self::with_path(PathAndQuery::from_static(path))
    }

    /// Probes `path`, or says why it is not a valid path.
    pub fn try_new(path: &str) -> Result<Self, InvalidUri> {
        Ok(Self::with_path(PathAndQuery::try_from(path)?))
    }

    fn with_path(path: PathAndQuery) -> Self {
        HttpProbe {
            path,
            expected: vec![200..=299],
            headers: HeaderMap::new(),
            _body: PhantomData,
        }
    }

    /// Passes on these statuses only (replacing the default `200..=299`).
    ///
    /// # Panics
    ///
    /// When the list is empty, or holds a range with no HTTP status in it
    /// (`299..=200`, or one outside `100..=999`), even beside others: a
    /// mistake that, alone, would fail every probe and every backend. For
    /// statuses read at run time,
    /// [`try_expected_statuses`](Self::try_expected_statuses) returns an
    /// error instead.
    pub fn expected_statuses(
        self,
        statuses: impl IntoIterator<Item = RangeInclusive<u16>>,
    ) -> Self {
        self.try_expected_statuses(statuses)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`expected_statuses`](Self::expected_statuses) for statuses read at
    /// run time: an error instead of a panic when the list is empty
    /// ([`Empty`](ExpectedStatusesError::Empty)) or holds a range with no
    /// HTTP status in it ([`NoStatus`](ExpectedStatusesError::NoStatus),
    /// the first such range).
    pub fn try_expected_statuses(
        mut self,
        statuses: impl IntoIterator<Item = RangeInclusive<u16>>,
    ) -> Result<Self, ExpectedStatusesError> {
        let expected: Vec<_> = statuses.into_iter().collect();
        if expected.is_empty() {
            return Err(ExpectedStatusesError::Empty);
        }
        let holds_none =
            |r: &&RangeInclusive<u16>| r.is_empty() || *r.end() < 100 || *r.start() > 999;
        if let Some(range) = expected.iter().find(holds_none) {
            return Err(ExpectedStatusesError::NoStatus(range.clone()));
        }
        self.expected = expected;
        Ok(self)
    }

    /// Adds a header to every probe request (a token, say). Through an
    /// `HttpBackend` a `Host` set here is replaced by the backend's
    /// authority (or the host it was given with `HttpBackend::host`),
    /// unless the backend has `preserve_host(true)`.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// The probed path.
    pub fn path(&self) -> &str {
        self.path.as_str()
    }

    /// Whether `status` passes.
    pub fn is_expected(&self, status: http::StatusCode) -> bool {
        let s = status.as_u16();
        self.expected.iter().any(|r| r.contains(&s))
    }
}

impl<B> Clone for HttpProbe<B> {
    fn clone(&self) -> Self {
        HttpProbe {
            path: self.path.clone(),
            expected: self.expected.clone(),
            headers: self.headers.clone(),
            _body: PhantomData,
        }
    }
}

impl<B> fmt::Debug for HttpProbe<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpProbe")
            .field("path", &self.path)
            .field("expected", &self.expected)
            .finish()
    }
}

impl<S, B, RB> Probe<S> for HttpProbe<B>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Default + Send + 'static,
{
    fn probe(&self, _id: &BackendId, service: &S) -> ProbeFuture {
        let mut request = Request::new(B::default());
        *request.method_mut() = Method::GET;
        *request.uri_mut() = Uri::from(self.path.clone());
        request.headers_mut().extend(self.headers.clone());
        let mut service = service.clone();
        let expected = self.expected.clone();
        Box::pin(async move {
            let response = send(&mut service, request).await?;
            let status = response.status();
            drop(response);
            if expected.iter().any(|r| r.contains(&status.as_u16())) {
                Ok(())
            } else {
                Err(UnexpectedStatus::new(status).into())
            }
        })
    }
}

/// Where a [`TcpProbe`] connects to for each backend.
type Resolve = dyn Fn(&BackendId) -> Option<SocketAddr> + Send + Sync;

/// A TCP connect to the backend's address: the backend passes when the
/// connection is accepted. The connection is closed at once.
///
/// The address of each backend comes from a closure or a map; a backend
/// without an address fails with [`NoAddress`].
#[derive(Clone)]
pub struct TcpProbe {
    resolve: Arc<Resolve>,
}

impl TcpProbe {
    /// Connects to the address `resolve` gives for each backend.
    pub fn new<F>(resolve: F) -> Self
    where
        F: Fn(&BackendId) -> Option<SocketAddr> + Send + Sync + 'static,
    {
        TcpProbe {
            resolve: Arc::new(resolve),
        }
    }

    /// Connects to the address listed for each backend.
    pub fn from_map<K: Into<BackendId>>(addrs: impl IntoIterator<Item = (K, SocketAddr)>) -> Self {
        let map: HashMap<BackendId, SocketAddr> =
            addrs.into_iter().map(|(k, a)| (k.into(), a)).collect();
        TcpProbe::new(move |id| map.get(id).copied())
    }
}

impl fmt::Debug for TcpProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpProbe").finish_non_exhaustive()
    }
}

impl<S> Probe<S> for TcpProbe {
    fn probe(&self, id: &BackendId, _service: &S) -> ProbeFuture {
        let addr = (self.resolve)(id);
        let id = id.clone();
        Box::pin(async move {
            let addr = addr.ok_or_else(|| NoAddress::new(id))?;
            tokio::net::TcpStream::connect(addr).await?;
            Ok(())
        })
    }
}

/// A probe from a closure: see [`probe_fn`].
#[derive(Clone)]
pub struct ProbeFn<F> {
    f: F,
}

/// Makes a probe of a closure that receives the backend's id and service.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use tower_ha::health::probe_fn;
/// use tower_ha::BackendId;
///
/// let up = Arc::new(AtomicBool::new(true));
/// let probe = probe_fn(move |_id: &BackendId, _svc: &()| {
///     let up = up.load(Ordering::Relaxed);
///     async move { if up { Ok(()) } else { Err("down".into()) } }
/// });
/// # let _: &dyn tower_ha::health::Probe<()> = &probe;
/// ```
pub fn probe_fn<F>(f: F) -> ProbeFn<F> {
    ProbeFn { f }
}

impl<F> fmt::Debug for ProbeFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeFn").finish_non_exhaustive()
    }
}

impl<S, F, Fut> Probe<S> for ProbeFn<F>
where
    F: Fn(&BackendId, &S) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    fn probe(&self, id: &BackendId, service: &S) -> ProbeFuture {
        Box::pin((self.f)(id, service))
    }
}
