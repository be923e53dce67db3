//! The contract every `SessionStore` must pass. Call [`run`] with an empty
//! store; it panics with a message naming the broken rule.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tower_ha::store::{Session, SessionStore, MAX_DATA_DEPTH};

fn session(key: &str, backend: &str) -> Session {
    Session::new(key, backend.into()).with_data(json!({
        "kernel": {"id": key, "ports": [52000, 52001]},
        "owner": "alice",
    }))
}

/// Keys a hostile or careless client may send. A store round-trips each
/// one exactly; it may reject only those it cannot hold (`""`, `.`, `..`,
/// or one longer than its limit, which is at least 256 bytes), with an
/// `invalid_key` error. It never lets one reach another key's record.
pub fn hostile_keys() -> Vec<String> {
    vec![
        "../../etc/passwd".into(),
        "/etc/passwd".into(),
        "..".into(),
        ".".into(),
        "".into(),
        "a/b".into(),
        "a\\b".into(),
        "nul\0byte".into(),
        "spaces and ünïcødé ✓".into(),
        "percent%2F%2e%2e".into(),
        "x".repeat(300),
        "CON".into(),
        "-rf".into(),
        "*".into(),
        "key:with:colons".into(),
    ]
}

/// What the crate's own stores add to the contract: data nested one level
/// deeper than [`MAX_DATA_DEPTH`] is refused with `is_rejected()`, and the
/// record stays as it was. (A store of yours may instead read such data
/// back exactly; [`run`] takes either.)
pub async fn refuses_data_nested_too_deep(store: &dyn SessionStore) {
    // One level more than a store takes.
    let mut data = json!("bottom");
    for _ in 0..=MAX_DATA_DEPTH {
        data = json!([data]);
    }
    let s = session("deep", "node-a");
    store.save(&s).await.expect("save");
    let deeper = Session::new("deep", "node-b".into()).with_data(data);
    let err = store.save(&deeper).await.expect_err("data nested too deep");
    assert!(err.is_rejected(), "{err:?}");
    let back = store.load("deep").await.expect("load").expect("found");
    assert_eq!(back.backend.as_str(), "node-a");
    assert_eq!(back.data, s.data);
    store.delete(&["deep".into()]).await.expect("delete");
}

/// Data nested deeper than a JSON reader reads back (200 levels, past
/// `serde_json`'s 128) is refused when saved, or read back exactly: never
/// saved and then lost as a corrupt record.
pub async fn deep_data_is_refused_or_read_back(store: &dyn SessionStore) {
    let mut data = json!("bottom");
    for _ in 0..200 {
        data = json!([data]);
    }
    let deep = Session::new("deeper", "node-a".into()).with_data(data);
    match store.save(&deep).await {
        Err(err) => {
            assert!(err.is_rejected(), "{err:?}");
            assert!(store.load("deeper").await.expect("load").is_none());
        }
        Ok(()) => {
            let back = store
                .load("deeper")
                .await
                .expect("read back")
                .expect("found");
            assert_eq!(back.data, deep.data);
            store.delete(&["deeper".into()]).await.expect("delete");
        }
    }
}

/// What the crate's stores add for a store shared by several replicas: a
/// refresh renews the record as it is stored, and does not write the
/// refreshed copy over a newer one (a move another replica saved since).
/// (The default `refresh`, a save, does; [`run`] takes either.)
pub async fn refresh_keeps_a_newer_record(store: &dyn SessionStore) {
    let old = session("refreshed", "node-a");
    store.save(&old).await.expect("save");
    let moved = session("refreshed", "node-b");
    store.save(&moved).await.expect("save elsewhere");
    store.refresh(&old).await.expect("refresh");
    let back = store.load("refreshed").await.expect("load").expect("found");
    assert_eq!(back.backend.as_str(), "node-b", "the move stays");
    store.delete(&["refreshed".into()]).await.expect("delete");
}

/// Runs every rule against `store`, which must start empty.
pub async fn run(store: Arc<dyn SessionStore>) {
    empty_store_loads_nothing(&*store).await;
    save_then_load_round_trips(&*store).await;
    data_round_trips_exactly_up_to_the_deepest_nesting(&*store).await;
    deep_data_is_refused_or_read_back(&*store).await;
    save_replaces(&*store).await;
    load_all_returns_every_session(&*store).await;
    delete_many_ignores_absent_keys(&*store).await;
    hostile_keys_stay_apart(&*store).await;
    concurrent_saves_all_land(store.clone()).await;
}

async fn empty_store_loads_nothing(store: &dyn SessionStore) {
    let all = store.load_all().await.expect("load_all on an empty store");
    assert!(all.sessions.is_empty(), "a new store must be empty");
    assert!(all.skipped.is_empty(), "a new store skips nothing");
    assert_eq!(
        store.load("missing").await.expect("load of a missing key"),
        None
    );
}

async fn save_then_load_round_trips(store: &dyn SessionStore) {
    let mut s = session("rt", "node-a");
    s.last_seen = s.created + Duration::from_millis(1500);
    store.save(&s).await.expect("save");
    let back = store
        .load("rt")
        .await
        .expect("load")
        .expect("saved session is found");
    assert_eq!(
        back, s,
        "a session must round-trip exactly (times to the millisecond)"
    );
    store.delete(&["rt".into()]).await.expect("delete");
    assert_eq!(store.load("rt").await.expect("load after delete"), None);
}

async fn data_round_trips_exactly_up_to_the_deepest_nesting(store: &dyn SessionStore) {
    // Floats an approximate parser reads back one unit in the last place
    // off (about one in seven of these), and the extremes.
    let mut floats: Vec<f64> = (1..=200u64)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11) as f64 / (1u64 << 53) as f64 * 2e9)
        .collect();
    floats.extend([
        5e-324,
        f64::MIN_POSITIVE,
        f64::MAX,
        -f64::MAX,
        0.1,
        1.0 / 3.0,
    ]);
    // Nested exactly as deep as a store takes: the object, then arrays.
    let nested = |depth: usize| {
        let mut value = json!("bottom");
        for _ in 1..depth {
            value = json!([value]);
        }
        value
    };
    let data = |depth| json!({"floats": floats, "nested": nested(depth)});
    let s = Session::new("data", "node-a".into()).with_data(data(MAX_DATA_DEPTH));
    store
        .save(&s)
        .await
        .expect("save of the deepest data allowed");
    let back = store.load("data").await.expect("load").expect("found");
    assert_eq!(back.data, s.data, "data must round-trip exactly");
    let all = store.load_all().await.expect("load_all");
    assert!(all.skipped.is_empty(), "{:?}", all.skipped);
    assert!(all
        .sessions
        .iter()
        .any(|l| l.key == "data" && l.data == s.data));

    // One level deeper: either refused, the record staying as it was (the
    // crate's stores), or saved and read back exactly (a store that can).
    let deeper = Session::new("data", "node-b".into()).with_data(data(MAX_DATA_DEPTH + 1));
    let expected = match store.save(&deeper).await {
        Err(err) => {
            assert!(err.is_rejected(), "{err:?}");
            &s
        }
        Ok(()) => &deeper,
    };
    let back = store.load("data").await.expect("load").expect("found");
    assert_eq!(back.backend, expected.backend);
    assert_eq!(back.data, expected.data);
    store.delete(&["data".into()]).await.expect("delete");
}

async fn save_replaces(store: &dyn SessionStore) {
    store.save(&session("re", "node-a")).await.expect("save v1");
    let v2 = session("re", "node-b").with_data(json!({"version": 2}));
    store.save(&v2).await.expect("save v2");
    let back = store.load("re").await.expect("load").expect("found");
    assert_eq!(
        back.backend.as_str(),
        "node-b",
        "a save replaces the previous version"
    );
    assert_eq!(back.data, json!({"version": 2}));
    let all = store.load_all().await.expect("load_all");
    assert_eq!(
        all.sessions.iter().filter(|s| s.key == "re").count(),
        1,
        "a replaced session is stored once"
    );
    store.delete(&["re".into()]).await.expect("delete");
}

async fn load_all_returns_every_session(store: &dyn SessionStore) {
    let mut expected = BTreeMap::new();
    for i in 0..25 {
        let s = session(&format!("all-{i}"), &format!("node-{}", i % 3));
        store.save(&s).await.expect("save");
        expected.insert(s.key.clone(), s);
    }
    let all = store.load_all().await.expect("load_all");
    assert!(all.skipped.is_empty(), "nothing to skip: {:?}", all.skipped);
    let got: BTreeMap<_, _> = all
        .sessions
        .into_iter()
        .map(|s| (s.key.clone(), s))
        .collect();
    assert_eq!(got, expected, "load_all returns exactly the saved sessions");
    let keys: Vec<String> = expected.keys().cloned().collect();
    store.delete(&keys).await.expect("delete all");
    assert!(store
        .load_all()
        .await
        .expect("load_all")
        .sessions
        .is_empty());
}

async fn delete_many_ignores_absent_keys(store: &dyn SessionStore) {
    store.save(&session("d1", "a")).await.expect("save");
    store.save(&session("d2", "a")).await.expect("save");
    store.save(&session("keep", "a")).await.expect("save");
    store
        .delete(&["d1".into(), "never-saved".into(), "d2".into()])
        .await
        .expect("deleting absent keys is not an error");
    assert_eq!(store.load("d1").await.expect("load"), None);
    assert_eq!(store.load("d2").await.expect("load"), None);
    assert!(
        store.load("keep").await.expect("load").is_some(),
        "delete touches only its keys"
    );
    store.delete(&[]).await.expect("deleting nothing");
    store.delete(&["keep".into()]).await.expect("delete");
}

async fn hostile_keys_stay_apart(store: &dyn SessionStore) {
    let mut stored = Vec::new();
    let mut rejected = Vec::new();
    for (i, key) in hostile_keys().into_iter().enumerate() {
        let s = session(&key, &format!("node-{i}"));
        match store.save(&s).await {
            Ok(()) => stored.push(s),
            Err(e) => {
                assert!(
                    e.is_invalid_key(),
                    "a key a store cannot hold must be rejected as invalid, got {e:?} for {key:?}"
                );
                rejected.push(key);
            }
        }
    }
    for key in &rejected {
        match store.load(key).await {
            Ok(None) => {}
            Ok(Some(s)) => panic!("rejected key {key:?} loads a session: {s:?}"),
            Err(e) => assert!(
                e.is_invalid_key(),
                "a key a store cannot hold is absent or invalid on load, got {e:?} for {key:?}"
            ),
        }
    }
    for s in &stored {
        let back = store
            .load(&s.key)
            .await
            .expect("load")
            .expect("a stored hostile key is found");
        assert_eq!(
            &back, s,
            "hostile key {:?} must round-trip to its own record",
            s.key
        );
    }
    // Only keys that name no segment of a path (a store that sends keys
    // in URLs cannot tell them from none, `.` or `..`) or past a store's
    // length limit may be rejected; every other one is a key like any
    // other.
    for key in &rejected {
        assert!(
            ["", ".", ".."].contains(&key.as_str()) || key.len() > 256,
            "a store may reject only \"\", \".\", \"..\" and keys over 256 bytes, not {key:?}"
        );
    }
    let all = store.load_all().await.expect("load_all");
    let mut listed: Vec<&str> = all.sessions.iter().map(|s| s.key.as_str()).collect();
    listed.sort_unstable();
    let mut expected: Vec<&str> = stored.iter().map(|s| s.key.as_str()).collect();
    expected.sort_unstable();
    assert_eq!(
        listed, expected,
        "every stored hostile key is listed once, as it is"
    );
    let keys: Vec<String> = stored.iter().map(|s| s.key.clone()).collect();
    store.delete(&keys).await.expect("delete");
    assert!(store
        .load_all()
        .await
        .expect("load_all")
        .sessions
        .is_empty());
}

async fn concurrent_saves_all_land(store: Arc<dyn SessionStore>) {
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let s = session(&format!("c-{i}"), "node-a");
                store.save(&s).await.expect("concurrent save");
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let all = store.load_all().await.expect("load_all");
    let listed: BTreeSet<&str> = all.sessions.iter().map(|s| s.key.as_str()).collect();
    let saved: Vec<String> = (0..50).map(|i| format!("c-{i}")).collect();
    assert_eq!(
        all.sessions.len(),
        50,
        "each concurrent save is listed once"
    );
    assert_eq!(
        listed,
        saved.iter().map(String::as_str).collect(),
        "every concurrent save lands"
    );
    let keys: Vec<String> = all.sessions.iter().map(|s| s.key.clone()).collect();
    store.delete(&keys).await.expect("delete");
}
