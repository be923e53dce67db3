use super::random::uniform_eligible;
use super::strategy::{Pick, Strategy};
use super::Turns;
use crate::pool::Members;

/// Round robin: one tick of a shared counter per request.
///
/// Attempts of one request continue from the backend tried last: start,
/// start+1, … wrapping around, each backend at most once (the failover
/// semantics of the Panda API gateway's round robin). The turn of an unavailable backend goes to a random eligible
/// one, so the remaining backends share its load evenly instead of its
/// successor taking all of it.
///
/// Pick it for uniform backends and uniform requests: it is the cheapest
/// strategy and spreads load evenly.
///
/// [`RoundRobin::new`] starts at the first backend. Each of its clones
/// (and each clone of those) starts one backend further on than the one a
/// balancer took up before it, so that the balancers a
/// [`BalanceLayer`](super::BalanceLayer) builds (one per service, such as
/// one per connection, each with a clone of its strategy), and those of
/// clones of the layer, send their first requests to successive backends
/// rather than all to the first.
#[derive(Debug, Default, Clone)]
pub struct RoundRobin {
    turns: Turns,
}

impl RoundRobin {
    /// A round robin starting at the first backend.
    pub fn new() -> Self {
        RoundRobin::default()
    }
}

impl Strategy for RoundRobin {
    type Table = ();

    fn build(&self, _members: &Members) {
        self.turns.draw();
    }

    #[inline]
    fn pick(&self, _table: &(), pick: &Pick<'_>) -> Option<usize> {
        if let Some(last) = pick.last_tried_index() {
            return pick.first_eligible_from(last + 1);
        }
        let n = pick.len();
        if n == 0 {
            return None;
        }
        let turn = self.turns.take() % n;
        if pick.is_eligible(turn) {
            return Some(turn);
        }
        // The backend whose turn it is cannot take it: give the turn to a
        // random eligible backend, not always to the next one, which would
        // otherwise carry twice the load of the others.
        uniform_eligible(pick)
    }
}
