//! API key authentication (constant time) and the client identity it yields.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::error::ApiError;
use crate::ratelimit::{bucket_key, BucketPolicy};

/// Longer presented keys are refused before hashing; no real key comes near this.
const MAX_KEY_BYTES: usize = 4096;

/// The configured client keys, held only as SHA-256 digests.
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// Keys from their plain forms.
    pub fn new<S: AsRef<str>>(keys: &[S]) -> ApiKeys {
        ApiKeys {
            digests: keys
                .iter()
                .map(|k| Sha256::digest(k.as_ref().as_bytes()).into())
                .collect(),
        }
    }

    /// Whether `presented` is a configured key. Compares fixed-size digests against every
    /// configured key without stopping early, so timing reveals neither which key matched
    /// nor how much of one did.
    pub fn contains(&self, presented: &str) -> bool {
        if presented.len() > MAX_KEY_BYTES {
            return false;
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        for known in &self.digests {
            found |= known.ct_eq(&digest);
        }
        found.into()
    }
}

/// Who is calling, decided by authentication and read by the limiter.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    /// The client's bucket key (`ratelimit:` + digest); the raw key is not kept.
    pub bucket_key: String,
    /// The client's bucket policy.
    pub policy: Arc<BucketPolicy>,
}

/// The `X-API-Key` value, if present and printable.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-api-key")?.to_str().ok()
}

/// Middleware: 401 unless `X-API-Key` is a configured key; otherwise attaches the
/// client's identity for the limiter.
pub async fn require_api_key(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(key) = presented_key(request.headers()).filter(|k| state.api_keys.contains(k)) else {
        return ApiError::Unauthorized.into_response();
    };
    let identity = ClientIdentity {
        bucket_key: bucket_key(&format!("key:{key}")),
        policy: state.default_policy.clone(),
    };
    request.extensions_mut().insert(identity);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_keys_are_accepted() {
        let keys = ApiKeys::new(&["sk-a", "sk-b"]);
        assert!(keys.contains("sk-a"));
        assert!(keys.contains("sk-b"));
        assert!(!keys.contains("sk-c"));
        assert!(!keys.contains(""));
        assert!(!keys.contains("sk-a "));
        assert!(!keys.contains(&"x".repeat(100_000)));
        assert!(!ApiKeys::new::<&str>(&[]).contains("sk-a"));
    }
}
