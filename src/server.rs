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
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Version};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::body_timeout::TimeoutBody;
use crate::workers::Workers;

/// Limits of the connection layer.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Open connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a complete request head.
    pub header_read_timeout: Duration,
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
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
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
        let service = connection_service(
            router.clone(),
            peer,
            limits.body_read_timeout,
            draining.clone(),
        );
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        workers.run(move || async move {
            if let Ok(stream) = TcpStream::from_std(stream) {
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
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
fn connection_service(
    router: Router,
    peer: SocketAddr,
    body_read_timeout: Duration,
    draining: Arc<AtomicBool>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send,
> + Send {
    hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut request =
            request.map(|body| axum::body::Body::new(TimeoutBody::new(body, body_read_timeout)));
        request.extensions_mut().insert(ConnectInfo(peer));
        let http1 = request.version() < Version::HTTP_2;
        let (router, draining) = (router.clone(), draining.clone());
        async move {
            let mut response = router.oneshot(request).await?;
            // Read when the answer is ready: a request already in flight when the drain
            // starts must also tell its client to stop reusing the connection.
            if http1 && draining.load(Ordering::Relaxed) {
                let close = HeaderValue::from_static("close");
                response.headers_mut().insert(header::CONNECTION, close);
            }
            Ok(response)
        }
    })
}

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(OVERLOADED)).await;
    let _ = stream.shutdown().await;
}
