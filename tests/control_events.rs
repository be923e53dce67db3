//! The event stream under concurrent emitters, and what the stats learn
//! from it.

use tower_ha::control::{Event, Events};

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
