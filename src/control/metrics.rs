//! Publishing the stats through the `metrics` facade.

use std::time::Duration;

use super::handle::Handle;
use super::stats::GroupStats;

impl Handle {
    /// Publishes a snapshot of every group's stats through the
    /// [`metrics`](https://docs.rs/metrics) facade, to whatever recorder
    /// (Prometheus exporter, StatsD, …) the application installed.
    ///
    /// Per backend, labelled `group` and `backend`:
    /// `tower_ha_backend_requests_total`, `tower_ha_backend_failures_total`,
    /// `tower_ha_backend_ejections_total` (counters),
    /// `tower_ha_backend_in_flight`, `tower_ha_backend_max_in_flight` (only
    /// for a backend with a limit), `tower_ha_backend_healthy` (1 or 0) and
    /// `tower_ha_backend_available` (1 or 0) (gauges). Per group, labelled
    /// `group`: `tower_ha_group_failovers_total` (counter),
    /// `tower_ha_group_seconds_since_failover` (gauge, absent before the
    /// first failover), `tower_ha_group_healthy_backends`,
    /// `tower_ha_group_failed_backends` (gauges) and
    /// `tower_ha_group_primary` (a gauge labelled `group` and `backend`, 1
    /// for the current primary and 0 for the others).
    ///
    /// Call it periodically, or run [`spawn_metrics`](Handle::spawn_metrics).
    pub fn publish_metrics(&self) {
        for group in self.stats() {
            publish(&group);
        }
    }

    /// Publishes the metrics every `interval` on the current tokio runtime
    /// until the returned task is aborted or every other clone of the
    /// handle is dropped.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime, as [`tokio::spawn`] does.
    pub fn spawn_metrics(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak = self.downgrade();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match Handle::upgrade(&weak) {
                    Some(handle) => handle.publish_metrics(),
                    None => return,
                }
            }
        })
    }
}

fn publish(group: &GroupStats) {
    let name = group.name.to_string();
    for b in &group.backends {
        let labels = [("group", name.clone()), ("backend", b.id.to_string())];
        metrics::counter!("tower_ha_backend_requests_total", &labels).absolute(b.requests);
        metrics::counter!("tower_ha_backend_failures_total", &labels).absolute(b.failures);
        metrics::counter!("tower_ha_backend_ejections_total", &labels)
            .absolute(u64::from(b.ejections));
        metrics::gauge!("tower_ha_backend_in_flight", &labels).set(b.in_flight as f64);
        if let Some(max) = b.max_in_flight {
            metrics::gauge!("tower_ha_backend_max_in_flight", &labels).set(max as f64);
        }
        metrics::gauge!("tower_ha_backend_healthy", &labels)
            .set(f64::from(u8::from(b.is_healthy())));
        metrics::gauge!("tower_ha_backend_available", &labels)
            .set(f64::from(u8::from(b.available)));
        if group.configured_primary.is_some() {
            let primary = group.current_primary.as_ref() == Some(&b.id);
            metrics::gauge!("tower_ha_group_primary", &labels).set(f64::from(u8::from(primary)));
        }
    }
    let labels = [("group", name)];
    metrics::counter!("tower_ha_group_failovers_total", &labels).absolute(group.failovers);
    if let Some(since) = group.since_last_failover {
        metrics::gauge!("tower_ha_group_seconds_since_failover", &labels).set(since.as_secs_f64());
    }
    metrics::gauge!("tower_ha_group_healthy_backends", &labels).set(group.healthy.len() as f64);
    metrics::gauge!("tower_ha_group_failed_backends", &labels).set(group.failed.len() as f64);
}
