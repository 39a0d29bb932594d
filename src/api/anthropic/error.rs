//! The Anthropic door's errors: `{"type":"error","error":{"type","message"}}` with
//! Anthropic's statuses and types, and the one mapping of the core's errors to it. As on
//! the OpenAI door, an answer not worth retrying says `x-should-retry: false`.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::api::door::{error_response, DoorError};
use crate::domain::{ChatError, Unsupported};
use crate::ratelimit::{BucketPolicy, Decision, Limit};

/// An error as an Anthropic client expects it.
#[derive(Debug, Clone, PartialEq)]
pub struct AnthropicError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Anthropic's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// Words for a person.
    pub message: String,
    /// `false` when retrying cannot help (`x-should-retry: false`).
    pub retry: bool,
}

impl AnthropicError {
    /// 400.
    pub fn invalid(message: impl Into<String>) -> AnthropicError {
        AnthropicError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            retry: false,
        }
    }

    /// 400 for a field the upstreams cannot honour (never dropped silently).
    pub fn unsupported(field: &str) -> AnthropicError {
        AnthropicError::invalid(format!(
            "{field}: not supported by the upstream serving this model"
        ))
    }

    /// 401.
    pub fn unauthorized() -> AnthropicError {
        AnthropicError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            message: "invalid x-api-key".into(),
            retry: false,
        }
    }

    /// 413.
    pub fn too_large(limit: usize) -> AnthropicError {
        AnthropicError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "request_too_large",
            message: format!("Request body too large: the limit is {limit} bytes."),
            retry: false,
        }
    }

    /// 408.
    pub fn body_timeout() -> AnthropicError {
        AnthropicError {
            status: StatusCode::REQUEST_TIMEOUT,
            retry: true,
            ..AnthropicError::invalid("The request body was not received in time.")
        }
    }

    /// 429 from the limiter, in Anthropic's words for `limit`.
    pub fn rate_limited(limit: Limit) -> AnthropicError {
        let message = match limit {
            Limit::Requests => {
                "Number of requests has exceeded your rate limit. Please wait before trying again."
            }
            Limit::Tokens => {
                "Number of tokens has exceeded your per-minute rate limit. Please wait before \
                 trying again."
            }
            Limit::TooLarge => {
                "Request too large: it reserves more tokens (prompt and max_tokens) than your \
                 per-minute rate limit allows. Send a shorter prompt or a lower max_tokens."
            }
            Limit::Budget => {
                "Your token budget for this period is spent. It starts again when the period \
                 ends (see retry-after)."
            }
        };
        AnthropicError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            message: message.into(),
            retry: limit.retryable(),
        }
    }

    /// 503 when the gateway is at its concurrency cap.
    pub fn overloaded() -> AnthropicError {
        AnthropicError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "overloaded_error",
            message: "Gateway overloaded: too many requests in flight; try again shortly".into(),
            retry: true,
        }
    }

    /// `{"type":"error","error":{...}}` as JSON: the body, and the data of an `error`
    /// event when a stream fails.
    pub fn json(&self) -> String {
        #[derive(Serialize)]
        struct Envelope<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            message: &'a str,
        }
        serde_json::to_string(&Envelope {
            kind: "error",
            error: Inner {
                kind: self.kind,
                message: &self.message,
            },
        })
        .unwrap_or_else(|_| {
            r#"{"type":"error","error":{"type":"api_error","message":"Internal error"}}"#.to_owned()
        })
    }
}

impl From<ChatError> for AnthropicError {
    fn from(error: ChatError) -> AnthropicError {
        // The gateway already retried the upstream: retrying at once repeats its failure.
        let (status, kind, retry) = match &error {
            ChatError::Unsupported { provider, what } => {
                let field = match what {
                    Unsupported::ForcedToolChoice => "tool_choice (forcing a tool call)",
                    Unsupported::StrictTools => "tools.strict",
                    Unsupported::Field(field) => field,
                    Unsupported::PassedThrough(field) => field.as_str(),
                };
                return AnthropicError::invalid(format!(
                    "{field}: not supported by the upstream serving this model ('{provider}')"
                ));
            }
            ChatError::LimiterUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", true)
            }
            ChatError::UnknownModel(model) => {
                return AnthropicError {
                    status: StatusCode::NOT_FOUND,
                    kind: "not_found_error",
                    message: format!("model: {model}"),
                    retry: false,
                }
            }
            ChatError::UpstreamRateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", true)
            }
            ChatError::UpstreamFailed(_) => (StatusCode::BAD_GATEWAY, "api_error", false),
            ChatError::UpstreamTimedOut(_) => (StatusCode::GATEWAY_TIMEOUT, "api_error", false),
        };
        AnthropicError {
            status,
            kind,
            message: error.to_string(),
            retry,
        }
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        error_response(self.status, self.json(), self.retry)
    }
}

impl DoorError for AnthropicError {
    fn too_large(limit: usize) -> Self {
        AnthropicError::too_large(limit)
    }

    fn body_timeout() -> Self {
        AnthropicError::body_timeout()
    }

    fn unreadable() -> Self {
        AnthropicError::invalid("The request body could not be read.")
    }

    fn rate_limited(limit: Limit) -> Self {
        AnthropicError::rate_limited(limit)
    }

    fn limit_headers(headers: &mut HeaderMap, policy: &BucketPolicy, decision: &Decision) {
        crate::api::limit_headers::apply_anthropic(headers, policy, decision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_render_anthropics_envelope() {
        let body: serde_json::Value =
            serde_json::from_str(&AnthropicError::unauthorized().json()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
        );
        let failed = AnthropicError::from(ChatError::UpstreamTimedOut("slow".into()));
        assert_eq!(
            (failed.status.as_u16(), failed.kind, failed.retry),
            (504, "api_error", false)
        );
    }
}
