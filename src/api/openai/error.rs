//! The OpenAI door's errors: OpenAI's envelope `{"error":{"message","type","param","code"}}`
//! with its statuses, and the one mapping of the core's errors to it. A response the
//! client must not retry carries `x-should-retry: false`, which the official SDKs obey.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::api::door::{error_response, DoorError};
use crate::domain::{ChatError, Unsupported};
use crate::ratelimit::{BucketPolicy, Decision, Limit};

/// An error as an OpenAI client expects it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Words for a person.
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `rate_limit_error`, `server_error`.
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// OpenAI's machine-readable `code`, if any.
    pub code: Option<&'static str>,
    /// `false` when retrying cannot help (`x-should-retry: false`).
    pub retry: bool,
}

impl OpenAiError {
    /// 400 about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> OpenAiError {
        OpenAiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
            retry: false,
        }
    }

    /// 400 for a body that is not a JSON object.
    pub fn unparsable() -> OpenAiError {
        OpenAiError {
            param: None,
            ..OpenAiError::invalid(
                "",
                "We could not parse the JSON body of your request. The body must be a JSON object.",
            )
        }
    }

    /// 400 for a field this gateway's upstreams cannot honour (never dropped silently).
    pub fn unsupported(param: &str) -> OpenAiError {
        OpenAiError {
            code: Some("unsupported_parameter"),
            ..OpenAiError::invalid(
                param,
                format!("Unsupported parameter: '{param}' is not supported by the upstream serving this model."),
            )
        }
    }

    /// 401.
    pub fn unauthorized() -> OpenAiError {
        OpenAiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect API key provided. Send a key configured on the gateway as `Authorization: Bearer <key>`.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry: false,
        }
    }

    /// 404 for a model no route serves.
    pub fn model_not_found(model: &str) -> OpenAiError {
        OpenAiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry: false,
        }
    }

    /// 413.
    pub fn too_large(limit: usize) -> OpenAiError {
        OpenAiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: Some("request_too_large"),
            param: None,
            ..OpenAiError::invalid(
                "",
                format!("Request body too large: the limit is {limit} bytes."),
            )
        }
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout() -> OpenAiError {
        OpenAiError {
            status: StatusCode::REQUEST_TIMEOUT,
            param: None,
            retry: true,
            ..OpenAiError::invalid("", "The request body was not received in time.")
        }
    }

    /// 429 from the limiter, in OpenAI's words for `limit`: retrying after `Retry-After`
    /// helps for the buckets, not for a request larger than the token bucket nor for a
    /// spent budget (`insufficient_quota`, as OpenAI says of a spent quota).
    pub fn rate_limited(limit: Limit) -> OpenAiError {
        let (message, kind, code) = match limit {
            Limit::Requests => (
                "Rate limit reached for requests. Please wait before trying again.",
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            Limit::Tokens => (
                "Rate limit reached for tokens per minute. Please wait before trying again.",
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            Limit::TooLarge => (
                "Request too large: it reserves more tokens (prompt and max_tokens) than the \
                 tokens-per-minute limit allows. Send a shorter prompt or a lower max_tokens.",
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            Limit::Budget => (
                "You exceeded your token budget for this period. It starts again when the \
                 period ends (see Retry-After).",
                "insufficient_quota",
                "insufficient_quota",
            ),
        };
        OpenAiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind,
            param: None,
            code: Some(code),
            retry: limit.retryable(),
        }
    }

    /// 503 when the gateway is at its concurrency cap.
    pub fn overloaded() -> OpenAiError {
        OpenAiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "Gateway overloaded: too many requests in flight; try again shortly".into(),
            kind: "server_error",
            param: None,
            code: None,
            retry: true,
        }
    }
}

impl From<ChatError> for OpenAiError {
    fn from(error: ChatError) -> OpenAiError {
        // The gateway already retried the upstream: retrying at once repeats its failure.
        let (status, retry) = match &error {
            ChatError::Unsupported { provider, what } => {
                let (param, what) = match what {
                    Unsupported::ForcedToolChoice => {
                        ("tool_choice", "a 'tool_choice' that forces a tool call")
                    }
                    Unsupported::StrictTools => ("tools", "'strict' function tools"),
                    Unsupported::Field(field) => (*field, "this value"),
                    Unsupported::PassedThrough(field) => (
                        field.as_str(),
                        "a field only OpenAI-compatible upstreams take",
                    ),
                };
                return OpenAiError {
                    code: Some("unsupported_parameter"),
                    ..OpenAiError::invalid(
                        param,
                        format!("Unsupported parameter: {what} is not supported by the upstream serving this model ('{provider}')."),
                    )
                };
            }
            ChatError::UnknownModel(model) => return OpenAiError::model_not_found(model),
            ChatError::UpstreamRateLimited { .. } => {
                return OpenAiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: error.to_string(),
                    kind: "rate_limit_error",
                    param: None,
                    code: Some("rate_limit_exceeded"),
                    retry: true,
                }
            }
            ChatError::LimiterUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, true),
            ChatError::UpstreamFailed(_) => (StatusCode::BAD_GATEWAY, false),
            ChatError::UpstreamTimedOut(_) => (StatusCode::GATEWAY_TIMEOUT, false),
        };
        OpenAiError {
            status,
            message: error.to_string(),
            kind: "server_error",
            param: None,
            code: None,
            retry,
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

/// The `error` object, also sent alone as an event when a stream fails.
#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl OpenAiError {
    /// `{"error":{...}}` as JSON.
    pub fn json(&self) -> String {
        serde_json::to_string(&Envelope {
            error: Body {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_else(|_| r#"{"error":{"message":"Internal error","type":"server_error","param":null,"code":null}}"#.to_owned())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        error_response(self.status, self.json(), self.retry)
    }
}

impl DoorError for OpenAiError {
    fn too_large(limit: usize) -> Self {
        OpenAiError::too_large(limit)
    }

    fn body_timeout() -> Self {
        OpenAiError::body_timeout()
    }

    fn unreadable() -> Self {
        OpenAiError::unparsable()
    }

    fn rate_limited(limit: Limit) -> Self {
        OpenAiError::rate_limited(limit)
    }

    fn limit_headers(headers: &mut HeaderMap, policy: &BucketPolicy, decision: &Decision) {
        crate::api::limit_headers::apply_openai(headers, policy, decision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_render_openais_envelope_and_exhausted_retries_say_not_to_retry() {
        let error = OpenAiError::from(ChatError::UpstreamFailed(
            "Provider 'ollama' failed after 4 attempt(s): upstream answered HTTP 503".into(),
        ));
        assert_eq!(error.status, 502);
        let response = error.into_response();
        assert_eq!(response.headers()["x-should-retry"], "false");
        let invalid = OpenAiError::invalid("messages[0].role", "bad role");
        let body: serde_json::Value = serde_json::from_str(&invalid.json()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "bad role", "type": "invalid_request_error", "param": "messages[0].role", "code": null}})
        );
        let limited = OpenAiError::rate_limited(Limit::Requests).into_response();
        assert!(limited.headers().get("x-should-retry").is_none());
    }
}
