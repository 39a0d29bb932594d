//! Request bodies that fail when no data arrives for a while (`BODY_READ_TIMEOUT_SECONDS`),
//! with a timer that exists only while the body is actually waiting for the client, and
//! that hand back what a handler left unread (see [`RequestBody`]).
//!
//! tower-http's `RequestBodyTimeoutLayer` arms a timer on every poll, before looking at
//! the body: two timer registrations per request even when the whole body arrived with
//! the head, which is nearly always. Each registration takes the timer wheel's lock and
//! can wake the I/O driver (a syscall). Here the body is polled first and the timer is
//! armed only when it has nothing to give.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use super::conn_io::{ConnectionActivity, InProgress};

/// The error a body yields when the client sent nothing for the whole timeout.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within the read timeout")]
pub struct BodyReadTimeout;

/// `body`, failing with [`BodyReadTimeout`] after `timeout` without a frame.
pub struct TimeoutBody<B> {
    body: B,
    timeout: Duration,
    /// Armed while the body is pending; dropped whenever a frame arrives, so the
    /// timeout counts time without progress, not the whole upload.
    idle: Option<Pin<Box<Sleep>>>,
}

impl<B> TimeoutBody<B> {
    /// Wraps `body`.
    pub fn new(body: B, timeout: Duration) -> TimeoutBody<B> {
        TimeoutBody {
            body,
            timeout,
            idle: None,
        }
    }

    /// The wrapped body.
    pub fn into_inner(self) -> B {
        self.body
    }
}

impl<B> Body for TimeoutBody<B>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.idle = None;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let idle = this
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyReadTimeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An answer's body that keeps `guard` (a slot, a marker of work in progress) until the
/// body is done or dropped, whichever comes first being the end of the answer.
pub struct BodyWith<G> {
    body: axum::body::Body,
    _guard: G,
}

impl<G: Send + Unpin + 'static> BodyWith<G> {
    /// `body`, keeping `guard` as long as it lives.
    pub fn wrap(body: axum::body::Body, guard: G) -> axum::body::Body {
        axum::body::Body::new(BodyWith {
            body,
            _guard: guard,
        })
    }
}

impl<G: Unpin> Body for BodyWith<G> {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What became of a request body a handler dropped before its end.
pub enum Unread {
    /// The rest of the body, still arriving: the server reads it before answering, so
    /// the connection can carry the client's next request.
    Rest(Incoming),
    /// The body failed (read timeout, broken chunking): the connection must close.
    Broken,
}

/// A request body as handlers see it: the client's body under the read timeout, which
/// counts as part of its request in progress until it ends or is dropped, and which,
/// dropped before its end on an HTTP/1 connection, leaves its rest to the server.
///
/// Why: a handler that answers without reading the body (401, 404, 405, a cached 429)
/// used to let hyper close the connection after the answer whenever the rest of the
/// body had not arrived yet, and the answer went out without `Connection: close`, so
/// the client's next request on that connection was lost.
pub struct RequestBody {
    body: Option<TimeoutBody<Incoming>>,
    state: BodyState,
    /// Where the rest goes when dropped early; `None` on HTTP/2, where dropping a body
    /// only resets its own stream.
    unread: Option<Arc<ConnectionActivity>>,
    _in_progress: InProgress,
}

#[derive(Clone, Copy, PartialEq)]
enum BodyState {
    Reading,
    Ended,
    Failed,
}

impl RequestBody {
    /// `body` with a read `timeout`; `in_progress` is held until the body ends or is
    /// dropped, and `unread` receives its rest if it is dropped before its end.
    pub fn new(
        body: Incoming,
        timeout: Duration,
        in_progress: InProgress,
        unread: Option<Arc<ConnectionActivity>>,
    ) -> RequestBody {
        RequestBody {
            body: Some(TimeoutBody::new(body, timeout)),
            state: BodyState::Reading,
            unread,
            _in_progress: in_progress,
        }
    }
}

impl Body for RequestBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(&mut *body).poll_frame(cx));
        this.state = match &frame {
            None => BodyState::Ended,
            Some(Err(_)) => BodyState::Failed,
            Some(Ok(_)) if body.is_end_stream() => BodyState::Ended,
            Some(Ok(_)) => BodyState::Reading,
        };
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let (Some(unread), Some(body)) = (self.unread.take(), self.body.take()) else {
            return;
        };
        match self.state {
            BodyState::Ended => {}
            BodyState::Failed => unread.leave(Unread::Broken),
            BodyState::Reading if body.is_end_stream() => {}
            BodyState::Reading => unread.leave(Unread::Rest(body.into_inner())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn a_body_already_here_is_read_without_arming_a_timer() {
        let mut body = TimeoutBody::new(Full::new(Bytes::from_static(b"hello")), Duration::ZERO);
        // A zero timeout would fail at once if the timer were armed before the body
        // was looked at.
        let frame = body.frame().await.and_then(|f| f.ok());
        assert_eq!(
            frame.and_then(|f| f.into_data().ok()),
            Some(Bytes::from_static(b"hello"))
        );
        assert!(body.idle.is_none());
        assert_eq!(body.size_hint().exact(), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_fails_with_the_timeout() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let stream = tokio_stream_from(receiver);
        let mut body = TimeoutBody::new(StreamBody::new(stream), Duration::from_secs(5));
        sender
            .send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        let error = body.frame().await.and_then(|f| f.err());
        assert!(
            error.is_some_and(|e| e.is::<BodyReadTimeout>()),
            "no timeout error"
        );
        drop(sender);
    }

    #[tokio::test(start_paused = true)]
    async fn each_frame_restarts_the_timeout() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let mut body = TimeoutBody::new(
            StreamBody::new(tokio_stream_from(receiver)),
            Duration::from_secs(5),
        );
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                let _ = sender.send(Ok(Frame::data(Bytes::from_static(b"x")))).await;
            }
        });
        // 12 s in all, but never 5 s without a frame: all three arrive, then the end.
        for _ in 0..3 {
            assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        }
        assert!(body.frame().await.is_none());
    }

    use std::convert::Infallible;

    fn tokio_stream_from<T>(
        mut receiver: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| {
            receiver.poll_recv(cx)
        }))
    }
}
