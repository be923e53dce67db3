//! The hash ring behind [`ConsistentHash::ring`](super::ConsistentHash::ring).

use twox_hash::XxHash3_64;

use super::strategy::Pick;
use crate::pool::Members;

/// Above this many points, points per weight are scaled down (Envoy caps
/// its ring at 8 Mi entries too).
const MAX_POINTS: u64 = 1 << 23;

/// Ineligible owners passed on the walk before a pass over the members
/// checks that any backend is eligible at all.
const WALK_BEFORE_CHECK: u32 = 16;

/// Points walked before that pass, however few backends own them: one
/// heavy backend owns long runs of points.
const POINTS_BEFORE_CHECK: usize = 256;

/// Points sorted by hash, with a direct index on the hash's top bits so a
/// lookup is one or two cache lines instead of a full binary search.
pub(super) struct Ring {
    hashes: Vec<u64>,
    owners: Vec<u32>,
    /// `buckets[j]` is the first point whose hash's top bits are `>= j`.
    buckets: Vec<u32>,
    shift: u32,
}

/// The hash of a backend's `replica`-th point: a function of its id only.
fn point_hash(id: &str, replica: u64) -> u64 {
    XxHash3_64::oneshot_with_seed(replica, id.as_bytes())
}

/// How many times a ring that wants `total` points halves every
/// backend's: as few as bring it within the cap. Halvings, not each
/// backend's exact share of the cap (Envoy's way), so that a backend
/// added, removed or reweighted changes the others' points, and moves
/// their keys, only when it carries the total across a power of two.
fn halvings(total: u128) -> u32 {
    let mut halvings = 0;
    while total >> halvings > u128::from(MAX_POINTS) {
        halvings += 1;
    }
    halvings
}

/// How many of its `points` a backend keeps, `halvings` times halved: at
/// least one.
fn scale(points: u64, halvings: u32) -> u64 {
    match halvings {
        0 => points,
        n => points.checked_shr(n).unwrap_or(0).max(1),
    }
}

impl Ring {
    pub(super) fn build(members: &Members, points_per_weight: u32) -> Ring {
        // Weights and points per weight are u32: a product fits in u64,
        // their sum and the scaling below only in u128.
        let wanted =
            |m: &crate::pool::Member| u64::from(points_per_weight) * u64::from(m.state().weight());
        let total: u128 = members.iter().map(|m| u128::from(wanted(m))).sum();
        let mut points: Vec<(u64, &str, u32)> =
            Vec::with_capacity(total.min(u128::from(MAX_POINTS)) as usize);
        let halvings = halvings(total);
        for (i, m) in members.iter().enumerate() {
            let n = scale(wanted(m), halvings);
            let id = m.id().as_str();
            points.extend((0..n).map(|r| (point_hash(id, r), id, i as u32)));
        }
        // Ties (two backends on one position) are broken by id, so the ring
        // does not depend on insertion order.
        points.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));

        let bits = (usize::BITS - points.len().leading_zeros()).clamp(1, 20);
        let shift = 64 - bits;
        let mut buckets = Vec::with_capacity((1 << bits) + 1);
        let mut p = 0;
        for j in 0..=(1u64 << bits) {
            while p < points.len() && (points[p].0 >> shift) < j {
                p += 1;
            }
            buckets.push(p as u32);
        }
        Ring {
            hashes: points.iter().map(|p| p.0).collect(),
            owners: points.iter().map(|p| p.2).collect(),
            buckets,
            shift,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.hashes.len()
    }

    /// The first point at or after `hash`, wrapping around.
    #[inline]
    fn position(&self, hash: u64) -> usize {
        let j = (hash >> self.shift) as usize;
        let (lo, hi) = (self.buckets[j] as usize, self.buckets[j + 1] as usize);
        let pos = lo + self.hashes[lo..hi].partition_point(|&h| h < hash);
        if pos == self.hashes.len() {
            0
        } else {
            pos
        }
    }

    /// The owner of the first point at or after `hash`.
    #[inline]
    pub(super) fn owner(&self, hash: u64) -> Option<usize> {
        (!self.hashes.is_empty()).then(|| self.owners[self.position(hash)] as usize)
    }

    /// The owner of the first point at or after `hash` that is eligible,
    /// walking clockwise past ineligible backends.
    #[inline]
    pub(super) fn pick(&self, hash: u64, pick: &Pick<'_>) -> Option<usize> {
        if self.hashes.is_empty() {
            return None;
        }
        self.walk(
            self.position(hash),
            |i| pick.is_eligible(i),
            |from| pick.first_eligible_from(from).is_some(),
        )
    }

    /// The first eligible owner from point `start` on, clockwise;
    /// `any_eligible(from)` says whether any member is.
    #[inline]
    fn walk(
        &self,
        start: usize,
        mut eligible: impl FnMut(usize) -> bool,
        mut any_eligible: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        let first = self.owners[start] as usize;
        if eligible(first) {
            return Some(first);
        }
        let mut rejected = first;
        let mut passed = 0;
        let mut checked = false;
        let n = self.owners.len();
        for step in 1..n {
            let owner = self.owners[(start + step) % n] as usize;
            if owner != rejected {
                if eligible(owner) {
                    return Some(owner);
                }
                rejected = owner;
                passed += 1;
            }
            // A long walk (past many ineligible backends, or along the
            // points of a heavy one): a pass over the members says whether
            // any is left before the walk goes round the whole ring (every
            // backend full, down or tried).
            if !checked && (passed == WALK_BEFORE_CHECK || step == POINTS_BEFORE_CHECK) {
                checked = true;
                if !any_eligible(owner) {
                    return None;
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_weights_scale_in_proportion_without_overflow() {
        // u32::MAX points per weight times a weight of u32::MAX, thrice.
        let most = u64::from(u32::MAX) * u64::from(u32::MAX);
        let total = 2 * u128::from(most) + u128::from(most / 2);
        let halved = halvings(total);
        let kept: Vec<u64> = [most, most, most / 2]
            .iter()
            .map(|&p| scale(p, halved))
            .collect();
        let sum = kept.iter().sum::<u64>();
        assert!(sum <= MAX_POINTS && sum > MAX_POINTS / 2, "{kept:?}");
        assert_eq!(kept[1], kept[0]);
        assert_eq!(kept[2], kept[0] / 2);
        // Under the cap nothing changes; a tiny share keeps one point.
        assert_eq!(halvings(480), 0);
        assert_eq!(scale(160, 0), 160);
        assert_eq!(scale(1, halved), 1);
        assert_eq!(scale(u64::MAX, 200), 1);
    }

    fn ring_of(weights: &[(&str, u32)], points_per_weight: u32) -> Ring {
        let pool = crate::Pool::<()>::new();
        for &(id, weight) in weights {
            pool.insert_weighted(id, (), weight);
        }
        Ring::build(pool.snapshot().members(), points_per_weight)
    }

    /// Walks `ring` from `hash` with `eligible`, while `any` is whether
    /// any member is; returns the pick, how many owners were checked and
    /// how many times `any` was asked.
    fn counted_walk(
        ring: &Ring,
        hash: u64,
        eligible: impl Fn(usize) -> bool,
        any: bool,
    ) -> (Option<usize>, usize, usize) {
        let (mut checked, mut asked) = (0, 0);
        let found = ring.walk(
            ring.position(hash),
            |i| {
                checked += 1;
                eligible(i)
            },
            |_| {
                asked += 1;
                any
            },
        );
        (found, checked, asked)
    }

    #[test]
    fn a_walk_along_one_heavy_backend_asks_once_whether_any_is_eligible() {
        // One backend owns the whole ring.
        let ring = ring_of(&[("a", 1_000)], 16);
        assert_eq!(ring.len(), 16_000);
        assert_eq!(counted_walk(&ring, 12345, |_| false, false), (None, 1, 1));

        // With a light backend that is eligible, the walk goes on to it.
        let ring = ring_of(&[("a", 1_000), ("b", 1)], 16);
        let b = 1;
        let (found, _, asked) = counted_walk(&ring, 12345, |i| i == b, true);
        assert_eq!((found, asked), (Some(b), 1));
    }

    #[test]
    fn a_walk_past_many_ineligible_backends_asks_once_whether_any_is_eligible() {
        let names: Vec<String> = (0..100).map(|i| format!("b{i}")).collect();
        let weights: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        let ring = ring_of(&weights, 160);
        let (found, checked, asked) = counted_walk(&ring, 999, |_| false, false);
        assert_eq!((found, asked), (None, 1));
        assert!(checked <= WALK_BEFORE_CHECK as usize + 1, "{checked}");
    }
}
