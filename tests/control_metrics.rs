//! The `metrics` feature: stats published through the facade.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use tower::{service_fn, ServiceExt};
use tower_ha::balance::{Balance, Priority, RoundRobin};
use tower_ha::control::{Events, Handle};
use tower_ha::failover::FailoverLayer;
use tower_ha::sticky::{SessionKey, StickyLayer};
use tower_ha::{AdminStatus, HealthStatus, Pool};

/// Records the last value of every metric, by name and sorted labels, and
/// the help text of each name described.
#[derive(Default, Clone)]
struct Last(Arc<Mutex<BTreeMap<String, f64>>>, Arc<Mutex<Described>>);

/// By metric name, its unit and help text.
type Described = BTreeMap<String, (Option<Unit>, String)>;

impl Last {
    /// Publishes `handle`'s metrics to this recorder.
    fn publish(&self, handle: &Handle) {
        metrics::with_local_recorder(self, || handle.publish_metrics());
    }

    /// The last value of metric `key` (name and sorted labels).
    fn get(&self, key: &str) -> Option<f64> {
        self.0.lock().unwrap().get(key).copied()
    }
}

struct Slot(String, Last);

impl CounterFn for Slot {
    fn increment(&self, value: u64) {
        *self.1 .0.lock().unwrap().entry(self.0.clone()).or_default() += value as f64;
    }
    /// At least `value`, as the facade's contract and its exporters have it.
    fn absolute(&self, value: u64) {
        let mut last = self.1 .0.lock().unwrap();
        let slot = last.entry(self.0.clone()).or_default();
        *slot = slot.max(value as f64);
    }
}

impl GaugeFn for Slot {
    fn increment(&self, value: f64) {
        *self.1 .0.lock().unwrap().entry(self.0.clone()).or_default() += value;
    }
    fn decrement(&self, value: f64) {
        *self.1 .0.lock().unwrap().entry(self.0.clone()).or_default() -= value;
    }
    fn set(&self, value: f64) {
        self.1 .0.lock().unwrap().insert(self.0.clone(), value);
    }
}

fn name(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Recorder for Last {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
        let described = (unit, help.into_owned());
        self.1
            .lock()
            .unwrap()
            .insert(key.as_str().to_owned(), described);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
        self.describe_counter(key, unit, help);
    }
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(Slot(name(key), self.clone())))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::new(Slot(name(key), self.clone())))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Sends `n` requests through `balance`, each answered.
async fn send<S>(balance: &S, n: usize)
where
    S: tower::Service<Request<()>> + Clone,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        balance.clone().oneshot(Request::new(())).await.unwrap();
    }
}

type Svc = tower::util::BoxCloneSyncService<Request<()>, Response<&'static str>, Infallible>;

/// A backend that answers `name`.
fn answering(name: &'static str) -> Svc {
    Svc::new(service_fn(move |_req: Request<()>| async move {
        Ok(Response::new(name))
    }))
}

/// The requests counter of backend `a` in group `web`.
const A_REQUESTS: &str = "tower_ha_backend_requests_total{backend=a,group=web}";

/// Backend `a` alone in group `web`, balanced round robin, of a new handle.
fn a_alone_in_web() -> (Pool<Svc>, Balance<Svc, RoundRobin>, Handle) {
    let pool = Pool::new();
    pool.insert("a", answering("a"));
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    let handle = Handle::new(Events::default());
    handle.add_group("web", &balance).unwrap();
    (pool, balance, handle)
}

/// Counts the calls on each counter, by name and sorted labels.
#[derive(Default, Clone)]
struct Touches(Arc<Mutex<BTreeMap<String, usize>>>);

struct Touched(String, Touches);

impl CounterFn for Touched {
    fn increment(&self, _: u64) {
        *self.1 .0.lock().unwrap().entry(self.0.clone()).or_default() += 1;
    }
    fn absolute(&self, _: u64) {
        self.increment(0);
    }
}

impl Recorder for Touches {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(Touched(name(key), self.clone())))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Each publication touches the counters of a backend still there, those
/// that did not change included (an exporter with an idle timeout would
/// drop them otherwise), and no longer those of a departed backend.
#[tokio::test]
async fn unchanged_counters_are_touched_and_departed_ones_are_not() {
    let (pool, balance, handle) = a_alone_in_web();
    pool.insert("b", answering("b"));
    send(&balance, 2).await;
    let touches = Touches::default();
    let publish = || metrics::with_local_recorder(&touches, || handle.publish_metrics());
    let of = |key: &str| touches.0.lock().unwrap().get(key).copied();
    const A_FAILURES: &str = "tower_ha_backend_failures_total{backend=a,group=web}";
    publish();
    publish();
    assert_eq!((of(A_REQUESTS), of(A_FAILURES)), (Some(2), Some(2)));
    pool.remove(&"a".into());
    publish();
    assert_eq!((of(A_REQUESTS), of(A_FAILURES)), (Some(2), Some(2)));
    let b_requests = "tower_ha_backend_requests_total{backend=b,group=web}";
    assert_eq!(of(b_requests), Some(3));
}

#[tokio::test(start_paused = true)]
async fn stats_are_published_through_the_metrics_facade() {
    let pool = Pool::new();
    for name in ["p", "b"] {
        pool.insert(
            name,
            service_fn(move |_req: Request<()>| async move {
                Ok::<_, std::convert::Infallible>(Response::new(name))
            }),
        );
    }
    let balance = Balance::new(pool.clone(), Priority::new("db", ["p", "b"]));
    let handle = Handle::new(Events::default());
    handle.add_group("db", &balance).unwrap();
    for _ in 0..3 {
        balance.clone().oneshot(Request::new(())).await.unwrap();
    }
    pool.state(&"p".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);
    balance.clone().oneshot(Request::new(())).await.unwrap();
    tokio::time::advance(std::time::Duration::from_secs(2)).await;
    pool.state(&"b".into()).unwrap().set_max_in_flight(Some(64));

    let recorder = Last::default();
    recorder.publish(&handle);
    let last = recorder.0.lock().unwrap().clone();
    let get = |k: &str| {
        last.get(k)
            .copied()
            .unwrap_or_else(|| panic!("{k} missing: {last:?}"))
    };
    assert_eq!(
        get("tower_ha_backend_requests_total{backend=p,group=db}"),
        3.0
    );
    assert_eq!(
        get("tower_ha_backend_requests_total{backend=b,group=db}"),
        1.0
    );
    assert_eq!(get("tower_ha_backend_in_flight{backend=p,group=db}"), 0.0);
    assert_eq!(
        get("tower_ha_backend_ejections_refused_total{backend=p,group=db}"),
        0.0
    );
    assert_eq!(
        get("tower_ha_backend_max_in_flight{backend=b,group=db}"),
        64.0
    );
    assert_eq!(
        get("tower_ha_backend_max_in_flight{backend=p,group=db}"),
        0.0,
        "no limit"
    );
    assert_eq!(get("tower_ha_backend_healthy{backend=p,group=db}"), 0.0);
    assert_eq!(get("tower_ha_backend_healthy{backend=b,group=db}"), 1.0);
    assert_eq!(get("tower_ha_group_primary{backend=b,group=db}"), 1.0);
    assert_eq!(get("tower_ha_group_primary{backend=p,group=db}"), 0.0);
    assert_eq!(get("tower_ha_group_failovers_total{group=db}"), 1.0);
    assert_eq!(get("tower_ha_group_seconds_since_failover{group=db}"), 2.0);
    assert_eq!(get("tower_ha_group_healthy_backends{group=db}"), 1.0);
    assert_eq!(get("tower_ha_group_failed_backends{group=db}"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn an_active_passive_group_without_an_order_publishes_its_primary() {
    let pool = Pool::new();
    for name in ["x", "y"] {
        pool.insert(
            name,
            service_fn(move |_req: Request<()>| async move {
                Ok::<_, std::convert::Infallible>(Response::new(name))
            }),
        );
    }
    let balance = Balance::new(pool, Priority::new("db", Vec::<&str>::new()));
    let handle = Handle::new(Events::default());
    handle.add_group("db", &balance).unwrap();
    let served = balance.clone().oneshot(Request::new(())).await.unwrap();
    let primary = *served.body();
    let other = if primary == "x" { "y" } else { "x" };

    let recorder = Last::default();
    recorder.publish(&handle);
    let last = recorder.0.lock().unwrap().clone();
    let gauge = |b: &str| {
        last.get(&format!("tower_ha_group_primary{{backend={b},group=db}}"))
            .copied()
    };
    assert_eq!(gauge(primary), Some(1.0), "{last:?}");
    assert_eq!(gauge(other), Some(0.0), "{last:?}");

    // Removed from the handle: its gauges, and its backends', go to 0.
    handle.remove_group("db").unwrap();
    recorder.publish(&handle);
    let last = recorder.0.lock().unwrap().clone();
    let get = |k: &str| last.get(k).copied();
    assert_eq!(get("tower_ha_group_healthy_backends{group=db}"), Some(0.0));
    assert_eq!(
        get(&format!(
            "tower_ha_group_primary{{backend={primary},group=db}}"
        )),
        Some(0.0)
    );
    assert_eq!(
        get(&format!(
            "tower_ha_backend_available{{backend={primary},group=db}}"
        )),
        Some(0.0)
    );
}

#[tokio::test(start_paused = true)]
async fn the_metrics_task_stops_when_the_handle_is_gone() {
    let handle = Handle::new(Events::default());
    let task = handle.spawn_metrics(std::time::Duration::from_secs(1));
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert!(!task.is_finished());
    drop(handle);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    tokio::task::yield_now().await;
    assert!(task.is_finished());
}

/// Setting the drain deadline after the metrics task was spawned keeps
/// the task publishing: the setting is the handle's, not a new handle.
#[tokio::test(start_paused = true)]
async fn the_metrics_task_outlives_a_drain_deadline_set_after_it() {
    let handle = Handle::new(Events::default());
    let task = handle.spawn_metrics(std::time::Duration::from_secs(1));
    let handle = handle.drain_deadline(Some(std::time::Duration::from_secs(5)));
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    assert!(!task.is_finished());
    assert!(format!("{handle:?}").contains("drain_deadline: Some(5s)"));
    drop(handle);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    tokio::task::yield_now().await;
    assert!(task.is_finished());
}

#[tokio::test(start_paused = true)]
async fn the_metrics_task_stops_with_the_handle_while_a_drain_is_pending() {
    let pool = Pool::new();
    pool.insert("a", ());
    pool.insert("b", ());
    let handle = Handle::new(Events::default()); // drains last 30 s
    handle.add_pool("web", pool.clone(), None).unwrap();
    let task = handle.spawn_metrics(std::time::Duration::from_secs(1));
    handle.drain(&"a".into()).unwrap();
    drop(handle);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    tokio::task::yield_now().await;
    assert!(task.is_finished(), "no clone of the handle is left");
    // The drain's deadline still holds.
    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    assert_eq!(
        pool.state(&"a".into()).unwrap().admin(),
        tower_ha::AdminStatus::Disabled
    );
}

/// A request picked and then dropped before its backend was called (its
/// client gone) is taken back from the backend's count: the published
/// counter does not take that for a new state and add the whole count again.
#[tokio::test]
async fn a_request_taken_back_does_not_inflate_the_requests_counter() {
    use tower::Service;
    let (pool, balance, handle) = a_alone_in_web();
    let recorder = Last::default();
    send(&balance, 100).await;
    recorder.publish(&handle);
    assert_eq!(recorder.get(A_REQUESTS), Some(100.0));
    let picked = balance.clone().call(Request::new(()));
    recorder.publish(&handle);
    assert_eq!(recorder.get(A_REQUESTS), Some(101.0));
    drop(picked);
    assert_eq!(pool.state(&"a".into()).unwrap().requests(), 100);
    recorder.publish(&handle);
    assert_eq!(
        recorder.get(A_REQUESTS),
        Some(101.0),
        "never back, never doubled"
    );
    // Counting goes on from the highest count published.
    send(&balance, 3).await;
    recorder.publish(&handle);
    assert_eq!(recorder.get(A_REQUESTS), Some(103.0));
}

#[tokio::test(start_paused = true)]
async fn counters_never_go_back_and_a_removed_backends_gauges_go_to_zero() {
    let backend = |name: &'static str| {
        service_fn(move |_req: Request<()>| async move {
            Ok::<_, std::convert::Infallible>(Response::new(name))
        })
    };
    let pool = Pool::new();
    pool.insert("a", backend("a"));
    pool.insert("b", backend("b"));
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    let handle = Handle::new(Events::default());
    handle.add_group("web", &balance).unwrap();
    let recorder = Last::default();
    let a_requests = "tower_ha_backend_requests_total{backend=a,group=web}";

    send(&balance, 6).await;
    recorder.publish(&handle);
    assert_eq!(recorder.get(a_requests), Some(3.0));
    send(&balance, 2).await;
    recorder.publish(&handle);
    assert_eq!(recorder.get(a_requests), Some(4.0));

    // Removed and added again: its state, and its counts, start afresh.
    pool.remove(&"a".into());
    pool.insert("a", backend("a"));
    send(&balance, 4).await;
    let fresh = pool.state(&"a".into()).unwrap().requests();
    assert!(fresh > 0 && fresh < 4);
    recorder.publish(&handle);
    assert_eq!(
        recorder.get(a_requests),
        Some(4.0 + fresh as f64),
        "still counting up"
    );

    // Gone from the group, with a request in flight: its gauges go to 0.
    let b = pool.state(&"b".into()).unwrap();
    let _in_flight = b.track_in_flight();
    recorder.publish(&handle);
    assert_eq!(
        recorder.get("tower_ha_backend_in_flight{backend=b,group=web}"),
        Some(1.0)
    );
    assert_eq!(
        recorder.get("tower_ha_backend_available{backend=b,group=web}"),
        Some(1.0)
    );
    pool.remove(&"b".into());
    recorder.publish(&handle);
    assert_eq!(
        recorder.get("tower_ha_backend_in_flight{backend=b,group=web}"),
        Some(0.0)
    );
    assert_eq!(
        recorder.get("tower_ha_backend_available{backend=b,group=web}"),
        Some(0.0)
    );
    assert_eq!(
        recorder.get("tower_ha_backend_healthy{backend=b,group=web}"),
        Some(0.0)
    );

    // Back after a publication without it: its counter goes on up.
    let b_requests = "tower_ha_backend_requests_total{backend=b,group=web}";
    let before = recorder.get(b_requests).unwrap();
    recorder.publish(&handle);
    pool.insert("b", backend("b"));
    send(&balance, 4).await;
    let fresh = pool.state(&"b".into()).unwrap().requests();
    assert!(fresh > 0 && (fresh as f64) < before);
    recorder.publish(&handle);
    assert_eq!(recorder.get(b_requests), Some(before + fresh as f64));
    assert_eq!(
        recorder.get("tower_ha_backend_available{backend=b,group=web}"),
        Some(1.0)
    );
}

/// What was published of a backend gone for an hour is forgotten: backends
/// that come and go under new ids use no memory for good. One back after
/// that, with a new state, adds its counts.
#[tokio::test(start_paused = true)]
async fn a_backend_gone_for_an_hour_is_forgotten() {
    let (pool, balance, handle) = a_alone_in_web();
    let recorder = Last::default();
    let gone_for = |gone: Duration| {
        let (pool, recorder, handle) = (pool.clone(), &recorder, &handle);
        async move {
            pool.remove(&"a".into());
            recorder.publish(handle);
            tokio::time::advance(gone).await;
            recorder.publish(handle);
            pool.insert("a", answering("a"));
        }
    };
    send(&balance, 5).await;
    recorder.publish(&handle);
    assert_eq!(recorder.get(A_REQUESTS), Some(5.0));

    // Gone for a little less than an hour: remembered.
    gone_for(Duration::from_secs(3599)).await;
    send(&balance, 2).await;
    recorder.publish(&handle);
    assert_eq!(recorder.get(A_REQUESTS), Some(7.0), "still counting up");

    // Gone for an hour: forgotten. It comes back with a new state, which
    // no other handle can have published: its counts are added.
    gone_for(Duration::from_secs(3600)).await;
    send(&balance, 3).await;
    recorder.publish(&handle);
    assert_eq!(recorder.get(A_REQUESTS), Some(10.0), "still counting up");
}

/// Counts the publications of the groups: the sets of their
/// `tower_ha_group_healthy_backends` gauge.
#[derive(Default, Clone)]
struct Publications {
    count: Arc<AtomicUsize>,
    /// Panics at the first publication (counted), as an exporter that is
    /// not ready would.
    panics_first: bool,
}

impl GaugeFn for Publications {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, _: f64) {
        let first = self.count.fetch_add(1, Ordering::SeqCst) == 0;
        assert!(!(first && self.panics_first), "the exporter is not ready");
    }
}

impl Recorder for Publications {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        if key.name() == "tower_ha_group_healthy_backends" {
            Gauge::from_arc(Arc::new(self.clone()))
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test(start_paused = true)]
async fn a_zero_interval_publishes_every_millisecond_instead_of_panicking() {
    let handle = Handle::new(Events::default());
    let pool = Pool::new();
    pool.insert("a", ());
    handle.add_pool("g", pool, None).unwrap();
    // The task runs on this thread (a current-thread runtime), so it
    // publishes to this thread's recorder.
    let publications = Publications::default();
    let _recorder = metrics::set_default_local_recorder(&publications);
    let task = handle.spawn_metrics(std::time::Duration::ZERO);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!task.is_finished(), "still publishing");
    task.abort();
    // At once, then every millisecond (the last one may or may not have
    // run when the sleep ended).
    let published = publications.count.load(Ordering::SeqCst);
    assert!((100..=101).contains(&published), "{published} publications");
}

#[tokio::test(start_paused = true)]
async fn a_recorder_that_panics_loses_one_tick_not_the_task() {
    let handle = Handle::new(Events::default());
    let pool = Pool::new();
    pool.insert("a", ());
    handle.add_pool("g", pool, None).unwrap();
    let recorder = Publications {
        panics_first: true,
        ..Publications::default()
    };
    let _recorder = metrics::set_default_local_recorder(&recorder);
    let task = handle.spawn_metrics(std::time::Duration::from_secs(1));
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    assert!(!task.is_finished(), "still publishing");
    task.abort();
    // The one that panicked (at once), then at 1, 2 and 3 s.
    assert_eq!(recorder.count.load(Ordering::SeqCst), 4);
}

/// Active-passive group "db": primary "p", backup "b".
fn db() -> (Pool<Svc>, Balance<Svc, Priority>) {
    let pool = Pool::new();
    for name in ["p", "b"] {
        pool.insert(name, answering(name));
    }
    let balance = Balance::new(pool.clone(), Priority::new("db", ["p", "b"]));
    (pool, balance)
}

/// "p" fails and the next request fails over to "b".
async fn fail_over(pool: &Pool<Svc>, balance: &Balance<Svc, Priority>) {
    pool.state(&"p".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);
    let served = balance.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(*served.body(), "b");
}

#[tokio::test(start_paused = true)]
async fn a_removed_group_keeps_its_time_since_the_last_failover() {
    let handle = Handle::new(Events::default());
    let recorder = Last::default();
    let since = "tower_ha_group_seconds_since_failover{group=db}";
    let (pool, balance) = db();
    handle.add_group("db", &balance).unwrap();
    fail_over(&pool, &balance).await;
    tokio::time::advance(Duration::from_secs(5)).await;
    recorder.publish(&handle);
    assert_eq!(recorder.get(since), Some(5.0));

    // 0 would read as a failover just now.
    handle.remove_group("db").unwrap();
    recorder.publish(&handle);
    assert_eq!(recorder.get(since), Some(5.0));
    assert_eq!(
        recorder.get("tower_ha_group_healthy_backends{group=db}"),
        Some(0.0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_group_registered_again_keeps_its_failover_counter_going_up() {
    let handle = Handle::new(Events::default());
    let recorder = Last::default();
    let failovers = "tower_ha_group_failovers_total{group=db}";
    let (pool, balance) = db();
    handle.add_group("db", &balance).unwrap();
    fail_over(&pool, &balance).await;
    recorder.publish(&handle);
    assert_eq!(recorder.get(failovers), Some(1.0));

    // Rebuilt (a configuration reload) and registered again: its new
    // count starts from zero, the published counter goes on from 1.
    handle.remove_group("db").unwrap();
    recorder.publish(&handle);
    let (pool, balance) = db();
    handle.add_group("db", &balance).unwrap();
    recorder.publish(&handle);
    assert_eq!(recorder.get(failovers), Some(1.0));
    fail_over(&pool, &balance).await;
    assert_eq!(handle.group_stats("db").unwrap().failovers, 1);
    recorder.publish(&handle);
    assert_eq!(recorder.get(failovers), Some(2.0));

    // The same group registered again counts on from its own count.
    handle.remove_group("db").unwrap();
    handle.add_group("db", &balance).unwrap();
    pool.state(&"p".into())
        .unwrap()
        .set_health(HealthStatus::Healthy);
    handle.force_primary("db", &"p".into()).unwrap();
    fail_over(&pool, &balance).await;
    assert_eq!(handle.group_stats("db").unwrap().failovers, 2);
    recorder.publish(&handle);
    assert_eq!(recorder.get(failovers), Some(3.0));
}

#[tokio::test(start_paused = true)]
async fn a_group_registered_again_in_normal_mode_has_no_primary() {
    let handle = Handle::new(Events::default());
    let recorder = Last::default();
    let primary = "tower_ha_group_primary{backend=p,group=db}";
    let (pool, balance) = db();
    handle.add_group("db", &balance).unwrap();
    recorder.publish(&handle);
    assert_eq!(recorder.get(primary), Some(1.0));

    // Rebuilt as a normal group over the same backends between two
    // publications (a configuration reload).
    handle.remove_group("db").unwrap();
    handle
        .add_group("db", &Balance::new(pool, RoundRobin::new()))
        .unwrap();
    recorder.publish(&handle);
    assert_eq!(recorder.get(primary), Some(0.0));
    assert_eq!(
        recorder.get("tower_ha_backend_available{backend=p,group=db}"),
        Some(1.0)
    );
}

/// A stack over "a" (503) and "b" (200), keyed by `X-Session`: each new
/// session fails over from "a" to "b".
fn edge(
    failover: &FailoverLayer,
    sticky: &StickyLayer,
    pool: &Pool<Svc>,
) -> impl tower::Service<
    Request<()>,
    Response = Response<&'static str>,
    Error = tower_ha::BoxError,
    Future: Send,
> + Clone {
    tower::ServiceBuilder::new()
        .layer(sticky.clone())
        .layer(failover.clone())
        // "a" first, whenever it is available.
        .layer(tower_ha::balance::BalanceLayer::new(Priority::new(
            "edge",
            ["a", "b"],
        )))
        .service(pool.clone())
}

fn failing_then_working() -> Pool<Svc> {
    let pool = Pool::new();
    for (name, code) in [("a", 503), ("b", 200)] {
        pool.insert(
            name,
            tower::util::BoxCloneSyncService::new(service_fn(
                move |_req: Request<()>| async move {
                    let mut response = Response::new(name);
                    *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
                    Ok::<_, Infallible>(response)
                },
            )),
        );
    }
    pool
}

async fn new_session<S>(service: &S, key: &str)
where
    S: tower::Service<Request<()>, Response = Response<&'static str>> + Clone,
    S::Error: std::fmt::Debug,
{
    let request = Request::builder()
        .header("x-session", key)
        .body(())
        .unwrap();
    let response = service.clone().oneshot(request).await.unwrap();
    assert_eq!(*response.body(), "b");
}

/// The pool of `failing_then_working`, and a failover and a sticky layer
/// (keyed by `X-Session`) registered with `handle` as "edge".
fn edge_layers(handle: &Handle) -> (Pool<Svc>, FailoverLayer, StickyLayer) {
    let pool = failing_then_working();
    let failover = FailoverLayer::new().no_budget();
    let sticky = StickyLayer::new(&pool, SessionKey::header("x-session"));
    handle.add_failover("edge", &failover);
    handle.add_sticky("edge", &sticky);
    (pool, failover, sticky)
}

/// Every metric published has its help text (a counter's unit a count,
/// the time since a failover's seconds), given at the first publication.
#[tokio::test]
async fn every_metric_published_is_described() {
    let last = Last::default();
    let handle = Handle::new(Events::default());
    let (pool, failover, sticky) = edge_layers(&handle);
    let balance = Balance::new(pool.clone(), Priority::new("edge", ["a", "b"]));
    handle.add_group("edge", &balance).unwrap();
    pool.state(&"a".into()).unwrap().set_max_in_flight(Some(5));
    let service = tower::ServiceBuilder::new()
        .layer(sticky.clone())
        .layer(failover.clone())
        .service(balance);
    new_session(&service, "s1").await;
    // A failover of the group, for its time since.
    handle.disable(&"a".into()).unwrap();
    new_session(&service, "s2").await;
    last.publish(&handle);
    let names: std::collections::BTreeSet<String> = last
        .0
        .lock()
        .unwrap()
        .keys()
        .map(|key| key.split('{').next().unwrap().to_owned())
        .collect();
    let described = last.1.lock().unwrap().clone();
    assert_eq!(names.len(), 34, "{names:?}");
    for name in &names {
        let Some((unit, help)) = described.get(name) else {
            panic!("{name} is not described");
        };
        assert!(!help.is_empty(), "{name}");
        let expected = if name.ends_with("_total") {
            Some(Unit::Count)
        } else if name.contains("seconds") {
            Some(Unit::Seconds)
        } else {
            None
        };
        assert_eq!(*unit, expected, "{name}");
    }
    assert_eq!(described.len(), names.len());
}

#[tokio::test]
async fn the_counters_of_registered_layers_are_published() {
    let last = Last::default();
    let handle = Handle::new(Events::default());
    let (pool, failover, sticky) = edge_layers(&handle);
    let service = edge(&failover, &sticky, &pool);
    new_session(&service, "s1").await;
    new_session(&service, "s2").await;
    last.publish(&handle);
    assert_eq!(
        last.get("tower_ha_failover_retries_total{layer=edge}"),
        Some(2.0)
    );
    assert_eq!(
        last.get("tower_ha_failover_recovered_total{layer=edge}"),
        Some(2.0)
    );
    assert_eq!(
        last.get("tower_ha_failover_exhausted_total{layer=edge}"),
        Some(0.0)
    );
    assert_eq!(
        last.get("tower_ha_sticky_created_total{layer=edge}"),
        Some(2.0)
    );
    assert_eq!(last.get("tower_ha_sticky_sessions{layer=edge}"), Some(2.0));

    // Another failover layer under the same name, with three retries of
    // its own by the next publication: the counter adds them all (it
    // reads 5, not 3 as if the new layer's count went on from the old
    // one's 2), and goes on from there.
    let again = FailoverLayer::new().no_budget();
    handle.add_failover("edge", &again);
    for key in ["s3", "s4", "s5"] {
        new_session(&edge(&again, &sticky, &pool), key).await;
    }
    last.publish(&handle);
    assert_eq!(
        last.get("tower_ha_failover_retries_total{layer=edge}"),
        Some(5.0)
    );
    new_session(&edge(&again, &sticky, &pool), "s6").await;
    last.publish(&handle);
    assert_eq!(
        last.get("tower_ha_failover_retries_total{layer=edge}"),
        Some(6.0)
    );
    assert_eq!(last.get("tower_ha_sticky_sessions{layer=edge}"), Some(6.0));

    // The sticky layer and its services gone: its gauge goes to zero, and
    // its counters stay.
    drop((service, sticky));
    last.publish(&handle);
    assert_eq!(last.get("tower_ha_sticky_sessions{layer=edge}"), Some(0.0));
    assert_eq!(
        last.get("tower_ha_sticky_created_total{layer=edge}"),
        Some(6.0)
    );

    // A new sticky layer under the name, with seven sessions by the next
    // publication: all seven are added.
    let sticky = StickyLayer::new(&pool, SessionKey::header("x-session"));
    handle.add_sticky("edge", &sticky);
    for i in 0..7 {
        new_session(&edge(&again, &sticky, &pool), &format!("n{i}")).await;
    }
    last.publish(&handle);
    assert_eq!(
        last.get("tower_ha_sticky_created_total{layer=edge}"),
        Some(13.0)
    );
    assert_eq!(last.get("tower_ha_sticky_sessions{layer=edge}"), Some(7.0));
}

/// A layer forgotten after an hour and registered again adds its counts;
/// a handle made for a reloaded configuration, publishing the same layer
/// and backends for the first time, counts nothing twice.
#[tokio::test(start_paused = true)]
async fn counts_go_on_after_a_forgotten_layer_and_across_handles() {
    let last = Last::default();
    let handle = Handle::new(Events::default());
    let pool = failing_then_working();
    let sticky = StickyLayer::new(&pool, SessionKey::header("x-session"));
    let failover = FailoverLayer::new().no_budget();
    handle.add_failover("edge", &failover);
    for key in ["s1", "s2"] {
        new_session(&edge(&failover, &sticky, &pool), key).await;
    }
    last.publish(&handle);
    let retries = "tower_ha_failover_retries_total{layer=edge}";
    assert_eq!(last.get(retries), Some(2.0));

    // Gone for an hour, then another layer under the name.
    assert!(handle.remove_layer("edge"));
    last.publish(&handle);
    tokio::time::advance(Duration::from_secs(3600)).await;
    last.publish(&handle);
    let again = FailoverLayer::new().no_budget();
    handle.add_failover("edge", &again);
    new_session(&edge(&again, &sticky, &pool), "s3").await;
    last.publish(&handle);
    assert_eq!(last.get(retries), Some(3.0), "its one retry added");

    // The same layer gone for an hour and registered again: its count is
    // not added twice.
    assert!(handle.remove_layer("edge"));
    last.publish(&handle);
    tokio::time::advance(Duration::from_secs(3600)).await;
    last.publish(&handle);
    handle.add_failover("edge", &again);
    last.publish(&handle);
    assert_eq!(last.get(retries), Some(3.0), "nothing new");
    new_session(&edge(&again, &sticky, &pool), "s3b").await;
    last.publish(&handle);
    assert_eq!(last.get(retries), Some(4.0), "its one new retry added");

    // A new handle over the same group and layer: what the first one
    // published is not added again.
    let balance = Balance::new(pool.clone(), RoundRobin::new());
    handle.add_group("web", &balance).unwrap();
    send(&balance, 4).await;
    last.publish(&handle);
    let a_requests = "tower_ha_backend_requests_total{backend=a,group=web}";
    let a_before = last.get(a_requests).unwrap();
    let reloaded = Handle::new(Events::default());
    reloaded.add_group("web", &balance).unwrap();
    reloaded.add_failover("edge", &again);
    last.publish(&reloaded);
    assert_eq!(last.get(retries), Some(4.0));
    assert_eq!(last.get(a_requests), Some(a_before));
    new_session(&edge(&again, &sticky, &pool), "s4").await;
    send(&balance, 2).await;
    last.publish(&reloaded);
    assert_eq!(last.get(retries), Some(5.0));
    // One from the new session's first attempt, one of the two sent.
    assert_eq!(last.get(a_requests), Some(a_before + 2.0));
}

#[tokio::test(start_paused = true)]
async fn the_time_since_a_failover_goes_on_for_a_group_registered_again() {
    let recorder = Last::default();
    let make = || {
        let pool = Pool::new();
        for name in ["a", "b"] {
            pool.insert(
                name,
                service_fn(move |_req: Request<()>| async move {
                    Ok::<_, Infallible>(Response::new(name))
                }),
            );
        }
        let balance = Balance::new(pool.clone(), Priority::new("g", ["a", "b"]));
        (pool, balance)
    };
    let handle = Handle::new(Events::default());
    let (pool, balance) = make();
    handle.add_group("g", &balance).unwrap();
    pool.state(&"a".into())
        .unwrap()
        .set_health(HealthStatus::Unhealthy);
    balance.clone().oneshot(Request::new(())).await.unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    recorder.publish(&handle);
    let key = "tower_ha_group_seconds_since_failover{group=g}";
    assert_eq!(recorder.get(key), Some(10.0));
    // Registered again, freshly built (a reload): its new `Priority` has
    // seen no failover, and the last one is still an hour and ten seconds
    // ago an hour later.
    handle.remove_group("g").unwrap();
    let (_pool, balance) = make();
    handle.add_group("g", &balance).unwrap();
    tokio::time::advance(Duration::from_secs(3600)).await;
    balance.clone().oneshot(Request::new(())).await.unwrap();
    recorder.publish(&handle);
    assert_eq!(recorder.get(key), Some(3610.0));
}

/// A recorder that panics when asked for one counter (an exporter not
/// ready yet, say).
struct PanicsOn(&'static str);

impl Recorder for PanicsOn {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        assert_ne!(key.name(), self.0, "not ready");
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// A publication cut short by a recorder's panic loses that publication
/// only: what it did not publish is published at the next one.
#[tokio::test(start_paused = true)]
async fn a_recorder_that_panics_part_way_loses_no_count() {
    let (pool, balance, handle) = a_alone_in_web();
    let recorder = Last::default();
    send(&balance, 5).await;
    recorder.publish(&handle);
    assert_eq!(recorder.get(A_REQUESTS), Some(5.0));
    // Replaced: the new state counts from 0.
    pool.remove(&"a".into());
    pool.insert("a", answering("a"));
    send(&balance, 2).await;
    let panics = PanicsOn("tower_ha_backend_requests_total");
    let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        metrics::with_local_recorder(&panics, || handle.publish_metrics())
    }));
    assert!(cut.is_err(), "the recorder panicked");
    recorder.publish(&handle);
    assert_eq!(recorder.get(A_REQUESTS), Some(7.0));
}

/// The balancers' refusals are counted by reason, and the requests waiting
/// for a place are a gauge; a group registered again over another pool
/// keeps its refusal counters going up.
#[tokio::test(start_paused = true)]
async fn refusals_are_counted_by_reason_and_waiting_requests_are_a_gauge() {
    let release = Arc::new(tokio::sync::Notify::new());
    let pool = Pool::new();
    let held = release.clone();
    pool.insert(
        "a",
        Svc::new(service_fn(move |_req: Request<()>| {
            let held = held.clone();
            async move {
                held.notified().await;
                Ok(Response::new("a"))
            }
        })),
    );
    pool.state(&"a".into()).unwrap().set_max_in_flight(Some(1));
    let balance = Balance::new(pool.clone(), RoundRobin::new()).queue(1, Duration::from_secs(1));
    let handle = Handle::new(Events::default());
    handle.add_group("web", &balance).unwrap();
    let recorder = Last::default();
    let refused = |reason: &str| {
        recorder.get(&format!(
            "tower_ha_group_refusals_total{{group=web,reason={reason}}}"
        ))
    };

    // One in flight, one waiting, one refused at once: the queue is full.
    let first = tokio::spawn(balance.clone().oneshot(Request::new(())));
    tokio::task::yield_now().await;
    let second = tokio::spawn(balance.clone().oneshot(Request::new(())));
    tokio::task::yield_now().await;
    let err = balance.clone().oneshot(Request::new(())).await.unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    recorder.publish(&handle);
    assert_eq!(
        recorder.get("tower_ha_group_queued_requests{group=web}"),
        Some(1.0)
    );
    assert_eq!(refused("at_limit"), Some(1.0));
    assert_eq!(refused("queue_timeout"), Some(0.0));
    assert_eq!(refused("unavailable"), Some(0.0));
    let stats = &handle.stats()[0];
    assert_eq!(stats.queued, 1);
    let json = serde_json::to_value(stats).unwrap();
    assert_eq!(json["queued"], 1);
    assert_eq!(json["refusals"]["at_limit"], 1);

    // The waiting one gives up after its second.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(second.await.unwrap().is_err());
    release.notify_one();
    first.await.unwrap().unwrap();
    // None available (turned off: an unhealthy one alone would be used
    // in panic).
    pool.state(&"a".into())
        .unwrap()
        .set_admin(AdminStatus::Disabled);
    balance.clone().oneshot(Request::new(())).await.unwrap_err();
    recorder.publish(&handle);
    assert_eq!(
        recorder.get("tower_ha_group_queued_requests{group=web}"),
        Some(0.0)
    );
    assert_eq!(refused("at_limit"), Some(1.0));
    assert_eq!(refused("queue_timeout"), Some(1.0));
    assert_eq!(refused("unavailable"), Some(1.0));
    let r = pool.refusals();
    assert_eq!((r.unavailable, r.at_limit, r.queue_timeouts), (1, 1, 1));

    // Registered again over an empty pool: its refusals add up.
    handle.remove_group("web").unwrap();
    let empty = Balance::new(Pool::<Svc>::new(), RoundRobin::new());
    handle.add_group("web", &empty).unwrap();
    empty.clone().oneshot(Request::new(())).await.unwrap_err();
    recorder.publish(&handle);
    assert_eq!(refused("unavailable"), Some(2.0));
    assert_eq!(refused("at_limit"), Some(1.0));
}
