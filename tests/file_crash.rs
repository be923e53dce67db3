//! Crash safety of `FileStore`: a child process rewrites sessions in a loop
//! and is killed with SIGKILL at random moments; after every kill, each
//! session must be either its previous or its new complete version.
//!
//! The child is this same test binary, started again with an environment
//! variable that selects the writer role (so the test needs no extra
//! target). `harness = false`: `main` is the test.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::json;
use tower_ha::store::{FileStore, Session, SessionStore};

#[path = "support/lines.rs"]
mod lines;
use lines::lines;

/// Set in the child: the directory to write in.
const WRITER_DIR: &str = "TOWER_HA_CRASH_WRITER_DIR";
/// Sessions the writer rewrites, round robin over its tasks.
const KEYS: u64 = 16;
/// Concurrent writer tasks in the child.
const TASKS: u64 = 4;
/// How many times the writer is killed.
const KILLS: usize = 60;

fn key(i: u64) -> String {
    format!("session/{i}")
}

/// Version `v` of session `key`: everything in it derives from `v`, so a
/// reader can tell a complete version from a torn one.
fn version(key: &str, v: u64) -> Session {
    let pad = "x".repeat(usize::try_from(v * 379 % 6000).unwrap_or(0));
    Session::new(key, format!("node-{}", v % 7).into()).with_data(json!({
        "version": v,
        "pad": pad,
        "check": format!("{key}#{v}"),
    }))
}

/// The version a stored session holds, checking it is complete.
fn version_of(s: &Session) -> Result<u64, String> {
    let v = s.data["version"]
        .as_u64()
        .ok_or_else(|| format!("{}: no version", s.key))?;
    let expected = version(&s.key, v);
    if s.backend != expected.backend
        || s.data["pad"] != expected.data["pad"]
        || s.data["check"] != expected.data["check"]
    {
        return Err(format!("{}: version {v} is not complete", s.key));
    }
    Ok(v)
}

fn main() {
    if let Ok(dir) = std::env::var(WRITER_DIR) {
        writer(Path::new(&dir));
    }
    if std::env::args().any(|a| a == "--list") {
        println!("killed_writer_leaves_previous_or_new_version: test");
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filter.is_empty()
        && !filter
            .iter()
            .any(|f| "killed_writer_leaves_previous_or_new_version".contains(f.as_str()))
    {
        println!("running 0 tests");
        return;
    }
    println!("running 1 test");
    killed_writer_leaves_previous_or_new_version();
    println!("test killed_writer_leaves_previous_or_new_version ... ok");
    println!("\ntest result: ok. 1 passed; 0 failed");
}

/// The child: rewrites every session forever, printing `key version` on
/// stdout after each save returned.
fn writer(dir: &Path) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = FileStore::open(dir).await.expect("open");
        let loaded = store.load_all().await.expect("load_all");
        let mut last: HashMap<String, u64> = HashMap::new();
        for s in &loaded.sessions {
            last.insert(s.key.clone(), version_of(s).expect("complete version"));
        }
        let out = Arc::new(Mutex::new(std::io::stdout()));
        println!("ready");
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let store = store.clone();
                let out = out.clone();
                let mut mine: Vec<(String, u64)> = (0..KEYS)
                    .filter(|i| i % TASKS == t)
                    .map(|i| {
                        let k = key(i);
                        let v = last.get(&k).copied().unwrap_or(0);
                        (k, v)
                    })
                    .collect();
                tokio::spawn(async move {
                    loop {
                        for (k, v) in mine.iter_mut() {
                            *v += 1;
                            store.save(&version(k, *v)).await.expect("save");
                            let mut out = out.lock().expect("stdout");
                            writeln!(out, "{k} {v}").expect("stdout");
                            out.flush().expect("stdout");
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("writer task");
        }
    });
    unreachable!("the writer runs until it is killed")
}

/// How long the writer may take to start, or to acknowledge the writes
/// waited for: a bound against hanging, not a timing claim.
const WITHIN: Duration = Duration::from_secs(30);

/// The writer child, killed when dropped (a failed check does not leave it
/// running).
struct Writer(Child);

impl Drop for Writer {
    fn drop(&mut self) {
        // Already gone after the kill of a round: both calls then do nothing.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_writer(dir: &Path) -> Writer {
    Writer(
        Command::new(std::env::current_exe().expect("current exe"))
            .env(WRITER_DIR, dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the writer"),
    )
}

/// The next line of the writer, within [`WITHIN`].
fn next_line(lines: &mpsc::Receiver<String>, round: usize, what: &str) -> String {
    match lines.recv_timeout(WITHIN) {
        Ok(line) => line,
        Err(RecvTimeoutError::Timeout) => panic!("round {round}: {what} within {WITHIN:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("round {round}: the writer exited"),
    }
}

fn killed_writer_leaves_previous_or_new_version() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The last version each key's save was acknowledged for.
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut rng = rand::rng();
    let (mut interrupted, mut leftovers, mut writes) = (0usize, 0usize, 0u64);

    for round in 0..KILLS {
        let mut writer = spawn_writer(dir);
        let lines = lines(writer.0.stdout.take().expect("stdout"));
        let ready = next_line(&lines, round, "the writer starts");
        assert_eq!(ready, "ready", "round {round}: the writer's first line");
        // Killed once it has acknowledged a random number of writes (at
        // least one), however fast or slow its writes are.
        let wait_for = rng.random_range(1..=32);
        let mut acknowledged = Vec::new();
        while acknowledged.len() < wait_for {
            acknowledged.push(next_line(&lines, round, "the writer acknowledges writes"));
        }
        writer.0.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
        let status = writer.0.wait().expect("wait");
        assert!(!status.success(), "round {round}: the writer was killed");
        // And what it acknowledged before it died, up to the end of its
        // output.
        loop {
            match lines.recv_timeout(WITHIN) {
                Ok(line) => acknowledged.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("round {round}: the killed writer's output did not end")
                }
            }
        }

        for line in acknowledged {
            let (k, v) = line.rsplit_once(' ').expect("`key version` line");
            let v: u64 = v.parse().expect("version");
            let e = acked.entry(k.to_owned()).or_default();
            assert!(v > *e, "versions only grow");
            *e = v;
            writes += 1;
        }

        let loaded = rt.block_on(async {
            FileStore::open(dir)
                .await
                .expect("open")
                .load_all()
                .await
                .expect("load_all")
        });
        for s in &loaded.skipped {
            assert!(
                s.record.ends_with(".tmp"),
                "round {round}: only a temporary file may be reported, got {} ({:?})",
                s.record,
                s.error
            );
            leftovers += 1;
        }
        let stored: HashMap<&str, &Session> = loaded
            .sessions
            .iter()
            .map(|s| (s.key.as_str(), s))
            .collect();
        assert!(stored.len() as u64 <= KEYS);
        for i in 0..KEYS {
            let k = key(i);
            let previous = acked.get(&k).copied().unwrap_or(0);
            match stored.get(k.as_str()) {
                None => assert_eq!(
                    previous, 0,
                    "round {round}: {k} was saved (version {previous}) and is gone"
                ),
                Some(s) => {
                    let v = version_of(s).unwrap_or_else(|e| panic!("round {round}: {e}"));
                    assert!(
                        v == previous || v == previous + 1,
                        "round {round}: {k} holds version {v}, expected {previous} or {}",
                        previous + 1
                    );
                    if v == previous + 1 {
                        interrupted += 1;
                        acked.insert(k, v); // the next writer continues from it
                    }
                }
            }
        }
    }
    println!(
        "{KILLS} kills, {writes} acknowledged writes, {interrupted} writes landed unacknowledged, \
         {leftovers} temporary files reported"
    );
    // Kills that left a temporary file came in the middle of a write; on a
    // file system without real `fsync` (tmpfs) they are few enough that
    // some runs could have none, so kills that came after a version landed
    // but before its save was acknowledged count too.
    assert!(
        interrupted + leftovers > 0,
        "some kills must land before a save was acknowledged (a temporary file left, \
         or a new version not acknowledged yet), or nothing was tested"
    );
}
