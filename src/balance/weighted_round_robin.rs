use std::cmp::Ordering as CmpOrdering;

use super::strategy::{Pick, Strategy};
use super::Turns;
use crate::pool::Members;

/// The longest precomputed cycle; beyond it weights are scaled down.
const MAX_CYCLE: u64 = 1 << 22;

/// Smooth weighted round robin: over every cycle of `sum(weights)` picks each
/// backend gets exactly its weight, spread evenly through the cycle rather
/// than in bursts (weights 5, 1, 1 give `a a a b a a c`: `b` and `c` half
/// a cycle apart, never `a a a a a b c`).
///
/// nginx computes such a sequence with running sums, which costs O(N) per
/// pick. Here the whole cycle is computed once per membership or weight
/// change, off the request path, as an earliest-deadline-first schedule (as
/// in Envoy's weighted round robin): backend `i` of `n` with weight `w` is
/// due for its `k`-th pick at virtual time `(k - 1 + φᵢ) / w`, where the
/// phase `φᵢ = (i + ½) / n` keeps backends of equal weight from being due at
/// the same instant and clumping together. Every backend then has exactly
/// `w` picks due in each cycle, evenly spaced; a pick is one counter tick
/// and one array read, whatever the number of backends. Weights are divided by
/// their greatest common divisor; a cycle longer than 4 Mi picks is scaled
/// down proportionally.
///
/// The slot of an unavailable or already-tried backend goes to a backend
/// drawn in proportion to weight, so the others share its turns by weight.
/// A backend in slow start (its
/// [`weight_permille`](crate::BackendState::weight_permille) below 1000)
/// takes a slot only with probability `permille / 1000`, and the slot goes
/// to a backend drawn by weight otherwise (which again takes it with its
/// own probability): each backend's share is then in proportion to its
/// effective weight, the configured one times `permille / 1000`, as in
/// Envoy's slow start, ramping without rebuilding the cycle. Backends
/// warming up together keep the proportions of their weights.
///
/// [`WeightedRoundRobin::new`] starts at the beginning of the cycle. Each
/// of its clones (and each clone of those) starts one slot further on than
/// the one a balancer took up before it, so that the balancers a
/// [`BalanceLayer`](super::BalanceLayer) builds (one per service, such as
/// one per connection, each with a clone of its strategy), and those of
/// clones of the layer, do not all send their first request to the same
/// backend; any
/// `sum(weights)` consecutive picks still cover the cycle once, so each
/// backend still gets exactly its weight in them.
///
/// Pick it for backends of unequal capacity.
#[derive(Debug, Default, Clone)]
pub struct WeightedRoundRobin {
    turns: Turns,
}

impl WeightedRoundRobin {
    /// A smooth weighted round robin, starting at the beginning of the
    /// cycle.
    pub fn new() -> Self {
        WeightedRoundRobin::default()
    }
}

/// One cycle of member indices.
#[derive(Debug, Default)]
pub struct Cycle {
    order: Vec<u32>,
}

impl Cycle {
    /// The member indices of one cycle, in order.
    pub fn as_slice(&self) -> &[u32] {
        &self.order
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn weights_of(members: &Members) -> Vec<u64> {
    let mut weights: Vec<u64> = members
        .iter()
        .map(|m| u64::from(m.state().weight()))
        .collect();
    let g = weights.iter().copied().fold(0, gcd).max(1);
    weights.iter_mut().for_each(|w| *w /= g);
    let total: u64 = weights.iter().sum();
    if total > MAX_CYCLE {
        // Keep proportions as well as integers allow; every backend keeps at
        // least one slot.
        weights
            .iter_mut()
            .for_each(|w| *w = (*w * MAX_CYCLE / total).max(1));
    }
    weights
}

impl Strategy for WeightedRoundRobin {
    type Table = Cycle;

    fn build(&self, members: &Members) -> Cycle {
        self.turns.draw();
        let weights = weights_of(members);
        // The k-th pick (k = 1..=w) of member i of n is due at
        // (k - 1 + (2i + 1) / 2n) / w = ((k - 1) 2n + 2i + 1) / (2n w).
        let n = weights.len() as u64;
        let mut slots: Vec<(u64, u64, u32)> =
            Vec::with_capacity(weights.iter().sum::<u64>() as usize);
        for (i, &w) in weights.iter().enumerate() {
            let phase = 2 * i as u64 + 1;
            slots.extend((1..=w).map(|k| ((k - 1) * 2 * n + phase, 2 * n * w, i as u32)));
        }
        slots.sort_unstable_by(|a, b| {
            (u128::from(a.0) * u128::from(b.1))
                .cmp(&(u128::from(b.0) * u128::from(a.1)))
                .then(a.2.cmp(&b.2))
        });
        debug_assert!(slots.windows(2).all(|w| {
            (u128::from(w[0].0) * u128::from(w[1].1))
                .cmp(&(u128::from(w[1].0) * u128::from(w[0].1)))
                != CmpOrdering::Greater
        }));
        Cycle {
            order: slots.into_iter().map(|(_, _, i)| i).collect(),
        }
    }

    #[inline]
    fn pick(&self, cycle: &Cycle, pick: &Pick<'_>) -> Option<usize> {
        let order = &cycle.order;
        if order.is_empty() {
            return None;
        }
        let start = self.turns.take() % order.len();
        let first = order[start] as usize;
        if pick.is_eligible(first) && admitted(pick, first) {
            return Some(first);
        }
        // The slot's backend cannot take it: give the slot to a backend
        // drawn in proportion to weight (a random slot of the cycle), so the
        // others share the lost turns by weight instead of the next slot's
        // owner taking them all. A few draws, then one draw by effective
        // weight among the backends that can take it (the draws mostly miss
        // when a heavy backend is out or all are warming up), so that a
        // pick never costs more than O(N).
        (0..2 * pick.len() + 16)
            .map(|_| order[super::random_below(order.len())] as usize)
            .find(|&i| pick.is_eligible(i) && admitted(pick, i))
            .or_else(|| by_weight(pick))
            .or_else(|| pick.first_eligible_from(first + 1))
    }
}

/// A backend drawn among the eligible in proportion to its effective
/// weight (configured weight times the share slow start gives it), if any
/// has one.
fn by_weight(pick: &Pick<'_>) -> Option<usize> {
    let weight = |i: usize| pick.member(i).state().weight_units();
    let eligible = || (0..pick.len()).filter(|&i| pick.is_eligible(i));
    let total: u64 = eligible().map(weight).sum();
    if total == 0 {
        return None;
    }
    let mut point = super::random_below(total);
    eligible().find(|&i| {
        let w = weight(i);
        point = match point.checked_sub(w) {
            Some(rest) => rest,
            None => return true,
        };
        false
    })
}

/// Whether a backend in slow start takes the slot that came up: always at
/// full weight, with probability `permille / 1000` while warming up.
#[inline]
fn admitted(pick: &Pick<'_>, i: usize) -> bool {
    let permille = pick.member(i).state().weight_permille();
    permille >= 1000 || super::random_below(1000) < permille
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Pool;

    fn cycle_of(weights: &[u32]) -> Vec<u32> {
        let pool: Pool<()> = Pool::new();
        for (i, w) in weights.iter().enumerate() {
            pool.insert_weighted(format!("b{i}"), (), *w);
        }
        WeightedRoundRobin::new()
            .build(pool.snapshot().members())
            .order
    }

    #[test]
    fn interleaves_instead_of_bursting() {
        let c = cycle_of(&[5, 1, 1]);
        assert_eq!(c.len(), 7);
        assert_eq!(c.iter().filter(|&&i| i == 0).count(), 5);
        // The light backends are not next to each other, and across cycle
        // boundaries the heavy one never runs more than ceil(5 / 2) times.
        let b = c.iter().position(|&i| i == 1).unwrap();
        let d = c.iter().position(|&i| i == 2).unwrap();
        assert!(b.abs_diff(d) > 1, "{c:?}");
        let twice: Vec<u32> = c.iter().chain(c.iter()).copied().collect();
        assert!(twice.windows(4).all(|w| w != [0, 0, 0, 0]), "{c:?}");
    }

    #[test]
    fn slow_start_admits_in_proportion_to_the_effective_weight() {
        use crate::key::RequestHead;
        let pool: Pool<()> = Pool::new();
        pool.insert("a", ());
        pool.insert("b", ());
        let wrr = WeightedRoundRobin::new();
        let cycle = wrr.build(pool.snapshot().members());
        let snap = pool.snapshot();
        snap.members()[1].state().set_weight_permille(100);
        let req = http::Request::new(());
        let mut to_b = 0;
        for _ in 0..20_000 {
            let pick = Pick::new(RequestHead::from(&req), snap.members(), None);
            if wrr.pick(&cycle, &pick) == Some(1) {
                to_b += 1;
            }
        }
        // Equal weights, b at 10 %: effective weights 1 and 0.1 give b
        // 1 / 11 of the picks, about 1818.
        assert!((1_600..2_050).contains(&to_b), "{to_b}");
        snap.members()[1].state().set_weight_permille(1000);
        let mut to_b = 0;
        for _ in 0..1000 {
            let pick = Pick::new(RequestHead::from(&req), snap.members(), None);
            to_b += usize::from(wrr.pick(&cycle, &pick) == Some(1));
        }
        assert_eq!(to_b, 500);
    }

    /// Shares of 60,000 picks, in percent, with `prepare` applied to the
    /// members of a pool of `weights`.
    fn shares(weights: &[u32], prepare: impl Fn(&crate::BackendState, usize)) -> Vec<usize> {
        use crate::key::RequestHead;
        let pool: Pool<()> = Pool::new();
        for (i, w) in weights.iter().enumerate() {
            pool.insert_weighted(format!("b{i}"), (), *w);
        }
        let wrr = WeightedRoundRobin::new();
        let snap = pool.snapshot();
        let cycle = wrr.build(snap.members());
        for (i, member) in snap.members().iter().enumerate() {
            prepare(member.state(), i);
        }
        let req = http::Request::new(());
        let mut counts = vec![0; weights.len()];
        for _ in 0..60_000 {
            let pick = Pick::new(RequestHead::from(&req), snap.members(), None);
            counts[wrr.pick(&cycle, &pick).unwrap()] += 1;
        }
        counts.iter().map(|c| c * 100 / 60_000).collect()
    }

    #[test]
    fn the_turns_of_a_heavy_backend_that_is_out_go_to_the_others_by_weight() {
        use crate::HealthStatus;
        let out = |state: &crate::BackendState, i: usize| {
            if i == 0 {
                state.set_health(HealthStatus::Unhealthy);
            }
        };
        let even = shares(&[100, 1, 1], out);
        assert!(
            (45..=55).contains(&even[1]) && (45..=55).contains(&even[2]),
            "{even:?}"
        );
        let by_weight = shares(&[1000, 3, 1], out);
        assert!((70..=80).contains(&by_weight[1]), "{by_weight:?}");
    }

    #[test]
    fn backends_warming_up_together_keep_their_weights() {
        let warming = |state: &crate::BackendState, _: usize| state.set_weight_permille(100);
        let got = shares(&[5, 1], warming);
        // 5 : 1 is 83 : 17.
        assert!((78..=88).contains(&got[0]), "{got:?}");
    }

    #[test]
    fn weights_are_reduced_by_their_gcd() {
        assert_eq!(cycle_of(&[4, 2, 2]).len(), 4);
    }
}
