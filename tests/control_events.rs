//! The event stream under concurrent emitters, and what the stats learn
//! from it.

use tower_ha::balance::{Balance, RoundRobin};
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
