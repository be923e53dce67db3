use super::random::{uniform_eligible, uniform_eligible_except};
use super::strategy::{Pick, Strategy};
use crate::pool::Members;

/// Least request by the power of choices: draw `choices` eligible backends
/// at random and take the one with the fewest requests in flight relative
/// to its weight.
///
/// Each candidate after the first is drawn among the eligible backends
/// other than the best one so far, so two choices compare two distinct
/// backends whenever two are eligible (with one, it is picked). With more
/// than two choices a backend that already lost a comparison may be drawn
/// again; it never wins, the pick just compares fewer distinct backends.
///
/// With two choices (the default) this avoids the herd behaviour of a global
/// "least loaded" pick while staying O(1) (Mitzenmacher, *The Power of Two
/// Choices in Randomized Load Balancing*; Envoy's `LEAST_REQUEST`; tower's
/// `p2c`). Pick it when request costs vary, such as long polls mixed with
/// quick reads.
#[derive(Debug, Clone)]
pub struct LeastRequest {
    choices: usize,
}

impl Default for LeastRequest {
    fn default() -> Self {
        LeastRequest { choices: 2 }
    }
}

impl LeastRequest {
    /// Power of two choices: compares two random backends.
    pub fn new() -> Self {
        LeastRequest::default()
    }

    /// How many random backends to compare (default 2; at least 1; 1 is
    /// plain random). More than the pool has backends counts as that many
    /// draws.
    pub fn choices(mut self, choices: usize) -> Self {
        self.choices = choices.max(1);
        self
    }

    /// How many candidates a pick among `backends` draws.
    #[inline]
    fn draws(&self, backends: usize) -> usize {
        self.choices.min(backends)
    }
}

impl Strategy for LeastRequest {
    type Table = ();

    fn build(&self, _members: &Members) {}

    #[inline]
    fn pick(&self, _table: &(), pick: &Pick<'_>) -> Option<usize> {
        let mut best = uniform_eligible(pick)?;
        for _ in 1..self.draws(pick.len()) {
            // Never the current best again: with two choices the two
            // candidates are distinct, so a backend loaded far beyond the
            // other is never picked while the other is eligible.
            let Some(other) = uniform_eligible_except(pick, best) else {
                break;
            };
            if less_loaded(pick, other, best) {
                best = other;
            }
        }
        Some(best)
    }
}

/// `(in_flight(a) + 1) / weight(a) < (in_flight(b) + 1) / weight(b)` with
/// effective weights (the configured weight scaled down during slow start),
/// without division. The request being placed counts (Envoy's
/// `active + 1`), so that weights still tell two idle backends apart: a
/// warming backend with nothing in flight does not win every comparison.
#[inline]
fn less_loaded(pick: &Pick<'_>, a: usize, b: usize) -> bool {
    let (a, b) = (pick.member(a).state(), pick.member(b).state());
    let weight = |s: &crate::BackendState| u128::from(s.weight_units());
    let load =
        |s: &crate::BackendState, w: &crate::BackendState| (s.in_flight() as u128 + 1) * weight(w);
    load(a, b) < load(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::RequestHead;
    use crate::Pool;

    #[test]
    fn slow_start_lowers_the_weight_load_is_compared_with() {
        let pool: Pool<()> = Pool::new();
        pool.insert("warm", ());
        pool.insert("new", ());
        let snap = pool.snapshot();
        let (warm, new) = (snap.members()[0].state(), snap.members()[1].state());
        let _w = [warm.track_in_flight(), warm.track_in_flight()];
        let _n = new.track_in_flight();
        let req = http::Request::new(());
        let pick = Pick::new(RequestHead::from(&req), snap.members(), None);
        // Full weights: 1 in flight is less load than 2.
        assert!(less_loaded(&pick, 1, 0));
        // At 10 % of its weight, 1 in flight (2 with the new request)
        // weighs like 20.
        new.set_weight_permille(100);
        assert!(less_loaded(&pick, 0, 1));
        assert!(!less_loaded(&pick, 1, 0));
    }

    #[test]
    fn choices_beyond_the_pool_make_as_many_draws_as_backends() {
        let pool: Pool<()> = Pool::new();
        for id in ["a", "b", "c"] {
            pool.insert(id, ());
        }
        let snap = pool.snapshot();
        let req = http::Request::new(());
        let pick = Pick::new(RequestHead::from(&req), snap.members(), None);
        let strategy = LeastRequest::new().choices(usize::MAX);
        assert_eq!(strategy.draws(pick.len()), 3);
        assert_eq!(LeastRequest::new().draws(pick.len()), 2);
        for _ in 0..100 {
            assert!(strategy.pick(&(), &pick).is_some());
        }
    }

    #[test]
    fn weights_tell_idle_backends_apart() {
        let pool: Pool<()> = Pool::new();
        pool.insert("warm", ());
        pool.insert("new", ());
        let snap = pool.snapshot();
        snap.members()[1].state().set_weight_permille(100);
        let req = http::Request::new(());
        let pick = Pick::new(RequestHead::from(&req), snap.members(), None);
        // Nothing in flight anywhere: the full weight is less loaded.
        assert!(less_loaded(&pick, 0, 1));
        assert!(!less_loaded(&pick, 1, 0));
    }
}
