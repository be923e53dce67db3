//! Active-passive: one primary serves, backups in configured order.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::strategy::{Pick, Strategy};
use crate::backend::BackendId;
use crate::control::{Event, Events, SwitchReason};
use crate::pool::Members;
use crate::serial::Serial;

/// Before any build. It is also the number of an empty default membership,
/// which never caches a pick: a pick on an empty pool returns early.
const NO_BUILD: u64 = 0;

/// When a recovered configured primary takes over again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Failback {
    /// Never on its own: the recovered primary stays a backup until the
    /// current primary fails or an operator
    /// [forces](Priority::force_primary) it back (manual failback).
    #[default]
    Never,
    /// Once the configured primary has been available without interruption
    /// for this long (a flap starts the clock again). Built with
    /// [`Failback::auto`].
    #[non_exhaustive]
    Auto {
        /// How long the configured primary must stay available.
        after_stable_for: Duration,
    },
}

impl Failback {
    /// [`Failback::Auto`]: a recovered configured primary takes over again
    /// once it has been available without interruption for
    /// `after_stable_for`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ha::balance::{Failback, Priority};
    ///
    /// let group = Priority::new("db", ["db1", "db2"]).failback(Failback::auto(Duration::from_secs(30)));
    /// assert!(matches!(
    ///     group.failback_rule(),
    ///     Failback::Auto { after_stable_for, .. } if after_stable_for == Duration::from_secs(30)
    /// ));
    /// ```
    pub const fn auto(after_stable_for: Duration) -> Failback {
        Failback::Auto { after_stable_for }
    }
}

/// A backend's state (its serial) and its count of interruptions: another
/// value later means it was out meanwhile.
type Seen = (Serial, u32);

/// The group's state, shared by every clone of a [`Priority`].
#[derive(Debug)]
struct State {
    /// The group's members, in configured order (as the last table saw them).
    known: Vec<BackendId>,
    current: Option<BackendId>,
    /// The index of `current` in the members of the table with this build
    /// number, so that a steady pick does not look it up by name.
    current_at: (u64, Option<usize>),
    /// The build number of the newest table: a pick with an older one
    /// (loaded just before a membership change) sees an outdated
    /// membership, and switches nothing on its word.
    newest_build: u64,
    forced: Option<BackendId>,
    /// Whether `current` has been a member of the pool that is not waiting
    /// for its first passing probes: until then (a pool that discovery
    /// fills, member by member; a backend started unhealthy), nothing fails
    /// over from it.
    current_seen: bool,
    last_switch: Option<Instant>,
    /// Since when the configured primary has been available, as seen by
    /// picks, and which of its states it was, with its count of
    /// interruptions then.
    primary_available_since: Option<(Instant, Seen)>,
    failovers: u64,
    last_failover: Option<Instant>,
}

impl State {
    /// A group over `order` that has not switched yet: the configured
    /// primary is current.
    fn new(order: &[BackendId]) -> Self {
        State {
            known: order.to_vec(),
            current: order.first().cloned(),
            current_at: (NO_BUILD, None),
            newest_build: NO_BUILD,
            forced: None,
            current_seen: false,
            last_switch: None,
            primary_available_since: None,
            failovers: 0,
            last_failover: None,
        }
    }
}

struct Shared {
    /// Which group state this is: its failover count starts from zero.
    serial: Serial,
    name: Arc<str>,
    order: Vec<BackendId>,
    failback: Failback,
    min_dwell: Duration,
    events: OnceLock<Events>,
    state: Mutex<State>,
}

/// Active-passive: the current primary takes every request while it is
/// available; when it is not, the first available backup *in configured
/// order* takes over (deterministically, never at random) and becomes the
/// primary.
///
/// * **Failback** ([`Failback`]): by default a recovered configured primary
///   stays a backup; with [`Failback::auto`] it takes over again once it has
///   been available without interruption for a while.
/// * **Minimum dwell** ([`min_dwell`](Priority::min_dwell)): a failback
///   waits until the current primary has served at least this long, so a
///   flapping primary cannot switch traffic back and forth. A failover away
///   from an unavailable primary never waits.
/// * **Forced primary** ([`force_primary`](Priority::force_primary)): an
///   operator's choice holds (no failback moves away from it) until it
///   becomes unavailable or is [released](Priority::release).
/// * Failover attempts of one request (the request's
///   [`Attempts`](crate::extensions::Attempts)) go to the next available
///   backend in configured order without changing the primary.
/// * A primary at its limit of requests in flight
///   ([`BackendState::set_max_in_flight`](crate::BackendState::set_max_in_flight))
///   stays the primary, and a request it has no room for goes to the next
///   backend in configured order that has room (or, when none has, waits
///   in the [queue](crate::balance::Balance::queue) if there is one). For
///   a group whose backups must take no requests while the primary
///   serves, leave the primary unlimited.
///
/// Every switch emits exactly one [`Event::PrimaryChanged`], and releasing
/// a forced primary an [`Event::PrimaryReleased`], into the [`Events`]
/// attached with [`events`](Priority::events) (a
/// [`Handle`](crate::control::Handle) attaches its own).
///
/// The group's state (current primary, last switch, since when the
/// configured primary is available) sits behind a small mutex taken once per
/// pick, and is brought up to date by picks: availability is observed
/// when requests arrive. Time is [`tokio::time::Instant`].
///
/// Clones share one group state: use one `Priority` (and its clones) per
/// group, over one pool. Two pools under one state would take each other's
/// changes for their own and stop deciding; a
/// [`BalanceLayer`](super::BalanceLayer) gives each pool it wraps a clone of
/// its strategy, so give each group a layer of its own `Priority`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower::{service_fn, ServiceExt};
/// use tower_ha::balance::{Balance, Priority};
/// use tower_ha::{HealthStatus, Pool};
///
/// let backend = |name: &'static str| {
///     service_fn(move |_req: http::Request<()>| async move {
///         Ok::<_, std::convert::Infallible>(http::Response::new(name))
///     })
/// };
/// let pool = Pool::new();
/// for name in ["db1", "db2", "db3"] {
///     pool.insert(name, backend(name));
/// }
/// let group = Priority::new("db", ["db1", "db2", "db3"]);
/// let balance = Balance::new(pool.clone(), group.clone());
///
/// let served = balance.clone().oneshot(http::Request::new(())).await.unwrap();
/// assert_eq!(*served.body(), "db1");
///
/// pool.state(&"db1".into()).unwrap().set_health(HealthStatus::Unhealthy);
/// let served = balance.clone().oneshot(http::Request::new(())).await.unwrap();
/// assert_eq!(*served.body(), "db2"); // the first backup in order
/// assert_eq!(group.current().unwrap().as_str(), "db2");
///
/// // The recovered primary stays a backup (Failback::Never).
/// pool.state(&"db1".into()).unwrap().set_health(HealthStatus::Healthy);
/// let served = balance.oneshot(http::Request::new(())).await.unwrap();
/// assert_eq!(*served.body(), "db2");
/// # }
/// ```
#[derive(Clone)]
pub struct Priority {
    shared: Arc<Shared>,
}

impl fmt::Debug for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Priority")
            .field("name", &self.shared.name)
            .field("order", &self.shared.order)
            .field("failback", &self.shared.failback)
            .field("min_dwell", &self.shared.min_dwell)
            .field("state", &*self.shared.state.lock())
            .finish()
    }
}

/// A group's state at one moment, for the stats.
#[derive(Debug, Clone, Default)]
pub(crate) struct PrioritySnapshot {
    pub(crate) current: Option<BackendId>,
    pub(crate) forced: Option<BackendId>,
    pub(crate) failovers: u64,
    pub(crate) last_failover: Option<Instant>,
}

/// A table: preference order as member indices.
#[derive(Debug, Clone, Default)]
pub struct PriorityTable {
    order: Vec<usize>,
    /// The configured primary's index, if it is a member.
    primary: Option<usize>,
    /// The membership's epoch: the tables of one snapshot share it.
    build: u64,
}

impl Priority {
    /// A group named `name` whose backends are preferred in `order`: the
    /// first is the configured primary. Pool members missing from `order`
    /// come last, in insertion order. Failback [`Never`](Failback::Never),
    /// no minimum dwell.
    pub fn new<I>(name: impl Into<Arc<str>>, order: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<BackendId>,
    {
        let order: Vec<BackendId> = order.into_iter().map(Into::into).collect();
        let mut deduped: Vec<BackendId> = Vec::with_capacity(order.len());
        for id in order {
            if !deduped.contains(&id) {
                deduped.push(id);
            }
        }
        Priority {
            shared: Arc::new(Shared {
                serial: Serial::take(),
                name: name.into(),
                failback: Failback::Never,
                min_dwell: Duration::ZERO,
                events: OnceLock::new(),
                state: Mutex::new(State::new(&deduped)),
                order: deduped,
            }),
        }
    }

    fn rebuild_with(self, edit: impl FnOnce(&mut Shared)) -> Self {
        // Builders run before the strategy is shared; if it already is,
        // build a fresh group from the settings.
        let mut shared = match Arc::try_unwrap(self.shared) {
            Ok(shared) => shared,
            Err(shared) => Shared {
                serial: Serial::take(),
                name: shared.name.clone(),
                order: shared.order.clone(),
                failback: shared.failback,
                min_dwell: shared.min_dwell,
                events: shared.events.clone(),
                state: Mutex::new(State::new(&shared.order)),
            },
        };
        edit(&mut shared);
        Priority {
            shared: Arc::new(shared),
        }
    }

    /// When a recovered configured primary takes over again (default
    /// [`Failback::Never`]). Set it before cloning: called on a group
    /// already shared, it returns a new group with its own state.
    pub fn failback(self, failback: Failback) -> Self {
        self.rebuild_with(|s| s.failback = failback)
    }

    /// A failback happens only once the current primary has served at
    /// least this long since the last switch (default 0). Set it before
    /// cloning, as [`failback`](Priority::failback).
    pub fn min_dwell(self, dwell: Duration) -> Self {
        self.rebuild_with(|s| s.min_dwell = dwell)
    }

    /// Emits a [`Event::PrimaryChanged`] into `events` on every switch, and
    /// a [`Event::PrimaryReleased`] when a forced primary is released. The
    /// first stream attached stays.
    pub fn events(self, events: Events) -> Self {
        let _ = self.shared.events.set(events);
        self
    }

    /// Emits into `events` unless another stream is attached already;
    /// returns whether switches now go to `events`.
    pub(crate) fn attach_events(&self, events: &Events) -> bool {
        self.shared
            .events
            .get_or_init(|| events.clone())
            .same_stream(events)
    }

    /// The group's name.
    pub fn name(&self) -> &Arc<str> {
        &self.shared.name
    }

    /// The configured order; the first is the configured primary.
    pub fn order(&self) -> &[BackendId] {
        &self.shared.order
    }

    /// The configured primary.
    pub fn configured_primary(&self) -> Option<&BackendId> {
        self.shared.order.first()
    }

    /// The failback rule.
    pub fn failback_rule(&self) -> Failback {
        self.shared.failback
    }

    /// The current primary (as of the last pick or operator action).
    pub fn current(&self) -> Option<BackendId> {
        self.shared.state.lock().current.clone()
    }

    /// The operator's forced primary, while it holds.
    pub fn forced(&self) -> Option<BackendId> {
        self.shared.state.lock().forced.clone()
    }

    /// How many failovers (switches away from an unavailable primary) the
    /// group made.
    pub fn failovers(&self) -> u64 {
        self.shared.state.lock().failovers
    }

    /// When the last failover happened.
    pub fn last_failover(&self) -> Option<Instant> {
        self.shared.state.lock().last_failover
    }

    /// Which group state this is: another `Priority` (not a clone) has
    /// another serial, and counts its failovers from zero.
    pub(crate) fn serial(&self) -> Serial {
        self.shared.serial
    }

    /// The current and forced primaries and the failovers, read at one
    /// moment.
    pub(crate) fn snapshot(&self) -> PrioritySnapshot {
        let state = self.shared.state.lock();
        PrioritySnapshot {
            current: state.current.clone(),
            forced: state.forced.clone(),
            failovers: state.failovers,
            last_failover: state.last_failover,
        }
    }

    /// Makes `id` the primary now, whatever the failback rule and the
    /// minimum dwell; it stays the primary until it becomes unavailable or
    /// [`release`](Priority::release) is called. Emits an
    /// [`Event::PrimaryChanged`] with the reason `forced`, also when `id`
    /// was the primary already (`from` and `to` are then alike). Returns `false` (and
    /// changes nothing) when `id` is not a member of the group. A backend
    /// that is not available when forced stays the primary only until the
    /// next request, which fails over from it
    /// ([`Handle::force_primary`](crate::control::Handle::force_primary)
    /// refuses such a backend).
    pub fn force_primary(&self, id: &BackendId) -> bool {
        let mut state = self.shared.state.lock();
        if !state.known.contains(id) {
            return false;
        }
        state.forced = Some(id.clone());
        // Forcing the current primary switches nothing, but pins it (no
        // failback moves it): the event still says so, with `from` and
        // `to` alike.
        let event = self
            .switch(&mut state, Some(id.clone()), SwitchReason::Forced)
            .unwrap_or_else(|| Event::PrimaryChanged {
                group: self.shared.name.clone(),
                from: Some(id.clone()),
                to: Some(id.clone()),
                reason: SwitchReason::Forced,
            });
        // Emitted under the group's lock, so events follow switch order.
        self.emit(Some(event));
        true
    }

    /// Ends a forced primary: the failback rule applies again. Emits an
    /// [`Event::PrimaryReleased`] when a primary was forced; the primary
    /// itself stays until a failover or a failback moves it.
    pub fn release(&self) {
        let mut state = self.shared.state.lock();
        let released = state.forced.take().map(|backend| Event::PrimaryReleased {
            group: self.shared.name.clone(),
            backend,
        });
        // Emitted under the group's lock, so events follow the group's
        // changes in order.
        self.emit(released);
    }

    /// Records a switch; returns the event to emit once the lock is gone.
    fn switch(
        &self,
        state: &mut State,
        to: Option<BackendId>,
        reason: SwitchReason,
    ) -> Option<Event> {
        if state.current == to {
            return None;
        }
        let now = Instant::now();
        let from = std::mem::replace(&mut state.current, to.clone());
        // Every switch is to a member.
        state.current_seen = to.is_some();
        state.current_at = (NO_BUILD, None);
        state.last_switch = Some(now);
        if reason == SwitchReason::Failover || reason == SwitchReason::Removed {
            state.failovers += 1;
            state.last_failover = Some(now);
        }
        Some(Event::PrimaryChanged {
            group: self.shared.name.clone(),
            from,
            to,
            reason,
        })
    }

    fn emit(&self, event: Option<Event>) {
        if let Some(event) = event {
            match event {
                Event::PrimaryReleased { .. } => {
                    tracing::info!(group = %self.shared.name, ?event, "forced primary released");
                }
                _ => tracing::info!(group = %self.shared.name, ?event, "primary changed"),
            }
            if let Some(events) = self.shared.events.get() {
                events.emit(event);
            }
        }
    }

    /// Decides the primary for this pick; returns its member index (when
    /// it is a member) and the event of a switch.
    fn decide(&self, table: &PriorityTable, pick: &Pick<'_>) -> Option<usize> {
        let mut state = self.shared.state.lock();
        let (primary, event) = self.decide_locked(&mut state, table, pick);
        // Emitted under the group's lock, so events follow switch order.
        // Emitting never waits.
        self.emit(event);
        primary
    }

    fn decide_locked(
        &self,
        state: &mut State,
        table: &PriorityTable,
        pick: &Pick<'_>,
    ) -> (Option<usize>, Option<Event>) {
        let members = pick.members();
        let available = |i: usize| members[i].state().is_available();
        let index_of = |id: &BackendId| members.index_of(id);
        let first_available = || table.order.iter().copied().find(|&i| available(i));
        if table.build < state.newest_build {
            // A membership from before a change: the current primary may be
            // missing from it only because it has just joined. Route by it,
            // and leave the decisions to picks with the newest membership.
            let current = state.current.as_ref().and_then(index_of);
            return (
                current.filter(|&i| available(i)).or_else(first_available),
                None,
            );
        }
        let mut now = None;
        let mut now = || *now.get_or_insert_with(Instant::now);

        // Track the configured primary's uninterrupted availability, out
        // of sight between picks too: an interruption counted since the
        // last pick, or a new state (removed and added again), starts the
        // clock again.
        if let Failback::Auto { .. } = self.shared.failback {
            match table.primary.filter(|&i| available(i)) {
                Some(i) => {
                    let primary = members[i].state();
                    let seen = (primary.serial(), primary.interruptions());
                    match state.primary_available_since {
                        Some((_, then)) if then == seen => {}
                        _ => state.primary_available_since = Some((now(), seen)),
                    }
                }
                None => state.primary_available_since = None,
            }
        }

        let current = if state.current_at.0 == table.build {
            state.current_at.1
        } else {
            let i = state.current.as_ref().and_then(index_of);
            state.current_at = (table.build, i);
            i
        };
        // A member that has been up, or that no health checker holds back
        // until its first probes pass.
        state.current_seen |= current.is_some_and(|i| !members[i].state().is_unproven());
        let current_ok = current.filter(|&i| available(i));

        let Some(cur) = current_ok else {
            if !state.current_seen {
                // The configured primary has not joined the pool yet, or it
                // waits for its first passing probes: requests go to the
                // first available backend in order, and nothing switches,
                // so the primary takes over when it comes up. A group
                // without a configured order takes its first available
                // backend as its primary.
                let next = first_available();
                if state.current.is_none() {
                    state.current = next.map(|i| members[i].id().clone());
                    state.current_at = (table.build, next);
                    state.current_seen = next.is_some();
                }
                return (next, None);
            }
            // Fail over (never waits for the dwell).
            let reason = if current.is_none() && state.current.is_some() {
                SwitchReason::Removed
            } else {
                SwitchReason::Failover
            };
            let next = first_available();
            if next.is_none() {
                // Nothing available: keep the primary as it is (panic
                // routing may still use it), forced or not.
                return (current, None);
            }
            // A switch ends a forced primary.
            state.forced = None;
            let to = next.map(|i| members[i].id().clone());
            let event = self.switch(state, to, reason);
            return (next, event);
        };

        if state.forced.is_some() {
            return (Some(cur), None);
        }
        if let Failback::Auto { after_stable_for } = self.shared.failback {
            if let (Some(p), Some((since, _))) = (table.primary, state.primary_available_since) {
                // The clock is read only while a failback is pending.
                if p != cur
                    && crate::time::elapsed(since, now(), after_stable_for)
                    && state
                        .last_switch
                        .is_none_or(|at| crate::time::elapsed(at, now(), self.shared.min_dwell))
                {
                    let to = Some(members[p].id().clone());
                    let event = self.switch(state, to, SwitchReason::Failback);
                    return (Some(p), event);
                }
            }
        }
        (Some(cur), None)
    }
}

impl Strategy for Priority {
    type Table = PriorityTable;

    fn build(&self, members: &Members) -> PriorityTable {
        let mut order: Vec<usize> = self
            .shared
            .order
            .iter()
            .filter_map(|id| members.index_of(id))
            .collect();
        let mut placed = vec![false; members.len()];
        for &i in &order {
            placed[i] = true;
        }
        order.extend((0..members.len()).filter(|&i| !placed[i]));
        let mut state = self.shared.state.lock();
        state.known = order.iter().map(|&i| members[i].id().clone()).collect();
        // Balancers over one snapshot share its number, so each of them
        // decides; a table of an older membership does not.
        let build = members.epoch();
        state.newest_build = state.newest_build.max(build);
        let primary = self
            .shared
            .order
            .first()
            .and_then(|id| members.index_of(id));
        if primary.is_none() && build == state.newest_build {
            // Out of the pool (dropped by discovery, which keeps its state
            // for its return): its time available starts again when it is
            // back, whether or not a request saw it gone. Not for a late
            // build of an older membership, which picks do not follow.
            state.primary_available_since = None;
        }
        PriorityTable {
            order,
            primary,
            build,
        }
    }

    fn pick(&self, table: &PriorityTable, pick: &Pick<'_>) -> Option<usize> {
        if pick.is_empty() {
            return None;
        }
        let primary = self.decide(table, pick);
        match primary.filter(|&i| pick.is_eligible(i)) {
            Some(i) => Some(i),
            // A retry, or nothing available: the next eligible backend in
            // configured order.
            None => table.order.iter().copied().find(|&i| pick.is_eligible(i)),
        }
    }
}
