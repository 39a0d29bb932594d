//! The HTTP server loop: accepts connections up to a cap, hands each to a worker thread
//! (`workers`), which serves it with hyper with header and body read timeouts (so slow
//! clients cannot hold connections forever), and drains them with a bound on shutdown.
//! `axum::serve` offers neither the cap nor the header timeout.
//!
//! Draining closes keep-alive connections without losing requests: first every HTTP/1
//! answer says `Connection: close` (so the client stops reusing the connection) while
//! requests already on their way still arrive and are served; only then are connections
//! that stayed idle closed. Closing idle connections at once dropped requests a client
//! had just sent on one (their bytes were in the socket, unread). Likewise, connections
//! waiting in the listener's queue at the stop are accepted and served before the
//! listener closes: closing it resets them, and their clients lose requests already sent.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Version};
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::body::{BodyWith, RequestBody, Unread};
use super::conn_io::{ConnectionActivity, ConnectionIo, ConnectionTimeouts};
use super::workers::Workers;

/// Limits of the connection layer.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Open connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a complete request head, from its first byte.
    pub header_read_timeout: Duration,
    /// Time a connection may stay idle between requests.
    pub keep_alive_timeout: Duration,
    /// Largest request body; also the most of an unread body read before answering.
    pub max_body_bytes: usize,
    /// Time a request body may go without sending data.
    pub body_read_timeout: Duration,
    /// Bound on the drain after the stop signal.
    pub shutdown_grace: Duration,
    /// Threads serving connections (see `workers`).
    pub workers: usize,
}

/// How long draining waits for requests already sent on idle keep-alive connections
/// (bounded by the grace period) before closing those connections.
const DRAIN_LINGER: Duration = Duration::from_millis(500);

/// The answer to a request whose handler panicked (a bug), in the `{"detail"}` shape every
/// error of the gateway has.
const INTERNAL_ERROR: &str = r#"{"detail":"Internal Server Error"}"#;

/// What an over-capacity connection is told before it is closed.
const OVERLOADED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 57\r\n\r\n{\"detail\":\"Too many open connections; try again shortly\"}";

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and
/// lets open connections finish their requests for at most the grace period.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    // The header-read and keep-alive timeouts are the socket's (`conn_io`): hyper's own
    // header timer also ran while a connection was idle, which made it the keep-alive
    // timeout as well.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let workers = Workers::start(limits.workers)?;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let draining = Arc::new(AtomicBool::new(false));
    // Serves one accepted connection on a worker, or refuses it over the connection cap.
    // The socket travels as a std one: a tokio socket stays tied to the runtime that
    // made it, and the worker's own runtime must watch it.
    let start_connection = |stream: std::net::TcpStream, peer: SocketAddr| {
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Ok(stream) = TcpStream::from_std(stream) {
                tokio::spawn(refuse(stream));
            }
            return;
        };
        let activity = Arc::new(ConnectionActivity::default());
        let service = connection_service(
            router.clone(),
            peer,
            BodyLimits {
                max_body_bytes: limits.max_body_bytes,
                read_timeout: limits.body_read_timeout,
            },
            draining.clone(),
            activity.clone(),
        );
        let timeouts = ConnectionTimeouts {
            header_read: limits.header_read_timeout,
            keep_alive: limits.keep_alive_timeout,
        };
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        workers.run(move || async move {
            if let Ok(stream) = TcpStream::from_std(stream) {
                let io = ConnectionIo::new(stream, activity, timeouts);
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(io), service)
                    .into_owned();
                // Errors here are the client's (reset, bad request head, timeout).
                let _ = watcher.watch(connection).await;
            }
            drop(slot);
        });
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        match stream.into_std() {
            Ok(stream) => start_connection(stream, peer),
            Err(error) => tracing::warn!(%error, "cannot hand an accepted connection over"),
        }
    }
    // Connections the kernel has already completed are clients that connected before
    // the stop and may have sent their request: serve them (told to close) instead of
    // letting the listener's close reset them. What arrives after this is refused.
    draining.store(true, Ordering::Relaxed);
    match listener.into_std() {
        Ok(listener) => {
            while let Ok((stream, peer)) = listener.accept() {
                if stream.set_nonblocking(true).is_ok() {
                    start_connection(stream, peer);
                }
            }
        }
        Err(error) => tracing::warn!(%error, "cannot take the connections waiting to be accepted"),
    }
    let started = Instant::now();
    tracing::info!(
        grace_seconds = limits.shutdown_grace.as_secs_f64(),
        "shutting down: draining requests in flight"
    );
    let all_closed = async {
        while slots.available_permits() < limits.max_connections {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let _ = tokio::time::timeout(limits.shutdown_grace.min(DRAIN_LINGER), all_closed).await;
    let remaining = limits.shutdown_grace.saturating_sub(started.elapsed());
    if tokio::time::timeout(remaining, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain took longer than the grace period; exiting anyway");
    }
    Ok(())
}

/// The service of one connection: the router, with the peer's address in each
/// request's extensions and its body under the read timeout, adding `Connection: close`
/// to HTTP/1 answers once `draining`. A hyper service (called by reference), so the
/// router is cloned once per request.
///
/// Every request gets an answer, and the connection closes only after an answer that
/// says `Connection: close` (or after the keep-alive timeout, see `conn_io`): the rest
/// of a body its handler did not read is read before the answer goes out (bounded by
/// `MAX_BODY_BYTES` and the body read timeout; beyond, the answer says `Connection:
/// close` and the socket lingers), and a handler that panics is answered with a JSON 500.
fn connection_service(
    router: Router,
    peer: SocketAddr,
    limits: BodyLimits,
    draining: Arc<AtomicBool>,
    activity: Arc<ConnectionActivity>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send,
> + Send {
    hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        // Two parts in progress: the body (until read or dropped) and the answer (until
        // written); the keep-alive timeout starts when both have ended.
        let answering = activity.begin();
        let http1 = request.version() < Version::HTTP_2;
        let unread_bound = http1.then(|| UnreadBound::of(&request, limits.max_body_bytes));
        let reading = activity.begin();
        let leftover = http1.then(|| activity.clone());
        let mut request = request.map(|body| {
            axum::body::Body::new(RequestBody::new(
                body,
                limits.read_timeout,
                reading,
                leftover,
            ))
        });
        request.extensions_mut().insert(ConnectInfo(peer));
        let (router, draining, activity) = (router.clone(), draining.clone(), activity.clone());
        async move {
            let mut response = answer_or_500(router.oneshot(request)).await;
            let mut close = false;
            if let Some(bound) = unread_bound {
                let left = activity.take_unread();
                if left.is_some() && !read_rest(left, bound, limits.read_timeout).await {
                    // The client may still be sending: read what comes after our answer,
                    // so its kernel does not reset the connection under the answer.
                    activity.linger_on_close();
                    close = true;
                }
                // Read when the answer is ready: a request already in flight when the
                // drain starts must also tell its client to stop reusing the connection.
                close |= draining.load(Ordering::Relaxed);
            }
            if close {
                let close = HeaderValue::from_static("close");
                response.headers_mut().insert(header::CONNECTION, close);
            }
            // The answer counts as part of its request in progress until written.
            Ok(response.map(|body| BodyWith::wrap(body, answering)))
        }
    })
}

/// Limits of reading request bodies.
#[derive(Debug, Clone, Copy)]
struct BodyLimits {
    max_body_bytes: usize,
    read_timeout: Duration,
}

/// How much of an unread body the server reads before answering, decided from the
/// request head.
#[derive(Debug, Clone, Copy)]
enum UnreadBound {
    /// Read at most this many more bytes.
    Bytes(usize),
    /// Do not read: the body is declared larger than the bound, or the client waits for
    /// `100 Continue` before sending it (and would never send it).
    Close,
}

impl UnreadBound {
    fn of(request: &hyper::Request<Incoming>, max_body_bytes: usize) -> UnreadBound {
        let headers = request.headers();
        let expects_continue = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if expects_continue || declared.is_some_and(|n| n > max_body_bytes as u64) {
            UnreadBound::Close
        } else {
            UnreadBound::Bytes(max_body_bytes)
        }
    }
}

/// Reads what a handler left of a request body, within `bound` and `timeout`; true when
/// the connection can carry another request afterwards.
async fn read_rest(left: Option<Unread>, bound: UnreadBound, timeout: Duration) -> bool {
    let (Some(Unread::Rest(mut body)), UnreadBound::Bytes(mut room)) = (left, bound) else {
        return false;
    };
    let read_all = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            let size = frame.data_ref().map_or(0, |data| data.len());
            let Some(left) = room.checked_sub(size) else {
                return false;
            };
            room = left;
        }
        true
    };
    tokio::time::timeout(timeout, read_all)
        .await
        .unwrap_or(false)
}

/// Runs the router's future; a panic in it (a bug: no handler should panic) becomes a
/// JSON 500 for this request instead of a connection closed without an answer.
async fn answer_or_500(
    future: impl Future<Output = Result<axum::response::Response, Infallible>>,
) -> axum::response::Response {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Ready(Ok(response))) => Poll::Ready(response),
            Ok(Poll::Ready(Err(never))) => match never {},
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => {
                tracing::error!("a request handler panicked; answered 500");
                let mut response = axum::response::Response::new(INTERNAL_ERROR.into());
                *response.status_mut() = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Poll::Ready(response)
            }
        }
    })
    .await
}

/// Answers an over-capacity connection and closes it, lingering (as `conn_io` does) so
/// that a request the client already sent does not turn our answer into a reset.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(OVERLOADED)).await;
    let _ = stream.shutdown().await;
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_handler_that_panics_is_answered_with_a_json_500() {
        let response = answer_or_500(async {
            if std::hint::black_box(true) {
                panic!("a bug in a handler");
            }
            Ok::<_, Infallible>(axum::response::Response::default())
        })
        .await;
        assert_eq!(response.status(), 500);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], br#"{"detail":"Internal Server Error"}"#);
    }
}
