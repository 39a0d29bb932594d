//! `POST /api/v1/chat` and `/v1/chat`: limit, validate, then answer from the chat use case.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::schema::parse_chat_request;
use crate::api::auth::ClientIdentity;
use crate::api::limit_headers;
use crate::cache::cache_key;
use crate::chat::service::{ChatOutcome, ChatService};
use crate::domain::{ChatError, Reply, Usage};
use crate::ratelimit::{Decision, Limit};
use crate::serve::body::BodyReadTimeout;

/// The largest request body (`MAX_BODY_BYTES`), named in 413 answers.
#[derive(Debug, Clone, Copy)]
pub struct MaxBodyBytes(pub usize);

/// The request's `Content-Type`, if any. Taken alone: extracting the whole `HeaderMap`
/// cloned every header of every request.
pub struct ContentType(Option<HeaderValue>);

impl<S: Send + Sync> FromRequestParts<S> for ContentType {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ContentType(
            parts.headers.get(header::CONTENT_TYPE).cloned(),
        ))
    }
}

/// The chat handler. Authentication has run (see `app.rs`); this applies the limiter
/// and answers.
///
/// The body is read (bounded by `MAX_BODY_BYTES`) and validated before the limiter call
/// so that the limiter can fetch the cache entry in the same Redis round trip, but its
/// errors are answered only after the limiter's verdict: the order of CONTRACT §2
/// (429, then 413/422, then 503/502/504) holds whatever the client sent.
pub async fn chat(
    State(chat): State<Arc<ChatService>>,
    State(MaxBodyBytes(max_body_bytes)): State<MaxBodyBytes>,
    identity: Option<Extension<ClientIdentity>>,
    ContentType(content_type): ContentType,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(Extension(identity)) = identity else {
        // Only reachable if the layers are mis-ordered; refuse rather than admit.
        return ApiError::Unauthorized.into_response();
    };
    if let Some(denied) = chat.cached_denial(&identity.bucket_key) {
        return rate_limited(&identity, &denied);
    }
    let parsed = body
        .map_err(|rejection| body_error(&rejection, max_body_bytes))
        .and_then(|body| {
            let content_type = content_type.as_ref().and_then(|v| v.to_str().ok());
            parse_chat_request(&body, content_type)
        });
    let cache_key = match &parsed {
        Ok(request) if chat.caching() => Some(cache_key(request)),
        _ => None,
    };
    let admission = chat
        .admit(
            &identity.bucket_key,
            &identity.policy,
            parsed.as_ref().ok(),
            cache_key,
        )
        .await;
    let decision = match &admission.decision {
        Ok(decision) if !decision.allowed => return rate_limited(&identity, decision),
        other => other.clone(),
    };
    let answer = match (parsed, &decision) {
        (Err(error), _) => Err(error),
        (Ok(_), Err(error)) => Err(ApiError::from(error.clone())),
        (Ok(request), Ok(_)) => chat
            .answer(request, admission, encode)
            .await
            .map_err(ApiError::from),
    };
    let mut response = match answer {
        Ok(outcome) => answer_response(outcome),
        Err(error) => error.into_response(),
    };
    if let Ok(decision) = &decision {
        limit_headers::apply(response.headers_mut(), &identity.policy, decision);
    }
    response
}

/// Why the body could not be read: too large (413), too slow (408) or broken (400).
fn body_error(rejection: &BytesRejection, max_body_bytes: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge(max_body_bytes);
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = source {
        if error.is::<BodyReadTimeout>() {
            return ApiError::RequestTimeout;
        }
        source = error.source();
    }
    ApiError::BadBody
}

/// The original's answer body: `{"id","provider","content","usage"}`, the id a
/// hyphenated UUID4. The cache keeps exactly these bytes, so a hit is sent unchanged.
#[derive(serde::Serialize)]
struct AnswerBody<'a> {
    id: &'a str,
    provider: &'a str,
    content: &'a str,
    usage: &'a Usage,
}

fn encode(reply: &Reply) -> Result<Bytes, ChatError> {
    let mut id = uuid::Uuid::encode_buffer();
    let body = AnswerBody {
        id: reply.id.hyphenated().encode_lower(&mut id),
        provider: reply.provider,
        content: &reply.completion.content,
        usage: &reply.completion.usage,
    };
    // Sized up front: growing by doubling copied long answers several times.
    let mut bytes = Vec::with_capacity(body.content.len() + 256);
    serde_json::to_writer(&mut bytes, &body)
        .map(|()| Bytes::from(bytes))
        .map_err(|_| {
            ChatError::UpstreamFailed(format!(
                "Provider '{}' answer could not be encoded",
                reply.provider
            ))
        })
}

fn rate_limited(identity: &ClientIdentity, decision: &Decision) -> Response {
    let error = match decision.denied_by.unwrap_or(Limit::Requests) {
        Limit::Requests => ApiError::RateLimited,
        Limit::Tokens => {
            ApiError::TokensLimited("Too many tokens per minute. Please wait before trying again.")
        }
        Limit::TooLarge => ApiError::TokensLimited(
            "Request too large: it reserves more tokens (prompt and max_tokens) than the \
             tokens-per-minute limit allows.",
        ),
        Limit::Budget => ApiError::TokensLimited(
            "Token budget spent for this period. It starts again when the period ends.",
        ),
    };
    let mut response = error.into_response();
    limit_headers::apply(response.headers_mut(), &identity.policy, decision);
    response
}

fn answer_response(outcome: ChatOutcome) -> Response {
    crate::api::door::json_answer(outcome.body, outcome.cache, outcome.provider)
}
