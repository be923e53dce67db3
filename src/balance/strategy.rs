//! The [`Strategy`] trait and what a strategy sees of a request.

use std::cell::Cell;

use super::panic::PanicMode;
use crate::backend::{BackendId, BackendState};
use crate::extensions::Attempts;
use crate::key::RequestHead;
use crate::pool::{Member, Members};

/// An order of preference over a pool's available backends, for one request.
///
/// A strategy precomputes a [`Table`](Strategy::Table) on every membership
/// change (off the request path) and then picks one backend per attempt. It
/// keeps no per-request state: the [`Pick`] it receives says which backends
/// were already tried, so each attempt of a request goes to a backend the
/// request has not reached yet.
///
/// Implement it to write your own strategy:
///
/// ```
/// use tower_ha::balance::{Pick, Strategy};
/// use tower_ha::pool::Members;
///
/// /// Always the first eligible backend in insertion order.
/// struct First;
///
/// impl Strategy for First {
///     type Table = ();
///     fn build(&self, _members: &Members) {}
///     fn pick(&self, _table: &(), pick: &Pick<'_>) -> Option<usize> {
///         (0..pick.len()).find(|&i| pick.is_eligible(i))
///     }
/// }
/// ```
pub trait Strategy: Send + Sync + 'static {
    /// State derived from the membership (a hash ring, a weighted sequence),
    /// rebuilt on every membership or weight change.
    type Table: Send + Sync + 'static;

    /// Builds the table for `members`.
    ///
    /// Called while the pool applies a change, so that every balancer sees
    /// the changes in order: it must not change the pool itself (insert,
    /// remove, set a weight), which would wait for itself. It is called
    /// for an empty pool too. A build that panics during a change is
    /// logged, and its balancer keeps its previous table and membership
    /// until the next change; the change itself goes on.
    fn build(&self, members: &Members) -> Self::Table;

    /// The index of the backend to try, or `None` when no eligible backend
    /// is left. The result must be [eligible](Pick::is_eligible).
    fn pick(&self, table: &Self::Table, pick: &Pick<'_>) -> Option<usize>;
}

/// What a strategy sees of one request: its head, the pool's members and
/// which of them it may pick.
#[derive(Debug)]
pub struct Pick<'a> {
    request: RequestHead<'a>,
    members: &'a Members,
    attempts: &'a [BackendId],
    panic: Option<&'a PanicMode>,
    /// Whether the pool is in panic, asked at most once per pick: 0 not
    /// asked yet, 1 no, 2 yes.
    panicking: Cell<u8>,
}

impl<'a> Pick<'a> {
    /// A pick for `request` among `members`, excluding `attempts`.
    pub fn new(
        request: RequestHead<'a>,
        members: &'a Members,
        attempts: Option<&'a Attempts>,
    ) -> Self {
        Pick {
            request,
            members,
            attempts: attempts.map_or(&[], Attempts::as_slice),
            panic: None,
            panicking: Cell::new(0),
        }
    }

    /// Lets this pick route to unavailable backends while `panic` says the
    /// pool is in panic.
    pub(crate) fn with_panic(mut self, panic: &'a PanicMode) -> Self {
        self.panic = Some(panic);
        self
    }

    /// Whether the pool is in panic: so few backends are available that
    /// health and ejections are ignored (see
    /// [`Balance::panic_threshold`](super::Balance::panic_threshold)).
    pub fn is_panicking(&self) -> bool {
        match self.panicking.get() {
            0 => {
                let engaged = self.panic.is_some_and(|p| p.engaged(self.members));
                self.panicking.set(if engaged { 2 } else { 1 });
                engaged
            }
            v => v == 2,
        }
    }

    /// The request's head.
    #[inline]
    pub fn request(&self) -> &RequestHead<'a> {
        &self.request
    }

    /// The pool's members.
    #[inline]
    pub fn members(&self) -> &'a Members {
        self.members
    }

    /// The number of members, eligible or not.
    #[inline]
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the pool is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member at `index`.
    #[inline]
    pub fn member(&self, index: usize) -> &'a Member {
        &self.members[index]
    }

    /// The backends this request already tried, oldest first.
    #[inline]
    pub fn attempts(&self) -> &'a [BackendId] {
        self.attempts
    }

    /// Whether this request already tried the member at `index`.
    #[inline]
    pub fn is_tried(&self, index: usize) -> bool {
        !self.attempts.is_empty() && {
            let id = self.members[index].id();
            self.attempts.iter().any(|t| t == id)
        }
    }

    /// Whether the member at `index` may take this request: available
    /// (enabled, healthy, not ejected), below its
    /// [limit of requests in flight](crate::BackendState::set_max_in_flight)
    /// and not tried yet. While the pool [is in panic](Pick::is_panicking),
    /// health and ejections are ignored and only the operator's status
    /// counts.
    #[inline(always)]
    pub fn is_eligible(&self, index: usize) -> bool {
        let state = self.members[index].state();
        self.may_take(state) && state.has_room() && !self.is_tried(index)
    }

    /// Whether the member at `index` may take a request that names it in an
    /// [`Affinity`](crate::extensions::Affinity): as
    /// [`is_eligible`](Pick::is_eligible), but also at its limit of requests
    /// in flight and while it is draining (healthy and not ejected), so that
    /// existing sessions stay and finish there while no new request
    /// reaches it.
    #[inline]
    pub fn is_eligible_for_affinity(&self, index: usize) -> bool {
        let state = self.members[index].state();
        (self.may_take(state) || state.is_draining_but_serving()) && !self.is_tried(index)
    }

    /// Whether the member at `index` would be eligible but for its limit of
    /// requests in flight.
    pub(crate) fn is_full(&self, index: usize) -> bool {
        let state = self.members[index].state();
        !state.has_room() && self.may_take(state) && !self.is_tried(index)
    }

    /// Available, or enabled while the pool is in panic.
    #[inline]
    fn may_take(&self, state: &BackendState) -> bool {
        state.is_available() || (state.is_enabled() && self.is_panicking())
    }

    /// The position of the most recently tried backend, if it is still a
    /// member: where a round robin continues.
    pub fn last_tried_index(&self) -> Option<usize> {
        self.members.index_of(self.attempts.last()?)
    }

    /// The first eligible member at or after `start`, wrapping around.
    pub fn first_eligible_from(&self, start: usize) -> Option<usize> {
        let n = self.len();
        if n == 0 {
            return None;
        }
        let start = start % n;
        (start..n).chain(0..start).find(|&i| self.is_eligible(i))
    }
}
