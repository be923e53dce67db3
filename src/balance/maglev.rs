//! The lookup table behind [`ConsistentHash::maglev`](super::ConsistentHash::maglev).

use twox_hash::XxHash3_64;

use super::strategy::Pick;
use crate::pool::Members;

const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b; // "maglevsk"
/// Rehashes tried for a key whose backend is ineligible before scanning.
const PROBES: u64 = 32;
const EMPTY: u32 = u32::MAX;

/// A Maglev table: `table[hash % size]` is a member index.
pub(super) struct Maglev {
    table: Vec<u32>,
    /// Whether each member owns a slot: one far lighter than another (a
    /// weight ratio past the table's size), or one of more members than
    /// slots, owns none.
    owns: Vec<bool>,
}

impl Maglev {
    /// Populates the table as in the Maglev paper (each backend walks its
    /// own permutation of the slots and takes the next free one, in turns),
    /// with turns proportional to weight as in Envoy. Backends take turns in
    /// the order of their ids, so the table does not depend on insertion
    /// order.
    pub(super) fn build(members: &Members, size: u64) -> Maglev {
        if members.is_empty() {
            return Maglev {
                table: Vec::new(),
                owns: Vec::new(),
            };
        }
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_unstable_by(|&a, &b| members[a].id().cmp(members[b].id()));
        struct Walker {
            index: u32,
            offset: u64,
            skip: u64,
            next: u64,
            weight: u64,
            credit: u64,
        }
        let mut walkers: Vec<Walker> = order
            .iter()
            .map(|&i| {
                let id = members[i].id().as_str().as_bytes();
                Walker {
                    index: i as u32,
                    offset: XxHash3_64::oneshot_with_seed(OFFSET_SEED, id) % size,
                    skip: XxHash3_64::oneshot_with_seed(SKIP_SEED, id) % (size - 1) + 1,
                    next: 0,
                    weight: u64::from(members[i].state().weight()),
                    credit: 0,
                }
            })
            .collect();
        let max_weight = walkers.iter().map(|w| w.weight).max().unwrap_or(1);
        let mut table = vec![EMPTY; size as usize];
        let mut filled = 0u64;
        'fill: loop {
            for w in walkers.iter_mut() {
                w.credit += w.weight;
                while w.credit >= max_weight {
                    w.credit -= max_weight;
                    loop {
                        let slot = ((w.offset + w.next * w.skip) % size) as usize;
                        w.next += 1;
                        if table[slot] == EMPTY {
                            table[slot] = w.index;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == size {
                        break 'fill;
                    }
                }
            }
        }
        let mut owns = vec![false; members.len()];
        for &owner in &table {
            owns[owner as usize] = true;
        }
        Maglev { table, owns }
    }

    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    #[cfg(test)]
    pub(super) fn slots(&self) -> &[u32] {
        &self.table
    }

    /// The owner of `hash`'s slot.
    #[inline]
    pub(super) fn owner(&self, hash: u64) -> Option<usize> {
        let size = self.table.len() as u64;
        (size != 0).then(|| self.table[(hash % size) as usize] as usize)
    }

    #[inline]
    pub(super) fn pick(&self, hash: u64, pick: &Pick<'_>) -> Option<usize> {
        let size = self.table.len() as u64;
        if size == 0 {
            return None;
        }
        let first = self.table[(hash % size) as usize] as usize;
        if pick.is_eligible(first) {
            return Some(first);
        }
        // Rehash: the keys of an ineligible backend spread over the others,
        // and keys of eligible backends never move.
        for probe in 1..=PROBES {
            let owner = self.table[(mix(hash, probe) % size) as usize] as usize;
            if pick.is_eligible(owner) {
                return Some(owner);
            }
        }
        // Few eligible backends left, or none (every backend full, down or
        // tried): a pass over the members says which, before a scan of the
        // whole table.
        let any = pick.first_eligible_from(first)?;
        // When no eligible backend owns a slot, a scan of the table would
        // find none: `any` at once, rather than a pass over every slot for
        // every request.
        if !self.owns[any]
            && !(self.owns.iter().enumerate()).any(|(i, &owns)| owns && pick.is_eligible(i))
        {
            return Some(any);
        }
        // Scan the table, then take the member found.
        let start = (hash % size) as usize;
        (start..self.table.len())
            .chain(0..start)
            .map(|s| self.table[s] as usize)
            .find(|&i| pick.is_eligible(i))
            .or(Some(any))
    }
}

/// SplitMix64's finalizer over `hash + probe × golden ratio`.
#[inline]
fn mix(hash: u64, probe: u64) -> u64 {
    let mut z = hash.wrapping_add(probe.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Pool;

    #[test]
    fn maglev_balance_at_ten_backends() {
        let pool: Pool<()> = (0..10).map(|i| (format!("backend-{i}"), ())).collect();
        let m = Maglev::build(pool.snapshot().members(), 65537);
        let mut counts = [0u32; 10];
        for &s in m.slots() {
            counts[s as usize] += 1;
        }
        let max = *counts.iter().max().unwrap() as f64;
        let mean = 65537.0 / 10.0;
        // Every backend owns 6553 or 6554 slots: far inside the 1.02 asked for.
        assert!(max / mean <= 1.0002, "max/mean = {}", max / mean);
    }

    /// A backend far lighter than another owns no slot (the table records
    /// it, so a pick skips the scan that could not find it); when the other
    /// is out, it takes every key.
    #[test]
    fn a_backend_that_owns_no_slot_takes_the_keys_when_the_others_are_out() {
        use crate::key::RequestHead;
        let pool: Pool<()> = Pool::new();
        pool.insert_weighted("light", (), 1);
        pool.insert_weighted("heavy", (), 200_000);
        let snapshot = pool.snapshot();
        let m = Maglev::build(snapshot.members(), 65537);
        let light = snapshot
            .members()
            .iter()
            .position(|m| m.id().as_str() == "light");
        let light = light.unwrap();
        assert!(!m.owns[light] && m.owns[1 - light]);
        assert!(m.slots().iter().all(|&s| s as usize != light));
        pool.state(&"heavy".into())
            .unwrap()
            .set_health(crate::HealthStatus::Unhealthy);
        let req = http::Request::new(());
        let pick = Pick::new(RequestHead::from(&req), snapshot.members(), None);
        for hash in [0, 1, u64::MAX, 0x9e37_79b9_7f4a_7c15] {
            assert_eq!(m.pick(hash, &pick), Some(light));
        }
    }

    #[test]
    fn maglev_weights_are_honoured() {
        let pool: Pool<()> = Pool::new();
        pool.insert_weighted("a", (), 1);
        pool.insert_weighted("b", (), 3);
        let m = Maglev::build(pool.snapshot().members(), 65537);
        let b = m.slots().iter().filter(|&&s| s == 1).count() as f64;
        assert!(
            (b / 65537.0 - 0.75).abs() < 0.01,
            "share of b = {}",
            b / 65537.0
        );
    }
}
