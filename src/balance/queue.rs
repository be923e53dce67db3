//! Requests that wait for a place when every backend they may use is at its
//! limit of requests in flight (see [`Balance::queue`](super::Balance::queue)).
//!
//! One [`Room`] per pool holds the waiting requests in arrival order. Every
//! backend state of the pool links to it, so that a request that stops
//! being in flight hands its place straight to the first waiter that may
//! use that backend: a request arriving meanwhile cannot take it first, and
//! the queue is served in order. Other ways a place opens up (a limit
//! raised, a backend back in service or joining the pool) hand the free
//! places on the changed backends to the waiters in order too, under the
//! queue's lock, and then wake the others to pick again (a change may also
//! put the pool in panic, which lets them use other backends). An ejection
//! that runs out changes nothing anyone sees, so each waiter that could use
//! an ejected backend sets a timer for the ejection's end, which then does
//! what such a change does.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

use crate::backend::{BackendId, BackendState, InFlight};
use crate::error::NoBackend;
use crate::extensions::Picked;
use crate::pool::{Member, Members, Pool, Snapshot};

use super::panic::PanicMode;

/// The requests waiting for a place on one pool's backends.
#[derive(Default)]
pub(crate) struct Room {
    /// The length of the queue, readable without its lock.
    waiting: AtomicUsize,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// In arrival order.
    waiters: VecDeque<Arc<Waiter>>,
    /// The arrival number of the next request to join.
    next: u64,
    /// The pool's backends, as of its last change, by the address of their
    /// state: where a change that opens up places hands them over. A place
    /// on a backend the pool no longer holds is not handed over (the
    /// backend may come back with the same state, see
    /// `Pool::keep_removed_for`). Weak, as each state links to its room.
    members: HashMap<usize, (BackendId, Weak<BackendState>)>,
}

/// The key of `state` in `Queue::members`.
fn address(state: &BackendState) -> usize {
    state as *const BackendState as usize
}

impl Queue {
    /// Whether `state` is the state of one of the pool's backends.
    fn holds(&self, state: &Arc<BackendState>) -> bool {
        self.members.contains_key(&address(state))
    }
}

/// One waiting request.
struct Waiter {
    /// Its arrival number: a request that joins again keeps its place.
    arrival: u64,
    /// Whether the pool was in panic when the request last picked: then a
    /// backend will do if it is enabled, healthy or not.
    panic: AtomicBool,
    /// The backends the request tried already, by name: a backend may
    /// leave the pool and join it again with a new state.
    tried: Vec<BackendId>,
    /// Whether the waiter is in its room's queue; changed only under the
    /// queue's lock.
    queued: AtomicBool,
    turn: Mutex<TurnState>,
}

#[derive(Default)]
struct TurnState {
    /// The states the request may not go to: those of the backends it had
    /// tried that were in the pool when it joined (the names in
    /// `Waiter::tried` cover the rest), and any it was handed a place on
    /// that it could not use.
    excluded: Vec<Arc<BackendState>>,
    waker: Option<Waker>,
    /// A place handed over by a request that ended.
    given: Option<InFlight>,
    /// Whether to pick again: a place may have opened up elsewhere.
    recheck: bool,
}

/// What a waiting request does next.
pub(crate) enum Turn {
    /// Go to the backend whose place this is.
    Given(InFlight),
    /// Pick again.
    Recheck,
    /// Keep waiting.
    Wait,
}

impl Room {
    /// How many requests are waiting.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Puts a request that tried `tried` (whose states in the pool are
    /// `excluded`) at the end of the queue, unless `max` are waiting
    /// already. The request must pick once more after joining (its first
    /// [`Ticket::turn`] says so): a place that opened up just before it
    /// joined was not handed to it.
    pub(crate) fn join(
        self: &Arc<Self>,
        max: usize,
        tried: Vec<BackendId>,
        excluded: Vec<Arc<BackendState>>,
        panic: bool,
    ) -> Option<Ticket> {
        let waiter = {
            let mut queue = self.queue.lock();
            if queue.waiters.len() >= max {
                return None;
            }
            let waiter = Arc::new(Waiter {
                arrival: queue.next,
                panic: AtomicBool::new(panic),
                tried,
                queued: AtomicBool::new(false),
                turn: Mutex::new(TurnState {
                    excluded,
                    recheck: true,
                    ..TurnState::default()
                }),
            });
            queue.next += 1;
            self.enqueue(&mut queue, waiter.clone());
            waiter
        };
        // Pairs with the fence in `released`: either that release sees
        // this waiter, or this waiter's next pick sees the free place.
        fence(Ordering::SeqCst);
        Some(Ticket {
            room: self.clone(),
            waiter,
        })
    }

    /// Puts `waiter` in the queue at its place in arrival order.
    fn enqueue(&self, queue: &mut Queue, waiter: Arc<Waiter>) {
        waiter.queued.store(true, Ordering::Relaxed);
        let at = queue
            .waiters
            .partition_point(|w| w.arrival < waiter.arrival);
        queue.waiters.insert(at, waiter);
        self.waiting.store(queue.waiters.len(), Ordering::Relaxed);
    }

    /// Takes the first waiter that `may` use `state`'s backend out of the
    /// queue, with `place`; returns its waker.
    fn give(
        &self,
        queue: &mut Queue,
        may: impl Fn(&Waiter) -> bool,
        place: impl FnOnce() -> Option<InFlight>,
    ) -> Result<Option<Waker>, ()> {
        let i = queue.waiters.iter().position(|w| may(w)).ok_or(())?;
        let place = place().ok_or(())?;
        let waiter = queue.waiters.remove(i).expect("index within the queue");
        waiter.queued.store(false, Ordering::Relaxed);
        self.waiting.store(queue.waiters.len(), Ordering::Relaxed);
        let mut turn = waiter.turn.lock();
        // A waiter in the queue holds no place: dropping one here would
        // release it under the queue's lock.
        debug_assert!(turn.given.is_none());
        turn.given = Some(place);
        Ok(turn.waker.take())
    }

    /// Hands the free places on `state`'s backend to the waiters that `may`
    /// use it, in the order they came, while there are both; collects
    /// their wakers.
    fn hand_out(
        &self,
        queue: &mut Queue,
        state: &Arc<BackendState>,
        may: impl Fn(&Waiter) -> bool,
        wakers: &mut Vec<Waker>,
    ) {
        // Without room, no need to look for a waiter.
        while state.has_room() {
            match self.give(queue, &may, || state.try_track_in_flight()) {
                Ok(waker) => wakers.extend(waker),
                Err(()) => break,
            }
        }
    }

    /// Called as one of `state`'s requests stops being in flight: hands its
    /// place, still counted in flight, to the first waiter that may use
    /// `state`'s backend. `false` when none may (the place is then freed).
    #[inline]
    pub(crate) fn take_over(&self, state: &Arc<BackendState>) -> bool {
        // Without a fence: a waiter missed here is found by `released`,
        // after the place is freed and a fence is passed.
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut queue = self.queue.lock();
        if !queue.holds(state) {
            return false;
        }
        let Ok(waker) = self.give(&mut queue, |w| w.accepts(state), || state.pass_place()) else {
            return false;
        };
        drop(queue);
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// Called once one of `state`'s places is free: hands it to the first
    /// waiter that may use `state`'s backend, one that joined as the place
    /// was freed.
    pub(crate) fn released(&self, state: &Arc<BackendState>) {
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut wakers = Vec::new();
        {
            let mut queue = self.queue.lock();
            // A request that arrived since may have taken the place; then
            // there is nothing to hand over.
            if queue.holds(state) {
                self.hand_out(&mut queue, state, |w| w.accepts(state), &mut wakers);
            }
        }
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Notes the pool's backends after a change of its membership.
    pub(crate) fn set_members(&self, members: &Members) {
        let mut queue = self.queue.lock();
        queue.members.clear();
        queue.members.extend(members.iter().map(|m| {
            let entry = (m.id().clone(), Arc::downgrade(m.state()));
            (address(m.state()), entry)
        }));
    }

    /// Forgets the backends `members` no longer lists (the first half of
    /// a change of membership; [`set_members`](Room::set_members) notes
    /// the new ones once the balancers know them), and returns the states
    /// of those still alive.
    pub(crate) fn keep_members(&self, members: &Members) -> Vec<Arc<BackendState>> {
        let mut gone = Vec::new();
        self.queue.lock().members.retain(|&at, (id, state)| {
            let kept = members
                .index_of(id)
                .is_some_and(|i| address(members[i].state()) == at);
            if !kept {
                gone.extend(state.upgrade());
            }
            kept
        });
        gone
    }

    /// After a change that may have opened up places in a way no request's
    /// end announces (on the backend whose state is `changed`, or on any
    /// backend of the pool for `None`): hands the free places on those
    /// backends to the waiters that may use them, in the order they came,
    /// then wakes every other waiter to pick again.
    pub(crate) fn wake_all(&self, changed: Option<&BackendState>) {
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut wakers = Vec::new();
        {
            let mut queue = self.queue.lock();
            // The change may have taken the pool out of panic: until a
            // waiter counts the pool again, it is handed places only on
            // available backends.
            for waiter in &queue.waiters {
                waiter.panic.store(false, Ordering::Relaxed);
            }
            let members = std::mem::take(&mut queue.members);
            let mut hand_out = |(id, state): &(BackendId, Weak<BackendState>)| {
                if let Some(state) = state.upgrade() {
                    self.hand_out(&mut queue, &state, |w| w.may_use(id, &state), &mut wakers);
                }
            };
            match changed {
                Some(state) => members
                    .get(&address(state))
                    .into_iter()
                    .for_each(&mut hand_out),
                None => members.values().for_each(&mut hand_out),
            }
            queue.members = members;
            wakers.extend(queue.waiters.iter().filter_map(|waiter| {
                let mut turn = waiter.turn.lock();
                turn.recheck = true;
                turn.waker.take()
            }));
        }
        wakers.into_iter().for_each(Waker::wake);
    }
}

impl Waiter {
    /// Whether the request may go to backend `id`: usable, neither tried
    /// nor excluded.
    fn may_use(&self, id: &BackendId, state: &Arc<BackendState>) -> bool {
        self.accepts(state) && !self.tried.contains(id)
    }

    fn accepts(&self, state: &Arc<BackendState>) -> bool {
        let usable = match self.panic.load(Ordering::Relaxed) {
            true => state.is_enabled(),
            false => state.is_available(),
        };
        usable && !self.excludes(state)
    }

    fn excludes(&self, state: &Arc<BackendState>) -> bool {
        self.turn
            .lock()
            .excluded
            .iter()
            .any(|s| Arc::ptr_eq(s, state))
    }
}

/// A request's membership of a [`Room`]'s queue; leaves the queue when
/// dropped, releasing a place handed over meanwhile.
pub(crate) struct Ticket {
    room: Arc<Room>,
    waiter: Arc<Waiter>,
}

impl Ticket {
    /// Registers `cx`'s task to be woken, and says what to do now.
    pub(crate) fn turn(&self, cx: &Context<'_>) -> Turn {
        let mut turn = self.waiter.turn.lock();
        match &turn.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => turn.waker = Some(cx.waker().clone()),
        }
        if let Some(place) = turn.given.take() {
            return Turn::Given(place);
        }
        match std::mem::take(&mut turn.recheck) {
            true => Turn::Recheck,
            false => Turn::Wait,
        }
    }

    /// Notes whether the pool is in panic now, for the backends the request
    /// may use from now on.
    fn set_panic(&self, panic: bool) {
        self.waiter.panic.store(panic, Ordering::Relaxed);
    }

    /// Whether the request may go to the backend `member` of the pool:
    /// usable, neither tried nor excluded.
    fn may_use(&self, member: &Member) -> bool {
        self.waiter.may_use(member.id(), member.state())
    }

    /// When the request may use the backend `member`, which it may not
    /// use now, if nothing changes but the clock: the end of its ejection.
    /// Nobody hands over the places an ejection that runs out opens up.
    fn usable_at(&self, member: &Member) -> Option<Instant> {
        let state = member.state();
        let at = state.available_at()?;
        let waiter = &self.waiter;
        (!waiter.tried.contains(member.id()) && !waiter.excludes(state)).then_some(at)
    }

    /// Takes its place in the queue again, after a place handed over could
    /// not be used; never handed one on `unusable`'s backend again (a
    /// backend of a name the request tried). Picks once more first.
    pub(crate) fn rejoin(&self, unusable: Option<&Arc<BackendState>>) {
        if let Some(state) = unusable {
            self.waiter.turn.lock().excluded.push(state.clone());
        }
        {
            let mut queue = self.room.queue.lock();
            if !self.waiter.queued.load(Ordering::Relaxed) {
                self.room.enqueue(&mut queue, self.waiter.clone());
            }
        }
        fence(Ordering::SeqCst);
        self.waiter.turn.lock().recheck = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut queue = self.room.queue.lock();
            if self.waiter.queued.load(Ordering::Relaxed) {
                if let Some(i) = queue
                    .waiters
                    .iter()
                    .position(|w| Arc::ptr_eq(w, &self.waiter))
                {
                    queue.waiters.remove(i);
                }
                self.waiter.queued.store(false, Ordering::Relaxed);
                self.room
                    .waiting
                    .store(queue.waiters.len(), Ordering::Relaxed);
            }
        }
        // Out of the queue, nothing more is handed over. A place handed
        // over but not taken goes to the next waiter, outside the locks.
        let given = self.waiter.turn.lock().given.take();
        if let Some(place) = given {
            place.unused();
        }
    }
}

/// A request placed on a backend: the backend's service, id, and the
/// request's place on it.
pub(crate) struct Placed<S> {
    pub(crate) service: S,
    pub(crate) id: BackendId,
    pub(crate) in_flight: InFlight,
    pub(crate) picked: Option<Picked>,
    /// The request required its session's backend
    /// ([`AffinityRequired`](crate::extensions::AffinityRequired)).
    pub(crate) required: bool,
}

/// Labels a request placed on the backend at an index of a snapshot.
pub(crate) type Settle<S, Req> = fn(&Snapshot<S>, usize, InFlight, &mut Req) -> Placed<S>;

/// Places a queued request with `settle`. Its balancer does not tell a
/// failover layer that asks whether a retry could find another backend
/// (see `Picked::ask_others`): the answer is "maybe", which keeps the
/// pause, and a balancer behind this backend (a nested group), which knows
/// only its own members, cannot answer instead.
fn settle_queued<S, Req>(
    settle: Settle<S, Req>,
    snapshot: &Snapshot<S>,
    i: usize,
    place: InFlight,
    request: &mut Req,
) -> Placed<S> {
    let placed = settle(snapshot, i, place, request);
    if let Some(slot) = &placed.picked {
        slot.answer_others(true);
    }
    placed
}

/// A request waiting for a place, in a balancer's response future.
pub(crate) struct Wait<S, Req> {
    pool: Pool<S>,
    panic: Arc<PanicMode>,
    settle: Settle<S, Req>,
    ticket: Ticket,
    deadline: Instant,
    /// The earliest end of an ejection that keeps the request off a
    /// backend it may use otherwise, as of its last pick, and that
    /// backend's state.
    ejection_ends: Option<(Instant, Arc<BackendState>)>,
    /// Until the deadline or the end of that ejection, the earlier.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S, Req> Wait<S, Req> {
    pub(crate) fn new(
        pool: Pool<S>,
        panic: Arc<PanicMode>,
        settle: Settle<S, Req>,
        ticket: Ticket,
        deadline: Instant,
    ) -> Self {
        Wait {
            pool,
            panic,
            settle,
            ticket,
            deadline,
            ejection_ends: None,
            sleep: None,
        }
    }

    /// Places `request` once a place is handed over or found, or fails
    /// when the wait is over (or when no backend could take it any more,
    /// full or not).
    pub(crate) fn poll_place(
        &mut self,
        cx: &mut Context<'_>,
        request: &mut Req,
    ) -> Poll<Result<Placed<S>, NoBackend>> {
        loop {
            let turn = self.ticket.turn(cx);
            // After the turn: a backend that joined before the wake-up is in it.
            let snapshot = self.pool.snapshot();
            let members = snapshot.members();
            match turn {
                Turn::Given(place) => {
                    match members
                        .iter()
                        .position(|m| Arc::ptr_eq(m.state(), place.state()))
                    {
                        Some(i) if !self.ticket.waiter.tried.contains(members[i].id()) => {
                            if self.ticket.waiter.accepts(place.state()) {
                                return Poll::Ready(Ok(settle_queued(
                                    self.settle,
                                    &snapshot,
                                    i,
                                    place,
                                    request,
                                )));
                            }
                            // Taken out of rotation since the place was
                            // handed over (disabled, unhealthy, ejected):
                            // picks again.
                            self.ticket.rejoin(None)
                        }
                        // Its backend left the pool and joined it again
                        // after the request tried it: never handed a place
                        // there again.
                        Some(_) => self.ticket.rejoin(Some(place.state())),
                        // Its backend has left the pool since the place was
                        // handed over: no more are handed over there while
                        // it is away, and it may come back with this state.
                        None => self.ticket.rejoin(None),
                    }
                    // Let the place go, to a request that may still use it.
                    place.unused();
                    continue;
                }
                Turn::Recheck => {
                    // A count of the pool as it is now, not as cached: the
                    // change that woke this request may have put the pool
                    // in panic or taken it out.
                    self.ticket.set_panic(self.panic.recount(members));
                    let mut usable = false;
                    self.ejection_ends = None;
                    for (i, member) in members.iter().enumerate() {
                        if !self.ticket.may_use(member) {
                            let sooner = |at: &Instant| {
                                self.ejection_ends.as_ref().is_none_or(|(e, _)| at < e)
                            };
                            if let Some(at) = self.ticket.usable_at(member).filter(sooner) {
                                self.ejection_ends = Some((at, member.state().clone()));
                            }
                            continue;
                        }
                        usable = true;
                        if let Some(place) = member.state().try_track_in_flight() {
                            return Poll::Ready(Ok(settle_queued(
                                self.settle,
                                &snapshot,
                                i,
                                place,
                                request,
                            )));
                        }
                    }
                    if !usable {
                        // Nothing to wait for: no backend is merely busy.
                        return Poll::Ready(Err(self
                            .pool
                            .refused(NoBackend::new(), &self.ticket.waiter.tried)));
                    }
                }
                Turn::Wait => {}
            }
            let deadline = self.deadline;
            let until = self
                .ejection_ends
                .as_ref()
                .map_or(deadline, |(at, _)| (*at).min(deadline));
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            match sleep.as_mut().poll(cx) {
                Poll::Ready(()) if until < deadline => {
                    // The ejection is over: its backend's free places go to
                    // the waiters in the order they came, as on any change,
                    // and every waiter picks again.
                    if let Some((_, state)) = self.ejection_ends.take() {
                        self.ticket.room.wake_all(Some(&state));
                    }
                }
                Poll::Ready(()) => {
                    return Poll::Ready(Err(self
                        .pool
                        .refused(NoBackend::queue_timeout(), &self.ticket.waiter.tried)))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
