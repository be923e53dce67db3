//! Errors of the failover layer.
//!
//! [`Failover`](super::Failover) fails with [`Exhausted`] (boxed as
//! [`BoxError`]). The causes it lists are the backends' own errors (usually
//! [`BackendError`](crate::error::BackendError)) or one of the small errors
//! of this module: [`TimedOut`] for an attempt abandoned at the per-try
//! timeout, [`DeadlineExceeded`] for the attempt the overall deadline cut
//! short, and [`FailedStatus`] for a response that counted as a failure.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use http::{Response, StatusCode};

use crate::backend::BackendId;
use crate::classify::Outcome;
use crate::error::BoxError;

/// An attempt did not complete within the per-try timeout: it was dropped
/// and the backend got no more of that request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut {
    after: Duration,
    not_sent: bool,
}

impl TimedOut {
    pub(crate) fn new(after: Duration) -> Self {
        TimedOut {
            after,
            not_sent: false,
        }
    }

    /// Marks the attempt as abandoned before its request was sent.
    pub(crate) fn not_sent(mut self, not_sent: bool) -> Self {
        self.not_sent = not_sent;
        self
    }

    /// The per-try timeout that elapsed.
    pub fn after(&self) -> Duration {
        self.after
    }

    /// Whether the attempt was abandoned while its backend was still being
    /// readied, so the request never reached the backend: `Balance` says
    /// so while it waits for the backend's `poll_ready`, and `HttpBackend`
    /// while it opens a connection for the request (under any balancer).
    /// A balancer of your own cannot say it of its own wait: an attempt
    /// abandoned then counts as sent. Like a
    /// [`NotSent`](crate::NotSent) failure, such an attempt may be retried
    /// whatever the request's method.
    pub fn is_not_sent(&self) -> bool {
        self.not_sent
    }
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "attempt timed out after {:?}", self.after)?;
        if self.not_sent {
            f.write_str(" before the request was sent")?;
        }
        Ok(())
    }
}

impl StdError for TimedOut {}

/// The overall deadline across attempts passed: the attempt in flight was
/// dropped and no further attempt was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineExceeded {
    after: Duration,
    grpc_timeout: bool,
}

impl DeadlineExceeded {
    pub(crate) fn new(after: Duration, grpc_timeout: bool) -> Self {
        DeadlineExceeded {
            after,
            grpc_timeout,
        }
    }

    /// The deadline, counted from the moment the request was called.
    pub fn after(&self) -> Duration {
        self.after
    }

    /// Whether it was the client's, from its `grpc-timeout` header (see
    /// [`FailoverLayer::grpc_timeout`](super::FailoverLayer::grpc_timeout)),
    /// rather than the layer's own.
    pub fn is_grpc_timeout(&self) -> bool {
        self.grpc_timeout
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whose = if self.grpc_timeout {
            " (the client's grpc-timeout)"
        } else {
            ""
        };
        write!(f, "deadline of {:?}{whose} exceeded", self.after)
    }
}

impl StdError for DeadlineExceeded {}

/// A backend answered with a status the classifier counts as a failure
/// (by default 502, 503 or 504, or a gRPC `UNAVAILABLE`); recorded in
/// [`Exhausted`] when a later attempt failed with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedStatus {
    status: StatusCode,
    grpc_status: Option<u32>,
}

impl FailedStatus {
    pub(crate) fn of<B>(response: &Response<B>) -> Self {
        FailedStatus {
            status: response.status(),
            grpc_status: Outcome::response(response).grpc_status(),
        }
    }

    /// The status of the failed response.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The gRPC status the response carried in its head, if any (see
    /// [`Outcome::grpc_status`]).
    pub fn grpc_status(&self) -> Option<u32> {
        self.grpc_status
    }
}

impl fmt::Display for FailedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend answered {}", self.status)?;
        match self.grpc_status {
            Some(code) => write!(f, " with grpc-status {code}"),
            None => Ok(()),
        }
    }
}

impl StdError for FailedStatus {}

/// Every attempt failed, or the attempts had to stop: lists each backend
/// tried, in order, with the reason it failed.
///
/// [`source`](StdError::source) is the last attempt's cause, so
/// [`find`](crate::error::find) reaches the last backend's error (for
/// example [`NotSent`](crate::NotSent), [`TimedOut`] or
/// [`DeadlineExceeded`]), also when a [`reason`](Exhausted::reason) ended
/// the attempts after it (read that one with `reason`).
///
/// When no backend could be tried at all, the list is empty, and
/// [`reason`](Exhausted::reason), then the source, holds why (usually
/// [`NoBackend`](crate::NoBackend)).
///
/// When the attempts stopped because the retry budget refused one more,
/// [`is_budget_spent`](Exhausted::is_budget_spent) says so, and so does the
/// message ("... (retry budget spent)").
#[derive(Debug)]
pub struct Exhausted {
    attempts: Vec<(BackendId, BoxError)>,
    reason: Option<BoxError>,
    budget_spent: bool,
}

impl Exhausted {
    pub(crate) fn new(attempts: Vec<(BackendId, BoxError)>, reason: Option<BoxError>) -> Self {
        Exhausted {
            attempts,
            reason,
            budget_spent: false,
        }
    }

    /// Marks the attempts as stopped by the retry budget, if `spent`.
    pub(crate) fn budget_spent(mut self, spent: bool) -> Self {
        self.budget_spent = spent;
        self
    }

    /// Whether the attempts stopped because the retry budget refused one
    /// more, rather than because every backend the request could try had
    /// failed, the attempt limit was reached, or the request could not be
    /// sent again.
    pub fn is_budget_spent(&self) -> bool {
        self.budget_spent
    }

    /// The backends tried, oldest first, each with why its attempt failed.
    pub fn attempts(&self) -> &[(BackendId, BoxError)] {
        &self.attempts
    }

    /// The backends tried, oldest first.
    pub fn backends(&self) -> impl Iterator<Item = &BackendId> + '_ {
        self.attempts.iter().map(|(id, _)| id)
    }

    /// Why the attempts ended when that is not a failure of a known backend:
    /// [`NoBackend`](crate::NoBackend) before any backend was tried,
    /// [`DeadlineExceeded`] between attempts (during a backoff pause, or
    /// while the inner service was not ready) or while an attempt had no
    /// backend picked yet, [`TimedOut`] for a first attempt
    /// abandoned before any backend was picked (waiting in a balancer's
    /// queue), or an error that named no backend after earlier failures
    /// (including the inner service's `poll_ready` error). Such an error on
    /// the first attempt is returned as it is, not as `Exhausted`: nothing
    /// was failed over.
    pub fn reason(&self) -> Option<&(dyn StdError + Send + Sync + 'static)> {
        self.reason.as_deref()
    }

    /// The attempts and the reason, owned.
    pub fn into_parts(self) -> (Vec<(BackendId, BoxError)>, Option<BoxError>) {
        (self.attempts, self.reason)
    }
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.attempts.len() {
            0 => f.write_str("no backend could be tried")?,
            1 => f.write_str("1 attempt failed")?,
            n => write!(f, "{n} attempts failed")?,
        }
        let last = self.attempts.len().saturating_sub(1);
        for (i, (id, cause)) in self.attempts.iter().enumerate() {
            let sep = if i == 0 { ": " } else { "; " };
            if i == last {
                // The source: a report goes on to its own causes.
                write!(f, "{sep}{id} ({cause})")?;
            } else {
                // Each with its causes (a `BackendError` says only which
                // backend failed), which no source leads to.
                write!(f, "{sep}{id} ({})", crate::error::Report(&**cause))?;
            }
        }
        if let Some(reason) = &self.reason {
            let sep = if self.attempts.is_empty() {
                ": "
            } else {
                "; then "
            };
            write!(f, "{sep}{reason}")?;
        }
        if self.budget_spent {
            f.write_str(" (retry budget spent)")?;
        }
        Ok(())
    }
}

impl StdError for Exhausted {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self.attempts.last() {
            Some((_, cause)) => Some(&**cause),
            None => self
                .reason
                .as_deref()
                .map(|reason| reason as &(dyn StdError + 'static)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{find, BackendError, NoBackend, NotSent};

    #[test]
    fn exhausted_lists_attempts_and_keeps_sources() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = Exhausted::new(
            vec![
                (
                    "a".into(),
                    FailedStatus::of(
                        &Response::builder()
                            .status(StatusCode::BAD_GATEWAY)
                            .body(())
                            .unwrap(),
                    )
                    .into(),
                ),
                (
                    "b".into(),
                    BackendError::new("b".into(), NotSent::new(refused)).into(),
                ),
            ],
            None,
        );
        assert_eq!(
            err.to_string(),
            "2 attempts failed: a (backend answered 502 Bad Gateway); \
             b (backend b failed before the request was sent)"
        );
        let ids: Vec<&str> = err.backends().map(BackendId::as_str).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(find::<NotSent>(&err).is_some());
        assert!(find::<std::io::Error>(&err).is_some());
    }

    #[test]
    fn the_last_backend_error_is_found_also_after_a_reason() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let deadline = DeadlineExceeded::new(Duration::from_secs(1), false);
        let err = Exhausted::new(
            vec![(
                "a".into(),
                BackendError::new("a".into(), NotSent::new(refused)).into(),
            )],
            Some(deadline.into()),
        );
        assert!(find::<NotSent>(&err).is_some());
        assert_eq!(find::<BackendError>(&err).unwrap().backend().as_str(), "a");
        assert!(err.reason().unwrap().is::<DeadlineExceeded>());
    }

    #[test]
    fn exhausted_without_attempts_names_its_reason() {
        let err = Exhausted::new(Vec::new(), Some(NoBackend::new().into()));
        assert_eq!(
            err.to_string(),
            "no backend could be tried: no available backend"
        );
        assert!(find::<NoBackend>(&err).is_some());
        assert!(err.reason().is_some());
    }
}
