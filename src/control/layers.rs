//! The counters of the failover and sticky layers a [`Handle`] reports.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use serde::Serialize;

use super::handle::Handle;
use crate::failover::{FailoverLayer, FailoverStats};
use crate::serial::Serial;
use crate::sticky::{StickyLayer, StickyStats};

/// The layers registered with a handle, by name.
#[derive(Default, Clone)]
pub(super) struct Layers {
    pub(super) failover: BTreeMap<Arc<str>, Arc<crate::failover::Counters>>,
    /// Weak, so that a handle does not keep a session table alive: a layer
    /// dropped with every service it built is no longer reported.
    pub(super) sticky: BTreeMap<Arc<str>, Weak<crate::sticky::Shared>>,
}

/// The counters of the layers registered with a [`Handle`]
/// ([`add_failover`](Handle::add_failover),
/// [`add_sticky`](Handle::add_sticky)), by the name each was registered
/// under.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct LayerStats {
    /// Each failover layer's counters.
    pub failover: BTreeMap<Arc<str>, FailoverStats>,
    /// Each sticky layer's counters and table size.
    pub sticky: BTreeMap<Arc<str>, StickyStats>,
}

impl Handle {
    /// Reports `layer`'s counters under `name` in
    /// [`layer_stats`](Handle::layer_stats), the admin API's `GET /layers`
    /// and, with the `metrics` feature, the metrics. Every service the
    /// layer, or a clone of it, builds counts into it; its setters keep its
    /// counters, as they keep its budget (layers made from one by setters
    /// count together). A layer registered under a name already taken
    /// replaces the one before: `layer_stats` shows the new layer's own
    /// counts, and the published counters go on up from the old ones.
    pub fn add_failover<C>(&self, name: impl Into<Arc<str>>, layer: &FailoverLayer<C>) {
        let counters = layer.counters().clone();
        self.layers().write().failover.insert(name.into(), counters);
    }

    /// Reports `layer`'s counters under `name`, as
    /// [`add_failover`](Handle::add_failover) does. The handle keeps no
    /// session table alive: once the layer and every service it built are
    /// dropped, it is no longer reported. Register the layer as used: a
    /// setter of `StickyLayer` returns a layer with a table and counters of
    /// its own.
    pub fn add_sticky(&self, name: impl Into<Arc<str>>, layer: &StickyLayer) {
        let shared = Arc::downgrade(&layer.shared);
        self.layers().write().sticky.insert(name.into(), shared);
    }

    /// Stops reporting the failover and sticky layers registered under
    /// `name`; returns whether there was one.
    pub fn remove_layer(&self, name: &str) -> bool {
        let mut layers = self.layers().write();
        let failover = layers.failover.remove(name).is_some();
        layers.sticky.remove(name).is_some() || failover
    }

    /// A snapshot of the counters of every registered layer.
    pub fn layer_stats(&self) -> LayerStats {
        let (failover, sticky) = self.layer_sources();
        LayerStats {
            failover: failover.into_iter().map(|(n, _, s)| (n, s)).collect(),
            sticky: sticky.into_iter().map(|(n, _, s)| (n, s)).collect(),
        }
    }

    /// Each registered layer's name, serial (which layer it is, for a
    /// name registered again) and counters.
    pub(super) fn layer_sources(&self) -> (Sources<FailoverStats>, Sources<StickyStats>) {
        let (failover, sticky) = {
            let layers = self.layers().read();
            let failover: Vec<_> = (layers.failover.iter())
                .map(|(name, c)| (name.clone(), c.clone()))
                .collect();
            let sticky: Vec<_> = (layers.sticky.iter())
                .map(|(name, s)| (name.clone(), s.upgrade()))
                .collect();
            (failover, sticky)
        };
        if sticky.iter().any(|(_, s)| s.is_none()) {
            // A sticky layer gone is forgotten.
            let mut layers = self.layers().write();
            layers.sticky.retain(|_, shared| shared.strong_count() > 0);
        }
        let failover = failover
            .into_iter()
            .map(|(name, c)| (name, c.serial, c.snapshot()))
            .collect();
        // A table is dropped here, outside the lock, should this hold the
        // last reference to it.
        let sticky = sticky
            .into_iter()
            .filter_map(|(name, s)| {
                let s = s?;
                Some((name, s.serial(), s.stats()))
            })
            .collect();
        (failover, sticky)
    }
}

/// Registered layers of one kind: name, serial and counters.
pub(super) type Sources<T> = Vec<(Arc<str>, Serial, T)>;
