//! `RedisStore` against a real `redis-server` started by each test on a
//! free 127.0.0.1 port (see `tests/support/redis_server.rs`; run
//! `scripts/test.sh` to install it).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::redis_server::RedisServer;
use support::wait::bounded_real;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep, timeout, Instant};
use tower_ha::store::{Claim, Invalidation, RedisStore, Session, SessionStore};

fn session(key: &str, backend: &str) -> Session {
    Session::new(key, backend.into()).with_data(json!({"port": 52000}))
}

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::builder(server.url())
        .build()
        .await
        .expect("connect to the test server")
}

/// A plain connection for looking at what the store wrote.
fn raw(server: &RedisServer) -> redis::Connection {
    redis::Client::open(server.url())
        .and_then(|c| c.get_connection())
        .expect("raw connection")
}

#[tokio::test]
async fn redis_store_passes_the_contract() {
    let server = RedisServer::start();
    support::store_contract::run(Arc::new(store(&server).await)).await;
    support::store_contract::refuses_data_nested_too_deep(&store(&server).await).await;
    support::store_contract::refresh_keeps_a_newer_record(&store(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_passes_the_contract_on_a_multi_thread_runtime_with_a_ttl() {
    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .prefix("other:")
        .ttl(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    // Sessions in use are saved again before they can expire.
    assert_eq!(store.refresh_interval(), Some(Duration::from_secs(30)));
    assert_eq!(self::store(&server).await.refresh_interval(), None);
    support::store_contract::run(Arc::new(store)).await;
}

#[tokio::test]
async fn a_timeout_of_practically_never_still_connects() {
    let server = RedisServer::start();
    for timeout in [Duration::from_secs(30 * 86_400), Duration::MAX] {
        let store = RedisStore::builder(server.url())
            .timeout(timeout)
            .build()
            .await
            .unwrap_or_else(|e| panic!("a {timeout:?} timeout: {e}"));
        store.save(&session("k", "a")).await.unwrap();
        assert!(store.load("k").await.unwrap().is_some());
    }
}

#[tokio::test]
async fn sessions_are_json_under_the_prefix() {
    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .prefix("gw:")
        .build()
        .await
        .unwrap();
    let s = session("alice", "node-a");
    store.save(&s).await.unwrap();
    assert_eq!(store.session_key("alice"), b"gw:s:alice");
    let mut conn = raw(&server);
    let stored: String = redis::cmd("GET")
        .arg("gw:s:alice")
        .query(&mut conn)
        .unwrap();
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored, serde_json::to_value(&s).unwrap());
    assert_eq!(stored["backend"], "node-a");
    assert!(stored["created"].is_u64(), "times are Unix milliseconds");
    let ttl: i64 = redis::cmd("PTTL")
        .arg("gw:s:alice")
        .query(&mut conn)
        .unwrap();
    assert_eq!(ttl, -1, "no TTL unless one is configured");
}

#[tokio::test]
async fn load_all_scans_thousands_of_keys_under_a_prefix_with_glob_characters() {
    let server = RedisServer::start();
    let globby = RedisStore::builder(server.url())
        .prefix("app*?[x]\\:")
        .build()
        .await
        .unwrap();
    // Keys an unescaped pattern `app*?[x]\:s:*` would also match.
    let neighbour = RedisStore::builder(server.url())
        .prefix("appZZx:")
        .build()
        .await
        .unwrap();
    for i in 0..10 {
        neighbour
            .save(&session(&format!("n-{i}"), "b"))
            .await
            .unwrap();
    }
    let mut expected = BTreeMap::new();
    let mut saves = Vec::new();
    for i in 0..1500 {
        let s = session(&format!("k-{i:04}"), &format!("node-{}", i % 3));
        expected.insert(s.key.clone(), s.clone());
        let store = globby.clone();
        saves.push(tokio::spawn(async move { store.save(&s).await }));
    }
    for save in saves {
        save.await.unwrap().unwrap();
    }
    // A lease is not a session.
    let lease = globby
        .try_lease("k-0001", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();

    let loaded = globby.load_all().await.unwrap();
    assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
    let got: BTreeMap<_, _> = loaded
        .sessions
        .into_iter()
        .map(|s| (s.key.clone(), s))
        .collect();
    assert_eq!(
        got.len(),
        1500,
        "every session once, and only this prefix's"
    );
    assert_eq!(got, expected);
    assert_eq!(neighbour.load_all().await.unwrap().sessions.len(), 10);
    assert!(lease.release().await.unwrap());
}

#[tokio::test]
async fn unreadable_records_are_skipped_and_reported() {
    let server = RedisServer::start();
    let store = store(&server).await;
    for i in 0..3 {
        store
            .save(&session(&format!("good-{i}"), "a"))
            .await
            .unwrap();
    }
    let mut conn = raw(&server);
    let good: Vec<u8> = redis::cmd("GET")
        .arg("tower-ha:s:good-0")
        .query(&mut conn)
        .unwrap();
    let mut set = |key: &[u8], value: &[u8]| {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query(&mut conn)
            .unwrap();
    };
    set(b"tower-ha:s:garbage", b"\x00\xff not json");
    set(b"tower-ha:s:shape", b"[1, 2, 3]");
    set(b"tower-ha:s:moved", &good);
    set(b"tower-ha:s:\xff\xfe", &good);
    // Keys that are not strings at all: `MGET` answers nil for them, as
    // for a key deleted since the scan.
    let _: () = redis::cmd("HSET")
        .arg("tower-ha:s:hash")
        .arg("key")
        .arg("hash")
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg("tower-ha:s:list")
        .arg(&good)
        .query(&mut conn)
        .unwrap();

    let loaded = store.load_all().await.unwrap();
    let mut keys: Vec<_> = loaded.sessions.iter().map(|s| s.key.clone()).collect();
    keys.sort();
    assert_eq!(keys, ["good-0", "good-1", "good-2"]);
    assert_eq!(loaded.skipped.len(), 6, "{:?}", loaded.skipped);
    for skipped in &loaded.skipped {
        assert!(skipped.error.is_corrupt(), "{:?}", skipped.error);
        assert!(skipped.record.starts_with("tower-ha:s:"));
    }
    let mut skipped: Vec<_> = loaded.skipped.iter().map(|s| s.record.clone()).collect();
    skipped.sort();
    assert!(
        skipped.contains(&"tower-ha:s:hash".to_owned()),
        "{skipped:?}"
    );
    assert!(
        skipped.contains(&"tower-ha:s:list".to_owned()),
        "{skipped:?}"
    );
    assert!(store.load("garbage").await.unwrap_err().is_corrupt());
    assert!(store.load("moved").await.unwrap_err().is_corrupt());
    let err = store.load("hash").await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
}

/// Records are as large as in the other stores: a save of a session too
/// large for a store to read back is refused, the record left as it was,
/// and a value over 64 MiB that something else wrote is corrupt, skipped
/// by a listing, even when it holds a session.
#[tokio::test]
async fn records_are_no_larger_than_the_stores_read() {
    // The stores' `MAX_READ`; a save leaves 64 KiB of it for what an
    // answer wraps a record in, so one byte more is refused.
    const MAX_READ: usize = 64 * 1024 * 1024;
    const ROOM: usize = 64 * 1024;
    let server = RedisServer::start();
    let store = store(&server).await;
    let kept = session("big", "node-a");
    store.save(&kept).await.unwrap();
    let padded = |key: &str, len: usize| {
        let empty = serde_json::to_vec(&session(key, "node-b").with_data(json!("")))
            .unwrap()
            .len();
        let s = session(key, "node-b").with_data(json!("x".repeat(len - empty)));
        assert_eq!(serde_json::to_vec(&s).unwrap().len(), len);
        s
    };

    let err = store
        .save(&padded("big", MAX_READ - ROOM + 1))
        .await
        .unwrap_err();
    assert!(err.is_rejected(), "{err:?}");
    assert_eq!(store.load("big").await.unwrap(), Some(kept.clone()));

    // A session, one byte over, written by something else.
    let huge = serde_json::to_vec(&padded("huge", MAX_READ + 1)).unwrap();
    let _: () = redis::cmd("SET")
        .arg("tower-ha:s:huge")
        .arg(huge)
        .query(&mut raw(&server))
        .unwrap();
    // (Only keys in the messages: a session read would fill the screen.)
    match store.load("huge").await {
        Err(err) => assert!(err.is_corrupt(), "{err:?}"),
        Ok(read) => panic!("read as {:?}", read.map(|s| s.key)),
    }
    let loaded = store.load_all().await.unwrap();
    let keys: Vec<_> = loaded.sessions.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["big"]);
    assert_eq!(loaded.sessions[0], kept);
    assert_eq!(loaded.skipped.len(), 1, "{:?}", loaded.skipped);
    assert_eq!(loaded.skipped[0].record, "tower-ha:s:huge");
    assert!(loaded.skipped[0].error.is_corrupt());
}

/// A server out of memory or out of connections serves again once
/// sessions expire or clients leave: try later, not a refusal.
#[tokio::test]
async fn a_full_server_is_unavailable_not_a_refusal() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let mut conn = raw(&server);
    let config = |conn: &mut redis::Connection, name: &str, value: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query(conn)
            .unwrap();
    };
    // `maxmemory` reached with the default `noeviction` policy: writes
    // answer `OOM`.
    config(&mut conn, "maxmemory", "1");
    let err = store.save(&session("k", "a")).await.unwrap_err();
    assert!(err.is_unavailable() && err.is_transient(), "{err:?}");
    config(&mut conn, "maxmemory", "0");
    store.save(&session("k", "a")).await.unwrap();

    // No connection left: Redis tells a new client `ERR max number of
    // clients reached` and closes the connection, so the client sees
    // that answer or a broken connection (the mapping of the answer
    // itself is checked in `map_error`'s unit tests).
    config(&mut conn, "maxclients", "1");
    let err = RedisStore::builder(server.url()).build().await.unwrap_err();
    assert!(err.is_unavailable() && err.is_transient(), "{err:?}");
}

/// A server out of memory queues no command in a transaction and writes
/// no tombstone: a delete still goes through (it frees memory), without
/// tombstones, and is still announced; with or without a TTL.
#[tokio::test]
async fn a_delete_on_a_server_out_of_memory_still_deletes_and_tells() {
    for ttl in [None, Some(Duration::from_secs(60))] {
        let server = RedisServer::start();
        let build = || async {
            let mut builder = RedisStore::builder(server.url()).notify(true);
            if let Some(ttl) = ttl {
                builder = builder.ttl(ttl);
            }
            builder.build().await.unwrap()
        };
        let store = build().await;
        let keys: Vec<String> = ["a", "b"].map(String::from).to_vec();
        for key in &keys {
            store.save(&session(key, "x")).await.unwrap();
        }
        // Another replica hears the notices (a store's own are not yielded).
        let mut notices = build().await.subscribe().await.unwrap();
        let mut conn = raw(&server);
        let exists = |conn: &mut redis::Connection, key: &str| -> bool {
            redis::cmd("EXISTS").arg(key).query(conn).unwrap()
        };
        let maxmemory = |value: &str| {
            let answer = server.command(&format!("CONFIG SET maxmemory {value}"));
            assert!(answer.starts_with("+OK"), "{answer}");
        };
        maxmemory("1");
        // Writes are refused now.
        let refused = store.save(&session("c", "x")).await.unwrap_err();
        assert!(refused.is_unavailable(), "{refused:?}");

        store.delete(&keys).await.unwrap();
        for key in &keys {
            assert!(!exists(&mut conn, &format!("tower-ha:s:{key}")), "{key}");
            assert!(!exists(&mut conn, &format!("tower-ha:d:{key}")), "{key}");
            assert!(store.load(key).await.unwrap().is_none(), "{key}");
            assert_eq!(next(&mut notices).await, notice(key, None));
        }

        // With memory again, a delete is a transaction again, which
        // leaves tombstones with a TTL.
        maxmemory("0");
        store.save(&session("c", "x")).await.unwrap();
        store.delete(&["c".to_owned()]).await.unwrap();
        assert!(!exists(&mut conn, "tower-ha:s:c"));
        assert_eq!(exists(&mut conn, "tower-ha:d:c"), ttl.is_some());
    }
}

#[tokio::test]
async fn loads_refresh_the_ttl_listings_do_not_and_unused_sessions_expire() {
    let server = RedisServer::start();
    let ttl = Duration::from_secs(60);
    let store = RedisStore::builder(server.url())
        .ttl(ttl)
        .build()
        .await
        .unwrap();
    store.save(&session("used", "a")).await.unwrap();
    store.save(&session("idle", "a")).await.unwrap();
    let mut conn = raw(&server);
    let pttl = |conn: &mut redis::Connection, key: &str| -> i64 {
        redis::cmd("PTTL")
            .arg(format!("tower-ha:s:{key}"))
            .query(conn)
            .unwrap()
    };
    let pexpire = |conn: &mut redis::Connection, key: &str, ms: u64| {
        let _: i64 = redis::cmd("PEXPIRE")
            .arg(format!("tower-ha:s:{key}"))
            .arg(ms)
            .query(conn)
            .unwrap();
    };
    let p = pttl(&mut conn, "used");
    assert!(p > 50_000 && p <= 60_000, "a save sets the TTL: {p}");

    // Near the end of its TTL, a load gives the session its whole TTL back.
    pexpire(&mut conn, "used", 5_000);
    assert!(pttl(&mut conn, "used") <= 5_000);
    assert!(store.load("used").await.unwrap().is_some());
    let p = pttl(&mut conn, "used");
    assert!(p > 50_000, "a load refreshes the TTL: {p}");

    // A listing (a restore) renews nothing: restarts do not keep a session
    // nobody uses alive.
    pexpire(&mut conn, "idle", 5_000);
    assert_eq!(store.load_all().await.unwrap().sessions.len(), 2);
    let p = pttl(&mut conn, "idle");
    assert!(
        (1..=5_000).contains(&p),
        "a listing left the TTL of idle as it was: {p}"
    );

    // A session whose TTL runs out is gone (Redis expires it).
    pexpire(&mut conn, "idle", 1);
    bounded_real("Redis expires the idle session", async {
        while pttl(&mut conn, "idle") != -2 {
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(
        store.load("idle").await.unwrap(),
        None,
        "a session nobody loaded expired"
    );
    assert!(
        store.load("used").await.unwrap().is_some(),
        "the other stays"
    );
}

#[tokio::test]
async fn failures_are_typed() {
    // Nothing listens (the port is bound, so no other test's server can
    // take it): unavailable.
    let port = support::http::refused().await.port();
    let err = RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .build()
        .await
        .unwrap_err();
    assert!(err.is_unavailable() && err.is_transient(), "{err:?}");

    // A zero timeout, which would fail every command.
    let err = RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .timeout(Duration::ZERO)
        .build()
        .await
        .unwrap_err();
    assert!(err.is_other(), "{err:?}");
    let why = std::error::Error::source(&err).unwrap().to_string();
    assert!(why.contains("above zero"), "{why}");

    // A bad URL.
    let err = RedisStore::builder("http://127.0.0.1/")
        .build()
        .await
        .unwrap_err();
    assert!(err.is_other(), "{err:?}");

    // A password is required, and a wrong one is refused.
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://127.0.0.1:{}/", server.port());
    let err = RedisStore::builder(&url).build().await.unwrap_err();
    assert!(err.is_unauthorized(), "no password: {err:?}");
    let wrong = format!("redis://:nope@127.0.0.1:{}/", server.port());
    let err = RedisStore::builder(&wrong).build().await.unwrap_err();
    assert!(err.is_unauthorized(), "wrong password: {err:?}");
    assert!(!format!("{:?}", RedisStore::builder(&wrong)).contains("nope"));
    let right = format!("redis://:s3cret@127.0.0.1:{}/", server.port());
    // On another database, the client's `SELECT` meets the refusal first.
    let other_db = format!("redis://127.0.0.1:{}/1", server.port());
    let err = RedisStore::builder(&other_db).build().await.unwrap_err();
    assert!(err.is_unauthorized(), "no password, database 1: {err:?}");
    // A user without the permission to switch database.
    let mut admin = redis::Client::open(right.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "gw", "on", ">pw", "~*", "&*", "+@all", "-select"][..])
        .query(&mut admin)
        .unwrap();
    let no_select = format!("redis://gw:pw@127.0.0.1:{}/1", server.port());
    let err = RedisStore::builder(&no_select).build().await.unwrap_err();
    assert!(err.is_unauthorized(), "no SELECT permission: {err:?}");
    let store = RedisStore::builder(&right).build().await.unwrap();
    store.save(&session("k", "a")).await.unwrap();
    assert!(!format!("{store:?}").contains("s3cret"));

    // A server that does not answer in time: paused far longer than the
    // store waits, however slowly the test runs. Nothing else uses this
    // server, which is killed (not unpaused) when the test ends.
    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut conn = raw(&server);
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(60_000)
        .arg("ALL")
        .query(&mut conn)
        .unwrap();
    let err = store.load("k").await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
}

/// A server the store cannot work with fails the build, rather than every
/// load or refresh later: a user missing a command the store needs
/// (`NOPERM`, or the same refused inside a script), and a server older
/// than Redis 6.2, which has no `GETEX` (a server with the command renamed
/// away stands for one). The permissions the docs list are enough.
#[tokio::test]
async fn a_server_the_store_cannot_work_with_fails_the_build() {
    let server = RedisServer::start();
    let mut admin = raw(&server);
    let port = server.port();
    let user = |admin: &mut redis::Connection, name: &str, rules: &[&str]| {
        let _: () = redis::cmd("ACL")
            .arg(&["SETUSER", name, "on", ">pw"][..])
            .arg(rules)
            .query(admin)
            .unwrap();
        format!("redis://{name}:pw@127.0.0.1:{port}/")
    };
    let ttl = Duration::from_secs(60);
    let build = |url: String, ttl: Option<Duration>| async move {
        let builder = RedisStore::builder(url);
        match ttl {
            Some(ttl) => builder.ttl(ttl).build().await,
            None => builder.build().await,
        }
    };
    let all = ["~*", "&*", "+@all"];

    // Loads use `GETEX` only with a TTL.
    let url = user(&mut admin, "no-getex", &[&all[..], &["-getex"]].concat());
    let store = build(url.clone(), None).await.unwrap();
    store.save(&session("k", "a")).await.unwrap();
    assert!(store.load("k").await.unwrap().is_some());
    let err = build(url, Some(ttl)).await.unwrap_err();
    assert!(err.is_unauthorized(), "no GETEX: {err:?}");

    // Leases and refreshes run scripts: `EVALSHA`, `SCRIPT LOAD` when
    // Redis does not know one yet, and the commands they call.
    for (name, rule, with_ttl) in [
        ("no-evalsha", "-evalsha", None),
        ("no-script-load", "-script|load", None),
        ("no-evalsha-ttl", "-evalsha", Some(ttl)),
        ("no-pexpire", "-pexpire", Some(ttl)),
    ] {
        let url = user(&mut admin, name, &[&all[..], &[rule]].concat());
        let err = build(url, with_ttl).await.unwrap_err();
        assert!(err.is_unauthorized(), "{name}: {err:?}");
    }

    // What the docs give a gateway's user is enough, with a TTL too.
    let url = user(
        &mut admin,
        "gateway",
        &[
            "~gateway:*",
            "&gateway:moves",
            "+ping",
            "+get",
            "+getex",
            "+set",
            "+pexpire",
            "+mget",
            "+type",
            "+del",
            "+scan",
            "+publish",
            "+subscribe",
            "+multi",
            "+exec",
            "+evalsha",
            "+script|load",
        ],
    );
    let store = RedisStore::builder(url)
        .prefix("gateway:")
        .ttl(ttl)
        .build()
        .await
        .unwrap();
    store.save(&session("k", "a")).await.unwrap();
    assert!(store.load("k").await.unwrap().is_some());
    store.refresh(&session("k", "a")).await.unwrap();
    let lease = store.try_lease("k", ttl).await.unwrap().unwrap();
    assert!(lease.release().await.unwrap());
    // Nothing was left behind by the builds' checks: only what this test
    // wrote, and the released lease.
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut admin).unwrap();
    keys.sort();
    assert_eq!(keys, ["gateway:l:k", "gateway:s:k", "tower-ha:s:k"]);

    // No `GETEX`, as before Redis 6.2: fine without a TTL only.
    let old = RedisServer::start_with(&["--rename-command", "GETEX", ""]);
    build(old.url(), None).await.unwrap();
    let err = build(old.url(), Some(ttl)).await.unwrap_err();
    assert!(err.is_rejected(), "no GETEX on the server: {err:?}");
}

/// Redis is killed with SIGKILL and restarted mid-run: every save that was
/// acknowledged is there afterwards, saves attempted while it is down fail
/// (never dropped silently), and saves work again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_across_a_redis_restart() {
    let mut server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let mut acknowledged = BTreeMap::new();
    for i in 0..100 {
        let s = session(&format!("before-{i}"), "node-a");
        store.save(&s).await.unwrap();
        acknowledged.insert(s.key.clone(), s);
    }

    server.kill();
    let mut failed = Vec::new();
    for i in 0..5 {
        let s = session(&format!("down-{i}"), "node-a");
        let err = store
            .save(&s)
            .await
            .expect_err("a save while Redis is down fails");
        assert!(err.is_transient(), "{err:?}");
        failed.push(s.key);
    }
    assert!(store.load("before-1").await.unwrap_err().is_transient());

    server.restart();
    // The connection comes back on its own; the first calls after the
    // restart may still see the old, broken connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    let resumed = loop {
        let s = session("after", "node-b");
        match store.save(&s).await {
            Ok(()) => break s,
            Err(e) => {
                assert!(e.is_transient(), "{e:?}");
                assert!(Instant::now() < deadline, "saves did not resume: {e:?}");
                sleep(Duration::from_millis(50)).await;
            }
        }
    };
    acknowledged.insert(resumed.key.clone(), resumed);
    for i in 0..20 {
        let s = session(&format!("after-{i}"), "node-b");
        store.save(&s).await.unwrap();
        acknowledged.insert(s.key.clone(), s);
    }

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let loaded = loop {
        match store.load_all().await {
            Ok(l) => break l,
            Err(e) => {
                assert!(Instant::now() < deadline, "loads did not resume: {e:?}");
                sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let got: BTreeMap<_, _> = loaded
        .sessions
        .into_iter()
        .map(|s| (s.key.clone(), s))
        .collect();
    assert_eq!(got.len(), 121);
    assert_eq!(got, acknowledged, "every acknowledged save survived");
    // A save reported as failed is not applied later behind the caller's
    // back (queued and sent once the connection is back).
    for key in &failed {
        assert_eq!(
            store.load(key).await.unwrap(),
            None,
            "{key} failed to save, yet it is stored"
        );
    }
}

/// A take whose call is dropped before its answer is read (a caller's own
/// timeout) may still land: it is given up, and nobody waits out its ttl.
#[tokio::test]
async fn a_lease_taken_by_a_dropped_call_is_given_up() {
    let server = RedisServer::start();
    let a = store(&server).await;
    let b = store(&server).await;
    assert!(!b.is_leased("k").await.unwrap());
    // The take's script is loaded, so that it is one command.
    assert!(a
        .try_lease("warm", Duration::from_secs(1))
        .await
        .unwrap()
        .is_some());
    // The server holds every command for half a second: the take is sent,
    // and runs once the call that sent it is gone.
    assert!(server.command("CLIENT PAUSE 500 ALL").starts_with("+OK"));
    let mut take = Box::pin(a.try_lease("k", Duration::from_secs(600)));
    for _ in 0..10 {
        assert!(
            futures::poll!(take.as_mut()).is_pending(),
            "answered in a pause"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(take);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = &b;
    bounded_real("the lease is given up", async {
        while b.is_leased("k").await.unwrap() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(b
        .try_lease("k", Duration::from_secs(30))
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn a_lease_has_one_owner_and_only_the_owner_releases_it() {
    let server = RedisServer::start();
    let a = store(&server).await;
    let b = store(&server).await;
    let ttl = Duration::from_secs(30);

    let lease = a.try_lease("k", ttl).await.unwrap().expect("free");
    assert_eq!(lease.key(), "k");
    assert!(b.try_lease("k", ttl).await.unwrap().is_none(), "held by a");
    assert!(a.try_lease("k", ttl).await.unwrap().is_none(), "even for a");
    assert!(b.is_leased("k").await.unwrap());
    assert!(
        b.try_lease("other", ttl).await.unwrap().is_some(),
        "per key"
    );
    assert!(lease.release().await.unwrap());
    assert!(!b.is_leased("k").await.unwrap());

    // An expired lease taken over by another owner is not released by the
    // first one.
    let stale = a
        .try_lease("k", Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    sleep(Duration::from_millis(300)).await;
    let current = b.try_lease("k", ttl).await.unwrap().expect("expired");
    assert!(!stale.extend(ttl).await.unwrap());
    assert!(!stale.release().await.unwrap(), "not the owner any more");
    assert!(a.is_leased("k").await.unwrap(), "b's lease stands");
    assert!(current.extend(Duration::from_secs(5)).await.unwrap());
    let left: i64 = redis::cmd("PTTL")
        .arg(a.lease_key("k"))
        .query(&mut raw(&server))
        .unwrap();
    assert!(
        left > 0 && left <= 5_000,
        "extended to 5 s from 30 s: {left} ms left"
    );
    assert!(current.extend(Duration::from_millis(1)).await.unwrap());
    bounded_real("the lease extended to 1 ms expires", async {
        while a.is_leased("k").await.unwrap() {
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// How many `GET`s Redis has answered since it started.
fn gets(url: &str) -> u64 {
    let mut conn = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("raw connection");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .unwrap();
    let calls = info
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_get:calls="))
        .and_then(|rest| rest.split(',').next());
    calls.map_or(0, |n| n.parse().unwrap())
}

/// Two replicas hydrate the same session at once, twenty times: each time
/// exactly one restores it and the other reads the winner's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_hydration_restores_a_session_once() {
    let server = RedisServer::start();
    let url = server.url();
    let replicas = [store(&server).await, store(&server).await];
    for round in 0..20 {
        let key = format!("kernel-{round}");
        replicas[0].save(&session(&key, "node-a")).await.unwrap();
        let restores = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(i, store)| {
                let (store, key, restores, barrier, url) = (
                    store.clone(),
                    key.clone(),
                    restores.clone(),
                    barrier.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    barrier.wait().await;
                    let claim = store
                        .claim(&key, Duration::from_secs(5), Duration::from_secs(5))
                        .await
                        .unwrap();
                    match claim {
                        Claim::Won(lease) => {
                            restores.fetch_add(1, Ordering::SeqCst);
                            let mut s = store.load(&key).await.unwrap().unwrap();
                            s.data = json!({"restored_by": i});
                            store.save(&s).await.unwrap();
                            // The restore lasts until the other replica,
                            // its take refused, has looked at the lease
                            // (a `GET`, which nothing else here sends
                            // meanwhile), so the claims overlap however
                            // late it came.
                            let seen = gets(&url);
                            bounded_real("the other claim looks at the lease", async {
                                while gets(&url) == seen {
                                    sleep(Duration::from_millis(2)).await;
                                }
                            })
                            .await;
                            assert!(lease.release().await.unwrap());
                            (true, s)
                        }
                        Claim::Lost(s) => (false, s.expect("the winner's session")),
                        other => panic!("{other:?}"),
                    }
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        assert_eq!(restores.load(Ordering::SeqCst), 1, "round {round}");
        let winners = results.iter().filter(|(won, _)| *won).count();
        assert_eq!(winners, 1, "round {round}");
        assert_eq!(
            results[0].1, results[1].1,
            "the loser read the winner's result"
        );
        assert!(results[0].1.data["restored_by"].is_u64());
    }
}

#[tokio::test]
async fn a_claim_gives_up_when_the_lease_is_held_too_long() {
    let server = RedisServer::start();
    let a = store(&server).await;
    let b = store(&server).await;
    let _held = a
        .try_lease("k", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let err = b
        .claim("k", Duration::from_secs(5), Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
}

/// A claim that waits for another replica's lease looks at it less and
/// less often, rather than every 10 ms for the whole wait.
#[tokio::test]
async fn a_waiting_claim_backs_off() {
    let server = RedisServer::start();
    let a = store(&server).await;
    let b = store(&server).await;
    a.save(&session("k", "node-a")).await.unwrap();
    let held = a
        .try_lease("k", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let before = gets(&server.url());
    let claim = tokio::spawn(async move {
        b.claim("k", Duration::from_secs(5), Duration::from_secs(10))
            .await
    });
    sleep(Duration::from_secs(2)).await;
    assert!(held.release().await.unwrap());
    match claim.await.unwrap().unwrap() {
        Claim::Lost(Some(session)) => assert_eq!(session.backend.as_str(), "node-a"),
        other => panic!("{other:?}"),
    }
    // About 2 s at most every 250 ms, and the final load: every 10 ms
    // would have been some 200 looks.
    let looks = gets(&server.url()) - before;
    assert!(looks <= 25, "{looks} GETs");
}

#[tokio::test]
async fn a_dead_winners_lease_expires_and_a_waiting_claim_takes_it_over() {
    let server = RedisServer::start();
    let a = store(&server).await;
    let b = store(&server).await;
    a.save(&session("k", "node-a")).await.unwrap();
    // a takes the lease and never releases it.
    std::mem::forget(
        a.try_lease("k", Duration::from_secs(3))
            .await
            .unwrap()
            .unwrap(),
    );
    let claim = tokio::spawn(async move {
        b.claim("k", Duration::from_secs(5), Duration::from_secs(10))
            .await
    });
    // While the dead winner's lease lives, the claim waits: it has had
    // time to try, and the lease still held after the look shows that the
    // claim did not return because it had expired.
    sleep(Duration::from_millis(200)).await;
    assert!(
        !claim.is_finished(),
        "the claim returned while the lease was held"
    );
    assert!(a.is_leased("k").await.unwrap());
    // Once it expires unreleased, the restore is still to do: the claim
    // takes the lease itself.
    match claim.await.unwrap().unwrap() {
        Claim::Won(lease) => assert!(lease.release().await.unwrap()),
        Claim::Lost(_) => panic!("the dead winner's restore was taken as done"),
        other => panic!("{other:?}"),
    }
    // Released: done, for those who still wait; free for a claim.
    assert!(!a.is_leased("k").await.unwrap());
    let again = a.try_lease("k", Duration::from_secs(5)).await.unwrap();
    assert!(again.is_some(), "a released lease can be taken again");
}

/// Pub/sub ignores database numbers: stores with one prefix on two
/// databases of one server (staging beside production) hear only their
/// own database's moves.
#[tokio::test]
async fn move_notices_stay_in_their_database() {
    let server = RedisServer::start();
    let on_db = |db: u8| {
        let url = format!("{}{db}", server.url());
        async move { RedisStore::builder(url).build().await.unwrap() }
    };
    let (zero, one, listener) = (on_db(0).await, on_db(1).await, on_db(1).await);
    assert_eq!(zero.channel(), "tower-ha:moves");
    assert_eq!(one.channel(), "tower-ha:moves@1");
    let mut heard = listener.subscribe().await.unwrap();
    zero.save(&session("other-database", "node-a"))
        .await
        .unwrap();
    one.save(&session("this-database", "node-a")).await.unwrap();
    assert!(
        matches!(next(&mut heard).await, Invalidation::Session { key, .. } if key == "this-database")
    );
}

/// A Redis that stalls for longer than the command timeout while a
/// subscription pings it is slow, not gone: the subscription stays, and
/// its replica is not told to forget every session.
#[tokio::test]
async fn a_stalled_server_keeps_its_subscriptions() {
    let server = RedisServer::start();
    let a = store(&server).await;
    let b = store(&server).await;
    let mut on_a = a.subscribe().await.unwrap();
    // The first ping goes 10 s after the subscription starts: every
    // client is paused from 8 s to 13 s, past the 2 s command timeout.
    sleep(Duration::from_secs(8)).await;
    assert!(server.command("CLIENT PAUSE 5000 ALL").starts_with("+OK"));
    sleep(Duration::from_secs(6)).await;
    b.publish_move("bob", Some(&"node-c".into())).await.unwrap();
    assert_eq!(next(&mut on_a).await, notice("bob", Some("node-c")));
}

async fn next(inv: &mut tower_ha::store::Invalidations) -> Invalidation {
    timeout(Duration::from_secs(5), inv.next())
        .await
        .expect("a notice within 5 s")
        .expect("the subscription is alive")
}

/// The notice of a session `key` moved to `backend`, or ended (`None`).
fn notice(key: &str, backend: Option<&str>) -> Invalidation {
    Invalidation::Session {
        key: key.into(),
        backend: backend.map(Into::into),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_renews_the_expiry_only_and_tells_nobody() {
    let server = RedisServer::start();
    let build = || async {
        RedisStore::builder(server.url())
            .ttl(Duration::from_secs(60))
            .build()
            .await
            .unwrap()
    };
    let (a, b) = (build().await, build().await);
    let mut on_b = b.subscribe().await.unwrap();
    let mut conn = raw(&server);
    let pttl = |conn: &mut redis::Connection| -> i64 {
        redis::cmd("PTTL")
            .arg(a.session_key("k"))
            .query(conn)
            .unwrap()
    };

    let old = session("k", "node-a");
    a.save(&old).await.unwrap();
    assert!(matches!(next(&mut on_b).await, Invalidation::Session { key, .. } if key == "k"));
    // b moves it; a, which still thinks it is on node-a, refreshes it.
    b.save(&session("k", "node-b")).await.unwrap();
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(a.session_key("k"))
        .arg(1000)
        .query(&mut conn)
        .unwrap();
    a.refresh(&old).await.unwrap();
    assert!(pttl(&mut conn) > 50_000, "the expiry renewed");
    let stored = a.load("k").await.unwrap().unwrap();
    assert_eq!(
        stored.backend.as_str(),
        "node-b",
        "the record left as it was"
    );
    // A record that expired all the same is written again, as a knows
    // it, with the TTL; still without a notice.
    let _: i64 = redis::cmd("DEL")
        .arg(a.session_key("k"))
        .query(&mut conn)
        .unwrap();
    a.refresh(&old).await.unwrap();
    assert!(pttl(&mut conn) > 50_000, "written again with its TTL");
    assert_eq!(
        a.load("k").await.unwrap().unwrap().backend.as_str(),
        "node-a"
    );
    // No notice of the refreshes: the next b hears is this one.
    a.save(&session("marker", "node-a")).await.unwrap();
    assert!(matches!(next(&mut on_b).await, Invalidation::Session { key, .. } if key == "marker"));
}

/// Replica a refreshes a session b has just ended (a has not heard of
/// the delete yet): the refresh must not write it back, while a record
/// that merely expired still is, and a new session under the same key is
/// saved and refreshed as any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_does_not_bring_back_a_session_another_replica_deleted() {
    let server = RedisServer::start();
    let ttl = Duration::from_secs(60);
    let build = || async {
        RedisStore::builder(server.url())
            .ttl(ttl)
            .build()
            .await
            .unwrap()
    };
    let (a, b) = (build().await, build().await);
    let mut conn = raw(&server);
    let pttl = |conn: &mut redis::Connection, key: &str| -> i64 {
        redis::cmd("PTTL").arg(key).query(conn).unwrap()
    };

    let old = session("k", "node-a");
    a.save(&old).await.unwrap();
    b.delete(&["k".into()]).await.unwrap();
    let left = pttl(&mut conn, "tower-ha:d:k");
    assert!(
        left > 50_000 && left <= 60_000,
        "a tombstone for one TTL: {left}"
    );
    // Let the tombstone run down a little: a blocked refresh renews it.
    let _: i64 = redis::cmd("PEXPIRE")
        .arg("tower-ha:d:k")
        .arg(5_000)
        .query(&mut conn)
        .unwrap();
    a.refresh(&old).await.unwrap();
    assert_eq!(
        a.load("k").await.unwrap(),
        None,
        "the refresh wrote a deleted session back"
    );
    assert!(
        pttl(&mut conn, "tower-ha:d:k") > 50_000,
        "tombstone renewed"
    );
    assert!(a.load_all().await.unwrap().sessions.is_empty());

    // A new session under that key: saved as usual, the tombstone gone.
    let new = session("k", "node-c");
    b.save(&new).await.unwrap();
    assert_eq!(pttl(&mut conn, "tower-ha:d:k"), -2, "the save removed it");
    a.refresh(&old).await.unwrap();
    assert_eq!(
        a.load("k").await.unwrap().unwrap().backend.as_str(),
        "node-c",
        "a refresh renews, it does not overwrite"
    );
    // It expires unused, then comes back in use: written again.
    let _: i64 = redis::cmd("DEL")
        .arg("tower-ha:s:k")
        .query(&mut conn)
        .unwrap();
    a.refresh(&new).await.unwrap();
    assert_eq!(a.load("k").await.unwrap(), Some(new));
    assert!(pttl(&mut conn, "tower-ha:s:k") > 50_000);

    // Without a TTL nothing is refreshed, so nothing is left behind.
    let plain = store(&server).await;
    plain.save(&session("p", "node-a")).await.unwrap();
    plain.delete(&["p".into()]).await.unwrap();
    assert_eq!(pttl(&mut conn, "tower-ha:d:p"), -2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_and_deletes_reach_the_other_replicas() {
    let mut server = RedisServer::start();
    let a = store(&server).await;
    let b = store(&server).await;
    let mut on_a = a.subscribe().await.unwrap();
    let mut on_b = b.subscribe().await.unwrap();

    a.save(&session("alice", "node-a")).await.unwrap();
    assert_eq!(next(&mut on_b).await, notice("alice", Some("node-a")));
    b.save(&session("alice", "node-b")).await.unwrap();
    b.delete(&["alice".into()]).await.unwrap();
    // A replica does not hear its own notices: the first thing a hears is b's.
    assert_eq!(next(&mut on_a).await, notice("alice", Some("node-b")));
    assert_eq!(next(&mut on_a).await, notice("alice", None));
    assert_eq!(
        b.publish_move("bob", Some(&"node-c".into())).await.unwrap(),
        2,
        "both subscriptions receive it"
    );
    // Invalidations are also a stream.
    let from_stream = timeout(Duration::from_secs(5), futures::StreamExt::next(&mut on_a))
        .await
        .expect("a notice within 5 s");
    assert!(matches!(from_stream, Some(Invalidation::Session { key, .. }) if key == "bob"));

    // Redis restarts: the subscription comes back and says notices may
    // have been lost.
    server.restart();
    assert_eq!(next(&mut on_a).await, Invalidation::All);
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.save(&session("carol", "node-a")).await.is_err() {
        assert!(Instant::now() < deadline, "saves resume");
        sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(next(&mut on_a).await, Invalidation::Session { key, .. } if key == "carol"));
}

/// A reader that falls behind is told to drop everything in place of the
/// notices it missed: the subscription holds at most 1024 for it, however
/// fast sessions move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_lags_gets_all_in_place_of_the_notices_it_missed() {
    const MOVES: usize = 3000;
    let server = RedisServer::start();
    let (a, b) = (store(&server).await, store(&server).await);
    let mut on_b = b.subscribe().await.unwrap();
    let node: tower_ha::BackendId = "node-a".into();
    for i in 0..MOVES {
        a.publish_move(&format!("s{i}"), Some(&node)).await.unwrap();
    }
    // Until the reader's buffer is full and a notice found no room.
    support::wait::spin_until("the reader is behind", || {
        format!("{on_b:?}").contains("pending: 1024, lagging: true")
    })
    .await;

    // What it holds, then the `All` owed for what it missed.
    let mut got = Vec::new();
    loop {
        let inv = next(&mut on_b).await;
        if inv == Invalidation::All {
            break;
        }
        assert!(matches!(inv, Invalidation::Session { .. }), "{inv:?}");
        got.push(inv);
    }
    assert_eq!(got.len(), 1024, "the notices held for the reader");
    // Caught up, the reader hears each notice again (after any that came
    // once it had room).
    a.publish_move("after", None).await.unwrap();
    bounded_real("the notice after", async {
        while next(&mut on_b).await != notice("after", None) {}
    })
    .await;
}

/// A subscription that loses Redis says so at `warn`, and, while it cannot
/// resubscribe, once at `warn` (then once a minute, each attempt between at
/// `debug`); back, it says that too, and the reader is told to drop what
/// it cached. On a current-thread runtime, so that the subscription's task
/// logs to this test's subscriber.
#[tokio::test]
async fn a_subscription_that_cannot_reconnect_says_so() {
    use support::tracing_capture::Capture;
    use tracing::Level;
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let mut server = RedisServer::start();
    let mut notices = store(&server).await.subscribe().await.unwrap();
    server.kill();
    let said = |start: &str, level: Level| {
        let events = capture.saying(start);
        events.iter().filter(|e| e.level == level).count()
    };
    // Several attempts fail (50 ms, then 100, 200, ...): said once.
    bounded_real("the failed attempts", async {
        while capture.saying("cannot resubscribe").len() < 4 {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(said("move notice subscription lost", Level::WARN), 1);
    assert_eq!(said("cannot resubscribe", Level::WARN), 1);
    assert!(said("cannot resubscribe", Level::DEBUG) >= 3);
    server.restart();
    assert_eq!(next(&mut notices).await, Invalidation::All);
    assert_eq!(said("move notice subscription back", Level::INFO), 1);
}

/// While a reader lags, notices are dropped without being parsed, so that
/// the subscription takes them off the Redis client's queue (which has no
/// bound) faster than the client fills it: a malformed notice, logged when
/// parsed, goes unlogged then. Once the reader has caught up, notices are
/// parsed again. On a current-thread runtime, so that the subscription's
/// task logs to this test's subscriber.
#[tokio::test]
async fn notices_are_dropped_unparsed_while_the_reader_lags() {
    use support::tracing_capture::Capture;
    const MALFORMED: &str = "ignoring a malformed move notice";
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let server = RedisServer::start();
    let (a, b) = (store(&server).await, store(&server).await);
    let mut on_b = b.subscribe().await.unwrap();
    let mut conn = raw(&server);
    let publish = |conn: &mut redis::Connection, payload: &str| {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(a.channel())
            .arg(payload)
            .query(conn)
            .unwrap();
    };
    let node: tower_ha::BackendId = "node-a".into();
    for i in 0..=1024 {
        a.publish_move(&format!("s{i}"), Some(&node)).await.unwrap();
    }
    support::wait::spin_until("the reader is behind", || {
        format!("{on_b:?}").contains("pending: 1024, lagging: true")
    })
    .await;

    for _ in 0..100 {
        publish(&mut conn, "not a notice");
    }
    // Time for the subscription to take them (a parsed one is logged at
    // once); the reader reads nothing meanwhile, so it still lags.
    sleep(Duration::from_millis(500)).await;
    assert!(format!("{on_b:?}").contains("lagging: true"));
    assert!(capture.saying(MALFORMED).is_empty(), "parsed while lagging");

    // Caught up: notices are parsed again.
    while next(&mut on_b).await != Invalidation::All {}
    publish(&mut conn, "not a notice");
    a.publish_move("after", None).await.unwrap();
    bounded_real("the notice after", async {
        while next(&mut on_b).await != notice("after", None) {}
    })
    .await;
    assert!(!capture.saying(MALFORMED).is_empty());
}

#[tokio::test]
async fn notices_can_be_turned_off() {
    let server = RedisServer::start();
    let quiet = RedisStore::builder(server.url())
        .notify(false)
        .build()
        .await
        .unwrap();
    let listener = store(&server).await;
    let mut notices = listener.subscribe().await.unwrap();
    quiet.save(&session("k", "a")).await.unwrap();
    quiet.publish_move("marker", None).await.unwrap();
    assert_eq!(
        next(&mut notices).await,
        notice("marker", None),
        "the save published nothing"
    );
}

/// On a multi-thread runtime: the guard's extender runs while the test
/// blocks its own thread on synchronous `PTTL` calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lock_outlives_its_ttl_while_held_and_expires_once_dropped() {
    use tower_ha::store::SessionLock;
    let server = RedisServer::start();
    let ttl = Duration::from_secs(3);
    let a = RedisStore::builder(server.url())
        .lease(ttl, Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let b = store(&server).await;
    let mut conn = raw(&server);
    let lease_key = a.lease_key("k");
    let pttl = |conn: &mut redis::Connection| -> i64 {
        redis::cmd("PTTL").arg(&lease_key).query(conn).unwrap()
    };

    // A held guard extends its lease (every third of its TTL): the time
    // it has left goes back up, and it is still held once its first TTL
    // has passed.
    let guard = a.lock("k").await.unwrap().expect("free");
    let locked = Instant::now();
    let deadline = locked + Duration::from_secs(20);
    let mut last = pttl(&mut conn);
    let mut extended = 0;
    while extended < 2 || locked.elapsed() <= ttl {
        assert!(Instant::now() < deadline, "never extended ({extended})");
        sleep(Duration::from_millis(50)).await;
        let now = pttl(&mut conn);
        assert!(now > 0, "the held lease expired");
        extended += usize::from(now > last);
        last = now;
    }
    assert!(b.is_leased("k").await.unwrap(), "extended while held");
    guard.release().await.unwrap();
    assert!(!b.is_leased("k").await.unwrap(), "released at once");

    // A guard dropped unreleased stops extending: the lease expires.
    let guard = a.lock("k").await.unwrap().expect("free again");
    drop(guard);
    let deadline = Instant::now() + ttl + Duration::from_secs(10);
    while b.is_leased("k").await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "the lease of a dropped guard expires"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy to the Redis on the port `target` holds when a connection
/// is made: connections made before a switch stay where they were.
async fn switching_proxy(port: u16) -> (SocketAddr, Arc<AtomicU16>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let target = Arc::new(AtomicU16::new(port));
    let to = target.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let port = to.load(Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (addr, target)
}

/// The primary behind the store's address is demoted to a replica and the
/// address now leads to the new primary, while the store's connection
/// stays on the old one: the write it refuses (`READONLY`) fails, and the
/// next goes on a new connection, to the new primary.
#[tokio::test]
async fn a_connection_to_a_demoted_primary_is_replaced() {
    let (old, new) = (RedisServer::start(), RedisServer::start());
    let (proxy, target) = switching_proxy(old.port()).await;
    let store = RedisStore::builder(format!("redis://{proxy}"))
        .build()
        .await
        .unwrap();
    store.save(&session("k", "a")).await.unwrap();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(new.port())
        .query(&mut raw(&old))
        .unwrap();
    target.store(new.port(), Ordering::SeqCst);
    let err = store.save(&session("k", "b")).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    for backend in ["b", "c"] {
        store.save(&session("k", backend)).await.unwrap();
        let on_new = crate::store(&new).await.load("k").await.unwrap().unwrap();
        assert_eq!(on_new.backend.as_str(), backend);
    }
}

/// A TCP proxy to the Redis on the port `target` holds when a connection
/// is made, which cuts the connection that sends the second `SCAN` (before
/// it reaches Redis) and leads every later connection to `then`.
async fn proxy_moving_at_the_second_scan(port: u16, then: u16) -> SocketAddr {
    const SCAN: &[u8] = b"$4\r\nSCAN\r\n";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let target = Arc::new(AtomicU16::new(port));
    let scans = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let (target, scans) = (target.clone(), scans.clone());
            tokio::spawn(async move {
                let port = target.load(Ordering::SeqCst);
                let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_redis, mut to_redis) = upstream.into_split();
                let answers = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_redis, &mut to_client).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match from_client.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let sent = &buf[..n];
                    if sent
                        .windows(SCAN.len())
                        .any(|w| w.eq_ignore_ascii_case(SCAN))
                        && scans.fetch_add(1, Ordering::SeqCst) == 1
                    {
                        target.store(then, Ordering::SeqCst);
                        break;
                    }
                    if to_redis.write_all(sent).await.is_err() {
                        break;
                    }
                }
                answers.abort();
            });
        }
    });
    addr
}

/// Redis restarts, or a replica takes over behind the same address, in
/// the middle of a listing: the listing starts again on the new server,
/// rather than carrying a cursor of the old one over (which means nothing
/// there, and skips keys).
#[tokio::test]
async fn a_listing_cut_midway_by_a_new_server_lists_every_session() {
    let (old, new) = (RedisServer::start(), RedisServer::start());
    const N: usize = 3000;
    for server in [&old, &new] {
        let direct = store(server).await;
        for i in 0..N {
            direct.save(&session(&format!("k{i}"), "a")).await.unwrap();
        }
    }
    let proxy = proxy_moving_at_the_second_scan(old.port(), new.port()).await;
    let store = RedisStore::builder(format!("redis://{proxy}"))
        .build()
        .await
        .unwrap();
    let loaded = store.load_all().await.unwrap();
    assert!(loaded.skipped.is_empty());
    let keys: std::collections::BTreeSet<String> =
        loaded.sessions.iter().map(|s| s.key.clone()).collect();
    assert_eq!(keys.len(), N, "{} of {N} listed", keys.len());
    assert_eq!(loaded.sessions.len(), N);
}

/// A TCP proxy to a Redis on `port` that cuts connections on which a
/// `PUBLISH` is sent, just before it, `cuts` times: what came before
/// reaches Redis, the `PUBLISH` and what follows never do, and both sides
/// see the connection close. Then everything passes through.
async fn proxy_cutting_before_a_publish(port: u16, cuts: usize) -> SocketAddr {
    const PUBLISH: &[u8] = b"*3\r\n$7\r\nPUBLISH\r\n";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let left = Arc::new(AtomicUsize::new(cuts));
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let left = left.clone();
            tokio::spawn(async move {
                // Whether this connection still watches for a `PUBLISH`.
                let mut watching = left.load(Ordering::SeqCst) > 0;
                let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_redis, mut to_redis) = upstream.into_split();
                let answers = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_redis, &mut to_client).await;
                });
                let mut pending = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match from_client.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    if watching {
                        if let Some(at) = pending.windows(PUBLISH.len()).position(|w| w == PUBLISH)
                        {
                            let cut = left
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok();
                            if cut {
                                let _ = to_redis.write_all(&pending[..at]).await;
                                // Redis applies what it got before the cut.
                                sleep(Duration::from_millis(200)).await;
                                break;
                            }
                            watching = false;
                        }
                    }
                    // Hold back what may be the start of a `PUBLISH`.
                    let held = if !watching {
                        0
                    } else {
                        (1..PUBLISH.len())
                            .rev()
                            .find(|&k| pending.ends_with(&PUBLISH[..k]))
                            .unwrap_or(0)
                    };
                    let send = pending.len() - held;
                    if to_redis.write_all(&pending[..send]).await.is_err() {
                        break;
                    }
                    pending.drain(..send);
                }
                answers.abort();
            });
        }
    });
    addr
}

/// A server; a store that reaches it through
/// [`proxy_cutting_before_a_publish`] with `cuts`; another store that
/// reaches it directly, and that one's subscription.
async fn saving_through_a_cutting_proxy(
    cuts: usize,
) -> (
    RedisServer,
    RedisStore,
    RedisStore,
    tower_ha::store::Invalidations,
) {
    let server = RedisServer::start();
    let proxy = proxy_cutting_before_a_publish(server.port(), cuts).await;
    let saver = RedisStore::builder(format!("redis://{proxy}"))
        .build()
        .await
        .unwrap();
    let other = store(&server).await;
    let notices = other.subscribe().await.unwrap();
    (server, saver, other, notices)
}

/// The connection drops after Redis got a save's `SET` and before its
/// `PUBLISH`: the session must not be stored without its notice (the
/// other replicas would keep routing it to its old backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_cut_off_before_its_notice_is_not_stored_either() {
    // Twice: a save whose connection breaks is sent once more.
    let (_server, saver, other, mut notices) = saving_through_a_cutting_proxy(2).await;

    let err = saver.save(&session("k", "node-b")).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(
        other.load("k").await.unwrap(),
        None,
        "the save was stored, but its notice never sent"
    );

    // Once reconnected, saves land with their notices.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = saver.save(&session("k", "node-c")).await {
        assert!(e.is_transient(), "{e:?}");
        assert!(Instant::now() < deadline, "saves did not resume: {e:?}");
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        next(&mut notices).await,
        notice("k", Some("node-c")),
        "the first notice is that of the save that was stored"
    );
    assert_eq!(
        other.load("k").await.unwrap().unwrap().backend.as_str(),
        "node-c"
    );
}

/// A save whose connection breaks under it (Redis restarted, a proxy
/// cut it) is sent again on a new connection: it is stored, with its
/// notice, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_whose_connection_breaks_is_sent_again() {
    let (_server, saver, other, mut notices) = saving_through_a_cutting_proxy(1).await;

    saver.save(&session("k", "node-b")).await.unwrap();
    assert_eq!(
        other.load("k").await.unwrap().unwrap().backend.as_str(),
        "node-b"
    );
    assert_eq!(next(&mut notices).await, notice("k", Some("node-b")));
    saver.save(&session("other", "node-a")).await.unwrap();
    assert_eq!(
        next(&mut notices).await,
        notice("other", Some("node-a")),
        "the save that was cut off was announced once"
    );
}

/// Closes every client connection but the raw one that asks.
fn kill_clients(conn: &mut redis::Connection) {
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
        .query(conn)
        .unwrap();
    assert!(killed >= 1, "the store's connection was open");
}

/// Redis closes the store's connection while it is idle (its `timeout`
/// setting, a proxy's idle limit, a restart between two calls): the next
/// call, of any kind, succeeds on a new connection instead of failing
/// although Redis is up.
#[tokio::test]
async fn a_connection_closed_while_idle_fails_no_call() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let mut conn = raw(&server);
    store.save(&session("a", "node-a")).await.unwrap();

    kill_clients(&mut conn);
    store.save(&session("b", "node-b")).await.unwrap();
    kill_clients(&mut conn);
    assert_eq!(
        store.load("a").await.unwrap().unwrap().backend.as_str(),
        "node-a"
    );
    kill_clients(&mut conn);
    assert_eq!(store.load_all().await.unwrap().sessions.len(), 2);
    kill_clients(&mut conn);
    store.delete(&["a".to_owned()]).await.unwrap();
    assert_eq!(store.load("a").await.unwrap(), None);
}

/// A reconnection refused at login (the password changed on the server)
/// is tried again once the password is right again, rather than failing
/// every call until the process restarts.
#[tokio::test]
async fn a_refused_login_is_tried_again() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}/", server.port());
    let store = RedisStore::builder(url.as_str()).build().await.unwrap();
    store.save(&session("k", "node-a")).await.unwrap();
    let mut admin = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .unwrap();
    let set_password = |admin: &mut redis::Connection, password: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg(&["SET", "requirepass", password][..])
            .query(admin)
            .unwrap();
    };

    set_password(&mut admin, "changed");
    kill_clients(&mut admin);
    let err = store.save(&session("k", "node-b")).await.unwrap_err();
    assert!(err.is_unauthorized(), "{err:?}");
    let err = store.load("k").await.unwrap_err();
    assert!(err.is_unauthorized(), "{err:?}");

    set_password(&mut admin, "s3cret");
    bounded_real("calls succeed again once the password is right", async {
        while store.save(&session("k", "node-c")).await.is_err() {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        store.load("k").await.unwrap().unwrap().backend.as_str(),
        "node-c"
    );
}

/// A store on another database than 0 reconnects while a script keeps
/// Redis busy: the new connection's `SELECT` is refused (`BUSY`). The
/// calls meanwhile fail as unavailable, and work again once Redis is free,
/// rather than failing until the process restarts.
#[tokio::test]
async fn a_database_switch_refused_while_busy_is_tried_again() {
    let server = RedisServer::start_with(&["--lua-time-limit", "100"]);
    let store = RedisStore::builder(format!("{}1", server.url()))
        .build()
        .await
        .unwrap();
    store.save(&session("k", "node-a")).await.unwrap();
    let mut admin = raw(&server);
    kill_clients(&mut admin);
    let blocker = busy_for_a_second(admin);
    // Until a new connection is answered `BUSY`, the script has not run
    // past its limit.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut probe = raw(&server);
        probe
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match redis::cmd("PING").query::<String>(&mut probe) {
            Err(e) if e.to_string().contains("BUSY") => break,
            _ => assert!(Instant::now() < deadline, "Redis never got busy"),
        }
    }
    let err = store.load("k").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    blocker.join().unwrap();
    bounded_real("calls succeed again once Redis is free", async {
        while store.load("k").await.is_err() {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        store.load("k").await.unwrap().unwrap().backend.as_str(),
        "node-a"
    );
}

/// A Lua script that keeps Redis busy for a second.
const BUSY_FOR_A_SECOND: &str = "local s = redis.call('TIME') \
    while true do \
        local n = redis.call('TIME') \
        if (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > 1000000 then return end \
    end";

/// Keeps Redis busy for a second from a thread of its own, over `conn`.
fn busy_for_a_second(mut conn: redis::Connection) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _: () = redis::cmd("EVAL")
            .arg(BUSY_FOR_A_SECOND)
            .arg(0)
            .query(&mut conn)
            .unwrap();
    })
}

/// A lease taken while Redis is too slow to answer in time: the caller
/// gets the timeout, and the lease it may have taken regardless does not
/// hold the others off for its whole ttl.
#[tokio::test]
async fn a_lease_whose_reply_came_too_late_is_not_left_behind() {
    let server = RedisServer::start();
    let slow = RedisStore::builder(server.url())
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // The scripts loaded, as on a store in use (a script unknown to the
    // server takes a second round trip, which a timeout cuts short).
    let warm = slow
        .try_lease("warm", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(warm.unwrap().extend(Duration::from_secs(1)).await.unwrap());
    // Redis busy for a second: what comes meanwhile waits in the socket
    // buffers, and runs afterwards, even from a connection closed since.
    let busy = raw(&server);
    let other = store(&server).await;
    let mut probe = raw(&server);
    probe
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let blocker = busy_for_a_second(busy);
    // Until a PING goes unanswered, the script has not started.
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis::cmd("PING").query::<String>(&mut probe).is_ok() {
        assert!(Instant::now() < deadline, "Redis never got busy");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(probe);
    let err = slow
        .try_lease("k", Duration::from_secs(3600))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    blocker.join().unwrap();
    // The take landed once Redis was free, and the give-up that followed
    // it on its connection ended it: another store takes the lease within
    // seconds, not after its hour.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match other.try_lease("k", Duration::from_secs(30)).await {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(e) => assert!(e.is_timeout(), "{e:?}"),
        }
        assert!(Instant::now() < deadline, "the lease is still held");
        sleep(Duration::from_millis(50)).await;
    }
    assert!(slow.is_leased("k").await.unwrap());
}
