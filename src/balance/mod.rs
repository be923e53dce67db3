//! Choosing *who* serves a request: [`Balance`] and its strategies.
//!
//! [`Balance`] picks one backend of a [`Pool`](crate::Pool) per request (and
//! one new backend per failover attempt) with a [`Strategy`]:
//!
//! | strategy | picks | per pick |
//! |---|---|---|
//! | [`RoundRobin`] | the next backend in turn | O(1) |
//! | [`Random`] | uniformly among eligible backends | O(1) |
//! | [`LeastRequest`] | the less loaded of two (or k) random backends | O(k) |
//! | [`WeightedRoundRobin`] | in proportion to weights, smoothly interleaved | O(1) |
//! | [`ConsistentHash`] | by a request key, on a ring or a Maglev table | ring: O(1) expected (bucketed); Maglev: O(1) |
//! | [`Priority`] | the group's primary; backups in configured order (active-passive) | O(1) while the primary is available |
//!
//! Every strategy skips unavailable backends (disabled, draining, unhealthy,
//! ejected) and the backends already listed in the request's
//! [`Attempts`](crate::extensions::Attempts), so successive attempts of one
//! request go to distinct backends and, once every backend was tried, the
//! balancer answers [`NoBackend`](crate::error::NoBackend).
//!
//! **Panic routing.** When fewer than a share of the enabled backends (50 %
//! by default, as in Envoy) are available, the pool is *in panic*: health
//! and ejections are ignored and requests spread over every enabled backend
//! rather than overloading the few that are left. Set the share with
//! [`Balance::panic_threshold`] (0 disables it).
//!
//! See `docs/balance.md` for when to pick which.

mod consistent_hash;
pub mod future;
mod least_request;
mod maglev;
mod panic;
mod priority;
pub(crate) mod queue;
pub(crate) use panic::share_to_permille;
mod random;
mod ring;
mod round_robin;
mod service;
mod strategy;
mod weighted_round_robin;

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use rand::distr::uniform::SampleUniform;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub use consistent_hash::{ConsistentHash, HashTable};
pub use least_request::LeastRequest;
pub use priority::{Failback, Priority, PriorityTable};
pub use random::Random;
pub use round_robin::RoundRobin;
pub use service::{Balance, BalanceLayer};
pub use strategy::{Pick, Strategy};
pub use weighted_round_robin::{Cycle, WeightedRoundRobin};

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// The turn counter of a round robin. Each clone counts on its own, from
/// a start it draws from its family's counter (the family of a strategy,
/// its clones, their clones, ...) when its first table is built, that is
/// when a balancer takes it up, one further on than the clone taken up
/// before it: the balancers built from one strategy do not all begin with
/// the same backend, also when the layer that builds them was cloned first
/// (a clone no balancer takes up, such as a layer's, draws nothing).
#[derive(Debug, Default)]
pub(crate) struct Turns {
    /// The next turn: its start, once drawn, plus the turns taken.
    next: AtomicUsize,
    /// Whether its start was drawn.
    drawn: AtomicBool,
    /// Starts drawn in the family.
    family: Arc<AtomicUsize>,
}

impl Turns {
    /// Draws this one's start, unless it has one: call it where a
    /// balancer builds its table.
    pub(crate) fn draw(&self) {
        // Of two first builds at once, one draws.
        if !self.drawn.load(Ordering::Relaxed) && !self.drawn.swap(true, Ordering::Relaxed) {
            let start = self.family.fetch_add(1, Ordering::Relaxed);
            self.next.fetch_add(start, Ordering::Relaxed);
        }
    }

    /// This turn; the next call gets the following one.
    #[inline]
    pub(crate) fn take(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

impl Clone for Turns {
    fn clone(&self) -> Self {
        Turns {
            next: AtomicUsize::new(0),
            drawn: AtomicBool::new(false),
            family: self.family.clone(),
        }
    }
}

/// A uniform integer in `0..n` (`n > 0`) from a fast per-thread generator.
#[inline]
pub(crate) fn random_below<T: SampleUniform + PartialOrd + Default>(n: T) -> T {
    RNG.with(|rng| rng.borrow_mut().random_range(T::default()..n))
}
