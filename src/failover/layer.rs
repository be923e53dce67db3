use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tower::retry::budget::Budget;
use tower_layer::Layer;

use super::budget::RetryBudget;
use super::grpc;
use super::policy::Backoff;
use super::service::Failover;
use super::stats::{Counters, FailoverStats};
use crate::classify::{Classifier, DefaultClassifier};
use crate::control::Events;
use crate::extensions::Picked;

/// The default retry budget: retries may add 20 % to the requests, plus a
/// floor of 3 retries per second whatever the traffic, accrued over 10 s
/// windows (see [`RetryBudget`]).
pub(crate) fn default_budget() -> Arc<dyn Budget + Send + Sync> {
    Arc::new(RetryBudget::default())
}

/// A request's overall deadline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limit {
    /// From the request's call.
    pub(crate) after: Duration,
    /// Whether it is the client's `grpc-timeout` (else the layer's).
    pub(crate) client: bool,
    /// Whether each attempt's `grpc-timeout` is set to the time left.
    pub(crate) tell: bool,
}

/// What a [`Failover`] does, shared by its clones.
#[derive(Clone)]
pub(crate) struct Config<C> {
    pub(crate) classifier: C,
    pub(crate) max_attempts: usize,
    pub(crate) per_try_timeout: Option<Duration>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) budget: Option<Arc<dyn Budget + Send + Sync>>,
    pub(crate) backoff: Backoff,
    pub(crate) retry_non_idempotent: bool,
    pub(crate) grpc_timeout: bool,
    pub(crate) events: Option<Events>,
    pub(crate) counters: Arc<Counters>,
}

impl Config<DefaultClassifier> {
    pub(crate) fn new() -> Self {
        Config {
            classifier: DefaultClassifier::new(),
            max_attempts: usize::MAX,
            per_try_timeout: None,
            deadline: None,
            budget: Some(default_budget()),
            backoff: Backoff::none(),
            retry_non_idempotent: false,
            grpc_timeout: false,
            events: None,
            counters: Arc::default(),
        }
    }
}

impl<C> Config<C> {
    /// The deadline of a request with `headers`: the layer's, or the
    /// client's `grpc-timeout` when it is read and shorter.
    pub(crate) fn limit(&self, headers: &HeaderMap) -> Option<Limit> {
        let client = match self.grpc_timeout {
            true => headers.get(grpc::GRPC_TIMEOUT).and_then(grpc::parse),
            false => None,
        };
        let Some(client) = client else {
            return self.deadline.map(|after| Limit {
                after,
                client: false,
                tell: false,
            });
        };
        Some(match self.deadline {
            Some(after) if after <= client => Limit {
                after,
                client: false,
                tell: true,
            },
            _ => Limit {
                after: client,
                client: true,
                tell: true,
            },
        })
    }

    /// Whether attempts may pause between them: the balancer is asked
    /// whether a retry could find a backend before one waits for it.
    pub(crate) fn pauses(&self) -> bool {
        !self.backoff.is_none()
    }

    /// The slot an attempt's pick is recorded in. It asks whether a retry
    /// could find another backend when a pause would precede one that may
    /// follow (`retry_may_follow`).
    pub(crate) fn slot(&self, retry_may_follow: bool) -> Picked {
        let slot = Picked::new();
        if retry_may_follow && self.pauses() {
            slot.ask_others();
        }
        slot
    }
}

impl<C> fmt::Debug for Config<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max_attempts: &dyn fmt::Debug = if self.max_attempts == usize::MAX {
            &"every available backend"
        } else {
            &self.max_attempts
        };
        f.debug_struct("Config")
            // Any closure is a classifier: its type's name, not its value.
            .field("classifier", &std::any::type_name::<C>())
            .field("max_attempts", max_attempts)
            .field("per_try_timeout", &self.per_try_timeout)
            .field("deadline", &self.deadline)
            .field("budget", &self.budget.is_some())
            .field("backoff", &self.backoff)
            .field("retry_non_idempotent", &self.retry_non_idempotent)
            .field("grpc_timeout", &self.grpc_timeout)
            .field("events", &self.events.is_some())
            .finish()
    }
}

/// Builds [`Failover`] services: retries failed requests on other backends.
///
/// Defaults:
///
/// | setting | default |
/// |---|---|
/// | [`classifier`](Self::classifier) | [`DefaultClassifier`]: errors, 502, 503, 504, gRPC 14 in the head |
/// | [`max_attempts`](Self::max_attempts) | every available backend once |
/// | [`per_try_timeout`](Self::per_try_timeout) | none |
/// | [`deadline`](Self::deadline) | none |
/// | [`budget`](Self::budget) | [`RetryBudget::default`]: 20 % of requests plus 3 retries per second, accrued over 10 s windows |
/// | [`backoff`](Self::backoff) | none |
/// | [`retry_non_idempotent`](Self::retry_non_idempotent) | `false` |
/// | [`grpc_timeout`](Self::grpc_timeout) | `false` |
///
/// Every service built by one layer (and every clone of it) shares the
/// layer's budget and its counters ([`stats`](Self::stats)).
#[derive(Clone)]
pub struct FailoverLayer<C = DefaultClassifier> {
    config: Config<C>,
}

impl<C> fmt::Debug for FailoverLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverLayer")
            .field("config", &self.config)
            .finish()
    }
}

impl Default for FailoverLayer {
    fn default() -> Self {
        FailoverLayer::new()
    }
}

impl FailoverLayer {
    /// A layer with the defaults above.
    pub fn new() -> Self {
        FailoverLayer {
            config: Config::new(),
        }
    }
}

impl<C> FailoverLayer<C> {
    /// Decides which attempts failed (see [`classify`](crate::classify));
    /// any `Fn(&Outcome<'_>) -> bool` works.
    pub fn classifier<C2: Classifier>(self, classifier: C2) -> FailoverLayer<C2> {
        let c = self.config;
        FailoverLayer {
            config: Config {
                classifier,
                max_attempts: c.max_attempts,
                per_try_timeout: c.per_try_timeout,
                deadline: c.deadline,
                budget: c.budget,
                backoff: c.backoff,
                retry_non_idempotent: c.retry_non_idempotent,
                grpc_timeout: c.grpc_timeout,
                events: c.events,
                counters: c.counters,
            },
        }
    }

    /// At most `attempts` attempts per request, the first one included
    /// (at least 1). By default every available backend is tried once.
    pub fn max_attempts(mut self, attempts: usize) -> Self {
        self.config.max_attempts = attempts.max(1);
        self
    }

    /// Abandons an attempt that has not answered within `timeout`: its
    /// future is dropped, so the backend gets no more of the request, and
    /// the next backend is tried. Requests must then be called within a
    /// Tokio runtime with its time driver enabled.
    ///
    /// The timeout runs until the response head: once a backend has
    /// answered with its status and headers, the response is returned and
    /// its body is not timed (a backend that stalls in the middle of its
    /// body is not bounded by this layer; `HttpBackend` bounds it with its
    /// client's `read_timeout`).
    ///
    /// It runs from the attempt's call: it includes a wait in the
    /// balancer's queue and the connection's opening inside `HttpBackend`,
    /// and an attempt that times out counts as a failure of its backend
    /// for the health layer. So choose it above the `HttpClient`'s
    /// `connect_timeout`. An attempt timed out while `HttpBackend` was
    /// still opening its connection was never sent, and is retried whatever
    /// the request's method. One timed out while it waited in the
    /// balancer's queue had no backend yet (every one it may use was full):
    /// the attempts end there, and
    /// [`Exhausted::reason`](super::Exhausted::reason) is the
    /// [`TimedOut`](super::TimedOut).
    ///
    /// A streamed upload (a body over [`BufferBodyLayer`]'s limit) is not
    /// counted, as in Envoy: while the backend waits for the client's next
    /// frame, the timeout waits, and it runs from the upload's end, so a
    /// slow client does not get a backend timed out. A backend that stops
    /// reading while the client has more to send is timed from the last
    /// frame it took. The client's slowness is bounded by the backend
    /// client instead (`HttpClient::read_timeout`), and by the
    /// [`deadline`](Self::deadline).
    ///
    /// [`BufferBodyLayer`]: super::BufferBodyLayer
    ///
    /// A zero `timeout` means none (the default), rather than one that
    /// abandons every attempt, and every backend with it.
    pub fn per_try_timeout(mut self, timeout: Duration) -> Self {
        self.config.per_try_timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// Gives up once `deadline` has passed since the request was called,
    /// whatever the attempts left. Requests must then be called within a
    /// Tokio runtime with its time driver enabled. The call comes after
    /// any [`BufferBodyLayer`](super::BufferBodyLayer) in front has read
    /// the body (or its first limit's worth): that reading is not counted.
    ///
    /// The deadline runs until the response head, like the per-try timeout:
    /// the body of a response already returned is not bounded by it.
    ///
    /// A zero `deadline` means none (the default), rather than one that
    /// fails every request.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.config.deadline = (!deadline.is_zero()).then_some(deadline);
        self
    }

    /// Limits retries with `budget` (each request deposits, each retry
    /// withdraws): a [`RetryBudget`] with your own ratio and floor, or
    /// tower's [`TpsBudget`](tower::retry::budget::TpsBudget).
    pub fn budget(mut self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.config.budget = Some(Arc::new(budget));
        self
    }

    /// Retries without a budget: only the attempt limit and the deadline
    /// bound them.
    pub fn no_budget(mut self) -> Self {
        self.config.budget = None;
        self
    }

    /// Pauses before each retry. A pause is a Tokio timer: requests must
    /// then be called within a Tokio runtime with its time driver enabled.
    ///
    /// A retry that `Balance` says no backend is left for is not paused
    /// for: the last failure comes back at once. A retry is paid for from
    /// the [budget](Self::budget) before its pause, so one the budget
    /// refuses is not paused for either.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Retries non-idempotent requests (`POST`, `PATCH`, ...) after any
    /// failure, not only when they are known not to have been sent. Use it
    /// only when every route behind this layer tolerates a repeat; to opt in
    /// per request, use [`RetryNonIdempotent`](super::RetryNonIdempotent).
    pub fn retry_non_idempotent(mut self, retry: bool) -> Self {
        self.config.retry_non_idempotent = retry;
        self
    }

    /// Also ends the attempts of a gRPC call when its client's deadline
    /// passes: a request with a valid `grpc-timeout` header (say `2S` or
    /// `500m`) gets that time as its [`deadline`](Self::deadline) when it
    /// is shorter than the layer's. The client gives up then, and a retry
    /// after it would only load a backend for nobody. So a client can
    /// shorten the layer's deadline, never lengthen it.
    ///
    /// Each backend is told the time it has: a retry carries the time left
    /// in its own `grpc-timeout`, and so does the first attempt when the
    /// layer's deadline is the shorter one, so that the backend does not
    /// work on past it. When the deadline passes, the
    /// [`DeadlineExceeded`](super::DeadlineExceeded) error says whose it
    /// was ([`is_grpc_timeout`](super::DeadlineExceeded::is_grpc_timeout)).
    /// As any deadline, it does not count against the backend the attempt
    /// was at (a per-try timeout does).
    /// A header the gRPC protocol does not allow (more than eight digits,
    /// an unknown unit, zero) is passed on as it is and read as absent.
    ///
    /// Off by default, as in Envoy (`grpc_timeout_header_max`), since
    /// reading the header costs every request a lookup. Without a
    /// deadline or a per-try timeout, a timer is set only for requests
    /// that carry a valid one; requests must then be called within a Tokio
    /// runtime with its time driver enabled.
    pub fn grpc_timeout(mut self, read: bool) -> Self {
        self.config.grpc_timeout = read;
        self
    }

    /// Also emits every failover and every request whose attempts all
    /// failed into `events`
    /// ([`Event::FailoverAttempt`](crate::control::Event::FailoverAttempt),
    /// [`Event::AttemptsExhausted`](crate::control::Event::AttemptsExhausted)).
    pub fn events(mut self, events: Events) -> Self {
        self.config.events = Some(events);
        self
    }

    /// The counters of every service this layer (or a clone of it) built.
    pub fn stats(&self) -> FailoverStats {
        self.config.counters.snapshot()
    }

    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.config.counters
    }
}

impl<S, C: Clone> Layer<S> for FailoverLayer<C> {
    type Service = Failover<S, C>;

    fn layer(&self, inner: S) -> Failover<S, C> {
        Failover::from_config(inner, Arc::new(self.config.clone()))
    }
}
