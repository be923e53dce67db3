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
#[inline]
pub(crate) fn uniform_eligible(pick: &Pick<'_>) -> Option<usize> {
    uniform_eligible_but(pick, None)
}

/// A uniform draw among the eligible members other than `except`, as
/// [`uniform_eligible`] does: a draw among the other `n - 1` indices skips
/// over `except`, so no draw is spent on it.
pub(crate) fn uniform_eligible_except(pick: &Pick<'_>, except: usize) -> Option<usize> {
    uniform_eligible_but(pick, Some(except))
}

#[inline]
fn uniform_eligible_but(pick: &Pick<'_>, except: Option<usize>) -> Option<usize> {
    let n = pick.len();
    let m = n.checked_sub(usize::from(except.is_some()))?;
    if m == 0 {
        return None;
    }
    let other = |i: usize| match except {
        Some(except) if i >= except => i + 1,
        _ => i,
    };
    let candidate = |i: usize| Some(i) != except && pick.is_eligible(i);
    for _ in 0..DRAWS {
        let i = other(super::random_below(m));
        if pick.is_eligible(i) {
            return Some(i);
        }
    }
    let eligible = (0..n).filter(|&i| candidate(i)).count();
    if eligible == 0 {
        return None;
    }
    let nth = super::random_below(eligible);
    // Eligibility is live (a place taken meanwhile): a member that left
    // between the two passes falls back to the first still eligible, so a
    // free backend is never reported as none.
    (0..n)
        .filter(|&i| candidate(i))
        .nth(nth)
        .or_else(|| (0..n).find(|&i| candidate(i)))
}
