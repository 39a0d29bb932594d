//! Middleware: one limiter call per authenticated chat request; 429 when denied, and the
//! limit headers on every answer either way.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::headers;
use crate::app::AppState;
use crate::auth::ClientIdentity;
use crate::error::ApiError;

/// Applies the client's bucket. Runs after authentication, before the body is read.
pub async fn enforce_rate_limit(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(identity) = request.extensions().get::<ClientIdentity>().cloned() else {
        // Only reachable if the layers are mis-ordered; refuse rather than admit.
        return ApiError::Unauthorized.into_response();
    };
    let decision = match state
        .limiter
        .check(&identity.bucket_key, &identity.policy)
        .await
    {
        Ok(decision) => decision,
        Err(error) => return error.into_response(),
    };
    let mut response = if decision.allowed {
        next.run(request).await
    } else {
        ApiError::RateLimited.into_response()
    };
    headers::apply(response.headers_mut(), &identity.policy, &decision);
    response
}
