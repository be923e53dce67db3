//! The strategy of a group whose mode is chosen at run time.

use super::handle::GroupMode;
use crate::balance::{Pick, Priority, PriorityTable, RoundRobin, Strategy};
use crate::pool::Members;

/// The strategy of a group whose mode is known only at run time (from
/// configuration): [`Priority`] for an active-passive group, [`RoundRobin`]
/// for a normal one.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum GroupStrategy {
    /// Active-passive.
    Priority(Priority),
    /// Normal: round robin over the available members.
    RoundRobin(RoundRobin),
}

impl GroupStrategy {
    /// The group's mode.
    pub fn mode(&self) -> GroupMode {
        match self {
            GroupStrategy::Priority(_) => GroupMode::ActivePassive,
            GroupStrategy::RoundRobin(_) => GroupMode::Normal,
        }
    }

    /// The active-passive strategy, if the group is one.
    pub fn priority(&self) -> Option<&Priority> {
        match self {
            GroupStrategy::Priority(p) => Some(p),
            GroupStrategy::RoundRobin(_) => None,
        }
    }
}

/// The table of a [`GroupStrategy`].
#[derive(Debug)]
pub struct GroupTable(Option<PriorityTable>);

impl Strategy for GroupStrategy {
    type Table = GroupTable;

    fn build(&self, members: &Members) -> GroupTable {
        match self {
            GroupStrategy::Priority(p) => GroupTable(Some(p.build(members))),
            GroupStrategy::RoundRobin(r) => {
                r.build(members);
                GroupTable(None)
            }
        }
    }

    fn pick(&self, table: &GroupTable, pick: &Pick<'_>) -> Option<usize> {
        match (self, &table.0) {
            (GroupStrategy::Priority(p), Some(t)) => p.pick(t, pick),
            (GroupStrategy::RoundRobin(r), _) => r.pick(&(), pick),
            // Tables are built by the strategy itself, so this is unreachable
            // in practice; answer like an empty pool.
            (GroupStrategy::Priority(_), None) => None,
        }
    }
}
