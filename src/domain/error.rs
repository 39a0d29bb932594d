//! Why the core could not answer a request. Each front door maps these to its own status
//! and error body, once; the messages name the component or provider and never hold a
//! secret or an upstream body.

use super::tools::Unsupported;

/// A failure of the chat use case.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChatError {
    /// The limiter could not decide: its store is down and the failure mode is `closed`.
    #[error("{0}")]
    LimiterUnavailable(String),
    /// The provider failed after its retries (or gave an answer that cannot be used).
    #[error("{0}")]
    UpstreamFailed(String),
    /// The provider's last attempt timed out.
    #[error("{0}")]
    UpstreamTimedOut(String),
    /// Every target of the route is rate limited upstream (HTTP 429), which the client
    /// may wait out.
    #[error("{message}")]
    UpstreamRateLimited {
        /// Names the provider.
        message: String,
        /// The upstream's `Retry-After`, when it gave one.
        retry_after: Option<std::time::Duration>,
    },
    /// No route has the model the client named.
    #[error("The model '{0}' does not exist")]
    UnknownModel(String),
    /// The upstream serving the request cannot honour part of it (the client's error:
    /// each door names the field).
    #[error("the upstream '{provider}' cannot honour {what:?}")]
    Unsupported {
        /// The provider that cannot.
        provider: &'static str,
        /// What it cannot honour.
        what: Unsupported,
    },
}
