//! The admin HTTP surface: a tower `Service` over a [`Handle`].

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::Authority;
use http::{header, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};
use tower_service::Service;

use super::handle::{ControlError, Handle};
use crate::backend::BackendId;
use crate::error::BoxError;

/// The JSON admin API over a [`Handle`], as a tower `Service` to mount
/// wherever the application likes (its own listener, a path of its
/// router, behind its own authentication).
///
/// | route | answer |
/// |---|---|
/// | `GET /groups` | every group's [`GroupStats`](super::GroupStats) |
/// | `GET /groups/{name}` | one group's stats |
/// | `DELETE /groups/{name}` | unregisters the group ([`Handle::remove_group`]); answers its last stats |
/// | `POST /groups/{name}/primary` with `{"backend_id": "..."}` | forces the primary |
/// | `DELETE /groups/{name}/primary` | releases a forced primary: the group's failback rule applies again |
/// | `POST /backends/{id}/drain`, `/disable`, `/enable` with `{}` or no body | the admin action |
/// | `POST /backends/{id}/close_tunnels` with `{}` or no body | closes its tunnels open now ([`Handle::close_tunnels`]) |
/// | `GET /backends/{id}` | the backend's [`BackendStats`](super::BackendStats) |
/// | `POST /backends/{id}/weight` with `{"weight": N}`, N ≥ 1 | sets its weight ([`Handle::set_weight`]); 0 is refused (drain the backend to send it no new requests) |
/// | `POST /backends/{id}/max_in_flight` with `{"max_in_flight": N}`, N ≥ 1, or `{"max_in_flight": null}` | sets or lifts its limit of requests in flight ([`Handle::set_max_in_flight`]); 0 is refused (`null` lifts the limit) |
/// | `GET /events?limit=N` | the last N (default 100) recorded events, oldest first; with `&kind=changes`, changes of backends and groups only (no failovers nor session moves) |
/// | `GET /layers` | the counters of the failover and sticky layers registered with the handle ([`LayerStats`](super::LayerStats)) |
///
/// Every `POST` must say `Content-Type: application/json` (parameters such
/// as `charset` allowed), bodiless actions included. A browser sends a
/// cross-site form or a `no-cors` fetch without asking the server first
/// only with a form or plain-text content type, so this requirement keeps
/// a web page the operator visits from draining or disabling backends
/// through an admin port on `localhost`. And only requests addressed to an
/// IP address or `localhost` are answered unless
/// [`allow_host`](Self::allow_host) names more, so that a page cannot point
/// a name of its own at 127.0.0.1 (DNS rebinding) and call the API as a
/// page of its own origin.
///
/// Every `GET` route answers `HEAD` too: the same status and headers
/// (`Content-Length` included), without the body.
///
/// Errors are JSON `{"error": "..."}`: 404 for an unknown route, group or
/// backend, 403 for a request addressed to a host name not allowed, 405
/// (with `Allow`) for a wrong method, 415 for a `POST`
/// without `Content-Type: application/json`, 400 for a body that is not
/// the expected JSON or names a backend outside the group, 409 for forcing
/// the primary of a group that is not active-passive or onto a backend that
/// cannot serve, 413 for a body over
/// 64 KiB. Path segments are percent-decoded; a `%` not followed by two
/// hex digits is 400.
///
/// The service is always ready; a response is never an `Err`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower::ServiceExt;
/// use tower_ha::balance::{Balance, Priority};
/// use tower_ha::control::{AdminService, Events, Handle};
/// use tower_ha::Pool;
///
/// let pool = Pool::new();
/// pool.insert("db1", ());
/// pool.insert("db2", ());
/// let balance = Balance::new(pool, Priority::new("db", ["db1", "db2"]));
/// let handle = Handle::new(Events::default());
/// handle.add_group("db", &balance).unwrap();
///
/// let admin = AdminService::new(handle.clone());
/// let request = http::Request::post("/groups/db/primary")
///     .header("content-type", "application/json")
///     .body(Full::new(Bytes::from_static(br#"{"backend_id": "db2"}"#)))
///     .unwrap();
/// let response = admin.clone().oneshot(request).await.unwrap();
/// assert_eq!(response.status(), 200);
/// assert_eq!(handle.group_stats("db").unwrap().current_primary.unwrap().as_str(), "db2");
///
/// let request = http::Request::get("/groups/nope").body(Full::<Bytes>::default()).unwrap();
/// let response = admin.oneshot(request)
///     .await
///     .unwrap();
/// assert_eq!(response.status(), 404);
/// let body = response.into_body().collect().await.unwrap().to_bytes();
/// assert_eq!(&body[..], br#"{"error":"unknown group `nope`"}"#);
/// # }
/// ```
#[derive(Clone)]
pub struct AdminService {
    handle: Handle,
    settings: Arc<Settings>,
}

/// What an [`AdminService`] serves, and to whom.
#[derive(Debug, Clone)]
struct Settings {
    prefix: String,
    /// `None`: any `Host`.
    hosts: Option<Vec<String>>,
}

impl fmt::Debug for AdminService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminService")
            .field("handle", &self.handle)
            .field("prefix", &self.settings.prefix)
            .field("hosts", &self.settings.hosts)
            .finish()
    }
}

const BODY_LIMIT: usize = 64 * 1024;

impl AdminService {
    /// The admin API over `handle`, at the root of the paths it receives,
    /// answering requests addressed to an IP address or `localhost` (see
    /// [`allow_host`](Self::allow_host)).
    pub fn new(handle: Handle) -> Self {
        AdminService {
            handle,
            settings: Arc::new(Settings {
                prefix: String::new(),
                hosts: Some(Vec::new()),
            }),
        }
    }

    fn settings(&mut self) -> &mut Settings {
        Arc::make_mut(&mut self.settings)
    }

    /// Serves the routes under `prefix` (for example `/api/v1`, LEBA's
    /// paths; a missing leading `/` is added); other paths are 404.
    pub fn prefix(mut self, prefix: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        self.settings().prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("/{prefix}")
        };
        self
    }

    /// Also answers requests addressed (by `Host`, or the URI's authority)
    /// to the name `host` (a name without a port, which is not compared;
    /// compared without regard to case), for an admin API reached through
    /// a DNS name. Has no effect after
    /// [`allow_any_host`](Self::allow_any_host).
    ///
    /// By default only IP addresses and `localhost` are answered, and any
    /// other name is 403 Forbidden. Otherwise a web page the operator
    /// visits could point its own name at 127.0.0.1 (DNS rebinding) and
    /// then call the admin API as a page of its own origin.
    pub fn allow_host(mut self, host: &str) -> Self {
        if let Some(hosts) = &mut self.settings().hosts {
            hosts.push(host.to_owned());
        }
        self
    }

    /// Answers requests whatever their `Host`: for an admin API behind a
    /// proxy or an authentication layer of its own that checks it.
    pub fn allow_any_host(mut self) -> Self {
        self.settings().hosts = None;
        self
    }

    /// The handle.
    pub fn get_ref(&self) -> &Handle {
        &self.handle
    }
}

impl Settings {
    /// Whether a request with this `Host` (or authority) is answered.
    fn allows(&self, host: &str) -> bool {
        let Some(names) = &self.hosts else {
            return true;
        };
        let ip = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => host.parse::<std::net::Ipv4Addr>().is_ok(),
        };
        ip || host.eq_ignore_ascii_case("localhost")
            || names.iter().any(|name| host.eq_ignore_ascii_case(name))
    }
}

/// The body of an [`AdminService`] response: a JSON document, whole (empty
/// in the answer to `HEAD`). Its `Content-Length` is set.
#[derive(Debug, Default, Clone)]
pub struct AdminBody(Full<Bytes>);

impl Body for AdminBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// The body of `POST /groups/{name}/primary`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPrimary {
    backend_id: String,
}

/// The body of `POST /backends/{id}/weight`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetWeight {
    /// Not 0: it would count as 1, where HAProxy's operators mean "no new
    /// requests" (a drain).
    weight: std::num::NonZeroU32,
}

/// The body of `POST /backends/{id}/max_in_flight`: a limit, or `null` for
/// none. Required, so that a body that forgot it lifts nothing; not 0,
/// which would count as 1 where nginx's and HAProxy's operators mean no
/// limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetMaxInFlight {
    #[serde(deserialize_with = "present")]
    max_in_flight: Option<std::num::NonZeroUsize>,
}

/// An `Option` field that must be given, `null` included.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::deserialize(d)
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

type AdminFuture = Pin<Box<dyn Future<Output = Result<Response<AdminBody>, Infallible>> + Send>>;

impl<B> Service<Request<B>> for AdminService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<AdminBody>;
    type Error = Infallible;
    type Future = AdminFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> AdminFuture {
        let handle = self.handle.clone();
        let settings = self.settings.clone();
        // HEAD is answered as GET, whose routes change nothing; the body is
        // dropped afterwards.
        let head = req.method() == Method::HEAD;
        if head {
            *req.method_mut() = Method::GET;
        }
        Box::pin(async move {
            let mut response = route(&handle, &settings, req).await;
            if head {
                // The answer to GET, headers and all (its `Content-Length`
                // included), without the body.
                *response.body_mut() = AdminBody::default();
            }
            Ok(response)
        })
    }
}

/// The authority a request was addressed to: the URI's (HTTP/2, or an
/// absolute URI), else `Host`; `None` when it has neither (no browser sends
/// such a request), `Err` for a malformed `Host`.
fn addressed_to<B>(req: &Request<B>) -> Result<Option<Authority>, ()> {
    let authority = match req.uri().authority() {
        Some(authority) => authority.clone(),
        None => match req.headers().get(header::HOST) {
            None => return Ok(None),
            Some(value) => Authority::try_from(value.as_bytes()).map_err(drop)?,
        },
    };
    // A host, with a port or not: user information has no place here.
    match authority.as_str().contains('@') {
        true => Err(()),
        false => Ok(Some(authority)),
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<AdminBody> {
    match serde_json::to_vec(value) {
        Ok(body) => json_body(status, body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `body`, a JSON object, as a `T`, or a 400 saying what was `expected`.
/// Only an object: serde reads a struct from an array of its fields'
/// values too, so `[5]` would set a weight of 5.
// The error is the answer itself, as `read_body`'s is.
#[allow(clippy::result_large_err)]
fn parse<T: serde::de::DeserializeOwned>(
    body: &[u8],
    expected: &str,
) -> Result<T, Response<AdminBody>> {
    let refused = |why: &dyn fmt::Display| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("expected {expected}: {why}"),
        )
    };
    // JSON's whitespace, then the value's first byte.
    match body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        Some(b'{') | None => serde_json::from_slice(body).map_err(|e| refused(&e)),
        Some(_) => Err(refused(&"the body is not a JSON object")),
    }
}

fn error(status: StatusCode, message: &str) -> Response<AdminBody> {
    let body = serde_json::to_vec(&ErrorBody { error: message }).unwrap_or_default();
    json_body(status, body)
}

/// A JSON answer whose length is in its headers, so that the answer to a
/// `HEAD`, whose body is dropped, still says it.
fn json_body(status: StatusCode, body: Vec<u8>) -> Response<AdminBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(AdminBody(Full::from(body)))
        .unwrap_or_else(|_| Response::new(AdminBody::default()))
}

fn not_allowed(allow: &'static str) -> Response<AdminBody> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    response
}

fn control_error(e: &ControlError) -> Response<AdminBody> {
    let status = match e {
        ControlError::UnknownGroup(_) | ControlError::UnknownBackend(_) => StatusCode::NOT_FOUND,
        ControlError::NotActivePassive(_) | ControlError::DuplicateGroup(_) => StatusCode::CONFLICT,
        ControlError::DuplicateBackend { .. } | ControlError::Unavailable { .. } => {
            StatusCode::CONFLICT
        }
        ControlError::NoRuntime => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, &e.to_string())
}

/// Decodes `%XX` escapes; `None` for malformed escapes or invalid UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Exactly two hex digits: `from_str_radix` alone would also
            // take a sign (`%+f`).
            let hex = segment.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `None` when `req` declares a JSON body (`application/json`, any
/// parameters); otherwise the 415 answer.
fn require_json<B>(req: &Request<B>) -> Option<Response<AdminBody>> {
    let declared = req.headers().get(header::CONTENT_TYPE);
    let is_json = declared
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    if is_json {
        return None;
    }
    let got = match declared {
        None => "none".to_owned(),
        Some(v) => format!("`{}`", String::from_utf8_lossy(v.as_bytes())),
    };
    Some(error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        &format!("POST requires Content-Type: application/json (got {got})"),
    ))
}

/// Checks the body of an action that takes no parameters: none, or an
/// empty JSON object.
fn no_parameters(body: &[u8]) -> Result<(), String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| e.to_string())?;
    match object.keys().next() {
        None => Ok(()),
        Some(key) => Err(format!("unknown field `{key}`")),
    }
}

/// The whole body, at most 64 KiB.
async fn read_body<B>(body: B) -> Result<Bytes, Response<AdminBody>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, BODY_LIMIT).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) => {
            let e: BoxError = e;
            if e.is::<http_body_util::LengthLimitError>() {
                return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "body over 64 KiB"));
            }
            Err(error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {e}"),
            ))
        }
    }
}

/// The value of the first `name=` parameter of `query`, if any.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

fn limit_param(query: Option<&str>) -> Result<usize, String> {
    match query_param(query, "limit") {
        None => Ok(100),
        Some(value) => value
            .parse()
            .map_err(|_| format!("`limit` must be a number, not `{value}`")),
    }
}

/// Whether `kind=changes` asks for the changes of backends and groups
/// only; `kind=all` (or none) for every event.
fn changes_param(query: Option<&str>) -> Result<bool, String> {
    match query_param(query, "kind") {
        None | Some("all") => Ok(false),
        Some("changes") => Ok(true),
        Some(other) => Err(format!("`kind` must be `all` or `changes`, not `{other}`")),
    }
}

async fn route<B>(handle: &Handle, settings: &Settings, req: Request<B>) -> Response<AdminBody>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    match addressed_to(&req) {
        Err(()) => return error(StatusCode::BAD_REQUEST, "malformed Host header"),
        Ok(Some(authority)) if !settings.allows(authority.host()) => {
            let message = format!(
                "host `{}` is not allowed: address the admin API by IP address or \
                 `localhost`, or allow the name with `AdminService::allow_host`",
                authority.host()
            );
            return error(StatusCode::FORBIDDEN, &message);
        }
        Ok(_) => {}
    }
    // The prefix ends at a segment boundary: `/api/v1` serves
    // `/api/v1/groups`, not `/api/v1groups`.
    let Some(path) = req
        .uri()
        .path()
        .strip_prefix(settings.prefix.as_str())
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    else {
        return error(StatusCode::NOT_FOUND, "no such route");
    };
    let raw: Vec<&str> = path.trim_matches('/').split('/').collect();
    let Some(segments) = raw
        .iter()
        .map(|s| percent_decode(s))
        .collect::<Option<Vec<String>>>()
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed percent-encoding in the path",
        );
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method().clone();
    match segments.as_slice() {
        ["groups"] => match method {
            Method::GET => json(StatusCode::OK, &handle.stats()),
            _ => not_allowed("GET, HEAD"),
        },
        ["layers"] => match method {
            Method::GET => json(StatusCode::OK, &handle.layer_stats()),
            _ => not_allowed("GET, HEAD"),
        },
        ["groups", name] => match method {
            Method::GET => match handle.group_stats(name) {
                Ok(stats) => json(StatusCode::OK, &stats),
                Err(e) => control_error(&e),
            },
            // Bodiless, and not sendable across sites without asking the
            // server first, like releasing a primary.
            // The group's last stats, read before it goes.
            Method::DELETE => match handle
                .group_stats(name)
                .and_then(|stats| handle.remove_group(name).map(|()| stats))
            {
                Ok(stats) => json(StatusCode::OK, &stats),
                Err(e) => control_error(&e),
            },
            _ => not_allowed("GET, HEAD, DELETE"),
        },
        ["groups", name, "primary"] if method == Method::DELETE => {
            // No body, and a method a web page cannot send across sites
            // without asking the server first: no content type to check.
            match handle
                .release_primary(name)
                .and_then(|()| handle.group_stats(name))
            {
                Ok(stats) => json(StatusCode::OK, &stats),
                Err(e) => control_error(&e),
            }
        }
        ["groups", name, "primary"] => {
            if method != Method::POST {
                return not_allowed("POST, DELETE");
            }
            if let Some(refused) = require_json(&req) {
                return refused;
            }
            // The group next: an unknown group is 404 whatever the body.
            if let Err(e) = handle.group_stats(name) {
                return control_error(&e);
            }
            let body = match read_body(req.into_body()).await {
                Ok(body) => body,
                Err(refused) => return refused,
            };
            let set: SetPrimary = match parse(&body, r#"{"backend_id": "..."}"#) {
                Ok(set) => set,
                Err(refused) => return refused,
            };
            let id = BackendId::from(set.backend_id);
            match handle.force_primary(name, &id) {
                Ok(()) => match handle.group_stats(name) {
                    Ok(stats) => json(StatusCode::OK, &stats),
                    Err(e) => control_error(&e),
                },
                Err(e) => control_error(&e),
            }
        }
        ["backends", id] => match method {
            Method::GET => match handle.backend_stats(&BackendId::from(*id)) {
                Ok(stats) => json(StatusCode::OK, &stats),
                Err(e) => control_error(&e),
            },
            _ => not_allowed("GET, HEAD"),
        },
        ["backends", id, action
        @ ("weight" | "max_in_flight" | "drain" | "disable" | "enable" | "close_tunnels")] => {
            if method != Method::POST {
                return not_allowed("POST");
            }
            if let Some(refused) = require_json(&req) {
                return refused;
            }
            let id = BackendId::from(*id);
            // The backend first: an unknown one is 404 whatever the body.
            if let Err(e) = handle.backend_stats(&id) {
                return control_error(&e);
            }
            let body = match read_body(req.into_body()).await {
                Ok(body) => body,
                Err(refused) => return refused,
            };
            let result = match *action {
                "weight" => parse::<SetWeight>(
                    &body,
                    r#"{"weight": N} with N of 1 or more (to send the backend no new requests, drain it)"#,
                )
                .map(|set| handle.set_weight(&id, set.weight.get())),
                "max_in_flight" => parse::<SetMaxInFlight>(
                    &body,
                    r#"{"max_in_flight": N} with N of 1 or more, or {"max_in_flight": null} for no limit"#,
                )
                .map(|set| handle.set_max_in_flight(&id, set.max_in_flight.map(|n| n.get()))),
                action => no_parameters(&body)
                    .map_err(|message| {
                        error(
                            StatusCode::BAD_REQUEST,
                            &format!("expected no body or {{}}: {message}"),
                        )
                    })
                    .map(|()| match action {
                        "drain" => handle.drain(&id),
                        "disable" => handle.disable(&id),
                        "close_tunnels" => handle.close_tunnels(&id),
                        _ => handle.enable(&id),
                    }),
            };
            let result = match result {
                Ok(result) => result,
                Err(refused) => return refused,
            };
            match result.and_then(|()| handle.backend_stats(&id)) {
                Ok(stats) => json(StatusCode::OK, &stats),
                Err(e) => control_error(&e),
            }
        }
        ["events"] => {
            if method != Method::GET {
                return not_allowed("GET, HEAD");
            }
            let query = req.uri().query();
            match (limit_param(query), changes_param(query)) {
                (Ok(limit), Ok(false)) => json(StatusCode::OK, &handle.events().recent(limit)),
                (Ok(limit), Ok(true)) => {
                    json(StatusCode::OK, &handle.events().recent_changes(limit))
                }
                (Err(message), _) | (_, Err(message)) => error(StatusCode::BAD_REQUEST, &message),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such route"),
    }
}
