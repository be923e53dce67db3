use super::strategy::{Pick, Strategy};
use crate::pool::Members;

/// How many uniform draws to try before counting the eligible backends.
const DRAWS: usize = 4;

/// Uniformly random among the eligible backends.
///
/// Each attempt of a request draws uniformly among the backends that are
/// available and not yet tried, so a request visits each backend at most
/// once (as the Panda API gateway's random balancer fails over, without
/// building a shuffled queue).
///
/// Pick it when many independent balancers share backends and a shared
/// round-robin order would synchronize them.
#[derive(Debug, Clone, Default)]
pub struct Random {
    _priv: (),
}

impl Random {
    /// A uniform random strategy.
    pub fn new() -> Self {
        Random::default()
    }
}

impl Strategy for Random {
    type Table = ();

    fn build(&self, _members: &Members) {}

    #[inline]
    fn pick(&self, _table: &(), pick: &Pick<'_>) -> Option<usize> {
        uniform_eligible(pick)
    }
}

/// A uniform draw among the eligible members: rejection sampling (each
/// accepted draw is uniform among the eligible), then an exact draw by
/// counting when most members are ineligible.
pub(crate) fn uniform_eligible(pick: &Pick<'_>) -> Option<usize> {
    let n = pick.len();
    if n == 0 {
        return None;
    }
    for _ in 0..DRAWS {
        let i = super::random_below(n);
        if pick.is_eligible(i) {
            return Some(i);
        }
    }
    let eligible = (0..n).filter(|&i| pick.is_eligible(i)).count();
    if eligible == 0 {
        return None;
    }
    let nth = super::random_below(eligible);
    (0..n).filter(|&i| pick.is_eligible(i)).nth(nth)
}

/// A uniform draw among the eligible members other than `except`, as
/// [`uniform_eligible`] does: a draw among the other `n - 1` indices skips
/// over `except`, so no draw is spent on it.
pub(crate) fn uniform_eligible_except(pick: &Pick<'_>, except: usize) -> Option<usize> {
    let n = pick.len();
    if n <= 1 {
        return None;
    }
    let other = |i: usize| if i >= except { i + 1 } else { i };
    for _ in 0..DRAWS {
        let i = other(super::random_below(n - 1));
        if pick.is_eligible(i) {
            return Some(i);
        }
    }
    let eligible = (0..n)
        .filter(|&i| i != except && pick.is_eligible(i))
        .count();
    if eligible == 0 {
        return None;
    }
    let nth = super::random_below(eligible);
    (0..n)
        .filter(|&i| i != except && pick.is_eligible(i))
        .nth(nth)
}
