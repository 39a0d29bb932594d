//! What the SDK doors (OpenAI, Anthropic) share: the road from an authenticated request
//! to an admitted one (deny cache, body, limiter, in the contract's order of checks),
//! streamed answers, and the marks an answer carries. Each door brings
//! its dialect through [`DoorError`] and its parser.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::api::auth::ClientIdentity;
use crate::api::observe::ChatMeta;
use crate::api::sse::{self, KeepAliveEvery};
use crate::chat::service::{Admission, ChatService, Encode, Streamed};
use crate::chat::stream::LiveStream;
use crate::domain::{CacheStatus, ChatError, ChatRequest};
use crate::ratelimit::{BucketPolicy, Decision, Limit};
use crate::serve::body::BodyReadTimeout;

static SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// A door's errors: what the shared road needs to answer in the door's dialect.
pub trait DoorError: IntoResponse + From<ChatError> {
    /// 413: the body is larger than `limit`.
    fn too_large(limit: usize) -> Self;
    /// 408: the body did not arrive in time.
    fn body_timeout() -> Self;
    /// 400: the body could not be read.
    fn unreadable() -> Self;
    /// 429 from the limiter, naming the limit that refused the request.
    fn rate_limited(limit: Limit) -> Self;
    /// Adds the door's limit headers.
    fn limit_headers(headers: &mut HeaderMap, policy: &BucketPolicy, decision: &Decision);
}

/// A JSON error answer; one the client must not retry says `x-should-retry: false`
/// (the official SDKs obey it).
pub fn error_response(status: StatusCode, json: String, retry: bool) -> Response {
    let mut response = (status, json).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if !retry {
        headers.insert(SHOULD_RETRY.clone(), HeaderValue::from_static("false"));
    }
    response
}

/// The answer to a request the core could not answer, in the door's dialect: an
/// upstream's own 429 passed on keeps its `Retry-After` (and `retry-after-ms`, which the
/// SDKs read first), so clients wait as long as the upstream asked.
pub fn chat_error<E: DoorError>(error: ChatError) -> Response {
    let wait = match &error {
        ChatError::UpstreamRateLimited { retry_after, .. } => *retry_after,
        _ => None,
    };
    let mut response = E::from(error).into_response();
    if let Some(wait) = wait {
        let headers = response.headers_mut();
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs_f64().ceil() as u64),
        );
        headers.insert(
            HeaderName::from_static("retry-after-ms"),
            HeaderValue::from(wait.as_millis() as u64),
        );
    }
    response
}

/// Where the road from an authenticated request ends.
pub enum Gate<R> {
    /// Admitted, with a valid body: answer it, then add the limit headers.
    Admitted {
        /// The parsed request.
        request: R,
        /// The limiter's admission (with the cache read it made).
        admission: Admission,
        /// The decision, for the headers.
        decision: Decision,
    },
    /// Answered already (429, 413, 400, 503), headers included.
    Answered(Response),
}

/// The order of checks of CONTRACT §2 on a door: a cached denial (429, no body read),
/// then the body is read and parsed (its errors kept), the limiter decides (reading the
/// cache under `key` in the same round trip), and only then do body errors answer.
pub async fn gate<E: DoorError, R: AsRef<ChatRequest>>(
    chat: &Arc<ChatService>,
    identity: &ClientIdentity,
    body: Result<Bytes, BytesRejection>,
    max_body_bytes: usize,
    parse: impl FnOnce(&[u8]) -> Result<R, E>,
    key: impl FnOnce(&R) -> String,
) -> Gate<R> {
    let policy = &identity.policy;
    let with_limits = |mut response: Response, decision: &Decision| {
        E::limit_headers(response.headers_mut(), policy, decision);
        Gate::Answered(response)
    };
    if let Some(denied) = chat.cached_denial(&identity.bucket_key) {
        return with_limits(rate_limited::<E>(&denied), &denied);
    }
    let parsed = body
        .map_err(|rejection| body_error::<E>(&rejection, max_body_bytes))
        .and_then(|body| parse(&body));
    let cache_key = match &parsed {
        Ok(request) if chat.caching() => Some(key(request)),
        _ => None,
    };
    let request = parsed.as_ref().ok().map(AsRef::as_ref);
    let admission = chat
        .admit(&identity.bucket_key, policy, request, cache_key)
        .await;
    let decision = match &admission.decision {
        Ok(decision) if !decision.allowed => {
            return with_limits(rate_limited::<E>(decision), decision)
        }
        Ok(decision) => decision.clone(),
        Err(error) => return Gate::Answered(E::from(error.clone()).into_response()),
    };
    match parsed {
        Ok(request) => Gate::Admitted {
            request,
            admission,
            decision,
        },
        Err(error) => with_limits(error.into_response(), &decision),
    }
}

/// The door's 429 for a denial, naming the limit that refused it.
fn rate_limited<E: DoorError>(decision: &Decision) -> Response {
    E::rate_limited(decision.denied_by.unwrap_or(Limit::Requests)).into_response()
}

/// A streamed answer in the door's framing: a cache hit replayed from the door's stored
/// body by `replay`, a live answer framed by `live`; a failure before the first byte is
/// a plain error answer.
pub async fn stream_answer<E: DoorError, S>(
    chat: &ChatService,
    request: ChatRequest,
    admission: Admission,
    encode: Encode,
    keep_alive: KeepAliveEvery,
    replay: impl FnOnce(&[u8]) -> Option<Vec<Bytes>>,
    live: impl FnOnce(LiveStream) -> S,
) -> Response
where
    S: futures_util::Stream<Item = Bytes> + Send + 'static,
{
    match chat.answer_stream(request, admission, encode).await {
        Ok(Streamed::Cached { body, provider }) => match replay(&body) {
            Some(frames) => {
                let mut response = sse::response(futures_util::stream::iter(frames), keep_alive);
                mark(&mut response, CacheStatus::Hit, provider);
                response
            }
            None => E::from(ChatError::UpstreamFailed(
                "A cached answer could not be read".into(),
            ))
            .into_response(),
        },
        Ok(Streamed::Live(stream)) => {
            let provider = stream.provider();
            let mut response = sse::response(live(*stream), keep_alive);
            mark(&mut response, CacheStatus::Miss, provider);
            response
        }
        Err(error) => chat_error::<E>(error),
    }
}

/// Why the body could not be read: too large (413), too slow (408) or broken (400).
fn body_error<E: DoorError>(rejection: &BytesRejection, max_body_bytes: usize) -> E {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return E::too_large(max_body_bytes);
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = source {
        if error.is::<BodyReadTimeout>() {
            return E::body_timeout();
        }
        source = error.source();
    }
    E::unreadable()
}

/// Marks an answer for the client (`X-Cache`, `X-Provider`) and for the request log.
pub fn mark(response: &mut Response, cache: CacheStatus, provider: &'static str) {
    let headers = response.headers_mut();
    headers.insert("x-cache", HeaderValue::from_static(cache.as_str()));
    headers.insert("x-provider", HeaderValue::from_static(provider));
    response
        .extensions_mut()
        .insert(ChatMeta { provider, cache });
}

/// A 200 JSON answer of `body`, marked.
pub fn json_answer(body: Bytes, cache: CacheStatus, provider: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    mark(&mut response, cache, provider);
    response
}
