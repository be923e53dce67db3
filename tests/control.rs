//! Groups, runtime control, events and stats, through the public API.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{service_fn, BoxError, Service, ServiceExt};
use tower_ha::balance::{Balance, Failback, Pick, Priority, Strategy};
use tower_ha::control::{ControlError, Event, Events, Handle, RecvError, SwitchReason};
use tower_ha::health::HealthLayer;
use tower_ha::key::RequestHead;
use tower_ha::pool::Snapshot;
use tower_ha::{AdminStatus, BackendId, HealthStatus, Pool};

mod support;
use support::wait::bounded;

type Svc = tower::util::BoxCloneSyncService<Request<()>, Response<String>, BoxError>;

/// A backend that answers its name, after `delay`.
fn named(name: &'static str, delay: Duration) -> Svc {
    Svc::new(service_fn(move |_req: Request<()>| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok::<_, BoxError>(Response::new(name.to_owned()))
    }))
}

fn pool_of(names: &[&'static str]) -> Pool<Svc> {
    let pool = Pool::new();
    for &name in names {
        pool.insert(name, named(name, Duration::ZERO));
    }
    pool
}

async fn serve<P: Strategy>(balance: &Balance<Svc, P>) -> String {
    balance
        .clone()
        .oneshot(Request::new(()))
        .await
        .unwrap()
        .into_body()
}

fn set_health(pool: &Pool<Svc>, id: &str, health: HealthStatus) {
    pool.state(&id.into()).unwrap().set_health(health);
}

fn primary_changes(events: &Events) -> Vec<(Option<String>, Option<String>, SwitchReason)> {
    events
        .history()
        .iter()
        .filter_map(|r| match &r.event {
            Event::PrimaryChanged {
                from, to, reason, ..
            } => Some((
                from.as_ref().map(|b| b.to_string()),
                to.as_ref().map(|b| b.to_string()),
                *reason,
            )),
            _ => None,
        })
        .collect()
}

fn change(
    from: &str,
    to: &str,
    reason: SwitchReason,
) -> (Option<String>, Option<String>, SwitchReason) {
    (Some(from.into()), Some(to.into()), reason)
}

// ---------------------------------------------------------------- events

#[tokio::test(start_paused = true)]
async fn a_subscriber_that_never_reads_does_not_slow_emitters_and_learns_what_it_missed() {
    let events = Events::new(8, 16);
    let mut idle = events.subscribe();
    let mut reader = events.subscribe();
    // 10 000 events while one subscriber never reads: every emit returns
    // (the data path never waits), the buffer stays bounded.
    for i in 0..10_000u32 {
        events.emit(Event::WeightChanged {
            backend: "a".into(),
            weight: i,
        });
    }
    assert_eq!(events.emitted(), 10_000);
    assert_eq!(idle.recv().await, Err(RecvError::Missed(10_000 - 8)));
    let first = idle.recv().await.unwrap();
    assert_eq!(first.seq, 10_000 - 8);
    assert_eq!(reader.try_recv(), Some(Err(RecvError::Missed(10_000 - 8))));
    // The history keeps the last 16, oldest first, with timestamps.
    let history = events.history();
    assert_eq!(history.len(), 16);
    assert_eq!(history[0].seq, 10_000 - 16);
    assert!(history
        .windows(2)
        .all(|w| w[0].seq + 1 == w[1].seq && w[0].at <= w[1].at));
    assert_eq!(events.recent(3).len(), 3);
    assert_eq!(events.recent(3)[2].seq, 9_999);
}

#[tokio::test(start_paused = true)]
async fn requests_do_not_wait_for_an_idle_subscriber_to_a_full_channel() {
    // A health layer emitting into a channel of 1 with an idle subscriber:
    // every request still completes at once (time is paused: a request
    // that waited would run into its bound).
    let events = Events::new(1, 4);
    let _idle = events.subscribe();
    let layer = HealthLayer::new()
        .consecutive_failures(1)
        .base_ejection_time(Duration::from_millis(1))
        .max_ejection_time(Duration::from_millis(1))
        .max_ejection_percent(100)
        .events(events.clone());
    let pool: Pool<Svc> = Pool::new();
    let failing = Svc::new(service_fn(|_req: Request<()>| async {
        Ok::<_, BoxError>(
            Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(String::new())
                .unwrap(),
        )
    }));
    pool.insert("bad", Svc::new(layer.layer(failing)));
    let balance =
        Balance::new(pool.clone(), tower_ha::balance::RoundRobin::new()).panic_threshold(0.0);
    let start = tokio::time::Instant::now();
    let mut served = 0;
    for _ in 0..200 {
        let sent = balance.clone().oneshot(Request::new(()));
        if bounded("a request completes", sent).await.is_ok() {
            served += 1;
        }
        tokio::time::advance(Duration::from_millis(2)).await;
    }
    assert_eq!(start.elapsed(), Duration::from_millis(400));
    assert_eq!(served, 200);
    // Every request ejected the backend, and each ejection's end was
    // reported as it ran out (the last one's too): 400 events into a
    // channel of one.
    assert_eq!(events.emitted(), 400);
    assert!(matches!(
        events.history().last().unwrap().event,
        Event::Ejected { .. } | Event::Restored { .. }
    ));
}

use tower::Layer;

#[tokio::test(start_paused = true)]
async fn the_health_layer_and_checker_emit_into_the_event_stream() {
    let events = Events::default();
    let layer = HealthLayer::new()
        .consecutive_failures(2)
        .events(events.clone());
    let pool: Pool<Svc> = Pool::new();
    let failing = Svc::new(service_fn(|_req: Request<()>| async {
        Ok::<_, BoxError>(
            Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(String::new())
                .unwrap(),
        )
    }));
    pool.insert("bad", Svc::new(layer.layer(failing)));
    pool.insert("good", named("good", Duration::ZERO));
    let balance = Balance::new(pool.clone(), tower_ha::balance::RoundRobin::new());
    for _ in 0..4 {
        let _ = balance.clone().oneshot(Request::new(())).await;
    }
    let ejected: Vec<_> = events
        .history()
        .iter()
        .filter(|r| matches!(&r.event, Event::Ejected { backend, ejection: 1, .. } if backend.as_str() == "bad"))
        .cloned()
        .collect();
    assert_eq!(ejected.len(), 1);

    // The checker: a probe that always fails turns "good" unhealthy.
    let checker = tower_ha::health::HealthChecker::new(
        pool.clone(),
        tower_ha::health::probe_fn(|id: &BackendId, _svc: &Svc| {
            let fail = id.as_str() == "good";
            async move {
                if fail {
                    Err::<(), BoxError>("down".into())
                } else {
                    Ok(())
                }
            }
        }),
    )
    .jitter(Duration::ZERO)
    .fall(1)
    .events(events.clone())
    .spawn();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(events.history().iter().any(|r| matches!(
        &r.event,
        Event::HealthChanged { backend, from: HealthStatus::Healthy, to: HealthStatus::Unhealthy, .. }
            if backend.as_str() == "good"
    )));
    assert!(events.last_change(&"good".into()).is_some());
    // "bad" passes its probe: the probe lifts its ejection, and the next
    // request it fails does not report the end of that ejection again.
    for _ in 0..4 {
        let _ = balance.clone().oneshot(Request::new(())).await;
    }
    let restored: Vec<_> = events
        .history()
        .iter()
        .filter_map(|r| match &r.event {
            Event::Restored { backend, reason } if backend.as_str() == "bad" => {
                Some(reason.to_string())
            }
            _ => None,
        })
        .collect();
    assert_eq!(restored, ["probe passed"]);
    checker.shutdown().await;
}

// ---------------------------------------------------------------- groups

#[tokio::test(start_paused = true)]
async fn the_first_available_backup_in_configured_order_takes_over() {
    let pool = pool_of(&["a", "b", "c", "d"]);
    let events = Events::default();
    // Configured order differs from insertion order.
    let group = Priority::new("g", ["a", "d", "c", "b"]).events(events.clone());
    let balance = Balance::new(pool.clone(), group.clone()).panic_threshold(0.0);
    for _ in 0..5 {
        assert_eq!(serve(&balance).await, "a");
    }
    set_health(&pool, "d", HealthStatus::Unhealthy);
    set_health(&pool, "a", HealthStatus::Unhealthy);
    // Deterministically "c" (d is down), every time.
    for _ in 0..20 {
        assert_eq!(serve(&balance).await, "c");
    }
    assert_eq!(group.current().unwrap().as_str(), "c");
    assert_eq!(group.failovers(), 1);
    assert_eq!(
        primary_changes(&events),
        [change("a", "c", SwitchReason::Failover)]
    );
}

#[tokio::test(start_paused = true)]
async fn with_never_the_recovered_primary_stays_a_backup() {
    let pool = pool_of(&["a", "b", "c"]);
    let events = Events::default();
    let group = Priority::new("g", ["a", "b", "c"]).events(events.clone());
    let balance = Balance::new(pool.clone(), group.clone()).panic_threshold(0.0);
    assert_eq!(serve(&balance).await, "a");
    set_health(&pool, "a", HealthStatus::Unhealthy);
    assert_eq!(serve(&balance).await, "b");
    set_health(&pool, "a", HealthStatus::Healthy);
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(serve(&balance).await, "b");
    }
    // When b fails, the order decides again: a is first.
    set_health(&pool, "b", HealthStatus::Unhealthy);
    assert_eq!(serve(&balance).await, "a");
    assert_eq!(
        primary_changes(&events),
        [
            change("a", "b", SwitchReason::Failover),
            change("b", "a", SwitchReason::Failover)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn with_auto_the_primary_returns_only_after_a_whole_stable_interval() {
    let pool = pool_of(&["a", "b"]);
    let events = Events::default();
    let group = Priority::new("g", ["a", "b"])
        .failback(Failback::auto(Duration::from_secs(10)))
        .events(events.clone());
    let balance = Balance::new(pool.clone(), group.clone()).panic_threshold(0.0);
    assert_eq!(serve(&balance).await, "a");
    set_health(&pool, "a", HealthStatus::Unhealthy);
    assert_eq!(serve(&balance).await, "b");

    // a recovers at t0; picks every second see it.
    set_health(&pool, "a", HealthStatus::Healthy);
    assert_eq!(serve(&balance).await, "b");
    for _ in 0..6 {
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(serve(&balance).await, "b");
    }
    // A flap at t0+6 s resets the clock.
    set_health(&pool, "a", HealthStatus::Unhealthy);
    assert_eq!(serve(&balance).await, "b");
    set_health(&pool, "a", HealthStatus::Healthy);
    assert_eq!(serve(&balance).await, "b"); // available again since t1
    for _ in 0..9 {
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(serve(&balance).await, "b", "before 10 s since the flap");
    }
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(serve(&balance).await, "b");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(serve(&balance).await, "a", "10 s after the flap");
    assert_eq!(
        primary_changes(&events),
        [
            change("a", "b", SwitchReason::Failover),
            change("b", "a", SwitchReason::Failback)
        ]
    );
    assert_eq!(group.failovers(), 1);
}

/// A flap between two picks (unhealthy and healthy again, disabled and
/// enabled, ejected for a moment, removed and added again, or dropped by
/// discovery and returned with its state) starts the clock again too: the
/// primary was not available without interruption.
#[tokio::test(start_paused = true)]
async fn with_auto_a_flap_no_request_sees_starts_the_clock_again() {
    type Change = fn(&Pool<Svc>);
    let healthy: Change = |pool| set_health(pool, "a", HealthStatus::Healthy);
    let replaced: Change = |pool| {
        pool.remove(&"a".into());
        pool.insert("a", named("a", Duration::ZERO));
    };
    // How a recovers at t0, and how it flaps at t0 + 5 s.
    let flaps: [(&str, Change, Change); 5] = [
        ("unhealthy", healthy, |pool| {
            set_health(pool, "a", HealthStatus::Unhealthy);
            set_health(pool, "a", HealthStatus::Healthy);
        }),
        ("disabled", healthy, |pool| {
            let a = pool.state(&"a".into()).unwrap();
            a.set_admin(AdminStatus::Disabled);
            a.set_admin(AdminStatus::Enabled);
        }),
        ("ejected", healthy, |pool| {
            let a = pool.state(&"a".into()).unwrap();
            a.eject_until(tokio::time::Instant::now() + Duration::from_secs(1));
        }),
        // Both states new, never interrupted: they count alike.
        ("removed and added again", replaced, replaced),
        // Two answers: one stream's changes ready at once are one change
        // of membership, in which a backend removed and put back never left.
        ("dropped by discovery", healthy, |pool| {
            use tower::discover::Change;
            for change in [
                Change::Remove("a"),
                Change::Insert("a", named("a", Duration::ZERO)),
            ] {
                let answer = futures::stream::iter([Ok::<_, Infallible>(change)]);
                futures::executor::block_on(pool.discover(answer)).unwrap();
            }
        }),
    ];
    for (how, recover, flap) in flaps {
        let pool = pool_of(&["a", "b"]);
        let group =
            Priority::new("g", ["a", "b"]).failback(Failback::auto(Duration::from_secs(10)));
        let balance = Balance::new(pool.clone(), group).panic_threshold(0.0);
        set_health(&pool, "a", HealthStatus::Unhealthy);
        assert_eq!(serve(&balance).await, "b");
        recover(&pool);
        assert_eq!(serve(&balance).await, "b", "{how}: a available since t0");
        tokio::time::advance(Duration::from_secs(5)).await;
        flap(&pool);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Seen again at t0 + 6 s: the clock starts now, not at t0.
        assert_eq!(serve(&balance).await, "b", "{how}");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(
            serve(&balance).await,
            "b",
            "{how}: 15 s after t0, 9 s after the flap"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            serve(&balance).await,
            "a",
            "{how}: 10 s after the flap was seen"
        );
    }
}

/// With `after_stable_for` and `min_dwell`, a primary that failed over to
/// the backup is still not back a day after it recovered.
async fn no_failback_within_a_day(after_stable_for: Duration, min_dwell: Duration) {
    let pool = pool_of(&["a", "b"]);
    let group = Priority::new("g", ["a", "b"])
        .failback(Failback::auto(after_stable_for))
        .min_dwell(min_dwell);
    let balance = Balance::new(pool.clone(), group).panic_threshold(0.0);
    assert_eq!(serve(&balance).await, "a");
    set_health(&pool, "a", HealthStatus::Unhealthy);
    assert_eq!(serve(&balance).await, "b");
    set_health(&pool, "a", HealthStatus::Healthy);
    tokio::time::advance(Duration::from_secs(86_400)).await;
    assert_eq!(serve(&balance).await, "b");
}

#[tokio::test(start_paused = true)]
async fn durations_meaning_never_hold_without_panicking() {
    // Neither a day of stability nor the dwell time is "never".
    no_failback_within_a_day(Duration::MAX, Duration::MAX).await;
    // A primary stable at once, held back by the dwell time alone.
    no_failback_within_a_day(Duration::ZERO, Duration::MAX).await;
}

#[tokio::test(start_paused = true)]
async fn the_minimum_dwell_holds_when_the_primary_flaps_every_100ms() {
    let pool = pool_of(&["a", "b"]);
    let events = Events::default();
    let group = Priority::new("g", ["a", "b"])
        .failback(Failback::auto(Duration::ZERO))
        .min_dwell(Duration::from_secs(5))
        .events(events.clone());
    let balance = Balance::new(pool.clone(), group.clone()).panic_threshold(0.0);
    // Flap a every 100 ms for 20 s, with a request every 10 ms.
    let mut served_a_while_a_down = 0;
    for tick in 0..2_000u32 {
        let a_up = (tick / 10) % 2 == 0;
        set_health(
            &pool,
            "a",
            if a_up {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            },
        );
        let served = serve(&balance).await;
        if !a_up && served == "a" {
            served_a_while_a_down += 1;
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    assert_eq!(served_a_while_a_down, 0);
    let changes = primary_changes(&events);
    // Without the dwell a would switch back every 200 ms (about 200
    // switches). With it: the failover at 0.1 s, then a failback as soon as
    // a is up 5 s after the last switch (5.2 s, 10.4 s, 15.6 s), each
    // followed by a failover when a goes down 100 ms later.
    let at: Vec<u128> = events
        .history()
        .iter()
        .filter(|r| matches!(r.event, Event::PrimaryChanged { .. }))
        .map(|r| (r.at - events.history()[0].at).as_millis())
        .collect();
    assert_eq!(changes.len(), 7, "{changes:?}");
    assert_eq!(at, [0, 5100, 5200, 10300, 10400, 15500, 15600]);
    // Failbacks are at least 5 s after the switch before them.
    let history = events.history();
    let switches: Vec<_> = history
        .iter()
        .filter_map(|r| match &r.event {
            Event::PrimaryChanged { reason, .. } => Some((r.at, *reason)),
            _ => None,
        })
        .collect();
    for pair in switches.windows(2) {
        if pair[1].1 == SwitchReason::Failback {
            assert!(pair[1].0 - pair[0].0 >= Duration::from_secs(5));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_forced_primary_holds_until_it_fails_or_is_released() {
    let pool = pool_of(&["a", "b", "c"]);
    let events = Events::default();
    let group = Priority::new("g", ["a", "b", "c"])
        .failback(Failback::auto(Duration::from_secs(1)))
        .events(events.clone());
    let balance = Balance::new(pool.clone(), group.clone()).panic_threshold(0.0);
    assert_eq!(serve(&balance).await, "a");
    assert!(group.force_primary(&"c".into()));
    assert!(!group.force_primary(&"zz".into()));
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(serve(&balance).await, "c", "auto failback must not undo it");
    }
    group.release();
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(serve(&balance).await, "a", "released: failback applies");
    // A forced primary that fails is failed over like any other.
    assert!(group.force_primary(&"b".into()));
    set_health(&pool, "b", HealthStatus::Unhealthy);
    assert_eq!(serve(&balance).await, "a");
    assert_eq!(group.forced(), None);
    // Forcing the primary it already has pins it: an event says so too.
    assert!(group.force_primary(&"a".into()));
    assert_eq!(group.forced(), Some("a".into()));
    assert_eq!(
        primary_changes(&events),
        [
            change("a", "c", SwitchReason::Forced),
            change("c", "a", SwitchReason::Failback),
            change("a", "b", SwitchReason::Forced),
            change("b", "a", SwitchReason::Failover),
            change("a", "a", SwitchReason::Forced),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn retries_walk_the_configured_order_without_moving_the_primary() {
    use tower_ha::extensions::Attempts;
    let pool = pool_of(&["a", "b", "c"]);
    let group = Priority::new("g", ["c", "a", "b"]);
    let balance = Balance::new(pool.clone(), group.clone());
    let mut served = Vec::new();
    let mut attempts = Attempts::new();
    for _ in 0..3 {
        let mut req = Request::new(());
        req.extensions_mut().insert(attempts.clone());
        let name = balance.clone().oneshot(req).await.unwrap().into_body();
        attempts.push(name.as_str().into());
        served.push(name);
    }
    assert_eq!(served, ["c", "a", "b"]);
    assert_eq!(group.current().unwrap().as_str(), "c");
    let mut req = Request::new(());
    req.extensions_mut().insert(attempts);
    assert!(balance.oneshot(req).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_removed_primary_is_replaced_and_a_new_member_joins_last() {
    let pool = pool_of(&["a", "b"]);
    let events = Events::default();
    let group = Priority::new("g", ["a", "b"]).events(events.clone());
    let balance = Balance::new(pool.clone(), group.clone());
    assert_eq!(serve(&balance).await, "a");
    pool.insert("z", named("z", Duration::ZERO));
    pool.remove(&"a".into());
    assert_eq!(serve(&balance).await, "b");
    set_health(&pool, "b", HealthStatus::Unhealthy);
    assert_eq!(serve(&balance).await, "z");
    assert_eq!(
        primary_changes(&events),
        [
            change("a", "b", SwitchReason::Removed),
            change("b", "z", SwitchReason::Failover)
        ]
    );
}

// ---------------------------------------------------------------- handle

#[tokio::test(start_paused = true)]
async fn a_drained_backend_finishes_in_flight_requests_takes_no_new_ones_and_is_disabled_after_the_deadline(
) {
    let pool: Pool<Svc> = Pool::new();
    pool.insert("slow", named("slow", Duration::from_secs(3)));
    pool.insert("other", named("other", Duration::ZERO));
    let balance = Balance::new(pool.clone(), Priority::new("g", ["slow", "other"]));
    let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(10)));
    handle.add_group("g", &balance).unwrap();

    let request: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(balance.clone().oneshot(Request::new(())));
    let in_flight = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let slow = pool.state(&"slow".into()).unwrap();
    assert_eq!(slow.in_flight(), 1);

    handle.drain(&"slow".into()).unwrap();
    let drained_at = tokio::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(serve(&balance).await, "other");
    }
    let finished = in_flight.await.unwrap().unwrap().into_body();
    assert_eq!(finished, "slow", "the in-flight request finished");
    assert_eq!(slow.in_flight(), 0);
    assert_eq!(slow.requests(), 1);
    assert_eq!(slow.admin(), AdminStatus::Draining);

    tokio::time::sleep_until(drained_at + Duration::from_millis(9_999)).await;
    assert_eq!(slow.admin(), AdminStatus::Draining);
    tokio::time::sleep_until(drained_at + Duration::from_secs(10)).await;
    tokio::task::yield_now().await;
    assert_eq!(
        slow.admin(),
        AdminStatus::Disabled,
        "disabled at the deadline"
    );
    let admin: Vec<_> = handle
        .events()
        .history()
        .iter()
        .filter_map(|r| match &r.event {
            Event::AdminChanged {
                from, to, reason, ..
            } => Some((*from, *to, reason.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(
        admin,
        [
            (
                AdminStatus::Enabled,
                AdminStatus::Draining,
                "operator".into()
            ),
            (
                AdminStatus::Draining,
                AdminStatus::Disabled,
                "drain deadline".into()
            ),
        ]
    );
}

/// A drain ends with the backend empty: at its deadline the tunnels still
/// open to it are told to close, not before; `close_tunnels` tells them at
/// once, and a backend no group holds is unknown.
#[tokio::test(start_paused = true)]
async fn a_drain_deadline_closes_the_backends_tunnels() {
    use futures::FutureExt as _;

    let pool = pool_of(&["a", "b"]);
    let balance = Balance::new(pool.clone(), tower_ha::balance::RoundRobin::new());
    let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(10)));
    handle.add_group("g", &balance).unwrap();
    let a = pool.state(&"a".into()).unwrap();
    let mut tunnel = Box::pin(a.tunnels_closed());
    handle.drain(&"a".into()).unwrap();
    tokio::time::sleep(Duration::from_millis(9_999)).await;
    assert!(
        tunnel.as_mut().now_or_never().is_none(),
        "open while draining"
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
    tokio::task::yield_now().await;
    assert_eq!(a.admin(), AdminStatus::Disabled);
    assert!(tunnel.now_or_never().is_some(), "closed at the deadline");

    let b = pool.state(&"b".into()).unwrap();
    let tunnel = b.tunnels_closed();
    handle.close_tunnels(&"b".into()).unwrap();
    assert!(tunnel.now_or_never().is_some(), "closed at once");
    assert_eq!(b.admin(), AdminStatus::Enabled, "nothing else changes");
    assert!(matches!(
        handle.close_tunnels(&"c".into()),
        Err(ControlError::UnknownBackend(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn enabling_before_the_deadline_cancels_it() {
    let pool = pool_of(&["a", "b"]);
    let balance = Balance::new(pool.clone(), tower_ha::balance::RoundRobin::new());
    let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(10)));
    handle.add_group("g", &balance).unwrap();
    handle.drain(&"a".into()).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    handle.enable(&"a".into()).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        pool.state(&"a".into()).unwrap().admin(),
        AdminStatus::Enabled
    );
}

/// A handle dropped with a drain's deadline pending (the handle of a
/// configuration since reloaded) keeps the deadline: the backend is
/// disabled then, and the timer lets go of its state.
#[tokio::test(start_paused = true)]
async fn a_dropped_handle_keeps_its_drain_deadlines() {
    let pool = pool_of(&["a", "b"]);
    let balance = Balance::new(pool.clone(), tower_ha::balance::RoundRobin::new());
    let events = Events::default();
    let handle = Handle::new(events.clone()).drain_deadline(Some(Duration::from_secs(600)));
    handle.add_group("g", &balance).unwrap();
    let a = pool.state(&"a".into()).unwrap();
    let held = std::sync::Arc::strong_count(&a);
    handle.drain(&"a".into()).unwrap();
    drop(handle);
    tokio::time::sleep(Duration::from_secs(599)).await;
    assert_eq!(a.admin(), AdminStatus::Draining);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(a.admin(), AdminStatus::Disabled);
    assert!(matches!(
        events.history().last().unwrap().event,
        Event::AdminChanged {
            to: AdminStatus::Disabled,
            ..
        }
    ));
    assert_eq!(std::sync::Arc::strong_count(&a), held);
    assert_eq!(serve(&balance).await, "b");
}

#[tokio::test(start_paused = true)]
async fn removing_a_group_unregisters_it_and_lets_drains_under_way_end() {
    let web = pool_of(&["w1", "shared"]);
    let api = pool_of(&["a1", "shared"]);
    let web_balance = Balance::new(web.clone(), Priority::new("web", ["w1", "shared"]));
    let api_balance = Balance::new(api.clone(), tower_ha::balance::RoundRobin::new());
    let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(10)));
    handle.add_group("web", &web_balance).unwrap();
    handle.add_group("api", &api_balance).unwrap();
    handle.drain(&"a1".into()).unwrap();
    handle.drain(&"shared".into()).unwrap();

    handle.remove_group("api").unwrap();
    assert_eq!(
        handle.group_names(),
        ["web".into()] as [std::sync::Arc<str>; 1]
    );
    assert_eq!(
        handle.group_stats("api").unwrap_err(),
        ControlError::UnknownGroup("api".into())
    );
    assert_eq!(
        handle.remove_group("api"),
        Err(ControlError::UnknownGroup("api".into()))
    );
    // Not controlled any more: a1 is in no group of the handle.
    assert_eq!(
        handle.disable(&"a1".into()),
        Err(ControlError::UnknownBackend("a1".into()))
    );
    assert!(matches!(
        handle.events().history().last().unwrap().event,
        Event::GroupRemoved { ref group } if &**group == "api"
    ));

    // The group still serves: the drains under way reach their deadline,
    // a1's (only in the removed group) as `shared`'s (still in web).
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        api.state(&"a1".into()).unwrap().admin(),
        AdminStatus::Disabled
    );
    assert_eq!(
        web.state(&"shared".into()).unwrap().admin(),
        AdminStatus::Disabled
    );
    // The balancer still serves; the name can be registered again.
    api.state(&"a1".into())
        .unwrap()
        .set_admin(AdminStatus::Enabled);
    assert_eq!(serve(&api_balance).await.len(), 2);
    handle.add_group("api", &api_balance).unwrap();
    assert_eq!(handle.group_names().len(), 2);
}

/// A backend removed from the last group the handle knows is still
/// drained to its deadline in a group removed from the handle earlier,
/// whose balancer still serves it.
#[tokio::test(start_paused = true)]
async fn a_drain_reaches_its_deadline_in_an_unregistered_group_after_the_backend_leaves_the_others()
{
    let web = pool_of(&["w1", "shared"]);
    let api = pool_of(&["a1", "shared"]);
    let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(10)));
    let web_balance = Balance::new(web.clone(), tower_ha::balance::RoundRobin::new());
    handle.add_group("web", &web_balance).unwrap();
    let api_balance = Balance::new(api.clone(), tower_ha::balance::RoundRobin::new());
    handle.add_group("api", &api_balance).unwrap();
    handle.drain(&"shared".into()).unwrap();
    handle.remove_group("api").unwrap();
    handle.remove_backend("web", &"shared".into()).unwrap();

    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        api.state(&"shared".into()).unwrap().admin(),
        AdminStatus::Disabled
    );
}

#[tokio::test(start_paused = true)]
async fn handle_actions_are_events_and_bad_names_are_errors() {
    use tower_ha::control::ControlError;
    let web = pool_of(&["w1", "w2"]);
    let api = pool_of(&["a1", "shared"]);
    web.insert("shared", named("shared", Duration::ZERO));
    let web_balance = Balance::new(web.clone(), Priority::new("web", ["w1", "w2", "shared"]));
    let api_balance = Balance::new(api.clone(), tower_ha::balance::RoundRobin::new());
    let handle = Handle::new(Events::default());
    handle.add_group("web", &web_balance).unwrap();
    handle.add_group("api", &api_balance).unwrap();
    assert_eq!(
        handle.add_group("web", &api_balance),
        Err(ControlError::DuplicateGroup("web".into()))
    );

    // By backend id: every group that has it.
    handle.disable(&"shared".into()).unwrap();
    assert_eq!(
        web.state(&"shared".into()).unwrap().admin(),
        AdminStatus::Disabled
    );
    assert_eq!(
        api.state(&"shared".into()).unwrap().admin(),
        AdminStatus::Disabled
    );
    handle.enable(&"shared".into()).unwrap();
    handle.set_weight(&"a1".into(), 7).unwrap();
    assert_eq!(api.state(&"a1".into()).unwrap().weight(), 7);
    handle.set_max_in_flight(&"shared".into(), Some(0)).unwrap();
    for pool in [&web, &api] {
        let shared = pool.state(&"shared".into()).unwrap();
        assert_eq!(shared.max_in_flight(), Some(1));
    }
    // The same weight or limit again changes nothing, and emits nothing.
    handle.set_weight(&"a1".into(), 7).unwrap();
    handle.set_max_in_flight(&"shared".into(), Some(1)).unwrap();
    handle.force_primary("web", &"w2".into()).unwrap();
    assert_eq!(serve(&web_balance).await, "w2");
    handle
        .add_backend("api", "a2", named("a2", Duration::ZERO))
        .unwrap();
    assert!(api.contains(&"a2".into()));
    handle.remove_backend("api", &"a2".into()).unwrap();
    assert!(!api.contains(&"a2".into()));

    let kinds: Vec<&'static str> = handle
        .events()
        .history()
        .iter()
        .map(|r| match &r.event {
            Event::AdminChanged { .. } => "admin",
            Event::WeightChanged { .. } => "weight",
            Event::LimitChanged {
                max_in_flight: Some(1),
                ..
            } => "limit",
            Event::PrimaryChanged { .. } => "primary",
            Event::BackendAdded { .. } => "added",
            Event::BackendRemoved { .. } => "removed",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        ["admin", "admin", "weight", "limit", "primary", "added", "removed"]
    );

    // The largest limit is no limit, as a state keeps it: no change, and
    // no event claiming one.
    let events = handle.events().history().len();
    handle
        .set_max_in_flight(&"a1".into(), Some(usize::MAX))
        .unwrap();
    assert_eq!(api.state(&"a1".into()).unwrap().max_in_flight(), None);
    assert_eq!(handle.events().history().len(), events);

    assert_eq!(
        handle.drain(&"nope".into()),
        Err(ControlError::UnknownBackend("nope".into()))
    );
    assert_eq!(
        handle.set_max_in_flight(&"nope".into(), None),
        Err(ControlError::UnknownBackend("nope".into()))
    );
    assert_eq!(
        handle.set_weight(&"nope".into(), 1),
        Err(ControlError::UnknownBackend("nope".into()))
    );
    assert_eq!(
        handle.force_primary("nope", &"w1".into()),
        Err(ControlError::UnknownGroup("nope".into()))
    );
    assert_eq!(
        handle.force_primary("api", &"a1".into()),
        Err(ControlError::NotActivePassive("api".into()))
    );
    assert!(matches!(
        handle.force_primary("web", &"a1".into()),
        Err(ControlError::NotInGroup { .. })
    ));
    handle.disable(&"w1".into()).unwrap();
    assert!(matches!(
        handle.force_primary("web", &"w1".into()),
        Err(ControlError::Unavailable { .. })
    ));
    assert_eq!(serve(&web_balance).await, "w2", "still forced on w2");
    assert_eq!(
        handle.add_backend("api", "x", 5u8),
        Err(ControlError::ServiceType("api".into()))
    );
    assert!(matches!(
        handle.add_backend("api", "a1", named("a1", Duration::ZERO)),
        Err(ControlError::DuplicateBackend { .. })
    ));
    assert!(matches!(
        handle.remove_backend("api", &"zz".into()),
        Err(ControlError::NotInGroup { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn stats_count_requests_failures_and_failovers() {
    let events = Events::default();
    let layer = HealthLayer::new()
        .consecutive_failures(100)
        .events(events.clone());
    let pool: Pool<Svc> = Pool::new();
    let flaky = Svc::new(service_fn(|_req: Request<()>| async {
        Ok::<_, BoxError>(
            Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body("p".to_owned())
                .unwrap(),
        )
    }));
    pool.insert("p", Svc::new(layer.layer(flaky)));
    pool.insert("b", named("b", Duration::ZERO));
    let balance = Balance::new(pool.clone(), Priority::new("g", ["p", "b"]));
    let handle = Handle::new(events);
    handle.add_group("g", &balance).unwrap();
    for _ in 0..3 {
        let _ = serve(&balance).await;
    }
    let stats = handle.group_stats("g").unwrap();
    assert_eq!(stats.current_primary.as_ref().unwrap().as_str(), "p");
    assert_eq!(stats.failovers, 0);
    assert_eq!(stats.since_last_failover, None);
    let p = &stats.backends[0];
    assert_eq!((p.requests, p.failures, p.in_flight), (3, 3, 0));
    assert_eq!(p.max_in_flight, None);
    pool.state(&"p".into()).unwrap().set_max_in_flight(Some(8));
    let stats = handle.group_stats("g").unwrap();
    assert_eq!(stats.backends[0].max_in_flight, Some(8));

    set_health(&pool, "p", HealthStatus::Unhealthy);
    assert_eq!(serve(&balance).await, "b");
    tokio::time::advance(Duration::from_secs(4)).await;
    let stats = handle.group_stats("g").unwrap();
    assert_eq!(stats.failovers, 1);
    assert_eq!(stats.since_last_failover, Some(Duration::from_secs(4)));
    assert_eq!(stats.current_primary.unwrap().as_str(), "b");
    assert_eq!(stats.healthy, [BackendId::from("b")]);
    assert_eq!(stats.failed, [BackendId::from("p")]);
    assert_eq!(handle.backend_stats(&"b".into()).unwrap().requests, 1);
    let json = serde_json::to_value(handle.stats()).unwrap();
    assert_eq!(json[0]["mode"], "active-passive");
    assert_eq!(json[0]["since_last_failover_ms"], 4000);
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Handle>();
    check::<Events>();
    check::<Priority>();
    let _ = Infallible::clone;
    let _ = <Svc as Service<Request<()>>>::poll_ready;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_picks_record_each_switch_once_and_in_order() {
    // Backends with an `Infallible` error, so the requests can run in
    // spawned tasks.
    let pool = Pool::new();
    for name in ["a", "b", "c"] {
        pool.insert(
            name,
            service_fn(
                move |_req: Request<()>| async move { Ok::<_, Infallible>(Response::new(name)) },
            ),
        );
    }
    let set = |id: &str, health: HealthStatus| {
        pool.state(&id.into()).unwrap().set_health(health);
    };
    let events = Events::default();
    let group = Priority::new("g", ["a", "b", "c"]).events(events.clone());
    let balance = Balance::new(pool.clone(), group.clone()).panic_threshold(0.0);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let balance = balance.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..2_000 {
                let _ = balance.clone().oneshot(Request::new(())).await;
                tokio::task::yield_now().await;
            }
        }));
    }
    // While requests run on both worker threads, leave one backend
    // available at a time, in turn: b, c, a, b, ... The primary must move
    // at every step, whatever the tasks do.
    let steps = 400;
    for i in 0..steps {
        let up = ["a", "b", "c"][(i + 1) % 3];
        for name in ["a", "b", "c"] {
            set(
                name,
                if name == up {
                    HealthStatus::Healthy
                } else {
                    HealthStatus::Unhealthy
                },
            );
        }
        // One pick here too, so the step's switch happens however the tasks
        // run.
        let _ = balance.clone().oneshot(Request::new(())).await;
        tokio::task::yield_now().await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    let changes = primary_changes(&events);
    // At least one switch a step (more when a pick saw a step half set).
    assert!(changes.len() >= steps, "{} switches", changes.len());
    assert_eq!(changes.len() as u64, group.failovers());
    // Each switch starts where the one before it ended: none lost, none
    // doubled, none out of order.
    assert_eq!(changes[0].0.as_deref(), Some("a"));
    for pair in changes.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "{changes:?}");
    }
    assert_eq!(
        changes.last().unwrap().1,
        group.current().map(|c| c.to_string())
    );
}

/// Drain with sticky sessions: a session bound to the drained backend stays
/// there until the deadline, no new session lands there, and at the deadline
/// the session moves once.
#[tokio::test(start_paused = true)]
async fn a_drained_backends_sessions_stay_until_the_deadline_then_move_once() {
    use tower::ServiceBuilder;
    use tower_ha::balance::{BalanceLayer, RoundRobin};
    use tower_ha::sticky::{SessionKey, StickyLayer};

    let pool = pool_of(&["a", "b"]);
    let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(30)));
    handle.add_pool("g", pool.clone(), None).unwrap();
    let sticky =
        StickyLayer::new(&pool, SessionKey::header("x-session")).events(handle.events().clone());
    let svc = ServiceBuilder::new()
        .layer(sticky.clone())
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(pool.clone());
    let send = |session: &'static str| {
        let svc = svc.clone();
        async move {
            let req = Request::builder()
                .header("x-session", session)
                .body(())
                .unwrap();
            svc.oneshot(req).await.unwrap().into_body()
        }
    };

    // Two sessions, one per backend.
    let first = send("s1").await;
    let second = send("s2").await;
    assert_ne!(first, second);
    let on_a = if first == "a" { "s1" } else { "s2" };

    handle.drain(&"a".into()).unwrap();
    tokio::time::advance(Duration::from_secs(29)).await;
    for _ in 0..5 {
        assert_eq!(
            send(on_a).await,
            "a",
            "a session finishes on its draining backend"
        );
    }
    for new in ["n1", "n2", "n3", "n4"] {
        assert_eq!(
            send(new).await,
            "b",
            "no new session lands on a draining backend"
        );
    }
    assert_eq!(sticky.stats().moved, 0);

    // Just past the deadline (the paused clock runs the deadline task).
    tokio::time::sleep(Duration::from_millis(1001)).await;
    assert_eq!(
        pool.state(&"a".into()).unwrap().admin(),
        AdminStatus::Disabled
    );
    assert_eq!(
        send(on_a).await,
        "b",
        "after the deadline the session moves"
    );
    assert_eq!(send(on_a).await, "b");
    assert_eq!(sticky.stats().moved, 1, "once");
    let moves: Vec<_> = handle
        .events()
        .history()
        .iter()
        .filter_map(|r| match &r.event {
            Event::SessionMoved {
                session,
                from,
                to,
                reason,
            } => Some((
                session.to_string(),
                from.to_string(),
                to.to_string(),
                reason.to_string(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        moves,
        [(
            on_a.to_owned(),
            "a".to_owned(),
            "b".to_owned(),
            "unavailable".to_owned()
        )],
        "one SessionMoved event, in the stream the handle shares"
    );
}

#[tokio::test]
async fn a_group_emitting_into_another_stream_is_refused() {
    let handle = Handle::new(Events::default());
    let elsewhere = Priority::new("g", ["a", "b"]).events(Events::default());
    let balance = Balance::new(pool_of(&["a", "b"]), elsewhere);
    assert_eq!(
        handle.add_group("g", &balance),
        Err(ControlError::OtherEventStream("g".into()))
    );
    // The handle's own stream, given beforehand, is fine.
    let same = Priority::new("h", ["a", "b"]).events(handle.events().clone());
    handle
        .add_group("h", &Balance::new(pool_of(&["a", "b"]), same))
        .unwrap();
}

/// A `Priority`'s events carry its own name: registered under another,
/// its group's events would name a group the handle does not know.
#[tokio::test]
async fn a_group_registered_under_another_name_than_its_priority_is_refused() {
    let handle = Handle::new(Events::default());
    let balance = Balance::new(pool_of(&["a", "b"]), Priority::new("db", ["a", "b"]));
    assert!(matches!(
        handle.add_group("api", &balance),
        Err(ControlError::GroupName { group, priority, .. }) if group == "api" && priority == "db"
    ));
    assert!(handle.group_names().is_empty());
    handle.add_group("db", &balance).unwrap();
    assert_eq!(
        handle.group_names(),
        ["db".into()] as [std::sync::Arc<str>; 1]
    );
}

#[tokio::test(start_paused = true)]
async fn a_primary_that_joins_after_its_backups_takes_over_without_a_failover() {
    let events = Events::default();
    // Discovery fills the pool in its own order: a backup first.
    let pool = pool_of(&["db2"]);
    let group = Priority::new("db", ["db1", "db2"]).events(events.clone());
    let balance = Balance::new(pool.clone(), group.clone());
    assert_eq!(serve(&balance).await, "db2");
    pool.insert("db1", named("db1", Duration::ZERO));
    assert_eq!(serve(&balance).await, "db1");
    assert_eq!(group.current(), Some("db1".into()));
    assert_eq!(group.failovers(), 0);
    assert!(events.history().is_empty(), "{:?}", events.history());
    // From then on it is a primary like any other.
    set_health(&pool, "db1", HealthStatus::Unhealthy);
    assert_eq!(serve(&balance).await, "db2");
    assert_eq!(group.failovers(), 1);

    // Without a configured order, the first available backend is the
    // primary, and taking it is no failover either.
    let pool = pool_of(&["x", "y"]);
    let group = Priority::new("any", Vec::<BackendId>::new());
    let balance = Balance::new(pool.clone(), group.clone());
    assert_eq!(serve(&balance).await, "x");
    assert_eq!(group.current(), Some("x".into()));
    assert_eq!(group.failovers(), 0);
    set_health(&pool, "x", HealthStatus::Unhealthy);
    assert_eq!(serve(&balance).await, "y");
    set_health(&pool, "x", HealthStatus::Healthy);
    assert_eq!(serve(&balance).await, "y", "no failback by default");
    assert_eq!(group.failovers(), 1);

    // A primary forced before the configured one joined is a primary like
    // any other: its removal, even before it served, is a failover.
    let pool = pool_of(&["b", "c"]);
    let group = Priority::new("late", ["a", "b", "c"]);
    let balance = Balance::new(pool.clone(), group.clone());
    assert!(group.force_primary(&"c".into()));
    pool.remove(&"c".into());
    assert_eq!(serve(&balance).await, "b");
    assert_eq!(group.current(), Some("b".into()));
    assert_eq!(group.failovers(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_primary_awaiting_its_first_passing_probes_takes_over_without_a_failover() {
    // The primary is in the pool when the checker starts, joins later, or
    // leaves before it passed and joins again.
    for (joins_late, leaves) in [(false, false), (true, false), (false, true)] {
        primary_awaiting_its_first_passing_probes(joins_late, leaves).await;
    }
}

async fn primary_awaiting_its_first_passing_probes(joins_late: bool, leaves: bool) {
    use tower_ha::health::{probe_fn, HealthChecker};
    let events = Events::default();
    let pool = pool_of(if joins_late {
        &["db2"]
    } else {
        &["db1", "db2"]
    });
    // The backup passes its probes from the start; the primary only after
    // three seconds.
    let start = tokio::time::Instant::now();
    let probe = probe_fn(move |id: &BackendId, _svc: &Svc| {
        let up = id.as_str() == "db2" || start.elapsed() >= Duration::from_secs(3);
        async move {
            if up {
                Ok(())
            } else {
                Err::<(), BoxError>("connection refused".into())
            }
        }
    });
    let checker = HealthChecker::new(pool.clone(), probe)
        .start_unhealthy(true)
        .rise(1)
        .jitter(Duration::ZERO)
        .interval(Duration::from_millis(500))
        .spawn();
    let group = Priority::new("db", ["db1", "db2"]).events(events.clone());
    let balance = Balance::new(pool.clone(), group.clone());
    let mut served = Vec::new();
    for i in 0..60 {
        if leaves && i == 5 {
            assert!(pool.remove(&"db1".into()));
        }
        if (joins_late || leaves) && i == 10 {
            pool.insert("db1", named("db1", Duration::ZERO));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        served.push(serve(&balance).await);
    }
    // The backup serves while the primary is not up yet; the primary takes
    // over once it passes, although the failback rule is `Never`.
    assert_eq!(served[0], "db2");
    assert_eq!(served[20], "db2");
    assert_eq!(served[59], "db1");
    assert_eq!(group.current(), Some("db1".into()));
    assert_eq!(group.failovers(), 0);
    assert_eq!(primary_changes(&events), []);
    // From then on it is a primary like any other.
    set_health(&pool, "db1", HealthStatus::Unhealthy);
    assert_eq!(serve(&balance).await, "db2");
    assert_eq!(
        primary_changes(&events),
        [change("db1", "db2", SwitchReason::Failover)]
    );
    checker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_pick_on_an_older_membership_switches_nothing() {
    // Requests that read the membership just before the configured primary
    // joined are served by what they know, and demote nothing.
    let pool = pool_of(&["b"]);
    let group = Priority::new("g", ["a", "b"]);
    let old = pool.snapshot();
    let old_table = group.build(old.members());
    pool.insert("a", named("a", Duration::ZERO));
    let new = pool.snapshot();
    let new_table = group.build(new.members());
    let req = Request::new(());
    let pick = |snapshot: &Snapshot<Svc>, table| {
        let members = snapshot.members();
        let i = group.pick(table, &Pick::new(RequestHead::from(&req), members, None));
        i.map(|i| members[i].id().clone())
    };
    assert_eq!(pick(&new, &new_table), Some("a".into()));
    assert_eq!(pick(&old, &old_table), Some("b".into()));
    assert_eq!(group.current(), Some("a".into()));
    assert_eq!(group.failovers(), 0);
    assert_eq!(pick(&new, &new_table), Some("a".into()));

    // Balancers over one pool rebuilt by one change are all up to date:
    // a pick on any of them fails over.
    let pool = pool_of(&["a", "b"]);
    let group = Priority::new("g", ["a", "b"]);
    let first = Balance::new(pool.clone(), group.clone());
    let _second = Balance::new(pool.clone(), group.clone());
    pool.insert("c", named("c", Duration::ZERO));
    set_health(&pool, "a", HealthStatus::Unhealthy);
    assert_eq!(serve(&first).await, "b");
    assert_eq!(group.current(), Some("b".into()));
    assert_eq!(group.failovers(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_action_on_a_backend_whose_groups_disagree_is_one_event() {
    let web = pool_of(&["x", "w"]);
    let api = pool_of(&["x", "a"]);
    let handle = Handle::new(Events::default());
    handle
        .add_group(
            "web",
            &Balance::new(web.clone(), Priority::new("web", ["x", "w"])),
        )
        .unwrap();
    handle
        .add_group(
            "api",
            &Balance::new(api.clone(), tower_ha::balance::RoundRobin::new()),
        )
        .unwrap();
    handle.disable(&"x".into()).unwrap();
    // Back in one group only, enabled there: the groups now disagree.
    handle.remove_backend("api", &"x".into()).unwrap();
    handle
        .add_backend("api", "x", named("x", Duration::ZERO))
        .unwrap();
    handle.enable(&"x".into()).unwrap();
    let changes: Vec<(AdminStatus, AdminStatus)> = handle
        .events()
        .history()
        .iter()
        .filter_map(|r| match &r.event {
            Event::AdminChanged { from, to, .. } => Some((*from, *to)),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        [
            (AdminStatus::Enabled, AdminStatus::Disabled),
            (AdminStatus::Disabled, AdminStatus::Enabled)
        ]
    );
    assert_eq!(
        web.state(&"x".into()).unwrap().admin(),
        AdminStatus::Enabled
    );
}

#[tokio::test(start_paused = true)]
async fn repeated_drains_keep_one_deadline_timer() {
    let pool = pool_of(&["a", "b"]);
    let balance = Balance::new(pool.clone(), tower_ha::balance::RoundRobin::new());
    let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(60)));
    handle.add_group("g", &balance).unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    for _ in 0..100 {
        handle.drain(&"a".into()).unwrap();
    }
    // Let the runtime drop the timers ended.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(metrics.num_alive_tasks(), before + 1);
    // An enable ends the last one too; the deadline then does nothing.
    handle.enable(&"a".into()).unwrap();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(metrics.num_alive_tasks(), before);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(
        pool.state(&"a".into()).unwrap().admin(),
        AdminStatus::Enabled
    );
    // A drain left alone still ends in a disable at its deadline.
    handle.drain(&"b".into()).unwrap();
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(
        pool.state(&"b".into()).unwrap().admin(),
        AdminStatus::Disabled
    );
    assert_eq!(metrics.num_alive_tasks(), before);
}

// ---------------------------------------------------------------------------
// The counters of the failover and sticky layers.

mod layers {
    use std::convert::Infallible;

    use http::{Request, Response, StatusCode};
    use tower::util::BoxCloneSyncService;
    use tower::{service_fn, ServiceBuilder, ServiceExt};
    use tower_ha::balance::{BalanceLayer, RoundRobin};
    use tower_ha::control::{Events, Handle, LayerStats};
    use tower_ha::failover::FailoverLayer;
    use tower_ha::sticky::{SessionKey, StickyLayer};
    use tower_ha::{BoxError, Pool};

    type Backend = BoxCloneSyncService<Request<String>, Response<&'static str>, BoxError>;

    /// "down" answers 503, "up" 200; round robin tries "down" first.
    fn pool() -> Pool<Backend> {
        let pool = Pool::new();
        for (name, status) in [("down", 503), ("up", 200)] {
            let svc = service_fn(move |_req: Request<String>| async move {
                let mut response = Response::new(name);
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                Ok::<_, Infallible>(response)
            });
            pool.insert(name, BoxCloneSyncService::new(svc.map_err(BoxError::from)));
        }
        pool
    }

    fn request(session: &str) -> Request<String> {
        Request::builder()
            .header("x-session", session)
            .body(String::new())
            .unwrap()
    }

    #[tokio::test]
    async fn a_handle_reports_the_layers_registered_with_it() {
        let pool = pool();
        let failover = FailoverLayer::new().no_budget();
        let sticky = StickyLayer::new(&pool, SessionKey::header("x-session"));
        let handle = Handle::new(Events::default());
        assert_eq!(handle.layer_stats(), LayerStats::default());
        handle.add_failover("web", &failover);
        handle.add_sticky("web", &sticky);

        let service = ServiceBuilder::new()
            .layer(sticky.clone())
            .layer(failover.clone())
            .layer(BalanceLayer::new(RoundRobin::new()))
            .service(pool.clone());
        // A new session: "down" fails, "up" serves and keeps it.
        let response = service.clone().oneshot(request("s1")).await.unwrap();
        assert_eq!(*response.body(), "up");
        // Its second request goes straight to "up".
        let response = service.clone().oneshot(request("s1")).await.unwrap();
        assert_eq!(*response.body(), "up");

        let stats = handle.layer_stats();
        assert_eq!(stats.failover.len(), 1);
        assert_eq!(stats.failover["web"], failover.stats());
        assert_eq!(
            (
                stats.failover["web"].retries,
                stats.failover["web"].recovered
            ),
            (1, 1)
        );
        assert_eq!(stats.sticky["web"], sticky.stats());
        let sticky_web = stats.sticky["web"];
        assert_eq!((sticky_web.sessions, sticky_web.created), (1, 1));

        // A second layer under another name; then the first goes.
        handle.add_failover("api", &FailoverLayer::new());
        assert_eq!(handle.layer_stats().failover.len(), 2);
        assert!(handle.remove_layer("web"));
        assert!(!handle.remove_layer("web"));
        let stats = handle.layer_stats();
        assert_eq!(
            stats.failover.keys().map(|k| &**k).collect::<Vec<_>>(),
            ["api"]
        );
        assert!(stats.sticky.is_empty());
    }

    #[tokio::test]
    async fn a_sticky_layer_dropped_with_its_services_is_no_longer_reported() {
        let pool = pool();
        let handle = Handle::new(Events::default());
        let sticky = StickyLayer::new(&pool, SessionKey::header("x-session"));
        handle.add_sticky("web", &sticky);
        let service = ServiceBuilder::new()
            .layer(sticky.clone())
            .layer(BalanceLayer::new(RoundRobin::new()))
            .service(pool.clone());
        drop(sticky);
        // Its service still counts.
        service.clone().oneshot(request("s1")).await.unwrap();
        assert_eq!(handle.layer_stats().sticky["web"].created, 1);
        drop(service);
        assert!(handle.layer_stats().sticky.is_empty());
    }
}

/// Actions by backend id against a membership that changes under them.
mod actions_and_membership {
    use super::*;
    use tower_ha::balance::RoundRobin;

    fn backend(name: &'static str) -> Svc {
        named(name, Duration::ZERO)
    }

    fn admin_changes(events: &Events) -> Vec<String> {
        events
            .history()
            .iter()
            .filter_map(|r| match &r.event {
                Event::AdminChanged {
                    backend,
                    from,
                    to,
                    reason,
                } => Some(format!("{backend} {from:?}->{to:?} ({reason})")),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_backend_added_to_another_group_takes_its_ids_status() {
        let (one, two) = (pool_of(&["x", "y"]), pool_of(&["z"]));
        let second = Balance::new(two.clone(), RoundRobin::new());
        let handle = Handle::new(Events::default());
        handle
            .add_group("one", &Balance::new(one.clone(), RoundRobin::new()))
            .unwrap();
        handle.add_group("two", &second).unwrap();
        handle.disable(&"x".into()).unwrap();
        handle.add_backend("two", "x", backend("x")).unwrap();
        assert_eq!(
            two.state(&"x".into()).unwrap().admin(),
            AdminStatus::Disabled
        );
        for _ in 0..4 {
            assert_eq!(serve(&second).await, "z");
        }
    }

    /// The weight and the limit an operator set on a backend in every
    /// group reach a copy added later; ones its groups differ on do not.
    #[tokio::test]
    async fn a_backend_added_to_another_group_takes_the_weight_and_limit_it_has_everywhere() {
        let (one, two, three) = (pool_of(&["x"]), pool_of(&["z"]), pool_of(&["x"]));
        let handle = Handle::new(Events::default());
        for (name, pool) in [("one", &one), ("two", &two), ("three", &three)] {
            handle
                .add_group(name, &Balance::new(pool.clone(), RoundRobin::new()))
                .unwrap();
        }
        let x = BackendId::from("x");
        handle.set_weight(&x, 5).unwrap();
        handle.set_max_in_flight(&x, Some(10)).unwrap();
        handle.add_backend("two", "x", backend("x")).unwrap();
        let added = two.state(&x).unwrap();
        assert_eq!((added.weight(), added.max_in_flight()), (5, Some(10)));
        // Groups that differ: the new copy keeps the defaults.
        handle.remove_backend("two", &x).unwrap();
        three.state(&x).unwrap().set_max_in_flight(Some(3));
        one.set_weight(&x, 2);
        handle.add_backend("two", "x", backend("x")).unwrap();
        let added = two.state(&x).unwrap();
        assert_eq!((added.weight(), added.max_in_flight()), (1, None));
    }

    /// Round robin that records the admin status of each member when its
    /// table is built: what a balancer sees the moment a change publishes.
    #[derive(Clone, Default)]
    struct Watching(Arc<Mutex<Vec<(String, AdminStatus)>>>);

    impl Strategy for Watching {
        type Table = ();
        fn build(&self, members: &tower_ha::pool::Members) {
            let mut seen = self.0.lock().unwrap();
            for m in members.iter() {
                seen.push((m.id().to_string(), m.state().admin()));
            }
        }
        fn pick(&self, _table: &(), pick: &Pick<'_>) -> Option<usize> {
            (!pick.is_empty()).then_some(0)
        }
    }

    #[tokio::test]
    async fn a_backend_added_to_another_group_is_never_seen_with_another_status() {
        let (one, two) = (pool_of(&["x"]), pool_of(&["z"]));
        let watching = Watching::default();
        let second = Balance::new(two.clone(), watching.clone());
        let handle = Handle::new(Events::default());
        handle
            .add_group("one", &Balance::new(one.clone(), RoundRobin::new()))
            .unwrap();
        handle.add_group("two", &second).unwrap();
        handle.drain(&"x".into()).unwrap();
        handle.add_backend("two", "x", backend("x")).unwrap();
        let seen = watching.0.lock().unwrap().clone();
        let x: Vec<_> = seen.iter().filter(|(id, _)| id == "x").collect();
        assert_eq!(x, [&("x".to_owned(), AdminStatus::Draining)]);
    }

    /// An action and an addition of the same id to another group, at once:
    /// in every order, the new copy ends with the action's status.
    #[test]
    fn an_action_racing_an_addition_of_its_backend_reaches_the_new_copy() {
        for _ in 0..2000 {
            let (one, two) = (pool_of(&["a"]), pool_of(&["z"]));
            let handle = Handle::new(Events::default()).drain_deadline(None);
            handle
                .add_group("one", &Balance::new(one.clone(), RoundRobin::new()))
                .unwrap();
            handle
                .add_group("two", &Balance::new(two.clone(), RoundRobin::new()))
                .unwrap();
            let start = Arc::new(std::sync::Barrier::new(2));
            let disabling = {
                let (handle, start) = (handle.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    handle.disable(&"a".into()).unwrap();
                })
            };
            start.wait();
            handle.add_backend("two", "a", backend("a")).unwrap();
            disabling.join().unwrap();
            for pool in [&one, &two] {
                assert_eq!(
                    pool.state(&"a".into()).unwrap().admin(),
                    AdminStatus::Disabled
                );
            }
        }
    }

    /// A handle with a drain deadline of 10 s over group `g` (backends `a`
    /// and `b`) and group `h` (backend `c`); returns their pools too.
    fn groups_g_and_h() -> (Handle, Pool<Svc>, Pool<Svc>) {
        let pool = pool_of(&["a", "b"]);
        let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(10)));
        handle
            .add_group("g", &Balance::new(pool.clone(), RoundRobin::new()))
            .unwrap();
        let other = pool_of(&["c"]);
        handle
            .add_group("h", &Balance::new(other.clone(), RoundRobin::new()))
            .unwrap();
        (handle, pool, other)
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_deadline_disables_the_backends_the_groups_hold_then() {
        let (handle, pool, other) = groups_g_and_h();
        handle.drain(&"a".into()).unwrap();
        // Removed outside the handle and back with a new state (a checker's
        // removal, then a discovery): not the backend that was drained.
        pool.remove(&"a".into());
        pool.insert("a", backend("a"));
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(
            pool.state(&"a".into()).unwrap().admin(),
            AdminStatus::Enabled
        );
        assert_eq!(
            admin_changes(handle.events()),
            ["a Enabled->Draining (operator)"]
        );

        // Added to another group while it drains: disabled with the rest
        // at the deadline.
        handle.drain(&"b".into()).unwrap();
        handle.add_backend("h", "b", backend("b")).unwrap();
        assert_eq!(
            other.state(&"b".into()).unwrap().admin(),
            AdminStatus::Draining
        );
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(
            pool.state(&"b".into()).unwrap().admin(),
            AdminStatus::Disabled
        );
        assert_eq!(
            other.state(&"b".into()).unwrap().admin(),
            AdminStatus::Disabled
        );
    }

    /// A backend its discovery drops for a moment while it drains: the
    /// pool keeps its state, the deadline disables it there and says so,
    /// and it comes back disabled, as the events tell.
    #[tokio::test(start_paused = true)]
    async fn a_drain_deadline_reports_the_disable_of_a_state_kept_for_a_return() {
        use tower::discover::Change;

        let (handle, pool, other) = groups_g_and_h();
        handle.drain(&"a".into()).unwrap();
        // Added to the other group while it drains (with that status),
        // then dropped there too.
        handle.add_backend("h", "a", backend("a")).unwrap();
        for pool in [&pool, &other] {
            let gone = futures::stream::iter([Ok::<_, Infallible>(Change::Remove("a"))]);
            pool.discover(gone).await.unwrap();
            assert!(!pool.contains(&"a".into()));
        }
        tokio::time::sleep(Duration::from_secs(11)).await;
        for pool in [&pool, &other] {
            let back =
                futures::stream::iter([Ok::<_, Infallible>(Change::Insert("a", backend("a")))]);
            pool.discover(back).await.unwrap();
            assert_eq!(
                pool.state(&"a".into()).unwrap().admin(),
                AdminStatus::Disabled
            );
        }
        assert_eq!(
            admin_changes(handle.events()),
            [
                "a Enabled->Draining (operator)",
                "a Draining->Disabled (drain deadline)"
            ]
        );
    }

    /// An action on a backend its discovery dropped a moment ago acts on
    /// the state its pool keeps for its return: it comes back disabled, with
    /// its limit and weight. A backend no pool holds or keeps is unknown.
    #[tokio::test(start_paused = true)]
    async fn actions_on_a_backend_dropped_for_a_moment_hold_when_it_returns() {
        use tower::discover::Change;

        let (handle, pool, other) = groups_g_and_h();
        let gone = futures::stream::iter([Ok::<_, Infallible>(Change::Remove("a"))]);
        pool.discover(gone).await.unwrap();
        assert!(!pool.contains(&"a".into()));

        handle.disable(&"a".into()).unwrap();
        handle.set_max_in_flight(&"a".into(), Some(7)).unwrap();
        handle.set_weight(&"a".into(), 5).unwrap();
        assert_eq!(
            admin_changes(handle.events()),
            ["a Enabled->Disabled (operator)"]
        );
        assert_eq!(
            handle.disable(&"z".into()),
            Err(ControlError::UnknownBackend("z".into()))
        );
        assert_eq!(
            handle.set_weight(&"z".into(), 2),
            Err(ControlError::UnknownBackend("z".into()))
        );

        let stats = handle.backend_stats(&"a".into()).unwrap();
        assert_eq!(stats.admin, AdminStatus::Disabled);
        assert_eq!((stats.weight, stats.max_in_flight), (5, Some(7)));
        assert!(!stats.available, "in no pool");
        // Added to another group meanwhile: with the status it was given.
        handle.add_backend("h", "a", backend("a")).unwrap();
        assert_eq!(
            other.state(&"a".into()).unwrap().admin(),
            AdminStatus::Disabled
        );

        let back = futures::stream::iter([Ok::<_, Infallible>(Change::Insert("a", backend("a")))]);
        pool.discover(back).await.unwrap();
        let state = pool.state(&"a".into()).unwrap();
        assert_eq!(state.admin(), AdminStatus::Disabled);
        assert_eq!(state.max_in_flight(), Some(7));
        assert_eq!(state.weight(), 5);

        // Out for longer than the pool keeps states: forgotten.
        handle.remove_backend("h", &"a".into()).unwrap();
        pool.discover(futures::stream::iter([Ok::<_, Infallible>(
            Change::Remove("a"),
        )]))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(
            handle.enable(&"a".into()),
            Err(ControlError::UnknownBackend("a".into()))
        );
    }

    /// Removing a backend its discovery dropped a moment ago removes it:
    /// its kept state is forgotten, the removal is reported, and it comes
    /// back afresh.
    #[tokio::test(start_paused = true)]
    async fn removing_a_backend_dropped_for_a_moment_forgets_its_state() {
        use tower::discover::Change;

        let (handle, pool, _) = groups_g_and_h();
        handle.disable(&"a".into()).unwrap();
        let gone = futures::stream::iter([Ok::<_, Infallible>(Change::Remove("a"))]);
        pool.discover(gone).await.unwrap();
        handle.remove_backend("g", &"a".into()).unwrap();
        assert!(handle.events().history().iter().any(|r| matches!(
            &r.event,
            Event::BackendRemoved { backend, .. } if backend.as_str() == "a"
        )));
        assert!(matches!(
            handle.remove_backend("g", &"a".into()),
            Err(ControlError::NotInGroup { group, backend, .. }) if group == "g" && backend == "a"
        ));
        let back = futures::stream::iter([Ok::<_, Infallible>(Change::Insert("a", backend("a")))]);
        pool.discover(back).await.unwrap();
        assert_eq!(
            pool.state(&"a".into()).unwrap().admin(),
            AdminStatus::Enabled
        );
    }

    #[tokio::test(start_paused = true)]
    async fn draining_again_does_not_put_the_deadline_off() {
        let pool = pool_of(&["a", "b"]);
        let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(30)));
        handle
            .add_group("g", &Balance::new(pool.clone(), RoundRobin::new()))
            .unwrap();
        handle.drain(&"a".into()).unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        handle.drain(&"a".into()).unwrap();
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(
            pool.state(&"a".into()).unwrap().admin(),
            AdminStatus::Draining
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            pool.state(&"a".into()).unwrap().admin(),
            AdminStatus::Disabled
        );
        // Draining once more starts a new drain and deadline.
        handle.drain(&"a".into()).unwrap();
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(
            pool.state(&"a".into()).unwrap().admin(),
            AdminStatus::Draining
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            pool.state(&"a".into()).unwrap().admin(),
            AdminStatus::Disabled
        );
    }

    /// A drain retried after the deadline was turned off for drains to
    /// come keeps the deadline of the drain under way.
    #[tokio::test(start_paused = true)]
    async fn draining_again_keeps_the_deadline_after_deadlines_are_turned_off() {
        let pool = pool_of(&["a", "b"]);
        let handle = Handle::new(Events::default()).drain_deadline(Some(Duration::from_secs(30)));
        handle
            .add_group("g", &Balance::new(pool.clone(), RoundRobin::new()))
            .unwrap();
        handle.drain(&"a".into()).unwrap();
        let handle = handle.drain_deadline(None);
        handle.drain(&"a".into()).unwrap();
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(
            pool.state(&"a".into()).unwrap().admin(),
            AdminStatus::Disabled
        );
        // A drain begun now has no deadline.
        handle.drain(&"b".into()).unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(
            pool.state(&"b".into()).unwrap().admin(),
            AdminStatus::Draining
        );
    }

    #[tokio::test]
    async fn a_forced_primary_stays_forced_while_nothing_is_available() {
        let pool = pool_of(&["a", "b"]);
        let balance = Balance::new(pool.clone(), Priority::new("g", ["a", "b"]));
        let handle = Handle::new(Events::default());
        handle.add_group("g", &balance).unwrap();
        handle.force_primary("g", &"b".into()).unwrap();
        for id in ["a", "b"] {
            set_health(&pool, id, HealthStatus::Unhealthy);
        }
        let _ = balance.clone().oneshot(Request::new(())).await;
        for id in ["a", "b"] {
            set_health(&pool, id, HealthStatus::Healthy);
        }
        assert_eq!(serve(&balance).await, "b");
        let stats = handle.group_stats("g").unwrap();
        assert_eq!(stats.forced_primary.as_ref().map(|b| b.as_str()), Some("b"));
    }
}

/// A weight set through the handle rebuilds the tables of every group,
/// also of one whose pool shares the backend's state with another's.
#[tokio::test]
async fn a_weight_change_reaches_every_group_sharing_the_backend() {
    use tower_ha::balance::WeightedRoundRobin;
    let web = pool_of(&["w1", "shared"]);
    let api = pool_of(&["a1"]);
    let state = web.state(&"shared".into()).unwrap();
    api.insert_with_state("shared", named("shared", Duration::ZERO), state);
    let web_balance = Balance::new(web, WeightedRoundRobin::new());
    let api_balance = Balance::new(api, WeightedRoundRobin::new());
    let handle = Handle::new(Events::default());
    handle.add_group("web", &web_balance).unwrap();
    handle.add_group("api", &api_balance).unwrap();
    handle.set_weight(&"shared".into(), 3).unwrap();
    for (balance, other) in [(&web_balance, "w1"), (&api_balance, "a1")] {
        let mut shared = 0;
        for _ in 0..8 {
            match serve(balance).await.as_str() {
                "shared" => shared += 1,
                name => assert_eq!(name, other),
            }
        }
        assert_eq!(shared, 6, "{other}'s group");
    }
}
