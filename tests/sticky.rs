//! The sticky layer over `Balance` with in-process backends: session keys,
//! moves, strict mode, bad input, memory bounds and availability modes.

#[macro_use]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderValue, Request, Response, StatusCode};
use parking_lot::Mutex;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_ha::balance::{Balance, BalanceLayer, RoundRobin};
use tower_ha::error::{find, GoingAway, InvalidRequest};
use tower_ha::extensions::{Attempts, ServedBy};
use tower_ha::sticky::{
    Availability, CookieInsert, MoveReason, RestorePanicked, RestoreTimedOut, SessionKey,
    SessionMoved, SessionUnavailable, Sticky, StickyLayer, DEFAULT_LOAD_WAIT,
    DEFAULT_RESPONSE_WAIT, DEFAULT_RESTORE_TIMEOUT,
};
use tower_ha::store::{
    Loaded, MemoryStore, Session, SessionGuard, SessionLock, SessionStore, StoreFuture,
};
use tower_ha::{AdminStatus, BackendError, BackendId, BoxError, HealthStatus, Pool};

use support::down::Down;
use support::gate::Gated;
use support::wait::{bounded, bounded_real, spin_until};

const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";
const NAMES: [&str; 3] = ["a", "b", "c"];

/// One in-process backend: answers its name; fails while `fail` is set;
/// refuses a request marked `x-invalid` as `InvalidRequest`, and fails one
/// marked `x-going-away` as a connection the backend closed gracefully
/// (`GoingAway`), or the first marked `x-going-away-once`; sets an
/// application cookie or session header, or clears them, when asked, and any
/// `Set-Cookie` lines `x-set-cookie` lists; answers after
/// `x-delay-ms` milliseconds of `tokio::time` when asked.
fn backend(
    name: &'static str,
    fail: Arc<AtomicBool>,
) -> impl Service<Request<()>, Response = Response<String>, Error = BoxError, Future: Send>
       + Clone
       + Send
       + Sync
       + 'static {
    let counter = Arc::new(AtomicUsize::new(0));
    let went_away = Arc::new(AtomicBool::new(false));
    tower::service_fn(move |req: Request<()>| {
        let fail = fail.load(Ordering::SeqCst);
        let going_away = req.headers().contains_key("x-going-away")
            || (req.headers().contains_key("x-going-away-once")
                && !went_away.swap(true, Ordering::SeqCst));
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let delay = req
            .headers()
            .get("x-delay-ms")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .map(Duration::from_millis);
        async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if req.headers().contains_key("x-invalid") {
                return Err(InvalidRequest::new("a path that leaves the base path").into());
            }
            if going_away {
                return Err(GoingAway::new("GOAWAY (NO_ERROR)").into());
            }
            if fail {
                return Err::<_, BoxError>(
                    std::io::Error::from(std::io::ErrorKind::ConnectionReset).into(),
                );
            }
            let mut res = Response::new(name.to_owned());
            if let Some(status) = req.headers().get("x-status") {
                *res.status_mut() = status.to_str().unwrap().parse().unwrap();
            }
            if req.headers().contains_key("x-login") {
                let v = format!("JSESSIONID={name}-{n}; Path=/; HttpOnly");
                res.headers_mut()
                    .append(SET_COOKIE, HeaderValue::try_from(v).unwrap());
            }
            if req.headers().contains_key("x-confirm") {
                // Sets again the session cookie the client sent.
                let sent = req.headers()[COOKIE].clone();
                res.headers_mut().append(SET_COOKIE, sent);
            }
            if req.headers().contains_key("x-logout") {
                res.headers_mut().append(
                    SET_COOKIE,
                    HeaderValue::from_static("JSESSIONID=; Max-Age=0; Path=/"),
                );
            }
            if req.headers().contains_key("x-clear-legacy") {
                // Clears a cookie of the same name on a path of its own.
                res.headers_mut().append(
                    SET_COOKIE,
                    HeaderValue::from_static("JSESSIONID=; Max-Age=0; Path=/legacy"),
                );
            }
            // Sets the lines `x-set-cookie` lists (`|` between them).
            if let Some(lines) = req.headers().get("x-set-cookie") {
                for line in lines.to_str().unwrap().split('|') {
                    res.headers_mut()
                        .append(SET_COOKIE, HeaderValue::try_from(line).unwrap());
                }
            }
            if let Some(login) = req.headers().get("x-login-as") {
                let v = format!("JSESSIONID={}; Path=/", login.to_str().unwrap());
                res.headers_mut()
                    .append(SET_COOKIE, HeaderValue::try_from(v).unwrap());
            }
            // `1` for an id of the backend's own, or the id to assign.
            if let Some(assign) = req.headers().get("x-assign") {
                let v = match assign.to_str().unwrap() {
                    "1" => format!("{name}-assigned-{n}"),
                    id => id.to_owned(),
                };
                res.headers_mut()
                    .insert("x-session-id", HeaderValue::try_from(v).unwrap());
            }
            Ok(res)
        }
    })
}

struct Cluster<S> {
    pool: Pool<S>,
    fail: HashMap<&'static str, Arc<AtomicBool>>,
    /// Set: the backend does not become ready.
    stall: HashMap<&'static str, Arc<AtomicBool>>,
}

fn cluster() -> Cluster<
    impl Service<Request<()>, Response = Response<String>, Error = BoxError, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static,
> {
    let pool = Pool::new();
    let mut fail = HashMap::new();
    let mut stall = HashMap::new();
    for name in NAMES {
        let flag = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let inner = backend(name, flag.clone());
        pool.insert(name, Gated::new(inner, stalled.clone()));
        fail.insert(name, flag);
        stall.insert(name, stalled);
    }
    Cluster { pool, fail, stall }
}

impl<S> Cluster<S> {
    fn set_health(&self, name: &str, health: HealthStatus) {
        self.pool.state(&name.into()).unwrap().set_health(health);
    }

    /// The requests picked for every backend but `name`.
    fn requests_elsewhere(&self, name: &str) -> u64 {
        NAMES
            .iter()
            .filter(|&&other| other != name)
            .map(|&other| self.pool.state(&other.into()).unwrap().requests())
            .sum()
    }
}

fn insert_cookie() -> CookieInsert {
    CookieInsert::new("srv", SECRET).secure(false)
}

fn cookie_of(res: &Response<String>) -> Option<String> {
    res.headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("srv="))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

fn with_cookie(cookie: &str) -> Request<()> {
    Request::builder().header(COOKIE, cookie).body(()).unwrap()
}

fn served(res: &Response<String>) -> &str {
    res.extensions().get::<ServedBy>().unwrap().0.as_str()
}

/// The backend of the record `store` holds for `key` (which it must hold).
async fn stored_backend(store: &impl SessionStore, key: &str) -> String {
    let record = store.load(key).await.unwrap();
    record.expect("a record").backend.to_string()
}

/// A request naming session `id` in `X-Session-Id`.
fn session<V>(id: V) -> Request<()>
where
    HeaderValue: TryFrom<V>,
    <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
{
    Request::builder()
        .header("x-session-id", id)
        .body(())
        .unwrap()
}

/// `req`, marked for its backend to close its connection gracefully
/// (`GoingAway`) the first time (see `x-going-away-once` above).
fn closing_once(mut req: Request<()>) -> Request<()> {
    req.headers_mut()
        .insert("x-going-away-once", HeaderValue::from_static("1"));
    req
}

async fn send<S>(svc: &S, req: Request<()>) -> Result<Response<String>, BoxError>
where
    S: Service<Request<()>, Response = Response<String>, Error = BoxError> + Clone,
{
    svc.clone().oneshot(req).await
}

/// A request with `cookie` (a `name=value` pair) whose response deletes
/// the learned session cookie (a logout).
fn logout_of(cookie: &str) -> Request<()> {
    let mut req = with_cookie(cookie);
    req.headers_mut()
        .insert("x-logout", HeaderValue::from_static("1"));
    req
}

/// Logs in through `svc`: the `JSESSIONID=...` pair the backend set, and
/// the backend's name.
async fn log_in<S>(svc: &S) -> (String, String)
where
    S: Service<Request<()>, Response = Response<String>, Error = BoxError> + Clone,
{
    let login = Request::builder().header("x-login", "1").body(()).unwrap();
    let login = send(svc, login).await.unwrap();
    let set = login.headers()[SET_COOKIE].to_str().unwrap();
    let value = set.split(';').next().unwrap().to_owned();
    (value, login.into_body())
}

/// `req`, answered `ms` milliseconds of `tokio::time` later.
fn delayed(mut req: Request<()>, ms: u64) -> Request<()> {
    req.headers_mut()
        .insert("x-delay-ms", HeaderValue::from(ms));
    req
}

/// Records every `on_move` call.
#[derive(Clone, Default)]
struct Moves(Arc<Mutex<Vec<SessionMoved>>>);

impl Moves {
    fn hook(
        &self,
    ) -> impl Fn(SessionMoved) -> std::future::Ready<Result<(), BoxError>> + Send + Sync + 'static
    {
        let moves = self.0.clone();
        move |m| {
            moves.lock().push(m);
            std::future::ready(Ok(()))
        }
    }

    fn all(&self) -> Vec<SessionMoved> {
        self.0.lock().clone()
    }
}

/// In insert mode the layer alone sets its cookie: a backend's
/// `Set-Cookie` lines of that name, which would delete it or set a value
/// of the backend's own, are removed (its other cookies pass), on a
/// session's first response and on a hit alike.
#[tokio::test]
async fn cookie_insert_removes_a_backends_lines_of_its_cookie() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()));
    let svc = stack(&c.pool, layer.clone());
    let lines = "srv=; Max-Age=0; Path=/|app=1; Path=/| srv =forged|srvx=2";
    let first = Request::builder()
        .header("x-set-cookie", lines)
        .body(())
        .unwrap();
    let first = send(&svc, first).await.unwrap();
    let cookie = cookie_of(&first).unwrap();
    let set_cookies = |res: &Response<String>| -> Vec<String> {
        let lines = res.headers().get_all(SET_COOKIE).iter();
        lines.map(|v| v.to_str().unwrap().to_owned()).collect()
    };
    let set = set_cookies(&first);
    assert_eq!(set.len(), 3, "{set:?}");
    assert_eq!(set[..2], ["app=1; Path=/", "srvx=2"]);
    assert!(
        set[2].starts_with(&format!("{cookie};")),
        "the layer's own: {set:?}"
    );

    let hit = Request::builder()
        .header(COOKIE, &cookie)
        .header("x-set-cookie", lines)
        .body(())
        .unwrap();
    let hit = send(&svc, hit).await.unwrap();
    assert_eq!(hit.body(), first.body());
    assert_eq!(set_cookies(&hit), ["app=1; Path=/", "srvx=2"]);
}

#[tokio::test]
async fn cookie_insert_pins_every_client_to_its_first_backend() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()));
    let svc = stack(&c.pool, layer.clone());
    let mut per_backend = HashMap::new();
    for _ in 0..30 {
        let first = send(&svc, Request::new(())).await.unwrap();
        let cookie = cookie_of(&first).expect("a new session sets the cookie");
        let set = first.headers()[SET_COOKIE].to_str().unwrap();
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Lax") && set.contains("Path=/"));
        *per_backend.entry(first.body().clone()).or_insert(0) += 1;
        for _ in 0..5 {
            let res = send(&svc, with_cookie(&cookie)).await.unwrap();
            assert_eq!(res.body(), first.body());
            assert_eq!(served(&res), res.body());
            assert!(
                cookie_of(&res).is_none(),
                "a hit does not reissue the cookie"
            );
        }
    }
    // Round robin spread the new sessions; stickiness kept them.
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    assert_eq!(layer.stats().created, 30);
    assert_eq!(layer.stats().sessions, 30);
}

/// A response that carries the layer's cookie is kept from shared caches,
/// which would hand one client's session to every other.
#[tokio::test]
async fn a_response_that_sets_the_cookie_is_not_for_shared_caches() {
    use http::header::CACHE_CONTROL;
    let sticky_over = |cookie: CookieInsert| {
        let pool = Pool::new();
        pool.insert(
            "a",
            tower::service_fn(|req: Request<()>| async move {
                let mut res = Response::new(String::new());
                if let Some(said) = req.headers().get("x-cache-control") {
                    res.headers_mut().insert(CACHE_CONTROL, said.clone());
                }
                Ok::<_, BoxError>(res)
            }),
        );
        let layer = StickyLayer::new(&pool, SessionKey::insert_cookie(cookie));
        ServiceBuilder::new()
            .layer(layer)
            .service(Balance::new(pool, RoundRobin::new()))
    };
    let cache_control = |res: &Response<String>| -> Vec<String> {
        let values = res.headers().get_all(CACHE_CONTROL).iter();
        values.map(|v| v.to_str().unwrap().to_owned()).collect()
    };
    let asking = |said: &'static str| {
        Request::builder()
            .header("x-cache-control", said)
            .body(())
            .unwrap()
    };
    let svc = sticky_over(insert_cookie());
    let first = svc
        .clone()
        .oneshot(asking("public, max-age=3600"))
        .await
        .unwrap();
    let cookie = cookie_of(&first).expect("a new session");
    assert_eq!(cache_control(&first), ["public, max-age=3600", "private"]);
    let mut again = asking("public, max-age=3600");
    again.headers_mut().insert(COOKIE, cookie.parse().unwrap());
    let again = svc.clone().oneshot(again).await.unwrap();
    assert_eq!(
        cache_control(&again),
        ["public, max-age=3600"],
        "no cookie sent"
    );
    let res = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(cache_control(&res), ["private"]);
    for said in [
        "no-store",
        "Private=\"set-cookie\", max-age=60",
        "private=\"x-user, Set-Cookie\"",
        "max-age=0,private",
    ] {
        let res = svc.clone().oneshot(asking(said)).await.unwrap();
        assert!(cookie_of(&res).is_some());
        assert_eq!(cache_control(&res), [said], "said already");
    }
    // `private` with fields that leave `Set-Cookie` out lets a shared
    // cache keep the cookie.
    for said in [
        "public, private=\"x-user\"",
        "max-age=60, x-private",
        "no-cache=\"x\\\", private, y\"",
    ] {
        let res = svc.clone().oneshot(asking(said)).await.unwrap();
        assert_eq!(cache_control(&res), [said, "private"]);
    }
    let svc = sticky_over(insert_cookie().mark_private(false));
    let res = svc.oneshot(asking("public")).await.unwrap();
    assert!(cookie_of(&res).is_some());
    assert_eq!(cache_control(&res), ["public"]);
}

/// A backend id the cookie cannot carry (empty, or over 768 bytes) gets
/// no cookie, rather than one that no later request could be read by.
#[tokio::test]
async fn no_cookie_names_a_backend_it_cannot_carry() {
    let sticky_over = |id: String| {
        let pool = Pool::new();
        pool.insert(
            id,
            tower::service_fn(|_: Request<()>| async {
                Ok::<_, BoxError>(Response::new(String::from("served")))
            }),
        );
        let store = MemoryStore::new();
        let key = SessionKey::insert_cookie(insert_cookie());
        let layer = StickyLayer::new(&pool, key).store(store.clone());
        (stack(&pool, layer.clone()), layer, store)
    };
    for id in [String::new(), "x".repeat(769)] {
        let (svc, layer, store) = sticky_over(id.clone());
        for _ in 0..3 {
            let res = send(&svc, Request::new(())).await.unwrap();
            assert_eq!(res.body(), "served");
            let len = id.len();
            assert!(
                cookie_of(&res).is_none(),
                "a cookie for an id of {len} bytes"
            );
        }
        // Nor a session that no client could come back to.
        assert_eq!(layer.stats().sessions, 0);
        assert!(store.load_all().await.unwrap().sessions.is_empty());
    }
    // The longest id it carries gets one.
    let (svc, layer, _) = sticky_over("x".repeat(768));
    assert!(cookie_of(&send(&svc, Request::new(())).await.unwrap()).is_some());
    assert_eq!(layer.stats().sessions, 1);
}

#[tokio::test(start_paused = true)]
async fn sessions_move_off_an_unavailable_backend_once_and_do_not_move_back() {
    let c = cluster();
    let moves = Moves::default();
    let store = MemoryStore::new();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()))
        .store(store.clone())
        .on_move(moves.hook());
    let svc = stack(&c.pool, layer.clone());
    let first = send(&svc, Request::new(())).await.unwrap();
    assert_eq!(first.body(), "a");
    let cookie = cookie_of(&first).unwrap();

    c.set_health("a", HealthStatus::Unhealthy);
    // Concurrent requests of one session, all routed before the first
    // answer (the backends answer 10 ms later): it moves once.
    let delayed = || {
        let mut req = with_cookie(&cookie);
        req.headers_mut()
            .insert("x-delay-ms", HeaderValue::from_static("10"));
        req
    };
    let results = join_all((0..20).map(|_| send(&svc, delayed()))).await;
    let all = moves.all();
    assert_eq!(all.len(), 1, "one move, one hook call");
    assert_eq!(all[0].from.as_str(), "a");
    assert_eq!(all[0].reason, MoveReason::Unavailable);
    let to = all[0].session.backend.clone();
    let mut served_by = Vec::new();
    let mut cookies = Vec::new();
    for res in &results {
        let res = res.as_ref().unwrap();
        served_by.push(res.body().clone());
        cookies.push(cookie_of(res).expect("every answer moves the client"));
    }
    // Routed before the move was known, the requests went to both other
    // backends; every answer sends its client to where the session went.
    served_by.sort();
    served_by.dedup();
    assert_eq!(served_by, ["b", "c"]);
    cookies.sort();
    cookies.dedup();
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    let new_cookie = cookies.pop().unwrap();
    // It names that backend: a request with it is not sent a new one.
    let res = send(&svc, with_cookie(&new_cookie)).await.unwrap();
    assert_eq!(res.body(), to.as_str());
    assert_eq!(cookie_of(&res), None);
    assert_eq!(layer.stats().moved, 1);
    // The store holds the move.
    let sid = all[0].session.key.clone();
    assert_eq!(store.load(&sid).await.unwrap().unwrap().backend, to);

    // The old backend recovers: the session stays where it went, with the
    // new cookie and with the stale one alike.
    c.set_health("a", HealthStatus::Healthy);
    for cookie in [&new_cookie, &cookie] {
        for _ in 0..5 {
            let res = send(&svc, with_cookie(cookie)).await.unwrap();
            assert_eq!(res.body(), to.as_str());
        }
    }
    assert_eq!(moves.all().len(), 1);
}

#[tokio::test]
async fn a_failed_backend_moves_its_session_on_the_next_request() {
    let c = cluster();
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).on_move(moves.hook());
    let svc = stack(&c.pool, layer.clone());
    let req = || session("s1");
    let home = send(&svc, req()).await.unwrap().body().clone();

    c.fail[home.as_str()].store(true, Ordering::SeqCst);
    let err = send(&svc, req()).await.unwrap_err();
    let failed = find::<BackendError>(&*err).expect("the backend's error");
    assert_eq!(failed.backend().as_str(), home);
    assert!(moves.all().is_empty(), "no move without a response");

    let res = send(&svc, req()).await.unwrap();
    let new_home = res.body().clone();
    assert_ne!(new_home, home);
    let all = moves.all();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].reason, MoveReason::Failed);

    c.fail[home.as_str()].store(false, Ordering::SeqCst);
    for _ in 0..6 {
        assert_eq!(send(&svc, req()).await.unwrap().body(), &new_home);
    }
    assert_eq!(moves.all().len(), 1);
}

/// `layer` over a failover layer without a retry budget, whose per-try
/// timeout is `per_try` (zero for none), over round robin on `pool`.
fn over_failover<S>(
    pool: &Pool<S>,
    layer: StickyLayer,
    per_try: Duration,
) -> impl Service<Request<()>, Response = Response<String>, Error = BoxError, Future: Send> + Clone
where
    S: Service<Request<()>, Response = Response<String>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    use tower_ha::failover::FailoverLayer;

    ServiceBuilder::new()
        .layer(layer)
        .layer(FailoverLayer::new().per_try_timeout(per_try).no_budget())
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(pool.clone())
}

/// Over a failover layer, a request of a session whose backend closed its
/// connection gracefully is tried on that backend again (a new
/// connection), not elsewhere: the session stays.
#[tokio::test]
async fn over_failover_a_connection_closed_gracefully_is_tried_again_on_its_backend() {
    let c = cluster();
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).on_move(moves.hook());
    let svc = over_failover(&c.pool, layer.clone(), Duration::ZERO);
    let home = send(&svc, session("s1")).await.unwrap().into_body();
    let closing = closing_once(session("s1"));
    assert_eq!(send(&svc, closing).await.unwrap().body(), &home);
    assert_eq!(c.requests_elsewhere(&home), 0, "no other backend reached");
    assert!(moves.all().is_empty(), "{:?}", moves.all());
}

/// Session `s1`'s next request, a POST sent once, goes to another backend
/// than `home`: the session's one move, for its backend's failure.
async fn a_post_moves_off<S>(svc: &S, home: &str, moves: &Moves)
where
    S: Service<Request<()>, Response = Response<String>, Error = BoxError> + Clone,
{
    let post = Request::post("/")
        .header("x-session-id", "s1")
        .body(())
        .unwrap();
    let res = send(svc, post).await.expect("sent to a working backend");
    assert_ne!(res.body(), home);
    let all = moves.all();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].reason, MoveReason::Failed);
}

/// Under the failover layer, a request whose every attempt failed
/// (`Exhausted`, its session's backend first) keeps the session off that
/// backend as a failure of the backend alone does: the next request, a
/// POST sent once, goes elsewhere.
#[tokio::test]
async fn a_session_whose_retries_failed_too_is_kept_off_its_backend() {
    use tower_ha::failover::Exhausted;

    let c = cluster();
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).on_move(moves.hook());
    let svc = over_failover(&c.pool, layer, Duration::ZERO);
    let home = send(&svc, session("s1")).await.unwrap().into_body();

    for name in NAMES {
        c.fail[name].store(true, Ordering::SeqCst);
    }
    let err = send(&svc, session("s1")).await.unwrap_err();
    let exhausted = err
        .downcast_ref::<Exhausted>()
        .expect("every attempt failed");
    assert_eq!(exhausted.attempts()[0].0.as_str(), home);
    assert_eq!(exhausted.attempts().len(), 3);
    for name in NAMES.iter().filter(|&&n| n != home) {
        c.fail[name].store(false, Ordering::SeqCst);
    }
    a_post_moves_off(&svc, &home, &moves).await;
}

/// The same when the session's backend first closed its connection
/// gracefully and then failed the request tried on it again: its latest
/// attempt, the failure, is what keeps the session off it.
#[tokio::test]
async fn a_session_whose_backend_failed_after_a_graceful_close_is_kept_off_it() {
    use tower_ha::failover::Exhausted;

    let c = cluster();
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).on_move(moves.hook());
    let svc = over_failover(&c.pool, layer, Duration::ZERO);
    let home = send(&svc, session("s1")).await.unwrap().into_body();

    for name in NAMES {
        c.fail[name].store(true, Ordering::SeqCst);
    }
    let closing = closing_once(session("s1"));
    let err = send(&svc, closing).await.unwrap_err();
    let exhausted = err
        .downcast_ref::<Exhausted>()
        .expect("every attempt failed");
    let tried: Vec<&str> = exhausted
        .attempts()
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(tried[..2], [home.as_str(), home.as_str()], "{tried:?}");
    for name in NAMES.iter().filter(|&&n| n != home) {
        c.fail[name].store(false, Ordering::SeqCst);
    }
    a_post_moves_off(&svc, &home, &moves).await;
}

/// Under the failover layer, a request every backend answered 503 ends
/// with the last backend's 503: the session does not move there (it
/// failed the request too), and is kept off its own backend, which failed
/// first, as when the attempts end in errors.
#[tokio::test]
async fn a_session_whose_every_attempt_answered_a_failure_does_not_move() {
    let c = cluster();
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).on_move(moves.hook());
    let svc = over_failover(&c.pool, layer.clone(), Duration::ZERO);
    let home = send(&svc, session("s1")).await.unwrap().into_body();

    for _ in 0..3 {
        let mut req = session("s1");
        req.headers_mut()
            .insert("x-status", HeaderValue::from_static("503"));
        let res = send(&svc, req).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_ne!(served(&res), home, "the last backend tried answered");
        assert!(moves.all().is_empty(), "{:?}", moves.all());
        assert_eq!(layer.session("s1").unwrap().backend.as_str(), home);
    }
    a_post_moves_off(&svc, &home, &moves).await;
}

/// A session's own backend that answered a 503, the retries after it
/// ending in errors (`Exhausted`), failed the request: the next request is
/// kept off it, as when the retries end in a failed response.
#[tokio::test]
async fn a_503_from_its_own_backend_then_errors_keeps_the_session_off_it() {
    use tower_ha::failover::{Exhausted, FailedStatus};

    let c = cluster();
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).on_move(moves.hook());
    let svc = over_failover(&c.pool, layer, Duration::ZERO);
    let home = send(&svc, session("s1")).await.unwrap().into_body();

    for name in NAMES.iter().filter(|&&n| n != home) {
        c.fail[name].store(true, Ordering::SeqCst);
    }
    let mut req = session("s1");
    req.headers_mut()
        .insert("x-status", HeaderValue::from_static("503"));
    let err = send(&svc, req).await.unwrap_err();
    let exhausted = err
        .downcast_ref::<Exhausted>()
        .expect("every attempt failed");
    let (first, failure) = &exhausted.attempts()[0];
    assert_eq!(first.as_str(), home);
    assert!(
        failure.downcast_ref::<FailedStatus>().is_some(),
        "{failure}"
    );
    for name in NAMES {
        c.fail[name].store(false, Ordering::SeqCst);
    }
    a_post_moves_off(&svc, &home, &moves).await;
}

/// A session's own backend that answered the failure the failover layer
/// gave up with (a POST's 503, not retried) failed it: the next request is
/// kept off that backend, as after an error.
#[tokio::test]
async fn a_failure_its_own_backend_answered_last_keeps_the_session_off_it() {
    let c = cluster();
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).on_move(moves.hook());
    let svc = over_failover(&c.pool, layer, Duration::ZERO);
    let home = send(&svc, session("s1")).await.unwrap().into_body();
    let mut post = Request::post("/")
        .header("x-session-id", "s1")
        .body(())
        .unwrap();
    post.headers_mut()
        .insert("x-status", HeaderValue::from_static("503"));
    let res = send(&svc, post).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(served(&res), home, "not retried");
    a_post_moves_off(&svc, &home, &moves).await;
}

/// Without a runtime, ending a session whose record cannot be deleted (no
/// runtime to write with) is an error, not a panic.
#[test]
fn a_remove_without_a_runtime_is_an_error() {
    let c = cluster();
    let layer =
        StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).store(MemoryStore::new());
    let err = futures::executor::block_on(layer.remove("s1")).unwrap_err();
    assert!(format!("{err:?}").contains("runtime"), "{err:?}");
}

/// Backends that are balancers themselves (a group per data centre): a
/// strict session's requirement is the outer balancer's, not passed on to
/// the group, which has no member of that name and would refuse them all.
#[tokio::test]
async fn strict_sessions_reach_a_nested_balancers_backends() {
    let leaf = |name: &'static str| {
        tower::service_fn(move |_: Request<()>| async move {
            Ok::<_, BoxError>(Response::new(name.to_owned()))
        })
    };
    let group = |names: [&'static str; 2]| {
        let pool = Pool::new();
        for name in names {
            pool.insert(name, leaf(name));
        }
        Balance::new(pool, RoundRobin::new())
    };
    let outer = Pool::new();
    outer.insert("dc1", group(["a1", "b1"]));
    outer.insert("dc2", group(["a2", "b2"]));
    let layer = StickyLayer::new(&outer, SessionKey::header("x-session-id")).strict(true);
    let svc = stack(&outer, layer);
    let first = send(&svc, session("s1")).await.unwrap();
    let dc = served(&first).to_owned();
    for _ in 0..4 {
        let res = send(&svc, session("s1"))
            .await
            .expect("served in its group");
        assert_eq!(served(&res), dc);
        assert!(res.body().ends_with(&dc[2..]), "{} in {dc}", res.body());
    }
}

/// An attempt on the session's backend abandoned at the failover layer's
/// per-try timeout, the retries after it failed too, keeps the session off
/// that backend as a backend error does.
#[tokio::test(start_paused = true)]
async fn a_session_whose_backend_timed_out_is_kept_off_it() {
    use tower_ha::failover::{Exhausted, TimedOut};

    let c = cluster();
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).on_move(moves.hook());
    let svc = over_failover(&c.pool, layer, Duration::from_secs(1));
    let home = send(&svc, session("s1")).await.unwrap().into_body();

    let err = send(&svc, delayed(session("s1"), 5_000)).await.unwrap_err();
    let exhausted = err
        .downcast_ref::<Exhausted>()
        .expect("every attempt timed out");
    assert_eq!(exhausted.attempts()[0].0.as_str(), home);
    assert_eq!(exhausted.attempts().len(), 3);
    for (_, failure) in exhausted.attempts() {
        let timed_out = failure.downcast_ref::<TimedOut>().expect("timed out");
        assert!(!timed_out.is_not_sent(), "the backends had the request");
    }
    a_post_moves_off(&svc, &home, &moves).await;
}

/// In strict mode, a session's backend that does not become ready within
/// the failover layer's per-try timeout could not take the request, as
/// with a refused connection: the request is refused with
/// `SessionUnavailable` and sent nowhere else.
#[tokio::test(start_paused = true)]
async fn strict_mode_refuses_a_session_whose_backend_did_not_become_ready() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).strict(true);
    let svc = over_failover(&c.pool, layer.clone(), Duration::from_secs(1));
    let home = send(&svc, session("s1")).await.unwrap().into_body();

    c.stall[home.as_str()].store(true, Ordering::SeqCst);
    let others = c.requests_elsewhere(&home);
    let err = send(&svc, session("s1")).await.unwrap_err();
    let unavailable = err
        .downcast_ref::<SessionUnavailable>()
        .unwrap_or_else(|| panic!("typed error, got {err}"));
    assert_eq!(unavailable.backend().unwrap().as_str(), home);
    assert_eq!(layer.stats().strict_refusals, 1);
    assert_eq!(
        c.requests_elsewhere(&home),
        others,
        "no other backend reached"
    );

    c.stall[home.as_str()].store(false, Ordering::SeqCst);
    assert_eq!(send(&svc, session("s1")).await.unwrap().body(), &home);
}

/// A stand-in for the failover layer, speaking only the extension
/// protocol: on a backend error, record it in `Attempts` and try again.
#[derive(Clone)]
struct RetryElsewhere<S>(S);

impl<S> Service<Request<()>> for RetryElsewhere<S>
where
    S: Service<Request<()>, Response = Response<String>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<String>;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Response<String>, BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move {
            let (parts, ()) = req.into_parts();
            let mut attempts = parts
                .extensions
                .get::<Attempts>()
                .cloned()
                .unwrap_or_default();
            loop {
                let mut next = Request::from_parts(parts.clone(), ());
                next.extensions_mut().insert(attempts.clone());
                match inner.clone().oneshot(next).await {
                    Err(e) if attempts.len() < 3 => match find::<BackendError>(&*e) {
                        Some(b) => attempts.push(b.backend().clone()),
                        None => return Err(e),
                    },
                    other => return other,
                }
            }
        })
    }
}

/// A failure that says nothing about the backend does not move its
/// session: a request the backend refuses to send because it is bad
/// (`InvalidRequest`), and one whose connection the backend closed
/// gracefully before it answered (an HTTP/2 `GOAWAY` without an error,
/// `GoingAway`).
#[tokio::test]
async fn a_failure_not_of_the_backend_does_not_move_its_session() {
    type Is = fn(&(dyn std::error::Error + 'static)) -> bool;
    let cases: [(&str, Is); 2] = [
        ("x-invalid", |e| find::<InvalidRequest>(e).is_some()),
        ("x-going-away", |e| find::<GoingAway>(e).is_some()),
    ];
    for (header, is) in cases {
        let c = cluster();
        let moves = Moves::default();
        let key = SessionKey::header("x-session-id");
        let layer = StickyLayer::new(&c.pool, key).on_move(moves.hook());
        let svc = stack(&c.pool, layer.clone());
        let home = send(&svc, session("s1")).await.unwrap().into_body();
        let failing = Request::builder()
            .header("x-session-id", "s1")
            .header(header, "1")
            .body(())
            .unwrap();
        let err = send(&svc, failing).await.unwrap_err();
        let failed = find::<BackendError>(&*err).expect("the backend's error");
        assert_eq!(failed.backend().as_str(), home, "{header}");
        assert!(is(&*err), "{header}: {err}");
        for _ in 0..3 {
            assert_eq!(send(&svc, session("s1")).await.unwrap().body(), &home);
        }
        assert!(moves.all().is_empty(), "{header}: {:?}", moves.all());
        assert_eq!(layer.stats().moved, 0, "{header}");
    }
}

#[tokio::test]
async fn with_failover_below_the_session_moves_to_the_backend_that_served() {
    let c = cluster();
    let moves = Moves::default();
    let layer =
        StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie())).on_move(moves.hook());
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .layer_fn(RetryElsewhere)
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(c.pool.clone());
    let first = send(&svc, Request::new(())).await.unwrap();
    let cookie = cookie_of(&first).unwrap();
    let home = first.body().clone();

    c.fail[home.as_str()].store(true, Ordering::SeqCst);
    // The failing backend is retried elsewhere within the same request.
    let res = send(&svc, with_cookie(&cookie)).await.unwrap();
    assert_ne!(res.body(), &home);
    assert!(
        cookie_of(&res).is_some(),
        "the moved session's cookie is reissued"
    );
    let all = moves.all();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].reason, MoveReason::ServedElsewhere);
    assert_eq!(all[0].session.backend.as_str(), res.body());
    c.fail[home.as_str()].store(false, Ordering::SeqCst);
    assert_eq!(
        send(&svc, with_cookie(&cookie)).await.unwrap().body(),
        res.body()
    );
}

#[tokio::test]
async fn strict_mode_answers_session_unavailable_instead_of_moving() {
    let c = cluster();
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()))
        .strict(true)
        .on_move(moves.hook());
    let svc = stack(&c.pool, layer.clone());
    let first = send(&svc, Request::new(())).await.unwrap();
    let cookie = cookie_of(&first).unwrap();
    let home = first.body().clone();

    c.set_health(&home, HealthStatus::Unhealthy);
    let err = send(&svc, with_cookie(&cookie)).await.unwrap_err();
    let unavailable = err
        .downcast_ref::<SessionUnavailable>()
        .expect("typed error");
    assert_eq!(unavailable.backend().unwrap().as_str(), home);
    assert_eq!(layer.stats().strict_refusals, 1);

    // Failed, under a failover layer: refused, never moved, and not sent
    // to another backend.
    let svc2 = ServiceBuilder::new()
        .layer(layer.clone())
        .layer_fn(RetryElsewhere)
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(c.pool.clone());
    c.set_health(&home, HealthStatus::Healthy);
    c.fail[home.as_str()].store(true, Ordering::SeqCst);
    let others = c.requests_elsewhere(&home);
    let err = send(&svc2, with_cookie(&cookie)).await.unwrap_err();
    assert!(err.downcast_ref::<SessionUnavailable>().is_some(), "{err}");
    assert_eq!(
        c.requests_elsewhere(&home),
        others,
        "no other backend reached"
    );
    assert_eq!(layer.stats().strict_refusals, 2);
    c.fail[home.as_str()].store(false, Ordering::SeqCst);

    assert_eq!(
        send(&svc, with_cookie(&cookie)).await.unwrap().body(),
        &home
    );
    assert!(moves.all().is_empty());
    assert_eq!(layer.stats().moved, 0);
}

/// In strict mode the check of a session's backend and the balancer's pick
/// are one step: a backend that turns unavailable between the two does not
/// send the request to another backend.
#[tokio::test]
async fn strict_mode_sends_nothing_elsewhere_when_the_backend_fails_before_the_pick() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).strict(true);
    let home = send(&stack(&c.pool, layer.clone()), session("k1"))
        .await
        .unwrap()
        .into_body();
    let pool = c.pool.clone();
    let turned = home.clone();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        // The sticky layer has checked the backend; it turns unhealthy.
        .map_request(move |req: Request<()>| {
            let state = pool.state(&turned.as_str().into()).unwrap();
            state.set_health(HealthStatus::Unhealthy);
            req
        })
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(c.pool.clone());
    let others = c.requests_elsewhere(&home);
    let err = send(&svc, session("k1")).await.unwrap_err();
    let unavailable = err
        .downcast_ref::<SessionUnavailable>()
        .expect("typed error");
    assert_eq!(unavailable.backend().unwrap().as_str(), home);
    assert_eq!(
        c.requests_elsewhere(&home),
        others,
        "no other backend reached"
    );
    assert_eq!(layer.stats().strict_refusals, 1);
    assert_eq!(layer.stats().moved, 0);
}

/// A client sending a new made-up session cookie on every request fills
/// the table with values no application set: they push out one another,
/// never a session the application confirmed (without a store, an evicted
/// session could not come back).
#[tokio::test]
async fn made_up_learned_values_do_not_evict_confirmed_sessions() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::learn_cookie("JSESSIONID")).max_sessions(64);
    let svc = stack(&c.pool, layer.clone());
    let mut confirmed = Vec::new();
    for _ in 0..16 {
        confirmed.push(log_in(&svc).await);
    }
    for i in 0..1000 {
        send(&svc, with_cookie(&format!("JSESSIONID=junk-{i}")))
            .await
            .unwrap();
    }
    let stats = layer.stats();
    assert!(stats.evicted > 900, "the table was full: {stats:?}");
    for (value, home) in &confirmed {
        let key = value.strip_prefix("JSESSIONID=").unwrap();
        assert!(layer.session(key).is_some(), "{key} was evicted");
        assert_eq!(send(&svc, with_cookie(value)).await.unwrap().body(), home);
    }
    // New logins push out the made-up values first, then the confirmed
    // sessions least recently seen first: the eight seen again last go
    // after the eight that were not.
    for (value, _) in &confirmed[..8] {
        send(&svc, with_cookie(value)).await.unwrap();
    }
    let present = |key: &str| layer.session(key).is_some();
    let keys: Vec<&str> = confirmed
        .iter()
        .map(|(v, _)| v.strip_prefix("JSESSIONID=").unwrap())
        .collect();
    let mut logins = 0;
    while keys.iter().any(|k| present(k)) {
        assert!(logins < 200, "{:?}", layer.stats());
        send(
            &svc,
            Request::builder().header("x-login", "1").body(()).unwrap(),
        )
        .await
        .unwrap();
        logins += 1;
        if keys.iter().any(|k| !present(k)) {
            let junk = (0..1000).filter(|i| present(&format!("junk-{i}"))).count();
            assert_eq!(junk, 0, "a confirmed session went before made-up ones");
        }
        if keys[..8].iter().any(|k| !present(k)) {
            assert!(
                keys[8..].iter().all(|k| !present(k)),
                "a session seen later went before one seen earlier"
            );
        }
    }
}

#[tokio::test]
async fn learned_cookie_follows_set_cookie_and_ends_with_it() {
    let c = cluster();
    let store = MemoryStore::new();
    let layer =
        StickyLayer::new(&c.pool, SessionKey::learn_cookie("JSESSIONID")).store(store.clone());
    let svc = stack(&c.pool, layer.clone());
    // Without the cookie: round robin.
    let bodies: std::collections::BTreeSet<String> =
        join_all((0..3).map(|_| send(&svc, Request::new(()))))
            .await
            .into_iter()
            .map(|r| r.unwrap().into_body())
            .collect();
    assert_eq!(bodies, NAMES.map(String::from).into(), "{bodies:?}");
    let (value, home) = log_in(&svc).await;
    assert_eq!(store.len(), 1);
    for _ in 0..6 {
        assert_eq!(send(&svc, with_cookie(&value)).await.unwrap().body(), &home);
    }
    assert_eq!(send(&svc, logout_of(&value)).await.unwrap().body(), &home);
    assert_eq!(
        layer.stats().sessions,
        0,
        "a deleted cookie ends the session"
    );
    assert!(store.is_empty());
}

/// An application clearing a cookie of the same name on another path (a
/// legacy one) does not end the session the request presented, which a
/// browser keeps: only a request under that path may present the cleared
/// cookie.
#[tokio::test]
async fn clearing_a_learned_cookie_on_another_path_keeps_the_session() {
    let c = cluster();
    let store = MemoryStore::new();
    let layer =
        StickyLayer::new(&c.pool, SessionKey::learn_cookie("JSESSIONID")).store(store.clone());
    let svc = stack(&c.pool, layer.clone());
    let (value, home) = log_in(&svc).await;
    let key = value.strip_prefix("JSESSIONID=").unwrap();
    let clearing = |path: &str| {
        Request::builder()
            .uri(path)
            .header(COOKIE, &value)
            .header("x-clear-legacy", "1")
            .body(())
            .unwrap()
    };
    for path in ["/app", "/legacyx", "/"] {
        assert_eq!(send(&svc, clearing(path)).await.unwrap().body(), &home);
        assert!(layer.session(key).is_some(), "{path}: the session ended");
        assert_eq!(store.len(), 1, "{path}: the record was deleted");
    }
    for _ in 0..6 {
        assert_eq!(send(&svc, with_cookie(&value)).await.unwrap().body(), &home);
    }
    // Under that path, the cleared cookie may be the one presented.
    assert_eq!(
        send(&svc, clearing("/legacy/page")).await.unwrap().body(),
        &home
    );
    assert!(layer.session(key).is_none());
    assert!(store.is_empty());
}

/// A learned cookie's value is the application's credential: the event
/// stream (and the logs) name its session by a digest, while the `on_move`
/// hook gets the key itself. A header key is shown as it is.
#[tokio::test]
async fn events_name_a_learned_session_by_a_digest_of_its_cookie() {
    use tower_ha::control::{Event, Events};
    let moved_sessions = |events: &Events| -> Vec<String> {
        let history = events.history();
        let moved = history.iter().filter_map(|r| match &r.event {
            Event::SessionMoved { session, .. } => Some(session.to_string()),
            _ => None,
        });
        moved.collect()
    };
    let c = cluster();
    let (events, moves) = (Events::default(), Moves::default());
    let layer = StickyLayer::new(&c.pool, SessionKey::learn_cookie("JSESSIONID"))
        .events(events.clone())
        .on_move(moves.hook());
    let svc = stack(&c.pool, layer);
    let (cookie, home) = log_in(&svc).await;
    let value = cookie.strip_prefix("JSESSIONID=").unwrap().to_owned();
    c.set_health(&home, HealthStatus::Unhealthy);
    send(&svc, with_cookie(&cookie)).await.unwrap();
    let shown = moved_sessions(&events);
    assert_eq!(shown.len(), 1);
    assert!(shown[0].starts_with("cookie:"), "{shown:?}");
    assert_eq!(shown[0].len(), "cookie:".len() + 12, "{shown:?}");
    assert!(!shown[0].contains(&value), "{shown:?}");
    assert_eq!(moves.all()[0].session.key, value, "the hook gets the key");

    let c = cluster();
    let events = Events::default();
    let layer =
        StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).events(events.clone());
    let svc = stack(&c.pool, layer);
    let home = send(&svc, session("kernel-7")).await.unwrap().into_body();
    c.set_health(&home, HealthStatus::Unhealthy);
    send(&svc, session("kernel-7")).await.unwrap();
    assert_eq!(moved_sessions(&events), ["kernel-7"]);
}

#[tokio::test(start_paused = true)]
async fn a_logout_ends_the_record_of_a_session_evicted_meanwhile() {
    let c = cluster();
    let store = MemoryStore::new();
    let layer = StickyLayer::new(&c.pool, SessionKey::learn_cookie("JSESSIONID"))
        .store(store.clone())
        .max_sessions(1);
    let svc = stack(&c.pool, layer.clone());
    let login = || Request::builder().header("x-login", "1").body(()).unwrap();
    let first = send(&svc, login()).await.unwrap();
    let value = first.headers()[SET_COOKIE].to_str().unwrap();
    let value = value.split(';').next().unwrap().to_owned();
    let key = value.strip_prefix("JSESSIONID=").unwrap().to_owned();
    assert!(store.load(&key).await.unwrap().is_some());
    // A slow logout; while it is at its backend another login fills the
    // table and evicts the session.
    let logout = delayed(logout_of(&value), 1000);
    let logout = tokio::spawn(send_owned(svc.clone(), logout));
    tokio::time::sleep(Duration::from_millis(10)).await;
    send(&svc, login()).await.unwrap();
    assert!(layer.session(&key).is_none(), "evicted");
    assert_eq!(layer.stats().evicted, 1);
    // The logout's answer still ends the record the layer had read.
    assert_eq!(logout.await.unwrap().unwrap().body(), first.body());
    assert!(store.load(&key).await.unwrap().is_none());
    assert_eq!(store.len(), 1, "the other session's record stays");
}

#[tokio::test]
async fn a_learned_cookie_nobody_set_is_not_stored() {
    let c = cluster();
    let store = MemoryStore::new();
    let (_, svc) = instance(&c, SessionKey::learn_cookie("JSESSIONID"), store.clone());
    for i in 0..20 {
        let made_up = format!("JSESSIONID=forged-{i}");
        let home = send(&svc, with_cookie(&made_up)).await.unwrap().into_body();
        // Kept in memory, so the client stays where it went...
        assert_eq!(
            send(&svc, with_cookie(&made_up)).await.unwrap().body(),
            &home
        );
    }
    // ...but no made-up value reaches the store.
    assert!(store.is_empty(), "{} records", store.len());

    // Until the application sets it, on any later response.
    let value = "JSESSIONID=forged-3";
    let home = send(&svc, with_cookie(value)).await.unwrap().into_body();
    let confirm = Request::builder()
        .header(COOKIE, value)
        .header("x-confirm", "1")
        .body(())
        .unwrap();
    assert_eq!(send(&svc, confirm).await.unwrap().body(), &home);
    let stored = store
        .load("forged-3")
        .await
        .unwrap()
        .expect("saved once confirmed");
    assert_eq!(stored.backend.as_str(), home);
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn header_keys_come_from_requests_or_responses_and_closures_work() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"));
    let svc = stack(&c.pool, layer.clone());
    let assigned = send(
        &svc,
        Request::builder().header("x-assign", "1").body(()).unwrap(),
    )
    .await
    .unwrap();
    let id = assigned.headers()["x-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    for _ in 0..4 {
        let req = session(&id);
        assert_eq!(send(&svc, req).await.unwrap().body(), assigned.body());
    }

    let kernel = SessionKey::from_fn(|req| {
        let id = req
            .uri
            .path()
            .strip_prefix("/api/kernels/")?
            .split('/')
            .next()?;
        (!id.is_empty()).then(|| id.to_owned())
    });
    let layer = StickyLayer::new(&c.pool, kernel);
    let svc = stack(&c.pool, layer.clone());
    let path = |k: &str, rest: &str| {
        Request::get(format!("/api/kernels/{k}/{rest}"))
            .body(())
            .unwrap()
    };
    let k1 = send(&svc, path("k1", "channels"))
        .await
        .unwrap()
        .into_body();
    let k2 = send(&svc, path("k2", "channels"))
        .await
        .unwrap()
        .into_body();
    assert_ne!(k1, k2, "round robin placed the two kernels apart");
    for rest in ["interrupt", "restart", "channels"] {
        assert_eq!(send(&svc, path("k1", rest)).await.unwrap().body(), &k1);
        assert_eq!(send(&svc, path("k2", rest)).await.unwrap().body(), &k2);
    }
    assert_eq!(layer.stats().sessions, 2);
}

/// A server that assigns a new id to a request naming an old one (which it
/// no longer knows): the new id is a session on the backend that assigned
/// it, from the next request on.
#[tokio::test]
async fn a_header_id_a_response_assigns_over_the_requests_own_is_learned() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"));
    let svc = stack(&c.pool, layer.clone());
    for old in ["expired", "also-expired"] {
        // One known to the layer, one not.
        if old == "also-expired" {
            send(&svc, session(old)).await.unwrap();
        }
        let renamed = Request::builder()
            .header("x-session-id", old)
            .header("x-assign", "1")
            .body(())
            .unwrap();
        let res = send(&svc, renamed).await.unwrap();
        let id = res.headers()["x-session-id"].to_str().unwrap().to_owned();
        assert_ne!(id, old);
        for _ in 0..4 {
            assert_eq!(send(&svc, session(&id)).await.unwrap().body(), res.body());
        }
    }
}

/// A response naming a session the layer keeps (confirmed) does not move
/// it: a session moves only when its backend fails. A value kept in memory
/// only, which the application had not confirmed, goes where the
/// application sets it.
#[tokio::test]
async fn a_response_naming_a_kept_session_does_not_move_it() {
    let c = cluster();
    let store = MemoryStore::new();
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), store.clone());
    let home = send(&svc, session("k")).await.unwrap().into_body();
    for _ in 0..3 {
        let named = Request::builder().header("x-assign", "k").body(()).unwrap();
        let res = send(&svc, named).await.unwrap();
        assert_eq!(res.headers()["x-session-id"], "k");
        assert_eq!(send(&svc, session("k")).await.unwrap().body(), &home);
    }
    assert_eq!(stored_backend(&store, "k").await, home);
    assert_eq!(layer.stats().created, 1);

    let (_, svc) = instance(&c, SessionKey::learn_cookie("JSESSIONID"), store.clone());
    let made_up = send(&svc, with_cookie("JSESSIONID=v"))
        .await
        .unwrap()
        .into_body();
    let login = Request::builder()
        .header("x-login-as", "v")
        .body(())
        .unwrap();
    let set_by = send(&svc, login).await.unwrap().into_body();
    assert_ne!(set_by, made_up, "round robin went on to the next backend");
    assert_eq!(
        send(&svc, with_cookie("JSESSIONID=v"))
            .await
            .unwrap()
            .body(),
        &set_by
    );
    assert_eq!(stored_backend(&store, "v").await, set_by);
}

#[tokio::test]
async fn fastws_compatibility_hashes_the_cookie_and_round_robins_without_it() {
    let c = cluster();
    let balance = Balance::new(c.pool.clone(), tower_ha::sticky::hash_cookie("StickyStr"));
    let mut homes = HashMap::new();
    for user in 0..30 {
        let cookie = format!("StickyStr=user-{user}");
        let first = send(&balance, with_cookie(&cookie))
            .await
            .unwrap()
            .into_body();
        for _ in 0..3 {
            assert_eq!(
                send(&balance, with_cookie(&cookie)).await.unwrap().body(),
                &first
            );
        }
        homes.insert(user, first);
    }
    let spread: std::collections::HashSet<_> = homes.values().collect();
    assert_eq!(spread.len(), 3);
    let no_cookie: Vec<String> = [
        Request::new(()),
        with_cookie("StickyStr="),
        Request::new(()),
    ]
    .into_iter()
    .map(|r| {
        futures::executor::block_on(send(&balance, r))
            .unwrap()
            .into_body()
    })
    .collect();
    let distinct: std::collections::HashSet<_> = no_cookie.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "absent or empty cookie: round robin, {no_cookie:?}"
    );
}

fn sign(name: &str, sid: &str, backend: &str) -> String {
    sign_with(SECRET, name, sid, backend)
}

/// Signs a cookie value the documented way: HMAC-SHA256 over a label, the
/// cookie name, the session id and the backend id.
fn sign_with(secret: &[u8], name: &str, sid: &str, backend: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    for part in [
        b"tower-ha sticky v1\0".as_slice(),
        name.as_bytes(),
        b"\0",
        sid.as_bytes(),
        b"\0",
        backend.as_bytes(),
    ] {
        mac.update(part);
    }
    let tag = mac.finalize().into_bytes();
    format!(
        "{sid}.{}.{}",
        URL_SAFE_NO_PAD.encode(backend),
        URL_SAFE_NO_PAD.encode(&tag[..16])
    )
}

#[tokio::test]
async fn bad_input_is_no_session_and_is_counted() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()));
    let svc = stack(&c.pool, layer.clone());
    let good = cookie_of(&send(&svc, Request::new(())).await.unwrap()).unwrap();
    let good_value = good.strip_prefix("srv=").unwrap().to_owned();
    let sid = "AAAAAAAAAAAAAAAAAAAAAA";
    // The documented format, correctly signed: accepted.
    let res = send(&svc, with_cookie(&format!("srv={}", sign("srv", sid, "b"))))
        .await
        .unwrap();
    assert_eq!(res.body(), "b");
    assert_eq!(layer.stats().rejected, 0);

    let (head, tag) = good_value.rsplit_once('.').unwrap();
    let flipped = format!(
        "{head}.{}{}",
        if tag.starts_with('A') { "B" } else { "A" },
        &tag[1..]
    );
    let mut bad: Vec<HeaderValue> = vec![
        // Bad signature.
        HeaderValue::try_from(format!("srv={flipped}")).unwrap(),
        // Signed with another secret.
        HeaderValue::try_from(format!("srv={}", sign_with(&[9u8; 32], "srv", sid, "b"))).unwrap(),
        // A well-signed cookie naming a backend not in the pool.
        HeaderValue::try_from(format!(
            "srv={}",
            sign("srv", "BBBBBBBBBBBBBBBBBBBBBB", "zz")
        ))
        .unwrap(),
        // An unsigned backend name, FastWS style.
        HeaderValue::from_static("srv=b"),
        // Random bytes, not UTF-8.
        HeaderValue::from_bytes(b"srv=\xff\xfe\x80abc.\xc3\x28.\xe2\x82").unwrap(),
        // 8 KiB of garbage.
        HeaderValue::try_from(format!("srv={}", "x".repeat(8 * 1024))).unwrap(),
        // 100 cookies in one header, ours forged.
        HeaderValue::try_from(
            (0..100)
                .map(|i| format!("srv=forged{i}.x.y"))
                .collect::<Vec<_>>()
                .join("; "),
        )
        .unwrap(),
    ];
    let n = bad.len() as u64;
    for (i, value) in bad.drain(..).enumerate() {
        let req = Request::builder().header(COOKIE, value).body(()).unwrap();
        let res = send(&svc, req).await.unwrap();
        assert!(
            cookie_of(&res).is_some(),
            "case {i}: treated as no session, a new one starts"
        );
        assert_eq!(layer.stats().rejected, i as u64 + 1, "case {i} counted");
    }
    assert_eq!(layer.stats().rejected, n);

    // 100 unrelated cookies around a valid one: a hit, nothing rejected.
    let many = (0..100)
        .map(|i| format!("c{i}=v{i}"))
        .chain([good.clone()])
        .collect::<Vec<_>>()
        .join("; ");
    let res = send(&svc, with_cookie(&many)).await.unwrap();
    assert!(cookie_of(&res).is_none());
    assert_eq!(layer.stats().rejected, n);

    // Header keys: not UTF-8, too long.
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"));
    let svc = stack(&c.pool, layer.clone());
    for value in [
        HeaderValue::from_bytes(b"\xff\xfe\xfd").unwrap(),
        HeaderValue::try_from("k".repeat(4096)).unwrap(),
    ] {
        let req = session(value);
        send(&svc, req).await.unwrap();
    }
    assert_eq!(layer.stats().rejected, 2);
    assert_eq!(layer.stats().sessions, 0);
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_expire_and_a_restart_keeps_cookie_affinity() {
    let c = cluster();
    // A table of one shard: a sweep call sweeps it all.
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()))
        .idle_timeout(Duration::from_secs(60))
        .max_sessions(1000);
    let svc = stack(&c.pool, layer.clone());
    let _ = send(&svc, Request::new(())).await.unwrap(); // a
    let first = send(&svc, Request::new(())).await.unwrap(); // b
    let cookie = cookie_of(&first).unwrap();
    assert_eq!(layer.stats().sessions, 2);
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(
        send(&svc, with_cookie(&cookie)).await.unwrap().body(),
        first.body()
    );
    tokio::time::advance(Duration::from_secs(61)).await;
    // Expired from the table; the signed cookie still names its backend.
    assert_eq!(
        send(&svc, with_cookie(&cookie)).await.unwrap().body(),
        first.body()
    );
    let stats = layer.stats();
    // One found idle on lookup, the other dropped by the sweep that ran
    // when the session was put back.
    assert_eq!(stats.expired, 2);
    assert_eq!(stats.misses, 1);
    assert_eq!(stats.sessions, 1);

    // A new instance (a restart) with the same secret and no store.
    let layer2 = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()));
    let svc2 = stack(&c.pool, layer2.clone());
    for _ in 0..3 {
        assert_eq!(
            send(&svc2, with_cookie(&cookie)).await.unwrap().body(),
            first.body()
        );
    }
}

/// A restart with a new secret and the old one as a previous secret keeps
/// every session on its backend, and sends its cookie again signed with
/// the new secret; without the old one, the cookie is rejected.
#[tokio::test]
async fn a_rotated_secret_keeps_the_sessions_the_old_one_signed() {
    const NEW_SECRET: [u8; 32] = [9; 32];
    let c = cluster();
    let old = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()));
    let svc = stack(&c.pool, old);
    let _ = send(&svc, Request::new(())).await.unwrap(); // a
    let first = send(&svc, Request::new(())).await.unwrap(); // b
    let home = first.body().clone();
    let cookie = cookie_of(&first).unwrap();

    let rotated = CookieInsert::new("srv", NEW_SECRET)
        .secure(false)
        .previous_secret(SECRET);
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(rotated));
    let svc = stack(&c.pool, layer.clone());
    // Not in memory yet: routed by the cookie, which is sent again once
    // the session is.
    let res = send(&svc, with_cookie(&cookie)).await.unwrap();
    assert_eq!(res.body(), &home);
    let res = send(&svc, with_cookie(&cookie)).await.unwrap();
    assert_eq!(res.body(), &home);
    let resigned = cookie_of(&res).expect("sent again, signed anew");
    assert_ne!(resigned, cookie);
    assert_eq!(
        resigned.split('.').next(),
        cookie.split('.').next(),
        "the same session"
    );
    let res = send(&svc, with_cookie(&resigned)).await.unwrap();
    assert_eq!(res.body(), &home);
    assert!(cookie_of(&res).is_none(), "current: not sent again");
    assert_eq!(layer.stats().rejected, 0);
    assert_eq!(layer.stats().moved, 0);

    // The new secret alone does not take the old cookie.
    let bare = CookieInsert::new("srv", NEW_SECRET).secure(false);
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(bare));
    let svc = stack(&c.pool, layer.clone());
    let res = send(&svc, with_cookie(&cookie)).await.unwrap();
    assert_ne!(
        cookie_of(&res).unwrap().split('.').next(),
        cookie.split('.').next()
    );
    assert_eq!(layer.stats().rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn a_forged_cookie_with_a_live_session_id_does_not_keep_it_alive() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()))
        .idle_timeout(Duration::from_secs(60));
    let svc = stack(&c.pool, layer.clone());
    let cookie = cookie_of(&send(&svc, Request::new(())).await.unwrap()).unwrap();
    let value = cookie.strip_prefix("srv=").unwrap();
    let (sid, _) = value.split_once('.').unwrap();
    // The session's id with a made-up backend and tag, every 40 s: each is
    // rejected, and none counts as a request of the session.
    let forged = format!("srv={sid}.Yg.AAAAAAAAAAAAAAAAAAAAAA");
    for i in 1..=3 {
        tokio::time::advance(Duration::from_secs(40)).await;
        send(&svc, with_cookie(&forged)).await.unwrap();
        assert_eq!(layer.stats().rejected, i);
    }
    // 120 s after its last real request, the session has gone idle: its
    // cookie is no longer found in the table.
    assert_eq!(layer.stats().misses, 0);
    send(&svc, with_cookie(&cookie)).await.unwrap();
    assert_eq!(layer.stats().misses, 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_table_evicts_least_recently_used_which_stay_in_the_store() {
    let c = cluster();
    let store = MemoryStore::new();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .max_sessions(8);
    let svc = stack(&c.pool, layer.clone());
    let req = |k: usize| session(format!("s{k}"));
    let mut homes = Vec::new();
    let start = |k: usize| {
        let svc = svc.clone();
        async move {
            let home = send(&svc, req(k)).await.unwrap().into_body();
            // Distinct ages.
            tokio::time::advance(Duration::from_millis(1)).await;
            home
        }
    };
    for k in 0..8 {
        homes.push(start(k).await);
    }
    // s0 is used again, so s1 is now the least recently used.
    start(0).await;
    homes.push(start(8).await);
    assert!(
        layer.session("s0").is_some(),
        "a recently used session stays"
    );
    assert!(
        layer.session("s1").is_none(),
        "the least recently used goes"
    );
    for k in 9..20 {
        homes.push(start(k).await);
    }
    // Each of the 12 sessions started into the full table (s8 to s19)
    // evicted one (8 / 8).
    let stats = layer.stats();
    assert_eq!(
        (stats.sessions, stats.evicted, stats.created),
        (8, 12, 20),
        "{stats:?}"
    );
    assert_eq!(store.len(), 20, "evicted sessions stay in the store");
    // Replication: an evicted session loads back on its next request.
    for (k, home) in homes.iter().enumerate() {
        assert_eq!(send(&svc, req(k)).await.unwrap().body(), home, "s{k}");
    }
    // Read back from the store, every one of them, not started again on
    // a backend round robin happened to pick again.
    let after = layer.stats();
    assert_eq!(after.created, 20, "{after:?}");
    assert!(after.loaded - stats.loaded >= stats.evicted, "{after:?}");
}

/// A store that counts loads and holds each load's answer (read at once)
/// until released, counting the loads waiting to be; and holds deletes
/// while `deletes` has no permit (it has plenty unless a test says).
#[derive(Clone)]
struct SlowStore {
    inner: MemoryStore,
    loads: Arc<AtomicUsize>,
    waiting: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
    deletes: Arc<tokio::sync::Semaphore>,
}

impl SlowStore {
    /// A store holding `key` on `backend`, and this store over it.
    async fn holding(key: &str, backend: &str) -> (MemoryStore, SlowStore) {
        let inner = MemoryStore::new();
        inner
            .save(&Session::new(key, backend.into()))
            .await
            .unwrap();
        let slow = SlowStore {
            inner: inner.clone(),
            loads: Arc::new(AtomicUsize::new(0)),
            waiting: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            deletes: Arc::new(tokio::sync::Semaphore::new(
                tokio::sync::Semaphore::MAX_PERMITS,
            )),
        };
        (inner, slow)
    }

    /// Returns once a load has read its answer and is held at the gate.
    async fn until_held(&self) {
        spin_until("the load waits", || {
            self.waiting.load(Ordering::SeqCst) >= 1
        })
        .await;
    }
}

impl SessionStore for SlowStore {
    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let answer = self.inner.load(key).await;
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _permit = self.gate.acquire().await.unwrap();
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            answer
        })
    }
    fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let _permit = self.deletes.acquire().await.unwrap();
            self.inner.delete(keys).await
        })
    }

    pass_on!(inner: load_all, save);
}

/// A layer keyed by `X-Session-Id` over `store`, in standalone mode.
fn standalone<S, St>(pool: &Pool<S>, store: &St) -> StickyLayer
where
    S: Send + Sync + 'static,
    St: SessionStore + Clone + 'static,
{
    StickyLayer::new(pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .availability(Availability::Standalone)
}

/// `layer` over a round-robin `Balance` of `pool`.
fn stack<S>(pool: &Pool<S>, layer: StickyLayer) -> Sticky<Balance<S, RoundRobin>>
where
    S: Service<Request<()>> + Clone + Send + Sync + 'static,
{
    tower::Layer::layer(&layer, Balance::new(pool.clone(), RoundRobin::new()))
}

fn instance<S>(
    c: &Cluster<S>,
    key: SessionKey,
    store: impl SessionStore,
) -> (StickyLayer, Sticky<Balance<S, RoundRobin>>)
where
    S: Service<Request<()>> + Clone + Send + Sync + 'static,
{
    let layer = StickyLayer::new(&c.pool, key).store(store);
    let svc = stack(&c.pool, layer.clone());
    (layer, svc)
}

#[tokio::test]
async fn replication_routes_a_session_started_on_another_instance() {
    let c = cluster();
    let store = MemoryStore::new();
    let (_, a) = instance(
        &c,
        SessionKey::insert_cookie(insert_cookie()),
        store.clone(),
    );
    let (layer_b, b) = instance(
        &c,
        SessionKey::insert_cookie(insert_cookie()),
        store.clone(),
    );

    // Sessions started through A, one on each backend.
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let res = send(&a, Request::new(())).await.unwrap();
        cookies.push((cookie_of(&res).unwrap(), res.into_body()));
    }
    // Move the first one on A; its client keeps the stale cookie.
    let (stale, old_home) = cookies[0].clone();
    c.set_health(&old_home, HealthStatus::Unhealthy);
    let moved = send(&a, with_cookie(&stale)).await.unwrap().into_body();
    assert_ne!(moved, old_home);
    c.set_health(&old_home, HealthStatus::Healthy);
    cookies[0].1 = moved;

    // On B each session lands on its backend as the store knows it (not as
    // the stale cookie says, nor where B's round robin would go).
    for (cookie, home) in cookies.iter().rev() {
        let res = send(&b, with_cookie(cookie)).await.unwrap();
        assert_eq!(res.body(), home);
    }
    assert_eq!(layer_b.stats().loaded, 3);
    assert_eq!(layer_b.stats().sessions, 3);

    // Header keys know nothing but the store: B must load them.
    let key = SessionKey::header("x-session-id");
    let (_, a) = instance(&c, key.clone(), store.clone());
    let (layer_b, b) = instance(&c, key, store.clone());
    let req = || session("kernel-7");
    let _ = send(&b, Request::new(())).await.unwrap(); // moves B's round robin
    let home = send(&a, req()).await.unwrap().into_body();
    for _ in 0..3 {
        assert_eq!(send(&b, req()).await.unwrap().body(), &home);
    }
    assert_eq!(layer_b.stats().loaded, 1, "loaded once, then known");
}

#[tokio::test]
async fn a_session_removed_while_it_is_loaded_does_not_come_back() {
    let c = cluster();
    let (shared, slow) = SlowStore::holding("kernel-1", "c").await;
    let (_, svc) = instance(&c, SessionKey::header("x-session-id"), slow.clone());
    // A request reads the record, and its answer is held ...
    let pending = tokio::spawn(send_owned(svc.clone(), session("kernel-1")));
    slow.until_held().await;
    // ... while the session is ended.
    assert!(!svc.remove("kernel-1").await.unwrap());
    assert!(shared.load("kernel-1").await.unwrap().is_none());
    slow.gate.add_permits(1000);
    // The record read before the removal is not taken: the store is read
    // again, and the request starts a new session where it is served.
    let served = pending.await.unwrap().unwrap().into_body();
    assert_eq!(slow.loads.load(Ordering::SeqCst), 2);
    let record = shared
        .load("kernel-1")
        .await
        .unwrap()
        .expect("a new session");
    assert_eq!(record.backend.as_str(), served);
    let res = send(&svc, session("kernel-1")).await.unwrap();
    assert_eq!(res.into_body(), served);
}

/// The layer and each service it built end and forget the same sessions,
/// so an application can do both from whichever handle it kept once its
/// stack was served.
#[tokio::test]
async fn the_layer_and_its_services_end_and_forget_alike() {
    let c = cluster();
    let store = MemoryStore::new();
    for (k, b) in [("s1", "a"), ("s2", "b"), ("s3", "c")] {
        store.save(&Session::new(k, b.into())).await.unwrap();
    }
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), store.clone());
    for k in ["s1", "s2", "s3"] {
        send(&svc, session(k)).await.unwrap();
    }
    // Ended through the layer: out of the table and the store.
    assert!(layer.remove("s1").await.unwrap());
    assert!(svc.session("s1").is_none());
    assert!(store.load("s1").await.unwrap().is_none());
    assert!(!layer.remove("s1").await.unwrap(), "known no more");
    // Forgotten through a service: out of the table, kept in the store.
    assert!(svc.forget("s2"));
    assert!(layer.session("s2").is_none());
    assert_eq!(stored_backend(&store, "s2").await, "b");
    assert!(!svc.forget("s2"));
    assert_eq!(svc.forget_all(), 1, "s3 was left");
    assert!(layer.session("s3").is_none());
    assert_eq!(store.len(), 2);
}

/// Saves after `delay`.
struct SlowSaves(MemoryStore, Duration);

impl SessionStore for SlowSaves {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        self.0.load_all()
    }
    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        self.0.load(key)
    }
    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            tokio::time::sleep(self.1).await;
            self.0.save(session).await
        })
    }
    fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        self.0.delete(keys)
    }
}

/// A `MemoryStore` whose loads hang until `open` is set (checked every
/// second of `tokio::time`).
#[derive(Clone)]
struct HangingLoads {
    inner: MemoryStore,
    open: Arc<AtomicBool>,
}

impl SessionStore for HangingLoads {
    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        Box::pin(async move {
            while !self.open.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            self.inner.load(key).await
        })
    }

    pass_on!(inner: load_all, save, delete);
}

/// A request whose session's record does not come waits for the load wait
/// at most, then goes on as when the store cannot be read: routed by the
/// layer's cookie, and kept in memory, its record read again at its next
/// request; strict mode refuses it.
#[tokio::test(start_paused = true)]
async fn a_request_waits_for_a_hanging_store_until_the_load_wait() {
    let c = cluster();
    let store = HangingLoads {
        inner: MemoryStore::new(),
        open: Arc::new(AtomicBool::new(true)),
    };
    let key = SessionKey::insert_cookie(insert_cookie());
    let first = StickyLayer::new(&c.pool, key.clone()).store(store.clone());
    let started = send(&stack(&c.pool, first), Request::new(()))
        .await
        .unwrap();
    let cookie = cookie_of(&started).unwrap();
    let home = started.body().clone();

    // Another instance, which does not hold the session, over the store
    // that now hangs.
    store.open.store(false, Ordering::SeqCst);
    let layer = StickyLayer::new(&c.pool, key.clone()).store(store.clone());
    let svc = stack(&c.pool, layer.clone());
    let at = tokio::time::Instant::now();
    let res = bounded("the request goes on", send(&svc, with_cookie(&cookie)))
        .await
        .unwrap();
    assert_eq!(at.elapsed(), DEFAULT_LOAD_WAIT);
    assert_eq!(res.body(), &home, "routed by the cookie");
    assert_eq!(layer.stats().store_errors, 1);
    // Held in memory, its record read again 5 s later: the store answers.
    store.open.store(true, Ordering::SeqCst);
    let res = send(&svc, with_cookie(&cookie)).await.unwrap();
    assert_eq!(res.body(), &home);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let loaded = layer.stats().loaded;
    assert_eq!(
        send(&svc, with_cookie(&cookie)).await.unwrap().body(),
        &home
    );
    assert_eq!(layer.stats().loaded, loaded + 1, "read again");

    store.open.store(false, Ordering::SeqCst);
    let strict = StickyLayer::new(&c.pool, key)
        .store(store.clone())
        .strict(true)
        .load_wait(Duration::from_secs(2));
    let at = tokio::time::Instant::now();
    let strict = stack(&c.pool, strict);
    let refusal = send(&strict, with_cookie(&cookie));
    let err = bounded("the request is refused", refusal)
        .await
        .unwrap_err();
    assert_eq!(at.elapsed(), Duration::from_secs(2));
    let refused = err.downcast_ref::<SessionUnavailable>().expect("typed");
    assert!(refused.is_unreadable(), "{refused}");
}

/// The load wait bounds the read of a record, not its restore: a request
/// whose record came in time waits for an `on_restore` hook longer than the
/// load wait, and is routed as the record says.
#[tokio::test(start_paused = true)]
async fn a_restore_longer_than_the_load_wait_is_waited_for() {
    let c = cluster();
    let store = MemoryStore::new();
    store
        .save(&Session::new("kernel-1", "c".into()))
        .await
        .unwrap();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store)
        .hydrate(Granted::default())
        .on_restore(|_: Session| async {
            tokio::time::sleep(Duration::from_secs(15)).await;
            Ok::<(), BoxError>(())
        });
    let svc = stack(&c.pool, layer.clone());
    let at = tokio::time::Instant::now();
    let res = bounded("the request is routed", send(&svc, session("kernel-1")));
    assert_eq!(res.await.unwrap().body(), "c");
    assert_eq!(at.elapsed(), Duration::from_secs(15));
    assert_eq!((layer.stats().hydrated, layer.stats().store_errors), (1, 0));
}

/// A store that hangs delays a new session's response by the response
/// wait at most; its save goes on and lands, and a flush waits for it.
/// With no limit, the response waits for the save.
#[tokio::test(start_paused = true)]
async fn a_response_waits_for_a_slow_store_until_the_response_wait() {
    let c = cluster();
    let store = MemoryStore::new();
    let slow = SlowSaves(store.clone(), Duration::from_secs(300));
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), slow);
    let started = tokio::time::Instant::now();
    send(&svc, session("s1")).await.unwrap();
    assert_eq!(started.elapsed(), DEFAULT_RESPONSE_WAIT);
    assert!(store.load("s1").await.unwrap().is_none(), "not saved yet");
    layer.flush().await;
    assert_eq!(started.elapsed(), Duration::from_secs(300));
    assert!(store.load("s1").await.unwrap().is_some(), "saved");

    let slow = SlowSaves(store.clone(), Duration::from_secs(300));
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(slow)
        .response_wait(Duration::ZERO);
    let svc = stack(&c.pool, layer);
    let started = tokio::time::Instant::now();
    send(&svc, session("s2")).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(300));
    assert!(store.load("s2").await.unwrap().is_some(), "saved");
}

/// While a store hangs, new sessions keep coming: beyond
/// `max_pending_writes` sessions with writes under way, a new session's
/// save fails at once, so its response does not wait, and the session is
/// still routed from memory.
#[tokio::test(start_paused = true)]
async fn beyond_max_pending_writes_a_new_sessions_save_fails_at_once() {
    let c = cluster();
    let store = MemoryStore::new();
    let slow = SlowSaves(store.clone(), Duration::from_secs(300));
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(slow)
        .max_pending_writes(2);
    let svc = stack(&c.pool, layer.clone());
    let started = tokio::time::Instant::now();
    let mut backends = Vec::new();
    for key in ["s1", "s2", "s3"] {
        backends.push(send(&svc, session(key)).await.unwrap().into_body());
    }
    // The first two waited the response wait each; the third not at all.
    assert_eq!(started.elapsed(), DEFAULT_RESPONSE_WAIT * 2);
    assert_eq!(layer.stats().store_errors, 1);
    let again = send(&svc, session("s3")).await.unwrap().into_body();
    assert_eq!(again, backends[2], "routed from memory");
    layer.flush().await;
    assert!(store.load("s1").await.unwrap().is_some(), "saved");
    assert!(store.load("s2").await.unwrap().is_some(), "saved");
    assert!(
        store.load("s3").await.unwrap().is_some(),
        "saved again by the flush"
    );
    assert_eq!(layer.stats().store_errors, 1);
}

/// An `on_move` hook that hangs holds its response for the response wait
/// and is stopped at the move timeout.
#[tokio::test(start_paused = true)]
async fn an_on_move_hook_that_hangs_is_stopped_at_the_move_timeout() {
    /// Notes when the hook's future is dropped.
    struct Dropped(Arc<Mutex<Option<tokio::time::Instant>>>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            *self.0.lock() = Some(tokio::time::Instant::now());
        }
    }
    let c = cluster();
    let dropped = Arc::new(Mutex::new(None));
    let calls = Arc::new(AtomicUsize::new(0));
    let hook = {
        let (dropped, calls) = (dropped.clone(), calls.clone());
        move |_: SessionMoved| {
            calls.fetch_add(1, Ordering::SeqCst);
            let guard = Dropped(dropped.clone());
            async move {
                let _guard = guard;
                std::future::pending::<Result<(), BoxError>>().await
            }
        }
    };
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .on_move(hook)
        .move_timeout(Duration::from_secs(40))
        .response_wait(Duration::from_secs(15));
    let svc = stack(&c.pool, layer.clone());
    let home = send(&svc, session("s1")).await.unwrap().into_body();
    c.fail[home.as_str()].store(true, Ordering::SeqCst);
    send(&svc, session("s1")).await.unwrap_err();

    let started = tokio::time::Instant::now();
    let moved = tokio::time::timeout(Duration::from_secs(600), send(&svc, session("s1")))
        .await
        .expect("the response is handed on")
        .unwrap();
    assert_ne!(moved.body(), &home);
    assert_eq!(started.elapsed(), Duration::from_secs(15));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(dropped.lock().is_none(), "still running");
    tokio::time::sleep(Duration::from_secs(60)).await;
    let at = dropped.lock().expect("stopped");
    assert_eq!(at - started, Duration::from_secs(40));
    assert_eq!(layer.stats().moved, 1);
}

/// A flush waits for the `on_move` hooks under way, one that outlived its
/// response included.
#[tokio::test(start_paused = true)]
async fn a_flush_waits_for_the_move_hooks_under_way() {
    let c = cluster();
    let ended = Arc::new(AtomicUsize::new(0));
    let hook = {
        let ended = ended.clone();
        move |_: SessionMoved| {
            let ended = ended.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(25)).await;
                ended.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(())
            }
        }
    };
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).on_move(hook);
    let svc = stack(&c.pool, layer.clone());
    let home = send(&svc, session("s1")).await.unwrap().into_body();
    c.fail[home.as_str()].store(true, Ordering::SeqCst);
    send(&svc, session("s1")).await.unwrap_err();

    let started = tokio::time::Instant::now();
    let moved = send(&svc, session("s1")).await.unwrap();
    assert_ne!(moved.body(), &home);
    assert_eq!(started.elapsed(), DEFAULT_RESPONSE_WAIT);
    assert_eq!(ended.load(Ordering::SeqCst), 0, "the hook runs on");
    layer.flush().await;
    assert_eq!(ended.load(Ordering::SeqCst), 1);
    assert_eq!(started.elapsed(), Duration::from_secs(25));
}

/// A response waits for the save its request decided, but a client that
/// goes away meanwhile leaves the save running in a task of its own: a
/// flush (at a shutdown, before the runtime ends) waits for it, from the
/// layer or any of its services.
#[tokio::test(start_paused = true)]
async fn a_flush_waits_for_the_saves_of_requests_gone() {
    let c = cluster();
    let store = MemoryStore::new();
    let slow = SlowSaves(store.clone(), Duration::from_secs(1));
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), slow);
    // The response waits for its session's save; its client leaves.
    let leave = |key| {
        let svc = svc.clone();
        async move {
            let mut response = Box::pin(send(&svc, session(key)));
            for _ in 0..10 {
                assert!(futures::poll!(response.as_mut()).is_pending());
                tokio::task::yield_now().await;
            }
        }
    };
    let started = tokio::time::Instant::now();
    leave("s1").await;
    assert!(store.load("s1").await.unwrap().is_none(), "not saved yet");
    svc.flush().await;
    assert!(store.load("s1").await.unwrap().is_some(), "saved");
    leave("s2").await;
    assert!(store.load("s2").await.unwrap().is_none(), "not saved yet");
    layer.flush().await;
    assert!(store.load("s2").await.unwrap().is_some(), "saved");
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    // With nothing queued, at once.
    layer.flush().await;
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}

#[tokio::test]
async fn a_forget_reaches_a_request_that_has_not_taken_its_load_yet() {
    let c = cluster();
    let (shared, slow) = SlowStore::holding("kernel-1", "c").await;
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), slow.clone());
    // The first request drives the load, which has read the record; the
    // second waits on it.
    let first = tokio::spawn(send_owned(svc.clone(), session("kernel-1")));
    slow.until_held().await;
    let mut second = Box::pin(send_owned(svc.clone(), session("kernel-1")));
    assert!(futures::poll!(second.as_mut()).is_pending());
    // The first takes the answer; then a notice (a move elsewhere) makes
    // the replica forget the session before the second takes it.
    slow.gate.add_permits(1000);
    assert_eq!(first.await.unwrap().unwrap().body(), "c");
    shared
        .save(&Session::new("kernel-1", "a".into()))
        .await
        .unwrap();
    assert!(layer.forget("kernel-1"));
    // The second does not put the old record back: it reads the store.
    assert_eq!(second.await.unwrap().body(), "a");
    assert_eq!(slow.loads.load(Ordering::SeqCst), 2);
}

/// Requests waiting on one load that is forgotten meanwhile read the store
/// once more between them, not once each.
#[tokio::test]
async fn requests_waiting_on_a_forgotten_load_read_the_store_once_more() {
    let c = cluster();
    let (shared, slow) = SlowStore::holding("kernel-1", "c").await;
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), slow.clone());
    let waiting: Vec<_> = (0..8)
        .map(|_| tokio::spawn(send_owned(svc.clone(), session("kernel-1"))))
        .collect();
    slow.until_held().await;
    // Moved on another replica while the record is read.
    shared
        .save(&Session::new("kernel-1", "a".into()))
        .await
        .unwrap();
    assert!(!layer.forget("kernel-1"), "not in the table yet");
    slow.gate.add_permits(1000);
    for request in waiting {
        assert_eq!(request.await.unwrap().unwrap().body(), "a");
    }
    assert_eq!(slow.loads.load(Ordering::SeqCst), 2);
    assert_eq!(layer.stats().loaded, 2);
}

/// A session forgotten while its record is read and restored is read once
/// more, and not restored again: the replica that moved it did that.
#[tokio::test]
async fn a_load_forgotten_while_restored_is_read_again_without_a_second_restore() {
    let c = cluster();
    let (shared, slow) = SlowStore::holding("kernel-1", "c").await;
    let hooked = Arc::new(AtomicUsize::new(0));
    let seen = hooked.clone();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(slow.clone())
        .availability(Availability::Replication)
        .hydrate(Granted::default())
        .on_restore(move |_: Session| {
            seen.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<(), BoxError>(()))
        });
    let svc = stack(&c.pool, layer.clone());
    let pending = tokio::spawn(send_owned(svc.clone(), session("kernel-1")));
    slow.until_held().await;
    // Moved on another replica while the record is read.
    shared
        .save(&Session::new("kernel-1", "a".into()))
        .await
        .unwrap();
    assert!(!layer.forget("kernel-1"), "not in the table yet");
    slow.gate.add_permits(1000);
    assert_eq!(pending.await.unwrap().unwrap().body(), "a");
    assert_eq!(hooked.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().hydrated, 1);
}

/// A move notice that lands while a request is routed by the record it
/// loaded: once both are done, the table does not hold the old record
/// (it would send the session to its old backend until it idles out).
/// The notice's `forget` runs on one worker while the request finishes
/// its load on the other, at a different moment in each round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_racing_a_finished_load_is_not_lost() {
    let c = cluster();
    let store = MemoryStore::new();
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), store.clone());
    let mut lost = 0;
    for round in 0..4000u32 {
        store.save(&Session::new("k", "a".into())).await.unwrap();
        layer.forget("k");
        let request = tokio::spawn(send_owned(svc.clone(), session("k")));
        let notice = {
            let (store, layer) = (store.clone(), layer.clone());
            tokio::spawn(async move {
                // From 0 to about 40 µs into the request.
                for _ in 0..(round % 400) * 25 {
                    std::hint::spin_loop();
                }
                store.save(&Session::new("k", "b".into())).await.unwrap();
                layer.forget("k");
            })
        };
        let served = request.await.unwrap().unwrap();
        notice.await.unwrap();
        // Served before or after the move: either is right.
        assert!(["a", "b"].contains(&served.body().as_str()));
        if layer
            .session("k")
            .is_some_and(|s| s.backend.as_str() == "a")
        {
            lost += 1;
        }
    }
    assert_eq!(lost, 0, "rounds whose notice was lost");
}

#[tokio::test]
async fn replication_loads_each_key_once_under_concurrent_requests() {
    let c = cluster();
    let (_, slow) = SlowStore::holding("kernel-1", "c").await;
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), slow.clone());
    let req = || session("kernel-1");
    // Counts the requests that have been polled and wait: for the load,
    // as no backend is slow.
    let waiting = Arc::new(AtomicUsize::new(0));
    let pending: Vec<_> = (0..50)
        .map(|_| {
            let mut response = Box::pin(send_owned(svc.clone(), req()));
            let (waiting, mut counted) = (waiting.clone(), false);
            tokio::spawn(futures::future::poll_fn(move |cx| {
                let poll = std::future::Future::poll(response.as_mut(), cx);
                if poll.is_pending() && !counted {
                    counted = true;
                    waiting.fetch_add(1, Ordering::SeqCst);
                }
                poll
            }))
        })
        .collect();
    // Every request waits before the store answers: one at the store's
    // gate, the others on its load.
    tokio::time::timeout(Duration::from_secs(5), async {
        while waiting.load(Ordering::SeqCst) < 50 || slow.waiting.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every request waits for the store");
    assert_eq!(slow.waiting.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().misses, 50);
    slow.gate.add_permits(1000);
    for p in pending {
        assert_eq!(p.await.unwrap().unwrap().body(), "c");
    }
    assert_eq!(slow.loads.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().loaded, 1);
}

/// A request waiting for its session's load holds no place of the
/// service below: under a concurrency limit of one, a request with no
/// session goes through meanwhile, and the loaded one after.
#[tokio::test]
async fn a_load_holds_no_place_of_the_service_below() {
    let c = cluster();
    let (_, slow) = SlowStore::holding("kernel-1", "c").await;
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).store(slow.clone());
    let limited =
        tower::limit::ConcurrencyLimit::new(Balance::new(c.pool.clone(), RoundRobin::new()), 1);
    let svc = tower::Layer::layer(&layer, limited);
    let loading = tokio::spawn(send_owned(svc.clone(), session("kernel-1")));
    slow.until_held().await;
    let plain = bounded_real("a request without a session", send(&svc, Request::new(()))).await;
    assert_eq!(plain.unwrap().status(), StatusCode::OK);
    slow.gate.add_permits(1);
    let loaded = bounded_real("the loaded request", loading).await.unwrap();
    assert_eq!(loaded.unwrap().body(), "c");
}

/// A request that gives up on a load (its client gone) leaves it running
/// for another that waits on it: that one takes the same answer, and the
/// store is read once.
#[tokio::test]
async fn a_load_outlives_the_request_that_started_it() {
    let c = cluster();
    let (_, slow) = SlowStore::holding("kernel-1", "c").await;
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), slow.clone());
    let mut first = Box::pin(send_owned(svc.clone(), session("kernel-1")));
    let mut second = Box::pin(send_owned(svc.clone(), session("kernel-1")));
    assert!(futures::poll!(first.as_mut()).is_pending());
    slow.until_held().await;
    assert!(futures::poll!(second.as_mut()).is_pending());
    drop(first);
    assert!(futures::poll!(second.as_mut()).is_pending());
    slow.gate.add_permits(1000);
    assert_eq!(second.await.unwrap().body(), "c");
    assert_eq!(slow.loads.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().loaded, 1);
}

async fn send_owned<S>(svc: S, req: Request<()>) -> Result<Response<String>, BoxError>
where
    S: Service<Request<()>, Response = Response<String>, Error = BoxError>,
{
    svc.oneshot(req).await
}

/// What `restore_held` gives: the store, the layer, the restore's task,
/// the gate its hook waits on, and the stack.
type RestoreHeld<S> = (
    MemoryStore,
    StickyLayer,
    tokio::task::JoinHandle<Result<tower_ha::sticky::RestoreReport, tower_ha::store::StoreError>>,
    Arc<tokio::sync::Semaphore>,
    Sticky<Balance<S, RoundRobin>>,
);

/// A store holding `keys` on backend c; a layer in `availability` over
/// it, with an `on_restore` hook that waits for a permit of `gate`; its
/// `restore()` under way in a task, once the hook runs; and the stack
/// over `c` with that layer.
async fn restore_held<S>(
    c: &Cluster<S>,
    keys: &[&str],
    availability: Availability,
) -> RestoreHeld<S>
where
    S: Service<Request<()>> + Clone + Send + Sync + 'static,
{
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"));
    restore_held_by(c, keys, layer.availability(availability)).await
}

/// The same as `restore_held`, for `layer` (given its key, mode and
/// options).
async fn restore_held_by<S>(c: &Cluster<S>, keys: &[&str], layer: StickyLayer) -> RestoreHeld<S>
where
    S: Service<Request<()>> + Clone + Send + Sync + 'static,
{
    let store = MemoryStore::new();
    for key in keys {
        store.save(&kernel(key, "c")).await.unwrap();
    }
    let layer = layer.store(store.clone());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(AtomicBool::new(false));
    let (hooked, running) = (gate.clone(), entered.clone());
    let layer = layer.on_restore(move |_: Session| {
        let (gate, running) = (hooked.clone(), running.clone());
        async move {
            running.store(true, Ordering::SeqCst);
            drop(gate.acquire().await.unwrap());
            Ok::<(), BoxError>(())
        }
    });
    let restore = tokio::spawn({
        let layer = layer.clone();
        async move { layer.restore().await }
    });
    spin_until("the hook runs", || entered.load(Ordering::SeqCst)).await;
    let svc = stack(&c.pool, layer.clone());
    (store, layer, restore, gate, svc)
}

#[tokio::test]
async fn a_session_removed_while_restore_runs_is_not_put_back() {
    let c = cluster();
    let (store, layer, restore, gate, svc) =
        restore_held(&c, &["k1"], Availability::Standalone).await;
    // Ended while its hook runs: the restore does not route it.
    assert!(!svc.remove("k1").await.unwrap());
    gate.add_permits(1);
    let report = restore.await.unwrap().unwrap();
    assert!(report.restored.is_empty(), "{:?}", report.restored);
    assert!(layer.session("k1").is_none());
    assert!(store.load("k1").await.unwrap().is_none());
}

/// A memory store whose listing, once it has read the records, waits for
/// a permit before it answers (a large directory still being listed).
#[derive(Clone)]
struct SlowListing {
    inner: MemoryStore,
    listed: Arc<tokio::sync::Semaphore>,
    go: Arc<tokio::sync::Semaphore>,
}

impl SlowListing {
    fn new(inner: MemoryStore) -> Self {
        SlowListing {
            inner,
            listed: Arc::new(tokio::sync::Semaphore::new(0)),
            go: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

impl SessionStore for SlowListing {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        Box::pin(async move {
            let loaded = self.inner.load_all().await?;
            self.listed.add_permits(1);
            self.go.acquire().await.unwrap().forget();
            Ok(loaded)
        })
    }

    pass_on!(inner: load, save, delete);
}

#[tokio::test]
async fn a_session_ended_or_forgotten_while_restore_lists_the_store_is_not_put_back() {
    for availability in [Availability::Standalone, Availability::Replication] {
        let c = cluster();
        let shared = MemoryStore::new();
        for (key, backend) in [("ended", "c"), ("moved", "c"), ("kept", "c")] {
            shared
                .save(&Session::new(key, backend.into()))
                .await
                .unwrap();
        }
        let store = SlowListing::new(shared.clone());
        let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
            .store(store.clone())
            .availability(availability);
        let svc = stack(&c.pool, layer.clone());
        let restore = tokio::spawn({
            let layer = layer.clone();
            async move { layer.restore().await }
        });
        // The listing has read the three records...
        store.listed.acquire().await.unwrap().forget();
        // ... when the application ends one (a logout), and another
        // replica moves another, whose notice makes this one forget it.
        layer.remove("ended").await.unwrap();
        shared
            .save(&Session::new("moved", "b".into()))
            .await
            .unwrap();
        layer.forget("moved");
        store.go.add_permits(1);
        let report = restore.await.unwrap().unwrap();
        assert_eq!(report.restored, ["kept"], "{availability:?}");
        assert!(layer.session("ended").is_none(), "{availability:?}");
        assert!(shared.load("ended").await.unwrap().is_none());
        assert!(layer.session("moved").is_none(), "{availability:?}");
        // Its next request follows the store.
        let res = send(&svc, session("moved")).await.unwrap();
        assert_eq!(res.body(), "b", "{availability:?}");
        assert_eq!(send(&svc, session("kept")).await.unwrap().body(), "c");
        assert_eq!(layer.stats().moved, 0);
    }
}

#[tokio::test]
async fn a_session_forgotten_while_its_restore_hook_runs_follows_the_store() {
    let c = cluster();
    let (shared, layer, restore, gate, svc) =
        restore_held(&c, &["k1"], Availability::Replication).await;
    // Another replica moves it to b meanwhile; its notice makes this one
    // forget it.
    shared.save(&Session::new("k1", "b".into())).await.unwrap();
    layer.forget("k1");
    gate.add_permits(1);
    restore.await.unwrap().unwrap();
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "b");
    assert_eq!(stored_backend(&shared, "k1").await, "b");
}

/// Standalone: a session requested while its record waits for the
/// restore is served from memory; forgotten meanwhile (one by one, or all
/// at once after lost notices), it is read from the store at its next
/// request once the restore lets it go.
#[tokio::test]
async fn a_session_served_from_memory_while_restore_runs_then_forgotten_follows_the_store() {
    for all_at_once in [false, true] {
        let c = cluster();
        let (_, layer, restore, gate, svc) =
            restore_held(&c, &["k1", "k2"], Availability::Standalone).await;
        // While the first hook runs, c is out: both are served elsewhere,
        // from memory.
        c.set_health("c", HealthStatus::Unhealthy);
        for key in ["k1", "k2"] {
            assert_ne!(send(&svc, session(key)).await.unwrap().body(), "c");
        }
        c.set_health("c", HealthStatus::Healthy);
        if all_at_once {
            layer.forget_all();
        } else {
            layer.forget("k1");
            layer.forget("k2");
        }
        gate.add_permits(2);
        let report = restore.await.unwrap().unwrap();
        assert!(report.restored.is_empty(), "{:?}", report.restored);
        for key in ["k1", "k2"] {
            let res = send(&svc, session(key)).await.unwrap();
            assert_eq!(res.body(), "c", "{key}, all at once: {all_at_once}");
        }
        // Each moved once off `c`, in memory, and follows the store since.
        assert_eq!(layer.stats().moved, 2);
    }
}

/// The same for a request routed from memory before the session is
/// forgotten and answered after the restore let it go: what it starts is
/// read from the store at the next request.
#[tokio::test(start_paused = true)]
async fn a_session_answered_after_the_restore_let_it_go_follows_the_store() {
    let c = cluster();
    let (_, layer, restore, gate, svc) = restore_held(&c, &["k1"], Availability::Standalone).await;
    c.set_health("c", HealthStatus::Unhealthy);
    let mut slow = session("k1");
    slow.headers_mut()
        .insert("x-delay-ms", HeaderValue::from_static("1000"));
    let slow = tokio::spawn(send_owned(svc.clone(), slow));
    tokio::time::advance(Duration::from_millis(10)).await;
    c.set_health("c", HealthStatus::Healthy);
    layer.forget("k1");
    gate.add_permits(1);
    assert!(restore.await.unwrap().unwrap().restored.is_empty());
    // Answered now, from where it was routed.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_ne!(slow.await.unwrap().unwrap().body(), "c");
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "c");
}

#[tokio::test]
async fn standalone_restore_reports_and_keeps_failed_records() {
    let c = cluster();
    let store = MemoryStore::new();
    for (k, b) in [("k1", "a"), ("k2", "b"), ("k3", "c")] {
        let s = Session::new(k, b.into()).with_data(serde_json::json!({"port": 5000}));
        store.save(&s).await.unwrap();
    }
    let restored = Arc::new(Mutex::new(Vec::new()));
    let seen = restored.clone();
    let layer = standalone(&c.pool, &store).on_restore(move |s: Session| {
        let seen = seen.clone();
        async move {
            assert_eq!(s.data["port"], 5000);
            if s.key == "k2" {
                return Err::<(), BoxError>("kernel gone".into());
            }
            seen.lock().push(s.key);
            Ok(())
        }
    });
    let report = layer.restore().await.unwrap();
    let mut ok = report.restored.clone();
    ok.sort();
    assert_eq!(ok, ["k1", "k3"]);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].key, "k2");
    assert_eq!(report.failed[0].error.to_string(), "kernel gone");
    assert_eq!(store.len(), 3, "a failed restore keeps the stored record");

    let svc = stack(&c.pool, layer.clone());
    for _ in 0..3 {
        assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "a");
        assert_eq!(send(&svc, session("k3")).await.unwrap().body(), "c");
    }
    // A record whose restore failed is not read on a miss. The requests
    // for k2 go where it says, and it stays as it was for a later
    // restore().
    for _ in 0..2 {
        assert_eq!(send(&svc, session("k2")).await.unwrap().body(), "b");
    }
    assert_eq!(layer.stats().loaded, 0);
    let kept = store.load("k2").await.unwrap().unwrap();
    assert_eq!(kept.backend.as_str(), "b");
    assert_eq!(kept.data["port"], 5000);
}

/// A store that lists a fixed set of records (say, one that appends a
/// record at each save), and otherwise is `MemoryStore`.
#[derive(Clone)]
struct Listing {
    listed: Arc<Vec<Session>>,
    inner: MemoryStore,
}

impl SessionStore for Listing {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        let listed = Loaded::new(self.listed.to_vec());
        Box::pin(async move { Ok(listed) })
    }
    pass_on!(inner: load, save, delete);
}

/// A key listed twice is restored once, from its last record (as a store
/// that replaces records would hold it); the earlier one is reported.
#[tokio::test]
async fn a_key_listed_twice_is_restored_once_from_its_last_record() {
    let c = cluster();
    let record = |backend: &str, v: u32| {
        Session::new("k", backend.into()).with_data(serde_json::json!({ "v": v }))
    };
    let saved = MemoryStore::new();
    let store = Listing {
        listed: Arc::new(vec![record("a", 1), record("b", 2)]),
        inner: saved.clone(),
    };
    let hooked = Arc::new(Mutex::new(Vec::new()));
    let seen = hooked.clone();
    let layer = standalone(&c.pool, &store).on_restore(move |s: Session| {
        seen.lock()
            .push((s.backend.to_string(), s.data["v"].clone()));
        async move { Ok::<(), BoxError>(()) }
    });
    let report = layer.restore().await.unwrap();
    assert_eq!(*hooked.lock(), [("b".to_owned(), serde_json::json!(2))]);
    assert_eq!(report.restored, ["k"]);
    assert!(report.failed.is_empty());
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].record, "k");
    assert!(report.skipped[0].error.is_corrupt());
    let svc = stack(&c.pool, layer.clone());
    for _ in 0..3 {
        assert_eq!(send(&svc, session("k")).await.unwrap().body(), "b");
    }
    // Nothing was saved over the record as a move.
    assert!(saved.load("k").await.unwrap().is_none());
}

#[tokio::test]
async fn a_restore_hook_that_panics_fails_its_session_alone() {
    let c = cluster();
    let store = MemoryStore::new();
    for (k, b) in [("k1", "a"), ("k2", "b"), ("k3", "c")] {
        store.save(&Session::new(k, b.into())).await.unwrap();
    }
    let layer = standalone(&c.pool, &store).on_restore(|s: Session| {
        // k3's hook panics before it returns a future, k2's while it
        // runs.
        assert_ne!(s.key, "k3", "no kernel for k3");
        async move {
            assert_ne!(s.key, "k2", "no kernel for k2");
            Ok::<(), BoxError>(())
        }
    });
    let report = bounded_real("the restore ends", layer.restore())
        .await
        .unwrap();
    assert_eq!(report.restored, ["k1"]);
    let mut failed: Vec<_> = report.failed.iter().map(|f| f.key.as_str()).collect();
    failed.sort();
    assert_eq!(failed, ["k2", "k3"]);
    for failure in &report.failed {
        assert!(failure.error.is::<RestorePanicked>(), "{}", failure.error);
    }
    assert_eq!(layer.session("k1").unwrap().backend.as_str(), "a");
    assert!(layer.session("k2").is_none());
    assert_eq!(store.len(), 3, "the failed sessions keep their records");
}

#[tokio::test]
async fn a_record_the_store_cannot_read_is_not_overwritten() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let store = tower_ha::store::FileStore::open(dir.path()).await.unwrap();
    store
        .save(&Session::new("s", "b".into()).with_data(serde_json::json!({"port": 1})))
        .await
        .unwrap();
    let file = dir.path().join(tower_ha::store::FileStore::file_name("s"));
    std::fs::write(&file, b"{\"key\": \"s\", \"backe").unwrap();
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), store.clone());
    let req = || session("s");
    let home = send(&svc, req()).await.unwrap().into_body();
    assert_eq!(
        send(&svc, req()).await.unwrap().body(),
        &home,
        "sticky in memory"
    );
    assert_eq!(layer.stats().store_errors, 1, "one failed load");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"{\"key\": \"s\", \"backe",
        "the unreadable record is kept for inspection, not replaced"
    );
    // Its backend fails: the session moves, in memory only.
    c.fail[home.as_str()].store(true, Ordering::SeqCst);
    assert!(send(&svc, req()).await.is_err());
    let moved = send(&svc, req()).await.unwrap().into_body();
    assert_ne!(moved, home);
    assert_eq!(layer.stats().moved, 1);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"{\"key\": \"s\", \"backe",
        "a move does not replace the unreadable record either"
    );
}

#[tokio::test]
async fn concurrent_first_requests_bind_a_session_once() {
    use tokio::sync::oneshot;
    // Two backends that answer when told to.
    type Gates = HashMap<&'static str, Vec<oneshot::Sender<()>>>;
    let gates: Arc<Mutex<Gates>> = Arc::default();
    let pool = Pool::new();
    for name in ["a", "b"] {
        let gates = gates.clone();
        pool.insert(
            name,
            tower::service_fn(move |_req: Request<()>| {
                let (tx, rx) = oneshot::channel();
                gates.lock().entry(name).or_default().push(tx);
                async move {
                    rx.await.ok();
                    Ok::<_, BoxError>(Response::new(name.to_owned()))
                }
            }),
        );
    }
    let store = MemoryStore::new();
    let layer = StickyLayer::new(&pool, SessionKey::header("x-session-id")).store(store.clone());
    let svc = stack(&pool, layer.clone());
    let req = || session("s1");
    // Both miss: round robin sends one to each backend.
    let first = tokio::spawn(send_owned(svc.clone(), req()));
    let second = tokio::spawn(send_owned(svc.clone(), req()));
    spin_until("both requests reach a backend", || {
        gates.lock().values().map(Vec::len).sum::<usize>() >= 2
    })
    .await;
    // b answers first and starts the session; a's later answer must not
    // move it.
    let release = |name: &str| gates.lock().get_mut(name).unwrap().pop().unwrap().send(());
    release("b").unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while layer.session("s1").is_none() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("b's answer starts the session");
    release("a").unwrap();
    let mut bodies = vec![
        first.await.unwrap().unwrap().into_body(),
        second.await.unwrap().unwrap().into_body(),
    ];
    bodies.sort();
    assert_eq!(bodies, ["a", "b"]);
    assert_eq!(layer.session("s1").unwrap().backend.as_str(), "b");
    assert_eq!(stored_backend(&store, "s1").await, "b");
    assert_eq!(layer.stats().created, 1);
}

#[tokio::test]
async fn store_errors_never_fail_requests() {
    let c = cluster();
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), Down);
    let req = || session("s");
    let home = send(&svc, req()).await.unwrap().into_body();
    assert_eq!(send(&svc, req()).await.unwrap().body(), &home);
    let stats = layer.stats();
    // The load failed, so nothing is saved over a record the store may
    // hold.
    assert_eq!(stats.store_errors, 1, "one load: {stats:?}");
    assert!(layer.restore().await.unwrap_err().is_unavailable());
}

#[test]
fn no_input_panics() {
    use proptest::prelude::*;
    let c = cluster();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cookie_layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()));
    let header_layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"));
    let learn_layer = StickyLayer::new(&c.pool, SessionKey::learn_cookie("JSESSIONID"));
    let stacks: Vec<_> = [cookie_layer, header_layer, learn_layer]
        .into_iter()
        .map(|l| stack(&c.pool, l))
        .collect();
    // Every byte a header value may hold: tab, visible ASCII and space,
    // and obs-text.
    let valid: Vec<u8> = std::iter::once(b'\t')
        .chain(0x20u8..0x7f)
        .chain(0x80u8..=0xff)
        .collect();
    let byte = proptest::sample::select(valid);
    let named = |name: &[u8], bytes: &[u8]| {
        HeaderValue::from_bytes(&[name, bytes].concat()).expect("a valid header value")
    };
    proptest!(ProptestConfig::with_cases(256), |(bytes in proptest::collection::vec(byte.clone(), 0..2048))| {
        let value = HeaderValue::from_bytes(&bytes).expect("a valid header value");
        for svc in &stacks {
            let req = Request::builder()
                .header(COOKIE, value.clone())
                .header(COOKIE, named(b"srv=", &bytes))
                .header(COOKIE, named(b"JSESSIONID=", &bytes))
                .header("x-session-id", value.clone())
                .body(())
                .unwrap();
            let res = rt.block_on(send(svc, req));
            prop_assert!(res.is_ok());
        }
    });

    // A valid signed cookie with a few bytes changed, cut short, or
    // doubled: past the first checks, into the decoding and the signature.
    let issued = rt.block_on(send(&stacks[0], Request::new(()))).unwrap();
    let signed = issued.headers()[SET_COOKIE].as_bytes();
    let signed = signed.split(|&b| b == b';').next().unwrap().to_vec();
    let len = signed.len();
    proptest!(ProptestConfig::with_cases(512), |(
        changes in proptest::collection::vec((0..len, byte.clone()), 0..4),
        cut in 0..=len,
        twice in any::<bool>(),
    )| {
        let mut value = signed.clone();
        for (at, b) in changes {
            value[at] = b;
        }
        value.truncate(cut.max(4));
        if twice {
            value = [&value[..], b"; ", &value[..]].concat();
        }
        let value = HeaderValue::from_bytes(&value).expect("a valid header value");
        let req = Request::builder().header(COOKIE, value).body(()).unwrap();
        prop_assert!(rt.block_on(send(&stacks[0], req)).is_ok());
    });
}

#[tokio::test]
async fn a_failed_only_backend_is_tried_again() {
    let fail = Arc::new(AtomicBool::new(false));
    let pool = Pool::new();
    pool.insert("solo", backend("solo", fail.clone()));
    let layer = StickyLayer::new(&pool, SessionKey::header("x-session-id"));
    let svc = stack(&pool, layer.clone());
    let req = || session("s");
    send(&svc, req()).await.unwrap();
    fail.store(true, Ordering::SeqCst);
    assert!(send(&svc, req()).await.is_err());
    fail.store(false, Ordering::SeqCst);
    // Nowhere else to go: the session's own backend gets the next request.
    assert_eq!(send(&svc, req()).await.unwrap().body(), "solo");
    assert_eq!(layer.stats().moved, 0);
}

#[tokio::test]
async fn a_failed_backend_is_tried_again_when_the_others_are_full() {
    let fail = Arc::new(AtomicBool::new(false));
    let pool = Pool::new();
    pool.insert("home", backend("home", fail.clone()));
    pool.insert("busy", backend("busy", Arc::new(AtomicBool::new(false))));
    let busy = pool.state(&"busy".into()).unwrap();
    let layer = StickyLayer::new(&pool, SessionKey::header("x-session-id"));
    let svc = stack(&pool, layer.clone());
    // Start the session on "home": "busy" is full meanwhile.
    busy.set_max_in_flight(Some(1));
    let _held = busy.track_in_flight();
    assert_eq!(send(&svc, session("s")).await.unwrap().body(), "home");
    fail.store(true, Ordering::SeqCst);
    assert!(send(&svc, session("s")).await.is_err());
    fail.store(false, Ordering::SeqCst);
    // The only other backend has no room: the session's own backend gets
    // the next request rather than nobody.
    assert_eq!(send(&svc, session("s")).await.unwrap().body(), "home");
    assert_eq!(layer.stats().moved, 0);
}

#[tokio::test]
async fn strict_mode_lets_a_draining_backend_finish_its_sessions() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).strict(true);
    let svc = stack(&c.pool, layer.clone());
    let home = send(&svc, session("s1")).await.unwrap().into_body();
    let state = c.pool.state(&home.as_str().into()).unwrap();

    state.set_admin(AdminStatus::Draining);
    for _ in 0..3 {
        assert_eq!(send(&svc, session("s1")).await.unwrap().body(), &home);
    }
    // No new session starts there.
    for i in 0..6 {
        let res = send(&svc, session(format!("new-{i}"))).await.unwrap();
        assert_ne!(res.body(), &home);
    }
    assert_eq!(layer.stats().strict_refusals, 0);
    assert_eq!(layer.stats().moved, 0);

    // Draining but unhealthy, or disabled: the session cannot finish there.
    state.set_health(HealthStatus::Unhealthy);
    let err = send(&svc, session("s1")).await.unwrap_err();
    assert!(err.downcast_ref::<SessionUnavailable>().is_some(), "{err}");
    state.set_health(HealthStatus::Healthy);
    state.set_admin(AdminStatus::Disabled);
    let err = send(&svc, session("s1")).await.unwrap_err();
    assert!(err.downcast_ref::<SessionUnavailable>().is_some(), "{err}");
    assert_eq!(layer.stats().strict_refusals, 2);
}

/// A kernel's record: on `backend`, with the data needed to reconnect.
fn kernel(key: &str, backend: &str) -> Session {
    Session::new(key, backend.into()).with_data(serde_json::json!({"port": 5000}))
}

/// A zero idle timeout keeps sessions until the table is full, rather
/// than dropping each as soon as it is made.
#[tokio::test(start_paused = true)]
async fn a_zero_idle_timeout_never_expires_sessions() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()))
        .idle_timeout(Duration::ZERO);
    let svc = stack(&c.pool, layer.clone());
    let first = send(&svc, Request::new(())).await.unwrap();
    let cookie = cookie_of(&first).unwrap();
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(400 * 24 * 3600)).await;
        let again = send(&svc, with_cookie(&cookie)).await.unwrap();
        assert_eq!(again.body(), first.body());
    }
    let stats = layer.stats();
    assert_eq!(
        (stats.sessions, stats.expired, stats.misses),
        (1, 0, 0),
        "{stats:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn standalone_reads_the_record_of_a_session_that_went_idle() {
    let c = cluster();
    let store = MemoryStore::new();
    let stored = kernel("k1", "c");
    store.save(&stored).await.unwrap();
    let restores = Arc::new(AtomicUsize::new(0));
    let counted = restores.clone();
    let moves = Moves::default();
    let layer = standalone(&c.pool, &store)
        .idle_timeout(Duration::from_secs(60))
        .on_move(moves.hook())
        .on_restore(move |_: Session| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<(), BoxError>(()))
        });
    assert_eq!(layer.restore().await.unwrap().restored, ["k1"]);
    let svc = stack(&c.pool, layer.clone());
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "c");

    tokio::time::advance(Duration::from_secs(61)).await;
    // Gone from the table: the next request reads its record, which is
    // left as it was.
    for _ in 0..3 {
        assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "c");
    }
    let kept = store.load("k1").await.unwrap().unwrap();
    assert_eq!(kept.backend.as_str(), "c");
    assert_eq!(kept.data["port"], 5000);
    assert_eq!(kept.created, stored.created);
    assert_eq!(layer.stats().loaded, 1);
    assert_eq!(restores.load(Ordering::SeqCst), 1, "restored at start only");

    // It moves with its data.
    c.set_health("c", HealthStatus::Unhealthy);
    let moved = send(&svc, session("k1")).await.unwrap().into_body();
    assert_ne!(moved, "c");
    let kept = store.load("k1").await.unwrap().unwrap();
    assert_eq!(kept.backend.as_str(), moved);
    assert_eq!(kept.data["port"], 5000);
    assert_eq!(kept.created, stored.created);
    let all = moves.all();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].session.data["port"], 5000);
}

#[tokio::test]
async fn standalone_reads_the_records_restore_had_no_room_for() {
    let c = cluster();
    let store = MemoryStore::new();
    let sid = |i: usize| format!("{i:0>22}");
    for i in 0..4 {
        store.save(&kernel(&sid(i), "b")).await.unwrap();
    }
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()))
        .store(store.clone())
        .availability(Availability::Standalone)
        .max_sessions(1)
        .on_move(moves.hook());
    assert_eq!(layer.restore().await.unwrap().restored.len(), 4);
    assert_eq!(layer.stats().sessions, 1, "three were evicted");
    let svc = stack(&c.pool, layer.clone());
    let cookie = |i: usize| format!("srv={}", sign("srv", &sid(i), "b"));
    for i in 0..4 {
        assert_eq!(
            send(&svc, with_cookie(&cookie(i))).await.unwrap().body(),
            "b"
        );
    }
    // Their backend goes: each moves with the data of its record.
    c.set_health("b", HealthStatus::Unhealthy);
    for i in 0..4 {
        assert_ne!(
            send(&svc, with_cookie(&cookie(i))).await.unwrap().body(),
            "b"
        );
    }
    let all = moves.all();
    assert_eq!(all.len(), 4);
    for moved in &all {
        assert_eq!(moved.session.data["port"], 5000, "{}", moved.session.key);
    }
    for i in 0..4 {
        let kept = store.load(&sid(i)).await.unwrap().unwrap();
        assert_ne!(kept.backend.as_str(), "b");
        assert_eq!(kept.data["port"], 5000, "{}", sid(i));
    }
}

/// A `MemoryStore` whose loads fail while `down` is set.
#[derive(Clone)]
struct FlakyLoads {
    inner: MemoryStore,
    down: Arc<AtomicBool>,
    /// Saves fail while it is set (never, unless a test says).
    saves_down: Arc<AtomicBool>,
}

impl FlakyLoads {
    fn new(inner: MemoryStore) -> Self {
        FlakyLoads {
            inner,
            down: Arc::new(AtomicBool::new(true)),
            saves_down: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl SessionStore for FlakyLoads {
    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(async { Err(tower_ha::store::StoreError::unavailable("down")) });
        }
        self.inner.load(key)
    }
    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        if self.saves_down.load(Ordering::SeqCst) {
            return Box::pin(async { Err(tower_ha::store::StoreError::unavailable("down")) });
        }
        self.inner.save(session)
    }

    pass_on!(inner: load_all, delete, refresh_interval);
}

#[tokio::test]
async fn the_move_hook_runs_when_the_save_of_the_move_fails() {
    let c = cluster();
    let shared = MemoryStore::new();
    let store = FlakyLoads::new(shared.clone());
    store.down.store(false, Ordering::SeqCst);
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .on_move(moves.hook());
    let svc = stack(&c.pool, layer.clone());
    let home = send(&svc, session("s")).await.unwrap().into_body();
    store.saves_down.store(true, Ordering::SeqCst);
    c.set_health(&home, HealthStatus::Unhealthy);
    let to = send(&svc, session("s")).await.unwrap().into_body();
    assert_ne!(to, home);
    // The save failed: counted, and the hook ran all the same, since the
    // session's requests go to its new backend now.
    assert_eq!(layer.stats().store_errors, 1);
    let all = moves.all();
    assert_eq!(all.len(), 1);
    assert_eq!(
        (all[0].from.as_str(), all[0].session.backend.as_str()),
        (home.as_str(), to.as_str())
    );
    assert_eq!(send(&svc, session("s")).await.unwrap().body(), &to);
    assert_eq!(stored_backend(&shared, "s").await, home);
}

/// A session whose save failed (a move's, here) is saved again, so that
/// a restart, which reads the store, does not send it back to the
/// backend it left: by its first request 5 s after the failure or more,
/// or by a flush.
#[tokio::test(start_paused = true)]
async fn a_move_whose_save_failed_is_saved_again() {
    let c = cluster();
    let shared = MemoryStore::new();
    let store = FlakyLoads::new(shared.clone());
    store.down.store(false, Ordering::SeqCst);
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).store(store.clone());
    let svc = stack(&c.pool, layer.clone());
    // Four sessions on three backends: two share one, which goes down.
    let mut on: HashMap<String, Vec<String>> = HashMap::new();
    for key in ["s0", "s1", "s2", "s3"] {
        let home = send(&svc, session(key)).await.unwrap().into_body();
        on.entry(home).or_default().push(key.to_owned());
    }
    let (home, keys) = on.into_iter().find(|(_, keys)| keys.len() > 1).unwrap();
    store.saves_down.store(true, Ordering::SeqCst);
    c.set_health(&home, HealthStatus::Unhealthy);
    let mut moved_to = Vec::new();
    for key in &keys[..2] {
        let to = send(&svc, session(key.as_str())).await.unwrap().into_body();
        assert_ne!(to, home);
        moved_to.push(to);
    }
    assert_eq!(layer.stats().store_errors, 2);
    store.saves_down.store(false, Ordering::SeqCst);
    // Lets the writes a request queued land.
    let landed = || tokio::time::sleep(Duration::from_millis(1));

    tokio::time::sleep(Duration::from_secs(4)).await;
    send(&svc, session(keys[0].as_str())).await.unwrap();
    landed().await;
    assert_eq!(stored_backend(&shared, &keys[0]).await, home, "not due yet");
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(&svc, session(keys[0].as_str())).await.unwrap();
    landed().await;
    assert_eq!(stored_backend(&shared, &keys[0]).await, moved_to[0]);

    assert_eq!(stored_backend(&shared, &keys[1]).await, home);
    layer.flush().await;
    assert_eq!(stored_backend(&shared, &keys[1]).await, moved_to[1]);
    assert_eq!(layer.stats().store_errors, 2);
}

#[tokio::test(start_paused = true)]
async fn forgetting_all_keeps_the_sessions_held_in_memory_only() {
    let c = cluster();
    let shared = MemoryStore::new();
    let store = FlakyLoads::new(shared.clone());
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).store(store.clone());
    let svc = stack(&c.pool, layer.clone());
    // Started while the store cannot be read: kept in memory, unsaved.
    let homes: Vec<String> = join_all((0..3).map(|i| send(&svc, session(format!("down-{i}")))))
        .await
        .into_iter()
        .map(|res| res.unwrap().into_body())
        .collect();
    // Started once it reads again: saved.
    store.down.store(false, Ordering::SeqCst);
    let saved = send(&svc, session("up")).await.unwrap().into_body();
    assert_eq!(stored_backend(&shared, "up").await, saved);
    // A notice subscription that reconnects forgets everything: only what
    // the store holds.
    assert_eq!(layer.forget_all(), 1);
    assert!(layer.session("up").is_none());
    // The others stay where they are, read from the store at their next
    // request and saved there, since it has no record of them.
    for (i, home) in homes.iter().enumerate() {
        let key = format!("down-{i}");
        assert_eq!(
            send(&svc, session(key.as_str())).await.unwrap().body(),
            home
        );
        layer.flush().await;
        let stored = shared.load(&key).await.unwrap().expect("saved once read");
        assert_eq!(stored.backend.as_str(), home);
    }
    assert_eq!(send(&svc, session("up")).await.unwrap().body(), &saved);
    assert_eq!(layer.stats().moved, 0);
}

#[tokio::test]
async fn a_learned_cookie_deleted_after_a_failed_load_keeps_its_record() {
    let c = cluster();
    let shared = MemoryStore::new();
    shared.save(&kernel("k", "a")).await.unwrap();
    let store = FlakyLoads::new(shared.clone());
    let (layer, svc) = instance(&c, SessionKey::learn_cookie("JSESSIONID"), store.clone());
    // The load fails; the backend that gets the request does not know
    // the session and clears the cookie.
    send(&svc, logout_of("JSESSIONID=k")).await.unwrap();
    assert_eq!(layer.stats().sessions, 0, "the binding is dropped");
    let kept = shared.load("k").await.unwrap().expect("the record is kept");
    assert_eq!(kept.backend.as_str(), "a");
    assert_eq!(kept.data["port"], 5000);

    // A session the layer read is ended by the same answer.
    store.down.store(false, Ordering::SeqCst);
    assert_eq!(
        send(&svc, logout_of("JSESSIONID=k")).await.unwrap().body(),
        "a"
    );
    assert!(shared.load("k").await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_failed_load_is_tried_again_and_the_record_then_wins() {
    let c = cluster();
    let shared = MemoryStore::new();
    shared.save(&kernel("k", "c")).await.unwrap();
    let store = FlakyLoads::new(shared.clone());
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .on_move(moves.hook());
    let svc = stack(&c.pool, layer.clone());
    // The store is down: kept in memory on round robin's pick.
    let first = send(&svc, session("k")).await.unwrap().into_body();
    assert_ne!(first, "c");
    assert_eq!(send(&svc, session("k")).await.unwrap().body(), &first);
    assert_eq!(layer.stats().store_errors, 1);
    // Still down a while later: read again, and still kept where it was.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(send(&svc, session("k")).await.unwrap().body(), &first);
    assert_eq!(layer.stats().store_errors, 2, "read again");
    assert_eq!(send(&svc, session("k")).await.unwrap().body(), &first);
    assert_eq!(layer.stats().store_errors, 2, "not on every request");
    // The store is back: the record names the session's backend.
    store.down.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(10)).await;
    for _ in 0..3 {
        assert_eq!(send(&svc, session("k")).await.unwrap().body(), "c");
    }
    let kept = shared.load("k").await.unwrap().unwrap();
    assert_eq!(
        (kept.backend.as_str(), &kept.data["port"]),
        ("c", &5000.into())
    );
    // Its moves are saved, with its data, and handed to the hook.
    c.set_health("c", HealthStatus::Unhealthy);
    let moved = send(&svc, session("k")).await.unwrap().into_body();
    assert_ne!(moved, "c");
    let kept = shared.load("k").await.unwrap().unwrap();
    assert_eq!(
        (kept.backend.as_str(), &kept.data["port"]),
        (moved.as_str(), &5000.into())
    );
    let all = moves.all();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].session.data["port"], 5000);
}

#[tokio::test(start_paused = true)]
async fn a_session_kept_in_memory_is_saved_once_the_store_has_no_record() {
    let c = cluster();
    let shared = MemoryStore::new();
    let store = FlakyLoads::new(shared.clone());
    let (_, svc) = instance(&c, SessionKey::header("x-session-id"), store.clone());
    let first = send(&svc, session("k")).await.unwrap().into_body();
    assert!(
        shared.is_empty(),
        "nothing saved over what the store may hold"
    );
    store.down.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(10)).await;
    // Read again: no record, so the session stays where it is and is saved.
    assert_eq!(send(&svc, session("k")).await.unwrap().body(), &first);
    let saved = shared.load("k").await.unwrap().expect("saved");
    assert_eq!(saved.backend.as_str(), first);
    assert_eq!(send(&svc, session("k")).await.unwrap().body(), &first);
}

/// Whether a request was refused because its session's record could not
/// be read.
fn unreadable(res: Result<Response<String>, BoxError>) -> bool {
    res.unwrap_err()
        .downcast_ref::<SessionUnavailable>()
        .is_some_and(SessionUnavailable::is_unreadable)
}

/// With a store whose records expire, the keys strict mode knows to be
/// stored are forgotten once their records have had time to expire: no
/// key of the past is refused for good, and the set does not grow for
/// ever.
#[tokio::test(start_paused = true)]
async fn standalone_strict_forgets_the_keys_of_records_that_expired() {
    let c = cluster();
    let ttl = Duration::from_secs(100);
    let store = FlakyLoads::new(MemoryStore::new().with_ttl(ttl));
    let layer = standalone(&c.pool, &store)
        .strict(true)
        .idle_timeout(Duration::from_secs(10));
    let svc = stack(&c.pool, layer.clone());
    layer.restore().await.unwrap();
    store.down.store(false, Ordering::SeqCst);
    send(&svc, session("old")).await.unwrap();
    store.down.store(true, Ordering::SeqCst);
    // Out of the table, and its record may still be stored: refused.
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(unreadable(send(&svc, session("old")).await));
    // Left alone for twice the TTL, the record has expired: a new session.
    tokio::time::advance(2 * ttl).await;
    assert!(send(&svc, session("old")).await.is_ok());
    assert_eq!(layer.stats().strict_refusals, 1);
}

/// A key whose record is only ever loaded (one request at a time, each
/// after the session idled out of the table) keeps its record alive, as
/// loads renew records: strict mode goes on refusing it while the store
/// cannot be read, however long ago it was last saved.
#[tokio::test(start_paused = true)]
async fn standalone_strict_keeps_refusing_a_key_whose_loads_keep_its_record() {
    let c = cluster();
    let ttl = Duration::from_secs(100);
    let inner = MemoryStore::new().with_ttl(ttl);
    inner.save(&kernel("k1", "c")).await.unwrap();
    let store = FlakyLoads::new(inner.clone());
    let layer = standalone(&c.pool, &store)
        .strict(true)
        .idle_timeout(Duration::from_secs(10));
    let svc = stack(&c.pool, layer.clone());
    layer.restore().await.unwrap();
    store.down.store(false, Ordering::SeqCst);
    // Every minute, a miss that loads (and so renews) the record.
    for _ in 0..6 {
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "c");
    }
    assert_eq!(layer.stats().loaded, 6);
    store.down.store(true, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(unreadable(send(&svc, session("k1")).await));
    // The record is still there, on its backend.
    store.down.store(false, Ordering::SeqCst);
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "c");
}

#[tokio::test(start_paused = true)]
async fn standalone_strict_refuses_only_the_keys_that_may_have_a_record() {
    let c = cluster();
    let shared = MemoryStore::new();
    shared.save(&kernel("k1", "c")).await.unwrap();
    // Loads fail while `down` is set; restore's load_all works.
    let store = FlakyLoads::new(shared.clone());
    let layer = standalone(&c.pool, &store)
        .strict(true)
        .idle_timeout(Duration::from_secs(60));
    let svc = stack(&c.pool, layer.clone());
    // Before restore() nothing tells a new key from a stored one.
    assert!(unreadable(send(&svc, session("new-0")).await));
    layer.restore().await.unwrap();
    // A session started since restore() is saved.
    store.down.store(false, Ordering::SeqCst);
    let s2 = send(&svc, session("s2")).await.unwrap().into_body();
    assert!(shared.load("s2").await.unwrap().is_some());
    store.down.store(true, Ordering::SeqCst);
    // Both leave the table; their records cannot be read: refused.
    tokio::time::advance(Duration::from_secs(61)).await;
    for key in ["k1", "s2"] {
        assert!(unreadable(send(&svc, session(key)).await), "{key}");
    }
    // A key this instance never stored is a new session, which no refusal
    // could keep on its backend: served, in memory only, and kept there
    // while the store stays down.
    let mut homes = Vec::new();
    for i in 0..3 {
        let home = send(&svc, session(format!("new-{i}"))).await.unwrap();
        homes.push(home.into_body());
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    for (i, home) in homes.iter().enumerate() {
        let res = send(&svc, session(format!("new-{i}"))).await.unwrap();
        assert_eq!(res.body(), home);
    }
    let stats = layer.stats();
    assert_eq!(stats.strict_refusals, 3, "{stats:?}");
    assert_eq!(stats.moved, 0);
    assert!(shared.load("new-0").await.unwrap().is_none());
    // The store is back: the stored sessions go to their backends.
    store.down.store(false, Ordering::SeqCst);
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "c");
    assert_eq!(send(&svc, session("s2")).await.unwrap().body(), &s2);
}

#[tokio::test(start_paused = true)]
async fn a_session_kept_in_memory_moves_as_itself_once_the_store_has_no_record() {
    let c = cluster();
    let shared = MemoryStore::new();
    let store = FlakyLoads::new(shared.clone());
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .on_move(moves.hook());
    let svc = stack(&c.pool, layer.clone());
    // The store is down: both are kept in memory where round robin sent them.
    let gone = send(&svc, session("k1")).await.unwrap().into_body();
    let failing = send(&svc, session("k2")).await.unwrap().into_body();
    assert_ne!(gone, failing);
    // k1's backend becomes unavailable; k2's fails its next request.
    c.fail[failing.as_str()].store(true, Ordering::SeqCst);
    assert!(send(&svc, session("k2")).await.is_err());
    c.fail[failing.as_str()].store(false, Ordering::SeqCst);
    c.set_health(&gone, HealthStatus::Unhealthy);
    // The store is back, with no record of either: each is read again and
    // moves as the session it is.
    store.down.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(10)).await;
    let k1 = send(&svc, session("k1")).await.unwrap().into_body();
    let k2 = send(&svc, session("k2")).await.unwrap().into_body();
    assert_ne!(k1, gone);
    assert_ne!(k2, failing);
    let all = moves.all();
    assert_eq!(all.len(), 2, "{all:?}");
    let reason = |key: &str| all.iter().find(|m| m.session.key == key).unwrap().reason;
    assert_eq!(reason("k1"), MoveReason::Unavailable);
    assert_eq!(reason("k2"), MoveReason::Failed);
    let stats = layer.stats();
    assert_eq!((stats.moved, stats.created), (2, 2), "{stats:?}");
    // Saved where they went, and they stay there.
    for (key, home) in [("k1", &k1), ("k2", &k2)] {
        let saved = shared.load(key).await.unwrap().expect("saved");
        assert_eq!(&saved.backend.as_str(), home);
        assert_eq!(send(&svc, session(key)).await.unwrap().body(), home);
    }
    assert_eq!(moves.all().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_session_kept_in_memory_leaves_its_failed_backend_when_read_again() {
    let c = cluster();
    let store = FlakyLoads::new(MemoryStore::new());
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), store.clone());
    let home = send(&svc, session("k")).await.unwrap().into_body();
    c.fail[home.as_str()].store(true, Ordering::SeqCst);
    assert!(send(&svc, session("k")).await.is_err());
    // Read again while the store is still down: the session stays in
    // memory, and off the backend that failed it.
    tokio::time::advance(Duration::from_secs(10)).await;
    let moved = send(&svc, session("k")).await.unwrap().into_body();
    assert_ne!(moved, home);
    assert_eq!(layer.stats().moved, 1);
    assert_eq!(layer.stats().store_errors, 2);
}

/// As above, but the store, read again, holds the session's record on the
/// backend that failed it (saved there by another replica): it stays off
/// that backend all the same.
#[tokio::test(start_paused = true)]
async fn a_session_kept_in_memory_leaves_its_failed_backend_when_its_record_is_found() {
    let c = cluster();
    let shared = MemoryStore::new();
    let store = FlakyLoads::new(shared.clone());
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), store.clone());
    let home = send(&svc, session("k")).await.unwrap().into_body();
    shared.save(&kernel("k", &home)).await.unwrap();
    c.fail[home.as_str()].store(true, Ordering::SeqCst);
    assert!(send(&svc, session("k")).await.is_err());
    store.down.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(10)).await;
    let moved = send(&svc, session("k")).await.unwrap().into_body();
    assert_ne!(moved, home);
    assert_eq!(layer.stats().moved, 1);
}

/// Session `k`, started by header while the store could not be read, so
/// kept in memory only; the store reads again and 10 s have passed. The
/// store (behind the loads that failed), the layer's service and the
/// session's backend.
async fn kept_in_memory<S>(c: &Cluster<S>) -> (MemoryStore, Sticky<Balance<S, RoundRobin>>, String)
where
    S: Service<Request<()>, Response = Response<String>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    let shared = MemoryStore::new();
    let store = FlakyLoads::new(shared.clone());
    let (_, svc) = instance(c, SessionKey::header("x-session-id"), store.clone());
    let home = send(&svc, session("k")).await.unwrap().into_body();
    store.down.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(10)).await;
    (shared, svc, home)
}

#[tokio::test(start_paused = true)]
async fn a_session_kept_in_memory_is_saved_by_its_first_answered_request() {
    let c = cluster();
    let (shared, svc, home) = kept_in_memory(&c).await;
    // Read again, no record: an invalid request fails, so nothing is saved
    // and the next request reads the store again.
    let invalid = Request::builder()
        .header("x-session-id", "k")
        .header("x-invalid", "1")
        .body(())
        .unwrap();
    assert!(send(&svc, invalid).await.is_err());
    assert!(shared.is_empty());
    assert_eq!(send(&svc, session("k")).await.unwrap().body(), &home);
    let saved = shared.load("k").await.unwrap().expect("saved");
    assert_eq!(saved.backend.as_str(), home);
}

#[tokio::test]
async fn strict_mode_refuses_a_session_whose_record_cannot_be_read() {
    let c = cluster();
    let shared = MemoryStore::new();
    shared.save(&kernel("k", "c")).await.unwrap();
    let store = FlakyLoads::new(shared.clone());
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .strict(true);
    let svc = stack(&c.pool, layer.clone());
    for _ in 0..2 {
        let err = send(&svc, session("k")).await.unwrap_err();
        let refused = err
            .downcast_ref::<SessionUnavailable>()
            .expect("typed error");
        assert_eq!(refused.key(), "k");
        assert!(refused.is_unreadable());
        assert_eq!(refused.backend(), None, "nothing names a backend");
        // Why, from the store.
        let cause = std::error::Error::source(refused).expect("the store's error");
        let cause = cause
            .downcast_ref::<tower_ha::store::StoreError>()
            .expect("a store error");
        assert!(cause.is_unavailable(), "{cause:?}");
    }
    assert_eq!(layer.stats().strict_refusals, 2);
    assert_eq!(
        layer.stats().store_errors,
        2,
        "each request reads the store"
    );
    assert_eq!(layer.stats().sessions, 0);
    store.down.store(false, Ordering::SeqCst);
    assert_eq!(send(&svc, session("k")).await.unwrap().body(), "c");
    assert_eq!(shared.load("k").await.unwrap().unwrap().data["port"], 5000);
}

/// A memory store whose saves naming backend `a` each wait for a permit,
/// as a slow store (a webhook backing off) would.
#[derive(Clone)]
struct SlowSavesOfA {
    inner: MemoryStore,
    permits: Arc<tokio::sync::Semaphore>,
    started: Arc<AtomicUsize>,
}

impl SlowSavesOfA {
    fn new() -> Self {
        SlowSavesOfA {
            inner: MemoryStore::new(),
            permits: Arc::new(tokio::sync::Semaphore::new(0)),
            started: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Yields until a save of `a` has started.
    async fn a_save_started(&self) {
        spin_until("a save of a starts", || {
            self.started.load(Ordering::SeqCst) > 0
        })
        .await;
    }
}

impl SessionStore for SlowSavesOfA {
    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if session.backend.as_str() == "a" {
                self.started.fetch_add(1, Ordering::SeqCst);
                self.permits.acquire().await.unwrap().forget();
            }
            self.inner.save(session).await
        })
    }

    pass_on!(inner: load_all, load, delete);
}

#[tokio::test]
async fn a_move_saved_while_the_start_is_still_saving_lands_last() {
    let c = cluster();
    let store = SlowSavesOfA::new();
    let (_, svc) = instance(&c, SessionKey::header("x-session-id"), store.clone());
    // The session starts on `a`, whose save is slow.
    let start = tokio::spawn(send_owned(svc.clone(), session("k")));
    store.a_save_started().await;
    // Meanwhile `a` goes down: the next request moves the session to `b`.
    c.set_health("a", HealthStatus::Unhealthy);
    let moved = tokio::spawn(send_owned(svc.clone(), session("k")));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        !moved.is_finished(),
        "the move's save waits for the start's"
    );
    store.permits.add_permits(1);
    assert_eq!(start.await.unwrap().unwrap().body(), "a");
    assert_eq!(moved.await.unwrap().unwrap().body(), "b");
    // The record names where the session is, not where it started.
    let record = store.inner.load("k").await.unwrap().unwrap();
    assert_eq!(record.backend.as_str(), "b");
}

#[tokio::test]
async fn a_save_outlives_the_request_that_made_it() {
    let c = cluster();
    let store = SlowSavesOfA::new();
    let (_, svc) = instance(&c, SessionKey::header("x-session-id"), store.clone());
    let request = tokio::spawn(send_owned(svc.clone(), session("k")));
    store.a_save_started().await;
    // The client goes away while its session is being saved.
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    store.permits.add_permits(1);
    let mut record = None;
    for _ in 0..1000 {
        tokio::task::yield_now().await;
        record = store.inner.load("k").await.unwrap();
        if record.is_some() {
            break;
        }
    }
    let record = record.expect("the save landed after the request was gone");
    assert_eq!(record.backend.as_str(), "a");
}

/// A store that counts saves and whose records would expire unless saved
/// again every `every`.
#[derive(Clone)]
struct Expiring {
    inner: MemoryStore,
    saves: Arc<AtomicUsize>,
    every: Option<Duration>,
}

impl SessionStore for Expiring {
    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        self.saves.fetch_add(1, Ordering::SeqCst);
        self.inner.save(session)
    }
    fn refresh_interval(&self) -> Option<Duration> {
        self.every
    }

    pass_on!(inner: load_all, load, delete);
}

#[tokio::test(start_paused = true)]
async fn a_session_in_use_is_saved_again_as_often_as_its_store_asks() {
    let c = cluster();
    let store = |every| Expiring {
        inner: MemoryStore::new(),
        saves: Arc::default(),
        every,
    };
    let expiring = store(Some(Duration::from_secs(60)));
    let (_, svc) = instance(&c, SessionKey::header("x-session-id"), expiring.clone());
    let lasting = store(None);
    let (_, plain) = instance(&c, SessionKey::header("x-session-id"), lasting.clone());
    let off = store(Some(Duration::from_secs(60)));
    let (_, turned_off) = {
        let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
            .store(off.clone())
            .refresh_every(Duration::ZERO);
        (layer.clone(), stack(&c.pool, layer))
    };
    let all = [(&expiring, &svc), (&lasting, &plain), (&off, &turned_off)];
    let send_all = || async {
        for (_, svc) in all {
            let served = send(svc, session("s")).await.unwrap();
            assert_eq!(served.body(), "a");
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    };
    let saves = || all.map(|(store, _)| store.saves.load(Ordering::SeqCst));

    send_all().await;
    assert_eq!(saves(), [1, 1, 1], "started");
    tokio::time::advance(Duration::from_secs(59)).await;
    send_all().await;
    assert_eq!(saves(), [1, 1, 1]);
    tokio::time::advance(Duration::from_secs(2)).await;
    send_all().await;
    assert_eq!(saves(), [2, 1, 1], "saved again, once, in the background");
    send_all().await;
    assert_eq!(saves(), [2, 1, 1]);
    let record = expiring.inner.load("s").await.unwrap().unwrap();
    assert_eq!(record.backend.as_str(), "a");
}

#[tokio::test(start_paused = true)]
async fn a_store_with_a_ttl_keeps_the_records_of_sessions_in_use_only() {
    let c = cluster();
    let ttl = Duration::from_secs(60);
    let store = MemoryStore::new().with_ttl(ttl);
    let (_, svc) = instance(&c, SessionKey::header("x-session-id"), store.clone());
    for key in ["busy", "gone"] {
        send(&svc, session(key)).await.unwrap();
    }
    support::health_mock::settle().await;
    assert_eq!(store.len(), 2);
    // "busy" is used every 20 s for ten minutes; "gone" never again.
    for _ in 0..30 {
        tokio::time::advance(Duration::from_secs(20)).await;
        send(&svc, session("busy")).await.unwrap();
        support::health_mock::settle().await;
    }
    let busy = store
        .load("busy")
        .await
        .unwrap()
        .expect("kept alive by its use");
    assert_eq!(busy.backend.as_str(), "a");
    assert!(store.load("gone").await.unwrap().is_none());
    assert_eq!(store.len(), 1, "the unused session's record was swept out");
}

/// A `refresh_every` longer than the store's records live would let the
/// record of a session in use expire between two refreshes: the layer
/// refreshes as often as the store asks instead.
#[tokio::test(start_paused = true)]
async fn a_refresh_interval_longer_than_the_stores_ttl_keeps_a_record_in_use() {
    let c = cluster();
    let store = MemoryStore::new().with_ttl(Duration::from_secs(60));
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .refresh_every(Duration::from_secs(3600));
    let svc = stack(&c.pool, layer);
    send(&svc, session("busy")).await.unwrap();
    for _ in 0..30 {
        tokio::time::advance(Duration::from_secs(20)).await;
        send(&svc, session("busy")).await.unwrap();
        support::health_mock::settle().await;
    }
    let busy = store.load("busy").await.unwrap();
    assert_eq!(busy.expect("kept alive by its use").backend.as_str(), "a");
}

#[tokio::test]
async fn the_layers_cookie_is_found_behind_a_foreign_one_of_the_same_name() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()));
    let svc = stack(&c.pool, layer.clone());
    let first = send(&svc, Request::new(())).await.unwrap();
    let ours = cookie_of(&first).unwrap();
    // A cookie of the same name set for a sibling domain or a longer path
    // comes first in the browser's header.
    let foreign = "srv=set-by-another-app";
    for header in [
        format!("{foreign}; {ours}"),
        format!("a=1; {foreign}; b=2; {ours}; c=3"),
    ] {
        let res = send(&svc, with_cookie(&header)).await.unwrap();
        assert_eq!(res.body(), first.body(), "{header}");
        assert!(cookie_of(&res).is_none(), "no new session: {header}");
    }
    // In a second Cookie line too.
    let req = Request::builder()
        .header(COOKIE, foreign)
        .header(COOKIE, ours.as_str())
        .body(())
        .unwrap();
    let res = send(&svc, req).await.unwrap();
    assert_eq!(res.body(), first.body());
    assert_eq!(layer.stats().created, 1);
    assert_eq!(layer.stats().rejected, 0, "not counted while ours is found");

    // Only a few are looked at: each costs a MAC.
    let many = format!("{foreign}; {foreign}; {foreign}; {foreign}; {ours}");
    let res = send(&svc, with_cookie(&many)).await.unwrap();
    assert!(cookie_of(&res).is_some(), "a new session");
    assert_eq!(layer.stats().rejected, 1);
}

/// A signed cookie of a session the layer no longer knows, on a backend
/// gone from the pool (left on a longer path by an older setup), does not
/// hide the current cookie sent after it.
#[tokio::test]
async fn a_stale_cookie_on_a_departed_backend_does_not_hide_the_current_one() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()));
    let svc = stack(&c.pool, layer.clone());
    let first = send(&svc, Request::new(())).await.unwrap();
    let stale = format!("srv={}", sign("srv", "AAAAAAAAAAAAAAAAAAAAAA", "gone"));
    stays_behind(&svc, &stale, &first).await;
    assert_eq!(layer.stats().created, 1);
    // Alone, it starts a new session, as before.
    let res = send(&svc, with_cookie(&stale)).await.unwrap();
    assert!(cookie_of(&res).is_some());
    assert_eq!(layer.stats().created, 2);

    // Through a replica whose table has never seen the current session:
    // its record is read from the store.
    let store = MemoryStore::new();
    let (_, a) = instance(
        &c,
        SessionKey::insert_cookie(insert_cookie()),
        store.clone(),
    );
    let (b_layer, b) = instance(&c, SessionKey::insert_cookie(insert_cookie()), store);
    let first = send(&a, Request::new(())).await.unwrap();
    stays_behind(&b, &stale, &first).await;
    assert_eq!(b_layer.stats().created, 0);
}

/// Requests with `stale` first and then `first`'s cookie go where `first`
/// went, and start no session.
async fn stays_behind<S>(svc: &S, stale: &str, first: &Response<String>)
where
    S: Service<Request<()>, Response = Response<String>, Error = BoxError> + Clone,
{
    let ours = cookie_of(first).unwrap();
    for _ in 0..3 {
        let res = send(svc, with_cookie(&format!("{stale}; {ours}")))
            .await
            .unwrap();
        assert_eq!(res.body(), first.body());
        assert!(cookie_of(&res).is_none(), "no new session");
    }
}

#[tokio::test(start_paused = true)]
async fn a_cookie_with_a_max_age_is_sent_again_while_its_session_is_used() {
    let c = cluster();
    let cookie = insert_cookie().max_age(Duration::from_secs(60));
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(cookie));
    let svc = stack(&c.pool, layer.clone());
    let first = send(&svc, Request::new(())).await.unwrap();
    let value = cookie_of(&first).unwrap();
    let set_cookie = |res: &Response<String>| {
        res.headers()
            .get(SET_COOKIE)
            .map(|v| v.to_str().unwrap().to_owned())
    };

    tokio::time::advance(Duration::from_secs(29)).await;
    let res = send(&svc, with_cookie(&value)).await.unwrap();
    assert_eq!(set_cookie(&res), None, "not yet half its Max-Age old");
    tokio::time::advance(Duration::from_secs(2)).await;
    let res = send(&svc, with_cookie(&value)).await.unwrap();
    assert_eq!(res.body(), first.body());
    let renewed = set_cookie(&res).expect("sent again past half its Max-Age");
    assert!(renewed.starts_with(&format!("{value}; ")), "{renewed}");
    assert!(renewed.contains("Max-Age=60"));
    // Once per half Max-Age.
    let res = send(&svc, with_cookie(&value)).await.unwrap();
    assert_eq!(set_cookie(&res), None);
    assert_eq!(layer.stats().created, 1);

    // Without a Max-Age (a browser-session cookie), never.
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()));
    let svc = stack(&c.pool, layer);
    let value = cookie_of(&send(&svc, Request::new(())).await.unwrap()).unwrap();
    tokio::time::advance(Duration::from_secs(3600)).await;
    let res = send(&svc, with_cookie(&value)).await.unwrap();
    assert_eq!(set_cookie(&res), None);
}

/// A zero `Max-Age`, as a configuration may give, is none: a
/// browser-session cookie, not one sent with `Max-Age=1` on every response.
#[tokio::test(start_paused = true)]
async fn a_cookie_with_a_zero_max_age_ends_with_the_browser_session_and_is_not_sent_again() {
    let c = cluster();
    let cookie = insert_cookie().max_age(Duration::ZERO);
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(cookie));
    let svc = stack(&c.pool, layer.clone());
    let first = send(&svc, Request::new(())).await.unwrap();
    let line = first.headers().get(SET_COOKIE).unwrap().to_str().unwrap();
    assert!(!line.contains("Max-Age"), "{line}");
    let value = cookie_of(&first).unwrap();
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(2)).await;
        let res = send(&svc, with_cookie(&value)).await.unwrap();
        assert_eq!(res.body(), first.body());
        assert!(res.headers().get(SET_COOKIE).is_none(), "sent again");
    }
    assert_eq!(layer.stats().created, 1);
}

#[tokio::test(start_paused = true)]
async fn a_cookie_is_sent_again_when_its_session_comes_back_from_idle() {
    let c = cluster();
    let cookie = insert_cookie().max_age(Duration::from_secs(120));
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(cookie))
        .idle_timeout(Duration::from_secs(60));
    let svc = stack(&c.pool, layer.clone());
    let first = send(&svc, Request::new(())).await.unwrap();
    let value = cookie_of(&first).unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    let res = send(&svc, with_cookie(&value)).await.unwrap();
    assert!(res.headers().get(SET_COOKIE).is_none());

    // Idle out of the table, back 85 s after the cookie was sent: the
    // session is routed by its cookie, whose age the table no longer
    // knows, and the response sends it again.
    tokio::time::advance(Duration::from_secs(75)).await;
    let res = send(&svc, with_cookie(&value)).await.unwrap();
    assert_eq!(res.body(), first.body());
    assert_eq!(layer.stats().expired, 1);
    assert_eq!(cookie_of(&res), Some(value.clone()), "sent again");
    // Then not again before half its Max-Age.
    let res = send(&svc, with_cookie(&value)).await.unwrap();
    assert!(res.headers().get(SET_COOKIE).is_none());
    tokio::time::advance(Duration::from_secs(59)).await;
    let res = send(&svc, with_cookie(&value)).await.unwrap();
    assert!(res.headers().get(SET_COOKIE).is_none());
    assert_eq!(layer.stats().created, 1);
}

#[tokio::test(start_paused = true)]
async fn a_renewal_whose_request_was_dropped_falls_to_the_next_request() {
    let c = cluster();
    let cookie = insert_cookie().max_age(Duration::from_secs(60));
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(cookie));
    let svc = stack(&c.pool, layer);
    let first = send(&svc, Request::new(())).await.unwrap();
    let value = cookie_of(&first).unwrap();
    tokio::time::advance(Duration::from_secs(31)).await;
    // Due for its cookie, the request is dropped before its answer.
    let slow = Request::builder()
        .header(COOKIE, value.as_str())
        .header("x-delay-ms", "1000")
        .body(())
        .unwrap();
    let dropped = tokio::time::timeout(Duration::from_millis(10), send(&svc, slow)).await;
    assert!(dropped.is_err(), "answered before it was dropped");
    let res = send(&svc, with_cookie(&value)).await.unwrap();
    assert_eq!(res.body(), first.body());
    assert_eq!(cookie_of(&res), Some(value), "sent by the next response");
}

#[tokio::test(start_paused = true)]
async fn a_session_whose_saving_request_was_dropped_is_saved_by_the_next() {
    let c = cluster();
    let (shared, svc, home) = kept_in_memory(&c).await;
    // Read again, no record: the request that was to save the session is
    // dropped before its answer (its client went away).
    let slow = Request::builder()
        .header("x-session-id", "k")
        .header("x-delay-ms", "1000")
        .body(())
        .unwrap();
    let dropped = tokio::time::timeout(Duration::from_millis(10), send(&svc, slow)).await;
    assert!(dropped.is_err(), "answered before it was dropped");
    assert!(shared.is_empty());
    // The next request reads the store again, and saves the session.
    assert_eq!(send(&svc, session("k")).await.unwrap().body(), &home);
    let saved = shared.load("k").await.unwrap().expect("saved");
    assert_eq!(saved.backend.as_str(), home);
}

/// A store that answers the record of another key.
#[derive(Clone)]
struct Mislabelled(MemoryStore);

impl SessionStore for Mislabelled {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        self.0.load_all()
    }
    fn load<'a>(&'a self, _key: &'a str) -> StoreFuture<'a, Option<Session>> {
        self.0.load("other")
    }
    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        self.0.save(session)
    }
    fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        self.0.delete(keys)
    }
}

#[tokio::test(start_paused = true)]
async fn a_record_of_another_key_is_an_error_not_an_absent_record() {
    let c = cluster();
    let shared = MemoryStore::new();
    shared
        .save(&Session::new("other", BackendId::from("c")))
        .await
        .unwrap();
    let (layer, svc) = instance(
        &c,
        SessionKey::header("x-session-id"),
        Mislabelled(shared.clone()),
    );
    send(&svc, session("k")).await.unwrap();
    assert_eq!(layer.stats().store_errors, 1);
    // Nothing was written for `k` over what the store may hold.
    assert!(shared.load("k").await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_move_hook_runs_to_its_end_when_the_client_goes_away() {
    let c = cluster();
    let finished = Arc::new(AtomicUsize::new(0));
    let done = finished.clone();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()))
        .store(MemoryStore::new())
        .on_move(move |_moved: SessionMoved| {
            let done = done.clone();
            async move {
                // Rebuilding the session's state takes a second.
                tokio::time::sleep(Duration::from_secs(1)).await;
                done.fetch_add(1, Ordering::SeqCst);
                Ok::<(), BoxError>(())
            }
        });
    let svc = stack(&c.pool, layer);
    let first = send(&svc, Request::new(())).await.unwrap();
    let cookie = cookie_of(&first).unwrap();
    c.set_health(first.body(), HealthStatus::Unhealthy);
    // The request that moves the session is dropped while its hook runs.
    let moving = tokio::time::timeout(Duration::from_millis(100), send(&svc, with_cookie(&cookie)));
    assert!(moving.await.is_err(), "answered before the hook ended");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(finished.load(Ordering::SeqCst), 1, "the hook was cut off");
}

/// A lock every caller takes at once, counting the locks released and
/// noting each release in `log`.
#[derive(Clone, Default)]
struct Granted {
    released: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<&'static str>>>,
}

impl SessionLock for Granted {
    fn lock<'a>(&'a self, _key: &'a str) -> StoreFuture<'a, Option<SessionGuard>> {
        let (released, log) = (self.released.clone(), self.log.clone());
        Box::pin(async move {
            Ok(Some(SessionGuard::new(async move {
                released.fetch_add(1, Ordering::SeqCst);
                log.lock().push("released");
                Ok(())
            })))
        })
    }
}

#[test]
fn a_session_restored_on_a_miss_needs_no_tokio_runtime() {
    let c = cluster();
    let store = MemoryStore::new();
    let lock = Granted::default();
    let hooked = Arc::new(AtomicUsize::new(0));
    let seen = hooked.clone();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .hydrate(lock.clone())
        .on_restore(move |_: Session| {
            seen.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<(), BoxError>(()))
        });
    let svc = stack(&c.pool, layer.clone());
    // Driven by an executor that is not tokio's.
    futures::executor::block_on(async {
        store.save(&kernel("k1", "b")).await.unwrap();
        let res = send(&svc, session("k1")).await.unwrap();
        assert_eq!(res.body(), "b");
    });
    assert_eq!(hooked.load(Ordering::SeqCst), 1);
    assert_eq!(lock.released.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().hydrated, 1);
}

#[tokio::test(start_paused = true)]
async fn a_restore_hook_over_its_time_limit_fails_and_keeps_the_record() {
    let c = cluster();
    let store = MemoryStore::new();
    store.save(&kernel("k1", "a")).await.unwrap();
    store.save(&kernel("k2", "b")).await.unwrap();
    // k2's kernel never answers.
    let hook = |s: Session| async move {
        if s.key == "k2" {
            std::future::pending::<()>().await;
        }
        Ok::<(), BoxError>(())
    };
    let standalone = || standalone(&c.pool, &store).on_restore(hook);
    for (layer, limit) in [
        (standalone(), DEFAULT_RESTORE_TIMEOUT),
        (
            standalone().restore_timeout(Duration::from_secs(5)),
            Duration::from_secs(5),
        ),
    ] {
        let started = tokio::time::Instant::now();
        let report = tokio::time::timeout(Duration::from_secs(600), layer.restore())
            .await
            .expect("the hook's time limit ends the restore")
            .unwrap();
        let took = started.elapsed();
        assert!(
            took >= limit && took < limit + Duration::from_secs(1),
            "{took:?}"
        );
        assert_eq!(report.restored, ["k1"]);
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].key, "k2");
        let error = report.failed[0].error.downcast_ref::<RestoreTimedOut>();
        assert_eq!(error.expect("timed out").after(), limit);
        assert!(layer.session("k1").is_some());
        assert!(layer.session("k2").is_none());
        let kept = store.load("k2").await.unwrap().unwrap();
        assert_eq!(kept.backend.as_str(), "b", "its record is kept");
    }
}

/// A zero time limit is none: a hook that takes an hour restores its
/// session.
#[tokio::test(start_paused = true)]
async fn a_zero_restore_timeout_is_no_limit() {
    let c = cluster();
    let store = MemoryStore::new();
    store.save(&kernel("k1", "a")).await.unwrap();
    let hook = |_: Session| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<(), BoxError>(())
    };
    let layer = standalone(&c.pool, &store)
        .on_restore(hook)
        .restore_timeout(Duration::ZERO);
    let report = layer.restore().await.unwrap();
    assert_eq!(report.restored, ["k1"]);
    assert!(report.failed.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_hydrating_hook_over_its_time_limit_lets_the_session_go_to_its_backend() {
    let c = cluster();
    let store = MemoryStore::new();
    store.save(&kernel("k1", "b")).await.unwrap();
    let lock = Granted::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .hydrate(lock.clone())
        .restore_timeout(Duration::from_secs(5))
        .on_restore(|_: Session| std::future::pending::<Result<(), BoxError>>());
    let svc = stack(&c.pool, layer.clone());
    let started = tokio::time::Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(600), send(&svc, session("k1")))
        .await
        .expect("the hook's time limit ends the restore")
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(res.body(), "b");
    assert_eq!(
        lock.released.load(Ordering::SeqCst),
        1,
        "the lock is released"
    );
    assert_eq!(layer.stats().hydrated, 0, "a restore that timed out failed");
    // Known now: routed without running the hook again.
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "b");
    assert_eq!(started.elapsed(), took);
    assert_eq!(stored_backend(&store, "k1").await, "b");
}

#[tokio::test]
async fn a_hydrating_hook_that_panics_releases_its_lock() {
    let c = cluster();
    let store = MemoryStore::new();
    store.save(&kernel("k1", "b")).await.unwrap();
    let lock = Granted::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .hydrate(lock.clone())
        .on_restore(|s: Session| async move {
            assert_ne!(s.key, "k1", "no kernel for k1");
            Ok::<(), BoxError>(())
        });
    let svc = stack(&c.pool, layer.clone());
    let res = bounded_real("the restore ends", send(&svc, session("k1")))
        .await
        .unwrap();
    assert_eq!(res.body(), "b", "routed to its stored backend");
    // Released at once rather than left for the lock to expire, while
    // every other replica's request for the session waits on it.
    assert_eq!(lock.released.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().hydrated, 0, "a restore that panicked failed");
    assert_eq!(stored_backend(&store, "k1").await, "b");
}

/// A store whose loads panic from the `panic_from`th on.
struct PanicsOnLoad {
    inner: MemoryStore,
    loads: AtomicUsize,
    panic_from: usize,
}

impl SessionStore for PanicsOnLoad {
    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        let n = self.loads.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(n < self.panic_from, "the store's client is broken");
        self.inner.load(key)
    }

    pass_on!(inner: load_all, save, delete);
}

#[tokio::test]
async fn a_store_that_panics_under_a_restore_lock_releases_it() {
    let c = cluster();
    let inner = MemoryStore::new();
    inner.save(&kernel("k1", "b")).await.unwrap();
    let lock = Granted::default();
    // The first load finds the record; the second, made under the lock
    // to read it again, panics.
    let store = PanicsOnLoad {
        inner,
        loads: AtomicUsize::new(0),
        panic_from: 2,
    };
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store)
        .hydrate(lock.clone())
        .on_restore(|_: Session| std::future::ready(Ok::<(), BoxError>(())));
    let svc = stack(&c.pool, layer.clone());
    let res = bounded_real("the restore ends", send(&svc, session("k1")))
        .await
        .unwrap();
    assert_eq!(res.body(), "b", "routed by the record first read");
    spin_until("the lock is released", || {
        lock.released.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_past_its_time_limit_has_stopped_before_its_lock_is_released() {
    let c = cluster();
    let store = MemoryStore::new();
    store.save(&kernel("k1", "b")).await.unwrap();
    let lock = Granted::default();
    let log = lock.log.clone();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .hydrate(lock.clone())
        .restore_timeout(Duration::from_millis(20))
        .on_restore(move |_: Session| {
            let log = log.clone();
            async move {
                // A synchronous call into a driver, past the time limit:
                // the task cannot be stopped until it returns.
                std::thread::sleep(Duration::from_millis(300));
                log.lock().push("hook returned");
                tokio::task::yield_now().await;
                log.lock().push("hook ended");
                Ok::<(), BoxError>(())
            }
        });
    let svc = stack(&c.pool, layer.clone());
    let res = send(&svc, session("k1")).await.unwrap();
    assert_eq!(res.body(), "b");
    assert_eq!(layer.stats().hydrated, 0, "timed out");
    // No other replica could restore the session while the hook ran; the
    // hook was stopped at its next await.
    assert_eq!(*lock.log.lock(), ["hook returned", "released"]);
}

#[test]
fn a_restore_needs_no_tokio_runtime() {
    let c = cluster();
    let store = MemoryStore::new();
    let layer = standalone(&c.pool, &store)
        .on_restore(|_: Session| std::future::ready(Ok::<(), BoxError>(())));
    let report = futures::executor::block_on(async {
        store.save(&kernel("k1", "b")).await.unwrap();
        layer.restore().await.unwrap()
    });
    assert_eq!(report.restored, ["k1"]);
    assert_eq!(layer.session("k1").unwrap().backend.as_str(), "b");
}

#[tokio::test]
async fn a_request_served_during_restore_is_not_undone_by_it() {
    for availability in [Availability::Standalone, Availability::Replication] {
        let c = cluster();
        let store = MemoryStore::new();
        store.save(&kernel("k1", "a")).await.unwrap();
        // The hook runs until let go.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let running = Arc::new(AtomicBool::new(false));
        let (held, started) = (gate.clone(), running.clone());
        let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
            .store(store.clone())
            .availability(availability)
            .on_restore(move |_: Session| {
                let (held, started) = (held.clone(), started.clone());
                async move {
                    started.store(true, Ordering::SeqCst);
                    held.acquire().await.unwrap().forget();
                    Ok::<(), BoxError>(())
                }
            });
        let svc = stack(&c.pool, layer.clone());
        let restoring = tokio::spawn({
            let layer = layer.clone();
            async move { layer.restore().await }
        });
        spin_until("the restore hook runs", || running.load(Ordering::SeqCst)).await;
        // k1's backend goes down while its restore runs; a request for it
        // is served elsewhere.
        c.set_health("a", HealthStatus::Unhealthy);
        let during = send(&svc, session("k1")).await.unwrap();
        assert_ne!(during.body(), "a");
        gate.add_permits(1);
        assert_eq!(restoring.await.unwrap().unwrap().restored, ["k1"]);
        let routed = layer.session("k1").unwrap().backend;
        let stored = store.load("k1").await.unwrap().unwrap();
        assert_eq!(
            routed, stored.backend,
            "{availability:?}: the table and the store agree"
        );
        // The request moved the session: the restore does not put it back,
        // and its record follows it with its data.
        let stats = layer.stats();
        assert_eq!(stats.moved, 1, "{availability:?}");
        assert_eq!(routed.as_str(), during.body(), "{availability:?}");
        assert_eq!(stored.data["port"], 5000, "{availability:?}");
        if availability == Availability::Standalone {
            // Routed by the record the restore listed, not read again.
            assert_eq!(stats.loaded, 0);
        }
        // It does not move back when `a` recovers.
        c.set_health("a", HealthStatus::Healthy);
        let next = send(&svc, session("k1")).await.unwrap();
        assert_eq!(next.body(), during.body(), "{availability:?}");
        assert_eq!(layer.stats().moved, 1, "{availability:?}");
    }
}

/// Standalone: a session whose record a restore has listed and not yet
/// taken goes to the record's backend, whatever a cookie or the balancer
/// would pick; strict mode refuses it while that backend is out.
#[tokio::test]
async fn a_session_waiting_for_its_restore_goes_where_its_record_says() {
    for strict in [false, true] {
        let c = cluster();
        let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
            .availability(Availability::Standalone)
            .strict(strict);
        let (store, layer, restore, gate, svc) =
            restore_held_by(&c, &["k1", "k2", "k3"], layer).await;
        for key in ["k1", "k2", "k3"] {
            let res = send(&svc, session(key)).await.unwrap();
            assert_eq!(res.body(), "c", "{key}, strict: {strict}");
        }
        c.set_health("c", HealthStatus::Unhealthy);
        let during = send(&svc, session("k1")).await;
        if strict {
            let err = during.unwrap_err();
            let refused = err.downcast_ref::<SessionUnavailable>().expect("typed");
            assert_eq!(refused.backend().unwrap().as_str(), "c");
            assert_eq!(layer.stats().strict_refusals, 1);
        } else {
            assert_ne!(during.unwrap().body(), "c");
            assert_eq!(layer.stats().moved, 1);
        }
        gate.add_permits(3);
        let mut restored = restore.await.unwrap().unwrap().restored;
        restored.sort();
        assert_eq!(restored, ["k1", "k2", "k3"]);
        assert_eq!(layer.stats().loaded, 0, "strict: {strict}");
        for key in ["k2", "k3"] {
            assert_eq!(stored_backend(&store, key).await, "c");
        }
    }
}

/// Standalone: a session a cookie names moves off its backend while its
/// record waits for the restore; the restore keeps the move, saves it with
/// the record's data, and the session does not move back.
#[tokio::test]
async fn a_move_made_while_the_restore_runs_is_kept_and_saved() {
    let c = cluster();
    let moves = Moves::default();
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()))
        .availability(Availability::Standalone)
        .on_move(moves.hook());
    let sid = "0000000000000000000001";
    let (store, layer, restore, gate, svc) = restore_held_by(&c, &[sid], layer).await;
    let cookie = format!("srv={}", sign("srv", sid, "c"));
    c.set_health("c", HealthStatus::Unhealthy);
    let during = send(&svc, with_cookie(&cookie)).await.unwrap();
    let went = during.body().clone();
    assert_ne!(went, "c");
    let all = moves.all();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].session.data["port"], 5000, "the record's data moves");
    // Not saved over the record the restore holds.
    assert_eq!(stored_backend(&store, sid).await, "c");

    gate.add_permits(1);
    assert_eq!(restore.await.unwrap().unwrap().restored, [sid]);
    assert_eq!(layer.session(sid).unwrap().backend.as_str(), went);
    let stored = store.load(sid).await.unwrap().unwrap();
    assert_eq!(stored.backend.as_str(), went);
    assert_eq!(stored.data["port"], 5000);

    c.set_health("c", HealthStatus::Healthy);
    for cookie in [cookie, cookie_of(&during).unwrap()] {
        let res = send(&svc, with_cookie(&cookie)).await.unwrap();
        assert_eq!(res.body(), &went);
    }
    assert_eq!(moves.all().len(), 1);
}

/// Standalone: an application's logout of a session whose record the
/// restore holds ends it: the record is deleted and not put back.
#[tokio::test]
async fn a_logout_while_the_restore_runs_ends_the_session() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::learn_cookie("JSESSIONID"))
        .availability(Availability::Standalone);
    let (store, layer, restore, gate, svc) = restore_held_by(&c, &["sess1", "sess2"], layer).await;
    let logout = logout_of("JSESSIONID=sess1");
    assert_eq!(send(&svc, logout).await.unwrap().body(), "c");
    assert!(store.load("sess1").await.unwrap().is_none());
    gate.add_permits(2);
    assert_eq!(restore.await.unwrap().unwrap().restored, ["sess2"]);
    assert!(layer.session("sess1").is_none());
    assert!(store.load("sess1").await.unwrap().is_none());
    assert_eq!(layer.stats().sessions, 1);
}

/// A logout answered after the restore took the record it was routed by
/// ends the session too: the record is the session's by then.
#[tokio::test(start_paused = true)]
async fn a_logout_answered_after_the_restore_took_its_record_ends_the_session() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::learn_cookie("JSESSIONID"))
        .availability(Availability::Standalone);
    let (store, layer, restore, gate, svc) = restore_held_by(&c, &["sess1"], layer).await;
    let logout = delayed(logout_of("JSESSIONID=sess1"), 1000);
    let logout = tokio::spawn(send_owned(svc.clone(), logout));
    tokio::time::advance(Duration::from_millis(10)).await;
    gate.add_permits(1);
    assert_eq!(restore.await.unwrap().unwrap().restored, ["sess1"]);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(logout.await.unwrap().unwrap().body(), "c");
    assert!(layer.session("sess1").is_none());
    assert!(store.load("sess1").await.unwrap().is_none());
}

/// A logout while a restore lists the store (the request read the record
/// itself) is not undone by the restore either.
#[tokio::test]
async fn a_logout_while_the_restore_lists_the_store_ends_the_session() {
    let c = cluster();
    let shared = MemoryStore::new();
    for key in ["sess1", "sess2"] {
        shared.save(&kernel(key, "c")).await.unwrap();
    }
    let store = SlowListing::new(shared.clone());
    let layer = StickyLayer::new(&c.pool, SessionKey::learn_cookie("JSESSIONID"))
        .store(store.clone())
        .availability(Availability::Standalone);
    let svc = stack(&c.pool, layer.clone());
    let restore = tokio::spawn({
        let layer = layer.clone();
        async move { layer.restore().await }
    });
    store.listed.acquire().await.unwrap().forget();
    let logout = logout_of("JSESSIONID=sess1");
    assert_eq!(send(&svc, logout).await.unwrap().body(), "c");
    store.go.add_permits(1);
    assert_eq!(restore.await.unwrap().unwrap().restored, ["sess2"]);
    assert!(layer.session("sess1").is_none());
    assert!(shared.load("sess1").await.unwrap().is_none());
}

/// A `remove` given up while its delete is under way (a logout whose
/// client left) still lets go of the record a failed restore kept: once
/// the delete lands, the session's next request is a new session, not one
/// routed by the deleted record and kept in memory only.
#[tokio::test(start_paused = true)]
async fn a_remove_given_up_midway_still_lets_go_of_the_restored_record() {
    let c = cluster();
    let (inner, store) = SlowStore::holding("k", "b").await;
    store
        .gate
        .add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    let fail = Arc::new(AtomicBool::new(true));
    let layer = standalone(&c.pool, &store).on_restore(failing_while(&fail));
    assert_eq!(layer.restore().await.unwrap().failed.len(), 1);
    let svc = stack(&c.pool, layer.clone());
    assert_eq!(send(&svc, session("k")).await.unwrap().body(), "b");
    // The delete waits; the caller gives up.
    store
        .deletes
        .forget_permits(tokio::sync::Semaphore::MAX_PERMITS);
    let removing = tokio::time::timeout(Duration::from_millis(10), layer.remove("k"));
    assert!(removing.await.is_err(), "the delete is held");
    store.deletes.add_permits(1);
    layer.flush().await;
    assert!(inner.load("k").await.unwrap().is_none(), "deleted");
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let served = send(&svc, session("k")).await.unwrap().into_body();
    layer.flush().await;
    let record = inner.load("k").await.unwrap();
    assert_eq!(
        record.map(|r| r.backend.to_string()),
        Some(served),
        "a new session, saved"
    );
}

/// A refresh that fails is tried again at a request an eighth of the
/// interval later, not a whole interval later: by then the record of a
/// session in use would have expired.
#[tokio::test(start_paused = true)]
async fn a_failed_refresh_is_tried_again_before_the_record_expires() {
    let c = cluster();
    let store = FlakyLoads::new(MemoryStore::new().with_ttl(Duration::from_secs(120)));
    store.down.store(false, Ordering::SeqCst);
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id")).store(store.clone());
    let svc = stack(&c.pool, layer.clone());
    // Session `key` saved at 0 s, to expire at 120 s, due a refresh every
    // 60 s; its refresh at 61 s fails, its next request comes `later`
    // seconds after that. Whether its record outlives 120 s.
    let outlives_its_ttl = |key: &'static str, later: u64| {
        let (svc, layer, store) = (&svc, &layer, &store);
        async move {
            let send = |down: bool| async move {
                store.saves_down.store(down, Ordering::SeqCst);
                send(svc, session(key)).await.unwrap();
                layer.flush().await;
                store.saves_down.store(false, Ordering::SeqCst);
            };
            send(false).await;
            tokio::time::advance(Duration::from_secs(61)).await;
            send(true).await;
            tokio::time::advance(Duration::from_secs(later)).await;
            send(false).await;
            tokio::time::advance(Duration::from_secs(125 - 61 - later)).await;
            store.inner.load(key).await.unwrap().is_some()
        }
    };
    // Not yet due again: a failing store is not asked at every request.
    assert!(!outlives_its_ttl("s", 5).await, "not tried at 66 s");
    assert!(
        outlives_its_ttl("t", 10).await,
        "tried, and landed, at 71 s"
    );
}

/// A restored record older than the refresh interval (written long before
/// a restart) is written again at its first request, not a whole interval
/// later: a store whose records expire might drop it meanwhile.
#[tokio::test]
async fn a_restored_record_older_than_the_refresh_interval_is_refreshed_at_once() {
    let c = cluster();
    let store = MemoryStore::new();
    let young_at = std::time::SystemTime::now();
    let written = young_at - Duration::from_secs(40);
    for (key, at) in [("old", written), ("young", young_at)] {
        let mut record = kernel(key, "a");
        record.last_seen = at;
        store.save(&record).await.unwrap();
    }
    let layer = standalone(&c.pool, &store).refresh_every(Duration::from_secs(30));
    layer.restore().await.unwrap();
    let svc = stack(&c.pool, layer.clone());
    for key in ["old", "young"] {
        assert_eq!(send(&svc, session(key)).await.unwrap().body(), "a");
    }
    layer.flush().await;
    let old = store.load("old").await.unwrap().unwrap();
    assert!(
        old.last_seen > written + Duration::from_secs(30),
        "refreshed"
    );
    assert_eq!(old.data["port"], 5000);
    let young = store.load("young").await.unwrap().unwrap();
    assert!(young.last_seen <= young_at, "not yet due");
}

/// An `on_restore` hook that fails while `fail` is set.
fn failing_while(
    fail: &Arc<AtomicBool>,
) -> impl Fn(Session) -> std::future::Ready<Result<(), BoxError>> + Send + Sync + 'static {
    let fail = fail.clone();
    move |_: Session| {
        std::future::ready(match fail.load(Ordering::SeqCst) {
            true => Err("kernel gone".into()),
            false => Ok(()),
        })
    }
}

/// Standalone: a session whose restore failed moves in memory, keeps its
/// new backend after it idles out, and a later restore keeps the move.
#[tokio::test(start_paused = true)]
async fn a_session_whose_restore_failed_keeps_its_move_until_a_later_restore() {
    let c = cluster();
    let store = MemoryStore::new();
    store.save(&kernel("k1", "a")).await.unwrap();
    let fail = Arc::new(AtomicBool::new(true));
    let layer = standalone(&c.pool, &store)
        .idle_timeout(Duration::from_secs(60))
        .on_restore(failing_while(&fail));
    assert_eq!(layer.restore().await.unwrap().failed.len(), 1);
    let svc = stack(&c.pool, layer.clone());
    c.set_health("a", HealthStatus::Unhealthy);
    let went = send(&svc, session("k1")).await.unwrap().into_body();
    assert_ne!(went, "a");
    c.set_health("a", HealthStatus::Healthy);
    // Idle: gone from the table. Every backend is a pick now; the session
    // goes where it moved.
    tokio::time::advance(Duration::from_secs(61)).await;
    for _ in 0..3 {
        send(&svc, Request::new(())).await.unwrap();
        assert_eq!(send(&svc, session("k1")).await.unwrap().body(), &went);
    }
    assert_eq!(layer.stats().moved, 1);
    assert_eq!(stored_backend(&store, "k1").await, "a");

    fail.store(false, Ordering::SeqCst);
    assert_eq!(layer.restore().await.unwrap().restored, ["k1"]);
    let stored = store.load("k1").await.unwrap().unwrap();
    assert_eq!(stored.backend.as_str(), went);
    assert_eq!(stored.data["port"], 5000);
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), &went);
    assert_eq!(layer.stats().moved, 1);
}

/// A session the table held, saved, when a restore listed its record (read
/// by a request before the restore), whose hook then failed: a move saved
/// since is the session's, not the listed record's. Once the session
/// leaves the table it goes where it moved, and a later restore keeps it
/// there.
#[tokio::test(start_paused = true)]
async fn a_saved_move_outlives_the_record_a_failed_restore_listed() {
    let c = cluster();
    let store = MemoryStore::new();
    store.save(&kernel("k1", "a")).await.unwrap();
    let fail = Arc::new(AtomicBool::new(true));
    let layer = standalone(&c.pool, &store)
        .idle_timeout(Duration::from_secs(60))
        .on_restore(failing_while(&fail));
    let svc = stack(&c.pool, layer.clone());
    // Read from the store before the restore lists it.
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "a");
    assert_eq!(layer.restore().await.unwrap().failed.len(), 1);
    c.set_health("a", HealthStatus::Unhealthy);
    let went = send(&svc, session("k1")).await.unwrap().into_body();
    assert_ne!(went, "a");
    layer.flush().await;
    // The table held it saved: its move is saved.
    assert_eq!(stored_backend(&store, "k1").await, went);
    c.set_health("a", HealthStatus::Healthy);
    // Idle: gone from the table. It goes where it moved, not back to the
    // backend the restore listed.
    tokio::time::advance(Duration::from_secs(61)).await;
    for _ in 0..3 {
        send(&svc, Request::new(())).await.unwrap();
        assert_eq!(send(&svc, session("k1")).await.unwrap().body(), &went);
    }
    fail.store(false, Ordering::SeqCst);
    assert_eq!(layer.restore().await.unwrap().restored, ["k1"]);
    layer.flush().await;
    assert_eq!(stored_backend(&store, "k1").await, went);
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), &went);
    assert_eq!(layer.stats().moved, 1);
}

/// The same when the move lands while the restore lists the store: the
/// listing read the record before the move, and its hook fails. The
/// session goes where it moved, once out of the table too.
#[tokio::test(start_paused = true)]
async fn a_move_saved_while_a_restore_lists_the_store_is_not_undone_by_its_record() {
    let c = cluster();
    let shared = MemoryStore::new();
    shared.save(&kernel("k1", "a")).await.unwrap();
    let store = SlowListing::new(shared.clone());
    let layer = standalone(&c.pool, &store)
        .idle_timeout(Duration::from_secs(60))
        .on_restore(|_: Session| async { Err::<(), BoxError>("kernel gone".into()) });
    let svc = stack(&c.pool, layer.clone());
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "a");
    let restore = tokio::spawn({
        let layer = layer.clone();
        async move { layer.restore().await }
    });
    // The listing has read k1 on a when the session moves.
    store.listed.acquire().await.unwrap().forget();
    c.set_health("a", HealthStatus::Unhealthy);
    let went = send(&svc, session("k1")).await.unwrap().into_body();
    assert_ne!(went, "a");
    layer.flush().await;
    store.go.add_permits(1);
    assert_eq!(restore.await.unwrap().unwrap().failed.len(), 1);
    c.set_health("a", HealthStatus::Healthy);
    tokio::time::advance(Duration::from_secs(61)).await;
    for _ in 0..3 {
        send(&svc, Request::new(())).await.unwrap();
        assert_eq!(send(&svc, session("k1")).await.unwrap().body(), &went);
    }
    assert_eq!(stored_backend(&shared, "k1").await, went);
}

/// The same in replication mode: a session read from the store while its
/// restore's hook runs, then moved (saved) and gone idle before the hook
/// ends, is restored where it moved, not on the backend the listing named.
#[tokio::test(start_paused = true)]
async fn a_saved_move_during_a_replicated_restore_is_not_undone_by_it() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .availability(Availability::Replication)
        .idle_timeout(Duration::from_secs(10))
        .restore_timeout(Duration::ZERO);
    let (store, layer, restore, gate, svc) = restore_held_by(&c, &["k1"], layer).await;
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "c");
    c.set_health("c", HealthStatus::Unhealthy);
    let went = send(&svc, session("k1")).await.unwrap().into_body();
    assert_ne!(went, "c");
    layer.flush().await;
    assert_eq!(stored_backend(&store, "k1").await, went);
    c.set_health("c", HealthStatus::Healthy);
    // Idle: gone from the table before the restore takes the record.
    tokio::time::advance(Duration::from_secs(11)).await;
    send(&svc, session("other")).await.unwrap();
    gate.add_permits(1);
    assert_eq!(restore.await.unwrap().unwrap().restored, ["k1"]);
    assert_eq!(layer.session("k1").unwrap().backend.as_str(), went);
    layer.flush().await;
    assert_eq!(stored_backend(&store, "k1").await, went);
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), &went);
    assert_eq!(layer.stats().moved, 1);
}

/// A record whose restore failed, gone from the store by the next
/// restore (expired, or deleted by hand), is let go by it: its session is
/// read from the store again, and saved from then on, where it is routed.
#[tokio::test(start_paused = true)]
async fn a_later_restore_lets_go_of_failed_records_the_store_no_longer_holds() {
    let c = cluster();
    let store = MemoryStore::new();
    store.save(&kernel("k1", "b")).await.unwrap();
    store.save(&kernel("k2", "c")).await.unwrap();
    let layer = standalone(&c.pool, &store)
        .on_restore(|_: Session| async { Err::<(), BoxError>("kernel gone".into()) });
    assert_eq!(layer.restore().await.unwrap().failed.len(), 2);
    let svc = stack(&c.pool, layer.clone());
    // Routed by its record, kept in memory only.
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "b");
    store.delete(&["k1".into(), "k2".into()]).await.unwrap();
    let report = layer.restore().await.unwrap();
    assert!(report.restored.is_empty() && report.failed.is_empty());
    // k1 stays on its backend (a new session would take the first turn of
    // the round robin, a), now saved; k2 starts anew, and is saved.
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "b");
    let k2 = send(&svc, session("k2")).await.unwrap().into_body();
    layer.flush().await;
    assert_eq!(stored_backend(&store, "k1").await, "b");
    assert_eq!(stored_backend(&store, "k2").await, k2);
    assert_eq!(layer.stats().moved, 0);
    assert_eq!(layer.stats().created, 1, "k2 only");
}

/// A store whose listing cannot read `k1` while `skip` is set.
#[derive(Clone)]
struct Skipping {
    inner: MemoryStore,
    skip: Arc<AtomicBool>,
}

impl SessionStore for Skipping {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        Box::pin(async move {
            let mut loaded = self.inner.load_all().await?;
            if self.skip.load(Ordering::SeqCst) {
                loaded.sessions.retain(|s| s.key != "k1");
                loaded.skip("k1", tower_ha::store::StoreError::corrupt("unreadable"));
            }
            Ok(loaded)
        })
    }

    pass_on!(inner: load, save, delete);
}

/// A listing that could not read every record lets go of nothing: the
/// record of a failed restore it skipped is still in the store.
#[tokio::test(start_paused = true)]
async fn a_restore_that_skipped_records_keeps_the_failed_ones() {
    let c = cluster();
    let store = Skipping {
        inner: MemoryStore::new(),
        skip: Arc::new(AtomicBool::new(false)),
    };
    store.inner.save(&kernel("k1", "b")).await.unwrap();
    let layer = standalone(&c.pool, &store)
        .on_restore(|_: Session| async { Err::<(), BoxError>("kernel gone".into()) });
    assert_eq!(layer.restore().await.unwrap().failed.len(), 1);
    let svc = stack(&c.pool, layer.clone());
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "b");
    store.skip.store(true, Ordering::SeqCst);
    assert_eq!(layer.restore().await.unwrap().skipped.len(), 1);
    // Still the failed restore's: not read, nor written.
    let loaded = layer.stats().loaded;
    assert_eq!(send(&svc, session("k1")).await.unwrap().body(), "b");
    layer.flush().await;
    assert_eq!(layer.stats().loaded, loaded);
    assert_eq!(
        store.inner.load("k1").await.unwrap().unwrap().data["port"],
        5000
    );
}

#[tokio::test(start_paused = true)]
async fn a_restore_dropped_part_way_leaves_its_records_to_a_later_one() {
    let c = cluster();
    let store = MemoryStore::new();
    store.save(&kernel("k1", "a")).await.unwrap();
    store.save(&kernel("k2", "b")).await.unwrap();
    let hang = Arc::new(AtomicBool::new(true));
    let hangs = hang.clone();
    let layer = standalone(&c.pool, &store).on_restore(move |_: Session| {
        let hangs = hangs.load(Ordering::SeqCst);
        async move {
            if hangs {
                std::future::pending::<()>().await;
            }
            Ok::<(), BoxError>(())
        }
    });
    // Given up on while its first hook runs.
    let gave_up = tokio::time::timeout(Duration::from_secs(1), layer.restore()).await;
    assert!(gave_up.is_err());
    // Neither record is read, nor written over: they are not this
    // instance's until a restore takes them.
    let svc = stack(&c.pool, layer.clone());
    for key in ["k1", "k2"] {
        send(&svc, session(key)).await.unwrap();
    }
    assert_eq!(layer.stats().loaded, 0);
    assert_eq!(stored_backend(&store, "k1").await, "a");
    assert_eq!(stored_backend(&store, "k2").await, "b");
    // A later restore takes both.
    hang.store(false, Ordering::SeqCst);
    let mut restored = layer.restore().await.unwrap().restored;
    restored.sort();
    assert_eq!(restored, ["k1", "k2"]);
    for (key, home) in [("k1", "a"), ("k2", "b")] {
        assert_eq!(send(&svc, session(key)).await.unwrap().body(), home);
    }
}

#[tokio::test]
async fn a_removed_session_does_not_come_back_through_a_read_made_before_its_delete() {
    let c = cluster();
    let (inner, mut store) = SlowStore::holding("kernel-1", "c").await;
    store.deletes = Arc::new(tokio::sync::Semaphore::new(0));
    let (layer, svc) = instance(&c, SessionKey::header("x-session-id"), store.clone());
    // A request reads the record; its answer is held.
    let pending = tokio::spawn(send_owned(svc.clone(), session("kernel-1")));
    store.until_held().await;
    // The session is ended: forgotten (the load marked stale), delete queued.
    let remover = {
        let layer = layer.clone();
        tokio::spawn(async move { layer.remove("kernel-1").await })
    };
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    // The first answer comes, stale: the request reads the record again,
    // but only once the delete has landed.
    store.gate.add_permits(1);
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    // Its permit back: the next load is held again.
    store.gate.acquire().await.unwrap().forget();
    assert_eq!(
        store.loads.load(Ordering::SeqCst),
        1,
        "read before the delete landed"
    );
    store.deletes.add_permits(1);
    remover.await.unwrap().unwrap();
    assert!(inner.load("kernel-1").await.unwrap().is_none(), "deleted");
    store.gate.add_permits(1);
    let served = pending.await.unwrap().unwrap().into_body();
    assert_eq!(store.loads.load(Ordering::SeqCst), 2);
    // It found no record: a new session started where it was served, and
    // the one removed did not come back.
    assert_eq!(layer.stats().created, 1);
    assert_eq!(layer.session("kernel-1").unwrap().backend.as_str(), served);
}

/// A response of a session's old backend, arriving after the session
/// moved, sends the cookie of the backend it moved to, not the one it left
/// (the browser keeps the last cookie).
#[tokio::test(start_paused = true)]
async fn a_late_response_sends_the_cookie_of_the_backend_the_session_moved_to() {
    let c = cluster();
    let cookie = CookieInsert::new("srv", SECRET)
        .secure(false)
        .max_age(Duration::from_secs(100));
    let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(cookie));
    let svc = stack(&c.pool, layer.clone());
    let first = send(&svc, Request::new(())).await.unwrap();
    let home = first.body().clone();
    let cookie = cookie_of(&first).unwrap();
    // Half the Max-Age later the cookie is due to be sent again.
    tokio::time::advance(Duration::from_secs(60)).await;
    // A slow request of the session (its cookie due for renewal) ...
    let mut slow_req = with_cookie(&cookie);
    slow_req
        .headers_mut()
        .insert("x-delay-ms", HeaderValue::from_static("5000"));
    let slow = tokio::spawn(send_owned(svc.clone(), slow_req));
    tokio::time::advance(Duration::from_millis(10)).await;
    // ... while its backend goes down and another request moves it.
    c.set_health(&home, HealthStatus::Unhealthy);
    let moved = send(&svc, with_cookie(&cookie)).await.unwrap();
    let new_home = moved.body().clone();
    assert_ne!(new_home, home);
    assert!(cookie_of(&moved).is_some(), "the move sends a new cookie");
    c.set_health(&home, HealthStatus::Healthy);
    tokio::time::advance(Duration::from_secs(6)).await;
    let slow = slow.await.unwrap().unwrap();
    assert_eq!(slow.body(), &home);
    // Its cookie was due: the late response sends one, of the backend the
    // session moved to. The browser keeps the last Set-Cookie; were it
    // the old backend's, the session would flap back once the table lost
    // it (idle, evicted, restart: no store).
    let last = cookie_of(&slow).expect("the late response renews the cookie");
    assert_ne!(last, cookie);
    layer.forget_all();
    let back = send(&svc, with_cookie(&last)).await.unwrap();
    assert_eq!(
        back.body(),
        &new_home,
        "flapped back to the backend it left"
    );
}

/// A session that went idle while a slow first request of its key was
/// under way is counted as expired when that request starts it again.
#[tokio::test(start_paused = true)]
async fn every_idle_session_dropped_counts_as_expired() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .idle_timeout(Duration::from_secs(10));
    let svc = stack(&c.pool, layer.clone());
    // A slow first request of k ...
    let mut slow_req = session("k");
    slow_req
        .headers_mut()
        .insert("x-delay-ms", HeaderValue::from_static("60000"));
    let slow = tokio::spawn(send_owned(svc.clone(), slow_req));
    tokio::time::advance(Duration::from_millis(10)).await;
    // ... a quick one starts it, then it goes idle.
    send(&svc, session("k")).await.unwrap();
    assert_eq!(layer.stats().sessions, 1);
    tokio::time::advance(Duration::from_secs(61)).await;
    slow.await.unwrap().unwrap();
    let stats = layer.stats();
    assert_eq!(stats.created, 2, "started again");
    assert_eq!(stats.expired, 1, "the first went idle: {stats:?}");
}

/// The instance that restores a session routes it by the record its hook
/// left, as the instances that waited for it do: a hook that started the
/// session's state on another backend saved it there.
#[tokio::test(start_paused = true)]
async fn the_restoring_instance_routes_by_the_record_its_hook_left() {
    let c = cluster();
    let store = MemoryStore::new();
    store.save(&kernel("k1", "a")).await.unwrap();
    let lock = Granted::default();
    let hook_store = store.clone();
    let layer = StickyLayer::new(&c.pool, SessionKey::header("x-session-id"))
        .store(store.clone())
        .hydrate(lock.clone())
        .on_restore(move |s: Session| {
            let store = hook_store.clone();
            async move {
                store.save(&kernel(&s.key, "b")).await?;
                Ok::<(), BoxError>(())
            }
        });
    let svc = stack(&c.pool, layer.clone());
    let res = send(&svc, session("k1")).await.unwrap();
    assert_eq!(res.body(), "b");
    assert_eq!(layer.session("k1").unwrap().backend.as_str(), "b");
    assert_eq!(lock.released.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().hydrated, 1);
}

/// A strict refusal keeps the error its backend failed the request with as
/// its source: an operator can tell a refused connection from a timeout,
/// and a gateway still answers 503.
#[tokio::test]
async fn a_strict_refusal_keeps_its_backends_error() {
    let refusing = Arc::new(AtomicBool::new(false));
    let flag = refusing.clone();
    let pool = Pool::new();
    pool.insert(
        "a",
        tower::service_fn(move |_: Request<()>| {
            let refuse = flag.load(Ordering::SeqCst);
            async move {
                if refuse {
                    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
                    return Err::<Response<String>, BoxError>(
                        tower_ha::NotSent::new(refused).into(),
                    );
                }
                Ok(Response::new("a".to_owned()))
            }
        }),
    );
    let layer = StickyLayer::new(&pool, SessionKey::header("x-session-id")).strict(true);
    let svc = stack(&pool, layer.clone());
    send(&svc, session("k1")).await.unwrap();
    refusing.store(true, Ordering::SeqCst);
    let err = send(&svc, session("k1")).await.unwrap_err();
    let unavailable = err.downcast_ref::<SessionUnavailable>().expect("typed");
    assert!(!unavailable.is_unreadable());
    let io = find::<std::io::Error>(&*err).expect("the backend's error is the source");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(find::<tower_ha::NotSent>(&*err).is_some());
    assert_eq!(
        tower_ha::error::gateway_status(&*err),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(layer.stats().strict_refusals, 1);
}

/// A learned cookie's value is the application's credential: a strict
/// refusal's `Debug` output, which applications log, shows it as the
/// layer's logs do, as a digest.
#[tokio::test]
async fn a_strict_refusal_does_not_show_a_learned_cookie() {
    let c = cluster();
    let layer = StickyLayer::new(&c.pool, SessionKey::learn_cookie("JSESSIONID")).strict(true);
    let svc = stack(&c.pool, layer.clone());
    let login = Request::builder()
        .header("x-login-as", "tok-s3cret")
        .body(())
        .unwrap();
    let home = send(&svc, login).await.unwrap().into_body();
    c.set_health(&home, HealthStatus::Unhealthy);
    let err = send(&svc, with_cookie("JSESSIONID=tok-s3cret"))
        .await
        .unwrap_err();
    let unavailable = err.downcast_ref::<SessionUnavailable>().expect("typed");
    assert_eq!(unavailable.key(), "tok-s3cret");
    let shown = format!("{err:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("cookie:"), "{shown}");
}

mod generated {
    //! `Cookie` headers of any mix of the layer's own cookie, changed
    //! copies of it, made-up values and other cookies.

    use super::*;
    use proptest::prelude::*;

    /// A pair in a generated `Cookie` header.
    #[derive(Debug, Clone)]
    enum Pair {
        /// The cookie the layer issued, quoted or not.
        Genuine { quoted: bool },
        /// The issued value with one character changed.
        Changed {
            at: proptest::sample::Index,
            to: char,
        },
        /// A value of the cookie's name that the layer never issued.
        MadeUp(String),
        /// The name without a value, or without `=`.
        Empty(&'static str),
        /// Another cookie.
        Other(String),
    }

    fn pairs() -> impl Strategy<Value = Pair> {
        prop_oneof![
            2 => any::<bool>().prop_map(|quoted| Pair::Genuine { quoted }),
            2 => (any::<proptest::sample::Index>(), proptest::sample::select("AZaz09_-.".chars().collect::<Vec<_>>()))
                .prop_map(|(at, to)| Pair::Changed { at, to }),
            1 => "[A-Za-z0-9_.-]{0,80}".prop_map(Pair::MadeUp),
            1 => prop_oneof![Just("srv="), Just("srv"), Just("srv=\"\"")].prop_map(Pair::Empty),
            1 => "[a-z]{1,4}=[ -:<-~]{0,20}"
                .prop_filter("another name", |p| !p.starts_with("srv="))
                .prop_map(Pair::Other),
        ]
    }

    /// The value `pair` sends of the layer's cookie, if any, and the pair.
    fn written(pair: &Pair, genuine: &str) -> (Option<String>, String) {
        match pair {
            Pair::Genuine { quoted: false } => (Some(genuine.to_owned()), format!("srv={genuine}")),
            Pair::Genuine { quoted: true } => {
                (Some(genuine.to_owned()), format!("srv=\"{genuine}\""))
            }
            Pair::Changed { at, to } => {
                let mut chars: Vec<char> = genuine.chars().collect();
                let i = at.index(chars.len());
                chars[i] = if chars[i] == *to {
                    if *to == 'A' {
                        'B'
                    } else {
                        'A'
                    }
                } else {
                    *to
                };
                let value: String = chars.into_iter().collect();
                (Some(value.clone()), format!("srv={value}"))
            }
            Pair::MadeUp(value) => (
                (!value.is_empty()).then(|| value.clone()),
                format!("srv={value}"),
            ),
            Pair::Empty(pair) => (None, (*pair).to_owned()),
            Pair::Other(pair) => (None, pair.clone()),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The session is kept exactly when the issued value is among the
        /// values of the layer's cookie it looks at (the first, and three
        /// more when the first is not its own), in a header within the size
        /// limit; any other mix starts a new session, never an error.
        #[test]
        fn the_issued_cookie_is_found_among_any_others(
            pairs in proptest::collection::vec(pairs(), 0..8),
            separator in "(; |;|;  | ; )",
            oversized in proptest::bool::weighted(0.1),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let c = cluster();
                let layer = StickyLayer::new(&c.pool, SessionKey::insert_cookie(insert_cookie()));
                let svc = stack(&c.pool, layer.clone());
                let first = send(&svc, Request::new(())).await.unwrap();
                let issued = cookie_of(&first).unwrap();
                let genuine = issued.strip_prefix("srv=").unwrap().to_owned();
                let home = served(&first).to_owned();

                let mut values = Vec::new();
                let mut header = Vec::new();
                for pair in &pairs {
                    let (value, text) = written(pair, &genuine);
                    values.extend(value);
                    header.push(text);
                }
                if oversized {
                    header.push(format!("filler={}", "x".repeat(tower_ha::sticky::MAX_COOKIE_HEADER)));
                }
                let header = header.join(&separator);
                let kept = !oversized && values.iter().take(4).any(|v| *v == genuine);

                let mut req = Request::new(());
                if !header.is_empty() {
                    req.headers_mut().insert(COOKIE, HeaderValue::from_str(&header).unwrap());
                }
                let res = send(&svc, req).await.unwrap();
                if kept {
                    assert_eq!(served(&res), home, "{header}");
                    assert_eq!(cookie_of(&res), None, "{header}");
                } else {
                    let fresh = cookie_of(&res).unwrap_or_else(|| panic!("no new session for {header}"));
                    assert_ne!(fresh, issued, "{header}");
                }
            });
        }
    }
}
