//! The counters of the failover and sticky layers a [`Handle`] reports.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use serde::Serialize;

use super::handle::Handle;
use crate::failover::{FailoverLayer, FailoverStats};
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
    /// and, with the `metrics` feature, the metrics. Register the layer as
    /// used, once its settings are made: every service it builds counts
    /// into it. A layer registered under a name already taken replaces the
    /// one before.
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

    /// Each registered layer's name, identity (which layer it is, for a
    /// name registered again) and counters.
    pub(super) fn layer_sources(&self) -> (Sources<FailoverStats>, Sources<StickyStats>) {
        let mut layers = self.layers().write();
        // A sticky layer gone is forgotten.
        layers.sticky.retain(|_, shared| shared.strong_count() > 0);
        let failover = (layers.failover.iter())
            .map(|(name, c)| (name.clone(), Arc::as_ptr(c) as usize, c.snapshot()))
            .collect();
        let sticky = (layers.sticky.iter())
            .filter_map(|(name, shared)| {
                let shared = shared.upgrade()?;
                Some((name.clone(), Arc::as_ptr(&shared) as usize, shared.stats()))
            })
            .collect();
        (failover, sticky)
    }
}

/// Registered layers of one kind: name, identity and counters.
pub(super) type Sources<T> = Vec<(Arc<str>, usize, T)>;
