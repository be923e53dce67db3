mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;
use support::wait::bounded_real;
use tower_ha::store::{FileStore, Loaded, Session, SessionStore};

fn session(key: &str, backend: &str) -> Session {
    Session::new(key, backend.into()).with_data(json!({"port": 52000}))
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn file_store_passes_the_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path().join("sessions")).await.unwrap();
    support::store_contract::refuses_data_nested_too_deep(&store).await;
    support::store_contract::refresh_keeps_a_newer_record(&store).await;
    support::store_contract::run(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_passes_the_contract_on_a_multi_thread_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path()).await.unwrap();
    support::store_contract::run(Arc::new(store)).await;
}

/// A refresh renews a record that cannot be read no more than a load
/// reads it: it fails, and the file stays for inspection.
#[tokio::test]
async fn a_refresh_leaves_a_record_it_cannot_read_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path())
        .await
        .unwrap()
        .with_ttl(std::time::Duration::from_secs(3600));
    let file = tmp.path().join("k_garbage.json");
    std::fs::write(&file, b"not json").unwrap();
    let err = store
        .refresh(&Session::new("garbage", "a".into()))
        .await
        .expect_err("unreadable");
    assert!(err.is_corrupt(), "{err:?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"not json");
}

#[tokio::test]
async fn creates_the_directory_and_its_parents() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/c");
    let store = FileStore::open(&dir).await.unwrap();
    assert!(dir.is_dir());
    assert_eq!(store.path(), dir);
}

#[tokio::test]
async fn a_file_is_not_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let err = FileStore::open(&file).await.unwrap_err();
    assert!(err.is_io(), "{err:?}");
}

#[tokio::test]
async fn one_json_file_per_session_named_after_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path()).await.unwrap();
    store.save(&session("alice", "a")).await.unwrap();
    store.save(&session("Bob/1", "b")).await.unwrap();
    assert_eq!(names(tmp.path()), ["k_%42ob%2F1.json", "k_alice.json"]);
    let stored: Session =
        serde_json::from_slice(&std::fs::read(tmp.path().join("k_alice.json")).unwrap()).unwrap();
    assert_eq!(stored.backend.as_str(), "a");
    store.delete(&["alice".into()]).await.unwrap();
    assert_eq!(names(tmp.path()), ["k_%42ob%2F1.json"]);
}

#[tokio::test]
async fn hostile_keys_never_leave_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("deep/sessions");
    let store = FileStore::open(&dir).await.unwrap();
    let keys = support::store_contract::hostile_keys();
    for key in &keys {
        store.save(&session(key, "n")).await.unwrap();
    }
    // Nothing was written beside or above the directory.
    assert_eq!(names(tmp.path()), ["deep"]);
    assert_eq!(names(&tmp.path().join("deep")), ["sessions"]);
    let inside = names(&dir);
    assert_eq!(inside.len(), keys.len(), "one file per key: {inside:?}");
    for name in &inside {
        assert!(name.ends_with(".json"), "{name}");
        assert!(name.len() <= 200, "{name} is short enough");
        assert!(std::fs::metadata(dir.join(name)).unwrap().is_file());
    }
    let long = FileStore::file_name(&"x".repeat(300));
    assert!(inside.contains(&long) && long.starts_with("h_"));
}

#[cfg(unix)]
#[tokio::test]
async fn files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("new");
    let store = FileStore::open(&dir).await.unwrap();
    store.save(&session("k", "a")).await.unwrap();
    store.save(&session("k", "b")).await.unwrap(); // a rewrite stays private
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("k_k.json")), 0o600);
    assert_eq!(mode(&dir), 0o700);
}

/// A directory other users can reach is warned of once per open, and left
/// as it is; a private one is not.
#[cfg(unix)]
#[test]
fn a_directory_other_users_can_reach_is_warned_of() {
    use std::os::unix::fs::PermissionsExt;
    use support::tracing_capture::Capture;
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o750)).unwrap();
    let private = tmp.path().join("private");
    let capture = Capture::default();
    let runtime = runtime();
    tracing::subscriber::with_default(capture.clone(), || {
        runtime.block_on(async {
            FileStore::open(&shared).await.unwrap();
            FileStore::open(&private).await.unwrap();
        })
    });
    let warnings: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|e| e.level == tracing::Level::WARN)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(
        warnings[0].get("dir"),
        Some(shared.display().to_string().as_str())
    );
    assert_eq!(warnings[0].get("mode"), Some("0750"));
    let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o750, "left as it is");
}

/// The records `load_all` skipped, sorted, each checked to be corrupt.
fn corrupt_records(loaded: &Loaded) -> Vec<String> {
    let mut skipped: Vec<_> = loaded
        .skipped
        .iter()
        .map(|s| {
            assert!(s.error.is_corrupt(), "{:?}", s.error);
            s.record.clone()
        })
        .collect();
    skipped.sort();
    skipped
}

#[tokio::test]
async fn corrupt_files_are_skipped_and_reported_never_losing_siblings() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path()).await.unwrap();
    for i in 0..5 {
        store
            .save(&session(&format!("good-{i}"), "a"))
            .await
            .unwrap();
    }
    let full = std::fs::read(tmp.path().join("k_good-0.json")).unwrap();
    // A truncated copy, garbage, valid JSON of the wrong shape, an empty
    // file, and a session stored under another key's name.
    std::fs::write(tmp.path().join("k_trunc.json"), &full[..full.len() / 2]).unwrap();
    std::fs::write(tmp.path().join("k_garbage.json"), b"\x00\xff not json").unwrap();
    std::fs::write(tmp.path().join("k_shape.json"), b"[1, 2, 3]").unwrap();
    std::fs::write(tmp.path().join("k_empty.json"), b"").unwrap();
    std::fs::write(tmp.path().join("k_moved.json"), &full).unwrap();
    // Files that are not the store's are left alone.
    std::fs::write(tmp.path().join("README"), b"notes").unwrap();
    std::fs::write(tmp.path().join("other.json"), b"{}").unwrap();

    let loaded = store.load_all().await.unwrap();
    let mut keys: Vec<_> = loaded.sessions.iter().map(|s| s.key.clone()).collect();
    keys.sort();
    assert_eq!(keys, ["good-0", "good-1", "good-2", "good-3", "good-4"]);
    let skipped = corrupt_records(&loaded);
    assert_eq!(
        skipped,
        [
            "k_empty.json",
            "k_garbage.json",
            "k_moved.json",
            "k_shape.json",
            "k_trunc.json"
        ]
    );
    // Corrupt files are kept for inspection, and loading one is an error,
    // not a panic and not "absent".
    assert!(tmp.path().join("k_trunc.json").exists());
    assert!(store.load("trunc").await.unwrap_err().is_corrupt());
    assert!(store.load("moved").await.unwrap_err().is_corrupt());
    assert!(tmp.path().join("README").exists());
}

/// What is not a regular file under a record's name, or is larger than
/// any record, is reported and left alone, never read: a FIFO would block
/// the load for good, `/dev/zero` would never end.
#[cfg(unix)]
#[tokio::test]
async fn only_regular_files_of_a_sane_size_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path()).await.unwrap();
    store.save(&session("good", "a")).await.unwrap();
    let record = |key: &str| tmp.path().join(FileStore::file_name(key));
    std::os::unix::fs::symlink("/dev/zero", record("zero")).unwrap();
    // A valid record of its own key, but outside the directory.
    let outside = tempfile::tempdir().unwrap();
    let elsewhere = outside.path().join("link.json");
    std::fs::write(
        &elsewhere,
        serde_json::to_vec(&session("link", "a")).unwrap(),
    )
    .unwrap();
    std::os::unix::fs::symlink(&elsewhere, record("link")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(record("fifo"))
        .status()
        .unwrap();
    assert!(made.success());
    // A valid record of its own key, over 64 MiB.
    let mut huge = session("huge", "a");
    huge.data = serde_json::Value::String("x".repeat(65 * 1024 * 1024));
    std::fs::write(record("huge"), serde_json::to_vec(&huge).unwrap()).unwrap();

    let loaded = bounded_real("nothing blocks the load", store.load_all())
        .await
        .unwrap();
    let keys: Vec<_> = loaded.sessions.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["good"]);
    let skipped = corrupt_records(&loaded);
    let mut expected: Vec<_> = ["fifo", "huge", "link", "zero"]
        .map(FileStore::file_name)
        .to_vec();
    expected.sort();
    assert_eq!(skipped, expected);
    for key in ["fifo", "huge", "link", "zero"] {
        let error = bounded_real("nothing blocks the load", store.load(key))
            .await
            .unwrap_err();
        assert!(error.is_corrupt(), "{key}: {error:?}");
        assert!(
            record(key).symlink_metadata().is_ok(),
            "{key} is left alone"
        );
    }
}

#[tokio::test]
async fn a_leftover_temporary_file_is_reported_then_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path()).await.unwrap();
    store.save(&session("k", "old")).await.unwrap();
    // What a crash between write and rename leaves behind.
    let temp = ".k_k.json.4242-7.tmp";
    std::fs::write(tmp.path().join(temp), b"{\"key\": \"k\", \"back").unwrap();
    // Other programs' temporary files are not the store's to remove.
    let foreign = [
        "notes.tmp",
        ".notes.tmp",
        ".k_k.json.tmp",
        ".x_k.json.1-2.tmp",
    ];
    for name in foreign {
        std::fs::write(tmp.path().join(name), b"not a session").unwrap();
    }

    let loaded = store.load_all().await.unwrap();
    assert_eq!(loaded.sessions.len(), 1);
    assert_eq!(loaded.sessions[0].backend.as_str(), "old");
    assert_eq!(loaded.skipped.len(), 1);
    assert_eq!(loaded.skipped[0].record, temp);
    assert!(loaded.skipped[0].error.is_corrupt());
    assert!(!tmp.path().join(temp).exists(), "the leftover is removed");
    for name in foreign {
        assert!(tmp.path().join(name).exists(), "{name} left alone");
    }

    let again = store.load_all().await.unwrap();
    assert!(again.skipped.is_empty(), "reported once");
}

/// The temporary files of writes in progress, by name.
fn temp_files(dir: &Path) -> BTreeSet<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_all_ignores_writes_in_progress() {
    // Loads that overlapped a write in progress needed; at most this many
    // loads tried.
    const OVERLAPS: usize = 20;
    const MAX_LOADS: usize = 20_000;
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path()).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let store = store.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0;
            // Every one of the 10 keys at least once.
            while i < 10 || !stop.load(Ordering::SeqCst) {
                store
                    .save(&session(&format!("w-{}", i % 10), "a"))
                    .await
                    .unwrap();
                i += 1;
            }
        })
    };
    // A temporary file listed both before and after a load existed during
    // the whole load (each write's temporary name is new), so that load's
    // listing met it.
    let mut overlaps = 0;
    let mut loads = 0;
    while overlaps < OVERLAPS && loads < MAX_LOADS {
        loads += 1;
        let before = temp_files(tmp.path());
        let loaded = store.load_all().await.unwrap();
        let after = temp_files(tmp.path());
        assert!(
            loaded.skipped.is_empty(),
            "a write in progress is not a leftover: {:?}",
            loaded.skipped
        );
        if before.intersection(&after).next().is_some() {
            overlaps += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    assert!(
        overlaps >= OVERLAPS,
        "only {overlaps} of {loads} loads overlapped a write in progress"
    );
    assert!(temp_files(tmp.path()).is_empty(), "every write finished");
    assert_eq!(store.load_all().await.unwrap().sessions.len(), 10);
}

#[test]
fn outside_a_runtime_calls_fail_instead_of_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(FileStore::open(tmp.path()))
        .unwrap();
    let err = futures::executor::block_on(store.load("k")).unwrap_err();
    assert!(err.is_other(), "{err:?}");
}

#[tokio::test]
async fn a_restarted_store_sees_every_session() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(tmp.path()).await.unwrap();
        for i in 0..20 {
            store
                .save(&session(&format!("s-{i}"), &format!("node-{}", i % 4)))
                .await
                .unwrap();
        }
    }
    let store = FileStore::open(tmp.path()).await.unwrap();
    let loaded = store.load_all().await.unwrap();
    assert_eq!(loaded.sessions.len(), 20);
    for s in loaded.sessions {
        let i: usize = s.key[2..].parse().unwrap();
        assert_eq!(s.backend.as_str(), format!("node-{}", i % 4));
    }
}

/// File I/O runs on the blocking pool, never on the runtime's thread: with
/// the pool's only thread held, a load waits (while the runtime's thread
/// still fires a timer), and goes through once the thread is let go.
#[test]
fn file_io_never_blocks_the_runtime_thread() {
    use std::time::Duration;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .unwrap();
    runtime.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).await.unwrap();
        store.save(&session("k", "node-a")).await.unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let holder = tokio::task::spawn_blocking(move || held.recv().unwrap());
        for op in ["load", "load_all", "save", "delete"] {
            let task = tokio::spawn({
                let store = store.clone();
                async move {
                    match op {
                        "load" => store.load("k").await.map(drop),
                        "load_all" => store.load_all().await.map(drop),
                        "save" => store.save(&session("k", "node-b")).await,
                        _ => store.delete(&["other".to_owned()]).await,
                    }
                }
            });
            // A timer fires while the operation waits for the pool...
            tokio::time::sleep(Duration::from_millis(20)).await;
            // ...which it could not have finished without.
            assert!(!task.is_finished(), "{op} ran on the runtime's thread");
            task.abort();
            let _ = task.await;
        }
        release.send(()).unwrap();
        holder.await.unwrap();
        // The pool free again, file I/O goes on.
        assert!(store.load("k").await.unwrap().is_some());
    });
}

/// A file system that does not answer (here, a blocking pool whose only
/// thread is taken): every call on one session fails with a timeout error
/// at its limit, not later and not never.
#[test]
fn a_call_the_file_system_does_not_answer_times_out_at_its_limit() {
    use std::time::Duration;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .max_blocking_threads(1)
        .build()
        .unwrap();
    runtime.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path())
            .await
            .unwrap()
            .with_timeout(Duration::from_secs(5));
        store.save(&session("k", "node-a")).await.unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let holder = tokio::task::spawn_blocking(move || held.recv().unwrap());
        for op in ["load", "save", "delete"] {
            let task = tokio::spawn({
                let store = store.clone();
                async move {
                    match op {
                        "load" => store.load("k").await.map(drop),
                        "save" => store.save(&session("k", "node-b")).await,
                        _ => store.delete(&["other".to_owned()]).await,
                    }
                }
            });
            let settle = || async {
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
            };
            settle().await;
            tokio::time::advance(Duration::from_millis(4999)).await;
            settle().await;
            assert!(!task.is_finished(), "{op} gave up before its limit");
            tokio::time::advance(Duration::from_millis(1)).await;
            settle().await;
            assert!(task.is_finished(), "{op} still waits at its limit");
            let err = task.await.unwrap().expect_err(op);
            assert!(err.is_timeout(), "{op}: {err}");
            assert!(err.is_transient());
        }
        release.send(()).unwrap();
        holder.await.unwrap();
        // The calls that timed out ran once the pool was free again, in
        // the order they were asked for: the save landed.
        let loaded = tokio::time::timeout(Duration::from_secs(60), store.load("k"))
            .await
            .expect("the store answers again");
        assert_eq!(loaded.unwrap().unwrap().backend.as_str(), "node-b");
    });
}

/// A save that timed out still runs, and may land after its caller gave
/// up; a later write of the same session waits for it, so the later one
/// always has the last word. Here the first save waits for the blocking
/// pool of one runtime while the later writes run on another.
#[test]
fn a_write_that_timed_out_never_lands_after_a_later_one() {
    use std::time::Duration;

    for later in ["save", "delete"] {
        let tmp = tempfile::tempdir().unwrap();
        let stuck = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        let free = tokio::runtime::Runtime::new().unwrap();
        let store = free.block_on(FileStore::open(tmp.path())).unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let _holder = stuck.spawn_blocking(move || held.recv().unwrap());
        let first = stuck.block_on(
            store
                .clone()
                .with_timeout(Duration::from_millis(50))
                .save(&session("k", "node-a")),
        );
        assert!(first.unwrap_err().is_timeout(), "{later}");

        // Through a handle that names the directory otherwise (a link).
        let links = tempfile::tempdir().unwrap();
        #[cfg(unix)]
        let named = {
            let link = links.path().join("sessions");
            std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
            link
        };
        #[cfg(not(unix))]
        let named = tmp.path().to_owned();
        let other = free.block_on(FileStore::open(&named)).unwrap();
        let then = free.spawn({
            let store = other;
            async move {
                match later {
                    "save" => store.save(&session("k", "node-b")).await,
                    _ => store.delete(&["k".to_owned()]).await,
                }
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!then.is_finished(), "the later {later} did not wait");
        release.send(()).unwrap();
        free.block_on(then).unwrap().unwrap();
        let now = free.block_on(store.load("k")).unwrap();
        match later {
            "save" => assert_eq!(now.unwrap().backend.as_str(), "node-b"),
            _ => assert!(now.is_none(), "the deleted session came back"),
        }
        // Nothing left behind but the record.
        let expected = usize::from(later == "save");
        assert_eq!(names(tmp.path()).len(), expected, "{later}");
    }
}

proptest::proptest! {
    /// Every key gets a plain file name inside the directory, short enough
    /// for any file system, and two keys never share one, even on a
    /// case-insensitive file system: keys that differ only in case
    /// included, short ones and those over 200 bytes (named by their hash).
    #[test]
    fn file_names_are_safe_and_distinct(
        a in "\\PC{0,120}|[a-zA-Z0-9]{150,300}",
        b in "\\PC{0,120}",
    ) {
        let swapped: String = a
            .chars()
            .map(|c| {
                if c.is_ascii_uppercase() {
                    c.to_ascii_lowercase()
                } else {
                    c.to_ascii_uppercase()
                }
            })
            .collect();
        let keys = [
            a.clone(),
            b,
            a.to_ascii_uppercase(),
            a.to_ascii_lowercase(),
            a.to_uppercase(),
            a.to_lowercase(),
            swapped,
        ];
        for key in &keys {
            let name = FileStore::file_name(key);
            proptest::prop_assert!(name.ends_with(".json"));
            proptest::prop_assert!(name.len() <= 200);
            proptest::prop_assert!(name.starts_with("k_") || name.starts_with("h_"));
            proptest::prop_assert!(!name.contains(['/', '\\', '\0']));
            proptest::prop_assert!(name.is_ascii());
            if key.len() > 200 {
                proptest::prop_assert!(name.starts_with("h_"), "{name}");
            }
        }
        for (i, x) in keys.iter().enumerate() {
            for y in keys[i + 1..].iter().filter(|y| *y != x) {
                proptest::prop_assert_ne!(
                    FileStore::file_name(x).to_lowercase(),
                    FileStore::file_name(y).to_lowercase()
                );
            }
        }
    }
}

/// A directory deleted (or unmounted) under a running store: a load must
/// not answer "no such session", which would start every session anew
/// while saves fail.
#[tokio::test]
async fn a_missing_directory_is_not_found_not_an_empty_store() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sessions");
    let store = FileStore::open(&dir).await.unwrap();
    store.save(&session("k", "a")).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let err = store.load("k").await.unwrap_err();
    assert!(err.is_not_found(), "load: {err:?}");
    let err = store.load_all().await.unwrap_err();
    assert!(err.is_not_found(), "load_all: {err:?}");
    let err = store.save(&session("k", "b")).await.unwrap_err();
    assert!(err.is_not_found(), "save: {err:?}");
    let err = store.delete(&["k".into()]).await.unwrap_err();
    assert!(err.is_not_found(), "delete: {err:?}");

    // Back (remounted, or made again): the store works again.
    std::fs::create_dir(&dir).unwrap();
    assert_eq!(store.load("k").await.unwrap(), None);
    store.save(&session("k", "b")).await.unwrap();
}

mod ttl {
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use tower_ha::store::{FileStore, SessionStore};

    use super::{bounded_real, names, session};

    const TTL: Duration = Duration::from_secs(3600);

    /// Sets the modification time of `key`'s record to `ago` before now.
    fn age(dir: &Path, key: &str, ago: Duration) {
        let file = std::fs::File::options()
            .write(true)
            .open(dir.join(FileStore::file_name(key)))
            .unwrap();
        file.set_modified(SystemTime::now() - ago).unwrap();
    }

    fn modified_ago(dir: &Path, key: &str) -> Duration {
        let meta = std::fs::metadata(dir.join(FileStore::file_name(key))).unwrap();
        meta.modified().unwrap().elapsed().unwrap_or_default()
    }

    #[tokio::test]
    async fn a_file_store_with_a_ttl_passes_the_contract() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).await.unwrap().with_ttl(TTL);
        crate::support::store_contract::run(std::sync::Arc::new(store)).await;
    }

    #[tokio::test]
    async fn an_expired_record_is_not_loaded_and_a_prune_removes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // Written without a TTL: a save with one would start a prune.
        let plain = FileStore::open(dir).await.unwrap();
        for key in ["old", "young"] {
            plain.save(&session(key, "a")).await.unwrap();
        }
        let store = plain.with_ttl(TTL);
        assert_eq!(store.refresh_interval(), Some(TTL / 2));
        age(dir, "old", TTL + Duration::from_secs(1));
        age(dir, "young", TTL - Duration::from_secs(60));
        std::fs::write(dir.join("notes.txt"), b"not a session").unwrap();
        let file = std::fs::File::options()
            .write(true)
            .open(dir.join("notes.txt"));
        file.unwrap()
            .set_modified(SystemTime::now() - 2 * TTL)
            .unwrap();

        assert!(store.load("old").await.unwrap().is_none());
        let loaded = store.load_all().await.unwrap();
        assert_eq!(loaded.sessions.len(), 1);
        assert_eq!(loaded.sessions[0].key, "young");
        assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);

        assert_eq!(store.prune().await.unwrap(), 1);
        assert_eq!(
            names(dir),
            [FileStore::file_name("young").as_str(), "notes.txt"],
            "only the expired record is removed"
        );
        assert_eq!(store.prune().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_load_renews_the_record_and_load_all_does_not() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = FileStore::open(dir).await.unwrap().with_ttl(TTL);
        for key in ["one", "other"] {
            store.save(&session(key, "a")).await.unwrap();
            age(dir, key, TTL - Duration::from_secs(60));
        }
        assert_eq!(store.load_all().await.unwrap().sessions.len(), 2);
        assert!(modified_ago(dir, "one") > TTL - Duration::from_secs(61));
        assert!(store.load("one").await.unwrap().is_some());
        assert!(
            modified_ago(dir, "one") < Duration::from_secs(60),
            "renewed"
        );
        assert!(modified_ago(dir, "other") > TTL - Duration::from_secs(61));
    }

    #[tokio::test]
    async fn without_a_ttl_nothing_expires() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = FileStore::open(dir).await.unwrap();
        assert_eq!(store.refresh_interval(), None);
        store.save(&session("old", "a")).await.unwrap();
        age(dir, "old", 100 * TTL);
        assert!(store.load("old").await.unwrap().is_some());
        assert_eq!(store.prune().await.unwrap(), 0);
        store.save(&session("other", "a")).await.unwrap();
        assert_eq!(names(dir).len(), 2);
        assert!(
            modified_ago(dir, "old") > 99 * TTL,
            "a load without a TTL writes nothing"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_save_starts_a_prune_of_expired_records() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let plain = FileStore::open(dir).await.unwrap();
        for i in 0..20 {
            let key = format!("old-{i}");
            plain.save(&session(&key, "a")).await.unwrap();
            age(dir, &key, TTL + Duration::from_secs(1));
        }
        let store = plain.with_ttl(TTL);
        store.save(&session("new", "a")).await.unwrap();
        let pruned = async {
            while names(dir).len() > 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        bounded_real("the prune", pruned).await;
        assert_eq!(names(dir), [FileStore::file_name("new")]);
    }
}

/// A session too large to be read back (reads stop at 64 MiB) is refused
/// before anything is written, so its previous record stays readable.
#[tokio::test]
async fn a_session_too_large_to_read_back_is_refused_and_the_old_record_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path()).await.unwrap();
    store.save(&session("k", "node-a")).await.unwrap();
    let huge = Session::new("k", "node-b".into()).with_data(json!("x".repeat(64 << 20)));
    let err = store.save(&huge).await.unwrap_err();
    assert!(err.is_rejected(), "{err:?}");
    let kept = store.load("k").await.unwrap().expect("the old record");
    assert_eq!(kept.backend.as_str(), "node-a");
    assert_eq!(store.load_all().await.unwrap().sessions.len(), 1);
}

/// A delete removes every record it can even when one cannot be removed,
/// and reports that one.
#[tokio::test]
async fn a_delete_removes_what_it_can_past_a_record_it_cannot() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path()).await.unwrap();
    store.save(&session("b", "node-a")).await.unwrap();
    let b = names(tmp.path()).pop().unwrap();
    std::fs::remove_file(tmp.path().join(&b)).unwrap();
    // A directory where b's record would be cannot be removed as a file.
    std::fs::create_dir(tmp.path().join(&b)).unwrap();
    store.save(&session("a", "node-a")).await.unwrap();
    store.save(&session("c", "node-a")).await.unwrap();

    let keys = ["a", "b", "c"].map(String::from);
    let err = store.delete(&keys).await.unwrap_err();
    assert!(err.to_string().contains(&b), "{err}");
    assert_eq!(store.load("a").await.unwrap(), None);
    assert_eq!(store.load("c").await.unwrap(), None, "c was deleted too");
    assert_eq!(names(tmp.path()), [b]);
}

/// A runtime of one thread, with I/O and time, for a test that drives it
/// itself.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

mod generated {
    //! Keys, data and record files of any content.

    use super::*;
    use crate::support::json_values;
    use proptest::prelude::*;

    /// Keys of any characters, path separators, dot segments and names too
    /// long to encode included.
    fn keys() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>().prop_filter("non-empty", |k| !k.is_empty()),
            "(\\.\\.|/|\\\\|%|\0|é|A|a){1,12}",
            (60usize..400).prop_map(|n| "%".repeat(n)),
        ]
    }

    fn sessions() -> impl Strategy<Value = Session> {
        (keys(), any::<String>(), json_values::values(3, 3))
            .prop_map(|(key, backend, data)| Session::new(key, backend.into()).with_data(data))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// Any session saved reads back as it was, from its key and in a
        /// listing, in a directory that holds its file and nothing else.
        #[test]
        fn any_session_reads_back_as_saved(sessions in proptest::collection::vec(sessions(), 1..4)) {
            runtime().block_on(async {
                let tmp = tempfile::tempdir().unwrap();
                let dir = tmp.path().join("sessions");
                let store = FileStore::open(&dir).await.unwrap();
                for session in &sessions {
                    store.save(session).await.unwrap();
                }
                let again = FileStore::open(&dir).await.unwrap();
                // The last save of each key is what it holds.
                let mut last = std::collections::BTreeMap::new();
                for session in &sessions {
                    last.insert(session.key.clone(), session.clone());
                }
                for (key, session) in &last {
                    assert_eq!(again.load(key).await.unwrap().as_ref(), Some(session));
                }
                let loaded = again.load_all().await.unwrap();
                assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
                let mut listed = loaded.sessions;
                listed.sort_by(|a, b| a.key.cmp(&b.key));
                assert_eq!(listed, last.into_values().collect::<Vec<_>>());
                let expected: BTreeSet<String> =
                    sessions.iter().map(|s| FileStore::file_name(&s.key)).collect();
                assert_eq!(names(&dir).into_iter().collect::<BTreeSet<_>>(), expected);
            });
        }

        /// A record file of any content under a key's name loads as that
        /// key's session or fails as corrupt, and a listing reads it or
        /// skips it as corrupt, keeping its sibling.
        #[test]
        fn any_record_file_loads_as_its_key_or_is_corrupt(
            session in sessions(),
            other in keys(),
            raw in proptest::collection::vec(any::<u8>(), 0..300),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            kind in 0..4u8,
        ) {
            prop_assume!(session.key != "sibling");
            runtime().block_on(async {
                let tmp = tempfile::tempdir().unwrap();
                let store = FileStore::open(tmp.path()).await.unwrap();
                store.save(&Session::new("sibling", "a".into())).await.unwrap();
                let own = serde_json::to_vec(&session).unwrap();
                let mut record = own.clone();
                let i = at.index(record.len());
                let bytes = match kind {
                    0 => raw.clone(),
                    // The record with one byte changed, or cut short.
                    1 => {
                        record[i] = byte;
                        record
                    }
                    2 => {
                        record.truncate(i);
                        record
                    }
                    // Another key's record.
                    _ => serde_json::to_vec(&Session::new(other.clone(), "b".into())).unwrap(),
                };
                let name = FileStore::file_name(&session.key);
                std::fs::write(tmp.path().join(&name), &bytes).unwrap();
                match store.load(&session.key).await {
                    Ok(Some(read)) => assert_eq!(read.key, session.key),
                    Ok(None) => panic!("a record file is there"),
                    Err(e) => assert!(e.is_corrupt(), "{e:?}"),
                }
                if bytes == own {
                    assert_eq!(store.load(&session.key).await.unwrap(), Some(session.clone()));
                }
                let loaded = store.load_all().await.unwrap();
                assert!(loaded.sessions.iter().any(|s| s.key == "sibling"));
                let read = loaded.sessions.iter().any(|s| s.key == session.key);
                let skipped = corrupt_records(&loaded);
                assert!(read != skipped.contains(&name), "{read} {skipped:?}");
            });
        }
    }
}
