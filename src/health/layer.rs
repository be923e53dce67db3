use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::outlier::{Ejections, OutlierConfig, SuccessRate, Watch};
use super::service::Health;
use crate::classify::DefaultClassifier;
use crate::control::Events;
use crate::time::SHORTEST;

/// Passive outlier detection for the backends of a pool: builds
/// [`Health`] around each backend's service.
///
/// Defaults (Envoy's): eject after 5 consecutive failures, for 30 s times
/// a multiplier that grows by one with each ejection and shrinks by one
/// for every 10 s the backend spends not ejected, at most 300 s; at most
/// 10 % of the backends ejected at once, but always at least one. What
/// counts as a
/// failure is decided by the shared [`Classifier`](crate::classify::Classifier)
/// (by default [`DefaultClassifier`]: errors, 502, 503, 504, and a gRPC
/// `UNAVAILABLE` in a response's head).
///
/// # One layer per pool
///
/// Apply one `HealthLayer` (or clones of it) to every backend of a pool:
/// the clones share the count of wrapped and ejected backends that the
/// ejection cap is computed from. Each call to [`Layer::layer`] counts as one
/// backend for as long as the service it returned, or a clone of it, lives;
/// so build each backend's service with its own `layer` call, as
/// `pool.insert(id, layer.layer(service))` does.
pub struct HealthLayer<C = DefaultClassifier> {
    config: OutlierConfig,
    classifier: Arc<C>,
    ejections: Arc<Ejections>,
    events: Option<Events>,
}

// By hand: the classifier is shared behind an `Arc`, so the layer clones
// and prints whatever the classifier is.
impl<C> Clone for HealthLayer<C> {
    fn clone(&self) -> Self {
        HealthLayer {
            config: self.config,
            classifier: self.classifier.clone(),
            ejections: self.ejections.clone(),
            events: self.events.clone(),
        }
    }
}

impl<C> fmt::Debug for HealthLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthLayer")
            .field("config", &self.config)
            .field("ejections", &self.ejections)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl Default for HealthLayer {
    fn default() -> Self {
        HealthLayer::new()
    }
}

impl HealthLayer {
    /// Passive detection with the defaults and the [`DefaultClassifier`].
    pub fn new() -> Self {
        HealthLayer {
            config: OutlierConfig::default(),
            classifier: Arc::new(DefaultClassifier::new()),
            ejections: Arc::default(),
            events: None,
        }
    }
}

impl<C> HealthLayer<C> {
    /// Decides what a failure is with `classifier`. Give it the failover
    /// layer's too, when you change that one: each layer has its own.
    pub fn classifier<C2>(self, classifier: C2) -> HealthLayer<C2> {
        HealthLayer {
            config: self.config,
            classifier: Arc::new(classifier),
            ejections: self.ejections,
            events: self.events,
        }
    }

    /// Also emits every ejection and restoration into `events`
    /// ([`Event::Ejected`](crate::control::Event::Ejected),
    /// [`Event::Restored`](crate::control::Event::Restored)).
    pub fn events(mut self, events: Events) -> Self {
        self.events = Some(events);
        self
    }

    /// Ejects a backend after this many failures in a row (default 5; 0
    /// counts as 1). A success starts the count again.
    pub fn consecutive_failures(mut self, failures: u32) -> Self {
        self.config.consecutive_failures = failures.max(1);
        self
    }

    /// An ejection lasts this long times the backend's multiplier (default
    /// 30 s; at least 1 ms), capped at
    /// [`max_ejection_time`](Self::max_ejection_time), as in Envoy: each
    /// ejection adds one to the multiplier while base × multiplier is below
    /// max + base (so it stops one step past the cap), and every
    /// [`ejection_decay_interval`](Self::ejection_decay_interval) the
    /// backend spends not ejected takes one off. So a backend's first
    /// ejection lasts 30 s, one ejected again soon after its return 60 s,
    /// and one that stayed out of trouble long enough 30 s again.
    pub fn base_ejection_time(mut self, time: Duration) -> Self {
        self.config.base_ejection_time = time.max(SHORTEST);
        self
    }

    /// No ejection lasts longer than this (default 300 s), unless
    /// [`base_ejection_time`](Self::base_ejection_time) is longer: then
    /// every ejection lasts the base time (a zero maximum included, which
    /// would otherwise eject for no time at all).
    pub fn max_ejection_time(mut self, time: Duration) -> Self {
        self.config.max_ejection_time = time;
        self
    }

    /// Every this long a backend spends not ejected, the multiplier of its
    /// ejection time drops by one (default 10 s, Envoy's outlier detection
    /// `interval`; at least 1 ms). The decay is counted when the backend is
    /// ejected again, in whole intervals from the deadline of its previous
    /// ejection (an ejection lifted early by a probe counts as lasting to
    /// its deadline).
    pub fn ejection_decay_interval(mut self, interval: Duration) -> Self {
        self.config.ejection_decay = interval.max(SHORTEST);
        self
    }

    /// At most this percentage of the backends is ejected at once (default
    /// 10, values above 100 count as 100); one backend may always be
    /// ejected.
    pub fn max_ejection_percent(mut self, percent: u32) -> Self {
        self.config.max_ejection_percent = percent.min(100);
        self
    }

    /// Also ejects a backend whose success rate falls too low (off by
    /// default): see [`SuccessRate`].
    pub fn success_rate(mut self, success_rate: SuccessRate) -> Self {
        self.config.success_rate = Some(success_rate);
        self
    }
}

impl<S, C> Layer<S> for HealthLayer<C> {
    type Service = Health<S, C>;

    fn layer(&self, inner: S) -> Health<S, C> {
        Health::from_watch(
            inner,
            Arc::new(Watch::new(
                self.config,
                self.classifier.clone(),
                self.ejections.clone(),
                self.events.clone(),
            )),
        )
    }
}
