//! Enterprise Gateway's own persistence test, through the sticky layer:
//! "start a kernel, `kill -9` the gateway, restart it, the kernel's
//! requests go where they went before".
//!
//! A server process routes sessions with the real `Sticky` layer in
//! `Standalone` mode, saving them to a `FileStore`, over a `Pool` of three
//! backends (`node-a`, `node-b`, `node-c`) that answer their own name and
//! are picked at random for a new session. On its first start it sends one
//! request per key (`kernel-00` .. `kernel-39`, in the `x-kernel-id`
//! header), so each key becomes a session on the backend that answered. It
//! is killed with SIGKILL, started again on the same directory, calls
//! `restore()`, and sends one request per key again: every session must be
//! routed to the backend it had before, and none may be opened anew (which
//! would also land it on a random backend), three restarts in a row.
//!
//! The server is this same test binary, started again with an environment
//! variable that selects the server role. `harness = false`: `main` is the
//! test.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use rand::Rng;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_ha::balance::{BalanceLayer, Random};
use tower_ha::sticky::{Availability, SessionKey, StickyLayer};
use tower_ha::store::FileStore;
use tower_ha::Pool;

#[path = "support/lines.rs"]
mod lines;
use lines::lines;

/// Set in the child: the directory the server keeps its sessions in.
const SERVER_DIR: &str = "TOWER_HA_RESTART_SERVER_DIR";
const SESSIONS: usize = 40;
const BACKENDS: [&str; 3] = ["node-a", "node-b", "node-c"];
const KEY_HEADER: &str = "x-kernel-id";
const TEST: &str = "sessions_survive_kill_and_restart";

fn main() {
    if let Ok(dir) = std::env::var(SERVER_DIR) {
        server(Path::new(&dir));
    }
    if std::env::args().any(|a| a == "--list") {
        println!("{TEST}: test");
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filter.is_empty() && !filter.iter().any(|f| TEST.contains(f.as_str())) {
        println!("running 0 tests");
        return;
    }
    println!("running 1 test");
    sessions_survive_kill_and_restart();
    println!("test {TEST} ... ok");
    println!("\ntest result: ok. 1 passed; 0 failed");
}

fn key(i: usize) -> String {
    format!("kernel-{i:02}")
}

/// The child: a sticky layer over three backends, its sessions in a
/// `FileStore` on `dir`. Restores what the directory holds, then sends one
/// request per key and prints `restored key backend` for a key the table
/// knew before the request (restored), `opened key backend` for one it did
/// not (a new session), with the backend that answered. Says `ready`, then
/// keeps serving those sessions until it is killed.
fn server(dir: &Path) -> ! {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = FileStore::open(dir).await.expect("open");
        let pool = Pool::new();
        for name in BACKENDS {
            pool.insert(
                name,
                service_fn(move |_req: http::Request<()>| async move {
                    Ok::<_, Infallible>(http::Response::new(name))
                }),
            );
        }
        let layer = StickyLayer::new(&pool, SessionKey::header(KEY_HEADER))
            .store(store)
            .availability(Availability::Standalone);
        let report = layer.restore().await.expect("restore");
        assert!(report.failed.is_empty() && report.skipped.is_empty());
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .layer(BalanceLayer::new(Random::new()))
            .service(pool);
        let request = |key: &str| {
            http::Request::builder()
                .header(KEY_HEADER, key)
                .body(())
                .expect("request")
        };
        for i in 0..SESSIONS {
            let key = key(i);
            let known = layer.session(&key).is_some();
            let response = svc.clone().oneshot(request(&key)).await.expect("served");
            let verb = if known { "restored" } else { "opened" };
            println!("{verb} {key} {}", response.body());
        }
        println!("ready");
        // Serve the sessions until killed; a new session started here
        // would be saved too.
        let mut n = 0usize;
        loop {
            let key = key(n % SESSIONS);
            svc.clone().oneshot(request(&key)).await.expect("served");
            n += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    unreachable!("the server runs until it is killed")
}

/// How long the server may take to print its next line before `ready`
/// (it starts, restores, then prints a line per session it serves): a
/// bound against hanging, not a timing claim.
const NEXT_LINE_WITHIN: Duration = Duration::from_secs(60);

/// A server child, killed when dropped (a failed check does not leave it
/// running).
struct Server {
    child: Child,
    /// The lines it prints, read on a thread of their own.
    lines: mpsc::Receiver<String>,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .env(SERVER_DIR, dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the server");
        let lines = lines(child.stdout.take().expect("stdout"));
        Server { child, lines }
    }

    /// The `verb key backend` lines printed before `ready`.
    fn until_ready(&mut self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut seen: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        loop {
            let line = match self.lines.recv_timeout(NEXT_LINE_WITHIN) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "the server printed nothing for {NEXT_LINE_WITHIN:?} before it was ready"
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the server exited before it was ready")
                }
            };
            if line == "ready" {
                return seen;
            }
            let mut parts = line.splitn(3, ' ');
            let (Some(verb), Some(key), Some(backend)) = (parts.next(), parts.next(), parts.next())
            else {
                panic!("unexpected server output {line:?}");
            };
            seen.entry(verb.to_owned())
                .or_default()
                .insert(key.to_owned(), backend.to_owned());
        }
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
        let status = self.child.wait().expect("wait");
        assert!(!status.success(), "the server was killed");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Already gone after `kill`: both calls then do nothing.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sessions_survive_kill_and_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rng();

    let mut first = Server::start(tmp.path());
    let mut out = first.until_ready();
    assert!(
        !out.contains_key("restored"),
        "a new directory restores nothing"
    );
    let assigned = out.remove("opened").expect("sessions opened");
    assert_eq!(assigned.len(), SESSIONS);
    let expected: Vec<String> = (0..SESSIONS).map(key).collect();
    assert!(assigned.keys().eq(expected.iter()), "{assigned:?}");
    assert!(assigned.values().all(|b| BACKENDS.contains(&b.as_str())));
    // Serve a while, then die by SIGKILL while serving. What it serves
    // then are hits on known sessions, which write nothing to a
    // `FileStore`, so no save is in flight at the kill: what this checks
    // is that the saves made before `ready` (each awaited before its
    // response) outlive a process that dies without shutting down. Saves
    // cut short by a kill are `tests/file_crash.rs`'s part.
    std::thread::sleep(Duration::from_millis(rng.random_range(20..120)));
    first.kill();

    for restart in 1..=3 {
        let mut again = Server::start(tmp.path());
        let mut out = again.until_ready();
        assert!(
            !out.contains_key("opened"),
            "restart {restart}: nothing was lost, so nothing is opened anew"
        );
        let restored = out.remove("restored").unwrap_or_default();
        assert_eq!(
            restored, assigned,
            "restart {restart}: every session is routed to the backend it had"
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(20..120)));
        again.kill();
    }
}
