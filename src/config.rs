//! Groups from configuration: LEBA's `failover_groups` shape, with serde.
//!
//! ```yaml
//! failover_groups:
//!   - name: "app-servers"
//!     mode: "active-passive"
//!     backends: ["backend1", "backend2", "backend3"]
//!     primary: "backend1"
//!     failback: auto            # optional: never (default) or auto
//!     failback_after: "30s"     # optional: how long the primary must be stable
//!     min_dwell: "10s"          # optional: no failback sooner after a switch
//!     health_check:             # optional
//!       path: "/health"
//!       interval: "5s"
//!       timeout: "2s"
//!       healthy_threshold: 3
//!       unhealthy_threshold: 2
//!       lift_ejections: false   # optional: probes do not end passive ejections
//!       close_tunnels_when_down: true # optional: a backend marked down has its WebSockets closed
//!     failover:                 # optional
//!       max_attempts: 2
//!       per_try_timeout: "500ms"
//!       deadline: "2s"
//!       retry_ratio: 0.1        # retries as a share of requests
//!       min_retries_per_second: 5
//!       grpc_timeout: true      # optional: a client's grpc-timeout may shorten the deadline
//!   - name: "db-servers"
//!     mode: "normal"
//!     backends: ["db1", "db2"]
//! ```
//!
//! Durations are strings such as `"5s"`, `"250ms"`, `"1m30s"` (units `ns`,
//! `us`, `ms`, `s`, `m`, `h`, `d`). Unknown keys are an error at every
//! level, the top one included, so a misspelt key is caught rather than
//! ignored. To keep the groups in a larger application file, deserialize
//! your own settings type with a `Config` field (under a key of its own, or
//! `#[serde(flatten)]`) and call [`Config::validate`]. Every loader
//! validates: no group at all, an empty group, an unknown primary, a
//! primary or failback settings in a normal group, duplicate names and
//! zero thresholds are a [`ConfigError`] naming the field
//! (`failover_groups[1].primary`).
//!
//! With the `config` feature, [`Config::load`] reads a YAML or TOML file in
//! one call, and [`Config::from_yaml`] / [`Config::from_toml`] parse a
//! string.
//!
//! ```
//! use tower_ha::config::Config;
//! use tower_ha::control::GroupMode;
//!
//! let config: Config = serde_json::from_value(serde_json::json!({
//!     "failover_groups": [{
//!         "name": "app", "mode": "active-passive",
//!         "backends": ["a", "b"], "primary": "b",
//!         "health_check": { "interval": "5s", "timeout": "2s" }
//!     }]
//! })).unwrap();
//! config.validate().unwrap();
//! let group = &config.failover_groups[0];
//! assert_eq!(group.mode, GroupMode::ActivePassive);
//! assert_eq!(group.order(), ["b".into(), "a".into()]); // the primary first
//! let health = group.health_check.as_ref().unwrap();
//! assert_eq!(health.interval, std::time::Duration::from_secs(5));
//! assert_eq!(health.healthy_threshold, 2); // HAProxy's rise by default
//! ```
// Without the feature, links to the loaders point at `Config` itself.
#![cfg_attr(
    feature = "config",
    doc = "",
    doc = "[`Config::load`]: Config::load",
    doc = "[`Config::from_yaml`]: Config::from_yaml",
    doc = "[`Config::from_toml`]: Config::from_toml"
)]
#![cfg_attr(
    not(feature = "config"),
    doc = "",
    doc = "[`Config::load`]: Config",
    doc = "[`Config::from_yaml`]: Config",
    doc = "[`Config::from_toml`]: Config"
)]

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::backend::BackendId;
use crate::balance::{Balance, Failback, Priority, RoundRobin};
use crate::control::{GroupMode, GroupStrategy};
use crate::failover::{FailoverLayer, RetryBudget};
use crate::health::{HealthChecker, Probe};
use crate::pool::Pool;

/// The groups of an application.
///
/// Unknown keys are an error, at the top level as in every section, so a
/// misspelt key (`failover-groups:`) cannot load as a configuration
/// without groups; [`validate`](Self::validate) also refuses a
/// configuration with no group.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// The groups, in file order (at least one).
    #[serde(default)]
    pub failover_groups: Vec<GroupConfig>,
}

/// Whether a recovered primary takes over again, in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailbackMode {
    /// A recovered primary stays a backup (the default).
    #[default]
    Never,
    /// It takes over again after `failback_after` of uninterrupted health.
    Auto,
}

/// One group, read from a file or built with [`GroupConfig::new`].
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GroupConfig {
    /// Unique name.
    pub name: String,
    /// `active-passive` or `normal`.
    pub mode: GroupMode,
    /// The members; for an active-passive group, the backup order.
    pub backends: Vec<String>,
    /// The configured primary (required for an active-passive group; one
    /// of `backends`; an error in a normal group).
    #[serde(default)]
    pub primary: Option<String>,
    /// `never` (default) or `auto` (active-passive groups only).
    #[serde(default)]
    pub failback: FailbackMode,
    /// With `failback: auto`: how long the primary must stay available
    /// (default 30 s; active-passive groups only).
    #[serde(
        default,
        deserialize_with = "opt_duration",
        serialize_with = "ser_opt_duration"
    )]
    pub failback_after: Option<Duration>,
    /// How long the current primary serves, at least, before a failback
    /// (default 0; with `failback: auto` in an active-passive group only).
    #[serde(
        default,
        deserialize_with = "opt_duration",
        serialize_with = "ser_opt_duration"
    )]
    pub min_dwell: Option<Duration>,
    /// Active health checking for the group's backends.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Retrying failed requests on the group's other backends.
    #[serde(default)]
    pub failover: Option<FailoverConfig>,
}

/// Failover settings: how many attempts, how long each may take, and how
/// many retries the group's backends may be sent. Absent fields keep the
/// [`FailoverLayer`] defaults.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FailoverConfig {
    /// Attempts per request, the first one included (default: every
    /// available backend once).
    #[serde(default)]
    pub max_attempts: Option<usize>,
    /// An attempt that takes longer is abandoned and the next backend tried
    /// (default: none).
    #[serde(
        default,
        deserialize_with = "opt_duration",
        serialize_with = "ser_opt_duration"
    )]
    pub per_try_timeout: Option<Duration>,
    /// All attempts of a request end by then (default: none).
    #[serde(
        default,
        deserialize_with = "opt_duration",
        serialize_with = "ser_opt_duration"
    )]
    pub deadline: Option<Duration>,
    /// Retries as a share of requests (default 0.2; 0 or more, and above 1
    /// for more retries than requests).
    #[serde(default)]
    pub retry_ratio: Option<f64>,
    /// Retries allowed per second whatever the traffic (default 3).
    #[serde(default)]
    pub min_retries_per_second: Option<u32>,
    /// Also retry non-idempotent requests that reached a backend (default
    /// false).
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Let a gRPC client's `grpc-timeout` shorten the deadline (default
    /// false; see [`FailoverLayer::grpc_timeout`]). Written out only when
    /// `true`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grpc_timeout: bool,
}

impl FailoverConfig {
    /// A failover layer with these settings.
    pub fn layer(&self) -> FailoverLayer {
        let mut layer = FailoverLayer::new()
            .retry_non_idempotent(self.retry_non_idempotent)
            .grpc_timeout(self.grpc_timeout);
        if let Some(n) = self.max_attempts {
            layer = layer.max_attempts(n);
        }
        if let Some(t) = self.per_try_timeout {
            layer = layer.per_try_timeout(t);
        }
        if let Some(d) = self.deadline {
            layer = layer.deadline(d);
        }
        if self.retry_ratio.is_some() || self.min_retries_per_second.is_some() {
            layer = layer.budget(RetryBudget::new(
                self.retry_ratio.unwrap_or(0.2),
                self.min_retries_per_second.unwrap_or(3),
            ));
        }
        layer
    }
}

/// Active health checking, in LEBA's terms.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
// A field left out takes its value from `Default`.
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct HealthCheckConfig {
    /// The path an HTTP probe requests (for your probe to use, with
    /// [`HttpProbe::try_new`](crate::health::HttpProbe::try_new)): starts
    /// with `/`, and may hold a query.
    pub path: Option<String>,
    /// Time between probes (default 2 s).
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub interval: Duration,
    /// A probe that takes longer fails (default 1 s).
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Passing probes in a row to become healthy (default 2).
    pub healthy_threshold: u32,
    /// Failing probes in a row to become unhealthy (default 3).
    pub unhealthy_threshold: u32,
    /// Whether a passing probe ends a passive ejection (default `true`);
    /// see [`HealthChecker::lift_ejections`]. Set it to `false` when the
    /// probe checks less than requests do (a TCP connect): a backend that
    /// accepts connections and then fails requests would otherwise come
    /// back after every ejection. Written out only when `false`, so that
    /// a written configuration stays in LEBA's terms.
    #[serde(skip_serializing_if = "is_true")]
    pub lift_ejections: bool,
    /// Whether a backend the probes mark unhealthy also has its tunnels
    /// (WebSockets) closed (default `false`); see
    /// [`HealthChecker::close_tunnels_when_down`]. Written out only when
    /// `true`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub close_tunnels_when_down: bool,
}

fn is_true(value: &bool) -> bool {
    *value
}

impl Default for HealthCheckConfig {
    /// The settings of an empty `health_check` section: probes every 2 s,
    /// each given 1 s, healthy after 2 passing in a row and unhealthy
    /// after 3 failing, a passing probe ending a passive ejection, tunnels
    /// left open when a backend is marked down, and no path.
    fn default() -> Self {
        // The checker's own defaults.
        let checker = crate::health::CheckConfig::default();
        HealthCheckConfig {
            path: None,
            interval: checker.interval,
            timeout: checker.timeout,
            healthy_threshold: checker.rise,
            unhealthy_threshold: checker.fall,
            lift_ejections: checker.lift_ejections,
            close_tunnels_when_down: checker.close_tunnels_when_down,
        }
    }
}

impl HealthCheckConfig {
    /// Applies these settings to `checker`.
    pub fn apply<S, P>(&self, checker: HealthChecker<S, P>) -> HealthChecker<S, P>
    where
        S: Clone + Send + Sync + 'static,
        P: Probe<S>,
    {
        checker
            .interval(self.interval)
            .timeout(self.timeout)
            .rise(self.healthy_threshold)
            .fall(self.unhealthy_threshold)
            .lift_ejections(self.lift_ejections)
            .close_tunnels_when_down(self.close_tunnels_when_down)
    }
}

impl GroupConfig {
    /// A group of `backends` (for an active-passive group, in backup
    /// order) with every other setting absent, as a file that gives only
    /// `name`, `mode` and `backends` reads. Set the other fields after, an
    /// active-passive group's [`primary`](Self::primary) among them, and
    /// [`validate`](Config::validate) the [`Config`] the group goes in.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ha::config::{Config, FailbackMode, GroupConfig, HealthCheckConfig};
    /// use tower_ha::control::GroupMode;
    ///
    /// let mut group = GroupConfig::new("app", GroupMode::ActivePassive, ["a", "b"]);
    /// group.primary = Some("b".into());
    /// group.failback = FailbackMode::Auto;
    /// let mut health = HealthCheckConfig::default();
    /// health.interval = Duration::from_secs(5);
    /// group.health_check = Some(health);
    /// let mut config = Config::default();
    /// config.failover_groups.push(group);
    /// config.validate().unwrap();
    /// assert_eq!(config.failover_groups[0].order(), ["b".into(), "a".into()]);
    /// ```
    pub fn new<I>(name: impl Into<String>, mode: GroupMode, backends: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        GroupConfig {
            name: name.into(),
            mode,
            backends: backends.into_iter().map(Into::into).collect(),
            primary: None,
            failback: FailbackMode::default(),
            failback_after: None,
            min_dwell: None,
            health_check: None,
            failover: None,
        }
    }

    /// The backends in preference order: the primary first, then the
    /// others as listed.
    pub fn order(&self) -> Vec<BackendId> {
        let primary = self.primary.as_deref();
        primary
            .into_iter()
            .chain(
                self.backends
                    .iter()
                    .map(String::as_str)
                    .filter(|b| Some(*b) != primary),
            )
            .map(BackendId::from)
            .collect()
    }

    /// The group's strategy: [`Priority`] with these settings for an
    /// active-passive group, [`RoundRobin`] for a normal one.
    pub fn strategy(&self) -> GroupStrategy {
        match self.mode {
            GroupMode::ActivePassive => {
                let failback = match self.failback {
                    FailbackMode::Never => Failback::Never,
                    FailbackMode::Auto => {
                        Failback::auto(self.failback_after.unwrap_or(Duration::from_secs(30)))
                    }
                };
                GroupStrategy::Priority(
                    Priority::new(self.name.as_str(), self.order())
                        .failback(failback)
                        .min_dwell(self.min_dwell.unwrap_or_default()),
                )
            }
            _ => GroupStrategy::RoundRobin(RoundRobin::new()),
        }
    }

    /// Builds the group: a pool with one service per backend, made by
    /// `make`, and a [`Balance`] over it with [`strategy`](Self::strategy).
    /// The [`health_check`](Self::health_check) and
    /// [`failover`](Self::failover) sections are not applied here: they
    /// configure the checker ([`HealthCheckConfig::apply`]) and the layer
    /// ([`FailoverConfig::layer`]) around the balancer.
    pub fn build<S, F>(&self, mut make: F) -> Balance<S, GroupStrategy>
    where
        S: Clone + Send + Sync + 'static,
        F: FnMut(&BackendId) -> S,
    {
        self.rebuild(&Pool::new(), |id, _| make(id))
    }

    /// Builds the group again from this (changed) configuration, keeping
    /// what the `running` group's pool knows of each backend that stays:
    /// the new pool shares its state (admin status, a drain's deadline,
    /// health, ejection, weight, limit and requests in flight), where
    /// [`build`](Self::build) would start each backend afresh, enabled and
    /// healthy. `make` makes each backend's service, given the running one
    /// for a backend that stays (return a clone of it to keep its
    /// connections, or a new one for a backend that moved). Register the
    /// result in the running group's place with
    /// [`Handle::replace_group`](crate::control::Handle::replace_group), then
    /// start its checker over the new pool and shut the old one down (both
    /// may judge the shared states meanwhile; a slow-start ramp under way
    /// ends at full weight as the old one stops). An active-passive group's
    /// `Priority` is new: its primary is the first available backend of the
    /// new order (a group on its backup goes back to a primary that is
    /// available again, whatever its failback), and a forced primary is not
    /// kept.
    ///
    /// ```
    /// use tower_ha::config::GroupConfig;
    /// use tower_ha::control::GroupMode;
    /// use tower_ha::{AdminStatus, BackendId};
    ///
    /// let before = GroupConfig::new("app", GroupMode::Normal, ["a", "b", "c"]);
    /// let running = before.build(|_: &BackendId| ());
    /// running.pool().state(&"b".into()).unwrap().set_admin(AdminStatus::Draining);
    ///
    /// // `c` leaves, `d` comes; `b` is still draining.
    /// let after = GroupConfig::new("app", GroupMode::Normal, ["a", "b", "d"]);
    /// let rebuilt = after.rebuild(running.pool(), |_, running: Option<&()>| {
    ///     running.cloned().unwrap_or(())
    /// });
    /// assert_eq!(rebuilt.pool().ids(), ["a".into(), "b".into(), "d".into()]);
    /// let b = rebuilt.pool().state(&"b".into()).unwrap();
    /// assert_eq!(b.admin(), AdminStatus::Draining);
    /// ```
    pub fn rebuild<S, F>(&self, running: &Pool<S>, mut make: F) -> Balance<S, GroupStrategy>
    where
        S: Clone + Send + Sync + 'static,
        F: FnMut(&BackendId, Option<&S>) -> S,
    {
        let snapshot = running.snapshot();
        let pool = Pool::new();
        for id in self.backends.iter().map(BackendId::from) {
            let running = snapshot
                .members()
                .index_of(&id)
                .and_then(|i| Some((snapshot.members().get(i)?.state(), snapshot.service(i)?)));
            let service = make(&id, running.map(|(_, service)| service));
            match running {
                Some((state, _)) => pool.insert_with_state(id, service, state.clone()),
                None => pool.insert(id, service),
            }
        }
        Balance::new(pool, self.strategy())
    }
}

/// Invalid or unreadable configuration.
///
/// Its message says where (the file, when [`Config::load`] read one, and
/// the field, or the line and column) and, for an invalid value or a file
/// that does not parse, what is wrong: `invalid configuration in line 2
/// column 21: failover_groups[0].mode: unknown variant ...`. The parser's
/// message is in it, so a parse error has no
/// [`source`](std::error::Error::source) (printing both would say it
/// twice); a read error's source is the I/O error.
#[cfg_attr(feature = "config", doc = "", doc = "[`Config::load`]: Config::load")]
#[cfg_attr(not(feature = "config"), doc = "", doc = "[`Config::load`]: Config")]
#[derive(Debug)]
pub struct ConfigError {
    file: Option<std::path::PathBuf>,
    field: String,
    kind: ErrorKind,
}

#[derive(Debug)]
#[cfg_attr(not(feature = "config"), allow(dead_code))]
enum ErrorKind {
    Invalid(String),
    /// The parser's message, without the location (in `field`).
    Parse(String),
    Io(std::io::Error),
}

impl ConfigError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            field: field.into(),
            kind: ErrorKind::Invalid(message.into()),
        }
    }

    #[cfg_attr(not(feature = "config"), allow(dead_code))]
    fn parse(field: String, message: String) -> Self {
        ConfigError {
            file: None,
            field,
            kind: ErrorKind::Parse(message),
        }
    }

    /// The file [`Config::load`] read (or could not read).
    #[cfg_attr(feature = "config", doc = "", doc = "[`Config::load`]: Config::load")]
    #[cfg_attr(not(feature = "config"), doc = "", doc = "[`Config::load`]: Config")]
    pub fn file(&self) -> Option<&std::path::Path> {
        self.file.as_deref()
    }

    /// The field at fault (`failover_groups[1].primary`) or, for a parse
    /// error, the line and column (`line 2 column 21`), empty when the
    /// parser did not say; the file for read errors.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Whether the file could not be parsed (syntax, types, unknown keys).
    pub fn is_parse(&self) -> bool {
        matches!(self.kind, ErrorKind::Parse(..))
    }

    /// Whether the file parsed but a value is not acceptable.
    pub fn is_invalid(&self) -> bool {
        matches!(self.kind, ErrorKind::Invalid(_))
    }

    /// Whether the file could not be read.
    pub fn is_io(&self) -> bool {
        matches!(self.kind, ErrorKind::Io(_))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = &self.field;
        match (&self.kind, &self.file) {
            (ErrorKind::Invalid(message), None) => write!(f, "{field}: {message}"),
            (ErrorKind::Invalid(message), Some(file)) => {
                write!(
                    f,
                    "invalid configuration in {}: {field}: {message}",
                    file.display()
                )
            }
            (ErrorKind::Parse(message), file) => {
                let place = match (file, field.is_empty()) {
                    (Some(file), true) => format!(" in {}", file.display()),
                    (Some(file), false) => format!(" in {} {field}", file.display()),
                    (None, true) => String::new(),
                    (None, false) => format!(" in {field}"),
                };
                write!(f, "invalid configuration{place}: {message}")
            }
            (ErrorKind::Io(_), _) => write!(f, "cannot read {field}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Invalid(_) | ErrorKind::Parse(_) => None,
            ErrorKind::Io(e) => Some(e),
        }
    }
}

impl Config {
    /// Checks what serde cannot: at least one group, unique group names,
    /// non-empty groups, unique backends within a group, a primary that is
    /// a member (and present for active-passive groups), no primary or
    /// failback settings in a normal group, non-zero thresholds, and health
    /// check intervals and timeouts of at least 1 ms.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.failover_groups.is_empty() {
            return Err(ConfigError::invalid(
                "failover_groups",
                "no group: list at least one under `failover_groups`",
            ));
        }
        let mut names = HashSet::new();
        for (i, group) in self.failover_groups.iter().enumerate() {
            let at = |field: &str| format!("failover_groups[{i}].{field}");
            if group.name.trim().is_empty() {
                return Err(ConfigError::invalid(at("name"), "must not be empty"));
            }
            if !names.insert(group.name.as_str()) {
                return Err(ConfigError::invalid(
                    at("name"),
                    format!("duplicate group name `{}`", group.name),
                ));
            }
            if group.backends.is_empty() {
                return Err(ConfigError::invalid(
                    at("backends"),
                    format!("group `{}` has no backend", group.name),
                ));
            }
            let mut members = HashSet::new();
            for (j, backend) in group.backends.iter().enumerate() {
                if backend.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        at(&format!("backends[{j}]")),
                        "must not be empty",
                    ));
                }
                if !members.insert(backend.as_str()) {
                    return Err(ConfigError::invalid(
                        at(&format!("backends[{j}]")),
                        format!("duplicate backend `{backend}` in group `{}`", group.name),
                    ));
                }
            }
            // A normal group's strategy ignores these: refuse them rather
            // than let the file promise a primary or a failback that never
            // happens.
            if group.mode != GroupMode::ActivePassive {
                for (field, set) in [
                    ("primary", group.primary.is_some()),
                    ("failback", group.failback != FailbackMode::Never),
                    ("failback_after", group.failback_after.is_some()),
                    ("min_dwell", group.min_dwell.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::invalid(
                            at(field),
                            format!(
                                "group `{}` is in normal mode; `{field}` only applies with `mode: active-passive`",
                                group.name
                            ),
                        ));
                    }
                }
            }
            match (&group.primary, group.mode) {
                (Some(primary), _) if !members.contains(primary.as_str()) => {
                    return Err(ConfigError::invalid(
                        at("primary"),
                        format!(
                            "unknown primary `{primary}`: not one of the backends of group `{}`",
                            group.name
                        ),
                    ));
                }
                (None, GroupMode::ActivePassive) => {
                    return Err(ConfigError::invalid(
                        at("primary"),
                        "required for an active-passive group",
                    ));
                }
                _ => {}
            }
            // Settings that only a failback uses, without one: a mistake
            // that would silently keep the group from ever failing back.
            if group.failback == FailbackMode::Never {
                for (field, set) in [
                    ("failback_after", group.failback_after.is_some()),
                    ("min_dwell", group.min_dwell.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::invalid(
                            at(field),
                            "only applies with `failback: auto`",
                        ));
                    }
                }
            }
            if let Some(f) = &group.failover {
                if f.max_attempts == Some(0) {
                    return Err(ConfigError::invalid(
                        at("failover.max_attempts"),
                        "must be at least 1",
                    ));
                }
                if f.per_try_timeout.is_some_and(|t| t.is_zero()) {
                    return Err(ConfigError::invalid(
                        at("failover.per_try_timeout"),
                        "must be greater than 0",
                    ));
                }
                if f.deadline.is_some_and(|t| t.is_zero()) {
                    return Err(ConfigError::invalid(
                        at("failover.deadline"),
                        "must be greater than 0",
                    ));
                }
                // As `RetryBudget` takes it: above 1, more retries than
                // requests (for a layer that tries several backends).
                if f.retry_ratio.is_some_and(|r| !(r.is_finite() && r >= 0.0)) {
                    return Err(ConfigError::invalid(
                        at("failover.retry_ratio"),
                        "must be a number of 0 or more",
                    ));
                }
            }
            if let Some(hc) = &group.health_check {
                // What `HttpProbe::try_new` takes, and a path of origin
                // form (not `*`, nor a bare query).
                if let Some(path) = &hc.path {
                    if !path.starts_with('/')
                        || crate::health::HttpProbe::<()>::try_new(path).is_err()
                    {
                        return Err(ConfigError::invalid(
                            at("health_check.path"),
                            format!("`{}` is not a path: it must start with `/` and hold no spaces or control characters", path.escape_debug()),
                        ));
                    }
                }
                // The checker's finest step: a shorter value would be
                // raised to it, and the file would say what does not run.
                if hc.interval < crate::time::SHORTEST {
                    return Err(ConfigError::invalid(
                        at("health_check.interval"),
                        "must be at least 1ms",
                    ));
                }
                if hc.timeout < crate::time::SHORTEST {
                    return Err(ConfigError::invalid(
                        at("health_check.timeout"),
                        "must be at least 1ms",
                    ));
                }
                if hc.healthy_threshold == 0 {
                    return Err(ConfigError::invalid(
                        at("health_check.healthy_threshold"),
                        "must be at least 1",
                    ));
                }
                if hc.unhealthy_threshold == 0 {
                    return Err(ConfigError::invalid(
                        at("health_check.unhealthy_threshold"),
                        "must be at least 1",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.failover_groups.iter().find(|g| g.name == name)
    }
}

/// Applies the merge keys of `value`, those of what each merges first
/// (defaults built on other defaults): a mapping's own keys come first,
/// then each mapping it merges, in order, with its own merges applied.
/// (Applied top-down, a merged mapping's own merge key would be copied in
/// unapplied, or lost behind an earlier one.)
#[cfg(feature = "config")]
fn apply_merges(value: &mut serde_yaml_ng::Value) -> Result<(), serde_yaml_ng::Error> {
    use serde_yaml_ng::Value;
    match value {
        Value::Mapping(map) => {
            for value in map.values_mut() {
                apply_merges(value)?;
            }
            // What it merges holds no merge key now: this applies its own.
            value.apply_merge()
        }
        Value::Sequence(values) => values.iter_mut().try_for_each(apply_merges),
        Value::Tagged(tagged) => apply_merges(&mut tagged.value),
        _ => Ok(()),
    }
}

#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
impl Config {
    /// Parses and validates YAML. Anchors, aliases and merge keys (`<<:
    /// *defaults`) are applied, so groups can share settings, also merge
    /// keys within what is merged (defaults built on other defaults).
    ///
    /// In a file with merge keys, a plain name that YAML reads as a number
    /// or a boolean is read in that value's usual form (`0x1A` as `26`,
    /// `1.10` as `1.1`, `TRUE` as `true`): quote such names (`"0x1A"`) to
    /// keep them as written. Without merge keys, names are read as written.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let error = |e: serde_yaml_ng::Error| {
            let (field, message) = match e.location() {
                Some(l) => {
                    let field = format!("line {} column {}", l.line(), l.column());
                    // The parser's message says where too: once is enough.
                    let message = e.to_string().replacen(&format!(" at {field}"), "", 1);
                    (field, message)
                }
                None => (String::new(), e.to_string()),
            };
            ConfigError::parse(field, message)
        };
        let config: Config = match serde_yaml_ng::from_str(text) {
            Ok(config) => config,
            // Merge keys are applied to a document read as a whole first,
            // which costs the errors their line: only where there are some.
            // (A file whose first error is not about a merge key reports it
            // where it is.)
            Err(e) if e.to_string().contains("`<<`") => {
                let mut value: serde_yaml_ng::Value =
                    serde_yaml_ng::from_str(text).map_err(error)?;
                apply_merges(&mut value).map_err(error)?;
                // Written out and read again, so that scalars are read as in
                // the file (`name: 2024` is a name); a line of that text
                // would not be the file's, so errors name none.
                let merged = serde_yaml_ng::to_string(&value).map_err(error)?;
                serde_yaml_ng::from_str(&merged).map_err(|e| {
                    let message = match e.location() {
                        Some(l) => e.to_string().replacen(
                            &format!(" at line {} column {}", l.line(), l.column()),
                            "",
                            1,
                        ),
                        None => e.to_string(),
                    };
                    ConfigError::parse(String::new(), message)
                })?
            }
            Err(e) => return Err(error(e)),
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates TOML (`[[failover_groups]]` tables).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // Where, as the YAML parser says it: line and column from 1.
            let field = e
                .span()
                .map(|span| {
                    let start = (0..=span.start.min(text.len()))
                        .rev()
                        .find(|&i| text.is_char_boundary(i))
                        .unwrap_or(0);
                    position(&text[..start])
                })
                .unwrap_or_default();
            ConfigError::parse(field, e.message().trim_end().to_owned())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a file: TOML when its name ends in
    /// `.toml` (in any case), YAML otherwise. It reads synchronously: call it at
    /// start-up, or inside `spawn_blocking`.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            field: path.display().to_string(),
            kind: ErrorKind::Io(e),
        })?;
        // Read, but not text this parser takes: a parse error, with where.
        let text = String::from_utf8(bytes).map_err(|e| {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let before = std::str::from_utf8(valid).unwrap_or_default();
            let mut error =
                ConfigError::parse(position(before), "the file is not UTF-8".to_owned());
            error.file = Some(path.to_owned());
            error
        })?;
        // By name, not `Path::extension`, which a file named `.toml`
        // has none of.
        let toml = path.file_name().is_some_and(|name| {
            let name = name.as_encoded_bytes();
            name.len() >= 5 && name[name.len() - 5..].eq_ignore_ascii_case(b".toml")
        });
        let parsed = if toml {
            Config::from_toml(&text)
        } else {
            Config::from_yaml(&text)
        };
        parsed.map_err(|mut e| {
            e.file = Some(path.to_owned());
            e
        })
    }
}

/// `line L column C` (from 1, in characters, as the YAML parser says it)
/// of the end of `before`, a text's start.
#[cfg(feature = "config")]
fn position(before: &str) -> String {
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    format!("line {line} column {column}")
}

/// Parses a duration such as `"5s"`, `"250ms"` or `"1m30s"`.
///
/// Units are `ns`, `us` (or `µs`, with the micro sign or the Greek mu),
/// `ms`, `s`, `m`, `h` and `d`. Whole numbers are exact to the nanosecond;
/// a fraction (`"1.5s"`) is rounded to the nearest nanosecond, computed
/// in integers at any size (up to [`Duration::MAX`]) from its first 24
/// digits.
///
/// ```
/// use std::time::Duration;
/// use tower_ha::config::parse_duration;
///
/// assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
/// assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
/// assert_eq!(parse_duration("1500us"), Ok(Duration::from_micros(1500)));
/// assert_eq!(parse_duration("15\u{3bc}s"), Ok(Duration::from_micros(15)));
/// assert_eq!(parse_duration("15\u{b5}s"), Ok(Duration::from_micros(15)));
/// assert!(parse_duration("5").is_err());
/// assert!(parse_duration("5 parsecs").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    parse(text).map_err(DurationError)
}

/// Why [`parse_duration`] refused a text: it says what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DurationError(String);

/// Microseconds, with the micro sign (U+00B5) or the Greek mu (U+03BC),
/// which text often holds in its place.
const MICRO: [&str; 2] = ["\u{b5}s", "\u{3bc}s"];

fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{text}` lacks a unit (ns, us, ms, s, m, h, d)"))?;
        if number_len == 0 {
            return Err(format!("`{text}` is not a duration such as \"5s\""));
        }
        let number = &rest[..number_len];
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        let Some(&(_, unit_nanos)) = UNITS
            .iter()
            .find(|(name, _)| *name == unit || (MICRO.contains(&unit) && *name == "us"))
        else {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (ns, us, ms, s, m, h, d)"
            ));
        };
        rest = &rest[unit_len..];
        let not_a_duration = || format!("`{text}` is not a duration such as \"5s\"");
        let out_of_range = || format!("`{text}` is out of range");
        // Exactly, in integers, whatever the size: what `format_duration`
        // writes reads back as the same duration, and a fraction of a long
        // one does not drift as a float's would.
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if fraction.contains('.') || whole.len() + fraction.len() == 0 {
            return Err(not_a_duration());
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| out_of_range())?
        };
        let nanos = whole
            .checked_mul(u128::from(unit_nanos))
            .and_then(|nanos| nanos.checked_add(fraction_nanos(fraction, unit_nanos)))
            .ok_or_else(out_of_range)?;
        let secs = u64::try_from(nanos / u128::from(NANOS_PER_SEC)).map_err(|_| out_of_range())?;
        // Below one second's nanoseconds: fits.
        let part = Duration::new(secs, (nanos % u128::from(NANOS_PER_SEC)) as u32);
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("`{text}` is out of range"))?;
    }
    Ok(total)
}

/// The nanoseconds in `0.{digits}` of a unit of `unit_nanos`, rounded to
/// the nearest (a half up). Digits past the 24th are not read: they
/// weigh less than a ten-billionth of a nanosecond even in days, and 24
/// digits times a day's nanoseconds still fit in a `u128`.
fn fraction_nanos(digits: &str, unit_nanos: u64) -> u128 {
    let digits = &digits.as_bytes()[..digits.len().min(24)];
    let (value, scale) = digits.iter().fold((0u128, 1u128), |(value, scale), &d| {
        (value * 10 + u128::from(d - b'0'), scale * 10)
    });
    (value * u128::from(unit_nanos) + scale / 2) / scale
}

/// Reads a duration's text. The text is parsed inside the visitor, so that
/// the parser's error is raised where the value is: its path names the key
/// that holds the duration, and its location the value.
struct DurationVisitor;

impl serde::de::Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"5s\", \"250ms\" or \"1m30s\"")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
        parse_duration(text).map_err(E::custom)
    }
}

/// An optional [`DurationVisitor`].
struct OptDurationVisitor;

impl<'de> serde::de::Visitor<'de> for OptDurationVisitor {
    type Value = Option<Duration>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        DurationVisitor.expecting(f)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        duration(d).map(Some)
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_str(DurationVisitor)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    d.deserialize_option(OptDurationVisitor)
}

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// The units [`parse_duration`] reads, largest first, in nanoseconds.
const UNITS: [(&str, u64); 7] = [
    ("d", 86_400 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// `d` in the largest unit that holds it exactly (`"90s"`, `"1500us"`,
/// `"250ns"`), so that [`parse_duration`] reads back the same duration.
fn format_duration(d: &Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    UNITS
        .iter()
        .find(|(_, size)| nanos % u128::from(*size) == 0)
        .map(|(unit, size)| format!("{}{unit}", nanos / u128::from(*size)))
        .unwrap_or_else(|| format!("{nanos}ns"))
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(d))
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&format_duration(d)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(d: Duration) -> Result<Duration, DurationError> {
        parse_duration(&format_duration(&d))
    }

    #[test]
    fn durations_are_written_in_the_largest_exact_unit() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(250), "250ns"),
            (Duration::from_micros(1500), "1500us"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(7_200), "2h"),
            (Duration::from_secs(172_800), "2d"),
            (Duration::new(86_400, 1), "86400000000001ns"),
            (Duration::MAX, "18446744073709551615999999999ns"),
        ] {
            assert_eq!(format_duration(&d), text);
            assert_eq!(parse_duration(text), Ok(d), "{text}");
        }
    }

    #[test]
    fn every_small_duration_reads_back_as_written() {
        for n in 0..20_000u64 {
            for d in [
                Duration::from_nanos(n),
                Duration::from_micros(n),
                Duration::from_millis(n),
                Duration::from_secs(n),
                Duration::from_secs(n * 60),
            ] {
                assert_eq!(round_trip(d), Ok(d), "{}", format_duration(&d));
            }
        }
    }

    #[test]
    fn the_default_health_check_is_an_empty_section() {
        let empty: HealthCheckConfig = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(HealthCheckConfig::default(), empty);
    }

    #[test]
    fn a_new_group_is_one_read_with_only_its_name_mode_and_backends() {
        for (mode, text) in [
            (GroupMode::ActivePassive, "active-passive"),
            (GroupMode::Normal, "normal"),
        ] {
            let read: GroupConfig = serde_json::from_value(serde_json::json!({
                "name": "app", "mode": text, "backends": ["a", "b"]
            }))
            .unwrap();
            assert_eq!(GroupConfig::new("app", mode, ["a", "b"]), read);
        }
    }

    #[test]
    fn whole_numbers_out_of_range_are_errors() {
        assert!(parse_duration("18446744073709551616s").is_err());
        assert!(parse_duration("18446744073709551616000000000ns").is_err());
        assert!(parse_duration("999999999999999999999999999999999999999999d").is_err());
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Ok(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_duration("18446744073709551615.999999999s"),
            Ok(Duration::MAX)
        );
        assert!(parse_duration("18446744073709551615.9999999995s").is_err());
    }

    #[test]
    fn fractions_are_exact_and_round_to_the_nearest_nanosecond() {
        for (text, d) in [
            ("1000.000000001d", Duration::new(86_400_000, 86_400)),
            ("0.5ns", Duration::from_nanos(1)),
            ("0.4999ns", Duration::ZERO),
            ("2.5us", Duration::from_nanos(2_500)),
            (".5s", Duration::from_millis(500)),
            ("5.s", Duration::from_secs(5)),
            ("0.0000000000001h", Duration::ZERO),
            ("0.00000000000015h", Duration::from_nanos(1)),
            ("1.0000000000000000000000001s", Duration::from_secs(1)),
        ] {
            assert_eq!(parse_duration(text), Ok(d), "{text}");
        }
        for text in [".s", "1.2.3s", "..s"] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
    }

    /// Multiples of a unit, then any nanosecond count.
    fn durations() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n)),
            (any::<u64>(), 0..1_000u32).prop_map(|(s, ms)| Duration::new(s, ms * 1_000_000)),
            (any::<u64>(), 0..1_000_000u32).prop_map(|(s, us)| Duration::new(s, us * 1_000)),
            (0..u64::MAX / 86_400).prop_map(|d| Duration::from_secs(d * 86_400)),
            (0..u64::MAX / 3_600).prop_map(|h| Duration::from_secs(h * 3_600)),
            (0..u64::MAX / 60).prop_map(|m| Duration::from_secs(m * 60)),
            any::<u64>().prop_map(Duration::from_secs),
        ]
    }

    proptest! {
        #[test]
        fn any_duration_reads_back_as_written(d in durations()) {
            prop_assert_eq!(round_trip(d), Ok(d));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Parts in any units, any number of each, add up exactly, or are
        /// out of range past the longest duration.
        #[test]
        fn parts_add_up_exactly(
            parts in proptest::collection::vec((0..UNITS.len(), any::<u64>(), "( |\t|)"), 1..8),
        ) {
            let mut text = String::new();
            let mut total = 0u128;
            for (unit, count, space) in &parts {
                let (name, nanos) = UNITS[*unit];
                text.push_str(&format!("{count}{space}{name}{space}"));
                total += u128::from(*count) * u128::from(nanos);
            }
            let expected = u64::try_from(total / u128::from(NANOS_PER_SEC))
                .ok()
                .map(|secs| Duration::new(secs, (total % u128::from(NANOS_PER_SEC)) as u32));
            prop_assert_eq!(parse_duration(&text).ok(), expected, "{}", text);
        }

        /// A fraction that names a whole number of nanoseconds (`1.5ms`,
        /// `0.25h`) reads as exactly that many, at any size.
        #[test]
        fn fractions_of_whole_nanoseconds_are_exact(
            unit in 0..UNITS.len() - 1,
            digits in 1u32..=11,
            m in any::<u64>(),
        ) {
            let (name, nanos) = UNITS[unit];
            // The most digits, up to `digits`, that keep each step of the
            // last one a whole number of nanoseconds.
            let digits = (1..=digits).rev().find(|&k| nanos % 10u64.pow(k) == 0).unwrap();
            let scale = 10u64.pow(digits);
            let step = nanos / scale;
            let m = m % (u64::MAX / step);
            let text = format!("{}.{:0width$}{name}", m / scale, m % scale, width = digits as usize);
            let expected = Duration::from_nanos(m * step);
            prop_assert_eq!(parse_duration(&text), Ok(expected), "{}", text);
        }

    }
}
