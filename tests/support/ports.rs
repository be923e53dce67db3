//! Ports for servers that tests stop and start again.

/// An address of 127.0.0.1 with a port free right now, below the kernel's
/// range of ephemeral ports, for a server that is stopped and started
/// again on the same address. A port the kernel picks (binding port 0)
/// comes from that range, from which it also gives client connections
/// their own ports: while the server is down, any connection of the test
/// run may take its port, and the restart then fails. A port below the
/// range is only ever taken by an explicit bind.
pub fn restartable_addr() -> std::net::SocketAddr {
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let below = 10_000..ephemeral_from.max(10_001);
    for _ in 0..1000 {
        let port = rand::random_range(below.clone());
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port of 127.0.0.1 in {below:?}")
}
