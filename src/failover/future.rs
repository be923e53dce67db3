//! The response future of [`Failover`](super::Failover).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::request::Parts;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::body::{Replay, SendProgress, SendState};
use super::error::{DeadlineExceeded, Exhausted, FailedStatus, TimedOut};
use super::grpc;
use super::layer::{Config, Limit};
use super::policy::{is_idempotent, RetryNonIdempotent};
use super::stats::bump;
use crate::backend::BackendId;
use crate::classify::{response_fails, Classifier, Outcome};
use crate::control::{emit, Event};
use crate::error::{find, is_no_backend, never_sent, BackendError, BoxError, GoingAway, Report};
use crate::extensions::Picked;
use crate::extensions::{Affinity, Attempts, GaveUp, ServedBy};
use crate::time::{earliest, later, set_timer};

pin_project! {
    /// The response future of [`Failover`](super::Failover): runs the
    /// attempts of one request.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<S, B, C>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        attempt: Attempt<S::Future>,
        // One timer for the per-try timeout, a backoff pause and the
        // overall deadline, set to the earliest that applies. Boxed, so
        // that the future stays small when no timer is configured.
        timer: Option<Pin<Box<Sleep>>>,
        // When the overall deadline passes.
        deadline: Option<Instant>,
        retry: Retry<S, B, C>,
    }
}

pin_project! {
    #[project = AttemptProj]
    enum Attempt<F> {
        Called {
            #[pin]
            future: F,
        },
        Backoff,
        Ready,
        Done,
    }
}

/// The state of one request across its attempts.
struct Retry<S, B, C>
where
    S: Service<Request<B>>,
{
    service: S,
    config: Arc<Config<C>>,
    /// The request as it was received, with its `Attempts`, from which each
    /// retry is copied. `None` when no retry is allowed.
    template: Option<Template<B>>,
    /// The next retry's body, copied before a pause: a body sent once
    /// then has one live copy, this one, so the failed attempt's copy,
    /// which its backend may read on (hyper sends a body on after its
    /// answer), stops, and what the client sends meanwhile is kept.
    /// Boxed: only a pause fills it.
    held: Option<Box<B>>,
    /// Where the balancer records the backend it picks.
    picked: Option<Picked>,
    /// The request's overall deadline, if it has one.
    limit: Option<Limit>,
    /// The backend of the attempt in flight, when the balancer said so.
    current: Option<BackendId>,
    /// How far a body sent once (streamed past `BufferBody`'s limit) has
    /// got, when there is a per-try timeout: it runs from the body's end.
    upload: Option<SendProgress>,
    /// Each failed attempt: the backend and why.
    failures: Vec<(BackendId, BoxError)>,
    /// The most recent failed response, returned if no later attempt does
    /// better.
    last_response: Option<S::Response>,
    /// Attempts made so far.
    tried: usize,
    /// Whether the method (or an opt-in) allows retrying after any failure.
    any_failure: bool,
    /// Whether the attempt in flight is a retry not yet taken from the
    /// budget.
    unpaid: bool,
    /// The budget refused the attempt in flight after it had reached its
    /// backend: it runs to its end, and no retry follows.
    over_budget: bool,
    /// The attempt in flight is a retry whose backend was not known when it
    /// was called: it is announced once it is.
    unannounced: bool,
    /// The budget refused a retry that would otherwise have been made.
    budget_spent: bool,
    /// The next retry was paid for before its pause.
    prepaid: bool,
}

enum Verdict<R> {
    Return(Result<R, BoxError>),
    Retry,
}

impl<S, B, C, RB> ResponseFuture<S, B, C>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    B: Replay,
    C: Classifier,
{
    pub(crate) fn new(mut service: S, config: Arc<Config<C>>, req: Request<B>) -> Self {
        if let Some(budget) = &config.budget {
            budget.deposit();
        }
        let (mut parts, body) = req.into_parts();
        let limit = config.limit(&parts.headers);
        if let Some(Limit {
            after,
            client: false,
            tell: true,
        }) = limit
        {
            // The layer's deadline is shorter than the client's: the
            // backend is told.
            grpc::tell(&mut parts.headers, after);
        }
        let any_failure = config.retry_non_idempotent
            || is_idempotent(&parts.method)
            || parts.extensions.get::<RetryNonIdempotent>().is_some();
        let (template, body) = if config.max_attempts > 1 {
            Template::new(&parts, body)
        } else {
            (None, body)
        };
        // The timers need the slot, and so does a pause before a retry (to
        // know whether one could find a backend), if one may follow. The
        // template was copied before the slot goes into the request: it
        // gets one at the first retry, so a request that succeeds clones no
        // extension for it.
        let asks = config.pauses() && template.is_some();
        let timed = config.per_try_timeout.is_some() || limit.is_some();
        let picked = (timed || asks).then(|| {
            let picked = config.slot(asks);
            parts.extensions.insert(picked.clone());
            picked
        });
        let upload = match config.per_try_timeout {
            Some(_) => parts.extensions.get::<SendProgress>().cloned(),
            None => None,
        };
        let future = service.call(Request::from_parts(parts, body));
        let current = picked.as_ref().and_then(Picked::take);
        let (mut timer, mut deadline) = (None, None);
        if picked.is_some() {
            let now = Instant::now();
            deadline = limit.map(|limit| later(now, limit.after));
            let per_try = config.per_try_timeout.map(|d| later(now, d));
            set_timer(&mut timer, earliest(per_try, deadline));
        }
        ResponseFuture {
            attempt: Attempt::Called { future },
            timer,
            deadline,
            retry: Retry {
                service,
                config,
                template,
                held: None,
                picked,
                limit,
                current,
                upload,
                failures: Vec::new(),
                last_response: None,
                tried: 1,
                any_failure,
                unpaid: false,
                over_budget: false,
                unannounced: false,
                budget_spent: false,
                prepaid: false,
            },
        }
    }
}

/// The request as it was received, kept apart as its head and its body:
/// each copy clones the head whole, with no default to build and drop.
struct Template<B> {
    parts: Parts,
    body: B,
}

impl<B: Replay> Template<B> {
    /// A copy of the request with head `parts` and body `body`, if the body
    /// can be replayed, and the body for the first attempt: a copy too,
    /// made after the template, as each attempt's is (the latest copy of a
    /// body sent once is the one that may send it).
    fn new(parts: &Parts, body: B) -> (Option<Self>, B) {
        match body.replay() {
            Some(first) => {
                let parts = parts.clone();
                (Some(Template { parts, body }), first)
            }
            None => (None, body),
        }
    }

    /// A copy of the request for one more attempt, with `held`, a copy of
    /// the body made already, or a new one, if the body can be replayed.
    fn copy(&self, held: Option<B>) -> Option<Request<B>> {
        let body = held.or_else(|| self.body.replay())?;
        Some(Request::from_parts(self.parts.clone(), body))
    }
}

impl<S, B, C, RB> Future for ResponseFuture<S, B, C>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    B: Replay,
    C: Classifier,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.attempt.as_mut().project() {
                AttemptProj::Called { future } => {
                    let polled = match future.poll(cx) {
                        // The common case, a first attempt that succeeded,
                        // is handed back as it is (no failure yet: nothing
                        // unpaid either).
                        Poll::Ready(Ok(response))
                            if this.retry.failures.is_empty()
                                && !response_fails(&this.retry.config.classifier, &response) =>
                        {
                            this.attempt.set(Attempt::Done);
                            return Poll::Ready(Ok(response));
                        }
                        polled => polled.map_err(Into::into),
                    };
                    if this.retry.unpaid {
                        let no_backend =
                            matches!(&polled, Poll::Ready(Err(e)) if is_no_backend(&**e));
                        if !no_backend && !this.retry.pay() {
                            // Picked late (behind a buffer or a queue):
                            // one already handed to its backend may have
                            // acted on the request, so it is not cut off;
                            // one already over runs to its end too. Either
                            // way it is the last attempt.
                            let sent = polled.is_ready()
                                || this
                                    .retry
                                    .picked
                                    .as_ref()
                                    .is_some_and(|p| p.is_set() && !p.is_readying());
                            if !sent {
                                this.attempt.set(Attempt::Done);
                                this.retry.budget_spent = true;
                                this.retry.give_back();
                                return Poll::Ready(this.retry.give_up(None));
                            }
                            this.retry.over_budget = true;
                        }
                    }
                    if this.retry.unannounced {
                        this.retry.announce_late(&polled);
                    }
                    let mut timed_out = false;
                    let outcome = match polled {
                        Poll::Ready(result) => result,
                        Poll::Pending => {
                            match fired(this.timer, *this.deadline, cx) {
                                Fired::No => return Poll::Pending,
                                Fired::Deadline => {
                                    this.attempt.set(Attempt::Done);
                                    return Poll::Ready(this.retry.deadline_exceeded(true));
                                }
                                Fired::Timer => {}
                            }
                            if let Some(until) = this.retry.per_try_postponed() {
                                set_timer(this.timer, earliest(Some(until), *this.deadline));
                                continue;
                            }
                            timed_out = true;
                            bump(&this.retry.config.counters.per_try_timeouts);
                            let after = this.retry.config.per_try_timeout;
                            // Abandoned while its backend was still being
                            // readied: the request never left.
                            let not_sent =
                                this.retry.picked.as_ref().is_some_and(Picked::is_readying);
                            Err(TimedOut::new(after.unwrap_or_default())
                                .not_sent(not_sent)
                                .into())
                        }
                    };
                    // Drops the attempt: an abandoned backend gets no more
                    // of the request. A per-backend layer dropped with it
                    // (passive health) learns that it timed out.
                    match (&this.retry.picked, timed_out) {
                        (Some(slot), true) => slot.timing_out(|| this.attempt.set(Attempt::Done)),
                        _ => this.attempt.set(Attempt::Done),
                    }
                    match this.retry.judge(outcome) {
                        Verdict::Return(result) => return Poll::Ready(result),
                        Verdict::Retry => {
                            // No pause before a retry that finds no backend
                            // (it costs nothing and ends the request).
                            let pause = if this.retry.none_left() {
                                Duration::ZERO
                            } else {
                                (this.retry.config.backoff).delay(retry_number(this.retry.tried))
                            };
                            if pause.is_zero() {
                                this.attempt.set(Attempt::Ready);
                            } else {
                                let until = later(Instant::now(), pause);
                                // Paid for before the pause, unless the
                                // deadline ends the request first (no retry
                                // follows that pause).
                                let retries = this.deadline.is_none_or(|d| until < d);
                                if retries && !this.retry.prepay() {
                                    this.attempt.set(Attempt::Done);
                                    return Poll::Ready(this.retry.give_up(None));
                                }
                                // Once paid for: a copy cuts the failed
                                // attempt's off, which a refused retry must
                                // leave whole.
                                if retries && !this.retry.hold_body() {
                                    // Read past what was held meanwhile.
                                    this.attempt.set(Attempt::Done);
                                    bump(&this.retry.config.counters.unreplayable);
                                    return Poll::Ready(this.retry.give_up(None));
                                }
                                set_timer(this.timer, earliest(Some(until), *this.deadline));
                                this.attempt.set(Attempt::Backoff);
                            }
                        }
                    }
                }
                AttemptProj::Backoff => match fired(this.timer, *this.deadline, cx) {
                    Fired::No => return Poll::Pending,
                    Fired::Deadline => {
                        this.attempt.set(Attempt::Done);
                        return Poll::Ready(this.retry.deadline_exceeded(false));
                    }
                    Fired::Timer => this.attempt.set(Attempt::Ready),
                },
                AttemptProj::Ready => {
                    if this.deadline.is_some() {
                        // The deadline alone watches the wait for the next
                        // pick.
                        set_timer(this.timer, *this.deadline);
                        if let Fired::Deadline = fired(this.timer, *this.deadline, cx) {
                            this.attempt.set(Attempt::Done);
                            return Poll::Ready(this.retry.deadline_exceeded(false));
                        }
                    }
                    let future = match ready!(this.retry.poll_next(cx, *this.deadline)) {
                        Ok(future) => future,
                        Err(result) => {
                            this.attempt.set(Attempt::Done);
                            return Poll::Ready(result);
                        }
                    };
                    this.attempt.set(Attempt::Called { future });
                    let per_try =
                        (this.retry.config.per_try_timeout).map(|d| later(Instant::now(), d));
                    set_timer(this.timer, earliest(per_try, *this.deadline));
                }
                AttemptProj::Done => panic!("failover ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S, B, C> Retry<S, B, C>
where
    S: Service<Request<B>>,
{
    /// When the per-try timeout of the attempt in flight ends instead,
    /// because it runs from the end of the request's upload: while the
    /// backend waits for the client's next frame of a body sent once, the
    /// timeout waits (its next check is a timeout later); while the
    /// backend is the one that stalls, it runs from the last frame the
    /// backend took; once the body has been read, it ends a timeout after.
    /// `None` when it ends now.
    fn per_try_postponed(&self) -> Option<Instant> {
        let per_try = self.config.per_try_timeout?;
        let now = Instant::now();
        let since = match self.upload.as_ref()?.get() {
            SendState::Unsent => return None,
            SendState::Sending { starved: true, .. } => return Some(later(now, per_try)),
            SendState::Sending { last, .. } => last,
            SendState::Sent(at) => at,
        };
        Some(later(since, per_try)).filter(|until| *until > now)
    }
}

/// Retry `n` follows attempt `n`.
fn retry_number(tried: usize) -> u32 {
    u32::try_from(tried).unwrap_or(u32::MAX)
}

/// What the request's timer says.
enum Fired {
    /// Not fired, or none set: the task is woken when it fires.
    No,
    /// The overall deadline passed.
    Deadline,
    /// The per-try timeout or the backoff pause it was set to ended.
    Timer,
}

/// Polls the request's timer, set to the earliest of what applies; tells
/// the overall deadline (when the timer was set to it) from the rest.
fn fired(
    timer: &mut Option<Pin<Box<Sleep>>>,
    deadline: Option<Instant>,
    cx: &mut Context<'_>,
) -> Fired {
    let Some(timer) = timer else {
        return Fired::No;
    };
    if timer.as_mut().poll(cx).is_pending() {
        return Fired::No;
    }
    match deadline {
        Some(deadline) if timer.deadline() >= deadline => Fired::Deadline,
        _ => Fired::Timer,
    }
}

impl<S, B, C, RB> Retry<S, B, C>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    B: Replay,
    C: Classifier,
{
    /// Decides what an attempt's outcome means: return it, or retry.
    fn judge(&mut self, outcome: Result<Response<RB>, BoxError>) -> Verdict<Response<RB>> {
        // A pick made after `call` returned is read now.
        let picked = self
            .current
            .take()
            .or_else(|| self.picked.as_ref().and_then(Picked::take));
        match outcome {
            Ok(response) => {
                if !response_fails(&self.config.classifier, &response) {
                    // A failed response kept in case every attempt failed
                    // lets go of its backend now.
                    self.last_response = None;
                    if !self.failures.is_empty() {
                        bump(&self.config.counters.recovered);
                    }
                    return Verdict::Return(Ok(self.with_history(response, true)));
                }
                let served = response.extensions().get::<ServedBy>().map(|s| s.0.clone());
                let Some(id) = served.or(picked) else {
                    // Nobody to exclude from the next attempt: no retry.
                    // After earlier failures it is the last of them,
                    // returned with the history.
                    if self.failures.is_empty() {
                        return Verdict::Return(Ok(response));
                    }
                    self.last_response = Some(response);
                    return Verdict::Return(self.give_up(None));
                };
                self.record(id, FailedStatus::of(&response).into());
                self.last_response = Some(response);
                if self.may_retry(false) {
                    Verdict::Retry
                } else {
                    // Returns this response, with the history.
                    Verdict::Return(self.give_up(None))
                }
            }
            Err(err) => {
                if is_no_backend(&*err) {
                    // Every backend this request may try has been tried.
                    self.give_back();
                    return Verdict::Return(self.give_up(Some(err)));
                }
                if !self.config.classifier.is_failure(&Outcome::Error(&*err)) {
                    // Returned as it is; after a failed attempt, the
                    // request still ended failed.
                    self.count_exhausted();
                    return Verdict::Return(Err(err));
                }
                // Also through a layer below that wraps the error.
                let (id, not_sent) = match find::<BackendError>(&*err) {
                    // Its flag already looked through its chain.
                    Some(e) => (Some(e.backend().clone()), e.is_not_sent()),
                    None => (picked, never_sent(&*err)),
                };
                let Some(id) = id else {
                    // No backend to exclude from a retry: the attempts end.
                    // On the first one nothing was failed over, and the
                    // error is returned as it is, unless the attempt was
                    // abandoned before any backend was picked.
                    if self.failures.is_empty() && !err.is::<TimedOut>() {
                        return Verdict::Return(Err(err));
                    }
                    self.last_response = None;
                    return Verdict::Return(self.give_up(Some(err)));
                };
                self.record(id, err);
                self.last_response = None;
                if not_sent {
                    // No backend got this attempt's copy of the body: the
                    // one before it keeps the right to send it, until a
                    // retry's copy is read.
                    self.give_back();
                }
                if self.may_retry(not_sent) {
                    Verdict::Retry
                } else {
                    Verdict::Return(self.give_up(None))
                }
            }
        }
    }

    /// Records a failed attempt, and excludes its backend from the next,
    /// but after its first graceful close of a connection ([`GoingAway`])
    /// when the request's session has its affinity there: the backend is
    /// healthy, and the session's next attempt goes back to it, on a new
    /// connection, rather than move. (A request without affinity goes on to
    /// another: the backend may be going away for good.)
    fn record(&mut self, id: BackendId, cause: BoxError) {
        let again = find::<GoingAway>(&*cause).is_some()
            && (self.template.as_ref())
                .and_then(|t| t.parts.extensions.get::<Affinity>())
                .is_some_and(|affinity| affinity.0 == id)
            && !self.failures.iter().any(|(tried, _)| *tried == id);
        if let (Some(template), false) = (&mut self.template, again) {
            let extensions = &mut template.parts.extensions;
            match extensions.get_mut::<Attempts>() {
                Some(attempts) => attempts.push(id.clone()),
                None => {
                    let mut attempts = Attempts::new();
                    attempts.push(id.clone());
                    extensions.insert(attempts);
                }
            }
        }
        self.failures.push((id, cause));
    }

    /// Whether one more attempt is allowed after the failure just recorded
    /// (the budget is checked once the next backend is known).
    fn may_retry(&mut self, not_sent: bool) -> bool {
        let counters = &self.config.counters;
        if self.tried >= self.config.max_attempts {
            return false;
        }
        if !(self.any_failure || not_sent) {
            bump(&counters.unsafe_to_retry);
            return false;
        }
        let replayable = (self.template.as_ref()).is_some_and(|t| t.body.is_replayable());
        if !replayable {
            bump(&counters.unreplayable);
            return false;
        }
        if self.over_budget {
            self.budget_spent = true;
            return false;
        }
        true
    }

    /// Whether the balancer said, at the last pick, that no other backend
    /// could take a retry.
    fn none_left(&self) -> bool {
        self.picked.as_ref().is_some_and(Picked::none_left)
    }

    /// Copies the next retry's body before the pause that precedes it
    /// (see `held`); `false` when it can no longer be sent again.
    fn hold_body(&mut self) -> bool {
        self.held = (self.template.as_ref()).and_then(|t| t.body.replay().map(Box::new));
        self.held.is_some()
    }

    /// Pays for the next retry before the pause that precedes it, as Envoy
    /// does: a retry the budget refuses ends the request at once, not a
    /// pause later. `false` when the budget is spent.
    fn prepay(&mut self) -> bool {
        self.prepaid = self.pay();
        if !self.prepaid {
            self.budget_spent = true;
        }
        self.prepaid
    }

    /// Takes a retry from the budget; `false` when it is spent.
    fn pay(&mut self) -> bool {
        self.unpaid = false;
        match &self.config.budget {
            Some(budget) if !budget.withdraw() => {
                tracing::debug!(
                    target: "tower_ha::failover",
                    tried = self.tried,
                    "retry budget exhausted: not failing over"
                );
                false
            }
            _ => true,
        }
    }

    /// Drives the service to readiness and starts the next attempt, which
    /// ends by `deadline`, if any.
    #[allow(clippy::type_complexity)]
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        deadline: Option<Instant>,
    ) -> Poll<Result<S::Future, Result<Response<RB>, BoxError>>> {
        if let Err(e) = ready!(self.service.poll_ready(cx)) {
            return Poll::Ready(Err(self.give_up(Some(e.into()))));
        }
        let Some(template) = &mut self.template else {
            return Poll::Ready(Err(self.give_up(None)));
        };
        // Each retry takes a slot of its own, in place of any the request
        // came with (a layer above's, or the caller's): the budget and the
        // timers read it. A new one each time: an earlier attempt's
        // request may still reach an inner service late (left in a
        // buffer's queue) and write to its own, which must not be read as
        // this attempt's pick or progress.
        let slot = (self.config).slot(self.tried + 1 < self.config.max_attempts);
        template.parts.extensions.insert(slot.clone());
        self.picked = Some(slot);
        let Some(mut request) = template.copy(self.held.take().map(|held| *held)) else {
            return Poll::Ready(Err(self.give_up(None)));
        };
        if let (Some(deadline), Some(Limit { tell: true, .. })) = (deadline, self.limit) {
            // The backend is told the time left (before any wait in a
            // queue below: a little more than it has then).
            grpc::tell(
                request.headers_mut(),
                deadline.saturating_duration_since(Instant::now()),
            );
        }
        let future = self.service.call(request);
        self.tried += 1;
        self.current = self.picked.as_ref().and_then(Picked::take);
        // A retry is paid for once a backend was picked for it, so an
        // attempt that finds no backend left costs nothing (one after a
        // pause was paid before it). An inner service that does not fill
        // `Picked` is charged at the first poll.
        let prepaid = std::mem::take(&mut self.prepaid);
        if self.current.is_some() {
            if !prepaid && !self.pay() {
                // Dropped before it was polled: no backend saw the request.
                drop(future);
                self.give_back();
                self.budget_spent = true;
                return Poll::Ready(Err(self.give_up(None)));
            }
        } else {
            self.unpaid = !prepaid;
        }
        // Only a retry that reached a backend is a failover; the last
        // call, which finds every backend tried, is not. A balancer that
        // picks later is announced once it has picked.
        self.unannounced = self.current.is_none();
        if let Some(to) = &self.current {
            self.announce(Some(to));
        }
        Poll::Ready(Ok(future))
    }

    /// Announces the retry in flight, called before its backend was known,
    /// once it is: picked after `call` (behind a buffer or a queue), or
    /// named by the outcome of an inner service that does not say when it
    /// picks. A retry that found no backend is no failover.
    fn announce_late(&mut self, polled: &Poll<Result<Response<RB>, BoxError>>) {
        if self.current.is_none() {
            self.current = self.picked.as_ref().and_then(Picked::take);
        }
        let to = match (&self.current, polled) {
            (Some(to), _) => Some(to.clone()),
            (None, Poll::Pending) => return,
            (None, Poll::Ready(Err(e))) if is_no_backend(&**e) => {
                self.unannounced = false;
                return;
            }
            (None, Poll::Ready(Ok(response))) => {
                response.extensions().get::<ServedBy>().map(|s| s.0.clone())
            }
            (None, Poll::Ready(Err(e))) => find::<BackendError>(&**e).map(|e| e.backend().clone()),
        };
        self.unannounced = false;
        self.announce(to.as_ref());
    }

    /// Says that the attempt in flight fails over from the last failed
    /// backend to `to`: a `tracing` event and an [`Event::FailoverAttempt`].
    fn announce(&self, to: Option<&BackendId>) {
        if let Some((from, cause)) = self.failures.last() {
            bump(&self.config.counters.retries);
            tracing::info!(
                target: "tower_ha::failover",
                from = %from,
                to = to.map(BackendId::as_str),
                cause = %Report(&**cause),
                attempt = self.tried,
                "failing over"
            );
            emit(self.config.events.as_ref(), || Event::FailoverAttempt {
                attempt: u32::try_from(self.tried).unwrap_or(u32::MAX),
                failed: from.clone(),
                reason: Report(&**cause).to_string().into(),
            });
        }
    }

    /// Ends the attempts: the last failed response if the last failure was
    /// one, else the list of failures.
    fn give_up(&mut self, reason: Option<BoxError>) -> Result<Response<RB>, BoxError> {
        if self.held.is_some() {
            // Made for a pause whose retry did not come.
            self.give_back();
        }
        if self.budget_spent {
            bump(&self.config.counters.budget_refusals);
        }
        self.count_exhausted();
        if let Some(response) = self.last_response.take() {
            let mut response = self.with_history(response, false);
            response.extensions_mut().insert(GaveUp);
            return Ok(response);
        }
        let failures = std::mem::take(&mut self.failures);
        let reason = if failures.is_empty() {
            reason
        } else {
            reason.filter(|r| !is_no_backend(&**r))
        };
        Err(Exhausted::new(failures, reason)
            .budget_spent(self.budget_spent)
            .into())
    }

    /// Hands the body back to the copy sent before the newest one, where
    /// it is known that no backend got the newest (see
    /// [`Replay::give_back`]): the backend that failed may still be reading
    /// it.
    fn give_back(&mut self) {
        self.held = None;
        if let Some(template) = &self.template {
            template.body.give_back();
        }
    }

    /// Counts a request that ended failed after at least one failed
    /// attempt, and says so in the event stream.
    fn count_exhausted(&self) {
        if !self.failures.is_empty() {
            bump(&self.config.counters.exhausted);
            emit(self.config.events.as_ref(), || Event::AttemptsExhausted {
                tried: self.failures.iter().map(|(id, _)| id.clone()).collect(),
            });
        }
    }

    /// The overall deadline passed during an attempt (`in_flight`) or
    /// between attempts.
    fn deadline_exceeded(&mut self, in_flight: bool) -> Result<Response<RB>, BoxError> {
        bump(&self.config.counters.deadlines_exceeded);
        let (after, client) = self
            .limit
            .map_or((Duration::ZERO, false), |l| (l.after, l.client));
        let exceeded = DeadlineExceeded::new(after, client).into();
        if !in_flight {
            // In a pause, or waiting for the service to be ready: the last
            // attempt's outcome stays the last, and its slot, where a late
            // pick of that attempt may still land, is not read again.
            return self.give_up(Some(exceeded));
        }
        // The attempt under way failed last: a response kept from an
        // earlier one is not returned as if it were the last outcome.
        self.last_response = None;
        // A balancer that picks after `call` (behind a buffer or a queue)
        // names the attempt's backend in the slot.
        let current = self.current.take();
        match current.or_else(|| self.picked.as_ref().and_then(Picked::take)) {
            Some(id) => {
                self.record(id, exceeded);
                self.give_up(None)
            }
            None => self.give_up(Some(exceeded)),
        }
    }

    /// Adds the backends this request tried to a response returned after a
    /// failure.
    fn with_history(&self, mut response: Response<RB>, served: bool) -> Response<RB> {
        if self.failures.is_empty() {
            return response;
        }
        // This request's attempts only: the request's own `Attempts` may
        // also list backends a layer in front ruled out before it came
        // (the sticky layer's backend that failed the session's last one).
        let mut attempts: Attempts = self.failures.iter().map(|(id, _)| id.clone()).collect();
        if served {
            if let Some(ServedBy(id)) = response.extensions().get::<ServedBy>() {
                attempts.push(id.clone());
            }
        }
        response.extensions_mut().insert(attempts);
        response
    }
}

impl<S, B, C> fmt::Debug for ResponseFuture<S, B, C>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("tried", &self.retry.tried)
            .field("failures", &self.retry.failures)
            .finish_non_exhaustive()
    }
}
