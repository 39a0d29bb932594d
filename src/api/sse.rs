//! Server-sent event answers, shared by the doors that stream: the response head
//! (`text/event-stream`, no caching, no proxy buffering) and a `: keep-alive` comment
//! after every stretch of upstream silence, so that proxies and clients with read
//! timeouts do not give up on a slow model.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

/// The comment sent after a stretch of silence.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// How long a stream may stay silent before a keep-alive comment (`STREAM_KEEP_ALIVE_SECONDS`).
#[derive(Debug, Clone, Copy)]
pub struct KeepAliveEvery(pub Duration);

/// A 200 `text/event-stream` answer of `events`, with keep-alive comments after `every`
/// of silence.
pub fn response(
    events: impl Stream<Item = Bytes> + Send + 'static,
    every: KeepAliveEvery,
) -> Response {
    let body = KeepAlive {
        events: Box::pin(events),
        every: every.0,
        silence: Box::pin(tokio::time::sleep(every.0)),
    };
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Whether `response` is an event stream (its body lasts as long as the stream).
pub fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// `events`, with a keep-alive comment whenever none came for `every`.
struct KeepAlive {
    events: Pin<Box<dyn Stream<Item = Bytes> + Send>>,
    every: Duration,
    silence: Pin<Box<Sleep>>,
}

impl Stream for KeepAlive {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.events.as_mut().poll_next(cx) {
            Poll::Ready(Some(event)) => {
                this.silence.as_mut().reset(Instant::now() + this.every);
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.silence.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.silence.as_mut().reset(Instant::now() + this.every);
                    Poll::Ready(Some(Ok(Bytes::from_static(KEEP_ALIVE))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test(start_paused = true)]
    async fn silence_is_filled_with_keep_alive_comments_and_events_pass_unchanged() {
        let events = futures_util::stream::unfold(0, |n| async move {
            match n {
                0 => Some((Bytes::from_static(b"data: a\n\n"), 1)),
                1 => {
                    // 25 s of silence: two comments at 10 s and 20 s.
                    tokio::time::sleep(Duration::from_secs(25)).await;
                    Some((Bytes::from_static(b"data: b\n\n"), 2))
                }
                _ => None,
            }
        });
        let response = response(events, KeepAliveEvery(Duration::from_secs(10)));
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        assert_eq!(response.headers()["cache-control"], "no-cache");
        assert_eq!(response.headers()["x-accel-buffering"], "no");
        let frames: Vec<Bytes> = response
            .into_body()
            .into_data_stream()
            .map(|f| f.unwrap())
            .collect()
            .await;
        let frames: Vec<&[u8]> = frames.iter().map(|f| f.as_ref()).collect();
        assert_eq!(
            frames,
            [&b"data: a\n\n"[..], KEEP_ALIVE, KEEP_ALIVE, b"data: b\n\n"]
        );
    }
}
