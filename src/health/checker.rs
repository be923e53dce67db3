//! Active health checking: one background task per pool.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::time::{earliest, elapsed, later};

use super::error::{ProbePanicked, ProbeTimeout};
use super::probe::Probe;
use super::slow_start::SlowStart;
use crate::backend::{AdminStatus, BackendId, BackendState, HealthStatus};
use crate::control::{emit, Event, Events};
use crate::error::BoxError;
use crate::pool::{Pool, Rebuild, Snapshot, StartUnhealthy};
use crate::serial::Serial;
use crate::time::SHORTEST;

/// The active checking settings (their defaults are also a configuration
/// file's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckConfig {
    pub(crate) interval: Duration,
    unhealthy_interval: Option<Duration>,
    pub(crate) timeout: Duration,
    jitter: Duration,
    pub(crate) rise: u32,
    pub(crate) fall: u32,
    turned_off_after: Option<Duration>,
    removed_after: Option<Duration>,
    slow_start: Option<SlowStart>,
    start_unhealthy: bool,
    pub(crate) lift_ejections: bool,
    pub(crate) close_tunnels_when_down: bool,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            interval: Duration::from_secs(2),
            unhealthy_interval: None,
            timeout: Duration::from_secs(1),
            jitter: Duration::from_millis(100),
            rise: 2,
            fall: 3,
            turned_off_after: None,
            removed_after: None,
            slow_start: None,
            start_unhealthy: false,
            lift_ejections: true,
            close_tunnels_when_down: false,
        }
    }
}

/// Probes every backend of a [`Pool`] in the background and keeps their
/// [`HealthStatus`](crate::HealthStatus) up to date; see the [module docs](super) for the rules.
///
/// Defaults (HAProxy's `inter 2s rise 2 fall 3`): a probe every 2 s (plus up
/// to 100 ms of jitter), a 1 s timeout, healthy after 2 passing probes in a
/// row, unhealthy after 3 failing ones; no turning off, no removal, no slow
/// start. Backends start as the pool made them (healthy) and are judged by
/// their first probes, sent at once; see
/// [`start_unhealthy`](Self::start_unhealthy).
///
/// [`spawn`](Self::spawn) starts the task and returns a [`CheckerHandle`]
/// that stops it when dropped.
#[must_use = "the checker probes nothing until it is spawned"]
pub struct HealthChecker<S, P> {
    pool: Pool<S>,
    probe: P,
    config: CheckConfig,
    events: Option<Events>,
}

impl<S, P> fmt::Debug for HealthChecker<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthChecker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, P> HealthChecker<S, P>
where
    S: Clone + Send + Sync + 'static,
    P: Probe<S>,
{
    /// Checks the backends of `pool` with `probe`.
    pub fn new(pool: Pool<S>, probe: P) -> Self {
        HealthChecker {
            pool,
            probe,
            config: CheckConfig::default(),
            events: None,
        }
    }

    /// Time between the starts of two probes of a healthy backend (default
    /// 2 s; at least 1 ms).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.config.interval = interval.max(SHORTEST);
        self
    }

    /// Time between probes of a backend that is not healthy, usually
    /// shorter so that it comes back sooner (HAProxy's `downinter`; default:
    /// the interval; at least 1 ms).
    pub fn unhealthy_interval(mut self, interval: Duration) -> Self {
        self.config.unhealthy_interval = Some(interval.max(SHORTEST));
        self
    }

    /// A probe that takes longer fails (default 1 s; at least 1 ms, so
    /// that a zero does not fail every probe that is not ready at once).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout.max(SHORTEST);
        self
    }

    /// Adds a random delay of up to `jitter` to every interval, so that
    /// probes of many backends or replicas do not synchronize (default
    /// 100 ms).
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.config.jitter = jitter;
        self
    }

    /// A backend that is not healthy becomes healthy after this many
    /// passing probes in a row (default 2; 0 counts as 1).
    pub fn rise(mut self, rise: u32) -> Self {
        self.config.rise = rise.max(1);
        self
    }

    /// A healthy backend becomes unhealthy after this many failing probes
    /// in a row (default 3; 0 counts as 1).
    pub fn fall(mut self, fall: u32) -> Self {
        self.config.fall = fall.max(1);
        self
    }

    /// Marks a backend [`TurnedOff`](HealthStatus::TurnedOff) once it has been
    /// unhealthy this long, if a probe has found it healthy at least once
    /// (a passing probe while it was healthy, or `rise` of them in a row).
    /// It keeps being probed and comes back after `rise` passing probes. Off
    /// by default.
    pub fn turned_off_after(mut self, after: Duration) -> Self {
        self.config.turned_off_after = Some(after);
        self
    }

    /// Removes a backend from the pool once it has been unhealthy (or
    /// turned off) this long, if a probe has found it healthy at least once
    /// (as for [`turned_off_after`](Self::turned_off_after)), unless the
    /// operator disabled it or is draining it (a removal would forget
    /// that). Time out of the pool does not count. Off by default.
    pub fn removed_after(mut self, after: Duration) -> Self {
        self.config.removed_after = Some(after);
        self
    }

    /// Ramps the weight of backends that join the pool or recover.
    pub fn slow_start(mut self, slow_start: SlowStart) -> Self {
        self.config.slow_start = Some(slow_start);
        self
    }

    /// Marks backends the checker has not seen pass yet unhealthy (those
    /// in the pool as [`spawn`](Self::spawn) returns that have not served
    /// a request yet, and those added later, from the moment they join),
    /// so they take traffic only after `rise` passing probes in a row (the
    /// Panda API gateway started them unhealthy too, but needed one pass:
    /// `rise(1)`; Envoy likewise needs one pass for a new host). By
    /// default they keep the health the pool gave them (healthy), and lose
    /// it after `fall` failing probes (HAProxy takes a new server down at
    /// its first failed check). A backend that leaves the pool and comes
    /// back with its state (see [`Pool::keep_removed_for`]) is not marked
    /// again: the checker takes it up where it left it. Nor is a state the pool did not make (one
    /// shared with another pool, [`Pool::insert_with_state`]).
    ///
    /// A [`Priority`](crate::balance::Priority) group does not fail over
    /// from a primary that waits for its first passing probes: its backups
    /// serve meanwhile, and it takes over once it passes.
    ///
    /// This initial mark emits neither a `tracing` event nor an
    /// [`Event::HealthChanged`]; the changes after it, such as the backend
    /// becoming healthy, do.
    ///
    /// `Balance`'s panic routing still applies: while fewer than its
    /// threshold of the backends are available (at start, none may be),
    /// it routes to every enabled backend, as Envoy does. To refuse
    /// requests until backends pass instead, set
    /// [`Balance::panic_threshold`](crate::balance::Balance::panic_threshold)
    /// to `0.0`.
    pub fn start_unhealthy(mut self, start_unhealthy: bool) -> Self {
        self.config.start_unhealthy = start_unhealthy;
        self
    }

    /// Whether a passing probe lifts a passive ejection of its backend
    /// (default `true`, Envoy's `successful_active_health_check_uneject_host`).
    /// Turn it off when the probe proves less than requests do: a TCP
    /// connect passes on a backend that accepts connections and then hangs
    /// or answers 503, and would bring it back within one interval of each
    /// ejection. Without it an ejection runs its time
    /// ([`HealthLayer`](super::HealthLayer)'s backoff).
    ///
    /// ```
    /// # use tower_ha::health::{HealthChecker, TcpProbe};
    /// # use tower_ha::Pool;
    /// # let pool: Pool<()> = Pool::new();
    /// let checker = HealthChecker::new(pool, TcpProbe::from_map([("a", ([10, 0, 0, 7], 8080).into())]))
    ///     .lift_ejections(false);
    /// # drop(checker);
    /// ```
    pub fn lift_ejections(mut self, lift: bool) -> Self {
        self.config.lift_ejections = lift;
        self
    }

    /// Whether a backend the probes mark unhealthy also has its tunnels
    /// closed (default `false`): the connections that switched protocols
    /// through it, such as WebSockets, which otherwise stay open until an
    /// end closes them (see [`BackendState::close_tunnels`]). HAProxy's
    /// `on-marked-down shutdown-sessions`, Envoy's
    /// `close_connections_on_host_health_failure`. Turn it on when the
    /// clients reconnect on a close, so that they reach a live backend at
    /// once instead of waiting on a dead one.
    ///
    /// ```
    /// # use tower_ha::health::{HealthChecker, TcpProbe};
    /// # use tower_ha::Pool;
    /// # let pool: Pool<()> = Pool::new();
    /// let checker = HealthChecker::new(pool, TcpProbe::from_map([("a", ([10, 0, 0, 7], 8080).into())]))
    ///     .close_tunnels_when_down(true);
    /// # drop(checker);
    /// ```
    ///
    /// [`BackendState::close_tunnels`]: crate::BackendState::close_tunnels
    pub fn close_tunnels_when_down(mut self, close: bool) -> Self {
        self.config.close_tunnels_when_down = close;
        self
    }

    /// Also emits every change of health, restoration and removal into
    /// `events` ([`Event::HealthChanged`], [`Event::Restored`],
    /// [`Event::BackendRemoved`]).
    pub fn events(mut self, events: Events) -> Self {
        self.events = Some(events);
        self
    }

    /// Starts checking on the current tokio runtime. The backends in the
    /// pool are taken up before it returns (marked unhealthy then, with
    /// [`start_unhealthy`](Self::start_unhealthy)); their first probes
    /// start at once, on the checker's task.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime, as [`tokio::spawn`] does,
    /// before it changes anything.
    pub fn spawn(self) -> CheckerHandle {
        let runtime = tokio::runtime::Handle::current();
        // Before subscribing: the pool's next change sees it.
        let start_unhealthy = self
            .config
            .start_unhealthy
            .then(|| self.pool.start_unhealthy());
        let changed = Arc::new(Changed(Notify::new()));
        let weak = Arc::downgrade(&changed) as std::sync::Weak<dyn Rebuild<S>>;
        self.pool.subscribe(weak);
        let mut task = Task {
            pool: self.pool,
            probe: Arc::new(self.probe),
            config: self.config,
            events: self.events,
            changed,
            entries: HashMap::new(),
            departed: HashMap::new(),
            queue: BinaryHeap::new(),
            due: Vec::new(),
            _start_unhealthy: start_unhealthy,
        };
        // The backends there are now are taken up before this returns, so
        // that `start_unhealthy` holds for the requests sent next.
        let snapshot = task.pool.snapshot();
        task.sync(&snapshot, Instant::now(), true);
        let (stop, stopped) = oneshot::channel();
        let task = runtime.spawn(task.run(stopped, snapshot.generation()));
        CheckerHandle {
            running: Some((task, stop)),
        }
    }
}

/// The running checker: stops it when dropped.
#[derive(Debug)]
#[must_use = "the checker stops when this handle is dropped"]
pub struct CheckerHandle {
    /// The task, and what tells it to stop its probes and end; taken when
    /// it is stopped.
    running: Option<(JoinHandle<()>, oneshot::Sender<()>)>,
}

impl CheckerHandle {
    /// Stops the checker and waits until its task and probes are gone.
    /// Backends keep their last health; slow-start ramps in progress end at
    /// full weight.
    pub async fn shutdown(mut self) {
        if let Some((task, stop)) = self.running.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    /// Whether the checker's task has ended.
    pub fn is_finished(&self) -> bool {
        self.running
            .as_ref()
            .is_none_or(|(task, _)| task.is_finished())
    }
}

impl Drop for CheckerHandle {
    fn drop(&mut self) {
        if let Some((task, _)) = self.running.take() {
            task.abort();
        }
    }
}

/// Wakes the checker when the pool's membership changes.
struct Changed(Notify);

impl<S> Rebuild<S> for Changed {
    fn rebuild(&self, _snapshot: &Arc<Snapshot<S>>) {
        self.0.notify_one();
    }
}

/// What the checker knows about one backend.
#[derive(Debug)]
struct Entry {
    state: Arc<BackendState>,
    /// The serial of the service it probes (see `Member::service_serial`),
    /// which tells this entry from an earlier one of the same backend
    /// (removed, then added back with the same state, or given another
    /// service) whose probe may still run.
    serial: Serial,
    /// Passes and failures in a row, since the backend's health last
    /// changed: one set by someone else (a manual `set_health`, another
    /// checker) starts them again, so that `rise` and `fall` count probes
    /// made in that health.
    successes: u32,
    failures: u32,
    /// The health the last probe left (or the entry began with).
    seen: HealthStatus,
    /// The backend's ejection count when the probe under way was sent: a
    /// pass lifts no ejection that began after it.
    ejections_at_probe: u32,
    /// Whether a probe has found it healthy (only such backends are turned
    /// off and removed).
    ever_healthy: bool,
    /// When it became unhealthy, while it is.
    unhealthy_since: Option<Instant>,
    next_probe: Instant,
    /// The probe under way.
    probe: Option<AbortHandle>,
    /// When its slow-start ramp began, while it ramps.
    ramp_from: Option<Instant>,
    /// When its ramp next steps, while it ramps.
    ramp_next: Option<Instant>,
    /// When the checker's queue next looks at it: the earliest of its
    /// times queued since it was last looked at.
    queued: Option<Instant>,
}

const fn health_name(health: HealthStatus) -> &'static str {
    match health {
        HealthStatus::Healthy => "healthy",
        HealthStatus::Unhealthy => "unhealthy",
        HealthStatus::TurnedOff => "turned_off",
    }
}

impl Entry {
    fn new(state: Arc<BackendState>, serial: Serial, now: Instant) -> Self {
        Entry {
            seen: state.health(),
            state,
            serial,
            successes: 0,
            failures: 0,
            ejections_at_probe: 0,
            ever_healthy: false,
            unhealthy_since: None,
            next_probe: now,
            probe: None,
            ramp_from: None,
            ramp_next: None,
            queued: None,
        }
    }

    fn start_ramp(&mut self, now: Instant, config: &CheckConfig) {
        if let Some(slow) = config.slow_start {
            self.ramp_from = Some(now);
            self.ramp_next = Some(now);
            self.state
                .set_weight_permille(slow.permille_at(Duration::ZERO));
        }
    }

    /// Stops the probe under way: its backend has left the pool, and what
    /// the probe holds (a clone of the service, a connection) is let go now
    /// rather than at its timeout.
    fn stop_probe(&mut self) {
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
    }

    /// Starts this entry afresh, probing the service of serial `serial` at
    /// once: its probe under way, and the times it queued, were for what it
    /// was. Its health and counts go on.
    fn restart(&mut self, serial: Serial, now: Instant) {
        self.stop_probe();
        self.serial = serial;
        self.next_probe = now;
        self.queued = None;
    }

    /// Abandons a ramp in progress at full weight: a weight the checker no
    /// longer advances must not stay partial.
    fn end_ramp(&mut self) {
        self.ramp_next = None;
        if self.ramp_from.take().is_some() {
            self.state.set_weight_permille(1000);
        }
    }

    /// Lifts an ejection in force, if the checker may, and reports it; one
    /// that ran out is reported by the health layer.
    fn lift_ejection(&self, id: &BackendId, config: &CheckConfig, events: Option<&Events>) {
        // A probe sent before the ejection began says nothing of the
        // failures that caused it.
        if config.lift_ejections && self.state.uneject_if(self.ejections_at_probe) {
            super::outlier::report_restored(events, id, "probe passed");
        }
    }

    fn record(
        &mut self,
        id: &BackendId,
        result: Result<(), BoxError>,
        config: &CheckConfig,
        events: Option<&Events>,
    ) {
        let now = Instant::now();
        self.probe = None;
        let health = self.state.health();
        if health != self.seen {
            self.successes = 0;
            self.failures = 0;
        }
        match result {
            Ok(()) => {
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                if health == HealthStatus::Healthy {
                    self.ever_healthy = true;
                    self.unhealthy_since = None;
                    self.lift_ejection(id, config, events);
                } else if self.successes >= config.rise
                    // Changed by another writer meanwhile: its change, not
                    // this one, is reported, and the counts start again
                    // at the next probe, which sees the new health.
                    && self.state.set_health_if(health, HealthStatus::Healthy)
                {
                    self.ever_healthy = true;
                    self.unhealthy_since = None;
                    self.start_ramp(now, config);
                    tracing::info!(
                        backend = %id,
                        from = health_name(health),
                        to = "healthy",
                        reason = "probes passed",
                        passed = self.successes,
                        "backend healthy"
                    );
                    emit(events, || Event::HealthChanged {
                        backend: id.clone(),
                        from: health,
                        to: HealthStatus::Healthy,
                        reason: "probes passed".into(),
                    });
                    self.lift_ejection(id, config, events);
                }
            }
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                if health == HealthStatus::Healthy
                    && self.failures >= config.fall
                    && (self.state).set_health_if(HealthStatus::Healthy, HealthStatus::Unhealthy)
                {
                    self.unhealthy_since = Some(now);
                    self.end_ramp();
                    if config.close_tunnels_when_down {
                        self.state.close_tunnels();
                    }
                    tracing::warn!(
                        backend = %id,
                        from = "healthy",
                        to = "unhealthy",
                        reason = "probes failed",
                        failed = self.failures,
                        error = %crate::error::Report(&*error),
                        "backend unhealthy"
                    );
                    emit(events, || Event::HealthChanged {
                        backend: id.clone(),
                        from: HealthStatus::Healthy,
                        to: HealthStatus::Unhealthy,
                        reason: "probes failed".into(),
                    });
                } else {
                    tracing::debug!(backend = %id, failed = self.failures, error = %crate::error::Report(&*error), "probe failed");
                }
            }
        }
        self.seen = self.state.health();
        let interval = if self.seen == HealthStatus::Healthy {
            config.interval
        } else {
            config.unhealthy_interval.unwrap_or(config.interval)
        };
        self.next_probe = later(
            self.next_probe,
            interval.saturating_add(jitter(config.jitter)),
        )
        .max(now);
    }

    /// Turns the backend off when due; returns whether it is due for
    /// removal.
    fn lifecycle(
        &mut self,
        id: &BackendId,
        now: Instant,
        config: &CheckConfig,
        events: Option<&Events>,
    ) -> bool {
        let health = self.state.health();
        if health == HealthStatus::Healthy {
            // Made healthy by someone else: the clock starts again.
            self.unhealthy_since = None;
            return false;
        }
        // Made unhealthy by someone else (an operator, another checker of
        // the same state) is timed from when this checker first sees it.
        let since = *self.unhealthy_since.get_or_insert(now);
        if !self.ever_healthy {
            return false;
        }
        if self.removable()
            && config
                .removed_after
                .is_some_and(|after| elapsed(since, now, after))
        {
            return true;
        }
        if health == HealthStatus::Unhealthy
            && config
                .turned_off_after
                .is_some_and(|after| elapsed(since, now, after))
            && (self.state).set_health_if(HealthStatus::Unhealthy, HealthStatus::TurnedOff)
        {
            self.seen = HealthStatus::TurnedOff;
            tracing::warn!(
                backend = %id,
                from = "unhealthy",
                to = "turned_off",
                reason = "unhealthy too long",
                "backend turned off"
            );
            emit(events, || Event::HealthChanged {
                backend: id.clone(),
                from: HealthStatus::Unhealthy,
                to: HealthStatus::TurnedOff,
                reason: "unhealthy too long".into(),
            });
        }
        false
    }

    /// Advances the slow-start ramp; returns when to advance it next.
    fn ramp(&mut self, now: Instant, config: &CheckConfig) -> Option<Instant> {
        let (from, slow) = (self.ramp_from?, config.slow_start?);
        let elapsed = now.saturating_duration_since(from);
        let permille = slow.permille_at(elapsed);
        self.state.set_weight_permille(permille);
        if permille >= 1000 {
            self.ramp_from = None;
            return None;
        }
        // Twenty steps over the window, at least 10 ms apart, aligned on
        // the ramp's start.
        let step = (slow.window() / 20).max(Duration::from_millis(10));
        let steps = elapsed.as_nanos() / step.as_nanos() + 1;
        let next = step.saturating_mul(u32::try_from(steps).unwrap_or(u32::MAX));
        Some(later(from, next.min(slow.window())))
    }

    /// Whether `removed_after` may remove this backend: never one the
    /// operator took out (disabled, draining), whose state holds that
    /// decision, and which a discovery that still lists it would put back
    /// enabled.
    fn removable(&self) -> bool {
        self.state.admin() == AdminStatus::Enabled
    }

    /// The next instant something is due for this backend.
    fn next_due(&self, config: &CheckConfig) -> Option<Instant> {
        let probe = self.probe.is_none().then_some(self.next_probe);
        let lifecycle = self
            .unhealthy_since
            .filter(|_| self.ever_healthy)
            .and_then(|since| {
                let health = self.state.health();
                let off = config
                    .turned_off_after
                    .filter(|_| health == HealthStatus::Unhealthy)
                    .map(|after| later(since, after));
                let removed = (config.removed_after)
                    .filter(|_| self.removable())
                    .map(|after| later(since, after));
                earliest(off, removed)
            });
        earliest(earliest(probe, lifecycle), self.ramp_next)
    }

    /// Queues the entry for when something is next due for it, unless it
    /// is queued for that time or sooner already (it is then looked at
    /// early, and queued again).
    fn schedule(&mut self, id: &BackendId, config: &CheckConfig, queue: &mut BinaryHeap<Due>) {
        let Some(at) = self.next_due(config) else {
            return;
        };
        if self.queued.is_none_or(|queued| at < queued) {
            self.queued = Some(at);
            queue.push(Reverse((at, self.serial, id.clone())));
        }
    }
}

/// A random delay in `0..=max`.
fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    // In u64, not usize: 32 bits of nanoseconds are about 4.3 s.
    let nanos = u64::try_from(max.as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    Duration::from_nanos(crate::balance::random_below(nanos))
}

/// A time an entry is due to be looked at, with the serial of the entry
/// that asked: one removed or replaced meanwhile is passed over.
type Due = Reverse<(Instant, Serial, BackendId)>;

struct Task<S, P> {
    pool: Pool<S>,
    probe: Arc<P>,
    config: CheckConfig,
    events: Option<Events>,
    changed: Arc<Changed>,
    entries: HashMap<BackendId, Entry>,
    /// The entries of backends that left the pool while someone else (the
    /// pool's window for backends a discovery stream removed, a request in
    /// flight) still holds their state: a backend that comes back with that
    /// state takes up its entry where it left it.
    departed: HashMap<BackendId, Entry>,
    /// When each entry is next due, soonest first: a probe's end or a due
    /// time touches only its own entry, not every backend's. Times an
    /// entry no longer wants stay until they come up, are then passed
    /// over, and are cleared when they outnumber the entries.
    queue: BinaryHeap<Due>,
    /// The times due in a turn (kept for its allocation).
    due: Vec<(Instant, Serial, BackendId)>,
    /// With `start_unhealthy`: the pool marks the backends it adds
    /// unhealthy itself, before a balancer can route to them, while this
    /// task lives.
    _start_unhealthy: Option<StartUnhealthy>,
}

impl<S, P> Task<S, P>
where
    S: Clone + Send + Sync + 'static,
    P: Probe<S>,
{
    /// Probes until told to stop, from membership `generation`, which
    /// [`sync`](Self::sync) has taken up.
    async fn run(mut self, mut stop: oneshot::Receiver<()>, generation: u64) {
        let mut probes: JoinSet<Result<(), BoxError>> = JoinSet::new();
        // Each probe's backend, and the serial of the entry that started
        // it: a backend replaced, or removed and added back, meanwhile has
        // a new entry, which the probe's result is not about.
        let mut running: HashMap<tokio::task::Id, (BackendId, Serial)> = HashMap::new();
        let mut generation = generation;
        loop {
            let now = Instant::now();
            let snapshot = self.pool.snapshot();
            self.follow(&snapshot, &mut generation, now);
            self.compact_queue();
            // Those due now, taken out first: one queued again for now (a
            // removal the pool refused until this task takes up its
            // change) waits for the next turn.
            let mut due = std::mem::take(&mut self.due);
            while let Some(next) = (self.queue.peek_mut())
                .filter(|next| next.0 .0 <= now)
                .map(std::collections::binary_heap::PeekMut::pop)
            {
                due.push(next.0);
            }
            for (at, serial, id) in due.drain(..) {
                let Some(entry) = self.entries.get_mut(&id) else {
                    continue;
                };
                if entry.serial != serial || entry.queued != Some(at) {
                    continue;
                }
                entry.queued = None;
                #[cfg(test)]
                tests::VISITS.with(|visits| visits.set(visits.get() + 1));
                if entry.lifecycle(&id, now, &self.config, self.events.as_ref())
                    // Only the backend judged: the pool may hold another
                    // one under this id by now (its entry is replaced when
                    // this task takes up the change), or the operator may
                    // have taken it out since `lifecycle` looked (it
                    // stays, and is probed on).
                    && self.pool.remove_if_enabled(&id, &entry.state)
                {
                    let mut entry = self.entries.remove(&id).expect("found above");
                    entry.stop_probe();
                    tracing::warn!(
                        backend = %id,
                        from = health_name(entry.state.health()),
                        to = "removed",
                        reason = "unhealthy too long",
                        "backend removed from the pool"
                    );
                    emit(self.events.as_ref(), || Event::BackendRemoved {
                        group: None,
                        backend: id.clone(),
                        reason: "unhealthy too long".into(),
                    });
                    continue;
                }
                entry.ramp_next = entry.ramp(now, &self.config);
                let service = (snapshot.members().index_of(&id)).and_then(|i| snapshot.service(i));
                if let Some(service) =
                    service.filter(|_| entry.probe.is_none() && entry.next_probe <= now)
                {
                    entry.next_probe = now;
                    entry.ejections_at_probe = entry.state.ejections();
                    // The probe is called inside its task, so that a probe
                    // that panics when called (not only in its future)
                    // fails this probe rather than ending the checker.
                    let (probe, probe_id, service) =
                        (self.probe.clone(), id.clone(), service.clone());
                    let timeout = self.config.timeout;
                    let handle = probes.spawn(async move {
                        match tokio::time::timeout(timeout, probe.probe(&probe_id, &service)).await
                        {
                            Ok(result) => result,
                            Err(_) => Err(ProbeTimeout::new(timeout).into()),
                        }
                    });
                    running.insert(handle.id(), (id.clone(), entry.serial));
                    entry.probe = Some(handle);
                    // Thousands of backends fall due at once at the start:
                    // the worker's other tasks get a turn when this task's
                    // budget (128 such starts at most) runs out.
                    tokio::task::consume_budget().await;
                }
                entry.schedule(&id, &self.config, &mut self.queue);
            }
            self.due = due;
            drop(snapshot);
            let wake = self.queue.peek().map(|due| due.0 .0);
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut stop => {
                    // Every probe aborted, and gone once this returns.
                    probes.shutdown().await;
                    return;
                }
                Some(joined) = probes.join_next_with_id(), if !probes.is_empty() => {
                    let (task, result) = match joined {
                        Ok((task, result)) => (task, result),
                        Err(error) => (error.id(), Err(ProbePanicked::default().into())),
                    };
                    // A change of membership published before this result
                    // is taken up first: the result of a probe whose
                    // backend was given another service meanwhile is then
                    // passed over below.
                    self.follow(&self.pool.snapshot(), &mut generation, Instant::now());
                    let Some((id, serial)) = running.remove(&task) else { continue };
                    let Some(entry) = self.entries.get_mut(&id) else { continue };
                    // A probe of a backend that was replaced, given another
                    // service, or removed and added back, meanwhile, which
                    // ended or panicked: the new entry schedules its own.
                    if entry.serial == serial {
                        entry.record(&id, result, &self.config, self.events.as_ref());
                        entry.schedule(&id, &self.config, &mut self.queue);
                    }
                }
                () = self.changed.0.notified() => {}
                () = sleep => {}
            }
        }
    }

    /// Clears the queue of the times no entry wants any more, once they
    /// outnumber the entries (entries that left, times made early by a
    /// probe's end): it then holds one time per entry.
    fn compact_queue(&mut self) {
        if self.queue.len() <= 2 * self.entries.len() + 64 {
            return;
        }
        self.queue = (self.entries.iter())
            .filter_map(|(id, entry)| Some(Reverse((entry.queued?, entry.serial, id.clone()))))
            .collect();
    }

    /// Takes up the pool's membership in `snapshot` if it changed since
    /// `generation`.
    fn follow(&mut self, snapshot: &Snapshot<S>, generation: &mut u64, now: Instant) {
        if *generation != snapshot.generation() {
            self.sync(snapshot, now, false);
            *generation = snapshot.generation();
        }
    }

    /// Follows the membership: new backends, and those given another
    /// service, are probed at once; backends that left are set aside while
    /// their state lives elsewhere, then forgotten.
    fn sync(&mut self, snapshot: &Snapshot<S>, now: Instant, initial: bool) {
        let members = snapshot.members();
        // Nothing but this map holds their state any more: they cannot
        // come back as they were.
        self.departed
            .retain(|_, entry| Arc::strong_count(&entry.state) > 1);
        let left: Vec<BackendId> = (self.entries.iter())
            .filter(|(id, entry)| {
                members
                    .index_of(id)
                    .is_none_or(|i| !Arc::ptr_eq(members[i].state(), &entry.state))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in left {
            let mut entry = self.entries.remove(&id).expect("listed above");
            entry.stop_probe();
            // Its state may live on (in another pool, or added back).
            entry.end_ramp();
            // One replaced by another state under its id is gone for good.
            if members.index_of(&id).is_none() {
                self.departed.insert(id, entry);
            }
        }
        for member in members.iter() {
            let serial = member.service_serial();
            if let Some(entry) = self.entries.get_mut(member.id()) {
                // Given another service with its state (a discovery's
                // insert of a backend it lists already, say): a probe of
                // the old one says nothing of the new one.
                if entry.serial != serial {
                    entry.restart(serial, now);
                    entry.schedule(member.id(), &self.config, &mut self.queue);
                }
                continue;
            }
            let back = self
                .departed
                .remove(member.id())
                .filter(|entry| Arc::ptr_eq(member.state(), &entry.state));
            let mut entry = match back {
                // Back with its state (a DNS answer that left it out once,
                // say): its health and counts go on; only its probe starts
                // again (the one under way was stopped as it left).
                Some(mut entry) => {
                    entry.restart(serial, now);
                    // Its time away, when nothing could probe it, does not
                    // count towards turning it off or removing it.
                    if entry.unhealthy_since.is_some() {
                        entry.unhealthy_since = Some(now);
                    }
                    entry
                }
                None => {
                    let mut entry = Entry::new(member.state().clone(), serial, now);
                    if self.config.start_unhealthy {
                        // From then on the pool marks the states it makes;
                        // one it did not make (shared with another pool,
                        // or kept for a return) keeps its health. So does
                        // one that has served (a checker started late, or
                        // replaced at a reload): marking it would take a
                        // serving primary out of its group.
                        if initial && member.made_here() && member.state().requests() == 0 {
                            member.state().start_unproven();
                        }
                    } else if !initial && member.state().health() == HealthStatus::Healthy {
                        entry.start_ramp(now, &self.config);
                    }
                    entry
                }
            };
            entry.schedule(member.id(), &self.config, &mut self.queue);
            self.entries.insert(member.id().clone(), entry);
        }
    }
}

impl<S, P> Drop for Task<S, P> {
    fn drop(&mut self) {
        // A ramp that can no longer advance ends at full weight.
        for entry in self.entries.values_mut() {
            entry.end_ramp();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::health::probe_fn;

    thread_local! {
        /// The entries the checker's task looked at, on this thread.
        pub(super) static VISITS: Cell<u64> = const { Cell::new(0) };
    }

    /// A thousand backends fall due at once: the checker starts their
    /// probes in batches, and the worker's other tasks (the first probes
    /// among them) run in between.
    #[tokio::test(start_paused = true)]
    async fn probes_due_at_once_start_in_batches() {
        // What tokio lets one task do in a turn.
        const COOP_BUDGET: u64 = 128;
        let pool = Pool::new();
        for i in 0..1000 {
            pool.insert(format!("b{i}"), ());
        }
        // The tasks alive when the first probe ran: the checker's and this
        // test's, and the probes started before it.
        let alive = Arc::new(AtomicU64::new(u64::MAX));
        let first = alive.clone();
        let probe = probe_fn(move |_: &BackendId, _: &()| {
            let now = tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks();
            let _ =
                first.compare_exchange(u64::MAX, now as u64, Ordering::Relaxed, Ordering::Relaxed);
            async { Ok::<_, BoxError>(()) }
        });
        let checker = HealthChecker::new(pool, probe)
            .jitter(Duration::ZERO)
            .spawn();
        tokio::time::sleep(Duration::from_millis(1)).await;
        checker.shutdown().await;
        let alive = alive.load(Ordering::Relaxed);
        assert!(
            alive <= COOP_BUDGET + 2,
            "{alive} tasks alive at the first probe"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_turn_looks_at_its_own_backend_not_every_one() {
        const BACKENDS: u64 = 500;
        let pool = Pool::new();
        for i in 0..BACKENDS {
            pool.insert(format!("b{i}"), ());
        }
        let probes = Arc::new(AtomicU64::new(0));
        let counted = probes.clone();
        // Probes that take a different time each, so that their ends and
        // the next ones are spread over the interval.
        let probe = probe_fn(move |id: &BackendId, _: &()| {
            counted.fetch_add(1, Ordering::Relaxed);
            let n: u64 = id.as_str()[1..].parse().unwrap();
            async move {
                tokio::time::sleep(Duration::from_millis(n)).await;
                Ok::<_, BoxError>(())
            }
        });
        let checker = HealthChecker::new(pool, probe)
            .interval(Duration::from_secs(1))
            .jitter(Duration::from_millis(500))
            .spawn();
        tokio::time::sleep(Duration::from_secs(20)).await;
        checker.shutdown().await;
        let (probes, visits) = (probes.load(Ordering::Relaxed), VISITS.with(Cell::get));
        assert!(probes >= 10 * BACKENDS, "only {probes} probes");
        // One look to send each probe (its end queues the next one without
        // a look); a few more for times made early. Looking at every
        // backend at each probe's end would be about BACKENDS times as
        // many.
        assert!(visits <= 3 * probes, "{visits} looks for {probes} probes");
    }
}
