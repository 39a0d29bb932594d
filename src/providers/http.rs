//! The HTTP client all providers share: hyper's pooled keep-alive client, or reqwest when
//! the environment names an outbound proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`).
//!
//! Why two: reqwest cost about a third of the gateway's user-space instructions on a
//! cache miss (callgrind: ~47k per request, of which re-parsing the URL of every
//! response for its redirect bookkeeping ~11k and its tower stack ~20k), while hyper's
//! client alone does the same exchange in a fraction of that. reqwest stays for proxied
//! set-ups because it speaks HTTP proxies and CONNECT tunnels, which hyper's client does
//! not by itself; a gateway that used to honour those variables keeps honouring them.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body as _;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::DeserializeOwned;

use super::ProviderError;
use crate::serve::workers::PerWorker;
use crate::telemetry::scope;

/// Largest upstream answer read: a bigger one is refused as invalid instead of being
/// buffered without bound.
pub const MAX_ANSWER_BYTES: usize = 32 * 1024 * 1024;

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

const USER_AGENT_VALUE: &str = concat!("llm-gateway/", env!("CARGO_PKG_VERSION"));

/// Environment variables that name an outbound proxy (the names curl and reqwest read).
const PROXY_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// A pooled HTTP client for provider calls; cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct UpstreamClient(Transport);

#[derive(Clone)]
enum Transport {
    // One pool per worker thread (see `workers`): a pooled connection is then only used
    // by the thread whose runtime runs its task, so a call never wakes another thread.
    Direct(Arc<PerWorker<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>>),
    Proxied(reqwest::Client),
}

impl UpstreamClient {
    /// The client for this process, for `workers` worker threads: direct, unless the
    /// environment names a proxy. `connect_timeout` bounds connection set-up; callers
    /// bound whole attempts.
    pub fn new(connect_timeout: Duration, workers: usize) -> Result<UpstreamClient, String> {
        let proxied = PROXY_VARIABLES
            .iter()
            .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()));
        if proxied {
            // reqwest reads the variables itself, NO_PROXY included.
            return reqwest_client(connect_timeout, None);
        }
        let client = PerWorker::new(workers, move || direct_client(connect_timeout));
        Ok(UpstreamClient(Transport::Direct(Arc::new(client))))
    }

    /// A client that sends every call through the HTTP proxy at `proxy`.
    pub fn through_proxy(connect_timeout: Duration, proxy: &str) -> Result<UpstreamClient, String> {
        let proxy = reqwest::Proxy::all(proxy).map_err(|e| format!("proxy: {e}"))?;
        reqwest_client(connect_timeout, Some(proxy))
    }

    /// POSTs `body` as JSON to `uri` with extra `headers` (keys among them are marked
    /// sensitive by their makers, so they never show in debug output) and decodes a 2xx
    /// JSON answer. Every failure is classified as a [`ProviderError`].
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        uri: &Uri,
        headers: &[(HeaderName, HeaderValue)],
        body: Vec<u8>,
    ) -> Result<T, ProviderError> {
        let answer = match self.send(uri, headers, body).await? {
            Answer::Direct(response) => {
                if response.body().size_hint().lower() > MAX_ANSWER_BYTES as u64 {
                    return Err(too_large());
                }
                Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                    .collect()
                    .await
                    .map_err(|error| {
                        if error.is::<http_body_util::LengthLimitError>() {
                            too_large()
                        } else {
                            ProviderError::Connect
                        }
                    })?
                    .to_bytes()
            }
            Answer::Proxied(mut response) => {
                if response
                    .content_length()
                    .is_some_and(|length| length > MAX_ANSWER_BYTES as u64)
                {
                    return Err(too_large());
                }
                // Chunk by chunk: an answer without a length is refused as soon as it
                // passes the limit, not after all of it has been buffered.
                let mut answer = Vec::new();
                while let Some(chunk) = response.chunk().await.map_err(|e| from_reqwest(&e))? {
                    if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
                        return Err(too_large());
                    }
                    answer.extend_from_slice(&chunk);
                }
                Bytes::from(answer)
            }
        };
        serde_json::from_slice(&answer)
            .map_err(|_| ProviderError::Invalid("body is not the expected JSON".into()))
    }

    /// Like [`UpstreamClient::post_json`], for a streamed answer: returns once a 2xx head
    /// has arrived, with the body's chunks as they come. Dropping the stream closes the
    /// upstream connection (a body not read to its end is never pooled again).
    pub async fn post_stream(
        &self,
        uri: &Uri,
        headers: &[(HeaderName, HeaderValue)],
        body: Vec<u8>,
    ) -> Result<ByteStream, ProviderError> {
        Ok(match self.send(uri, headers, body).await? {
            Answer::Direct(response) => Box::pin(
                response
                    .into_body()
                    .into_data_stream()
                    .map_err(|_| ProviderError::Connect),
            ),
            Answer::Proxied(response) => {
                Box::pin(response.bytes_stream().map_err(|e| from_reqwest(&e)))
            }
        })
    }

    /// Sends the request; `Ok` only with a 2xx head. A traced request's provider attempt
    /// goes with it as the W3C `traceparent`, so the upstream's spans join the trace.
    async fn send(
        &self,
        uri: &Uri,
        extra_headers: &[(HeaderName, HeaderValue)],
        body: Vec<u8>,
    ) -> Result<Answer, ProviderError> {
        match &self.0 {
            Transport::Direct(client) => {
                let mut request = Request::new(Full::new(Bytes::from(body)));
                *request.method_mut() = Method::POST;
                *request.uri_mut() = uri.clone();
                let headers = request.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
                for (name, value) in extra_headers {
                    headers.insert(name.clone(), value.clone());
                }
                if let Some(parent) = scope::upstream_traceparent() {
                    headers.insert(TRACEPARENT.clone(), parent);
                }
                let response = client
                    .get()
                    .request(request)
                    .await
                    .map_err(|_| ProviderError::Connect)?;
                let status = response.status();
                if !status.is_success() {
                    return Err(ProviderError::refused(status.as_u16(), response.headers()));
                }
                Ok(Answer::Direct(response))
            }
            Transport::Proxied(client) => {
                let mut request = client
                    .post(uri.to_string())
                    .header(CONTENT_TYPE, "application/json")
                    .body(body);
                for (name, value) in extra_headers {
                    request = request.header(name.clone(), value.clone());
                }
                if let Some(parent) = scope::upstream_traceparent() {
                    request = request.header(TRACEPARENT.clone(), parent);
                }
                let response = request.send().await.map_err(|e| from_reqwest(&e))?;
                let status = response.status();
                if !status.is_success() {
                    return Err(ProviderError::refused(status.as_u16(), response.headers()));
                }
                Ok(Answer::Proxied(response))
            }
        }
    }
}

/// A streamed upstream answer, chunk by chunk.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, ProviderError>> + Send>>;

/// A 2xx answer whose body has not been read yet.
enum Answer {
    Direct(hyper::Response<hyper::body::Incoming>),
    Proxied(reqwest::Response),
}

fn too_large() -> ProviderError {
    ProviderError::Invalid(format!("answer is larger than {MAX_ANSWER_BYTES} bytes"))
}

/// hyper's pooled keep-alive client, for http and https URLs.
fn direct_client(connect_timeout: Duration) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    // Let the TLS layer see https URLs (it decides per URL whether to wrap).
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .pool_timer(TokioTimer::new())
        .build(https)
}

fn reqwest_client(
    connect_timeout: Duration,
    proxy: Option<reqwest::Proxy>,
) -> Result<UpstreamClient, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        // An LLM API answers, it does not redirect (the original, on httpx, did not
        // follow redirects either).
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT_VALUE);
    if let Some(proxy) = proxy {
        builder = builder.proxy(proxy);
    }
    builder
        .build()
        .map(|client| UpstreamClient(Transport::Proxied(client)))
        .map_err(|e| e.to_string())
}

/// Classifies a reqwest error without keeping its text (it may include the URL).
fn from_reqwest(error: &reqwest::Error) -> ProviderError {
    if error.is_timeout() {
        ProviderError::Timeout
    } else if let Some(status) = error.status() {
        ProviderError::Status(status.as_u16())
    } else {
        ProviderError::Connect
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-shot HTTP server: records the request it gets and answers `answer`.
    async fn one_shot(answer: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // Head and the small body arrive together or shortly after.
            while !String::from_utf8_lossy(&seen).contains("{\"q\":1}") {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            stream.write_all(answer.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
            String::from_utf8_lossy(&seen).into_owned()
        });
        (format!("http://{addr}"), handle)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"a\":\"yes\"}";

    #[tokio::test]
    async fn a_direct_call_sends_json_with_the_extra_header_and_decodes_the_answer() {
        let (base, server) = one_shot(OK).await;
        let client = UpstreamClient::new(Duration::from_secs(1), 1).unwrap();
        let uri: Uri = format!("{base}/api/chat").parse().unwrap();
        let answer: serde_json::Value = client
            .post_json(
                &uri,
                &[(
                    HeaderName::from_static("x-goog-api-key"),
                    HeaderValue::from_static("k-123"),
                )],
                b"{\"q\":1}".to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(answer, serde_json::json!({"a": "yes"}));
        let seen = server.await.unwrap().to_ascii_lowercase();
        assert!(seen.starts_with("post /api/chat http/1.1\r\n"), "{seen}");
        assert!(seen.contains("content-type: application/json"), "{seen}");
        assert!(seen.contains("x-goog-api-key: k-123"), "{seen}");
        assert!(seen.contains("user-agent: llm-gateway/"), "{seen}");
    }

    #[tokio::test]
    async fn a_proxied_call_goes_through_the_proxy() {
        let (proxy, server) = one_shot(OK).await;
        let client = UpstreamClient::through_proxy(Duration::from_secs(1), &proxy).unwrap();
        // Not resolvable: only the proxy can have answered.
        let uri: Uri = "http://upstream.invalid:9/api/chat".parse().unwrap();
        let answer: serde_json::Value = client
            .post_json(&uri, &[], b"{\"q\":1}".to_vec())
            .await
            .unwrap();
        assert_eq!(answer, serde_json::json!({"a": "yes"}));
        let seen = server.await.unwrap();
        assert!(
            seen.starts_with("POST http://upstream.invalid:9/api/chat HTTP/1.1\r\n"),
            "{seen}"
        );
    }

    #[tokio::test]
    async fn a_proxied_answer_without_a_length_is_refused_once_it_passes_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = format!("http://{}", listener.local_addr().unwrap());
        let sent = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            // Chunks of 1 MiB until the client stops reading (it hangs up past the limit).
            let chunk = format!("100000\r\n{}\r\n", "x".repeat(1 << 20));
            let mut sent = 0usize;
            while sent <= 2 * MAX_ANSWER_BYTES && stream.write_all(chunk.as_bytes()).await.is_ok() {
                sent += 1 << 20;
            }
            sent
        });
        let client = UpstreamClient::through_proxy(Duration::from_secs(1), &proxy).unwrap();
        let uri: Uri = "http://upstream.invalid:9/api/chat".parse().unwrap();
        let result = client
            .post_json::<serde_json::Value>(&uri, &[], b"{\"q\":1}".to_vec())
            .await;
        assert!(
            matches!(result, Err(ProviderError::Invalid(ref m)) if m.contains("larger")),
            "{result:?}"
        );
        drop(client);
        assert!(
            sent.await.unwrap() <= 2 * MAX_ANSWER_BYTES,
            "the client stopped reading near the limit"
        );
    }

    #[tokio::test]
    async fn statuses_bodies_and_refused_connections_are_classified() {
        let client = UpstreamClient::new(Duration::from_secs(1), 1).unwrap();
        let call = |base: String| {
            let client = client.clone();
            async move {
                let uri: Uri = format!("{base}/x").parse().unwrap();
                client
                    .post_json::<serde_json::Value>(&uri, &[], b"{\"q\":1}".to_vec())
                    .await
            }
        };
        let (base, _server) = one_shot(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(matches!(call(base).await, Err(ProviderError::Status(503))));

        let (base, _server) =
            one_shot("HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot json!")
                .await;
        assert!(matches!(call(base).await, Err(ProviderError::Invalid(_))));

        let (base, _server) =
            one_shot("HTTP/1.1 200 OK\r\ncontent-length: 99999999\r\nconnection: close\r\n\r\n{}")
                .await;
        assert!(
            matches!(call(base).await, Err(ProviderError::Invalid(ref m)) if m.contains("larger")),
            "an answer over the limit is refused before it is read"
        );

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        assert!(matches!(call(base).await, Err(ProviderError::Connect)));
    }
}
