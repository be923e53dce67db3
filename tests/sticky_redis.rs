//! Two (or three) full replicas, each with its own pool, sticky layer,
//! balancer and `RedisStore`, sharing one real `redis-server`: sessions
//! follow each other across replicas, moves reach every replica through
//! pub/sub, a session is hydrated once however many replicas load it at
//! once, and a Redis restart loses nothing that was acknowledged.

#[macro_use]
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use http::{Request, Response};
use support::redis_server::RedisServer;
use support::wait::{bounded_real, spin_until};
use tokio::time::{sleep, Instant};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_ha::balance::{BalanceLayer, RoundRobin};
use tower_ha::sticky::{SessionKey, StickyLayer};
use tower_ha::store::{RedisStore, Session, SessionStore};
use tower_ha::{BoxError, HealthStatus, Pool};

const NAMES: [&str; 3] = ["a", "b", "c"];

/// Backends for a replica that needs more than three (two of which may be
/// unhealthy without putting the pool in panic).
const MORE_NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

type Backend = tower::util::BoxCloneSyncService<Request<()>, Response<String>, BoxError>;
type Stack = tower::util::BoxCloneSyncService<Request<()>, Response<String>, BoxError>;

fn backend(name: &'static str) -> Backend {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_req: Request<()>| async move {
        Ok::<_, BoxError>(Response::new(name.to_owned()))
    }))
}

/// One replica: its own view of the same three backends, its own sticky
/// table, its own connection to Redis.
struct Replica {
    pool: Pool<Backend>,
    layer: StickyLayer,
    svc: Stack,
    store: RedisStore,
    /// Sessions this replica restored, by key.
    restores: Arc<Mutex<HashMap<String, usize>>>,
    /// Told each time a restore hook starts.
    hook_started: Arc<tokio::sync::Notify>,
    /// The task that follows the other replicas' move notices.
    follower: Option<tokio::task::JoinHandle<()>>,
}

struct Options {
    /// Drop cached sessions on the other replicas' move notices.
    follow_moves: bool,
    /// How long the restore hook takes.
    restore_takes: Duration,
    /// The backends.
    names: &'static [&'static str],
    /// The layer's saves wait until this says `true`.
    saves_wait_for: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            follow_moves: true,
            restore_takes: Duration::ZERO,
            names: &NAMES,
            saves_wait_for: None,
        }
    }
}

/// A store whose saves wait until they may go.
#[derive(Clone)]
struct HeldSaves {
    inner: RedisStore,
    go: tokio::sync::watch::Receiver<bool>,
}

impl SessionStore for HeldSaves {
    fn save<'a>(&'a self, session: &'a Session) -> tower_ha::store::StoreFuture<'a, ()> {
        let mut go = self.go.clone();
        Box::pin(async move {
            let _ = go.wait_for(|go| *go).await;
            self.inner.save(session).await
        })
    }

    pass_on!(inner: load_all, load, delete);
}

async fn replica(server: &RedisServer, options: Options) -> Replica {
    let pool = Pool::new();
    for &name in options.names {
        pool.insert(name, backend(name));
    }
    let store = RedisStore::builder(server.url())
        .timeout(Duration::from_millis(500))
        .lease(Duration::from_secs(5), Duration::from_secs(10))
        .build()
        .await
        .expect("connect");
    let restores: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counted = restores.clone();
    let hook_started = Arc::new(tokio::sync::Notify::new());
    let started = hook_started.clone();
    let takes = options.restore_takes;
    let layer = StickyLayer::new(&pool, SessionKey::header("x-session-id"));
    let layer = match options.saves_wait_for {
        Some(go) => layer.store(HeldSaves {
            inner: store.clone(),
            go,
        }),
        None => layer.store(store.clone()),
    };
    let layer = layer
        .hydrate(store.clone())
        .on_restore(move |session: Session| {
            let counted = counted.clone();
            started.notify_one();
            async move {
                // Reconnecting to the session's state takes a while.
                sleep(takes).await;
                *counted.lock().entry(session.key).or_default() += 1;
                Ok::<(), BoxError>(())
            }
        });
    let follower = if options.follow_moves {
        Some(layer.follow(store.subscribe().await.expect("subscribe")))
    } else {
        None
    };
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(pool.clone());
    Replica {
        pool,
        layer,
        svc: tower::util::BoxCloneSyncService::new(svc),
        store,
        restores,
        hook_started,
        follower,
    }
}

impl Replica {
    /// The backend that served a request for session `key`.
    async fn send(&self, key: &str) -> String {
        let req = Request::builder()
            .header("x-session-id", key)
            .body(())
            .unwrap();
        self.svc
            .clone()
            .oneshot(req)
            .await
            .expect("a backend answers")
            .into_body()
    }

    /// A request naming no session, to move the round robin along.
    async fn send_anonymous(&self) -> String {
        let mut svc = self.svc.clone();
        let svc = svc.ready().await.unwrap();
        svc.call(Request::new(())).await.unwrap().into_body()
    }

    fn set_health(&self, name: &str, health: HealthStatus) {
        self.pool.state(&name.into()).unwrap().set_health(health);
    }

    /// Waits until this replica's table no longer holds `key`.
    async fn until_forgotten(&self, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.layer.session(key).is_some() {
            assert!(
                Instant::now() < deadline,
                "the move notice for {key} never arrived"
            );
            sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_started_on_one_replica_goes_to_the_same_backend_through_another() {
    let server = RedisServer::start();
    let a = replica(&server, Options::default()).await;
    let b = replica(&server, Options::default()).await;
    for i in 0..6 {
        let key = format!("s{i}");
        let home = a.send(&key).await;
        // B's round robin is elsewhere: left alone it would pick another
        // backend for some of these.
        b.send_anonymous().await;
        for _ in 0..3 {
            assert_eq!(b.send(&key).await, home, "session {key}");
        }
    }
    // Once each, and again only when A's notice about the new session
    // reaches B during that read: B cannot tell it from a move made
    // meanwhile, so it reads the record as it is now.
    let loaded = b.layer.stats().loaded;
    assert!(
        (6..=12).contains(&loaded),
        "B read each session once or twice: {loaded}"
    );
    assert_eq!(b.layer.stats().created, 0, "B started none");
    assert_eq!(
        a.layer.stats().store_errors + b.layer.stats().store_errors,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_on_one_replica_reaches_the_others() {
    let server = RedisServer::start();
    let a = replica(&server, Options::default()).await;
    let b = replica(&server, Options::default()).await;
    // A replica that does not follow move notices, to show what they fix.
    let deaf = replica(
        &server,
        Options {
            follow_moves: false,
            ..Options::default()
        },
    )
    .await;

    let home = a.send("s").await;
    assert_eq!(b.send("s").await, home);
    assert_eq!(deaf.send("s").await, home);

    // The session's backend dies; B notices first (A's and the deaf
    // replica's checks have not run yet), and B's next request for the
    // session moves it.
    b.set_health(&home, HealthStatus::Unhealthy);
    let moved_to = b.send("s").await;
    assert_ne!(moved_to, home, "B moved the session off the dead backend");
    assert_eq!(b.layer.stats().moved, 1);
    let stored = b.store.load("s").await.unwrap().unwrap();
    assert_eq!(stored.backend.as_str(), moved_to, "the move was saved");

    // A drops its cached affinity on B's notice, and its next request for
    // the session goes to the new backend, although A still believes the
    // old one is healthy.
    a.until_forgotten("s").await;
    assert!(a.pool.state(&home.as_str().into()).unwrap().is_available());
    for _ in 0..3 {
        assert_eq!(a.send("s").await, moved_to, "A follows B's move");
    }
    assert_eq!(a.layer.stats().moved, 0, "A did not move it again");
    assert_eq!(a.layer.session("s").unwrap().backend.as_str(), moved_to);

    // Without the notices, a replica keeps routing to the old backend.
    assert_eq!(deaf.send("s").await, home);
}

/// The task following the notices ends, and its subscription with it, once
/// the layer and its services are gone: a gateway that rebuilds its stack
/// leaks neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_of_a_layer_ends_with_it() {
    let server = RedisServer::start();
    let mut a = replica(&server, Options::default()).await;
    let follower = a.follower.take().unwrap();
    let channel = a.store.channel().to_owned();
    assert_eq!(subscribers(&server, &channel), 1);
    a.send("s").await;
    assert!(!follower.is_finished(), "it follows while the layer lives");
    drop(a);
    bounded_real("the follower ends", follower).await.unwrap();
    bounded_real("its subscription closes", async {
        while subscribers(&server, &channel) != 0 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// How many connections Redis counts as subscribed to `channel`.
fn subscribers(server: &RedisServer, channel: &str) -> usize {
    let answer = server.command(&format!("PUBSUB NUMSUB {channel}"));
    let count = answer.lines().last().and_then(|l| l.strip_prefix(':'));
    count.and_then(|n| n.parse().ok()).expect(&answer)
}

/// Both replicas get the first requests for five stored sessions at the
/// same moment: each session is restored by exactly one of them, and both
/// route it to its backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_hydration_from_two_replicas_restores_a_session_once() {
    let server = RedisServer::start();
    let slow = || Options {
        restore_takes: Duration::from_millis(100),
        ..Options::default()
    };
    let a = replica(&server, slow()).await;
    let b = replica(&server, slow()).await;
    // Sessions left in Redis by an earlier generation of replicas.
    let earlier = RedisStore::builder(server.url()).build().await.unwrap();
    let keys: Vec<String> = (0..5).map(|i| format!("kernel-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let s = Session::new(key.as_str(), NAMES[i % 3].into());
        earlier.save(&s).await.unwrap();
    }

    let requests = keys.iter().flat_map(|key| {
        [a.send(key), b.send(key)]
            .into_iter()
            .map(move |f| async move { (key.clone(), f.await) })
    });
    let answers = futures::future::join_all(requests).await;
    for (key, served) in &answers {
        let i: usize = key.trim_start_matches("kernel-").parse().unwrap();
        assert_eq!(served, NAMES[i % 3], "{key} went to its stored backend");
    }
    for key in &keys {
        let on = |r: &Replica| r.restores.lock().get(key).copied().unwrap_or(0);
        assert_eq!(
            on(&a) + on(&b),
            1,
            "{key} restored once, by one replica, not once per replica"
        );
    }
    assert_eq!(
        a.layer.stats().hydrated + b.layer.stats().hydrated,
        5,
        "and counted once"
    );
    // One read per session on each replica, and a second one (without
    // restoring) when the other replica's notice about that session
    // arrives during the first: it cannot tell it from a move.
    for r in [&a, &b] {
        let loaded = r.layer.stats().loaded;
        assert!((5..=10).contains(&loaded), "{loaded} reads");
    }
    assert!(a.layer.stats().store_errors + b.layer.stats().store_errors == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_goes_on_when_its_client_leaves_and_releases_its_lease() {
    let server = RedisServer::start();
    // Without move notices: the record written below would make the
    // replica forget the session whenever its notice lands.
    let a = replica(
        &server,
        Options {
            restore_takes: Duration::from_millis(300),
            follow_moves: false,
            ..Options::default()
        },
    )
    .await;
    let earlier = RedisStore::builder(server.url()).build().await.unwrap();
    earlier
        .save(&Session::new("kernel", NAMES[1].into()))
        .await
        .unwrap();

    // The client gives up while the session is being restored.
    tokio::select! {
        _ = a.send("kernel") => panic!("answered before its restore ran"),
        () = a.hook_started.notified() => {}
    }
    let deadline = Instant::now() + Duration::from_secs(4);
    while a.restores.lock().get("kernel").copied().unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "the restore was abandoned with its client"
        );
        sleep(Duration::from_millis(10)).await;
    }
    // Released once restored, not left to expire (the lease lasts 5 s).
    while earlier.is_leased("kernel").await.unwrap() {
        assert!(Instant::now() < deadline, "the lease was left to expire");
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.send("kernel").await, NAMES[1]);
    assert_eq!(a.restores.lock()["kernel"], 1, "restored once");
    assert_eq!(a.layer.stats().hydrated, 1);
}

/// Redis is killed with SIGKILL and restarted while a replica serves:
/// known sessions keep their backend from the in-memory table, saves fail
/// while Redis is down and resume once it is back, and every session whose
/// save was acknowledged is still in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_keeps_serving_and_loses_nothing_acknowledged() {
    let mut server = RedisServer::start();
    let a = replica(&server, Options::default()).await;
    let mut homes = Vec::new();
    for i in 0..9 {
        let key = format!("before-{i}");
        homes.push((key.clone(), a.send(&key).await));
    }
    assert_eq!(
        a.layer.stats().store_errors,
        0,
        "all nine saves acknowledged"
    );

    server.kill();
    for (key, home) in &homes {
        assert_eq!(&a.send(key).await, home, "{key} served from the table");
    }
    // A new session is served, but its save fails and is counted.
    let _ = a.send("during").await;
    let errors = a.layer.stats().store_errors;
    assert!(errors >= 1, "the failed save is reported");

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a
        .store
        .save(&Session::new("probe", "a".into()))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "writes did not resume");
        sleep(Duration::from_millis(50)).await;
    }
    let after = a.send("after").await;
    assert_eq!(a.layer.stats().store_errors, errors, "the new save worked");
    for (key, home) in &homes {
        assert_eq!(&a.send(key).await, home, "{key} after the restart");
    }

    let fresh = RedisStore::builder(server.url()).build().await.unwrap();
    for (key, home) in &homes {
        let s = fresh.load(key).await.unwrap().expect("acknowledged, kept");
        assert_eq!(&s.backend.as_str(), home);
    }
    assert_eq!(
        fresh.load("after").await.unwrap().unwrap().backend.as_str(),
        after
    );
}

/// A replica reads a session's record only once its own writes of it have
/// landed. Read before, the record would be older than its own change,
/// whose notice it does not hear: it would route the session elsewhere
/// than the other replicas, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reads_a_record_only_once_its_own_writes_of_it_landed() {
    let server = RedisServer::start();
    let more = || Options {
        names: &MORE_NAMES,
        ..Options::default()
    };
    let a = replica(&server, more()).await;
    let (go, saves) = tokio::sync::watch::channel(true);
    let b = replica(
        &server,
        Options {
            saves_wait_for: Some(saves),
            ..more()
        },
    )
    .await;
    let home = a.send("s").await;
    assert_eq!(b.send("s").await, home);

    // B moves the session off its dead backend; its save waits.
    go.send_replace(false);
    b.set_health(&home, HealthStatus::Unhealthy);
    let send = |replica: &Replica| {
        let svc = replica.svc.clone();
        let req = Request::builder()
            .header("x-session-id", "s")
            .body(())
            .unwrap();
        tokio::spawn(async move { svc.oneshot(req).await.unwrap().into_body() })
    };
    let moving = send(&b);
    spin_until("B moves the session", || {
        b.layer
            .session("s")
            .is_some_and(|s| s.backend.as_str() != home)
    })
    .await;
    let x = b.layer.session("s").unwrap().backend.to_string();
    // Meanwhile A moves it elsewhere (y), and B forgets it on A's notice.
    a.set_health(&home, HealthStatus::Unhealthy);
    a.set_health(&x, HealthStatus::Unhealthy);
    let y = a.send("s").await;
    assert!(y != x && y != home);
    b.until_forgotten("s").await;

    // B's next request waits for B's own save before it reads the record.
    let next = send(&b);
    sleep(Duration::from_millis(200)).await;
    assert!(
        !next.is_finished(),
        "read the record before this replica's own save of it landed"
    );
    go.send_replace(true);
    assert_eq!(bounded_real("the move", moving).await.unwrap(), x);
    assert_eq!(bounded_real("the next request", next).await.unwrap(), x);
    // A follows B's move, the last one: both route the session alike.
    a.until_forgotten("s").await;
    a.set_health(&x, HealthStatus::Healthy);
    assert_eq!(a.send("s").await, x);
    assert_eq!(b.send("s").await, x);
}

/// A session whose record is deleted while this replica waits for the
/// lock to restore it is not restored: the replica that wins the lock
/// finds no record when it reads it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_before_its_lock_is_had_is_not_restored() {
    let server = RedisServer::start();
    let a = replica(&server, Options::default()).await;
    let other = RedisStore::builder(server.url()).build().await.unwrap();
    other
        .save(&Session::new("kernel", NAMES[1].into()))
        .await
        .unwrap();
    // Another replica takes the lock and dies holding it: it expires in
    // three seconds.
    let dead = other
        .try_lease("kernel", Duration::from_secs(3))
        .await
        .unwrap()
        .unwrap();
    std::mem::forget(dead);
    let svc = a.svc.clone();
    let req = Request::builder()
        .header("x-session-id", "kernel")
        .body(())
        .unwrap();
    let waiting = tokio::spawn(async move { svc.oneshot(req).await.unwrap().into_body() });
    // It read the record, and waits for the lock.
    spin_until("the record is read", || a.layer.stats().loaded >= 1).await;
    // The session ends (a logout through another replica).
    other.delete(&["kernel".into()]).await.unwrap();
    bounded_real("the request", waiting).await.unwrap();
    assert_eq!(a.restores.lock().get("kernel").copied().unwrap_or(0), 0);
    assert_eq!(a.layer.stats().hydrated, 0);
}
