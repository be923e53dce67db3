//! The event stream and the stats under concurrent use.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tower_ha::balance::{Balance, Priority, RoundRobin};
use tower_ha::control::{Event, Events, Handle};
use tower_ha::{BackendId, Pool};

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

/// A group's stats are of one moment: while an operator forces one backend
/// after the other, every snapshot's forced primary is its current primary.
#[test]
fn group_stats_never_mix_before_and_after_a_switch() {
    const SWITCHES: usize = 100_000;
    let pool = Pool::new();
    pool.insert("a", ());
    pool.insert("b", ());
    let handle = Handle::new(Events::new(1, 0));
    handle
        .add_group("db", &Balance::new(pool, Priority::new("db", ["a", "b"])))
        .unwrap();
    handle.force_primary("db", &"a".into()).unwrap();
    let switching = Arc::new(AtomicBool::new(true));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let handle = handle.clone();
            let switching = switching.clone();
            std::thread::spawn(move || {
                let mut mixed = 0;
                while switching.load(Ordering::Relaxed) {
                    let stats = handle.group_stats("db").unwrap();
                    if stats.forced_primary.is_none()
                        || stats.forced_primary != stats.current_primary
                    {
                        mixed += 1;
                    }
                }
                mixed
            })
        })
        .collect();
    let ids = [BackendId::from("a"), BackendId::from("b")];
    for id in ids.iter().cycle().take(SWITCHES) {
        handle.force_primary("db", id).unwrap();
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
