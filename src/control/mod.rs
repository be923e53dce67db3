//! Runtime control, events and stats: [`Handle`], [`Events`], [`GroupStats`].
//!
//! * [`Events`]: one stream of [`Event`]s (backend added or removed, admin
//!   and health changes, ejections and restorations, primary changes,
//!   forced primaries released,
//!   sessions moved, failover attempts) to any number of subscribers
//!   through a bounded broadcast channel (a slow subscriber learns how
//!   many events it missed; emitting never waits), plus a bounded audit
//!   history with timestamps. The health layer and checker emit into it
//!   when given one ([`HealthLayer::events`](crate::health::HealthLayer::events),
//!   [`HealthChecker::events`](crate::health::HealthChecker::events)).
//! * [`Handle`]: drain, disable, enable, weights, forced primaries, adding
//!   and removing backends, across any number of groups; each change an
//!   action makes is an event.
//! * [`GroupStats`] and [`BackendStats`]: snapshots of counters and state;
//!   with the `metrics` feature, `Handle::publish_metrics` publishes them
//!   through the `metrics` facade.
//! * `AdminService` (feature `admin`): the JSON admin API as a tower
//!   `Service` to mount where you like.
//!
//! See `docs/control.md` and `docs/groups.md`.

#[cfg(feature = "admin")]
mod admin;
mod events;
mod group;
mod handle;
mod layers;
#[cfg(feature = "metrics")]
mod metrics;
mod stats;

#[cfg(feature = "admin")]
#[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
pub use admin::{AdminBody, AdminService};
pub use events::{Event, Events, Record, RecvError, Subscriber, SwitchReason};
pub use group::{GroupStrategy, GroupTable};
pub use handle::{ControlError, GroupMode, Handle};
pub use layers::LayerStats;
pub use stats::{BackendStats, GroupStats};

pub(crate) use events::{emit, WeakEvents};

/// The [`Priority`](crate::balance::Priority) inside a [`GroupStrategy`],
/// for [`Handle::add_group`].
fn group_priority(strategy: &dyn std::any::Any) -> Option<crate::balance::Priority> {
    strategy
        .downcast_ref::<GroupStrategy>()
        .and_then(|g| g.priority().cloned())
}
