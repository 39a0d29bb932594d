//! One client connection's socket as hyper sees it: it closes a connection that stays
//! idle longer than the keep-alive timeout or takes longer than the header-read timeout
//! to send a request head, and it lingers before closing a connection whose client may
//! still be sending, so the client reads our answer instead of a reset.
//!
//! Why not hyper's own `header_read_timeout`: its timer starts as soon as a connection
//! goes idle, so it is also the keep-alive timeout, and a client whose pool keeps
//! connections longer than it (httpx keeps them 5 s, others 60 s and more) sends its next
//! request just as the server closes the connection: a request lost without an answer.
//! Here the two are separate: a connection may stay idle for `KEEP_ALIVE_TIMEOUT_SECONDS`,
//! and the header-read timeout counts from the first byte of a request head.
//!
//! What is a request in progress comes from the service (see [`ConnectionActivity`]):
//! a request begins when hyper hands its head to the service and ends when both its
//! body has been read (or given up) and its answer has been written. Neither timeout
//! runs while a request is in progress; body reads have their own timeout (`body.rs`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::body::Unread;

/// How long a closing connection whose client may still be sending (an answer given
/// before its whole body arrived) is read and discarded before the socket is closed.
/// Closing a socket with unread data makes the kernel send a reset, and a client that
/// receives the reset before it has read our answer loses the answer.
const LINGER: Duration = Duration::from_secs(2);

/// What the service tells the connection's socket, shared by both.
#[derive(Default)]
pub struct ConnectionActivity {
    /// Parts of requests still in progress: each request counts its body and its answer.
    open: AtomicUsize,
    /// Requests finished so far; a change starts a new idle period.
    finished: AtomicU64,
    /// Set when the connection is to be closed with request data left unread.
    linger: AtomicBool,
    /// What the handler of the HTTP/1 request being answered left of its body (see
    /// `body::RequestBody`).
    leftover: Mutex<Option<Unread>>,
}

impl ConnectionActivity {
    /// Marks one part of a request in progress until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InProgress {
        self.open.fetch_add(1, Ordering::Relaxed);
        InProgress(self.clone())
    }

    /// Asks the socket to read and discard what the client still sends before closing.
    pub fn linger_on_close(&self) {
        self.linger.store(true, Ordering::Relaxed);
    }

    /// Keeps what a handler left of a request body, for the service to deal with.
    pub fn leave(&self, unread: Unread) {
        *self.leftover.lock().unwrap_or_else(|p| p.into_inner()) = Some(unread);
    }

    /// Takes what a handler left of a request body, if anything.
    pub fn take_unread(&self) -> Option<Unread> {
        self.leftover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn in_progress(&self) -> bool {
        self.open.load(Ordering::Relaxed) > 0
    }
}

/// One part of a request in progress (its body, or its answer); see
/// [`ConnectionActivity::begin`].
pub struct InProgress(Arc<ConnectionActivity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.finished.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The two timeouts of a connection between requests.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionTimeouts {
    /// Time from the first byte of a request head (or from the accept, for the first
    /// request) to the complete head.
    pub header_read: Duration,
    /// Time a connection may stay idle between two requests.
    pub keep_alive: Duration,
}

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// A request is in progress: no timeout here.
    Busy,
    /// No request in progress since `since`.
    Idle { since: Instant },
    /// A request head is arriving and must be complete by `deadline`.
    Head { deadline: Instant },
}

/// The socket of one connection, with the keep-alive and header-read timeouts and the
/// lingering close.
pub struct ConnectionIo<T> {
    io: T,
    activity: Arc<ConnectionActivity>,
    timeouts: ConnectionTimeouts,
    phase: Phase,
    finished_seen: u64,
    /// Whether the client speaks HTTP/2 (decided by its first bytes). HTTP/2 clients
    /// send frames (pings, settings) between requests, so their bytes do not start a
    /// request head; only the keep-alive timeout applies.
    http2: Option<bool>,
    /// One timer, reset only when a deadline moves earlier: a deadline that moved later
    /// is found when the timer fires and re-armed then, so a busy keep-alive connection
    /// does not touch the timer wheel on every request.
    timer: Pin<Box<Sleep>>,
    armed: Instant,
    /// Set once our side of a lingering close has been shut down: until when to read.
    lingering_until: Option<Instant>,
}

impl<T> ConnectionIo<T> {
    /// Wraps the socket of a connection accepted just now.
    pub fn new(io: T, activity: Arc<ConnectionActivity>, timeouts: ConnectionTimeouts) -> Self {
        let deadline = Instant::now() + timeouts.header_read;
        ConnectionIo {
            io,
            activity,
            timeouts,
            // The first request's head must arrive within the header-read timeout of
            // the accept: a connection that never sends anything is cut off as soon as
            // a slow head would be.
            phase: Phase::Head { deadline },
            finished_seen: 0,
            http2: None,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            armed: deadline,
            lingering_until: None,
        }
    }

    /// Brings the phase up to date with the service; true while a request is in progress.
    fn refresh(&mut self) -> bool {
        let finished = self.activity.finished.load(Ordering::Relaxed);
        if finished != self.finished_seen {
            self.finished_seen = finished;
            self.phase = Phase::Idle {
                since: Instant::now(),
            };
        }
        if self.activity.in_progress() {
            self.phase = Phase::Busy;
            return true;
        }
        if self.phase == Phase::Busy {
            // Every request begun has ended (one abandoned before its answer, say).
            self.phase = Phase::Idle {
                since: Instant::now(),
            };
        }
        false
    }

    fn on_bytes(&mut self, bytes: &[u8]) {
        let http2 = *self
            .http2
            .get_or_insert_with(|| bytes.starts_with(b"PRI * HTTP/2"));
        if self.refresh() {
            return;
        }
        if let Phase::Idle { .. } = self.phase {
            let now = Instant::now();
            self.phase = if http2 {
                Phase::Idle { since: now }
            } else {
                Phase::Head {
                    deadline: now + self.timeouts.header_read,
                }
            };
        }
    }

    /// Polls the deadline of the current phase; `Ready` when it has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.refresh() {
            return Poll::Pending;
        }
        let deadline = match self.phase {
            Phase::Idle { since } => since + self.timeouts.keep_alive,
            Phase::Head { deadline } => deadline,
            Phase::Busy => return Poll::Pending,
        };
        if deadline < self.armed {
            self.rearm(deadline);
        }
        loop {
            ready!(self.timer.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            // The timer was set for an earlier deadline that has since moved later.
            self.rearm(deadline);
        }
    }

    fn rearm(&mut self, deadline: Instant) {
        self.timer.as_mut().reset(deadline);
        self.armed = deadline;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnectionIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.on_bytes(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.poll_deadline(cx) {
                // hyper closes the connection on a read error; nothing is in progress.
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle past the keep-alive timeout, or request head too slow",
                ))),
                Poll::Pending => Poll::Pending,
            },
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ConnectionIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    /// Shuts our side down; when the connection closes with request data unread, then
    /// reads and discards what the client still sends until it closes its side or
    /// [`LINGER`] passes, so that its kernel never resets the connection under an answer
    /// it has not read yet.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.activity.linger.load(Ordering::Relaxed) {
            return Pin::new(&mut this.io).poll_shutdown(cx);
        }
        let until = match this.lingering_until {
            Some(until) => until,
            None => {
                ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                let until = Instant::now() + LINGER;
                this.lingering_until = Some(until);
                this.rearm(until);
                until
            }
        };
        let mut scratch = [0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                // The client closed its side, or the connection broke: done.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => break,
            }
        }
        if this.armed != until {
            this.rearm(until);
        }
        ready!(this.timer.as_mut().poll(cx));
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TIMEOUTS: ConnectionTimeouts = ConnectionTimeouts {
        header_read: Duration::from_secs(10),
        keep_alive: Duration::from_secs(75),
    };

    fn wrapped() -> (
        ConnectionIo<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<ConnectionActivity>,
    ) {
        let (server, client) = tokio::io::duplex(1 << 16);
        let activity = Arc::new(ConnectionActivity::default());
        (
            ConnectionIo::new(server, activity.clone(), TIMEOUTS),
            client,
            activity,
        )
    }

    async fn read_error_after(io: &mut ConnectionIo<tokio::io::DuplexStream>) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 64];
        loop {
            match io.read(&mut buf).await {
                Ok(0) => panic!("closed instead of timing out"),
                Ok(_) => continue,
                Err(error) => {
                    assert_eq!(error.kind(), io::ErrorKind::TimedOut);
                    return started.elapsed();
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
        let (mut io, _client, _) = wrapped();
        assert_eq!(read_error_after(&mut io).await, TIMEOUTS.header_read);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_stays_open_for_the_keep_alive_timeout_not_the_header_timeout() {
        let (mut io, mut client, activity) = wrapped();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.unwrap() > 0);
        // The service answers the request: its body and its answer end.
        drop((activity.begin(), activity.begin()));
        assert_eq!(read_error_after(&mut io).await, TIMEOUTS.keep_alive);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_must_be_complete_within_the_header_timeout_of_its_first_byte() {
        let (mut io, mut client, activity) = wrapped();
        drop(activity.begin());
        let mut buf = [0u8; 64];
        // Idle for a minute (under the keep-alive timeout), then a head starts and stalls.
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(b"GET / HT").await.unwrap();
        assert!(io.read(&mut buf).await.unwrap() > 0);
        assert_eq!(read_error_after(&mut io).await, TIMEOUTS.header_read);
    }

    #[tokio::test(start_paused = true)]
    async fn no_timeout_runs_while_a_request_is_in_progress() {
        let (mut io, _client, activity) = wrapped();
        let answer = activity.begin();
        let mut buf = [0u8; 64];
        let waited = tokio::time::timeout(Duration::from_secs(600), io.read(&mut buf)).await;
        assert!(waited.is_err(), "the read neither failed nor ended");
        drop(answer);
        assert_eq!(read_error_after(&mut io).await, TIMEOUTS.keep_alive);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_frames_between_requests_keep_a_connection_alive() {
        let (mut io, mut client, activity) = wrapped();
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.unwrap() > 0);
        drop(activity.begin());
        // A ping every 30 s: never idle for the keep-alive timeout, never a head.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            client.write_all(b"ping").await.unwrap();
            assert!(io.read(&mut buf).await.unwrap() > 0);
        }
        assert_eq!(read_error_after(&mut io).await, TIMEOUTS.keep_alive);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_close_reads_until_the_client_closes() {
        let (mut io, mut client, activity) = wrapped();
        activity.linger_on_close();
        client.write_all(b"unread body bytes").await.unwrap();
        let closing = tokio::spawn(async move {
            io.shutdown().await.unwrap();
            io
        });
        // Our side is shut down first: the client sees the end of our answer...
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(
            !closing.is_finished(),
            "still reading what the client sends"
        );
        // ...and the close completes once the client closes its side.
        drop(client);
        tokio::time::timeout(Duration::from_millis(10), closing)
            .await
            .expect("done when the client closed")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_close_gives_up_after_its_bound() {
        let (mut io, _client, activity) = wrapped();
        activity.linger_on_close();
        let started = Instant::now();
        io.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), LINGER);
    }
}
