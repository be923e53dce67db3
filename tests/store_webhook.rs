//! `WebhookStore` against a real hyper service on 127.0.0.1.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::wait::spin_until;
use support::webhook_server::{Auth, Mode, Server};
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_ha::balance::{BalanceLayer, RoundRobin};
use tower_ha::sticky::{SessionKey, StickyLayer};
use tower_ha::store::{Session, SessionStore, WebhookStore};
use tower_ha::{BackendId, BoxError, Pool};

fn session(key: &str, backend: &str) -> Session {
    Session::new(key, backend.into()).with_data(json!({"port": 52000}))
}

/// One element of a load answer: session `key` on `backend`.
fn element(key: &str, backend: &str) -> Value {
    json!({"kernel_session": {key: serde_json::to_value(session(key, backend)).unwrap()}})
}

fn store(server: &Server) -> WebhookStore {
    store_at(server.url())
}

/// A store of the service at `url`, three retries (the default) 1 ms apart.
fn store_at(url: String) -> WebhookStore {
    WebhookStore::builder(url)
        .timeout(Duration::from_secs(5))
        .backoff(Duration::from_millis(1))
        .build()
        .unwrap()
}

fn basic() -> Auth {
    Auth::Basic {
        user: "gateway".into(),
        password: "s3cret".into(),
    }
}

fn digest() -> Auth {
    Auth::Digest {
        user: "gateway".into(),
        password: "s3cret".into(),
    }
}

#[tokio::test]
async fn webhook_store_passes_the_contract() {
    let server = Server::start(Auth::None).await;
    support::store_contract::run(Arc::new(store(&server))).await;
    support::store_contract::refuses_data_nested_too_deep(&store(&server)).await;
}

#[tokio::test]
async fn webhook_store_passes_the_contract_with_basic_auth() {
    let server = Server::start(basic()).await;
    let store = WebhookStore::builder(server.url())
        .basic_auth("gateway", "s3cret")
        .build()
        .unwrap();
    support::store_contract::run(Arc::new(store)).await;
    assert_eq!(
        server
            .state
            .refused
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn webhook_store_passes_the_contract_with_digest_auth() {
    let server = Server::start(digest()).await;
    let store = WebhookStore::builder(server.url())
        .digest_auth("gateway", "s3cret")
        .build()
        .unwrap();
    support::store_contract::run(Arc::new(store)).await;
    // One challenge at first contact; every later request reuses it.
    assert_eq!(
        server
            .state
            .refused
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert!(server.state.seen.lock().len() > 100);
}

#[tokio::test]
async fn the_wire_format_is_enterprise_gateways() {
    let server = Server::start(Auth::None).await;
    let store = store(&server);
    let s = session("kernel/1 ü", "node-a");
    store.save(&s).await.unwrap();
    store
        .delete(&["kernel/1 ü".into(), "other".into()])
        .await
        .unwrap();
    store.delete(&[]).await.unwrap(); // sends nothing
    let seen = server.state.seen.lock().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");

    assert_eq!(seen[0].method, http::Method::POST);
    assert_eq!(seen[0].path, "/api/sessions/kernel%2F1%20%C3%BC");
    assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
    let body: Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        body,
        json!({"kernel/1 ü": serde_json::to_value(&s).unwrap()})
    );

    assert_eq!(seen[1].method, http::Method::DELETE);
    assert_eq!(seen[1].path, "/api/sessions");
    let body: Value = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(body, json!(["kernel/1 ü", "other"]));
}

#[tokio::test]
async fn loads_records_written_by_another_client() {
    let server = Server::start(Auth::None).await;
    // What another Enterprise Gateway-format client stored.
    server.state.sessions.lock().insert(
        "k1".into(),
        json!({"k1": {"key": "k1", "backend": "node-b", "created": 1700000000000u64,
                      "last_seen": 1700000001000u64, "data": {"kernel": 1}}}),
    );
    let store = store(&server);
    let all = store.load_all().await.unwrap();
    assert_eq!(all.sessions.len(), 1);
    assert_eq!(all.sessions[0].backend.as_str(), "node-b");
    assert_eq!(all.sessions[0].data, json!({"kernel": 1}));
    let one = store.load("k1").await.unwrap().unwrap();
    assert_eq!(one, all.sessions[0]);
}

#[tokio::test]
async fn wrong_basic_credentials_are_unauthorized_without_retries() {
    let server = Server::start(basic()).await;
    let store = WebhookStore::builder(server.url())
        .basic_auth("gateway", "wrong")
        .retries(3)
        .build()
        .unwrap();
    let err = store.save(&session("k", "a")).await.unwrap_err();
    assert!(err.is_unauthorized(), "{err:?}");
    assert_eq!(server.requests(), 1);
    let no_auth = WebhookStore::builder(server.url()).build().unwrap();
    assert!(no_auth.load_all().await.unwrap_err().is_unauthorized());
}

#[tokio::test]
async fn wrong_digest_password_is_unauthorized() {
    let server = Server::start(digest()).await;
    let store = WebhookStore::builder(server.url())
        .digest_auth("gateway", "wrong")
        .build()
        .unwrap();
    let err = store.load("k").await.unwrap_err();
    assert!(err.is_unauthorized(), "{err:?}");
    // The first request draws the challenge, the answer is refused, and
    // the store gives up instead of looping.
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn a_new_digest_nonce_is_followed() {
    let server = Server::start(digest()).await;
    // No retry: the new challenge is answered within the attempt.
    let store = WebhookStore::builder(server.url())
        .digest_auth("gateway", "s3cret")
        .retries(0)
        .build()
        .unwrap();
    store.save(&session("k", "a")).await.unwrap();
    *server.state.nonce.lock() = "a-fresh-nonce-0001".into();
    let before = server.requests();
    store.save(&session("k", "b")).await.unwrap();
    assert_eq!(
        server.requests() - before,
        2,
        "the stale nonce, then the new"
    );
    assert_eq!(
        server
            .state
            .refused
            .load(std::sync::atomic::Ordering::SeqCst),
        2,
        "first contact and the stale nonce were each challenged once"
    );
    assert_eq!(
        store.load("k").await.unwrap().unwrap().backend.as_str(),
        "b"
    );
}

/// A nonce that goes stale again right after a fresh challenge (requests
/// sharing one challenge reached a server that checks their order) is
/// worth another attempt, not an authorization error.
#[tokio::test]
async fn a_nonce_stale_again_is_retried_not_unauthorized() {
    let server = Server::start(digest()).await;
    let store = |retries| {
        WebhookStore::builder(server.url())
            .digest_auth("gateway", "s3cret")
            .retries(retries)
            .backoff(Duration::from_millis(1))
            .build()
            .unwrap()
    };
    let ordering = std::sync::atomic::Ordering::SeqCst;
    // Each attempt answers one challenge in place. The first contact's
    // uses the first attempt's, so the first stale answer ends it; the
    // second attempt answers the second and ends at the third; the third
    // attempt gets through: five requests.
    server.state.stale_next.store(3, ordering);
    store(2).save(&session("k", "a")).await.unwrap();
    assert_eq!(server.requests(), 5);
    assert_eq!(server.state.stale_next.load(ordering), 0);
    assert_eq!(server.state.sessions.lock().len(), 1);

    server.state.stale_next.store(100, ordering);
    let err = store(2).save(&session("k", "b")).await.unwrap_err();
    assert!(err.is_unavailable() && err.is_transient(), "{err:?}");
    assert!(!err.is_unauthorized());

    // A wrong password is still unauthorized.
    server.state.stale_next.store(0, ordering);
    let wrong = WebhookStore::builder(server.url())
        .digest_auth("gateway", "wrong")
        .build()
        .unwrap();
    assert!(wrong.load("k").await.unwrap_err().is_unauthorized());
}

#[tokio::test]
async fn forbidden_is_unauthorized() {
    let server = Server::start(Auth::None).await;
    server.set_mode(Mode::Fixed(403, "no"));
    let err = store(&server).load_all().await.unwrap_err();
    assert!(err.is_unauthorized(), "{err:?}");
}

#[tokio::test]
async fn not_found_means_no_session_on_load_and_a_missing_endpoint_elsewhere() {
    let server = Server::start(Auth::None).await;
    let store = store(&server);
    assert_eq!(store.load("nobody").await.unwrap(), None);
    server.set_mode(Mode::Fixed(404, "no such endpoint"));
    assert!(store.load_all().await.unwrap_err().is_not_found());
    assert!(store
        .save(&session("k", "a"))
        .await
        .unwrap_err()
        .is_not_found());
    assert!(store
        .delete(&["k".into()])
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(store.load("k").await.unwrap(), None);
}

#[tokio::test]
async fn other_client_errors_are_rejected_without_retries() {
    let server = Server::start(Auth::None).await;
    let store = WebhookStore::builder(server.url())
        .retries(5)
        .backoff(Duration::from_millis(1))
        .build()
        .unwrap();
    for status in [400, 409, 422, 302] {
        server.set_mode(Mode::Fixed(status, "nope"));
        let before = server.requests();
        let err = store.save(&session("k", "a")).await.unwrap_err();
        assert!(err.is_rejected(), "{status}: {err:?}");
        assert_eq!(server.requests() - before, 1, "{status} is not retried");
    }
}

#[tokio::test]
async fn other_successes_are_accepted() {
    let server = Server::start(Auth::None).await;
    let store = store(&server);
    for status in [200, 201] {
        server.set_mode(Mode::Fixed(status, ""));
        store.save(&session("k", "a")).await.unwrap();
        store.delete(&["k".into()]).await.unwrap();
    }
}

#[tokio::test]
async fn a_success_that_does_not_say_done_is_rejected() {
    let server = Server::start(Auth::None).await;
    let store = store(&server);
    for status in [202, 205, 206] {
        server.set_mode(Mode::Fixed(status, ""));
        let err = store.save(&session("k", "a")).await.unwrap_err();
        assert!(err.is_rejected(), "{status}: {err:?}");
        assert!(err.to_string().contains(&status.to_string()), "{err}");
        let err = store.delete(&["k".into()]).await.unwrap_err();
        assert!(err.is_rejected(), "{status}: {err:?}");
    }
}

/// A load reads records from a 200 only. `204 No Content` is nothing
/// stored (Enterprise Gateway loads nothing from any answer but 200, so a
/// service written for it may answer so); any other 2xx is refused, not
/// read as a body that is not JSON.
#[tokio::test]
async fn a_load_reads_records_from_a_200_only() {
    let server = Server::start(Auth::None).await;
    let store = store(&server);
    server.set_mode(Mode::Fixed(204, ""));
    assert_eq!(store.load("k").await.unwrap(), None);
    let all = store.load_all().await.unwrap();
    assert!(all.sessions.is_empty() && all.skipped.is_empty());
    for status in [201, 202, 206] {
        server.set_mode(Mode::Fixed(status, ""));
        let err = store.load("k").await.unwrap_err();
        assert!(err.is_rejected(), "{status}: {err:?}");
        let err = store.load_all().await.unwrap_err();
        assert!(err.is_rejected(), "{status}: {err:?}");
    }
}

#[tokio::test]
async fn server_errors_are_retried_exactly_up_to_the_bound() {
    let server = Server::start(Auth::None).await;
    server.set_mode(Mode::Fixed(500, "boom"));
    let store = WebhookStore::builder(server.url())
        .retries(3)
        .backoff(Duration::from_millis(1))
        .build()
        .unwrap();
    let err = store.save(&session("k", "a")).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.is_transient());
    assert_eq!(server.requests(), 4, "one attempt and three retries");

    let none = WebhookStore::builder(server.url())
        .retries(0)
        .build()
        .unwrap();
    let before = server.requests();
    assert!(none.load_all().await.unwrap_err().is_unavailable());
    assert_eq!(server.requests() - before, 1);
}

/// 408 and 429 say "try later", as a 5xx does.
#[tokio::test]
async fn request_timeout_and_too_many_requests_are_retried_then_unavailable() {
    let server = Server::start(Auth::None).await;
    let store = WebhookStore::builder(server.url())
        .retries(2)
        .backoff(Duration::from_millis(1))
        .build()
        .unwrap();
    for status in [408, 429] {
        server.set_mode(Mode::Fixed(status, "later"));
        let before = server.requests();
        let err = store.save(&session("k", "a")).await.unwrap_err();
        assert!(
            err.is_unavailable() && err.is_transient(),
            "{status}: {err:?}"
        );
        assert_eq!(server.requests() - before, 3, "{status} is retried");

        server.set_mode(Mode::FailFirst(1, status));
        store.save(&session("k", "a")).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_waits_as_long_as_retry_after_asks() {
    let server = Server::start(Auth::None).await;
    server.set_mode(Mode::FailFirst(1, 429));
    server.set_retry_after(Some("1"));
    let store = WebhookStore::builder(server.url())
        .retries(1)
        .backoff(Duration::from_millis(1))
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    store.save(&session("k", "a")).await.unwrap();
    // On paused time: the wait is the second asked, not the 1 ms backoff.
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn a_transient_failure_recovers_within_the_bound() {
    let server = Server::start(Auth::None).await;
    server.set_mode(Mode::FailFirst(2, 503));
    let store = WebhookStore::builder(server.url())
        .retries(3)
        .backoff(Duration::from_millis(1))
        .build()
        .unwrap();
    store.save(&session("k", "a")).await.unwrap();
    assert_eq!(server.requests(), 3);
    assert_eq!(
        store.load("k").await.unwrap().unwrap().backend.as_str(),
        "a"
    );
}

#[tokio::test]
async fn garbage_json_is_corrupt() {
    let server = Server::start(Auth::None).await;
    server.set_mode(Mode::GetBody("{\"kernel_session\": [unclosed".into()));
    let store = store(&server);
    assert!(store.load_all().await.unwrap_err().is_corrupt());
    assert!(store.load("k").await.unwrap_err().is_corrupt());
}

#[tokio::test]
async fn a_body_of_the_wrong_shape_is_corrupt() {
    let server = Server::start(Auth::None).await;
    let store = store(&server);
    for body in [
        json!({"kernel_session": {}}),
        json!("a string"),
        json!(null),
    ] {
        server.set_mode(Mode::GetBody(body.to_string()));
        let err = store.load_all().await.unwrap_err();
        assert!(err.is_corrupt(), "{body}: {err:?}");
    }
    for body in [
        json!([]),
        json!({"kernel_session": "a string"}),
        json!({"kernel_session": {"k": {"no": "session"}}}),
        element("other", "a"),
        json!({"kernel_session": {"k": serde_json::to_value(session("k", "a")).unwrap(), "k2": 1}}),
    ] {
        server.set_mode(Mode::GetBody(body.to_string()));
        let err = store.load("k").await.unwrap_err();
        assert!(err.is_corrupt(), "{body}: {err:?}");
    }
}

#[tokio::test]
async fn one_bad_element_is_skipped_while_the_others_load() {
    let server = Server::start(Auth::None).await;
    let good = |k: &str| element(k, "node-a");
    let list = json!([
        good("a"),
        42,
        {"kernel_session": "not an object"},
        {"no_kernel_session": {}},
        {"kernel_session": {"bad": {"key": "bad"}}},
        {"kernel_session": {"liar": serde_json::to_value(session("someone-else", "x")).unwrap()}},
        good("b"),
    ]);
    server.set_mode(Mode::GetBody(list.to_string()));
    let loaded = store(&server).load_all().await.unwrap();
    let keys: Vec<_> = loaded.sessions.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    let skipped: Vec<_> = loaded.skipped.iter().map(|s| s.record.as_str()).collect();
    assert_eq!(skipped, ["#1", "#2", "#3", "bad", "liar"]);
    assert!(loaded.skipped.iter().all(|s| s.error.is_corrupt()));

    // An element nested deeper than a JSON reader goes (a record no store
    // of this crate writes, but another client may have): skipped alone.
    let deep = format!(
        r#"{{"kernel_session": {{"deep": {{"key": "deep", "data": {}0{}}}}}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let body = format!("[{}, {deep}, {}]", good("a"), good("b"));
    server.set_mode(Mode::GetBody(body));
    let loaded = store(&server).load_all().await.unwrap();
    let keys: Vec<_> = loaded.sessions.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    let skipped: Vec<_> = loaded.skipped.iter().map(|s| s.record.as_str()).collect();
    assert_eq!(skipped, ["#1"]);
    assert!(loaded.skipped[0].error.is_corrupt());
}

#[tokio::test]
async fn connection_refused_is_retried_then_unavailable() {
    let addr = support::http::refused().await;
    let store = WebhookStore::builder(format!("http://{addr}/api/sessions"))
        .retries(2)
        .backoff(Duration::from_millis(1))
        .build()
        .unwrap();
    let err = store.load_all().await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains("3 attempt"), "{err}");
}

#[tokio::test]
async fn a_hanging_server_times_out_without_retries() {
    let server = Server::start(Auth::None).await;
    server.set_mode(Mode::Hang);
    let store = WebhookStore::builder(server.url())
        .timeout(Duration::from_millis(200))
        .retries(3)
        .build()
        .unwrap();
    let err = store.load("k").await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(err.is_transient());
    assert_eq!(server.requests(), 1, "a timed-out call is not repeated");
}

/// A service that stops answering holds as many connections as the store
/// makes calls at once, not one more per call.
#[tokio::test]
async fn the_calls_under_way_at_once_are_bounded() {
    let server = Server::start(Auth::None).await;
    server.set_mode(Mode::Hang);
    let store = WebhookStore::builder(server.url())
        .timeout(Duration::from_secs(30))
        .max_concurrent_calls(2)
        .build()
        .unwrap();
    let calls: Vec<_> = (0..5)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.load(&format!("k{i}")).await })
        })
        .collect();
    spin_until("two calls reach the service", || server.requests() >= 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.requests(), 2, "the others wait for their turn");
    for call in calls {
        call.abort();
    }
}

/// A call waiting out its backoff holds no connection, and no turn: the
/// bound is on attempts under way.
#[tokio::test]
async fn a_call_backing_off_leaves_its_turn_to_others() {
    let server = Server::start(Auth::None).await;
    server.set_mode(Mode::FailFirst(1, 503));
    let store = WebhookStore::builder(server.url())
        .max_concurrent_calls(1)
        .retries(1)
        .backoff(Duration::from_secs(20))
        .build()
        .unwrap();
    let backing_off = {
        let store = store.clone();
        tokio::spawn(async move { store.save(&session("a", "b1")).await })
    };
    spin_until("the first attempt fails", || server.requests() >= 1).await;
    tokio::time::timeout(Duration::from_secs(10), store.save(&session("b", "b2")))
        .await
        .expect("not kept waiting behind a backoff")
        .unwrap();
    assert_eq!(server.requests(), 2);
    assert!(!backing_off.is_finished(), "still backing off");
    backing_off.abort();
}

#[tokio::test]
async fn a_url_with_a_trailing_slash_works() {
    let server = Server::start(Auth::None).await;
    let store = WebhookStore::builder(format!("{}/", server.url()))
        .build()
        .unwrap();
    store.save(&session("k", "a")).await.unwrap();
    assert_eq!(store.load_all().await.unwrap().sessions.len(), 1);
    store.delete(&["k".to_owned()]).await.unwrap();
    // `{url}` as given, `{url}/{id}` with one slash.
    let seen: Vec<_> = server
        .state
        .seen
        .lock()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(
        seen,
        ["/api/sessions/k", "/api/sessions/", "/api/sessions/"]
    );

    let server = Server::start(Auth::None).await;
    self::store(&server).load_all().await.unwrap();
    assert_eq!(server.state.seen.lock()[0].path, "/api/sessions");
}

/// RFC 3986's unreserved characters are sent as they are: some servers
/// refuse an encoded `.`.
#[tokio::test]
async fn dots_in_a_key_are_sent_as_they_are() {
    let server = Server::start(Auth::None).await;
    let store = store(&server);
    store.save(&session("s:a.b~c", "a")).await.unwrap();
    assert_eq!(server.state.seen.lock()[0].path, "/api/sessions/s%3Aa.b~c");
    let loaded = store.load("s:a.b~c").await.unwrap().unwrap();
    assert_eq!(loaded.backend.as_str(), "a");
}

/// A listing of garbage is no listing: it fails as corrupt rather than
/// making a skipped record (and a log line) of every element.
#[tokio::test]
async fn a_listing_of_garbage_is_corrupt_as_a_whole() {
    let server = Server::start(Auth::None).await;
    let good = element("a", "x");
    let garbage = |n: usize| format!("[{good},{}0]", "0,".repeat(n - 1));
    server.set_mode(Mode::GetBody(garbage(10_000)));
    let loaded = store(&server).load_all().await.unwrap();
    assert_eq!(loaded.sessions.len(), 1);
    assert_eq!(loaded.skipped.len(), 10_000);
    server.set_mode(Mode::GetBody(garbage(10_001)));
    let err = store(&server).load_all().await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let shown = tower_ha::error::Report(&err).to_string();
    assert!(shown.contains("more than 10000"), "{shown}");
}

/// A record holding bytes that are not UTF-8 (written by another client)
/// is skipped alone; the others load.
#[tokio::test]
async fn a_record_that_is_not_utf8_is_skipped_alone() {
    let server = Server::start(Auth::None).await;
    let mut body = format!("[{},", element("a", "x")).into_bytes();
    body.extend_from_slice(b"{\"kernel_session\": {\"b\": {\"key\": \"b\", \"data\": \"\xff\"}}},");
    // A replacement character the service sent as text is read as such.
    body.extend_from_slice(format!("{}]", element("c", "y\u{fffd}")).as_bytes());
    server.set_mode(Mode::GetBytes(body));
    let loaded = store(&server).load_all().await.unwrap();
    let keys: Vec<_> = loaded.sessions.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["a", "c"]);
    assert_eq!(loaded.sessions[1].backend.as_str(), "y\u{fffd}");
    assert_eq!(loaded.skipped.len(), 1);
    assert_eq!(loaded.skipped[0].record, "#1");
    assert!(loaded.skipped[0].error.is_corrupt());
    // Outside every element, such bytes leave no JSON to read.
    server.set_mode(Mode::GetBytes(b"[\xff]".to_vec()));
    assert!(store(&server).load_all().await.unwrap_err().is_corrupt());
}

/// A byte order mark before the JSON is skipped, as JSON readers do.
#[tokio::test]
async fn a_byte_order_mark_is_skipped() {
    let server = Server::start(Auth::None).await;
    let one = element("a", "x");
    server.set_mode(Mode::GetBody(format!("\u{feff}[{one}]")));
    let store = store(&server);
    assert_eq!(store.load_all().await.unwrap().sessions.len(), 1);
    server.set_mode(Mode::GetBody(format!("\u{feff}{one}")));
    assert_eq!(
        store.load("a").await.unwrap().unwrap().backend.as_str(),
        "x"
    );
}

/// A gateway's timeout in front of the service ends a write as this
/// client's own timeout does: not sent again, so that it cannot land
/// before the first and be undone by it. A load is retried.
#[tokio::test]
async fn a_gateway_timeout_ends_a_write_unretried() {
    let server = Server::start(Auth::None).await;
    server.set_mode(Mode::Fixed(504, "upstream timed out"));
    // Three retries by default.
    let store = store(&server);
    let err = store.save(&session("k", "a")).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(err.is_transient());
    assert_eq!(server.requests(), 1);
    let err = store.delete(&["k".to_owned()]).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(server.requests(), 2);
    let err = store.load("k").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(
        server.requests(),
        6,
        "a load: one attempt and three retries"
    );
}

/// A connection that closes after a save or a delete was sent ends the
/// write unretried: the service may have it, and may apply it after a
/// write sent again, as after a timeout. A load is retried.
#[tokio::test]
async fn a_write_cut_off_after_it_was_sent_is_not_sent_again() {
    let server = Server::start(Auth::None).await;
    server.set_mode(Mode::Cut);
    let requests = || server.requests();
    let failed = "failed after the POST was sent; not sent again";
    writes_are_not_sent_again(&store(&server), requests, failed).await;
}

/// Through `store` (three retries), whose service fails every request: a
/// save fails with `message` and a delete fails, each sent once; a load is
/// tried four times. `requests` counts what the service received.
async fn writes_are_not_sent_again(
    store: &WebhookStore,
    requests: impl Fn() -> usize,
    message: &str,
) {
    let err = store.save(&session("k", "a")).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains(message), "{err}");
    assert_eq!(requests(), 1);
    let err = store.delete(&["k".to_owned()]).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(requests(), 2);
    let err = store.load("k").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(requests(), 6, "a load: one attempt and three retries");
}

/// An answer cut off mid-body comes from a service that had the write: it
/// is not sent again either.
#[tokio::test]
async fn a_write_whose_answer_is_cut_off_is_not_sent_again() {
    let (addr, seen) = support::http::cut_answers(http::StatusCode::OK).await;
    let store = store_at(format!("http://{addr}/api/sessions"));
    let cut = "answer to the POST was cut off; not sent again";
    writes_are_not_sent_again(&store, || seen.requests(), cut).await;
}

/// A write answered "try later" (a 503), its answer then cut off, was not
/// applied: it is retried as when the answer is whole.
#[tokio::test]
async fn a_write_answered_503_and_cut_off_is_retried() {
    let (addr, seen) = support::http::cut_answers(http::StatusCode::SERVICE_UNAVAILABLE).await;
    let store = store_at(format!("http://{addr}/api/sessions"));
    let err = store.save(&session("k", "a")).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(seen.requests(), 4, "one attempt and three retries");
}

/// A query may hold a secret (a function key): it is sent, but errors and
/// `Debug` show `?…` instead. So may a session's key (an application's
/// session cookie): errors show its segment as `{key}`.
#[tokio::test]
async fn a_query_in_the_url_is_not_shown() {
    let addr = support::http::refused().await;
    let store = WebhookStore::builder(format!("http://{addr}/api/sessions?code=k3y"))
        .retries(0)
        .build()
        .unwrap();
    let err = store.load("s3cret-session").await.unwrap_err();
    let shown = format!("{err} {err:?} {store:?}");
    assert!(!shown.contains("k3y"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("/api/sessions/{key}?…"), "{shown}");
    assert!(store.url().ends_with("?code=k3y"));
}

#[test]
fn the_test_service_normalises_paths_as_rfc_3986_says() {
    use support::webhook_server::normalise;
    assert_eq!(normalise("/api/sessions/%2E%2E"), "/api/");
    assert_eq!(normalise("/api/sessions/%2e"), "/api/sessions/");
    assert_eq!(normalise("/api/sessions/"), "/api/sessions/");
    assert_eq!(
        normalise("/api/sessions/%2E%2E%2Fetc"),
        "/api/sessions/..%2Fetc",
        "an encoded slash keeps the key one segment"
    );
    assert_eq!(
        normalise("/api/sessions/a%2Eb%20c"),
        "/api/sessions/a.b%20c"
    );
}

/// `""`, `.` and `..` would reach `{url}/` or `{url}/..` on a server that
/// normalises paths (as `normalise` does): they are refused, and nothing
/// is sent.
#[tokio::test]
async fn keys_that_name_another_endpoint_are_invalid_and_never_sent() {
    let server = Server::start(Auth::None).await;
    let store = store(&server);
    store.save(&session("neighbour", "a")).await.unwrap();
    let before = server.requests();
    for key in ["", ".", ".."] {
        let err = store.save(&session(key, "a")).await.unwrap_err();
        assert!(err.is_invalid_key(), "save {key:?}: {err:?}");
        let err = store.load(key).await.unwrap_err();
        assert!(err.is_invalid_key(), "load {key:?}: {err:?}");
    }
    assert_eq!(server.requests(), before, "no request was sent");
    // Deleting names the keys in the body: nothing to refuse there.
    store
        .delete(&["".into(), ".".into(), "..".into()])
        .await
        .unwrap();
    assert_eq!(store.load_all().await.unwrap().sessions.len(), 1);
}

/// A listing holds every session: a store larger than one answer's 64 MiB
/// still loads, up to `max_listing`.
#[tokio::test]
async fn a_listing_larger_than_one_answer_loads_up_to_its_own_limit() {
    let server = Server::start(Auth::None).await;
    let data = "x".repeat(1 << 20);
    let elements: Vec<String> = (0..70)
        .map(|i| {
            let s = Session::new(format!("s{i}"), "node-a".into()).with_data(json!(data));
            json!({"kernel_session": {s.key.clone(): s}}).to_string()
        })
        .collect();
    server.set_mode(Mode::GetBody(format!("[{}]", elements.join(","))));
    let loaded = store(&server).load_all().await.unwrap();
    assert_eq!(loaded.sessions.len(), 70);
    assert!(loaded.skipped.is_empty());

    let small = WebhookStore::builder(server.url())
        .max_listing(1 << 20)
        .build()
        .unwrap();
    let err = small.load_all().await.unwrap_err();
    assert!(err.is_rejected(), "{err:?}");
}

/// A session too large for an answer to hold is refused before it is
/// sent: the service would keep it, but no load could read it back.
#[tokio::test]
async fn a_session_too_large_to_read_back_is_refused_unsent() {
    let server = Server::start(Auth::None).await;
    let store = store(&server);
    store.save(&session("k", "node-a")).await.unwrap();
    let sent = server.requests();
    let huge = Session::new("k", "node-b".into()).with_data(json!("x".repeat(64 << 20)));
    let err = store.save(&huge).await.unwrap_err();
    assert!(err.is_rejected(), "{err:?}");
    assert_eq!(server.requests(), sent, "nothing was sent");
    let kept = store.load("k").await.unwrap().expect("the old record");
    assert_eq!(kept.backend.as_str(), "node-a");
}

/// Two backends, `a` and `b`, that answer their name (and, with
/// `assigns`, name it as the session id in their response, as a server
/// that assigns ids does), balanced round robin behind `layer`, a sticky
/// layer keyed by `x-session-id`.
fn sticky_over_two(
    layer: impl FnOnce(&Pool<Named>) -> StickyLayer,
    assigns: Option<&'static str>,
) -> (
    StickyLayer,
    impl Service<http::Request<()>, Response = http::Response<&'static str>, Error = BoxError> + Clone,
) {
    let pool = Pool::new();
    for name in ["a", "b"] {
        let backend = service_fn(move |_req: http::Request<()>| async move {
            let mut response = http::Response::builder();
            if let Some(id) = assigns {
                response = response.header("x-session-id", id);
            }
            Ok::<_, BoxError>(response.body(name).unwrap())
        });
        pool.insert(BackendId::from(name), BoxCloneSyncService::new(backend));
    }
    let layer = layer(&pool);
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(pool);
    (layer, svc)
}

type Named = BoxCloneSyncService<http::Request<()>, http::Response<&'static str>, BoxError>;

/// A request naming session `key`.
fn for_session(key: &str) -> http::Request<()> {
    http::Request::builder()
        .header("x-session-id", key)
        .body(())
        .unwrap()
}

/// A session key the webhook cannot carry (`..`, which a path-normalising
/// server would read as another endpoint) is rejected by the sticky layer
/// as bad input: no store error, no refusal in strict mode, routed as a
/// request with no session.
#[tokio::test]
async fn a_key_the_store_cannot_hold_is_no_session_even_in_strict_mode() {
    let server = Server::start(Auth::None).await;
    let (layer, svc) = sticky_over_two(
        |pool| {
            StickyLayer::new(pool, SessionKey::header("x-session-id"))
                .store(store(&server))
                .strict(true)
        },
        None,
    );
    let mut served = Vec::new();
    for _ in 0..4 {
        let response = svc
            .clone()
            .oneshot(for_session(".."))
            .await
            .expect("routed");
        served.push(*response.body());
    }
    // Balanced as requests without a session are, not pinned to one.
    served.sort_unstable();
    assert_eq!(served, ["a", "a", "b", "b"]);
    let stats = layer.stats();
    assert_eq!(stats.rejected, 4);
    assert_eq!(stats.store_errors, 0);
    assert_eq!(stats.strict_refusals, 0);
    assert_eq!(server.requests(), 0, "nothing sent to the webhook");
}

/// A session that a backend starts under a key the webhook cannot carry
/// stays on that backend, in memory only: its failed save is one store
/// error, and it is not saved again at each refresh (nor read again at
/// every request).
#[tokio::test]
async fn a_session_a_backend_starts_under_a_key_the_store_cannot_hold_stays_in_memory() {
    let server = Server::start(Auth::None).await;
    let (layer, svc) = sticky_over_two(
        |pool| {
            StickyLayer::new(pool, SessionKey::header("x-session-id"))
                .store(store(&server))
                .refresh_every(Duration::from_millis(20))
        },
        Some(".."),
    );
    let first = svc.clone().oneshot(http::Request::new(())).await.unwrap();
    let home = *first.body();
    let mut stats = Vec::new();
    for _ in 0..6 {
        let response = svc.clone().oneshot(for_session("..")).await.unwrap();
        assert_eq!(*response.body(), home, "the session stays where it started");
        let s = layer.stats();
        stats.push((s.store_errors, s.loaded));
        // Long enough for a refresh to fall due (none is made).
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // The failed save, then one read that finds the key cannot be held.
    assert!(stats.iter().all(|&(errors, _)| errors == 1), "{stats:?}");
    assert!(stats.iter().all(|&(_, loaded)| loaded == 1), "{stats:?}");
    assert_eq!(layer.stats().rejected, 0);
    assert_eq!(server.requests(), 0, "nothing sent to the webhook");
}

/// A service that prunes records by age says so with `ttl`: the sticky
/// layer then saves a session in use again each half `ttl`, with no
/// `refresh_every` of its own, and one nobody uses is left alone.
#[tokio::test]
async fn the_layer_saves_a_session_in_use_again_each_half_ttl() {
    let server = Server::start(Auth::None).await;
    let ttl = Duration::from_millis(60);
    let build = || {
        WebhookStore::builder(server.url())
            .timeout(Duration::from_secs(5))
            .ttl(ttl)
            .build()
            .unwrap()
    };
    assert_eq!(build().refresh_interval(), Some(ttl / 2));
    assert_eq!(store(&server).refresh_interval(), None, "records stay");
    let (layer, svc) = sticky_over_two(
        |pool| StickyLayer::new(pool, SessionKey::header("x-session-id")).store(build()),
        None,
    );
    let saves = |key: &str| {
        let path = format!("{}/{key}", support::webhook_server::PREFIX);
        let seen = server.state.seen.lock();
        (seen.iter())
            .filter(|s| s.method == http::Method::POST && s.path == path)
            .count()
    };
    for key in ["used", "idle"] {
        svc.clone().oneshot(for_session(key)).await.unwrap();
    }
    layer.flush().await;
    assert_eq!(
        (saves("used"), saves("idle")),
        (1, 1),
        "each saved as it starts"
    );
    for round in 1..=3 {
        // Past half the ttl since the last save.
        tokio::time::sleep(ttl / 2 + Duration::from_millis(10)).await;
        svc.clone().oneshot(for_session("used")).await.unwrap();
        layer.flush().await;
        assert_eq!(saves("used"), 1 + round, "saved again, round {round}");
    }
    assert_eq!(saves("idle"), 1, "a session nobody uses is not saved again");
}
