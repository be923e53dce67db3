//! The bytes of a switched connection, copied both ways.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How long a tunnel waits at most for the client's side once the backend
/// has switched protocols.
const HANDOVER: Duration = Duration::from_secs(10);

/// Joins the client's connection, once `client` hands it over, to the
/// backend's, and copies bytes both ways until both ends have closed, or
/// until no byte has come from either side for `idle`. An end closed on one
/// side is closed on the other.
///
/// A client side that is not handed over within 10 s (or `idle`, when
/// shorter), or fails to be, ends the tunnel: the backend's connection is
/// dropped, which closes it.
pub(super) async fn join<C, I, E, B>(client: C, backend: B, idle: Option<Duration>)
where
    C: Future<Output = Result<I, E>>,
    I: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let wait = idle.map_or(HANDOVER, |idle| idle.min(HANDOVER));
    let Ok(Ok(client)) = tokio::time::timeout(wait, client).await else {
        return;
    };
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let mut client = Active::new(client, start, &last);
    let mut backend = Active::new(backend, start, &last);
    let quiet = async {
        loop {
            let seen = last.load(Ordering::Relaxed);
            let deadline = idle.and_then(|idle| {
                start
                    .checked_add(Duration::from_nanos(seen))?
                    .checked_add(idle)
            });
            // No idle time, or one too long for the clock: never.
            let Some(deadline) = deadline else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(deadline).await;
            if last.load(Ordering::Relaxed) == seen {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut backend) => {}
        () = quiet => {}
    }
}

/// A byte stream that notes when it last read something: nanoseconds since
/// `start`, shared by both sides of a tunnel.
struct Active<'a, T> {
    io: T,
    start: Instant,
    last: &'a AtomicU64,
}

impl<'a, T> Active<'a, T> {
    fn new(io: T, start: Instant, last: &'a AtomicU64) -> Self {
        Active { io, start, last }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let since = crate::time::nanos_since(this.start, Instant::now());
            this.last.store(since, Ordering::Relaxed);
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::sleep;

    use super::*;

    /// A tunnel between two in-memory pipes: the client's handed over at
    /// once. Returns the far ends (the client's and the backend's) and the
    /// running tunnel.
    fn tunnel(idle: Option<Duration>) -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, client_end) = duplex(64);
        let (backend, backend_end) = duplex(64);
        let handover = async { Ok::<_, Infallible>(client) };
        let running = tokio::spawn(join(handover, backend, idle));
        (client_end, backend_end, running)
    }

    async fn pass(from: &mut DuplexStream, to: &mut DuplexStream, bytes: &[u8]) {
        from.write_all(bytes).await.unwrap();
        let mut got = vec![0; bytes.len()];
        to.read_exact(&mut got).await.unwrap();
        assert_eq!(got, bytes);
    }

    async fn closed(end: &mut DuplexStream) {
        let mut rest = Vec::new();
        end.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_ends_when_quiet_for_its_idle_time_and_not_before() {
        let idle = Duration::from_secs(60);
        let (mut client, mut backend, running) = tunnel(Some(idle));
        // Ten minutes of traffic, never 60 s apart, alternating directions.
        for _ in 0..10 {
            sleep(Duration::from_secs(35)).await;
            pass(&mut client, &mut backend, b"ping").await;
            sleep(Duration::from_secs(25)).await;
            pass(&mut backend, &mut client, b"pong").await;
        }
        assert!(!running.is_finished());
        let last = Instant::now();
        running.await.unwrap();
        assert_eq!(last.elapsed(), idle);
        closed(&mut client).await;
        closed(&mut backend).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_lasts_until_both_ends_close_within_its_idle_time() {
        let day = Duration::from_secs(24 * 3600);
        for idle in [None, Some(day), Some(Duration::MAX)] {
            let (mut client, mut backend, running) = tunnel(idle);
            sleep(day - Duration::from_secs(1)).await;
            pass(&mut client, &mut backend, b"still there").await;
            // The client stops sending: the backend reads the end, and
            // can still answer.
            client.shutdown().await.unwrap();
            closed(&mut backend).await;
            sleep(day - Duration::from_secs(1)).await;
            pass(&mut backend, &mut client, b"last words").await;
            assert!(!running.is_finished(), "{idle:?}");
            drop(backend);
            running.await.unwrap();
            closed(&mut client).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_side_not_handed_over_ends_the_tunnel() {
        let ten = Duration::from_secs(10);
        for (idle, waited) in [
            (None, ten),
            (Some(Duration::from_secs(2)), Duration::from_secs(2)),
        ] {
            let (backend, mut backend_end) = duplex(64);
            let never = std::future::pending::<Result<DuplexStream, Infallible>>();
            let start = Instant::now();
            join(never, backend, idle).await;
            assert_eq!(start.elapsed(), waited, "{idle:?}");
            closed(&mut backend_end).await;
        }
        // A failed handover ends it at once.
        let (backend, mut backend_end) = duplex(64);
        let start = Instant::now();
        join(async { Err::<DuplexStream, _>("gone") }, backend, None).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        closed(&mut backend_end).await;
    }
}
