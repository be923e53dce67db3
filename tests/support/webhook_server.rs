//! A real webhook session service on 127.0.0.1 speaking Enterprise
//! Gateway's wire format over an in-memory map, with Basic or Digest
//! authentication and switchable failure answers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use digest_auth::{AlgorithmType, AuthorizationHeader};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// Where the service answers.
pub const PREFIX: &str = "/api/sessions";
pub const REALM: &str = "sessions@tower-ha";

#[derive(Clone, Debug)]
pub enum Auth {
    None,
    Basic { user: String, password: String },
    Digest { user: String, password: String },
}

/// How the service answers (after authentication).
#[derive(Clone, Debug)]
pub enum Mode {
    /// The four endpoints.
    Normal,
    /// Every request gets this status and body.
    Fixed(u16, &'static str),
    /// The first `n` requests get this status, then `Normal`.
    FailFirst(usize, u16),
    /// GET requests get 200 with this body; others are normal.
    GetBody(String),
    /// GET requests get 200 with these bytes (not UTF-8, say).
    GetBytes(Vec<u8>),
    /// Never answers.
    Hang,
    /// Reads the whole request, then closes the connection without an
    /// answer or applying it (as a server's socket timeout does while its
    /// handler still works).
    Cut,
}

/// One request as the service saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub content_type: Option<String>,
    pub body: Bytes,
}

pub struct State {
    /// id → exactly the body that was POSTed.
    pub sessions: Mutex<BTreeMap<String, Value>>,
    pub auth: Auth,
    pub mode: Mutex<Mode>,
    /// The Digest nonce currently accepted.
    pub nonce: Mutex<String>,
    /// Every request, authenticated or not.
    pub requests: AtomicUsize,
    /// Requests refused with 401.
    pub refused: AtomicUsize,
    /// Authenticated requests, in order.
    pub seen: Mutex<Vec<Seen>>,
    /// The `Retry-After` header of the `Fixed` and `FailFirst` answers.
    pub retry_after: Mutex<Option<&'static str>>,
    /// How many of the next Digest answers are refused as stale, each with
    /// a new nonce (as a server that checks `nc` refuses requests that come
    /// out of order).
    pub stale_next: AtomicUsize,
}

pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start(auth: Auth) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            sessions: Mutex::new(BTreeMap::new()),
            auth,
            mode: Mutex::new(Mode::Normal),
            nonce: Mutex::new("dcd98b7102dd2f0e8b11d0f600bfb0c093".into()),
            requests: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            retry_after: Mutex::new(None),
            stale_next: AtomicUsize::new(0),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Server { addr, state, task }
    }

    /// The webhook URL to give the store.
    pub fn url(&self) -> String {
        format!("http://{}{PREFIX}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock() = mode;
    }

    /// Sends `Retry-After: {value}` with the `Fixed` and `FailFirst` answers.
    pub fn set_retry_after(&self, value: Option<&'static str>) {
        *self.state.retry_after.lock() = value;
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

fn answer(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = StatusCode::from_u16(status).expect("status");
    response
}

fn json_answer(value: &Value) -> Response<Full<Bytes>> {
    let mut response = answer(200, serde_json::to_vec(value).expect("json"));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn challenge(state: &State, stale: bool) -> Response<Full<Bytes>> {
    let mut response = answer(401, "unauthorized");
    let header = format!(
        "Digest realm=\"{REALM}\", qop=\"auth\", algorithm=MD5, nonce=\"{}\", opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"{}",
        state.nonce.lock(),
        if stale { ", stale=true" } else { "" }
    );
    response.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        header.parse().expect("header"),
    );
    response
}

fn md5(s: &str) -> String {
    digest_auth::Algorithm::new(AlgorithmType::MD5, false).hash_str(s)
}

/// `None` if authenticated, else the 401 to send.
fn check_auth(state: &State, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match &state.auth {
        Auth::None => None,
        Auth::Basic { user, password } => {
            let expected = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            );
            if given == Some(expected.as_str()) {
                None
            } else {
                let mut r = answer(401, "bad credentials");
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Basic realm=\"sessions\""),
                );
                Some(r)
            }
        }
        Auth::Digest { user, password } => {
            let Some(given) = given else {
                return Some(challenge(state, false));
            };
            let Ok(h) = AuthorizationHeader::parse(given) else {
                return Some(challenge(state, false));
            };
            let stale = state.stale_next.load(Ordering::SeqCst);
            if stale > 0 {
                state.stale_next.store(stale - 1, Ordering::SeqCst);
                *state.nonce.lock() = format!("rotated-nonce-{stale}");
                return Some(challenge(state, true));
            }
            let nonce = state.nonce.lock().clone();
            if h.nonce != nonce {
                return Some(challenge(state, true));
            }
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            // RFC 2617 section 3.2.2, computed here independently of the
            // client's code.
            let (Some(cnonce), Some(_)) = (h.cnonce.as_deref(), h.qop) else {
                return Some(challenge(state, false));
            };
            let ha1 = md5(&format!("{user}:{REALM}:{password}"));
            let ha2 = md5(&format!("{}:{path}", req.method()));
            let expected = md5(&format!("{ha1}:{nonce}:{:08x}:{cnonce}:auth:{ha2}", h.nc));
            if h.username == *user && h.realm == REALM && h.uri == path && h.response == expected {
                None
            } else {
                Some(challenge(state, false))
            }
        }
    }
}

fn decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `path` as RFC 3986 normalises it (sections 6.2.2.2 and 5.2.4):
/// percent-encoded unreserved characters decoded (`%2E` is `.`), then dot
/// segments removed.
pub fn normalise(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let unreserved = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok())
            .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
        match unreserved {
            Some(b) => {
                decoded.push(char::from(b));
                i += 3;
            }
            None => {
                decoded.push(char::from(bytes[i]));
                i += 1;
            }
        }
    }
    let parts: Vec<&str> = decoded.split('/').skip(1).collect();
    let mut out: Vec<&str> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match *part {
            "." => {}
            ".." => {
                out.pop();
            }
            part => {
                out.push(part);
                continue;
            }
        }
        if last {
            out.push(""); // `a/.` and `a/..` end in a slash
        }
    }
    format!("/{}", out.join("/"))
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(refusal) = check_auth(&state, &req) {
        state.refused.fetch_add(1, Ordering::SeqCst);
        return Ok(refusal);
    }
    let mode = state.mode.lock().clone();
    let failure = |status, body| {
        let mut response = answer(status, body);
        if let Some(value) = *state.retry_after.lock() {
            response.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static(value),
            );
        }
        response
    };
    match mode {
        Mode::Normal | Mode::GetBody(_) | Mode::GetBytes(_) | Mode::Cut => {}
        Mode::Fixed(status, body) => return Ok(failure(status, body)),
        Mode::FailFirst(n, status) => {
            let mut mode = state.mode.lock();
            *mode = if n > 1 {
                Mode::FailFirst(n - 1, status)
            } else {
                Mode::Normal
            };
            return Ok(failure(status, "failing"));
        }
        Mode::Hang => {
            std::future::pending::<()>().await;
        }
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // Routed as a server or proxy that normalises paths would.
    let route = normalise(&path);
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Ok(body) = req.into_body().collect().await else {
        return Ok(answer(400, "cannot read body"));
    };
    let body = body.to_bytes();
    state.seen.lock().push(Seen {
        method: method.clone(),
        path: path.clone(),
        content_type,
        body: body.clone(),
    });
    match (&method, &mode) {
        // hyper closes the connection on a service's error.
        (_, Mode::Cut) => return Err(std::io::Error::other("cut")),
        (&Method::GET, Mode::GetBody(raw)) => return Ok(answer(200, raw.clone())),
        (&Method::GET, Mode::GetBytes(raw)) => return Ok(answer(200, raw.clone())),
        _ => {}
    }
    let Some(rest) = route.strip_prefix(PREFIX) else {
        return Ok(answer(404, "no such endpoint"));
    };
    let id = match rest.strip_prefix('/') {
        None if rest.is_empty() => None,
        // `{url}/` is `{url}`, as for most servers.
        Some("") => None,
        Some(segment) if !segment.contains('/') => match decode(segment) {
            Some(id) => Some(id),
            None => return Ok(answer(400, "bad id")),
        },
        _ => return Ok(answer(404, "no such endpoint")),
    };
    Ok(match (method, id) {
        (Method::POST, Some(id)) => {
            // The body must be exactly {"<id>": record}.
            match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Object(map)) if map.len() == 1 && map.contains_key(&id) => {
                    state.sessions.lock().insert(id, Value::Object(map));
                    answer(204, Bytes::new())
                }
                _ => answer(400, "body must be {\"<id>\": record}"),
            }
        }
        (Method::GET, Some(id)) => match state.sessions.lock().get(&id) {
            Some(saved) => json_answer(&json!({"kernel_id": id, "kernel_session": saved})),
            None => answer(404, "no such session"),
        },
        (Method::GET, None) => {
            let all: Vec<Value> = state
                .sessions
                .lock()
                .iter()
                .map(|(id, saved)| json!({"kernel_id": id, "kernel_session": saved}))
                .collect();
            json_answer(&Value::Array(all))
        }
        (Method::DELETE, None) => match serde_json::from_slice::<Vec<String>>(&body) {
            Ok(ids) => {
                let mut sessions = state.sessions.lock();
                for id in ids {
                    sessions.remove(&id);
                }
                answer(204, Bytes::new())
            }
            Err(_) => answer(400, "body must be a JSON array of ids"),
        },
        _ => answer(405, "method not allowed"),
    })
}
