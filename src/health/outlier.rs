//! Passive outlier detection: the per-backend bookkeeping of the health
//! layer and the pool-wide cap on ejections.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::backend::{BackendId, BackendState};
use crate::classify::{Classifier, Outcome};
use crate::control::{emit, Event, Events, WeakEvents};
use crate::error::not_the_backends;
use crate::extensions::Target;
use crate::time::Throttle;

/// The passive detection settings, copied into every wrapped backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutlierConfig {
    pub(crate) consecutive_failures: u32,
    pub(crate) base_ejection_time: Duration,
    pub(crate) max_ejection_time: Duration,
    pub(crate) max_ejection_percent: u32,
    pub(crate) success_rate: Option<SuccessRate>,
    /// Every this long a backend spends not ejected, the multiplier of its
    /// next ejection time drops by one.
    pub(crate) ejection_decay: Duration,
}

/// Success-rate ejection: ejects a backend whose share of successful
/// requests over a window falls below a minimum, once it served enough
/// requests in that window to judge.
///
/// It catches a backend that fails often but not in a row (say one request
/// in three), which consecutive-failure detection lets through. Unlike
/// Envoy's statistical variant (a host against the mean of the cluster),
/// the minimum is an absolute share: simple to reason about, and it needs
/// no pool-wide statistics on the request path. Ejections it causes count
/// towards the same cap and the same growing ejection time.
///
/// ```
/// use std::time::Duration;
/// use tower_ha::health::{HealthLayer, SuccessRate};
///
/// // Eject a backend below 90 % success over 10 s, judged from 50 requests.
/// let layer = HealthLayer::new().success_rate(
///     SuccessRate::new(0.9).min_requests(50).window(Duration::from_secs(10)),
/// );
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuccessRate {
    min_permille: u32,
    min_requests: u32,
    window: Duration,
}

impl SuccessRate {
    /// Ejects below `min_success_rate` (`0.0..=1.0`, clamped) of successful
    /// requests, judged over windows of 10 s with at least 100 requests
    /// (Envoy's request volume and interval).
    pub fn new(min_success_rate: f64) -> Self {
        SuccessRate {
            min_permille: crate::balance::share_to_permille(min_success_rate),
            min_requests: 100,
            window: Duration::from_secs(10),
        }
    }

    /// Judges a window only when it saw at least this many requests
    /// (default 100; 0 counts as 1).
    #[must_use]
    pub fn min_requests(mut self, requests: u32) -> Self {
        self.min_requests = requests.max(1);
        self
    }

    /// The length of a window (default 10 s; at least 1 s, as a shorter
    /// one holds too few requests to judge a rate by).
    #[must_use]
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window.max(Duration::from_secs(1));
        self
    }
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            success_rate: None,
            ejection_decay: Duration::from_secs(10),
        }
    }
}

impl OutlierConfig {
    /// How long an ejection lasts with multiplier `backoff` (at least 1):
    /// `min(base × backoff, max)`.
    pub(crate) fn ejection_time(&self, backoff: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(backoff.max(1))
            .min(self.max_ejection())
    }

    /// The longest ejection: the configured maximum, or the base time if
    /// it is longer, so that an ejection always lasts at least the base
    /// time.
    fn max_ejection(&self) -> Duration {
        self.max_ejection_time.max(self.base_ejection_time)
    }
}

/// The multiplier of a backend's ejection time, after Envoy's per-host
/// `eject_time_backoff`: one more on each ejection (until the time it
/// gives reaches the maximum), one less for every decay interval the
/// backend spends not ejected. Envoy decrements it on a timer; here the
/// decay is counted when the next ejection comes, from the deadline of the
/// previous one.
#[derive(Debug, Default)]
struct Backoff {
    multiplier: u32,
    /// The deadline of the previous ejection, if any.
    last_until: Option<Instant>,
}

impl Backoff {
    /// The multiplier, and the duration, of an ejection that starts at
    /// `now`.
    fn next(&self, now: Instant, config: &OutlierConfig) -> (u32, Duration) {
        let mut multiplier = self.multiplier;
        if let Some(until) = self.last_until {
            let clean = now.saturating_duration_since(until).as_nanos();
            let intervals = clean / config.ejection_decay.as_nanos().max(1);
            multiplier = multiplier.saturating_sub(u32::try_from(intervals).unwrap_or(u32::MAX));
        }
        let (base, max) = (config.base_ejection_time, config.max_ejection());
        if base.saturating_mul(multiplier) < max.saturating_add(base) {
            multiplier = multiplier.saturating_add(1);
        }
        (multiplier, config.ejection_time(multiplier))
    }
}

/// The pool-wide view the ejection cap needs, shared by a layer and all its
/// clones: how many backends they wrap, and which of them are ejected.
#[derive(Debug, Default)]
pub(crate) struct Ejections {
    /// Backends wrapped by the layer and alive (one per `layer()` call).
    backends: AtomicUsize,
    /// Backends this layer ejected, with their watch's liveness token;
    /// pruned of expired or lifted ejections, and of backends no longer
    /// wrapped (their service dropped, even while a pool keeps their state
    /// for a while), whenever a new ejection is considered.
    ejected: Mutex<Vec<(Weak<BackendState>, Weak<()>)>>,
    /// The last refusal by the cap, and until when it stands: a backend
    /// the cap keeps in goes on failing, and each failure past its
    /// threshold asks again; it is answered from here, without the count
    /// over every ejected backend.
    refusing: Mutex<Option<Refusal>>,
    /// The warnings of refusals: one a period for the layer, with the
    /// count held back (each one is counted in its backend's state).
    refusal_warnings: Throttle,
}

/// A refusal by the cap (see `Ejections::refusing`).
#[derive(Debug, Clone, Copy)]
struct Refusal {
    /// The first ejection in force ends then, or a second after the
    /// refusal, whichever comes first: a place freed otherwise (an
    /// ejection lifted, a backend added) is seen within a second.
    until: Instant,
    /// The cap it was counted for: clones of a layer may set their own.
    max_percent: u32,
    ejected: usize,
    allowed: usize,
}

/// How long a refusal by the cap stands at most.
const RECOUNT_CAP_AFTER: Duration = Duration::from_secs(1);

/// Why an ejection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The backend is ejected already.
    AlreadyEjected,
    /// The share of ejected backends is at its maximum.
    Cap { ejected: usize, allowed: usize },
}

impl Ejections {
    /// Ejects `state` until `until` unless the cap forbids it. At most
    /// `max_percent` of the wrapped backends are ejected at once, but always
    /// at least one may be.
    /// `alive` lives as long as the watch of `state`'s service: the
    /// ejection counts while both do.
    pub(crate) fn try_eject(
        &self,
        state: &Arc<BackendState>,
        alive: &Arc<()>,
        max_percent: u32,
        until: Instant,
    ) -> Result<(), Refused> {
        if state.is_ejected() {
            return Err(Refused::AlreadyEjected);
        }
        let now = Instant::now();
        let refusing = *self.refusing.lock();
        if let Some(refusal) = refusing.filter(|r| now < r.until && r.max_percent == max_percent) {
            return Err(Refused::Cap {
                ejected: refusal.ejected,
                allowed: refusal.allowed,
            });
        }
        let mut ejected = self.ejected.lock();
        ejected
            .retain(|(s, w)| w.strong_count() > 0 && s.upgrade().is_some_and(|s| s.is_ejected()));
        if state.is_ejected() {
            return Err(Refused::AlreadyEjected);
        }
        let backends = self.backends.load(Ordering::Acquire);
        let allowed = (backends.saturating_mul(max_percent.min(100) as usize) / 100).max(1);
        // Backends, not entries: one taken over by a new watch while its
        // former one lived has an entry of each. Sorted, they sit side by
        // side: a count in O(E log E), where comparing each entry with
        // those before it was O(E²) under this lock, at every failure of
        // a backend the cap keeps in.
        ejected.sort_unstable_by_key(|(s, _)| s.as_ptr());
        let count = ejected.len()
            - ejected
                .windows(2)
                .filter(|pair| pair[0].0.ptr_eq(&pair[1].0))
                .count();
        if count >= allowed {
            let first_end = ejected
                .iter()
                .filter_map(|(s, _)| s.upgrade()?.ejected_until())
                .min();
            let recount = crate::time::later(now, RECOUNT_CAP_AFTER);
            *self.refusing.lock() = Some(Refusal {
                until: first_end.map_or(recount, |end| end.min(recount)),
                max_percent,
                ejected: count,
                allowed,
            });
            return Err(Refused::Cap {
                ejected: count,
                allowed,
            });
        }
        state.eject_until(until);
        ejected.push((Arc::downgrade(state), Arc::downgrade(alive)));
        Ok(())
    }

    /// Counts an ejection in force that a watch took over (see
    /// [`try_eject`](Self::try_eject) for `alive`), also while the watch
    /// that ejected lives on: it may go first.
    fn adopt(&self, state: &Arc<BackendState>, alive: &Arc<()>) {
        let mut ejected = self.ejected.lock();
        let counted = ejected.iter().any(|(s, w)| {
            std::ptr::eq(w.as_ptr(), Arc::as_ptr(alive))
                && std::ptr::eq(s.as_ptr(), Arc::as_ptr(state))
        });
        if !counted {
            ejected.push((Arc::downgrade(state), Arc::downgrade(alive)));
        }
    }
}

/// One wrapped backend: shared by every clone of its `Health` service.
/// Counts as one backend of its layer for as long as it lives.
#[derive(Debug)]
pub(crate) struct Watch<C> {
    pub(crate) config: OutlierConfig,
    pub(crate) classifier: Arc<C>,
    ejections: Arc<Ejections>,
    /// Set when this layer ejected the backend, until the first outcome
    /// seen after the ejection ended: the restoration is reported then,
    /// unless the ejection's timer (see `report_end_at`) cleared and
    /// reported it already.
    ejected: AtomicBool,
    /// The multiplier of the next ejection's time.
    backoff: Mutex<Backoff>,
    /// Success-rate window: its start (nanoseconds since `epoch`), and the
    /// requests and failures seen in it.
    window_start: AtomicU64,
    window_requests: AtomicU32,
    window_failures: AtomicU32,
    epoch: Instant,
    events: Option<Events>,
    /// Whether the classifier counts a per-try timeout as a failure, asked
    /// once.
    pub(crate) timeouts_fail: OnceLock<bool>,
    /// The backend this watch observes, as the last request's `Target`
    /// named it, so that readiness failures (which carry no request) can be
    /// counted too; `target_key` is its state's address, compared on each
    /// request so that the lock is taken only when the backend changes (a
    /// service inserted again under a new state).
    target: Mutex<Option<Target>>,
    target_key: AtomicUsize,
    /// Dropped with the watch: an ejection it made stops counting towards
    /// the cap then.
    alive: Arc<()>,
}

impl<C> Watch<C> {
    pub(crate) fn new(
        config: OutlierConfig,
        classifier: Arc<C>,
        ejections: Arc<Ejections>,
        events: Option<Events>,
    ) -> Self {
        ejections.backends.fetch_add(1, Ordering::AcqRel);
        Watch {
            config,
            classifier,
            ejections,
            ejected: AtomicBool::new(false),
            backoff: Mutex::new(Backoff::default()),
            window_start: AtomicU64::new(0),
            window_requests: AtomicU32::new(0),
            window_failures: AtomicU32::new(0),
            epoch: Instant::now(),
            events,
            timeouts_fail: OnceLock::new(),
            target: Mutex::new(None),
            target_key: AtomicUsize::new(0),
            alive: Arc::new(()),
        }
    }

    /// Notes the backend a request was sent to.
    #[inline]
    pub(crate) fn learn(&self, target: &Target) {
        // The stored `Target` keeps its state alive, so no other state can
        // reuse its address meanwhile.
        let key = Arc::as_ptr(target.state()) as usize;
        if self.target_key.load(Ordering::Relaxed) != key {
            // Both under the lock: of two requests naming different
            // states, the last to take it leaves its target and its key.
            let mut stored = self.target.lock();
            *stored = Some(target.clone());
            self.target_key.store(key, Ordering::Relaxed);
            // A backend back in the pool with its state (discovery dropped
            // it for a while), ejected by the watch of its former service:
            // this one reports the ejection's end if its timer did not (no
            // runtime), and counts it towards the cap while it lasts.
            let state = target.state();
            if state.has_uncleared_ejection() {
                if state.is_ejected() {
                    self.ejections.adopt(state, &self.alive);
                }
                self.ejected.store(true, Ordering::Release);
            }
        }
    }

    /// The backend the last request was sent to, if any.
    pub(crate) fn known_target(&self) -> Option<Target> {
        self.target.lock().clone()
    }

    /// Records the outcome of one request sent to `target`.
    pub(crate) fn observe(&self, target: &Target, failed: bool) {
        let state = target.state();
        if self.ejected.load(Ordering::Relaxed)
            && !state.is_ejected()
            && self.ejected.swap(false, Ordering::AcqRel)
        {
            // Lifted early (a passing probe), the ejection's end was
            // reported by whoever lifted it.
            if state.take_expired_ejection() {
                self.report_end(target);
            } else if state.has_uncleared_ejection() {
                // Between the check and the swap, another request reported
                // that ejection's end and a failure ejected the backend
                // again: the end of this one is still to report.
                self.ejected.store(true, Ordering::Release);
            }
        }
        if let Some(rate) = self.config.success_rate {
            // Like a failure in a row below, an outcome that ends while the
            // backend is ejected is not towards its next ejection: that
            // takes a window of new outcomes (see `eject`).
            if !state.is_ejected() {
                self.observe_rate(target, failed, rate);
            }
        }
        if !failed {
            state.record_success();
            return;
        }
        if state.is_ejected() {
            // In flight when it was ejected, or sent by panic routing: not
            // towards its next ejection. Were it counted and reset at the
            // ejection's end, a failure seen at that moment by another
            // request than the one resetting could come first, and eject
            // the backend again on its own; the count starts at 0 at the
            // ejection (see `eject`) and stays there until it ends.
            state.count_failure();
            return;
        }
        let failures = state.record_failure();
        if failures < self.config.consecutive_failures {
            return;
        }
        self.eject(target, "consecutive failures", failures);
    }

    /// Counts the outcome in the current window and, when the window is
    /// over, judges it and starts the next. A window whose end was more
    /// than a window ago (the backend then took no request: drained,
    /// unhealthy, or quiet) is not judged: its outcomes are old, and the
    /// next window starts with this one.
    fn observe_rate(&self, target: &Target, failed: bool, rate: SuccessRate) {
        self.window_requests.fetch_add(1, Ordering::AcqRel);
        if failed {
            self.window_failures.fetch_add(1, Ordering::AcqRel);
        }
        let now = self.since_epoch();
        let start = self.window_start.load(Ordering::Acquire);
        let window = crate::time::nanos(rate.window);
        let elapsed = now.saturating_sub(start);
        if elapsed < window
            || self
                .window_start
                .compare_exchange(start, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let requests = self.window_requests.swap(0, Ordering::AcqRel);
        let failures = self.window_failures.swap(0, Ordering::AcqRel).min(requests);
        if elapsed >= window.saturating_mul(2) {
            self.window_requests.fetch_add(1, Ordering::AcqRel);
            if failed {
                self.window_failures.fetch_add(1, Ordering::AcqRel);
            }
            return;
        }
        let successes = u64::from(requests - failures);
        if requests >= rate.min_requests
            && successes * 1000 < u64::from(rate.min_permille) * u64::from(requests)
            && !target.state().is_ejected()
        {
            self.eject(target, "success rate", failures);
        }
    }

    /// Nanoseconds since `epoch`.
    fn since_epoch(&self) -> u64 {
        crate::time::nanos_since(self.epoch, Instant::now())
    }

    /// Reports the end of the ejection of `target` that this watch cleared.
    fn report_end(&self, target: &Target) {
        report_restored(self.events.as_ref(), target.id(), EJECTION_ENDED);
    }

    /// Clears the ejection of `target` that runs out at `until`, and
    /// reports its end, at that instant: a backend that gets no request
    /// (the backup of an active-passive group that does not fail back, one
    /// the failover layer steers around) is seen restored too, and a
    /// failback to it comes after its restoration. Without a tokio runtime
    /// the end is reported at the first outcome after it, as it is also
    /// when the timer has not run yet.
    fn report_end_at(&self, target: &Target, until: Instant) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Not keeping the state: one gone from the pool counts no more
        // against the cap once nothing else holds it.
        let (id, state) = (target.id().clone(), Arc::downgrade(target.state()));
        // Nor the event stream: its subscribers see it close once every
        // other handle is gone, not at the end of the longest ejection.
        let events = self.events.as_ref().map(Events::downgrade);
        runtime.spawn(async move {
            // Wakes now and then before the end, so that an ejection lifted
            // early (by a probe) does not leave its timer waiting for the
            // deadline, which may be years away.
            loop {
                let wake = until.min(crate::time::later(Instant::now(), TIMER_CHECK));
                tokio::time::sleep_until(wake).await;
                if wake >= until {
                    break;
                }
                // Lifted, or replaced by another ejection, which has a timer
                // of its own: nothing to report.
                if !state
                    .upgrade()
                    .is_some_and(|state| state.is_ejected_until(until))
                {
                    return;
                }
            }
            // Lifted before (by a probe) or followed by another ejection:
            // not this one's end to report.
            if state
                .upgrade()
                .is_some_and(|state| state.take_expired_ejection())
            {
                let events = events.as_ref().and_then(WeakEvents::upgrade);
                report_restored(events.as_ref(), &id, EJECTION_ENDED);
            }
        });
    }

    fn eject(&self, target: &Target, reason: &'static str, failures: u32) {
        let state = target.state();
        // An ejection that ran out but that no one has cleared yet (the
        // watch that ejected, or another, has not seen its end) ends here,
        // before a new one replaces it unreported.
        if state.take_expired_ejection() {
            self.report_end(target);
        }
        let nth = state.ejections().saturating_add(1);
        let now = Instant::now();
        let mut backoff = self.backoff.lock();
        let (multiplier, duration) = backoff.next(now, &self.config);
        let until = crate::time::later(now, duration);
        match self
            .ejections
            .try_eject(state, &self.alive, self.config.max_ejection_percent, until)
        {
            Ok(()) => {
                *backoff = Backoff {
                    multiplier,
                    last_until: Some(until),
                };
                drop(backoff);
                // The next ejection needs as many new failures in a row,
                // or a window of new outcomes.
                state.record_success();
                if self.config.success_rate.is_some() {
                    self.window_start
                        .store(self.since_epoch(), Ordering::Release);
                    self.window_requests.store(0, Ordering::Release);
                    self.window_failures.store(0, Ordering::Release);
                }
                self.ejected.store(true, Ordering::Release);
                tracing::warn!(
                    backend = %target.id(),
                    from = "available",
                    to = "ejected",
                    reason,
                    failures,
                    ejection = nth,
                    duration_ms = duration.as_millis() as u64,
                    "backend ejected"
                );
                emit(self.events.as_ref(), || Event::Ejected {
                    backend: target.id().clone(),
                    reason: reason.into(),
                    ejection: nth,
                    duration,
                });
                self.report_end_at(target, until);
            }
            Err(Refused::Cap { ejected, allowed }) => {
                drop(backoff);
                state.count_refused_ejection();
                match self.ejections.refusal_warnings.pass() {
                    Some(held_back) => tracing::warn!(
                        backend = %target.id(),
                        reason,
                        failures,
                        ejected,
                        allowed,
                        held_back,
                        "ejection refused: too many backends ejected (max_ejection_percent); the backend stays in (held_back: refusals not logged at warn level since the last warning)"
                    ),
                    None => tracing::debug!(
                        backend = %target.id(),
                        reason,
                        failures,
                        ejected,
                        allowed,
                        "ejection refused: too many backends ejected"
                    ),
                }
            }
            Err(Refused::AlreadyEjected) => {}
        }
    }
}

impl<C: Classifier> Watch<C> {
    /// Records an outcome of a request sent to `target` as the classifier
    /// judges it. A request refused as [`InvalidRequest`](crate::error::InvalidRequest) (the request's
    /// fault, not the backend's), or that met its connection's graceful
    /// close ([`GoingAway`](crate::error::GoingAway)), records nothing, neither a failure nor a
    /// success.
    pub(crate) fn record(&self, target: &Target, outcome: &Outcome<'_>) {
        if let Outcome::Error(e) = outcome {
            if not_the_backends(*e) {
                return;
            }
        }
        self.observe(target, self.classifier.is_failure(outcome));
    }
}

/// What a [`LateOutcome`] reports to: a [`Watch`], whatever its classifier.
#[cfg(feature = "hyper-client")]
pub(crate) trait Observe: Send + Sync {
    fn observe(&self, target: &Target, failed: bool);
    fn record(&self, target: &Target, outcome: &Outcome<'_>);
}

#[cfg(feature = "hyper-client")]
impl<C: Classifier> Observe for Watch<C> {
    fn observe(&self, target: &Target, failed: bool) {
        Watch::observe(self, target, failed);
    }

    fn record(&self, target: &Target, outcome: &Outcome<'_>) {
        Watch::record(self, target, outcome);
    }
}

/// The outcome of a response whose head the classifier passed, reported
/// once its body ends: a response body from an
/// [`HttpBackend`](crate::http::HttpBackend) holds it until then. Dropped,
/// it reports a success (the body was read to its end, or its reader went
/// away, which is not the backend's doing); [`failed`](Self::failed) has
/// the classifier judge the error that failed the body, and
/// [`discard`](Self::discard) reports nothing.
///
/// It holds its watch weakly: a backend removed from its pool while one of
/// its bodies is still read no longer counts towards the ejection cap.
#[cfg(feature = "hyper-client")]
pub(crate) struct LateOutcome {
    target: Target,
    /// Taken once the outcome is reported.
    watch: Option<Weak<dyn Observe>>,
    /// The outcome of a health layer further down (a group of backends
    /// with health of its own behind one with health of its own), for the
    /// same body.
    below: Option<Box<LateOutcome>>,
}

#[cfg(feature = "hyper-client")]
impl LateOutcome {
    pub(crate) fn new(target: Target, watch: Weak<dyn Observe>) -> Self {
        LateOutcome {
            target,
            watch: Some(watch),
            below: None,
        }
    }

    /// This outcome, and `below` with it.
    pub(crate) fn over(mut self, below: LateOutcome) -> Self {
        debug_assert!(self.below.is_none(), "a fresh outcome goes over another");
        self.below = Some(Box::new(below));
        self
    }

    /// Reports a body that failed with `error`, as the classifier judges
    /// it (a failure of the request's own body records nothing).
    pub(crate) fn failed(mut self, error: &(dyn std::error::Error + Send + Sync + 'static)) {
        if let Some(watch) = self.watch.take().and_then(|w| w.upgrade()) {
            watch.record(&self.target, &Outcome::Error(error));
        }
        if let Some(below) = self.below.take() {
            below.failed(error);
        }
    }

    /// Reports nothing: the body ended in a way that says nothing of its
    /// backend.
    pub(crate) fn discard(mut self) {
        self.watch = None;
        if let Some(below) = self.below.take() {
            below.discard();
        }
    }
}

#[cfg(feature = "hyper-client")]
impl Drop for LateOutcome {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.take().and_then(|w| w.upgrade()) {
            watch.observe(&self.target, false);
        }
    }
}

impl<C> Drop for Watch<C> {
    fn drop(&mut self) {
        self.ejections.backends.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How often the timer of an ejection's end looks whether the ejection
/// was lifted early, when it ends later than that (see `report_end_at`).
const TIMER_CHECK: Duration = Duration::from_secs(60);

/// Why an ejection that ran out ended.
const EJECTION_ENDED: &str = "ejection ended";

/// Reports the end of `backend`'s ejection, for `reason`.
pub(super) fn report_restored(events: Option<&Events>, backend: &BackendId, reason: &'static str) {
    tracing::info!(
        backend = %backend,
        from = "ejected",
        to = "available",
        reason,
        "backend restored"
    );
    emit(events, || Event::Restored {
        backend: backend.clone(),
        reason: reason.into(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cap counts backends: one ejection counted by two watches (the
    /// second took it over) is one backend.
    #[tokio::test(start_paused = true)]
    async fn the_cap_counts_a_backend_with_two_entries_once() {
        let ejections = Ejections::default();
        ejections.backends.store(20, Ordering::Release);
        // 10 % of 20: two may be ejected at once.
        let until = Instant::now() + Duration::from_secs(30);
        let states: Vec<_> = (0..3).map(|_| Arc::new(BackendState::default())).collect();
        let (first, second) = (Arc::new(()), Arc::new(()));
        ejections.try_eject(&states[0], &first, 10, until).unwrap();
        ejections.adopt(&states[0], &second);
        assert_eq!(ejections.ejected.lock().len(), 2);
        ejections.try_eject(&states[1], &first, 10, until).unwrap();
        assert_eq!(
            ejections.try_eject(&states[2], &first, 10, until),
            Err(Refused::Cap {
                ejected: 2,
                allowed: 2
            })
        );
    }

    #[test]
    fn a_success_rate_window_is_at_least_a_second() {
        assert_eq!(
            SuccessRate::new(0.9).window(Duration::ZERO).window,
            Duration::from_secs(1)
        );
        let long = Duration::from_secs(60);
        assert_eq!(SuccessRate::new(0.9).window(long).window, long);
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let c = OutlierConfig::default();
        assert_eq!(c.ejection_time(1), Duration::from_secs(30));
        assert_eq!(c.ejection_time(3), Duration::from_secs(90));
        assert_eq!(c.ejection_time(10), Duration::from_secs(300));
        assert_eq!(c.ejection_time(u32::MAX), Duration::from_secs(300));
        // A maximum below the base time (zero, say) is the base time.
        for max in [Duration::ZERO, Duration::from_secs(10)] {
            let c = OutlierConfig {
                max_ejection_time: max,
                ..OutlierConfig::default()
            };
            assert_eq!(c.ejection_time(1), Duration::from_secs(30));
            assert_eq!(c.ejection_time(5), Duration::from_secs(30));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_multiplier_stops_growing_at_the_maximum_and_decays() {
        let c = OutlierConfig {
            max_ejection_time: Duration::from_secs(100),
            ..OutlierConfig::default()
        };
        let now = Instant::now();
        let mut backoff = Backoff::default();
        let mut seen = Vec::new();
        for _ in 0..6 {
            let (multiplier, duration) = backoff.next(now, &c);
            seen.push((multiplier, duration.as_secs()));
            backoff = Backoff {
                multiplier,
                last_until: Some(now),
            };
        }
        // Grows while 30 × m < 100 + 30, then stays.
        assert_eq!(
            seen,
            [(1, 30), (2, 60), (3, 90), (4, 100), (5, 100), (5, 100)]
        );
        // One less per whole 10 s since the previous deadline, before the
        // ejection adds one.
        let later = |s| now + Duration::from_secs(s);
        assert_eq!(backoff.next(later(9), &c).0, 5);
        assert_eq!(backoff.next(later(10), &c).0, 5);
        assert_eq!(backoff.next(later(39), &c).0, 3);
        assert_eq!(backoff.next(later(1_000), &c).0, 1);
    }

    /// Three backends wrapped by one layer, and their states.
    fn three(ejections: &Arc<Ejections>) -> (Vec<Watch<()>>, Vec<Arc<BackendState>>) {
        let watch = || {
            Watch::new(
                OutlierConfig::default(),
                Arc::new(()),
                ejections.clone(),
                None,
            )
        };
        let states = (0..3).map(|_| Arc::new(BackendState::new(1))).collect();
        ((0..3).map(|_| watch()).collect(), states)
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_always_allows_one_and_counts_live_backends() {
        let ejections = Arc::new(Ejections::default());
        let (watches, states) = three(&ejections);
        let until = Instant::now() + Duration::from_secs(60);
        let eject = |i: usize, state: &Arc<BackendState>| {
            ejections.try_eject(state, &watches[i].alive, 10, until)
        };
        assert_eq!(eject(0, &states[0]), Ok(()));
        assert_eq!(eject(0, &states[0]), Err(Refused::AlreadyEjected));
        let cap = Err(Refused::Cap {
            ejected: 1,
            allowed: 1,
        });
        assert_eq!(eject(1, &states[1]), cap);
        // A lifted ejection frees its place, seen once the refusal has
        // stood for its second.
        states[0].uneject();
        assert_eq!(eject(1, &states[1]), cap);
        tokio::time::advance(RECOUNT_CAP_AFTER - Duration::from_millis(1)).await;
        assert_eq!(eject(1, &states[1]), cap);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(eject(1, &states[1]), Ok(()));
        // So does a backend that is gone, still ejected.
        let mut states = states;
        drop(states.remove(1));
        assert_eq!(eject(2, &states[1]), Ok(()));
        drop(watches);
        assert_eq!(ejections.backends.load(Ordering::Relaxed), 0);
    }

    /// A backend whose service is gone (a pool may keep its state, ejected,
    /// for a while) is no longer wrapped: its ejection stops counting, as
    /// the backend itself does.
    #[tokio::test(start_paused = true)]
    async fn an_ejection_of_a_backend_no_longer_wrapped_frees_its_place() {
        let ejections = Arc::new(Ejections::default());
        let (mut watches, states) = three(&ejections);
        let until = Instant::now() + Duration::from_secs(1);
        assert_eq!(
            ejections.try_eject(&states[0], &watches[0].alive, 10, until),
            Ok(())
        );
        drop(watches.remove(0));
        assert!(states[0].is_ejected());
        assert_eq!(
            ejections.try_eject(&states[1], &watches[0].alive, 10, until),
            Ok(())
        );
    }
}
