//! The event stream and the stats under concurrent use.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower_ha::balance::{Balance, Priority, RoundRobin};
use tower_ha::control::{Event, Events, Handle};
use tower_ha::health::{probe_fn, HealthChecker};
use tower_ha::{BackendId, BoxError, Pool};

/// Subscribers receive events in the order of their sequence numbers, even
/// when several threads emit at once.
#[test]
fn subscribers_receive_concurrent_events_in_sequence_order() {
    const THREADS: u32 = 4;
    const PER_THREAD: u32 = 15_000;
    // Room for every event: the subscriber reads them all after the fact.
    let events = Events::new((THREADS * PER_THREAD) as usize, 0);
    let mut subscriber = events.subscribe();
    let emitters: Vec<_> = (0..THREADS)
        .map(|_| {
            let events = events.clone();
            std::thread::spawn(move || {
                for weight in 0..PER_THREAD {
                    events.emit(Event::WeightChanged {
                        backend: "a".into(),
                        weight,
                    });
                }
            })
        })
        .collect();
    for emitter in emitters {
        emitter.join().unwrap();
    }
    let mut received = 0u64;
    let mut out_of_order = 0u64;
    let mut last = None;
    while let Some(record) = subscriber.try_recv() {
        let seq = record.expect("nothing is missed").seq;
        if last.is_some_and(|last| seq <= last) {
            out_of_order += 1;
        }
        last = Some(seq);
        received += 1;
    }
    assert_eq!(received, u64::from(THREADS * PER_THREAD));
    assert_eq!(out_of_order, 0, "events received out of sequence order");
}

/// A backend removed from one group keeps its last change in the stats of
/// another group that still holds it.
#[tokio::test(start_paused = true)]
async fn a_backend_removed_from_one_group_keeps_its_last_change_in_another() {
    let handle = Handle::new(Events::default());
    let web = Pool::new();
    web.insert("a", ());
    web.insert("b", ());
    let api = Pool::new();
    api.insert("a", ());
    handle
        .add_group("web", &Balance::new(web, RoundRobin::new()))
        .unwrap();
    handle
        .add_group("api", &Balance::new(api, RoundRobin::new()))
        .unwrap();
    let a = BackendId::from("a");
    handle.disable(&a).unwrap();
    let disabled_at = handle.backend_stats(&a).unwrap().last_change;
    assert!(disabled_at.is_some());

    handle.remove_backend("web", &a).unwrap();
    let api = handle.group_stats("api").unwrap();
    assert_eq!(api.backends[0].id, a);
    let last_change = api.backends[0].last_change;
    assert!(
        last_change.is_some_and(|at| at >= disabled_at.unwrap()),
        "still in `api`: {last_change:?}"
    );

    // Gone from every group: forgotten.
    handle.remove_backend("api", &a).unwrap();
    assert_eq!(handle.events().last_change(&a), None);
}

/// A health checker over one group's pool removes a backend that another
/// group holds too (it cannot tell): the other group's stats keep its last
/// change, and show its later ones.
#[tokio::test(start_paused = true)]
async fn a_backend_a_checker_removes_from_one_group_keeps_its_last_change_in_another() {
    let handle = Handle::new(Events::default());
    let web = Pool::new();
    web.insert("a", ());
    let api = Pool::new();
    api.insert("a", ());
    handle
        .add_group("web", &Balance::new(web.clone(), RoundRobin::new()))
        .unwrap();
    handle
        .add_group("api", &Balance::new(api, RoundRobin::new()))
        .unwrap();
    let a = BackendId::from("a");
    // Its first probe passes; every later one fails.
    let probes = Arc::new(AtomicUsize::new(0));
    let probe = probe_fn(move |_: &BackendId, _: &()| {
        let first = probes.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            match first {
                true => Ok(()),
                false => Err::<(), BoxError>("down".into()),
            }
        }
    });
    let _checker = HealthChecker::new(web.clone(), probe)
        .interval(Duration::from_secs(1))
        .jitter(Duration::ZERO)
        .fall(1)
        .removed_after(Duration::from_secs(2))
        .events(handle.events().clone())
        .spawn();
    let mut removed = false;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        removed = web.is_empty();
        if removed {
            break;
        }
    }
    assert!(removed, "the checker removed it from `web`");
    let removed_at = (handle.events().history().iter())
        .find(|r| matches!(r.event, Event::BackendRemoved { .. }))
        .expect("the removal is an event")
        .time;
    // Its next change, reported before anyone reads the stats, shows too
    // (the times are the wall clock's, which the paused tokio clock does
    // not move).
    std::thread::sleep(Duration::from_millis(2));
    handle.events().emit(Event::Ejected {
        backend: a.clone(),
        reason: "consecutive failures".into(),
        ejection: 1,
        duration: Duration::from_secs(30),
    });
    let last_change = handle.group_stats("api").unwrap().backends[0].last_change;
    assert!(
        last_change.is_some_and(|at| at > removed_at),
        "still in `api`, its ejection counts: {last_change:?} after {removed_at:?}"
    );
    // Held by `api`, it was never taken for removed: not even once the
    // removed backends are forgotten (ten minutes on).
    assert!(handle.events().last_change(&a).is_some());
    tokio::time::advance(Duration::from_secs(700)).await;
    handle.events().emit(Event::WeightChanged {
        backend: "other".into(),
        weight: 2,
    });
    let api = handle.group_stats("api").unwrap();
    assert!(api.backends[0].last_change.is_some(), "kept for good");
}

/// A group's stats are of one moment: while an operator forces one backend
/// after the other, every snapshot's forced primary is its current primary.
/// Each reader reads while the switches run, and sees both primaries.
#[test]
fn group_stats_never_mix_before_and_after_a_switch() {
    const SWITCHES: usize = 100_000;
    const READERS: usize = 2;
    let pool = Pool::new();
    pool.insert("a", ());
    pool.insert("b", ());
    let handle = Handle::new(Events::new(1, 0));
    handle
        .add_group("db", &Balance::new(pool, Priority::new("db", ["a", "b"])))
        .unwrap();
    handle.force_primary("db", &"a".into()).unwrap();
    let switching = Arc::new(AtomicBool::new(true));
    let started = Arc::new(std::sync::Barrier::new(READERS + 1));
    // Per reader, the snapshots it took with `a`, then `b`, as primary.
    let seen: Arc<[[AtomicUsize; 2]; READERS]> = Arc::default();
    let readers: Vec<_> = (0..READERS)
        .map(|reader| {
            let (handle, switching) = (handle.clone(), switching.clone());
            let (started, seen) = (started.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut mixed = 0;
                started.wait();
                while switching.load(Ordering::Relaxed) {
                    let stats = handle.group_stats("db").unwrap();
                    if stats.forced_primary.is_none()
                        || stats.forced_primary != stats.current_primary
                    {
                        mixed += 1;
                    }
                    let b = stats
                        .current_primary
                        .as_ref()
                        .is_some_and(|p| p.as_str() == "b");
                    seen[reader][usize::from(b)].fetch_add(1, Ordering::Relaxed);
                }
                mixed
            })
        })
        .collect();
    let both_seen = || {
        seen.iter()
            .all(|r| r.iter().all(|n| n.load(Ordering::Relaxed) > 0))
    };
    let ids = [BackendId::from("a"), BackendId::from("b")];
    started.wait();
    let began = tokio::time::Instant::now();
    for (n, id) in ids.iter().cycle().enumerate() {
        handle.force_primary("db", id).unwrap();
        if n >= SWITCHES && both_seen() {
            break;
        }
        assert!(
            began.elapsed() < std::time::Duration::from_secs(30),
            "the readers never read both primaries"
        );
    }
    switching.store(false, Ordering::Relaxed);
    let mixed: u32 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert_eq!(mixed, 0, "snapshots mixed two moments");
}

/// Releasing a forced primary is an event, whether through the handle or
/// the group's `Priority`; releasing when nothing is forced is none.
#[tokio::test(start_paused = true)]
async fn releasing_a_forced_primary_is_an_event() {
    let released = |events: &Events| -> Vec<(String, String)> {
        events
            .history()
            .iter()
            .filter_map(|r| match &r.event {
                Event::PrimaryReleased { group, backend } => {
                    Some((group.to_string(), backend.to_string()))
                }
                _ => None,
            })
            .collect()
    };
    let pool = Pool::new();
    pool.insert("a", ());
    pool.insert("b", ());
    let priority = Priority::new("db", ["a", "b"]);
    let handle = Handle::new(Events::default());
    handle
        .add_group("db", &Balance::new(pool, priority.clone()))
        .unwrap();
    handle.force_primary("db", &"b".into()).unwrap();
    handle.release_primary("db").unwrap();
    assert_eq!(released(handle.events()), [("db".into(), "b".into())]);
    let last = handle.events().history().pop().unwrap();
    assert_eq!(
        serde_json::to_value(&last.event).unwrap(),
        serde_json::json!({"kind": "primary_released", "group": "db", "backend": "b"})
    );
    // The primary stays until the failback rule moves it.
    assert_eq!(
        handle.group_stats("db").unwrap().current_primary,
        Some("b".into())
    );
    assert_eq!(
        handle.backend_stats(&"b".into()).unwrap().last_change,
        Some(last.time)
    );

    handle.release_primary("db").unwrap();
    assert_eq!(released(handle.events()).len(), 1, "nothing was forced");

    handle.force_primary("db", &"a".into()).unwrap();
    priority.release();
    assert_eq!(
        released(handle.events()),
        [("db".into(), "b".into()), ("db".into(), "a".into())]
    );
}

/// A switch of primary changes both backends: the last change of the one
/// that lost the role is the switch too.
#[test]
fn a_primary_switch_is_the_last_change_of_both_backends() {
    let pool = Pool::new();
    pool.insert("a", ());
    pool.insert("b", ());
    let handle = Handle::new(Events::default());
    handle
        .add_group("db", &Balance::new(pool, Priority::new("db", ["a", "b"])))
        .unwrap();
    handle.force_primary("db", &"a".into()).unwrap();
    // The switch's time differs from the first event's.
    std::thread::sleep(std::time::Duration::from_millis(2));
    handle.force_primary("db", &"b".into()).unwrap();
    let switch = handle.events().history().pop().unwrap();
    let (a, b) = (BackendId::from("a"), BackendId::from("b"));
    assert!(matches!(
        &switch.event,
        Event::PrimaryChanged { from: Some(from), to: Some(to), .. } if *from == a && *to == b
    ));
    for backend in [a, b] {
        assert_eq!(
            handle.backend_stats(&backend).unwrap().last_change,
            Some(switch.time),
            "{backend}"
        );
    }
}
