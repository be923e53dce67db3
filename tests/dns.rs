//! DNS discovery driven by a scripted resolver on paused time.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_ha::control::{Event, Events};
use tower_ha::dns::{DnsDiscover, ResolveFuture, Resolver, SystemResolver};
use tower_ha::{BackendId, Pool};

/// Answers whatever the test last scripted, and counts the questions.
#[derive(Clone, Default)]
struct Scripted {
    answer: Arc<Mutex<Option<io::Result<Vec<SocketAddr>>>>>,
    asked: Arc<Mutex<Vec<(String, u16)>>>,
}

impl Scripted {
    fn answer(&self, last_octets: &[u8]) {
        let addrs = last_octets
            .iter()
            .map(|&o| SocketAddr::from(([10, 0, 0, o], 5432)))
            .collect();
        *self.answer.lock().unwrap() = Some(Ok(addrs));
    }

    fn fail(&self) {
        *self.answer.lock().unwrap() = Some(Err(io::Error::other("SERVFAIL")));
    }
}

impl Resolver for Scripted {
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture {
        self.asked.lock().unwrap().push((host.to_owned(), port));
        let answer = match self.answer.lock().unwrap().as_ref() {
            Some(Ok(addrs)) => Ok(addrs.clone()),
            Some(Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
            None => Ok(Vec::new()),
        };
        Box::pin(async move { answer })
    }
}

fn ids(pool: &Pool<SocketAddr>) -> Vec<String> {
    let mut ids: Vec<String> = pool.ids().iter().map(BackendId::to_string).collect();
    ids.sort();
    ids
}

#[tokio::test(start_paused = true)]
async fn addresses_that_come_and_go_change_the_pool() {
    let resolver = Scripted::default();
    resolver.answer(&[1, 2]);
    let events = Events::default();
    let pool: Pool<SocketAddr> = Pool::new();
    let discover = DnsDiscover::new(
        resolver.clone(),
        "db.default.svc.cluster.local",
        5432,
        |a| a,
    )
    .interval(Duration::from_secs(10))
    .events(events.clone());
    let task = tokio::spawn({
        let pool = pool.clone();
        async move { pool.discover(discover).await }
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.2:5432"]);
    // The service made for an address is that address.
    assert_eq!(
        pool.snapshot().service(0),
        Some(&SocketAddr::from(([10, 0, 0, 1], 5432)))
    );

    // A pod is replaced: 2 goes, 3 comes; nothing changes before the
    // interval is over.
    resolver.answer(&[1, 3]);
    tokio::time::sleep(Duration::from_millis(9_990)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.2:5432"]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.3:5432"]);

    // A failed resolution keeps the pool as it is.
    resolver.fail();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.3:5432"]);

    // An empty answer removes everything; addresses coming back return.
    resolver.answer(&[]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(pool.is_empty());
    resolver.answer(&[4]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ids(&pool), ["10.0.0.4:5432"]);

    let asked = resolver.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 5);
    assert!(asked
        .iter()
        .all(|(h, p)| h == "db.default.svc.cluster.local" && *p == 5432));
    assert_eq!(
        changes(&events),
        [
            "+10.0.0.1:5432",
            "+10.0.0.2:5432",
            "+10.0.0.3:5432",
            "-10.0.0.2:5432",
            "-10.0.0.1:5432",
            "-10.0.0.3:5432",
            "+10.0.0.4:5432"
        ]
    );
    assert!(!task.is_finished(), "discovery runs until aborted");
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_moved_address_is_inserted_before_the_old_one_is_removed() {
    let resolver = Scripted::default();
    resolver.answer(&[1]);
    let mut discover =
        DnsDiscover::new(resolver.clone(), "db", 5432, |a| a).interval(Duration::from_secs(10));
    assert_eq!(next(&mut discover).await, "+10.0.0.1:5432");
    // The name moves to another address (a failover, a blue/green
    // switch): a pool fed change by change is never empty in between.
    resolver.answer(&[2]);
    assert_eq!(next(&mut discover).await, "+10.0.0.2:5432");
    assert_eq!(next(&mut discover).await, "-10.0.0.1:5432");
}

#[tokio::test]
async fn the_system_resolver_resolves_localhost() {
    let addrs = SystemResolver.resolve("localhost", 8080).await.unwrap();
    assert!(!addrs.is_empty());
    assert!(addrs
        .iter()
        .all(|a| a.port() == 8080 && a.ip().is_loopback()));
}

/// The events as `+id` and `-id`.
fn changes(events: &Events) -> Vec<String> {
    (events.history().iter())
        .map(|r| match &r.event {
            Event::BackendAdded { backend, .. } => format!("+{backend}"),
            Event::BackendRemoved { backend, .. } => format!("-{backend}"),
            other => format!("{other:?}"),
        })
        .collect()
}

/// The next change of `discover`, as `+id` or `-id`.
async fn next(discover: &mut DnsDiscover<SocketAddr>) -> String {
    use futures::StreamExt;
    use tower::discover::Change;
    match discover.next().await {
        Some(Ok(Change::Insert(id, _))) => format!("+{id}"),
        Some(Ok(Change::Remove(id))) => format!("-{id}"),
        None => unreachable!("the stream never ends"),
    }
}

/// Whether `discover` has no change ready, polled once.
fn idle(discover: &mut DnsDiscover<SocketAddr>) -> bool {
    use futures::{FutureExt, StreamExt};
    discover.next().now_or_never().is_none()
}

/// The events of the changes taken come once the stream, polled again, had
/// no more ready: whoever takes them makes those it took before it waits
/// for more (as `Pool::discover` does), so the events never come before
/// the changes are made. Out of changes, the stream wakes its taker, so a
/// taker of one change at a time has them at once, not at the next answer.
#[tokio::test(start_paused = true)]
async fn the_events_of_the_changes_taken_come_once_the_stream_ran_dry() {
    let resolver = Scripted::default();
    resolver.answer(&[1, 2]);
    let events = Events::default();
    let mut discover = DnsDiscover::new(resolver.clone(), "db", 5432, |a| a)
        .interval(Duration::from_secs(10))
        .events(events.clone());
    assert_eq!(next(&mut discover).await, "+10.0.0.1:5432");
    assert_eq!(next(&mut discover).await, "+10.0.0.2:5432");
    assert!(changes(&events).is_empty());
    struct Woken(std::sync::atomic::AtomicUsize);
    impl futures::task::ArcWake for Woken {
        fn wake_by_ref(woken: &Arc<Self>) {
            woken.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let woken = Arc::new(Woken(Default::default()));
    let waker = futures::task::waker(woken.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    let polled = futures::StreamExt::poll_next_unpin(&mut discover, &mut cx);
    assert!(polled.is_pending(), "waits for the next answer");
    assert_eq!(woken.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        changes(&events).is_empty(),
        "the taker has not made them yet"
    );
    assert!(idle(&mut discover));
    assert_eq!(changes(&events), ["+10.0.0.1:5432", "+10.0.0.2:5432"]);

    resolver.answer(&[3]);
    assert_eq!(next(&mut discover).await, "+10.0.0.3:5432");
    assert_eq!(next(&mut discover).await, "-10.0.0.1:5432");
    assert_eq!(next(&mut discover).await, "-10.0.0.2:5432");
    assert_eq!(changes(&events).len(), 2);
    assert!(idle(&mut discover));
    assert!(idle(&mut discover));
    assert_eq!(
        changes(&events),
        [
            "+10.0.0.1:5432",
            "+10.0.0.2:5432",
            "+10.0.0.3:5432",
            "-10.0.0.1:5432",
            "-10.0.0.2:5432"
        ]
    );
}

/// An answer due while the last one's changes are still being taken waits
/// until its taker has made them (it is polled again, having had no change
/// ready): the next answer is compared with a pool that has them.
#[tokio::test(start_paused = true)]
async fn the_next_answer_waits_until_the_last_ones_changes_are_made() {
    let resolver = Scripted::default();
    resolver.answer(&[1]);
    let mut discover =
        DnsDiscover::new(resolver.clone(), "db", 5432, |a| a).interval(Duration::from_millis(1));
    assert_eq!(next(&mut discover).await, "+10.0.0.1:5432");
    tokio::time::advance(Duration::from_millis(10)).await;
    let asked = || resolver.asked.lock().unwrap().len();
    assert!(idle(&mut discover), "its taker makes the change first");
    assert_eq!(asked(), 1);
    resolver.answer(&[2]);
    assert_eq!(next(&mut discover).await, "+10.0.0.2:5432");
    assert_eq!(asked(), 2);
}

/// Fed to `Pool::discover`, the stream's events never come before the
/// pool has made their change: whenever the stream is polled, each
/// backend's last event agrees with the pool.
#[tokio::test(start_paused = true)]
async fn through_the_pool_an_event_never_comes_before_its_change() {
    use futures::StreamExt;

    let resolver = Scripted::default();
    resolver.answer(&[1, 2]);
    let events = Events::default();
    let pool: Pool<SocketAddr> = Pool::new();
    let mut discover = DnsDiscover::new(resolver.clone(), "db", 5432, |a| a)
        .interval(Duration::from_secs(10))
        .events(events.clone())
        .pool(&pool);
    let checks = Arc::new(Mutex::new(0usize));
    let checked = {
        let (pool, events, checks) = (pool.clone(), events.clone(), checks.clone());
        futures::stream::poll_fn(move |cx| {
            let polled = discover.poll_next_unpin(cx);
            let mut last = std::collections::HashMap::new();
            for change in changes(&events) {
                let (sign, id) = change.split_at(1);
                last.insert(id.to_owned(), sign == "+");
            }
            for (id, added) in last {
                let held = pool.contains(&BackendId::from(id.as_str()));
                assert_eq!(held, added, "{id}: the event came before its change");
            }
            *checks.lock().unwrap() += 1;
            polled
        })
    };
    let task = tokio::spawn({
        let pool = pool.clone();
        async move { pool.discover(checked).await }
    });
    for answer in [&[3][..], &[3, 4, 5], &[1, 5]] {
        tokio::time::sleep(Duration::from_secs(10)).await;
        resolver.answer(answer);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.5:5432"]);
    assert_eq!(changes(&events).len(), 2 + 3 + 2 + 3);
    assert!(*checks.lock().unwrap() >= 8, "checked at every poll");
    assert!(!task.is_finished());
    task.abort();
}

/// One answer's changes, however many, are one change of membership: the
/// balancers rebuild once, and no request sees the pool half way through
/// (a switch of every address never shows an empty pool or a mix).
#[tokio::test(start_paused = true)]
async fn an_answer_is_one_change_of_membership() {
    let resolver = Scripted::default();
    let blue: Vec<u8> = (1..=100).collect();
    let green: Vec<u8> = (101..=200).collect();
    resolver.answer(&blue);
    let events = Events::default();
    let pool: Pool<SocketAddr> = Pool::new();
    let start = pool.snapshot().generation();
    let task = discover_into(&resolver, &pool, &events);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(pool.len(), 100);
    assert_eq!(
        pool.snapshot().generation(),
        start + 1,
        "one change for 100"
    );

    resolver.answer(&green);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let ids = ids(&pool);
    assert_eq!(ids.len(), 100);
    assert!(ids.iter().all(|id| {
        let octet: u8 = id["10.0.0.".len()..id.len() - ":5432".len()]
            .parse()
            .unwrap();
        octet > 100
    }));
    assert_eq!(
        pool.snapshot().generation(),
        start + 2,
        "one change for 200"
    );
    assert_eq!(changes(&events).len(), 300);
    task.abort();
}

/// A stream started over a pool that holds its addresses already (the
/// stream restarted) announces no backend as added.
#[tokio::test(start_paused = true)]
async fn an_address_the_pool_holds_already_is_not_announced_as_added() {
    let resolver = Scripted::default();
    resolver.answer(&[1, 2]);
    let events = Events::default();
    let pool: Pool<SocketAddr> = Pool::new();
    pool.insert("10.0.0.1:5432", SocketAddr::from(([10, 0, 0, 1], 5432)));
    let task = discover_into(&resolver, &pool, &events);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.2:5432"]);
    assert_eq!(changes(&events), ["+10.0.0.2:5432"]);
    task.abort();
}

/// An address DNS drops from a group of a control handle is gone from
/// every group, though its pool keeps its state for a while in case it
/// returns: its last change is taken for removed, and so forgotten in
/// time, not kept for good (DNS churn would fill the map).
#[tokio::test(start_paused = true)]
async fn an_address_dns_drops_from_a_handles_group_is_taken_for_removed() {
    let (resolver, events, pool, handle, task) = handle_over_discovery().await;
    let two: BackendId = "10.0.0.2:5432".into();
    assert!(events.last_change(&two).is_some());
    resolver.answer(&[1]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432"]);
    assert!(handle.backend_stats(&two).is_ok(), "its state is kept");
    assert_eq!(events.last_change(&two), None);
    task.abort();
}

/// A pool that discovery fills with the addresses 1 and 2, the group
/// `db` of a control handle; with the resolver, the events, the handle and
/// the discovery's task.
async fn handle_over_discovery() -> (
    Scripted,
    Events,
    Pool<SocketAddr>,
    tower_ha::control::Handle,
    tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
) {
    use tower_ha::balance::{Balance, RoundRobin};

    let resolver = Scripted::default();
    resolver.answer(&[1, 2]);
    let events = Events::default();
    let pool: Pool<SocketAddr> = Pool::new();
    let handle = tower_ha::control::Handle::new(events.clone());
    handle
        .add_group("db", &Balance::new(pool.clone(), RoundRobin::new()))
        .unwrap();
    let task = discover_into(&resolver, &pool, &events);
    tokio::time::sleep(Duration::from_millis(1)).await;
    (resolver, events, pool, handle, task)
}

/// Spawns discovery into `pool` with a 10 s interval; returns the task.
fn discover_into(
    resolver: &Scripted,
    pool: &Pool<SocketAddr>,
    events: &Events,
) -> tokio::task::JoinHandle<Result<(), std::convert::Infallible>> {
    let discover = DnsDiscover::new(resolver.clone(), "db.default.svc", 5432, |a| a)
        .interval(Duration::from_secs(10))
        .events(events.clone())
        .pool(pool);
    let pool = pool.clone();
    tokio::spawn(async move { pool.discover(discover).await })
}

/// An address removed from the pool by an operator while DNS still lists
/// it comes back with the next answer, as a new backend; one DNS drops
/// after that is not removed twice.
#[tokio::test(start_paused = true)]
async fn a_listed_address_removed_from_the_pool_comes_back() {
    let (resolver, events, pool, handle, task) = handle_over_discovery().await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.2:5432"]);

    let two: BackendId = "10.0.0.2:5432".into();
    let old_state = pool.state(&two).unwrap();
    handle.remove_backend("db", &two).unwrap();
    assert_eq!(ids(&pool), ["10.0.0.1:5432"]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.2:5432"]);
    assert!(
        !std::sync::Arc::ptr_eq(&old_state, &pool.state(&two).unwrap()),
        "a new backend"
    );
    // Unchanged answers change nothing more.
    let generation = pool.snapshot().generation();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(pool.snapshot().generation(), generation);

    // Removed again, then dropped by DNS: nothing left to remove.
    handle.remove_backend("db", &two).unwrap();
    resolver.answer(&[1]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432"]);

    let changes: Vec<String> = events
        .history()
        .iter()
        .map(|r| match &r.event {
            Event::BackendAdded {
                group: None,
                backend,
            } => format!("+{backend}"),
            Event::BackendRemoved {
                group: None,
                backend,
                ..
            } => format!("-{backend}"),
            Event::BackendRemoved {
                group: Some(_),
                backend,
                ..
            } => format!("operator -{backend}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        changes,
        [
            "+10.0.0.1:5432",
            "+10.0.0.2:5432",
            "operator -10.0.0.2:5432",
            "+10.0.0.2:5432",
            "operator -10.0.0.2:5432",
        ]
    );
    task.abort();
}

/// An address missing from one answer comes back with the state it had:
/// its operator's status, its limit and its request still in flight. One
/// that stays away longer than the pool keeps removed states returns as a
/// new backend.
#[tokio::test(start_paused = true)]
async fn an_address_missing_from_one_answer_comes_back_as_it_was() {
    use tower_ha::pool::DEFAULT_KEEP_REMOVED_FOR;
    use tower_ha::AdminStatus;

    let resolver = Scripted::default();
    resolver.answer(&[1, 2]);
    let events = Events::default();
    let pool: Pool<SocketAddr> = Pool::new();
    let task = discover_into(&resolver, &pool, &events);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let two: BackendId = "10.0.0.2:5432".into();
    let state = pool.state(&two).unwrap();
    state.set_admin(AdminStatus::Disabled);
    state.set_max_in_flight(Some(3));
    let held = state.track_in_flight();

    resolver.answer(&[1]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432"]);
    resolver.answer(&[1, 2]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.2:5432"]);
    let back = pool.state(&two).unwrap();
    assert!(Arc::ptr_eq(&back, &state), "a new backend");
    assert_eq!(back.admin(), AdminStatus::Disabled);
    assert_eq!(back.max_in_flight(), Some(3));
    assert_eq!(back.in_flight(), 1);
    drop(held);
    assert_eq!(back.in_flight(), 0);

    // Away for longer than the pool keeps its state: a new backend.
    resolver.answer(&[1]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432"]);
    tokio::time::sleep(DEFAULT_KEEP_REMOVED_FOR).await;
    resolver.answer(&[1, 2]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.2:5432"]);
    let fresh = pool.state(&two).unwrap();
    assert!(!Arc::ptr_eq(&fresh, &state), "the old state");
    assert_eq!(fresh.admin(), AdminStatus::Enabled);
    assert_eq!(fresh.max_in_flight(), None);
    task.abort();
}

/// A backend the health checker removed after `removed_after` returns with
/// the next answer that still lists it (a pod restarted on the same IP),
/// and the checker probes it again: it is probed once more, and a failed
/// probe makes it unhealthy.
#[tokio::test(start_paused = true)]
async fn a_backend_removed_by_the_health_checker_returns_while_listed() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower_ha::health::{probe_fn, HealthChecker};
    use tower_ha::HealthStatus;

    let resolver = Scripted::default();
    resolver.answer(&[1, 2]);
    let events = Events::default();
    let pool: Pool<SocketAddr> = Pool::new();
    let task = discover_into(&resolver, &pool, &events);
    tokio::time::sleep(Duration::from_millis(1)).await;

    // 10.0.0.2 passes its first probe, then fails until it restarts.
    // Probes are counted per address.
    let two_addr = SocketAddr::from(([10, 0, 0, 2], 5432));
    let two_up = Arc::new(AtomicBool::new(true));
    let probes: Arc<Mutex<HashMap<SocketAddr, usize>>> = Arc::default();
    let probes_of = |addr: SocketAddr| probes.lock().unwrap().get(&addr).copied().unwrap_or(0);
    let probe = probe_fn({
        let two_up = two_up.clone();
        let probes = probes.clone();
        move |_id: &BackendId, addr: &SocketAddr| {
            *probes.lock().unwrap().entry(*addr).or_default() += 1;
            let up = *addr != two_addr || two_up.load(Ordering::SeqCst);
            async move {
                if up {
                    Ok(())
                } else {
                    Err::<(), tower_ha::BoxError>("refused".into())
                }
            }
        }
    });
    let checker = HealthChecker::new(pool.clone(), probe)
        .interval(Duration::from_secs(1))
        .jitter(Duration::ZERO)
        .fall(1)
        .removed_after(Duration::from_secs(3))
        .spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    two_up.store(false, Ordering::SeqCst);
    // Unhealthy at 1 s, removed at 4 s.
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432"]);
    // Removed, it is probed no more (before DNS lists it again at 10 s).
    let while_removed = probes_of(two_addr);
    assert!(while_removed > 0);
    tokio::time::sleep(Duration::from_millis(5_000)).await; // 9.5 s
    assert_eq!(
        probes_of(two_addr),
        while_removed,
        "a removed backend is not probed"
    );

    // The pod restarts on the same IP; DNS still lists it.
    two_up.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await; // 10.1 s
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.2:5432"]);
    let two = pool.state(&"10.0.0.2:5432".into()).unwrap();
    assert_eq!(two.health(), HealthStatus::Healthy);

    // The checker probes the returned backend again: once more within an
    // interval, and a failed probe (fall 1) makes it unhealthy.
    tokio::time::sleep(Duration::from_millis(1_000)).await; // 11.1 s
    let returned = probes_of(two_addr);
    assert!(
        returned > while_removed,
        "the returned backend was not probed ({returned} probes in all)"
    );
    assert_eq!(two.health(), HealthStatus::Healthy);
    two_up.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_000)).await; // 12.1 s
    assert!(probes_of(two_addr) > returned);
    assert_eq!(
        two.health(),
        HealthStatus::Unhealthy,
        "its failed probe counted"
    );
    assert_eq!(ids(&pool), ["10.0.0.1:5432", "10.0.0.2:5432"]);
    checker.shutdown().await;
    task.abort();
}

/// Never answers its second question; answers `10.0.0.{n}` to the n-th
/// otherwise.
#[derive(Clone, Default)]
struct HangsOnce {
    asked: Arc<Mutex<u8>>,
}

impl Resolver for HangsOnce {
    fn resolve(&self, _host: &str, port: u16) -> ResolveFuture {
        let n = {
            let mut asked = self.asked.lock().unwrap();
            *asked += 1;
            *asked
        };
        Box::pin(async move {
            if n == 2 {
                std::future::pending::<()>().await;
            }
            Ok(vec![SocketAddr::from(([10, 0, 0, n], port))])
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_resolution_that_never_answers_times_out_and_the_next_one_runs() {
    let resolver = HangsOnce::default();
    let pool: Pool<SocketAddr> = Pool::new();
    let discover = DnsDiscover::new(resolver.clone(), "db", 5432, |a| a)
        .interval(Duration::from_secs(10))
        .timeout(Duration::from_secs(2));
    let task = tokio::spawn({
        let pool = pool.clone();
        async move { pool.discover(discover).await }
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(ids(&pool), ["10.0.0.1:5432"]);
    // The second question hangs from 10 s, fails at 12 s (keeping the
    // pool); the third, at 22 s, is answered.
    tokio::time::sleep(Duration::from_secs(21)).await;
    assert_eq!(*resolver.asked.lock().unwrap(), 2);
    assert_eq!(ids(&pool), ["10.0.0.1:5432"]);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(*resolver.asked.lock().unwrap(), 3);
    assert_eq!(ids(&pool), ["10.0.0.3:5432"]);
    task.abort();
}
