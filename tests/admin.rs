//! The admin HTTP surface: every route, good and bad input, and a real
//! hyper server on 127.0.0.1.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_ha::balance::{Balance, Priority, RoundRobin};
use tower_ha::control::{AdminBody, AdminService, Event, Events, Handle};
use tower_ha::{AdminStatus, HealthStatus, Pool};

#[path = "support/json_values.rs"]
mod json_values;

struct Fixture {
    admin: AdminService,
    handle: Handle,
    web: Pool<()>,
}

fn fixture() -> Fixture {
    let web = Pool::new();
    for id in ["web1", "web2", "web 3"] {
        web.insert(id, ());
    }
    let api = Pool::new();
    api.insert("api1", ());
    let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(30)));
    handle
        .add_group(
            "web",
            &Balance::new(web.clone(), Priority::new("web", ["web1", "web2", "web 3"])),
        )
        .unwrap();
    handle
        .add_group("api", &Balance::new(api, RoundRobin::new()))
        .unwrap();
    Fixture {
        admin: AdminService::new(handle.clone()),
        handle,
        web,
    }
}

/// Calls the admin API; a `POST` declares a JSON body, as it must.
async fn call(
    admin: &AdminService,
    method: &str,
    path: &str,
    body: impl AsRef<[u8]>,
) -> (StatusCode, Value) {
    let content_type = (method == "POST").then_some("application/json");
    call_with(admin, method, path, content_type, body).await
}

async fn call_with(
    admin: &AdminService,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: impl AsRef<[u8]>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body.as_ref())))
        .unwrap();
    let response: Response<AdminBody> = admin.clone().oneshot(request).await.unwrap();
    let status = response.status();
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "{method} {path}"
    );
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// Forces backend `id` as group "web"'s primary.
async fn force(admin: &AdminService, id: &str) -> (StatusCode, Value) {
    let body = json!({ "backend_id": id }).to_string();
    call(admin, "POST", "/groups/web/primary", &body).await
}

#[tokio::test(start_paused = true)]
async fn get_groups_lists_every_group_with_its_stats() {
    let f = fixture();
    let (status, body) = call(&f.admin, "GET", "/groups", "").await;
    assert_eq!(status, 200);
    assert_eq!(body.as_array().unwrap().len(), 2);
    assert_eq!(body[0]["name"], "web");
    assert_eq!(body[0]["mode"], "active-passive");
    assert_eq!(body[0]["configured_primary"], "web1");
    assert_eq!(body[1]["name"], "api");
    assert_eq!(body[1]["mode"], "normal");
    assert_eq!(body[1]["current_primary"], Value::Null);
}

#[tokio::test(start_paused = true)]
async fn get_one_group_and_unknown_groups() {
    let f = fixture();
    f.web
        .state(&"web2".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);
    let (status, body) = call(&f.admin, "GET", "/groups/web", "").await;
    assert_eq!(status, 200);
    assert_eq!(body["healthy"], json!(["web1", "web 3"]));
    assert_eq!(body["failed"], json!(["web2"]));
    assert_eq!(body["backends"][1]["health"], "unhealthy");
    assert_eq!(body["failovers"], 0);

    let (status, body) = call(&f.admin, "GET", "/groups/nope", "").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "unknown group `nope`");
    let (status, _) = call(&f.admin, "PUT", "/groups/web", "").await;
    assert_eq!(status, 405);
}

#[tokio::test(start_paused = true)]
async fn delete_group_unregisters_it() {
    let f = fixture();
    let (status, body) = call(&f.admin, "DELETE", "/groups/api", "").await;
    assert_eq!(status, 200);
    assert_eq!(body["name"], "api");
    let (status, body) = call(&f.admin, "GET", "/groups", "").await;
    assert_eq!(status, 200);
    assert_eq!(body.as_array().unwrap().len(), 1);
    assert_eq!(body[0]["name"], "web");
    assert_eq!(f.handle.group_names().len(), 1);
    let (status, body) = call(&f.admin, "DELETE", "/groups/api", "").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "unknown group `api`");
}

#[tokio::test(start_paused = true)]
async fn post_primary_forces_it_and_rejects_bad_bodies() {
    let f = fixture();
    let (status, body) = force(&f.admin, "web 3").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["current_primary"], "web 3");
    assert_eq!(body["forced_primary"], "web 3");

    for (path, payload, expected, needle) in [
        (
            "/groups/web/primary",
            "not json",
            400,
            "expected {\"backend_id\"",
        ),
        (
            "/groups/web/primary",
            "{}",
            400,
            "missing field `backend_id`",
        ),
        (
            "/groups/web/primary",
            r#"{"backend_id": 7}"#,
            400,
            "invalid type",
        ),
        (
            "/groups/web/primary",
            r#"{"backend_id": "web1", "x": 1}"#,
            400,
            "unknown field",
        ),
        (
            "/groups/web/primary",
            r#"{"backend_id": "api1"}"#,
            400,
            "not a member of group `web`",
        ),
        (
            "/groups/web/primary",
            r#"["web1"]"#,
            400,
            "not a JSON object",
        ),
        (
            "/groups/nope/primary",
            r#"{"backend_id": "web1"}"#,
            404,
            "unknown group `nope`",
        ),
        (
            "/groups/api/primary",
            r#"{"backend_id": "api1"}"#,
            409,
            "not active-passive",
        ),
    ] {
        let (status, body) = call(&f.admin, "POST", path, payload).await;
        assert_eq!(status, expected, "{path} {payload}: {body}");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(needle), "{path} {payload}: {message}");
    }
    // A backend that cannot serve is not made the primary: the group would
    // fail over from it at its next request.
    f.web
        .state(&"web2".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);
    let (status, body) = force(&f.admin, "web2").await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not available"));
    let (_, body) = call(&f.admin, "GET", "/groups/web", "").await;
    assert_eq!(body["forced_primary"], "web 3");

    let (status, _) = call(&f.admin, "GET", "/groups/web/primary", "").await;
    assert_eq!(status, 405);

    let huge = format!(r#"{{"backend_id": "{}"}}"#, "x".repeat(70_000));
    let (status, _) = call(&f.admin, "POST", "/groups/web/primary", &huge).await;
    assert_eq!(status, 413);
    // Nothing above changed the forced primary.
    assert_eq!(
        f.handle
            .group_stats("web")
            .unwrap()
            .current_primary
            .unwrap()
            .as_str(),
        "web 3"
    );
}

#[tokio::test(start_paused = true)]
async fn delete_primary_releases_a_forced_one() {
    let f = fixture();
    let (status, body) = force(&f.admin, "web2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["forced_primary"], "web2");
    let (status, body) = call(&f.admin, "DELETE", "/groups/web/primary", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["forced_primary"], Value::Null);
    assert_eq!(f.handle.group_stats("web").unwrap().forced_primary, None);

    let (status, _) = call(&f.admin, "DELETE", "/groups/nope/primary", "").await;
    assert_eq!(status, 404);
    let (status, _) = call(&f.admin, "DELETE", "/groups/api/primary", "").await;
    assert_eq!(status, 409);
    let (status, _) = call(&f.admin, "PUT", "/groups/web/primary", "").await;
    assert_eq!(status, 405);
}

#[tokio::test(start_paused = true)]
async fn backend_actions_drain_disable_and_enable() {
    let f = fixture();
    let state = f.web.state(&"web2".into()).unwrap();
    let (status, body) = call(&f.admin, "POST", "/backends/web2/drain", "").await;
    assert_eq!(
        (status, &body["admin"]),
        (StatusCode::OK, &json!("draining"))
    );
    assert_eq!(state.admin(), AdminStatus::Draining);
    let (status, body) = call(&f.admin, "POST", "/backends/web2/disable", "").await;
    assert_eq!(
        (status, &body["admin"]),
        (StatusCode::OK, &json!("disabled"))
    );
    let (status, body) = call(&f.admin, "POST", "/backends/web2/enable", "").await;
    assert_eq!(
        (status, &body["admin"]),
        (StatusCode::OK, &json!("enabled"))
    );
    assert_eq!(state.admin(), AdminStatus::Enabled);
    // Percent-encoded ids.
    let (status, body) = call(&f.admin, "POST", "/backends/web%203/disable", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        f.web.state(&"web 3".into()).unwrap().admin(),
        AdminStatus::Disabled
    );

    let (status, body) = call(&f.admin, "POST", "/backends/nope/drain", "").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "unknown backend `nope`");
    // As for the settings: an unknown backend is 404 whatever the body.
    for action in ["drain", "disable", "enable", "close_tunnels"] {
        let path = format!("/backends/nope/{action}");
        let (status, body) = call(&f.admin, "POST", &path, r#"{"now": true}"#).await;
        assert_eq!(status, 404, "{action}: {body}");
    }
    let (status, body) = call(&f.admin, "POST", "/backends/web2/drain", r#"{"now": true}"#).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(state.admin(), AdminStatus::Enabled);
    let (status, _) = call(&f.admin, "GET", "/backends/web2/drain", "").await;
    assert_eq!(status, 405);
    // Closes the tunnels open now, and changes nothing else.
    let tunnels = state.tunnels_closed();
    let (status, body) = call(&f.admin, "POST", "/backends/web2/close_tunnels", "{}").await;
    assert_eq!(
        (status, &body["admin"]),
        (StatusCode::OK, &json!("enabled"))
    );
    assert!(futures::FutureExt::now_or_never(tunnels).is_some());
    let (status, _) = call(&f.admin, "POST", "/backends/web2/explode", "").await;
    assert_eq!(status, 404);
    let (status, _) = call(&f.admin, "POST", "/backends/web%zz/drain", "").await;
    assert_eq!(status, 400);
}

/// A backend its discovery dropped a moment ago: the actions reach the
/// state its pool keeps, which it comes back with, and its stats say it
/// takes no request meanwhile.
#[tokio::test(start_paused = true)]
async fn backend_actions_reach_a_backend_out_for_a_moment() {
    use tower::discover::Change;

    let f = fixture();
    let gone = futures::stream::iter([Ok::<_, std::convert::Infallible>(Change::Remove("web2"))]);
    f.web.discover(gone).await.unwrap();
    assert!(!f.web.contains(&"web2".into()));

    let (status, body) = call(&f.admin, "POST", "/backends/web2/disable", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["admin"], "disabled");
    assert_eq!(body["available"], false);
    let (status, body) = call(&f.admin, "GET", "/backends/web2", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["admin"], "disabled");

    let back = futures::stream::iter([Ok::<_, std::convert::Infallible>(Change::Insert(
        "web2",
        (),
    ))]);
    f.web.discover(back).await.unwrap();
    assert_eq!(
        f.web.state(&"web2".into()).unwrap().admin(),
        AdminStatus::Disabled
    );
}

#[tokio::test(start_paused = true)]
async fn backend_stats_weight_and_limit() {
    let f = fixture();
    let state = f.web.state(&"web2".into()).unwrap();
    let (status, body) = call(&f.admin, "GET", "/backends/web2", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((&body["id"], &body["weight"]), (&json!("web2"), &json!(1)));
    assert_eq!(body["max_in_flight"], Value::Null);

    let (status, body) = call(
        &f.admin,
        "POST",
        "/backends/web2/weight",
        r#"{"weight": 5}"#,
    )
    .await;
    assert_eq!((status, &body["weight"]), (StatusCode::OK, &json!(5)));
    assert_eq!(state.weight(), 5);
    let limit = r#"{"max_in_flight": 10}"#;
    let (status, body) = call(&f.admin, "POST", "/backends/web2/max_in_flight", limit).await;
    assert_eq!(
        (status, &body["max_in_flight"]),
        (StatusCode::OK, &json!(10))
    );
    assert_eq!(state.max_in_flight(), Some(10));
    let lift = r#"{"max_in_flight": null}"#;
    let (status, body) = call(&f.admin, "POST", "/backends/web2/max_in_flight", lift).await;
    assert_eq!(
        (status, &body["max_in_flight"]),
        (StatusCode::OK, &Value::Null)
    );
    assert_eq!(state.max_in_flight(), None);

    // Bad bodies change nothing.
    for (path, body) in [
        ("/backends/web2/weight", ""),
        ("/backends/web2/weight", r#"{"weight": -1}"#),
        ("/backends/web2/weight", r#"{"weight": 2, "extra": 1}"#),
        ("/backends/web2/weight", r#"{"weight": "2"}"#),
        ("/backends/web2/max_in_flight", "{}"),
        ("/backends/web2/max_in_flight", r#"{"max_in_flight": 1.5}"#),
        // serde reads a struct from an array of its values too.
        ("/backends/web2/weight", "[2]"),
        ("/backends/web2/max_in_flight", " [3]"),
        ("/backends/web2/max_in_flight", "[null]"),
        // 0 means a drain or no limit elsewhere; here it would count as 1.
        ("/backends/web2/weight", r#"{"weight": 0}"#),
        ("/backends/web2/max_in_flight", r#"{"max_in_flight": 0}"#),
    ] {
        let (status, answer) = call(&f.admin, "POST", path, body).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().starts_with("expected"),
            "{answer}"
        );
    }
    assert_eq!((state.weight(), state.max_in_flight()), (5, None));
    // A zero is answered with what to send instead.
    let (_, answer) = call(
        &f.admin,
        "POST",
        "/backends/web2/weight",
        r#"{"weight": 0}"#,
    )
    .await;
    assert!(
        answer["error"].as_str().unwrap().contains("drain it"),
        "{answer}"
    );
    let zero = r#"{"max_in_flight": 0}"#;
    let (_, answer) = call(&f.admin, "POST", "/backends/web2/max_in_flight", zero).await;
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains(r#"{"max_in_flight": null} for no limit"#),
        "{answer}"
    );

    let (status, body) = call(&f.admin, "GET", "/backends/nope", "").await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::NOT_FOUND, &json!("unknown backend `nope`"))
    );
    let (status, _) = call(&f.admin, "POST", "/backends/nope/weight", "garbage").await;
    assert_eq!(status, 404, "an unknown backend whatever the body");
    let (status, _) = call(&f.admin, "GET", "/backends/web2/weight", "").await;
    assert_eq!(status, 405);
    let (status, _) = call(&f.admin, "POST", "/backends/web2", "").await;
    assert_eq!(status, 405);
    let (status, _) = call_with(
        &f.admin,
        "POST",
        "/backends/web2/weight",
        None,
        r#"{"weight": 1}"#,
    )
    .await;
    assert_eq!(status, 415);
    assert_eq!(state.weight(), 5);
}

#[tokio::test(start_paused = true)]
async fn percent_escapes_need_exactly_two_hex_digits() {
    let f = fixture();
    f.web.insert("web\u{f}", ());
    f.web.insert("web\u{1}", ());
    for path in [
        "/backends/web%+f/disable",
        "/backends/web%-1/disable",
        "/backends/web%+1/disable",
        "/backends/web%f/disable",
        "/backends/web%/disable",
    ] {
        let (status, body) = call(&f.admin, "POST", path, "").await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"], "malformed percent-encoding in the path");
    }
    for id in ["web\u{f}", "web\u{1}"] {
        assert_eq!(
            f.web.state(&id.into()).unwrap().admin(),
            AdminStatus::Enabled
        );
    }
    let (status, body) = call(&f.admin, "POST", "/backends/web%0F/disable", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        f.web.state(&"web\u{f}".into()).unwrap().admin(),
        AdminStatus::Disabled
    );
}

/// What a cross-site HTML form or a `no-cors` fetch can send without a
/// preflight must not change anything.
#[tokio::test(start_paused = true)]
async fn every_post_requires_a_json_content_type() {
    let f = fixture();
    let state = f.web.state(&"web2".into()).unwrap();
    let refused = [
        None,
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("text/plain"),
        Some("text/plain; charset=utf-8"),
        Some("application/jsonp"),
        Some(""),
    ];
    for content_type in refused {
        for action in ["drain", "disable", "enable"] {
            let path = format!("/backends/web2/{action}");
            let (status, body) = call_with(&f.admin, "POST", &path, content_type, "").await;
            assert_eq!(status, 415, "{path} {content_type:?}: {body}");
            let message = body["error"].as_str().unwrap();
            assert!(
                message.contains("Content-Type: application/json"),
                "{message}"
            );
        }
        let (status, body) = call_with(
            &f.admin,
            "POST",
            "/groups/web/primary",
            content_type,
            r#"{"backend_id": "web2"}"#,
        )
        .await;
        assert_eq!(status, 415, "primary {content_type:?}: {body}");
    }
    let (_, body) = call_with(&f.admin, "POST", "/backends/web2/disable", None, "").await;
    assert_eq!(
        body["error"],
        "POST requires Content-Type: application/json (got none)"
    );
    let (_, body) = call_with(
        &f.admin,
        "POST",
        "/backends/web2/disable",
        Some("text/plain"),
        "{}",
    )
    .await;
    assert_eq!(
        body["error"],
        "POST requires Content-Type: application/json (got `text/plain`)"
    );
    assert_eq!(state.admin(), AdminStatus::Enabled);
    let stats = f.handle.group_stats("web").unwrap();
    assert_eq!(stats.current_primary.unwrap().as_str(), "web1");
    assert_eq!(stats.forced_primary, None);

    // A wrong method is still 405, whatever the content type.
    let (status, _) = call_with(&f.admin, "GET", "/backends/web2/drain", None, "").await;
    assert_eq!(status, 405);

    // JSON with parameters, in any case, is accepted; a bodiless action
    // takes no body or `{}`, nothing else.
    for (content_type, body) in [
        ("application/json", "{}"),
        ("Application/JSON; charset=utf-8", ""),
        ("application/json ;charset=utf-8", " { } "),
    ] {
        let (status, answer) = call_with(
            &f.admin,
            "POST",
            "/backends/web2/disable",
            Some(content_type),
            body,
        )
        .await;
        assert_eq!(status, 200, "{content_type} {body:?}: {answer}");
        assert_eq!(answer["admin"], "disabled");
    }
    for body in [r#"{"now": true}"#, "not json", "[]"] {
        let (status, answer) = call(&f.admin, "POST", "/backends/web2/enable", body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains("expected no body or {}"), "{message}");
    }
    assert_eq!(state.admin(), AdminStatus::Disabled);
    let (status, _) = call(
        &f.admin,
        "POST",
        "/backends/web2/enable",
        &"x".repeat(70_000),
    )
    .await;
    assert_eq!(status, 413);
}

#[tokio::test(start_paused = true)]
async fn get_events_returns_the_recent_history() {
    let f = fixture();
    call(&f.admin, "POST", "/backends/web1/drain", "").await;
    force(&f.admin, "web2").await;
    call(&f.admin, "POST", "/backends/web1/enable", "").await;
    let (status, body) = call(&f.admin, "GET", "/events", "").await;
    assert_eq!(status, 200);
    let kinds: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["admin_changed", "primary_changed", "admin_changed"]);
    assert_eq!(body[1]["event"]["reason"], "forced");
    assert_eq!(body[1]["event"]["to"], "web2");
    assert!(body[0]["time_ms"].as_u64().unwrap() > 0);
    assert_eq!(body[2]["seq"], 2);

    let (_, body) = call(&f.admin, "GET", "/events?limit=1", "").await;
    assert_eq!(body.as_array().unwrap().len(), 1);
    assert_eq!(body[0]["seq"], 2);
    let (status, body) = call(&f.admin, "GET", "/events?limit=many", "").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("limit"));

    // A storm of failovers: the changes stay within reach.
    for attempt in 0..200 {
        f.handle.events().emit(Event::FailoverAttempt {
            attempt,
            failed: "web1".into(),
            reason: "connection refused".into(),
        });
    }
    let (_, body) = call(&f.admin, "GET", "/events?limit=3", "").await;
    let kinds: Vec<&str> = (body.as_array().unwrap().iter())
        .map(|r| r["event"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["failover_attempt"; 3]);
    let (_, body) = call(&f.admin, "GET", "/events?kind=changes&limit=2", "").await;
    let seqs: Vec<u64> = (body.as_array().unwrap().iter())
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2]);
    let (status, body) = call(&f.admin, "GET", "/events?kind=moves", "").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("kind"));
    let (status, _) = call(&f.admin, "POST", "/events", "").await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn get_layers_returns_the_counters_of_the_registered_layers() {
    use tower::{service_fn, ServiceBuilder};
    use tower_ha::balance::BalanceLayer;
    use tower_ha::failover::FailoverLayer;
    use tower_ha::sticky::{SessionKey, StickyLayer};

    let f = fixture();
    let (status, body) = call(&f.admin, "GET", "/layers", "").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"failover": {}, "sticky": {}}));

    // "a" answers 503, "b" 200: a request fails over once.
    let pool = Pool::new();
    for (name, code) in [("a", 503), ("b", 200)] {
        pool.insert(
            name,
            service_fn(move |_req: Request<()>| async move {
                let mut response = Response::new(());
                *response.status_mut() = StatusCode::from_u16(code).unwrap();
                Ok::<_, std::convert::Infallible>(response)
            }),
        );
    }
    let failover = FailoverLayer::new().no_budget();
    let sticky = StickyLayer::new(&pool, SessionKey::header("x-session"));
    f.handle.add_failover("edge", &failover);
    f.handle.add_sticky("edge", &sticky);
    let service = ServiceBuilder::new()
        .layer(sticky.clone())
        .layer(failover.clone())
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(pool);
    let request = Request::builder()
        .header("x-session", "s")
        .body(())
        .unwrap();
    assert_eq!(service.oneshot(request).await.unwrap().status(), 200);

    let (status, body) = call(&f.admin, "GET", "/layers", "").await;
    assert_eq!(status, 200);
    assert_eq!(body["failover"]["edge"]["retries"], 1);
    assert_eq!(body["failover"]["edge"]["recovered"], 1);
    assert_eq!(body["failover"]["edge"]["exhausted"], 0);
    assert_eq!(body["sticky"]["edge"]["sessions"], 1);
    assert_eq!(body["sticky"]["edge"]["created"], 1);
    assert_eq!(
        body["failover"]["edge"],
        serde_json::to_value(failover.stats()).unwrap()
    );
    let (status, _) = call(&f.admin, "POST", "/layers", "").await;
    assert_eq!(status, 405);
}

#[tokio::test(start_paused = true)]
async fn unknown_routes_and_prefixes() {
    let f = fixture();
    for path in ["/", "/nope", "/groups/web/primary/extra", "/backends"] {
        let (status, body) = call(&f.admin, "GET", path, "").await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"], "no such route");
    }
    let prefixed = f.admin.clone().prefix("/api/v1/");
    let (status, _) = call(&prefixed, "GET", "/api/v1/groups/web", "").await;
    assert_eq!(status, 200);
    let (status, _) = call(&prefixed, "GET", "/groups/web", "").await;
    assert_eq!(status, 404);
    let (status, _) = call(&prefixed, "GET", "/api/v1groups/web", "").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the prefix ends at a segment"
    );
    let (status, _) = call(&f.admin.clone().prefix("api"), "GET", "/api/groups", "").await;
    assert_eq!(status, 200, "a prefix without its leading `/`");
}

/// Sends `method path` with no body: the status, the headers and the body.
async fn raw(
    admin: &AdminService,
    method: &str,
    path: &str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = admin.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

#[tokio::test(start_paused = true)]
async fn head_is_answered_as_get_without_the_body() {
    let f = fixture();
    for path in ["/groups", "/groups/web", "/groups/nope", "/events?limit=2"] {
        let (get_status, get_headers, get_body) = raw(&f.admin, "GET", path).await;
        let (status, headers, body) = raw(&f.admin, "HEAD", path).await;
        assert_eq!(status, get_status, "{path}");
        assert_eq!(headers, get_headers, "{path}");
        assert_eq!(
            headers["content-length"],
            get_body.len().to_string().as_str(),
            "{path}"
        );
        assert!(body.is_empty(), "{path}: {body:?}");
    }

    // HEAD is no way around an action's method, and has no body either.
    let (status, headers, body) = raw(&f.admin, "HEAD", "/backends/web1/drain").await;
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "POST");
    assert!(body.is_empty());
    assert_eq!(
        f.handle.backend_stats(&"web1".into()).unwrap().admin,
        AdminStatus::Enabled
    );

    for (method, path, allow) in [
        ("OPTIONS", "/groups", "GET, HEAD"),
        ("POST", "/groups", "GET, HEAD"),
        ("PUT", "/groups/web", "GET, HEAD, DELETE"),
        ("OPTIONS", "/events", "GET, HEAD"),
    ] {
        let (status, headers, _) = raw(&f.admin, method, path).await;
        assert_eq!(status, 405, "{method} {path}");
        assert_eq!(headers["allow"], allow, "{method} {path}");
    }
}

/// The status of `GET /groups` addressed to `uri` (absolute or not) with
/// `host` as its `Host` header, if any.
async fn status_for(admin: &AdminService, uri: &str, host: Option<&str>) -> StatusCode {
    let mut request = Request::builder().uri(uri);
    if let Some(host) = host {
        request = request.header("host", host);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    admin.clone().oneshot(request).await.unwrap().status()
}

#[tokio::test(start_paused = true)]
async fn only_addresses_localhost_and_allowed_names_are_served() {
    let f = fixture();
    for host in [
        "127.0.0.1:9000",
        "127.0.0.1",
        "[::1]:9000",
        "10.1.2.3:80",
        "localhost:9000",
        "LocalHost",
    ] {
        assert_eq!(
            status_for(&f.admin, "/groups", Some(host)).await,
            200,
            "{host}"
        );
    }
    // A name of the page's own pointed at 127.0.0.1 (DNS rebinding).
    for host in [
        "evil.example:9000",
        "admin.internal",
        "localhost.evil.example",
    ] {
        assert_eq!(
            status_for(&f.admin, "/groups", Some(host)).await,
            403,
            "{host}"
        );
    }
    assert_eq!(
        status_for(&f.admin, "http://evil.example:9000/groups", None).await,
        403,
        "the authority of an absolute URI counts"
    );
    for bad in ["bad host/", "evil@127.0.0.1", "[localhost]", "[127.0.0.1]"] {
        let status = status_for(&f.admin, "/groups", Some(bad)).await;
        assert!(status == 400 || status == 403, "{bad}: {status}");
    }
    assert_eq!(
        status_for(&f.admin, "/groups", Some("evil@127.0.0.1")).await,
        400
    );
    // Without `Host` (HTTP/1.0): no browser sends that.
    assert_eq!(status_for(&f.admin, "/groups", None).await, 200);

    let named = f.admin.clone().allow_host("Admin.Internal");
    assert_eq!(
        status_for(&named, "/groups", Some("admin.internal:9000")).await,
        200
    );
    assert_eq!(
        status_for(&named, "/groups", Some("evil.example")).await,
        403
    );
    let any = f.admin.clone().allow_any_host();
    assert_eq!(status_for(&any, "/groups", Some("evil.example")).await, 200);
    let request = Request::builder()
        .uri("/groups")
        .header("host", "evil.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = f.admin.clone().oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("host `evil.example` is not allowed"),
        "{body}"
    );
}

#[tokio::test]
async fn the_admin_service_answers_over_a_real_hyper_server() {
    use hyper_util::rt::TokioIo;
    let f = fixture();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin = f.admin.clone();
    let server = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let admin = admin.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        admin.clone().oneshot(req)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::post(format!("http://{addr}/groups/web/primary"))
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"backend_id":"web2"}"#)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["current_primary"], "web2");
    assert_eq!(
        f.handle
            .group_stats("web")
            .unwrap()
            .current_primary
            .unwrap()
            .as_str(),
        "web2"
    );

    // HEAD: GET's headers, its length included, and no body.
    let mut answers = Vec::new();
    for method in ["GET", "HEAD"] {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{addr}/groups/web"))
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "{method}");
        let length = response.headers()["content-length"].clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        answers.push((length, body.len()));
    }
    let (get_length, get_body) = &answers[0];
    let (head_length, head_body) = &answers[1];
    assert_eq!(get_length, &get_body.to_string());
    assert_eq!(head_length, get_length);
    assert_eq!(*head_body, 0);
    server.abort();
}

mod generated {
    //! Requests of any method, path, host, content type and body.

    use super::*;
    use proptest::prelude::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// `id` with the bytes `encode` picks percent-encoded, in either case
    /// of hex digit.
    fn encoded(id: &str, encode: &[bool], lower: bool) -> String {
        let mut out = String::new();
        for (i, b) in id.bytes().enumerate() {
            if !b.is_ascii_alphanumeric() || encode.get(i).copied().unwrap_or(false) {
                let hex = format!("%{b:02X}");
                out.push_str(&if lower { hex.to_lowercase() } else { hex });
            } else {
                out.push(char::from(b));
            }
        }
        out
    }

    /// Path segments: routes' own words, ids, encodings good and bad.
    fn segments() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just("groups"),
                Just("backends"),
                Just("web"),
                Just("api"),
                Just("web1"),
                Just("web%203"),
                Just("primary"),
                Just("weight"),
                Just("max_in_flight"),
                Just("drain"),
                Just("disable"),
                Just("enable"),
                Just("events"),
                Just("layers"),
                Just(""),
                Just("%"),
                Just("%4"),
                Just("%zz"),
                Just("%+f"),
                Just("%C3%A9"),
                Just("%C3"),
                Just("%FF"),
                Just(".."),
                Just("%2F"),
            ],
            0..5,
        )
        .prop_map(|segments| format!("/{}", segments.join("/")))
    }

    fn bodies() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            "(\\{\\}|\\{\"weight\": ?(-1|0|5|4294967296|1e3|1\\.5|null|\"2\")\\}|\\{\"max_in_flight\": ?(null|0|7|18446744073709551616)\\}|\\{\"backend_id\": \"(web1|web2|api1|nope|)\"\\}| |\\[\\]|null)"
                .prop_map(String::into_bytes),
            (1usize..2_000).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes()),
            Just(vec![b' '; 70 * 1024]),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever a request holds, the answer is JSON with its length,
        /// an error object for any status but 200, and never a server
        /// error.
        #[test]
        fn any_request_is_answered_with_json(
            method in "(GET|HEAD|POST|DELETE|PUT|PATCH|OPTIONS)",
            path in segments(),
            query in "(|\\?limit=(0|5|-1|x|99999999999999999999|18446744073709551615)(&a=b)?|\\?a=b&limit=3)",
            host in proptest::option::of("(127\\.0\\.0\\.1|localhost|LocalHost:8080|\\[::1\\]:1|evil\\.example|u@127\\.0\\.0\\.1|1\\.2\\.3|\\[::1|[ -~]{0,12})"),
            content_type in proptest::option::of("(application/json|Application/JSON; charset=utf-8|text/plain|application/jsonx|[ -~]{0,16})"),
            body in bodies(),
        ) {
            runtime().block_on(async {
                let f = fixture();
                let mut request = Request::builder().method(method.as_str()).uri(format!("{path}{query}"));
                if let Some(host) = &host {
                    request = request.header("host", host.as_str());
                }
                if let Some(content_type) = &content_type {
                    request = request.header("content-type", content_type.as_str());
                }
                let request = request.body(Full::new(Bytes::from(body))).unwrap();
                let response: Response<AdminBody> = f.admin.clone().oneshot(request).await.unwrap();
                let status = response.status();
                assert!(
                    [200, 400, 403, 404, 405, 409, 413, 415].contains(&status.as_u16()),
                    "{method} {path}{query}: {status}"
                );
                assert_eq!(response.headers()["content-type"], "application/json");
                let length: usize = response.headers()["content-length"].to_str().unwrap().parse().unwrap();
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                if method == "HEAD" {
                    assert!(bytes.is_empty());
                } else {
                    assert_eq!(bytes.len(), length);
                    let answer: Value = serde_json::from_slice(&bytes).unwrap();
                    if status != 200 {
                        assert!(answer["error"].is_string(), "{answer}");
                    }
                }
            });
        }

        /// A backend id with any of its bytes percent-encoded, in either
        /// case, names that backend; an escape without two hex digits is
        /// refused before any action.
        #[test]
        fn ids_with_any_bytes_encoded_name_their_backend(
            encode in proptest::collection::vec(any::<bool>(), 8),
            lower in any::<bool>(),
            bad in "%(|[0-9a-fA-F]|[g-z+-][0-9a-f]|[0-9a-f][g-z+-])",
        ) {
            runtime().block_on(async {
                let f = fixture();
                for id in ["web 3", "web1"] {
                    let path = format!("/backends/{}", encoded(id, &encode, lower));
                    let (status, body) = call(&f.admin, "GET", &path, "").await;
                    assert_eq!((status, &body["id"]), (StatusCode::OK, &json!(id)), "{path}");
                }
                let path = format!("/backends/web1{bad}/disable");
                let (status, body) = call(&f.admin, "POST", &path, "").await;
                assert_eq!(status, 400, "{path}: {body}");
                assert_eq!(f.web.state(&"web1".into()).unwrap().admin(), AdminStatus::Enabled);
            });
        }
    }

    /// Posts `body`, declared JSON, to backend `web2`'s weight.
    async fn post_weight(admin: &AdminService, body: impl AsRef<[u8]>) -> (StatusCode, Value) {
        call(admin, "POST", "/backends/web2/weight", body).await
    }

    /// `5` nested in up to 3 000 JSON arrays.
    fn nested_five() -> impl Strategy<Value = String> {
        (1usize..3_000).prop_map(|d| format!("{}5{}", "[".repeat(d), "]".repeat(d)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any `u32` weight but 0, in JSON spaced any way, is set as sent,
        /// on that backend alone.
        #[test]
        fn a_weight_is_set_as_sent(
            weight in prop_oneof![Just(1), Just(u32::MAX), 1..=u32::MAX],
            spaces in proptest::collection::vec("[ \t\r\n]{0,2}", 5),
        ) {
            runtime().block_on(async {
                let f = fixture();
                let body = format!(
                    r#"{}{{{}"weight"{}:{}{weight}{}}}"#,
                    spaces[0], spaces[1], spaces[2], spaces[3], spaces[4],
                );
                let (status, answer) = post_weight(&f.admin, &body).await;
                assert_eq!((status, &answer["weight"]), (StatusCode::OK, &json!(weight)), "{body:?}");
                assert_eq!(f.web.state(&"web2".into()).unwrap().weight(), weight);
                assert_eq!(f.web.state(&"web1".into()).unwrap().weight(), 1);
            });
        }
    }

    /// JSON for a weight that is no `u32`: negative, a fraction or an
    /// exponent, past `u32::MAX`, text, another type, or nested deep.
    fn no_weights() -> impl Strategy<Value = String> {
        prop_oneof![
            "-[1-9][0-9]{0,12}",
            "-?[0-9]{1,4}\\.[0-9]{1,3}",
            "-?[0-9]{1,3}[eE][+-]?[0-9]{1,3}",
            (u64::from(u32::MAX) + 1..=u64::MAX).prop_map(|n| n.to_string()),
            "[1-9][0-9]{20,400}",
            "\"[0-9]{0,5}\"",
            "(null|true|false|\\[\\]|\\{\\}|\\[5\\]|\\{\"weight\": 5\\})",
            json_values::values(2, 3).prop_map(|value| value.to_string()),
            nested_five(),
        ]
    }

    /// A `u32` weight in another shape than `{"weight": N}`, `N` standing
    /// for the weight.
    const SHAPES: [&str; 17] = [
        "N",
        "[N]",
        "\"N\"",
        "[{\"weight\": N}]",
        "{\"weight\": [N]}",
        "{\"weight\": {\"weight\": N}}",
        "{\"Weight\": N}",
        "{\"weight \": N}",
        "{weight: N}",
        "{\"weight\" N}",
        "{\"weight\": N,}",
        "{\"weight\": N",
        "{\"weight\": N}}",
        "{\"weight\": N} x",
        "{\"weight\": N}{}",
        "{\"weight\": N, \"weight\": N}",
        "{\"weight\": N.0}",
    ];

    /// JSON, and text near it, that is no `{"weight": N}`: any JSON, a
    /// weight that is no `u32`, a field beside the weight, a weight in
    /// another shape, nothing but spaces, or nesting deep.
    fn no_weight_texts() -> impl Strategy<Value = String> {
        prop_oneof![
            json_values::values(3, 4)
                .prop_filter("no weight", |value| {
                    value
                        .as_object()
                        .is_none_or(|object| object.get("weight").is_none())
                })
                .prop_map(|value| value.to_string()),
            no_weights().prop_map(|weight| format!(r#"{{"weight": {weight}}}"#)),
            (
                any::<u32>(),
                "([a-z_]{0,8}|Weight|WEIGHT|weight |\\PC{1,4})",
                json_values::values(2, 3),
                any::<bool>(),
            )
                .prop_filter("another field", |(_, name, ..)| name != "weight")
                .prop_map(|(weight, name, value, first)| {
                    let other = format!("{}: {value}", Value::from(name));
                    if first {
                        format!(r#"{{{other}, "weight": {weight}}}"#)
                    } else {
                        format!(r#"{{"weight": {weight}, {other}}}"#)
                    }
                }),
            (any::<u32>(), proptest::sample::select(&SHAPES[..]))
                .prop_map(|(weight, shape)| shape.replace('N', &weight.to_string())),
            "[ \t\r\n]{0,3}",
            nested_five(),
            (1usize..3_000).prop_map(|d| format!("{}{}", "{\"weight\": ".repeat(d), "}".repeat(d))),
        ]
    }

    /// Bodies that are no `{"weight": N}`: any bytes, or text near it.
    fn no_weight_bodies() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            1 => proptest::collection::vec(any::<u8>(), 0..200),
            5 => no_weight_texts().prop_map(String::into_bytes),
        ]
    }

    proptest! {
        // As many cases as the requests above: each shape of a weight is
        // one body in a hundred.
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A body that is no `{"weight": N}` of a `u32` is refused with a
        /// 400 that names that form, and changes no weight.
        #[test]
        fn a_body_that_is_no_weight_is_refused(
            bodies in proptest::collection::vec(no_weight_bodies(), 1..6),
        ) {
            runtime().block_on(async {
                let f = fixture();
                f.handle.set_weight(&"web2".into(), 7).unwrap();
                for body in bodies {
                    let (status, answer) = post_weight(&f.admin, body.clone()).await;
                    let body = String::from_utf8_lossy(&body);
                    assert_eq!(status, 400, "{body}: {answer}");
                    let message = answer["error"].as_str().unwrap();
                    assert!(message.starts_with(r#"expected {"weight": N}"#), "{body}: {answer}");
                }
                assert_eq!(f.web.state(&"web2".into()).unwrap().weight(), 7);
            });
        }
    }
}
