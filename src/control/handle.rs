//! Runtime control of groups and backends.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::events::{Event, Events, Holder};
use super::stats::{BackendStats, GroupStats};
use crate::backend::{AdminStatus, BackendId, BackendState};
use crate::balance::{Balance, Priority, Strategy};
use crate::pool::{Pool, Refusals};
use crate::serial::Serial;

/// How a group routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum GroupMode {
    /// One primary at a time, backups in configured order
    /// ([`Priority`]).
    ActivePassive,
    /// Requests spread over every available member, with any other
    /// strategy.
    Normal,
}

/// Why a control action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No group has this name.
    #[error("unknown group `{0}`")]
    UnknownGroup(String),
    /// No group has this backend, nor keeps its state for its return (see
    /// [`Pool::keep_removed_for`]).
    #[error("unknown backend `{0}`")]
    UnknownBackend(String),
    /// The backend is not in the group, for an action on one group.
    #[error("backend `{backend}` is not a member of group `{group}`")]
    #[non_exhaustive]
    NotInGroup {
        /// The group.
        group: String,
        /// The backend.
        backend: String,
    },
    /// The backend cannot take requests now (disabled, draining, unhealthy
    /// or ejected), so it cannot be made the group's primary.
    #[error(
        "backend `{backend}` of group `{group}` is not available \
         (disabled, draining, unhealthy or ejected) and cannot be the primary"
    )]
    #[non_exhaustive]
    Unavailable {
        /// The group.
        group: String,
        /// The backend.
        backend: String,
    },
    /// A group with this name is registered already.
    #[error("a group named `{0}` exists already")]
    DuplicateGroup(String),
    /// The backend is in the group already.
    #[error("backend `{backend}` is in group `{group}` already")]
    #[non_exhaustive]
    DuplicateBackend {
        /// The group.
        group: String,
        /// The backend.
        backend: String,
    },
    /// The action needs an active-passive group.
    #[error("group `{0}` is not active-passive")]
    NotActivePassive(String),
    /// The service given is not of the type the group's pool holds.
    #[error("group `{0}` holds services of another type")]
    ServiceType(String),
    /// A drain deadline needs a tokio runtime to run on.
    #[error("draining with a deadline needs a tokio runtime")]
    NoRuntime,
    /// The group's [`Priority`] emits its switches into another event
    /// stream than the handle's, so the handle would never see them.
    #[error("group `{0}` emits its primary changes into another event stream")]
    OtherEventStream(String),
    /// The group's [`Priority`] has another name, which its events carry:
    /// they would name a group the handle does not know.
    #[error("group `{group}` is served by the Priority of group `{priority}`; register it under that name")]
    #[non_exhaustive]
    GroupName {
        /// The name the group was to be registered under.
        group: String,
        /// The [`Priority`]'s name.
        priority: String,
    },
}

/// What the handle needs of a pool, whatever its service type.
trait PoolOps: Send + Sync {
    fn ids(&self) -> Vec<BackendId>;
    fn state(&self, id: &BackendId) -> Option<Arc<BackendState>>;
    /// The state of `id` and whether it is live, or else the state kept
    /// for its return, read at one moment.
    fn live_or_kept_state(&self, id: &BackendId) -> Option<(Arc<BackendState>, bool)>;
    /// Sets the admin status of the state [`live_or_kept_state`] finds, at
    /// that moment; returns it, whether it is live, and its status before.
    ///
    /// [`live_or_kept_state`]: PoolOps::live_or_kept_state
    fn set_admin(
        &self,
        id: &BackendId,
        admin: AdminStatus,
    ) -> Option<(Arc<BackendState>, bool, AdminStatus)>;
    /// Removes `id`, or forgets the state kept for its return; whether
    /// either was there.
    fn remove(&self, id: &BackendId) -> bool;
    fn set_weight(&self, id: &BackendId, weight: u32) -> bool;
    fn as_any(&self) -> &dyn Any;
    fn serial(&self) -> Serial;
    fn waiting(&self) -> usize;
    fn refusals(&self) -> Refusals;
}

impl<S: Clone + Send + Sync + 'static> PoolOps for Pool<S> {
    fn ids(&self) -> Vec<BackendId> {
        Pool::ids(self)
    }
    fn state(&self, id: &BackendId) -> Option<Arc<BackendState>> {
        Pool::state(self, id)
    }
    fn live_or_kept_state(&self, id: &BackendId) -> Option<(Arc<BackendState>, bool)> {
        Pool::live_or_kept_state(self, id)
    }
    fn set_admin(
        &self,
        id: &BackendId,
        admin: AdminStatus,
    ) -> Option<(Arc<BackendState>, bool, AdminStatus)> {
        Pool::set_admin_of(self, id, admin)
    }
    fn remove(&self, id: &BackendId) -> bool {
        Pool::remove_or_forget(self, id)
    }
    fn set_weight(&self, id: &BackendId, weight: u32) -> bool {
        Pool::set_weight_or_kept(self, id, weight)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn serial(&self) -> Serial {
        Pool::serial(self)
    }
    fn waiting(&self) -> usize {
        Pool::waiting(self)
    }
    fn refusals(&self) -> Refusals {
        Pool::refusals(self)
    }
}

pub(super) struct Group {
    pub(super) name: Arc<str>,
    pool: Box<dyn PoolOps>,
    pub(super) priority: Option<Priority>,
}

impl Group {
    pub(super) fn mode(&self) -> GroupMode {
        if self.priority.is_some() {
            GroupMode::ActivePassive
        } else {
            GroupMode::Normal
        }
    }

    pub(super) fn ids(&self) -> Vec<BackendId> {
        self.pool.ids()
    }

    pub(super) fn state(&self, id: &BackendId) -> Option<Arc<BackendState>> {
        self.pool.state(id)
    }

    /// Which pool it is over, the requests waiting there, and its
    /// balancers' refusals.
    pub(super) fn pool_counts(&self) -> (Serial, usize, Refusals) {
        (
            self.pool.serial(),
            self.pool.waiting(),
            self.pool.refusals(),
        )
    }
}

/// A drain waiting for its deadline.
struct PendingDrain {
    /// Unique across backends and removals: a deadline set before a
    /// backend was removed never matches a drain after its return.
    epoch: u64,
    timer: Option<tokio::task::AbortHandle>,
}

impl PendingDrain {
    fn end(self) {
        if let Some(timer) = self.timer {
            timer.abort();
        }
    }
}

pub(super) struct Inner {
    events: Events,
    groups: RwLock<Vec<Arc<Group>>>,
    drain_deadline: Mutex<Option<Duration>>,
    /// The drains whose deadline is pending, by backend: a later action
    /// on the backend ends its timer. Actions on backends take this lock
    /// too, so that their changes, and the events that report them, come
    /// in one order.
    drains: Mutex<HashMap<BackendId, PendingDrain>>,
    /// Where the drains' numbers come from.
    epoch_seq: AtomicU64,
    /// The failover and sticky layers whose counters are reported.
    layers: RwLock<super::layers::Layers>,
    /// What was last published through the `metrics` facade.
    #[cfg(feature = "metrics")]
    published: Mutex<super::metrics::Published>,
}

impl Holder for Inner {
    /// A live member only: a state kept for a backend's return would keep
    /// its last change for good (nothing asks again when the state goes).
    fn holds(&self, id: &BackendId) -> bool {
        self.groups
            .read()
            .iter()
            .any(|g| g.pool.state(id).is_some())
    }
}

/// Runtime control of one or more groups: drain, disable and enable
/// backends, set weights, force a primary, add and remove backends; every
/// change an action makes is an [`Event`] (disabling a disabled backend
/// changes nothing, and emits none). Also the source of
/// [stats](Handle::stats).
///
/// Cloning is cheap and yields a handle to the same groups. Register each
/// group's [`Balance`] with [`add_group`](Handle::add_group); a
/// [`Priority`] strategy makes it an active-passive group.
///
/// A backend id names the same backend in every group it belongs to:
/// actions by backend id apply to all of them.
///
/// # Drain
///
/// [`drain`](Handle::drain) sets the backend
/// [`Draining`](AdminStatus::Draining): it takes no new request or session,
/// and requests in flight finish. After the drain deadline (see
/// [`drain_deadline`](Handle::drain_deadline)) a backend still draining
/// becomes [`Disabled`](AdminStatus::Disabled): its sticky sessions, which
/// may stay on a draining backend, then move elsewhere because the backend
/// is unavailable. Draining a backend that drains already keeps its
/// deadline.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower::{service_fn, ServiceExt};
/// use tower_ha::balance::{Balance, Priority};
/// use tower_ha::control::{Event, Events, Handle};
/// use tower_ha::{AdminStatus, Pool};
///
/// let backend = |name: &'static str| {
///     service_fn(move |_req: http::Request<()>| async move {
///         Ok::<_, std::convert::Infallible>(http::Response::new(name))
///     })
/// };
/// let pool = Pool::new();
/// for name in ["web1", "web2"] {
///     pool.insert(name, backend(name));
/// }
/// let balance = Balance::new(pool.clone(), Priority::new("web", ["web1", "web2"]));
///
/// let handle = Handle::new(Events::default());
/// handle.add_group("web", &balance).unwrap();
/// handle.drain(&"web1".into()).unwrap();
/// assert_eq!(pool.state(&"web1".into()).unwrap().admin(), AdminStatus::Draining);
///
/// let served = balance.oneshot(http::Request::new(())).await.unwrap();
/// assert_eq!(*served.body(), "web2");
/// let stats = handle.group_stats("web").unwrap();
/// assert_eq!(stats.current_primary.unwrap().as_str(), "web2");
/// assert!(matches!(handle.events().history()[0].event, Event::AdminChanged { .. }));
/// # }
/// ```
#[derive(Clone)]
pub struct Handle {
    inner: Arc<Inner>,
    /// Held by the handle's clones alone, not by the tasks that act for
    /// them (a drain's deadline): the metrics task ends when the last
    /// clone is gone, even while a deadline keeps `inner` alive.
    clones: Arc<()>,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups: Vec<_> = self
            .inner
            .groups
            .read()
            .iter()
            .map(|g| g.name.clone())
            .collect();
        f.debug_struct("Handle")
            .field("groups", &groups)
            .field("drain_deadline", &self.deadline())
            .finish()
    }
}

/// A [`Handle`] that its clones alone keep alive.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(super) struct WeakHandle {
    inner: std::sync::Weak<Inner>,
    clones: std::sync::Weak<()>,
}

impl WeakHandle {
    /// The handle, while a clone of it is alive.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(super) fn upgrade(&self) -> Option<Handle> {
        Some(Handle {
            clones: self.clones.upgrade()?,
            inner: self.inner.upgrade()?,
        })
    }
}

/// Every distinct state of backend `id` an action reaches: those the
/// groups hold, then those their pools keep for its return after their
/// discovery removed it (it comes back with them).
fn reached_states(inner: &Inner, id: &BackendId) -> Vec<Arc<BackendState>> {
    held_states(inner, id)
        .into_iter()
        .map(|(state, _)| state)
        .collect()
}

/// The distinct states of backend `id` in the groups' pools, each with
/// whether a pool holds it live: the live ones first, then those only kept
/// for the backend's return.
fn held_states(inner: &Inner, id: &BackendId) -> Vec<(Arc<BackendState>, bool)> {
    gather(inner, |pool| {
        let (state, live) = pool.live_or_kept_state(id)?;
        Some((state, live, ()))
    })
    .into_iter()
    .map(|(state, live, ())| (state, live))
    .collect()
}

/// The [`Priority`] of an active-passive group's balancer: its strategy,
/// or the one a [`GroupStrategy`](super::GroupStrategy) holds.
fn priority_of<S, P: Strategy>(balance: &Balance<S, P>) -> Option<Priority> {
    let strategy: &dyn Any = balance.strategy();
    strategy
        .downcast_ref::<Priority>()
        .cloned()
        .or_else(|| super::group_priority(strategy))
}

/// The distinct states `each` finds in the groups' pools (with whether the
/// pool holds it live, and what else it tells of it), each with whether a
/// pool holds it live and what `each` told of it first: the live ones
/// first, then those only kept for the backend's return.
fn gather<T>(
    inner: &Inner,
    mut each: impl FnMut(&dyn PoolOps) -> Option<(Arc<BackendState>, bool, T)>,
) -> Vec<(Arc<BackendState>, bool, T)> {
    let groups = inner.groups.read();
    let mut states: Vec<(Arc<BackendState>, bool, T)> = Vec::new();
    for (state, live, told) in groups.iter().filter_map(|g| each(&*g.pool)) {
        match states.iter_mut().find(|(s, ..)| Arc::ptr_eq(s, &state)) {
            // A state live in one pool and kept by another is live.
            Some((_, seen_live, _)) => *seen_live |= live,
            None => states.push((state, live, told)),
        }
    }
    // Stable: the groups' order within each kind.
    states.sort_by_key(|(_, live, _)| !live);
    states
}

impl Handle {
    /// A handle with no group that emits into `events`; drained backends
    /// are disabled after 30 s.
    pub fn new(events: Events) -> Self {
        let handle = Handle {
            clones: Arc::new(()),
            inner: Arc::new(Inner {
                events,
                groups: RwLock::new(Vec::new()),
                drain_deadline: Mutex::new(Some(Duration::from_secs(30))),
                drains: Mutex::new(HashMap::new()),
                epoch_seq: AtomicU64::new(0),
                layers: RwLock::default(),
                #[cfg(feature = "metrics")]
                published: Mutex::default(),
            }),
        };
        // A health checker's or a resolver's removal from one group's pool
        // does not forget the last change of a backend another group
        // holds.
        let holder: Weak<Inner> = Arc::downgrade(&handle.inner);
        handle.inner.events.add_holder(holder);
        handle
    }

    /// How long a drained backend keeps its sticky sessions before it is
    /// disabled (default 30 s); `None` keeps it draining until an operator
    /// acts. Set for every clone of the handle; a drain already under way
    /// keeps the deadline it started with.
    pub fn drain_deadline(self, deadline: Option<Duration>) -> Self {
        *self.inner.drain_deadline.lock() = deadline;
        self
    }

    /// The drain deadline now set.
    fn deadline(&self) -> Option<Duration> {
        *self.inner.drain_deadline.lock()
    }

    pub(super) fn layers(&self) -> &RwLock<super::layers::Layers> {
        &self.inner.layers
    }

    #[cfg(feature = "metrics")]
    pub(super) fn published(&self) -> &Mutex<super::metrics::Published> {
        &self.inner.published
    }

    /// The handle, held by none of its clones: upgraded back while a clone
    /// of the handle is alive.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(super) fn downgrade(&self) -> WeakHandle {
        WeakHandle {
            inner: Arc::downgrade(&self.inner),
            clones: Arc::downgrade(&self.clones),
        }
    }
    /// The event stream every action's changes are emitted into.
    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    /// Registers the group `name`, served by `balance`. A [`Priority`]
    /// strategy makes it active-passive, and its primary switches are
    /// emitted into this handle's events; a `Priority` given another event
    /// stream already is refused ([`ControlError::OtherEventStream`]), and
    /// so is one of another name ([`ControlError::GroupName`]: its events
    /// carry its own).
    pub fn add_group<S, P>(
        &self,
        name: impl Into<Arc<str>>,
        balance: &Balance<S, P>,
    ) -> Result<(), ControlError>
    where
        S: Clone + Send + Sync + 'static,
        P: Strategy,
    {
        self.add_pool(name, balance.pool().clone(), priority_of(balance))
    }

    /// Registers the group `name` over `pool`, active-passive when
    /// `priority` is given (of the same name, as for
    /// [`add_group`](Self::add_group)).
    pub fn add_pool<S>(
        &self,
        name: impl Into<Arc<str>>,
        pool: Pool<S>,
        priority: Option<Priority>,
    ) -> Result<(), ControlError>
    where
        S: Clone + Send + Sync + 'static,
    {
        let name = name.into();
        let mut groups = self.inner.groups.write();
        if groups.iter().any(|g| g.name == name) {
            return Err(ControlError::DuplicateGroup(name.to_string()));
        }
        groups.push(self.group_of(name, pool, priority)?);
        Ok(())
    }

    /// The group `name` over `pool`, checked as [`add_pool`](Self::add_pool)
    /// checks it.
    fn group_of<S>(
        &self,
        name: Arc<str>,
        pool: Pool<S>,
        priority: Option<Priority>,
    ) -> Result<Arc<Group>, ControlError>
    where
        S: Clone + Send + Sync + 'static,
    {
        if let Some(p) = &priority {
            if *p.name() != name {
                return Err(ControlError::GroupName {
                    group: name.to_string(),
                    priority: p.name().to_string(),
                });
            }
            if !p.attach_events(&self.inner.events) {
                return Err(ControlError::OtherEventStream(name.to_string()));
            }
        }
        Ok(Arc::new(Group {
            name,
            pool: Box::new(pool),
            priority,
        }))
    }

    /// Puts `balance` in the place of the registered group `name`, in one
    /// step, as a configuration reload needs: no action or stats call in
    /// between finds the group missing (as one between
    /// [`remove_group`](Self::remove_group) and
    /// [`add_group`](Self::add_group) would), and it keeps its place in the
    /// order of groups. Checked as `add_group` checks a group. Build
    /// `balance` with [`GroupConfig::rebuild`](crate::config::GroupConfig::rebuild)
    /// (or over [`BackendState`](crate::BackendState)s shared with the
    /// running group's pool) so that its backends keep their admin status,
    /// drains and health; a drain under way ends at its deadline in both
    /// pools. The replaced group's `Balance` still serves whoever holds it.
    pub fn replace_group<S, P>(
        &self,
        name: &str,
        balance: &Balance<S, P>,
    ) -> Result<(), ControlError>
    where
        S: Clone + Send + Sync + 'static,
        P: Strategy,
    {
        let priority = priority_of(balance);
        let mut groups = self.inner.groups.write();
        let at = groups
            .iter()
            .position(|g| &*g.name == name)
            .ok_or_else(|| ControlError::UnknownGroup(name.to_owned()))?;
        let name = groups[at].name.clone();
        groups[at] = self.group_of(name, balance.pool().clone(), priority)?;
        Ok(())
    }

    /// Unregisters group `name`: the handle no longer lists, controls or
    /// reports it (LEBA's "delete group"). Its `Balance` still serves its
    /// pool for whoever holds it, so a drain under way still ends in a
    /// disable at its deadline. The name can be registered again.
    pub fn remove_group(&self, name: &str) -> Result<(), ControlError> {
        let removed = {
            let mut groups = self.inner.groups.write();
            let at = groups
                .iter()
                .position(|g| &*g.name == name)
                .ok_or_else(|| ControlError::UnknownGroup(name.to_owned()))?;
            groups.remove(at)
        };
        self.inner.events.emit(Event::GroupRemoved {
            group: removed.name.clone(),
        });
        Ok(())
    }

    pub(super) fn groups(&self) -> Vec<Arc<Group>> {
        self.inner.groups.read().clone()
    }

    pub(super) fn group(&self, name: &str) -> Result<Arc<Group>, ControlError> {
        self.inner
            .groups
            .read()
            .iter()
            .find(|g| &*g.name == name)
            .cloned()
            .ok_or_else(|| ControlError::UnknownGroup(name.to_owned()))
    }

    /// The names of the registered groups, in registration order.
    pub fn group_names(&self) -> Vec<Arc<str>> {
        self.inner
            .groups
            .read()
            .iter()
            .map(|g| g.name.clone())
            .collect()
    }

    /// Every distinct state of backend `id` an action reaches (see
    /// [`reached_states`]); unknown when there is none.
    fn states(&self, id: &BackendId) -> Result<Vec<Arc<BackendState>>, ControlError> {
        let states = reached_states(&self.inner, id);
        if states.is_empty() {
            return Err(ControlError::UnknownBackend(id.to_string()));
        }
        Ok(states)
    }

    /// Sets the admin status of every state of `id`; returns them, and for
    /// a drain with a `deadline`, the epoch the deadline's timer checks
    /// (none when the backend was draining already: a drain again does not
    /// put its deadline off).
    fn set_admin(
        &self,
        id: &BackendId,
        to: AdminStatus,
        deadline: Option<Duration>,
    ) -> Result<(Vec<Arc<BackendState>>, Option<u64>), ControlError> {
        // This action ends a drain's pending deadline; a drain starts one.
        let epoch = self.inner.epoch_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let (states, ended) = {
            // The states change, and the event is emitted, under the lock
            // a drain's deadline takes, so that actions and deadlines apply
            // in one order and the events say them in that order. The
            // states are collected under it too, so that a copy of the
            // backend added meanwhile to another group is among them.
            let mut drains = self.inner.drains.lock();
            // Each set as its pool finds it, under the pool's lock: the
            // health checker's `removed_after` spares a backend the
            // operator took out, and checks under that lock too, so a
            // backend it removes at this moment is either gone or spared.
            let set = gather(&self.inner, |pool| pool.set_admin(id, to));
            if set.is_empty() {
                return Err(ControlError::UnknownBackend(id.to_string()));
            }
            // The backend's states in several groups may have differed: the
            // event says what the first that changed was.
            let from = set.iter().map(|(_, _, was)| *was).find(|was| *was != to);
            let states: Vec<_> = set.into_iter().map(|(state, ..)| state).collect();
            if let Some(from) = from {
                self.inner.events.emit(Event::AdminChanged {
                    backend: id.clone(),
                    from,
                    to,
                    reason: "operator".into(),
                });
            }
            match to {
                // Draining already: the drain under way keeps its deadline,
                // also when deadlines were turned off since.
                AdminStatus::Draining if from.is_none() && drains.contains_key(id) => {
                    return Ok((states, None));
                }
                // A deadline to come (its timer is set once the lock is
                // gone). Without one there is nothing to keep: an entry
                // would stay until the next action on the backend, for
                // good if it leaves every group first.
                AdminStatus::Draining if deadline.is_some() => {
                    let ended = drains.insert(id.clone(), PendingDrain { epoch, timer: None });
                    (states, ended)
                }
                _ => (states, drains.remove(id)),
            }
        };
        if let Some(ended) = ended {
            ended.end();
        }
        Ok((states, Some(epoch)))
    }

    /// Drains backend `id` in every group: no new request or session;
    /// requests in flight finish; after the drain deadline it is disabled
    /// (its sticky sessions then move) and its tunnels still open are
    /// closed (see [`close_tunnels`](Self::close_tunnels)), also if the
    /// handle is dropped before then. Needs a tokio runtime with its time driver when a
    /// deadline is set: outside a runtime it fails with
    /// [`ControlError::NoRuntime`]; on a runtime without timers it returns
    /// `Ok`, but the deadline's task panics and the backend stays draining
    /// until it is enabled or disabled.
    pub fn drain(&self, id: &BackendId) -> Result<(), ControlError> {
        // Read once: the drain keeps it, whatever is set meanwhile.
        let deadline = self.deadline();
        let runtime = match deadline {
            Some(_) => {
                Some(tokio::runtime::Handle::try_current().map_err(|_| ControlError::NoRuntime)?)
            }
            None => None,
        };
        let (states, epoch) = self.set_admin(id, AdminStatus::Draining, deadline)?;
        if let (Some(deadline), Some(runtime), Some(epoch)) = (deadline, runtime, epoch) {
            // The deadline holds when every clone of the handle is gone
            // before it (the handle of a configuration since reloaded):
            // the backend is still drained in its groups.
            let inner = self.inner.clone();
            let backend = id.clone();
            // The deadline counts from now, not from when the task first runs.
            let until = crate::time::later(tokio::time::Instant::now(), deadline);
            let timer = runtime.spawn(async move {
                tokio::time::sleep_until(until).await;
                let id = backend;
                let mut changed = false;
                // Under the lock an action takes too: none can come
                // between the check and the disable, or before its event.
                let mut drains = inner.drains.lock();
                if drains.get(&id).map(|d| d.epoch) != Some(epoch) {
                    return; // a later action decides
                }
                drains.remove(&id);
                // The states it drained (in a group unregistered since,
                // say), those the groups hold now (added since, with its
                // status) and those their pools keep for the backend's
                // return: only a change of the latter two is the event's.
                let held = reached_states(&inner, &id);
                for state in states.iter().chain(&held) {
                    if state.admin() == AdminStatus::Draining {
                        state.set_admin(AdminStatus::Disabled);
                        // A drain ends with the backend empty.
                        state.close_tunnels();
                        changed |= held.iter().any(|h| Arc::ptr_eq(h, state));
                    }
                }
                if changed {
                    inner.events.emit(Event::AdminChanged {
                        backend: id,
                        from: AdminStatus::Draining,
                        to: AdminStatus::Disabled,
                        reason: "drain deadline".into(),
                    });
                }
            });
            // Unless a later action came meanwhile, it ends the timer.
            match self.inner.drains.lock().get_mut(id) {
                Some(drain) if drain.epoch == epoch => drain.timer = Some(timer.abort_handle()),
                _ => timer.abort(),
            }
        }
        Ok(())
    }

    /// Disables backend `id` in every group (a manual override: no traffic
    /// at all, whatever its health).
    pub fn disable(&self, id: &BackendId) -> Result<(), ControlError> {
        self.set_admin(id, AdminStatus::Disabled, None).map(drop)
    }

    /// Enables backend `id` in every group again (ends a drain or a
    /// disable); its health still counts.
    pub fn enable(&self, id: &BackendId) -> Result<(), ControlError> {
        self.set_admin(id, AdminStatus::Enabled, None).map(drop)
    }

    /// Closes the tunnels (WebSockets) open to backend `id` in every group
    /// (see [`BackendState::close_tunnels`]): their clients reconnect to a
    /// backend that may take them. Nothing else changes: drain or disable
    /// it first so that they do not come back to it. Close them before
    /// removing the backend: a backend no group holds is unknown here, and
    /// one removed and added again (by hand, after the health checker's
    /// `removed_after`, or by its discovery after the pool's
    /// `keep_removed_for`) starts with a new state, which the tunnels
    /// opened before do not belong to.
    pub fn close_tunnels(&self, id: &BackendId) -> Result<(), ControlError> {
        for state in self.states(id)? {
            state.close_tunnels();
        }
        Ok(())
    }

    /// Sets the weight of backend `id` in every group (0 counts as 1).
    pub fn set_weight(&self, id: &BackendId, weight: u32) -> Result<(), ControlError> {
        // Under the actions' lock, so that the events of concurrent calls
        // come in the order of their changes.
        let _actions = self.inner.drains.lock();
        // A weight every state has already is no change, and no event.
        let changed = reached_states(&self.inner, id)
            .iter()
            .any(|state| state.weight() != weight.max(1));
        let mut found = false;
        for group in self.groups() {
            // Also a state kept for the backend's return.
            found |= group.pool.set_weight(id, weight);
        }
        if !found {
            return Err(ControlError::UnknownBackend(id.to_string()));
        }
        if changed {
            self.inner.events.emit(Event::WeightChanged {
                backend: id.clone(),
                weight: weight.max(1),
            });
        }
        Ok(())
    }

    /// Sets the limit of requests in flight of backend `id` in every group
    /// (see [`BackendState::set_max_in_flight`]; `None` lifts it, as does
    /// `usize::MAX`, and 0 counts as 1). Groups whose pools share the
    /// backend's state share one limit and one count; in groups with states
    /// of their own, each has this limit.
    pub fn set_max_in_flight(
        &self,
        id: &BackendId,
        max_in_flight: Option<usize>,
    ) -> Result<(), ControlError> {
        let _actions = self.inner.drains.lock();
        // As a state keeps it: no limit is `usize::MAX`.
        let max_in_flight = max_in_flight.map(|m| m.max(1)).filter(|&m| m != usize::MAX);
        let mut changed = false;
        for state in self.states(id)? {
            changed |= state.max_in_flight() != max_in_flight;
            state.set_max_in_flight(max_in_flight);
        }
        // A limit every state has already is no change, and no event.
        if changed {
            self.inner.events.emit(Event::LimitChanged {
                backend: id.clone(),
                max_in_flight,
            });
        }
        Ok(())
    }

    /// Forces the primary of active-passive group `group` to `id` (see
    /// [`Priority::force_primary`]); refused when `id` is not available
    /// now.
    pub fn force_primary(&self, group: &str, id: &BackendId) -> Result<(), ControlError> {
        let g = self.group(group)?;
        let priority = g
            .priority
            .as_ref()
            .ok_or_else(|| ControlError::NotActivePassive(group.to_owned()))?;
        let in_group = || ControlError::NotInGroup {
            group: group.to_owned(),
            backend: id.to_string(),
        };
        let state = g.pool.state(id).ok_or_else(in_group)?;
        // Forced onto a backend that cannot serve, the group would fail
        // over again at its next request. Checked and forced under the
        // lock of the actions, so that a disable or drain through the
        // handle comes before the check or after the force.
        let _actions = self.inner.drains.lock();
        if !state.is_available() {
            return Err(ControlError::Unavailable {
                group: group.to_owned(),
                backend: id.to_string(),
            });
        }
        if !priority.force_primary(id) {
            return Err(in_group());
        }
        Ok(())
    }

    /// Ends a forced primary in group `group`: its failback rule applies
    /// again. Emits an [`Event::PrimaryReleased`] when a primary was forced
    /// (see [`Priority::release`]).
    pub fn release_primary(&self, group: &str) -> Result<(), ControlError> {
        let g = self.group(group)?;
        let priority = g
            .priority
            .as_ref()
            .ok_or_else(|| ControlError::NotActivePassive(group.to_owned()))?;
        priority.release();
        Ok(())
    }

    /// Adds backend `id` with `service` to group `group`. The service must
    /// be of the type the group's pool holds. A backend of that id in
    /// other groups gives it its admin status (disabled, or draining
    /// toward the same deadline), and the weight and the limit of
    /// requests in flight it has in all of them (as
    /// [`set_weight`](Self::set_weight) and
    /// [`set_max_in_flight`](Self::set_max_in_flight) set them).
    pub fn add_backend<S>(
        &self,
        group: &str,
        id: impl Into<BackendId>,
        service: S,
    ) -> Result<(), ControlError>
    where
        S: Clone + Send + Sync + 'static,
    {
        let id = id.into();
        let g = self.group(group)?;
        let pool = g
            .pool
            .as_any()
            .downcast_ref::<Pool<S>>()
            .ok_or_else(|| ControlError::ServiceType(group.to_owned()))?;
        // Under the actions' lock: of two concurrent additions of one id,
        // the second finds the first's backend.
        let _actions = self.inner.drains.lock();
        // Also from a state kept for the backend's return elsewhere, which
        // an action may have set.
        let states = reached_states(&self.inner, &id);
        let admin = states.first().map(|state| state.admin());
        // A weight or a limit the backend has in every group (as the
        // actions by id set them); groups that differ keep their own.
        fn shared<T: PartialEq>(
            states: &[Arc<BackendState>],
            setting: impl Fn(&BackendState) -> T,
        ) -> Option<T> {
            let (first, rest) = states.split_first()?;
            let value = setting(first);
            rest.iter()
                .all(|state| setting(state) == value)
                .then_some(value)
        }
        let weight = shared(&states, BackendState::weight);
        let limit = shared(&states, BackendState::max_in_flight);
        // These are the backend's before any balancer can see it; a
        // member already (added by a discovery stream, say) is left as it
        // is.
        let added = pool.insert_new(id.clone(), service, |state| {
            if let Some(admin) = admin {
                state.set_admin(admin);
            }
            if let Some(weight) = weight {
                state.store_weight(weight);
            }
            if let Some(limit) = limit {
                state.set_max_in_flight(limit);
            }
        });
        if !added {
            return Err(ControlError::DuplicateBackend {
                group: group.to_owned(),
                backend: id.to_string(),
            });
        }
        self.inner.events.emit(Event::BackendAdded {
            group: Some(g.name.clone()),
            backend: id,
        });
        Ok(())
    }

    /// Removes backend `id` from group `group`; requests in flight finish.
    /// A backend the group's discovery took out for a moment (its state
    /// kept for its return, see [`Pool::keep_removed_for`]) is removed
    /// too: its kept state is forgotten, so it comes back afresh.
    ///
    /// [`Pool::keep_removed_for`]: crate::Pool::keep_removed_for
    pub fn remove_backend(&self, group: &str, id: &BackendId) -> Result<(), ControlError> {
        let g = self.group(group)?;
        // Under the lock actions take: the removal and its event come in
        // one order with theirs.
        let _actions = self.inner.drains.lock();
        if !g.pool.remove(id) {
            return Err(ControlError::NotInGroup {
                group: group.to_owned(),
                backend: id.to_string(),
            });
        }
        let event = Event::BackendRemoved {
            group: Some(g.name.clone()),
            backend: id.clone(),
            reason: "operator".into(),
        };
        // Gone from every group, its last change is forgotten in time
        // (also while a pool keeps its state for its return: an addition
        // brings it back); in a group that still holds it, it stands (as
        // the events ask this handle). A drain under way goes
        // on to its deadline either way: a group removed from the handle
        // may still hold and serve the backend, and the deadline leaves
        // alone a state that is not draining (one added again since).
        self.inner.events.emit(event);
        Ok(())
    }

    /// A snapshot of every group's stats, in registration order.
    pub fn stats(&self) -> Vec<GroupStats> {
        self.groups()
            .iter()
            .map(|g| GroupStats::of(g, &self.inner.events))
            .collect()
    }

    /// A snapshot of group `name`'s stats.
    pub fn group_stats(&self, name: &str) -> Result<GroupStats, ControlError> {
        let group = self.group(name)?;
        Ok(GroupStats::of(&group, &self.inner.events))
    }

    /// A snapshot of backend `id`'s stats (from the first group that has
    /// it). A backend no group has, whose state a group's pool keeps for
    /// its return after its discovery dropped it, reports that state, not
    /// [`available`](BackendStats::available).
    pub fn backend_stats(&self, id: &BackendId) -> Result<BackendStats, ControlError> {
        let (state, live) = held_states(&self.inner, id)
            .into_iter()
            .next()
            .ok_or_else(|| ControlError::UnknownBackend(id.to_string()))?;
        let mut stats = BackendStats::of(id.clone(), &state, &self.inner.events);
        stats.available &= live;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{Balance, RoundRobin};
    use crate::pool::Pool;

    /// Without a deadline a drain has nothing pending: a backend drained,
    /// then removed from its group, leaves nothing behind.
    #[test]
    fn a_drain_without_a_deadline_keeps_nothing() {
        let pool = Pool::new();
        pool.insert(
            "a",
            tower::service_fn(|_: http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(()))
            }),
        );
        let handle = Handle::new(Events::default()).drain_deadline(None);
        handle
            .add_group("g", &Balance::new(pool.clone(), RoundRobin::new()))
            .unwrap();
        handle.drain(&"a".into()).unwrap();
        assert_eq!(
            pool.state(&"a".into()).unwrap().admin(),
            AdminStatus::Draining
        );
        pool.remove(&"a".into());
        assert!(handle.inner.drains.lock().is_empty());
    }

    /// Discovery takes a backend out and puts it back, over and over: an
    /// action finds it each time, live or kept for its return, never in
    /// neither.
    #[test]
    fn an_action_reaches_a_backend_discovery_is_putting_back() {
        use tower::discover::Change;
        let pool = Pool::new();
        pool.insert("a", 0u8);
        let handle = Handle::new(Events::default());
        handle.add_pool("g", pool.clone(), None).unwrap();
        let churn = std::thread::spawn(move || {
            let changes = futures::stream::iter((0..20_000).flat_map(|_| {
                [
                    Ok::<_, std::convert::Infallible>(Change::Remove("a")),
                    Ok(Change::Insert("a", 0u8)),
                ]
            }));
            futures::executor::block_on(pool.discover(changes)).unwrap();
        });
        let (mut actions, mut misses) = (0u32, 0u32);
        loop {
            let id = "a".into();
            let action = if actions % 2 == 0 {
                handle.disable(&id)
            } else {
                handle.enable(&id)
            };
            actions += 1;
            misses += u32::from(action.is_err());
            if churn.is_finished() {
                break;
            }
        }
        churn.join().unwrap();
        assert_eq!(
            misses, 0,
            "{misses} of {actions} actions missed the backend"
        );
    }
}
