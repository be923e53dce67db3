use super::random::uniform_eligible;
use super::strategy::{Pick, Strategy};
use crate::pool::Members;

/// Least request by the power of choices: draw `choices` eligible backends
/// at random and take the one with the fewest requests in flight relative
/// to its weight.
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
    /// Power of two choices.
    pub fn new() -> Self {
        LeastRequest::default()
    }

    /// How many random backends to compare (at least 1; 1 is plain random).
    pub fn choices(mut self, choices: usize) -> Self {
        self.choices = choices.max(1);
        self
    }
}

impl Strategy for LeastRequest {
    type Table = ();

    fn build(&self, _members: &Members) {}

    #[inline]
    fn pick(&self, _table: &(), pick: &Pick<'_>) -> Option<usize> {
        let mut best = uniform_eligible(pick)?;
        for _ in 1..self.choices {
            let Some(other) = uniform_eligible(pick) else {
                break;
            };
            if less_loaded(pick, other, best) {
                best = other;
            }
        }
        Some(best)
    }
}

/// `in_flight(a) / weight(a) < in_flight(b) / weight(b)`, without division.
#[inline]
fn less_loaded(pick: &Pick<'_>, a: usize, b: usize) -> bool {
    let (a, b) = (pick.member(a).state(), pick.member(b).state());
    let load = |s: &crate::BackendState, w: &crate::BackendState| {
        s.in_flight() as u128 * u128::from(w.weight())
    };
    load(a, b) < load(b, a)
}
