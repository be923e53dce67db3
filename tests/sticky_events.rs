//! What the sticky layer logs. In a binary of its own: `tracing` caches
//! per callsite whether anyone listens, and tests on other threads that
//! hit the same callsites without a subscriber would race with this
//! test's thread-local one.

mod support;

use std::time::Duration;

use http::{Request, Response};
use tower::{Layer, ServiceExt};
use tower_ha::balance::{Balance, RoundRobin};
use tower_ha::sticky::{SessionKey, StickyLayer};
use tower_ha::{BoxError, Pool};

use support::down::Down;
use support::tracing_capture::Capture;

/// A store that is down fails a call a request: the layer warns of the
/// first, then of one every ten seconds with the count it held back, and
/// logs the others at debug level.
#[tokio::test(start_paused = true)]
async fn a_store_outage_warns_once_a_period() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let pool = Pool::new();
    pool.insert(
        "a",
        tower::service_fn(|_req: Request<()>| async { Ok::<_, BoxError>(Response::new(())) }),
    );
    let layer = StickyLayer::new(&pool, SessionKey::header("x-session-id")).store(Down);
    let svc = layer.layer(Balance::new(pool.clone(), RoundRobin::new()));
    let send = |key: String| {
        let req = Request::builder()
            .header("x-session-id", key)
            .body(())
            .unwrap();
        svc.clone().oneshot(req)
    };
    for i in 0..5 {
        send(format!("s{i}")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    send("s5".into()).await.unwrap();
    let failed = capture.saying("session store call failed");
    let at = |level| -> Vec<_> { failed.iter().filter(|e| e.level == level).collect() };
    let warned = at(tracing::Level::WARN);
    let held: Vec<_> = warned.iter().map(|e| e.get("held_back")).collect();
    assert_eq!(held, [Some("0"), Some("4")], "{warned:?}");
    assert_eq!(at(tracing::Level::DEBUG).len(), 4);
    assert_eq!(layer.stats().store_errors, 6, "each one counted");
}

/// A learned cookie's value is the application's credential: where a
/// store's error names the session (a file store's file, a webhook's
/// URL), the layer's log of it shows the value's digest instead, in
/// whatever form the store wrote the value.
#[tokio::test(start_paused = true)]
async fn a_store_error_logged_for_a_learned_cookie_names_no_value() {
    // Upper case, `+`, `/` and `=`: a file name and a URL encode them.
    const VALUE: &str = "Tok+en/9=QxZ";
    let dir = tempfile::tempdir().unwrap();
    let file = tower_ha::store::FileStore::open(dir.path()).await.unwrap();
    // A directory where the session's file goes: its write fails, naming
    // the file.
    std::fs::create_dir(
        dir.path()
            .join(tower_ha::store::FileStore::file_name(VALUE)),
    )
    .unwrap();
    let dead = support::http::refused().await;
    let webhook = tower_ha::store::WebhookStore::builder(format!("http://{dead}/sessions"))
        .build()
        .unwrap();
    // The file store's error names the file, where the digest goes; the
    // webhook's shows the key's segment as `{key}`.
    let stores: [(std::sync::Arc<dyn tower_ha::store::SessionStore>, bool); 2] = [
        (std::sync::Arc::new(file), true),
        (std::sync::Arc::new(webhook), false),
    ];
    for (store, names_file) in stores {
        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let pool = Pool::new();
        pool.insert(
            "a",
            tower::service_fn(|_req: Request<()>| async {
                let resp = Response::builder()
                    .header("set-cookie", format!("JSESSIONID={VALUE}; Path=/"))
                    .body(())
                    .unwrap();
                Ok::<_, BoxError>(resp)
            }),
        );
        let layer = StickyLayer::new(&pool, SessionKey::learn_cookie("JSESSIONID")).store(store);
        let svc = layer.layer(Balance::new(pool.clone(), RoundRobin::new()));
        svc.oneshot(Request::new(())).await.unwrap();
        // Its save has failed, and been logged, once the writes are done.
        layer.flush().await;
        let failed = capture.saying("session store call failed");
        assert!(!failed.is_empty(), "the save failed and was logged");
        let digest = failed[0].get("session").unwrap().to_owned();
        assert!(digest.starts_with("cookie:"), "{digest}");
        for event in capture.events() {
            let line = event.line();
            for form in ["Tok", "%2B", "%54ok"] {
                assert!(!line.contains(form), "{form} in {line}");
            }
        }
        let error = failed[0].get("error").unwrap();
        assert_eq!(error.contains(&digest[7..]), names_file, "{error}");
    }
}
