//! Loading groups from LEBA-shaped YAML and TOML files.

use std::error::Error;
use std::time::Duration;

use http::{Request, Response};
use tower::{service_fn, BoxError, ServiceExt};
use tower_ha::config::Config;
use tower_ha::control::{Events, GroupMode, Handle};
use tower_ha::{BackendId, HealthStatus};

type Svc = tower::util::BoxCloneSyncService<Request<()>, Response<String>, BoxError>;

fn named(id: &BackendId) -> Svc {
    let name = id.to_string();
    Svc::new(service_fn(move |_req: Request<()>| {
        let name = name.clone();
        async move { Ok::<_, BoxError>(Response::new(name)) }
    }))
}

const LEBA: &str = r#"
# The shape of LEBA's config.yaml.
failover_groups:
  - name: "app-servers"
    mode: "active-passive"
    backends: ["backend1", "backend2", "backend3"]
    primary: "backend2"
    health_check:
      path: "/custom-health"
      interval: "5s"
      timeout: "2s"
      healthy_threshold: 3
      unhealthy_threshold: 2

  - name: "db-servers"
    mode: "normal"
    backends: ["db1", "db2"]
"#;

/// Writes `text` to the file `name` in `dir`; returns its path.
fn config_file(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(start_paused = true)]
async fn a_leba_yaml_file_loads_and_builds_working_groups() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(&dir, "config.yaml", LEBA);
    let config = Config::load(&path).unwrap();
    assert_eq!(config.failover_groups.len(), 2);
    let app = config.group("app-servers").unwrap();
    assert_eq!(app.mode, GroupMode::ActivePassive);
    let hc = app.health_check.as_ref().unwrap();
    assert_eq!(hc.path.as_deref(), Some("/custom-health"));
    assert_eq!(hc.interval, Duration::from_secs(5));
    assert_eq!(hc.timeout, Duration::from_secs(2));
    assert_eq!((hc.healthy_threshold, hc.unhealthy_threshold), (3, 2));

    let handle = Handle::new(Events::default());
    let app_balance = app.build(named);
    let db_balance = config.group("db-servers").unwrap().build(named);
    handle.add_group("app-servers", &app_balance).unwrap();
    handle.add_group("db-servers", &db_balance).unwrap();

    let serve = |b: &tower_ha::balance::Balance<Svc, _>| b.clone().oneshot(Request::new(()));
    // The configured primary serves; backups follow the listed order.
    assert_eq!(serve(&app_balance).await.unwrap().into_body(), "backend2");
    app_balance
        .pool()
        .state(&"backend2".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);
    assert_eq!(serve(&app_balance).await.unwrap().into_body(), "backend1");
    let stats = handle.group_stats("app-servers").unwrap();
    assert_eq!(stats.configured_primary.unwrap().as_str(), "backend2");
    assert_eq!(stats.current_primary.unwrap().as_str(), "backend1");
    assert_eq!(stats.failovers, 1);

    // The normal group spreads requests.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(serve(&db_balance).await.unwrap().into_body());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["db1", "db2"]);
    assert_eq!(
        handle.group_stats("db-servers").unwrap().mode,
        GroupMode::Normal
    );
}

#[test]
fn the_same_groups_load_from_toml() {
    let toml = r#"
[[failover_groups]]
name = "app-servers"
mode = "active-passive"
backends = ["backend1", "backend2"]
primary = "backend1"
failback = "auto"
failback_after = "1m30s"
min_dwell = "10s"

[failover_groups.health_check]
interval = "500ms"
"#;
    let dir = tempfile::tempdir().unwrap();
    // Whatever comes before `.toml`, in any case, nothing included.
    for name in [".toml", "groups.TOML"] {
        let path = config_file(&dir, name, toml);
        let config = Config::load(&path).unwrap();
        assert_eq!(config.failover_groups[0].name, "app-servers", "{name}");
    }
    let path = config_file(&dir, "groups.toml", toml);
    let config = Config::load(&path).unwrap();
    let group = &config.failover_groups[0];
    assert_eq!(group.failback_after, Some(Duration::from_secs(90)));
    assert_eq!(group.min_dwell, Some(Duration::from_secs(10)));
    let hc = group.health_check.as_ref().unwrap();
    assert_eq!(hc.interval, Duration::from_millis(500));
    assert_eq!(hc.timeout, Duration::from_secs(1));
    let priority = group.strategy();
    let priority = priority.priority().unwrap();
    assert_eq!(
        priority.failback_rule(),
        tower_ha::balance::Failback::auto(Duration::from_secs(90))
    );
}

/// Settings that only an active-passive group uses, in a normal group: the
/// round robin would ignore them, so they are refused by name.
#[test]
fn a_normal_group_refuses_primary_and_failback_settings() {
    for (setting, field) in [
        ("primary: x", "primary"),
        ("failback: auto", "failback"),
        ("failback_after: 30s", "failback_after"),
        ("min_dwell: 10s", "min_dwell"),
        ("failback: auto, failback_after: 30s", "failback"),
    ] {
        let (at, msg) = invalid(&format!(
            "failover_groups:\n  - {{name: app, mode: active-passive, backends: [x], primary: x}}\n  - {{name: db, mode: normal, backends: [x, y], {setting}}}\n"
        ));
        assert_eq!(at, format!("failover_groups[1].{field}"), "{setting}");
        assert!(msg.contains("group `db` is in normal mode"), "{msg}");
        assert!(msg.contains(&format!("`{field}` only applies")), "{msg}");
    }
    // The same settings are fine in an active-passive group, and a normal
    // group may say `failback: never`, the default.
    Config::from_yaml(
        "failover_groups:\n  - {name: app, mode: active-passive, backends: [x, y], primary: y, failback: auto, failback_after: 30s, min_dwell: 10s}\n  - {name: db, mode: normal, backends: [x], failback: never}\n",
    )
    .unwrap();
}

/// Groups share settings through YAML anchors and merge keys; a mistake
/// in such a file is still an error.
#[test]
fn yaml_merge_keys_share_settings_between_groups() {
    let yaml = "\
checks: &checks
  interval: 3s
  unhealthy_threshold: 4
failover_groups:
  - name: app
    mode: normal
    backends: [x, y]
    health_check:
      <<: *checks
      healthy_threshold: 5
  - name: db
    mode: normal
    backends: [z]
    health_check: *checks
";
    // The top-level `checks` is a key of its own: refused, merged or not.
    let err = Config::from_yaml(yaml).unwrap_err();
    assert!(err.to_string().contains("unknown field `checks`"), "{err}");
    let yaml = yaml.replacen("checks: &checks", "x-checks: &checks", 1);
    let err = Config::from_yaml(&yaml).unwrap_err();
    assert!(
        err.to_string().contains("unknown field `x-checks`"),
        "{err}"
    );
    // Anchored inside the first group instead.
    let yaml = "\
failover_groups:
  - name: app
    mode: normal
    backends: [x, y]
    health_check: &checks
      interval: 3s
      unhealthy_threshold: 4
  - name: db
    mode: normal
    backends: [z]
    health_check:
      <<: *checks
      healthy_threshold: 5
";
    let config = Config::from_yaml(yaml).unwrap();
    let (app, db) = (config.group("app").unwrap(), config.group("db").unwrap());
    // Scalars read as in a file without merge keys: a name that looks like
    // a number is a name.
    let numbered = Config::from_yaml(&yaml.replace("name: db", "name: 2024")).unwrap();
    assert!(numbered.group("2024").is_some());
    // A name YAML reads as a number written another way is read in the
    // number's usual form (documented); quoted, it is kept as written.
    let hex = Config::from_yaml(&yaml.replace("name: db", "name: 0x1A")).unwrap();
    assert!(hex.group("26").is_some());
    let quoted = Config::from_yaml(&yaml.replace("name: db", "name: \"0x1A\"")).unwrap();
    assert!(quoted.group("0x1A").is_some());
    let (a, d) = (
        app.health_check.as_ref().unwrap(),
        db.health_check.as_ref().unwrap(),
    );
    assert_eq!(d.interval, Duration::from_secs(3));
    assert_eq!(d.interval, a.interval);
    assert_eq!(d.unhealthy_threshold, 4);
    assert_eq!(d.healthy_threshold, 5);
    let err = Config::from_yaml(&yaml.replace("healthy_threshold: 5", "healthy_threshold: 0"))
        .unwrap_err();
    assert_eq!(
        err.field(),
        "failover_groups[1].health_check.healthy_threshold"
    );
    // A parse error found once the merge keys are applied names no line
    // of a text the file does not hold.
    let err = Config::from_yaml(&yaml.replace("healthy_threshold: 5", "healthy_threshold: five"))
        .unwrap_err();
    assert!(err.is_parse(), "{err}");
    assert!(!err.to_string().contains("line "), "{err}");
    assert!(err.to_string().contains("invalid type"), "{err}");
    // One found before the first merge key is where the file says.
    let err = Config::from_yaml(&yaml.replace("interval: 3s", "interval: 3 parsecs")).unwrap_err();
    assert!(err.to_string().contains("line 6 column 17"), "{err}");
    assert!(err.to_string().contains("unknown unit"), "{err}");
}

/// A misspelt top-level key is an error, not a file with no groups; so is a
/// file with no group at all.
#[test]
fn unknown_top_level_keys_and_missing_groups_are_refused() {
    let group = "  - {name: a, mode: normal, backends: [x]}\n";
    for yaml in [
        format!("failover-groups:\n{group}"),
        format!("failover_groups:\n{group}listen: \"0.0.0.0:8080\"\n"),
    ] {
        let err = Config::from_yaml(&yaml).unwrap_err();
        assert!(err.is_parse(), "{yaml}: {err}");
        assert!(err.field().starts_with("line "), "{}", err.field());
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
    let err = Config::from_toml("[[failover-groups]]\nname = \"a\"\n").unwrap_err();
    assert!(err.is_parse(), "{err}");
    assert_eq!(err.field(), "line 1 column 3", "{err}");
    let typed = Config::from_toml("\n[[failover_groups]]\nname = \"a\"\nmode = 7\n").unwrap_err();
    assert_eq!(typed.field(), "line 4 column 8", "{typed}");
    assert!(
        typed
            .to_string()
            .starts_with("invalid configuration in line 4 column 8: "),
        "{typed}"
    );
    // Columns count characters, as YAML's do.
    let typed =
        Config::from_toml("[[failover_groups]]\nname = \"é\"\ntag = \"é\" x\n").unwrap_err();
    assert!(typed.is_parse());
    assert_eq!(typed.field(), "line 3 column 11", "{typed}");
    assert!(err.to_string().contains("unknown field"), "{err}");

    for yaml in ["{}", "failover_groups: []"] {
        let (field, msg) = invalid(yaml);
        assert_eq!(field, "failover_groups");
        assert!(msg.contains("no group"), "{msg}");
    }
    let err = Config::from_toml("").unwrap_err();
    assert!(err.is_invalid(), "{err}");
    assert_eq!(err.field(), "failover_groups");
    assert!(Config::default().validate().is_err());
}

/// The groups inside a larger application file: the application's own
/// settings type holds a `Config`, flattened or under a key.
#[test]
fn groups_load_from_a_larger_application_file() {
    #[derive(serde::Deserialize)]
    struct Flat {
        listen: String,
        #[serde(flatten)]
        ha: Config,
    }
    let text = format!("listen: \"0.0.0.0:8080\"\n{LEBA}");
    let app: Flat = serde_yaml_ng::from_str(&text).unwrap();
    app.ha.validate().unwrap();
    assert_eq!(app.listen, "0.0.0.0:8080");
    assert_eq!(app.ha.failover_groups.len(), 2);
    // Flattened, a misspelt key is left to the application, but the
    // groups are then missing and validation says so.
    let typo: Flat =
        serde_yaml_ng::from_str(&text.replace("failover_groups", "failover-groups")).unwrap();
    assert!(typo
        .ha
        .validate()
        .unwrap_err()
        .to_string()
        .contains("no group"));

    #[derive(serde::Deserialize)]
    struct Nested {
        #[allow(dead_code)]
        listen: String,
        ha: Config,
    }
    let nested =
        "listen: x\nha:\n  failover_groups:\n    - {name: a, mode: normal, backends: [x]}\n";
    let app: Nested = serde_yaml_ng::from_str(nested).unwrap();
    app.ha.validate().unwrap();
    let typo = nested.replace("failover_groups", "groups");
    assert!(serde_yaml_ng::from_str::<Nested>(&typo).is_err());
}

fn invalid(yaml: &str) -> (String, String) {
    let err = Config::from_yaml(yaml).unwrap_err();
    assert!(err.is_invalid(), "{err}");
    (err.field().to_owned(), err.to_string())
}

#[test]
fn each_invalid_configuration_names_its_field() {
    let (field, msg) = invalid(
        "failover_groups:\n  - {name: a, mode: active-passive, backends: [x, y], primary: z}\n",
    );
    assert_eq!(field, "failover_groups[0].primary");
    assert!(msg.contains("unknown primary `z`"), "{msg}");

    let (field, msg) = invalid("failover_groups:\n  - {name: a, mode: normal, backends: []}\n");
    assert_eq!(field, "failover_groups[0].backends");
    assert!(msg.contains("no backend"), "{msg}");

    let (field, msg) = invalid(
        "failover_groups:\n  - {name: a, mode: normal, backends: [x]}\n  - {name: a, mode: normal, backends: [y]}\n",
    );
    assert_eq!(field, "failover_groups[1].name");
    assert!(msg.contains("duplicate group name `a`"), "{msg}");

    let (field, msg) =
        invalid("failover_groups:\n  - {name: a, mode: normal, backends: [x, y, x]}\n");
    assert_eq!(field, "failover_groups[0].backends[2]");
    assert!(msg.contains("duplicate backend `x`"), "{msg}");

    let (field, _) =
        invalid("failover_groups:\n  - {name: a, mode: active-passive, backends: [x]}\n");
    assert_eq!(field, "failover_groups[0].primary");

    let (field, _) = invalid("failover_groups:\n  - {name: ' ', mode: normal, backends: [x]}\n");
    assert_eq!(field, "failover_groups[0].name");

    for path in ["healthz", "/health check", "/a\\tb", ""] {
        let (field, msg) = invalid(&format!(
            "failover_groups:\n  - {{name: a, mode: normal, backends: [x], health_check: {{path: \"{path}\"}}}}\n"
        ));
        assert_eq!(field, "failover_groups[0].health_check.path", "{path}");
        assert!(msg.contains("is not a path"), "{msg}");
    }

    for setting in ["failback_after: 30s", "min_dwell: 10s"] {
        let (field, msg) = invalid(&format!(
            "failover_groups:\n  - {{name: a, mode: active-passive, backends: [x, y], primary: x, {setting}}}\n"
        ));
        assert_eq!(
            field,
            format!("failover_groups[0].{}", setting.split(':').next().unwrap())
        );
        assert!(msg.contains("failback: auto"), "{msg}");
    }

    let (field, _) = invalid(
        "failover_groups:\n  - {name: a, mode: normal, backends: [x], health_check: {healthy_threshold: 0}}\n",
    );
    assert_eq!(field, "failover_groups[0].health_check.healthy_threshold");
    let (field, _) = invalid(
        "failover_groups:\n  - {name: a, mode: normal, backends: [x], health_check: {interval: 0s}}\n",
    );
    assert_eq!(field, "failover_groups[0].health_check.interval");
    // Below the checker's finest step, which would run it at 1 ms.
    for (setting, name) in [
        ("interval: 500us", "interval"),
        ("timeout: 999999ns", "timeout"),
    ] {
        let (field, msg) = invalid(&format!(
            "failover_groups:\n  - {{name: a, mode: normal, backends: [x], health_check: {{{setting}}}}}\n"
        ));
        assert_eq!(field, format!("failover_groups[0].health_check.{name}"));
        assert!(msg.contains("at least 1ms"), "{msg}");
    }

    for (failover, name) in [
        ("{max_attempts: 0}", "max_attempts"),
        ("{per_try_timeout: 0s}", "per_try_timeout"),
        ("{deadline: 0ms}", "deadline"),
        ("{retry_ratio: -0.5}", "retry_ratio"),
        ("{retry_ratio: .nan}", "retry_ratio"),
        ("{retry_ratio: .inf}", "retry_ratio"),
    ] {
        let (field, _) = invalid(&format!(
            "failover_groups:\n  - {{name: a, mode: normal, backends: [x], failover: {failover}}}\n"
        ));
        assert_eq!(field, format!("failover_groups[0].failover.{name}"));
    }
}

/// A group's `failover` section builds a layer that behaves as written:
/// attempts bounded by `max_attempts`, a per-try timeout that moves on.
#[tokio::test(start_paused = true)]
async fn failover_settings_build_a_working_layer() {
    use tower::{service_fn, ServiceBuilder, ServiceExt};
    use tower_ha::balance::{Balance, RoundRobin};
    use tower_ha::Pool;

    let config = Config::from_yaml(
        "failover_groups:\n  - name: web\n    mode: normal\n    backends: [slow, bad, good]\n    failover:\n      max_attempts: 2\n      per_try_timeout: 100ms\n      retry_ratio: 1.0\n",
    )
    .unwrap();
    let failover = config.group("web").unwrap().failover.clone().unwrap();
    assert_eq!(failover.max_attempts, Some(2));
    // More retries than requests, as `RetryBudget` allows.
    let generous = Config::from_yaml(
        "failover_groups:\n  - {name: a, mode: normal, backends: [x], failover: {retry_ratio: 1.5}}\n",
    )
    .unwrap();
    let generous = generous.group("a").unwrap().failover.clone().unwrap();
    assert_eq!(generous.retry_ratio, Some(1.5));
    assert_eq!(failover.per_try_timeout, Some(Duration::from_millis(100)));

    let pool = Pool::new();
    for name in ["slow", "bad", "good"] {
        pool.insert(
            name,
            tower::util::BoxCloneSyncService::new(service_fn(
                move |_req: http::Request<()>| async move {
                    if name == "slow" {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    let status = if name == "bad" { 503 } else { 200 };
                    Ok::<_, tower_ha::BoxError>(
                        http::Response::builder().status(status).body(name).unwrap(),
                    )
                },
            )),
        );
    }
    let svc = ServiceBuilder::new()
        .layer(failover.layer())
        .service(Balance::new(pool, RoundRobin::new()));
    // Round robin starts at "slow": abandoned after 100 ms, then "bad"
    // answers 503 and the two attempts are spent.
    let start = tokio::time::Instant::now();
    let resp = svc.clone().oneshot(http::Request::new(())).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(*resp.body(), "bad");
    assert_eq!(start.elapsed(), Duration::from_millis(100));
}

/// `grpc_timeout: true` builds a layer whose requests a client's
/// `grpc-timeout` bounds; without it, the header is not read.
#[tokio::test(start_paused = true)]
async fn a_failover_section_can_let_a_grpc_timeout_bound_requests() {
    use tower::{service_fn, ServiceBuilder, ServiceExt};
    use tower_ha::balance::{Balance, RoundRobin};
    use tower_ha::Pool;

    for (section, ends_after) in [("{grpc_timeout: true}", 50), ("{}", 60_000)] {
        let config = Config::from_yaml(&format!(
            "failover_groups:\n  - {{name: a, mode: normal, backends: [x], failover: {section}}}\n"
        ))
        .unwrap();
        let failover = config.group("a").unwrap().failover.clone().unwrap();
        let pool = Pool::new();
        pool.insert(
            "slow",
            service_fn(|_req: http::Request<()>| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, tower_ha::BoxError>(http::Response::new(()))
            }),
        );
        let svc = ServiceBuilder::new()
            .layer(failover.layer())
            .service(Balance::new(pool, RoundRobin::new()));
        let start = tokio::time::Instant::now();
        let request = http::Request::builder()
            .header("grpc-timeout", "50m")
            .body(())
            .unwrap();
        let result = svc.oneshot(request).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(ends_after),
            "{section}"
        );
        assert_eq!(result.is_ok(), ends_after == 60_000, "{section}");
    }
}

#[test]
fn bad_syntax_types_and_durations_are_parse_errors_with_a_location() {
    for yaml in [
        "failover_groups:\n  - {name: a, mode: sideways, backends: [x]}\n",
        "failover_groups:\n  - {name: a, mode: normal, backends: [x], colour: red}\n",
        "failover_groups:\n  - {name: a, mode: normal, backends: [x], health_check: {interval: 5 parsecs}}\n",
        "failover_groups:\n  - {name: a, mode: normal, backends: [x], health_check: {interval: '5'}}\n",
        "failover_groups: [\n",
    ] {
        let err = Config::from_yaml(yaml).unwrap_err();
        assert!(err.is_parse(), "{yaml}: {err}");
        assert!(err.field().starts_with("line "), "{yaml}: {}", err.field());
    }
    let err = Config::from_yaml(
        "failover_groups:\n  - {name: a, mode: normal, backends: [x], health_check: {interval: 5 parsecs}}\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown unit `parsecs`"), "{err}");
    let err = Config::from_toml("failover_groups = 3").unwrap_err();
    assert!(err.is_parse());
    let err = Config::load("/nonexistent/groups.yaml").unwrap_err();
    assert!(err.is_io());
    assert_eq!(err.field(), "/nonexistent/groups.yaml");
}

/// A parse error's message says what is wrong, as well as where, so that
/// printing it is enough, and once: the parser's error is not its source
/// too, which a printer of the whole chain would print again.
#[test]
fn a_parse_error_says_what_is_wrong() {
    let err = Config::from_yaml(
        "failover_groups:\n  - {name: a, mode: Active-Passive, backends: [x], primary: x}\n",
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with("invalid configuration in line 2 column 21: "),
        "{message}"
    );
    assert!(
        message.contains("unknown variant `Active-Passive`, expected `active-passive` or `normal`"),
        "{message}"
    );
    assert_eq!(message.matches("line 2").count(), 1, "{message}");
    assert!(err.source().is_none());
    let chain = tower_ha::error::Report(&err).to_string();
    assert_eq!(chain.matches("unknown variant").count(), 1, "{chain}");

    let err = Config::from_yaml("failover-groups:\n  - {name: a, mode: normal, backends: [x]}\n")
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown field `failover-groups`"),
        "{err}"
    );

    let err = Config::from_toml("[[failover-groups]]\nname = \"a\"\n").unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with("invalid configuration in line 1 column 3: "),
        "{message}"
    );
    assert!(
        message.contains("unknown field `failover-groups`"),
        "{message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");

    let dir = tempfile::tempdir().unwrap();
    let path = config_file(
        &dir,
        "groups.yaml",
        "failover_groups:\n  - {name: a, mode: sideways, backends: [x]}\n",
    );
    let message = Config::load(&path).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!(
            "invalid configuration in {} line 2 column 21: ",
            path.display()
        )),
        "{message}"
    );
    assert!(message.contains("unknown variant `sideways`"), "{message}");
}

/// An error in a file says which file, whether it does not parse or
/// holds a value that is not acceptable; `.TOML` is TOML.
#[test]
fn a_loaded_files_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(
        &dir,
        "groups.yaml",
        "failover_groups:\n  - {name: a, mode: active-passive, backends: [x], primary: z}\n",
    );
    let err = Config::load(&path).unwrap_err();
    assert!(err.is_invalid(), "{err}");
    assert_eq!(err.file(), Some(path.as_path()));
    assert_eq!(err.field(), "failover_groups[0].primary");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid configuration in {}: failover_groups[0].primary: unknown primary `z`: not one of the backends of group `a`",
            path.display()
        )
    );
    assert_eq!(
        Config::from_yaml(&std::fs::read_to_string(&path).unwrap())
            .unwrap_err()
            .file(),
        None
    );

    let path = config_file(
        &dir,
        "groups.TOML",
        "[[failover_groups]]\nname = \"a\"\nmode = \"normal\"\nbackends = [\"x\"]\n",
    );
    let config = Config::load(&path).unwrap();
    assert_eq!(config.failover_groups[0].name, "a");
}

/// A file that was read but is not UTF-8 (a Latin-1 comment, say) does not
/// parse: a parse error that says where, not a read error.
#[test]
fn a_file_that_is_not_utf8_is_a_parse_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("groups.yaml");
    std::fs::write(
        &path,
        b"failover_groups:\n  - name: caf\xc3\xa9 caf\xe9\n    mode: normal\n    backends: [a]\n",
    )
    .unwrap();
    let err = Config::load(&path).unwrap_err();
    assert!(err.is_parse(), "{err:?}");
    assert!(!err.is_io());
    // In characters: `é` before it is one.
    assert_eq!(err.field(), "line 2 column 19");
    assert_eq!(err.file(), Some(path.as_path()));
    assert!(err.to_string().contains("not UTF-8"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_groups_health_check_settings_drive_the_checker() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    use tower_ha::health::{probe_fn, HealthChecker};

    let config = Config::from_yaml(
        "failover_groups:\n  - name: app\n    mode: active-passive\n    backends: [a, b]\n    primary: a\n    health_check: {interval: 5s, timeout: 2s, healthy_threshold: 3, unhealthy_threshold: 2}\n",
    )
    .unwrap();
    let group = &config.failover_groups[0];
    let balance = group.build(named);
    let pool = balance.pool().clone();

    // "a" fails its probes from the start; probes are counted. "b"'s
    // probes never answer: only the configured timeout fails them.
    let up = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicU32::new(0));
    let probe = probe_fn({
        let (up, probes) = (up.clone(), probes.clone());
        move |id: &BackendId, _svc: &Svc| {
            let fail = id.as_str() == "a" && !up.load(Ordering::SeqCst);
            let hang = id.as_str() == "b";
            if id.as_str() == "a" {
                probes.fetch_add(1, Ordering::SeqCst);
            }
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                if fail {
                    Err::<(), BoxError>("down".into())
                } else {
                    Ok(())
                }
            }
        }
    });
    let checker = group
        .health_check
        .as_ref()
        .unwrap()
        .apply(HealthChecker::new(pool.clone(), probe).jitter(Duration::ZERO))
        .spawn();
    let a = pool.state(&"a".into()).unwrap();
    // Probes at 0 s and 5 s: unhealthy after the second (fall 2).
    tokio::time::sleep(Duration::from_millis(4_900)).await;
    assert_eq!(a.health(), HealthStatus::Healthy);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.health(), HealthStatus::Unhealthy);
    assert_eq!(probes.load(Ordering::SeqCst), 2);
    // "b"'s probes at 0 s and 5 s time out after 2 s (not the default
    // 1 s): unhealthy at 7 s, not at 6 s.
    let b = pool.state(&"b".into()).unwrap();
    tokio::time::sleep(Duration::from_millis(1_400)).await; // 6.5 s
    assert_eq!(b.health(), HealthStatus::Healthy);
    tokio::time::sleep(Duration::from_millis(600)).await; // 7.1 s
    assert_eq!(b.health(), HealthStatus::Unhealthy);
    // Healthy again after three passing probes (rise 3): 10, 15, 20 s.
    up.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(8_000)).await; // 15.1 s
    assert_eq!(a.health(), HealthStatus::Unhealthy);
    tokio::time::sleep(Duration::from_millis(5_000)).await; // 20.1 s
    assert_eq!(a.health(), HealthStatus::Healthy);
    checker.shutdown().await;
}

/// A configuration written back out reads as the same configuration, even
/// with durations below a millisecond.
#[test]
fn a_configuration_survives_a_write_and_a_read() {
    let config = Config::from_yaml(
        "failover_groups:\n  - name: app\n    mode: active-passive\n    backends: [a, b]\n    primary: a\n    failback: auto\n    failback_after: 2h\n    min_dwell: 1.5s\n    health_check: {interval: 1000250ns, timeout: 1500us}\n    failover: {per_try_timeout: 250ns, deadline: 1d}\n",
    )
    .unwrap();
    let json = serde_json::to_value(&config).unwrap();
    let group = &json["failover_groups"][0];
    assert_eq!(group["health_check"]["interval"], "1000250ns");
    assert_eq!(group["health_check"]["timeout"], "1500us");
    assert_eq!(group["failback_after"], "2h");
    assert_eq!(group["min_dwell"], "1500ms");
    assert_eq!(group["failover"]["per_try_timeout"], "250ns");
    assert_eq!(group["failover"]["deadline"], "1d");
    let again = Config::from_yaml(&json.to_string()).unwrap();
    assert_eq!(again, config);
}

/// A bad duration's error names the key that holds it, in both formats.
#[test]
fn a_bad_duration_names_its_key() {
    let err = Config::from_yaml(
        "failover_groups:\n  - name: a\n    mode: normal\n    backends: [x]\n    health_check:\n      interval: 5 parsecs\n",
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("failover_groups[0].health_check.interval: "),
        "{message}"
    );
    assert!(message.contains("unknown unit `parsecs`"), "{message}");
    assert!(message.contains("line 6 column 17"), "{message}");

    let err = Config::from_yaml(
        "failover_groups:\n  - {name: a, mode: normal, backends: [x], failover: {per_try_timeout: 5}}\n",
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("failover_groups[0].failover.per_try_timeout: "),
        "{message}"
    );

    // A null duration is no duration, as an absent one is.
    let config = Config::from_yaml(
        "failover_groups:\n  - {name: a, mode: normal, backends: [x], failover: {per_try_timeout: null, deadline: 2s}}\n",
    )
    .unwrap();
    let failover = config.failover_groups[0].failover.as_ref().unwrap();
    assert_eq!(failover.per_try_timeout, None);
    assert_eq!(failover.deadline, Some(Duration::from_secs(2)));

    let err = Config::from_toml(
        "[[failover_groups]]\nname = \"a\"\nmode = \"normal\"\nbackends = [\"x\"]\n[failover_groups.health_check]\ninterval = \"5 parsecs\"\n",
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("unknown unit `parsecs`"), "{message}");
    assert!(message.contains("line 6 column 12"), "{message}");
}

/// A normal group `app` of one backend `a` whose `health_check` section
/// is `yaml`.
fn with_health_check(yaml: &str) -> Config {
    Config::from_yaml(&format!(
        "failover_groups:\n  - {{name: app, mode: normal, backends: [a], health_check: {yaml}}}\n"
    ))
    .unwrap()
}

/// `lift_ejections` reaches the checker: by default a passing probe ends a
/// passive ejection; with `false` the ejection runs its time. It is written
/// out only when `false`.
#[tokio::test(start_paused = true)]
async fn a_groups_health_check_may_leave_ejections_to_run_their_time() {
    use tower_ha::health::{probe_fn, HealthChecker};

    for (yaml, lifted) in [
        "{interval: 5s}",
        "{interval: 5s, lift_ejections: true}",
        "{interval: 5s, lift_ejections: false}",
    ]
    .into_iter()
    .zip([true, true, false])
    {
        let config = with_health_check(yaml);
        let health = config.failover_groups[0].health_check.as_ref().unwrap();
        assert_eq!(health.lift_ejections, lifted, "{yaml}");
        let written = serde_json::to_value(health).unwrap();
        assert_eq!(
            written.get("lift_ejections"),
            (!lifted).then_some(&serde_json::Value::Bool(false)),
            "{yaml}"
        );

        let balance = config.failover_groups[0].build(named);
        let pool = balance.pool().clone();
        let a = pool.state(&"a".into()).unwrap();
        let probe = probe_fn(|_: &BackendId, _: &Svc| async { Ok::<(), BoxError>(()) });
        let checker = health
            .apply(HealthChecker::new(pool.clone(), probe).jitter(Duration::ZERO))
            .spawn();
        let t0 = tokio::time::Instant::now();
        // Ejected between probes (at 0 s and 5 s) for a minute.
        tokio::time::sleep(Duration::from_secs(1)).await;
        a.eject_until(t0 + Duration::from_secs(61));
        assert!(a.is_ejected());
        tokio::time::sleep(Duration::from_secs(5)).await; // 6 s
        assert_eq!(a.is_ejected(), !lifted, "{yaml}");
        checker.shutdown().await;
    }
}

/// `close_tunnels_when_down` reaches the checker: with `true` the backend's
/// tunnels are told to close as the probes mark it down, with the default
/// they are not. It is written out only when `true`.
#[tokio::test(start_paused = true)]
async fn a_groups_health_check_may_close_tunnels_when_a_backend_goes_down() {
    use tower_ha::health::{probe_fn, HealthChecker};

    for (yaml, closes) in [
        "{unhealthy_threshold: 1}",
        "{unhealthy_threshold: 1, close_tunnels_when_down: false}",
        "{unhealthy_threshold: 1, close_tunnels_when_down: true}",
    ]
    .into_iter()
    .zip([false, false, true])
    {
        let config = with_health_check(yaml);
        let health = config.failover_groups[0].health_check.as_ref().unwrap();
        assert_eq!(health.close_tunnels_when_down, closes, "{yaml}");
        let written = serde_json::to_value(health).unwrap();
        assert_eq!(
            written.get("close_tunnels_when_down"),
            closes.then_some(&serde_json::Value::Bool(true)),
            "{yaml}"
        );

        let balance = config.failover_groups[0].build(named);
        let pool = balance.pool().clone();
        let a = pool.state(&"a".into()).unwrap();
        let closed = a.tunnels_closed();
        let probe = probe_fn(|_: &BackendId, _: &Svc| async { Err::<(), BoxError>("down".into()) });
        let checker = health
            .apply(HealthChecker::new(pool.clone(), probe).jitter(Duration::ZERO))
            .spawn();
        // The first probe, at once, marks it down; the next comes 2 s later.
        let told = tokio::time::timeout(Duration::from_secs(1), closed)
            .await
            .is_ok();
        assert_eq!(a.health(), HealthStatus::Unhealthy, "{yaml}");
        assert_eq!(told, closes, "{yaml}");
        checker.shutdown().await;
    }
}

/// A configuration reloaded: the group rebuilt from the new one keeps what
/// the running group knew of the backends that stay (a drain and its
/// deadline, a disable, a weight, a health), takes the new backend, drops
/// the one that left, and takes the running group's place in the handle
/// in one step.
#[tokio::test(start_paused = true)]
async fn a_reloaded_group_keeps_its_backends_states() {
    use tower_ha::AdminStatus;

    let yaml = |backends: &str| {
        Config::from_yaml(&format!(
            "failover_groups:\n  - {{name: app, mode: normal, backends: [{backends}]}}\n"
        ))
        .unwrap()
    };
    let before = yaml("a, b, c, e");
    let running = before.failover_groups[0].build(named);
    let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(10)));
    handle.add_group("app", &running).unwrap();
    handle
        .add_group("other", &yaml("x").failover_groups[0].build(named))
        .unwrap();
    handle.drain(&"b".into()).unwrap();
    handle.disable(&"c".into()).unwrap();
    handle.set_weight(&"a".into(), 5).unwrap();
    running
        .pool()
        .state(&"e".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);

    // `c` leaves, `d` comes.
    let after = yaml("a, b, d, e");
    let mut made = Vec::new();
    let rebuilt = after.failover_groups[0].rebuild(running.pool(), |id, running| {
        made.push((id.to_string(), running.is_some()));
        running.cloned().unwrap_or_else(|| named(id))
    });
    // Each service made, given the running one of a backend that stays.
    let made: Vec<_> = made.iter().map(|(id, kept)| (id.as_str(), *kept)).collect();
    assert_eq!(made, [("a", true), ("b", true), ("d", false), ("e", true)]);
    handle.replace_group("app", &rebuilt).unwrap();
    let names: Vec<String> = handle.group_names().iter().map(|n| n.to_string()).collect();
    assert_eq!(names, ["app", "other"]);
    let stats = handle.group_stats("app").unwrap();
    let ids: Vec<_> = stats.backends.iter().map(|b| b.id.to_string()).collect();
    assert_eq!(ids, ["a", "b", "d", "e"]);
    let state = |id: &str| rebuilt.pool().state(&id.into()).unwrap();
    assert_eq!(state("a").weight(), 5);
    assert_eq!(state("b").admin(), AdminStatus::Draining);
    assert_eq!(state("d").admin(), AdminStatus::Enabled);
    assert_eq!(state("e").health(), HealthStatus::Unhealthy);
    // Only `a` and `d` take requests.
    for _ in 0..6 {
        let answer = rebuilt.clone().oneshot(Request::new(())).await.unwrap();
        assert!(
            ["a", "d"].contains(&answer.body().as_str()),
            "{}",
            answer.body()
        );
    }
    // The drain ends at its deadline in the rebuilt group.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(state("b").admin(), AdminStatus::Disabled);
    // A group the handle does not have is refused.
    let err = handle.replace_group("nope", &rebuilt).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

/// Defaults built on other defaults: a merged mapping's own merge key is
/// applied too, each level below the keys written before it.
#[test]
fn yaml_merge_keys_within_merged_mappings_apply() {
    let yaml = "\
failover_groups:
  - name: a
    mode: normal
    backends: [x]
    health_check: &base
      interval: 5s
      timeout: 3s
  - name: b
    mode: normal
    backends: [y]
    health_check: &strict
      <<: *base
      unhealthy_threshold: 1
  - name: c
    mode: normal
    backends: [z]
    health_check:
      <<: *strict
      timeout: 2s
";
    let config = Config::from_yaml(yaml).unwrap();
    let check = |name: &str| config.group(name).unwrap().health_check.clone().unwrap();
    let (b, c) = (check("b"), check("c"));
    assert_eq!(
        (b.interval, b.timeout, b.unhealthy_threshold),
        (Duration::from_secs(5), Duration::from_secs(3), 1)
    );
    assert_eq!(
        (c.interval, c.timeout, c.unhealthy_threshold),
        (Duration::from_secs(5), Duration::from_secs(2), 1)
    );
    // Several merged at once, each with a merge of its own: the first
    // mapping named, with what it merges, comes before the second.
    let yaml = "\
failover_groups:
  - name: a
    mode: normal
    backends: [x]
    health_check: &x
      interval: 5s
      timeout: 3s
  - name: b
    mode: normal
    backends: [y]
    health_check: &y
      interval: 7s
      healthy_threshold: 4
  - name: c
    mode: normal
    backends: [z]
    health_check: &first
      <<: *x
      unhealthy_threshold: 1
  - name: d
    mode: normal
    backends: [w]
    health_check: &second
      <<: *y
      timeout: 9s
  - name: e
    mode: normal
    backends: [v]
    health_check:
      <<: [*first, *second]
";
    let config = Config::from_yaml(yaml).unwrap();
    let e = config.group("e").unwrap().health_check.clone().unwrap();
    assert_eq!(
        (
            e.interval,
            e.timeout,
            e.unhealthy_threshold,
            e.healthy_threshold
        ),
        (Duration::from_secs(5), Duration::from_secs(3), 1, 4)
    );
    // A `<<` elsewhere (a comment) does not cost a mistake its line.
    let err = Config::from_yaml(
        "# <<\nfailover_groups:\n  - name: a\n    mode: nromal\n    backends: [x]\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("line 4"), "{err}");
}

mod generated {
    //! Configurations of any names and settings, written out and read
    //! back, and texts that are not quite configurations.

    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;
    use tower_ha::config::{FailbackMode, FailoverConfig, GroupConfig, HealthCheckConfig};

    /// Names of any characters, and names YAML would read as something
    /// else were they not quoted.
    fn names() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{1,12}",
            "(0x1A|2024|1\\.10|TRUE|true|null|~|yes|No|on|1e3|-|:|# x|'q'|\"d\"|<<|&a|\\*b|@|`|\\[x\\]|\\{\\}|%x| a| )",
        ]
        .prop_filter("not blank", |n| !n.trim().is_empty())
    }

    fn durations() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (1u64..1 << 40).prop_map(Duration::from_nanos),
            (1u64..100_000).prop_map(Duration::from_millis),
            any::<u64>().prop_map(Duration::from_secs),
            (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n)),
        ]
    }

    fn health_checks() -> impl Strategy<Value = HealthCheckConfig> {
        (
            proptest::option::of("/[a-z0-9._~/-]{0,12}(\\?[a-z0-9=&]{0,8})?"),
            durations(),
            durations(),
            1u32..,
            1u32..,
            any::<bool>(),
        )
            .prop_map(|(path, interval, timeout, rise, fall, lift)| {
                let mut check = HealthCheckConfig::default();
                check.path = path;
                check.interval = interval.max(Duration::from_millis(1));
                check.timeout = timeout.max(Duration::from_millis(1));
                check.healthy_threshold = rise;
                check.unhealthy_threshold = fall;
                check.lift_ejections = lift;
                check
            })
    }

    fn failovers() -> impl Strategy<Value = FailoverConfig> {
        (
            proptest::option::of(1usize..1 << 40),
            proptest::option::of(durations()),
            proptest::option::of(durations()),
            proptest::option::of(prop_oneof![
                (0u32..100_000).prop_map(|n| f64::from(n) / 1000.0),
                (0.0f64..1e6),
            ]),
            proptest::option::of(any::<u32>()),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(attempts, per_try, deadline, ratio, min, non_idempotent, grpc)| {
                    let mut failover = FailoverConfig::default();
                    failover.max_attempts = attempts;
                    failover.per_try_timeout = per_try;
                    failover.deadline = deadline;
                    failover.retry_ratio = ratio;
                    failover.min_retries_per_second = min;
                    failover.retry_non_idempotent = non_idempotent;
                    failover.grpc_timeout = grpc;
                    failover
                },
            )
    }

    fn groups(name: String) -> impl Strategy<Value = GroupConfig> {
        (
            proptest::collection::btree_set(names(), 1..4),
            any::<proptest::sample::Index>(),
            prop_oneof![Just(None), Just(Some(false)), Just(Some(true))],
            proptest::option::of(durations()),
            proptest::option::of(durations()),
            proptest::option::of(health_checks()),
            proptest::option::of(failovers()),
        )
            .prop_map(
                move |(backends, primary, active, after, dwell, health, failover)| {
                    let backends: Vec<String> = backends.into_iter().collect();
                    let mode = match active {
                        None => GroupMode::Normal,
                        Some(_) => GroupMode::ActivePassive,
                    };
                    let mut group = GroupConfig::new(name.clone(), mode, backends.clone());
                    if let Some(auto) = active {
                        group.primary = Some(primary.get(&backends).clone());
                        if auto {
                            group.failback = FailbackMode::Auto;
                            group.failback_after = after;
                            group.min_dwell = dwell;
                        }
                    }
                    group.health_check = health;
                    group.failover = failover;
                    group
                },
            )
    }

    /// Valid configurations.
    fn configs() -> impl Strategy<Value = Config> {
        proptest::collection::btree_set(names(), 1..4)
            .prop_flat_map(|names| names.into_iter().map(groups).collect::<Vec<_>>())
            .prop_map(|groups| {
                let mut config = Config::default();
                config.failover_groups = groups;
                config
            })
    }

    /// `config` as YAML in JSON's flow style, with the first group's health
    /// check anchored and merged into every other group's; and the
    /// configuration that reads as.
    fn merged_yaml(config: &Config) -> (String, Config) {
        let value = serde_json::to_value(config).unwrap();
        let groups = value["failover_groups"].as_array().unwrap();
        let base = config.failover_groups[0].health_check.clone();
        let mut expected = config.clone();
        let mut text = String::from("{\"failover_groups\": [");
        for (i, group) in groups.iter().enumerate() {
            if i > 0 {
                text.push_str(",\n");
            }
            text.push('{');
            let mut first = true;
            for (key, value) in group.as_object().unwrap() {
                if !first {
                    text.push_str(", ");
                }
                first = false;
                text.push_str(&format!("{}: ", Value::from(key.as_str())));
                match (key.as_str(), i, &base, value) {
                    ("health_check", 0, Some(_), check) => {
                        text.push_str(&format!("&checks {check}"));
                    }
                    ("health_check", _, Some(base), Value::Object(own)) => {
                        text.push_str("{<<: *checks");
                        for (k, v) in own {
                            text.push_str(&format!(", {}: {v}", Value::from(k.as_str())));
                        }
                        text.push('}');
                        // What the group does not say is the base's: it
                        // says every setting but `lift_ejections: true`.
                        let own = expected.failover_groups[i].health_check.as_mut().unwrap();
                        own.lift_ejections &= base.lift_ejections;
                    }
                    _ => text.push_str(&value.to_string()),
                }
            }
            text.push('}');
        }
        text.push_str("]}\n");
        (text, expected)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// A configuration written out as YAML reads back as it was.
        #[test]
        fn any_config_reads_back_from_yaml(config in configs()) {
            let yaml = serde_yaml_ng::to_string(&config).unwrap();
            prop_assert_eq!(Config::from_yaml(&yaml).map_err(|e| e.to_string()), Ok(config), "{}", yaml);
        }

        /// A configuration written out as TOML reads back as it was.
        #[test]
        fn any_config_reads_back_from_toml(config in configs()) {
            let toml = toml::to_string(&config).unwrap();
            prop_assert_eq!(Config::from_toml(&toml).map_err(|e| e.to_string()), Ok(config), "{}", toml);
        }

        /// Settings merged into a group read as they would written out in
        /// it, whatever its names look like.
        #[test]
        fn merged_settings_read_as_written_out(config in configs()) {
            let (yaml, expected) = merged_yaml(&config);
            prop_assert_eq!(Config::from_yaml(&yaml).map_err(|e| e.to_string()), Ok(expected), "{}", yaml);
        }

    }
}
