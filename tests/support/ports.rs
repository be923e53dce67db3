//! Ports for servers that tests stop and start again.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// Every port [`restartable_addr`] handed out in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// An address of 127.0.0.1 with a port free right now, below the kernel's
/// range of ephemeral ports, for a server that is stopped and started
/// again on the same address. A port the kernel picks (binding port 0)
/// comes from that range, from which it also gives client connections
/// their own ports: while the server is down, any connection of the test
/// run may take its port, and the restart then fails. A port below the
/// range is only ever taken by an explicit bind.
///
/// A port is handed out once per process: while one test's server is
/// down, its port is free, and must not be given to another test running
/// beside it.
pub fn restartable_addr() -> std::net::SocketAddr {
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let below = 10_000..ephemeral_from.max(10_001);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = rand::random_range(below.clone());
        if handed_out.contains(&port) {
            continue;
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            handed_out.insert(port);
            return addr;
        }
    }
    panic!("no free port of 127.0.0.1 in {below:?}")
}
