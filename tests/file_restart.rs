//! Enterprise Gateway's own persistence test, for `FileStore`: "save a
//! variable, `kill -9` the gateway, restart it, the session is back".
//!
//! A server process assigns sessions to backends and keeps touching them
//! (as serving requests does) through a `FileStore`; it is killed with
//! SIGKILL, started again on the same directory, and must restore every
//! session to the backend it had before, twice in a row.
//!
//! The server is this same test binary, started again with an environment
//! variable that selects the server role. `harness = false`: `main` is the
//! test.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Lines};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde_json::json;
use tower_ha::store::{FileStore, Session, SessionStore};

/// Set in the child: the directory the server keeps its sessions in.
const SERVER_DIR: &str = "TOWER_HA_RESTART_SERVER_DIR";
const SESSIONS: usize = 40;
const BACKENDS: [&str; 3] = ["node-a", "node-b", "node-c"];
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

/// The child: restores what the directory holds (printing `restored key
/// backend`), opens new sessions if there are none (printing `opened key
/// backend`), says `ready`, then keeps serving: every few milliseconds a
/// session is used and its `last_seen` saved.
fn server(dir: &Path) -> ! {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = FileStore::open(dir).await.expect("open");
        let loaded = store.load_all().await.expect("load_all");
        let mut sessions = loaded.sessions;
        for s in &sessions {
            println!("restored {} {}", s.key, s.backend);
        }
        if sessions.is_empty() {
            // Round robin over the backends, as a balancer would pick.
            for i in 0..SESSIONS {
                let backend = BACKENDS[i % BACKENDS.len()];
                let s = Session::new(format!("kernel-{i:02}"), backend.into())
                    .with_data(json!({"kernel": i, "ports": [52000 + i, 52100 + i]}));
                store.save(&s).await.expect("save");
                println!("opened {} {}", s.key, s.backend);
                sessions.push(s);
            }
        }
        println!("ready");
        let len = sessions.len();
        let mut n = 0usize;
        loop {
            let s = &mut sessions[n % len];
            s.last_seen = SystemTime::now();
            store.save(s).await.expect("save");
            n += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    unreachable!("the server runs until it is killed")
}

struct Server {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
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
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Server { child, lines }
    }

    /// The `verb key backend` lines printed before `ready`.
    fn until_ready(&mut self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut seen: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for line in self.lines.by_ref() {
            let line = line.expect("server output");
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
        panic!("the server exited before it was ready");
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
        let status = self.child.wait().expect("wait");
        assert!(!status.success(), "the server was killed");
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
    // Serve a while, then die in the middle of it.
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
            "restart {restart}: every session is back on the backend it had"
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(20..120)));
        again.kill();
    }
}
