//! [`SendTimeout`]: a client connection whose writes give up once they
//! have stalled too long.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::timeout::{self, Timer};

pin_project! {
    /// A client's connection (an accepted `TcpStream`, say) whose writes
    /// fail with an I/O error of kind `TimedOut` once the client has taken
    /// none of them for `timeout` (zero: no timeout): nginx's
    /// `send_timeout`, which hyper's servers do not have.
    ///
    /// A client that stops reading its response makes the server's writes
    /// stall, and the server stops reading the response's body; that body
    /// holds its backend's connection, and counts as in flight on its
    /// backend (against its `max_in_flight`), for as long as the client
    /// wants. Served over a `SendTimeout`, the connection fails instead,
    /// the server drops the response, and the backend gets its connection
    /// and its slot back. The time counts from the moment a write can no
    /// longer proceed, not for a whole response: a slow client that keeps
    /// reading is not cut off, nor one waiting for a slow backend. Reads
    /// pass through untouched (hyper's `header_read_timeout` bounds a slow
    /// request head). A tunnel (a WebSocket) keeps the wrapper: a client
    /// that reads nothing of it for the timeout is cut off too.
    ///
    /// This bounds an HTTP/1 client. An HTTP/2 client that stops reading
    /// one response only stops granting it flow-control window, and no
    /// write to its connection stalls: the client's
    /// [`send_timeout`](super::HttpClient::send_timeout) bounds such a
    /// response (and any other response body from a backend).
    ///
    /// ```no_run
    /// # async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    /// use std::time::Duration;
    /// use hyper_util::rt::TokioIo;
    /// use tower_ha::http::SendTimeout;
    ///
    /// let (stream, _peer) = listener.accept().await?;
    /// // As nginx's default `send_timeout`.
    /// let io = TokioIo::new(SendTimeout::new(stream, Duration::from_secs(60)));
    /// // hyper::server::conn::http1::Builder::new().serve_connection(io, service) ...
    /// # drop(io);
    /// # Ok(())
    /// # }
    /// ```
    pub struct SendTimeout<T> {
        #[pin]
        io: T,
        stall: Stall,
    }
}

/// The timing of a connection's stalled writes.
struct Stall {
    timeout: Duration,
    /// Made at the first stall; its deadline is moved only when it passes
    /// before a later stall's end (see [`timeout::passed`]).
    timer: Timer,
    /// When the stall under way started, if one is.
    since: Option<Instant>,
}

impl<T> SendTimeout<T> {
    /// `io`, whose writes fail once they have stalled for `timeout`.
    pub fn new(io: T, timeout: Duration) -> Self {
        SendTimeout {
            io,
            stall: Stall {
                timeout,
                timer: None,
                since: None,
            },
        }
    }

    /// The connection.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// The connection, to change; writing to it bypasses the timeout.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.io
    }

    /// The connection, given back.
    pub fn into_inner(self) -> T {
        self.io
    }
}

impl<T: fmt::Debug> fmt::Debug for SendTimeout<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendTimeout")
            .field("io", &self.io)
            .field("timeout", &self.stall.timeout)
            .finish_non_exhaustive()
    }
}

impl Stall {
    /// The outcome of a write (or flush, or shutdown) `written`: as it is
    /// when ready, which ends a stall; else pending, until the stall it
    /// starts or continues has lasted the timeout.
    fn check<R>(
        &mut self,
        written: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        if written.is_ready() || self.timeout.is_zero() {
            self.since = None;
            return written;
        }
        let since = timeout::start(&mut self.timer, &mut self.since, self.timeout);
        std::task::ready!(timeout::passed(&mut self.timer, since, self.timeout, cx));
        Poll::Ready(Err(timeout::timed_out_for(
            "the client took nothing sent to it",
            "send",
            self.timeout,
        )))
    }
}

impl<T: AsyncRead> AsyncRead for SendTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let written = this.io.poll_write(cx, buf);
        this.stall.check(written, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let written = this.io.poll_write_vectored(cx, bufs);
        this.stall.check(written, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let flushed = this.io.poll_flush(cx);
        this.stall.check(flushed, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let shut = this.io.poll_shutdown(cx);
        this.stall.check(shut, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Writes to `io` until a write stalls; the bytes written.
    async fn fill(io: &mut (impl AsyncWrite + Unpin)) -> usize {
        let mut total = 0;
        let chunk = [7u8; 1024];
        loop {
            let write = std::pin::pin!(io.write(&chunk));
            match futures::poll!(write) {
                Poll::Ready(Ok(n)) => total += n,
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => return total,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_fails_at_the_timeout_and_one_that_moves_does_not() {
        let (client, server) = tokio::io::duplex(4096);
        let mut io = SendTimeout::new(server, Duration::from_secs(10));
        assert_eq!(fill(&mut io).await, 4096);
        // The client reads some after 9 s: the stall ends, and the next
        // one is timed from its own start.
        let mut client = client;
        let started = Instant::now();
        let write = io.write_all(&[1; 2048]);
        let read = async {
            tokio::time::sleep(Duration::from_secs(9)).await;
            let mut buf = [0; 2048];
            tokio::io::AsyncReadExt::read_exact(&mut client, &mut buf)
                .await
                .unwrap();
            client
        };
        let (written, client) = tokio::join!(write, read);
        written.expect("taken before the timeout");
        assert_eq!(started.elapsed(), Duration::from_secs(9));
        // Nothing more is read: the next write fails 10 s after it stalled.
        let started = Instant::now();
        let e = io.write_all(&[2; 1]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(e.to_string().contains("10s"), "{e}");
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_timeout_is_none() {
        let (client, server) = tokio::io::duplex(64);
        let mut io = SendTimeout::new(server, Duration::ZERO);
        assert_eq!(fill(&mut io).await, 64);
        let write = io.write_all(&[1; 1]);
        let waited = tokio::time::timeout(Duration::from_secs(3600), write).await;
        assert!(waited.is_err(), "still waiting for the client, not failed");
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn reads_are_not_timed() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = SendTimeout::new(server, Duration::from_secs(1));
        let read = async {
            let mut buf = [0; 4];
            tokio::io::AsyncReadExt::read_exact(&mut io, &mut buf)
                .await
                .map(|_| buf)
        };
        let send = async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            client.write_all(b"late").await.unwrap();
        };
        let (read, ()) = tokio::join!(read, send);
        assert_eq!(&read.unwrap(), b"late");
    }
}
