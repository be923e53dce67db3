//! Numbers that tell apart the objects of one process whose counts start
//! from zero (backend states, group states, layers), as their addresses
//! cannot once they are freed.

use std::sync::atomic::{AtomicU64, Ordering};

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A number no other object of the process has, larger than that of any
/// object made before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Serial(u64);

impl Serial {
    /// The next number.
    pub(crate) fn take() -> Self {
        Serial(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The number the next object will take: every object made before now
    /// has a smaller one.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn next() -> Self {
        Serial(NEXT.load(Ordering::Relaxed))
    }
}

/// A new number: a derived `Default` gives each object its own.
impl Default for Serial {
    fn default() -> Self {
        Serial::take()
    }
}
