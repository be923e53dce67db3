//! Publishing the stats through the `metrics` facade.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::handle::{GroupMode, Handle};
use super::stats::GroupStats;
use crate::backend::BackendId;
use crate::failover::FailoverStats;
use crate::pool::Refusals;
use crate::serial::Serial;
use crate::sticky::StickyStats;
use crate::time::elapsed;

#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
impl Handle {
    /// Publishes a snapshot of every group's stats through the
    /// [`metrics`](https://docs.rs/metrics) facade, to whatever recorder
    /// (Prometheus exporter, StatsD, …) the application installed (feature
    /// `metrics`).
    ///
    /// Per backend, labelled `group` and `backend`:
    /// `tower_ha_backend_requests_total`, `tower_ha_backend_failures_total`,
    /// `tower_ha_backend_ejections_total`,
    /// `tower_ha_backend_ejections_refused_total` (counters),
    /// `tower_ha_backend_in_flight`, `tower_ha_backend_max_in_flight` (0
    /// for a backend without a limit), `tower_ha_backend_healthy` (1 or 0)
    /// and `tower_ha_backend_available` (1 or 0) (gauges). A backend
    /// removed and added again (its counts start afresh) keeps its
    /// counters going up; a backend gone from its group has its gauges set
    /// to 0 once. Per group, labelled
    /// `group`: `tower_ha_group_failovers_total` (counter),
    /// `tower_ha_group_seconds_since_failover` (gauge, absent before the
    /// first failover; a group registered again counts on from its last),
    /// `tower_ha_group_refusals_total` (a counter labelled `group` and
    /// `reason`: `unavailable`, `at_limit` or `queue_timeout`, the fields
    /// of [`Refusals`](crate::pool::Refusals); a group registered again
    /// over another pool keeps it going up),
    /// `tower_ha_group_healthy_backends`,
    /// `tower_ha_group_failed_backends`,
    /// `tower_ha_group_queued_requests` (gauges) and
    /// `tower_ha_group_primary` (a gauge labelled `group` and `backend`, 1
    /// for the current primary and 0 for the others). A group registered
    /// again with a new [`Priority`](crate::balance::Priority) (its count
    /// starts afresh) keeps its failover counter going up. A group
    /// [removed](Handle::remove_group) has its gauges, and its backends',
    /// set to 0 once, except `tower_ha_group_seconds_since_failover`,
    /// which keeps its last value: 0 would read as a failover just now.
    ///
    /// Per layer registered with [`add_failover`](Handle::add_failover),
    /// labelled `layer` (its name), counters named after the fields of
    /// [`FailoverStats`]: `tower_ha_failover_retries_total`,
    /// `tower_ha_failover_recovered_total`,
    /// `tower_ha_failover_exhausted_total`,
    /// `tower_ha_failover_budget_refusals_total`,
    /// `tower_ha_failover_unsafe_to_retry_total`,
    /// `tower_ha_failover_unreplayable_total`,
    /// `tower_ha_failover_per_try_timeouts_total` and
    /// `tower_ha_failover_deadlines_exceeded_total`. Per layer registered
    /// with [`add_sticky`](Handle::add_sticky), labelled `layer`: the
    /// gauge `tower_ha_sticky_sessions` and counters named after the
    /// fields of [`StickyStats`]: `tower_ha_sticky_misses_total`,
    /// `tower_ha_sticky_created_total`, `tower_ha_sticky_moved_total`,
    /// `tower_ha_sticky_rejected_total`, `tower_ha_sticky_loaded_total`,
    /// `tower_ha_sticky_hydrated_total`,
    /// `tower_ha_sticky_store_errors_total`,
    /// `tower_ha_sticky_expired_total`, `tower_ha_sticky_evicted_total` and
    /// `tower_ha_sticky_strict_refusals_total`. Another layer registered
    /// under a name keeps its counters going up; a sticky layer no longer
    /// reported has its gauge set to 0 once.
    ///
    /// What was last published of a backend, group or layer gone for an
    /// hour is forgotten, so that backends coming and going under new ids
    /// (a DNS name over changing addresses) use no more memory over time
    /// here. The recorder keeps every series it was given, though: to
    /// have those of departed backends dropped, give it an idle timeout
    /// several publications long
    /// (`PrometheusBuilder::idle_timeout(MetricKindMask::ALL, ..)` of
    /// `metrics-exporter-prometheus`). Every publication touches every
    /// series of a backend, group or layer still there, its unchanged
    /// counters included, so only departed ones go idle.
    /// One that comes back after that as a new state or layer, made since
    /// this handle first published and after everything it forgot (a
    /// backend added again), adds its counts as a new one does. Any other
    /// (the same layer registered again, or one a handle of a
    /// configuration since reloaded published too) sets its counters to
    /// its counts with `Counter::absolute`, which recorders take as "at
    /// least": nothing is counted twice, as long as one handle publishes
    /// at a time (stop the old handle's task when a reloaded
    /// configuration's handle starts publishing the same pools).
    ///
    /// A handle's first publication also describes every metric to the
    /// recorder: a line of help text each (`# HELP` of a Prometheus
    /// exporter), and the unit of the counters (a count) and of
    /// `tower_ha_group_seconds_since_failover` (seconds).
    ///
    /// Call it periodically, or run [`spawn_metrics`](Handle::spawn_metrics).
    pub fn publish_metrics(&self) {
        let mut published = self.published().lock();
        let Published {
            backends,
            groups,
            layers,
            unseen,
        } = &mut *published;
        let unseen = unseen.get_or_insert_with(|| {
            describe();
            Unseen {
                made_since: Serial::next(),
                forgotten: None,
            }
        });
        let mut seen = HashSet::new();
        let stats = self.stats();
        let now = Instant::now();
        for group in &stats {
            publish(group, backends, &mut seen, *unseen);
            publish_group(group, groups, now, *unseen);
        }
        // A group no longer registered: its gauges go to zero, once.
        let registered: HashSet<&str> = stats.iter().map(|g| &*g.name).collect();
        for (name, last) in groups.iter_mut() {
            if last.gone.is_some() || registered.contains(name.as_str()) {
                continue;
            }
            let labels = [("group", name.clone())];
            for gauge in GROUP_GAUGES {
                metrics::gauge!(gauge, &labels).set(0.0);
            }
            last.gone = Some(now);
        }
        // A backend gone from its group: its gauges go to zero, so that it
        // counts as neither in flight, available nor primary any more. Its
        // last counts stay, in case it comes back.
        for ((group, backend), last) in backends.iter_mut() {
            if last.gone.is_some() || seen.contains(&(group.clone(), backend.clone())) {
                continue;
            }
            let labels = [("group", group.clone()), ("backend", backend.to_string())];
            for gauge in BACKEND_GAUGES {
                metrics::gauge!(gauge, &labels).set(0.0);
            }
            if last.primary {
                metrics::gauge!("tower_ha_group_primary", &labels).set(0.0);
            }
            last.gone = Some(now);
        }
        let kept =
            |gone: Option<Instant>| gone.is_none_or(|at| !elapsed(at, now, FORGET_GONE_AFTER));
        publish_layers(self, layers, now, *unseen);
        // What is forgotten may come back: its counts may be published.
        let mut forget = |gone: Option<Instant>, serial: Option<Serial>| {
            let kept = kept(gone);
            if !kept {
                unseen.forgotten = unseen.forgotten.max(serial);
            }
            kept
        };
        groups.retain(|_, last| {
            let pool = newest(&last.refusals);
            forget(last.gone, last.failovers.source.flatten().max(pool))
        });
        backends.retain(|_, last| {
            let counters = [
                &last.requests,
                &last.failures,
                &last.ejections,
                &last.ejections_refused,
            ];
            forget(last.gone, newest(counters))
        });
        layers.retain(|_, last| forget(last.gone, newest(&last.counts)));
    }

    /// Publishes the metrics (feature `metrics`) every `interval` (at least
    /// a millisecond, at most about thirty years) on the current tokio
    /// runtime until the returned task is aborted or every other clone of
    /// the handle is dropped. A recorder that panics is logged and loses
    /// that tick's publication only.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime, as [`tokio::spawn`] does.
    pub fn spawn_metrics(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak = self.downgrade();
        // Older tokio releases (this crate takes 1.47 on) add the period
        // to the clock unchecked when a tick comes late.
        let interval = interval.clamp(crate::time::SHORTEST, crate::time::NEVER);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(handle) = weak.upgrade() else {
                    return;
                };
                // A recorder that panics loses this tick only.
                let published = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    handle.publish_metrics()
                }));
                if published.is_err() {
                    tracing::error!(
                        "the metrics recorder panicked; publishing again at the next tick"
                    );
                }
            }
        })
    }
}

/// What was last published: for one backend of one group, by group name
/// and backend id; and for each group ever published, its counts, kept
/// after the group is removed in case it comes back.
#[derive(Debug, Default)]
pub(super) struct Published {
    backends: HashMap<(String, BackendId), Last>,
    groups: HashMap<String, LastGroup>,
    /// By kind (`"failover"` or `"sticky"`) and name.
    layers: HashMap<(&'static str, Arc<str>), LastLayer>,
    /// Which backend states, group states and layers no recorder can
    /// have counts of yet; set at the first publication, which also
    /// describes the metrics.
    unseen: Option<Unseen>,
}

/// Every metric published, its kind and what it counts, for the
/// recorder's help text (`# HELP` of a Prometheus exporter).
const DESCRIPTIONS: [(&str, Kind, &str); 34] = {
    use Kind::{Counter, Gauge, Seconds};
    [
        (
            "tower_ha_backend_requests_total",
            Counter,
            "Requests sent to the backend.",
        ),
        (
            "tower_ha_backend_failures_total",
            Counter,
            "Failures of the backend recorded by its health layer.",
        ),
        (
            "tower_ha_backend_ejections_total",
            Counter,
            "Passive ejections of the backend.",
        ),
        (
            "tower_ha_backend_ejections_refused_total",
            Counter,
            "Ejections of the backend refused because too much of the pool was ejected.",
        ),
        (
            "tower_ha_backend_in_flight",
            Gauge,
            "Requests to the backend in flight, their response bodies included.",
        ),
        (
            "tower_ha_backend_max_in_flight",
            Gauge,
            "The backend's limit of requests in flight; 0 for none.",
        ),
        (
            "tower_ha_backend_healthy",
            Gauge,
            "1 if the backend is healthy and not ejected, else 0.",
        ),
        (
            "tower_ha_backend_available",
            Gauge,
            "1 if the backend can be picked (enabled, healthy, not ejected), else 0.",
        ),
        (
            "tower_ha_group_failovers_total",
            Counter,
            "Failovers of the active-passive group: switches away from an unavailable primary.",
        ),
        (
            "tower_ha_group_seconds_since_failover",
            Seconds,
            "Time since the group's last failover.",
        ),
        (
            "tower_ha_group_refusals_total",
            Counter,
            "Requests refused before they tried any backend, by reason.",
        ),
        (
            "tower_ha_group_healthy_backends",
            Gauge,
            "The group's backends that are healthy and not ejected.",
        ),
        (
            "tower_ha_group_failed_backends",
            Gauge,
            "The group's backends that are unhealthy, turned off or ejected.",
        ),
        (
            "tower_ha_group_queued_requests",
            Gauge,
            "Requests waiting in the group's queue for a backend with room.",
        ),
        (
            "tower_ha_group_primary",
            Gauge,
            "1 for the active-passive group's current primary, else 0.",
        ),
        (
            "tower_ha_failover_retries_total",
            Counter,
            "Attempts on another backend after a failed one.",
        ),
        (
            "tower_ha_failover_recovered_total",
            Counter,
            "Requests that succeeded on a retry.",
        ),
        (
            "tower_ha_failover_exhausted_total",
            Counter,
            "Requests that failed after at least one failed attempt.",
        ),
        (
            "tower_ha_failover_budget_refusals_total",
            Counter,
            "Requests denied a retry by the retry budget.",
        ),
        (
            "tower_ha_failover_unsafe_to_retry_total",
            Counter,
            "Failures not retried: a non-idempotent request that may have reached its backend.",
        ),
        (
            "tower_ha_failover_unreplayable_total",
            Counter,
            "Failures not retried: a request body that could not be replayed.",
        ),
        (
            "tower_ha_failover_per_try_timeouts_total",
            Counter,
            "Attempts abandoned at the per-try timeout.",
        ),
        (
            "tower_ha_failover_deadlines_exceeded_total",
            Counter,
            "Requests that ran out of their overall deadline.",
        ),
        (
            "tower_ha_sticky_sessions",
            Gauge,
            "Sessions in the sticky layer's in-memory table.",
        ),
        (
            "tower_ha_sticky_misses_total",
            Counter,
            "Requests whose key named no session in the table.",
        ),
        (
            "tower_ha_sticky_created_total",
            Counter,
            "Sessions started.",
        ),
        (
            "tower_ha_sticky_moved_total",
            Counter,
            "Sessions moved to another backend.",
        ),
        (
            "tower_ha_sticky_rejected_total",
            Counter,
            "Requests whose session key was rejected as bad input.",
        ),
        (
            "tower_ha_sticky_loaded_total",
            Counter,
            "Reads of the session store on a miss.",
        ),
        (
            "tower_ha_sticky_hydrated_total",
            Counter,
            "Loaded sessions restored with the on_restore hook.",
        ),
        (
            "tower_ha_sticky_store_errors_total",
            Counter,
            "Session store calls that failed.",
        ),
        (
            "tower_ha_sticky_expired_total",
            Counter,
            "Sessions dropped from the table after being idle.",
        ),
        (
            "tower_ha_sticky_evicted_total",
            Counter,
            "Sessions evicted from the full table (kept in the store).",
        ),
        (
            "tower_ha_sticky_strict_refusals_total",
            Counter,
            "Requests refused in strict mode.",
        ),
    ]
};

/// What a metric in [`DESCRIPTIONS`] is.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    /// A gauge of seconds.
    Seconds,
}

/// Gives the recorder each metric's help text (and unit).
fn describe() {
    for (name, kind, help) in DESCRIPTIONS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, metrics::Unit::Count, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Seconds => metrics::describe_gauge!(name, metrics::Unit::Seconds, help),
        }
    }
}

/// The backend states, group states and layers whose counts no recorder
/// can hold yet: those made since this handle first published, after
/// every one it has forgotten. The first publication of any other (which
/// another handle may have published: a configuration reloaded; or one
/// that comes back after it was forgotten) sets its counters to its counts,
/// which a recorder takes as "at least"; one of these adds its counts (a
/// backend added again after an hour away, whose new counts are below the
/// old ones).
#[derive(Debug, Clone, Copy)]
pub(super) struct Unseen {
    made_since: Serial,
    /// The largest serial forgotten.
    forgotten: Option<Serial>,
}

impl Unseen {
    fn holds(self, serial: Serial) -> bool {
        serial >= self.made_since && self.forgotten.is_none_or(|f| serial > f)
    }
}

/// The counts last published for one registered layer, and of which.
#[derive(Debug)]
pub(super) struct LastLayer {
    counts: Vec<Counted<Serial>>,
    /// Since when it is no longer reported (its gauge zeroed).
    gone: Option<Instant>,
}

fn failover_counts(s: &FailoverStats) -> [(&'static str, u64); 8] {
    [
        ("tower_ha_failover_retries_total", s.retries),
        ("tower_ha_failover_recovered_total", s.recovered),
        ("tower_ha_failover_exhausted_total", s.exhausted),
        ("tower_ha_failover_budget_refusals_total", s.budget_refusals),
        ("tower_ha_failover_unsafe_to_retry_total", s.unsafe_to_retry),
        ("tower_ha_failover_unreplayable_total", s.unreplayable),
        (
            "tower_ha_failover_per_try_timeouts_total",
            s.per_try_timeouts,
        ),
        (
            "tower_ha_failover_deadlines_exceeded_total",
            s.deadlines_exceeded,
        ),
    ]
}

fn sticky_counts(s: &StickyStats) -> [(&'static str, u64); 10] {
    [
        ("tower_ha_sticky_misses_total", s.misses),
        ("tower_ha_sticky_created_total", s.created),
        ("tower_ha_sticky_moved_total", s.moved),
        ("tower_ha_sticky_rejected_total", s.rejected),
        ("tower_ha_sticky_loaded_total", s.loaded),
        ("tower_ha_sticky_hydrated_total", s.hydrated),
        ("tower_ha_sticky_store_errors_total", s.store_errors),
        ("tower_ha_sticky_expired_total", s.expired),
        ("tower_ha_sticky_evicted_total", s.evicted),
        ("tower_ha_sticky_strict_refusals_total", s.strict_refusals),
    ]
}

/// A group's refusals by reason, each named as its label.
fn refusal_counts(r: &Refusals) -> [(&'static str, u64); 3] {
    [
        ("unavailable", r.unavailable),
        ("at_limit", r.at_limit),
        ("queue_timeout", r.queue_timeouts),
    ]
}

/// Publishes the counters of the registered layers; zeroes the gauge of a
/// sticky layer no longer reported, once.
fn publish_layers(
    handle: &Handle,
    published: &mut HashMap<(&'static str, Arc<str>), LastLayer>,
    now: Instant,
    unseen: Unseen,
) {
    let (failover, sticky) = handle.layer_sources();
    let mut seen = HashSet::new();
    for (name, source, stats) in failover {
        publish_layer(
            "failover",
            &name,
            source,
            &failover_counts(&stats),
            published,
            unseen,
        );
        seen.insert(("failover", name));
    }
    for (name, source, stats) in sticky {
        publish_layer(
            "sticky",
            &name,
            source,
            &sticky_counts(&stats),
            published,
            unseen,
        );
        let labels = [("layer", name.to_string())];
        metrics::gauge!("tower_ha_sticky_sessions", &labels).set(stats.sessions as f64);
        seen.insert(("sticky", name));
    }
    for (key, last) in published.iter_mut() {
        if last.gone.is_some() || seen.contains(key) {
            continue;
        }
        if key.0 == "sticky" {
            let labels = [("layer", key.1.to_string())];
            metrics::gauge!("tower_ha_sticky_sessions", &labels).set(0.0);
        }
        last.gone = Some(now);
    }
}

fn publish_layer(
    kind: &'static str,
    name: &Arc<str>,
    source: Serial,
    counts: &[(&'static str, u64)],
    published: &mut HashMap<(&'static str, Arc<str>), LastLayer>,
    unseen: Unseen,
) {
    let labels = [("layer", name.to_string())];
    let last = published
        .entry((kind, name.clone()))
        .or_insert_with(|| LastLayer {
            counts: counts.iter().map(|_| Counted::default()).collect(),
            gone: None,
        });
    last.gone = None;
    let new = unseen.holds(source);
    for ((metric, now), counted) in counts.iter().zip(&mut last.counts) {
        count(metric, &labels, counted, source, *now, new);
    }
}

/// How long what was last published of a backend, group or layer gone is
/// kept, in case it comes back.
const FORGET_GONE_AFTER: Duration = Duration::from_secs(3600);

/// The per-group gauges zeroed when the group is removed. Not
/// `tower_ha_group_seconds_since_failover`: 0 would read as a failover
/// just now.
const GROUP_GAUGES: [&str; 3] = [
    "tower_ha_group_healthy_backends",
    "tower_ha_group_failed_backends",
    "tower_ha_group_queued_requests",
];

/// The counts last published for one group: its failovers, and of which
/// [`Priority`](crate::balance::Priority); its refusals, and of which pool.
#[derive(Debug)]
pub(super) struct LastGroup {
    failovers: Counted<Option<Serial>>,
    refusals: [Counted<Serial>; 3],
    /// When the group's last failover known to the handle happened: of
    /// its current `Priority`, or of one it was registered with before.
    last_at: Option<Instant>,
    /// Since when the group is no longer registered (its gauges zeroed).
    gone: Option<Instant>,
}

/// The last counts published for one backend, and of which state.
#[derive(Debug, Default)]
pub(super) struct Last {
    /// Since when it is gone from its group (its gauges zeroed).
    gone: Option<Instant>,
    requests: Counted<Serial>,
    failures: Counted<Serial>,
    ejections: Counted<Serial>,
    ejections_refused: Counted<Serial>,
    primary: bool,
}

/// One counter as last published: the count, and of which source (a
/// backend's state, a layer, a group's `Priority`), `None` before its
/// first publication. Each counter keeps its own: a recorder that panics
/// part-way through a publication leaves those published before it
/// recorded as published, and the others as they were.
#[derive(Debug, Default)]
pub(super) struct Counted<S> {
    source: Option<S>,
    count: u64,
}

/// The newest source the `counters` were last published of.
fn newest<'a>(counters: impl IntoIterator<Item = &'a Counted<Serial>>) -> Option<Serial> {
    counters.into_iter().filter_map(|c| c.source).max()
}

/// The per-backend gauges, zeroed when the backend leaves its group.
const BACKEND_GAUGES: [&str; 4] = [
    "tower_ha_backend_in_flight",
    "tower_ha_backend_max_in_flight",
    "tower_ha_backend_healthy",
    "tower_ha_backend_available",
];

/// Publishes one counter, `source`'s count `now`: the count itself the
/// first time (a source another handle may have published), unless the
/// source is `new` (made since the handle last published anything of it:
/// its whole count is new), then what it grew by. A backend whose state
/// was replaced (removed and added again: its counts start afresh) adds its
/// new count, so the published counter never goes back, as counters must
/// not. The same state's count can go down a little (a request picked,
/// then dropped before it was sent, is taken back): counting goes on once
/// it passes the highest count published.
fn count<S: PartialEq>(
    name: &'static str,
    labels: &[(&'static str, String)],
    counted: &mut Counted<S>,
    source: S,
    now: u64,
    new: bool,
) {
    let counter = metrics::counter!(name, labels);
    match &counted.source {
        None if !new => counter.absolute(now),
        Some(last) if *last == source => {
            // Unchanged, it is touched still: an exporter that drops the
            // series no one touched for a while (see above) keeps it.
            counter.increment(now.saturating_sub(counted.count));
            if now <= counted.count {
                return;
            }
        }
        _ => counter.increment(now),
    }
    *counted = Counted {
        source: Some(source),
        count: now,
    };
}

fn publish(
    group: &GroupStats,
    published: &mut HashMap<(String, BackendId), Last>,
    seen: &mut HashSet<(String, BackendId)>,
    unseen: Unseen,
) {
    let name = group.name.to_string();
    for b in &group.backends {
        let labels = [("group", name.clone()), ("backend", b.id.to_string())];
        let key = (name.clone(), b.id.clone());
        let new = unseen.holds(b.state);
        let last = published.entry(key.clone()).or_default();
        last.gone = None;
        for (name, counted, now) in [
            (
                "tower_ha_backend_requests_total",
                &mut last.requests,
                b.requests,
            ),
            (
                "tower_ha_backend_failures_total",
                &mut last.failures,
                b.failures,
            ),
            (
                "tower_ha_backend_ejections_total",
                &mut last.ejections,
                u64::from(b.ejections),
            ),
            (
                "tower_ha_backend_ejections_refused_total",
                &mut last.ejections_refused,
                b.ejections_refused,
            ),
        ] {
            count(name, &labels, counted, b.state, now, new);
        }
        metrics::gauge!("tower_ha_backend_in_flight", &labels).set(b.in_flight as f64);
        let max = b.max_in_flight.map_or(0.0, |max| max as f64);
        metrics::gauge!("tower_ha_backend_max_in_flight", &labels).set(max);
        metrics::gauge!("tower_ha_backend_healthy", &labels)
            .set(f64::from(u8::from(b.is_healthy())));
        metrics::gauge!("tower_ha_backend_available", &labels)
            .set(f64::from(u8::from(b.available)));
        if group.mode == GroupMode::ActivePassive {
            let primary = group.current_primary.as_ref() == Some(&b.id);
            metrics::gauge!("tower_ha_group_primary", &labels).set(f64::from(u8::from(primary)));
            last.primary = true;
        } else if last.primary {
            // The group was registered again in another mode: no primary.
            metrics::gauge!("tower_ha_group_primary", &labels).set(0.0);
            last.primary = false;
        }
        seen.insert(key);
    }
    let labels = [("group", name)];
    metrics::gauge!("tower_ha_group_healthy_backends", &labels).set(group.healthy.len() as f64);
    metrics::gauge!("tower_ha_group_failed_backends", &labels).set(group.failed.len() as f64);
}

/// Publishes a group's failover counter, which only goes up: a group
/// registered again with a new `Priority` (its count starts afresh) adds
/// its new count; the time since its last failover, which the new
/// `Priority` (that has seen none yet) does not reset either; and its
/// balancers' refusals (a group registered again over another pool adds
/// that pool's) and requests waiting.
fn publish_group(
    group: &GroupStats,
    published: &mut HashMap<String, LastGroup>,
    now: Instant,
    unseen: Unseen,
) {
    let labels = [("group", group.name.to_string())];
    let last = published
        .entry(group.name.to_string())
        .or_insert_with(|| LastGroup {
            failovers: Counted::default(),
            refusals: Default::default(),
            last_at: None,
            gone: None,
        });
    last.gone = None;
    let new = group.priority.is_some_and(|p| unseen.holds(p));
    count(
        "tower_ha_group_failovers_total",
        &labels,
        &mut last.failovers,
        group.priority,
        group.failovers,
        new,
    );
    if let Some(since) = group.since_last_failover {
        last.last_at = Some(now.checked_sub(since).unwrap_or(now));
    }
    if let Some(at) = last.last_at {
        metrics::gauge!("tower_ha_group_seconds_since_failover", &labels)
            .set(now.saturating_duration_since(at).as_secs_f64());
    }
    metrics::gauge!("tower_ha_group_queued_requests", &labels).set(group.queued as f64);
    let new = unseen.holds(group.pool);
    for ((reason, now), counted) in refusal_counts(&group.refusals)
        .into_iter()
        .zip(&mut last.refusals)
    {
        let labels = [
            ("group", group.name.to_string()),
            ("reason", reason.to_owned()),
        ];
        count(
            "tower_ha_group_refusals_total",
            &labels,
            counted,
            group.pool,
            now,
            new,
        );
    }
}
