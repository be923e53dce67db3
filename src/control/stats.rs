//! Stats snapshots of backends and groups.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

use super::events::Events;
use super::handle::{Group, GroupMode};
use crate::backend::{AdminStatus, BackendId, BackendState, HealthStatus};
use crate::pool::Refusals;
use crate::serial::Serial;

fn opt_unix_millis<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()) {
        Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => s.serialize_none(),
    }
}

fn opt_millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => s.serialize_none(),
    }
}

/// One backend's counters and state at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct BackendStats {
    /// The backend.
    pub id: BackendId,
    /// Requests sent to it.
    pub requests: u64,
    /// Failures the health layer recorded.
    pub failures: u64,
    /// Requests in flight now.
    pub in_flight: usize,
    /// Its limit of requests in flight, if any
    /// ([`BackendState::set_max_in_flight`]).
    pub max_in_flight: Option<usize>,
    /// How many times it was ejected.
    pub ejections: u32,
    /// How many times the cap on ejected backends kept it in when it
    /// would have been ejected ([`BackendState::ejections_refused`]).
    pub ejections_refused: u64,
    /// Whether it is ejected now.
    pub ejected: bool,
    /// How much longer its ejection lasts, if it is ejected now
    /// (milliseconds in JSON, `ejected_for_ms`).
    #[serde(rename = "ejected_for_ms", serialize_with = "opt_millis")]
    pub ejected_for: Option<Duration>,
    /// Its health.
    pub health: HealthStatus,
    /// Its admin status.
    pub admin: AdminStatus,
    /// Its configured weight.
    pub weight: u32,
    /// Whether it takes new requests now.
    pub available: bool,
    /// When an event about it was last emitted, a switch of primary
    /// away from it included (see
    /// [`Events::last_change`](crate::control::Events::last_change);
    /// milliseconds since the Unix epoch in JSON, `last_change_ms`).
    #[serde(rename = "last_change_ms", serialize_with = "opt_unix_millis")]
    pub last_change: Option<SystemTime>,
    /// Which state these counts are of: a backend removed and added again
    /// has a new one, whose counts start from zero.
    #[serde(skip)]
    pub(crate) state: Serial,
}

impl BackendStats {
    pub(super) fn of(id: BackendId, state: &BackendState, events: &Events) -> Self {
        let ejected_for = state
            .ejected_until()
            .map(|until| until.saturating_duration_since(tokio::time::Instant::now()));
        BackendStats {
            last_change: events.last_change(&id),
            id,
            requests: state.requests(),
            failures: state.failures(),
            in_flight: state.in_flight(),
            max_in_flight: state.max_in_flight(),
            ejections: state.ejections(),
            ejections_refused: state.ejections_refused(),
            ejected: ejected_for.is_some(),
            ejected_for,
            health: state.health(),
            admin: state.admin(),
            weight: state.weight(),
            available: state.is_available(),
            state: state.serial(),
        }
    }

    /// Whether health checking counts it as serving: healthy and not
    /// ejected (whatever its admin status).
    pub fn is_healthy(&self) -> bool {
        self.health == HealthStatus::Healthy && !self.ejected
    }
}

/// One group's state at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct GroupStats {
    /// The group's name.
    pub name: Arc<str>,
    /// How it routes.
    pub mode: GroupMode,
    /// The configured primary (active-passive groups).
    pub configured_primary: Option<BackendId>,
    /// The current primary (active-passive groups).
    pub current_primary: Option<BackendId>,
    /// The operator's forced primary, while it holds.
    pub forced_primary: Option<BackendId>,
    /// How many failovers the group made.
    pub failovers: u64,
    /// Time since the last failover (`since_last_failover_ms` in JSON).
    #[serde(rename = "since_last_failover_ms", serialize_with = "opt_millis")]
    pub since_last_failover: Option<Duration>,
    /// Members that are healthy and not ejected.
    pub healthy: Vec<BackendId>,
    /// Members that are unhealthy, turned off or ejected.
    pub failed: Vec<BackendId>,
    /// Every member, in pool order.
    pub backends: Vec<BackendStats>,
    /// Requests waiting for a place on the group's backends (see
    /// [`Balance::queue`](crate::balance::Balance::queue)).
    pub queued: usize,
    /// The requests the group's balancers refused, by reason (see
    /// [`Pool::refusals`](crate::Pool::refusals)).
    pub refusals: Refusals,
    /// Which pool `refusals` are of: a group registered again with
    /// another pool has others, which start from zero.
    #[serde(skip)]
    pub(crate) pool: Serial,
    /// Which [`Priority`](crate::balance::Priority) the failovers are
    /// counted by: a group registered again with a new one has another,
    /// whose count starts from zero.
    #[serde(skip)]
    pub(crate) priority: Option<Serial>,
}

impl GroupStats {
    pub(super) fn of(group: &Group, events: &Events) -> Self {
        let backends: Vec<BackendStats> = group
            .ids()
            .into_iter()
            .filter_map(|id| {
                let state = group.state(&id)?;
                Some(BackendStats::of(id, &state, events))
            })
            .collect();
        let (healthy, failed) = backends
            .iter()
            .partition::<Vec<&BackendStats>, _>(|b| b.is_healthy());
        let priority = group.priority.as_ref();
        // Read under one lock: the primaries and the failover count are of
        // one moment, not before and after a switch.
        let snapshot = priority.map(|p| p.snapshot()).unwrap_or_default();
        let (pool, queued, refusals) = group.pool_counts();
        GroupStats {
            name: group.name.clone(),
            mode: group.mode(),
            configured_primary: priority.and_then(|p| p.configured_primary().cloned()),
            current_primary: snapshot.current,
            forced_primary: snapshot.forced,
            failovers: snapshot.failovers,
            since_last_failover: snapshot.last_failover.map(|at| at.elapsed()),
            healthy: healthy.into_iter().map(|b| b.id.clone()).collect(),
            failed: failed.into_iter().map(|b| b.id.clone()).collect(),
            backends,
            queued,
            refusals,
            pool,
            priority: priority.map(|p| p.serial()),
        }
    }
}
