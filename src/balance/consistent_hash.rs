use std::fmt;

use super::maglev::Maglev;
use super::ring::Ring;
use super::round_robin::RoundRobin;
use super::strategy::{Pick, Strategy};
use crate::key::RequestKey;
use crate::pool::Members;

/// Consistent hashing on a request key, with a hash ring or a Maglev table.
///
/// Requests with the same key go to the same backend while it is available;
/// when it is not (or was already tried), the key moves to the next backend
/// in its own order of preference, and only the keys of that backend move.
/// Requests without a key use the fallback strategy (round robin by
/// default).
///
/// Table positions derive from the [`BackendId`](crate::BackendId)s only
/// (XXH3 with fixed seeds, never random), so replicas of an application with
/// the same backends agree on every key, whatever order they learned the
/// backends in.
///
/// * [`ring`](ConsistentHash::ring): Karger et al.'s ring (ketama), with
///   `points_per_weight × weight` points per backend (default 160, as
///   nginx's and pingora's ketama). Removing one of N backends moves about
///   1/N of the keys, only those it owned. A key whose backend is
///   unavailable walks clockwise to the next distinct backend.
/// * [`maglev`](ConsistentHash::maglev): Google's Maglev (Eisenbud et al.,
///   NSDI 2016) lookup table of a prime size (default 65537, as Envoy):
///   near-perfect balance and a lookup that costs the same at any N, at the
///   price of moving somewhat more keys on membership changes. A key whose
///   backend is unavailable is rehashed to a pseudo-random other backend,
///   which spreads a failed backend's keys over all the others.
///
/// ```
/// use tower_ha::balance::{ConsistentHash, Random};
/// use tower_ha::key;
///
/// // Route by user, spread anonymous requests randomly.
/// let by_user = ConsistentHash::ring(key::header("x-user")).fallback(Random::new());
/// // nginx's sticky hash on a cookie (as FastWS deploys it): hash the
/// // cookie's value, round robin without it.
/// let compat = ConsistentHash::ring(key::cookie("StickyStr"));
/// // Even spread and a flat lookup cost for many backends.
/// let spread = ConsistentHash::maglev(key::header("x-tenant"));
/// # let _ = (by_user, compat, spread);
/// ```
pub struct ConsistentHash<K, F = RoundRobin> {
    key: K,
    method: Method,
    fallback: F,
}

#[derive(Debug, Clone, Copy)]
enum Method {
    Ring { points_per_weight: u32 },
    Maglev { table_size: u64 },
}

impl<K: RequestKey> ConsistentHash<K> {
    /// A hash ring with 160 points per unit of weight, falling back to round
    /// robin for requests without a key.
    pub fn ring(key: K) -> Self {
        ConsistentHash {
            key,
            method: Method::Ring {
                points_per_weight: 160,
            },
            fallback: RoundRobin::new(),
        }
    }

    /// A Maglev table of 65537 entries, falling back to round robin for
    /// requests without a key.
    pub fn maglev(key: K) -> Self {
        ConsistentHash {
            key,
            method: Method::Maglev { table_size: 65537 },
            fallback: RoundRobin::new(),
        }
    }
}

impl<K, F> ConsistentHash<K, F> {
    /// Points on the ring per unit of weight (at least 1; ring only). More
    /// points balance better and cost memory. A ring holds at most 8 Mi
    /// points (2^23, as Envoy's): above that, every backend's points are
    /// halved as many times as it takes, so a change that carries the total
    /// across a power of two also moves some keys between other backends.
    pub fn points_per_weight(mut self, points: u32) -> Self {
        if let Method::Ring { points_per_weight } = &mut self.method {
            *points_per_weight = points.max(1);
        }
        self
    }

    /// The Maglev table size (Maglev only), rounded up to the next prime;
    /// at most 2^24 (about 16.7 million slots) before rounding. Keep it well
    /// above 100 × the number of backends for good balance.
    pub fn table_size(mut self, size: u64) -> Self {
        if let Method::Maglev { table_size } = &mut self.method {
            *table_size = next_prime(size.clamp(2, MAX_TABLE_SIZE));
        }
        self
    }

    /// The strategy for requests without a key.
    pub fn fallback<F2: Strategy>(self, fallback: F2) -> ConsistentHash<K, F2> {
        ConsistentHash {
            key: self.key,
            method: self.method,
            fallback,
        }
    }

    /// The request key.
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: Clone, F: Clone> Clone for ConsistentHash<K, F> {
    fn clone(&self) -> Self {
        ConsistentHash {
            key: self.key.clone(),
            method: self.method,
            fallback: self.fallback.clone(),
        }
    }
}

impl<K: fmt::Debug, F: fmt::Debug> fmt::Debug for ConsistentHash<K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsistentHash")
            .field("key", &self.key)
            .field("method", &self.method)
            .field("fallback", &self.fallback)
            .finish()
    }
}

/// The tables of a [`ConsistentHash`]: the ring or Maglev table, and the
/// fallback strategy's own table.
pub struct HashTable<T> {
    lookup: Lookup,
    fallback: T,
}

enum Lookup {
    Ring(Ring),
    Maglev(Maglev),
}

impl<T> HashTable<T> {
    /// The member (index into the snapshot's members) that owns `hash`
    /// first, ignoring availability and attempts: the plain table lookup,
    /// for tools that show where keys live. `None` for an empty pool. Hash
    /// a key the way the built-in keys do with
    /// [`key::hash_bytes`](crate::key::hash_bytes) (a
    /// [`key::from_fn`](crate::key::from_fn) key's only when it is
    /// [`AsBytes`](crate::key::AsBytes), see there).
    #[inline]
    pub fn owner(&self, hash: u64) -> Option<usize> {
        match &self.lookup {
            Lookup::Ring(ring) => ring.owner(hash),
            Lookup::Maglev(maglev) => maglev.owner(hash),
        }
    }
}

impl<T> fmt::Debug for HashTable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.lookup {
            Lookup::Ring(r) => f.debug_struct("Ring").field("points", &r.len()).finish(),
            Lookup::Maglev(m) => f.debug_struct("Maglev").field("size", &m.len()).finish(),
        }
    }
}

impl<K: RequestKey, F: Strategy> Strategy for ConsistentHash<K, F> {
    type Table = HashTable<F::Table>;

    fn build(&self, members: &Members) -> Self::Table {
        let lookup = match self.method {
            Method::Ring { points_per_weight } => {
                Lookup::Ring(Ring::build(members, points_per_weight))
            }
            Method::Maglev { table_size } => Lookup::Maglev(Maglev::build(members, table_size)),
        };
        HashTable {
            lookup,
            fallback: self.fallback.build(members),
        }
    }

    #[inline]
    fn pick(&self, table: &Self::Table, pick: &Pick<'_>) -> Option<usize> {
        match self.key.key(pick.request()) {
            Some(hash) => match &table.lookup {
                Lookup::Ring(ring) => ring.pick(hash, pick),
                Lookup::Maglev(maglev) => maglev.pick(hash, pick),
            },
            None => self.fallback.pick(&table.fallback, pick),
        }
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// The largest Maglev table asked for (before rounding up to a prime).
const MAX_TABLE_SIZE: u64 = 1 << 24;

fn next_prime(mut n: u64) -> u64 {
    while !is_prime(n) {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sizes_round_up_to_primes() {
        assert_eq!(next_prime(65536), 65537);
        assert_eq!(next_prime(65537), 65537);
        assert_eq!(next_prime(100), 101);
        let ch = ConsistentHash::maglev(crate::key::header("x")).table_size(1000);
        assert!(matches!(ch.method, Method::Maglev { table_size: 1009 }));
        let huge = ConsistentHash::maglev(crate::key::header("x")).table_size(u64::MAX);
        assert!(matches!(
            huge.method,
            Method::Maglev {
                table_size: 16_777_259
            }
        ));
    }
}
